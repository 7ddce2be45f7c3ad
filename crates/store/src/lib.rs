//! The snapshot store: one immutable PostgreSQL data directory per state, published atomically
//! under a root, and cloned by the fastest means the file system offers (btrfs snapshots,
//! reflinks, or plain copies).
//!
//! [`SnapshotStore`] is the async boundary the controller uses; [`LocalStore`] implements it
//! with blocking `std::fs` (its inherent methods) run on blocking threads. A `FakeStore`
//! (in memory) is behind the `testing` feature.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]
#![deny(clippy::todo, clippy::dbg_macro)]

mod clone;
pub mod dedup;
mod digest;
mod error;
#[cfg(any(test, feature = "testing"))]
mod fake;
mod local;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
#[cfg(test)]
mod tests;

use std::any::Any;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use taidon_core::{CloneStrategy, DataArea, EngineFingerprint, StateId};

pub use clone::{
    chown_tree, clone_tree, clone_tree_reporting, detect_strategy, remove_tree, CloneProgress,
};
pub use digest::{tree_digest, TreeDigest};
pub use error::StoreError;
pub use local::{LocalBuild, LocalStore, QUARANTINE};

/// Who owns data directories: the `postgres` user when the process runs as root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

/// What the store records about a published snapshot, in `<root>/<state_id>/manifest.json`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    pub state_id: StateId,
    pub parent: Option<StateId>,
    pub engine: EngineFingerprint,
    /// Sum of the lengths of the regular files in the data directory.
    pub size_bytes: u64,
    /// `sha256:<hex>` of the data directory, as [`tree_digest`] computes it.
    pub checksum: String,
    /// Publication time, milliseconds since the Unix epoch.
    pub created_ms: u64,
    /// How long the state took to build, so eviction can weigh what a rebuild costs.
    pub build_cost_ms: u64,
}

/// What the caller knows about a build when it publishes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishMeta {
    pub parent: Option<StateId>,
    pub engine: EngineFingerprint,
    pub build_cost_ms: u64,
}

/// What a clone did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloneStats {
    /// The strategy actually used (a reflink clone that had to fall back reports `Copy`).
    pub strategy: CloneStrategy,
    /// Bytes of regular files cloned; 0 for a btrfs snapshot, which touches no files.
    pub bytes: u64,
    /// Regular files cloned; 0 for a btrfs snapshot.
    pub files: u64,
}

/// A boxed, sendable future, so the trait stays object-safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Told the bytes a copying clone has copied so far and the total, as it goes.
pub type ByteProgress = Arc<dyn Fn(u64, u64) + Send + Sync>;

/// What `sqlrs status` shows about a store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreInfo {
    /// How snapshots are cloned.
    pub strategy: CloneStrategy,
    /// Where the snapshots are, for people: a directory, a bucket.
    pub location: String,
}

/// What `sqlrs status` shows about the object-storage tier.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RemoteStatus {
    /// `s3://bucket/prefix`.
    pub url: String,
    /// Whether the bucket answered the last probe.
    pub reachable: bool,
    /// Why it did not, in one line.
    pub error: Option<String>,
    /// Snapshots published here and not yet in the bucket (queued or uploading).
    pub pending_uploads: u64,
    /// Compressed bytes of the chunks in the bucket, as of the last probe.
    pub bytes: u64,
    /// Snapshots (manifests) in the bucket, as of the last probe.
    pub snapshots: u64,
}

/// What an upload to the bucket did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PushReport {
    /// Chunks put into the bucket.
    pub chunks_uploaded: u64,
    /// Distinct chunks the bucket had already.
    pub chunks_skipped: u64,
    /// Compressed bytes put.
    pub bytes_uploaded: u64,
    /// False when the bucket had the snapshot already.
    pub manifest_created: bool,
}

/// What a garbage collection of the bucket's chunks did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GcReport {
    /// Live snapshots whose chunks were kept.
    pub manifests: u64,
    /// Chunks in the bucket before the sweep.
    pub chunks: u64,
    /// Unreferenced chunks deleted (older than the grace period).
    pub chunks_deleted: u64,
    /// Their compressed bytes.
    pub bytes_deleted: u64,
    /// Unreferenced chunks kept because they are younger than the grace period.
    pub chunks_in_grace: u64,
}

