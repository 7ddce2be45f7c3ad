//! The PostgreSQL wire-protocol gateway: one TCP port for every instance.
//!
//! A client connects with `postgres://sqlrs:<JWT>@host:port/postgres` (or the token as the user
//! name); the gateway reads its startup packet (switching to TLS on an SSLRequest), verifies
//! the token against its keyset, asks the controller where the token's instance runs (Resolve,
//! retried while it starts), logs in to that server with credentials the client never sees,
//! hands the client the backend's process id with a cancel key of its own, and relays bytes
//! both ways until either side closes or a session limit ends it. The controller hears Touch
//! while the connection lives and Release when it ends.
//!
//! A backend session whose client left it idle is reset (`DISCARD ALL`) and kept in a pool
//! (see `pool`): the next client with the same instance, role and startup parameters gets it
//! with no backend login. The controller hears Park when a session is kept (it still counts
//! against the instance's connection limit, but not as activity) and Unpark when it is closed
//! or handed on.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]
#![deny(clippy::todo, clippy::dbg_macro)]

mod codec;
mod error;
mod flow;
mod keys;
mod limits;
mod metrics;
mod pool;
mod relay;
mod resolve;
mod stream;
#[cfg(test)]
mod tests;
mod tls;

#[cfg(feature = "fuzzing")]
pub mod fuzzing;

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use postgres_protocol::message::frontend;
use taidon_api::{ResolveResponse, Target};
use taidon_core::token::{SharedKeyset, TokenError};
use taidon_core::InstanceId;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

pub use error::{ClientError, ErrorKind, GatewayError, Step};
pub use keys::{keyset_of, ControllerKeys, KeySource, KeysError};
pub use limits::RateLimit;
pub use metrics::GatewayMetrics;
pub use pool::PoolConfig;
pub use resolve::{HttpResolver, ResolveError, Resolver};
pub use tls::{ensure_self_signed, listen_hosts, server_config, TlsError, TlsFiles};

use flow::{BackendKey, Conn, Startup};
use limits::{RateLimiter, SessionLimits, Waiting};
use pool::{BackendSession, Pool, PoolKey};
use stream::ClientStream;

/// The time tokens are checked against.
pub trait Clock: Send + Sync {
    /// Seconds since the Unix epoch.
    fn now_s(&self) -> u64;
}

/// The system's clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_s(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    }
}

/// How the gateway behaves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayConfig {
    /// The longest each handshake step (startup, auth, one resolve, connect) may take.
    pub handshake_timeout: Duration,
    /// Refuse clients that did not negotiate TLS, except over loopback.
    pub require_tls: bool,
    /// How long a connection may wait for a starting instance before 57P03.
    pub starting_wait: Duration,
    /// How many times a STARTING answer is retried at most.
    pub starting_retries: u32,
    /// Connections waiting for a starting instance, overall.
    pub max_waiting: usize,
    /// Connections waiting for a starting instance, per state.
    pub max_waiting_per_state: usize,
    /// New connections per client address.
    pub rate_per_ip: RateLimit,
    /// New connections per token subject.
    pub rate_per_subject: RateLimit,
    /// How often the controller hears that open connections are still there.
    pub touch_interval: Duration,
    /// Sessions idle this long are ended (a token's `max_idle_s` can only shorten it).
    pub max_idle: Option<Duration>,
    /// Sessions are ended this long after they start (a token's `max_duration_s` likewise).
    pub max_duration: Option<Duration>,
    /// Backend sessions kept for reuse after their client leaves; `None` closes every one.
    pub pool: Option<PoolConfig>,
    /// Client connections held at most (see [`fd_budget`]); more are told 53300 and closed.
    pub max_clients: Option<usize>,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            require_tls: false,
            starting_wait: Duration::from_secs(60),
            starting_retries: 600,
            max_waiting: 256,
            max_waiting_per_state: 64,
            // A reused session costs a few hundred microseconds: a test suite on one machine
            // may open thousands a second.
            rate_per_ip: RateLimit {
                burst: 10_000,
                per_s: 5_000,
            },
            rate_per_subject: RateLimit {
                burst: 10_000,
                per_s: 5_000,
            },
            touch_interval: Duration::from_secs(10),
            max_idle: None,
            max_duration: None,
            pool: Some(PoolConfig::default()),
            max_clients: None,
        }
    }
}

