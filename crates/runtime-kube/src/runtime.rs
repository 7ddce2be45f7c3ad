//! [`KubernetesRuntime`]: builds and instances as runner pods.

use std::sync::Arc;

use taidon_core::{DataArea, EngineFingerprint, InstanceId, StateId, Step};
use taidon_runtime::{
    lay_out_step, run_psql_step_at, BoxFuture, BuildServer, Endpoint, EngineInfo, Exit, Health,
    Instance, PsqlTarget, Reclaimed, Runtime, RuntimeError, RuntimeInfo, StepError, StepInputs,
    StepOutput,
};

use crate::cluster::Cluster;
use crate::control::{RunnerClient, POSTGRES_PORT};
use crate::pods::{self, Phase, Role};

/// Runs every build and instance in a runner pod of one namespace.
pub struct KubernetesRuntime {
    pub(crate) cluster: Arc<Cluster>,
}

/// A build's data area: the pod that holds it, the state, and where it starts from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BuildArea {
    pub(crate) pod: String,
    pub(crate) state: StateId,
    pub(crate) parent: Option<StateId>,
}

impl BuildArea {
    pub(crate) fn new(state: StateId, parent: Option<StateId>) -> Self {
        Self {
            pod: pods::build_pod_name(&state),
            state,
            parent,
        }
    }

    /// The area's name, which the store and the runtime both read.
    pub(crate) fn area(&self) -> DataArea {
        let parent = self
            .parent
            .map(|p| p.to_string())
            .unwrap_or_else(|| "initdb".into());
        DataArea::named(format!("pod:{}:{}:{parent}", self.pod, self.state))
    }

    pub(crate) fn parse(area: &DataArea) -> Result<Self, RuntimeError> {
        let foreign = || RuntimeError::ForeignArea(area.clone());
        let name = area.as_named().ok_or_else(foreign)?;
        let mut parts = name.strip_prefix("pod:").ok_or_else(foreign)?.split(':');
        let (Some(pod), Some(state), Some(parent), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(foreign());
        };
        let state = state.parse().map_err(|_| foreign())?;
        let parent = match parent {
            "initdb" => None,
            p => Some(p.parse().map_err(|_| foreign())?),
        };
        Ok(Self {
            pod: pod.to_owned(),
            state,
            parent,
        })
    }
}

impl KubernetesRuntime {
    /// Creates `name` for `role` and waits until it is ready; a pod that will not be is
    /// deleted, and the error says why.
    async fn start_pod(&self, name: &str, role: &Role) -> Result<String, RuntimeError> {
        self.start_pod_with(name, role, &Default::default()).await
    }

    /// [`Self::start_pod`], an initdb pod writing `pg_settings` into its `postgresql.conf`.
    async fn start_pod_with(
        &self,
        name: &str,
        role: &Role,
        pg_settings: &std::collections::BTreeMap<String, String>,
    ) -> Result<String, RuntimeError> {
        self.cluster.create(name, role, pg_settings).await?;
        match self.cluster.wait_ready(name).await {
            Ok(ip) => Ok(ip),
            Err(e) => {
                if let Err(d) = self.cluster.delete(name, Some(0)).await {
                    tracing::warn!(pod = %name, error = %d, "cannot delete a pod that failed");
                }
                Err(e)
            }
        }
    }
}

impl Runtime for KubernetesRuntime {
    fn engine(&self) -> &EngineFingerprint {
        &self.cluster.engine.fingerprint
    }

    fn engines(&self) -> Vec<EngineInfo> {
        let e = &self.cluster.engine;
        vec![EngineInfo {
            major: e.fingerprint.major,
            minor: e.fingerprint.minor,
            version_line: e.version_line.clone(),
            bin_dir: e.bin_dir.clone(),
        }]
    }

