//! Finding the Taidon home, and the local daemon in it: discover a running one or start one.

use std::ffi::{OsStr, OsString};
use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use taidon_api::{DaemonInfo, Health, PREFIX};

/// How long one health probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// How often a starting daemon is polled.
const POLL_EVERY: Duration = Duration::from_millis(50);
/// How long a daemon may take to come up.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// After our daemon exited, how long to wait for the daemon that beat it to answer: the loser
/// of a start race exits while the winner may still be initialising.
const RACE_GRACE: Duration = Duration::from_secs(3);
/// How many log lines a failed start shows.
const LOG_TAIL: usize = 20;
/// Past this size the daemon's raw stderr log is moved to `taidon.stderr.log.1` when a daemon
/// starts (the daemon rotates its own log, `taidon.log`; this one holds only what it writes
/// before its logging is set up, or a panic).
const STDERR_LOG_MAX: u64 = 1024 * 1024;

/// Why the daemon could not be found or started.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DaemonError {
    #[error("cannot find a home for Taidon: set --home, SQLRS_HOME or HOME")]
    NoHome,
    #[error("cannot create {path}: {source}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot open the daemon log {path}: {source}")]
    OpenLog {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "cannot find the taidon binary: set TAIDON_BIN, or put taidon next to sqlrs or on PATH"
    )]
    NoBinary,
    #[error("cannot start {bin}: {source}")]
    Spawn {
        bin: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "the taidon daemon exited ({status}) before it was ready; the end of its logs in {logs}:"
    )]
    Exited {
        status: ExitStatus,
        logs: PathBuf,
        tail: String,
    },
    #[error("the taidon daemon did not become ready within {}s; the end of its logs in {logs}:", START_TIMEOUT.as_secs())]
    Timeout { logs: PathBuf, tail: String },
    #[error("the daemon runs but its API token {path} cannot be read: {source}")]
    Token {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot make an HTTP client: {0}")]
    Http(#[source] reqwest::Error),
}

impl DaemonError {
    /// Lines to show under the message (the daemon log's tail).
    pub(crate) fn detail(&self) -> Option<&str> {
        match self {
            DaemonError::Exited { tail, .. } | DaemonError::Timeout { tail, .. } => Some(tail),
            _ => None,
        }
    }
}

/// The environment the home is chosen from, read once so that choosing is pure.
#[derive(Debug, Clone, Default)]
pub(crate) struct HomeEnv {
    pub(crate) sqlrs_home: Option<OsString>,
    pub(crate) is_root: bool,
    pub(crate) xdg_data_home: Option<OsString>,
    pub(crate) home: Option<OsString>,
}

impl HomeEnv {
    /// This process's environment.
    pub(crate) fn from_process() -> Self {
        Self {
            sqlrs_home: std::env::var_os("SQLRS_HOME"),
            // SAFETY: geteuid has no preconditions and cannot fail.
            is_root: unsafe { libc::geteuid() } == 0,
            xdg_data_home: std::env::var_os("XDG_DATA_HOME"),
            home: std::env::var_os("HOME"),
        }
    }
}

fn non_empty(v: &Option<OsString>) -> Option<&OsStr> {
    v.as_deref().filter(|s| !s.is_empty())
}

/// The Taidon home: `--home`, else `$SQLRS_HOME`, else `/var/lib/taidon` for root (a server
/// running as `postgres` cannot reach `/root`), else `$XDG_DATA_HOME/taidon`, else
/// `$HOME/.local/share/taidon`.
pub(crate) fn choose_home(flag: Option<&Path>, env: &HomeEnv) -> Result<PathBuf, DaemonError> {
    if let Some(dir) = flag {
        return Ok(dir.to_owned());
    }
    if let Some(dir) = non_empty(&env.sqlrs_home) {
        return Ok(PathBuf::from(dir));
    }
    if env.is_root {
        return Ok(PathBuf::from("/var/lib/taidon"));
    }
    // The XDG spec says a relative value is invalid and must be ignored.
    if let Some(dir) = non_empty(&env.xdg_data_home).filter(|d| Path::new(d).is_absolute()) {
        return Ok(Path::new(dir).join("taidon"));
    }
    match non_empty(&env.home) {
        Some(home) => Ok(Path::new(home).join(".local/share/taidon")),
        None => Err(DaemonError::NoHome),
    }
}

/// A running daemon and how to talk to it.
#[derive(Debug, Clone)]
pub(crate) struct Daemon {
    pub(crate) info: DaemonInfo,
    pub(crate) token: String,
}

/// The files of a home that matter here.
pub(crate) struct Home {
    pub(crate) dir: PathBuf,
    http: reqwest::Client,
}

impl Home {
    pub(crate) fn new(dir: PathBuf) -> Result<Self, DaemonError> {
        let http = reqwest::Client::builder()
            .timeout(PROBE_TIMEOUT)
            .build()
            .map_err(DaemonError::Http)?;
        Ok(Self { dir, http })
    }

    fn daemon_json(&self) -> PathBuf {
        self.dir.join("daemon.json")
    }

    fn logs_dir(&self) -> PathBuf {
        self.dir.join("logs")
    }

    /// The daemon's log, which it writes and rotates itself (`--log-file`).
    fn log_path(&self) -> PathBuf {
        self.logs_dir().join("taidon.log")
    }

    /// The daemon's raw stdout and stderr: what it writes before its logging is set up (a
    /// bad flag), and panics.
    fn stderr_log_path(&self) -> PathBuf {
        self.logs_dir().join("taidon.stderr.log")
    }

    /// What `daemon.json` says, if it exists and parses.
    pub(crate) fn info(&self) -> Option<DaemonInfo> {
        let text = fs::read(self.daemon_json()).ok()?;
        serde_json::from_slice(&text).ok()
    }

    /// Whether the daemon at `info` answers its health check.
    async fn healthy(&self, info: &DaemonInfo) -> bool {
        let url = format!("{}{PREFIX}/health", info.api_url.trim_end_matches('/'));
        let Ok(resp) = self.http.get(url).send().await else {
            return false;
        };
        if !resp.status().is_success() {
            return false;
        }
        matches!(resp.json::<Health>().await, Ok(h) if h.ok)
    }

    /// The daemon running in this home, if one answers.
    pub(crate) async fn find(&self) -> Result<Option<Daemon>, DaemonError> {
        let Some(info) = self.info() else {
            return Ok(None);
        };
        if !self.healthy(&info).await {
            return Ok(None);
        }
        let path = self.dir.join("api.token");
        let token = fs::read_to_string(&path)
            .map_err(|source| DaemonError::Token { path, source })?
            .trim()
            .to_owned();
        Ok(Some(Daemon { info, token }))
    }

    /// The daemon running in this home, started first if none answers.
    pub(crate) async fn find_or_start(&self) -> Result<Daemon, DaemonError> {
        if let Some(d) = self.find().await? {
            return Ok(d);
        }
        let mut child = self.spawn()?;
        let deadline = Instant::now() + START_TIMEOUT;
        let mut exited: Option<(ExitStatus, Instant)> = None;
        loop {
            if let Some(d) = self.find().await? {
                return Ok(d);
            }
            let now = Instant::now();
            if exited.is_none() {
                if let Ok(Some(status)) = child.try_wait() {
                    exited = Some((status, now));
                }
            }
            if let Some((status, at)) = exited {
                // A clean exit is what the loser of a start race does: the winner is coming.
                let patience = if status.success() {
                    START_TIMEOUT
                } else {
                    RACE_GRACE
                };
                if now >= at + patience || now >= deadline {
                    return Err(DaemonError::Exited {
                        status,
                        logs: self.logs_dir(),
                        tail: self.log_tail(),
                    });
                }
            }
            if now >= deadline {
                return Err(DaemonError::Timeout {
                    logs: self.logs_dir(),
                    tail: self.log_tail(),
                });
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
    }

    /// Starts `taidon local --home <home>` in its own session, logging to `logs/taidon.log`
    /// (rotated by the daemon; `SQLRS_LOG_MAX_MB` sets its cap), its raw stdout and stderr
    /// to `logs/taidon.stderr.log`.
    fn spawn(&self) -> Result<Child, DaemonError> {
        let logs = self.logs_dir();
        fs::create_dir_all(&logs).map_err(|source| DaemonError::CreateDir {
            path: logs.clone(),
            source,
        })?;
        let stderr_path = self.stderr_log_path();
        if fs::metadata(&stderr_path).is_ok_and(|m| m.len() > STDERR_LOG_MAX) {
            let mut old = stderr_path.clone().into_os_string();
            old.push(".1");
            let _ = fs::rename(&stderr_path, old);
        }
        let open_err = |source| DaemonError::OpenLog {
            path: stderr_path.clone(),
            source,
        };
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&stderr_path)
            .map_err(open_err)?;
        let log2 = log.try_clone().map_err(open_err)?;
        let bin = taidon_bin(
            std::env::var_os("TAIDON_BIN"),
            std::env::current_exe().ok(),
            std::env::var_os("PATH"),
        )
        .ok_or(DaemonError::NoBinary)?;
        let mut cmd = Command::new(&bin);
        cmd.arg("local")
            .arg("--home")
            .arg(&self.dir)
            .arg("--log-file")
            .arg(self.log_path());
        if let Some(mb) = std::env::var_os("SQLRS_LOG_MAX_MB").filter(|v| !v.is_empty()) {
            cmd.arg("--log-max-mb").arg(mb);
        }
        cmd.stdin(Stdio::null()).stdout(log).stderr(log2);
        // SAFETY: setsid is async-signal-safe. A new session keeps the daemon out of our
        // terminal's process group, so Ctrl-C on sqlrs does not reach it and it outlives us.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() == -1 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd.spawn()
            .map_err(|source| DaemonError::Spawn { bin, source })
    }

    /// The end of the daemon's raw stderr (if it wrote any) and of its log, each headed by
    /// its file name.
    fn log_tail(&self) -> String {
        let mut out = String::new();
        for (path, shown_empty) in [(self.stderr_log_path(), false), (self.log_path(), true)] {
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            let tail = match fs::read(&path) {
                Ok(bytes) => last_lines(&String::from_utf8_lossy(&bytes), LOG_TAIL),
                Err(e) if shown_empty => format!("(no log: {e})"),
                Err(_) => String::new(),
            };
            if tail.trim().is_empty() && !shown_empty {
                continue;
            }
            if !out.is_empty() {
                out.push('\n');
            }
            out.push_str(&format!("==> {name} <==\n{tail}"));
        }
        out
    }

    /// Waits until process `pid` is gone; false if it still runs after `timeout`.
    pub(crate) async fn wait_gone(&self, pid: u32, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if !process_alive(pid) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
    }
}

/// Where the `taidon` binary is: `$TAIDON_BIN`, else next to this executable, else on `PATH`.
pub(crate) fn taidon_bin(
    env_bin: Option<OsString>,
    current_exe: Option<PathBuf>,
    path: Option<OsString>,
) -> Option<PathBuf> {
    if let Some(bin) = env_bin.filter(|b| !b.is_empty()) {
        return Some(PathBuf::from(bin));
    }
    if let Some(beside) = current_exe
        .as_deref()
        .and_then(Path::parent)
        .map(|dir| dir.join("taidon"))
        .filter(|p| is_executable(p))
    {
        return Some(beside);
    }
    find_in_path("taidon", path.as_deref())
}

/// The first executable `name` in the directories of a `PATH` value.
pub(crate) fn find_in_path(name: &str, path: Option<&OsStr>) -> Option<PathBuf> {
    std::env::split_paths(path?)
        .filter(|dir| !dir.as_os_str().is_empty())
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Whether `pid` is a live process. A zombie counts as gone: it has stopped, only nobody reaped
/// it yet (a daemon started by an earlier sqlrs is reaped by whoever adopted it).
pub(crate) fn process_alive(pid: u32) -> bool {
    let Ok(pid_t) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: kill with signal 0 only checks that the process exists.
    let exists = unsafe { libc::kill(pid_t, 0) } == 0
        || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    if !exists {
        return false;
    }
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !is_zombie_stat(&stat),
        Err(_) => true,
    }
}

/// Whether a `/proc/PID/stat` line describes a zombie. The command name may hold spaces and
/// parentheses, so the state is the field after the last `)`.
fn is_zombie_stat(stat: &str) -> bool {
    stat.rsplit_once(')')
        .map(|(_, rest)| rest.trim_start().starts_with('Z'))
        .unwrap_or(false)
}

/// The last `n` lines of `text`.
pub(crate) fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn env(sqlrs: Option<&str>, root: bool, xdg: Option<&str>, home: Option<&str>) -> HomeEnv {
        HomeEnv {
            sqlrs_home: sqlrs.map(OsString::from),
            is_root: root,
            xdg_data_home: xdg.map(OsString::from),
            home: home.map(OsString::from),
        }
    }

    #[test]
    fn home_precedence() {
        let all = env(Some("/s"), true, Some("/x"), Some("/h"));
        let flag = Path::new("/flag");
        assert_eq!(choose_home(Some(flag), &all).unwrap(), flag);
        assert_eq!(choose_home(None, &all).unwrap(), Path::new("/s"));
        let e = env(None, true, Some("/x"), Some("/root"));
        assert_eq!(choose_home(None, &e).unwrap(), Path::new("/var/lib/taidon"));
        let e = env(None, false, Some("/x"), Some("/h"));
        assert_eq!(choose_home(None, &e).unwrap(), Path::new("/x/taidon"));
        let e = env(Some(""), false, Some(""), Some("/h"));
        assert_eq!(
            choose_home(None, &e).unwrap(),
            Path::new("/h/.local/share/taidon")
        );
        let e = env(None, false, Some("relative"), Some("/h"));
        assert_eq!(
            choose_home(None, &e).unwrap(),
            Path::new("/h/.local/share/taidon")
        );
        assert!(matches!(
            choose_home(None, &env(None, false, None, None)),
            Err(DaemonError::NoHome)
        ));
    }

    fn exe(dir: &Path, name: &str) -> PathBuf {
        let p = dir.join(name);
        fs::write(&p, "#!/bin/sh\n").unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    #[test]
    fn taidon_binary_is_env_then_sibling_then_path() {
        let beside = tempfile::tempdir().unwrap();
        let on_path = tempfile::tempdir().unwrap();
        let sqlrs = exe(beside.path(), "sqlrs");
        let path = std::env::join_paths([Path::new("/nonexistent"), on_path.path()]).unwrap();
        // Nothing anywhere.
        assert_eq!(
            taidon_bin(None, Some(sqlrs.clone()), Some(path.clone())),
            None
        );
        let found_on_path = exe(on_path.path(), "taidon");
        assert_eq!(
            taidon_bin(None, Some(sqlrs.clone()), Some(path.clone())),
            Some(found_on_path)
        );
        let sibling = exe(beside.path(), "taidon");
        assert_eq!(
            taidon_bin(None, Some(sqlrs.clone()), Some(path.clone())),
            Some(sibling)
        );
        assert_eq!(
            taidon_bin(Some("/opt/t".into()), Some(sqlrs), Some(path)),
            Some(PathBuf::from("/opt/t"))
        );
    }

    #[test]
    fn a_non_executable_file_is_not_found_on_path() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("psql"), "").unwrap();
        assert_eq!(find_in_path("psql", Some(dir.path().as_os_str())), None);
        let p = exe(dir.path(), "pgbench");
        assert_eq!(
            find_in_path("pgbench", Some(dir.path().as_os_str())),
            Some(p)
        );
        assert_eq!(find_in_path("pgbench", None), None);
    }

    #[test]
    fn log_tail_keeps_the_last_lines() {
        let text: String = (1..=30).map(|i| format!("line {i}\n")).collect();
        let tail = last_lines(&text, 20);
        assert!(tail.starts_with("line 11\n"), "{tail}");
        assert!(tail.ends_with("line 30"), "{tail}");
        assert_eq!(last_lines("a\nb", 20), "a\nb");
        assert_eq!(last_lines("", 20), "");
    }

    #[test]
    fn zombies_and_dead_processes_are_gone() {
        assert!(is_zombie_stat("123 (a) b) Z 1 2 3"));
        assert!(!is_zombie_stat("123 (postgres) S 1 2 3"));
        assert!(process_alive(std::process::id()));
        // A child we do not reap yet is a zombie once it exits.
        let mut child = Command::new("true").spawn().unwrap();
        let pid = child.id();
        let deadline = Instant::now() + Duration::from_secs(5);
        while process_alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(
            !process_alive(pid),
            "an exited, unreaped child is not alive"
        );
        child.wait().unwrap();
        assert!(!process_alive(pid));
    }

    #[tokio::test]
    async fn no_daemon_json_means_no_daemon() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::new(dir.path().to_owned()).unwrap();
        assert!(home.find().await.unwrap().is_none());
        // A stale file pointing at nothing that listens is no daemon either.
        fs::write(
            dir.path().join("daemon.json"),
            r#"{"pid":1,"api_url":"http://127.0.0.1:9","gateway":"127.0.0.1:9"}"#,
        )
        .unwrap();
        assert_eq!(home.info().unwrap().api_url, "http://127.0.0.1:9");
        assert!(home.find().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_daemon_that_dies_at_start_reports_its_log() {
        let dir = tempfile::tempdir().unwrap();
        let bin_dir = tempfile::tempdir().unwrap();
        let fake = bin_dir.path().join("taidon");
        // A stand-in taidon: a script that logs and fails, as a broken daemon would.
        fs::write(
            &fake,
            "#!/bin/sh\necho \"args: $*\"\necho 'fatal: cannot bind' >&2\nexit 3\n",
        )
        .unwrap();
        fs::set_permissions(&fake, fs::Permissions::from_mode(0o755)).unwrap();
        std::env::set_var("TAIDON_BIN", &fake);
        let home = Home::new(dir.path().join("home")).unwrap();
        let started = Instant::now();
        let err = home.find_or_start().await.unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(10));
        let DaemonError::Exited { status, tail, .. } = &err else {
            panic!("{err:?}")
        };
        assert_eq!(status.code(), Some(3));
        assert!(tail.contains("fatal: cannot bind"), "{tail}");
        assert!(
            tail.contains(&format!(
                "args: local --home {} --log-file {}",
                home.dir.display(),
                home.log_path().display()
            )),
            "{tail}"
        );
        // The raw stderr first, then the daemon's own log (here: written by the script).
        assert!(tail.starts_with("==> taidon.stderr.log <=="), "{tail}");
        assert!(tail.contains("==> taidon.log <==\n(no log: "), "{tail}");
    }
}