/// Where a client's cancel key leads: the client was given the backend's process id and a
/// secret of the gateway's own, which the backend's real key stands behind.
struct CancelRoute {
    secret: Box<[u8]>,
    conn_id: u64,
    host: String,
    port: u16,
    backend: BackendKey,
}

/// Compares two secrets in time that depends on their lengths only.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The gateway: verifies each connection's token and relays it to its instance.
pub struct Gateway {
    config: GatewayConfig,
    keys: Arc<SharedKeyset>,
    resolver: Arc<dyn Resolver>,
    /// Asked for fresh keys when a token names an unknown key (a gateway apart from the
    /// controller); `None` when the keyset is kept current otherwise.
    key_source: Option<Arc<dyn KeySource>>,
    clock: Arc<dyn Clock>,
    tls: Option<TlsAcceptor>,
    /// Set when the drain is over: every relayed session ends with 57P01.
    terminate: tokio::sync::watch::Sender<bool>,
    /// The cancel keys handed to clients, by backend process id (ids of different servers
    /// may be the same; their secrets tell them apart).
    cancels: Mutex<HashMap<i32, Vec<CancelRoute>>>,
    /// Backend sessions kept for the next client; `None` with pooling off.
    pool: Option<Pool>,
    /// The instance of every open session, by connection number, for Touch.
    leases: Mutex<HashMap<u64, InstanceId>>,
    next_conn: AtomicU64,
    per_ip: RateLimiter<IpAddr>,
    per_subject: RateLimiter<String>,
    waiting: Waiting,
    /// `None`: no metrics are kept.
    metrics: Option<GatewayMetrics>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("config", &self.config)
            .field("keys", &self.keys)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

/// What a successful handshake leaves: the backend, what the client is sent first, and the
/// bookkeeping to undo when the session ends.
struct Session {
    backend: BackendSession,
    /// Backend bytes read past its ReadyForQuery during the login (normally none).
    leftover: BytesMut,
    greeting: BytesMut,
    instance: InstanceId,
    state: taidon_core::StateId,
    conn_id: u64,
    cancel_pid: i32,
    limits: SessionLimits,
    /// Where the session goes when its client leaves it idle; `None`: it is closed.
    pool_key: Option<PoolKey>,
}

/// A backend session for a client: one taken from the pool, or a new login.
enum Dialed {
    Pooled(BackendSession),
    Fresh(TcpStream),
}

fn is_loopback(peer: Option<SocketAddr>) -> bool {
    // In-process streams (tests, fuzzing) have no address.
    peer.is_none_or(|p| p.ip().is_loopback())
}

impl Gateway {
    /// A gateway that verifies tokens with `keys` against the system clock, without TLS.
    pub fn new(
        config: GatewayConfig,
        keys: Arc<SharedKeyset>,
        resolver: Arc<dyn Resolver>,
    ) -> Self {
        Self {
            per_ip: RateLimiter::new(config.rate_per_ip),
            per_subject: RateLimiter::new(config.rate_per_subject),
            pool: config.pool.map(Pool::new),
            config,
            keys,
            resolver,
            key_source: None,
            clock: Arc::new(SystemClock),
            tls: None,
            terminate: tokio::sync::watch::channel(false).0,
            cancels: Mutex::new(HashMap::new()),
            leases: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(1),
            waiting: Waiting::default(),
            metrics: None,
        }
    }

