//! The engine actor: operations queued together become durable with one sync, none answers
//! before it is durable, and a group whose sync fails reports the failure to every
//! operation in it and leaves nothing of them in memory.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rapport_node::{Engine, EngineClient, EngineError, Store, StoreError};
use rapport_protocol::{Kind, SecretKey};

const T0: u64 = 1_800_000_000;

/// Waits (at most 30 s) until `n` operations wait in the actor's queue.
async fn until_queued(client: &EngineClient, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while client.queued() < n {
        assert!(
            Instant::now() < deadline,
            "{n} operations were never queued"
        );
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(5)).await; // backoff between polls
    }
}

/// Occupies the actor until the returned sender is dropped, so that what is queued
/// meanwhile runs as one group.
async fn hold(client: &EngineClient) -> (std::sync::mpsc::Sender<()>, tokio::task::JoinHandle<()>) {
    let (release, wait) = std::sync::mpsc::channel::<()>();
    let (started_tx, started) = tokio::sync::oneshot::channel();
    let c = client.clone();
    let task = tokio::spawn(async move {
        // What is queued while it runs joins its group, so it shares their outcome.
        let _ = c
            .call(move |_| {
                let _ = started_tx.send(());
                let _ = wait.recv();
            })
            .await;
    });
    started.await.unwrap();
    (release, task)
}

/// `n` grants, each to a new grantee, queued at once.
fn grants(client: &EngineClient, n: u8) -> Vec<tokio::task::JoinHandle<Result<(), EngineError>>> {
    (0..n)
        .map(|i| {
            let c = client.clone();
            tokio::spawn(async move {
                let grantee = SecretKey::from_seed([i + 1; 32]).identity();
                c.try_call(move |e| {
                    e.grant(
                        common::grant_args(grantee, &["contact:support"], "support"),
                        T0,
                    )
                    .map(drop)
                })
                .await
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_queued_together_share_one_sync_and_answer_after_it() {
    let dir = tempfile::tempdir().unwrap();
    drop(Store::create(dir.path(), Kind::Person, "Alice", T0).unwrap());
    let client =
        EngineClient::start(Engine::open(Store::open(dir.path()).unwrap()).unwrap()).unwrap();
    let before = client.call(|e| e.store().syncs()).await.unwrap();

    let (release, held) = hold(&client).await;
    let writes = grants(&client, 100);
    until_queued(&client, 100).await;
    drop(release);
    held.await.unwrap();
    for w in writes {
        w.await.unwrap().unwrap();
    }

    let (syncs, count) = client
        .call(|e| (e.store().syncs(), e.grants(T0).len()))
        .await
        .unwrap();
    assert_eq!(count, 100);
    assert_eq!(
        syncs - before,
        1,
        "100 grants queued together take one sync"
    );

    // Every grant acknowledged is in the file.
    client.stop().await;
    let engine = Engine::open(Store::open(dir.path()).unwrap()).unwrap();
    assert_eq!(engine.grants(T0).len(), 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_whose_sync_fails_fails_every_write_in_it_and_keeps_none_in_memory() {
    let dir = tempfile::tempdir().unwrap();
    drop(Store::create(dir.path(), Kind::Person, "Alice", T0).unwrap());
    let full = Arc::new(AtomicBool::new(false));
    let store = common::full_disk_store(&dir.path().join(Store::FILE_NAME), &full);
    let client = EngineClient::start(Engine::open(store).unwrap()).unwrap();

    let (release, held) = hold(&client).await;
    let writes = grants(&client, 10);
    until_queued(&client, 10).await;
    full.store(true, Ordering::SeqCst);
    drop(release);
    held.await.unwrap();
    for w in writes {
        match w.await.unwrap() {
            Err(EngineError::Store(StoreError::Disk { .. })) => {}
            other => panic!("a write whose group was not made durable must fail: {other:?}"),
        }
    }
    full.store(false, Ordering::SeqCst);

    // Memory holds what the store holds: none of the failed grants.
    assert_eq!(client.call(|e| e.grants(T0).len()).await.unwrap(), 0);
    // And the store works again without a restart.
    let again = grants(&client, 1);
    for w in again {
        w.await.unwrap().unwrap();
    }
    client.stop().await;
    let engine = Engine::open(Store::open(dir.path()).unwrap()).unwrap();
    assert_eq!(engine.grants(T0).len(), 1);
}

#[tokio::test]
async fn a_stopped_engine_refuses_work_and_releases_its_store() {
    let dir = tempfile::tempdir().unwrap();
    drop(Store::create(dir.path(), Kind::Person, "Alice", T0).unwrap());
    let client =
        EngineClient::start(Engine::open(Store::open(dir.path()).unwrap()).unwrap()).unwrap();
    client.stop().await;
    assert!(matches!(
        client.call(|e| e.me()).await,
        Err(EngineError::Stopped)
    ));
    // The store file is closed: it opens again at once.
    Store::open(dir.path()).unwrap();
}
