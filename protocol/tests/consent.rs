//! The consent ledger from the outside: the story, the attacker's attempts, and a property
//! test against a simple reference model.

use rapport_protocol::automerge::transaction::{CommitOptions, Transactable};
use rapport_protocol::automerge::{ROOT, ReadDoc};
use rapport_protocol::*;

const T0: UnixSeconds = 1_700_000_000;

fn keys() -> (SecretKey, SecretKey) {
    (SecretKey::from_seed([1; 32]), SecretKey::from_seed([2; 32]))
}

fn header(c: &SecretKey, g: &SecretKey) -> ConsentHeader {
    ConsentHeader {
        customer: c.identity(),
        grantee: g.identity(),
    }
}

fn scopes(list: &[&str]) -> Vec<Scope> {
    list.iter().map(|s| s.parse().unwrap()).collect()
}

fn grant_body(list: &[&str], expires: Option<UnixSeconds>) -> EntryBody {
    EntryBody::Grant {
        scopes: scopes(list),
        purpose: "support for my order".into(),
        legal_basis: LegalBasis::Consent,
        notice_sha256: "ab".repeat(32),
        terms: Terms::by_id("SD-BASE").unwrap().reference(),
        expires,
    }
}

fn amend_body(grant: EntryId, list: &[&str], expires: Option<UnixSeconds>) -> EntryBody {
    EntryBody::Amend {
        grant,
        scopes: scopes(list),
        expires,
    }
}

fn accept_body(doc: &ConsentDoc, grant: EntryId) -> EntryBody {
    EntryBody::Accept {
        grant,
        terms: doc.ledger().grant(&grant, UnixSeconds::MAX).unwrap().terms,
    }
}

/// Customer grants, grantee (on its own replica) accepts, both synced.
fn granted_and_accepted() -> (SecretKey, SecretKey, ConsentDoc, ConsentDoc, EntryId) {
    let (c, g) = keys();
    let mut cust = ConsentDoc::new(header(&c, &g)).unwrap();
    let (gid, _) = cust
        .append(
            &c,
            [1; 16],
            T0,
            grant_body(&["conversation:read", "contact:support"], None),
        )
        .unwrap();
    let mut comp = ConsentDoc::new(header(&c, &g)).unwrap();
    assert!(
        comp.apply(cust.ledger().changes().to_vec())
            .rejected
            .is_empty()
    );
    let body = accept_body(&comp, gid);
    comp.append(&g, [2; 16], T0 + 10, body).unwrap();
    assert!(
        cust.apply(comp.ledger().changes().to_vec())
            .rejected
            .is_empty()
    );
    (c, g, cust, comp, gid)
}

#[test]
fn grant_is_pending_until_accepted_then_active_then_revoked() {
    let (c, g) = keys();
    let mut cust = ConsentDoc::new(header(&c, &g)).unwrap();
    let read: Scope = "conversation:read".parse().unwrap();
    let (gid, _) = cust
        .append(&c, [1; 16], T0, grant_body(&["conversation:read"], None))
        .unwrap();
    assert_eq!(cust.ledger().grants(T0)[0].status, GrantStatus::Pending);
    assert!(
        !cust.ledger().holds(&read, T0 + 1),
        "not accepted: no access"
    );

    let (c, g, mut cust, mut comp, gid2) = granted_and_accepted();
    let _ = gid;
    assert!(cust.ledger().holds(&read, T0 + 10));
    assert!(
        !cust.ledger().holds(&read, T0 + 9),
        "accepted at T0+10, not before"
    );
    assert!(
        !cust
            .ledger()
            .holds(&"contact:marketing".parse().unwrap(), T0 + 20)
    );
    let (rid, _) = cust
        .append(
            &c,
            [1; 16],
            T0 + 100,
            EntryBody::Revoke {
                grant: gid2,
                reason: None,
            },
        )
        .unwrap();
    assert!(cust.ledger().holds(&read, T0 + 99));
    assert!(!cust.ledger().holds(&read, T0 + 100));
    comp.apply(cust.ledger().changes().to_vec());
    comp.append(
        &g,
        [2; 16],
        T0 + 101,
        EntryBody::ErasureAck {
            revoke: rid,
            grant: gid2,
            erased: "conversation copy".into(),
        },
    )
    .unwrap();
    let view = comp.ledger().grant(&gid2, T0 + 200).unwrap();
    assert_eq!(view.status, GrantStatus::Revoked);
    assert_eq!(view.erasure_acked.map(|e| e.1), Some(T0 + 101));
    // Revoking twice is refused with a clear message.
    let err = cust
        .append(
            &c,
            [1; 16],
            T0 + 300,
            EntryBody::Revoke {
                grant: gid2,
                reason: None,
            },
        )
        .unwrap_err();
    assert!(err.to_string().contains("already revoked"), "{err}");
}

