//! The prepare engine: find the nearest existing ancestor of the wanted state, then build each
//! missing step on a clone of its parent and publish it as a checkpoint.

use std::sync::Arc;
use std::time::Instant;

use taidon_api::{
    CommandDone, EngineRequest, LiquibaseRequest, PrepareEvent, PrepareRequest, StateStatus,
};
use taidon_core::plan::CommandStep;
use taidon_core::plan::{chain, Chain};
use taidon_core::{EngineFingerprint, LiquibaseStep, StateId, Step};
use taidon_runtime::liquibase::{Liquibase, LiquibaseError};
use taidon_runtime::{lay_out_step, BoxFuture, RuntimeError, StepError, StepInputs};
use taidon_store::{Build, PublishMeta};
use tokio::sync::mpsc;

use crate::{lock, now_ms, Controller, ControllerError};

/// Where progress events go. A closed receiver (the client left) does not stop a build: its
/// result is cached for the next prepare.
pub(crate) type Events = mpsc::UnboundedSender<PrepareEvent>;

pub(crate) fn send(events: &Events, event: PrepareEvent) {
    let _ = events.send(event);
}

/// How often a long copy reports its bytes.
const TRANSFER_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// A store progress callback that sends `Transfer` events, at most one per `TRANSFER_EVERY`
/// and always the last.
pub(crate) fn transfer_reporter(events: Events, what: String) -> impl Fn(u64, u64) + Send + Sync {
    let last = std::sync::Mutex::new(None::<Instant>);
    move |done, total| {
        let now = Instant::now();
        let mut last = last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if done < total && last.is_some_and(|t| now.duration_since(t) < TRANSFER_EVERY) {
            return;
        }
        *last = Some(now);
        send(
            &events,
            PrepareEvent::Transfer {
                what: what.clone(),
                done_bytes: done,
                total_bytes: total,
            },
        );
    }
}

