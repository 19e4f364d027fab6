//! A company's node holds a document per customer and per conversation; it must start
//! without loading them (issue 10: "documents load when used; indexes answer the inbox and
//! lists"). These tests check, from the outside, that what the index answers is exactly
//! what the loaded documents say, after every kind of write (local, synced, erased), and
//! that memory holds a bounded number of documents.

mod common;

use common::{Side, T0, granted, sync};
use rapport_node::{MessageView, Store};
use rapport_protocol::replica::Holder;
use rapport_protocol::wire::DocRef;
use rapport_protocol::{IdentityKey, Kind};

/// A customer who granted `company` read, write and contact:support, opened a relationship
/// with it and wrote a message that `company` answered, both synced.
fn customer(name: &str, company: &mut Side, now: u64) -> (Side, String, DocRef) {
    let (mut c, rel, doc) = opened(name, company, now);
    c.engine
        .send_message(&rel, format!("hello from {name}"), None, None, now + 1)
        .unwrap();
    sync(&mut c, company, &doc, now + 1);
    company
        .engine
        .send_message(&rel, format!("hello {name}"), None, None, now + 2)
        .unwrap();
    sync(company, &mut c, &doc, now + 2);
    (c, rel, doc)
}

/// A customer who granted `company` read, write and contact:support and opened a
/// relationship with it, not synced yet.
fn opened(name: &str, company: &mut Side, now: u64) -> (Side, String, DocRef) {
    let mut c = Side::new(Kind::Person, name);
    granted(&mut c, company, now);
    let (out, _) = c
        .engine
        .open_relationship(company.me(), Some("Acme".into()), None, now)
        .unwrap();
    let doc = c
        .engine
        .shared_with(&company.me(), now)
        .into_iter()
        .find(|d| d.doc_id() == out.doc)
        .expect("the relationship is shared with the company");
    (c, out.doc.to_hex(), doc)
}

/// Checks that the lists the index answers match the documents themselves (loading
/// them), and returns the inbox.
fn index_matches_documents(side: &Side, now: u64) -> Vec<MessageView> {
    let listed = side.engine.relationships().unwrap();
    let inbox = side.engine.inbox(1000).unwrap();
    let mut expected_inbox: Vec<MessageView> = Vec::new();
    for s in &listed {
        let detail = side.engine.relationship(&s.id.to_hex(), now).unwrap();
        assert_eq!(*s, detail.summary, "the listed summary is the document's");
        expected_inbox.extend(detail.messages.into_iter().filter(|m| !m.mine));
    }
    expected_inbox.sort_by_key(|m| std::cmp::Reverse((m.at, m.rel, m.id)));
    assert_eq!(
        inbox, expected_inbox,
        "the inbox is every message from others"
    );
    inbox
}

#[test]
fn a_node_starts_without_loading_its_documents_and_answers_from_the_index() {
    let now = T0 + 10;
    let mut acme = Side::new(Kind::Org, "Acme");
    let customers: Vec<(Side, String, DocRef)> = (0..5)
        .map(|i| customer(&format!("customer {i}"), &mut acme, now + i * 10))
        .collect();

    acme.reopen();
    assert_eq!(
        acme.engine.doc_count(),
        10,
        "five consents, five relationships"
    );
    assert_eq!(acme.engine.loaded_docs(), 0, "nothing is loaded at start");

    // Lists, the inbox and whom to redial come from the index, without loading.
    let listed = acme.engine.relationships().unwrap();
    assert_eq!(listed.len(), 5);
    assert!(listed.windows(2).all(|w| w[0].last_at >= w[1].last_at));
    let inbox = acme.engine.inbox(3).unwrap();
    let texts: Vec<&str> = inbox.iter().map(|m| m.text.as_str()).collect();
    assert_eq!(
        texts,
        [
            "hello from customer 4",
            "hello from customer 3",
            "hello from customer 2"
        ]
    );
    let mut who: Vec<IdentityKey> = customers.iter().map(|(c, _, _)| c.me()).collect();
    who.sort();
    assert_eq!(acme.engine.counterparts(), who);
    assert_eq!(acme.engine.loaded_docs(), 0, "still nothing loaded");

    // What is shared with one customer loads at most the consent document with it.
    let shared = acme.engine.shared_with(&customers[2].0.me(), now + 100);
    assert_eq!(shared.len(), 2, "its consent document and its relationship");
    assert!(shared.contains(&customers[2].2));
    assert!(acme.engine.loaded_docs() <= 1);

    // And what the index says is what the documents say.
    assert_eq!(index_matches_documents(&acme, now + 100).len(), 5);
}

