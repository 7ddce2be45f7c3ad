//! The API's OpenAPI document, generated from the handlers' `#[utoipa::path]` annotations
//! (crate::http) and the types of `taidon-api`; served at `GET /v1/openapi.json`.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use axum::http::header;
use axum::response::{IntoResponse, Response};
use taidon_api::ApiError;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::{ContentBuilder, RefOr, ResponseBuilder};
use utoipa::{IntoResponses, Modify, OpenApi, ToSchema};

/// The document, built once.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Taidon controller API",
        description = "PostgreSQL database states, snapshots and instances. Every route but \
                       health, the webhook and this document needs `Authorization: Bearer \
                       <token>`: the home's api.token (an admin) or one from `taidon token \
                       create`, whose role decides which routes it may use. Errors answer with \
                       an ApiError body."
    ),
    paths(
        crate::http::health,
        openapi_json,
        crate::http::webhook,
        crate::http::keys,
        crate::http::metrics,
        crate::http::status,
        crate::http::prepare,
        crate::http::plan,
        crate::http::command_done,
        crate::http::blobs_missing,
        crate::http::put_blob,
        crate::http::states,
        crate::http::remove_state,
        crate::http::push_state,
        crate::http::instances,
        crate::http::create_instance,
        crate::http::instance,
        crate::http::delete_instance,
        crate::http::dsn,
        crate::http::warmup,
        crate::http::pin,
        crate::http::unpin,
        crate::http::events,
        crate::http::leases,
        crate::http::lease,
        crate::http::release_lease,
        crate::http::resolve,
        crate::http::touch,
        crate::http::release,
        crate::http::park,
        crate::http::unpark,
        crate::http::shutdown,
        crate::http::fsck,
    ),
    components(schemas(ApiError, Empty)),
    modifiers(&BearerToken),
    security(("bearer" = []))
)]
pub(crate) struct ApiDoc;

/// The `bearer` security scheme every protected route names.
struct BearerToken;

impl Modify for BearerToken {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

/// The answer of routes that only acknowledge: `{}`.
#[derive(ToSchema)]
pub(crate) struct Empty {}

/// The error answers every route with a bearer token may give: 400 (a body or parameter that
/// does not parse or make sense), 401 (no token, or a wrong, expired or revoked one), 403 (a
/// role that may not use the route) and 500 (a failure inside).
pub(crate) struct ApiErrors;

impl IntoResponses for ApiErrors {
    fn responses() -> BTreeMap<String, RefOr<utoipa::openapi::response::Response>> {
        [
            ("400", "The request is wrong: the message says what"),
            ("401", "No API token, or a wrong, expired or revoked one"),
            ("403", "The token's role may not use this route"),
            ("500", "A failure inside the controller"),
        ]
        .into_iter()
        .map(|(code, why)| (code.to_owned(), error_response(why)))
        .collect()
    }
}

fn error_response(description: &str) -> RefOr<utoipa::openapi::response::Response> {
    ResponseBuilder::new()
        .description(description)
        .content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(RefOr::Ref(utoipa::openapi::Ref::from_schema_name(
                    ApiError::name(),
                ))))
                .build(),
        )
        .build()
        .into()
}

/// The OpenAPI 3.1 document of this API.
#[utoipa::path(
    get,
    path = "/v1/openapi.json",
    security(()),
    responses((status = 200, description = "The OpenAPI document", content_type = "application/json", body = Object))
)]
pub(crate) async fn openapi_json() -> Response {
    static DOC: OnceLock<String> = OnceLock::new();
    let doc = DOC.get_or_init(|| {
        ApiDoc::openapi()
            .to_pretty_json()
            .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    });
    ([(header::CONTENT_TYPE, "application/json")], doc.as_str()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `.route("…")` of the router (read from its source), in axum's `{param}` syntax.
    fn routed_paths() -> Vec<String> {
        let source = include_str!("http.rs");
        let mut paths = Vec::new();
        let mut rest = source;
        while let Some(at) = rest.find(".route(") {
            rest = &rest[at + ".route(".len()..];
            let Some(open) = rest.find('"') else { break };
            let tail = &rest[open + 1..];
            let Some(close) = tail.find('"') else { break };
            paths.push(tail[..close].to_owned());
        }
        paths
    }

    #[test]
    fn the_document_names_every_route_of_the_router() {
        let doc = ApiDoc::openapi();
        let json = serde_json::to_value(&doc).expect("the document serialises");
        assert!(json["openapi"].as_str().unwrap_or("").starts_with("3."));
        let documented = json["paths"].as_object().expect("paths");
        let routed = routed_paths();
        assert!(routed.len() > 20, "{routed:?}");
        for path in routed {
            assert!(
                documented.contains_key(&path),
                "{path} is routed but not documented"
            );
        }
        for op in ["get", "post", "put", "delete"] {
            for (path, item) in documented {
                if let Some(op) = item.get(op) {
                    assert!(op["responses"].is_object(), "{path}: no responses");
                }
            }
        }
    }
}
