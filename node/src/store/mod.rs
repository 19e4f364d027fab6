//! The node's store: one redb file holding the secret key, the profile, every document as
//! its signed changes, known peers, what each peer last said it holds, and refused changes
//! kept as evidence.

mod inbox;
mod migrations;
mod reader;
mod tables;

use std::collections::HashSet;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError, RwLock};

use rapport_protocol::automerge::ChangeHash;
use rapport_protocol::wire::{ChunkBudget, DocRef, RefusalKind};
use rapport_protocol::{
    ConsentDoc, ConsentHeader, DocId, IdentityKey, Kind, RelHeader, RelationshipDoc, SecretKey,
    SignedChange, read_trusted,
};
use redb::{Database, ReadOnlyDatabase, ReadableDatabase, ReadableTable, StorageBackend};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::error::StoreError;
use crate::index::{Facts, Indexed, Viewer};
use crate::views::{MessageView, RelSummary};
use migrations::{Plan, SCHEMA_VERSION};
use rapport_protocol::contain as guarded;
use reader::Reader;
use tables::*;

/// Who this node is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Profile {
    /// The node's identity.
    pub identity: IdentityKey,
    /// What kind of party it is.
    pub kind: Kind,
    /// Display name.
    pub name: String,
    /// When it was created (Unix seconds).
    pub created_at: u64,
}

/// A document's header as stored: `{"kind":"consent","customer":…,"grantee":…}` or
/// `{"kind":"relationship","owner":…,"nonce":"<32 hex>"}`.
#[derive(Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum DocHeader {
    Consent(ConsentHeader),
    Relationship(RelHeader),
}

/// The fields of a stored header, read flat: serde's internally tagged enums buffer every
/// field before reading it, and a node reads 200,000 headers as it starts with 100,000
/// customers.
#[derive(Deserialize)]
struct HeaderFields<'a> {
    kind: DocKind,
    customer: Option<IdentityKey>,
    grantee: Option<IdentityKey>,
    owner: Option<IdentityKey>,
    #[serde(borrow)]
    nonce: Option<std::borrow::Cow<'a, str>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum DocKind {
    Consent,
    Relationship,
}

impl<'de> Deserialize<'de> for DocHeader {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let f = HeaderFields::deserialize(d)?;
        match f.kind {
            DocKind::Consent => Ok(DocHeader::Consent(ConsentHeader {
                customer: f
                    .customer
                    .ok_or_else(|| D::Error::missing_field("customer"))?,
                grantee: f
                    .grantee
                    .ok_or_else(|| D::Error::missing_field("grantee"))?,
            })),
            DocKind::Relationship => {
                let text = f.nonce.ok_or_else(|| D::Error::missing_field("nonce"))?;
                let mut nonce = [0u8; 16];
                hex::decode_to_slice(text.as_bytes(), &mut nonce)
                    .map_err(|e| D::Error::custom(format!("nonce: {e}")))?;
                Ok(DocHeader::Relationship(RelHeader {
                    owner: f.owner.ok_or_else(|| D::Error::missing_field("owner"))?,
                    nonce,
                }))
            }
        }
    }
}

impl From<DocRef> for DocHeader {
    fn from(d: DocRef) -> Self {
        match d {
            DocRef::Consent(h) => DocHeader::Consent(h),
            DocRef::Relationship(h) => DocHeader::Relationship(h),
        }
    }
}

impl From<DocHeader> for DocRef {
    fn from(d: DocHeader) -> Self {
        match d {
            DocHeader::Consent(h) => DocRef::Consent(h),
            DocHeader::Relationship(h) => DocRef::Relationship(h),
        }
    }
}

/// What `rapport store verify` found ([`Store::verify`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyReport {
    /// Documents checked.
    pub documents: usize,
    /// Changes whose signatures, authors and rules were checked.
    pub changes: usize,
    /// What does not check, per document.
    pub problems: Vec<VerifyProblem>,
}

/// One document that does not check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyProblem {
    /// The document id (hex).
    pub doc: String,
    /// What is wrong.
    pub detail: String,
}

/// What the store remembers of a peer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRecord {
    /// Addresses the peer was reached at or announced, newest first (multiaddr text).
    pub addrs: Vec<String>,
    /// When it was last connected (Unix seconds).
    pub last_seen: u64,
}

/// A contact: a party the user added from an invitation, under the user's own name for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Contact {
    /// The contact's identity.
    pub identity: IdentityKey,
    /// The user's name for it, unique among the contacts (compared ignoring case).
    pub petname: String,
    /// The name it gave itself in its invitation.
    pub name: String,
    /// What kind of party it said it is.
    pub kind: Kind,
    /// The addresses its latest invitation carried (multiaddr text, without `/p2p`).
    pub addrs: Vec<String>,
    /// When it was added (Unix seconds).
    pub added_at: u64,
}

/// The most addresses kept per peer.
pub const MAX_PEER_ADDRS: usize = 8;
/// The most refusals kept; older ones are dropped first.
pub const MAX_REFUSALS: u64 = 10_000;

/// A change this node refused, kept as evidence the user can see: a company's signed,
/// unsolicited message is proof of what it tried to send.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    /// When it was refused (Unix seconds).
    pub at: u64,
    /// The peer that sent it.
    pub peer: IdentityKey,
    /// The document it was for.
    pub doc: DocId,
    /// The change hash (hex).
    pub change: String,
    /// The author the change names, if it names a valid one.
    pub author: Option<String>,
    /// Why it was refused.
    pub reason: String,
    /// What kind of refusal it was (absent in records written before schema 4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<RefusalKind>,
    /// The entries it would have added, as JSON text, when they could be read.
    pub entries: Vec<String>,
    /// The encoded signed change (hex), when at most 64 KiB: the evidence itself.
    pub signed_change: Option<String>,
}

pub use rapport_protocol::policy::Conduct;

/// The first bytes of every redb file.
const REDB_MAGIC: [u8; 9] = [b'r', b'e', b'd', b'b', 0x1A, 0x0A, 0xA9, 0x0D, 0x0A];

/// An open redb handle.
enum Db {
    /// Opened for reading and writing.
    Write(Database),
    /// Opened read-only: writes are refused with [`StoreError::ReadOnly`].
    Read(ReadOnlyDatabase),
}

impl Db {
    fn begin_read(&self) -> Result<redb::ReadTransaction, redb::TransactionError> {
        match self {
            Db::Write(db) => db.begin_read(),
            Db::Read(db) => db.begin_read(),
        }
    }
}

/// Opens the store's redb handle, at first and again after an I/O error.
type Opener = Box<dyn Fn() -> Result<Db, redb::DatabaseError> + Send + Sync>;

/// How many times one store call reopens the database before it gives up.
const MAX_REOPENS: u32 = 2;
/// redb's page cache for a store in use. redb's default (1 GiB) is the whole file of a
/// company with tens of thousands of customers: the node reads its index once at start and
/// then pages as they are used.
const CACHE_BYTES: usize = 64 << 20;
/// The page cache of the read-only look at a store before it is opened for writing.
const CHECK_CACHE_BYTES: usize = 8 << 20;

/// A node's store. Every write is one redb transaction, durable when the call returns;
/// in a group ([`Store::begin_group`]), all the group's writes are one transaction, durable
/// when the group ends.
///
/// After an I/O error (a full disk) redb refuses every later transaction until the database
/// is reopened; the store does that itself, so the node recovers once space is free. A
/// panic inside redb (a damaged page) becomes [`StoreError::Corrupt`].
pub struct Store {
    /// `None` after an I/O error or a panic, until [`Store::reopen`] succeeds. Each call
    /// holds the read lock for as long as its transaction lives, so a reopen (write lock)
    /// never runs under a live transaction.
    db: RwLock<Option<Db>>,
    open: Opener,
    path: PathBuf,
    /// The group of writes under way, if any (see [`Store::begin_group`]).
    group: Mutex<Option<Group>>,
    /// How many times the database was reopened: a reopen during a group loses its
    /// writes that were not yet durable.
    reopens: AtomicU64,
    /// Durable commits made (each one a sync of the file).
    syncs: AtomicU64,
}

/// A group of writes: one write transaction, begun by the group's first write and
/// committed (durably) when the group ends.
struct Group {
    /// [`Store::reopens`] when the group began.
    reopens: u64,
    /// The group's transaction, once it wrote. It outlives the call that began it, so
    /// nothing may close the database while it lives: every read and write in the group
    /// goes through it, and a failure drops it before closing the database.
    tx: Option<redb::WriteTransaction>,
    /// A write (or a read of the group's writes) failed: the transaction was dropped, and
    /// with it every write of the group.
    lost: bool,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

impl Store {
    /// The store's file name inside the data directory.
    pub const FILE_NAME: &'static str = "rapport.redb";

