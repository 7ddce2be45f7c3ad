//! The open-file limit (`ulimit -n`) is respected: a daemon started under a low one takes as
//! many clients as it leaves room for, tells the next ones 53300 with the reason, and goes on.

mod common;

use std::os::unix::process::CommandExt;

use common::Env;

const NOFILE: u64 = 256;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_low_open_file_limit_bounds_clients_with_a_clear_error() {
    let env = Env::new();
    // The daemon `sqlrs` starts inherits the limit.
    let mut cmd = env.command(&[
        "--json",
        "prepare:psql",
        "--",
        "-c",
        "create table t(x int)",
    ]);
    // SAFETY: setrlimit is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: NOFILE,
                rlim_max: NOFILE,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().expect("sqlrs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let made: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let iid = made["instance_id"].as_str().expect("instance_id");
    let dsn = env.ok(&["--json", "dsn", iid]).json()["dsn_plain"]
        .as_str()
        .expect("dsn_plain")
        .to_owned();
    let limits =
        std::fs::read_to_string(format!("/proc/{}/limits", env.daemon_pid().expect("pid")))
            .expect("limits");
    assert!(
        limits.lines().any(|l| l.starts_with("Max open files")
            && l.split_whitespace().nth(3) == Some(&NOFILE.to_string())),
        "{limits}"
    );
    let max = taidon_gateway_budget();
    assert!(
        env.logs()
            .contains("leaves room for few client connections"),
        "{}",
        env.logs()
    );

    // More clients than it has room for, all at once, each holding its session.
    let mut held = Vec::new();
    let mut refused = Vec::new();
    for _ in 0..max + 10 {
        match tokio_postgres::connect(&dsn, tokio_postgres::NoTls).await {
            Ok((client, conn)) => {
                tokio::spawn(conn);
                held.push(client);
            }
            Err(e) => refused.push(e),
        }
    }
    assert_eq!(held.len(), max, "{refused:?}");
    assert_eq!(refused.len(), 10);
    for e in &refused {
        let db = e
            .as_db_error()
            .unwrap_or_else(|| panic!("not a server error: {e:?}"));
        assert_eq!(db.code().code(), "53300", "{db:?}");
        assert!(
            db.message().contains(&format!("at most {max}")) && db.message().contains("ulimit -n"),
            "{}",
            db.message()
        );
    }
    // Every session held still works, and once they go new clients get in again.
    for c in &held {
        assert_eq!(
            c.query_one("select 1", &[]).await.unwrap().get::<_, i32>(0),
            1
        );
    }
    drop(held);
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let (client, conn) = tokio_postgres::connect(&dsn, tokio_postgres::NoTls)
        .await
        .expect("a client after the others left");
    tokio::spawn(conn);
    client
        .execute("insert into t values (1)", &[])
        .await
        .unwrap();
    env.ok(&["status"]);
}

/// What the gateway's budget gives for [`NOFILE`] (see `taidon_gateway::fd_budget`): an eighth,
/// at least 128, plus 32 for refusals, stays; a quarter of the rest is for pooled sessions;
/// each client takes two.
fn taidon_gateway_budget() -> usize {
    let free = NOFILE as usize - (128 + 32);
    (free - free / 4) / 2
}
