//! Rapport's node runtime: everything that has effects. The store keeps documents durably;
//! the engine holds every rule about what is stored, served and accepted; the network loop
//! syncs documents with peers over libp2p; the local API serves the CLI and other programs.
//!
//! ```no_run
//! use rapport_node::Store;
//! use rapport_protocol::Kind;
//! # fn main() -> Result<(), rapport_node::StoreError> {
//! let dir = std::path::Path::new("/tmp/alice");
//! let store = Store::create(dir, Kind::Person, "Alice", 1_700_000_000)?;
//! println!("I am {}", store.profile()?.identity);
//! # Ok(()) }
//! ```

mod actor;
mod api;
pub mod clock;
mod contacts;
mod crypt;
mod engine;
mod error;
mod index;
mod ip_limits;
mod mailbox;
mod net;
mod node;
mod redial;
pub mod relay;
mod store;
mod sync;
mod views;

pub use actor::{EngineClient, EngineStats};
pub use api::{DEFAULT_WAIT, OPENAPI_PATH, ROUTES, openapi, router};
pub use contacts::{MAX_NAMES, MAX_PETNAME, PeerName, ResolvedPeer, check_petname};
pub use crypt::{MailReport, Sealed};
pub use engine::{
    BAN_SECONDS, Engine, EngineError, GrantArgs, MAX_LOADED_DOCS, MAX_RELS_PER_OWNER, MAX_STRIKES,
    MAX_UNANSWERED_CHANGES, MAX_UNANSWERED_DOCS, Push, RoundOutcome, STRIKE_WINDOW,
};
pub use error::{DialError, NetError, StoreError};
pub use mailbox::{RELAY_DB, RelayStore, RelayStoreError, StoredMail};
pub use net::{
    FrameCodec, Framed, Inbound, MailCodec, NetClient, NetConfig, PeerInfo, PeerRefusal,
    REDIAL_EVERY, Refused, RelayStatus, SyncBatchCodec, SyncCodec, SyncResult, Undecodable,
    WireStats,
};
pub use node::{NODE_FILE, Node, NodeConfig, NodeError, NodeFile, NodeHandle, TOKEN_FILE, now};
pub use store::{
    Conduct, Contact, MAX_PEER_ADDRS, MAX_REFUSALS, PeerRecord, Profile, Refusal, Store,
    VerifyProblem, VerifyReport,
};
pub use views::{
    Deliveries, Delivery, Event, GrantRow, MemberRow, MessageView, RelDetail, RelSummary,
    ThreadView, WriteOutcome,
};
