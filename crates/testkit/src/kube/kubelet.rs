//! The FAKE kubelet: runs each pod of the [`FakeApiServer`](super::FakeApiServer) as a local
//! child process.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, Notify};

use super::store::{now_rfc3339, Shared};

/// The longest grace period the fake waits for a process after SIGTERM (tests stay quick).
const MAX_GRACE: Duration = Duration::from_secs(10);
/// How often a readiness probe runs.
const PROBE_PERIOD: Duration = Duration::from_millis(100);
/// How long a pull "fails" with `ErrImagePull` before the pod shows `ImagePullBackOff`.
const PULL_BACKOFF_AFTER: Duration = Duration::from_millis(300);
/// Environment variables a pod's process inherits from the test process (if set).
const INHERITED_ENV: &[&str] = &["PATH", "HOME", "RUST_LOG", "RUST_BACKTRACE"];

/// A FAKE kubelet that "runs" each pod of a [`FakeApiServer`](super::FakeApiServer) as a local
/// child process, in the test process, watching the store directly rather than over HTTP.
///
/// What it does, and what it does not:
/// - Only the first container runs: `command` + `args` (with `$(VAR)` references expanded from
///   the container's env) as one child process in a process group of its own. `command[0]` is
///   looked up in the binary map ([`FakeApiServer::with_binary`](super::FakeApiServer::with_binary))
///   and otherwise run as given; without `command`, `args[0]` is the program (there is no image
///   entrypoint). The image is never pulled: its name only matters to
///   [`FakeApiServer::set_unpullable`](super::FakeApiServer::set_unpullable).
/// - The environment starts clean but for `PATH`, `HOME`, `RUST_LOG` and `RUST_BACKTRACE`;
///   `env[]` supports `value`, `fieldRef` (`status.podIP`, `status.hostIP`, `metadata.name`,
///   `metadata.namespace`, `metadata.uid`, `spec.nodeName`) and `secretKeyRef` (from
///   [`FakeApiServer::put_secret`](super::FakeApiServer::put_secret); a missing secret or key
///   leaves the pod `Pending` with `CreateContainerConfigError`).
/// - Each pod gets its own loopback address, `127.P.x.y` (never reused in the process, P after
///   the process id), as `status.podIP`, so every pod can listen on the same fixed ports. The
///   process is not confined to it: it must bind `$(POD_IP)` (from `fieldRef: status.podIP`).
/// - Volumes: an `emptyDir` is a fresh temporary directory (mode 0777, removed with the pod); a
///   `hostPath` is its own path; others are ignored. A process cannot see a `mountPath`, so the
///   kubelet REWRITES paths: in every env value, every `command`/`args` item and `workingDir`,
///   each occurrence of a mount's `mountPath` that is a whole path or a path prefix (it starts
///   the string or follows a space, `=`, `:`, a quote, a redirection or a shell separator, and
///   is followed by the end, `/` or a character that cannot continue a file name) becomes the
///   host directory. So `/data`, `/data/f`, `--dir=/data` and `echo x > /data/f` are rewritten,
///   `/database` and `/var/data` are not.
/// - Readiness: an `httpGet` readiness probe (numeric port, or a named container port) is
///   polled every 100 ms on the pod IP (delays and thresholds are ignored); 200..399 is ready.
///   Without a probe the pod is ready once its process is spawned.
/// - `restartPolicy` is taken as `Never`: when the process exits the pod is `Succeeded` (0) or
///   `Failed`, with `terminated.message` the last 20 lines of its output on failure (like
///   `terminationMessagePolicy: FallbackToLogsOnError`).
/// - Deleting a pod sends SIGTERM to its process, waits for the grace period (at most 10 s in
///   the fake), then SIGKILLs what is left of its "container": its process group and every
///   descendant. Then the temporary directories and the object go (`DELETED`).
/// - stdout and stderr go to a file, read by [`FakeApiServer::logs`](super::FakeApiServer::logs).
#[derive(Debug)]
pub struct ProcessKubelet {
    shared: Arc<Shared>,
    logs: TempDir,
}

