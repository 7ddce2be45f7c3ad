//! The relay after login: bytes both ways, watching the backend's message boundaries so a
//! session that is idle too long or lives too long can be ended with a proper ErrorResponse.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

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

/// Where the backend→client stream is in its framing: between messages or inside one.
#[derive(Debug, Default)]
pub(crate) struct Framing {
    header: [u8; 5],
    header_len: usize,
    body_left: usize,
    last_tag: u8,
}

impl Framing {
    /// Follows `chunk` through message headers and bodies.
    pub(crate) fn feed(&mut self, chunk: &[u8]) {
        let mut i = 0;
        while i < chunk.len() {
            if self.body_left > 0 {
                let take = self.body_left.min(chunk.len() - i);
                self.body_left -= take;
                i += take;
                continue;
            }
            self.header[self.header_len] = chunk[i];
            self.header_len += 1;
            i += 1;
            if self.header_len == 5 {
                let len = u32::from_be_bytes([
                    self.header[1],
                    self.header[2],
                    self.header[3],
                    self.header[4],
                ]) as usize;
                self.last_tag = self.header[0];
                self.body_left = len.saturating_sub(4);
                self.header_len = 0;
            }
        }
    }

    /// Between two messages.
    pub(crate) fn at_boundary(&self) -> bool {
        self.header_len == 0 && self.body_left == 0
    }

    /// The backend's last whole message was ReadyForQuery: no query is running.
    pub(crate) fn ready_for_query(&self) -> bool {
        self.at_boundary() && self.last_tag == b'Z'
    }
}

fn millis_since(start: Instant) -> u64 {
    start.elapsed().as_millis() as u64
}

const SHUTDOWN_MESSAGE: &str = "terminating connection due to administrator command";
const DURATION_MESSAGE: &str = "terminating connection: the session reached its maximum duration";

/// Relays until either side closes, a limit ends the session, or `terminate` turns true.
pub(crate) async fn relay<C, B>(
    client: C,
    backend: B,
    limits: SessionLimits,
    mut terminate: tokio::sync::watch::Receiver<bool>,
) -> RelayEnd
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let start = Instant::now();
    // Milliseconds since `start` of the client's last bytes.
    let last_client = AtomicU64::new(0);
    let (mut cr, mut cw) = tokio::io::split(client);
    let (mut br, mut bw) = tokio::io::split(backend);

    let up = async {
        let mut buf = BytesMut::with_capacity(CHUNK);
        loop {
            buf.clear();
            match cr.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return RelayEnd::Client,
                Ok(_) => {}
            }
            last_client.store(millis_since(start), Ordering::Relaxed);
            if bw.write_all(&buf).await.is_err() {
                return RelayEnd::Backend;
            }
        }
    };

    let down = async {
        let mut buf = BytesMut::with_capacity(CHUNK);
        let mut framing = Framing::default();
        // When the backend last became ready for a query.
        let mut ready_at = 0u64;
        // A reason to end the session at the next message boundary (57P01, told the client).
        let mut end_at_boundary: Option<(&str, RelayEnd)> = None;
        loop {
            let deadline = next_deadline(&limits, &framing, ready_at, &last_client, start);
            buf.clear();
            tokio::select! {
                r = br.read_buf(&mut buf) => {
                    match r {
                        Ok(0) | Err(_) => return RelayEnd::Backend,
                        Ok(_) => {}
                    }
                    framing.feed(&buf);
                    if framing.ready_for_query() {
                        ready_at = millis_since(start);
                    }
                    if cw.write_all(&buf).await.is_err() {
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

    tokio::select! {
        end = up => end,
        end = down => end,
    }
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
}
