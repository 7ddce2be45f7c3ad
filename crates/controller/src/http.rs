//! The controller's HTTP/JSON API (routes: see the `taidon-api` crate).

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;
use taidon_api::{
    ApiError, CreateInstance, DsnRequest, ErrorKind, Health, Leases, PrepareEvent, PrepareRequest,
    ResolveRequest, TokenRole,
};

use crate::extract::{Json, Path, Query};
use crate::tokens::{AuthError, Principal};
use crate::{Controller, ControllerError};

type Ctl = State<Arc<Controller>>;
type Caller = axum::Extension<Principal>;

impl IntoResponse for ControllerError {
    fn into_response(self) -> Response {
        api_error(self.to_api())
    }
}

fn api_error(err: ApiError) -> Response {
    let status =
        StatusCode::from_u16(err.kind.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, Json(err)).into_response()
}

/// The API router. Every route but health and the webhook needs a bearer token, and each
/// group of routes admits some roles only: a user's routes (admins too), the gateway's
/// (resolve, touch, release, park, unpark; admins too), the admin's (shutdown), and the public keys (any).
pub fn router(controller: Arc<Controller>) -> Router {
    const USERS: &[TokenRole] = &[TokenRole::Admin, TokenRole::User];
    const GATEWAYS: &[TokenRole] = &[TokenRole::Admin, TokenRole::Gateway];
    const ADMINS: &[TokenRole] = &[TokenRole::Admin];
    let users = Router::new()
        .route("/v1/status", get(status))
        .route("/v1/prepare", post(prepare))
        .route("/v1/blobs/missing", post(blobs_missing))
        .route(
            "/v1/blobs/{sha256}",
            axum::routing::put(put_blob).layer(axum::extract::DefaultBodyLimit::disable()),
        )
        .route("/v1/states", get(states))
        .route("/v1/states/{id}", axum::routing::delete(remove_state))
        .route("/v1/states/{id}/push", post(push_state))
        .route("/v1/instances", get(instances).post(create_instance))
        .route("/v1/instances/{id}", get(instance).delete(delete_instance))
        .route("/v1/dsn", post(dsn))
        .route("/v1/warmup", post(warmup))
        .route("/v1/pins", post(pin))
        .route("/v1/unpin", post(unpin))
        .route("/v1/events", get(events))
        .route("/v1/builds/{build}/done", post(command_done))
        .route("/v1/plan", post(plan))
        .route("/v1/leases", get(leases).post(lease))
        .route("/v1/leases/{id}", axum::routing::delete(release_lease))
        .route("/v1/fsck", post(fsck))
        .route_layer(middleware::from_fn_with_state(USERS, require_role));
    let gateways = Router::new()
        .route("/v1/resolve", post(resolve))
        .route("/v1/touch", post(touch))
        .route("/v1/release", post(release))
        .route("/v1/park", post(park))
        .route("/v1/unpark", post(unpark))
        .route_layer(middleware::from_fn_with_state(GATEWAYS, require_role));
    let admins = Router::new()
        .route("/v1/shutdown", post(shutdown))
        .route_layer(middleware::from_fn_with_state(ADMINS, require_role));
    let protected = Router::new()
        .route("/v1/keys", get(keys))
        .route("/metrics", get(metrics))
        .merge(users)
        .merge(gateways)
        .merge(admins)
        .route_layer(middleware::from_fn_with_state(
            Arc::clone(&controller),
            require_token,
        ));
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/openapi.json", get(crate::openapi::openapi_json))
        // Signed with the webhook secret instead of the API token.
        .route("/v1/webhook", post(webhook))
        .merge(protected)
        .merge(crate::status_page::routes())
        .with_state(controller)
        .layer(middleware::from_fn(crate::request_id::tag_request))
}

/// Finds who the bearer token belongs to (401 if nobody) and hands it to the handler.
async fn require_token(State(ctl): Ctl, mut req: Request, next: Next) -> Response {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("")
        .trim();
    match ctl.authenticate(presented) {
        Ok(principal) => {
            req.extensions_mut().insert(principal);
            next.run(req).await
        }
        Err(e) => {
            if let AuthError::Meta(_) = e {
                tracing::warn!(error = %e, "cannot check an API token");
            }
            let hint = "the home's api.token, or one from `taidon token create`";
            api_error(ApiError::new(
                ErrorKind::Unauthorized,
                format!("{e} ({hint})"),
            ))
        }
    }
}