#[test]
fn every_write_keeps_the_index_true_and_an_erasure_leaves_no_trace_in_it() {
    let now = T0 + 10;
    let mut acme = Side::new(Kind::Org, "Acme");
    let (mut alice, rel_a, doc_a) = customer("Alice", &mut acme, now);
    let (mut bob, rel_b, doc_b) = customer("Bob", &mut acme, now + 5);

    // More messages both ways, synced; the index follows each write and each sync.
    alice
        .engine
        .send_message(&rel_a, "a second question".into(), None, None, now + 20)
        .unwrap();
    sync(&mut alice, &mut acme, &doc_a, now + 20);
    acme.engine
        .send_message(&rel_b, "news for Bob".into(), None, None, now + 21)
        .unwrap();
    sync(&mut acme, &mut bob, &doc_b, now + 21);
    for side in [&acme, &alice, &bob] {
        index_matches_documents(side, now + 30);
    }
    assert_eq!(acme.engine.inbox(10).unwrap().len(), 3);

    // Alice revokes; Acme erases what it held of hers and acknowledges.
    let grant = alice.engine.grants(now + 30)[0].grant.to_hex();
    alice
        .engine
        .revoke(&grant, Some("done".into()), now + 30)
        .unwrap();
    let consent = DocRef::Consent(rapport_protocol::ConsentHeader {
        customer: alice.me(),
        grantee: acme.me(),
    });
    sync(&mut alice, &mut acme, &consent, now + 31);
    for when in ["after the erasure", "after a restart"] {
        let listed = acme.engine.relationships().unwrap();
        assert_eq!(listed.len(), 1, "{when}: only Bob's relationship is listed");
        assert_eq!(listed[0].id, doc_b.doc_id());
        let inbox = index_matches_documents(&acme, now + 40);
        assert!(
            inbox.iter().all(|m| m.by != alice.me()),
            "{when}: none of Alice's messages stays in the inbox"
        );
        assert!(!acme.engine.counterparts().is_empty());
        assert!(
            acme.engine
                .shared_with(&alice.me(), now + 40)
                .iter()
                .all(|d| matches!(d, DocRef::Consent(_))),
            "{when}: only the consent document is shared with Alice"
        );
        // Nor is what Alice last held of the erased relationship kept, in memory or stored
        // (Acme recorded it as they synced, and stores such hints later).
        let id = doc_a.doc_id();
        let held = Holder::peer_heads(&*acme.engine, &id, &alice.me()).unwrap();
        assert_eq!(held, None, "{when}: no heads of the erased relationship");
        let stored = acme.engine.store().peer_heads(&id, &alice.me()).unwrap();
        assert_eq!(stored, None, "{when}: none stored either");
        acme.reopen();
    }
}

#[test]
fn memory_holds_a_bounded_number_of_documents_and_dropped_ones_load_again() {
    let now = T0 + 10;
    let mut acme = Side::new(Kind::Org, "Acme");
    let customers: Vec<(Side, String, DocRef)> = (0..6)
        .map(|i| customer(&format!("customer {i}"), &mut acme, now + i * 10))
        .collect();
    acme.reopen();
    acme.engine.set_max_loaded_docs(4);
    for (_, rel, _) in &customers {
        acme.engine.relationship(rel, now + 100).unwrap();
    }
    assert_eq!(acme.engine.loaded_docs(), 6, "each relationship read");
    acme.engine.trim();
    assert_eq!(acme.engine.loaded_docs(), 2, "down to half the cap");
    // A dropped document loads again when used, and a write to it is kept.
    let (_, rel, _) = &customers[0];
    acme.engine
        .send_message(rel, "still here".into(), None, None, now + 200)
        .unwrap();
    acme.reopen();
    let d = acme.engine.relationship(rel, now + 200).unwrap();
    assert_eq!(d.messages.last().unwrap().text, "still here");
    index_matches_documents(&acme, now + 200);
}

