//! Handshake steps driven over `tokio::io::duplex` by hand-written clients, for the paths that
//! end before a backend is reached (tests/real_server.rs covers the rest with real servers).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use futures_util::future::BoxFuture;
use postgres_protocol::message::backend::Header;
use postgres_protocol::message::frontend;
use taidon_api::{ResolveRequest, ResolveResponse};
use taidon_core::token::{Scope, SharedKeyset, TokenKey};
use taidon_core::{InstanceId, StateId};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use crate::{codec, Clock, Gateway, GatewayConfig, GatewayError, ResolveError, Resolver, Step};

const NOW: u64 = 1_800_000_000;

struct FixedClock;

impl Clock for FixedClock {
    fn now_s(&self) -> u64 {
        NOW
    }
}

/// A fake resolver that answers every request with `answer()` and records what it was asked.
struct FakeResolver {
    answer: fn() -> Result<ResolveResponse, ResolveError>,
    asked: Mutex<Vec<ResolveRequest>>,
}

impl Resolver for FakeResolver {
    fn resolve(&self, req: ResolveRequest) -> BoxFuture<'_, Result<ResolveResponse, ResolveError>> {
        self.asked.lock().unwrap().push(req);
        Box::pin(async move { (self.answer)() })
    }
}

fn key() -> TokenKey {
    TokenKey::hs256(b"0123456789abcdef0123456789abcdef", "install-test")
}

fn token() -> String {
    let k = key();
    k.sign(&k.claims(
        StateId::from_bytes([7; 32]),
        InstanceId::from_bytes([9; 8]),
        Scope::Rw,
        NOW - 5,
        600,
    ))
    .unwrap()
}

fn gateway(
    timeout: Duration,
    answer: fn() -> Result<ResolveResponse, ResolveError>,
) -> (Arc<Gateway>, Arc<FakeResolver>) {
    let resolver = Arc::new(FakeResolver {
        answer,
        asked: Mutex::new(Vec::new()),
    });
    let gw = Gateway::new(
        GatewayConfig {
            handshake_timeout: timeout,
            ..GatewayConfig::default()
        },
        Arc::new(SharedKeyset::new(key())),
        resolver.clone(),
    )
    .with_clock(Arc::new(FixedClock));
    (Arc::new(gw), resolver)
}

fn missing() -> Result<ResolveResponse, ResolveError> {
    Ok(ResolveResponse::Missing)
}

/// Runs the gateway on one end of a duplex pipe and returns the client's end.
fn start(
    gw: &Arc<Gateway>,
) -> (
    DuplexStream,
    tokio::task::JoinHandle<Result<(), GatewayError>>,
) {
    let (client, server) = tokio::io::duplex(64 * 1024);
    let gw = gw.clone();
    (
        client,
        tokio::spawn(async move { gw.handle(server, None).await }),
    )
}

async fn send_startup(client: &mut DuplexStream, params: &[(&str, &str)]) {
    let mut buf = BytesMut::new();
    frontend::startup_message(params.iter().copied(), &mut buf).unwrap();
    client.write_all(&buf).await.unwrap();
}

/// Everything the gateway sends until it closes, as (tag, body) messages.
async fn read_to_close(client: &mut DuplexStream) -> Vec<(u8, Vec<u8>)> {
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut raw))
        .await
        .expect("the gateway closes the connection")
        .unwrap();
    let mut rest = &raw[..];
    let mut out = Vec::new();
    while let Some(h) = Header::parse(rest).unwrap() {
        let total = h.len() as usize + 1;
        assert!(rest.len() >= total, "truncated message in {raw:?}");
        out.push((h.tag(), rest[5..total].to_vec()));
        rest = &rest[total..];
    }
    assert!(rest.is_empty(), "trailing bytes: {rest:?}");
    out
}

