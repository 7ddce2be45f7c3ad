//! Tests against real files, real file systems (ext4 in /tmp, loop-mounted XFS and btrfs) and a
//! real PostgreSQL.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Barrier};

use sha2::{Digest, Sha256};
use taidon_core::{CloneStrategy, DataArea, EngineFingerprint, InitdbOptions, StateId};

use crate::clone::{fs_magic, is_subvolume};
use crate::testing::{cow_fs_or_skip, LoopFs};
use crate::*;

const EXT4_SUPER_MAGIC: u32 = 0xEF53;
const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
const LOOP_SIZE: u64 = 512 << 20;

fn scratch() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("taidon-store-test-")
        .tempdir()
        .unwrap();
    // A server running as `postgres` must traverse it.
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o711)).unwrap();
    dir
}

fn sid(n: u8) -> StateId {
    StateId::from_bytes([n; 32])
}

fn meta(parent: Option<StateId>) -> PublishMeta {
    PublishMeta {
        parent,
        engine: EngineFingerprint {
            major: 15,
            minor: 18,
            initdb: InitdbOptions::default(),
            settings: Default::default(),
        },
        build_cost_ms: 1234,
    }
}

/// The user servers run as, as the controller derives it: `postgres` when root, else nobody.
fn owner() -> Option<Owner> {
    taidon_runtime::RunAs::for_this_process()
        .unwrap()
        .map(|u| Owner {
            uid: u.uid,
            gid: u.gid,
        })
}

#[derive(Debug, PartialEq, Eq)]
enum Entry {
    Dir { mode: u32 },
    File { mode: u32, content: Vec<u8> },
    Symlink { target: PathBuf },
}

