//! A full disk under the store, during a build: the build fails naming the disk, nothing is
//! published, and the states already there stay intact and usable once space is freed.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{traversable_tempdir, Env};
use taidon_store::testing::{cow_fs_or_skip, LoopFs};

const KEPT: &str =
    "create table kept as select g, md5(g::text) as h from generate_series(1, 20000) g";
/// About 130 MB of rows: more than the disk has left.
const BIG: &str = "create table big as select g, repeat(md5(g::text), 20) as pad \
                   from generate_series(1, 200000) g";

/// Takes all but `leave` bytes of the file system at `dir` with one file; its path.
fn fill(dir: &Path, leave: u64) -> PathBuf {
    let path = dir.join("filler");
    let take = free_bytes(dir).saturating_sub(leave);
    let ok = Command::new("fallocate")
        .args(["-l", &take.to_string()])
        .arg(&path)
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "fallocate {take} bytes in {}", dir.display());
    path
}

fn free_bytes(dir: &Path) -> u64 {
    let out = Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(dir)
        .output()
        .expect("df");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .expect("df output")
}

#[test]
fn a_full_disk_fails_the_build_naming_it_and_loses_nothing() {
    let Some(disk) = cow_fs_or_skip("disk_full", || LoopFs::xfs_reflink(640 << 20)) else {
        return;
    };
    let root = traversable_tempdir();
    let env = Env::in_home(disk.mount.join("home"), root);
    // A state with data: it must survive the full disk.
    let r = env.ok(&["--json", "prepare:psql", "--", "-c", KEPT]);
    let kept = r.json()["state_id"].as_str().expect("state_id").to_owned();
    let published = env.published_count();

    // The next step writes far more than what is left.
    let filler = fill(&disk.mount, 40 << 20);
    let r = env.run(&["--json", "prepare:psql", "--", "-c", KEPT, "-c", BIG]);
    assert_eq!(r.code, 1, "{}", r.describe());
    let mount = disk.mount.display().to_string();
    for part in [
        "the disk under the snapshot store",
        &format!("mounted at {mount}) is full"),
        "free some space and prepare again",
        "No space left on device",
        "step 2/2",
    ] {
        assert!(r.stderr.contains(part), "no {part:?} in\n{}", r.describe());
    }
    assert_eq!(env.published_count(), published, "nothing new is published");
    assert!(
        env.unpublished_snapshot_dirs().is_empty(),
        "{:?}",
        env.unpublished_snapshot_dirs()
    );
    let failed = env.states_with_status("FAILED");
    assert_eq!(failed.len(), 1, "{:#}", env.ls());

    // The state that was there is intact, and an instance of it works, disk still full.
    let r = env.ok(&[
        "prepare:psql",
        "--",
        "-c",
        KEPT,
        "run:psql",
        "--",
        "-tAc",
        "select count(*) from kept",
    ]);
    assert_eq!(r.stdout.trim(), "20000");

    // Once there is room again, the same prepare builds and publishes the new state.
    fs::remove_file(&filler).expect("free the space");
    let r = env.ok(&[
        "prepare:psql",
        "--",
        "-c",
        KEPT,
        "-c",
        BIG,
        "run:psql",
        "--",
        "-tAc",
        "select count(*) from big",
    ]);
    assert_eq!(r.stdout.trim(), "200000", "{}", r.describe());
    assert_eq!(env.published_count(), published + 1);
    assert!(env.ls().to_string().contains(&kept));
}
