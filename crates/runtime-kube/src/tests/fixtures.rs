//! Fixed settings, ids and pods the tests share.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, PodStatus};
use serde_json::{json, Value};
use taidon_core::{EngineFingerprint, InitdbOptions, InstanceId, StateId};
use taidon_runtime::Engine;
use taidon_store_object::RemoteConfig;

use super::mock::NS;
use crate::cluster::Cluster;
use crate::pods::{self, PodSettings, Role};
use crate::runtime::KubernetesRuntime;

/// The controller's secret: every pod's token and password derive from it.
pub(crate) const SECRET: &[u8] = b"unit-test-secret";

pub(crate) fn settings() -> PodSettings {
    PodSettings::new(
        NS,
        "ghcr.io/taidon/runner:17",
        RemoteConfig {
            url: "s3://taidon-test/states".into(),
            endpoint: Some("http://minio.taidon:9000".into()),
            allow_http: true,
            region: "us-east-1".into(),
        },
    )
}

pub(crate) fn engine() -> Engine {
    Engine {
        bin_dir: PathBuf::from("/usr/lib/postgresql/17/bin"),
        fingerprint: EngineFingerprint {
            major: 17,
            minor: 5,
            initdb: InitdbOptions::default(),
            settings: Default::default(),
        },
        version_line: "postgres (PostgreSQL) 17.5".into(),
    }
}

pub(crate) fn iid(n: u8) -> InstanceId {
    InstanceId::from_bytes([n; 8])
}

pub(crate) fn state(n: u8) -> StateId {
    StateId::from_bytes([n; 32])
}

/// A cluster whose watcher is not running: tests show it pods with `see`.
pub(crate) fn cluster(client: kube::Client, settings: PodSettings) -> Arc<Cluster> {
    Cluster::new(
        client,
        settings,
        engine(),
        SECRET.to_vec(),
        PathBuf::from("/nonexistent"),
    )
}

/// A runtime on a cluster that has listed its pods (none yet).
pub(crate) fn runtime(client: kube::Client) -> (KubernetesRuntime, Arc<Cluster>) {
    let cluster = cluster(client, settings());
    cluster.mark_synced();
    (
        KubernetesRuntime {
            cluster: Arc::clone(&cluster),
        },
        cluster,
    )
}

/// A runtime whose pods may stay Pending for only 200 ms.
pub(crate) fn impatient_runtime(client: kube::Client) -> (KubernetesRuntime, Arc<Cluster>) {
    let mut settings = settings();
    settings.pending_timeout = Duration::from_millis(200);
    let cluster = cluster(client, settings);
    cluster.mark_synced();
    (
        KubernetesRuntime {
            cluster: Arc::clone(&cluster),
        },
        cluster,
    )
}

/// The pod the runtime creates for `role` under `name`.
pub(crate) fn created_pod(name: &str, role: &Role) -> Pod {
    let password = match role {
        Role::Build {
            parent: Some(_), ..
        } => Some(crate::control::pod_token(
            SECRET,
            &format!("{name}/postgres"),
        )),
        _ => None,
    };
    let mut pod = pods::runner_pod(
        &settings(),
        name,
        role,
        &crate::control::pod_token(SECRET, name),
        password.as_deref(),
        &Default::default(),
    );
    pod.metadata.uid = Some(format!("uid-{name}"));
    pod.metadata.resource_version = Some("100".into());
    pod
}

/// Instance `iid`'s pod of `state`, with `status` (a PodStatus in JSON).
pub(crate) fn instance_pod(iid: InstanceId, state: StateId, status: Value) -> Pod {
    let name = pods::instance_pod_name(&iid);
    with_status(created_pod(&name, &Role::Instance { iid, state }), status)
}

/// A build pod of `state` from `parent`.
pub(crate) fn build_pod(name: &str, state: StateId, parent: Option<StateId>) -> Pod {
    with_status(
        created_pod(name, &Role::Build { state, parent }),
        running_ready("10.0.3.3"),
    )
}

pub(crate) fn with_status(mut pod: Pod, status: Value) -> Pod {
    pod.status = Some(serde_json::from_value::<PodStatus>(status).expect("a PodStatus"));
    pod
}

