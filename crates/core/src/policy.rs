//! Lifecycle policy: presence levels and their transitions, the retention score, which
//! snapshots to evict under store pressure, which instances to stop, and how many standby
//! instances a state keeps.
//!
//! Everything here is pure: the clock (`now_ms`) is an argument, so the controller and the
//! trace-driven simulator (`crates/sim`) run the very same decisions, and tests are exact.
//!
//! The checkpoint rule: a snapshot may be evicted only if, afterwards, neither it nor any COLD
//! descendant that would then replay through it needs more than `max_replay_ms` of step
//! replay (the summed build costs from its nearest surviving ancestor). This bounds the
//! worst-case cold restore instead of forbidding the eviction of every interior checkpoint: a
//! cheap intermediate step goes, an expensive one that whole subtrees depend on stays.

use std::collections::{HashMap, HashSet};
use std::hash::Hash;

use serde::{Deserialize, Serialize};

/// Where a state is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Presence {
    /// An instance of it runs.
    Hot,
    /// Its snapshot is in the store, no instance runs.
    Warm,
    /// Its snapshot is gone; its metadata stays, and it is rebuilt from its nearest surviving
    /// ancestor when asked for.
    Cold,
    /// Its snapshot is being built (or restored).
    Building,
    /// Its first instance is starting.
    Starting,
    /// Its build failed; the reason is kept.
    Failed,
}

/// What happens to a state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A build (or a cold restore) starts.
    BuildStarted,
    /// The snapshot was published.
    Built,
    /// The build failed.
    BuildFailed,
    /// An instance of it is being started.
    InstanceStarting,
    /// An instance of it accepts connections.
    InstanceUp,
    /// Starting an instance failed.
    InstanceFailed,
    /// Its last running instance stopped.
    LastInstanceStopped,
    /// Its snapshot was evicted.
    Evicted,
    /// Its snapshot is missing from the store (found at reconcile).
    SnapshotLost,
    /// The daemon died during its build; `replayable` when its inputs are kept so it can be
    /// rebuilt on demand.
    Interrupted { replayable: bool },
}

/// A transition the state machine does not have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("no transition from {from:?} on {event:?}")]
pub struct IllegalTransition {
    pub from: Presence,
    pub event: Event,
}

/// The presence level after `event` happens to a state at `from`.
pub fn transition(from: Presence, event: Event) -> Result<Presence, IllegalTransition> {
    use Event as E;
    use Presence as P;
    let to = match (from, event) {
        (P::Cold | P::Failed, E::BuildStarted) => P::Building,
        (P::Building, E::Built) => P::Warm,
        (P::Building, E::BuildFailed) => P::Failed,
        (P::Warm, E::InstanceStarting) => P::Starting,
        (P::Hot, E::InstanceStarting) => P::Hot,
        (P::Starting | P::Hot, E::InstanceUp) => P::Hot,
        (P::Starting, E::InstanceFailed) => P::Warm,
        (P::Hot, E::InstanceFailed) => P::Hot,
        (P::Hot | P::Starting, E::LastInstanceStopped) => P::Warm,
        (P::Warm, E::Evicted) => P::Cold,
        (P::Warm | P::Hot | P::Starting, E::SnapshotLost) => P::Cold,
        (P::Building, E::Interrupted { replayable: true }) => P::Cold,
        (P::Building, E::Interrupted { replayable: false }) => P::Failed,
        (from, event) => return Err(IllegalTransition { from, event }),
    };
    Ok(to)
}

/// How a state is pinned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PinState {
    /// Not pinned.
    #[default]
    None,
    /// Pinned: never evicted.
    Pinned,
    /// Was pinned for a pull request that closed: evicted before anything else.
    ReleasedPr,
}

/// The weights of the retention score (`[policy.weights]` in `config.toml`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Weights {
    /// How much each further access raises the score (on a log scale).
    pub frequency: f64,
    /// Exponent on the rebuild cost in seconds: 1 is proportional.
    pub build_cost: f64,
    /// Exponent on the size in MiB: 1 is per byte.
    pub size: f64,
    /// The score halves every this many milliseconds without an access.
    pub age_half_life_ms: u64,
    /// Added to a pinned state's score (pins are never evicted; this ranks them for
    /// instances and standbys).
    pub pin_bonus: f64,
    /// Multiplies the score of a state whose pull request closed (0: it goes first).
    pub released_pr_factor: f64,
}

