//! The lifecycle against real daemons and real PostgreSQL servers: idle downscale, eviction
//! with pins, cold restore from the nearest ancestor, the webhook, reconciliation after
//! SIGKILL, and the standby hand-out. Short timeouts come from `<home>/config.toml`; no test
//! asserts a time, they wait for the state they expect (with a generous deadline).

mod common;

use std::time::{Duration, Instant};

use common::{state, Env};

const DEADLINE: Duration = Duration::from_secs(60);

fn env_with_config(config: &str) -> Env {
    let env = Env::new();
    std::fs::create_dir_all(&env.home).expect("home");
    std::fs::write(env.home.join("config.toml"), config).expect("config.toml");
    env
}

/// Polls `ls --json` until `pred` holds; fails with the last listing and the logs.
fn wait_for(env: &Env, what: &str, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let start = Instant::now();
    loop {
        let ls = env.ls();
        if pred(&ls) {
            return ls;
        }
        if start.elapsed() > DEADLINE {
            panic!("timed out waiting for {what}\n{ls:#}\n{}", env.logs());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn events(env: &Env, id: Option<&str>) -> Vec<serde_json::Value> {
    let mut args = vec!["--json", "events"];
    if let Some(id) = id {
        args.push(id);
    }
    env.ok(&args).json().as_array().expect("events[]").clone()
}

/// The ids of a chain's states, base first, from `ls` (parents before children).
fn chain_of(ls: &serde_json::Value, head: &str) -> Vec<String> {
    let mut out = vec![head.to_owned()];
    let mut cur = state(ls, head)["parent"].clone();
    while let Some(p) = cur.as_str() {
        out.push(p.to_owned());
        cur = state(ls, p)["parent"].clone();
    }
    out.reverse();
    out
}

#[test]
fn an_idle_instance_stops_and_its_state_drops_to_warm() {
    let env = env_with_config("[instances]\nidle_timeout_s = 1\n[lifecycle]\ntick_ms = 100\n");
    let r = env.ok(&[
        "--json",
        "prepare:psql",
        "--",
        "-c",
        "create table t(x int)",
    ]);
    let v = r.json();
    let sid = v["state_id"].as_str().expect("state_id").to_owned();
    let iid = v["instance_id"].as_str().expect("instance_id").to_owned();
    let dsn = v["dsn"].as_str().expect("dsn").to_owned();
    let psql = |sql: &str| {
        std::process::Command::new("psql")
            .args([dsn.as_str(), "-Atc", sql])
            .output()
            .expect("psql")
    };
    assert!(psql("insert into t values (7)").status.success());
    let ls = wait_for(&env, "the idle instance to stop", |ls| {
        ls["instances"].as_array().is_some_and(|a| {
            a.iter()
                .any(|i| i["instance_id"] == iid.as_str() && i["status"] == "stopped")
        })
    });
    assert_eq!(state(&ls, &sid)["status"], "WARM", "{ls:#}");
    assert!(
        common::postmasters_under(&env.home.join("instances").join(&iid)).is_empty(),
        "its server is gone"
    );
    let ev = events(&env, Some(&sid));
    assert!(
        ev.iter()
            .any(|e| e["kind"] == "instance_stopped" && e["detail"] == "idle"),
        "{ev:#?}"
    );
    assert!(
        ev.iter()
            .any(|e| e["kind"] == "transition" && e["detail"] == "HOT -> WARM"),
        "{ev:#?}"
    );

    // Its DSN still works: the gateway has the client wait while the instance starts again,
    // on its own data.
    let out = psql("select sum(x) from t");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "7");
    let ev = events(&env, Some(&sid));
    assert!(ev.iter().any(|e| e["kind"] == "instance_woken"), "{ev:#?}");
}

#[test]
fn eviction_spares_pins_and_a_cold_state_is_restored_from_its_nearest_ancestor() {
    let env = env_with_config("[lifecycle]\ntick_ms = 100\n");
    let r = env.ok(&[
        "--json",
        "prepare:psql",
        "--",
        "-c",
        "create table a(x int)",
        "-c",
        "insert into a values (42)",
    ]);
    let v = r.json();
    let head = v["state_id"].as_str().expect("state_id").to_owned();
    let iid = v["instance_id"].as_str().expect("instance_id").to_owned();
    env.ok(&["rm", &iid]);
    let ls = env.ls();
    let chain = chain_of(&ls, &head);
    assert_eq!(chain.len(), 3, "base, step 1, step 2");
    let (base, step1) = (&chain[0], &chain[1]);
    env.ok(&["pin", base, "--reason", "main", "--ref", "main"]);
    env.ok(&["pin", step1, "--reason", "manual"]);

    // A store of 1 MiB: everything that may go, goes.
    env.ok(&["shutdown"]);
    std::fs::write(
        env.home.join("config.toml"),
        "[store]\ncapacity_mb = 1\n[lifecycle]\ntick_ms = 100\n",
    )
    .expect("config.toml");
    let ls = wait_for(&env, "the unpinned head to be evicted", |ls| {
        state(ls, &head)["status"] == "COLD"
    });
    assert_eq!(state(&ls, base)["status"], "WARM", "pinned: {ls:#}");
    assert_eq!(state(&ls, step1)["status"], "WARM", "pinned: {ls:#}");
    assert_eq!(state(&ls, step1)["pin"], "manual");
    assert!(
        !env.home.join("snapshots").join(&head).exists(),
        "the snapshot is deleted"
    );
    let status = env.ok(&["--json", "status"]).json();
    assert_eq!(status["store_capacity_bytes"], 1024 * 1024);

    // Asked for by id, the COLD head replays one step from step 1.
    let r = env.ok(&["warmup", &head[..12]]);
    let short1 = &step1[..8];
    assert!(
        r.stderr.contains(&format!(
            "is COLD (evicted): restoring from its nearest surviving ancestor {short1}, replaying 1 step"
        )),
        "{}",
        r.describe()
    );
    // And by its steps, with the data it had.
    let r = env.ok(&[
        "prepare:psql",
        "--",
        "-c",
        "create table a(x int)",
        "-c",
        "insert into a values (42)",
        "run:psql",
        "--",
        "-tAc",
        "select x from a",
    ]);
    assert_eq!(r.stdout.trim(), "42", "{}", r.describe());
    let ev = events(&env, Some(&head));
    assert!(ev.iter().any(|e| e["kind"] == "evicted"), "{ev:#?}");
    assert!(ev.iter().any(|e| e["kind"] == "restoring"), "{ev:#?}");
    // The metrics saw the eviction and the rebuilds (warmup's, and the prepare's if the head
    // was evicted again in between: the store holds 1 MiB).
    let metrics = env.metrics();
    let value = |series: &str| common::metric(&metrics, series);
    assert!(value("taidon_restores_total{source=\"rebuild\",result=\"ok\"}") >= 1);
    assert_eq!(
        value("taidon_restores_total{source=\"rebuild\",result=\"failed\"}"),
        0
    );
    assert!(value("taidon_evictions_total{reason=\"store_capacity\"}") >= 1);
}

fn api_url(env: &Env) -> String {
    let text = std::fs::read_to_string(env.home.join("daemon.json")).expect("daemon.json");
    let v: serde_json::Value = serde_json::from_str(&text).expect("json");
    v["api_url"].as_str().expect("api_url").to_owned()
}

fn post_webhook(url: &str, event: &str, signature: &str, body: &str) -> (u16, String) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let resp = reqwest::Client::new()
            .post(format!("{url}/v1/webhook"))
            .header("X-GitHub-Event", event)
            .header("X-Hub-Signature-256", signature)
            .body(body.to_owned())
            .send()
            .await
            .expect("webhook request");
        let status = resp.status().as_u16();
        (status, resp.text().await.unwrap_or_default())
    })
}

