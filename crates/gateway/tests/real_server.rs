//! The gateway between real clients (tokio-postgres, psql) and real PostgreSQL servers started
//! with taidon-runtime. One initdb per test binary; each test runs its own copy of that cluster.

use std::sync::Arc;
use std::time::{Duration, Instant};

use taidon_api::{ResolveResponse, Target};
use taidon_core::token::{Scope, SharedKeyset};
use taidon_core::{InstanceId, StateId};
use taidon_gateway::{Clock, Gateway, GatewayConfig, GatewayError, Step};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::error::SqlState;
use tokio_postgres::NoTls;

mod common;
use common::*;

type Handled = tokio::task::JoinHandle<Result<(), GatewayError>>;

/// The gateway on one end of a duplex pipe; the other end for the client.
fn pipe(gw: &Arc<Gateway>) -> (tokio::io::DuplexStream, Handled) {
    let (client, server) = tokio::io::duplex(64 * 1024);
    let gw = gw.clone();
    (
        client,
        tokio::spawn(async move { gw.handle(server, None).await }),
    )
}

/// Connects tokio-postgres over a duplex pipe; the connection runs on its own task.
async fn connect(
    gw: &Arc<Gateway>,
    cfg: &tokio_postgres::Config,
) -> Result<(tokio_postgres::Client, Handled), tokio_postgres::Error> {
    let (stream, handled) = pipe(gw);
    let (client, conn) = cfg.connect_raw(stream, NoTls).await?;
    tokio::spawn(conn);
    Ok((client, handled))
}

/// The FATAL error a refused connection got, and how the gateway saw it end.
async fn refusal(
    gw: &Arc<Gateway>,
    cfg: &tokio_postgres::Config,
) -> (SqlState, String, Result<(), GatewayError>) {
    let (stream, handled) = pipe(gw);
    let Err(e) = cfg.connect_raw(stream, NoTls).await else {
        panic!("the connection was accepted");
    };
    let db = e
        .as_db_error()
        .unwrap_or_else(|| panic!("not a server error: {e}"));
    assert_eq!(db.severity(), "FATAL");
    let ended = tokio::time::timeout(Duration::from_secs(10), handled)
        .await
        .expect("the gateway ends a refused connection")
        .unwrap();
    (db.code().clone(), db.message().to_owned(), ended)
}

async fn refused_with(gw: &Arc<Gateway>, cfg: &tokio_postgres::Config) -> (SqlState, String) {
    let (code, message, ended) = refusal(gw, cfg).await;
    assert!(ended.is_err(), "the gateway saw no failure");
    (code, message)
}

#[tokio::test]
async fn tokio_postgres_queries_through_the_gateway() {
    let pg = Pg::start().await;
    let gw = gateway(pg.ready());
    let mut cfg = client_config(&token());
    cfg.application_name("gw-test")
        .options("-c search_path=gw_schema");
    let (client, handled) = connect(&gw, &cfg).await.unwrap();

    let row = client
        .query_one(
            "select 1::int4, current_user::text, current_setting('application_name'), \
             current_setting('search_path'), current_database()::text",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 1);
    // The instance's own user, never the client's.
    assert_eq!(row.get::<_, String>(1), "postgres");
    assert_eq!(row.get::<_, String>(2), "gw-test");
    assert_eq!(row.get::<_, String>(3), "gw_schema");
    assert_eq!(row.get::<_, String>(4), "postgres");

    // Enough rows that the relay runs over many reads and writes.
    let rows = client
        .query(
            "select g, repeat('x', 200) from generate_series(1, 20000) g",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 20000);
    assert_eq!(rows[19999].get::<_, i32>(0), 20000);

    drop(client);
    tokio::time::timeout(Duration::from_secs(10), handled)
        .await
        .expect("the connection ends when the client leaves")
        .unwrap()
        .unwrap();
    pg.stop().await;
}

#[tokio::test]
async fn bad_expired_and_missing_tokens_are_refused() {
    // No server: these are refused before the instance is reached.
    let nowhere = ResolveResponse::Ready(Target {
        instance_id: InstanceId::from_bytes([4; 8]),
        host: "127.0.0.1".into(),
        port: 1,
        user: "postgres".into(),
        password: "unused".into(),
    });

    let gw = gateway(nowhere.clone());
    let (code, message) = refused_with(&gw, &client_config("not-a-token")).await;
    assert_eq!(code, SqlState::INVALID_PASSWORD);
    assert_eq!(message, "password authentication failed for user \"sqlrs\"");

    let expired = gateway_with(nowhere, NOW + TTL + 31, Duration::from_secs(10));
    let (code, message) = refused_with(&expired, &client_config(&token())).await;
    assert_eq!(code, SqlState::INVALID_PASSWORD);
    assert!(!message.contains(&token()));

    let missing = gateway(ResolveResponse::Missing);
    let (code, message) = refused_with(&missing, &client_config(&token())).await;
    assert_eq!(code, SqlState::INVALID_CATALOG_NAME);
    assert_eq!(message, "database state is not available");
}

