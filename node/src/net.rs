//! The network: one event loop owns the libp2p swarm; the rest of the node talks to it with
//! [`NetClient`] over a channel. The loop runs sync sessions (rounds of the sync protocol
//! per peer and document), answers peers' requests through the engine, keeps peers'
//! addresses in the store and redials the peers it shares documents with.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::prelude::*;
use libp2p::core::ConnectedPoint;
use libp2p::kad::{self, store::MemoryStore};
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport, ResponseChannel};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent, behaviour::toggle::Toggle, dial_opts::DialOpts};
use libp2p::{Multiaddr, PeerId, StreamProtocol, Swarm, identify, mdns, noise, ping, tcp, yamux};
use rapport_protocol::automerge::ChangeHash;
use rapport_protocol::wire::{DocRef, MAX_WIRE_MESSAGE, SYNC_PROTOCOL, SyncRequest, SyncResponse};
use rapport_protocol::{DocId, IdentityKey, SecretKey};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::engine::{Engine, Push, RoundOutcome};
use crate::views::Event;

/// How long a connection with no open stream stays up. Long, on purpose: a conversation
/// pauses, and the customer's node must reach its companies at once when it writes.
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// How long one sync request may take before it counts as failed.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// The most rounds one sync session may run.
pub(crate) const MAX_ROUNDS: u32 = 10_000;
/// How often the node redials peers it shares documents with.
pub(crate) const REDIAL_EVERY: Duration = Duration::from_secs(20);
/// How long a peer that passed the misbehaviour limit stays disconnected.
pub(crate) const BAN_FOR: Duration = Duration::from_secs(300);
/// Sync sessions run at once with one peer; more wait in a queue.
pub(crate) const MAX_SESSIONS_PER_PEER: usize = 16;
/// Undecodable requests a peer may send before it is disconnected.
pub(crate) const MAX_BAD_REQUESTS: u32 = 16;

/// What the engine is shared as: one writer at a time, on blocking threads.
pub type SharedEngine = Arc<Mutex<Engine>>;

/// Bytes of sync messages sent and received, for benchmarks and `rapport peers`.
#[derive(Debug, Default)]
pub struct WireStats {
    /// Bytes written, framing included.
    pub sent: AtomicU64,
    /// Bytes read, framing included.
    pub received: AtomicU64,
}

/// The codec of the sync protocol: a 4-byte big-endian length, then the message
/// ([`rapport_protocol::wire`]). Lengths over [`MAX_WIRE_MESSAGE`] are refused before
/// reading.
#[derive(Clone, Default)]
pub struct SyncCodec {
    stats: Arc<WireStats>,
}

async fn read_frame<T: AsyncRead + Unpin + Send>(
    io: &mut T,
    stats: &WireStats,
) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_WIRE_MESSAGE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("sync message of {len} bytes is over the limit of {MAX_WIRE_MESSAGE}"),
        ));
    }
    let mut buf = vec![0u8; len];
    io.read_exact(&mut buf).await?;
    stats.received.fetch_add(len as u64 + 4, Ordering::Relaxed);
    Ok(buf)
}

async fn write_frame<T: AsyncWrite + Unpin + Send>(
    io: &mut T,
    bytes: Vec<u8>,
    stats: &WireStats,
) -> io::Result<()> {
    let len = u32::try_from(bytes.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "message too large"))?;
    io.write_all(&len.to_be_bytes()).await?;
    io.write_all(&bytes).await?;
    io.close().await?;
    stats
        .sent
        .fetch_add(bytes.len() as u64 + 4, Ordering::Relaxed);
    Ok(())
}

fn invalid(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

impl request_response::Codec for SyncCodec {
    type Protocol = StreamProtocol;
    type Request = SyncRequest;
    type Response = SyncResponse;

    async fn read_request<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<SyncRequest> {
        let bytes = read_frame(io, &self.stats).await?;
        SyncRequest::decode(&bytes).map_err(invalid)
    }

    async fn read_response<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<SyncResponse> {
        let bytes = read_frame(io, &self.stats).await?;
        SyncResponse::decode(&bytes).map_err(invalid)
    }

    async fn write_request<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: SyncRequest,
    ) -> io::Result<()> {
        write_frame(io, req.encode(), &self.stats).await
    }

    async fn write_response<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: SyncResponse,
    ) -> io::Result<()> {
        write_frame(io, res.encode(), &self.stats).await
    }
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    kad: kad::Behaviour<MemoryStore>,
    mdns: Toggle<mdns::tokio::Behaviour>,
    sync: request_response::Behaviour<SyncCodec>,
}

