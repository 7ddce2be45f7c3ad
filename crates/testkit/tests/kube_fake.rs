//! The FAKE Kubernetes API server and its process kubelet, driven by the real kube-rs client.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use futures_util::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, ListParams, PostParams, WatchEvent, WatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::watcher;
use kube::{Api, Client, Config};
use serde_json::json;
use taidon_testkit::kube::FakeApiServer;

const NS: &str = "taidon";

/// A client for `server` through a kubeconfig file, as `Config::infer()` would read it.
async fn client(server: &FakeApiServer) -> (Client, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubeconfig");
    server.write_kubeconfig(&path, NS).unwrap();
    let kubeconfig = Kubeconfig::read_from(&path).unwrap();
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap();
    assert_eq!(config.cluster_url.scheme_str(), Some("http"));
    assert_eq!(config.default_namespace, NS);
    (Client::try_from(config).unwrap(), dir)
}

fn pod(name: &str, app: &str, script: &str) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": app}},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 2,
            "containers": [{
                "name": "main",
                "image": "busybox:fake",
                "command": ["sh", "-c", script],
            }],
        },
    }))
    .unwrap()
}

fn phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("")
}

fn condition(pod: &Pod, kind: &str) -> Option<String> {
    pod.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == kind)
        .map(|c| c.status.clone())
}

fn container_state(pod: &Pod) -> k8s_openapi::api::core::v1::ContainerState {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.first())
        .and_then(|c| c.state.clone())
        .unwrap_or_default()
}

