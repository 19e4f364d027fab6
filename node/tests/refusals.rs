//! A peer's answer is a hint, never a command on our own history (DESIGN rule 8).
//!
//! Two engines on real redb stores talk through their sync entry points
//! (`start_round`, `handle_request`, `handle_response`), exactly as the network loop
//! carries them; where a test needs a hostile peer, it answers with the bytes a hostile
//! node could send: "refused" for the customer's revocation, for the owner's removal of a
//! member and its new epoch, or an answer lost to a crash before it was stored.

use std::collections::HashSet;

mod common;

use common::{
    Side, consent, conversation, grant_args, granted, hashes, rel_doc, sorted_texts, sync,
};
use rapport_protocol::automerge::ChangeHash;
use rapport_protocol::wire::{DocRef, RefusalKind, SyncResponse};
use rapport_protocol::{ConsentHeader, IdentityKey, Kind, SignedChange};

use common::T0;

/// The answer of a hostile peer: it "refuses" every change the request carried and claims
/// to hold nothing.
fn refuse_all(sent: &[ChangeHash], kind: RefusalKind) -> SyncResponse {
    SyncResponse::Sync {
        heads: vec![],
        changes: vec![],
        more: false,
        refused: sent
            .iter()
            .map(|h| (*h, kind, "I refuse this".to_string()))
            .collect(),
    }
}

fn grant_status(side: &Side, grant: &str, now: u64) -> String {
    side.engine
        .grants(now)
        .into_iter()
        .find(|g| g.grant.to_hex() == grant)
        .map(|g| g.status)
        .expect("the grant is listed")
}

#[test]
fn a_grantee_refusing_the_revocation_does_not_undo_it() {
    let now = T0 + 10;
    let mut alice = Side::new(Kind::Person, "Alice");
    let mut acme = Side::new(Kind::Org, "Acme");
    let grant = granted(&mut alice, &mut acme, now);
    let (rel, _) = alice
        .engine
        .open_relationship(acme.me(), Some("Acme".into()), None, now)
        .unwrap();
    let rel = rel.doc.to_hex();
    assert_eq!(grant_status(&alice, &grant, now), "active");

    alice.engine.revoke(&grant, None, now + 1).unwrap();
    // Alice's node tells Acme; Acme answers that it refuses the revocation.
    let doc = consent(&alice, &acme);
    let req = alice
        .engine
        .start_round(&acme.me(), &doc, now + 1)
        .unwrap()
        .expect("a round to carry the revocation");
    let sent = hashes(&req.changes);
    assert!(!sent.is_empty());
    for kind in [RefusalKind::Forbidden, RefusalKind::Invalid] {
        alice
            .engine
            .handle_response(&acme.me(), &doc, &sent, refuse_all(&sent, kind), now + 1)
            .unwrap();
    }

    for when in ["after the refusal", "after a restart"] {
        assert_eq!(grant_status(&alice, &grant, now + 2), "revoked", "{when}");
        assert!(
            !alice
                .engine
                .shared_with(&acme.me(), now + 2)
                .iter()
                .any(|d| d.doc_id().to_hex() == rel),
            "{when}: Acme stays cut off from the relationship"
        );
        alice.reopen();
    }
}

#[test]
fn a_member_refusing_the_owners_removal_and_epoch_changes_nothing() {
    let now = T0 + 10;
    let mut alice = Side::new(Kind::Person, "Alice");
    let mut acme = Side::new(Kind::Org, "Acme");
    let mut globex = Side::new(Kind::Org, "Globex");
    granted(&mut alice, &mut acme, now);
    granted(&mut alice, &mut globex, now);
    let (rel, _) = alice
        .engine
        .open_relationship(acme.me(), Some("Acme".into()), None, now)
        .unwrap();
    let rel = rel.doc.to_hex();
    alice
        .engine
        .add_member(&rel, globex.me(), Some("Globex".into()), now)
        .unwrap();
    let doc = rel_doc(&alice, &rel, now);
    sync(&mut alice, &mut globex, &doc, now);
    let epoch_before = alice.engine.relationship(&rel, now).unwrap().epoch;

    alice
        .engine
        .remove_member(&rel, acme.me(), now + 1)
        .unwrap();
    let after = alice.engine.relationship(&rel, now + 1).unwrap();
    assert!(after.epoch > epoch_before, "the removal starts a new epoch");
    let heads = alice.engine.heads(&rel).unwrap();

    // Globex, hostile, refuses the removal and the new epoch.
    let req = alice
        .engine
        .start_round(&globex.me(), &doc, now + 1)
        .unwrap()
        .expect("a round to Globex");
    let sent = hashes(&req.changes);
    assert!(!sent.is_empty());
    alice
        .engine
        .handle_response(
            &globex.me(),
            &doc,
            &sent,
            refuse_all(&sent, RefusalKind::Forbidden),
            now + 1,
        )
        .unwrap();

    for when in ["after the refusal", "after a restart"] {
        let d = alice.engine.relationship(&rel, now + 2).unwrap();
        assert_eq!(alice.engine.heads(&rel).unwrap(), heads, "{when}");
        assert_eq!(d.epoch, after.epoch, "{when}");
        assert!(
            !d.epoch_recipients.contains(&acme.me().to_string()),
            "{when}: the newest epoch is not sealed to Acme"
        );
        assert!(
            d.summary
                .members
                .iter()
                .any(|m| m.identity == acme.me() && m.removed),
            "{when}: Acme is still removed"
        );
        alice.reopen();
    }
    // And Globex is not sent the changes it refused again.
    let again = alice
        .engine
        .start_round(&globex.me(), &doc, now + 3)
        .unwrap();
    let resent: HashSet<ChangeHash> = again
        .map(|r| hashes(&r.changes).into_iter().collect())
        .unwrap_or_default();
    assert!(sent.iter().all(|h| !resent.contains(h)));
}

