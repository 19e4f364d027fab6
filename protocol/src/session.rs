//! Sync sessions, as a state machine without I/O: which sessions (one per peer and
//! document) run, which wait their turn, when a session takes another round, and how it
//! ends. The node's network loop feeds it what happened (a sync was wanted, a round's
//! request was built, its answer was taken, a request failed, a peer went away) and carries
//! out what it returns (build a round, answer the waiters).
//!
//! Every round carries a [`Ticket`]. What comes back for a round that is no longer the
//! session's current one (a session that ended and started again, a duplicated or late
//! result) is recognised as stale and changes nothing.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;

/// The most rounds one session may run.
pub const MAX_ROUNDS: u32 = 10_000;
/// Sessions that run at once with one peer; more wait their turn. Each takes a round
/// trip per round, so with many documents shared with one peer (a relay, a customer with
/// many relationships) this window, not the work, set the pace at 16: 1,000
/// relationships of 20 messages synced in 1.6-1.9 s with 16, 1.1-1.2 s with 32. Since
/// rounds go in batches, 128 keep 8 batches in flight rather than 4, which hides the
/// responder's commits: 6% faster than 64 in that case.
pub const MAX_SESSIONS_PER_PEER: usize = 128;

/// Names one round of one session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ticket(u64);

/// Build the next round of the session of `peer` and `doc`; report with `ticket`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Start<P, D> {
    /// The peer.
    pub peer: P,
    /// The document.
    pub doc: D,
    /// What the round's results must carry.
    pub ticket: Ticket,
}

/// How a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending<R> {
    /// Neither side has anything the other lacks, or a round made no progress.
    Done,
    /// The peer refused our request or changes of ours.
    Refused(Vec<R>),
    /// This node does not share the document with the peer now: nothing was sent.
    NotShared,
    /// The session could not go on (the peer went away, a request failed): why.
    Broken(String),
}

/// A session that ended: whom to tell, and the session that takes its place, if one
/// waited for the slot.
#[derive(Debug)]
pub struct End<P, D, W, R> {
    /// The peer.
    pub peer: P,
    /// The document.
    pub doc: D,
    /// Who waits for the outcome.
    pub waiters: Vec<W>,
    /// The outcome.
    pub ending: Ending<R>,
    /// A queued session of the same peer that starts now.
    pub next: Option<Start<P, D>>,
}

/// What one round brought.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Round<R> {
    /// Changes newly taken from the peer.
    pub received: usize,
    /// Whether another round is wanted (more to fetch or to send).
    pub again: bool,
    /// Whether the peer's reported heads changed since the last round.
    pub peer_moved: bool,
    /// What the peer refused in this round.
    pub refused: Vec<R>,
    /// The peer misbehaved past the limit: end here.
    pub disconnect: bool,
}

impl<R> Default for Round<R> {
    fn default() -> Self {
        Round {
            received: 0,
            again: false,
            peer_moved: false,
            refused: Vec::new(),
            disconnect: false,
        }
    }
}

/// What to do after a round's answer.
#[derive(Debug)]
pub enum Step<P, D, W, R> {
    /// Build another round.
    Round(Start<P, D>),
    /// The session ended.
    End(End<P, D, W, R>),
    /// The result was for a round that is no longer current: nothing to do.
    Stale,
}

#[derive(Debug)]
struct Session<W, R> {
    ticket: Ticket,
    rounds: u32,
    again: bool,
    refused: Vec<R>,
    waiters: Vec<W>,
}

/// Every session of a node: those running, at most `max_per_peer` per peer, and those
/// waiting for a slot, in order.
#[derive(Debug)]
pub struct Sessions<P, D, W, R> {
    active: HashMap<(P, D), Session<W, R>>,
    tickets: HashMap<Ticket, (P, D)>,
    per_peer: HashMap<P, usize>,
    queued: HashMap<P, VecDeque<(D, Vec<W>)>>,
    next_ticket: u64,
    max_per_peer: usize,
    max_rounds: u32,
}

impl<P, D, W, R> Default for Sessions<P, D, W, R>
where
    P: Copy + Eq + Hash,
    D: Copy + Eq + Hash,
{
    fn default() -> Self {
        Self::new(MAX_SESSIONS_PER_PEER, MAX_ROUNDS)
    }
}

