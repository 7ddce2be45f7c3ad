//! `taidon runner`: the container of a runner pod. It restores a snapshot from the bucket into
//! the pod's volume (or makes a new cluster with initdb), runs `postgres` as its direct child
//! on the pod's IP, and answers the controller on a small authenticated control endpoint:
//! ready, set a password, run SQL, stop cleanly, publish the stopped data as a snapshot. It is
//! the local runtime's code, inside a pod.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use taidon_core::engine::InitdbOptions;
use taidon_core::StateId;
use taidon_runtime::{Engine, Health, RunAs, Server, ServerConfig};
use taidon_store::{Manifest, Owner};
use taidon_store_object::{RemoteConfig, RemoteStore};
use tokio::sync::Mutex;

use crate::control::{Execute, Failure, Publish, SetPassword, CONTROL_PORT, POSTGRES_PORT};

/// What the runner starts from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A new cluster (the base state of a chain).
    Initdb,
    /// The snapshot of this state, from the bucket.
    Restore(StateId),
}

/// How one runner pod was asked to run.
#[derive(Debug, Clone)]
pub struct RunnerOptions {
    /// The pod's IP: postgres and the control endpoint listen there.
    pub pod_ip: IpAddr,
    /// The pod's volume.
    pub data: PathBuf,
    pub source: Source,
    /// Start postgres (false: prepare the data and wait to publish it, as an initdb build).
    pub serve: bool,
    /// The bearer token the control endpoint accepts.
    pub token: String,
    /// The superuser's password (a build's psql connects over the network with it).
    pub superuser_password: Option<String>,
    /// The bucket: where snapshots come from and go to.
    pub bucket: RemoteConfig,
    /// The directory of the PostgreSQL binaries, when not discovered.
    pub pg_bin: Option<PathBuf>,
    /// The recipe's server settings: an initdb build writes them into `postgresql.conf`.
    pub pg_settings: std::collections::BTreeMap<String, String>,
}

/// Why the runner could not do its job: the pod fails with this as its last log line.
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error("cannot restore state {state} from {url}: {cause}")]
    Restore {
        state: String,
        url: String,
        cause: String,
    },
    #[error("cannot reach the object store {url}: {cause}")]
    Bucket { url: String, cause: String },
    #[error("{what}: {cause}")]
    Setup { what: String, cause: String },
    #[error("postgres ended on its own: {0}")]
    ServerEnded(String),
}

fn setup(what: impl Into<String>) -> impl FnOnce(&dyn std::fmt::Display) -> RunnerError {
    let what = what.into();
    move |cause| RunnerError::Setup {
        what,
        cause: cause.to_string(),
    }
}

/// The error and its causes on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

struct Runner {
    token: String,
    snapshot: PathBuf,
    engine: Engine,
    bucket: RemoteConfig,
    /// The server, until it is stopped.
    server: Mutex<Option<Server>>,
    /// Set once the data is prepared (and the server up, when serving).
    ready: std::sync::atomic::AtomicBool,
    published: Mutex<Option<Manifest>>,
}

