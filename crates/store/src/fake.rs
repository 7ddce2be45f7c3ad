//! An in-memory snapshot store for the tests of what sits above the store (the controller):
//! snapshots are manifests in a table, builds and restores are recorded, nothing touches a
//! disk. Its data areas are named (`fake-build/<id>/<n>`), so it goes with a runtime that
//! takes named areas, such as the fake runtime.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use taidon_core::{CloneStrategy, DataArea, EngineFingerprint, InitdbOptions, StateId};

use crate::{
    BoxFuture, Build, ByteProgress, CloneStats, GcReport, Manifest, PublishMeta, PushReport,
    RemoteStatus, RemoteTier, SnapshotStore, StoreError, StoreInfo,
};

/// A store whose snapshots are entries in a table the test can read and change.
#[derive(Debug, Clone)]
pub struct FakeStore {
    shared: Arc<Mutex<Fakes>>,
}

#[derive(Debug)]
struct Fakes {
    snapshots: BTreeMap<StateId, Manifest>,
    /// Builds begun and neither published nor dropped, by area name.
    building: HashMap<String, StateId>,
    /// Areas of builds a "crashed" process left (see [`FakeStore::leave_build`]).
    leftovers: Vec<DataArea>,
    next_build: u64,
    /// Every build begun, in order: (state, parent).
    begun: Vec<(StateId, Option<StateId>)>,
    /// Every restore, in order.
    restores: Vec<(StateId, DataArea)>,
    /// Areas restored into, so a second restore into one is refused as the real store does.
    filled: HashSet<DataArea>,
    /// The size a build of a state publishes with; `default_size` otherwise.
    sizes: HashMap<StateId, u64>,
    default_size: u64,
    /// The bytes a "copying" clone reports to a build's progress; none when 0.
    copy_bytes: u64,
    spares: Vec<StateId>,
    /// The fake bucket behind the store, if the test gave it one.
    bucket: Option<FakeBucket>,
}

/// A bucket in memory: manifests by state, uploads instant unless held.
#[derive(Debug, Default)]
struct FakeBucket {
    manifests: BTreeMap<StateId, Manifest>,
    /// Fetching these fails with a checksum mismatch (and deletes them, as the real tier does).
    corrupt: HashSet<StateId>,
    /// Every fetch, in order.
    fetched: Vec<StateId>,
    /// Published but not uploaded while uploads are held.
    pending: std::collections::BTreeSet<StateId>,
    hold_uploads: bool,
}

fn locked(shared: &Mutex<Fakes>) -> MutexGuard<'_, Fakes> {
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

impl Default for FakeStore {
    fn default() -> Self {
        Self {
            shared: Arc::new(Mutex::new(Fakes {
                snapshots: BTreeMap::new(),
                building: HashMap::new(),
                leftovers: Vec::new(),
                next_build: 0,
                begun: Vec::new(),
                restores: Vec::new(),
                filled: HashSet::new(),
                sizes: HashMap::new(),
                default_size: 1024,
                copy_bytes: 0,
                spares: Vec::new(),
                bucket: None,
            })),
        }
    }
}

/// The manifest of a snapshot "built long ago" on the fake engine.
fn old_manifest(id: StateId, parent: Option<StateId>, size_bytes: u64) -> Manifest {
    Manifest {
        state_id: id,
        parent,
        engine: fake_engine(),
        size_bytes,
        checksum: format!("sha256:fake-{id}"),
        created_ms: 0,
        build_cost_ms: 1,
    }
}

/// The engine the manifests of [`FakeStore::put`] name.
pub fn fake_engine() -> EngineFingerprint {
    EngineFingerprint {
        major: 15,
        minor: 0,
        initdb: InitdbOptions::default(),
        settings: Default::default(),
    }
}

