//! The network: one event loop owns the libp2p swarm; the rest of the node talks to it with
//! [`NetClient`] over a channel. The loop runs sync sessions (rounds of the sync protocol
//! per peer and document), answers peers' requests through the engine, keeps peers'
//! addresses in the store and redials the peers it shares documents with.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::prelude::*;
use libp2p::core::ConnectedPoint;
use libp2p::kad::{self, store::MemoryStore};
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{
    self, OutboundFailure, OutboundRequestId, ProtocolSupport, ResponseChannel,
};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent, behaviour::toggle::Toggle, dial_opts::DialOpts};
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, Swarm, connection_limits, dcutr, identify, mdns, noise,
    ping, relay, rendezvous, tcp, yamux,
};
use rapport_protocol::automerge::ChangeHash;
use rapport_protocol::mail::{
    MAILBOX_PROTOCOL, MAX_ENVELOPES_PER_MESSAGE, MAX_MAIL_BATCH_BYTES, MailRequest, MailResponse,
};
use rapport_protocol::replica::{self, CheckedRequest};
use rapport_protocol::session::{End, Ending, Sessions, Start, Step, Ticket};
use rapport_protocol::wire::{
    CHUNK_BYTES, DocRef, MAX_BATCH_ROUNDS, MAX_WIRE_MESSAGE, RefusalCode, SYNC_BATCH_PROTOCOL,
    SYNC_PROTOCOL, SyncBatch, SyncBatchResponse, SyncRequest, SyncResponse, WireError,
};
use rapport_protocol::{IdentityKey, SecretKey};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::actor::{Done, EngineClient, Job, TrySubmit};
use crate::crypt::{MailReport, Sealed};
use crate::engine::{Engine, EngineError, Push, RoundOutcome};
use crate::error::{DialError, NetError};
use crate::redial::Redials;
use crate::relay::RENDEZVOUS_NAMESPACE;
use crate::store::PeerRecord;
use crate::views::Event;

/// How long a connection with no open stream stays up. Long, on purpose: a conversation
/// pauses, and the customer's node must reach its companies at once when it writes.
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a dial asked for through [`NetClient::dial`] may take.
pub(crate) const DIAL_TIMEOUT: Duration = Duration::from_secs(20);
/// How long one sync request may take before it counts as failed.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// The engine time one slice of the redial sweep may take (see `Loop::sweep_push`).
const SWEEP_SLICE: Duration = Duration::from_millis(5);
/// Counterparts the redial sweep lists at a time (see `Loop::sweep_list`).
const SWEEP_BATCH: usize = 512;
/// DHT lookups of unreachable peers under way at once, at most. Each lookup is checked
/// against every dial that fails, so thousands at once would hold the loop for seconds.
const MAX_LOOKUPS: usize = 8;

/// How often the node redials peers it shares documents with.
pub const REDIAL_EVERY: Duration = Duration::from_secs(20);
/// The longest an unreachable peer waits between two of the sweep's dials (see
/// [`crate::redial`]).
pub(crate) const REDIAL_MAX: Duration = Duration::from_secs(30 * 60);
/// How long a peer that passed the misbehaviour limit stays disconnected.
pub(crate) const BAN_FOR: Duration = Duration::from_secs(crate::engine::BAN_SECONDS);
/// Undecodable requests a peer may send before it is disconnected.
pub(crate) const MAX_BAD_REQUESTS: u32 = 16;
/// Results the engine may have waiting for the network loop.
pub(crate) const INTERNAL_QUEUE: usize = 4096;
/// Jobs the loop holds while the engine's queue is full; past it, peers' requests are
/// dropped (they fail on the peer's side, which tries again later).
pub(crate) const MAX_DEFERRED: usize = 4096;
/// Changes checked ahead in one batch, at most (a request larger than this goes alone):
/// enough for a batch verification to cost little per signature (a set this large is one
/// batch, by Pippenger's method: see `BATCH` in `protocol/src/signed.rs`), few enough that
/// the engine does not wait long for the first request of a batch, nor work alone through
/// the last batch at the end of a sync.
pub(crate) const CHECK_BATCH_CHANGES: usize = 512;
/// Batches checked ahead at once, at most: one per core (up to four), so that checking
/// keeps pace with the engine when many small requests come in, each batch on a core of
/// its own. Their results go to the engine in the order the requests arrived.
fn max_checking() -> usize {
    rapport_protocol::replica::check_threads()
}
/// Peers whose undecodable requests are counted at once; past it, the counts of peers no
/// longer connected are dropped.
const MAX_TRACKED_PEERS: usize = 4096;
/// Streams one connection may have open at once for the sync protocols, both ways, half
/// for each version: an honest peer has at most [`MAX_REQUESTS_PER_PEER`] requests in
/// flight with us, and we as many with it (a node of an earlier release, up to 64). Each inbound stream may buffer up to [`MAX_WIRE_MESSAGE`] of bytes
/// that actually arrived, so this bounds what one connection can make the node hold.
pub(crate) const MAX_STREAMS_PER_CONNECTION: usize = 128;
/// Sync requests of ours in flight with one peer at once; the rest wait in the loop (a
/// libp2p stream past a connection's limit fails rather than waits). A batch carries up
/// to 16 rounds, so 32 requests hold every session's round; to a peer of an earlier
/// release, one round each, they hold a quarter of them.
pub(crate) const MAX_REQUESTS_PER_PEER: usize = 32;
const _: () = assert!(2 * MAX_REQUESTS_PER_PEER <= MAX_STREAMS_PER_CONNECTION / 2);
/// Incoming connections still in their handshake, at once (each holds a socket).
pub(crate) const MAX_PENDING_INCOMING: u32 = 64;
/// Established incoming connections, in all. Each holds a file descriptor and buffers;
/// with the outgoing limit and the API's, it keeps a node well inside the common
/// 1,024 open-file limit, and the rest of the node (store, API) always has descriptors.
pub(crate) const MAX_ESTABLISHED_INCOMING: u32 = 256;
/// Outgoing connections still dialling, at once.
pub(crate) const MAX_PENDING_OUTGOING: u32 = 64;
/// Established outgoing connections, in all.
pub(crate) const MAX_ESTABLISHED_OUTGOING: u32 = 256;
/// Connections with one peer at once: direct TCP and QUIC, one through a relay, and a
/// simultaneous dial from both sides.
pub(crate) const MAX_CONNECTIONS_PER_PEER: u32 = 4;

/// Bytes of sync messages sent and received, and the loop's dialling, for benchmarks,
/// `rapport peers` and the status.
#[derive(Debug, Default)]
pub struct WireStats {
    /// Bytes written, framing included.
    pub sent: AtomicU64,
    /// Bytes read, framing included.
    pub received: AtomicU64,
    /// Dials of peers by identity, to sync with them.
    pub dials: AtomicU64,
    /// DHT lookups started for peers with no known address.
    pub lookups: AtomicU64,
    /// Redial sweeps finished.
    pub sweeps: AtomicU64,
    /// Peers' sync requests checked ahead of the engine (see `Loop::check_next`); a
    /// stranger's never are.
    pub checked_ahead: AtomicU64,
}

/// A message of one of Rapport's request-response protocols, with its bounded encoding
/// (see `rapport_protocol::wire` and `rapport_protocol::mail`).
pub trait Framed: Sized + Send + 'static {
    /// The message's bytes.
    fn to_bytes(&self) -> Vec<u8>;
    /// Decodes, checking every bound.
    fn from_bytes(bytes: &[u8]) -> Result<Self, WireError>;
}

macro_rules! framed {
    ($($t:ty),*) => {$(
        impl Framed for $t {
            fn to_bytes(&self) -> Vec<u8> {
                self.encode()
            }
            fn from_bytes(bytes: &[u8]) -> Result<Self, WireError> {
                Self::decode(bytes)
            }
        }
    )*};
}
framed!(
    SyncRequest,
    SyncResponse,
    SyncBatch,
    SyncBatchResponse,
    MailRequest,
    MailResponse
);

/// A request the codec could not decode: bytes that are not a message of the protocol, or
/// a frame announced over [`MAX_WIRE_MESSAGE`]. The codec hands it on as a request (rather
/// than failing the stream, which libp2p request-response 0.30 only logs), so the loop
/// can answer it, count it against the peer and disconnect a peer that keeps sending them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("undecodable request: {reason}")]
pub struct Undecodable {
    /// Why, for the log and for the peer.
    pub reason: String,
}

/// A request as the codec reads it: the message, or why it is not one. Requests sent are
/// always `Ok`.
pub type Inbound<T> = Result<T, Undecodable>;

/// The codec of Rapport's protocols: a 4-byte big-endian length, then the message. Lengths
/// over [`MAX_WIRE_MESSAGE`] are refused before reading; a frame's buffer grows as its
/// bytes arrive (never by the length announced); bytes are counted in [`WireStats`].
pub struct FrameCodec<Req, Resp> {
    stats: Arc<WireStats>,
    /// Shared by every clone (every connection and stream of one behaviour).
    in_flight: Arc<InFlight>,
    kinds: std::marker::PhantomData<fn() -> (Req, Resp)>,
}

impl<Req, Resp> FrameCodec<Req, Resp> {
    /// A codec counting its bytes in `stats`.
    pub fn new(stats: Arc<WireStats>) -> Self {
        Self {
            stats,
            in_flight: Arc::default(),
            kinds: std::marker::PhantomData,
        }
    }
}

impl<Req, Resp> FrameCodec<Req, Resp> {
    /// A codec for other messages that counts its bytes in the same stats and reads its
    /// frames within the same [`MAX_FRAME_BYTES_IN_FLIGHT`].
    pub fn sharing<R, S>(&self) -> FrameCodec<R, S> {
        FrameCodec {
            stats: self.stats.clone(),
            in_flight: self.in_flight.clone(),
            kinds: std::marker::PhantomData,
        }
    }
}

impl<Req, Resp> Clone for FrameCodec<Req, Resp> {
    fn clone(&self) -> Self {
        Self {
            stats: self.stats.clone(),
            in_flight: self.in_flight.clone(),
            kinds: std::marker::PhantomData,
        }
    }
}

impl<Req, Resp> Default for FrameCodec<Req, Resp> {
    fn default() -> Self {
        Self::new(Arc::default())
    }
}

/// The sync protocol's codec (`/rapport/sync/2`: one round per message).
pub type SyncCodec = FrameCodec<SyncRequest, SyncResponse>;
/// The batched sync protocol's codec (`/rapport/sync/3`: the rounds of several documents
/// per message).
pub type SyncBatchCodec = FrameCodec<SyncBatch, SyncBatchResponse>;
/// The mailbox protocol's codec (`/rapport/mailbox/1`).
pub type MailCodec = FrameCodec<MailRequest, MailResponse>;

/// How much of a frame is read at a time, and the most a frame's buffer holds before its
/// bytes arrive: a peer that announces 32 MiB and sends a few bytes costs 16 KiB, not 32 MiB.
/// With [`MAX_STREAMS_PER_CONNECTION`] streams, what one connection can make the node hold
/// outside [`MAX_FRAME_BYTES_IN_FLIGHT`] is 2 MiB (it was 32 streams of 64 KiB with 16
/// sessions per peer, then 64 of 32 KiB with 32). A sync round of 22 changes is about 11 KiB.
const READ_CHUNK: usize = 16 * 1024;
// Raising the sessions per peer (and so the streams per connection) must not raise what a
// connection can make the node hold outside the pool.
const _: () = assert!(MAX_STREAMS_PER_CONNECTION * READ_CHUNK <= 2 << 20);

/// Bytes that the frames being read at once by one codec (all its connections and
/// streams) may hold beyond the first [`READ_CHUNK`] of each. Stream and connection limits
/// alone would let peers that really send their bytes make the node hold
/// connections x streams x 32 MiB; this makes it a fixed amount. Small messages (most
/// sync rounds) never wait for it, so peers filling it cannot stall them; a large frame
/// that finds it full fails, and its sender tries again later.
pub(crate) const MAX_FRAME_BYTES_IN_FLIGHT: usize = 256 << 20;