    /// The same gateway counting into `metrics`.
    pub fn with_metrics(mut self, metrics: GatewayMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// The same gateway checking token times against `clock`.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// The same gateway asking `source` for fresh keys when a token names an unknown key.
    pub fn with_key_source(mut self, source: Arc<dyn KeySource>) -> Self {
        self.key_source = Some(source);
        self
    }

    /// The same gateway answering SSLRequest with TLS under `config`.
    pub fn with_tls(mut self, config: Arc<rustls::ServerConfig>) -> Self {
        self.tls = Some(TlsAcceptor::from(config));
        self
    }

    /// Open sessions (for tests and status).
    pub fn sessions(&self) -> usize {
        self.leases.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Backend sessions kept for reuse (for tests and status).
    pub fn pooled(&self) -> usize {
        self.pool.as_ref().map_or(0, Pool::len)
    }

    /// Accepts connections on `listener`, each in its own task, until `shutdown` resolves; then
    /// stops accepting and ends the sessions still open with 57P01.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        self.serve_draining(listener, shutdown, Duration::ZERO)
            .await;
    }

    /// [`Gateway::serve`], letting open sessions finish for up to `drain` after `shutdown`
    /// resolves: the listener closes at once (new connections are refused), then the sessions
    /// still open when the drain is over are ended with a FATAL 57P01 ErrorResponse.
    pub async fn serve_draining(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
        drain: Duration,
    ) {
        tokio::pin!(shutdown);
        let mut conns = JoinSet::new();
        let toucher = tokio::spawn(Arc::clone(&self).touch_loop());
        let reaper = tokio::spawn(Arc::clone(&self).reap_loop());
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        if let Err(e) = stream.set_nodelay(true) {
                            debug!(%peer, error = %e, "cannot set TCP_NODELAY");
                        }
                        let gateway = Arc::clone(&self);
                        if let Some(max) = self.config.max_clients.filter(|m| conns.len() >= *m) {
                            // Past the refusals a flood may hold too: closed unanswered.
                            if conns.len() < max + REFUSING {
                                conns.spawn(async move { gateway.refuse_full(stream, max).await });
                            }
                            continue;
                        }
                        conns.spawn(async move {
                            if let Err(e) = gateway.handle(stream, Some(peer)).await {
                                log_failure(&peer.to_string(), &e);
                            }
                        });
                    }
                    Err(e) => {
                        // Out of file descriptors, most likely: wait rather than spin.
                        warn!(error = %e, "cannot accept a connection");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
        drop(listener);
        if !conns.is_empty() && !drain.is_zero() {
            info!(
                sessions = conns.len(),
                drain_s = drain.as_secs_f64(),
                "draining"
            );
            let _ = tokio::time::timeout(drain, join_all(&mut conns)).await;
        }
        if !conns.is_empty() {
            info!(sessions = conns.len(), "ending the sessions still open");
            self.terminate.send_replace(true);
            // Sessions at a message boundary end at once; one mid-handshake or mid-message is
            // given a moment, then dropped.
            let _ = tokio::time::timeout(TERMINATE_GRACE, join_all(&mut conns)).await;
        }
        toucher.abort();
        reaper.abort();
        conns.shutdown().await;
        if let Some(pool) = &self.pool {
            self.unpark(pool.clear()).await;
        }
    }

    /// Closes kept sessions idle too long or whose backend went away, every second.
    async fn reap_loop(self: Arc<Self>) {
        let Some(pool) = &self.pool else { return };
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let closed = pool.reap(Instant::now());
            if !closed.is_empty() {
                debug!(sessions = closed.len(), "closed kept sessions");
                self.unpark(closed).await;
            }
        }
    }

    /// Tells a client over the connection limit so (53300), once it has said who it is.
    async fn refuse_full(&self, stream: TcpStream, limit: usize) {
        let e = GatewayError::GatewayFull { limit };
        if let Some(m) = &self.metrics {
            m.failed(&e);
        }
        let mut client = Conn::new(ClientStream::Plain(stream));
        let startup = tokio::time::timeout(
            REFUSAL_TIMEOUT,
            flow::startup(&mut client, self.tls.as_ref()),
        )
        .await;
        if let Ok(Ok(Startup::Login { .. })) = startup {
            self.tell_client(&mut client, &e).await;
        }
        warn!(limit, "{e}");
    }

    /// Tells the controller that these kept sessions are closed or handed on.
    async fn unpark(&self, instances: Vec<InstanceId>) {
        if instances.is_empty() {
            return;
        }
        if let Err(e) = self.resolver.unpark(instances).await {
            warn!(error = %e, "cannot tell the controller of closed kept sessions");
        }
    }

