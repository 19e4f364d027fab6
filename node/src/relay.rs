//! A community relay: libp2p circuit relay v2 (with limits per peer and per circuit), a
//! rendezvous point, and a store-and-forward mailbox of sealed envelopes with per-peer
//! quotas and retention. It never holds a key that opens what it stores.
//!
//! Admission: in allow-list mode (the default) only identities listed in the data
//! directory's `allow-list` file may connect at all; the file is re-read when it changes,
//! so the community edits it (or runs `rapport relay allow|deny`) while the relay runs.
//! In open mode anyone may connect, and the quotas are all that bound them.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use libp2p::allow_block_list::{self, AllowedPeers};
use libp2p::request_response::{self, ProtocolSupport, ResponseChannel};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent, behaviour::toggle::Toggle};
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, Swarm, identify, noise, ping, relay, rendezvous, tcp, yamux,
};
use rapport_protocol::IdentityKey;
use rapport_protocol::mail::{Envelope, MAILBOX_PROTOCOL, MailRefusal, MailRequest, MailResponse};
use tokio::sync::{mpsc, oneshot};

use crate::error::NetError;
use crate::mailbox::RelayStore;
use crate::net::MailCodec;
use crate::net::{
    IDLE_TIMEOUT, Inbound, MAX_ESTABLISHED_INCOMING, connection_limits_behaviour,
    identify_behaviour, identity_of, libp2p_keypair, peer_of, port_free, setup,
};

/// The allow-list file in a relay's data directory: one identity per line, `#` comments.
pub const ALLOW_FILE: &str = "allow-list";
/// The rendezvous namespace Rapport nodes register under.
pub const RENDEZVOUS_NAMESPACE: &str = "rapport";

/// A relay's limits.
#[derive(Debug, Clone)]
pub struct Quotas {
    /// Bytes of mail one peer may have stored at once.
    pub max_stored_bytes: u64,
    /// Envelopes one peer may deposit per minute.
    pub max_deposits_per_minute: u32,
    /// How long mail is kept before it is deleted unread.
    pub retention: Duration,
    /// Bytes one relayed circuit may carry (both ways).
    pub max_circuit_bytes: u64,
    /// How long one relayed circuit may last.
    pub max_circuit_duration: Duration,
    /// Circuits one peer may have open at once.
    pub max_circuits_per_peer: usize,
    /// Reservations (peers reachable through this relay) in all.
    pub max_reservations: usize,
}

impl Default for Quotas {
    fn default() -> Self {
        Quotas {
            max_stored_bytes: 64 * 1024 * 1024,
            max_deposits_per_minute: 600,
            retention: Duration::from_secs(14 * 24 * 3600),
            max_circuit_bytes: 256 * 1024 * 1024,
            max_circuit_duration: Duration::from_secs(30 * 60),
            max_circuits_per_peer: 16,
            max_reservations: 4096,
        }
    }
}

/// How a relay starts.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Data directory (holds `relay.redb` and `allow-list`).
    pub data_dir: PathBuf,
    /// Addresses to listen on.
    pub listen: Vec<Multiaddr>,
    /// Admit anyone (otherwise only the allow-list).
    pub open: bool,
    /// Limits.
    pub quotas: Quotas,
}

/// Why a relay could not start, or its allow-list could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RelayError {
    /// The relay's store failed.
    #[error(transparent)]
    Store(#[from] crate::RelayStoreError),
    /// The network could not start.
    #[error("the relay's network could not start: {0}")]
    Net(#[from] NetError),
    /// A file could not be read or written.
    #[error("cannot use {path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A line of the allow-list is not an identity.
    #[error("{path} line {line}: not an identity: {detail}")]
    AllowList {
        /// The file.
        path: std::path::PathBuf,
        /// The line number, from 1.
        line: usize,
        /// What is wrong with it.
        detail: String,
    },
}

/// Reads the allow-list in `dir` (missing file: empty).
pub fn read_allow_list(dir: &Path) -> Result<BTreeSet<IdentityKey>, RelayError> {
    let path = dir.join(ALLOW_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeSet::new()),
        Err(source) => return Err(RelayError::Io { path, source }),
    };
    let mut out = BTreeSet::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let id = line
            .parse::<IdentityKey>()
            .map_err(|e| RelayError::AllowList {
                path: path.clone(),
                line: n + 1,
                detail: e.to_string(),
            })?;
        out.insert(id);
    }
    Ok(out)
}