/// Bytes reserved by frames being read (see [`MAX_FRAME_BYTES_IN_FLIGHT`]).
#[derive(Debug, Default)]
struct InFlight(std::sync::atomic::AtomicUsize);

/// One frame's share of [`InFlight`], given back when the frame is dropped or decoded.
struct Reservation {
    pool: Arc<InFlight>,
    held: usize,
}

impl Reservation {
    /// Holds `total` bytes in all, if the pool has room.
    fn hold(&mut self, total: usize) -> bool {
        let more = total.saturating_sub(self.held);
        if more == 0 {
            return true;
        }
        let before = self.pool.0.fetch_add(more, Ordering::AcqRel);
        if before + more > MAX_FRAME_BYTES_IN_FLIGHT {
            self.pool.0.fetch_sub(more, Ordering::AcqRel);
            return false;
        }
        self.held = total;
        true
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.pool.0.fetch_sub(self.held, Ordering::AcqRel);
    }
}

/// Why a frame could not be read.
enum FrameError {
    /// The length announced is over [`MAX_WIRE_MESSAGE`]; nothing more was read.
    TooLarge(usize),
    /// The stream failed or ended early, or the codec holds too much already.
    Io(io::Error),
}

impl From<FrameError> for io::Error {
    fn from(e: FrameError) -> io::Error {
        match e {
            FrameError::TooLarge(len) => io::Error::new(io::ErrorKind::InvalidData, too_large(len)),
            FrameError::Io(e) => e,
        }
    }
}

fn too_large(len: usize) -> String {
    format!("a message of {len} bytes is over the limit of {MAX_WIRE_MESSAGE}")
}

/// Reads one frame. The buffer starts at no more than [`READ_CHUNK`] and at most doubles
/// (capped at the length announced) when full, so memory follows the bytes that arrived.
async fn read_frame<T: AsyncRead + Unpin + Send>(
    io: &mut T,
    stats: &WireStats,
    pool: &Arc<InFlight>,
) -> Result<(Vec<u8>, Reservation), FrameError> {
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await.map_err(FrameError::Io)?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_WIRE_MESSAGE {
        return Err(FrameError::TooLarge(len));
    }
    let mut share = Reservation {
        pool: pool.clone(),
        held: 0,
    };
    let mut buf: Vec<u8> = Vec::with_capacity(len.min(READ_CHUNK));
    while buf.len() < len {
        let start = buf.len();
        if start == buf.capacity() {
            let target = (start * 2).max(READ_CHUNK).min(len);
            if !share.hold(target - READ_CHUNK.min(target)) {
                return Err(FrameError::Io(io::Error::other(format!(
                    "a frame of {len} bytes cannot be read now: over {} MiB of frames are being read; try again later",
                    MAX_FRAME_BYTES_IN_FLIGHT >> 20
                ))));
            }
            buf.reserve_exact(target - start);
        }
        let end = buf.capacity().min(len).min(start + READ_CHUNK);
        buf.resize(end, 0);
        match io.read(&mut buf[start..end]).await {
            Ok(0) => {
                return Err(FrameError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("the stream ended after {start} of {len} bytes"),
                )));
            }
            Ok(n) => buf.truncate(start + n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => buf.truncate(start),
            Err(e) => return Err(FrameError::Io(e)),
        }
    }
    stats.received.fetch_add(len as u64 + 4, Ordering::Relaxed);
    Ok((buf, share))
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

impl<Req: Framed, Resp: Framed> request_response::Codec for FrameCodec<Req, Resp> {
    type Protocol = StreamProtocol;
    type Request = Inbound<Req>;
    type Response = Resp;

    async fn read_request<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Inbound<Req>> {
        // Garbage becomes a request the loop counts; only a failed stream is an error.
        let reason = match read_frame(io, &self.stats, &self.in_flight).await {
            Ok((bytes, _share)) => match Req::from_bytes(&bytes) {
                Ok(req) => return Ok(Ok(req)),
                Err(e) => e.to_string(),
            },
            Err(FrameError::TooLarge(len)) => too_large(len),
            Err(FrameError::Io(e)) => return Err(e),
        };
        Ok(Err(Undecodable { reason }))
    }

    async fn read_response<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Resp> {
        let (bytes, _share) = read_frame(io, &self.stats, &self.in_flight).await?;
        Resp::from_bytes(&bytes).map_err(invalid)
    }

    async fn write_request<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Inbound<Req>,
    ) -> io::Result<()> {
        let req = req.map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        write_frame(io, req.to_bytes(), &self.stats).await
    }

    async fn write_response<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Resp,
    ) -> io::Result<()> {
        write_frame(io, res.to_bytes(), &self.stats).await
    }
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    /// First, so a connection over a limit is refused before any other behaviour sees it.
    limits: connection_limits::Behaviour,
    per_ip: crate::ip_limits::Behaviour,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    kad: kad::Behaviour<MemoryStore>,
    mdns: Toggle<mdns::tokio::Behaviour>,
    /// Version 2, one round per message: for the nodes of earlier releases.
    sync: request_response::Behaviour<SyncCodec>,
    /// Version 3, several documents' rounds per message: what this node sends.
    sync_batch: request_response::Behaviour<SyncBatchCodec>,
    relay_client: relay::client::Behaviour,
    dcutr: dcutr::Behaviour,
    rendezvous: rendezvous::client::Behaviour,
    mailbox: request_response::Behaviour<MailCodec>,
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
    /// A community relay (`/…/p2p/<relay id>`): reserve a circuit there, register at its
    /// rendezvous point, and use its mailbox for peers that cannot be reached.
    pub relay: Option<Multiaddr>,
    /// How often the node redials the peers it shares documents with ([`REDIAL_EVERY`]);
    /// a peer whose dial failed waits longer each time (see [`crate::redial`]).
    pub redial_every: Duration,
}

pub use rapport_protocol::replica::{PeerRefusal, Refused};

/// How a sync with a peer ended, as told to whoever asked for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", content = "detail", rename_all = "snake_case")]
pub enum SyncResult {
    /// Both sides hold the same changes.
    Delivered,
    /// The peer refused (what, and its reasons).
    Refused(Vec<PeerRefusal>),
    /// The peer could not be reached now; the document syncs when it connects.
    Offline(String),
    /// This node does not share the document with the peer now (no access, or not held).
    NotShared,
    /// The peer could not be reached; the changes it lacks were sealed and left in its
    /// mailbox at the relay.
    Deposited(String),
    /// Handed to the network loop without waiting for the outcome.
    Queued,
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

/// A round built: the request and the hashes of the changes it carries.
type Built = (SyncRequest, Vec<ChangeHash>);
/// A round of a batch under way: its document, the hashes of the changes it carried, and
/// its ticket.
type Sent = (DocRef, Vec<ChangeHash>, Ticket);

/// A sync request of ours: a batch (version 3), or one round (version 2).
enum Outgoing {
    Batch(Vec<SyncRequest>, Vec<Sent>),
    One(SyncRequest, Sent),
}

/// Our sync requests with one peer: how many are in flight, and those waiting.
#[derive(Default)]
struct Outbox {
    in_flight: usize,
    waiting: VecDeque<Outgoing>,
}

/// A session waiting for a free slot: the document and who wants to hear how it ended.
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
        reply: DialReply,
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
    /// Rounds built for one peer, to go in one batch.
    Send {
        peer: PeerId,
        /// Each round: its ticket, the request and the hashes of the changes it carries;
        /// no request when this node does not share the document with the peer now.
        rounds: Vec<(Ticket, Option<Built>)>,
    },
    /// The answers to a peer's request (one round, or a batch's rounds in order).
    Respond {
        peer: PeerId,
        reply: Reply,
        resps: Vec<SyncResponse>,
        disconnect: bool,
    },
    /// The answers to one batch of ours, taken.
    RoundsDone {
        peer: PeerId,
        rounds: Vec<(Ticket, Result<RoundOutcome, String>)>,
    },
    Pushes(Vec<Push>),
    /// The redial sweep's next counterparts, and the last of them when more follow.
    SweepPeers {
        peers: Vec<IdentityKey>,
        after: Option<IdentityKey>,
    },
    /// A slice of the redial sweep's pushes, the counterparts the slice had no time for,
    /// and where the listing goes on.
    SweepPushes {
        pushes: Vec<Push>,
        rest: Vec<IdentityKey>,
        after: Option<IdentityKey>,
    },
    /// Mail sealed for a peer that could not be reached.
    Sealed {
        peer: PeerId,
        sealed: Vec<(DocRef, Sealed)>,
        replies: Vec<oneshot::Sender<SyncResult>>,
    },
    /// Mail from the relay opened and applied, up to this sequence number.
    MailOpened {
        last: u64,
        report: MailReport,
    },
    /// Peers' requests checked ahead ([`Loop::check_next`]), in the order they arrived:
    /// the batch with this number.
    Checked(u64, Vec<(Requester, Vec<CheckedRequest>)>),
}

/// Work started in order, finished in any order and handed on in the order it started:
/// each piece gets a number when it starts ([`InOrder::start`]), and what finishes before
/// an earlier piece waits for it ([`InOrder::finished`]).
#[derive(Debug)]
struct InOrder<T> {
    /// The number the next piece gets.
    next: u64,
    /// The number of the next piece to hand on.
    due: u64,
    /// Pieces finished before an earlier one, by number.
    early: BTreeMap<u64, T>,
}

impl<T> Default for InOrder<T> {
    fn default() -> Self {
        Self {
            next: 0,
            due: 0,
            early: BTreeMap::new(),
        }
    }
}

impl<T> InOrder<T> {
    /// Starts a piece: its number.
    fn start(&mut self) -> u64 {
        let n = self.next;
        self.next += 1;
        n
    }

    /// Pieces started and not yet handed on (under way, or finished and waiting).
    fn under_way(&self) -> usize {
        usize::try_from(self.next - self.due).unwrap_or(usize::MAX)
    }

    /// Piece `number` finished with `value`: the pieces now due, in the order they started.
    /// A number not under way is ignored.
    fn finished(&mut self, number: u64, value: T) -> Vec<T> {
        if number < self.due || number >= self.next {
            return Vec::new();
        }
        self.early.insert(number, value);
        let mut due = Vec::new();
        while let Some(v) = self.early.remove(&self.due) {
            self.due += 1;
            due.push(v);
        }
        due
    }
}

/// Who sent a sync request, and where its answer goes.
struct Requester {
    peer: PeerId,
    id: IdentityKey,
    reply: Reply,
}

/// Where the answer to a peer's request goes: a round of version 2, or a batch.
enum Reply {
    One(ResponseChannel<SyncResponse>),
    Batch(ResponseChannel<SyncBatchResponse>),
}

impl Internal {
    /// The end of rounds the engine could not run (its store cannot be used now).
    fn unavailable(peer: PeerId, tickets: &[Ticket]) -> Internal {
        Internal::RoundsDone {
            peer,
            rounds: tickets
                .iter()
                .map(|t| (*t, Err("this node's store cannot be used now".into())))
                .collect(),
        }
    }

    /// Every round of `rounds` ended with `err`.
    fn all_failed(peer: PeerId, tickets: impl IntoIterator<Item = Ticket>, err: &str) -> Self {
        Internal::RoundsDone {
            peer,
            rounds: tickets.into_iter().map(|t| (t, Err(err.into()))).collect(),
        }
    }

