//! Blocking file work: reading a data directory into entries and chunks, and laying one out
//! again.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{symlink, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use taidon_store::dedup::read_full;

use crate::error::IoContext;
use crate::{Entry, RemoteError, CHUNK_SIZE};

/// Where one chunk's bytes are in the local tree.
#[derive(Debug, Clone)]
pub(crate) struct ChunkSource {
    pub path: PathBuf,
    pub offset: u64,
    pub len: u64,
    pub hash: String,
}

impl ChunkSource {
    /// The chunk's bytes, zstd-compressed.
    pub fn read_compressed(&self, level: i32) -> Result<Vec<u8>, RemoteError> {
        let file = File::open(&self.path).ctx("open", &self.path)?;
        let mut buf = vec![0u8; self.len as usize];
        file.read_exact_at(&mut buf, self.offset)
            .ctx("read", &self.path)?;
        if hex::encode(Sha256::digest(&buf)) != self.hash {
            return Err(io::Error::other("file changed during upload")).ctx("read", &self.path);
        }
        zstd::bulk::compress(&buf, level).ctx("compress", &self.path)
    }
}

/// A data directory read for upload.
pub(crate) struct Scanned {
    pub root_mode: u32,
    pub entries: Vec<Entry>,
    /// Every chunk of every file, in order (duplicates included).
    pub sources: Vec<ChunkSource>,
    /// The tree checksum, as `taidon_store::tree_digest` computes it.
    pub checksum: String,
}

/// Lists the tree at `data` (directories, regular files, symlinks; as the tree checksum does)
/// and hashes every chunk of every file.
pub(crate) fn scan(data: &Path) -> Result<Scanned, RemoteError> {
    let mut found = Vec::new();
    collect(data, "", &mut found)?;
    found.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));

    let mut entries = Vec::with_capacity(found.len());
    let mut sources = Vec::new();
    let mut buf = vec![0u8; CHUNK_SIZE as usize];
    for (rel, path) in found {
        let meta = fs::symlink_metadata(&path).ctx("read", &path)?;
        let mode = meta.permissions().mode() & 0o7777;
        let ft = meta.file_type();
        if ft.is_dir() {
            entries.push(Entry::Dir { path: rel, mode });
        } else if ft.is_symlink() {
            let target = fs::read_link(&path).ctx("read link", &path)?;
            let target = target
                .to_str()
                .ok_or_else(|| RemoteError::UnsupportedName(target.clone()))?
                .to_owned();
            entries.push(Entry::Symlink { path: rel, target });
        } else {
            let mut file = File::open(&path).ctx("open", &path)?;
            let mut size = 0u64;
            let mut chunks = Vec::new();
            loop {
                let n = read_full(&mut file, &mut buf).ctx("read", &path)?;
                if n == 0 {
                    break;
                }
                let hash = hex::encode(Sha256::digest(&buf[..n]));
                sources.push(ChunkSource {
                    path: path.clone(),
                    offset: size,
                    len: n as u64,
                    hash: hash.clone(),
                });
                chunks.push(hash);
                size += n as u64;
                if (n as u64) < CHUNK_SIZE {
                    break;
                }
            }
            entries.push(Entry::File {
                path: rel,
                mode,
                size,
                chunks,
            });
        }
    }
    let checksum = taidon_store::tree_digest(data)?.checksum;
    let root_mode = fs::metadata(data).ctx("read", data)?.permissions().mode() & 0o7777;
    Ok(Scanned {
        root_mode,
        entries,
        sources,
        checksum,
    })
}

fn collect(dir: &Path, prefix: &str, out: &mut Vec<(String, PathBuf)>) -> Result<(), RemoteError> {
    for entry in fs::read_dir(dir).ctx("list", dir)? {
        let entry = entry.ctx("list", dir)?;
        let path = entry.path();
        let name = entry.file_name();
        let name = name
            .to_str()
            .ok_or_else(|| RemoteError::UnsupportedName(path.clone()))?;
        let rel = if prefix.is_empty() {
            name.to_owned()
        } else {
            format!("{prefix}/{name}")
        };
        let ft = entry.file_type().ctx("read", &path)?;
        if ft.is_dir() {
            collect(&path, &rel, out)?;
            out.push((rel, path));
        } else if ft.is_file() || ft.is_symlink() {
            out.push((rel, path));
        }
    }
    Ok(())
}

