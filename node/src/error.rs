//! Errors of the node's store.

use std::path::PathBuf;

/// What went wrong with the node's store. Messages say what happened, to which file, and
/// what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// There is no store in the data directory.
    #[error("no Rapport store at {0}: run `rapport init` first")]
    NotFound(PathBuf),
    /// A store already exists where a new one was to be created.
    #[error("a Rapport store already exists at {0}; it was left untouched")]
    AlreadyExists(PathBuf),
    /// The file is not a redb database or is damaged.
    #[error("store {path} is damaged or not a Rapport store: {detail}; it was left untouched")]
    Corrupt {
        /// The store file.
        path: PathBuf,
        /// What was found.
        detail: String,
    },
    /// The store was written by a newer release.
    #[error(
        "store {path} was written by a newer Rapport (schema {found}, this build reads up to {supported}); upgrade rapport"
    )]
    NewerSchema {
        /// The store file.
        path: PathBuf,
        /// The schema version in the file.
        found: u32,
        /// The newest schema this build reads.
        supported: u32,
    },
    /// Another process has the store open.
    #[error("store {0} is in use by another rapport process; stop it or use its API")]
    InUse(PathBuf),
    /// A stored document does not verify any more.
    #[error("stored document {doc} does not verify: {detail}")]
    BadDocument {
        /// The document id.
        doc: String,
        /// Why.
        detail: String,
    },
    /// An I/O error on the data directory.
    #[error("cannot use {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Reading or writing the store's file failed (a full disk, an I/O error). Nothing of
    /// the failed operation was stored; the store reopens itself on the next call.
    #[error(
        "store {path}: the disk failed ({detail}); this operation was not done, and nothing stored before it is lost. If the disk is full, free space and try again: no restart is needed"
    )]
    Disk {
        /// The store file.
        path: PathBuf,
        /// The OS error.
        detail: String,
    },
    /// A write was asked of a store opened read-only.
    #[error("store {0} was opened read-only, for a command that changes nothing")]
    ReadOnly(PathBuf),
    /// redb failed.
    #[error("store {path}: {detail}")]
    Database {
        /// The store file.
        path: PathBuf,
        /// redb's message.
        detail: String,
    },
}

impl StoreError {
    /// Whether this is an I/O failure (after which redb must be reopened).
    pub(crate) fn is_io(&self) -> bool {
        matches!(self, StoreError::Disk { .. })
    }

    /// The same error again, for each of several callers it concerns (an OS error is
    /// copied as its kind and text).
    pub(crate) fn duplicate(&self) -> StoreError {
        match self {
            StoreError::NotFound(p) => StoreError::NotFound(p.clone()),
            StoreError::AlreadyExists(p) => StoreError::AlreadyExists(p.clone()),
            StoreError::Corrupt { path, detail } => StoreError::Corrupt {
                path: path.clone(),
                detail: detail.clone(),
            },
            StoreError::NewerSchema {
                path,
                found,
                supported,
            } => StoreError::NewerSchema {
                path: path.clone(),
                found: *found,
                supported: *supported,
            },
            StoreError::InUse(p) => StoreError::InUse(p.clone()),
            StoreError::BadDocument { doc, detail } => StoreError::BadDocument {
                doc: doc.clone(),
                detail: detail.clone(),
            },
            StoreError::Io { path, source } => StoreError::Io {
                path: path.clone(),
                source: std::io::Error::new(source.kind(), source.to_string()),
            },
            StoreError::Disk { path, detail } => StoreError::Disk {
                path: path.clone(),
                detail: detail.clone(),
            },
            StoreError::ReadOnly(p) => StoreError::ReadOnly(p.clone()),
            StoreError::Database { path, detail } => StoreError::Database {
                path: path.clone(),
                detail: detail.clone(),
            },
        }
    }
}

/// Why the network (of a node or a relay) could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    /// Another process holds the port.
    #[error("cannot listen on {addr}: port {port} is in use by another process")]
    PortInUse {
        /// The address asked for.
        addr: libp2p::Multiaddr,
        /// Its port.
        port: u16,
    },
    /// libp2p could not listen on the address.
    #[error("cannot listen on {addr}: {detail}")]
    Listen {
        /// The address asked for.
        addr: libp2p::Multiaddr,
        /// libp2p's reason.
        detail: String,
    },
    /// No listener came up in time.
    #[error("no listener came up within {0:?}")]
    ListenTimeout(std::time::Duration),
    /// The relay address does not name the relay.
    #[error("the relay address {0} must end in /p2p/<relay id>")]
    RelayAddress(libp2p::Multiaddr),
    /// A transport or behaviour could not be built.
    #[error("the {what} could not start: {detail}")]
    Setup {
        /// Which part.
        what: &'static str,
        /// libp2p's reason.
        detail: String,
    },
    /// The node's key is not usable as a libp2p key.
    #[error("the key is not usable by libp2p: {0}")]
    Key(String),
}

/// Why a dial failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DialError {
    /// libp2p could not dial or connect.
    #[error("cannot dial {addr}: {detail}")]
    Failed {
        /// The address dialled.
        addr: libp2p::Multiaddr,
        /// libp2p's reason.
        detail: String,
    },
    /// The node stopped.
    #[error("the node stopped")]
    Stopped,
}
