//! Liquibase as a prepare tool: planning a changelog offline (which changesets, with which
//! checksums), and applying one changeset to a build server.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use taidon_core::changelog::PlannedChangeset;

/// Why Liquibase could not plan or apply.
#[derive(Debug, thiserror::Error)]
pub enum LiquibaseError {
    #[error(
        "Liquibase not found: {detail}. Install it (for example `npm install -g liquibase`, or \
         https://www.liquibase.com/download) and put `liquibase` on PATH, or set SQLRS_LIQUIBASE \
         to its executable, where Taidon runs (the local daemon keeps the environment it was \
         started with: `sqlrs shutdown`, and the next command starts it with yours)"
    )]
    NotFound { detail: String },
    #[error(
        "Liquibase needs Java, and none was found (no JAVA_HOME, no `java` on PATH): install a \
         Java runtime 11 or later (Debian: `apt-get install default-jre-headless`)"
    )]
    NoJava,
    #[error("cannot run {program:?}: {source}")]
    Spawn {
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Liquibase ran and failed: its own message, and all it printed.
    #[error("{message}")]
    Failed { message: String, output: String },
    #[error("cannot read Liquibase's plan: {0}")]
    Plan(String),
}

/// The Liquibase executable Taidon runs.
#[derive(Debug, Clone)]
pub struct Liquibase {
    program: PathBuf,
    /// Where the JVM's class archive of this Liquibase is kept (AppCDS): the first run
    /// writes it, later runs map it and start faster.
    archive: Option<PathBuf>,
}

impl Liquibase {
    /// `SQLRS_LIQUIBASE` (a path to the executable), else `liquibase` on PATH; and a Java to
    /// run it (JAVA_HOME, `java` on PATH, or a `jre` bundled beside Liquibase).
    pub fn find() -> Result<Liquibase, LiquibaseError> {
        let program = match std::env::var_os("SQLRS_LIQUIBASE").filter(|v| !v.is_empty()) {
            Some(path) => {
                let path = PathBuf::from(path);
                if !is_executable(&path) {
                    return Err(LiquibaseError::NotFound {
                        detail: format!(
                            "SQLRS_LIQUIBASE={} is not an executable file",
                            path.display()
                        ),
                    });
                }
                path
            }
            None => on_path("liquibase").ok_or_else(|| LiquibaseError::NotFound {
                detail: "no `liquibase` on PATH and SQLRS_LIQUIBASE is not set".to_owned(),
            })?,
        };
        let bundled = std::fs::canonicalize(&program)
            .ok()
            .and_then(|p| p.parent().map(|d| d.join("jre/bin/java")))
            .is_some_and(|j| is_executable(&j));
        let java_home = std::env::var_os("JAVA_HOME")
            .map(|h| PathBuf::from(h).join("bin/java"))
            .is_some_and(|j| is_executable(&j));
        if !bundled && !java_home && on_path("java").is_none() {
            return Err(LiquibaseError::NoJava);
        }
        Ok(Liquibase {
            program,
            archive: None,
        })
    }

    /// Keeps the JVM's class archive of this Liquibase in `dir` (one per executable), so that
    /// every run after the first maps its classes instead of loading them: 15-30% off each
    /// JVM start here. Only when JAVA_OPTS is unset: the user's options win.
    pub fn with_class_archive(mut self, dir: &Path) -> Self {
        let key = taidon_core::identity::content_sha256(self.program.to_string_lossy().as_bytes());
        self.archive = Some(dir.join(format!("liquibase-{}.jsa", &key[..16])));
        self
    }

    /// The changesets `update` would apply to an empty database, in order, with their
    /// checksums: `update-sql` against Liquibase's offline PostgreSQL, run in `dir` (the
    /// closure laid out: Liquibase's search path). Nothing connects to a database.
    pub async fn plan(
        &self,
        dir: &Path,
        changelog: &str,
        args: &[String],
    ) -> Result<Vec<PlannedChangeset>, LiquibaseError> {
        let csv = dir.join(format!(".taidon-plan-{:08x}.csv", rand::random::<u32>()));
        let mut run = self.command(dir);
        run.cmd
            .arg(format!(
                "--url=offline:postgresql?changeLogFile={}",
                csv.display()
            ))
            .arg(format!("--changelog-file={changelog}"))
            .arg("--search-path=.")
            .arg("update-sql")
            .args(args);
        let ran = self.run(run).await;
        let text = std::fs::read_to_string(&csv);
        let _ = std::fs::remove_file(&csv);
        ran?;
        match text {
            Ok(text) => taidon_core::changelog::parse_plan_csv(&text)
                .map_err(|e| LiquibaseError::Plan(e.to_string())),
            // Nothing pending: Liquibase wrote no file.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(LiquibaseError::Plan(format!("{}: {e}", csv.display()))),
        }
    }