impl FakeStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Publishes a snapshot of `id` directly, as if built long ago.
    pub fn put(&self, id: StateId, parent: Option<StateId>, size_bytes: u64) -> Manifest {
        let manifest = old_manifest(id, parent, size_bytes);
        locked(&self.shared).snapshots.insert(id, manifest.clone());
        manifest
    }

    /// The size the next publication of `id` records.
    pub fn set_size(&self, id: StateId, size_bytes: u64) {
        locked(&self.shared).sizes.insert(id, size_bytes);
    }

    /// Makes every build with a parent report `bytes` copied to its progress, as a copying
    /// clone does.
    pub fn report_copies(&self, bytes: u64) {
        locked(&self.shared).copy_bytes = bytes;
    }

    /// Leaves a build of `id` behind as a crashed process would; its area.
    pub fn leave_build(&self, id: StateId) -> DataArea {
        let mut fakes = locked(&self.shared);
        fakes.next_build += 1;
        let area = DataArea::named(format!("fake-build/{id}/{}", fakes.next_build));
        fakes.leftovers.push(area.clone());
        area
    }

    /// Whether a snapshot of `id` is published.
    pub fn contains(&self, id: &StateId) -> bool {
        locked(&self.shared).snapshots.contains_key(id)
    }

    /// The published states, ordered by id.
    pub fn published(&self) -> Vec<StateId> {
        locked(&self.shared).snapshots.keys().copied().collect()
    }

    /// Every build begun, in order, as (state, parent).
    pub fn begun(&self) -> Vec<(StateId, Option<StateId>)> {
        locked(&self.shared).begun.clone()
    }

    /// How many builds are begun and neither published nor discarded.
    pub fn in_progress(&self) -> usize {
        locked(&self.shared).building.len()
    }

    /// Every restore, in order: the state and the area it went to.
    pub fn restores(&self) -> Vec<(StateId, DataArea)> {
        locked(&self.shared).restores.clone()
    }

    /// The states a spare was asked for, in order.
    pub fn spares(&self) -> Vec<StateId> {
        locked(&self.shared).spares.clone()
    }

    /// The same store with an (empty) fake bucket behind it.
    pub fn with_bucket(self) -> Self {
        locked(&self.shared).bucket = Some(FakeBucket::default());
        self
    }

    fn with_fake_bucket<T>(&self, f: impl FnOnce(&mut FakeBucket) -> T) -> T {
        let mut fakes = locked(&self.shared);
        let bucket = fakes
            .bucket
            .as_mut()
            .expect("this FakeStore has no bucket: call with_bucket()");
        f(bucket)
    }

    /// Puts a snapshot of `id` in the bucket, as another machine's upload would.
    pub fn bucket_put(&self, id: StateId, parent: Option<StateId>, size_bytes: u64) {
        let manifest = old_manifest(id, parent, size_bytes);
        self.with_fake_bucket(|b| b.manifests.insert(id, manifest));
    }

    /// The states in the bucket.
    pub fn bucket_states(&self) -> Vec<StateId> {
        self.with_fake_bucket(|b| b.manifests.keys().copied().collect())
    }

    /// Makes the bucket's copy of `id` fail its checksum when fetched.
    pub fn corrupt_in_bucket(&self, id: StateId) {
        self.with_fake_bucket(|b| b.corrupt.insert(id));
    }

    /// Every fetch from the bucket, in order.
    pub fn fetched(&self) -> Vec<StateId> {
        self.with_fake_bucket(|b| b.fetched.clone())
    }

    /// Holds uploads (they stay pending) until released.
    pub fn hold_uploads(&self, hold: bool) {
        self.with_fake_bucket(|b| {
            b.hold_uploads = hold;
            if !hold {
                b.pending.clear();
            }
        });
        if !hold {
            let published: Vec<Manifest> =
                locked(&self.shared).snapshots.values().cloned().collect();
            self.with_fake_bucket(|b| {
                for m in published {
                    b.manifests.entry(m.state_id).or_insert(m);
                }
            });
        }
    }

    /// Forgets that `area` was restored into: the runtime deleted that instance's data.
    pub fn forget_area(&self, area: &DataArea) {
        locked(&self.shared).filled.remove(area);
    }
}

/// A fake build's record; dropping it unpublished discards the build.
#[derive(Debug)]
struct FakeBuild {
    name: String,
    shared: Arc<Mutex<Fakes>>,
}

impl Drop for FakeBuild {
    fn drop(&mut self) {
        locked(&self.shared).building.remove(&self.name);
    }
}

impl SnapshotStore for FakeStore {
    fn describe(&self) -> StoreInfo {
        StoreInfo {
            strategy: CloneStrategy::Copy,
            location: "memory".to_owned(),
        }
    }

