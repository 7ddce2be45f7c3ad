//! The requests each runtime call sends, and how the pods the watcher shows read as
//! instance states and start failures.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde_json::{json, Value};
use taidon_core::DataArea;
use taidon_runtime::{Endpoint, Exit, Health, Instance, Runtime};

use super::fixtures::{
    build_pod, evicted, failed_with_exit_1, iid, image_pull_back_off, impatient_runtime,
    instance_pod, pending, running_ready, runtime, state, to_json, unschedulable, with_status,
};
use super::golden::golden;
use super::mock::{mock_client, within, ApiServer, Exchange};
use crate::cluster::Cluster;
use crate::pods::{self, SELECTOR};
use crate::runtime::KubernetesRuntime;

pub(crate) const PODS: &str = "/api/v1/namespaces/taidon/pods";

fn pod_path(name: &str) -> String {
    format!("{PODS}/{name}")
}

const QUIET: Duration = Duration::from_millis(100);

/// Answers a create as the API server does: the pod, with a uid, a resourceVersion and a
/// Pending status. Returns what it answered.
fn accept_create(create: Exchange) -> Pod {
    let mut pod: Pod = serde_json::from_value(create.body.clone()).expect("a Pod");
    let name = pod.metadata.name.clone().expect("a name");
    pod.metadata.uid = Some(format!("uid-{name}"));
    pod.metadata.resource_version = Some("100".into());
    let pod = with_status(pod, pending());
    create.reply(201, &to_json(&pod));
    pod
}

/// The delete of a pod that failed to start: at once (grace 0), answered with the pod.
async fn expect_cleanup(api: &mut ApiServer, name: &str) {
    let delete = api.expect("DELETE", &pod_path(name)).await;
    assert_eq!(
        delete.body["gracePeriodSeconds"],
        json!(0),
        "{:?}",
        delete.body
    );
    delete.reply(
        200,
        &json!({"kind": "Pod", "apiVersion": "v1", "metadata": {"name": name}}),
    );
}

/// An instance adopted from a pod that is up, with no request sent.
async fn adopt(runtime: &KubernetesRuntime, cluster: &Cluster, n: u8) -> Box<dyn Instance> {
    cluster.see(instance_pod(iid(n), state(n), running_ready("10.0.0.9")));
    within(runtime.start_instance(iid(n), state(n)))
        .await
        .expect("adopted")
}

#[tokio::test]
async fn start_instance_creates_the_golden_pod_and_serves_on_its_ip() {
    let (client, mut api) = mock_client();
    let (runtime, cluster) = runtime(client);
    let kubelet = async {
        let create = api.expect("POST", PODS).await;
        assert_eq!(create.call.param("dryRun"), None);
        assert_eq!(
            create.body,
            golden("instance"),
            "the pod created differs from tests/golden/instance_pod.json"
        );
        let created = accept_create(create);
        cluster.see(created.clone());
        tokio::time::sleep(Duration::from_millis(20)).await;
        cluster.see(with_status(created, running_ready("10.0.7.7")));
    };
    let (started, ()) = tokio::join!(
        within(runtime.start_instance(iid(0x1a), state(0x5a))),
        kubelet
    );
    let mut instance = started.expect("started");
    assert_eq!(
        instance.endpoint(),
        Endpoint {
            host: "10.0.7.7".into(),
            port: 5432
        }
    );
    assert_eq!(instance.health(), Health::Running);
    api.expect_silence(QUIET).await;
}

#[tokio::test]
async fn builds_create_their_golden_pods() {
    let (client, mut api) = mock_client();
    let (runtime, cluster) = runtime(client);
    let golden_pods = super::golden::golden_pods();
    for (kind, pod) in &golden_pods[1..] {
        let name = pod.metadata.name.clone().expect("a name");
        let state =
            pod.metadata.annotations.as_ref().expect("annotations")[pods::ANNOTATION_STATE].clone();
        let kubelet = async {
            let create = api.expect("POST", PODS).await;
            assert_eq!(
                create.body,
                golden(kind),
                "the {kind} pod created differs from its golden file"
            );
            let created = accept_create(create);
            cluster.see(with_status(created, running_ready("10.0.8.8")));
        };
        if *kind == "build" {
            let parent = super::fixtures::state(0x5a);
            let area = DataArea::named(format!("pod:{name}:{state}:{parent}"));
            let (built, ()) = tokio::join!(
                within(runtime.start_build(state.parse().expect("a state id"), &area)),
                kubelet
            );
            built.expect("a build server");
        } else {
            let area = DataArea::named(format!("pod:{name}:{state}:initdb"));
            // The recipe's settings travel to the initdb pod (see the golden file).
            let mut engine = runtime.engine().clone();
            engine
                .settings
                .insert("max_prepared_transactions".into(), "10".into());
            let (made, ()) = tokio::join!(within(runtime.init_data(&area, &engine)), kubelet);
            made.expect("initdb");
        }
    }
    api.expect_silence(QUIET).await;
}