    /// Creates `data_dir` (mode 0700) and a new store in it (mode 0600: it holds the
    /// secret key), with a fresh key from the OS random source. Never overwrites.
    pub fn create(data_dir: &Path, kind: Kind, name: &str, now: u64) -> Result<Store, StoreError> {
        let path = data_dir.join(Self::FILE_NAME);
        if path.exists() {
            return Err(StoreError::AlreadyExists(path));
        }
        let io = |source| StoreError::Io {
            path: data_dir.to_path_buf(),
            source,
        };
        fs::create_dir_all(data_dir).map_err(io)?;
        restrict(data_dir, 0o700).map_err(io)?;
        // Create the file ourselves, exclusively and with mode 0600 from the first byte.
        {
            let mut opts = fs::OpenOptions::new();
            opts.read(true).write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
            opts.open(&path).map_err(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => StoreError::AlreadyExists(path.clone()),
                _ => StoreError::Io {
                    path: path.clone(),
                    source: e,
                },
            })?;
        }
        // redb initialises an existing empty file and keeps its mode.
        let db = match guarded(|| {
            Database::builder()
                .set_cache_size(CACHE_BYTES)
                .create(&path)
        }) {
            Ok(Ok(db)) => db,
            Ok(Err(e)) => {
                let _ = fs::remove_file(&path);
                return Err(db_err(&path, e));
            }
            Err(panic) => {
                let _ = fs::remove_file(&path);
                return Err(panicked(&path, &panic));
            }
        };
        let mut seed = Zeroizing::new([0u8; 32]);
        getrandom::fill(&mut *seed).map_err(|e| StoreError::Database {
            path: path.clone(),
            detail: format!("the OS random source failed: {e}"),
        })?;
        let key = SecretKey::from_seed(*seed);
        let profile = Profile {
            identity: key.identity(),
            kind,
            name: name.to_owned(),
            created_at: now,
        };
        let open = writable(&path, true);
        let store = Store::assemble(Db::Write(db), open, path);
        let written = store.write(|tx| {
            let mut meta = tx.open_table(META)?;
            meta.insert(META_SCHEMA, &SCHEMA_VERSION.to_be_bytes()[..])?;
            meta.insert(
                META_PROFILE,
                serde_json::to_vec(&profile)
                    .expect("profile serialises")
                    .as_slice(),
            )?;
            meta.insert(META_SECRET, &key.to_seed()[..])?;
            drop(meta);
            for t in [DOCS, SNAPSHOTS, DOC_FACTS, REL_SUMMARIES] {
                tx.open_table(t)?;
            }
            tx.open_table(INBOX)?;
            tx.open_table(CHANGES)?;
            tx.open_table(PEERS)?;
            tx.open_table(PEER_HEADS)?;
            tx.open_table(REFUSALS)?;
            tx.open_table(EPOCH_KEYS)?;
            tx.open_table(PEER_REFUSED)?;
            tx.open_table(CONDUCT)?;
            tx.open_table(CONTACTS)?;
            Ok(())
        });
        if let Err(e) = written {
            let path = store.path.clone();
            drop(store);
            let _ = fs::remove_file(&path);
            return Err(e);
        }
        Ok(store)
    }

    /// Opens an existing store. A missing store, a file that is not a redb database, a
    /// damaged one, or one from a newer schema gives an error and is not written to.
    pub fn open(data_dir: &Path) -> Result<Store, StoreError> {
        let path = data_dir.join(Self::FILE_NAME);
        check_magic(data_dir, &path)?;
        // Look first without writing: a store from a newer release, or one that is not ours,
        // must be refused before redb opens it for writing (which updates its header).
        let looked = guarded(|| {
            let ro = Database::builder()
                .set_cache_size(CHECK_CACHE_BYTES)
                .open_read_only(&path)?;
            Ok::<_, redb::Error>(read_schema(&ro, &path))
        })
        .map_err(|panic| panicked(&path, &panic))?;
        let checked = match looked {
            Ok(found) => {
                let found = found?;
                if let Plan::TooNew = migrations::plan(found) {
                    return Err(StoreError::NewerSchema {
                        path,
                        found,
                        supported: SCHEMA_VERSION,
                    });
                }
                true
            }
            // A store that was not shut down cleanly needs redb's recovery, which writes; the
            // read-write open below performs it, checking every page of the file. A file
            // shut down cleanly is not read whole at each start (at 100,000 customers that
            // took a second and a gigabyte of cache): damage made to it outside redb is met
            // when a read reaches it, as the damaged-store error (`Store::run`), and
            // `rapport store verify` reads every document.
            Err(redb::Error::RepairAborted) => false,
            Err(e) => return Err(db_err(&path, e)),
        };
        Self::with_opener(path.clone(), writable(&path, !checked))
    }

    /// Opens an existing store for reading only, for commands that change nothing: it works
    /// on a file the user cannot write. A store that needs recovery (it was not shut down
    /// cleanly) or a migration is opened for writing instead, as [`Store::open`] does. Every
    /// write on a read-only store fails with [`StoreError::ReadOnly`].
    pub fn open_read_only(data_dir: &Path) -> Result<Store, StoreError> {
        let path = data_dir.join(Self::FILE_NAME);
        check_magic(data_dir, &path)?;
        let p = path.clone();
        let open: Opener = Box::new(move || {
            Database::builder()
                .set_check_integrity_on_open(true)
                .set_cache_size(CACHE_BYTES)
                .open_read_only(&p)
                .map(Db::Read)
        });
        let db = match guarded(&open).map_err(|panic| panicked(&path, &panic))? {
            Ok(db) => db,
            Err(redb::DatabaseError::RepairAborted) => return Self::open(data_dir),
            Err(e) => return Err(db_err(&path, e)),
        };
        let store = Store::assemble(db, open, path);
        let found = store.schema_version()?;
        match migrations::plan(found) {
            Plan::Current => Ok(store),
            Plan::Migrate(_) => {
                drop(store);
                Self::open(data_dir)
            }
            Plan::TooNew => Err(StoreError::NewerSchema {
                path: store.path.clone(),
                found,
                supported: SCHEMA_VERSION,
            }),
        }
    }

    /// Opens an existing store through a custom redb storage backend: `backend` makes one at
    /// open and again each time the store reopens itself after an I/O error. For storage
    /// other than a plain file, and for tests that inject faults (a full disk). `path` names
    /// the store in messages; the header checks of [`Store::open`] are redb's only.
    pub fn open_with_backend<B: StorageBackend>(
        path: &Path,
        backend: impl Fn() -> std::io::Result<B> + Send + Sync + 'static,
    ) -> Result<Store, StoreError> {
        let open: Opener = Box::new(move || {
            Database::builder()
                .set_check_integrity_on_open(true)
                .set_cache_size(CACHE_BYTES)
                .create_with_backend(backend()?)
                .map(Db::Write)
        });
        Self::with_opener(path.to_path_buf(), open)
    }

    /// Opens for writing with `open`, then checks the schema and migrates if needed.
    fn with_opener(path: PathBuf, open: Opener) -> Result<Store, StoreError> {
        let db = guarded(&open)
            .map_err(|panic| panicked(&path, &panic))?
            .map_err(|e| db_err(&path, e))?;
        let store = Store::assemble(db, open, path);
        let found = store.schema_version()?;
        match migrations::plan(found) {
            Plan::Current => Ok(store),
            Plan::Migrate(from) => {
                store.write(|tx| migrations::migrate(tx, from))?;
                Ok(store)
            }
            Plan::TooNew => Err(StoreError::NewerSchema {
                path: store.path.clone(),
                found,
                supported: SCHEMA_VERSION,
            }),
        }
    }

    /// A store on an open handle, before any check of what it holds.
    fn assemble(db: Db, open: Opener, path: PathBuf) -> Store {
        Store {
            db: RwLock::new(Some(db)),
            open,
            path,
            group: Mutex::new(None),
            reopens: AtomicU64::new(0),
            syncs: AtomicU64::new(0),
        }
    }

    /// The store file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The schema version recorded in the store.
    pub fn schema_version(&self) -> Result<u32, StoreError> {
        self.read(|tx| read_schema_tx(tx, &self.path))
    }

    /// Who this node is.
    pub fn profile(&self) -> Result<Profile, StoreError> {
        serde_json::from_slice(&self.meta(META_PROFILE)?)
            .map_err(|e| self.corrupt(&format!("profile: {e}")))
    }

    /// The node's secret key.
    pub fn secret_key(&self) -> Result<SecretKey, StoreError> {
        let stored = Zeroizing::new(self.meta(META_SECRET)?);
        let seed: Zeroizing<[u8; 32]> = Zeroizing::new(
            stored
                .as_slice()
                .try_into()
                .map_err(|_| self.corrupt("the secret key record has the wrong length"))?,
        );
        let key = SecretKey::from_seed(*seed);
        if key.identity() != self.profile()?.identity {
            return Err(self.corrupt("the secret key does not match the profile's identity"));
        }
        Ok(key)
    }

