//! A FAKE for tests: an HTTP/1.1 reverse proxy that fails every Nth request.
//!
//! [`FaultProxy`] listens on a free loopback port and forwards each request to an upstream S3
//! server unchanged — method, target, headers (Host included; names may arrive lowercased,
//! which HTTP and SigV4 ignore) and body, with its framing (Content-Length or chunked) — over
//! one upstream connection per client connection, and streams the answer back. Every `fail_every`-th request
//! (counted across all connections, keep-alive or not) is instead answered by the proxy itself
//! with `503 Slow Down` and an S3 XML error body, after its body was read and discarded.
//!
//! Clients use the proxy's address as their endpoint, so the Host they sign (SigV4) is the
//! proxy's, and it reaches the upstream as signed; S3 servers do not compare the Host with their
//! own address for path-style requests.
//!
//! It runs on a thread of its own (its own Tokio runtime), so it serves `#[test]`s and
//! `#[tokio::test]`s alike, and stops when dropped.

use std::convert::Infallible;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use bytes::Bytes;
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, Mutex};

type ProxyBody = Either<Incoming, Full<Bytes>>;

/// A fault-injecting reverse proxy in front of an S3 server (a test FAKE); stops when dropped.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    counters: Arc<Counters>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Debug, Default)]
struct Counters {
    seen: AtomicU64,
    failed: AtomicU64,
}

impl FaultProxy {
    /// Starts a proxy to `upstream` that answers every `fail_every`-th request with 503 (never,
    /// if 0) and forwards the others.
    pub fn start(upstream: SocketAddr, fail_every: u32) -> FaultProxy {
        let listener =
            StdListener::bind("127.0.0.1:0").expect("bind the fault proxy to a loopback port");
        let addr = listener
            .local_addr()
            .expect("the fault proxy's local address");
        listener
            .set_nonblocking(true)
            .expect("make the fault proxy's listener non-blocking");
        let counters = Arc::new(Counters::default());
        let (stop, stopped) = oneshot::channel();
        let state = Arc::clone(&counters);
        let thread = std::thread::Builder::new()
            .name(format!("fault-proxy-{addr}"))
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("build the fault proxy's runtime");
                runtime.block_on(async move {
                    let listener = TcpListener::from_std(listener)
                        .expect("register the fault proxy's listener");
                    tokio::select! {
                        _ = stopped => {}
                        () = accept(listener, upstream, fail_every, state) => {}
                    }
                });
                // Dropping the runtime drops the connections' tasks.
            })
            .expect("start the fault proxy's thread");
        FaultProxy {
            addr,
            counters,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// The proxy's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The proxy as an endpoint, `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests received so far (forwarded or failed).
    pub fn requests_seen(&self) -> u64 {
        self.counters.seen.load(Ordering::SeqCst)
    }

    /// Requests answered with 503 so far.
    pub fn requests_failed(&self) -> u64 {
        self.counters.failed.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn accept(
    listener: TcpListener,
    upstream: SocketAddr,
    fail_every: u32,
    counters: Arc<Counters>,
) {
    loop {
        let client = match listener.accept().await {
            Ok((client, _)) => client,
            // Out of file descriptors, say: let connections close before trying again.
            Err(_) => {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let counters = Arc::clone(&counters);
        tokio::spawn(async move {
            // The upstream connection of this client connection, made at its first forwarded
            // request and again whenever the upstream closed it.
            let upstream_conn: Arc<Mutex<Option<SendRequest<Incoming>>>> = Arc::default();
            let service = service_fn(move |req| {
                let counters = Arc::clone(&counters);
                let upstream_conn = Arc::clone(&upstream_conn);
                async move {
                    Ok::<_, Infallible>(
                        handle(req, upstream, fail_every, &counters, &upstream_conn).await,
                    )
                }
            });
            // Errors here are the client going away mid-request: nothing to report.
            let _ = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(client), service)
                .await;
        });
    }
}

async fn handle(
    req: Request<Incoming>,
    upstream: SocketAddr,
    fail_every: u32,
    counters: &Counters,
    upstream_conn: &Mutex<Option<SendRequest<Incoming>>>,
) -> Response<ProxyBody> {
    let n = counters.seen.fetch_add(1, Ordering::SeqCst) + 1;
    if fail_every > 0 && n.is_multiple_of(u64::from(fail_every)) {
        counters.failed.fetch_add(1, Ordering::SeqCst);
        // Read the body first, so the connection stays usable for the client's next request.
        let _ = req.into_body().collect().await;
        return slow_down(n);
    }
    match forward(req, upstream, upstream_conn).await {
        Ok(resp) => resp.map(Either::Left),
        Err(e) => plain(
            StatusCode::BAD_GATEWAY,
            format!("fault proxy: upstream {upstream}: {e}\n"),
        ),
    }
}

/// Why a request could not be forwarded.
#[derive(Debug)]
enum ForwardError {
    Connect(std::io::Error),
    Http(hyper::Error),
}

impl std::fmt::Display for ForwardError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ForwardError::Connect(e) => write!(f, "cannot connect: {e}"),
            ForwardError::Http(e) => write!(f, "{e}"),
        }
    }
}

async fn forward(
    req: Request<Incoming>,
    upstream: SocketAddr,
    upstream_conn: &Mutex<Option<SendRequest<Incoming>>>,
) -> Result<Response<Incoming>, ForwardError> {
    // Requests on one client connection come one at a time (HTTP/1.1), so this lock is never
    // contended: it only shares the connection's upstream with the service.
    let mut conn = upstream_conn.lock().await;
    if let Some(sender) = conn.as_mut() {
        if sender.ready().await.is_err() {
            *conn = None;
        }
    }
    let sender = match conn.as_mut() {
        Some(sender) => sender,
        None => {
            let tcp = TcpStream::connect(upstream)
                .await
                .map_err(ForwardError::Connect)?;
            let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                .await
                .map_err(ForwardError::Http)?;
            tokio::spawn(connection);
            conn.insert(sender)
        }
    };
    sender.send_request(req).await.map_err(ForwardError::Http)
}