    /// Applies the next pending changeset (`update-count --count=1`) to the database at
    /// `url` as `user`, in `dir`; returns Liquibase's output and the changeset it ran
    /// (`file::id::author`, from its "Running Changeset" line).
    pub async fn update_one(
        &self,
        dir: &Path,
        changelog: &str,
        args: &[String],
        url: &str,
        user: &str,
        password: &str,
    ) -> Result<(String, Option<String>), LiquibaseError> {
        let mut run = self.command(dir);
        run.cmd
            .arg(format!("--url={url}"))
            .arg(format!("--username={user}"))
            .arg(format!("--changelog-file={changelog}"))
            .arg("--search-path=.")
            .arg("update-count")
            .arg("--count=1")
            .args(args)
            // Not on the command line, where every local user could read it.
            .env("LIQUIBASE_COMMAND_PASSWORD", password);
        let output = self.run(run).await?;
        let ran = output
            .lines()
            .find_map(|l| l.trim().strip_prefix("Running Changeset: "))
            .map(|s| s.trim().to_owned());
        Ok((output, ran))
    }

    fn command(&self, dir: &Path) -> Run {
        let mut cmd = tokio::process::Command::new(&self.program);
        cmd.current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env("LIQUIBASE_SHOW_BANNER", "false")
            .kill_on_drop(true);
        let mut writes_archive = None;
        if std::env::var_os("JAVA_OPTS").is_none() {
            // A short-lived JVM starts faster with the client compiler only, and faster
            // still with its classes mapped from an archive.
            let mut opts = String::from("-XX:TieredStopAtLevel=1 -XX:+UseSerialGC");
            if let Some(archive) = &self.archive {
                if archive.is_file() {
                    opts.push_str(&format!(" -XX:SharedArchiveFile={}", archive.display()));
                } else if std::fs::create_dir_all(archive.parent().unwrap_or(dir)).is_ok() {
                    // Written under a name of its own, then renamed: a run that dies, or two
                    // at once, never leave a half-written archive under the real name.
                    let tmp = archive.with_extension(format!("{:08x}.tmp", rand::random::<u32>()));
                    opts.push_str(&format!(" -XX:ArchiveClassesAtExit={}", tmp.display()));
                    writes_archive = Some((tmp, archive.clone()));
                }
            }
            cmd.env("JAVA_OPTS", opts);
        }
        for (key, _) in std::env::vars_os() {
            let k = key.to_string_lossy();
            // The user's own Liquibase settings must not redirect the build elsewhere.
            if k.starts_with("PG") || k.starts_with("LIQUIBASE_COMMAND_") {
                cmd.env_remove(&key);
            }
        }
        Run {
            cmd,
            writes_archive,
        }
    }

    /// Runs `cmd`; its stdout and stderr together, or Liquibase's failure.
    async fn run(&self, run: Run) -> Result<String, LiquibaseError> {
        let Run {
            mut cmd,
            writes_archive,
        } = run;
        let out = cmd.output().await.map_err(|source| LiquibaseError::Spawn {
            program: self.program.clone(),
            source,
        })?;
        if let Some((tmp, archive)) = writes_archive {
            let kept = out.status.success() && std::fs::rename(&tmp, &archive).is_ok();
            if !kept {
                let _ = std::fs::remove_file(&tmp);
            }
        }
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        if out.status.success() {
            Ok(text)
        } else {
            Err(LiquibaseError::Failed {
                message: failure_message(&text),
                output: text,
            })
        }
    }
}

/// A Liquibase command, and the class archive it writes at exit (a temporary name, and the
/// archive's), if it writes one.
struct Run {
    cmd: tokio::process::Command,
    writes_archive: Option<(PathBuf, PathBuf)>,
}

/// Liquibase's own one-line account of a failure: its "Unexpected error running Liquibase"
/// paragraph, else its primary reason, else its last line.
pub fn failure_message(output: &str) -> String {
    let lines: Vec<&str> = output.lines().collect();
    if let Some(at) = lines
        .iter()
        .position(|l| l.contains("Unexpected error running Liquibase:"))
    {
        let first = lines[at]
            .split_once("Unexpected error running Liquibase:")
            .map_or("", |(_, rest)| rest.trim());
        let mut parts = vec![first.to_owned()];
        for l in &lines[at + 1..] {
            let t = l.trim();
            if t.is_empty() || t.starts_with("For more information") {
                break;
            }
            parts.push(t.to_owned());
        }
        return parts
            .into_iter()
            .filter(|p| !p.is_empty())
            .collect::<Vec<_>>()
            .join(" ");
    }
    if let Some(reason) = lines.iter().find_map(|l| {
        l.split_once("Exception Primary Reason:")
            .map(|(_, r)| r.trim())
    }) {
        return reason.to_owned();
    }
    lines
        .iter()
        .rev()
        .map(|l| l.trim())
        .find(|l| !l.is_empty())
        .unwrap_or("Liquibase failed and said nothing")
        .to_owned()
}

fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_failure_message_is_liquibases_own_paragraph() {
        let out = "Starting Liquibase\nERROR: Exception Primary Reason:  Validation Failed:\n\
                   \nUnexpected error running Liquibase: Migration failed for changeset db/c.xml::3::carol:\n     Reason: liquibase.exception.DatabaseException: ERROR: relation \"nosuch\" does not exist\n\nFor more information, please use the --log-level flag\n";
        assert_eq!(
            failure_message(out),
            "Migration failed for changeset db/c.xml::3::carol: Reason: liquibase.exception.DatabaseException: ERROR: relation \"nosuch\" does not exist"
        );
        assert_eq!(
            failure_message("ERROR: Exception Primary Reason:  bad thing\n"),
            "bad thing"
        );
        assert_eq!(failure_message("\nlast words\n\n"), "last words");
    }
}
