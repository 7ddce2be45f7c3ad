//! `taidon_testing` against the real daemon: the `sqlrs` and `taidon` binaries built beside this
//! test (`cargo build --workspace`), in a temporary home, with a tiny recipe.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use taidon_testing::{Db, Error, Isolation, Lease};

/// A temporary home and work directory (with `sqlrs.toml`), its daemon shut down when dropped.
struct Env {
    _root: tempfile::TempDir,
    home: PathBuf,
    work: PathBuf,
    sqlrs: PathBuf,
    taidon: PathBuf,
}

/// `target/debug`, where `cargo build --workspace` puts `sqlrs` and `taidon`
/// (this test runs as `target/debug/deps/lease-…`).
fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("the test runs from target/<profile>/deps")
        .to_owned()
}

fn built_bin(name: &str) -> PathBuf {
    let bin = bin_dir().join(name);
    assert!(
        bin.exists(),
        "{} is missing: build the workspace first (cargo build --workspace)",
        bin.display()
    );
    bin
}

const PG_ENV: [&str; 6] = [
    "PGHOST",
    "PGPORT",
    "PGUSER",
    "PGPASSWORD",
    "PGDATABASE",
    "DATABASE_URL",
];

impl Env {
    fn new() -> Self {
        // Servers run as `postgres` when the tests run as root: the home's parents must be
        // traversable by it (and /root is not).
        let root = tempfile::Builder::new()
            .prefix("taidon-e2e-")
            .tempdir_in("/tmp")
            .expect("tempdir");
        fs::set_permissions(root.path(), fs::Permissions::from_mode(0o711)).expect("chmod");
        let home = root.path().join("home");
        let work = root.path().join("work");
        fs::create_dir_all(&work).expect("work dir");
        fs::write(
            work.join("sqlrs.toml"),
            "[recipes.tiny]\nprepare = [\"psql\", \"-f\", \"schema.sql\"]\n",
        )
        .expect("sqlrs.toml");
        fs::write(
            work.join("schema.sql"),
            "create table t(id int primary key, v text); insert into t values (1, 'seed');\n",
        )
        .expect("schema.sql");
        Self {
            _root: root,
            home,
            work,
            sqlrs: built_bin("sqlrs"),
            taidon: built_bin("taidon"),
        }
    }

    /// A lease of `what` through this env's `sqlrs`, home and work directory.
    fn lease(&self, what: &str) -> Lease {
        PG_ENV.iter().fold(
            Lease::new(what)
                .sqlrs(&self.sqlrs)
                .dir(&self.work)
                .env("SQLRS_HOME", &self.home)
                .env("TAIDON_BIN", &self.taidon),
            |lease, k| lease.env_remove(k),
        )
    }

    /// Takes a lease, failing the test with the server logs if it cannot.
    async fn acquire(&self, lease: Lease) -> Db {
        match lease.acquire().await {
            Ok(db) => db,
            Err(e) => panic!("{e}\n{}", self.logs()),
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.sqlrs);
        cmd.args(args)
            .current_dir(&self.work)
            .env("SQLRS_HOME", &self.home)
            .env("TAIDON_BIN", &self.taidon)
            .stdin(Stdio::null());
        for k in PG_ENV {
            cmd.env_remove(k);
        }
        cmd
    }

    /// Runs `sqlrs ARGS` directly, off the async runtime.
    async fn run(&self, args: &[&str]) -> Output {
        let mut cmd = tokio::process::Command::from(self.command(args));
        cmd.output().await.expect("run sqlrs")
    }

    /// The lease ids `sqlrs leases --json` lists.
    async fn leases(&self) -> Vec<String> {
        let out = self.run(&["leases", "--json"]).await;
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "sqlrs leases --json: {}\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let list: Vec<serde_json::Value> = serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("sqlrs leases --json is not a JSON array ({e}): {stdout}"));
        list.iter()
            .map(|l| l["lease"].as_str().expect("lease id").to_owned())
            .collect()
    }

