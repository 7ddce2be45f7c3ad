//! Issue 12 against real servers: backend sessions kept after their client leaves and handed to
//! the next client, with nothing of the last client visible; sessions left mid-transaction,
//! mid-COPY, mid-query or mid-extended-query never handed on; the backend's real pid in
//! BackendKeyData, NOTIFY and `pg_terminate_backend` as direct; cancel on reused sessions and
//! with protocol 3.2 keys; kept sessions giving way at the connection limit; a soak.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::future::BoxFuture;
use postgres_protocol::message::frontend;
use taidon_api::{ResolveRequest, ResolveResponse, Target};
use taidon_core::token::SharedKeyset;
use taidon_core::InstanceId;
use taidon_gateway::{Gateway, GatewayConfig, PoolConfig, ResolveError, Resolver};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::error::SqlState;
use tokio_postgres::{AsyncMessage, Client, NoTls, SimpleQueryMessage};

mod common;
use common::*;

/// A fake controller's access bookkeeping: Resolve counts a client (refusing past `limit`
/// clients plus kept sessions), Park moves it to kept, Unpark and Release count out.
struct Counting {
    target: Target,
    limit: u32,
    counts: Mutex<Counts>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Counts {
    active: u32,
    pooled: u32,
    resolves: u32,
    refusals: u32,
}

impl Counting {
    fn new(target: Target, limit: u32) -> Arc<Self> {
        Arc::new(Self {
            target,
            limit,
            counts: Mutex::new(Counts::default()),
        })
    }

    fn counts(&self) -> Counts {
        *self.counts.lock().unwrap()
    }
}

impl Resolver for Counting {
    fn resolve(&self, _: ResolveRequest) -> BoxFuture<'_, Result<ResolveResponse, ResolveError>> {
        let mut c = self.counts.lock().unwrap();
        c.resolves += 1;
        let answer = if c.active + c.pooled >= self.limit {
            c.refusals += 1;
            ResolveResponse::TooManyConnections { limit: self.limit }
        } else {
            c.active += 1;
            ResolveResponse::Ready(self.target.clone())
        };
        Box::pin(async move { Ok(answer) })
    }

    fn release(&self, ids: Vec<InstanceId>) -> BoxFuture<'_, Result<(), ResolveError>> {
        self.counts.lock().unwrap().active -= ids.len() as u32;
        Box::pin(async { Ok(()) })
    }

    fn park(&self, ids: Vec<InstanceId>) -> BoxFuture<'_, Result<(), ResolveError>> {
        let mut c = self.counts.lock().unwrap();
        c.active -= ids.len() as u32;
        c.pooled += ids.len() as u32;
        Box::pin(async { Ok(()) })
    }

    fn unpark(&self, ids: Vec<InstanceId>) -> BoxFuture<'_, Result<(), ResolveError>> {
        self.counts.lock().unwrap().pooled -= ids.len() as u32;
        Box::pin(async { Ok(()) })
    }
}

fn pool_config(idle: Duration) -> GatewayConfig {
    GatewayConfig {
        pool: Some(PoolConfig {
            idle,
            ..PoolConfig::default()
        }),
        ..GatewayConfig::default()
    }
}

async fn serve_with(resolver: Arc<dyn Resolver>, config: GatewayConfig) -> Served {
    Served::start(Gateway::new(
        config,
        Arc::new(SharedKeyset::new(key())),
        resolver,
    ))
    .await
}

async fn serve(pg: &Pg) -> Served {
    serve_with(
        Arc::new(FakeResolver(pg.ready())),
        pool_config(Duration::from_secs(60)),
    )
    .await
}

/// A tokio-postgres client through the gateway on `port`, with extra startup parameters.
async fn client_with(port: u16, params: &[(&str, &str)]) -> Client {
    let mut cfg = client_config(&live_token(|_| {}));
    cfg.host("127.0.0.1").port(port);
    for (k, v) in params {
        match *k {
            "application_name" => cfg.application_name(*v),
            "options" => cfg.options(*v),
            other => panic!("no setter for {other}"),
        };
    }
    let (client, conn) = cfg.connect(NoTls).await.unwrap();
    tokio::spawn(conn);
    client
}

