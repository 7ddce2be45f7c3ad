//! The store's error type.

use std::io;
use std::path::{Path, PathBuf};

use taidon_core::{DataArea, StateId};

/// What went wrong in the snapshot store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file system operation failed.
    #[error("cannot {op} {}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A `btrfs` command exited with an error.
    #[error("`{command}` failed on {}: {detail}", path.display())]
    Command {
        command: String,
        path: PathBuf,
        detail: String,
    },
    /// A manifest is not valid JSON of the expected shape.
    #[error("bad manifest {}", path.display())]
    Manifest {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// No snapshot of this state is published.
    #[error("no snapshot of state {0}")]
    UnknownState(StateId),
    /// A clone destination already exists.
    #[error("clone destination {} already exists", .0.display())]
    DestinationExists(PathBuf),
    /// A build was published without a data directory.
    #[error("build {} has no data directory", .0.display())]
    EmptyBuild(PathBuf),
    /// A data area (or a build) this store cannot use: another kind of store's or runtime's.
    #[error("this store cannot use the data area {0}")]
    ForeignArea(DataArea),
    /// A restore target already holds data.
    #[error("the data area {0} is not empty")]
    AreaInUse(DataArea),
    /// Data does not match its recorded hash (a corrupt chunk or manifest in a bucket): it was
    /// not used.
    #[error("checksum mismatch in the snapshot of state {state}: {what}")]
    Corrupt { state: StateId, what: String },
    /// The object-storage tier failed (unreachable, refused, or a transfer that broke off).
    #[error("{message}")]
    Remote {
        message: String,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// The blocking thread running a store operation ended without finishing it.
    #[error("a store task failed: {0}")]
    Task(String),
}

/// Attaches the operation and the path to an `io::Error`.
pub(crate) trait IoContext<T> {
    fn ctx(self, op: &'static str, path: &Path) -> Result<T, StoreError>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, op: &'static str, path: &Path) -> Result<T, StoreError> {
        self.map_err(|source| StoreError::Io {
            op,
            path: path.to_owned(),
            source,
        })
    }
}
