//! Community relays, offline mailboxes and end-to-end encryption, with real nodes and a real
//! relay on loopback. An observer taps the relay's links; the relay's store is read byte for
//! byte; a revoked company keeps its old keys and tries them on everything the relay holds.

use rapport_node::relay::Quotas;
use rapport_protocol::Kind;
use rapport_protocol::mail::Envelope;
use rapport_tests::{
    Reach, Tap, TestNode, TestRelay, WAIT, all_in_mailbox, consent_to, eventually, file_contains,
    messages, open, send,
};

fn via(relay: libp2p::Multiaddr, relay_only: bool) -> Reach {
    Reach {
        relay: Some(relay),
        relay_only,
    }
}

/// Customer and company listen on nothing: each can only be reached through the relay,
/// and they still grant, accept and converse. Nothing readable crosses the relay's links.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn customer_and_company_converse_only_through_a_relay() {
    let relay = TestRelay::open(Quotas::default()).await;
    let tap = Tap::start(relay.socket()).await;
    let through = tap.route(&relay.addr());
    let customer = TestNode::new_with(Kind::Person, "Alice", via(through.clone(), true)).await;
    let company = TestNode::new_with(Kind::Org, "Acme", via(through.clone(), true)).await;
    for n in [&customer, &company] {
        assert!(
            n.addrs
                .iter()
                .all(|a| a.to_string().contains("p2p-circuit")),
            "a relay-only node has no direct address: {:?}",
            n.addrs
        );
    }

    consent_to(&customer, &[&company]).await;
    let rel = open(&customer, &[&company]).await;
    send(&customer.handle, &rel, "hello through the relay", None).await;
    send(
        &company.handle,
        &rel,
        "relayed answer from Acme",
        Some("support"),
    )
    .await;
    for n in [&customer, &company] {
        eventually(30, "both messages at both ends", || async {
            messages(&n.handle, &rel).await.len() == 2
        })
        .await;
    }
    let stats = relay.relay.stats().await;
    assert!(stats.reservations >= 2, "{stats:?}");
    assert!(
        stats.circuits >= 1,
        "the two talk over a relayed circuit: {stats:?}"
    );
    assert!(tap.len() > 10_000, "traffic went through the tap");
    for text in ["hello through the relay", "relayed answer from Acme"] {
        assert!(
            !tap.saw(text.as_bytes()),
            "plaintext {text:?} on the relay's links"
        );
    }
}

/// The customer is offline while the company writes; the company leaves; the relay
/// restarts; the customer comes back and receives everything from its mailbox. Neither the
/// relay's store nor its links ever hold a message's text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_customer_gets_its_mail_after_the_company_is_gone() {
    let relay = TestRelay::open(Quotas::default()).await;
    let tap = Tap::start(relay.socket()).await;
    let through = tap.route(&relay.addr());
    let customer = TestNode::new_with(Kind::Person, "Alice", via(through.clone(), false)).await;
    let company = TestNode::new_with(Kind::Org, "Acme", via(through.clone(), false)).await;
    company.connect(&customer).await;
    consent_to(&customer, &[&company]).await;
    let rel = open(&customer, &[&company]).await;
    send(&customer.handle, &rel, "my order is late", None).await;
    eventually(10, "the company reading it", || async {
        messages(&company.handle, &rel).await.len() == 1
    })
    .await;

    let customer_id = customer.id();
    let away = customer.stop().await;
    let texts: Vec<String> = (0..5)
        .map(|i| format!("mailbox reply number {i} about the late order"))
        .collect();
    for t in &texts {
        let delivery = send(&company.handle, &rel, t, Some("support")).await;
        assert!(delivery.any_deposited(), "{delivery}");
    }
    eventually(30, "the relay storing the company's mail", || async {
        relay.relay.stats().await.deposited >= 1
    })
    .await;
    // Nothing the company wrote for the customer is still on its way to the relay.
    all_in_mailbox(&company, customer_id).await;
    company.stop().await;

    let db = relay.dir.join(rapport_node::RELAY_DB);
    let (relay, stored) = relay.restart_with(|s| s.mail_count().expect("count")).await;
    assert!(stored >= 1, "mail survives the relay's restart");
    for t in texts.iter().map(String::as_str).chain(["my order is late"]) {
        assert!(
            !file_contains(&db, t.as_bytes()),
            "plaintext in the relay's store"
        );
        assert!(!tap.saw(t.as_bytes()), "plaintext on the relay's links");
    }

    let customer = away.start_with(via(tap.route(&relay.addr()), false)).await;
    eventually(30, "every reply from the mailbox", || async {
        messages(&customer.handle, &rel).await.len() == 6
    })
    .await;
    let got = messages(&customer.handle, &rel).await;
    for t in &texts {
        assert!(got.contains(t), "{t} missing from {got:?}");
    }
    // Taken mail is deleted once acknowledged.
    eventually(30, "the mailbox emptied", || async {
        relay.relay.stats().await.delivered >= 1
    })
    .await;
}

