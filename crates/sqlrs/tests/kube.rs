//! The Kubernetes runtime end to end, against a FAKE API server (no Kubernetes API server can
//! run here) whose process kubelet runs each pod's real command: the real `taidon runner` in
//! every pod, real PostgreSQL, a real object store (moto), the real controller in Kubernetes
//! mode and the real gateway.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{pagila_dir, sqlrs_bin, taidon_bin, traversable_tempdir, Run};
use serde_json::Value;
use taidon_testkit::kube::FakeApiServer;
use taidon_testkit::s3::S3Server;

const NS: &str = "taidon";
const IMAGE: &str = "ghcr.io/taidon/runner:test";

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// A process killed and reaped when dropped.
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &str, mut cmd: Command, log: PathBuf) -> Self {
        let file = fs::File::create(&log).expect("log file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log"))
            .stderr(file)
            .spawn()
            .expect("spawn");
        Self {
            name: name.to_owned(),
            child,
            log,
        }
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A controller in Kubernetes mode.
struct Ctl {
    proc: Proc,
    home: PathBuf,
    api_url: String,
}

/// The fake cluster, the bucket, a controller and a gateway.
struct Cluster {
    root: tempfile::TempDir,
    s3: Option<S3Server>,
    api: FakeApiServer,
    kubeconfig: PathBuf,
    gateway_addr: String,
    ctl: Option<Ctl>,
    gateway: Option<Proc>,
    extra_logs: Vec<Proc>,
}

impl Cluster {
    fn new(test: &str) -> Self {
        let root = traversable_tempdir();
        let s3 = S3Server::moto(test).expect("moto_server is required (scripts/setup.sh)");
        s3.create_bucket("snaps");
        let api = FakeApiServer::start_blocking();
        api.with_binary("taidon", &taidon_bin());
        api.put_secret(
            NS,
            "taidon-object-store",
            BTreeMap::from([
                ("access_key_id".to_owned(), "testing".to_owned()),
                ("secret_access_key".to_owned(), "testing".to_owned()),
            ]),
        );
        let kubeconfig = root.path().join("kubeconfig");
        api.write_kubeconfig(&kubeconfig, NS).expect("kubeconfig");
        Self {
            root,
            s3: Some(s3),
            api,
            kubeconfig,
            gateway_addr: format!("127.0.0.1:{}", free_port()),
            ctl: None,
            gateway: None,
            extra_logs: Vec::new(),
        }
    }

    /// A home with `[store.remote]` on the bucket.
    fn home(&self, name: &str) -> PathBuf {
        self.home_with(name, "")
    }

    /// A home with `[store.remote]` on the bucket, and `extra` TOML.
    fn home_with(&self, name: &str, extra: &str) -> PathBuf {
        let home = self.root.path().join(name);
        fs::create_dir_all(&home).expect("home");
        let endpoint = self.s3.as_ref().expect("bucket").endpoint();
        fs::write(
            home.join("config.toml"),
            format!(
                "[lifecycle]\ntick_ms = 200\n\n[store.remote]\nurl = \"s3://snaps/team\"\n\
                 endpoint = \"{endpoint}\"\nallow_http = true\n{extra}"
            ),
        )
        .expect("config");
        home
    }

    fn controller_command(&self, home: &Path, identity: &str, api_port: u16) -> Command {
        let mut cmd = Command::new(taidon_bin());
        cmd.arg("controller")
            .arg("--home")
            .arg(home)
            .args(["--api-listen", &format!("127.0.0.1:{api_port}")])
            .args(["--gateway-addr", &self.gateway_addr])
            .args(["--runtime", "kubernetes", "--namespace", NS])
            .args(["--runner-image", IMAGE])
            .args(["--identity", identity, "--lease-duration-s", "3"])
            .args(["--pending-timeout-s", "30"])
            .env("KUBECONFIG", &self.kubeconfig)
            .env("TAIDON_LOG", "info,taidon_runtime_kube=debug")
            .env_remove("POD_NAMESPACE")
            .env_remove("POD_NAME");
        for (k, v) in taidon_testkit::s3::env_for(self.s3.as_ref().expect("bucket")) {
            cmd.env(k, v);
        }
        cmd
    }

