//! A connection's life as a chain of steps: startup → auth → resolve → connect → passthrough.
//! Each step is generic over the stream so tests drive it over `tokio::io::duplex`.

use std::io;

use bytes::{Bytes, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::backend::{Header, Message};
use postgres_protocol::message::frontend;
use taidon_api::{ResolveRequest, Target};
use taidon_core::token::{self, Claims, Keyset, Scope};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use crate::codec::{self, StartupPacket, StartupParams};
use crate::error::GatewayError;
use crate::stream::ClientStream;

/// A stream and the bytes read from it but not yet consumed.
pub(crate) struct Conn<S> {
    pub(crate) io: S,
    pub(crate) buf: BytesMut,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    pub(crate) fn new(io: S) -> Self {
        Self {
            io,
            buf: BytesMut::with_capacity(8 * 1024),
        }
    }

    /// The next message `parse` finds, reading more as it asks; EOF first is an error.
    pub(crate) async fn read<T>(
        &mut self,
        mut parse: impl FnMut(&mut BytesMut) -> io::Result<Option<T>>,
    ) -> Result<T, ReadError> {
        loop {
            if let Some(msg) = parse(&mut self.buf).map_err(ReadError::Protocol)? {
                return Ok(msg);
            }
            self.buf.reserve(4096);
            if self
                .io
                .read_buf(&mut self.buf)
                .await
                .map_err(ReadError::Io)?
                == 0
            {
                return Err(ReadError::Io(io::ErrorKind::UnexpectedEof.into()));
            }
        }
    }

    /// Writes all of `bytes` and flushes.
    pub(crate) async fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.io.write_all(bytes).await?;
        self.io.flush().await
    }
}

pub(crate) enum ReadError {
    Io(io::Error),
    Protocol(io::Error),
}

impl ReadError {
    fn client(self) -> GatewayError {
        match self {
            ReadError::Io(e) => GatewayError::ClientIo(e),
            ReadError::Protocol(e) => GatewayError::ClientProtocol(e),
        }
    }

    pub(crate) fn backend(self) -> GatewayError {
        match self {
            ReadError::Io(e) => GatewayError::BackendIo(e),
            ReadError::Protocol(e) => GatewayError::BackendProtocol(e),
        }
    }
}

/// What the first step found.
pub(crate) enum Startup {
    /// A client that wants to log in as `user` under protocol 3.`minor`.
    Login {
        user: String,
        params: StartupParams,
        minor: u16,
        /// The `_pq_.` protocol options it asked for (none is known: the client is told so).
        options: Vec<String>,
    },
    /// A CancelRequest with the key the gateway gave the client.
    Cancel { process_id: i32, secret_key: Bytes },
}

fn protocol_violation(what: &'static str) -> GatewayError {
    GatewayError::ClientProtocol(io::Error::new(io::ErrorKind::InvalidData, what))
}

/// The request code of an SSLRequest (1234.5679) or GSSENCRequest (1234.5680), as the
/// protocol version PostgreSQL names when one comes a second time.
fn request_version(packet: &StartupPacket) -> GatewayError {
    let minor = if matches!(packet, StartupPacket::SslRequest) {
        5679
    } else {
        5680
    };
    GatewayError::UnsupportedProtocol { major: 1234, minor }
}

