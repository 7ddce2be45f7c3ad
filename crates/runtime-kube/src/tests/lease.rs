//! The leader Lease: each case of `LeaderLease::try_acquire` and the requests it sends.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use serde_json::{json, Value};

use super::mock::{mock_client, within, ApiServer, NS};
use crate::lease::{Attempt, LeaderLease};

pub(crate) const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/taidon/leases";
pub(crate) const LEASE: &str =
    "/apis/coordination.k8s.io/v1/namespaces/taidon/leases/taidon-controller";

pub(crate) fn leader(client: kube::Client, identity: &str) -> LeaderLease {
    LeaderLease::new(
        client,
        NS,
        "taidon-controller",
        identity,
        Duration::from_secs(15),
    )
}

fn micro_time(ago: Duration) -> Value {
    let at = Timestamp::now()
        .checked_sub(SignedDuration::try_from(ago).expect("a duration"))
        .expect("a time");
    serde_json::to_value(MicroTime(at)).expect("JSON")
}

/// The Lease as the API server returns it: `holder` renewed it `ago`.
pub(crate) fn lease(holder: &str, ago: Duration, transitions: i32) -> Value {
    json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": "taidon-controller",
            "namespace": NS,
            "uid": "0b7c7a4e-lease",
            "resourceVersion": "42",
        },
        "spec": {
            "holderIdentity": holder,
            "leaseDurationSeconds": 15,
            "acquireTime": micro_time(Duration::from_secs(3600)),
            "renewTime": micro_time(ago),
            "leaseTransitions": transitions,
        }
    })
}

fn seconds_ago(time: &Value) -> f64 {
    let at: Timestamp = time.as_str().expect("a time").parse().expect("a timestamp");
    Timestamp::now().duration_since(at).as_secs_f64()
}

/// Runs one `try_acquire` by `identity` against `script`.
async fn attempt<F>(identity: &str, script: impl FnOnce(ApiServer) -> F) -> Attempt
where
    F: std::future::Future<Output = ApiServer>,
{
    let (client, api) = mock_client();
    let lease = leader(client, identity);
    let (got, mut api) = tokio::join!(within(lease.try_acquire()), script(api));
    api.expect_silence(Duration::from_millis(50)).await;
    got.expect("an attempt")
}

#[tokio::test]
async fn an_absent_lease_is_created() {
    let got = attempt("controller-a", |mut api| async move {
        let get = api.expect("GET", LEASE).await;
        get.fail(
            404,
            "NotFound",
            "leases.coordination.k8s.io \"taidon-controller\" not found",
        );
        let create = api.expect("POST", LEASES).await;
        assert_eq!(create.body["metadata"]["name"], json!("taidon-controller"));
        let spec = &create.body["spec"];
        assert_eq!(spec["holderIdentity"], json!("controller-a"));
        assert_eq!(spec["leaseDurationSeconds"], json!(15));
        assert_eq!(spec["leaseTransitions"], json!(0));
        assert!(seconds_ago(&spec["renewTime"]) < 5.0, "{spec}");
        let mut created = create.body.clone();
        created["metadata"]["resourceVersion"] = json!("1");
        create.reply(201, &created);
        api
    })
    .await;
    assert_eq!(got, Attempt::Held);
}

#[tokio::test]
async fn a_lease_created_first_by_another_replica_is_held_by_it() {
    let got = attempt("controller-a", |mut api| async move {
        api.expect("GET", LEASE)
            .await
            .fail(404, "NotFound", "not found");
        api.expect("POST", LEASES).await.fail(
            409,
            "AlreadyExists",
            "leases.coordination.k8s.io \"taidon-controller\" already exists",
        );
        api
    })
    .await;
    assert!(matches!(got, Attempt::HeldBy(_)), "{got:?}");
}

#[tokio::test]
async fn a_fresh_lease_of_another_is_left_alone() {
    let got = attempt("controller-a", |mut api| async move {
        let get = api.expect("GET", LEASE).await;
        get.reply(200, &lease("controller-b", Duration::from_secs(2), 3));
        api
    })
    .await;
    assert_eq!(got, Attempt::HeldBy("controller-b".into()));
}

#[tokio::test]
async fn an_expired_lease_of_another_is_taken_over_its_resource_version() {
    let got = attempt("controller-a", |mut api| async move {
        api.expect("GET", LEASE)
            .await
            .reply(200, &lease("controller-b", Duration::from_secs(60), 3));
        let replace = api.expect("PUT", LEASE).await;
        let body = &replace.body;
        assert_eq!(body["metadata"]["resourceVersion"], json!("42"), "{body}");
        assert_eq!(body["spec"]["holderIdentity"], json!("controller-a"));
        assert_eq!(body["spec"]["leaseTransitions"], json!(4));
        assert!(seconds_ago(&body["spec"]["acquireTime"]) < 5.0, "{body}");
        assert!(seconds_ago(&body["spec"]["renewTime"]) < 5.0, "{body}");
        let mut replaced = body.clone();
        replaced["metadata"]["resourceVersion"] = json!("43");
        replace.reply(200, &replaced);
        api
    })
    .await;
    assert_eq!(got, Attempt::Held);
}

#[tokio::test]
async fn our_lease_is_renewed_keeping_its_acquire_time() {
    let got = attempt("controller-a", |mut api| async move {
        let current = lease("controller-a", Duration::from_secs(5), 3);
        api.expect("GET", LEASE).await.reply(200, &current);
        let replace = api.expect("PUT", LEASE).await;
        let body = &replace.body;
        assert_eq!(body["metadata"]["resourceVersion"], json!("42"));
        assert_eq!(body["spec"]["acquireTime"], current["spec"]["acquireTime"]);
        assert_eq!(body["spec"]["leaseTransitions"], json!(3));
        assert!(seconds_ago(&body["spec"]["renewTime"]) < 5.0, "{body}");
        let reply = body.clone();
        replace.reply(200, &reply);
        api
    })
    .await;
    assert_eq!(got, Attempt::Held);
}

#[tokio::test]
async fn a_conflict_on_replace_means_another_replica_won() {
    let got = attempt("controller-a", |mut api| async move {
        api.expect("GET", LEASE)
            .await
            .reply(200, &lease("controller-b", Duration::from_secs(60), 3));
        api.expect("PUT", LEASE).await.fail(
            409,
            "Conflict",
            "Operation cannot be fulfilled on leases.coordination.k8s.io \"taidon-controller\": \
             the object has been modified; please apply your changes to the latest version and try again",
        );
        api
    })
    .await;
    assert!(matches!(got, Attempt::HeldBy(_)), "{got:?}");
}

#[tokio::test]
async fn a_forbidden_get_names_the_verb_and_the_resource() {
    let (client, mut api) = mock_client();
    let lease = leader(client, "controller-a");
    let server = async {
        api.expect("GET", LEASE).await.fail(
            403,
            "Forbidden",
            "leases.coordination.k8s.io \"taidon-controller\" is forbidden: User \
             \"system:serviceaccount:taidon:taidon-controller\" cannot get resource \"leases\" in \
             API group \"coordination.k8s.io\" in the namespace \"taidon\"",
        );
    };
    let (got, ()) = tokio::join!(within(lease.try_acquire()), server);
    let text = got.expect_err("forbidden").to_string();
    for part in ["cannot get leases", "Role"] {
        assert!(text.contains(part), "{part:?} is not in {text:?}");
    }
}
