//! Cloning and removing directory trees: btrfs snapshots, reflinks, copies.

use std::ffi::{CString, OsStr};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{chown, lchown, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::process::{Command, Stdio};

use taidon_core::CloneStrategy;

use crate::error::{IoContext, StoreError};
use crate::{CloneStats, Owner};

const BTRFS_SUPER_MAGIC: u32 = 0x9123_683e;
/// The inode number of every btrfs subvolume's root directory.
const BTRFS_FIRST_FREE_OBJECTID: u64 = 256;

/// The best clone strategy for `dir`: btrfs snapshots when `dir` is on btrfs and the `btrfs`
/// tool is installed, else reflinks when a probe `FICLONE` in `dir` succeeds, else copies.
pub fn detect_strategy(dir: &Path) -> CloneStrategy {
    if is_btrfs(dir) && btrfs_tool_installed() {
        CloneStrategy::Btrfs
    } else if reflink_works_in(dir) {
        CloneStrategy::Reflink
    } else {
        CloneStrategy::Copy
    }
}

/// Clones the tree at `src` to `dest` (which must not exist), keeping contents, modes and
/// symlinks, and giving every entry to `owner` when given.
///
/// `Btrfs` snapshots `src` when it is a subvolume (only the new root is chowned: the files
/// inside keep their owners) and otherwise clones like `Reflink`. `Reflink` falls back to
/// copying when the file system refuses (another file system, no reflink support); the
/// returned stats say which strategy was used. On error, nothing is left at `dest`.
pub fn clone_tree(
    src: &Path,
    dest: &Path,
    strategy: CloneStrategy,
    owner: Option<Owner>,
) -> Result<CloneStats, StoreError> {
    clone_tree_reporting(src, dest, strategy, owner, None)
}

/// Told the bytes a clone has copied so far and the tree's total, after each file it copies
/// (reflinks and snapshots are near-instant and are not reported).
pub type CloneProgress<'a> = &'a (dyn Fn(u64, u64) + Sync);

/// `clone_tree`, reporting the bytes it copies to `progress`.
pub fn clone_tree_reporting(
    src: &Path,
    dest: &Path,
    strategy: CloneStrategy,
    owner: Option<Owner>,
    progress: Option<CloneProgress<'_>>,
) -> Result<CloneStats, StoreError> {
    if fs::symlink_metadata(dest).is_ok() {
        return Err(StoreError::DestinationExists(dest.to_owned()));
    }
    let src_meta = fs::metadata(src).ctx("read", src)?;
    if !src_meta.is_dir() {
        return Err(StoreError::Io {
            op: "clone",
            path: src.to_owned(),
            source: io::Error::from_raw_os_error(libc::ENOTDIR),
        });
    }
    let result = if strategy == CloneStrategy::Btrfs && is_subvolume(src) {
        snapshot_subvolume(src, dest, owner)
    } else {
        let mut walker = Walker {
            reflink: strategy != CloneStrategy::Copy,
            owner,
            files: 0,
            bytes: 0,
            progress,
            root: src,
            total: None,
        };
        walker.clone_dir(src, dest).map(|()| CloneStats {
            strategy: if walker.reflink {
                CloneStrategy::Reflink
            } else {
                CloneStrategy::Copy
            },
            bytes: walker.bytes,
            files: walker.files,
        })
    };
    if result.is_err() {
        if let Err(e) = remove_tree(dest) {
            tracing::warn!(dest = %dest.display(), error = %e, "cannot remove a failed clone");
        }
    }
    result
}

/// Deletes the tree at `path` (nothing there is fine), using `btrfs subvolume delete` for
/// subvolumes.
pub fn remove_tree(path: &Path) -> Result<(), StoreError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).ctx("read", path),
    };
    if !meta.is_dir() {
        return fs::remove_file(path).ctx("remove", path);
    }
    if meta.ino() == BTRFS_FIRST_FREE_OBJECTID && is_btrfs(path) && btrfs_tool_installed() {
        match btrfs(&["subvolume", "delete"], path) {
            Ok(()) => return Ok(()),
            // Not a subvolume after all, or deletion not allowed: plain removal may still work.
            Err(e) => tracing::debug!(error = %e, "btrfs subvolume delete failed, removing files"),
        }
    }
    for entry in fs::read_dir(path).ctx("list", path)? {
        let entry = entry.ctx("list", path)?;
        let child = entry.path();
        if entry.file_type().ctx("read", &child)?.is_dir() {
            remove_tree(&child)?;
        } else {
            fs::remove_file(&child).ctx("remove", &child)?;
        }
    }
    fs::remove_dir(path).ctx("remove directory", path)
}