impl Default for Weights {
    fn default() -> Self {
        Self {
            frequency: 1.0,
            build_cost: 1.0,
            size: 1.0,
            age_half_life_ms: 24 * 3600 * 1000,
            pin_bonus: 1000.0,
            released_pr_factor: 0.0,
        }
    }
}

/// What the policy knows about one state.
#[derive(Debug, Clone, PartialEq)]
pub struct StateFacts<K> {
    pub id: K,
    pub parent: Option<K>,
    pub presence: Presence,
    pub size_bytes: u64,
    /// What building this one step from its parent cost.
    pub build_cost_ms: u64,
    pub access_count: u64,
    pub last_access_ms: u64,
    pub pin: PinState,
    /// An instance, a standby, a spare clone or a build uses its snapshot now.
    pub in_use: bool,
}

/// The retention score of a state whose rebuild would cost `rebuild_ms`: higher is kept
/// longer. `frequency × cost × recency / size`, each term shaped by its weight:
///
/// `(1 + wf·ln(1 + accesses)) · (1 + rebuild_s)^wc · 0.5^(age / half_life) / (1 + MiB)^ws`,
/// then `+ pin_bonus` when pinned, `× released_pr_factor` when its pull request closed.
pub fn retention_score<K>(f: &StateFacts<K>, rebuild_ms: u64, w: &Weights, now_ms: u64) -> f64 {
    let frequency = 1.0 + w.frequency * (1.0 + f.access_count as f64).ln();
    let cost = (1.0 + rebuild_ms as f64 / 1000.0).powf(w.build_cost);
    let age = now_ms.saturating_sub(f.last_access_ms) as f64;
    let recency = if w.age_half_life_ms == 0 {
        1.0
    } else {
        0.5f64.powf(age / w.age_half_life_ms as f64)
    };
    let size = (1.0 + f.size_bytes as f64 / (1024.0 * 1024.0)).powf(w.size);
    let score = frequency * cost * recency / size;
    match f.pin {
        PinState::Pinned => score + w.pin_bonus,
        PinState::ReleasedPr => score * w.released_pr_factor,
        PinState::None => score,
    }
}

/// How eviction candidates are ranked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Ranking {
    /// The retention score, lowest first.
    Score,
    /// Least recently used first (the baseline the simulator compares against).
    Lru,
}

/// The store's limits, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreLimits {
    /// Eviction starts above this.
    pub high_water_bytes: u64,
    /// Eviction stops at or below this.
    pub low_water_bytes: u64,
    /// No snapshot may need more replay than this after an eviction (the checkpoint rule).
    pub max_replay_ms: u64,
}

/// A view of the state tree: what replaying a state from its nearest surviving ancestor costs.
pub struct Tree<'a, K> {
    facts: HashMap<K, &'a StateFacts<K>>,
    children: HashMap<K, Vec<K>>,
}

impl<'a, K: Copy + Eq + Hash> Tree<'a, K> {
    /// Indexes `states` by id and parent.
    pub fn new(states: &'a [StateFacts<K>]) -> Self {
        let mut facts = HashMap::with_capacity(states.len());
        let mut children: HashMap<K, Vec<K>> = HashMap::new();
        for s in states {
            facts.insert(s.id, s);
            if let Some(p) = s.parent {
                children.entry(p).or_default().push(s.id);
            }
        }
        Self { facts, children }
    }

    /// Whether a state's snapshot is in the store (and not in `gone`).
    fn survives(&self, id: &K, gone: &HashSet<K>) -> bool {
        !gone.contains(id)
            && self.facts.get(id).is_some_and(|f| {
                matches!(
                    f.presence,
                    Presence::Hot | Presence::Warm | Presence::Starting
                )
            })
    }

    /// The summed build costs of `id` and of its ancestors up to (not including) the nearest
    /// one that survives: what getting `id` back costs once `gone` are evicted.
    pub fn replay_ms(&self, id: &K, gone: &HashSet<K>) -> u64 {
        let mut total = 0u64;
        let mut cur = Some(*id);
        while let Some(c) = cur {
            let Some(f) = self.facts.get(&c) else { break };
            total = total.saturating_add(f.build_cost_ms);
            cur = f.parent.filter(|p| !self.survives(p, gone));
        }
        total
    }

