//! psql steps and orphan cleanup against a real server.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::Fixture;
use taidon_core::{PsqlInput, PsqlStep};
use taidon_runtime::{kill_orphan, run_psql_step};

fn file(path: &str) -> PsqlStep {
    PsqlStep {
        input: PsqlInput::File {
            path: path.into(),
            sha256: "00".repeat(32),
            workdir: String::new(),
            includes: Vec::new(),
        },
        variables: BTreeMap::new(),
        single_transaction: false,
    }
}

fn command(sql: &str) -> PsqlStep {
    PsqlStep {
        input: PsqlInput::Command { sql: sql.into() },
        variables: BTreeMap::new(),
        single_transaction: false,
    }
}

/// A directory of the user's files, as the current user owns them.
fn project(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        let path = dir.path().join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
    dir
}

#[tokio::test]
async fn file_command_include_and_variable_steps() {
    let fx = Fixture::setup();
    let server = fx.started(false).await;
    let proj = project(&[
        (
            "schema.sql",
            "create table t(x int);\ninsert into t values (1), (2);\n",
        ),
        ("main.sql", "\\i sub/more.sql\n"),
        ("sub/more.sql", "insert into t values (3);\n"),
        (
            "vars.sql",
            "create table :\"tbl\" (v text);\ninsert into :\"tbl\" values (:'val');\n",
        ),
    ]);
    let cwd = proj.path();

    run_psql_step(&fx.engine, &server, &file("schema.sql"), cwd)
        .await
        .unwrap();
    // \i resolves against the working directory, as when the user runs psql there.
    run_psql_step(&fx.engine, &server, &file("main.sql"), cwd)
        .await
        .unwrap();
    let out = run_psql_step(
        &fx.engine,
        &server,
        &command("select string_agg(x::text, ',' order by x) from t"),
        cwd,
    )
    .await
    .unwrap();
    assert!(out.stdout.contains("1,2,3"), "{out:?}");

    let mut vars = file("vars.sql");
    vars.variables = BTreeMap::from([
        ("tbl".to_owned(), "things".to_owned()),
        ("val".to_owned(), "it's here".to_owned()),
    ]);
    run_psql_step(&fx.engine, &server, &vars, cwd)
        .await
        .unwrap();
    let client = server.connect_local().await.unwrap();
    let v: String = client
        .query_one("select v from things", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, "it's here");

    let app: String = client
        .query_one("show application_name", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(app, "taidon-runtime");
    let out = run_psql_step(
        &fx.engine,
        &server,
        &command("select current_setting('application_name')"),
        cwd,
    )
    .await
    .unwrap();
    assert!(out.stdout.contains("taidon-prepare"), "{out:?}");
    drop(client);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn failing_steps_name_the_file_and_line() {
    let fx = Fixture::setup();
    let server = fx.started(false).await;
    let proj = project(&[
        (
            "db/bad.sql",
            "create table ok1(x int);\n-- comment\ncraete table nope(x int);\ncreate table never(x int);\n",
        ),
        (
            "atomic.sql",
            "create table half(x int);\nselect 1/0;\n",
        ),
    ]);
    let cwd = proj.path();

    let err = run_psql_step(&fx.engine, &server, &file("db/bad.sql"), cwd)
        .await
        .unwrap_err();
    assert_eq!(
        err.message,
        "psql:db/bad.sql:3: ERROR:  syntax error at or near \"craete\""
    );
    assert_eq!(err.to_string(), err.message);
    assert_eq!(err.exit_code, Some(3));
    assert!(err.output.contains("LINE 1: craete"), "{err:?}");

    // ON_ERROR_STOP: nothing after the failing line ran; what came before did.
    let client = server.connect_local().await.unwrap();
    let tables: Vec<String> = client
        .query(
            "select relname::text from pg_class where relname in ('ok1', 'never') order by 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(tables, ["ok1"]);

    // -1: the whole file is one transaction, so its first statement is rolled back too.
    let mut atomic = file("atomic.sql");
    atomic.single_transaction = true;
    let err = run_psql_step(&fx.engine, &server, &atomic, cwd)
        .await
        .unwrap_err();
    assert!(err.message.contains("division by zero"), "{err:?}");
    let half: i64 = client
        .query_one("select count(*) from pg_class where relname = 'half'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(half, 0);

    let err = run_psql_step(&fx.engine, &server, &file("missing.sql"), cwd)
        .await
        .unwrap_err();
    assert!(err.message.contains("missing.sql"), "{err:?}");
    assert!(err.message.contains("No such file"), "{err:?}");
    drop(client);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn kill_orphan_stops_a_server_that_is_not_ours_any_more() {
    let fx = Fixture::setup();
    let server = fx.started(false).await;
    let pid = server.pid;
    // The handle is lost as if the daemon had crashed: nothing stops or reaps the server.
    std::mem::forget(server);
    assert!(Path::new(&format!("/proc/{pid}/cmdline")).exists());

    let data_dir = fx.data_dir();
    let killed = tokio::task::spawn_blocking(move || kill_orphan(&data_dir))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(killed, Some(pid));
    // It is still our (forgotten) child, so it lingers as a zombie until reaped.
    let mut status = 0;
    // SAFETY: pid is our child and status is a valid out pointer.
    let reaped = unsafe { libc::waitpid(pid as libc::pid_t, &mut status, 0) };
    assert_eq!(reaped, pid as libc::pid_t);
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
    assert!(!fx.data_dir().join("postmaster.pid").exists());

    // Nothing left to do the second time, and the data dir starts again.
    assert_eq!(kill_orphan(&fx.data_dir()).unwrap(), None);
    let server = fx.start(false).await;
    server.stop().await.unwrap();
}

#[tokio::test]
async fn kill_orphan_leaves_a_server_of_another_data_dir_alone() {
    let fx = Fixture::setup();
    let server = fx.started(false).await;
    // A copy of a live data dir carries a postmaster.pid naming the original's server.
    let copy = fx.dir.path().join("copy");
    std::fs::create_dir(&copy).unwrap();
    std::fs::copy(
        fx.data_dir().join("postmaster.pid"),
        copy.join("postmaster.pid"),
    )
    .unwrap();
    assert_eq!(kill_orphan(&copy).unwrap(), None);
    assert!(!copy.join("postmaster.pid").exists());
    assert!(Path::new(&format!("/proc/{}", server.pid)).exists());
    server.connect_local().await.unwrap();
    server.stop().await.unwrap();
}