/// The severity, SQLSTATE and message of the last message, which must be an ErrorResponse.
fn fatal(msgs: &[(u8, Vec<u8>)]) -> (String, String, String) {
    let Some((b'E', body)) = msgs.last() else {
        panic!("the last message is not an ErrorResponse: {msgs:?}");
    };
    let fields = codec::error_fields(body);
    let get = |t: u8| {
        fields
            .iter()
            .find(|(f, _)| *f == t)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    (get(b'S'), get(b'C'), get(b'M'))
}

const AUTH_REQUEST: (u8, &[u8]) = (b'R', &[0, 0, 0, 3]);

#[tokio::test]
async fn unsupported_protocol_gets_08p01() {
    let (gw, _) = gateway(Duration::from_secs(5), missing);
    let (mut client, task) = start(&gw);
    let mut buf = BytesMut::new();
    buf.put_u32(8 + 10);
    buf.put_u32(2 << 16);
    buf.extend_from_slice(b"user\0bob\0\0");
    client.write_all(&buf).await.unwrap();
    let msgs = read_to_close(&mut client).await;
    assert_eq!(msgs.len(), 1);
    let (severity, code, message) = fatal(&msgs);
    assert_eq!((severity.as_str(), code.as_str()), ("FATAL", "08P01"));
    assert!(
        message.contains("unsupported frontend protocol 2.0"),
        "{message}"
    );
    assert!(matches!(
        task.await.unwrap(),
        Err(GatewayError::UnsupportedProtocol { major: 2, minor: 0 })
    ));
}

#[tokio::test]
async fn missing_user_gets_08p01() {
    let (gw, _) = gateway(Duration::from_secs(5), missing);
    let (mut client, task) = start(&gw);
    send_startup(&mut client, &[("database", "postgres")]).await;
    let msgs = read_to_close(&mut client).await;
    assert_eq!(fatal(&msgs).1, "08P01");
    assert!(matches!(
        task.await.unwrap(),
        Err(GatewayError::MissingUser)
    ));
}

#[tokio::test]
async fn cancel_request_is_closed_silently() {
    let (gw, resolver) = gateway(Duration::from_secs(5), missing);
    let (mut client, task) = start(&gw);
    let mut buf = BytesMut::new();
    frontend::cancel_request(1234, 5678, &mut buf);
    client.write_all(&buf).await.unwrap();
    assert!(read_to_close(&mut client).await.is_empty());
    task.await.unwrap().unwrap();
    assert!(resolver.asked.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_silent_client_is_dropped_after_the_timeout() {
    let timeout = Duration::from_millis(300);
    let (gw, _) = gateway(timeout, missing);
    let (mut client, task) = start(&gw);
    let t0 = Instant::now();
    assert!(read_to_close(&mut client).await.is_empty());
    let waited = t0.elapsed();
    assert!(waited >= timeout, "dropped after {waited:?}");
    assert!(waited < timeout * 10, "dropped only after {waited:?}");
    assert!(matches!(
        task.await.unwrap(),
        Err(GatewayError::Timeout(Step::Startup))
    ));
}

#[tokio::test]
async fn a_client_that_never_sends_its_password_is_dropped() {
    let (gw, _) = gateway(Duration::from_millis(300), missing);
    let (mut client, task) = start(&gw);
    send_startup(&mut client, &[("user", "sqlrs")]).await;
    let msgs = read_to_close(&mut client).await;
    assert_eq!(msgs[0], (AUTH_REQUEST.0, AUTH_REQUEST.1.to_vec()));
    assert_eq!(fatal(&msgs).1, "57014");
    assert!(matches!(
        task.await.unwrap(),
        Err(GatewayError::Timeout(Step::Auth))
    ));
}

#[tokio::test]
async fn ssl_and_gss_requests_are_refused_then_startup_is_read() {
    let (gw, resolver) = gateway(Duration::from_secs(5), missing);
    let (mut client, task) = start(&gw);
    let mut buf = BytesMut::new();
    buf.put_u32(8);
    buf.put_u32(80_877_104);
    client.write_all(&buf).await.unwrap();
    let mut answer = [0u8; 1];
    client.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"N");
    buf.clear();
    frontend::ssl_request(&mut buf);
    client.write_all(&buf).await.unwrap();
    client.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"N");

    send_startup(&mut client, &[("user", "sqlrs")]).await;
    buf.clear();
    frontend::password_message(token().as_bytes(), &mut buf).unwrap();
    client.write_all(&buf).await.unwrap();
    let msgs = read_to_close(&mut client).await;
    assert_eq!(msgs[0].0, b'R');
    assert_eq!(
        fatal(&msgs),
        (
            "FATAL".to_owned(),
            "3D000".to_owned(),
            "database state is not available".to_owned()
        )
    );
    assert!(matches!(
        task.await.unwrap(),
        Err(GatewayError::Missing { .. })
    ));
    let asked = resolver.asked.lock().unwrap();
    assert_eq!(
        *asked,
        vec![ResolveRequest {
            state_id: StateId::from_bytes([7; 32]),
            instance_id: Some(InstanceId::from_bytes([9; 8])),
            scope: Scope::Rw,
            max_conn: None,
        }]
    );
}

#[tokio::test]
async fn each_encryption_request_is_answered_once() {
    for (first, second, version) in [
        (80_877_104u32, 80_877_104u32, "1234.5680"),
        (80_877_103, 80_877_103, "1234.5679"),
        (80_877_104, 80_877_103, ""),
    ] {
        let (gw, _) = gateway(Duration::from_secs(5), missing);
        let (mut client, task) = start(&gw);
        let mut answer = [0u8; 1];
        for (i, code) in [first, second].into_iter().enumerate() {
            let mut buf = BytesMut::new();
            buf.put_u32(8);
            buf.put_u32(code);
            client.write_all(&buf).await.unwrap();
            if i == 1 && !version.is_empty() {
                break;
            }
            client.read_exact(&mut answer).await.unwrap();
            assert_eq!(&answer, b"N");
        }
        if version.is_empty() {
            // GSS refused, then SSL refused: both asked once, the startup goes on.
            send_startup(&mut client, &[("user", "sqlrs")]).await;
            let mut header = [0u8; 9];
            client.read_exact(&mut header).await.unwrap();
            assert_eq!(header[0], b'R');
            drop(client);
            let _ = task.await;
            continue;
        }
        let msgs = read_to_close(&mut client).await;
        let (_, code, message) = fatal(&msgs);
        assert_eq!(code, "08P01");
        assert!(
            message.contains(&format!("unsupported frontend protocol {version}")),
            "{message}"
        );
        assert!(message.contains("server supports 3.0 to 3.2"), "{message}");
        assert!(matches!(
            task.await.unwrap(),
            Err(GatewayError::UnsupportedProtocol { major: 1234, .. })
        ));
    }
}

#[tokio::test]
async fn newer_minor_versions_and_protocol_options_are_negotiated_not_refused() {
    // (minor asked, options, NegotiateProtocolVersion expected)
    for (minor, options, negotiated) in [
        (9u32, vec![], Some((2i32, vec![]))),
        (
            0,
            vec!["_pq_.compression"],
            Some((2, vec!["_pq_.compression"])),
        ),
        (
            2,
            vec!["_pq_.a", "_pq_.b"],
            Some((2, vec!["_pq_.a", "_pq_.b"])),
        ),
        (2, vec![], None),
        (1, vec![], None),
    ] {
        let (gw, resolver) = gateway(Duration::from_secs(5), missing);
        let (mut client, task) = start(&gw);
        let mut body = b"user\0sqlrs\0".to_vec();
        for o in &options {
            body.extend_from_slice(o.as_bytes());
            body.extend_from_slice(b"\0on\0");
        }
        body.push(0);
        let mut buf = BytesMut::new();
        buf.put_u32(8 + body.len() as u32);
        buf.put_u32((3 << 16) | minor);
        buf.extend_from_slice(&body);
        frontend::password_message(token().as_bytes(), &mut buf).unwrap();
        client.write_all(&buf).await.unwrap();
        let msgs = read_to_close(&mut client).await;
        let rest = match negotiated {
            Some((newest, names)) => {
                let (tag, body) = &msgs[0];
                assert_eq!(*tag, b'v', "3.{minor} {options:?}: {msgs:?}");
                let mut expected = newest.to_be_bytes().to_vec();
                expected.extend_from_slice(&(names.len() as i32).to_be_bytes());
                for n in names {
                    expected.extend_from_slice(n.as_bytes());
                    expected.push(0);
                }
                assert_eq!(body, &expected);
                &msgs[1..]
            }
            None => &msgs[..],
        };
        assert_eq!(rest[0], (AUTH_REQUEST.0, AUTH_REQUEST.1.to_vec()));
        assert_eq!(fatal(rest).1, "3D000", "3.{minor} {options:?}");
        assert!(matches!(
            task.await.unwrap(),
            Err(GatewayError::Missing { .. })
        ));
        assert_eq!(resolver.asked.lock().unwrap().len(), 1);
    }
}

#[tokio::test]
async fn data_pipelined_after_an_ssl_request_is_refused() {
    let (gw, _) = gateway(Duration::from_secs(5), missing);
    let (mut client, task) = start(&gw);
    let mut buf = BytesMut::new();
    frontend::ssl_request(&mut buf);
    frontend::startup_message([("user", "sqlrs")], &mut buf).unwrap();
    client.write_all(&buf).await.unwrap();
    assert!(read_to_close(&mut client).await.is_empty());
    assert!(matches!(
        task.await.unwrap(),
        Err(GatewayError::ClientProtocol(_))
    ));
}

#[tokio::test]
async fn a_bad_token_gets_28p01_without_the_token_or_the_reason() {
    let (gw, resolver) = gateway(Duration::from_secs(5), missing);
    let other = TokenKey::hs256(b"another secret of enough length!", "install-test");
    let forged = other
        .sign(&other.claims(
            StateId::from_bytes([7; 32]),
            InstanceId::from_bytes([9; 8]),
            Scope::Rw,
            NOW,
            600,
        ))
        .unwrap();
    for password in [forged.as_str(), "not-a-token", ""] {
        let (mut client, task) = start(&gw);
        send_startup(&mut client, &[("user", "sqlrs"), ("database", "postgres")]).await;
        let mut buf = BytesMut::new();
        frontend::password_message(password.as_bytes(), &mut buf).unwrap();
        client.write_all(&buf).await.unwrap();
        let msgs = read_to_close(&mut client).await;
        let (severity, code, message) = fatal(&msgs);
        assert_eq!((severity.as_str(), code.as_str()), ("FATAL", "28P01"));
        assert_eq!(message, "password authentication failed for user \"sqlrs\"");
        let err = task.await.unwrap().unwrap_err();
        assert!(matches!(err, GatewayError::TokenRefused { .. }), "{err:?}");
        assert!(
            password.is_empty() || !err.to_string().contains(password),
            "the error names the token: {err}"
        );
    }
    assert!(resolver.asked.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_message_other_than_the_password_gets_08p01() {
    let (gw, _) = gateway(Duration::from_secs(5), missing);
    let (mut client, task) = start(&gw);
    send_startup(&mut client, &[("user", "sqlrs")]).await;
    let mut buf = BytesMut::new();
    frontend::query("select 1", &mut buf).unwrap();
    client.write_all(&buf).await.unwrap();
    let msgs = read_to_close(&mut client).await;
    assert_eq!(fatal(&msgs).1, "08P01");
    assert!(matches!(
        task.await.unwrap(),
        Err(GatewayError::UnexpectedMessage { tag: 'Q' })
    ));
}

#[tokio::test]
async fn resolver_failures_map_to_client_safe_codes() {
    fn unavailable() -> Result<ResolveResponse, ResolveError> {
        Err(ResolveError::Status {
            status: 503,
            message: "controller is shutting down at /secret/path".into(),
        })
    }
    fn broken() -> Result<ResolveResponse, ResolveError> {
        Err(ResolveError::Status {
            status: 500,
            message: "database is locked at /secret/path".into(),
        })
    }
    for (answer, code) in [(unavailable as fn() -> _, "57P03"), (broken, "XX000")] {
        let (gw, _) = gateway(Duration::from_secs(5), answer);
        let (mut client, task) = start(&gw);
        send_startup(&mut client, &[("user", "sqlrs")]).await;
        let mut buf = BytesMut::new();
        frontend::password_message(token().as_bytes(), &mut buf).unwrap();
        client.write_all(&buf).await.unwrap();
        let msgs = read_to_close(&mut client).await;
        let (_, got, message) = fatal(&msgs);
        assert_eq!(got, code);
        assert!(!message.contains("/secret"), "{message}");
        assert!(matches!(task.await.unwrap(), Err(GatewayError::Resolve(_))));
    }
}

// ---- issue 4: token failures, token in the user name, limits, malformed input ----

fn fixed(answer: ResolveResponse) -> fn() -> Result<ResolveResponse, ResolveError> {
    // Each answer the tests need is a distinct fn item.
    match answer {
        ResolveResponse::Missing => missing,
        ResolveResponse::Forbidden { .. } => || {
            Ok(ResolveResponse::Forbidden {
                reason: "not yours".into(),
            })
        },
        ResolveResponse::TooManyConnections { .. } => {
            || Ok(ResolveResponse::TooManyConnections { limit: 2 })
        }
        ResolveResponse::Starting { .. } => || Ok(ResolveResponse::Starting { retry_after_ms: 20 }),
        ResolveResponse::Ready(_) => unreachable!("not used"),
    }
}

/// Logs in with `password` (or, when `user` is a token, with no password) and returns the
/// FATAL's SQLSTATE and message, the gateway's error, and how many resolves it made.
async fn refused(
    gw: &Arc<Gateway>,
    resolver: &FakeResolver,
    user: &str,
    password: Option<&str>,
) -> (String, String, GatewayError, usize) {
    let asked_before = resolver.asked.lock().unwrap().len();
    let (mut client, task) = start(gw);
    send_startup(&mut client, &[("user", user), ("database", "postgres")]).await;
    if let Some(p) = password {
        let mut buf = BytesMut::new();
        frontend::password_message(p.as_bytes(), &mut buf).unwrap();
        client.write_all(&buf).await.unwrap();
    }
    let msgs = read_to_close(&mut client).await;
    let (severity, code, message) = fatal(&msgs);
    assert_eq!(severity, "FATAL");
    let err = task.await.unwrap().unwrap_err();
    let asked = resolver.asked.lock().unwrap().len() - asked_before;
    (code, message, err, asked)
}

fn sign_with(k: &TokenKey, f: impl FnOnce(&mut taidon_core::token::Claims)) -> String {
    let mut c = k.claims(
        StateId::from_bytes([7; 32]),
        InstanceId::from_bytes([9; 8]),
        Scope::Rw,
        NOW - 5,
        600,
    );
    f(&mut c);
    k.sign(&c).unwrap()
}

async fn token_refused(token: &str, what: fn(&taidon_core::token::TokenError) -> bool) {
    let (gw, resolver) = gateway(Duration::from_secs(5), missing);
    let (code, message, err, asked) = refused(&gw, &resolver, "sqlrs", Some(token)).await;
    assert_eq!(code, "28P01");
    assert_eq!(message, "password authentication failed for user \"sqlrs\"");
    assert!(!message.contains(token) && !err.to_string().contains(token));
    let GatewayError::TokenRefused { source, .. } = &err else {
        panic!("{err:?}");
    };
    assert!(what(source), "{source:?}");
    assert_eq!(asked, 0, "a refused token never reaches Resolve");
}

use taidon_core::token::TokenError as TE;

#[tokio::test]
async fn token_with_a_bad_signature() {
    let forged = taidon_core::token::Keyset::from_file(&taidon_core::token::KeysetFile {
        audience: "install-test".into(),
        current: key().kids()[0].to_owned(),
        keys: vec![taidon_core::token::KeyEntry {
            kid: key().kids()[0].to_owned(),
            alg: taidon_core::token::Algorithm::Hs256,
            secret_hex: Some(hex_encode(b"a different secret of 32 bytes..")),
            private_pkcs8_hex: None,
            public_hex: None,
        }],
    })
    .unwrap();
    token_refused(&sign_with(&forged, |_| {}), |e| {
        matches!(e, TE::BadSignature)
    })
    .await;
}

fn hex_encode(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[tokio::test]
async fn token_with_an_unknown_kid() {
    let stranger = TokenKey::hs256(b"a different secret of 32 bytes..", "install-test");
    token_refused(&sign_with(&stranger, |_| {}), |e| {
        matches!(e, TE::UnknownKey { .. })
    })
    .await;
}

#[tokio::test]
async fn token_expired() {
    token_refused(&sign_with(&key(), |c| c.exp = NOW - 3600), |e| {
        matches!(e, TE::Expired)
    })
    .await;
}

#[tokio::test]
async fn token_not_yet_valid() {
    token_refused(&sign_with(&key(), |c| c.nbf = Some(NOW + 3600)), |e| {
        matches!(e, TE::NotYetValid)
    })
    .await;
}

#[tokio::test]
async fn token_for_another_installation() {
    token_refused(
        &sign_with(&key(), |c| c.aud = "install-other".into()),
        |e| matches!(e, TE::WrongAudience),
    )
    .await;
}

#[tokio::test]
async fn token_scope_not_allowed_gets_28000() {
    // An rw token without its instance: the controller answers Forbidden.
    let (gw, resolver) = gateway(
        Duration::from_secs(5),
        fixed(ResolveResponse::Forbidden {
            reason: String::new(),
        }),
    );
    let t = sign_with(&key(), |c| c.iid = None);
    let (code, message, err, asked) = refused(&gw, &resolver, "sqlrs", Some(&t)).await;
    assert_eq!(code, "28000");
    assert_eq!(message, "the token does not allow this connection");
    assert!(matches!(err, GatewayError::Forbidden { .. }), "{err:?}");
    assert!(!err.to_string().contains(&t));
    assert_eq!(asked, 1);
    assert_eq!(resolver.asked.lock().unwrap()[0].instance_id, None);
}

#[tokio::test]
async fn token_with_an_unknown_scope_is_malformed() {
    // A hand-made token whose scope is neither ro nor rw.
    let mut c = serde_json::to_value(key().claims(
        StateId::from_bytes([7; 32]),
        InstanceId::from_bytes([9; 8]),
        Scope::Rw,
        NOW,
        600,
    ))
    .unwrap();
    c["scope"] = "admin".into();
    let mut header = jsonwebtoken_header();
    header.kid = Some(key().kids()[0].to_owned());
    let t = jsonwebtoken::encode(
        &header,
        &c,
        &jsonwebtoken::EncodingKey::from_secret(b"0123456789abcdef0123456789abcdef"),
    )
    .unwrap();
    token_refused(&t, |e| matches!(e, TE::Malformed(_))).await;
}

fn jsonwebtoken_header() -> jsonwebtoken::Header {
    jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256)
}

#[tokio::test]
async fn token_for_an_unknown_state_gets_3d000() {
    let (gw, resolver) = gateway(Duration::from_secs(5), missing);
    let (code, _, err, asked) = refused(&gw, &resolver, "sqlrs", Some(&token())).await;
    assert_eq!(code, "3D000");
    assert!(matches!(err, GatewayError::Missing { .. }));
    assert_eq!(asked, 1);
}

#[tokio::test]
async fn token_for_another_instance_gets_28000() {
    let (gw, resolver) = gateway(
        Duration::from_secs(5),
        fixed(ResolveResponse::Forbidden {
            reason: String::new(),
        }),
    );
    let (code, _, err, _) = refused(&gw, &resolver, "sqlrs", Some(&token())).await;
    assert_eq!(code, "28000");
    assert!(matches!(err, GatewayError::Forbidden { .. }));
}

#[tokio::test]
async fn token_in_the_user_name_needs_no_password_and_is_never_echoed() {
    let (gw, resolver) = gateway(Duration::from_secs(5), missing);
    let t = token();
    let (code, _, _, asked) = refused(&gw, &resolver, &t, None).await;
    assert_eq!(code, "3D000", "verified from the user name, then resolved");
    assert_eq!(asked, 1);

    // A refused token in the user name: the message names a fingerprint, not the token.
    let bad = sign_with(&key(), |c| c.exp = NOW - 3600);
    let (code, message, err, _) = refused(&gw, &resolver, &bad, None).await;
    assert_eq!(code, "28P01");
    assert!(!message.contains(&bad), "{message}");
    assert!(message.contains("(token "), "{message}");
    assert!(!crate::error_chain(&err).contains(&bad));
}

#[tokio::test]
async fn too_many_connections_gets_53300() {
    let (gw, resolver) = gateway(
        Duration::from_secs(5),
        fixed(ResolveResponse::TooManyConnections { limit: 0 }),
    );
    let (code, message, _, _) = refused(&gw, &resolver, "sqlrs", Some(&token())).await;
    assert_eq!(code, "53300");
    assert!(message.contains("limit 2"), "{message}");
}

fn gateway_with(
    config: GatewayConfig,
    answer: fn() -> Result<ResolveResponse, ResolveError>,
) -> (Arc<Gateway>, Arc<FakeResolver>) {
    let resolver = Arc::new(FakeResolver {
        answer,
        asked: Mutex::new(Vec::new()),
    });
    let gw = Gateway::new(config, Arc::new(SharedKeyset::new(key())), resolver.clone())
        .with_clock(Arc::new(FixedClock));
    (Arc::new(gw), resolver)
}

#[tokio::test]
async fn starting_is_retried_then_57p03() {
    let (gw, resolver) = gateway_with(
        GatewayConfig {
            starting_wait: Duration::from_millis(300),
            ..GatewayConfig::default()
        },
        fixed(ResolveResponse::Starting { retry_after_ms: 0 }),
    );
    let (code, _, err, asked) = refused(&gw, &resolver, "sqlrs", Some(&token())).await;
    assert_eq!(code, "57P03");
    assert!(matches!(err, GatewayError::StillStarting { .. }));
    assert!(asked > 2, "retried {asked} times");
    assert_eq!(gw.waiting.total(), 0, "the waiting slot is given back");

    let (gw, resolver) = gateway_with(
        GatewayConfig {
            max_waiting: 0,
            ..GatewayConfig::default()
        },
        fixed(ResolveResponse::Starting { retry_after_ms: 0 }),
    );
    let (code, _, err, asked) = refused(&gw, &resolver, "sqlrs", Some(&token())).await;
    assert_eq!(code, "53300");
    assert!(matches!(err, GatewayError::TooManyWaiting));
    assert_eq!(asked, 1);
}

#[tokio::test]
async fn rate_limit_per_address_and_require_tls_off_loopback() {
    let (gw, _) = gateway_with(
        GatewayConfig {
            rate_per_ip: crate::RateLimit { burst: 2, per_s: 1 },
            ..GatewayConfig::default()
        },
        missing,
    );
    let peer: std::net::SocketAddr = "192.0.2.7:5000".parse().unwrap();
    let mut codes = Vec::new();
    for _ in 0..3 {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let g = gw.clone();
        let task = tokio::spawn(async move { g.handle(server, Some(peer)).await });
        send_startup(&mut client, &[("user", "sqlrs")]).await;
        let mut buf = BytesMut::new();
        frontend::password_message(token().as_bytes(), &mut buf).unwrap();
        client.write_all(&buf).await.unwrap();
        codes.push(fatal(&read_to_close(&mut client).await).1);
        let _ = task.await.unwrap();
    }
    assert_eq!(codes, ["3D000", "3D000", "53300"]);

    let (gw, resolver) = gateway_with(
        GatewayConfig {
            require_tls: true,
            ..GatewayConfig::default()
        },
        missing,
    );
    let (mut client, server) = tokio::io::duplex(64 * 1024);
    let g = gw.clone();
    let task = tokio::spawn(async move { g.handle(server, Some(peer)).await });
    send_startup(&mut client, &[("user", "sqlrs")]).await;
    let (_, code, message) = fatal(&read_to_close(&mut client).await);
    assert_eq!(code, "28000");
    assert!(message.contains("TLS is required"), "{message}");
    assert!(matches!(
        task.await.unwrap(),
        Err(GatewayError::TlsRequired { .. })
    ));
    // Over loopback plain text is fine.
    let (code, _, _, _) = refused(&gw, &resolver, "sqlrs", Some(&token())).await;
    assert_eq!(code, "3D000");
}

/// Malformed client input: every case ends (no hang, no panic), with an ErrorResponse where
/// the protocol allows one (after a StartupMessage was understood) and nothing otherwise.
#[tokio::test]
async fn malformed_packets_table() {
    fn startup(params: &[(&str, &str)]) -> Vec<u8> {
        let mut b = BytesMut::new();
        frontend::startup_message(params.iter().copied(), &mut b).unwrap();
        b.to_vec()
    }
    fn be(n: u32) -> [u8; 4] {
        n.to_be_bytes()
    }
    let login = startup(&[("user", "sqlrs")]);
    let mut with_garbage_after_password = login.clone();
    let tok = token();
    with_garbage_after_password.push(b'p');
    with_garbage_after_password.extend_from_slice(&be(4 + tok.len() as u32 + 1 + 3));
    with_garbage_after_password.extend_from_slice(tok.as_bytes());
    with_garbage_after_password.extend_from_slice(b"\0xyz");
    let mut huge_password = login.clone();
    huge_password.push(b'p');
    huge_password.extend_from_slice(&be(1 << 30));
    let mut short_password = login.clone();
    short_password.push(b'p');
    short_password.extend_from_slice(&be(2));
    let mut unterminated_password = login.clone();
    unterminated_password.push(b'p');
    unterminated_password.extend_from_slice(&be(4 + 3));
    unterminated_password.extend_from_slice(b"abc");
    let truncated_password = {
        let mut v = login.clone();
        v.push(b'p');
        v.extend_from_slice(&be(100));
        v.extend_from_slice(b"only a few bytes");
        v
    };

    // (name, bytes, expected SQLSTATE of the final ErrorResponse or None for a silent close)
    let cases: Vec<(&str, Vec<u8>, Option<&str>)> = vec![
        ("empty", vec![], None),
        ("three bytes", vec![0, 0, 0], None),
        ("length zero", [be(0), be(3 << 16)].concat(), None),
        (
            "length below the header",
            [be(7), be(3 << 16)].concat(),
            None,
        ),
        ("huge length", [be(u32::MAX), be(3 << 16)].concat(), None),
        (
            "length past the limit",
            [be(10 * 1024 + 1), be(3 << 16)].concat(),
            None,
        ),
        ("truncated startup", login[..login.len() - 3].to_vec(), None),
        (
            "length longer than sent",
            [&be(200)[..], &be(3 << 16)[..], &b"user"[..]].concat(),
            None,
        ),
        ("protocol 2.0", [be(8), be(2 << 16)].concat(), Some("08P01")),
        ("protocol 4.0", [be(8), be(4 << 16)].concat(), Some("08P01")),
        (
            "protocol 3.9 without parameters",
            [be(8), be((3 << 16) | 9)].concat(),
            None,
        ),
        (
            "cancel with a key past 256 bytes",
            [&be(12 + 257)[..], &be(80_877_102)[..], &[0u8; 261][..]].concat(),
            None,
        ),
        (
            "unknown request code",
            [be(8), be((1234 << 16) | 5555)].concat(),
            None,
        ),
        (
            "cancel with a short body",
            [be(12), be(80_877_102), be(1)].concat(),
            None,
        ),
        (
            "missing user",
            startup(&[("database", "postgres")]),
            Some("08P01"),
        ),
        ("empty user", startup(&[("user", "")]), Some("08P01")),
        (
            "params without a terminator",
            [&be(8 + 9)[..], &be(3 << 16)[..], &b"user\0bob\0"[..]].concat(),
            None,
        ),
        (
            "value without NUL",
            [&be(8 + 7)[..], &be(3 << 16)[..], &b"user\0bo"[..]].concat(),
            None,
        ),
        (
            "not UTF-8",
            [&be(8 + 8)[..], &be(3 << 16)[..], &b"user\0\xff\xfe\0"[..]].concat(),
            None,
        ),
        (
            "garbage after the params",
            [&be(8 + 12)[..], &be(3 << 16)[..], &b"user\0bob\0\0abc"[..]].concat(),
            None,
        ),
        ("no password at all", login.clone(), Some("57014")),
        (
            "garbage after the password",
            with_garbage_after_password,
            None,
        ),
        ("huge password length", huge_password, None),
        ("password length below 4", short_password, None),
        ("unterminated password", unterminated_password, None),
        ("truncated password", truncated_password, Some("57014")),
        (
            "query instead of password",
            [login.clone(), vec![b'Q', 0, 0, 0, 5, 0]].concat(),
            Some("08P01"),
        ),
        (
            "random bytes",
            (0..200u32).map(|i| (i * 37 % 251) as u8).collect(),
            None,
        ),
    ];
    let (gw, resolver) = gateway(Duration::from_millis(300), missing);
    for (name, bytes, expected) in cases {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let g = gw.clone();
        let task = tokio::spawn(async move { g.handle(server, None).await });
        client.write_all(&bytes).await.unwrap();
        // Half-close is not possible on a duplex; the handshake timeout bounds silent cases.
        let mut raw = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut raw))
            .await
            .unwrap_or_else(|_| panic!("{name}: the gateway hung"))
            .unwrap();
        let result = task.await;
        assert!(result.is_ok(), "{name}: the task panicked");
        assert!(result.unwrap().is_err(), "{name}: accepted");
        let msgs = parse_all(&raw);
        match expected {
            Some(code) => assert_eq!(fatal(&msgs).1, code, "{name}: {msgs:?}"),
            None => assert!(
                msgs.iter().all(|(t, _)| *t == b'R'),
                "{name}: expected a silent close, got {msgs:?}"
            ),
        }
    }
    assert!(resolver.asked.lock().unwrap().is_empty());
}

fn parse_all(raw: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut rest = raw;
    let mut out = Vec::new();
    while let Some(h) = Header::parse(rest).unwrap() {
        let total = h.len() as usize + 1;
        out.push((h.tag(), rest[5..total].to_vec()));
        rest = &rest[total..];
    }
    out
}

/// A key source that, asked, puts `next` in force and counts the asks.
struct SwapKeys {
    keys: Arc<SharedKeyset>,
    next: TokenKey,
    asked: Mutex<u32>,
}

impl crate::KeySource for SwapKeys {
    fn refresh(&self) -> BoxFuture<'_, ()> {
        *self.asked.lock().unwrap() += 1;
        self.keys.replace(self.next.clone());
        Box::pin(async {})
    }
}

