//! The object-storage tier: uploads a local snapshot directory (`manifest.json` and `data/`,
//! as [`taidon_store::LocalStore`] publishes it) to an S3-compatible bucket and restores it.
//!
//! Layout under the configured prefix:
//!
//! ```text
//! <prefix>/chunks/<sha256>          a 4 MiB (or shorter, last) piece of a file, zstd-compressed;
//!                                   named by the SHA-256 of its uncompressed bytes, stored once
//! <prefix>/manifests/<state-id>.json the remote manifest (see [`RemoteManifest`]), written last
//!                                   and create-only, so a reader sees nothing or everything
//! ```
#![cfg_attr(not(test), deny(clippy::unwrap_used))]
#![deny(clippy::todo, clippy::dbg_macro)]

mod config;
mod error;
mod manifest;
mod tree;

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::{stream, StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3Builder, S3ConditionalPut};
use object_store::path::Path as Key;
use object_store::{ObjectStore, PutMode, PutOptions, PutPayload};
use sha2::{Digest, Sha256};
use taidon_core::StateId;
use taidon_store::Manifest;

pub use config::RemoteConfig;
pub use error::RemoteError;
pub use manifest::{Entry, RemoteManifest, FORMAT};

use error::IoContext;

/// Bytes of uncompressed data per chunk.
pub const CHUNK_SIZE: u64 = 4 * 1024 * 1024;

/// How many chunk transfers run at once by default.
const DEFAULT_PARALLELISM: usize = 8;

const ZSTD_LEVEL: i32 = 3;

/// What an upload did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UploadReport {
    /// Chunks put into the bucket.
    pub chunks_uploaded: u64,
    /// Distinct chunks that were in the bucket already.
    pub chunks_skipped: u64,
    /// Compressed bytes of the chunks put (the manifest not included).
    pub bytes_uploaded: u64,
    /// False when a racing upload had written the same state's manifest first.
    pub manifest_created: bool,
}

/// Snapshots in an S3-compatible bucket (or any [`ObjectStore`]) under a key prefix.
#[derive(Debug, Clone)]
pub struct RemoteStore {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    parallelism: usize,
}

impl RemoteStore {
    /// Connects to the bucket of a config (validated here), with credentials from the AWS
    /// environment variables.
    pub fn connect(config: &RemoteConfig) -> Result<Self, RemoteError> {
        let mut config = config.clone();
        config.validate()?;
        let (bucket, prefix) = config.bucket_and_prefix();
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .with_region(&config.region)
            .with_allow_http(config.allow_http)
            .with_conditional_put(S3ConditionalPut::ETagMatch);
        if let Some(endpoint) = &config.endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        let store = builder.build().map_err(|source| RemoteError::Request {
            op: "connect to",
            key: config.url.clone(),
            source,
        })?;
        Ok(Self::with_store(Arc::new(store), prefix))
    }

    /// A store over any object store (tests use an in-memory one).
    pub fn with_store(store: Arc<dyn ObjectStore>, prefix: &str) -> Self {
        Self {
            store,
            prefix: prefix.trim_matches('/').to_owned(),
            parallelism: DEFAULT_PARALLELISM,
        }
    }

    /// Sets how many chunk transfers run at once (at least one).
    pub fn with_parallelism(mut self, parallelism: usize) -> Self {
        self.parallelism = parallelism.max(1);
        self
    }

