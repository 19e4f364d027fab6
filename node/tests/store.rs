//! The store on real redb files in temporary directories.

mod common;

use rapport_node::{Store, StoreError};
use rapport_protocol::{
    ConsentDoc, ConsentHeader, EntryBody, Kind, LegalBasis, SecretKey, SignedChange, Terms,
};

const T0: u64 = 1_700_000_000;

fn changes(n: usize) -> (ConsentHeader, Vec<SignedChange>) {
    let c = SecretKey::from_seed([1; 32]);
    let g = SecretKey::from_seed([2; 32]);
    let header = ConsentHeader {
        customer: c.identity(),
        grantee: g.identity(),
    };
    let mut doc = ConsentDoc::new(header).unwrap();
    let out = (0..n)
        .map(|i| {
            doc.append(
                &c,
                [1; 16],
                T0 + i as u64,
                EntryBody::Grant {
                    scopes: vec!["contact:support".parse().unwrap()],
                    purpose: format!("purpose {i}"),
                    legal_basis: LegalBasis::Consent,
                    notice_sha256: "00".repeat(32),
                    terms: Terms::by_id("SD-BASE").unwrap().reference(),
                    expires: None,
                },
            )
            .unwrap()
            .1
        })
        .collect();
    (header, out)
}

#[test]
fn create_then_open_round_trips_profile_and_key() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("node");
    let created = Store::create(&dir, Kind::Org, "Acme", T0).unwrap();
    let profile = created.profile().unwrap();
    let key = created.secret_key().unwrap();
    assert_eq!(key.identity(), profile.identity);
    drop(created);
    let store = Store::open(&dir).unwrap();
    assert_eq!(store.profile().unwrap(), profile);
    assert_eq!(store.secret_key().unwrap().to_seed(), key.to_seed());
    assert_eq!(store.schema_version().unwrap(), 7);
    assert_eq!(profile.kind, Kind::Org);
    assert_eq!(profile.name, "Acme");
}

#[test]
fn create_never_overwrites() {
    let tmp = tempfile::tempdir().unwrap();
    let first = Store::create(tmp.path(), Kind::Person, "A", T0).unwrap();
    let id = first.profile().unwrap().identity;
    drop(first);
    let err = Store::create(tmp.path(), Kind::Person, "B", T0).unwrap_err();
    assert!(matches!(err, StoreError::AlreadyExists(_)), "{err}");
    assert_eq!(
        Store::open(tmp.path()).unwrap().profile().unwrap().identity,
        id
    );
}

#[test]
fn missing_garbage_and_newer_stores_give_clear_errors_and_stay_untouched() {
    let tmp = tempfile::tempdir().unwrap();
    let err = Store::open(&tmp.path().join("nothing")).unwrap_err();
    assert!(err.to_string().contains("rapport init"), "{err}");
    assert!(!tmp.path().join("nothing").exists());

    let bad = tmp.path().join("bad");
    std::fs::create_dir(&bad).unwrap();
    let junk: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 256) as u8).collect();
    std::fs::write(bad.join(Store::FILE_NAME), &junk).unwrap();
    let err = Store::open(&bad).unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("left untouched"));
    assert!(
        std::fs::read(bad.join(Store::FILE_NAME)).unwrap() == junk,
        "the damaged file was changed"
    );

    // A redb file that is not a Rapport store.
    let other = tmp.path().join("other");
    std::fs::create_dir(&other).unwrap();
    drop(redb::Database::create(other.join(Store::FILE_NAME)).unwrap());
    let err = Store::open(&other).unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");

    // A store from a newer release.
    let newer = tmp.path().join("newer");
    drop(Store::create(&newer, Kind::Person, "N", T0).unwrap());
    {
        let db = redb::Database::open(newer.join(Store::FILE_NAME)).unwrap();
        let tx = db.begin_write().unwrap();
        let def: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("meta-1");
        tx.open_table(def)
            .unwrap()
            .insert("schema", &99u32.to_be_bytes()[..])
            .unwrap();
        tx.commit().unwrap();
    }
    let before = std::fs::read(newer.join(Store::FILE_NAME)).unwrap();
    let err = Store::open(&newer).unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::NewerSchema {
                found: 99,
                supported: 7,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("upgrade rapport"));
    assert!(
        std::fs::read(newer.join(Store::FILE_NAME)).unwrap() == before,
        "the newer store was changed"
    );
}