#[tokio::test]
async fn a_token_naming_an_unknown_key_has_the_keys_fetched_again_once() {
    let rotated = TokenKey::hs256(b"fedcba9876543210fedcba9876543210", "install-test");
    let t = rotated
        .sign(&rotated.claims(
            StateId::from_bytes([7; 32]),
            InstanceId::from_bytes([9; 8]),
            Scope::Rw,
            NOW - 5,
            600,
        ))
        .unwrap();
    // Without a key source: refused.
    let (gw, resolver) = gateway(Duration::from_secs(5), missing);
    let (code, _, _, _) = refused(&gw, &resolver, &t, None).await;
    assert_eq!(code, "28P01");

    // With one: fetched again, then verified (and resolved: 3D000 from the fake).
    let keys = Arc::new(SharedKeyset::new(key()));
    let source = Arc::new(SwapKeys {
        keys: Arc::clone(&keys),
        next: rotated,
        asked: Mutex::new(0),
    });
    let resolver = Arc::new(FakeResolver {
        answer: missing,
        asked: Mutex::new(Vec::new()),
    });
    let gw = Arc::new(
        Gateway::new(GatewayConfig::default(), keys, resolver.clone())
            .with_clock(Arc::new(FixedClock))
            .with_key_source(source.clone()),
    );
    let (code, _, _, asked) = refused(&gw, &resolver, &t, None).await;
    assert_eq!(code, "3D000", "verified with the fetched key");
    assert_eq!((asked, *source.asked.lock().unwrap()), (1, 1));
    // A token of a known key asks for nothing.
    let (code, _, _, _) = refused(&gw, &resolver, &t, None).await;
    assert_eq!(code, "3D000");
    assert_eq!(*source.asked.lock().unwrap(), 1);
    // One of the old key, gone after the swap, asks once more and is refused.
    let old = sign_with(&key(), |_| {});
    let (code, _, _, _) = refused(&gw, &resolver, &old, None).await;
    assert_eq!(code, "28P01");
    assert_eq!(*source.asked.lock().unwrap(), 2);
}

