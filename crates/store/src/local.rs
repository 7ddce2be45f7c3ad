//! The snapshot store in a local directory.
//!
//! Layout under the root:
//!
//! ```text
//! <state_id>/manifest.json           published snapshot: written last, read first
//! <state_id>/data/                   its PostgreSQL data directory (a subvolume on btrfs)
//! .building-<state_id>-<rand>/data   a build in progress
//! .trash-<rand>/                     a snapshot being deleted
//! .spare-<state_id>                   a complete, unused clone of a snapshot's data (copy only)
//! .sparing-<state_id>-<rand>/         a spare being made
//! quarantine/<state_id>-<unix ms>/     a damaged snapshot, taken out of use (never deleted)
//! ```
//!
//! Spares exist because a plain copy is the slow part of starting an instance on a file system
//! without reflinks: with one made ahead of time in the background, the next instance of that
//! state takes it with one rename. They are disposable and discarded at start.
//!
//! A directory appears under its id only by one rename of a complete, synced build, and leaves
//! by one rename to `.trash-*`, so readers never see half a snapshot.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use taidon_core::{CloneStrategy, DataArea, StateId};

use crate::clone::{
    chown_to, chown_tree, clone_tree, clone_tree_reporting, create_base_dir, detect_strategy,
    remove_tree, CloneProgress,
};
use crate::digest::tree_digest;
use crate::error::{IoContext, StoreError};
use crate::{
    BoxFuture, Build, ByteProgress, CloneStats, Manifest, Owner, PublishMeta, SnapshotStore,
    StoreInfo, Stray, Verified,
};

const MANIFEST: &str = "manifest.json";
const MANIFEST_TMP: &str = "manifest.json.tmp";
const DATA: &str = "data";
const BUILDING: &str = ".building-";
const TRASH: &str = ".trash-";
const PROBE: &str = ".probe-";
const SPARE: &str = ".spare-";
const SPARING: &str = ".sparing-";
/// The directory under the root where damaged snapshots and unexplained entries are moved.
pub const QUARANTINE: &str = "quarantine";

/// Snapshots in a local directory, cloned by btrfs snapshot, reflink or copy. Cheap to clone:
/// clones share one store.
#[derive(Debug, Clone)]
pub struct LocalStore {
    strategy: CloneStrategy,
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    root: PathBuf,
    owner: Option<Owner>,
    /// States whose spare is being copied: a clone waits for it rather than copy a second time.
    sparing: std::sync::Mutex<std::collections::HashSet<StateId>>,
    spare_done: std::sync::Condvar,
    /// Unique bytes of all snapshots, counted again after a publish or a removal.
    usage: std::sync::Mutex<Option<u64>>,
}

/// A build in progress in a local store: a private directory that becomes a snapshot when
/// published, and is deleted when dropped unpublished.
#[derive(Debug)]
pub struct LocalBuild {
    id: StateId,
    parent: Option<StateId>,
    dir: PathBuf,
    data: PathBuf,
    /// Published or already discarded: Drop has nothing left to do.
    finished: bool,
}

impl LocalBuild {
    /// The state being built.
    pub fn id(&self) -> &StateId {
        &self.id
    }

    /// The state this build was cloned from.
    pub fn parent(&self) -> Option<&StateId> {
        self.parent.as_ref()
    }

    /// The build's private directory (`<root>/.building-<id>-<rand>`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The data directory being built (`dir()/data`).
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    fn discard(&mut self) {
        self.finished = true;
        if let Err(e) = remove_tree(&self.dir) {
            tracing::warn!(dir = %self.dir.display(), error = %e, "cannot discard a build");
        }
    }
}

impl Drop for LocalBuild {
    fn drop(&mut self) {
        if !self.finished {
            self.discard();
        }
    }
}

