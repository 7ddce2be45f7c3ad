//! `taidon`: the server binary. `local` runs the controller and the gateway in one process (the
//! embedded default `sqlrs` starts); `controller` and `gateway` run them apart, on one machine
//! or several; `token` makes and revokes the API tokens of a shared server.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]
#![deny(clippy::todo, clippy::dbg_macro)]

mod api_listen;
mod kube_cmd;
mod logging;
mod token_cmd;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use futures_util::future::BoxFuture;
use taidon_api::{DaemonInfo, ResolveRequest, ResolveResponse};
use taidon_controller::home::{self, DaemonLock, Home};
use taidon_controller::{Controller, ControllerConfig};
use taidon_core::token::{Keyset, SharedKeyset};
use taidon_core::InstanceId;
use taidon_gateway::{
    ControllerKeys, Gateway, GatewayConfig, GatewayMetrics, HttpResolver, KeySource, ResolveError,
    Resolver,
};
use tokio::net::TcpListener;

use api_listen::ApiListeners;

/// The names the local daemon's certificate always covers.
const LOCAL_HOSTS: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

#[derive(Parser)]
#[command(
    name = "taidon",
    version,
    about = "Taidon server: controller and gateway"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    log: logging::LogArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Controller and gateway in one process, for one machine.
    Local(LocalArgs),
    /// The controller alone (HTTP API, metadata, builds, instances).
    Controller(ControllerArgs),
    /// The gateway alone, resolving instances through a controller's API.
    Gateway(GatewayArgs),
    /// The container of a runner pod: restore a snapshot, run postgres, answer the controller.
    Runner(kube_cmd::RunnerArgs),
    /// Makes a new token key current; the previous one stays accepted (running gateways
    /// reload the keyset by themselves, or on SIGHUP).
    RotateKeys {
        /// The data home.
        #[arg(long, env = "SQLRS_HOME")]
        home: PathBuf,
    },
    /// API tokens per user, for a shared controller.
    Token {
        #[command(subcommand)]
        command: token_cmd::TokenCommand,
    },
}

/// Gateway settings shared by `local` and `gateway`.
#[derive(Args)]
struct GatewayOpts {
    /// Refuse clients that do not negotiate TLS, except over loopback.
    #[arg(long)]
    require_tls: bool,
    /// Serve plain text only (no SSLRequest answered with TLS).
    #[arg(long, conflicts_with = "require_tls")]
    no_tls: bool,
    /// Server certificate chain (PEM); by default <home>/tls/server.pem, generated if missing.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Server private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Clock-skew leeway for token exp and nbf, in seconds.
    #[arg(long, default_value_t = taidon_core::token::DEFAULT_LEEWAY_S)]
    token_leeway_s: u64,
    /// End sessions idle this many seconds.
    #[arg(long)]
    max_idle_s: Option<u64>,
    /// End sessions this many seconds after they start.
    #[arg(long)]
    max_duration_s: Option<u64>,
    /// New connections allowed per client address and per token subject, per second.
    #[arg(long, default_value_t = 5000)]
    rate_per_s: u32,
    /// Close every backend session when its client leaves (no pooling).
    #[arg(long)]
    no_pool: bool,
    /// Close backend sessions kept for reuse after this many idle seconds.
    #[arg(long, default_value_t = 60, conflicts_with = "no_pool")]
    pool_idle_s: u64,
    /// Keep no gateway metrics (to measure what they cost).
    #[arg(long)]
    no_metrics: bool,
    /// Client connections held at most; by default, and at most, what the open-file limit
    /// (`ulimit -n`, raised to its hard limit at start) leaves room for.
    #[arg(long)]
    max_clients: Option<usize>,
}

