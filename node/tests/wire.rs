//! A member that speaks the sync protocol itself, over real libp2p on loopback, to a real
//! node: what it sends goes through the node's network loop, which decodes requests and
//! checks their signatures ahead of the engine, in batches across requests. Checking ahead
//! must only ever spare a second check of the very copy it checked, for the very document.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::{Side, granted};
use futures::StreamExt;
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, StreamProtocol, noise, tcp, yamux};
use rapport_node::{FrameCodec, Framed, Node, NodeConfig, SyncResult};
use rapport_protocol::wire::{
    DocRef, MAX_BATCH_ROUNDS, RefusalCode, RefusalKind, SYNC_BATCH_PROTOCOL, SYNC_PROTOCOL,
    SyncBatch, SyncBatchResponse, SyncRequest, SyncResponse,
};
use rapport_protocol::{DocId, Kind, RelHeader, SecretKey, SignedChange};

/// How long the test waits for the node's answers at most.
const PATIENCE: Duration = Duration::from_secs(60);

/// Alice opens a relationship with Acme (`name`) and syncs it to Acme. Returns its id and
/// reference.
fn open(alice: &mut Side, acme: &mut Side, name: &str, now: u64) -> (DocId, DocRef) {
    let (out, _) = alice
        .engine
        .open_relationship(acme.me(), Some(name.into()), None, now)
        .unwrap();
    let doc = alice
        .engine
        .shared_with(&acme.me(), now)
        .into_iter()
        .find(|d| d.doc_id() == out.doc)
        .expect("the relationship is shared with Acme");
    common::sync(alice, acme, &doc, now);
    (out.doc, doc)
}

/// Acme sends Alice's running node, back to back, a request carrying one message of its
/// own twice (the first copy with a flipped signature bit: the same change hash), and a
/// request replaying that honest message into another relationship. The honest copy goes
/// in; the forged copy and the replay are refused as invalid, and nothing of either is
/// kept in place of the honest change. A stranger's request is not checked ahead at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_copy_and_a_replay_sent_over_the_wire_are_refused() {
    let now = rapport_node::now();
    let Attack {
        mut alice,
        acme,
        rel,
        other,
        honest,
        requests,
    } = attack(now);

    // Alice's node runs on her store; Acme speaks the protocol with its own key.
    let (node, addr) = run_node(&mut alice).await;
    let seed = acme.engine.store().secret_key().unwrap().to_seed();
    let answers = exchange(addr.clone(), *seed, requests.to_vec()).await;
    let handle = node.handle();
    let stats = handle.net().stats();
    assert_eq!(
        stats.checked_ahead.load(Ordering::Relaxed),
        2,
        "a member's requests are checked ahead"
    );
    forged_and_replay_refused(&answers, &honest);
    only_the_honest_copy_is_held(&node.handle(), rel, other, &honest).await;

    // A stranger's request is refused by the engine before anything of it is decoded:
    // checking it ahead would spend on it what a member's request costs.
    let answers = exchange(addr, [42; 32], requests[..1].to_vec()).await;
    assert!(
        matches!(
            answers[0],
            SyncResponse::Refused {
                code: RefusalCode::Forbidden,
                ..
            }
        ),
        "{:?}",
        answers[0]
    );
    assert_eq!(
        stats.checked_ahead.load(Ordering::Relaxed),
        2,
        "a stranger's request is not checked ahead"
    );
    node.shutdown().await;
}

/// Alice's relationships with Acme, Acme's honest message in the first, and the attack of
/// [`a_forged_copy_and_a_replay_sent_over_the_wire_are_refused`]: that message twice (the
/// first copy forged) and replayed into the second relationship.
struct Attack {
    alice: Side,
    acme: Side,
    rel: DocId,
    other: DocId,
    honest: SignedChange,
    requests: [SyncRequest; 2],
}

