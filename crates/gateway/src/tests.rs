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
    (client, tokio::spawn(async move { gw.handle(server, None).await }))
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