#[derive(Args)]
pub(crate) struct HomeArgs {
    /// The data home.
    #[arg(long, env = "SQLRS_HOME")]
    home: PathBuf,
    /// Directory holding initdb and postgres (discovered when absent).
    #[arg(long)]
    pg_bin: Option<PathBuf>,
    /// Address of the HTTP API. Off loopback it speaks TLS (a loopback port with plain HTTP
    /// stays open for the local CLI).
    #[arg(long, default_value = "127.0.0.1:0")]
    api_listen: SocketAddr,
    /// The largest input file a client may upload, MiB.
    #[arg(long, env = "TAIDON_MAX_BLOB_MB", default_value_t = taidon_controller::default_max_blob_mb())]
    max_blob_mb: u64,
    /// Instances also listen on this address, where a gateway on another machine reaches
    /// them (default: loopback only).
    #[arg(long, value_name = "ADDR")]
    instance_host: Option<std::net::IpAddr>,
    /// The API's TLS certificate chain (PEM); by default <home>/tls/server.pem, made by the
    /// home's CA to cover the --api-listen address.
    #[arg(long, requires = "api_tls_key")]
    api_tls_cert: Option<PathBuf>,
    /// The API's TLS private key (PEM).
    #[arg(long, requires = "api_tls_cert")]
    api_tls_key: Option<PathBuf>,
    /// Also serve GET /metrics here, with no token (for a scraper inside a cluster); the
    /// API serves them too, to a valid token.
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
    #[command(flatten)]
    lifecycle: LifecycleFlags,
}

/// Overrides of `<home>/config.toml` (see the README's Lifecycle section).
#[derive(Args, Default)]
struct LifecycleFlags {
    /// Stop an instance with no connection for this many seconds.
    #[arg(long)]
    idle_timeout_s: Option<u64>,
    /// Stop an instance whose lease (renewed by activity) is this old.
    #[arg(long)]
    lease_ttl_s: Option<u64>,
    /// Running instances at most (standbys included).
    #[arg(long)]
    max_instances: Option<usize>,
    /// Memory budget of running instances, MiB.
    #[arg(long)]
    memory_budget_mb: Option<u64>,
    /// Snapshot store capacity, MiB (0: no limit); eviction starts above it.
    #[arg(long)]
    store_capacity_mb: Option<u64>,
    /// How often the lifecycle loop runs, ms.
    #[arg(long)]
    lifecycle_tick_ms: Option<u64>,
    /// The webhook's HMAC secret.
    #[arg(long, env = "TAIDON_WEBHOOK_SECRET")]
    webhook_secret: Option<String>,
}

