//! The customer's node under attack from a member that speaks the sync protocol with its
//! own (hostile) client: forged, replayed, impersonating, over-scoped, out-of-role,
//! oversized and garbage input is refused change by change, honest changes still sync, and
//! a peer past the limit is disconnected. Then the member is revoked and refused whole.

use std::time::Duration;

use futures::StreamExt;
use libp2p::request_response;
use libp2p::swarm::SwarmEvent;
use libp2p::{PeerId, StreamProtocol, Swarm};
use rapport_node::{Store, now};
use rapport_protocol::automerge::ROOT;
use rapport_protocol::automerge::transaction::{CommitOptions, Transactable};
use rapport_protocol::wire::{DocRef, RefusalCode, SYNC_PROTOCOL, SyncRequest, SyncResponse};
use rapport_protocol::{
    EntryId, Kind, RelBody, RelEntry, RelationshipDoc, SecretKey, SignedChange, actor_for,
};
use rapport_tests::{TestNode, WAIT, consent_to, eventually, messages, open, send};

/// A client that writes whatever bytes it is given and reads length-prefixed answers.
#[derive(Clone, Default)]
struct RawCodec;

impl request_response::Codec for RawCodec {
    type Protocol = StreamProtocol;
    type Request = Vec<u8>;
    type Response = Vec<u8>;

    async fn read_request<T: futures::AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        _: &mut T,
    ) -> std::io::Result<Vec<u8>> {
        Err(std::io::Error::other("this client serves nothing"))
    }

    async fn read_response<T: futures::AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> std::io::Result<Vec<u8>> {
        use futures::AsyncReadExt;
        let mut len = [0u8; 4];
        io.read_exact(&mut len).await?;
        let mut buf = vec![0u8; u32::from_be_bytes(len) as usize];
        io.read_exact(&mut buf).await?;
        Ok(buf)
    }

    async fn write_request<T: futures::AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Vec<u8>,
    ) -> std::io::Result<()> {
        use futures::AsyncWriteExt;
        io.write_all(&req).await?;
        io.close().await
    }

    async fn write_response<T: futures::AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        _: &mut T,
        _: Vec<u8>,
    ) -> std::io::Result<()> {
        Err(std::io::Error::other("this client serves nothing"))
    }
}

type Raw = Swarm<request_response::Behaviour<RawCodec>>;

fn hostile_client(key: &SecretKey) -> Raw {
    rapport_tests::client_swarm(
        key,
        SYNC_PROTOCOL,
        RawCodec,
        request_response::Config::default().with_request_timeout(Duration::from_secs(10)),
        Duration::from_secs(60),
    )
}

async fn connect(swarm: &mut Raw, addr: libp2p::Multiaddr) -> PeerId {
    swarm.dial(addr).unwrap();
    tokio::time::timeout(WAIT, async {
        loop {
            if let SwarmEvent::ConnectionEstablished { peer_id, .. } =
                swarm.select_next_some().await
            {
                return peer_id;
            }
        }
    })
    .await
    .expect("connects on loopback")
}

/// Sends raw bytes (a framed message, or anything) and waits for the answer.
async fn ask_raw(swarm: &mut Raw, peer: PeerId, bytes: Vec<u8>) -> Result<Vec<u8>, String> {
    let id = swarm.behaviour_mut().send_request(&peer, bytes);
    tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match swarm.select_next_some().await {
                SwarmEvent::Behaviour(request_response::Event::Message {
                    message:
                        request_response::Message::Response {
                            request_id,
                            response,
                        },
                    ..
                }) if request_id == id => return Ok(response),
                SwarmEvent::Behaviour(request_response::Event::OutboundFailure {
                    request_id,
                    error,
                    ..
                }) if request_id == id => return Err(error.to_string()),
                _ => {}
            }
        }
    })
    .await
    .unwrap_or_else(|_| Err("no answer".into()))
}

