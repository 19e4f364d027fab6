//! The rules of `rapport_protocol::policy`, one by one: strikes, what a peer that refused
//! a change is sent next, which purpose a message gets, and what a revocation erases.

use std::collections::HashSet;

use proptest::prelude::*;
use rapport_protocol::policy::{
    self, BAN_SECONDS, Conduct, MAX_STRIKES, PurposeError, STRIKE_WINDOW,
};
use rapport_protocol::*;

const T0: UnixSeconds = 1_700_000_000;

fn scopes(list: &[&str]) -> Vec<Scope> {
    list.iter().map(|s| s.parse().unwrap()).collect()
}

fn grant(list: &[&str]) -> EntryBody {
    EntryBody::Grant {
        scopes: scopes(list),
        purpose: "support".into(),
        legal_basis: LegalBasis::Consent,
        notice_sha256: "ab".repeat(32),
        terms: Terms::by_id("SD-BASE").unwrap().reference(),
        expires: None,
    }
}

/// A consent document in which `c` granted `g` each scope list of `grants`, and `g`
/// accepted each (both write to the one document).
fn accepted(c: &SecretKey, g: &SecretKey, grants: &[&[&str]]) -> (ConsentDoc, Vec<EntryId>) {
    let mut doc = ConsentDoc::new(ConsentHeader {
        customer: c.identity(),
        grantee: g.identity(),
    })
    .unwrap();
    let mut ids = Vec::new();
    for list in grants {
        let (id, _) = doc.append(c, [1; 16], T0, grant(list)).unwrap();
        let terms = doc.ledger().grant(&id, T0).unwrap().terms;
        doc.append(g, [2; 16], T0, EntryBody::Accept { grant: id, terms })
            .unwrap();
        ids.push(id);
    }
    (doc, ids)
}

#[test]
fn a_peer_is_banned_on_the_strike_past_the_limit_within_the_window() {
    let mut c = Conduct::default();
    for _ in 0..MAX_STRIKES {
        assert!(!c.strike(T0));
    }
    assert!(!c.banned(T0));
    assert!(c.strike(T0 + 1), "the strike past the limit bans");
    assert_eq!(c.banned_until, T0 + 1 + BAN_SECONDS);
    assert!(c.banned(T0 + BAN_SECONDS));
    assert!(!c.banned(T0 + 1 + BAN_SECONDS));
    assert_eq!(c.strikes, 0, "the count starts over");
}

proptest! {
    /// However strikes fall in time, a ban needs more than MAX_STRIKES of them within one
    /// window, and strikes further apart than the window never ban.
    #[test]
    fn strikes_ban_only_past_the_limit_within_one_window(
        gaps in proptest::collection::vec(0u64..(STRIKE_WINDOW * 2), 1..300)
    ) {
        let mut c = Conduct::default();
        let mut now = T0;
        let mut times: Vec<u64> = Vec::new();
        for gap in gaps {
            now += gap;
            times.push(now);
            let banned = c.strike(now);
            let recent = times.iter().filter(|t| now - **t <= STRIKE_WINDOW).count();
            if banned {
                prop_assert!(recent > MAX_STRIKES as usize);
                times.clear();
            }
        }
    }

    #[test]
    fn strikes_further_apart_than_the_window_never_ban(
        gaps in proptest::collection::vec((STRIKE_WINDOW + 1)..(STRIKE_WINDOW * 10), 1..200)
    ) {
        let mut c = Conduct::default();
        let mut now = T0;
        for gap in gaps {
            now += gap;
            prop_assert!(!c.strike(now));
            prop_assert_eq!(c.strikes, 1);
        }
    }

    /// On a chain of changes, a peer that refused some is sent exactly those before the
    /// first it refused: nothing it refused, and nothing built on it.
    #[test]
    fn a_refused_change_holds_back_everything_built_on_it(
        len in 1usize..12,
        refused in proptest::collection::btree_set(0usize..12, 0..4),
    ) {
        let owner = SecretKey::from_seed([7; 32]);
        let mut rel = RelationshipDoc::new(RelHeader { owner: owner.identity(), nonce: [3; 16] });
        for i in 0..len {
            rel.append(&owner, [4; 16], T0, RelBody::Title { title: format!("t{i}") }).unwrap();
        }
        let chain: Vec<&SignedChange> = rel.changes().iter().collect();
        let blocked: HashSet<_> = refused.iter().filter(|i| **i < len).map(|i| chain[*i].hash()).collect();
        let first = refused.iter().copied().find(|i| *i < len).unwrap_or(len);
        let sent: Vec<_> = policy::unblocked(chain.clone(), blocked).iter().map(|c| c.hash()).collect();
        let expect: Vec<_> = chain[..first].iter().map(|c| c.hash()).collect();
        prop_assert_eq!(sent, expect);
    }
}

