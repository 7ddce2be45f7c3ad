//! Backend sessions kept after their client left, for the next client with the same key: no
//! backend login, no fork. A session enters only when the relay saw it idle, and only after
//! `DISCARD ALL` answered cleanly; it leaves when taken, when idle past the pool's timeout,
//! when its backend closes or speaks, or when its instance needs the slot.

use std::collections::HashMap;
use std::io;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use taidon_core::{InstanceId, StateId};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::codec::{self, StartupParams};
use crate::flow::{self, BackendKey, Conn, ReadError, Welcome};
use crate::GatewayError;

/// How the pool behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolConfig {
    /// Pooled sessions idle this long are closed.
    pub idle: Duration,
    /// The most sessions kept, over every instance.
    pub max_sessions: usize,
    /// The longest a reset (`DISCARD ALL`) may take before the session is closed instead.
    pub reset_timeout: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            idle: Duration::from_secs(60),
            max_sessions: 1000,
            reset_timeout: Duration::from_secs(5),
        }
    }
}

/// Which sessions may serve a client: same instance and server, same role, and the same
/// startup parameters (database, `application_name`, `options`, …), which `DISCARD ALL`'s
/// `RESET ALL` returns every setting to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct PoolKey {
    pub(crate) instance: InstanceId,
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) user: String,
    pub(crate) params: StartupParams,
}

impl PoolKey {
    /// The key of sessions on `target` logged in with `params`.
    pub(crate) fn new(target: &taidon_api::Target, params: &StartupParams) -> Self {
        Self {
            instance: target.instance_id,
            host: target.host.clone(),
            port: target.port,
            user: target.user.clone(),
            params: params.clone(),
        }
    }
}

/// A backend session logged in and ready for a query.
pub(crate) struct BackendSession {
    pub(crate) stream: TcpStream,
    pub(crate) key: Option<BackendKey>,
    /// What the backend reported at login, kept current by resets.
    pub(crate) welcome: Welcome,
}

struct Parked {
    session: BackendSession,
    state: StateId,
    since: Instant,
}

/// The kept sessions, by key.
pub(crate) struct Pool {
    config: PoolConfig,
    idle: Mutex<Idle>,
}

#[derive(Default)]
struct Idle {
    by_key: HashMap<PoolKey, Vec<Parked>>,
    total: usize,
}

impl Idle {
    fn remove_where(
        &mut self,
        mut doomed: impl FnMut(&PoolKey, &Parked) -> bool,
    ) -> Vec<InstanceId> {
        let mut closed = Vec::new();
        self.by_key.retain(|key, parked| {
            parked.retain(|p| {
                let drop = doomed(key, p);
                if drop {
                    closed.push(key.instance);
                }
                !drop
            });
            !parked.is_empty()
        });
        self.total -= closed.len();
        closed
    }
}

/// Whether a kept session's backend is still there and silent. An idle backend sends nothing
/// unprompted but a FATAL before it closes (terminated, shut down): any byte, or EOF, or an
/// error, means it cannot be handed on.
fn still_quiet(stream: &TcpStream) -> bool {
    use std::os::fd::AsRawFd;
    // A peek straight at the socket: tokio's `try_read` trusts readiness the reactor may not
    // have seen yet, and a kept session must not be handed out on stale news.
    let mut probe = 0u8;
    // SAFETY: the descriptor is open for as long as `stream` lives, and `probe` is a valid
    // one-byte buffer; MSG_PEEK leaves the socket's data where it is.
    let n = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            std::ptr::addr_of_mut!(probe).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock
}

impl Pool {
    pub(crate) fn new(config: PoolConfig) -> Self {
        Self {
            config,
            idle: Mutex::new(Idle::default()),
        }
    }

