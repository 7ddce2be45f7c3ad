//! The daemon's life: autostart, SIGKILL at awkward moments, the split controller/gateway
//! layout, and a home on a copy-on-write file system.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{alive, postmasters_under, taidon_bin, wait_gone, Env};

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out waiting for {what}");
}

#[test]
fn sigkill_during_a_build_leaves_nothing_half_published() {
    let env = Env::new();
    env.write("schema.sql", "create table t(x int);\n");
    env.write(
        "slow.sql",
        "insert into t values (1);\nselect pg_sleep(30);\n",
    );
    env.ok(&[
        "prepare:psql",
        "--",
        "-f",
        "schema.sql",
        "run",
        "--",
        "true",
    ]);
    let pid = env.daemon_pid().expect("daemon pid");

    let mut client = env
        .command(&["prepare:psql", "--", "-f", "schema.sql", "-f", "slow.sql"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until the build's server runs, then kill the daemon under it.
    wait_for("the build server", Duration::from_secs(30), || {
        !postmasters_under(&env.home.join("snapshots")).is_empty()
    });
    let orphans = postmasters_under(&env.home.join("snapshots"));
    unsafe { libc::kill(pid, libc::SIGKILL) };
    assert!(wait_gone(pid, Duration::from_secs(10)));
    let _ = client.wait();
    assert!(
        !env.unpublished_snapshot_dirs().is_empty(),
        "the build was under way"
    );

    // The next command starts a new daemon, which discards the build and stops its server.
    let ls = env.ls();
    assert_ne!(env.daemon_pid(), Some(pid));
    assert!(
        env.unpublished_snapshot_dirs().is_empty(),
        "{:?}",
        env.unpublished_snapshot_dirs()
    );
    for orphan in orphans {
        assert!(
            wait_gone(orphan, Duration::from_secs(10)),
            "build server {orphan} survived"
        );
    }
    let states = ls["states"].as_array().unwrap();
    assert_eq!(
        states.iter().filter(|s| s["status"] == "WARM").count(),
        2,
        "{ls:#}"
    );
    // Its inputs are kept, so the interrupted state is COLD (rebuilt when asked for), with
    // the reason.
    let interrupted: Vec<_> = states.iter().filter(|s| s["status"] == "COLD").collect();
    assert_eq!(interrupted.len(), 1, "{ls:#}");
    assert!(
        interrupted[0]["status_reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("interrupted")),
        "{ls:#}"
    );

    // And the chain still builds afterwards, reusing the published step.
    env.write("slow.sql", "insert into t values (1);\n");
    let r = env.ok(&[
        "prepare:psql",
        "--",
        "-f",
        "schema.sql",
        "-f",
        "slow.sql",
        "run:psql",
        "--",
        "-Atc",
        "select count(*) from t",
    ]);
    assert_eq!(r.stdout.trim(), "1");
    assert!(!r.stderr.contains("step 1/2"), "{}", r.describe());
}

#[test]
fn sigkill_with_a_kept_instance_adopts_it_and_its_dsn_still_works() {
    let env = Env::new();
    env.write("schema.sql", "create table t(x int);\n");
    let v = env
        .ok(&["--json", "prepare:psql", "--", "-f", "schema.sql"])
        .json();
    let dsn = v["dsn"].as_str().unwrap().to_owned();
    let iid = v["instance_id"].as_str().unwrap().to_owned();
    let psql = |sql: &str| {
        let out = Command::new("psql")
            .args([dsn.as_str(), "-At", "-c", sql])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    psql("insert into t values (5)");
    let old_server = postmasters_under(&env.home.join("instances"));
    assert_eq!(old_server.len(), 1);

    let pid = env.daemon_pid().unwrap();
    unsafe { libc::kill(pid, libc::SIGKILL) };
    assert!(wait_gone(pid, Duration::from_secs(10)));
    // The orphaned server is still up until a new daemon deals with it.
    assert!(alive(old_server[0]));

    let r = env.ok(&[
        "run:psql",
        "--instance",
        &iid[..8],
        "--",
        "-Atc",
        "select sum(x) from t",
    ]);
    assert_eq!(r.stdout.trim(), "5", "{}", r.describe());
    // The new daemon took the server over as it ran: no restart.
    assert!(alive(old_server[0]));
    assert_eq!(
        postmasters_under(&env.home.join("instances")),
        old_server,
        "the old server, adopted by the new daemon"
    );
    // The DSN handed out before the crash still works: it names the gateway, not the server.
    assert_eq!(psql("select sum(x) from t"), "5");
}

#[test]
fn a_second_daemon_for_the_same_home_refuses_to_start() {
    let env = Env::new();
    env.ok(&["status"]);
    let out = Command::new(taidon_bin())
        .args(["local", "--home"])
        .arg(&env.home)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("another taidon daemon"));
    // The first one is unharmed.
    env.ok(&["status"]);
}

#[test]
fn controller_and_gateway_as_separate_processes() {
    let root = common::traversable_tempdir();
    let env = Env::in_home(root.path().join("home"), root);
    env.write(
        "schema.sql",
        "create table t(x int);\ninsert into t values (11);\n",
    );
    let gw_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let gateway_addr = format!("127.0.0.1:{gw_port}");
    let log = std::fs::File::create(env.work.join("controller.log")).unwrap();
    let mut controller = Command::new(taidon_bin())
        .args(["controller", "--home"])
        .arg(&env.home)
        .args(["--gateway-addr", &gateway_addr])
        .stderr(log)
        .spawn()
        .unwrap();
    wait_for("daemon.json", Duration::from_secs(30), || {
        env.home.join("daemon.json").exists()
    });
    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(env.home.join("daemon.json")).unwrap())
            .unwrap();
    let mut gateway = Command::new(taidon_bin())
        .args([
            "gateway",
            "--listen",
            &gateway_addr,
            "--controller",
            info["api_url"].as_str().unwrap(),
            "--home",
        ])
        .arg(&env.home)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for("the gateway", Duration::from_secs(10), || {
        std::net::TcpStream::connect(&gateway_addr).is_ok()
    });
    // sqlrs finds the running controller through the home and does not start its own.
    let r = env.ok(&[
        "prepare:psql",
        "--",
        "-f",
        "schema.sql",
        "run:psql",
        "--",
        "-Atc",
        "select x from t",
    ]);
    assert_eq!(r.stdout.trim(), "11", "{}", r.describe());
    assert_eq!(env.daemon_pid(), Some(controller.id() as i32));
    unsafe { libc::kill(gateway.id() as i32, libc::SIGINT) };
    let _ = gateway.wait();
    env.ok(&["shutdown"]);
    let _ = controller.wait();
}

#[test]
fn a_home_on_reflink_xfs_clones_by_reflink() {
    let Some(fs) = taidon_store::testing::cow_fs_or_skip("e2e reflink home", || {
        taidon_store::testing::LoopFs::xfs_reflink(1 << 30)
    }) else {
        return;
    };
    let home = fs.mount.join("home");
    let root = common::traversable_tempdir();
    let env = Env::in_home(home, root);
    env.write(
        "schema.sql",
        "create table t(x int);\ninsert into t values (3);\n",
    );
    let status = env.ok(&["--json", "status"]).json();
    assert_eq!(status["clone_strategy"], "reflink", "{status:#}");
    let r = env.ok(&[
        "prepare:psql",
        "--",
        "-f",
        "schema.sql",
        "run:psql",
        "--",
        "-Atc",
        "select x from t",
    ]);
    assert_eq!(r.stdout.trim(), "3");
    env.ok(&["shutdown"]);
    drop(env);
    drop(fs);
}
