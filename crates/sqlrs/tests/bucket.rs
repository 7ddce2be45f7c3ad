//! The object-storage tier end to end: real daemons (started by the real `sqlrs`) sharing a
//! bucket on a real S3-compatible server, moto and SeaweedFS, each started here on loopback.
//! Every test runs against both; without them the tests fail under `TAIDON_REQUIRE_COW` (as CI
//! sets it) and skip loudly otherwise.

mod common;

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{pagila_dir, Env, Run};
use taidon_testkit::fault::FaultProxy;
use taidon_testkit::s3::{Backend, S3Server};

const SCHEMA: &str = "create table film (id int primary key, title text not null);\n\
                      create table actor (id int primary key, name text not null);\n";
const SEED: &str = "insert into film select g, 'film ' || g from generate_series(1, 5000) g;\n\
                    insert into actor select g, 'actor ' || g from generate_series(1, 300) g;\n";

/// Both servers, each with a bucket `snaps`.
fn servers(test: &str) -> Vec<S3Server> {
    let mut out = Vec::new();
    for server in [S3Server::moto(test), S3Server::seaweedfs(test)]
        .into_iter()
        .flatten()
    {
        server.create_bucket("snaps");
        out.push(server);
    }
    out
}

/// A home whose config puts the bucket behind its store, reaching `endpoint` with `server`'s
/// credentials; `extra` goes into `[store.remote]`.
fn home_on(server: &S3Server, endpoint: &str, extra: &str) -> Env {
    let mut env = Env::new();
    fs::create_dir_all(&env.home).expect("home");
    fs::write(
        env.home.join("config.toml"),
        format!(
            "[store.remote]\nurl = \"s3://snaps/team\"\nendpoint = \"{endpoint}\"\n\
             allow_http = true\n{extra}"
        ),
    )
    .expect("config");
    env.extra_env = taidon_testkit::s3::env_for(server);
    env
}

fn home(server: &S3Server, extra: &str) -> Env {
    home_on(server, &server.endpoint(), extra)
}

fn remote_status(env: &Env) -> serde_json::Value {
    let status = env.ok(&["status", "--json"]).json();
    status["remote"].clone()
}