    /// Starts the controller on `home` as `identity` and waits until it serves.
    fn start_controller(&mut self, home: &Path, identity: &str, api_port: u16) {
        let _ = fs::remove_file(home.join("daemon.json"));
        let cmd = self.controller_command(home, identity, api_port);
        let log = self
            .root
            .path()
            .join(format!("controller-{identity}-{}.log", free_port()));
        let proc = Proc::spawn(&format!("controller {identity}"), cmd, log);
        let ctl = Ctl {
            proc,
            home: home.to_path_buf(),
            api_url: format!("http://127.0.0.1:{api_port}"),
        };
        self.ctl = Some(ctl);
        self.wait_for(
            "the controller's daemon.json",
            Duration::from_secs(90),
            |c| {
                c.ctl
                    .as_ref()
                    .is_some_and(|c| c.home.join("daemon.json").exists())
            },
        );
    }

    fn start_gateway(&mut self) {
        let ctl = self.ctl.as_ref().expect("controller");
        let mut cmd = Command::new(taidon_bin());
        cmd.args(["gateway", "--listen", &self.gateway_addr])
            .args(["--controller", &ctl.api_url])
            .arg("--home")
            .arg(&ctl.home)
            .args(["--drain-s", "1"]);
        self.gateway = Some(Proc::spawn(
            "gateway",
            cmd,
            self.root.path().join("gateway.log"),
        ));
        let addr = self.gateway_addr.clone();
        self.wait_for("the gateway", Duration::from_secs(30), |_| {
            std::net::TcpStream::connect(&addr).is_ok()
        });
    }