/// Reads the startup packet until a StartupMessage or CancelRequest arrives. As PostgreSQL
/// does, an SSLRequest is answered once (TLS when an acceptor is given, else 'N'), a
/// GSSENCRequest once ('N'), and none after TLS is set up; a request repeated is refused.
pub(crate) async fn startup<S: AsyncRead + AsyncWrite + Unpin>(
    client: &mut Conn<ClientStream<S>>,
    tls: Option<&TlsAcceptor>,
) -> Result<Startup, GatewayError> {
    let (mut ssl_done, mut gss_done) = (false, false);
    loop {
        let packet = client
            .read(codec::parse_startup)
            .await
            .map_err(ReadError::client)?;
        match packet {
            StartupPacket::SslRequest | StartupPacket::GssEncRequest => {
                let is_ssl = matches!(packet, StartupPacket::SslRequest);
                if (is_ssl && ssl_done) || (!is_ssl && gss_done) {
                    return Err(request_version(&packet));
                }
                // A client that pipelines data after the request would be reading our answer
                // as something else; PostgreSQL refuses that too (CVE-2021-23222).
                if !client.buf.is_empty() {
                    return Err(protocol_violation("data sent after an encryption request"));
                }
                let acceptor = match (is_ssl, tls) {
                    (true, Some(a)) => a,
                    _ => {
                        client
                            .send(codec::REFUSE_ENCRYPTION)
                            .await
                            .map_err(GatewayError::ClientIo)?;
                        if is_ssl {
                            ssl_done = true;
                        } else {
                            gss_done = true;
                        }
                        continue;
                    }
                };
                client
                    .send(codec::ACCEPT_SSL)
                    .await
                    .map_err(GatewayError::ClientIo)?;
                let ClientStream::Plain(plain) =
                    std::mem::replace(&mut client.io, ClientStream::Upgrading)
                else {
                    return Err(protocol_violation("TLS negotiated twice"));
                };
                let tls = acceptor
                    .accept(plain)
                    .await
                    .map_err(GatewayError::TlsHandshake)?;
                client.io = ClientStream::Tls(Box::new(tls));
                // Inside TLS, neither request may come again.
                (ssl_done, gss_done) = (true, true);
            }
            StartupPacket::CancelRequest {
                process_id,
                secret_key,
            } => {
                return Ok(Startup::Cancel {
                    process_id,
                    secret_key,
                })
            }
            StartupPacket::UnsupportedVersion(v) => {
                return Err(GatewayError::UnsupportedProtocol {
                    major: (v >> 16) as u16,
                    minor: (v & 0xffff) as u16,
                })
            }
            StartupPacket::Startup { minor, mut params } => {
                let options = params.take_protocol_options();
                let user = match params.get("user") {
                    Some(u) if !u.is_empty() => u.to_owned(),
                    _ => return Err(GatewayError::MissingUser),
                };
                return Ok(Startup::Login {
                    user,
                    params,
                    minor,
                    options,
                });
            }
        }
    }
}

/// The user name as logs and clients may see it: a token there is never shown.
pub(crate) fn shown_user(user: &str) -> String {
    if token::looks_like_jwt(user) {
        format!("(token {})", token::fingerprint(user))
    } else {
        user.chars().take(63).collect()
    }
}

/// A verified token and what logs may say of it.
pub(crate) struct Verified {
    pub(crate) claims: Claims,
    /// A short fingerprint of the token, never the token.
    pub(crate) fingerprint: String,
}

/// Finds the token: the user name when it has a token's shape, else the password asked for in
/// clear text.
pub(crate) async fn read_token<S: AsyncRead + AsyncWrite + Unpin>(
    client: &mut Conn<S>,
    user: &str,
) -> Result<String, GatewayError> {
    if token::looks_like_jwt(user) {
        return Ok(user.to_owned());
    }
    let mut out = BytesMut::new();
    codec::authentication_cleartext_password(&mut out);
    client.send(&out).await.map_err(GatewayError::ClientIo)?;
    let msg = client
        .read(|buf| codec::parse_message(buf, codec::MAX_PREAUTH_MESSAGE_LEN))
        .await
        .map_err(ReadError::client)?;
    if msg.tag != b'p' {
        return Err(GatewayError::UnexpectedMessage {
            tag: char::from(msg.tag),
        });
    }
    codec::password(&msg.body).map_err(GatewayError::ClientProtocol)
}

