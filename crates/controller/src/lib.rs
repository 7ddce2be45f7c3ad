//! The Taidon controller: metadata, the prepare engine, instances, and the HTTP API over them.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]
#![deny(clippy::todo, clippy::dbg_macro)]

mod access;
pub mod blobs;
pub mod config;
mod disk;
mod error;
mod extract;
mod fsck;
pub mod home;
mod http;
mod instances;
mod keyed;
mod leases;
mod lifecycle;
pub mod meta;
pub mod metrics;
mod openapi;
mod pins;
mod prepare;
mod remote;
mod request_id;
pub mod serve;
mod snapshots;
mod status_page;
pub mod tokens;
pub mod webhook;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex as StdMutex, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use taidon_api::{InstanceInfo, StateInfo, StateStatus, Status};
use taidon_core::token::{Keyset, SharedKeyset};
use taidon_core::{EngineFingerprint, InitdbOptions, StateId};
use taidon_runtime::{Engine, LocalLayout, LocalRuntime, RunAs, Runtime};
use taidon_store::{LocalStore, Owner, SnapshotStore};

pub use access::{
    dsn_with_token, ensure_eddsa_current, generate_ed25519_key, read_or_create_keyset,
    rotate_keyset, AccessPolicy,
};
pub use error::ControllerError;
pub use home::Home;
pub use http::{metrics_router, router};
use instances::Live;
use meta::Meta;

/// How the controller is set up.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    pub home: PathBuf,
    /// The directory holding initdb and postgres; discovered when `None`.
    pub pg_bin: Option<PathBuf>,
    /// How long the tokens in handed-out DSNs live.
    pub token_ttl_s: u64,
    /// The lifecycle settings; read from `<home>/config.toml` when `None`.
    pub lifecycle: Option<config::Config>,
    /// The largest input blob a client may upload, in MiB.
    pub max_blob_mb: u64,
    /// Instances also listen on this address and the gateway reaches them there (a gateway
    /// on another machine); `None`: loopback only.
    pub instance_host: Option<std::net::IpAddr>,
    /// Labels on every metric (in Kubernetes mode, the pod's name).
    pub metric_labels: Vec<(String, String)>,
}

impl ControllerConfig {
    pub fn new(home: impl Into<PathBuf>) -> Self {
        Self {
            home: home.into(),
            pg_bin: None,
            token_ttl_s: default_token_ttl_s(),
            lifecycle: None,
            max_blob_mb: default_max_blob_mb(),
            instance_host: None,
            metric_labels: Vec::new(),
        }
    }
}

/// 1 GiB: a large dump is one input; a runaway upload is refused.
pub fn default_max_blob_mb() -> u64 {
    1024
}

/// Seven days: a kept instance's DSN outlives a working week.
pub fn default_token_ttl_s() -> u64 {
    7 * 24 * 3600
}

/// The local store with the bucket of `[store.remote]` behind it.
fn tiered_store(
    local: LocalStore,
    remote: &config::RemoteStoreConfig,
) -> Result<taidon_store_object::TieredStore, ControllerError> {
    let mut bucket = remote.bucket();
    bucket
        .validate()
        .map_err(|e| ControllerError::BadInput(format!("[store.remote]: {e}")))?;
    let grace = std::time::Duration::from_secs(remote.gc_grace_s);
    let objects = taidon_store_object::RemoteStore::connect(&bucket)
        .map_err(|e| {
            ControllerError::BadInput(format!("[store.remote]: {}", config::error_chain(&e)))
        })?
        .with_refresh_after(grace / 2);
    let options = taidon_store_object::TierOptions {
        upload_concurrency: remote.upload_concurrency,
        ..Default::default()
    };
    Ok(taidon_store_object::TieredStore::new(
        local, objects, bucket.url, options,
    ))
}