#[tokio::test]
async fn a_running_pod_of_the_instance_is_adopted_without_a_request() {
    let (client, mut api) = mock_client();
    let (runtime, cluster) = runtime(client);
    let mut instance = adopt(&runtime, &cluster, 2).await;
    assert_eq!(instance.endpoint().host, "10.0.0.9");
    assert_eq!(instance.health(), Health::Running);
    api.expect_silence(QUIET).await;
    assert!(api.calls.is_empty(), "{:?}", api.calls);
}

#[tokio::test]
async fn a_pod_of_another_state_is_replaced() {
    let (client, mut api) = mock_client();
    let (runtime, cluster) = runtime(client);
    let name = pods::instance_pod_name(&iid(6));
    cluster.see(instance_pod(iid(6), state(0x66), running_ready("10.0.0.6")));
    let server = async {
        expect_cleanup(&mut api, &name).await;
        // The watcher sees it go; only then may its replacement take the name.
        tokio::time::sleep(Duration::from_millis(50)).await;
        cluster.unsee(&name);
        let create = api.expect("POST", PODS).await;
        assert_eq!(
            create.body["metadata"]["annotations"][pods::ANNOTATION_STATE],
            json!(state(6).to_string())
        );
        let created = accept_create(create);
        cluster.see(with_status(created, running_ready("10.0.6.6")));
    };
    let (started, ()) = tokio::join!(within(runtime.start_instance(iid(6), state(6))), server);
    assert_eq!(started.expect("started").endpoint().host, "10.0.6.6");
    api.expect_silence(QUIET).await;
}

#[tokio::test]
async fn end_unadopted_deletes_every_pod_but_the_kept_ones() {
    let (client, mut api) = mock_client();
    let (runtime, _cluster) = runtime(client);
    let kept = instance_pod(iid(3), state(3), running_ready("10.0.0.3"));
    let orphan = instance_pod(iid(4), state(4), running_ready("10.0.0.4"));
    let build_name = format!("taidon-b-{}-00abcd", state(7).short());
    let build = build_pod(&build_name, state(7), Some(state(3)));
    let mut leaving = instance_pod(iid(8), state(8), running_ready("10.0.0.8"));
    leaving.metadata.deletion_timestamp =
        Some(Time("2025-01-01T00:00:00Z".parse().expect("a time")));
    let orphan_name = pods::instance_pod_name(&iid(4));
    let server = async {
        let list = api.expect("GET", PODS).await;
        assert_eq!(list.call.param("labelSelector").as_deref(), Some(SELECTOR));
        assert_eq!(list.call.param("watch"), None);
        list.reply(
            200,
            &json!({
                "apiVersion": "v1",
                "kind": "PodList",
                "metadata": {"resourceVersion": "500"},
                "items": [to_json(&kept), to_json(&orphan), to_json(&build), to_json(&leaving)],
            }),
        );
        let mut deleted = Vec::new();
        for _ in 0..2 {
            let delete = api.next().await;
            assert_eq!(delete.call.method, "DELETE", "{:?}", delete.call);
            assert_eq!(delete.body["gracePeriodSeconds"], json!(0));
            deleted.push(delete.call.path.clone());
            let name = delete
                .call
                .path
                .rsplit('/')
                .next()
                .expect("a name")
                .to_owned();
            delete.reply(
                200,
                &json!({"kind": "Pod", "apiVersion": "v1", "metadata": {"name": name}}),
            );
        }
        deleted.sort();
        let mut want = vec![pod_path(&orphan_name), pod_path(&build_name)];
        want.sort();
        assert_eq!(deleted, want);
    };
    let keep = [iid(3)];
    let (ended, ()) = tokio::join!(within(runtime.end_unadopted(&keep)), server);
    assert_eq!(
        ended.expect("ended"),
        vec![format!("pod {orphan_name}"), format!("pod {build_name}")]
    );
    api.expect_silence(QUIET).await;
}

#[tokio::test]
async fn deleting_a_pod_that_is_gone_succeeds() {
    let (client, mut api) = mock_client();
    let (runtime, _cluster) = runtime(client);
    let name = pods::instance_pod_name(&iid(5));
    let server = async {
        let delete = api.expect("DELETE", &pod_path(&name)).await;
        delete.fail(404, "NotFound", &format!("pods \"{name}\" not found"));
    };
    let (removed, ()) = tokio::join!(within(runtime.remove_instance(iid(5))), server);
    removed.expect("a 404 on delete is success");
}

