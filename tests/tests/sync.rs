//! Real nodes on loopback syncing consent and relationship documents.

use std::time::Duration;

use rapport_node::{GrantArgs, NodeHandle, now};
use rapport_protocol::{IdentityKey, Kind};
use rapport_tests::{TestNode, eventually};

const WAIT: Duration = Duration::from_secs(10);

async fn grant(customer: &NodeHandle, grantee: IdentityKey, scopes: &[&str]) -> String {
    let args = GrantArgs {
        grantee,
        scopes: scopes.iter().map(|s| s.parse().unwrap()).collect(),
        purpose: "support for order 1234".into(),
        expires: Some(now() + 86_400),
        terms: Some("SD-BASE".into()),
        legal_basis: None,
        notice_sha256: None,
    };
    let (out, _) = customer
        .write(WAIT, move |e| e.grant(args, now()))
        .await
        .unwrap();
    out.entry.unwrap().to_hex()
}

async fn status(h: &NodeHandle, grant: &str) -> String {
    let g = grant.to_owned();
    h.read(move |e| {
        e.grants(now())
            .into_iter()
            .find(|r| r.grant.to_hex() == g)
            .map(|r| r.status)
            .unwrap_or_default()
    })
    .await
}

async fn messages(h: &NodeHandle, rel: &str) -> Vec<String> {
    let rel = rel.to_owned();
    h.read(move |e| {
        e.relationship(&rel, now())
            .map(|d| d.messages.into_iter().map(|m| m.text).collect())
            .unwrap_or_default()
    })
    .await
}

async fn send(h: &NodeHandle, rel: &str, text: &str, purpose: Option<&str>) -> String {
    let (rel, text, purpose) = (rel.to_owned(), text.to_owned(), purpose.map(str::to_owned));
    let (out, delivery) = h
        .write(WAIT, move |e| {
            e.send_message(&rel, text, purpose, None, now())
        })
        .await
        .unwrap();
    let _ = out;
    delivery.unwrap_or_default()
}

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
    assert!(delivery.unwrap().contains("delivered"));
    let rel = opened.rel.unwrap().to_hex();
    eventually(10, "Acme holds the relationship", || async {
        acme.handle.read(|e| e.relationships().len()).await == 1
    })
    .await;

    let d = send(&alice.handle, &rel, "My order has not arrived", None).await;
    assert!(d.contains("delivered"), "{d}");
    let d = send(
        &acme.handle,
        &rel,
        "Sorry! It ships today.",
        Some("support"),
    )
    .await;
    assert!(d.contains("delivered"), "{d}");
    eventually(10, "both hold both messages", || async {
        messages(&alice.handle, &rel).await.len() == 2
            && messages(&acme.handle, &rel).await.len() == 2
    })
    .await;

    // Unsolicited marketing: refused by Alice's node, rolled back at Acme, kept as evidence.
    let d = send(&acme.handle, &rel, "50% off everything!", Some("marketing")).await;
    assert!(
        d.contains("refused") && d.contains("contact:marketing"),
        "{d}"
    );
    assert_eq!(messages(&alice.handle, &rel).await.len(), 2);
    eventually(10, "Acme rolls its refused message back", || async {
        messages(&acme.handle, &rel).await.len() == 2
    })
    .await;
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
        acme.handle.read(|e| e.relationships().len()).await == 0
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

    // Alice writes after the revocation: nothing reaches Acme.
    let d = send(&alice.handle, &rel, "Written after the revocation", None).await;
    assert!(!d.contains("delivered"), "{d}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(acme.handle.read(|e| e.relationships().len()).await, 0);
    // Acme keeps the consent ledger as its proof.
    assert_eq!(status(&acme.handle, &gid).await, "revoked");
}
