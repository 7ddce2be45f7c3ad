//! The object tier's error type.

use std::io;
use std::path::{Path, PathBuf};

use taidon_core::StateId;
use taidon_store::StoreError;

/// What went wrong uploading to or restoring from object storage.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// The remote configuration is not usable.
    #[error("bad remote config: {0}")]
    Config(String),
    /// A request to the object store failed.
    #[error("cannot {op} {key}")]
    Request {
        op: &'static str,
        key: String,
        #[source]
        source: object_store::Error,
    },
    /// A local file system operation failed.
    #[error("cannot {op} {}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The local snapshot store failed (reading its tree checksum).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A local manifest is not valid JSON of the expected shape.
    #[error("bad local manifest {}", path.display())]
    LocalManifest {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// Data does not match its recorded hash: a corrupt chunk or manifest, or a racing upload
    /// of different content.
    #[error("checksum mismatch in the snapshot of state {state}: {what}")]
    ChecksumMismatch { state: StateId, what: String },
    /// One chunk in the bucket does not hold what its name (its hash) says: it was not used.
    #[error("checksum mismatch in the snapshot of state {state}: chunk {chunk} {what}")]
    CorruptChunk {
        state: StateId,
        chunk: String,
        what: String,
    },
    /// No manifest of this state is in the bucket.
    #[error("no remote snapshot of state {0}")]
    UnknownState(StateId),
    /// A path the manifest format cannot carry (not UTF-8).
    #[error("unsupported file name {}", .0.display())]
    UnsupportedName(PathBuf),
    /// The restore target already exists.
    #[error("restore destination {} already exists", .0.display())]
    DestinationExists(PathBuf),
    /// A blocking task ended without finishing its work.
    #[error("an object tier task failed: {0}")]
    Task(String),
}

/// Attaches the operation and the path to an `io::Error`.
pub(crate) trait IoContext<T> {
    fn ctx(self, op: &'static str, path: &Path) -> Result<T, RemoteError>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, op: &'static str, path: &Path) -> Result<T, RemoteError> {
        self.map_err(|source| RemoteError::Io {
            op,
            path: path.to_path_buf(),
            source,
        })
    }
}