#[test]
fn the_fd_budget_leaves_a_reserve_and_never_overcommits() {
    for nofile in [64u64, 256, 1024, 20_000, 1 << 20, u64::MAX] {
        let b = crate::fd_budget(nofile);
        let used = 2 * b.max_clients + b.pool_sessions;
        assert!(b.max_clients >= 1, "{nofile}: {b:?}");
        if nofile >= 512 {
            assert!(
                (used as u64) < nofile.min(1 << 24) / 8 * 7,
                "{nofile}: {b:?}"
            );
        }
    }
    assert_eq!(
        crate::fd_budget(1024),
        crate::FdBudget {
            max_clients: 324,
            pool_sessions: 216
        }
    );
    assert_eq!(crate::fd_budget(20_000).pool_sessions, 1000);
}

/// Over `max_clients`, a client is told 53300 with the reason once it has sent its startup
/// packet, and the gateway goes on serving the others.
#[tokio::test]
async fn a_full_gateway_refuses_with_53300_and_names_the_limit() {
    let gw = Gateway::new(
        GatewayConfig {
            max_clients: Some(1),
            ..GatewayConfig::default()
        },
        Arc::new(SharedKeyset::new(key())),
        Arc::new(FakeResolver {
            answer: missing,
            asked: Mutex::new(Vec::new()),
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(Arc::new(gw).serve(listener, async {
        let _ = stopped.await;
    }));
    // The first connection stays in its handshake: it holds the one place.
    let _held = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut second = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut buf = BytesMut::new();
    frontend::startup_message([("user", "sqlrs")], &mut buf).unwrap();
    second.write_all(&buf).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), second.read_to_end(&mut raw))
        .await
        .expect("the refusal closes the connection")
        .unwrap();
    let h = Header::parse(&raw).unwrap().expect("a message");
    assert_eq!(h.tag(), b'E', "{raw:?}");
    let fields = codec::error_fields(&raw[5..h.len() as usize + 1]);
    let get = |t: u8| fields.iter().find(|(f, _)| *f == t).map(|(_, v)| v.clone());
    assert_eq!(get(b'C').as_deref(), Some("53300"));
    let message = get(b'M').unwrap_or_default();
    assert!(
        message.contains("at most 1") && message.contains("ulimit -n"),
        "{message}"
    );
    let _ = stop.send(());
    served.await.unwrap();
}
