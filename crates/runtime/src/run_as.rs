//! The unprivileged user that PostgreSQL servers run as when the daemon is root.

use std::ffi::{CStr, CString};
use std::fs;
use std::path::Path;

use crate::error::RuntimeError;

/// The user `initdb` and `postgres` run as, because PostgreSQL refuses to run as root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    pub user: String,
    pub uid: u32,
    pub gid: u32,
}

impl RunAs {
    /// As root: the user named by `TAIDON_SERVER_USER`, or `postgres`. Otherwise `None`.
    pub fn for_this_process() -> Result<Option<RunAs>, RuntimeError> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return Ok(None);
        }
        let user = std::env::var("TAIDON_SERVER_USER")
            .ok()
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| "postgres".to_owned());
        Self::lookup(&user).map(Some)
    }

    /// The user named `user`, from the password database.
    pub fn lookup(user: &str) -> Result<RunAs, RuntimeError> {
        let missing = || RuntimeError::NoServerUser {
            user: user.to_owned(),
        };
        let name = CString::new(user).map_err(|_| missing())?;
        let mut buf = vec![0 as libc::c_char; 16 * 1024];
        // SAFETY: passwd is plain old data; all-zero is a valid (empty) value.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call, and buf's length is passed with it.
        let rc = unsafe {
            libc::getpwnam_r(
                name.as_ptr(),
                &mut pwd,
                buf.as_mut_ptr(),
                buf.len(),
                &mut result,
            )
        };
        if rc != 0 || result.is_null() {
            return Err(missing());
        }
        // SAFETY: on success pw_name points at a NUL-terminated string inside buf.
        let user = unsafe { CStr::from_ptr(pwd.pw_name) }
            .to_string_lossy()
            .into_owned();
        Ok(RunAs {
            user,
            uid: pwd.pw_uid,
            gid: pwd.pw_gid,
        })
    }
}

/// Give `path` to `run_as` (a no-op without one).
pub(crate) fn chown_to(path: &Path, run_as: Option<&RunAs>) -> Result<(), RuntimeError> {
    if let Some(r) = run_as {
        std::os::unix::fs::chown(path, Some(r.uid), Some(r.gid))
            .map_err(RuntimeError::io("cannot change the owner of", path))?;
    }
    Ok(())
}

/// Create `path` (not its parents) with mode 0700 for `run_as`. An existing directory is taken
/// over, so a retry after a crash between mkdir and use works (initdb refuses a non-empty one).
pub(crate) fn create_private_dir(path: &Path, run_as: Option<&RunAs>) -> Result<(), RuntimeError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    match fs::DirBuilder::new().mode(0o700).create(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && path.is_dir() => {
            fs::set_permissions(path, fs::Permissions::from_mode(0o700))
                .map_err(RuntimeError::io("cannot set the mode of", path))?;
        }
        Err(e) => return Err(RuntimeError::io("cannot create", path)(e)),
    }
    chown_to(path, run_as)
}
