//! The engine: a node's documents and every rule that decides what it stores, serves and
//! accepts. It does no networking. Its operations take the time as an argument; the node's
//! one clock and random source reach it as [`crate::clock::Sources`]. One thread owns it
//! (the actor in `actor.rs`); the network loop and the local API send it operations and
//! carry out the pushes it asks for.

use std::collections::{BTreeMap, HashMap, HashSet};

use rapport_protocol::access::may_read;
use rapport_protocol::automerge::ChangeHash;
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
use crate::store::{Profile, Refusal, Store};
use crate::views::{
    Event, GrantRow, MemberRow, MessageView, RelDetail, RelSummary, ThreadView, WriteOutcome,
};

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

/// A document to sync with a peer, asked for by the engine after a change.
pub type Push = (IdentityKey, DocRef);

/// How many changes a peer may have refused within [`STRIKE_WINDOW`] before it is
/// disconnected.
pub const MAX_STRIKES: u32 = 64;
/// The window over which strikes count, in seconds.
pub const STRIKE_WINDOW: u64 = 600;
/// How long a peer past [`MAX_STRIKES`] stays banned, in seconds.
pub const BAN_SECONDS: u64 = 300;
/// The most changes a consent document may hold from a customer before this node has
/// answered (accepted, acknowledged) any of its grants: what a stranger can make it store.
pub const MAX_UNANSWERED_CHANGES: usize = 32;
/// The most consent documents with grants this node has not answered: with
/// [`MAX_UNANSWERED_CHANGES`] and the entry limit, what all strangers together can make it
/// store (about 1,000 x 32 x 8 KiB at most).
pub const MAX_UNANSWERED_DOCS: usize = 1_000;
/// The most changes of one sender that wait for their dependencies in one document.
pub(crate) const MAX_WAITING_PER_DOC: usize = 1024;
/// The most bytes of changes waiting for their dependencies, over all documents.
pub(crate) const MAX_WAITING_BYTES: usize = 16 << 20;
/// The most relationships one owner may place on this node.
pub const MAX_RELS_PER_OWNER: usize = 100_000;

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

/// What one sync round did, for the network loop.
#[derive(Debug, Default)]
pub struct RoundOutcome {
    /// Changes newly stored from the peer.
    pub received: usize,
    /// Whether another round is wanted (more to fetch or to send).
    pub again: bool,
    /// Whether the peer's reported heads changed since the last round.
    pub peer_moved: bool,
    /// The peer refused our request or changes of ours, with its reasons.
    pub refused: Vec<crate::net::PeerRefusal>,
    /// The peer misbehaved past the limit: disconnect it.
    pub disconnect: bool,
}

impl RoundOutcome {
    /// What the session machine needs of this round.
    pub fn into_round(self) -> rapport_protocol::session::Round<crate::net::PeerRefusal> {
        rapport_protocol::session::Round {
            received: self.received,
            again: self.again,
            peer_moved: self.peer_moved,
            refused: self.refused,
            disconnect: self.disconnect,
        }
    }
}

pub(crate) enum Doc {
    Consent(ConsentDoc),
    Rel(RelationshipDoc),
}

