//! Inputs travel with the request: include closures hashed by the CLI, blobs uploaded once,
//! steps replayed from the controller's blob store. Real daemon, real PostgreSQL, real curl
//! for the raw blob API.

mod common;

use std::fs;
use std::io::Write;
use std::process::{Command, Stdio};

use common::Env;

fn query(dsn: &str, sql: &str) -> String {
    let out = Command::new("psql")
        .args([dsn, "-At", "-c", sql])
        .output()
        .expect("psql runs");
    assert!(
        out.status.success(),
        "psql: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The API's URL and token of the daemon running in `env`'s home.
fn api(env: &Env) -> (String, String) {
    let info: serde_json::Value = serde_json::from_str(
        &fs::read_to_string(env.home.join("daemon.json")).expect("daemon.json"),
    )
    .expect("json");
    let token = fs::read_to_string(env.home.join("api.token")).expect("api.token");
    (
        info["api_url"].as_str().expect("api_url").to_owned(),
        token.trim().to_owned(),
    )
}

/// `curl` against the API: (HTTP status, body).
fn curl(env: &Env, method: &str, path: &str, body: &[u8]) -> (u16, String) {
    let (url, token) = api(env);
    let mut child = Command::new("curl")
        .args(["-s", "-o", "-", "-w", "\n%{http_code}", "-X", method])
        .args(["-H", &format!("Authorization: Bearer {token}")])
        .args([
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            "@-",
        ])
        .arg(format!("{url}/v1{path}"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("curl runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(body)
        .expect("write body");
    let out = child.wait_with_output().expect("curl ends");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').expect("status line");
    (code.trim().parse().expect("status"), body.to_owned())
}

fn sha256_hex(data: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, data)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn an_edited_include_rebuilds_its_step_and_only_it() {
    let env = Env::new();
    env.write("schema.sql", "\\ir lib/tables.sql\n");
    env.write("lib/tables.sql", "create table t (x int);\n");
    env.write("seed.sql", "\\i data/rows.sql\n");
    env.write("data/rows.sql", "insert into t values (1), (2);\n");
    let args = [
        "prepare:psql",
        "-f",
        "schema.sql",
        "-f",
        "seed.sql",
        "run:psql",
        "--",
        "-Atc",
        "select count(*) from t",
    ];
    let first = env.ok(&args);
    assert_eq!(first.stdout.trim(), "2", "{}", first.describe());
    let again = env.ok(&args);
    assert!(again.stderr.contains("(cached)"), "{}", again.describe());

    // Editing a file that seed.sql includes: a new state, built from the schema checkpoint.
    env.write("data/rows.sql", "insert into t values (1), (2), (3);\n");
    let edited = env.ok(&args);
    assert_eq!(edited.stdout.trim(), "3", "{}", edited.describe());
    assert!(!edited.stderr.contains("step 1/2"), "{}", edited.describe());
    assert!(
        edited.stderr.contains("step 2/2 seed.sql"),
        "{}",
        edited.describe()
    );
    // base + schema + seed + seed'
    assert_eq!(
        env.ls()["states"].as_array().unwrap().len(),
        4,
        "{:#}",
        env.ls()
    );

    // Only the changed file went up the second time.
    let r = env.ok(&[
        "--json",
        "prepare:psql",
        "-f",
        "schema.sql",
        "-f",
        "seed.sql",
    ]);
    assert_eq!(r.json()["uploaded_bytes"], 0, "{}", r.describe());
    env.ok(&["shutdown"]);
}

#[test]
fn the_server_replays_from_its_blobs_not_the_clients_files() {
    let env = Env::new();
    fs::create_dir_all(&env.home).unwrap();
    fs::write(env.home.join("config.toml"), "[lifecycle]\ntick_ms = 100\n").unwrap();
    env.write("db/schema.sql", "\\ir parts/t.sql\n");
    env.write("db/parts/t.sql", "create table t (x int);\n");
    env.write("db/seed.sql", "\\i db/parts/rows.sql\n");
    env.write("db/parts/rows.sql", "insert into t values (7);\n");
    let r = env.ok(&[
        "--json",
        "prepare:psql",
        "-f",
        "db/schema.sql",
        "-f",
        "db/seed.sql",
    ]);
    let v = r.json();
    let head = v["state_id"].as_str().expect("state").to_owned();
    assert!(v["uploaded_bytes"].as_u64().expect("bytes") > 0);
    env.ok(&["rm", v["instance_id"].as_str().expect("instance")]);
    let ls = env.ls();
    let base = ls["states"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["parent"].is_null())
        .and_then(|s| s["state_id"].as_str())
        .expect("base")
        .to_owned();
    env.ok(&["pin", &base, "--reason", "manual"]);
    // The client's files go away, and a 1 MiB store evicts every unpinned snapshot.
    fs::remove_dir_all(env.work.join("db")).unwrap();
    env.ok(&["shutdown"]);
    fs::write(
        env.home.join("config.toml"),
        "[store]\ncapacity_mb = 1\n[lifecycle]\ntick_ms = 100\n",
    )
    .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let ls = env.ls();
        let cold = ls["states"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["state_id"] == head.as_str() && s["status"] == "COLD");
        if cold {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "not evicted: {ls:#}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    // Restored by id alone: both steps replay from the blobs, includes and all (with room
    // for them again, or the 1 MiB store would evict them as soon as they are back).
    fs::write(env.home.join("config.toml"), "[lifecycle]\ntick_ms = 100\n").unwrap();
    env.ok(&["shutdown"]);
    let r = env.ok(&["warmup", &head[..12]]);
    assert!(r.stderr.contains("replaying 2 steps"), "{}", r.describe());
    let dsn = env.ok(&["dsn", &head[..12], "--plain"]).stdout;
    let dsn = dsn.trim().strip_prefix("DSN=").expect("DSN=");
    assert_eq!(query(dsn, "select x from t"), "7");
    env.ok(&["shutdown"]);
}

#[test]
fn stdin_is_a_step() {
    let env = Env::new();
    env.write("inc.sql", "insert into t values (42);\n");
    let mut child = env
        .command(&[
            "prepare:psql",
            "-f",
            "-",
            "run:psql",
            "--",
            "-Atc",
            "select x from t",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"create table t (x int);\n\\i inc.sql\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42");
    env.ok(&["shutdown"]);
}

#[test]
fn bad_includes_are_exit_2_before_any_work() {
    let env = Env::new();
    env.write("missing.sql", "select 1;\n\\ir lib/gone.sql\n");
    env.write("a.sql", "\\i b.sql\n");
    env.write("b.sql", "\\i a.sql\n");
    env.write("var.sql", "\\i :dir/x.sql\n");
    for (file, want) in [
        ("missing.sql", "sqlrs: missing.sql:2: \\ir lib/gone.sql: No such file or directory (os error 2)"),
        ("a.sql", "sqlrs: include cycle: a.sql -> b.sql -> a.sql"),
        ("var.sql", "sqlrs: var.sql: line 1: `\\i :dir/x.sql` names its file with a psql variable, which is only known when the script runs"),
    ] {
        let r = env.fails(2, &["prepare:psql", "-f", file]);
        assert_eq!(r.stderr.trim_end(), want, "{}", r.describe());
    }
    assert!(
        !env.home.join("daemon.json").exists(),
        "no daemon was needed"
    );
}

#[test]
fn the_blob_api_keeps_only_whole_matching_blobs() {
    let env = Env::new();
    env.ok(&["status"]);
    let good = b"create table g (x int);\n";
    let good_sha = sha256_hex(good);
    let (code, body) = curl(
        &env,
        "POST",
        "/blobs/missing",
        format!(r#"{{"sha256":["{good_sha}"]}}"#).as_bytes(),
    );
    assert_eq!(
        (code, body.as_str()),
        (200, format!(r#"{{"missing":["{good_sha}"]}}"#).as_str())
    );
    // Content that does not match its name: 400, nothing kept.
    let (code, body) = curl(
        &env,
        "PUT",
        &format!("/blobs/{good_sha}"),
        b"something else",
    );
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("nothing was stored"), "{body}");
    assert!(!env.home.join("inputs").join(&good_sha).exists());
    let leftovers: Vec<_> = fs::read_dir(env.home.join("inputs")).unwrap().collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // The real content: stored, then not missing.
    let (code, _) = curl(&env, "PUT", &format!("/blobs/{good_sha}"), good);
    assert_eq!(code, 201);
    let (_, body) = curl(
        &env,
        "POST",
        "/blobs/missing",
        format!(r#"{{"sha256":["{good_sha}"]}}"#).as_bytes(),
    );
    assert_eq!(body, r#"{"missing":[]}"#);
    // A prepare naming a blob the server lacks: 400 naming it.
    let unknown = "ab".repeat(32);
    let req = format!(
        r#"{{"steps":[{{"kind":"psql","input":{{"type":"file","path":"x.sql","sha256":"{unknown}"}}}}],"create_instance":false}}"#
    );
    let (_, body) = curl(&env, "POST", "/prepare", req.as_bytes());
    assert!(
        body.contains(&format!("unknown blob {unknown} (x.sql)")),
        "{body}"
    );
    // A path that leaves its closure's root: refused.
    let req = format!(
        r#"{{"steps":[{{"kind":"psql","input":{{"type":"file","path":"../../etc/x.sql","sha256":"{good_sha}"}}}}],"create_instance":false}}"#
    );
    let (_, body) = curl(&env, "POST", "/prepare", req.as_bytes());
    assert!(body.contains("leaves its closure's root"), "{body}");
    env.ok(&["shutdown"]);
}

#[test]
fn an_upload_over_the_limit_is_413() {
    let env = Env::new();
    // A daemon with a 1 MiB limit.
    fs::create_dir_all(&env.home).unwrap();
    let mut env = env;
    env.extra_env
        .push(("TAIDON_MAX_BLOB_MB".into(), "1".into()));
    env.ok(&["status"]);
    let big = vec![b'x'; (1 << 20) + 10];
    let (code, body) = curl(&env, "PUT", &format!("/blobs/{}", sha256_hex(&big)), &big);
    assert_eq!(code, 413, "{body}");
    assert!(body.contains("larger than the limit of 1 MiB"), "{body}");
    let left: Vec<_> = fs::read_dir(env.home.join("inputs")).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
    // Through the CLI: one line naming the cause, exit 2.
    env.write("big.sql", &format!("-- {}\n", "y".repeat((1 << 20) + 10)));
    let r = env.fails(2, &["prepare:psql", "-f", "big.sql"]);
    assert!(
        r.stderr.contains("larger than the limit of 1 MiB"),
        "{}",
        r.describe()
    );
    env.ok(&["shutdown"]);
}
