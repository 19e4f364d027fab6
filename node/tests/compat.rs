//! Stores written by an earlier release open, read and keep working.
//!
//! The files in `fixtures/v0.1-schema4/` were written by the `rapport` binary built from
//! commit 55ef7f4 (store schema 4), through its CLI, by two real nodes on loopback (see
//! `fixtures/v0.1-schema4/README.md`). They are never regenerated: a later release must
//! open exactly these bytes.

mod common;

use std::path::Path;

use rapport_node::{Engine, Store};
use rapport_protocol::IdentityKey;

const ALICE: &str = "12D3KooWLvgQn18j1VJXEaBwEtn2R3HzUcvRuE1yXUZFkMkg8naG";
const ACME: &str = "12D3KooWAqDS7wfsdGLrwku5LwcZCSMjzqvsJcGDhd7yZC5Dms7c";
const REL: &str = "598da99255d2821ba270180410b5f5db604ca6effe2f324ec599bfd87d39d05a";
const GRANT: &str = "e72ba71f2c048ccdf7dad7e2cb0e45d076bd566adb3761ab51e025f042262566";
/// A time after the fixture was written.
const LATER: u64 = 1_800_000_000;

/// A copy of one fixture store in a fresh data directory (the fixture itself stays as it is).
fn copy_of(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let from = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/v0.1-schema4")
        .join(format!("{name}.redb"));
    std::fs::copy(&from, dir.path().join(Store::FILE_NAME)).unwrap();
    dir
}

fn texts(engine: &Engine) -> Vec<String> {
    let mut t: Vec<String> = engine
        .relationship(REL, LATER)
        .unwrap()
        .messages
        .into_iter()
        .map(|m| m.text)
        .collect();
    t.sort();
    t
}

#[test]
fn the_customers_store_from_the_last_release_opens_with_its_consent_and_conversation() {
    let dir = copy_of("alice");
    let engine = Engine::open(Store::open(dir.path()).unwrap()).unwrap();
    assert_eq!(engine.me().to_string(), ALICE);
    assert_eq!(engine.profile().name, "Alice");

    let grants = engine.grants(LATER);
    assert_eq!(grants.len(), 1);
    assert_eq!(grants[0].grant.to_string(), GRANT);
    assert_eq!(grants[0].peer.to_string(), ACME);
    assert_eq!(grants[0].status, "active");
    assert_eq!(
        grants[0].scopes,
        ["conversation:read", "conversation:write", "contact:support"]
    );

    let rels = engine.relationships().unwrap();
    assert_eq!(rels.len(), 1);
    assert_eq!(rels[0].id.to_string(), REL);
    assert!(rels[0].mine);
    // Acme's marketing message was refused and is kept as evidence, not in the thread.
    assert_eq!(
        texts(&engine),
        [
            "Hello Acme, my order 1042 has not arrived.",
            "Sorry Alice, it ships tomorrow.",
            "Thanks."
        ]
    );
    let refusals = engine.refusals(10).unwrap();
    assert_eq!(refusals.len(), 1);
    assert!(
        refusals[0].reason.contains("marketing"),
        "{:?}",
        refusals[0]
    );
    assert_eq!(engine.ledger_files().len(), 1);
}

#[test]
fn the_companys_store_from_the_last_release_opens_and_keeps_its_refused_message() {
    let dir = copy_of("acme");
    let engine = Engine::open(Store::open(dir.path()).unwrap()).unwrap();
    assert_eq!(engine.me().to_string(), ACME);
    let grants = engine.grants(LATER);
    assert_eq!(grants.len(), 1);
    assert_eq!(grants[0].status, "active");
    assert_eq!(grants[0].peer.to_string(), ALICE);
    let rels = engine.relationships().unwrap();
    assert_eq!(rels.len(), 1);
    assert!(!rels[0].mine);
    // The company keeps what it wrote, the refused marketing message included.
    assert_eq!(
        texts(&engine),
        [
            "Hello Acme, my order 1042 has not arrived.",
            "Our spring sale starts Monday!",
            "Sorry Alice, it ships tomorrow.",
            "Thanks."
        ]
    );
    let alice: IdentityKey = ALICE.parse().unwrap();
    assert!(!engine.shared_with(&alice, LATER).is_empty());
}

#[test]
fn an_old_store_takes_new_writes_that_survive_a_reopen() {
    let dir = copy_of("alice");
    {
        let mut engine = Engine::open(Store::open(dir.path()).unwrap()).unwrap();
        engine
            .send_message(REL, "Still waiting.".into(), None, None, LATER)
            .unwrap();
    }
    let engine = Engine::open(Store::open(dir.path()).unwrap()).unwrap();
    assert!(texts(&engine).contains(&"Still waiting.".to_owned()));
    assert!(engine.store().schema_version().unwrap() >= 4);
    drop(engine);
    // The migration to schema 7 dropped the hash index of schemas 1 to 6; the changes
    // themselves are all there (read back above).
    use redb::ReadableDatabase as _;
    let db = redb::ReadOnlyDatabase::open(dir.path().join(Store::FILE_NAME)).unwrap();
    let tables: Vec<String> = db
        .begin_read()
        .unwrap()
        .list_tables()
        .unwrap()
        .map(|t| redb::TableHandle::name(&t).to_owned())
        .collect();
    assert!(tables.contains(&"changes-1".to_owned()), "{tables:?}");
    assert!(!tables.contains(&"change-index-1".to_owned()), "{tables:?}");
}

/// The migration to the current schema (which deletes the change index) runs in one
/// transaction: on a full disk the store fails to open, saying why, and its file is left
/// exactly as the last release wrote it; once there is room it opens, migrated, with
/// everything it held.
#[test]
fn a_migration_on_a_full_disk_changes_nothing_and_runs_once_there_is_room() {
    let dir = copy_of("alice");
    let path = dir.path().join(Store::FILE_NAME);
    let before = std::fs::read(&path).unwrap();
    let full = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let Err(err) = common::try_full_disk_store(&path, &full) else {
        panic!("the store opened on a full disk");
    };
    assert!(err.to_string().contains("No space left"), "{err}");
    assert!(
        std::fs::read(&path).unwrap() == before,
        "the file was changed"
    );

    full.store(false, std::sync::atomic::Ordering::SeqCst);
    let engine = Engine::open(common::full_disk_store(&path, &full)).unwrap();
    assert_eq!(engine.store().schema_version().unwrap(), 7);
    assert!(texts(&engine).len() >= 2, "{:?}", texts(&engine));
}
