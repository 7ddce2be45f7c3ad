//! Leases end to end: the real `sqlrs` and `taidon`, real PostgreSQL, psql as the client. A
//! lease is a fresh copy for one test: a database of its own in a shared instance, or an
//! instance of its own.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::Env;
use serde_json::Value;

const SCHEMA: &str = "create table t (id int primary key, v text);\n\
                      insert into t values (1, 'seed');\n";

/// A home with the recipe `tiny` (one table, one seed row) and `config`'s config.toml.
fn env_with(config: &str) -> Env {
    let env = Env::new();
    env.write("schema.sql", SCHEMA);
    env.write(
        "sqlrs.toml",
        "[recipes.tiny]\nprepare = [\"psql\", \"-f\", \"schema.sql\"]\n",
    );
    if !config.is_empty() {
        std::fs::create_dir_all(&env.home).expect("home");
        std::fs::write(env.home.join("config.toml"), config).expect("config");
    }
    env
}

fn lease(env: &Env, args: &[&str]) -> Value {
    let mut all = vec!["--json", "lease"];
    all.extend_from_slice(args);
    env.ok(&all).json()
}

fn s(v: &Value, key: &str) -> String {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("{key} in {v}"))
        .to_owned()
}

/// Runs `sql` with psql; its output, or its error as `Err`.
fn psql(dsn: &str, sql: &str) -> Result<String, String> {
    let out = Command::new("psql")
        .args([dsn, "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .env_remove("PGHOST")
        .env_remove("PGDATABASE")
        .output()
        .expect("psql");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn psql_ok(env: &Env, dsn: &str, sql: &str) -> String {
    psql(dsn, sql).unwrap_or_else(|e| panic!("psql {sql:?}: {e}\n{}", env.logs()))
}

fn lease_ids(env: &Env) -> Vec<String> {
    env.ok(&["--json", "leases"])
        .json()
        .as_array()
        .expect("leases[]")
        .iter()
        .map(|l| s(l, "lease"))
        .collect()
}

fn event_kinds(env: &Env) -> Vec<String> {
    env.ok(&["--json", "events"])
        .json()
        .as_array()
        .expect("events[]")
        .iter()
        .map(|e| s(e, "kind"))
        .collect()
}

fn wait_until(what: &str, env: &Env, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "{what} within {timeout:?}\n{}",
            env.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn database_leases_are_fresh_isolated_and_bound_to_their_database() {
    let env = env_with("");
    let a = lease(&env, &["tiny"]);
    let b = lease(&env, &["tiny"]);
    assert_eq!(s(&a, "isolation"), "database");
    assert_ne!(s(&a, "database"), s(&b, "database"));
    assert_eq!(
        s(&a, "instance_id"),
        s(&b, "instance_id"),
        "one shared instance"
    );
    assert_eq!(s(&a, "state_id"), s(&b, "state_id"));
    let (dsn_a, dsn_b) = (s(&a, "dsn"), s(&b, "dsn"));
    assert_eq!(
        psql_ok(
            &env,
            &dsn_a,
            "insert into t values (2, 'a'); select count(*) from t"
        ),
        "2"
    );
    // B never sees A's write.
    assert_eq!(
        psql_ok(&env, &dsn_b, "select string_agg(v, ',' order by id) from t"),
        "seed"
    );
    // The token is bound to its database: naming another one lands in the lease's own.
    let other = dsn_b.replace(&format!("/{}?", s(&b, "database")), "/postgres?");
    assert_ne!(other, dsn_b);
    assert_eq!(
        psql_ok(&env, &other, "select current_database()"),
        s(&b, "database")
    );
    // Roles are cluster-wide: with database isolation, leases of one instance share them.
    psql_ok(&env, &dsn_a, "create role shared_by_leases");
    assert_eq!(
        psql_ok(
            &env,
            &dsn_b,
            "select count(*) from pg_roles where rolname = 'shared_by_leases'"
        ),
        "1"
    );
    let mut listed = lease_ids(&env);
    listed.sort();
    let mut want = vec![s(&a, "lease"), s(&b, "lease")];
    want.sort();
    assert_eq!(listed, want);

    // Given back: destroyed, gone from the list, its DSN leads nowhere, a second release is
    // exit 2; the other lease is untouched.
    env.ok(&["release", &s(&a, "lease")]);
    assert_eq!(lease_ids(&env), vec![s(&b, "lease")]);
    wait_until(
        "the released database is dropped",
        &env,
        Duration::from_secs(10),
        || psql(&dsn_a, "select 1").is_err(),
    );
    let again = env.fails(2, &["release", &s(&a, "lease")]);
    assert!(again.stderr.contains("no lease"), "{}", again.describe());
    assert_eq!(psql_ok(&env, &dsn_b, "select count(*) from t"), "1");
    // A new lease is fresh again: the given-back copy is never reused.
    let c = lease(&env, &["tiny"]);
    assert_ne!(s(&c, "database"), s(&a, "database"));
    assert_eq!(psql_ok(&env, &s(&c, "dsn"), "select count(*) from t"), "1");
    let kinds = event_kinds(&env);
    assert_eq!(kinds.iter().filter(|k| *k == "lease_granted").count(), 3);
    assert_eq!(kinds.iter().filter(|k| *k == "lease_released").count(), 1);

    // The text form prints LEASE= and DSN=.
    let text = env.ok(&["lease", &s(&a, "state_id")[..12]]);
    let dsn = text.dsn();
    assert!(text.stdout.starts_with("LEASE="), "{}", text.describe());
    assert_eq!(psql_ok(&env, &dsn, "select count(*) from t"), "1");
}

#[test]
fn instance_leases_have_their_own_instances() {
    let env = env_with("");
    let a = lease(&env, &["tiny", "--isolation", "instance"]);
    let b = lease(&env, &["tiny", "--isolation", "instance"]);
    assert_eq!(s(&a, "isolation"), "instance");
    assert_ne!(s(&a, "instance_id"), s(&b, "instance_id"));
    let (dsn_a, dsn_b) = (s(&a, "dsn"), s(&b, "dsn"));
    psql_ok(
        &env,
        &dsn_a,
        "create role only_in_a; insert into t values (2, 'a')",
    );
    assert_eq!(
        psql_ok(
            &env,
            &dsn_b,
            "select count(*) from pg_roles where rolname = 'only_in_a'"
        ),
        "0"
    );
    assert_eq!(psql_ok(&env, &dsn_b, "select count(*) from t"), "1");
    let iid = s(&a, "instance_id");
    env.ok(&["release", &s(&a, "lease")]);
    wait_until(
        "the leased instance is removed",
        &env,
        Duration::from_secs(15),
        || {
            !env.ls()["instances"]
                .as_array()
                .expect("instances")
                .iter()
                .any(|i| i["instance_id"] == iid.as_str())
        },
    );
    assert!(psql(&dsn_a, "select 1").is_err());
    assert_eq!(psql_ok(&env, &dsn_b, "select count(*) from t"), "1");
}

#[test]
fn a_lease_expires_with_its_ttl() {
    let env = env_with("");
    let a = lease(&env, &["tiny", "--ttl", "2s"]);
    let keep = lease(&env, &["tiny", "--ttl", "10m"]);
    let dsn = s(&a, "dsn");
    assert_eq!(psql_ok(&env, &dsn, "select count(*) from t"), "1");
    wait_until("the lease expires", &env, Duration::from_secs(20), || {
        lease_ids(&env) == vec![s(&keep, "lease")]
    });
    assert!(event_kinds(&env).iter().any(|k| k == "lease_expired"));
    wait_until(
        "its database is dropped",
        &env,
        Duration::from_secs(10),
        || psql(&dsn, "select 1").is_err(),
    );
    let gone = env.fails(2, &["release", &s(&a, "lease")]);
    assert!(gone.stderr.contains("expired"), "{}", gone.describe());
    assert_eq!(
        psql_ok(&env, &s(&keep, "dsn"), "select count(*) from t"),
        "1"
    );
}

#[test]
fn bad_leases_are_refused_with_what_is_wrong() {
    let env = env_with("[leases]\nmax_ttl_s = 3600\n");
    // An unknown state: 404, named.
    let r = env.fails(2, &["lease", "deadbeef00"]);
    assert!(
        r.stderr.contains("deadbeef00") && r.stderr.contains("no state"),
        "{}",
        r.describe()
    );
    // A name that is no recipe: the file's recipes are listed.
    let r = env.fails(2, &["lease", "nosuch"]);
    assert!(
        r.stderr.contains("nosuch") && r.stderr.contains("tiny"),
        "{}",
        r.describe()
    );
    // Over the maximum TTL: 400 (exit 2), and no lease.
    let r = env.fails(2, &["lease", "tiny", "--ttl", "2h"]);
    assert!(
        r.stderr.contains("7200") && r.stderr.contains("3600"),
        "{}",
        r.describe()
    );
    assert!(lease_ids(&env).is_empty());
    let r = env.fails(2, &["lease", "tiny", "--isolation", "table"]);
    assert!(r.stderr.contains("isolation"), "{}", r.describe());

    // Someone else's lease: 403, and it stays.
    let mine = lease(&env, &["tiny"]);
    let api = {
        let text = std::fs::read_to_string(env.home.join("daemon.json")).expect("daemon.json");
        let v: Value = serde_json::from_str(&text).expect("json");
        s(&v, "api_url")
    };
    let bob = common::create_token(&env.home, &["--sub", "bob"]);
    let as_bob = |args: &[&str]| {
        let mut cmd = env.command(args);
        cmd.env("SQLRS_SERVER", &api).env("SQLRS_TOKEN", &bob);
        cmd.output().expect("sqlrs")
    };
    let out = as_bob(&["release", &s(&mine, "lease")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("belongs to"), "{stderr}");
    // Bob sees none of it, and it is still the admin's.
    let out = as_bob(&["--json", "leases"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "[]");
    assert_eq!(lease_ids(&env), vec![s(&mine, "lease")]);
    assert_eq!(
        psql_ok(&env, &s(&mine, "dsn"), "select count(*) from t"),
        "1"
    );
    // Bob's own lease is his to give back.
    let out = as_bob(&["--json", "lease", &s(&mine, "state_id")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let his: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(s(&his, "owner"), "bob");
    let out = as_bob(&["release", &s(&his, "lease")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_full_pool_waits_then_answers_503_and_touches_nothing() {
    // Three instances fit: the host of leased databases and two leased instances.
    let env = env_with(
        "[instances]\nmemory_budget_mb = 384\nmemory_per_instance_mb = 128\n\n\
         [leases]\nmin_ready = 1\nmax_ready = 2\nmax_databases = 2\n",
    );
    let d1 = lease(&env, &["tiny"]);
    let d2 = lease(&env, &["tiny"]);
    psql_ok(&env, &s(&d1, "dsn"), "insert into t values (2, 'd1')");
    let started = Instant::now();
    let r = env.fails(1, &["lease", "tiny", "--wait", "2s"]);
    assert!(started.elapsed() >= Duration::from_secs(2));
    assert!(
        r.stderr.contains("within 2 s")
            && r.stderr.contains("max_databases")
            && r.stderr.contains("nothing already leased was touched"),
        "{}",
        r.describe()
    );
    let i1 = lease(&env, &["tiny", "--isolation", "instance"]);
    let i2 = lease(&env, &["tiny", "--isolation", "instance"]);
    psql_ok(&env, &s(&i1, "dsn"), "insert into t values (3, 'i1')");
    let r = env.fails(
        1,
        &["lease", "tiny", "--isolation", "instance", "--wait", "2s"],
    );
    assert!(
        r.stderr.contains("no instance of state") && r.stderr.contains("384 MiB"),
        "{}",
        r.describe()
    );
    // Everything leased is as it was.
    assert_eq!(lease_ids(&env).len(), 4);
    assert_eq!(psql_ok(&env, &s(&d1, "dsn"), "select count(*) from t"), "2");
    assert_eq!(psql_ok(&env, &s(&d2, "dsn"), "select count(*) from t"), "1");
    assert_eq!(psql_ok(&env, &s(&i1, "dsn"), "select count(*) from t"), "2");
    assert_eq!(psql_ok(&env, &s(&i2, "dsn"), "select count(*) from t"), "1");

    // A request that waits is served once a copy is given back, and says how long it
    // waited.
    let waiter = env
        .command(&["--json", "lease", "tiny", "--wait", "60s"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("sqlrs");
    std::thread::sleep(Duration::from_millis(1500));
    env.ok(&["release", &s(&d2, "lease")]);
    let out = waiter.wait_with_output().expect("waiter");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let d3: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert!(d3["waited_ms"].as_u64().expect("waited_ms") >= 1000, "{d3}");
    assert_eq!(psql_ok(&env, &s(&d3, "dsn"), "select count(*) from t"), "1");
    // The same for an instance.
    env.ok(&["release", &s(&i2, "lease")]);
    let i3 = lease(&env, &["tiny", "--isolation", "instance", "--wait", "30s"]);
    assert_eq!(psql_ok(&env, &s(&i3, "dsn"), "select count(*) from t"), "1");
}

#[test]
fn concurrent_leases_of_a_missing_recipe_build_it_once() {
    let env = env_with("");
    // Eight workers at once, before any daemon runs: they start one, and the recipe's state
    // is built once.
    let workers: Vec<_> = (0..8)
        .map(|_| {
            env.command(&["--json", "lease", "tiny"])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("sqlrs")
        })
        .collect();
    let mut databases = std::collections::HashSet::new();
    let mut states = std::collections::HashSet::new();
    for w in workers {
        let out = w.wait_with_output().expect("worker");
        assert!(
            out.status.success(),
            "{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            env.logs()
        );
        let v: Value = serde_json::from_slice(&out.stdout).expect("json");
        assert_eq!(psql_ok(&env, &s(&v, "dsn"), "select count(*) from t"), "1");
        databases.insert(s(&v, "database"));
        states.insert(s(&v, "state_id"));
    }
    assert_eq!(databases.len(), 8, "every worker has its own copy");
    assert_eq!(states.len(), 1);
    // Two states (the base and the recipe's step), each built once.
    let built = event_kinds(&env).iter().filter(|k| *k == "built").count();
    assert_eq!(built, 2);
}

#[test]
fn leases_survive_a_daemon_crash() {
    let env = env_with("");
    let d = lease(&env, &["tiny"]);
    let i = lease(&env, &["tiny", "--isolation", "instance"]);
    psql_ok(&env, &s(&d, "dsn"), "insert into t values (2, 'kept')");
    psql_ok(&env, &s(&i, "dsn"), "insert into t values (3, 'kept')");
    let pid = env.daemon_pid().expect("daemon");
    unsafe { libc::kill(pid, libc::SIGKILL) };
    assert!(common::wait_gone(pid, Duration::from_secs(10)));
    // The next command starts a daemon, which keeps both leases and their data.
    let mut listed = lease_ids(&env);
    listed.sort();
    let mut want = vec![s(&d, "lease"), s(&i, "lease")];
    want.sort();
    assert_eq!(listed, want);
    let count = |dsn: &str| {
        let mut last = String::new();
        for _ in 0..50 {
            match psql(dsn, "select count(*) from t") {
                Ok(n) => return n,
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("{last}\n{}", env.logs());
    };
    assert_eq!(count(&s(&d, "dsn")), "2");
    assert_eq!(count(&s(&i, "dsn")), "2");
    // And new leases still come fresh from the same host.
    let again = lease(&env, &["tiny"]);
    assert_eq!(
        psql_ok(&env, &s(&again, "dsn"), "select count(*) from t"),
        "1"
    );
    env.ok(&["release", &s(&d, "lease")]);
    env.ok(&["release", &s(&i, "lease")]);
}

#[test]
fn removing_a_state_ends_its_leases_and_the_next_lease_starts_afresh() {
    let env = env_with("");
    let d = lease(&env, &["tiny"]);
    let i = lease(&env, &["tiny", "--isolation", "instance"]);
    let state = s(&d, "state_id");
    env.ok(&["rm", "--force", &state]);
    // Both copies went with the state's instances: their leases are lost, not left dangling.
    assert!(lease_ids(&env).is_empty());
    assert_eq!(
        event_kinds(&env)
            .iter()
            .filter(|k| *k == "lease_lost")
            .count(),
        2
    );
    assert!(psql(&s(&i, "dsn"), "select 1").is_err());
    // The recipe is built again, and its leases come from a new instance.
    let again = lease(&env, &["tiny"]);
    assert_eq!(s(&again, "state_id"), state);
    assert_ne!(s(&again, "instance_id"), s(&d, "instance_id"));
    assert_eq!(
        psql_ok(&env, &s(&again, "dsn"), "select count(*) from t"),
        "1"
    );
}

#[test]
fn a_killed_host_is_started_again_and_its_leases_come_back() {
    let env = env_with("");
    let a = lease(&env, &["tiny"]);
    psql_ok(&env, &s(&a, "dsn"), "insert into t values (2, 'kept')");
    let host_dir = env.home.join("instances").join(s(&a, "instance_id"));
    let pids = common::postmasters_under(&host_dir);
    assert_eq!(pids.len(), 1, "{pids:?} under {}", host_dir.display());
    unsafe { libc::kill(pids[0], libc::SIGKILL) };
    assert!(common::wait_gone(pids[0], Duration::from_secs(10)));
    // No client asks for it: the lifecycle starts it again, and new leases come from it.
    let host = s(&a, "instance_id");
    let host_status = || {
        env.ls()["instances"]
            .as_array()
            .expect("instances")
            .iter()
            .find(|i| i["instance_id"] == host.as_str())
            .map(|i| s(i, "status"))
    };
    wait_until(
        "the host is seen dead",
        &env,
        Duration::from_secs(20),
        || event_kinds(&env).iter().any(|k| k == "instance_died"),
    );
    wait_until("the host runs again", &env, Duration::from_secs(30), || {
        host_status().as_deref() == Some("running")
            && common::postmasters_under(&host_dir).len() == 1
    });
    let b = lease(&env, &["tiny", "--wait", "60s"]);
    assert_eq!(s(&b, "instance_id"), s(&a, "instance_id"));
    assert_eq!(psql_ok(&env, &s(&b, "dsn"), "select count(*) from t"), "1");
    assert_eq!(psql_ok(&env, &s(&a, "dsn"), "select count(*) from t"), "2");
}