impl Controller {
    /// The engine a recipe asks for: the installed version it names (the newest minor of a
    /// major), else the default, with its settings, which the engine must accept.
    pub(crate) async fn engine_for(
        &self,
        req: &EngineRequest,
    ) -> Result<EngineFingerprint, ControllerError> {
        let installed = self.runtime.engines();
        let listed = || {
            installed
                .iter()
                .map(|e| format!("{}.{}", e.major, e.minor))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut engine = self.runtime.engine().clone();
        if let Some(asked) = req.version.as_deref().map(str::trim) {
            let taidon_core::project::EngineVersion { major, minor } =
                asked
                    .parse()
                    .map_err(|e: taidon_core::project::ParseEngineVersionError| {
                        ControllerError::BadInput(format!("engine version: {e}"))
                    })?;
            let found = installed
                .iter()
                .filter(|e| e.major == major && minor.is_none_or(|m| e.minor == m))
                .max_by_key(|e| e.minor)
                .ok_or_else(|| {
                    ControllerError::BadInput(
                        RuntimeError::EngineMissing {
                            asked: format!("PostgreSQL {asked}"),
                            major,
                            installed: listed(),
                        }
                        .to_string(),
                    )
                })?;
            engine.major = found.major;
            engine.minor = found.minor;
        }
        for name in req.settings.keys() {
            taidon_core::engine::check_setting_name(name)
                .map_err(|e| ControllerError::BadInput(e.to_string()))?;
        }
        engine.settings = req.settings.clone();
        self.runtime
            .check_engine(&engine)
            .await
            .map_err(|e| match e {
                RuntimeError::Setting { .. } | RuntimeError::EngineMissing { .. } => {
                    ControllerError::BadInput(e.to_string())
                }
                other => ControllerError::runtime("cannot check the engine", other),
            })?;
        Ok(engine)
    }

    /// Builds (or finds) the state of `req.steps` and starts an instance of it if asked.
    /// Progress goes to `events`; so does the final `Done` or `Failed`.
    pub async fn prepare(self: &Arc<Self>, req: PrepareRequest, events: Events) {
        match self.prepare_inner(req, &events).await {
            Ok(done) => send(&events, done),
            Err(e) => {
                tracing::warn!(error = %e, "prepare failed");
                send(&events, PrepareEvent::Failed { error: e.to_api() })
            }
        }
    }

    async fn prepare_inner(
        self: &Arc<Self>,
        req: PrepareRequest,
        events: &Events,
    ) -> Result<PrepareEvent, ControllerError> {
        let engine = self.engine_for(&req.engine).await?;
        let mut steps = req.steps;
        if let Some(lb) = &req.liquibase {
            steps.extend(self.plan_liquibase(lb, events).await?);
        }
        let (head, cache_hit) = self.build_steps(&engine, steps, events).await?;
        // Creating an instance counts as the access; a bare prepare counts on its own.
        let instance = if req.create_instance && !events.is_closed() {
            send(events, PrepareEvent::InstanceStarting { state_id: head });
            Some(self.create_instance_of(head).await?)
        } else {
            self.meta.touch_state(&head, now_ms(), None)?;
            None
        };
        Ok(PrepareEvent::Done {
            state_id: head,
            cache_hit,
            instance,
        })
    }

    /// Builds what is missing of the chain of `steps` (a COLD head is restored from its
    /// nearest surviving ancestor, and the progress says so); the head and whether every step
    /// was cached.
    pub(crate) async fn build_steps(
        &self,
        engine: &EngineFingerprint,
        steps: Vec<Step>,
        events: &Events,
    ) -> Result<(StateId, bool), ControllerError> {
        let steps = &steps;
        self.check_inputs(steps)?;
        let chain = chain(engine, steps);
        let total = steps.len();

        // The nearest published ancestor: everything after it is built, nothing before.
        let mut have = None; // index into chain.steps of the last cached step
        for i in (0..total).rev() {
            if self.store.contains(&chain.steps[i]) {
                have = Some(i);
                break;
            }
        }
        let cached = have.map_or(0, |i| i + 1);
        send(
            events,
            PrepareEvent::Plan {
                total,
                cached,
                state_id: chain.head(),
            },
        );
        // What is missing here may be in the bucket: the nearest such state is downloaded.
        let (cached, downloaded) = self.download_nearest(&chain, steps, cached, events).await?;
        if cached > 0 {
            have = Some(cached - 1);
        }
        let restoring = self.restoring_event(&chain, cached)?;
        let rebuild = restoring.is_some();
        if let Some(restoring) = restoring {
            send(events, restoring);
        }
        let built = async {
            // A download is no cache hit: the state was not here.
            let mut built_any = downloaded;
            if have.is_none() {
                built_any |= self.ensure_base(&chain, events).await?;
            }
            for i in cached..total {
                built_any |= self.ensure_step(&chain, steps, i, events).await?;
            }
            Ok::<_, ControllerError>(built_any)
        }
        .await;
        if rebuild {
            self.metrics
                .restored(crate::metrics::RestoreSource::Rebuild, built.is_ok());
        }
        Ok((chain.head(), !built?))
    }

    /// Single-flight: waits for a concurrent build of `id`, and says so.
    pub(crate) async fn lock_build(
        &self,
        id: &StateId,
        index: usize,
        events: &Events,
    ) -> crate::keyed::KeyedGuard<'_, StateId> {
        if let Some(guard) = self.building.try_lock(*id) {
            return guard;
        }
        send(
            events,
            PrepareEvent::Waiting {
                index,
                state_id: *id,
            },
        );
        self.building.lock(*id).await
    }

