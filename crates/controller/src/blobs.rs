//! Input blobs: every file a prepare step reads, stored once by the SHA-256 of its content in
//! `<home>/inputs/<sha256>`. Clients upload what the controller lacks; steps are replayed from
//! here by the runtime (also long after, to restore a COLD state), never from a client's
//! file system.
//!
//! An upload streams into `<home>/inputs/.upload-*`, is hashed as it comes, and only a blob
//! whose content matches its name is fsynced and renamed into place: a reader sees a whole blob
//! or none, also after a crash mid-upload (leftovers are removed at start).

use std::io;
use std::path::{Path, PathBuf};

use futures_util::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

/// Why an upload was refused.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("{0:?} is not a SHA-256 (64 lowercase hex digits)")]
    BadName(String),
    #[error("the content's SHA-256 is {actual}, not {expected}: nothing was stored")]
    Mismatch { expected: String, actual: String },
    #[error("the blob is larger than the limit of {limit_mb} MiB")]
    TooLarge { limit_mb: u64 },
    #[error("the upload broke off: {0}")]
    Body(String),
    #[error("cannot store the blob: {0}")]
    Io(#[from] io::Error),
}

/// The blob directory.
#[derive(Debug, Clone)]
pub struct BlobStore {
    dir: PathBuf,
    max_bytes: u64,
}

const UPLOAD_PREFIX: &str = ".upload-";

/// Whether `s` can name a blob.
pub fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl BlobStore {
    /// The store in `dir` (created), taking blobs of at most `max_mb` MiB; unfinished uploads
    /// of an earlier run are removed.
    pub fn open(dir: PathBuf, max_mb: u64) -> io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        for entry in std::fs::read_dir(&dir)?.flatten() {
            if entry
                .file_name()
                .to_string_lossy()
                .starts_with(UPLOAD_PREFIX)
            {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(Self {
            dir,
            max_bytes: max_mb.saturating_mul(1 << 20),
        })
    }

    /// Where the blob `sha256` lies (whether or not it is there).
    pub fn path(&self, sha256: &str) -> PathBuf {
        self.dir.join(sha256)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn contains(&self, sha256: &str) -> bool {
        is_sha256(sha256) && self.path(sha256).is_file()
    }

    /// Those of `wanted` that are not stored, in order, each once.
    pub fn missing(&self, wanted: &[String]) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for w in wanted {
            if !self.contains(w) && !out.contains(w) {
                out.push(w.clone());
            }
        }
        out
    }

    /// Stores `body` as the blob `sha256` if its content has that hash. An existing blob is
    /// kept (its content is the same by construction) and the body is not read.
    pub async fn put<S, B, E>(&self, sha256: &str, body: S) -> Result<bool, BlobError>
    where
        S: Stream<Item = Result<B, E>> + Unpin,
        B: AsRef<[u8]>,
        E: std::fmt::Display,
    {
        if !is_sha256(sha256) {
            return Err(BlobError::BadName(sha256.to_owned()));
        }
        if self.contains(sha256) {
            return Ok(false);
        }
        let tmp = self.dir.join(format!(
            "{UPLOAD_PREFIX}{sha256}-{:016x}",
            rand::random::<u64>()
        ));
        let result = self.receive(&tmp, sha256, body).await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        result
    }

    async fn receive<S, B, E>(
        &self,
        tmp: &Path,
        sha256: &str,
        mut body: S,
    ) -> Result<bool, BlobError>
    where
        S: Stream<Item = Result<B, E>> + Unpin,
        B: AsRef<[u8]>,
        E: std::fmt::Display,
    {
        let mut file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(tmp)
            .await?;
        let mut hasher = Sha256::new();
        let mut size: u64 = 0;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| BlobError::Body(e.to_string()))?;
            let bytes = chunk.as_ref();
            size += bytes.len() as u64;
            if size > self.max_bytes {
                return Err(BlobError::TooLarge {
                    limit_mb: self.max_bytes >> 20,
                });
            }
            hasher.update(bytes);
            file.write_all(bytes).await?;
        }
        let actual = hex::encode(hasher.finalize());
        if actual != sha256 {
            return Err(BlobError::Mismatch {
                expected: sha256.to_owned(),
                actual,
            });
        }
        file.sync_all().await?;
        drop(file);
        tokio::fs::rename(tmp, self.path(sha256)).await?;
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || std::fs::File::open(dir).and_then(|d| d.sync_all()))
            .await
            .map_err(|e| BlobError::Io(io::Error::other(e.to_string())))??;
        Ok(true)
    }
}

/// Whether `path` is a plain relative path that stays under its root: no `..`, not absolute.
pub fn stays_under_root(path: &str) -> bool {
    !path.starts_with('/') && path.split('/').all(|p| p != "..")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(content: &[u8]) -> String {
        hex::encode(Sha256::digest(content))
    }

    fn chunks(
        parts: &[&'static [u8]],
    ) -> impl Stream<Item = Result<&'static [u8], io::Error>> + Unpin {
        futures_util::stream::iter(parts.iter().map(|p| Ok(*p)).collect::<Vec<_>>())
    }

    #[tokio::test]
    async fn a_blob_is_stored_under_its_hash_and_only_then() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path().join("inputs"), 1).unwrap();
        let id = sha(b"create table t();");
        assert_eq!(store.missing(&[id.clone(), id.clone()]), [id.as_str()]);
        assert!(store
            .put(&id, chunks(&[b"create ", b"table t();"]))
            .await
            .unwrap());
        assert!(store.contains(&id));
        assert_eq!(
            std::fs::read(store.path(&id)).unwrap(),
            b"create table t();"
        );
        assert!(store.missing(std::slice::from_ref(&id)).is_empty());
        // Again: kept, not rewritten.
        assert!(!store.put(&id, chunks(&[b"whatever"])).await.unwrap());
    }

    #[tokio::test]
    async fn a_wrong_hash_or_an_oversized_body_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path().join("inputs"), 1).unwrap();
        let id = sha(b"one");
        let e = store.put(&id, chunks(&[b"two"])).await.unwrap_err();
        assert!(matches!(e, BlobError::Mismatch { .. }), "{e}");
        static BIG: [u8; (1 << 20) + 1] = [0; (1 << 20) + 1];
        let big = sha(&BIG);
        let e = store.put(&big, chunks(&[&BIG])).await.unwrap_err();
        assert!(matches!(e, BlobError::TooLarge { limit_mb: 1 }), "{e}");
        let e = store.put("nope", chunks(&[b"x"])).await.unwrap_err();
        assert!(matches!(e, BlobError::BadName(_)), "{e}");
        let left: Vec<_> = std::fs::read_dir(store.dir()).unwrap().collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[tokio::test]
    async fn leftover_uploads_are_removed_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let inputs = dir.path().join("inputs");
        std::fs::create_dir_all(&inputs).unwrap();
        std::fs::write(inputs.join(".upload-abc-1"), b"half").unwrap();
        let store = BlobStore::open(inputs.clone(), 1).unwrap();
        assert_eq!(std::fs::read_dir(store.dir()).unwrap().count(), 0);
    }

    #[test]
    fn only_plain_relative_paths_stay_under_the_root() {
        assert!(stays_under_root("db/main.sql"));
        assert!(!stays_under_root("../x.sql"));
        assert!(!stays_under_root("/etc/passwd"));
        assert!(!stays_under_root("a/../../x"));
    }
}
