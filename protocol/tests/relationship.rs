//! Relationship documents and the consent rules that gate them, tested from the attacker's
//! side: forged, replayed, over-scoped, oversized and out-of-role changes.

use automerge::transaction::{CommitOptions, Transactable};
use automerge::{Automerge, ROOT};
use proptest::prelude::*;
use rapport_protocol::policy::{Denied, may_read, may_write};
use rapport_protocol::{
    ConsentDoc, ConsentHeader, EntryBody, EntryId, LegalBasis, MAX_MESSAGE_BYTES, RelBody,
    RelEntry, RelError, RelHeader, RelationshipDoc, Scope, SecretKey, SignedChange, Terms,
    actor_for,
};

const T0: u64 = 1_700_000_000;

fn key(n: u8) -> SecretKey {
    SecretKey::from_seed([n; 32])
}

fn header(owner: &SecretKey) -> RelHeader {
    RelHeader {
        owner: owner.identity(),
        nonce: [7; 16],
    }
}

/// A relationship owned by key 1 with key 2 (a company) as member.
fn opened() -> (SecretKey, SecretKey, RelationshipDoc) {
    let (alice, acme) = (key(1), key(2));
    let mut doc = RelationshipDoc::new(header(&alice));
    doc.append(
        &alice,
        [1; 16],
        T0,
        RelBody::Title {
            title: "Order 1234".into(),
        },
    )
    .unwrap();
    doc.append(
        &alice,
        [1; 16],
        T0,
        RelBody::Member {
            member: acme.identity(),
            name: "Acme".into(),
        },
    )
    .unwrap();
    (alice, acme, doc)
}

fn msg(text: &str, purpose: Option<&str>) -> RelBody {
    RelBody::Message {
        thread: None,
        text: text.into(),
        purpose: purpose.map(Into::into),
    }
}