    /// Creates the base state with initdb if it is missing. True if it built it.
    async fn ensure_base(&self, chain: &Chain, events: &Events) -> Result<bool, ControllerError> {
        let id = chain.base;
        let _guard = self.lock_build(&id, 0, events).await;
        if self.store.contains(&id) {
            return Ok(false);
        }
        let _permit = self.build_permit().await;
        send(events, PrepareEvent::Initdb { state_id: id });
        let started = Instant::now();
        let engine = &chain.engine;
        let engine_json = serde_json::to_string(engine).unwrap_or_default();
        self.record_building(id, None, engine.version(), &engine_json, engine)?;
        let build = match self.store.begin(id, None, None).await {
            Ok(build) => build,
            Err(e) => return Err(self.build_failed(&id, e.into())),
        };
        if let Err(e) = self.runtime.init_data(build.area(), engine).await {
            return Err(self.build_failed(&id, ControllerError::runtime("initdb failed", e)));
        }
        self.publish(build, id, None, started, engine).await?;
        Ok(true)
    }

    /// Builds step `i` (0-based) from its parent's snapshot if it is missing. True if it built.
    async fn ensure_step(
        &self,
        chain: &Chain,
        steps: &[Step],
        i: usize,
        events: &Events,
    ) -> Result<bool, ControllerError> {
        let id = chain.steps[i];
        let parent = chain.parent_of(i);
        let (index, total) = (i + 1, steps.len());
        let step = &steps[i];
        let label = step.label();
        let _guard = self.lock_build(&id, index, events).await;
        if self.store.contains(&id) {
            return Ok(false);
        }
        let _permit = self.build_permit().await;
        self.verify_before_clone(parent).await?;
        send(
            events,
            PrepareEvent::StepStarted {
                index,
                total,
                label: label.clone(),
                state_id: id,
            },
        );
        let started = Instant::now();
        let step_json = serde_json::to_string(step).unwrap_or_default();
        self.record_building(id, Some(parent), label.clone(), &step_json, &chain.engine)?;
        let hold = self.hold_snapshot(parent).await;
        let copying = transfer_reporter(events.clone(), format!("copying {}", parent.short()));
        let begun = self
            .store
            .begin(id, Some(parent), Some(Arc::new(copying)))
            .await;
        drop(hold);
        let build = begun.map_err(|e| self.build_failed(&id, e.into()))?;

        let server = self
            .runtime
            .start_build(id, build.area())
            .await
            .map_err(|e| {
                self.build_failed(
                    &id,
                    ControllerError::runtime(
                        format!("cannot start a server to build {}", id.short()),
                        e,
                    ),
                )
            })?;
        let applied = match step {
            Step::Command(cmd) => {
                self.run_on_client(cmd, index, total, &label, id, server.as_ref(), events)
                    .await
            }
            _ => server.apply(step, &self.blobs).await.map(drop),
        };
        // Stop cleanly either way: a fast shutdown writes a checkpoint, so the published data
        // needs no recovery when an instance starts from it.
        let stopped = server.stop().await;
        if let Err(e) = applied {
            drop(build);
            return Err(self.build_failed(
                &id,
                ControllerError::StepFailed {
                    index,
                    total,
                    label,
                    message: e.to_string(),
                    output: e.output.clone(),
                },
            ));
        }
        if let Err(e) = stopped {
            drop(build);
            return Err(self.build_failed(
                &id,
                ControllerError::runtime(format!("stopping the server of step {index}"), e),
            ));
        }
        self.publish(build, id, Some(parent), started, &chain.engine)
            .await?;
        send(
            events,
            PrepareEvent::StepDone {
                index,
                total,
                state_id: id,
                elapsed_ms: started.elapsed().as_millis() as u64,
            },
        );
        Ok(true)
    }

    /// Records that the build of `id` failed with `e` (which it returns): nothing of it was
    /// published.
    fn build_failed(&self, id: &StateId, e: ControllerError) -> ControllerError {
        self.metrics.build_done(false, 0.0);
        let e = self.name_a_full_disk(e);
        let reason = match &e {
            ControllerError::StepFailed { message, .. } => message.clone(),
            other => other.to_api().message,
        };
        if let Err(meta) = self.record_failed(id, &reason) {
            tracing::warn!(state = %id.short(), error = %meta, "cannot record a failed build");
        }
        e
    }