/// Locks `m`; a panic elsewhere while it was held leaves plain data behind, still usable.
pub(crate) fn lock<T>(m: &StdMutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The time now, in milliseconds since the Unix epoch; injected so tests can set it.
pub(crate) type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// What the controller works through: the runtime (builds and instances), the snapshot store,
/// and the clock its lifecycle decisions read.
pub(crate) struct Seams {
    pub(crate) runtime: Arc<dyn Runtime>,
    pub(crate) store: Arc<dyn SnapshotStore>,
    pub(crate) clock: Clock,
}

/// The controller of one data home.
pub struct Controller {
    config: ControllerConfig,
    home: Home,
    /// What runs builds and instances.
    runtime: Arc<dyn Runtime>,
    /// Where snapshots are kept, with the set of published states in memory.
    store: snapshots::Snapshots,
    clock: Clock,
    /// Every input file a step reads, by content.
    blobs: blobs::BlobStore,
    meta: Meta,
    /// Tokens are signed with its current key; swapped whole when the keyset file changes.
    keys: Arc<SharedKeyset>,
    /// Resolve/Touch/Release counts and the shared read-only instances.
    access: access::Access,
    api_token: String,
    /// `host:port` the DSNs point at; set once the gateway listens.
    gateway_addr: RwLock<String>,
    api_url: RwLock<String>,
    /// Running instances: the hot path of resolve reads only this map.
    live: RwLock<HashMap<taidon_core::InstanceId, Arc<Live>>>,
    /// One lock per state being built (or removed, or evicted): two prepares of one missing
    /// state build it once.
    building: keyed::KeyedLocks<StateId>,
    /// Instances being started: their data exists before their row (fsck leaves them be).
    starting_instances: fsck::Starting,
    /// Fresh copies handed to tests, and the pools they come from.
    leases: leases::Leases,
    /// Build servers opened to a client running a step's command, by build id: what Resolve
    /// hands the gateway for the build's token, and where the client's report goes.
    client_builds: std::sync::Mutex<HashMap<taidon_core::InstanceId, prepare::ClientBuild>>,
    /// Idle instances, eviction, the standby pool, pins.
    lifecycle: lifecycle::Lifecycle,
    shutdown: tokio::sync::watch::Sender<bool>,
    /// Store usage and instances over the last hour, for the status page.
    history: status_page::History,
    /// The tokio runtime the controller was opened on. Background work (builds, instance
    /// starts, the lifecycle loop) runs here even when a caller polls from another runtime,
    /// such as the gateway's own: the servers it starts belong to this runtime's process
    /// driver.
    tasks: tokio::runtime::Handle,
    metrics: metrics::Metrics,
}

impl Controller {
    /// Opens the home (creating it), discovers the engine, and reconciles what a previous
    /// daemon left: unfinished builds are discarded, its servers stopped, its instances
    /// restarted as children of this process. Builds and instances run as local processes,
    /// snapshots are kept in `<home>/snapshots`.
    pub async fn open(config: ControllerConfig) -> Result<Arc<Self>, ControllerError> {
        let home = Home::new(&config.home);
        let mut engines = Engine::discover_all(config.pg_bin.as_deref(), InitdbOptions::default())?;
        let engine = engines.remove(0);
        let run_as = RunAs::for_this_process()
            .map_err(|e| ControllerError::runtime("cannot choose the user servers run as", e))?;
        home.create(run_as.is_some()).map_err(|e| {
            ControllerError::io(format!("cannot create home {}", home.root().display()), e)
        })?;
        if let Some(user) = &run_as {
            if let Some(dir) = home.unreachable_ancestor(user.uid, user.gid) {
                return Err(ControllerError::BadInput(format!(
                    "PostgreSQL runs as user {:?}, which cannot reach the home {} ({} is not traversable); \
                     choose a home such as /var/lib/taidon with --home or SQLRS_HOME",
                    user.user,
                    home.root().display(),
                    dir.display()
                )));
            }
        }
        let owner = run_as.as_ref().map(|u| Owner {
            uid: u.uid,
            gid: u.gid,
        });
        let store = LocalStore::open(home.snapshots(), owner)?;
        // The settings are read once, here: the bucket behind the store is one of them.
        let mut config = config;
        let settings = match config.lifecycle.take() {
            Some(c) => c,
            None => config::Config::load(&home.root().join("config.toml"))
                .map_err(|e| ControllerError::BadInput(config::error_chain(&e)))?,
        };
        settings
            .validate()
            .map_err(|e| ControllerError::BadInput(e.to_string()))?;
        let store: Arc<dyn SnapshotStore> = match &settings.store.remote {
            None => Arc::new(store),
            Some(remote) => Arc::new(tiered_store(store, remote)?),
        };
        config.lifecycle = Some(settings);
        let layout = LocalLayout {
            instances: home.instances(),
            run: home.run_dir(),
            logs: home.logs(),
            work: home.root().join("work"),
            cache: home.root().join("cache"),
        };
        let seams = Seams {
            runtime: Arc::new(
                LocalRuntime::new(engine, run_as, layout)
                    .with_other_engines(engines)
                    .with_instance_host(config.instance_host),
            ),
            store,
            clock: Arc::new(now_ms),
        };
        Self::open_with(config, seams).await
    }

    /// Opens the home with a runtime and a snapshot store made by the caller: the Kubernetes
    /// runtime, and the bucket its runner pods restore from.
    pub async fn open_on(
        config: ControllerConfig,
        runtime: Arc<dyn Runtime>,
        store: Arc<dyn SnapshotStore>,
    ) -> Result<Arc<Self>, ControllerError> {
        let seams = Seams {
            runtime,
            store,
            clock: Arc::new(now_ms),
        };
        Self::open_with(config, seams).await
    }

    /// [`Controller::open`] on the given seams: the controller reaches processes and snapshot
    /// data only through them.
    pub(crate) async fn open_with(
        config: ControllerConfig,
        seams: Seams,
    ) -> Result<Arc<Self>, ControllerError> {
        let home = Home::new(&config.home);
        std::fs::create_dir_all(home.root()).map_err(|e| {
            ControllerError::io(format!("cannot create home {}", home.root().display()), e)
        })?;
        let meta = Meta::open(&home.meta_db())?;
        pins::init(&meta)?;
        let lifecycle_config = match &config.lifecycle {
            Some(c) => c.clone(),
            None => config::Config::load(&home.root().join("config.toml"))
                .map_err(|e| ControllerError::BadInput(config::error_chain(&e)))?,
        };
        lifecycle_config
            .validate()
            .map_err(|e| ControllerError::BadInput(e.to_string()))?;
        let webhook_secret = match &lifecycle_config.webhook.secret {
            Some(s) => s.clone(),
            None => home::read_or_create_secret(&home.root().join("webhook.secret"), 32)
                .map_err(|e| ControllerError::io("cannot read the webhook secret", e))?,
        };
        let blobs = blobs::BlobStore::open(home.root().join("inputs"), config.max_blob_mb)
            .map_err(|e| ControllerError::io("cannot open the input blob store", e))?;
        let keyset = Keyset::from_file(&access::read_or_create_keyset(&home)?)
            .map_err(|e| ControllerError::BadInput(format!("invalid keyset: {e}")))?;
        let api_token = home::read_or_create_secret(&home.api_token_file(), 32)
            .map_err(|e| ControllerError::io("cannot read the API token", e))?;
        let (shutdown, _) = tokio::sync::watch::channel(false);
        let metrics = metrics::Metrics::new(&config.metric_labels);
        let controller = Arc::new(Self {
            metrics,
            config,
            home,
            runtime: seams.runtime,
            store: snapshots::Snapshots::new(seams.store),
            clock: seams.clock,
            blobs,
            meta,
            keys: Arc::new(SharedKeyset::new(keyset)),
            access: access::Access::default(),
            api_token,
            gateway_addr: RwLock::new(String::new()),
            api_url: RwLock::new(String::new()),
            live: RwLock::new(HashMap::new()),
            building: keyed::KeyedLocks::default(),
            starting_instances: fsck::Starting::default(),
            leases: leases::Leases::default(),
            client_builds: Default::default(),
            lifecycle: lifecycle::Lifecycle::new(lifecycle_config, webhook_secret),
            shutdown,
            history: status_page::History::default(),
            tasks: tokio::runtime::Handle::current(),
        });
        controller.reconcile().await?;
        controller.spawn_lifecycle();
        controller.spawn_remote_loop();
        controller.spawn_status_sampler();
        Ok(controller)
    }

    pub fn home(&self) -> &Home {
        &self.home
    }

    /// The input blobs.
    pub fn blobs(&self) -> &blobs::BlobStore {
        &self.blobs
    }

    /// The engine every state's identity starts from.
    pub fn engine(&self) -> &EngineFingerprint {
        self.runtime.engine()
    }

    /// The time now, as the lifecycle's decisions see it.
    pub(crate) fn now(&self) -> u64 {
        (self.clock)()
    }

    /// The keyset in force: tokens are signed with its current key.
    pub fn token_key(&self) -> Arc<Keyset> {
        self.keys.get()
    }

    /// The keyset handle, shared with the gateway and swapped whole on reload.
    pub fn keyset(&self) -> Arc<SharedKeyset> {
        Arc::clone(&self.keys)
    }

    /// The API bearer token.
    pub fn api_token(&self) -> &str {
        &self.api_token
    }

    /// Who `presented` (a bearer token) belongs to: the home's own token is the admin; the
    /// others are looked up in the metadata on every call, so a revocation holds at once.
    pub fn authenticate(&self, presented: &str) -> Result<tokens::Principal, tokens::AuthError> {
        if presented.is_empty() {
            return Err(tokens::AuthError::Missing);
        }
        if tokens::constant_time_eq(presented.as_bytes(), self.api_token.as_bytes()) {
            return Ok(tokens::Principal::local_admin());
        }
        self.meta.authenticate_token(presented, now_ms())
    }

    /// The public keys a gateway elsewhere verifies DSN tokens with (no HS256 secret).
    pub fn public_keys(&self) -> taidon_api::PublicKeys {
        let keys = self.keys.get();
        taidon_api::PublicKeys {
            audience: keys.audience().to_owned(),
            current: keys
                .current()
                .map(|(kid, _)| kid.to_owned())
                .unwrap_or_default(),
            keys: keys
                .public_entries()
                .into_iter()
                .filter_map(|e| {
                    Some(taidon_api::PublicKey {
                        kid: e.kid,
                        alg: e.alg,
                        public_hex: e.public_hex?,
                    })
                })
                .collect(),
        }
    }

    /// Where the gateway listens, for the DSNs this controller hands out.
    pub fn set_gateway_addr(&self, addr: String) {
        *self.gateway_addr.write().unwrap_or_else(|p| p.into_inner()) = addr;
    }

    pub fn set_api_url(&self, url: String) {
        *self.api_url.write().unwrap_or_else(|p| p.into_inner()) = url;
    }

    fn gateway_addr(&self) -> String {
        self.gateway_addr
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Resolves when a shutdown was asked for through the API.
    pub fn shutdown_requested(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.shutdown.subscribe();
        async move {
            while !*rx.borrow_and_update() {
                if rx.changed().await.is_err() {
                    return;
                }
            }
        }
    }

    /// Runs `task` in the background on the controller's runtime, in the caller's span (so the
    /// work an API request starts logs its request id).
    pub(crate) fn spawn<F>(&self, task: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tasks.spawn(tracing::Instrument::in_current_span(task))
    }

    pub(crate) fn request_shutdown(&self) {
        self.shutdown.send_replace(true);
    }

    /// Brings metadata and processes in line with what is on disk after a restart or crash.
    async fn reconcile(self: &Arc<Self>) -> Result<(), ControllerError> {
        // Servers a dead daemon left building are stopped before their data goes.
        for area in self.store.leftover_builds().await? {
            match self.runtime.stop_leftover(&area).await {
                Ok(Some(what)) => {
                    tracing::warn!(%area, "stopped a build server left by a previous daemon: {what}")
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(%area, error = %e, "checking for a left-over build server")
                }
            }
        }
        let discarded = self.store.discard_leftovers().await?;
        if discarded > 0 {
            tracing::warn!(discarded, "discarded unfinished builds");
        }
        if let Err(e) = self.runtime.discard_leftovers().await {
            tracing::warn!(error = %e, "cannot discard what unfinished builds left");
        }

        let manifests = self.store.refresh().await?;
        let rows = self.meta.states()?;
        let now = now_ms();
        for m in &manifests {
            match rows.iter().find(|r| r.state_id == m.state_id) {
                Some(r) if r.status == StateStatus::Warm || r.status == StateStatus::Hot => {}
                Some(r) => {
                    let mut r = r.clone();
                    r.status = StateStatus::Warm;
                    r.status_reason = None;
                    r.size_bytes = m.size_bytes;
                    r.build_cost_ms = m.build_cost_ms;
                    self.meta.upsert_state(&r)?;
                }
                None => self.meta.upsert_state(&fsck::recovered_row(m, now))?,
            }
        }
        for r in rows {
            if manifests.iter().any(|m| m.state_id == r.state_id) {
                continue;
            }
            let (status, reason) = match r.status {
                StateStatus::Building | StateStatus::Starting if self.replayable(&r) => (
                    StateStatus::Cold,
                    "interrupted: the daemon stopped during the build; rebuilt when asked for",
                ),
                StateStatus::Building | StateStatus::Starting => (
                    StateStatus::Failed,
                    "interrupted: the daemon stopped during the build",
                ),
                StateStatus::Warm | StateStatus::Hot if self.kept_in_bucket(&r.state_id).await => (
                    StateStatus::Warm,
                    "not here: downloaded from the bucket when asked for",
                ),
                StateStatus::Warm | StateStatus::Hot => {
                    (StateStatus::Cold, "snapshot is missing from the store")
                }
                _ => continue,
            };
            self.meta
                .set_state_status(&r.state_id, status, Some(reason))?;
            self.meta
                .event(now, "reconciled", Some(&r.state_id), None, Some(reason))?;
        }
        self.adopt_instances().await?;
        self.reconcile_leases().await
    }

    /// The status `sqlrs status` shows.
    pub async fn status(&self) -> Result<Status, ControllerError> {
        let store_bytes = self.store.usage().await?;
        let store = self.store.describe();
        let runtime = self.runtime.describe();
        let states = self.meta.states()?.len() as u64;
        let remote = self.remote_info().await;
        Ok(Status {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            home: self.home.root().to_path_buf(),
            api_url: self
                .api_url
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            gateway: self.gateway_addr(),
            engine_version: runtime.engine_version,
            engine_bin_dir: runtime.bin_dir,
            clone_strategy: store.strategy,
            store_path: PathBuf::from(store.location),
            store_bytes,
            states,
            instances_running: self.live.read().unwrap_or_else(|p| p.into_inner()).len() as u64,
            server_user: runtime.server_user,
            store_capacity_bytes: self
                .lifecycle
                .config
                .store_limits()
                .map_or(0, |l| l.high_water_bytes),
            max_instances: self.lifecycle.config.instance_limits().capacity() as u64,
            standby_instances: self.standby_count() as u64,
            remote,
            engines: self
                .runtime
                .engines()
                .into_iter()
                .enumerate()
                .map(|(i, e)| taidon_api::EngineStatus {
                    version: format!("PostgreSQL {}.{}", e.major, e.minor),
                    major: e.major,
                    minor: e.minor,
                    bin_dir: e.bin_dir,
                    default: i == 0,
                })
                .collect(),
        })
    }

    /// Every state the metadata knows, with its presence level.
    pub fn list_states(&self) -> Result<Vec<StateInfo>, ControllerError> {
        let counts = self.instance_counts();
        let mut standings = self.standings()?;
        let in_bucket = self.remote_known();
        Ok(self
            .meta
            .states()?
            .into_iter()
            .map(|r| {
                let standing = standings.remove(&r.state_id);
                let instances = counts.get(&r.state_id).copied().unwrap_or(0);
                let status = if instances > 0 && r.status == StateStatus::Warm {
                    StateStatus::Hot
                } else if instances == 0 && r.status == StateStatus::Hot {
                    StateStatus::Warm
                } else {
                    r.status
                };
                StateInfo {
                    state_id: r.state_id,
                    parent: r.parent,
                    label: r.label,
                    status,
                    size_bytes: r.size_bytes,
                    build_cost_ms: r.build_cost_ms,
                    restore_cost_ms: r.restore_cost_ms,
                    created_ms: r.created_ms,
                    last_access_ms: r.last_access_ms,
                    access_count: r.access_count,
                    instances,
                    score: standing.as_ref().map_or(0.0, |s| s.score),
                    pin: standing.and_then(|s| s.pin),
                    status_reason: r.status_reason,
                    location: remote::location(
                        self.store.contains(&r.state_id),
                        in_bucket.contains(&r.state_id),
                    )
                    .to_owned(),
                    client_only: r.parent.is_some()
                        && serde_json::from_str::<taidon_core::Step>(&r.inputs_fingerprint)
                            .is_ok_and(|s| s.client_only()),
                }
            })
            .collect())
    }

    fn instance_counts(&self) -> HashMap<StateId, u64> {
        let mut counts = HashMap::new();
        for live in self.live.read().unwrap_or_else(|p| p.into_inner()).values() {
            *counts.entry(live.state_id).or_insert(0) += 1;
        }
        counts
    }

    /// Removes a state's snapshot and metadata. Its running instances are removed too with
    /// `force`; without it they make this an error. Descendants keep their own snapshots.
    pub async fn remove_state(
        self: &Arc<Self>,
        typed: &str,
        force: bool,
    ) -> Result<taidon_api::Removed, ControllerError> {
        let id = self.state_by_prefix(typed)?;
        let instances: Vec<_> = self
            .list_instances()?
            .into_iter()
            .filter(|i| i.state_id == id)
            .map(|i| i.instance_id)
            .collect();
        if !instances.is_empty() && !force {
            return Err(ControllerError::BadInput(format!(
                "state {} has {} instance(s); remove them first or use --force",
                id.short(),
                instances.len()
            )));
        }
        for iid in &instances {
            self.delete_instance(iid).await?;
        }
        let _guard = self.building.lock(id).await;
        self.store.remove(id).await?;
        self.meta.delete_state(&id)?;
        self.forget_state_access(&id);
        self.meta
            .event(now_ms(), "state_removed", Some(&id), None, None)?;
        Ok(taidon_api::Removed {
            states: vec![id],
            instances,
        })
    }

    /// The state a user's full id or 8+ hex prefix names, among those the metadata knows.
    pub(crate) fn state_by_prefix(&self, typed: &str) -> Result<StateId, ControllerError> {
        let ids: Vec<String> = self
            .meta
            .states()?
            .into_iter()
            .map(|s| s.state_id.to_string())
            .collect();
        taidon_core::prefix::resolve(typed, ids.iter().map(String::as_str))?
            .parse()
            .map_err(|e| ControllerError::Internal(format!("{e}")))
    }

    /// Stops every running server; their data stays, and the next daemon restarts them.
    pub async fn stop_all(&self) {
        let live: Vec<_> = self
            .live
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .collect();
        for (iid, l) in live {
            let server = l.server.lock().await.take();
            if let Some(server) = server {
                if let Err(e) = server.stop().await {
                    tracing::warn!(instance = %iid, error = %e, "stopping instance");
                }
            }
        }
    }

    /// Lets go of every running server without stopping it, for a controller that exits and
    /// leaves its instances to the next one, which adopts them as after a crash. How many.
    pub fn leave_running(&self) -> usize {
        let live: Vec<_> = self
            .live
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .collect();
        let mut left = 0;
        for (iid, l) in live {
            // A server being stopped right now is left to that.
            if let Ok(mut server) = l.server.try_lock() {
                if let Some(server) = server.take() {
                    tracing::debug!(instance = %iid, "left running");
                    server.leave_running();
                    left += 1;
                }
            }
        }
        left
    }

    pub(crate) fn instance_info(
        &self,
        row: &meta::InstanceRow,
    ) -> Result<InstanceInfo, ControllerError> {
        let now_s = now_ms() / 1000;
        let keys = self.keys.get();
        let owner = self.meta.instance_owner(&row.instance_id)?;
        let mut claims = keys.claims(
            row.state_id,
            row.instance_id,
            taidon_core::token::Scope::Rw,
            now_s,
            self.config.token_ttl_s,
        );
        if !owner.is_empty() {
            claims.sub = owner.clone();
        }
        let token = keys
            .sign(&claims)
            .map_err(|e| ControllerError::Internal(format!("cannot sign a token: {e}")))?;
        let running = self
            .live
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&row.instance_id);
        Ok(InstanceInfo {
            owner,
            instance_id: row.instance_id,
            state_id: row.state_id,
            // A live standby is still a standby: it serves nobody until handed out.
            status: if running && row.status != "standby" {
                "running".into()
            } else {
                row.status.clone()
            },
            dsn: self.dsn_for(&token),
            created_ms: row.created_ms,
            clone_ms: row.clone_ms,
            start_ms: row.start_ms,
        })
    }
}