    /// The most replay that evicting `id` (besides `gone`) would leave it, or any COLD
    /// descendant that would replay through it, needing.
    pub fn worst_replay_after_evicting(&self, id: &K, gone: &HashSet<K>) -> u64 {
        let mut gone = gone.clone();
        gone.insert(*id);
        let own = self.replay_ms(id, &gone);
        let mut worst = own;
        let mut stack = vec![(*id, own)];
        while let Some((node, replay)) = stack.pop() {
            for child in self.children.get(&node).into_iter().flatten() {
                if self.survives(child, &gone) {
                    continue;
                }
                let Some(f) = self.facts.get(child) else {
                    continue;
                };
                let r = replay.saturating_add(f.build_cost_ms);
                worst = worst.max(r);
                stack.push((*child, r));
            }
        }
        worst
    }
}

/// The snapshots to evict, in order, to bring `used_bytes` down to the low-water mark once it
/// is above the high-water mark. Only WARM, unpinned snapshots nothing uses are candidates, and
/// only while the checkpoint rule holds. Empty when nothing needs to (or can) go.
pub fn choose_evictions<K: Copy + Eq + Hash + Ord>(
    states: &[StateFacts<K>],
    used_bytes: u64,
    limits: &StoreLimits,
    weights: &Weights,
    ranking: Ranking,
    now_ms: u64,
) -> Vec<K> {
    if used_bytes <= limits.high_water_bytes {
        return Vec::new();
    }
    let tree = Tree::new(states);
    let none = HashSet::new();
    let mut ranked: Vec<(f64, &StateFacts<K>)> = states
        .iter()
        .filter(|s| s.presence == Presence::Warm && s.pin != PinState::Pinned && !s.in_use)
        .map(|s| {
            let key = match ranking {
                Ranking::Score => retention_score(s, tree.replay_ms(&s.id, &none), weights, now_ms),
                Ranking::Lru => s.last_access_ms as f64,
            };
            (key, s)
        })
        .collect();
    // Released pull requests first whatever the ranking; ties broken by id for determinism.
    ranked.sort_by(|(a, x), (b, y)| {
        (x.pin != PinState::ReleasedPr)
            .cmp(&(y.pin != PinState::ReleasedPr))
            .then(a.total_cmp(b))
            .then(x.id.cmp(&y.id))
    });
    let mut gone = HashSet::new();
    let mut out = Vec::new();
    let mut used = used_bytes;
    for (_, s) in ranked {
        if used <= limits.low_water_bytes {
            break;
        }
        if tree.worst_replay_after_evicting(&s.id, &gone) > limits.max_replay_ms {
            continue;
        }
        gone.insert(s.id);
        out.push(s.id);
        used = used.saturating_sub(s.size_bytes);
    }
    out
}

/// What the policy knows about one running instance.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceFacts<I, K> {
    pub id: I,
    pub state: K,
    /// Open connections (resolved, not yet released).
    pub connections: u32,
    /// The last resolve, touch or release, or the start.
    pub last_activity_ms: u64,
    /// Activity renews the lease to `last_activity_ms + lease_ttl_ms`.
    pub lease_expires_ms: u64,
    /// A pre-started standby nobody has taken yet (the pool manages those).
    pub standby: bool,
    /// Held by a test's lease (its own instance, or the host of leased databases): only the
    /// lease's release or expiry ends it, never idleness or capacity.
    pub leased: bool,
}

/// Why an instance is stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// No connection for the idle timeout.
    Idle,
    /// No activity renewed its lease: its connection counts are stale.
    LeaseExpired,
    /// Too many instances, or too much memory: the least valuable idle one goes.
    OverCapacity,
}

/// Limits on running instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InstanceLimits {
    pub max_instances: usize,
    pub memory_budget_bytes: u64,
    /// What one instance is counted as using.
    pub memory_per_instance_bytes: u64,
    pub idle_timeout_ms: u64,
}

impl InstanceLimits {
    /// How many instances fit both limits.
    pub fn capacity(&self) -> usize {
        let by_memory = self
            .memory_budget_bytes
            .checked_div(self.memory_per_instance_bytes)
            .map_or(usize::MAX, |n| usize::try_from(n).unwrap_or(usize::MAX));
        self.max_instances.min(by_memory)
    }
}

