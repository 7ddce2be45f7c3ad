//! The local store with the bucket behind it: snapshots are published locally and uploaded
//! in the background (write-behind); a snapshot the local tier lacks can be fetched from the
//! bucket instead of being rebuilt.

use std::collections::{BTreeSet, HashSet};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use taidon_core::{DataArea, StateId};
use taidon_store::{
    Build, ByteProgress, CloneStats, GcReport, LocalStore, Manifest, PublishMeta, PushReport,
    RemoteStatus, RemoteTier, SnapshotStore, StoreError, StoreInfo,
};
use tokio::sync::{mpsc, Semaphore};

use crate::{RemoteError, RemoteStore};

/// How the tier uploads.
#[derive(Debug, Clone)]
pub struct TierOptions {
    /// Snapshots uploaded at once (each moves several chunks at once).
    pub upload_concurrency: usize,
    /// Attempts per upload before it waits for the next resync.
    pub upload_attempts: u32,
    /// The wait before the second attempt; doubled each time, up to a minute.
    pub first_backoff: Duration,
    /// How often the local snapshots the bucket lacks are queued again (after failures, or
    /// a daemon killed mid-upload).
    pub resync_every: Duration,
    /// A probe failure makes lookups skip the bucket for this long, so an unreachable
    /// endpoint does not slow every prepare down.
    pub skip_after_failure: Duration,
}

impl Default for TierOptions {
    fn default() -> Self {
        Self {
            upload_concurrency: 2,
            upload_attempts: 5,
            first_backoff: Duration::from_secs(1),
            resync_every: Duration::from_secs(300),
            skip_after_failure: Duration::from_secs(30),
        }
    }
}

/// A [`LocalStore`] whose snapshots are also kept in a bucket.
#[derive(Clone)]
pub struct TieredStore {
    inner: Arc<Inner>,
}

struct Inner {
    local: LocalStore,
    remote: RemoteStore,
    url: String,
    options: TierOptions,
    /// States seen in the bucket.
    known: RwLock<HashSet<StateId>>,
    /// Queued or uploading.
    pending: Mutex<BTreeSet<StateId>>,
    queue: mpsc::UnboundedSender<StateId>,
    slots: Semaphore,
    health: Mutex<Health>,
}

#[derive(Default)]
struct Health {
    /// When a request last failed for a reason other than a missing object, and why.
    failed: Option<(Instant, String)>,
    bytes: u64,
    snapshots: u64,
    /// When `bytes` was counted (a listing of every chunk); `None` after a change made here.
    counted: Option<Instant>,
}

/// How long a count of the bucket's bytes serves `status` (a change made here counts anew
/// at once): counting lists every chunk, one request per thousand.
const RECOUNT_EVERY: Duration = Duration::from_secs(60);

impl std::fmt::Debug for TieredStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TieredStore")
            .field("url", &self.inner.url)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One line for a person: the error and its causes.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let more = c.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cur = c.source();
    }
    text
}

/// A remote failure as the store reports it; a checksum mismatch keeps its kind.
pub fn store_error(context: String, e: RemoteError) -> StoreError {
    match e {
        RemoteError::ChecksumMismatch { state, what } => StoreError::Corrupt { state, what },
        RemoteError::CorruptChunk { state, chunk, what } => StoreError::Corrupt {
            state,
            what: format!("chunk {chunk} {what}"),
        },
        RemoteError::Store(inner) => inner,
        other => StoreError::Remote {
            message: context,
            source: Some(Box::new(other)),
        },
    }
}

impl TieredStore {
    /// The local store with `remote` behind it; `url` names the bucket for people. Starts the
    /// upload queue (on the current tokio runtime) and queues every local snapshot the bucket
    /// lacks.
    pub fn new(local: LocalStore, remote: RemoteStore, url: String, options: TierOptions) -> Self {
        let (queue, rx) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            slots: Semaphore::new(options.upload_concurrency.max(1)),
            local,
            remote,
            url,
            options,
            known: RwLock::default(),
            pending: Mutex::default(),
            queue,
            health: Mutex::default(),
        });
        tokio::spawn(run_queue(Arc::downgrade(&inner), rx));
        tokio::spawn(resync_loop(Arc::downgrade(&inner)));
        Self { inner }
    }
}