impl LocalStore {
    /// `begin`, with the parent's copy reported to `progress`.
    fn begin_with(
        &self,
        id: &StateId,
        parent: Option<&StateId>,
        progress: Option<CloneProgress<'_>>,
    ) -> Result<LocalBuild, StoreError> {
        if let Some(p) = parent {
            if !self.contains(p) {
                return Err(StoreError::UnknownState(*p));
            }
        }
        let dir = self.unique(&format!("{BUILDING}{id}-"));
        fs::create_dir(&dir).ctx("create build directory", &dir)?;
        // Only the data directory is private; the owner must be able to reach it.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o711)).ctx("chmod", &dir)?;
        let build = LocalBuild {
            id: *id,
            parent: parent.copied(),
            data: dir.join(DATA),
            dir,
            finished: false,
        };
        match parent {
            Some(p) => {
                clone_tree_reporting(
                    &self.data_dir(p),
                    &build.data,
                    self.strategy,
                    self.shared.owner,
                    progress,
                )?;
            }
            None => create_base_dir(&build.data, self.strategy, self.shared.owner)?,
        }
        Ok(build)
    }

    /// Opens (creating it if needed) the store at `root` and detects its clone strategy; data
    /// directories will belong to `owner` when given.
    pub fn open(root: PathBuf, owner: Option<Owner>) -> Result<Self, StoreError> {
        fs::create_dir_all(&root).ctx("create store root", &root)?;
        if owner.is_some() {
            // The owner runs servers in build directories under the root: it must traverse it.
            let mode = fs::metadata(&root).ctx("read", &root)?.permissions().mode();
            if mode & 0o011 != 0o011 {
                fs::set_permissions(&root, fs::Permissions::from_mode((mode | 0o011) & 0o7777))
                    .ctx("chmod", &root)?;
            }
        }
        let strategy = detect_strategy(&root);
        tracing::info!(root = %root.display(), %strategy, "snapshot store opened");
        Ok(Self {
            strategy,
            shared: Arc::new(Shared {
                root,
                owner,
                sparing: Default::default(),
                spare_done: Default::default(),
                usage: Default::default(),
            }),
        })
    }

    /// The same store with another clone strategy, such as `Copy` to measure what CoW saves.
    /// Choosing `Btrfs` off btrfs makes base builds fail.
    pub fn with_strategy(mut self, strategy: CloneStrategy) -> Self {
        self.strategy = strategy;
        self
    }

    /// Who owns the data directories.
    pub fn owner(&self) -> Option<Owner> {
        self.shared.owner
    }

    /// The data directories of builds left by a crash (call before starting builds: builds in
    /// progress look the same).
    pub fn leftover_builds(&self) -> Vec<PathBuf> {
        self.dot_entries()
            .into_iter()
            .filter(|(name, _)| name.starts_with(BUILDING))
            .map(|(_, path)| path.join(DATA))
            .collect()
    }

