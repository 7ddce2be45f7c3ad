//! The prepare engine: find the nearest existing ancestor of the wanted state, then build each
//! missing step on a clone of its parent and publish it as a checkpoint.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use taidon_api::{PrepareEvent, PrepareRequest, StateStatus};
use taidon_core::plan::{chain, Chain};
use taidon_core::{PsqlInput, StateId, Step};
use taidon_runtime::{Server, ServerConfig};
use taidon_store::{PublishMeta, SnapshotStore};
use tokio::sync::mpsc;

use crate::meta::StateRow;
use crate::{now_ms, Controller, ControllerError};

/// Where progress events go. A closed receiver (the client left) does not stop a build: its
/// result is cached for the next prepare.
pub(crate) type Events = mpsc::UnboundedSender<PrepareEvent>;

fn send(events: &Events, event: PrepareEvent) {
    let _ = events.send(event);
}

/// How often a long copy reports its bytes.
const TRANSFER_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// A store progress callback that sends `Transfer` events, at most one per `TRANSFER_EVERY`
/// and always the last.
fn transfer_reporter(events: Events, what: String) -> impl Fn(u64, u64) + Send + Sync {
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
        let (head, cache_hit) = self.build_steps(req.steps, events).await?;
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
        steps: Vec<Step>,
        events: &Events,
    ) -> Result<(StateId, bool), ControllerError> {
        let steps = &steps;
        self.check_inputs(steps)?;
        let chain = chain(&self.engine.fingerprint, steps);
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
        if let Some(restoring) = self.restoring_event(&chain, cached)? {
            send(events, restoring);
        }
        let mut built_any = false;
        if have.is_none() {
            built_any |= self.ensure_base(&chain, events).await?;
        }
        for i in cached..total {
            built_any |= self.ensure_step(&chain, steps, i, events).await?;
        }
        Ok((chain.head(), !built_any))
    }

    /// Single-flight: waits for a concurrent build of `id`, and says so.
    async fn lock_build(
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
        let engine_json = serde_json::to_string(&self.engine.fingerprint).unwrap_or_default();
        self.record_building(id, None, self.engine.fingerprint.version(), &engine_json)?;
        let build = self.blocking(move |s| s.begin(&id, None)).await?;
        if let Err(e) = self
            .engine
            .initdb(build.data_dir(), self.run_as.as_ref())
            .await
        {
            self.record_failed(&id, &e.to_string())?;
            return Err(ControllerError::runtime("initdb failed", e));
        }
        self.publish(build, id, None, started).await?;
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
        self.record_building(id, Some(parent), label.clone(), &step_json)?;
        let hold = self.hold_snapshot(parent).await;
        let copying = transfer_reporter(events.clone(), format!("copying {}", parent.short()));
        let build = self
            .blocking(move |s| s.begin_reporting(&id, Some(&parent), &copying))
            .await?;
        drop(hold);

        let server = self.start_build_server(build.data_dir(), &id).await?;
        let Step::Psql(psql) = step;
        let applied = match self.lay_out(psql) {
            Ok(work) => {
                let cwd = work.path().join(workdir_of(psql));
                taidon_runtime::run_psql_step(&self.engine, &server, psql, &cwd).await
            }
            Err(e) => Err(taidon_runtime::StepError {
                message: e.to_string(),
                output: String::new(),
                exit_code: None,
            }),
        };
        // Stop cleanly either way: a fast shutdown writes a checkpoint, so the published data
        // directory needs no recovery when an instance starts from it.
        let stopped = server.stop().await;
        if let Err(e) = applied {
            drop(build);
            self.record_failed(&id, &e.to_string())?;
            return Err(ControllerError::StepFailed {
                index,
                total,
                label,
                message: e.to_string(),
                output: e.output.clone(),
            });
        }
        stopped.map_err(|e| {
            ControllerError::runtime(format!("stopping the server of step {index}"), e)
        })?;
        self.publish(build, id, Some(parent), started).await?;
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

    async fn start_build_server(
        &self,
        data_dir: &Path,
        id: &StateId,
    ) -> Result<Server, ControllerError> {
        let socket_dir =
            self.home
                .run_dir()
                .join(format!("b-{}-{:08x}", id.short(), rand::random::<u32>()));
        let config = ServerConfig {
            data_dir: data_dir.to_path_buf(),
            socket_dir,
            tcp: false,
            port: None,
            log_file: self.home.logs().join("builds").join(format!("{id}.log")),
        };
        self.engine
            .start(config, self.run_as.as_ref())
            .await
            .map_err(|e| {
                ControllerError::runtime(
                    format!("cannot start a server to build {}", id.short()),
                    e,
                )
            })
    }

    async fn publish(
        &self,
        build: taidon_store::Build,
        id: StateId,
        parent: Option<StateId>,
        started: Instant,
    ) -> Result<(), ControllerError> {
        let meta = PublishMeta {
            parent,
            engine: self.engine.fingerprint.clone(),
            build_cost_ms: started.elapsed().as_millis() as u64,
        };
        let manifest = self.blocking(move |s| s.publish(build, meta)).await?;
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
        Ok(())
    }

    fn record_building(
        &self,
        id: StateId,
        parent: Option<StateId>,
        label: String,
        inputs: &str,
    ) -> Result<(), ControllerError> {
        let now = now_ms();
        self.meta.upsert_state(&StateRow {
            state_id: id,
            parent,
            label,
            inputs_fingerprint: inputs.to_owned(),
            engine_fingerprint: serde_json::to_string(&self.engine.fingerprint).unwrap_or_default(),
            status: StateStatus::Building,
            status_reason: None,
            size_bytes: 0,
            build_cost_ms: 0,
            restore_cost_ms: 0,
            created_ms: now,
            last_access_ms: now,
            access_count: 0,
        })?;
        self.meta.event(now, "building", Some(&id), None, None)?;
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

/// Where psql runs for `psql`, relative to its closure's root.
fn workdir_of(psql: &taidon_core::PsqlStep) -> &str {
    match &psql.input {
        PsqlInput::File { workdir, .. } => workdir,
        PsqlInput::Command { .. } => "",
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
            let Step::Psql(psql) = step;
            for (path, sha256) in psql.input.files() {
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
        }
        Ok(())
    }

    /// A fresh directory with the closure of `psql` laid out in it, removed when dropped.
    fn lay_out(&self, psql: &taidon_core::PsqlStep) -> Result<tempfile::TempDir, ControllerError> {
        let parent = self.home.root().join("work");
        std::fs::create_dir_all(&parent)
            .map_err(|e| ControllerError::io(format!("cannot create {}", parent.display()), e))?;
        let dir = tempfile::Builder::new()
            .prefix("step-")
            .tempdir_in(&parent)
            .map_err(|e| ControllerError::io("cannot make a step's work directory", e))?;
        let root = dir.path();
        std::fs::create_dir_all(root.join(workdir_of(psql)))
            .map_err(|e| ControllerError::io("cannot make a step's work directory", e))?;
        self.blobs
            .lay_out(root, &psql.input.files())
            .map_err(|e| ControllerError::io("cannot lay out a step's input files", e))?;
        Ok(dir)
    }
}