/// Refuses (403) a principal whose role this group of routes does not admit.
async fn require_role(
    State(allowed): State<&'static [TokenRole]>,
    req: Request,
    next: Next,
) -> Response {
    match req.extensions().get::<Principal>() {
        Some(p) if allowed.contains(&p.role) => next.run(req).await,
        Some(p) => {
            let message = format!(
                "a {} token may not use {} {}",
                p.role,
                req.method(),
                req.uri().path()
            );
            api_error(ApiError::new(ErrorKind::Forbidden, message))
        }
        None => api_error(ApiError::new(ErrorKind::Unauthorized, "missing API token")),
    }
}

/// `GET /metrics`: every metric in the OpenMetrics text format.
#[utoipa::path(
    get, path = "/metrics",
    responses((status = 200, description = "Every metric, in the OpenMetrics text format", content_type = "application/openmetrics-text", body = String), crate::openapi::ApiErrors)
)]
pub async fn metrics(State(ctl): Ctl) -> Result<Response, ControllerError> {
    let text = ctl.metrics_text().await?;
    Ok(([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response())
}

/// A router serving `GET /metrics` alone, with no token: for `--metrics-listen`, an address
/// only a scraper inside the cluster reaches.
pub fn metrics_router(controller: Arc<Controller>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(controller)
}

#[utoipa::path(
    get, path = "/v1/health", security(()),
    responses((status = 200, description = "The controller is up", body = Health))
)]
async fn health() -> Json<Health> {
    Json(Health {
        ok: true,
        pid: std::process::id(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
    })
}

#[utoipa::path(
    get, path = "/v1/status",
    responses((status = 200, description = "The daemon, its store and engines", body = taidon_api::Status), crate::openapi::ApiErrors)
)]
async fn status(State(ctl): Ctl) -> Result<Response, ControllerError> {
    Ok(Json(ctl.status().await?).into_response())
}

/// Streams progress as NDJSON while the build runs in its own task: a client that goes away
/// does not abort a build half way. The instance it ends with is the caller's: it is recorded
/// as theirs before the client hears of it, client or not.
#[utoipa::path(
    post, path = "/v1/prepare", request_body = PrepareRequest,
    responses((status = 200, description = "Progress as NDJSON, one event a line, ending with `done` or `failed`", content_type = "application/x-ndjson", body = PrepareEvent), crate::openapi::ApiErrors)
)]
async fn prepare(
    State(ctl): Ctl,
    axum::Extension(caller): Caller,
    Json(req): Json<PrepareRequest>,
) -> Response {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let (out, out_rx) = tokio::sync::mpsc::unbounded_channel();
    let task = Arc::clone(&ctl);
    ctl.spawn(async move { task.prepare(req, tx).await });
    let owner = Arc::clone(&ctl);
    ctl.spawn(async move {
        while let Some(mut event) = rx.recv().await {
            if let PrepareEvent::Done {
                instance: Some(info),
                ..
            } = &mut event
            {
                if let Err(e) = owner.assign_owner(info, &caller) {
                    tracing::warn!(instance = %info.instance_id, error = %e, "cannot record the instance's owner");
                }
            }
            // The client left (its stream is gone): stop forwarding, so that the prepare sees
            // its events closed (a client's command step ends then, not hours later).
            if out.send(event).is_err() {
                break;
            }
        }
    });
    ndjson(out_rx)
}

/// The plan of a prepare, and why each step hits or misses; nothing is built.
#[utoipa::path(
    post, path = "/v1/plan", request_body = PrepareRequest,
    responses((status = 200, description = "The plan", body = taidon_api::Plan), crate::openapi::ApiErrors)
)]
async fn plan(
    State(ctl): Ctl,
    Json(req): Json<PrepareRequest>,
) -> Result<Response, ControllerError> {
    Ok(Json(ctl.plan(req).await?).into_response())
}

