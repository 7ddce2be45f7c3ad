//! An in-memory snapshot store for the tests of what sits above the store (the controller):
//! snapshots are manifests in a table, builds and restores are recorded, nothing touches a
//! disk. Its data areas are named (`fake-build/<id>/<n>`), so it goes with a runtime that
//! takes named areas, such as the fake runtime.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use taidon_core::{CloneStrategy, DataArea, EngineFingerprint, InitdbOptions, StateId};

use crate::{
    BoxFuture, Build, ByteProgress, CloneStats, Manifest, PublishMeta, SnapshotStore, StoreError,
    StoreInfo,
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
            })),
        }
    }
}

/// The engine the manifests of [`FakeStore::put`] name.
pub fn fake_engine() -> EngineFingerprint {
    EngineFingerprint {
        major: 15,
        minor: 0,
        initdb: InitdbOptions::default(),
    }
}

impl FakeStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Publishes a snapshot of `id` directly, as if built long ago.
    pub fn put(&self, id: StateId, parent: Option<StateId>, size_bytes: u64) -> Manifest {
        let manifest = Manifest {
            state_id: id,
            parent,
            engine: fake_engine(),
            size_bytes,
            checksum: format!("sha256:fake-{id}"),
            created_ms: 0,
            build_cost_ms: 1,
        };
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
