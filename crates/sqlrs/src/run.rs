//! Running the user's command against an instance: its environment, its signals, its exit code.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

use tokio::signal::unix::{signal, SignalKind};

/// Why the user's command did not run to an exit code.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RunError {
    /// The command could not be started (exit 127, as a shell would).
    #[error("cannot run '{program}': {source}")]
    Spawn {
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("waiting for '{program}' failed: {source}")]
    Wait {
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot handle signals: {0}")]
    Signals(#[source] io::Error),
    #[error("the instance's DSN {dsn:?} is not a postgres:// URL")]
    Dsn { dsn: String },
}

impl RunError {
    pub(crate) fn exit_code(&self) -> i32 {
        match self {
            RunError::Spawn { .. } => 127,
            _ => 1,
        }
    }
}

/// The connection parameters of a DSN.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ConnParams {
    pub(crate) host: Option<String>,
    pub(crate) port: Option<u16>,
    pub(crate) user: Option<String>,
    pub(crate) password: Option<String>,
    pub(crate) dbname: Option<String>,
    pub(crate) sslmode: Option<String>,
    pub(crate) sslrootcert: Option<String>,
}

/// Parses `postgres://user:password@host:port/dbname?params`; `None` if it is not one.
pub(crate) fn parse_dsn(dsn: &str) -> Option<ConnParams> {
    let rest = dsn
        .strip_prefix("postgres://")
        .or_else(|| dsn.strip_prefix("postgresql://"))?;
    let (before_query, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (authority, path) = before_query.split_once('/').unwrap_or((before_query, ""));
    let (userinfo, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    let mut params = ConnParams::default();
    if let Some(userinfo) = userinfo {
        let (user, password) = match userinfo.split_once(':') {
            Some((u, p)) => (u, Some(p)),
            None => (userinfo, None),
        };
        params.user = Some(percent_decode(user)?).filter(|u| !u.is_empty());
        params.password = match password {
            Some(p) => Some(percent_decode(p)?),
            None => None,
        };
    }
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        let (host, after) = v6.split_once(']')?;
        match after {
            "" => (host, None),
            p => (host, Some(p.strip_prefix(':')?)),
        }
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        }
    };
    params.host = Some(percent_decode(host)?).filter(|h| !h.is_empty());
    params.port = match port {
        None | Some("") => None,
        Some(p) => Some(p.parse().ok()?),
    };
    params.dbname = Some(percent_decode(path)?).filter(|d| !d.is_empty());
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = Some(percent_decode(value)?);
        match key {
            "sslmode" => params.sslmode = value,
            "sslrootcert" => params.sslrootcert = value,
            _ => {}
        }
    }
    Some(params)
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The environment a command run against `dsn` gets.
pub(crate) fn child_env(dsn: &str) -> Result<Vec<(&'static str, String)>, RunError> {
    let p = parse_dsn(dsn).ok_or_else(|| RunError::Dsn { dsn: redact(dsn) })?;
    let mut env = vec![("DATABASE_URL", dsn.to_owned())];
    let fields = [
        ("PGHOST", p.host),
        ("PGPORT", p.port.map(|p| p.to_string())),
        ("PGUSER", p.user),
        ("PGPASSWORD", p.password),
        ("PGDATABASE", p.dbname),
        // TLS as the DSN says (verify-full against the home's CA when the gateway has TLS),
        // plain otherwise: an inherited PGSSLMODE must not contradict the DSN.
        (
            "PGSSLMODE",
            Some(p.sslmode.unwrap_or_else(|| "disable".to_owned())),
        ),
        ("PGSSLROOTCERT", p.sslrootcert),
    ];
    env.extend(fields.into_iter().filter_map(|(k, v)| v.map(|v| (k, v))));
    Ok(env)
}

/// The DSN without its password, for messages.
fn redact(dsn: &str) -> String {
    match (dsn.find("://"), dsn.rfind('@')) {
        (Some(s), Some(at)) if s + 3 < at => {
            let userinfo = &dsn[s + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &dsn[..s + 3], &dsn[at..]),
                None => dsn.to_owned(),
            }
        }
        _ => dsn.to_owned(),
    }
}

/// The exit code of a finished child: its own, or 128 + the signal that killed it.
pub(crate) fn exit_code(status: ExitStatus) -> i32 {
    match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(sig)) => 128 + sig,
        (None, None) => 1,
    }
}