/// Waits until no upload is pending and the bucket holds at least `snapshots`.
fn wait_uploaded(env: &Env, snapshots: u64) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let remote = remote_status(env);
        if remote["pending_uploads"] == 0 && remote["snapshots"].as_u64() >= Some(snapshots) {
            return remote;
        }
        assert!(
            Instant::now() < deadline,
            "uploads did not finish: {remote:#}\n{}",
            env.logs()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn prepare(env: &Env, files: &[&str]) -> Run {
    let mut args = vec!["prepare:psql", "--"];
    for f in files {
        args.push("-f");
        args.push(f);
    }
    env.ok(&args)
}

/// Prepares `files` and returns the head's id.
fn prepare_head(env: &Env, files: &[&str]) -> String {
    let mut args = vec!["--json", "prepare:psql", "--"];
    for f in files {
        args.push("-f");
        args.push(f);
    }
    head_of(&env.ok(&args))
}

fn count(env: &Env, prepared: &Run, table: &str) -> String {
    let dsn = prepared.dsn();
    let out = std::process::Command::new("psql")
        .args([&dsn, "-Atc", &format!("select count(*) from {table}")])
        .output()
        .expect("psql");
    assert!(
        out.status.success(),
        "psql: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        env.logs()
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn state_row(env: &Env, id: &str) -> serde_json::Value {
    env.ls()["states"]
        .as_array()
        .expect("states")
        .iter()
        .find(|s| s["state_id"] == id)
        .cloned()
        .unwrap_or_else(|| panic!("no state {id}: {:#}", env.ls()))
}

fn head_of(run: &Run) -> String {
    let v = run.json();
    v["state_id"].as_str().expect("state_id").to_owned()
}

fn copy_pagila(env: &Env) {
    for f in ["pagila-schema.sql", "pagila-data.sql"] {
        fs::copy(pagila_dir().join(f), env.work.join(f)).expect("copy pagila");
    }
}

/// The names of the objects under `prefix` in the bucket.
fn objects(server: &S3Server, prefix: &str) -> Vec<String> {
    server.list("snaps", prefix)
}

#[test]
fn a_second_home_gets_pagila_from_the_bucket_without_running_a_step() {
    for server in servers("pagila_from_the_bucket") {
        let a = home(&server, "");
        copy_pagila(&a);
        let head = prepare_head(&a, &["pagila-schema.sql", "pagila-data.sql"]);
        let uploaded = wait_uploaded(&a, 3);
        assert_eq!(uploaded["reachable"], true, "{uploaded:#}");
        assert_eq!(uploaded["url"], "s3://snaps/team");
        assert!(uploaded["bytes"].as_u64() > Some(1_000_000), "{uploaded:#}");
        assert_eq!(state_row(&a, &head)["location"], "local+remote");

        let b = home(&server, "");
        copy_pagila(&b);
        // The plan, before anything here: every state is in the bucket only.
        let plan = b
            .ok(&[
                "--json",
                "plan:psql",
                "-f",
                "pagila-schema.sql",
                "-f",
                "pagila-data.sql",
            ])
            .json();
        let cached: Vec<&str> = plan["steps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["cached"].as_str().unwrap())
            .collect();
        assert_eq!(cached, ["remote", "remote", "remote"], "{plan:#}");
        assert_eq!(plan["steps"][2]["state_id"], head.as_str());
        let got = prepare(&b, &["pagila-schema.sql", "pagila-data.sql"]);
        assert!(
            got.stderr.contains("downloading"),
            "no download:\n{}",
            got.describe()
        );
        assert!(
            !got.stderr.contains("step 1/2") && !got.stderr.contains("initdb"),
            "the second home ran a step:\n{}",
            got.describe()
        );
        assert_eq!(count(&b, &got, "rental"), "16044");
        let row = state_row(&b, &head);
        assert_eq!(row["location"], "local+remote", "{row:#}");
        // Nothing else was built or fetched: only the head is here.
        assert_eq!(b.ls()["states"].as_array().map(Vec::len), Some(1));
        let events = b.ok(&["events", "--json"]).stdout;
        assert!(events.contains("downloaded"), "{events}");
        assert!(!events.contains("\"built\""), "{events}");
    }
}

#[test]
fn the_data_step_uploads_only_what_it_changed() {
    for server in servers("data_step_dedup") {
        let a = home(&server, "");
        copy_pagila(&a);
        prepare(&a, &["pagila-schema.sql"]);
        let before = wait_uploaded(&a, 2)["bytes"].as_u64().expect("bytes");
        let head = prepare_head(&a, &["pagila-schema.sql", "pagila-data.sql"]);
        let after = wait_uploaded(&a, 3)["bytes"].as_u64().expect("bytes");
        let full = state_row(&a, &head)["size_bytes"].as_u64().expect("size");
        let step = after - before;
        let ratio = step as f64 / full as f64;
        eprintln!(
            "{}: pagila data step: {step} bytes uploaded for a {full}-byte state ({ratio:.3})",
            server.name()
        );
        assert!(
            ratio < 0.25,
            "the data step uploaded {ratio:.3} of its size"
        );
    }
}

/// Damages what `damage` picks in the bucket after home A uploaded; home B must refuse it,
/// say so in one line, record it, and rebuild the state correctly.
fn refused_and_rebuilt(test: &str, damage: impl Fn(&S3Server, &str)) {
    for server in servers(test) {
        let a = home(&server, "");
        a.write("schema.sql", SCHEMA);
        a.write("seed.sql", SEED);
        let head = prepare_head(&a, &["schema.sql", "seed.sql"]);
        wait_uploaded(&a, 3);
        damage(&server, &head);

        let b = home(&server, "");
        b.write("schema.sql", SCHEMA);
        b.write("seed.sql", SEED);
        let got = prepare(&b, &["schema.sql", "seed.sql"]);
        let notices: Vec<&str> = got
            .stderr
            .lines()
            .filter(|l| l.contains("checksum mismatch"))
            .collect();
        assert_eq!(notices.len(), 1, "{}", got.describe());
        assert!(notices[0].contains(&head[..8]), "{}", notices[0]);
        // Rebuilt from the nearest good ancestor: the schema state came from the bucket, the
        // seed step ran here.
        assert!(got.stderr.contains("step 2/2"), "{}", got.describe());
        assert_eq!(count(&b, &got, "film"), "5000");
        let events = b.ok(&["events", "--json"]).stdout;
        assert!(events.contains("checksum_mismatch"), "{events}");
        // No partial download is left (spares are complete copies, made on purpose).
        let partial: Vec<String> = b
            .unpublished_snapshot_dirs()
            .into_iter()
            .filter(|d| d.starts_with(".building"))
            .collect();
        assert!(partial.is_empty(), "{partial:?}");
        // The rebuilt state goes up again, whole: a third home restores it.
        wait_uploaded(&b, 3);
        let c = home(&server, "");
        c.write("schema.sql", SCHEMA);
        c.write("seed.sql", SEED);
        let again = prepare(&c, &["schema.sql", "seed.sql"]);
        assert!(
            !again.stderr.contains("checksum mismatch") && !again.stderr.contains("step 2/2"),
            "{}",
            again.describe()
        );
        assert_eq!(count(&c, &again, "film"), "5000");
    }
}

#[test]
fn a_corrupt_chunk_is_refused_and_the_state_rebuilt() {
    refused_and_rebuilt("corrupt_chunk", |server, head| {
        // The largest chunk of the head's manifest that no other state uses.
        let manifest = server.get("snaps", &format!("team/manifests/{head}.json"));
        let text = String::from_utf8(manifest).expect("utf8");
        let others: String = objects(server, "team/manifests/")
            .iter()
            .filter(|k| !k.contains(head))
            .map(|k| String::from_utf8(server.get("snaps", k)).expect("utf8"))
            .collect();
        let chunk = chunk_hashes(&text)
            .into_iter()
            .find(|h| !others.contains(h.as_str()))
            .expect("a chunk only the head has");
        let key = format!("team/chunks/{chunk}");
        let mut bytes = server.get("snaps", &key);
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0xff;
        server.put("snaps", &key, &bytes);
    });
}

#[test]
fn a_corrupt_manifest_is_refused_and_the_state_rebuilt() {
    refused_and_rebuilt("corrupt_manifest", |server, head| {
        let key = format!("team/manifests/{head}.json");
        let text = String::from_utf8(server.get("snaps", &key)).expect("utf8");
        let edited = text.replacen("\"mode\":384", "\"mode\":420", 1);
        assert_ne!(edited, text, "nothing to edit in the manifest");
        server.put("snaps", &key, edited.as_bytes());
    });
}

fn chunk_hashes(manifest: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = manifest;
    while let Some(at) = rest.find("\"chunks\":[") {
        rest = &rest[at + 10..];
        let end = rest.find(']').expect("]");
        for h in rest[..end].split(',') {
            let h = h.trim().trim_matches('"');
            if h.len() == 64 {
                out.push(h.to_owned());
            }
        }
    }
    out
}

#[test]
fn a_daemon_killed_mid_upload_publishes_no_manifest_and_the_next_one_finishes() {
    for server in servers("killed_mid_upload") {
        let a = home(&server, "");
        copy_pagila(&a);
        let head = prepare_head(&a, &["pagila-schema.sql", "pagila-data.sql"]);
        // Uploads start as each step publishes; kill the daemon while some are pending.
        let pid = a.daemon_pid().expect("daemon pid");
        let pending = remote_status(&a)["pending_uploads"].as_u64().unwrap_or(0);
        unsafe { libc::kill(pid, libc::SIGKILL) };
        assert!(common::wait_gone(pid, Duration::from_secs(10)));
        // Whatever manifests are there are complete: a fresh home restores them below. (How
        // many there are is not asserted: an upload the status saw pending may finish before
        // the signal lands.)
        let listed = objects(&server, "team/manifests/");
        eprintln!(
            "{}: killed with {pending} uploads pending, {} manifests in the bucket",
            server.name(),
            listed.len()
        );
        // The next daemon finishes the uploads.
        let uploaded = wait_uploaded(&a, 3);
        assert_eq!(uploaded["reachable"], true);
        let b = home(&server, "");
        copy_pagila(&b);
        let got = prepare(&b, &["pagila-schema.sql", "pagila-data.sql"]);
        assert!(got.stderr.contains("downloading"), "{}", got.describe());
        assert!(!got.stderr.contains("step 2/2"), "{}", got.describe());
        assert_eq!(count(&b, &got, "rental"), "16044");
        assert_eq!(state_row(&b, &head)["location"], "local+remote");
    }
}

#[test]
fn one_request_in_five_failing_loses_no_upload_or_restore() {
    for server in servers("fault_proxy") {
        let proxy = FaultProxy::start(server.addr(), 5);
        let endpoint = format!("http://{}", proxy.addr());
        let a = home_on(&server, &endpoint, "");
        a.write("schema.sql", SCHEMA);
        a.write("seed.sql", SEED);
        prepare(&a, &["schema.sql", "seed.sql"]);
        wait_uploaded(&a, 3);
        let b = home_on(&server, &endpoint, "");
        b.write("schema.sql", SCHEMA);
        b.write("seed.sql", SEED);
        let got = prepare(&b, &["schema.sql", "seed.sql"]);
        assert!(got.stderr.contains("downloading"), "{}", got.describe());
        assert!(!got.stderr.contains("step 2/2"), "{}", got.describe());
        assert_eq!(count(&b, &got, "film"), "5000");
        let failed = proxy.requests_failed();
        assert!(
            failed > 0,
            "the proxy failed no request of {}",
            proxy.requests_seen()
        );
        eprintln!(
            "{}: {failed} of {} requests failed with 503",
            server.name(),
            proxy.requests_seen()
        );
    }
}

#[test]
fn wrong_credentials_a_missing_bucket_or_a_dead_endpoint_leave_taidon_working_locally() {
    for server in servers("unreachable") {
        // Plain moto takes any key: the wrong one goes to a moto that checks.
        let checking = match server.backend() {
            Backend::Moto => {
                let m = S3Server::moto_authenticating("unreachable::moto").expect("moto");
                m.create_bucket("snaps");
                Some(m)
            }
            Backend::SeaweedFs => None,
        };
        let wrong = {
            let mut env = home(checking.as_ref().unwrap_or(&server), "");
            for (k, v) in env.extra_env.iter_mut() {
                if k == "AWS_SECRET_ACCESS_KEY" {
                    *v = "not-the-secret".to_owned();
                }
            }
            env
        };
        let missing = home(&server, "");
        fs::write(
            missing.home.join("config.toml"),
            format!(
                "[store.remote]\nurl = \"s3://no-such-bucket/x\"\nendpoint = \"{}\"\nallow_http = true\n",
                server.endpoint()
            ),
        )
        .expect("config");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("port")
            .local_addr()
            .expect("addr")
            .port();
        let dead = home_on(&server, &format!("http://127.0.0.1:{port}"), "");
        // SeaweedFS makes a bucket on the first write to it: a missing one is no fault there.
        let mut cases = vec![(&wrong, "wrong credentials"), (&dead, "dead endpoint")];
        if server.backend() == Backend::Moto {
            cases.push((&missing, "missing bucket"));
        }
        for (env, what) in cases {
            env.write("schema.sql", SCHEMA);
            let got = prepare(env, &["schema.sql"]);
            assert_eq!(count(env, &got, "film"), "0", "{what}");
            let remote = remote_status(env);
            assert_eq!(remote["reachable"], false, "{what}: {remote:#}");
            let error = remote["error"].as_str().unwrap_or_default().to_owned();
            assert!(!error.is_empty(), "{what}: {remote:#}");
            let plain = env.ok(&["status"]).stdout;
            assert!(
                plain.contains("unreachable") && plain.contains("working locally"),
                "{what}: {plain}"
            );
            eprintln!("{}: {what}: {error}", server.name());
        }
        let written = checking.as_ref().unwrap_or(&server).list("snaps", "");
        assert!(
            written.iter().all(|k| !k.starts_with("team/")),
            "wrong credentials wrote to the bucket: {written:?}"
        );
    }
}

#[test]
fn push_uploads_now_and_ls_says_where_each_state_is() {
    for server in servers("push_and_where") {
        // The queue retries late, so push is what puts the state up now.
        let a = home(&server, "");
        a.write("schema.sql", SCHEMA);
        let built = a.ok(&["--json", "prepare:psql", "--", "-f", "schema.sql"]);
        let head = head_of(&built);
        let pushed = a.ok(&["push", &head[..12], "--json"]).json();
        assert_eq!(pushed["state_id"], head.as_str());
        assert_eq!(pushed["url"], "s3://snaps/team");
        let plain = a.ok(&["push", &head[..12]]).stdout;
        assert!(
            plain.contains("already in s3://snaps/team") || plain.contains("pushed state"),
            "{plain}"
        );
        assert!(objects(&server, "team/manifests/")
            .iter()
            .any(|k| k.contains(&head)));
        let table = a.ok(&["ls"]).stdout;
        assert!(table.contains("WHERE"), "{table}");
        assert!(table.contains("local+remote"), "{table}");

        // A home without a bucket says how to configure one.
        let plain_home = Env::new();
        plain_home.write("schema.sql", SCHEMA);
        let local = plain_home.ok(&["--json", "prepare:psql", "--", "-f", "schema.sql"]);
        let refused = plain_home.run(&["push", &head_of(&local)[..12]]);
        assert_ne!(refused.code, 0);
        assert!(
            refused.stderr.contains("[store.remote]"),
            "{}",
            refused.describe()
        );
    }
}

#[test]
fn a_state_evicted_here_but_in_the_bucket_stays_warm_and_comes_back_by_download() {
    for server in servers("evicted_stays_warm") {
        let a = home(&server, "");
        a.write("schema.sql", SCHEMA);
        a.write("seed.sql", SEED);
        let head = prepare_head(&a, &["schema.sql", "seed.sql"]);
        wait_uploaded(&a, 3);
        // Now a capacity far below what is stored: everything unused is evicted locally.
        a.ok(&["shutdown"]);
        let config = fs::read_to_string(a.home.join("config.toml")).expect("config");
        fs::write(
            a.home.join("config.toml"),
            format!("[store]\ncapacity_mb = 1\nlow_water = 0.5\n\n{config}"),
        )
        .expect("config");
        let instances: Vec<String> = a.ls()["instances"]
            .as_array()
            .expect("instances")
            .iter()
            .map(|i| i["instance_id"].as_str().expect("id").to_owned())
            .collect();
        for i in instances {
            a.ok(&["rm", "--force", &i]);
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let row = state_row(&a, &head);
            if row["location"] == "remote" {
                assert_eq!(row["status"], "WARM", "{row:#}");
                break;
            }
            assert!(Instant::now() < deadline, "not evicted: {:#}", a.ls());
            std::thread::sleep(Duration::from_millis(300));
        }
        assert!(!snapshot_dir_exists(&a.home, &head));
        let got = prepare(&a, &["schema.sql", "seed.sql"]);
        assert!(got.stderr.contains("downloading"), "{}", got.describe());
        assert!(!got.stderr.contains("step 2/2"), "{}", got.describe());
        assert_eq!(count(&a, &got, "film"), "5000");
    }
}

fn snapshot_dir_exists(home: &Path, id: &str) -> bool {
    home.join("snapshots").join(id).exists()
}

#[test]
fn the_bucket_keeps_its_capacity_by_score_and_keeps_pins() {
    for server in servers("remote_capacity") {
        let a = home(&server, "");
        a.write("schema.sql", SCHEMA);
        a.write("seed.sql", SEED);
        let head = prepare_head(&a, &["schema.sql", "seed.sql"]);
        a.ok(&["pin", &head[..12], "--reason", "main"]);
        wait_uploaded(&a, 3);
        // Now a capacity far below what the bucket holds: the next daemon's remote pass takes
        // the bucket under 1 MiB by deleting the unpinned states and collecting their chunks.
        a.ok(&["shutdown"]);
        let config = fs::read_to_string(a.home.join("config.toml")).expect("config");
        fs::write(
            a.home.join("config.toml"),
            format!("{config}capacity_mb = 1\nlow_water = 0.5\ngc_every_s = 1\ngc_grace_s = 30\n"),
        )
        .expect("config");
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let manifests = objects(&server, "team/manifests/");
            let remote = remote_status(&a);
            if remote["pending_uploads"] == 0
                && manifests.len() == 1
                && manifests[0].contains(&head)
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "bucket not trimmed: {manifests:?} {remote:#}\n{}",
                a.logs()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        let events = a.ok(&["events", "--json"]).stdout;
        assert!(events.contains("evicted_remote"), "{events}");
        // The pinned head is still restorable by another home.
        let b = home(&server, "");
        b.write("schema.sql", SCHEMA);
        b.write("seed.sql", SEED);
        let got = prepare(&b, &["schema.sql", "seed.sql"]);
        assert!(!got.stderr.contains("step 2/2"), "{}", got.describe());
        assert_eq!(count(&b, &got, "film"), "5000");
    }
}

#[test]
fn disk_full_while_restoring_removes_the_partial_restore_and_says_so() {
    if unsafe { libc::geteuid() } != 0 {
        assert!(
            std::env::var_os("TAIDON_REQUIRE_COW").is_none(),
            "TAIDON_REQUIRE_COW is set but this test needs root (a tmpfs mount)"
        );
        eprintln!("SKIP disk_full_while_restoring: needs root for a small tmpfs");
        return;
    }
    let Some(server) = servers("disk_full").into_iter().next() else {
        return;
    };
    let a = home(&server, "");
    copy_pagila(&a);
    prepare(&a, &["pagila-schema.sql", "pagila-data.sql"]);
    wait_uploaded(&a, 3);

    let b = home(&server, "");
    copy_pagila(&b);
    let snapshots = b.home.join("snapshots");
    fs::create_dir_all(&snapshots).expect("snapshots");
    let mount = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=12m,mode=0711", "taidon-full"])
        .arg(&snapshots)
        .status()
        .expect("mount");
    assert!(mount.success(), "cannot mount a tmpfs");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _unmount = Unmount(snapshots.clone());
    let got = b.run(&[
        "prepare:psql",
        "--",
        "-f",
        "pagila-schema.sql",
        "-f",
        "pagila-data.sql",
    ]);
    assert_ne!(got.code, 0, "{}", got.describe());
    assert!(
        got.stderr.contains("No space left on device")
            && got.stderr.contains("partial restore was removed"),
        "{}",
        got.describe()
    );
    let left: Vec<String> = fs::read_dir(&snapshots)
        .expect("list")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        left.iter().all(|n| !n.starts_with(".building")),
        "a partial restore is left: {left:?}"
    );
    b.ok(&["shutdown"]);
}