/// A pod's identity and the parts of it the kubelet reports on.
#[derive(Debug, Clone)]
struct PodRef {
    ns: String,
    name: String,
    container: String,
    image: String,
}

/// Kills a container's processes when dropped (the pod ends, or the fake goes away).
struct ContainerGuard(i32);

impl Drop for ContainerGuard {
    fn drop(&mut self) {
        signal_container(self.0, libc::SIGKILL);
    }
}

impl ProcessKubelet {
    pub(crate) fn new(shared: Arc<Shared>) -> ProcessKubelet {
        let logs = tempfile::Builder::new()
            .prefix("fake-kubelet-logs-")
            .tempdir()
            .expect("create the fake kubelet's log directory");
        ProcessKubelet { shared, logs }
    }

    /// Runs every pod the API server announces, until the server goes away.
    pub(crate) async fn run(self, mut pods: mpsc::UnboundedReceiver<(String, String)>) {
        let this = Arc::new(self);
        while let Some((ns, name)) = pods.recv().await {
            tokio::spawn(Arc::clone(&this).run_pod(ns, name));
        }
    }

    fn set_status(&self, pod: &PodRef, f: impl FnOnce(&mut Value)) {
        self.shared.write(|store| {
            store.modify(
                "pods",
                &pod.ns,
                &pod.name,
                |object| f(&mut object["status"]),
            );
        });
    }

    async fn run_pod(self: Arc<Self>, ns: String, name: String) {
        let key = (ns.clone(), name.clone());
        let (object, delete, ip) = {
            let mut store = self.shared.lock();
            let Some(object) = store.get("pods", &ns, &name).cloned() else {
                return;
            };
            let Some(delete) = store.pods.get(&key).map(|c| Arc::clone(&c.delete)) else {
                return;
            };
            (object, delete, store.next_pod_ip())
        };
        let container = object["spec"]["containers"][0].clone();
        let pod = PodRef {
            ns,
            name,
            container: str_at(&container, "/name").to_owned(),
            image: str_at(&container, "/image").to_owned(),
        };
        let now = now_rfc3339();
        self.set_status(&pod, |status| {
            status["phase"] = json!("Pending");
            status["hostIP"] = json!("127.0.0.1");
            status["hostIPs"] = json!([{"ip": "127.0.0.1"}]);
            status["podIP"] = json!(ip);
            status["podIPs"] = json!([{"ip": ip}]);
            status["startTime"] = json!(now);
            status["conditions"] = conditions(false, true, &now);
            status["containerStatuses"] = json!([container_status(
                &pod,
                json!({"waiting": {"reason": "ContainerCreating"}}),
                false,
                false
            )]);
        });
        let unpullable = self.shared.lock().unpullable.contains(&pod.image);
        if unpullable {
            self.fail_pull(&pod, &delete).await;
            return self.remove(&pod, Vec::new());
        }
        let object = self
            .shared
            .lock()
            .get("pods", &pod.ns, &pod.name)
            .cloned()
            .unwrap_or(object);
        let volumes = match self.volumes(&object) {
            Ok(volumes) => volumes,
            Err(message) => {
                self.waiting(&pod, "CreateContainerConfigError", &message);
                delete.notified().await;
                return self.remove(&pod, Vec::new());
            }
        };
        let mounts = mounts(&container, &volumes);
        let spawned = match self.resolve_env(&object, &container, &ip, &mounts) {
            Ok(env) => self.spawn(&pod, &container, &env, &mounts),
            Err(message) => {
                self.waiting(&pod, "CreateContainerConfigError", &message);
                delete.notified().await;
                return self.remove(&pod, volumes);
            }
        };
        match spawned {
            Ok(child) => self.supervise(&pod, &container, &ip, child, &delete).await,
            Err(message) => {
                self.terminated(&pod, 128, "StartError", &message, false);
                delete.notified().await;
            }
        }
        self.remove(&pod, volumes);
    }