/// Verifies `token` (which `user` logged in with) against `keys` at `now_s`.
pub(crate) fn verify(
    user: &str,
    token: &str,
    keys: &Keyset,
    now_s: u64,
) -> Result<Verified, GatewayError> {
    let fingerprint = token::fingerprint(token);
    match keys.verify(token, now_s) {
        Ok(claims) => Ok(Verified {
            claims,
            fingerprint,
        }),
        Err(source) => Err(GatewayError::TokenRefused {
            user: shown_user(user),
            fingerprint,
            source,
        }),
    }
}

/// The resolve request for verified claims.
pub(crate) fn resolve_request(claims: &Claims) -> ResolveRequest {
    ResolveRequest {
        state_id: claims.sid,
        instance_id: claims.iid,
        scope: claims.scope,
        max_conn: claims.limits.and_then(|l| l.max_conn),
    }
}

/// A TCP connection to the instance, without Nagle's delay.
pub(crate) async fn dial(target: &Target) -> Result<TcpStream, GatewayError> {
    let connect_err = |source| GatewayError::BackendConnect {
        addr: format!("{}:{}", target.host, target.port),
        source,
    };
    let stream = TcpStream::connect((target.host.as_str(), target.port))
        .await
        .map_err(connect_err)?;
    stream.set_nodelay(true).map_err(connect_err)?;
    Ok(stream)
}

/// The startup parameters the backend is sent, besides `user`: the client's, with a read-only
/// session's `default_transaction_read_only` forced on, and the database a lease's token is
/// bound to (`db`) in place of the client's. They are also the pool's key.
pub(crate) fn backend_params(
    params: &StartupParams,
    scope: Scope,
    db: Option<&str>,
) -> StartupParams {
    let mut forwarded = StartupParams::default();
    if let Some(db) = db {
        forwarded.set("database".to_owned(), db.to_owned());
    }
    for (k, v) in params.iter() {
        if db.is_some() && k == "database" {
            continue;
        }
        // A read-only session may not turn read-only off from its startup packet.
        if k == "user" || (scope == Scope::Ro && k == "default_transaction_read_only") {
            continue;
        }
        forwarded.set(k.to_owned(), v.to_owned());
    }
    if scope == Scope::Ro {
        // The last -c wins, so this overrides any earlier one in the client's options.
        const RO: &str = "-c default_transaction_read_only=on";
        let options = match forwarded.get("options") {
            Some(v) => format!("{v} {RO}"),
            None => RO.to_owned(),
        };
        forwarded.set("options".to_owned(), options);
    }
    forwarded
}

