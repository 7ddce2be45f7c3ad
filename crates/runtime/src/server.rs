//! `postgres` servers run as direct children of this process, or adopted from a previous one.

use std::io::{self, Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::unix::AsyncFd;
use tokio::process::Child;
use tokio_postgres::NoTls;

use crate::engine::{remove_pg_env, Engine};
use crate::error::RuntimeError;
use crate::health::{Exit, Health};
use crate::run_as::{create_private_dir, RunAs};

/// How long a server may take to accept connections, and to stop before it is forced.
const START_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long to wait after SIGQUIT (immediate shutdown) before SIGKILL.
const QUIT_TIMEOUT: Duration = Duration::from_secs(5);
/// Between readiness checks: a failed check is one connect() to a socket not there yet, cheap
/// next to the milliseconds each poll interval adds to every instance start.
const POLL: Duration = Duration::from_millis(5);
/// How often a start is retried when another process took the chosen port first.
const PORT_ATTEMPTS: usize = 5;
/// How long a start waits for the backends of a server that died (SIGKILL, OOM) to notice and
/// let go of its shared memory, which PostgreSQL refuses to start over.
const LEFTOVER_WAIT: Duration = Duration::from_secs(10);
const LEFTOVER_POLL: Duration = Duration::from_millis(100);
const LOG_TAIL_LINES: usize = 20;
/// How long a left server may take to accept a connection before it is stopped rather than
/// adopted.
const ADOPT_TIMEOUT: Duration = Duration::from_secs(5);

/// How to run one server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    pub data_dir: PathBuf,
    /// Where the unix socket goes; created 0700 for the server user.
    pub socket_dir: PathBuf,
    /// Also listen on 127.0.0.1 (SCRAM only, see pg_hba.conf); else the socket only.
    pub tcp: bool,
    /// With `tcp`: also listen on this address, and report it as the server's host, for
    /// clients on other machines (a gateway elsewhere). SCRAM only, as on loopback.
    pub advertise: Option<std::net::IpAddr>,
    /// The port (for TCP and the socket's name); a free one is chosen when `None`.
    pub port: Option<u16>,
    /// The server's stdout and stderr are appended here.
    pub log_file: PathBuf,
}

/// A running `postgres`: a direct child of this process, or one a previous process of this
/// home started and this one adopted.
#[derive(Debug)]
pub struct Server {
    pub pid: u32,
    pub port: u16,
    pub socket_dir: PathBuf,
    pub data_dir: PathBuf,
    pub tcp: bool,
    /// The address clients reach it at over TCP: 127.0.0.1, or the advertised one.
    pub host: String,
    pub log_file: PathBuf,
    process: Process,
    /// How the process ended, once it did (and a child is reaped): remembered so every later
    /// look sees it, and so Drop does not signal a reused pid.
    exit: Option<Exit>,
}

/// The postgres process and how this one watches it.
#[derive(Debug)]
enum Process {
    /// Spawned here: this process reaps it and learns how it ended.
    Child(Child),
    /// Left running by a previous process and adopted: it is someone else's child (whoever
    /// inherited it reaps it), so it is watched and signalled through a pidfd, which names this
    /// process and no later one that reuses its pid.
    Adopted(AsyncFd<OwnedFd>),
}

impl Process {
    /// How it ended, if it has; `None` while it runs.
    fn try_exited(&mut self) -> Option<Exit> {
        match self {
            Process::Child(child) => child.try_wait().ok().flatten().map(Exit::from),
            Process::Adopted(fd) => pidfd_exited(fd.get_ref()).then_some(Exit::Unknown),
        }
    }

    /// Waits until it ends.
    async fn wait(&mut self) -> io::Result<Exit> {
        match self {
            Process::Child(child) => child.wait().await.map(Exit::from),
            Process::Adopted(fd) => loop {
                let mut ready = fd.readable().await?;
                if pidfd_exited(fd.get_ref()) {
                    return Ok(Exit::Unknown);
                }
                ready.clear_ready();
            },
        }
    }

