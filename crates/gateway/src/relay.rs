//! The relay after login: bytes both ways, watching the backend's message boundaries so a
//! session that is idle too long or lives too long can be ended with a proper ErrorResponse.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicU8, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::codec;
use crate::limits::SessionLimits;

const CHUNK: usize = 8 * 1024;

/// How a relayed session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RelayEnd {
    /// The client closed (or its stream failed).
    Client,
    /// The backend closed (or its stream failed).
    Backend,
    /// Idle past `max_idle`: the client was told so.
    Idle,
    /// Alive past `max_duration`: the client was told so.
    Duration,
    /// The gateway is shutting down and the drain is over: the client was told so.
    Shutdown,
}

/// How a relay ended, and whether its backend session may serve another client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Relayed {
    pub(crate) end: RelayEnd,
    /// The client left with the backend idle: every request answered, outside a transaction,
    /// COPY or an unsynced extended query, and every byte of both streams at a message
    /// boundary. Only then may the session be reset and handed to someone else.
    pub(crate) reusable: bool,
}

/// Where one direction's stream is in its message framing, across the chunks it arrives in.
#[derive(Debug, Default)]
struct Cursor {
    header: [u8; 5],
    header_len: usize,
    body_left: usize,
}

impl Cursor {
    /// Consumes bytes of `chunk` from `*i`: the current body's (up to its end), or one byte of
    /// the next header. Returns the tag and length of a header it completed.
    fn advance(&mut self, chunk: &[u8], i: &mut usize) -> Option<(u8, usize)> {
        if self.body_left > 0 {
            let take = self.body_left.min(chunk.len() - *i);
            self.body_left -= take;
            *i += take;
            return None;
        }
        self.header[self.header_len] = chunk[*i];
        self.header_len += 1;
        *i += 1;
        if self.header_len < 5 {
            return None;
        }
        self.header_len = 0;
        let [tag, a, b, c, d] = self.header;
        let len = u32::from_be_bytes([a, b, c, d]) as usize;
        self.body_left = len.saturating_sub(4);
        Some((tag, len))
    }

    /// Between two messages.
    fn at_boundary(&self) -> bool {
        self.header_len == 0 && self.body_left == 0
    }
}

/// Where the backend→client stream is in its framing and in the protocol's cycle.
#[derive(Debug, Default)]
pub(crate) struct Framing {
    cursor: Cursor,
    last_tag: u8,
    /// The transaction status of the last ReadyForQuery (`I`, `T`, `E`).
    status: u8,
    /// ReadyForQuery messages seen and not yet taken.
    ready: u64,
}

impl Framing {
    /// Follows `chunk` through message headers and bodies.
    pub(crate) fn feed(&mut self, chunk: &[u8]) {
        let mut i = 0;
        while i < chunk.len() {
            // ReadyForQuery's one body byte is the transaction status.
            if self.last_tag == b'Z' && self.cursor.body_left == 1 {
                self.status = chunk[i];
                self.ready += 1;
            }
            if let Some((tag, _)) = self.cursor.advance(chunk, &mut i) {
                self.last_tag = tag;
            }
        }
    }

    /// Between two messages.
    pub(crate) fn at_boundary(&self) -> bool {
        self.cursor.at_boundary()
    }

    /// The backend's last whole message was ReadyForQuery: no query is running.
    pub(crate) fn ready_for_query(&self) -> bool {
        self.at_boundary() && self.last_tag == b'Z'
    }

    /// The ReadyForQuery messages seen since the last call.
    fn take_ready(&mut self) -> u64 {
        std::mem::take(&mut self.ready)
    }
}

/// Where the client→backend stream is: its framing, the requests the backend will answer with
/// ReadyForQuery, and whether an extended query waits for its Sync.
#[derive(Debug, Default)]
pub(crate) struct Requests {
    cursor: Cursor,
    /// Extended-query messages sent since the last Sync.
    unsynced: bool,
    /// A length no message has: the stream cannot be followed.
    lost: bool,
}

/// What a chunk of client bytes held.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Fed {
    /// Query, Sync and FunctionCall messages: each gets one ReadyForQuery.
    pub(crate) requests: u64,
    /// Where a Terminate message starts in the chunk, if one does.
    pub(crate) terminate_at: Option<usize>,
}