/// How the network is set up.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// Addresses to listen on (TCP and/or QUIC multiaddrs).
    pub listen: Vec<Multiaddr>,
    /// Peers to dial at start (with `/p2p/<id>` they also seed Kademlia).
    pub bootstrap: Vec<Multiaddr>,
    /// Discover peers on the local network.
    pub mdns: bool,
}

/// How a sync with a peer ended, as told to whoever asked for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", content = "detail", rename_all = "snake_case")]
pub enum SyncResult {
    /// Both sides hold the same changes.
    Delivered,
    /// The peer refused (with its reasons).
    Refused(String),
    /// The peer could not be reached now; the document syncs when it connects.
    Offline(String),
    /// This node does not share the document with the peer now (no access, or not held).
    NotShared,
}

/// A connected peer, as listed by `rapport peers`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerInfo {
    /// The peer's identity.
    pub peer: String,
    /// Connected now.
    pub connected: bool,
    /// Addresses known.
    pub addrs: Vec<String>,
    /// The peer's agent string, from identify.
    pub agent: Option<String>,
    /// The last ping round trip, in milliseconds.
    pub rtt_ms: Option<u64>,
}

/// A session waiting for a free slot: the document and who wants to hear how it ended.
type Queued = (DocRef, Vec<oneshot::Sender<SyncResult>>);

/// A sync waiting for a connection: the document and who wants to hear how it ended.
type Waiting = (DocRef, Option<oneshot::Sender<SyncResult>>);

// Channel messages, moved once each; identities are large (a decompressed key), boxing them
// buys nothing here.
#[allow(clippy::large_enum_variant)]
enum Command {
    Sync {
        peer: IdentityKey,
        doc: DocRef,
        reply: Option<oneshot::Sender<SyncResult>>,
    },
    Dial {
        addr: Multiaddr,
        reply: oneshot::Sender<Result<String, String>>,
    },
    Peers {
        reply: oneshot::Sender<Vec<PeerInfo>>,
    },
    Listening {
        reply: oneshot::Sender<Vec<Multiaddr>>,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
    },
}

#[allow(clippy::large_enum_variant)]
enum Internal {
    Send {
        peer: PeerId,
        doc: DocRef,
        req: Option<SyncRequest>,
    },
    Respond {
        peer: PeerId,
        channel: ResponseChannel<SyncResponse>,
        resp: SyncResponse,
        disconnect: bool,
    },
    RoundDone {
        peer: PeerId,
        doc: DocId,
        outcome: Result<RoundOutcome, String>,
    },
    Pushes(Vec<Push>),
}

/// A handle on the network loop. Cheap to clone.
#[derive(Clone)]
pub struct NetClient {
    tx: mpsc::Sender<Command>,
    stats: Arc<WireStats>,
}

impl NetClient {
    /// Syncs `doc` with `peer` and waits (up to `wait`) for the session to end.
    pub async fn sync(&self, peer: IdentityKey, doc: DocRef, wait: Duration) -> SyncResult {
        let (reply, rx) = oneshot::channel();
        if self
            .tx
            .send(Command::Sync {
                peer,
                doc,
                reply: Some(reply),
            })
            .await
            .is_err()
        {
            return SyncResult::Offline("the node is shutting down".into());
        }
        match tokio::time::timeout(wait, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => SyncResult::Offline("the sync was dropped".into()),
            Err(_) => SyncResult::Offline(format!(
                "no answer within {}s; it keeps syncing in the background",
                wait.as_secs()
            )),
        }
    }

    /// Asks for pushes without waiting for them.
    pub async fn push(&self, pushes: Vec<Push>) {
        for (peer, doc) in pushes {
            let _ = self
                .tx
                .send(Command::Sync {
                    peer,
                    doc,
                    reply: None,
                })
                .await;
        }
    }

