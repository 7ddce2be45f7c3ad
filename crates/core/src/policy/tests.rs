use super::*;

const MIB: u64 = 1024 * 1024;

fn state(id: u32, parent: Option<u32>, cost: u64) -> StateFacts<u32> {
    StateFacts {
        id,
        parent,
        presence: Presence::Warm,
        size_bytes: MIB,
        build_cost_ms: cost,
        access_count: 0,
        last_access_ms: 0,
        pin: PinState::None,
        in_use: false,
    }
}

fn weights() -> Weights {
    Weights {
        frequency: 1.0,
        build_cost: 1.0,
        size: 1.0,
        age_half_life_ms: 1000,
        pin_bonus: 1000.0,
        released_pr_factor: 0.0,
    }
}

#[test]
fn transitions_follow_the_state_machine() {
    use Event as E;
    use Presence as P;
    let legal = [
        (P::Cold, E::BuildStarted, P::Building),
        (P::Failed, E::BuildStarted, P::Building),
        (P::Building, E::Built, P::Warm),
        (P::Building, E::BuildFailed, P::Failed),
        (P::Warm, E::InstanceStarting, P::Starting),
        (P::Hot, E::InstanceStarting, P::Hot),
        (P::Starting, E::InstanceUp, P::Hot),
        (P::Starting, E::InstanceFailed, P::Warm),
        (P::Hot, E::LastInstanceStopped, P::Warm),
        (P::Warm, E::Evicted, P::Cold),
        (P::Warm, E::SnapshotLost, P::Cold),
        (P::Building, E::Interrupted { replayable: true }, P::Cold),
        (P::Building, E::Interrupted { replayable: false }, P::Failed),
    ];
    for (from, event, to) in legal {
        assert_eq!(transition(from, event), Ok(to), "{from:?} on {event:?}");
    }
    // A HOT snapshot is in use and cannot be evicted; a COLD one has nothing to evict.
    for (from, event) in [
        (P::Hot, E::Evicted),
        (P::Cold, E::Evicted),
        (P::Warm, E::Built),
        (P::Cold, E::InstanceStarting),
        (P::Warm, E::BuildStarted),
    ] {
        assert_eq!(
            transition(from, event),
            Err(IllegalTransition { from, event })
        );
    }
}

#[test]
fn score_is_frequency_times_cost_times_recency_over_size() {
    let w = weights();
    let mut s = state(1, None, 0);
    s.size_bytes = 0;
    // Nothing known: every term is 1.
    assert_eq!(retention_score(&s, 0, &w, 0), 1.0);
    // 1 s rebuild doubles it, 1 MiB halves it, one half-life of age halves it.
    s.size_bytes = MIB;
    assert_eq!(retention_score(&s, 1000, &w, 1000), 0.5);
    // e - 1 accesses make the frequency term 1 + ln(e) = 2.
    s.access_count = 3;
    let f = 1.0 + 4f64.ln();
    assert_eq!(retention_score(&s, 1000, &w, 1000), f * 2.0 * 0.5 / 2.0);
    s.pin = PinState::Pinned;
    assert_eq!(retention_score(&s, 1000, &w, 1000), f * 0.5 + 1000.0);
    s.pin = PinState::ReleasedPr;
    assert_eq!(retention_score(&s, 1000, &w, 1000), 0.0);
    // Weight 0 switches a term off.
    let flat = Weights {
        frequency: 0.0,
        build_cost: 0.0,
        size: 0.0,
        age_half_life_ms: 0,
        ..w
    };
    s.pin = PinState::None;
    assert_eq!(retention_score(&s, 123_456, &flat, 99_999), 1.0);
}

/// a ─ b ─ c ─ d, with d's sibling e under c.
fn chain() -> Vec<StateFacts<u32>> {
    vec![
        state(1, None, 10),
        state(2, Some(1), 20),
        state(3, Some(2), 30),
        state(4, Some(3), 40),
        state(5, Some(3), 50),
    ]
}

#[test]
fn replay_runs_back_to_the_nearest_surviving_ancestor() {
    let mut states = chain();
    states[1].presence = Presence::Cold; // b
    let tree = Tree::new(&states);
    let none = HashSet::new();
    assert_eq!(tree.replay_ms(&4, &none), 40);
    // c's parent b is COLD: getting c back replays b too.
    assert_eq!(tree.replay_ms(&3, &none), 30 + 20);
    let gone = HashSet::from([3]);
    // d replays c and b (a survives).
    assert_eq!(tree.replay_ms(&4, &gone), 40 + 30 + 20);
    // The base replays itself (initdb) only.
    assert_eq!(tree.replay_ms(&1, &HashSet::from([1])), 10);
    // Evicting c leaves COLD b behind it: c needs 30 + 20; its children survive.
    assert_eq!(tree.worst_replay_after_evicting(&3, &none), 50);
    // With e gone too, e would replay e, c, b.
    assert_eq!(
        tree.worst_replay_after_evicting(&3, &HashSet::from([5])),
        50 + 50
    );
}

