//! The gateway's Prometheus metrics: connections by outcome, open sessions, bytes relayed, and
//! how long handshakes and Resolve take.
//!
//! The hot path (relaying) touches only atomic counters taken out of their families once, at
//! start: no lock, no hashing per read.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::error::{ErrorKind, GatewayError};

/// The outcome of a client connection: `ok`, or who failed it and the SQLSTATE it was told.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ConnectionLabels {
    result: &'static str,
    sqlstate: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabel {
    direction: &'static str,
}

/// The gateway's metrics; register them with [`GatewayMetrics::register`].
#[derive(Debug, Clone)]
pub struct GatewayMetrics {
    active: Gauge,
    connections: Family<ConnectionLabels, Counter>,
    connected_ok: Counter,
    bytes: Family<DirectionLabel, Counter>,
    pub(crate) bytes_up: Counter,
    pub(crate) bytes_down: Counter,
    handshake: Histogram,
    resolve: Histogram,
}

impl Default for GatewayMetrics {
    fn default() -> Self {
        let bytes = Family::<DirectionLabel, Counter>::default();
        let bytes_up = bytes
            .get_or_create(&DirectionLabel {
                direction: "client_to_server",
            })
            .clone();
        let bytes_down = bytes
            .get_or_create(&DirectionLabel {
                direction: "server_to_client",
            })
            .clone();
        let connections = Family::<ConnectionLabels, Counter>::default();
        // At 0 from the start (a rate over it needs no first connection), and taken out of
        // its family once: a successful connection takes no lock.
        let connected_ok = connections
            .get_or_create(&ConnectionLabels {
                result: "ok",
                sqlstate: "00000".to_owned(),
            })
            .clone();
        Self {
            active: Gauge::default(),
            connections,
            connected_ok,
            bytes,
            bytes_up,
            bytes_down,
            // 0.5 ms to about 16 s.
            handshake: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            resolve: Histogram::new(exponential_buckets(0.0001, 2.0, 18)),
        }
    }
}

impl GatewayMetrics {
    /// Adds every metric of the gateway to `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "taidon_gateway_active_connections",
            "Client sessions open through the gateway (after their handshake)",
            self.active.clone(),
        );
        registry.register(
            "taidon_gateway_connections",
            "Client connections by outcome: ok, or the kind of failure and the SQLSTATE sent",
            self.connections.clone(),
        );
        registry.register(
            "taidon_gateway_bytes",
            "Bytes relayed between clients and instances",
            self.bytes.clone(),
        );
        registry.register(
            "taidon_gateway_handshake_seconds",
            "From a client's connection to its first ReadyForQuery (successful handshakes)",
            self.handshake.clone(),
        );
        registry.register(
            "taidon_resolve_seconds",
            "How long the gateway waited for the controller to locate an instance (starts included)",
            self.resolve.clone(),
        );
    }

    pub(crate) fn connected(&self, handshake_s: f64) -> SessionGuard {
        self.connected_ok.inc();
        self.handshake.observe(handshake_s);
        self.active.inc();
        SessionGuard(self.active.clone())
    }

    pub(crate) fn failed(&self, e: &GatewayError) {
        self.connections.get_or_create(&failure_labels(e)).inc();
    }

    pub(crate) fn resolved(&self, seconds: f64) {
        self.resolve.observe(seconds);
    }
}

/// Counts a session as open until dropped.
#[derive(Debug)]
pub(crate) struct SessionGuard(Gauge);

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

fn failure_labels(e: &GatewayError) -> ConnectionLabels {
    let result = match e.kind() {
        ErrorKind::Client => "client",
        ErrorKind::Auth => "auth",
        ErrorKind::Resolve => "resolve",
        ErrorKind::Backend => "backend",
        ErrorKind::Limit => "limit",
    };
    let sqlstate = match (e.client_error(), e) {
        (Some(c), _) => c.code.to_owned(),
        (None, GatewayError::BackendRejected { raw, .. }) => {
            sqlstate_of(raw).unwrap_or_else(|| "none".to_owned())
        }
        // The client went away, or never spoke the protocol: it was told nothing.
        (None, _) => "none".to_owned(),
    };
    ConnectionLabels { result, sqlstate }
}

/// The `C` field of an ErrorResponse body (the message without its tag and length).
fn sqlstate_of(body: &[u8]) -> Option<String> {
    let mut rest = body;
    while let Some((&field, tail)) = rest.split_first() {
        if field == 0 {
            return None;
        }
        let end = tail.iter().position(|&b| b == 0)?;
        if field == b'C' {
            let code = std::str::from_utf8(&tail[..end]).ok()?;
            return (code.len() == 5 && code.bytes().all(|b| b.is_ascii_alphanumeric()))
                .then(|| code.to_owned());
        }
        rest = &tail[end + 1..];
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::encoding::text::encode;

    #[test]
    fn an_error_response_gives_its_sqlstate() {
        let body = b"SFATAL\0VFATAL\0C53300\0Mtoo many\0\0";
        assert_eq!(sqlstate_of(body).as_deref(), Some("53300"));
        assert_eq!(sqlstate_of(b"SFATAL\0Mno code\0\0"), None);
        assert_eq!(sqlstate_of(b"C12"), None, "unterminated");
        assert_eq!(sqlstate_of(b"Cbad code!\0\0"), None);
    }

    #[test]
    fn outcomes_are_labelled_by_kind_and_sqlstate() {
        let m = GatewayMetrics::default();
        let mut registry = Registry::default();
        m.register(&mut registry);
        let guard = m.connected(0.002);
        m.failed(&GatewayError::MissingUser);
        m.failed(&GatewayError::TooManyWaiting);
        m.failed(&GatewayError::ClientIo(std::io::Error::other("gone")));
        m.bytes_up.inc_by(10);
        let mut text = String::new();
        encode(&mut text, &registry).unwrap();
        for line in [
            "taidon_gateway_active_connections 1",
            "taidon_gateway_connections_total{result=\"ok\",sqlstate=\"00000\"} 1",
            "taidon_gateway_connections_total{result=\"client\",sqlstate=\"08P01\"} 1",
            "taidon_gateway_connections_total{result=\"limit\",sqlstate=\"53300\"} 1",
            "taidon_gateway_connections_total{result=\"client\",sqlstate=\"none\"} 1",
            "taidon_gateway_bytes_total{direction=\"client_to_server\"} 10",
            "taidon_gateway_bytes_total{direction=\"server_to_client\"} 0",
            "taidon_gateway_handshake_seconds_count 1",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        drop(guard);
        let mut text = String::new();
        encode(&mut text, &registry).unwrap();
        assert!(
            text.contains("taidon_gateway_active_connections 0\n"),
            "{text}"
        );
    }
}