impl Requests {
    /// Follows `chunk`, stopping at a Terminate.
    pub(crate) fn feed(&mut self, chunk: &[u8]) -> Fed {
        let mut fed = Fed::default();
        let mut i = 0;
        while i < chunk.len() {
            let Some((tag, len)) = self.cursor.advance(chunk, &mut i) else {
                continue;
            };
            if len < 4 {
                self.lost = true;
            }
            match tag {
                b'Q' | b'F' => fed.requests += 1,
                b'S' => {
                    fed.requests += 1;
                    self.unsynced = false;
                }
                b'P' | b'B' | b'E' | b'D' | b'C' | b'H' => self.unsynced = true,
                b'X' => {
                    // A Terminate whose header began in an earlier chunk has partly reached
                    // the backend: that session cannot be handed on.
                    match i.checked_sub(5) {
                        Some(at) => fed.terminate_at = Some(at),
                        None => self.lost = true,
                    }
                    return fed;
                }
                _ => {}
            }
        }
        fed
    }

    /// Between two messages, with no extended query waiting for its Sync.
    fn settled(&self) -> bool {
        self.cursor.at_boundary() && !self.unsynced && !self.lost
    }
}

fn millis_since(start: Instant) -> u64 {
    start.elapsed().as_millis() as u64
}

const SHUTDOWN_MESSAGE: &str = "terminating connection due to administrator command";
const DURATION_MESSAGE: &str = "terminating connection: the session reached its maximum duration";

/// Bytes read during the handshake that belong to the relay: what the client pipelined after
/// its password, and what the backend sent after its first ReadyForQuery.
#[derive(Debug, Default)]
pub(crate) struct Opening {
    pub(crate) up: BytesMut,
    pub(crate) down: BytesMut,
}

/// Where relayed bytes are counted.
#[derive(Clone, Copy)]
pub(crate) struct Tally<'a> {
    pub(crate) up: &'a Counter,
    pub(crate) down: &'a Counter,
}