/// Runs the runner until `shutdown` (SIGTERM) resolves or postgres ends on its own.
pub async fn run(
    opts: RunnerOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), RunnerError> {
    let engine = Engine::discover(opts.pg_bin.as_deref(), InitdbOptions::default())
        .map_err(|e| setup("cannot find the PostgreSQL engine")(&chain(&e)))?;
    let run_as = RunAs::for_this_process()
        .map_err(|e| setup("cannot choose the user postgres runs as")(&chain(&e)))?;
    let mut bucket = opts.bucket.clone();
    bucket.validate().map_err(|e| RunnerError::Bucket {
        url: opts.bucket.url.clone(),
        cause: chain(&e),
    })?;
    let snapshot = opts.data.join("snapshot");
    let runner = Arc::new(Runner {
        token: opts.token.clone(),
        snapshot: snapshot.clone(),
        engine: engine.clone(),
        bucket: bucket.clone(),
        server: Mutex::new(None),
        ready: std::sync::atomic::AtomicBool::new(false),
        published: Mutex::new(None),
    });
    // The control endpoint first: the kubelet's probe gets "not ready" while the data comes.
    let addr = SocketAddr::new(opts.pod_ip, CONTROL_PORT);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| setup(format!("cannot listen on {addr}"))(&e))?;
    let app = Router::new()
        .route("/ready", get(ready))
        .route("/v1/password", post(set_password))
        .route("/v1/execute", post(execute))
        .route("/v1/stop", post(stop))
        .route("/v1/publish", post(publish))
        .with_state(Arc::clone(&runner));
    let serving = tokio::spawn(async move { axum::serve(listener, app).await });
    tracing::info!(%addr, "control endpoint listening");

    let prepared = prepare(&opts, &engine, run_as.as_ref(), &bucket, &snapshot).await;
    if let Err(e) = prepared {
        serving.abort();
        return Err(e);
    }
    if opts.serve {
        let config = ServerConfig {
            data_dir: snapshot.join("data"),
            socket_dir: opts.data.join("sock"),
            tcp: true,
            advertise: Some(opts.pod_ip),
            port: Some(POSTGRES_PORT),
            log_file: opts.data.join("postgres.log"),
        };
        let server = engine
            .start(config, run_as.as_ref())
            .await
            .map_err(|e| setup("postgres did not start")(&chain(&e)))?;
        if let Some(password) = &opts.superuser_password {
            server
                .set_password("postgres", password)
                .await
                .map_err(|e| setup("cannot set the superuser's password")(&chain(&e)))?;
        }
        tracing::info!(pid = server.pid, addr = %SocketAddr::new(opts.pod_ip, POSTGRES_PORT), "postgres is up");
        *runner.server.lock().await = Some(server);
    }
    runner
        .ready
        .store(true, std::sync::atomic::Ordering::SeqCst);

    tokio::pin!(shutdown);
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let ended = loop {
        tokio::select! {
            () = &mut shutdown => break None,
            _ = tick.tick() => {
                let mut server = runner.server.lock().await;
                if let Some(s) = server.as_mut() {
                    if let Health::Exited { status } = s.health() {
                        server.take();
                        break Some(status.to_string());
                    }
                }
            }
        }
    };
    serving.abort();
    if let Some(status) = ended {
        return Err(RunnerError::ServerEnded(status));
    }
    let server = runner.server.lock().await.take();
    if let Some(server) = server {
        tracing::info!("stopping postgres (SIGTERM)");
        server
            .stop()
            .await
            .map_err(|e| setup("postgres did not stop cleanly")(&chain(&e)))?;
    }
    Ok(())
}

/// Restores the snapshot into `snapshot` (or makes a new cluster there), owned by the server
/// user.
async fn prepare(
    opts: &RunnerOptions,
    engine: &Engine,
    run_as: Option<&RunAs>,
    bucket: &RemoteConfig,
    snapshot: &Path,
) -> Result<(), RunnerError> {
    let owner = run_as.map(|u| Owner {
        uid: u.uid,
        gid: u.gid,
    });
    match &opts.source {
        Source::Initdb => {
            tokio::fs::create_dir_all(snapshot)
                .await
                .map_err(|e| setup(format!("cannot create {}", snapshot.display()))(&e))?;
            let mut fingerprint = engine.fingerprint.clone();
            fingerprint.settings = opts.pg_settings.clone();
            engine
                .with_fingerprint(&fingerprint)
                .initdb(&snapshot.join("data"), run_as)
                .await
                .map_err(|e| setup("initdb failed")(&chain(&e)))?;
            tracing::info!("made a new cluster with initdb");
        }
        Source::Restore(state) => {
            let started = Instant::now();
            let failed = |cause: String| RunnerError::Restore {
                state: state.to_string(),
                url: bucket.url.clone(),
                cause,
            };
            tracing::info!(state = %state, url = %bucket.url, "restoring");
            let remote = RemoteStore::connect(bucket).map_err(|e| failed(chain(&e)))?;
            let manifest = remote
                .restore(state, snapshot)
                .await
                .map_err(|e| failed(chain(&e)))?;
            // Its settings are in its postgresql.conf; the engine itself must match.
            let (m, own) = (&manifest.engine, &engine.fingerprint);
            if (m.major, m.minor, &m.initdb) != (own.major, own.minor, &own.initdb) {
                return Err(failed(format!(
                    "the snapshot was made by {}, this runner has {}",
                    manifest.engine.version(),
                    engine.fingerprint.version()
                )));
            }
            let dir = snapshot.to_path_buf();
            tokio::task::spawn_blocking(move || taidon_store::chown_tree(&dir, owner))
                .await
                .map_err(|e| failed(e.to_string()))?
                .map_err(|e| failed(chain(&e)))?;
            tracing::info!(
                state = %state,
                bytes = manifest.size_bytes,
                ms = started.elapsed().as_millis() as u64,
                "restored"
            );
        }
    }
    Ok(())
}

fn refuse(status: StatusCode, message: impl Into<String>) -> Response {
    (
        status,
        Json(Failure {
            message: message.into(),
        }),
    )
        .into_response()
}

/// The bearer token, compared in constant time.
fn authorized(runner: &Runner, headers: &HeaderMap) -> Result<(), Box<Response>> {
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let same = given.len() == runner.token.len()
        && given
            .bytes()
            .zip(runner.token.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if same {
        Ok(())
    } else {
        Err(Box::new(refuse(
            StatusCode::UNAUTHORIZED,
            "a valid bearer token is required",
        )))
    }
}

async fn ready(State(runner): State<Arc<Runner>>) -> Response {
    if runner.ready.load(std::sync::atomic::Ordering::SeqCst) {
        (StatusCode::OK, "ready").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "preparing").into_response()
    }
}

