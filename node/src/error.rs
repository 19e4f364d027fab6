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
    /// redb failed.
    #[error("store {path}: {detail}")]
    Database {
        /// The store file.
        path: PathBuf,
        /// redb's message.
        detail: String,
    },
}