#[test]
fn an_answer_lost_in_a_crash_loses_nothing_acknowledged() {
    let now = T0 + 10;
    let (mut alice, mut acme, rel, doc) = conversation(now);

    // Acme writes; Alice asks; Acme answers with its message, but Alice crashes before
    // storing the answer.
    acme.engine
        .send_message(&rel, "first".into(), None, None, now)
        .unwrap();
    alice
        .engine
        .send_message(&rel, "hello".into(), None, None, now)
        .unwrap();
    let req = alice
        .engine
        .start_round(&acme.me(), &doc, now)
        .unwrap()
        .unwrap();
    let (lost, _, _) = acme.engine.handle_request(&alice.me(), req, now);
    assert!(matches!(lost, SyncResponse::Sync { ref changes, .. } if !changes.is_empty()));
    alice.reopen();

    // Acme writes again (acknowledged: the call returned) and pushes it.
    acme.engine
        .send_message(&rel, "second".into(), None, None, now + 1)
        .unwrap();
    let mine = acme.engine.heads(&rel).unwrap();
    sync(&mut acme, &mut alice, &doc, now + 1);
    sync(&mut alice, &mut acme, &doc, now + 1);

    let texts = |s: &Side| sorted_texts(s, &rel, now + 2);
    acme.reopen();
    assert_eq!(
        texts(&acme),
        ["first", "hello", "second"],
        "Acme keeps its own"
    );
    assert_eq!(
        texts(&alice),
        ["first", "hello", "second"],
        "and Alice has them"
    );
    assert_eq!(
        alice.engine.heads(&rel).unwrap(),
        acme.engine.heads(&rel).unwrap()
    );
    assert!(
        mine.iter()
            .all(|h| acme.engine.heads(&rel).unwrap().contains(h)),
        "Acme's acknowledged head is still a head"
    );
}

/// What a node that writes its own relationship would push: every change of it.
fn push_of(owner: &Side, rel: &str) -> rapport_protocol::wire::SyncRequest {
    let id = owner.engine.relationship(rel, T0).unwrap().summary.id;
    let doc = owner.engine.store().load_relationship(&id).unwrap();
    rapport_protocol::wire::SyncRequest {
        doc: DocRef::Relationship(*doc.header()),
        heads: vec![],
        changes: doc.changes().iter().map(SignedChange::encode).collect(),
    }
}

#[test]
fn a_relationship_from_someone_never_opted_in_to_is_refused_and_kept_as_evidence() {
    let now = T0 + 10;
    let mut alice = Side::new(Kind::Person, "Alice");
    let mut mallory = Side::new(Kind::Org, "Mallory Ltd");
    // Mallory opens its own relationship naming Alice and writes to her.
    let (rel, _) = mallory
        .engine
        .open_relationship(alice.me(), Some("Alice".into()), None, now)
        .unwrap();
    let rel = rel.doc.to_hex();
    mallory
        .engine
        .send_message(&rel, "Buy our new plan!".into(), None, None, now)
        .unwrap();
    let (resp, _, _) = alice
        .engine
        .handle_request(&mallory.me(), push_of(&mallory, &rel), now);
    assert!(
        matches!(&resp, SyncResponse::Refused { detail, .. } if detail.contains("unsolicited")),
        "{resp:?}"
    );
    assert!(
        alice.engine.relationships().unwrap().is_empty(),
        "nothing appears"
    );
    let evidence = alice.engine.refusals(10).unwrap();
    assert_eq!(evidence.len(), 1);
    assert_eq!(evidence[0].kind, Some(RefusalKind::Forbidden));
    assert!(evidence[0].reason.contains("unsolicited"));
    assert!(
        evidence[0].signed_change.is_some(),
        "the change is the evidence"
    );

    // Once Alice opts in to contact from Mallory (and Mallory accepts), it is taken.
    let (_, _) = alice
        .engine
        .grant(
            grant_args(mallory.me(), &["contact:support"], "support"),
            now,
        )
        .unwrap();
    let doc = consent(&alice, &mallory);
    sync(&mut alice, &mut mallory, &doc, now);
    let (resp, _, _) = alice
        .engine
        .handle_request(&mallory.me(), push_of(&mallory, &rel), now);
    assert!(
        matches!(&resp, SyncResponse::Refused { .. }),
        "not before Mallory accepts: {resp:?}"
    );
    mallory.engine.accept(None, None, now).unwrap();
    sync(&mut mallory, &mut alice, &doc, now);
    let (resp, _, _) = alice
        .engine
        .handle_request(&mallory.me(), push_of(&mallory, &rel), now);
    assert!(matches!(resp, SyncResponse::Sync { .. }), "{resp:?}");
    assert_eq!(alice.engine.relationships().unwrap().len(), 1);
}

