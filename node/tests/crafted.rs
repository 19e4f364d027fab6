//! A member signs, with its own key, an Automerge change whose operations name actor indices
//! it does not list. `Change::try_from` accepts such a change and Automerge 0.12 panics when
//! it expands it. The customer's node must refuse it like any other bad change, keep
//! serving, and take the member's next honest change.

mod common;

use common::grant_args;
use rapport_node::{Engine, Store};
use rapport_protocol::automerge::transaction::{CommitOptions, Transactable};
use rapport_protocol::automerge::{Automerge, Change, ObjType, ROOT};
use rapport_protocol::wire::{DocRef, RefusalKind, SyncRequest, SyncResponse};
use rapport_protocol::{
    ConsentHeader, EntryId, Kind, Ledger, RelBody, RelEntry, SecretKey, SignedChange, actor_for,
};

const T0: u64 = 1_800_000_000;

/// A change by `attacker`, on no other change, that edits a nested map and overwrites a
/// key: its operations refer to actors by index, which is what a mutation can break.
fn rich_change(attacker: &SecretKey) -> Change {
    let mut am = Automerge::new();
    am.set_actor(actor_for(&attacker.identity(), [2; 16]));
    let mut tx = am.transaction();
    let m = tx.put_object(ROOT, "m", ObjType::Map).unwrap();
    tx.put(&m, "a", "x").unwrap();
    tx.put(&m, "a", "overwritten").unwrap();
    tx.put(ROOT, "k", "y").unwrap();
    tx.commit_with(CommitOptions::default().with_time(0));
    am.get_last_local_change().unwrap()
}

/// Mutates 1-3 bytes of the change (a fixed pseudo-random sequence) until Automerge parses
/// the result, its actor is still the attacker's, and expanding it panics. The checksum is
/// fixed up, as an attacker would, so the change is canonical and can be signed.
fn panicking_change(attacker: &SecretKey) -> Change {
    let base = rich_change(attacker).raw_bytes().to_vec();
    let mut seed: u64 = 0x5eed;
    let mut next = move || {
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        seed >> 33
    };
    let quiet = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut found = None;
    for _ in 0..2_000_000 {
        let mut b = base.clone();
        for _ in 0..=(next() % 3) {
            let i = 8 + (next() as usize % (b.len() - 8));
            b[i] = next() as u8;
        }
        let Ok(c) = Change::try_from(&b[..]) else {
            continue;
        };
        let hash = c.hash();
        b[4..8].copy_from_slice(&hash.0[..4]);
        let Ok(c) = Change::try_from(&b[..]) else {
            continue;
        };
        if c.hash() != hash || c.raw_bytes().len() != b.len() {
            continue;
        }
        if c.actor_id() != &actor_for(&attacker.identity(), [2; 16]) {
            continue;
        }
        if std::panic::catch_unwind(|| c.decode()).is_err() {
            found = Some(c);
            break;
        }
    }
    std::panic::set_hook(quiet);
    found.expect("a mutation that makes Automerge panic (seen at about 2.6%)")
}

fn engine(dir: &std::path::Path, kind: Kind, name: &str) -> Engine {
    Engine::open(Store::create(dir, kind, name, T0).unwrap()).unwrap()
}