#[cfg(unix)]
#[test]
fn the_store_is_private_to_its_owner() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("node");
    let store = Store::create(&dir, Kind::Person, "A", T0).unwrap();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(store.path()), 0o600);
    assert_eq!(mode(&dir), 0o700);
}

#[test]
fn changes_are_durable_deduplicated_and_kept_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    let (header, all) = changes(5);
    {
        let store = Store::create(tmp.path(), Kind::Person, "A", T0).unwrap();
        assert_eq!(store.put_consent_changes(&header, &all[..3]).unwrap(), 3);
        assert_eq!(store.put_consent_changes(&header, &all).unwrap(), 2);
        assert_eq!(store.put_consent_changes(&header, &all).unwrap(), 0);
    }
    let store = Store::open(tmp.path()).unwrap();
    assert_eq!(store.consent_headers().unwrap(), vec![header]);
    let back = store.consent_changes(&header.doc_id()).unwrap();
    assert_eq!(back, all);
    let doc = store.load_consent(&header.doc_id()).unwrap();
    assert_eq!(doc.ledger().grants(u64::MAX).len(), 5);

    store
        .put_snapshot(&header.doc_id(), &doc.automerge().save())
        .unwrap();
    assert!(store.snapshot(&header.doc_id()).unwrap().is_some());
    assert!(store.delete_document(&header.doc_id()).unwrap());
    assert!(store.consent_headers().unwrap().is_empty());
    assert!(store.consent_changes(&header.doc_id()).unwrap().is_empty());
    assert!(store.snapshot(&header.doc_id()).unwrap().is_none());
    assert!(!store.delete_document(&header.doc_id()).unwrap());
    // After deletion the same changes can be stored again from scratch.
    assert_eq!(store.put_consent_changes(&header, &all).unwrap(), 5);
}

#[test]
fn a_schema_1_store_is_migrated_in_place_and_keeps_its_documents() {
    let tmp = tempfile::tempdir().unwrap();
    let (header, all) = changes(3);
    let identity = {
        let store = Store::create(tmp.path(), Kind::Person, "A", T0).unwrap();
        store.put_consent_changes(&header, &all).unwrap();
        store.profile().unwrap().identity
    };
    // Make it exactly what the previous release wrote: schema 1, without the new tables.
    {
        let db = redb::Database::open(tmp.path().join(Store::FILE_NAME)).unwrap();
        let tx = db.begin_write().unwrap();
        for name in ["peers-1", "peer-heads-1", "refusals-1"] {
            assert!(
                tx.delete_table(redb::TableDefinition::<&str, &[u8]>::new(name))
                    .unwrap()
            );
        }
        let meta: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("meta-1");
        tx.open_table(meta)
            .unwrap()
            .insert("schema", &1u32.to_be_bytes()[..])
            .unwrap();
        tx.commit().unwrap();
    }
    let store = Store::open(tmp.path()).unwrap();
    assert_eq!(store.schema_version().unwrap(), 7);
    assert_eq!(store.profile().unwrap().identity, identity);
    assert_eq!(store.consent_changes(&header.doc_id()).unwrap(), all);
    // The new tables work.
    store
        .put_peer(&identity, &["/ip4/127.0.0.1/tcp/1".into()], T0)
        .unwrap();
    assert_eq!(store.peers().unwrap().len(), 1);
    assert!(store.refusals(10).unwrap().is_empty());
    // Schema 3: content keys.
    let key = rapport_protocol::seal::ContentKey::from_bytes([9; 32]);
    store.put_epoch_key(&header.doc_id(), 0, &key).unwrap();
    assert_eq!(store.epoch_keys().unwrap().len(), 1);
    // Schema 4: what peers refused of ours, and each peer's conduct.
    assert!(
        store
            .peer_refused(&header.doc_id(), &identity)
            .unwrap()
            .is_empty()
    );
    let conduct = rapport_node::Conduct {
        since: T0,
        strikes: 2,
        banned_until: T0 + 60,
    };
    store.put_conduct(&identity, &conduct).unwrap();
    assert_eq!(store.conduct(&identity).unwrap(), Some(conduct));
    assert_eq!(store.bans(T0).unwrap(), vec![(identity, T0 + 60)]);
    // Schema 5: the migration indexed the consent document it found, so an engine knows
    // it (and its grants) without loading it.
    drop(store);
    let engine = rapport_node::Engine::open(Store::open(tmp.path()).unwrap()).unwrap();
    assert_eq!(engine.doc_count(), 1);
    assert_eq!(engine.loaded_docs(), 0, "nothing is loaded at start");
    assert!(!engine.grants(T0).is_empty());
}

