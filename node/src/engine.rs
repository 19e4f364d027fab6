//! The engine: a node's documents and every rule that decides what it stores, serves and
//! accepts. It does no networking. Its operations take the time as an argument; the node's
//! one clock and random source reach it as [`crate::clock::Sources`]. One thread owns it
//! (the actor in `actor.rs`); the network loop and the local API send it operations and
//! carry out the pushes it asks for.

use std::cell::{Cell, OnceCell, RefCell};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, PoisonError, RwLock};

use rapport_protocol::automerge::ChangeHash;
use rapport_protocol::policy::{self, may_read};
use rapport_protocol::seal::ContentKey;
use rapport_protocol::wire::DocRef;
use rapport_protocol::{
    ConsentDoc, ConsentError, ConsentHeader, DocId, EntryBody, EntryId, GrantStatus, GrantView,
    IdentityKey, Ledger, LegalBasis, RelBody, RelError, RelHeader, RelationshipDoc, Scope,
    SecretKey, SignedChange, Terms, UnixSeconds, read_ledger_file, write_ledger_file,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::broadcast;

use crate::error::StoreError;
use crate::index::{Facts, Viewer};
use crate::store::{Profile, Refusal, Store};
use crate::views::{Event, GrantRow, MessageView, RelDetail, RelSummary, ThreadView, WriteOutcome};

/// Why an engine operation failed. Each message says what happened and what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The request is not valid as given (bad identity, scope, date …).
    #[error("{0}")]
    Invalid(String),
    /// The thing asked for does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The request is valid but the rules refuse it.
    #[error("{0}")]
    Refused(String),
    /// The node stopped before the operation ran or finished.
    #[error("the node stopped")]
    Stopped,
}

impl EngineError {
    /// The same error again, for each of several operations it concerns.
    pub(crate) fn duplicate(&self) -> EngineError {
        match self {
            EngineError::Store(e) => EngineError::Store(e.duplicate()),
            EngineError::Invalid(s) => EngineError::Invalid(s.clone()),
            EngineError::NotFound(s) => EngineError::NotFound(s.clone()),
            EngineError::Refused(s) => EngineError::Refused(s.clone()),
            EngineError::Stopped => EngineError::Stopped,
        }
    }
}

impl From<ConsentError> for EngineError {
    fn from(e: ConsentError) -> Self {
        EngineError::Refused(e.to_string())
    }
}

impl From<RelError> for EngineError {
    fn from(e: RelError) -> Self {
        EngineError::Refused(e.to_string())
    }
}

type Result<T> = std::result::Result<T, EngineError>;

pub use rapport_protocol::policy::{
    BAN_SECONDS, MAX_RELS_PER_OWNER, MAX_STRIKES, MAX_UNANSWERED_CHANGES, MAX_UNANSWERED_DOCS,
    Push, STRIKE_WINDOW,
};

/// The arguments of a grant.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GrantArgs {
    /// The grantee.
    pub grantee: IdentityKey,
    /// The scopes.
    pub scopes: Vec<Scope>,
    /// The purpose.
    pub purpose: String,
    /// The end, if any.
    pub expires: Option<UnixSeconds>,
    /// A roster terms id; default: the terms proffered to this grantee, else SD-BASE.
    pub terms: Option<String>,
    /// The legal basis; default consent.
    pub legal_basis: Option<LegalBasis>,
    /// SHA-256 (hex) of the notice shown; default: the hash of the grant's own statement.
    pub notice_sha256: Option<String>,
}

pub use rapport_protocol::replica::RoundOutcome;

pub(crate) use rapport_protocol::replica::Doc;

/// The most documents kept loaded between operations; past it, the least recently used are
/// dropped from memory (they load again from the store when next used).
pub const MAX_LOADED_DOCS: usize = 2048;

/// Heads peers reported that the engine holds in memory before storing them, at most
/// ([`Engine::store_hints`]): documents and peers, and bytes of heads (a peer may report
/// up to `MAX_HEADS` per document; an honest one, one or two). Past either, they are
/// stored with the group under way.
pub(crate) const MAX_HINTS_BEHIND: usize = 4096;
/// See [`MAX_HINTS_BEHIND`].
pub(crate) const MAX_HINTS_BYTES: usize = 1 << 20;

/// Documents read from the store's index at a time as the engine starts: what it reads
/// at once stays small however many it holds.
const START_PAGE: usize = 4096;

/// A document held: what is known of it without loading it, and its state once loaded.
pub(crate) struct Slot {
    r: DocRef,
    facts: Facts,
    /// Boxed: a slot of a document not loaded is then a pointer, not a whole document.
    doc: OnceCell<Box<Doc>>,
    /// When it was last used, on the engine's use counter (for dropping the least recently
    /// used).
    used: Cell<u64>,
}

/// The node's documents and rules.
pub struct Engine {
    store: Store,
    pub(crate) key: SecretKey,
    me: IdentityKey,
    profile: Profile,
    nonce: [u8; 16],
    /// Every document held. Loaded when first used ([`Engine::doc`]).
    docs: HashMap<DocId, Slot>,
    /// The documents shared with each peer, by [`Facts`]: consent documents with it, the
    /// relationships it owns, and those this node owns that it was ever a member of.
    by_peer: BTreeMap<IdentityKey, HashSet<DocId>>,
    /// How many relationships each peer owns here (a rule bounds it on every request that
    /// brings a new one, so it is counted as slots come and go rather than listed).
    owned_by: HashMap<IdentityKey, usize>,
    /// The peers in `by_peer` (those this node shares a document with), for the network
    /// loop, which checks ahead only their requests: a stranger's request goes to the
    /// engine unchecked and is refused before anything of it is decoded.
    sharing: Arc<RwLock<HashSet<IdentityKey>>>,
    /// Counts uses of documents (see [`Slot::used`]).
    uses: Cell<u64>,
    /// How many documents are loaded.
    loaded: Cell<usize>,
    /// See [`MAX_LOADED_DOCS`].
    max_loaded: usize,
    events: broadcast::Sender<Event>,
    auto_accept: bool,
    /// See [`MAX_UNANSWERED_DOCS`].
    pub(crate) max_unanswered_docs: usize,
    /// Content keys held, by relationship and epoch (see [`rapport_protocol::seal`]).
    pub(crate) keys: RefCell<HashMap<DocId, BTreeMap<u32, ContentKey>>>,
    /// Heads of what was deposited in a peer's mailbox, per document and peer, so a
    /// failed dial every few seconds does not deposit the same changes again.
    pub(crate) deposited: HashMap<(DocId, IdentityKey), Vec<ChangeHash>>,
    /// Changes that arrived before what they depend on, per document and sender.
    pub(crate) waiting: rapport_protocol::replica::Waiting,
    /// Cold syncs under way: documents sent from the store, chunk by chunk, unloaded.
    pub(crate) cursors: rapport_protocol::replica::Cursors,
    /// Events of a group of operations, held until the group is durable
    /// (see [`Engine::begin_group`]); `None` outside a group.
    held_events: std::cell::RefCell<Option<Vec<Event>>>,
    /// The node's clock and random source.
    sources: crate::clock::Sources,
    /// Memory may hold writes that are not durable (a group's sync failed and the reload
    /// after it failed too): nothing may run until [`Engine::refresh`] succeeds.
    stale: bool,
    /// The user's contacts (see `contacts.rs`), as stored.
    pub(crate) contacts: BTreeMap<IdentityKey, crate::store::Contact>,
    /// Heads peers reported, recorded here and not yet stored ([`Engine::store_hints`]).
    /// They are hints of what to send: a crash that loses them costs a round, never data.
    hints: BTreeMap<(DocId, IdentityKey), Vec<ChangeHash>>,
    /// When the oldest of `hints` was recorded.
    hints_since: Option<std::time::Instant>,
    /// The bytes of heads in `hints`.
    hints_bytes: usize,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("me", &self.me)
            .field("docs", &self.docs.len())
            .finish()
    }
}

impl Drop for Engine {
    /// Stores the heads still recorded (an engine used without its actor, which stores
    /// them as it stops).
    fn drop(&mut self) {
        if let Err(e) = self.store_hints() {
            tracing::warn!("storing the heads peers reported: {e}");
        }
    }
}

