//! A running node: the engine on its store, the network loop and the local API, started
//! together and stopped together.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use libp2p::Multiaddr;
use rapport_protocol::IdentityKey;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::actor::EngineClient;
use crate::clock::{Clock, Sources, SystemClock};
use crate::engine::{Engine, EngineError, Push};
use crate::error::NetError;
use crate::net::{self, NetClient, NetConfig, SyncResult};
use crate::store::Store;
use crate::views::{Deliveries, Delivery, Event};

/// The file, in the data directory, that tells the CLI a node is running and where its API
/// is. Removed on a clean shutdown.
pub const NODE_FILE: &str = "node.json";
/// The file holding the API's bearer token (mode 0600).
pub const TOKEN_FILE: &str = "api-token";

/// How a node starts.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// The data directory (holds the store).
    pub data_dir: PathBuf,
    /// Network settings.
    pub net: NetConfig,
    /// Where the local API listens (loopback), or none for no API.
    pub api: Option<SocketAddr>,
    /// Accept grants made to this node as they arrive (for companies that do).
    pub auto_accept: bool,
}

impl NodeConfig {
    /// A node on `dir` listening on loopback TCP with an OS-chosen port, no mDNS, no API,
    /// accepting nothing by itself: for the demo, benchmarks and tests.
    pub fn loopback(dir: &Path) -> Self {
        NodeConfig {
            data_dir: dir.to_path_buf(),
            net: NetConfig {
                listen: vec!["/ip4/127.0.0.1/tcp/0".parse().expect("a valid multiaddr")],
                bootstrap: Vec::new(),
                mdns: false,
                relay: None,
                redial_every: net::REDIAL_EVERY,
            },
            api: None,
            auto_accept: false,
        }
    }
}

/// What `node.json` says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeFile {
    /// The API's address.
    pub api: SocketAddr,
    /// The node's identity.
    pub identity: String,
    /// The process id.
    pub pid: u32,
    /// The libp2p addresses it listens on, with `/p2p/<id>`.
    pub listen: Vec<String>,
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// The store could not be opened or loaded.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The network could not start.
    #[error("the network could not start: {0}")]
    Net(#[from] NetError),
    /// The store could not be loaded (the loader thread failed).
    #[error("the store loader stopped: {0}")]
    Loader(String),
    /// The local API could not start.
    #[error("the local API could not start on {addr}: {detail}")]
    Api {
        /// The address asked for.
        addr: SocketAddr,
        /// Why.
        detail: String,
    },
    /// A file in the data directory could not be written.
    #[error("cannot write {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// A running node.
pub struct Node {
    engine: EngineClient,
    net: NetClient,
    identity: IdentityKey,
    api_addr: Option<SocketAddr>,
    api_stop: Option<tokio::sync::oneshot::Sender<()>>,
    api_task: Option<tokio::task::JoinHandle<()>>,
    net_task: Option<tokio::task::JoinHandle<()>>,
    data_dir: PathBuf,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("identity", &self.identity)
            .field("api", &self.api_addr)
            .finish()
    }
}

/// The current time by the system clock, Unix seconds (a running node reads its own
/// [`Sources`]' clock).
pub fn now() -> u64 {
    SystemClock.now()
}

impl Node {
    /// Opens the store in `config.data_dir` and starts the network and the API, on the
    /// system clock and the OS random source.
    pub async fn start(config: NodeConfig) -> Result<Node, NodeError> {
        Self::start_with(config, Sources::system()).await
    }