/// Creates an empty directory for a base build: a subvolume under `Btrfs`, so its clones can
/// be snapshots.
pub(crate) fn create_base_dir(
    path: &Path,
    strategy: CloneStrategy,
    owner: Option<Owner>,
) -> Result<(), StoreError> {
    if strategy == CloneStrategy::Btrfs {
        btrfs(&["subvolume", "create"], path)?;
    } else {
        fs::create_dir(path).ctx("create directory", path)?;
    }
    fs::set_permissions(path, fs::Permissions::from_mode(0o700)).ctx("chmod", path)?;
    chown_to(path, owner)
}

pub(crate) fn chown_to(path: &Path, owner: Option<Owner>) -> Result<(), StoreError> {
    match owner {
        Some(o) => chown(path, Some(o.uid), Some(o.gid)).ctx("chown", path),
        None => Ok(()),
    }
}

/// Gives every entry under `path` (and `path` itself) to `owner`; symlinks themselves, not
/// what they point at.
pub fn chown_tree(path: &Path, owner: Option<Owner>) -> Result<(), StoreError> {
    let Some(o) = owner else {
        return Ok(());
    };
    std::os::unix::fs::lchown(path, Some(o.uid), Some(o.gid)).ctx("chown", path)?;
    if fs::symlink_metadata(path).ctx("read", path)?.is_dir() {
        for entry in fs::read_dir(path).ctx("list", path)? {
            let entry = entry.ctx("list", path)?;
            chown_tree(&entry.path(), owner)?;
        }
    }
    Ok(())
}

/// Whether `path` is the root of a btrfs subvolume.
pub(crate) fn is_subvolume(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok_and(|m| m.is_dir() && m.ino() == BTRFS_FIRST_FREE_OBJECTID)
        && is_btrfs(path)
}

fn is_btrfs(path: &Path) -> bool {
    fs_magic(path).is_ok_and(|magic| magic == BTRFS_SUPER_MAGIC)
}

/// The `f_type` of the file system holding `path`.
pub(crate) fn fs_magic(path: &Path) -> io::Result<u32> {
    let c_path = c_path(path)?;
    // SAFETY: all-zero is a valid `statfs`.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c_path` is NUL-terminated and `st` is a valid out pointer.
    if unsafe { libc::statfs(c_path.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // Magic numbers are 32-bit; f_type's width varies by target.
    Ok(st.f_type as u32)
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))
}

fn btrfs_tool_installed() -> bool {
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|dir| {
            fs::metadata(dir.join("btrfs")).is_ok_and(|m| m.is_file() && m.mode() & 0o111 != 0)
        })
    })
}

/// Runs `btrfs <args> <path>`.
fn btrfs(args: &[&str], path: &Path) -> Result<(), StoreError> {
    btrfs_with(args, &[path.as_os_str()], path)
}

fn btrfs_with(args: &[&str], paths: &[&OsStr], subject: &Path) -> Result<(), StoreError> {
    let out = Command::new("btrfs")
        .args(args)
        .args(paths)
        .stdin(Stdio::null())
        .output()
        .ctx("run btrfs on", subject)?;
    if out.status.success() {
        return Ok(());
    }
    Err(StoreError::Command {
        command: format!("btrfs {}", args.join(" ")),
        path: subject.to_owned(),
        detail: format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ),
    })
}

fn snapshot_subvolume(
    src: &Path,
    dest: &Path,
    owner: Option<Owner>,
) -> Result<CloneStats, StoreError> {
    btrfs_with(
        &["subvolume", "snapshot"],
        &[src.as_os_str(), dest.as_os_str()],
        src,
    )?;
    chown_to(dest, owner)?;
    Ok(CloneStats {
        strategy: CloneStrategy::Btrfs,
        bytes: 0,
        files: 0,
    })
}

/// `ioctl(dst, FICLONE, src)`: make `dst` share `src`'s extents.
fn ficlone(src: &File, dst: &File) -> io::Result<()> {
    // SAFETY: both descriptors are open for the duration of the call.
    let rc = unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) };
    if rc == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Errors that mean "this file system cannot reflink here", as opposed to a real I/O failure.