/// `N` bytes from the OS random source, before an engine (and its sources) exists.
fn os_random<const N: usize>() -> Result<[u8; N]> {
    let mut n = [0u8; N];
    crate::clock::Entropy::fill(&crate::clock::OsEntropy, &mut n)
        .map_err(|e| EngineError::Invalid(e.to_string()))?;
    Ok(n)
}

impl Engine {
    /// Opens the engine on a store, loading and verifying every document it holds.
    pub fn open(store: Store) -> Result<Self> {
        let profile = store.profile()?;
        let key = store.secret_key()?;
        let (events, _) = broadcast::channel(1024);
        let mut engine = Self {
            me: profile.identity,
            store,
            key,
            profile,
            nonce: os_random()?,
            docs: HashMap::new(),
            by_peer: BTreeMap::new(),
            owned_by: HashMap::new(),
            sharing: Arc::default(),
            uses: Cell::new(0),
            loaded: Cell::new(0),
            max_loaded: MAX_LOADED_DOCS,
            events,
            auto_accept: false,
            max_unanswered_docs: MAX_UNANSWERED_DOCS,
            keys: RefCell::new(HashMap::new()),
            deposited: HashMap::new(),
            hints: BTreeMap::new(),
            hints_since: None,
            hints_bytes: 0,
            waiting: Default::default(),
            cursors: Default::default(),
            held_events: std::cell::RefCell::new(None),
            sources: crate::clock::Sources::system(),
            stale: false,
            contacts: BTreeMap::new(),
        };
        engine.reload_all()?;
        Ok(engine)
    }

    /// Begins a group of operations that become durable together, in one transaction of
    /// the store ([`Store::begin_group`]); events wait for the group's end. Whoever groups
    /// operations must not acknowledge any of them before [`Engine::end_group`] succeeds.
    pub fn begin_group(&mut self) {
        self.store.begin_group();
        *self.held_events.borrow_mut() = Some(Vec::new());
    }

    /// Ends the group: makes its writes durable and sends its events. On an error none of
    /// the group's writes may be counted on; the engine has reloaded its documents from the
    /// store, so its memory matches what is durable (the caller reports the error to every
    /// operation of the group).
    pub fn end_group(&mut self) -> Result<()> {
        let held = self.held_events.borrow_mut().take().unwrap_or_default();
        match self.store.end_group() {
            Ok(()) => {
                for e in held {
                    let _ = self.events.send(e);
                }
                self.trim();
                Ok(())
            }
            Err(e) => {
                tracing::error!("{e}; reloading the documents from the store");
                self.stale = true;
                if let Err(again) = self.refresh() {
                    tracing::error!("{again}; the engine reloads before its next operation");
                }
                Err(e.into())
            }
        }
    }

    /// The heads `peer` last reported of `id`: recorded lately (not stored yet), else
    /// stored.
    pub(crate) fn peer_heads(
        &self,
        id: &DocId,
        peer: &IdentityKey,
    ) -> Result<Option<Vec<ChangeHash>>> {
        if let Some(h) = self.hints.get(&(*id, *peer)) {
            return Ok(Some(h.clone()));
        }
        Ok(self.store.peer_heads(id, peer)?)
    }

    /// Records the heads `peer` reported of `id`. They are kept in memory and stored with
    /// the others later ([`Engine::store_hints`]; the engine actor does so once idle, or
    /// once they have waited a second): a sync records heads for every document it
    /// touches, on both sides, and storing each as it came rewrote a page of the store for
    /// each (the rows are keyed by document, so they scatter). Stored at once, past
    /// [`MAX_HINTS_BEHIND`] or [`MAX_HINTS_BYTES`], with the group under way.
    pub(crate) fn record_peer_heads(
        &mut self,
        id: &DocId,
        peer: &IdentityKey,
        heads: &[ChangeHash],
    ) -> Result<()> {
        let size = |h: &[ChangeHash]| h.len() * 32;
        if let Some(old) = self.hints.insert((*id, *peer), heads.to_vec()) {
            self.hints_bytes -= size(&old);
        }
        self.hints_bytes += size(heads);
        self.hints_since.get_or_insert_with(std::time::Instant::now);
        if self.hints.len() > MAX_HINTS_BEHIND || self.hints_bytes > MAX_HINTS_BYTES {
            self.store_hints()?;
        }
        Ok(())
    }

    /// Whether heads are recorded that are not stored yet.
    pub fn has_hints(&self) -> bool {
        !self.hints.is_empty()
    }

    /// Whether heads recorded have waited `age` or longer to be stored.
    pub fn hints_older_than(&self, age: std::time::Duration) -> bool {
        self.hints_since.is_some_and(|t| t.elapsed() >= age)
    }

    /// Stores the heads recorded since last time, in one write (in the group under way,
    /// if any), in key order. They are no longer held either way: if the write or the
    /// group's commit fails (a full disk), they are lost, as hints may be, rather than
    /// tried again at every idle moment.
    pub fn store_hints(&mut self) -> Result<()> {
        if self.hints.is_empty() {
            return Ok(());
        }
        let hints = std::mem::take(&mut self.hints);
        self.hints_since = None;
        self.hints_bytes = 0;
        Ok(self.store.put_peer_heads_all(&hints)?)
    }

    /// Drops the heads recorded for `id` (the document is erased).
    fn forget_hints(&mut self, id: &DocId) {
        let mut dropped = 0;
        self.hints.retain(|(d, _), h| {
            if d == id {
                dropped += h.len() * 32;
            }
            d != id
        });
        self.hints_bytes -= dropped;
        if self.hints.is_empty() {
            self.hints_since = None;
        }
    }

    /// Makes memory match the store again after a failed group, if it does not: until this
    /// succeeds (the disk may still be full), no operation may run.
    pub fn refresh(&mut self) -> Result<()> {
        if self.stale {
            self.reload_all()?;
            self.stale = false;
            tracing::info!("the engine reloaded its documents from the store");
        }
        Ok(())
    }

    /// Reloads every document and key from the store, after writes that were not made
    /// durable: memory then holds exactly what the store does.
    fn reload_all(&mut self) -> Result<()> {
        self.contacts = self
            .store
            .contacts()?
            .into_iter()
            .map(|c| (c.identity, c))
            .collect();
        self.docs.clear();
        self.by_peer.clear();
        self.owned_by.clear();
        self.sharing
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        self.loaded.set(0);
        // The store holds each id once, and the engine held none since the clear above.
        let mut after: Option<DocId> = None;
        loop {
            let page = self.store.doc_index(after.as_ref(), START_PAGE)?;
            let Some(last) = page.last() else { break };
            after = Some(last.0);
            for (id, r, facts) in page {
                match facts {
                    Some(f) => self.fill_slot(id, r, f, None),
                    None => {
                        // Every write indexes its document; a store written otherwise (by
                        // an older build without the migration) is indexed here, in memory.
                        let doc = self.load_doc(&r)?;
                        let f = self.facts_of(&doc);
                        self.fill_slot(id, r, f, Some(doc));
                    }
                }
            }
        }
        let mut keys: HashMap<DocId, BTreeMap<u32, ContentKey>> = HashMap::new();
        for (doc, epoch, k) in self.store.epoch_keys()? {
            keys.entry(doc).or_default().insert(epoch, k);
        }
        *self.keys.borrow_mut() = keys;
        self.deposited.clear();
        self.waiting = Default::default();
        self.cursors = Default::default();
        Ok(())
    }

    // ----- documents, loaded when used -----

    fn facts_of(&self, doc: &Doc) -> Facts {
        match doc {
            Doc::Consent(c) => Facts::of_consent(&self.me, c),
            Doc::Rel(r) => Facts::of_rel(r),
        }
    }

    /// The peers a document with these facts is shared with (see [`Engine::by_peer`]).
    fn peers_of(&self, r: &DocRef, facts: &Facts) -> Vec<IdentityKey> {
        match (r, facts) {
            (DocRef::Consent(h), _) => vec![if h.customer == self.me {
                h.grantee
            } else {
                h.customer
            }],
            (DocRef::Relationship(h), Facts::Relationship { members }) if h.owner == self.me => {
                members.iter().map(|(m, _)| *m).collect()
            }
            (DocRef::Relationship(h), _) => vec![h.owner],
        }
    }