/// Break 9: after "No space left on device" the store used to answer every later call with
/// redb's "Previous I/O error … re-open the database" until the node restarted. It must
/// recover by itself once space is free, and lose nothing it acknowledged.
#[test]
fn a_full_disk_fails_one_write_clearly_and_the_store_recovers_without_a_restart() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let tmp = tempfile::tempdir().unwrap();
    let (header, all) = changes(6);
    let doc = header.doc_id();
    drop(Store::create(tmp.path(), Kind::Person, "Alice", T0).unwrap());
    let full = Arc::new(AtomicBool::new(false));
    let path = tmp.path().join(Store::FILE_NAME);
    let store = common::full_disk_store(&path, &full);
    assert_eq!(store.put_consent_changes(&header, &all[..2]).unwrap(), 2);

    full.store(true, Ordering::SeqCst);
    let err = store.put_consent_changes(&header, &all[2..4]).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("No space left on device") || text.contains("full"),
        "the error should say the disk is full: {text}"
    );
    // While the disk is full a read answers with what was acknowledged, or with the same
    // clear error (redb's recovery on reopen needs to write).
    match store.consent_changes(&doc) {
        Ok(held) => assert_eq!(held, all[..2].to_vec()),
        Err(e) => assert!(e.to_string().contains("free space"), "{e}"),
    }

    full.store(false, Ordering::SeqCst);
    // Space is free again: the next write succeeds without restarting the node.
    assert_eq!(store.put_consent_changes(&header, &all[2..5]).unwrap(), 3);
    store
        .put_peer(&header.grantee, &["/ip4/127.0.0.1/tcp/1".into()], T0)
        .unwrap();
    assert_eq!(store.consent_changes(&doc).unwrap(), all[..5].to_vec());
    drop(store);

    // Everything acknowledged, before the failure and after, is in the file.
    let store = Store::open(tmp.path()).unwrap();
    assert_eq!(store.consent_changes(&doc).unwrap(), all[..5].to_vec());
    assert_eq!(store.peers().unwrap().len(), 1);
    assert_eq!(store.profile().unwrap().name, "Alice");
}

/// A group of writes is one transaction: its reads see its writes at once, the file is not
/// touched until the group ends, the end is one durable commit, and a crash before the end
/// keeps none of the group.
#[test]
fn a_group_is_one_transaction_committed_once_at_its_end() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let tmp = tempfile::tempdir().unwrap();
    let (header, all) = changes(6);
    let doc = header.doc_id();
    let peer = header.grantee;
    drop(Store::create(tmp.path(), Kind::Person, "Alice", T0).unwrap());
    let path = tmp.path().join(Store::FILE_NAME);
    let full = Arc::new(AtomicBool::new(false));
    let (store, writes) = common::full_disk_store_counted(&path, &full);
    assert_eq!(store.put_consent_changes(&header, &all[..1]).unwrap(), 1);

    let (synced, written) = (store.syncs(), writes.load(Ordering::SeqCst));
    store.begin_group();
    for i in 1..4 {
        // Begun again before it ends, the group goes on with what it wrote.
        store.begin_group();
        assert_eq!(
            store.put_consent_changes(&header, &all[i..i + 1]).unwrap(),
            1
        );
        // A read in the group sees what the group wrote so far.
        assert_eq!(store.consent_changes(&doc).unwrap(), all[..=i].to_vec());
    }
    store
        .put_peer(&peer, &["/ip4/127.0.0.1/tcp/1".into()], T0)
        .unwrap();
    assert_eq!(store.peers().unwrap().len(), 1);
    assert_eq!(
        writes.load(Ordering::SeqCst),
        written,
        "a group writes nothing to the file before it ends"
    );
    store.end_group().unwrap();
    assert_eq!(
        store.syncs(),
        synced + 1,
        "one durable commit for the group"
    );
    assert!(writes.load(Ordering::SeqCst) > written);

    // A crash in the middle of a group: the process dies before the group ends.
    store.begin_group();
    assert_eq!(store.put_consent_changes(&header, &all[4..]).unwrap(), 2);
    assert_eq!(store.consent_changes(&doc).unwrap(), all);
    // What a crash now leaves on disk: the file as it is (the group wrote nothing to it
    // yet), opened by a new process.
    let crashed = tmp.path().join("crashed");
    std::fs::create_dir(&crashed).unwrap();
    std::fs::copy(&path, crashed.join(Store::FILE_NAME)).unwrap();
    drop(store);
    let store = Store::open(&crashed).unwrap();
    assert_eq!(
        store.consent_changes(&doc).unwrap(),
        all[..4].to_vec(),
        "what the ended group wrote is there, what the unended one wrote is not"
    );
    assert_eq!(store.peers().unwrap().len(), 1);
}