    /// What becomes of this result when the engine's group that produced it could not be
    /// made durable: nothing that reports a stored change goes out.
    fn failed(self, err: &EngineError) -> Option<Internal> {
        match self {
            // Built from memory the engine has since reloaded: end the session instead.
            Internal::Send { peer, rounds } => Some(Internal::all_failed(
                peer,
                rounds.into_iter().map(|(t, _)| t),
                &err.to_string(),
            )),
            // The peer's request fails on its side; it asks again.
            Internal::Respond { .. } => None,
            Internal::RoundsDone { peer, rounds } => Some(Internal::all_failed(
                peer,
                rounds.into_iter().map(|(t, _)| t),
                &err.to_string(),
            )),
            Internal::Pushes(p) => Some(Internal::Pushes(p)),
            // Nothing written: the sweep goes on.
            m @ (Internal::SweepPeers { .. } | Internal::SweepPushes { .. }) => Some(m),
            // Not the engine's: nothing of it was written.
            m @ Internal::Checked(..) => Some(m),
            Internal::Sealed { replies, .. } => {
                for r in replies {
                    let _ = r.send(SyncResult::Offline(format!(
                        "the peer is not reachable, and its mail could not be sealed: {err}"
                    )));
                }
                None
            }
            // Not stored: not acknowledged, so the relay hands it over again.
            Internal::MailOpened { .. } => Some(Internal::MailOpened {
                last: 0,
                report: MailReport::default(),
            }),
        }
    }
}

/// What the loop reads from the store once, before it starts.
pub(crate) struct Startup {
    /// Known peers and their addresses.
    pub(crate) known: Vec<(IdentityKey, PeerRecord)>,
    /// Peers banned now, and until when (Unix seconds).
    pub(crate) bans: Vec<(IdentityKey, u64)>,
    /// The time the bans were read at.
    pub(crate) now: u64,
    /// The peers the node shares a document with ([`crate::Engine::sharing`]).
    pub(crate) sharing: Arc<std::sync::RwLock<HashSet<IdentityKey>>>,
}

/// The relay this node uses.
struct RelayLink {
    /// Its address, ending in `/p2p/<relay>`.
    addr: Multiaddr,
    peer: PeerId,
    /// A circuit listener was asked for on the current connection.
    listening: bool,
    /// A mailbox fetch is under way.
    fetching: bool,
    /// A dial to the relay is under way: dials to peers wait for it, so they can go
    /// through the relay's circuit at once.
    dialing: bool,
    /// The relay accepted a reservation on the current connection.
    reserved: bool,
    /// The node said in its log that the relay turns it away (said once, not per retry).
    warned: bool,
    /// What people see of it (shared with [`NetClient`]).
    status: Arc<std::sync::Mutex<Option<RelayStatus>>>,
}

impl RelayLink {
    fn show(&self, problem: Option<String>) {
        *self
            .status
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(RelayStatus {
            addr: self.addr.to_string(),
            reserved: self.reserved,
            problem,
        });
    }
}

/// Envelopes for one deposit request, and each document's heads once they are stored.
type DepositBatch = (Vec<Vec<u8>>, Vec<(DocRef, Vec<ChangeHash>)>);

/// A deposit under way: for each document, the heads the peer has once it is stored.
struct Deposit {
    peer: PeerId,
    docs: Vec<(DocRef, Vec<ChangeHash>)>,
    replies: Vec<oneshot::Sender<SyncResult>>,
}

/// A handle on the network loop. Cheap to clone.
#[derive(Clone)]
pub struct NetClient {
    tx: mpsc::Sender<Command>,
    stats: Arc<WireStats>,
    relay: Arc<std::sync::Mutex<Option<RelayStatus>>>,
}

/// How this node stands with its relay, for people (`rapport peers`, `/v1/status`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayStatus {
    /// The relay's address.
    pub addr: String,
    /// A circuit is reserved there now: peers reach this node through it.
    pub reserved: bool,
    /// What went wrong last, if the relay is not working for this node.
    pub problem: Option<String>,
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
    pub async fn dial(&self, addr: Multiaddr) -> Result<PeerId, DialError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Dial {
                addr: addr.clone(),
                reply,
            })
            .await
            .map_err(|_| DialError::Stopped)?;
        match tokio::time::timeout(DIAL_TIMEOUT, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(DialError::Stopped),
            Err(_) => Err(DialError::Failed {
                addr,
                detail: format!("no connection within {}s", DIAL_TIMEOUT.as_secs()),
            }),
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

    /// How this node stands with its relay, if it has one.
    pub fn relay_status(&self) -> Option<RelayStatus> {
        self.relay
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// The loop's sync sessions: one per peer and document, with who waits for each.
type LoopSessions = Sessions<PeerId, DocRef, oneshot::Sender<SyncResult>, PeerRefusal>;

/// Where a dial's outcome goes.
type DialReply = oneshot::Sender<Result<PeerId, DialError>>;

struct Loop {
    swarm: Swarm<Behaviour>,
    engine: EngineClient,
    /// Jobs for the engine that did not fit its queue, in order; see [`MAX_DEFERRED`].
    deferred: VecDeque<Job>,
    /// A redial sweep is under way (one slice at a time: [`Loop::sweep_list`]).
    sweeping: bool,
    /// Unreachable peers the sweep leaves alone for a while.
    redials: Redials<PeerId>,
    redial_every: Duration,
    /// DHT lookups of unreachable peers under way (at most [`MAX_LOOKUPS`]).
    lookups: HashMap<kad::QueryId, PeerId>,
    stats: Arc<WireStats>,
    events: tokio::sync::broadcast::Sender<Event>,
    /// Results from the engine's blocking threads. Bounded: a thread whose result does not
    /// fit waits (blocking threads only ever send here), so a flood of requests slows its
    /// senders instead of growing a queue.
    internal_tx: mpsc::Sender<Internal>,
    sessions: LoopSessions,
    /// Peers' sync requests waiting to be checked ahead, in the order they arrived (see
    /// [`Loop::check_next`]); counted with `deferred` against [`MAX_DEFERRED`].
    to_check: VecDeque<(Requester, Vec<SyncRequest>)>,
    /// Batches of requests checked on blocking threads, at most [`max_checking`] at once
    /// (counting those checked and waiting for an earlier one): they go to the engine in
    /// the order they arrived.
    checking: InOrder<Vec<(Requester, Vec<CheckedRequest>)>>,
    /// The peers the node shares a document with: only their requests are checked ahead.
    sharing: Arc<std::sync::RwLock<HashSet<IdentityKey>>>,
    /// Batches of ours under way: each round's document, the changes it carried, and its
    /// ticket.
    requests: HashMap<OutboundRequestId, (PeerId, Vec<Sent>)>,
    /// Rounds of ours under way in version 2, to peers that speak only that.
    legacy_requests: HashMap<OutboundRequestId, (PeerId, Sent)>,
    /// Connected peers of earlier releases, which speak version 2 of the sync protocol
    /// only (from identify, or from a batch they could not take).
    legacy: HashSet<PeerId>,
    /// Per peer: our sync requests in flight, and those waiting for one of them to end
    /// ([`MAX_REQUESTS_PER_PEER`]).
    outbox: HashMap<PeerId, Outbox>,
    /// Rounds to build, gathered while the loop handles one event and built together
    /// after it, a batch per peer ([`Loop::flush_rounds`]).
    starts: Vec<Start<PeerId, DocRef>>,
    /// Syncs waiting for a connection to the peer.
    waiting: HashMap<PeerId, Vec<Waiting>>,
    dials: HashMap<PeerId, Vec<(Multiaddr, DialReply)>>,
    addr_dials: Vec<(Multiaddr, DialReply)>,
    banned: HashMap<PeerId, Instant>,
    bad_requests: HashMap<PeerId, u32>,
    agents: HashMap<PeerId, String>,
    rtts: HashMap<PeerId, Duration>,
    listening: Vec<Multiaddr>,
    relay: Option<RelayLink>,
    deposits: HashMap<OutboundRequestId, Deposit>,
}

pub(crate) fn identity_of(peer: &PeerId) -> Option<IdentityKey> {
    IdentityKey::from_peer_id_bytes(&peer.to_bytes()).ok()
}

pub(crate) fn peer_of(id: &IdentityKey) -> PeerId {
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

/// `key` as a libp2p keypair: a Rapport identity is its libp2p identity.
pub(crate) fn libp2p_keypair(key: &SecretKey) -> Result<libp2p::identity::Keypair, NetError> {
    libp2p::identity::Keypair::ed25519_from_bytes(key.to_seed())
        .map_err(|e| NetError::Key(e.to_string()))
}

/// Identify, as every Rapport node and relay speaks it; `agent` names the program.
pub(crate) fn identify_behaviour(
    key: &libp2p::identity::Keypair,
    agent: &str,
) -> identify::Behaviour {
    identify::Behaviour::new(
        identify::Config::new("/rapport/1.0.0".into(), key.public())
            .with_agent_version(format!("{agent}/{}", env!("CARGO_PKG_VERSION"))),
    )
}

/// The connection limits of a node or relay, with at most `max_incoming` established
/// incoming connections: see the constants for why each is what it is.
pub(crate) fn connection_limits_behaviour(max_incoming: u32) -> connection_limits::Behaviour {
    connection_limits::Behaviour::new(
        connection_limits::ConnectionLimits::default()
            .with_max_pending_incoming(Some(MAX_PENDING_INCOMING))
            .with_max_established_incoming(Some(max_incoming))
            .with_max_pending_outgoing(Some(MAX_PENDING_OUTGOING))
            .with_max_established_outgoing(Some(MAX_ESTABLISHED_OUTGOING))
            .with_max_established_per_peer(Some(MAX_CONNECTIONS_PER_PEER)),
    )
}

/// Refuses a listen address whose fixed port another process holds. libp2p marks its
/// listening sockets for port reuse, so a second process would bind the same port without
/// error and take half the connections; a plain bind, which does not ask for reuse, fails
/// on a port in use, and is undone at once.
pub(crate) fn port_free(addr: &Multiaddr) -> Result<(), NetError> {
    let mut ip = None;
    let mut port = None;
    for p in addr.iter() {
        match p {
            Protocol::Ip4(a) => ip = Some(std::net::IpAddr::from(a)),
            Protocol::Ip6(a) => ip = Some(std::net::IpAddr::from(a)),
            Protocol::Tcp(n) if n != 0 => port = Some((n, true)),
            Protocol::Udp(n) if n != 0 => port = Some((n, false)),
            _ => {}
        }
    }
    let (Some(ip), Some((port, tcp))) = (ip, port) else {
        return Ok(());
    };
    let at = std::net::SocketAddr::new(ip, port);
    let bound = if tcp {
        std::net::TcpListener::bind(at).map(drop)
    } else {
        std::net::UdpSocket::bind(at).map(drop)
    };
    match bound {
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => Err(NetError::PortInUse {
            addr: addr.clone(),
            port,
        }),
        // Other failures (an address not on this machine…) are libp2p's to report.
        _ => Ok(()),
    }
}

/// A part of the network that could not be built, and libp2p's reason.
pub(crate) fn setup(what: &'static str, e: &dyn std::fmt::Display) -> NetError {
    NetError::Setup {
        what,
        detail: e.to_string(),
    }
}

/// Starts the network loop on the current tokio runtime.
pub(crate) fn start(
    key: &SecretKey,
    engine: EngineClient,
    startup: Startup,
    config: NetConfig,
) -> Result<(NetClient, tokio::task::JoinHandle<()>), NetError> {
    let keypair = libp2p_keypair(key)?;
    let stats = Arc::new(WireStats::default());
    let codec = SyncCodec::new(stats.clone());
    let mdns_on = config.mdns;
    let mail_stats = stats.clone();
    let relay_status = Arc::new(std::sync::Mutex::new(None));
    let relay = match &config.relay {
        None => None,
        Some(addr) => {
            let Some(Protocol::P2p(peer)) = addr.iter().last() else {
                return Err(NetError::RelayAddress(addr.clone()));
            };
            let link = RelayLink {
                addr: addr.clone(),
                peer,
                listening: false,
                fetching: false,
                dialing: true,
                reserved: false,
                warned: false,
                status: relay_status.clone(),
            };
            link.show(Some("not connected yet".into()));
            Some(link)
        }
    };
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|e| setup("TCP transport", &e))?
        .with_quic()
        .with_relay_client(noise::Config::new, yamux::Config::default)
        .map_err(|e| setup("relay client transport", &e))?
        .with_behaviour(|key, relay_client| {
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
                limits: connection_limits_behaviour(MAX_ESTABLISHED_INCOMING),
                per_ip: crate::ip_limits::Behaviour::default(),
                identify: identify_behaviour(key, "rapport"),
                ping: ping::Behaviour::new(ping::Config::new()),
                kad,
                mdns: Toggle::from(mdns),
                sync_batch: request_response::Behaviour::with_codec(
                    codec.sharing(),
                    [(
                        StreamProtocol::new(SYNC_BATCH_PROTOCOL),
                        ProtocolSupport::Full,
                    )],
                    request_response::Config::default()
                        .with_request_timeout(REQUEST_TIMEOUT)
                        .with_max_concurrent_streams(MAX_STREAMS_PER_CONNECTION / 2),
                ),
                sync: request_response::Behaviour::with_codec(
                    codec,
                    [(StreamProtocol::new(SYNC_PROTOCOL), ProtocolSupport::Full)],
                    request_response::Config::default()
                        .with_request_timeout(REQUEST_TIMEOUT)
                        .with_max_concurrent_streams(MAX_STREAMS_PER_CONNECTION / 2),
                ),
                relay_client,
                dcutr: dcutr::Behaviour::new(peer_id),
                rendezvous: rendezvous::client::Behaviour::new(key.clone()),
                mailbox: request_response::Behaviour::with_codec(
                    MailCodec::new(mail_stats.clone()),
                    [(
                        StreamProtocol::new(MAILBOX_PROTOCOL),
                        ProtocolSupport::Outbound,
                    )],
                    request_response::Config::default()
                        .with_request_timeout(REQUEST_TIMEOUT)
                        .with_max_concurrent_streams(16),
                ),
            }
        })
        .map_err(|e| setup("network behaviour", &e))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(IDLE_TIMEOUT))
        .build();
    for addr in &config.listen {
        port_free(addr)?;
        swarm
            .listen_on(addr.clone())
            .map_err(|e| NetError::Listen {
                addr: addr.clone(),
                detail: e.to_string(),
            })?;
    }
    // Known peers' addresses seed Kademlia, so dialling a peer by identity finds them.
    for (id, rec) in startup.known {
        for a in rec.addrs {
            if let Ok(addr) = a.parse::<Multiaddr>() {
                swarm.behaviour_mut().kad.add_address(&peer_of(&id), addr);
            }
        }
    }
    if let Some(link) = &relay
        && let Err(e) = swarm.dial(link.addr.clone())
    {
        tracing::warn!("cannot dial the relay {}: {e}", link.addr);
    }
    for addr in &config.bootstrap {
        if let Some(libp2p::multiaddr::Protocol::P2p(peer)) = addr.iter().last() {
            swarm.behaviour_mut().kad.add_address(&peer, addr.clone());
        }
        if let Err(e) = swarm.dial(addr.clone()) {
            tracing::warn!("cannot dial bootstrap {addr}: {e}");
        }
    }
    // Bans outlive a restart: a peer banned a minute ago is still banned.
    let t = startup.now;
    let bans: HashMap<PeerId, Instant> = startup
        .bans
        .into_iter()
        .map(|(id, until)| {
            (
                peer_of(&id),
                Instant::now() + Duration::from_secs(until.saturating_sub(t)),
            )
        })
        .collect();
    let events = engine.event_sender();
    let (tx, rx) = mpsc::channel(1024);
    let (internal_tx, internal_rx) = mpsc::channel(INTERNAL_QUEUE);
    let lp = Loop {
        swarm,
        engine,
        deferred: VecDeque::new(),
        sweeping: false,
        redials: Redials::new(config.redial_every, REDIAL_MAX),
        redial_every: config.redial_every,
        lookups: HashMap::new(),
        stats: stats.clone(),
        events,
        internal_tx,
        sessions: Sessions::default(),
        to_check: VecDeque::new(),
        checking: InOrder::default(),
        sharing: startup.sharing.clone(),
        requests: HashMap::new(),
        legacy_requests: HashMap::new(),
        legacy: HashSet::new(),
        outbox: HashMap::new(),
        starts: Vec::new(),
        waiting: HashMap::new(),
        dials: HashMap::new(),
        addr_dials: Vec::new(),
        banned: bans,
        bad_requests: HashMap::new(),
        agents: HashMap::new(),
        rtts: HashMap::new(),
        listening: Vec::new(),
        relay,
        deposits: HashMap::new(),
    };
    let handle = tokio::spawn(lp.run(rx, internal_rx));
    Ok((
        NetClient {
            tx,
            stats,
            relay: relay_status,
        },
        handle,
    ))
}