impl Inner {
    fn enqueue(&self, id: StateId) {
        if lock(&self.pending).insert(id) && self.queue.send(id).is_err() {
            lock(&self.pending).remove(&id);
        }
    }

    fn note_failure(&self, why: String) {
        lock(&self.health).failed = Some((Instant::now(), why));
    }

    fn note_success(&self) {
        lock(&self.health).failed = None;
    }

    /// True while a recent failure says the bucket is unreachable.
    fn skipping(&self) -> bool {
        lock(&self.health)
            .failed
            .as_ref()
            .is_some_and(|(at, _)| at.elapsed() < self.options.skip_after_failure)
    }

    /// Makes the next `status` count the bucket's bytes again.
    fn recount(&self) {
        lock(&self.health).counted = None;
    }

    fn remember(&self, id: StateId, present: bool) {
        let mut known = self.known.write().unwrap_or_else(|p| p.into_inner());
        if present {
            known.insert(id);
        } else {
            known.remove(&id);
        }
    }

    async fn resync(&self) -> Result<usize, StoreError> {
        let local = {
            let store = self.local.clone();
            tokio::task::spawn_blocking(move || store.list())
                .await
                .map_err(|e| StoreError::Task(e.to_string()))??
        };
        let remote = match self.remote.list_states().await {
            Ok(ids) => {
                self.note_success();
                ids
            }
            Err(e) => {
                let e = store_error(format!("cannot list {}", self.url), e);
                self.note_failure(chain(&e));
                return Err(e);
            }
        };
        let remote: HashSet<StateId> = remote.into_iter().collect();
        *self.known.write().unwrap_or_else(|p| p.into_inner()) = remote.clone();
        // Oldest first: a parent goes up before its children, which then skip its chunks.
        let mut missing: Vec<&Manifest> = local
            .iter()
            .filter(|m| !remote.contains(&m.state_id))
            .collect();
        missing.sort_by_key(|m| m.created_ms);
        for m in &missing {
            self.enqueue(m.state_id);
        }
        Ok(missing.len())
    }

    /// Uploads the local snapshot of `id` (once).
    async fn upload(&self, id: StateId) -> Result<PushReport, StoreError> {
        let Some(dir) = self.local.snapshot_path(&id) else {
            return Err(StoreError::UnknownState(id));
        };
        match self.remote.upload(&dir).await {
            Ok(r) => {
                self.note_success();
                self.remember(id, true);
                self.recount();
                Ok(PushReport {
                    chunks_uploaded: r.chunks_uploaded,
                    chunks_skipped: r.chunks_skipped,
                    bytes_uploaded: r.bytes_uploaded,
                    manifest_created: r.manifest_created,
                })
            }
            Err(e) => {
                // The snapshot may have been evicted meanwhile: then there is nothing to do.
                if !self.local.contains(&id) {
                    return Err(StoreError::UnknownState(id));
                }
                let e = store_error(format!("cannot upload state {id} to {}", self.url), e);
                if matches!(e, StoreError::Remote { .. }) {
                    self.note_failure(chain(&e));
                }
                Err(e)
            }
        }
    }

