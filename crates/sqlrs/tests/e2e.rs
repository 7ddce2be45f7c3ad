//! End to end: the real `sqlrs` and `taidon` binaries, real PostgreSQL, real psql and pgbench.

mod common;

use std::fs;
use std::time::Duration;

use common::{postmasters_under, Env};

const SCHEMA: &str = "create table film (id int primary key, title text not null);\n";
const SEED: &str = "insert into film select g, 'film ' || g from generate_series(1, 42) g;\n";

#[test]
fn prepare_then_run_psql_then_cache_hit() {
    let env = Env::new();
    env.write("schema.sql", SCHEMA);
    env.write("seed.sql", SEED);
    let first = env.ok(&[
        "prepare:psql",
        "--",
        "-f",
        "schema.sql",
        "-f",
        "seed.sql",
        "run:psql",
        "--",
        "-At",
        "-c",
        "select count(*) from film",
    ]);
    assert_eq!(first.stdout.trim(), "42", "{}", first.describe());
    // The composite removed its instance after the command succeeded.
    assert_eq!(env.instance_count(), 0);

    // Base + two steps, all published.
    let warm = env.states_with_status("WARM");
    assert_eq!(warm.len(), 3, "{:#}", env.ls());

    let again = env.ok(&[
        "--json",
        "prepare:psql",
        "--",
        "-f",
        "schema.sql",
        "-f",
        "seed.sql",
    ]);
    let v = again.json();
    assert_eq!(v["cache_hit"], true, "{}", again.describe());
    assert_eq!(v["state_id"].as_str().map(str::len), Some(64));
    assert!(v["dsn"].as_str().unwrap().starts_with("postgres://"));
    // Nothing new was built.
    assert_eq!(env.published_count(), 3);
    assert_eq!(env.instance_count(), 1);
}

#[test]
fn prepare_prints_a_dsn_that_psql_and_tokio_postgres_use_through_the_gateway() {
    let env = Env::new();
    env.write("schema.sql", SCHEMA);
    let out = env.ok(&[
        "prepare:psql",
        "--",
        "-f",
        "schema.sql",
        "-c",
        "insert into film values (7, 'seven')",
    ]);
    let dsn = out.dsn();
    let status = env.ok(&["--json", "status"]).json();
    let gateway = status["gateway"].as_str().unwrap().to_owned();
    assert!(
        dsn.contains(&gateway),
        "DSN {dsn} must point at the gateway {gateway}"
    );

    let psql = std::process::Command::new("psql")
        .args([dsn.as_str(), "-At", "-c", "select title from film"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&psql.stdout).trim(),
        "seven",
        "{}",
        String::from_utf8_lossy(&psql.stderr)
    );

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // tokio-postgres takes no sslrootcert in a URL: it connects plain (or brings its own
        // TLS connector), everything else in the DSN unchanged.
        assert!(dsn.contains("sslmode=verify-full&sslrootcert="), "{dsn}");
        let plain = format!("{}?sslmode=disable", dsn.split('?').next().unwrap());
        let (client, conn) = tokio_postgres::connect(&plain, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        let row = client
            .query_one("select count(*) from film", &[])
            .await
            .unwrap();
        assert_eq!(row.get::<_, i64>(0), 1);
        // Each instance is mutable and its own.
        client
            .execute("insert into film values (8, 'eight')", &[])
            .await
            .unwrap();
    });

    // A bad token is refused with 28P01, and the instance's own credentials never leave.
    let bad = dsn.replacen("postgres://sqlrs:", "postgres://sqlrs:x", 1);
    let r = std::process::Command::new("psql")
        .args([bad.as_str(), "-c", "select 1"])
        .output()
        .unwrap();
    assert!(!r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains("password authentication failed"));
}

#[test]
fn editing_step_k_rebuilds_steps_k_to_n_only() {
    let env = Env::new();
    env.write("a.sql", "create table a(x int);\n");
    env.write("b.sql", "create table b(x int);\n");
    env.write("c.sql", "create table c(x int);\n");
    let args = [
        "prepare:psql",
        "--",
        "-f",
        "a.sql",
        "-f",
        "b.sql",
        "-f",
        "c.sql",
        "run",
        "--",
        "true",
    ];
    let first = env.ok(&args);
    for i in 1..=3 {
        assert!(
            first.stderr.contains(&format!("step {i}/3")),
            "{}",
            first.describe()
        );
    }
    env.write("b.sql", "create table b(x int, y int);\n");
    let second = env.ok(&args);
    assert!(
        !second.stderr.contains("step 1/3"),
        "step 1 must be reused:\n{}",
        second.describe()
    );
    assert!(second.stderr.contains("step 2/3"), "{}", second.describe());
    assert!(second.stderr.contains("step 3/3"), "{}", second.describe());
    // base + a + b + c + b' + c'
    assert_eq!(env.states_with_status("WARM").len(), 6, "{:#}", env.ls());
}

