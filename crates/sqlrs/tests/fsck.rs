//! `sqlrs fsck` and `[store] verify` against a real daemon and real PostgreSQL: a damaged
//! snapshot is found, reported, quarantined (never deleted) and rebuilt when next asked for;
//! orphan directories and instances without data are found and repaired.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{state, Env};

const DEADLINE: Duration = Duration::from_secs(60);
/// No standby pool: a standby started in the background would verify (and quarantine) a
/// snapshot before the test asks for it.
const NO_STANDBY: &str = "[policy.standby]\npinned = 0\nbusy = 0\nother = 0\n";

fn env_with_config(config: &str) -> Env {
    let env = Env::new();
    std::fs::create_dir_all(&env.home).expect("home");
    std::fs::write(
        env.home.join("config.toml"),
        format!("{config}{NO_STANDBY}"),
    )
    .expect("config.toml");
    env
}

const STEPS: [&str; 5] = [
    "-c",
    "create table a as select 1 as x",
    "-c",
    "create table b as select generate_series(1, 100) as y",
    "",
];

/// `prepare:psql` of the two steps above; the head state and the instance.
fn prepare(env: &Env) -> (String, String, String) {
    let mut args = vec!["--json", "prepare:psql", "--"];
    args.extend_from_slice(&STEPS[..4]);
    let v = env.ok(&args).json();
    (
        v["state_id"].as_str().expect("state_id").to_owned(),
        v["instance_id"].as_str().expect("instance_id").to_owned(),
        v["dsn"].as_str().expect("dsn").to_owned(),
    )
}