fn attack(now: u64) -> Attack {
    let mut alice = Side::new(Kind::Person, "Alice");
    let mut acme = Side::new(Kind::Org, "Acme");
    granted(&mut alice, &mut acme, now);
    let (rel, doc) = open(&mut alice, &mut acme, "an order", now);
    let (other, other_doc) = open(&mut alice, &mut acme, "another matter", now);
    acme.engine
        .send_message(
            &rel.to_hex(),
            "your order ships today".into(),
            Some("support".into()),
            None,
            now,
        )
        .unwrap();
    let honest_req = acme
        .engine
        .start_round(&alice.me(), &doc, now)
        .unwrap()
        .expect("Acme has a message to send");
    assert_eq!(honest_req.changes.len(), 1);
    let honest = SignedChange::decode(&honest_req.changes[0]).unwrap();
    let mut forged = honest.encode();
    forged[10] ^= 1;
    let requests = [
        SyncRequest {
            doc,
            heads: honest_req.heads.clone(),
            changes: vec![forged, honest.encode()],
        },
        SyncRequest {
            doc: other_doc,
            heads: Vec::new(),
            changes: vec![honest.encode()],
        },
    ];
    Attack {
        alice,
        acme,
        rel,
        other,
        honest,
        requests,
    }
}

/// Asserts that the forged copy and the replay were each refused as invalid, in that
/// order.
fn forged_and_replay_refused(answers: &[SyncResponse], honest: &SignedChange) {
    for (what, answer) in ["the forged copy", "the replay"].iter().zip(answers) {
        let SyncResponse::Sync { refused, .. } = answer else {
            panic!("{what}'s round was refused whole: {answer:?}");
        };
        let refused: Vec<_> = refused.iter().map(|(h, k, _)| (*h, *k)).collect();
        assert_eq!(
            refused,
            [(honest.hash(), RefusalKind::Invalid)],
            "{what} is refused"
        );
    }
}

/// Asserts that the node holds the honest copy of the message in `rel`, and only it, and
/// nothing of it in `other`.
async fn only_the_honest_copy_is_held(
    handle: &rapport_node::NodeHandle,
    rel: DocId,
    other: DocId,
    honest: &SignedChange,
) {
    let honest = honest.clone();
    let held = handle
        .read(move |e| {
            let copies = |id: &DocId| {
                e.store()
                    .changes(id)
                    .unwrap()
                    .iter()
                    .filter(|c| c.hash() == honest.hash())
                    .map(SignedChange::signature_bytes)
                    .collect::<Vec<_>>()
            };
            (copies(&rel) == [honest.signature_bytes()], copies(&other))
        })
        .await;
    assert!(held.0, "the honest copy, and only it, is stored");
    assert!(
        held.1.is_empty(),
        "nothing went into the other relationship"
    );
}

/// The same attack in version 3, as one batch beside a round of a relationship Acme has no
/// part in. Each round is answered on its own, in order, and checked ahead as single rounds
/// are; the forged copy and the replay are refused, the round of the foreign relationship
/// is refused whole, and the honest copy goes in. A batch of more rounds than the limit is
/// refused whole as a bad request, and nothing of it is applied. A stranger's batch is not
/// checked ahead, and each of its rounds is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_answered_round_by_round_and_checked_like_single_rounds() {
    let now = rapport_node::now();
    let Attack {
        mut alice,
        acme,
        rel,
        other,
        honest,
        requests,
    } = attack(now);
    let foreign = SyncRequest {
        doc: DocRef::Relationship(RelHeader {
            owner: SecretKey::from_seed([7; 32]).identity(),
            nonce: [7; 16],
        }),
        heads: Vec::new(),
        changes: Vec::new(),
    };
    let batch = SyncBatch {
        rounds: vec![requests[0].clone(), requests[1].clone(), foreign],
    };
    let too_many = SyncBatch {
        rounds: vec![requests[1].clone(); MAX_BATCH_ROUNDS + 1],
    };

    let (node, addr) = run_node(&mut alice).await;
    let seed = acme.engine.store().secret_key().unwrap().to_seed();
    let answers = exchange_batches(addr.clone(), *seed, vec![batch, too_many]).await;
    let handle = node.handle();
    let stats = handle.net().stats();
    assert_eq!(
        stats.checked_ahead.load(Ordering::Relaxed),
        1,
        "a member's batch is checked ahead, a batch that does not decode is not"
    );
    let SyncBatchResponse::Rounds(rounds) = &answers[0] else {
        panic!("the batch was refused whole: {:?}", answers[0]);
    };
    assert_eq!(rounds.len(), 3, "an answer per round");
    forged_and_replay_refused(&rounds[..2], &honest);
    assert!(
        matches!(rounds[2], SyncResponse::Refused { .. }),
        "the foreign relationship's round is refused: {:?}",
        rounds[2]
    );
    assert!(
        matches!(
            answers[1],
            SyncBatchResponse::Refused {
                code: RefusalCode::BadRequest,
                ..
            }
        ),
        "{:?}",
        answers[1]
    );
    only_the_honest_copy_is_held(&handle, rel, other, &honest).await;

    let answers = exchange_batches(
        addr,
        [42; 32],
        vec![SyncBatch {
            rounds: requests.to_vec(),
        }],
    )
    .await;
    let SyncBatchResponse::Rounds(rounds) = &answers[0] else {
        panic!("{:?}", answers[0]);
    };
    assert!(
        rounds.len() == 2
            && rounds.iter().all(|r| matches!(
                r,
                SyncResponse::Refused {
                    code: RefusalCode::Forbidden,
                    ..
                }
            )),
        "{rounds:?}"
    );
    assert_eq!(
        stats.checked_ahead.load(Ordering::Relaxed),
        1,
        "a stranger's batch is not checked ahead"
    );
    node.shutdown().await;
}