    /// Stores changes of a consent document in one durable transaction, registering the
    /// document if new. Changes already held are skipped. Returns how many were new.
    pub fn put_consent_changes(
        &self,
        header: &ConsentHeader,
        changes: &[SignedChange],
    ) -> Result<usize, StoreError> {
        self.put_changes(&DocRef::Consent(*header), changes)
    }

    /// Stores changes of any document in one durable transaction, registering the document
    /// if new, and indexes the document again from what the store then holds (its facts,
    /// summary and inbox: [`crate::index`]). Changes already held are skipped; `changes`
    /// must list each change after its dependencies. Returns how many were new. The engine,
    /// which holds the document in memory, uses [`Store::put_changes_indexed`] instead.
    pub fn put_changes(&self, doc: &DocRef, changes: &[SignedChange]) -> Result<usize, StoreError> {
        self.write(|tx| {
            let held = held_hashes_tx(tx, &doc.doc_id())?;
            let mut fresh = HashSet::new();
            let changes: Vec<&SignedChange> = changes
                .iter()
                .filter(|c| !held.contains(&c.hash()) && fresh.insert(c.hash()))
                .collect();
            let new = put_new_changes_tx(tx, doc, &changes)?;
            if !new.is_empty() {
                let profile = profile_tx(tx)?;
                let viewer = Viewer {
                    me: profile.identity,
                    name: &profile.name,
                };
                let indexed = index_doc_tx(tx, doc, &viewer, &new)?;
                put_index_tx(tx, &doc.doc_id(), &indexed)?;
            }
            Ok(new.len())
        })
    }

    /// Stores changes of a document and its index records (computed by the caller from the
    /// document with these changes applied) in one transaction. The caller holds the
    /// document as the store does and passes only changes it did not hold (the engine: the
    /// changes it just applied), each after its dependencies; they are not looked up again.
    /// Returns how many were stored.
    pub(crate) fn put_changes_indexed<C: std::borrow::Borrow<SignedChange>>(
        &self,
        doc: &DocRef,
        changes: &[C],
        indexed: &Indexed,
    ) -> Result<usize, StoreError> {
        self.write(|tx| {
            let new = put_new_changes_tx(tx, doc, changes)?;
            put_index_tx(tx, &doc.doc_id(), indexed)?;
            Ok(new.len())
        })
    }

    /// Checks every document again, as `rapport store verify` does: every change's
    /// signature, author and rule (by loading the document from its changes), and that
    /// the index kept beside it (facts, summary, inbox) says what the document says.
    /// Changes nothing. A problem found is reported, not returned as an error; an error
    /// means the store itself could not be read.
    pub fn verify(&self) -> Result<VerifyReport, StoreError> {
        self.verify_with(|_, _| {})
    }

    /// [`Store::verify`], telling `progress` after each document how many were checked
    /// and how many there are (for a progress bar on a large store).
    pub fn verify_with(
        &self,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<VerifyReport, StoreError> {
        let profile = self.profile()?;
        let viewer = Viewer {
            me: profile.identity,
            name: &profile.name,
        };
        type Inboxed = std::collections::HashMap<DocId, HashSet<rapport_protocol::EntryId>>;
        let mut inboxed: Inboxed = self.read(|tx| {
            let t = tx.open_table(INBOX).map_err(|e| self.db_error(e))?;
            let mut out = Inboxed::new();
            for row in t.iter().map_err(|e| self.db_error(e))? {
                let (k, _) = row.map_err(|e| self.db_error(e))?;
                let (_, doc, entry) = k.value();
                out.entry(DocId(*doc))
                    .or_default()
                    .insert(rapport_protocol::EntryId(*entry));
            }
            Ok(out)
        })?;
        let mut report = VerifyReport::default();
        let docs = self.doc_index(None, usize::MAX)?;
        let total = docs.len() as u64;
        for (id, d, facts) in docs {
            progress(report.documents as u64, total);
            report.documents += 1;
            let mut problem = |detail: String| {
                report.problems.push(VerifyProblem {
                    doc: id.to_hex(),
                    detail,
                });
            };
            // A node starts from the ids as stored, without hashing each header again.
            if d.doc_id() != id {
                problem(format!(
                    "it is stored under this id, but its header is that of document {}",
                    d.doc_id().to_hex()
                ));
                continue;
            }
            let expected = match d {
                DocRef::Consent(_) => match self.load_consent(&id) {
                    Ok(c) => {
                        report.changes += c.ledger().changes().len();
                        viewer.consent(&c)
                    }
                    Err(e) => {
                        problem(e.to_string());
                        continue;
                    }
                },
                DocRef::Relationship(_) => match self.load_relationship(&id) {
                    Ok(r) => {
                        report.changes += r.changes().len();
                        let all: Vec<ChangeHash> =
                            r.changes().iter().map(SignedChange::hash).collect();
                        let ix = viewer.rel(&r, &all);
                        if self.rel_summary(&id)?.as_ref() != ix.summary.as_ref() {
                            problem("its listed summary differs from the document".into());
                        }
                        let want: HashSet<_> = ix.inbox.iter().map(|m| m.id).collect();
                        if inboxed.remove(&id).unwrap_or_default() != want {
                            problem("its inbox entries differ from the document's messages".into());
                        }
                        ix
                    }
                    Err(e) => {
                        problem(e.to_string());
                        continue;
                    }
                },
            };
            if facts.as_ref() != Some(&expected.facts) {
                problem(
                    "its index (who it is shared with, its grants) differs from the document"
                        .into(),
                );
            }
        }
        for doc in inboxed.keys() {
            report.problems.push(VerifyProblem {
                doc: doc.to_hex(),
                detail: "the inbox holds messages of a document the store does not hold".into(),
            });
        }
        Ok(report)
    }

    /// Documents held, under the id each is stored under, with its facts if indexed: what
    /// a node starts from, a page at a time (at most `limit` documents with ids after
    /// `after`, in id order; an empty page is the end). Both tables are read in key order
    /// and joined as they go (at 100,000 customers, a map from one to the other was a
    /// tenth of the start), and the ids are not hashed again from the headers (`rapport
    /// store verify` checks that they match). Pages keep what is read at once small.
    pub(crate) fn doc_index(
        &self,
        after: Option<&DocId>,
        limit: usize,
    ) -> Result<Vec<(DocId, DocRef, Option<Facts>)>, StoreError> {
        use std::ops::Bound;
        let from: Bound<&[u8; 32]> = match after {
            Some(id) => Bound::Excluded(&id.0),
            None => Bound::Unbounded,
        };
        // Identities in what this store wrote were checked on their way in.
        read_trusted(|| {
            self.read(|tx| {
                let docs = tx.open_table(DOCS).map_err(|e| self.db_error(e))?;
                let facts = tx.open_table(DOC_FACTS).map_err(|e| self.db_error(e))?;
                let mut facts = facts
                    .range::<&[u8; 32]>((from, Bound::Unbounded))
                    .map_err(|e| self.db_error(e))?
                    .peekable();
                let mut out = Vec::with_capacity(limit.min(4096));
                let rows = docs
                    .range::<&[u8; 32]>((from, Bound::Unbounded))
                    .map_err(|e| self.db_error(e))?;
                for row in rows.take(limit) {
                    let (k, v) = row.map_err(|e| self.db_error(e))?;
                    let id = DocId(*k.value());
                    let header: DocHeader = serde_json::from_slice(v.value())
                        .map_err(|e| self.corrupt(&format!("document header: {e}")))?;
                    // Facts of documents no longer held (none should be) are passed over.
                    let mut found = None;
                    while let Some(row) = facts.peek() {
                        let key = match row {
                            Ok((k, _)) => *k.value(),
                            Err(_) => {
                                let e = facts.next().and_then(Result::err);
                                return Err(self.db_error(e.expect("peeked an error")));
                            }
                        };
                        if key > id.0 {
                            break;
                        }
                        let (_, v) = facts
                            .next()
                            .expect("peeked")
                            .map_err(|e| self.db_error(e))?;
                        if key == id.0 {
                            found = Some(
                                serde_json::from_slice(v.value())
                                    .map_err(|e| self.corrupt(&format!("document facts: {e}")))?,
                            );
                        }
                    }
                    out.push((id, header.into(), found));
                }
                Ok(out)
            })
        })
    }

    /// Every relationship as listed, unordered.
    pub fn rel_summaries(&self) -> Result<Vec<RelSummary>, StoreError> {
        // Identities in what this store wrote were checked on their way in.
        read_trusted(|| {
            self.read(|tx| {
                let t = tx.open_table(REL_SUMMARIES).map_err(|e| self.db_error(e))?;
                let mut out = Vec::new();
                for row in t.iter().map_err(|e| self.db_error(e))? {
                    let (_, v) = row.map_err(|e| self.db_error(e))?;
                    out.push(
                        serde_json::from_slice(v.value())
                            .map_err(|e| self.corrupt(&format!("relationship summary: {e}")))?,
                    );
                }
                Ok(out)
            })
        })
    }

    /// One relationship as listed, if held.
    pub fn rel_summary(&self, doc: &DocId) -> Result<Option<RelSummary>, StoreError> {
        // Identities in what this store wrote were checked on their way in.
        read_trusted(|| {
            self.read(|tx| {
                let t = tx.open_table(REL_SUMMARIES).map_err(|e| self.db_error(e))?;
                match t.get(&doc.0).map_err(|e| self.db_error(e))? {
                    None => Ok(None),
                    Some(v) => serde_json::from_slice(v.value())
                        .map(Some)
                        .map_err(|e| self.corrupt(&format!("relationship summary: {e}"))),
                }
            })
        })
    }

    /// The newest `limit` messages from others, newest first.
    pub fn inbox(&self, limit: usize) -> Result<Vec<MessageView>, StoreError> {
        // Identities in what this store wrote were checked on their way in.
        read_trusted(|| {
            self.read(|tx| {
                let t = tx.open_table(INBOX).map_err(|e| self.db_error(e))?;
                let mut out = Vec::new();
                for row in t.iter().map_err(|e| self.db_error(e))?.rev().take(limit) {
                    let (k, v) = row.map_err(|e| self.db_error(e))?;
                    let (at, rel, id) = k.value();
                    out.push(
                        inbox::decode(at, rel, id, v.value())
                            .map_err(|e| self.corrupt(&format!("inbox entry: {e}")))?,
                    );
                }
                Ok(out)
            })
        })
    }

    /// Remembers changes of ours that `peer` refused for good in `doc`, so they are not
    /// sent to it again. Our own history keeps them.
    pub fn put_peer_refused(
        &self,
        doc: &DocId,
        peer: &IdentityKey,
        refused: &[(ChangeHash, RefusalKind)],
    ) -> Result<(), StoreError> {
        if refused.is_empty() {
            return Ok(());
        }
        self.write(|tx| {
            let mut t = tx.open_table(PEER_REFUSED)?;
            for (h, kind) in refused {
                t.insert((&doc.0, peer.as_bytes(), &h.0), kind.to_u8())?;
            }
            Ok(())
        })
    }

    /// The changes of ours `peer` refused for good in `doc`.
    pub fn peer_refused(
        &self,
        doc: &DocId,
        peer: &IdentityKey,
    ) -> Result<HashSet<ChangeHash>, StoreError> {
        self.read(|tx| {
            let t = tx.open_table(PEER_REFUSED).map_err(|e| self.db_error(e))?;
            let p = peer.as_bytes();
            let rows = t
                .range((&doc.0, p, &[0u8; 32])..=(&doc.0, p, &[0xffu8; 32]))
                .map_err(|e| self.db_error(e))?;
            let mut out = HashSet::new();
            for row in rows {
                let (k, _) = row.map_err(|e| self.db_error(e))?;
                out.insert(ChangeHash(*k.value().2));
            }
            Ok(out)
        })
    }

    /// A peer's recorded conduct, if any.
    pub fn conduct(&self, peer: &IdentityKey) -> Result<Option<Conduct>, StoreError> {
        self.read(|tx| {
            let t = tx.open_table(CONDUCT).map_err(|e| self.db_error(e))?;
            let Some(v) = t.get(peer.as_bytes()).map_err(|e| self.db_error(e))? else {
                return Ok(None);
            };
            serde_json::from_slice(v.value())
                .map(Some)
                .map_err(|e| self.corrupt(&format!("peer conduct: {e}")))
        })
    }

    /// Records a peer's conduct.
    pub fn put_conduct(&self, peer: &IdentityKey, c: &Conduct) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(c).expect("conduct serialises");
        self.write(|tx| {
            tx.open_table(CONDUCT)?
                .insert(peer.as_bytes(), bytes.as_slice())?;
            Ok(())
        })
    }

