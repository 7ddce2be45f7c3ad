//! Whether an instance's server still runs, and how it ended if not: what the controller's
//! lifecycle loop asks of every instance on each tick.

use std::fmt;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

/// What an instance's runtime knows about its server right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// The server runs (whether it accepts connections is the gateway's business).
    Running,
    /// The server ended without being asked to stop: killed, crashed, or exited on its own.
    Exited { status: Exit },
}

/// How a server ended, in terms any runtime can report (a local child's wait status, a
/// container's exit code or signal).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// It exited with this code.
    Code(i32),
    /// A signal ended it (9 for SIGKILL, as the kernel's OOM killer sends).
    Signal(i32),
    /// It ended, but how went to its parent: a server adopted from a previous daemon is not
    /// this process's child.
    Unknown,
}

impl From<ExitStatus> for Exit {
    fn from(status: ExitStatus) -> Self {
        match (status.code(), status.signal()) {
            (Some(code), _) => Exit::Code(code),
            (None, Some(signal)) => Exit::Signal(signal),
            // wait(2) reports one or the other for a process that ended; keep the raw status.
            (None, None) => Exit::Code(status.into_raw()),
        }
    }
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Exit::Code(code) => write!(f, "exited with code {code}"),
            Exit::Unknown => write!(f, "ended (how is known only to its parent process)"),
            Exit::Signal(signal) => match signal_name(signal) {
                Some(name) => write!(f, "killed by signal {signal} ({name})"),
                None => write!(f, "killed by signal {signal}"),
            },
        }
    }
}

/// The usual name of the signals that end a server.
fn signal_name(signal: i32) -> Option<&'static str> {
    Some(match signal {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGTERM => "SIGTERM",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_statuses_read_as_people_say_them() {
        // A raw wait status: the low 7 bits are the signal, the next byte the exit code.
        assert_eq!(Exit::from(ExitStatus::from_raw(9)), Exit::Signal(9));
        assert_eq!(Exit::from(ExitStatus::from_raw(3 << 8)), Exit::Code(3));
        assert_eq!(Exit::Signal(9).to_string(), "killed by signal 9 (SIGKILL)");
        assert_eq!(Exit::Signal(64).to_string(), "killed by signal 64");
        assert_eq!(Exit::Code(1).to_string(), "exited with code 1");
    }
}