/// A slower, shared tier behind a local store: snapshots in object storage. Every machine
/// that points at the same bucket shares what the others uploaded.
pub trait RemoteTier: Send + Sync {
    /// Where the snapshots are (`s3://bucket/prefix`).
    fn url(&self) -> String;
    /// Probes the bucket and reports on it and on the upload queue.
    fn status(&self) -> BoxFuture<'_, RemoteStatus>;
    /// Compressed bytes in the bucket as last counted, without asking it (for metrics);
    /// `None` if never counted.
    fn counted_bytes(&self) -> Option<u64> {
        None
    }
    /// The states with a snapshot in the bucket, as last seen (the probe, uploads, lookups
    /// refresh it): for listings, never for a decision that needs the truth.
    fn known(&self) -> std::collections::HashSet<StateId>;
    /// The states published here whose upload is queued or running: the local tier keeps
    /// them until they are in the bucket.
    fn pending(&self) -> std::collections::HashSet<StateId>;
    /// The manifests of every snapshot in the bucket.
    fn list(&self) -> BoxFuture<'_, Result<Vec<Manifest>, StoreError>>;
    /// Whether the bucket has a snapshot of `id` now.
    fn contains(&self, id: StateId) -> BoxFuture<'_, Result<bool, StoreError>>;
    /// Uploads the local snapshot of `id` now, and waits.
    fn push(&self, id: StateId) -> BoxFuture<'_, Result<PushReport, StoreError>>;
    /// Downloads `id`'s snapshot and publishes it in the local tier (every chunk and the
    /// tree checksum verified; a failure leaves nothing behind), telling `progress` the bytes.
    fn fetch(
        &self,
        id: StateId,
        progress: Option<ByteProgress>,
    ) -> BoxFuture<'_, Result<Manifest, StoreError>>;
    /// Deletes `id`'s manifest from the bucket (its chunks go at the next collection); false
    /// when there was none.
    fn remove(&self, id: StateId) -> BoxFuture<'_, Result<bool, StoreError>>;
    /// Deletes the chunks no manifest refers to and that are older than `grace`.
    fn collect_garbage(
        &self,
        grace: std::time::Duration,
    ) -> BoxFuture<'_, Result<GcReport, StoreError>>;
}

/// A place that keeps one immutable data directory per state. Async, and with no local path
/// in its contract: builds and restores name a [`DataArea`] that the store and the runtime
/// agree on.
pub trait SnapshotStore: Send + Sync {
    /// How this store clones snapshots and where it keeps them.
    fn describe(&self) -> StoreInfo;
    /// Starts building `id`: a private data area holding a clone of `parent`'s snapshot, or
    /// (no parent) an empty one for the runtime to initialise. A copying clone tells
    /// `progress` its bytes.
    fn begin(
        &self,
        id: StateId,
        parent: Option<StateId>,
        progress: Option<ByteProgress>,
    ) -> BoxFuture<'_, Result<Build, StoreError>>;
    /// Makes a build durable and visible under its id (its server stopped); if a racing build
    /// of the same id won, discards this one and returns the winner's manifest.
    fn publish(
        &self,
        build: Build,
        meta: PublishMeta,
    ) -> BoxFuture<'_, Result<Manifest, StoreError>>;
    /// Restores `id`'s data into `target`, a runtime's place for one instance's data (which
    /// must not hold data yet).
    fn restore_for<'a>(
        &'a self,
        id: StateId,
        target: &'a DataArea,
    ) -> BoxFuture<'a, Result<CloneStats, StoreError>>;
    /// The manifest of `id`, if published.
    fn manifest(&self, id: StateId) -> BoxFuture<'_, Result<Option<Manifest>, StoreError>>;
    /// The manifests of all published snapshots, ordered by state id.
    fn list(&self) -> BoxFuture<'_, Result<Vec<Manifest>, StoreError>>;
    /// Deletes the snapshot of `id`; false when there was none.
    fn remove(&self, id: StateId) -> BoxFuture<'_, Result<bool, StoreError>>;
    /// Logical bytes of all published snapshots (shared extents count once per snapshot).
    fn usage(&self) -> BoxFuture<'_, Result<u64, StoreError>>;
    /// The data areas of builds a crashed process left, for the runtime to stop servers on
    /// (call before starting builds: builds in progress look the same).
    fn leftover_builds(&self) -> BoxFuture<'_, Result<Vec<DataArea>, StoreError>>;
    /// Deletes what a crashed process left (builds, half-deleted snapshots, spares); how many
    /// entries went.
    fn discard_leftovers(&self) -> BoxFuture<'_, Result<usize, StoreError>>;
    /// Prepares the next restore of `id` ahead of time, where that saves the next instance a
    /// wait (a spare copy on a store that copies); true if it did something.
    fn make_spare(&self, id: StateId) -> BoxFuture<'_, Result<bool, StoreError>> {
        let _ = id;
        Box::pin(async { Ok(false) })
    }
    /// The object-storage tier behind this store, if it has one.
    fn remote(&self) -> Option<&dyn RemoteTier> {
        None
    }
    /// Checks `id`'s data against the checksum its manifest records; `None` when this store
    /// cannot read the data to check it (it is elsewhere).
    fn verify(&self, id: StateId) -> BoxFuture<'_, Result<Option<Verified>, StoreError>> {
        let _ = id;
        Box::pin(async { Ok(None) })
    }
    /// Takes `id`'s snapshot out of use without deleting it (for a person to look at): it
    /// stops being published. Where it went, or `None` when this store cannot quarantine.
    fn quarantine(&self, id: StateId) -> BoxFuture<'_, Result<Option<String>, StoreError>> {
        let _ = id;
        Box::pin(async { Ok(None) })
    }
    /// The entries of the store that no published snapshot explains (leftovers, junk).
    fn strays(&self) -> BoxFuture<'_, Result<Vec<Stray>, StoreError>> {
        Box::pin(async { Ok(Vec::new()) })
    }
    /// Clears a stray entry: into quarantine when it may hold data, deleted otherwise. What
    /// was done, or `None` when this store cannot.
    fn clear_stray(&self, stray: Stray) -> BoxFuture<'_, Result<Option<String>, StoreError>> {
        let _ = stray;
        Box::pin(async { Ok(None) })
    }
}

