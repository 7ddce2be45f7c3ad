//! `POST /v1/fsck`: the store checked against the metadata, and damaged snapshots taken out
//! of use. A snapshot whose data no longer has its manifest's checksum is quarantined (moved
//! aside by the store, never deleted) and its state becomes COLD, to be rebuilt from its
//! nearest surviving ancestor when next asked for. With `[store] verify`, the same check runs
//! before every clone of a snapshot.
//!
//! The check leaves running work alone: a state whose build lock is held (a build, a removal,
//! an eviction) is skipped, and so is an instance being started.

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Instant;

use taidon_api::{Finding, FindingKind, FsckReport, StateStatus};
use taidon_core::{InstanceId, StateId};
use taidon_store::{Manifest, StoreError};

use crate::meta::StateRow;
use crate::{lock, now_ms, Controller, ControllerError};

/// The instances being started now: their data exists before their row does.
#[derive(Default)]
pub(crate) struct Starting(StdMutex<HashSet<InstanceId>>);

/// Counts an instance as starting until dropped.
pub(crate) struct StartingGuard<'a> {
    set: &'a Starting,
    iid: InstanceId,
}

impl Starting {
    pub(crate) fn start(&self, iid: InstanceId) -> StartingGuard<'_> {
        lock(&self.0).insert(iid);
        StartingGuard { set: self, iid }
    }

    fn snapshot(&self) -> HashSet<InstanceId> {
        lock(&self.0).clone()
    }
}

impl Drop for StartingGuard<'_> {
    fn drop(&mut self) {
        lock(&self.set.0).remove(&self.iid);
    }
}

/// The metadata row of a snapshot the metadata lost: what its manifest says.
pub(crate) fn recovered_row(m: &Manifest, now: u64) -> StateRow {
    StateRow {
        state_id: m.state_id,
        parent: m.parent,
        label: "(recovered)".into(),
        inputs_fingerprint: String::new(),
        engine_fingerprint: serde_json::to_string(&m.engine).unwrap_or_default(),
        status: StateStatus::Warm,
        status_reason: None,
        size_bytes: m.size_bytes,
        build_cost_ms: m.build_cost_ms,
        restore_cost_ms: 0,
        created_ms: m.created_ms,
        last_access_ms: now,
        access_count: 0,
    }
}

fn finding(kind: FindingKind, detail: impl Into<String>) -> Finding {
    Finding {
        kind,
        state_id: None,
        instance_id: None,
        path: None,
        detail: detail.into(),
        repaired: false,
    }
}

/// `path` relative to `home` when under it, as people read it in a report.
fn shown(home: &Path, path: &str) -> String {
    Path::new(path)
        .strip_prefix(home)
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| path.to_owned())
}

impl Controller {
    /// With `[store] verify`, checks `id`'s snapshot before it is cloned: a damaged one is
    /// quarantined (its state COLD) and the clone refused with a checksum mismatch.
    pub(crate) async fn verify_before_clone(&self, id: StateId) -> Result<(), ControllerError> {
        if !self.lifecycle.config.store.verify {
            return Ok(());
        }
        let started = Instant::now();
        let Some(verified) = self.store.verify(id).await? else {
            return Ok(());
        };
        tracing::debug!(state = %id.short(), bytes = verified.bytes_read,
            ms = started.elapsed().as_millis() as u64, "snapshot verified");
        if verified.intact {
            return Ok(());
        }
        let moved = self.quarantine_snapshot(id, &verified.detail).await?;
        let what = match moved {
            Some(_) => format!(
                "{}; the snapshot is quarantined and the state rebuilt when next asked for",
                verified.detail
            ),
            None => verified.detail,
        };
        Err(StoreError::Corrupt { state: id, what }.into())
    }

    /// Moves `id`'s damaged snapshot to the store's quarantine and records the state COLD,
    /// with an event; where the snapshot went (`None` when the store cannot quarantine).
    pub(crate) async fn quarantine_snapshot(
        &self,
        id: StateId,
        detail: &str,
    ) -> Result<Option<String>, ControllerError> {
        let Some(place) = self.store.quarantine(id).await? else {
            return Ok(None);
        };
        let reason = format!(
            "snapshot damaged (checksum mismatch: {detail}); quarantined, rebuilt when asked for"
        );
        if self.meta.state(&id)?.is_some() {
            self.meta
                .set_state_status(&id, StateStatus::Cold, Some(&reason))?;
        }
        self.meta.event(
            now_ms(),
            "snapshot_quarantined",
            Some(&id),
            None,
            Some(&format!("{reason}; moved to {place}")),
        )?;
        self.metrics.quarantined();
        tracing::warn!(state = %id.short(), %place, "damaged snapshot quarantined");
        Ok(Some(place))
    }