impl LifecycleFlags {
    /// The home's config.toml with these flags applied over it.
    fn config(&self, home: &Path) -> Result<taidon_controller::config::Config> {
        let path = home.join("config.toml");
        let mut c = taidon_controller::config::Config::load(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        if let Some(v) = self.idle_timeout_s {
            c.instances.idle_timeout_s = v;
        }
        if let Some(v) = self.lease_ttl_s {
            c.instances.lease_ttl_s = v;
        }
        if let Some(v) = self.max_instances {
            c.instances.max = v;
        }
        if let Some(v) = self.memory_budget_mb {
            c.instances.memory_budget_mb = v;
        }
        if let Some(v) = self.store_capacity_mb {
            c.store.capacity_mb = v;
        }
        if let Some(v) = self.lifecycle_tick_ms {
            c.lifecycle.tick_ms = v;
        }
        if let Some(v) = &self.webhook_secret {
            c.webhook.secret = Some(v.clone());
        }
        c.validate()?;
        Ok(c)
    }
}

#[derive(Args)]
struct LocalArgs {
    #[command(flatten)]
    home: HomeArgs,
    /// Address of the gateway; by default the one the previous run used, else a free port.
    #[arg(long)]
    gateway_listen: Option<SocketAddr>,
    #[command(flatten)]
    gateway: GatewayOpts,
}

#[derive(Args)]
struct ControllerArgs {
    #[command(flatten)]
    home: HomeArgs,
    /// The gateway address the DSNs name (`host:port`).
    #[arg(long)]
    gateway_addr: String,
    #[command(flatten)]
    kube: kube_cmd::KubeFlags,
}

#[derive(Args)]
struct GatewayArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:6432")]
    listen: SocketAddr,
    /// The controller's API (`http://host:port`, or `https://` with --ca).
    #[arg(long)]
    controller: String,
    /// A gateway token (`taidon token create --gateway`): the keys are then fetched from the
    /// controller (GET /v1/keys) and nothing is read from its home.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// The CA certificate (PEM) the controller's API certificate is signed by.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// With --token-file: this gateway's own state directory (its generated TLS files).
    /// Without: the controller's home, whose api.token and keyset.json are read.
    #[arg(long)]
    home: Option<PathBuf>,
    /// On SIGTERM or SIGINT, how long open sessions may go on before they are ended (57P01).
    #[arg(long, default_value_t = 30)]
    drain_s: u64,
    /// How often the keys are fetched again from the controller, seconds (with --token-file).
    #[arg(long, default_value_t = 5)]
    keys_poll_s: u64,
    /// Serve this gateway's GET /metrics here (plain HTTP, no token).
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
    #[command(flatten)]
    gateway: GatewayOpts,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if let Err(e) = logging::init(&cli.log) {
        eprintln!("taidon: {e:#}");
        return std::process::ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("taidon: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Local(args) => local(args).await,
            Command::Controller(args) => controller(args).await,
            Command::Gateway(args) => gateway(args).await,
            Command::Runner(args) => kube_cmd::runner(args).await,
            Command::RotateKeys { home } => rotate_keys(&home),
            Command::Token { command } => token_cmd::run(command),
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("taidon: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Resolves in-process: the gateway of `taidon local` asks the controller beside it directly.
struct LocalResolver(Arc<Controller>);

impl Resolver for LocalResolver {
    fn resolve(&self, req: ResolveRequest) -> BoxFuture<'_, Result<ResolveResponse, ResolveError>> {
        Box::pin(async move { Ok(self.0.resolve(&req)) })
    }

    fn touch(&self, ids: Vec<InstanceId>) -> BoxFuture<'_, Result<(), ResolveError>> {
        self.0.touch(&ids);
        Box::pin(async { Ok(()) })
    }

    fn release(&self, ids: Vec<InstanceId>) -> BoxFuture<'_, Result<(), ResolveError>> {
        self.0.release(&ids);
        Box::pin(async { Ok(()) })
    }

    fn park(&self, ids: Vec<InstanceId>) -> BoxFuture<'_, Result<(), ResolveError>> {
        self.0.park(&ids);
        Box::pin(async { Ok(()) })
    }

    fn unpark(&self, ids: Vec<InstanceId>) -> BoxFuture<'_, Result<(), ResolveError>> {
        self.0.unpark(&ids);
        Box::pin(async { Ok(()) })
    }
}

fn rotate_keys(home: &Path) -> Result<()> {
    let file = taidon_controller::rotate_keyset(&Home::new(home))?;
    println!("current key: {}", file.current);
    Ok(())
}

/// Raises the soft open-file limit to the hard one and says what it allows the gateway.
fn open_file_budget() -> taidon_gateway::FdBudget {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid out-pointer for getrlimit and an in-pointer for setrlimit.
    let nofile = unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            1024
        } else {
            if lim.rlim_cur < lim.rlim_max {
                let raised = libc::rlimit {
                    rlim_cur: lim.rlim_max,
                    rlim_max: lim.rlim_max,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                    lim.rlim_cur = lim.rlim_max;
                }
            }
            lim.rlim_cur
        }
    };
    let fds = taidon_gateway::fd_budget(nofile);
    if fds.max_clients < 500 {
        tracing::warn!(
            nofile,
            max_clients = fds.max_clients,
            pooled = fds.pool_sessions,
            "the open-file limit (ulimit -n) leaves room for few client connections: raise it"
        );
    } else {
        tracing::info!(
            nofile,
            max_clients = fds.max_clients,
            pooled = fds.pool_sessions,
            "open-file limit"
        );
    }
    fds
}