/// A peer that holds nothing of a relationship is sent it as the store keeps it: the
/// serving node answers without loading the relationship (only the consent its rule
/// reads), and the peer ends with every change and the same heads.
#[test]
fn a_peer_that_holds_nothing_is_served_from_the_store_without_loading_the_document() {
    let now = T0 + 10;
    let mut acme = Side::new(Kind::Org, "Acme");
    let (mut alice, rel, doc) = opened("Alice", &mut acme, now);
    let id = doc.doc_id();
    // Acme is away while Alice writes.
    for i in 0..50 {
        alice
            .engine
            .send_message(&rel, format!("message {i}"), None, None, now + 1)
            .unwrap();
    }
    let n = alice.engine.change_count(&id).unwrap();
    alice.reopen();
    assert_eq!(alice.engine.loaded_docs(), 0);

    let req = alice
        .engine
        .start_round(&acme.me(), &doc, now + 2)
        .unwrap()
        .expect("Alice has a relationship to send");
    assert_eq!(req.changes.len(), n, "every change, in one round");
    assert_eq!(
        alice.engine.loaded_docs(),
        1,
        "the consent document was read for the rule, the relationship was not"
    );
    let sent = common::hashes(&req.changes);
    let (resp, _, _) = acme.engine.handle_request(&alice.me(), req, now + 2);
    let (outcome, _) = alice
        .engine
        .handle_response(&acme.me(), &doc, &sent, resp, now + 2)
        .unwrap();
    assert!(outcome.refused.is_empty(), "{:?}", outcome.refused);
    assert!(!outcome.again, "everything went in one round");
    assert_eq!(
        alice.engine.loaded_docs(),
        1,
        "nor was it loaded to learn that Acme, holding all that was sent, lacks nothing"
    );
    let held = acme.engine.relationship(&rel, now + 2).unwrap();
    assert_eq!(held.messages.len(), 50);
    assert_eq!(acme.engine.change_count(&id), Some(n));
}

/// Whom the owner serves is read from the index when the relationship is not loaded: a
/// removed member still holding a grant, which never synced the relationship, is neither
/// sent it cold nor served it when it asks, after a restart as before.
#[test]
fn a_removed_member_is_not_served_a_relationship_the_owner_has_not_loaded() {
    let now = T0 + 10;
    let mut acme = Side::new(Kind::Org, "Acme");
    let (mut alice, rel, doc) = opened("Alice", &mut acme, now);
    alice
        .engine
        .remove_member(&rel, acme.me(), now + 1)
        .unwrap();
    alice.reopen();
    assert_eq!(alice.engine.loaded_docs(), 0);

    assert!(
        alice
            .engine
            .start_round(&acme.me(), &doc, now + 2)
            .unwrap()
            .is_none(),
        "a cold sync to a removed member"
    );
    let ask = rapport_protocol::wire::SyncRequest {
        doc,
        heads: Vec::new(),
        changes: Vec::new(),
    };
    let (resp, _, _) = alice.engine.handle_request(&acme.me(), ask, now + 2);
    assert!(
        matches!(
            resp,
            rapport_protocol::wire::SyncResponse::Refused {
                code: rapport_protocol::wire::RefusalCode::Forbidden,
                ..
            }
        ),
        "{resp:?}"
    );
    assert_eq!(acme.engine.change_count(&doc.doc_id()), None);
}