fn psql(dsn: &str, sql: &str) -> String {
    let out = std::process::Command::new("psql")
        .args([dsn, "-Atc", sql])
        .output()
        .expect("psql");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Flips a byte in a file of `sid`'s snapshot that no other snapshot shares (a store that
/// copies hard-links unchanged files to the parent's), keeping its owner and size.
fn damage(env: &Env, sid: &str) -> PathBuf {
    let data = env.home.join("snapshots").join(sid).join("data");
    let mut files = Vec::new();
    collect_files(&data.join("base"), &mut files);
    files.sort();
    let victim = files
        .into_iter()
        .find(|p| {
            let m = std::fs::metadata(p).expect("stat");
            m.nlink() == 1 && m.len() > 0
        })
        .unwrap_or_else(|| panic!("no unshared file under {}", data.display()));
    let mut bytes = std::fs::read(&victim).expect("read");
    let at = bytes.len() / 2;
    bytes[at] ^= 0xff;
    // Written in place: the file keeps its inode and its owner (the postgres user).
    std::fs::write(&victim, &bytes).expect("write");
    victim
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("list").flatten() {
        let p = e.path();
        if e.file_type().expect("type").is_dir() {
            collect_files(&p, out);
        } else if e.file_type().expect("type").is_file() {
            out.push(p);
        }
    }
}

/// Whether the store holds a published snapshot of `sid`.
fn has_snapshot(env: &Env, sid: &str) -> bool {
    env.home
        .join("snapshots")
        .join(sid)
        .join("manifest.json")
        .is_file()
}

fn quarantined(env: &Env) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(env.home.join("snapshots").join("quarantine")) else {
        return vec![];
    };
    let mut names: Vec<_> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn event_kinds(env: &Env, id: &str) -> Vec<String> {
    env.ok(&["--json", "events", id])
        .json()
        .as_array()
        .expect("events[]")
        .iter()
        .map(|e| e["kind"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[test]
fn fsck_of_a_clean_home_exits_0_and_says_so() {
    let env = env_with_config("");
    prepare(&env);
    let r = env.ok(&["fsck"]);
    assert!(r.stdout.contains("no problems found"), "{}", r.describe());
    assert!(
        r.stderr.contains("checking 3 snapshot(s)"),
        "{}",
        r.describe()
    );
}

#[test]
fn a_damaged_snapshot_is_reported_quarantined_by_repair_and_rebuilt() {
    let env = env_with_config("");
    let (head, iid, _) = prepare(&env);
    env.ok(&["rm", &iid]);
    let ls = env.ls();
    let parent = state(&ls, &head)["parent"]
        .as_str()
        .expect("parent")
        .to_owned();
    damage(&env, &head);

    // Found, not touched.
    let r = env.fails(1, &["--json", "fsck"]);
    let report = r.json();
    let findings = report["findings"].as_array().expect("findings[]");
    assert_eq!(findings.len(), 1, "{report:#}");
    assert_eq!(findings[0]["kind"], "checksum_mismatch", "{report:#}");
    assert_eq!(findings[0]["state_id"], head.as_str(), "{report:#}");
    assert_eq!(findings[0]["repaired"], false, "{report:#}");
    assert!(
        report["snapshots_checked"].as_u64() >= Some(3),
        "{report:#}"
    );
    let r = env.fails(1, &["fsck"]);
    assert!(r.stdout.contains("checksum_mismatch"), "{}", r.describe());
    assert!(r.stdout.contains(&head[..12]), "{}", r.describe());
    assert!(r.stdout.contains("NOT repaired"), "{}", r.describe());
    assert!(has_snapshot(&env, &head));
    assert!(quarantined(&env).is_empty());
    assert_eq!(state(&env.ls(), &head)["status"], "WARM");
    let count = || common::metric(&env.metrics(), "taidon_snapshots_quarantined_total");
    assert_eq!(count(), 0);

    // Repaired: quarantined, COLD with the reason; the parent untouched.
    let r = env.ok(&["fsck", "--repair"]);
    assert!(r.stdout.contains("repaired"), "{}", r.describe());
    assert!(!env.home.join("snapshots").join(&head).exists());
    let q = quarantined(&env);
    assert!(
        q.len() == 1 && q[0].starts_with(&format!("{head}-")),
        "{q:?}"
    );
    let ls = env.ls();
    let s = state(&ls, &head);
    assert_eq!(s["status"], "COLD", "{ls:#}");
    assert!(
        s["status_reason"]
            .as_str()
            .is_some_and(|r| r.contains("checksum mismatch")),
        "{ls:#}"
    );
    assert_eq!(state(&ls, &parent)["status"], "WARM", "{ls:#}");
    assert!(event_kinds(&env, &head).contains(&"snapshot_quarantined".to_owned()));
    assert_eq!(count(), 1);
    let r = env.ok(&["fsck"]);
    assert!(r.stdout.contains("no problems found"), "{}", r.describe());

    // The same prepare rebuilds it from the parent, with the right data.
    let (again, _, dsn) = prepare(&env);
    assert_eq!(again, head);
    assert_eq!(psql(&dsn, "select count(*) from b"), "100");
    assert_eq!(psql(&dsn, "select x from a"), "1");
    assert!(has_snapshot(&env, &head));
    env.ok(&["fsck"]);
}

#[test]
fn with_verify_a_damaged_snapshot_fails_the_next_instance_and_is_rebuilt_after() {
    let env = env_with_config("[store]\nverify = true\n");
    let (head, iid, _) = prepare(&env);
    env.ok(&["rm", &iid]);
    damage(&env, &head);
    let before: Vec<_> = std::fs::read_dir(env.home.join("instances"))
        .map(|d| d.flatten().count())
        .unwrap_or(0)
        .to_string()
        .into_bytes();

    let mut args = vec!["prepare:psql", "--"];
    args.extend_from_slice(&STEPS[..4]);
    let r = env.run(&args);
    assert_ne!(r.code, 0, "{}", r.describe());
    assert!(r.stderr.contains("checksum mismatch"), "{}", r.describe());
    assert!(r.stderr.contains(&head[..12]), "{}", r.describe());
    // No instance left behind, the snapshot in quarantine, the state COLD.
    assert_eq!(env.instance_count(), 0);
    let after = std::fs::read_dir(env.home.join("instances"))
        .map(|d| d.flatten().count())
        .unwrap_or(0)
        .to_string()
        .into_bytes();
    assert_eq!(before, after, "no instance directory is left");
    assert_eq!(quarantined(&env).len(), 1);
    assert_eq!(state(&env.ls(), &head)["status"], "COLD");
    assert!(event_kinds(&env, &head).contains(&"snapshot_quarantined".to_owned()));

    let (again, _, dsn) = prepare(&env);
    assert_eq!(again, head);
    assert_eq!(psql(&dsn, "select count(*) from b"), "100");
}

#[test]
fn orphan_directories_and_instances_without_data_are_found_and_repaired() {
    let env = env_with_config("[instances]\nidle_timeout_s = 1\n[lifecycle]\ntick_ms = 100\n");
    let (head, iid, _) = prepare(&env);
    // The instance stops for being idle; then its data goes.
    let start = Instant::now();
    loop {
        let ls = env.ls();
        let stopped = ls["instances"].as_array().is_some_and(|a| {
            a.iter()
                .any(|i| i["instance_id"] == iid.as_str() && i["status"] == "stopped")
        });
        if stopped {
            break;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "the instance never stopped\n{ls:#}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::fs::remove_dir_all(env.home.join("instances").join(&iid).join("data")).expect("rm");
    let snapshots = env.home.join("snapshots");
    std::fs::create_dir_all(snapshots.join("junk")).expect("junk");
    std::fs::write(snapshots.join("junk").join("note"), "keep me").expect("note");
    let build = snapshots.join(format!(".building-{head}-00000000deadbeef"));
    std::fs::create_dir_all(build.join("data")).expect("build");
    let stray_instance = env.home.join("instances").join("00000000000000ff");
    std::fs::create_dir_all(stray_instance.join("data")).expect("instance dir");

    let r = env.fails(1, &["fsck"]);
    let text = &r.stdout;
    assert_eq!(
        text.matches("orphan_directory").count(),
        3,
        "{}",
        r.describe()
    );
    assert!(text.contains("junk"), "{}", r.describe());
    assert!(text.contains(".building-"), "{}", r.describe());
    assert!(
        text.contains("instances/00000000000000ff"),
        "{}",
        r.describe()
    );
    assert!(text.contains("instance_without_data"), "{}", r.describe());
    assert!(text.contains(&iid[..12]), "{}", r.describe());

    let r = env.ok(&["--json", "fsck", "--repair"]);
    let report = r.json();
    let findings = report["findings"].as_array().expect("findings[]");
    assert_eq!(findings.len(), 4, "{report:#}");
    assert!(findings.iter().all(|f| f["repaired"] == true), "{report:#}");
    assert!(!snapshots.join("junk").exists());
    assert!(quarantined(&env).iter().any(|n| n.starts_with("junk-")));
    assert!(!build.exists());
    assert!(!stray_instance.exists());
    let ls = env.ls();
    assert!(
        !ls["instances"]
            .as_array()
            .expect("instances[]")
            .iter()
            .any(|i| i["instance_id"] == iid.as_str()),
        "{ls:#}"
    );
    let r = env.ok(&["fsck"]);
    assert!(r.stdout.contains("no problems found"), "{}", r.describe());
}