/// The proxy's own answer to the `n`-th request: what S3 says when it throttles.
fn slow_down(n: u64) -> Response<ProxyBody> {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown</Code>\
         <Message>Please reduce your request rate. (FaultProxy: injected failure of request {n})</Message>\
         <RequestId>fault-proxy-{n}</RequestId></Error>"
    );
    let mut resp = Response::new(Either::Right(Full::new(Bytes::from(body))));
    *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/xml"),
    );
    resp
}

fn plain(status: StatusCode, text: String) -> Response<ProxyBody> {
    let mut resp = Response::new(Either::Right(Full::new(Bytes::from(text))));
    *resp.status_mut() = status;
    resp
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

    use super::*;

    /// An upstream that answers each request with what it received.
    async fn echo_upstream() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (conn, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let service = service_fn(|req: Request<Incoming>| async move {
                        let head = format!(
                            "{} {} host={} x-amz-date={}",
                            req.method(),
                            req.uri(),
                            req.headers()["host"].to_str().unwrap(),
                            req.headers()
                                .get("x-amz-date")
                                .map_or("-", |v| v.to_str().unwrap()),
                        );
                        let body = req.into_body().collect().await?.to_bytes();
                        let text = format!("{head} body={}", String::from_utf8_lossy(&body));
                        Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::from(text))))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(conn), service)
                        .await;
                });
            }
        });
        addr
    }

    /// Reads one response with a Content-Length body (none for HEAD) off a keep-alive stream.
    async fn response(
        stream: &mut BufReader<TcpStream>,
        head_only: bool,
    ) -> (u16, Vec<String>, String) {
        let mut lines = vec![];
        loop {
            let mut line = String::new();
            stream.read_line(&mut line).await.unwrap();
            let line = line.trim_end().to_owned();
            if line.is_empty() {
                break;
            }
            lines.push(line);
        }
        let status = lines[0].split(' ').nth(1).unwrap().parse().unwrap();
        let len: usize = lines
            .iter()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length: ")
                    .map(|v| v.parse().unwrap())
            })
            .unwrap_or(0);
        let mut body = vec![0; if head_only { 0 } else { len }];
        stream.read_exact(&mut body).await.unwrap();
        (status, lines, String::from_utf8(body).unwrap())
    }

    #[tokio::test]
    async fn forwards_requests_of_a_keep_alive_connection_unchanged_and_fails_every_nth() {
        let proxy = FaultProxy::start(echo_upstream().await, 2);
        let mut conn = BufReader::new(TcpStream::connect(proxy.addr()).await.unwrap());
        // 1: forwarded, Host and the other headers as sent, a Content-Length body.
        conn.get_mut()
            .write_all(b"PUT /b/k?x=1 HTTP/1.1\r\nHost: signed.example:9\r\nX-Amz-Date: 20260101T000000Z\r\nContent-Length: 5\r\n\r\nhello")
            .await
            .unwrap();
        let (status, _, body) = response(&mut conn, false).await;
        assert_eq!(status, 200);
        assert_eq!(
            body,
            "PUT /b/k?x=1 host=signed.example:9 x-amz-date=20260101T000000Z body=hello"
        );

        // 2: failed, its chunked body read and discarded.
        conn.get_mut()
            .write_all(b"PUT /b/k2 HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
            .await
            .unwrap();
        let (status, _, body) = response(&mut conn, false).await;
        assert_eq!(status, 503);
        assert!(body.contains("<Code>SlowDown</Code>"), "{body}");

        // 3: forwarded on the same connection, a chunked body reassembled.
        conn.get_mut()
            .write_all(b"POST /b/k3 HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
            .await
            .unwrap();
        let (status, _, body) = response(&mut conn, false).await;
        assert_eq!(
            (status, body.as_str()),
            (200, "POST /b/k3 host=h x-amz-date=- body=abcde")
        );

        // 4: failed; 5: a HEAD keeps the upstream's Content-Length and has no body.
        conn.get_mut()
            .write_all(b"GET /b/k HTTP/1.1\r\nHost: h\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(response(&mut conn, false).await.0, 503);
        conn.get_mut()
            .write_all(b"HEAD /b/k HTTP/1.1\r\nHost: h\r\n\r\n")
            .await
            .unwrap();
        let (status, head, _) = response(&mut conn, true).await;
        assert_eq!(status, 200);
        let want = format!(
            "content-length: {}",
            "HEAD /b/k host=h x-amz-date=- body=".len()
        );
        assert!(
            head.iter().any(|l| l.to_ascii_lowercase() == want),
            "{head:?}"
        );

        // 6: counted across connections: a second connection's first request fails.
        let mut other = BufReader::new(TcpStream::connect(proxy.addr()).await.unwrap());
        other
            .get_mut()
            .write_all(b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(response(&mut other, false).await.0, 503);
        assert_eq!((proxy.requests_seen(), proxy.requests_failed()), (6, 3));
    }

    #[tokio::test]
    async fn answers_502_when_the_upstream_is_down() {
        let closed = {
            let l = StdListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let proxy = FaultProxy::start(closed, 0);
        let mut conn = BufReader::new(TcpStream::connect(proxy.addr()).await.unwrap());
        conn.get_mut()
            .write_all(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
            .await
            .unwrap();
        let (status, _, body) = response(&mut conn, false).await;
        assert_eq!(status, 502, "{body}");
        assert_eq!((proxy.requests_seen(), proxy.requests_failed()), (1, 0));
    }
}