    fn wait_for(&self, what: &str, timeout: Duration, mut f: impl FnMut(&Self) -> bool) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if f(self) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("timed out waiting for {what}\n{}", self.logs());
    }

    fn logs(&self) -> String {
        let mut out = String::new();
        let procs = self
            .ctl
            .iter()
            .map(|c| &c.proc)
            .chain(self.gateway.iter())
            .chain(self.extra_logs.iter());
        for p in procs {
            out.push_str(&format!("=== {}\n{}\n", p.name, p.log()));
        }
        for pod in self.api.pods(NS) {
            let name = pod["metadata"]["name"].as_str().unwrap_or("?").to_owned();
            out.push_str(&format!(
                "=== pod {name} ({})\n{}\n",
                pod["status"]["phase"],
                self.api.logs(&name)
            ));
        }
        out
    }

    /// `sqlrs ARGS` against the controller, as its admin.
    fn sqlrs(&self, args: &[&str]) -> Run {
        let ctl = self.ctl.as_ref().expect("controller");
        let token = fs::read_to_string(ctl.home.join("api.token")).expect("api.token");
        let work = self.root.path().join("work");
        fs::create_dir_all(&work).expect("work");
        let out = Command::new(sqlrs_bin())
            .args(args)
            .current_dir(&work)
            .env("SQLRS_SERVER", &ctl.api_url)
            .env("SQLRS_TOKEN", token.trim())
            .env("SQLRS_HOME", self.root.path().join("client-home"))
            .env("SQLRS_CACHE_DIR", self.root.path().join("client-cache"))
            .env_remove("PGHOST")
            .env_remove("PGPASSWORD")
            .env_remove("DATABASE_URL")
            .stdin(Stdio::null())
            .output()
            .expect("sqlrs");
        Run {
            cmd: format!("sqlrs {}", args.join(" ")),
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    fn sqlrs_ok(&self, args: &[&str]) -> Run {
        let r = self.sqlrs(args);
        assert_eq!(r.code, 0, "{}\n{}", r.describe(), self.logs());
        r
    }

    /// The pods of `role` (instance, build), by name.
    fn pods_of(&self, role: &str) -> Vec<Value> {
        self.api
            .pods(NS)
            .into_iter()
            .filter(|p| p["metadata"]["labels"]["taidon.dev/role"] == role)
            .collect()
    }
}

fn psql(dsn: &str, sql: &str) -> std::process::Output {
    Command::new("psql")
        .args([dsn, "-X", "-At", "-c", sql])
        .env_remove("PGPASSWORD")
        .output()
        .expect("psql")
}

fn psql_ok(c: &Cluster, dsn: &str, sql: &str) -> String {
    let out = psql(dsn, sql);
    assert!(
        out.status.success(),
        "psql {sql:?}: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        c.logs()
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn name_of(pod: &Value) -> String {
    pod["metadata"]["name"].as_str().expect("name").to_owned()
}

#[test]
fn pagila_in_runner_pods_a_killed_pod_a_restarted_controller_and_a_second_one_that_waits() {
    let mut c = Cluster::new("kube-pagila");
    let home = c.home("home");
    let api_port = free_port();
    c.start_controller(&home, "ctl-1", api_port);
    c.start_gateway();

    // The pagila chain, built in build pods and published from them to the bucket.
    let pagila = pagila_dir();
    let schema = pagila.join("pagila-schema.sql");
    let data = pagila.join("pagila-data.sql");
    let r = c.sqlrs_ok(&[
        "prepare:psql",
        "--",
        "-f",
        schema.to_str().expect("path"),
        "-f",
        data.to_str().expect("path"),
    ]);
    let dsn = r.dsn();
    assert_eq!(psql_ok(&c, &dsn, "select count(*) from rental"), "16044");
    let instances = c.pods_of("instance");
    assert_eq!(instances.len(), 1, "{instances:#?}");
    let pod = name_of(&instances[0]);
    assert!(
        instances[0]["status"]["podIP"]
            .as_str()
            .is_some_and(|ip| ip.starts_with("127.") && !ip.starts_with("127.0.0.")),
        "{:#}",
        instances[0]
    );
    c.wait_for("the build pods to go", Duration::from_secs(30), |c| {
        c.pods_of("build").is_empty()
    });
    let builds = c
        .api
        .requests()
        .iter()
        .filter(|(verb, resource)| verb == "create" && resource == "pods")
        .count();
    assert_eq!(
        builds, 4,
        "one pod each: the initdb, schema and data builds, the instance"
    );

    // Every series of the controller's metrics names the pod it runs in (its identity).
    let ctl = c.ctl.as_ref().expect("controller");
    let token = fs::read_to_string(ctl.home.join("api.token")).expect("api.token");
    let metrics = http_get(&format!("{}/metrics", ctl.api_url), token.trim());
    for line in [
        "taidon_states{pod=\"ctl-1\",presence=\"hot\"} 1",
        "taidon_builds_total{pod=\"ctl-1\",result=\"ok\"} 3",
        "taidon_instances{pod=\"ctl-1\",status=\"running\"} 1",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no {line:?} in\n{metrics}"
        );
    }

    // A killed runner: the next connection waits while a replacement starts, then works.
    assert!(c.api.kill_pod_process(&pod));
    let out = psql(&dsn, "select count(*) from rental");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        c.logs()
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "16044");
    let after_kill = c.pods_of("instance");
    assert_eq!(after_kill.len(), 1, "{after_kill:#?}");
    assert_ne!(
        after_kill[0]["metadata"]["uid"], instances[0]["metadata"]["uid"],
        "a new pod replaced the killed one"
    );
    let uid = after_kill[0]["metadata"]["uid"].clone();

    // A controller restart adopts the running pod: no new pod, the DSN still works.
    c.ctl.as_mut().expect("controller").proc.kill();
    let creates_before = c.api.requests().len();
    c.start_controller(&home, "ctl-1", api_port);
    assert_eq!(psql_ok(&c, &dsn, "select count(*) from film"), "1000");
    let adopted = c.pods_of("instance");
    assert_eq!(adopted.len(), 1, "{adopted:#?}");
    assert_eq!(adopted[0]["metadata"]["uid"], uid, "the pod was adopted");
    assert!(
        !c.api.requests()[creates_before..]
            .iter()
            .any(|(verb, resource)| verb == "create" && resource == "pods"),
        "the restarted controller created a pod"
    );

    // A second controller (another home, another replica) waits on the Lease...
    let home2 = c.home("home2");
    let api_port2 = free_port();
    let cmd = c.controller_command(&home2, "ctl-2", api_port2);
    let second = Proc::spawn(
        "controller ctl-2",
        cmd,
        c.root.path().join("controller-ctl-2.log"),
    );
    let waited = Instant::now();
    while !second
        .log()
        .contains("another controller holds the leader lease")
    {
        assert!(
            waited.elapsed() < Duration::from_secs(20),
            "the second controller did not wait:\n{}",
            second.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(4));
    assert!(
        !home2.join("daemon.json").exists(),
        "the second controller serves while the first holds the lease:\n{}",
        second.log()
    );
    // ... until the first is gone: then it takes over, and ends the pod it has no row for.
    c.ctl.as_mut().expect("controller").proc.kill();
    c.extra_logs.push(second);
    c.wait_for("the second controller", Duration::from_secs(60), |_| {
        home2.join("daemon.json").exists()
    });
    c.wait_for("the unadopted pod to go", Duration::from_secs(30), |c| {
        c.pods_of("instance").is_empty()
    });
}

/// The body of a plain-HTTP GET of `url` with a bearer token; panics unless it is a 200.
fn http_get(url: &str, token: &str) -> String {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").expect("http URL");
    let (host, path) = rest
        .split_once('/')
        .map_or((rest, "/".to_owned()), |(h, p)| (h, format!("/{p}")));
    let mut s = std::net::TcpStream::connect(host).expect("connect");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    )
    .expect("request");
    let mut response = String::new();
    s.read_to_string(&mut response).expect("response");
    let (head, body) = response.split_once("\r\n\r\n").expect("HTTP response");
    assert!(
        head.starts_with("HTTP/1.1 200"),
        "GET {url}: {head}\n{body}"
    );
    // axum answers a body of known length without chunking.
    body.to_owned()
}

/// Builds a small state, and gives its id.
fn small_state(c: &Cluster) -> String {
    let r = c.sqlrs_ok(&[
        "--json",
        "prepare:psql",
        "--",
        "-c",
        "create table t as select g from generate_series(1, 100) g",
    ]);
    r.json()["state_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no state_id: {}", r.describe()))
        .to_owned()
}

