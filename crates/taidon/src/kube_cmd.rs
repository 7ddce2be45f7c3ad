//! `taidon runner` (the container of a runner pod) and the Kubernetes side of
//! `taidon controller --runtime kubernetes`: the API client, the leader Lease, the runtime and
//! the bucket-backed store.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{ArgAction, Args, ValueEnum};
use taidon_controller::home::{self, Home};
use taidon_controller::{Controller, ControllerConfig};
use taidon_runtime_kube::runner::{RunnerOptions, Source};
use taidon_runtime_kube::{LeaderLease, PodSettings};

/// Where builds and instances run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum RuntimeKind {
    /// Local processes, children of the controller.
    Local,
    /// Runner pods in a Kubernetes namespace, restored from `[store.remote]`.
    Kubernetes,
}

/// `taidon controller` flags of the Kubernetes runtime.
#[derive(Args, Debug)]
pub(crate) struct KubeFlags {
    /// Where builds and instances run.
    #[arg(long, value_enum, default_value = "local")]
    pub(crate) runtime: RuntimeKind,
    /// The namespace of the runner pods and the leader Lease (with --runtime kubernetes).
    #[arg(long, env = "POD_NAMESPACE")]
    namespace: Option<String>,
    /// The runner image: the official postgres image of the engine's version plus `taidon`.
    #[arg(long, default_value = "ghcr.io/taidon/runner:0.1.0-pg15")]
    runner_image: String,
    /// The runner pods' CPU request and limit.
    #[arg(long, default_value = "250m")]
    runner_cpu_request: String,
    #[arg(long, default_value = "2")]
    runner_cpu_limit: String,
    /// The runner pods' memory request and limit.
    #[arg(long, default_value = "256Mi")]
    runner_memory_request: String,
    #[arg(long, default_value = "1Gi")]
    runner_memory_limit: String,
    /// The Secret holding the bucket's `access_key_id` and `secret_access_key` ("" for none).
    #[arg(long, default_value = "taidon-object-store")]
    bucket_secret: String,
    /// How long a runner pod may stay Pending before it is an error, seconds.
    #[arg(long, default_value_t = 120)]
    pending_timeout_s: u64,
    /// The leader Lease's name.
    #[arg(long, default_value = "taidon-controller")]
    lease_name: String,
    /// Seconds a leader's Lease lasts without renewal.
    #[arg(long, default_value_t = 15)]
    lease_duration_s: u64,
    /// This replica's name in the Lease (default: the pod's name, else the host name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
}

/// `taidon runner`: every setting comes from the pod's environment.
#[derive(Args, Debug)]
pub(crate) struct RunnerArgs {
    /// The pod's IP: postgres and the control endpoint listen there.
    #[arg(long, env = "TAIDON_POD_IP")]
    pod_ip: IpAddr,
    /// The pod's volume.
    #[arg(long, env = "TAIDON_RUNNER_DATA")]
    data: PathBuf,
    /// `initdb`, or the id of the state to restore from the bucket.
    #[arg(long, env = "TAIDON_RUNNER_SOURCE")]
    source: String,
    /// Start postgres (false: an initdb build, published without a server).
    #[arg(long, env = "TAIDON_RUNNER_SERVE", default_value_t = true, action = ArgAction::Set)]
    serve: bool,
    /// The bearer token of the control endpoint.
    #[arg(long, env = "TAIDON_RUNNER_TOKEN", hide_env_values = true)]
    token: String,
    /// The superuser's password, for a build's psql.
    #[arg(long, env = "TAIDON_SUPERUSER_PASSWORD", hide_env_values = true)]
    superuser_password: Option<String>,
    /// `s3://bucket/prefix`.
    #[arg(long, env = "TAIDON_BUCKET_URL")]
    bucket_url: String,
    /// An S3-compatible endpoint.
    #[arg(long, env = "TAIDON_BUCKET_ENDPOINT")]
    bucket_endpoint: Option<String>,
    #[arg(long, env = "TAIDON_BUCKET_ALLOW_HTTP", default_value_t = false, action = ArgAction::Set)]
    bucket_allow_http: bool,
    #[arg(long, env = "TAIDON_BUCKET_REGION", default_value = "us-east-1")]
    bucket_region: String,
    /// Directory holding initdb and postgres (discovered when absent).
    #[arg(long)]
    pg_bin: Option<PathBuf>,
    /// The recipe's server settings (a JSON object), for an initdb build.
    #[arg(long, env = "TAIDON_RUNNER_PG_SETTINGS")]
    pg_settings: Option<String>,
}

