//! A trace-driven simulator of the lifecycle policy. It generates a synthetic trace (projects
//! whose main line grows by migrations, pull requests that branch off and close, Zipf-
//! distributed accesses, realistic sizes and build costs) and replays it against a store of
//! limited capacity, calling the same `taidon_core::policy::choose_evictions` the controller
//! calls, once ranked by the retention score and once by LRU.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]
#![deny(clippy::todo, clippy::dbg_macro)]

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use taidon_core::policy::{
    choose_evictions, PinState, Presence, Ranking, StateFacts, StoreLimits, Weights,
};

const MIB: u64 = 1024 * 1024;
const HOUR_MS: u64 = 3600 * 1000;

/// The shape of a synthetic trace.
#[derive(Debug, Clone)]
pub struct TraceSpec {
    pub seed: u64,
    pub projects: usize,
    pub states: usize,
    pub accesses: usize,
    /// Simulated duration.
    pub days: u64,
    /// Zipf exponent of state popularity.
    pub zipf: f64,
    /// Share of new states that are pull-request states (the rest extend a main line).
    pub pr_share: f64,
}

impl Default for TraceSpec {
    fn default() -> Self {
        Self {
            seed: 42,
            projects: 30,
            states: 3000,
            accesses: 60_000,
            days: 30,
            zipf: 1.0,
            pr_share: 0.6,
        }
    }
}

/// One state of the trace.
#[derive(Debug, Clone)]
pub struct SimState {
    pub parent: Option<usize>,
    pub size_bytes: u64,
    pub build_cost_ms: u64,
    pub created_ms: u64,
    /// When its pull request closed: no access after, and its pin is released.
    pub closed_ms: Option<u64>,
    /// The head of its project's main line until this time (pinned `main` meanwhile).
    pub main_until_ms: Option<u64>,
}

/// What happens, in time order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Access { t_ms: u64, state: usize },
}

/// A generated trace.
#[derive(Debug, Clone)]
pub struct Trace {
    pub states: Vec<SimState>,
    pub ops: Vec<Op>,
}

/// A log-uniform draw in `[lo, hi]`: sizes and costs spread over orders of magnitude.
fn log_uniform(rng: &mut StdRng, lo: f64, hi: f64) -> f64 {
    (lo.ln() + rng.gen::<f64>() * (hi.ln() - lo.ln())).exp()
}