    /// Reports `ErrImagePull`, then `ImagePullBackOff`, until the pod is deleted.
    async fn fail_pull(&self, pod: &PodRef, delete: &Notify) {
        let image = &pod.image;
        self.waiting(
            pod,
            "ErrImagePull",
            &format!("failed to pull image \"{image}\": not found (FAKE: set_unpullable)"),
        );
        tokio::select! {
            () = delete.notified() => return,
            () = tokio::time::sleep(PULL_BACKOFF_AFTER) => {}
        }
        self.waiting(
            pod,
            "ImagePullBackOff",
            &format!("Back-off pulling image \"{image}\""),
        );
        delete.notified().await;
    }

    fn waiting(&self, pod: &PodRef, reason: &str, message: &str) {
        let state = json!({"waiting": {"reason": reason, "message": message}});
        self.set_status(pod, |status| {
            status["phase"] = json!("Pending");
            status["containerStatuses"] = json!([container_status(pod, state, false, false)]);
        });
    }

    fn terminated(&self, pod: &PodRef, code: i32, reason: &str, message: &str, evicted: bool) {
        let now = now_rfc3339();
        let mut terminated = json!({
            "exitCode": code,
            "reason": reason,
            "finishedAt": now,
        });
        if !message.is_empty() {
            terminated["message"] = json!(message);
        }
        self.set_status(pod, |status| {
            if let Some(started_at) = status.pointer("/containerStatuses/0/state/running/startedAt")
            {
                terminated["startedAt"] = started_at.clone();
            }
            let state = json!({ "terminated": terminated });
            status["phase"] = json!(if code == 0 { "Succeeded" } else { "Failed" });
            status["conditions"] = conditions(false, true, &now);
            status["containerStatuses"] = json!([container_status(pod, state, false, false)]);
            if evicted {
                status["phase"] = json!("Failed");
                status["reason"] = json!("Evicted");
                status["message"] = json!("The node was low on resource: memory. ");
                if let Some(list) = status["conditions"].as_array_mut() {
                    list.push(json!({
                        "type": "DisruptionTarget",
                        "status": "True",
                        "reason": "TerminationByKubelet",
                        "message": "The node was low on resource: memory. ",
                        "lastTransitionTime": now,
                    }));
                }
            }
        });
    }