/// The client's command for a build ended. The build id, random and sent only to the client
/// that started the prepare, is the capability.
#[utoipa::path(
    post, path = "/v1/builds/{build}/done", request_body = taidon_api::CommandDone,
    params(("build" = String, Path, description = "The build id from the `run_command` event")),
    responses(
        (status = 200, description = "Recorded", body = crate::openapi::Empty),
        (status = 404, description = "No build waits for a command with this id", body = ApiError),
        crate::openapi::ApiErrors,
    )
)]
async fn command_done(
    State(ctl): Ctl,
    Path(build): Path<String>,
    Json(done): Json<taidon_api::CommandDone>,
) -> Result<Response, ControllerError> {
    let build: taidon_core::InstanceId = build
        .parse()
        .map_err(|_| ControllerError::BadInput(format!("{build:?} is not a build id")))?;
    ctl.command_done(build, done)?;
    Ok(Json(serde_json::json!({})).into_response())
}

#[utoipa::path(
    post, path = "/v1/blobs/missing", request_body = taidon_api::BlobsMissingRequest,
    responses((status = 200, description = "The hashes the controller lacks, in the order asked", body = taidon_api::BlobsMissing), crate::openapi::ApiErrors)
)]
async fn blobs_missing(
    State(ctl): Ctl,
    Json(req): Json<taidon_api::BlobsMissingRequest>,
) -> Response {
    Json(taidon_api::BlobsMissing {
        missing: ctl.blobs().missing(&req.sha256),
    })
    .into_response()
}

/// `PUT /v1/blobs/{sha256}`: the body is streamed to disk, hashed, and kept only if it matches.
#[utoipa::path(
    put, path = "/v1/blobs/{sha256}",
    params(("sha256" = String, Path, description = "The SHA-256 of the body, 64 lowercase hex digits")),
    request_body(content = Vec<u8>, description = "The file's bytes", content_type = "application/octet-stream"),
    responses(
        (status = 201, description = "Stored"),
        (status = 200, description = "Already there"),
        (status = 413, description = "Larger than the blob limit", body = ApiError),
        crate::openapi::ApiErrors,
    )
)]
async fn put_blob(State(ctl): Ctl, Path(sha256): Path<String>, body: Body) -> Response {
    use crate::blobs::BlobError;
    match ctl.blobs().put(&sha256, body.into_data_stream()).await {
        Ok(true) => StatusCode::CREATED.into_response(),
        Ok(false) => StatusCode::OK.into_response(),
        Err(e @ BlobError::TooLarge { .. }) => (
            StatusCode::PAYLOAD_TOO_LARGE,
            Json(ApiError::new(ErrorKind::BadInput, e.to_string())),
        )
            .into_response(),
        Err(e @ (BlobError::Mismatch { .. } | BlobError::BadName(_) | BlobError::Body(_))) => {
            api_error(ApiError::new(ErrorKind::BadInput, e.to_string()))
        }
        Err(e @ BlobError::Io(_)) => {
            tracing::error!(error = %e, "storing a blob failed");
            api_error(ApiError::new(ErrorKind::Internal, e.to_string()))
        }
    }
}

#[utoipa::path(
    get, path = "/v1/states",
    responses((status = 200, description = "Every state", body = Vec<taidon_api::StateInfo>), crate::openapi::ApiErrors)
)]
async fn states(State(ctl): Ctl) -> Result<Response, ControllerError> {
    Ok(Json(ctl.list_states()?).into_response())
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct Force {
    #[serde(default)]
    force: bool,
}

#[utoipa::path(
    delete, path = "/v1/states/{id}",
    params(("id" = String, Path, description = "A state id or a prefix of one"), Force),
    responses(
        (status = 200, description = "What was removed", body = taidon_api::Removed),
        (status = 404, description = "No state matches", body = ApiError),
        crate::openapi::ApiErrors,
    )
)]
async fn remove_state(
    State(ctl): Ctl,
    axum::Extension(caller): Caller,
    Path(id): Path<String>,
    Query(q): Query<Force>,
) -> Result<Response, ControllerError> {
    ctl.authorize_state_removal(&caller, &id, q.force)?;
    Ok(Json(ctl.remove_state(&id, q.force).await?).into_response())
}

