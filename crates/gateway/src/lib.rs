//! The PostgreSQL wire-protocol gateway: one TCP port for every instance.
//!
//! A client connects with `postgres://sqlrs:<JWT>@host:port/postgres`; the gateway reads its
//! startup packet, asks for the password in clear text and verifies it as a token, asks the
//! controller where the token's instance runs, logs in to that server with credentials the
//! client never sees, and then relays bytes both ways.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]
#![deny(clippy::todo, clippy::dbg_macro)]

mod codec;
mod error;
mod flow;
mod resolve;
#[cfg(test)]
mod tests;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use taidon_core::token::TokenKey;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

pub use error::{ClientError, ErrorKind, GatewayError, Step};
pub use resolve::{HttpResolver, ResolveError, Resolver};

use flow::{Conn, Startup};

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
    /// The longest each handshake step (startup, auth, resolve, connect) may take.
    pub handshake_timeout: Duration,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// The gateway: verifies each connection's token and relays it to its instance.
pub struct Gateway {
    config: GatewayConfig,
    key: TokenKey,
    resolver: Arc<dyn Resolver>,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("config", &self.config)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl Gateway {
    /// A gateway that verifies tokens with `key` against the system clock.
    pub fn new(config: GatewayConfig, key: TokenKey, resolver: Arc<dyn Resolver>) -> Self {
        Self {
            config,
            key,
            resolver,
            clock: Arc::new(SystemClock),
        }
    }

    /// The same gateway checking token expiry against `clock`.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Accepts connections on `listener`, each in its own task, until `shutdown` resolves; then
    /// stops accepting and closes the connections still open.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut conns = JoinSet::new();
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
                        conns.spawn(async move {
                            if let Err(e) = gateway.handle(stream).await {
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
        conns.shutdown().await;
    }

    /// Runs one client connection to its end: handshake, then relay until either side closes.
    /// On failure the client is sent a FATAL ErrorResponse when it can take one.
    pub async fn handle<S>(&self, stream: S) -> Result<(), GatewayError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut client = Conn::new(stream);
        match self.connect(&mut client).await {
            Ok(Some(backend)) => {
                let (up, down) = flow::passthrough(client, backend).await?;
                debug!(bytes_up = up, bytes_down = down, "connection closed");
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(e) => {
                self.tell_client(&mut client, &e).await;
                Err(e)
            }
        }
    }

    /// Every handshake step, each under the handshake timeout; `None` for a cancel request.
    async fn connect<S>(
        &self,
        client: &mut Conn<S>,
    ) -> Result<Option<Conn<tokio::net::TcpStream>>, GatewayError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let (user, params) = match self.step(Step::Startup, flow::startup(client)).await? {
            Startup::Login { user, params } => (user, params),
            Startup::Cancel => {
                debug!("cancel request ignored: not routed yet");
                return Ok(None);
            }
        };
        let claims = self
            .step(
                Step::Auth,
                flow::authenticate(client, &user, &self.key, || self.clock.now_s()),
            )
            .await?;
        let target = self
            .step(Step::Resolve, flow::resolve(&*self.resolver, &claims))
            .await?;
        let backend = self
            .step(Step::Connect, async {
                let mut backend = Conn::new(flow::dial(&target).await?);
                flow::backend_login(&mut backend, &target, &params).await?;
                Ok(backend)
            })
            .await?;
        info!(
            user = %user,
            state = %claims.sid.short(),
            instance = %claims.iid,
            "client connected",
        );
        Ok(Some(backend))
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