/// Runs `program args` with `env` added and stdio inherited; returns its exit code.
///
/// While it runs, SIGINT is left to the child (the terminal sends it to the whole foreground
/// group, so the child gets it anyway) and SIGTERM is passed on to it.
pub(crate) async fn run_child(
    program: &OsStr,
    args: &[OsString],
    env: &[(&'static str, String)],
) -> Result<i32, RunError> {
    let name = program.to_string_lossy().into_owned();
    // Installing a handler means the default action (dying) no longer happens to sqlrs; the
    // handler is reset to the default in the child by exec.
    let _sigint = signal(SignalKind::interrupt()).map_err(RunError::Signals)?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(RunError::Signals)?;
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .spawn()
        .map_err(|source| RunError::Spawn {
            program: name.clone(),
            source,
        })?;
    loop {
        tokio::select! {
            status = child.wait() => {
                let status = status.map_err(|source| RunError::Wait { program: name, source })?;
                return Ok(exit_code(status));
            }
            Some(()) = sigterm.recv() => {
                if let Some(pid) = child.id().and_then(|p| libc::pid_t::try_from(p).ok()) {
                    // SAFETY: sending a signal to our own child; no memory is involved.
                    unsafe { libc::kill(pid, libc::SIGTERM) };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn dsn_with_everything() {
        let p = parse_dsn("postgres://tok%40user:a%2Fb%3Ac@127.0.0.1:6432/app?sslmode=disable")
            .unwrap();
        assert_eq!(
            p,
            ConnParams {
                host: Some("127.0.0.1".into()),
                port: Some(6432),
                user: Some("tok@user".into()),
                password: Some("a/b:c".into()),
                dbname: Some("app".into()),
                sslmode: Some("disable".into()),
                sslrootcert: None,
            }
        );
    }

    #[test]
    fn dsn_variants() {
        let p = parse_dsn("postgresql://[::1]:5433/db").unwrap();
        assert_eq!(p.host.as_deref(), Some("::1"));
        assert_eq!(p.port, Some(5433));
        assert_eq!(p.user, None);
        let p = parse_dsn("postgres://u@localhost").unwrap();
        assert_eq!(p.user.as_deref(), Some("u"));
        assert_eq!(p.password, None);
        assert_eq!(p.host.as_deref(), Some("localhost"));
        assert_eq!(p.port, None);
        assert_eq!(p.dbname, None);
        // A password may hold '@': the last one ends the user info.
        let p = parse_dsn("postgres://u:p@ss@h:1/d").unwrap();
        assert_eq!(p.password.as_deref(), Some("p@ss"));
        assert_eq!(p.host.as_deref(), Some("h"));
        assert_eq!(parse_dsn("mysql://h/d"), None);
        assert_eq!(parse_dsn("postgres://h:notaport/d"), None);
        assert_eq!(parse_dsn("postgres://h/%zz"), None);
    }

    #[test]
    fn child_env_sets_every_libpq_variable() {
        let dsn = "postgres://sqlrs:eyJ.tok-en_@127.0.0.1:6432/postgres";
        let env = child_env(dsn).unwrap();
        let get = |k: &str| env.iter().find(|(n, _)| *n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("DATABASE_URL"), Some(dsn));
        assert_eq!(get("PGHOST"), Some("127.0.0.1"));
        assert_eq!(get("PGPORT"), Some("6432"));
        assert_eq!(get("PGUSER"), Some("sqlrs"));
        assert_eq!(get("PGPASSWORD"), Some("eyJ.tok-en_"));
        assert_eq!(get("PGDATABASE"), Some("postgres"));
        assert_eq!(get("PGSSLMODE"), Some("disable"));
        assert_eq!(get("PGSSLROOTCERT"), None);
        let tls = "postgres://sqlrs:t@127.0.0.1:6432/postgres?sslmode=verify-full&sslrootcert=/h/tls%20dir/ca.pem";
        let env = child_env(tls).unwrap();
        let get = |k: &str| env.iter().find(|(n, _)| *n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("PGSSLMODE"), Some("verify-full"));
        assert_eq!(get("PGSSLROOTCERT"), Some("/h/tls dir/ca.pem"));
        let err = child_env("http://u:secret@h/").unwrap_err();
        assert!(!err.to_string().contains("secret"), "{err}");
        assert_eq!(err.exit_code(), 1);
    }

    #[tokio::test]
    async fn exit_codes_come_from_the_child() {
        let sh = OsStr::new("sh");
        let code = |script: &str| vec![OsString::from("-c"), OsString::from(script)];
        assert_eq!(run_child(sh, &code("exit 0"), &[]).await.unwrap(), 0);
        assert_eq!(run_child(sh, &code("exit 7"), &[]).await.unwrap(), 7);
        assert_eq!(run_child(sh, &code("kill -9 $$"), &[]).await.unwrap(), 137);
        let env = [("PGSSLMODE", "disable".to_owned())];
        let check = code("test \"$PGSSLMODE\" = disable");
        assert_eq!(run_child(sh, &check, &env).await.unwrap(), 0);
        let err = run_child(OsStr::new("/nonexistent/cmd"), &[], &[])
            .await
            .unwrap_err();
        assert_eq!(err.exit_code(), 127);
        assert!(err.to_string().starts_with("cannot run '/nonexistent/cmd'"));
    }

    #[tokio::test]
    async fn sigterm_is_forwarded_to_the_child_and_sigint_does_not_kill_us() {
        // SIGTERM sent to this process must reach the child and end it.
        let args = vec![OsString::from("-c"), OsString::from("exec sleep 30")];
        let run = tokio::spawn(async move { run_child(OsStr::new("sh"), &args, &[]).await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        // SAFETY: signalling ourselves; the handlers installed by run_child catch both.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGINT);
            libc::kill(libc::getpid(), libc::SIGTERM);
        }
        let code = tokio::time::timeout(Duration::from_secs(10), run)
            .await
            .expect("the child ended")
            .unwrap()
            .unwrap();
        assert_eq!(code, 128 + libc::SIGTERM);
    }
}
