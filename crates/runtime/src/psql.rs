//! Running one prepare step with psql against a server.

use std::path::Path;
use std::process::Stdio;

use taidon_core::{PsqlInput, PsqlStep};

use crate::engine::{remove_pg_env, Engine};
use crate::server::Server;

/// What a successful step printed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepOutput {
    pub stdout: String,
    pub stderr: String,
}

/// A failed step: the line that says why, everything psql said, and its exit code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct StepError {
    /// The first error line, such as
    /// `psql:schema.sql:12: ERROR:  syntax error at or near "craete"`.
    pub message: String,
    /// All of psql's stderr.
    pub output: String,
    /// psql's exit code; `None` if it did not run or was killed by a signal.
    pub exit_code: Option<i32>,
}

impl StepError {
    /// A step that could not be run at all (its inputs not laid out): no psql output.
    pub fn setup(message: String) -> Self {
        Self {
            message,
            output: String::new(),
            exit_code: None,
        }
    }
}

/// Where psql connects: a socket directory or a host, the port, and the password if the
/// server asks for one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PsqlTarget {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Option<String>,
}

impl PsqlTarget {
    /// A local server's unix socket, as the superuser.
    pub fn local(server: &Server) -> Self {
        Self {
            host: server.socket_dir.display().to_string(),
            port: server.port,
            user: "postgres".into(),
            password: None,
        }
    }
}

/// Run `step` with psql against `server` as the current user, in `cwd` (so relative `-f` and
/// `\i` paths are the user's).
pub async fn run_psql_step(
    engine: &Engine,
    server: &Server,
    step: &PsqlStep,
    cwd: &Path,
) -> Result<StepOutput, StepError> {
    run_psql_step_at(engine, &PsqlTarget::local(server), step, cwd).await
}

/// Run `step` with psql against `target`, in `cwd`.
pub async fn run_psql_step_at(
    engine: &Engine,
    target: &PsqlTarget,
    step: &PsqlStep,
    cwd: &Path,
) -> Result<StepOutput, StepError> {
    let psql = engine.psql();
    let mut cmd = tokio::process::Command::new(&psql);
    cmd.args(["-X", "-q", "-v", "ON_ERROR_STOP=1"]);
    if step.single_transaction {
        cmd.arg("-1");
    }
    for (name, value) in &step.variables {
        cmd.arg("-v").arg(format!("{name}={value}"));
    }
    cmd.arg("-h")
        .arg(&target.host)
        .arg("-p")
        .arg(target.port.to_string())
        .arg("-U")
        .arg(&target.user)
        .args(["-d", "postgres"]);
    match &step.input {
        PsqlInput::File { path, .. } => cmd.arg("-f").arg(path),
        PsqlInput::Command { sql } => cmd.arg("-c").arg(sql),
    };
    remove_pg_env(&mut cmd);
    if let Some(password) = &target.password {
        cmd.env("PGPASSWORD", password);
    }
    cmd.env("PGAPPNAME", "taidon-prepare")
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);

    let out = cmd.output().await.map_err(|e| StepError {
        message: format!("cannot run {}: {e}", psql.display()),
        output: String::new(),
        exit_code: None,
    })?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if out.status.success() {
        return Ok(StepOutput { stdout, stderr });
    }
    Err(StepError {
        message: error_line(&stderr)
            .map(str::to_owned)
            .unwrap_or_else(|| format!("psql failed ({})", out.status)),
        output: stderr,
        exit_code: out.status.code(),
    })
}

/// The line of psql's stderr that best says what went wrong: a server error, else psql's own.
fn error_line(stderr: &str) -> Option<&str> {
    let lines = || {
        stderr
            .lines()
            .map(str::trim_end)
            .filter(|l| !l.trim().is_empty())
    };
    lines()
        .find(|l| l.contains("ERROR:") || l.contains("FATAL:"))
        .or_else(|| lines().find(|l| l.contains("error:")))
        .or_else(|| lines().next())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_line_prefers_server_errors_then_psql_errors() {
        let s = "psql:a.sql:1: NOTICE:  hi\npsql:a.sql:2: ERROR:  boom\nLINE 1: x\n";
        assert_eq!(error_line(s), Some("psql:a.sql:2: ERROR:  boom"));
        let s = "psql: error: nope.sql: No such file or directory\n";
        assert_eq!(
            error_line(s),
            Some("psql: error: nope.sql: No such file or directory")
        );
        assert_eq!(error_line("\nsomething odd\n"), Some("something odd"));
        assert_eq!(error_line(""), None);
    }
}
