//! Memory a stranger can make a node spend. This test binary counts every allocation of
//! the process (its own global allocator), starts a real node in it, and has strangers
//! announce huge sync frames they never send: the node must not reserve the announced
//! sizes up front.

use std::time::Duration;

use futures::StreamExt;
use libp2p::request_response;
use libp2p::swarm::SwarmEvent;
use libp2p::{StreamProtocol, Swarm};
use peak_alloc::PeakAlloc;
use rapport_protocol::wire::{MAX_WIRE_MESSAGE, SYNC_PROTOCOL};
use rapport_protocol::{Kind, SecretKey};
use rapport_tests::{TestNode, WAIT};

/// The system allocator, counting the bytes live now and the most ever live at once.
#[global_allocator]
static ALLOC: PeakAlloc = PeakAlloc;

/// What the stranger sends: a frame it leaves open (it never sends the rest nor closes),
/// or a whole frame.
enum Req {
    Hold(Vec<u8>),
    Whole(Vec<u8>),
}

#[derive(Clone, Default)]
struct StrangerCodec;

impl request_response::Codec for StrangerCodec {
    type Protocol = StreamProtocol;
    type Request = Req;
    type Response = Vec<u8>;

    async fn read_request<T: futures::AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        _: &mut T,
    ) -> std::io::Result<Req> {
        Err(std::io::Error::other("this client serves nothing"))
    }

    async fn read_response<T: futures::AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> std::io::Result<Vec<u8>> {
        use futures::AsyncReadExt;
        let mut buf = Vec::new();
        io.take(1 << 20).read_to_end(&mut buf).await?;
        Ok(buf)
    }

    async fn write_request<T: futures::AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Req,
    ) -> std::io::Result<()> {
        use futures::AsyncWriteExt;
        match req {
            Req::Hold(bytes) => {
                io.write_all(&bytes).await?;
                io.flush().await?;
                futures::future::pending::<()>().await;
                Ok(())
            }
            Req::Whole(bytes) => {
                io.write_all(&bytes).await?;
                io.close().await
            }
        }
    }

    async fn write_response<T: futures::AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        _: &mut T,
        _: Vec<u8>,
    ) -> std::io::Result<()> {
        Err(std::io::Error::other("this client serves nothing"))
    }
}

fn stranger(seed: u8) -> Swarm<request_response::Behaviour<StrangerCodec>> {
    rapport_tests::client_swarm(
        &SecretKey::from_seed([seed; 32]),
        SYNC_PROTOCOL,
        StrangerCodec,
        request_response::Config::default()
            .with_request_timeout(Duration::from_secs(300))
            .with_max_concurrent_streams(1000),
        Duration::from_secs(300),
    )
}

/// Strangers (fresh identities) each open many sync streams announcing a frame of the
/// largest size and send only a few bytes of it. The node must spend memory in proportion
/// to the bytes that arrived, not to the sizes announced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_announcing_huge_frames_cost_the_node_little_memory() {
    const STRANGERS: u8 = 3;
    const STREAMS: usize = 16;
    let alice = TestNode::new(Kind::Person, "Alice").await;
    let addr = alice.addrs[0].clone();
    let base = ALLOC.current_usage();
    ALLOC.reset_peak_usage();

    let mut tasks = Vec::new();
    let mut probes = Vec::new();
    for s in 0..STRANGERS {
        let addr = addr.clone();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        probes.push(done_rx);
        tasks.push(tokio::spawn(async move {
            let mut swarm = stranger(100 + s);
            swarm.dial(addr).unwrap();
            let peer = loop {
                if let SwarmEvent::ConnectionEstablished { peer_id, .. } =
                    swarm.select_next_some().await
                {
                    break peer_id;
                }
            };
            let mut head = (MAX_WIRE_MESSAGE as u32).to_be_bytes().to_vec();
            head.extend_from_slice(b"a few bytes only");
            for _ in 0..STREAMS {
                swarm
                    .behaviour_mut()
                    .send_request(&peer, Req::Hold(head.clone()));
            }
            // A whole (undecodable) frame after them: once the node has dealt with it, it
            // has read the beginnings sent before it on the same connection.
            let mut probe = 8u32.to_be_bytes().to_vec();
            probe.extend_from_slice(b"nonsense");
            let probe_id = swarm.behaviour_mut().send_request(&peer, Req::Whole(probe));
            let mut done_tx = Some(done_tx);
            loop {
                match swarm.select_next_some().await {
                    SwarmEvent::Behaviour(request_response::Event::Message {
                        message: request_response::Message::Response { request_id, .. },
                        ..
                    })
                    | SwarmEvent::Behaviour(request_response::Event::OutboundFailure {
                        request_id,
                        ..
                    }) if request_id == probe_id => {
                        if let Some(tx) = done_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    _ => {}
                }
            }
        }));
    }
    for p in probes {
        tokio::time::timeout(WAIT, p)
            .await
            .expect("the node dealt with the stranger's probe")
            .expect("the stranger's task runs");
    }
    let peak = ALLOC.peak_usage().saturating_sub(base);
    let announced = usize::from(STRANGERS) * STREAMS * MAX_WIRE_MESSAGE;
    for t in tasks {
        t.abort();
    }
    println!(
        "peak allocation growth {} KiB for {} MiB announced",
        peak / 1024,
        announced >> 20
    );
    assert!(
        peak < 64 << 20,
        "the node allocated {} MiB at peak for strangers who announced {} MiB and sent a few bytes",
        peak >> 20,
        announced >> 20
    );
    alice.stop().await;
}