/// A company revoked while a member is offline keeps every key it ever held and reads the
/// relay's whole store: it opens nothing written after the revocation, and the new epoch
/// holds no key for it. The remaining member, back online, reads it all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_company_cannot_decrypt_later_mail_or_epochs() {
    let relay = TestRelay::open(Quotas::default()).await;
    let r = relay.addr();
    let customer = TestNode::new_with(Kind::Person, "Alice", via(r.clone(), false)).await;
    let acme = TestNode::new_with(Kind::Org, "Acme", via(r.clone(), false)).await;
    let globex = TestNode::new_with(Kind::Org, "Globex", via(r.clone(), false)).await;
    acme.connect(&customer).await;
    globex.connect(&customer).await;
    let grants = consent_to(&customer, &[&acme, &globex]).await;
    let rel = open(&customer, &[&acme, &globex]).await;
    send(&customer.handle, &rel, "before the revocation", None).await;
    eventually(10, "acme reading", || async {
        messages(&acme.handle, &rel).await.len() == 1
    })
    .await;
    let doc = customer
        .handle
        .read({
            let rel = rel.clone();
            move |e| {
                e.relationship(&rel, rapport_node::now())
                    .expect("rel")
                    .summary
                    .id
            }
        })
        .await;
    let acme_id = acme.id();
    let globex_id = globex.id();
    // Acme keeps a copy of every key it holds, as a dishonest company would.
    let acme_epochs = acme.handle.read(move |e| e.held_epochs(&doc)).await;
    assert!(!acme_epochs.is_empty(), "acme held a content key");
    let acme_gone = acme.stop().await;
    let stolen: Vec<(u32, rapport_protocol::seal::ContentKey)> =
        rapport_node::Store::open(&acme_gone.dir)
            .expect("acme store")
            .epoch_keys()
            .expect("keys")
            .into_iter()
            .filter(|(d, _, _)| *d == doc)
            .map(|(_, n, k)| (n, k))
            .collect();
    assert!(!stolen.is_empty());

    let globex_gone = globex.stop().await;
    let g = grants[0].clone();
    customer
        .handle
        .write(WAIT, move |e| e.revoke(&g, None, rapport_node::now()))
        .await
        .expect("revoke");
    let after = "written after acme was revoked";
    let delivery = send(&customer.handle, &rel, after, None).await;
    assert!(delivery.0.iter().any(|d| d.peer == globex_id), "{delivery}");
    eventually(30, "mail for globex at the relay", || async {
        relay.relay.stats().await.deposited >= 1
    })
    .await;
    // The newest epoch is sealed to the customer and Globex only.
    let (latest, sealed_to) = customer
        .handle
        .read({
            let rel = rel.clone();
            move |e| {
                let d = e.relationship(&rel, rapport_node::now()).expect("rel");
                (d.epoch, d.epoch_recipients)
            }
        })
        .await;
    let latest = latest.expect("an epoch");
    assert!(
        stolen.iter().all(|(n, _)| *n < latest),
        "acme holds no key of epoch {latest}"
    );
    assert!(!sealed_to.contains(&acme_id.to_string()), "{sealed_to:?}");
    assert!(sealed_to.contains(&globex_id.to_string()), "{sealed_to:?}");

    // Once nothing the customer wrote for Acme or Globex is still on its way to the relay,
    // Acme reads the relay's whole store with every key it kept.
    all_in_mailbox(&customer, acme_id).await;
    all_in_mailbox(&customer, globex_id).await;
    let (relay, mail) = relay.restart_with(|s| s.all_mail().expect("mail")).await;
    assert!(!mail.is_empty());
    for (_, m) in &mail {
        let env = Envelope::decode(&m.envelope).expect("an envelope");
        if env.to == acme_id {
            // Only the revocation itself, sealed to Acme, waits for it: no conversation.
            assert!(
                matches!(env.doc, rapport_protocol::wire::DocRef::Consent(_)),
                "no relationship content is left for a revoked company"
            );
        }
        for (_, key) in &stolen {
            let nonce = match env.seal {
                rapport_protocol::mail::Seal::Epoch { nonce, .. }
                | rapport_protocol::mail::Seal::Recipient { nonce, .. } => nonce,
            };
            assert!(
                env.open_with(key, &nonce).is_err(),
                "acme opened later mail"
            );
        }
    }
    // Acme comes back: it is cut off, learns of the revocation and erases.
    let acme = acme_gone.start_with(via(relay.addr(), false)).await;
    acme.connect(&customer).await;
    eventually(30, "acme erasing", || async {
        acme.handle
            .read(|e| e.relationships().expect("the store answers").len())
            .await
            == 0
    })
    .await;
    // Globex, back, reads what was written after the revocation, from its mailbox.
    let globex = globex_gone.start_with(via(relay.addr(), false)).await;
    eventually(30, "globex reading the later message", || async {
        messages(&globex.handle, &rel)
            .await
            .iter()
            .any(|m| m == after)
    })
    .await;
}