impl GatewayOpts {
    fn config(&self) -> GatewayConfig {
        let fds = open_file_budget();
        let rate = taidon_gateway::RateLimit {
            burst: self.rate_per_s.saturating_mul(2),
            per_s: self.rate_per_s,
        };
        GatewayConfig {
            require_tls: self.require_tls,
            max_idle: self.max_idle_s.map(std::time::Duration::from_secs),
            max_duration: self.max_duration_s.map(std::time::Duration::from_secs),
            rate_per_ip: rate,
            rate_per_subject: rate,
            pool: (!self.no_pool).then(|| taidon_gateway::PoolConfig {
                idle: std::time::Duration::from_secs(self.pool_idle_s),
                max_sessions: fds.pool_sessions,
                ..taidon_gateway::PoolConfig::default()
            }),
            max_clients: Some(match self.max_clients {
                Some(n) if n > fds.max_clients => {
                    tracing::warn!(
                        asked = n,
                        max_clients = fds.max_clients,
                        "--max-clients is more than the open-file limit (ulimit -n) leaves room for: lowered"
                    );
                    fds.max_clients
                }
                Some(n) => n,
                None => fds.max_clients,
            }),
            ..GatewayConfig::default()
        }
    }

    /// The TLS configuration and the CA that DSNs name, generating a self-signed pair under
    /// `state_dir` (made by its CA, covering the local names and `listen`) unless certificate
    /// files were given.
    fn tls(
        &self,
        state_dir: Option<&Home>,
        listen: SocketAddr,
    ) -> Result<Option<(Arc<rustls::ServerConfig>, Option<PathBuf>)>> {
        if self.no_tls {
            return Ok(None);
        }
        let (cert, key, ca) = match (&self.tls_cert, &self.tls_key, state_dir) {
            (Some(c), Some(k), _) => (c.clone(), k.clone(), None),
            (_, _, Some(home)) => {
                let files = self_signed(home, listen)?;
                (files.cert, files.key, Some(files.ca))
            }
            _ => bail!(
                "the gateway's TLS certificate: give --tls-cert and --tls-key, or --home DIR \
                 to make one there, or --no-tls"
            ),
        };
        Ok(Some((taidon_gateway::server_config(&cert, &key)?, ca)))
    }
}

/// The home's TLS files, the server certificate covering the local names and `listen`.
fn self_signed(home: &Home, listen: SocketAddr) -> Result<taidon_gateway::TlsFiles> {
    let mut hosts: Vec<String> = LOCAL_HOSTS.iter().map(|h| (*h).to_owned()).collect();
    if !listen.ip().is_loopback() {
        hosts.extend(taidon_gateway::listen_hosts(listen.ip()));
    }
    let hosts: Vec<&str> = hosts.iter().map(String::as_str).collect();
    Ok(taidon_gateway::ensure_self_signed(&home.tls_dir(), &hosts)?)
}

/// Binds the API as `--api-listen` says, with TLS from the flags or the home's CA off loopback.
async fn bind_api(args: &HomeArgs, home: &Home) -> Result<ApiListeners> {
    ApiListeners::bind(args.api_listen, || {
        let (cert, key) = match (&args.api_tls_cert, &args.api_tls_key) {
            (Some(c), Some(k)) => (c.clone(), k.clone()),
            _ => {
                let files = self_signed(home, args.api_listen)?;
                (files.cert, files.key)
            }
        };
        Ok(taidon_gateway::server_config(&cert, &key)?)
    })
    .await
}

/// Reads the home's keyset file with the configured leeway.
fn load_keyset(home: &Home, leeway_s: u64) -> Result<Keyset> {
    let path = home.keyset_file();
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    Ok(Keyset::from_json(&text)
        .with_context(|| format!("invalid keyset {}", path.display()))?
        .with_leeway(leeway_s))
}

/// Reloads the keyset when its file changes or on SIGHUP; a bad file leaves the keys in force.
async fn watch_keyset(home: Home, keys: Arc<SharedKeyset>, leeway_s: u64) {
    let modified = |home: &Home| {
        std::fs::metadata(home.keyset_file())
            .and_then(|m| m.modified())
            .ok()
    };
    let mut seen = modified(&home);
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    loop {
        let forced = tokio::select! {
            () = tokio::time::sleep(std::time::Duration::from_secs(1)) => false,
            Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => true,
        };
        let now = modified(&home);
        if !forced && now == seen {
            continue;
        }
        seen = now;
        match load_keyset(&home, leeway_s) {
            Ok(k) => {
                tracing::info!(kids = ?k.kids(), "keyset reloaded");
                keys.replace(k);
            }
            Err(e) => tracing::warn!("keyset not reloaded, the previous one stays: {e:#}"),
        }
    }
}

