//! The controller's Prometheus metrics, served at `GET /metrics` (OpenMetrics text).
//!
//! Counters and histograms are kept as things happen. The gauges (states by presence, store
//! bytes, instances by status) are read from what the controller already holds at each scrape,
//! so they can never drift from it. In `taidon local` the gateway beside the controller
//! registers its own metrics in the same registry (see [`Metrics::register`]).

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use taidon_api::StateStatus;
use taidon_core::StateId;

use crate::{Controller, ControllerError};

/// The content type of [`Controller::metrics_text`].
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RestoreLabels {
    source: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PresenceLabel {
    presence: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TierLabel {
    tier: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    status: String,
}

/// Where a restored snapshot came from.
#[derive(Debug, Clone, Copy)]
pub(crate) enum RestoreSource {
    /// Cloned from the local store into an instance.
    Local,
    /// Downloaded from the bucket.
    Remote,
    /// A COLD state replayed from its nearest checkpoint.
    Rebuild,
}

/// Why something was let go by the lifecycle.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Eviction {
    /// A snapshot evicted for the store's capacity.
    StoreCapacity,
    /// An instance stopped after its idle timeout.
    Idle,
    /// An instance stopped when its lease ran out.
    LeaseExpired,
    /// An instance stopped for the instance or memory budget.
    InstanceCapacity,
}

/// Every metric the controller keeps, and the registry they are served from.
pub struct Metrics {
    registry: Mutex<Registry>,
    builds: Family<ResultLabel, Counter>,
    build_seconds: Histogram,
    restores: Family<RestoreLabels, Counter>,
    evictions: Family<ReasonLabel, Counter>,
    standby_handouts: Family<ResultLabel, Counter>,
    quarantines: Counter,
    states: Family<PresenceLabel, Gauge>,
    store_bytes: Family<TierLabel, Gauge>,
    instances: Family<StatusLabel, Gauge>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// Every presence a state can have, so that each is reported (0 included).
const PRESENCES: [&str; 6] = ["hot", "warm", "cold", "building", "starting", "failed"];

impl Metrics {
    /// Metrics whose every series carries `labels` (in Kubernetes mode, the pod's name).
    pub fn new(labels: &[(String, String)]) -> Self {
        let mut registry = Registry::with_labels(
            labels
                .iter()
                .map(|(k, v)| (Cow::Owned(k.clone()), Cow::Owned(v.clone()))),
        );
        let m = Self {
            registry: Mutex::new(Registry::default()),
            builds: Family::default(),
            // 10 ms to about 3 hours.
            build_seconds: Histogram::new(exponential_buckets(0.01, 2.0, 21)),
            restores: Family::default(),
            evictions: Family::default(),
            standby_handouts: Family::default(),
            quarantines: Counter::default(),
            states: Family::default(),
            store_bytes: Family::default(),
            instances: Family::default(),
        };
        registry.register(
            "taidon_states",
            "States the controller knows, by presence level",
            m.states.clone(),
        );
        registry.register(
            "taidon_store_bytes",
            "Bytes of snapshots kept, by tier (local disk, object storage as last counted)",
            m.store_bytes.clone(),
        );
        registry.register(
            "taidon_instances",
            "Instances the controller knows, by status",
            m.instances.clone(),
        );
        registry.register(
            "taidon_builds",
            "Snapshot builds (initdb or one prepare step), by result",
            m.builds.clone(),
        );
        registry.register(
            "taidon_build_seconds",
            "Time of one build, from its start to its published snapshot",
            m.build_seconds.clone(),
        );
        registry.register(
            "taidon_restores",
            "Snapshots restored: cloned into an instance (local), downloaded (remote), or a \
             COLD state rebuilt from its nearest checkpoint (rebuild), by result",
            m.restores.clone(),
        );
        registry.register(
            "taidon_evictions",
            "Snapshots evicted and instances stopped by the lifecycle, by reason",
            m.evictions.clone(),
        );
        registry.register(
            "taidon_standby_handouts",
            "New instances asked for: served by a pre-started standby (hit) or started (miss)",
            m.standby_handouts.clone(),
        );
        registry.register(
            "taidon_snapshots_quarantined",
            "Damaged snapshots (a checksum mismatch found by [store] verify or sqlrs fsck \
             --repair) moved to the store's quarantine",
            m.quarantines.clone(),
        );
        // Every known series exists from the start, at 0: a rate over it needs no first event.
        for result in ["ok", "failed"] {
            drop(m.builds.get_or_create(&ResultLabel { result }));
            for source in ["local", "remote", "rebuild"] {
                drop(m.restores.get_or_create(&RestoreLabels { source, result }));
            }
        }
        for reason in [
            "store_capacity",
            "idle",
            "lease_expired",
            "instance_capacity",
        ] {
            drop(m.evictions.get_or_create(&ReasonLabel { reason }));
        }
        for result in ["hit", "miss"] {
            drop(m.standby_handouts.get_or_create(&ResultLabel { result }));
        }
        *m.registry.lock().unwrap_or_else(|p| p.into_inner()) = registry;
        m
    }

    /// Adds metrics kept elsewhere (the gateway's, in `taidon local`) to the ones served.
    pub fn register(&self, add: impl FnOnce(&mut Registry)) {
        add(&mut self.registry.lock().unwrap_or_else(|p| p.into_inner()));
    }

    pub(crate) fn build_done(&self, ok: bool, seconds: f64) {
        let result = if ok { "ok" } else { "failed" };
        self.builds.get_or_create(&ResultLabel { result }).inc();
        if ok {
            self.build_seconds.observe(seconds);
        }
    }

    pub(crate) fn restored(&self, source: RestoreSource, ok: bool) {
        let source = match source {
            RestoreSource::Local => "local",
            RestoreSource::Remote => "remote",
            RestoreSource::Rebuild => "rebuild",
        };
        let result = if ok { "ok" } else { "failed" };
        self.restores
            .get_or_create(&RestoreLabels { source, result })
            .inc();
    }

    /// A damaged snapshot moved to quarantine.
    pub(crate) fn quarantined(&self) {
        self.quarantines.inc();
    }

    pub(crate) fn evicted(&self, why: Eviction) {
        let reason = match why {
            Eviction::StoreCapacity => "store_capacity",
            Eviction::Idle => "idle",
            Eviction::LeaseExpired => "lease_expired",
            Eviction::InstanceCapacity => "instance_capacity",
        };
        self.evictions.get_or_create(&ReasonLabel { reason }).inc();
    }

    pub(crate) fn standby_handout(&self, hit: bool) {
        let result = if hit { "hit" } else { "miss" };
        self.standby_handouts
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    /// Sets the gauges to `now` and encodes every metric.
    fn encode(&self, now: Gauges) -> String {
        let registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        for presence in PRESENCES {
            let n = now.states.get(presence).copied().unwrap_or(0);
            self.states
                .get_or_create(&PresenceLabel { presence })
                .set(n as i64);
        }
        self.store_bytes
            .get_or_create(&TierLabel { tier: "local" })
            .set(now.local_bytes as i64);
        match now.remote_bytes {
            Some(b) => {
                self.store_bytes
                    .get_or_create(&TierLabel { tier: "remote" })
                    .set(b as i64);
            }
            None => {
                self.store_bytes.remove(&TierLabel { tier: "remote" });
            }
        }
        self.instances.clear();
        for (status, n) in now.instances {
            self.instances
                .get_or_create(&StatusLabel { status })
                .set(n as i64);
        }
        let mut out = String::with_capacity(8 * 1024);
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}

/// What the gauges say at one scrape.
struct Gauges {
    states: HashMap<&'static str, u64>,
    local_bytes: u64,
    remote_bytes: Option<u64>,
    instances: Vec<(String, u64)>,
}

/// Counts states by presence as `ls` shows them: a WARM state with a running instance is HOT,
/// a HOT one with none is WARM. `recorded` counts the metadata's statuses, `running` are the
/// states with a running instance (with their recorded status) and `recorded_hot` the states
/// recorded HOT.
fn presence_counts(
    recorded: &[(StateStatus, u64)],
    running: &[(StateId, StateStatus)],
    recorded_hot: &[StateId],
) -> HashMap<&'static str, u64> {
    let mut counts: HashMap<&'static str, u64> = HashMap::new();
    for (status, n) in recorded {
        let presence = match status {
            StateStatus::Hot => "hot",
            StateStatus::Warm => "warm",
            StateStatus::Cold => "cold",
            StateStatus::Building => "building",
            StateStatus::Starting => "starting",
            StateStatus::Failed => "failed",
        };
        *counts.entry(presence).or_insert(0) += n;
    }
    let mut shift = |from: &'static str, to: &'static str| {
        if let Some(n) = counts.get_mut(from).filter(|n| **n > 0) {
            *n -= 1;
            *counts.entry(to).or_insert(0) += 1;
        }
    };
    for (_, status) in running {
        if *status == StateStatus::Warm {
            shift("warm", "hot");
        }
    }
    let running: HashSet<&StateId> = running.iter().map(|(id, _)| id).collect();
    for id in recorded_hot {
        if !running.contains(id) {
            shift("hot", "warm");
        }
    }
    counts
}

impl Controller {
    /// The metrics this controller keeps.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Every metric, in the OpenMetrics text format ([`CONTENT_TYPE`]).
    pub async fn metrics_text(&self) -> Result<String, ControllerError> {
        let running: HashSet<StateId> = self
            .live
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|l| l.state_id)
            .collect();
        let running: Vec<StateId> = running.into_iter().collect();
        let recorded = self.meta.state_status_counts()?;
        let states = presence_counts(
            &recorded.counts,
            &self.meta.statuses_of(&running)?,
            &recorded.hot,
        );
        let gauges = Gauges {
            states,
            local_bytes: self.store.usage().await?,
            remote_bytes: self.store.remote().and_then(|r| r.counted_bytes()),
            instances: self.meta.instance_status_counts()?,
        };
        Ok(self.metrics.encode(gauges))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> StateId {
        format!("{n:02x}").repeat(32).parse().unwrap()
    }

    #[test]
    fn presence_follows_running_instances() {
        // 1 WARM and running, 2 HOT and not, 3 HOT and running, 4 COLD, 5 FAILED.
        let recorded = [
            (StateStatus::Warm, 1),
            (StateStatus::Hot, 2),
            (StateStatus::Cold, 1),
            (StateStatus::Failed, 1),
        ];
        let running = [(id(1), StateStatus::Warm), (id(3), StateStatus::Hot)];
        let c = presence_counts(&recorded, &running, &[id(2), id(3)]);
        assert_eq!(c.get("hot"), Some(&2));
        assert_eq!(c.get("warm"), Some(&1));
        assert_eq!(c.get("cold"), Some(&1));
        assert_eq!(c.get("failed"), Some(&1));
        assert_eq!(c.get("building"), None);
    }

    #[test]
    fn every_series_is_encoded_with_the_const_labels() {
        let m = Metrics::new(&[("pod".into(), "taidon-controller-0".into())]);
        m.build_done(true, 1.5);
        m.build_done(false, 0.1);
        m.restored(RestoreSource::Remote, true);
        m.evicted(Eviction::Idle);
        m.standby_handout(false);
        let text = m.encode(Gauges {
            states: [("warm", 3)].into(),
            local_bytes: 42,
            remote_bytes: None,
            instances: vec![("running".into(), 2)],
        });
        for line in [
            "taidon_states{pod=\"taidon-controller-0\",presence=\"warm\"} 3",
            "taidon_states{pod=\"taidon-controller-0\",presence=\"hot\"} 0",
            "taidon_store_bytes{pod=\"taidon-controller-0\",tier=\"local\"} 42",
            "taidon_instances{pod=\"taidon-controller-0\",status=\"running\"} 2",
            "taidon_builds_total{pod=\"taidon-controller-0\",result=\"ok\"} 1",
            "taidon_builds_total{pod=\"taidon-controller-0\",result=\"failed\"} 1",
            "taidon_build_seconds_count{pod=\"taidon-controller-0\"} 1",
            "taidon_restores_total{pod=\"taidon-controller-0\",source=\"remote\",result=\"ok\"} 1",
            "taidon_evictions_total{pod=\"taidon-controller-0\",reason=\"idle\"} 1",
            "taidon_standby_handouts_total{pod=\"taidon-controller-0\",result=\"miss\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        assert!(!text.contains("tier=\"remote\""), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
