//! A company's node shares documents with thousands of customers, most of them offline at
//! any moment. Its redial sweep must not spend the node on them: a peer whose dial failed
//! is tried less and less often, and a DHT with no peers is not asked.

mod common;

use std::time::{Duration, Instant};

use rapport_node::{Engine, Node, NodeConfig, Store};
use rapport_protocol::{Kind, SecretKey};
use std::sync::atomic::Ordering;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_peer_is_dialled_less_and_less_often() {
    let dir = tempfile::tempdir().unwrap();
    let now = rapport_node::now();
    drop(Store::create(dir.path(), Kind::Person, "Alice", now).unwrap());
    {
        // A company this customer granted consent to, and knows no address of.
        let mut engine = Engine::open(Store::open(dir.path()).unwrap()).unwrap();
        let company = SecretKey::from_seed([7; 32]).identity();
        engine
            .grant(
                common::grant_args(company, &["contact:support"], "support"),
                now,
            )
            .unwrap();
    }
    let mut config = NodeConfig::loopback(dir.path());
    config.net.redial_every = Duration::from_millis(20);
    let node = Node::start(config).await.unwrap();
    let h = node.handle();
    let stats = h.net().stats();

    let sweeps = 60;
    let deadline = Instant::now() + Duration::from_secs(120);
    while stats.sweeps.load(Ordering::Relaxed) < sweeps {
        assert!(Instant::now() < deadline, "{sweeps} sweeps never ran");
        tokio::time::sleep(Duration::from_millis(20)).await; // backoff between polls
    }
    let dials = stats.dials.load(Ordering::Relaxed);
    let lookups = stats.lookups.load(Ordering::Relaxed);
    node.shutdown().await;
    assert!(dials >= 1, "the sweep dials an offline counterpart");
    // Waits of 20 ms, 40 ms, 80 ms, …: over 60 sweeps of 20 ms or more, a handful of dials
    // (one per sweep without the back-off).
    assert!(
        dials <= 15,
        "an unreachable peer was dialled {dials} times in {sweeps} sweeps"
    );
    assert_eq!(lookups, 0, "a DHT that knows no peer is not asked");
}