    /// The pod's volumes: name → host directory (emptyDirs are created here).
    fn volumes(&self, pod: &Value) -> Result<Vec<(String, Volume)>, String> {
        let mut volumes = Vec::new();
        for volume in pod["spec"]["volumes"].as_array().into_iter().flatten() {
            let name = str_at(volume, "/name").to_owned();
            if volume.get("emptyDir").is_some() {
                let dir = tempfile::Builder::new()
                    .prefix("fake-kubelet-emptydir-")
                    .tempdir()
                    .map_err(|e| format!("create emptyDir {name}: {e}"))?;
                std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))
                    .map_err(|e| format!("chmod emptyDir {name}: {e}"))?;
                volumes.push((name, Volume::Empty(dir)));
            } else if let Some(path) = volume.pointer("/hostPath/path").and_then(Value::as_str) {
                volumes.push((name, Volume::Host(PathBuf::from(path))));
            }
        }
        Ok(volumes)
    }

    fn resolve_env(
        &self,
        pod: &Value,
        container: &Value,
        ip: &str,
        mounts: &[(String, String)],
    ) -> Result<Vec<(String, String)>, String> {
        let ns = str_at(pod, "/metadata/namespace");
        let mut env: Vec<(String, String)> = Vec::new();
        for var in container["env"].as_array().into_iter().flatten() {
            let name = str_at(var, "/name").to_owned();
            let value = if let Some(value) = var.get("value").and_then(Value::as_str) {
                expand(value, &env)
            } else if let Some(field) = var.pointer("/valueFrom/fieldRef/fieldPath") {
                match field.as_str().unwrap_or_default() {
                    "status.podIP" => ip.to_owned(),
                    "status.hostIP" => "127.0.0.1".to_owned(),
                    "metadata.name" => str_at(pod, "/metadata/name").to_owned(),
                    "metadata.namespace" => ns.to_owned(),
                    "metadata.uid" => str_at(pod, "/metadata/uid").to_owned(),
                    "spec.nodeName" => str_at(pod, "/spec/nodeName").to_owned(),
                    other => return Err(format!("unsupported fieldPath {other:?} (FAKE kubelet)")),
                }
            } else if let Some(secret) = var.pointer("/valueFrom/secretKeyRef") {
                let (secret_name, key) = (str_at(secret, "/name"), str_at(secret, "/key"));
                let optional = secret["optional"].as_bool().unwrap_or(false);
                let store = self.shared.lock();
                let data = store.secrets.get(&(ns.to_owned(), secret_name.to_owned()));
                match (data, data.and_then(|d| d.get(key))) {
                    (_, Some(value)) => value.clone(),
                    _ if optional => continue,
                    (None, _) => return Err(format!("secret \"{secret_name}\" not found")),
                    (Some(_), None) => {
                        return Err(format!(
                            "couldn't find key {key} in Secret {ns}/{secret_name}"
                        ))
                    }
                }
            } else if var.get("valueFrom").is_some() {
                return Err(format!("unsupported valueFrom for {name} (FAKE kubelet)"));
            } else {
                String::new()
            };
            env.retain(|(n, _)| n != &name);
            env.push((name, rewrite_paths(&value, mounts)));
        }
        Ok(env)
    }

    fn spawn(
        &self,
        pod: &PodRef,
        container: &Value,
        env: &[(String, String)],
        mounts: &[(String, String)],
    ) -> Result<Child, String> {
        let strings = |key: &str| -> Vec<String> {
            container[key]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .map(|s| rewrite_paths(&expand(s, env), mounts))
                .collect()
        };
        let mut argv = strings("command");
        argv.extend(strings("args"));
        let Some((program, args)) = argv.split_first() else {
            return Err("the container has neither command nor args (FAKE kubelet)".into());
        };
        let program = self
            .shared
            .lock()
            .binaries
            .get(program)
            .cloned()
            .unwrap_or_else(|| PathBuf::from(program));
        let log_path = self
            .logs
            .path()
            .join(format!("{}_{}.log", pod.ns, pod.name));
        let log = std::fs::File::create(&log_path).map_err(|e| format!("create the log: {e}"))?;
        let log_err = log.try_clone().map_err(|e| format!("open the log: {e}"))?;
        self.shared
            .lock()
            .log_paths
            .insert(pod.name.clone(), log_path);
        let workdir = container["workingDir"]
            .as_str()
            .map_or_else(|| "/".to_owned(), |w| rewrite_paths(w, mounts));
        let mut command = Command::new(&program);
        command
            .args(args)
            .env_clear()
            .envs(
                INHERITED_ENV.iter().filter_map(|name| {
                    std::env::var_os(name).map(|value| (name.to_string(), value))
                }),
            )
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .current_dir(workdir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .process_group(0)
            .kill_on_drop(true);
        command
            .spawn()
            .map_err(|e| format!("failed to start {}: {e}", program.display()))
    }

    /// Reports the running container until it exits or the pod is deleted.
    async fn supervise(
        &self,
        pod: &PodRef,
        container: &Value,
        ip: &str,
        mut child: Child,
        delete: &Notify,
    ) {
        let Some(pid) = child.id().and_then(|id| i32::try_from(id).ok()) else {
            return;
        };
        let guard = ContainerGuard(pid);
        let key = (pod.ns.clone(), pod.name.clone());
        if let Some(ctl) = self.shared.lock().pods.get_mut(&key) {
            ctl.pgid = Some(pid);
        }
        let probe = readiness_probe(container, ip);
        let started = now_rfc3339();
        let mut ready = probe.is_none();
        let report_running = |ready: bool| {
            let state = json!({"running": {"startedAt": started}});
            let now = now_rfc3339();
            self.set_status(pod, |status| {
                status["phase"] = json!("Running");
                status["conditions"] = conditions(ready, true, &now);
                status["containerStatuses"] =
                    json!([container_status(pod, state.clone(), ready, true)]);
            });
        };
        report_running(ready);
        let mut ticks = tokio::time::interval(PROBE_PERIOD);
        let exit = loop {
            tokio::select! {
                exit = child.wait() => break exit,
                () = delete.notified() => {
                    self.stop(pod, pid, &mut child).await;
                    if let Some(ctl) = self.shared.lock().pods.get_mut(&key) {
                        ctl.pgid = None;
                    }
                    drop(guard);
                    return;
                }
                _ = ticks.tick(), if probe.is_some() => {
                    let now_ready = match &probe {
                        Some(url) => probe_http(url).await,
                        None => true,
                    };
                    if now_ready != ready {
                        ready = now_ready;
                        report_running(ready);
                    }
                }
            }
        };
        let evicted = {
            let mut store = self.shared.lock();
            store.pods.get_mut(&key).is_some_and(|ctl| {
                ctl.pgid = None;
                ctl.evicted
            })
        };
        // The container is gone: so is anything it left behind.
        drop(guard);
        let code = exit.as_ref().map_or(128, exit_code);
        let reason = if code == 0 { "Completed" } else { "Error" };
        let message = if code == 0 {
            String::new()
        } else {
            self.log_tail(&pod.name, 20)
        };
        self.terminated(pod, code, reason, &message, evicted);
        delete.notified().await;
    }

    /// SIGTERM, the grace period (capped), then SIGKILL for the whole container.
    async fn stop(&self, pod: &PodRef, pid: i32, child: &mut Child) {
        let grace = self
            .shared
            .lock()
            .pods
            .get(&(pod.ns.clone(), pod.name.clone()))
            .and_then(|c| c.grace_seconds)
            .unwrap_or(30);
        let grace = Duration::from_secs(grace.unsigned_abs()).min(MAX_GRACE);
        // SAFETY: kill(2) with a pid this kubelet spawned and has not reaped yet.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        let _ = tokio::time::timeout(grace, child.wait()).await;
        signal_container(pid, libc::SIGKILL);
        let _ = child.wait().await;
    }

    /// Forgets the pod: its directories go, then the object (a `DELETED` event).
    fn remove(&self, pod: &PodRef, volumes: Vec<(String, Volume)>) {
        drop(volumes);
        self.shared.write(|store| {
            store.pods.remove(&(pod.ns.clone(), pod.name.clone()));
            store.remove("pods", &pod.ns, &pod.name);
        });
    }

    fn log_tail(&self, name: &str, lines: usize) -> String {
        let path = self.shared.lock().log_paths.get(name).cloned();
        let text = path
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

/// A pod volume on the host.
#[derive(Debug)]
enum Volume {
    Empty(TempDir),
    Host(PathBuf),
}

impl Volume {
    fn path(&self) -> &Path {
        match self {
            Volume::Empty(dir) => dir.path(),
            Volume::Host(path) => path,
        }
    }
}

/// The container's mounts as (mountPath, host path), longest mountPath first.
fn mounts(container: &Value, volumes: &[(String, Volume)]) -> Vec<(String, String)> {
    let mut mounts: Vec<(String, String)> = container["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|mount| {
            let name = str_at(mount, "/name");
            let path = str_at(mount, "/mountPath").trim_end_matches('/');
            let (_, volume) = volumes.iter().find(|(n, _)| n == name)?;
            let mut host = volume.path().display().to_string();
            if let Some(sub) = mount["subPath"].as_str().filter(|s| !s.is_empty()) {
                host = format!("{host}/{sub}");
                let _ = std::fs::create_dir_all(&host);
            }
            (!path.is_empty()).then(|| (path.to_owned(), host))
        })
        .collect();
    mounts.sort_by_key(|(path, _)| std::cmp::Reverse(path.len()));
    mounts
}

/// Rewrites each occurrence of a mount path that stands as a path (see [`ProcessKubelet`]).
pub(crate) fn rewrite_paths(text: &str, mounts: &[(String, String)]) -> String {
    let before_ok = |c: char| c.is_whitespace() || "=:\"'<>,;|&()`".contains(c);
    let after_ok = |c: char| !(c.is_alphanumeric() || "-_.~+@".contains(c));
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    'scan: while i < text.len() {
        let rest = &text[i..];
        let prev = text[..i].chars().next_back();
        if prev.is_none_or(before_ok) {
            for (path, host) in mounts {
                if let Some(tail) = rest.strip_prefix(path.as_str()) {
                    if tail.chars().next().is_none_or(after_ok) {
                        out.push_str(host);
                        i += path.len();
                        continue 'scan;
                    }
                }
            }
        }
        let c = rest.chars().next().unwrap_or_default();
        out.push(c);
        i += c.len_utf8().max(1);
    }
    out
}