    /// Registers (or replaces) a document's slot and its place in [`Engine::by_peer`].
    fn put_slot(&mut self, r: DocRef, facts: Facts, doc: Option<Doc>) {
        let id = r.doc_id();
        self.drop_slot(&id);
        self.fill_slot(id, r, facts, doc);
    }

    /// Puts a document under `id`, the id of `r`, which holds none.
    fn fill_slot(&mut self, id: DocId, r: DocRef, facts: Facts, doc: Option<Doc>) {
        debug_assert_eq!(id, r.doc_id());
        debug_assert!(!self.docs.contains_key(&id));
        for p in self.peers_of(&r, &facts) {
            if p != self.me {
                let set = self.by_peer.entry(p).or_insert_with(|| {
                    self.sharing
                        .write()
                        .unwrap_or_else(PoisonError::into_inner)
                        .insert(p);
                    HashSet::new()
                });
                set.insert(id);
            }
        }
        if let DocRef::Relationship(h) = r
            && h.owner != self.me
        {
            *self.owned_by.entry(h.owner).or_default() += 1;
        }
        let cell = OnceCell::new();
        if let Some(d) = doc {
            let _ = cell.set(Box::new(d));
            self.loaded.set(self.loaded.get() + 1);
        }
        self.docs.insert(
            id,
            Slot {
                r,
                facts,
                doc: cell,
                used: Cell::new(self.tick()),
            },
        );
    }

    /// Forgets a document (in memory only). Returns its state if it was loaded.
    fn drop_slot(&mut self, id: &DocId) -> Option<Doc> {
        let slot = self.docs.remove(id)?;
        if let DocRef::Relationship(h) = slot.r
            && let Some(n) = self.owned_by.get_mut(&h.owner)
        {
            *n -= 1;
            if *n == 0 {
                self.owned_by.remove(&h.owner);
            }
        }
        for p in self.peers_of(&slot.r, &slot.facts) {
            if let Some(set) = self.by_peer.get_mut(&p) {
                set.remove(id);
                if set.is_empty() {
                    self.by_peer.remove(&p);
                    self.sharing
                        .write()
                        .unwrap_or_else(PoisonError::into_inner)
                        .remove(&p);
                }
            }
        }
        let doc = slot.doc.into_inner();
        if doc.is_some() {
            self.loaded.set(self.loaded.get() - 1);
        }
        doc.map(|d| *d)
    }

    fn tick(&self) -> u64 {
        let t = self.uses.get() + 1;
        self.uses.set(t);
        t
    }

    /// Loads a document from the store (verifying every change) and learns the content
    /// keys sealed to this node in it that it does not hold yet (a crash between storing a
    /// change and its key leaves one to learn).
    fn load_doc(&self, r: &DocRef) -> Result<Doc> {
        let id = r.doc_id();
        let doc = match r {
            // Verified when its changes arrived (`rapport store verify` checks again).
            DocRef::Consent(_) => Doc::Consent(self.store.load_consent_trusted(&id)?),
            DocRef::Relationship(_) => Doc::Rel(self.store.load_relationship_trusted(&id)?),
        };
        if let Doc::Rel(rel) = &doc {
            self.learn_keys_of(rel)?;
        }
        Ok(doc)
    }

    /// Whether this node holds document `id` (loaded or not).
    pub(crate) fn holds_doc(&self, id: &DocId) -> bool {
        self.docs.contains_key(id)
    }

    /// Whether document `id` is in memory now.
    pub(crate) fn is_loaded(&self, id: &DocId) -> bool {
        self.docs.get(id).is_some_and(|s| s.doc.get().is_some())
    }

    /// Whether `who` is a member of relationship `id` now, by the index kept beside it
    /// (without loading it); `None` when this node holds no such relationship.
    pub(crate) fn indexed_member(&self, id: &DocId, who: &IdentityKey) -> Option<bool> {
        let slot = self.docs.get(id)?;
        match slot.r {
            DocRef::Relationship(_) => Some(slot.facts.is_member(who)),
            DocRef::Consent(_) => None,
        }
    }

    /// A document held, loaded from the store on first use. A document that cannot be
    /// loaded (the store failed, or it does not verify any more) is logged and treated as
    /// absent; `rapport store verify` names it.
    pub(crate) fn doc(&self, id: &DocId) -> Option<&Doc> {
        let slot = self.docs.get(id)?;
        slot.used.set(self.tick());
        if let Some(d) = slot.doc.get() {
            return Some(&**d);
        }
        match self.load_doc(&slot.r) {
            Ok(d) => {
                let _ = slot.doc.set(Box::new(d));
                self.loaded.set(self.loaded.get() + 1);
                slot.doc.get().map(|d| &**d)
            }
            Err(e) => {
                tracing::error!(doc = %id, "cannot load a stored document: {e}");
                None
            }
        }
    }

    /// A document held, loaded, for changing in memory. Whoever changes it stores the
    /// change with [`Engine::put_indexed`].
    pub(crate) fn doc_mut(&mut self, id: &DocId) -> Option<&mut Doc> {
        self.doc(id)?;
        self.docs.get_mut(id)?.doc.get_mut().map(|d| &mut **d)
    }

    /// Takes a document out of memory (loading it first) to change it; put it back with
    /// [`Engine::insert_doc`].
    pub(crate) fn take_doc(&mut self, id: &DocId) -> Option<Doc> {
        self.doc(id)?;
        self.drop_slot(id)
    }

    /// Puts a document in memory, with its facts.
    pub(crate) fn insert_doc(&mut self, doc: Doc) {
        let facts = self.facts_of(&doc);
        self.put_slot(doc.doc_ref(), facts, Some(doc));
    }

    /// Runs `f` on a document without keeping it loaded if it was not: for scans over
    /// many documents, which must not fill memory.
    fn peek<T>(&self, id: &DocId, f: impl FnOnce(&Doc) -> T) -> Option<T> {
        let slot = self.docs.get(id)?;
        if let Some(d) = slot.doc.get() {
            return Some(f(d));
        }
        match self.load_doc(&slot.r) {
            Ok(d) => Some(f(&d)),
            Err(e) => {
                tracing::error!(doc = %id, "cannot load a stored document: {e}");
                None
            }
        }
    }

    /// Drops the least recently used documents from memory when more than
    /// [`MAX_LOADED_DOCS`] (or the number set with [`Engine::set_max_loaded_docs`]) are
    /// loaded, down to half of it. The engine's actor calls it after each group of
    /// operations.
    pub fn trim(&mut self) {
        if self.loaded.get() <= self.max_loaded {
            return;
        }
        let mut used: Vec<(u64, DocId)> = self
            .docs
            .iter()
            .filter(|(_, s)| s.doc.get().is_some())
            .map(|(id, s)| (s.used.get(), *id))
            .collect();
        used.sort_unstable();
        let drop = used.len().saturating_sub(self.max_loaded / 2);
        for (_, id) in used.into_iter().take(drop) {
            if let Some(s) = self.docs.get_mut(&id)
                && s.doc.take().is_some()
            {
                self.loaded.set(self.loaded.get() - 1);
            }
        }
    }

    /// Keeps at most `n` documents loaded between groups of operations (see
    /// [`Engine::trim`]).
    pub fn set_max_loaded_docs(&mut self, n: usize) {
        self.max_loaded = n;
    }

    /// How many documents are loaded in memory now.
    pub fn loaded_docs(&self) -> usize {
        self.loaded.get()
    }

    /// The document ids of every slot whose header satisfies `f`.
    fn ids_where(&self, f: impl Fn(&DocRef) -> bool) -> Vec<DocId> {
        let mut v: Vec<DocId> = self
            .docs
            .iter()
            .filter(|(_, s)| f(&s.r))
            .map(|(id, _)| *id)
            .collect();
        v.sort();
        v
    }

    /// The peers this node shares a document with, kept current as documents come and go
    /// (see [`Engine::by_peer`]).
    pub(crate) fn sharing(&self) -> Arc<RwLock<HashSet<IdentityKey>>> {
        self.sharing.clone()
    }