#[test]
fn sql_error_in_step_k_names_file_and_line_and_publishes_nothing_of_it() {
    let env = Env::new();
    env.write("schema.sql", SCHEMA);
    env.write(
        "seed.sql",
        "insert into film values (1, 'one');\n\ninsert into flim values (2, 'two');\n",
    );
    let args = [
        "prepare:psql",
        "--",
        "-f",
        "schema.sql",
        "-f",
        "seed.sql",
        "run:psql",
        "--",
        "-c",
        "select 1",
    ];
    let r = env.fails(1, &args);
    assert!(
        r.stderr.contains("seed.sql:3"),
        "file and line: {}",
        r.describe()
    );
    assert!(
        r.stderr.contains("relation \"flim\" does not exist"),
        "{}",
        r.describe()
    );
    assert!(r.stderr.contains("step 2/2"), "{}", r.describe());

    // Base and step 1 are published; nothing of step 2 is, and no instance runs.
    assert_eq!(env.states_with_status("WARM").len(), 2, "{:#}", env.ls());
    assert_eq!(env.states_with_status("FAILED").len(), 1);
    assert_eq!(env.instance_count(), 0);
    assert!(
        env.unpublished_snapshot_dirs().is_empty(),
        "{:?}",
        env.unpublished_snapshot_dirs()
    );
    assert!(postmasters_under(&env.home.join("snapshots")).is_empty());
    assert!(postmasters_under(&env.home.join("instances")).is_empty());

    // Fixing the file rebuilds step 2 only, on top of the published step 1.
    env.write("seed.sql", "insert into film values (1, 'one');\n");
    let fixed = env.ok(&args);
    assert!(!fixed.stderr.contains("step 1/2"), "{}", fixed.describe());
    assert!(fixed.stderr.contains("step 2/2"), "{}", fixed.describe());
}

#[test]
fn bad_input_is_one_line_and_exit_2_before_any_work() {
    let env = Env::new();
    env.write("schema.sql", SCHEMA);

    let r = env.fails(
        2,
        &[
            "prepare:psql",
            "--",
            "-f",
            "schema.sql",
            "-f",
            "missing.sql",
        ],
    );
    assert!(r.stderr.contains("missing.sql"), "{}", r.describe());
    assert_eq!(r.stderr.trim().lines().count(), 1, "{}", r.describe());
    // The daemon was not even needed.
    assert!(!env.home.join("daemon.json").exists());

    let unreadable = env.write("secret.sql", "select 1;");
    fs::set_permissions(
        &unreadable,
        std::os::unix::fs::PermissionsExt::from_mode(0o000),
    )
    .unwrap();
    // Root reads anything; only a non-root user sees this one fail.
    if unsafe { libc::geteuid() } != 0 {
        let r = env.fails(2, &["prepare:psql", "--", "-f", "secret.sql"]);
        assert!(r.stderr.contains("secret.sql"), "{}", r.describe());
    }

    let r = env.fails(2, &["prepare:liquibase", "--", "update"]);
    assert!(r.stderr.contains("liquibase"), "{}", r.describe());
    let r = env.fails(
        2,
        &[
            "prepare:psql",
            "--",
            "-f",
            "schema.sql",
            "run:bogus",
            "--",
            "x",
        ],
    );
    assert!(r.stderr.contains("bogus"), "{}", r.describe());
    let r = env.fails(2, &["frobnicate"]);
    assert!(!r.stderr.is_empty());

    // Unknown ids, once a daemon runs.
    env.ok(&["prepare:psql", "--", "-f", "schema.sql"]);
    let states_before = env.ls()["states"].as_array().unwrap().len();
    let r = env.fails(2, &["rm", "deadbeefdeadbeef"]);
    assert!(r.stderr.contains("deadbeef"), "{}", r.describe());
    let r = env.fails(
        2,
        &["run:psql", "--instance", "0badc0de", "--", "-c", "select 1"],
    );
    assert!(r.stderr.contains("0badc0de"), "{}", r.describe());
    let r = env.fails(2, &["rm", "abc"]);
    assert!(r.stderr.contains("abc"), "{}", r.describe());
    assert_eq!(env.ls()["states"].as_array().unwrap().len(), states_before);
}