/// Relays until either side closes, a limit ends the session, or `terminate` turns true.
/// With `keep` the client's Terminate is not passed on, so the backend session outlives the
/// client and [`Relayed::reusable`] says whether it may be handed on.
pub(crate) async fn relay<C>(
    client: C,
    backend: &mut TcpStream,
    opening: Opening,
    limits: SessionLimits,
    mut terminate: tokio::sync::watch::Receiver<bool>,
    keep: bool,
    tally: Option<Tally<'_>>,
) -> Relayed
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let start = Instant::now();
    // Milliseconds since `start` of the client's last bytes.
    let last_client = AtomicU64::new(0);
    // Requests sent and not yet answered with ReadyForQuery.
    let pending = AtomicI64::new(0);
    // The backend stream is between messages, and the status of its last ReadyForQuery.
    let backend_boundary = AtomicBool::new(true);
    let backend_status = AtomicU8::new(b'I');
    let (mut cr, mut cw) = tokio::io::split(client);
    let (mut br, mut bw) = backend.split();

    let up = async {
        let mut buf = opening.up;
        buf.reserve(CHUNK);
        let mut requests = Requests::default();
        loop {
            if buf.is_empty() {
                match cr.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => return (RelayEnd::Client, requests.settled()),
                    Ok(n) => {
                        if let Some(t) = tally {
                            t.up.inc_by(n as u64);
                        }
                    }
                }
                last_client.store(millis_since(start), Ordering::Relaxed);
            }
            let fed = requests.feed(&buf);
            pending.fetch_add(fed.requests as i64, Ordering::Relaxed);
            let send = match fed.terminate_at {
                Some(at) if keep => &buf[..at],
                _ => &buf[..],
            };
            if bw.write_all(send).await.is_err() {
                return (RelayEnd::Backend, false);
            }
            if fed.terminate_at.is_some() {
                return (RelayEnd::Client, requests.settled());
            }
            buf.clear();
        }
    };

    let down = async {
        let mut buf = opening.down;
        buf.reserve(CHUNK);
        let mut framing = Framing::default();
        // When the backend last became ready for a query.
        let mut ready_at = 0u64;
        // A reason to end the session at the next message boundary (57P01, told the client).
        let mut end_at_boundary: Option<(&str, RelayEnd)> = None;
        loop {
            let deadline = next_deadline(&limits, &framing, ready_at, &last_client, start);
            tokio::select! {
                r = read_unless_held(&mut br, &mut buf) => {
                    match r {
                        Ok(0) | Err(_) => return RelayEnd::Backend,
                        Ok(n) => {
                            if let Some(t) = tally {
                                t.down.inc_by(n as u64);
                            }
                        }
                    }
                    framing.feed(&buf);
                    let answered = framing.take_ready();
                    if answered > 0 {
                        pending.fetch_sub(answered as i64, Ordering::Relaxed);
                        backend_status.store(framing.status, Ordering::Relaxed);
                    }
                    backend_boundary.store(framing.at_boundary(), Ordering::Relaxed);
                    if framing.ready_for_query() {
                        ready_at = millis_since(start);
                    }
                    let written = cw.write_all(&buf).await;
                    buf.clear();
                    if written.is_err() {
                        return RelayEnd::Client;
                    }
                    if let Some((message, end)) = end_at_boundary.filter(|_| framing.at_boundary()) {
                        tell(&mut cw, "57P01", message).await;
                        return end;
                    }
                }
                () = turns_true(&mut terminate), if end_at_boundary.is_none() => {
                    if framing.at_boundary() {
                        tell(&mut cw, "57P01", SHUTDOWN_MESSAGE).await;
                        return RelayEnd::Shutdown;
                    }
                    end_at_boundary = Some((SHUTDOWN_MESSAGE, RelayEnd::Shutdown));
                }
                () = sleep_until(deadline) => {
                    let now = millis_since(start);
                    if let Some(max) = limits.max_duration {
                        if now >= max.as_millis() as u64 {
                            if framing.at_boundary() {
                                tell(&mut cw, "57P01", DURATION_MESSAGE).await;
                                return RelayEnd::Duration;
                            }
                            // Mid-message: end at the next boundary.
                            end_at_boundary.get_or_insert((DURATION_MESSAGE, RelayEnd::Duration));
                        }
                    }
                    if let Some(max) = limits.max_idle {
                        let since = ready_at.max(last_client.load(Ordering::Relaxed));
                        if framing.ready_for_query() && now.saturating_sub(since) >= max.as_millis() as u64 {
                            tell(&mut cw, "57P05", "terminating connection due to idle-session timeout").await;
                            return RelayEnd::Idle;
                        }
                    }
                }
            }
        }
    };

    let (end, client_settled) = tokio::select! {
        (end, settled) = up => (end, settled),
        end = down => (end, false),
    };
    let reusable = keep
        && end == RelayEnd::Client
        && client_settled
        && pending.load(Ordering::Relaxed) == 0
        && backend_boundary.load(Ordering::Relaxed)
        && backend_status.load(Ordering::Relaxed) == b'I';
    Relayed { end, reusable }
}

/// Reads into `buf` unless it already holds bytes (the opening's), which are then taken as read.
async fn read_unless_held<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
) -> std::io::Result<usize> {
    if !buf.is_empty() {
        return Ok(buf.len());
    }
    r.read_buf(buf).await
}

/// The next moment a limit may end the session, or `None`.
fn next_deadline(
    limits: &SessionLimits,
    framing: &Framing,
    ready_at: u64,
    last_client: &AtomicU64,
    start: Instant,
) -> Option<Instant> {
    let mut at: Option<u64> = limits.max_duration.map(|d| d.as_millis() as u64);
    if let Some(idle) = limits.max_idle {
        if framing.ready_for_query() {
            let since = ready_at.max(last_client.load(Ordering::Relaxed));
            let t = since + idle.as_millis() as u64;
            at = Some(at.map_or(t, |a| a.min(t)));
        } else {
            // A query is running: look again a little later.
            let t = millis_since(start) + idle.as_millis() as u64;
            at = Some(at.map_or(t, |a| a.min(t)));
        }
    }
    at.map(|ms| start + Duration::from_millis(ms))
}