/// What the controller asks of the running server.
enum Call {
    Password(SetPassword),
    Execute(Execute),
}

async fn set_password(
    State(runner): State<Arc<Runner>>,
    headers: HeaderMap,
    Json(body): Json<SetPassword>,
) -> Response {
    on_server(&runner, &headers, Call::Password(body)).await
}

async fn execute(
    State(runner): State<Arc<Runner>>,
    headers: HeaderMap,
    Json(body): Json<Execute>,
) -> Response {
    on_server(&runner, &headers, Call::Execute(body)).await
}

async fn on_server(runner: &Runner, headers: &HeaderMap, call: Call) -> Response {
    if let Err(r) = authorized(runner, headers) {
        return *r;
    }
    let server = runner.server.lock().await;
    let Some(server) = server.as_ref() else {
        return refuse(StatusCode::CONFLICT, "postgres is not running");
    };
    let done = match &call {
        Call::Password(b) => server.set_password(&b.role, &b.password).await,
        Call::Execute(b) => server.execute(&b.sql).await,
    };
    match done {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => refuse(StatusCode::INTERNAL_SERVER_ERROR, chain(&e)),
    }
}

async fn stop(State(runner): State<Arc<Runner>>, headers: HeaderMap) -> Response {
    if let Err(r) = authorized(&runner, &headers) {
        return *r;
    }
    let server = runner.server.lock().await.take();
    match server {
        None => StatusCode::NO_CONTENT.into_response(),
        Some(server) => match server.stop().await {
            Ok(()) => {
                tracing::info!("postgres stopped cleanly");
                StatusCode::NO_CONTENT.into_response()
            }
            Err(e) => refuse(StatusCode::INTERNAL_SERVER_ERROR, chain(&e)),
        },
    }
}

async fn publish(
    State(runner): State<Arc<Runner>>,
    headers: HeaderMap,
    Json(body): Json<Publish>,
) -> Response {
    if let Err(r) = authorized(&runner, &headers) {
        return *r;
    }
    if runner.server.lock().await.is_some() {
        return refuse(StatusCode::CONFLICT, "stop postgres before publishing");
    }
    if !runner.ready.load(std::sync::atomic::Ordering::SeqCst) {
        return refuse(StatusCode::CONFLICT, "the data is not prepared yet");
    }
    // One publication per pod; asked again (a retry), the same answer.
    let mut published = runner.published.lock().await;
    if let Some(done) = published.as_ref() {
        if done.state_id == body.state {
            return Json(done.clone()).into_response();
        }
        return refuse(
            StatusCode::CONFLICT,
            format!("already published {}", done.state_id),
        );
    }
    match publish_snapshot(&runner, &body).await {
        Ok(manifest) => {
            *published = Some(manifest.clone());
            Json(manifest).into_response()
        }
        Err(e) => refuse(StatusCode::BAD_GATEWAY, e),
    }
}

/// Seals the stopped data (tree checksum, manifest.json) and uploads it.
async fn publish_snapshot(runner: &Runner, body: &Publish) -> Result<Manifest, String> {
    let started = Instant::now();
    let data = runner.snapshot.join("data");
    let digest = tokio::task::spawn_blocking(move || taidon_store::tree_digest(&data))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("cannot read the data directory: {}", chain(&e)))?;
    // The recipe's settings are the controller's to name; the engine itself must match.
    let own = &runner.engine.fingerprint;
    if (body.engine.major, body.engine.minor, &body.engine.initdb)
        != (own.major, own.minor, &own.initdb)
    {
        return Err(format!(
            "the controller builds for {}, this runner has {}",
            body.engine.version(),
            runner.engine.fingerprint.version()
        ));
    }
    let manifest = Manifest {
        state_id: body.state,
        parent: body.parent,
        engine: body.engine.clone(),
        size_bytes: digest.size_bytes,
        checksum: digest.checksum,
        created_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        build_cost_ms: body.build_cost_ms,
    };
    let path = runner.snapshot.join("manifest.json");
    let text = serde_json::to_vec_pretty(&manifest).map_err(|e| e.to_string())?;
    tokio::fs::write(&path, text)
        .await
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    let remote = RemoteStore::connect(&runner.bucket).map_err(|e| chain(&e))?;
    let report = remote
        .upload(&runner.snapshot)
        .await
        .map_err(|e| format!("cannot upload to {}: {}", runner.bucket.url, chain(&e)))?;
    tracing::info!(
        state = %body.state,
        chunks = report.chunks_uploaded,
        skipped = report.chunks_skipped,
        bytes = report.bytes_uploaded,
        ms = started.elapsed().as_millis() as u64,
        "published"
    );
    Ok(manifest)
}
