//! Admission limits kept by the gateway itself: connection-rate buckets per client address and
//! per token subject, and caps on the connections waiting for a starting instance.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use taidon_core::StateId;

/// A token bucket: `burst` connections at once, refilled at `per_s` a second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub burst: u32,
    pub per_s: u32,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Token buckets keyed by client address or subject.
#[derive(Debug)]
pub(crate) struct RateLimiter<K> {
    limit: RateLimit,
    buckets: Mutex<HashMap<K, Bucket>>,
}

/// Past this many keys, full buckets are forgotten (they are the same as absent ones).
const PRUNE_AT: usize = 10_000;

impl<K: Eq + Hash + Clone> RateLimiter<K> {
    pub(crate) fn new(limit: RateLimit) -> Self {
        Self {
            limit,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token for `key` at `now`; false when its bucket is empty.
    pub(crate) fn allow(&self, key: &K, now: Instant) -> bool {
        let burst = f64::from(self.limit.burst);
        let rate = f64::from(self.limit.per_s);
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() > PRUNE_AT {
            buckets.retain(|_, b| b.tokens + rate * now.duration_since(b.at).as_secs_f64() < burst);
        }
        let b = buckets.entry(key.clone()).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        b.tokens = (b.tokens + rate * now.duration_since(b.at).as_secs_f64()).min(burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// How many connections wait for a starting instance, overall and per state.
#[derive(Debug, Default)]
pub(crate) struct Waiting {
    counts: Mutex<(usize, HashMap<StateId, usize>)>,
}

/// One connection counted in [`Waiting`] until dropped.
pub(crate) struct WaitingSlot<'a> {
    waiting: &'a Waiting,
    state: StateId,
}

impl Waiting {
    /// Counts one more waiter on `state` unless a cap is reached.
    pub(crate) fn enter(
        &self,
        state: StateId,
        max_total: usize,
        max_per_state: usize,
    ) -> Option<WaitingSlot<'_>> {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let per = c.1.get(&state).copied().unwrap_or(0);
        if c.0 >= max_total || per >= max_per_state {
            return None;
        }
        c.0 += 1;
        *c.1.entry(state).or_insert(0) += 1;
        Some(WaitingSlot {
            waiting: self,
            state,
        })
    }

    #[cfg(test)]
    pub(crate) fn total(&self) -> usize {
        self.counts.lock().unwrap_or_else(|p| p.into_inner()).0
    }
}

impl Drop for WaitingSlot<'_> {
    fn drop(&mut self) {
        let mut c = self
            .waiting
            .counts
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        c.0 = c.0.saturating_sub(1);
        if let Some(n) = c.1.get_mut(&self.state) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.1.remove(&self.state);
            }
        }
    }
}

/// How long a session may live and stay idle; `None` is no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct SessionLimits {
    pub(crate) max_idle: Option<Duration>,
    pub(crate) max_duration: Option<Duration>,
}

impl SessionLimits {
    /// The tighter of each limit.
    pub(crate) fn min(self, other: SessionLimits) -> SessionLimits {
        fn tighter(a: Option<Duration>, b: Option<Duration>) -> Option<Duration> {
            match (a, b) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }
        }
        SessionLimits {
            max_idle: tighter(self.max_idle, other.max_idle),
            max_duration: tighter(self.max_duration, other.max_duration),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_a_burst_then_refills() {
        let rl = RateLimiter::new(RateLimit { burst: 3, per_s: 2 });
        let t0 = Instant::now();
        assert!((0..3).all(|_| rl.allow(&"a", t0)));
        assert!(!rl.allow(&"a", t0));
        assert!(rl.allow(&"b", t0), "keys are separate");
        assert!(rl.allow(&"a", t0 + Duration::from_millis(600)));
        assert!(!rl.allow(&"a", t0 + Duration::from_millis(600)));
    }

    #[test]
    fn waiting_caps_total_and_per_state_and_slots_release() {
        let w = Waiting::default();
        let s1 = StateId::from_bytes([1; 32]);
        let s2 = StateId::from_bytes([2; 32]);
        let a = w.enter(s1, 3, 2).unwrap();
        let _b = w.enter(s1, 3, 2).unwrap();
        assert!(w.enter(s1, 3, 2).is_none(), "per state");
        let _c = w.enter(s2, 3, 2).unwrap();
        assert!(w.enter(s2, 3, 2).is_none(), "overall");
        drop(a);
        assert_eq!(w.total(), 2);
        assert!(w.enter(s1, 3, 2).is_some());
    }

    #[test]
    fn session_limits_take_the_tighter() {
        let a = SessionLimits {
            max_idle: Some(Duration::from_secs(5)),
            max_duration: None,
        };
        let b = SessionLimits {
            max_idle: Some(Duration::from_secs(9)),
            max_duration: Some(Duration::from_secs(1)),
        };
        assert_eq!(
            a.min(b),
            SessionLimits {
                max_idle: Some(Duration::from_secs(5)),
                max_duration: Some(Duration::from_secs(1)),
            }
        );
    }
}
