//! Instance health against a real daemon: a kept instance's postmaster killed with SIGKILL is
//! noticed by the lifecycle loop (not running in `ls`, its death and signal in `events`), and
//! its DSN starts it again on its data, committed rows intact. Short ticks come from
//! `<home>/config.toml`; the test waits for what it expects, with a generous deadline.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::Env;

const DEADLINE: Duration = Duration::from_secs(60);

fn env_with_config(config: &str) -> Env {
    let env = Env::new();
    std::fs::create_dir_all(&env.home).expect("home");
    std::fs::write(env.home.join("config.toml"), config).expect("config.toml");
    env
}

fn psql(dsn: &str, sql: &str) -> Output {
    Command::new("psql")
        .args([dsn, "-Atc", sql])
        .output()
        .expect("psql")
}

/// The instance `iid` in `ls --json`.
fn instance(ls: &serde_json::Value, iid: &str) -> serde_json::Value {
    ls["instances"]
        .as_array()
        .expect("instances[]")
        .iter()
        .find(|i| i["instance_id"] == iid)
        .unwrap_or_else(|| panic!("no instance {iid} in {ls:#}"))
        .clone()
}

fn events(env: &Env) -> Vec<serde_json::Value> {
    env.ok(&["--json", "events"])
        .json()
        .as_array()
        .expect("events[]")
        .clone()
}

/// The postmaster's pid, from the first line of its data directory's postmaster.pid.
fn postmaster_pid(data_dir: &Path) -> i32 {
    let text = std::fs::read_to_string(data_dir.join("postmaster.pid"))
        .unwrap_or_else(|e| panic!("no postmaster.pid in {}: {e}", data_dir.display()));
    text.lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("postmaster.pid without a pid:\n{text}"))
}

#[test]
fn a_killed_instance_is_noticed_and_its_dsn_starts_it_again_with_its_rows() {
    let env = env_with_config("[lifecycle]\ntick_ms = 200\n");
    let v = env
        .ok(&[
            "--json",
            "prepare:psql",
            "--",
            "-c",
            "create table t(x int)",
        ])
        .json();
    let iid = v["instance_id"].as_str().expect("instance_id").to_owned();
    let dsn = v["dsn"].as_str().expect("dsn").to_owned();
    let out = psql(&dsn, "insert into t values (42)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let instance_dir = env.home.join("instances").join(&iid);
    let pid = postmaster_pid(&instance_dir.join("data"));
    assert_eq!(common::postmasters_under(&instance_dir), [pid]);
    // SAFETY: kill has no memory preconditions; the pid is the instance's postmaster.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let killed = Instant::now();

    // The lifecycle loop notices: the instance is not running any more.
    let status = loop {
        let status = instance(&env.ls(), &iid)["status"]
            .as_str()
            .expect("status")
            .to_owned();
        if status != "running" {
            break status;
        }
        if killed.elapsed() > DEADLINE {
            panic!("still running {DEADLINE:?} after SIGKILL\n{}", env.logs());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    eprintln!("noticed as {status:?} after {:?}", killed.elapsed());
    assert_eq!(status, "failed");
    let ev = events(&env);
    let died = ev
        .iter()
        .find(|e| e["kind"] == "instance_died" && e["instance_id"] == iid.as_str())
        .unwrap_or_else(|| panic!("no instance_died event: {ev:#?}"));
    let detail = died["detail"].as_str().expect("detail");
    assert!(detail.contains("killed by signal 9"), "{detail}");
    // Plain `sqlrs events` shows it too.
    let text = env.ok(&["events"]).stdout;
    assert!(
        text.contains("instance_died") && text.contains("killed by signal 9"),
        "{text}"
    );

    // The same DSN: the client waits while the instance starts again on its data, and the
    // committed row is there.
    let out = psql(&dsn, "select sum(x) from t");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        env.logs()
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42");
    assert_eq!(instance(&env.ls(), &iid)["status"], "running");
    let restarted = postmaster_pid(&instance_dir.join("data"));
    assert_ne!(restarted, pid);
    assert_eq!(common::postmasters_under(&instance_dir), [restarted]);
    let ev = events(&env);
    assert!(
        ev.iter()
            .any(|e| e["kind"] == "instance_restarted" && e["instance_id"] == iid.as_str()),
        "{ev:#?}"
    );

    // And it keeps working: a write after the restart, read back.
    assert!(psql(&dsn, "insert into t values (1)").status.success());
    let out = psql(&dsn, "select sum(x) from t");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "43");
}

#[test]
fn a_session_cut_by_the_kill_is_counted_out_and_the_restarted_instance_idles_down() {
    let env = env_with_config("[instances]\nidle_timeout_s = 2\n[lifecycle]\ntick_ms = 200\n");
    let v = env
        .ok(&[
            "--json",
            "prepare:psql",
            "--",
            "-c",
            "create table t(x int)",
        ])
        .json();
    let iid = v["instance_id"].as_str().expect("instance_id").to_owned();
    let dsn = v["dsn"].as_str().expect("dsn").to_owned();
    assert!(psql(&dsn, "insert into t values (5)").status.success());

    // A session in the middle of a query when the server dies.
    let session = Command::new("psql")
        .args([dsn.as_str(), "-Atc", "select pg_sleep(60)"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("psql");
    let instance_dir = env.home.join("instances").join(&iid);
    let data_dir = instance_dir.join("data");
    let pid = postmaster_pid(&data_dir);
    // Its backend is a child of the postmaster: wait until it runs pg_sleep.
    let start = Instant::now();
    while !backend_sleeping(pid) {
        assert!(start.elapsed() < DEADLINE, "the session never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: kill has no memory preconditions; the pid is the instance's postmaster.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let out = session.wait_with_output().expect("psql");
    assert!(!out.status.success(), "the session outlived its server");

    let start = Instant::now();
    while instance(&env.ls(), &iid)["status"] == "running" {
        assert!(
            start.elapsed() < DEADLINE,
            "SIGKILL not noticed\n{}",
            env.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = psql(&dsn, "select sum(x) from t");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "5",
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        env.logs()
    );

    // The cut session does not count as open: the restarted instance stops for being idle.
    let start = Instant::now();
    while instance(&env.ls(), &iid)["status"] != "stopped" {
        assert!(
            start.elapsed() < DEADLINE,
            "the restarted instance never idled down\n{:#}\n{}",
            env.ls(),
            env.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(common::postmasters_under(&instance_dir).is_empty());
}

/// Whether a child of `postmaster` is a backend waiting in pg_sleep (its title says so).
fn backend_sleeping(postmaster: i32) -> bool {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return false;
    };
    procs.flatten().any(|p| {
        let path = p.path();
        let parent = std::fs::read_to_string(path.join("stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(") ")
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<i32>().ok())
            });
        let title = std::fs::read(path.join("cmdline")).unwrap_or_default();
        parent == Some(postmaster) && String::from_utf8_lossy(&title).contains("SELECT")
    })
}