fn limits(high: u64, low: u64, max_replay_ms: u64) -> StoreLimits {
    StoreLimits {
        high_water_bytes: high * MIB,
        low_water_bytes: low * MIB,
        max_replay_ms,
    }
}

#[test]
fn nothing_is_evicted_below_the_high_water_mark() {
    let states = chain();
    let got = choose_evictions(
        &states,
        5 * MIB,
        &limits(5, 1, u64::MAX),
        &weights(),
        Ranking::Score,
        0,
    );
    assert!(got.is_empty());
}

#[test]
fn eviction_goes_lowest_score_first_down_to_low_water_and_skips_pins_and_use() {
    let mut states = chain();
    // Costs: a 10, b 20, c 30, d 40, e 50; all 1 MiB, never accessed, same age: the
    // cheapest rebuild goes first. a is pinned, b is in use.
    states[0].pin = PinState::Pinned;
    states[1].in_use = true;
    let got = choose_evictions(
        &states,
        5 * MIB,
        &limits(4, 2, u64::MAX),
        &weights(),
        Ranking::Score,
        0,
    );
    assert_eq!(got, vec![3, 4, 5]);
    let got = choose_evictions(
        &states,
        5 * MIB,
        &limits(4, 3, u64::MAX),
        &weights(),
        Ranking::Score,
        0,
    );
    assert_eq!(got, vec![3, 4]);
}

#[test]
fn released_pull_requests_go_first_and_lru_ranks_by_last_access() {
    let mut states = chain();
    for (i, s) in states.iter_mut().enumerate() {
        s.last_access_ms = 100 - i as u64; // e was used longest ago
        s.access_count = 5;
    }
    states[3].pin = PinState::ReleasedPr; // d
    let lim = limits(4, 3, u64::MAX);
    let lru = choose_evictions(&states, 5 * MIB, &lim, &weights(), Ranking::Lru, 100);
    assert_eq!(lru, vec![4, 5]);
    let score = choose_evictions(&states, 5 * MIB, &lim, &weights(), Ranking::Score, 100);
    assert_eq!(score, vec![4, 1]);
}

#[test]
fn the_checkpoint_rule_keeps_what_descendants_replay_through() {
    let mut states = chain();
    states[1].presence = Presence::Cold; // b
    states[3].presence = Presence::Cold; // d replays through c
    states[0].pin = PinState::Pinned; // a
                                      // Evicting c: c needs c+b = 50, d would need d+c+b = 90.
    let got = choose_evictions(
        &states,
        3 * MIB,
        &limits(1, 0, 89),
        &weights(),
        Ranking::Score,
        0,
    );
    assert_eq!(got, vec![5], "c stays: d would replay 90 ms");
    let got = choose_evictions(
        &states,
        3 * MIB,
        &limits(1, 0, 90),
        &weights(),
        Ranking::Score,
        0,
    );
    // Then e would replay e, c, b: 100 ms.
    assert_eq!(got, vec![3]);
    // Once an ancestor goes, everything below replays further: a then c would leave d 100.
    states[0].pin = PinState::None;
    let got = choose_evictions(
        &states,
        3 * MIB,
        &limits(1, 0, 90),
        &weights(),
        Ranking::Score,
        0,
    );
    assert_eq!(
        got,
        vec![1, 5],
        "a goes first (cheapest), then c would leave d 100 ms"
    );
}

fn inst(id: u32, state: u32, connections: u32, last: u64) -> InstanceFacts<u32, u32> {
    InstanceFacts {
        id,
        state,
        connections,
        last_activity_ms: last,
        lease_expires_ms: last + 10_000,
        standby: false,
        leased: false,
    }
}

#[test]
fn a_leased_instance_is_never_stopped_and_takes_its_room() {
    let mut held = inst(1, 1, 0, 0);
    held.leased = true;
    held.lease_expires_ms = 0; // stale connection counts do not end a test's lease
    let idle = inst(2, 2, 0, 0);
    let limits = ilimits(2);
    let out = instances_to_stop(&[held, idle], &limits, 1, 1_000_000, |_| 0.0);
    assert!(out.iter().all(|(id, _)| *id != 1), "{out:?}");
    // The lease holds one of the two places: one more instance needs the idle one gone.
    assert!(out.contains(&(2, StopReason::LeaseExpired)), "{out:?}");
}

