//! The snapshot store: one immutable PostgreSQL data directory per state, published atomically
//! under a root, and cloned by the fastest means the file system offers (btrfs snapshots,
//! reflinks, or plain copies).
//!
//! All I/O here is blocking `std::fs`; async callers run it on a blocking thread.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]
#![deny(clippy::todo, clippy::dbg_macro)]

mod clone;
mod digest;
mod error;
mod local;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
#[cfg(test)]
mod tests;

use std::path::Path;

use serde::{Deserialize, Serialize};
use taidon_core::{CloneStrategy, EngineFingerprint, StateId};

pub use clone::{clone_tree, clone_tree_reporting, detect_strategy, remove_tree, CloneProgress};
pub use digest::{tree_digest, TreeDigest};
pub use error::StoreError;
pub use local::{Build, LocalStore};

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

/// A place that keeps one immutable data directory per state.
pub trait SnapshotStore: Send + Sync {
    /// How this store clones snapshots.
    fn strategy(&self) -> CloneStrategy;
    /// The directory the store lives in.
    fn root(&self) -> &Path;
    /// Whether a snapshot of `id` is published.
    fn contains(&self, id: &StateId) -> bool;
    /// The manifest of `id`, if published.
    fn manifest(&self, id: &StateId) -> Result<Option<Manifest>, StoreError>;
    /// The manifests of all published snapshots, ordered by state id.
    fn list(&self) -> Result<Vec<Manifest>, StoreError>;
    /// A private work area for building `id`: its `data_dir()` is a clone of `parent`'s data,
    /// or (no parent) an empty directory of mode 0700 owned by the owner, where the caller runs
    /// initdb.
    fn begin(&self, id: &StateId, parent: Option<&StateId>) -> Result<Build, StoreError>;
    /// `begin`, telling `progress` the bytes of the parent's data copied so far.
    fn begin_reporting(
        &self,
        id: &StateId,
        parent: Option<&StateId>,
        progress: CloneProgress<'_>,
    ) -> Result<Build, StoreError> {
        let _ = progress;
        self.begin(id, parent)
    }
    /// Makes a build durable and visible under its id; if a racing build of the same id won,
    /// discards this one and returns the winner's manifest.
    fn publish(&self, build: Build, meta: PublishMeta) -> Result<Manifest, StoreError>;
    /// Clones `id`'s data directory to `dest` (which must not exist), owned by the owner, mode
    /// 0700.
    fn clone_to(&self, id: &StateId, dest: &Path) -> Result<CloneStats, StoreError>;
    /// Deletes the snapshot of `id`; false when there was none.
    fn remove(&self, id: &StateId) -> Result<bool, StoreError>;
    /// Logical bytes of all published snapshots (shared extents count once per snapshot).
    fn usage_bytes(&self) -> Result<u64, StoreError>;
}