#[test]
fn expiry_is_enforced_and_amend_only_narrows() {
    let (c, g) = keys();
    let mut cust = ConsentDoc::new(header(&c, &g)).unwrap();
    let (gid, _) = cust
        .append(
            &c,
            [1; 16],
            T0,
            grant_body(&["conversation:read", "contact:support"], Some(T0 + 1000)),
        )
        .unwrap();
    let mut comp = ConsentDoc::new(header(&c, &g)).unwrap();
    comp.apply(cust.ledger().changes().to_vec());
    let body = accept_body(&comp, gid);
    comp.append(&g, [2; 16], T0 + 1, body).unwrap();
    cust.apply(comp.ledger().changes().to_vec());
    let support: Scope = "contact:support".parse().unwrap();
    assert!(cust.ledger().holds(&support, T0 + 999));
    assert!(!cust.ledger().holds(&support, T0 + 1000), "expired");
    assert_eq!(
        cust.ledger().grants(T0 + 1000)[0].status,
        GrantStatus::Expired
    );

    let wider = amend_body(gid, &["contact:marketing"], Some(T0 + 10));
    let err = cust.append(&c, [1; 16], T0 + 5, wider).unwrap_err();
    assert!(err.to_string().contains("only narrow"), "{err}");
    let longer = amend_body(gid, &["contact:support"], None);
    assert!(cust.append(&c, [1; 16], T0 + 5, longer).is_err());
    let narrower = amend_body(gid, &["contact:support"], Some(T0 + 500));
    cust.append(&c, [1; 16], T0 + 5, narrower).unwrap();
    assert!(
        !cust
            .ledger()
            .holds(&"conversation:read".parse().unwrap(), T0 + 6)
    );
    assert!(cust.ledger().holds(&support, T0 + 6));
    assert!(!cust.ledger().holds(&support, T0 + 500));
}

#[test]
fn revoke_beats_a_concurrent_amend() {
    let (c, _g, mut cust, _comp, gid) = granted_and_accepted();
    // Two devices of the customer: one amends, one revokes, without seeing each other.
    let mut laptop = cust.clone();
    laptop
        .append(
            &c,
            [7; 16],
            T0 + 50,
            EntryBody::Revoke {
                grant: gid,
                reason: Some("moved on".into()),
            },
        )
        .unwrap();
    cust.append(
        &c,
        [8; 16],
        T0 + 60,
        amend_body(gid, &["conversation:read"], None),
    )
    .unwrap();
    let mut a = cust.clone();
    let mut b = laptop.clone();
    a.apply(laptop.ledger().changes().to_vec());
    b.apply(cust.ledger().changes().to_vec());
    assert_eq!(a.heads().len(), 2, "a real fork in the DAG");
    let mut ha = a.heads();
    let mut hb = b.heads();
    ha.sort();
    hb.sort();
    assert_eq!(ha, hb);
    for doc in [&a, &b] {
        let view = doc.ledger().grant(&gid, T0 + 1000).unwrap();
        assert_eq!(view.status, GrantStatus::Revoked);
        assert!(
            !doc.ledger()
                .holds(&"conversation:read".parse().unwrap(), T0 + 61)
        );
    }
}