fn sign(secret: &str, body: &str) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    format!(
        "sha256={}",
        hex::encode(ring::hmac::sign(&key, body.as_bytes()).as_ref())
    )
}

#[test]
fn the_webhook_checks_signatures_and_a_closed_pr_releases_its_states() {
    let env = env_with_config("[webhook]\nsecret = \"s3cret\"\n");
    let v = env
        .ok(&[
            "--json",
            "prepare:psql",
            "--",
            "-c",
            "create table pr(x int)",
        ])
        .json();
    let sid = v["state_id"].as_str().expect("state_id").to_owned();
    env.ok(&["pin", &sid, "--reason", "pr", "--ref", "7"]);
    assert_eq!(state(&env.ls(), &sid)["pin"], "pr:7");
    let url = api_url(&env);
    let body = r#"{"action":"closed","number":7}"#;

    let (code, text) = post_webhook(&url, "pull_request", &sign("wrong", body), body);
    assert_eq!(code, 401, "{text}");
    assert_eq!(
        state(&env.ls(), &sid)["pin"],
        "pr:7",
        "a bad signature changes nothing"
    );
    let ev = events(&env, None);
    assert!(
        ev.iter().any(|e| e["kind"] == "webhook_rejected"),
        "{ev:#?}"
    );

    let (code, text) = post_webhook(&url, "pull_request", &sign("s3cret", body), body);
    assert_eq!(code, 200, "{text}");
    let outcome: serde_json::Value = serde_json::from_str(&text).expect("json");
    assert_eq!(outcome["unpinned"], 1, "{text}");
    assert_eq!(state(&env.ls(), &sid)["pin"], "released pr:7");

    // Reopened: pinned again.
    let body = r#"{"action":"reopened","number":7}"#;
    let (code, text) = post_webhook(&url, "pull_request", &sign("s3cret", body), body);
    assert_eq!(code, 200, "{text}");
    assert_eq!(state(&env.ls(), &sid)["pin"], "pr:7");
}

