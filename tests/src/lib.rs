//! Helpers for the end-to-end tests: real nodes and relays on loopback in the test's own
//! process, with real stores in temporary directories; a tap on a relay's links; a bare
//! libp2p client. Used by the tests in `tests/tests/` and by the CLI tests beside the
//! binary in `cli/tests/`, whose helpers for running the `rapport` binary are in
//! `cli/tests/support/`.

use std::path::{Path, PathBuf};

/// A real node on loopback, in this process, with a store in a temporary directory.
pub struct TestNode {
    /// The running node.
    pub node: rapport_node::Node,
    /// Its handle.
    pub handle: rapport_node::NodeHandle,
    /// Where its libp2p listeners are, with `/p2p/<id>`.
    pub addrs: Vec<libp2p::Multiaddr>,
    /// The data directory (kept for restarts).
    pub dir: PathBuf,
    /// How it reaches the network.
    pub reach: Reach,
    _tmp: Option<tempfile::TempDir>,
}

/// How a test node reaches the network.
#[derive(Debug, Clone, Default)]
pub struct Reach {
    /// The relay it uses, if any.
    pub relay: Option<libp2p::Multiaddr>,
    /// It listens on nothing: reachable only through the relay.
    pub relay_only: bool,
}

/// A node that was stopped; its store is kept.
pub struct StoppedNode {
    /// The data directory.
    pub dir: PathBuf,
    /// How it reached the network.
    pub reach: Reach,
    _tmp: Option<tempfile::TempDir>,
}

impl StoppedNode {
    /// Starts the node again on its store (same identity, new ports).
    pub async fn start(self) -> TestNode {
        let reach = self.reach.clone();
        self.start_with(reach).await
    }

    /// Starts the node again, reaching the network another way (a restarted relay).
    pub async fn start_with(self, reach: Reach) -> TestNode {
        let mut n = TestNode::start_with(&self.dir, reach).await;
        n._tmp = self._tmp;
        n
    }
}

impl TestNode {
    /// Creates a store of `kind` named `name` and starts a node on it (no mDNS, API on
    /// loopback).
    pub async fn new(kind: rapport_protocol::Kind, name: &str) -> Self {
        Self::new_with(kind, name, Reach::default()).await
    }

    /// Creates a store and starts a node on it that reaches the network as `reach` says.
    pub async fn new_with(kind: rapport_protocol::Kind, name: &str, reach: Reach) -> Self {
        let tmp = tempfile::tempdir().expect("temp dir");
        let dir = tmp.path().join("node");
        rapport_node::Store::create(&dir, kind, name, rapport_node::now()).expect("create store");
        let mut n = Self::start_with(&dir, reach).await;
        n._tmp = Some(tmp);
        n
    }

    /// Starts a node on an existing data directory.
    pub async fn start(dir: &Path) -> Self {
        Self::start_with(dir, Reach::default()).await
    }

    /// Starts a node on an existing data directory, reaching the network as `reach` says.
    /// With a relay, returns once the node is reachable through it.
    pub async fn start_with(dir: &Path, reach: Reach) -> Self {
        // RAPPORT_LOG=debug shows what the nodes do when a test fails.
        if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_env("RAPPORT_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_test_writer()
                .try_init();
        }
        let mut config = rapport_node::NodeConfig {
            api: Some("127.0.0.1:0".parse().expect("socket addr")),
            ..rapport_node::NodeConfig::loopback(dir)
        };
        config.net.relay = reach.relay.clone();
        if reach.relay_only {
            config.net.listen.clear();
        }
        let node = rapport_node::Node::start(config)
            .await
            .expect("node starts");
        if reach.relay.is_some() {
            node.circuit_address(std::time::Duration::from_secs(20))
                .await
                .expect("a circuit reserved at the relay within 20s");
        }
        let addrs = node.listening().await;
        assert!(!addrs.is_empty(), "the node listens");
        Self {
            handle: node.handle(),
            node,
            addrs,
            dir: dir.to_path_buf(),
            reach,
            _tmp: None,
        }
    }

    /// Stops the node cleanly, keeping its store for a restart.
    pub async fn stop(self) -> StoppedNode {
        self.node.shutdown().await;
        StoppedNode {
            dir: self.dir,
            reach: self.reach,
            _tmp: self._tmp,
        }
    }

