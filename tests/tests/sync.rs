//! Real nodes on loopback syncing consent and relationship documents.

use rapport_node::now;
use rapport_protocol::Kind;
use rapport_tests::{
    TestNode, WAIT, consent_to, eventually, grant, heads, in_sync, messages, open, send, status,
};

/// Grant, accept, open, talk both ways, refuse an unsolicited message, revoke: the whole
/// story between a customer and a company, over the network.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn customer_and_company_talk_under_consent_and_revocation_cuts_off() {
    let alice = TestNode::new(Kind::Person, "Alice").await;
    let acme = TestNode::new(Kind::Org, "Acme Ltd").await;
    alice.connect(&acme).await;

    let gid = grant(
        &alice.handle,
        acme.id(),
        &["conversation:read", "conversation:write", "contact:support"],
    )
    .await;
    eventually(10, "the grant reaches Acme", || async {
        status(&acme.handle, &gid).await == "pending"
    })
    .await;
    let (rows, _) = acme
        .handle
        .write(WAIT, |e| e.accept(None, None, now()))
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    eventually(10, "Alice sees the acceptance", || async {
        status(&alice.handle, &gid).await == "active"
    })
    .await;

    let acme_id = acme.id();
    let (opened, delivery) = alice
        .handle
        .write(WAIT, move |e| {
            e.open_relationship(
                acme_id,
                Some("Acme".into()),
                Some("Order 1234".into()),
                now(),
            )
        })
        .await
        .unwrap();
    assert!(delivery.any_delivered(), "{delivery}");
    let rel = opened.rel.unwrap().to_hex();
    eventually(10, "Acme holds the relationship", || async {
        acme.handle
            .read(|e| e.relationships().expect("the store answers").len())
            .await
            == 1
    })
    .await;

    let d = send(&alice.handle, &rel, "My order has not arrived", None).await;
    assert!(d.any_delivered(), "{d}");
    let d = send(
        &acme.handle,
        &rel,
        "Sorry! It ships today.",
        Some("support"),
    )
    .await;
    assert!(d.any_delivered(), "{d}");
    eventually(10, "both hold both messages", || async {
        messages(&alice.handle, &rel).await.len() == 2
            && messages(&acme.handle, &rel).await.len() == 2
    })
    .await;

    // Unsolicited marketing: refused by Alice's node and kept there as evidence. Acme keeps
    // what it wrote (a peer's refusal never changes a node's own history) and is not
    // stopped by it: its next message, under a purpose Alice allows, is delivered.
    let d = send(&acme.handle, &rel, "50% off everything!", Some("marketing")).await;
    // Refused for good, as forbidden, and the reason names the scope the company lacks.
    let forbidden = d.0.iter().any(|x| match &x.outcome {
        rapport_node::SyncResult::Refused(r) => r.iter().any(|p| {
            matches!(
                p.what,
                rapport_node::Refused::Change {
                    kind: rapport_protocol::wire::RefusalKind::Forbidden,
                    ..
                }
            )
        }),
        _ => false,
    });
    assert!(forbidden, "{d}");
    assert!(
        d.refusals().iter().any(|r| r.contains("contact:marketing")),
        "{d}"
    );
    assert_eq!(messages(&alice.handle, &rel).await.len(), 2);
    assert_eq!(messages(&acme.handle, &rel).await.len(), 3);
    let d = send(
        &acme.handle,
        &rel,
        "Your parcel is at the depot.",
        Some("support"),
    )
    .await;
    assert!(d.any_delivered(), "{d}");
    eventually(10, "Alice holds Acme's next message", || async {
        messages(&alice.handle, &rel).await.len() == 3
    })
    .await;
    assert!(
        !messages(&alice.handle, &rel)
            .await
            .iter()
            .any(|m| m.contains("50% off"))
    );
    let refusals = alice.handle.read(|e| e.refusals(10).unwrap()).await;
    assert_eq!(refusals.len(), 1);
    assert!(refusals[0].reason.contains("unsolicited"));
    assert!(refusals[0].entries[0].contains("50% off"));
    assert!(
        refusals[0].signed_change.is_some(),
        "the signed change is kept as evidence"
    );

    // Revoke: Acme erases and signs its receipt, which reaches Alice.
    let g = gid.clone();
    alice
        .handle
        .write(WAIT, move |e| {
            e.revoke(&g, Some("closed my account".into()), now())
        })
        .await
        .unwrap();
    eventually(10, "Acme erases the relationship", || async {
        acme.handle
            .read(|e| e.relationships().expect("the store answers").len())
            .await
            == 0
    })
    .await;
    eventually(10, "Alice holds Acme's erasure receipt", || async {
        let g = gid.clone();
        alice
            .handle
            .read(move |e| {
                e.grants(now())
                    .iter()
                    .any(|r| r.grant.to_hex() == g && r.erasure_acked_at.is_some())
            })
            .await
    })
    .await;

    // Alice writes after the revocation: nothing reaches Acme, not even once a sync of the
    // consent ledger they still share has gone both ways after that write.
    let d = send(&alice.handle, &rel, "Written after the revocation", None).await;
    assert!(!d.any_delivered(), "{d}");
    in_sync(&alice, &acme).await;
    assert_eq!(
        acme.handle
            .read(|e| e.relationships().expect("the store answers").len())
            .await,
        0
    );
    // Acme keeps the consent ledger as its proof.
    assert_eq!(status(&acme.handle, &gid).await, "revoked");
}