impl<P, D, W, R> Sessions<P, D, W, R>
where
    P: Copy + Eq + Hash,
    D: Copy + Eq + Hash,
{
    /// No sessions yet; at most `max_per_peer` at once with one peer (at least 1), and at
    /// most `max_rounds` rounds each (at least 1).
    pub fn new(max_per_peer: usize, max_rounds: u32) -> Self {
        Self {
            active: HashMap::new(),
            tickets: HashMap::new(),
            per_peer: HashMap::new(),
            queued: HashMap::new(),
            next_ticket: 0,
            max_per_peer: max_per_peer.max(1),
            max_rounds: max_rounds.max(1),
        }
    }

    /// Sessions running now.
    pub fn running(&self) -> usize {
        self.active.len()
    }

    /// Sessions running now with `peer`.
    pub fn running_with(&self, peer: &P) -> usize {
        self.per_peer.get(peer).copied().unwrap_or(0)
    }

    /// Sessions waiting for a slot with `peer`.
    pub fn queued_with(&self, peer: &P) -> usize {
        self.queued.get(peer).map_or(0, VecDeque::len)
    }

    /// Whether `ticket` names the current round of a running session.
    pub fn is_current(&self, ticket: Ticket) -> bool {
        self.tickets.contains_key(&ticket)
    }

    /// Whether a session of `peer` and `doc` runs now.
    pub fn is_running(&self, peer: &P, doc: &D) -> bool {
        self.active.contains_key(&(*peer, *doc))
    }

    /// A sync of `doc` with `peer` is wanted (by `waiter`, if someone waits). A running
    /// session takes another round once its current one is answered; a peer with every
    /// slot taken gets it queued (once per document); otherwise a session starts.
    pub fn want(&mut self, peer: P, doc: D, waiter: Option<W>) -> Option<Start<P, D>> {
        if let Some(s) = self.active.get_mut(&(peer, doc)) {
            s.again = true;
            s.waiters.extend(waiter);
            return None;
        }
        if self.running_with(&peer) >= self.max_per_peer {
            let queue = self.queued.entry(peer).or_default();
            match queue.iter_mut().find(|(d, _)| *d == doc) {
                Some((_, waiters)) => waiters.extend(waiter),
                None => queue.push_back((doc, waiter.into_iter().collect())),
            }
            return None;
        }
        Some(self.begin(peer, doc, waiter.into_iter().collect()))
    }

    fn begin(&mut self, peer: P, doc: D, waiters: Vec<W>) -> Start<P, D> {
        let ticket = self.ticket();
        self.active.insert(
            (peer, doc),
            Session {
                ticket,
                rounds: 0,
                again: false,
                refused: Vec::new(),
                waiters,
            },
        );
        self.tickets.insert(ticket, (peer, doc));
        *self.per_peer.entry(peer).or_default() += 1;
        Start { peer, doc, ticket }
    }

    fn ticket(&mut self) -> Ticket {
        self.next_ticket += 1;
        Ticket(self.next_ticket)
    }

    /// The round of `ticket` was built: `sent` says whether there is a request to send.
    /// With none, this node does not share the document with the peer now, and the
    /// session ends (as refused, if the peer refused something in an earlier round).
    pub fn built(&mut self, ticket: Ticket, sent: bool) -> Option<End<P, D, W, R>> {
        if sent || !self.tickets.contains_key(&ticket) {
            return None;
        }
        let (peer, doc) = self.tickets[&ticket];
        let refused = self
            .active
            .get_mut(&(peer, doc))
            .map(|s| std::mem::take(&mut s.refused))
            .unwrap_or_default();
        let ending = if refused.is_empty() {
            Ending::NotShared
        } else {
            Ending::Refused(refused)
        };
        self.finish(ticket, ending)
    }

    /// The answer to the round of `ticket` was taken (or taking it failed, with why).
    pub fn answered(
        &mut self,
        ticket: Ticket,
        round: Result<Round<R>, String>,
    ) -> Step<P, D, W, R> {
        let Some(&(peer, doc)) = self.tickets.get(&ticket) else {
            return Step::Stale;
        };
        let round = match round {
            Ok(r) => r,
            Err(why) => {
                return self
                    .finish(ticket, Ending::Broken(why))
                    .map_or(Step::Stale, Step::End);
            }
        };
        let max_rounds = self.max_rounds;
        let Some(s) = self.active.get_mut(&(peer, doc)) else {
            return Step::Stale;
        };
        s.rounds += 1;
        s.refused.extend(round.refused);
        // A round that brought nothing and saw the peer stand still ends the session,
        // unless a new sync was wanted meanwhile: two nodes that disagree cannot loop.
        let progress = round.received > 0 || round.peer_moved || s.rounds == 1;
        let more = (round.again && progress) || s.again;
        if more && s.rounds < max_rounds && !round.disconnect {
            s.again = false;
            let next = self.ticket();
            let s = self
                .active
                .get_mut(&(peer, doc))
                .expect("the session is running");
            s.ticket = next;
            self.tickets.remove(&ticket);
            self.tickets.insert(next, (peer, doc));
            return Step::Round(Start {
                peer,
                doc,
                ticket: next,
            });
        }
        let ending = if s.refused.is_empty() {
            Ending::Done
        } else {
            Ending::Refused(std::mem::take(&mut s.refused))
        };
        self.finish(ticket, ending).map_or(Step::Stale, Step::End)
    }

    /// The round of `ticket` never reached the peer (it does not speak the version of the
    /// protocol the round was sent in): the same session builds the round again, under a
    /// new ticket, which does not count as a round. `None` if the ticket is not current.
    pub fn retry(&mut self, ticket: Ticket) -> Option<Start<P, D>> {
        let (peer, doc) = self.tickets.remove(&ticket)?;
        let next = self.ticket();
        let s = self
            .active
            .get_mut(&(peer, doc))
            .expect("a current ticket's session runs");
        s.ticket = next;
        self.tickets.insert(next, (peer, doc));
        Some(Start {
            peer,
            doc,
            ticket: next,
        })
    }

    /// The round of `ticket` cannot go on (its request failed, the peer is not connected):
    /// the session ends as broken.
    pub fn failed(&mut self, ticket: Ticket, why: String) -> Option<End<P, D, W, R>> {
        self.finish(ticket, Ending::Broken(why))
    }

    /// `peer` went away: its running and queued sessions all end as broken.
    pub fn peer_gone(&mut self, peer: P, why: &str) -> Vec<End<P, D, W, R>> {
        let mut ends = Vec::new();
        for (doc, waiters) in self.queued.remove(&peer).unwrap_or_default() {
            ends.push(End {
                peer,
                doc,
                waiters,
                ending: Ending::Broken(why.to_owned()),
                next: None,
            });
        }
        let tickets: Vec<Ticket> = self
            .active
            .iter()
            .filter(|((p, _), _)| *p == peer)
            .map(|(_, s)| s.ticket)
            .collect();
        for t in tickets {
            ends.extend(self.finish(t, Ending::Broken(why.to_owned())));
        }
        ends
    }

    /// Ends every session, running and queued (the node stops).
    pub fn drain(&mut self, why: &str) -> Vec<End<P, D, W, R>> {
        let mut peers: Vec<P> = self.per_peer.keys().copied().collect();
        peers.extend(self.queued.keys().copied());
        let mut seen = std::collections::HashSet::new();
        peers.retain(|p| seen.insert(*p));
        peers
            .into_iter()
            .flat_map(|p| self.peer_gone(p, why))
            .collect()
    }

    /// Ends the session whose current round is `ticket`, and starts the first session
    /// queued for the same peer in its slot.
    fn finish(&mut self, ticket: Ticket, ending: Ending<R>) -> Option<End<P, D, W, R>> {
        let (peer, doc) = self.tickets.remove(&ticket)?;
        let s = self.active.remove(&(peer, doc))?;
        if let Some(n) = self.per_peer.get_mut(&peer) {
            *n -= 1;
            if *n == 0 {
                self.per_peer.remove(&peer);
            }
        }
        let mut next = None;
        if let Some(queue) = self.queued.get_mut(&peer) {
            let first = queue.pop_front();
            if queue.is_empty() {
                self.queued.remove(&peer);
            }
            if let Some((d, waiters)) = first {
                next = Some(self.begin(peer, d, waiters));
            }
        }
        Some(End {
            peer,
            doc,
            waiters: s.waiters,
            ending,
            next,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type S = Sessions<u8, u8, u32, &'static str>;

    fn round(received: usize, again: bool) -> Round<&'static str> {
        Round {
            received,
            again,
            peer_moved: false,
            refused: Vec::new(),
            disconnect: false,
        }
    }

    #[test]
    fn a_session_runs_rounds_while_they_bring_something_and_then_ends() {
        let mut s = S::default();
        let start = s.want(1, 7, Some(100)).unwrap();
        assert!(s.built(start.ticket, true).is_none());
        let Step::Round(next) = s.answered(start.ticket, Ok(round(5, true))) else {
            panic!("another round")
        };
        // The first ticket is spent: its result again is stale.
        assert!(matches!(
            s.answered(start.ticket, Ok(round(5, true))),
            Step::Stale
        ));
        let Step::End(end) = s.answered(next.ticket, Ok(round(0, true))) else {
            panic!("no progress ends it")
        };
        assert_eq!(end.ending, Ending::Done);
        assert_eq!(end.waiters, vec![100]);
        assert_eq!(s.running(), 0);
    }

    #[test]
    fn a_retried_round_goes_on_under_a_new_ticket_and_the_old_one_is_stale() {
        let mut s = S::default();
        let start = s.want(1, 7, Some(100)).unwrap();
        let again = s
            .retry(start.ticket)
            .expect("a current round is built again");
        assert_eq!((again.peer, again.doc), (1, 7));
        assert_ne!(again.ticket, start.ticket);
        assert!(s.retry(start.ticket).is_none(), "the old ticket is spent");
        assert!(matches!(
            s.answered(start.ticket, Ok(round(5, true))),
            Step::Stale
        ));
        // The retry was not a round: the first answer still counts as the first.
        let Step::Round(_) = s.answered(again.ticket, Ok(round(0, true))) else {
            panic!("a first round goes on")
        };
        assert_eq!(s.running(), 1);
    }

    #[test]
    fn a_stale_result_never_touches_a_newer_session_of_the_same_document() {
        let mut s = S::default();
        let first = s.want(1, 7, Some(1)).unwrap();
        let gone = s.peer_gone(1, "the peer disconnected");
        assert_eq!(gone.len(), 1);
        let second = s.want(1, 7, Some(2)).unwrap();
        // The first session's late results change nothing.
        assert!(s.built(first.ticket, false).is_none());
        assert!(matches!(
            s.answered(first.ticket, Err("late".into())),
            Step::Stale
        ));
        assert!(s.failed(first.ticket, "late".into()).is_none());
        assert!(s.is_running(&1, &7));
        let Step::End(end) = s.answered(second.ticket, Ok(round(0, false))) else {
            panic!("ends")
        };
        assert_eq!(end.waiters, vec![2]);
    }

    #[test]
    fn nothing_to_send_ends_as_not_shared_or_as_the_refusals_so_far() {
        let mut s = S::default();
        let a = s.want(1, 1, None).unwrap();
        assert_eq!(s.built(a.ticket, false).unwrap().ending, Ending::NotShared);
        let b = s.want(1, 2, None).unwrap();
        let mut r = round(1, true);
        r.refused = vec!["forbidden"];
        let Step::Round(next) = s.answered(b.ticket, Ok(r)) else {
            panic!("again")
        };
        assert_eq!(
            s.built(next.ticket, false).unwrap().ending,
            Ending::Refused(vec!["forbidden"])
        );
    }

    #[test]
    fn a_peer_with_every_slot_taken_waits_and_the_queue_starts_in_order() {
        let mut s: S = Sessions::new(2, MAX_ROUNDS);
        let a = s.want(1, 1, Some(1)).unwrap();
        let _b = s.want(1, 2, Some(2)).unwrap();
        assert!(s.want(1, 3, Some(3)).is_none());
        assert!(s.want(1, 4, Some(4)).is_none());
        assert!(s.want(1, 3, Some(33)).is_none(), "once per document");
        assert_eq!(s.queued_with(&1), 2);
        // Another peer is not held up.
        assert!(s.want(2, 1, None).is_some());
        let Step::End(end) = s.answered(a.ticket, Ok(round(0, false))) else {
            panic!("ends")
        };
        let next = end.next.expect("the first queued session starts");
        assert_eq!(next.doc, 3);
        assert_eq!(s.running_with(&1), 2);
        let Step::End(end) = s.answered(next.ticket, Ok(round(0, false))) else {
            panic!("ends")
        };
        assert_eq!(end.waiters, vec![3, 33]);
        assert_eq!(end.next.map(|n| n.doc), Some(4));
    }

    #[test]
    fn a_session_that_always_wants_more_stops_at_the_round_limit() {
        let mut s: S = Sessions::new(1, 5);
        let mut t = s.want(1, 1, None).unwrap().ticket;
        let mut rounds = 0;
        loop {
            rounds += 1;
            match s.answered(t, Ok(round(1, true))) {
                Step::Round(n) => t = n.ticket,
                Step::End(e) => {
                    assert_eq!(e.ending, Ending::Done);
                    break;
                }
                Step::Stale => panic!("not stale"),
            }
            assert!(rounds < 100);
        }
        assert_eq!(rounds, 5);
    }
}
