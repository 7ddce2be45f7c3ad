//! Engine discovery, initdb, and server lifecycle against the real PostgreSQL here.

mod common;

use std::collections::HashMap;
use std::path::Path;

use common::Fixture;
use taidon_core::plan::Included;
use taidon_core::{DataArea, InitdbOptions, InstanceId, PsqlInput, PsqlStep, StateId, Step};
use taidon_runtime::{
    free_port, BoxFuture, Engine, EngineError, Exit, Health, LocalLayout, LocalRuntime, Runtime,
    ServerConfig, StepInputs,
};

#[test]
fn discover_finds_postgres_15_and_its_fingerprint() {
    let engine = Engine::discover(None, InitdbOptions::default()).unwrap();
    assert_eq!(engine.fingerprint.major, 15, "{engine:?}");
    assert!(engine.fingerprint.minor > 0, "{engine:?}");
    assert_eq!(engine.fingerprint.initdb, InitdbOptions::default());
    assert!(
        engine.version_line.contains("(PostgreSQL) 15."),
        "{engine:?}"
    );
    assert!(engine.bin_dir.join("initdb").is_file());
    assert!(engine.bin_dir.join("postgres").is_file());
    assert!(engine.psql().ends_with("psql"));

    // An explicit directory is used as given.
    let again = Engine::discover(Some(&engine.bin_dir), InitdbOptions::default()).unwrap();
    assert_eq!(again, engine);
}

#[test]
fn discover_with_a_bogus_dir_says_how_to_install() {
    let err = Engine::discover(
        Some(Path::new("/nonexistent/pg/bin")),
        InitdbOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(err, EngineError::NotFound { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.starts_with("PostgreSQL server binaries not found"),
        "{msg}"
    );
    assert!(msg.contains("/nonexistent/pg/bin"), "{msg}");
    assert!(msg.contains("apt-get install -y postgresql"), "{msg}");
    assert!(msg.contains("TAIDON_PG_BIN"), "{msg}");
}

#[tokio::test]
async fn initdb_writes_scram_only_tcp_hba_and_is_owned_by_the_server_user() {
    let fx = Fixture::setup();
    fx.engine
        .initdb(&fx.data_dir(), fx.run_as.as_ref())
        .await
        .unwrap();
    let hba = std::fs::read_to_string(fx.data_dir().join("pg_hba.conf")).unwrap();
    assert_eq!(
        hba,
        "local all all trust\n\
         host all all 127.0.0.1/32 scram-sha-256\n\
         host all all ::1/128 scram-sha-256\n"
    );
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(fx.data_dir()).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o700);
    if let Some(r) = &fx.run_as {
        assert_eq!(meta.uid(), r.uid);
        assert_eq!(
            std::fs::metadata(fx.data_dir().join("pg_hba.conf"))
                .unwrap()
                .uid(),
            r.uid
        );
    }
    // A second initdb on a non-empty dir fails and says why.
    let err = fx
        .engine
        .initdb(&fx.data_dir(), fx.run_as.as_ref())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("exists but is not empty"), "{err}");
}

