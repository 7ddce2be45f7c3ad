//! Fresh, isolated copies of a database state for Rust tests: a lease, given back when dropped.
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let db = taidon_testing::lease("pagila").await?; // a recipe name from sqlrs.toml, or a state id/prefix
//! let (client, conn) = tokio_postgres::connect(db.dsn_plain(), tokio_postgres::NoTls).await?;
//! tokio::spawn(conn);
//! client.execute("delete from film", &[]).await?; // nobody else sees it
//! // dropping `db` releases the lease (the copy is destroyed)
//! # Ok(()) }
//! ```
//!
//! The work is done by the `sqlrs` CLI (from `SQLRS_BIN`, else `sqlrs` on `PATH`): it finds or
//! starts the local daemon, resolves recipes from `sqlrs.toml` in the working directory or its
//! parents, builds a missing state once however many tests ask, and hands out the copies.
//!
//! [`Db::dsn`] verifies TLS with an `sslrootcert` (for libpq, psql, sqlx); tokio-postgres
//! takes neither, hence [`Db::dsn_plain`] above, or [`Db::ssl_root_cert`] for a TLS connector
//! of its own.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]
#![deny(clippy::todo, clippy::dbg_macro)]

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use serde::Deserialize;

/// A fresh copy of `what` (a recipe name from `sqlrs.toml`, or a state id or prefix), with the
/// default options of [`Lease`].
pub async fn lease(what: &str) -> Result<Db, Error> {
    Lease::new(what).acquire().await
}

/// How far one lease's copy is kept apart from the others'.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Isolation {
    /// A database of its own in an instance that other leases share (with their roles and
    /// server settings).
    #[default]
    Database,
    /// A whole PostgreSQL instance of its own.
    Instance,
}

impl Isolation {
    /// The name `sqlrs` knows it by: `database` or `instance`.
    pub fn as_str(self) -> &'static str {
        match self {
            Isolation::Database => "database",
            Isolation::Instance => "instance",
        }
    }
}

impl fmt::Display for Isolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Isolation {
    type Err = UnknownIsolation;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "database" => Ok(Isolation::Database),
            "instance" => Ok(Isolation::Instance),
            _ => Err(UnknownIsolation(s.to_owned())),
        }
    }
}

/// A string that names no [`Isolation`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown isolation {0:?}: expected database or instance")]
pub struct UnknownIsolation(pub String);

/// What went wrong taking or giving back a lease.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The `sqlrs` binary is not where it was looked for.
    #[error("sqlrs not found: tried {tried}; put sqlrs on PATH or set SQLRS_BIN to its path")]
    SqlrsNotFound { tried: String },
    /// The `sqlrs` binary is there but could not be started.
    #[error("cannot start {tried}")]
    Spawn {
        tried: String,
        #[source]
        source: io::Error,
    },
    /// `sqlrs` ran and failed: `code` is its exit code (2: bad input or not found), `None` when
    /// a signal ended it.
    #[error("`{command}` failed ({}): {stderr}", describe_exit(*code))]
    Sqlrs {
        command: String,
        code: Option<i32>,
        stderr: String,
    },
    /// `sqlrs` succeeded but printed something that is not a lease.
    #[error("`{command}` printed no lease ({source}): {output}")]
    BadOutput {
        command: String,
        #[source]
        source: serde_json::Error,
        output: String,
    },
}

fn describe_exit(code: Option<i32>) -> String {
    match code {
        Some(code) => format!("exit code {code}"),
        None => "killed by a signal".to_owned(),
    }
}

/// A lease to take: what to copy and how, then [`Lease::acquire`].
#[derive(Debug, Clone)]
pub struct Lease {
    what: String,
    isolation: Isolation,
    ttl: Option<Duration>,
    wait: Option<Duration>,
    sqlrs: Sqlrs,
}

impl Lease {
    /// A lease of `what`: a recipe name from `sqlrs.toml`, or a state id or prefix.
    pub fn new(what: impl Into<String>) -> Self {
        Self {
            what: what.into(),
            isolation: Isolation::default(),
            ttl: None,
            wait: None,
            sqlrs: Sqlrs::default(),
        }
    }

    /// How far the copy is kept apart from other leases' ([`Isolation::Database`] unless set).
    pub fn isolation(mut self, isolation: Isolation) -> Self {
        self.isolation = isolation;
        self
    }

    /// How long the lease lives if never released (whole seconds, rounded up); the server's
    /// default unless set.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// How long to wait for a copy when none is ready (whole seconds, rounded up); the
    /// server's default unless set.
    pub fn wait(mut self, wait: Duration) -> Self {
        self.wait = Some(wait);
        self
    }

