//! The daemon's logs, end to end (real `sqlrs`, `taidon` and PostgreSQL): JSON lines with
//! request ids and no secrets, a size cap with rotation, and instance logs that go with their
//! instance.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::Env;

/// Every file under `dir`, with its content.
fn files_under(dir: &Path) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(files_under(&p));
            } else if let Ok(bytes) = fs::read(&p) {
                out.push((p, String::from_utf8_lossy(&bytes).into_owned()));
            }
        }
    }
    out
}

/// The password of a `postgres://user:password@host/...` DSN.
fn dsn_password(dsn: &str) -> String {
    let rest = dsn.split_once("://").expect("a URL").1;
    let userinfo = rest.split_once('@').expect("user info").0;
    userinfo.split_once(':').expect("a password").1.to_owned()
}

#[test]
fn json_logs_carry_request_ids_and_never_a_token() {
    let mut env = Env::new();
    env.extra_env
        .push(("TAIDON_LOG_FORMAT".into(), "json".into()));
    env.extra_env.push(("TAIDON_LOG".into(), "info".into()));
    let r = env.ok(&[
        "--json",
        "prepare:psql",
        "--",
        "-c",
        "create table t(x int)",
    ]);
    let dsn = r.json()["dsn"].as_str().expect("dsn").to_owned();
    let psql = std::process::Command::new("psql")
        .args([dsn.as_str(), "-At", "-c", "select count(*) from t"])
        .output()
        .expect("psql");
    assert!(
        psql.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&psql.stderr),
        env.logs()
    );
    assert_eq!(String::from_utf8_lossy(&psql.stdout).trim(), "0");
    env.ok(&["ls"]);

    let log = fs::read_to_string(env.home.join("logs/taidon.log")).expect("taidon.log");
    let mut request_ids = Vec::new();
    let mut connected = false;
    for line in log.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        assert!(v["timestamp"].is_string(), "{line}");
        assert!(v["level"].is_string(), "{line}");
        assert!(v["fields"].is_object(), "{line}");
        connected |= v["fields"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("client connected"));
        if v["fields"]["message"] == "api request" {
            let span = &v["span"];
            assert_eq!(span["name"], "api", "{line}");
            let id = span["request_id"]
                .as_str()
                .unwrap_or_else(|| panic!("{line}"));
            assert!(
                span["method"].is_string() && span["path"].is_string(),
                "{line}"
            );
            assert!(!span["path"].as_str().unwrap_or("").contains('?'), "{line}");
            assert!(v["fields"]["status"].is_u64(), "{line}");
            assert!(v["fields"]["elapsed_ms"].is_u64(), "{line}");
            request_ids.push(id.to_owned());
        }
    }
    assert!(connected, "the gateway logged no connection:\n{log}");
    // prepare, dsn, ls: several requests, each its own id.
    assert!(request_ids.len() >= 3, "{request_ids:?}\n{log}");
    request_ids.sort();
    request_ids.dedup();
    assert!(
        request_ids.len() >= 3,
        "request ids repeat: {request_ids:?}"
    );
    assert!(request_ids
        .iter()
        .all(|id| id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit())));

    // No secret in any file under the logs.
    let api_token = fs::read_to_string(env.home.join("api.token")).expect("api.token");
    let api_token = api_token.trim();
    let password = dsn_password(&dsn);
    assert!(api_token.len() >= 16 && password.len() >= 16);
    for (path, text) in files_under(&env.home.join("logs")) {
        assert!(
            !text.contains(api_token),
            "the API token is in {}",
            path.display()
        );
        assert!(
            !text.contains(&password),
            "the DSN's password is in {}",
            path.display()
        );
        // Not even the token's signature part.
        let sig = password.rsplit('.').next().unwrap_or(&password);
        assert!(!text.contains(sig), "a token part is in {}", path.display());
    }
}

#[test]
fn the_daemon_log_rotates_at_its_cap() {
    let mut env = Env::new();
    // 4 KiB, and debug lines to fill it.
    env.extra_env.push(("TAIDON_LOG_MAX_KB".into(), "4".into()));
    env.extra_env.push(("TAIDON_LOG".into(), "debug".into()));
    env.ok(&["prepare:psql", "--", "-c", "create table t(x int)"]);
    for _ in 0..5 {
        env.ok(&["ls"]);
    }
    let logs = env.home.join("logs");
    let log = logs.join("taidon.log");
    let rotated = |n: u32| logs.join(format!("taidon.log.{n}"));
    assert!(rotated(1).exists(), "no rotation:\n{}", env.logs());
    // --log-keep defaults to 3: taidon.log and at most three rotated files.
    assert!(
        !rotated(4).exists(),
        "{:?}",
        fs::read_dir(&logs).map(|d| d.count())
    );
    for p in [log.clone(), rotated(1), rotated(2), rotated(3)] {
        let Ok(text) = fs::read_to_string(&p) else {
            continue;
        };
        assert!(
            text.is_empty() || text.ends_with('\n'),
            "{} ends in the middle of a line",
            p.display()
        );
        // Under the cap, unless a single line is longer than it.
        assert!(
            text.len() <= 4096 || text.lines().count() == 1,
            "{} is {} bytes",
            p.display(),
            text.len()
        );
    }
    // Anything the daemon wrote before its logging began went to the stderr log, not here.
    assert!(logs.join("taidon.stderr.log").exists());
}

#[test]
fn an_instance_log_goes_with_its_instance_and_orphans_at_restart() {
    let env = Env::new();
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
    let instance_logs = env.home.join("logs/instances");
    let log = instance_logs.join(format!("{iid}.log"));
    assert!(log.exists(), "no {}:\n{}", log.display(), env.logs());
    env.ok(&["rm", &iid]);
    assert!(!log.exists(), "{} is left after rm", log.display());

    // A log of an instance nobody knows (left by a crash) goes when the daemon starts.
    let orphan = instance_logs.join("0123456789abcdef.log");
    fs::write(&orphan, "left over\n").expect("write");
    let kept = env
        .ok(&[
            "--json",
            "prepare:psql",
            "--",
            "-c",
            "create table t(x int)",
        ])
        .json();
    let kept = instance_logs.join(format!(
        "{}.log",
        kept["instance_id"].as_str().expect("instance_id")
    ));
    let pid = env.daemon_pid().expect("daemon pid");
    env.ok(&["shutdown"]);
    assert!(common::wait_gone(pid, Duration::from_secs(20)));
    env.ok(&["ls"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while orphan.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!orphan.exists(), "the orphan log is left:\n{}", env.logs());
    assert!(kept.exists(), "an adopted instance keeps its log");
}