/// Two amendments of one grant in the same second (a person running `consent amend` twice
/// quickly): the one written after seeing the other wins, whichever entry id is larger,
/// on every replica. Two written apart, each without seeing the other, are ordered by
/// entry id on every replica. Before, the larger entry id won even over a later amendment,
/// so the second command could silently lose.
#[test]
fn of_two_amendments_in_one_second_the_one_written_after_wins() {
    let read: Scope = "conversation:read".parse().unwrap();
    let support: Scope = "contact:support".parse().unwrap();
    let mut both_orders = [false, false];
    // Different ends give different entry ids: try until both id orders were seen.
    for end in 1..64u64 {
        let (c, _g, mut cust, mut comp, gid) = granted_and_accepted();
        let amend = |list: &[&str], expires| amend_body(gid, list, expires);
        let (first, _) = cust
            .append(
                &c,
                [8; 16],
                T0 + 60,
                amend(
                    &["conversation:read", "contact:support"],
                    Some(T0 + 5000 + end),
                ),
            )
            .unwrap();
        let (second, _) = cust
            .append(&c, [8; 16], T0 + 60, amend(&["conversation:read"], None))
            .unwrap();
        both_orders[usize::from(second > first)] = true;
        comp.apply(cust.ledger().changes().to_vec());
        for doc in [&cust, &comp] {
            let g = doc.ledger().grant(&gid, T0 + 61).unwrap();
            assert_eq!(g.scopes, vec![read.clone()], "end {end}");
            assert!(!doc.ledger().holds(&support, T0 + 61));
        }
        if both_orders == [true, true] {
            break;
        }
    }
    assert_eq!(both_orders, [true, true], "both id orders were tried");

    // Written apart in the same second: the larger entry id, on both replicas.
    let (c, _g, cust, _comp, gid) = granted_and_accepted();
    let mut phone = cust.clone();
    let mut laptop = cust.clone();
    let (a, _) = phone
        .append(
            &c,
            [7; 16],
            T0 + 60,
            amend_body(gid, &["conversation:read"], None),
        )
        .unwrap();
    let (b, _) = laptop
        .append(
            &c,
            [9; 16],
            T0 + 60,
            amend_body(gid, &["contact:support"], None),
        )
        .unwrap();
    phone.apply(laptop.ledger().changes().to_vec());
    laptop.apply(phone.ledger().changes().to_vec());
    let want = if a > b { read } else { support };
    for doc in [&phone, &laptop] {
        assert_eq!(
            doc.ledger().grant(&gid, T0 + 61).unwrap().scopes,
            vec![want.clone()]
        );
    }
}