/// A peer over its quota is refused clearly while another member keeps depositing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotas_refuse_one_peer_and_not_the_others() {
    let relay = TestRelay::open(Quotas {
        max_stored_bytes: 24 * 1024,
        ..Quotas::default()
    })
    .await;
    let r = relay.addr();
    let customer = TestNode::new_with(Kind::Person, "Alice", via(r.clone(), false)).await;
    let acme = TestNode::new_with(Kind::Org, "Acme", via(r.clone(), false)).await;
    let globex = TestNode::new_with(Kind::Org, "Globex", via(r.clone(), false)).await;
    acme.connect(&customer).await;
    globex.connect(&customer).await;
    consent_to(&customer, &[&acme, &globex]).await;
    let rel_a = open(&customer, &[&acme]).await;
    let rel_g = open(&customer, &[&globex]).await;
    let away = customer.stop().await;

    let big = "x".repeat(15_000);
    let first = send(
        &acme.handle,
        &rel_a,
        &format!("first {big}"),
        Some("support"),
    )
    .await;
    assert!(first.any_deposited(), "{first}");
    let second = send(
        &acme.handle,
        &rel_a,
        &format!("second {big}"),
        Some("support"),
    )
    .await;
    // Not deposited, and the relay's reason reaches the sender.
    assert!(!second.any_deposited(), "{second}");
    assert!(
        second.to_string().contains("over quota"),
        "the relay says why: {second}"
    );
    let other = send(
        &globex.handle,
        &rel_g,
        "globex still gets through",
        Some("support"),
    )
    .await;
    assert!(other.any_deposited(), "{other}");
    assert!(relay.relay.stats().await.refused >= 1);

    let customer = away.start().await;
    eventually(30, "globex's mail delivered", || async {
        messages(&customer.handle, &rel_g)
            .await
            .iter()
            .any(|m| m == "globex still gets through")
    })
    .await;
}

