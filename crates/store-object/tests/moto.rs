//! The object tier against a real S3-compatible server: moto in server mode.
//!
//! Without `moto_server` on PATH these tests skip loudly, or fail when `TAIDON_REQUIRE_COW`
//! is set (as CI sets it); `scripts/setup.sh` installs it.

use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

use object_store::PutPayload;
use taidon_core::{EngineFingerprint, InitdbOptions, StateId};
use taidon_store::{tree_digest, Manifest};
use taidon_store_object::{RemoteConfig, RemoteStore, CHUNK_SIZE};

const MIB: usize = 1024 * 1024;

/// A moto server on a free loopback port, with one bucket; killed (by its pid) when dropped.
struct Moto {
    child: Child,
    port: u16,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn moto_available() -> bool {
    Command::new("moto_server")
        .arg("--help")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Starts moto and makes the bucket `snaps`, or returns `None` (skip) when moto is missing.
async fn moto(test: &str) -> Option<Moto> {
    if !moto_available() {
        if std::env::var_os("TAIDON_REQUIRE_COW").is_some() {
            panic!("{test}: TAIDON_REQUIRE_COW is set but moto_server is missing (scripts/setup.sh installs it)");
        }
        eprintln!("SKIP {test}: moto_server is missing; scripts/setup.sh installs it");
        return None;
    }
    static ENV: Once = Once::new();
    ENV.call_once(|| {
        std::env::set_var("AWS_ACCESS_KEY_ID", "testing");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "testing");
    });
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let log = tempfile::NamedTempFile::new().unwrap();
    let child = Command::new("moto_server")
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(log.reopen().unwrap())
        .spawn()
        .expect("start moto_server");
    let mut moto = Moto { child, port };
    let log_text = || fs::read_to_string(log.path()).unwrap_or_default();
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let put = client
            .put(format!("http://127.0.0.1:{port}/snaps"))
            .send()
            .await;
        match put {
            Ok(resp) if resp.status().is_success() => break,
            Ok(resp) => panic!("{test}: creating the bucket: {}", resp.status()),
            Err(_) if Instant::now() < deadline && moto.child.try_wait().unwrap().is_none() => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!(
                "{test}: moto_server did not come up on port {port}: {e}\n{}",
                log_text()
            ),
        }
    }
    Some(moto)
}

fn remote(moto: &Moto) -> RemoteStore {
    RemoteStore::connect(&RemoteConfig {
        url: "s3://snaps/team/".to_owned(),
        endpoint: Some(format!("http://127.0.0.1:{}", moto.port)),
        allow_http: true,
        region: "us-east-1".to_owned(),
    })
    .unwrap()
}

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

#[tokio::test]
async fn a_snapshot_round_trips_with_contents_and_modes() {
    let Some(moto) = moto("round trip").await else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let id = snapshot(&src, 1);
    let remote = remote(&moto);

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

#[tokio::test]
async fn a_child_uploads_only_the_chunks_it_changed() {
    let Some(moto) = moto("child").await else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let parent = tmp.path().join("parent");
    let parent_id = snapshot(&parent, 1);
    let remote = remote(&moto);
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

#[tokio::test]
async fn a_corrupt_chunk_fails_the_restore_and_leaves_nothing() {
    let Some(moto) = moto("corrupt chunk").await else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let id = snapshot(&src, 1);
    let remote = remote(&moto);
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

#[tokio::test]
async fn a_corrupt_manifest_fails_the_restore_and_leaves_nothing() {
    let Some(moto) = moto("corrupt manifest").await else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let id = snapshot(&src, 1);
    let remote = remote(&moto);
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

#[tokio::test]
async fn racing_uploads_of_a_state_publish_one_manifest_and_the_other_verifies() {
    let Some(moto) = moto("race").await else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    let id = snapshot(&a, 1);
    assert_eq!(snapshot(&b, 1), id);
    let (ra, rb) = (remote(&moto), remote(&moto));

    let (x, y) = tokio::join!(ra.upload(&a), rb.upload(&b));
    let (x, y) = (x.unwrap(), y.unwrap());
    assert!(x.manifest_created ^ y.manifest_created, "{x:?} {y:?}");
    remote(&moto)
        .restore(&id, &tmp.path().join("dst"))
        .await
        .unwrap();

    // A third machine with different data under the same state id is refused.
    let c = tmp.path().join("c");
    snapshot(&c, 1);
    write(&c.join("data/PG_VERSION"), b"17\n", 0o600);
    seal(&c, 1, None);
    let err = remote(&moto).upload(&c).await.unwrap_err().to_string();
    assert!(err.contains("checksum mismatch"), "{err}");
    assert!(err.contains(&id.to_string()), "{err}");
}