    /// Checks every snapshot's checksum, every manifest against the metadata, and the store's
    /// and the instances' directories; with `repair`, fixes what can be fixed.
    pub async fn fsck(self: &Arc<Self>, repair: bool) -> Result<FsckReport, ControllerError> {
        let started = Instant::now();
        let mut report = FsckReport {
            repair,
            ..Default::default()
        };
        let quarantined = self.check_snapshots(repair, &mut report).await?;
        self.check_states(repair, &quarantined, &mut report).await?;
        self.check_store_strays(repair, &mut report).await?;
        self.check_instances(repair, &mut report).await?;
        report.elapsed_ms = started.elapsed().as_millis() as u64;
        self.meta.event(
            now_ms(),
            "fsck",
            None,
            None,
            Some(&format!(
                "{} snapshot(s) checked, {} finding(s), {} not repaired",
                report.snapshots_checked,
                report.findings.len(),
                report.unrepaired()
            )),
        )?;
        Ok(report)
    }

    /// Checksums, and manifests the metadata has no row for; the states quarantined.
    async fn check_snapshots(
        &self,
        repair: bool,
        report: &mut FsckReport,
    ) -> Result<HashSet<StateId>, ControllerError> {
        let mut quarantined = HashSet::new();
        let manifests = self.store.list().await?;
        let known: HashSet<StateId> = self.meta.states()?.iter().map(|r| r.state_id).collect();
        for m in manifests {
            let id = m.state_id;
            // A build, a removal or an eviction of it is under way: not ours to judge now.
            let Some(_guard) = self.building.try_lock(id) else {
                report.snapshots_skipped += 1;
                continue;
            };
            match self.store.verify(id).await {
                Ok(Some(v)) => {
                    report.snapshots_checked += 1;
                    report.bytes_read += v.bytes_read;
                    if !v.intact {
                        let mut f = finding(FindingKind::ChecksumMismatch, v.detail.clone());
                        f.state_id = Some(id);
                        if repair {
                            match self.quarantine_snapshot(id, &v.detail).await {
                                Ok(Some(place)) => {
                                    f.repaired = true;
                                    f.path = Some(shown(self.home.root(), &place));
                                    f.detail.push_str("; quarantined, the state is COLD");
                                    quarantined.insert(id);
                                }
                                Ok(None) => f.detail.push_str("; this store cannot quarantine"),
                                Err(e) => f.detail.push_str(&format!(
                                    "; cannot quarantine: {}",
                                    e.to_api().message
                                )),
                            }
                        }
                        report.findings.push(f);
                        if quarantined.contains(&id) {
                            continue;
                        }
                    }
                }
                Ok(None) => report.snapshots_skipped += 1,
                Err(e) => {
                    let mut f = finding(
                        FindingKind::ChecksumMismatch,
                        format!(
                            "cannot be checked: {}",
                            ControllerError::from(e).to_api().message
                        ),
                    );
                    f.state_id = Some(id);
                    report.findings.push(f);
                }
            }
            if !known.contains(&id) && self.meta.state(&id)?.is_none() {
                let mut f = finding(
                    FindingKind::ManifestWithoutState,
                    "a published snapshot the metadata has no row for",
                );
                f.state_id = Some(id);
                if repair {
                    self.meta.upsert_state(&recovered_row(&m, now_ms()))?;
                    self.meta.event(
                        now_ms(),
                        "reconciled",
                        Some(&id),
                        None,
                        Some("fsck: metadata recovered from the manifest"),
                    )?;
                    f.repaired = true;
                    f.detail.push_str("; metadata recovered from its manifest");
                }
                report.findings.push(f);
            }
        }
        Ok(quarantined)
    }

    /// WARM and HOT states whose snapshot is neither here nor in the bucket.
    async fn check_states(
        &self,
        repair: bool,
        quarantined: &HashSet<StateId>,
        report: &mut FsckReport,
    ) -> Result<(), ControllerError> {
        for row in self.meta.states()? {
            let id = row.state_id;
            if !matches!(row.status, StateStatus::Warm | StateStatus::Hot)
                || quarantined.contains(&id)
                || self.store.contains(&id)
            {
                continue;
            }
            let Some(_guard) = self.building.try_lock(id) else {
                continue;
            };
            if self.store.contains(&id) || self.kept_in_bucket(&id).await {
                continue;
            }
            let mut f = finding(
                FindingKind::StateWithoutSnapshot,
                format!(
                    "{} but its snapshot is neither here nor in a bucket",
                    row.status
                ),
            );
            f.state_id = Some(id);
            if repair {
                let reason = "snapshot is missing from the store; rebuilt when asked for";
                self.meta
                    .set_state_status(&id, StateStatus::Cold, Some(reason))?;
                self.meta
                    .event(now_ms(), "reconciled", Some(&id), None, Some(reason))?;
                f.repaired = true;
                f.detail.push_str("; now COLD");
            }
            report.findings.push(f);
        }
        Ok(())
    }

