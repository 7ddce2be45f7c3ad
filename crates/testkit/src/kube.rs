//! A FAKE Kubernetes API server with a FAKE "process kubelet", for the end-to-end tests of
//! Taidon's Kubernetes runtime.
//!
//! Why a fake: no Kubernetes API server (nor kind, nor k3s) can run on the machines the tests run
//! on, yet the Kubernetes code must be exercised through the real kube-rs client, over HTTP, with
//! pods that really run. So [`FakeApiServer`] keeps the objects in memory and speaks the REST
//! conventions kube-rs uses, and [`ProcessKubelet`] "runs" each pod as a local child process.
//! Nothing here is a conformance-tested API server: it implements what Taidon uses and says so.
//!
//! # The API server
//! Plain HTTP/1.1 on `127.0.0.1` (a free port), objects stored as JSON ([`serde_json::Value`]):
//! - `pods` (core/v1): create, get, list, watch, delete (graceful: `deletionTimestamp`, then the
//!   kubelet stops the process, then the object goes with a `DELETED` event); also
//!   `GET /api/v1/pods` (all namespaces) for list and watch.
//! - `leases` (coordination.k8s.io/v1): create, get, list, replace (`PUT`, optimistic concurrency:
//!   409 Conflict when `metadata.resourceVersion` differs), delete.
//! - One global `resourceVersion` counter, bumped on every write; a bounded history of the last
//!   [`HISTORY`] changes serves watches (an older `resourceVersion` gets a `410 Gone` `ERROR`
//!   event, as the real server does after compaction).
//! - `labelSelector` (`k=v`, `k==v`, `k!=v`, `k`, `!k`, `k in (a,b)`, `k notin (a,b)`); other
//!   query parameters (`fieldSelector`, `limit`, `continue`, …) are accepted and ignored: a list
//!   always returns every item and no continue token.
//! - Errors are real `Status` objects (NotFound, AlreadyExists, Conflict, Forbidden, Gone, …);
//!   anything not implemented is a 404 Status.
//! - RBAC is simulated: [`FakeApiServer::deny`] makes a verb on a resource fail with 403 and the
//!   real API's message; every request's `(verb, resource)` is logged ([`FakeApiServer::requests`]).
//!
//! # The process kubelet
//! See [`ProcessKubelet`]: it watches the store in process (not over HTTP), gives each pod its
//! own loopback address `127.P.x.y` (unique in the process) (so every pod can listen on the same fixed ports), runs the
//! first container's `command` + `args` as a child process, probes readiness, and reports
//! status like a kubelet would. Its limits and its one trick (emptyDir paths are rewritten) are
//! documented there.
//!
//! # Clients
//! [`FakeApiServer::write_kubeconfig`] writes a kubeconfig (server `http://127.0.0.1:PORT`, a
//! dummy token) for `KUBECONFIG` + `kube::Config::infer()`, or `Kubeconfig::read_from` +
//! `Config::from_custom_kubeconfig`. kube-rs 5 needs nothing special for plain `http://`: with
//! `rustls-tls` its connector is built `https_or_http()`, and it sends the token over http
//! without complaint (`crates/testkit/tests/kube_fake.rs` checks both ways in).
//!
//! Everything runs on a thread of its own (its own Tokio runtime), so the fake serves
//! `#[test]`s and `#[tokio::test]`s alike; dropping the [`FakeApiServer`] stops it and kills every
//! pod's processes.

mod kubelet;
mod rest;
mod store;

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;

use serde_json::Value;
use tokio::sync::oneshot;

pub use kubelet::ProcessKubelet;
use store::Shared;

/// How many changes the watch history keeps; a watch from before them gets `410 Gone`.
pub const HISTORY: usize = 10_000;

/// The user named in simulated RBAC denials (the controller's service account).
pub const DENIED_USER: &str = "system:serviceaccount:taidon:taidon-controller";

/// A FAKE Kubernetes API server (in memory, plain HTTP on loopback) with a [`ProcessKubelet`]
/// attached; stops, and kills its pods' processes, when dropped.
pub struct FakeApiServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for FakeApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeApiServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl FakeApiServer {
    /// Starts a fake API server on a free loopback port, with a process kubelet attached.
    pub async fn start() -> FakeApiServer {
        FakeApiServer::start_blocking()
    }

