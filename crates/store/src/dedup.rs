//! Sharing unchanged files between a snapshot and its parent, on file systems without
//! reflinks. Snapshots are immutable (instances, spares and builds get their own copies), so a
//! file a step did not change can be the parent's very inode: a hard link. A chain of steps
//! over a large database then stores each step's changes, not a full copy per checkpoint.
//!
//! Usage counts every inode once.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::error::{IoContext, StoreError};

/// What linking saved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Linked {
    pub files: u64,
    pub bytes: u64,
}

/// Replaces every regular file under `build` whose twin under `parent` (same relative path,
/// size, mode, owner and content) exists by a hard link to that twin.
pub fn link_unchanged(parent: &Path, build: &Path) -> Result<Linked, StoreError> {
    let mut linked = Linked::default();
    walk(parent, build, &mut linked)?;
    Ok(linked)
}

fn walk(parent: &Path, build: &Path, linked: &mut Linked) -> Result<(), StoreError> {
    for entry in fs::read_dir(build).ctx("list", build)? {
        let entry = entry.ctx("list", build)?;
        let path = entry.path();
        let twin = parent.join(entry.file_name());
        let kind = entry.file_type().ctx("read", &path)?;
        if kind.is_dir() {
            if twin.is_dir() {
                walk(&twin, &path, linked)?;
            }
            continue;
        }
        if !kind.is_file() {
            continue;
        }
        let (Ok(mine), Ok(theirs)) = (fs::symlink_metadata(&path), fs::symlink_metadata(&twin))
        else {
            continue;
        };
        if !theirs.is_file()
            || mine.len() != theirs.len()
            || mine.mode() != theirs.mode()
            || (mine.uid(), mine.gid()) != (theirs.uid(), theirs.gid())
            || (mine.dev(), mine.ino()) == (theirs.dev(), theirs.ino())
        {
            continue;
        }
        if !same_content(&path, &twin)? {
            continue;
        }
        let tmp = path.with_file_name(format!(".link-{}", entry.file_name().to_string_lossy()));
        let _ = fs::remove_file(&tmp);
        match fs::hard_link(&twin, &tmp) {
            Ok(()) => {}
            // Another file system, or too many links: keep the copy.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EXDEV | libc::EMLINK)) => continue,
            Err(e) => return Err(e).ctx("link", &tmp),
        }
        fs::rename(&tmp, &path).ctx("replace by a link", &path)?;
        linked.files += 1;
        linked.bytes += mine.len();
    }
    Ok(())
}

/// Whether two files of equal size hold the same bytes (stops at the first difference).
fn same_content(a: &Path, b: &Path) -> Result<bool, StoreError> {
    let mut fa = File::open(a).ctx("open", a)?;
    let mut fb = File::open(b).ctx("open", b)?;
    let mut ba = vec![0u8; 256 << 10];
    let mut bb = vec![0u8; 256 << 10];
    loop {
        let n = read_full(&mut fa, &mut ba).ctx("read", a)?;
        let m = read_full(&mut fb, &mut bb).ctx("read", b)?;
        if n != m || ba[..n] != bb[..m] {
            return Ok(false);
        }
        if n == 0 {
            return Ok(true);
        }
    }
}

/// Reads until `buf` is full or the file ends; how many bytes it read.
pub fn read_full(f: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match f.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Bytes of the regular files under `dirs`, each inode counted once.
pub fn unique_bytes<'a>(dirs: impl IntoIterator<Item = &'a Path>) -> Result<u64, StoreError> {
    let mut seen = HashSet::new();
    let mut total = 0;
    for dir in dirs {
        count(dir, &mut seen, &mut total)?;
    }
    Ok(total)
}

fn count(dir: &Path, seen: &mut HashSet<(u64, u64)>, total: &mut u64) -> Result<(), StoreError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        // A snapshot removed while we count.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).ctx("list", dir),
    };
    for entry in entries {
        let entry = entry.ctx("list", dir)?;
        let Ok(meta) = entry.metadata() else { continue };
        if meta.is_dir() {
            count(&entry.path(), seen, total)?;
        } else if meta.is_file() && seen.insert((meta.dev(), meta.ino())) {
            *total += meta.len();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unchanged_files_become_links_and_count_once() {
        let dir = tempfile::tempdir().unwrap();
        let (p, b) = (dir.path().join("p"), dir.path().join("b"));
        for d in [&p, &b] {
            fs::create_dir_all(d.join("base/1")).unwrap();
            fs::write(d.join("base/1/same"), vec![7u8; 300_000]).unwrap();
            fs::write(d.join("PG_VERSION"), "15\n").unwrap();
        }
        fs::write(p.join("base/1/changed"), vec![1u8; 1000]).unwrap();
        fs::write(b.join("base/1/changed"), vec![2u8; 1000]).unwrap();
        fs::write(b.join("base/1/new"), b"new").unwrap();
        // Same size, other bytes at the very end.
        let mut tail = vec![7u8; 300_000];
        fs::write(p.join("base/1/tail"), &tail).unwrap();
        tail[299_999] = 8;
        fs::write(b.join("base/1/tail"), &tail).unwrap();
        assert_eq!(
            unique_bytes([p.as_path(), b.as_path()]).unwrap(),
            2 * (300_000 + 3 + 1000 + 300_000) + 3
        );
        let linked = link_unchanged(&p, &b).unwrap();
        assert_eq!(
            linked,
            Linked {
                files: 2,
                bytes: 300_003
            }
        );
        let ino = |f: &Path| fs::metadata(f).unwrap().ino();
        assert_eq!(ino(&b.join("base/1/same")), ino(&p.join("base/1/same")));
        assert_ne!(
            ino(&b.join("base/1/changed")),
            ino(&p.join("base/1/changed"))
        );
        assert_ne!(ino(&b.join("base/1/tail")), ino(&p.join("base/1/tail")));
        assert_eq!(fs::read(b.join("base/1/changed")).unwrap(), vec![2u8; 1000]);
        assert_eq!(
            unique_bytes([p.as_path(), b.as_path()]).unwrap(),
            (300_000 + 3 + 1000 + 300_000) + (1000 + 300_000) + 3
        );
        // Nothing is left behind, and linking again changes nothing.
        assert!(fs::read_dir(b.join("base/1")).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with(".link-")));
        assert_eq!(link_unchanged(&p, &b).unwrap(), Linked::default());
    }
}