/// A peer that answers Alice's batches with more answers than rounds, each carrying a
/// change of its own that is otherwise fine: the answer cannot be matched to the rounds,
/// so Alice's node takes nothing of it and the sessions end, saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_that_do_not_match_the_batch_are_not_taken() {
    let now = rapport_node::now();
    let Attack {
        mut alice,
        acme,
        rel,
        honest,
        requests,
        ..
    } = attack(now);
    let doc = requests[0].doc;
    let (node, addr) = run_node(&mut alice).await;
    let seed = *acme.engine.store().secret_key().unwrap().to_seed();
    let mut swarm = peer_swarm::<SyncBatch, SyncBatchResponse>(seed, SYNC_BATCH_PROTOCOL);
    let handle = node.handle();
    let mut events = handle.subscribe().await;
    swarm.dial(addr).unwrap();
    let lie = SyncResponse::Sync {
        heads: vec![honest.hash()],
        changes: vec![honest.encode()],
        more: false,
        refused: Vec::new(),
    };
    let liar = serve(swarm, 0usize, move |answered, batch: SyncBatch| {
        *answered += 1;
        SyncBatchResponse::Rounds(vec![lie.clone(); batch.rounds.len() + 1])
    });
    connected(&mut events, &peer_id(seed)).await;
    let result = handle.net().sync(acme.me(), doc, PATIENCE).await;
    let SyncResult::Offline(why) = result else {
        panic!("the session should have ended broken: {result:?}");
    };
    assert!(why.contains("rounds to a batch of"), "{why}");
    let held = handle
        .read(move |e| {
            e.store()
                .changes(&rel)
                .unwrap()
                .iter()
                .any(|c| c.hash() == honest.hash())
        })
        .await;
    assert!(!held, "nothing of the unmatched answer was taken");
    node.shutdown().await;
    let answered = tokio::time::timeout(PATIENCE, liar)
        .await
        .expect("the liar sees the node go")
        .unwrap();
    assert!(answered >= 1, "the liar answered Alice's batches");
}

/// A node of an earlier release speaks version 2 of the sync protocol only, and answers
/// with its engine. Alice's node learns that from the batch the old node cannot take, and
/// syncs with it in version 2: what she wrote while it was away reaches it, and her sync
/// is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_of_an_earlier_release_is_synced_in_version_2() {
    let now = rapport_node::now();
    let Attack {
        mut alice,
        acme,
        rel,
        requests,
        ..
    } = attack(now);
    let doc = requests[0].doc;
    let alice_id = alice.me();
    let acme_id = acme.me();
    alice
        .engine
        .send_message(
            &rel.to_hex(),
            "written for an older node".into(),
            None,
            None,
            now,
        )
        .unwrap();
    let (node, addr) = run_node(&mut alice).await;
    let seed = *acme.engine.store().secret_key().unwrap().to_seed();
    let mut swarm = peer_swarm::<SyncRequest, SyncResponse>(seed, SYNC_PROTOCOL);
    let handle = node.handle();
    let mut events = handle.subscribe().await;
    swarm.dial(addr).unwrap();
    let old_node = serve(swarm, acme, move |acme, req: SyncRequest| {
        let (resp, _, _) = acme
            .engine
            .handle_request(&alice_id, req, rapport_node::now());
        resp
    });
    connected(&mut events, &peer_id(seed)).await;
    let result = handle.net().sync(acme_id, doc, PATIENCE).await;
    assert!(
        matches!(result, SyncResult::Delivered),
        "the sync with an old node: {result:?}"
    );
    node.shutdown().await;
    let acme = tokio::time::timeout(PATIENCE, old_node)
        .await
        .expect("the old node sees Alice's node go")
        .unwrap();
    let held = acme.engine.relationship(&rel.to_hex(), now).unwrap();
    assert!(
        held.messages
            .iter()
            .any(|m| m.text == "written for an older node"),
        "Alice's message reached the old node"
    );
}