#[test]
fn ambiguous_prefix_is_exit_2_and_removes_nothing() {
    // Two published snapshots whose ids share eight hex digits cannot be made by hashing; the
    // store recovers any well-formed snapshot on start, so plant two.
    let env = Env::new();
    env.write("schema.sql", SCHEMA);
    env.ok(&[
        "prepare:psql",
        "--",
        "-f",
        "schema.sql",
        "run",
        "--",
        "true",
    ]);
    let real = env.states_with_status("WARM");
    let src = env.home.join("snapshots").join(&real[0]);
    env.ok(&["shutdown"]);
    for suffix in ["1", "2"] {
        let id = format!("abcdef01{}", suffix.repeat(56));
        let dst = env.home.join("snapshots").join(&id);
        let status = std::process::Command::new("cp")
            .arg("-a")
            .arg(&src)
            .arg(&dst)
            .status()
            .unwrap();
        assert!(status.success());
        let manifest = fs::read_to_string(dst.join("manifest.json")).unwrap();
        fs::write(dst.join("manifest.json"), manifest.replace(&real[0], &id)).unwrap();
    }
    let r = env.fails(2, &["rm", "abcdef01"]);
    assert!(r.stderr.contains("ambiguous"), "{}", r.describe());
    assert!(env
        .home
        .join("snapshots")
        .join(format!("abcdef01{}", "1".repeat(56)))
        .exists());
    assert!(env
        .home
        .join("snapshots")
        .join(format!("abcdef01{}", "2".repeat(56)))
        .exists());
    // A longer prefix picks one.
    env.ok(&["rm", "abcdef011111"]);
    assert!(!env
        .home
        .join("snapshots")
        .join(format!("abcdef01{}", "1".repeat(56)))
        .exists());
}

#[test]
fn run_passes_environment_exit_code_and_keeps_a_failed_instance() {
    let env = Env::new();
    env.write("schema.sql", SCHEMA);
    let r = env.run(&[
        "prepare:psql", "--", "-f", "schema.sql",
        "run", "--", "sh", "-c",
        "psql -Atc 'select 40+2' && test -n \"$DATABASE_URL\" && echo \"$PGUSER@$PGHOST:$PGPORT/$PGDATABASE\" && exit 3",
    ]);
    assert_eq!(r.code, 3, "{}", r.describe());
    assert!(r.stdout.starts_with("42\n"), "{}", r.describe());
    assert!(r.stdout.contains("@127.0.0.1:"), "{}", r.describe());
    assert!(r.stderr.contains("kept"), "{}", r.describe());
    assert!(r.stderr.contains("DSN="), "{}", r.describe());
    assert_eq!(env.instance_count(), 1);

    // --keep keeps it even on success.
    env.ok(&[
        "prepare:psql",
        "--",
        "-f",
        "schema.sql",
        "run",
        "--keep",
        "--",
        "true",
    ]);
    assert_eq!(env.instance_count(), 2);

    // stdin is passed through.
    let mut cmd = env.command(&[
        "prepare:psql",
        "--",
        "-f",
        "schema.sql",
        "run:psql",
        "--",
        "-At",
    ]);
    cmd.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"select 'from stdin';\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "from stdin");
}

#[test]
fn run_on_an_existing_instance_by_prefix_then_rm() {
    let env = Env::new();
    env.write("schema.sql", SCHEMA);
    let v = env
        .ok(&["--json", "prepare:psql", "--", "-f", "schema.sql"])
        .json();
    let iid = v["instance_id"].as_str().unwrap().to_owned();
    let prefix = &iid[..8];
    env.ok(&[
        "run:psql",
        "--instance",
        prefix,
        "--",
        "-c",
        "insert into film values (1, 'kept')",
    ]);
    let r = env.ok(&[
        "run:psql",
        "--instance",
        prefix,
        "--",
        "-At",
        "-c",
        "select title from film",
    ]);
    assert_eq!(r.stdout.trim(), "kept");

    // pgbench through the gateway.
    env.ok(&[
        "run:pgbench",
        "--instance",
        prefix,
        "--",
        "-i",
        "-s",
        "1",
        "-q",
    ]);
    let r = env.ok(&[
        "run:pgbench",
        "--instance",
        prefix,
        "--",
        "-S",
        "-t",
        "20",
        "-c",
        "2",
    ]);
    assert!(
        r.stdout
            .contains("number of transactions actually processed: 40"),
        "{}",
        r.describe()
    );

    env.ok(&["rm", prefix]);
    assert_eq!(env.instance_count(), 0);
    assert!(!env.home.join("instances").join(&iid).exists());
    assert!(postmasters_under(&env.home.join("instances")).is_empty());
    env.fails(
        2,
        &["run:psql", "--instance", prefix, "--", "-c", "select 1"],
    );
}