    fn begin(
        &self,
        id: StateId,
        parent: Option<StateId>,
        progress: Option<ByteProgress>,
    ) -> BoxFuture<'_, Result<Build, StoreError>> {
        Box::pin(async move {
            let (name, copied) = {
                let mut fakes = locked(&self.shared);
                if let Some(p) = parent {
                    if !fakes.snapshots.contains_key(&p) {
                        return Err(StoreError::UnknownState(p));
                    }
                }
                fakes.next_build += 1;
                let name = format!("fake-build/{id}/{}", fakes.next_build);
                fakes.building.insert(name.clone(), id);
                fakes.begun.push((id, parent));
                (name, parent.map_or(0, |_| fakes.copy_bytes))
            };
            if let (Some(report), true) = (&progress, copied > 0) {
                report(copied / 2, copied);
                report(copied, copied);
            }
            let inner = FakeBuild {
                name: name.clone(),
                shared: Arc::clone(&self.shared),
            };
            Ok(Build::new(id, parent, DataArea::named(name), inner))
        })
    }

    fn publish(
        &self,
        build: Build,
        meta: PublishMeta,
    ) -> BoxFuture<'_, Result<Manifest, StoreError>> {
        Box::pin(async move {
            let id = *build.id();
            let inner = build.into_inner::<FakeBuild>()?;
            let mut fakes = locked(&self.shared);
            if !fakes.building.contains_key(&inner.name) {
                return Err(StoreError::EmptyBuild(inner.name.clone().into()));
            }
            if let Some(existing) = fakes.snapshots.get(&id) {
                return Ok(existing.clone());
            }
            let size_bytes = fakes.sizes.get(&id).copied().unwrap_or(fakes.default_size);
            let manifest = Manifest {
                state_id: id,
                parent: meta.parent,
                engine: meta.engine,
                size_bytes,
                checksum: format!("sha256:fake-{id}"),
                created_ms: 0,
                build_cost_ms: meta.build_cost_ms,
            };
            fakes.snapshots.insert(id, manifest.clone());
            if let Some(bucket) = fakes.bucket.as_mut() {
                if bucket.hold_uploads {
                    bucket.pending.insert(id);
                } else {
                    bucket.manifests.insert(id, manifest.clone());
                }
            }
            // The build's record drops after the lock: its Drop takes it too.
            drop(fakes);
            drop(inner);
            Ok(manifest)
        })
    }

    fn restore_for<'a>(
        &'a self,
        id: StateId,
        target: &'a DataArea,
    ) -> BoxFuture<'a, Result<CloneStats, StoreError>> {
        Box::pin(async move {
            let mut fakes = locked(&self.shared);
            if target.as_named().is_none() {
                return Err(StoreError::ForeignArea(target.clone()));
            }
            if !fakes.snapshots.contains_key(&id) {
                return Err(StoreError::UnknownState(id));
            }
            if !fakes.filled.insert(target.clone()) {
                return Err(StoreError::AreaInUse(target.clone()));
            }
            fakes.restores.push((id, target.clone()));
            Ok(CloneStats {
                strategy: CloneStrategy::Copy,
                bytes: 0,
                files: 0,
            })
        })
    }

    fn manifest(&self, id: StateId) -> BoxFuture<'_, Result<Option<Manifest>, StoreError>> {
        Box::pin(async move { Ok(locked(&self.shared).snapshots.get(&id).cloned()) })
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<Manifest>, StoreError>> {
        Box::pin(async move { Ok(locked(&self.shared).snapshots.values().cloned().collect()) })
    }

    fn remove(&self, id: StateId) -> BoxFuture<'_, Result<bool, StoreError>> {
        Box::pin(async move { Ok(locked(&self.shared).snapshots.remove(&id).is_some()) })
    }

    fn usage(&self) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(async move {
            Ok(locked(&self.shared)
                .snapshots
                .values()
                .map(|m| m.size_bytes)
                .sum())
        })
    }

    fn leftover_builds(&self) -> BoxFuture<'_, Result<Vec<DataArea>, StoreError>> {
        Box::pin(async move { Ok(locked(&self.shared).leftovers.clone()) })
    }

    fn discard_leftovers(&self) -> BoxFuture<'_, Result<usize, StoreError>> {
        Box::pin(async move { Ok(std::mem::take(&mut locked(&self.shared).leftovers).len()) })
    }

    fn make_spare(&self, id: StateId) -> BoxFuture<'_, Result<bool, StoreError>> {
        Box::pin(async move {
            locked(&self.shared).spares.push(id);
            Ok(false)
        })
    }

    fn remote(&self) -> Option<&dyn RemoteTier> {
        locked(&self.shared)
            .bucket
            .as_ref()
            .map(|_| self as &dyn RemoteTier)
    }
}

impl RemoteTier for FakeStore {
    fn url(&self) -> String {
        "s3://fake-bucket".to_owned()
    }