    /// `e` with the disk under the store named first, when `e` is a write that found no space.
    fn name_a_full_disk(&self, e: ControllerError) -> ControllerError {
        let api = e.to_api();
        let text = format!("{} {}", api.message, api.detail.as_deref().unwrap_or(""));
        if !crate::disk::says_disk_full(&text) {
            return e;
        }
        let store = std::path::PathBuf::from(self.store.describe().location);
        match crate::disk::Disk::of(&store) {
            Some(disk) => ControllerError::DiskFull {
                disk: disk.full_note("the snapshot store", &store),
                cause: Box::new(e),
            },
            None => e,
        }
    }

    async fn publish(
        &self,
        build: Build,
        id: StateId,
        parent: Option<StateId>,
        started: Instant,
        engine: &EngineFingerprint,
    ) -> Result<(), ControllerError> {
        let meta = PublishMeta {
            parent,
            engine: engine.clone(),
            build_cost_ms: started.elapsed().as_millis() as u64,
        };
        let manifest = match self.store.publish(build, meta).await {
            Ok(manifest) => manifest,
            Err(e) => return Err(self.build_failed(&id, e.into())),
        };
        let mut row = self
            .meta
            .state(&id)?
            .ok_or_else(|| ControllerError::Internal(format!("state {} vanished", id.short())))?;
        row.status = StateStatus::Warm;
        row.status_reason = None;
        row.size_bytes = manifest.size_bytes;
        row.build_cost_ms = manifest.build_cost_ms;
        self.meta.upsert_state(&row)?;
        self.meta.event(now_ms(), "built", Some(&id), None, None)?;
        self.metrics
            .build_done(true, started.elapsed().as_secs_f64());
        Ok(())
    }

    fn record_building(
        &self,
        id: StateId,
        parent: Option<StateId>,
        label: String,
        inputs: &str,
        engine: &EngineFingerprint,
    ) -> Result<(), ControllerError> {
        let mut row = self.row_template(id, parent, label, inputs.to_owned(), engine);
        row.status = StateStatus::Building;
        self.meta.upsert_state(&row)?;
        self.meta
            .event(row.created_ms, "building", Some(&id), None, None)?;
        Ok(())
    }

    fn record_failed(&self, id: &StateId, reason: &str) -> Result<(), ControllerError> {
        self.meta
            .set_state_status(id, StateStatus::Failed, Some(reason))?;
        self.meta
            .event(now_ms(), "build_failed", Some(id), None, Some(reason))?;
        Ok(())
    }
}

impl Controller {
    /// Checks, before any work starts, that there are steps and that every file they read is
    /// a stored blob at a place that stays inside its closure.
    pub(crate) fn check_inputs(&self, steps: &[Step]) -> Result<(), ControllerError> {
        if steps.is_empty() {
            return Err(ControllerError::BadInput(
                "nothing to prepare: give at least one -f FILE or -c SQL".into(),
            ));
        }
        for step in steps {
            self.check_files(step)?;
        }
        Ok(())
    }

    /// Every file `step` names is a stored blob at a place inside its closure.
    fn check_files(&self, step: &Step) -> Result<(), ControllerError> {
        for (path, sha256) in step.files() {
            if !crate::blobs::stays_under_root(&path) || path.is_empty() {
                return Err(ControllerError::BadInput(format!(
                    "input {path:?} of step {} leaves its closure's root",
                    step.label()
                )));
            }
            if !self.blobs.contains(sha256) {
                return Err(ControllerError::BadInput(format!(
                    "unknown blob {sha256} ({path}): upload it first (PUT /v1/blobs/{sha256})"
                )));
            }
        }
        Ok(())
    }
}