#[utoipa::path(
    post, path = "/v1/states/{id}/push",
    params(("id" = String, Path, description = "A state id or a prefix of one")),
    responses(
        (status = 200, description = "What the upload did", body = taidon_api::Pushed),
        (status = 404, description = "No state matches", body = ApiError),
        crate::openapi::ApiErrors,
    )
)]
async fn push_state(State(ctl): Ctl, Path(id): Path<String>) -> Result<Response, ControllerError> {
    Ok(Json(ctl.push_state(&id).await?).into_response())
}

#[utoipa::path(
    get, path = "/v1/instances",
    responses((status = 200, description = "The caller's instances (an admin's: all)", body = Vec<taidon_api::InstanceInfo>), crate::openapi::ApiErrors)
)]
async fn instances(
    State(ctl): Ctl,
    axum::Extension(caller): Caller,
) -> Result<Response, ControllerError> {
    Ok(Json(ctl.list_instances_for(&caller)?).into_response())
}

#[utoipa::path(
    post, path = "/v1/instances", request_body = CreateInstance,
    responses(
        (status = 200, description = "The running instance", body = taidon_api::InstanceInfo),
        (status = 404, description = "No state matches", body = ApiError),
        (status = 503, description = "As many instances run as allowed", body = ApiError),
        crate::openapi::ApiErrors,
    )
)]
async fn create_instance(
    State(ctl): Ctl,
    axum::Extension(caller): Caller,
    Json(req): Json<CreateInstance>,
) -> Result<Response, ControllerError> {
    let mut info = ctl.create_instance(&req.state).await?;
    ctl.assign_owner(&mut info, &caller)?;
    Ok(Json(info).into_response())
}

#[utoipa::path(
    get, path = "/v1/instances/{id}",
    params(("id" = String, Path, description = "An instance id or a prefix of one")),
    responses(
        (status = 200, description = "The instance", body = taidon_api::InstanceInfo),
        (status = 404, description = "No instance matches", body = ApiError),
        crate::openapi::ApiErrors,
    )
)]
async fn instance(
    State(ctl): Ctl,
    axum::Extension(caller): Caller,
    Path(id): Path<String>,
) -> Result<Response, ControllerError> {
    let iid = ctl.authorize_instance(&caller, &id)?;
    Ok(Json(ctl.get_instance(&iid.to_string())?).into_response())
}

#[utoipa::path(
    delete, path = "/v1/instances/{id}",
    params(("id" = String, Path, description = "An instance id or a prefix of one")),
    responses(
        (status = 200, description = "What was removed", body = taidon_api::Removed),
        (status = 404, description = "No instance matches", body = ApiError),
        crate::openapi::ApiErrors,
    )
)]
async fn delete_instance(
    State(ctl): Ctl,
    axum::Extension(caller): Caller,
    Path(id): Path<String>,
) -> Result<Response, ControllerError> {
    let iid = ctl.authorize_instance(&caller, &id)?;
    Ok(Json(ctl.delete_instance_typed(&iid.to_string()).await?).into_response())
}

#[utoipa::path(
    post, path = "/v1/leases", request_body = taidon_api::LeaseRequest,
    responses(
        (status = 201, description = "The lease", body = taidon_api::LeaseInfo),
        (status = 404, description = "No state matches", body = ApiError),
        (status = 503, description = "No copy was ready within the wait", body = ApiError),
        crate::openapi::ApiErrors,
    )
)]
async fn lease(
    State(ctl): Ctl,
    axum::Extension(caller): Caller,
    Json(req): Json<taidon_api::LeaseRequest>,
) -> Result<Response, ControllerError> {
    let info = ctl.lease(req, &caller).await?;
    Ok((StatusCode::CREATED, Json(info)).into_response())
}

#[utoipa::path(
    get, path = "/v1/leases",
    responses((status = 200, description = "The caller's leases (an admin's: all)", body = Vec<taidon_api::LeaseInfo>), crate::openapi::ApiErrors)
)]
async fn leases(
    State(ctl): Ctl,
    axum::Extension(caller): Caller,
) -> Result<Response, ControllerError> {
    Ok(Json(ctl.list_leases(&caller)?).into_response())
}