    /// Uploads `id` with retries and backoff, as the queue does.
    async fn upload_retrying(&self, id: StateId) {
        let mut backoff = self.options.first_backoff;
        for attempt in 1..=self.options.upload_attempts.max(1) {
            match self.upload(id).await {
                Ok(r) => {
                    tracing::info!(state = %id.short(), chunks = r.chunks_uploaded,
                        skipped = r.chunks_skipped, bytes = r.bytes_uploaded, "uploaded");
                    return;
                }
                Err(StoreError::UnknownState(_)) => return,
                Err(e) => {
                    tracing::warn!(state = %id.short(), attempt, error = %chain(&e), "upload failed");
                    if attempt < self.options.upload_attempts {
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(60));
                    }
                }
            }
        }
    }

    async fn probe(&self) -> RemoteStatus {
        let pending = lock(&self.pending).len() as u64;
        let fresh = lock(&self.health)
            .counted
            .is_some_and(|at| at.elapsed() < RECOUNT_EVERY);
        let probe = tokio::time::timeout(Duration::from_secs(10), async {
            if fresh {
                // The manifests only: one listing answers "reachable" and counts snapshots.
                let manifests = self.remote.list_states().await?;
                Ok(crate::BucketUsage {
                    manifests,
                    ..Default::default()
                })
            } else {
                self.remote.usage().await
            }
        })
        .await;
        let result = match probe {
            Ok(Ok(usage)) => {
                self.note_success();
                let mut h = lock(&self.health);
                if !fresh {
                    h.bytes = usage.chunk_bytes;
                    h.counted = Some(Instant::now());
                }
                h.snapshots = usage.manifests.len() as u64;
                drop(h);
                *self.known.write().unwrap_or_else(|p| p.into_inner()) =
                    usage.manifests.into_iter().collect();
                Ok(())
            }
            Ok(Err(e)) => Err(chain(&e)),
            Err(_) => Err(format!("{} did not answer within 10 s", self.url)),
        };
        let h = lock(&self.health);
        let (bytes, snapshots) = (h.bytes, h.snapshots);
        drop(h);
        match result {
            Ok(()) => RemoteStatus {
                url: self.url.clone(),
                reachable: true,
                error: None,
                pending_uploads: pending,
                bytes,
                snapshots,
            },
            Err(why) => {
                self.note_failure(why.clone());
                RemoteStatus {
                    url: self.url.clone(),
                    reachable: false,
                    error: Some(why),
                    pending_uploads: pending,
                    bytes,
                    snapshots,
                }
            }
        }
    }

    async fn fetch(
        &self,
        id: StateId,
        progress: Option<ByteProgress>,
    ) -> Result<Manifest, StoreError> {
        if let Some(m) = self.local.manifest(&id)? {
            return Ok(m);
        }
        let context = || format!("cannot restore state {id} from {}", self.url);
        let manifest = match self.remote.remote_manifest(&id).await {
            Ok(Some(m)) => m,
            Ok(None) => {
                self.remember(id, false);
                return Err(StoreError::UnknownState(id));
            }
            Err(e) => {
                if let RemoteError::ChecksumMismatch { .. } = e {
                    self.discard_corrupt_manifest(id).await;
                }
                return Err(store_error(context(), e));
            }
        };
        let parent = manifest.snapshot.parent;
        let build = {
            let store = self.local.clone();
            tokio::task::spawn_blocking(move || store.begin_import(&id, parent.as_ref()))
                .await
                .map_err(|e| StoreError::Task(e.to_string()))??
        };
        let started = Instant::now();
        let filled = self
            .remote
            .restore_data(&manifest, build.data_dir(), progress)
            .await;
        let downloaded = started.elapsed();
        if let Err(e) = filled {
            match &e {
                RemoteError::CorruptChunk { chunk, .. } => {
                    self.discard_corrupt_chunk(id, chunk).await
                }
                RemoteError::ChecksumMismatch { .. } => self.discard_corrupt_manifest(id).await,
                _ => {}
            }
            // Dropping the build removes the partial restore.
            let dir = build.dir().to_path_buf();
            drop(build);
            let e = match e {
                RemoteError::Io { op, path, source } => StoreError::Remote {
                    message: format!(
                        "{}: cannot {op} {} (the partial restore was removed)",
                        context(),
                        path.display()
                    ),
                    source: Some(Box::new(source)),
                },
                other => store_error(context(), other),
            };
            tracing::warn!(state = %id.short(), dir = %dir.display(), error = %e, "restore failed");
            return Err(e);
        }
        let snapshot = manifest.snapshot.clone();
        let store = self.local.clone();
        let published = tokio::task::spawn_blocking(move || store.publish_import(build, &snapshot))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))??;
        self.remember(id, true);
        tracing::info!(state = %id.short(), bytes = published.size_bytes,
            download_ms = downloaded.as_millis() as u64,
            publish_ms = (started.elapsed() - downloaded).as_millis() as u64,
            "restored from the bucket");
        Ok(published)
    }

    /// A manifest that fails its checksum is deleted, so that the next upload of the state
    /// (once rebuilt) replaces it.
    async fn discard_corrupt_manifest(&self, id: StateId) {
        tracing::warn!(state = %id.short(), "deleting a corrupt manifest from the bucket");
        if let Err(e) = self.remote.remove_state(&id).await {
            tracing::warn!(state = %id.short(), error = %e, "cannot delete a corrupt manifest");
        }
        self.remember(id, false);
    }

    /// A chunk that fails its hash is deleted (the next upload that needs it puts it again),
    /// and so is the manifest that led to it: other states sharing the chunk fail the same
    /// way and are rebuilt and uploaded in turn.
    async fn discard_corrupt_chunk(&self, id: StateId, chunk: &str) {
        tracing::warn!(state = %id.short(), chunk, "deleting a corrupt chunk");
        if let Err(e) = self.remote.remove_chunk(chunk).await {
            tracing::warn!(error = %e, "cannot delete a corrupt chunk");
        }
        self.discard_corrupt_manifest(id).await;
    }
}