    /// The last lines of every log under the home, for failure messages.
    fn logs(&self) -> String {
        taidon_testkit::log_tails(&self.home.join("logs"))
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- logs of {}\n{}", self.home.display(), self.logs());
        }
        if !self.home.exists() {
            return;
        }
        let _ = self.command(&["shutdown"]).output();
        // A daemon that did not stop would keep servers on a deleted home.
        if let Some(pid) = daemon_pid(&self.home) {
            let deadline = Instant::now() + Duration::from_secs(10);
            while alive(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            if alive(pid) {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
        }
    }
}

fn daemon_pid(home: &Path) -> Option<u32> {
    let text = fs::read_to_string(home.join("daemon.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["pid"].as_u64().and_then(|p| u32::try_from(p).ok())
}

fn alive(pid: u32) -> bool {
    // A zombie is gone for our purposes.
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z')),
        Err(_) => false,
    }
}

/// A plain client of the leased copy: `dsn` is a [`Db::dsn_plain`].
async fn connect(dsn: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(dsn, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    Ok(client)
}

/// A client over TLS that trusts only the daemon's CA ([`Db::ssl_root_cert`]): rustls checks
/// the chain and the gateway's address, as `sslmode=verify-full` does.
async fn connect_tls(db: &Db) -> tokio_postgres::Client {
    let ca = db.ssl_root_cert().expect("the daemon's gateway speaks TLS");
    let pem = fs::read(ca).unwrap_or_else(|e| panic!("{}: {e}", ca.display()));
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut &pem[..]) {
        roots.add(cert.expect("a PEM certificate")).expect("a CA");
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut cfg: tokio_postgres::Config = db.dsn_plain().parse().expect("a DSN");
    cfg.ssl_mode(tokio_postgres::config::SslMode::Require);
    let (client, conn) = cfg
        .connect(tokio_postgres_rustls::MakeRustlsConnect::new(config))
        .await
        .expect("connect over TLS");
    tokio::spawn(conn);
    client
}

/// `psql DSN -c SQL` (libpq takes [`Db::dsn`] as it is), its trimmed stdout.
async fn psql(dsn: &str, sql: &str) -> String {
    let out = tokio::process::Command::new("psql")
        .args([dsn, "-XAtc", sql])
        .env_remove("PGPASSWORD")
        .output()
        .await
        .expect("run psql");
    assert!(
        out.status.success(),
        "psql: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

async fn rows(client: &tokio_postgres::Client) -> Vec<(i32, String)> {
    client
        .query("select id, v from t order by id", &[])
        .await
        .expect("select from t")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

fn seed() -> Vec<(i32, String)> {
    vec![(1, "seed".to_owned())]
}

#[tokio::test]
async fn each_lease_is_a_fresh_copy_of_the_recipe() {
    let env = Env::new();
    let a = env.acquire(env.lease("tiny")).await;
    assert_eq!(a.isolation(), Isolation::Database);
    assert!(
        a.dsn().contains("sslmode=verify-full&sslrootcert="),
        "{}",
        a.dsn()
    );
    let ca = connect(a.dsn_plain()).await.expect("connect to lease a");
    assert_eq!(rows(&ca).await, seed());
    ca.execute("insert into t values (2, 'mine')", &[])
        .await
        .expect("insert");
    assert_eq!(rows(&ca).await.len(), 2);

    let b = env.acquire(env.lease("tiny")).await;
    assert_ne!(a.lease_id(), b.lease_id());
    assert_eq!(a.state_id(), b.state_id(), "one recipe, one state");
    assert_ne!(
        (a.instance_id(), a.database()),
        (b.instance_id(), b.database()),
        "two leases share a copy"
    );
    let cb = connect_tls(&b).await;
    assert_eq!(rows(&cb).await, seed(), "lease b sees lease a's insert");
    assert_eq!(
        psql(a.dsn(), "select string_agg(v, ',' order by id) from t").await,
        "seed,mine"
    );

    // The state id (and a prefix of it) leases the same state.
    let c = env.acquire(env.lease(&a.state_id()[..12])).await;
    assert_eq!(c.state_id(), a.state_id());
    let cc = connect(c.dsn_plain()).await.expect("connect to lease c");
    assert_eq!(rows(&cc).await, seed());
}

#[tokio::test]
async fn dropping_a_lease_releases_it() {
    let env = Env::new();
    let db = env
        .acquire(env.lease("tiny").ttl(Duration::from_secs(600)))
        .await;
    let id = db.lease_id().to_owned();
    let dsn = db.dsn_plain().to_owned();
    assert!(env.leases().await.contains(&id), "{id} is not listed");
    let client = connect(&dsn).await.expect("connect");
    assert_eq!(rows(&client).await, seed());
    drop(client);

    drop(db);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let listed = env.leases().await;
        if !listed.contains(&id) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{id} still listed 10 s after the drop: {listed:?}\n{}",
            env.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Its database is dropped in the background, right after the release.
    let deadline = Instant::now() + Duration::from_secs(10);
    while connect(&dsn).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "the released lease's DSN still connects 10 s after the drop\n{}",
            env.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn an_explicit_release_reports_and_happens_once() {
    let env = Env::new();
    let db = env.acquire(env.lease("tiny")).await;
    let id = db.lease_id().to_owned();
    db.release().await.expect("release");
    assert!(!env.leases().await.contains(&id), "{id} is still listed");

    let again = env.run(&["release", &id]).await;
    assert_eq!(
        again.status.code(),
        Some(2),
        "a second release of {id}: {}",
        String::from_utf8_lossy(&again.stderr)
    );
}

#[tokio::test]
async fn instance_isolation_gives_each_lease_its_own_instance() {
    let env = Env::new();
    let lease = || env.lease("tiny").isolation(Isolation::Instance);
    let a = env.acquire(lease()).await;
    let b = env.acquire(lease()).await;
    assert_eq!(a.isolation(), Isolation::Instance);
    assert_eq!(b.isolation(), Isolation::Instance);
    assert_ne!(a.instance_id(), b.instance_id());

    let ca = connect(a.dsn_plain()).await.expect("connect to lease a");
    ca.execute("create role only_in_a", &[])
        .await
        .expect("create role");
    let cb = connect(b.dsn_plain()).await.expect("connect to lease b");
    let roles = cb
        .query("select 1 from pg_roles where rolname = 'only_in_a'", &[])
        .await
        .expect("select roles");
    assert!(roles.is_empty(), "a role made in lease a shows in lease b");
    assert_eq!(rows(&cb).await, seed());
}

#[tokio::test]
async fn an_unknown_recipe_is_a_sqlrs_error_with_exit_code_2() {
    let env = Env::new();
    match env.lease("no-such-recipe").acquire().await {
        Err(Error::Sqlrs { code, stderr, .. }) => {
            assert_eq!(code, Some(2), "{stderr}");
            assert!(stderr.contains("no-such-recipe"), "{stderr}");
        }
        Err(other) => panic!("not a sqlrs failure: {other}"),
        Ok(db) => panic!("leased an unknown recipe: {db:?}"),
    }
}

#[tokio::test]
async fn a_missing_sqlrs_says_where_it_looked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("no-such-sqlrs");
    let err = Lease::new("tiny")
        .sqlrs(&missing)
        .dir(dir.path())
        .acquire()
        .await
        .expect_err("a missing sqlrs leased something");
    assert!(matches!(err, Error::SqlrsNotFound { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains(&missing.display().to_string()) && message.contains("SQLRS_BIN"),
        "{message}"
    );
}