#[tokio::test]
async fn start_connect_stop_is_clean_and_restart_keeps_data() {
    let fx = Fixture::setup();
    let server = fx.started(false).await;
    assert!(Path::new(&format!("/proc/{}", server.pid)).exists());
    let client = server.connect_local().await.unwrap();
    client
        .batch_execute("create table kept(x int); insert into kept values (42)")
        .await
        .unwrap();
    let who: String = client
        .query_one("select current_user", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(who, "postgres");
    drop(client);
    let pid = server.pid;
    server.stop().await.unwrap();
    assert!(!fx.data_dir().join("postmaster.pid").exists());
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
    assert!(
        fx.log().contains("database system is shut down"),
        "{}",
        fx.log()
    );

    let server = fx.start(false).await;
    let client = server.connect_local().await.unwrap();
    let x: i32 = client
        .query_one("select x from kept", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(x, 42);
    // A clean stop means no crash recovery on the next start.
    assert!(!fx.log().contains("not properly shut down"), "{}", fx.log());
    drop(client);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn start_on_a_taken_port_fails_with_the_log() {
    let fx = Fixture::setup();
    fx.engine
        .initdb(&fx.data_dir(), fx.run_as.as_ref())
        .await
        .unwrap();
    let taken = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
    let port = taken.local_addr().unwrap().port();
    let cfg = ServerConfig {
        port: Some(port),
        ..fx.config(true)
    };
    let err = fx.engine.start(cfg, fx.run_as.as_ref()).await.unwrap_err();
    assert!(err.to_string().contains("could not bind"), "{err}");

    // Without a fixed port the runtime picks one that is free.
    let server = fx.start(true).await;
    assert_ne!(server.port, port);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn start_of_a_missing_data_dir_reports_the_log_tail() {
    let fx = Fixture::setup();
    let err = fx
        .engine
        .start(fx.config(false), fx.run_as.as_ref())
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("did not start"), "{msg}");
    assert!(msg.contains("data"), "{msg}");
    assert!(msg.contains("postgres exited"), "{msg}");
    // The server's own complaint is in the error, not just in the log file.
    assert!(msg.contains("FATAL") || msg.contains("could not"), "{msg}");
}

fn tcp_config(port: u16, user: &str, password: Option<&str>) -> tokio_postgres::Config {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host("127.0.0.1")
        .port(port)
        .user(user)
        .dbname("postgres");
    if let Some(p) = password {
        cfg.password(p);
    }
    cfg
}

#[tokio::test]
async fn tcp_needs_scram_and_the_plain_password_is_never_sent() {
    let fx = Fixture::setup();
    let server = fx.started(true).await;
    let secret = "s3cret-Pa55-that-must-not-leak";
    server.set_password("postgres", secret).await.unwrap();

    let (client, conn) = tcp_config(server.port, "postgres", Some(secret))
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let stored: String = client
        .query_one(
            "select rolpassword from pg_authid where rolname = 'postgres'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(stored.starts_with("SCRAM-SHA-256$4096:"), "{stored}");
    let method: String = client
        .query_one("show password_encryption", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(method, "scram-sha-256");
    drop(client);

    let wrong = tcp_config(server.port, "postgres", Some("wrong"))
        .connect(tokio_postgres::NoTls)
        .await
        .err()
        .expect("login must fail");
    assert_eq!(
        wrong.code(),
        Some(&tokio_postgres::error::SqlState::INVALID_PASSWORD),
        "{wrong:?}"
    );

    // Trust is not accepted over TCP: with no password, the server demands one.
    let none = tcp_config(server.port, "postgres", None)
        .connect(tokio_postgres::NoTls)
        .await
        .err()
        .expect("login must fail");
    assert!(format!("{none:?}").contains("password missing"), "{none:?}");
    let psql = std::process::Command::new(fx.engine.psql())
        .args(["-X", "-w", "-h", "127.0.0.1", "-p"])
        .arg(server.port.to_string())
        .args(["-U", "postgres", "-d", "postgres", "-c", "select 1"])
        .env_remove("PGPASSWORD")
        .env("PGPASSFILE", "/nonexistent")
        .output()
        .unwrap();
    assert!(!psql.status.success());
    let stderr = String::from_utf8_lossy(&psql.stderr);
    assert!(stderr.contains("no password supplied"), "{stderr}");

    server.stop().await.unwrap();
    assert!(!fx.log().contains(secret), "the log holds the password");
}

#[tokio::test]
async fn a_socket_only_server_does_not_listen_on_tcp() {
    let fx = Fixture::setup();
    let server = fx.started(false).await;
    let err = std::net::TcpStream::connect(("127.0.0.1", server.port)).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    server.stop().await.unwrap();
}

/// Blobs in memory, by SHA-256, as the controller's input store serves them.
struct Blobs(HashMap<String, Vec<u8>>);

impl StepInputs for Blobs {
    fn open<'a>(
        &'a self,
        sha256: &'a str,
    ) -> BoxFuture<'a, std::io::Result<Box<dyn tokio::io::AsyncRead + Send + Unpin>>> {
        Box::pin(async move {
            let content = self.0.get(sha256).cloned().ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::NotFound, sha256.to_owned())
            })?;
            Ok(Box::new(std::io::Cursor::new(content))
                as Box<dyn tokio::io::AsyncRead + Send + Unpin>)
        })
    }
}