    fn signal(&self, pid: u32, sig: libc::c_int) -> io::Result<()> {
        let rc = match self {
            // SAFETY: kill has no memory preconditions.
            Process::Child(_) => unsafe { libc::kill(pid as libc::pid_t, sig) },
            // SAFETY: pidfd_send_signal reads nothing through its null siginfo pointer.
            Process::Adopted(fd) => unsafe {
                libc::syscall(
                    libc::SYS_pidfd_send_signal,
                    fd.get_ref().as_raw_fd(),
                    sig,
                    std::ptr::null::<libc::siginfo_t>(),
                    0,
                ) as libc::c_int
            },
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

/// A pidfd for `pid` (Linux 5.3).
pub(crate) fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes no pointers.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor, and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

/// Whether the process of `pidfd` has ended: its pidfd polls readable from then on.
fn pidfd_exited(pidfd: &OwnedFd) -> bool {
    let mut pfd = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, and a zero timeout.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    n > 0 && pfd.revents & (libc::POLLIN | libc::POLLHUP) != 0
}

/// SCRAM for TCP clients from any address, appended to the data directory's pg_hba.conf once
/// (an instance's data is its own copy). Trust stays on the unix socket only.
fn allow_scram_from_anywhere(data_dir: &std::path::Path) -> io::Result<()> {
    const LINES: &str = "host all all 0.0.0.0/0 scram-sha-256\nhost all all ::/0 scram-sha-256\n";
    let path = data_dir.join("pg_hba.conf");
    let current = std::fs::read_to_string(&path)?;
    if current.contains("0.0.0.0/0") {
        return Ok(());
    }
    let mut file = std::fs::OpenOptions::new().append(true).open(&path)?;
    std::io::Write::write_all(&mut file, LINES.as_bytes())
}

/// A free TCP port on 127.0.0.1, as the kernel picks it.
pub fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind(("127.0.0.1", 0))?.local_addr()?.port())
}

impl Engine {
    /// Start a server on `cfg.data_dir` as `run_as` and wait until it accepts connections.
    pub async fn start(
        &self,
        cfg: ServerConfig,
        run_as: Option<&RunAs>,
    ) -> Result<Server, RuntimeError> {
        create_private_dir(&cfg.socket_dir, run_as)?;
        let began = Instant::now();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let port = match cfg.port {
                Some(p) => p,
                None => free_port()
                    .map_err(RuntimeError::io("cannot pick a port for", &cfg.data_dir))?,
            };
            match self.start_on(&cfg, port, run_as).await {
                Err(StartFailure::PortTaken(e))
                    if cfg.port.is_none() && attempt < PORT_ATTEMPTS =>
                {
                    tracing::debug!(port, "port taken before postgres bound it, retrying: {e}");
                }
                Err(StartFailure::LeftoverBackends(e)) if began.elapsed() < LEFTOVER_WAIT => {
                    tracing::debug!(data_dir = ?cfg.data_dir, "backends of a dead server still hold its shared memory, waiting: {e}");
                    tokio::time::sleep(LEFTOVER_POLL).await;
                }
                Err(
                    StartFailure::PortTaken(e)
                    | StartFailure::LeftoverBackends(e)
                    | StartFailure::Other(e),
                ) => return Err(e),
                Ok(server) => return Ok(server),
            }
        }
    }