#[test]
fn a_missing_permission_names_the_verb_and_the_resource_and_publishes_nothing() {
    let mut c = Cluster::new("kube-rbac");
    c.api.deny("create", "pods");
    let home = c.home("home");
    c.start_controller(&home, "ctl-1", free_port());
    let r = c.sqlrs(&["prepare:psql", "--", "-c", "select 1"]);
    assert_ne!(r.code, 0, "{}", r.describe());
    let text = format!("{}{}", r.stdout, r.stderr);
    assert!(
        text.contains("cannot create pods") && text.contains("Role"),
        "{}\n{}",
        r.describe(),
        c.logs()
    );
    assert!(c.api.pods(NS).is_empty());
    let listed =
        c.s3.as_ref()
            .expect("bucket")
            .list("snaps", "team/manifests/");
    assert!(listed.is_empty(), "published: {listed:?}");
}

#[test]
fn an_unpullable_image_and_an_unreachable_bucket_are_the_instances_errors() {
    let mut c = Cluster::new("kube-bad");
    let home = c.home("home");
    c.start_controller(&home, "ctl-1", free_port());
    small_state(&c);

    // ImagePullBackOff: reported as the error, at once, not an endless STARTING.
    c.api.set_unpullable(IMAGE);
    let started = Instant::now();
    let r = c.sqlrs(&[
        "prepare:psql",
        "--",
        "-c",
        "create table t as select g from generate_series(1, 100) g",
    ]);
    assert_ne!(r.code, 0, "{}", r.describe());
    assert!(
        r.stderr.contains("ImagePullBackOff") || r.stderr.contains("ErrImagePull"),
        "{}\n{}",
        r.describe(),
        c.logs()
    );
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "took {:?}",
        started.elapsed()
    );
    // The prepare's own instance runs on; the failed pod is deleted.
    c.wait_for("the failed pod to go", Duration::from_secs(30), |c| {
        c.pods_of("instance").len() == 1
    });

    // The bucket unreachable from the runner: the pod fails with a clear line, and the
    // instance's error carries it.
    c.api.allow_pull(IMAGE);
    c.s3.take();
    let r = c.sqlrs(&[
        "prepare:psql",
        "--",
        "-c",
        "create table t as select g from generate_series(1, 100) g",
    ]);
    assert_ne!(r.code, 0, "{}", r.describe());
    assert!(
        r.stderr.contains("cannot restore state"),
        "{}\n{}",
        r.describe(),
        c.logs()
    );
}