/// A relationship with two companies: what each writes reaches the other through the
/// customer's node, and all three end with the same heads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_many_to_many_converge() {
    let alice = TestNode::new(Kind::Person, "Alice").await;
    let acme = TestNode::new(Kind::Org, "Acme").await;
    let globex = TestNode::new(Kind::Org, "Globex").await;
    alice.connect(&acme).await;
    alice.connect(&globex).await;
    consent_to(&alice, &[&acme, &globex]).await;
    let rel = open(&alice, &[&acme, &globex]).await;

    // Everyone writes at once.
    let (a, b, c) = tokio::join!(
        async {
            for i in 0..5 {
                send(&alice.handle, &rel, &format!("alice {i}"), None).await;
            }
        },
        async {
            for i in 0..5 {
                send(&acme.handle, &rel, &format!("acme {i}"), Some("support")).await;
            }
        },
        async {
            for i in 0..5 {
                send(
                    &globex.handle,
                    &rel,
                    &format!("globex {i}"),
                    Some("support"),
                )
                .await;
            }
        },
    );
    let _ = (a, b, c);
    eventually(20, "all three nodes holding all 15 messages", || async {
        messages(&alice.handle, &rel).await.len() == 15
            && messages(&acme.handle, &rel).await.len() == 15
            && messages(&globex.handle, &rel).await.len() == 15
    })
    .await;
    eventually(10, "the same heads everywhere", || async {
        let h = heads(&alice.handle, &rel).await;
        h == heads(&acme.handle, &rel).await && h == heads(&globex.handle, &rel).await
    })
    .await;
    // Globex reads what Acme wrote: the relationship is shared, not siloed.
    assert!(
        messages(&globex.handle, &rel)
            .await
            .iter()
            .any(|m| m == "acme 4")
    );
}

/// A company node restarted mid-conversation catches up on what it missed, and what it
/// wrote before stopping is still there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_catches_up() {
    let alice = TestNode::new(Kind::Person, "Alice").await;
    let acme = TestNode::new(Kind::Org, "Acme").await;
    acme.connect(&alice).await;
    consent_to(&alice, &[&acme]).await;
    let rel = open(&alice, &[&acme]).await;
    send(&acme.handle, &rel, "before the restart", Some("support")).await;

    // Acme stops; Alice writes while it is down; Acme starts again on new ports.
    let acme_id = acme.id();
    let stopped = acme.stop().await;
    let d = send(&alice.handle, &rel, "while you were away", None).await;
    assert!(d.any_offline(), "{d}");
    let acme = stopped.start().await;
    assert_eq!(acme.id(), acme_id);
    // The restarted node redials Alice by itself (it kept her address) and catches up.
    eventually(30, "Acme catching up after its restart", || async {
        let m = messages(&acme.handle, &rel).await;
        m.contains(&"while you were away".to_string())
            && m.contains(&"before the restart".to_string())
    })
    .await;
}