#[tokio::test]
async fn ssl_request_is_answered_n_and_the_client_carries_on() {
    let pg = Pg::start().await;
    let gw = gateway(pg.ready());
    let (mut stream, _handled) = pipe(&gw);
    // What a client with sslmode=prefer sends first (tokio-postgres skips it without TLS).
    stream
        .write_all(&[0, 0, 0, 8, 4, 210, 22, 47])
        .await
        .unwrap();
    let mut answer = [0u8; 1];
    stream.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"N");
    let (client, conn) = client_config(&token())
        .connect_raw(stream, NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let one: i32 = client.query_one("select 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
    pg.stop().await;
}

#[tokio::test]
async fn backend_errors_during_startup_are_forwarded() {
    let pg = Pg::start().await;
    let gw = gateway(pg.ready());
    let mut cfg = client_config(&token());
    cfg.dbname("no_such_db");
    // PostgreSQL authenticates before it looks for the database, so this error arrives after
    // AuthenticationOk and reaches the client through the relay.
    let (code, message, _) = refusal(&gw, &cfg).await;
    assert_eq!(code, SqlState::INVALID_CATALOG_NAME);
    assert_eq!(message, "database \"no_such_db\" does not exist");
    pg.stop().await;
}

#[tokio::test]
async fn md5_and_cleartext_backends_are_logged_in_to() {
    let pg = Pg::start_with_hba(
        "host all md5user 127.0.0.1/32 md5\nhost all clearuser 127.0.0.1/32 password",
    )
    .await;
    let local = pg.server.connect_local().await.unwrap();
    // Stored as MD5 so that the md5 method is really used (a SCRAM verifier would upgrade it).
    local
        .batch_execute(
            "set password_encryption = 'md5'; \
             create role md5user login password 'md5-pw'; \
             reset password_encryption; \
             create role clearuser login password 'clear-pw';",
        )
        .await
        .unwrap();
    for (user, password) in [("md5user", "md5-pw"), ("clearuser", "clear-pw")] {
        let gw = gateway(ResolveResponse::Ready(pg.target_as(user, password)));
        let (client, _) = connect(&gw, &client_config(&token())).await.unwrap();
        let who: String = client
            .query_one("select current_user::text", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(who, user);
    }
    // A wrong instance password is the backend's refusal, forwarded.
    let gw = gateway(ResolveResponse::Ready(pg.target_as("postgres", "wrong")));
    let (code, _) = refused_with(&gw, &client_config(&token())).await;
    assert_eq!(code, SqlState::INVALID_PASSWORD);
    pg.stop().await;
}

#[tokio::test]
async fn unreachable_or_silent_instances_get_57p03() {
    // A port nothing listens on: refused at once.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let closed_port = closed.local_addr().unwrap().port();
    drop(closed);
    let target = |port| {
        ResolveResponse::Ready(Target {
            instance_id: InstanceId::from_bytes([4; 8]),
            host: "127.0.0.1".into(),
            port,
            user: "postgres".into(),
            password: "x".into(),
        })
    };
    let gw = gateway(target(closed_port));
    let (code, _, ended) = refusal(&gw, &client_config(&token())).await;
    assert_eq!(code, SqlState::CANNOT_CONNECT_NOW);
    assert!(
        matches!(ended, Err(GatewayError::BackendConnect { .. })),
        "{ended:?}"
    );

    // A listener that never answers: the connect step times out.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let timeout = Duration::from_millis(500);
    let gw = gateway_with(target(silent.local_addr().unwrap().port()), NOW, timeout);
    let t0 = Instant::now();
    let (code, _, ended) = refusal(&gw, &client_config(&token())).await;
    assert!(t0.elapsed() >= timeout);
    assert_eq!(code, SqlState::CANNOT_CONNECT_NOW);
    assert!(
        matches!(ended, Err(GatewayError::Timeout(Step::Connect))),
        "{ended:?}"
    );
}

async fn psql(port: u16, sslmode: &str, password: &str) -> std::process::Output {
    let dsn = format!("postgres://sqlrs@127.0.0.1:{port}/postgres?sslmode={sslmode}");
    tokio::process::Command::new("psql")
        .arg(dsn)
        .args([
            "-X",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            "select 40 + 2",
        ])
        .env("PGPASSWORD", password)
        .env("PGCONNECT_TIMEOUT", "10")
        .env_remove("PGSERVICE")
        .output()
        .await
        .unwrap()
}

#[tokio::test]
async fn psql_through_a_served_port() {
    let pg = Pg::start().await;
    // The real clock, as the server binary runs it.
    let gw = Arc::new(Gateway::new(
        GatewayConfig::default(),
        Arc::new(SharedKeyset::new(key())),
        Arc::new(FakeResolver(pg.ready())),
    ));
    let k = key();
    let now = taidon_gateway::SystemClock.now_s();
    let live = k
        .sign(&k.claims(
            StateId::from_bytes([3; 32]),
            InstanceId::from_bytes([4; 8]),
            Scope::Rw,
            now,
            TTL,
        ))
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(gw.serve(listener, async {
        let _ = stopped.await;
    }));

    for sslmode in ["disable", "prefer"] {
        let out = psql(port, sslmode, &live).await;
        assert!(
            out.status.success(),
            "psql sslmode={sslmode} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42");
    }

    let out = psql(port, "require", &live).await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("does not support SSL"), "{stderr}");

    let out = psql(port, "disable", "wrong-token").await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("password authentication failed for user \"sqlrs\""),
        "{stderr}"
    );

    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), serving)
        .await
        .expect("serve returns after shutdown")
        .unwrap();
    assert!(tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err());
    pg.stop().await;
}