/// Waits until the node has closed the client's connections to `peer`.
async fn disconnected(client: &mut Raw, peer: PeerId) -> Result<(), tokio::time::error::Elapsed> {
    tokio::time::timeout(WAIT, async {
        while client.is_connected(&peer) {
            let _ = client.select_next_some().await;
        }
    })
    .await
}

/// Waits until the client's dial fails or its connection is closed on it.
async fn turned_away(client: &mut Raw) -> Result<(), tokio::time::error::Elapsed> {
    tokio::time::timeout(WAIT, async {
        loop {
            match client.select_next_some().await {
                SwarmEvent::ConnectionClosed { .. }
                | SwarmEvent::OutgoingConnectionError { .. } => return,
                _ => {}
            }
        }
    })
    .await
}

fn frame(body: Vec<u8>) -> Vec<u8> {
    let mut v = (body.len() as u32).to_be_bytes().to_vec();
    v.extend(body);
    v
}

async fn ask(swarm: &mut Raw, peer: PeerId, req: &SyncRequest) -> SyncResponse {
    let bytes = ask_raw(swarm, peer, frame(req.encode()))
        .await
        .expect("an answer");
    SyncResponse::decode(&bytes).expect("a valid response")
}

/// A change with arbitrary content: the entry JSON of `entry`, signed by `signer` (whose key
/// the actor names), on top of `doc`. Nothing checks the entry on the way out.
fn crafted(doc: &RelationshipDoc, signer: &SecretKey, entry: &RelEntry) -> SignedChange {
    let text = serde_json::to_string(entry).unwrap();
    let mut am = doc.automerge().clone();
    am.set_actor(actor_for(&signer.identity(), [0xEE; 16]));
    let mut tx = am.transaction();
    tx.put(ROOT, EntryId::of(&text).to_hex(), text).unwrap();
    tx.commit_with(CommitOptions::default().with_time(0));
    SignedChange::sign(&doc.id(), am.get_last_local_change().unwrap(), signer).unwrap()
}

