//! The errors at this crate's boundary.

use std::io;
use std::path::PathBuf;
use std::process::ExitStatus;

/// Why the PostgreSQL engine could not be found or identified.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(
        "PostgreSQL server binaries not found (looked in: {looked_in}). Install them with \
         `apt-get install -y postgresql` (Debian/Ubuntu) or point TAIDON_PG_BIN at the directory \
         holding initdb and postgres."
    )]
    NotFound { looked_in: String },
    #[error("cannot run {binary:?} --version")]
    VersionCommand {
        binary: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot identify the engine in {bin_dir:?}")]
    Version {
        bin_dir: PathBuf,
        #[source]
        source: taidon_core::engine::VersionParseError,
    },
}

/// Why a runtime operation (initdb, a server, a cleanup) failed.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("the server user {user:?} does not exist (set TAIDON_SERVER_USER to another user)")]
    NoServerUser { user: String },
    #[error("{action} {path:?}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot run {program:?}")]
    Spawn {
        program: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("initdb failed for {data_dir:?} ({status}): {stderr}")]
    Initdb {
        data_dir: PathBuf,
        status: ExitStatus,
        stderr: String,
    },
    #[error("postgres for {data_dir:?} did not start: {reason}; last log lines:\n{log_tail}")]
    Start {
        data_dir: PathBuf,
        reason: String,
        log_tail: String,
    },
    #[error("postgres {pid} for {data_dir:?} did not stop cleanly: {reason}")]
    Stop {
        pid: u32,
        data_dir: PathBuf,
        reason: String,
    },
    #[error("cannot connect to postgres over {socket_dir:?}")]
    Connect {
        socket_dir: PathBuf,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("cannot set the password of role {role:?}")]
    SetPassword {
        role: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("cannot run SQL on postgres for {data_dir:?}")]
    Execute {
        data_dir: PathBuf,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("cannot signal process {pid}")]
    Signal {
        pid: u32,
        #[source]
        source: io::Error,
    },
    #[error("postgres {pid} for {data_dir:?} is still alive after SIGKILL")]
    Unkillable { pid: u32, data_dir: PathBuf },
    /// A data area of another kind of runtime or store.
    #[error("this runtime cannot use the data area {0}")]
    ForeignArea(taidon_core::DataArea),
    /// A runtime that runs servers elsewhere (runner pods) could not do what was asked; the
    /// detail names the object and the cause.
    #[error("{what}: {detail}")]
    Remote { what: String, detail: String },
    /// A server setting of the recipe that the engine refuses.
    #[error("{engine} refuses the server settings: {reason}")]
    Setting { engine: String, reason: String },
    /// No installed engine of the version a recipe asks for.
    #[error("{asked} is not installed here (installed: {installed}). Install it (Debian: `apt-get install postgresql-{major}`) or add the directory holding its initdb and postgres to TAIDON_PG_BIN (a ':'-separated list), then restart Taidon")]
    EngineMissing {
        asked: String,
        major: u32,
        installed: String,
    },
    /// The blocking thread running a runtime operation ended without finishing it.
    #[error("a runtime task failed: {0}")]
    Task(String),
}

impl RuntimeError {
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(io::Error) -> Self {
        let path = path.into();
        move |source| RuntimeError::Io {
            action,
            path,
            source,
        }
    }
}
