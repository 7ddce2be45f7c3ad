//! The FAKE API server's REST surface: routes, verbs, simulated RBAC, list and watch.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{header, Method, StatusCode};
use axum::response::Response;
use axum::routing::any;
use axum::Router;
use serde_json::{json, Value};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use super::store::{rfc3339, ApiError, PodCtl, Shared};
use super::DENIED_USER;

/// A resource the fake serves.
#[derive(Debug, Clone, Copy)]
struct Kind {
    group: &'static str,
    version: &'static str,
    resource: &'static str,
    kind: &'static str,
    list_kind: &'static str,
}

impl Kind {
    fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_owned()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
}

const KINDS: &[Kind] = &[
    Kind {
        group: "",
        version: "v1",
        resource: "pods",
        kind: "Pod",
        list_kind: "PodList",
    },
    Kind {
        group: "coordination.k8s.io",
        version: "v1",
        resource: "leases",
        kind: "Lease",
        list_kind: "LeaseList",
    },
];

/// Parameters a path carries: `group`, `version`, `ns`, `resource`, `name` (some absent).
type Params = HashMap<String, String>;

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/api/{version}/{resource}", any(collection))
        .route("/api/{version}/namespaces/{ns}/{resource}", any(collection))
        .route(
            "/api/{version}/namespaces/{ns}/{resource}/{name}",
            any(item),
        )
        .route("/apis/{group}/{version}/{resource}", any(collection))
        .route(
            "/apis/{group}/{version}/namespaces/{ns}/{resource}",
            any(collection),
        )
        .route(
            "/apis/{group}/{version}/namespaces/{ns}/{resource}/{name}",
            any(item),
        )
        .fallback(|| async {
            error(&ApiError {
                code: 404,
                reason: "NotFound",
                message: "the server could not find the requested resource".into(),
                details: json!({}),
            })
        })
        .with_state(shared)
}

fn kind_of(params: &Params) -> Result<Kind, ApiError> {
    let group = params.get("group").map_or("", String::as_str);
    let version = params.get("version").map_or("", String::as_str);
    let resource = params.get("resource").map_or("", String::as_str);
    KINDS
        .iter()
        .find(|k| k.group == group && k.version == version && k.resource == resource)
        .copied()
        .ok_or_else(|| ApiError {
            code: 404,
            reason: "NotFound",
            message: "the server could not find the requested resource".into(),
            details: json!({}),
        })
}

fn respond(code: StatusCode, body: &Value) -> Response {
    Response::builder()
        .status(code)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap_or_default()
}

fn error(e: &ApiError) -> Response {
    respond(
        StatusCode::from_u16(e.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        &e.status(),
    )
}

fn method_not_allowed() -> ApiError {
    ApiError {
        code: 405,
        reason: "MethodNotAllowed",
        message: "the server does not allow this method on the requested resource".into(),
        details: json!({}),
    }
}

/// Logs the request and applies the simulated RBAC.
fn admit(
    shared: &Shared,
    verb: &str,
    kind: &Kind,
    ns: Option<&str>,
    name: Option<&str>,
) -> Result<(), ApiError> {
    let mut store = shared.lock();
    store
        .requests
        .push((verb.to_owned(), kind.resource.to_owned()));
    if !store
        .denied
        .contains(&(verb.to_owned(), kind.resource.to_owned()))
    {
        return Ok(());
    }
    let what = match name {
        Some(name) => format!("{} \"{name}\"", kind.resource),
        None => kind.resource.to_owned(),
    };
    let scope = match ns {
        Some(ns) => format!("in the namespace \"{ns}\""),
        None => "at the cluster scope".to_owned(),
    };
    let mut details = json!({"kind": kind.resource});
    if let Some(name) = name {
        details["name"] = json!(name);
    }
    if !kind.group.is_empty() {
        details["group"] = json!(kind.group);
    }
    Err(ApiError {
        code: 403,
        reason: "Forbidden",
        message: format!(
            "{what} is forbidden: User \"{DENIED_USER}\" cannot {verb} resource \"{}\" in API \
             group \"{}\" {scope}",
            kind.resource, kind.group
        ),
        details,
    })
}

fn parse_body(body: &Bytes) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the body is not a JSON object: {e}")))
}

async fn collection(
    State(shared): State<Arc<Shared>>,
    method: Method,
    Path(params): Path<Params>,
    Query(query): Query<HashMap<String, String>>,
    body: Bytes,
) -> Response {
    match serve_collection(&shared, &method, &params, &query, &body) {
        Ok(response) => response,
        Err(e) => error(&e),
    }
}

