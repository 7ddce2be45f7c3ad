//! One active controller: a `coordination.k8s.io` Lease names the holder. A second replica
//! waits until the holder stops renewing it; a holder that cannot renew steps down.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::Api;
use taidon_runtime::RuntimeError;

use crate::cluster::{api_error, is_not_found};

/// The Lease one controller holds.
pub struct LeaderLease {
    api: Api<Lease>,
    name: String,
    namespace: String,
    identity: String,
    duration: Duration,
}

/// What one look at the Lease found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// This process holds it now.
    Held,
    /// Another holds it and renewed it within its duration.
    HeldBy(String),
}

impl LeaderLease {
    /// The Lease `name` in `namespace`, for a holder called `identity` (the pod's name).
    pub fn new(
        client: kube::Client,
        namespace: &str,
        name: &str,
        identity: &str,
        duration: Duration,
    ) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            identity: identity.to_owned(),
            duration,
        }
    }

    fn failed(&self, verb: &str) -> impl FnOnce(kube::Error) -> RuntimeError + '_ {
        let verb = verb.to_owned();
        move |e| api_error(&verb, "leases", &self.namespace, e)
    }

    /// Takes the Lease if it is free, expired or ours; renews it if ours.
    pub async fn try_acquire(&self) -> Result<Attempt, RuntimeError> {
        let now = Timestamp::now();
        let existing = match self.api.get(&self.name).await {
            Ok(lease) => Some(lease),
            Err(e) if is_not_found(&e) => None,
            Err(e) => return Err(self.failed("get")(e)),
        };
        let Some(mut lease) = existing else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(self.spec(now, now, 0)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(Attempt::Held),
                // Another replica created it first.
                Err(kube::Error::Api(s)) if s.code == 409 => {
                    Ok(Attempt::HeldBy("another replica".into()))
                }
                Err(e) => Err(self.failed("create")(e)),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let duration = spec
            .lease_duration_seconds
            .map(|s| Duration::from_secs(s.max(0) as u64))
            .unwrap_or(self.duration);
        let renewed = spec
            .renew_time
            .as_ref()
            .map(|t| t.0)
            .or(spec.acquire_time.as_ref().map(|t| t.0));
        let expired = match renewed {
            Some(t) => now.duration_since(t).as_secs_f64() > duration.as_secs_f64(),
            None => true,
        };
        if holder != self.identity && !holder.is_empty() && !expired {
            return Ok(Attempt::HeldBy(holder));
        }
        let (acquired, transitions) = if holder == self.identity {
            (
                spec.acquire_time.map(|t| t.0).unwrap_or(now),
                spec.lease_transitions.unwrap_or(0),
            )
        } else {
            (now, spec.lease_transitions.unwrap_or(0) + 1)
        };
        lease.spec = Some(self.spec(acquired, now, transitions));
        // resourceVersion stays: a racing replica's replace fails with 409.
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(Attempt::Held),
            Err(kube::Error::Api(s)) if s.code == 409 => {
                Ok(Attempt::HeldBy("another replica".into()))
            }
            Err(e) => Err(self.failed("update")(e)),
        }
    }

    fn spec(&self, acquired: Timestamp, renewed: Timestamp, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.duration.as_secs() as i32),
            acquire_time: Some(MicroTime(acquired)),
            renew_time: Some(MicroTime(renewed)),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    /// Waits until this process holds the Lease, saying who holds it meanwhile.
    pub async fn acquire(&self) -> Result<(), RuntimeError> {
        let mut said = String::new();
        loop {
            match self.try_acquire().await? {
                Attempt::Held => {
                    tracing::info!(lease = %self.name, identity = %self.identity, "holding the leader lease");
                    return Ok(());
                }
                Attempt::HeldBy(holder) => {
                    if holder != said {
                        tracing::info!(lease = %self.name, %holder, "waiting: another controller holds the leader lease");
                        said = holder;
                    }
                }
            }
            tokio::time::sleep(self.retry_period()).await;
        }
    }

    fn retry_period(&self) -> Duration {
        (self.duration / 3).max(Duration::from_millis(200))
    }

    /// Renews the Lease until it is lost (another replica took it, or renewals failed for its
    /// whole duration); then returns why.
    pub async fn hold(&self) -> String {
        let mut last_ok = std::time::Instant::now();
        loop {
            tokio::time::sleep(self.retry_period()).await;
            match self.try_acquire().await {
                Ok(Attempt::Held) => last_ok = std::time::Instant::now(),
                Ok(Attempt::HeldBy(holder)) => return format!("{holder} took the leader lease"),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot renew the leader lease");
                    if last_ok.elapsed() > self.duration {
                        return format!("the leader lease could not be renewed: {e}");
                    }
                }
            }
        }
    }
}
