//! Three replicas in memory (a customer, Alice, and two companies, Acme and Globex) sync
//! over a simulated network that drops, duplicates, reorders and delays every request and
//! answer, as proptest chooses, while all three keep writing. No store and no sockets: the
//! rounds are `rapport_protocol::replica`'s, the sessions `rapport_protocol::session`'s,
//! as a node runs them.
//!
//! - Whatever the network did, once it heals the three hold the same conversation with
//!   every message any of them wrote, nothing honest was refused and every session ended.
//! - Lies from a member (a flipped signature, a message with no purpose, a replay) and a
//!   stranger's unsolicited relationship change nothing any replica holds, and only the
//!   liars are kept as evidence.
//! - When Alice revokes Globex part-way, Globex never holds a message the others wrote
//!   after the revocation, not even for one step, whatever was in flight; once the network heals it
//!   holds nothing of Alice's, has signed that it erased it, and Alice holds that receipt.

use std::collections::{BTreeSet, HashMap, VecDeque};

use proptest::prelude::*;
use rapport_protocol::automerge::ChangeHash;
use rapport_protocol::policy::{Holdings, Push};
use rapport_protocol::replica::{self, CheckedRequest, Holder, PeerRefusal, Replica};
use rapport_protocol::session::{End, Sessions, Start, Step, Ticket};
use rapport_protocol::wire::{
    CHUNK_BYTES, DocRef, MAX_BATCH_ROUNDS, SyncRequest, SyncResponse, batch_answer_bytes,
};
use rapport_protocol::{
    DocId, IdentityKey, MAX_MESSAGE_BYTES, RelBody, Scope, SecretKey, SignedChange,
};

const T0: u64 = 1_800_000_000;
const ALICE: usize = 0;
const ACME: usize = 1;
const GLOBEX: usize = 2;

struct Side {
    replica: Replica,
    sessions: Sessions<usize, DocRef, (), PeerRefusal>,
    /// Requests in flight: id → (peer, document, hashes sent, round).
    requests: HashMap<u64, (usize, DocRef, Vec<ChangeHash>, Ticket)>,
}

// Moved once each, like the network loop's messages; boxing buys nothing here.
#[allow(clippy::large_enum_variant)]
#[derive(Clone)]
enum Msg {
    Request {
        from: usize,
        to: usize,
        id: u64,
        req: SyncRequest,
    },
    Response {
        from: usize,
        to: usize,
        id: u64,
        resp: SyncResponse,
    },
}

struct Sim {
    sides: Vec<Side>,
    ids: Vec<IdentityKey>,
    net: VecDeque<Msg>,
    next_id: u64,
    rel: DocId,
    written: Vec<(usize, String)>,
}

fn key(seed: u8) -> SecretKey {
    SecretKey::from_seed([seed; 32])
}

fn scopes() -> Vec<Scope> {
    ["conversation:read", "conversation:write", "contact:support"]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect()
}

impl Sim {
    /// Alice grants both companies, they accept, and she opens one relationship with both;
    /// over a perfect network.
    fn new() -> Self {
        let sides: Vec<Side> = (1..=3)
            .map(|seed| Side {
                replica: Replica::new(key(seed)),
                sessions: Sessions::default(),
                requests: HashMap::new(),
            })
            .collect();
        let ids: Vec<IdentityKey> = sides.iter().map(|s| s.replica.me()).collect();
        let mut sim = Sim {
            sides,
            ids,
            net: VecDeque::new(),
            next_id: 0,
            rel: DocId([0; 32]),
            written: Vec::new(),
        };
        for company in [ACME, GLOBEX] {
            let grantee = sim.ids[company];
            let (_, pushes) = sim.sides[ALICE]
                .replica
                .grant(grantee, scopes(), "support", None, T0)
                .unwrap();
            sim.pushes(ALICE, pushes);
            sim.settle();
            let (n, pushes) = sim.sides[company]
                .replica
                .accept(sim.ids[ALICE], T0)
                .unwrap();
            assert_eq!(n, 1);
            sim.pushes(company, pushes);
            sim.settle();
        }
        let members = [sim.ids[ACME], sim.ids[GLOBEX]];
        let (rel, pushes) = sim.sides[ALICE]
            .replica
            .open("Alice, Acme and Globex", &members, T0)
            .unwrap();
        sim.rel = rel;
        sim.pushes(ALICE, pushes);
        sim.settle();
        for company in [ACME, GLOBEX] {
            assert!(
                sim.sides[company].replica.relationship(&rel).is_some(),
                "side {company} holds the relationship"
            );
        }
        sim
    }

    fn index(&self, id: &IdentityKey) -> usize {
        self.ids.iter().position(|i| i == id).expect("a known side")
    }

    fn pushes(&mut self, i: usize, pushes: Vec<Push>) {
        for (peer, doc) in pushes {
            let to = self.index(&peer);
            self.want(i, to, doc);
        }
    }

