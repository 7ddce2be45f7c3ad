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
mod tiered;
mod tree;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{stream, StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3Builder, S3ConditionalPut};
use object_store::path::Path as Key;
use object_store::{
    BackoffConfig, ClientOptions, ObjectStore, PutMode, PutOptions, PutPayload, RetryConfig,
};
use sha2::{Digest, Sha256};
use taidon_core::StateId;
use taidon_store::{ByteProgress, GcReport, Manifest};

pub use config::RemoteConfig;
pub use error::RemoteError;
pub use manifest::{Entry, RemoteManifest, FORMAT};
pub use tiered::{store_error, TierOptions, TieredStore};

use error::IoContext;

/// Bytes of uncompressed data per chunk.
pub const CHUNK_SIZE: u64 = 4 * 1024 * 1024;

/// How many chunk transfers run at once by default.
const DEFAULT_PARALLELISM: usize = 16;

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

/// What an upload did with one chunk.
enum ChunkPut {
    /// The bucket had it, young enough to rely on.
    Present,
    /// The bucket lacked it: put, this many compressed bytes.
    New(u64),
    /// The bucket had it but old: put again so that its age restarts.
    Refreshed(u64),
}

/// Snapshots in an S3-compatible bucket (or any [`ObjectStore`]) under a key prefix.
#[derive(Debug, Clone)]
pub struct RemoteStore {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    parallelism: usize,
    /// A chunk an upload finds in the bucket but older than this is put again, so that its
    /// age restarts: a collection (whose grace period is twice this) cannot delete it while
    /// the upload that relies on it is in flight.
    refresh_after: Option<Duration>,
    /// Manifests are immutable: each is read and verified once.
    manifests: Arc<Mutex<HashMap<StateId, Arc<RemoteManifest>>>>,
}

/// Chunks and manifests as one listing of the bucket found them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BucketUsage {
    pub chunks: u64,
    /// Compressed bytes of the chunks.
    pub chunk_bytes: u64,
    pub manifests: Vec<StateId>,
}

