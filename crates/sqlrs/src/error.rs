//! Everything that can make `sqlrs` fail, each with the exit code it means.

use std::io;

use taidon_api::ApiError;

use crate::args::UsageError;
use crate::client::ClientError;
use crate::daemon::DaemonError;
use crate::run::RunError;

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    #[error(transparent)]
    Usage(#[from] UsageError),
    #[error(transparent)]
    Prefix(#[from] taidon_core::prefix::PrefixError),
    /// The server settings are wrong.
    #[error(transparent)]
    Remote(#[from] crate::remote::RemoteError),
    /// The inputs cannot be read, hashed or resolved.
    #[error(transparent)]
    Input(#[from] crate::inputs::InputError),
    /// A changelog's closure cannot be read.
    #[error(transparent)]
    Changelog(#[from] taidon_core::changelog::ChangelogError),
    /// A `prepare:cmd` input cannot be read.
    #[error(transparent)]
    CmdInput(#[from] crate::cmd_inputs::CmdInputError),
    /// The project file (sqlrs.toml) is missing, unreadable or wrong.
    #[error(transparent)]
    Project(#[from] crate::project::ProjectFileError),
    /// The controller said no.
    #[error(transparent)]
    Api(ApiError),
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    #[error(transparent)]
    Client(ClientError),
    #[error(transparent)]
    Run(#[from] RunError),
    #[error("cannot find the current directory: {0}")]
    Cwd(#[source] io::Error),
    /// Writing our own output failed.
    #[error("cannot write output: {0}")]
    Output(#[from] io::Error),
}

impl From<ClientError> for Error {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::Api(api) => Error::Api(api),
            other => Error::Client(other),
        }
    }
}

impl Error {
    /// The process exit code for this failure.
    pub(crate) fn exit_code(&self) -> i32 {
        match self {
            Error::Usage(_)
            | Error::Prefix(_)
            | Error::Input(_)
            | Error::Remote(_)
            | Error::Changelog(_)
            | Error::CmdInput(_)
            | Error::Project(_) => 2,
            Error::Api(api) => api.kind.exit_code(),
            Error::Run(e) => e.exit_code(),
            // A reader that went away (`sqlrs ls | head`) is not a failure.
            Error::Output(e) if e.kind() == io::ErrorKind::BrokenPipe => 0,
            _ => 1,
        }
    }

    /// What to print on stderr, if anything: `sqlrs: <message>` and indented detail lines.
    pub(crate) fn report(&self) -> Option<String> {
        match self {
            Error::Output(e) if e.kind() == io::ErrorKind::BrokenPipe => None,
            Error::Usage(u) if u.hint.contains('\n') => {
                Some(format!("sqlrs: {}\n\n{}\n", u.message, u.hint))
            }
            Error::Usage(u) => Some(format!("sqlrs: {}\n  {}\n", u.message, u.hint)),
            Error::Api(api) => Some(crate::render::api_error(api)),
            Error::Daemon(d) => Some(crate::render::with_detail(&d.to_string(), d.detail())),
            other => Some(format!("sqlrs: {other}\n")),
        }
    }
}

#[cfg(test)]
mod tests {
    use taidon_api::ErrorKind;

    use super::*;

    #[test]
    fn exit_codes_mean_something() {
        let usage = Error::Usage(crate::args::parse(Vec::new()).expect_err("no command"));
        assert_eq!(usage.exit_code(), 2);
        let report = usage.report().expect("report");
        assert!(
            report.starts_with("sqlrs: no command given\n\n"),
            "{report}"
        );
        assert!(
            report.contains("Usage: sqlrs [OPTIONS] <COMMAND>"),
            "{report}"
        );
        let bad = Error::Usage(
            crate::args::parse(["ls".into(), "--bogus".into()]).expect_err("bad flag"),
        );
        assert_eq!(
            bad.report().as_deref(),
            Some("sqlrs: unexpected argument '--bogus' found\n  see 'sqlrs ls --help'\n")
        );
        let read = Error::Input(crate::inputs::InputError::Read {
            path: "schema.sql".into(),
            source: io::Error::from_raw_os_error(libc::ENOENT),
        });
        assert_eq!(read.exit_code(), 2);
        assert_eq!(
            read.report().as_deref(),
            Some("sqlrs: cannot read schema.sql: No such file or directory (os error 2)\n")
        );
        let api = Error::from(ClientError::Api(ApiError::new(ErrorKind::NotFound, "gone")));
        assert_eq!(api.exit_code(), 2);
        let failed = Error::Api(ApiError::new(ErrorKind::StepFailed, "step 2 failed"));
        assert_eq!(failed.exit_code(), 1);
        let pipe = Error::Output(io::Error::from(io::ErrorKind::BrokenPipe));
        assert_eq!(pipe.exit_code(), 0);
        assert_eq!(pipe.report(), None);
        let other = Error::Output(io::Error::from(io::ErrorKind::PermissionDenied));
        assert_eq!(other.exit_code(), 1);
    }
}
