//! When to try an unreachable peer again.
//!
//! The network loop's redial sweep pushes documents to every peer this node shares them
//! with and is not connected to. A company has thousands of customers and most are offline
//! at any moment: dialling each of them every sweep spends the loop on dials that fail and
//! lookups that find nothing. So a peer whose dial failed waits before the sweep tries it
//! again, twice as long after each failure, up to [`Redials::max`]; a connection, either
//! way, clears it. A person's own action (a message, a grant) still dials at once, and a
//! peer that comes online and connects gets what it lacks then (`Loop::on_connected`).
//!
//! Pure: the caller passes the time, so the rule is tested without a clock.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// The sweep's memory of unreachable peers.
#[derive(Debug)]
pub(crate) struct Redials<K> {
    waits: HashMap<K, Wait>,
    base: Duration,
    max: Duration,
}

#[derive(Debug, Clone, Copy)]
struct Wait {
    until: Instant,
    delay: Duration,
}

impl<K: Eq + Hash + Copy> Redials<K> {
    /// After a first failure a peer waits `base`; each further failure doubles the wait,
    /// up to `max`.
    pub(crate) fn new(base: Duration, max: Duration) -> Self {
        Redials {
            waits: HashMap::new(),
            base,
            max: max.max(base),
        }
    }

    /// Whether the sweep may dial `peer` at `now`.
    pub(crate) fn due(&self, peer: &K, now: Instant) -> bool {
        self.waits.get(peer).is_none_or(|w| now >= w.until)
    }

    /// A dial of `peer` failed at `now`: it waits longer before the next.
    pub(crate) fn failed(&mut self, peer: K, now: Instant) {
        let delay = match self.waits.get(&peer) {
            // A failure while it still waits (a dial by a person's action) does not
            // lengthen the wait again.
            Some(w) if now < w.until => return,
            Some(w) => w.delay.saturating_mul(2).min(self.max),
            None => self.base,
        };
        self.waits.insert(
            peer,
            Wait {
                until: now + delay,
                delay,
            },
        );
    }

    /// `peer` connected: the next sweep may dial it as soon as it is needed.
    pub(crate) fn connected(&mut self, peer: &K) {
        self.waits.remove(peer);
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const BASE: Duration = Duration::from_secs(20);
    const MAX: Duration = Duration::from_secs(1800);

    #[test]
    fn a_peer_that_keeps_failing_waits_twice_as_long_each_time_up_to_the_cap() {
        let t0 = Instant::now();
        let mut r = Redials::new(BASE, MAX);
        assert!(r.due(&1, t0));
        let mut now = t0;
        let mut waits = Vec::new();
        for _ in 0..10 {
            r.failed(1, now);
            let mut wait = Duration::ZERO;
            while !r.due(&1, now + wait) {
                wait += Duration::from_secs(1);
            }
            waits.push(wait.as_secs());
            now += wait;
        }
        assert_eq!(waits, [20, 40, 80, 160, 320, 640, 1280, 1800, 1800, 1800]);
        r.connected(&1);
        assert!(r.due(&1, now));
    }

    #[derive(Debug, Clone)]
    enum Step {
        Fail(u8),
        Connect(u8),
        Pass(u16),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (0u8..4).prop_map(Step::Fail),
            (0u8..4).prop_map(Step::Connect),
            (0u16..4000).prop_map(Step::Pass),
        ]
    }

    proptest! {
        /// Whatever happens: a peer that never failed since it last connected is due; a
        /// peer that failed is not due again before `BASE` has passed, and is due again
        /// once `MAX` has passed since its last failure.
        #[test]
        fn failures_hold_a_peer_back_between_base_and_max(steps in proptest::collection::vec(step(), 0..64)) {
            let t0 = Instant::now();
            let mut now = t0;
            let mut r = Redials::new(BASE, MAX);
            let mut last_failure: HashMap<u8, Instant> = HashMap::new();
            for s in steps {
                match s {
                    Step::Fail(p) => {
                        let was_due = r.due(&p, now);
                        r.failed(p, now);
                        if was_due {
                            last_failure.insert(p, now);
                        }
                    }
                    Step::Connect(p) => {
                        r.connected(&p);
                        last_failure.remove(&p);
                    }
                    Step::Pass(s) => now += Duration::from_secs(u64::from(s)),
                }
                for p in 0..4u8 {
                    match last_failure.get(&p) {
                        None => prop_assert!(r.due(&p, now)),
                        Some(at) => {
                            let since = now - *at;
                            if since < BASE {
                                prop_assert!(!r.due(&p, now));
                            }
                            if since >= MAX {
                                prop_assert!(r.due(&p, now));
                            }
                        }
                    }
                }
            }
        }
    }
}