#[test]
fn a_message_carries_the_one_purpose_the_owner_opted_in_to() {
    let (alice, acme) = (SecretKey::from_seed([1; 32]), SecretKey::from_seed([2; 32]));
    let (a, m) = (alice.identity(), acme.identity());
    // The owner writes with no purpose; a purpose given is kept, trimmed.
    assert_eq!(policy::message_purpose(&a, &a, None, None, T0), Ok(None));
    assert_eq!(
        policy::message_purpose(&m, &a, None, Some(" billing ".into()), T0),
        Ok(Some("billing".into()))
    );
    // No contact grant: refused, and why.
    let (read_only, _) = accepted(&alice, &acme, &[&["conversation:read"]]);
    let e = policy::message_purpose(&m, &a, Some(read_only.ledger()), None, T0).unwrap_err();
    assert!(matches!(e, PurposeError::NotOptedIn { .. }), "{e}");
    assert!(e.to_string().contains("nothing was sent"));
    // One: that one. Two: the writer must choose.
    let (one, _) = accepted(&alice, &acme, &[&["contact:support"]]);
    assert_eq!(
        policy::message_purpose(&m, &a, Some(one.ledger()), None, T0),
        Ok(Some("support".into()))
    );
    let (two, _) = accepted(
        &alice,
        &acme,
        &[&["contact:support"], &["contact:offers", "contact:support"]],
    );
    assert_eq!(
        policy::message_purpose(&m, &a, Some(two.ledger()), None, T0),
        Err(PurposeError::Ambiguous(vec![
            "offers".into(),
            "support".into()
        ]))
    );
}

#[test]
fn a_revocation_erases_unless_another_grant_still_gives_read() {
    let (alice, acme) = (SecretKey::from_seed([1; 32]), SecretKey::from_seed([2; 32]));
    let m = acme.identity();
    let (mut doc, ids) = accepted(&alice, &acme, &[&["conversation:read"]]);
    assert!(policy::erasure_due(doc.ledger(), &m, T0).unacked.is_empty());
    let (rid, _) = doc
        .append(
            &alice,
            [1; 16],
            T0 + 5,
            EntryBody::Revoke {
                grant: ids[0],
                reason: None,
            },
        )
        .unwrap();
    // Not yet due before the revocation's own time.
    assert!(policy::erasure_due(doc.ledger(), &m, T0).unacked.is_empty());
    let due = policy::erasure_due(doc.ledger(), &m, T0 + 5);
    assert_eq!(due.unacked, vec![(ids[0], rid)]);
    assert!(due.erase);
    doc.append(
        &acme,
        [2; 16],
        T0 + 6,
        EntryBody::ErasureAck {
            revoke: rid,
            grant: ids[0],
            erased: "all".into(),
        },
    )
    .unwrap();
    assert!(
        policy::erasure_due(doc.ledger(), &m, T0 + 6)
            .unacked
            .is_empty(),
        "acknowledged once"
    );

    // Two grants of read; one revoked: acknowledged, but nothing goes.
    let (mut doc, ids) = accepted(
        &alice,
        &acme,
        &[
            &["conversation:read"],
            &["conversation:read", "contact:support"],
        ],
    );
    let (rid, _) = doc
        .append(
            &alice,
            [1; 16],
            T0,
            EntryBody::Revoke {
                grant: ids[0],
                reason: None,
            },
        )
        .unwrap();
    let due = policy::erasure_due(doc.ledger(), &m, T0);
    assert_eq!(due.unacked, vec![(ids[0], rid)]);
    assert!(
        !due.erase,
        "another active grant still gives conversation:read"
    );
}