/// Logs in to the instance as `target.user` with `params` (from [`backend_params`]), and
/// returns once the backend says AuthenticationOk (its later messages stay in `backend.buf`).
pub(crate) async fn backend_login<B: AsyncRead + AsyncWrite + Unpin>(
    backend: &mut Conn<B>,
    target: &Target,
    params: &StartupParams,
) -> Result<(), GatewayError> {
    let mut out = BytesMut::new();
    frontend::startup_message(
        std::iter::once(("user", target.user.as_str())).chain(params.iter()),
        &mut out,
    )
    .map_err(GatewayError::BackendProtocol)?;
    backend.send(&out).await.map_err(GatewayError::BackendIo)?;

    let mut scram: Option<ScramSha256> = None;
    loop {
        if let Some(raw) = backend
            .read(take_error_response)
            .await
            .map_err(ReadError::backend)?
        {
            return Err(GatewayError::BackendRejected {
                summary: summarize_error(&raw),
                raw,
            });
        }
        let msg = backend
            .read(Message::parse)
            .await
            .map_err(ReadError::backend)?;
        out.clear();
        let password = target.password.as_bytes();
        match msg {
            Message::AuthenticationOk => return Ok(()),
            Message::AuthenticationCleartextPassword => {
                frontend::password_message(password, &mut out)
            }
            Message::AuthenticationMd5Password(body) => {
                let hash = postgres_protocol::authentication::md5_hash(
                    target.user.as_bytes(),
                    password,
                    body.salt(),
                );
                frontend::password_message(hash.as_bytes(), &mut out)
            }
            Message::AuthenticationSasl(_) => {
                // SCRAM-SHA-256 is the only mechanism a server without TLS offers.
                let s = ScramSha256::new(password, ChannelBinding::unsupported());
                let r = frontend::sasl_initial_response("SCRAM-SHA-256", s.message(), &mut out);
                scram = Some(s);
                r
            }
            Message::AuthenticationSaslContinue(body) => {
                let s = scram.as_mut().ok_or_else(|| out_of_order("SASLContinue"))?;
                s.update(body.data())
                    .map_err(GatewayError::BackendProtocol)?;
                frontend::sasl_response(s.message(), &mut out)
            }
            Message::AuthenticationSaslFinal(body) => {
                let mut s = scram.take().ok_or_else(|| out_of_order("SASLFinal"))?;
                s.finish(body.data())
                    .map_err(GatewayError::BackendProtocol)?;
                continue;
            }
            Message::AuthenticationKerberosV5 => {
                return Err(GatewayError::BackendAuthUnsupported("Kerberos"))
            }
            Message::AuthenticationScmCredential => {
                return Err(GatewayError::BackendAuthUnsupported("SCM credentials"))
            }
            Message::AuthenticationGss | Message::AuthenticationGssContinue(_) => {
                return Err(GatewayError::BackendAuthUnsupported("GSSAPI"))
            }
            Message::AuthenticationSspi => {
                return Err(GatewayError::BackendAuthUnsupported("SSPI"))
            }
            _ => return Err(out_of_order("a non-authentication message")),
        }
        .map_err(GatewayError::BackendProtocol)?;
        backend.send(&out).await.map_err(GatewayError::BackendIo)?;
    }
}

fn out_of_order(what: &str) -> GatewayError {
    GatewayError::BackendProtocol(io::Error::new(
        io::ErrorKind::InvalidData,
        format!("unexpected {what} during authentication"),
    ))
}

/// Splits off a whole ErrorResponse if one is next; `Some(None)` if something else is.
fn take_error_response(buf: &mut BytesMut) -> io::Result<Option<Option<bytes::Bytes>>> {
    let Some(header) = Header::parse(buf)? else {
        return Ok(None);
    };
    if header.tag() != b'E' {
        return Ok(Some(None));
    }
    // A positive i32 plus the tag byte fits in usize.
    let total = header.len() as usize + 1;
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    Ok(Some(Some(buf.split_to(total).freeze())))
}

/// The SQLSTATE of a raw ErrorResponse.
pub(crate) fn sqlstate(raw: &[u8]) -> String {
    codec::error_fields(raw.get(5..).unwrap_or_default())
        .into_iter()
        .find(|(f, _)| *f == b'C')
        .map(|(_, v)| v)
        .unwrap_or_default()
}

/// SQLSTATE and message of a raw ErrorResponse, for logs.
pub(crate) fn summarize_error(raw: &[u8]) -> String {
    let fields = codec::error_fields(raw.get(5..).unwrap_or_default());
    let field = |t: u8| {
        fields
            .iter()
            .find(|(f, _)| *f == t)
            .map(|(_, v)| v.as_str())
            .unwrap_or("")
    };
    format!("{} {}", field(b'C'), field(b'M'))
}

/// The backend's real cancel key, from its BackendKeyData.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BackendKey {
    pub(crate) process_id: i32,
    pub(crate) secret_key: i32,
}

/// What a backend said between AuthenticationOk and its first ReadyForQuery.
#[derive(Debug, Default)]
pub(crate) struct Welcome {
    /// Its ParameterStatus values, in order.
    pub(crate) params: Vec<(String, String)>,
    /// Its real cancel key (every PostgreSQL sends one).
    pub(crate) key: Option<BackendKey>,
    /// Anything else it sent (notices), as raw messages for the client.
    pub(crate) other: BytesMut,
}

