//! The bucket behind the snapshot store, as the controller uses it: a prepare that misses
//! locally downloads the nearest state the bucket has before it builds anything; `push`
//! uploads now; a slower loop keeps the bucket under its capacity and collects its garbage.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use taidon_api::{PrepareEvent, Pushed, RemoteInfo, StateStatus};
use taidon_core::plan::Chain;
use taidon_core::policy::{self, PinState, Presence, Ranking, StateFacts};
use taidon_core::{EngineFingerprint, StateId, Step};
use taidon_store::StoreError;

use crate::meta::StateRow;
use crate::prepare::{send, transfer_reporter, Events};
use crate::{now_ms, Controller, ControllerError};

/// Where a state's snapshot is, for `ls`.
pub(crate) fn location(local: bool, remote: bool) -> &'static str {
    match (local, remote) {
        (true, true) => "local+remote",
        (true, false) => "local",
        (false, true) => "remote",
        (false, false) => "-",
    }
}

/// True when a failed download failed for want of local room: building would fail the same
/// way, so the prepare stops with that error.
fn local_disk_full(e: &StoreError) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if matches!(
                io.raw_os_error(),
                Some(libc::ENOSPC | libc::EDQUOT | libc::EROFS)
            ) {
                return true;
            }
        }
        cur = err.source();
    }
    false
}

/// An error and its causes on one line.
fn chain_text(e: &dyn std::error::Error) -> String {
    crate::config::error_chain(e)
}

impl Controller {
    /// Before building the chain's missing steps (`cached` of them are local), downloads the
    /// nearest one the bucket has (or the base). How many steps are local afterwards, and
    /// whether it downloaded one.
    pub(crate) async fn download_nearest(
        &self,
        chain: &Chain,
        steps: &[Step],
        cached: usize,
        events: &Events,
    ) -> Result<(usize, bool), ControllerError> {
        let Some(remote) = self.store.remote() else {
            return Ok((cached, false));
        };
        let total = steps.len();
        // Step i is index i + 1; the base is index 0.
        let mut candidates: Vec<usize> = (cached + 1..=total).rev().collect();
        if cached == 0 && !self.store.contains(&chain.base) {
            candidates.push(0);
        }
        for index in candidates {
            let id = if index == 0 {
                chain.base
            } else {
                chain.steps[index - 1]
            };
            match remote.contains(id).await {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => {
                    tracing::warn!(error = %chain_text(&e), "the bucket cannot be searched; building locally");
                    return Ok((cached, false));
                }
            }
            let template = if index == 0 {
                let engine = &chain.engine;
                self.row_template(
                    id,
                    None,
                    engine.version(),
                    serde_json::to_string(engine).unwrap_or_default(),
                    engine,
                )
            } else {
                let step = &steps[index - 1];
                self.row_template(
                    id,
                    Some(chain.parent_of(index - 1)),
                    step.label(),
                    serde_json::to_string(step).unwrap_or_default(),
                    &chain.engine,
                )
            };
            if self.download(template, index, events).await? {
                return Ok((index.max(cached), true));
            }
        }
        Ok((cached, false))
    }

    /// A new metadata row (COLD, used now) for a state about to be built or downloaded.
    pub(crate) fn row_template(
        &self,
        id: StateId,
        parent: Option<StateId>,
        label: String,
        inputs: String,
        engine: &EngineFingerprint,
    ) -> StateRow {
        let now = now_ms();
        StateRow {
            state_id: id,
            parent,
            label,
            inputs_fingerprint: inputs,
            engine_fingerprint: serde_json::to_string(engine).unwrap_or_default(),
            status: StateStatus::Cold,
            status_reason: None,
            size_bytes: 0,
            build_cost_ms: 0,
            restore_cost_ms: 0,
            created_ms: now,
            last_access_ms: now,
            access_count: 0,
        }
    }

