//! A shared server across hosts, for real: network namespaces made by the test (as root) give
//! the controller, the gateway and two clients their own addresses. The clients' input files
//! live in a tmpfs inside each client's own mount namespace, which the server cannot see:
//! everything it builds comes from what the CLI uploads.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::netns::Net;
use common::{sqlrs_bin, taidon_bin, traversable_tempdir};

const API_PORT: u16 = 8443;
const GW_PORT: u16 = 6432;

fn pagila() -> PathBuf {
    let dir = std::env::var_os("PAGILA")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures/pagila")
        });
    assert!(
        dir.join("pagila-schema.sql").is_file(),
        "the pagila fixture is missing at {} (set PAGILA)",
        dir.display()
    );
    dir
}

/// A process that is killed and reaped when dropped, with its log shown on failure.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(mut cmd: Command, log: PathBuf) -> Self {
        let file = fs::File::create(&log).expect("log file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log"))
            .stderr(file)
            .spawn()
            .expect("spawn");
        Self { child, log }
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill has no memory preconditions; the child is not reaped yet.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    fn wait(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.signal(libc::SIGKILL);
            let _ = self.child.wait();
        }
    }
}

struct Hosts {
    net: Net,
    root: tempfile::TempDir,
    home: PathBuf,
    controller: Option<Proc>,
    gateway: Option<Proc>,
}

impl Hosts {
    fn new() -> Self {
        let net = Net::new(&["ctl", "gw", "cli", "cli2"]);
        let root = traversable_tempdir();
        let home = root.path().join("home");
        let mut h = Self {
            net,
            root,
            home,
            controller: None,
            gateway: None,
        };
        h.start_controller();
        h.wait_port("cli", &h.net.addr("ctl"), API_PORT);
        let gw_token = h.token(&["--sub", "gw1", "--gateway"]);
        let token_file = h.root.path().join("gw.token");
        fs::write(&token_file, gw_token).expect("token file");
        let gw_home = h.root.path().join("gateway");
        let mut cmd = h.net.command("gw", taidon_bin());
        cmd.args(["gateway", "--controller"])
            .arg(format!("https://{}:{API_PORT}", h.net.addr("ctl")))
            .arg("--ca")
            .arg(h.home.join("tls/ca.pem"))
            .arg("--token-file")
            .arg(&token_file)
            .arg("--home")
            .arg(&gw_home)
            .args(["--listen", &format!("{}:{GW_PORT}", h.net.addr("gw"))])
            .args(["--drain-s", "2"]);
        h.gateway = Some(Proc::spawn(cmd, h.root.path().join("gateway.log")));
        h.wait_port("cli", &h.net.addr("gw"), GW_PORT);
        h
    }

    fn start_controller(&mut self) {
        let mut cmd = self.net.command("ctl", taidon_bin());
        cmd.args(["controller", "--home"])
            .arg(&self.home)
            .args([
                "--api-listen",
                &format!("{}:{API_PORT}", self.net.addr("ctl")),
            ])
            .args([
                "--gateway-addr",
                &format!("{}:{GW_PORT}", self.net.addr("gw")),
            ])
            .args(["--instance-host", &self.net.addr("ctl")]);
        let n = fs::read_dir(self.root.path())
            .map(|d| d.count())
            .unwrap_or(0);
        self.controller = Some(Proc::spawn(
            cmd,
            self.root.path().join(format!("controller-{n}.log")),
        ));
    }

    /// Waits until `addr:port` accepts a connection from `host`.
    fn wait_port(&self, host: &str, addr: &str, port: u16) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ok = self
                .net
                .command(host, "bash")
                .args(["-c", &format!("exec 3<>/dev/tcp/{addr}/{port}")])
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{addr}:{port} did not open\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn token(&self, args: &[&str]) -> String {
        common::create_token(&self.home, args)
    }

    fn logs(&self) -> String {
        let mut out = String::new();
        for p in [&self.controller, &self.gateway].into_iter().flatten() {
            out.push_str(&format!("--- {}\n{}\n", p.log.display(), p.log()));
        }
        out
    }