    /// The `sqlrs` binary to run, instead of `SQLRS_BIN` or `sqlrs` on `PATH`.
    pub fn sqlrs(mut self, path: impl Into<PathBuf>) -> Self {
        self.sqlrs.program = Some(path.into());
        self
    }

    /// The directory `sqlrs` runs in, where `sqlrs.toml` is looked up (the current one unless
    /// set).
    pub fn dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.sqlrs.dir = Some(dir.into());
        self
    }

    /// An environment variable for `sqlrs` (such as `SQLRS_HOME`), also when it releases.
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.sqlrs
            .env
            .push((key.as_ref().to_owned(), Some(value.as_ref().to_owned())));
        self
    }

    /// An environment variable `sqlrs` must not inherit (such as `PGHOST`).
    pub fn env_remove(mut self, key: impl AsRef<OsStr>) -> Self {
        self.sqlrs.env.push((key.as_ref().to_owned(), None));
        self
    }

    /// Takes the lease: runs `sqlrs lease … --json` and waits for the copy.
    pub async fn acquire(self) -> Result<Db, Error> {
        let mut args: Vec<OsString> = vec![
            "lease".into(),
            "--isolation".into(),
            self.isolation.as_str().into(),
        ];
        if let Some(ttl) = self.ttl {
            args.extend(["--ttl".into(), seconds(ttl).into()]);
        }
        if let Some(wait) = self.wait {
            args.extend(["--wait".into(), seconds(wait).into()]);
        }
        args.extend(["--json".into(), "--".into(), self.what.clone().into()]);
        let command = self.sqlrs.describe(&args);
        let output = self
            .sqlrs
            .command(&args)
            .output()
            .await
            .map_err(|e| self.sqlrs.spawn_error(e))?;
        check(&command, output.status, &output.stderr)?;
        let info: LeaseInfo =
            serde_json::from_slice(&output.stdout).map_err(|source| Error::BadOutput {
                command,
                source,
                output: String::from_utf8_lossy(&output.stdout).trim().to_owned(),
            })?;
        Ok(Db {
            dsn_plain: plain_dsn(&info.dsn),
            ssl_root_cert: ssl_root_cert(&info.dsn),
            info,
            sqlrs: self.sqlrs,
            released: false,
        })
    }
}

/// `90s`: the form `sqlrs` takes, never rounding a short duration down to none.
fn seconds(d: Duration) -> String {
    let s = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    format!("{s}s")
}

fn check(command: &str, status: ExitStatus, stderr: &[u8]) -> Result<(), Error> {
    if status.success() {
        return Ok(());
    }
    Err(Error::Sqlrs {
        command: command.to_owned(),
        code: status.code(),
        stderr: String::from_utf8_lossy(stderr).trim().to_owned(),
    })
}

/// `dsn` with `sslmode=disable` in place of its `sslmode` and `sslrootcert`, its other
/// parameters kept.
fn plain_dsn(dsn: &str) -> String {
    let (base, query) = dsn.split_once('?').unwrap_or((dsn, ""));
    let mut params: Vec<&str> = query
        .split('&')
        .filter(|p| !p.is_empty() && !p.starts_with("sslmode=") && !p.starts_with("sslrootcert="))
        .collect();
    params.push("sslmode=disable");
    format!("{base}?{}", params.join("&"))
}