/// Resolves once `rx` holds true; never if its sender goes first.
async fn turns_true(rx: &mut tokio::sync::watch::Receiver<bool>) {
    if rx.wait_for(|t| *t).await.is_err() {
        std::future::pending::<()>().await;
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

async fn tell<W: AsyncWrite + Unpin>(w: &mut W, code: &str, message: &str) {
    let mut out = BytesMut::new();
    codec::error_response("FATAL", code, message, &mut out);
    let _ = w.write_all(&out).await;
    let _ = w.flush().await;
    let _ = w.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn framing_follows_messages_split_anywhere() {
        // RowDescription-ish 'T' (len 6), then ReadyForQuery 'Z' (len 5, 'I').
        let mut stream = vec![b'T', 0, 0, 0, 6, 1, 2];
        stream.extend_from_slice(&[b'Z', 0, 0, 0, 5, b'I']);
        for cut in 0..stream.len() {
            let mut f = Framing::default();
            f.feed(&stream[..cut]);
            if cut < stream.len() {
                assert!(!f.ready_for_query(), "cut {cut}");
            }
            f.feed(&stream[cut..]);
            assert!(f.ready_for_query(), "cut {cut}");
        }
        let mut f = Framing::default();
        f.feed(&stream[..7]);
        assert!(f.at_boundary());
        assert!(!f.ready_for_query());
    }

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![tag];
        m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    #[test]
    fn framing_counts_ready_for_query_and_keeps_the_status() {
        let stream = [
            msg(b'C', b"BEGIN\0"),
            msg(b'Z', b"T"),
            msg(b'C', b"COMMIT\0"),
            msg(b'Z', b"I"),
        ]
        .concat();
        for cut in 0..stream.len() {
            let mut f = Framing::default();
            f.feed(&stream[..cut]);
            let first = f.take_ready();
            f.feed(&stream[cut..]);
            assert_eq!(first + f.take_ready(), 2, "cut {cut}");
            assert_eq!(f.status, b'I');
        }
    }

    #[test]
    fn requests_count_what_gets_ready_for_query_and_find_terminate() {
        let q = msg(b'Q', b"select 1\0");
        let extended = [
            msg(b'P', b"\0select 1\0\0\0"),
            msg(b'B', &[0; 8]),
            msg(b'E', &[0; 5]),
        ]
        .concat();
        let sync = msg(b'S', b"");
        let x = msg(b'X', b"");

        let mut r = Requests::default();
        let all = [q.clone(), extended.clone(), sync.clone(), x.clone()].concat();
        let fed = r.feed(&all);
        assert_eq!(fed.requests, 2);
        assert_eq!(fed.terminate_at, Some(all.len() - 5));
        assert!(r.settled());

        let mut r = Requests::default();
        r.feed(&extended);
        assert!(!r.settled(), "an extended query waits for its Sync");
        assert_eq!(r.feed(&sync).requests, 1);
        assert!(r.settled());

        // Split anywhere, the same count; mid-message is not settled.
        let stream = [q.clone(), sync.clone(), q.clone()].concat();
        for cut in 1..stream.len() {
            let mut r = Requests::default();
            let n = r.feed(&stream[..cut]).requests + r.feed(&stream[cut..]).requests;
            assert_eq!(n, 3, "cut {cut}");
        }
        let mut r = Requests::default();
        r.feed(&q[..3]);
        assert!(!r.settled());

        // A Terminate whose header began in an earlier chunk cannot be held back.
        let mut r = Requests::default();
        assert_eq!(r.feed(&x[..2]).terminate_at, None);
        assert_eq!(r.feed(&x[2..]).terminate_at, None);
        assert!(!r.settled());

        // A length below four: lost.
        let mut r = Requests::default();
        r.feed(&[b'Q', 0, 0, 0, 2]);
        assert!(!r.settled());
    }

    /// Runs the relay between a scripted client and a scripted backend over loopback TCP: the
    /// client sends `client`, then closes; the backend answers each chunk it reads with the
    /// next of `answers`. Returns the relay's verdict and what the backend received.
    async fn scripted(
        client: Vec<Vec<u8>>,
        answers: Vec<Vec<u8>>,
        keep: bool,
    ) -> (Relayed, Vec<u8>) {
        use tokio::net::TcpListener;
        let sent: usize = client.iter().map(Vec::len).sum();
        let answered: usize = answers.iter().map(Vec::len).sum();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let backend_task = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut got = Vec::new();
            let mut answers = answers.into_iter();
            let mut buf = [0u8; 4096];
            loop {
                let n = match tokio::time::timeout(Duration::from_millis(500), s.read(&mut buf))
                    .await
                {
                    Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return got,
                    Ok(Ok(n)) => n,
                };
                got.extend_from_slice(&buf[..n]);
                if let Some(a) = answers.next() {
                    s.write_all(&a).await.unwrap();
                }
            }
        });
        let mut backend = TcpStream::connect(addr).await.unwrap();
        let (mut c, gw_side) = tokio::io::duplex(64 * 1024);
        let client_task = tokio::spawn(async move {
            for chunk in client {
                c.write_all(&chunk).await.unwrap();
                // Let the backend answer before the next chunk.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            drop(c);
        });
        let (_, rx) = tokio::sync::watch::channel(false);
        let (up, down) = (Counter::default(), Counter::default());
        let relayed = relay(
            gw_side,
            &mut backend,
            Opening::default(),
            SessionLimits::default(),
            rx,
            keep,
            Some(Tally {
                up: &up,
                down: &down,
            }),
        )
        .await;
        client_task.await.unwrap();
        drop(backend);
        let got = backend_task.await.unwrap();
        // Every byte read from the client is counted, whether or not it was passed on (a kept
        // session's Terminate is not); the backend's answers no more than were written.
        assert_eq!(up.get(), sent as u64);
        assert!(down.get() <= answered as u64);
        (relayed, got)
    }

    #[tokio::test]
    async fn the_relay_keeps_only_sessions_left_idle() {
        let q = msg(b'Q', b"select 1\0");
        let x = msg(b'X', b"");
        let done = [msg(b'C', b"SELECT 1\0"), msg(b'Z', b"I")].concat();
        let in_tx = [msg(b'C', b"BEGIN\0"), msg(b'Z', b"T")].concat();
        let failed = [msg(b'E', b"SERROR\0\0"), msg(b'Z', b"E")].concat();
        let copy_in = msg(b'G', &[0, 0, 0]);
        let half = done[..3].to_vec();
        let ext = [
            msg(b'P', b"\0select 1\0\0\0"),
            msg(b'B', &[0; 8]),
            msg(b'E', &[0; 5]),
        ]
        .concat();
        // (what, client chunks, backend answers, reusable)
        type Case<'a> = (&'a str, Vec<Vec<u8>>, Vec<Vec<u8>>, bool);
        let cases: Vec<Case> = vec![
            (
                "idle after a query",
                vec![q.clone(), x.clone()],
                vec![done.clone()],
                true,
            ),
            (
                "idle, closed without Terminate",
                vec![q.clone()],
                vec![done.clone()],
                true,
            ),
            (
                "in a transaction",
                vec![q.clone(), x.clone()],
                vec![in_tx],
                false,
            ),
            (
                "in a failed transaction",
                vec![q.clone(), x.clone()],
                vec![failed],
                false,
            ),
            (
                "in COPY FROM STDIN",
                vec![q.clone(), x.clone()],
                vec![copy_in],
                false,
            ),
            (
                "query unanswered",
                vec![q.clone(), x.clone()],
                vec![],
                false,
            ),
            (
                "answer cut mid-message",
                vec![q.clone(), x.clone()],
                vec![half],
                false,
            ),
            (
                "extended query without Sync",
                vec![ext, x.clone()],
                vec![],
                false,
            ),
        ];
        for (what, client, answers, reusable) in cases {
            let (relayed, got) = scripted(client.clone(), answers.clone(), true).await;
            assert_eq!(relayed.end, RelayEnd::Client, "{what}");
            assert_eq!(relayed.reusable, reusable, "{what}");
            assert!(!got.ends_with(&x), "{what}: the Terminate was passed on");
            // Without pooling nothing is kept, and the backend hears the Terminate.
            let (relayed, got) = scripted(client.clone(), answers, false).await;
            assert!(!relayed.reusable, "{what} (no pool)");
            assert_eq!(
                got.ends_with(&x),
                client.last() == Some(&x),
                "{what} (no pool)"
            );
        }
    }
}