    fn want(&mut self, i: usize, to: usize, doc: DocRef) {
        if let Some(start) = self.sides[i].sessions.want(to, doc, Some(())) {
            self.round(i, start);
        }
    }

    /// Builds and sends round `start` of side `i`.
    fn round(&mut self, i: usize, start: Start<usize, DocRef>) {
        let peer = self.ids[start.peer];
        let s = &mut self.sides[i];
        let built = replica::round_request(&mut s.replica, &peer, &start.doc, T0).unwrap();
        let Some((req, sent)) = built else {
            let end = s.sessions.built(start.ticket, false);
            self.ended(i, end);
            return;
        };
        self.next_id += 1;
        s.requests
            .insert(self.next_id, (start.peer, start.doc, sent, start.ticket));
        self.net.push_back(Msg::Request {
            from: i,
            to: start.peer,
            id: self.next_id,
            req,
        });
    }

    fn ended(&mut self, i: usize, end: Option<End<usize, DocRef, (), PeerRefusal>>) {
        if let Some(next) = end.and_then(|e| e.next) {
            self.round(i, next);
        }
    }

    /// Side `to` answers request `id` from side `from`.
    fn answer(&mut self, from: usize, to: usize, id: u64, req: CheckedRequest) {
        let peer = self.ids[from];
        let (resp, pushes, disconnect) =
            replica::handle_request(&mut self.sides[to].replica, &peer, req, T0);
        assert!(!disconnect, "no side misbehaves past the limit");
        self.pushes(to, pushes);
        self.net.push_back(Msg::Response {
            from: to,
            to: from,
            id,
            resp,
        });
    }

    /// Delivers message `k` of those in flight, as a node does when its requests are
    /// checked ahead: a request goes with the next requests in flight to the same side, up
    /// to four, checked together ([`replica::check_requests`]) and then answered in order.
    fn deliver_checked(&mut self, k: usize) {
        let Some(Msg::Request { to, .. }) = self.net.get(k) else {
            return self.deliver(k);
        };
        let to = *to;
        let mut batch = Vec::new();
        let mut i = k;
        while i < self.net.len() && batch.len() < 4 {
            if matches!(&self.net[i], Msg::Request { to: t, .. } if *t == to) {
                let Some(Msg::Request { from, id, req, .. }) = self.net.remove(i) else {
                    unreachable!("a request was just seen here");
                };
                batch.push((from, id, req));
            } else {
                i += 1;
            }
        }
        let (who, reqs): (Vec<(usize, u64)>, Vec<SyncRequest>) = batch
            .into_iter()
            .map(|(from, id, req)| ((from, id), req))
            .unzip();
        for ((from, id), req) in who.into_iter().zip(replica::check_requests(reqs)) {
            assert!(req.checked_ahead());
            self.answer(from, to, id, req);
        }
    }

    /// Delivers message `k` of those in flight.
    fn deliver(&mut self, k: usize) {
        let Some(msg) = self.net.remove(k) else {
            return;
        };
        match msg {
            Msg::Request { from, to, id, req } => self.answer(from, to, id, req.into()),
            Msg::Response { from, to, id, resp } => {
                // A response whose request is no longer awaited (a duplicate, or one whose
                // request was given up as lost) is dropped, as the network loop does.
                let Some((_, doc, sent, ticket)) = self.sides[to].requests.remove(&id) else {
                    return;
                };
                let peer = self.ids[from];
                let (o, pushes) = replica::handle_response(
                    &mut self.sides[to].replica,
                    &peer,
                    &doc,
                    &sent,
                    resp,
                    T0,
                )
                .unwrap();
                assert!(!o.disconnect);
                self.pushes(to, pushes);
                match self.sides[to].sessions.answered(ticket, Ok(o)) {
                    Step::Round(start) => self.round(to, start),
                    Step::End(e) => self.ended(to, Some(e)),
                    Step::Stale => {}
                }
            }
        }
    }

    /// Loses message `k`: a lost request or response times out at its sender.
    fn drop_msg(&mut self, k: usize) {
        let Some(msg) = self.net.remove(k) else {
            return;
        };
        let (side, id) = match msg {
            Msg::Request { from, id, .. } => (from, id),
            Msg::Response { to, id, .. } => (to, id),
        };
        if let Some((_, _, _, ticket)) = self.sides[side].requests.remove(&id) {
            let end = self.sides[side]
                .sessions
                .failed(ticket, "the request timed out".into());
            self.ended(side, end);
        }
    }

    /// Sends message `k` again (a request only; a response is matched once by id).
    fn duplicate(&mut self, k: usize) {
        if let Some(m @ Msg::Request { .. }) = self.net.get(k).cloned() {
            self.net.push_back(m);
        }
    }

