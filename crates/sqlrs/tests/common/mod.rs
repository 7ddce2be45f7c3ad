//! End-to-end harness: the real `sqlrs` and `taidon` binaries, a temporary home that a server
//! running as `postgres` can traverse, and on failure the command, its output and the logs.
#![allow(dead_code)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

pub struct Env {
    pub home: PathBuf,
    pub work: PathBuf,
    _root: tempfile::TempDir,
    pub extra_env: Vec<(String, String)>,
}

pub fn sqlrs_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_sqlrs"))
}

/// `taidon` is built beside `sqlrs` by `cargo test --workspace`.
pub fn taidon_bin() -> PathBuf {
    let bin = sqlrs_bin().with_file_name("taidon");
    assert!(
        bin.exists(),
        "{} is missing: build the workspace first (cargo build --workspace)",
        bin.display()
    );
    bin
}

/// `taidon token create --home HOME ARGS`: a new API token.
pub fn create_token(home: &Path, args: &[&str]) -> String {
    let out = Command::new(taidon_bin())
        .args(["token", "create", "--home"])
        .arg(home)
        .args(args)
        .output()
        .expect("taidon token");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

pub fn traversable_tempdir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("taidon-e2e-")
        .tempdir()
        .expect("tempdir");
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o711)).expect("chmod");
    dir
}

/// The state `id` in `ls --json` output.
pub fn state<'a>(ls: &'a serde_json::Value, id: &str) -> &'a serde_json::Value {
    ls["states"]
        .as_array()
        .expect("states[]")
        .iter()
        .find(|s| s["state_id"] == id)
        .unwrap_or_else(|| panic!("no state {id} in {ls:#}"))
}

/// The value of `series` (name and labels, as written) in a `/metrics` text.
pub fn metric(metrics: &str, series: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .parse::<u64>()
                .ok()
        })
        .unwrap_or_else(|| panic!("no {series} in\n{metrics}"))
}

/// What a finished command gave.
pub struct Run {
    pub cmd: String,
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    fn from(cmd: String, out: Output) -> Self {
        Self {
            cmd,
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    pub fn describe(&self) -> String {
        format!(
            "$ {}\nexit {}\n--- stdout\n{}\n--- stderr\n{}",
            self.cmd, self.code, self.stdout, self.stderr
        )
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{}", self.describe()))
    }

    /// The `DSN=` line `prepare` prints.
    pub fn dsn(&self) -> String {
        self.stdout
            .lines()
            .find_map(|l| l.strip_prefix("DSN="))
            .unwrap_or_else(|| panic!("no DSN= line:\n{}", self.describe()))
            .to_owned()
    }
}

impl Env {
    pub fn new() -> Self {
        let root = traversable_tempdir();
        Self::in_home(root.path().join("home"), root)
    }

    /// A home at `home` (its parents must be traversable), keeping `root` alive.
    pub fn in_home(home: PathBuf, root: tempfile::TempDir) -> Self {
        let work = root.path().join("work");
        fs::create_dir_all(&work).expect("work dir");
        Self {
            home,
            work,
            _root: root,
            extra_env: Vec::new(),
        }
    }

    pub fn write(&self, name: &str, content: &str) -> PathBuf {
        let p = self.work.join(name);
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent).expect("mkdir");
        }
        fs::write(&p, content).expect("write input");
        p
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(sqlrs_bin());
        cmd.args(args)
            .current_dir(&self.work)
            .env("SQLRS_HOME", &self.home)
            .env("TAIDON_BIN", taidon_bin())
            .env_remove("PGHOST")
            .env_remove("PGPORT")
            .env_remove("PGUSER")
            .env_remove("PGPASSWORD")
            .env_remove("PGDATABASE")
            .env_remove("DATABASE_URL")
            .stdin(Stdio::null());
        for (k, v) in &self.extra_env {
            cmd.env(k, v);
        }
        cmd
    }

