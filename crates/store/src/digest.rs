//! The size and checksum of a data directory.
//!
//! The checksum is `sha256:` and the lowercase hex SHA-256 of the tree's entries (the root
//! itself excluded) in byte order of their relative paths (`/`-separated), each encoded as:
//!
//! ```text
//! directory:     "d" NUL relpath NUL
//! regular file:  "f" NUL relpath NUL len NUL content     ; len: decimal byte length
//! symlink:       "l" NUL relpath NUL len NUL target
//! ```
//!
//! Modes, owners and times are not part of it. Other file types (sockets, FIFOs) are skipped,
//! as clones skip them.

use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{IoContext, StoreError};

/// The logical size and the checksum of a tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeDigest {
    /// Sum of the lengths of the regular files.
    pub size_bytes: u64,
    /// `sha256:<hex>` over the encoding documented in this module.
    pub checksum: String,
}

enum Kind {
    Dir,
    File,
    Symlink,
}

/// Computes the size and checksum of the tree at `dir`.
pub fn tree_digest(dir: &Path) -> Result<TreeDigest, StoreError> {
    let mut entries = Vec::new();
    collect(dir, &[], &mut entries)?;
    entries.sort_by(|a, b| a.0.cmp(&b.0));

    let mut hasher = Sha256::new();
    let mut size_bytes = 0u64;
    let mut buf = vec![0u8; 256 * 1024];
    for (rel, kind, path) in &entries {
        let tag: &[u8] = match kind {
            Kind::Dir => b"d",
            Kind::File => b"f",
            Kind::Symlink => b"l",
        };
        hasher.update(tag);
        hasher.update([0]);
        hasher.update(rel);
        hasher.update([0]);
        match kind {
            Kind::Dir => {}
            Kind::File => size_bytes += hash_file(path, &mut hasher, &mut buf)?,
            Kind::Symlink => {
                let target = fs::read_link(path).ctx("read link", path)?;
                let target = target.as_os_str().as_bytes();
                hasher.update(target.len().to_string().as_bytes());
                hasher.update([0]);
                hasher.update(target);
            }
        }
    }
    Ok(TreeDigest {
        size_bytes,
        checksum: format!("sha256:{}", hex::encode(hasher.finalize())),
    })
}

/// Hashes `len NUL content` of one file and returns `len`.
fn hash_file(path: &Path, hasher: &mut Sha256, buf: &mut [u8]) -> Result<u64, StoreError> {
    let mut file = File::open(path).ctx("open", path)?;
    let len = file.metadata().ctx("read", path)?.len();
    hasher.update(len.to_string().as_bytes());
    hasher.update([0]);
    let mut read = 0u64;
    loop {
        let n = match file.read(buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).ctx("read", path),
        };
        hasher.update(&buf[..n]);
        read += n as u64;
    }
    if read != len {
        // The declared length must match the content, or the encoding stops being injective.
        return Err(io::Error::other("file changed while being checksummed")).ctx("checksum", path);
    }
    Ok(len)
}

fn collect(
    dir: &Path,
    prefix: &[u8],
    out: &mut Vec<(Vec<u8>, Kind, PathBuf)>,
) -> Result<(), StoreError> {
    for entry in fs::read_dir(dir).ctx("list", dir)? {
        let entry = entry.ctx("list", dir)?;
        let path = entry.path();
        let mut rel = prefix.to_vec();
        if !rel.is_empty() {
            rel.push(b'/');
        }
        rel.extend_from_slice(entry.file_name().as_bytes());
        let ft = entry.file_type().ctx("read", &path)?;
        if ft.is_dir() {
            collect(&path, &rel, out)?;
            out.push((rel, Kind::Dir, path));
        } else if ft.is_file() {
            out.push((rel, Kind::File, path));
        } else if ft.is_symlink() {
            out.push((rel, Kind::Symlink, path));
        }
    }
    Ok(())
}