#[test]
fn a_person_joins_another_persons_relationship_by_accepting_the_invitation() {
    let now = T0 + 10;
    let mut alice = Side::new(Kind::Person, "Alice");
    let mut bob = Side::new(Kind::Person, "Bob");
    let (rel, _) = bob
        .engine
        .open_relationship(alice.me(), Some("Alice".into()), None, now)
        .unwrap();
    let rel = rel.doc.to_hex();
    // Bob's invitation: he grants Alice conversation:read.
    bob.engine
        .grant(
            grant_args(alice.me(), &["conversation:read"], "our trip"),
            now,
        )
        .unwrap();
    let doc = consent(&bob, &alice);
    sync(&mut bob, &mut alice, &doc, now);
    let (resp, _, _) = alice
        .engine
        .handle_request(&bob.me(), push_of(&bob, &rel), now);
    assert!(matches!(resp, SyncResponse::Refused { .. }), "{resp:?}");
    assert!(alice.engine.relationships().unwrap().is_empty());
    // Alice accepts the invitation: now the relationship comes.
    alice.engine.accept(None, None, now).unwrap();
    sync(&mut alice, &mut bob, &doc, now);
    let (resp, _, _) = alice
        .engine
        .handle_request(&bob.me(), push_of(&bob, &rel), now);
    assert!(matches!(resp, SyncResponse::Sync { .. }), "{resp:?}");
    assert_eq!(alice.engine.relationships().unwrap().len(), 1);
}

/// A stranger's grants, as its own node would write them.
fn stranger_grants(
    stranger: &rapport_protocol::SecretKey,
    to: &IdentityKey,
    n: usize,
) -> rapport_protocol::wire::SyncRequest {
    use rapport_protocol::{ConsentDoc, EntryBody, LegalBasis, MAX_PURPOSE, Terms};
    let header = ConsentHeader {
        customer: stranger.identity(),
        grantee: *to,
    };
    let mut doc = ConsentDoc::new(header).unwrap();
    let changes = (0..n)
        .map(|i| {
            let purpose = format!("{i:04}{}", "x".repeat(MAX_PURPOSE - 4));
            doc.append(
                stranger,
                [7; 16],
                T0 + i as u64,
                EntryBody::Grant {
                    scopes: vec!["conversation:read".parse().unwrap()],
                    purpose,
                    legal_basis: LegalBasis::Consent,
                    notice_sha256: "00".repeat(32),
                    terms: Terms::by_id("SD-BASE").unwrap().reference(),
                    expires: None,
                },
            )
            .unwrap()
            .1
            .encode()
        })
        .collect();
    rapport_protocol::wire::SyncRequest {
        doc: DocRef::Consent(header),
        heads: vec![],
        changes,
    }
}