/// Generates the trace `spec` describes; the same spec gives the same trace.
pub fn generate(spec: &TraceSpec) -> Trace {
    let mut rng = StdRng::seed_from_u64(spec.seed);
    let span = spec.days * 24 * HOUR_MS;
    let mut states: Vec<SimState> = Vec::with_capacity(spec.states);
    // Each project: a base (initdb, small) and a main head that moves.
    let mut heads = Vec::with_capacity(spec.projects);
    for _ in 0..spec.projects {
        states.push(SimState {
            parent: None,
            size_bytes: 40 * MIB,
            build_cost_ms: 1500,
            created_ms: 0,
            closed_ms: None,
            main_until_ms: None,
        });
        // A project's schema: a bigger first load, then migrations and seeds.
        let base = states.len() - 1;
        let size = log_uniform(&mut rng, 20.0, 2000.0) as u64 * MIB;
        let cost = log_uniform(&mut rng, 2_000.0, 900_000.0) as u64;
        states.push(SimState {
            parent: Some(base),
            size_bytes: size,
            build_cost_ms: cost,
            created_ms: 0,
            closed_ms: None,
            main_until_ms: Some(u64::MAX),
        });
        heads.push(states.len() - 1);
    }
    while states.len() < spec.states {
        let t = (states.len() as u64 * span) / spec.states as u64;
        let project = rng.gen_range(0..spec.projects);
        let head = heads[project];
        let parent_size = states[head].size_bytes;
        let size = parent_size + log_uniform(&mut rng, 0.1, 100.0) as u64 * MIB;
        // Most steps are cheap migrations; a few are heavy data loads.
        let cost = if rng.gen_bool(0.1) {
            log_uniform(&mut rng, 60_000.0, 1_200_000.0)
        } else {
            log_uniform(&mut rng, 300.0, 20_000.0)
        } as u64;
        if rng.gen_bool(spec.pr_share) {
            let life = log_uniform(&mut rng, 2.0 * HOUR_MS as f64, 7.0 * 24.0 * HOUR_MS as f64);
            states.push(SimState {
                parent: Some(head),
                size_bytes: size,
                build_cost_ms: cost,
                created_ms: t,
                closed_ms: Some(t + life as u64),
                main_until_ms: None,
            });
        } else {
            states[head].main_until_ms = Some(t);
            states.push(SimState {
                parent: Some(head),
                size_bytes: size,
                build_cost_ms: cost,
                created_ms: t,
                closed_ms: None,
                main_until_ms: Some(u64::MAX),
            });
            heads[project] = states.len() - 1;
        }
    }
    // Popularity: a random order over states, Zipf over that order; an access picks a state
    // alive at its time (created, not closed), newer ones favoured by redrawing old picks.
    let mut order: Vec<usize> = (0..states.len()).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.gen_range(0..=i));
    }
    let cdf: Vec<f64> = {
        let mut acc = 0.0;
        (1..=order.len())
            .map(|r| {
                acc += 1.0 / (r as f64).powf(spec.zipf);
                acc
            })
            .collect()
    };
    let total = cdf.last().copied().unwrap_or(1.0);
    let mut ops = Vec::with_capacity(spec.accesses);
    for k in 0..spec.accesses {
        let t = (k as u64 * span) / spec.accesses as u64 + 1;
        let alive = |s: &SimState| s.created_ms < t && s.closed_ms.is_none_or(|c| t < c);
        let mut pick = None;
        for _ in 0..64 {
            let u = rng.gen::<f64>() * total;
            let rank = cdf.partition_point(|c| *c < u).min(order.len() - 1);
            let s = order[rank];
            if alive(&states[s]) {
                pick = Some(s);
                break;
            }
        }
        if let Some(state) = pick {
            ops.push(Op::Access { t_ms: t, state });
        }
    }
    Trace { states, ops }
}

/// The store and policy a replay runs under.
#[derive(Debug, Clone, Copy)]
pub struct SimConfig {
    pub capacity_bytes: u64,
    /// Eviction stops at this share of the capacity.
    pub low_water: f64,
    pub max_replay_ms: u64,
    pub weights: Weights,
    pub ranking: Ranking,
}

/// What a replay measured.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SimResult {
    pub accesses: u64,
    /// Accesses whose state was in the store.
    pub hits: u64,
    /// Builds of states never built before (every policy pays these).
    pub first_build_ms: u64,
    /// Builds of states evicted earlier: what the policy costs.
    pub rebuild_ms: u64,
    pub rebuilt_states: u64,
    pub evictions: u64,
    pub peak_bytes: u64,
}

impl SimResult {
    pub fn hit_rate(&self) -> f64 {
        if self.accesses == 0 {
            0.0
        } else {
            self.hits as f64 / self.accesses as f64
        }
    }
}