impl Welcome {
    /// Sets a ParameterStatus value as the backend reported it.
    pub(crate) fn set_param(&mut self, name: String, value: String) {
        match self.params.iter_mut().find(|(k, _)| *k == name) {
            Some(slot) => slot.1 = value,
            None => self.params.push((name, value)),
        }
    }

    /// What the client is sent after its token is accepted: AuthenticationOk, the notices and
    /// parameters, BackendKeyData with `process_id` and `secret_key`, ReadyForQuery (idle).
    pub(crate) fn greeting(&self, process_id: i32, secret_key: &[u8]) -> BytesMut {
        let mut out = BytesMut::with_capacity(512);
        codec::authentication_ok(&mut out);
        out.extend_from_slice(&self.other);
        for (name, value) in &self.params {
            codec::parameter_status(name, value, &mut out);
        }
        codec::backend_key_data(process_id, secret_key, &mut out);
        codec::ready_for_query(b'I', &mut out);
        out
    }
}

/// Reads what the backend sends after AuthenticationOk up to its first ReadyForQuery. An
/// ErrorResponse ends the login.
pub(crate) async fn backend_ready<B: AsyncRead + AsyncWrite + Unpin>(
    backend: &mut Conn<B>,
) -> Result<Welcome, GatewayError> {
    let mut welcome = Welcome::default();
    loop {
        let raw = backend
            .read(take_message)
            .await
            .map_err(ReadError::backend)?;
        match raw[0] {
            b'K' if raw.len() == 13 => {
                let field =
                    |i: usize| i32::from_be_bytes([raw[i], raw[i + 1], raw[i + 2], raw[i + 3]]);
                welcome.key = Some(BackendKey {
                    process_id: field(5),
                    secret_key: field(9),
                });
            }
            b'S' => match codec::parse_parameter_status(&raw[5..]) {
                Some((name, value)) => welcome.set_param(name, value),
                None => {
                    return Err(GatewayError::BackendProtocol(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "malformed ParameterStatus",
                    )))
                }
            },
            b'E' => {
                return Err(GatewayError::BackendRejected {
                    summary: summarize_error(&raw),
                    raw,
                })
            }
            b'Z' => return Ok(welcome),
            _ => welcome.other.extend_from_slice(&raw),
        }
    }
}

/// Splits off one whole backend message (tag, length and body).
pub(crate) fn take_message(buf: &mut BytesMut) -> io::Result<Option<bytes::Bytes>> {
    let Some(header) = Header::parse(buf)? else {
        return Ok(None);
    };
    let total = header.len() as usize + 1;
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    Ok(Some(buf.split_to(total).freeze()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> StartupParams {
        let mut p = StartupParams::default();
        for (k, v) in pairs {
            p.set((*k).to_owned(), (*v).to_owned());
        }
        p
    }

    #[test]
    fn a_lease_token_decides_the_database() {
        let client = params(&[
            ("user", "sqlrs"),
            ("database", "postgres"),
            ("application_name", "t"),
        ]);
        let bound = backend_params(&client, Scope::Rw, Some("taidon_lease_1"));
        assert_eq!(bound.get("database"), Some("taidon_lease_1"));
        assert_eq!(bound.get("application_name"), Some("t"));
        assert_eq!(
            bound.get("user"),
            None,
            "the gateway logs in as the target's user"
        );
        assert_eq!(bound.iter().filter(|(k, _)| *k == "database").count(), 1);
        // A client that names no database is sent to the lease's all the same.
        let bare = backend_params(&params(&[("user", "sqlrs")]), Scope::Rw, Some("d"));
        assert_eq!(bare.get("database"), Some("d"));
        // Without a bound database the client's is kept.
        let free = backend_params(&client, Scope::Rw, None);
        assert_eq!(free.get("database"), Some("postgres"));
    }
}