#[test]
fn strangers_cannot_fill_the_store() {
    use rapport_node::MAX_UNANSWERED_CHANGES;
    use rapport_protocol::SecretKey;
    // The default bound is 1,000 documents; a smaller one keeps the test quick.
    const MAX_UNANSWERED_DOCS: usize = 40;
    let now = T0 + 10;
    let mut acme = Side::new(Kind::Org, "Acme");
    acme.engine.set_max_unanswered_docs(MAX_UNANSWERED_DOCS);
    // One stranger, 300 grants of the largest purpose, in one request and one at a time.
    let s = SecretKey::from_seed([42; 32]);
    let req = stranger_grants(&s, &acme.me(), 300);
    let id = req.doc.doc_id();
    let (resp, _, _) = acme.engine.handle_request(&s.identity(), req.clone(), now);
    assert!(matches!(resp, SyncResponse::Sync { .. }), "{resp:?}");
    for c in req.changes {
        let one = rapport_protocol::wire::SyncRequest {
            doc: req.doc,
            heads: vec![],
            changes: vec![c],
        };
        acme.engine.handle_request(&s.identity(), one, now);
    }
    assert_eq!(acme.engine.change_count(&id), Some(MAX_UNANSWERED_CHANGES));
    // Many fresh identities, one grant each.
    for i in 0..(MAX_UNANSWERED_DOCS + 50) {
        let mut seed = [0u8; 32];
        seed[..8].copy_from_slice(&(i as u64 + 1).to_be_bytes());
        let k = SecretKey::from_seed(seed);
        let req = stranger_grants(&k, &acme.me(), 1);
        acme.engine.handle_request(&k.identity(), req, now);
    }
    assert!(
        acme.engine.doc_count() <= MAX_UNANSWERED_DOCS,
        "{} documents from strangers",
        acme.engine.doc_count()
    );
    acme.reopen();
    assert!(acme.engine.doc_count() <= MAX_UNANSWERED_DOCS);
    // A further stranger is refused, with a reason it can act on.
    let k = SecretKey::from_seed([43; 32]);
    acme.engine.set_max_unanswered_docs(MAX_UNANSWERED_DOCS);
    let req = stranger_grants(&k, &acme.me(), 1);
    let (resp, _, _) = acme.engine.handle_request(&k.identity(), req, now);
    assert!(
        matches!(&resp, SyncResponse::Refused { detail, .. } if detail.contains("not answered")),
        "{resp:?}"
    );
}

#[test]
fn a_change_that_comes_before_its_dependency_waits_for_it() {
    let now = T0 + 10;
    let (mut alice, mut acme, rel, doc) = conversation(now);
    for text in ["one", "two"] {
        acme.engine
            .send_message(&rel, text.into(), None, None, now)
            .unwrap();
    }
    // Acme's two changes arrive out of order, one request each (as mail can).
    let all = last_changes(&acme, &doc, 2);
    let (first, second) = (all[0].clone(), all[1].clone());
    let ask = |changes: Vec<Vec<u8>>| rapport_protocol::wire::SyncRequest {
        doc,
        heads: vec![],
        changes,
    };
    let (resp, _, _) = alice
        .engine
        .handle_request(&acme.me(), ask(vec![second]), now);
    let SyncResponse::Sync { refused, .. } = resp else {
        panic!("{resp:?}");
    };
    assert_eq!(refused[0].1, RefusalKind::MissingDependencies);
    assert!(
        alice.engine.refusals(10).unwrap().is_empty(),
        "not a strike"
    );
    alice
        .engine
        .handle_request(&acme.me(), ask(vec![first]), now);
    assert_eq!(
        sorted_texts(&alice, &rel, now),
        ["one", "two"],
        "the waiting change went in with its dependency"
    );
}

#[test]
fn changes_that_wait_keep_waiting_through_requests_that_do_not_bring_their_dependencies() {
    let now = T0 + 10;
    let (mut alice, mut acme, rel, doc) = conversation(now);
    for text in ["one", "two", "three"] {
        acme.engine
            .send_message(&rel, text.into(), None, None, now)
            .unwrap();
    }
    // Newest first, one request each: each change comes before the one it depends on, so
    // the second request holds a change that waited and a new one, both still lacking.
    let all = last_changes(&acme, &doc, 3);
    let ask = |changes: Vec<Vec<u8>>| rapport_protocol::wire::SyncRequest {
        doc,
        heads: vec![],
        changes,
    };
    for (i, change) in all.iter().rev().enumerate() {
        let (resp, _, _) = alice
            .engine
            .handle_request(&acme.me(), ask(vec![change.clone()]), now);
        let SyncResponse::Sync { refused, .. } = resp else {
            panic!("{resp:?}");
        };
        if i < 2 {
            assert_eq!(refused.len(), i + 1, "{refused:?}");
            assert!(
                refused
                    .iter()
                    .all(|r| r.1 == RefusalKind::MissingDependencies),
                "{refused:?}"
            );
        } else {
            assert!(refused.is_empty(), "{refused:?}");
        }
    }
    assert_eq!(
        sorted_texts(&alice, &rel, now),
        ["one", "three", "two"],
        "both waiting changes went in once the first arrived"
    );
}

/// The texts of the messages `side` holds in relationship `rel`, sorted.
/// The last `n` changes `side` holds of `doc`, encoded, in the order written.
fn last_changes(side: &Side, doc: &DocRef, n: usize) -> Vec<Vec<u8>> {
    let all = side
        .engine
        .store()
        .load_relationship(&doc.doc_id())
        .unwrap();
    let all = all.changes();
    all[all.len() - n..]
        .iter()
        .map(SignedChange::encode)
        .collect()
}