#[tokio::test]
async fn other_delete_failures_are_errors() {
    let (client, mut api) = mock_client();
    let (runtime, _cluster) = runtime(client);
    let name = pods::instance_pod_name(&iid(5));
    let server = async {
        let delete = api.expect("DELETE", &pod_path(&name)).await;
        delete.fail(500, "InternalError", "etcdserver: request timed out");
    };
    let (removed, ()) = tokio::join!(within(runtime.remove_instance(iid(5))), server);
    let text = removed.expect_err("a 500 is an error").to_string();
    assert!(text.contains("cannot delete pods"), "{text}");
    assert!(text.contains("etcdserver: request timed out"), "{text}");
}

#[tokio::test]
async fn a_forbidden_create_names_the_verb_the_resource_and_the_role() {
    let (client, mut api) = mock_client();
    let (runtime, _cluster) = runtime(client);
    let server = async {
        let create = api.expect("POST", PODS).await;
        create.fail(
            403,
            "Forbidden",
            "pods is forbidden: User \"system:serviceaccount:taidon:taidon-controller\" cannot \
             create resource \"pods\" in API group \"\" in the namespace \"taidon\"",
        );
    };
    let (started, ()) = tokio::join!(within(runtime.start_instance(iid(9), state(9))), server);
    let text = started.expect_err("forbidden").to_string();
    for part in [
        "cannot create pods",
        "may not create pods",
        "namespace taidon",
        "Role",
    ] {
        assert!(text.contains(part), "{part:?} is not in {text:?}");
    }
    // Nothing was created: nothing to clean up.
    api.expect_silence(QUIET).await;
}

#[tokio::test]
async fn a_create_over_quota_is_not_blamed_on_the_role() {
    let (client, mut api) = mock_client();
    let (runtime, _cluster) = runtime(client);
    let name = pods::instance_pod_name(&iid(9));
    let server = async {
        // A ResourceQuota (or a PodSecurity or LimitRange refusal) is a 403 Forbidden too.
        api.expect("POST", PODS).await.fail(
            403,
            "Forbidden",
            &format!(
                "pods \"{name}\" is forbidden: exceeded quota: compute, requested: \
                 limits.memory=1Gi, used: limits.memory=8Gi, limited: limits.memory=8Gi"
            ),
        );
    };
    let (started, ()) = tokio::join!(within(runtime.start_instance(iid(9), state(9))), server);
    let text = started.expect_err("over quota").to_string();
    assert!(text.contains("cannot create pods"), "{text}");
    assert!(text.contains("exceeded quota: compute"), "{text}");
    assert!(
        !text.contains("Role"),
        "a quota is not a missing permission: {text}"
    );
}

/// Starts an instance whose pod the kubelet then reports with `status`; the start must fail
/// and delete its pod. Returns the error's text.
async fn start_failure(
    runtime: &KubernetesRuntime,
    cluster: &Cluster,
    api: &mut ApiServer,
    status: Value,
) -> String {
    let name = pods::instance_pod_name(&iid(0x77));
    let server = async {
        let created = accept_create(api.expect("POST", PODS).await);
        cluster.see(with_status(created, status));
        expect_cleanup(api, &name).await;
    };
    let (started, ()) = tokio::join!(
        within(runtime.start_instance(iid(0x77), state(0x77))),
        server
    );
    let text = started
        .expect_err("the pod will not become ready")
        .to_string();
    assert!(
        text.contains(&format!("pod {name} did not become ready")),
        "{text}"
    );
    text
}

#[tokio::test]
async fn an_image_pull_back_off_fails_the_start() {
    let (client, mut api) = mock_client();
    let (runtime, cluster) = runtime(client);
    let text = start_failure(&runtime, &cluster, &mut api, image_pull_back_off()).await;
    assert!(text.contains("ImagePullBackOff"), "{text}");
    assert!(text.contains("ghcr.io/taidon/runner:17"), "{text}");
    api.expect_silence(QUIET).await;
}

#[tokio::test]
async fn a_runner_that_fails_while_starting_says_why() {
    let (client, mut api) = mock_client();
    let (runtime, cluster) = runtime(client);
    let text = start_failure(&runtime, &cluster, &mut api, failed_with_exit_1()).await;
    assert!(text.contains("exited with code 1"), "{text}");
    assert!(
        text.contains("ERROR cannot restore: the manifest is missing"),
        "{text}"
    );
}

