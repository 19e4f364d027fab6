//! The sync session machine under any order of events: duplicated, late and reordered
//! results, failures and peers going away. Whatever happens, at most the allowed number of
//! sessions run with a peer, every waiter hears exactly one outcome, and a result for a
//! round that is no longer current changes nothing.

use std::collections::HashMap;

use proptest::prelude::*;
use rapport_protocol::session::{End, Ending, Round, Sessions, Start, Step, Ticket};

const MAX_PER_PEER: usize = 2;
const MAX_ROUNDS: u32 = 6;

#[derive(Debug, Clone)]
enum Op {
    Want {
        peer: u8,
        doc: u8,
        wait: bool,
    },
    Built {
        pick: usize,
        sent: bool,
    },
    Answered {
        pick: usize,
        received: usize,
        again: bool,
        moved: bool,
        refused: bool,
        disconnect: bool,
        error: bool,
    },
    Failed {
        pick: usize,
    },
    Retry {
        pick: usize,
    },
    PeerGone {
        peer: u8,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u8..3, 0u8..4, any::<bool>()).prop_map(|(peer, doc, wait)| Op::Want { peer, doc, wait }),
        2 => (any::<usize>(), any::<bool>()).prop_map(|(pick, sent)| Op::Built { pick, sent }),
        4 => (any::<usize>(), 0usize..3, any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>())
            .prop_map(|(pick, received, again, moved, refused, disconnect, error)| Op::Answered {
                pick, received, again, moved, refused, disconnect: disconnect && refused, error: error && again && moved,
            }),
        1 => any::<usize>().prop_map(|pick| Op::Failed { pick }),
        1 => any::<usize>().prop_map(|pick| Op::Retry { pick }),
        1 => (0u8..3).prop_map(|peer| Op::PeerGone { peer }),
    ]
}

/// What the test saw: every ticket handed out (current or spent), and each waiter's outcomes.
#[derive(Default)]
struct Seen {
    tickets: Vec<Ticket>,
    heard: HashMap<u32, Vec<Ending<u32>>>,
    waiters: u32,
}

impl Seen {
    fn start(&mut self, s: Option<Start<u8, u8>>) {
        if let Some(s) = s {
            self.tickets.push(s.ticket);
        }
    }

    fn end(&mut self, e: Option<End<u8, u8, u32, u32>>) {
        if let Some(e) = e {
            for w in e.waiters {
                self.heard.entry(w).or_default().push(e.ending.clone());
            }
            self.start(e.next);
        }
    }

    fn pick(&self, i: usize) -> Option<Ticket> {
        (!self.tickets.is_empty()).then(|| self.tickets[i % self.tickets.len()])
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn every_waiter_hears_once_and_no_peer_gets_more_sessions_than_allowed(
        ops in proptest::collection::vec(op(), 1..200)
    ) {
        let mut s: Sessions<u8, u8, u32, u32> = Sessions::new(MAX_PER_PEER, MAX_ROUNDS);
        let mut seen = Seen::default();
        let mut rounds: HashMap<Ticket, u32> = HashMap::new();
        for op in ops {
            match op {
                Op::Want { peer, doc, wait } => {
                    let was_running = s.is_running(&peer, &doc);
                    let waiter = wait.then(|| { seen.waiters += 1; seen.waiters });
                    let start = s.want(peer, doc, waiter);
                    // A running session is never started a second time.
                    prop_assert!(!(was_running && start.is_some()));
                    seen.start(start);
                }
                Op::Built { pick, sent } => {
                    if let Some(t) = seen.pick(pick) {
                        seen.end(s.built(t, sent));
                    }
                }
                Op::Answered { pick, received, again, moved, refused, disconnect, error } => {
                    let Some(t) = seen.pick(pick) else { continue };
                    let result = if error {
                        Err("taking the answer failed".to_owned())
                    } else {
                        Ok(Round {
                            received,
                            again,
                            peer_moved: moved,
                            refused: if refused { vec![7] } else { Vec::new() },
                            disconnect,
                        })
                    };
                    match s.answered(t, result) {
                        Step::Round(next) => {
                            let n = rounds.remove(&t).unwrap_or(1) + 1;
                            // The round limit holds.
                            prop_assert!(n <= MAX_ROUNDS);
                            rounds.insert(next.ticket, n);
                            seen.start(Some(next));
                        }
                        Step::End(e) => seen.end(Some(e)),
                        Step::Stale => {}
                    }
                }
                Op::Failed { pick } => {
                    if let Some(t) = seen.pick(pick) {
                        seen.end(s.failed(t, "request failed".into()));
                    }
                }
                Op::Retry { pick } => {
                    let Some(t) = seen.pick(pick) else { continue };
                    let current = s.is_current(t);
                    match s.retry(t) {
                        Some(next) => {
                            prop_assert!(current, "only a current round is built again");
                            // The old ticket is spent; the retry is not a round.
                            prop_assert!(!s.is_current(t));
                            prop_assert!(s.is_current(next.ticket));
                            let n = rounds.remove(&t).unwrap_or(1);
                            rounds.insert(next.ticket, n);
                            seen.start(Some(next));
                        }
                        None => prop_assert!(!current),
                    }
                }
                Op::PeerGone { peer } => {
                    for e in s.peer_gone(peer, "gone") {
                        seen.end(Some(e));
                    }
                    prop_assert_eq!(s.running_with(&peer), 0);
                    prop_assert_eq!(s.queued_with(&peer), 0);
                }
            }
            let mut total = 0;
            for p in 0..3u8 {
                prop_assert!(s.running_with(&p) <= MAX_PER_PEER);
                // A peer waits in the queue only while all its slots are taken.
                if s.queued_with(&p) > 0 {
                    prop_assert_eq!(s.running_with(&p), MAX_PER_PEER);
                }
                total += s.running_with(&p);
            }
            prop_assert_eq!(total, s.running());
            // Nobody hears twice, at any time.
            for (w, heard) in &seen.heard {
                prop_assert!(heard.len() == 1, "waiter {} heard {:?}", w, heard);
            }
        }
        for e in s.drain("the node stops") {
            seen.end(Some(e));
        }
        prop_assert_eq!(s.running(), 0);
        // Every waiter heard exactly one outcome.
        for w in 1..=seen.waiters {
            prop_assert_eq!(seen.heard.get(&w).map_or(0, Vec::len), 1, "waiter {}", w);
        }
    }
}