/// The whole local runtime through its trait: initdb on an area, a build server that applies
/// a step whose include closure is laid out from blobs, a clean stop, an instance on that data
/// reached at its endpoint, a leftover server stopped after a "restart", and the data removed.
#[tokio::test]
async fn local_runtime_builds_and_runs_instances_through_the_trait() {
    let fx = Fixture::setup();
    let root = fx.dir.path();
    let runtime: Box<dyn Runtime> = Box::new(LocalRuntime::new(
        fx.engine.clone(),
        fx.run_as.clone(),
        LocalLayout {
            instances: root.join("instances"),
            run: root.join("run"),
            logs: root.join("logs"),
            work: root.join("work"),
            cache: root.join("cache"),
        },
    ));
    assert_eq!(runtime.engine(), &fx.engine.fingerprint);
    assert_eq!(runtime.describe().bin_dir, fx.engine.bin_dir);
    assert!(matches!(
        runtime
            .init_data(&DataArea::named("pvc"), &fx.engine.fingerprint)
            .await,
        Err(taidon_runtime::RuntimeError::ForeignArea(_))
    ));

    // The "store" here is the instance's own area: the runtime does not care who filled it.
    let iid = InstanceId::from_bytes([7; 8]);
    let area = runtime.prepare_instance(iid).await.unwrap();
    runtime
        .init_data(&area, &fx.engine.fingerprint)
        .await
        .unwrap();
    let state = StateId::from_bytes([1; 32]);
    let build = runtime.start_build(state, &area).await.unwrap();
    let main = b"\\ir lib/t.sql\ninsert into t values (2);\n".to_vec();
    let lib = b"create table t(x int);\ninsert into t values (1);\n".to_vec();
    let blobs = Blobs(HashMap::from([
        ("a".repeat(64), main),
        ("b".repeat(64), lib),
    ]));
    let step = PsqlStep {
        input: PsqlInput::File {
            path: "main.sql".into(),
            sha256: "a".repeat(64),
            workdir: "db".into(),
            includes: vec![Included {
                path: "db/lib/t.sql".into(),
                sha256: "b".repeat(64),
            }],
        },
        variables: Default::default(),
        single_transaction: false,
    };
    build.apply(&Step::Psql(step), &blobs).await.unwrap();
    let failing = PsqlStep {
        input: PsqlInput::Command {
            sql: "select nope".into(),
        },
        variables: Default::default(),
        single_transaction: false,
    };
    let err = build.apply(&Step::Psql(failing), &blobs).await.unwrap_err();
    assert!(err.message.contains("ERROR:"), "{err:?}");
    build.stop().await.unwrap();
    assert_eq!(
        std::fs::read_dir(root.join("work")).unwrap().count(),
        0,
        "work directories are removed after each step"
    );

    let mut instance = runtime
        .start_instance(iid, taidon_core::StateId::from_bytes([0; 32]))
        .await
        .unwrap();
    assert_eq!(instance.health(), Health::Running);
    instance.set_password("postgres", "pw").await.unwrap();
    let endpoint = instance.endpoint();
    assert_eq!(endpoint.host, "127.0.0.1");
    let (client, conn) = tcp_config(endpoint.port, "postgres", Some("pw"))
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let sum: i64 = client
        .query_one("select sum(x) from t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(sum, 3);
    drop(client);

    // A "restart": the server is left running, then reclaimed by the next process.
    std::mem::forget(instance);
    let reclaimed = runtime.reclaim_instance(iid).await.unwrap();
    assert!(reclaimed.stopped.is_some(), "{reclaimed:?}");
    assert!(reclaimed.has_data);
    runtime.discard_leftovers().await.unwrap();
    let log = root.join("logs/instances").join(format!("{iid}.log"));
    assert!(log.exists(), "the instance logs to {}", log.display());
    runtime.remove_instance(iid).await.unwrap();
    assert!(!root.join("instances").join(iid.to_string()).exists());
    assert!(!log.exists(), "the instance's log goes with it");
    let gone = runtime.reclaim_instance(iid).await.unwrap();
    assert_eq!((gone.stopped, gone.has_data), (None, false));

    // After a restart, the logs of instances nobody adopted go; the adopted ones' stay.
    let kept = InstanceId::from_bytes([8; 8]);
    let kept_log = root.join("logs/instances").join(format!("{kept}.log"));
    std::fs::write(&kept_log, "kept").unwrap();
    std::fs::write(&log, "orphan").unwrap();
    let ended = runtime.end_unadopted(&[kept]).await.unwrap();
    assert!(ended.is_empty(), "{ended:?}");
    assert!(kept_log.exists());
    assert!(!log.exists(), "an orphan instance log is removed");
}

#[test]
fn free_port_is_bindable() {
    let port = free_port().unwrap();
    assert_ne!(port, 0);
    std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
}

#[test]
fn run_as_is_the_postgres_user_when_root() {
    let run_as = taidon_runtime::RunAs::for_this_process().unwrap();
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        let r = run_as.expect("root must run servers as another user");
        assert_eq!(r.user, "postgres");
        assert_ne!(r.uid, 0);
    } else {
        assert_eq!(run_as, None);
    }
    let err = taidon_runtime::RunAs::lookup("no-such-user-taidon").unwrap_err();
    assert!(err.to_string().contains("no-such-user-taidon"), "{err}");
}

#[tokio::test]
async fn a_dropped_server_is_shut_down_not_left_running() {
    let fx = Fixture::setup();
    let server = fx.started(false).await;
    let pid = server.pid;
    drop(server);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .next();
        if stat.is_empty() || state == Some("Z") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "postgres {pid} still runs"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(fx.log().contains("immediate shutdown"), "{}", fx.log());
}