    /// How many relationships `owner` (a peer) owns here: [`Engine::rels_owned_by`]'s
    /// length, counted as documents come and go.
    pub(crate) fn rels_owned_count(&self, owner: &IdentityKey) -> usize {
        let n = self.owned_by.get(owner).copied().unwrap_or(0);
        debug_assert_eq!(n, self.rels_owned_by(owner).len(), "the count is kept");
        n
    }

    /// The relationships held whose owner is `owner` (by the index, without loading).
    pub(crate) fn rels_owned_by(&self, owner: &IdentityKey) -> Vec<DocId> {
        let Some(set) = self.by_peer.get(owner) else {
            return Vec::new();
        };
        let mut v: Vec<DocId> = set
            .iter()
            .filter(|id| {
                self.docs
                    .get(id)
                    .is_some_and(|s| matches!(s.r, DocRef::Relationship(h) if h.owner == *owner))
            })
            .copied()
            .collect();
        v.sort();
        v
    }

    /// Stores `changes` of a document held in memory (already applied to it) with its
    /// index records, in one transaction; `new` are the hashes whose messages go to the
    /// inbox. The document's facts in memory follow.
    pub(crate) fn put_indexed(
        &mut self,
        d: &DocRef,
        changes: &[SignedChange],
        new: &[ChangeHash],
    ) -> Result<usize> {
        self.store_indexed(d, Some(changes), new)
    }

    /// [`Engine::put_indexed`]; with `changes` `None`, the changes `new` names, as the
    /// document holds them (not copied).
    fn store_indexed(
        &mut self,
        d: &DocRef,
        changes: Option<&[SignedChange]>,
        new: &[ChangeHash],
    ) -> Result<usize> {
        let id = d.doc_id();
        let viewer = self.viewer();
        let Some(held) = self.doc(&id) else {
            return Err(EngineError::NotFound(format!("no document {id}")));
        };
        let indexed = match held {
            Doc::Consent(c) => viewer.consent(c),
            Doc::Rel(r) => viewer.rel(r, new),
        };
        // Only what the document did not hold goes to the store (which holds what the
        // document held): `changes` may list more, as a whole ledger imported from a file.
        let n = match changes {
            Some(changes) => {
                // Each new change once, the first copy listed.
                let mut new: HashSet<&ChangeHash> = new.iter().collect();
                let changes: Vec<&SignedChange> =
                    changes.iter().filter(|c| new.remove(&c.hash())).collect();
                self.store.put_changes_indexed(d, &changes, &indexed)?
            }
            None => {
                let changes = held.changes_of(new);
                self.store.put_changes_indexed(d, &changes, &indexed)?
            }
        };
        let doc = self.drop_slot(&id);
        self.put_slot(*d, indexed.facts, doc);
        Ok(n)
    }

    /// How many consent documents hold grants to `me` that it never answered (by the
    /// index).
    pub(crate) fn unanswered_consent_count(&self, me: &IdentityKey) -> usize {
        self.docs
            .values()
            .filter(|s| {
                matches!(s.r, DocRef::Consent(h) if h.grantee == *me)
                    && matches!(
                        s.facts,
                        Facts::Consent {
                            answered: false,
                            ..
                        }
                    )
            })
            .count()
    }