fn message(by: &SecretKey, text: &str, purpose: &str) -> RelEntry {
    RelEntry {
        v: 1,
        by: by.identity(),
        at: now(),
        body: RelBody::Message {
            thread: None,
            text: text.into(),
            purpose: Some(purpose.into()),
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_is_refused_change_by_change_and_honest_changes_sync() {
    let alice = TestNode::new(Kind::Person, "Alice").await;
    let mallory = TestNode::new(Kind::Org, "Mallory Ltd").await;
    mallory.connect(&alice).await;
    let grant = consent_to(&alice, &[&mallory]).await.remove(0);
    let rel = open(&alice, &[&mallory]).await;
    send(&alice.handle, &rel, "hello Mallory", None).await;
    rapport_tests::eventually(10, "Mallory holding the message", || async {
        messages(&mallory.handle, &rel).await.len() == 1
    })
    .await;

    // Mallory stops its honest node and speaks the protocol with its own client.
    let stopped = mallory.stop().await;
    let store = Store::open(&stopped.dir).unwrap();
    let key = store.secret_key().unwrap();
    let rel_id = rapport_protocol::DocId::from_hex(&rel).unwrap();
    let doc = store.load_relationship(&rel_id).unwrap();
    drop(store);
    let header = *doc.header();
    assert_eq!(header.owner, alice.id());
    let mut client = hostile_client(&key);
    let peer = connect(&mut client, alice.addrs[0].clone()).await;
    let before = messages(&alice.handle, &rel).await;

    let mut honest_doc = doc.clone();
    let (_, honest) = honest_doc
        .append(
            &key,
            [5; 16],
            now(),
            RelBody::Message {
                thread: None,
                text: "an honest reply".into(),
                purpose: Some("support".into()),
            },
        )
        .unwrap();
    let mut forged = honest.encode();
    forged[20] ^= 0x40; // a bit of the signature
    let over_scoped = crafted(&doc, &key, &message(&key, "BUY NOW 50% OFF", "marketing"));
    let outsider = SecretKey::from_seed([9; 32]);
    // Mallory writes words in Alice's name: the entry says by = Alice, Mallory signs.
    let mut in_her_name = message(&key, "I waive all my rights", "support");
    in_her_name.by = alice.id();
    let impersonation = crafted(&doc, &key, &in_her_name);
    // Mallory adds an accomplice as a member (owner-only).
    let accomplice = RelEntry {
        v: 1,
        by: key.identity(),
        at: now(),
        body: RelBody::Member {
            member: outsider.identity(),
            name: "accomplice".into(),
        },
    };
    let out_of_role = crafted(&doc, &key, &accomplice);
    // A change Mallory signed for another document (its consent ledger), replayed here.
    let consent_doc = rapport_protocol::ConsentHeader {
        customer: alice.id(),
        grantee: key.identity(),
    };
    let replayed = {
        let s = Store::open(&stopped.dir).unwrap();
        s.changes(&consent_doc.doc_id())
            .unwrap()
            .into_iter()
            .find(|c| c.author_bytes() == key.identity().as_bytes())
            .expect("Mallory's acceptance")
    };

    let req = SyncRequest {
        doc: DocRef::Relationship(header),
        heads: doc.heads(),
        changes: vec![
            forged,
            over_scoped.encode(),
            impersonation.encode(),
            out_of_role.encode(),
            replayed.encode(),
            b"not a change at all".to_vec(),
            honest.encode(),
        ],
    };
    let SyncResponse::Sync { refused, .. } = ask(&mut client, peer, &req).await else {
        panic!("the request as a whole is allowed: Mallory holds an active grant");
    };
    assert_eq!(refused.len(), 6, "{refused:#?}");
    let reasons: Vec<&str> = refused.iter().map(|(_, _, r)| r.as_str()).collect();
    assert!(
        reasons.iter().any(|r| r.contains("signature")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("unsolicited")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("claims to be by")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("only the owner")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("undecodable")),
        "{reasons:?}"
    );
    let now_held = messages(&alice.handle, &rel).await;
    assert_eq!(now_held.len(), before.len() + 1);
    assert!(now_held.contains(&"an honest reply".to_string()));
    assert!(
        !now_held
            .iter()
            .any(|m| m.contains("BUY NOW") || m.contains("waive"))
    );
    let evidence = alice.handle.read(|e| e.refusals(100).unwrap()).await;
    assert!(evidence.len() >= 5);

    // Replaying the honest change is harmless: nothing new, nothing refused.
    let again = SyncRequest {
        changes: vec![honest.encode()],
        ..req.clone()
    };
    let SyncResponse::Sync { refused, .. } = ask(&mut client, peer, &again).await else {
        panic!("still allowed");
    };
    assert!(refused.is_empty());
    assert_eq!(messages(&alice.handle, &rel).await.len(), before.len() + 1);

    // An oversized frame is refused before it is read, with a clear error, and changes
    // nothing.
    let mut huge = ((rapport_protocol::wire::MAX_WIRE_MESSAGE + 1) as u32)
        .to_be_bytes()
        .to_vec();
    huge.extend(vec![0u8; 1024]);
    let answer = ask_raw(&mut client, peer, huge).await.expect("an answer");
    match SyncResponse::decode(&answer) {
        Ok(SyncResponse::Refused { code, detail }) => {
            assert_eq!(code, RefusalCode::BadRequest);
            assert!(detail.contains("over the limit"), "{detail}");
        }
        other => panic!("an oversized frame must be refused, got {other:?}"),
    }
    assert_eq!(messages(&alice.handle, &rel).await.len(), before.len() + 1);

    // Revocation: from now on Mallory is refused whole and receives nothing.
    let g = grant.clone();
    alice
        .handle
        .write(std::time::Duration::ZERO, move |e| {
            e.revoke(&g, None, now())
        })
        .await
        .unwrap();
    send(&alice.handle, &rel, "written after the revocation", None).await;
    let late = crafted(&honest_doc, &key, &message(&key, "still here?", "support"));
    let resp = ask(
        &mut client,
        peer,
        &SyncRequest {
            doc: DocRef::Relationship(header),
            heads: Vec::new(),
            changes: vec![late.encode()],
        },
    )
    .await;
    match resp {
        SyncResponse::Refused { code, .. } => assert_eq!(code, RefusalCode::Forbidden),
        other => panic!("a revoked member must be refused, got {other:?}"),
    }
    assert!(
        !messages(&alice.handle, &rel)
            .await
            .contains(&"still here?".to_string())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_sending_too_many_bad_changes_is_disconnected() {
    let alice = TestNode::new(Kind::Person, "Alice").await;
    let mallory = TestNode::new(Kind::Org, "Mallory Ltd").await;
    mallory.connect(&alice).await;
    consent_to(&alice, &[&mallory]).await;
    let rel = open(&alice, &[&mallory]).await;
    let stopped = mallory.stop().await;
    let store = Store::open(&stopped.dir).unwrap();
    let key = store.secret_key().unwrap();
    let doc = store
        .load_relationship(&rapport_protocol::DocId::from_hex(&rel).unwrap())
        .unwrap();
    drop(store);
    let mut client = hostile_client(&key);
    let peer = connect(&mut client, alice.addrs[0].clone()).await;
    let flood: Vec<Vec<u8>> = (0..rapport_node::MAX_STRIKES + 5)
        .map(|i| {
            crafted(
                &doc,
                &key,
                &message(&key, &format!("spam {i}"), "marketing"),
            )
            .encode()
        })
        .collect();
    let req = SyncRequest {
        doc: DocRef::Relationship(*doc.header()),
        heads: doc.heads(),
        changes: flood,
    };
    let _ = ask_raw(&mut client, peer, frame(req.encode())).await;
    // Alice's node disconnects Mallory and refuses it for a while.
    let gone = disconnected(&mut client, peer).await;
    assert!(
        gone.is_ok(),
        "Alice's node should disconnect a peer past the limit"
    );
    // Dialling again gets it nowhere: it is disconnected at once.
    client.dial(alice.addrs[0].clone()).unwrap();
    let refused = tokio::time::timeout(WAIT, async {
        loop {
            match client.select_next_some().await {
                SwarmEvent::ConnectionClosed { .. }
                | SwarmEvent::OutgoingConnectionError { .. } => {
                    return;
                }
                _ => {}
            }
        }
    })
    .await;
    assert!(refused.is_ok(), "a banned peer is turned away");
    assert!(messages(&alice.handle, &rel).await.is_empty());
}

/// A stranger that sends requests the codec cannot decode (garbage bytes, or a frame over
/// the size limit) is counted for each one, disconnected past the limit, and turned away
/// when it dials again while the ban lasts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_sending_undecodable_requests_is_disconnected_and_refused() {
    let alice = TestNode::new(Kind::Person, "Alice").await;
    let mut client = hostile_client(&SecretKey::from_seed([77; 32]));
    let peer = connect(&mut client, alice.addrs[0].clone()).await;
    // Well over the limit of undecodable requests (16); each one waits for its outcome.
    for i in 0..40 {
        if !client.is_connected(&peer) {
            break;
        }
        let garbage = if i % 2 == 0 {
            frame(b"this is not a sync request".to_vec())
        } else {
            // Announces more than the limit: refused before reading.
            let mut v = ((rapport_protocol::wire::MAX_WIRE_MESSAGE + 1) as u32)
                .to_be_bytes()
                .to_vec();
            v.extend(b"junk");
            v
        };
        let _ = ask_raw(&mut client, peer, garbage).await;
    }
    let gone = disconnected(&mut client, peer).await;
    assert!(
        gone.is_ok(),
        "a peer past the limit of undecodable requests should be disconnected"
    );
    // Dialling again gets it nowhere while the ban lasts.
    client.dial(alice.addrs[0].clone()).unwrap();
    let refused = turned_away(&mut client).await;
    assert!(refused.is_ok(), "a banned peer is turned away on redial");

    // The ban is stored, and outlives a restart of Alice's node.
    let mallory = SecretKey::from_seed([77; 32]).identity();
    eventually(10, "the ban is stored", || async {
        alice
            .handle
            .read(move |e| e.store().conduct(&mallory).unwrap())
            .await
            .is_some_and(|c| c.banned_until > now())
    })
    .await;
    let alice = alice.restart().await;
    let mut client = hostile_client(&SecretKey::from_seed([77; 32]));
    client.dial(alice.addrs[0].clone()).unwrap();
    let refused = turned_away(&mut client).await;
    assert!(
        refused.is_ok(),
        "a banned peer is still turned away after the node restarts"
    );
}

/// One identity cannot hold more than a few connections to a node at once (each costs the
/// node a file descriptor and buffers): past the per-peer limit, new ones are closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_cannot_open_many_connections_at_once() {
    use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
    let alice = TestNode::new(Kind::Person, "Alice").await;
    let alice_peer = PeerId::from_bytes(&alice.id().peer_id_bytes()).unwrap();
    let mut client = hostile_client(&SecretKey::from_seed([78; 32]));
    const DIALS: usize = 12;
    for _ in 0..DIALS {
        client
            .dial(
                DialOpts::peer_id(alice_peer)
                    .addresses(vec![alice.addrs[0].clone()])
                    .condition(PeerCondition::Always)
                    .build(),
            )
            .unwrap();
    }
    let (mut resolved, mut open) = (0usize, 0usize);
    let settled = tokio::time::timeout(WAIT, async {
        loop {
            match client.select_next_some().await {
                SwarmEvent::ConnectionEstablished { .. } => {
                    resolved += 1;
                    open += 1;
                }
                SwarmEvent::OutgoingConnectionError { .. } => resolved += 1,
                SwarmEvent::ConnectionClosed { .. } => open -= 1,
                _ => {}
            }
            if resolved == DIALS && open <= 4 {
                return;
            }
        }
    })
    .await;
    assert!(
        settled.is_ok(),
        "{open} connections from one peer stayed open (at most 4 expected)"
    );
}

/// Strangers from one IP address (fresh identities cost nothing) cannot take every
/// incoming slot of a node: past the per-address limit their connections are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_from_one_address_cannot_take_every_connection() {
    const STRANGERS: u8 = 40;
    const PER_IP: usize = 32;
    let alice = TestNode::new(Kind::Person, "Alice").await;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<u8>(256);
    let mut tasks = Vec::new();
    for s in 0..STRANGERS {
        let tx = tx.clone();
        let addr = alice.addrs[0].clone();
        tasks.push(tokio::spawn(async move {
            let mut c = hostile_client(&SecretKey::from_seed([150 + s; 32]));
            c.dial(addr).unwrap();
            loop {
                let what = match c.select_next_some().await {
                    SwarmEvent::ConnectionEstablished { .. } => 0,
                    SwarmEvent::OutgoingConnectionError { .. } => 1,
                    SwarmEvent::ConnectionClosed { .. } => 2,
                    _ => continue,
                };
                if tx.send(what).await.is_err() {
                    return;
                }
            }
        }));
    }
    drop(tx);
    let (mut established, mut failed, mut closed) = (0usize, 0usize, 0usize);
    let settled = tokio::time::timeout(WAIT, async {
        while let Some(what) = rx.recv().await {
            match what {
                0 => established += 1,
                1 => failed += 1,
                _ => closed += 1,
            }
            if established + failed == usize::from(STRANGERS) && established - closed <= PER_IP {
                return;
            }
        }
    })
    .await;
    for t in tasks {
        t.abort();
    }
    assert!(
        settled.is_ok(),
        "{} connections from one address stayed open (at most {PER_IP} expected; {failed} refused)",
        established - closed
    );
}
