//! Snapshot store vocabulary shared by the store, the controller and the API.

use serde::{Deserialize, Serialize};

/// How snapshots are cloned on this store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CloneStrategy {
    /// `btrfs subvolume snapshot`.
    Btrfs,
    /// `ioctl(FICLONE)` per file: XFS with reflink, btrfs without subvolumes, bcachefs.
    Reflink,
    /// A plain byte copy.
    Copy,
}

impl std::fmt::Display for CloneStrategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CloneStrategy::Btrfs => "btrfs",
            CloneStrategy::Reflink => "reflink",
            CloneStrategy::Copy => "copy",
        })
    }
}