/// More of Alice's relationships with a node of an earlier release than her node keeps
/// requests in flight with a peer, and more than a connection has streams for one version
/// of the protocol: one round each, in version 2. Every one of them reaches the old node
/// (requests past the limit wait in the loop; a stream past the connection's limit would
/// fail, and its session with it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_relationships_than_streams_all_reach_a_node_of_an_earlier_release() {
    const MANY: usize = 80;
    let now = rapport_node::now();
    let mut alice = Side::new(Kind::Person, "Alice");
    let mut acme = Side::new(Kind::Org, "Acme");
    granted(&mut alice, &mut acme, now);
    let mut rels = Vec::new();
    for i in 0..MANY {
        let (rel, _) = open(&mut alice, &mut acme, &format!("matter {i}"), now);
        rels.push(rel);
    }
    // Written while Acme's node is away: each relationship has a round to go.
    for (i, rel) in rels.iter().enumerate() {
        alice
            .engine
            .send_message(&rel.to_hex(), format!("note {i}"), None, None, now)
            .unwrap();
    }
    let alice_id = alice.me();
    let (node, addr) = run_node(&mut alice).await;
    let seed = *acme.engine.store().secret_key().unwrap().to_seed();
    let mut swarm = peer_swarm::<SyncRequest, SyncResponse>(seed, SYNC_PROTOCOL);
    swarm.dial(addr).unwrap();
    // The old node says how many of the notes it holds after each request it answers.
    let (count_tx, mut count) = tokio::sync::watch::channel(0);
    let mut arrived = std::collections::HashSet::new();
    let old_node = serve(swarm, acme, move |acme, req: SyncRequest| {
        let id = req.doc.doc_id();
        let (resp, _, _) = acme
            .engine
            .handle_request(&alice_id, req, rapport_node::now());
        if let Some(i) = rels.iter().position(|r| *r == id)
            && acme
                .engine
                .relationship(&id.to_hex(), now)
                .unwrap()
                .messages
                .iter()
                .any(|m| m.text == format!("note {i}"))
        {
            arrived.insert(i);
        }
        let _ = count_tx.send(arrived.len());
        resp
    });
    let all = tokio::time::timeout(PATIENCE, count.wait_for(|n| *n == MANY))
        .await
        .is_ok_and(|r| r.is_ok());
    assert!(
        all,
        "{} of {MANY} relationships reached the old node",
        *count.borrow()
    );
    node.shutdown().await;
    tokio::time::timeout(PATIENCE, old_node)
        .await
        .expect("the old node sees Alice's node go")
        .unwrap();
}

/// Dials `addr` with the identity of `seed`, sends `requests` at once (so the node may
/// check them in one batch) and returns the answers, in order.
async fn exchange(
    addr: Multiaddr,
    seed: [u8; 32],
    requests: Vec<SyncRequest>,
) -> Vec<SyncResponse> {
    talk(addr, seed, SYNC_PROTOCOL, requests).await
}

/// [`exchange`] in version 3: each of `batches` is one message of several rounds.
async fn exchange_batches(
    addr: Multiaddr,
    seed: [u8; 32],
    batches: Vec<SyncBatch>,
) -> Vec<SyncBatchResponse> {
    talk(addr, seed, SYNC_BATCH_PROTOCOL, batches).await
}

/// Starts a node on `side`'s store (its engine closed first) and returns it with its
/// address.
async fn run_node(side: &mut Side) -> (Node, Multiaddr) {
    side.engine.0 = None;
    let node = Node::start(NodeConfig::loopback(side.dir.path()))
        .await
        .unwrap();
    let addr = node.listening().await.into_iter().next().unwrap();
    (node, addr)
}