    pub(crate) fn config(&self) -> PoolConfig {
        self.config
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Idle> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The most recently kept live session for `key`, and the instances of the dead ones met
    /// on the way (closed now: the controller hears of them).
    pub(crate) fn take(&self, key: &PoolKey) -> (Option<BackendSession>, Vec<InstanceId>) {
        let mut idle = self.lock();
        let mut closed = Vec::new();
        let mut found = None;
        if let Some(parked) = idle.by_key.get_mut(key) {
            while let Some(p) = parked.pop() {
                if still_quiet(&p.session.stream) {
                    found = Some(p.session);
                    break;
                }
                closed.push(key.instance);
            }
            if parked.is_empty() {
                idle.by_key.remove(key);
            }
        }
        idle.total -= closed.len() + usize::from(found.is_some());
        (found, closed)
    }

    /// Keeps `session` for `key`; `false` (and the session dropped) when the pool is full.
    pub(crate) fn put(&self, key: PoolKey, state: StateId, session: BackendSession) -> bool {
        let mut idle = self.lock();
        if idle.total >= self.config.max_sessions {
            return false;
        }
        idle.total += 1;
        idle.by_key.entry(key).or_default().push(Parked {
            session,
            state,
            since: Instant::now(),
        });
        true
    }

    /// Closes the longest-kept session of `state` (`None`: of any state) on `instance` (`None`:
    /// on any); returns its instance, or `None` if there was none.
    pub(crate) fn close_one(
        &self,
        state: Option<StateId>,
        instance: Option<InstanceId>,
    ) -> Option<InstanceId> {
        let mut idle = self.lock();
        let oldest = idle
            .by_key
            .iter()
            .filter(|(k, _)| instance.is_none_or(|i| k.instance == i))
            .flat_map(|(k, v)| v.iter().enumerate().map(move |(i, p)| (k, i, p)))
            .filter(|(_, _, p)| state.is_none_or(|s| p.state == s))
            .min_by_key(|(_, _, p)| p.since)
            .map(|(k, i, _)| (k.clone(), i))?;
        let (key, i) = oldest;
        let parked = idle.by_key.get_mut(&key)?;
        parked.remove(i);
        if parked.is_empty() {
            idle.by_key.remove(&key);
        }
        idle.total -= 1;
        Some(key.instance)
    }

    /// Closes the sessions idle past the timeout and those whose backend went away; returns
    /// their instances.
    pub(crate) fn reap(&self, now: Instant) -> Vec<InstanceId> {
        let max_idle = self.config.idle;
        self.lock().remove_where(|_, p| {
            now.saturating_duration_since(p.since) >= max_idle || !still_quiet(&p.session.stream)
        })
    }

    /// Closes every kept session; returns their instances.
    pub(crate) fn clear(&self) -> Vec<InstanceId> {
        self.lock().remove_where(|_, _| true)
    }

    /// How many sessions are kept.
    pub(crate) fn len(&self) -> usize {
        self.lock().total
    }
}

/// Why a session could not be reset for the next client.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ResetError {
    #[error(transparent)]
    Backend(#[from] GatewayError),
    #[error("the backend refused the reset: {0}")]
    Refused(String),
    #[error("the backend answered the reset with {0:?}")]
    Unexpected(char),
    #[error("the reset did not end idle (status {0:?})")]
    NotIdle(char),
    #[error("the backend sent more after the reset")]
    Trailing,
}

/// The statement every kept session runs before it is kept: drops temporary tables, prepared
/// statements, cursors and plans, resets every setting to its startup value and the session
/// role, and `UNLISTEN *` and `pg_advisory_unlock_all()`. As a simple query it also drops the
/// unnamed statement; portals died with the last transaction.
pub(crate) const RESET_SQL: &str = "DISCARD ALL";

/// Resets a backend session the relay left idle, so the next client sees nothing of the last
/// one; ParameterStatus changes it reports are kept in `welcome`. Notifications and notices
/// that arrive on the way are dropped.
pub(crate) async fn reset<B: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut B,
    welcome: &mut Welcome,
) -> Result<(), ResetError> {
    let mut out = BytesMut::new();
    postgres_protocol::message::frontend::query(RESET_SQL, &mut out)
        .map_err(|e| ResetError::Backend(GatewayError::BackendProtocol(e)))?;
    let mut conn = Conn::new(stream);
    conn.send(&out).await.map_err(GatewayError::BackendIo)?;
    let mut completed = false;
    loop {
        let raw = conn
            .read(flow::take_message)
            .await
            .map_err(ReadError::backend)?;
        match raw[0] {
            b'C' => completed = true,
            b'S' => {
                if let Some((name, value)) = codec::parse_parameter_status(&raw[5..]) {
                    welcome.set_param(name, value);
                }
            }
            b'N' | b'A' => {}
            b'E' => return Err(ResetError::Refused(flow::summarize_error(&raw))),
            b'Z' => {
                let status = raw.get(5).copied().unwrap_or(0);
                if !completed || status != b'I' {
                    return Err(ResetError::NotIdle(char::from(status)));
                }
                break;
            }
            other => return Err(ResetError::Unexpected(char::from(other))),
        }
    }
    if !conn.buf.is_empty() {
        return Err(ResetError::Trailing);
    }
    Ok(())
}