    /// Entries of the store no snapshot explains (a build in progress is not one).
    async fn check_store_strays(
        &self,
        repair: bool,
        report: &mut FsckReport,
    ) -> Result<(), ControllerError> {
        for stray in self.store.strays().await? {
            let guard = match stray.state {
                Some(id) => match self.building.try_lock(id) {
                    Some(g) => Some(g),
                    None if stray.build => continue,
                    None => None,
                },
                None => None,
            };
            let mut f = finding(FindingKind::OrphanDirectory, stray.detail.clone());
            f.state_id = stray.state;
            f.path = Some(shown(self.home.root(), &stray.location));
            if repair && (guard.is_some() || stray.state.is_none()) {
                match self.store.clear_stray(stray).await {
                    Ok(Some(done)) => {
                        f.repaired = true;
                        f.detail
                            .push_str(&format!("; {}", shown(self.home.root(), &done)));
                    }
                    Ok(None) => f.detail.push_str("; this store cannot remove it"),
                    Err(e) => f.detail.push_str(&format!(
                        "; cannot remove it: {}",
                        ControllerError::from(e).to_api().message
                    )),
                }
            }
            report.findings.push(f);
        }
        Ok(())
    }

    /// Instance directories no instance explains, and instances whose data is gone.
    async fn check_instances(
        &self,
        repair: bool,
        report: &mut FsckReport,
    ) -> Result<(), ControllerError> {
        let rows_before: HashSet<InstanceId> = self
            .meta
            .instances()?
            .iter()
            .map(|r| r.instance_id)
            .collect();
        let Some(entries) = self
            .runtime
            .instance_entries()
            .await
            .map_err(|e| ControllerError::runtime("cannot list the instances' data", e))?
        else {
            return Ok(());
        };
        // Read after the listing: an instance whose data is listed is counted here by now.
        let starting = self.starting_instances.snapshot();
        let live = self.live_ids();
        let rows: HashSet<InstanceId> = self
            .meta
            .instances()?
            .iter()
            .map(|r| r.instance_id)
            .collect();
        for entry in &entries {
            let explained = entry.instance.is_some_and(|iid| {
                rows.contains(&iid) || live.contains(&iid) || starting.contains(&iid)
            });
            if explained {
                continue;
            }
            let mut f = finding(
                FindingKind::OrphanDirectory,
                match entry.instance {
                    Some(_) => "instance data no instance explains",
                    None => "not an instance's directory",
                },
            );
            f.instance_id = entry.instance;
            f.path = Some(shown(self.home.root(), &entry.location));
            if repair {
                match entry.instance {
                    Some(iid) => match self.runtime.remove_instance(iid).await {
                        Ok(()) => {
                            f.repaired = true;
                            f.detail.push_str("; deleted");
                        }
                        Err(e) => f.detail.push_str(&format!("; cannot delete it: {e}")),
                    },
                    None => f.detail.push_str("; look at it and remove it by hand"),
                }
            }
            report.findings.push(f);
        }
        let with_data: HashSet<InstanceId> = entries
            .iter()
            .filter(|e| e.has_data)
            .filter_map(|e| e.instance)
            .collect();
        for iid in rows.intersection(&rows_before) {
            if with_data.contains(iid) || starting.contains(iid) {
                continue;
            }
            let Some(row) = self
                .meta
                .instances()?
                .into_iter()
                .find(|r| r.instance_id == *iid)
            else {
                continue; // removed meanwhile
            };
            let mut f = finding(
                FindingKind::InstanceWithoutData,
                format!("{} instance whose data directory is gone", row.status),
            );
            f.instance_id = Some(*iid);
            f.state_id = Some(row.state_id);
            if repair {
                match self.delete_instance(iid).await {
                    Ok(()) => {
                        f.repaired = true;
                        f.detail.push_str("; instance removed");
                    }
                    Err(e) => f
                        .detail
                        .push_str(&format!("; cannot remove it: {}", e.to_api().message)),
                }
            }
            report.findings.push(f);
        }
        Ok(())
    }
}
