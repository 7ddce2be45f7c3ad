//! `taidon`: the server binary. `local` runs the controller and the gateway in one process (the
//! embedded default `sqlrs` starts); `controller` and `gateway` run them apart.
#![deny(clippy::unwrap_used, clippy::todo, clippy::dbg_macro)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use futures_util::future::BoxFuture;
use taidon_api::{DaemonInfo, ResolveRequest, ResolveResponse};
use taidon_controller::home::{self, DaemonLock, Home};
use taidon_controller::{Controller, ControllerConfig};
use taidon_core::token::TokenKey;
use taidon_gateway::{Gateway, GatewayConfig, HttpResolver, ResolveError, Resolver};
use tokio::net::TcpListener;

#[derive(Parser)]
#[command(
    name = "taidon",
    version,
    about = "Taidon server: controller and gateway"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Controller and gateway in one process, for one machine.
    Local(LocalArgs),
    /// The controller alone (HTTP API, metadata, builds, instances).
    Controller(ControllerArgs),
    /// The gateway alone, resolving instances through a controller's API.
    Gateway(GatewayArgs),
}

#[derive(Args)]
struct HomeArgs {
    /// The data home.
    #[arg(long, env = "SQLRS_HOME")]
    home: PathBuf,
    /// Directory holding initdb and postgres (discovered when absent).
    #[arg(long, env = "TAIDON_PG_BIN")]
    pg_bin: Option<PathBuf>,
    /// Address of the HTTP API.
    #[arg(long, default_value = "127.0.0.1:0")]
    api_listen: SocketAddr,
}

#[derive(Args)]
struct LocalArgs {
    #[command(flatten)]
    home: HomeArgs,
    /// Address of the gateway; by default the one the previous run used, else a free port.
    #[arg(long)]
    gateway_listen: Option<SocketAddr>,
}

#[derive(Args)]
struct ControllerArgs {
    #[command(flatten)]
    home: HomeArgs,
    /// The gateway address the DSNs name (`host:port`).
    #[arg(long)]
    gateway_addr: String,
}

#[derive(Args)]
struct GatewayArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:6432")]
    listen: SocketAddr,
    /// The controller's API (`http://host:port`).
    #[arg(long)]
    controller: String,
    /// The home whose api.token, gateway.key and installation_id this gateway uses.
    #[arg(long, env = "SQLRS_HOME")]
    home: PathBuf,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TAIDON_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
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

async fn shutdown_signal(controller: Arc<Controller>) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
        () = controller.shutdown_requested() => {}
    }
}

async fn local(args: LocalArgs) -> Result<()> {
    let home = Home::new(&args.home.home);
    let _lock = lock_home(&home)?;
    let controller = open_controller(&args.home).await?;

    let gateway_listener = bind_gateway(&home, args.gateway_listen).await?;
    let gateway_addr = gateway_listener.local_addr()?.to_string();
    home::write_atomic(&home.gateway_addr_file(), gateway_addr.as_bytes(), 0o600)?;
    let api_listener = TcpListener::bind(args.home.api_listen).await?;
    let api_url = format!("http://{}", api_listener.local_addr()?);
    controller.set_gateway_addr(gateway_addr.clone());
    controller.set_api_url(api_url.clone());

    let gateway = Arc::new(Gateway::new(
        GatewayConfig::default(),
        controller.token_key().clone(),
        Arc::new(LocalResolver(Arc::clone(&controller))),
    ));
    let gw = tokio::spawn(
        Arc::clone(&gateway).serve(gateway_listener, shutdown_signal(Arc::clone(&controller))),
    );
    publish_daemon_info(&home, &api_url, &gateway_addr)?;
    tracing::info!(api = %api_url, gateway = %gateway_addr, home = %home.root().display(), "taidon local is ready");

    serve_api(Arc::clone(&controller), api_listener).await?;
    let _ = gw.await;
    finish(&home, &controller).await;
    Ok(())
}

async fn controller(args: ControllerArgs) -> Result<()> {
    let home = Home::new(&args.home.home);
    let _lock = lock_home(&home)?;
    let controller = open_controller(&args.home).await?;
    let api_listener = TcpListener::bind(args.home.api_listen).await?;
    let api_url = format!("http://{}", api_listener.local_addr()?);
    controller.set_gateway_addr(args.gateway_addr.clone());
    controller.set_api_url(api_url.clone());
    publish_daemon_info(&home, &api_url, &args.gateway_addr)?;
    tracing::info!(api = %api_url, "taidon controller is ready");
    serve_api(Arc::clone(&controller), api_listener).await?;
    finish(&home, &controller).await;
    Ok(())
}

async fn gateway(args: GatewayArgs) -> Result<()> {
    let home = Home::new(&args.home);
    let read = |p: &Path| -> Result<String> {
        Ok(std::fs::read_to_string(p)
            .with_context(|| format!("cannot read {}", p.display()))?
            .trim()
            .to_owned())
    };
    let key = TokenKey::hs256(
        read(&home.gateway_key_file())?.as_bytes(),
        read(&home.installation_id_file())?,
    );
    let resolver = HttpResolver::new(&args.controller, read(&home.api_token_file())?);
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    tracing::info!(listen = %listener.local_addr()?, controller = %args.controller, "taidon gateway is ready");
    let gateway = Arc::new(Gateway::new(
        GatewayConfig::default(),
        key,
        Arc::new(resolver),
    ));
    gateway
        .serve(listener, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await;
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

async fn serve_api(controller: Arc<Controller>, listener: TcpListener) -> Result<()> {
    let app = taidon_controller::router(Arc::clone(&controller));
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal(controller))
        .await
        .context("API server")
}

/// Clean exit: clients stop finding this daemon first, then its servers stop. Their data stays
/// and the next daemon restarts them.
async fn finish(home: &Home, controller: &Controller) {
    let _ = std::fs::remove_file(home.daemon_json());
    controller.stop_all().await;
    tracing::info!("taidon stopped");
}
