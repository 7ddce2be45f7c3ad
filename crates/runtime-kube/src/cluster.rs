//! What the runtime and the store share: the API client, the pods as the watcher last saw
//! them, and the calls to the API server, each of whose errors names the verb and resource.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::runtime::watcher;
use kube::runtime::WatchStreamExt;
use kube::Api;
use taidon_runtime::{Engine, RuntimeError};
use tokio::sync::watch;

use crate::control::{pod_token, RunnerClient};
use crate::pods::{self, Phase, PodSettings, Role};

/// A failed API call, described with its verb and resource so that a missing permission
/// says which.
pub(crate) fn api_error(
    verb: &str,
    resource: &str,
    namespace: &str,
    e: kube::Error,
) -> RuntimeError {
    let detail = match &e {
        // RBAC's refusal, not a quota's or an admission policy's (also 403 Forbidden).
        kube::Error::Api(status)
            if status.code == 403
                && status.message.contains(&format!("cannot {verb} resource")) =>
        {
            format!(
                "forbidden: the controller's service account may not {verb} {resource} in \
                 namespace {namespace}; grant it in the Role (deploy/kubernetes): {}",
                status.message
            )
        }
        kube::Error::Api(status) => format!("{} ({})", status.message, status.code),
        other => other.to_string(),
    };
    RuntimeError::Remote {
        what: format!("cannot {verb} {resource}"),
        detail,
    }
}

pub(crate) fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

pub(crate) struct Cluster {
    pub(crate) pods: Api<Pod>,
    pub(crate) settings: PodSettings,
    /// The engine of the controller's image: psql for builds, and the fingerprint every
    /// state's identity starts from.
    pub(crate) engine: Engine,
    /// Keys each pod's control token and superuser password.
    secret: Vec<u8>,
    /// Where step inputs are laid out for psql.
    pub(crate) work: PathBuf,
    /// The pods as the watcher last saw them, by name.
    seen: RwLock<HashMap<String, Pod>>,
    /// Bumped on every change the watcher sees.
    changed: watch::Sender<u64>,
    /// Whether the watcher has listed the pods once.
    synced: watch::Sender<bool>,
    /// The watcher's last error, for a wait that times out.
    watch_error: RwLock<Option<String>>,
}

impl Cluster {
    pub(crate) fn new(
        client: kube::Client,
        settings: PodSettings,
        engine: Engine,
        secret: Vec<u8>,
        work: PathBuf,
    ) -> Arc<Self> {
        let pods = Api::namespaced(client, &settings.namespace);
        Arc::new(Self {
            pods,
            settings,
            engine,
            secret,
            work,
            seen: RwLock::new(HashMap::new()),
            changed: watch::channel(0).0,
            synced: watch::channel(false).0,
            watch_error: RwLock::new(None),
        })
    }