/// Polls the pod until `check` holds; on timeout, panics with its last state and its logs.
async fn wait_pod(
    server: &FakeApiServer,
    api: &Api<Pod>,
    name: &str,
    what: &str,
    check: impl Fn(&Pod) -> bool,
) -> Pod {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let current = api.get_opt(name).await.unwrap();
        if let Some(pod) = &current {
            if check(pod) {
                return pod.clone();
            }
        }
        if Instant::now() > deadline {
            panic!(
                "pod {name} never became {what}; last state: {current:#?}\nlogs:\n{}",
                server.logs(name)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_gone(server: &FakeApiServer, api: &Api<Pod>, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while api.get_opt(name).await.unwrap().is_some() {
        assert!(
            Instant::now() < deadline,
            "pod {name} was never removed; logs:\n{}",
            server.logs(name)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_logs(server: &FakeApiServer, name: &str, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let logs = server.logs(name);
        if logs.contains(needle) {
            return logs;
        }
        assert!(
            Instant::now() < deadline,
            "{name}'s logs never showed {needle:?}:\n{logs}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn process_alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            let state = stat
                .rsplit_once(')')
                .map(|(_, r)| r.trim_start())
                .unwrap_or("");
            !state.starts_with('Z') && !state.starts_with('X')
        })
        .unwrap_or(false)
}

async fn next_event<S>(events: &mut S) -> watcher::Event<Pod>
where
    S: futures_util::Stream<Item = Result<watcher::Event<Pod>, watcher::Error>> + Unpin,
{
    tokio::time::timeout(Duration::from_secs(10), events.try_next())
        .await
        .expect("a watcher event in time")
        .unwrap()
        .expect("the watcher goes on")
}

fn api_error(err: kube::Error) -> kube::core::Status {
    match err {
        kube::Error::Api(status) => *status,
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test]
async fn a_pod_is_created_runs_on_its_own_address_and_is_deleted() {
    let server = FakeApiServer::start().await;
    let (client, _dir) = client(&server).await;
    let pods: Api<Pod> = Api::default_namespaced(client);
    // `$$` is Kubernetes' escape for `$`: the shell sees `$$`, its pid.
    let script = "echo hi; echo pid=$$$$; sleep 30";
    let created = pods
        .create(&PostParams::default(), &pod("life", "life", script))
        .await
        .unwrap();
    let meta = &created.metadata;
    assert!(meta.uid.is_some() && meta.resource_version.is_some());
    assert!(meta.creation_timestamp.is_some());
    assert_eq!(meta.namespace.as_deref(), Some(NS));
    let again = pods
        .create(&PostParams::default(), &pod("life", "life", script))
        .await
        .unwrap_err();
    let status = api_error(again);
    assert_eq!(
        (status.code, status.reason.as_str()),
        (409, "AlreadyExists")
    );

    let running = wait_pod(&server, &pods, "life", "Running", |p| phase(p) == "Running").await;
    let ip = running.status.as_ref().unwrap().pod_ip.clone().unwrap();
    assert!(
        ip.starts_with("127.") && !ip.starts_with("127.0.0."),
        "{ip}"
    );
    assert_eq!(condition(&running, "Ready").as_deref(), Some("True"));
    assert!(container_state(&running).running.is_some());

    let listed = pods
        .list(&ListParams::default().labels("app=life"))
        .await
        .unwrap();
    assert_eq!(listed.items.len(), 1);
    assert!(pods
        .list(&ListParams::default().labels("app=other"))
        .await
        .unwrap()
        .items
        .is_empty());
    assert_eq!(server.pods(NS).len(), 1);

    let logs = wait_logs(&server, "life", "pid=").await;
    assert!(logs.starts_with("hi\n"), "{logs}");
    let pid: i32 = logs
        .lines()
        .find_map(|l| l.strip_prefix("pid="))
        .unwrap()
        .parse()
        .unwrap();
    assert!(process_alive(pid));

    let deleted = pods.delete("life", &DeleteParams::default()).await.unwrap();
    let deleting = deleted.left().expect("the deleted pod, not a Status");
    assert!(deleting.metadata.deletion_timestamp.is_some());
    wait_gone(&server, &pods, "life").await;
    assert!(!process_alive(pid), "the pod's shell {pid} outlived it");
    assert!(server.pod(NS, "life").is_none());

    let requests = server.requests();
    for verb in ["create", "get", "list", "delete"] {
        assert!(
            requests.contains(&(verb.to_owned(), "pods".to_owned())),
            "{verb}: {requests:?}"
        );
    }
}

#[tokio::test]
async fn a_watcher_sees_pods_come_and_go() {
    let server = FakeApiServer::start().await;
    let (client, _dir) = client(&server).await;
    let pods: Api<Pod> = Api::default_namespaced(client);
    pods.create(&PostParams::default(), &pod("other", "y", "sleep 30"))
        .await
        .unwrap();
    let mut events = watcher(pods.clone(), watcher::Config::default().labels("app=x")).boxed();
    assert!(matches!(
        next_event(&mut events).await,
        watcher::Event::Init
    ));
    assert!(matches!(
        next_event(&mut events).await,
        watcher::Event::InitDone
    ));
    pods.create(&PostParams::default(), &pod("watched", "x", "sleep 30"))
        .await
        .unwrap();
    let mut saw_running = false;
    loop {
        match next_event(&mut events).await {
            watcher::Event::Apply(p) => {
                assert_eq!(p.metadata.name.as_deref(), Some("watched"));
                if phase(&p) == "Running" && !saw_running {
                    saw_running = true;
                    pods.delete("watched", &DeleteParams::default())
                        .await
                        .unwrap();
                }
            }
            watcher::Event::Delete(p) => {
                assert_eq!(p.metadata.name.as_deref(), Some("watched"));
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(saw_running);

    // The raw watch API too: from a list's resourceVersion, with a timeout.
    let list = pods.list(&ListParams::default()).await.unwrap();
    let version = list.metadata.resource_version.unwrap();
    let mut stream = pods
        .watch(&WatchParams::default().labels("app=y").timeout(2), &version)
        .await
        .unwrap()
        .boxed();
    pods.delete("other", &DeleteParams::default())
        .await
        .unwrap();
    let first = stream.try_next().await.unwrap().unwrap();
    assert!(matches!(first, WatchEvent::Modified(_)), "{first:?}");
    let requests = server.requests();
    assert!(requests.contains(&("watch".to_owned(), "pods".to_owned())));
}

#[tokio::test]
async fn readiness_follows_the_http_probe() {
    if std::process::Command::new("python3")
        .arg("--version")
        .output()
        .is_err()
    {
        taidon_testkit::prerequisite_missing("readiness_follows_the_http_probe", "no python3");
        return;
    }
    let server = FakeApiServer::start().await;
    let (client, _dir) = client(&server).await;
    let pods: Api<Pod> = Api::default_namespaced(client);
    let web: Pod = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {
            "restartPolicy": "Never",
            "containers": [{
                "name": "web",
                "image": "python:fake",
                // Serve only after a moment, so the pod is first Running but not Ready.
                "command": ["sh", "-c", "sleep 0.5; exec python3 -m http.server --bind \"$1\" 8080", "sh", "$(POD_IP)"],
                "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
                "readinessProbe": {"httpGet": {"path": "/", "port": 8080}},
            }],
        },
    }))
    .unwrap();
    pods.create(&PostParams::default(), &web).await.unwrap();
    let running = wait_pod(&server, &pods, "web", "Running", |p| phase(p) == "Running").await;
    assert_eq!(condition(&running, "Ready").as_deref(), Some("False"));
    let ready = wait_pod(&server, &pods, "web", "Ready", |p| {
        condition(p, "Ready").as_deref() == Some("True")
    })
    .await;
    assert_eq!(
        condition(&ready, "ContainersReady").as_deref(),
        Some("True")
    );
    let ip = ready.status.unwrap().pod_ip.unwrap();
    assert_ne!(ip, "127.0.0.1");
}

#[tokio::test]
async fn a_failing_process_fails_the_pod_with_its_output() {
    let server = FakeApiServer::start().await;
    let (client, _dir) = client(&server).await;
    let pods: Api<Pod> = Api::default_namespaced(client);
    let script = "echo to-stdout; echo to-stderr >&2; exit 3";
    pods.create(&PostParams::default(), &pod("three", "f", script))
        .await
        .unwrap();
    let failed = wait_pod(&server, &pods, "three", "Failed", |p| phase(p) == "Failed").await;
    let terminated = container_state(&failed).terminated.unwrap();
    assert_eq!(terminated.exit_code, 3);
    assert_eq!(terminated.reason.as_deref(), Some("Error"));
    let message = terminated.message.unwrap_or_default();
    assert!(
        message.contains("to-stdout") && message.contains("to-stderr"),
        "{message}"
    );
    assert_eq!(condition(&failed, "Ready").as_deref(), Some("False"));

    pods.create(&PostParams::default(), &pod("zero", "f", "true"))
        .await
        .unwrap();
    let done = wait_pod(&server, &pods, "zero", "Succeeded", |p| {
        phase(p) == "Succeeded"
    })
    .await;
    let terminated = container_state(&done).terminated.unwrap();
    assert_eq!(
        (terminated.exit_code, terminated.reason.as_deref()),
        (0, Some("Completed"))
    );
    // A pod with no process left goes at once.
    pods.delete("three", &DeleteParams::default())
        .await
        .unwrap();
    wait_gone(&server, &pods, "three").await;
}

#[tokio::test]
async fn denied_verbs_are_forbidden_like_rbac() {
    let server = FakeApiServer::start().await;
    let (client, _dir) = client(&server).await;
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    server.deny("create", "pods");
    let err = pods
        .create(&PostParams::default(), &pod("nope", "d", "true"))
        .await
        .unwrap_err();
    let status = api_error(err);
    assert_eq!(status.code, 403);
    assert_eq!(status.reason, "Forbidden");
    assert_eq!(
        status.message,
        "pods is forbidden: User \"system:serviceaccount:taidon:taidon-controller\" cannot \
         create resource \"pods\" in API group \"\" in the namespace \"taidon\""
    );
    assert!(server.pods(NS).is_empty());

    server.deny("update", "leases");
    let leases: Api<Lease> = Api::default_namespaced(client);
    let lease: Lease = serde_json::from_value(json!({"metadata": {"name": "leader"}})).unwrap();
    let lease = leases.create(&PostParams::default(), &lease).await.unwrap();
    let err = leases
        .replace("leader", &PostParams::default(), &lease)
        .await
        .unwrap_err();
    let status = api_error(err);
    assert_eq!(status.code, 403);
    assert!(
        status
            .message
            .contains("cannot update resource \"leases\" in API group \"coordination.k8s.io\""),
        "{}",
        status.message
    );
}

#[tokio::test]
async fn an_unpullable_image_backs_off() {
    let server = FakeApiServer::start().await;
    let (client, _dir) = client(&server).await;
    let pods: Api<Pod> = Api::default_namespaced(client);
    server.set_unpullable("ghcr.io/nowhere/nothing:1");
    let mut spec = pod("pull", "p", "true");
    spec.spec.as_mut().unwrap().containers[0].image = Some("ghcr.io/nowhere/nothing:1".into());
    pods.create(&PostParams::default(), &spec).await.unwrap();
    let stuck = wait_pod(&server, &pods, "pull", "ImagePullBackOff", |p| {
        container_state(p)
            .waiting
            .is_some_and(|w| w.reason.as_deref() == Some("ImagePullBackOff"))
    })
    .await;
    assert_eq!(phase(&stuck), "Pending");
    assert_eq!(condition(&stuck, "PodScheduled").as_deref(), Some("True"));
    let waiting = container_state(&stuck).waiting.unwrap();
    assert_eq!(
        waiting.message.as_deref(),
        Some("Back-off pulling image \"ghcr.io/nowhere/nothing:1\"")
    );
    pods.delete("pull", &DeleteParams::default()).await.unwrap();
    wait_gone(&server, &pods, "pull").await;
}

#[tokio::test]
async fn leases_replace_with_optimistic_concurrency() {
    let server = FakeApiServer::start().await;
    let (client, _dir) = client(&server).await;
    let leases: Api<Lease> = Api::default_namespaced(client);
    let lease: Lease = serde_json::from_value(json!({
        "metadata": {"name": "leader"},
        "spec": {"holderIdentity": "a", "leaseDurationSeconds": 15},
    }))
    .unwrap();
    let created = leases.create(&PostParams::default(), &lease).await.unwrap();
    let mut fetched = leases.get("leader").await.unwrap();
    assert_eq!(
        fetched.metadata.resource_version,
        created.metadata.resource_version
    );
    fetched.spec.as_mut().unwrap().holder_identity = Some("b".into());
    let replaced = leases
        .replace("leader", &PostParams::default(), &fetched)
        .await
        .unwrap();
    assert_eq!(replaced.spec.unwrap().holder_identity.as_deref(), Some("b"));
    assert_ne!(
        replaced.metadata.resource_version,
        created.metadata.resource_version
    );
    // `fetched` now carries a stale resourceVersion.
    let err = leases
        .replace("leader", &PostParams::default(), &fetched)
        .await
        .unwrap_err();
    let status = api_error(err);
    assert_eq!((status.code, status.reason.as_str()), (409, "Conflict"));
    let missing = api_error(leases.get("nobody").await.unwrap_err());
    assert_eq!((missing.code, missing.reason.as_str()), (404, "NotFound"));
    let requests = server.requests();
    for verb in ["create", "get", "update"] {
        assert!(
            requests.contains(&(verb.to_owned(), "leases".to_owned())),
            "{verb}"
        );
    }
}

#[tokio::test]
async fn deleting_a_missing_pod_is_not_found() {
    let server = FakeApiServer::start().await;
    let (client, _dir) = client(&server).await;
    let pods: Api<Pod> = Api::default_namespaced(client);
    let err = pods
        .delete("ghost", &DeleteParams::default())
        .await
        .unwrap_err();
    let status = api_error(err);
    assert_eq!((status.code, status.reason.as_str()), (404, "NotFound"));
    assert_eq!(status.message, "pods \"ghost\" not found");
}

#[tokio::test]
async fn empty_dir_paths_are_rewritten_to_a_private_directory() {
    let server = FakeApiServer::start().await;
    let (client, _dir) = client(&server).await;
    let pods: Api<Pod> = Api::default_namespaced(client);
    assert!(
        !Path::new("/data/f").exists(),
        "the host already has /data/f"
    );
    let spec: Pod = serde_json::from_value(json!({
        "metadata": {"name": "disk"},
        "spec": {
            "restartPolicy": "Never",
            "volumes": [{"name": "data", "emptyDir": {}}],
            "containers": [{
                "name": "main",
                "image": "busybox:fake",
                "command": ["sh", "-c", "echo x > /data/f && cat /data/f && echo dir=$DATA_DIR && sleep 30"],
                "env": [{"name": "DATA_DIR", "value": "/data/pg"}],
                "volumeMounts": [{"name": "data", "mountPath": "/data"}],
            }],
        },
    }))
    .unwrap();
    pods.create(&PostParams::default(), &spec).await.unwrap();
    let logs = wait_logs(&server, "disk", "dir=").await;
    assert!(logs.starts_with("x\n"), "{logs}");
    let host_dir = logs
        .lines()
        .find_map(|l| l.strip_prefix("dir="))
        .unwrap()
        .trim_end_matches("/pg")
        .to_owned();
    assert_ne!(host_dir, "/data");
    assert_eq!(
        std::fs::read_to_string(format!("{host_dir}/f")).unwrap(),
        "x\n"
    );
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&host_dir).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o777);
    assert!(
        !Path::new("/data/f").exists(),
        "the pod wrote to the real /data"
    );
    pods.delete("disk", &DeleteParams::default()).await.unwrap();
    wait_gone(&server, &pods, "disk").await;
    assert!(
        !Path::new(&host_dir).exists(),
        "the emptyDir outlived its pod"
    );
}

#[tokio::test]
async fn crashes_evictions_secrets_and_dropping_the_server() {
    let server = FakeApiServer::start().await;
    let (client, _dir) = client(&server).await;
    let pods: Api<Pod> = Api::default_namespaced(client);

    server.put_secret(
        NS,
        "creds",
        BTreeMap::from([("password".into(), "s3cret".into())]),
    );
    let with_secret = |name: &str, secret: &str| -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {
                "restartPolicy": "Never",
                "containers": [{
                    "name": "main",
                    "image": "busybox:fake",
                    "command": ["sh", "-c", "echo pw=$PW name=$NAME; echo pid=$$$$; sleep 30"],
                    "env": [
                        {"name": "PW", "valueFrom": {"secretKeyRef": {"name": secret, "key": "password"}}},
                        {"name": "NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                    ],
                }],
            },
        }))
        .unwrap()
    };
    pods.create(&PostParams::default(), &with_secret("crash", "creds"))
        .await
        .unwrap();
    pods.create(&PostParams::default(), &with_secret("evicted", "creds"))
        .await
        .unwrap();
    pods.create(&PostParams::default(), &with_secret("nosecret", "missing"))
        .await
        .unwrap();
    pods.create(&PostParams::default(), &with_secret("left", "creds"))
        .await
        .unwrap();
    let logs = wait_logs(&server, "crash", "pid=").await;
    assert!(logs.contains("pw=s3cret name=crash"), "{logs}");
    wait_pod(&server, &pods, "crash", "Running", |p| {
        phase(p) == "Running"
    })
    .await;
    assert!(server.kill_pod_process("crash"));
    let crashed = wait_pod(&server, &pods, "crash", "Failed", |p| phase(p) == "Failed").await;
    assert_eq!(container_state(&crashed).terminated.unwrap().exit_code, 137);
    assert!(!server.kill_pod_process("crash"));

    wait_pod(&server, &pods, "evicted", "Running", |p| {
        phase(p) == "Running"
    })
    .await;
    assert!(server.evict("evicted"));
    let evicted = wait_pod(&server, &pods, "evicted", "Failed", |p| {
        phase(p) == "Failed"
    })
    .await;
    let status = evicted.status.unwrap();
    assert_eq!(status.reason.as_deref(), Some("Evicted"));
    assert!(status.message.unwrap().contains("low on resource: memory"));

    let stuck = wait_pod(&server, &pods, "nosecret", "stuck", |p| {
        container_state(p)
            .waiting
            .is_some_and(|w| w.reason.as_deref() == Some("CreateContainerConfigError"))
    })
    .await;
    assert_eq!(phase(&stuck), "Pending");

    let logs = wait_logs(&server, "left", "pid=").await;
    let pid: i32 = logs
        .lines()
        .find_map(|l| l.strip_prefix("pid="))
        .unwrap()
        .parse()
        .unwrap();
    assert!(process_alive(pid));
    drop(server);
    assert!(
        !process_alive(pid),
        "a pod's process {pid} outlived the fake"
    );
}

#[tokio::test]
async fn config_infer_reads_the_kubeconfig_and_binaries_are_mapped() {
    let server = FakeApiServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubeconfig");
    server.write_kubeconfig(&path, NS).unwrap();
    // `Config::infer` reads KUBECONFIG: set it under the testkit's environment lock, on a
    // runtime of its own (the closure is synchronous).
    let vars = [("KUBECONFIG".to_owned(), path.display().to_string())];
    let config = taidon_testkit::with_env(&vars, || {
        std::thread::scope(|s| {
            s.spawn(|| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap()
                    .block_on(Config::infer())
            })
            .join()
            .unwrap()
        })
    })
    .unwrap();
    assert_eq!(config.cluster_url.to_string(), format!("{}/", server.url()));
    let pods: Api<Pod> = Api::default_namespaced(Client::try_from(config).unwrap());

    server.with_binary("taidon", Path::new("/bin/sh"));
    let mut spec = pod("mapped", "m", "echo mapped-binary");
    spec.spec.as_mut().unwrap().containers[0].command = Some(vec![
        "taidon".into(),
        "-c".into(),
        "echo mapped-binary".into(),
    ]);
    pods.create(&PostParams::default(), &spec).await.unwrap();
    wait_pod(&server, &pods, "mapped", "Succeeded", |p| {
        phase(p) == "Succeeded"
    })
    .await;
    assert_eq!(server.logs("mapped"), "mapped-binary\n");
}