fn is_reflink_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EXDEV | libc::EOPNOTSUPP | libc::EINVAL | libc::ENOTTY | libc::ENOSYS)
    )
}

fn reflink_works_in(dir: &Path) -> bool {
    let tag = format!("{:016x}", rand::random::<u64>());
    let src = dir.join(format!(".probe-{tag}-src"));
    let dst = dir.join(format!(".probe-{tag}-dst"));
    let probe = || -> io::Result<()> {
        let mut s = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&src)?;
        s.write_all(b"taidon reflink probe")?;
        let d = OpenOptions::new().write(true).create_new(true).open(&dst)?;
        ficlone(&s, &d)
    };
    let result = probe();
    let _ = fs::remove_file(&src);
    let _ = fs::remove_file(&dst);
    if let Err(e) = &result {
        tracing::debug!(dir = %dir.display(), error = %e, "reflink probe failed");
    }
    result.is_ok()
}

/// A recursive reflink-or-copy of one tree.
struct Walker<'a> {
    /// Still reflinking; cleared for good at the first refusal.
    reflink: bool,
    owner: Option<Owner>,
    files: u64,
    bytes: u64,
    progress: Option<CloneProgress<'a>>,
    /// The tree's root, whose size is the total copies report against.
    root: &'a Path,
    /// That size, measured at the first copied file.
    total: Option<u64>,
}

/// Bytes of the regular files under `dir`.
fn tree_bytes(dir: &Path) -> u64 {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => tree_bytes(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map(|m| m.len()).unwrap_or(0),
            _ => 0,
        })
        .sum()
}

impl Walker<'_> {
    fn clone_dir(&mut self, src: &Path, dest: &Path) -> Result<(), StoreError> {
        let meta = fs::symlink_metadata(src).ctx("read", src)?;
        fs::create_dir(dest).ctx("create directory", dest)?;
        for entry in fs::read_dir(src).ctx("list", src)? {
            let entry = entry.ctx("list", src)?;
            let from = entry.path();
            let to = dest.join(entry.file_name());
            let kind = entry.file_type().ctx("read", &from)?;
            if kind.is_dir() {
                self.clone_dir(&from, &to)?;
            } else if kind.is_file() {
                self.clone_file(&from, &to)?;
            } else if kind.is_symlink() {
                let target = fs::read_link(&from).ctx("read link", &from)?;
                std::os::unix::fs::symlink(&target, &to).ctx("create symlink", &to)?;
                if let Some(o) = self.owner {
                    lchown(&to, Some(o.uid), Some(o.gid)).ctx("chown", &to)?;
                }
            } else {
                // Sockets and FIFOs are runtime artefacts, never part of a state.
                tracing::warn!(path = %from.display(), "skipping a special file");
            }
        }
        // Permissions last, so a read-only source directory can still be filled.
        fs::set_permissions(dest, meta.permissions()).ctx("chmod", dest)?;
        chown_to(dest, self.owner)
    }

    fn clone_file(&mut self, src: &Path, dest: &Path) -> Result<(), StoreError> {
        let mut from = File::open(src).ctx("open", src)?;
        let meta = from.metadata().ctx("read", src)?;
        let mut to = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(dest)
            .ctx("create", dest)?;
        let mut copy = !self.reflink;
        if self.reflink {
            match ficlone(&from, &to) {
                Ok(()) => {}
                Err(e) if is_reflink_unsupported(&e) => {
                    tracing::warn!(src = %src.display(), dest = %dest.display(), error = %e,
                        "reflink refused, copying the rest of the tree");
                    self.reflink = false;
                    copy = true;
                }
                Err(e) => return Err(e).ctx("reflink", dest),
            }
        }
        if copy {
            io::copy(&mut from, &mut to).ctx("copy to", dest)?;
        }
        fs::set_permissions(dest, meta.permissions()).ctx("chmod", dest)?;
        chown_to(dest, self.owner)?;
        self.files += 1;
        self.bytes += meta.len();
        if let (true, Some(report)) = (copy, self.progress) {
            let root = self.root;
            let total = *self.total.get_or_insert_with(|| tree_bytes(root));
            report(self.bytes, total.max(self.bytes));
        }
        Ok(())
    }
}