    /// [`Node::start`] with another clock and random source (for tests and simulations).
    pub async fn start_with(config: NodeConfig, sources: Sources) -> Result<Node, NodeError> {
        let dir = config.data_dir.clone();
        let engine = tokio::task::spawn_blocking(move || -> Result<Engine, EngineError> {
            Engine::open(Store::open(&dir)?)
        })
        .await
        .map_err(|e| NodeError::Loader(e.to_string()))??;
        let mut engine = engine;
        engine.set_sources(sources)?;
        engine.set_auto_accept(config.auto_accept);
        let identity = engine.me();
        let key = engine.store().secret_key().map_err(EngineError::from)?;
        // What the network loop needs from the store before it starts.
        let known = engine.store().peers().map_err(EngineError::from)?;
        let t = engine.now();
        let bans = engine.store().bans(t).map_err(EngineError::from)?;
        let sharing = engine.sharing();
        let engine = EngineClient::start(engine).map_err(|source| NodeError::Io {
            path: config.data_dir.clone(),
            source,
        })?;
        let started = net::start(
            &key,
            engine.clone(),
            net::Startup {
                known,
                bans,
                now: t,
                sharing,
            },
            config.net,
        );
        let (net, net_task) = match started {
            Ok(s) => s,
            Err(e) => {
                engine.stop().await;
                return Err(NodeError::Net(e));
            }
        };
        let mut node = Node {
            engine,
            net,
            identity,
            api_addr: None,
            api_stop: None,
            api_task: None,
            net_task: Some(net_task),
            data_dir: config.data_dir,
        };
        if let Some(addr) = config.api {
            node.start_api(addr).await?;
        }
        Ok(node)
    }

    async fn start_api(&mut self, addr: SocketAddr) -> Result<(), NodeError> {
        let token = new_token().map_err(|e| NodeError::Api {
            addr,
            detail: e.to_string(),
        })?;
        let token_path = self.data_dir.join(TOKEN_FILE);
        write_private(&token_path, token.as_bytes()).map_err(|source| NodeError::Io {
            path: token_path,
            source,
        })?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| NodeError::Api {
                addr,
                detail: e.to_string(),
            })?;
        let bound = listener.local_addr().map_err(|e| NodeError::Api {
            addr,
            detail: e.to_string(),
        })?;
        let router = crate::api::router(self.handle(), token);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(crate::api::serve(listener, router, stopped));
        self.api_addr = Some(bound);
        self.api_stop = Some(stop);
        self.api_task = Some(task);
        let listen = self.listening().await;
        let file = NodeFile {
            api: bound,
            identity: self.identity.to_string(),
            pid: std::process::id(),
            listen: listen.iter().map(ToString::to_string).collect(),
        };
        let path = self.data_dir.join(NODE_FILE);
        write_private(
            &path,
            serde_json::to_string_pretty(&file)
                .expect("serialises")
                .as_bytes(),
        )
        .map_err(|source| NodeError::Io { path, source })?;
        Ok(())
    }

    /// A cloneable handle for the API and for programs embedding a node.
    pub fn handle(&self) -> NodeHandle {
        NodeHandle {
            engine: self.engine.clone(),
            net: self.net.clone(),
            identity: self.identity,
        }
    }

    /// This node's identity.
    pub fn identity(&self) -> IdentityKey {
        self.identity
    }

    /// Where the local API listens, if it runs.
    pub fn api_addr(&self) -> Option<SocketAddr> {
        self.api_addr
    }

    /// The libp2p addresses this node listens on, each ending in `/p2p/<identity>`. Waits
    /// briefly for the listeners to come up.
    pub async fn listening(&self) -> Vec<Multiaddr> {
        for _ in 0..100 {
            let addrs = self.net.listening().await;
            if !addrs.is_empty() {
                let me = libp2p::PeerId::from_bytes(&self.identity.peer_id_bytes())
                    .expect("an identity is a PeerId");
                return addrs
                    .into_iter()
                    .map(|a| match a.iter().last() {
                        // A circuit address already names this node.
                        Some(libp2p::multiaddr::Protocol::P2p(_)) => a,
                        _ => a.with(libp2p::multiaddr::Protocol::P2p(me)),
                    })
                    .collect();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Vec::new()
    }

    /// Waits (at most `within`) until this node holds a reservation at its relay, and
    /// returns its address through the relay; `None` if it has none by then.
    pub async fn circuit_address(&self, within: Duration) -> Option<Multiaddr> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let found = self.net.listening().await.into_iter().find(|a| {
                a.iter()
                    .any(|p| p == libp2p::multiaddr::Protocol::P2pCircuit)
            });
            if found.is_some() || tokio::time::Instant::now() >= deadline {
                return found;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops the API and the network, then closes the store. Every acknowledged change is
    /// already durable; this only lets in-flight work finish.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.api_stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.api_task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
        self.net.shutdown().await;
        if let Some(t) = self.net_task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
        // Let the engine finish what is queued, then close the store.
        self.engine.stop().await;
        let _ = std::fs::remove_file(self.data_dir.join(NODE_FILE));
    }
}

/// What the API and embedding programs use to work with a running node.
#[derive(Clone)]
pub struct NodeHandle {
    engine: EngineClient,
    net: NetClient,
    identity: IdentityKey,
}

impl std::fmt::Debug for NodeHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeHandle")
            .field("identity", &self.identity)
            .finish()
    }
}