/// Kubernetes `$(VAR)` expansion: known variables are replaced, `$$` is a literal `$`, and an
/// unknown reference stays as written.
pub(crate) fn expand(text: &str, env: &[(String, String)]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(reference) = after.strip_prefix('(') {
            match reference.find(')') {
                Some(end) => {
                    let name = &reference[..end];
                    match env.iter().rev().find(|(n, _)| n == name) {
                        Some((_, value)) => out.push_str(value),
                        None => {
                            out.push_str("$(");
                            out.push_str(name);
                            out.push(')');
                        }
                    }
                    rest = &reference[end + 1..];
                }
                None => {
                    out.push('$');
                    rest = after;
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

fn str_at<'a>(value: &'a Value, pointer: &str) -> &'a str {
    value
        .pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_default()
}

fn container_status(pod: &PodRef, state: Value, ready: bool, started: bool) -> Value {
    json!({
        "name": pod.container,
        "image": pod.image,
        "imageID": "",
        "ready": ready,
        "restartCount": 0,
        "started": started,
        "state": state,
    })
}

fn conditions(ready: bool, initialized: bool, now: &str) -> Value {
    let flag = |b: bool| if b { "True" } else { "False" };
    json!([
        {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
        {"type": "Initialized", "status": flag(initialized), "lastTransitionTime": now},
        {"type": "ContainersReady", "status": flag(ready), "lastTransitionTime": now},
        {"type": "Ready", "status": flag(ready), "lastTransitionTime": now},
    ])
}

fn exit_code(status: &ExitStatus) -> i32 {
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(128)
}

/// The URL an `httpGet` readiness probe polls, if the container has one the fake supports.
fn readiness_probe(container: &Value, ip: &str) -> Option<(String, u16, String)> {
    let get = container.pointer("/readinessProbe/httpGet")?;
    let port = match &get["port"] {
        Value::Number(n) => n.as_u64().and_then(|n| u16::try_from(n).ok())?,
        Value::String(name) => container["ports"]
            .as_array()?
            .iter()
            .find(|p| p["name"].as_str() == Some(name))
            .and_then(|p| p["containerPort"].as_u64())
            .and_then(|n| u16::try_from(n).ok())?,
        _ => return None,
    };
    let host = get["host"].as_str().unwrap_or(ip).to_owned();
    let path = get["path"].as_str().unwrap_or("/").to_owned();
    Some((host, port, path))
}

/// One HTTP readiness check: a status of 200..399 within a second.
async fn probe_http((host, port, path): &(String, u16, String)) -> bool {
    let check = async {
        let mut stream = TcpStream::connect((host.as_str(), *port)).await.ok()?;
        let request = format!(
            "GET {path} HTTP/1.0\r\nHost: {host}:{port}\r\nUser-Agent: kube-probe/1.33\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut head = Vec::new();
        let mut buf = [0u8; 256];
        while !head.contains(&b'\n') && head.len() < 4096 {
            let n = stream.read(&mut buf).await.ok()?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        let line = String::from_utf8_lossy(&head);
        line.split_whitespace().nth(1)?.parse::<u16>().ok()
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(1), check).await,
        Ok(Some(200..=399))
    )
}

/// Signals a container: the process group `pgid` and every descendant of its leader (which
/// may have moved to groups of their own), as tearing down a real container would.
pub(crate) fn signal_container(pgid: i32, signal: i32) {
    for _ in 0..2 {
        for pid in container_pids(pgid) {
            // SAFETY: kill(2) on a pid read from /proc just now; at worst it has exited.
            unsafe {
                libc::kill(pid, signal);
            }
        }
        // SAFETY: killpg(2) on the group this kubelet created; at worst it is empty.
        unsafe {
            libc::killpg(pgid, signal);
        }
    }
}

/// The processes in group `pgid` or descended from its leader, from /proc.
fn container_pids(pgid: i32) -> Vec<i32> {
    let mut table: BTreeMap<i32, (i32, i32)> = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
        let Some(fields) = stat.rsplit_once(')').map(|(_, rest)| rest) else {
            continue;
        };
        let mut fields = fields.split_whitespace().skip(1);
        let ppid = fields.next().and_then(|f| f.parse().ok()).unwrap_or(0);
        let pgrp = fields.next().and_then(|f| f.parse().ok()).unwrap_or(0);
        table.insert(pid, (ppid, pgrp));
    }
    let descends = |mut pid: i32| {
        for _ in 0..64 {
            if pid == pgid {
                return true;
            }
            match table.get(&pid) {
                Some(&(ppid, _)) if ppid > 1 => pid = ppid,
                _ => return false,
            }
        }
        false
    };
    table
        .iter()
        .filter(|(&pid, &(_, pgrp))| pgrp == pgid || descends(pid))
        .map(|(&pid, _)| pid)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data() -> Vec<(String, String)> {
        vec![("/data".to_owned(), "/tmp/x".to_owned())]
    }

    #[test]
    fn mount_paths_are_rewritten_where_they_stand_as_paths() {
        let cases = [
            ("/data", "/tmp/x"),
            ("/data/", "/tmp/x/"),
            ("/data/f", "/tmp/x/f"),
            ("--dir=/data/pg", "--dir=/tmp/x/pg"),
            (
                "echo x > /data/f && cat /data/f",
                "echo x > /tmp/x/f && cat /tmp/x/f",
            ),
            ("'/data'", "'/tmp/x'"),
            ("/database", "/database"),
            ("/var/data", "/var/data"),
            ("/data.bak", "/data.bak"),
            ("ünï /data", "ünï /tmp/x"),
        ];
        for (input, want) in cases {
            assert_eq!(rewrite_paths(input, &data()), want, "{input}");
        }
    }

    #[test]
    fn dollar_paren_references_expand_like_kubernetes() {
        let env = vec![("POD_IP".to_owned(), "127.0.0.9".to_owned())];
        assert_eq!(expand("--bind $(POD_IP) x", &env), "--bind 127.0.0.9 x");
        assert_eq!(expand("$(MISSING)", &env), "$(MISSING)");
        assert_eq!(expand("$$(POD_IP) $5 $", &env), "$(POD_IP) $5 $");
        assert_eq!(expand("$(POD_IP", &env), "$(POD_IP");
    }
}