    /// Tells the controller, every `touch_interval`, which instances have open sessions.
    async fn touch_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.config.touch_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let ids: Vec<InstanceId> = self
                .leases
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .values()
                .copied()
                .collect();
            if !ids.is_empty() {
                if let Err(e) = self.resolver.touch(ids).await {
                    debug!(error = %e, "touch failed");
                }
            }
        }
    }

    /// Runs one client connection to its end: handshake, then relay until either side closes
    /// or a limit ends the session. On failure the client is sent a FATAL ErrorResponse when it
    /// can take one. `peer` is the client's address (`None` in-process).
    pub async fn handle<S>(&self, stream: S, peer: Option<SocketAddr>) -> Result<(), GatewayError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let began = Instant::now();
        let mut client = Conn::new(ClientStream::Plain(stream));
        let session = match self.connect(&mut client, peer).await {
            Ok(Some(s)) => s,
            Ok(None) => return Ok(()),
            Err(e) => {
                if let Some(m) = &self.metrics {
                    m.failed(&e);
                }
                self.tell_client(&mut client, &e).await;
                return Err(e);
            }
        };
        let _open = self
            .metrics
            .as_ref()
            .map(|m| m.connected(began.elapsed().as_secs_f64()));
        let conn_id = session.conn_id;
        self.leases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(conn_id, session.instance);
        let Session {
            mut backend,
            leftover,
            greeting,
            instance,
            state,
            cancel_pid,
            limits,
            pool_key,
            ..
        } = session;
        let end = self
            .run_session(
                client,
                &mut backend.stream,
                &greeting,
                leftover,
                limits,
                pool_key.is_some(),
            )
            .await;
        self.leases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&conn_id);
        self.forget_cancel(cancel_pid, conn_id);
        let relayed = match end {
            Ok(r) => r,
            Err(e) => {
                self.release(instance).await;
                return Err(e);
            }
        };
        debug!(end = ?relayed.end, reusable = relayed.reusable, "session ended");
        match (pool_key, &self.pool) {
            (Some(key), Some(pool)) if relayed.reusable => {
                self.keep(pool, key, state, backend).await;
            }
            (Some(_), _) => {
                // Kept from the Terminate the client sent; the backend hears it now.
                let _ = backend.stream.try_write(TERMINATE);
                self.release(instance).await;
            }
            _ => self.release(instance).await,
        }
        Ok(())
    }

    /// Resets `backend`, which its client left idle, and keeps it for the next client with
    /// `key`; one that cannot be reset, or that finds the pool full, is closed.
    async fn keep(
        &self,
        pool: &Pool,
        key: PoolKey,
        state: taidon_core::StateId,
        mut backend: BackendSession,
    ) {
        let instance = key.instance;
        let reset = tokio::time::timeout(
            pool.config().reset_timeout,
            pool::reset(&mut backend.stream, &mut backend.welcome),
        )
        .await;
        match reset {
            Ok(Ok(())) => {
                backend.welcome.other.clear();
                if pool.put(key, state, backend) {
                    if let Err(e) = self.resolver.park(vec![instance]).await {
                        warn!(%instance, error = %e, "cannot tell the controller of a kept session");
                    }
                    return;
                }
                debug!(%instance, "the pool is full: session closed");
            }
            Ok(Err(e)) => debug!(%instance, error = %error_chain(&e), "session not reset: closed"),
            Err(_) => debug!(%instance, "session reset timed out: closed"),
        }
        self.release(instance).await;
    }

    /// Forgets the cancel key handed out for connection `conn_id`.
    fn forget_cancel(&self, pid: i32, conn_id: u64) {
        let mut cancels = self.cancels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(routes) = cancels.get_mut(&pid) {
            routes.retain(|r| r.conn_id != conn_id);
            if routes.is_empty() {
                cancels.remove(&pid);
            }
        }
    }

    async fn run_session<S>(
        &self,
        mut client: Conn<ClientStream<S>>,
        backend: &mut TcpStream,
        greeting: &[u8],
        leftover: BytesMut,
        limits: SessionLimits,
        keep: bool,
    ) -> Result<relay::Relayed, GatewayError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        client
            .send(greeting)
            .await
            .map_err(GatewayError::ClientIo)?;
        // Bytes the client sent after its password, and the backend after its ReadyForQuery,
        // go through the relay's bookkeeping like the rest.
        let pipelined = std::mem::take(&mut client.buf);
        Ok(relay::relay(
            client.io,
            backend,
            relay::Opening {
                up: pipelined,
                down: leftover,
            },
            limits,
            self.terminate.subscribe(),
            keep,
            self.metrics.as_ref().map(|m| relay::Tally {
                up: &m.bytes_up,
                down: &m.bytes_down,
            }),
        )
        .await)
    }

    async fn release(&self, instance: InstanceId) {
        if let Err(e) = self.resolver.release(vec![instance]).await {
            warn!(%instance, error = %e, "cannot release a connection");
        }
    }

    /// Every handshake step, each under the handshake timeout; `None` for a cancel request.
    async fn connect<S>(
        &self,
        client: &mut Conn<ClientStream<S>>,
        peer: Option<SocketAddr>,
    ) -> Result<Option<Session>, GatewayError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let startup = self
            .step(Step::Startup, flow::startup(client, self.tls.as_ref()))
            .await?;
        let (user, params, minor, options) = match startup {
            Startup::Login {
                user,
                params,
                minor,
                options,
            } => (user, params, minor, options),
            Startup::Cancel {
                process_id,
                secret_key,
            } => {
                self.step(Step::Connect, self.cancel(process_id, &secret_key))
                    .await?;
                return Ok(None);
            }
        };
        if minor > codec::NEWEST_MINOR || !options.is_empty() {
            // As PostgreSQL answers a newer minor version or protocol options it does not know.
            let mut out = BytesMut::new();
            codec::negotiate_protocol_version(codec::NEWEST_MINOR, &options, &mut out);
            client.send(&out).await.map_err(GatewayError::ClientIo)?;
        }
        // Protocol 3.2 carries longer cancel keys; nothing else differs.
        let secret_len = if minor.min(codec::NEWEST_MINOR) >= 2 {
            32
        } else {
            4
        };
        let tls = client.io.is_tls();
        if self.config.require_tls && !tls && !is_loopback(peer) {
            return Err(GatewayError::TlsRequired {
                peer: peer.map(|p| p.to_string()).unwrap_or_default(),
            });
        }
        if let Some(p) = peer {
            if !self.per_ip.allow(&p.ip(), Instant::now()) {
                return Err(GatewayError::RateLimited {
                    what: p.ip().to_string(),
                });
            }
        }
        let token = self
            .step(Step::Auth, flow::read_token(client, &user))
            .await?;
        let verified = self.step(Step::Auth, self.verify(&user, &token)).await?;
        let claims = &verified.claims;
        if !self.per_subject.allow(&claims.sub, Instant::now()) {
            return Err(GatewayError::RateLimited {
                what: format!("subject {:?}", claims.sub),
            });
        }
        let backend_params = flow::backend_params(&params, claims.scope, claims.db.as_deref());
        // A replication connection is a different protocol: never kept.
        let poolable = self.pool.is_some() && params.get("replication").is_none();
        let (target, resolve_us, dialed, pool_key) = self
            .resolve_and_dial(&verified, &backend_params, poolable)
            .await?;
        let instance = target.instance_id;
        let reused = matches!(dialed, Dialed::Pooled(_));
        let result = self
            .step(Step::Connect, async {
                let (backend, leftover) = match dialed {
                    Dialed::Pooled(session) => (session, BytesMut::new()),
                    Dialed::Fresh(stream) => self.login(stream, &target, &backend_params).await?,
                };
                Ok((backend, leftover))
            })
            .await;
        let (backend, leftover) = match result {
            Ok(r) => r,
            Err(e) => {
                self.release(instance).await;
                return Err(e);
            }
        };
        let conn_id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let mut secret = vec![0u8; secret_len];
        rand::Rng::fill(&mut rand::thread_rng(), &mut secret[..]);
        let cancel_pid = match backend.key {
            Some(real) => {
                self.cancels
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry(real.process_id)
                    .or_default()
                    .push(CancelRoute {
                        secret: secret.clone().into_boxed_slice(),
                        conn_id,
                        host: target.host.clone(),
                        port: target.port,
                        backend: real,
                    });
                real.process_id
            }
            // A server that gave no key cannot be cancelled; the client gets a made-up id.
            None => (rand::random::<u32>() >> 1) as i32,
        };
        let greeting = backend.welcome.greeting(cancel_pid, &secret);
        let token_limits = claims.limits.unwrap_or_default();
        let limits = SessionLimits {
            max_idle: self.config.max_idle,
            max_duration: self.config.max_duration,
        }
        .min(SessionLimits {
            max_idle: token_limits.max_idle_s.map(Duration::from_secs),
            max_duration: token_limits.max_duration_s.map(Duration::from_secs),
        });
        info!(
            peer = %peer.map(|p| p.to_string()).unwrap_or_default(),
            sub = %claims.sub,
            state = %claims.sid.short(),
            instance = %instance,
            scope = %claims.scope,
            token = %verified.fingerprint,
            tls,
            resolve_us,
            reused,
            "client connected",
        );
        Ok(Some(Session {
            backend,
            leftover,
            greeting,
            instance,
            state: claims.sid,
            conn_id,
            cancel_pid,
            limits,
            pool_key,
        }))
    }

    /// Logs in to a new backend session; a server out of connection slots (53300) gets one
    /// back from the pool, if it holds a session of that instance, and is asked again.
    async fn login(
        &self,
        stream: TcpStream,
        target: &Target,
        params: &codec::StartupParams,
    ) -> Result<(BackendSession, BytesMut), GatewayError> {
        let mut stream = Some(stream);
        loop {
            let fresh = match stream.take() {
                Some(s) => s,
                None => flow::dial(target).await?,
            };
            let mut conn = Conn::new(fresh);
            let attempt = async {
                flow::backend_login(&mut conn, target, params).await?;
                flow::backend_ready(&mut conn).await
            }
            .await;
            match attempt {
                Ok(welcome) => {
                    let leftover = std::mem::take(&mut conn.buf);
                    return Ok((
                        BackendSession {
                            stream: conn.io,
                            key: welcome.key,
                            welcome,
                        },
                        leftover,
                    ));
                }
                Err(e) => {
                    let out_of_slots = matches!(
                        &e,
                        GatewayError::BackendRejected { raw, .. } if flow::sqlstate(raw) == "53300"
                    );
                    let closed = out_of_slots
                        .then_some(self.pool.as_ref())
                        .flatten()
                        .and_then(|p| p.close_one(None, Some(target.instance_id)));
                    let Some(iid) = closed else { return Err(e) };
                    debug!(instance = %iid, "server out of slots: a kept session closed for a client");
                    self.unpark(vec![iid]).await;
                    // The closed session's backend needs a moment to exit and free its slot.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }

    /// Resolves, then takes a kept session for the client or connects to the instance. An
    /// instance that refuses the connection may have just died (a killed server, a failed
    /// pod): the controller sees it within moments and answers STARTING while it starts
    /// again, so the connection is tried again, a few times, after a pause, from the Resolve.
    async fn resolve_and_dial(
        &self,
        verified: &flow::Verified,
        params: &codec::StartupParams,
        poolable: bool,
    ) -> Result<(Target, u64, Dialed, Option<PoolKey>), GatewayError> {
        const REDIALS: u32 = 15;
        const REDIAL_PAUSE: Duration = Duration::from_millis(200);
        let mut redials = 0;
        loop {
            let (target, resolve_us) = self.resolve(verified).await?;
            let pool = self.pool.as_ref().filter(|_| poolable);
            let key = pool.map(|_| PoolKey::new(&target, params));
            if let (Some(pool), Some(k)) = (pool, &key) {
                let (found, dead) = pool.take(k);
                self.unpark(dead).await;
                if let Some(session) = found {
                    // Resolve counted the client; the kept session stops counting. Over HTTP
                    // that is a round trip the client need not wait for.
                    let resolver = Arc::clone(&self.resolver);
                    let iid = target.instance_id;
                    tokio::spawn(async move {
                        if let Err(e) = resolver.unpark(vec![iid]).await {
                            warn!(error = %e, "cannot tell the controller of a kept session handed on");
                        }
                    });
                    return Ok((target, resolve_us, Dialed::Pooled(session), key));
                }
            }
            match flow::dial(&target).await {
                Ok(stream) => return Ok((target, resolve_us, Dialed::Fresh(stream), key)),
                Err(e @ GatewayError::BackendConnect { .. }) if redials < REDIALS => {
                    debug!(error = %e, "instance refused; asking the controller again");
                    self.release(target.instance_id).await;
                    redials += 1;
                    tokio::time::sleep(REDIAL_PAUSE).await;
                }
                Err(e) => {
                    self.release(target.instance_id).await;
                    return Err(e);
                }
            }
        }
    }

    /// Asks the controller where to go, waiting (bounded) while the instance starts. Returns
    /// the target and how long the answering Resolve took, in microseconds.
    async fn resolve(&self, verified: &flow::Verified) -> Result<(Target, u64), GatewayError> {
        let claims = &verified.claims;
        let req = flow::resolve_request(claims);
        let started = Instant::now();
        let mut slot = None;
        let mut tries = 0u32;
        loop {
            let t0 = Instant::now();
            let answer = self
                .step(Step::Resolve, async {
                    self.resolver
                        .resolve(req.clone())
                        .await
                        .map_err(GatewayError::Resolve)
                })
                .await?;
            let took_us = t0.elapsed().as_micros() as u64;
            match answer {
                ResolveResponse::Ready(target) => {
                    if let Some(m) = &self.metrics {
                        m.resolved(started.elapsed().as_secs_f64());
                    }
                    return Ok((target, took_us));
                }
                ResolveResponse::Starting { retry_after_ms } => {
                    if slot.is_none() {
                        slot = Some(
                            self.waiting
                                .enter(
                                    claims.sid,
                                    self.config.max_waiting,
                                    self.config.max_waiting_per_state,
                                )
                                .ok_or(GatewayError::TooManyWaiting)?,
                        );
                    }
                    let pause = Duration::from_millis(retry_after_ms.clamp(10, 2_000));
                    tries += 1;
                    if tries > self.config.starting_retries
                        || started.elapsed() + pause > self.config.starting_wait
                    {
                        return Err(GatewayError::StillStarting {
                            state: claims.sid.short().to_string(),
                        });
                    }
                    tokio::time::sleep(pause).await;
                }
                ResolveResponse::Missing => {
                    return Err(GatewayError::Missing {
                        state: claims.sid.to_string(),
                        instance: claims.iid.map(|i| i.to_string()).unwrap_or_default(),
                    })
                }
                ResolveResponse::Forbidden { reason } => {
                    return Err(GatewayError::Forbidden {
                        state: claims.sid.short().to_string(),
                        sub: claims.sub.clone(),
                        fingerprint: verified.fingerprint.clone(),
                        reason,
                    })
                }
                ResolveResponse::TooManyConnections { limit } => {
                    // Kept sessions count against the limits (the instance's and the state's):
                    // one gives its slot to a client, the instance's own first.
                    let closed = self.pool.as_ref().and_then(|p| {
                        p.close_one(Some(claims.sid), claims.iid)
                            .or_else(|| p.close_one(Some(claims.sid), None))
                    });
                    match closed {
                        Some(iid) => {
                            debug!(instance = %iid, "at the connection limit: a kept session closed for a client");
                            self.unpark(vec![iid]).await;
                        }
                        None => return Err(GatewayError::TooManyConnections { limit }),
                    }
                }
            }
        }
    }

    /// Verifies a token; one naming a key not known yet is tried again after asking the key
    /// source (if any) for fresh keys, so a rotation is picked up by the first token it signs.
    async fn verify(&self, user: &str, token: &str) -> Result<flow::Verified, GatewayError> {
        let first = flow::verify(user, token, &self.keys.get(), self.clock.now_s());
        match (&first, &self.key_source) {
            (
                Err(GatewayError::TokenRefused {
                    source: TokenError::UnknownKey { .. },
                    ..
                }),
                Some(source),
            ) => {
                source.refresh().await;
                flow::verify(user, token, &self.keys.get(), self.clock.now_s())
            }
            _ => first,
        }
    }

    /// Routes a CancelRequest to the backend with its real key; an unknown process id or a
    /// wrong secret is ignored, as PostgreSQL does.
    async fn cancel(&self, process_id: i32, secret: &[u8]) -> Result<(), GatewayError> {
        let route = {
            let cancels = self.cancels.lock().unwrap_or_else(|p| p.into_inner());
            cancels
                .get(&process_id)
                .and_then(|routes| routes.iter().find(|r| same_secret(&r.secret, secret)))
                .map(|r| (r.host.clone(), r.port, r.backend))
        };
        let Some((host, port, backend)) = route else {
            debug!("cancel request with an unknown key ignored");
            return Ok(());
        };
        let mut out = BytesMut::new();
        frontend::cancel_request(backend.process_id, backend.secret_key, &mut out);
        let mut stream = TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|source| GatewayError::BackendConnect {
                addr: format!("{host}:{port}"),
                source,
            })?;
        stream
            .write_all(&out)
            .await
            .map_err(GatewayError::BackendIo)?;
        let _ = stream.shutdown().await;
        debug!(process_id, "cancel request routed");
        Ok(())
    }

    async fn step<T>(
        &self,
        step: Step,
        fut: impl Future<Output = Result<T, GatewayError>>,
    ) -> Result<T, GatewayError> {
        tokio::time::timeout(self.config.handshake_timeout, fut)
            .await
            .map_err(|_| GatewayError::Timeout(step))?
    }

    /// Sends `e` to the client as it may see it; a client that cannot take it is left alone.
    async fn tell_client<S>(&self, client: &mut Conn<S>, e: &GatewayError)
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut out = BytesMut::new();
        if let GatewayError::BackendRejected { raw, .. } = e {
            out.extend_from_slice(raw);
        } else if let Some(ce) = e.client_error() {
            codec::error_response("FATAL", ce.code, &ce.message, &mut out);
        } else {
            return;
        }
        let _ = tokio::time::timeout(self.config.handshake_timeout, client.send(&out)).await;
    }
}

/// Connections told the gateway is full, held on top of `max_clients` at most.
const REFUSING: usize = 32;
/// How long a refused client has to send its startup packet.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(2);

/// How the gateway shares an open-file limit (`ulimit -n`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdBudget {
    /// Client connections: each holds two descriptors while relaying (client, backend).
    pub max_clients: usize,
    /// Backend sessions kept for reuse: one each.
    pub pool_sessions: usize,
}