    /// Downloads the state of `template` from the bucket and publishes it here; false when
    /// the bucket's copy cannot be used (absent, corrupt, unreachable): the caller builds.
    async fn download(
        &self,
        template: StateRow,
        index: usize,
        events: &Events,
    ) -> Result<bool, ControllerError> {
        let Some(remote) = self.store.remote() else {
            return Ok(false);
        };
        let id = template.state_id;
        let _guard = self.lock_build(&id, index, events).await;
        if self.store.contains(&id) {
            return Ok(true);
        }
        let _permit = self.build_permit().await;
        let url = remote.url();
        send(
            events,
            PrepareEvent::Downloading {
                index,
                state_id: id,
                from: url.clone(),
            },
        );
        let started = Instant::now();
        let reporter = transfer_reporter(events.clone(), format!("downloading {}", id.short()));
        let fetched = self.store.fetch(id, Some(Arc::new(reporter))).await;
        // A state the bucket does not have was never a restore.
        if !matches!(fetched, Err(StoreError::UnknownState(_))) {
            self.metrics
                .restored(crate::metrics::RestoreSource::Remote, fetched.is_ok());
        }
        match fetched {
            Ok(manifest) => {
                let elapsed_ms = started.elapsed().as_millis() as u64;
                let mut row = self.meta.state(&id)?.unwrap_or(template);
                row.status = StateStatus::Warm;
                row.status_reason = None;
                row.size_bytes = manifest.size_bytes;
                row.build_cost_ms = manifest.build_cost_ms;
                row.restore_cost_ms = elapsed_ms;
                self.meta.upsert_state(&row)?;
                self.meta.event(
                    now_ms(),
                    "downloaded",
                    Some(&id),
                    None,
                    Some(&format!(
                        "from {url}: {} bytes in {elapsed_ms} ms",
                        manifest.size_bytes
                    )),
                )?;
                send(
                    events,
                    PrepareEvent::Downloaded {
                        index,
                        state_id: id,
                        bytes: manifest.size_bytes,
                        elapsed_ms,
                    },
                );
                Ok(true)
            }
            Err(StoreError::UnknownState(_)) => Ok(false),
            Err(StoreError::Corrupt { what, .. }) => {
                self.meta
                    .event(now_ms(), "checksum_mismatch", Some(&id), None, Some(&what))?;
                send(
                    events,
                    PrepareEvent::Notice {
                        message: format!(
                            "state {} in {url}: checksum mismatch ({what}); not used, rebuilding it",
                            id.short()
                        ),
                    },
                );
                Ok(false)
            }
            Err(e) if local_disk_full(&e) => {
                let why = chain_text(&e);
                self.meta
                    .event(now_ms(), "download_failed", Some(&id), None, Some(&why))?;
                Err(e.into())
            }
            Err(e) => {
                let why = chain_text(&e);
                self.meta
                    .event(now_ms(), "download_failed", Some(&id), None, Some(&why))?;
                send(
                    events,
                    PrepareEvent::Notice {
                        message: format!("{why}; building state {} instead", id.short()),
                    },
                );
                Ok(false)
            }
        }
    }

    /// Makes the snapshot of a known state local: downloaded if the bucket has it, else
    /// rebuilt from its nearest surviving ancestor.
    pub(crate) async fn ensure_local(
        self: &Arc<Self>,
        id: StateId,
        events: &Events,
    ) -> Result<(), ControllerError> {
        if self.store.contains(&id) {
            return Ok(());
        }
        if let (Some(remote), Some(row)) = (self.store.remote(), self.meta.state(&id)?) {
            if remote.contains(id).await.unwrap_or(false) && self.download(row, 0, events).await? {
                return Ok(());
            }
        }
        self.restore_state(id, events).await
    }

    /// `POST /v1/states/{id}/push`: uploads a state's snapshot now and waits.
    pub async fn push_state(&self, typed: &str) -> Result<Pushed, ControllerError> {
        let id = self.state_by_prefix(typed)?;
        let remote = self.store.remote().ok_or_else(|| {
            ControllerError::BadInput(format!(
                "no object storage is configured: add [store.remote] to {}",
                self.home.root().join("config.toml").display()
            ))
        })?;
        let url = remote.url();
        if !self.store.contains(&id) {
            if remote.contains(id).await? {
                return Ok(Pushed {
                    state_id: id,
                    url,
                    chunks_uploaded: 0,
                    chunks_skipped: 0,
                    bytes_uploaded: 0,
                    already_there: true,
                });
            }
            return Err(ControllerError::NotFound(format!(
                "state {} has no snapshot here to upload (it is {})",
                id.short(),
                self.meta
                    .state(&id)?
                    .map_or_else(|| "unknown".to_owned(), |r| r.status.to_string())
            )));
        }
        let report = remote.push(id).await?;
        self.meta.event(
            now_ms(),
            "pushed",
            Some(&id),
            None,
            Some(&format!(
                "to {url}: {} chunks, {} bytes",
                report.chunks_uploaded, report.bytes_uploaded
            )),
        )?;
        Ok(Pushed {
            state_id: id,
            url,
            chunks_uploaded: report.chunks_uploaded,
            chunks_skipped: report.chunks_skipped,
            bytes_uploaded: report.bytes_uploaded,
            already_there: !report.manifest_created,
        })
    }

    /// The bucket's part of `status`: probed now.
    pub(crate) async fn remote_info(&self) -> Option<RemoteInfo> {
        let remote = self.store.remote()?;
        let s = remote.status().await;
        let capacity_bytes = self
            .lifecycle
            .config
            .store
            .remote
            .as_ref()
            .and_then(|r| r.limits())
            .map_or(0, |l| l.high_water_bytes);
        Some(RemoteInfo {
            url: s.url,
            reachable: s.reachable,
            error: s.error,
            pending_uploads: s.pending_uploads,
            bytes: s.bytes,
            snapshots: s.snapshots,
            capacity_bytes,
        })
    }