/// A node starts by joining its documents with their index rows in key order: rows of
/// documents it does not hold (before, between and after the others) are passed over, and
/// a document without a row is indexed from its changes; none takes another's row.
#[test]
fn a_start_joins_each_document_with_its_own_index_row() {
    let now = T0 + 10;
    let mut acme = Side::new(Kind::Org, "Acme");
    let customers: Vec<(Side, String, DocRef)> = (0..4)
        .map(|i| customer(&format!("customer {i}"), &mut acme, now + i * 10))
        .collect();
    let unindexed = customers[1].2.doc_id();
    acme.engine.0 = None;
    {
        let facts: redb::TableDefinition<&[u8; 32], &[u8]> =
            redb::TableDefinition::new("doc-facts-1");
        let db = redb::Database::open(acme.dir.path().join(Store::FILE_NAME)).unwrap();
        let tx = db.begin_write().unwrap();
        {
            let mut t = tx.open_table(facts).unwrap();
            for key in [[0u8; 32], [0x80; 32], [0xff; 32]] {
                t.insert(&key, br#"{"kind":"relationship","members":[]}"#.as_slice())
                    .unwrap();
            }
            t.remove(&unindexed.0).unwrap().unwrap();
        }
        tx.commit().unwrap();
    }
    acme.reopen();
    assert_eq!(
        acme.engine.doc_count(),
        8,
        "four consents, four relationships"
    );
    assert_eq!(
        acme.engine.loaded_docs(),
        1,
        "only the relationship without an index row was loaded, to index it"
    );
    let mut who: Vec<IdentityKey> = customers.iter().map(|(c, _, _)| c.me()).collect();
    who.sort();
    assert_eq!(acme.engine.counterparts(), who);
    for (c, _, rel) in &customers {
        let shared = acme.engine.shared_with(&c.me(), now + 100);
        assert_eq!(shared.len(), 2, "its consent document and its relationship");
        assert!(shared.contains(rel));
    }
}

/// The store keeps each change once, whatever comes again: a ledger file holding changes
/// the node has (imported twice), and a peer's round replayed with a change twice in it.
/// A second row of a change would be read back at every load; the store has no index of
/// hashes to catch it (schema 7), so the engine must pass it only what is new.
#[test]
fn changes_that_come_again_are_stored_once() {
    let now = T0 + 10;
    let mut acme = Side::new(Kind::Org, "Acme");
    let (mut c, _, rel) = customer("Carol", &mut acme, now);
    let consent = common::consent(&c, &acme);

    let file = c.engine.export_ledger(&acme.me()).unwrap();
    for _ in 0..2 {
        let (new, _) = acme.engine.import_ledger(file.as_bytes(), now + 3).unwrap();
        assert_eq!(new, 0, "the file holds nothing new");
    }
    c.engine
        .send_message(
            &rel.doc_id().to_hex(),
            "once more".into(),
            None,
            None,
            now + 4,
        )
        .unwrap();
    let mut req = c
        .engine
        .start_round(&acme.me(), &rel, now + 4)
        .unwrap()
        .expect("Carol has a message to send");
    req.changes.push(req.changes[0].clone());
    for _ in 0..2 {
        let (resp, _, _) = acme.engine.handle_request(&c.me(), req.clone(), now + 4);
        assert!(
            matches!(resp, rapport_protocol::wire::SyncResponse::Sync { .. }),
            "{resp:?}"
        );
    }

    let once = |side: &Side, doc: &DocRef| {
        let id = doc.doc_id();
        let stored = side.engine.store().changes(&id).unwrap();
        let distinct: std::collections::HashSet<_> = stored
            .iter()
            .map(rapport_protocol::SignedChange::hash)
            .collect();
        assert_eq!(stored.len(), distinct.len(), "no change is stored twice");
        stored.len()
    };
    let held = (
        acme.engine.change_count(&consent.doc_id()),
        acme.engine.change_count(&rel.doc_id()),
    );
    assert_eq!(
        (Some(once(&acme, &consent)), Some(once(&acme, &rel))),
        held,
        "the store holds what the engine does"
    );
    acme.reopen();
    assert_eq!(
        (
            acme.engine.change_count(&consent.doc_id()),
            acme.engine.change_count(&rel.doc_id())
        ),
        held,
        "a restart reads each change back once"
    );
}
