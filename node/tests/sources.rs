//! The node reads time and randomness from one place, its `Sources`: a test sets the
//! clock instead of sleeping, and a seeded source makes the engine's choices repeatable.

mod common;

use std::sync::Arc;

use rapport_node::clock::{Clock, ManualClock, SeededEntropy, Sources};
use rapport_node::{Engine, Node, NodeConfig, Store};
use rapport_protocol::{Kind, SecretKey};

const T0: u64 = 1_800_000_000;

#[tokio::test]
async fn a_running_node_tells_time_by_its_clock_and_a_grant_expires_when_it_moves() {
    let dir = tempfile::tempdir().unwrap();
    drop(Store::create(dir.path(), Kind::Person, "Alice", T0).unwrap());
    let clock = Arc::new(ManualClock::at(T0));
    let sources = Sources {
        clock: clock.clone(),
        entropy: Arc::new(SeededEntropy::new([3; 32])),
    };
    let node = Node::start_with(NodeConfig::loopback(dir.path()), sources)
        .await
        .unwrap();
    let h = node.handle();
    assert_eq!(h.query(Engine::now).await.unwrap(), T0);

    let grantee = SecretKey::from_seed([9; 32]).identity();
    let mut args = common::grant_args(grantee, &["contact:support"], "support");
    args.expires = Some(T0 + 100);
    h.write(std::time::Duration::ZERO, move |e| e.grant(args, e.now()))
        .await
        .unwrap();
    let status = |h: rapport_node::NodeHandle| async move {
        h.query(|e| e.grants(e.now())[0].status.clone())
            .await
            .unwrap()
    };
    assert_eq!(status(h.clone()).await, "pending");
    clock.advance(101);
    assert_eq!(clock.now(), T0 + 101);
    assert_eq!(status(h.clone()).await, "expired");
    node.shutdown().await;
}

#[test]
fn the_same_seed_gives_the_same_relationship_id() {
    let dir = tempfile::tempdir().unwrap();
    drop(Store::create(dir.path(), Kind::Person, "Alice", T0).unwrap());
    let file = dir.path().join(Store::FILE_NAME);
    let pristine = std::fs::read(&file).unwrap();
    let peer = SecretKey::from_seed([5; 32]).identity();
    let open_with_seed = |seed: [u8; 32]| {
        std::fs::write(&file, &pristine).unwrap();
        let mut engine = Engine::open(Store::open(dir.path()).unwrap()).unwrap();
        engine
            .set_sources(Sources {
                entropy: Arc::new(SeededEntropy::new(seed)),
                ..Sources::system()
            })
            .unwrap();
        engine.open_relationship(peer, None, None, T0).unwrap();
        engine.relationships().unwrap()[0].id
    };
    let a = open_with_seed([1; 32]);
    assert_eq!(open_with_seed([1; 32]), a);
    assert_ne!(open_with_seed([2; 32]), a);
}