/// In allow-list mode only admitted identities may connect; the list is re-read while the
/// relay runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allow_list_relay_admits_only_its_members() {
    let relay = TestRelay::new(false, Quotas::default()).await;
    let stranger = TestNode::new(Kind::Person, "Stranger").await;
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("member");
    let store = rapport_node::Store::create(&dir, Kind::Person, "Member", rapport_node::now())
        .expect("store");
    let member_id = store.profile().expect("profile").identity;
    let member_key = store.secret_key().expect("secret key");
    drop(store);
    rapport_node::relay::edit_allow_list(&relay.dir, &member_id, true).expect("allow");
    // Re-read within seconds: the member is admitted and gets a circuit.
    eventually(10, "the relay admitting the member", || {
        admits(&relay, &member_key)
    })
    .await;
    let member = TestNode::start_with(&dir, via(relay.addr(), false)).await;
    assert!(
        member
            .addrs
            .iter()
            .any(|a| a.to_string().contains("p2p-circuit"))
    );
    // The stranger's connection is closed by the relay as soon as it is made.
    let _ = stranger.handle.net().dial(relay.addr()).await;
    let relay_id = relay.relay.identity().to_string();
    let cut_off = || async {
        !stranger
            .handle
            .net()
            .peers()
            .await
            .iter()
            .any(|p| p.peer == relay_id && p.connected)
    };
    eventually(10, "the stranger cut off", cut_off).await;
    // It stays cut off: dialling again, it is cut off again.
    let _ = stranger.handle.net().dial(relay.addr()).await;
    eventually(10, "a stranger stays cut off", cut_off).await;
    assert_eq!(
        relay.relay.stats().await.reservations,
        1,
        "only the member reserved"
    );
}

type MailClient = libp2p::Swarm<libp2p::request_response::Behaviour<rapport_node::MailCodec>>;

fn mail_client(key: &rapport_protocol::SecretKey) -> MailClient {
    rapport_tests::client_swarm(
        key,
        rapport_protocol::mail::MAILBOX_PROTOCOL,
        rapport_node::MailCodec::default(),
        libp2p::request_response::Config::default(),
        std::time::Duration::from_secs(10),
    )
}

/// Whether the relay admits `key`'s identity now: a bare client in its name connects and
/// its mailbox fetch is answered (not refused, and the connection not cut).
async fn admits(relay: &TestRelay, key: &rapport_protocol::SecretKey) -> bool {
    use futures::StreamExt;
    use libp2p::request_response::{Event, Message};
    use rapport_protocol::mail::{MailRequest, MailResponse};
    let mut c = mail_client(key);
    let peer = libp2p::PeerId::from_bytes(&relay.relay.identity().peer_id_bytes()).expect("peer");
    c.dial(relay.addr()).expect("dial");
    let id = c
        .behaviour_mut()
        .send_request(&peer, Ok(MailRequest::Fetch { after: 0 }));
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while let Ok(ev) = tokio::time::timeout_at(deadline, c.select_next_some()).await {
        match ev {
            libp2p::swarm::SwarmEvent::Behaviour(Event::Message {
                message:
                    Message::Response {
                        request_id,
                        response,
                    },
                ..
            }) if request_id == id => return matches!(response, MailResponse::Mail { .. }),
            libp2p::swarm::SwarmEvent::Behaviour(Event::OutboundFailure { request_id, .. })
                if request_id == id =>
            {
                return false;
            }
            _ => {}
        }
    }
    false
}