    /// The runner image holds one engine, and its pods take no recipe settings yet.
    fn check_engine<'a>(
        &'a self,
        engine: &'a EngineFingerprint,
    ) -> BoxFuture<'a, Result<(), RuntimeError>> {
        Box::pin(async move {
            let own = &self.cluster.engine.fingerprint;
            if (engine.major, engine.minor) != (own.major, own.minor) {
                return Err(RuntimeError::EngineMissing {
                    asked: engine.version(),
                    major: engine.major,
                    installed: format!("{}.{} (the runner image)", own.major, own.minor),
                });
            }
            // The runner image's engine checks them where it can also run here (the same
            // binaries as the image); the first server of the state reports the rest.
            let local = self.cluster.engine.with_fingerprint(engine);
            if engine.settings.is_empty() || !local.bin_dir.join("postgres").is_file() {
                return Ok(());
            }
            let scratch = tempfile::tempdir().map_err(|e| RuntimeError::Task(e.to_string()))?;
            let run_as = taidon_runtime::RunAs::for_this_process()?;
            if let Some(r) = &run_as {
                std::os::unix::fs::chown(scratch.path(), Some(r.uid), Some(r.gid))
                    .map_err(|e| RuntimeError::Task(e.to_string()))?;
            }
            local.check_settings(scratch.path(), run_as.as_ref()).await
        })
    }

    fn describe(&self) -> RuntimeInfo {
        RuntimeInfo {
            engine_version: self.cluster.engine.fingerprint.version(),
            bin_dir: self.cluster.engine.bin_dir.clone(),
            server_user: format!(
                "runner pods ({}) in namespace {}",
                self.cluster.settings.image,
                self.cluster.namespace()
            ),
        }
    }

    /// A pod that makes the cluster with initdb and waits to publish it.
    fn init_data<'a>(
        &'a self,
        data: &'a DataArea,
        engine: &'a EngineFingerprint,
    ) -> BoxFuture<'a, Result<(), RuntimeError>> {
        Box::pin(async move {
            self.check_engine(engine).await?;
            let area = BuildArea::parse(data)?;
            let role = Role::Build {
                state: area.state,
                parent: None,
            };
            self.start_pod_with(&area.pod, &role, &engine.settings)
                .await
                .map(drop)
        })
    }

    fn start_build<'a>(
        &'a self,
        state: StateId,
        data: &'a DataArea,
    ) -> BoxFuture<'a, Result<Box<dyn BuildServer>, RuntimeError>> {
        Box::pin(async move {
            let area = BuildArea::parse(data)?;
            let role = Role::Build {
                state,
                parent: area.parent,
            };
            let ip = self.start_pod(&area.pod, &role).await?;
            Ok(Box::new(PodBuild {
                pod: area.pod.clone(),
                target: PsqlTarget {
                    host: ip.clone(),
                    port: POSTGRES_PORT,
                    user: "postgres".into(),
                    password: Some(self.cluster.superuser_password(&area.pod)),
                },
                control: self.cluster.client(&area.pod, &ip),
                cluster: Arc::clone(&self.cluster),
            }) as Box<dyn BuildServer>)
        })
    }

    fn prepare_instance(&self, iid: InstanceId) -> BoxFuture<'_, Result<DataArea, RuntimeError>> {
        Box::pin(async move { Ok(DataArea::named(pods::instance_pod_name(&iid))) })
    }

    /// Adopts the instance's pod if it runs (a restarted controller), else makes one.
    fn start_instance(
        &self,
        iid: InstanceId,
        state: StateId,
    ) -> BoxFuture<'_, Result<Box<dyn Instance>, RuntimeError>> {
        Box::pin(async move {
            let name = pods::instance_pod_name(&iid);
            self.cluster.synced().await?;
            let existing = self.cluster.seen(&name);
            let adoptable = existing.as_ref().is_some_and(|pod| {
                pod.metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(pods::ANNOTATION_STATE))
                    == Some(&state.to_string())
                    && matches!(pods::phase_of(pod), Phase::Ready(_) | Phase::Coming)
            });
            let ip = if adoptable {
                tracing::info!(pod = %name, "adopting a running pod");
                match self.cluster.wait_ready(&name).await {
                    Ok(ip) => ip,
                    Err(e) => {
                        // Its replacement, at the next start, takes the name.
                        self.cluster.delete(&name, Some(0)).await?;
                        return Err(e);
                    }
                }
            } else {
                if existing.is_some() {
                    // Failed, or of another state: its replacement takes the name.
                    self.cluster.delete(&name, Some(0)).await?;
                    self.wait_gone(&name).await?;
                }
                self.start_pod(&name, &Role::Instance { iid, state })
                    .await?
            };
            Ok(Box::new(PodInstance {
                pod: name.clone(),
                control: self.cluster.client(&name, &ip),
                ip,
                cluster: Arc::clone(&self.cluster),
                ended: None,
            }) as Box<dyn Instance>)
        })
    }

    fn remove_instance(&self, iid: InstanceId) -> BoxFuture<'_, Result<(), RuntimeError>> {
        Box::pin(async move {
            self.cluster
                .delete(&pods::instance_pod_name(&iid), None)
                .await
        })
    }

    /// The data is in the bucket: it survives whatever became of the pod, which
    /// [`Runtime::start_instance`] adopts if it runs.
    fn reclaim_instance(&self, _iid: InstanceId) -> BoxFuture<'_, Result<Reclaimed, RuntimeError>> {
        Box::pin(async {
            Ok(Reclaimed {
                stopped: None,
                has_data: true,
            })
        })
    }

    fn stop_leftover<'a>(
        &'a self,
        data: &'a DataArea,
    ) -> BoxFuture<'a, Result<Option<String>, RuntimeError>> {
        Box::pin(async move {
            let area = BuildArea::parse(data)?;
            self.cluster.delete(&area.pod, Some(0)).await?;
            Ok(Some(format!("pod {}", area.pod)))
        })
    }

    fn discard_leftovers(&self) -> BoxFuture<'_, Result<(), RuntimeError>> {
        Box::pin(async { Ok(()) })
    }

    /// Deletes the build pods a previous controller left, and instance pods of no instance.
    fn end_unadopted<'a>(
        &'a self,
        keep: &'a [InstanceId],
    ) -> BoxFuture<'a, Result<Vec<String>, RuntimeError>> {
        Box::pin(async move {
            let keep: Vec<String> = keep.iter().map(pods::instance_pod_name).collect();
            let mut ended = Vec::new();
            for pod in self.cluster.list().await? {
                let Some(name) = pod.metadata.name else {
                    continue;
                };
                if keep.contains(&name) || pod.metadata.deletion_timestamp.is_some() {
                    continue;
                }
                self.cluster.delete(&name, Some(0)).await?;
                ended.push(format!("pod {name}"));
            }
            Ok(ended)
        })
    }
}