    fn status(&self) -> BoxFuture<'_, RemoteStatus> {
        Box::pin(async move {
            self.with_fake_bucket(|b| RemoteStatus {
                url: "s3://fake-bucket".to_owned(),
                reachable: true,
                error: None,
                pending_uploads: b.pending.len() as u64,
                bytes: b.manifests.values().map(|m| m.size_bytes).sum(),
                snapshots: b.manifests.len() as u64,
            })
        })
    }

    fn known(&self) -> HashSet<StateId> {
        self.with_fake_bucket(|b| b.manifests.keys().copied().collect())
    }

    fn pending(&self) -> HashSet<StateId> {
        self.with_fake_bucket(|b| b.pending.iter().copied().collect())
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<Manifest>, StoreError>> {
        Box::pin(
            async move { Ok(self.with_fake_bucket(|b| b.manifests.values().cloned().collect())) },
        )
    }

    fn contains(&self, id: StateId) -> BoxFuture<'_, Result<bool, StoreError>> {
        Box::pin(async move { Ok(self.with_fake_bucket(|b| b.manifests.contains_key(&id))) })
    }

    fn push(&self, id: StateId) -> BoxFuture<'_, Result<PushReport, StoreError>> {
        Box::pin(async move {
            let manifest = locked(&self.shared)
                .snapshots
                .get(&id)
                .cloned()
                .ok_or(StoreError::UnknownState(id))?;
            let created = self.with_fake_bucket(|b| {
                b.pending.remove(&id);
                b.manifests.insert(id, manifest).is_none()
            });
            Ok(PushReport {
                chunks_uploaded: u64::from(created),
                manifest_created: created,
                ..PushReport::default()
            })
        })
    }

    fn fetch(
        &self,
        id: StateId,
        progress: Option<ByteProgress>,
    ) -> BoxFuture<'_, Result<Manifest, StoreError>> {
        Box::pin(async move {
            let got = self.with_fake_bucket(|b| {
                b.fetched.push(id);
                if b.corrupt.remove(&id) {
                    b.manifests.remove(&id);
                    return Err(StoreError::Corrupt {
                        state: id,
                        what: "chunk 00 holds 1 bytes hashing to ff".to_owned(),
                    });
                }
                b.manifests
                    .get(&id)
                    .cloned()
                    .ok_or(StoreError::UnknownState(id))
            })?;
            if let Some(p) = progress {
                p(got.size_bytes, got.size_bytes);
            }
            locked(&self.shared).snapshots.insert(id, got.clone());
            Ok(got)
        })
    }

    fn remove(&self, id: StateId) -> BoxFuture<'_, Result<bool, StoreError>> {
        Box::pin(async move { Ok(self.with_fake_bucket(|b| b.manifests.remove(&id).is_some())) })
    }

    fn collect_garbage(
        &self,
        _grace: std::time::Duration,
    ) -> BoxFuture<'_, Result<GcReport, StoreError>> {
        Box::pin(async move {
            Ok(GcReport {
                manifests: self.with_fake_bucket(|b| b.manifests.len() as u64),
                ..GcReport::default()
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sid(n: u8) -> StateId {
        StateId::from_bytes([n; 32])
    }

    fn meta(parent: Option<StateId>) -> PublishMeta {
        PublishMeta {
            parent,
            engine: fake_engine(),
            build_cost_ms: 5,
        }
    }

    #[tokio::test]
    async fn builds_publish_or_vanish_and_restores_are_recorded() {
        let fake = FakeStore::new();
        let store: &dyn SnapshotStore = &fake;
        let base = store.begin(sid(1), None, None).await.unwrap();
        assert_eq!(fake.in_progress(), 1);
        let m = store.publish(base, meta(None)).await.unwrap();
        assert_eq!(m.state_id, sid(1));
        assert_eq!(fake.in_progress(), 0);
        assert!(matches!(
            store.begin(sid(3), Some(sid(9)), None).await,
            Err(StoreError::UnknownState(_))
        ));
        drop(store.begin(sid(2), Some(sid(1)), None).await.unwrap());
        assert_eq!(fake.in_progress(), 0);
        assert_eq!(fake.published(), [sid(1)]);

        let target = DataArea::named("instance/a");
        store.restore_for(sid(1), &target).await.unwrap();
        assert!(matches!(
            store.restore_for(sid(1), &target).await,
            Err(StoreError::AreaInUse(_))
        ));
        assert_eq!(fake.restores(), [(sid(1), target)]);
        assert_eq!(store.usage().await.unwrap(), 1024);
        assert!(store.remove(sid(1)).await.unwrap());
        assert!(!store.remove(sid(1)).await.unwrap());
    }
}
