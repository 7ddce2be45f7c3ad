//! Finding the PostgreSQL binaries, identifying them, and creating data directories.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use taidon_core::{EngineFingerprint, InitdbOptions};

use crate::error::{EngineError, RuntimeError};
use crate::run_as::{create_private_dir, RunAs};

/// Authentication for every data directory: trust only over the unix socket (which only the
/// server user and root can reach), SCRAM over TCP. Never trust on TCP.
const PG_HBA: &str = "\
local all all trust
host all all 127.0.0.1/32 scram-sha-256
host all all ::1/128 scram-sha-256
";

/// A PostgreSQL installation: where its binaries are and what they make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Engine {
    pub bin_dir: PathBuf,
    pub fingerprint: EngineFingerprint,
    /// The output of `postgres --version`, trimmed.
    pub version_line: String,
}

impl Engine {
    /// The default engine: the first of [`Engine::discover_all`].
    pub fn discover(
        explicit_bin_dir: Option<&Path>,
        initdb: InitdbOptions,
    ) -> Result<Engine, EngineError> {
        let mut all = Self::discover_all(explicit_bin_dir, initdb)?;
        Ok(all.remove(0))
    }

    /// Every PostgreSQL installation, the default first: `explicit_bin_dir`, then each
    /// directory of `TAIDON_PG_BIN` (a `:`-separated list), then `pg_config --bindir`, every
    /// `/usr/lib/postgresql/*/bin` (highest first) and the directory of `postgres` on PATH.
    /// One installation per version is kept, the first found.
    ///
    /// A directory named explicitly or in `TAIDON_PG_BIN` must hold a server: silently using
    /// another engine than the one asked for would make states with another fingerprint.
    pub fn discover_all(
        explicit_bin_dir: Option<&Path>,
        initdb: InitdbOptions,
    ) -> Result<Vec<Engine>, EngineError> {
        let mut asked: Vec<PathBuf> = explicit_bin_dir
            .map(Path::to_path_buf)
            .into_iter()
            .collect();
        if let Some(list) = std::env::var_os("TAIDON_PG_BIN").filter(|v| !v.is_empty()) {
            asked.extend(std::env::split_paths(&list).filter(|d| !d.as_os_str().is_empty()));
        }
        let mut engines: Vec<Engine> = Vec::new();
        let keep = |engine: Engine, engines: &mut Vec<Engine>| {
            let same = |e: &Engine| {
                e.fingerprint.major == engine.fingerprint.major
                    && e.fingerprint.minor == engine.fingerprint.minor
            };
            if !engines.iter().any(same) {
                engines.push(engine);
            }
        };
        for dir in &asked {
            if !holds_server(dir) {
                return Err(EngineError::NotFound {
                    looked_in: dir.display().to_string(),
                });
            }
            keep(Self::at(dir.clone(), initdb.clone())?, &mut engines);
        }
        let searched = searched_bin_dirs();
        for dir in searched.iter().filter(|d| holds_server(d)) {
            match Self::at(dir.clone(), initdb.clone()) {
                Ok(engine) => keep(engine, &mut engines),
                Err(e) => tracing::debug!(dir = %dir.display(), error = %e, "not an engine"),
            }
        }
        if engines.is_empty() {
            return Err(EngineError::NotFound {
                looked_in: if searched.is_empty() {
                    "nowhere: no pg_config, /usr/lib/postgresql or postgres on PATH".to_owned()
                } else {
                    searched
                        .iter()
                        .map(|d| d.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                },
            });
        }
        Ok(engines)
    }

    /// This installation making states of `fingerprint` (same major and minor; its initdb
    /// options and server settings).
    pub fn with_fingerprint(&self, fingerprint: &EngineFingerprint) -> Engine {
        Engine {
            bin_dir: self.bin_dir.clone(),
            fingerprint: fingerprint.clone(),
            version_line: self.version_line.clone(),
        }
    }

    /// Asks this engine's `postgres` whether it accepts the fingerprint's settings, without
    /// starting a server: `postgres -C` parses every `-c` as a server start would. `scratch`
    /// is an empty directory the server user owns. A library in `shared_preload_libraries`
    /// must exist in the engine's library directory.
    pub async fn check_settings(
        &self,
        scratch: &Path,
        run_as: Option<&RunAs>,
    ) -> Result<(), RuntimeError> {
        let settings = &self.fingerprint.settings;
        let Some(first) = settings.keys().next() else {
            return Ok(());
        };
        let program = self.binary("postgres");
        let mut cmd = tokio::process::Command::new(&program);
        cmd.arg("-D")
            .arg(scratch)
            .arg("--config-file=/dev/null")
            .arg("-C")
            .arg(first);
        for (name, value) in settings {
            cmd.arg("-c").arg(format!("{name}={value}"));
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .current_dir(scratch);
        remove_pg_env(&mut cmd);
        if let Some(r) = run_as {
            cmd.uid(r.uid).gid(r.gid);
        }
        let out = cmd
            .output()
            .await
            .map_err(|source| RuntimeError::Spawn { program, source })?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let reason = stderr
                .lines()
                .find_map(|l| l.split_once("FATAL:").map(|(_, m)| m.trim().to_owned()))
                .unwrap_or_else(|| stderr.trim().to_owned());
            return Err(RuntimeError::Setting {
                engine: self.fingerprint.version(),
                reason,
            });
        }
        if let Some(libs) = settings.get("shared_preload_libraries") {
            for lib in libs
                .split(',')
                .map(|l| l.trim().trim_matches('"'))
                .filter(|l| !l.is_empty())
            {
                let name = lib.strip_prefix("$libdir/").unwrap_or(lib);
                if name.contains('/') {
                    continue;
                }
                let dirs = self.library_dirs();
                let found = dirs
                    .iter()
                    .any(|d| d.join(format!("{name}.so")).is_file() || d.join(name).is_file());
                if !found {
                    return Err(RuntimeError::Setting {
                        engine: self.fingerprint.version(),
                        reason: format!(
                            "shared_preload_libraries: library \"{name}\" is not installed (looked in {})",
                            dirs.iter()
                                .map(|d| d.display().to_string())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    });
                }
            }
        }
        Ok(())
    }

    /// Where the engine's loadable modules are: `../lib/postgresql` (a source build) or
    /// `../lib` (Debian) beside the binaries.
    fn library_dirs(&self) -> Vec<PathBuf> {
        let Some(prefix) = self.bin_dir.parent() else {
            return Vec::new();
        };
        vec![prefix.join("lib").join("postgresql"), prefix.join("lib")]
    }

    /// The engine in `bin_dir`, identified by `postgres --version`.
    fn at(bin_dir: PathBuf, initdb: InitdbOptions) -> Result<Engine, EngineError> {
        let postgres = bin_dir.join("postgres");
        let out = std::process::Command::new(&postgres)
            .arg("--version")
            .stdin(Stdio::null())
            .output()
            .map_err(|source| EngineError::VersionCommand {
                binary: postgres.clone(),
                source,
            })?;
        let version_line = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let (major, minor) =
            taidon_core::engine::parse_server_version(&version_line).map_err(|source| {
                EngineError::Version {
                    bin_dir: bin_dir.clone(),
                    source,
                }
            })?;
        Ok(Engine {
            bin_dir,
            fingerprint: EngineFingerprint {
                major,
                minor,
                initdb,
                settings: Default::default(),
            },
            version_line,
        })
    }

    /// The psql beside the server binaries, else `psql` from PATH.
    pub fn psql(&self) -> PathBuf {
        let beside = self.bin_dir.join("psql");
        if is_executable(&beside) {
            beside
        } else {
            PathBuf::from("psql")
        }
    }

    /// The path of one of the engine's binaries.
    pub(crate) fn binary(&self, name: &str) -> PathBuf {
        self.bin_dir.join(name)
    }

    /// Create `data_dir` (its parent must exist) as a new cluster owned by `run_as`, with the
    /// fingerprint's initdb options and this crate's pg_hba.conf.
    pub async fn initdb(
        &self,
        data_dir: &Path,
        run_as: Option<&RunAs>,
    ) -> Result<(), RuntimeError> {
        create_private_dir(data_dir, run_as)?;
        let program = self.binary("initdb");
        let mut cmd = tokio::process::Command::new(&program);
        cmd.arg("-D")
            .arg(data_dir)
            .args([
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--no-sync",
                // 1 MiB WAL segments, not 16: every checkpoint holds the segment its build
                // wrote last, and on a store without reflinks that file is the part a child
                // snapshot cannot share with its parent. A physical setting Taidon fixes, like
                // fsync: it is not part of the state's identity.
                "--wal-segsize=1",
            ])
            .args(self.fingerprint.initdb.initdb_args())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // --no-sync: the data directory is fsynced when its snapshot is published.
        if self.fingerprint.major >= 14 {
            cmd.arg("--no-instructions");
        }
        if let Some(parent) = data_dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            // The server user may not be able to enter our own working directory (e.g. /root).
            cmd.current_dir(parent);
        }
        remove_pg_env(&mut cmd);
        if let Some(r) = run_as {
            cmd.uid(r.uid).gid(r.gid);
        }
        let out = cmd
            .output()
            .await
            .map_err(|source| RuntimeError::Spawn { program, source })?;
        if !out.status.success() {
            return Err(RuntimeError::Initdb {
                data_dir: data_dir.to_path_buf(),
                status: out.status,
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        // initdb wrote the file as run_as; writing over it keeps its owner and mode.
        let hba = data_dir.join("pg_hba.conf");
        std::fs::write(&hba, PG_HBA).map_err(RuntimeError::io("cannot write", &hba))?;
        let conf_lines = self.fingerprint.settings_conf();
        if !conf_lines.is_empty() {
            let conf = data_dir.join("postgresql.conf");
            let mut file = std::fs::OpenOptions::new()
                .append(true)
                .open(&conf)
                .map_err(RuntimeError::io("cannot open", &conf))?;
            std::io::Write::write_all(&mut file, conf_lines.as_bytes())
                .map_err(RuntimeError::io("cannot write", &conf))?;
        }
        Ok(())
    }
}

/// Every `PG*` variable is dropped so the user's environment cannot redirect a tool.
pub(crate) fn remove_pg_env(cmd: &mut tokio::process::Command) {
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("PG") {
            cmd.env_remove(&key);
        }
    }
}

/// Where to look without an explicit directory, in order.
fn searched_bin_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Ok(out) = std::process::Command::new("pg_config")
        .arg("--bindir")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
    {
        let dir = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if out.status.success() && !dir.is_empty() {
            dirs.push(PathBuf::from(dir));
        }
    }
    dirs.extend(debian_bin_dirs(Path::new("/usr/lib/postgresql")));
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let postgres = dir.join("postgres");
            if is_executable(&postgres) {
                // A symlink such as /usr/local/bin/postgres: initdb lives beside its target.
                if let Some(real_dir) = std::fs::canonicalize(&postgres)
                    .ok()
                    .and_then(|p| p.parent().map(Path::to_path_buf))
                {
                    dirs.push(real_dir);
                }
                dirs.push(dir);
            }
        }
    }
    let mut seen = std::collections::HashSet::new();
    dirs.retain(|d| seen.insert(d.clone()));
    dirs
}

/// `<root>/<version>/bin` directories, highest version first.
fn debian_bin_dirs(root: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    let mut versions: Vec<(Vec<u32>, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let key: Option<Vec<u32>> = name.split('.').map(|p| p.parse().ok()).collect();
            Some((key?, e.path().join("bin")))
        })
        .collect();
    versions.sort_by(|a, b| b.0.cmp(&a.0));
    versions.into_iter().map(|(_, dir)| dir).collect()
}

fn holds_server(dir: &Path) -> bool {
    is_executable(&dir.join("initdb")) && is_executable(&dir.join("postgres"))
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debian_dirs_are_sorted_numerically_and_skip_non_versions() {
        let root = tempfile::tempdir().unwrap();
        for v in ["9.6", "15", "10", "common"] {
            std::fs::create_dir(root.path().join(v)).unwrap();
        }
        let dirs = debian_bin_dirs(root.path());
        let names: Vec<_> = dirs
            .iter()
            .map(|d| d.parent().unwrap().file_name().unwrap().to_str().unwrap())
            .collect();
        assert_eq!(names, ["15", "10", "9.6"]);
    }
}
