//! The data home: where the controller keeps metadata, snapshots, instances, keys and logs.
//!
//! ```text
//! <home>/daemon.lock      flock held by the running daemon
//! <home>/daemon.json      how clients find it (written last, atomically)
//! <home>/api.token        API bearer token (0600)
//! <home>/gateway.key      token signing secret (0600)
//! <home>/keyset.json      token keys: current and previous, Ed25519 or HS256 (0600)
//! <home>/tls/             CA (ca.pem, ca.key 0600) and the server certificate of the gateway
//!                         and the API (server.pem, server.key 0600, server.hosts it covers)
//! <home>/installation_id  the `aud` of every token this home mints
//! <home>/gateway.addr     the gateway's address, kept across restarts so DSNs stay valid
//! <home>/meta.db          SQLite metadata (WAL), API tokens (hashed) and instance owners
//! <home>/snapshots/       the snapshot store
//! <home>/instances/<id>/  data/ and sock/ of each instance
//! <home>/run/             socket directories of builds
//! <home>/logs/            taidon.log, instances/<id>.log, builds/<state>.log
//! ```

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use rand::RngCore;

/// Paths of a data home.
#[derive(Debug, Clone)]
pub struct Home {
    root: PathBuf,
}

impl Home {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn lock_file(&self) -> PathBuf {
        self.root.join("daemon.lock")
    }
    pub fn daemon_json(&self) -> PathBuf {
        self.root.join("daemon.json")
    }
    pub fn api_token_file(&self) -> PathBuf {
        self.root.join("api.token")
    }
    pub fn gateway_key_file(&self) -> PathBuf {
        self.root.join("gateway.key")
    }
    pub fn keyset_file(&self) -> PathBuf {
        self.root.join("keyset.json")
    }
    pub fn tls_dir(&self) -> PathBuf {
        self.root.join("tls")
    }
    pub fn installation_id_file(&self) -> PathBuf {
        self.root.join("installation_id")
    }
    pub fn gateway_addr_file(&self) -> PathBuf {
        self.root.join("gateway.addr")
    }
    pub fn meta_db(&self) -> PathBuf {
        self.root.join("meta.db")
    }
    pub fn snapshots(&self) -> PathBuf {
        self.root.join("snapshots")
    }
    pub fn instances(&self) -> PathBuf {
        self.root.join("instances")
    }
    pub fn run_dir(&self) -> PathBuf {
        self.root.join("run")
    }
    pub fn logs(&self) -> PathBuf {
        self.root.join("logs")
    }

    /// Creates the layout. When servers run as another user, the directories on their way
    /// are made traversable (0711) but not listable by others.
    pub fn create(&self, servers_run_as_other_user: bool) -> io::Result<()> {
        let traversable = if servers_run_as_other_user {
            0o711
        } else {
            0o700
        };
        for dir in [
            self.root.clone(),
            self.snapshots(),
            self.instances(),
            self.run_dir(),
        ] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)?;
            fs::set_permissions(&dir, fs::Permissions::from_mode(traversable))?;
        }
        for dir in [
            self.logs(),
            self.logs().join("instances"),
            self.logs().join("builds"),
        ] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)?;
        }
        Ok(())
    }

    /// The first ancestor of the home that `uid` cannot traverse, if any. A server running as
    /// `postgres` cannot reach a home under `/root`, which is mode 0700.
    pub fn unreachable_ancestor(&self, uid: u32, gid: u32) -> Option<PathBuf> {
        use std::os::unix::fs::MetadataExt;
        let mut path = self.root.as_path();
        loop {
            if let Ok(meta) = fs::metadata(path) {
                let mode = meta.mode();
                let ok = if meta.uid() == uid {
                    mode & 0o100 != 0
                } else if meta.gid() == gid {
                    mode & 0o010 != 0
                } else {
                    mode & 0o001 != 0
                };
                if !ok {
                    return Some(path.to_path_buf());
                }
            }
            path = path.parent()?;
        }
    }
}

/// Reads a secret file, creating it with `len` random bytes (hex) and mode 0600 if missing.
pub fn read_or_create_secret(path: &Path, len: usize) -> io::Result<String> {
    match fs::read_to_string(path) {
        Ok(s) if !s.trim().is_empty() => return Ok(s.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut bytes = vec![0u8; len];
    rand::thread_rng().fill_bytes(&mut bytes);
    let secret = hex::encode(bytes);
    write_atomic(path, secret.as_bytes(), 0o600)?;
    Ok(secret)
}

/// Writes `content` under a temporary name, fsyncs it and renames it over `path`.
pub fn write_atomic(path: &Path, content: &[u8], mode: u32) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id()
    ));
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(content)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    File::open(dir)?.sync_all()
}

/// An exclusive advisory lock on a file, held while this value lives.
#[derive(Debug)]
pub struct DaemonLock {
    _file: File,
}

impl DaemonLock {
    /// Takes the lock without waiting; `Ok(None)` if another process holds it.
    pub fn try_acquire(path: &Path) -> io::Result<Option<DaemonLock>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)?;
        // SAFETY: flock on a valid, owned descriptor.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            Ok(Some(DaemonLock { _file: file }))
        } else {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                Ok(None)
            } else {
                Err(err)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_is_created_once_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("api.token");
        let a = read_or_create_secret(&p, 32).unwrap();
        let b = read_or_create_secret(&p, 32).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.len(), 64);
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn daemon_lock_is_exclusive() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("daemon.lock");
        let held = DaemonLock::try_acquire(&p).unwrap();
        assert!(held.is_some());
        assert!(DaemonLock::try_acquire(&p).unwrap().is_none());
        drop(held);
        assert!(DaemonLock::try_acquire(&p).unwrap().is_some());
    }

    #[test]
    fn finds_an_ancestor_others_cannot_traverse() {
        let dir = tempfile::tempdir().unwrap();
        let closed = dir.path().join("closed");
        let home = closed.join("home");
        fs::create_dir_all(&home).unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o711)).unwrap();
        fs::set_permissions(&closed, fs::Permissions::from_mode(0o700)).unwrap();
        fs::set_permissions(&home, fs::Permissions::from_mode(0o711)).unwrap();
        // uid/gid that own nothing here.
        let h = Home::new(&home);
        assert_eq!(h.unreachable_ancestor(54321, 54321), Some(closed.clone()));
        fs::set_permissions(&closed, fs::Permissions::from_mode(0o711)).unwrap();
        // /tmp itself is world-traversable.
        assert_eq!(h.unreachable_ancestor(54321, 54321), None);
    }
}
