//! Sync over a simulated network that drops, duplicates, reorders and delays messages.
//!
//! Two real engines (a customer and a company, on stores in temporary directories) run the
//! node's own session machine (`rapport_protocol::session::Sessions`) and the engine's sync
//! entry points, as the network loop does, but every request and response passes through a
//! simulated network whose behaviour proptest chooses, while both sides keep writing.
//! Whatever the network did, once it heals and both sides sync, they hold the same
//! conversation with every message either wrote, nothing honest was refused, and every
//! session ended.

mod common;

use std::collections::{HashMap, VecDeque};

use proptest::prelude::*;
use rapport_node::{Engine, PeerRefusal, Push, Store};
use rapport_protocol::automerge::ChangeHash;
use rapport_protocol::session::{End, Sessions, Start, Step, Ticket};
use rapport_protocol::wire::{DocRef, SyncRequest, SyncResponse};
use rapport_protocol::{IdentityKey, Kind};

const T0: u64 = 1_800_000_000;

struct Side {
    engine: Engine,
    _dir: tempfile::TempDir,
    sessions: Sessions<usize, DocRef, (), PeerRefusal>,
    /// Requests in flight: id → (document, hashes sent, round).
    requests: HashMap<u64, (DocRef, Vec<ChangeHash>, Ticket)>,
    written: Vec<String>,
}

// Moved once each, like the network loop's messages; boxing buys nothing here.
#[allow(clippy::large_enum_variant)]
#[derive(Clone)]
enum Msg {
    Request {
        from: usize,
        id: u64,
        req: SyncRequest,
    },
    Response {
        to: usize,
        id: u64,
        resp: SyncResponse,
    },
}

struct Sim {
    sides: [Side; 2],
    ids: [IdentityKey; 2],
    net: VecDeque<Msg>,
    next_id: u64,
    rel: Option<String>,
}

fn side(kind: Kind, name: &str) -> Side {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(dir.path(), kind, name, T0).unwrap();
    Side {
        engine: Engine::open(store).unwrap(),
        _dir: dir,
        sessions: Sessions::default(),
        requests: HashMap::new(),
        written: Vec::new(),
    }
}

impl Sim {
    fn new() -> Self {
        let alice = side(Kind::Person, "Alice");
        let acme = side(Kind::Org, "Acme");
        let ids = [alice.engine.me(), acme.engine.me()];
        Sim {
            sides: [alice, acme],
            ids,
            net: VecDeque::new(),
            next_id: 0,
            rel: None,
        }
    }

    fn other(i: usize) -> usize {
        1 - i
    }

    /// Side `i` wants to sync what its engine asked for.
    fn pushes(&mut self, i: usize, pushes: Vec<Push>) {
        for (peer, doc) in pushes {
            assert_eq!(
                peer,
                self.ids[Self::other(i)],
                "pushes go to the other side"
            );
            self.want(i, doc);
        }
    }

    fn want(&mut self, i: usize, doc: DocRef) {
        if let Some(start) = self.sides[i].sessions.want(Self::other(i), doc, Some(())) {
            self.round(i, start);
        }
    }

    /// Builds and sends the round `start` of side `i`.
    fn round(&mut self, i: usize, start: Start<usize, DocRef>) {
        let peer = self.ids[Self::other(i)];
        let s = &mut self.sides[i];
        let built = s.engine.round_request(&peer, &start.doc, T0).unwrap();
        let Some((req, sent)) = built else {
            let end = s.sessions.built(start.ticket, false);
            self.ended(i, end);
            return;
        };
        self.next_id += 1;
        s.requests
            .insert(self.next_id, (start.doc, sent, start.ticket));
        self.net.push_back(Msg::Request {
            from: i,
            id: self.next_id,
            req,
        });
    }

    fn ended(&mut self, i: usize, end: Option<End<usize, DocRef, (), PeerRefusal>>) {
        if let Some(next) = end.and_then(|e| e.next) {
            self.round(i, next);
        }
    }