/// Replays `trace` under `config`.
pub fn simulate(trace: &Trace, config: &SimConfig) -> SimResult {
    let mut facts: Vec<StateFacts<usize>> = trace
        .states
        .iter()
        .enumerate()
        .map(|(id, s)| StateFacts {
            id,
            parent: s.parent,
            presence: Presence::Cold,
            size_bytes: s.size_bytes,
            build_cost_ms: s.build_cost_ms,
            access_count: 0,
            last_access_ms: 0,
            pin: PinState::None,
            in_use: false,
        })
        .collect();
    let mut built_once = vec![false; facts.len()];
    let mut used = 0u64;
    let mut r = SimResult::default();
    let high = config.capacity_bytes;
    let limits = StoreLimits {
        high_water_bytes: high,
        low_water_bytes: (high as f64 * config.low_water) as u64,
        max_replay_ms: config.max_replay_ms,
    };
    let mut last_in_use = None;
    for op in &trace.ops {
        let Op::Access { t_ms, state } = *op;
        // Pins as the webhook would set them: the main heads; closed pull requests released.
        for (i, s) in trace.states.iter().enumerate() {
            facts[i].pin = if s.main_until_ms.is_some_and(|u| t_ms < u) {
                PinState::Pinned
            } else if s.closed_ms.is_some_and(|c| c <= t_ms) {
                PinState::ReleasedPr
            } else {
                PinState::None
            };
        }
        r.accesses += 1;
        if facts[state].presence == Presence::Warm {
            r.hits += 1;
        } else {
            // Replay from the nearest surviving ancestor, publishing each checkpoint.
            let mut missing = vec![state];
            let mut cur = facts[state].parent;
            while let Some(p) = cur {
                if facts[p].presence == Presence::Warm {
                    break;
                }
                missing.push(p);
                cur = facts[p].parent;
            }
            for s in missing {
                if built_once[s] {
                    r.rebuild_ms += facts[s].build_cost_ms;
                    r.rebuilt_states += 1;
                } else {
                    r.first_build_ms += facts[s].build_cost_ms;
                    built_once[s] = true;
                }
                facts[s].presence = Presence::Warm;
                used += facts[s].size_bytes;
            }
        }
        facts[state].access_count += 1;
        facts[state].last_access_ms = t_ms;
        // The instance of this access runs now; the previous one has ended.
        if let Some(prev) = last_in_use.replace(state) {
            facts[prev].in_use = false;
        }
        facts[state].in_use = true;
        r.peak_bytes = r.peak_bytes.max(used);
        let evict = choose_evictions(&facts, used, &limits, &config.weights, config.ranking, t_ms);
        for s in evict {
            facts[s].presence = Presence::Cold;
            used -= facts[s].size_bytes;
            r.evictions += 1;
        }
    }
    r
}

/// The store bytes of every state at once, to size a capacity as a share of it.
pub fn total_bytes(trace: &Trace) -> u64 {
    trace.states.iter().map(|s| s.size_bytes).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> TraceSpec {
        TraceSpec {
            states: 300,
            accesses: 3000,
            projects: 5,
            ..TraceSpec::default()
        }
    }

    #[test]
    fn a_trace_is_deterministic_and_well_formed() {
        let a = generate(&small());
        let b = generate(&small());
        assert_eq!(a.ops, b.ops);
        assert_eq!(a.states.len(), 300);
        for (i, s) in a.states.iter().enumerate() {
            if let Some(p) = s.parent {
                assert!(p < i, "parents come first");
            }
        }
        assert!(
            a.ops.len() > 2400,
            "most accesses find a live state: {}",
            a.ops.len()
        );
        assert!(a.states.iter().any(|s| s.closed_ms.is_some()));
    }

    #[test]
    fn an_unlimited_store_only_builds_each_state_once() {
        let trace = generate(&small());
        let r = simulate(
            &trace,
            &SimConfig {
                capacity_bytes: u64::MAX,
                low_water: 0.9,
                max_replay_ms: u64::MAX,
                weights: Weights::default(),
                ranking: Ranking::Score,
            },
        );
        assert_eq!((r.rebuild_ms, r.evictions), (0, 0));
        assert_eq!(r.accesses, trace.ops.len() as u64);
        assert!(r.hits > 0 && r.hits < r.accesses);
    }

    #[test]
    fn a_small_store_evicts_and_rebuilds_within_its_capacity() {
        let trace = generate(&small());
        let cap = total_bytes(&trace) / 10;
        for ranking in [Ranking::Score, Ranking::Lru] {
            let r = simulate(
                &trace,
                &SimConfig {
                    capacity_bytes: cap,
                    low_water: 0.9,
                    max_replay_ms: u64::MAX,
                    weights: Weights::default(),
                    ranking,
                },
            );
            assert!(r.evictions > 0, "{ranking:?}");
            assert!(r.rebuild_ms > 0, "{ranking:?}");
        }
    }
}