#[utoipa::path(
    delete, path = "/v1/leases/{id}",
    params(("id" = String, Path, description = "The lease id")),
    responses(
        (status = 200, description = "The released lease (its copy is destroyed)", body = taidon_api::LeaseInfo),
        (status = 404, description = "No such lease", body = ApiError),
        crate::openapi::ApiErrors,
    )
)]
async fn release_lease(
    State(ctl): Ctl,
    axum::Extension(caller): Caller,
    Path(id): Path<String>,
) -> Result<Response, ControllerError> {
    Ok(Json(ctl.release_lease(&id, &caller).await?).into_response())
}

#[utoipa::path(
    post, path = "/v1/resolve", request_body = ResolveRequest,
    responses((status = 200, description = "Where the instance is, or why not", body = taidon_api::ResolveResponse), crate::openapi::ApiErrors)
)]
async fn resolve(State(ctl): Ctl, Json(req): Json<ResolveRequest>) -> Response {
    Json(ctl.resolve(&req)).into_response()
}

#[utoipa::path(
    post, path = "/v1/touch", request_body = Leases,
    responses((status = 200, description = "Recorded", body = crate::openapi::Empty), crate::openapi::ApiErrors)
)]
async fn touch(State(ctl): Ctl, Json(req): Json<Leases>) -> Response {
    ctl.touch(&req.instance_ids);
    Json(serde_json::json!({})).into_response()
}

#[utoipa::path(
    post, path = "/v1/release", request_body = Leases,
    responses((status = 200, description = "Recorded", body = crate::openapi::Empty), crate::openapi::ApiErrors)
)]
async fn release(State(ctl): Ctl, Json(req): Json<Leases>) -> Response {
    ctl.release(&req.instance_ids);
    Json(serde_json::json!({})).into_response()
}

#[utoipa::path(
    post, path = "/v1/park", request_body = Leases,
    responses((status = 200, description = "Recorded", body = crate::openapi::Empty), crate::openapi::ApiErrors)
)]
async fn park(State(ctl): Ctl, Json(req): Json<Leases>) -> Response {
    ctl.park(&req.instance_ids);
    Json(serde_json::json!({})).into_response()
}

#[utoipa::path(
    post, path = "/v1/unpark", request_body = Leases,
    responses((status = 200, description = "Recorded", body = crate::openapi::Empty), crate::openapi::ApiErrors)
)]
async fn unpark(State(ctl): Ctl, Json(req): Json<Leases>) -> Response {
    ctl.unpark(&req.instance_ids);
    Json(serde_json::json!({})).into_response()
}

#[utoipa::path(
    post, path = "/v1/dsn", request_body = DsnRequest,
    responses(
        (status = 200, description = "A DSN with a fresh token", body = taidon_api::DsnResponse),
        (status = 404, description = "No state or instance matches", body = ApiError),
        crate::openapi::ApiErrors,
    )
)]
async fn dsn(
    State(ctl): Ctl,
    axum::Extension(caller): Caller,
    Json(req): Json<DsnRequest>,
) -> Result<Response, ControllerError> {
    ctl.authorize_dsn(&caller, &req.target)?;
    Ok(Json(ctl.mint_dsn_for(&req, Some(&caller.sub))?).into_response())
}

/// The public keys DSN tokens are verified with; HS256 secrets never leave the controller.
#[utoipa::path(
    get, path = "/v1/keys",
    responses((status = 200, description = "The keys DSN tokens are verified with", body = taidon_api::PublicKeys), crate::openapi::ApiErrors)
)]
async fn keys(State(ctl): Ctl) -> Response {
    Json(ctl.public_keys()).into_response()
}

#[utoipa::path(
    post, path = "/v1/shutdown",
    responses((status = 200, description = "The daemon stops", body = crate::openapi::Empty), crate::openapi::ApiErrors)
)]
async fn shutdown(State(ctl): Ctl) -> Response {
    ctl.request_shutdown();
    Json(serde_json::json!({})).into_response()
}

/// Streams NDJSON progress events from a task that owns the work.
fn ndjson(rx: tokio::sync::mpsc::UnboundedReceiver<taidon_api::PrepareEvent>) -> Response {
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        let event = rx.recv().await?;
        let mut line = serde_json::to_vec(&event).unwrap_or_default();
        line.push(b'\n');
        Some((Ok::<_, Infallible>(bytes::Bytes::from(line)), rx))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

#[utoipa::path(
    post, path = "/v1/warmup", request_body = taidon_api::WarmupRequest,
    responses((status = 200, description = "Progress as NDJSON, one event a line, ending with `done` or `failed`", content_type = "application/x-ndjson", body = PrepareEvent), crate::openapi::ApiErrors)
)]
async fn warmup(State(ctl): Ctl, Json(req): Json<taidon_api::WarmupRequest>) -> Response {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let task = Arc::clone(&ctl);
    ctl.spawn(async move { task.warmup(req, tx).await });
    ndjson(rx)
}