impl KubernetesRuntime {
    /// Waits until pod `name` is gone from the API server.
    async fn wait_gone(&self, name: &str) -> Result<(), RuntimeError> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while self.cluster.seen(name).is_some() {
            if std::time::Instant::now() > deadline {
                return Err(RuntimeError::Remote {
                    what: format!("pod {name}"),
                    detail: "still there a minute after its deletion".into(),
                });
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        Ok(())
    }
}

/// A build pod: psql from here, over the network, as its superuser.
#[derive(Debug)]
struct PodBuild {
    pod: String,
    target: PsqlTarget,
    control: RunnerClient,
    cluster: Arc<Cluster>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("namespace", &self.settings.namespace)
            .finish_non_exhaustive()
    }
}

impl BuildServer for PodBuild {
    fn apply<'a>(
        &'a self,
        step: &'a Step,
        inputs: &'a dyn StepInputs,
    ) -> BoxFuture<'a, Result<StepOutput, StepError>> {
        Box::pin(async move {
            let Step::Psql(psql) = step else {
                return Err(StepError::setup(format!(
                    "{}: the Kubernetes runtime runs psql steps only; Liquibase steps need the \
                     local runtime for now",
                    step.label()
                )));
            };
            let (_work, cwd) = lay_out_step(&self.cluster.work, step, inputs)
                .await
                .map_err(StepError::setup)?;
            run_psql_step_at(&self.cluster.engine, &self.target, psql, &cwd).await
        })
    }

    fn open_to_client(&self) -> BoxFuture<'_, Result<(Endpoint, String), RuntimeError>> {
        Box::pin(async move {
            Err(RuntimeError::Remote {
                what: format!("pod {}", self.pod),
                detail: "the Kubernetes runtime does not run client commands (prepare:cmd) yet"
                    .into(),
            })
        })
    }

    fn close_to_client(&self) -> BoxFuture<'_, Result<(), RuntimeError>> {
        Box::pin(async { Ok(()) })
    }

    /// Stops postgres cleanly; the pod stays until the store publishes its data.
    fn stop(self: Box<Self>) -> BoxFuture<'static, Result<(), RuntimeError>> {
        Box::pin(async move {
            self.control.stop().await.map_err(|e| RuntimeError::Remote {
                what: format!("cannot stop the server of pod {}", self.pod),
                detail: e.to_string(),
            })
        })
    }
}