    /// Deletes leftover builds, trash and probe files; returns how many entries went.
    pub fn discard_leftovers(&self) -> Result<usize, StoreError> {
        let mut removed = 0;
        for (name, path) in self.dot_entries() {
            if [BUILDING, TRASH, PROBE, SPARE, SPARING]
                .iter()
                .any(|prefix| name.starts_with(prefix))
            {
                remove_tree(&path)?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Whether `id`'s data directory still has the checksum its manifest records.
    pub fn verify(&self, id: &StateId) -> Result<bool, StoreError> {
        Ok(self.verify_report(id)?.intact)
    }

    /// Checks `id`'s data directory against its manifest, saying what differs.
    pub fn verify_report(&self, id: &StateId) -> Result<Verified, StoreError> {
        let manifest = self.manifest(id)?.ok_or(StoreError::UnknownState(*id))?;
        let digest = tree_digest(&self.data_dir(id))?;
        Ok(compare(&manifest, &digest))
    }

    /// Moves `id`'s snapshot to `<root>/quarantine/<id>-<unix ms>` by one rename (its spare is
    /// deleted); where it went, or `None` when there was none.
    pub fn quarantine(&self, id: &StateId) -> Result<Option<PathBuf>, StoreError> {
        let _ = remove_tree(&self.spare_dir(id));
        let dest = self.quarantine_path(&id.to_string())?;
        let dir = self.snapshot_dir(id);
        match fs::rename(&dir, &dest) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).ctx("move to quarantine", &dir),
        }
        *self.lock_usage() = None;
        fsync_dir(&self.shared.root)?;
        tracing::warn!(%id, to = %dest.display(), "snapshot quarantined");
        Ok(Some(dest))
    }

    /// A fresh path `<root>/quarantine/<name>-<unix ms>`, its parent created.
    fn quarantine_path(&self, name: &str) -> Result<PathBuf, StoreError> {
        let dir = self.shared.root.join(QUARANTINE);
        fs::create_dir_all(&dir).ctx("create", &dir)?;
        let mut ms = now_ms();
        loop {
            let path = dir.join(format!("{name}-{ms}"));
            if fs::symlink_metadata(&path).is_err() {
                return Ok(path);
            }
            ms += 1;
        }
    }

    /// The entries under the root that no published snapshot explains. Transient ones (trash
    /// being deleted, spares being made, probes) are left out: the next start discards them.
    pub fn strays(&self) -> Result<Vec<Stray>, StoreError> {
        let root = &self.shared.root;
        let mut out = Vec::new();
        for entry in fs::read_dir(root).ctx("list", root)? {
            let entry = entry.ctx("list", root)?;
            let Ok(name) = entry.file_name().into_string() else {
                out.push(stray(
                    root,
                    entry.file_name().to_string_lossy().into_owned(),
                    None,
                    true,
                    "a name that is not UTF-8",
                ));
                continue;
            };
            if name == QUARANTINE || [TRASH, PROBE, SPARING].iter().any(|p| name.starts_with(p)) {
                continue;
            }
            if let Ok(id) = name.parse::<StateId>() {
                let why = match self.manifest(&id) {
                    Ok(Some(m)) if m.state_id == id => continue,
                    Ok(Some(m)) => format!("its manifest names another state ({})", m.state_id),
                    Ok(None) => "a snapshot directory without a manifest".to_owned(),
                    Err(e) => format!("an unreadable manifest: {e}"),
                };
                out.push(stray(root, name, Some(id), true, &why));
            } else if let Some(rest) = name.strip_prefix(BUILDING) {
                let id = rest.split('-').next().and_then(|i| i.parse().ok());
                let mut s = stray(root, name, id, false, "a build that did not finish");
                s.build = true;
                out.push(s);
            } else if let Some(rest) = name.strip_prefix(SPARE) {
                match rest.parse::<StateId>() {
                    Ok(id) if self.contains(&id) => continue,
                    Ok(id) => out.push(stray(
                        root,
                        name,
                        Some(id),
                        false,
                        "a spare clone of a snapshot that is gone",
                    )),
                    Err(_) => out.push(stray(root, name, None, false, "a spare of nothing")),
                }
            } else {
                out.push(stray(
                    root,
                    name,
                    None,
                    true,
                    "not a snapshot of this store",
                ));
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Moves a stray entry to quarantine (when it may hold data) or deletes it; what it did.
    pub fn clear_stray(&self, stray: &Stray) -> Result<String, StoreError> {
        let name = Path::new(&stray.name);
        let plain = name.components().count() == 1
            && matches!(
                name.components().next(),
                Some(std::path::Component::Normal(_))
            )
            && stray.name != QUARANTINE;
        let path = self.shared.root.join(name);
        if !plain {
            return Err(StoreError::ForeignArea(DataArea::local(path)));
        }
        if stray.may_hold_data {
            let dest = self.quarantine_path(&stray.name)?;
            fs::rename(&path, &dest).ctx("move to quarantine", &path)?;
            fsync_dir(&self.shared.root)?;
            Ok(format!("moved to {}", dest.display()))
        } else {
            remove_tree(&path)?;
            Ok("deleted".to_owned())
        }
    }

    fn spare_dir(&self, id: &StateId) -> PathBuf {
        self.shared.root.join(format!("{SPARE}{id}"))
    }

    /// Makes a spare clone of `id` ahead of time, if clones are plain copies and it has none.
    /// True if it made one. Safe to call concurrently: the last complete spare wins.
    pub fn make_spare(&self, id: &StateId) -> Result<bool, StoreError> {
        let spare = self.spare_dir(id);
        if self.strategy != CloneStrategy::Copy || spare.exists() || !self.contains(id) {
            return Ok(false);
        }
        if !self.lock_sparing().insert(*id) {
            return Ok(false);
        }
        let made = self.copy_spare(id, &spare);
        self.lock_sparing().remove(id);
        self.shared.spare_done.notify_all();
        made
    }

    fn lock_sparing(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<StateId>> {
        self.shared
            .sparing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Waits while a spare of `id` is being copied (at most a minute).
    fn wait_for_spare(&self, id: &StateId) {
        let guard = self.lock_sparing();
        let _ = self.shared.spare_done.wait_timeout_while(
            guard,
            std::time::Duration::from_secs(60),
            |s| s.contains(id),
        );
    }

    fn copy_spare(&self, id: &StateId, spare: &Path) -> Result<bool, StoreError> {
        let tmp = self.unique(&format!("{SPARING}{id}-"));
        if let Err(e) = clone_tree(&self.data_dir(id), &tmp, self.strategy, self.shared.owner) {
            let _ = remove_tree(&tmp);
            return Err(e);
        }
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o700)).ctx("chmod", &tmp)?;
        chown_to(&tmp, self.shared.owner)?;
        match fs::rename(&tmp, spare) {
            Ok(()) => Ok(true),
            // Another spare landed first (a non-empty directory cannot be renamed over).
            Err(_) => {
                remove_tree(&tmp)?;
                Ok(false)
            }
        }
    }

    /// Moves the spare of `id` to `dest` if there is one (and `dest` is on this file system).
    fn take_spare(&self, id: &StateId, dest: &Path) -> Result<bool, StoreError> {
        match fs::rename(self.spare_dir(id), dest) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            // EXDEV: the destination is elsewhere; copy as usual.
            Err(e) if e.raw_os_error() == Some(libc::EXDEV) => Ok(false),
            Err(e) => Err(e).ctx("take spare", dest),
        }
    }

    /// `<root>/<id>/data`: where the published data directory of `id` lives.
    pub fn data_dir(&self, id: &StateId) -> PathBuf {
        self.snapshot_dir(id).join(DATA)
    }

    fn snapshot_dir(&self, id: &StateId) -> PathBuf {
        self.shared.root.join(id.to_string())
    }

    fn unique(&self, prefix: &str) -> PathBuf {
        self.shared
            .root
            .join(format!("{prefix}{:016x}", rand::random::<u64>()))
    }

    fn dot_entries(&self) -> Vec<(String, PathBuf)> {
        let entries = match fs::read_dir(&self.shared.root) {
            Ok(entries) => entries,
            Err(e) => {
                tracing::warn!(root = %self.shared.root.display(), error = %e, "cannot list the store");
                return Vec::new();
            }
        };
        entries
            .filter_map(Result::ok)
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                name.starts_with('.').then(|| (name, e.path()))
            })
            .collect()
    }
}

/// The blocking operations, which the [`SnapshotStore`] implementation runs on blocking threads.
impl LocalStore {
    /// How this store clones snapshots.
    pub fn strategy(&self) -> CloneStrategy {
        self.strategy
    }