/// Takes uploads off the queue, a bounded number at a time.
async fn run_queue(inner: Weak<Inner>, mut rx: mpsc::UnboundedReceiver<StateId>) {
    while let Some(id) = rx.recv().await {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let Ok(permit) = strong.slots.acquire().await else {
            return;
        };
        permit.forget();
        tokio::spawn(async move {
            strong.upload_retrying(id).await;
            lock(&strong.pending).remove(&id);
            strong.slots.add_permits(1);
        });
    }
}

/// Queues what the bucket lacks at start and then every `resync_every`.
async fn resync_loop(inner: Weak<Inner>) {
    loop {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        match strong.resync().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(queued = n, "snapshots queued for upload"),
            Err(e) => {
                tracing::warn!(error = %e, "cannot compare the local snapshots with the bucket")
            }
        }
        let every = strong.options.resync_every;
        drop(strong);
        tokio::time::sleep(every).await;
    }
}

impl SnapshotStore for TieredStore {
    fn describe(&self) -> StoreInfo {
        self.inner.local.describe()
    }

    fn begin(
        &self,
        id: StateId,
        parent: Option<StateId>,
        progress: Option<ByteProgress>,
    ) -> taidon_store::BoxFuture<'_, Result<Build, StoreError>> {
        SnapshotStore::begin(&self.inner.local, id, parent, progress)
    }

    fn publish(
        &self,
        build: Build,
        meta: PublishMeta,
    ) -> taidon_store::BoxFuture<'_, Result<Manifest, StoreError>> {
        Box::pin(async move {
            let manifest = SnapshotStore::publish(&self.inner.local, build, meta).await?;
            self.inner.enqueue(manifest.state_id);
            Ok(manifest)
        })
    }

    fn restore_for<'a>(
        &'a self,
        id: StateId,
        target: &'a DataArea,
    ) -> taidon_store::BoxFuture<'a, Result<CloneStats, StoreError>> {
        SnapshotStore::restore_for(&self.inner.local, id, target)
    }

    fn manifest(
        &self,
        id: StateId,
    ) -> taidon_store::BoxFuture<'_, Result<Option<Manifest>, StoreError>> {
        SnapshotStore::manifest(&self.inner.local, id)
    }

    fn list(&self) -> taidon_store::BoxFuture<'_, Result<Vec<Manifest>, StoreError>> {
        SnapshotStore::list(&self.inner.local)
    }

    fn remove(&self, id: StateId) -> taidon_store::BoxFuture<'_, Result<bool, StoreError>> {
        SnapshotStore::remove(&self.inner.local, id)
    }

    fn usage(&self) -> taidon_store::BoxFuture<'_, Result<u64, StoreError>> {
        SnapshotStore::usage(&self.inner.local)
    }

    fn leftover_builds(&self) -> taidon_store::BoxFuture<'_, Result<Vec<DataArea>, StoreError>> {
        SnapshotStore::leftover_builds(&self.inner.local)
    }

    fn discard_leftovers(&self) -> taidon_store::BoxFuture<'_, Result<usize, StoreError>> {
        SnapshotStore::discard_leftovers(&self.inner.local)
    }

    fn make_spare(&self, id: StateId) -> taidon_store::BoxFuture<'_, Result<bool, StoreError>> {
        SnapshotStore::make_spare(&self.inner.local, id)
    }

    fn remote(&self) -> Option<&dyn RemoteTier> {
        Some(self)
    }

    fn verify(
        &self,
        id: StateId,
    ) -> taidon_store::BoxFuture<'_, Result<Option<taidon_store::Verified>, StoreError>> {
        SnapshotStore::verify(&self.inner.local, id)
    }

    fn quarantine(
        &self,
        id: StateId,
    ) -> taidon_store::BoxFuture<'_, Result<Option<String>, StoreError>> {
        SnapshotStore::quarantine(&self.inner.local, id)
    }

    fn strays(&self) -> taidon_store::BoxFuture<'_, Result<Vec<taidon_store::Stray>, StoreError>> {
        SnapshotStore::strays(&self.inner.local)
    }

    fn clear_stray(
        &self,
        stray: taidon_store::Stray,
    ) -> taidon_store::BoxFuture<'_, Result<Option<String>, StoreError>> {
        SnapshotStore::clear_stray(&self.inner.local, stray)
    }
}