/// Builds read their steps' input files from the blobs, by hash: the runtime lays each
/// closure out where its psql runs.
impl StepInputs for crate::blobs::BlobStore {
    fn open<'a>(
        &'a self,
        sha256: &'a str,
    ) -> BoxFuture<'a, std::io::Result<Box<dyn tokio::io::AsyncRead + Send + Unpin>>> {
        Box::pin(async move {
            if !crate::blobs::is_sha256(sha256) {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("{sha256:?} does not name a blob"),
                ));
            }
            let file = tokio::fs::File::open(self.path(sha256)).await?;
            Ok(Box::new(file) as Box<dyn tokio::io::AsyncRead + Send + Unpin>)
        })
    }
}

impl Controller {
    /// One step per changeset `lb` would apply to an empty database, with Liquibase's
    /// checksums. The plan of a closure is kept (`<home>/plans`), so an unchanged changelog is
    /// not planned again: no JVM starts for a prepare that is all cached.
    pub(crate) async fn plan_liquibase(
        &self,
        lb: &LiquibaseRequest,
        events: &Events,
    ) -> Result<Vec<Step>, ControllerError> {
        let template = LiquibaseStep {
            id: String::new(),
            author: String::new(),
            file: String::new(),
            checksum: String::new(),
            changelog: lb.changelog.clone(),
            args: lb.args.clone(),
            files: lb.files.clone(),
        };
        let template = Step::Liquibase(template);
        self.check_files(&template)?;
        let key = taidon_core::identity::content_sha256(
            serde_json::to_string(lb).unwrap_or_default().as_bytes(),
        );
        let plans = self.home.root().join("plans");
        let kept = plans.join(format!("{key}.json"));
        let planned: Vec<(String, String, String, String)> = match std::fs::read(&kept)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
        {
            Some(planned) => planned,
            None => {
                send(
                    events,
                    PrepareEvent::Notice {
                        message: format!("planning {} with Liquibase", lb.changelog),
                    },
                );
                let tool = Liquibase::find()
                    .map_err(|e| ControllerError::Tool(e.to_string()))?
                    .with_class_archive(&self.home.root().join("cache"));
                let (_dir, cwd) =
                    lay_out_step(&self.home.root().join("work"), &template, &self.blobs)
                        .await
                        .map_err(ControllerError::Internal)?;
                let plan = tool
                    .plan(&cwd, &lb.changelog, &lb.args)
                    .await
                    .map_err(|e| match e {
                        LiquibaseError::Failed { message, output } => ControllerError::ToolInput {
                            message: format!(
                                "{}: Liquibase cannot plan it: {message}",
                                lb.changelog
                            ),
                            output,
                        },
                        LiquibaseError::NotFound { .. } | LiquibaseError::NoJava => {
                            ControllerError::Tool(e.to_string())
                        }
                        other => ControllerError::Internal(other.to_string()),
                    })?;
                let planned: Vec<_> = plan
                    .into_iter()
                    .map(|c| (c.id, c.author, c.file, c.checksum))
                    .collect();
                let json = serde_json::to_vec(&planned).unwrap_or_default();
                if let Err(e) = std::fs::create_dir_all(&plans)
                    .and_then(|()| crate::home::write_atomic(&kept, &json, 0o600))
                {
                    tracing::warn!(error = %e, "cannot keep a Liquibase plan");
                }
                planned
            }
        };
        if planned.is_empty() {
            return Err(ControllerError::BadInput(format!(
                "{}: Liquibase finds no changeset to apply",
                lb.changelog
            )));
        }
        Ok(planned
            .into_iter()
            .map(|(id, author, file, checksum)| {
                Step::Liquibase(LiquibaseStep {
                    id,
                    author,
                    file,
                    checksum,
                    changelog: lb.changelog.clone(),
                    args: lb.args.clone(),
                    files: lb.files.clone(),
                })
            })
            .collect())
    }
}