    /// The directory the store lives in.
    pub fn root(&self) -> &Path {
        &self.shared.root
    }

    /// Whether a snapshot of `id` is published.
    pub fn contains(&self, id: &StateId) -> bool {
        self.snapshot_dir(id).join(MANIFEST).is_file()
    }

    /// The manifest of `id`, if published.
    pub fn manifest(&self, id: &StateId) -> Result<Option<Manifest>, StoreError> {
        let path = self.snapshot_dir(id).join(MANIFEST);
        let text = match fs::read(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).ctx("read", &path),
        };
        serde_json::from_slice(&text)
            .map(Some)
            .map_err(|source| StoreError::Manifest { path, source })
    }

    /// The manifests of all published snapshots, ordered by state id.
    pub fn list(&self) -> Result<Vec<Manifest>, StoreError> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.shared.root).ctx("list", &self.shared.root)? {
            let entry = entry.ctx("list", &self.shared.root)?;
            let Some(id) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
                continue;
            };
            // One unreadable snapshot must not hide all the others.
            match self.manifest(&id) {
                Ok(Some(m)) => out.push(m),
                Ok(None) => {}
                Err(e) => tracing::warn!(%id, error = %e, "skipping a snapshot"),
            }
        }
        out.sort_by_key(|m| m.state_id);
        Ok(out)
    }

    /// A private work area for building `id`: its `data_dir()` is a clone of `parent`'s data,
    /// or (no parent) an empty directory of mode 0700 owned by the owner, where the caller runs
    /// initdb.
    pub fn begin(&self, id: &StateId, parent: Option<&StateId>) -> Result<LocalBuild, StoreError> {
        self.begin_with(id, parent, None)
    }

    /// `begin`, telling `progress` the bytes of the parent's data copied so far.
    pub fn begin_reporting(
        &self,
        id: &StateId,
        parent: Option<&StateId>,
        progress: CloneProgress<'_>,
    ) -> Result<LocalBuild, StoreError> {
        self.begin_with(id, parent, Some(progress))
    }

    /// Makes a build durable and visible under its id; if a racing build of the same id won,
    /// discards this one and returns the winner's manifest.
    pub fn publish(&self, build: LocalBuild, meta: PublishMeta) -> Result<Manifest, StoreError> {
        if let Some(existing) = self.manifest(&build.id)? {
            return Ok(existing);
        }
        if !build.data.is_dir() {
            return Err(StoreError::EmptyBuild(build.dir.clone()));
        }
        // Without reflinks every checkpoint would be a full copy: files the step left as they
        // were become hard links to the parent's (snapshots are never written to).
        if self.strategy == CloneStrategy::Copy {
            if let Some(parent) = build.parent.filter(|p| self.contains(p)) {
                let linked = crate::dedup::link_unchanged(&self.data_dir(&parent), &build.data)?;
                tracing::debug!(id = %build.id, files = linked.files, bytes = linked.bytes,
                    "unchanged files shared with the parent");
            }
        }
        let digest = tree_digest(&build.data)?;
        // One syncfs instead of an fsync per file: the data is durable before the manifest is.
        syncfs(&self.shared.root)?;
        let manifest = Manifest {
            state_id: build.id,
            parent: meta.parent,
            engine: meta.engine,
            size_bytes: digest.size_bytes,
            checksum: digest.checksum,
            created_ms: now_ms(),
            build_cost_ms: meta.build_cost_ms,
        };
        self.rename_into_place(build, manifest)
    }

    /// Writes a complete build's manifest and renames the build to its id; if a racing
    /// build got there first, discards this one and returns the winner's manifest.
    fn rename_into_place(
        &self,
        mut build: LocalBuild,
        manifest: Manifest,
    ) -> Result<Manifest, StoreError> {
        write_manifest(&build.dir, &manifest)?;
        let target = self.snapshot_dir(&build.id);
        // A published snapshot is never an empty directory, so rename cannot replace one: it
        // fails with ENOTEMPTY (or EEXIST) when a racing build got there first.
        match fs::rename(&build.dir, &target) {
            Ok(()) => {
                build.finished = true;
                *self.lock_usage() = None;
                fsync_dir(&self.shared.root)?;
                tracing::info!(id = %build.id, size = manifest.size_bytes, "snapshot published");
                Ok(manifest)
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTEMPTY | libc::EEXIST)) => {
                build.discard();
                self.manifest(&build.id)?
                    .ok_or(StoreError::UnknownState(build.id))
            }
            Err(e) => Err(e).ctx("publish", &target),
        }
    }

    /// Starts importing `id` from elsewhere (a bucket): a build with an empty data directory
    /// for the caller to fill, whose parent (if any) is `parent`. Dropped unpublished, it is
    /// discarded like any build.
    pub fn begin_import(
        &self,
        id: &StateId,
        parent: Option<&StateId>,
    ) -> Result<LocalBuild, StoreError> {
        let mut build = self.begin_with(id, None, None)?;
        build.parent = parent.copied();
        Ok(build)
    }

    /// Publishes an imported build under the manifest it came with (its checksum already
    /// verified by the importer): files get the store's owner, files unchanged from a local
    /// parent become hard links to it, and the directory appears under its id by one rename.
    pub fn publish_import(
        &self,
        build: LocalBuild,
        manifest: &Manifest,
    ) -> Result<Manifest, StoreError> {
        if manifest.state_id != build.id {
            return Err(StoreError::Corrupt {
                state: build.id,
                what: format!("imported manifest is of state {}", manifest.state_id),
            });
        }
        if let Some(existing) = self.manifest(&build.id)? {
            return Ok(existing);
        }
        chown_tree(&build.data, self.shared.owner)?;
        if self.strategy == CloneStrategy::Copy {
            if let Some(parent) = build.parent.filter(|p| self.contains(p)) {
                crate::dedup::link_unchanged(&self.data_dir(&parent), &build.data)?;
            }
        }
        syncfs(&self.shared.root)?;
        self.rename_into_place(build, manifest.clone())
    }

    /// The directory of `id`'s published snapshot (`manifest.json` and `data/`), if any.
    pub fn snapshot_path(&self, id: &StateId) -> Option<PathBuf> {
        self.contains(id).then(|| self.snapshot_dir(id))
    }

    /// Clones `id`'s data directory to `dest` (which must not exist), owned by the owner, mode
    /// 0700.
    pub fn clone_to(&self, id: &StateId, dest: &Path) -> Result<CloneStats, StoreError> {
        if !self.contains(id) {
            return Err(StoreError::UnknownState(*id));
        }
        if fs::symlink_metadata(dest).is_ok() {
            return Err(StoreError::DestinationExists(dest.to_path_buf()));
        }
        self.wait_for_spare(id);
        if self.take_spare(id, dest)? {
            return Ok(CloneStats {
                strategy: self.strategy,
                bytes: 0,
                files: 0,
            });
        }
        let stats = clone_tree(&self.data_dir(id), dest, self.strategy, self.shared.owner)?;
        fs::set_permissions(dest, fs::Permissions::from_mode(0o700)).ctx("chmod", dest)?;
        chown_to(dest, self.shared.owner)?;
        Ok(stats)
    }

    /// Deletes the snapshot of `id`; false when there was none.
    pub fn remove(&self, id: &StateId) -> Result<bool, StoreError> {
        let _ = remove_tree(&self.spare_dir(id));
        let dir = self.snapshot_dir(id);
        let trash = self.unique(TRASH);
        match fs::rename(&dir, &trash) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e).ctx("move to trash", &dir),
        }
        // The rename is the removal; make it durable before the slow part.
        *self.lock_usage() = None;
        fsync_dir(&self.shared.root)?;
        remove_tree(&trash)?;
        tracing::info!(%id, "snapshot removed");
        Ok(true)
    }

    /// Bytes of all published snapshots, each file that snapshots share by hard link counted
    /// once (shared reflink extents still count once per snapshot).
    pub fn usage_bytes(&self) -> Result<u64, StoreError> {
        if let Some(known) = *self.lock_usage() {
            return Ok(known);
        }
        let dirs: Vec<PathBuf> = self
            .list()?
            .iter()
            .map(|m| self.data_dir(&m.state_id))
            .collect();
        let total = crate::dedup::unique_bytes(dirs.iter().map(PathBuf::as_path))?;
        *self.lock_usage() = Some(total);
        Ok(total)
    }

    fn lock_usage(&self) -> std::sync::MutexGuard<'_, Option<u64>> {
        self.shared
            .usage
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl LocalStore {
    /// Runs `f` on a blocking thread: every file system operation of this store blocks.
    fn blocking<T, F>(&self, f: F) -> BoxFuture<'static, Result<T, StoreError>>
    where
        T: Send + 'static,
        F: FnOnce(&LocalStore) -> Result<T, StoreError> + Send + 'static,
    {
        let this = self.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || f(&this))
                .await
                .map_err(|e| StoreError::Task(e.to_string()))?
        })
    }
}