/// Adds (or removes) an identity in the allow-list of `dir`. Returns whether it changed.
pub fn edit_allow_list(dir: &Path, id: &IdentityKey, allow: bool) -> Result<bool, RelayError> {
    let mut set = read_allow_list(dir)?;
    let changed = if allow {
        set.insert(*id)
    } else {
        set.remove(id)
    };
    if changed {
        let mut text = String::from("# Identities admitted to this relay, one per line.\n");
        for i in &set {
            text.push_str(&format!("{i}\n"));
        }
        let path = dir.join(ALLOW_FILE);
        let tmp = dir.join(format!("{ALLOW_FILE}.tmp"));
        std::fs::write(&tmp, text)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|source| RelayError::Io { path, source })?;
    }
    Ok(changed)
}

/// Mailbox streams one connection may have open at once: a member fetches one batch at a
/// time and deposits a few; each stream may buffer a message of up to 32 MiB that arrived.
const MAX_MAIL_STREAMS_PER_CONNECTION: usize = 16;

#[derive(NetworkBehaviour)]
struct RelayBehaviour {
    /// First, so a connection over a limit is refused before any other behaviour sees it.
    limits: libp2p::connection_limits::Behaviour,
    per_ip: crate::ip_limits::Behaviour,
    allow: Toggle<allow_block_list::Behaviour<AllowedPeers>>,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    relay: relay::Behaviour,
    rendezvous: rendezvous::server::Behaviour,
    mailbox: request_response::Behaviour<MailCodec>,
}

/// Counters a relay keeps, for its operator and tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RelayStats {
    /// Envelopes stored.
    pub deposited: u64,
    /// Deposits refused (quota, admission, bad envelope).
    pub refused: u64,
    /// Envelopes handed over.
    pub delivered: u64,
    /// Reservations accepted.
    pub reservations: u64,
    /// Circuits opened.
    pub circuits: u64,
}

enum Cmd {
    Stats(oneshot::Sender<RelayStats>),
    Shutdown(oneshot::Sender<()>),
}

/// A running relay.
pub struct Relay {
    id: IdentityKey,
    listening: Vec<Multiaddr>,
    tx: mpsc::Sender<Cmd>,
    task: tokio::task::JoinHandle<Arc<RelayStore>>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay").field("id", &self.id).finish()
    }
}

struct Loop {
    swarm: Swarm<RelayBehaviour>,
    store: Arc<RelayStore>,
    config: RelayConfig,
    allowed: BTreeSet<IdentityKey>,
    allow_mtime: Option<SystemTime>,
    /// Envelopes deposited per peer in the current minute.
    rate: HashMap<PeerId, (Instant, u32)>,
    stats: RelayStats,
    done_tx: mpsc::UnboundedSender<(ResponseChannel<MailResponse>, MailResponse, Outcome)>,
}