#[tokio::test]
async fn a_pod_unschedulable_past_the_pending_timeout_fails_with_the_schedulers_message() {
    let (client, mut api) = mock_client();
    let (runtime, cluster) = impatient_runtime(client);
    let started = std::time::Instant::now();
    let text = start_failure(&runtime, &cluster, &mut api, unschedulable()).await;
    assert!(text.contains("still Pending"), "{text}");
    assert!(
        text.contains("Unschedulable: 0/3 nodes are available: 3 Insufficient cpu."),
        "{text}"
    );
    // It waited for the timeout, not less.
    assert!(started.elapsed() >= Duration::from_millis(200));
}

#[tokio::test]
async fn an_unschedulable_pod_within_the_pending_timeout_is_waited_for() {
    let (client, mut api) = mock_client();
    let (runtime, cluster) = runtime(client);
    let name = pods::instance_pod_name(&iid(0x78));
    let server = async {
        let created = accept_create(api.expect("POST", PODS).await);
        cluster.see(with_status(created.clone(), unschedulable()));
        // A node joins: the scheduler places it.
        tokio::time::sleep(Duration::from_millis(300)).await;
        cluster.see(with_status(created, running_ready("10.0.7.8")));
    };
    let (started, ()) = tokio::join!(
        within(runtime.start_instance(iid(0x78), state(0x78))),
        server
    );
    assert_eq!(started.expect("started").endpoint().host, "10.0.7.8");
    assert!(cluster.seen(&name).is_some());
    api.expect_silence(QUIET).await;
}

/// How an adopted instance reads after the watcher shows its pod changed by `change`.
async fn health_after(change: impl FnOnce(&Cluster, &str)) -> Health {
    let (client, mut api) = mock_client();
    let (runtime, cluster) = runtime(client);
    let mut instance = adopt(&runtime, &cluster, 0x44).await;
    assert_eq!(instance.health(), Health::Running);
    change(&cluster, &pods::instance_pod_name(&iid(0x44)));
    let health = instance.health();
    // How it ended stays, whatever the pod shows next.
    cluster.see(instance_pod(
        iid(0x44),
        state(0x44),
        running_ready("10.0.0.9"),
    ));
    assert_eq!(instance.health(), health);
    api.expect_silence(Duration::from_millis(10)).await;
    health
}

#[tokio::test]
async fn a_failed_pod_is_an_exited_instance_with_its_code() {
    let health = health_after(|cluster, _| {
        cluster.see(instance_pod(iid(0x44), state(0x44), failed_with_exit_1()));
    })
    .await;
    assert_eq!(
        health,
        Health::Exited {
            status: Exit::Code(1)
        }
    );
}

#[tokio::test]
async fn an_evicted_pod_is_an_exited_instance() {
    let health = health_after(|cluster, _| {
        cluster.see(instance_pod(iid(0x44), state(0x44), evicted()));
    })
    .await;
    assert_eq!(
        health,
        Health::Exited {
            status: Exit::Signal(9)
        }
    );
}

#[tokio::test]
async fn a_deleted_pod_is_an_exited_instance() {
    let health = health_after(|cluster, name| cluster.unsee(name)).await;
    assert_eq!(
        health,
        Health::Exited {
            status: Exit::Signal(9)
        }
    );
}

#[tokio::test]
async fn a_terminating_pod_is_an_exited_instance() {
    let health = health_after(|cluster, _| {
        let mut pod = instance_pod(iid(0x44), state(0x44), running_ready("10.0.0.9"));
        pod.metadata.deletion_timestamp =
            Some(Time("2025-01-01T00:00:00Z".parse().expect("a time")));
        cluster.see(pod);
    })
    .await;
    assert_eq!(
        health,
        Health::Exited {
            status: Exit::Signal(15)
        }
    );
}

#[tokio::test]
async fn a_pod_that_is_not_ready_for_a_moment_still_runs() {
    let health = health_after(|cluster, _| {
        cluster.see(instance_pod(
            iid(0x44),
            state(0x44),
            super::fixtures::running_not_ready("10.0.0.9"),
        ));
    })
    .await;
    assert_eq!(health, Health::Running);
}

#[tokio::test]
async fn a_watch_that_never_lists_fails_the_start_with_its_error() {
    let (client, _api) = mock_client();
    let mut settings = super::fixtures::settings();
    settings.pending_timeout = Duration::from_millis(200);
    // Never marked synced: the watcher could not list.
    let cluster = super::fixtures::cluster(client, settings);
    let runtime = KubernetesRuntime {
        cluster: std::sync::Arc::clone(&cluster),
    };
    let err = within(runtime.start_instance(iid(9), state(9)))
        .await
        .expect_err("no listing, no start");
    assert!(
        err.to_string()
            .contains("cannot watch pods in namespace taidon"),
        "{err}"
    );
}