    /// Dials an address; returns the peer's identity once connected.
    pub async fn dial(&self, addr: Multiaddr) -> Result<String, String> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Dial { addr, reply })
            .await
            .map_err(|_| "the node is shutting down".to_string())?;
        match tokio::time::timeout(Duration::from_secs(20), rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err("the dial was dropped".into()),
            Err(_) => Err("no connection within 20s".into()),
        }
    }

    /// Known and connected peers.
    pub async fn peers(&self) -> Vec<PeerInfo> {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Command::Peers { reply }).await.is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }

    /// The addresses the node listens on.
    pub async fn listening(&self) -> Vec<Multiaddr> {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Command::Listening { reply }).await.is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }

    /// Stops the loop; returns once it has stopped.
    pub async fn shutdown(&self) {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Command::Shutdown { reply }).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// Sync traffic so far.
    pub fn stats(&self) -> &WireStats {
        &self.stats
    }
}

struct Session {
    doc: DocRef,
    rounds: u32,
    again: bool,
    refused: Vec<String>,
    waiters: Vec<oneshot::Sender<SyncResult>>,
}

struct Loop {
    swarm: Swarm<Behaviour>,
    engine: SharedEngine,
    events: tokio::sync::broadcast::Sender<Event>,
    internal_tx: mpsc::UnboundedSender<Internal>,
    sessions: HashMap<(PeerId, DocId), Session>,
    requests: HashMap<OutboundRequestId, (PeerId, DocRef, Vec<ChangeHash>)>,
    /// Syncs waiting for a connection to the peer.
    waiting: HashMap<PeerId, Vec<Waiting>>,
    /// Sessions waiting for a free slot with a connected peer.
    queued: HashMap<PeerId, VecDeque<Queued>>,
    dials: HashMap<PeerId, Vec<oneshot::Sender<Result<String, String>>>>,
    addr_dials: Vec<(Multiaddr, oneshot::Sender<Result<String, String>>)>,
    banned: HashMap<PeerId, Instant>,
    bad_requests: HashMap<PeerId, u32>,
    agents: HashMap<PeerId, String>,
    rtts: HashMap<PeerId, Duration>,
    listening: Vec<Multiaddr>,
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn identity_of(peer: &PeerId) -> Option<IdentityKey> {
    IdentityKey::from_peer_id_bytes(&peer.to_bytes()).ok()
}

fn peer_of(id: &IdentityKey) -> PeerId {
    PeerId::from_bytes(&id.peer_id_bytes()).expect("an Ed25519 identity is a PeerId")
}

/// Whether an address is worth remembering for redialling (not a loopback or unspecified
/// address seen from the listening side, which names an ephemeral port).
fn dialable(addr: &Multiaddr) -> bool {
    !addr.iter().any(|p| {
        matches!(p, libp2p::multiaddr::Protocol::Ip4(ip) if ip.is_unspecified())
            || matches!(p, libp2p::multiaddr::Protocol::Ip6(ip) if ip.is_unspecified())
    })
}

/// Starts the network loop on the current tokio runtime.
pub(crate) fn start(
    key: &SecretKey,
    engine: SharedEngine,
    config: NetConfig,
) -> Result<(NetClient, tokio::task::JoinHandle<()>), String> {
    let keypair = libp2p::identity::Keypair::ed25519_from_bytes(key.to_seed())
        .map_err(|e| format!("the node key is not usable by libp2p: {e}"))?;
    let stats = Arc::new(WireStats::default());
    let codec = SyncCodec {
        stats: stats.clone(),
    };
    let mdns_on = config.mdns;
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|e| format!("TCP transport: {e}"))?
        .with_quic()
        .with_behaviour(|key| {
            let peer_id = key.public().to_peer_id();
            let mut kad_config = kad::Config::new(StreamProtocol::new("/rapport/kad/1.0.0"));
            kad_config.set_query_timeout(Duration::from_secs(30));
            let mut kad =
                kad::Behaviour::with_config(peer_id, MemoryStore::new(peer_id), kad_config);
            kad.set_mode(Some(kad::Mode::Server));
            let mdns = if mdns_on {
                match mdns::tokio::Behaviour::new(mdns::Config::default(), peer_id) {
                    Ok(m) => Some(m),
                    Err(e) => {
                        tracing::warn!("mDNS is off: {e}");
                        None
                    }
                }
            } else {
                None
            };
            Behaviour {
                identify: identify::Behaviour::new(
                    identify::Config::new("/rapport/1.0.0".into(), key.public())
                        .with_agent_version(format!("rapport/{}", env!("CARGO_PKG_VERSION"))),
                ),
                ping: ping::Behaviour::new(ping::Config::new()),
                kad,
                mdns: Toggle::from(mdns),
                sync: request_response::Behaviour::with_codec(
                    codec,
                    [(StreamProtocol::new(SYNC_PROTOCOL), ProtocolSupport::Full)],
                    request_response::Config::default()
                        .with_request_timeout(REQUEST_TIMEOUT)
                        .with_max_concurrent_streams(256),
                ),
            }
        })
        .map_err(|e| format!("behaviour: {e}"))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(IDLE_TIMEOUT))
        .build();
    for addr in &config.listen {
        swarm
            .listen_on(addr.clone())
            .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    }
    // Known peers' addresses seed Kademlia, so dialling a peer by identity finds them.
    let known = engine
        .lock()
        .map_err(|_| "engine lock poisoned".to_string())?
        .store()
        .peers()
        .map_err(|e| e.to_string())?;
    for (id, rec) in known {
        for a in rec.addrs {
            if let Ok(addr) = a.parse::<Multiaddr>() {
                swarm.behaviour_mut().kad.add_address(&peer_of(&id), addr);
            }
        }
    }
    for addr in &config.bootstrap {
        if let Some(libp2p::multiaddr::Protocol::P2p(peer)) = addr.iter().last() {
            swarm.behaviour_mut().kad.add_address(&peer, addr.clone());
        }
        if let Err(e) = swarm.dial(addr.clone()) {
            tracing::warn!("cannot dial bootstrap {addr}: {e}");
        }
    }
    let events = engine
        .lock()
        .map_err(|_| "engine lock poisoned".to_string())?
        .event_sender();
    let (tx, rx) = mpsc::channel(1024);
    let (internal_tx, internal_rx) = mpsc::unbounded_channel();
    let lp = Loop {
        swarm,
        engine,
        events,
        internal_tx,
        sessions: HashMap::new(),
        requests: HashMap::new(),
        waiting: HashMap::new(),
        queued: HashMap::new(),
        dials: HashMap::new(),
        addr_dials: Vec::new(),
        banned: HashMap::new(),
        bad_requests: HashMap::new(),
        agents: HashMap::new(),
        rtts: HashMap::new(),
        listening: Vec::new(),
    };
    let handle = tokio::spawn(lp.run(rx, internal_rx));
    Ok((NetClient { tx, stats }, handle))
}