    async fn start_on(
        &self,
        cfg: &ServerConfig,
        port: u16,
        run_as: Option<&RunAs>,
    ) -> Result<Server, StartFailure> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&cfg.log_file)
            .map_err(|e| StartFailure::Other(RuntimeError::io("cannot open", &cfg.log_file)(e)))?;
        let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
        let log_err = log
            .try_clone()
            .map_err(|e| StartFailure::Other(RuntimeError::io("cannot open", &cfg.log_file)(e)))?;

        let program = self.binary("postgres");
        let mut cmd = tokio::process::Command::new(&program);
        if let (true, Some(_)) = (cfg.tcp, cfg.advertise) {
            allow_scram_from_anywhere(&cfg.data_dir).map_err(|e| {
                StartFailure::Other(RuntimeError::io(
                    "cannot update",
                    &cfg.data_dir.join("pg_hba.conf"),
                )(e))
            })?;
        }
        let listen = listen_addresses(cfg);
        cmd.arg("-D")
            .arg(&cfg.data_dir)
            .arg("-p")
            .arg(port.to_string())
            .arg("-k")
            .arg(&cfg.socket_dir)
            .arg("-c")
            .arg(format!("listen_addresses={listen}"))
            // No fsync: a snapshot is fsynced when it is published, and an instance is
            // disposable. Commits still write their WAL to the kernel (synchronous_commit stays
            // on, which costs a write(), not a flush), so whatever a client committed survives
            // the server being killed: a daemon that dies and comes back finds kept instances
            // as their users left them, passwords included.
            .args(["-c", "fsync=off"])
            .args(["-c", "full_page_writes=off"])
            // Old WAL segments are deleted, not renamed for reuse: a recycled segment is a
            // file under a new name that no snapshot could share.
            .args(["-c", "wal_recycle=off"])
            .args([
                "-c",
                "unix_socket_permissions=0700",
                "-c",
                "logging_collector=off",
            ])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            // Dropping a Server sends SIGQUIT itself: SIGKILL would leave the backends running.
            .kill_on_drop(false);
        if let Some(parent) = cfg.data_dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            cmd.current_dir(parent);
        }
        remove_pg_env(&mut cmd);
        if let Some(r) = run_as {
            // std drops the supplementary groups itself (setgroups) when root sets a uid.
            cmd.uid(r.uid).gid(r.gid);
        }
        let child = cmd.spawn().map_err(|source| {
            StartFailure::Other(RuntimeError::Spawn {
                program: program.clone(),
                source,
            })
        })?;
        let mut server = Server::running(cfg, child.id().unwrap_or(0), port, Process::Child(child));

        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if server.connect_local().await.is_ok() {
                return Ok(server);
            }
            if let Some(status) = server.try_exited() {
                let log = read_from(&cfg.log_file, log_start);
                let err = RuntimeError::Start {
                    data_dir: cfg.data_dir.clone(),
                    reason: format!("postgres exited ({status})"),
                    log_tail: tail(&log, LOG_TAIL_LINES),
                };
                return Err(if log.contains("could not bind") {
                    StartFailure::PortTaken(err)
                } else if log.contains("pre-existing shared memory block") {
                    StartFailure::LeftoverBackends(err)
                } else {
                    StartFailure::Other(err)
                });
            }
            if Instant::now() >= deadline {
                let log_tail = tail(&read_from(&cfg.log_file, log_start), LOG_TAIL_LINES);
                // Best effort: the timeout is the error worth reporting, not a failed stop.
                if let Err(e) = server.stop_inner().await {
                    tracing::warn!("stopping a server that did not start: {e}");
                }
                return Err(StartFailure::Other(RuntimeError::Start {
                    data_dir: cfg.data_dir.clone(),
                    reason: format!("no connection accepted within {START_TIMEOUT:?}"),
                    log_tail,
                }));
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

/// `listen_addresses` for a server run as `cfg` says.
fn listen_addresses(cfg: &ServerConfig) -> String {
    match (cfg.tcp, cfg.advertise) {
        (false, _) => String::new(),
        (true, None) => "127.0.0.1".to_owned(),
        // A loopback address of its own (one per pod in the fake cluster) is the only one:
        // 127.0.0.1 on the same port may belong to another server.
        (true, Some(addr)) if addr.is_loopback() => addr.to_string(),
        (true, Some(addr)) => format!("127.0.0.1,{addr}"),
    }
}

/// The address clients reach a server run as `cfg` at over TCP.
fn advertised_host(cfg: &ServerConfig) -> String {
    match cfg.advertise {
        Some(addr) => addr.to_string(),
        None => "127.0.0.1".to_owned(),
    }
}

impl Engine {
    /// Takes over the server a previous process left running on `cfg.data_dir`, if it is
    /// running as `cfg` says (socket directory, addresses) and accepts connections: its
    /// clients stay connected. `None` when there is none to adopt; the caller then stops
    /// whatever is there ([`crate::orphan::kill_orphan`]) and starts a new one.
    pub async fn adopt(cfg: &ServerConfig) -> Result<Option<Server>, RuntimeError> {
        let data_dir = cfg.data_dir.clone();
        let listen = listen_addresses(cfg);
        let socket_dir = cfg.socket_dir.clone();
        let found = tokio::task::spawn_blocking(move || {
            crate::orphan::find_running(&data_dir, &socket_dir, &listen)
        })
        .await
        .map_err(|e| {
            RuntimeError::io("cannot look for a server on", &cfg.data_dir)(io::Error::other(e))
        })?;
        let Some((pid, port, pidfd)) = found else {
            return Ok(None);
        };
        // SAFETY: the OwnedFd is moved in, so its descriptor stays open and the same for as
        // long as the AsyncFd lives.
        let pidfd = unsafe { AsyncFd::register(pidfd) }
            .map_err(|e| RuntimeError::io("cannot watch the server of", &cfg.data_dir)(e.into()))?;
        let mut server = Server::running(cfg, pid, port, Process::Adopted(pidfd));
        match tokio::time::timeout(ADOPT_TIMEOUT, server.connect_local()).await {
            Ok(Ok(_)) => Ok(Some(server)),
            Ok(Err(e)) => {
                tracing::warn!(pid, data_dir = ?cfg.data_dir, error = %e, "a left server does not accept connections; not adopting it");
                // Its Drop must not signal it: the caller's kill_orphan stops it properly.
                server.exit = Some(Exit::Unknown);
                Ok(None)
            }
            Err(_) => {
                tracing::warn!(pid, data_dir = ?cfg.data_dir, "a left server did not answer within {ADOPT_TIMEOUT:?}; not adopting it");
                server.exit = Some(Exit::Unknown);
                Ok(None)
            }
        }
    }
}

enum StartFailure {
    /// Another process bound the port between our pick and the server's bind.
    PortTaken(RuntimeError),
    /// Backends of a previous server on this data directory, which died, have not exited yet.
    LeftoverBackends(RuntimeError),
    Other(RuntimeError),
}

impl Server {
    /// The server `process` (pid `pid`) runs as `cfg` says, on `port`.
    fn running(cfg: &ServerConfig, pid: u32, port: u16, process: Process) -> Self {
        Server {
            pid,
            port,
            socket_dir: cfg.socket_dir.clone(),
            data_dir: cfg.data_dir.clone(),
            tcp: cfg.tcp,
            host: advertised_host(cfg),
            log_file: cfg.log_file.clone(),
            process,
            exit: None,
        }
    }

    /// Stop with a fast shutdown (a clean checkpoint); after 60 s, SIGQUIT, then SIGKILL.
    pub async fn stop(mut self) -> Result<(), RuntimeError> {
        self.stop_inner().await
    }

    /// End a server whose data directory is about to be deleted: an immediate shutdown (no
    /// checkpoint to write for data nobody will read again), then reap it; SIGKILL after 10 s.
    pub async fn discard(mut self) -> Result<(), RuntimeError> {
        if self.try_exited().is_some() {
            return Ok(());
        }
        self.signal(libc::SIGQUIT)?;
        if self.wait_for(Duration::from_secs(10)).await?.is_none() {
            self.signal(libc::SIGKILL)?;
            self.wait_for(STOP_TIMEOUT).await?;
        }
        Ok(())
    }

    async fn stop_inner(&mut self) -> Result<(), RuntimeError> {
        if let Some(status) = self.try_exited() {
            return Err(self.stop_error(format!("it had already exited ({status})")));
        }
        self.signal(libc::SIGINT)?;
        if let Some(status) = self.wait_for(STOP_TIMEOUT).await? {
            // An adopted server's status went to its parent: that it ended is all there is.
            return if matches!(status, Exit::Code(0) | Exit::Unknown) {
                Ok(())
            } else {
                Err(self.stop_error(format!("it {status}")))
            };
        }
        tracing::warn!(
            pid = self.pid,
            "postgres ignored a fast shutdown; sending SIGQUIT"
        );
        self.signal(libc::SIGQUIT)?;
        if self.wait_for(QUIT_TIMEOUT).await?.is_some() {
            return Err(self.stop_error(format!(
                "no fast shutdown within {STOP_TIMEOUT:?}; stopped with SIGQUIT"
            )));
        }
        self.signal(libc::SIGKILL)?;
        self.wait_for(QUIT_TIMEOUT).await?;
        Err(self.stop_error(format!(
            "no shutdown within {STOP_TIMEOUT:?}, even after SIGQUIT; killed"
        )))
    }

    fn stop_error(&self, reason: String) -> RuntimeError {
        RuntimeError::Stop {
            pid: self.pid,
            data_dir: self.data_dir.clone(),
            reason,
        }
    }

    fn signal(&self, sig: libc::c_int) -> Result<(), RuntimeError> {
        // kill(0, ..) would signal our whole process group.
        if self.pid == 0 {
            return Err(RuntimeError::Signal {
                pid: 0,
                source: io::Error::from_raw_os_error(libc::ESRCH),
            });
        }
        // A child is not reaped yet (callers check), and an adopted one is named by its pidfd,
        // so the signal cannot reach a process that reused the pid.
        self.process
            .signal(self.pid, sig)
            .map_err(|source| RuntimeError::Signal {
                pid: self.pid,
                source,
            })
    }

    /// Wait for the server to end (and reap a child) within `limit`; `None` if it still runs.
    async fn wait_for(&mut self, limit: Duration) -> Result<Option<Exit>, RuntimeError> {
        match tokio::time::timeout(limit, self.process.wait()).await {
            Err(_) => Ok(None),
            Ok(Ok(status)) => {
                self.record_exit(status);
                Ok(Some(status))
            }
            Ok(Err(e)) => Err(RuntimeError::io(
                "cannot wait for postgres of",
                &self.data_dir,
            )(e)),
        }
    }

    /// Set `role`'s password, sending only its SCRAM verifier: the plain password never reaches
    /// the server or its log.
    pub async fn set_password(&self, role: &str, password: &str) -> Result<(), RuntimeError> {
        let verifier = postgres_protocol::password::scram_sha_256(password.as_bytes());
        let sql = format!(
            "ALTER ROLE {} PASSWORD {}",
            quote_ident(role),
            quote_literal(&verifier)
        );
        let client = self.connect_local().await?;
        client
            .batch_execute(&sql)
            .await
            .map_err(|source| RuntimeError::SetPassword {
                role: role.to_owned(),
                source,
            })
    }

    /// Runs `sql` (statements, no rows back) as the superuser over the unix socket.
    pub async fn execute(&self, sql: &str) -> Result<(), RuntimeError> {
        let client = self.connect_local().await?;
        client
            .batch_execute(sql)
            .await
            .map_err(|source| RuntimeError::Execute {
                data_dir: self.data_dir.clone(),
                source,
            })
    }

    /// A superuser session over the unix socket; its connection runs on a spawned task.
    pub async fn connect_local(&self) -> Result<tokio_postgres::Client, RuntimeError> {
        let (client, connection) = tokio_postgres::Config::new()
            .host_path(&self.socket_dir)
            .port(self.port)
            .user("postgres")
            .dbname("postgres")
            .application_name("taidon-runtime")
            .connect_timeout(Duration::from_secs(10))
            .connect(NoTls)
            .await
            .map_err(|source| RuntimeError::Connect {
                socket_dir: self.socket_dir.clone(),
                source,
            })?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!("local postgres connection ended: {e}");
            }
        });
        Ok(client)
    }

    /// How the server ended if it has (a child is reaped then), else `None`. Once it has
    /// ended, every call returns the same.
    pub fn try_exited(&mut self) -> Option<Exit> {
        if self.exit.is_none() {
            if let Some(status) = self.process.try_exited() {
                self.record_exit(status);
            }
        }
        self.exit
    }

    /// Whether the server still runs, or how it ended.
    pub fn health(&mut self) -> Health {
        match self.try_exited() {
            None => Health::Running,
            Some(status) => Health::Exited { status },
        }
    }

    /// Remembers how the reaped child ended. A server that did not shut down cleanly (killed,
    /// crashed) leaves its postmaster.pid behind; it names a pid that is free now and may be
    /// reused by another server's backend, which would make PostgreSQL refuse the restart.
    fn record_exit(&mut self, status: Exit) {
        self.exit = Some(status);
        let pid_file = self.data_dir.join("postmaster.pid");
        let names_ours = std::fs::read_to_string(&pid_file).is_ok_and(|text| {
            text.lines().next().map(str::trim) == Some(self.pid.to_string().as_str())
        });
        if names_ours {
            if let Err(e) = std::fs::remove_file(&pid_file) {
                tracing::warn!(pid_file = ?pid_file, error = %e, "cannot remove a dead server's postmaster.pid");
            }
        }
    }
}

impl Drop for Server {
    /// A server dropped without `stop` gets an immediate shutdown rather than running on
    /// unowned; SIGQUIT (unlike SIGKILL) also ends its backends.
    fn drop(&mut self) {
        if self.pid != 0 && self.exit.is_none() && self.process.try_exited().is_none() {
            tracing::warn!(pid = self.pid, data_dir = ?self.data_dir, "server dropped while running; sending SIGQUIT");
            // The child is unreaped (or the pidfd names it), so the signal is the server's.
            let _ = self.process.signal(self.pid, libc::SIGQUIT);
        }
    }
}

/// `"name"` with embedded quotes doubled.
pub(crate) fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `'text'` with embedded quotes doubled (standard_conforming_strings is on).
fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// The log written since `offset`, lossily decoded; empty when unreadable.
fn read_from(path: &Path, offset: u64) -> String {
    let mut buf = Vec::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        if f.seek(SeekFrom::Start(offset)).is_ok() {
            let _ = f.read_to_end(&mut buf);
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_doubles_quotes() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
    }

    #[test]
    fn tail_keeps_last_lines() {
        assert_eq!(tail("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail("a", 5), "a");
    }
}
