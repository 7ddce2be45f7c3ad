//! Snapshot store vocabulary shared by the store, the controller and the API.

use serde::{Deserialize, Serialize};

/// How snapshots are cloned on this store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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

/// Where one PostgreSQL data directory lives, named so that a snapshot store and a runtime
/// both understand it: the store fills it (a build's work area, the target an instance's data
/// is restored to) and the runtime runs a server on it. The controller only passes it along.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DataArea(Area);

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Area {
    Local(std::path::PathBuf),
    Named(String),
}

impl DataArea {
    /// A directory on the machine that both the store and the runtime run on.
    pub fn local(dir: impl Into<std::path::PathBuf>) -> Self {
        Self(Area::Local(dir.into()))
    }

    /// An area known by name to a store and runtime that share a naming scheme (a volume; the
    /// in-memory fakes).
    pub fn named(name: impl Into<String>) -> Self {
        Self(Area::Named(name.into()))
    }

    /// The directory, if this is a local area.
    pub fn as_local(&self) -> Option<&std::path::Path> {
        match &self.0 {
            Area::Local(dir) => Some(dir),
            Area::Named(_) => None,
        }
    }

    /// The name, if this is a named area.
    pub fn as_named(&self) -> Option<&str> {
        match &self.0 {
            Area::Named(name) => Some(name),
            Area::Local(_) => None,
        }
    }
}

impl std::fmt::Display for DataArea {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Area::Local(dir) => write!(f, "{}", dir.display()),
            Area::Named(name) => f.write_str(name),
        }
    }
}