    /// Every contact, in no particular order.
    pub fn contacts(&self) -> Result<Vec<Contact>, StoreError> {
        self.read(|tx| {
            let t = tx.open_table(CONTACTS).map_err(|e| self.db_error(e))?;
            let mut out = Vec::new();
            for row in t.iter().map_err(|e| self.db_error(e))? {
                let (_, v) = row.map_err(|e| self.db_error(e))?;
                out.push(
                    serde_json::from_slice(v.value())
                        .map_err(|e| self.corrupt(&format!("contact: {e}")))?,
                );
            }
            Ok(out)
        })
    }

    /// Adds or replaces a contact, and adds its addresses to those known for the peer
    /// (`peers-1`, as announced, not seen), in one transaction: both or neither.
    pub fn put_contact(&self, c: &Contact) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(c).expect("a contact serialises");
        self.write(|tx| {
            tx.open_table(CONTACTS)?
                .insert(c.identity.as_bytes(), bytes.as_slice())?;
            merge_peer(tx, &c.identity, &c.addrs, 0)
        })
    }

    /// Removes a contact; whether there was one.
    pub fn delete_contact(&self, who: &IdentityKey) -> Result<bool, StoreError> {
        let had = std::cell::Cell::new(false);
        self.write(|tx| {
            had.set(tx.open_table(CONTACTS)?.remove(who.as_bytes())?.is_some());
            Ok(())
        })?;
        Ok(had.get())
    }

    /// Every peer banned until after `now`, with the end of its ban.
    pub fn bans(&self, now: u64) -> Result<Vec<(IdentityKey, u64)>, StoreError> {
        self.read(|tx| {
            let t = tx.open_table(CONDUCT).map_err(|e| self.db_error(e))?;
            let mut out = Vec::new();
            for row in t.iter().map_err(|e| self.db_error(e))? {
                let (k, v) = row.map_err(|e| self.db_error(e))?;
                let c: Conduct = serde_json::from_slice(v.value())
                    .map_err(|e| self.corrupt(&format!("peer conduct: {e}")))?;
                if c.banned_until > now
                    && let Ok(id) = IdentityKey::from_bytes(k.value())
                {
                    out.push((id, c.banned_until));
                }
            }
            Ok(out)
        })
    }

    /// Every document held.
    pub fn doc_refs(&self) -> Result<Vec<DocRef>, StoreError> {
        // Identities in what this store wrote were checked on their way in.
        read_trusted(|| {
            self.read(|tx| {
                let docs = tx.open_table(DOCS).map_err(|e| self.db_error(e))?;
                let mut out = Vec::new();
                for row in docs.iter().map_err(|e| self.db_error(e))? {
                    let (_, v) = row.map_err(|e| self.db_error(e))?;
                    match serde_json::from_slice::<DocHeader>(v.value()) {
                        Ok(h) => out.push(h.into()),
                        Err(e) => return Err(self.corrupt(&format!("document header: {e}"))),
                    }
                }
                Ok(out)
            })
        })
    }

    /// The document with this id, if held.
    pub fn doc_ref(&self, doc: &DocId) -> Result<Option<DocRef>, StoreError> {
        // Identities in what this store wrote were checked on their way in.
        read_trusted(|| {
            self.read(|tx| {
                let docs = tx.open_table(DOCS).map_err(|e| self.db_error(e))?;
                match docs.get(&doc.0).map_err(|e| self.db_error(e))? {
                    None => Ok(None),
                    Some(v) => match serde_json::from_slice::<DocHeader>(v.value()) {
                        Ok(h) => Ok(Some(h.into())),
                        Err(e) => Err(self.corrupt(&format!("document header: {e}"))),
                    },
                }
            })
        })
    }

    /// Every consent document held.
    pub fn consent_headers(&self) -> Result<Vec<ConsentHeader>, StoreError> {
        Ok(self
            .doc_refs()?
            .into_iter()
            .filter_map(|d| match d {
                DocRef::Consent(h) => Some(h),
                DocRef::Relationship(_) => None,
            })
            .collect())
    }

    /// The consent document with this id, if held.
    pub fn consent_header(&self, doc: &DocId) -> Result<Option<ConsentHeader>, StoreError> {
        Ok(match self.doc_ref(doc)? {
            Some(DocRef::Consent(h)) => Some(h),
            _ => None,
        })
    }

    /// A document's signed changes, in the order stored (a causal order).
    pub fn consent_changes(&self, doc: &DocId) -> Result<Vec<SignedChange>, StoreError> {
        self.changes(doc)
    }

    /// A document's signed changes, in the order stored (a causal order).
    pub fn changes(&self, doc: &DocId) -> Result<Vec<SignedChange>, StoreError> {
        self.read(|tx| {
            let table = tx.open_table(CHANGES).map_err(|e| self.db_error(e))?;
            let mut raw = Vec::new();
            for row in table
                .range((&doc.0, 0)..=(&doc.0, u64::MAX))
                .map_err(|e| self.db_error(e))?
            {
                let (_, v) = row.map_err(|e| self.db_error(e))?;
                raw.push(v);
            }
            let raw: Vec<&[u8]> = raw.iter().map(redb::AccessGuard::value).collect();
            SignedChange::decode_all(&raw)
                .into_iter()
                .map(|c| {
                    c.map_err(|e| StoreError::BadDocument {
                        doc: doc.to_hex(),
                        detail: e.to_string(),
                    })
                })
                .collect()
        })
    }

    /// The stored encodings of `doc`'s changes, in the order stored (each after its
    /// dependencies), from position `from` on: as many as fit one sync message
    /// ([`ChunkBudget`]), and whether more remain. Nothing is decoded.
    pub fn changes_raw(&self, doc: &DocId, from: u64) -> Result<(Vec<Vec<u8>>, bool), StoreError> {
        self.read(|tx| {
            let table = tx.open_table(CHANGES).map_err(|e| self.db_error(e))?;
            let mut out = Vec::new();
            let mut budget = ChunkBudget::default();
            for row in table
                .range((&doc.0, from)..=(&doc.0, u64::MAX))
                .map_err(|e| self.db_error(e))?
            {
                let (_, v) = row.map_err(|e| self.db_error(e))?;
                if !budget.take(v.value().len()) {
                    return Ok((out, true));
                }
                out.push(v.value().to_vec());
            }
            Ok((out, false))
        })
    }

    /// Loads a consent document, verifying every stored change again.
    pub fn load_consent(&self, doc: &DocId) -> Result<ConsentDoc, StoreError> {
        self.load_consent_as(doc, false)
    }

    /// Loads a consent document without checking its changes' signatures again (they were
    /// verified when they arrived; [`Store::verify`] re-checks them on demand). Every
    /// other rule is checked.
    pub fn load_consent_trusted(&self, doc: &DocId) -> Result<ConsentDoc, StoreError> {
        self.load_consent_as(doc, true)
    }

    /// `trusted`: the store's changes' signatures are not checked again.
    fn load_consent_as(&self, doc: &DocId, trusted: bool) -> Result<ConsentDoc, StoreError> {
        let header = self
            .consent_header(doc)?
            .ok_or_else(|| StoreError::BadDocument {
                doc: doc.to_hex(),
                detail: "no such consent document in this store".into(),
            })?;
        let changes = self.changes(doc)?;
        if trusted {
            // Identities too were checked when the changes arrived.
            read_trusted(|| ConsentDoc::load_trusted(header, changes))
        } else {
            ConsentDoc::load(header, changes)
        }
        .map_err(|e| StoreError::BadDocument {
            doc: doc.to_hex(),
            detail: e.to_string(),
        })
    }

    /// Loads a relationship document, verifying every stored change again.
    pub fn load_relationship(&self, doc: &DocId) -> Result<RelationshipDoc, StoreError> {
        self.load_relationship_as(doc, false)
    }

    /// Loads a relationship document without checking its changes' signatures again (they
    /// were verified when they arrived; [`Store::verify`] re-checks them on demand). Every
    /// other rule is checked.
    pub fn load_relationship_trusted(&self, doc: &DocId) -> Result<RelationshipDoc, StoreError> {
        self.load_relationship_as(doc, true)
    }

    /// `trusted`: the store's changes' signatures are not checked again.
    fn load_relationship_as(
        &self,
        doc: &DocId,
        trusted: bool,
    ) -> Result<RelationshipDoc, StoreError> {
        let Some(DocRef::Relationship(header)) = self.doc_ref(doc)? else {
            return Err(StoreError::BadDocument {
                doc: doc.to_hex(),
                detail: "no such relationship in this store".into(),
            });
        };
        let changes = self.changes(doc)?;
        if trusted {
            // Identities too were checked when the changes arrived.
            read_trusted(|| RelationshipDoc::load_trusted(header, changes))
        } else {
            RelationshipDoc::load(header, changes)
        }
        .map_err(|e| StoreError::BadDocument {
            doc: doc.to_hex(),
            detail: e.to_string(),
        })
    }

    /// Records a peer's addresses (newest first, at most [`MAX_PEER_ADDRS`]) and when it was
    /// seen.
    pub fn put_peer(
        &self,
        peer: &IdentityKey,
        addrs: &[String],
        seen: u64,
    ) -> Result<(), StoreError> {
        self.write(|tx| merge_peer(tx, peer, addrs, seen))
    }

    /// What is remembered of `peer`, if it was ever connected.
    pub fn peer(&self, peer: &IdentityKey) -> Result<Option<PeerRecord>, StoreError> {
        let key = peer.to_string();
        self.read(|tx| {
            let t = tx.open_table(PEERS).map_err(|e| self.db_error(e))?;
            let Some(v) = t.get(key.as_str()).map_err(|e| self.db_error(e))? else {
                return Ok(None);
            };
            serde_json::from_slice(v.value())
                .map(Some)
                .map_err(|e| self.corrupt(&format!("peer record: {e}")))
        })
    }

    /// Every known peer.
    pub fn peers(&self) -> Result<Vec<(IdentityKey, PeerRecord)>, StoreError> {
        self.read(|tx| {
            let t = tx.open_table(PEERS).map_err(|e| self.db_error(e))?;
            let mut out = Vec::new();
            for row in t.iter().map_err(|e| self.db_error(e))? {
                let (k, v) = row.map_err(|e| self.db_error(e))?;
                let id: IdentityKey = k
                    .value()
                    .parse()
                    .map_err(|e| self.corrupt(&format!("peer record: {e}")))?;
                let rec = serde_json::from_slice(v.value())
                    .map_err(|e| self.corrupt(&format!("peer record: {e}")))?;
                out.push((id, rec));
            }
            Ok(out)
        })
    }

    /// Remembers the heads `peer` reported for `doc`.
    pub fn put_peer_heads(
        &self,
        doc: &DocId,
        peer: &IdentityKey,
        heads: &[ChangeHash],
    ) -> Result<(), StoreError> {
        let bytes: Vec<u8> = heads.iter().flat_map(|h| h.0).collect();
        self.write(|tx| {
            tx.open_table(PEER_HEADS)?
                .insert((&doc.0, peer.as_bytes()), bytes.as_slice())?;
            Ok(())
        })
    }

    /// Remembers the heads each peer reported for each document, in one write.
    pub fn put_peer_heads_all(
        &self,
        all: &std::collections::BTreeMap<(DocId, IdentityKey), Vec<ChangeHash>>,
    ) -> Result<(), StoreError> {
        self.write(|tx| {
            let mut t = tx.open_table(PEER_HEADS)?;
            let mut bytes = Vec::new();
            for ((doc, peer), heads) in all {
                bytes.clear();
                bytes.extend(heads.iter().flat_map(|h| h.0));
                t.insert((&doc.0, peer.as_bytes()), bytes.as_slice())?;
            }
            Ok(())
        })
    }

    /// The heads `peer` last reported for `doc`, if any.
    pub fn peer_heads(
        &self,
        doc: &DocId,
        peer: &IdentityKey,
    ) -> Result<Option<Vec<ChangeHash>>, StoreError> {
        self.read(|tx| {
            let t = tx.open_table(PEER_HEADS).map_err(|e| self.db_error(e))?;
            let v = t
                .get((&doc.0, peer.as_bytes()))
                .map_err(|e| self.db_error(e))?;
            Ok(v.map(|v| {
                v.value()
                    .chunks_exact(32)
                    .map(|c| ChangeHash(c.try_into().expect("32 bytes")))
                    .collect()
            }))
        })
    }

    /// Stores a content key for `(doc, epoch)`.
    pub fn put_epoch_key(
        &self,
        doc: &DocId,
        epoch: u32,
        key: &rapport_protocol::seal::ContentKey,
    ) -> Result<(), StoreError> {
        self.write(|tx| {
            tx.open_table(EPOCH_KEYS)?
                .insert((&doc.0, epoch), key.expose())?;
            Ok(())
        })
    }

    /// Every content key held, by document and epoch.
    pub fn epoch_keys(
        &self,
    ) -> Result<Vec<(DocId, u32, rapport_protocol::seal::ContentKey)>, StoreError> {
        self.read(|tx| {
            let t = tx.open_table(EPOCH_KEYS).map_err(|e| self.db_error(e))?;
            let mut out = Vec::new();
            for row in t.iter().map_err(|e| self.db_error(e))? {
                let (k, v) = row.map_err(|e| self.db_error(e))?;
                let (doc, epoch) = k.value();
                out.push((
                    DocId(*doc),
                    epoch,
                    rapport_protocol::seal::ContentKey::from_bytes(*v.value()),
                ));
            }
            Ok(out)
        })
    }

    /// Keeps a refusal as evidence, dropping the oldest past [`MAX_REFUSALS`]. Returns its
    /// sequence number.
    pub fn add_refusal(&self, r: &Refusal) -> Result<u64, StoreError> {
        let json = serde_json::to_vec(r).expect("refusals serialise");
        self.write(|tx| {
            let mut t = tx.open_table(REFUSALS)?;
            let next = match t.last()? {
                Some((k, _)) => k.value() + 1,
                None => 0,
            };
            t.insert(next, json.as_slice())?;
            if next >= MAX_REFUSALS {
                let cut = next - MAX_REFUSALS;
                t.retain_in(..=cut, |_, _| false)?;
            }
            Ok(next)
        })
    }

    /// The newest refusals, newest first, at most `limit`.
    pub fn refusals(&self, limit: usize) -> Result<Vec<(u64, Refusal)>, StoreError> {
        self.read(|tx| {
            let t = tx.open_table(REFUSALS).map_err(|e| self.db_error(e))?;
            let mut out = Vec::new();
            for row in t.iter().map_err(|e| self.db_error(e))?.rev().take(limit) {
                let (k, v) = row.map_err(|e| self.db_error(e))?;
                let r = serde_json::from_slice(v.value())
                    .map_err(|e| self.corrupt(&format!("refusal record: {e}")))?;
                out.push((k.value(), r));
            }
            Ok(out)
        })
    }

    /// Stores an Automerge snapshot of a document.
    pub fn put_snapshot(&self, doc: &DocId, bytes: &[u8]) -> Result<(), StoreError> {
        self.write(|tx| {
            tx.open_table(SNAPSHOTS)?.insert(&doc.0, bytes)?;
            Ok(())
        })
    }

    /// The Automerge snapshot of a document, if one was stored.
    pub fn snapshot(&self, doc: &DocId) -> Result<Option<Vec<u8>>, StoreError> {
        self.read(|tx| {
            let t = tx.open_table(SNAPSHOTS).map_err(|e| self.db_error(e))?;
            Ok(t.get(&doc.0)
                .map_err(|e| self.db_error(e))?
                .map(|v| v.value().to_vec()))
        })
    }

    /// Removes a document, its changes and its snapshot in one transaction. Returns whether
    /// it was held.
    pub fn delete_document(&self, doc: &DocId) -> Result<bool, StoreError> {
        self.write(|tx| {
            let held = tx.open_table(DOCS)?.remove(&doc.0)?.is_some();
            tx.open_table(SNAPSHOTS)?.remove(&doc.0)?;
            let mut changes = tx.open_table(CHANGES)?;
            changes.retain_in((&doc.0, 0)..=(&doc.0, u64::MAX), |_, _| false)?;
            let mut heads = tx.open_table(PEER_HEADS)?;
            heads.retain_in((&doc.0, &[0u8; 32])..=(&doc.0, &[0xffu8; 32]), |_, _| false)?;
            let mut keys = tx.open_table(EPOCH_KEYS)?;
            keys.retain_in((&doc.0, 0)..=(&doc.0, u32::MAX), |_, _| false)?;
            let mut refused = tx.open_table(PEER_REFUSED)?;
            refused.retain_in(
                (&doc.0, &[0u8; 32], &[0u8; 32])..=(&doc.0, &[0xffu8; 32], &[0xffu8; 32]),
                |_, _| false,
            )?;
            tx.open_table(DOC_FACTS)?.remove(&doc.0)?;
            tx.open_table(REL_SUMMARIES)?.remove(&doc.0)?;
            // The inbox is ordered by time: this document's messages are found by a scan.
            tx.open_table(INBOX)?.retain(|k, _| k.1 != &doc.0)?;
            Ok(held)
        })
    }

    fn meta(&self, key: &str) -> Result<Vec<u8>, StoreError> {
        self.read(|tx| {
            let meta = tx.open_table(META).map_err(|e| match e {
                redb::TableError::TableDoesNotExist(_) => {
                    self.corrupt("it has no Rapport metadata")
                }
                e => self.db_error(e),
            })?;
            let v = meta.get(key).map_err(|e| self.db_error(e))?;
            v.map(|v| v.value().to_vec())
                .ok_or_else(|| self.corrupt(&format!("metadata {key:?} is missing")))
        })
    }

    /// Runs `f` in one write transaction and commits it (durably) if it succeeds. A write
    /// that fails leaves nothing of itself behind (redb's commit is atomic); one that fails
    /// on I/O is tried once more on a reopened database, as `f` sees the state afresh.
    fn write<T>(
        &self,
        f: impl Fn(&redb::WriteTransaction) -> Result<T, redb::Error>,
    ) -> Result<T, StoreError> {
        let mut group = self.group.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(g) = group.as_mut() {
            return self.write_in_group(g, &f);
        }
        drop(group);
        self.run(|db| {
            let Db::Write(db) = db else {
                return Err(StoreError::ReadOnly(self.path.clone()));
            };
            let tx = db.begin_write().map_err(|e| self.db_error(e))?;
            let out = f(&tx).map_err(|e| self.db_error(e))?;
            tx.commit().map_err(|e| self.db_error(e))?;
            self.syncs.fetch_add(1, Ordering::Relaxed);
            Ok(out)
        })
    }

    /// A write in the group under way, in the group's transaction (begun here by its first
    /// write). A write that fails drops that transaction, and with it the group's earlier
    /// writes: the group ends in an error ([`Store::end_group`]), and every later call in it
    /// fails at once.
    fn write_in_group<T>(
        &self,
        g: &mut Group,
        f: &impl Fn(&redb::WriteTransaction) -> Result<T, redb::Error>,
    ) -> Result<T, StoreError> {
        if g.lost || self.reopens.load(Ordering::SeqCst) != g.reopens {
            g.lost = true;
            return Err(self.group_lost());
        }
        if g.tx.is_none() {
            let tx = self.run(|db| {
                let Db::Write(db) = db else {
                    return Err(StoreError::ReadOnly(self.path.clone()));
                };
                db.begin_write().map_err(|e| self.db_error(e))
            })?;
            if self.reopens.load(Ordering::SeqCst) != g.reopens {
                // Beginning it reopened the database: what the group read before may be
                // gone with the old handle's unsynced state.
                g.lost = true;
                return Err(self.group_lost());
            }
            g.tx = Some(tx);
        }
        let tx = g.tx.as_ref().expect("begun above");
        match guarded(|| f(tx)) {
            Ok(Ok(out)) => Ok(out),
            Ok(Err(e)) => {
                let e = self.db_error(e);
                self.lose(g, e.is_io());
                Err(e)
            }
            Err(panic) => {
                self.lose(g, true);
                Err(panicked(&self.path, &panic))
            }
        }
    }

    /// Drops the group's transaction (redb aborts it) and, after an I/O error or a panic,
    /// closes the database: the next call reopens it.
    fn lose(&self, g: &mut Group, close: bool) {
        g.lost = true;
        if let Some(tx) = g.tx.take()
            && let Err(panic) = guarded(move || drop(tx))
        {
            tracing::warn!("dropping a write of store {}: {panic}", self.path.display());
        }
        if close {
            self.close();
        }
    }

    fn group_lost(&self) -> StoreError {
        self.disk("an earlier write in this group failed; the group's writes are lost")
    }

    /// How many durable commits (syncs of the file) this handle has made.
    pub fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }

    /// Begins a group of writes: until [`Store::end_group`], every write goes into one
    /// write transaction, committed durably when the group ends, so that many operations
    /// share one commit and one sync (group commit). Reads see the group's writes at once;
    /// a crash before the group ends loses all of them, so nothing written in a group may be
    /// acknowledged before it ends. One write that fails loses the group's writes: the
    /// group ends in an error. Begun again before it ends, the group goes on (starting
    /// afresh would drop what it wrote, which its end would then acknowledge).
    pub fn begin_group(&self) {
        let mut group = self.group.lock().unwrap_or_else(PoisonError::into_inner);
        if group.is_some() {
            return;
        }
        *group = Some(Group {
            reopens: self.reopens.load(Ordering::SeqCst),
            tx: None,
            lost: false,
        });
    }

    /// Ends the group begun by [`Store::begin_group`]: one durable commit makes all its
    /// writes durable. An error means none of them may be counted on: the caller must
    /// reload what it holds in memory from the store.
    pub fn end_group(&self) -> Result<(), StoreError> {
        let Some(mut g) = self
            .group
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        else {
            return Ok(());
        };
        if g.lost || self.reopens.load(Ordering::SeqCst) != g.reopens {
            drop(g.tx.take());
            return Err(self.group_lost());
        }
        let Some(tx) = g.tx.take() else {
            return Ok(());
        };
        match guarded(move || tx.commit()) {
            Ok(Ok(())) => {
                self.syncs.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Ok(Err(e)) => {
                let e = self.db_error(e);
                if e.is_io() {
                    self.close();
                }
                Err(e)
            }
            Err(panic) => {
                self.close();
                Err(panicked(&self.path, &panic))
            }
        }
    }

    /// Runs `f` in one read transaction; in a group that wrote, in the group's transaction,
    /// so that it sees the group's writes.
    fn read<T>(&self, f: impl Fn(&Reader) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let mut group = self.group.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(g) = group.as_mut()
            && let Some(tx) = g.tx.as_ref()
        {
            return match guarded(|| f(&Reader::Group(tx))) {
                Ok(Ok(out)) => Ok(out),
                Ok(Err(e)) => {
                    if e.is_io() {
                        // redb refuses the transaction from now on.
                        self.lose(g, true);
                    }
                    Err(e)
                }
                Err(panic) => {
                    self.lose(g, true);
                    Err(panicked(&self.path, &panic))
                }
            };
        }
        drop(group);
        self.run(|db| {
            let tx = db.begin_read().map_err(|e| self.db_error(e))?;
            f(&Reader::Snapshot(&tx))
        })
    }

    /// Runs `op` on the database, reopening it first if an earlier call left it closed. An
    /// I/O error closes it (redb would refuse every later transaction) and `op` is tried
    /// once more; a panic inside redb closes it and becomes [`StoreError::Corrupt`].
    fn run<T>(&self, op: impl Fn(&Db) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let mut failed: Option<StoreError> = None;
        let mut reopens = 0;
        loop {
            let guard = self.db.read().unwrap_or_else(PoisonError::into_inner);
            let Some(db) = guard.as_ref() else {
                drop(guard);
                if reopens == MAX_REOPENS {
                    return Err(failed.unwrap_or_else(|| self.disk("it could not be reopened")));
                }
                reopens += 1;
                if let Err(e) = self.reopen() {
                    return Err(failed.unwrap_or(e));
                }
                continue;
            };
            match guarded(|| op(db)) {
                Err(panic) => {
                    drop(guard);
                    self.close();
                    return Err(panicked(&self.path, &panic));
                }
                Ok(Err(e)) if e.is_io() => {
                    drop(guard);
                    self.close();
                    if failed.is_some() {
                        return Err(e);
                    }
                    tracing::warn!("{e}; reopening the store");
                    failed = Some(e);
                }
                Ok(out) => return out,
            }
        }
    }

    /// Drops the database handle (a later call reopens it). Dropping after an I/O error may
    /// fail to write redb's clean-shutdown mark: the reopen then runs redb's recovery, which
    /// keeps every committed transaction and nothing else.
    fn close(&self) {
        let mut slot = self.db.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(db) = slot.take()
            && let Err(panic) = guarded(move || drop(db))
        {
            tracing::warn!("closing store {}: {panic}", self.path.display());
        }
    }

    /// Opens the database again, if no other call did meanwhile.
    fn reopen(&self) -> Result<(), StoreError> {
        let mut slot = self.db.write().unwrap_or_else(PoisonError::into_inner);
        if slot.is_none() {
            let db = guarded(&self.open)
                .map_err(|panic| panicked(&self.path, &panic))?
                .map_err(|e| db_err(&self.path, e))?;
            tracing::info!("store {} reopened", self.path.display());
            self.reopens.fetch_add(1, Ordering::SeqCst);
            *slot = Some(db);
        }
        Ok(())
    }

    fn disk(&self, detail: &str) -> StoreError {
        StoreError::Disk {
            path: self.path.clone(),
            detail: detail.to_owned(),
        }
    }

    fn corrupt(&self, detail: &str) -> StoreError {
        StoreError::Corrupt {
            path: self.path.clone(),
            detail: detail.to_owned(),
        }
    }

    fn db_error(&self, e: impl Into<redb::Error>) -> StoreError {
        db_err(&self.path, e.into())
    }
}