/// A swarm with the identity of `seed` that speaks `protocol` with messages `Req` and
/// `Resp` and nothing else, and stays connected between requests, as a node does.
fn peer_swarm<Req: Framed, Resp: Framed>(
    seed: [u8; 32],
    protocol: &'static str,
) -> libp2p::Swarm<request_response::Behaviour<FrameCodec<Req, Resp>>> {
    let keypair = libp2p::identity::Keypair::ed25519_from_bytes(seed).unwrap();
    libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )
        .unwrap()
        .with_behaviour(|_| {
            request_response::Behaviour::with_codec(
                FrameCodec::<Req, Resp>::default(),
                [(StreamProtocol::new(protocol), ProtocolSupport::Full)],
                request_response::Config::default(),
            )
        })
        .unwrap()
        .with_swarm_config(|c| c.with_idle_connection_timeout(PATIENCE))
        .build()
}

/// Runs `swarm` as a peer that answers every request with `answer`, until its connection
/// closes; then hands back its state.
fn serve<Req: Framed, Resp: Framed, S: Send + 'static>(
    mut swarm: libp2p::Swarm<request_response::Behaviour<FrameCodec<Req, Resp>>>,
    mut state: S,
    mut answer: impl FnMut(&mut S, Req) -> Resp + Send + 'static,
) -> tokio::task::JoinHandle<S> {
    tokio::spawn(async move {
        loop {
            match swarm.select_next_some().await {
                SwarmEvent::Behaviour(request_response::Event::Message {
                    message:
                        request_response::Message::Request {
                            request: Ok(req),
                            channel,
                            ..
                        },
                    ..
                }) => {
                    let resp = answer(&mut state, req);
                    let _ = swarm.behaviour_mut().send_response(channel, resp);
                }
                SwarmEvent::ConnectionClosed { .. } => return state,
                _ => {}
            }
        }
    })
}

/// The peer id of the identity of `seed`, as the node's events name it.
fn peer_id(seed: [u8; 32]) -> String {
    libp2p::identity::Keypair::ed25519_from_bytes(seed)
        .unwrap()
        .public()
        .to_peer_id()
        .to_string()
}

/// Waits until the node says `peer` connected.
async fn connected(events: &mut tokio::sync::broadcast::Receiver<rapport_node::Event>, peer: &str) {
    tokio::time::timeout(PATIENCE, async {
        loop {
            if let Ok(rapport_node::Event::PeerConnected { peer: p }) = events.recv().await
                && p == peer
            {
                return;
            }
        }
    })
    .await
    .expect("the node sees the peer connect in time");
}

/// Dials `addr` with the identity of `seed`, sends `requests` over `protocol` at once and
/// returns the answers, in order.
async fn talk<Req: Framed, Resp: Framed>(
    addr: Multiaddr,
    seed: [u8; 32],
    protocol: &'static str,
    requests: Vec<Req>,
) -> Vec<Resp> {
    let mut swarm = peer_swarm::<Req, Resp>(seed, protocol);
    swarm.dial(addr).unwrap();
    let deadline = Instant::now() + PATIENCE;
    let mut ids = Vec::new();
    let mut answers: Vec<Option<Resp>> = requests.iter().map(|_| None).collect();
    let mut pending = Some(requests);
    while answers.iter().any(Option::is_none) {
        let left = deadline.saturating_duration_since(Instant::now());
        let event = tokio::time::timeout(left, swarm.select_next_some())
            .await
            .expect("the node answers every request in time");
        match event {
            SwarmEvent::ConnectionEstablished { peer_id, .. } => {
                for req in pending.take().into_iter().flatten() {
                    ids.push(swarm.behaviour_mut().send_request(&peer_id, Ok(req)));
                }
            }
            SwarmEvent::Behaviour(request_response::Event::Message {
                message:
                    request_response::Message::Response {
                        request_id,
                        response,
                    },
                ..
            }) => {
                let i = ids.iter().position(|r| *r == request_id).unwrap();
                answers[i] = Some(response);
            }
            SwarmEvent::Behaviour(request_response::Event::OutboundFailure { error, .. }) => {
                panic!("a request failed: {error}");
            }
            // The node's own rounds go unanswered: only what is sent here counts.
            _ => {}
        }
    }
    answers.into_iter().map(Option::unwrap).collect()
}