/// The node's documents and rules.
pub struct Engine {
    store: Store,
    pub(crate) key: SecretKey,
    me: IdentityKey,
    profile: Profile,
    nonce: [u8; 16],
    pub(crate) docs: HashMap<DocId, Doc>,
    events: broadcast::Sender<Event>,
    auto_accept: bool,
    /// See [`MAX_UNANSWERED_DOCS`].
    pub(crate) max_unanswered_docs: usize,
    /// Content keys held, by relationship and epoch (see [`rapport_protocol::seal`]).
    pub(crate) keys: HashMap<DocId, BTreeMap<u32, ContentKey>>,
    /// Heads of what was deposited in a peer's mailbox, per document and peer, so a
    /// failed dial every few seconds does not deposit the same changes again.
    pub(crate) deposited: HashMap<(DocId, IdentityKey), Vec<ChangeHash>>,
    /// Changes that arrived before what they depend on, per document and sender.
    pub(crate) waiting: HashMap<(DocId, IdentityKey), Vec<SignedChange>>,
    /// The encoded size of everything in `waiting`.
    pub(crate) waiting_bytes: usize,
    /// Events of a group of operations, held until the group is durable
    /// (see [`Engine::begin_group`]); `None` outside a group.
    held_events: std::cell::RefCell<Option<Vec<Event>>>,
    /// The node's clock and random source.
    sources: crate::clock::Sources,
    /// Memory may hold writes that are not durable (a group's sync failed and the reload
    /// after it failed too): nothing may run until [`Engine::refresh`] succeeds.
    stale: bool,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("me", &self.me)
            .field("docs", &self.docs.len())
            .finish()
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
        let (docs, keys) = load(&store)?;
        let (events, _) = broadcast::channel(1024);
        let mut engine = Self {
            me: profile.identity,
            store,
            key,
            profile,
            nonce: os_random()?,
            docs,
            events,
            auto_accept: false,
            max_unanswered_docs: MAX_UNANSWERED_DOCS,
            keys,
            deposited: HashMap::new(),
            waiting: HashMap::new(),
            waiting_bytes: 0,
            held_events: std::cell::RefCell::new(None),
            sources: crate::clock::Sources::system(),
            stale: false,
        };
        engine.learn_all_keys()?;
        Ok(engine)
    }

    /// Keys sealed to this node that it does not hold yet (a crash between storing a
    /// change and its key) are recovered from the documents.
    fn learn_all_keys(&mut self) -> Result<()> {
        let rels: Vec<DocId> = self.rels().map(RelationshipDoc::id).collect();
        for id in rels {
            self.learn_keys(&id)?;
        }
        Ok(())
    }

    /// Begins a group of operations that become durable together, with one sync of the
    /// store ([`Store::begin_group`]); events wait for the group's end. Whoever groups
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
        let (docs, keys) = load(&self.store)?;
        self.docs = docs;
        self.keys = keys;
        self.deposited.clear();
        self.waiting.clear();
        self.waiting_bytes = 0;
        self.learn_all_keys()
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
        match self.docs.get(id) {
            Some(Doc::Consent(c)) => Some(c),
            _ => None,
        }
    }

    pub(crate) fn rel(&self, id: &DocId) -> Option<&RelationshipDoc> {
        match self.docs.get(id) {
            Some(Doc::Rel(r)) => Some(r),
            _ => None,
        }
    }

    /// The consent ledger in which `customer` grants to `grantee`, if held.
    pub(crate) fn ledger(&self, customer: IdentityKey, grantee: IdentityKey) -> Option<&Ledger> {
        self.consent(&ConsentHeader { customer, grantee }.doc_id())
            .map(ConsentDoc::ledger)
    }

    fn consents(&self) -> impl Iterator<Item = &ConsentDoc> {
        self.docs.values().filter_map(|d| match d {
            Doc::Consent(c) => Some(c),
            Doc::Rel(_) => None,
        })
    }

    pub(crate) fn rels(&self) -> impl Iterator<Item = &RelationshipDoc> {
        self.docs.values().filter_map(|d| match d {
            Doc::Rel(r) => Some(r),
            Doc::Consent(_) => None,
        })
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
            .rels()
            .map(RelationshipDoc::id)
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
        for c in self.consents() {
            for g in c.ledger().grants(UnixSeconds::MAX) {
                if g.id.to_hex().starts_with(&p) {
                    found.push((c.ledger().id(), g.id));
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

    fn name_of(&self, rel: &RelationshipDoc, who: &IdentityKey) -> String {
        if *who == self.me {
            return self.profile.name.clone();
        }
        if *who == rel.header().owner {
            return rel
                .profile_field("name")
                .map_or_else(|| who.short(), str::to_owned);
        }
        rel.members()
            .find(|m| m.identity == *who)
            .map(|m| m.name.clone())
            .unwrap_or_else(|| who.short())
    }

    pub(crate) fn message_view(&self, rel: &RelationshipDoc, id: EntryId) -> Option<MessageView> {
        let e = rel.entries().get(&id)?;
        let RelBody::Message {
            thread,
            text,
            purpose,
        } = &e.body
        else {
            return None;
        };
        Some(MessageView {
            rel: rel.id(),
            id,
            by: e.by,
            by_name: self.name_of(rel, &e.by),
            at: e.at,
            text: text.clone(),
            purpose: purpose.clone(),
            thread: *thread,
            mine: e.by == self.me,
        })
    }

    // ----- queries -----

    /// How many changes a document holds, if held (cheap: for progress checks).
    pub fn change_count(&self, id: &DocId) -> Option<usize> {
        match self.docs.get(id)? {
            Doc::Consent(c) => Some(c.ledger().changes().len()),
            Doc::Rel(r) => Some(r.changes().len()),
        }
    }

    /// A relationship's heads (sorted hex), by id or prefix: for tests and diagnostics.
    pub fn heads(&self, rel: &str) -> Result<Vec<String>> {
        let id = self.find_rel(rel)?;
        let mut h: Vec<String> = self
            .rel(&id)
            .expect("found")
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

    /// Every grant this node gave or holds, at `now`.
    pub fn grants(&self, now: UnixSeconds) -> Vec<GrantRow> {
        let mut rows = Vec::new();
        let mut docs: Vec<&ConsentDoc> = self.consents().collect();
        docs.sort_by_key(|d| d.ledger().id());
        for doc in docs {
            let h = *doc.ledger().header();
            let (role, peer) = if h.customer == self.me {
                ("granted", h.grantee)
            } else {
                ("held", h.customer)
            };
            for g in doc.ledger().grants(now) {
                rows.push(GrantRow::new(role, peer, &g));
            }
        }
        rows
    }

    /// Every consent ledger held, as ledger files (`rapport-ledger/1` JSON).
    pub fn ledger_files(&self) -> Vec<String> {
        let mut docs: Vec<&ConsentDoc> = self.consents().collect();
        docs.sort_by_key(|d| d.ledger().id());
        docs.into_iter()
            .map(|d| write_ledger_file(d.ledger()))
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

    /// Every relationship, newest activity first.
    pub fn relationships(&self) -> Vec<RelSummary> {
        let mut out: Vec<RelSummary> = self.rels().map(|r| self.summary(r)).collect();
        out.sort_by_key(|s| std::cmp::Reverse(s.last_at));
        out
    }

    fn summary(&self, r: &RelationshipDoc) -> RelSummary {
        let msgs = r.messages();
        let last = msgs.last().and_then(|(id, _)| self.message_view(r, *id));
        RelSummary {
            id: r.id(),
            owner: r.header().owner,
            owner_name: self.name_of(r, &r.header().owner),
            mine: r.header().owner == self.me,
            title: r.title().map(str::to_owned),
            members: r
                .members()
                .map(|m| MemberRow {
                    identity: m.identity,
                    name: m.name.clone(),
                    removed: m.removed_at.is_some(),
                })
                .collect(),
            message_count: msgs.len(),
            last_at: last.as_ref().map_or(0, |m| m.at),
            last,
        }
    }

    /// One relationship in full.
    pub fn relationship(&self, prefix: &str, now: UnixSeconds) -> Result<RelDetail> {
        let id = self.find_rel(prefix)?;
        let r = self.rel(&id).expect("found");
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

    /// Messages from others across every relationship, newest first, at most `limit`.
    pub fn inbox(&self, limit: usize) -> Vec<MessageView> {
        let mut all: Vec<MessageView> = self
            .rels()
            .flat_map(|r| {
                r.messages()
                    .into_iter()
                    .filter(|(_, e)| e.by != self.me)
                    .filter_map(|(id, _)| self.message_view(r, id))
                    .collect::<Vec<_>>()
            })
            .collect();
        all.sort_by_key(|m| std::cmp::Reverse((m.at, m.id)));
        all.truncate(limit);
        all
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
    pub fn shared_with(&self, peer: &IdentityKey, now: UnixSeconds) -> Vec<DocRef> {
        let mut out = Vec::new();
        for d in self.docs.values() {
            match d {
                Doc::Consent(c) => {
                    let h = *c.ledger().header();
                    if (h.customer == self.me && h.grantee == *peer)
                        || (h.grantee == self.me && h.customer == *peer)
                    {
                        out.push(DocRef::Consent(h));
                    }
                }
                Doc::Rel(r) => {
                    let h = *r.header();
                    if h.owner == *peer || (h.owner == self.me && self.serves(r, peer, now).is_ok())
                    {
                        out.push(DocRef::Relationship(h));
                    }
                }
            }
        }
        out
    }

    /// Every peer this node shares a document with.
    pub fn counterparts(&self) -> Vec<IdentityKey> {
        let mut set = HashSet::new();
        for d in self.docs.values() {
            match d {
                Doc::Consent(c) => {
                    let h = c.ledger().header();
                    set.insert(if h.customer == self.me {
                        h.grantee
                    } else {
                        h.customer
                    });
                }
                Doc::Rel(r) => {
                    if r.header().owner == self.me {
                        set.extend(
                            r.members()
                                .filter(|m| m.removed_at.is_none())
                                .map(|m| m.identity),
                        );
                    } else {
                        set.insert(r.header().owner);
                    }
                }
            }
        }
        set.remove(&self.me);
        let mut v: Vec<_> = set.into_iter().collect();
        v.sort();
        v
    }

    /// Whether this node (the owner) serves relationship `r` to `peer` now.
    pub(crate) fn serves(
        &self,
        r: &RelationshipDoc,
        peer: &IdentityKey,
        now: UnixSeconds,
    ) -> std::result::Result<(), String> {
        if !r.is_member(peer) {
            return Err(format!("{peer} is not a member of relationship {}", r.id()));
        }
        may_read(self.ledger(self.me, *peer), peer, now).map_err(|e| e.to_string())
    }

    // ----- storing and reacting -----

    /// Stores the changes `applied` (hashes, in order) of document `id` durably.
    pub(crate) fn persist(&self, doc: &DocRef, applied: &[ChangeHash]) -> Result<()> {
        if applied.is_empty() {
            return Ok(());
        }
        let id = doc.doc_id();
        let changes: Vec<SignedChange> = match self.docs.get(&id) {
            Some(Doc::Consent(c)) => {
                let set: HashSet<&ChangeHash> = applied.iter().collect();
                c.ledger()
                    .changes()
                    .iter()
                    .filter(|ch| set.contains(&ch.hash()))
                    .cloned()
                    .collect()
            }
            Some(Doc::Rel(r)) => {
                let set: HashSet<&ChangeHash> = applied.iter().collect();
                // Applied changes sit at the end of the document's change list.
                let all = r.changes();
                let start = all.len().saturating_sub(applied.len());
                let tail: Vec<SignedChange> = all[start..]
                    .iter()
                    .filter(|ch| set.contains(&ch.hash()))
                    .cloned()
                    .collect();
                if tail.len() == applied.len() {
                    tail
                } else {
                    all.iter()
                        .filter(|ch| set.contains(&ch.hash()))
                        .cloned()
                        .collect()
                }
            }
            None => Vec::new(),
        };
        self.store.put_changes(doc, &changes)?;
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
        let unacked: Vec<(EntryId, EntryId)> = doc
            .ledger()
            .grants(UnixSeconds::MAX)
            .into_iter()
            .filter_map(|g| match (g.revoked, g.erasure_acked) {
                (Some((rid, at)), None) if at <= now => Some((g.id, rid)),
                _ => None,
            })
            .collect();
        if unacked.is_empty() {
            return Ok(false);
        }
        // The relationship data a revocation covers is everything the customer shared
        // under conversation:read; if another active grant still gives it, nothing goes.
        let still_reads = may_read(Some(doc.ledger()), &self.me, now).is_ok();
        let (mut docs, mut messages) = (0usize, 0usize);
        if !still_reads {
            let covered: Vec<(DocId, usize)> = self
                .rels()
                .filter(|r| r.header().owner == h.customer)
                .map(|r| (r.id(), r.messages().len()))
                .collect();
            for (id, n) in covered {
                self.store.delete_document(&id)?;
                self.docs.remove(&id);
                self.keys.remove(&id);
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
        for (grant, revoke) in unacked {
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
        let doc = match self.docs.entry(id).or_insert_with(|| {
            Doc::Consent(ConsentDoc::new(h).expect("parties differ: checked by callers"))
        }) {
            Doc::Consent(c) => c,
            Doc::Rel(_) => unreachable!("a consent id names a consent document"),
        };
        let result = doc.append(&self.key, self.nonce, now, body);
        let (entry, change) = match result {
            Ok(x) => x,
            Err(e) => {
                if doc.ledger().changes().is_empty() {
                    self.docs.remove(&id);
                }
                return Err(e.into());
            }
        };
        if let Err(e) = self.store.put_changes(&DocRef::Consent(h), &[change]) {
            // Not durable: forget it in memory too, so memory matches the store.
            self.reload(&DocRef::Consent(h))?;
            return Err(e.into());
        }
        Ok(entry)
    }

    /// Replaces the in-memory document with what the store holds.
    fn reload(&mut self, d: &DocRef) -> Result<()> {
        let id = d.doc_id();
        if self.store.doc_ref(&id)?.is_none() {
            self.docs.remove(&id);
            return Ok(());
        }
        let doc = match d {
            DocRef::Consent(_) => Doc::Consent(self.store.load_consent(&id)?),
            DocRef::Relationship(_) => Doc::Rel(self.store.load_relationship(&id)?),
        };
        self.docs.insert(id, doc);
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
        Ok((*self.consent(&doc).expect("found").ledger().header(), gid))
    }

    /// Narrows a grant (as the customer).
    pub fn amend(
        &mut self,
        grant: &str,
        scopes: Vec<Scope>,
        expires: Option<UnixSeconds>,
        now: UnixSeconds,
    ) -> Result<(WriteOutcome, Vec<Push>)> {
        let (h, gid) = self.grant_header(grant)?;
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
        for c in self.consents() {
            let h = *c.ledger().header();
            if h.grantee != self.me || customer.is_some_and(|x| x != h.customer) {
                continue;
            }
            for g in c.ledger().grants(now) {
                let wanted =
                    grant.is_none_or(|p| g.id.to_hex().starts_with(&p.to_ascii_lowercase()));
                if g.status == GrantStatus::Pending && wanted {
                    todo.push((h, g));
                }
            }
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
            .consent(&h.doc_id())
            .and_then(|c| c.ledger().grant(&gid, UnixSeconds::MAX))
            .expect("found");
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
        self.store
            .put_changes(&DocRef::Consent(header), doc.ledger().changes())?;
        self.docs.insert(id, Doc::Consent(doc));
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
        let title = title.unwrap_or_else(|| format!("{} and {}", self.profile.name, peer.short()));
        let name = name.unwrap_or_else(|| peer.short());
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
        self.store.put_changes(&d, &changes)?;
        let id = doc.id();
        self.docs.insert(id, Doc::Rel(doc));
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
        let name = name.unwrap_or_else(|| peer.short());
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
            .rels()
            .filter(|r| r.header().owner == self.me && r.members().any(|m| m.identity == *member))
            .map(RelationshipDoc::id)
            .collect();
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
        let owner = self.rel(&id).expect("found").header().owner;
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
        let owner = self.rel(&id).expect("found").header().owner;
        let purpose = match purpose {
            Some(p) => Some(p.trim().to_owned()),
            None if owner == self.me => None,
            None => {
                let held: Vec<String> = self
                    .ledger(owner, self.me)
                    .map(|l| {
                        let mut v: Vec<String> = l
                            .grants(now)
                            .into_iter()
                            .filter(|g| g.status == GrantStatus::Active)
                            .flat_map(|g| g.scopes)
                            .filter_map(|s| match s {
                                Scope::Contact(p) => Some(p),
                                _ => None,
                            })
                            .collect();
                        v.sort();
                        v.dedup();
                        v
                    })
                    .unwrap_or_default();
                match held.as_slice() {
                    [one] => Some(one.clone()),
                    [] => {
                        return Err(EngineError::Refused(format!(
                            "{} has not opted in to contact from you for any purpose (no active contact:<purpose> grant); nothing was sent",
                            owner
                        )));
                    }
                    many => {
                        return Err(EngineError::Invalid(format!(
                            "say why you write: --purpose one of {}",
                            many.join(", ")
                        )));
                    }
                }
            }
        };
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
        let owner = self.rel(&id).expect("found").header().owner;
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
        let owner = match self.docs.get(&id) {
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
        let Some(Doc::Rel(doc)) = self.docs.get_mut(&id) else {
            return Err(EngineError::NotFound(format!("no relationship {id}")));
        };
        let (entry, change) = doc.append_excluding(&refused, &self.key, fresh, now, body)?;
        let header = *doc.header();
        let d = DocRef::Relationship(header);
        if let Err(e) = self.store.put_changes(&d, &[change]) {
            self.reload(&d)?;
            return Err(e.into());
        }
        Ok((entry, self.rel_pushes(&header, None, now)))
    }

    /// Whom a relationship's new changes go to: its owner, or (as the owner) every member
    /// that may read it now, except `skip`.
    pub(crate) fn rel_pushes(
        &self,
        h: &RelHeader,
        skip: Option<IdentityKey>,
        now: UnixSeconds,
    ) -> Vec<Push> {
        let d = DocRef::Relationship(*h);
        if h.owner != self.me {
            return vec![(h.owner, d)];
        }
        let Some(r) = self.rel(&h.doc_id()) else {
            return Vec::new();
        };
        r.members()
            .map(|m| m.identity)
            .filter(|m| Some(*m) != skip && self.serves(r, m, now).is_ok())
            .map(|m| (m, d))
            .collect()
    }
}

/// The documents and content keys a store holds, loaded and verified.
#[allow(clippy::type_complexity)]
fn load(
    store: &Store,
) -> Result<(
    HashMap<DocId, Doc>,
    HashMap<DocId, BTreeMap<u32, ContentKey>>,
)> {
    let mut docs = HashMap::new();
    for d in store.doc_refs()? {
        let id = d.doc_id();
        let doc = match d {
            DocRef::Consent(_) => Doc::Consent(store.load_consent(&id)?),
            DocRef::Relationship(_) => Doc::Rel(store.load_relationship(&id)?),
        };
        docs.insert(id, doc);
    }
    let mut keys: HashMap<DocId, BTreeMap<u32, ContentKey>> = HashMap::new();
    for (doc, epoch, k) in store.epoch_keys()? {
        keys.entry(doc).or_default().insert(epoch, k);
    }
    Ok((docs, keys))
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