/// One write that fails in a group loses the group: the group's earlier writes are not
/// made durable behind the failed one's back, every later call in the group fails, the end
/// says so, and the store works again in the next group.
#[test]
fn a_failed_write_in_a_group_loses_the_whole_group() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let tmp = tempfile::tempdir().unwrap();
    let (header, all) = changes(5);
    let doc = header.doc_id();
    drop(Store::create(tmp.path(), Kind::Person, "Alice", T0).unwrap());
    let path = tmp.path().join(Store::FILE_NAME);
    let full = Arc::new(AtomicBool::new(false));
    let store = common::full_disk_store(&path, &full);
    assert_eq!(store.put_consent_changes(&header, &all[..1]).unwrap(), 1);

    store.begin_group();
    assert_eq!(store.put_consent_changes(&header, &all[1..2]).unwrap(), 1);
    // The disk fills during the group, and a write too large for the file as it is fails
    // (the file cannot grow).
    full.store(true, Ordering::SeqCst);
    let big = rapport_node::Refusal {
        at: T0,
        peer: header.grantee,
        doc,
        change: String::new(),
        author: None,
        reason: "x".repeat(16 << 20),
        kind: None,
        entries: Vec::new(),
        signed_change: None,
    };
    let err = store
        .add_refusal(&big)
        .expect_err("a write that must grow a full disk's file fails");
    assert!(matches!(err, StoreError::Disk { .. }), "{err}");
    full.store(false, Ordering::SeqCst);
    // Space is free again, but the group is lost: a later write in it fails at once, and
    // so does its end.
    let err = store
        .put_consent_changes(&header, &all[2..3])
        .expect_err("the group is lost");
    assert!(matches!(err, StoreError::Disk { .. }), "{err}");
    let err = store.end_group().unwrap_err();
    assert!(matches!(err, StoreError::Disk { .. }), "{err}");
    assert_eq!(
        store.consent_changes(&doc).unwrap(),
        all[..1].to_vec(),
        "the write before the failed one is not in the store"
    );
    assert!(store.refusals(10).unwrap().is_empty());

    // Space is free: the next group works, and only what it wrote is added.
    store.begin_group();
    assert_eq!(store.put_consent_changes(&header, &all[1..3]).unwrap(), 2);
    store.end_group().unwrap();
    drop(store);
    let store = Store::open(tmp.path()).unwrap();
    assert_eq!(store.consent_changes(&doc).unwrap(), all[..3].to_vec());
}

/// Break 10: the relay's store holds its Ed25519 seed; no other local user may read it.
#[cfg(unix)]
#[test]
fn the_relay_store_is_private_to_its_owner() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("relay");
    let store = rapport_node::RelayStore::open(&dir).unwrap();
    store.secret_key().unwrap();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir.join(rapport_node::RELAY_DB)), 0o600, "relay.redb");
    assert_eq!(mode(&dir), 0o700, "the relay's data directory");
    drop(store);

    // A relay store made by an earlier release, readable by all, is made private on open.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(
        dir.join(rapport_node::RELAY_DB),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    drop(rapport_node::RelayStore::open(&dir).unwrap());
    assert_eq!(mode(&dir.join(rapport_node::RELAY_DB)), 0o600);
    assert_eq!(mode(&dir), 0o700);
}