/// Where one chunk's bytes go in the restored tree.
#[derive(Debug)]
pub(crate) struct ChunkWrite {
    pub path: PathBuf,
    pub offset: u64,
    pub len: u64,
    pub hash: String,
}

impl ChunkWrite {
    pub fn write(&self, bytes: &[u8]) -> Result<(), RemoteError> {
        let file = OpenOptions::new()
            .write(true)
            .open(&self.path)
            .ctx("open", &self.path)?;
        file.write_all_at(bytes, self.offset)
            .ctx("write", &self.path)
    }
}

/// Creates `data` with its directories, its files at their full sizes and its symlinks (last,
/// so no file is written through one), and returns the chunk writes that fill the files.
pub(crate) fn lay_out(
    data: &Path,
    entries: &[Entry],
    chunk_size: u64,
) -> Result<Vec<ChunkWrite>, RemoteError> {
    // An empty directory made by the caller (a local build) will do.
    let empty = || fs::read_dir(data).is_ok_and(|mut d| d.next().is_none());
    match fs::create_dir(data) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && empty() => {}
        other => other.ctx("create", data)?,
    }
    let mut writes = Vec::new();
    // Sorted by path, so a directory comes before what it holds.
    for entry in entries {
        if let Entry::Dir { path, .. } = entry {
            let path = data.join(path);
            fs::create_dir(&path).ctx("create", &path)?;
        }
    }
    for entry in entries {
        if let Entry::File {
            path, size, chunks, ..
        } = entry
        {
            let path = data.join(path);
            if chunk_size == 0 || (chunks.len() as u64) != size.div_ceil(chunk_size) {
                return Err(io::Error::other(
                    "the manifest's chunk list does not cover the file",
                ))
                .ctx("restore", &path);
            }
            let file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .ctx("create", &path)?;
            file.set_len(*size).ctx("write", &path)?;
            for (i, hash) in chunks.iter().enumerate() {
                let offset = i as u64 * chunk_size;
                writes.push(ChunkWrite {
                    path: path.clone(),
                    offset,
                    len: chunk_size.min(size - offset),
                    hash: hash.clone(),
                });
            }
        }
    }
    for entry in entries {
        if let Entry::Symlink { path, target } = entry {
            let path = data.join(path);
            symlink(target, &path).ctx("create", &path)?;
        }
    }
    Ok(writes)
}

/// Gives files and directories their recorded modes (directories deepest first, once their
/// contents are written).
pub(crate) fn set_modes(data: &Path, root_mode: u32, entries: &[Entry]) -> Result<(), RemoteError> {
    for entry in entries {
        if let Entry::File { path, mode, .. } = entry {
            let path = data.join(path);
            fs::set_permissions(&path, fs::Permissions::from_mode(*mode)).ctx("chmod", &path)?;
        }
    }
    for entry in entries.iter().rev() {
        if let Entry::Dir { path, mode } = entry {
            let path = data.join(path);
            fs::set_permissions(&path, fs::Permissions::from_mode(*mode)).ctx("chmod", &path)?;
        }
    }
    fs::set_permissions(data, fs::Permissions::from_mode(root_mode)).ctx("chmod", data)?;
    Ok(())
}

/// The tree checksum's header of one entry (see `taidon_store::tree_digest`): `kind NUL path
/// NUL`, then `len NUL` for a file or a symlink.
pub(crate) fn digest_header(kind: u8, path: &str, len: Option<u64>) -> Vec<u8> {
    let mut out = Vec::with_capacity(path.len() + 24);
    out.push(kind);
    out.push(0);
    out.extend_from_slice(path.as_bytes());
    out.push(0);
    if let Some(len) = len {
        out.extend_from_slice(len.to_string().as_bytes());
        out.push(0);
    }
    out
}
