//! The heads a peer reports are hints of what it lacks (docs/protocol.md, "Sync"). A node
//! reads them back at once, stores them once it is idle or as it stops, and a crash that
//! loses them costs a round, never data.

mod common;

use common::{Side, T0, conversation, sorted_texts, sync};
use rapport_node::{Engine, EngineClient, Store};
use rapport_protocol::DocId;
use rapport_protocol::automerge::ChangeHash;
use rapport_protocol::replica::Holder;
use rapport_protocol::wire::DocRef;

/// What `side` holds of `id`: its heads, sorted.
fn heads_of(side: &Side, id: &DocId) -> Vec<ChangeHash> {
    sorted(Holder::doc(&*side.engine, id).unwrap().heads())
}

fn sorted(mut v: Vec<ChangeHash>) -> Vec<ChangeHash> {
    v.sort();
    v
}

/// What `side` recorded of `peer`'s heads of `id` (read as its sync reads them), sorted.
fn recorded(side: &Side, id: &DocId, peer: &Side) -> Option<Vec<ChangeHash>> {
    Holder::peer_heads(&*side.engine, id, &peer.me())
        .unwrap()
        .map(sorted)
}

/// What `store` holds of `peer`'s heads of `id`, sorted.
fn stored(store: &Store, id: &DocId, peer: &Side) -> Option<Vec<ChangeHash>> {
    store.peer_heads(id, &peer.me()).unwrap().map(sorted)
}

/// Alice and Acme, with a relationship Alice opened and wrote in, synced to Acme.
fn synced(now: u64) -> (Side, Side, DocRef) {
    let (mut alice, mut acme, rel, doc) = conversation(now);
    alice
        .engine
        .send_message(&rel, "hello".into(), None, None, now + 1)
        .unwrap();
    sync(&mut alice, &mut acme, &doc, now + 1);
    (alice, acme, doc)
}

#[test]
fn heads_a_peer_reports_are_read_at_once_and_stored_as_the_engine_closes() {
    let (alice, mut acme, doc) = synced(T0 + 10);
    let id = doc.doc_id();
    let heads = heads_of(&alice, &id);
    assert!(!heads.is_empty());
    // Acme recorded what Alice reported as they synced, and reads it back at once...
    assert_eq!(recorded(&acme, &id, &alice), Some(heads.clone()));
    // ...without having written it: a sync writes no hints as it goes.
    assert_eq!(stored(acme.engine.store(), &id, &alice), None);
    // Closing the engine stores them; a restart reads them.
    acme.reopen();
    assert_eq!(
        stored(acme.engine.store(), &id, &alice),
        Some(heads.clone())
    );
    assert_eq!(recorded(&acme, &id, &alice), Some(heads));
}

/// Asked every 10 ms (never idle long), and every 200 ms (idle in between), the engine
/// actor stores the heads while it runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_actor_stores_the_heads_while_it_runs_busy_or_idle() {
    for every in [10, 200] {
        let (alice, acme, doc) = synced(T0 + 10);
        let (id, me) = (doc.doc_id(), alice.me());
        let heads = heads_of(&alice, &id);
        let Side { dir, engine } = acme;
        let client = EngineClient::start(engine.0.unwrap()).unwrap();
        let mut stored = None;
        for _ in 0..(5_000 / every) {
            stored = client
                .call(move |e| e.store().peer_heads(&id, &me).unwrap().map(sorted))
                .await
                .unwrap();
            if stored.is_some() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(every)).await;
        }
        assert_eq!(stored, Some(heads.clone()), "asked every {every} ms");
        client.stop().await;
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(self::stored(&store, &id, &alice), Some(heads));
    }
}

