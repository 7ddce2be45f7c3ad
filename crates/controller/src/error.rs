//! The controller's error, and how it is reported through the API.

use taidon_api::{ApiError, ErrorKind};

/// Why a controller operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("{0}")]
    BadInput(String),
    #[error("{0}")]
    NotFound(String),
    /// The caller's token may not do this (another user's instance).
    #[error("{0}")]
    Forbidden(String),
    /// A limit of this installation is reached (instances, memory): try later or raise it.
    #[error("{0}")]
    Capacity(String),
    #[error(transparent)]
    Prefix(#[from] taidon_core::prefix::PrefixError),
    #[error("step {index}/{total} ({label}) failed: {message}")]
    StepFailed {
        index: usize,
        total: usize,
        label: String,
        message: String,
        output: String,
    },
    #[error(transparent)]
    Engine(#[from] taidon_runtime::EngineError),
    #[error("{context}")]
    Runtime {
        context: String,
        #[source]
        source: taidon_runtime::RuntimeError,
    },
    #[error("snapshot store")]
    Store(#[from] taidon_store::StoreError),
    #[error("metadata")]
    Meta(#[from] crate::meta::MetaError),
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// A tool a step needs (Liquibase, Java) is missing: the message says how to install it.
    #[error("{0}")]
    Tool(String),
    /// A tool refused the user's input before anything was built (a changelog that does not
    /// parse): its own message, and all it printed.
    #[error("{message}")]
    ToolInput { message: String, output: String },
    #[error("{0}")]
    Internal(String),
    /// What failed because the disk it wrote to is full, and which disk that is.
    #[error("{disk}")]
    DiskFull {
        disk: String,
        #[source]
        cause: Box<ControllerError>,
    },
}

impl ControllerError {
    pub(crate) fn runtime(
        context: impl Into<String>,
        source: taidon_runtime::RuntimeError,
    ) -> Self {
        Self::Runtime {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }

    /// The kind the API reports.
    pub fn kind(&self) -> ErrorKind {
        use taidon_core::prefix::PrefixError;
        match self {
            ControllerError::DiskFull { cause, .. } => cause.kind(),
            ControllerError::BadInput(_) | ControllerError::Prefix(PrefixError::Malformed(_)) => {
                ErrorKind::BadInput
            }
            ControllerError::NotFound(_) | ControllerError::Prefix(PrefixError::NotFound(_)) => {
                ErrorKind::NotFound
            }
            ControllerError::Prefix(PrefixError::Ambiguous { .. }) => ErrorKind::Ambiguous,
            ControllerError::StepFailed { .. } => ErrorKind::StepFailed,
            ControllerError::Capacity(_) => ErrorKind::Capacity,
            ControllerError::Forbidden(_) => ErrorKind::Forbidden,
            ControllerError::Engine(_) | ControllerError::Tool(_) => ErrorKind::Engine,
            ControllerError::ToolInput { .. } => ErrorKind::BadInput,
            _ => ErrorKind::Internal,
        }
    }

    /// The error as the API reports it: the message with its causes, and psql's output for a
    /// failed step.
    pub fn to_api(&self) -> ApiError {
        let mut message = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            message.push_str(": ");
            message.push_str(&cause.to_string());
            source = cause.source();
        }
        let err = ApiError::new(self.kind(), message);
        match self.output() {
            Some(output) if !output.trim().is_empty() => err.with_detail(output.trim_end()),
            _ => err,
        }
    }

    /// What the failed tool printed, if a tool failed.
    fn output(&self) -> Option<&str> {
        match self {
            ControllerError::StepFailed { output, .. }
            | ControllerError::ToolInput { output, .. } => Some(output),
            ControllerError::DiskFull { cause, .. } => cause.output(),
            _ => None,
        }
    }
}
