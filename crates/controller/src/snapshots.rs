//! The snapshot store as the controller uses it: the [`SnapshotStore`] trait object, and the
//! set of states it holds, kept here so that "is there a snapshot of this state" is a memory
//! lookup (Resolve answers it synchronously, for every new connection). The controller is the
//! store's only writer: the set is filled from `list` at start and follows every publication
//! and removal, all of which go through here.

use std::collections::HashSet;
use std::sync::{Arc, RwLock};

use taidon_core::{DataArea, StateId};
use taidon_store::{
    Build, ByteProgress, CloneStats, Manifest, PublishMeta, RemoteTier, SnapshotStore, StoreError,
    StoreInfo, Stray, Verified,
};

pub(crate) struct Snapshots {
    store: Arc<dyn SnapshotStore>,
    published: RwLock<HashSet<StateId>>,
}

impl Snapshots {
    pub(crate) fn new(store: Arc<dyn SnapshotStore>) -> Self {
        Self {
            store,
            published: RwLock::new(HashSet::new()),
        }
    }

    fn set(&self) -> std::sync::RwLockWriteGuard<'_, HashSet<StateId>> {
        self.published.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a snapshot of `id` is published.
    pub(crate) fn contains(&self, id: &StateId) -> bool {
        self.published
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(id)
    }

    /// The store itself, for work that outlives the caller (a spare made in the background).
    pub(crate) fn shared(&self) -> Arc<dyn SnapshotStore> {
        Arc::clone(&self.store)
    }

    pub(crate) fn describe(&self) -> StoreInfo {
        self.store.describe()
    }

    /// Every published manifest; the set of published states is made anew from them.
    pub(crate) async fn refresh(&self) -> Result<Vec<Manifest>, StoreError> {
        let manifests = self.store.list().await?;
        *self.set() = manifests.iter().map(|m| m.state_id).collect();
        Ok(manifests)
    }

    pub(crate) async fn begin(
        &self,
        id: StateId,
        parent: Option<StateId>,
        progress: Option<ByteProgress>,
    ) -> Result<Build, StoreError> {
        self.store.begin(id, parent, progress).await
    }

    pub(crate) async fn publish(
        &self,
        build: Build,
        meta: PublishMeta,
    ) -> Result<Manifest, StoreError> {
        let manifest = self.store.publish(build, meta).await?;
        self.set().insert(manifest.state_id);
        Ok(manifest)
    }

    pub(crate) async fn restore_for(
        &self,
        id: StateId,
        target: &DataArea,
    ) -> Result<CloneStats, StoreError> {
        self.store.restore_for(id, target).await
    }

    /// Deletes the snapshot of `id`. It stops counting as published first, so nothing new
    /// starts on it meanwhile; a removal that fails half-way leaves the set as the store says.
    pub(crate) async fn remove(&self, id: StateId) -> Result<bool, StoreError> {
        self.set().remove(&id);
        let removed = self.store.remove(id).await;
        if removed.is_err() {
            if let Ok(Some(_)) = self.store.manifest(id).await {
                self.set().insert(id);
            }
        }
        removed
    }

    /// The bucket behind the store, if any.
    pub(crate) fn remote(&self) -> Option<&dyn RemoteTier> {
        self.store.remote()
    }

    /// Downloads `id` from the bucket and publishes it here.
    pub(crate) async fn fetch(
        &self,
        id: StateId,
        progress: Option<ByteProgress>,
    ) -> Result<Manifest, StoreError> {
        let remote = self.store.remote().ok_or(StoreError::UnknownState(id))?;
        let manifest = remote.fetch(id, progress).await?;
        self.set().insert(id);
        Ok(manifest)
    }

    /// Every published manifest (the set of published states left as it is).
    pub(crate) async fn list(&self) -> Result<Vec<Manifest>, StoreError> {
        self.store.list().await
    }

    /// Checks `id`'s data against its manifest; `None` when the store cannot.
    pub(crate) async fn verify(&self, id: StateId) -> Result<Option<Verified>, StoreError> {
        self.store.verify(id).await
    }

    /// Takes `id`'s snapshot out of use (moved aside, not deleted); where it went. It stops
    /// counting as published first, as for a removal.
    pub(crate) async fn quarantine(&self, id: StateId) -> Result<Option<String>, StoreError> {
        let had = self.set().remove(&id);
        let moved = self.store.quarantine(id).await;
        if !matches!(moved, Ok(Some(_))) {
            if let Ok(Some(_)) = self.store.manifest(id).await {
                self.set().insert(id);
            } else if had && moved.is_err() {
                tracing::warn!(state = %id.short(), "a snapshot half quarantined");
            }
        }
        moved
    }

    /// Entries of the store no snapshot explains.
    pub(crate) async fn strays(&self) -> Result<Vec<Stray>, StoreError> {
        self.store.strays().await
    }

    pub(crate) async fn clear_stray(&self, stray: Stray) -> Result<Option<String>, StoreError> {
        self.store.clear_stray(stray).await
    }

    pub(crate) async fn usage(&self) -> Result<u64, StoreError> {
        self.store.usage().await
    }

    pub(crate) async fn leftover_builds(&self) -> Result<Vec<DataArea>, StoreError> {
        self.store.leftover_builds().await
    }

    pub(crate) async fn discard_leftovers(&self) -> Result<usize, StoreError> {
        self.store.discard_leftovers().await
    }
}