#[test]
fn concurrent_prepares_of_one_missing_state_build_it_once() {
    let env = Env::new();
    env.write("slow.sql", "select pg_sleep(2);\ncreate table t(x int);\n");
    let args = [
        "prepare:psql",
        "--",
        "-f",
        "slow.sql",
        "run:psql",
        "--",
        "-Atc",
        "select count(*) from t",
    ];
    // Start the daemon first, so both clients race on the build, not on the daemon.
    env.ok(&["status"]);
    let a = env
        .command(&args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let b = env
        .command(&args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    for out in [&a, &b] {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0");
    }
    let built = [&a, &b]
        .iter()
        .filter(|o| String::from_utf8_lossy(&o.stderr).contains("step 1/1 done"))
        .count();
    assert_eq!(
        built,
        1,
        "exactly one prepare builds:\nA: {}\nB: {}",
        String::from_utf8_lossy(&a.stderr),
        String::from_utf8_lossy(&b.stderr)
    );
    let log = env.logs();
    // Base and step, published. (Two prepares make the state busy: the standby pool may
    // keep it HOT at any moment, so both are counted in one listing.)
    let published = env.published_count();
    assert_eq!(published, 2, "{log}");
}

#[test]
fn pagila_schema_then_data_through_the_gateway() {
    let env = Env::new();
    let pagila = common::pagila_dir();
    let schema = pagila.join("pagila-schema.sql");
    let data = pagila.join("pagila-data.sql");
    let r = env.ok(&[
        "prepare:psql",
        "--",
        "-f",
        schema.to_str().unwrap(),
        "-f",
        data.to_str().unwrap(),
        "run:psql",
        "--",
        "-At",
        "-c",
        "select count(*) from rental",
    ]);
    assert_eq!(r.stdout.trim(), "16044", "{}", r.describe());
    let hit = env.ok(&[
        "--json",
        "prepare:psql",
        "--",
        "-f",
        schema.to_str().unwrap(),
        "-f",
        data.to_str().unwrap(),
    ]);
    assert_eq!(hit.json()["cache_hit"], true);
}

#[test]
fn status_ls_json_and_api_token_protection() {
    let env = Env::new();
    env.write("schema.sql", SCHEMA);
    env.ok(&["prepare:psql", "--", "-f", "schema.sql"]);
    let s = env.ok(&["--json", "status"]).json();
    assert!(
        s["engine_version"]
            .as_str()
            .unwrap()
            .starts_with("PostgreSQL "),
        "{s:#}"
    );
    // The test home is on /tmp: ext4 here, so a plain copy. (The reflink path has its own test.)
    let strategy = s["clone_strategy"].as_str().unwrap();
    assert!(["copy", "reflink", "btrfs"].contains(&strategy), "{s:#}");
    assert_eq!(s["instances_running"], 1);
    assert!(s["store_bytes"].as_u64().unwrap() > 1_000_000);
    let human = env.ok(&["status"]).stdout;
    assert!(human.contains(strategy), "{human}");

    let ls = env.ls();
    let states = ls["states"].as_array().unwrap();
    let step = states.iter().find(|s| s["parent"].is_string()).unwrap();
    for field in [
        "state_id",
        "parent",
        "status",
        "size_bytes",
        "build_cost_ms",
        "restore_cost_ms",
        "access_count",
    ] {
        assert!(!step[field].is_null(), "{field} missing in {step:#}");
    }
    assert_eq!(step["status"], "HOT");

    // The API refuses a request without the token file's token.
    let info: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(env.home.join("daemon.json")).unwrap()).unwrap();
    let url = format!("{}/v1/states", info["api_url"].as_str().unwrap());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let code = rt.block_on(async { reqwest::get(&url).await.unwrap().status().as_u16() });
    assert_eq!(code, 401);
    let mode = fs::metadata(env.home.join("api.token"))
        .unwrap()
        .permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );
}

#[test]
fn missing_postgres_binaries_say_how_to_install_them() {
    let mut env = Env::new();
    env.extra_env
        .push(("TAIDON_PG_BIN".into(), "/nonexistent/pg/bin".into()));
    let r = env.fails(1, &["status"]);
    assert!(
        r.stderr.contains("apt-get install -y postgresql"),
        "{}",
        r.describe()
    );
}