/// Both sides write while disconnected; everything syncs when they reconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_edits_sync_on_reconnect() {
    let alice = TestNode::new(Kind::Person, "Alice").await;
    let acme = TestNode::new(Kind::Org, "Acme").await;
    acme.connect(&alice).await;
    consent_to(&alice, &[&acme]).await;
    let rel = open(&alice, &[&acme]).await;

    // Alice's node goes down; Acme writes offline.
    let stopped_alice = alice.stop().await;
    for i in 0..3 {
        let d = send(&acme.handle, &rel, &format!("offline {i}"), Some("support")).await;
        assert!(d.any_offline(), "{d}");
    }
    // Alice comes back on new ports and writes before anyone reconnects.
    let alice = stopped_alice.start().await;
    send(&alice.handle, &rel, "back online", None).await;
    // Acme redials Alice by identity (Kademlia knows her from the store) on its next
    // round, or Alice dials Acme: either way they converge.
    alice.connect(&acme).await;
    eventually(20, "both holding all 4 messages", || async {
        messages(&alice.handle, &rel).await.len() == 4
            && messages(&acme.handle, &rel).await.len() == 4
    })
    .await;
    eventually(10, "the same heads", || async {
        heads(&alice.handle, &rel).await == heads(&acme.handle, &rel).await
    })
    .await;
}

/// A revocation made while the company is away reaches it on reconnect; the company's
/// writes made meanwhile are refused; it erases and signs; it never receives what the
/// customer wrote after revoking.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_company_revoked_while_away_is_refused_and_receives_nothing_new() {
    let alice = TestNode::new(Kind::Person, "Alice").await;
    let acme = TestNode::new(Kind::Org, "Acme").await;
    acme.connect(&alice).await;
    let g = consent_to(&alice, &[&acme]).await.remove(0);
    let rel = open(&alice, &[&acme]).await;
    send(&alice.handle, &rel, "hello", None).await;
    eventually(10, "Acme holding the first message", || async {
        messages(&acme.handle, &rel).await.len() == 1
    })
    .await;

    // Acme goes away; Alice revokes and writes.
    let acme_stopped = acme.stop().await;
    let g2 = g.clone();
    alice
        .handle
        .write(WAIT, move |e| e.revoke(&g2, None, now()))
        .await
        .unwrap();
    send(
        &alice.handle,
        &rel,
        "secret written after the revocation",
        None,
    )
    .await;

    // Acme comes back without Alice (she is stopped now), writes offline.
    let alice_stopped = alice.stop().await;
    let acme = acme_stopped.start().await;
    let mut events = acme.handle.subscribe().await;
    send(
        &acme.handle,
        &rel,
        "a reply written before hearing of it",
        Some("support"),
    )
    .await;

    // Alice is back; they reconnect.
    let alice = alice_stopped.start().await;
    acme.connect(&alice).await;
    eventually(
        20,
        "Acme erasing and its receipt reaching Alice",
        || async {
            let g = g.clone();
            acme.handle
                .read(|e| e.relationships().expect("the store answers").len())
                .await
                == 0
                && alice
                    .handle
                    .read(move |e| {
                        e.grants(now())
                            .iter()
                            .any(|r| r.grant.to_hex() == g && r.erasure_acked_at.is_some())
                    })
                    .await
        },
    )
    .await;
    // Acme's late write was refused by Alice's node and is not in her copy.
    assert!(
        !messages(&alice.handle, &rel)
            .await
            .contains(&"a reply written before hearing of it".to_string())
    );
    // Acme never received the text written after the revocation.
    while let Ok(ev) = events.try_recv() {
        if let rapport_node::Event::Message(m) = ev {
            assert_ne!(m.text, "secret written after the revocation");
        }
    }
    assert_eq!(status(&acme.handle, &g).await, "revoked");
}