impl Loop {
    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut internal: mpsc::UnboundedReceiver<Internal>,
    ) {
        let mut redial = tokio::time::interval(REDIAL_EVERY);
        loop {
            tokio::select! {
                cmd = commands.recv() => match cmd {
                    Some(Command::Shutdown { reply }) => {
                        self.finish_all();
                        let _ = reply.send(());
                        return;
                    }
                    Some(cmd) => self.command(cmd),
                    None => {
                        self.finish_all();
                        return;
                    }
                },
                Some(msg) = internal.recv() => self.internal(msg),
                event = self.swarm.select_next_some() => self.swarm_event(event),
                _ = redial.tick() => self.redial(),
            }
        }
    }

    fn finish_all(&mut self) {
        for (_, s) in self.sessions.drain() {
            for w in s.waiters {
                let _ = w.send(SyncResult::Offline("the node stopped".into()));
            }
        }
    }

    /// Runs `f` on the engine on a blocking thread and hands its result to the loop.
    fn with_engine<F>(&self, f: F)
    where
        F: FnOnce(&mut Engine) -> Internal + Send + 'static,
    {
        let engine = self.engine.clone();
        let tx = self.internal_tx.clone();
        tokio::task::spawn_blocking(move || {
            let msg = match engine.lock() {
                Ok(mut e) => f(&mut e),
                Err(_) => return,
            };
            let _ = tx.send(msg);
        });
    }

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Sync { peer, doc, reply } => self.sync(peer, doc, reply),
            Command::Dial { addr, reply } => {
                let peer = addr.iter().find_map(|p| match p {
                    libp2p::multiaddr::Protocol::P2p(id) => Some(id),
                    _ => None,
                });
                if let Some(peer) = peer
                    && self.swarm.is_connected(&peer)
                {
                    let _ = reply.send(Ok(peer.to_string()));
                    return;
                }
                match self.swarm.dial(addr.clone()) {
                    Ok(()) => match peer {
                        Some(peer) => self.dials.entry(peer).or_default().push(reply),
                        None => self.addr_dials.push((addr, reply)),
                    },
                    Err(e) => {
                        let _ = reply.send(Err(format!("cannot dial {addr}: {e}")));
                    }
                }
            }
            Command::Peers { reply } => {
                let connected: HashSet<PeerId> = self.swarm.connected_peers().copied().collect();
                let stored = self
                    .engine
                    .lock()
                    .ok()
                    .and_then(|e| e.store().peers().ok())
                    .unwrap_or_default();
                let mut out: Vec<PeerInfo> = stored
                    .into_iter()
                    .map(|(id, rec)| {
                        let p = peer_of(&id);
                        PeerInfo {
                            peer: id.to_string(),
                            connected: connected.contains(&p),
                            addrs: rec.addrs,
                            agent: self.agents.get(&p).cloned(),
                            rtt_ms: self.rtts.get(&p).map(|d| d.as_millis() as u64),
                        }
                    })
                    .collect();
                for p in &connected {
                    if !out.iter().any(|i| i.peer == p.to_string()) {
                        out.push(PeerInfo {
                            peer: p.to_string(),
                            connected: true,
                            addrs: Vec::new(),
                            agent: self.agents.get(p).cloned(),
                            rtt_ms: self.rtts.get(p).map(|d| d.as_millis() as u64),
                        });
                    }
                }
                out.sort_by(|a, b| (!a.connected, &a.peer).cmp(&(!b.connected, &b.peer)));
                let _ = reply.send(out);
            }
            Command::Listening { reply } => {
                let _ = reply.send(self.listening.clone());
            }
            Command::Shutdown { .. } => unreachable!("handled in run"),
        }
    }

    fn sync(&mut self, peer: IdentityKey, doc: DocRef, reply: Option<oneshot::Sender<SyncResult>>) {
        let pid = peer_of(&peer);
        if self.banned.get(&pid).is_some_and(|t| *t > Instant::now()) {
            if let Some(r) = reply {
                let _ = r.send(SyncResult::Offline(
                    "the peer is disconnected for misbehaving".into(),
                ));
            }
            return;
        }
        if !self.swarm.is_connected(&pid) {
            let first = !self.waiting.contains_key(&pid);
            self.waiting.entry(pid).or_default().push((doc, reply));
            if first && let Err(e) = self.swarm.dial(DialOpts::peer_id(pid).build()) {
                tracing::debug!(%pid, "cannot dial: {e}");
                // No address known: ask the DHT; the sync waits for a connection.
                self.swarm.behaviour_mut().kad.get_closest_peers(pid);
                let waiting = self.waiting.remove(&pid).unwrap_or_default();
                for (_, r) in waiting {
                    if let Some(r) = r {
                        let _ = r.send(SyncResult::Offline(format!(
                            "{peer} is not reachable now (no known address); it syncs when it connects"
                        )));
                    }
                }
            }
            return;
        }
        let key = (pid, doc.doc_id());
        if let Some(s) = self.sessions.get_mut(&key) {
            s.again = true;
            s.waiters.extend(reply);
            return;
        }
        // A bounded number of sessions per peer run at once; the rest wait their turn (a
        // node with a thousand relationships must not open a thousand streams at once).
        let active = self.sessions.keys().filter(|(p, _)| *p == pid).count();
        if active >= MAX_SESSIONS_PER_PEER {
            let queue = self.queued.entry(pid).or_default();
            match queue.iter_mut().find(|(d, _)| d.doc_id() == doc.doc_id()) {
                Some((_, waiters)) => waiters.extend(reply),
                None => queue.push_back((doc, reply.into_iter().collect())),
            }
            return;
        }
        self.sessions.insert(
            key,
            Session {
                doc,
                rounds: 0,
                again: false,
                refused: Vec::new(),
                waiters: reply.into_iter().collect(),
            },
        );
        self.next_round(pid, doc);
    }

    fn next_round(&mut self, peer: PeerId, doc: DocRef) {
        let Some(id) = identity_of(&peer) else {
            return;
        };
        self.with_engine(move |e| {
            let req = e.start_round(&id, &doc, now()).unwrap_or_else(|err| {
                tracing::warn!("cannot start a sync round: {err}");
                None
            });
            Internal::Send { peer, doc, req }
        });
    }

    fn end_session(&mut self, peer: PeerId, doc: DocId, result: SyncResult) {
        if let Some(s) = self.sessions.remove(&(peer, doc)) {
            for w in s.waiters {
                let _ = w.send(result.clone());
            }
        }
        // Start the next waiting session with this peer, if any.
        let next = self.queued.get_mut(&peer).and_then(VecDeque::pop_front);
        if self.queued.get(&peer).is_some_and(VecDeque::is_empty) {
            self.queued.remove(&peer);
        }
        if let Some((d, waiters)) = next
            && let Some(id) = identity_of(&peer)
        {
            let mut waiters = waiters.into_iter();
            self.sync(id, d, waiters.next());
            if let Some(s) = self.sessions.get_mut(&(peer, d.doc_id())) {
                s.waiters.extend(waiters);
            }
        }
    }

    fn internal(&mut self, msg: Internal) {
        match msg {
            Internal::Send { peer, doc, req } => {
                let Some(req) = req else {
                    let refused = self
                        .sessions
                        .get(&(peer, doc.doc_id()))
                        .map(|s| s.refused.clone())
                        .unwrap_or_default();
                    let result = if refused.is_empty() {
                        SyncResult::Refused(
                            "this node does not share that document with the peer now".into(),
                        )
                    } else {
                        SyncResult::Refused(refused.join("; "))
                    };
                    self.end_session(peer, doc.doc_id(), result);
                    return;
                };
                if !self.swarm.is_connected(&peer) {
                    self.end_session(
                        peer,
                        doc.doc_id(),
                        SyncResult::Offline("the peer disconnected".into()),
                    );
                    return;
                }
                let sent: Vec<ChangeHash> = req
                    .changes
                    .iter()
                    .filter_map(|b| {
                        rapport_protocol::SignedChange::decode(b)
                            .ok()
                            .map(|c| c.hash())
                    })
                    .collect();
                let id = self.swarm.behaviour_mut().sync.send_request(&peer, req);
                self.requests.insert(id, (peer, doc, sent));
            }
            Internal::Respond {
                peer,
                channel,
                resp,
                disconnect,
            } => {
                if self
                    .swarm
                    .behaviour_mut()
                    .sync
                    .send_response(channel, resp)
                    .is_err()
                {
                    tracing::debug!(%peer, "could not answer: the request was dropped");
                }
                if disconnect {
                    self.ban(peer);
                }
            }
            Internal::RoundDone { peer, doc, outcome } => {
                let outcome = match outcome {
                    Ok(o) => o,
                    Err(e) => {
                        self.end_session(
                            peer,
                            doc,
                            SyncResult::Offline(format!("sync failed here: {e}")),
                        );
                        return;
                    }
                };
                if outcome.disconnect {
                    self.ban(peer);
                }
                let Some(s) = self.sessions.get_mut(&(peer, doc)) else {
                    return;
                };
                s.rounds += 1;
                s.refused.extend(outcome.refused.iter().cloned());
                let progress = outcome.received > 0 || outcome.peer_moved || s.rounds == 1;
                let more = (outcome.again && progress) || s.again;
                if more && s.rounds < MAX_ROUNDS && !outcome.disconnect {
                    s.again = false;
                    let d = s.doc;
                    self.next_round(peer, d);
                } else {
                    let result = if s.refused.is_empty() {
                        SyncResult::Delivered
                    } else {
                        SyncResult::Refused(s.refused.join("; "))
                    };
                    self.end_session(peer, doc, result);
                }
            }
            Internal::Pushes(pushes) => {
                for (peer, doc) in pushes {
                    self.sync(peer, doc, None);
                }
            }
        }
    }

    fn ban(&mut self, peer: PeerId) {
        tracing::warn!(%peer, "disconnecting a peer that sent too many bad changes");
        self.banned.insert(peer, Instant::now() + BAN_FOR);
        let _ = self.swarm.disconnect_peer_id(peer);
    }

    fn redial(&mut self) {
        let engine = self.engine.clone();
        let tx = self.internal_tx.clone();
        let connected: HashSet<PeerId> = self.swarm.connected_peers().copied().collect();
        tokio::task::spawn_blocking(move || {
            let Ok(e) = engine.lock() else { return };
            let pushes: Vec<Push> = e
                .counterparts()
                .into_iter()
                .filter(|p| !connected.contains(&peer_of(p)))
                .flat_map(|p| e.shared_with(&p, now()).into_iter().map(move |d| (p, d)))
                .collect();
            let _ = tx.send(Internal::Pushes(pushes));
        });
    }

    fn on_connected(&mut self, peer: PeerId, endpoint: &ConnectedPoint) {
        if self.banned.get(&peer).is_some_and(|t| *t > Instant::now()) {
            let _ = self.swarm.disconnect_peer_id(peer);
            return;
        }
        let _ = self.events.send(Event::PeerConnected {
            peer: peer.to_string(),
        });
        for r in self.dials.remove(&peer).unwrap_or_default() {
            let _ = r.send(Ok(peer.to_string()));
        }
        let remote = endpoint.get_remote_address().clone();
        let mut rest = Vec::new();
        for (addr, r) in self.addr_dials.drain(..) {
            if endpoint.is_dialer()
                && (addr == remote || remote.to_string().starts_with(&addr.to_string()))
            {
                let _ = r.send(Ok(peer.to_string()));
            } else {
                rest.push((addr, r));
            }
        }
        self.addr_dials = rest;
        let Some(id) = identity_of(&peer) else {
            return;
        };
        if endpoint.is_dialer() && dialable(&remote) {
            let addr = remote.to_string();
            let engine = self.engine.clone();
            tokio::task::spawn_blocking(move || {
                if let Ok(e) = engine.lock()
                    && let Err(err) = e.store().put_peer(&id, &[addr], now())
                {
                    tracing::warn!("cannot record peer address: {err}");
                }
            });
        }
        let waiting = self.waiting.remove(&peer).unwrap_or_default();
        for (doc, reply) in waiting {
            self.sync(id, doc, reply);
        }
        // Catch up on everything shared with this peer.
        let engine = self.engine.clone();
        let tx = self.internal_tx.clone();
        tokio::task::spawn_blocking(move || {
            let Ok(e) = engine.lock() else { return };
            let pushes: Vec<Push> = e
                .shared_with(&id, now())
                .into_iter()
                .map(|d| (id, d))
                .collect();
            let _ = tx.send(Internal::Pushes(pushes));
        });
    }

    fn swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!("listening on {address}");
                self.listening.push(address);
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.listening.retain(|a| *a != address);
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                endpoint,
                num_established,
                ..
            } if num_established.get() == 1 => self.on_connected(peer_id, &endpoint),
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } => {
                let _ = self.events.send(Event::PeerDisconnected {
                    peer: peer_id.to_string(),
                });
                let ended: Vec<DocId> = self
                    .sessions
                    .keys()
                    .filter(|(p, _)| *p == peer_id)
                    .map(|(_, d)| *d)
                    .collect();
                // Queued sessions end too; they run again when the peer reconnects.
                for (_, waiters) in self.queued.remove(&peer_id).unwrap_or_default() {
                    for w in waiters {
                        let _ = w.send(SyncResult::Offline("the peer disconnected".into()));
                    }
                }
                for d in ended {
                    self.end_session(
                        peer_id,
                        d,
                        SyncResult::Offline("the peer disconnected".into()),
                    );
                }
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                let msg = format!("cannot connect: {error}");
                if let Some(peer) = peer_id {
                    for r in self.dials.remove(&peer).unwrap_or_default() {
                        let _ = r.send(Err(msg.clone()));
                    }
                    if !self.swarm.is_connected(&peer) {
                        for (_, r) in self.waiting.remove(&peer).unwrap_or_default() {
                            if let Some(r) = r {
                                let _ = r.send(SyncResult::Offline(format!(
                                    "{msg}; it syncs when the peer connects"
                                )));
                            }
                        }
                    }
                } else {
                    for (_, r) in self.addr_dials.drain(..) {
                        let _ = r.send(Err(msg.clone()));
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => {
                self.agents.insert(peer_id, info.agent_version.clone());
                let addrs: Vec<Multiaddr> = info
                    .listen_addrs
                    .into_iter()
                    .filter(dialable)
                    .take(crate::store::MAX_PEER_ADDRS)
                    .collect();
                for a in &addrs {
                    self.swarm
                        .behaviour_mut()
                        .kad
                        .add_address(&peer_id, a.clone());
                }
                if let Some(id) = identity_of(&peer_id) {
                    let texts: Vec<String> = addrs.iter().map(ToString::to_string).collect();
                    let engine = self.engine.clone();
                    tokio::task::spawn_blocking(move || {
                        if let Ok(e) = engine.lock()
                            && let Err(err) = e.store().put_peer(&id, &texts, now())
                        {
                            tracing::warn!("cannot record peer addresses: {err}");
                        }
                    });
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Ping(ping::Event {
                peer,
                result: Ok(rtt),
                ..
            })) => {
                self.rtts.insert(peer, rtt);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(list))) => {
                for (peer, addr) in list {
                    self.swarm
                        .behaviour_mut()
                        .kad
                        .add_address(&peer, addr.clone());
                    if !self.swarm.is_connected(&peer) {
                        let _ = self
                            .swarm
                            .dial(DialOpts::peer_id(peer).addresses(vec![addr]).build());
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                result: kad::QueryResult::GetClosestPeers(Ok(ok)),
                ..
            })) => {
                for p in ok.peers {
                    if !p.addrs.is_empty()
                        && !self.swarm.is_connected(&p.peer_id)
                        && identity_of(&p.peer_id).is_some()
                    {
                        let _ = self
                            .swarm
                            .dial(DialOpts::peer_id(p.peer_id).addresses(p.addrs).build());
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Sync(ev)) => self.sync_event(ev),
            _ => {}
        }
    }

    fn sync_event(&mut self, ev: request_response::Event<SyncRequest, SyncResponse>) {
        match ev {
            request_response::Event::Message {
                peer,
                message:
                    request_response::Message::Request {
                        request, channel, ..
                    },
                ..
            } => {
                let Some(id) = identity_of(&peer) else {
                    return;
                };
                let tx = self.internal_tx.clone();
                self.with_engine(move |e| {
                    let (resp, pushes, disconnect) = e.handle_request(&id, request, now());
                    if !pushes.is_empty() {
                        let _ = tx.send(Internal::Pushes(pushes));
                    }
                    Internal::Respond {
                        peer,
                        channel,
                        resp,
                        disconnect,
                    }
                });
            }
            request_response::Event::Message {
                peer,
                message:
                    request_response::Message::Response {
                        request_id,
                        response,
                    },
                ..
            } => {
                let Some((p, doc, sent)) = self.requests.remove(&request_id) else {
                    return;
                };
                debug_assert_eq!(p, peer);
                let Some(id) = identity_of(&peer) else {
                    return;
                };
                let tx = self.internal_tx.clone();
                self.with_engine(move |e| {
                    let result = e.handle_response(&id, &doc, &sent, response, now());
                    let outcome = match result {
                        Ok((o, pushes)) => {
                            let _ = tx.send(Internal::Pushes(pushes));
                            Ok(o)
                        }
                        Err(err) => Err(err.to_string()),
                    };
                    Internal::RoundDone {
                        peer,
                        doc: doc.doc_id(),
                        outcome,
                    }
                });
            }
            request_response::Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                if let Some((_, doc, _)) = self.requests.remove(&request_id) {
                    self.end_session(
                        peer,
                        doc.doc_id(),
                        SyncResult::Offline(format!("sync request failed: {error}")),
                    );
                }
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, "inbound sync failed: {error}");
                if matches!(error, request_response::InboundFailure::Io(_)) {
                    let n = self.bad_requests.entry(peer).or_default();
                    *n += 1;
                    if *n > MAX_BAD_REQUESTS {
                        self.ban(peer);
                    }
                }
            }
            _ => {}
        }
    }
}