/// The instances to stop now, and why. An instance with open connections is stopped only when
/// its lease expired (nothing touched it: its count is stale). Idle standbys are left to the
/// pool. Then, while more than `reserve` new instances would not fit, the least valuable idle
/// instance goes: standbys first, then by `score` of its state, lowest first.
pub fn instances_to_stop<I: Copy + Ord, K: Copy>(
    instances: &[InstanceFacts<I, K>],
    limits: &InstanceLimits,
    reserve: usize,
    now_ms: u64,
    score: impl Fn(&K) -> f64,
) -> Vec<(I, StopReason)> {
    let leased = instances.iter().filter(|i| i.leased).count();
    let mut out = Vec::new();
    let instances: Vec<&InstanceFacts<I, K>> = instances.iter().filter(|i| !i.leased).collect();
    for i in &instances {
        if i.standby {
            continue;
        }
        if now_ms >= i.lease_expires_ms {
            out.push((i.id, StopReason::LeaseExpired));
        } else if i.connections == 0
            && now_ms.saturating_sub(i.last_activity_ms) >= limits.idle_timeout_ms
        {
            out.push((i.id, StopReason::Idle));
        }
    }
    let capacity = limits.capacity().saturating_sub(leased);
    let mut running = instances.len() - out.len();
    if running + reserve > capacity {
        let mut idle: Vec<(bool, f64, I)> = instances
            .iter()
            .filter(|i| i.connections == 0 && !out.iter().any(|(id, _)| *id == i.id))
            .map(|i| (!i.standby, score(&i.state), i.id))
            .collect();
        idle.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)).then(a.2.cmp(&b.2)));
        for (_, _, id) in idle {
            if running + reserve <= capacity {
                break;
            }
            out.push((id, StopReason::OverCapacity));
            running -= 1;
        }
    }
    out
}

/// How many fresh copies of a state to keep ready for leases: enough to cover the requests
/// that arrive while one copy is made (the recent lease rate times the time one copy takes,
/// doubled against bursts), never fewer than `min` nor more than `max`.
pub fn lease_ready_target(leases_per_s: f64, refill_ms: u64, min: usize, max: usize) -> usize {
    let demand = leases_per_s.max(0.0) * (refill_ms as f64 / 1000.0) * 2.0;
    let want = if demand.is_finite() {
        demand.ceil() as usize
    } else {
        max
    };
    want.max(min).min(max.max(min))
}

/// The rate of recent events: how many fell in the last `window_ms`, per second.
pub fn recent_rate(times_ms: &[u64], now_ms: u64, window_ms: u64) -> f64 {
    if window_ms == 0 {
        return 0.0;
    }
    let since = now_ms.saturating_sub(window_ms);
    let n = times_ms
        .iter()
        .filter(|t| **t > since && **t <= now_ms)
        .count();
    n as f64 * 1000.0 / window_ms as f64
}

/// The standby pool's sizes (`[policy.standby]` in `config.toml`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StandbyPolicy {
    /// Standbys of a pinned HOT state.
    pub pinned: usize,
    /// Standbys of a recently busy HOT state.
    pub busy: usize,
    /// Standbys of any other state.
    pub other: usize,
    /// A state is busy when accessed at least `busy_accesses` times and last within this.
    pub busy_window_ms: u64,
    pub busy_accesses: u64,
}

impl Default for StandbyPolicy {
    fn default() -> Self {
        Self {
            pinned: 1,
            busy: 1,
            other: 0,
            busy_window_ms: 10 * 60 * 1000,
            busy_accesses: 2,
        }
    }
}

/// How many standby instances a state should have. A pinned or recently busy state with a
/// snapshot keeps its standbys whether or not a user's instance runs: the pool is what keeps
/// it HOT between the runs of a `prepare … run …` loop, which removes each instance after it.
pub fn standby_target<K>(f: &StateFacts<K>, p: &StandbyPolicy, now_ms: u64) -> usize {
    if !matches!(f.presence, Presence::Hot | Presence::Warm) {
        return 0;
    }
    let busy = f.access_count >= p.busy_accesses
        && now_ms.saturating_sub(f.last_access_ms) <= p.busy_window_ms;
    match f.pin {
        PinState::Pinned => p.pinned.max(if busy { p.busy } else { 0 }),
        _ if busy => p.busy,
        _ => p.other,
    }
}

#[cfg(test)]
mod tests;