fn db_err(path: &Path, e: impl Into<redb::Error>) -> StoreError {
    match e.into() {
        redb::Error::Io(e) => StoreError::Disk {
            path: path.to_path_buf(),
            detail: e.to_string(),
        },
        redb::Error::PreviousIo => StoreError::Disk {
            path: path.to_path_buf(),
            detail: "an earlier write failed".into(),
        },
        redb::Error::DatabaseAlreadyOpen => StoreError::InUse(path.to_path_buf()),
        redb::Error::Corrupted(detail) => StoreError::Corrupt {
            path: path.to_path_buf(),
            detail,
        },
        // Every table exists from the store's creation (or its migration) on, with one type:
        // a table that is missing or of another type is damage, not a state to act on.
        e @ (redb::Error::TableDoesNotExist(_)
        | redb::Error::TableIsMultimap(_)
        | redb::Error::TableTypeMismatch { .. }
        | redb::Error::TypeDefinitionChanged { .. }) => StoreError::Corrupt {
            path: path.to_path_buf(),
            detail: e.to_string(),
        },
        redb::Error::UpgradeRequired(v) => StoreError::Corrupt {
            path: path.to_path_buf(),
            detail: format!("redb file format {v} needs an upgrade"),
        },
        e => StoreError::Database {
            path: path.to_path_buf(),
            detail: e.to_string(),
        },
    }
}