/// Takes the home's daemon lock: one daemon per home. Reconciling after a crash is only safe
/// while no other daemon runs there.
fn lock_home(home: &Home) -> Result<DaemonLock> {
    std::fs::create_dir_all(home.root())
        .with_context(|| format!("cannot create home {}", home.root().display()))?;
    match DaemonLock::try_acquire(&home.lock_file())? {
        Some(lock) => Ok(lock),
        None => bail!(
            "another taidon daemon is running for home {}",
            home.root().display()
        ),
    }
}

async fn open_controller(args: &HomeArgs) -> Result<Arc<Controller>> {
    let mut config = ControllerConfig::new(&args.home);
    config.pg_bin = args.pg_bin.clone();
    config.max_blob_mb = args.max_blob_mb;
    config.instance_host = args.instance_host;
    config.lifecycle = Some(args.lifecycle.config(&args.home)?);
    Ok(Controller::open(config).await?)
}

async fn bind_gateway(home: &Home, explicit: Option<SocketAddr>) -> Result<TcpListener> {
    if let Some(addr) = explicit {
        return TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"));
    }
    // Reuse the last address so DSNs handed out before a restart keep working.
    if let Ok(previous) = std::fs::read_to_string(home.gateway_addr_file()) {
        if let Ok(addr) = previous.trim().parse::<SocketAddr>() {
            match TcpListener::bind(addr).await {
                Ok(l) => return Ok(l),
                Err(e) => {
                    tracing::warn!(%addr, error = %e, "previous gateway address is taken; choosing another")
                }
            }
        }
    }
    Ok(TcpListener::bind("127.0.0.1:0").await?)
}

/// Resolves on SIGTERM, SIGINT or a shutdown asked through the API.
async fn shutdown_signal(controller: Arc<Controller>) {
    tokio::select! {
        () = terminate_signal() => {}
        () = controller.shutdown_requested() => {}
    }
}

/// Resolves on SIGTERM or SIGINT.
pub(crate) async fn terminate_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

async fn local(args: LocalArgs) -> Result<()> {
    let home = Home::new(&args.home.home);
    let _lock = lock_home(&home)?;
    let controller = open_controller(&args.home).await?;

    let gateway_listener = bind_gateway(&home, args.gateway_listen).await?;
    let gateway_listen = gateway_listener.local_addr()?;
    let gateway_addr = gateway_listen.to_string();
    home::write_atomic(&home.gateway_addr_file(), gateway_addr.as_bytes(), 0o600)?;
    let api = bind_api(&args.home, &home).await?;
    let api_url = api.local_url()?;
    controller.set_gateway_addr(gateway_addr.clone());
    controller.set_api_url(api.public_url()?);

    let keys = controller.keyset();
    keys.replace(load_keyset(&home, args.gateway.token_leeway_s)?);
    tokio::spawn(watch_keyset(
        home.clone(),
        Arc::clone(&keys),
        args.gateway.token_leeway_s,
    ));
    let mut gateway = Gateway::new(
        args.gateway.config(),
        keys,
        Arc::new(LocalResolver(Arc::clone(&controller))),
    );
    if !args.gateway.no_metrics {
        // One registry: the API's /metrics shows the gateway's beside the controller's.
        let metrics = GatewayMetrics::default();
        controller.metrics().register(|r| metrics.register(r));
        gateway = gateway.with_metrics(metrics);
    }
    if let Some((tls, ca)) = args.gateway.tls(Some(&home), gateway_listen)? {
        gateway = gateway.with_tls(tls);
        controller.set_gateway_tls_root(ca);
    }
    let (stop_gateway, gateway_stopped) = tokio::sync::watch::channel(false);
    let gw = spawn_gateway_thread(Arc::new(gateway), gateway_listener, gateway_stopped)?;
    serve_controller_metrics(&controller, args.home.metrics_listen).await?;
    publish_daemon_info(&home, &api_url, &gateway_addr)?;
    tracing::info!(api = %api.public_url()?, gateway = %gateway_addr, home = %home.root().display(), "taidon local is ready");

    let served = serve_api(Arc::clone(&controller), api).await;
    stop_gateway.send_replace(true);
    let _ = tokio::task::spawn_blocking(move || gw.join()).await;
    // Clients stop finding this daemon first, then its servers stop. Their data stays and the
    // next daemon restarts them.
    let _ = std::fs::remove_file(home.daemon_json());
    controller.stop_all().await;
    tracing::info!("taidon stopped");
    served
}

