//! How pod statuses read: `pods::phase_of` and `pods::unscheduled_reason`.

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde_json::{json, Value};

use super::fixtures::{
    evicted, failed_with_exit_1, iid, image_pull_back_off, instance_pod, pending,
    running_not_ready, running_ready, state, unschedulable,
};
use crate::pods::{phase_of, unscheduled_reason, Phase};

fn pod(status: Value) -> Pod {
    instance_pod(iid(1), state(1), status)
}

fn waiting(reason: &str, message: Option<&str>) -> Value {
    let mut status = image_pull_back_off();
    status["containerStatuses"][0]["state"]["waiting"] = match message {
        Some(m) => json!({"reason": reason, "message": m}),
        None => json!({"reason": reason}),
    };
    status
}

fn terminated(phase: &str, exit_code: i32, message: Option<&str>) -> Value {
    let mut status = failed_with_exit_1();
    status["phase"] = json!(phase);
    let t = &mut status["containerStatuses"][0]["state"]["terminated"];
    t["exitCode"] = json!(exit_code);
    match message {
        Some(m) => t["message"] = json!(m),
        None => {
            t.as_object_mut().expect("an object").remove("message");
        }
    }
    status
}

#[test]
fn phase_of_reads_each_status() {
    let failed = |s: &str| Phase::Failed(s.to_owned());
    let cases: Vec<(&str, Pod, Phase)> = vec![
        (
            "no status yet",
            {
                let mut p = pod(pending());
                p.status = None;
                p
            },
            Phase::Coming,
        ),
        ("pending", pod(pending()), Phase::Coming),
        (
            "unschedulable is still coming (the timeout decides)",
            pod(unschedulable()),
            Phase::Coming,
        ),
        (
            "running and ready",
            pod(running_ready("10.1.2.3")),
            Phase::Ready("10.1.2.3".into()),
        ),
        (
            "running, not ready",
            pod(running_not_ready("10.1.2.3")),
            Phase::Coming,
        ),
        (
            "ready without an IP",
            {
                let mut s = running_ready("10.1.2.3");
                s.as_object_mut().expect("an object").remove("podIP");
                pod(s)
            },
            Phase::Coming,
        ),
        (
            "ready condition missing",
            {
                let mut s = running_ready("10.1.2.3");
                s["conditions"] = json!([]);
                pod(s)
            },
            Phase::Coming,
        ),
        (
            "creating its container",
            pod(waiting("ContainerCreating", None)),
            Phase::Coming,
        ),
        (
            "image pull back-off",
            pod(image_pull_back_off()),
            failed("ImagePullBackOff: Back-off pulling image \"ghcr.io/taidon/runner:17\""),
        ),
        (
            "a first image pull error may pass",
            pod(waiting("ErrImagePull", None)),
            Phase::Coming,
        ),
        (
            "bad image name, empty message",
            pod(waiting("InvalidImageName", Some(""))),
            failed("InvalidImageName"),
        ),
        (
            "missing secret",
            pod(waiting(
                "CreateContainerConfigError",
                Some("secret \"taidon-object-store\" not found"),
            )),
            failed("CreateContainerConfigError: secret \"taidon-object-store\" not found"),
        ),
        (
            "runner failed: its last error line",
            pod(failed_with_exit_1()),
            failed("the runner exited with code 1: ERROR cannot restore: the manifest is missing"),
        ),
        (
            "runner failed without an error line: its last line",
            pod(terminated("Failed", 2, Some("starting\n  stopping  \n\n"))),
            failed("the runner exited with code 2: stopping"),
        ),
        (
            "runner failed without a message",
            pod(terminated("Failed", 137, None)),
            failed("the runner exited with code 137"),
        ),
        (
            "runner ended cleanly",
            pod(terminated("Succeeded", 0, Some(""))),
            failed("the runner exited with code 0"),
        ),
        (
            "evicted",
            pod(evicted()),
            failed("Evicted: The node was low on resource: ephemeral-storage. "),
        ),
        (
            "failed with neither reason nor container",
            pod(json!({"phase": "Failed"})),
            failed("pod Failed"),
        ),
        (
            "unknown phase",
            pod(json!({"phase": "Unknown"})),
            Phase::Coming,
        ),
        (
            "being deleted, though ready",
            {
                let mut p = pod(running_ready("10.1.2.3"));
                p.metadata.deletion_timestamp =
                    Some(Time("2025-01-01T00:01:00Z".parse().expect("a timestamp")));
                p
            },
            Phase::Gone,
        ),
    ];
    let mut wrong = Vec::new();
    for (what, pod, want) in cases {
        let got = phase_of(&pod);
        if got != want {
            wrong.push(format!("{what}: want {want:?}, got {got:?}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn unscheduled_reason_quotes_the_scheduler() {
    assert_eq!(
        unscheduled_reason(&pod(unschedulable())).as_deref(),
        Some("Unschedulable: 0/3 nodes are available: 3 Insufficient cpu.")
    );
    assert_eq!(unscheduled_reason(&pod(running_ready("10.0.0.1"))), None);
    assert_eq!(unscheduled_reason(&pod(pending())), None);
    let bare =
        json!({"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False"}]});
    assert_eq!(
        unscheduled_reason(&pod(bare)).as_deref(),
        Some("not scheduled")
    );
}