    /// Holds message `k` back behind everything now in flight.
    fn delay(&mut self, k: usize) {
        if let Some(m) = self.net.remove(k) {
            self.net.push_back(m);
        }
    }

    /// Side `i` writes a message, if it still may; returns whether it did.
    fn write(&mut self, i: usize, text: String) -> bool {
        let rel = self.rel;
        match self.sides[i].replica.send(&rel, &text, T0) {
            Ok((_, pushes)) => {
                self.written.push((i, text));
                self.pushes(i, pushes);
                true
            }
            Err(_) => false,
        }
    }

    /// A perfect network until nothing is in flight; bounded.
    fn settle(&mut self) {
        for _ in 0..100_000 {
            if self.net.is_empty() {
                return;
            }
            self.deliver(0);
        }
        panic!("the network did not settle");
    }

    /// The network heals: every side syncs everything it shares with every other.
    fn heal(&mut self) {
        self.settle();
        for i in 0..self.sides.len() {
            for j in 0..self.sides.len() {
                if i == j {
                    continue;
                }
                let peer = self.ids[j];
                for doc in self.sides[i].replica.shared_with(&peer, T0) {
                    self.want(i, j, doc);
                }
            }
        }
        self.settle();
    }

    /// The texts side `i` holds in the relationship (none if it holds none).
    fn texts(&self, i: usize) -> BTreeSet<String> {
        self.sides[i]
            .replica
            .relationship(&self.rel)
            .map(|r| {
                r.messages()
                    .into_iter()
                    .filter_map(|(_, e)| match &e.body {
                        RelBody::Message { text, .. } => Some(text.clone()),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    fn heads(&self, i: usize) -> Option<Vec<ChangeHash>> {
        Holder::doc(&self.sides[i].replica, &self.rel).map(rapport_protocol::replica::Doc::heads)
    }
}

#[derive(Debug, Clone)]
enum Op {
    Deliver(usize),
    /// Deliver a request with the next ones to the same side, checked ahead together.
    DeliverChecked(usize),
    Drop(usize),
    Duplicate(usize),
    Delay(usize),
    /// Deliver the newest message first.
    DeliverLast,
    Write(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => any::<usize>().prop_map(Op::Deliver),
        3 => any::<usize>().prop_map(Op::DeliverChecked),
        2 => any::<usize>().prop_map(Op::Drop),
        2 => any::<usize>().prop_map(Op::Duplicate),
        2 => any::<usize>().prop_map(Op::Delay),
        2 => Just(Op::DeliverLast),
        4 => (0usize..3).prop_map(Op::Write),
    ]
}

impl Sim {
    /// Runs one step of the hostile network; returns a message text when a side wrote.
    fn step(&mut self, op: Op, n: &mut usize) {
        let len = self.net.len();
        match op {
            Op::Deliver(k) if len > 0 => self.deliver(k % len),
            Op::DeliverChecked(k) if len > 0 => self.deliver_checked(k % len),
            Op::Drop(k) if len > 0 => self.drop_msg(k % len),
            Op::Duplicate(k) if len > 0 => self.duplicate(k % len),
            Op::Delay(k) if len > 0 => self.delay(k % len),
            Op::DeliverLast if len > 0 => self.deliver(len - 1),
            Op::Write(i) => {
                *n += 1;
                self.write(i, format!("message {n} from side {i}"));
            }
            _ => {}
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn three_replicas_on_a_hostile_network_end_with_the_same_conversation(
        ops in proptest::collection::vec(op(), 1..150)
    ) {
        let mut sim = Sim::new();
        let mut n = 0;
        for op in ops {
            sim.step(op, &mut n);
        }
        sim.heal();

        let all: BTreeSet<String> = sim.written.iter().map(|(_, t)| t.clone()).collect();
        for i in 0..3 {
            prop_assert_eq!(sim.texts(i), all.clone(), "side {} holds every message", i);
            prop_assert_eq!(sim.heads(i), sim.heads(ALICE));
            prop_assert!(
                sim.sides[i].replica.evidence.is_empty(),
                "side {} refused an honest change: {:?}",
                i,
                sim.sides[i].replica.evidence
            );
            prop_assert!(sim.sides[i].replica.told.is_empty());
            prop_assert_eq!(sim.sides[i].sessions.running(), 0);
            prop_assert!(sim.sides[i].requests.is_empty());
            prop_assert_eq!(sim.sides[i].replica.waiting_len(), 0);
        }
    }

    #[test]
    fn a_revoked_company_holds_nothing_written_after_and_signs_that_it_erased(
        before in proptest::collection::vec(op(), 0..80),
        after in proptest::collection::vec(op(), 0..80),
    ) {
        let mut sim = Sim::new();
        let mut n = 0;
        for op in before {
            sim.step(op, &mut n);
        }
        let (revoked, pushes) = sim.sides[ALICE].replica.revoke(sim.ids[GLOBEX], T0).unwrap();
        prop_assert_eq!(revoked, 1);
        sim.pushes(ALICE, pushes);
        let cut: BTreeSet<String> = sim.written.iter().map(|(_, t)| t.clone()).collect();
        for op in after {
            sim.step(op, &mut n);
            // Its own writes it holds, whatever Alice makes of them.
            let own: BTreeSet<String> = sim
                .written
                .iter()
                .filter(|(i, _)| *i == GLOBEX)
                .map(|(_, t)| t.clone())
                .collect();
            let held: BTreeSet<String> = sim.texts(GLOBEX).difference(&own).cloned().collect();
            prop_assert!(
                held.is_subset(&cut),
                "Globex holds messages others wrote after the revocation: {:?}",
                held.difference(&cut).collect::<Vec<_>>()
            );
        }
        sim.heal();

        prop_assert!(sim.texts(GLOBEX).is_empty(), "Globex erased the relationship");
        prop_assert!(sim.sides[GLOBEX].replica.relationship(&sim.rel).is_none());
        prop_assert_eq!(&sim.sides[GLOBEX].replica.erased, &vec![(sim.ids[ALICE], 1)]);
        let grants = rapport_protocol::policy::Holdings::ledger(
            &sim.sides[ALICE].replica,
            sim.ids[ALICE],
            sim.ids[GLOBEX],
        )
        .unwrap()
        .grants(T0);
        prop_assert_eq!(grants.len(), 1);
        prop_assert!(grants[0].revoked.is_some());
        prop_assert!(grants[0].erasure_acked.is_some(), "Alice holds Globex's erasure receipt");

        // Alice and Acme still share everything they and Globex wrote before the cut.
        let kept: BTreeSet<String> = sim
            .written
            .iter()
            .filter(|(i, t)| *i != GLOBEX || cut.contains(t))
            .map(|(_, t)| t.clone())
            .collect();
        prop_assert_eq!(sim.texts(ALICE), sim.texts(ACME));
        prop_assert_eq!(sim.heads(ALICE), sim.heads(ACME));
        prop_assert!(sim.texts(ALICE).is_subset(&kept));
        for (i, t) in &sim.written {
            if *i != GLOBEX {
                prop_assert!(sim.texts(ALICE).contains(t), "Alice lost {}", t);
            }
        }
        for i in 0..3 {
            prop_assert_eq!(sim.sides[i].sessions.running(), 0);
            prop_assert!(sim.sides[i].requests.is_empty());
        }
    }
}

/// Globex (a member) and Mallory (a stranger) send Alice what she must refuse: her own
/// first change with its signature flipped, a message of Globex's with no purpose, a replay
/// of her own change, and a relationship Mallory opened naming her. The lying requests go
/// through the same hostile network as the honest ones.
fn lies(sim: &mut Sim, mallory: &mut Replica) -> Vec<ChangeHash> {
    let rel = sim.sides[ALICE]
        .replica
        .relationship(&sim.rel)
        .expect("Alice holds it")
        .clone();
    let doc = DocRef::Relationship(*rel.header());
    let mut forged = Vec::new();
    let mut changes = Vec::new();
    // Alice's first change with one bit of its signature flipped.
    let victim = rel.changes()[0].encode();
    let mut bad = victim.clone();
    bad[10] ^= 1;
    changes.push(bad);
    // A message of Globex's without a purpose, signed by Globex, on a copy of its replica.
    let mut copy = sim.sides[GLOBEX]
        .replica
        .relationship(&sim.rel)
        .expect("Globex holds it")
        .clone();
    let (_, c) = copy
        .append(
            &key(3),
            [9; 16],
            T0,
            RelBody::Message {
                thread: None,
                text: "buy now".into(),
                purpose: None,
            },
        )
        .unwrap();
    forged.push(c.hash());
    changes.push(c.encode());
    // A replay of Alice's own change.
    changes.push(victim);
    let id = sim.next_id + 1;
    sim.next_id = id;
    sim.net.push_back(Msg::Request {
        from: GLOBEX,
        to: ALICE,
        id,
        req: SyncRequest {
            doc,
            heads: Vec::new(),
            changes,
        },
    });
    // Mallory opens a relationship naming Alice, who never heard of it, and pushes it.
    let (mrel, _) = mallory.open("hello", &[sim.ids[ALICE]], T0).unwrap();
    let mdoc = Holder::doc(mallory, &mrel).unwrap();
    forged.extend(mdoc.changes().iter().map(SignedChange::hash));
    let req = SyncRequest {
        doc: mdoc.doc_ref(),
        heads: mdoc.heads(),
        changes: mdoc.changes().iter().map(SignedChange::encode).collect(),
    };
    let (resp, pushes, disconnect) =
        replica::handle_request(&mut sim.sides[ALICE].replica, &mallory.me(), req, T0);
    assert!(matches!(resp, SyncResponse::Refused { .. }), "{resp:?}");
    assert!(pushes.is_empty() && !disconnect);
    forged
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn lies_from_a_member_and_a_stranger_change_nothing_honest(
        before in proptest::collection::vec(op(), 0..60),
        after in proptest::collection::vec(op(), 0..60),
    ) {
        let mut sim = Sim::new();
        let mut mallory = Replica::new(key(4));
        let mut n = 0;
        for op in before {
            sim.step(op, &mut n);
        }
        let forged = lies(&mut sim, &mut mallory);
        for op in after {
            sim.step(op, &mut n);
        }
        sim.heal();

        let all: BTreeSet<String> = sim.written.iter().map(|(_, t)| t.clone()).collect();
        for i in 0..3 {
            prop_assert_eq!(sim.texts(i), all.clone(), "side {} holds every honest message", i);
            prop_assert_eq!(sim.heads(i), sim.heads(ALICE));
            let held = Holder::doc(&sim.sides[i].replica, &sim.rel).unwrap();
            for h in &forged {
                prop_assert!(!held.has_change(h), "side {} took a forged change", i);
            }
            prop_assert_eq!(sim.sides[i].sessions.running(), 0);
        }
        // Alice holds nothing of Mallory's, and keeps as evidence only what the liars sent.
        prop_assert_eq!(Holdings::rels_owned_by(&sim.sides[ALICE].replica, &mallory.me()), 0);
        let liars = [sim.ids[GLOBEX], mallory.me()];
        let evidence = &sim.sides[ALICE].replica.evidence;
        prop_assert!(evidence.iter().any(|(p, ..)| *p == mallory.me()), "the stranger's push is kept as evidence");
        prop_assert!(evidence.iter().all(|(p, ..)| liars.contains(p)), "{:?}", evidence);
        for i in [ACME, GLOBEX] {
            prop_assert!(sim.sides[i].replica.evidence.is_empty());
        }
    }
}

/// Alice writes `n` messages of nearly the largest size into `rel`; their pushes are dropped
/// (Acme is away).
fn alice_writes_large(sim: &mut Sim, rel: &DocId, n: usize) {
    let filler = "x".repeat(MAX_MESSAGE_BYTES - 64);
    for i in 0..n {
        sim.sides[ALICE]
            .replica
            .send(rel, &format!("{i} {filler}"), T0)
            .unwrap();
    }
}

/// The relationship Alice and Acme share from the start: its id and its reference.
fn shared_relationship(sim: &Sim) -> (DocId, DocRef) {
    let header = *sim.sides[ALICE]
        .replica
        .relationship(&sim.rel)
        .unwrap()
        .header();
    (sim.rel, DocRef::Relationship(header))
}

/// Alice writes more than two messages' worth ([`CHUNK_BYTES`]) while Acme is away; their
/// sync then takes several rounds. Acme reports heads Alice's next round builds on, and
/// sends nothing back of what Alice sent it: each change crosses once.
#[test]
fn a_sync_in_several_rounds_sends_each_change_once() {
    let mut sim = Sim::new();
    let (rel, doc) = shared_relationship(&sim);
    let (alice, acme) = (sim.ids[ALICE], sim.ids[ACME]);
    let written = 2 * CHUNK_BYTES / MAX_MESSAGE_BYTES + 100;
    alice_writes_large(&mut sim, &rel, written);
    let held = |sim: &Sim, i: usize| {
        sim.sides[i]
            .replica
            .relationship(&rel)
            .unwrap()
            .messages()
            .len()
    };
    let (mut to_acme, mut back, mut rounds) = (0, 0, 0);
    loop {
        rounds += 1;
        assert!(rounds <= 10, "the sync does not end");
        let (req, sent) = replica::round_request(&mut sim.sides[ALICE].replica, &acme, &doc, T0)
            .unwrap()
            .expect("Alice syncs the relationship with Acme");
        to_acme += req.changes.len();
        let (resp, _, disconnect) =
            replica::handle_request(&mut sim.sides[ACME].replica, &alice, req, T0);
        assert!(!disconnect);
        let SyncResponse::Sync { changes, .. } = &resp else {
            panic!("Acme refused: {resp:?}");
        };
        back += changes.len();
        let (out, _) =
            replica::handle_response(&mut sim.sides[ALICE].replica, &acme, &doc, &sent, resp, T0)
                .unwrap();
        assert!(out.refused.is_empty(), "{:?}", out.refused);
        if !out.again {
            break;
        }
    }
    assert!(
        rounds >= 3,
        "{rounds} rounds: the relationship fits fewer messages"
    );
    assert_eq!(held(&sim, ACME), written);
    assert_eq!(to_acme, written, "changes Alice sent");
    assert_eq!(back, 0, "changes Acme sent back");
    assert_eq!(sim.heads(ALICE), sim.heads(ACME));
}

/// Alice writes while Acme is away; Acme's next round reports heads that lack those
/// changes, and Alice's answer carries exactly them. Once Acme reports heads covering all
/// of Alice's, her answer carries nothing.
#[test]
fn an_answer_carries_what_the_requester_lacks_and_nothing_once_it_lacks_nothing() {
    let mut sim = Sim::new();
    let (rel, doc) = shared_relationship(&sim);
    let (alice, acme) = (sim.ids[ALICE], sim.ids[ACME]);
    let before = sim.sides[ACME]
        .replica
        .relationship(&rel)
        .unwrap()
        .messages()
        .len();
    for i in 0..3 {
        // The pushes are dropped: Acme is away.
        sim.sides[ALICE]
            .replica
            .send(&rel, &format!("while you were away {i}"), T0)
            .unwrap();
    }
    let mut answered = Vec::new();
    for _ in 0..2 {
        let (req, sent) = replica::round_request(&mut sim.sides[ACME].replica, &alice, &doc, T0)
            .unwrap()
            .expect("Acme syncs the relationship with Alice");
        let (resp, _, disconnect) =
            replica::handle_request(&mut sim.sides[ALICE].replica, &acme, req, T0);
        assert!(!disconnect);
        let SyncResponse::Sync { changes, .. } = &resp else {
            panic!("Alice refused: {resp:?}");
        };
        answered.push(changes.len());
        let (out, _) =
            replica::handle_response(&mut sim.sides[ACME].replica, &alice, &doc, &sent, resp, T0)
                .unwrap();
        assert!(out.refused.is_empty(), "{:?}", out.refused);
    }
    assert_eq!(answered, [3, 0], "changes in Alice's two answers");
    let held = sim.sides[ACME].replica.relationship(&rel).unwrap();
    assert_eq!(held.messages().len(), before + 3);
    assert_eq!(sim.heads(ALICE), sim.heads(ACME));
}

/// Alice writes while Acme is away, more than a batch's round may carry. Acme's rounds go
/// in full batches, so each of Alice's answers carries at most its share of a message
/// (or a single change), says more follow, and the next round goes on from there: Acme ends
/// with every change, each sent once.
#[test]
fn a_round_in_a_batch_carries_its_share_and_the_rest_follows() {
    let mut sim = Sim::new();
    let (rel, doc) = shared_relationship(&sim);
    let (alice, acme) = (sim.ids[ALICE], sim.ids[ACME]);
    let share = batch_answer_bytes(MAX_BATCH_ROUNDS);
    let written = 3 * share / MAX_MESSAGE_BYTES + 10;
    alice_writes_large(&mut sim, &rel, written);
    let before = sim.sides[ACME]
        .replica
        .relationship(&rel)
        .unwrap()
        .messages()
        .len();
    let (mut back, mut rounds) = (0, 0);
    loop {
        rounds += 1;
        assert!(rounds <= 20, "the sync does not end");
        let (req, sent) = replica::round_request(&mut sim.sides[ACME].replica, &alice, &doc, T0)
            .unwrap()
            .expect("Acme syncs the relationship with Alice");
        let (resp, _, disconnect) =
            replica::handle_request_within(&mut sim.sides[ALICE].replica, &acme, req, T0, share);
        assert!(!disconnect);
        let SyncResponse::Sync { changes, more, .. } = &resp else {
            panic!("Alice refused: {resp:?}");
        };
        let size: usize = changes.iter().map(|c| c.len() + 4).sum();
        assert!(
            changes.len() <= 1 || size <= share,
            "an answer of {size} bytes in {} changes, over its share of {share}",
            changes.len()
        );
        back += changes.len();
        let more = *more;
        let (out, _) =
            replica::handle_response(&mut sim.sides[ACME].replica, &alice, &doc, &sent, resp, T0)
                .unwrap();
        assert!(out.refused.is_empty(), "{:?}", out.refused);
        assert_eq!(out.again, more, "another round exactly while more follow");
        if !out.again {
            break;
        }
    }
    assert!(rounds >= 4, "{rounds} rounds: the answers were not cut");
    let held = sim.sides[ACME].replica.relationship(&rel).unwrap();
    assert_eq!(held.messages().len(), before + written);
    assert_eq!(back, written, "each change sent once");
    assert_eq!(sim.heads(ALICE), sim.heads(ACME));
}

/// A relationship Acme never saw, larger than two messages' worth: Alice opens it and
/// writes while Acme is away, so their first round is a cold sync, sent chunk by chunk as
/// Alice keeps it, in `chunks` chunks. Returns the document and how many messages were written.
fn cold_relationship(sim: &mut Sim, chunks: usize) -> (DocRef, usize) {
    let acme = sim.ids[ACME];
    // The pushes are dropped: Acme is away.
    let (rel, _) = sim.sides[ALICE]
        .replica
        .open("Alice and Acme, a long story", &[acme], T0)
        .unwrap();
    let written = (chunks - 1) * CHUNK_BYTES / MAX_MESSAGE_BYTES + 100;
    alice_writes_large(sim, &rel, written);
    let header = *sim.sides[ALICE]
        .replica
        .relationship(&rel)
        .unwrap()
        .header();
    (DocRef::Relationship(header), written)
}

/// One round from Alice to Acme, with Acme's answer passed through `tamper` first.
/// Returns what the request carried, Alice's outcome, or `None` when Alice had no round
/// to make.
fn round_to_acme(
    sim: &mut Sim,
    doc: &DocRef,
    tamper: impl FnOnce(SyncResponse) -> SyncResponse,
) -> Option<(SyncRequest, replica::RoundOutcome)> {
    let (alice, acme) = (sim.ids[ALICE], sim.ids[ACME]);
    let (req, sent) =
        replica::round_request(&mut sim.sides[ALICE].replica, &acme, doc, T0).unwrap()?;
    let (resp, _, disconnect) =
        replica::handle_request(&mut sim.sides[ACME].replica, &alice, req.clone(), T0);
    assert!(!disconnect);
    let (out, _) = replica::handle_response(
        &mut sim.sides[ALICE].replica,
        &acme,
        doc,
        &sent,
        tamper(resp),
        T0,
    )
    .unwrap();
    Some((req, out))
}

/// A cold sync goes out in chunks in the order Alice keeps her changes; each request
/// reports the heads of what the chunks so far carried (Alice holds at least their
/// history), never heads Acme cannot place, and each change crosses once.
#[test]
fn a_cold_sync_in_several_rounds_sends_each_change_once() {
    let mut sim = Sim::new();
    let (doc, written) = cold_relationship(&mut sim, 3);
    let id = doc.doc_id();
    let mut carried = 0;
    let mut rounds = 0;
    loop {
        rounds += 1;
        assert!(rounds <= 10, "the sync does not end");
        let (req, out) = round_to_acme(&mut sim, &doc, |r| r).expect("a round");
        carried += req.changes.len();
        let acme_rel = sim.sides[ACME].replica.relationship(&id).unwrap();
        for h in &req.heads {
            assert!(acme_rel.has_change(h), "a head Acme was not sent");
        }
        assert!(out.refused.is_empty(), "{:?}", out.refused);
        if !out.again {
            break;
        }
    }
    assert!(rounds >= 3, "{rounds} rounds: the story fits fewer chunks");
    // Title, member, and every message.
    assert_eq!(carried, written + 2, "changes Alice sent");
    let held = sim.sides[ACME].replica.relationship(&id).unwrap();
    assert_eq!(held.messages().len(), written);
    assert_eq!(
        held.heads(),
        sim.sides[ALICE].replica.relationship(&id).unwrap().heads()
    );
}

/// Acme answers a chunk of a cold sync with heads of its own making (claiming less than
/// it was sent): Alice stops reading in stored order and sends by the heads Acme reports,
/// so nothing Acme lacks is skipped.
#[test]
fn a_peer_that_reports_other_heads_in_a_cold_sync_is_sent_what_it_lacks() {
    let mut sim = Sim::new();
    let (doc, written) = cold_relationship(&mut sim, 2);
    let id = doc.doc_id();
    let (first, out) = round_to_acme(&mut sim, &doc, |resp| match resp {
        SyncResponse::Sync {
            changes,
            more,
            refused,
            ..
        } => SyncResponse::Sync {
            heads: Vec::new(),
            changes,
            more,
            refused,
        },
        other => other,
    })
    .expect("a round");
    assert!(out.again);
    // Alice now sends from the heads Acme reported (none): from the first change again.
    let (second, _) = round_to_acme(&mut sim, &doc, |r| r).expect("a round");
    assert_eq!(
        second.changes.first(),
        first.changes.first(),
        "the second round starts where Acme says it stands"
    );
    for _ in 0..10 {
        match round_to_acme(&mut sim, &doc, |r| r) {
            Some((_, out)) if out.again => continue,
            _ => break,
        }
    }
    let held = sim.sides[ACME].replica.relationship(&id).unwrap();
    assert_eq!(held.messages().len(), written);
}

/// Alice writes while the last chunk of a cold sync is on its way: Acme's answer says it
/// holds everything the chunks carried, and Alice still runs another round, which carries
/// the new change.
#[test]
fn a_change_written_during_the_last_chunk_of_a_cold_sync_goes_in_the_next_round() {
    let mut sim = Sim::new();
    let (doc, written) = cold_relationship(&mut sim, 1);
    let (alice, acme) = (sim.ids[ALICE], sim.ids[ACME]);
    let id = doc.doc_id();
    let (req, sent) = replica::round_request(&mut sim.sides[ALICE].replica, &acme, &doc, T0)
        .unwrap()
        .expect("a round");
    let (resp, _, _) = replica::handle_request(&mut sim.sides[ACME].replica, &alice, req, T0);
    // The push is dropped: the next round has to carry it.
    sim.sides[ALICE]
        .replica
        .send(&id, "one more thing", T0)
        .unwrap();
    let (out, _) =
        replica::handle_response(&mut sim.sides[ALICE].replica, &acme, &doc, &sent, resp, T0)
            .unwrap();
    assert!(out.again, "the new change is unsent");
    let (next, _) = round_to_acme(&mut sim, &doc, |r| r).expect("a round");
    assert_eq!(next.changes.len(), 1, "only the new change");
    let held = sim.sides[ACME].replica.relationship(&id).unwrap();
    assert_eq!(held.messages().len(), written + 1);
}

/// Alice revokes Acme's grant between two chunks of a cold sync: no further chunk goes,
/// and Acme holds none of what the remaining chunks held.
#[test]
fn a_revocation_between_chunks_of_a_cold_sync_stops_it() {
    let mut sim = Sim::new();
    let (doc, _) = cold_relationship(&mut sim, 2);
    let (_, out) = round_to_acme(&mut sim, &doc, |r| r).expect("a round");
    assert!(out.again, "more chunks to go");
    let acme = sim.ids[ACME];
    // The pushes (Acme's notice) are dropped: the revocation holds on Alice's side alone.
    sim.sides[ALICE].replica.revoke(acme, T0 + 1).unwrap();
    assert!(
        replica::round_request(&mut sim.sides[ALICE].replica, &acme, &doc, T0 + 1)
            .unwrap()
            .is_none(),
        "a chunk went to a revoked company"
    );
}

/// What a node checks ahead, beside its engine and across requests, spares only the second
/// check of the very copy it checked, for the very document. Acme sends Alice, in one
/// batch checked ahead together: a request carrying a message of its own twice, the first
/// copy with a flipped signature bit (the same change hash), and a request replaying that
/// honest change into another relationship. The honest copy goes in; the forged copy and
/// the replay are refused, as they are when nothing is checked ahead.
#[test]
fn a_batch_checked_ahead_vouches_for_no_forged_copy_and_no_replay_into_another_document() {
    let mut sim = Sim::new();
    let (rel, doc) = shared_relationship(&sim);
    let acme = sim.ids[ACME];
    let (other, _) = sim.sides[ALICE]
        .replica
        .open("Alice and Acme, another matter", &[acme], T0)
        .unwrap();
    sim.settle();
    let other_doc = Holder::doc(&sim.sides[ALICE].replica, &other)
        .unwrap()
        .doc_ref();
    let mut copy = sim.sides[ACME].replica.relationship(&rel).unwrap().clone();
    let (_, honest) = copy
        .append(
            &key(2),
            [9; 16],
            T0,
            RelBody::Message {
                thread: None,
                text: "your order ships today".into(),
                purpose: Some("support".into()),
            },
        )
        .unwrap();
    let mut forged = honest.encode();
    forged[10] ^= 1;
    assert_eq!(SignedChange::decode(&forged).unwrap().hash(), honest.hash());
    let heads = sim.heads(ACME).unwrap();
    let reqs = vec![
        SyncRequest {
            doc,
            heads: heads.clone(),
            changes: vec![forged, honest.encode()],
        },
        SyncRequest {
            doc: other_doc,
            heads,
            changes: vec![honest.encode()],
        },
    ];
    let mut refused = Vec::new();
    for req in replica::check_requests(reqs) {
        let (resp, _, _) = replica::handle_request(&mut sim.sides[ALICE].replica, &acme, req, T0);
        let SyncResponse::Sync { refused: r, .. } = resp else {
            panic!("Alice refused a request whole: {resp:?}");
        };
        refused.push(r.into_iter().map(|(h, k, _)| (h, k)).collect::<Vec<_>>());
    }
    let bad = rapport_protocol::wire::RefusalKind::Invalid;
    assert_eq!(
        refused,
        [vec![(honest.hash(), bad)], vec![(honest.hash(), bad)]],
        "the forged copy and the replay are refused"
    );
    let held = |id: &DocId| {
        Holder::doc(&sim.sides[ALICE].replica, id)
            .unwrap()
            .changes()
            .iter()
            .filter(|c| c.hash() == honest.hash())
            .map(SignedChange::signature_bytes)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        held(&rel),
        [honest.signature_bytes()],
        "the honest copy went in"
    );
    assert!(
        held(&other).is_empty(),
        "nothing went into the other relationship"
    );
}
