//! Why a connection ended early, who is to blame, and what the client may be told.

use std::io;

use bytes::Bytes;
use taidon_core::token::TokenError;

use crate::resolve::ResolveError;

/// Who a failure is attributed to, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The client: disconnected, timed out, or broke the protocol.
    Client,
    /// The client's token was refused.
    Auth,
    /// The controller could not say where the instance is.
    Resolve,
    /// The instance's server could not be reached or refused the gateway.
    Backend,
    /// A limit turned the connection away: connections, rate, waiters.
    Limit,
}

/// The handshake step a timeout hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Startup,
    Auth,
    Resolve,
    Connect,
}

/// What a client is told about a failure: severity FATAL, a SQLSTATE and a message that holds no
/// internals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientError {
    /// The SQLSTATE, e.g. `28P01`.
    pub code: &'static str,
    /// The ErrorResponse message text.
    pub message: String,
}

/// Why a gateway connection failed.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("client connection failed")]
    ClientIo(#[source] io::Error),
    #[error("client broke the protocol")]
    ClientProtocol(#[source] io::Error),
    #[error("client sent an unexpected message {tag:?} during the handshake")]
    UnexpectedMessage { tag: char },
    #[error("client asked for protocol version {major}.{minor}")]
    UnsupportedProtocol { major: u16, minor: u16 },
    #[error("client sent no user name")]
    MissingUser,
    #[error("client from {peer} did not ask for TLS, which is required")]
    TlsRequired { peer: String },
    #[error("TLS handshake failed")]
    TlsHandshake(#[source] io::Error),
    #[error("token of state {state} (sub {sub:?}, token {fingerprint}) is not allowed: {reason}")]
    Forbidden {
        state: String,
        sub: String,
        fingerprint: String,
        reason: String,
    },
    #[error("too many connections (limit {limit})")]
    TooManyConnections { limit: u32 },
    #[error("the gateway holds {limit} client connections, its most for its open-file limit (ulimit -n)")]
    GatewayFull { limit: usize },
    #[error("too many connection attempts from {what}")]
    RateLimited { what: String },
    #[error("too many connections are waiting for an instance to start")]
    TooManyWaiting,
    #[error("the instance of state {state} is still starting")]
    StillStarting { state: String },
    #[error("handshake step {0:?} timed out")]
    Timeout(Step),
    #[error("token refused for user {user:?} (token {fingerprint})")]
    TokenRefused {
        user: String,
        fingerprint: String,
        #[source]
        source: TokenError,
    },
    #[error("instance {instance} of state {state} is not available")]
    Missing { state: String, instance: String },
    #[error("cannot resolve the instance")]
    Resolve(#[source] ResolveError),
    #[error("cannot connect to the instance at {addr}")]
    BackendConnect {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("instance connection failed")]
    BackendIo(#[source] io::Error),
    #[error("instance refused the gateway: {summary}")]
    BackendRejected {
        summary: String,
        /// The backend's ErrorResponse message, forwarded to the client as is.
        raw: Bytes,
    },
    #[error("instance asked for unsupported authentication {0}")]
    BackendAuthUnsupported(&'static str),
    #[error("instance broke the protocol")]
    BackendProtocol(#[source] io::Error),
}

impl GatewayError {
    /// Who the failure is attributed to.
    pub fn kind(&self) -> ErrorKind {
        match self {
            GatewayError::ClientIo(_)
            | GatewayError::ClientProtocol(_)
            | GatewayError::UnexpectedMessage { .. }
            | GatewayError::UnsupportedProtocol { .. }
            | GatewayError::MissingUser
            | GatewayError::TlsHandshake(_)
            | GatewayError::Timeout(Step::Startup | Step::Auth) => ErrorKind::Client,
            GatewayError::TokenRefused { .. }
            | GatewayError::Forbidden { .. }
            | GatewayError::TlsRequired { .. } => ErrorKind::Auth,
            GatewayError::TooManyConnections { .. }
            | GatewayError::GatewayFull { .. }
            | GatewayError::RateLimited { .. }
            | GatewayError::TooManyWaiting => ErrorKind::Limit,
            GatewayError::StillStarting { .. } => ErrorKind::Resolve,
            GatewayError::Missing { .. }
            | GatewayError::Resolve(_)
            | GatewayError::Timeout(Step::Resolve) => ErrorKind::Resolve,
            GatewayError::Timeout(Step::Connect)
            | GatewayError::BackendConnect { .. }
            | GatewayError::BackendIo(_)
            | GatewayError::BackendRejected { .. }
            | GatewayError::BackendAuthUnsupported(_)
            | GatewayError::BackendProtocol(_) => ErrorKind::Backend,
        }
    }

    /// What the client is told, or `None` when it is told nothing (it is gone, or never spoke
    /// the protocol, or the backend's own error is forwarded instead).
    pub fn client_error(&self) -> Option<ClientError> {
        let (code, message) = match self {
            GatewayError::ClientIo(_)
            | GatewayError::ClientProtocol(_)
            | GatewayError::Timeout(Step::Startup)
            | GatewayError::TlsHandshake(_)
            | GatewayError::BackendRejected { .. } => return None,
            GatewayError::TlsRequired { .. } => (
                "28000",
                "TLS is required: connect with sslmode=require or stronger".to_owned(),
            ),
            GatewayError::Forbidden { .. } => (
                "28000",
                "the token does not allow this connection".to_owned(),
            ),
            GatewayError::TooManyConnections { limit } => (
                "53300",
                format!("too many connections for this database (limit {limit})"),
            ),
            GatewayError::GatewayFull { limit } => (
                "53300",
                format!(
                    "too many connections to the gateway (at most {limit}, from its open-file \
                     limit, ulimit -n): try again later"
                ),
            ),
            GatewayError::RateLimited { .. } => (
                "53300",
                "too many connection attempts: try again later".to_owned(),
            ),
            GatewayError::TooManyWaiting => (
                "53300",
                "too many connections are waiting for the database to start".to_owned(),
            ),
            GatewayError::StillStarting { .. } => {
                ("57P03", "the database system is starting up".to_owned())
            }
            GatewayError::UnexpectedMessage { .. } => (
                "08P01",
                "unexpected message during authentication".to_owned(),
            ),
            GatewayError::UnsupportedProtocol { major, minor } => (
                "08P01",
                format!(
                    "unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.2"
                ),
            ),
            GatewayError::MissingUser => (
                "08P01",
                "no PostgreSQL user name specified in startup packet".to_owned(),
            ),
            // As PostgreSQL's authentication_timeout.
            GatewayError::Timeout(Step::Auth) => (
                "57014",
                "canceling authentication due to timeout".to_owned(),
            ),
            GatewayError::TokenRefused { user, .. } => (
                "28P01",
                format!("password authentication failed for user \"{user}\""),
            ),
            GatewayError::Missing { .. } => ("3D000", "database state is not available".to_owned()),
            GatewayError::Resolve(e) if !e.is_transient() => (
                "XX000",
                "internal error while locating the database".to_owned(),
            ),
            GatewayError::Resolve(_)
            | GatewayError::Timeout(Step::Resolve | Step::Connect)
            | GatewayError::BackendConnect { .. } => (
                "57P03",
                "the database is not reachable right now".to_owned(),
            ),
            GatewayError::BackendIo(_)
            | GatewayError::BackendAuthUnsupported(_)
            | GatewayError::BackendProtocol(_) => (
                "XX000",
                "internal error while connecting to the database".to_owned(),
            ),
        };
        Some(ClientError { code, message })
    }
}