/// Every entry under `dir` (the root included as ""), with its mode and content.
fn describe(dir: &Path) -> BTreeMap<String, Entry> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<String, Entry>) {
        let meta = fs::symlink_metadata(dir).unwrap();
        let rel = dir
            .strip_prefix(base)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        out.insert(
            rel,
            Entry::Dir {
                mode: meta.mode() & 0o7777,
            },
        );
        for e in fs::read_dir(dir).unwrap() {
            let path = e.unwrap().path();
            let rel = path
                .strip_prefix(base)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            let meta = fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                walk(base, &path, out);
            } else if meta.file_type().is_symlink() {
                let target = fs::read_link(&path).unwrap();
                out.insert(rel, Entry::Symlink { target });
            } else {
                let content = fs::read(&path).unwrap();
                let mode = meta.mode() & 0o7777;
                out.insert(rel, Entry::File { mode, content });
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// The (uid, gid) of every entry under `dir`, the root included.
fn owners(dir: &Path) -> Vec<(PathBuf, u32, u32)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(p) = stack.pop() {
        let m = fs::symlink_metadata(&p).unwrap();
        out.push((p.clone(), m.uid(), m.gid()));
        if m.is_dir() {
            stack.extend(fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        }
    }
    out
}

/// A small tree with nested directories, varied modes, an empty file, an empty directory and
/// two symlinks.
fn write_sample_tree(dir: &Path) {
    fs::create_dir_all(dir.join("base/1")).unwrap();
    fs::create_dir(dir.join("pg_tblspc")).unwrap();
    fs::write(dir.join("PG_VERSION"), "15\n").unwrap();
    fs::write(dir.join("base/1/1259"), vec![7u8; 100_000]).unwrap();
    fs::write(dir.join("base/1/empty"), "").unwrap();
    fs::write(dir.join("run.sh"), "#!/bin/sh\n").unwrap();
    fs::set_permissions(dir.join("run.sh"), fs::Permissions::from_mode(0o750)).unwrap();
    fs::set_permissions(dir.join("PG_VERSION"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::set_permissions(dir.join("base/1/1259"), fs::Permissions::from_mode(0o640)).unwrap();
    fs::set_permissions(dir.join("base"), fs::Permissions::from_mode(0o700)).unwrap();
    symlink("base/1/1259", dir.join("rel-link")).unwrap();
    symlink("/nonexistent/target", dir.join("abs-link")).unwrap();
}

fn dot_entries(root: &Path) -> Vec<String> {
    fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect()
}

fn publish_sample(store: &LocalStore, id: StateId) -> Manifest {
    let build = store.begin(&id, None).unwrap();
    write_sample_tree(build.data_dir());
    store.publish(build, meta(None)).unwrap()
}

#[test]
fn tmp_on_ext4_uses_copy() {
    let dir = scratch();
    let magic = fs_magic(dir.path()).unwrap();
    if magic != EXT4_SUPER_MAGIC {
        eprintln!("SKIP tmp_on_ext4_uses_copy: the temp dir is not on ext4 (f_type {magic:#x})");
        return;
    }
    assert_eq!(detect_strategy(dir.path()), CloneStrategy::Copy);
    let store = LocalStore::open(dir.path().join("store"), owner()).unwrap();
    assert_eq!(store.strategy(), CloneStrategy::Copy);
    assert!(
        dot_entries(store.root()).is_empty(),
        "the reflink probe left files behind"
    );
}

#[test]
fn publish_is_atomic_and_the_manifest_round_trips() {
    let dir = scratch();
    let store = LocalStore::open(dir.path().join("store"), owner()).unwrap();
    let id = sid(1);

    let build = store.begin(&id, None).unwrap();
    let data = build.data_dir().to_owned();
    assert!(build.dir().starts_with(store.root()));
    assert!(build
        .dir()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .starts_with(&format!(".building-{id}-")));
    // A base build gets an empty private directory for initdb.
    let m = fs::metadata(&data).unwrap();
    assert!(m.is_dir());
    assert_eq!(m.mode() & 0o7777, 0o700);
    if let Some(o) = owner() {
        assert_eq!((m.uid(), m.gid()), (o.uid, o.gid));
    }
    assert_eq!(fs::read_dir(&data).unwrap().count(), 0);

    write_sample_tree(&data);
    assert!(!store.contains(&id));
    assert!(!store.root().join(id.to_string()).exists());
    assert_eq!(store.manifest(&id).unwrap(), None);
    assert!(store.list().unwrap().is_empty());

    let before = describe(&data);
    let manifest = store.publish(build, meta(None)).unwrap();
    assert!(store.contains(&id));
    assert!(dot_entries(store.root()).is_empty());
    assert_eq!(describe(&store.data_dir(&id)), before);

    assert_eq!(manifest.state_id, id);
    assert_eq!(manifest.parent, None);
    assert_eq!(manifest.build_cost_ms, 1234);
    assert_eq!(manifest.engine, meta(None).engine);
    assert_eq!(manifest.size_bytes, 3 + 100_000 + 10);
    assert!(manifest.created_ms > 1_600_000_000_000);
    assert_eq!(store.manifest(&id).unwrap(), Some(manifest.clone()));
    assert_eq!(store.list().unwrap(), vec![manifest.clone()]);
    assert_eq!(store.usage_bytes().unwrap(), manifest.size_bytes);
    assert!(store.verify(&id).unwrap());

    // The file on disk is plain JSON with the documented field names.
    let json: serde_json::Value = serde_json::from_slice(
        &fs::read(store.root().join(id.to_string()).join("manifest.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(json["state_id"], id.to_string());
    assert_eq!(json["checksum"], manifest.checksum);
    assert_eq!(json["size_bytes"], manifest.size_bytes);

    // A store reopened on the same root sees the same snapshot.
    let again = LocalStore::open(store.root().to_owned(), owner()).unwrap();
    assert_eq!(again.list().unwrap(), vec![manifest]);

    // Tampering is detected.
    fs::write(store.data_dir(&id).join("PG_VERSION"), "16\n").unwrap();
    assert!(!store.verify(&id).unwrap());
}

#[test]
fn checksum_follows_the_documented_encoding() {
    let dir = scratch();
    let t = dir.path().join("t");
    fs::create_dir_all(t.join("d")).unwrap();
    fs::write(t.join("d/f"), "hi").unwrap();
    fs::write(t.join("e"), "").unwrap();
    symlink("d/f", t.join("l")).unwrap();

    let mut expected = Vec::new();
    expected.extend_from_slice(b"d\0d\0");
    expected.extend_from_slice(b"f\0d/f\x002\0hi");
    expected.extend_from_slice(b"f\0e\x000\0");
    expected.extend_from_slice(b"l\0l\x003\0d/f");
    let digest = tree_digest(&t).unwrap();
    assert_eq!(
        digest.checksum,
        format!("sha256:{}", hex::encode(Sha256::digest(&expected)))
    );
    assert_eq!(digest.size_bytes, 2);

    // Content, names and link targets all count; modes do not.
    fs::set_permissions(t.join("e"), fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(tree_digest(&t).unwrap(), digest);
    fs::write(t.join("e"), "x").unwrap();
    assert_ne!(tree_digest(&t).unwrap(), digest);
}

#[test]
fn a_dropped_build_leaves_nothing() {
    let dir = scratch();
    let store = LocalStore::open(dir.path().join("store"), owner()).unwrap();
    let build = store.begin(&sid(2), None).unwrap();
    write_sample_tree(build.data_dir());
    let build_dir = build.dir().to_owned();
    assert!(build_dir.exists());
    drop(build);
    assert!(!build_dir.exists());
    assert_eq!(fs::read_dir(store.root()).unwrap().count(), 0);
    assert!(!store.contains(&sid(2)));
}

#[test]
fn leftovers_of_a_crash_are_listed_and_discarded() {
    let dir = scratch();
    let store = LocalStore::open(dir.path().join("store"), owner()).unwrap();
    publish_sample(&store, sid(3));
    let build = store.begin(&sid(4), Some(&sid(3))).unwrap();
    let data = build.data_dir().to_owned();
    // A crash: the process dies without running Drop.
    std::mem::forget(build);
    let trash = store.root().join(".trash-0123456789abcdef");
    fs::create_dir_all(trash.join("data/base")).unwrap();
    fs::write(trash.join("data/base/x"), "x").unwrap();

    assert_eq!(store.leftover_builds(), vec![data]);
    assert_eq!(store.discard_leftovers().unwrap(), 2);
    assert!(store.leftover_builds().is_empty());
    assert!(dot_entries(store.root()).is_empty());
    // Published snapshots are untouched.
    assert!(store.contains(&sid(3)));
    assert!(store.verify(&sid(3)).unwrap());
}

#[test]
fn a_child_build_starts_from_its_parent_and_leaves_it_alone() {
    let dir = scratch();
    let store = LocalStore::open(dir.path().join("store"), owner()).unwrap();
    let base = publish_sample(&store, sid(5));

    let build = store.begin(&sid(6), Some(&sid(5))).unwrap();
    assert_eq!(build.parent(), Some(&sid(5)));
    assert_eq!(
        describe(build.data_dir()).len(),
        describe(&store.data_dir(&sid(5))).len()
    );
    let data_meta = fs::metadata(build.data_dir()).unwrap();
    assert_eq!(data_meta.mode() & 0o7777, 0o700);
    fs::write(build.data_dir().join("base/1/1259"), "changed").unwrap();
    fs::write(build.data_dir().join("new"), "new").unwrap();
    let child = store.publish(build, meta(Some(sid(5)))).unwrap();

    assert_eq!(child.parent, Some(sid(5)));
    assert_ne!(child.checksum, base.checksum);
    assert!(store.verify(&sid(5)).unwrap(), "the parent changed");
    assert_eq!(
        fs::read(store.data_dir(&sid(6)).join("base/1/1259")).unwrap(),
        b"changed"
    );
    assert_eq!(store.list().unwrap(), vec![base.clone(), child.clone()]);
    assert_eq!(
        store.usage_bytes().unwrap(),
        base.size_bytes + child.size_bytes
    );

    assert!(matches!(
        store.begin(&sid(7), Some(&sid(99))),
        Err(StoreError::UnknownState(id)) if id == sid(99)
    ));
    assert!(dot_entries(store.root()).is_empty());
}

#[test]
fn a_copying_build_reports_its_bytes_up_to_the_total() {
    let dir = scratch();
    let store = LocalStore::open(dir.path().join("store"), owner())
        .unwrap()
        .with_strategy(CloneStrategy::Copy);
    publish_sample(&store, sid(5));
    let seen = std::sync::Mutex::new(Vec::new());
    let report = |done: u64, total: u64| seen.lock().unwrap().push((done, total));
    let build = store
        .begin_reporting(&sid(6), Some(&sid(5)), &report)
        .unwrap();
    let seen = seen.into_inner().unwrap();
    // One report per copied file (PG_VERSION, 1259, empty, run.sh), rising to the total.
    let total = 100_000 + 3 + 10;
    assert_eq!(seen.len(), 4, "{seen:?}");
    assert!(seen.iter().all(|&(_, t)| t == total), "{seen:?}");
    assert!(seen.windows(2).all(|w| w[0].0 <= w[1].0), "{seen:?}");
    assert_eq!(seen.last(), Some(&(total, total)));
    drop(build);
}

/// The async boundary, as the controller sees it: data areas instead of paths, byte progress
/// through an `Arc`, a build handle only the store that made it accepts.
#[tokio::test]
async fn the_trait_builds_restores_and_cleans_up_through_data_areas() {
    let dir = scratch();
    let local = LocalStore::open(dir.path().join("store"), owner())
        .unwrap()
        .with_strategy(CloneStrategy::Copy);
    let store: std::sync::Arc<dyn SnapshotStore> = std::sync::Arc::new(local.clone());
    assert_eq!(store.describe().strategy, CloneStrategy::Copy);
    assert_eq!(
        store.describe().location,
        local.root().display().to_string()
    );

    let base = store.begin(sid(40), None, None).await.unwrap();
    let data = base.area().as_local().unwrap().to_path_buf();
    assert!(data.is_dir() && data.starts_with(local.root()));
    write_sample_tree(&data);
    store.publish(base, meta(None)).await.unwrap();

    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = std::sync::Arc::clone(&seen);
    let progress: ByteProgress = std::sync::Arc::new(move |done, total| {
        sink.lock().unwrap().push((done, total));
    });
    let child = store
        .begin(sid(41), Some(sid(40)), Some(progress))
        .await
        .unwrap();
    assert_eq!(child.parent(), Some(&sid(40)));
    assert_eq!(seen.lock().unwrap().last(), Some(&(100_013, 100_013)));
    // A build left by a crash is listed by its area, for the runtime to stop a server on.
    assert_eq!(
        store.leftover_builds().await.unwrap(),
        [child.area().clone()]
    );
    let child_area = child.area().as_local().unwrap().to_path_buf();
    drop(child);
    assert!(!child_area.exists(), "a dropped build is discarded");

    let target = DataArea::local(dir.path().join("instance"));
    let stats = store.restore_for(sid(40), &target).await.unwrap();
    assert_eq!(stats.files, 4);
    assert_eq!(
        describe(target.as_local().unwrap()),
        describe(&local.data_dir(&sid(40)))
    );
    assert!(matches!(
        store.restore_for(sid(40), &DataArea::named("pvc-1")).await,
        Err(StoreError::ForeignArea(_))
    ));
    let foreign = crate::testing::FakeStore::new()
        .begin(sid(42), None, None)
        .await
        .unwrap();
    assert!(matches!(
        store.publish(foreign, meta(None)).await,
        Err(StoreError::ForeignArea(_))
    ));

    assert_eq!(store.list().await.unwrap().len(), 1);
    assert_eq!(store.usage().await.unwrap(), local.usage_bytes().unwrap());
    assert!(store.manifest(sid(40)).await.unwrap().is_some());
    assert!(store.make_spare(sid(40)).await.unwrap());
    assert_eq!(store.discard_leftovers().await.unwrap(), 1, "the spare");
    assert!(store.remove(sid(40)).await.unwrap());
    assert!(store.list().await.unwrap().is_empty());
    assert!(dot_entries(local.root()).is_empty());
}

#[test]
fn clone_tree_keeps_content_modes_and_symlinks() {
    let dir = scratch();
    let src = dir.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::set_permissions(&src, fs::Permissions::from_mode(0o750)).unwrap();
    write_sample_tree(&src);
    let expected = describe(&src);

    for strategy in [CloneStrategy::Copy, CloneStrategy::Reflink] {
        let dest = dir.path().join(format!("dest-{strategy}"));
        let stats = clone_tree(&src, &dest, strategy, owner()).unwrap();
        assert_eq!(describe(&dest), expected, "{strategy}");
        assert_eq!(stats.files, 4, "{strategy}");
        assert_eq!(stats.bytes, 3 + 100_000 + 10, "{strategy}");
        if let Some(o) = owner() {
            for (path, uid, gid) in owners(&dest) {
                assert_eq!((uid, gid), (o.uid, o.gid), "{}", path.display());
            }
        }
        if strategy == CloneStrategy::Reflink && fs_magic(dir.path()).unwrap() == EXT4_SUPER_MAGIC {
            // ext4 refuses FICLONE: the clone falls back to copying and says so.
            assert_eq!(stats.strategy, CloneStrategy::Copy);
        }
    }

    // The destination must not exist, and a refused clone leaves it alone.
    let dest = dir.path().join("dest-copy");
    assert!(matches!(
        clone_tree(&src, &dest, CloneStrategy::Copy, None),
        Err(StoreError::DestinationExists(p)) if p == dest
    ));
    assert_eq!(describe(&dest), expected);

    // A failed clone leaves nothing behind.
    let missing = dir.path().join("missing");
    let dest = dir.path().join("dest-of-missing");
    assert!(clone_tree(&missing, &dest, CloneStrategy::Copy, None).is_err());
    assert!(!dest.exists());
}

#[test]
fn clone_to_makes_a_private_independent_copy() {
    let dir = scratch();
    let store = LocalStore::open(dir.path().join("store"), owner()).unwrap();
    publish_sample(&store, sid(8));
    let dest = dir.path().join("instance");
    let stats = store.clone_to(&sid(8), &dest).unwrap();
    assert_eq!(stats.files, 4);
    let m = fs::metadata(&dest).unwrap();
    assert_eq!(m.mode() & 0o7777, 0o700);
    if let Some(o) = owner() {
        assert_eq!((m.uid(), m.gid()), (o.uid, o.gid));
    }
    assert_eq!(describe(&dest), describe(&store.data_dir(&sid(8))));
    fs::write(dest.join("PG_VERSION"), "changed").unwrap();
    assert!(store.verify(&sid(8)).unwrap());

    assert!(matches!(
        store.clone_to(&sid(8), &dest),
        Err(StoreError::DestinationExists(_))
    ));
    assert!(matches!(
        store.clone_to(&sid(9), &dir.path().join("other")),
        Err(StoreError::UnknownState(_))
    ));
    assert!(!dir.path().join("other").exists());
}

#[test]
fn a_spare_made_ahead_is_taken_by_the_next_clone_on_a_copy_store() {
    let dir = scratch();
    let store = LocalStore::open(dir.path().join("store"), owner()).unwrap();
    assert_eq!(store.strategy(), CloneStrategy::Copy);
    publish_sample(&store, sid(12));
    assert!(
        !store.make_spare(&sid(13)).unwrap(),
        "no spare of an unknown state"
    );
    assert!(store.make_spare(&sid(12)).unwrap());
    assert!(!store.make_spare(&sid(12)).unwrap(), "one spare per state");

    // The next clone is the spare, moved: nothing copied, same content, private and 0700.
    let first = dir.path().join("first");
    let stats = store.clone_to(&sid(12), &first).unwrap();
    assert_eq!((stats.files, stats.bytes), (0, 0));
    assert_eq!(describe(&first), describe(&store.data_dir(&sid(12))));
    let m = fs::metadata(&first).unwrap();
    assert_eq!(m.mode() & 0o7777, 0o700);
    if let Some(o) = owner() {
        assert_eq!((m.uid(), m.gid()), (o.uid, o.gid));
        assert!(owners(&first)
            .iter()
            .all(|(_, u, g)| (*u, *g) == (o.uid, o.gid)));
    }
    // It was used up: the one after copies again.
    let second = dir.path().join("second");
    assert_eq!(store.clone_to(&sid(12), &second).unwrap().files, 4);
    // A spare never replaces an existing destination, not even an empty one.
    assert!(store.make_spare(&sid(12)).unwrap());
    let empty = dir.path().join("empty");
    fs::create_dir(&empty).unwrap();
    assert!(matches!(
        store.clone_to(&sid(12), &empty),
        Err(StoreError::DestinationExists(_))
    ));
    // Spares go with their snapshot, and with a restart.
    assert!(store.remove(&sid(12)).unwrap());
    assert!(
        dot_entries(store.root()).is_empty(),
        "{:?}",
        dot_entries(store.root())
    );
    publish_sample(&store, sid(12));
    assert!(store.make_spare(&sid(12)).unwrap());
    assert_eq!(store.discard_leftovers().unwrap(), 1);
    assert!(dot_entries(store.root()).is_empty());
}

#[test]
fn remove_deletes_a_snapshot_and_nothing_else() {
    let dir = scratch();
    let store = LocalStore::open(dir.path().join("store"), owner()).unwrap();
    publish_sample(&store, sid(10));
    let kept = publish_sample(&store, sid(11));
    assert!(store.remove(&sid(10)).unwrap());
    assert!(!store.contains(&sid(10)));
    assert!(!store.root().join(sid(10).to_string()).exists());
    assert!(!store.remove(&sid(10)).unwrap());
    assert_eq!(store.list().unwrap(), vec![kept]);
    assert!(dot_entries(store.root()).is_empty());
    // A removed state can be built again.
    publish_sample(&store, sid(10));
    assert!(store.contains(&sid(10)));
}

#[test]
fn racing_publishes_of_one_id_agree_on_one_winner() {
    let dir = scratch();
    let store = Arc::new(LocalStore::open(dir.path().join("store"), owner()).unwrap());
    let id = sid(12);
    for round in 0..5 {
        let barrier = Arc::new(Barrier::new(2));
        let threads: Vec<_> = ["a", "b"]
            .into_iter()
            .map(|tag| {
                let build = store.begin(&id, None).unwrap();
                fs::write(build.data_dir().join("who"), tag).unwrap();
                let (store, barrier) = (store.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    store.publish(build, meta(None)).unwrap()
                })
            })
            .collect();
        let manifests: Vec<Manifest> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        assert_eq!(manifests[0], manifests[1], "round {round}");
        let winner = fs::read_to_string(store.data_dir(&id).join("who")).unwrap();
        assert!(winner == "a" || winner == "b");
        assert!(store.verify(&id).unwrap());
        assert_eq!(store.list().unwrap().len(), 1);
        assert!(dot_entries(store.root()).is_empty(), "round {round}");
        assert!(store.remove(&id).unwrap());
    }
}

#[test]
fn publishing_an_already_published_id_keeps_the_first() {
    let dir = scratch();
    let store = LocalStore::open(dir.path().join("store"), owner()).unwrap();
    let first = publish_sample(&store, sid(13));
    let build = store.begin(&sid(13), None).unwrap();
    fs::write(build.data_dir().join("other"), "other").unwrap();
    assert_eq!(store.publish(build, meta(None)).unwrap(), first);
    assert!(store.verify(&sid(13)).unwrap());
    assert!(dot_entries(store.root()).is_empty());
}

// ---- a real PostgreSQL on clones ----

fn pg(bin: &str, owner: Option<Owner>) -> Command {
    let mut cmd = Command::new(Path::new(PG_BIN).join(bin));
    cmd.current_dir("/");
    if let Some(o) = owner {
        std::os::unix::process::CommandExt::uid(&mut cmd, o.uid);
        std::os::unix::process::CommandExt::gid(&mut cmd, o.gid);
    }
    cmd
}

/// Runs single-user `postgres` on `data` with `sql` on stdin and returns its stdout.
fn single_user(data: &Path, sql: &str, owner: Option<Owner>) -> String {
    let mut child = pg("postgres", owner)
        .args(["--single", "-D"])
        .arg(data)
        .arg("postgres")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(sql.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "postgres --single on {} failed: {}\n{stdout}\n{}",
        data.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// initdb in a base build, a table in a child build, a clone, a query on the clone.
fn postgres_runs_on_clones(store: &LocalStore, instances: &Path) {
    let owner = store.owner();
    let base = store.begin(&sid(20), None).unwrap();
    let out = pg("initdb", owner)
        .args(["-D"])
        .arg(base.data_dir())
        .args([
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "initdb failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    store.publish(base, meta(None)).unwrap();

    let child = store.begin(&sid(21), Some(&sid(20))).unwrap();
    single_user(
        child.data_dir(),
        "CREATE TABLE t (x int);\nINSERT INTO t VALUES (42);\n",
        owner,
    );
    store.publish(child, meta(Some(sid(20)))).unwrap();

    let dest = instances.join("i1");
    let stats = store.clone_to(&sid(21), &dest).unwrap();
    assert_eq!(stats.strategy, store.strategy());
    let out = single_user(&dest, "SELECT x FROM t;\n", owner);
    assert!(out.contains("x = \"42\""), "unexpected output: {out}");
    // The base knows nothing of the child's table.
    let dest = instances.join("i0");
    store.clone_to(&sid(20), &dest).unwrap();
    let out = single_user(
        &dest,
        "SELECT count(*) FROM pg_class WHERE relname = 't';\n",
        owner,
    );
    assert!(out.contains("count = \"0\""), "unexpected output: {out}");
    assert!(store.verify(&sid(20)).unwrap() && store.verify(&sid(21)).unwrap());
}

#[test]
fn postgres_runs_on_a_copied_clone() {
    let dir = scratch();
    let store = LocalStore::open(dir.path().join("store"), owner()).unwrap();
    postgres_runs_on_clones(&store, dir.path());
}

// ---- real copy-on-write file systems ----

fn free_bytes(path: &Path) -> u64 {
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0);
    let dir = fs::File::open(path).unwrap();
    assert_eq!(
        unsafe { libc::syncfs(std::os::unix::io::AsRawFd::as_raw_fd(&dir)) },
        0
    );
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0);
    st.f_bfree as u64 * st.f_frsize as u64
}

/// Clones a 64 MiB snapshot and checks that the clone is right and took (almost) no space.
fn clone_shares_space(store: &LocalStore, dest: &Path) {
    let build = store.begin(&sid(30), None).unwrap();
    write_sample_tree(build.data_dir());
    let big: Vec<u8> = (0..64u32 << 20).map(|i| (i % 251) as u8).collect();
    fs::write(build.data_dir().join("big"), &big).unwrap();
    store.publish(build, meta(None)).unwrap();

    let before = free_bytes(store.root());
    let stats = store.clone_to(&sid(30), dest).unwrap();
    let after = free_bytes(store.root());
    assert_eq!(stats.strategy, store.strategy());
    assert_eq!(
        describe(dest).len(),
        describe(&store.data_dir(&sid(30))).len()
    );
    assert_eq!(
        describe(dest).get("big"),
        describe(&store.data_dir(&sid(30))).get("big")
    );
    assert_eq!(fs::read(dest.join("big")).unwrap(), big);
    let used = before.saturating_sub(after);
    assert!(
        used < 8 << 20,
        "a {} clone of 64 MiB used {used} bytes",
        stats.strategy
    );

    // Writing to the clone does not write through to the snapshot.
    fs::write(dest.join("big"), "changed").unwrap();
    assert!(store.verify(&sid(30)).unwrap());
}

#[test]
fn reflink_store_on_a_real_xfs() {
    let Some(xfs) = cow_fs_or_skip("reflink_store_on_a_real_xfs", || {
        LoopFs::xfs_reflink(LOOP_SIZE)
    }) else {
        return;
    };
    let store = LocalStore::open(xfs.mount.join("store"), owner()).unwrap();
    assert_eq!(store.strategy(), CloneStrategy::Reflink);
    assert!(dot_entries(store.root()).is_empty());
    let instances = xfs.mount.join("instances");
    fs::create_dir(&instances).unwrap();
    fs::set_permissions(&instances, fs::Permissions::from_mode(0o711)).unwrap();

    clone_shares_space(&store, &instances.join("big"));
    let stats = clone_tree(
        &store.data_dir(&sid(30)),
        &instances.join("tree"),
        CloneStrategy::Reflink,
        None,
    )
    .unwrap();
    assert_eq!(stats.strategy, CloneStrategy::Reflink);
    assert_eq!(
        describe(&instances.join("tree")),
        describe(&store.data_dir(&sid(30)))
    );
    postgres_runs_on_clones(&store, &instances);
    assert!(store.remove(&sid(30)).unwrap());
    assert!(dot_entries(store.root()).is_empty());
}

#[test]
fn btrfs_store_snapshots_subvolumes() {
    let Some(btrfs) = cow_fs_or_skip("btrfs_store_snapshots_subvolumes", || {
        LoopFs::btrfs(LOOP_SIZE)
    }) else {
        return;
    };
    let store = LocalStore::open(btrfs.mount.join("store"), owner()).unwrap();
    assert_eq!(store.strategy(), CloneStrategy::Btrfs);
    let instances = btrfs.mount.join("instances");
    fs::create_dir(&instances).unwrap();
    fs::set_permissions(&instances, fs::Permissions::from_mode(0o711)).unwrap();

    // A base build is a subvolume, so its clones can be snapshots.
    let build = store.begin(&sid(31), None).unwrap();
    assert!(is_subvolume(build.data_dir()));
    drop(build);
    assert!(
        dot_entries(store.root()).is_empty(),
        "a dropped subvolume build stayed"
    );

    clone_shares_space(&store, &instances.join("big"));
    assert!(is_subvolume(&store.data_dir(&sid(30))));
    assert!(is_subvolume(&instances.join("big")));
    let m = fs::metadata(instances.join("big")).unwrap();
    assert_eq!(m.mode() & 0o7777, 0o700);
    if let Some(o) = owner() {
        assert_eq!((m.uid(), m.gid()), (o.uid, o.gid));
    }
    remove_tree(&instances.join("big")).unwrap();
    assert!(!instances.join("big").exists());

    // A child of a snapshot is a snapshot too.
    let child = store.begin(&sid(32), Some(&sid(30))).unwrap();
    assert!(is_subvolume(child.data_dir()));
    store.publish(child, meta(Some(sid(30)))).unwrap();

    postgres_runs_on_clones(&store, &instances);
    assert!(store.remove(&sid(30)).unwrap());
    assert!(store.remove(&sid(32)).unwrap());
    assert!(dot_entries(store.root()).is_empty());
    assert!(!store.contains(&sid(30)));
}

#[test]
fn on_a_copy_store_a_child_shares_its_unchanged_files_with_its_parent() {
    let dir = scratch();
    let store = LocalStore::open(dir.path().join("store"), None)
        .unwrap()
        .with_strategy(CloneStrategy::Copy);
    let base = publish_sample(&store, sid(5));
    let build = store.begin(&sid(6), Some(&sid(5))).unwrap();
    fs::write(build.data_dir().join("base/1/1259"), vec![9u8; 100_000]).unwrap();
    let child = store.publish(build, meta(Some(sid(5)))).unwrap();
    let ino = |id: StateId, f: &str| fs::metadata(store.data_dir(&id).join(f)).unwrap().ino();
    for same in ["PG_VERSION", "run.sh", "base/1/empty"] {
        assert_eq!(ino(sid(5), same), ino(sid(6), same), "{same}");
    }
    assert_ne!(ino(sid(5), "base/1/1259"), ino(sid(6), "base/1/1259"));
    // Logical sizes are the full trees; usage counts the shared files once.
    assert_eq!(child.size_bytes, base.size_bytes);
    let shared = base.size_bytes - 100_000;
    assert_eq!(
        store.usage_bytes().unwrap(),
        base.size_bytes + child.size_bytes - shared
    );
    // The checksums still describe the content, and removing the parent leaves the child whole.
    assert!(store.verify(&sid(6)).unwrap());
    assert!(store.remove(&sid(5)).unwrap());
    assert!(store.verify(&sid(6)).unwrap());
    assert_eq!(store.usage_bytes().unwrap(), child.size_bytes);
    // An instance's clone is its own copy: writing it leaves the snapshot alone.
    let inst = dir.path().join("instance");
    store.clone_to(&sid(6), &inst).unwrap();
    fs::write(inst.join("PG_VERSION"), "16\n").unwrap();
    assert!(store.verify(&sid(6)).unwrap());
}

#[test]
fn a_damaged_snapshot_is_reported_and_quarantined_by_one_rename() {
    let dir = scratch();
    let store = LocalStore::open(dir.path().join("store"), owner()).unwrap();
    let id = sid(90);
    publish_sample(&store, id);
    let intact = store.verify_report(&id).unwrap();
    assert!(intact.intact && intact.detail.is_empty(), "{intact:?}");
    assert!(intact.bytes_read > 0);

    fs::write(store.data_dir(&id).join("PG_VERSION"), "16\n").unwrap();
    let damaged = store.verify_report(&id).unwrap();
    assert!(!damaged.intact);
    assert!(damaged.detail.contains("checksum sha256:"), "{damaged:?}");

    let moved = store.quarantine(&id).unwrap().unwrap();
    assert!(!store.contains(&id));
    assert_eq!(moved.parent().unwrap(), store.root().join(QUARANTINE));
    assert!(moved
        .file_name()
        .unwrap()
        .to_string_lossy()
        .starts_with(&format!("{id}-")));
    assert!(moved.join("manifest.json").is_file(), "kept, not deleted");
    // Quarantined snapshots are neither listed nor strays.
    assert!(store.list().unwrap().is_empty());
    assert!(store.strays().unwrap().is_empty());
    assert_eq!(store.quarantine(&id).unwrap(), None);
}

#[test]
fn strays_are_what_no_snapshot_explains_and_are_cleared() {
    let dir = scratch();
    let store = LocalStore::open(dir.path().join("store"), owner()).unwrap();
    publish_sample(&store, sid(91));
    let root = store.root().to_owned();
    fs::create_dir_all(root.join("junk")).unwrap();
    fs::create_dir_all(root.join(sid(92).to_string()).join("data")).unwrap();
    fs::create_dir_all(root.join(format!(".building-{}-0000000000000001", sid(93)))).unwrap();
    fs::create_dir_all(root.join(format!(".spare-{}", sid(94)))).unwrap();
    fs::create_dir_all(root.join(format!(".spare-{}", sid(91)))).unwrap();
    fs::create_dir_all(root.join(".trash-0000000000000001")).unwrap();

    let strays = store.strays().unwrap();
    let names: Vec<_> = strays.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(strays.len(), 4, "{strays:#?}");
    assert!(names.contains(&"junk"));
    let building = strays.iter().find(|s| s.build).unwrap();
    assert_eq!(building.state, Some(sid(93)));
    assert!(!building.may_hold_data);
    let unpublished = strays.iter().find(|s| s.state == Some(sid(92))).unwrap();
    assert!(unpublished.may_hold_data);

    for s in strays {
        store.clear_stray(&s).unwrap();
    }
    assert!(store.strays().unwrap().is_empty());
    let quarantined: Vec<_> = fs::read_dir(root.join(QUARANTINE))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(quarantined.len(), 2, "{quarantined:?}");
    assert!(store.contains(&sid(91)));
}
