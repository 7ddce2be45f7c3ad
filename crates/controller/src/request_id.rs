//! A request id on every API log line: each request runs in an `api` span carrying its id,
//! method and path, ends with one line (status, elapsed time), and answers with the id in
//! `x-request-id`, so a client's report can be matched with the daemon's log.

use std::time::Instant;

use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument;

/// The header a request id is taken from and answered in.
pub(crate) const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The longest request id a client may choose.
const MAX_LEN: usize = 64;

/// Asked often by the gateway, by `sqlrs` and by scrapers: their lines are debug, not info.
const QUIET_PATHS: [&str; 7] = [
    "/v1/health",
    "/v1/resolve",
    "/v1/touch",
    "/v1/release",
    "/v1/park",
    "/v1/unpark",
    "/metrics",
];

/// The middleware: runs the request in its `api` span and logs its outcome.
pub(crate) async fn tag_request(req: Request, next: Next) -> Response {
    let id = chosen_id(req.headers().get(&REQUEST_ID)).unwrap_or_else(new_id);
    let method = req.method().clone();
    // The path alone: a query string is not logged.
    let path = req.uri().path().to_owned();
    let span = tracing::info_span!("api", request_id = %id, method = %method, path = %path);
    let started = Instant::now();
    let mut resp = next.run(req).instrument(span.clone()).await;
    let status = resp.status().as_u16();
    let elapsed_ms = started.elapsed().as_millis() as u64;
    span.in_scope(|| {
        if QUIET_PATHS.contains(&path.as_str()) {
            tracing::debug!(status, elapsed_ms, "api request");
        } else {
            tracing::info!(status, elapsed_ms, "api request");
        }
    });
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert(REQUEST_ID, v);
    }
    resp
}

/// The client's request id, if it is a short token of `[A-Za-z0-9._-]`.
fn chosen_id(header: Option<&HeaderValue>) -> Option<String> {
    let id = header?.to_str().ok()?;
    let sane = !id.is_empty()
        && id.len() <= MAX_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    sane.then(|| id.to_owned())
}

/// A fresh request id: 16 random hex digits.
fn new_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chosen(v: &str) -> Option<String> {
        chosen_id(Some(&HeaderValue::from_str(v).unwrap()))
    }

    #[test]
    fn a_sane_client_id_is_kept_and_anything_else_replaced() {
        assert_eq!(chosen("abc-DEF_1.2").as_deref(), Some("abc-DEF_1.2"));
        let longest = "a".repeat(64);
        assert_eq!(chosen(&longest), Some(longest));
        assert_eq!(chosen(&"a".repeat(65)), None);
        assert_eq!(chosen(""), None);
        assert_eq!(chosen("a b"), None);
        assert_eq!(chosen("a\"b"), None);
        assert_eq!(chosen("Bearer x.y/z"), None);
        assert_eq!(chosen_id(None), None);
        let id = new_id();
        assert_eq!(id.len(), 16);
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
        assert_ne!(new_id(), id);
    }

    #[tokio::test]
    async fn every_response_carries_the_request_id() {
        let app = axum::Router::new()
            .route("/v1/health", axum::routing::get(|| async { "ok" }))
            .layer(axum::middleware::from_fn(tag_request));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        let http = reqwest::Client::new();

        let resp = http
            .get(format!("{url}/v1/health?x=1"))
            .header("x-request-id", "mine-1")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.headers()["x-request-id"], "mine-1");

        let resp = http
            .get(format!("{url}/nowhere"))
            .header("x-request-id", "not sane!")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 404);
        let made = resp.headers()["x-request-id"].to_str().unwrap();
        assert_eq!(made.len(), 16, "{made}");
    }
}