/// Runs the gateway on a thread of its own with a single-threaded runtime: the relay's hot
/// path (read one side, write the other) then wakes one thread per event, instead of the
/// multi-threaded scheduler handing the task between workers, which on a small machine costs a
/// visible share of a loopback round trip. Controller work it triggers runs on the
/// controller's runtime (see `Controller::spawn`).
fn spawn_gateway_thread(
    gateway: Arc<Gateway>,
    listener: TcpListener,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<std::thread::JoinHandle<()>> {
    let listener = listener.into_std()?;
    let thread = std::thread::Builder::new()
        .name("gateway".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the gateway's runtime");
                    return;
                }
            };
            runtime.block_on(async move {
                let listener = match TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot listen for the gateway");
                        return;
                    }
                };
                gateway
                    .serve(listener, async move {
                        let _ = stop.wait_for(|stopped| *stopped).await;
                    })
                    .await;
            });
        })?;
    Ok(thread)
}

async fn controller(args: ControllerArgs) -> Result<()> {
    let home = Home::new(&args.home.home);
    let _lock = lock_home(&home)?;
    // The gateway runs apart and may be on another machine: it verifies DSN tokens with the
    // public keys alone, so they are signed with Ed25519.
    if let Some(file) = taidon_controller::ensure_eddsa_current(&home)? {
        tracing::warn!(current = %file.current, "the current token key was HS256; a new Ed25519 key is current");
    }
    let (controller, lease_lost) = match args.kube.runtime {
        kube_cmd::RuntimeKind::Local => {
            let pending: BoxFuture<'static, String> = Box::pin(std::future::pending());
            (open_controller(&args.home).await?, pending)
        }
        kube_cmd::RuntimeKind::Kubernetes => kube_cmd::open(&args.kube, &args.home).await?,
    };
    tokio::spawn(watch_keyset(
        home.clone(),
        controller.keyset(),
        taidon_core::token::DEFAULT_LEEWAY_S,
    ));
    let api = bind_api(&args.home, &home).await?;
    let api_url = api.local_url()?;
    serve_controller_metrics(&controller, args.home.metrics_listen).await?;
    controller.set_gateway_addr(args.gateway_addr.clone());
    controller.set_api_url(api.public_url()?);
    publish_daemon_info(&home, &api_url, &args.gateway_addr)?;
    tracing::info!(api = %api.public_url()?, local_api = %api_url, "taidon controller is ready");
    let served = tokio::select! {
        served = serve_api(Arc::clone(&controller), api) => served,
        why = lease_lost => Err(anyhow::anyhow!("stepping down: {why}")),
    };
    // Clients stop finding this controller first. Its instances keep running, as after a
    // crash: the next controller for the home adopts them (and their DSNs keep working).
    let _ = std::fs::remove_file(home.daemon_json());
    let left = controller.leave_running();
    tracing::info!(
        instances = left,
        "taidon controller stopped; instances left running for the next one"
    );
    served
}

