//! `sqlrs --server`: every command against a server's API instead of the local daemon, the
//! token from the environment, a file or a profile, and the errors a user sees when the server
//! cannot be reached or its certificate cannot be verified. The server here is a real daemon
//! reached over its HTTP API from a client with another (empty) home, and a real TLS server
//! (`openssl s_server`) for the certificate errors.

mod common;

use std::fs;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::Env;

/// The API URL and token of the daemon in `server`'s home (started by `status`).
fn server_api(server: &Env) -> (String, String) {
    server.ok(&["status"]);
    let info: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(server.home.join("daemon.json")).unwrap())
            .unwrap();
    let token = fs::read_to_string(server.home.join("api.token")).unwrap();
    (
        info["api_url"].as_str().unwrap().to_owned(),
        token.trim().to_owned(),
    )
}

/// A client with its own home (never started) pointed at `url`.
fn client(url: &str, token: Option<&str>) -> Env {
    let mut env = Env::new();
    env.extra_env.push(("SQLRS_SERVER".into(), url.into()));
    if let Some(t) = token {
        env.extra_env.push(("SQLRS_TOKEN".into(), t.into()));
    }
    env
}

#[test]
fn every_command_works_the_same_against_a_server() {
    let server = Env::new();
    let (url, token) = server_api(&server);
    let c = client(&url, Some(&token));
    c.write("schema.sql", "\\ir lib/t.sql\n");
    c.write(
        "lib/t.sql",
        "create table t (x int); insert into t values (5);\n",
    );
    let r = c.ok(&[
        "prepare:psql",
        "-f",
        "schema.sql",
        "run:psql",
        "--",
        "-Atc",
        "select x from t",
    ]);
    assert_eq!(r.stdout.trim(), "5", "{}", r.describe());
    let r = c.ok(&["--json", "prepare:psql", "-f", "schema.sql"]);
    let v = r.json();
    assert_eq!(v["cache_hit"], true);
    assert_eq!(v["uploaded_bytes"], 0);
    let iid = v["instance_id"].as_str().unwrap().to_owned();
    let ls = c.ok(&["--json", "ls"]).json();
    assert!(ls["instances"]
        .as_array()
        .unwrap()
        .iter()
        .any(|i| i["instance_id"] == iid.as_str()));
    let dsn = c.ok(&["dsn", &iid, "--plain"]).stdout;
    assert!(dsn.starts_with("DSN=postgres://"), "{dsn}");
    c.ok(&["run:psql", "--instance", &iid, "--", "-c", "select 1"]);
    c.ok(&["rm", &iid]);
    let status = c.ok(&["--json", "status"]).json();
    assert_eq!(status["home"], server.home.display().to_string());
    // The client's own home was never used: no daemon started there.
    assert!(!c.home.join("daemon.json").exists());
    // shutdown is for the local daemon only.
    let r = c.fails(2, &["shutdown"]);
    assert!(
        r.stderr.contains("shutdown stops the local daemon"),
        "{}",
        r.describe()
    );
    server.ok(&["shutdown"]);
}

#[test]
fn tokens_come_from_a_file_or_a_profile_and_a_wrong_one_is_refused() {
    let server = Env::new();
    let (url, token) = server_api(&server);
    let c = Env::new();
    let token_file = c.write("team.token", &format!("{token}\n"));
    let r = c.run(&[
        "--server",
        &url,
        "--token-file",
        token_file.to_str().unwrap(),
        "ls",
    ]);
    assert_eq!(r.code, 0, "{}", r.describe());
    // A profile.
    let config = c.write(
        "config.toml",
        &format!(
            "[profiles.team]\nserver = \"{url}\"\ntoken_file = \"{}\"\n",
            token_file.display()
        ),
    );
    let mut p = Env::new();
    p.extra_env
        .push(("SQLRS_CONFIG".into(), config.display().to_string()));
    p.ok(&["--profile", "team", "ls"]);
    let r = p.fails(2, &["--profile", "other", "ls"]);
    assert!(
        r.stderr.contains("no profile \"other\""),
        "{}",
        r.describe()
    );
    assert!(r.stderr.contains("(profiles: team)"), "{}", r.describe());
    // No token at all: exit 2 before any request.
    let r = c.fails(2, &["--server", &url, "ls"]);
    assert!(r.stderr.contains("needs a token"), "{}", r.describe());
    // A wrong one: the server says 401; one line, exit 1.
    let wrong = client(&url, Some("not-the-token"));
    let r = wrong.fails(1, &["ls"]);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.describe());
    assert!(r.stderr.starts_with("sqlrs: "), "{}", r.describe());
    server.ok(&["shutdown"]);
}

#[test]
fn an_unreachable_server_is_one_line_naming_the_url_and_the_cause() {
    // A port nobody listens on.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let c = client(&url, Some("t"));
    let r = c.fails(1, &["ls"]);
    let lines: Vec<&str> = r.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{}", r.describe());
    assert!(
        lines[0].starts_with(&format!(
            "sqlrs: cannot reach the Taidon server at {url}/v1/"
        )),
        "{}",
        r.describe()
    );
    assert!(lines[0].contains("Connection refused"), "{}", r.describe());
}

/// `openssl s_server` on a free port with a self-signed certificate for 127.0.0.1.
struct TlsServer {
    child: Child,
    port: u16,
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn self_signed(dir: &std::path::Path, name: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
        ],
    );
}

/// A server certificate for 127.0.0.1 signed by the CA `ca`.
fn leaf(dir: &std::path::Path, ca: &str, name: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-addext",
            "basicConstraints=critical,CA:FALSE",
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
        ],
    );
}

fn tls_server(dir: &std::path::Path) -> TlsServer {
    self_signed(dir, "ca");
    leaf(dir, "ca", "server");
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new("openssl")
        .args(["s_server", "-quiet", "-www", "-accept"])
        .arg(port.to_string())
        .args(["-cert", "server.pem", "-key", "server.key"])
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl s_server");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "openssl s_server did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    TlsServer { child, port }
}

#[test]
fn a_tls_failure_says_which_ca_was_tried() {
    let dir = tempfile::tempdir().unwrap();
    let server = tls_server(dir.path());
    self_signed(dir.path(), "other");
    let url = format!("https://127.0.0.1:{}", server.port);
    let other = dir.path().join("other.pem");
    let c = client(&url, Some("t"));
    let r = c.fails(1, &["--ca", other.to_str().unwrap(), "ls"]);
    let lines: Vec<&str> = r.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{}", r.describe());
    assert!(
        lines[0].starts_with(&format!(
            "sqlrs: TLS to {url}/v1/states failed (CA tried: {})",
            other.display()
        )),
        "{}",
        r.describe()
    );
    // Without --ca: the system's roots, which do not know this self-signed server.
    let r = c.fails(1, &["ls"]);
    assert!(
        r.stderr.contains("(CA tried: the system's roots)"),
        "{}",
        r.describe()
    );
    // With the right CA, TLS works (openssl's page is not the API: an answer sqlrs cannot
    // read, which is past TLS).
    let right = dir.path().join("ca.pem");
    let r = c.run(&["--ca", right.to_str().unwrap(), "ls"]);
    assert!(!r.stderr.contains("TLS to"), "{}", r.describe());
    // A CA file that is not one.
    let junk = c.write("junk.pem", "not a certificate");
    let r = c.fails(1, &["--ca", junk.to_str().unwrap(), "ls"]);
    assert!(
        r.stderr.contains("cannot use the CA file"),
        "{}",
        r.describe()
    );
}
