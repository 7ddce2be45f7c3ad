//! `HttpResolver` against a tiny in-test HTTP server that answers one canned response per
//! connection and records the request it got.

use taidon_api::{ResolveRequest, ResolveResponse, Target};
use taidon_core::{InstanceId, StateId};
use taidon_gateway::{HttpResolver, ResolveError, Resolver};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Serves one request with `status` and `body`; returns the base URL and the raw request.
async fn serve_once(
    status: &'static str,
    body: String,
) -> (String, tokio::task::JoinHandle<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let (mut sock, _) = listener.accept().await.unwrap();
        let mut req = Vec::new();
        let mut chunk = [0u8; 4096];
        // Headers, then as many body bytes as Content-Length says.
        loop {
            let n = sock.read(&mut chunk).await.unwrap();
            assert!(n > 0, "client closed mid-request");
            req.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&req).into_owned();
            if let Some(end) = text.find("\r\n\r\n") {
                let len = text
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse::<usize>().unwrap())
                    })
                    .unwrap_or(0);
                if req.len() >= end + 4 + len {
                    break;
                }
            }
        }
        let resp = format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        sock.write_all(resp.as_bytes()).await.unwrap();
        String::from_utf8(req).unwrap()
    });
    (url, task)
}

fn request() -> ResolveRequest {
    ResolveRequest {
        state_id: StateId::from_bytes([0xab; 32]),
        instance_id: Some(InstanceId::from_bytes([0xcd; 8])),
        scope: taidon_core::token::Scope::Rw,
        max_conn: None,
    }
}

#[tokio::test]
async fn posts_the_request_with_the_api_token_and_parses_ready() {
    let target = Target {
        instance_id: InstanceId::from_bytes([0xcd; 8]),
        host: "127.0.0.1".into(),
        port: 5544,
        user: "postgres".into(),
        password: "pw".into(),
    };
    let body = serde_json::to_string(&ResolveResponse::Ready(target.clone())).unwrap();
    let (url, seen) = serve_once("200 OK", body).await;
    // A trailing slash on the base URL is tolerated.
    let resolver = HttpResolver::new(&format!("{url}/"), "api-secret");
    let answer = resolver.resolve(request()).await.unwrap();
    assert_eq!(answer, ResolveResponse::Ready(target));

    let raw = seen.await.unwrap();
    assert!(raw.starts_with("POST /v1/resolve HTTP/1.1\r\n"), "{raw}");
    assert!(
        raw.to_ascii_lowercase()
            .contains("authorization: bearer api-secret\r\n"),
        "{raw}"
    );
    let body = &raw[raw.find("\r\n\r\n").unwrap() + 4..];
    assert_eq!(
        serde_json::from_str::<ResolveRequest>(body).unwrap(),
        request()
    );
    assert!(!format!("{resolver:?}").contains("api-secret"));
}

#[tokio::test]
async fn missing_is_an_answer_not_an_error() {
    let (url, _) = serve_once("200 OK", r#"{"status":"missing"}"#.into()).await;
    let answer = HttpResolver::new(&url, "t")
        .resolve(request())
        .await
        .unwrap();
    assert_eq!(answer, ResolveResponse::Missing);
}

#[tokio::test]
async fn error_statuses_unreachable_and_garbage_are_errors() {
    let api_error = r#"{"kind":"internal","message":"metadata is locked"}"#;
    let (url, _) = serve_once("500 Internal Server Error", api_error.into()).await;
    let err = HttpResolver::new(&url, "t")
        .resolve(request())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ResolveError::Status { status: 500, message } if message == "metadata is locked"),
        "{err:?}"
    );
    assert!(!err.is_transient());

    let (url, _) = serve_once("503 Service Unavailable", "shutting down".into()).await;
    let err = HttpResolver::new(&url, "t")
        .resolve(request())
        .await
        .unwrap_err();
    assert!(
        matches!(err, ResolveError::Status { status: 503, .. }),
        "{err:?}"
    );
    assert!(err.is_transient());

    let (url, _) = serve_once("200 OK", "not json".into()).await;
    let err = HttpResolver::new(&url, "t")
        .resolve(request())
        .await
        .unwrap_err();
    assert!(matches!(err, ResolveError::Decode(_)), "{err:?}");

    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let err = HttpResolver::new(&url, "t")
        .resolve(request())
        .await
        .unwrap_err();
    assert!(matches!(err, ResolveError::Unreachable { .. }), "{err:?}");
    assert!(err.is_transient());
}

#[tokio::test]
async fn touch_release_park_and_unpark_post_their_instances() {
    let iid = InstanceId::from_bytes([0xcd; 8]);
    for route in ["touch", "release", "park", "unpark"] {
        let (url, seen) = serve_once("200 OK", "{}".into()).await;
        let resolver = HttpResolver::new(&url, "api-secret");
        let ids = vec![iid, iid];
        match route {
            "touch" => resolver.touch(ids).await,
            "release" => resolver.release(ids).await,
            "park" => resolver.park(ids).await,
            _ => resolver.unpark(ids).await,
        }
        .unwrap();
        let raw = seen.await.unwrap();
        assert!(
            raw.starts_with(&format!("POST /v1/{route} HTTP/1.1\r\n")),
            "{raw}"
        );
        let body = &raw[raw.find("\r\n\r\n").unwrap() + 4..];
        assert_eq!(
            serde_json::from_str::<taidon_api::Leases>(body).unwrap(),
            taidon_api::Leases {
                instance_ids: vec![iid, iid]
            }
        );
    }
}
