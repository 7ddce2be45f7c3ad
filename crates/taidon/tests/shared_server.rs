//! A shared Taidon server, end to end with the real binaries and PostgreSQL: API tokens per
//! user (401, 403, owners, revocation), the gateway's token and public keys, a standalone
//! gateway that reads nothing from the controller's home (rotation without a restart, drain
//! on SIGTERM), a controller that leaves its instances to the next one, and the API over TLS
//! off loopback (a network namespace of the test's own).

use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

fn taidon() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_taidon"))
}

/// A temporary directory a server running as `postgres` can traverse.
fn traversable_tempdir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("taidon-shared-")
        .tempdir()
        .expect("tempdir");
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o711)).expect("chmod");
    dir
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

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

fn signal(child: &Child, sig: i32) {
    // SAFETY: kill has no memory preconditions; the child is not reaped yet.
    unsafe { libc::kill(child.id() as i32, sig) };
}

fn wait_exit(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// A `taidon` process logging to a file, killed if still running when dropped; its log is
/// printed if the test fails.
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &str, mut cmd: Command, log: PathBuf) -> Self {
        let out = fs::File::create(&log).expect("log file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Self {
            name: name.to_owned(),
            child,
            log,
        }
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("=== log of {}\n{}", self.name, self.log());
        }
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A controller on a home of its own.
struct Controller {
    proc: Proc,
    home: PathBuf,
    url: String,
    gateway_addr: String,
}

impl Controller {
    fn start(root: &Path, extra: &[&str]) -> Self {
        let home = root.join("home");
        let gateway_addr = format!("127.0.0.1:{}", free_port());
        Self::start_on(root, home, gateway_addr, extra, None)
    }

    fn start_on(
        root: &Path,
        home: PathBuf,
        gateway_addr: String,
        extra: &[&str],
        netns: Option<&str>,
    ) -> Self {
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(taidon());
                c
            }
            None => Command::new(taidon()),
        };
        cmd.arg("controller")
            .arg("--home")
            .arg(&home)
            .args(["--gateway-addr", &gateway_addr])
            .args(extra)
            .env("TAIDON_LOG", "info,taidon_controller=debug");
        let log = root.join(format!("controller-{}.log", free_port()));
        let proc = Proc::spawn("controller", cmd, log);
        let daemon_json = home.join("daemon.json");
        wait_for(
            "the controller's daemon.json",
            Duration::from_secs(60),
            || daemon_json.exists(),
        );
        let info: Value =
            serde_json::from_str(&fs::read_to_string(&daemon_json).expect("daemon.json"))
                .expect("daemon.json is JSON");
        Self {
            proc,
            url: info["api_url"].as_str().expect("api_url").to_owned(),
            home,
            gateway_addr,
        }
    }

    fn admin_token(&self) -> String {
        fs::read_to_string(self.home.join("api.token"))
            .expect("api.token")
            .trim()
            .to_owned()
    }

    /// `taidon token ARGS --home <home>`; its stdout.
    fn token_cmd(&self, args: &[&str]) -> String {
        let out = Command::new(taidon())
            .arg("token")
            .args(args)
            .arg("--home")
            .arg(&self.home)
            .output()
            .expect("taidon token");
        assert!(
            out.status.success(),
            "taidon token {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    fn create_token(&self, sub: &str, extra: &[&str]) -> String {
        let mut args = vec!["create", "--sub", sub];
        args.extend_from_slice(extra);
        self.token_cmd(&args)
    }
}

/// An HTTP client for the API (plain, or TLS trusting only `ca`).
struct Api {
    client: reqwest::Client,
    url: String,
}

impl Api {
    fn new(url: &str) -> Self {
        Self {
            client: reqwest::Client::new(),
            url: url.to_owned(),
        }
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> (u16, String) {
        let mut req = self
            .client
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("request");
        let status = resp.status().as_u16();
        (status, resp.text().await.expect("body"))
    }

    async fn get(&self, path: &str, token: &str) -> (u16, String) {
        self.call(reqwest::Method::GET, path, token, None).await
    }

    async fn post(&self, path: &str, token: &str, body: Value) -> (u16, String) {
        self.call(reqwest::Method::POST, path, token, Some(body))
            .await
    }

    async fn delete(&self, path: &str, token: &str) -> (u16, String) {
        self.call(reqwest::Method::DELETE, path, token, None).await
    }

    /// Prepares `sql` with an instance, as `token`'s user; the `done` event's instance.
    async fn prepare(&self, token: &str, sql: &str) -> Value {
        let body = json!({
            "steps": [{"kind": "psql", "input": {"type": "command", "sql": sql}}],
            "cwd": "/",
            "create_instance": true,
        });
        let (status, text) = self.post("/v1/prepare", token, body).await;
        assert_eq!(status, 200, "{text}");
        let done: Value = text
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|e| e["event"] == "done")
            .unwrap_or_else(|| panic!("no done event:\n{text}"));
        done["instance"].clone()
    }

    async fn dsn(&self, token: &str, target: &str) -> (u16, Value) {
        let (status, text) = self
            .post("/v1/dsn", token, json!({ "target": target }))
            .await;
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }
}

fn psql(dsn: &str, sql: &str) -> std::process::Output {
    Command::new("psql")
        .args([dsn, "-X", "-At", "-v", "VERBOSITY=verbose", "-c", sql])
        .env_remove("PGPASSWORD")
        .output()
        .expect("psql")
}