    /// How this node shows itself in views.
    fn viewer(&self) -> Viewer<'_> {
        Viewer {
            me: self.me,
            name: &self.profile.name,
        }
    }

    /// Uses `sources` for time ([`Engine::now`]) and randomness from now on (a fresh
    /// actor nonce is drawn from it).
    pub fn set_sources(&mut self, sources: crate::clock::Sources) -> Result<()> {
        self.sources = sources;
        self.nonce = self.random()?;
        Ok(())
    }

    /// The time by the node's clock. Operations still take the time as an argument, so a
    /// caller can act at any time it chooses.
    pub fn now(&self) -> UnixSeconds {
        self.sources.clock.now()
    }

    /// `N` bytes from the node's random source.
    pub(crate) fn random<const N: usize>(&self) -> Result<[u8; N]> {
        let mut n = [0u8; N];
        self.sources
            .entropy
            .fill(&mut n)
            .map_err(|e| EngineError::Invalid(e.to_string()))?;
        Ok(n)
    }

    /// Accept every grant made to this node on the customer's terms as soon as it arrives
    /// (a company's choice; off by default).
    pub fn set_auto_accept(&mut self, on: bool) {
        self.auto_accept = on;
    }

    /// Sets how many consent documents with unanswered grants this node keeps (default
    /// [`MAX_UNANSWERED_DOCS`]); grants from further strangers are refused until it answers.
    pub fn set_max_unanswered_docs(&mut self, n: usize) {
        self.max_unanswered_docs = n;
    }

    /// Who this node is.
    pub fn profile(&self) -> &Profile {
        &self.profile
    }

    /// This node's identity.
    pub fn me(&self) -> IdentityKey {
        self.me
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// A receiver of the node's events.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// The event sender, for the parts of the node that report events of their own.
    pub fn event_sender(&self) -> broadcast::Sender<Event> {
        self.events.clone()
    }

    /// Whether anybody listens to the node's events now: views that only an event would
    /// carry need not be built when nobody does.
    pub(crate) fn listened(&self) -> bool {
        self.events.receiver_count() > 0
    }

    pub(crate) fn emit(&self, e: Event) {
        if let Some(held) = self.held_events.borrow_mut().as_mut() {
            held.push(e);
            return;
        }
        // Nobody listening is fine.
        let _ = self.events.send(e);
    }

    // ----- lookups -----

    fn consent(&self, id: &DocId) -> Option<&ConsentDoc> {
        match self.doc(id) {
            Some(Doc::Consent(c)) => Some(c),
            _ => None,
        }
    }

    pub(crate) fn rel(&self, id: &DocId) -> Option<&RelationshipDoc> {
        match self.doc(id) {
            Some(Doc::Rel(r)) => Some(r),
            _ => None,
        }
    }

    /// A relationship the index lists, loaded; an error when it cannot be loaded (a damaged
    /// store) rather than a panic.
    fn rel_held(&self, id: &DocId) -> Result<&RelationshipDoc> {
        self.rel(id).ok_or_else(|| unloadable(id))
    }

    /// A consent document the index lists, loaded (see [`Engine::rel_held`]).
    fn consent_held(&self, id: &DocId) -> Result<&ConsentDoc> {
        self.consent(id).ok_or_else(|| unloadable(id))
    }

    /// The consent ledger in which `customer` grants to `grantee`, if held.
    pub(crate) fn ledger(&self, customer: IdentityKey, grantee: IdentityKey) -> Option<&Ledger> {
        self.consent(&ConsentHeader { customer, grantee }.doc_id())
            .map(ConsentDoc::ledger)
    }

    /// Finds a relationship by id or unique id prefix (at least 4 hex digits).
    fn find_rel(&self, prefix: &str) -> Result<DocId> {
        let p = prefix.trim().to_ascii_lowercase();
        if p.len() < 4 || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(EngineError::Invalid(format!(
                "{:?} is not a relationship id: give at least 4 hex digits of an id from `rapport rel list`",
                prefix.chars().take(80).collect::<String>()
            )));
        }
        let found: Vec<DocId> = self
            .ids_where(|r| matches!(r, DocRef::Relationship(_)))
            .into_iter()
            .filter(|id| id.to_hex().starts_with(&p))
            .collect();
        match found.as_slice() {
            [id] => Ok(*id),
            [] => Err(EngineError::NotFound(format!(
                "no relationship {p} on this node (see `rapport rel list`)"
            ))),
            _ => Err(EngineError::Invalid(format!(
                "{} relationships start with {p}: give more digits",
                found.len()
            ))),
        }
    }

    /// Finds the one grant whose id starts with `prefix`, in any consent document held.
    fn find_grant(&self, prefix: &str) -> Result<(DocId, EntryId)> {
        let p = prefix.trim().to_ascii_lowercase();
        if p.len() < 4 || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(EngineError::Invalid(format!(
                "{p:?} is not a grant id: give at least 4 hex digits of the id shown by `rapport consent list`"
            )));
        }
        let mut found = Vec::new();
        for (id, slot) in &self.docs {
            if let Facts::Consent { grants, .. } = &slot.facts {
                for g in grants {
                    if g.to_hex().starts_with(&p) {
                        found.push((*id, *g));
                    }
                }
            }
        }
        match found.len() {
            1 => Ok(found[0]),
            0 => Err(EngineError::NotFound(format!(
                "no grant {p} in this node's ledgers (see `rapport consent list`)"
            ))),
            n => Err(EngineError::Invalid(format!(
                "{n} grants start with {p}: give more digits"
            ))),
        }
    }

    pub(crate) fn message_view(&self, rel: &RelationshipDoc, id: EntryId) -> Option<MessageView> {
        self.viewer().message(rel, id)
    }

    // ----- queries -----

    /// How many changes a document holds, if held (cheap: for progress checks).
    pub fn change_count(&self, id: &DocId) -> Option<usize> {
        match self.doc(id)? {
            Doc::Consent(c) => Some(c.ledger().changes().len()),
            Doc::Rel(r) => Some(r.changes().len()),
        }
    }

    /// A relationship's heads (sorted hex), by id or prefix: for tests and diagnostics.
    pub fn heads(&self, rel: &str) -> Result<Vec<String>> {
        let id = self.find_rel(rel)?;
        let mut h: Vec<String> = self
            .rel_held(&id)?
            .heads()
            .iter()
            .map(ToString::to_string)
            .collect();
        h.sort();
        Ok(h)
    }

    /// How many documents this node holds.
    pub fn doc_count(&self) -> usize {
        self.docs.len()
    }

    /// Every grant this node gave or holds, at `now`. Loads each consent document in turn
    /// without keeping it.
    pub fn grants(&self, now: UnixSeconds) -> Vec<GrantRow> {
        let mut rows = Vec::new();
        for id in self.ids_where(|r| matches!(r, DocRef::Consent(_))) {
            self.peek(&id, |d| {
                let Doc::Consent(doc) = d else { return };
                let h = *doc.ledger().header();
                let (role, peer) = if h.customer == self.me {
                    ("granted", h.grantee)
                } else {
                    ("held", h.customer)
                };
                for g in doc.ledger().grants(now) {
                    rows.push(GrantRow::new(role, peer, &g));
                }
            });
        }
        rows
    }

    /// Every consent ledger held, as ledger files (`rapport-ledger/1` JSON).
    pub fn ledger_files(&self) -> Vec<String> {
        self.ids_where(|r| matches!(r, DocRef::Consent(_)))
            .into_iter()
            .filter_map(|id| {
                self.peek(&id, |d| match d {
                    Doc::Consent(c) => Some(write_ledger_file(c.ledger())),
                    Doc::Rel(_) => None,
                })
                .flatten()
            })
            .collect()
    }

    /// The consent ledger shared with `peer`, as a ledger file.
    pub fn export_ledger(&self, peer: &IdentityKey) -> Result<String> {
        [
            ConsentHeader {
                customer: self.me,
                grantee: *peer,
            },
            ConsentHeader {
                customer: *peer,
                grantee: self.me,
            },
        ]
        .iter()
        .find_map(|h| self.consent(&h.doc_id()))
        .map(|d| write_ledger_file(d.ledger()))
        .ok_or_else(|| EngineError::NotFound(format!("you share no consent document with {peer}")))
    }

    /// Every relationship, newest activity first (from the summaries the store keeps).
    pub fn relationships(&self) -> Result<Vec<RelSummary>> {
        let mut out = self.store.rel_summaries()?;
        out.sort_by_key(|s| std::cmp::Reverse((s.last_at, s.id)));
        Ok(out)
    }

    fn summary(&self, r: &RelationshipDoc) -> RelSummary {
        self.viewer().summary(r)
    }

    /// One relationship in full.
    pub fn relationship(&self, prefix: &str, now: UnixSeconds) -> Result<RelDetail> {
        let id = self.find_rel(prefix)?;
        let r = self.rel_held(&id)?;
        let owner = r.header().owner;
        let access = |m: &IdentityKey| -> String {
            if owner != self.me {
                return String::new();
            }
            match may_read(self.ledger(owner, *m), m, now) {
                Ok(()) => "reads".into(),
                Err(e) => e.to_string(),
            }
        };
        let threads = r
            .entries_in_order()
            .filter_map(|(id, e)| match &e.body {
                RelBody::Thread { title } => Some(ThreadView {
                    id: *id,
                    title: title.clone(),
                    by: e.by,
                    at: e.at,
                }),
                _ => None,
            })
            .collect();
        Ok(RelDetail {
            summary: self.summary(r),
            access: r
                .members()
                .map(|m| (m.identity.to_string(), access(&m.identity)))
                .collect(),
            profile: r.profile(),
            threads,
            messages: r
                .messages()
                .iter()
                .filter_map(|(id, _)| self.message_view(r, *id))
                .collect(),
            epoch: r.latest_epoch(),
            epoch_recipients: r
                .latest_epoch()
                .and_then(|n| r.epoch(n))
                .map(|e| e.slots.iter().map(|(m, _)| m.to_string()).collect())
                .unwrap_or_default(),
            epochs_held: self.held_epochs(&id),
        })
    }

    /// Messages from others across every relationship, newest first, at most `limit` (from
    /// the inbox the store keeps).
    pub fn inbox(&self, limit: usize) -> Result<Vec<MessageView>> {
        Ok(self.store.inbox(limit)?)
    }

    /// Changes this node refused, newest first.
    pub fn refusals(&self, limit: usize) -> Result<Vec<Refusal>> {
        Ok(self
            .store
            .refusals(limit)?
            .into_iter()
            .map(|(_, r)| r)
            .collect())
    }

    /// The documents this node syncs with `peer` now: consent documents with it, the
    /// relationships it owns that `peer` may read, and the relationships `peer` owns.
    /// Found by the index; loads at most the consent document with `peer`.
    pub fn shared_with(&self, peer: &IdentityKey, now: UnixSeconds) -> Vec<DocRef> {
        let Some(set) = self.by_peer.get(peer) else {
            return Vec::new();
        };
        let mut ids: Vec<&DocId> = set.iter().collect();
        ids.sort();
        let mut out = Vec::new();
        let mut reads: Option<bool> = None;
        for id in ids {
            let Some(slot) = self.docs.get(id) else {
                continue;
            };
            match slot.r {
                DocRef::Consent(_) => out.push(slot.r),
                DocRef::Relationship(h) if h.owner == *peer => out.push(slot.r),
                DocRef::Relationship(h) if h.owner == self.me && slot.facts.is_member(peer) => {
                    let ok = *reads.get_or_insert_with(|| {
                        may_read(self.ledger(self.me, *peer), peer, now).is_ok()
                    });
                    if ok {
                        out.push(slot.r);
                    }
                }
                DocRef::Relationship(_) => {}
            }
        }
        out
    }

    /// The relationships shared with `peer`, at most `n`, in no particular order.
    pub(crate) fn relationships_with(&self, peer: &IdentityKey, n: usize) -> Vec<DocId> {
        self.by_peer
            .get(peer)
            .into_iter()
            .flatten()
            .filter(|id| {
                self.docs
                    .get(*id)
                    .is_some_and(|s| matches!(s.r, DocRef::Relationship(_)))
            })
            .take(n)
            .copied()
            .collect()
    }

    /// Whether this node holds a document shared with `peer` (any consent document with it,
    /// a relationship it owns or is a member of).
    pub fn has_documents_with(&self, peer: &IdentityKey) -> bool {
        self.by_peer.get(peer).is_some_and(|set| !set.is_empty())
    }

    /// Every peer this node shares a document with.
    pub fn counterparts(&self) -> Vec<IdentityKey> {
        self.counterparts_after(None, usize::MAX)
    }

    /// At most `n` peers this node shares a document with, in order, after `after`: for a
    /// sweep over all of them in slices.
    pub fn counterparts_after(&self, after: Option<IdentityKey>, n: usize) -> Vec<IdentityKey> {
        use std::ops::Bound;
        let from = match after {
            Some(p) => Bound::Excluded(p),
            None => Bound::Unbounded,
        };
        self.by_peer
            .range((from, Bound::Unbounded))
            .filter(|(p, set)| {
                set.iter().any(|id| {
                    self.docs.get(id).is_some_and(|s| match s.r {
                        DocRef::Consent(_) => true,
                        DocRef::Relationship(h) if h.owner == self.me => s.facts.is_member(p),
                        DocRef::Relationship(h) => h.owner == **p,
                    })
                })
            })
            .map(|(p, _)| *p)
            .take(n)
            .collect()
    }

    // ----- storing and reacting -----

    /// Stores the changes `applied` (hashes, in order) of document `id` durably.
    pub(crate) fn persist(&mut self, doc: &DocRef, applied: &[ChangeHash]) -> Result<()> {
        if applied.is_empty() {
            return Ok(());
        }
        self.store_indexed(doc, None, applied)?;
        Ok(())
    }

    /// Reacts to new changes in a consent document: events, erasure on revocation,
    /// acceptance when configured, and the pushes that follow.
    pub(crate) fn after_consent(
        &mut self,
        h: ConsentHeader,
        now: UnixSeconds,
    ) -> Result<Vec<Push>> {
        let peer = if h.customer == self.me {
            h.grantee
        } else {
            h.customer
        };
        self.emit(Event::Consent {
            doc: h.doc_id(),
            customer: h.customer,
            grantee: h.grantee,
        });
        let mut pushes = Vec::new();
        if h.customer == self.me {
            // A grantee's acceptance may open relationships to it (and seal it the key of
            // a new epoch): offer them.
            pushes.extend(self.rotate_where_member(&peer, now)?);
            for d in self.shared_with(&peer, now) {
                if matches!(d, DocRef::Relationship(_)) {
                    pushes.push((peer, d));
                }
            }
            return Ok(pushes);
        }
        // We are the grantee.
        let mut wrote = false;
        if self.auto_accept {
            let pending: Vec<GrantView> = self
                .consent(&h.doc_id())
                .map(|c| c.ledger().grants(now))
                .unwrap_or_default()
                .into_iter()
                .filter(|g| g.status == GrantStatus::Pending)
                .collect();
            for g in pending {
                self.append_consent(
                    h,
                    now,
                    EntryBody::Accept {
                        grant: g.id,
                        terms: g.terms.clone(),
                    },
                )?;
                wrote = true;
            }
        }
        wrote |= self.erase_revoked(h, now)?;
        if wrote {
            pushes.push((peer, DocRef::Consent(h)));
        }
        Ok(pushes)
    }

    /// As a grantee: for every revoked grant not yet acknowledged, delete what the
    /// revocation covers and sign an `ErasureAck`. Returns whether anything was written.
    fn erase_revoked(&mut self, h: ConsentHeader, now: UnixSeconds) -> Result<bool> {
        let Some(doc) = self.consent(&h.doc_id()) else {
            return Ok(false);
        };
        let due = policy::erasure_due(doc.ledger(), &self.me, now);
        if due.unacked.is_empty() {
            return Ok(false);
        }
        let still_reads = !due.erase;
        let (mut docs, mut messages) = (0usize, 0usize);
        if !still_reads {
            let covered: Vec<(DocId, usize)> = self
                .rels_owned_by(&h.customer)
                .into_iter()
                .map(|id| {
                    let n = self.store.rel_summary(&id).ok().flatten();
                    (id, n.map_or(0, |s| s.message_count))
                })
                .collect();
            for (id, n) in covered {
                self.store.delete_document(&id)?;
                self.forget_hints(&id);
                self.drop_slot(&id);
                self.cursors.forget_doc(&id);
                self.keys.borrow_mut().remove(&id);
                docs += 1;
                messages += n;
            }
        }
        let erased = if still_reads {
            "nothing held solely under this grant: another active grant still covers the conversation".to_string()
        } else {
            format!(
                "deleted {docs} relationship document(s) with {messages} message(s) shared by {}",
                h.customer
            )
        };
        for (grant, revoke) in due.unacked {
            self.append_consent(
                h,
                now,
                EntryBody::ErasureAck {
                    revoke,
                    grant,
                    erased: erased.clone(),
                },
            )?;
        }
        self.emit(Event::Erased {
            customer: h.customer,
            documents: docs,
            messages,
        });
        Ok(true)
    }

    /// Appends one consent entry and stores it durably.
    fn append_consent(
        &mut self,
        h: ConsentHeader,
        now: UnixSeconds,
        body: EntryBody,
    ) -> Result<EntryId> {
        let id = h.doc_id();
        if !self.docs.contains_key(&id) {
            self.insert_doc(Doc::Consent(ConsentDoc::new(h)?));
        }
        let (key, nonce) = (self.key.clone(), self.nonce);
        let Some(Doc::Consent(doc)) = self.doc_mut(&id) else {
            return Err(EngineError::NotFound(format!(
                "consent document {id} could not be loaded"
            )));
        };
        let result = doc.append(&key, nonce, now, body);
        let (entry, change) = match result {
            Ok(x) => x,
            Err(e) => {
                if doc.ledger().changes().is_empty() {
                    self.drop_slot(&id);
                }
                return Err(e.into());
            }
        };
        let hash = change.hash();
        if let Err(e) = self.put_indexed(&DocRef::Consent(h), &[change], &[hash]) {
            // Not durable: forget it in memory too, so memory matches the store.
            self.reload(&DocRef::Consent(h))?;
            return Err(e);
        }
        Ok(entry)
    }

    /// Replaces the in-memory document with what the store holds.
    fn reload(&mut self, d: &DocRef) -> Result<()> {
        let id = d.doc_id();
        self.drop_slot(&id);
        if self.store.doc_ref(&id)?.is_none() {
            return Ok(());
        }
        let doc = self.load_doc(d)?;
        self.insert_doc(doc);
        Ok(())
    }

    // ----- local writes: consent -----

    /// Grants scopes to a grantee (as the customer). Returns the grant id.
    pub fn grant(&mut self, a: GrantArgs, now: UnixSeconds) -> Result<(WriteOutcome, Vec<Push>)> {
        if a.grantee == self.me {
            return Err(EngineError::Invalid(
                "you cannot grant consent to yourself".into(),
            ));
        }
        let h = ConsentHeader {
            customer: self.me,
            grantee: a.grantee,
        };
        let terms = match &a.terms {
            Some(t) => terms_named(t)?.reference(),
            None => self
                .consent(&h.doc_id())
                .and_then(|c| c.ledger().proffered_terms().cloned())
                .unwrap_or_else(|| Terms::by_id("SD-BASE").expect("in roster").reference()),
        };
        let notice_sha256 = match a.notice_sha256 {
            Some(h) => h.trim().to_ascii_lowercase(),
            // Without a company notice, what the customer saw is the grant's own statement;
            // record the hash of exactly that text.
            None => hex::encode(Sha256::digest(
                format!(
                    "You grant {} the scopes {} for the purpose {:?} on terms {} v{}.",
                    a.grantee,
                    a.scopes
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", "),
                    a.purpose,
                    terms.id,
                    terms.version
                )
                .as_bytes(),
            )),
        };
        let id = self.append_consent(
            h,
            now,
            EntryBody::Grant {
                scopes: a.scopes,
                purpose: a.purpose,
                legal_basis: a.legal_basis.unwrap_or(LegalBasis::Consent),
                notice_sha256,
                terms,
                expires: a.expires,
            },
        )?;
        Ok((
            WriteOutcome::entry(id, h.doc_id(), a.grantee),
            vec![(a.grantee, DocRef::Consent(h))],
        ))
    }

    fn grant_header(&self, prefix: &str) -> Result<(ConsentHeader, EntryId)> {
        let (doc, gid) = self.find_grant(prefix)?;
        Ok((*self.consent_held(&doc)?.ledger().header(), gid))
    }

    /// Narrows a grant (as the customer): to the scopes given (`None`: those it has now)
    /// and the end given (`None`: the one it has now). The latest amendment replaces the
    /// ones before, so what is not given is carried over from the grant as it stands.
    pub fn amend(
        &mut self,
        grant: &str,
        scopes: Option<Vec<Scope>>,
        expires: Option<UnixSeconds>,
        now: UnixSeconds,
    ) -> Result<(WriteOutcome, Vec<Push>)> {
        let (h, gid) = self.grant_header(grant)?;
        if scopes.is_none() && expires.is_none() {
            return Err(EngineError::Invalid(
                "nothing to amend: give the scopes that remain, a new end, or both".into(),
            ));
        }
        let current = self
            .consent_held(&h.doc_id())?
            .ledger()
            .grants(now)
            .into_iter()
            .find(|g| g.id == gid)
            .ok_or_else(|| EngineError::NotFound(format!("no grant {} now", gid.short())))?;
        let scopes = scopes.unwrap_or(current.scopes);
        let expires = expires.or(current.expires);
        let id = self.append_consent(
            h,
            now,
            EntryBody::Amend {
                grant: gid,
                scopes,
                expires,
            },
        )?;
        let mut out = WriteOutcome::entry(id, h.doc_id(), h.grantee);
        out.grant = Some(gid);
        Ok((out, vec![(h.grantee, DocRef::Consent(h))]))
    }

    /// Revokes a grant (as the customer). From now on the grantee is served and accepted
    /// only what its remaining grants allow; the revocation travels in the consent document.
    pub fn revoke(
        &mut self,
        grant: &str,
        reason: Option<String>,
        now: UnixSeconds,
    ) -> Result<(WriteOutcome, Vec<Push>)> {
        let (h, gid) = self.grant_header(grant)?;
        if h.customer != self.me {
            return Err(EngineError::Refused(format!(
                "grant {} was given to you; only {} can revoke it",
                gid.short(),
                h.customer
            )));
        }
        let id = self.append_consent(h, now, EntryBody::Revoke { grant: gid, reason })?;
        let mut out = WriteOutcome::entry(id, h.doc_id(), h.grantee);
        out.grant = Some(gid);
        let mut pushes = vec![(h.grantee, DocRef::Consent(h))];
        // A new epoch at once in every relationship the grantee was a member of, so it can
        // decrypt nothing written from now on, wherever that travels.
        pushes.extend(self.rotate_where_member(&h.grantee, now)?);
        Ok((out, pushes))
    }

    /// Proffers standing terms to a grantee (as the customer).
    pub fn proffer(
        &mut self,
        grantee: IdentityKey,
        terms: &str,
        now: UnixSeconds,
    ) -> Result<(WriteOutcome, Vec<Push>)> {
        if grantee == self.me {
            return Err(EngineError::Invalid(
                "you cannot proffer terms to yourself".into(),
            ));
        }
        let h = ConsentHeader {
            customer: self.me,
            grantee,
        };
        let terms = terms_named(terms)?.reference();
        let id = self.append_consent(h, now, EntryBody::TermsProffer { terms })?;
        Ok((
            WriteOutcome::entry(id, h.doc_id(), grantee),
            vec![(grantee, DocRef::Consent(h))],
        ))
    }

    /// Accepts pending grants made to this node, on the customer's terms: the one whose id
    /// starts with `grant`, or every pending one (optionally only from `customer`).
    pub fn accept(
        &mut self,
        grant: Option<&str>,
        customer: Option<IdentityKey>,
        now: UnixSeconds,
    ) -> Result<(Vec<GrantRow>, Vec<Push>)> {
        let mut todo: Vec<(ConsentHeader, GrantView)> = Vec::new();
        let me = self.me;
        let ids = self.ids_where(|r| {
            matches!(r, DocRef::Consent(h)
                if h.grantee == me && customer.is_none_or(|x| x == h.customer))
        });
        for id in ids {
            self.peek(&id, |d| {
                let Doc::Consent(c) = d else { return };
                let h = *c.ledger().header();
                for g in c.ledger().grants(now) {
                    let wanted =
                        grant.is_none_or(|p| g.id.to_hex().starts_with(&p.to_ascii_lowercase()));
                    if g.status == GrantStatus::Pending && wanted {
                        todo.push((h, g));
                    }
                }
            });
        }
        if todo.is_empty() {
            return Err(EngineError::NotFound(match grant {
                Some(p) => format!("no pending grant {p} to you (see `rapport consent list`)"),
                None => "no pending grant to accept".into(),
            }));
        }
        let mut rows = Vec::new();
        let mut pushes = Vec::new();
        for (h, g) in todo {
            self.append_consent(
                h,
                now,
                EntryBody::Accept {
                    grant: g.id,
                    terms: g.terms.clone(),
                },
            )?;
            rows.push(GrantRow::new("held", h.customer, &g));
            if !pushes.contains(&(h.customer, DocRef::Consent(h))) {
                pushes.push((h.customer, DocRef::Consent(h)));
            }
        }
        Ok((rows, pushes))
    }

    /// Acknowledges erasure for a revoked grant (as the grantee), by hand.
    pub fn ack_erasure(
        &mut self,
        grant: &str,
        erased: String,
        now: UnixSeconds,
    ) -> Result<(WriteOutcome, Vec<Push>)> {
        let (h, gid) = self.grant_header(grant)?;
        let view = self
            .consent_held(&h.doc_id())?
            .ledger()
            .grant(&gid, UnixSeconds::MAX)
            .ok_or_else(|| EngineError::NotFound(format!("no grant {gid} in its ledger")))?;
        let Some((rid, _)) = view.revoked else {
            return Err(EngineError::Refused(format!(
                "grant {} is not revoked: there is nothing to erase",
                gid.short()
            )));
        };
        let id = self.append_consent(
            h,
            now,
            EntryBody::ErasureAck {
                revoke: rid,
                grant: gid,
                erased,
            },
        )?;
        let mut out = WriteOutcome::entry(id, h.doc_id(), h.customer);
        out.grant = Some(gid);
        Ok((out, vec![(h.customer, DocRef::Consent(h))]))
    }

    /// Verifies a ledger file addressed to this node and merges it into the store. Nothing
    /// is stored unless the whole file verifies.
    pub fn import_ledger(&mut self, bytes: &[u8], now: UnixSeconds) -> Result<(usize, Vec<Push>)> {
        let (header, changes) = read_ledger_file(bytes)
            .map_err(|e| EngineError::Refused(format!("the file was refused: {e}")))?;
        // The whole file is verified on its own first, so a file with any bad change is
        // refused even where the bad change has the hash of one we already hold (a swapped
        // signature), which merging alone would skip as a duplicate.
        Ledger::verify(header, changes.clone())
            .map_err(|e| EngineError::Refused(format!("the file was refused: {e}")))?;
        if header.customer != self.me && header.grantee != self.me {
            return Err(EngineError::Refused(format!(
                "the file is a consent document between {} and {}, not with you ({})",
                header.customer, header.grantee, self.me
            )));
        }
        let id = header.doc_id();
        let mut doc = match self.consent(&id) {
            Some(c) => c.clone(),
            None => ConsentDoc::new(header)?,
        };
        let report = doc.apply(changes);
        if let Some((_, e)) = report.rejected.into_iter().next() {
            return Err(EngineError::Refused(format!("the file was refused: {e}")));
        }
        let applied = report.applied.len();
        let all = doc.ledger().changes().to_vec();
        let d = DocRef::Consent(header);
        self.insert_doc(Doc::Consent(doc));
        if let Err(e) = self.put_indexed(&d, &all, &report.applied) {
            self.reload(&d)?;
            return Err(e);
        }
        let pushes = if applied > 0 {
            self.after_consent(header, now)?
        } else {
            Vec::new()
        };
        Ok((applied, pushes))
    }

    // ----- local writes: relationships -----

    /// Opens a relationship with `peer` (as its owner). Returns its id.
    pub fn open_relationship(
        &mut self,
        peer: IdentityKey,
        name: Option<String>,
        title: Option<String>,
        now: UnixSeconds,
    ) -> Result<(WriteOutcome, Vec<Push>)> {
        if peer == self.me {
            return Err(EngineError::Invalid(
                "a relationship is with someone else: give their identity".into(),
            ));
        }
        let header = RelHeader {
            owner: self.me,
            nonce: self.random()?,
        };
        let mut doc = RelationshipDoc::new(header);
        // Unnamed, a contact is named as the user named it, anyone else by its id's end.
        let name = name
            .or_else(|| self.petname(&peer).map(str::to_owned))
            .unwrap_or_else(|| peer.short());
        let title = title.unwrap_or_else(|| format!("{} and {name}", self.profile.name));
        let mut changes = Vec::new();
        for body in [
            RelBody::Title { title },
            RelBody::Profile {
                field: "name".into(),
                value: self.profile.name.clone(),
            },
            RelBody::Member { member: peer, name },
        ] {
            changes.push(doc.append(&self.key, self.nonce, now, body)?.1);
        }
        let d = DocRef::Relationship(header);
        let id = doc.id();
        let hashes: Vec<ChangeHash> = changes.iter().map(SignedChange::hash).collect();
        self.insert_doc(Doc::Rel(doc));
        if let Err(e) = self.put_indexed(&d, &changes, &hashes) {
            self.reload(&d)?;
            return Err(e);
        }
        self.ensure_epoch(&id, now)?;
        let mut out = WriteOutcome::doc(id, peer);
        out.note = match may_read(self.ledger(self.me, peer), &peer, now) {
            Ok(()) => None,
            Err(e) => Some(format!(
                "{e}: it will see this relationship once you grant conversation:read and it accepts"
            )),
        };
        Ok((out, vec![(peer, d)]))
    }

    /// Adds a member to a relationship this node owns.
    pub fn add_member(
        &mut self,
        rel: &str,
        peer: IdentityKey,
        name: Option<String>,
        now: UnixSeconds,
    ) -> Result<(WriteOutcome, Vec<Push>)> {
        let id = self.find_rel(rel)?;
        let name = name
            .or_else(|| self.petname(&peer).map(str::to_owned))
            .unwrap_or_else(|| peer.short());
        let (entry, mut pushes) =
            self.write_rel(id, RelBody::Member { member: peer, name }, now)?;
        pushes.extend(self.ensure_epoch(&id, now)?);
        Ok((WriteOutcome::entry(entry, id, peer), pushes))
    }

    /// Removes a member from a relationship this node owns, and starts a new epoch at once
    /// so the member can decrypt nothing written from now on.
    pub fn remove_member(
        &mut self,
        rel: &str,
        peer: IdentityKey,
        now: UnixSeconds,
    ) -> Result<(WriteOutcome, Vec<Push>)> {
        let id = self.find_rel(rel)?;
        let (entry, mut pushes) = self.write_rel(id, RelBody::Remove { member: peer }, now)?;
        pushes.extend(self.ensure_epoch(&id, now)?);
        Ok((WriteOutcome::entry(entry, id, peer), pushes))
    }

    /// As an owner: a new epoch in each relationship `member` belongs to whose readers
    /// changed.
    fn rotate_where_member(&mut self, member: &IdentityKey, now: UnixSeconds) -> Result<Vec<Push>> {
        let ids: Vec<DocId> = self
            .by_peer
            .get(member)
            .map(|set| {
                let mut v: Vec<DocId> = set
                    .iter()
                    .filter(|id| {
                        self.docs.get(id).is_some_and(|s| {
                            matches!(s.r, DocRef::Relationship(h) if h.owner == self.me)
                                && s.facts.ever_member(member)
                        })
                    })
                    .copied()
                    .collect();
                v.sort();
                v
            })
            .unwrap_or_default();
        let mut pushes = Vec::new();
        for id in ids {
            pushes.extend(self.ensure_epoch(&id, now)?);
        }
        Ok(pushes)
    }

    /// Discloses a profile field in a relationship this node owns.
    pub fn set_profile(
        &mut self,
        rel: &str,
        field: String,
        value: String,
        now: UnixSeconds,
    ) -> Result<(WriteOutcome, Vec<Push>)> {
        let id = self.find_rel(rel)?;
        let owner = self.rel_held(&id)?.header().owner;
        let (entry, pushes) = self.write_rel(id, RelBody::Profile { field, value }, now)?;
        Ok((WriteOutcome::entry(entry, id, owner), pushes))
    }

    /// Sends a message. A member's message needs a purpose it holds `contact:<purpose>` for;
    /// without one given, the single contact purpose its grants allow is used.
    pub fn send_message(
        &mut self,
        rel: &str,
        text: String,
        purpose: Option<String>,
        thread: Option<EntryId>,
        now: UnixSeconds,
    ) -> Result<(WriteOutcome, Vec<Push>)> {
        let id = self.find_rel(rel)?;
        let owner = self.rel_held(&id)?.header().owner;
        let purpose =
            policy::message_purpose(&self.me, &owner, self.ledger(owner, self.me), purpose, now)
                .map_err(|e| match e {
                    policy::PurposeError::NotOptedIn { .. } => EngineError::Refused(e.to_string()),
                    policy::PurposeError::Ambiguous(_) => EngineError::Invalid(e.to_string()),
                })?;
        let (entry, pushes) = self.write_rel(
            id,
            RelBody::Message {
                thread,
                text,
                purpose,
            },
            now,
        )?;
        let mut out = WriteOutcome::entry(entry, id, owner);
        out.rel = Some(id);
        if let Some(m) = self.message_view(self.rel(&id).expect("held"), entry) {
            self.emit(Event::Message(m));
        }
        Ok((out, pushes))
    }

    /// Starts a thread.
    pub fn new_thread(
        &mut self,
        rel: &str,
        title: String,
        now: UnixSeconds,
    ) -> Result<(WriteOutcome, Vec<Push>)> {
        let id = self.find_rel(rel)?;
        let owner = self.rel_held(&id)?.header().owner;
        let (entry, pushes) = self.write_rel(id, RelBody::Thread { title }, now)?;
        Ok((WriteOutcome::entry(entry, id, owner), pushes))
    }

    /// Appends one entry to a relationship and stores it; returns whom to push it to.
    pub(crate) fn write_rel(
        &mut self,
        id: DocId,
        body: RelBody,
        now: UnixSeconds,
    ) -> Result<(EntryId, Vec<Push>)> {
        let owner = match self.doc(&id) {
            Some(Doc::Rel(doc)) => doc.header().owner,
            _ => return Err(EngineError::NotFound(format!("no relationship {id}"))),
        };
        // Changes of ours the owner refused stay ours, but the next one must not depend on
        // them, or the owner could take nothing more from us.
        let refused = if owner == self.me {
            HashSet::new()
        } else {
            self.store.peer_refused(&id, &owner)?
        };
        let fresh = if refused.is_empty() {
            self.nonce
        } else {
            self.random()?
        };
        let key = self.key.clone();
        let Some(Doc::Rel(doc)) = self.doc_mut(&id) else {
            return Err(EngineError::NotFound(format!("no relationship {id}")));
        };
        let (entry, change) = doc.append_excluding(&refused, &key, fresh, now, body)?;
        let header = *doc.header();
        let d = DocRef::Relationship(header);
        let hash = change.hash();
        if let Err(e) = self.put_indexed(&d, &[change], &[hash]) {
            self.reload(&d)?;
            return Err(e);
        }
        Ok((entry, self.rel_pushes(&header, None, now)))
    }

    /// Whom a relationship's new changes go to ([`policy::rel_pushes`]).
    pub(crate) fn rel_pushes(
        &self,
        h: &RelHeader,
        skip: Option<IdentityKey>,
        now: UnixSeconds,
    ) -> Vec<Push> {
        policy::rel_pushes(self, h, skip, now)
    }
}

fn terms_named(id: &str) -> Result<&'static Terms> {
    Terms::by_id(id.trim()).ok_or_else(|| {
        let names: Vec<&str> = rapport_protocol::ROSTER.iter().map(|t| t.id).collect();
        EngineError::Invalid(format!(
            "unknown terms {id:?}: the roster has {}",
            names.join(", ")
        ))
    })
}

/// The error for a document the index lists that cannot be loaded.
fn unloadable(id: &DocId) -> EngineError {
    EngineError::Store(crate::error::StoreError::BadDocument {
        doc: id.to_hex(),
        detail: "it is listed but cannot be loaded; `rapport store verify` says why".into(),
    })
}