/// Builds a change by `author` that runs `edit` on a copy of `doc`, and signs it.
fn crafted(
    doc: &ConsentDoc,
    author: &SecretKey,
    edit: impl FnOnce(&mut rapport_protocol::automerge::transaction::Transaction<'_>),
) -> SignedChange {
    let mut am = doc
        .automerge()
        .fork()
        .with_actor(actor_for(&author.identity(), [66; 16]));
    let mut tx = am.transaction();
    edit(&mut tx);
    tx.commit_with(CommitOptions::default().with_time(0));
    let change = am.get_last_local_change().unwrap();
    SignedChange::sign(&doc.ledger().id(), change, author).unwrap()
}

fn entry_text(by: &SecretKey, at: UnixSeconds, body: EntryBody) -> (String, String) {
    let text = serde_json::to_string(&Entry {
        v: 1,
        by: by.identity(),
        at,
        body,
    })
    .unwrap();
    (EntryId::of(&text).to_hex(), text)
}

fn assert_refused_and_unchanged(doc: &mut ConsentDoc, change: SignedChange, expect: &str) {
    let heads = doc.heads();
    let entries = doc.ledger().entries().clone();
    let n = doc.ledger().changes().len();
    let report = doc.apply(vec![change]);
    assert_eq!(report.rejected.len(), 1, "expected a refusal");
    let msg = report.rejected[0].1.to_string();
    assert!(
        msg.contains(expect),
        "refusal {msg:?} should mention {expect:?}"
    );
    assert_eq!(doc.heads(), heads);
    assert_eq!(doc.ledger().entries(), &entries);
    assert_eq!(doc.ledger().changes().len(), n);
}

#[test]
fn grantee_cannot_write_customer_entries() {
    let (_c, g, mut cust, _comp, _gid) = granted_and_accepted();
    let (key, text) = entry_text(&g, T0 + 5, grant_body(&["contact:marketing"], None));
    let change = crafted(&cust, &g, |tx| {
        tx.put(ROOT, key.as_str(), text.as_str()).unwrap();
    });
    assert_refused_and_unchanged(&mut cust, change, "grantee may not write a grant");
}

#[test]
fn editing_or_deleting_an_entry_is_refused() {
    let (c, _g, mut cust, _comp, gid) = granted_and_accepted();
    let key = gid.to_hex();
    let change = crafted(&cust, &c, |tx| {
        tx.put(ROOT, key.as_str(), "{}").unwrap();
    });
    assert_refused_and_unchanged(&mut cust, change, "overwrites or deletes");
    let change = crafted(&cust, &c, |tx| {
        tx.delete(ROOT, key.as_str()).unwrap();
    });
    assert_refused_and_unchanged(&mut cust, change, "does not only append");
    // Writing somewhere other than a new top-level entry.
    let change = crafted(&cust, &c, |tx| {
        tx.put_object(ROOT, "nested", rapport_protocol::automerge::ObjType::Map)
            .unwrap();
    });
    assert_refused_and_unchanged(&mut cust, change, "does not put a new entry");
}

#[test]
fn entries_claiming_another_author_or_a_wrong_key_are_refused() {
    let (c, g, mut cust, _comp, gid) = granted_and_accepted();
    // The grantee signs a change whose entry claims the customer wrote it.
    let (key, text) = entry_text(
        &c,
        T0 + 5,
        EntryBody::Revoke {
            grant: gid,
            reason: None,
        },
    );
    let change = crafted(&cust, &g, |tx| {
        tx.put(ROOT, key.as_str(), text.as_str()).unwrap();
    });
    assert_refused_and_unchanged(&mut cust, change, "claims to be by");
    // A key that is not the id of the text.
    let (_, text) = entry_text(
        &c,
        T0 + 5,
        EntryBody::Revoke {
            grant: gid,
            reason: None,
        },
    );
    let change = crafted(&cust, &c, |tx| {
        tx.put(ROOT, "00".repeat(32).as_str(), text.as_str())
            .unwrap();
    });
    assert_refused_and_unchanged(&mut cust, change, "is not the id");
    // An oversized entry.
    let (key, text) = entry_text(
        &c,
        T0 + 5,
        EntryBody::Revoke {
            grant: gid,
            reason: Some("x".repeat(9000)),
        },
    );
    let change = crafted(&cust, &c, |tx| {
        tx.put(ROOT, key.as_str(), text.as_str()).unwrap();
    });
    assert_refused_and_unchanged(&mut cust, change, "limit");
}

#[test]
fn forged_and_foreign_signatures_are_refused_and_replays_change_nothing() {
    let (c, g, mut cust, _comp, gid) = granted_and_accepted();
    let mallory = SecretKey::from_seed([9; 32]);
    let (key, text) = entry_text(
        &mallory,
        T0 + 5,
        EntryBody::Revoke {
            grant: gid,
            reason: None,
        },
    );
    let change = crafted(&cust, &mallory, |tx| {
        tx.put(ROOT, key.as_str(), text.as_str()).unwrap();
    });
    assert_refused_and_unchanged(&mut cust, change, "may not write to this document");

    // A change signed for another document between other parties is refused here.
    let other = SecretKey::from_seed([3; 32]);
    let mut elsewhere = ConsentDoc::new(header(&c, &other)).unwrap();
    let (_, foreign) = elsewhere
        .append(&c, [1; 16], T0, grant_body(&["conversation:read"], None))
        .unwrap();
    assert_refused_and_unchanged(&mut cust, foreign, "signature does not verify");

    // Replaying every change already held is harmless.
    let heads = cust.heads();
    let report = cust.apply(cust.ledger().changes().to_vec());
    assert!(report.applied.is_empty() && report.rejected.is_empty());
    assert_eq!(report.duplicates, cust.ledger().changes().len());
    assert_eq!(cust.heads(), heads);
    let _ = g;
}

#[test]
fn honest_changes_still_apply_next_to_bad_ones() {
    let (c, g, cust, mut comp, gid) = granted_and_accepted();
    let mut cust2 = cust.clone();
    let (_, good) = cust2
        .append(
            &c,
            [1; 16],
            T0 + 30,
            EntryBody::Revoke {
                grant: gid,
                reason: None,
            },
        )
        .unwrap();
    let (key, text) = entry_text(&g, T0 + 5, grant_body(&["contact:marketing"], None));
    let bad = crafted(&comp, &g, |tx| {
        tx.put(ROOT, key.as_str(), text.as_str()).unwrap();
    });
    let report = comp.apply(vec![bad, good]);
    assert_eq!(report.applied.len(), 1);
    assert_eq!(report.rejected.len(), 1);
    assert_eq!(
        comp.ledger().grant(&gid, T0 + 31).unwrap().status,
        GrantStatus::Revoked
    );
}

#[test]
fn accept_must_carry_the_grants_exact_terms() {
    let (c, g) = keys();
    let mut cust = ConsentDoc::new(header(&c, &g)).unwrap();
    let (gid, _) = cust
        .append(&c, [1; 16], T0, grant_body(&["conversation:read"], None))
        .unwrap();
    let mut comp = cust.clone();
    let other_terms = Terms::by_id("SD-BASE-ATP").unwrap().reference();
    let err = comp
        .append(
            &g,
            [2; 16],
            T0 + 1,
            EntryBody::Accept {
                grant: gid,
                terms: other_terms.clone(),
            },
        )
        .unwrap_err();
    assert!(err.to_string().contains("is on terms SD-BASE"), "{err}");
    // Even written by hand, an acceptance of other terms grants nothing.
    let (key, text) = entry_text(
        &g,
        T0 + 1,
        EntryBody::Accept {
            grant: gid,
            terms: other_terms,
        },
    );
    let change = crafted(&comp, &g, |tx| {
        tx.put(ROOT, key.as_str(), text.as_str()).unwrap();
    });
    assert!(cust.apply(vec![change]).rejected.is_empty());
    assert_eq!(
        cust.ledger().grant(&gid, T0 + 2).unwrap().status,
        GrantStatus::Pending
    );
    assert!(
        !cust
            .ledger()
            .holds(&"conversation:read".parse().unwrap(), T0 + 2)
    );
}

#[test]
fn ledger_file_round_trips_and_tampering_is_caught() {
    let (c, _g, mut cust, _comp, gid) = granted_and_accepted();
    cust.append(
        &c,
        [1; 16],
        T0 + 40,
        EntryBody::Revoke {
            grant: gid,
            reason: None,
        },
    )
    .unwrap();
    let text = write_ledger_file(cust.ledger());
    let (h, changes) = read_ledger_file(text.as_bytes()).unwrap();
    let ledger = Ledger::verify(h, changes).unwrap();
    assert_eq!(ledger.entries(), cust.ledger().entries());

    // Flip one character inside one change's base64: refused, by parse or by verification.
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let s = v["changes"][1].as_str().unwrap().to_owned();
    let mut chars: Vec<char> = s.chars().collect();
    let mid = chars.len() / 2;
    chars[mid] = if chars[mid] == 'A' { 'B' } else { 'A' };
    v["changes"][1] = serde_json::Value::String(chars.into_iter().collect());
    let tampered = serde_json::to_vec(&v).unwrap();
    let outcome = read_ledger_file(&tampered).map(|(h, ch)| Ledger::verify(h, ch));
    assert!(matches!(outcome, Err(_) | Ok(Err(_))));
    // Dropping a change breaks the hash links.
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["changes"].as_array_mut().unwrap().remove(0);
    let (h, ch) = read_ledger_file(&serde_json::to_vec(&v).unwrap()).unwrap();
    assert!(
        Ledger::verify(h, ch)
            .unwrap_err()
            .to_string()
            .contains("depends on")
    );
    // Swapping the grantee changes the document id.
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["grantee"] = serde_json::Value::String(SecretKey::from_seed([5; 32]).identity().to_string());
    assert!(matches!(
        read_ledger_file(&serde_json::to_vec(&v).unwrap()),
        Err(LedgerFileError::DocIdMismatch { .. })
    ));
}

#[test]
fn document_stores_entries_as_readable_json() {
    let (_c, _g, cust, _comp, gid) = granted_and_accepted();
    let (value, _) = cust.automerge().get(ROOT, gid.to_hex()).unwrap().unwrap();
    let text = value.into_string().unwrap();
    assert!(text.contains("\"type\":\"grant\""), "{text}");
}

mod model {
    //! A reference model: plain records and a naive fold, checked against the real ledger
    //! after random interleavings on two replicas and random causal delivery orders.
    use super::*;
    use proptest::prelude::*;
    use proptest::test_runner::TestRng;
    use rand::seq::SliceRandom;

    const ALL: [&str; 3] = ["conversation:read", "conversation:write", "contact:support"];

    #[derive(Debug, Clone)]
    enum Op {
        Grant {
            mask: u8,
            expires_in: Option<u64>,
        },
        Amend {
            grant: usize,
            mask: u8,
            expires_in: Option<u64>,
        },
        Revoke {
            grant: usize,
        },
        Accept {
            grant: usize,
        },
        Erase {
            grant: usize,
        },
        SyncToGrantee,
        SyncToCustomer,
        Tick(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (1u8..8, prop::option::of(1u64..40)).prop_map(|(mask, expires_in)| Op::Grant { mask, expires_in }),
            3 => (0usize..3, 1u8..8, prop::option::of(1u64..40)).prop_map(|(grant, mask, expires_in)| Op::Amend { grant, mask, expires_in }),
            2 => (0usize..3).prop_map(|grant| Op::Revoke { grant }),
            4 => (0usize..3).prop_map(|grant| Op::Accept { grant }),
            1 => (0usize..3).prop_map(|grant| Op::Erase { grant }),
            4 => Just(Op::SyncToGrantee),
            2 => Just(Op::SyncToCustomer),
            3 => (0u64..6).prop_map(Op::Tick),
        ]
    }

    #[derive(Debug, Clone)]
    struct Rec {
        id: EntryId,
        at: UnixSeconds,
        kind: &'static str,
        grant: Option<EntryId>,
        scopes: Vec<Scope>,
        expires: Option<UnixSeconds>,
    }

    fn mask_scopes(mask: u8) -> Vec<Scope> {
        ALL.iter()
            .enumerate()
            .filter(|(i, _)| mask & (1 << i) != 0)
            .map(|(_, s)| s.parse().unwrap())
            .collect()
    }

    /// The naive fold: a scope is held at `t` if some grant made by `t` was accepted by
    /// `t`, is not revoked by `t`, and its latest amendment by `t` (or itself) covers the
    /// scope and has not ended.
    fn model_holds(recs: &[Rec], scope: &Scope, t: UnixSeconds) -> bool {
        recs.iter()
            .filter(|g| g.kind == "grant" && g.at <= t)
            .any(|g| {
                let refers = |r: &&Rec| r.grant == Some(g.id) && r.at <= t;
                let accepted = recs.iter().filter(refers).any(|r| r.kind == "accept");
                let revoked = recs.iter().filter(refers).any(|r| r.kind == "revoke");
                let mut amends: Vec<&Rec> = recs
                    .iter()
                    .filter(refers)
                    .filter(|r| r.kind == "amend")
                    .collect();
                // One writer (the customer's replica) writes every amendment, each after
                // seeing the ones before: in one second, the last written wins.
                amends.sort_by_key(|r| r.at);
                let (scopes, expires) = match amends.last() {
                    None => (g.scopes.clone(), g.expires),
                    Some(a) => (
                        a.scopes
                            .iter()
                            .filter(|s| g.scopes.contains(s))
                            .cloned()
                            .collect(),
                        match (g.expires, a.expires) {
                            (Some(x), Some(y)) => Some(x.min(y)),
                            (x, y) => x.or(y),
                        },
                    ),
                };
                accepted && !revoked && expires.is_none_or(|e| e > t) && scopes.contains(scope)
            })
    }

    fn causal_shuffle(changes: &[SignedChange], rng: &mut TestRng) -> Vec<SignedChange> {
        let mut left: Vec<SignedChange> = changes.to_vec();
        left.shuffle(rng);
        let mut done = std::collections::HashSet::new();
        let mut out = Vec::new();
        while !left.is_empty() {
            let pos = left
                .iter()
                .position(|c| c.change().deps().iter().all(|d| done.contains(d)))
                .expect("a change with all deps in");
            let c = left.remove(pos);
            done.insert(c.hash());
            out.push(c);
            left.shuffle(rng);
        }
        out
    }

    fn run(ops: Vec<Op>, rng: &mut TestRng) -> Result<(), TestCaseError> {
        let (c, g) = keys();
        let h = header(&c, &g);
        let mut cust = ConsentDoc::new(h).unwrap();
        let mut comp = ConsentDoc::new(h).unwrap();
        let mut recs: Vec<Rec> = Vec::new();
        let mut grants: Vec<EntryId> = Vec::new();
        let mut now = T0;
        for op in ops {
            match op {
                Op::Grant { mask, expires_in } => {
                    let body = EntryBody::Grant {
                        scopes: mask_scopes(mask),
                        purpose: "p".into(),
                        legal_basis: LegalBasis::Consent,
                        notice_sha256: "00".repeat(32),
                        terms: Terms::by_id("SD-BASE").unwrap().reference(),
                        expires: expires_in.map(|d| now + d),
                    };
                    if let Ok((id, _)) = cust.append(&c, [1; 16], now, body) {
                        grants.push(id);
                        recs.push(Rec {
                            id,
                            at: now,
                            kind: "grant",
                            grant: None,
                            scopes: mask_scopes(mask),
                            expires: expires_in.map(|d| now + d),
                        });
                    }
                }
                Op::Amend {
                    grant,
                    mask,
                    expires_in,
                } => {
                    let Some(&gid) = grants.get(grant) else {
                        continue;
                    };
                    // Aim for amendments the local rules allow (narrowing), so many apply.
                    let g_rec = recs.iter().find(|r| r.id == gid).unwrap().clone();
                    let scopes: Vec<Scope> = mask_scopes(mask)
                        .into_iter()
                        .filter(|s| g_rec.scopes.contains(s))
                        .collect();
                    let expires = match (g_rec.expires, expires_in.map(|d| now + d)) {
                        (Some(e), Some(x)) => Some(e.min(x)),
                        (e, x) => e.or(x),
                    };
                    let body = EntryBody::Amend {
                        grant: gid,
                        scopes: scopes.clone(),
                        expires,
                    };
                    if let Ok((id, _)) = cust.append(&c, [1; 16], now, body) {
                        recs.push(Rec {
                            id,
                            at: now,
                            kind: "amend",
                            grant: Some(gid),
                            scopes,
                            expires,
                        });
                    }
                }
                Op::Revoke { grant } => {
                    let Some(&gid) = grants.get(grant) else {
                        continue;
                    };
                    if let Ok((id, _)) = cust.append(
                        &c,
                        [1; 16],
                        now,
                        EntryBody::Revoke {
                            grant: gid,
                            reason: None,
                        },
                    ) {
                        recs.push(Rec {
                            id,
                            at: now,
                            kind: "revoke",
                            grant: Some(gid),
                            scopes: vec![],
                            expires: None,
                        });
                    }
                }
                Op::Accept { grant } => {
                    let Some(&gid) = grants.get(grant) else {
                        continue;
                    };
                    let Some(view) = comp.ledger().grant(&gid, UnixSeconds::MAX) else {
                        continue;
                    };
                    if let Ok((id, _)) = comp.append(
                        &g,
                        [2; 16],
                        now,
                        EntryBody::Accept {
                            grant: gid,
                            terms: view.terms,
                        },
                    ) {
                        recs.push(Rec {
                            id,
                            at: now,
                            kind: "accept",
                            grant: Some(gid),
                            scopes: vec![],
                            expires: None,
                        });
                    }
                }
                Op::Erase { grant } => {
                    let Some(&gid) = grants.get(grant) else {
                        continue;
                    };
                    let Some((rid, _)) = comp
                        .ledger()
                        .grant(&gid, UnixSeconds::MAX)
                        .and_then(|v| v.revoked)
                    else {
                        continue;
                    };
                    if let Ok((id, _)) = comp.append(
                        &g,
                        [2; 16],
                        now,
                        EntryBody::ErasureAck {
                            revoke: rid,
                            grant: gid,
                            erased: "all".into(),
                        },
                    ) {
                        recs.push(Rec {
                            id,
                            at: now,
                            kind: "erasure_ack",
                            grant: Some(gid),
                            scopes: vec![],
                            expires: None,
                        });
                    }
                }
                Op::SyncToGrantee => {
                    let r = comp.apply(cust.ledger().changes().to_vec());
                    prop_assert!(r.rejected.is_empty(), "{:?}", r.rejected);
                }
                Op::SyncToCustomer => {
                    let r = cust.apply(comp.ledger().changes().to_vec());
                    prop_assert!(r.rejected.is_empty(), "{:?}", r.rejected);
                }
                Op::Tick(d) => now += d,
            }
        }
        cust.apply(comp.ledger().changes().to_vec());
        comp.apply(cust.ledger().changes().to_vec());
        let all = cust.ledger().changes().to_vec();
        // Two more replicas receive everything in random causal orders, and a third in a
        // fully random order (changes wait for their dependencies).
        let mut r1 = ConsentDoc::new(h).unwrap();
        prop_assert!(r1.apply(causal_shuffle(&all, rng)).rejected.is_empty());
        let mut r2 = ConsentDoc::new(h).unwrap();
        for c in causal_shuffle(&all, rng) {
            prop_assert!(r2.apply(vec![c]).rejected.is_empty());
        }
        let mut shuffled = all.clone();
        shuffled.shuffle(rng);
        let mut r3 = ConsentDoc::new(h).unwrap();
        prop_assert!(r3.apply(shuffled).rejected.is_empty());
        let sorted = |d: &ConsentDoc| {
            let mut h = d.heads();
            h.sort();
            h
        };
        for r in [&comp, &r1, &r2, &r3] {
            prop_assert_eq!(sorted(r), sorted(&cust));
            prop_assert_eq!(r.ledger().entries(), cust.ledger().entries());
        }
        for t in T0..=now + 45 {
            for s in ALL {
                let scope: Scope = s.parse().unwrap();
                let expected = model_holds(&recs, &scope, t);
                for r in [&cust, &comp, &r1, &r2, &r3] {
                    prop_assert_eq!(
                        r.ledger().holds(&scope, t),
                        expected,
                        "scope {} at t0+{}",
                        s,
                        t - T0
                    );
                }
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn replicas_agree_with_the_reference_model(ops in prop::collection::vec(op(), 10..60), seed in any::<[u8; 32]>()) {
            let mut rng = TestRng::from_seed(proptest::test_runner::RngAlgorithm::ChaCha, &seed);
            run(ops, &mut rng)?;
        }
    }
}

/// A node loads its own stored documents without checking signatures again (they were
/// checked when they arrived); every other rule still holds on that path.
#[test]
fn a_trusted_load_skips_only_the_signature_check() {
    let (c, g, cust, _comp, gid) = granted_and_accepted();
    let h = header(&c, &g);
    let changes = cust.ledger().changes().to_vec();
    let verified = ConsentDoc::load(h, changes.clone()).unwrap();
    let trusted = ConsentDoc::load_trusted(h, changes.clone()).unwrap();
    assert_eq!(trusted.heads(), verified.heads());
    assert_eq!(trusted.ledger().entries(), verified.ledger().entries());

    // A flipped signature bit is seen by a full load only (`rapport store verify`).
    let mut flipped = changes.clone();
    let mut bytes = flipped.pop().unwrap().encode();
    bytes[10] ^= 1;
    flipped.push(SignedChange::decode(&bytes).unwrap());
    assert!(ConsentDoc::load(h, flipped.clone()).is_err());
    assert!(ConsentDoc::load_trusted(h, flipped).is_ok());

    // A third party's change, properly signed, is refused either way.
    let mallory = SecretKey::from_seed([9; 32]);
    let (key, text) = entry_text(
        &mallory,
        T0 + 5,
        EntryBody::Revoke {
            grant: gid,
            reason: None,
        },
    );
    let change = crafted(&cust, &mallory, |tx| {
        tx.put(ROOT, key.as_str(), text.as_str()).unwrap();
    });
    let mut with_stranger = changes.clone();
    with_stranger.push(change);
    assert!(ConsentDoc::load_trusted(h, with_stranger).is_err());

    // So is the grantee writing the customer's entries.
    let (key, text) = entry_text(&g, T0 + 5, grant_body(&["contact:marketing"], None));
    let change = crafted(&cust, &g, |tx| {
        tx.put(ROOT, key.as_str(), text.as_str()).unwrap();
    });
    let mut over_scoped = changes;
    over_scoped.push(change);
    assert!(ConsentDoc::load_trusted(h, over_scoped).is_err());
}