impl Controller {
    /// The states `req` would make, where each is cached, and why each hits or misses.
    /// Nothing is built (a Liquibase changelog is planned, offline, if its plan is not kept).
    pub async fn plan(&self, req: PrepareRequest) -> Result<taidon_api::Plan, ControllerError> {
        let engine = self.engine_for(&req.engine).await?;
        let mut steps = req.steps;
        if let Some(lb) = &req.liquibase {
            let (quiet, _) = tokio::sync::mpsc::unbounded_channel();
            steps.extend(self.plan_liquibase(lb, &quiet).await?);
        }
        let chain = chain(&engine, &steps);
        let rows: std::collections::HashMap<StateId, crate::meta::StateRow> = self
            .meta
            .states()?
            .into_iter()
            .map(|r| (r.state_id, r))
            .collect();
        let mut where_is = Vec::with_capacity(steps.len() + 1);
        for id in std::iter::once(chain.base).chain(chain.steps.iter().copied()) {
            let local = self.store.contains(&id);
            let remote = match self.store.remote() {
                Some(r) => r.contains(id).await.unwrap_or(false),
                None => false,
            };
            where_is.push(match (local, remote) {
                (true, true) => "local+remote",
                (true, false) => "local",
                (false, true) => "remote",
                (false, false) => "missing",
            });
        }
        let cached = |id: &StateId| self.store.contains(id);
        let mut out = Vec::with_capacity(steps.len() + 1);
        let base_why = if where_is[0] != "missing" {
            "cached".to_owned()
        } else {
            // The nearest cached base: the one used last.
            let other = rows
                .values()
                .filter(|r| r.parent.is_none() && cached(&r.state_id))
                .max_by_key(|r| r.last_access_ms)
                .and_then(|r| {
                    serde_json::from_str::<EngineFingerprint>(&r.inputs_fingerprint).ok()
                });
            match other {
                Some(o) => taidon_core::explain::engine_difference(&o, &engine),
                None => format!("no base is cached: initdb of {}", engine_text(&engine)),
            }
        };
        out.push(taidon_api::PlannedStep {
            index: 0,
            label: engine_text(&engine),
            state_id: chain.base,
            cached: where_is[0].to_owned(),
            why: base_why,
        });
        for (i, step) in steps.iter().enumerate() {
            let id = chain.steps[i];
            let parent = chain.parent_of(i);
            let why = if where_is[i + 1] != "missing" {
                "cached".to_owned()
            } else if where_is[i] == "missing" {
                if i == 0 {
                    "its base is not cached".to_owned()
                } else {
                    format!("its parent (step {i}) is not cached")
                }
            } else {
                let sibling = rows
                    .values()
                    .filter(|r| r.parent == Some(parent) && r.state_id != id && cached(&r.state_id))
                    .max_by_key(|r| r.last_access_ms)
                    .and_then(|r| serde_json::from_str::<Step>(&r.inputs_fingerprint).ok());
                match sibling {
                    Some(s) => taidon_core::explain::step_difference(&s, step),
                    None => "nothing was built on its parent before".to_owned(),
                }
            };
            out.push(taidon_api::PlannedStep {
                index: i + 1,
                label: step.label(),
                state_id: id,
                cached: where_is[i + 1].to_owned(),
                why,
            });
        }
        Ok(taidon_api::Plan {
            engine: engine_text(&engine),
            steps: out,
        })
    }
}

/// "PostgreSQL 15.18" and its settings.
fn engine_text(engine: &EngineFingerprint) -> String {
    let mut text = engine.version();
    if !engine.settings.is_empty() {
        let settings: Vec<String> = engine
            .settings
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        text.push_str(&format!(" ({})", settings.join(", ")));
    }
    text
}

/// A build server opened to the client that runs its step's command.
pub(crate) struct ClientBuild {
    state: StateId,
    target: taidon_api::Target,
    done: Option<tokio::sync::oneshot::Sender<CommandDone>>,
}

/// How often a build waiting for a client's command checks that the client is still there.
const HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(5);

/// How long a client's command may run before its build is given up.
const CLIENT_COMMAND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(6 * 3600);