    /// Delivers message `k` of those in flight.
    fn deliver(&mut self, k: usize) {
        let Some(msg) = self.net.remove(k) else {
            return;
        };
        match msg {
            Msg::Request { from, id, req } => {
                let to = Self::other(from);
                let (resp, pushes, disconnect) =
                    self.sides[to]
                        .engine
                        .handle_request(&self.ids[from], req, T0);
                assert!(!disconnect, "an honest peer is never disconnected");
                self.pushes(to, pushes);
                self.net.push_back(Msg::Response { to: from, id, resp });
            }
            Msg::Response { to, id, resp } => {
                // A response whose request is no longer awaited (a duplicate, or one whose
                // request was given up as lost) is dropped, as the network loop does.
                let Some((doc, sent, ticket)) = self.sides[to].requests.remove(&id) else {
                    return;
                };
                let peer = self.ids[Self::other(to)];
                let (o, pushes) = self.sides[to]
                    .engine
                    .handle_response(&peer, &doc, &sent, resp, T0)
                    .unwrap();
                assert!(!o.disconnect);
                self.pushes(to, pushes);
                let step = self.sides[to].sessions.answered(ticket, Ok(o));
                match step {
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
        if let Some((_, _, ticket)) = self.sides[side].requests.remove(&id) {
            let end = self.sides[side]
                .sessions
                .failed(ticket, "the request timed out".into());
            self.ended(side, end);
        }
    }

    /// Delivers message `k` twice (a request only; a response is matched once by id).
    fn duplicate(&mut self, k: usize) {
        if let Some(m @ Msg::Request { .. }) = self.net.get(k).cloned() {
            self.net.push_back(m);
        }
    }

    fn write(&mut self, i: usize, text: String) {
        let rel = self.rel.clone().expect("a relationship");
        let purpose = (i == 1).then(|| "support".to_owned());
        let (_, pushes) = self.sides[i]
            .engine
            .send_message(&rel, text.clone(), purpose, None, T0)
            .unwrap();
        self.sides[i].written.push(text);
        self.pushes(i, pushes);
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

    /// Grant, acceptance and a relationship, over a perfect network.
    fn setup(&mut self) {
        let (_, pushes) = self.sides[0]
            .engine
            .grant(
                common::grant_args(
                    self.ids[1],
                    &["conversation:read", "conversation:write", "contact:support"],
                    "support",
                ),
                T0,
            )
            .unwrap();
        self.pushes(0, pushes);
        self.settle();
        let (rows, pushes) = self.sides[1].engine.accept(None, None, T0).unwrap();
        assert_eq!(rows.len(), 1);
        self.pushes(1, pushes);
        self.settle();
        let (out, pushes) = self.sides[0]
            .engine
            .open_relationship(self.ids[1], None, None, T0)
            .unwrap();
        self.rel = Some(out.rel.expect("a relationship").to_hex());
        self.pushes(0, pushes);
        self.settle();
        assert_eq!(self.sides[1].engine.relationships().unwrap().len(), 1);
    }

    fn texts(&self, i: usize) -> Vec<String> {
        let rel = self.rel.as_deref().unwrap();
        let mut t: Vec<String> = self.sides[i]
            .engine
            .relationship(rel, T0)
            .unwrap()
            .messages
            .into_iter()
            .map(|m| m.text)
            .collect();
        t.sort();
        t
    }
}

#[derive(Debug, Clone)]
enum Op {
    Deliver(usize),
    Drop(usize),
    Duplicate(usize),
    /// Deliver the newest message first.
    DeliverLast,
    Write(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => any::<usize>().prop_map(Op::Deliver),
        2 => any::<usize>().prop_map(Op::Drop),
        2 => any::<usize>().prop_map(Op::Duplicate),
        2 => Just(Op::DeliverLast),
        3 => (0usize..2).prop_map(Op::Write),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn a_lossy_network_delays_the_conversation_but_never_breaks_it(
        ops in proptest::collection::vec(op(), 1..120)
    ) {
        let mut sim = Sim::new();
        sim.setup();
        let mut n = 0;
        for op in ops {
            let len = sim.net.len();
            match op {
                Op::Deliver(k) if len > 0 => sim.deliver(k % len),
                Op::Drop(k) if len > 0 => sim.drop_msg(k % len),
                Op::Duplicate(k) if len > 0 => sim.duplicate(k % len),
                Op::DeliverLast if len > 0 => sim.deliver(len - 1),
                Op::Write(i) => {
                    n += 1;
                    sim.write(i, format!("message {n} from side {i}"));
                }
                _ => {}
            }
        }
        // The network heals; both sides sync everything they share.
        sim.settle();
        for i in 0..2 {
            let peer = sim.ids[Sim::other(i)];
            for doc in sim.sides[i].engine.shared_with(&peer, T0) {
                sim.want(i, doc);
            }
        }
        sim.settle();

        let mut all: Vec<String> = sim.sides[0].written.clone();
        all.extend(sim.sides[1].written.iter().cloned());
        all.sort();
        prop_assert_eq!(sim.texts(0), all.clone());
        prop_assert_eq!(sim.texts(1), all);
        let rel = sim.rel.clone().unwrap();
        prop_assert_eq!(
            sim.sides[0].engine.heads(&rel).unwrap(),
            sim.sides[1].engine.heads(&rel).unwrap()
        );
        for i in 0..2 {
            prop_assert!(sim.sides[i].engine.refusals(10).unwrap().is_empty());
            prop_assert_eq!(sim.sides[i].sessions.running(), 0);
            prop_assert!(sim.sides[i].requests.is_empty());
        }
    }
}