    /// The states the bucket is known to hold (as last seen), for `ls`.
    pub(crate) fn remote_known(&self) -> HashSet<StateId> {
        self.store.remote().map(|r| r.known()).unwrap_or_default()
    }

    /// Starts the bucket's own loop (remote eviction, chunk collection), if there is a bucket.
    pub(crate) fn spawn_remote_loop(self: &Arc<Self>) {
        let Some(config) = self.lifecycle.config.store.remote.clone() else {
            return;
        };
        let this = Arc::downgrade(self);
        let every = Duration::from_secs(config.gc_every_s);
        let stop = self.shutdown_requested();
        self.spawn(async move {
            tokio::pin!(stop);
            loop {
                tokio::select! {
                    () = &mut stop => return,
                    () = tokio::time::sleep(every) => {}
                }
                let Some(ctl) = this.upgrade() else { return };
                if let Err(e) = ctl.remote_pass().await {
                    tracing::warn!(error = %chain_text(&e), "remote store pass failed");
                }
            }
        });
    }

    /// One pass over the bucket: evicts by retention score while it is over its capacity,
    /// then deletes the chunks no manifest needs (past the grace period).
    pub async fn remote_pass(&self) -> Result<(), ControllerError> {
        let (Some(remote), Some(config)) = (
            self.store.remote(),
            self.lifecycle.config.store.remote.as_ref(),
        ) else {
            return Ok(());
        };
        if let Some(limits) = config.limits() {
            let status = remote.status().await;
            if status.reachable && status.bytes > limits.high_water_bytes {
                self.evict_remote(status.bytes, &limits).await?;
            }
        }
        let report = remote
            .collect_garbage(Duration::from_secs(config.gc_grace_s))
            .await?;
        if report.chunks_deleted > 0 {
            tracing::info!(
                deleted = report.chunks_deleted,
                bytes = report.bytes_deleted,
                "collected unreferenced chunks"
            );
            self.meta.event(
                now_ms(),
                "remote_gc",
                None,
                None,
                Some(&format!(
                    "{} chunks ({} bytes) deleted, {} kept in the grace period",
                    report.chunks_deleted, report.bytes_deleted, report.chunks_in_grace
                )),
            )?;
        }
        Ok(())
    }

    /// Deletes the bucket's lowest-scored snapshots (pins kept) until under its low water.
    async fn evict_remote(
        &self,
        used: u64,
        limits: &policy::StoreLimits,
    ) -> Result<(), ControllerError> {
        let Some(remote) = self.store.remote() else {
            return Ok(());
        };
        let manifests = remote.list().await?;
        let logical: u64 = manifests.iter().map(|m| m.size_bytes).sum::<u64>().max(1);
        // Sizes scaled so that they sum to the bucket's bytes (chunks are compressed and
        // shared).
        let scale = used as f64 / logical as f64;
        let local: std::collections::HashMap<StateId, StateFacts<StateId>> =
            self.state_facts()?.into_iter().map(|f| (f.id, f)).collect();
        let facts: Vec<StateFacts<StateId>> = manifests
            .iter()
            .map(|m| {
                let known = local.get(&m.state_id);
                StateFacts {
                    id: m.state_id,
                    parent: m.parent,
                    presence: Presence::Warm,
                    size_bytes: (m.size_bytes as f64 * scale) as u64,
                    build_cost_ms: m.build_cost_ms,
                    access_count: known.map_or(0, |f| f.access_count),
                    last_access_ms: known.map_or(m.created_ms, |f| f.last_access_ms),
                    pin: known.map_or(PinState::None, |f| f.pin),
                    in_use: false,
                }
            })
            .collect();
        let victims = policy::choose_evictions(
            &facts,
            used,
            limits,
            &self.lifecycle.config.policy.weights,
            Ranking::Score,
            self.now(),
        );
        let reason = format!(
            "evicted from the bucket: over {} MiB",
            limits.high_water_bytes / (1024 * 1024)
        );
        for id in victims {
            if let Err(e) = remote.remove(id).await {
                tracing::warn!(state = %id.short(), error = %chain_text(&e), "cannot evict from the bucket");
                continue;
            }
            self.meta
                .event(now_ms(), "evicted_remote", Some(&id), None, Some(&reason))?;
            if !self.store.contains(&id) {
                if let Some(row) = self.meta.state(&id)? {
                    if row.status == StateStatus::Warm {
                        self.meta
                            .set_state_status(&id, StateStatus::Cold, Some(&reason))?;
                    }
                }
            }
        }
        Ok(())
    }

    /// After a local eviction: true (and the state stays WARM) if the bucket has the state.
    pub(crate) async fn kept_in_bucket(&self, id: &StateId) -> bool {
        match self.store.remote() {
            Some(remote) => remote.contains(*id).await.unwrap_or(false),
            None => false,
        }
    }
}
