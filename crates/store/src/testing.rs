//! Test helpers: real copy-on-write file systems on loop devices, and an in-memory
//! [`FakeStore`] for the tests of the crates above this one.
//!
//! Loop mounts need root and the `mkfs.*` tools. [`cow_fs_or_skip`] turns their absence into a
//! loud skip, or into a failure when `TAIDON_REQUIRE_COW=1` (as CI sets it).

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub use crate::fake::{fake_engine, FakeStore};

/// A fresh file system in a sparse image file, loop-mounted on `mount`; unmounted and detached
/// on drop.
#[derive(Debug)]
pub struct LoopFs {
    /// Where the file system is mounted (mode 0755, owned by root).
    pub mount: PathBuf,
    device: String,
    // Dropped after `Drop::drop` has unmounted: it holds the image and the mount point.
    _dir: tempfile::TempDir,
}

impl LoopFs {
    /// An XFS with reflink support, `size_bytes` large (XFS wants at least 300 MiB).
    pub fn xfs_reflink(size_bytes: u64) -> io::Result<LoopFs> {
        Self::make(size_bytes, "mkfs.xfs", &["-q", "-m", "reflink=1"])
    }

    /// A btrfs, `size_bytes` large (at least 128 MiB).
    pub fn btrfs(size_bytes: u64) -> io::Result<LoopFs> {
        Self::make(size_bytes, "mkfs.btrfs", &["-q"])
    }

    fn make(size_bytes: u64, mkfs: &str, args: &[&str]) -> io::Result<LoopFs> {
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "loop mounts need root",
            ));
        }
        let dir = tempfile::Builder::new()
            .prefix("taidon-loopfs-")
            .tempdir()?;
        // Servers run as `postgres` must traverse down to the mount.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o711))?;
        let image = dir.path().join("fs.img");
        File::create(&image)?.set_len(size_bytes)?;
        let mut mkfs_args: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
        mkfs_args.push(image.as_os_str());
        run(mkfs, &mkfs_args)?;
        let mount = dir.path().join("mnt");
        fs::create_dir(&mount)?;
        let device = run(
            "losetup",
            &[
                OsStr::new("--find"),
                OsStr::new("--show"),
                image.as_os_str(),
            ],
        )?
        .trim()
        .to_owned();
        if let Err(e) = run("mount", &[OsStr::new(&device), mount.as_os_str()]) {
            let _ = run("losetup", &[OsStr::new("-d"), OsStr::new(&device)]);
            return Err(e);
        }
        let fs = LoopFs {
            mount,
            device,
            _dir: dir,
        };
        fs::set_permissions(&fs.mount, fs::Permissions::from_mode(0o755))?;
        Ok(fs)
    }

    /// The loop device, such as `/dev/loop3`.
    pub fn device(&self) -> &str {
        &self.device
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        if run("umount", &[self.mount.as_os_str()]).is_err() {
            // Something still holds it open: detach now, the kernel finishes later.
            if let Err(e) = run("umount", &[OsStr::new("-l"), self.mount.as_os_str()]) {
                eprintln!("cannot unmount {}: {e}", self.mount.display());
                return;
            }
        }
        if let Err(e) = run("losetup", &[OsStr::new("-d"), OsStr::new(&self.device)]) {
            // `mount` may have set autoclear and detached it already.
            if Path::new(&self.device).exists() && loop_backing(&self.device).is_some() {
                eprintln!("cannot detach {}: {e}", self.device);
            }
        }
    }
}

/// Whether tests must fail instead of skipping when no copy-on-write file system can be made.
pub fn cow_required() -> bool {
    std::env::var("TAIDON_REQUIRE_COW").is_ok_and(|v| v == "1")
}

/// The file system `make` builds, or None after a loud SKIP line; panics instead of skipping
/// when [`cow_required`].
pub fn cow_fs_or_skip(test: &str, make: impl FnOnce() -> io::Result<LoopFs>) -> Option<LoopFs> {
    match make() {
        Ok(fs) => Some(fs),
        Err(e) if cow_required() => {
            panic!("{test}: TAIDON_REQUIRE_COW=1 but no loop file system: {e}")
        }
        Err(e) => {
            eprintln!("SKIP {test}: cannot make a loop file system ({e}); set TAIDON_REQUIRE_COW=1 to fail instead");
            None
        }
    }
}

fn loop_backing(device: &str) -> Option<String> {
    let name = Path::new(device).file_name()?.to_str()?;
    fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")).ok()
}

/// Runs a tool and returns its stdout; its stderr becomes the error.
fn run(program: &str, args: &[&OsStr]) -> io::Result<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("cannot run {program}: {e}")))?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "{program} {:?} failed ({}): {}",
            args,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