impl Loop {
    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut internal: mpsc::Receiver<Internal>,
    ) {
        let mut redial = tokio::time::interval(self.redial_every);
        let engine = self.engine.clone();
        loop {
            tokio::select! {
                // Room in the engine's queue for what waits: first, in order.
                Some(permit) = engine.reserve(), if !self.deferred.is_empty() => {
                    if let Some(job) = self.deferred.pop_front() {
                        crate::actor::send_with(permit, job);
                    }
                }
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
            self.flush_rounds();
        }
    }

    fn finish_all(&mut self) {
        for e in self.sessions.drain("the node stopped") {
            for w in e.waiters {
                let _ = w.send(SyncResult::Offline("the node stopped".into()));
            }
        }
    }

    /// Runs `f` on the engine actor. The results it pushes reach the loop once what it
    /// wrote is durable (see [`Internal::failed`] for when it could not be). The loop never
    /// waits: a job that does not fit the engine's queue waits in `deferred`.
    fn with_engine<F>(&mut self, f: F)
    where
        F: FnOnce(&mut Engine, &mut Vec<Internal>) + Send + 'static,
    {
        self.with_engine_or(f, None);
    }

    /// [`Loop::with_engine`], with the result the loop gets instead when the engine cannot
    /// run `f` now (whatever `f` holds is dropped: waiters hear that it failed).
    fn with_engine_or<F>(&mut self, f: F, unavailable: Option<Internal>)
    where
        F: FnOnce(&mut Engine, &mut Vec<Internal>) + Send + 'static,
    {
        let tx = self.internal_tx.clone();
        let job: Job = Box::new(move |engine| {
            let mut out = Vec::new();
            match engine {
                Ok(e) => f(e, &mut out),
                Err(err) => {
                    tracing::warn!("the engine cannot work now: {err}");
                    out.extend(unavailable);
                }
            }
            let done: Done = Box::new(move |synced| {
                for msg in out {
                    let msg = match synced {
                        Ok(()) => Some(msg),
                        Err(err) => msg.failed(err),
                    };
                    // The loop always drains this queue and never waits for the engine, so
                    // waiting here for room cannot deadlock.
                    if let Some(msg) = msg {
                        let _ = tx.blocking_send(msg);
                    }
                }
            });
            done
        });
        self.submit(job);
    }

    /// Queues `job` for the engine, or keeps it for later if the engine's queue is full.
    fn submit(&mut self, job: Job) {
        if !self.deferred.is_empty() {
            self.deferred.push_back(job);
            return;
        }
        match self.engine.try_submit(job) {
            Ok(()) => {}
            Err(TrySubmit::Full(job)) => self.deferred.push_back(job),
            Err(TrySubmit::Stopped) => tracing::debug!("the engine stopped; a job was dropped"),
        }
    }

    /// Whether the engine is so far behind that peers' requests should be turned away.
    fn overloaded(&self) -> bool {
        self.deferred.len() + self.to_check.len() >= MAX_DEFERRED
    }

    /// Checks the next requests waiting, unless a batch is being checked: decodes their
    /// changes and verifies their signatures on a blocking thread
    /// ([`replica::check_requests`]), beside the engine and across requests, up to
    /// [`CHECK_BATCH_CHANGES`] changes at once. The requests then go to the engine in the
    /// order they arrived ([`Internal::Checked`]), which spares verifying what was checked
    /// here and runs every other rule.
    fn check_next(&mut self) {
        while self.checking.under_way() < max_checking() && !self.to_check.is_empty() {
            self.check_batch();
        }
    }

    /// Checks the next batch of requests waiting ([`Loop::check_next`]).
    fn check_batch(&mut self) {
        let mut batch = Vec::new();
        let mut changes = 0;
        while let Some((_, reqs)) = self.to_check.front() {
            let n: usize = reqs.iter().map(|r| r.changes.len()).sum();
            if !batch.is_empty() && changes + n > CHECK_BATCH_CHANGES {
                break;
            }
            changes += n;
            batch.extend(self.to_check.pop_front());
        }
        let number = self.checking.start();
        let tx = self.internal_tx.clone();
        tokio::task::spawn_blocking(move || {
            let mut who = Vec::with_capacity(batch.len());
            let mut reqs = Vec::new();
            for (w, r) in batch {
                who.push((w, r.len()));
                reqs.extend(r);
            }
            // Nothing here is expected to panic (decoding contains Automerge's panics); if
            // it did, the requests are dropped (they fail on the peers' side, which try
            // again) and checking goes on.
            let checked = std::panic::catch_unwind(|| replica::check_requests(reqs))
                .map(|c| {
                    let mut c = c.into_iter();
                    who.into_iter()
                        .map(|(w, n)| (w, c.by_ref().take(n).collect()))
                        .collect()
                })
                .unwrap_or_default();
            let _ = tx.blocking_send(Internal::Checked(number, checked));
        });
    }

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Sync { peer, doc, reply } => self.sync(peer, doc, reply),
            Command::Dial { addr, reply } => {
                let peer = dial_target(&addr);
                if let Some(peer) = peer
                    && self.swarm.is_connected(&peer)
                {
                    let _ = reply.send(Ok(peer));
                    return;
                }
                match self.swarm.dial(addr.clone()) {
                    Ok(()) => match peer {
                        Some(peer) => self.dials.entry(peer).or_default().push((addr, reply)),
                        None => self.addr_dials.push((addr, reply)),
                    },
                    Err(e) => {
                        let _ = reply.send(Err(DialError::Failed {
                            addr,
                            detail: e.to_string(),
                        }));
                    }
                }
            }
            Command::Peers { reply } => {
                // What the swarm knows is read here; the store on a blocking thread, so the
                // loop never waits for the engine.
                let connected: HashSet<PeerId> = self.swarm.connected_peers().copied().collect();
                let agents = self.agents.clone();
                let rtts = self.rtts.clone();
                self.with_engine(move |e, _| {
                    let stored = e.store().peers().unwrap_or_default();
                    let info = |p: &PeerId, connected: bool, addrs: Vec<String>| PeerInfo {
                        peer: p.to_string(),
                        connected,
                        addrs,
                        agent: agents.get(p).cloned(),
                        rtt_ms: rtts.get(p).map(|d| d.as_millis() as u64),
                    };
                    let mut out: Vec<PeerInfo> = stored
                        .into_iter()
                        .map(|(id, rec)| {
                            let p = peer_of(&id);
                            info(&p, connected.contains(&p), rec.addrs)
                        })
                        .collect();
                    for p in &connected {
                        if !out.iter().any(|i| i.peer == p.to_string()) {
                            out.push(info(p, true, Vec::new()));
                        }
                    }
                    out.sort_by(|a, b| (!a.connected, &a.peer).cmp(&(!b.connected, &b.peer)));
                    let _ = reply.send(out);
                });
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
            let relay_coming = self.relay.as_ref().is_some_and(|l| l.dialing);
            if first && !relay_coming {
                self.dial_waiting(pid);
            }
            return;
        }
        // A bounded number of sessions per peer run at once; the rest wait their turn (a
        // node with a thousand relationships must not open a thousand streams at once).
        if let Some(start) = self.sessions.want(pid, doc, reply) {
            self.next_round(start);
        }
    }

    /// Gathers a round to build: the rounds gathered while the loop handles one event are
    /// built together after it ([`Loop::flush_rounds`]).
    fn next_round(&mut self, start: Start<PeerId, DocRef>) {
        self.starts.push(start);
    }

    /// Builds the rounds gathered, in one engine job per peer and batch of at most
    /// [`MAX_BATCH_ROUNDS`]; each batch goes to the peer as one message
    /// ([`Internal::Send`]).
    fn flush_rounds(&mut self) {
        // Ending a session below can start the next one: those are built in the next pass.
        while !self.starts.is_empty() {
            let mut order = Vec::new();
            let mut by_peer: HashMap<PeerId, Vec<Start<PeerId, DocRef>>> = HashMap::new();
            for start in std::mem::take(&mut self.starts) {
                by_peer
                    .entry(start.peer)
                    .or_insert_with(|| {
                        order.push(start.peer);
                        Vec::new()
                    })
                    .push(start);
            }
            for peer in order {
                let starts = by_peer.remove(&peer).unwrap_or_default();
                let Some(id) = identity_of(&peer) else {
                    for start in starts {
                        if let Some(e) = self
                            .sessions
                            .failed(start.ticket, "not a Rapport identity".into())
                        {
                            self.end(e);
                        }
                    }
                    continue;
                };
                let mut starts = starts.into_iter().peekable();
                while starts.peek().is_some() {
                    let batch: Vec<_> = starts.by_ref().take(MAX_BATCH_ROUNDS).collect();
                    self.build_rounds(peer, id, batch);
                }
            }
        }
    }

    /// One engine job that builds `batch`'s rounds with `peer` ([`Internal::Send`]).
    fn build_rounds(&mut self, peer: PeerId, id: IdentityKey, batch: Vec<Start<PeerId, DocRef>>) {
        let tickets: Vec<Ticket> = batch.iter().map(|s| s.ticket).collect();
        let unavailable = Internal::unavailable(peer, &tickets);
        self.with_engine_or(
            move |e, out| {
                let now = e.now();
                let rounds = batch
                    .into_iter()
                    .map(|Start { doc, ticket, .. }| {
                        let req = e.round_request(&id, &doc, now).unwrap_or_else(|err| {
                            tracing::warn!("cannot start a sync round: {err}");
                            None
                        });
                        (ticket, req)
                    })
                    .collect();
                out.push(Internal::Send { peer, rounds });
            },
            Some(unavailable),
        );
    }

    /// A session ended: tell whoever waits (or, for a peer that went away mid-session
    /// while the relay is there, leave what it lacks in its mailbox), and start the session
    /// that took its slot.
    fn end(&mut self, end: End<PeerId, DocRef, oneshot::Sender<SyncResult>, PeerRefusal>) {
        let End {
            peer,
            doc,
            waiters,
            ending,
            next,
        } = end;
        let result = match ending {
            Ending::Done => SyncResult::Delivered,
            Ending::Refused(r) => SyncResult::Refused(r),
            Ending::NotShared => SyncResult::NotShared,
            Ending::Broken(why) => SyncResult::Offline(why),
        };
        let lost = matches!(result, SyncResult::Offline(_))
            && !self.swarm.is_connected(&peer)
            && self.relay_connected()
            && self.relay.as_ref().is_some_and(|l| l.peer != peer);
        if lost {
            // The peer went away mid-session: what it lacks goes to its mailbox.
            let mut list: Vec<Waiting> = vec![(doc, None)];
            list.extend(waiters.into_iter().map(|w| (doc, Some(w))));
            self.deposit(peer, list);
        } else {
            for w in waiters {
                let _ = w.send(result.clone());
            }
        }
        if let Some(start) = next {
            self.next_round(start);
        }
    }

    /// Hands checked requests to the engine in the order they arrived (batch `number` once
    /// every earlier batch has gone), and checks the next ones.
    fn checked(&mut self, number: u64, checked: Vec<(Requester, Vec<CheckedRequest>)>) {
        for checked in self.checking.finished(number, checked) {
            for (who, requests) in checked {
                self.checked_one(who, requests);
            }
        }
        self.check_next();
    }

    /// Hands one request (a round, or a batch's rounds) to the engine, which answers each
    /// round in order.
    fn checked_one(&mut self, who: Requester, requests: Vec<CheckedRequest>) {
        let Requester { peer, id, reply } = who;
        self.with_engine(move |e, out| {
            let now = e.now();
            let rounds = requests.len();
            let mut resps = Vec::with_capacity(rounds);
            let mut all_pushes = Vec::new();
            let mut disconnect = false;
            for request in requests {
                if disconnect {
                    // Past the limit: the rest of the batch is not looked at.
                    resps.push(SyncResponse::Refused {
                        code: RefusalCode::RateLimited,
                        detail: "too many refused changes: disconnected".into(),
                    });
                    continue;
                }
                let (resp, pushes, bad) = match reply {
                    Reply::One(_) => e.handle_request(&id, request, now),
                    Reply::Batch(_) => e.handle_batch_round(&id, request, now, rounds),
                };
                resps.push(resp);
                all_pushes.extend(pushes);
                disconnect |= bad;
            }
            if !all_pushes.is_empty() {
                out.push(Internal::Pushes(all_pushes));
            }
            out.push(Internal::Respond {
                peer,
                reply,
                resps,
                disconnect,
            });
        });
    }

    fn internal(&mut self, msg: Internal) {
        match msg {
            Internal::Checked(number, checked) => self.checked(number, checked),
            Internal::Send { peer, rounds } => self.send_rounds(peer, rounds),
            Internal::Respond {
                peer,
                reply,
                resps,
                disconnect,
            } => {
                let sent = match reply {
                    Reply::One(channel) => {
                        let resp = resps.into_iter().next().unwrap_or(SyncResponse::Refused {
                            code: RefusalCode::Unavailable,
                            detail: "no answer".into(),
                        });
                        self.swarm
                            .behaviour_mut()
                            .sync
                            .send_response(channel, resp)
                            .is_ok()
                    }
                    Reply::Batch(channel) => self
                        .swarm
                        .behaviour_mut()
                        .sync_batch
                        .send_response(channel, SyncBatchResponse::Rounds(resps))
                        .is_ok(),
                };
                if !sent {
                    tracing::debug!(%peer, "could not answer: the request was dropped");
                }
                if disconnect {
                    self.ban(peer);
                }
            }
            Internal::RoundsDone { peer, rounds } => {
                for (ticket, outcome) in rounds {
                    let round = match outcome {
                        Ok(o) => {
                            if o.disconnect {
                                self.ban(peer);
                            }
                            Ok(o)
                        }
                        Err(e) => Err(format!("sync failed here: {e}")),
                    };
                    match self.sessions.answered(ticket, round) {
                        Step::Round(start) => self.next_round(start),
                        Step::End(e) => self.end(e),
                        Step::Stale => {}
                    }
                }
            }
            Internal::Pushes(pushes) => {
                for (peer, doc) in pushes {
                    self.sync(peer, doc, None);
                }
            }
            Internal::SweepPeers { peers, after } => {
                let now = Instant::now();
                let due: Vec<IdentityKey> = peers
                    .into_iter()
                    .filter(|p| {
                        let pid = peer_of(p);
                        !self.swarm.is_connected(&pid)
                            && self.banned.get(&pid).is_none_or(|t| *t <= now)
                            && self.redials.due(&pid, now)
                    })
                    .collect();
                self.sweep_on(due, after);
            }
            Internal::SweepPushes {
                pushes,
                rest,
                after,
            } => {
                let now = Instant::now();
                for (peer, doc) in pushes {
                    // A peer's first document may have found it unreachable: the others
                    // wait with it.
                    if self.redials.due(&peer_of(&peer), now) {
                        self.sync(peer, doc, None);
                    }
                }
                self.sweep_on(rest, after);
            }
            Internal::Sealed {
                peer,
                sealed,
                replies,
            } => self.send_deposit(peer, sealed, replies),
            Internal::MailOpened { last, report } => {
                if report.opened > 0 || report.refused > 0 {
                    tracing::info!(
                        opened = report.opened,
                        applied = report.applied,
                        refused = report.refused,
                        "mail from the relay"
                    );
                }
                if let Some(l) = self.relay.as_mut() {
                    l.fetching = false;
                }
                // Asking for the next batch acknowledges this one.
                self.fetch_mail(last);
            }
        }
    }

    /// Sends the rounds built for `peer`: those still current, as batches of at most
    /// [`CHUNK_BYTES`] of rounds (a larger round goes alone).
    fn send_rounds(&mut self, peer: PeerId, rounds: Vec<(Ticket, Option<Built>)>) {
        let mut ready = Vec::new();
        for (ticket, req) in rounds {
            match req {
                None => {
                    if let Some(e) = self.sessions.built(ticket, false) {
                        self.end(e);
                    }
                }
                // The session ended meanwhile (its peer went away): nothing to send.
                Some(_) if !self.sessions.is_current(ticket) => {}
                Some((req, sent)) => ready.push((req, sent, ticket)),
            }
        }
        if ready.is_empty() {
            return;
        }
        if !self.swarm.is_connected(&peer) {
            for (_, _, ticket) in ready {
                if let Some(e) = self.sessions.failed(ticket, "the peer disconnected".into()) {
                    self.end(e);
                }
            }
            return;
        }
        if self.legacy.contains(&peer) {
            for (req, sent, ticket) in ready {
                let doc = req.doc;
                self.dispatch(peer, Outgoing::One(req, (doc, sent, ticket)));
            }
            return;
        }
        let mut batch = Vec::new();
        let mut size = 0;
        for round in ready {
            let len = round.0.encoded_body_len();
            if !batch.is_empty() && size + len > CHUNK_BYTES {
                self.send_batch(peer, std::mem::take(&mut batch));
                size = 0;
            }
            size += len;
            batch.push(round);
        }
        self.send_batch(peer, batch);
    }

    /// Sends one batch of rounds to `peer`.
    fn send_batch(&mut self, peer: PeerId, batch: Vec<(SyncRequest, Vec<ChangeHash>, Ticket)>) {
        let mut rounds = Vec::with_capacity(batch.len());
        let mut meta = Vec::with_capacity(batch.len());
        for (req, sent, ticket) in batch {
            meta.push((req.doc, sent, ticket));
            rounds.push(req);
        }
        self.dispatch(peer, Outgoing::Batch(rounds, meta));
    }

    /// Sends `out` to `peer` now, or once fewer than [`MAX_REQUESTS_PER_PEER`] of ours are
    /// in flight with it.
    fn dispatch(&mut self, peer: PeerId, out: Outgoing) {
        let outbox = self.outbox.entry(peer).or_default();
        if outbox.in_flight >= MAX_REQUESTS_PER_PEER {
            outbox.waiting.push_back(out);
            return;
        }
        outbox.in_flight += 1;
        let b = self.swarm.behaviour_mut();
        match out {
            Outgoing::Batch(rounds, meta) => {
                let id = b.sync_batch.send_request(&peer, Ok(SyncBatch { rounds }));
                self.requests.insert(id, (peer, meta));
            }
            Outgoing::One(req, sent) => {
                let id = b.sync.send_request(&peer, Ok(req));
                self.legacy_requests.insert(id, (peer, sent));
            }
        }
    }

    /// A request of ours with `peer` ended (answered or failed): the next waiting goes.
    fn request_ended(&mut self, peer: PeerId) {
        let Some(outbox) = self.outbox.get_mut(&peer) else {
            return;
        };
        outbox.in_flight = outbox.in_flight.saturating_sub(1);
        match outbox.waiting.pop_front() {
            Some(next) => self.dispatch(peer, next),
            None if outbox.in_flight == 0 => {
                self.outbox.remove(&peer);
            }
            None => {}
        }
    }

    /// Dials a peer that syncs wait for; if it has no address at all, tells them so.
    fn dial_waiting(&mut self, pid: PeerId) {
        self.stats.dials.fetch_add(1, Ordering::Relaxed);
        match self.swarm.dial(self.dial_opts(pid)) {
            // A dial is already under way (or the peer just connected): its outcome serves
            // the waiting syncs too.
            Ok(()) | Err(libp2p::swarm::DialError::DialPeerConditionFalse(_)) => {}
            Err(e) => self.unreachable(pid, &e.to_string()),
        }
    }

    /// Tells the syncs waiting for `pid` that it has no address to dial.
    fn unreachable(&mut self, pid: PeerId, e: &str) {
        tracing::debug!(%pid, "cannot dial: {e}");
        self.redials.failed(pid, Instant::now());
        // No address known: ask the DHT, when it has peers to ask and few lookups are under
        // way (the next sweep asks again); the sync waits for a connection.
        let kad = &mut self.swarm.behaviour_mut().kad;
        let knows_peers = kad.kbuckets().any(|b| b.num_entries() > 0);
        if knows_peers
            && self.lookups.len() < MAX_LOOKUPS
            && !self.lookups.values().any(|p| *p == pid)
        {
            let query = kad.get_closest_peers(pid);
            self.lookups.insert(query, pid);
            self.stats.lookups.fetch_add(1, Ordering::Relaxed);
        }
        let waiting = self.waiting.remove(&pid).unwrap_or_default();
        for (_, r) in waiting {
            if let Some(r) = r {
                let _ = r.send(SyncResult::Offline(format!(
                    "{pid} is not reachable now (no known address); it syncs when it connects"
                )));
            }
        }
    }

    /// The relay connected or could not be reached: dial the peers syncs wait for.
    fn relay_settled(&mut self) {
        let Some(link) = self.relay.as_mut() else {
            return;
        };
        if !std::mem::replace(&mut link.dialing, false) {
            return;
        }
        let peers: Vec<PeerId> = self
            .waiting
            .keys()
            .filter(|p| !self.swarm.is_connected(p))
            .copied()
            .collect();
        for p in peers {
            self.dial_waiting(p);
        }
    }

    /// How to dial `peer`: its known addresses, and its circuit at the relay.
    fn dial_opts(&self, peer: PeerId) -> DialOpts {
        match &self.relay {
            Some(link) if link.peer != peer => DialOpts::peer_id(peer)
                .addresses(vec![
                    link.addr
                        .clone()
                        .with(Protocol::P2pCircuit)
                        .with(Protocol::P2p(peer)),
                ])
                .extend_addresses_through_behaviour()
                .build(),
            _ => DialOpts::peer_id(peer).build(),
        }
    }

    /// The relay's connection closed. Closed before it accepted a reservation, it turned
    /// this node away: a relay in allow-list mode (the default) admits only its members.
    /// That is said once in the log, with what to ask for, and shown in `rapport peers`.
    fn relay_lost(&mut self) {
        let me = *self.swarm.local_peer_id();
        let Some(l) = self.relay.as_mut() else {
            return;
        };
        if std::mem::replace(&mut l.reserved, false) {
            l.show(Some("the connection closed; reconnecting".into()));
            return;
        }
        let problem = "the relay closed the connection before accepting a reservation: it admits only the identities on its allow-list, and this node is probably not one of them";
        if !std::mem::replace(&mut l.warned, true) {
            tracing::warn!(
                "{problem}. Ask the community that runs {} to admit this node: `rapport relay allow {me}`",
                l.peer
            );
        }
        l.show(Some(format!(
            "{problem}; ask for `rapport relay allow {me}`"
        )));
    }

    fn relay_connected(&self) -> bool {
        self.relay
            .as_ref()
            .is_some_and(|l| self.swarm.is_connected(&l.peer))
    }

    /// Connected to the relay: reserve a circuit, fetch mail, look for members.
    fn relay_connected_now(&mut self) {
        let Some(link) = self.relay.as_mut() else {
            return;
        };
        if !link.listening {
            let circuit = link.addr.clone().with(Protocol::P2pCircuit);
            match self.swarm.listen_on(circuit.clone()) {
                Ok(_) => link.listening = true,
                Err(e) => tracing::warn!("cannot listen through the relay at {circuit}: {e}"),
            }
        }
        self.fetch_mail(0);
        self.discover();
    }

    fn register(&mut self) {
        let Some(link) = &self.relay else { return };
        let peer = link.peer;
        if let Err(e) = self.swarm.behaviour_mut().rendezvous.register(
            rendezvous::Namespace::from_static(RENDEZVOUS_NAMESPACE),
            peer,
            None,
        ) {
            tracing::warn!("cannot register at the relay's rendezvous point: {e}");
        }
    }

    fn discover(&mut self) {
        let Some(link) = &self.relay else { return };
        let peer = link.peer;
        self.swarm.behaviour_mut().rendezvous.discover(
            Some(rendezvous::Namespace::from_static(RENDEZVOUS_NAMESPACE)),
            None,
            None,
            peer,
        );
    }

    fn rendezvous_event(&mut self, ev: rendezvous::client::Event) {
        match ev {
            rendezvous::client::Event::Discovered { registrations, .. } => {
                let me = *self.swarm.local_peer_id();
                for reg in registrations {
                    let peer = reg.record.peer_id();
                    if peer == me {
                        continue;
                    }
                    for a in reg.record.addresses() {
                        self.swarm.behaviour_mut().kad.add_address(&peer, a.clone());
                    }
                    if self.waiting.contains_key(&peer) && !self.swarm.is_connected(&peer) {
                        let _ = self.swarm.dial(self.dial_opts(peer));
                    }
                }
            }
            rendezvous::client::Event::Registered { ttl, .. } => {
                tracing::info!("registered at the relay's rendezvous point for {ttl}s");
            }
            other => tracing::debug!("rendezvous: {other:?}"),
        }
    }

    /// Asks the relay for mail after `after` (which acknowledges everything up to it).
    fn fetch_mail(&mut self, after: u64) {
        if !self.relay_connected() {
            return;
        }
        let Some(link) = self.relay.as_mut() else {
            return;
        };
        if link.fetching {
            return;
        }
        link.fetching = true;
        let peer = link.peer;
        self.swarm
            .behaviour_mut()
            .mailbox
            .send_request(&peer, Ok(MailRequest::Fetch { after }));
    }

    /// Seals what `peer` lacks of the waiting documents for its mailbox at the relay.
    fn deposit(&mut self, peer: PeerId, waiting: Vec<Waiting>) {
        let Some(id) = identity_of(&peer) else {
            return;
        };
        self.with_engine(move |e, out| {
            let mut docs: Vec<DocRef> = Vec::new();
            let mut replies = Vec::new();
            for (d, r) in waiting {
                if !docs.contains(&d) {
                    docs.push(d);
                }
                replies.extend(r);
            }
            let mut sealed = Vec::new();
            for d in docs {
                match e.envelopes_for(&id, &d, e.now()) {
                    Ok((s, pushes)) => {
                        if !pushes.is_empty() {
                            out.push(Internal::Pushes(pushes));
                        }
                        if !s.envelopes.is_empty() {
                            sealed.push((d, s));
                        }
                    }
                    Err(err) => tracing::warn!("cannot seal mail for {id}: {err}"),
                }
            }
            out.push(Internal::Sealed {
                peer,
                sealed,
                replies,
            });
        });
    }

    fn send_deposit(
        &mut self,
        peer: PeerId,
        sealed: Vec<(DocRef, Sealed)>,
        replies: Vec<oneshot::Sender<SyncResult>>,
    ) {
        let relay = match &self.relay {
            Some(l) if self.swarm.is_connected(&l.peer) => l.peer,
            _ => {
                for r in replies {
                    let _ = r.send(SyncResult::Offline(
                        "the peer is not reachable and the relay is not connected".into(),
                    ));
                }
                return;
            }
        };
        if sealed.is_empty() {
            for r in replies {
                let _ = r.send(SyncResult::Deposited(
                    "its mailbox already holds everything".into(),
                ));
            }
            return;
        }
        // Cut into requests under the message limits; each document's heads ride on the
        // request that carries its last envelope.
        let mut batches: Vec<DepositBatch> = vec![(Vec::new(), Vec::new())];
        let mut size = 0;
        for (doc, s) in sealed {
            for env in s.envelopes {
                let cur = batches.last_mut().expect("one batch");
                if !cur.0.is_empty()
                    && (cur.0.len() >= MAX_ENVELOPES_PER_MESSAGE
                        || size + env.len() > MAX_MAIL_BATCH_BYTES)
                {
                    batches.push((Vec::new(), Vec::new()));
                    size = 0;
                }
                size += env.len();
                batches.last_mut().expect("one batch").0.push(env);
            }
            batches
                .last_mut()
                .expect("one batch")
                .1
                .push((doc, s.heads));
        }
        let mut replies = Some(replies);
        let n = batches.len();
        for (i, (envs, docs)) in batches.into_iter().enumerate() {
            let id = self
                .swarm
                .behaviour_mut()
                .mailbox
                .send_request(&relay, Ok(MailRequest::Deposit(envs)));
            let replies = if i + 1 == n {
                replies.take().unwrap_or_default()
            } else {
                Vec::new()
            };
            self.deposits.insert(
                id,
                Deposit {
                    peer,
                    docs,
                    replies,
                },
            );
        }
    }

    fn mail_event(&mut self, ev: request_response::Event<Inbound<MailRequest>, MailResponse>) {
        match ev {
            request_response::Event::Message {
                message:
                    request_response::Message::Response {
                        request_id,
                        response,
                    },
                ..
            } => {
                if let Some(dep) = self.deposits.remove(&request_id) {
                    self.deposit_done(dep, response);
                    return;
                }
                // A fetch.
                match response {
                    MailResponse::Mail { items, .. } if !items.is_empty() => {
                        let last = items.iter().map(|(s, _)| *s).max().unwrap_or(0);
                        let envs: Vec<Vec<u8>> = items.into_iter().map(|(_, e)| e).collect();
                        let unavailable = Internal::MailOpened {
                            last: 0,
                            report: MailReport::default(),
                        };
                        self.with_engine_or(
                            move |e, out| {
                                let report = match e.open_mail(&envs, e.now()) {
                                    Ok((report, pushes)) => {
                                        out.push(Internal::Pushes(pushes));
                                        report
                                    }
                                    Err(err) => {
                                        // Not stored: do not acknowledge; it comes again.
                                        tracing::error!("cannot take mail: {err}");
                                        out.push(Internal::MailOpened {
                                            last: 0,
                                            report: MailReport::default(),
                                        });
                                        return;
                                    }
                                };
                                out.push(Internal::MailOpened { last, report });
                            },
                            Some(unavailable),
                        );
                    }
                    MailResponse::Refused { detail, .. } => {
                        tracing::warn!("the relay refused to hand over mail: {detail}");
                        if let Some(l) = self.relay.as_mut() {
                            l.fetching = false;
                        }
                    }
                    _ => {
                        if let Some(l) = self.relay.as_mut() {
                            l.fetching = false;
                        }
                    }
                }
            }
            request_response::Event::OutboundFailure {
                request_id, error, ..
            } => {
                if let Some(dep) = self.deposits.remove(&request_id) {
                    for r in dep.replies {
                        let _ = r.send(SyncResult::Offline(format!(
                            "the peer is not reachable and the relay did not take the mail: {error}"
                        )));
                    }
                } else if let Some(l) = self.relay.as_mut() {
                    tracing::debug!("mail fetch failed: {error}");
                    l.fetching = false;
                }
            }
            _ => {}
        }
    }

    fn deposit_done(&mut self, dep: Deposit, response: MailResponse) {
        let Some(id) = identity_of(&dep.peer) else {
            return;
        };
        match response {
            MailResponse::Stored { count } => {
                tracing::info!(peer = %dep.peer, count, "sealed mail left at the relay");
                let docs = dep.docs;
                self.with_engine(move |e, _| {
                    for (d, heads) in docs {
                        e.deposited(&id, &d, heads);
                    }
                });
                for r in dep.replies {
                    let _ = r.send(SyncResult::Deposited(format!(
                        "not reachable; {count} sealed envelope(s) in its mailbox"
                    )));
                }
            }
            MailResponse::Refused { code, detail } => {
                tracing::warn!(peer = %dep.peer, ?code, "the relay refused mail: {detail}");
                let _ = self.events.send(Event::MailRefused {
                    peer: id,
                    reason: detail.clone(),
                });
                for r in dep.replies {
                    let _ = r.send(SyncResult::Offline(format!(
                        "{id} is not reachable, and the relay refused its mail: {detail}"
                    )));
                }
            }
            MailResponse::Mail { .. } => {}
        }
    }

    fn ban(&mut self, peer: PeerId) {
        tracing::warn!(%peer, "disconnecting a peer that sent too many bad changes or requests");
        let at = Instant::now();
        // Bans that ended are forgotten, so the list holds only peers banned now.
        self.banned.retain(|_, until| *until > at);
        self.banned.insert(peer, at + BAN_FOR);
        self.bad_requests.remove(&peer);
        let _ = self.swarm.disconnect_peer_id(peer);
        // The ban outlives a restart (the engine records bans for refused changes itself).
        if let Some(id) = identity_of(&peer) {
            self.with_engine(move |e, _| {
                let mut c = e.store().conduct(&id).ok().flatten().unwrap_or_default();
                let until = e.now() + BAN_FOR.as_secs();
                if c.banned_until < until {
                    c.banned_until = until;
                    if let Err(err) = e.store().put_conduct(&id, &c) {
                        tracing::warn!("cannot record a ban: {err}");
                    }
                }
            });
        }
    }

    fn redial(&mut self) {
        if let Some(link) = &self.relay {
            if self.swarm.is_connected(&link.peer) {
                self.relay_connected_now();
            } else if let Err(e) = self.swarm.dial(link.addr.clone()) {
                tracing::debug!("cannot dial the relay: {e}");
            }
        }
        if !self.sweeping {
            self.sweeping = true;
            self.sweep_list(None);
        }
    }

    /// The redial sweep's next step: push to the `due` counterparts, then list those after
    /// `after`; or the sweep is over.
    fn sweep_on(&mut self, due: Vec<IdentityKey>, after: Option<IdentityKey>) {
        if !due.is_empty() {
            self.sweep_push(due, after);
        } else if after.is_some() {
            self.sweep_list(after);
        } else {
            self.sweeping = false;
            self.stats.sweeps.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Lists the next [`SWEEP_BATCH`] peers after `after` this node shares documents with
    /// (from the engine's index: cheap). The loop keeps those not connected and not waiting
    /// after failed dials ([`Redials`]) for [`Loop::sweep_push`].
    fn sweep_list(&mut self, after: Option<IdentityKey>) {
        self.with_engine_or(
            move |e, out| {
                let peers = e.counterparts_after(after, SWEEP_BATCH);
                let after = (peers.len() == SWEEP_BATCH)
                    .then(|| peers.last().copied())
                    .flatten();
                out.push(Internal::SweepPeers { peers, after });
            },
            Some(Internal::SweepPeers {
                peers: Vec::new(),
                after: None,
            }),
        );
    }

    /// One slice of the redial sweep: what this node shares with each of `due`, for at
    /// most [`SWEEP_SLICE`] of the engine's time; the loop then asks for the next slice, so
    /// other work runs in between however many peers there are.
    fn sweep_push(&mut self, due: Vec<IdentityKey>, after: Option<IdentityKey>) {
        self.with_engine_or(
            move |e, out| {
                let started = std::time::Instant::now();
                let now = e.now();
                let mut pushes: Vec<Push> = Vec::new();
                let mut due = due.into_iter();
                for p in due.by_ref() {
                    pushes.extend(e.shared_with(&p, now).into_iter().map(|d| (p, d)));
                    if started.elapsed() >= SWEEP_SLICE {
                        break;
                    }
                }
                out.push(Internal::SweepPushes {
                    pushes,
                    rest: due.collect(),
                    after,
                });
            },
            Some(Internal::SweepPeers {
                peers: Vec::new(),
                after: None,
            }),
        );
    }

    fn on_connected(&mut self, peer: PeerId, endpoint: &ConnectedPoint) {
        if self.banned.get(&peer).is_some_and(|t| *t > Instant::now()) {
            let _ = self.swarm.disconnect_peer_id(peer);
            return;
        }
        let _ = self.events.send(Event::PeerConnected {
            peer: peer.to_string(),
        });
        self.redials.connected(&peer);
        for r in self.dials.remove(&peer).unwrap_or_default() {
            let _ = r.1.send(Ok(peer));
        }
        let remote = endpoint.get_remote_address().clone();
        let mut rest = Vec::new();
        for (addr, r) in self.addr_dials.drain(..) {
            if endpoint.is_dialer()
                && (addr == remote || remote.to_string().starts_with(&addr.to_string()))
            {
                let _ = r.send(Ok(peer));
            } else {
                rest.push((addr, r));
            }
        }
        self.addr_dials = rest;
        if self.relay.as_ref().is_some_and(|l| l.peer == peer) {
            self.relay_connected_now();
            self.relay_settled();
            return;
        }
        let Some(id) = identity_of(&peer) else {
            return;
        };
        if endpoint.is_dialer() && dialable(&remote) {
            let addr = remote.to_string();
            self.with_engine(move |e, _| {
                if let Err(err) = e.store().put_peer(&id, &[addr], e.now()) {
                    tracing::warn!("cannot record peer address: {err}");
                }
            });
        }
        let waiting = self.waiting.remove(&peer).unwrap_or_default();
        for (doc, reply) in waiting {
            self.sync(id, doc, reply);
        }
        // Catch up on everything shared with this peer.
        self.with_engine(move |e, out| {
            let pushes: Vec<Push> = e
                .shared_with(&id, e.now())
                .into_iter()
                .map(|d| (id, d))
                .collect();
            out.push(Internal::Pushes(pushes));
        });
    }

    fn swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!("listening on {address}");
                if address.iter().any(|p| p == Protocol::P2pCircuit) {
                    // Reachable through the relay: say so, and register at its rendezvous
                    // point so members can find this node there.
                    self.swarm.add_external_address(address.clone());
                    self.register();
                }
                self.listening.push(address);
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.listening.retain(|a| *a != address);
            }
            SwarmEvent::ListenerClosed {
                addresses, reason, ..
            } => {
                self.listening.retain(|a| !addresses.contains(a));
                if let Some(link) = self.relay.as_mut()
                    && (addresses.is_empty()
                        || addresses
                            .iter()
                            .any(|a| a.iter().any(|p| p == Protocol::P2pCircuit)))
                {
                    // The reservation ended or was refused: ask again on the next tick.
                    match &reason {
                        Ok(()) => tracing::info!("circuit listener closed"),
                        Err(e) => {
                            tracing::warn!(
                                "the relay refused or ended this node's reservation: {e}"
                            );
                            link.reserved = false;
                            link.show(Some(format!("the relay refused a reservation: {e}")));
                        }
                    }
                    link.listening = false;
                }
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
                if self.relay.as_ref().is_some_and(|l| l.peer == peer_id) {
                    self.relay_lost();
                }
                // It may come back upgraded; what waited to be sent goes with its sessions.
                self.legacy.remove(&peer_id);
                self.outbox.remove(&peer_id);
                // Queued sessions end too; they run again when the peer reconnects.
                for e in self.sessions.peer_gone(peer_id, "the peer disconnected") {
                    self.end(e);
                }
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                let msg = format!("cannot connect: {error}");
                if let Some(peer) = peer_id {
                    for (addr, r) in self.dials.remove(&peer).unwrap_or_default() {
                        let _ = r.send(Err(DialError::Failed {
                            addr,
                            detail: msg.clone(),
                        }));
                    }
                    if self.relay.as_ref().is_some_and(|l| l.peer == peer) {
                        tracing::warn!("cannot reach the relay: {error}");
                        if let Some(l) = self.relay.as_mut() {
                            l.listening = false;
                            l.show(Some(format!("cannot reach it: {error}")));
                        }
                        self.relay_settled();
                    } else if !self.swarm.is_connected(&peer) {
                        self.redials.failed(peer, Instant::now());
                        let waiting = self.waiting.remove(&peer).unwrap_or_default();
                        if self.relay_connected() {
                            self.deposit(peer, waiting);
                        } else {
                            for (_, r) in waiting {
                                if let Some(r) = r {
                                    let _ = r.send(SyncResult::Offline(format!(
                                        "{msg}; it syncs when the peer connects"
                                    )));
                                }
                            }
                        }
                    }
                } else {
                    for (addr, r) in self.addr_dials.drain(..) {
                        let _ = r.send(Err(DialError::Failed {
                            addr,
                            detail: msg.clone(),
                        }));
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => {
                self.agents.insert(peer_id, info.agent_version.clone());
                let speaks = |p: &str| info.protocols.iter().any(|x| x.as_ref() == p);
                if speaks(SYNC_BATCH_PROTOCOL) {
                    self.legacy.remove(&peer_id);
                } else if speaks(SYNC_PROTOCOL) {
                    self.legacy.insert(peer_id);
                }
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
                    self.with_engine(move |e, _| {
                        if let Err(err) = e.store().put_peer(&id, &texts, e.now()) {
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
                id,
                result: kad::QueryResult::GetClosestPeers(Ok(ok)),
                step,
                ..
            })) => {
                if step.last {
                    self.lookups.remove(&id);
                }
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
            SwarmEvent::Behaviour(BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                id,
                step,
                ..
            })) if step.last => {
                self.lookups.remove(&id);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Sync(ev)) => self.sync_event(ev),
            SwarmEvent::Behaviour(BehaviourEvent::SyncBatch(ev)) => self.sync_batch_event(ev),
            SwarmEvent::Behaviour(BehaviourEvent::Mailbox(ev)) => self.mail_event(ev),
            SwarmEvent::Behaviour(BehaviourEvent::RelayClient(ev)) => {
                if let relay::client::Event::ReservationReqAccepted { relay_peer_id, .. } = &ev
                    && let Some(l) = self.relay.as_mut().filter(|l| l.peer == *relay_peer_id)
                {
                    l.reserved = true;
                    l.show(None);
                }
                tracing::info!("relay: {ev:?}");
            }
            SwarmEvent::Behaviour(BehaviourEvent::Dcutr(ev)) => match ev.result {
                Ok(_) => {
                    tracing::info!(peer = %ev.remote_peer_id, "direct connection made (hole punched)");
                }
                Err(e) => tracing::debug!(peer = %ev.remote_peer_id, "no direct connection: {e}"),
            },
            SwarmEvent::Behaviour(BehaviourEvent::Rendezvous(ev)) => self.rendezvous_event(ev),
            _ => {}
        }
    }

    /// Events of version 2 of the sync protocol, which this node answers and speaks to the
    /// nodes of earlier releases.
    fn sync_event(&mut self, ev: request_response::Event<Inbound<SyncRequest>, SyncResponse>) {
        match ev {
            request_response::Event::Message {
                peer,
                message:
                    request_response::Message::Request {
                        request, channel, ..
                    },
                ..
            } => match request {
                Ok(r) => self.inbound(peer, Reply::One(channel), vec![r]),
                Err(bad) => self.bad_request(peer, Reply::One(channel), &bad),
            },
            request_response::Event::Message {
                peer,
                message:
                    request_response::Message::Response {
                        request_id,
                        response,
                    },
                ..
            } => {
                let Some((p, sent)) = self.legacy_requests.remove(&request_id) else {
                    return;
                };
                debug_assert_eq!(p, peer);
                self.request_ended(peer);
                self.take_answers(peer, vec![sent], vec![response]);
            }
            request_response::Event::OutboundFailure {
                request_id, error, ..
            } => {
                if let Some((peer, (_, _, ticket))) = self.legacy_requests.remove(&request_id) {
                    self.request_ended(peer);
                    let why = format!("sync request failed: {error}");
                    self.internal(Internal::all_failed(peer, [ticket], &why));
                }
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                // A stream that failed or timed out (a peer going away looks the same);
                // undecodable requests arrive as requests and are counted there.
                tracing::debug!(%peer, "inbound sync failed: {error}");
            }
            _ => {}
        }
    }

    fn sync_batch_event(
        &mut self,
        ev: request_response::Event<Inbound<SyncBatch>, SyncBatchResponse>,
    ) {
        match ev {
            request_response::Event::Message {
                peer,
                message:
                    request_response::Message::Request {
                        request, channel, ..
                    },
                ..
            } => match request {
                Ok(b) => self.inbound(peer, Reply::Batch(channel), b.rounds),
                Err(bad) => self.bad_request(peer, Reply::Batch(channel), &bad),
            },
            request_response::Event::Message {
                peer,
                message:
                    request_response::Message::Response {
                        request_id,
                        response,
                    },
                ..
            } => {
                let Some((p, meta)) = self.requests.remove(&request_id) else {
                    return;
                };
                debug_assert_eq!(p, peer);
                self.request_ended(peer);
                let tickets: Vec<Ticket> = meta.iter().map(|(_, _, t)| *t).collect();
                let resps = match response {
                    SyncBatchResponse::Rounds(r) if r.len() == meta.len() => r,
                    SyncBatchResponse::Rounds(r) => {
                        let why = format!(
                            "the peer answered {} rounds to a batch of {}",
                            r.len(),
                            meta.len()
                        );
                        return self.internal(Internal::all_failed(peer, tickets, &why));
                    }
                    SyncBatchResponse::Refused { code, detail } => meta
                        .iter()
                        .map(|_| SyncResponse::Refused {
                            code,
                            detail: detail.clone(),
                        })
                        .collect(),
                };
                self.take_answers(peer, meta, resps);
            }
            request_response::Event::OutboundFailure {
                request_id, error, ..
            } => {
                let Some((peer, meta)) = self.requests.remove(&request_id) else {
                    return;
                };
                self.request_ended(peer);
                if matches!(error, OutboundFailure::UnsupportedProtocols) {
                    // A node of an earlier release: nothing reached it. The rounds go
                    // again, one by one in version 2. Every batch sent before this was
                    // known fails so, and each goes again; a round in version 2 fails as
                    // any request does, so nothing loops.
                    if self.legacy.insert(peer) {
                        tracing::debug!(%peer, "the peer speaks sync version 2 only");
                    }
                    for (_, _, ticket) in meta {
                        if let Some(start) = self.sessions.retry(ticket) {
                            self.next_round(start);
                        }
                    }
                    return;
                }
                let why = format!("sync request failed: {error}");
                self.internal(Internal::all_failed(
                    peer,
                    meta.into_iter().map(|(_, _, t)| t),
                    &why,
                ));
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, "inbound sync failed: {error}");
            }
            _ => {}
        }
    }

    /// Takes the peer's answers to rounds of ours, one per round and in order, in one
    /// engine job.
    fn take_answers(&mut self, peer: PeerId, meta: Vec<Sent>, resps: Vec<SyncResponse>) {
        let Some(id) = identity_of(&peer) else {
            return;
        };
        let tickets: Vec<Ticket> = meta.iter().map(|(_, _, t)| *t).collect();
        let unavailable = Internal::unavailable(peer, &tickets);
        self.with_engine_or(
            move |e, out| {
                let now = e.now();
                let mut all_pushes = Vec::new();
                let rounds = meta
                    .into_iter()
                    .zip(resps)
                    .map(|((doc, sent, ticket), resp)| {
                        let outcome = match e.handle_response(&id, &doc, &sent, resp, now) {
                            Ok((o, pushes)) => {
                                all_pushes.extend(pushes);
                                Ok(o)
                            }
                            Err(err) => Err(err.to_string()),
                        };
                        (ticket, outcome)
                    })
                    .collect();
                if !all_pushes.is_empty() {
                    out.push(Internal::Pushes(all_pushes));
                }
                out.push(Internal::RoundsDone { peer, rounds });
            },
            Some(unavailable),
        );
    }

    /// A peer's request (a round, or a batch's rounds): checked ahead, then answered by
    /// the engine.
    fn inbound(&mut self, peer: PeerId, reply: Reply, rounds: Vec<SyncRequest>) {
        let Some(id) = identity_of(&peer) else {
            return;
        };
        if self.overloaded() {
            // Dropping the channel fails the request on the peer's side; it tries again
            // later.
            tracing::debug!(%peer, "the engine is behind: a sync request is turned away");
            return;
        }
        // Only a peer the node shares a document with has its request checked ahead: a
        // stranger's goes to the engine as it is, which refuses it before decoding any of
        // its changes (checking it ahead would spend on it what an accepted request costs,
        // and hold up the requests behind it).
        let shares = self
            .sharing
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(&id);
        let who = Requester { peer, id, reply };
        if shares {
            self.stats.checked_ahead.fetch_add(1, Ordering::Relaxed);
            self.to_check.push_back((who, rounds));
            self.check_next();
        } else {
            self.checked_one(who, rounds.into_iter().map(Into::into).collect());
        }
    }

    /// Answers a request the codec could not decode, counts it against the peer and
    /// disconnects (bans) a peer past [`MAX_BAD_REQUESTS`].
    fn bad_request(&mut self, peer: PeerId, reply: Reply, bad: &Undecodable) {
        tracing::debug!(%peer, "{bad}");
        let code = RefusalCode::BadRequest;
        let detail = format!("{bad}; nothing was applied");
        let b = self.swarm.behaviour_mut();
        let _ = match reply {
            Reply::One(channel) => b
                .sync
                .send_response(channel, SyncResponse::Refused { code, detail })
                .is_ok(),
            Reply::Batch(channel) => b
                .sync_batch
                .send_response(channel, SyncBatchResponse::Refused { code, detail })
                .is_ok(),
        };
        // Strangers come with fresh identities: forget the counts of peers that left
        // rather than keep one for each.
        if self.bad_requests.len() >= MAX_TRACKED_PEERS {
            let swarm = &self.swarm;
            self.bad_requests.retain(|p, _| swarm.is_connected(p));
        }
        let n = self.bad_requests.entry(peer).or_default();
        *n += 1;
        if *n > MAX_BAD_REQUESTS {
            self.ban(peer);
        }
    }
}

