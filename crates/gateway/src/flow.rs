//! A connection's life as a chain of steps: startup → auth → resolve → connect → passthrough.
//! Each step is generic over the stream so tests drive it over `tokio::io::duplex`.

use std::io;

use bytes::BytesMut;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::backend::{Header, Message};
use postgres_protocol::message::frontend;
use taidon_api::{ResolveRequest, ResolveResponse, Target};
use taidon_core::token::{self, Claims, TokenKey};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::codec::{self, StartupPacket, StartupParams};
use crate::error::GatewayError;
use crate::resolve::Resolver;

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
    async fn read<T>(
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

enum ReadError {
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

    fn backend(self) -> GatewayError {
        match self {
            ReadError::Io(e) => GatewayError::BackendIo(e),
            ReadError::Protocol(e) => GatewayError::BackendProtocol(e),
        }
    }
}

/// What the first step found.
pub(crate) enum Startup {
    /// A client that wants to log in as `user`.
    Login { user: String, params: StartupParams },
    /// A CancelRequest: not routed yet, the connection just ends.
    Cancel,
}

/// Reads the startup packet, refusing encryption requests until a StartupMessage arrives.
pub(crate) async fn startup<S: AsyncRead + AsyncWrite + Unpin>(
    client: &mut Conn<S>,
) -> Result<Startup, GatewayError> {
    loop {
        let packet = client
            .read(codec::parse_startup)
            .await
            .map_err(ReadError::client)?;
        match packet {
            StartupPacket::SslRequest | StartupPacket::GssEncRequest => {
                // A client that pipelines data after the request would be reading our 'N' as
                // something else; PostgreSQL refuses that too (CVE-2021-23222).
                if !client.buf.is_empty() {
                    return Err(GatewayError::ClientProtocol(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "data sent after an encryption request",
                    )));
                }
                client
                    .send(codec::REFUSE_ENCRYPTION)
                    .await
                    .map_err(GatewayError::ClientIo)?;
            }
            StartupPacket::CancelRequest { .. } => return Ok(Startup::Cancel),
            StartupPacket::UnsupportedVersion(v) => {
                return Err(GatewayError::UnsupportedProtocol {
                    major: (v >> 16) as u16,
                    minor: (v & 0xffff) as u16,
                })
            }
            StartupPacket::Startup(params) => {
                let user = match params.get("user") {
                    Some(u) if !u.is_empty() => u.to_owned(),
                    _ => return Err(GatewayError::MissingUser),
                };
                return Ok(Startup::Login { user, params });
            }
        }
    }
}

/// Asks for the password, and verifies it as a token at `now_s`.
pub(crate) async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
    client: &mut Conn<S>,
    user: &str,
    key: &TokenKey,
    now_s: impl FnOnce() -> u64,
) -> Result<Claims, GatewayError> {
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
    let token = codec::password(&msg.body).map_err(GatewayError::ClientProtocol)?;
    key.verify(&token, now_s())
        .map_err(|source| GatewayError::TokenRefused {
            user: user.to_owned(),
            fingerprint: token::fingerprint(&token),
            source,
        })
}

/// Where the token's instance runs.
pub(crate) async fn resolve(
    resolver: &dyn Resolver,
    claims: &Claims,
) -> Result<Target, GatewayError> {
    let req = ResolveRequest {
        state_id: claims.sid,
        instance_id: claims.iid,
    };
    match resolver.resolve(req).await {
        Ok(ResolveResponse::Ready(target)) => Ok(target),
        Ok(ResolveResponse::Missing) => Err(GatewayError::Missing {
            state: claims.sid.to_string(),
            instance: claims.iid.to_string(),
        }),
        Err(e) => Err(GatewayError::Resolve(e)),
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

/// Logs in to the instance as `target.user` with the client's other startup parameters, and
/// returns once the backend says AuthenticationOk (its later messages stay in `backend.buf`).
pub(crate) async fn backend_login<B: AsyncRead + AsyncWrite + Unpin>(
    backend: &mut Conn<B>,
    target: &Target,
    params: &StartupParams,
) -> Result<(), GatewayError> {
    let mut out = BytesMut::new();
    let forwarded = params.iter().filter(|(k, _)| *k != "user");
    frontend::startup_message(
        std::iter::once(("user", target.user.as_str())).chain(forwarded),
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

/// SQLSTATE and message of a raw ErrorResponse, for logs.
fn summarize_error(raw: &[u8]) -> String {
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

/// Tells the client it is in, hands over what each side already sent, and relays bytes both
/// ways until either side closes.
pub(crate) async fn passthrough<C, B>(
    mut client: Conn<C>,
    mut backend: Conn<B>,
) -> Result<(u64, u64), GatewayError>
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let mut out = BytesMut::new();
    codec::authentication_ok(&mut out);
    // ParameterStatus, BackendKeyData and ReadyForQuery may already be buffered.
    out.extend_from_slice(&backend.buf);
    client.send(&out).await.map_err(GatewayError::ClientIo)?;
    if !client.buf.is_empty() {
        backend
            .send(&client.buf)
            .await
            .map_err(GatewayError::BackendIo)?;
    }
    // Neither side says which one failed; the stream error is the client's more often than not.
    tokio::io::copy_bidirectional(&mut client.io, &mut backend.io)
        .await
        .map_err(GatewayError::ClientIo)
}