/// The share of `nofile` descriptors for clients and pooled sessions. An eighth (at least 128)
/// stays for everything else: listeners, the metadata, logs, the controller's API and
/// instances in `taidon local`, and the connections refused when full.
pub fn fd_budget(nofile: u64) -> FdBudget {
    let nofile = usize::try_from(nofile).unwrap_or(usize::MAX).min(1 << 24);
    let reserve = (nofile / 8).max(128) + REFUSING;
    let free = nofile.saturating_sub(reserve);
    let pool_sessions = (free / 4).min(PoolConfig::default().max_sessions);
    FdBudget {
        max_clients: ((free - pool_sessions) / 2).max(1),
        pool_sessions,
    }
}

/// Terminate: what the backend of a session not kept is told, since the client's own was held.
const TERMINATE: &[u8] = &[b'X', 0, 0, 0, 4];

/// How long sessions told to end (after the drain) are given to do so before they are dropped.
const TERMINATE_GRACE: Duration = Duration::from_secs(2);

/// Waits until every task of `set` has finished.
async fn join_all(set: &mut JoinSet<()>) {
    while set.join_next().await.is_some() {}
}

fn log_failure(peer: &str, e: &GatewayError) {
    let chain = error_chain(e);
    match e.kind() {
        ErrorKind::Client => debug!(%peer, kind = ?e.kind(), error = %chain, "connection failed"),
        _ => warn!(%peer, kind = ?e.kind(), error = %chain, "connection failed"),
    }
}

/// `e` and its sources on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}