/// Retries a request that failed with a 5xx or a timeout a few times, within 20 s: an
/// unreachable endpoint fails in under two seconds, and the upload queue retries on its own
/// schedule.
fn retry_config() -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
            base: 2.0,
        },
        max_retries: 4,
        retry_timeout: Duration::from_secs(20),
    }
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
            // Client options first: they carry allow_http, which the call after sets.
            .with_client_options(
                ClientOptions::new()
                    .with_connect_timeout(Duration::from_secs(5))
                    .with_timeout(Duration::from_secs(120)),
            )
            .with_allow_http(config.allow_http)
            .with_conditional_put(S3ConditionalPut::ETagMatch)
            .with_retry(retry_config());
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
            refresh_after: None,
            manifests: Arc::default(),
        }
    }

    /// Puts again any chunk an upload needs that the bucket has but is older than `age`; set
    /// it to half the garbage collection's grace period.
    pub fn with_refresh_after(mut self, age: Duration) -> Self {
        self.refresh_after = Some(age);
        self
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

    /// The whole object at `key` (the request and the body read tried again as one).
    async fn get_bytes(&self, key: &Key) -> Result<Bytes, object_store::Error> {
        again_on_failure(|| async {
            match self.store.get(key).await {
                Ok(got) => got.bytes().await,
                Err(e) => Err(e),
            }
        })
        .await
    }

    /// The key of `rest` under the store's prefix.
    pub fn key_for(&self, rest: &str) -> Key {
        self.key(rest)
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
        let results: Vec<(ChunkPut, tree::ChunkSource)> = stream::iter(jobs)
            .map(|source| async move {
                let put = self.upload_chunk(&source).await?;
                Ok::<_, RemoteError>((put, source))
            })
            .buffer_unordered(self.parallelism)
            .try_collect()
            .await?;
        let mut report = UploadReport::default();
        let mut refreshed = Vec::new();
        for (put, source) in results {
            match put {
                ChunkPut::Present => report.chunks_skipped += 1,
                ChunkPut::New(bytes) | ChunkPut::Refreshed(bytes) => {
                    report.chunks_uploaded += 1;
                    report.bytes_uploaded += bytes;
                    if matches!(put, ChunkPut::Refreshed(_)) {
                        refreshed.push(source);
                    }
                }
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
        self.restore_refreshed(refreshed).await?;
        Ok(report)
    }

    /// A collection that listed an old chunk before this upload refreshed it may still delete
    /// it (S3 has no conditional delete). Now that the manifest protects them from every later
    /// collection, the refreshed chunks are looked up once more and any that went are put back.
    async fn restore_refreshed(
        &self,
        refreshed: Vec<tree::ChunkSource>,
    ) -> Result<(), RemoteError> {
        stream::iter(refreshed)
            .map(|source| async move {
                let key = self.chunk_key(&source.hash);
                match self.store.head(&key).await {
                    Ok(_) => Ok(()),
                    Err(object_store::Error::NotFound { .. }) => {
                        tracing::debug!(chunk = %source.hash, "a collection deleted a refreshed chunk; putting it back");
                        self.put_chunk(&source).await.map(drop)
                    }
                    Err(e) => Err(RemoteError::Request {
                        op: "look up",
                        key: key.to_string(),
                        source: e,
                    }),
                }
            })
            .buffer_unordered(self.parallelism)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }

    /// Puts one chunk unless the bucket has it young enough to rely on.
    async fn upload_chunk(&self, source: &tree::ChunkSource) -> Result<ChunkPut, RemoteError> {
        let key = self.chunk_key(&source.hash);
        match self.store.head(&key).await {
            Ok(meta) => {
                let age = (chrono_now_ms() - meta.last_modified.timestamp_millis()).max(0) as u64;
                let stale = self
                    .refresh_after
                    .is_some_and(|limit| Duration::from_millis(age) >= limit);
                if !stale {
                    return Ok(ChunkPut::Present);
                }
                tracing::debug!(chunk = %source.hash, "refreshing an old chunk");
                self.put_chunk(source).await.map(ChunkPut::Refreshed)
            }
            Err(object_store::Error::NotFound { .. }) => {
                self.put_chunk(source).await.map(ChunkPut::New)
            }
            Err(e) => Err(RemoteError::Request {
                op: "look up",
                key: key.to_string(),
                source: e,
            }),
        }
    }

    /// Puts one chunk; its compressed size.
    async fn put_chunk(&self, source: &tree::ChunkSource) -> Result<u64, RemoteError> {
        let key = self.chunk_key(&source.hash);
        let read = source.clone();
        let compressed = tokio::task::spawn_blocking(move || read.read_compressed(ZSTD_LEVEL))
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
        Ok(len)
    }

    /// The remote manifest of `id`, checked against its recorded hash; `None` if absent.
    pub async fn manifest(&self, id: &StateId) -> Result<Option<RemoteManifest>, RemoteError> {
        Ok(self.remote_manifest(id).await?.map(|m| (*m).clone()))
    }

    /// The verified manifest of `id`, shared (read once, then kept); `None` if absent.
    pub async fn remote_manifest(
        &self,
        id: &StateId,
    ) -> Result<Option<Arc<RemoteManifest>>, RemoteError> {
        if let Some(known) = self.cached_manifest(id) {
            return Ok(Some(known));
        }
        let key = self.manifest_key(id);
        let bytes = self.get_bytes(&key).await;
        match bytes {
            Ok(bytes) => {
                let manifest = Arc::new(RemoteManifest::decode(id, &bytes)?);
                self.lock_manifests().insert(*id, Arc::clone(&manifest));
                Ok(Some(manifest))
            }
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
            .remote_manifest(id)
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
        result.map(|()| manifest.snapshot.clone())
    }

    async fn restore_into(
        &self,
        manifest: &RemoteManifest,
        target: &Path,
    ) -> Result<(), RemoteError> {
        self.restore_data(manifest, &target.join("data"), None)
            .await?;
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

    /// Fills `data` (absent, or an empty directory) with `manifest`'s tree: parallel chunk
    /// downloads, each decompressed, checked against its hash and written as it arrives, while
    /// the tree checksum is computed over the same bytes in tree order (so the data is not
    /// read back). The caller removes `data` if this fails. `progress` hears the bytes written.
    pub async fn restore_data(
        &self,
        manifest: &RemoteManifest,
        data: &Path,
        progress: Option<ByteProgress>,
    ) -> Result<(), RemoteError> {
        let id = manifest.snapshot.state_id;
        let started = std::time::Instant::now();
        let writes = {
            let (data, entries) = (data.to_path_buf(), manifest.entries.clone());
            let chunk_size = manifest.chunk_size;
            tokio::task::spawn_blocking(move || tree::lay_out(&data, &entries, chunk_size))
                .await
                .map_err(|e| RemoteError::Task(e.to_string()))??
        };
        let total: u64 = writes.iter().map(|w| w.len).sum();
        let mut uses: HashMap<String, usize> = HashMap::new();
        for w in &writes {
            *uses.entry(w.hash.clone()).or_default() += 1;
        }
        // The tree checksum's encoding (see `taidon_store::tree_digest`), in entry order, with
        // each file's chunks in place: fetched the first time a chunk occurs, reused after.
        let mut items = Vec::with_capacity(writes.len() + manifest.entries.len());
        let mut writes = writes.into_iter();
        let mut seen = HashSet::new();
        for entry in &manifest.entries {
            match entry {
                Entry::Dir { path, .. } => {
                    items.push(Item::Bytes(tree::digest_header(b'd', path, None)))
                }
                Entry::Symlink { path, target } => {
                    let mut head = tree::digest_header(b'l', path, Some(target.len() as u64));
                    head.extend_from_slice(target.as_bytes());
                    items.push(Item::Bytes(head));
                }
                Entry::File {
                    path, size, chunks, ..
                } => {
                    items.push(Item::Bytes(tree::digest_header(b'f', path, Some(*size))));
                    for _ in chunks {
                        let write = writes
                            .next()
                            .ok_or_else(|| RemoteError::Task("chunk list out of step".into()))?;
                        items.push(if seen.insert(write.hash.clone()) {
                            Item::Fetch(write)
                        } else {
                            Item::Repeat(write)
                        });
                    }
                }
            }
        }

        let (pieces, mut rx) = tokio::sync::mpsc::channel::<Bytes>(self.parallelism * 2);
        let hasher = tokio::task::spawn_blocking(move || {
            let mut h = Sha256::new();
            while let Some(piece) = rx.blocking_recv() {
                h.update(&piece);
            }
            format!("sha256:{}", hex::encode(h.finalize()))
        });
        let done = AtomicU64::new(0);
        if let Some(p) = &progress {
            p(0, total);
        }
        let report = |len: u64| {
            let now = done.fetch_add(len, Ordering::Relaxed) + len;
            if let Some(p) = &progress {
                p(now, total);
            }
        };
        let mut kept: HashMap<String, Bytes> = HashMap::new();
        // How many occurrences of `hash` are still to be written, this one taken.
        let mut take_use = |hash: &str| {
            uses.get_mut(hash).map_or(0, |n| {
                *n = n.saturating_sub(1);
                *n
            })
        };
        let mut fetched = stream::iter(items)
            .map(|item| async {
                match item {
                    Item::Bytes(b) => Ok::<_, RemoteError>(Fetched::Bytes(Bytes::from(b))),
                    Item::Fetch(write) => {
                        let len = write.len;
                        let hash = write.hash.clone();
                        let bytes = self.restore_chunk(id, write).await?;
                        report(len);
                        Ok(Fetched::Chunk(hash, bytes))
                    }
                    Item::Repeat(write) => Ok(Fetched::Repeat(write)),
                }
            })
            .buffered(self.parallelism);
        let fed = async {
            while let Some(next) = fetched.next().await {
                let bytes = match next? {
                    Fetched::Bytes(b) => b,
                    Fetched::Chunk(hash, bytes) => {
                        if take_use(&hash) > 0 {
                            kept.insert(hash, bytes.clone());
                        }
                        bytes
                    }
                    // A later occurrence is written here, from the copy kept.
                    Fetched::Repeat(write) => {
                        let bytes = if take_use(&write.hash) == 0 {
                            kept.remove(&write.hash)
                        } else {
                            kept.get(&write.hash).cloned()
                        }
                        .ok_or_else(|| {
                            RemoteError::Task(format!("chunk {} reused before it came", write.hash))
                        })?;
                        let (copy, len) = (bytes.clone(), write.len);
                        tokio::task::spawn_blocking(move || write.write(&copy))
                            .await
                            .map_err(|e| RemoteError::Task(e.to_string()))??;
                        report(len);
                        bytes
                    }
                };
                pieces
                    .send(bytes)
                    .await
                    .map_err(|_| RemoteError::Task("the tree hasher stopped".into()))?;
            }
            Ok::<(), RemoteError>(())
        }
        .await;
        drop(pieces);
        let checksum = hasher.await.map_err(|e| RemoteError::Task(e.to_string()))?;
        fed?;
        tracing::debug!(state = %id.short(), ms = started.elapsed().as_millis() as u64, "chunks written");
        {
            let (data, entries) = (data.to_path_buf(), manifest.entries.clone());
            let root_mode = manifest.root_mode;
            tokio::task::spawn_blocking(move || tree::set_modes(&data, root_mode, &entries))
                .await
                .map_err(|e| RemoteError::Task(e.to_string()))??;
        }
        if checksum != manifest.snapshot.checksum {
            return Err(RemoteError::ChecksumMismatch {
                state: id,
                what: format!(
                    "restored data is {checksum}, the manifest says {}",
                    manifest.snapshot.checksum
                ),
            });
        }
        Ok(())
    }

    fn cached_manifest(&self, id: &StateId) -> Option<Arc<RemoteManifest>> {
        self.lock_manifests().get(id).cloned()
    }

    fn lock_manifests(&self) -> std::sync::MutexGuard<'_, HashMap<StateId, Arc<RemoteManifest>>> {
        self.manifests
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The states with a manifest in the bucket (one listing; nothing is read).
    pub async fn list_states(&self) -> Result<Vec<StateId>, RemoteError> {
        let prefix = self.key("manifests");
        let mut ids = Vec::new();
        let mut listing = self.store.list(Some(&prefix));
        while let Some(meta) = listing.next().await {
            let meta = meta.map_err(|source| RemoteError::Request {
                op: "list",
                key: prefix.to_string(),
                source,
            })?;
            let name = meta.location.filename().unwrap_or_default();
            if let Some(id) = name.strip_suffix(".json").and_then(|s| s.parse().ok()) {
                ids.push(id);
            }
        }
        ids.sort();
        Ok(ids)
    }

    /// Whether the bucket has `id`'s manifest (one HEAD; the manifest is not read).
    pub async fn has_state(&self, id: &StateId) -> Result<bool, RemoteError> {
        let key = self.manifest_key(id);
        match again_on_failure(|| self.store.head(&key)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(source) => Err(RemoteError::Request {
                op: "look up",
                key: key.to_string(),
                source,
            }),
        }
    }

    /// Deletes `id`'s manifest (its chunks stay until a collection); false if it had none.
    pub async fn remove_state(&self, id: &StateId) -> Result<bool, RemoteError> {
        let existed = self.has_state(id).await?;
        let key = self.manifest_key(id);
        self.lock_manifests().remove(id);
        match self.store.delete(&key).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(existed),
            Err(source) => Err(RemoteError::Request {
                op: "delete",
                key: key.to_string(),
                source,
            }),
        }
    }

    /// Deletes one chunk (a corrupt one, so that the next upload puts it again).
    pub async fn remove_chunk(&self, hash: &str) -> Result<(), RemoteError> {
        let key = self.chunk_key(hash);
        match self.store.delete(&key).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(source) => Err(RemoteError::Request {
                op: "delete",
                key: key.to_string(),
                source,
            }),
        }
    }

    /// Counts the chunks and lists the manifests: one listing of each.
    pub async fn usage(&self) -> Result<BucketUsage, RemoteError> {
        let chunks = self.list_chunks().await?;
        Ok(BucketUsage {
            chunks: chunks.len() as u64,
            chunk_bytes: chunks.iter().map(|c| c.size).sum(),
            manifests: self.list_states().await?,
        })
    }

    async fn list_chunks(&self) -> Result<Vec<object_store::ObjectMeta>, RemoteError> {
        let prefix = self.key("chunks");
        self.store
            .list(Some(&prefix))
            .try_collect()
            .await
            .map_err(|source| RemoteError::Request {
                op: "list",
                key: prefix.to_string(),
                source,
            })
    }

    /// Mark and sweep: deletes every chunk that no manifest refers to and that is older than
    /// `grace`. Chunks are listed before manifests, so a chunk put by an upload still in
    /// flight is younger than the grace period or is referred to by a manifest read here.
    pub async fn collect_garbage(&self, grace: Duration) -> Result<GcReport, RemoteError> {
        let chunks = self.list_chunks().await?;
        let ids = self.list_states().await?;
        let mut live = HashSet::new();
        for id in &ids {
            let Some(manifest) = self.remote_manifest(id).await? else {
                continue; // removed since the listing
            };
            for entry in &manifest.entries {
                if let Entry::File { chunks, .. } = entry {
                    live.extend(chunks.iter().cloned());
                }
            }
        }
        let now = chrono_now_ms();
        let mut report = GcReport {
            manifests: ids.len() as u64,
            chunks: chunks.len() as u64,
            ..GcReport::default()
        };
        let mut doomed = Vec::new();
        for chunk in chunks {
            let hash = chunk.location.filename().unwrap_or_default().to_owned();
            if live.contains(&hash) {
                continue;
            }
            let age = (now - chunk.last_modified.timestamp_millis()).max(0) as u64;
            if Duration::from_millis(age) < grace {
                report.chunks_in_grace += 1;
                continue;
            }
            doomed.push((chunk.location, chunk.size));
        }
        // The listing may be old by now: an upload may have refreshed a doomed chunk since.
        // Each is looked at once more right before it goes, which leaves a window of one
        // round trip; the upload closes it by checking its refreshed chunks after its manifest.
        let swept: Vec<Option<u64>> = stream::iter(doomed)
            .map(|(key, size)| async move {
                let failed = |op, source| RemoteError::Request {
                    op,
                    key: key.to_string(),
                    source,
                };
                match self.store.head(&key).await {
                    Ok(meta) => {
                        let age = (chrono_now_ms() - meta.last_modified.timestamp_millis()).max(0);
                        if Duration::from_millis(age as u64) < grace {
                            return Ok(None);
                        }
                    }
                    Err(object_store::Error::NotFound { .. }) => return Ok(Some(size)),
                    Err(source) => return Err(failed("look up", source)),
                }
                match self.store.delete(&key).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(Some(size)),
                    Err(source) => Err(failed("delete", source)),
                }
            })
            .buffer_unordered(self.parallelism)
            .try_collect()
            .await?;
        for outcome in swept {
            match outcome {
                Some(size) => {
                    report.chunks_deleted += 1;
                    report.bytes_deleted += size;
                }
                None => report.chunks_in_grace += 1,
            }
        }
        Ok(report)
    }

    /// Fetches one chunk, checks it, writes it where it first belongs, and returns its bytes.
    async fn restore_chunk(
        &self,
        id: StateId,
        write: tree::ChunkWrite,
    ) -> Result<Bytes, RemoteError> {
        let key = self.chunk_key(&write.hash);
        let compressed: Bytes =
            self.get_bytes(&key)
                .await
                .map_err(|source| RemoteError::Request {
                    op: "get",
                    key: key.to_string(),
                    source,
                })?;
        tokio::task::spawn_blocking(move || {
            let corrupt = |what: String| RemoteError::CorruptChunk {
                state: id,
                chunk: write.hash.clone(),
                what,
            };
            let data = zstd::bulk::decompress(&compressed, write.len as usize)
                .map_err(|e| corrupt(format!("does not decompress ({e})")))?;
            let actual = hex::encode(Sha256::digest(&data));
            if data.len() as u64 != write.len || actual != write.hash {
                return Err(corrupt(format!(
                    "holds {} bytes hashing to {actual}",
                    data.len()
                )));
            }
            write.write(&data)?;
            Ok(Bytes::from(data))
        })
        .await
        .map_err(|e| RemoteError::Task(e.to_string()))?
    }
}

/// One piece of a restore, in tree order.
enum Item {
    /// Bytes of the tree checksum's encoding (an entry's header, a symlink's target).
    Bytes(Vec<u8>),
    /// The first occurrence of a chunk: fetched, checked, written.
    Fetch(tree::ChunkWrite),
    /// A later occurrence: written from the first one's bytes.
    Repeat(tree::ChunkWrite),
}

enum Fetched {
    Bytes(Bytes),
    Chunk(String, Bytes),
    Repeat(tree::ChunkWrite),
}

/// Milliseconds since the Unix epoch, to compare with the bucket's modification times.
fn chrono_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Runs a read again, twice at most (after 300 ms, then 600 ms), when it failed for a reason
/// other than a missing object: the client's own retries (see `retry_config`) end after a few
/// attempts, and a restore or a lookup that gives up makes a machine build what the bucket
/// has. Reads are idempotent.
async fn again_on_failure<T, F, Fut>(op: F) -> Result<T, object_store::Error>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T, object_store::Error>>,
{
    let mut wait = Duration::from_millis(300);
    for _ in 0..2 {
        match op().await {
            Err(e @ object_store::Error::NotFound { .. }) => return Err(e),
            Ok(v) => return Ok(v),
            Err(e) => {
                tracing::debug!(error = %e, "a read failed; trying again");
                tokio::time::sleep(wait).await;
                wait *= 2;
            }
        }
    }
    op().await
}