impl SnapshotStore for LocalStore {
    fn describe(&self) -> StoreInfo {
        StoreInfo {
            strategy: self.strategy,
            location: self.shared.root.display().to_string(),
        }
    }

    fn begin(
        &self,
        id: StateId,
        parent: Option<StateId>,
        progress: Option<ByteProgress>,
    ) -> BoxFuture<'_, Result<Build, StoreError>> {
        self.blocking(move |s| {
            let report = progress.as_deref().map(|p| p as &(dyn Fn(u64, u64) + Sync));
            let build = s.begin_with(&id, parent.as_ref(), report)?;
            let area = DataArea::local(build.data_dir());
            Ok(Build::new(id, parent, area, build))
        })
    }

    fn publish(
        &self,
        build: Build,
        meta: PublishMeta,
    ) -> BoxFuture<'_, Result<Manifest, StoreError>> {
        self.blocking(move |s| s.publish(build.into_inner::<LocalBuild>()?, meta))
    }

    fn restore_for<'a>(
        &'a self,
        id: StateId,
        target: &'a DataArea,
    ) -> BoxFuture<'a, Result<CloneStats, StoreError>> {
        let Some(dest) = target.as_local().map(Path::to_path_buf) else {
            let area = target.clone();
            return Box::pin(async move { Err(StoreError::ForeignArea(area)) });
        };
        self.blocking(move |s| s.clone_to(&id, &dest))
    }

    fn manifest(&self, id: StateId) -> BoxFuture<'_, Result<Option<Manifest>, StoreError>> {
        self.blocking(move |s| s.manifest(&id))
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<Manifest>, StoreError>> {
        self.blocking(|s| s.list())
    }

    fn remove(&self, id: StateId) -> BoxFuture<'_, Result<bool, StoreError>> {
        self.blocking(move |s| s.remove(&id))
    }

    fn usage(&self) -> BoxFuture<'_, Result<u64, StoreError>> {
        self.blocking(|s| s.usage_bytes())
    }

    fn leftover_builds(&self) -> BoxFuture<'_, Result<Vec<DataArea>, StoreError>> {
        self.blocking(|s| {
            Ok(s.leftover_builds()
                .into_iter()
                .map(DataArea::local)
                .collect())
        })
    }

    fn discard_leftovers(&self) -> BoxFuture<'_, Result<usize, StoreError>> {
        self.blocking(|s| s.discard_leftovers())
    }

    fn make_spare(&self, id: StateId) -> BoxFuture<'_, Result<bool, StoreError>> {
        self.blocking(move |s| s.make_spare(&id))
    }

    fn verify(&self, id: StateId) -> BoxFuture<'_, Result<Option<Verified>, StoreError>> {
        self.blocking(move |s| s.verify_report(&id).map(Some))
    }

    fn quarantine(&self, id: StateId) -> BoxFuture<'_, Result<Option<String>, StoreError>> {
        self.blocking(move |s| Ok(s.quarantine(&id)?.map(|p| p.display().to_string())))
    }

    fn strays(&self) -> BoxFuture<'_, Result<Vec<Stray>, StoreError>> {
        self.blocking(|s| s.strays())
    }

    fn clear_stray(&self, stray: Stray) -> BoxFuture<'_, Result<Option<String>, StoreError>> {
        self.blocking(move |s| s.clear_stray(&stray).map(Some))
    }
}