    /// Runs `sqlrs ARGS` and returns what it gave, whatever the exit code.
    pub fn run(&self, args: &[&str]) -> Run {
        let out = self
            .command(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run sqlrs: {e}"));
        Run::from(format!("sqlrs {}", shell_words(args)), out)
    }

    /// Runs `sqlrs ARGS` and fails the test, with logs, unless it exits 0.
    pub fn ok(&self, args: &[&str]) -> Run {
        let r = self.run(args);
        if r.code != 0 {
            panic!("{}\n{}", r.describe(), self.logs());
        }
        r
    }

    /// Runs `sqlrs ARGS` expecting exit `code`.
    pub fn fails(&self, code: i32, args: &[&str]) -> Run {
        let r = self.run(args);
        if r.code != code {
            panic!("expected exit {code}\n{}\n{}", r.describe(), self.logs());
        }
        r
    }

    pub fn ls(&self) -> serde_json::Value {
        self.ok(&["--json", "ls"]).json()
    }

    /// States in `ls --json` with the given status.
    pub fn states_with_status(&self, status: &str) -> Vec<String> {
        self.ls()["states"]
            .as_array()
            .expect("states[]")
            .iter()
            .filter(|s| s["status"] == status)
            .map(|s| s["state_id"].as_str().expect("state_id").to_owned())
            .collect()
    }

    /// States WARM or HOT, counted in one listing: a standby that starts between two
    /// listings would move a state from one count to the other.
    pub fn published_count(&self) -> usize {
        self.ls()["states"]
            .as_array()
            .expect("states[]")
            .iter()
            .filter(|s| s["status"] == "WARM" || s["status"] == "HOT")
            .count()
    }

    /// Instances users hold: standbys, which the pool starts in the background for busy
    /// states, are not counted.
    pub fn instance_count(&self) -> usize {
        self.ls()["instances"]
            .as_array()
            .expect("instances[]")
            .iter()
            .filter(|i| i["status"] != "standby")
            .count()
    }

    pub fn daemon_pid(&self) -> Option<i32> {
        let text = fs::read_to_string(self.home.join("daemon.json")).ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        v["pid"].as_i64().map(|p| p as i32)
    }

    /// Directories under snapshots/ that are not published states (spare clones that a busy
    /// state keeps ready, `.spare-*` and `.sparing-*`, are not builds and do not count).
    pub fn unpublished_snapshot_dirs(&self) -> Vec<String> {
        let Ok(entries) = fs::read_dir(self.home.join("snapshots")) else {
            return vec![];
        };
        entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.') && !n.starts_with(".spar"))
            .collect()
    }

    /// Everything under `<home>/logs`, for failure messages.
    /// `GET /metrics` of the running daemon, with the home's API token.
    pub fn metrics(&self) -> String {
        let text = fs::read_to_string(self.home.join("daemon.json")).expect("daemon.json");
        let info: serde_json::Value = serde_json::from_str(&text).expect("daemon.json is JSON");
        let url = info["api_url"].as_str().expect("api_url").to_owned();
        let token = fs::read_to_string(self.home.join("api.token")).expect("api.token");
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        rt.block_on(async {
            let resp = reqwest::Client::new()
                .get(format!("{url}/metrics"))
                .bearer_auth(token.trim())
                .send()
                .await
                .expect("GET /metrics");
            assert_eq!(resp.status().as_u16(), 200);
            resp.text().await.expect("body")
        })
    }

    pub fn logs(&self) -> String {
        taidon_testkit::log_tails(&self.home.join("logs"))
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- logs of {}\n{}", self.home.display(), self.logs());
        }
        let _ = self.command(&["shutdown"]).output();
        // A daemon that did not stop would keep servers on a deleted home.
        if let Some(pid) = self.daemon_pid() {
            wait_gone(pid, Duration::from_secs(10));
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

pub fn alive(pid: i32) -> bool {
    // A zombie still answers kill(0): look at its state.
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z')),
        Err(_) => false,
    }
}

pub fn wait_gone(pid: i32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if !alive(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    !alive(pid)
}

/// PIDs of `postgres` postmasters whose data directory is under `dir`.
pub fn postmasters_under(dir: &Path) -> Vec<i32> {
    let mut pids = Vec::new();
    let Ok(procs) = fs::read_dir("/proc") else {
        return pids;
    };
    let needle = dir.to_string_lossy().into_owned();
    for p in procs.flatten() {
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
        let is_postgres = args.first().is_some_and(|a| a.ends_with("/postgres"));
        let data = args
            .iter()
            .position(|a| a == "-D")
            .and_then(|i| args.get(i + 1));
        if is_postgres && data.is_some_and(|d| d.starts_with(&needle)) && alive(pid) {
            pids.push(pid);
        }
    }
    pids
}

fn shell_words(args: &[&str]) -> String {
    args.iter()
        .map(|a| {
            if a.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_=:./".contains(c))
            {
                (*a).to_owned()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The pagila fixture shipped beside the project.
pub fn pagila_dir() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let candidates = [
        manifest.join("../../../shared/fixtures/pagila"),
        manifest.join("../../shared/fixtures/pagila"),
    ];
    candidates
        .iter()
        .find(|p| p.join("pagila-schema.sql").exists())
        .cloned()
        .unwrap_or_else(|| panic!("pagila fixture not found near {}", manifest.display()))
}
pub mod netns;