// ---- issue 4: TLS with verify-full, cancel routing, session limits, keyset reload ----

#[tokio::test]
async fn psql_with_verify_full_and_tokio_postgres_with_rustls() {
    let pg = Pg::start().await;
    let served = Served::start(real_clock_gateway(pg.ready(), GatewayConfig::default())).await;
    let token = live_token(|_| {});
    for host in ["127.0.0.1", "localhost"] {
        let dsn = format!(
            "postgres://sqlrs:{token}@{host}:{}/postgres?sslmode=verify-full&sslrootcert={}",
            served.port,
            served.tls.ca.display()
        );
        let out = tokio::process::Command::new("psql")
            .args([
                dsn.as_str(),
                "-XAtc",
                "select ssl from pg_stat_ssl where pid = pg_backend_pid()",
            ])
            .env_remove("PGPASSWORD")
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "psql verify-full via {host}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // The backend link is plain loopback; the client's is TLS (the gateway terminates it).
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "f");
    }
    // A CA that did not sign the gateway's certificate is refused by the client.
    let other = tempfile::tempdir().unwrap();
    let stranger = taidon_gateway::ensure_self_signed(other.path(), &["127.0.0.1"]).unwrap();
    let out = tokio::process::Command::new("psql")
        .arg(format!(
            "postgres://sqlrs:{token}@127.0.0.1:{}/postgres?sslmode=verify-full&sslrootcert={}",
            served.port,
            stranger.ca.display()
        ))
        .args(["-XAtc", "select 1"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());

    // tokio-postgres over rustls, trusting only the gateway's CA.
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(&served.tls.ca).unwrap();
    for cert in rustls_pemfile::certs(&mut &pem[..]) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tls = tokio_postgres_rustls::MakeRustlsConnect::new(config);
    let mut cfg = client_config(&token);
    cfg.host("127.0.0.1")
        .port(served.port)
        .ssl_mode(tokio_postgres::config::SslMode::Require);
    let (client, conn) = cfg.connect(tls).await.unwrap();
    let conn = tokio::spawn(conn);
    let row = client.query_one("select 40 + 2", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 42);
    drop(client);
    let _ = conn.await;
    served.stop().await;
    pg.stop().await;
}

#[tokio::test]
async fn cancel_requests_reach_the_right_backend_and_unknown_keys_are_ignored() {
    let pg = Pg::start().await;
    let served = Served::start(real_clock_gateway(pg.ready(), GatewayConfig::default())).await;
    let token = live_token(|_| {});
    let mut cfg = client_config(&token);
    cfg.host("127.0.0.1").port(served.port);
    let (client, conn) = cfg.connect(NoTls).await.unwrap();
    tokio::spawn(conn);
    let (other, conn2) = cfg.connect(NoTls).await.unwrap();
    tokio::spawn(conn2);

    // The key the client holds is the gateway's, not the backend's.
    let backend_pid: i32 = client
        .query_one("select pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let cancel = client.cancel_token();

    // An unknown key: nothing happens, the connection is closed silently.
    let mut raw = tokio::net::TcpStream::connect(("127.0.0.1", served.port))
        .await
        .unwrap();
    let mut buf = bytes::BytesMut::new();
    postgres_protocol::message::frontend::cancel_request(backend_pid, 12345, &mut buf);
    raw.write_all(&buf).await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), raw.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert!(rest.is_empty());

    let sleeping = tokio::spawn(async move { client.simple_query("select pg_sleep(30)").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t0 = std::time::Instant::now();
    cancel.cancel_query(NoTls).await.unwrap();
    let err = tokio::time::timeout(Duration::from_secs(10), sleeping)
        .await
        .expect("the query was cancelled")
        .unwrap()
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::QUERY_CANCELED), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(20));
    // The other session was not touched.
    let row = other.query_one("select 1", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 1);
    served.stop().await;
    pg.stop().await;
}