    /// [`FakeApiServer::start`] for synchronous tests.
    pub fn start_blocking() -> FakeApiServer {
        let listener =
            StdListener::bind("127.0.0.1:0").expect("bind the fake API server to a loopback port");
        let addr = listener
            .local_addr()
            .expect("the fake API server's local address");
        listener
            .set_nonblocking(true)
            .expect("make the fake API server's listener non-blocking");
        let (shared, kubelet_rx) = Shared::new();
        let (stop, stopped) = oneshot::channel();
        let state = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name(format!("fake-kube-{addr}"))
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("build the fake API server's runtime");
                runtime.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener)
                        .expect("register the fake API server's listener");
                    let kubelet = ProcessKubelet::new(Arc::clone(&state));
                    tokio::spawn(kubelet.run(kubelet_rx));
                    let app = rest::router(Arc::clone(&state));
                    // Not a graceful shutdown: open watches would hold it for their timeout.
                    tokio::select! {
                        _ = axum::serve(listener, app) => {}
                        _ = stopped => {}
                    }
                    state.kill_all_processes();
                });
                // Dropping the runtime drops the pods' tasks: their process guards kill what is
                // left and their temporary directories go.
                runtime.shutdown_timeout(std::time::Duration::from_secs(2));
            })
            .expect("spawn the fake API server's thread");
        FakeApiServer {
            addr,
            shared,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Maps a container's `command[0]` (e.g. `"taidon"`) to a local executable.
    pub fn with_binary(&self, name: &str, path: &Path) {
        self.shared
            .lock()
            .binaries
            .insert(name.to_owned(), path.to_owned());
    }

    /// The server's base URL, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes a kubeconfig (this server, a dummy token, `namespace` as the context's default)
    /// that `kube::Config::infer()` accepts through `KUBECONFIG`.
    pub fn write_kubeconfig(&self, path: &Path, namespace: &str) -> std::io::Result<()> {
        let yaml = format!(
            "apiVersion: v1\n\
             kind: Config\n\
             clusters:\n\
             - name: fake\n\
             \x20 cluster:\n\
             \x20   server: {url}\n\
             users:\n\
             - name: fake\n\
             \x20 user:\n\
             \x20   token: fake-token\n\
             contexts:\n\
             - name: fake\n\
             \x20 context:\n\
             \x20   cluster: fake\n\
             \x20   user: fake\n\
             \x20   namespace: {namespace}\n\
             current-context: fake\n",
            url = self.url()
        );
        std::fs::write(path, yaml)
    }

    /// Makes every request of `verb` (get, list, watch, create, update, patch, delete) on
    /// `resource` (e.g. "pods") fail with 403 Forbidden, as RBAC would.
    pub fn deny(&self, verb: &str, resource: &str) {
        self.shared
            .lock()
            .denied
            .insert((verb.to_owned(), resource.to_owned()));
    }

    /// Lifts a [`FakeApiServer::deny`].
    pub fn allow(&self, verb: &str, resource: &str) {
        self.shared
            .lock()
            .denied
            .remove(&(verb.to_owned(), resource.to_owned()));
    }

    /// Every request served so far, as `(verb, resource)`, in order.
    pub fn requests(&self) -> Vec<(String, String)> {
        self.shared.lock().requests.clone()
    }

    /// Stores a Secret for the kubelet's `secretKeyRef` (there is no HTTP endpoint for secrets).
    pub fn put_secret(&self, ns: &str, name: &str, data: BTreeMap<String, String>) {
        self.shared
            .lock()
            .secrets
            .insert((ns.to_owned(), name.to_owned()), data);
    }

    /// Makes pods with this image fail to pull (`ErrImagePull`, then `ImagePullBackOff`).
    pub fn set_unpullable(&self, image: &str) {
        self.shared.lock().unpullable.insert(image.to_owned());
    }

    /// Makes `image` pullable again (for pods created from now on).
    pub fn allow_pull(&self, image: &str) {
        self.shared.lock().unpullable.remove(image);
    }

    /// The pods of namespace `ns`, as stored.
    pub fn pods(&self, ns: &str) -> Vec<Value> {
        self.shared.lock().objects_in("pods", Some(ns))
    }

    /// One pod, as stored.
    pub fn pod(&self, ns: &str, name: &str) -> Option<Value> {
        self.shared.lock().get("pods", ns, name).cloned()
    }

    /// The stdout and stderr of the most recent pod named `name` (any namespace), or "" if none
    /// ran; still readable after the pod is gone.
    pub fn logs(&self, name: &str) -> String {
        let path = self.shared.lock().log_paths.get(name).cloned();
        path.and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    }

    /// SIGKILLs the processes of the pod named `name` (a crashed container); false if it has
    /// no running process.
    pub fn kill_pod_process(&self, name: &str) -> bool {
        self.shared.kill_pod(name, false)
    }

    /// Evicts the pod named `name`: its processes are killed and it ends `Failed` with reason
    /// `Evicted`; false if it has no running process.
    pub fn evict(&self, name: &str) -> bool {
        self.shared.kill_pod(name, true)
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        // Kill first, so nothing waits on a grace period while the server shuts down.
        self.shared.kill_all_processes();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
