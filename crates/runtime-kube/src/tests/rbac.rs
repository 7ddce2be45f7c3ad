//! The Role is exactly what the code calls: a whole scenario (the watcher's list and watch,
//! creating, listing and deleting pods, the Lease) runs against a small in-memory API server,
//! every request must be granted by `rbac::PERMISSIONS`, and every granted verb must be used.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::{json, Value};
use taidon_runtime::{Health, Runtime};

use super::fixtures::{build_pod, cluster, iid, settings, state, to_json};
use super::lease::{leader, LEASE, LEASES};
use super::mock::{mock_client, within, Access, ApiServer, Exchange};
use super::runtime::PODS;
use crate::lease::Attempt;
use crate::pods;
use crate::rbac::PERMISSIONS;
use crate::runtime::KubernetesRuntime;

/// Granted, and not called by the code (none now). Each entry must stay granted and unused:
/// removing it from the Role means removing it here.
const GRANTED_UNUSED: &[(&str, &str, &str)] = &[];

/// A namespace's pods and Leases, enough for the runtime: creates make pods the kubelet at
/// once reports ready, and the watch streams every change.
#[derive(Default)]
struct FakeApiServer {
    pods: BTreeMap<String, Value>,
    leases: BTreeMap<String, Value>,
    version: u64,
    /// Watch events not yet sent.
    events: Vec<Value>,
    /// A watch waiting for events.
    parked: Option<Exchange>,
}

impl FakeApiServer {
    fn bump(&mut self, object: &mut Value) {
        self.version += 1;
        object["metadata"]["resourceVersion"] = json!(self.version.to_string());
    }

    fn emit(&mut self, kind: &str, object: Value) {
        self.events.push(json!({"type": kind, "object": object}));
        if let Some(watch) = self.parked.take() {
            self.flush(watch);
        }
    }

    /// Sends the pending events as one watch response (the watcher then watches again).
    fn flush(&mut self, watch: Exchange) {
        let mut bytes = Vec::new();
        for event in self.events.drain(..) {
            bytes.extend(serde_json::to_vec(&event).expect("JSON"));
            bytes.push(b'\n');
        }
        watch.reply_bytes(200, bytes);
    }

    fn serve(&mut self, ex: Exchange) {
        let path = ex.call.path.clone();
        let name = path.rsplit('/').next().unwrap_or_default().to_owned();
        match (ex.call.method.as_str(), path.as_str()) {
            ("GET", PODS) if ex.call.param("watch").as_deref() == Some("true") => {
                if self.events.is_empty() {
                    self.parked = Some(ex);
                } else {
                    self.flush(ex);
                }
            }
            ("GET", PODS) => {
                assert_eq!(
                    ex.call.param("labelSelector").as_deref(),
                    Some(pods::SELECTOR)
                );
                let items: Vec<Value> = self.pods.values().cloned().collect();
                ex.reply(
                    200,
                    &json!({
                        "apiVersion": "v1",
                        "kind": "PodList",
                        "metadata": {"resourceVersion": self.version.to_string()},
                        "items": items,
                    }),
                );
            }
            ("POST", PODS) => {
                let mut pod = ex.body.clone();
                let name = pod["metadata"]["name"].as_str().expect("a name").to_owned();
                if self.pods.contains_key(&name) {
                    return ex.fail(409, "AlreadyExists", "already exists");
                }
                pod["metadata"]["uid"] = json!(format!("uid-{name}"));
                pod["status"] = super::fixtures::running_ready("10.0.9.9");
                self.bump(&mut pod);
                self.pods.insert(name, pod.clone());
                ex.reply(201, &pod);
                self.emit("ADDED", pod);
            }
            ("DELETE", _) if path.starts_with(PODS) => match self.pods.remove(&name) {
                Some(mut pod) => {
                    self.bump(&mut pod);
                    ex.reply(200, &pod);
                    self.emit("DELETED", pod);
                }
                None => ex.fail(404, "NotFound", &format!("pods \"{name}\" not found")),
            },
            ("GET", LEASE) => match self.leases.get(&name) {
                Some(lease) => ex.reply(200, lease),
                None => ex.fail(404, "NotFound", "not found"),
            },
            ("POST", LEASES) => {
                let mut lease = ex.body.clone();
                let name = lease["metadata"]["name"]
                    .as_str()
                    .expect("a name")
                    .to_owned();
                if self.leases.contains_key(&name) {
                    return ex.fail(409, "AlreadyExists", "already exists");
                }
                self.bump(&mut lease);
                self.leases.insert(name, lease.clone());
                ex.reply(201, &lease);
            }
            ("PUT", LEASE) => {
                let current = self.leases.get(&name).cloned().unwrap_or_default();
                let mut lease = ex.body.clone();
                if lease["metadata"]["resourceVersion"] != current["metadata"]["resourceVersion"] {
                    return ex.fail(409, "Conflict", "the object has been modified");
                }
                self.bump(&mut lease);
                self.leases.insert(name, lease.clone());
                ex.reply(200, &lease);
            }
            _ => panic!("the fake API server cannot answer {:?}", ex.call),
        }
    }
}

/// Serves `api` from `fake` until every client is gone.
async fn serve(api: &mut ApiServer, fake: &mut FakeApiServer) {
    while let Some(ex) = api.receive().await {
        fake.serve(ex);
    }
}