#[tokio::test]
async fn a_killed_server_reports_its_signal_and_starts_again_on_its_data() {
    let fx = Fixture::setup();
    fx.engine
        .initdb(&fx.data_dir(), fx.run_as.as_ref())
        .await
        .unwrap();
    let mut instance = fx.start(true).await;
    instance
        .execute("create table t(x int); insert into t values (7)")
        .await
        .unwrap();
    let pid_file = fx.data_dir().join("postmaster.pid");
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    // SAFETY: kill has no memory preconditions; the pid is our child, not reaped yet.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let status = loop {
        match instance.health() {
            Health::Exited { status } => break status,
            Health::Running => {
                assert!(std::time::Instant::now() < deadline, "SIGKILL not noticed");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
    };
    assert_eq!(status, Exit::Signal(libc::SIGKILL));
    assert_eq!(status.to_string(), "killed by signal 9 (SIGKILL)");
    // Remembered: a second look says the same.
    assert_eq!(instance.health(), Health::Exited { status });
    assert!(
        !pid_file.exists(),
        "the dead server's postmaster.pid is left"
    );
    // A clean stop of a dead server says it had exited; discarding it is nothing to do.
    let err = instance.stop().await.unwrap_err();
    assert!(err.to_string().contains("did not stop cleanly"), "{err}");

    // Its committed row survives: the restart recovers from the WAL.
    let mut again = fx.start(true).await;
    assert_eq!(again.health(), Health::Running);
    again
        .execute("do $$ begin if (select sum(x) from t) <> 7 then raise 'lost'; end if; end $$")
        .await
        .unwrap();
    again.stop().await.unwrap();
}

#[tokio::test]
async fn a_restart_waits_for_the_backends_a_killed_server_left() {
    let fx = Fixture::setup();
    fx.engine
        .initdb(&fx.data_dir(), fx.run_as.as_ref())
        .await
        .unwrap();
    let mut instance = fx.start(false).await;
    let pid_file = fx.data_dir().join("postmaster.pid");
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    // A backend busy on the CPU does not look for its postmaster's death until it waits
    // again, so it outlives the kill by about two seconds, holding the shared memory.
    let (client, connection) = tokio_postgres::Config::new()
        .host_path(fx.config(false).socket_dir)
        .port(instance.port)
        .user("postgres")
        .dbname("postgres")
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let busy = tokio::spawn(async move {
        client
            .batch_execute(
                "do $$ begin
                   while clock_timestamp() < now() + interval '2 s' loop end loop;
                 end $$",
            )
            .await
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    // SAFETY: kill has no memory preconditions; the pid is our child, not reaped yet.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    while instance.health() == Health::Running {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }

    let mut again = fx.start(false).await;
    assert_eq!(again.health(), Health::Running);
    assert!(
        fx.log().contains("pre-existing shared memory block"),
        "the restart did not meet the leftover backend:\n{}",
        fx.log()
    );
    let _ = busy.await;
    again.stop().await.unwrap();
}

/// A server left running by a process that went away is adopted by the next one with the same
/// configuration: the same postmaster and data, its health watched through a pidfd, and a
/// clean stop. A configuration it does not run as (socket only) does not adopt it.
#[tokio::test]
async fn a_left_server_is_adopted_as_it_runs_and_stops_cleanly() {
    let fx = Fixture::setup();
    let server = fx.started(true).await;
    let pid = server.pid;
    server
        .execute("create table kept(x int); insert into kept values (7)")
        .await
        .unwrap();
    taidon_runtime::Instance::leave_running(Box::new(server));

    assert!(Engine::adopt(&fx.config(false)).await.unwrap().is_none());
    let mut adopted = Engine::adopt(&fx.config(true))
        .await
        .unwrap()
        .expect("the left server is adopted");
    assert_eq!(adopted.pid, pid);
    assert_eq!(adopted.health(), Health::Running);
    let client = adopted.connect_local().await.unwrap();
    let x: i32 = client
        .query_one("select x from kept", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(x, 7);
    drop(client);

    adopted.stop().await.unwrap();
    assert!(!fx.data_dir().join("postmaster.pid").exists());
    assert!(
        fx.log().contains("database system is shut down"),
        "{}",
        fx.log()
    );
    assert!(Engine::adopt(&fx.config(true)).await.unwrap().is_none());
}

/// An adopted server that dies is seen to have ended, though how is its parent's to know.
#[tokio::test]
async fn an_adopted_server_that_is_killed_reports_that_it_ended() {
    let fx = Fixture::setup();
    let server = fx.started(true).await;
    let pid = server.pid;
    taidon_runtime::Instance::leave_running(Box::new(server));
    let mut adopted = Engine::adopt(&fx.config(true)).await.unwrap().unwrap();
    // SAFETY: kill has no memory preconditions; the pid is the test's own child.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while adopted.health() == Health::Running {
        assert!(std::time::Instant::now() < deadline, "still running");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(
        adopted.health(),
        Health::Exited {
            status: Exit::Unknown
        }
    );
}
