//! Cleaning up a server that a crashed daemon left running on one of its data directories.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::RuntimeError;

const QUIT_TIMEOUT: Duration = Duration::from_secs(10);
const KILL_TIMEOUT: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(20);

/// Stop the postgres that `data_dir`'s postmaster.pid names, if it is alive and really serves
/// `data_dir`, and remove a stale postmaster.pid. `Some(pid)` if a server was killed.
///
/// Blocking (it polls /proc for up to 15 s): call it from a blocking context.
pub fn kill_orphan(data_dir: &Path) -> Result<Option<u32>, RuntimeError> {
    let pid_file = data_dir.join("postmaster.pid");
    let text = match std::fs::read_to_string(&pid_file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(RuntimeError::io("cannot read", &pid_file)(e)),
    };
    let mut lines = text.lines();
    let pid: Option<u32> = lines
        .next()
        .and_then(|l| l.trim().parse().ok())
        .filter(|&p| p > 1);
    let recorded_dir = lines.next().map(|l| PathBuf::from(l.trim()));

    let killed = match pid {
        Some(pid) if is_running(pid) && recorded_dir.is_some_and(|d| same_dir(&d, data_dir)) => {
            if serves(pid, data_dir) {
                stop(pid, data_dir)?;
                Some(pid)
            } else {
                None
            }
        }
        _ => None,
    };
    // After SIGQUIT postgres removes the file itself; after SIGKILL, or if the pid was dead or
    // reused by another program, it is stale and would only confuse the next start.
    match std::fs::remove_file(&pid_file) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(RuntimeError::io("cannot remove", &pid_file)(e)),
    }
    Ok(killed)
}

/// The server a previous process left running on `data_dir`, if its postmaster.pid names a
/// live postgres serving `data_dir` that is ready, with its socket in `socket_dir` and
/// `listen_addresses` set to `listen`: its pid, its port and a pidfd that pins it (opened
/// before the checks, so a pid reused after them is not mistaken for it).
///
/// Blocking (it reads /proc): call it from a blocking context.
pub(crate) fn find_running(
    data_dir: &Path,
    socket_dir: &Path,
    listen: &str,
) -> Option<(u32, u16, std::os::fd::OwnedFd)> {
    let text = std::fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
    // pid, data directory, start time, port, socket directory, first listen address, shared
    // memory key, status (PostgreSQL 10 and later).
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    let pid: u32 = lines.first()?.parse().ok().filter(|&p| p > 1)?;
    let port: u16 = lines.get(3)?.parse().ok()?;
    if !same_dir(Path::new(lines.get(1)?), data_dir)
        || !same_dir(Path::new(lines.get(4)?), socket_dir)
        || lines.get(7) != Some(&"ready")
    {
        return None;
    }
    let pidfd = crate::server::pidfd_open(pid).ok()?;
    let listens_as_asked = std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| {
        let wanted = format!("listen_addresses={listen}");
        cmdline
            .split(|&b| b == 0)
            .any(|arg| arg == wanted.as_bytes())
    });
    (is_running(pid) && serves(pid, data_dir) && listens_as_asked).then_some((pid, port, pidfd))
}

/// SIGQUIT (immediate shutdown, which also ends the backends), then SIGKILL if it lingers.
fn stop(pid: u32, data_dir: &Path) -> Result<(), RuntimeError> {
    tracing::info!(pid, ?data_dir, "stopping an orphaned postgres");
    signal(pid, libc::SIGQUIT)?;
    if wait_gone(pid, QUIT_TIMEOUT) {
        return Ok(());
    }
    tracing::warn!(pid, "orphaned postgres ignored SIGQUIT; sending SIGKILL");
    signal(pid, libc::SIGKILL)?;
    if wait_gone(pid, KILL_TIMEOUT) {
        Ok(())
    } else {
        Err(RuntimeError::Unkillable {
            pid,
            data_dir: data_dir.to_path_buf(),
        })
    }
}

fn signal(pid: u32, sig: libc::c_int) -> Result<(), RuntimeError> {
    // SAFETY: kill has no memory preconditions.
    if unsafe { libc::kill(pid as libc::pid_t, sig) } != 0 {
        let source = std::io::Error::last_os_error();
        // It exited between our check and the signal: that is what we wanted.
        if source.raw_os_error() == Some(libc::ESRCH) {
            return Ok(());
        }
        return Err(RuntimeError::Signal { pid, source });
    }
    Ok(())
}

fn wait_gone(pid: u32, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while is_running(pid) {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(POLL);
    }
    true
}

/// Whether `pid` exists and is not a zombie (a zombie has exited; only its parent's wait is due).
pub(crate) fn is_running(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the command name, which is in parentheses and may contain spaces.
    let state = stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next());
    !matches!(state, Some("Z" | "X" | "x"))
}

/// Whether `pid` is a postgres started with `-D` naming `data_dir`.
fn serves(pid: u32, data_dir: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    let is_postgres = args.first().is_some_and(|a0| {
        let a0 = String::from_utf8_lossy(a0);
        Path::new(a0.as_ref())
            .file_name()
            .is_some_and(|n| n == "postgres")
    });
    if !is_postgres {
        return false;
    }
    let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).ok();
    let dir_arg = args
        .windows(2)
        .find(|w| w[0] == b"-D")
        .map(|w| w[1])
        .or_else(|| {
            args.iter()
                .find_map(|a| a.strip_prefix(b"-D").filter(|r| !r.is_empty()))
        });
    dir_arg.is_some_and(|d| {
        let d = PathBuf::from(String::from_utf8_lossy(d).into_owned());
        let d = match (&cwd, d.is_relative()) {
            (Some(cwd), true) => cwd.join(d),
            _ => d,
        };
        same_dir(&d, data_dir)
    })
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_running_and_pid_zero_file_is_not() {
        assert!(is_running(std::process::id()));
        assert!(!is_running(u32::MAX - 1));
    }

    #[test]
    fn missing_pid_file_is_nothing_to_do_and_stale_one_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(kill_orphan(dir.path()).unwrap(), None);
        // Our own pid is alive but is not a postgres: it must not be signalled.
        let pid_file = dir.path().join("postmaster.pid");
        std::fs::write(
            &pid_file,
            format!("{}\n{}\n", std::process::id(), dir.path().display()),
        )
        .unwrap();
        assert_eq!(kill_orphan(dir.path()).unwrap(), None);
        assert!(!pid_file.exists());
    }
}