/// What checking a snapshot against its manifest found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// Whether the data still has the size and checksum the manifest records.
    pub intact: bool,
    /// Bytes read to compute the checksum.
    pub bytes_read: u64,
    /// What differs, for people (empty when intact).
    pub detail: String,
}

/// An entry of a store that no published snapshot explains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stray {
    /// Its name in the store.
    pub name: String,
    /// Where it is, for people.
    pub location: String,
    /// The state it names, if any (a build's, a spare's).
    pub state: Option<StateId>,
    /// A build directory: in progress while its state's build runs.
    pub build: bool,
    /// Whether it may hold data worth looking at (quarantined rather than deleted).
    pub may_hold_data: bool,
    /// Why it is there, as far as the store can tell.
    pub detail: String,
}

/// A build in progress: a private data area that becomes the snapshot of its state when
/// published, and is discarded when dropped unpublished.
pub struct Build {
    id: StateId,
    parent: Option<StateId>,
    area: DataArea,
    /// The store's own record of the build; dropping it discards the build.
    inner: Box<dyn Any + Send + Sync>,
}

impl Build {
    /// A build of `id` in `area`; `inner` is the store's own handle, which discards the build
    /// when dropped unpublished.
    pub fn new(
        id: StateId,
        parent: Option<StateId>,
        area: DataArea,
        inner: impl Any + Send + Sync,
    ) -> Self {
        Self {
            id,
            parent,
            area,
            inner: Box::new(inner),
        }
    }

    /// The state being built.
    pub fn id(&self) -> &StateId {
        &self.id
    }

    /// The state this build was cloned from.
    pub fn parent(&self) -> Option<&StateId> {
        self.parent.as_ref()
    }

    /// Where the build's data is: the runtime runs the build's server there.
    pub fn area(&self) -> &DataArea {
        &self.area
    }

    /// The store's own handle, if the build is of type `T` (another store's build is not).
    pub fn into_inner<T: Any>(self) -> Result<T, StoreError> {
        let area = self.area;
        self.inner
            .downcast::<T>()
            .map(|b| *b)
            .map_err(|_| StoreError::ForeignArea(area))
    }
}

impl std::fmt::Debug for Build {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Build")
            .field("id", &self.id)
            .field("parent", &self.parent)
            .field("area", &self.area)
            .finish_non_exhaustive()
    }
}