pub(crate) async fn runner(args: RunnerArgs) -> Result<()> {
    let source = match args.source.as_str() {
        "initdb" => Source::Initdb,
        id => Source::Restore(id.parse().map_err(|_| {
            anyhow::anyhow!("TAIDON_RUNNER_SOURCE {id:?} is neither initdb nor a state id")
        })?),
    };
    let options = RunnerOptions {
        pod_ip: args.pod_ip,
        data: args.data,
        source,
        serve: args.serve,
        token: args.token,
        superuser_password: args.superuser_password,
        bucket: taidon_store_object::RemoteConfig {
            url: args.bucket_url,
            endpoint: args.bucket_endpoint,
            allow_http: args.bucket_allow_http,
            region: args.bucket_region,
        },
        pg_bin: args.pg_bin,
        pg_settings: match &args.pg_settings {
            None => Default::default(),
            Some(json) => serde_json::from_str(json).map_err(|e| {
                anyhow::anyhow!("TAIDON_RUNNER_PG_SETTINGS is not a JSON object of strings: {e}")
            })?,
        },
    };
    taidon_runtime_kube::runner::run(options, crate::terminate_signal()).await?;
    Ok(())
}

/// Waits for the leader Lease, then opens the controller on runner pods and the bucket. The
/// returned future resolves (with why) if the Lease is lost.
pub(crate) async fn open(
    flags: &KubeFlags,
    args: &crate::HomeArgs,
) -> Result<(
    Arc<Controller>,
    futures_util::future::BoxFuture<'static, String>,
)> {
    let Some(namespace) = flags.namespace.clone() else {
        bail!("--runtime kubernetes needs --namespace (or POD_NAMESPACE)");
    };
    let client = kube::Client::try_default()
        .await
        .context("cannot reach the Kubernetes API (in-cluster service account, or KUBECONFIG)")?;
    let identity = match &flags.identity {
        Some(id) => id.clone(),
        None => std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| format!("taidon-{}", std::process::id())),
    };
    let lease = LeaderLease::new(
        client.clone(),
        &namespace,
        &flags.lease_name,
        &identity,
        Duration::from_secs(flags.lease_duration_s.max(1)),
    );
    lease.acquire().await?;
    let lost = Box::pin(async move { lease.hold().await });

    let home = Home::new(&args.home);
    std::fs::create_dir_all(home.root())
        .with_context(|| format!("cannot create {}", home.root().display()))?;
    let settings = args.lifecycle.config(&args.home)?;
    let Some(remote) = settings.store.remote.clone() else {
        bail!(
            "--runtime kubernetes keeps snapshots in a bucket: set [store.remote] in {}",
            args.home.join("config.toml").display()
        );
    };
    let engine = taidon_runtime::Engine::discover(
        args.pg_bin.as_deref(),
        taidon_core::engine::InitdbOptions::default(),
    )?;
    let secret = home::read_or_create_secret(&home.root().join("runner.secret"), 32)
        .context("cannot read the runner secret")?;
    let mut pods = PodSettings::new(&namespace, &flags.runner_image, remote.bucket());
    pods.cpu_request = flags.runner_cpu_request.clone();
    pods.cpu_limit = flags.runner_cpu_limit.clone();
    pods.memory_request = flags.runner_memory_request.clone();
    pods.memory_limit = flags.runner_memory_limit.clone();
    pods.credentials_secret = Some(flags.bucket_secret.clone()).filter(|s| !s.is_empty());
    pods.pending_timeout = Duration::from_secs(flags.pending_timeout_s);
    let (runtime, store) = taidon_runtime_kube::connect(
        client,
        pods,
        engine,
        secret.into_bytes(),
        home.root().join("work"),
    )?;
    let mut config = ControllerConfig::new(&args.home);
    config.pg_bin = args.pg_bin.clone();
    config.max_blob_mb = args.max_blob_mb;
    config.lifecycle = Some(settings);
    // Several replicas may be scraped: each series names the pod it came from.
    config.metric_labels = vec![("pod".to_owned(), identity.clone())];
    tracing::info!(pod = %identity, %namespace, "leading as this pod");
    let controller = Controller::open_on(config, runtime, store).await?;
    Ok((controller, lost))
}