/// Signs an arbitrary change (any ops) as `signer`, with the actor naming `claimed`.
fn raw_change(
    doc: &RelationshipDoc,
    signer: &SecretKey,
    claimed: &SecretKey,
    f: impl FnOnce(&mut automerge::transaction::Transaction<'_>),
) -> Result<SignedChange, rapport_protocol::ChangeError> {
    let mut am: Automerge = doc.automerge().clone();
    am.set_actor(actor_for(&claimed.identity(), [9; 16]));
    let mut tx = am.transaction();
    f(&mut tx);
    tx.commit_with(CommitOptions::default().with_time(1));
    let change = am.get_last_local_change().unwrap();
    SignedChange::sign(&doc.id(), change, signer)
}

fn entry_text(by: &SecretKey, body: RelBody) -> (String, String) {
    let e = RelEntry {
        v: 1,
        by: by.identity(),
        at: T0,
        body,
    };
    let text = serde_json::to_string(&e).unwrap();
    (EntryId::of(&text).to_hex(), text)
}

#[test]
fn members_sync_and_converge() {
    let (alice, acme, mut a) = opened();
    let mut b = RelationshipDoc::new(*a.header());
    let r = b.apply(a.changes().to_vec());
    assert!(r.rejected.is_empty(), "{:?}", r.rejected);
    a.append(&alice, [1; 16], T0 + 1, msg("my order is late", None))
        .unwrap();
    b.append(&acme, [2; 16], T0 + 2, msg("we are on it", Some("support")))
        .unwrap();
    let to_b: Vec<SignedChange> = a
        .changes_missing_from(&b.heads())
        .into_iter()
        .cloned()
        .collect();
    let to_a: Vec<SignedChange> = b
        .changes_missing_from(&a.heads())
        .into_iter()
        .cloned()
        .collect();
    assert!(b.apply(to_b).rejected.is_empty());
    assert!(a.apply(to_a).rejected.is_empty());
    let mut ha = a.heads();
    let mut hb = b.heads();
    ha.sort();
    hb.sort();
    assert_eq!(ha, hb);
    assert_eq!(a.messages().len(), 2);
    assert_eq!(a.title(), Some("Order 1234"));
    assert!(a.is_member(&acme.identity()));
}

#[test]
fn a_non_member_cannot_write() {
    let (_, _, mut doc) = opened();
    let mallory = key(3);
    let mut other = RelationshipDoc::new(*doc.header());
    other.apply(doc.changes().to_vec());
    // Mallory cannot even write locally ...
    assert!(matches!(
        other.append(&mallory, [3; 16], T0, msg("hi", Some("support"))),
        Err(RelError::Refused(_))
    ));
    // ... and a change she signs herself is refused by every replica.
    let (k, t) = entry_text(&mallory, msg("buy now", Some("marketing")));
    let c = raw_change(&doc, &mallory, &mallory, |tx| {
        tx.put(ROOT, k, t).unwrap();
    })
    .unwrap();
    let before = doc.heads();
    let r = doc.apply(vec![c]);
    assert!(matches!(r.rejected[0].1, RelError::NotAMember { .. }));
    assert_eq!(doc.heads(), before);
}

#[test]
fn a_member_cannot_write_membership_title_or_profile() {
    let (_, acme, mut doc) = opened();
    for body in [
        RelBody::Member {
            member: key(4).identity(),
            name: "friend".into(),
        },
        RelBody::Title {
            title: "mine now".into(),
        },
        RelBody::Profile {
            field: "email".into(),
            value: "x@y".into(),
        },
        RelBody::Remove {
            member: acme.identity(),
        },
    ] {
        let (k, t) = entry_text(&acme, body);
        let c = raw_change(&doc, &acme, &acme, |tx| {
            tx.put(ROOT, k, t).unwrap();
        })
        .unwrap();
        let r = doc.apply(vec![c]);
        assert!(
            matches!(r.rejected[0].1, RelError::OwnerOnly { .. }),
            "{:?}",
            r.rejected
        );
    }
    assert_eq!(doc.entries().len(), 2);
}

#[test]
fn nobody_writes_in_another_name() {
    let (alice, acme, mut doc) = opened();
    // Acme signs a change whose entry claims Alice wrote it.
    let (k, t) = entry_text(&alice, msg("I agree to everything", None));
    let c = raw_change(&doc, &acme, &acme, |tx| {
        tx.put(ROOT, k.clone(), t.clone()).unwrap();
    })
    .unwrap();
    assert!(matches!(
        doc.apply(vec![c]).rejected[0].1,
        RelError::BadEntry { .. }
    ));
    // Acme makes the actor name Alice and signs with its own key: the signature fails.
    assert!(
        raw_change(&doc, &acme, &alice, |tx| {
            tx.put(ROOT, k, t).unwrap();
        })
        .is_err()
    );
}

#[test]
fn edits_deletes_and_nested_writes_are_refused() {
    let (_, acme, mut doc) = opened();
    let (id, _) = doc
        .append(&acme, [2; 16], T0 + 1, msg("first words", Some("support")))
        .unwrap();
    let (_, replacement) = entry_text(&acme, msg("other words", Some("support")));
    let edit = raw_change(&doc, &acme, &acme, |tx| {
        tx.put(ROOT, id.to_hex(), replacement).unwrap();
    })
    .unwrap();
    let delete = raw_change(&doc, &acme, &acme, |tx| {
        tx.delete(ROOT, id.to_hex()).unwrap();
    })
    .unwrap();
    let nested = raw_change(&doc, &acme, &acme, |tx| {
        tx.put_object(ROOT, "x", automerge::ObjType::Map).unwrap();
    })
    .unwrap();
    for c in [edit, delete, nested] {
        let r = doc.apply(vec![c]);
        assert_eq!(r.rejected.len(), 1, "{:?}", r.applied);
    }
    assert_eq!(doc.messages().len(), 1);
}

#[test]
fn a_forged_signature_or_a_replay_from_another_document_is_refused() {
    let (_, acme, doc) = opened();
    let mut work = doc.clone();
    let (_, good) = work
        .append(&acme, [2; 16], T0 + 1, msg("hello", Some("support")))
        .unwrap();
    let mut bytes = good.encode();
    bytes[10] ^= 1; // inside the signature
    let forged = SignedChange::decode(&bytes).unwrap();
    let mut target = doc.clone();
    assert!(matches!(
        target.apply(vec![forged]).rejected[0].1,
        RelError::Change(_)
    ));
    // The same change replayed into another relationship of the same owner and member.
    let mut other_header = *doc.header();
    other_header.nonce = [8; 16];
    let mut other = RelationshipDoc::new(other_header);
    let r = other.apply(
        doc.changes()
            .iter()
            .cloned()
            .chain([good.clone()])
            .collect(),
    );
    assert!(r.applied.is_empty());
    // Applying the honest change twice is idempotent.
    assert_eq!(target.apply(vec![good.clone()]).applied.len(), 1);
    let again = target.apply(vec![good]);
    assert_eq!((again.applied.len(), again.duplicates), (0, 1));
}

#[test]
fn oversized_messages_are_refused_locally_and_from_peers() {
    let (_, acme, mut doc) = opened();
    let big = "x".repeat(MAX_MESSAGE_BYTES + 1);
    assert!(matches!(
        doc.append(&acme, [2; 16], T0, msg(&big, Some("support"))),
        Err(RelError::Refused(_))
    ));
    let (k, t) = entry_text(&acme, msg(&big, Some("support")));
    let c = raw_change(&doc, &acme, &acme, |tx| {
        tx.put(ROOT, k, t).unwrap();
    })
    .unwrap();
    assert!(matches!(
        doc.apply(vec![c]).rejected[0].1,
        RelError::BadEntry { .. }
    ));
}

#[test]
fn honest_changes_still_apply_next_to_bad_ones() {
    let (_, acme, doc) = opened();
    let mut writer = doc.clone();
    let (_, good) = writer
        .append(&acme, [2; 16], T0 + 1, msg("honest", Some("support")))
        .unwrap();
    let mallory = key(3);
    let (k, t) = entry_text(&mallory, msg("spam", Some("marketing")));
    let bad = raw_change(&doc, &mallory, &mallory, |tx| {
        tx.put(ROOT, k, t).unwrap();
    })
    .unwrap();
    let mut target = doc.clone();
    let r = target.apply(vec![bad, good.clone()]);
    assert_eq!(r.applied, vec![good.hash()]);
    assert_eq!(r.rejected.len(), 1);
}

fn consent_with(scopes: &[&str], accept: bool, revoke: bool) -> ConsentDoc {
    let (alice, acme) = (key(1), key(2));
    let mut c = ConsentDoc::new(ConsentHeader {
        customer: alice.identity(),
        grantee: acme.identity(),
    })
    .unwrap();
    let terms = Terms::by_id("SD-BASE").unwrap().reference();
    let (grant, _) = c
        .append(
            &alice,
            [1; 16],
            T0,
            EntryBody::Grant {
                scopes: scopes.iter().map(|s| s.parse().unwrap()).collect(),
                purpose: "support".into(),
                legal_basis: LegalBasis::Consent,
                notice_sha256: "00".repeat(32),
                terms: terms.clone(),
                expires: Some(T0 + 1000),
            },
        )
        .unwrap();
    if accept {
        c.append(&acme, [2; 16], T0 + 1, EntryBody::Accept { grant, terms })
            .unwrap();
    }
    if revoke {
        c.append(
            &alice,
            [1; 16],
            T0 + 10,
            EntryBody::Revoke {
                grant,
                reason: None,
            },
        )
        .unwrap();
    }
    c
}

#[test]
fn consent_gates_reading_and_writing() {
    let acme = key(2).identity();
    let full = consent_with(
        &["conversation:read", "conversation:write", "contact:support"],
        true,
        false,
    );
    let l = Some(full.ledger());
    let support = RelEntry {
        v: 1,
        by: acme,
        at: T0,
        body: msg("re: your order", Some("support")),
    };
    let marketing = RelEntry {
        body: msg("50% off!", Some("marketing")),
        ..support.clone()
    };
    let no_purpose = RelEntry {
        body: msg("hello", None),
        ..support.clone()
    };
    assert_eq!(may_read(l, &acme, T0 + 5), Ok(()));
    assert_eq!(may_write(l, &acme, &[&support], T0 + 5), Ok(()));
    assert!(matches!(
        may_write(l, &acme, &[&marketing], T0 + 5),
        Err(Denied::Unsolicited { .. })
    ));
    assert!(matches!(
        may_write(l, &acme, &[&no_purpose], T0 + 5),
        Err(Denied::NoPurpose { .. })
    ));
    // Expiry is enforced.
    assert!(may_read(l, &acme, T0 + 2000).is_err());
    assert!(may_write(l, &acme, &[&support], T0 + 2000).is_err());
    // No grant, a pending grant, a revoked grant, and a read-only grant.
    assert!(matches!(
        may_read(None, &acme, T0),
        Err(Denied::NoGrant { .. })
    ));
    let pending = consent_with(&["conversation:read"], false, false);
    assert!(may_read(Some(pending.ledger()), &acme, T0 + 5).is_err());
    let revoked = consent_with(&["conversation:read", "conversation:write"], true, true);
    assert_eq!(may_read(Some(revoked.ledger()), &acme, T0 + 5), Ok(()));
    assert!(may_read(Some(revoked.ledger()), &acme, T0 + 10).is_err());
    let read_only = consent_with(&["conversation:read", "contact:support"], true, false);
    assert!(matches!(
        may_write(Some(read_only.ledger()), &acme, &[&support], T0 + 5),
        Err(Denied::Missing {
            scope: Scope::ConversationWrite,
            ..
        })
    ));
}

#[test]
fn a_gate_refusal_changes_nothing_and_is_reported() {
    let (_, acme, doc) = opened();
    let mut writer = doc.clone();
    let (_, spam) = writer
        .append(&acme, [2; 16], T0 + 1, msg("50% off!", Some("marketing")))
        .unwrap();
    let mut owner = doc.clone();
    let before = owner.heads();
    let r = owner.apply_gated(vec![spam], |author, _| {
        if *author == acme.identity() {
            Err("unsolicited".into())
        } else {
            Ok(())
        }
    });
    assert!(matches!(r.rejected[0].1, RelError::Denied { .. }));
    assert_eq!(owner.heads(), before);
    assert_eq!(owner.messages().len(), 0);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    /// Three writers (owner and two members) write concurrently and exchange changes in
    /// random orders; every replica ends with the same heads and messages, and loading a
    /// replica's changes from scratch gives the same document. Times go back and forth and
    /// repeat, and at every step each replica's message count and latest message (kept as
    /// changes go in) are those of its full list of messages.
    #[test]
    fn concurrent_writers_converge(script in prop::collection::vec((0usize..3, 0usize..3, any::<bool>()), 1..40)) {
        let (alice, acme, mut base) = opened();
        let bob = key(5);
        base.append(&alice, [1; 16], T0, RelBody::Member { member: bob.identity(), name: "Bob".into() }).unwrap();
        let keys = [alice, acme, bob];
        let mut replicas = [base.clone(), base.clone(), base];
        for (step, (who, peer, write)) in script.into_iter().enumerate() {
            if write {
                let purpose = (who != 0).then_some("support");
                replicas[who]
                    .append(&keys[who], [who as u8; 16], T0 + (step as u64 * 7) % 5, msg(&format!("m{step}"), purpose))
                    .unwrap();
            } else if who != peer {
                let missing: Vec<SignedChange> = replicas[who]
                    .changes_missing_from(&replicas[peer].heads())
                    .into_iter()
                    .cloned()
                    .collect();
                let r = replicas[peer].apply(missing);
                prop_assert!(r.rejected.is_empty());
            }
            for r in &replicas {
                let all = r.messages();
                prop_assert_eq!(r.message_count(), all.len());
                prop_assert_eq!(r.last_message(), all.last().copied());
            }
        }
        // Full exchange at the end.
        for _ in 0..2 {
            for from in 0..3 {
                for to in 0..3 {
                    if from != to {
                        let missing: Vec<SignedChange> = replicas[from].changes_missing_from(&replicas[to].heads()).into_iter().cloned().collect();
                        prop_assert!(replicas[to].apply(missing).rejected.is_empty());
                    }
                }
            }
        }
        let mut heads: Vec<_> = replicas.iter().map(|r| { let mut h = r.heads(); h.sort(); h }).collect();
        heads.dedup();
        prop_assert_eq!(heads.len(), 1);
        let reloaded = RelationshipDoc::load(*replicas[0].header(), replicas[0].changes().to_vec()).unwrap();
        prop_assert_eq!(reloaded.messages().len(), replicas[1].messages().len());
        prop_assert_eq!(reloaded.entries(), replicas[2].entries());
        // A node's own store loads without the signature check, to the same document.
        let trusted = RelationshipDoc::load_trusted(*replicas[0].header(), replicas[0].changes().to_vec()).unwrap();
        prop_assert_eq!(trusted.entries(), reloaded.entries());
        prop_assert_eq!(trusted.heads(), reloaded.heads());
    }

    #[test]
    fn relationship_entries_round_trip_and_ids_are_content_addresses(text in "\\PC{1,200}", purpose in "[a-z]{1,10}") {
        let e = RelEntry { v: 1, by: key(2).identity(), at: T0, body: msg(&text, Some(&purpose)) };
        let json = serde_json::to_string(&e).unwrap();
        let back: RelEntry = serde_json::from_str(&json).unwrap();
        prop_assert_eq!(&back, &e);
        prop_assert_eq!(EntryId::of(&json), EntryId::of(&serde_json::to_string(&back).unwrap()));
    }
}

#[test]
fn a_forged_copy_sent_first_does_not_shadow_the_honest_change() {
    let (_, acme, doc) = opened();
    let mut writer = doc.clone();
    let (_, honest) = writer
        .append(&acme, [2; 16], T0 + 1, msg("honest", Some("support")))
        .unwrap();
    let mut bytes = honest.encode();
    bytes[10] ^= 1;
    let forged = SignedChange::decode(&bytes).unwrap();
    assert_eq!(forged.hash(), honest.hash());
    let mut target = doc.clone();
    let r = target.apply(vec![forged.clone(), honest.clone()]);
    assert_eq!(r.applied, vec![honest.hash()]);
    assert_eq!(r.rejected.len(), 1);
    // The same holds for the consent ledger.
    let mut c = consent_with(&["contact:support"], false, false);
    let (k, t) = (key(2), Terms::by_id("SD-BASE").unwrap().reference());
    let grant = c.ledger().grants(u64::MAX)[0].id;
    let mut writer = c.clone();
    let (_, accept) = writer
        .append(&k, [2; 16], T0 + 1, EntryBody::Accept { grant, terms: t })
        .unwrap();
    let mut bytes = accept.encode();
    bytes[10] ^= 1;
    let forged = SignedChange::decode(&bytes).unwrap();
    let r = c.apply(vec![forged, accept.clone()]);
    assert_eq!(r.applied, vec![accept.hash()]);
}

fn epoch_body(doc: &RelationshipDoc, n: u32, to: &[&SecretKey]) -> RelBody {
    let ids: Vec<_> = to.iter().map(|k| k.identity()).collect();
    let sealed = rapport_protocol::seal::seal_epoch(
        &doc.id(),
        n,
        &rapport_protocol::seal::ContentKey::from_bytes([n as u8; 32]),
        [n as u8 + 1; 32],
        &ids,
    );
    rapport_protocol::EpochView::body(n, &sealed)
}

#[test]
fn only_the_owner_starts_an_epoch_and_each_is_written_once() {
    let (alice, acme, mut doc) = opened();
    // A member forging an epoch (to hand itself or others a key of its choosing) is refused.
    let body = epoch_body(&doc, 0, &[&alice, &acme]);
    let (k, t) = entry_text(&acme, body);
    let c = raw_change(&doc, &acme, &acme, |tx| {
        tx.put(ROOT, k, t).unwrap();
    })
    .unwrap();
    let r = doc.apply(vec![c]);
    assert!(
        matches!(r.rejected[0].1, RelError::OwnerOnly { .. }),
        "{:?}",
        r.rejected
    );
    assert_eq!(doc.latest_epoch(), None);
    // The owner's epoch is taken; its slots open for their recipients only.
    let body = epoch_body(&doc, 0, &[&alice, &acme]);
    doc.append(&alice, [1; 16], T0, body).unwrap();
    let e = doc.epoch(0).unwrap();
    let slot = e.slot_for(&acme.identity()).unwrap();
    let k = rapport_protocol::seal::open_epoch(&doc.id(), 0, &e.eph, slot, &acme).unwrap();
    assert_eq!(k.expose(), &[0; 32]);
    assert!(e.slot_for(&key(5).identity()).is_none());
    // Epoch 0 again, even by the owner, is refused: a key is never replaced.
    let again = epoch_body(&doc, 0, &[&alice]);
    assert!(doc.append(&alice, [1; 16], T0 + 1, again.clone()).is_err());
    let (k, t) = entry_text(&alice, again);
    let c = raw_change(&doc, &alice, &alice, |tx| {
        tx.put(ROOT, k, t).unwrap();
    })
    .unwrap();
    let r = doc.apply(vec![c]);
    assert!(
        matches!(r.rejected[0].1, RelError::BadEntry { .. }),
        "{:?}",
        r.rejected
    );
    // Malformed slots are refused by shape.
    let bad = RelBody::Epoch {
        epoch: 1,
        eph: "zz".into(),
        slots: Vec::new(),
    };
    assert!(doc.append(&alice, [1; 16], T0, bad).is_err());
    assert_eq!(doc.latest_epoch(), Some(0));
}

/// A node loads its own stored documents without checking signatures again (they were
/// checked when they arrived); every other rule still holds on that path.
#[test]
fn a_trusted_load_skips_only_the_signature_check() {
    let (_, acme, doc) = opened();
    let mut work = doc.clone();
    work.append(&acme, [2; 16], T0 + 1, msg("hello", Some("support")))
        .unwrap();
    let h = *work.header();
    let mut changes = work.changes().to_vec();

    // A flipped signature bit is seen by a full load only (`rapport store verify`).
    let mut bytes = changes.pop().unwrap().encode();
    bytes[10] ^= 1;
    changes.push(SignedChange::decode(&bytes).unwrap());
    assert!(RelationshipDoc::load(h, changes.clone()).is_err());
    assert!(RelationshipDoc::load_trusted(h, changes).is_ok());

    // A stranger's change, properly signed, is refused either way.
    let mallory = key(3);
    let (k, t) = entry_text(&mallory, msg("buy now", Some("marketing")));
    let c = raw_change(&doc, &mallory, &mallory, |tx| {
        tx.put(ROOT, k, t).unwrap();
    })
    .unwrap();
    let mut with_stranger = doc.changes().to_vec();
    with_stranger.push(c);
    assert!(matches!(
        RelationshipDoc::load_trusted(h, with_stranger),
        Err(RelError::NotAMember { .. })
    ));

    // So is a member writing the membership.
    let (k, t) = entry_text(
        &acme,
        RelBody::Member {
            member: mallory.identity(),
            name: "Mallory".into(),
        },
    );
    let c = raw_change(&doc, &acme, &acme, |tx| {
        tx.put(ROOT, k, t).unwrap();
    })
    .unwrap();
    let mut over_role = doc.changes().to_vec();
    over_role.push(c);
    assert!(RelationshipDoc::load_trusted(h, over_role).is_err());
}

/// A member that signs two different changes under one number of its writer session (a
/// fork of its own history) has the second refused by the rules, whether both come in one
/// batch or apart. Automerge would refuse it too, but the Automerge view is built only
/// when used, so the rules must: the document still builds and takes writes after.
#[test]
fn a_writer_session_number_used_twice_is_refused() {
    let (alice, acme, doc) = opened();
    let (k1, t1) = entry_text(&acme, msg("first", Some("support")));
    let (k2, t2) = entry_text(&acme, msg("second", Some("support")));
    let one = raw_change(&doc, &acme, &acme, |tx| {
        tx.put(ROOT, k1, t1).unwrap();
    })
    .unwrap();
    let two = raw_change(&doc, &acme, &acme, |tx| {
        tx.put(ROOT, k2, t2).unwrap();
    })
    .unwrap();
    assert_eq!(one.change().seq(), two.change().seq());
    assert_ne!(one.hash(), two.hash());
    let twice = |r: &rapport_protocol::RelApplyReport| {
        matches!(&r.rejected[..], [(h, RelError::NotAnAppend { detail, .. })]
            if *h == two.hash() && detail.contains("already wrote a change numbered"))
    };

    // Loaded from its changes, as a node does it: no Automerge view yet.
    let mut together =
        RelationshipDoc::load_trusted(*doc.header(), doc.changes().to_vec()).unwrap();
    let r = together.apply(vec![one.clone(), two.clone()]);
    assert_eq!(r.applied, vec![one.hash()]);
    assert!(twice(&r), "{:?}", r.rejected);

    // With the view built, and the second arriving on its own.
    let mut apart = RelationshipDoc::load_trusted(*doc.header(), doc.changes().to_vec()).unwrap();
    assert_eq!(apart.automerge().get_heads(), apart.heads());
    assert_eq!(apart.apply(vec![one.clone()]).applied, vec![one.hash()]);
    let r = apart.apply(vec![two.clone()]);
    assert!(r.applied.is_empty());
    assert!(twice(&r), "{:?}", r.rejected);

    for d in [&mut together, &mut apart] {
        let (_, c) = d
            .append(&alice, [1; 16], T0 + 5, msg("still here", None))
            .unwrap();
        assert_eq!(d.heads(), vec![c.hash()]);
        assert_eq!(d.automerge().get_heads(), d.heads());
        assert_eq!(d.messages().len(), 2);
    }
}

/// A change that names an Automerge author is refused. Automerge binds an author to a
/// writer session once and refuses a second; since the Automerge view is built only when
/// used, one such change held would make the document unbuildable later, and its owner
/// unable to write.
#[test]
fn a_change_naming_an_automerge_author_is_refused() {
    let (alice, acme, doc) = opened();
    let (k, t) = entry_text(&acme, msg("hello", Some("support")));
    let mut am: Automerge = doc.automerge().clone();
    am.set_author(Some(automerge::Author::from(b"acme".to_vec())));
    am.set_actor(actor_for(&acme.identity(), [9; 16]));
    let mut tx = am.transaction();
    tx.put(ROOT, k, t).unwrap();
    tx.commit_with(CommitOptions::default().with_time(1));
    let change = am.get_last_local_change().unwrap();
    assert!(change.author().is_some());
    let signed = SignedChange::sign(&doc.id(), change, &acme).unwrap();
    let mut held = RelationshipDoc::load_trusted(*doc.header(), doc.changes().to_vec()).unwrap();
    let r = held.apply(vec![signed]);
    assert!(r.applied.is_empty());
    assert!(
        matches!(&r.rejected[..], [(_, RelError::NotAnAppend { detail, .. })] if detail.contains("Automerge author")),
        "{:?}",
        r.rejected
    );
    held.append(&alice, [1; 16], T0 + 1, msg("still writable", None))
        .unwrap();
    assert_eq!(held.automerge().get_heads(), held.heads());
}