/// The `sslrootcert` parameter of `dsn`, percent-decoded.
fn ssl_root_cert(dsn: &str) -> Option<PathBuf> {
    let (_, query) = dsn.split_once('?')?;
    let value = query
        .split('&')
        .find_map(|p| p.strip_prefix("sslrootcert="))?;
    Some(PathBuf::from(percent_decode(value)))
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .filter(|_| bytes[i] == b'%')
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match hex {
            Some(b) => {
                out.push(b);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The fields of `sqlrs lease --json` this crate reads.
#[derive(Debug, Deserialize)]
struct LeaseInfo {
    lease: String,
    state_id: String,
    isolation: Isolation,
    dsn: String,
    instance_id: String,
    database: String,
    waited_ms: u64,
}

/// How to run `sqlrs`: kept by a [`Db`] to release it the way it was taken.
#[derive(Debug, Clone, Default)]
struct Sqlrs {
    program: Option<PathBuf>,
    dir: Option<PathBuf>,
    /// `None` removes the variable.
    env: Vec<(OsString, Option<OsString>)>,
}

impl Sqlrs {
    /// The binary, and how it was chosen (for error messages).
    fn program(&self) -> (PathBuf, String) {
        if let Some(p) = &self.program {
            return (p.clone(), p.display().to_string());
        }
        match std::env::var_os("SQLRS_BIN").filter(|v| !v.is_empty()) {
            Some(p) => {
                let p = PathBuf::from(p);
                let tried = format!("{} (from SQLRS_BIN)", p.display());
                (p, tried)
            }
            None => (PathBuf::from("sqlrs"), "`sqlrs` on PATH".to_owned()),
        }
    }

    fn std_command(&self, args: &[OsString]) -> std::process::Command {
        let mut cmd = std::process::Command::new(self.program().0);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(dir) = &self.dir {
            cmd.current_dir(dir);
        }
        for (k, v) in &self.env {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        cmd
    }

    fn command(&self, args: &[OsString]) -> tokio::process::Command {
        tokio::process::Command::from(self.std_command(args))
    }

    fn spawn_error(&self, source: io::Error) -> Error {
        let tried = self.program().1;
        match &self.dir {
            // A missing working directory fails the spawn with NotFound too: say which.
            Some(dir) if !dir.is_dir() => Error::Spawn {
                tried,
                source: io::Error::new(
                    source.kind(),
                    format!("working directory {}: {source}", dir.display()),
                ),
            },
            _ if source.kind() == io::ErrorKind::NotFound => Error::SqlrsNotFound { tried },
            _ => Error::Spawn { tried, source },
        }
    }

    fn describe(&self, args: &[OsString]) -> String {
        let mut s = String::from("sqlrs");
        for a in args {
            s.push(' ');
            s.push_str(&a.to_string_lossy());
        }
        s
    }
}

/// A leased copy: connect with [`Db::dsn`]; dropping it releases the lease.
pub struct Db {
    info: LeaseInfo,
    dsn_plain: String,
    ssl_root_cert: Option<PathBuf>,
    sqlrs: Sqlrs,
    released: bool,
}

impl Db {
    /// The connection string of the copy as `sqlrs` gave it: TLS verified against the
    /// daemon's CA (`sslmode=verify-full&sslrootcert=…`) when the gateway speaks TLS, for
    /// libpq, psql and sqlx. Its password is a token for this copy only.
    pub fn dsn(&self) -> &str {
        &self.info.dsn
    }

    /// [`Db::dsn`] with `sslmode=disable` and no `sslrootcert`, for clients that take neither
    /// (tokio-postgres with `NoTls`): the token crosses the network unencrypted, which suits a
    /// local daemon on loopback.
    pub fn dsn_plain(&self) -> &str {
        &self.dsn_plain
    }

    /// The CA file [`Db::dsn`] verifies the gateway against (its `sslrootcert`), for a client
    /// that brings its own TLS connector; `None` when the gateway speaks no TLS.
    pub fn ssl_root_cert(&self) -> Option<&Path> {
        self.ssl_root_cert.as_deref()
    }

    /// The lease's id, as `sqlrs leases` and `sqlrs release` know it.
    pub fn lease_id(&self) -> &str {
        &self.info.lease
    }

    /// The id of the state this is a copy of.
    pub fn state_id(&self) -> &str {
        &self.info.state_id
    }

    /// The instance the copy lives in (shared with other leases under [`Isolation::Database`]).
    pub fn instance_id(&self) -> &str {
        &self.info.instance_id
    }

    /// The copy's database name.
    pub fn database(&self) -> &str {
        &self.info.database
    }

    /// How far the copy is kept apart from other leases'.
    pub fn isolation(&self) -> Isolation {
        self.info.isolation
    }

    /// How long taking the lease waited for a ready copy.
    pub fn waited(&self) -> Duration {
        Duration::from_millis(self.info.waited_ms)
    }

    /// Releases the lease now (the copy is destroyed), reporting what dropping would not.
    pub async fn release(mut self) -> Result<(), Error> {
        let args = self.release_args();
        let command = self.sqlrs.describe(&args);
        let child = self
            .sqlrs
            .command(&args)
            .spawn()
            .map_err(|e| self.sqlrs.spawn_error(e))?;
        // From here `sqlrs release` runs to its end even if this future is dropped.
        self.released = true;
        let output = child
            .wait_with_output()
            .await
            .map_err(|e| self.sqlrs.spawn_error(e))?;
        check(&command, output.status, &output.stderr)
    }

    fn release_args(&self) -> Vec<OsString> {
        vec!["release".into(), self.info.lease.clone().into()]
    }
}

impl fmt::Debug for Db {
    // Not the DSN: its password is a token.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Db")
            .field("lease", &self.info.lease)
            .field("state_id", &self.info.state_id)
            .field("isolation", &self.info.isolation)
            .field("instance_id", &self.info.instance_id)
            .field("database", &self.info.database)
            .finish_non_exhaustive()
    }
}

impl Drop for Db {
    /// Starts `sqlrs release` and reaps it on a thread of its own: a drop inside an async test
    /// never blocks the runtime. A failure here goes unreported (the lease still expires);
    /// [`Db::release`] reports it.
    fn drop(&mut self) {
        if self.released {
            return;
        }
        let mut cmd = self.sqlrs.std_command(&self.release_args());
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
        if let Ok(mut child) = cmd.spawn() {
            std::thread::spawn(move || child.wait());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_whole_seconds_rounded_up() {
        assert_eq!(seconds(Duration::from_secs(600)), "600s");
        assert_eq!(seconds(Duration::from_millis(1500)), "2s");
        assert_eq!(seconds(Duration::from_millis(1)), "1s");
        assert_eq!(seconds(Duration::ZERO), "0s");
    }

    #[test]
    fn the_plain_dsn_trades_verified_tls_for_none_and_keeps_the_rest() {
        let tls = "postgres://sqlrs:a.b.c@127.0.0.1:5/lease_1?sslmode=verify-full&sslrootcert=/h/tls%20dir/ca.pem";
        assert_eq!(
            plain_dsn(tls),
            "postgres://sqlrs:a.b.c@127.0.0.1:5/lease_1?sslmode=disable"
        );
        assert_eq!(ssl_root_cert(tls), Some(PathBuf::from("/h/tls dir/ca.pem")));
        let plain = "postgres://sqlrs:t@127.0.0.1:5/postgres?sslmode=disable";
        assert_eq!(plain_dsn(plain), plain);
        assert_eq!(ssl_root_cert(plain), None);
        assert_eq!(
            plain_dsn("postgres://u@h/d?application_name=x"),
            "postgres://u@h/d?application_name=x&sslmode=disable"
        );
        assert_eq!(
            plain_dsn("postgres://u@h/d"),
            "postgres://u@h/d?sslmode=disable"
        );
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz%41"), "%zzA");
    }

    #[test]
    fn isolation_round_trips_through_its_name() {
        for i in [Isolation::Database, Isolation::Instance] {
            assert_eq!(i.to_string().parse::<Isolation>(), Ok(i));
        }
        assert_eq!(
            "cluster".parse::<Isolation>(),
            Err(UnknownIsolation("cluster".into()))
        );
    }

    #[test]
    fn the_lease_json_is_read_and_extra_fields_are_ignored() {
        let json = r#"{"lease":"0123456789abcdef0123456789abcdef","state_id":"ab","isolation":"instance",
            "dsn":"postgres://u:t@127.0.0.1:1/db","instance_id":"cd","database":"db",
            "created_ms":1,"expires_ms":2,"waited_ms":1500,"owner":"me","later":true}"#;
        let info: LeaseInfo = serde_json::from_str(json).unwrap();
        assert_eq!(info.isolation, Isolation::Instance);
        assert_eq!(info.waited_ms, 1500);
        assert_eq!(info.dsn, "postgres://u:t@127.0.0.1:1/db");
    }

    /// An executable script standing in for `sqlrs`.
    fn fake_sqlrs(dir: &std::path::Path, body: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join("sqlrs");
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    #[tokio::test]
    async fn a_failing_sqlrs_reports_its_exit_code_and_trimmed_stderr() {
        let dir = tempfile::tempdir().unwrap();
        let sqlrs = fake_sqlrs(dir.path(), "echo \"error: $FAKE: $*  \" >&2; exit 2");
        let err = Lease::new("nope")
            .sqlrs(&sqlrs)
            .dir(dir.path())
            .env("FAKE", "no such recipe")
            .ttl(Duration::from_secs(90))
            .acquire()
            .await
            .unwrap_err();
        match &err {
            Error::Sqlrs { code, stderr, .. } => {
                assert_eq!(*code, Some(2));
                assert_eq!(
                    stderr,
                    "error: no such recipe: lease --isolation database --ttl 90s --json -- nope"
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(err.to_string().contains("exit code 2"), "{err}");
    }

    #[tokio::test]
    async fn a_missing_working_directory_is_not_a_missing_sqlrs() {
        let dir = tempfile::tempdir().unwrap();
        let sqlrs = fake_sqlrs(dir.path(), "exit 0");
        let err = Lease::new("x")
            .sqlrs(&sqlrs)
            .dir(dir.path().join("gone"))
            .acquire()
            .await
            .unwrap_err();
        assert!(
            matches!(&err, Error::Spawn { source, .. } if source.to_string().contains("gone")),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn output_that_is_not_a_lease_is_bad_output() {
        let err = Lease::new("x")
            .sqlrs("/bin/echo")
            .acquire()
            .await
            .unwrap_err();
        match err {
            Error::BadOutput { output, .. } => {
                assert_eq!(output, "lease --isolation database --json -- x")
            }
            other => panic!("{other:?}"),
        }
    }
}