async fn client(port: u16) -> Client {
    client_with(port, &[]).await
}

/// The first column of the first row of `sql` (a simple query: nothing is prepared).
async fn one(c: &Client, sql: &str) -> String {
    for m in c.simple_query(sql).await.unwrap() {
        if let SimpleQueryMessage::Row(r) = m {
            return r.get(0).unwrap_or("NULL").to_owned();
        }
    }
    panic!("no row from {sql}");
}

async fn pid(c: &Client) -> i32 {
    one(c, "select pg_backend_pid()").await.parse().unwrap()
}

/// Waits until the gateway keeps `n` sessions.
async fn until_pooled(served: &Served, n: usize) {
    let t0 = Instant::now();
    while served.gw.pooled() != n {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the gateway keeps {} sessions, not {n}",
            served.gw.pooled()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until the gateway has no open client session.
async fn until_no_sessions(served: &Served) {
    let t0 = Instant::now();
    while served.gw.sessions() != 0 {
        assert!(t0.elapsed() < Duration::from_secs(10), "sessions stay open");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A direct superuser connection to the server, for looking behind the gateway.
async fn direct(pg: &Pg) -> Client {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host("127.0.0.1")
        .port(pg.server.port)
        .user("postgres")
        .password(pg.password.clone())
        .dbname("postgres");
    let (client, conn) = cfg.connect(NoTls).await.unwrap();
    tokio::spawn(conn);
    client
}

/// Waits until backend `pid` has exited.
async fn until_gone(admin: &Client, pid: i32) {
    let t0 = Instant::now();
    loop {
        let n = one(
            admin,
            &format!("select count(*) from pg_stat_activity where pid = {pid}"),
        )
        .await;
        if n == "0" {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "backend {pid} is still there"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_reused_session_shows_nothing_of_the_last_client() {
    let pg = Pg::start().await;
    let served = serve(&pg).await;
    let admin = direct(&pg).await;
    admin
        .batch_execute(
            "create role r_other; create sequence sq; grant usage on sequence sq to public",
        )
        .await
        .unwrap();

    let a = client(served.port).await;
    let a_pid = pid(&a).await;
    let defaults = [
        one(&a, "show work_mem").await,
        one(&a, "show search_path").await,
        one(&a, "show statement_timeout").await,
    ];
    a.batch_execute(
        "create temp table tt (x int);
         prepare p1 as select 1;
         select nextval('sq');
         set work_mem = '77MB';
         set search_path = nowhere;
         set statement_timeout = 1234;
         listen ch;
         select pg_advisory_lock(4242);
         begin; declare c cursor with hold for select 1; commit;
         set role r_other;",
    )
    .await
    .unwrap();
    // A statement tokio-postgres prepares under its own name (s0, s1, ...).
    a.prepare("select $1::int").await.unwrap();
    drop(a);
    until_pooled(&served, 1).await;

    let b = client(served.port).await;
    assert_eq!(pid(&b).await, a_pid, "the kept session was handed on");
    assert_eq!(served.gw.pooled(), 0);
    let checks = [
        ("select to_regclass('pg_temp.tt') is null", "t"),
        ("select count(*) from pg_prepared_statements", "0"),
        ("select count(*) from pg_listening_channels()", "0"),
        (
            "select count(*) from pg_locks where locktype = 'advisory' and pid = pg_backend_pid()",
            "0",
        ),
        ("select count(*) from pg_cursors", "0"),
        ("select current_user", "postgres"),
        ("select session_user", "postgres"),
        ("show work_mem", defaults[0].as_str()),
        ("show search_path", defaults[1].as_str()),
        ("show statement_timeout", defaults[2].as_str()),
    ];
    for (sql, want) in checks {
        assert_eq!(one(&b, sql).await, want, "{sql}");
    }
    // currval of a sequence the last client used is not known here.
    let err = b.simple_query("select currval('sq')").await.unwrap_err();
    assert_eq!(
        err.code(),
        Some(&SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE)
    );
    // The advisory lock is free for anyone.
    assert_eq!(one(&admin, "select pg_try_advisory_lock(4242)").await, "t");
    // tokio-postgres prepares its statements under the same names again without a clash.
    let row = b.query_one("select $1::int", &[&7i32]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 7);
    drop(b);
    served.stop().await;
    pg.stop().await;
}

/// A client speaking the protocol by hand, for leaving at awkward moments.
struct Raw {
    stream: TcpStream,
    buf: BytesMut,
    pid: i32,
    secret: Bytes,
}

impl Raw {
    /// Logs in through the gateway on `port` under protocol 3.`minor`.
    async fn login(port: u16, minor: u32) -> Raw {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let body = b"user\0sqlrs\0database\0postgres\0\0";
        let mut out = BytesMut::new();
        out.put_u32(8 + body.len() as u32);
        out.put_u32((3 << 16) | minor);
        out.extend_from_slice(body);
        frontend::password_message(live_token(|_| {}).as_bytes(), &mut out).unwrap();
        stream.write_all(&out).await.unwrap();
        let mut raw = Raw {
            stream,
            buf: BytesMut::new(),
            pid: 0,
            secret: Bytes::new(),
        };
        for (tag, body) in raw.read_until(b'Z').await {
            assert_ne!(tag, b'E', "login refused: {body:?}");
            if tag == b'K' {
                let mut body = body.clone();
                raw.pid = body.get_i32();
                raw.secret = body;
            }
        }
        assert_ne!(raw.pid, 0, "no BackendKeyData");
        raw
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    async fn query(&mut self, sql: &str) {
        let mut out = BytesMut::new();
        frontend::query(sql, &mut out).unwrap();
        self.send(&out).await;
    }

    /// Messages up to and including the first with `tag`.
    async fn read_until(&mut self, tag: u8) -> Vec<(u8, Bytes)> {
        let mut msgs = Vec::new();
        loop {
            while self.buf.len() >= 5 {
                let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]);
                let total = len as usize + 1;
                if self.buf.len() < total {
                    break;
                }
                let mut msg = self.buf.split_to(total).freeze();
                let t = msg[0];
                msg.advance(5);
                msgs.push((t, msg));
                if t == tag {
                    return msgs;
                }
            }
            let n =
                tokio::time::timeout(Duration::from_secs(20), self.stream.read_buf(&mut self.buf))
                    .await
                    .expect("an answer")
                    .unwrap();
            assert!(n > 0, "closed while waiting for {:?}", char::from(tag));
        }
    }

    /// The first column of the first row of `sql`.
    async fn one(&mut self, sql: &str) -> String {
        self.query(sql).await;
        let msgs = self.read_until(b'Z').await;
        let (_, row) = msgs
            .iter()
            .find(|(t, _)| *t == b'D')
            .unwrap_or_else(|| panic!("no row from {sql}: {msgs:?}"));
        let mut row = row.clone();
        row.advance(2);
        let len = row.get_i32() as usize;
        String::from_utf8(row[..len].to_vec()).unwrap()
    }
}

/// Sends a CancelRequest with `pid` and `secret` to the gateway on `port`.
async fn cancel_raw(port: u16, pid: i32, secret: &[u8]) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut out = BytesMut::new();
    out.put_u32(12 + secret.len() as u32);
    out.put_u32(80_877_102);
    out.put_i32(pid);
    out.extend_from_slice(secret);
    s.write_all(&out).await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert!(rest.is_empty(), "a cancel request gets no answer");
}

#[tokio::test]
async fn sessions_left_mid_transaction_copy_query_or_extended_query_are_never_handed_on() {
    let pg = Pg::start().await;
    let served = serve(&pg).await;
    let admin = direct(&pg).await;
    admin.batch_execute("create table t (x int)").await.unwrap();

    // Parse, Bind and Execute of the unnamed statement, and no Sync.
    let extended_without_sync: Vec<u8> = [
        &b"P\0\0\0\x10\0select 1\0\0\0"[..],
        &b"B\0\0\0\x0c\0\0\0\0\0\0\0\0"[..],
        &b"E\0\0\0\x09\0\0\0\0\0"[..],
    ]
    .concat();
    // (what the client was doing, then how it left)
    type Leave = Box<dyn Fn(&mut Raw) -> BoxFuture<'_, ()>>;
    let cases: Vec<(&str, Leave)> = vec![
        (
            "in a transaction",
            Box::new(|r| {
                Box::pin(async move {
                    r.query("begin; insert into t values (1)").await;
                    r.read_until(b'Z').await;
                })
            }),
        ),
        (
            "in a failed transaction",
            Box::new(|r| {
                Box::pin(async move {
                    r.query("begin; select 1/0").await;
                    r.read_until(b'Z').await;
                })
            }),
        ),
        (
            "in COPY FROM STDIN",
            Box::new(|r| {
                Box::pin(async move {
                    r.query("copy t from stdin").await;
                    r.read_until(b'G').await;
                    let mut out = BytesMut::new();
                    frontend::CopyData::new(&b"2\n"[..])
                        .unwrap()
                        .write(&mut out);
                    r.send(&out).await;
                })
            }),
        ),
        (
            "in COPY TO STDOUT",
            Box::new(|r| {
                Box::pin(async move {
                    r.query("copy (select generate_series(1, 2000000)) to stdout")
                        .await;
                    r.read_until(b'd').await;
                })
            }),
        ),
        (
            "mid-query",
            Box::new(|r| {
                Box::pin(async move {
                    r.query("select pg_sleep(2)").await;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                })
            }),
        ),
        (
            "in an extended query without its Sync",
            Box::new(move |r| {
                let bytes = extended_without_sync.clone();
                Box::pin(async move {
                    r.send(&bytes).await;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                })
            }),
        ),
    ];
    for (what, leave) in cases {
        let mut raw = Raw::login(served.port, 0).await;
        let left_pid = raw.pid;
        leave(&mut raw).await;
        drop(raw);
        until_no_sessions(&served).await;
        assert_eq!(served.gw.pooled(), 0, "{what}: the session was kept");
        until_gone(&admin, left_pid).await;
        let mut next = Raw::login(served.port, 0).await;
        assert_ne!(next.pid, left_pid, "{what}: handed on");
        assert_eq!(
            next.one("select pg_backend_pid()").await,
            next.pid.to_string()
        );
        // Left idle: kept, and taken by the next case's client (same startup parameters).
        drop(next);
        until_pooled(&served, 1).await;
    }
    // Nothing a departed client began was committed.
    assert_eq!(one(&admin, "select count(*) from t").await, "0");
    served.stop().await;
    pg.stop().await;
}

#[tokio::test]
async fn backend_pid_notify_cancel_and_terminate_behave_as_direct() {
    let pg = Pg::start().await;
    let served = serve(&pg).await;
    let admin = direct(&pg).await;

    // BackendKeyData carries the backend's own pid, under 3.0 with a 4-byte key and under 3.2
    // with a 32-byte one.
    for (minor, key_len) in [(0u32, 4usize), (2, 32)] {
        let mut raw = Raw::login(served.port, minor).await;
        assert_eq!(raw.secret.len(), key_len, "protocol 3.{minor}");
        assert_eq!(
            raw.one("select pg_backend_pid()").await,
            raw.pid.to_string()
        );
        // A wrong key is ignored; the right one cancels.
        raw.query("select pg_sleep(30)").await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut wrong = raw.secret.to_vec();
        wrong[0] ^= 1;
        cancel_raw(served.port, raw.pid, &wrong).await;
        let early = tokio::time::timeout(
            Duration::from_millis(700),
            raw.stream.read_buf(&mut raw.buf),
        )
        .await;
        assert!(early.is_err(), "protocol 3.{minor}: a wrong key cancelled");
        let secret = raw.secret.clone();
        cancel_raw(served.port, raw.pid, &secret).await;
        let msgs = raw.read_until(b'E').await;
        let (_, err) = msgs.last().unwrap();
        let text = String::from_utf8_lossy(err);
        assert!(text.contains("57014"), "protocol 3.{minor}: {text}");
        raw.read_until(b'Z').await;
    }

    // NOTIFY's pid is the client's backend_pid.
    let mut cfg = client_config(&live_token(|_| {}));
    cfg.host("127.0.0.1").port(served.port);
    let (listener, mut conn) = cfg.connect(NoTls).await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(m) = futures_util::StreamExt::next(&mut messages).await {
            if let Ok(AsyncMessage::Notification(n)) = m {
                let _ = tx.send(n);
            }
        }
    });
    let listener_pid = pid(&listener).await;
    listener
        .batch_execute("listen ch; notify ch, 'hi'")
        .await
        .unwrap();
    let n = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((n.process_id(), n.payload()), (listener_pid, "hi"));
    // The two raw sessions were kept; tokio-postgres's startup parameters differ from theirs.
    until_pooled(&served, 2).await;
    drop(listener);
    until_pooled(&served, 3).await;

    // Cancel on a reused session, and the last client's key does not reach it.
    let a = client(served.port).await;
    let a_pid = pid(&a).await;
    assert_eq!(a_pid, listener_pid, "reused");
    let a_cancel = a.cancel_token();
    drop(a);
    until_pooled(&served, 3).await;
    let b = Arc::new(client(served.port).await);
    assert_eq!(pid(&b).await, a_pid, "reused");
    let b_cancel = b.cancel_token();
    let sleeper = Arc::clone(&b);
    let sleeping = tokio::spawn(async move { sleeper.simple_query("select pg_sleep(30)").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    a_cancel.cancel_query(NoTls).await.unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        !sleeping.is_finished(),
        "the last client's key cancelled the next one's query"
    );
    b_cancel.cancel_query(NoTls).await.unwrap();
    let err = tokio::time::timeout(Duration::from_secs(10), sleeping)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::QUERY_CANCELED));

    // pg_terminate_backend(backend_pid) from another session ends the client's with 57P01,
    // and that session is not kept.
    // (It ends a running query, so the client surely reads the 57P01 as its answer.)
    let sleeper = Arc::clone(&b);
    let sleeping = tokio::spawn(async move { sleeper.simple_query("select pg_sleep(30)").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        one(&admin, &format!("select pg_terminate_backend({a_pid})")).await,
        "t"
    );
    let err = tokio::time::timeout(Duration::from_secs(10), sleeping)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    let code = err
        .as_db_error()
        .map(|e| e.code().clone())
        .or_else(|| err.code().cloned());
    assert_eq!(code, Some(SqlState::ADMIN_SHUTDOWN), "{err}");
    drop(b);
    until_no_sessions(&served).await;
    assert_eq!(served.gw.pooled(), 2);
    served.stop().await;
    pg.stop().await;
}

#[tokio::test]
async fn startup_parameters_are_part_of_the_key() {
    let pg = Pg::start().await;
    let served = serve(&pg).await;
    let a = client_with(served.port, &[("application_name", "app1")]).await;
    let a_pid = pid(&a).await;
    a.batch_execute("set application_name = 'changed'")
        .await
        .unwrap();
    drop(a);
    until_pooled(&served, 1).await;
    let b = client_with(served.port, &[("application_name", "app2")]).await;
    assert_ne!(pid(&b).await, a_pid);
    assert_eq!(one(&b, "show application_name").await, "app2");
    let d = client_with(served.port, &[("options", "-c work_mem=5MB")]).await;
    assert_ne!(pid(&d).await, a_pid);
    assert_eq!(one(&d, "show work_mem").await, "5MB");
    let c = client_with(served.port, &[("application_name", "app1")]).await;
    assert_eq!(pid(&c).await, a_pid, "same parameters: the kept session");
    assert_eq!(one(&c, "show application_name").await, "app1");
    drop((b, c, d));
    until_pooled(&served, 3).await;
    served.stop().await;
    pg.stop().await;
}

#[tokio::test]
async fn kept_sessions_give_way_at_the_controllers_limit() {
    let pg = Pg::start().await;
    let counting = Counting::new(pg.target(), 3);
    let served = serve_with(counting.clone(), pool_config(Duration::from_secs(60))).await;
    // Two kept sessions and a client fill the limit of three; a client with other parameters
    // gets a kept session's slot.
    let a1 = client(served.port).await;
    let a2 = client(served.port).await;
    drop((a1, a2));
    until_pooled(&served, 2).await;
    let c = counting.counts();
    assert_eq!((c.active, c.pooled), (0, 2));
    let x = client_with(served.port, &[("application_name", "x")]).await;
    let y = client_with(served.port, &[("application_name", "y")]).await;
    assert_eq!(one(&y, "show application_name").await, "y");
    let c = counting.counts();
    assert_eq!((c.active, c.pooled), (2, 1), "{c:?}");
    assert_eq!(c.refusals, 1, "{c:?}");
    assert_eq!(served.gw.pooled(), 1);
    // A third client takes the last kept session's slot; a fourth finds the limit reached by
    // clients alone and is refused.
    let z = client_with(served.port, &[("application_name", "z")]).await;
    assert_eq!(served.gw.pooled(), 0);
    let mut cfg = client_config(&live_token(|_| {}));
    cfg.host("127.0.0.1")
        .port(served.port)
        .application_name("w");
    let err = cfg.connect(NoTls).await.err().expect("refused");
    assert_eq!(err.code(), Some(&SqlState::TOO_MANY_CONNECTIONS), "{err}");
    let c = counting.counts();
    assert_eq!((c.active, c.pooled), (3, 0), "{c:?}");
    drop((x, y, z));
    until_pooled(&served, 3).await;
    served.stop().await;
    // Stopping the gateway closes what it kept, and the controller hears it.
    let c = counting.counts();
    assert_eq!((c.active, c.pooled), (0, 0), "{c:?}");
    pg.stop().await;
}

#[tokio::test]
async fn kept_sessions_give_way_at_the_servers_limit_and_close_when_idle() {
    let pg = Pg::start_with_conf("max_connections = 3\nsuperuser_reserved_connections = 0").await;
    let counting = Counting::new(pg.target(), 100);
    let served = serve_with(counting.clone(), pool_config(Duration::from_secs(2))).await;
    // Three kept sessions fill the server; a login it refuses with 53300 gets one's slot.
    let a: Vec<Client> = futures_util::future::join_all((0..3).map(|_| client(served.port))).await;
    drop(a);
    until_pooled(&served, 3).await;
    let z = client_with(served.port, &[("application_name", "z")]).await;
    assert_eq!(one(&z, "show application_name").await, "z");
    let kept = served.gw.pooled();
    assert!(kept <= 2, "{kept} kept");
    let c = counting.counts();
    assert_eq!((c.active, c.pooled), (1, kept as u32), "{c:?}");
    drop(z);
    until_no_sessions(&served).await;

    // Idle past two seconds: closed, counted out, and gone from the server.
    tokio::time::sleep(Duration::from_secs(4)).await;
    until_pooled(&served, 0).await;
    let c = counting.counts();
    assert_eq!((c.active, c.pooled), (0, 0), "{c:?}");
    let admin = direct(&pg).await;
    let others = one(
        &admin,
        "select count(*) from pg_stat_activity where backend_type = 'client backend' and pid <> pg_backend_pid()",
    )
    .await;
    assert_eq!(others, "0");
    served.stop().await;
    pg.stop().await;
}

#[tokio::test]
async fn no_pool_closes_every_session() {
    let pg = Pg::start().await;
    let served = serve_with(
        Arc::new(FakeResolver(pg.ready())),
        GatewayConfig {
            pool: None,
            ..GatewayConfig::default()
        },
    )
    .await;
    let a = client(served.port).await;
    let a_pid = pid(&a).await;
    drop(a);
    until_no_sessions(&served).await;
    let b = client(served.port).await;
    assert_ne!(pid(&b).await, a_pid);
    assert_eq!(served.gw.pooled(), 0);
    drop(b);
    served.stop().await;
    pg.stop().await;
}

/// 200 clients connect and disconnect for a minute (`TAIDON_SOAK_S` to change it), each
/// checking that it sees nothing of whoever had its session before, then leaving some state
/// behind, or leaving mid-transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_200_clients_leave_no_trace_for_the_next() {
    let seconds: u64 = std::env::var("TAIDON_SOAK_S")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let pg = Pg::start_with_conf("max_connections = 260\nfsync = off").await;
    let served = serve(&pg).await;
    let port = served.port;
    let baseline = {
        let c = client(port).await;
        let b = soak_view(&c).await;
        drop(c);
        b
    };
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let connections = Arc::new(AtomicU64::new(0));
    let problems: Arc<Mutex<Vec<String>>> = Arc::default();
    let pids = Arc::new(Mutex::new(std::collections::HashSet::new()));
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..200u64 {
        let (baseline, connections, problems, pids) = (
            baseline.clone(),
            Arc::clone(&connections),
            Arc::clone(&problems),
            Arc::clone(&pids),
        );
        tasks.spawn(async move {
            let mut round = n;
            while Instant::now() < deadline {
                round += 200;
                if let Err(e) = soak_round(port, round, &baseline, &pids).await {
                    problems.lock().unwrap().push(e);
                }
                connections.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let problems = std::mem::take(&mut *problems.lock().unwrap());
    let total = connections.load(Ordering::Relaxed);
    let backends = pids.lock().unwrap().len();
    eprintln!(
        "soak: {total} connections in {seconds} s over {backends} backends, {} problems",
        problems.len()
    );
    assert!(
        problems.is_empty(),
        "{} problems: {:?}",
        problems.len(),
        &problems[..problems.len().min(10)]
    );
    assert!(total >= 200, "only {total} connections");
    assert!(
        (backends as u64) < total,
        "no session was ever reused ({backends} backends for {total} connections)"
    );
    served.stop().await;
    pg.stop().await;
}

/// What a client may see of earlier clients: temp tables, prepared statements, settings,
/// LISTEN channels, advisory locks, cursors, role.
async fn soak_view(c: &Client) -> Vec<String> {
    let mut row = Vec::new();
    for m in c
        .simple_query(
            "select to_regclass('pg_temp.tt') is null,
                    (select count(*) from pg_prepared_statements),
                    current_setting('work_mem'),
                    (select count(*) from pg_listening_channels()),
                    (select count(*) from pg_locks where locktype = 'advisory' and pid = pg_backend_pid()),
                    (select count(*) from pg_cursors),
                    current_user,
                    current_setting('application_name'),
                    pg_backend_pid()",
        )
        .await
        .unwrap()
    {
        if let SimpleQueryMessage::Row(r) = m {
            for i in 0..r.len() {
                row.push(r.get(i).unwrap_or("NULL").to_owned());
            }
        }
    }
    row
}

async fn soak_round(
    port: u16,
    round: u64,
    baseline: &[String],
    pids: &Mutex<std::collections::HashSet<String>>,
) -> Result<(), String> {
    let mut cfg = client_config(&live_token(|_| {}));
    cfg.host("127.0.0.1").port(port);
    let (c, conn) = cfg
        .connect(NoTls)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let conn = tokio::spawn(conn);
    let seen = soak_view(&c).await;
    let pid = seen.last().cloned().unwrap_or_default();
    pids.lock().unwrap().insert(pid.clone());
    // Everything but the pid must be as a fresh session has it.
    if seen[..seen.len() - 1] != baseline[..baseline.len() - 1] {
        return Err(format!("backend {pid} showed {seen:?}, not {baseline:?}"));
    }
    let action = match round % 8 {
        0 => "create temp table tt (x int); insert into tt values (1)",
        1 => "prepare p1 as select 1",
        2 => "set work_mem = '9MB'; set application_name = 'left'",
        3 => "listen ch",
        4 => "select pg_advisory_lock(hashtext(pg_backend_pid()::text))",
        5 => "begin; declare c cursor with hold for select 1; commit",
        6 => "begin; create temp table tt (x int)", // left mid-transaction
        _ => "select 1",
    };
    c.batch_execute(action)
        .await
        .map_err(|e| format!("{action}: {e}"))?;
    drop(c);
    let _ = conn.await;
    Ok(())
}