fn psql_ok(dsn: &str, sql: &str) -> String {
    let out = psql(dsn, sql);
    assert!(
        out.status.success(),
        "psql {sql:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The `kid` in a DSN's token header.
fn token_kid(dsn: &str) -> String {
    let token = dsn
        .split_once("sqlrs:")
        .and_then(|(_, rest)| rest.split_once('@'))
        .map(|(t, _)| t)
        .expect("token in the DSN");
    let header = token.split('.').next().expect("header");
    let bytes = base64url_decode(header);
    let v: Value = serde_json::from_slice(&bytes).expect("header JSON");
    v["kid"].as_str().expect("kid").to_owned()
}

fn base64url_decode(s: &str) -> Vec<u8> {
    let value = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'-' => 62,
            b'_' => 63,
            _ => panic!("not base64url: {c}"),
        }
    };
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes() {
        acc = (acc << 6) | value(c);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

/// Stops the servers a controller left running under `dir` (a controller that stops leaves
/// its instances to the next one), so none outlives the test's home.
struct StopServers(PathBuf);

impl Drop for StopServers {
    fn drop(&mut self) {
        for pid in postmasters_under(&self.0) {
            // SAFETY: kill has no memory preconditions.
            unsafe { libc::kill(pid, libc::SIGQUIT) };
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while !postmasters_under(&self.0).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_roles_owners_and_public_keys() {
    let root = traversable_tempdir();
    let _stop = StopServers(root.path().to_path_buf());
    let home = root.path().join("home");
    fs::create_dir_all(&home).unwrap();
    // A legacy HS256 secret stays accepted by the local gateway, but never leaves the home.
    let hs_secret = "5ecre75ecre75ecre75ecre75ecre75e";
    fs::write(home.join("gateway.key"), hs_secret).unwrap();
    let ctl = Controller::start(root.path(), &[]);
    let api = Api::new(&ctl.url);

    let alice = ctl.create_token("alice", &[]);
    let bob = ctl.create_token("bob", &[]);
    let boss = ctl.create_token("boss", &["--admin"]);
    let gw = ctl.create_token("gw1", &["--gateway"]);
    let short = ctl.create_token("shortlived", &["--ttl", "1s"]);
    assert!(alice.starts_with("tdn_"), "{alice}");

    // Wrong, missing, expired, revoked: 401.
    assert_eq!(api.get("/v1/states", "tdn_00_11").await.0, 401);
    assert_eq!(api.get("/v1/states", "").await.0, 401);
    assert_eq!(api.get("/v1/states", &alice).await.0, 200);
    std::thread::sleep(Duration::from_millis(1100));
    let (status, body) = api.get("/v1/states", &short).await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("expired"), "{body}");
    let carol = ctl.create_token("carol", &[]);
    assert_eq!(api.get("/v1/states", &carol).await.0, 200);
    let carol_id = carol.split('_').nth(1).unwrap().to_owned();
    ctl.token_cmd(&["revoke", &carol_id]);
    let (status, body) = api.get("/v1/states", &carol).await;
    assert_eq!(status, 401, "revoked at once: {body}");
    assert!(body.contains("revoked"), "{body}");
    let listed: Value = serde_json::from_str(&ctl.token_cmd(&["list", "--json"])).unwrap();
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 6, "{listed:?}");
    let secret = alice.rsplit('_').next().unwrap();
    assert!(!listed.iter().any(|t| t.to_string().contains(secret)));

    // The gateway's token: resolve, touch, release and the keys only.
    let prepare = json!({"steps": [], "cwd": "/", "create_instance": false});
    let (status, body) = api.post("/v1/prepare", &gw, prepare).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("\"kind\":\"forbidden\""), "{body}");
    assert_eq!(api.get("/v1/instances", &gw).await.0, 403);
    assert_eq!(api.post("/v1/shutdown", &gw, json!({})).await.0, 403);
    assert_eq!(
        api.post("/v1/touch", &gw, json!({"instance_ids": []}))
            .await
            .0,
        200
    );
    // A user may not ask where instances are (the answer holds their credentials), nor stop
    // the server.
    assert_eq!(
        api.post("/v1/touch", &alice, json!({"instance_ids": []}))
            .await
            .0,
        403
    );
    // The gateway's kept sessions (issue 12): its routes, not a user's.
    for route in ["/v1/park", "/v1/unpark"] {
        let body = json!({"instance_ids": []});
        assert_eq!(api.post(route, &gw, body.clone()).await.0, 200, "{route}");
        assert_eq!(api.post(route, &alice, body).await.0, 403, "{route}");
    }
    assert_eq!(api.post("/v1/shutdown", &alice, json!({})).await.0, 403);

    // GET /v1/keys: public Ed25519 keys only.
    let (status, keys_text) = api.get("/v1/keys", &gw).await;
    assert_eq!(status, 200, "{keys_text}");
    let keys: Value = serde_json::from_str(&keys_text).unwrap();
    let keyset: Value =
        serde_json::from_str(&fs::read_to_string(ctl.home.join("keyset.json")).unwrap()).unwrap();
    assert_eq!(keys["audience"], keyset["audience"]);
    assert_eq!(keys["current"], keyset["current"]);
    let kinds: Vec<&str> = keyset["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["alg"].as_str().unwrap())
        .collect();
    assert!(
        kinds.contains(&"HS256"),
        "the home has an HS256 key: {kinds:?}"
    );
    for k in keys["keys"].as_array().unwrap() {
        assert_eq!(k["alg"], "EdDSA", "{keys_text}");
        let fields: Vec<&String> = k.as_object().unwrap().keys().collect();
        assert_eq!(fields, ["alg", "kid", "public_hex"], "{keys_text}");
    }
    assert_eq!(keys["keys"].as_array().unwrap().len(), 1, "{keys_text}");
    for secret in keyset["keys"].as_array().unwrap().iter().flat_map(|k| {
        [&k["secret_hex"], &k["private_pkcs8_hex"]]
            .into_iter()
            .filter_map(|v| v.as_str())
    }) {
        assert!(!keys_text.contains(secret), "a secret in {keys_text}");
    }
    assert!(!keys_text.contains(&hex(hs_secret.as_bytes())));
    assert!(!keys_text.contains("secret") && !keys_text.contains("private"));

    // Owners: alice's instance is hers.
    let inst = api.prepare(&alice, "create table t(x int)").await;
    let iid = inst["instance_id"].as_str().unwrap().to_owned();
    assert_eq!(inst["owner"], "alice", "{inst:#}");
    let (status, list) = api.get("/v1/instances", &bob).await;
    assert_eq!(status, 200);
    let list: Value = serde_json::from_str(&list).unwrap();
    let seen = list
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["instance_id"] == iid.as_str())
        .expect("listed");
    assert_eq!(seen["owner"], "alice");
    assert_eq!(seen["dsn"], "", "no DSN of another user's instance");
    let (status, list) = api.get("/v1/instances", &alice).await;
    assert_eq!(status, 200);
    assert!(
        list.contains(&iid) && list.contains("postgres://"),
        "{list}"
    );

    // Bob can neither run against it, mint a DSN for it nor remove it: 403.
    let (status, body) = api.get(&format!("/v1/instances/{iid}"), &bob).await;
    assert_eq!(status, 403, "{body}");
    assert!(!body.contains("postgres://"), "{body}");
    let (status, body) = api.dsn(&bob, &iid[..8]).await;
    assert_eq!(status, 403, "{body}");
    let (status, body) = api.delete(&format!("/v1/instances/{iid}"), &bob).await;
    assert_eq!(status, 403, "{body}");
    let sid = inst["state_id"].as_str().unwrap().to_owned();
    let (status, _) = api
        .delete(&format!("/v1/states/{sid}?force=true"), &bob)
        .await;
    assert_eq!(status, 403, "force would remove alice's instance");
    // States are shared: an ro DSN of the state is anyone's.
    assert_eq!(api.dsn(&bob, &sid).await.0, 200);

    // Alice can; the admins can.
    assert_eq!(
        api.get(&format!("/v1/instances/{iid}"), &alice).await.0,
        200
    );
    let (status, d) = api.dsn(&alice, &iid).await;
    assert_eq!(status, 200, "{d}");
    assert_eq!(api.dsn(&boss, &iid).await.0, 200);
    let (status, body) = api
        .get(&format!("/v1/instances/{iid}"), &ctl.admin_token())
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = api.delete(&format!("/v1/instances/{iid}"), &boss).await;
    assert_eq!(status, 200, "{body}");

    // The home's own token is the admin; what it creates is the admin's.
    let mine = api
        .prepare(&ctl.admin_token(), "create table t(x int)")
        .await;
    assert_eq!(mine["owner"], "admin");
    let miid = mine["instance_id"].as_str().unwrap();
    assert_eq!(
        api.delete(&format!("/v1/instances/{miid}"), &alice).await.0,
        403
    );
    let (status, _) = api
        .post("/v1/shutdown", &ctl.admin_token(), json!({}))
        .await;
    assert_eq!(status, 200);
    let mut ctl = ctl;
    let status = wait_exit(&mut ctl.proc.child, Duration::from_secs(30)).expect("stopped");
    assert!(status.success(), "{status}");
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_gateway_rotation_drain_and_a_controller_that_leaves_its_instances() {
    let root = traversable_tempdir();
    let _stop = StopServers(root.path().to_path_buf());
    let ctl = Controller::start(root.path(), &[]);
    let api = Api::new(&ctl.url);
    let alice = ctl.create_token("alice", &[]);

    let (mut gateway, gw_dir) = spawn_gateway(
        root.path(),
        &ctl,
        // No polling within the test: a new key must be fetched because a token names it.
        &["--drain-s", "2", "--keys-poll-s", "3600"],
    );
    let addr = ctl.gateway_addr.clone();
    assert!(gateway.log().contains("keys fetched from the controller"));
    assert!(gw_dir.join("state/tls/server.pem").exists());

    let inst = api
        .prepare(&alice, "create table t(x int); insert into t values (7)")
        .await;
    let iid = inst["instance_id"].as_str().unwrap().to_owned();
    let dsn = inst["dsn"].as_str().unwrap().to_owned();
    assert_eq!(psql_ok(&dsn, "select 1"), "1");
    assert_eq!(psql_ok(&dsn, "select x from t"), "7");

    // A rotation: the controller picks the new key up and signs with it; the running gateway
    // fetches it the first time a token names it.
    let old_kid = token_kid(&dsn);
    let rotated = Command::new(taidon())
        .args(["rotate-keys", "--home"])
        .arg(&ctl.home)
        .output()
        .unwrap();
    assert!(rotated.status.success());
    let mut new_dsn = String::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let (status, d) = api.dsn(&alice, &iid).await;
        assert_eq!(status, 200, "{d}");
        new_dsn = d["dsn"].as_str().unwrap().to_owned();
        if token_kid(&new_dsn) != old_kid {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_ne!(
        token_kid(&new_dsn),
        old_kid,
        "the controller signs with the new key"
    );
    assert_eq!(psql_ok(&new_dsn, "select 1"), "1");
    assert!(
        gateway.log().contains("keys changed at the controller"),
        "{}",
        gateway.log()
    );
    // A DSN minted by a user names the user as its subject: the gateway logs it.
    assert!(gateway.log().contains("sub=alice"), "{}", gateway.log());
    // The old key stays accepted (it is the previous one).
    assert_eq!(psql_ok(&dsn, "select 2"), "2");

    // SIGTERM with a session open: new connections are refused at once, the session gets
    // 57P01 when the drain (2 s) is over, and the gateway exits 0.
    let mut session = Command::new("psql")
        .args([
            new_dsn.as_str(),
            "-X",
            "-v",
            "VERBOSITY=verbose",
            "-c",
            "select pg_sleep(60)",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = gateway.log.clone();
    wait_for("the session", Duration::from_secs(10), || {
        fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("client connected")
            .count()
            >= 5
    });
    std::thread::sleep(Duration::from_millis(300));
    let stopped_at = Instant::now();
    signal(&gateway.child, libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(300));
    let refused = std::net::TcpStream::connect(&addr);
    assert!(
        refused.is_err(),
        "new connections are refused while draining"
    );
    let out = psql(&new_dsn, "select 1");
    assert!(!out.status.success());
    let session_end = loop {
        if let Some(status) = session.try_wait().unwrap() {
            break (status, stopped_at.elapsed());
        }
        assert!(
            stopped_at.elapsed() < Duration::from_secs(15),
            "session not ended"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    session
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(!session_end.0.success());
    assert!(err.contains("57P01"), "{err}");
    assert!(
        session_end.1 >= Duration::from_millis(1800) && session_end.1 < Duration::from_secs(6),
        "ended after {:?}",
        session_end.1
    );
    let status = wait_exit(&mut gateway.child, Duration::from_secs(10)).expect("gateway exits");
    assert_eq!(status.code(), Some(0), "{}", gateway.log());

    // Nothing of the controller's home was read: the gateway's directory holds only its own.
    let mut names: Vec<String> = fs::read_dir(&gw_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["gateway.token", "state"]);

    // SIGTERM to the controller: it exits 0 and leaves the instance running; the next
    // controller adopts it.
    let postmaster = postmasters_under(&ctl.home.join("instances"));
    assert_eq!(postmaster.len(), 1);
    let mut ctl = ctl;
    signal(&ctl.proc.child, libc::SIGTERM);
    let status = wait_exit(&mut ctl.proc.child, Duration::from_secs(30)).expect("stopped");
    assert_eq!(status.code(), Some(0), "{}", ctl.proc.log());
    assert!(!ctl.home.join("daemon.json").exists());
    assert!(
        postmasters_under(&ctl.home.join("instances")) == postmaster,
        "the instance's server is still running"
    );
    let next = Controller::start_on(
        root.path(),
        ctl.home.clone(),
        ctl.gateway_addr.clone(),
        &[],
        None,
    );
    let api = Api::new(&next.url);
    let (status, body) = api.get(&format!("/v1/instances/{iid}"), &alice).await;
    assert_eq!(status, 200, "{body}");
    let info: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(info["status"], "running", "{info:#}");
    assert_eq!(info["owner"], "alice");
    assert!(next.proc.log().contains("adopted the running server"));
    assert_eq!(
        postmasters_under(&ctl.home.join("instances")),
        postmaster,
        "adopted as it ran, not started again"
    );
}

/// A controller that stops answering (SIGSTOP) does not hang the gateway: a new connection is
/// refused with 57P03's message once the gateway's bounded Resolve wait is over; an open session
/// goes on; once the controller continues, new connections work again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_controller_bounds_new_connections_and_open_sessions_go_on() {
    let root = traversable_tempdir();
    let _stop = StopServers(root.path().to_path_buf());
    let ctl = Controller::start(root.path(), &[]);
    let api = Api::new(&ctl.url);
    let alice = ctl.create_token("alice", &[]);
    let (_gateway, _) = spawn_gateway(root.path(), &ctl, &[]);
    let inst = api
        .prepare(&alice, "create table t(x int primary key)")
        .await;
    let dsn = inst["dsn"].as_str().unwrap().to_owned();
    let mut session = Session::open(&dsn);
    assert_eq!(session.query("insert into t values (1) returning x"), "1");

    signal(&ctl.proc.child, libc::SIGSTOP);
    assert_eq!(session.query("insert into t values (2) returning x"), "2");
    // A new connection ends on its own (the wait is bounded, 10 s), refused; it would hang
    // for as long as the controller is stopped otherwise.
    let mut refused = Command::new("psql")
        .args([dsn.as_str(), "-X", "-At", "-c", "select 1"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_exit(&mut refused, Duration::from_secs(60));
    let mut err = String::new();
    if status.is_some() {
        refused
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
    } else {
        let _ = refused.kill();
        let _ = refused.wait();
    }
    signal(&ctl.proc.child, libc::SIGCONT);
    let status = status.expect("a connection hung while the controller was stopped");
    assert!(!status.success());
    assert!(err.contains("not reachable right now"), "{err}");

    assert_eq!(session.query("insert into t values (3) returning x"), "3");
    let mut count = String::new();
    wait_for("a new connection", Duration::from_secs(20), || {
        let out = psql(&dsn, "select count(*) from t");
        count = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        out.status.success()
    });
    assert_eq!(count, "3");
    assert!(session.close(), "the session ends cleanly");
}

/// A controller killed and started again adopts the servers it left as they run: a session
/// open through a standalone gateway goes on while the controller is away and after it is
/// back; new connections get 57P03 while it is away and work again once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_go_on_across_a_controller_killed_and_back() {
    let root = traversable_tempdir();
    let _stop = StopServers(root.path().to_path_buf());
    let mut ctl = Controller::start(root.path(), &[]);
    let api = Api::new(&ctl.url);
    let alice = ctl.create_token("alice", &[]);
    let (_gateway, _) = spawn_gateway(root.path(), &ctl, &[]);
    let inst = api
        .prepare(&alice, "create table t(x int primary key)")
        .await;
    let iid = inst["instance_id"].as_str().unwrap().to_owned();
    let dsn = inst["dsn"].as_str().unwrap().to_owned();
    let mut session = Session::open(&dsn);
    assert_eq!(session.query("insert into t values (1) returning x"), "1");
    let servers = postmasters_under(&ctl.home.join("instances"));
    assert_eq!(servers.len(), 1);

    ctl.proc.child.kill().unwrap();
    ctl.proc.child.wait().unwrap();
    // Away: the open session goes on; a new connection is told to come back (57P03).
    assert_eq!(session.query("insert into t values (2) returning x"), "2");
    let refused = psql(&dsn, "select 1");
    assert!(!refused.status.success());
    // The gateway's message for 57P03 (libpq shows no SQLSTATE for a refused connection).
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("not reachable right now"), "{err}");

    // Back where the gateway looks for it; the killed one's daemon.json is stale.
    fs::remove_file(ctl.home.join("daemon.json")).unwrap();
    let listen = ctl.url.trim_start_matches("http://").to_owned();
    let next = Controller::start_on(
        root.path(),
        ctl.home.clone(),
        ctl.gateway_addr.clone(),
        &["--api-listen", &listen],
        None,
    );
    assert_eq!(next.url, ctl.url);
    let api = Api::new(&next.url);
    let (status, body) = api.get(&format!("/v1/instances/{iid}"), &alice).await;
    assert_eq!(status, 200, "{body}");
    let info: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(info["status"], "running", "{info:#}");
    assert_eq!(
        postmasters_under(&ctl.home.join("instances")),
        servers,
        "the server was adopted as it ran, not started again"
    );
    assert!(
        next.proc.log().contains("adopted the running server"),
        "{}",
        next.proc.log()
    );
    // Back: the same session goes on, and new connections work again.
    assert_eq!(session.query("insert into t values (3) returning x"), "3");
    let mut count = String::new();
    wait_for("a new connection", Duration::from_secs(20), || {
        let out = psql(&dsn, "select count(*) from t");
        count = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        out.status.success()
    });
    assert_eq!(count, "3");
    assert!(session.close(), "the session ends cleanly");

    // The adopted server is this controller's to stop: rm ends it and deletes its data.
    let (status, body) = api.delete(&format!("/v1/instances/{iid}"), &alice).await;
    assert_eq!(status, 200, "{body}");
    wait_for(
        "the adopted server to stop",
        Duration::from_secs(20),
        || postmasters_under(&ctl.home.join("instances")).is_empty(),
    );
}

/// A standalone gateway for `ctl` on its gateway address with `extra` flags, ready; and its own
/// directory, which holds its token and nothing of the controller's home.
fn spawn_gateway(root: &Path, ctl: &Controller, extra: &[&str]) -> (Proc, PathBuf) {
    let gw_dir = root.join("gateway");
    fs::create_dir_all(&gw_dir).unwrap();
    let token_file = gw_dir.join("gateway.token");
    fs::write(&token_file, ctl.create_token("gw1", &["--gateway"])).unwrap();
    let mut cmd = Command::new(taidon());
    cmd.args(["gateway", "--listen", &ctl.gateway_addr])
        .args(["--controller", &ctl.url])
        .arg("--token-file")
        .arg(&token_file)
        .arg("--home")
        .arg(gw_dir.join("state"))
        .args(extra)
        .env_remove("SQLRS_HOME");
    let gateway = Proc::spawn("gateway", cmd, root.join("gateway.log"));
    let addr = ctl.gateway_addr.clone();
    wait_for("the gateway", Duration::from_secs(20), || {
        std::net::TcpStream::connect(&addr).is_ok()
    });
    // It listens first, then fetches the keys and makes its TLS files.
    wait_for("the gateway to be ready", Duration::from_secs(20), || {
        gateway.log().contains("taidon gateway is ready")
    });
    (gateway, gw_dir)
}

/// A psql session held open, fed one statement at a time on its standard input.
struct Session {
    child: Child,
    stdin: std::process::ChildStdin,
    stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl Session {
    fn open(dsn: &str) -> Self {
        let mut child = Command::new("psql")
            .args([dsn, "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("psql");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        Self {
            child,
            stdin,
            stdout,
        }
    }

    /// The one-line answer to `sql`; panics with psql's error if the session has ended.
    fn query(&mut self, sql: &str) -> String {
        use std::io::{BufRead, Write};
        writeln!(self.stdin, "{sql};").expect("write to psql");
        self.stdin.flush().expect("flush");
        let mut line = String::new();
        let n = self.stdout.read_line(&mut line).expect("read from psql");
        if n == 0 {
            let mut err = String::new();
            if let Some(mut e) = self.child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            panic!("the session ended at {sql:?}: {err}");
        }
        line.trim().to_owned()
    }

    /// Ends the session; whether psql exited 0.
    fn close(mut self) -> bool {
        drop(self.stdin);
        self.child.wait().is_ok_and(|s| s.success())
    }
}

/// PIDs of the postmasters whose data directory is under `dir`.
fn postmasters_under(dir: &Path) -> Vec<i32> {
    let needle = dir.to_string_lossy().into_owned();
    let mut pids = Vec::new();
    for p in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = p.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let data = args
            .iter()
            .position(|a| a == "-D")
            .and_then(|i| args.get(i + 1));
        if args.first().is_some_and(|a| a.ends_with("/postgres"))
            && data.is_some_and(|d| d.starts_with(&needle))
        {
            pids.push(pid);
        }
    }
    pids.sort();
    pids
}

/// A network namespace joined to this one by a veth pair: `inside` is the namespace's address,
/// reached from here through the pair. Removed when dropped.
struct NetNs {
    name: String,
    link: String,
    inside: String,
}

impl NetNs {
    fn create() -> Option<Self> {
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return None;
        }
        let id = std::process::id() % 60;
        let ns = Self {
            name: format!("taidon-t{}", std::process::id()),
            link: format!("tdn{}a", std::process::id() % 100_000),
            // 198.18.0.0/15 is set aside for tests between networks; a /30 per test process.
            inside: format!("198.18.77.{}", id * 4 + 1),
        };
        let outside = format!("198.18.77.{}/30", id * 4 + 2);
        let peer = format!("{}b", &ns.link[..ns.link.len() - 1]);
        let inside_cidr = format!("{}/30", ns.inside);
        let steps: Vec<Vec<&str>> = vec![
            vec!["netns", "add", &ns.name],
            vec![
                "link", "add", &ns.link, "type", "veth", "peer", "name", &peer,
            ],
            vec!["link", "set", &peer, "netns", &ns.name],
            vec!["addr", "add", &outside, "dev", &ns.link],
            vec!["link", "set", &ns.link, "up"],
            vec!["-n", &ns.name, "addr", "add", &inside_cidr, "dev", &peer],
            vec!["-n", &ns.name, "link", "set", &peer, "up"],
            vec!["-n", &ns.name, "link", "set", "lo", "up"],
        ];
        for step in steps {
            let ok = Command::new("ip")
                .args(&step)
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                eprintln!("ip {step:?} failed: no network namespace for this test");
                return None;
            }
        }
        Some(ns)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.link])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_off_loopback_speaks_tls_with_the_homes_ca() {
    let Some(ns) = NetNs::create() else {
        if std::env::var_os("TAIDON_REQUIRE_COW").is_some() {
            panic!("as root this test must run: cannot make a network namespace");
        }
        eprintln!("skipped: needs root for a network namespace");
        return;
    };
    let root = traversable_tempdir();
    let _stop = StopServers(root.path().to_path_buf());
    let listen = format!("{}:8443", ns.inside);
    let mut ctl = Controller::start_on(
        root.path(),
        root.path().join("home"),
        "127.0.0.1:6432".into(),
        &["--api-listen", &listen],
        Some(&ns.name),
    );
    assert!(
        ctl.url.starts_with("http://127.0.0.1:"),
        "daemon.json keeps the loopback API for the local CLI: {}",
        ctl.url
    );
    let ca = fs::read(ctl.home.join("tls/ca.pem")).unwrap();
    let health = format!("http://{listen}/v1/health");

    // Plain HTTP is not served there.
    let plain = reqwest::Client::new()
        .get(&health)
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    assert!(
        plain.as_ref().map_or(true, |r| !r.status().is_success()),
        "plain HTTP answered: {plain:?}"
    );
    // HTTPS without trusting the CA fails; with it, it works.
    let https = format!("https://{listen}");
    let untrusting = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .build()
        .unwrap();
    assert!(untrusting
        .get(format!("{https}/v1/health"))
        .send()
        .await
        .is_err());
    let client = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .build()
        .unwrap();
    let resp = client
        .get(format!("{https}/v1/health"))
        .send()
        .await
        .expect("HTTPS with the home's CA");
    assert_eq!(resp.status().as_u16(), 200);
    let user = ctl.create_token("alice", &[]);
    let api = Api {
        client,
        url: https.clone(),
    };
    assert_eq!(api.get("/v1/states", &user).await.0, 200);
    assert_eq!(api.get("/v1/states", "tdn_0_0").await.0, 401);

    // A standalone gateway reaches it over TLS with --ca and fetches its keys.
    let gw_dir = root.path().join("gateway");
    fs::create_dir_all(&gw_dir).unwrap();
    fs::write(
        gw_dir.join("token"),
        ctl.create_token("gw1", &["--gateway"]),
    )
    .unwrap();
    fs::write(gw_dir.join("ca.pem"), &ca).unwrap();
    let mut cmd = Command::new(taidon());
    cmd.args(["gateway", "--listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--controller", &https])
        .arg("--token-file")
        .arg(gw_dir.join("token"))
        .arg("--ca")
        .arg(gw_dir.join("ca.pem"))
        .arg("--no-tls");
    let gateway = Proc::spawn("gateway", cmd, root.path().join("gateway.log"));
    wait_for("the gateway's keys", Duration::from_secs(20), || {
        gateway.log().contains("taidon gateway is ready")
    });
    assert!(gateway.log().contains("keys fetched from the controller"));

    signal(&ctl.proc.child, libc::SIGTERM);
    let status = wait_exit(&mut ctl.proc.child, Duration::from_secs(30)).expect("stopped");
    assert!(status.success());
}

/// One sample of a scrape, as the Prometheus project's own parser (Python
/// `prometheus_client.openmetrics.parser`) reads it.
#[derive(Debug)]
struct Sample {
    family: String,
    kind: String,
    name: String,
    labels: std::collections::BTreeMap<String, String>,
    value: f64,
}

const PARSE_METRICS: &str = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = []
for fam in text_string_to_metric_families(sys.stdin.read()):
    for s in fam.samples:
        out.append({"family": fam.name, "kind": fam.type, "name": s.name,
                    "labels": s.labels, "value": s.value})
print(json.dumps(out))
"#;

/// Parses an OpenMetrics scrape with a real Prometheus parser (a parse error fails the test).
fn parse_metrics(text: &str) -> Vec<Sample> {
    use std::io::Write;
    let mut child = Command::new("python3")
        .args(["-c", PARSE_METRICS])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("No module named 'prometheus_client"),
        "the Prometheus parser is missing: run scripts/setup.sh (pip install prometheus_client)"
    );
    assert!(
        out.status.success(),
        "the scrape does not parse: {stderr}\n{text}"
    );
    let parsed: Vec<Value> = serde_json::from_slice(&out.stdout).expect("parser output");
    let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    parsed
        .iter()
        .map(|s| Sample {
            family: text(&s["family"]),
            kind: text(&s["kind"]),
            name: text(&s["name"]),
            labels: s["labels"]
                .as_object()
                .map(|o| o.iter().map(|(k, v)| (k.clone(), text(v))).collect())
                .unwrap_or_default(),
            value: s["value"].as_f64().unwrap_or(f64::NAN),
        })
        .collect()
}

/// The value of the sample `name` whose labels include `labels`; 0 if there is none.
fn sample(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .sum()
}

fn family_kind<'a>(samples: &'a [Sample], family: &str) -> Option<&'a str> {
    samples
        .iter()
        .find(|s| s.family == family)
        .map(|s| s.kind.as_str())
}

async fn scrape(url: &str, token: Option<&str>) -> (u16, String, String) {
    let mut req = reqwest::Client::new().get(url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.expect("scrape");
    let status = resp.status().as_u16();
    let kind = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    (status, kind, resp.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_of_a_controller_and_a_standalone_gateway_after_real_work() {
    let root = traversable_tempdir();
    let _stop = StopServers(root.path().to_path_buf());
    let ctl_metrics = format!("127.0.0.1:{}", free_port());
    let ctl = Controller::start(root.path(), &["--metrics-listen", &ctl_metrics]);
    let api = Api::new(&ctl.url);
    let alice = ctl.create_token("alice", &[]);

    let gw_metrics = format!("127.0.0.1:{}", free_port());
    let (_gateway, _) = spawn_gateway(root.path(), &ctl, &["--metrics-listen", &gw_metrics]);

    // Real work: a build of two states (initdb and one step), an instance, two sessions, a
    // refused token and a failing query.
    let inst = api.prepare(&alice, "create table t(x int)").await;
    let dsn = inst["dsn"].as_str().unwrap().to_owned();
    psql_ok(&dsn, "insert into t values (1), (2)");
    assert_eq!(psql_ok(&dsn, "select count(*) from t"), "2");
    let (head, rest) = dsn.split_once("sqlrs:").unwrap();
    let (_, host) = rest.split_once('@').unwrap();
    let refused = psql(&format!("{head}sqlrs:not-a-token@{host}"), "select 1");
    assert!(!refused.status.success());

    // The API serves them to a token only; --metrics-listen to anyone.
    let (status, _, body) = scrape(&format!("{}/metrics", ctl.url), None).await;
    assert_eq!(status, 401, "{body}");
    let (status, kind, body) =
        scrape(&format!("{}/metrics", ctl.url), Some(&ctl.admin_token())).await;
    assert_eq!(status, 200, "{body}");
    assert!(kind.starts_with("application/openmetrics-text"), "{kind}");
    assert!(!body.contains(&ctl.admin_token()));
    parse_metrics(&body);
    let (status, _, body) = scrape(&format!("http://{ctl_metrics}/metrics"), None).await;
    assert_eq!(status, 200, "{body}");
    let c = parse_metrics(&body);
    for (family, kind) in [
        ("taidon_states", "gauge"),
        ("taidon_store_bytes", "gauge"),
        ("taidon_instances", "gauge"),
        ("taidon_builds", "counter"),
        ("taidon_build_seconds", "histogram"),
        ("taidon_restores", "counter"),
        ("taidon_standby_handouts", "counter"),
    ] {
        assert_eq!(family_kind(&c, family), Some(kind), "{family} in\n{body}");
    }
    assert_eq!(sample(&c, "taidon_builds_total", &[("result", "ok")]), 2.0);
    assert_eq!(sample(&c, "taidon_build_seconds_count", &[]), 2.0);
    assert!(sample(&c, "taidon_build_seconds_sum", &[]) > 0.0);
    assert_eq!(sample(&c, "taidon_states", &[("presence", "hot")]), 1.0);
    assert_eq!(sample(&c, "taidon_states", &[("presence", "warm")]), 1.0);
    assert_eq!(
        sample(&c, "taidon_instances", &[("status", "running")]),
        1.0
    );
    assert!(sample(&c, "taidon_store_bytes", &[("tier", "local")]) > 1e6);
    assert_eq!(
        sample(
            &c,
            "taidon_restores_total",
            &[("source", "local"), ("result", "ok")]
        ),
        1.0
    );
    assert_eq!(
        sample(&c, "taidon_standby_handouts_total", &[("result", "miss")]),
        1.0
    );
    // The gateway's are its own, on its own listener.
    assert_eq!(family_kind(&c, "taidon_gateway_connections"), None);

    let url = format!("http://{gw_metrics}/metrics");
    // A session is counted open until the gateway has seen its client leave.
    let mut g;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _, body) = scrape(&url, None).await;
        assert_eq!(status, 200, "{body}");
        g = parse_metrics(&body);
        if sample(&g, "taidon_gateway_active_connections", &[]) == 0.0 || Instant::now() > deadline
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(sample(&g, "taidon_gateway_active_connections", &[]), 0.0);
    assert_eq!(
        sample(
            &g,
            "taidon_gateway_connections_total",
            &[("result", "ok"), ("sqlstate", "00000")]
        ),
        2.0
    );
    assert_eq!(
        sample(
            &g,
            "taidon_gateway_connections_total",
            &[("result", "auth"), ("sqlstate", "28P01")]
        ),
        1.0
    );
    let up = sample(
        &g,
        "taidon_gateway_bytes_total",
        &[("direction", "client_to_server")],
    );
    let down = sample(
        &g,
        "taidon_gateway_bytes_total",
        &[("direction", "server_to_client")],
    );
    assert!(up > 50.0 && down > up, "up {up}, down {down}");
    assert_eq!(
        sample(&g, "taidon_gateway_handshake_seconds_count", &[]),
        2.0
    );
    assert_eq!(sample(&g, "taidon_resolve_seconds_count", &[]), 2.0);
    assert_eq!(
        family_kind(&g, "taidon_gateway_handshake_seconds"),
        Some("histogram")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn taidon_local_serves_the_gateways_metrics_with_the_controllers() {
    let root = traversable_tempdir();
    let _stop = StopServers(root.path().to_path_buf());
    let home = root.path().join("home");
    let mut cmd = Command::new(taidon());
    cmd.arg("local").arg("--home").arg(&home);
    let _daemon = Proc::spawn("taidon local", cmd, root.path().join("local.log"));
    let daemon_json = home.join("daemon.json");
    wait_for("daemon.json", Duration::from_secs(60), || {
        daemon_json.exists()
    });
    let info: Value = serde_json::from_str(&fs::read_to_string(&daemon_json).unwrap()).unwrap();
    let url = info["api_url"].as_str().unwrap().to_owned();
    let token = fs::read_to_string(home.join("api.token"))
        .unwrap()
        .trim()
        .to_owned();
    let api = Api::new(&url);
    let inst = api.prepare(&token, "select 1").await;
    let dsn = inst["dsn"].as_str().unwrap().to_owned();
    assert_eq!(psql_ok(&dsn, "select 1"), "1");
    let (status, _, body) = scrape(&format!("{url}/metrics"), Some(&token)).await;
    assert_eq!(status, 200, "{body}");
    let m = parse_metrics(&body);
    assert_eq!(sample(&m, "taidon_builds_total", &[("result", "ok")]), 2.0);
    assert_eq!(
        sample(&m, "taidon_gateway_connections_total", &[("result", "ok")]),
        1.0,
        "{body}"
    );
    assert_eq!(family_kind(&m, "taidon_resolve_seconds"), Some("histogram"));

    // The Grafana dashboard asks only for metrics that exist.
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/grafana/taidon.json");
    let dashboard: Value = serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().into_iter().flatten() {
            exprs.push(t["expr"].as_str().unwrap().to_owned());
        }
    }
    assert!(exprs.len() >= 10, "{exprs:?}");
    for expr in &exprs {
        for (at, _) in expr.match_indices("taidon_") {
            let name: String = expr[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            let family = ["_total", "_bucket", "_count", "_sum"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(&name);
            assert!(
                body.contains(&format!("# TYPE {family} ")),
                "the dashboard's {name} (in {expr}) is not served:\n{body}"
            );
        }
    }
}