    /// Follows this runtime's pods (level-triggered: the map is always the latest view) until
    /// the returned task is aborted.
    pub(crate) fn spawn_watch(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let config = watcher::Config::default().labels(pods::SELECTOR);
            let mut events = watcher(this.pods.clone(), config).default_backoff().boxed();
            let mut listing: Option<HashMap<String, Pod>> = None;
            while let Some(event) = events.next().await {
                match event {
                    Ok(watcher::Event::Init) => listing = Some(HashMap::new()),
                    Ok(watcher::Event::InitApply(pod)) => {
                        if let (Some(list), Some(name)) =
                            (listing.as_mut(), pod.metadata.name.clone())
                        {
                            list.insert(name, pod);
                        }
                    }
                    Ok(watcher::Event::InitDone) => {
                        if let Some(list) = listing.take() {
                            *this.seen.write().unwrap_or_else(|p| p.into_inner()) = list;
                        }
                        this.synced.send_replace(true);
                        this.bump();
                    }
                    Ok(watcher::Event::Apply(pod)) => {
                        if let Some(name) = pod.metadata.name.clone() {
                            tracing::debug!(pod = %name, phase = ?pods::phase_of(&pod), "pod changed");
                            this.seen
                                .write()
                                .unwrap_or_else(|p| p.into_inner())
                                .insert(name, pod);
                            this.bump();
                        }
                    }
                    Ok(watcher::Event::Delete(pod)) => {
                        if let Some(name) = &pod.metadata.name {
                            tracing::debug!(pod = %name, "pod deleted");
                            this.seen
                                .write()
                                .unwrap_or_else(|p| p.into_inner())
                                .remove(name);
                            this.bump();
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "watching runner pods");
                        *this.watch_error.write().unwrap_or_else(|p| p.into_inner()) =
                            Some(e.to_string());
                    }
                }
            }
        })
    }

    fn bump(&self) {
        self.changed.send_modify(|n| *n += 1);
    }

    /// Waits until the watcher has listed the pods once; past the pending timeout, the
    /// watcher's last error (a list it may not make, an API server it cannot reach).
    pub(crate) async fn synced(&self) -> Result<(), RuntimeError> {
        let mut rx = self.synced.subscribe();
        let waited = tokio::time::timeout(self.settings.pending_timeout, rx.wait_for(|s| *s)).await;
        if matches!(waited, Ok(Ok(_))) {
            return Ok(());
        }
        let detail = self
            .watch_error
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_else(|| "no answer from the API server".into());
        Err(RuntimeError::Remote {
            what: format!("cannot watch pods in namespace {}", self.namespace()),
            detail,
        })
    }

    /// The pod `name` as last seen.
    pub(crate) fn seen(&self, name: &str) -> Option<Pod> {
        self.seen
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    /// What pod `name` says as last seen: its phase and, once it ended, its exit code;
    /// `None` if it is gone. Read in place (no copy of the pod): a Resolve asks it.
    pub(crate) fn phase_seen(&self, name: &str) -> Option<(Phase, Option<i32>)> {
        let seen = self.seen.read().unwrap_or_else(|p| p.into_inner());
        let pod = seen.get(name)?;
        let code = pod
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|c| c.first())
            .and_then(|c| c.state.as_ref())
            .and_then(|s| s.terminated.as_ref())
            .map(|t| t.exit_code);
        Some((pods::phase_of(pod), code))
    }

    pub(crate) fn token(&self, pod: &str) -> String {
        pod_token(&self.secret, pod)
    }

    pub(crate) fn superuser_password(&self, pod: &str) -> String {
        pod_token(&self.secret, &format!("{pod}/postgres"))
    }

    pub(crate) fn client(&self, pod: &str, ip: &str) -> RunnerClient {
        RunnerClient::new(ip, &self.token(pod))
    }

    pub(crate) fn namespace(&self) -> &str {
        &self.settings.namespace
    }

    /// Creates pod `name` for `role`.
    pub(crate) async fn create(
        &self,
        name: &str,
        role: &Role,
        pg_settings: &std::collections::BTreeMap<String, String>,
    ) -> Result<(), RuntimeError> {
        let password = match role {
            Role::Build {
                parent: Some(_), ..
            } => Some(self.superuser_password(name)),
            _ => None,
        };
        let pod = pods::runner_pod(
            &self.settings,
            name,
            role,
            &self.token(name),
            password.as_deref(),
            pg_settings,
        );
        self.pods
            .create(&PostParams::default(), &pod)
            .await
            .map_err(|e| api_error("create", "pods", self.namespace(), e))?;
        tracing::info!(pod = %name, role = ?role, "created a runner pod");
        Ok(())
    }

    /// Deletes pod `name`; a pod already gone is fine.
    pub(crate) async fn delete(
        &self,
        name: &str,
        grace_s: Option<u32>,
    ) -> Result<(), RuntimeError> {
        let params = DeleteParams {
            grace_period_seconds: grace_s,
            ..DeleteParams::default()
        };
        match self.pods.delete(name, &params).await {
            Ok(_) => {
                tracing::info!(pod = %name, "deleted a runner pod");
                Ok(())
            }
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(api_error("delete", "pods", self.namespace(), e)),
        }
    }

    /// This runtime's pods, listed now.
    pub(crate) async fn list(&self) -> Result<Vec<Pod>, RuntimeError> {
        let list = self
            .pods
            .list(&ListParams::default().labels(pods::SELECTOR))
            .await
            .map_err(|e| api_error("list", "pods", self.namespace(), e))?;
        Ok(list.items)
    }

    /// Waits until pod `name` is ready (its IP) or will not be: stuck pulling its image,
    /// unscheduled past the pending timeout, failed (its runner's last error line), deleted.
    pub(crate) async fn wait_ready(&self, name: &str) -> Result<String, RuntimeError> {
        let started = Instant::now();
        let mut changes = self.changed.subscribe();
        let failed = |detail: String| RuntimeError::Remote {
            what: format!("pod {name} did not become ready"),
            detail,
        };
        loop {
            let pod = self.seen(name);
            if let Some(pod) = &pod {
                match pods::phase_of(pod) {
                    Phase::Ready(ip) => return Ok(ip),
                    Phase::Failed(why) => return Err(failed(why)),
                    Phase::Gone => return Err(failed("it was deleted".into())),
                    Phase::Coming => {}
                }
                let scheduled = pods::unscheduled_reason(pod).is_none()
                    && pod
                        .status
                        .as_ref()
                        .and_then(|s| s.pod_ip.as_ref())
                        .is_some();
                let waited = started.elapsed();
                if !scheduled && waited > self.settings.pending_timeout {
                    let why = pods::unscheduled_reason(pod)
                        .unwrap_or_else(|| "the pod has no IP yet".into());
                    return Err(failed(format!(
                        "still Pending after {:.1} s: {why}",
                        waited.as_secs_f64()
                    )));
                }
                if waited > self.settings.ready_timeout {
                    return Err(failed(format!(
                        "not ready after {:.1} s",
                        waited.as_secs_f64()
                    )));
                }
            } else if started.elapsed() > self.settings.pending_timeout {
                return Err(failed("the API server never showed it".into()));
            }
            // A change, or a second: the timeouts are checked either way.
            let _ = tokio::time::timeout(Duration::from_secs(1), changes.changed()).await;
        }
    }
}

#[cfg(test)]
impl Cluster {
    /// Shows `pod` as the watcher would after seeing it added or changed.
    pub(crate) fn see(&self, pod: Pod) {
        let name = pod.metadata.name.clone().expect("a pod has a name");
        self.seen
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name, pod);
        self.bump();
    }

    /// Forgets pod `name` as the watcher would after seeing it deleted.
    pub(crate) fn unsee(&self, name: &str) {
        self.seen
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        self.bump();
    }

    /// Marks the pods as listed once, as the watcher does on its first `InitDone`.
    pub(crate) fn mark_synced(&self) {
        self.synced.send_replace(true);
    }
}