    /// Runs `script` with bash on `host`, in a mount namespace of its own where `/inputs`
    /// (a directory of the test) is a fresh tmpfs: files written there exist for the client
    /// alone. `sqlrs` is on PATH, pointed at the server with `token`.
    fn client(&self, host: &str, token: &str, script: &str) -> Output {
        let inputs = self.root.path().join(format!("inputs-{host}"));
        fs::create_dir_all(&inputs).expect("mount point");
        let bin = sqlrs_bin();
        let path = format!(
            "{}:{}",
            bin.parent().expect("bin dir").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let full = format!(
            "set -e; mount -t tmpfs none {dir}; cd {dir}; {script}",
            dir = inputs.display()
        );
        self.net
            .command(host, "unshare")
            .args(["-m", "--propagation", "private", "bash", "-c", &full])
            .env("PATH", path)
            .env(
                "SQLRS_SERVER",
                format!("https://{}:{API_PORT}", self.net.addr("ctl")),
            )
            .env("SQLRS_TOKEN", token)
            .env("SQLRS_CA", self.home.join("tls/ca.pem"))
            .env(
                "SQLRS_HOME",
                self.root.path().join(format!("client-home-{host}")),
            )
            .env(
                "SQLRS_CACHE_DIR",
                self.root.path().join(format!("cache-{host}")),
            )
            .env("PAGILA", pagila())
            .env_remove("PGHOST")
            .env_remove("PGPORT")
            .env_remove("PGUSER")
            .env_remove("PGPASSWORD")
            .env_remove("DATABASE_URL")
            .output()
            .expect("client runs")
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        // The gateway and the controller go first (their Proc drops kill them); the
        // controller leaves its instances running for a next one, by design: stop the
        // postmasters of this test's home with a fast shutdown.
        self.gateway.take();
        self.controller.take();
        let home = format!("-D {}/", self.home.display());
        for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains("postgres ") && cmdline.contains(&home) {
                // SAFETY: kill has no memory preconditions.
                unsafe { libc::kill(pid, libc::SIGINT) };
            }
        }
    }
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

const CA: &str = "--ca \"$SQLRS_CA\"";

#[test]
fn pagila_through_a_standalone_gateway_from_two_client_hosts() {
    let h = Hosts::new();
    let alice = h.token(&["--sub", "alice"]);
    // The client copies pagila into its private tmpfs, and only there runs sqlrs.
    let copy = "cp \"$PAGILA\"/pagila-schema.sql \"$PAGILA\"/pagila-data.sql .";
    let out = h.client(
        "cli",
        &alice,
        &format!(
            "{copy}; sqlrs {CA} prepare:psql -f pagila-schema.sql -f pagila-data.sql \
             run:psql -- -Atc 'select count(*) from rental'"
        ),
    );
    assert!(out.status.success(), "{}\n{}", text(&out), h.logs());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "16044",
        "{}",
        text(&out)
    );

    // A second host with the same files: a cache hit, and not a byte uploaded.
    let out = h.client(
        "cli2",
        &alice,
        &format!("{copy}; sqlrs {CA} --json prepare:psql -f pagila-schema.sql -f pagila-data.sql"),
    );
    assert!(out.status.success(), "{}\n{}", text(&out), h.logs());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["cache_hit"], true, "{v:#}");
    assert_eq!(v["uploaded_bytes"], 0, "{v:#}");
    assert!(
        v["dsn"]
            .as_str()
            .expect("dsn")
            .contains(&format!("@{}:{GW_PORT}/", h.net.addr("gw"))),
        "{v:#}"
    );
}