/// Benchmark (bench/kube.sh): a hand-out from a pre-started standby pod vs a cold pod start
/// (restore plus postgres start), side by side in one run.
#[test]
#[ignore = "benchmark: bench/kube.sh"]
fn bench_standby_hand_out_vs_cold_pod_start() {
    let mut c = Cluster::new("kube-bench");
    // Standbys for pinned states only: the cold rounds get none.
    let home = c.home_with(
        "home",
        "\n[policy.standby]\npinned = 1\nbusy = 0\nother = 0\n",
    );
    c.start_controller(&home, "ctl-1", free_port());
    let pagila = pagila_dir();
    let schema = pagila.join("pagila-schema.sql");
    let data = pagila.join("pagila-data.sql");
    let prepare = [
        "--json",
        "prepare:psql",
        "--",
        "-f",
        schema.to_str().expect("path"),
        "-f",
        data.to_str().expect("path"),
    ];
    let sid = c.sqlrs_ok(&prepare).json()["state_id"]
        .as_str()
        .expect("state_id")
        .to_owned();
    let rounds = 3;
    let standbys =
        |c: &Cluster| c.sqlrs_ok(&["--json", "status"]).json()["standby_instances"].clone();
    let (mut cold, mut warm) = (Vec::new(), Vec::new());
    // Cold first, with no standby anywhere: the instance's pod restores pagila and starts
    // postgres.
    for _ in 0..rounds {
        assert_eq!(standbys(&c), 0, "a standby would make this a hand-out");
        let started = Instant::now();
        let r = c.sqlrs_ok(&prepare);
        cold.push(started.elapsed());
        let iid = r.json()["instance_id"].as_str().expect("iid").to_owned();
        c.sqlrs_ok(&["rm", &iid]);
    }
    // Then with the pool: warmup --hot keeps a standby, which the next prepare is handed.
    c.sqlrs_ok(&["warmup", "--hot", &sid]);
    for _ in 0..rounds {
        c.wait_for("a standby", Duration::from_secs(120), |c| standbys(c) == 1);
        let started = Instant::now();
        let r = c.sqlrs_ok(&prepare);
        warm.push(started.elapsed());
        let iid = r.json()["instance_id"].as_str().expect("iid").to_owned();
        c.sqlrs_ok(&["rm", &iid]);
    }
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let (cold_m, warm_m) = (median(&mut cold), median(&mut warm));
    println!(
        "pagila instance, fake cluster: cold pod start {:.0} ms, standby hand-out {:.0} ms, \
         ratio {:.1}x ({rounds} rounds, medians)",
        cold_m.as_secs_f64() * 1000.0,
        warm_m.as_secs_f64() * 1000.0,
        cold_m.as_secs_f64() / warm_m.as_secs_f64()
    );
}