/// A JSON Pod from `pod` (apiVersion and kind included).
pub(crate) fn to_json(pod: &Pod) -> Value {
    serde_json::to_value(pod).expect("JSON")
}

/// What a kubelet reports for a runner that is up: Running, Ready, on `ip`.
pub(crate) fn running_ready(ip: &str) -> Value {
    json!({
        "phase": "Running",
        "podIP": ip,
        "podIPs": [{"ip": ip}],
        "hostIP": "172.18.0.2",
        "startTime": "2025-01-01T00:00:00Z",
        "conditions": [
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": "2025-01-01T00:00:00Z"},
            {"type": "Initialized", "status": "True", "lastTransitionTime": "2025-01-01T00:00:00Z"},
            {"type": "ContainersReady", "status": "True", "lastTransitionTime": "2025-01-01T00:00:05Z"},
            {"type": "Ready", "status": "True", "lastTransitionTime": "2025-01-01T00:00:05Z"}
        ],
        "containerStatuses": [{
            "name": "runner",
            "image": "ghcr.io/taidon/runner:17",
            "imageID": "ghcr.io/taidon/runner@sha256:0123",
            "ready": true,
            "restartCount": 0,
            "started": true,
            "state": {"running": {"startedAt": "2025-01-01T00:00:01Z"}}
        }]
    })
}

/// Scheduled on a node with an IP, the runner not ready yet (restoring).
pub(crate) fn running_not_ready(ip: &str) -> Value {
    let mut status = running_ready(ip);
    status["conditions"][3]["status"] = json!("False");
    status["conditions"][2]["status"] = json!("False");
    status["containerStatuses"][0]["ready"] = json!(false);
    status
}

/// Just created: accepted, not yet scheduled.
pub(crate) fn pending() -> Value {
    json!({"phase": "Pending", "qosClass": "Burstable"})
}

/// The runner exited 1, its log's tail as the termination message.
pub(crate) fn failed_with_exit_1() -> Value {
    json!({
        "phase": "Failed",
        "podIP": "10.0.1.1",
        "conditions": [
            {"type": "Ready", "status": "False", "reason": "PodFailed"}
        ],
        "containerStatuses": [{
            "name": "runner",
            "image": "ghcr.io/taidon/runner:17",
            "imageID": "",
            "ready": false,
            "restartCount": 0,
            "state": {"terminated": {
                "exitCode": 1,
                "reason": "Error",
                "message": "INFO restoring state aaaa\nERROR cannot restore: the manifest is missing\nINFO bye\n",
                "startedAt": "2025-01-01T00:00:01Z",
                "finishedAt": "2025-01-01T00:00:09Z"
            }}
        }]
    })
}

/// The kubelet evicted the pod (its containers were killed, no exit code recorded).
pub(crate) fn evicted() -> Value {
    json!({
        "phase": "Failed",
        "reason": "Evicted",
        "message": "The node was low on resource: ephemeral-storage. ",
        "startTime": "2025-01-01T00:00:00Z"
    })
}

/// The image cannot be pulled.
pub(crate) fn image_pull_back_off() -> Value {
    json!({
        "phase": "Pending",
        "podIP": "10.0.2.2",
        "conditions": [
            {"type": "PodScheduled", "status": "True"},
            {"type": "Ready", "status": "False", "reason": "ContainersNotReady"}
        ],
        "containerStatuses": [{
            "name": "runner",
            "image": "ghcr.io/taidon/runner:17",
            "imageID": "",
            "ready": false,
            "restartCount": 0,
            "state": {"waiting": {
                "reason": "ImagePullBackOff",
                "message": "Back-off pulling image \"ghcr.io/taidon/runner:17\""
            }}
        }]
    })
}

/// The scheduler found no node.
pub(crate) fn unschedulable() -> Value {
    json!({
        "phase": "Pending",
        "conditions": [{
            "type": "PodScheduled",
            "status": "False",
            "reason": "Unschedulable",
            "message": "0/3 nodes are available: 3 Insufficient cpu.",
            "lastTransitionTime": "2025-01-01T00:00:00Z"
        }],
        "qosClass": "Burstable"
    })
}