/// A crash loses the heads not stored yet: the next sync finds what the peer lacks all
/// the same (a round more, no change lost).
#[test]
fn heads_lost_in_a_crash_cost_a_round_not_a_change() {
    let now = T0 + 10;
    let (mut alice, acme, doc) = synced(now);
    let id = doc.doc_id();
    // The crash: what is on Acme's disk now, opened by a new engine (the old one never
    // closes on it).
    let crashed = tempfile::tempdir().unwrap();
    std::fs::copy(
        acme.dir.path().join(Store::FILE_NAME),
        crashed.path().join(Store::FILE_NAME),
    )
    .unwrap();
    let mut acme = Side {
        engine: common::Slot(Some(
            Engine::open(Store::open(crashed.path()).unwrap()).unwrap(),
        )),
        dir: crashed,
    };
    assert_eq!(stored(acme.engine.store(), &id, &alice), None, "lost");
    assert_eq!(recorded(&acme, &id, &alice), None);
    let rel = id.to_hex();
    alice
        .engine
        .send_message(&rel, "still there?".into(), None, None, now + 5)
        .unwrap();
    acme.engine
        .send_message(&rel, "yes".into(), None, None, now + 5)
        .unwrap();
    sync(&mut alice, &mut acme, &doc, now + 5);
    sync(&mut acme, &mut alice, &doc, now + 5);
    assert_eq!(heads_of(&alice, &id), heads_of(&acme, &id), "one history");
    for side in [&alice, &acme] {
        let texts = sorted_texts(side, &rel, now + 6);
        assert_eq!(texts, ["hello", "still there?", "yes"]);
    }
}

/// A peer may report up to `MAX_HEADS` heads for each document it shares: what the engine
/// holds of them in memory stays small (past 1 MiB of heads they are stored at once).
#[test]
fn heads_a_peer_floods_are_stored_at_once_not_held() {
    let (alice, mut acme, _) = synced(T0 + 10);
    let many: Vec<ChangeHash> = (0..rapport_protocol::wire::MAX_HEADS)
        .map(|i| ChangeHash([(i % 251) as u8; 32]))
        .collect();
    // 1 MiB is 32 documents' worth of 1,024 heads; the 33rd goes past it.
    for d in 0..33u8 {
        Holder::put_peer_heads(&mut *acme.engine, &DocId([d; 32]), &alice.me(), &many).unwrap();
    }
    let first = acme
        .engine
        .store()
        .peer_heads(&DocId([0; 32]), &alice.me())
        .unwrap();
    assert_eq!(first.map(|h| h.len()), Some(many.len()), "stored, not held");
}

/// A full disk fails the storing of heads and nothing after it: the heads are dropped
/// (they are hints; trying again at every idle moment would fail again and again), and
/// once there is room the engine answers and the next write lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_only_the_heads_and_the_next_write_lands_once_there_is_room() {
    use std::sync::atomic::Ordering::SeqCst;
    let now = T0 + 10;
    let (alice, mut acme, doc) = synced(now);
    let id = doc.doc_id();
    let path = acme.dir.path().join(Store::FILE_NAME);
    acme.engine.0 = None;
    let full = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (store, _, refused) = common::full_disk_store_watched(&path, &full).unwrap();
    let mut engine = Engine::open(store).unwrap();
    // Just under 1 MiB of heads, held: storing them must grow the file, so the write
    // itself fails, not only its commit.
    let many: Vec<ChangeHash> = (0..rapport_protocol::wire::MAX_HEADS)
        .map(|i| ChangeHash([(i % 251) as u8; 32]))
        .collect();
    for d in 0..31u8 {
        Holder::put_peer_heads(&mut engine, &DocId([d; 32]), &alice.me(), &many).unwrap();
    }
    assert!(engine.has_hints());
    full.store(true, SeqCst);
    let client = EngineClient::start(engine).unwrap();
    // Left alone, the engine is idle and tries to store them: wait for the disk to refuse.
    let mut tried = false;
    for _ in 0..500 {
        tried = refused.load(SeqCst) > 0;
        if tried {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(tried, "the engine tried to store the heads");
    full.store(false, SeqCst);
    let held = client.call(|e| e.has_hints()).await.unwrap();
    assert!(!held, "the heads that could not be stored are dropped");
    let rel = id.to_hex();
    let sent = client
        .call(move |e| e.send_message(&rel, "after the disk".into(), None, None, now + 5))
        .await
        .unwrap();
    assert!(sent.is_ok(), "the next write lands: {:?}", sent.err());
    client.stop().await;
    let acme = Side {
        engine: common::Slot(Some(
            Engine::open(Store::open(acme.dir.path()).unwrap()).unwrap(),
        )),
        dir: acme.dir,
    };
    let texts = sorted_texts(&acme, &id.to_hex(), now + 6);
    assert!(texts.contains(&"after the disk".to_string()), "{texts:?}");
    for d in 0..31u8 {
        assert_eq!(stored(acme.engine.store(), &DocId([d; 32]), &alice), None);
    }
}