impl RemoteTier for TieredStore {
    fn url(&self) -> String {
        self.inner.url.clone()
    }

    fn status(&self) -> taidon_store::BoxFuture<'_, RemoteStatus> {
        Box::pin(self.inner.probe())
    }

    fn counted_bytes(&self) -> Option<u64> {
        let h = lock(&self.inner.health);
        // A change made here clears `counted` but leaves the last count: still the best guess.
        (h.counted.is_some() || h.bytes > 0).then_some(h.bytes)
    }

    fn known(&self) -> HashSet<StateId> {
        self.inner
            .known
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn pending(&self) -> HashSet<StateId> {
        lock(&self.inner.pending).iter().copied().collect()
    }

    fn list(&self) -> taidon_store::BoxFuture<'_, Result<Vec<Manifest>, StoreError>> {
        Box::pin(async move {
            let context = || format!("cannot list {}", self.inner.url);
            let ids = self
                .inner
                .remote
                .list_states()
                .await
                .map_err(|e| store_error(context(), e))?;
            let mut out = Vec::with_capacity(ids.len());
            for id in ids {
                match self.inner.remote.remote_manifest(&id).await {
                    Ok(Some(m)) => out.push(m.snapshot.clone()),
                    Ok(None) => {}
                    // A corrupt manifest is not listed; a restore of it reports it.
                    Err(RemoteError::ChecksumMismatch { .. }) => {}
                    Err(e) => return Err(store_error(context(), e)),
                }
            }
            Ok(out)
        })
    }

    fn contains(&self, id: StateId) -> taidon_store::BoxFuture<'_, Result<bool, StoreError>> {
        Box::pin(async move {
            if self.inner.skipping() {
                return Ok(false);
            }
            match self.inner.remote.has_state(&id).await {
                Ok(present) => {
                    self.inner.note_success();
                    self.inner.remember(id, present);
                    Ok(present)
                }
                Err(e) => {
                    let e = store_error(format!("cannot look up {}", self.inner.url), e);
                    self.inner.note_failure(chain(&e));
                    Err(e)
                }
            }
        })
    }

    fn push(&self, id: StateId) -> taidon_store::BoxFuture<'_, Result<PushReport, StoreError>> {
        Box::pin(self.inner.upload(id))
    }

    fn fetch(
        &self,
        id: StateId,
        progress: Option<ByteProgress>,
    ) -> taidon_store::BoxFuture<'_, Result<Manifest, StoreError>> {
        Box::pin(self.inner.fetch(id, progress))
    }

    fn remove(&self, id: StateId) -> taidon_store::BoxFuture<'_, Result<bool, StoreError>> {
        Box::pin(async move {
            let removed =
                self.inner.remote.remove_state(&id).await.map_err(|e| {
                    store_error(format!("cannot delete from {}", self.inner.url), e)
                })?;
            self.inner.remember(id, false);
            self.inner.recount();
            Ok(removed)
        })
    }

    fn collect_garbage(
        &self,
        grace: Duration,
    ) -> taidon_store::BoxFuture<'_, Result<GcReport, StoreError>> {
        Box::pin(async move {
            let report = self
                .inner
                .remote
                .collect_garbage(grace)
                .await
                .map_err(|e| {
                    store_error(format!("cannot collect garbage in {}", self.inner.url), e)
                })?;
            if report.chunks_deleted > 0 {
                self.inner.recount();
            }
            Ok(report)
        })
    }
}