#[derive(Clone, Copy)]
enum Outcome {
    Stored(u64),
    Refused,
    Delivered(u64),
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Relay {
    /// Starts a relay on the current tokio runtime; returns once it listens.
    pub async fn start(config: RelayConfig) -> Result<Relay, RelayError> {
        let store = Arc::new(RelayStore::open(&config.data_dir)?);
        let key = store.secret_key()?;
        let id = key.identity();
        let keypair = libp2p_keypair(&key)?;
        let q = config.quotas.clone();
        let open = config.open;
        let mut swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
            .with_tokio()
            .with_tcp(
                tcp::Config::default().nodelay(true),
                noise::Config::new,
                yamux::Config::default,
            )
            .map_err(|e| setup("TCP transport", &e))?
            .with_quic()
            .with_behaviour(|key| {
                let relay_config = relay::Config {
                    max_reservations: q.max_reservations,
                    max_reservations_per_peer: 4,
                    reservation_duration: Duration::from_secs(3600),
                    max_circuits: q.max_reservations,
                    max_circuits_per_peer: q.max_circuits_per_peer,
                    max_circuit_duration: q.max_circuit_duration,
                    max_circuit_bytes: q.max_circuit_bytes,
                    ..Default::default()
                };
                RelayBehaviour {
                    // Every member holding a reservation keeps a connection: room for all
                    // of them and as many again briefly. The relay's open-file limit must
                    // be above this.
                    limits: connection_limits_behaviour(
                        u32::try_from(q.max_reservations)
                            .unwrap_or(u32::MAX)
                            .saturating_add(MAX_ESTABLISHED_INCOMING),
                    ),
                    per_ip: crate::ip_limits::Behaviour::default(),
                    allow: Toggle::from((!open).then(allow_block_list::Behaviour::default)),
                    identify: identify_behaviour(key, "rapport-relay"),
                    ping: ping::Behaviour::new(ping::Config::new()),
                    relay: relay::Behaviour::new(key.public().to_peer_id(), relay_config),
                    rendezvous: rendezvous::server::Behaviour::new(
                        rendezvous::server::Config::default(),
                    ),
                    mailbox: request_response::Behaviour::with_codec(
                        MailCodec::default(),
                        [(
                            StreamProtocol::new(MAILBOX_PROTOCOL),
                            ProtocolSupport::Inbound,
                        )],
                        request_response::Config::default()
                            .with_request_timeout(Duration::from_secs(120))
                            .with_max_concurrent_streams(MAX_MAIL_STREAMS_PER_CONNECTION),
                    ),
                }
            })
            .map_err(|e| setup("relay behaviour", &e))?
            .with_swarm_config(|c| c.with_idle_connection_timeout(IDLE_TIMEOUT))
            .build();
        // A community relay is a relay by purpose: it serves reservations from the start,
        // not only once some peer has confirmed its address from outside.
        swarm
            .behaviour_mut()
            .relay
            .set_status(Some(relay::Status::Enable));
        for addr in &config.listen {
            port_free(addr)?;
            swarm
                .listen_on(addr.clone())
                .map_err(|e| NetError::Listen {
                    addr: addr.clone(),
                    detail: e.to_string(),
                })?;
        }
        // Wait for the listeners, so callers can print and hand out the addresses.
        let mut listening = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while listening.len() < config.listen.len() {
            match tokio::time::timeout_at(deadline, swarm.select_next_some()).await {
                Ok(SwarmEvent::NewListenAddr { address, .. }) => {
                    // Reservations carry the relay's addresses; its listen addresses are
                    // the ones members dial.
                    swarm.add_external_address(address.clone());
                    listening.push(address);
                }
                Ok(SwarmEvent::ListenerError { error, .. }) => {
                    return Err(setup("listener", &error).into());
                }
                Ok(_) => {}
                Err(_) => return Err(NetError::ListenTimeout(Duration::from_secs(10)).into()),
            }
        }
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        let mut lp = Loop {
            swarm,
            store,
            config,
            allowed: BTreeSet::new(),
            allow_mtime: None,
            rate: HashMap::new(),
            stats: RelayStats::default(),
            done_tx,
        };
        lp.reload_allow_list();
        let removed = lp.expire();
        if removed > 0 {
            tracing::info!("deleted {removed} expired envelope(s)");
        }
        let (tx, rx) = mpsc::channel(16);
        let task = tokio::spawn(lp.run(rx, done_rx));
        Ok(Relay {
            id,
            listening,
            tx,
            task,
        })
    }

    /// The relay's identity.
    pub fn identity(&self) -> IdentityKey {
        self.id
    }

    /// The addresses it listens on, each ending in `/p2p/<id>`: what members pass to
    /// `--relay`.
    pub fn addrs(&self) -> Vec<Multiaddr> {
        self.listening
            .iter()
            .map(|a| {
                a.clone()
                    .with(libp2p::multiaddr::Protocol::P2p(peer_of(&self.id)))
            })
            .collect()
    }

    /// Its counters.
    pub async fn stats(&self) -> RelayStats {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Cmd::Stats(tx)).await.is_err() {
            return RelayStats::default();
        }
        rx.await.unwrap_or_default()
    }