#[tokio::test]
async fn the_role_grants_exactly_what_the_code_calls() {
    let (client, mut api) = mock_client();
    // A build pod a crashed controller left.
    let mut fake = FakeApiServer::default();
    let leftover = format!("taidon-b-{}-0000aa", state(0x21).short());
    let mut pod = to_json(&build_pod(&leftover, state(0x21), None));
    fake.bump(&mut pod);
    fake.pods.insert(leftover.clone(), pod);

    let runtime = KubernetesRuntime {
        cluster: cluster(client.clone(), settings()),
    };
    // The watcher, as `connect` starts it: the runtime waits for its first listing.
    let watching = runtime.cluster.spawn_watch();
    // One task: a failed assertion in the fake API server fails the test at once.
    tokio::select! {
        () = scenario(&runtime, client) => {}
        () = serve(&mut api, &mut fake) => panic!("the clients went away"),
    }
    watching.abort();
    let accesses: Vec<Access> = api.calls.iter().map(|c| c.access()).collect();

    // Every request was granted (checked as each arrived); every grant was used.
    let used: BTreeSet<(String, String, String)> = accesses
        .iter()
        .map(|a| (a.group.clone(), a.resource.clone(), a.verb.to_owned()))
        .collect();
    let mut unused = Vec::new();
    for p in PERMISSIONS {
        for verb in p.verbs {
            let key = (
                p.group.to_owned(),
                p.resource.to_owned(),
                (*verb).to_owned(),
            );
            let excused = GRANTED_UNUSED.contains(&(p.group, p.resource, verb));
            match (used.contains(&key), excused) {
                (false, false) => unused.push(format!("{verb} {}", p.resource)),
                (true, true) => panic!(
                    "{verb} {} is used now: remove it from GRANTED_UNUSED",
                    p.resource
                ),
                _ => {}
            }
        }
    }
    assert!(
        unused.is_empty(),
        "rbac::PERMISSIONS grants what no request used: {unused:?} (used: {used:?})"
    );
    for (group, resource, verb) in GRANTED_UNUSED {
        assert!(
            PERMISSIONS
                .iter()
                .any(|p| p.group == *group && p.resource == *resource && p.verbs.contains(verb)),
            "{verb} {resource} is no longer granted: remove it from GRANTED_UNUSED"
        );
    }
}

/// Every call the controller makes to the API server, once.
async fn scenario(runtime: &KubernetesRuntime, client: kube::Client) {
    runtime.cluster.synced().await.unwrap();
    // An instance: created, then seen ready through the watch.
    let mut instance = within(runtime.start_instance(iid(0x31), state(0x31)))
        .await
        .expect("an instance");
    assert_eq!(instance.endpoint().host, "10.0.9.9");
    assert_eq!(instance.health(), Health::Running);
    // After a restart: the leftover build pod goes, the instance stays.
    let leftover = format!("pod taidon-b-{}-0000aa", state(0x21).short());
    let ended = within(runtime.end_unadopted(&[iid(0x31)]))
        .await
        .expect("ended");
    assert_eq!(ended, vec![leftover]);
    // Removed; its deletion reaches the watch; removed again (a 404).
    within(runtime.remove_instance(iid(0x31)))
        .await
        .expect("removed");
    within(async {
        while runtime
            .cluster
            .seen(&pods::instance_pod_name(&iid(0x31)))
            .is_some()
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(matches!(instance.health(), Health::Exited { .. }));
    within(runtime.remove_instance(iid(0x31)))
        .await
        .expect("removed twice");
    // The Lease: created, refused to another, renewed.
    let ours = leader(client.clone(), "controller-a");
    let theirs = leader(client, "controller-b");
    assert_eq!(
        within(ours.try_acquire()).await.expect("acquired"),
        Attempt::Held
    );
    assert_eq!(
        within(theirs.try_acquire()).await.expect("looked"),
        Attempt::HeldBy("controller-a".into())
    );
    assert_eq!(
        within(ours.try_acquire()).await.expect("renewed"),
        Attempt::Held
    );
}

#[test]
fn accesses_read_from_requests() {
    use super::mock::Call;
    let access = |method: &str, path: &str, query: &str| {
        let a = Call {
            method: method.into(),
            path: path.into(),
            query: query.into(),
        }
        .access();
        format!("{} {}/{}", a.verb, a.group, a.resource)
    };
    assert_eq!(access("GET", PODS, "labelSelector=a%3Db"), "list /pods");
    assert_eq!(
        access(
            "GET",
            PODS,
            "&watch=true&timeoutSeconds=290&allowWatchBookmarks=true"
        ),
        "watch /pods"
    );
    assert_eq!(access("GET", &format!("{PODS}/p"), ""), "get /pods");
    assert_eq!(access("POST", PODS, ""), "create /pods");
    assert_eq!(access("DELETE", &format!("{PODS}/p"), ""), "delete /pods");
    assert_eq!(access("DELETE", PODS, ""), "deletecollection /pods");
    assert_eq!(
        access("PUT", LEASE, ""),
        "update coordination.k8s.io/leases"
    );
    assert_eq!(
        access("PATCH", LEASE, ""),
        "patch coordination.k8s.io/leases"
    );
}