/// A panic inside redb, as the damaged-store error.
fn panicked(path: &Path, panic: &str) -> StoreError {
    StoreError::Corrupt {
        path: path.to_path_buf(),
        detail: format!("redb cannot read it ({panic})"),
    }
}

/// A writable opener for the store file at `path`, checking the whole file on open: redb
/// may otherwise trust a file damaged outside it.
/// Opens the file for writing; `check` checks every page at the first open (when nothing
/// checked it just before). A reopen after an I/O error checks again.
fn writable(path: &Path, check: bool) -> Opener {
    let path = path.to_path_buf();
    let first = std::sync::atomic::AtomicBool::new(true);
    Box::new(move || {
        let check = check || !first.swap(false, Ordering::SeqCst);
        Database::builder()
            .set_check_integrity_on_open(check)
            .set_cache_size(CACHE_BYTES)
            .open(&path)
            .map(Db::Write)
    })
}

/// Refuses a missing file, or one that does not start with redb's header, before redb sees
/// it.
fn check_magic(data_dir: &Path, path: &Path) -> Result<(), StoreError> {
    let mut magic = [0u8; 9];
    match fs::File::open(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(StoreError::NotFound(data_dir.to_path_buf()))
        }
        Err(e) => Err(StoreError::Io {
            path: path.to_path_buf(),
            source: e,
        }),
        Ok(mut f) => {
            if f.read_exact(&mut magic).is_err() || magic != REDB_MAGIC {
                return Err(StoreError::Corrupt {
                    path: path.to_path_buf(),
                    detail: "the file does not start with redb's header".into(),
                });
            }
            Ok(())
        }
    }
}