    /// Stops the relay; returns once its store is closed.
    pub async fn shutdown(self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Cmd::Shutdown(tx)).await.is_ok() {
            let _ = rx.await;
        }
        let Ok(store) = self.task.await else { return };
        // Store work still running on blocking threads holds the store; wait for it (it
        // takes milliseconds), so the file is closed when this returns.
        let deadline = Instant::now() + Duration::from_secs(10);
        while Arc::strong_count(&store) > 1 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Loop {
    async fn run(
        mut self,
        mut cmds: mpsc::Receiver<Cmd>,
        mut done: mpsc::UnboundedReceiver<(ResponseChannel<MailResponse>, MailResponse, Outcome)>,
    ) -> Arc<RelayStore> {
        let mut reload = tokio::time::interval(Duration::from_secs(2));
        let mut sweep = tokio::time::interval(Duration::from_secs(60));
        loop {
            tokio::select! {
                cmd = cmds.recv() => match cmd {
                    Some(Cmd::Stats(tx)) => { let _ = tx.send(self.stats.clone()); }
                    Some(Cmd::Shutdown(tx)) => { let _ = tx.send(()); return self.store; }
                    None => return self.store,
                },
                Some((channel, resp, outcome)) = done.recv() => {
                    match outcome {
                        Outcome::Stored(n) => self.stats.deposited += n,
                        Outcome::Refused => self.stats.refused += 1,
                        Outcome::Delivered(n) => self.stats.delivered += n,
                    }
                    let _ = self.swarm.behaviour_mut().mailbox.send_response(channel, resp);
                }
                event = self.swarm.select_next_some() => self.event(event),
                _ = reload.tick() => self.reload_allow_list(),
                _ = sweep.tick() => {
                    self.expire();
                    // Rate windows older than a minute say nothing any more.
                    self.rate.retain(|_, (since, _)| since.elapsed() < Duration::from_secs(60));
                }
            }
        }
    }

    fn expire(&mut self) -> usize {
        let cutoff = now_secs().saturating_sub(self.config.quotas.retention.as_secs());
        match self.store.expire(cutoff) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!("cannot expire old mail: {e}");
                0
            }
        }
    }

    fn reload_allow_list(&mut self) {
        if self.config.open {
            return;
        }
        let mtime = std::fs::metadata(self.config.data_dir.join(ALLOW_FILE))
            .and_then(|m| m.modified())
            .ok();
        if mtime == self.allow_mtime && self.allow_mtime.is_some() {
            return;
        }
        match read_allow_list(&self.config.data_dir) {
            Ok(set) => {
                self.allow_mtime = mtime;
                let Some(allow) = self.swarm.behaviour_mut().allow.as_mut() else {
                    return;
                };
                for gone in self.allowed.difference(&set) {
                    allow.disallow_peer(peer_of(gone));
                }
                for new in set.difference(&self.allowed) {
                    allow.allow_peer(peer_of(new));
                }
                if self.allowed != set {
                    tracing::info!("{} identities admitted", set.len());
                }
                self.allowed = set;
            }
            Err(e) => tracing::warn!("allow-list not reloaded: {e}"),
        }
    }

    fn admitted(&self, id: &IdentityKey) -> bool {
        self.config.open || self.allowed.contains(id)
    }

    fn event(&mut self, event: SwarmEvent<RelayBehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!("relay listening on {address}");
                self.swarm.add_external_address(address);
            }
            SwarmEvent::Behaviour(RelayBehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => {
                // A peer tells us how it sees us: that is how members reach us from outside.
                self.swarm.add_external_address(info.observed_addr.clone());
                tracing::debug!(%peer_id, "identified");
            }
            SwarmEvent::Behaviour(RelayBehaviourEvent::Relay(ev)) => match ev {
                relay::Event::ReservationReqAccepted { src_peer_id, .. } => {
                    self.stats.reservations += 1;
                    tracing::info!(peer = %src_peer_id, "reservation accepted");
                }
                relay::Event::CircuitReqAccepted {
                    src_peer_id,
                    dst_peer_id,
                } => {
                    self.stats.circuits += 1;
                    tracing::info!(src = %src_peer_id, dst = %dst_peer_id, "circuit opened");
                }
                other => tracing::debug!("relay: {other:?}"),
            },
            SwarmEvent::Behaviour(RelayBehaviourEvent::Mailbox(
                request_response::Event::Message {
                    peer,
                    message:
                        request_response::Message::Request {
                            request, channel, ..
                        },
                    ..
                },
            )) => self.mail_request(peer, request, channel),
            _ => {}
        }
    }

    fn refuse(&self, channel: ResponseChannel<MailResponse>, code: MailRefusal, detail: String) {
        tracing::info!(?code, "mailbox refused: {detail}");
        let _ = self.done_tx.send((
            channel,
            MailResponse::Refused { code, detail },
            Outcome::Refused,
        ));
    }

    fn mail_request(
        &mut self,
        peer: PeerId,
        request: Inbound<MailRequest>,
        channel: ResponseChannel<MailResponse>,
    ) {
        let request = match request {
            Ok(r) => r,
            Err(bad) => {
                return self.refuse(
                    channel,
                    MailRefusal::BadEnvelope,
                    format!("{bad}; the relay kept nothing"),
                );
            }
        };
        let Some(from) = identity_of(&peer) else {
            return;
        };
        if !self.admitted(&from) {
            return self.refuse(
                channel,
                MailRefusal::NotAdmitted,
                format!("{from} is not admitted to this relay"),
            );
        }
        let store = self.store.clone();
        let done = self.done_tx.clone();
        match request {
            MailRequest::Fetch { after } => {
                tokio::task::spawn_blocking(move || {
                    let (resp, outcome) = match store.fetch(&from, after) {
                        Ok((items, more)) => {
                            let n = items.len() as u64;
                            (
                                MailResponse::Mail {
                                    items: items.into_iter().map(|m| (m.seq, m.envelope)).collect(),
                                    more,
                                },
                                Outcome::Delivered(n),
                            )
                        }
                        Err(e) => {
                            tracing::error!("mailbox read failed: {e}");
                            (
                                MailResponse::Refused {
                                    code: MailRefusal::Unavailable,
                                    detail: "the relay could not read its store; try later".into(),
                                },
                                Outcome::Refused,
                            )
                        }
                    };
                    let _ = done.send((channel, resp, outcome));
                });
            }
            MailRequest::Deposit(list) => {
                let per_minute = self.config.quotas.max_deposits_per_minute;
                let now = Instant::now();
                let (since, count) = self.rate.entry(peer).or_insert((now, 0));
                if now.duration_since(*since) >= Duration::from_secs(60) {
                    *since = now;
                    *count = 0;
                }
                let n = list.len() as u32;
                if count.saturating_add(n) > per_minute {
                    let wait = 60u64.saturating_sub(now.duration_since(*since).as_secs());
                    return self.refuse(
                        channel,
                        MailRefusal::QuotaRate,
                        format!(
                            "over this relay's quota of {per_minute} envelopes a minute; the relay kept nothing; try again in {wait}s"
                        ),
                    );
                }
                *count += n;
                let max_bytes = self.config.quotas.max_stored_bytes;
                let allowed = (!self.config.open).then(|| self.allowed.clone());
                tokio::task::spawn_blocking(move || {
                    let (resp, outcome) = deposit(&store, &from, &list, max_bytes, allowed);
                    let _ = done.send((channel, resp, outcome));
                });
            }
        }
    }
}