/// What differs between a manifest and the digest of its data.
fn compare(manifest: &Manifest, digest: &crate::TreeDigest) -> Verified {
    let mut differs = Vec::new();
    if digest.size_bytes != manifest.size_bytes {
        differs.push(format!(
            "size {} bytes, manifest says {}",
            digest.size_bytes, manifest.size_bytes
        ));
    }
    if digest.checksum != manifest.checksum {
        differs.push(format!(
            "checksum {}, manifest says {}",
            short_sum(&digest.checksum),
            short_sum(&manifest.checksum)
        ));
    }
    Verified {
        intact: differs.is_empty(),
        bytes_read: digest.size_bytes,
        detail: differs.join("; "),
    }
}

/// `sha256:` and the first 12 hex digits.
fn short_sum(sum: &str) -> &str {
    sum.get(..19).unwrap_or(sum)
}

fn stray(
    root: &Path,
    name: String,
    state: Option<StateId>,
    may_hold_data: bool,
    why: &str,
) -> Stray {
    Stray {
        location: root.join(&name).display().to_string(),
        name,
        state,
        build: false,
        may_hold_data,
        detail: why.to_owned(),
    }
}

/// Writes `dir/manifest.json` under a temporary name, fsyncs it, renames it, fsyncs `dir`.
fn write_manifest(dir: &Path, manifest: &Manifest) -> Result<(), StoreError> {
    let tmp = dir.join(MANIFEST_TMP);
    let path = dir.join(MANIFEST);
    let json = serde_json::to_vec_pretty(manifest).map_err(|source| StoreError::Manifest {
        path: path.clone(),
        source,
    })?;
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .ctx("create", &tmp)?;
    file.write_all(&json).ctx("write", &tmp)?;
    file.sync_all().ctx("fsync", &tmp)?;
    fs::rename(&tmp, &path).ctx("rename into place", &path)?;
    fsync_dir(dir)
}

fn syncfs(path: &Path) -> Result<(), StoreError> {
    let dir = File::open(path).ctx("open", path)?;
    // SAFETY: the descriptor is open for the duration of the call.
    if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
        return Err(io::Error::last_os_error()).ctx("syncfs", path);
    }
    Ok(())
}

fn fsync_dir(path: &Path) -> Result<(), StoreError> {
    File::open(path)
        .and_then(|d| d.sync_all())
        .ctx("fsync directory", path)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