async fn ask(
    c: &mut MailClient,
    relay: libp2p::PeerId,
    req: rapport_protocol::mail::MailRequest,
) -> rapport_protocol::mail::MailResponse {
    use futures::StreamExt;
    let id = c.behaviour_mut().send_request(&relay, Ok(req));
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let ev = tokio::time::timeout_at(deadline, c.select_next_some())
            .await
            .expect("an answer within 10s");
        if let libp2p::swarm::SwarmEvent::Behaviour(libp2p::request_response::Event::Message {
            message:
                libp2p::request_response::Message::Response {
                    request_id,
                    response,
                },
            ..
        }) = ev
            && request_id == id
        {
            return response;
        }
    }
}

/// A hostile depositor: envelopes signed by someone else, altered, or garbage are refused
/// with nothing stored; past its rate it is refused while the relay keeps what it took; it
/// cannot fetch anyone else's mail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_refuses_forged_altered_and_garbage_mail() {
    use rapport_protocol::mail::{MailRefusal, MailRequest, MailResponse};
    use rapport_protocol::wire::DocRef;
    use rapport_protocol::{RelHeader, SecretKey};
    let relay = TestRelay::open(Quotas {
        // Refused envelopes count against the rate too: 1 + 2 + 1 refused, 1 stored, then over.
        max_deposits_per_minute: 5,
        ..Quotas::default()
    })
    .await;
    let (mallory, alice, bob) = (
        SecretKey::from_seed([66; 32]),
        SecretKey::from_seed([1; 32]),
        SecretKey::from_seed([2; 32]),
    );
    let doc = DocRef::Relationship(RelHeader {
        owner: alice.identity(),
        nonce: [3; 16],
    });
    let mut c = mail_client(&mallory);
    let relay_peer =
        libp2p::PeerId::from_bytes(&relay.relay.identity().peer_id_bytes()).expect("peer");
    c.dial(relay.addr()).expect("dial");
    let seal = |from: &SecretKey| {
        Envelope::seal_to(
            from,
            bob.identity(),
            doc,
            [9; 32],
            [1; 24],
            &[b"x".to_vec()],
        )
        .expect("seal")
        .encode()
    };
    let refused = |r: MailResponse, want: MailRefusal| match r {
        MailResponse::Refused { code, detail } => {
            assert_eq!(code, want, "{detail}");
            assert!(
                detail.contains("the relay kept nothing") || want == MailRefusal::QuotaRate,
                "{detail}"
            );
        }
        other => panic!("not refused: {other:?}"),
    };
    // In Alice's name.
    refused(
        ask(&mut c, relay_peer, MailRequest::Deposit(vec![seal(&alice)])).await,
        MailRefusal::BadEnvelope,
    );
    // Altered after signing.
    let mut altered = seal(&mallory);
    let n = altered.len();
    altered[n - 70] ^= 1;
    refused(
        ask(
            &mut c,
            relay_peer,
            MailRequest::Deposit(vec![seal(&mallory), altered]),
        )
        .await,
        MailRefusal::BadEnvelope,
    );
    // Garbage.
    refused(
        ask(
            &mut c,
            relay_peer,
            MailRequest::Deposit(vec![vec![0xAB; 100]]),
        )
        .await,
        MailRefusal::BadEnvelope,
    );
    // Honest mail is stored; past the rate, refused.
    assert_eq!(
        ask(
            &mut c,
            relay_peer,
            MailRequest::Deposit(vec![seal(&mallory)])
        )
        .await,
        MailResponse::Stored { count: 1 }
    );
    refused(
        ask(
            &mut c,
            relay_peer,
            MailRequest::Deposit(vec![seal(&mallory)]),
        )
        .await,
        MailRefusal::QuotaRate,
    );
    // Mallory's own mailbox is empty; Bob's mail is only ever handed to Bob.
    assert_eq!(
        ask(&mut c, relay_peer, MailRequest::Fetch { after: 0 }).await,
        MailResponse::Mail {
            items: Vec::new(),
            more: false
        }
    );
    let (_, mail) = relay.restart_with(|s| s.all_mail().expect("mail")).await;
    assert_eq!(mail.len(), 1, "only the honest envelope was stored");
}