#[test]
fn the_lease_pool_follows_the_recent_rate_within_its_bounds() {
    // Idle: the floor.
    assert_eq!(lease_ready_target(0.0, 150, 2, 32), 2);
    // 10 leases/s, 150 ms per copy: 1.5 copies made meanwhile, doubled: 3.
    assert_eq!(lease_ready_target(10.0, 150, 2, 32), 3);
    // 40 leases/s, 500 ms per copy: 40, capped.
    assert_eq!(lease_ready_target(40.0, 500, 2, 32), 32);
    assert_eq!(lease_ready_target(f64::INFINITY, 500, 2, 32), 32);
    // A max below the min is the min.
    assert_eq!(lease_ready_target(0.0, 100, 4, 1), 4);
    let times = [1_000, 30_000, 59_000, 61_000];
    // The window (1 s, 61 s] holds three: 3 per 60 s.
    assert!((recent_rate(&times, 61_000, 60_000) - 0.05).abs() < 1e-9);
    assert_eq!(recent_rate(&times, 61_000, 0), 0.0);
}

fn ilimits(max: usize) -> InstanceLimits {
    InstanceLimits {
        max_instances: max,
        memory_budget_bytes: 1000 * MIB,
        memory_per_instance_bytes: 100 * MIB,
        idle_timeout_ms: 600,
    }
}

#[test]
fn idle_and_expired_instances_stop_and_connections_keep_one_alive() {
    let mut busy_expired = inst(4, 1, 2, 0);
    busy_expired.lease_expires_ms = 900;
    let mut standby = inst(5, 1, 0, 0);
    standby.standby = true;
    let instances = [
        inst(1, 1, 0, 400), // idle 600 ms: stops
        inst(2, 1, 0, 401), // idle 599 ms: stays
        inst(3, 1, 3, 0),   // connections keep it alive
        busy_expired,       // nothing touched it: its count is stale
        standby,            // the pool's business
    ];
    let got = instances_to_stop(&instances, &ilimits(10), 0, 1000, |_| 0.0);
    assert_eq!(
        got,
        vec![(1, StopReason::Idle), (4, StopReason::LeaseExpired)]
    );
}

#[test]
fn over_capacity_the_least_valuable_idle_instance_goes_standbys_first() {
    let mut standby = inst(4, 30, 0, 990);
    standby.standby = true;
    let instances = [
        inst(1, 10, 0, 990), // state score 10
        inst(2, 20, 0, 990), // state score 20
        inst(3, 5, 1, 990),  // busy, never chosen
        standby,
    ];
    let score = |s: &u32| f64::from(*s);
    // Four run, room for four: nothing to do until a new one is asked for.
    assert!(instances_to_stop(&instances, &ilimits(4), 0, 1000, score).is_empty());
    assert_eq!(
        instances_to_stop(&instances, &ilimits(4), 1, 1000, score),
        vec![(4, StopReason::OverCapacity)]
    );
    assert_eq!(
        instances_to_stop(&instances, &ilimits(3), 1, 1000, score),
        vec![(4, StopReason::OverCapacity), (1, StopReason::OverCapacity)]
    );
    // The memory budget counts too: 250 MiB holds two instances.
    let by_memory = InstanceLimits {
        memory_budget_bytes: 250 * MIB,
        ..ilimits(10)
    };
    assert_eq!(by_memory.capacity(), 2);
    assert_eq!(
        instances_to_stop(&instances, &by_memory, 0, 1000, score),
        vec![(4, StopReason::OverCapacity), (1, StopReason::OverCapacity)]
    );
}

#[test]
fn standbys_for_pinned_or_busy_states_with_a_snapshot_only() {
    let p = StandbyPolicy::default();
    let mut s = state(1, None, 0);
    s.presence = Presence::Hot;
    s.access_count = 1;
    s.last_access_ms = 0;
    assert_eq!(standby_target(&s, &p, 1), 0);
    s.access_count = 2;
    assert_eq!(standby_target(&s, &p, p.busy_window_ms), 1);
    assert_eq!(
        standby_target(&s, &p, p.busy_window_ms + 1),
        0,
        "not recent"
    );
    s.pin = PinState::Pinned;
    assert_eq!(standby_target(&s, &p, p.busy_window_ms + 1), 1);
    // Between runs no user instance is left, the state is WARM: its standby stays.
    s.presence = Presence::Warm;
    assert_eq!(standby_target(&s, &p, 0), 1);
    s.pin = PinState::None;
    assert_eq!(standby_target(&s, &p, p.busy_window_ms), 1);
    assert_eq!(standby_target(&s, &p, p.busy_window_ms + 1), 0);
    // Without a snapshot there is nothing to start a standby from.
    for presence in [Presence::Cold, Presence::Building, Presence::Failed] {
        s.presence = presence;
        s.pin = PinState::Pinned;
        assert_eq!(standby_target(&s, &p, 0), 0, "{presence:?}");
    }
}