#[utoipa::path(
    post, path = "/v1/pins", request_body = taidon_api::PinRequest,
    responses(
        (status = 200, description = "The state's pins", body = taidon_api::PinsChanged),
        (status = 404, description = "No state matches", body = ApiError),
        crate::openapi::ApiErrors,
    )
)]
async fn pin(
    State(ctl): Ctl,
    Json(req): Json<taidon_api::PinRequest>,
) -> Result<Response, ControllerError> {
    Ok(Json(ctl.pin(&req.state, req.reason, &req.ref_name)?).into_response())
}

#[utoipa::path(
    post, path = "/v1/unpin", request_body = taidon_api::UnpinRequest,
    responses(
        (status = 200, description = "The state's pins", body = taidon_api::PinsChanged),
        (status = 404, description = "No state matches", body = ApiError),
        crate::openapi::ApiErrors,
    )
)]
async fn unpin(
    State(ctl): Ctl,
    Json(req): Json<taidon_api::UnpinRequest>,
) -> Result<Response, ControllerError> {
    Ok(Json(ctl.unpin(&req.state, req.reason, req.ref_name.as_deref())?).into_response())
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct EventsQuery {
    state: Option<String>,
    #[serde(default = "default_events_limit")]
    limit: usize,
}

fn default_events_limit() -> usize {
    200
}

#[utoipa::path(
    get, path = "/v1/events", params(EventsQuery),
    responses((status = 200, description = "Lifecycle events, newest first", body = Vec<taidon_api::EventInfo>), crate::openapi::ApiErrors)
)]
async fn events(
    State(ctl): Ctl,
    Query(q): Query<EventsQuery>,
) -> Result<Response, ControllerError> {
    Ok(Json(ctl.events(q.state.as_deref(), q.limit)?).into_response())
}

#[utoipa::path(
    post, path = "/v1/webhook", security(()),
    params(
        ("x-github-event" = Option<String>, Header, description = "The GitHub event: push, create, delete, pull_request"),
        ("x-hub-signature-256" = Option<String>, Header, description = "`sha256=<hex>`: the HMAC-SHA256 of the body under the webhook secret"),
    ),
    request_body(content = Object, description = "A GitHub event", content_type = "application/json"),
    responses(
        (status = 200, description = "What the delivery changed", body = crate::webhook::WebhookOutcome),
        (status = 400, description = "The payload does not parse", body = ApiError),
        (status = 401, description = "No signature, a wrong one, or no webhook secret configured", body = ApiError),
        (status = 500, description = "A failure inside the controller", body = ApiError),
    )
)]
async fn webhook(State(ctl): Ctl, headers: axum::http::HeaderMap, body: bytes::Bytes) -> Response {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let event = header("x-github-event").unwrap_or("");
    match ctl.webhook(event, header("x-hub-signature-256"), &body) {
        Ok(outcome) => Json(outcome).into_response(),
        Err(crate::webhook::WebhookOutcomeError::Refused(e)) => {
            let kind = match e {
                crate::webhook::WebhookError::Payload { .. } => ErrorKind::BadInput,
                _ => ErrorKind::Unauthorized,
            };
            api_error(ApiError::new(kind, e.to_string()))
        }
        Err(crate::webhook::WebhookOutcomeError::Controller(e)) => e.into_response(),
    }
}

#[utoipa::path(
    post, path = "/v1/fsck", request_body = taidon_api::FsckRequest,
    responses((status = 200, description = "What fsck found, and what it repaired", body = taidon_api::FsckReport), crate::openapi::ApiErrors)
)]
pub(crate) async fn fsck(
    State(ctl): Ctl,
    Json(req): Json<taidon_api::FsckRequest>,
) -> Result<Response, ControllerError> {
    Ok(Json(ctl.fsck(req.repair).await?).into_response())
}