#[test]
fn an_edited_include_rebuilds_only_its_step_across_hosts() {
    let h = Hosts::new();
    let bob = h.token(&["--sub", "bob"]);
    let setup = "mkdir -p lib data; \
                 printf 'create table t (x int);\\n' > lib/t.sql; \
                 printf '\\\\ir lib/t.sql\\n' > schema.sql; \
                 printf 'insert into t values (1);\\n' > data/rows.sql; \
                 printf '\\\\i data/rows.sql\\n' > seed.sql";
    let prepare = format!(
        "sqlrs {CA} prepare:psql -f schema.sql -f seed.sql run:psql -- -Atc 'select sum(x) from t'"
    );
    let out = h.client(
        "cli",
        &bob,
        &format!(
            "{setup}; {prepare}; printf 'insert into t values (41);\\n' >> data/rows.sql; {prepare}"
        ),
    );
    assert!(out.status.success(), "{}\n{}", text(&out), h.logs());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let sums: Vec<&str> = stdout.lines().collect();
    assert_eq!(sums, ["1", "42"], "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    // First run: both steps; second: only the seed, whose include changed.
    assert_eq!(
        stderr.matches("step 1/2 schema.sql").count(),
        1,
        "{}",
        text(&out)
    );
    assert_eq!(
        stderr.matches("step 2/2 seed.sql").count(),
        2,
        "{}",
        text(&out)
    );
}

#[test]
fn tokens_are_checked_across_hosts() {
    let h = Hosts::new();
    let alice = h.token(&["--sub", "alice"]);
    let bob = h.token(&["--sub", "bob"]);
    let out = h.client(
        "cli",
        &alice,
        &format!("sqlrs {CA} --json prepare:psql -c 'create table a (x int)'"),
    );
    assert!(out.status.success(), "{}\n{}", text(&out), h.logs());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let iid = v["instance_id"].as_str().expect("instance").to_owned();
    // Another user's instance: 403, one line, and it is still there.
    let out = h.client("cli2", &bob, &format!("sqlrs {CA} rm {iid}"));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{}", text(&out));
    let out = h.client("cli2", &bob, &format!("sqlrs {CA} --json ls"));
    let ls: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let inst = ls["instances"]
        .as_array()
        .expect("instances")
        .iter()
        .find(|i| i["instance_id"] == iid.as_str())
        .cloned()
        .expect("alice's instance is still there");
    assert_eq!(inst["owner"], "alice");
    // A wrong token: 401. The gateway's token used for a prepare: 403.
    let out = h.client("cli2", "tdn_wrong_token", &format!("sqlrs {CA} ls"));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let gw = fs::read_to_string(h.root.path().join("gw.token")).expect("gw token");
    let out = h.client(
        "cli2",
        gw.trim(),
        &format!("sqlrs {CA} prepare:psql -c 'select 1'"),
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
}

#[test]
fn a_controller_killed_mid_upload_leaves_no_partial_blob_and_the_retry_succeeds() {
    let mut h = Hosts::new();
    let carol = h.token(&["--sub", "carol"]);
    // 64 MiB of input at 100 Mbit/s: about five seconds on the wire.
    let dev = Command::new("ip")
        .args([
            "-n",
            h.net.namespace("cli"),
            "-o",
            "link",
            "show",
            "type",
            "veth",
        ])
        .output()
        .expect("ip link");
    let dev = String::from_utf8_lossy(&dev.stdout)
        .split(':')
        .nth(1)
        .map(|d| d.trim().split('@').next().unwrap_or_default().to_owned())
        .expect("the client's veth");
    let tc = Command::new("ip")
        .args([
            "netns",
            "exec",
            h.net.namespace("cli"),
            "tc",
            "qdisc",
            "add",
            "dev",
            &dev,
        ])
        .args([
            "root", "tbf", "rate", "100mbit", "burst", "64kb", "latency", "500ms",
        ])
        .status()
        .expect("tc");
    assert!(tc.success(), "tc could not shape the client's link");
    let big =
        "head -c 67108864 /dev/zero | tr '\\0' '-' > big.sql; printf '\\nselect 1;\\n' >> big.sql";
    let inputs = h.home.join("inputs");
    // The first attempt uploads while the controller is killed under it.
    let script = format!("{big}; sqlrs {CA} prepare:psql -f big.sql");
    let first = std::thread::scope(|s| {
        let hosts = &h;
        let handle = s.spawn(|| hosts.client("cli", &carol, &script));
        let deadline = Instant::now() + Duration::from_secs(60);
        let uploading = loop {
            let partial = fs::read_dir(&inputs)
                .map(|d| {
                    d.flatten()
                        .any(|e| e.file_name().to_string_lossy().starts_with(".upload-"))
                })
                .unwrap_or(false);
            if partial || Instant::now() > deadline {
                break partial;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        if let Some(c) = &hosts.controller {
            c.signal(libc::SIGKILL);
        }
        let out = handle.join().expect("client thread");
        assert!(
            uploading,
            "no upload was seen\n{}\n{}",
            text(&out),
            hosts.logs()
        );
        out
    });
    assert_eq!(first.status.code(), Some(1), "{}", text(&first));
    let said = String::from_utf8_lossy(&first.stderr);
    assert!(said.starts_with("sqlrs: "), "{}", text(&first));
    assert_eq!(said.lines().count(), 1, "{}", text(&first));
    // Nothing but the unfinished upload is in the blob store: no blob under its name.
    let blobs: Vec<String> = fs::read_dir(&inputs)
        .expect("inputs")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        blobs.iter().all(|b| b.starts_with(".upload-")),
        "a blob is visible after the crash: {blobs:?}"
    );
    // A new controller removes the leftover, and the retry succeeds.
    if let Some(mut c) = h.controller.take() {
        c.wait(Duration::from_secs(5));
    }
    h.start_controller();
    h.wait_port("cli", &h.net.addr("ctl"), API_PORT);
    let left: Vec<_> = fs::read_dir(&inputs).expect("inputs").flatten().collect();
    assert!(left.is_empty(), "{left:?}");
    let out = h.client(
        "cli",
        &carol,
        &format!("{big}; sqlrs {CA} --json prepare:psql -f big.sql"),
    );
    assert!(out.status.success(), "{}\n{}", text(&out), h.logs());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert!(
        v["uploaded_bytes"].as_u64().expect("bytes") > 64 << 20,
        "{v:#}"
    );
}

#[test]
fn sigterm_drains_the_gateway_then_ends_sessions_with_57p01() {
    let mut h = Hosts::new();
    let dave = h.token(&["--sub", "dave"]);
    let out = h.client(
        "cli",
        &dave,
        &format!("sqlrs {CA} --json prepare:psql -c 'select 1'"),
    );
    assert!(out.status.success(), "{}\n{}", text(&out), h.logs());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let dsn = v["dsn"].as_str().expect("dsn").to_owned();
    let mut session = Proc::spawn(
        {
            let mut c = h.net.command("cli", "psql");
            c.args([dsn.as_str(), "-c", "select pg_sleep(60)"]);
            c
        },
        h.root.path().join("session.log"),
    );
    // Let the session reach the server, then ask the gateway to stop.
    std::thread::sleep(Duration::from_millis(1500));
    let gateway = h.gateway.as_mut().expect("gateway");
    let asked = Instant::now();
    gateway.signal(libc::SIGTERM);
    let status = gateway
        .wait(Duration::from_secs(20))
        .expect("the gateway exits");
    assert_eq!(status.code(), Some(0), "{}", gateway.log());
    let ended = session
        .wait(Duration::from_secs(10))
        .expect("the session ends");
    assert!(!ended.success());
    assert!(
        asked.elapsed() >= Duration::from_secs(2),
        "the drain lasts 2 s"
    );
    let said = session.log();
    assert!(
        said.contains("terminating connection due to administrator command"),
        "{said}"
    );
}

#[test]
fn a_command_step_runs_on_the_client_host_through_the_standalone_gateway() {
    let h = Hosts::new();
    let carol = h.token(&["--sub", "carol"]);
    let dbmate = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/tools/node_modules/.bin/dbmate")
        .canonicalize()
        .expect("dbmate: run scripts/setup.sh (it installs tests/tools)");
    // The migrations exist in the client's private tmpfs only: the server never sees them,
    // and the command runs here, against the build server through the gateway.
    let setup = "mkdir -p db/migrations; \
                 printf -- '-- migrate:up\\ncreate table film (id int primary key);\\ninsert into film values (7);\\n-- migrate:down\\n' \
                 > db/migrations/20240101000000_films.sql";
    let out = h.client(
        "cli",
        &carol,
        &format!(
            "{setup}; sqlrs {CA} prepare:cmd --input db/migrations -- {} --no-dump-schema up \
             run:psql -- -Atc 'select id from film'",
            dbmate.display()
        ),
    );
    assert!(out.status.success(), "{}\n{}", text(&out), h.logs());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "7",
        "{}",
        text(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("running here"),
        "{}",
        text(&out)
    );
    // A command that cannot start on the client: the step fails. The same files and command
    // on another host: a cache hit that runs nothing.
    let out = h.client(
        "cli2",
        &carol,
        &format!(
            "{setup}; sqlrs {CA} --json prepare:cmd --input db/migrations -- /nonexistent/dbmate up"
        ),
    );
    assert!(!out.status.success(), "{}", text(&out));
    let out = h.client(
        "cli2",
        &carol,
        &format!(
            "{setup}; sqlrs {CA} --json prepare:cmd --input db/migrations -- {} --no-dump-schema up",
            dbmate.display()
        ),
    );
    assert!(out.status.success(), "{}\n{}", text(&out), h.logs());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["cache_hit"], true, "{v:#}");
}
