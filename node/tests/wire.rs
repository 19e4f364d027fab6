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
use rapport_node::{Node, NodeConfig, SyncCodec};
use rapport_protocol::wire::{
    DocRef, RefusalCode, RefusalKind, SYNC_PROTOCOL, SyncRequest, SyncResponse,
};
use rapport_protocol::{DocId, Kind, SignedChange};

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

    // Alice's node runs on her store; Acme speaks the protocol with its own key.
    alice.engine.0 = None;
    let node = Node::start(NodeConfig::loopback(alice.dir.path()))
        .await
        .unwrap();
    let addr: Multiaddr = node.listening().await.into_iter().next().unwrap();
    let seed = acme.engine.store().secret_key().unwrap().to_seed();
    let answers = exchange(addr.clone(), *seed, requests.to_vec()).await;
    let handle = node.handle();
    let stats = handle.net().stats();
    assert_eq!(
        stats.checked_ahead.load(Ordering::Relaxed),
        2,
        "a member's requests are checked ahead"
    );
    for (what, answer) in ["the forged copy", "the replay"].iter().zip(answers) {
        let SyncResponse::Sync { refused, .. } = answer else {
            panic!("a request was refused whole: {answer:?}");
        };
        let refused: Vec<_> = refused.into_iter().map(|(h, k, _)| (h, k)).collect();
        assert_eq!(
            refused,
            [(honest.hash(), RefusalKind::Invalid)],
            "{what} is refused"
        );
    }
    let held = node
        .handle()
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

/// Dials `addr` with the identity of `seed`, sends `requests` at once (so the node may
/// check them in one batch) and returns the answers, in order.
async fn exchange(
    addr: Multiaddr,
    seed: [u8; 32],
    requests: Vec<SyncRequest>,
) -> Vec<SyncResponse> {
    let keypair = libp2p::identity::Keypair::ed25519_from_bytes(seed).unwrap();
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )
        .unwrap()
        .with_behaviour(|_| {
            request_response::Behaviour::with_codec(
                SyncCodec::default(),
                [(StreamProtocol::new(SYNC_PROTOCOL), ProtocolSupport::Full)],
                request_response::Config::default(),
            )
        })
        .unwrap()
        .build();
    swarm.dial(addr).unwrap();
    let deadline = Instant::now() + PATIENCE;
    let mut ids = Vec::new();
    let mut answers: Vec<Option<SyncResponse>> = vec![None; requests.len()];
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