impl Controller {
    /// Step `index` is `cmd`, which the client runs: the build server is opened to it through
    /// the gateway with a token for this build only, and the step ends when the client says
    /// how its command ended (or leaves, or takes longer than the timeout).
    #[allow(clippy::too_many_arguments)]
    async fn run_on_client(
        &self,
        cmd: &CommandStep,
        index: usize,
        total: usize,
        label: &str,
        id: StateId,
        server: &dyn taidon_runtime::BuildServer,
        events: &Events,
    ) -> Result<(), StepError> {
        let (endpoint, password) = server
            .open_to_client()
            .await
            .map_err(|e| StepError::setup(format!("cannot open the build server: {e}")))?;
        let build = taidon_core::InstanceId::from_bytes(rand::random());
        let (tx, rx) = tokio::sync::oneshot::channel();
        lock(&self.client_builds).insert(
            build,
            ClientBuild {
                state: id,
                target: taidon_api::Target {
                    instance_id: build,
                    host: endpoint.host,
                    port: endpoint.port,
                    user: crate::instances::INSTANCE_USER.into(),
                    password,
                },
                done: Some(tx),
            },
        );
        let outcome = async {
            let keys = self.keys.get();
            let now_s = now_ms() / 1000;
            let mut claims = keys.claims_for(
                id,
                taidon_core::token::Scope::Rw,
                now_s,
                CLIENT_COMMAND_TIMEOUT.as_secs(),
            );
            claims.iid = Some(build);
            let token = keys
                .sign(&claims)
                .map_err(|e| StepError::setup(format!("cannot sign a build token: {e}")))?;
            send(
                events,
                PrepareEvent::RunCommand {
                    index,
                    total,
                    label: label.to_owned(),
                    state_id: id,
                    build,
                    argv: cmd.argv.clone(),
                    dsn: self.dsn_for(&token),
                },
            );
            let deadline = tokio::time::sleep(CLIENT_COMMAND_TIMEOUT);
            tokio::pin!(deadline);
            tokio::pin!(rx);
            let mut beat = tokio::time::interval(HEARTBEAT);
            let done = loop {
                tokio::select! {
                    done = &mut rx => {
                        break done.map_err(|_| StepError::setup("the build was abandoned".into()))?
                    }
                    () = events.closed() => {
                        return Err(StepError::setup("the client left before its command ended".into()))
                    }
                    () = &mut deadline => {
                        return Err(StepError::setup("the client's command did not end in time".into()))
                    }
                    _ = beat.tick() => send(events, PrepareEvent::Heartbeat {}),
                }
            };
            if done.exit_code != 0 {
                return Err(StepError {
                    message: format!("`{}` exited with {}", cmd.argv.join(" "), done.exit_code),
                    output: done.output,
                    exit_code: Some(done.exit_code),
                });
            }
            Ok(())
        }
        .await;
        lock(&self.client_builds).remove(&build);
        let closed = server.close_to_client().await;
        outcome?;
        closed.map_err(|e| StepError::setup(format!("cannot close the build server: {e}")))
    }

    /// The client's report on its command for `build`.
    pub fn command_done(
        &self,
        build: taidon_core::InstanceId,
        done: CommandDone,
    ) -> Result<(), ControllerError> {
        let tx = lock(&self.client_builds)
            .get_mut(&build)
            .and_then(|b| b.done.take())
            .ok_or_else(|| {
                ControllerError::NotFound(format!("no build {build} waits for a command"))
            })?;
        let _ = tx.send(done);
        Ok(())
    }

    /// Where the gateway reaches the build server of `build`, for a token of that build.
    pub(crate) fn client_build_target(
        &self,
        build: &taidon_core::InstanceId,
        state: &StateId,
    ) -> Option<taidon_api::Target> {
        lock(&self.client_builds)
            .get(build)
            .filter(|b| b.state == *state)
            .map(|b| b.target.clone())
    }
}