#[tokio::test]
async fn idle_and_duration_limits_end_the_session_with_a_message() {
    let pg = Pg::start().await;
    let served = Served::start(real_clock_gateway(pg.ready(), GatewayConfig::default())).await;

    // max_idle from the token.
    let token = live_token(|c| {
        c.limits = Some(taidon_core::token::Limits {
            max_conn: None,
            max_idle_s: Some(1),
            max_duration_s: None,
        })
    });
    let mut cfg = client_config(&token);
    cfg.host("127.0.0.1").port(served.port);
    let (client, conn) = cfg.connect(NoTls).await.unwrap();
    let conn = tokio::spawn(conn);
    // Busy for longer than the idle limit is not idle.
    client.simple_query("select pg_sleep(1.5)").await.unwrap();
    let err = tokio::time::timeout(Duration::from_secs(10), conn)
        .await
        .expect("the idle session was ended")
        .unwrap()
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::IDLE_SESSION_TIMEOUT), "{err}");
    assert!(client.simple_query("select 1").await.is_err());

    // max_duration from the gateway's own configuration.
    served.stop().await;
    let served = Served::start(real_clock_gateway(
        pg.ready(),
        GatewayConfig {
            max_duration: Some(Duration::from_secs(1)),
            ..GatewayConfig::default()
        },
    ))
    .await;
    let token = live_token(|_| {});
    let mut cfg = client_config(&token);
    cfg.host("127.0.0.1").port(served.port);
    let (client, conn) = cfg.connect(NoTls).await.unwrap();
    let conn = tokio::spawn(conn);
    client.simple_query("select 1").await.unwrap();
    let err = tokio::time::timeout(Duration::from_secs(10), conn)
        .await
        .expect("the long session was ended")
        .unwrap()
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::ADMIN_SHUTDOWN), "{err}");
    let message = err
        .as_db_error()
        .map(|e| e.message().to_owned())
        .unwrap_or_default();
    assert!(message.contains("maximum duration"), "{message}");
    served.stop().await;
    pg.stop().await;
}

#[tokio::test]
async fn a_reloaded_keyset_accepts_new_and_previous_keys_without_a_restart() {
    let pg = Pg::start().await;
    let keys = Arc::new(SharedKeyset::new(key()));
    let gw = Gateway::new(
        GatewayConfig::default(),
        Arc::clone(&keys),
        Arc::new(FakeResolver(pg.ready())),
    );
    let served = Served::start(gw).await;
    let now = taidon_gateway::SystemClock.now_s();
    let claims = |k: &taidon_core::token::Keyset| {
        k.claims(
            StateId::from_bytes([3; 32]),
            InstanceId::from_bytes([4; 8]),
            Scope::Rw,
            now,
            TTL,
        )
    };
    let old = key().sign(&claims(&key())).unwrap();
    let old_file = taidon_core::token::KeysetFile {
        audience: "install-gw".into(),
        current: key().kids()[0].to_owned(),
        keys: vec![taidon_core::token::KeyEntry {
            kid: key().kids()[0].to_owned(),
            alg: taidon_core::token::Algorithm::Hs256,
            secret_hex: Some(
                b"gateway test secret, long enough"
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect(),
            ),
            private_pkcs8_hex: None,
            public_hex: None,
        }],
    };
    let new_file = old_file.rotated(taidon_core::token::KeyEntry {
        kid: "hs-new".into(),
        alg: taidon_core::token::Algorithm::Hs256,
        secret_hex: Some("ab".repeat(32)),
        private_pkcs8_hex: None,
        public_hex: None,
    });
    let rotated = taidon_core::token::Keyset::from_file(&new_file).unwrap();
    let new = rotated.sign(&claims(&rotated)).unwrap();
    let try_token = |t: String| {
        let port = served.port;
        async move {
            let mut cfg = client_config(&t);
            cfg.host("127.0.0.1").port(port);
            cfg.connect(NoTls).await.map(|_| ())
        }
    };
    assert!(try_token(old.clone()).await.is_ok());
    assert!(try_token(new.clone()).await.is_err(), "not yet known");
    keys.replace(rotated);
    assert!(try_token(new).await.is_ok(), "the new key is accepted");
    assert!(try_token(old).await.is_ok(), "the previous key still is");
    served.stop().await;
    pg.stop().await;
}