/// The peer an address leads to: its last `/p2p/…`. In a relayed address
/// (`…/p2p/RELAY/p2p-circuit/p2p/PEER`) the first one is the relay's.
pub(crate) fn dial_target(addr: &Multiaddr) -> Option<PeerId> {
    addr.iter()
        .filter_map(|p| match p {
            Protocol::P2p(id) => Some(id),
            _ => None,
        })
        .last()
}

/// `addr` ending in `/p2p/{peer}`: added unless it ends so already (a relayed listen
/// address comes with it).
pub(crate) fn with_peer(addr: Multiaddr, peer: PeerId) -> Multiaddr {
    if matches!(addr.iter().last(), Some(Protocol::P2p(p)) if p == peer) {
        addr
    } else {
        addr.with(Protocol::P2p(peer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// However the pieces finish (in any order, some twice, numbers never started),
        /// each started piece is handed on once, all in the order they started, and a piece
        /// is handed on only once every earlier one has been.
        #[test]
        fn pieces_are_handed_on_in_the_order_they_started(
            order in proptest::sample::subsequence((0u64..24).collect::<Vec<_>>(), 0..=24)
                .prop_shuffle(),
            extra in proptest::collection::vec(0u64..40, 0..8),
        ) {
            let mut w: InOrder<u64> = InOrder::default();
            for n in 0..24 {
                prop_assert_eq!(w.start(), n);
            }
            let mut out = Vec::new();
            let mut finished = std::collections::BTreeSet::new();
            for (i, n) in order.iter().enumerate() {
                // A stray number (not started, or already handed on) changes nothing.
                if let Some(&x) = extra.get(i)
                    && (x >= 24 || out.contains(&x))
                {
                    prop_assert!(w.finished(x, x).is_empty());
                }
                finished.insert(*n);
                out.extend(w.finished(*n, *n));
                // Everything before the first piece not yet finished has been handed on.
                let first_missing = (0..24).find(|k| !finished.contains(k)).unwrap_or(24);
                prop_assert_eq!(&out, &(0..first_missing).collect::<Vec<_>>());
                prop_assert_eq!(w.under_way(), usize::try_from(24 - first_missing).unwrap());
            }
        }
    }

    /// A relayed address leads to its last peer, not the relay; a listen address is
    /// completed with this node's id once, never twice.
    #[test]
    fn a_relayed_address_names_its_peer_last() {
        let (relay, node) = (PeerId::random(), PeerId::random());
        let base: Multiaddr = "/ip4/127.0.0.1/tcp/4001".parse().unwrap();
        let relayed = base
            .clone()
            .with(Protocol::P2p(relay))
            .with(Protocol::P2pCircuit)
            .with(Protocol::P2p(node));
        assert_eq!(dial_target(&relayed), Some(node));
        assert_eq!(
            dial_target(&base.clone().with(Protocol::P2p(relay))),
            Some(relay)
        );
        assert_eq!(dial_target(&base), None);
        assert_eq!(with_peer(relayed.clone(), node), relayed);
        assert_eq!(
            with_peer(base.clone(), node),
            base.clone().with(Protocol::P2p(node))
        );
    }

    fn framed(len: u32, body: &[u8]) -> Vec<u8> {
        let mut v = len.to_be_bytes().to_vec();
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn a_frame_is_read_whole() {
        let stats = WireStats::default();
        let pool = Arc::default();
        let body: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
        let bytes = framed(body.len() as u32, &body);
        let mut io = futures::io::Cursor::new(bytes);
        let (got, _) = futures::executor::block_on(read_frame(&mut io, &stats, &pool))
            .map_err(io::Error::from)
            .unwrap();
        assert_eq!(got, body);
        assert!(got.capacity() < 2 * body.len());
    }

    #[test]
    fn a_short_frame_costs_what_arrived_and_fails() {
        let stats = WireStats::default();
        let pool = Arc::default();
        let mut io = futures::io::Cursor::new(framed(MAX_WIRE_MESSAGE as u32, b"a few bytes"));
        let err = futures::executor::block_on(read_frame(&mut io, &stats, &pool))
            .map(|_| ())
            .map_err(io::Error::from)
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        let over = framed(MAX_WIRE_MESSAGE as u32 + 1, b"");
        let r = futures::executor::block_on(read_frame(
            &mut futures::io::Cursor::new(over),
            &stats,
            &pool,
        ));
        assert!(matches!(r, Err(FrameError::TooLarge(_))));
    }

    #[test]
    fn large_frames_being_read_share_a_fixed_budget() {
        let stats = WireStats::default();
        let pool: Arc<InFlight> = Arc::default();
        // Others hold all but 1 MiB of the budget: a 2 MiB frame is refused, a small one
        // still reads, and the budget is whole again once the holders are gone.
        let mut others = Reservation {
            pool: pool.clone(),
            held: 0,
        };
        assert!(others.hold(MAX_FRAME_BYTES_IN_FLIGHT - (1 << 20)));
        let big = vec![7u8; 2 << 20];
        let r = futures::executor::block_on(read_frame(
            &mut futures::io::Cursor::new(framed(big.len() as u32, &big)),
            &stats,
            &pool,
        ));
        assert!(matches!(r, Err(FrameError::Io(_))));
        let small = vec![1u8; 1000];
        let r = futures::executor::block_on(read_frame(
            &mut futures::io::Cursor::new(framed(small.len() as u32, &small)),
            &stats,
            &pool,
        ));
        assert!(r.is_ok());
        drop(others);
        drop(r);
        assert_eq!(pool.0.load(Ordering::Relaxed), 0);
        let r = futures::executor::block_on(read_frame(
            &mut futures::io::Cursor::new(framed(big.len() as u32, &big)),
            &stats,
            &pool,
        ));
        assert_eq!(r.map_err(io::Error::from).unwrap().0, big);
    }
}