/// An instance pod.
#[derive(Debug)]
struct PodInstance {
    pod: String,
    ip: String,
    control: RunnerClient,
    cluster: Arc<Cluster>,
    /// How it ended, once seen: reported on every later call.
    ended: Option<Exit>,
}

impl PodInstance {
    fn remote(&self, what: &str, e: impl std::fmt::Display) -> RuntimeError {
        RuntimeError::Remote {
            what: format!("{what} (pod {})", self.pod),
            detail: e.to_string(),
        }
    }
}

impl Instance for PodInstance {
    fn endpoint(&self) -> Endpoint {
        Endpoint {
            host: self.ip.clone(),
            port: POSTGRES_PORT,
        }
    }

    fn set_password<'a>(
        &'a self,
        role: &'a str,
        password: &'a str,
    ) -> BoxFuture<'a, Result<(), RuntimeError>> {
        Box::pin(async move {
            self.control
                .set_password(role, password)
                .await
                .map_err(|e| self.remote(&format!("cannot set the password of {role:?}"), e))
        })
    }

    fn execute<'a>(&'a self, sql: &'a str) -> BoxFuture<'a, Result<(), RuntimeError>> {
        Box::pin(async move {
            self.control
                .execute(sql)
                .await
                .map_err(|e| self.remote("cannot run SQL", e))
        })
    }

    /// The pod as the watcher last saw it: failed, evicted or deleted by someone else is
    /// an ended server.
    fn health(&mut self) -> Health {
        if let Some(status) = self.ended {
            return Health::Exited { status };
        }
        let exit = match self.cluster.phase_seen(&self.pod) {
            None => Some(Exit::Signal(9)),
            Some((Phase::Ready(_) | Phase::Coming, _)) => None,
            Some((Phase::Gone, _)) => Some(Exit::Signal(15)),
            Some((Phase::Failed(why), code)) => {
                tracing::warn!(pod = %self.pod, "runner pod failed: {why}");
                Some(match code {
                    Some(code) => Exit::Code(code),
                    None => Exit::Signal(9),
                })
            }
        };
        match exit {
            Some(status) => {
                self.ended = Some(status);
                Health::Exited { status }
            }
            None => Health::Running,
        }
    }

    /// Deletes the pod: its runner stops postgres cleanly on SIGTERM. The data was the
    /// pod's volume: a restart restores the state's snapshot again.
    fn stop(self: Box<Self>) -> BoxFuture<'static, Result<(), RuntimeError>> {
        Box::pin(async move { self.cluster.delete(&self.pod, None).await })
    }

    fn discard(self: Box<Self>) -> BoxFuture<'static, Result<(), RuntimeError>> {
        Box::pin(async move { self.cluster.delete(&self.pod, Some(0)).await })
    }

    /// The pod runs on without this process; the next controller adopts it.
    fn leave_running(self: Box<Self>) {
        tracing::debug!(pod = %self.pod, "left running");
    }
}