impl NodeHandle {
    /// This node's identity.
    pub fn identity(&self) -> IdentityKey {
        self.identity
    }

    /// The network client.
    pub fn net(&self) -> &NetClient {
        &self.net
    }

    /// The engine actor's client.
    pub fn engine(&self) -> &EngineClient {
        &self.engine
    }

    /// Reads from the engine; fails only if the node stopped.
    pub async fn query<T, F>(&self, f: F) -> Result<T, EngineError>
    where
        F: FnOnce(&Engine) -> T + Send + 'static,
        T: Send + 'static,
    {
        self.engine.call(move |e| f(e)).await
    }

    /// Reads from the engine, for programs and tests that embed a running node.
    ///
    /// # Panics
    /// If the node stopped.
    pub async fn read<T, F>(&self, f: F) -> T
    where
        F: FnOnce(&Engine) -> T + Send + 'static,
        T: Send + 'static,
    {
        self.query(f).await.expect("the node is running")
    }

    /// Runs a write on the engine, then syncs what it changed with the peers concerned,
    /// waiting up to `wait` for them (zero: do not wait). Returns the write's value and
    /// where it went.
    pub async fn write<T, F>(&self, wait: Duration, f: F) -> Result<(T, Deliveries), EngineError>
    where
        F: FnOnce(&mut Engine) -> Result<(T, Vec<Push>), EngineError> + Send + 'static,
        T: Send + 'static,
    {
        let (value, pushes, names) = self
            .engine
            .try_call(move |e| {
                let (value, pushes) = f(e)?;
                let names: std::collections::HashMap<IdentityKey, String> = pushes
                    .iter()
                    .filter_map(|(peer, _)| Some((*peer, e.display_name(peer)?)))
                    .collect();
                Ok((value, pushes, names))
            })
            .await?;
        let mut delivery = self.deliver(pushes, wait).await;
        for d in &mut delivery.0 {
            d.name = names.get(&d.peer).cloned();
        }
        Ok((value, delivery))
    }

    /// Syncs documents with peers; returns how each sync ended (or that it was queued,
    /// when `wait` is zero).
    pub async fn deliver(&self, pushes: Vec<Push>, wait: Duration) -> Deliveries {
        if wait.is_zero() {
            let queued = pushes
                .iter()
                .map(|(peer, _)| Delivery {
                    peer: *peer,
                    name: None,
                    outcome: SyncResult::Queued,
                })
                .collect();
            if !pushes.is_empty() {
                self.net.push(pushes).await;
            }
            return Deliveries(queued);
        }
        let results = futures::future::join_all(
            pushes
                .iter()
                .map(|(peer, doc)| self.net.sync(*peer, *doc, wait)),
        )
        .await;
        Deliveries(
            pushes
                .iter()
                .zip(results)
                .map(|((peer, _), outcome)| Delivery {
                    peer: *peer,
                    name: None,
                    outcome,
                })
                .collect(),
        )
    }

    /// Events from now on.
    pub async fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.engine.subscribe()
    }
}

fn new_token() -> std::io::Result<String> {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(hex::encode(b))
}

/// Writes a file readable by its owner only (created 0600 from the first byte), through a
/// temporary sibling and a rename.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}