/// The hashes of the changes of `id` held, read from the changes themselves.
fn held_hashes_tx(
    tx: &redb::WriteTransaction,
    id: &DocId,
) -> Result<HashSet<ChangeHash>, redb::Error> {
    let table = tx.open_table(CHANGES)?;
    let mut held = HashSet::new();
    for row in table.range((&id.0, 0)..=(&id.0, u64::MAX))? {
        let (_, v) = row?;
        let hash = match SignedChange::peek(v.value()) {
            Some((hash, _)) => hash,
            None => SignedChange::decode(v.value())
                .map_err(|e| redb::Error::Corrupted(format!("a stored change: {e}")))?
                .hash(),
        };
        held.insert(hash);
    }
    Ok(held)
}

/// Stores `changes` of `doc` inside `tx`, after what it holds, registering the document if
/// new. The caller makes sure none is held already. Returns their hashes.
fn put_new_changes_tx<C: std::borrow::Borrow<SignedChange>>(
    tx: &redb::WriteTransaction,
    doc: &DocRef,
    changes: &[C],
) -> Result<Vec<ChangeHash>, redb::Error> {
    let id = doc.doc_id();
    let mut docs = tx.open_table(DOCS)?;
    if docs.get(&id.0)?.is_none() {
        let header = serde_json::to_vec(&DocHeader::from(*doc)).expect("header serialises");
        docs.insert(&id.0, header.as_slice())?;
    }
    drop(docs);
    let mut table = tx.open_table(CHANGES)?;
    let next = match table.range((&id.0, 0)..=(&id.0, u64::MAX))?.next_back() {
        Some(last) => last?.0.value().1 + 1,
        None => 0,
    };
    let mut new = Vec::new();
    let mut encoded = Vec::new();
    for (at, c) in (next..).zip(changes) {
        let c = c.borrow();
        c.encode_into(&mut encoded);
        table.insert((&id.0, at), encoded.as_slice())?;
        new.push(c.hash());
    }
    Ok(new)
}