#[test]
fn a_build_interrupted_by_sigkill_is_cold_after_restart_with_the_reason() {
    let env = env_with_config("");
    env.ok(&["status"]);
    let mut slow = env
        .command(&[
            "prepare:psql",
            "--",
            "-c",
            "create table s(x int)",
            "-c",
            "select pg_sleep(60)",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn sqlrs");
    let ls = wait_for(&env, "the slow step to be building", |ls| {
        ls["states"].as_array().is_some_and(|a| {
            a.iter()
                .any(|s| s["status"] == "BUILDING" && s["label"] == "-c 'select pg_sleep(60)'")
        })
    });
    let building = ls["states"]
        .as_array()
        .expect("states")
        .iter()
        .find(|s| s["status"] == "BUILDING")
        .and_then(|s| s["state_id"].as_str())
        .expect("building id")
        .to_owned();
    let pid = env.daemon_pid().expect("daemon pid");
    unsafe { libc::kill(pid, libc::SIGKILL) };
    assert!(common::wait_gone(pid, Duration::from_secs(10)));
    let _ = slow.wait();

    let ls = env.ls(); // a new daemon reconciles
    let s = state(&ls, &building);
    assert_eq!(s["status"], "COLD", "{ls:#}");
    assert!(
        s["status_reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("interrupted")),
        "{ls:#}"
    );
    assert!(env.unpublished_snapshot_dirs().is_empty());
    assert!(
        common::postmasters_under(&env.home.join("snapshots")).is_empty(),
        "no build server survives"
    );
}

#[test]
fn warmup_hot_keeps_a_standby_that_the_next_instance_takes() {
    let env = env_with_config("[lifecycle]\ntick_ms = 100\n");
    let r = env.ok(&[
        "--json",
        "warmup",
        "--hot",
        "prepare:psql",
        "--",
        "-c",
        "create table h(x int)",
    ]);
    let sid = r.json()["state_id"].as_str().expect("state_id").to_owned();
    let status = env.ok(&["--json", "status"]).json();
    assert_eq!(status["standby_instances"], 1, "{status:#}");
    assert_eq!(state(&env.ls(), &sid)["status"], "HOT");

    let r = env.ok(&[
        "prepare:psql",
        "--",
        "-c",
        "create table h(x int)",
        "run:psql",
        "--",
        "-tAc",
        "select count(*) from h",
    ]);
    assert_eq!(r.stdout.trim(), "0", "{}", r.describe());
    let ev = events(&env, Some(&sid));
    assert!(ev.iter().any(|e| e["kind"] == "standby_taken"), "{ev:#?}");
    // The pool refills behind the hand-out.
    let start = Instant::now();
    while env.ok(&["--json", "status"]).json()["standby_instances"] != 1 {
        assert!(
            start.elapsed() < DEADLINE,
            "no replacement standby\n{}",
            env.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn at_the_instance_limit_with_none_idle_a_new_instance_is_refused_and_nothing_is_lost() {
    let env = env_with_config("[instances]\nmax = 1\n[policy.standby]\npinned = 0\nbusy = 0\n");
    let v = env
        .ok(&[
            "--json",
            "prepare:psql",
            "--",
            "-c",
            "create table a(x int)",
        ])
        .json();
    let (first, dsn) = (
        v["instance_id"].as_str().expect("instance_id").to_owned(),
        v["dsn"].as_str().expect("dsn").to_owned(),
    );
    // A live session keeps the only instance from being idle.
    let mut busy = std::process::Command::new("psql")
        .args([dsn.as_str(), "-c", "select pg_sleep(30)"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("psql");
    wait_for(&env, "the session to count", |_| {
        common::postmasters_under(&env.home.join("instances")).len() == 1
            && std::fs::read_to_string(env.home.join("logs/taidon.log"))
                .is_ok_and(|l| l.contains("client connected"))
    });

    let r = env.fails(1, &["prepare:psql", "--", "-c", "create table b(x int)"]);
    assert!(
        r.stderr.contains("instance limit reached"),
        "{}",
        r.describe()
    );
    // The build itself is kept; the first instance runs on, untouched.
    let ls = env.ls();
    let instances = ls["instances"].as_array().expect("instances");
    assert_eq!(instances.len(), 1, "{ls:#}");
    assert_eq!(instances[0]["instance_id"], first.as_str());
    assert_eq!(instances[0]["status"], "running");
    assert_eq!(
        common::postmasters_under(&env.home.join("instances")).len(),
        1
    );
    let _ = busy.kill();
    let _ = busy.wait();
}