    /// Stops the node and starts it again on the same store (same identity); new ports.
    pub async fn restart(self) -> Self {
        self.stop().await.start().await
    }

    /// The node's identity.
    pub fn id(&self) -> rapport_protocol::IdentityKey {
        self.node.identity()
    }

    /// Connects to another node.
    pub async fn connect(&self, other: &TestNode) {
        self.handle
            .net()
            .dial(other.addrs[0].clone())
            .await
            .expect("dial on loopback");
    }
}

/// Waits until `check` holds, polling every 25 ms, for at most `secs` seconds; panics with
/// `what` if it never does.
pub async fn eventually<F, Fut>(secs: u64, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        if check().await {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {secs}s waiting for: {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
}

/// How long a test write waits for the peers it concerns.
pub const WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// The customer grants `scopes` to `grantee` (expiring in a day); returns the grant id.
pub async fn grant(
    customer: &rapport_node::NodeHandle,
    grantee: rapport_protocol::IdentityKey,
    scopes: &[&str],
) -> String {
    let args = rapport_node::GrantArgs {
        grantee,
        scopes: scopes.iter().map(|s| s.parse().expect("scope")).collect(),
        purpose: "support for order 1234".into(),
        expires: Some(rapport_node::now() + 86_400),
        terms: Some("SD-BASE".into()),
        legal_basis: None,
        notice_sha256: None,
    };
    let (out, _) = customer
        .write(WAIT, move |e| e.grant(args, rapport_node::now()))
        .await
        .expect("grant");
    out.entry.expect("grant entry").to_hex()
}

/// The status of a grant at a node (empty if it does not hold it).
pub async fn status(h: &rapport_node::NodeHandle, grant: &str) -> String {
    let g = grant.to_owned();
    h.read(move |e| {
        e.grants(rapport_node::now())
            .into_iter()
            .find(|r| r.grant.to_hex() == g)
            .map(|r| r.status)
            .unwrap_or_default()
    })
    .await
}

/// The texts of a relationship's messages at a node, oldest first (empty if not held).
pub async fn messages(h: &rapport_node::NodeHandle, rel: &str) -> Vec<String> {
    let rel = rel.to_owned();
    h.read(move |e| {
        e.relationship(&rel, rapport_node::now())
            .map(|d| d.messages.into_iter().map(|m| m.text).collect())
            .unwrap_or_default()
    })
    .await
}

/// Sends a message; returns where it went.
pub async fn send(
    h: &rapport_node::NodeHandle,
    rel: &str,
    text: &str,
    purpose: Option<&str>,
) -> rapport_node::Deliveries {
    let (rel, text, purpose) = (rel.to_owned(), text.to_owned(), purpose.map(str::to_owned));
    let (_, delivery) = h
        .write(WAIT, move |e| {
            e.send_message(&rel, text, purpose, None, rapport_node::now())
        })
        .await
        .expect("send");
    delivery
}

/// Grants the usual support scopes to each company and has it accept; waits until the
/// customer sees every grant active. Returns the grant ids.
pub async fn consent_to(customer: &TestNode, companies: &[&TestNode]) -> Vec<String> {
    let mut ids = Vec::new();
    for c in companies {
        let g = grant(
            &customer.handle,
            c.id(),
            &["conversation:read", "conversation:write", "contact:support"],
        )
        .await;
        eventually(10, "the grant reaching the company", || async {
            status(&c.handle, &g).await == "pending"
        })
        .await;
        c.handle
            .write(WAIT, |e| e.accept(None, None, rapport_node::now()))
            .await
            .expect("accept");
        eventually(10, "the customer seeing the acceptance", || async {
            status(&customer.handle, &g).await == "active"
        })
        .await;
        ids.push(g);
    }
    ids
}

/// The customer opens a relationship with `members` (the first is named at opening, the
/// rest are added); returns its id.
pub async fn open(customer: &TestNode, members: &[&TestNode]) -> String {
    let first = members[0].id();
    let (out, _) = customer
        .handle
        .write(WAIT, move |e| {
            e.open_relationship(first, None, Some("test".into()), rapport_node::now())
        })
        .await
        .expect("open");
    let rel = out.rel.expect("relationship").to_hex();
    for m in &members[1..] {
        let (id, r) = (m.id(), rel.clone());
        customer
            .handle
            .write(WAIT, move |e| {
                e.add_member(&r, id, None, rapport_node::now())
            })
            .await
            .expect("add member");
    }
    for m in members {
        eventually(10, "a member receiving the relationship", || async {
            m.handle
                .read(|e| e.relationships().expect("the store answers").len())
                .await
                == 1
        })
        .await;
    }
    rel
}

/// A node's sorted heads for a relationship, as hex.
pub async fn heads(h: &rapport_node::NodeHandle, rel: &str) -> Vec<String> {
    let rel = rel.to_owned();
    h.read(move |e| e.heads(&rel).unwrap_or_default()).await
}

/// A barrier between two connected nodes: `from` syncs with `to` every document they share
/// now, and insists that each session ends with both holding the same changes. It runs
/// after everything `from` wrote before it, over the same connection, so a test can check
/// afterwards that something else did not reach `to`.
pub async fn in_sync(from: &TestNode, to: &TestNode) {
    let peer = to.id();
    let docs = from
        .handle
        .read(move |e| e.shared_with(&peer, rapport_node::now()))
        .await;
    assert!(!docs.is_empty(), "the two nodes share no document");
    for doc in docs {
        let r = from.handle.net().sync(peer, doc, WAIT).await;
        assert_eq!(r, rapport_node::SyncResult::Delivered, "syncing {doc:?}");
    }
}

/// A barrier for a node whose peer is away: `from` seals for `peer`'s mailbox at the relay
/// whatever of every document they share now the mailbox lacks, and insists that each such
/// sync ends with the relay holding it. Nothing `from` wrote for `peer` before it is still
/// on its way to the relay afterwards.
pub async fn all_in_mailbox(from: &TestNode, peer: rapport_protocol::IdentityKey) {
    let docs = from
        .handle
        .read(move |e| e.shared_with(&peer, rapport_node::now()))
        .await;
    assert!(!docs.is_empty(), "{peer} shares no document");
    for doc in docs {
        let r = from.handle.net().sync(peer, doc, WAIT).await;
        assert!(
            matches!(r, rapport_node::SyncResult::Deposited(_)),
            "syncing {doc:?} with {peer}: {r:?}"
        );
    }
}

/// A community relay in this process, on loopback, with its store in a temporary directory.
pub struct TestRelay {
    /// The running relay.
    pub relay: rapport_node::relay::Relay,
    /// Its data directory.
    pub dir: PathBuf,
    config: rapport_node::relay::RelayConfig,
    _tmp: Option<tempfile::TempDir>,
}

impl TestRelay {
    /// Starts an open relay with these quotas.
    pub async fn open(quotas: rapport_node::relay::Quotas) -> Self {
        Self::new(true, quotas).await
    }

    /// Starts a relay, open or on an allow-list.
    pub async fn new(open: bool, quotas: rapport_node::relay::Quotas) -> Self {
        let tmp = tempfile::tempdir().expect("temp dir");
        let dir = tmp.path().join("relay");
        let config = rapport_node::relay::RelayConfig {
            data_dir: dir.clone(),
            listen: vec!["/ip4/127.0.0.1/tcp/0".parse().expect("multiaddr")],
            open,
            quotas,
        };
        let relay = rapport_node::relay::Relay::start(config.clone())
            .await
            .expect("relay starts");
        Self {
            relay,
            dir,
            config,
            _tmp: Some(tmp),
        }
    }

    /// The address members pass as `--relay`.
    pub fn addr(&self) -> libp2p::Multiaddr {
        self.relay.addrs()[0].clone()
    }

    /// The relay's TCP socket address.
    pub fn socket(&self) -> std::net::SocketAddr {
        socket_of(&self.addr())
    }

    /// Stops the relay, runs `f` on its store (the relay being down), and starts it again on
    /// the same port and store.
    pub async fn restart_with<T>(
        self,
        f: impl FnOnce(&rapport_node::RelayStore) -> T,
    ) -> (Self, T) {
        let port = self.socket().port();
        self.relay.shutdown().await;
        let out = {
            let store = rapport_node::RelayStore::open(&self.dir).expect("relay store opens");
            f(&store)
        };
        let mut config = self.config.clone();
        config.listen = vec![
            format!("/ip4/127.0.0.1/tcp/{port}")
                .parse()
                .expect("multiaddr"),
        ];
        let relay = rapport_node::relay::Relay::start(config.clone())
            .await
            .expect("relay restarts on its port");
        (
            Self {
                relay,
                dir: self.dir,
                config,
                _tmp: self._tmp,
            },
            out,
        )
    }
}

/// The TCP socket of a `/ip4/…/tcp/…` multiaddr.
pub fn socket_of(addr: &libp2p::Multiaddr) -> std::net::SocketAddr {
    use libp2p::multiaddr::Protocol;
    let mut ip = None;
    let mut port = None;
    for p in addr.iter() {
        match p {
            Protocol::Ip4(a) => ip = Some(std::net::IpAddr::V4(a)),
            Protocol::Tcp(n) => port = Some(n),
            _ => {}
        }
    }
    std::net::SocketAddr::new(ip.expect("an ip4 address"), port.expect("a tcp port"))
}

/// A TCP forwarder on loopback that keeps a copy of every byte it carries, both ways: what
/// an observer on the relay's links would see.
pub struct Tap {
    /// Where to connect instead of the target.
    pub addr: std::net::SocketAddr,
    /// Every byte seen so far.
    pub seen: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

impl Tap {
    /// Starts forwarding to `target`.
    pub async fn start(target: std::net::SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind tap");
        let addr = listener.local_addr().expect("tap addr");
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let Ok(outbound) = tokio::net::TcpStream::connect(target).await else {
                    continue;
                };
                let (ri, wi) = inbound.into_split();
                let (ro, wo) = outbound.into_split();
                tokio::spawn(pump(ri, wo, log.clone()));
                tokio::spawn(pump(ro, wi, log.clone()));
            }
        });
        Self { addr, seen }
    }

    /// `relay` (a multiaddr ending in /p2p/<id>) rewritten to go through this tap.
    pub fn route(&self, relay: &libp2p::Multiaddr) -> libp2p::Multiaddr {
        use libp2p::multiaddr::Protocol;
        relay
            .iter()
            .map(|p| match p {
                Protocol::Tcp(_) => Protocol::Tcp(self.addr.port()),
                other => other,
            })
            .collect()
    }

    /// Whether `needle` appears in anything carried so far.
    pub fn saw(&self, needle: &[u8]) -> bool {
        self.seen
            .lock()
            .expect("tap log")
            .windows(needle.len())
            .any(|w| w == needle)
    }

    /// Bytes carried so far.
    pub fn len(&self) -> usize {
        self.seen.lock().expect("tap log").len()
    }

    /// Nothing carried yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

async fn pump(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    log: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        log.lock().expect("tap log").extend_from_slice(&buf[..n]);
        if w.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = w.shutdown().await;
}

/// Whether the bytes of the file at `path` contain `needle`.
pub fn file_contains(path: &Path, needle: &[u8]) -> bool {
    let bytes = std::fs::read(path).expect("read file");
    bytes.windows(needle.len()).any(|w| w == needle)
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind an ephemeral port")
        .port()
}

/// A bare libp2p client (TCP, Noise, Yamux) speaking one request-response protocol with
/// `codec`, as `key`'s identity: what a hostile, fake or minimal peer is in a test.
pub fn client_swarm<C>(
    key: &rapport_protocol::SecretKey,
    protocol: &'static str,
    codec: C,
    config: libp2p::request_response::Config,
    idle: std::time::Duration,
) -> libp2p::Swarm<libp2p::request_response::Behaviour<C>>
where
    C: libp2p::request_response::Codec<Protocol = libp2p::StreamProtocol> + Clone + Send + 'static,
{
    let keypair = libp2p::identity::Keypair::ed25519_from_bytes(key.to_seed()).expect("key");
    libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(
            libp2p::tcp::Config::default(),
            libp2p::noise::Config::new,
            libp2p::yamux::Config::default,
        )
        .expect("tcp")
        .with_behaviour(|_| {
            libp2p::request_response::Behaviour::with_codec(
                codec,
                [(
                    libp2p::StreamProtocol::new(protocol),
                    libp2p::request_response::ProtocolSupport::Outbound,
                )],
                config,
            )
        })
        .expect("behaviour")
        .with_swarm_config(|c| c.with_idle_connection_timeout(idle))
        .build()
}