#[test]
fn a_change_that_panics_automerge_is_refused_and_the_node_goes_on() {
    let now = T0 + 10;
    let (da, dm) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut alice = engine(da.path(), Kind::Person, "Alice");
    let mut mallory = engine(dm.path(), Kind::Org, "Mallory");
    let mkey = mallory.store().secret_key().unwrap();
    // Mallory holds a grant, so its changes reach every rule.
    alice
        .grant(
            grant_args(
                mallory.me(),
                &["conversation:read", "conversation:write", "contact:support"],
                "support",
            ),
            now,
        )
        .unwrap();
    let consent = DocRef::Consent(ConsentHeader {
        customer: alice.me(),
        grantee: mallory.me(),
    });
    let req = alice
        .start_round(&mallory.me(), &consent, now)
        .unwrap()
        .unwrap();
    mallory.handle_request(&alice.me(), req, now);
    mallory.accept(None, None, now).unwrap();
    let req = mallory
        .start_round(&alice.me(), &consent, now)
        .unwrap()
        .unwrap();
    alice.handle_request(&mallory.me(), req, now);
    let (rel, _) = alice
        .open_relationship(mallory.me(), None, None, now)
        .unwrap();
    let rel = alice.relationship(&rel.doc.to_hex(), now).unwrap().summary;
    let doc = alice
        .shared_with(&mallory.me(), now)
        .into_iter()
        .find(|d| d.doc_id() == rel.id)
        .unwrap();

    let evil = panicking_change(&mkey);
    for target in [doc, consent] {
        let signed = SignedChange::sign(&target.doc_id(), evil.clone(), &mkey).unwrap();
        let req = SyncRequest {
            doc: target,
            heads: vec![],
            changes: vec![signed.encode()],
        };
        let (resp, _, _) = alice.handle_request(&mallory.me(), req, now);
        let SyncResponse::Sync { refused, .. } = resp else {
            panic!("the round is answered: {resp:?}");
        };
        assert_eq!(refused.len(), 1, "the crafted change is refused");
        assert_eq!(refused[0].1, RefusalKind::Invalid);
    }
    // Ledger verification (a ledger file import) refuses it too, without panicking.
    let header = ConsentHeader {
        customer: alice.me(),
        grantee: mallory.me(),
    };
    let signed = SignedChange::sign(&header.doc_id(), evil, &mkey).unwrap();
    assert!(Ledger::verify(header, vec![signed]).is_err());

    // The node goes on: Mallory's honest message is taken.
    let text = serde_json::to_string(&RelEntry {
        v: 1,
        by: mallory.me(),
        at: now,
        body: RelBody::Message {
            thread: None,
            text: "an honest reply".into(),
            purpose: Some("support".into()),
        },
    })
    .unwrap();
    let req = alice
        .start_round(&mallory.me(), &doc, now)
        .unwrap()
        .unwrap();
    let mut am = Automerge::new();
    for b in &req.changes {
        am.apply_changes([SignedChange::decode(b).unwrap().change().clone()])
            .unwrap();
    }
    am.set_actor(actor_for(&mallory.me(), [4; 16]));
    let mut tx = am.transaction();
    tx.put(ROOT, EntryId::of(&text).to_hex(), text).unwrap();
    tx.commit_with(CommitOptions::default().with_time(now as i64));
    let honest =
        SignedChange::sign(&doc.doc_id(), am.get_last_local_change().unwrap(), &mkey).unwrap();
    let (resp, _, _) = alice.handle_request(
        &mallory.me(),
        SyncRequest {
            doc,
            heads: vec![],
            changes: vec![honest.encode()],
        },
        now,
    );
    assert!(
        matches!(resp, SyncResponse::Sync { ref refused, .. } if refused.is_empty()),
        "{resp:?}"
    );
    let texts: Vec<String> = alice
        .relationship(&rel.id.to_hex(), now)
        .unwrap()
        .messages
        .into_iter()
        .map(|m| m.text)
        .collect();
    assert_eq!(texts, ["an honest reply"]);
}

/// Writes the seed of the `apply` fuzz target (a change by the target's author key that
/// edits a nested map) when `RAPPORT_FUZZ_SEEDS` names the corpus directory.
#[test]
fn fuzz_seed_for_apply() {
    let author = SecretKey::from_seed([2; 32]);
    let bytes = rich_change(&author).raw_bytes().to_vec();
    assert!(Change::try_from(&bytes[..]).is_ok());
    if let Some(dir) = std::env::var_os("RAPPORT_FUZZ_SEEDS") {
        let dir = std::path::Path::new(&dir).join("apply");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("nested-map"), bytes).unwrap();
    }
}

/// A chunk that makes Automerge's own parser panic (found by the `apply` fuzz target), sent
/// by a stranger before anything is verified: refused as invalid, and the node answers.
#[test]
fn a_chunk_that_panics_automerges_parser_is_refused_before_verification() {
    let dir = tempfile::tempdir().unwrap();
    let mut alice = engine(dir.path(), Kind::Person, "Alice");
    let stranger = SecretKey::from_seed([9; 32]);
    let chunk = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../fuzz/corpus/apply/parser-panic"
    ))
    .unwrap();
    let mut bytes = vec![rapport_protocol::SIGNED_CHANGE_VERSION];
    bytes.extend_from_slice(&[0u8; 64]);
    bytes.extend_from_slice(&chunk);
    let req = SyncRequest {
        doc: DocRef::Consent(ConsentHeader {
            customer: stranger.identity(),
            grantee: alice.me(),
        }),
        heads: vec![],
        changes: vec![bytes],
    };
    let (resp, _, _) = alice.handle_request(&stranger.identity(), req, T0);
    let SyncResponse::Sync { refused, .. } = resp else {
        panic!("the request is answered: {resp:?}");
    };
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0].1, RefusalKind::Invalid);
    assert_eq!(alice.doc_count(), 0, "nothing is stored");
}