/// The pagila chain on a real cluster, when `KUBECONFIG` is set; skipped otherwise, and
/// mandatory with `TAIDON_REQUIRE_KUBE=1`. The controller and the gateway run here with that
/// kubeconfig and must reach pod IPs (run it on a node of the cluster, or with a route to the
/// pod network). `TAIDON_KUBE_BUCKET` (`s3://bucket/prefix`), `TAIDON_KUBE_ENDPOINT`
/// (optional), `TAIDON_RUNNER_IMAGE` and `TAIDON_KUBE_NAMESPACE` (default `taidon`) say where;
/// the AWS credentials come from the environment here and from the namespace's
/// `taidon-object-store` Secret in the pods.
#[test]
fn real_cluster() {
    let Some(kubeconfig) = std::env::var_os("KUBECONFIG") else {
        assert!(
            std::env::var("TAIDON_REQUIRE_KUBE").as_deref() != Ok("1"),
            "TAIDON_REQUIRE_KUBE=1 but KUBECONFIG is not set"
        );
        eprintln!("real_cluster: skipped (KUBECONFIG is not set)");
        return;
    };
    let need = |name: &str| {
        std::env::var(name).unwrap_or_else(|_| panic!("{name} is required with KUBECONFIG"))
    };
    let bucket = need("TAIDON_KUBE_BUCKET");
    let image = need("TAIDON_RUNNER_IMAGE");
    let namespace = std::env::var("TAIDON_KUBE_NAMESPACE").unwrap_or_else(|_| "taidon".into());
    let root = traversable_tempdir();
    let home = root.path().join("home");
    fs::create_dir_all(&home).expect("home");
    let endpoint = std::env::var("TAIDON_KUBE_ENDPOINT")
        .map(|e| {
            format!(
                "endpoint = \"{e}\"\nallow_http = {}\n",
                e.starts_with("http://")
            )
        })
        .unwrap_or_default();
    fs::write(
        home.join("config.toml"),
        format!("[store.remote]\nurl = \"{bucket}\"\n{endpoint}"),
    )
    .expect("config");
    let (api_port, gw) = (free_port(), format!("127.0.0.1:{}", free_port()));
    let mut cmd = Command::new(taidon_bin());
    cmd.arg("controller")
        .arg("--home")
        .arg(&home)
        .args(["--api-listen", &format!("127.0.0.1:{api_port}")])
        .args(["--gateway-addr", &gw])
        .args(["--runtime", "kubernetes", "--namespace", &namespace])
        .args(["--runner-image", &image])
        .env("KUBECONFIG", &kubeconfig);
    let controller = Proc::spawn("controller", cmd, root.path().join("controller.log"));
    let deadline = Instant::now() + Duration::from_secs(120);
    while !home.join("daemon.json").exists() {
        assert!(Instant::now() < deadline, "{}", controller.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    let api_url = format!("http://127.0.0.1:{api_port}");
    let mut cmd = Command::new(taidon_bin());
    cmd.args(["gateway", "--listen", &gw, "--controller", &api_url])
        .arg("--home")
        .arg(&home);
    let gateway = Proc::spawn("gateway", cmd, root.path().join("gateway.log"));
    let token = fs::read_to_string(home.join("api.token")).expect("api.token");
    let pagila = pagila_dir();
    let out = Command::new(sqlrs_bin())
        .args(["prepare:psql", "--", "-f"])
        .arg(pagila.join("pagila-schema.sql"))
        .arg("-f")
        .arg(pagila.join("pagila-data.sql"))
        .env("SQLRS_SERVER", &api_url)
        .env("SQLRS_TOKEN", token.trim())
        .env("SQLRS_HOME", root.path().join("client"))
        .output()
        .expect("sqlrs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        controller.log(),
        gateway.log()
    );
    let dsn = stdout
        .lines()
        .find_map(|l| l.strip_prefix("DSN="))
        .expect("DSN");
    let count = psql(dsn, "select count(*) from rental");
    assert_eq!(String::from_utf8_lossy(&count.stdout).trim(), "16044");
}

#[test]
fn server_settings_reach_the_initdb_pod_and_every_instance() {
    let mut c = Cluster::new("kube-settings");
    let home = c.home("home");
    c.start_controller(&home, "ctl-1", free_port());
    c.start_gateway();
    let r = c.sqlrs_ok(&[
        "--json",
        "prepare:psql",
        "--pg-setting",
        "max_prepared_transactions=10",
        "--",
        "-c",
        "create table t (x int)",
    ]);
    let dsn = r.json()["dsn"].as_str().expect("dsn").to_owned();
    assert_eq!(psql_ok(&c, &dsn, "show max_prepared_transactions"), "10");
    // A value PostgreSQL refuses: its message, exit 2, and no pod was made for it.
    let pods = c.api.pods(NS).len();
    let r = c.sqlrs(&[
        "prepare:psql",
        "--pg-setting",
        "max_prepared_transactions=many",
        "--",
        "-c",
        "select 1",
    ]);
    assert_eq!(r.code, 2, "{}", r.describe());
    assert!(
        r.stderr
            .contains("invalid value for parameter \"max_prepared_transactions\""),
        "{}",
        r.describe()
    );
    assert_eq!(c.api.pods(NS).len(), pods);
}
