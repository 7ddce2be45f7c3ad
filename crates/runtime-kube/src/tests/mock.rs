//! A mocked API server: the client's service is a `tower_test` mock whose handle the test
//! answers request by request. Every request is checked against `rbac::PERMISSIONS` as it
//! arrives and recorded.

use std::time::Duration;

use http::{Request, Response};
use kube::client::Body;
use serde_json::{json, Value};
use tower_test::mock::{self, Handle, SendResponse};

use crate::rbac::PERMISSIONS;

/// The namespace every test works in.
pub(crate) const NS: &str = "taidon";

/// How long a test waits for a request it expects.
const PATIENCE: Duration = Duration::from_secs(5);

/// A client whose requests `ApiServer` receives.
pub(crate) fn mock_client() -> (kube::Client, ApiServer) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    (
        kube::Client::new(service, NS),
        ApiServer {
            handle,
            calls: Vec::new(),
        },
    )
}

/// One request as the API server saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Call {
    pub(crate) method: String,
    pub(crate) path: String,
    pub(crate) query: String,
}

/// What RBAC checks of a request: a verb on a resource of an API group.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Access {
    pub(crate) verb: &'static str,
    pub(crate) group: String,
    pub(crate) resource: String,
}

impl Call {
    /// Query parameter `key`, decoded.
    pub(crate) fn param(&self, key: &str) -> Option<String> {
        self.query
            .split('&')
            .filter_map(|pair| pair.split_once('='))
            .find(|(k, _)| *k == key)
            .map(|(_, v)| percent_decode(v))
    }

    /// The verb and resource the API server authorizes this request as (namespaced paths
    /// only: the runtime has a Role, not a ClusterRole).
    pub(crate) fn access(&self) -> Access {
        let parts: Vec<&str> = self.path.trim_start_matches('/').split('/').collect();
        let (group, rest) = match parts.as_slice() {
            ["api", "v1", rest @ ..] => ("", rest),
            ["apis", group, _version, rest @ ..] => (*group, rest),
            _ => panic!("not an API path: {}", self.path),
        };
        let (resource, named) = match rest {
            ["namespaces", ns, resource] => {
                assert_eq!(*ns, NS, "a request outside the namespace: {self:?}");
                (*resource, false)
            }
            ["namespaces", ns, resource, _name] => {
                assert_eq!(*ns, NS, "a request outside the namespace: {self:?}");
                (*resource, true)
            }
            _ => panic!("not a namespaced resource path: {}", self.path),
        };
        let watching = self.param("watch").as_deref() == Some("true");
        let verb = match (self.method.as_str(), named, watching) {
            ("GET", _, true) => "watch",
            ("GET", true, false) => "get",
            ("GET", false, false) => "list",
            ("POST", false, _) => "create",
            ("PUT", true, _) => "update",
            ("PATCH", true, _) => "patch",
            ("DELETE", true, _) => "delete",
            ("DELETE", false, _) => "deletecollection",
            _ => panic!("an unexpected request shape: {self:?}"),
        };
        Access {
            verb,
            group: group.to_owned(),
            resource: resource.to_owned(),
        }
    }
}

/// Whether `rbac::PERMISSIONS` grants `access`.
pub(crate) fn granted(access: &Access) -> bool {
    PERMISSIONS.iter().any(|p| {
        p.group == access.group && p.resource == access.resource && p.verbs.contains(&access.verb)
    })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).expect("ascii");
                out.push(u8::from_str_radix(hex, 16).expect("a percent escape"));
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).expect("utf-8")
}

/// A request waiting for its response.
pub(crate) struct Exchange {
    pub(crate) call: Call,
    /// The request's JSON body, `Null` if it had none.
    pub(crate) body: Value,
    respond: SendResponse<Response<Body>>,
}

impl std::fmt::Debug for Exchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exchange")
            .field("call", &self.call)
            .field("body", &self.body)
            .finish_non_exhaustive()
    }
}

impl Exchange {
    /// Answers with `code` and a JSON body.
    pub(crate) fn reply(self, code: u16, body: &Value) {
        let bytes = serde_json::to_vec(body).expect("JSON");
        self.reply_bytes(code, bytes);
    }

    /// Answers with `code` and raw bytes (a watch's newline-separated events).
    pub(crate) fn reply_bytes(self, code: u16, bytes: Vec<u8>) {
        let response = Response::builder()
            .status(code)
            .header("content-type", "application/json")
            .body(Body::from(bytes))
            .expect("a response");
        self.respond.send_response(response);
    }

    /// Answers with a `Status` failure, as the API server does.
    pub(crate) fn fail(self, code: u16, reason: &str, message: &str) {
        self.reply(code, &status(code, reason, message));
    }
}

/// A `Status` failure object.
pub(crate) fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

/// The test's end of the client.
pub(crate) struct ApiServer {
    handle: Handle<Request<Body>, Response<Body>>,
    /// Every request received, in order.
    pub(crate) calls: Vec<Call>,
}

impl ApiServer {
    /// The next request, or `None` once every client is gone. Panics if RBAC would refuse it.
    pub(crate) async fn receive(&mut self) -> Option<Exchange> {
        let (request, respond) = self.handle.next_request().await?;
        let (parts, body) = request.into_parts();
        let bytes = body.collect_bytes().await.expect("a request body");
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).expect("a JSON request body")
        };
        let call = Call {
            method: parts.method.to_string(),
            path: parts.uri.path().to_owned(),
            query: parts.uri.query().unwrap_or("").to_owned(),
        };
        let access = call.access();
        assert!(
            granted(&access),
            "{} {}?{} needs {access:?}, which rbac::PERMISSIONS does not grant",
            call.method,
            call.path,
            call.query
        );
        self.calls.push(call.clone());
        Some(Exchange {
            call,
            body,
            respond,
        })
    }

    /// The next request, which must come soon.
    pub(crate) async fn next(&mut self) -> Exchange {
        tokio::time::timeout(PATIENCE, self.receive())
            .await
            .expect("no request reached the API server")
            .expect("every client is gone")
    }

    /// The next request, which must be `method path`.
    pub(crate) async fn expect(&mut self, method: &str, path: &str) -> Exchange {
        let exchange = self.next().await;
        assert_eq!(
            (exchange.call.method.as_str(), exchange.call.path.as_str()),
            (method, path),
            "unexpected request {:?}",
            exchange.call
        );
        exchange
    }

    /// Asserts that no request arrives for `wait`.
    pub(crate) async fn expect_silence(&mut self, wait: Duration) {
        if let Ok(Some(exchange)) = tokio::time::timeout(wait, self.receive()).await {
            panic!("unexpected request {:?}", exchange.call);
        }
    }
}

/// `fut`, which must finish soon (a request nobody answers would hang it forever).
pub(crate) async fn within<F: std::future::Future>(fut: F) -> F::Output {
    tokio::time::timeout(PATIENCE, fut)
        .await
        .expect("the call did not finish in time")
}