async fn gateway(args: GatewayArgs) -> Result<()> {
    let leeway_s = args.gateway.token_leeway_s;
    let read = |p: &Path| -> Result<String> {
        Ok(std::fs::read_to_string(p)
            .with_context(|| format!("cannot read {}", p.display()))?
            .trim()
            .to_owned())
    };
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let listen = listener.local_addr()?;
    let own_home = args.home.as_ref().map(Home::new);
    let mut gateway = match &args.token_file {
        // Apart from the controller: its token and its public keys, fetched and kept fresh.
        Some(token_file) => {
            let ca = match &args.ca {
                Some(p) => {
                    Some(std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?)
                }
                None => None,
            };
            let resolver =
                HttpResolver::with_ca(&args.controller, read(token_file)?, ca.as_deref())?;
            let keys = ControllerKeys::fetch_first(resolver.clone(), leeway_s)
                .await
                .with_context(|| format!("cannot get the keys of {}", args.controller))?;
            let keys = Arc::new(keys);
            let every = std::time::Duration::from_secs(args.keys_poll_s.max(1));
            tokio::spawn(Arc::clone(&keys).poll(every));
            Gateway::new(args.gateway.config(), keys.keyset(), Arc::new(resolver))
                .with_key_source(keys as Arc<dyn KeySource>)
        }
        // Beside the controller, on its home: its api.token and keyset.json.
        None => {
            let Some(home) = &own_home else {
                bail!("give --token-file (a gateway token), or --home (the controller's home)");
            };
            let keys = Arc::new(SharedKeyset::new(load_keyset(home, leeway_s)?));
            tokio::spawn(watch_keyset(home.clone(), Arc::clone(&keys), leeway_s));
            let resolver = HttpResolver::new(&args.controller, read(&home.api_token_file())?);
            Gateway::new(args.gateway.config(), keys, Arc::new(resolver))
        }
    };
    if let Some((tls, _)) = args.gateway.tls(own_home.as_ref(), listen)? {
        gateway = gateway.with_tls(tls);
    }
    if !args.gateway.no_metrics {
        let metrics = GatewayMetrics::default();
        let mut registry = prometheus_client::registry::Registry::default();
        metrics.register(&mut registry);
        gateway = gateway.with_metrics(metrics);
        if let Some(addr) = args.metrics_listen {
            serve_metrics(addr, metrics_of_registry(Arc::new(registry))).await?;
        }
    } else if args.metrics_listen.is_some() {
        bail!("--metrics-listen and --no-metrics: choose one");
    }
    tracing::info!(%listen, controller = %args.controller, "taidon gateway is ready");
    let drain = std::time::Duration::from_secs(args.drain_s);
    Arc::new(gateway)
        .serve_draining(
            listener,
            async {
                terminate_signal().await;
                tracing::info!(drain_s = drain.as_secs(), "stopping: no new connections");
            },
            drain,
        )
        .await;
    tracing::info!("taidon gateway stopped");
    Ok(())
}

/// Serves the controller's metrics with no token on `addr`, if given.
async fn serve_controller_metrics(
    controller: &Arc<Controller>,
    addr: Option<SocketAddr>,
) -> Result<()> {
    let Some(addr) = addr else { return Ok(()) };
    serve_metrics(
        addr,
        taidon_controller::metrics_router(Arc::clone(controller)),
    )
    .await
}

/// A router serving `registry` at `GET /metrics`.
fn metrics_of_registry(registry: Arc<prometheus_client::registry::Registry>) -> axum::Router {
    axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let registry = Arc::clone(&registry);
            async move {
                let mut text = String::new();
                // Writing to a String cannot fail.
                let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        taidon_controller::metrics::CONTENT_TYPE,
                    )],
                    text,
                )
            }
        }),
    )
}

/// Binds `addr` (failing now if it cannot) and serves `router` there, plain HTTP, in the
/// background.
async fn serve_metrics(addr: SocketAddr, router: axum::Router) -> Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for metrics on {addr}"))?;
    tracing::info!(metrics = %listener.local_addr()?, "serving metrics");
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            tracing::error!(error = %e, "the metrics listener failed");
        }
    });
    Ok(())
}

fn publish_daemon_info(home: &Home, api_url: &str, gateway: &str) -> Result<()> {
    let info = DaemonInfo {
        pid: std::process::id(),
        api_url: api_url.to_owned(),
        gateway: gateway.to_owned(),
    };
    home::write_atomic(
        &home.daemon_json(),
        &serde_json::to_vec_pretty(&info)?,
        0o644,
    )?;
    Ok(())
}

async fn serve_api(controller: Arc<Controller>, api: ApiListeners) -> Result<()> {
    let app = taidon_controller::router(Arc::clone(&controller));
    api.serve(app, shutdown_signal(controller)).await
}