/// Writes a document's index records inside `tx`.
fn put_index_tx(tx: &redb::WriteTransaction, id: &DocId, ix: &Indexed) -> Result<(), redb::Error> {
    let facts = serde_json::to_vec(&ix.facts).expect("facts serialise");
    tx.open_table(DOC_FACTS)?.insert(&id.0, facts.as_slice())?;
    if let Some(s) = &ix.summary {
        let v = serde_json::to_vec(s).expect("a summary serialises");
        tx.open_table(REL_SUMMARIES)?.insert(&id.0, v.as_slice())?;
    }
    if !ix.inbox.is_empty() {
        let mut inbox = tx.open_table(INBOX)?;
        for m in &ix.inbox {
            inbox.insert((m.at, &id.0, &m.id.0), inbox::encode(m).as_slice())?;
        }
    }
    Ok(())
}

/// The profile, read inside a write transaction.
fn profile_tx(tx: &redb::WriteTransaction) -> Result<Profile, redb::Error> {
    let meta = tx.open_table(META)?;
    let v = meta
        .get(META_PROFILE)?
        .ok_or_else(|| redb::Error::Corrupted("the profile is missing".into()))?;
    serde_json::from_slice(v.value())
        .map_err(|e| redb::Error::Corrupted(format!("the profile does not parse: {e}")))
}

/// Loads `doc` from what `tx` holds (verifying every change) and derives its index records,
/// with the inbox entries of the changes `new`.
fn index_doc_tx(
    tx: &redb::WriteTransaction,
    doc: &DocRef,
    viewer: &Viewer<'_>,
    new: &[ChangeHash],
) -> Result<Indexed, redb::Error> {
    let id = doc.doc_id();
    let bad = |detail: String| {
        redb::Error::Corrupted(format!("stored document {id} does not verify: {detail}"))
    };
    let table = tx.open_table(CHANGES)?;
    let mut changes = Vec::new();
    for row in table.range((&id.0, 0)..=(&id.0, u64::MAX))? {
        let (_, v) = row?;
        changes.push(SignedChange::decode(v.value()).map_err(|e| bad(e.to_string()))?);
    }
    Ok(match doc {
        DocRef::Consent(h) => {
            viewer.consent(&ConsentDoc::load(*h, changes).map_err(|e| bad(e.to_string()))?)
        }
        DocRef::Relationship(h) => {
            let r = RelationshipDoc::load(*h, changes).map_err(|e| bad(e.to_string()))?;
            viewer.rel(&r, new)
        }
    })
}

/// Indexes every document held (the migration to schema 5).
/// Records `addrs` for `peer` in `tx` (newest first, at most [`MAX_PEER_ADDRS`]), and
/// that it was seen at `seen` if later than recorded.
fn merge_peer(
    tx: &redb::WriteTransaction,
    peer: &IdentityKey,
    addrs: &[String],
    seen: u64,
) -> Result<(), redb::Error> {
    let key = peer.to_string();
    let mut t = tx.open_table(PEERS)?;
    let mut rec: PeerRecord = t
        .get(key.as_str())?
        .and_then(|v| serde_json::from_slice(v.value()).ok())
        .unwrap_or_default();
    let mut merged: Vec<String> = addrs.to_vec();
    merged.append(&mut rec.addrs);
    let mut seen_addrs = HashSet::new();
    merged.retain(|a| seen_addrs.insert(a.clone()));
    merged.truncate(MAX_PEER_ADDRS);
    rec.addrs = merged;
    rec.last_seen = rec.last_seen.max(seen);
    t.insert(
        key.as_str(),
        serde_json::to_vec(&rec).expect("serialises").as_slice(),
    )?;
    Ok(())
}

pub(crate) fn index_all(tx: &redb::WriteTransaction) -> Result<(), redb::Error> {
    let profile = profile_tx(tx)?;
    let viewer = Viewer {
        me: profile.identity,
        name: &profile.name,
    };
    let mut refs = Vec::new();
    for row in tx.open_table(DOCS)?.iter()? {
        let (_, v) = row?;
        let h: DocHeader = serde_json::from_slice(v.value())
            .map_err(|e| redb::Error::Corrupted(format!("document header: {e}")))?;
        refs.push(DocRef::from(h));
    }
    for d in refs {
        let all: Vec<ChangeHash> = held_hashes_tx(tx, &d.doc_id())?.into_iter().collect();
        let indexed = index_doc_tx(tx, &d, &viewer, &all)?;
        put_index_tx(tx, &d.doc_id(), &indexed)?;
    }
    Ok(())
}

/// Reads the schema version through any redb handle, read-only included.
fn read_schema(db: &impl ReadableDatabase, path: &Path) -> Result<u32, StoreError> {
    let tx = db.begin_read().map_err(|e| db_err(path, e))?;
    read_schema_tx(&Reader::Snapshot(&tx), path)
}

/// Reads the schema version in a read transaction.
fn read_schema_tx(tx: &Reader, path: &Path) -> Result<u32, StoreError> {
    let corrupt = |detail: &str| StoreError::Corrupt {
        path: path.to_path_buf(),
        detail: detail.to_owned(),
    };
    let meta = tx.open_table(META).map_err(|e| match e {
        redb::TableError::TableDoesNotExist(_) => corrupt("it has no Rapport metadata"),
        e => db_err(path, e),
    })?;
    let v = meta
        .get(META_SCHEMA)
        .map_err(|e| db_err(path, e))?
        .ok_or_else(|| corrupt("the schema version is missing"))?;
    let arr: [u8; 4] = v
        .value()
        .try_into()
        .map_err(|_| corrupt("the schema version is not 4 bytes"))?;
    Ok(u32::from_be_bytes(arr))
}

fn restrict(path: &Path, mode: u32) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    }
    #[cfg(not(unix))]
    let _ = (path, mode);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rapport_protocol::SecretKey;

    proptest! {
        /// A header read back flat is the header written tagged.
        #[test]
        fn headers_read_back_as_written(a in 1u8..50, b in 1u8..50, nonce in any::<[u8; 16]>()) {
            let (a, b) = (
                SecretKey::from_seed([a; 32]).identity(),
                SecretKey::from_seed([b; 32]).identity(),
            );
            for r in [
                DocRef::Consent(ConsentHeader { customer: a, grantee: b }),
                DocRef::Relationship(RelHeader { owner: a, nonce }),
            ] {
                let json = serde_json::to_vec(&DocHeader::from(r)).unwrap();
                let back: DocHeader = serde_json::from_slice(&json).unwrap();
                prop_assert_eq!(DocRef::from(back), r);
            }
        }
    }

    /// The inbox reads the binary records this release writes and the JSON ones an
    /// earlier store holds, side by side, newest first; a damaged record is an error that
    /// names the store as damaged.
    #[test]
    fn the_inbox_reads_binary_and_earlier_json_records() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::create(dir.path(), Kind::Org, "Acme", 1_700_000_000).unwrap();
        let view = |at: u64, seed: u8, text: &str| MessageView {
            rel: DocId([seed; 32]),
            id: rapport_protocol::EntryId([seed ^ 0xff; 32]),
            by: SecretKey::from_seed([seed; 32]).identity(),
            by_name: format!("customer {seed}"),
            at,
            text: text.into(),
            purpose: None,
            thread: None,
            mine: false,
        };
        let (old, new) = (
            view(10, 1, "from an earlier store"),
            view(20, 2, "from this one"),
        );
        let put = |m: &MessageView, value: Vec<u8>| {
            store
                .write(|tx| {
                    tx.open_table(INBOX)?
                        .insert((m.at, &m.rel.0, &m.id.0), value.as_slice())?;
                    Ok(())
                })
                .unwrap();
        };
        put(&old, serde_json::to_vec(&old).unwrap());
        put(&new, inbox::encode(&new));
        assert_eq!(store.inbox(10).unwrap(), vec![new.clone(), old]);

        let damaged = view(30, 3, "cut short");
        put(&damaged, inbox::encode(&damaged)[..40].to_vec());
        let err = store.inbox(10).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("inbox entry"), "{err}");
    }

    #[test]
    fn a_header_is_a_tagged_object_and_a_bad_one_is_refused() {
        let owner = SecretKey::from_seed([3; 32]).identity();
        let r = DocRef::Relationship(RelHeader {
            owner,
            nonce: [0xab; 16],
        });
        assert_eq!(
            serde_json::to_string(&DocHeader::from(r)).unwrap(),
            format!(
                r#"{{"kind":"relationship","owner":"{owner}","nonce":"{}"}}"#,
                "ab".repeat(16)
            )
        );
        for bad in [
            format!(r#"{{"kind":"relationship","owner":"{owner}"}}"#),
            format!(r#"{{"kind":"relationship","owner":"{owner}","nonce":"abab"}}"#),
            format!(
                r#"{{"kind":"relationship","owner":"{owner}","nonce":"{}"}}"#,
                "zz".repeat(16)
            ),
            format!(r#"{{"kind":"consent","customer":"{owner}"}}"#),
            format!(r#"{{"kind":"other","owner":"{owner}"}}"#),
            r#"{"kind":"consent","customer":"x","grantee":"y"}"#.to_string(),
        ] {
            assert!(serde_json::from_str::<DocHeader>(&bad).is_err(), "{bad}");
        }
    }
}