/// Checks and stores one deposit; the answer to send.
fn deposit(
    store: &RelayStore,
    from: &IdentityKey,
    list: &[Vec<u8>],
    max_bytes: u64,
    allowed: Option<BTreeSet<IdentityKey>>,
) -> (MailResponse, Outcome) {
    let refused = |code, detail: String| {
        tracing::info!(?code, "mailbox refused: {detail}");
        (MailResponse::Refused { code, detail }, Outcome::Refused)
    };
    let mut items = Vec::with_capacity(list.len());
    for (i, bytes) in list.iter().enumerate() {
        let env = match Envelope::decode(bytes) {
            Ok(e) => e,
            Err(e) => {
                return refused(
                    MailRefusal::BadEnvelope,
                    format!("envelope {i}: {e}; the relay kept nothing"),
                );
            }
        };
        if env.from != *from {
            return refused(
                MailRefusal::BadEnvelope,
                format!(
                    "envelope {i} is from {}, not from you; the relay kept nothing",
                    env.from
                ),
            );
        }
        if env.verify().is_err() {
            return refused(
                MailRefusal::BadEnvelope,
                format!("envelope {i} is not signed by its sender; the relay kept nothing"),
            );
        }
        if let Some(set) = &allowed
            && !set.contains(&env.to)
        {
            return refused(
                MailRefusal::NotAdmitted,
                format!(
                    "{} has no mailbox here (not admitted to this relay); the relay kept nothing",
                    env.to
                ),
            );
        }
        items.push((env.to, bytes.clone()));
    }
    match store.deposit(from, &items, now_secs(), max_bytes) {
        Ok(Ok(())) => (
            MailResponse::Stored {
                count: items.len() as u32,
            },
            Outcome::Stored(items.len() as u64),
        ),
        Ok(Err((used, size))) => refused(
            MailRefusal::QuotaBytes,
            format!(
                "over quota: you store {used} of {max_bytes} bytes at this relay and this deposit needs {size} more; the relay kept nothing"
            ),
        ),
        Err(e) => {
            tracing::error!("mailbox write failed: {e}");
            refused(
                MailRefusal::Unavailable,
                "the relay could not store the mail; the relay kept nothing; try later".into(),
            )
        }
    }
}