fn serve_collection(
    shared: &Arc<Shared>,
    method: &Method,
    params: &Params,
    query: &HashMap<String, String>,
    body: &Bytes,
) -> Result<Response, ApiError> {
    let kind = kind_of(params)?;
    let ns = params.get("ns").map(String::as_str);
    let watching = query.get("watch").is_some_and(|w| w == "true" || w == "1");
    match (method, ns) {
        (&Method::GET, _) if watching => {
            admit(shared, "watch", &kind, ns, None)?;
            let selector = Selector::parse(query.get("labelSelector").map_or("", String::as_str))?;
            Ok(watch_response(shared, kind, ns, selector, query))
        }
        (&Method::GET, _) => {
            admit(shared, "list", &kind, ns, None)?;
            let selector = Selector::parse(query.get("labelSelector").map_or("", String::as_str))?;
            let store = shared.lock();
            let items: Vec<Value> = store
                .objects_in(kind.resource, ns)
                .into_iter()
                .filter(|o| selector.matches(o))
                .collect();
            Ok(respond(
                StatusCode::OK,
                &json!({
                    "apiVersion": kind.api_version(),
                    "kind": kind.list_kind,
                    "metadata": {"resourceVersion": store.rv.to_string()},
                    "items": items,
                }),
            ))
        }
        (&Method::POST, Some(ns)) => {
            admit(shared, "create", &kind, Some(ns), None)?;
            let object = parse_body(body)?;
            let created = shared.write(|store| {
                let created =
                    store.create(kind.resource, kind.kind, &kind.api_version(), ns, object)?;
                if kind.resource == "pods" {
                    let name = created["metadata"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned();
                    store.pods.insert(
                        (ns.to_owned(), name.clone()),
                        PodCtl {
                            delete: Arc::new(Notify::new()),
                            pgid: None,
                            evicted: false,
                            grace_seconds: None,
                        },
                    );
                    let _ = shared.kubelet.send((ns.to_owned(), name));
                }
                Ok::<_, ApiError>(created)
            })?;
            Ok(respond(StatusCode::CREATED, &created))
        }
        _ => Err(method_not_allowed()),
    }
}

async fn item(
    State(shared): State<Arc<Shared>>,
    method: Method,
    Path(params): Path<Params>,
    body: Bytes,
) -> Response {
    match serve_item(&shared, &method, &params, &body) {
        Ok(response) => response,
        Err(e) => error(&e),
    }
}

fn serve_item(
    shared: &Arc<Shared>,
    method: &Method,
    params: &Params,
    body: &Bytes,
) -> Result<Response, ApiError> {
    let kind = kind_of(params)?;
    let ns = params.get("ns").map_or("", String::as_str);
    let name = params.get("name").map_or("", String::as_str);
    let verb = match *method {
        Method::GET => "get",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE => "delete",
        _ => return Err(method_not_allowed()),
    };
    admit(shared, verb, &kind, Some(ns), Some(name))?;
    match verb {
        "get" => {
            let store = shared.lock();
            let object = store
                .get(kind.resource, ns, name)
                .ok_or_else(|| ApiError::not_found(kind.resource, name))?;
            Ok(respond(StatusCode::OK, object))
        }
        "update" => {
            let object = parse_body(body)?;
            let replaced =
                shared.write(|store| store.replace(kind.resource, kind.group, ns, name, object))?;
            Ok(respond(StatusCode::OK, &replaced))
        }
        "delete" if kind.resource == "pods" => {
            let options: Value = if body.is_empty() {
                json!({})
            } else {
                parse_body(body)?
            };
            Ok(respond(
                StatusCode::OK,
                &delete_pod(shared, ns, name, &options)?,
            ))
        }
        "delete" => {
            let removed = shared
                .write(|store| store.remove(kind.resource, ns, name))
                .ok_or_else(|| ApiError::not_found(kind.resource, name))?;
            Ok(respond(StatusCode::OK, &removed))
        }
        _ => Err(ApiError {
            code: 415,
            reason: "UnsupportedMediaType",
            message: "the FAKE API server does not implement PATCH".into(),
            details: json!({}),
        }),
    }
}

/// Marks a pod for deletion and tells the kubelet; a pod the kubelet does not run goes at once.
fn delete_pod(shared: &Shared, ns: &str, name: &str, options: &Value) -> Result<Value, ApiError> {
    shared.write(|store| {
        let pod = store
            .get("pods", ns, name)
            .ok_or_else(|| ApiError::not_found("pods", name))?;
        if pod.pointer("/metadata/deletionTimestamp").is_some() {
            return Ok(pod.clone());
        }
        let grace = options["gracePeriodSeconds"]
            .as_i64()
            .or_else(|| pod["spec"]["terminationGracePeriodSeconds"].as_i64())
            .unwrap_or(30)
            .max(0);
        let Some(ctl) = store.pods.get_mut(&(ns.to_owned(), name.to_owned())) else {
            return store
                .remove("pods", ns, name)
                .ok_or_else(|| ApiError::not_found("pods", name));
        };
        ctl.grace_seconds = Some(grace);
        ctl.delete.notify_one();
        let at = std::time::SystemTime::now() + Duration::from_secs(grace.unsigned_abs());
        store
            .modify("pods", ns, name, |pod| {
                pod["metadata"]["deletionTimestamp"] = json!(rfc3339(at));
                pod["metadata"]["deletionGracePeriodSeconds"] = json!(grace);
            })
            .ok_or_else(|| ApiError::not_found("pods", name))
    })
}

/// One label requirement of a `labelSelector`.
#[derive(Debug, Clone)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    NotExists(String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

#[derive(Debug, Clone, Default)]
pub(crate) struct Selector(Vec<Requirement>);

impl Selector {
    pub fn parse(text: &str) -> Result<Selector, ApiError> {
        let mut terms = Vec::new();
        let (mut depth, mut start) = (0i32, 0usize);
        for (i, c) in text.char_indices() {
            match c {
                '(' => depth += 1,
                ')' => depth -= 1,
                ',' if depth == 0 => {
                    terms.push(&text[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        terms.push(&text[start..]);
        let invalid = || ApiError::bad_request(format!("unable to parse requirement: {text:?}"));
        let set = |values: &str| -> Result<Vec<String>, ApiError> {
            let inner = values
                .trim()
                .strip_prefix('(')
                .and_then(|v| v.strip_suffix(')'))
                .ok_or_else(invalid)?;
            Ok(inner.split(',').map(|v| v.trim().to_owned()).collect())
        };
        let mut requirements = Vec::new();
        for term in terms.into_iter().map(str::trim).filter(|t| !t.is_empty()) {
            let requirement = if let Some(key) = term.strip_prefix('!') {
                Requirement::NotExists(key.trim().to_owned())
            } else if let Some((key, values)) = term.split_once(" notin ") {
                Requirement::NotIn(key.trim().to_owned(), set(values)?)
            } else if let Some((key, values)) = term.split_once(" in ") {
                Requirement::In(key.trim().to_owned(), set(values)?)
            } else if let Some((key, value)) = term.split_once("!=") {
                Requirement::NotEquals(key.trim().to_owned(), value.trim().to_owned())
            } else if let Some((key, value)) = term.split_once("==") {
                Requirement::Equals(key.trim().to_owned(), value.trim().to_owned())
            } else if let Some((key, value)) = term.split_once('=') {
                Requirement::Equals(key.trim().to_owned(), value.trim().to_owned())
            } else if term.contains(|c: char| c.is_whitespace() || c == '(' || c == ')') {
                return Err(invalid());
            } else {
                Requirement::Exists(term.to_owned())
            };
            requirements.push(requirement);
        }
        Ok(Selector(requirements))
    }

    pub fn matches(&self, object: &Value) -> bool {
        let labels = &object["metadata"]["labels"];
        let label = |key: &str| labels.get(key).and_then(Value::as_str);
        self.0.iter().all(|r| match r {
            Requirement::Equals(k, v) => label(k) == Some(v.as_str()),
            Requirement::NotEquals(k, v) => label(k) != Some(v.as_str()),
            Requirement::Exists(k) => label(k).is_some(),
            Requirement::NotExists(k) => label(k).is_none(),
            Requirement::In(k, vs) => label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            Requirement::NotIn(k, vs) => !label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
        })
    }
}

/// The state of one watch response.
struct Watch {
    shared: Arc<Shared>,
    kind: Kind,
    ns: Option<String>,
    selector: Selector,
    seen: u64,
    changed: watch::Receiver<u64>,
    deadline: Instant,
    bookmarks: bool,
    pending: VecDeque<Bytes>,
    done: bool,
}

fn line(kind: &str, object: &Value) -> Bytes {
    let mut text = json!({"type": kind, "object": object}).to_string();
    text.push('\n');
    Bytes::from(text)
}

impl Watch {
    fn bookmark(&self, initial_events_end: bool) -> Bytes {
        let mut metadata = json!({"resourceVersion": self.seen.to_string()});
        if initial_events_end {
            metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        line(
            "BOOKMARK",
            &json!({
                "kind": self.kind.kind,
                "apiVersion": self.kind.api_version(),
                "metadata": metadata,
            }),
        )
    }

    fn matches(&self, resource: &str, ns: &str) -> bool {
        resource == self.kind.resource && self.ns.as_deref().is_none_or(|n| n == ns)
    }

    /// Queues the changes after `seen`; false when the history no longer has them.
    fn collect(&mut self) -> bool {
        let changes = {
            let store = self.shared.lock();
            match store.changes_since(self.seen) {
                Ok(changes) => changes,
                Err(_) => return false,
            }
        };
        for change in changes {
            self.seen = change.rv;
            if self.matches(&change.resource, &change.ns) && self.selector.matches(&change.object) {
                self.pending.push_back(line(change.kind, &change.object));
            }
        }
        true
    }

    async fn next(mut self) -> Option<(Result<Bytes, Infallible>, Watch)> {
        loop {
            if let Some(bytes) = self.pending.pop_front() {
                return Some((Ok(bytes), self));
            }
            if self.done {
                return None;
            }
            self.changed.borrow_and_update();
            if !self.collect() {
                self.done = true;
                self.pending.push_back(gone_event(self.seen));
                continue;
            }
            if !self.pending.is_empty() {
                continue;
            }
            tokio::select! {
                changed = self.changed.changed() => {
                    if changed.is_err() {
                        self.done = true;
                    }
                }
                () = tokio::time::sleep_until(self.deadline) => {
                    self.done = true;
                    if self.bookmarks {
                        let bookmark = self.bookmark(false);
                        self.pending.push_back(bookmark);
                    }
                }
            }
        }
    }
}

fn gone_event(rv: u64) -> Bytes {
    let gone = ApiError::gone(format!(
        "too old resource version: {rv} (the FAKE API server keeps the last {} changes)",
        super::HISTORY
    ));
    line("ERROR", &gone.status())
}

fn watch_response(
    shared: &Arc<Shared>,
    kind: Kind,
    ns: Option<&str>,
    selector: Selector,
    query: &HashMap<String, String>,
) -> Response {
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .unwrap_or(1800);
    let from = query.get("resourceVersion").map_or("", String::as_str);
    let send_initial = query.get("sendInitialEvents").is_some_and(|v| v == "true");
    let mut watch = Watch {
        shared: Arc::clone(shared),
        kind,
        ns: ns.map(str::to_owned),
        selector,
        seen: 0,
        changed: shared.changed.subscribe(),
        deadline: Instant::now() + Duration::from_secs(timeout),
        bookmarks: query
            .get("allowWatchBookmarks")
            .is_some_and(|v| v == "true"),
        pending: VecDeque::new(),
        done: false,
    };
    let from_now = from.is_empty() || from == "0" || send_initial;
    if from_now {
        // Synthetic ADDED events for what exists, then the changes after it.
        let store = shared.lock();
        watch.seen = store.rv;
        for object in store.objects_in(kind.resource, ns) {
            if watch.selector.matches(&object) {
                watch.pending.push_back(line("ADDED", &object));
            }
        }
        drop(store);
        if send_initial {
            let bookmark = watch.bookmark(true);
            watch.pending.push_back(bookmark);
        }
    } else {
        match from.parse::<u64>() {
            Ok(rv) => watch.seen = rv,
            Err(_) => {
                watch.done = true;
                watch.pending.push_back(gone_event(0));
            }
        }
    }
    let stream = futures_util::stream::unfold(watch, Watch::next);
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(stream))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labelled(labels: Value) -> Value {
        json!({"metadata": {"labels": labels}})
    }

    #[test]
    fn selectors_match_like_kubernetes() {
        let pod = labelled(json!({"app": "x", "tier": "db"}));
        let yes = [
            "",
            "app=x",
            "app==x,tier=db",
            "app",
            "!other",
            "tier in (db,web)",
            "app notin (y, z)",
            "app!=y",
        ];
        for text in yes {
            assert!(Selector::parse(text).unwrap().matches(&pod), "{text}");
        }
        for text in [
            "app=y",
            "other",
            "!app",
            "tier in (web)",
            "app!=x",
            "app,x=1",
        ] {
            assert!(!Selector::parse(text).unwrap().matches(&pod), "{text}");
        }
        assert!(Selector::parse("app in x").is_err());
    }
}