    /// The object store underneath (tests use it to damage objects).
    pub fn objects(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    fn key(&self, rest: &str) -> Key {
        if self.prefix.is_empty() {
            Key::from(rest)
        } else {
            Key::from(format!("{}/{rest}", self.prefix))
        }
    }

    /// The key of a chunk.
    pub fn chunk_key(&self, hash: &str) -> Key {
        self.key(&format!("chunks/{hash}"))
    }

    /// The key of a state's manifest.
    pub fn manifest_key(&self, id: &StateId) -> Key {
        self.key(&format!("manifests/{id}.json"))
    }

    /// Uploads the local snapshot directory `snapshot` (`manifest.json` and `data/`): the
    /// chunks the bucket lacks, then the manifest. If another upload of the same state won,
    /// checks that its tree checksum is ours.
    pub async fn upload(&self, snapshot: &Path) -> Result<UploadReport, RemoteError> {
        let manifest_path = snapshot.join("manifest.json");
        let text = tokio::fs::read(&manifest_path)
            .await
            .ctx("read", &manifest_path)?;
        let local: Manifest =
            serde_json::from_slice(&text).map_err(|source| RemoteError::LocalManifest {
                path: manifest_path.clone(),
                source,
            })?;
        let id = local.state_id;
        let data = snapshot.join("data");
        let scanned = {
            let data = data.clone();
            tokio::task::spawn_blocking(move || tree::scan(&data))
                .await
                .map_err(|e| RemoteError::Task(e.to_string()))??
        };
        if scanned.checksum != local.checksum {
            return Err(RemoteError::ChecksumMismatch {
                state: id,
                what: format!(
                    "local data is {}, its manifest says {}",
                    scanned.checksum, local.checksum
                ),
            });
        }

        // Each distinct chunk once, wherever it first occurs.
        let mut seen = HashSet::new();
        let jobs: Vec<tree::ChunkSource> = scanned
            .sources
            .into_iter()
            .filter(|s| seen.insert(s.hash.clone()))
            .collect();
        let results: Vec<Option<u64>> = stream::iter(jobs)
            .map(|source| self.upload_chunk(source))
            .buffer_unordered(self.parallelism)
            .try_collect()
            .await?;
        let mut report = UploadReport::default();
        for put in results {
            match put {
                Some(bytes) => {
                    report.chunks_uploaded += 1;
                    report.bytes_uploaded += bytes;
                }
                None => report.chunks_skipped += 1,
            }
        }

        let remote = RemoteManifest {
            format: FORMAT,
            snapshot: local,
            chunk_size: CHUNK_SIZE,
            root_mode: scanned.root_mode,
            entries: scanned.entries,
        };
        let body = remote
            .encode()
            .map_err(|source| RemoteError::LocalManifest {
                path: manifest_path,
                source,
            })?;
        let key = self.manifest_key(&id);
        let opts = PutOptions::from(PutMode::Create);
        match self
            .store
            .put_opts(&key, PutPayload::from(body), opts)
            .await
        {
            Ok(_) => report.manifest_created = true,
            Err(object_store::Error::AlreadyExists { .. }) => {
                let winner = self
                    .manifest(&id)
                    .await?
                    .ok_or(RemoteError::UnknownState(id))?;
                if winner.snapshot.checksum != remote.snapshot.checksum {
                    return Err(RemoteError::ChecksumMismatch {
                        state: id,
                        what: format!(
                            "the bucket's snapshot is {}, ours is {}",
                            winner.snapshot.checksum, remote.snapshot.checksum
                        ),
                    });
                }
                tracing::debug!(state = %id, "a racing upload published this state first");
            }
            Err(source) => {
                return Err(RemoteError::Request {
                    op: "put",
                    key: key.to_string(),
                    source,
                })
            }
        }
        Ok(report)
    }

    /// Puts one chunk unless the bucket has it; the compressed bytes put, or `None`.
    async fn upload_chunk(&self, source: tree::ChunkSource) -> Result<Option<u64>, RemoteError> {
        let key = self.chunk_key(&source.hash);
        match self.store.head(&key).await {
            Ok(_) => return Ok(None),
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => {
                return Err(RemoteError::Request {
                    op: "look up",
                    key: key.to_string(),
                    source: e,
                })
            }
        }
        let compressed = tokio::task::spawn_blocking(move || source.read_compressed(ZSTD_LEVEL))
            .await
            .map_err(|e| RemoteError::Task(e.to_string()))??;
        let len = compressed.len() as u64;
        // Content-addressed: a racing put of the same key writes the same bytes.
        self.store
            .put(&key, PutPayload::from(compressed))
            .await
            .map_err(|e| RemoteError::Request {
                op: "put",
                key: key.to_string(),
                source: e,
            })?;
        Ok(Some(len))
    }

    /// The remote manifest of `id`, checked against its recorded hash; `None` if absent.
    pub async fn manifest(&self, id: &StateId) -> Result<Option<RemoteManifest>, RemoteError> {
        let key = self.manifest_key(id);
        let bytes = match self.store.get(&key).await {
            Ok(got) => got.bytes().await,
            Err(e) => Err(e),
        };
        match bytes {
            Ok(bytes) => RemoteManifest::decode(id, &bytes).map(Some),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(source) => Err(RemoteError::Request {
                op: "get",
                key: key.to_string(),
                source,
            }),
        }
    }

    /// Restores `id` into `target` (which must not exist) as a local snapshot directory:
    /// `manifest.json` and `data/`. Every chunk and the tree checksum are verified; on any
    /// failure `target` is removed.
    pub async fn restore(&self, id: &StateId, target: &Path) -> Result<Manifest, RemoteError> {
        let manifest = self
            .manifest(id)
            .await?
            .ok_or(RemoteError::UnknownState(*id))?;
        tokio::fs::create_dir(target).await.map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                RemoteError::DestinationExists(target.to_path_buf())
            } else {
                RemoteError::Io {
                    op: "create",
                    path: target.to_path_buf(),
                    source: e,
                }
            }
        })?;
        let result = self.restore_into(&manifest, target).await;
        if result.is_err() {
            let target = target.to_path_buf();
            let removed =
                tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&target)).await;
            if let Ok(Err(e)) = removed {
                tracing::warn!(error = %e, "cannot remove a partial restore");
            }
        }
        result.map(|()| manifest.snapshot)
    }

    async fn restore_into(
        &self,
        manifest: &RemoteManifest,
        target: &Path,
    ) -> Result<(), RemoteError> {
        let id = manifest.snapshot.state_id;
        let data = target.join("data");
        let writes = {
            let (data, entries) = (data.clone(), manifest.entries.clone());
            let chunk_size = manifest.chunk_size;
            tokio::task::spawn_blocking(move || tree::lay_out(&data, &entries, chunk_size))
                .await
                .map_err(|e| RemoteError::Task(e.to_string()))??
        };
        stream::iter(writes)
            .map(|write| self.restore_chunk(id, write))
            .buffer_unordered(self.parallelism)
            .try_collect::<Vec<()>>()
            .await?;

        let checksum = {
            let (data, entries) = (data.clone(), manifest.entries.clone());
            let root_mode = manifest.root_mode;
            tokio::task::spawn_blocking(move || {
                tree::set_modes(&data, root_mode, &entries)?;
                Ok::<_, RemoteError>(taidon_store::tree_digest(&data)?.checksum)
            })
            .await
            .map_err(|e| RemoteError::Task(e.to_string()))??
        };
        if checksum != manifest.snapshot.checksum {
            return Err(RemoteError::ChecksumMismatch {
                state: id,
                what: format!(
                    "restored data is {checksum}, the manifest says {}",
                    manifest.snapshot.checksum
                ),
            });
        }
        let local = serde_json::to_vec_pretty(&manifest.snapshot).map_err(|source| {
            RemoteError::LocalManifest {
                path: target.join("manifest.json"),
                source,
            }
        })?;
        let path = target.join("manifest.json");
        tokio::fs::write(&path, local).await.ctx("write", &path)?;
        Ok(())
    }

    /// Fetches one chunk, checks it, and writes it where it belongs.
    async fn restore_chunk(&self, id: StateId, write: tree::ChunkWrite) -> Result<(), RemoteError> {
        let key = self.chunk_key(&write.hash);
        let compressed: Bytes = match self.store.get(&key).await {
            Ok(got) => got.bytes().await,
            Err(e) => Err(e),
        }
        .map_err(|source| RemoteError::Request {
            op: "get",
            key: key.to_string(),
            source,
        })?;
        tokio::task::spawn_blocking(move || {
            let mismatch = |what: String| RemoteError::ChecksumMismatch { state: id, what };
            let data = zstd::bulk::decompress(&compressed, write.len as usize)
                .map_err(|e| mismatch(format!("chunk {} does not decompress ({e})", write.hash)))?;
            let actual = hex::encode(Sha256::digest(&data));
            if data.len() as u64 != write.len || actual != write.hash {
                return Err(mismatch(format!(
                    "chunk {} holds {} bytes hashing to {actual}",
                    write.hash,
                    data.len()
                )));
            }
            write.write(&data)
        })
        .await
        .map_err(|e| RemoteError::Task(e.to_string()))?
    }
}
