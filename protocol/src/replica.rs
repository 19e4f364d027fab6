//! The sync of a replica, without I/O: what a node sends a peer, and what it does with a
//! peer's request or answer. Every check is a rule of [`crate::policy`], asked on every
//! round, so a revocation takes effect on open sessions at once.
//!
//! The rounds are written once, over [`Holder`]: whatever holds documents and remembers
//! what peers proved they hold. The node's engine is one holder (its documents load from
//! its store, and its hooks store, log and raise events); [`Replica`] is another, all in
//! memory, which the simulated-network tests drive with no store and no sockets.
//!
//! One round: the requester sends its heads and the changes the responder lacks by the
//! heads it last reported ([`round_request`]); the responder checks access, applies what
//! passes and answers with its heads and the changes the requester lacks
//! ([`handle_request`]); the requester applies the answer and learns what was refused
//! ([`handle_response`]). What a peer reports is only a hint: nothing held changes because
//! of it, except that a change it refused for good is not sent to it again.

use std::collections::{BTreeMap, HashMap, HashSet};

use automerge::ChangeHash;
use serde::{Deserialize, Serialize};

use crate::consent::{
    ConsentDoc, ConsentError, ConsentHeader, EntryBody, EntryId, GrantStatus, Ledger, LegalBasis,
    UnixSeconds,
};
use crate::identity::{IdentityKey, SecretKey};
use crate::policy::{
    self, Conduct, Holdings, MAX_UNANSWERED_CHANGES, MAX_WAITING_BYTES, MAX_WAITING_PER_DOC, Push,
    Role,
};
use crate::relationship::{RelBody, RelEntry, RelError, RelHeader, RelationshipDoc};
use crate::scope::Scope;
use crate::session::Round;
use crate::signed::{ChangeError, DocId, SignedChange, Verified, verify_named};
use crate::terms::ROSTER;
use crate::wire::{
    CHUNK_BYTES, ChunkBudget, DocRef, RefusalCode, RefusalKind, SyncRequest, SyncResponse,
};

/// A document a replica holds.
#[derive(Debug)]
pub enum Doc {
    /// A consent document.
    Consent(ConsentDoc),
    /// A relationship.
    Rel(RelationshipDoc),
}

impl Doc {
    /// How peers name it.
    pub fn doc_ref(&self) -> DocRef {
        match self {
            Doc::Consent(c) => DocRef::Consent(*c.ledger().header()),
            Doc::Rel(r) => DocRef::Relationship(*r.header()),
        }
    }

    /// Its current heads.
    pub fn heads(&self) -> Vec<ChangeHash> {
        match self {
            Doc::Consent(c) => c.heads(),
            Doc::Rel(r) => r.heads(),
        }
    }

    /// Whether it holds the change.
    pub fn has_change(&self, h: &ChangeHash) -> bool {
        match self {
            Doc::Consent(c) => c.ledger().has_change(h),
            Doc::Rel(r) => r.has_change(h),
        }
    }

    /// Its changes, in the order applied.
    pub fn changes(&self) -> &[SignedChange] {
        match self {
            Doc::Consent(c) => c.ledger().changes(),
            Doc::Rel(r) => r.changes(),
        }
    }

    /// The changes not in the history of `heads`, in a causal order.
    pub fn changes_missing_from(&self, heads: &[ChangeHash]) -> Vec<&SignedChange> {
        match self {
            Doc::Consent(c) => c.changes_missing_from(heads),
            Doc::Rel(r) => r.changes_missing_from(heads),
        }
    }

    /// The changes `applied` (hashes, in order) names, as held.
    pub fn changes_of(&self, applied: &[ChangeHash]) -> Vec<&SignedChange> {
        let set: HashSet<&ChangeHash> = applied.iter().collect();
        let all = self.changes();
        // Changes just applied sit at the end of the list.
        let start = all.len().saturating_sub(applied.len());
        let tail: Vec<&SignedChange> = all[start..]
            .iter()
            .filter(|c| set.contains(&c.hash()))
            .collect();
        if tail.len() == applied.len() {
            return tail;
        }
        all.iter().filter(|c| set.contains(&c.hash())).collect()
    }
}

/// What a peer refused of ours, and its words.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRefusal {
    /// The whole request, or one change.
    pub what: Refused,
    /// The peer's reason, for people (decide by `what`, never by this text).
    pub reason: String,
}

/// What a peer refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "refused", rename_all = "snake_case")]
pub enum Refused {
    /// The whole sync request.
    Request {
        /// Why, as the peer coded it.
        code: RefusalCode,
    },
    /// One change of ours, for good.
    Change {
        /// The change's hash (hex).
        change: String,
        /// Why, as the peer coded it.
        kind: RefusalKind,
    },
}

/// What one round did, for whoever drives the sessions.
pub type RoundOutcome = Round<PeerRefusal>;

/// Changes that arrived before what they depend on, per document and sender, until the
/// same sender sends more of the document. Bounded: past [`MAX_WAITING_PER_DOC`] a
/// document's oldest goes, past [`MAX_WAITING_BYTES`] whole queues go. Not durable:
/// nothing waiting was acknowledged, and the sender still holds it and sends it again
/// with its dependencies.
#[derive(Debug, Default)]
pub struct Waiting {
    lists: HashMap<(DocId, IdentityKey), Vec<SignedChange>>,
    bytes: usize,
}

impl Waiting {
    /// Keeps `change` of `peer` for `doc`.
    pub fn keep(&mut self, doc: DocId, peer: IdentityKey, change: SignedChange) {
        let size = change.encode().len();
        let list = self.lists.entry((doc, peer)).or_default();
        if list.iter().any(|c| c.hash() == change.hash()) {
            return;
        }
        list.push(change);
        self.bytes += size;
        if list.len() > MAX_WAITING_PER_DOC {
            let gone = list.remove(0);
            self.bytes -= gone.encode().len();
        }
        while self.bytes > MAX_WAITING_BYTES {
            let Some(key) = self.lists.keys().next().copied() else {
                break;
            };
            for c in self.lists.remove(&key).unwrap_or_default() {
                self.bytes -= c.encode().len();
            }
        }
    }

    /// Takes the changes of `peer` waiting in `doc`.
    pub fn take(&mut self, doc: &DocId, peer: &IdentityKey) -> Vec<SignedChange> {
        let list = self.lists.remove(&(*doc, *peer)).unwrap_or_default();
        for c in &list {
            self.bytes -= c.encode().len();
        }
        list
    }

    /// The encoded size of everything waiting.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// How many changes wait.
    pub fn len(&self) -> usize {
        self.lists.values().map(Vec::len).sum()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.lists.is_empty()
    }
}

/// Stored encodings of a document's changes, in order, and whether more remain
/// ([`Holder::stored_from`]).
pub type Stored = (Vec<Vec<u8>>, bool);

/// The most cold syncs a holder follows at once ([`Cursors`]); past it the oldest is
/// forgotten (its next round reads the document instead).
pub const MAX_CURSORS: usize = 1024;

/// Where a cold sync stands with one peer: how many of the document's stored changes went
/// to it, read in the order stored, and the heads of those.
#[derive(Debug, Clone)]
struct Cursor {
    sent: u64,
    heads: Vec<ChangeHash>,
    more: bool,
    age: u64,
}

/// The cold syncs under way, per document and peer: a document sent to a peer that held
/// none of it goes out as the holder stored it, chunk after chunk, without the document
/// being loaded ([`Holder::stored_from`]). Bounded by [`MAX_CURSORS`]; not durable (a
/// restart syncs from the heads the peer proved it holds).
#[derive(Debug, Default)]
pub struct Cursors {
    map: HashMap<(DocId, IdentityKey), Cursor>,
    ticks: u64,
}

impl Cursors {
    /// How many cold syncs are followed.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Forgets the cold syncs of `doc` (it is gone, or its stored order changed).
    pub fn forget_doc(&mut self, doc: &DocId) {
        self.map.retain(|(d, _), _| d != doc);
    }

    fn get(&self, doc: &DocId, peer: &IdentityKey) -> Option<&Cursor> {
        self.map.get(&(*doc, *peer))
    }

    fn put(&mut self, doc: DocId, peer: IdentityKey, mut c: Cursor) {
        self.ticks += 1;
        c.age = self.ticks;
        self.map.insert((doc, peer), c);
        if self.map.len() > MAX_CURSORS
            && let Some(oldest) = self.map.iter().min_by_key(|(_, c)| c.age).map(|(k, _)| *k)
        {
            self.map.remove(&oldest);
        }
    }

    fn remove(&mut self, doc: &DocId, peer: &IdentityKey) {
        self.map.remove(&(*doc, *peer));
    }
}

/// What holds a replica's documents and what it knows of its peers, with the effects of a
/// round: the node's engine (over its store) or a [`Replica`] in memory. The rounds
/// ([`round_request`], [`handle_request`], [`handle_response`]) decide; a holder keeps and
/// tells.
pub trait Holder: Holdings {
    /// What keeping can fail with.
    type Error: From<ConsentError>;

    /// A document held.
    fn doc(&self, id: &DocId) -> Option<&Doc>;
    /// Takes a document out to change it; it goes back with [`Holder::insert_doc`].
    fn take_doc(&mut self, id: &DocId) -> Option<Doc>;
    /// Puts a document (back).
    fn insert_doc(&mut self, doc: Doc);
    /// Changes waiting for their dependencies.
    fn waiting(&mut self) -> &mut Waiting;
    /// The cold syncs under way.
    fn cursors(&mut self) -> &mut Cursors;
    /// Whether it holds document `id`, without loading it.
    fn holds(&self, id: &DocId) -> bool {
        self.doc(id).is_some()
    }
    /// The encodings of `id`'s changes in the order the holder keeps them (each after its
    /// dependencies), from position `from` on: as many as fit one message
    /// ([`ChunkBudget`]), and whether more remain. `None` to answer from the
    /// document instead ([`Holder::doc`]); a node's engine reads its store here for a
    /// document it has not loaded, so a peer that holds nothing is served without the
    /// document being read and checked in full.
    fn stored_from(&self, id: &DocId, from: u64) -> Result<Option<Stored>, Self::Error>;

    /// The heads `peer` last proved it holds of `id`.
    fn peer_heads(
        &self,
        id: &DocId,
        peer: &IdentityKey,
    ) -> Result<Option<Vec<ChangeHash>>, Self::Error>;
    /// Records the heads `peer` proved it holds of `id`.
    fn put_peer_heads(
        &mut self,
        id: &DocId,
        peer: &IdentityKey,
        heads: &[ChangeHash],
    ) -> Result<(), Self::Error>;
    /// The changes of `id` that `peer` refused for good.
    fn peer_refused(
        &self,
        id: &DocId,
        peer: &IdentityKey,
    ) -> Result<HashSet<ChangeHash>, Self::Error>;
    /// Adds changes `peer` refused for good.
    fn put_peer_refused(
        &mut self,
        id: &DocId,
        peer: &IdentityKey,
        refused: &[(ChangeHash, RefusalKind)],
    ) -> Result<(), Self::Error>;
    /// How `peer` has behaved.
    fn conduct(&self, peer: &IdentityKey) -> Result<Conduct, Self::Error>;
    /// Records how `peer` has behaved.
    fn put_conduct(&mut self, peer: &IdentityKey, c: &Conduct) -> Result<(), Self::Error>;

    /// This node refused `change` (or a whole request) of `peer`: keep it as evidence when
    /// the kind is a strike ([`RefusalKind::is_strike`]), and tell the owner.
    #[allow(clippy::too_many_arguments)]
    fn keep_refusal(
        &mut self,
        peer: &IdentityKey,
        doc: &DocRef,
        change: Option<&SignedChange>,
        kind: RefusalKind,
        reason: &str,
        now: UnixSeconds,
    ) -> Result<(), Self::Error>;
    /// Makes the changes `applied` (hashes, in order) of `doc`, now in memory, durable.
    fn persist(&mut self, doc: &DocRef, applied: &[ChangeHash]) -> Result<(), Self::Error>;
    /// Reacts to changes of `from` made durable (events, keys, erasure, acceptance);
    /// returns the pushes that follow. `new`: the document was not held before.
    #[allow(clippy::too_many_arguments)]
    fn react(
        &mut self,
        doc: &DocRef,
        role: Role,
        from: &IdentityKey,
        applied: &[ChangeHash],
        new: bool,
        now: UnixSeconds,
    ) -> Result<Vec<Push>, Self::Error>;
    /// `peer` refused a request or a change of ours.
    fn told_refused(&mut self, peer: &IdentityKey, doc: &DocRef, refusal: &PeerRefusal);
    /// A round could not be served: `what` failed with `error`.
    fn failed(&self, peer: &IdentityKey, what: &str, error: &Self::Error);
}

/// What receiving a batch of changes did.
#[derive(Debug, Default)]
pub struct Received {
    /// Changes newly applied and durable, in order.
    pub applied: Vec<ChangeHash>,
    /// Changes refused, with their kind and reason.
    pub refused: Vec<(ChangeHash, RefusalKind, String)>,
    /// Documents to sync after this.
    pub pushes: Vec<Push>,
    /// The peer passed the misbehaviour limit.
    pub disconnect: bool,
    /// A new relationship arrived that does not name this node: it was not kept.
    pub discarded: bool,
}

/// Encoded changes for one message, whether more remain, and the hashes of those sent.
type Chunk = (Vec<Vec<u8>>, bool, Vec<ChangeHash>);

/// Builds the first (or next) request of a round with `peer` for `doc`: this node's heads,
/// and the changes the peer lacks by the heads it last reported (all of them, cut to one
/// message, on first contact), with the hashes of the changes it carries. `None` when this
/// node may not or need not sync the document with the peer.
#[allow(clippy::type_complexity)]
pub fn round_request<H: Holder>(
    h: &mut H,
    peer: &IdentityKey,
    doc: &DocRef,
    now: UnixSeconds,
) -> Result<Option<(SyncRequest, Vec<ChangeHash>)>, H::Error> {
    if policy::sync_role(h, peer, doc, now).is_err() {
        return Ok(None);
    }
    let id = doc.doc_id();
    if !h.holds(&id) {
        return Ok(None);
    }
    // The heads the peer last proved it holds are a hint of what it lacks; never synced
    // with this peer: it most likely lacks the document, so the first round carries its
    // first chunk instead of costing a round trip to find out.
    let known = h.peer_heads(&id, peer)?;
    if let Some((changes, heads, sent)) = cold_chunk(h, &id, peer, known.as_deref())? {
        return Ok(Some((
            SyncRequest {
                doc: *doc,
                heads,
                changes,
            },
            sent,
        )));
    }
    h.cursors().remove(&id, peer);
    let Some(held) = h.doc(&id) else {
        return Ok(None);
    };
    let heads = held.heads();
    let known = known.unwrap_or_default();
    let (changes, _, sent) = encoded_missing(h, &id, peer, &known, &HashSet::new(), CHUNK_BYTES)?;
    Ok(Some((
        SyncRequest {
            doc: *doc,
            heads,
            changes,
        },
        sent,
    )))
}

/// The next chunk of a cold sync of `id` to `peer`, read as the holder keeps it
/// ([`Holder::stored_from`]), without the document: on first contact (the peer never
/// proved holding any of it, and refused none of it), and then while the peer reports
/// holding exactly what the chunks so far carried. The encodings, the heads of everything
/// sent so far (what the request reports: this node holds at least their history; the
/// responder sends what it holds beyond), and the chunk's hashes. `None` to read the
/// document instead.
#[allow(clippy::type_complexity)]
fn cold_chunk<H: Holder>(
    h: &mut H,
    id: &DocId,
    peer: &IdentityKey,
    known: Option<&[ChangeHash]>,
) -> Result<Option<(Vec<Vec<u8>>, Vec<ChangeHash>, Vec<ChangeHash>)>, H::Error> {
    let (from, mut heads) = match (known, h.cursors().get(id, peer)) {
        (None, _) => (0, Vec::new()),
        (Some(k), Some(c)) if c.more && same_set(k, &c.heads) => (c.sent, c.heads.clone()),
        _ => return Ok(None),
    };
    if from == 0 && !h.peer_refused(id, peer)?.is_empty() {
        return Ok(None);
    }
    let Some((raw, more)) = h.stored_from(id, from)? else {
        return Ok(None);
    };
    if raw.is_empty() {
        return Ok(None);
    }
    let mut hashes = Vec::with_capacity(raw.len());
    let mut deps = HashSet::new();
    // Only the header is read (hashing the chunk is most of it, so a large chunk is read
    // on several threads); a change whose header cannot be read so is decoded in full, and
    // one that does not decode is reported by reading the document.
    let peeked = crate::append::par_map(&raw, |bytes| {
        SignedChange::peek(bytes).or_else(|| {
            SignedChange::decode(bytes)
                .ok()
                .map(|c| (c.hash(), c.change().deps().to_vec()))
        })
    });
    for p in peeked {
        let Some((hash, d)) = p else {
            return Ok(None);
        };
        hashes.push(hash);
        deps.extend(d);
    }
    heads.extend(hashes.iter().copied());
    heads.retain(|x| !deps.contains(x));
    heads.sort_unstable();
    heads.dedup();
    let sent = from + raw.len() as u64;
    h.cursors().put(
        *id,
        *peer,
        Cursor {
            sent,
            heads: heads.clone(),
            more,
            age: 0,
        },
    );
    Ok(Some((raw, heads, hashes)))
}

/// Whether two lists of heads name the same changes.
fn same_set(a: &[ChangeHash], b: &[ChangeHash]) -> bool {
    let mut a = a.to_vec();
    let mut b = b.to_vec();
    a.sort_unstable();
    b.sort_unstable();
    a.dedup();
    b.dedup();
    a == b
}

/// A peer's sync request, with its changes decoded and their signatures checked ahead
/// when it went through [`check_requests`]: that work then runs beside the thread that
/// applies changes (which everything else waits for), and in batches across requests. A
/// plain [`SyncRequest`] converts into one not checked ahead, whose changes are decoded and
/// verified as they are applied. Either way every rule runs: what was checked ahead only
/// spares verifying a signature a second time, for the very document and copy checked.
#[derive(Debug)]
pub struct CheckedRequest {
    req: SyncRequest,
    ahead: Option<Ahead>,
}

/// What [`check_requests`] did for one request: each change decoded, in the request's
/// order, and the signatures found good.
#[derive(Debug)]
struct Ahead {
    decoded: Vec<Result<SignedChange, ChangeError>>,
    verified: Verified,
}

impl CheckedRequest {
    /// The request.
    pub fn request(&self) -> &SyncRequest {
        &self.req
    }

    /// Whether its changes were checked ahead.
    pub fn checked_ahead(&self) -> bool {
        self.ahead.is_some()
    }
}

impl From<SyncRequest> for CheckedRequest {
    fn from(req: SyncRequest) -> Self {
        Self { req, ahead: None }
    }
}

/// Decodes the changes of several requests and checks their signatures together, in
/// batches across requests ([`verify_named`]), without the documents or the store: pure
/// work a node runs beside its engine before it hands the requests over, in order.
pub fn check_requests(reqs: Vec<SyncRequest>) -> Vec<CheckedRequest> {
    let decoded: Vec<Vec<Result<SignedChange, ChangeError>>> = reqs
        .iter()
        .map(|r| SignedChange::decode_all(&r.changes))
        .collect();
    let parts: Vec<(DocId, Vec<&SignedChange>)> = reqs
        .iter()
        .zip(&decoded)
        .map(|(r, d)| {
            (
                r.doc.doc_id(),
                d.iter().filter_map(|c| c.as_ref().ok()).collect(),
            )
        })
        .collect();
    let verified = verify_named(&parts);
    drop(parts);
    reqs.into_iter()
        .zip(decoded)
        .zip(verified)
        .map(|((req, decoded), verified)| CheckedRequest {
            req,
            ahead: Some(Ahead { decoded, verified }),
        })
        .collect()
}

/// How many threads checking requests ahead may use at once: the machine's cores, up to
/// four (as a large check splits its work).
pub fn check_threads() -> usize {
    crate::append::check_threads()
}

/// Answers a peer's request: checks access, applies and keeps its changes (each one
/// checked), and returns the changes it lacks. The second value lists pushes to make; the
/// third says the peer passed the misbehaviour limit and must be disconnected.
pub fn handle_request<H: Holder>(
    h: &mut H,
    peer: &IdentityKey,
    req: impl Into<CheckedRequest>,
    now: UnixSeconds,
) -> (SyncResponse, Vec<Push>, bool) {
    handle_request_within(h, peer, req, now, CHUNK_BYTES)
}

/// [`handle_request`] for one round of a batch: the answer carries at most `answer_bytes`
/// of changes (but at least one change when any is missing), so that the batch's answers
/// together fit one message ([`crate::wire::batch_answer_bytes`]).
pub fn handle_request_within<H: Holder>(
    h: &mut H,
    peer: &IdentityKey,
    req: impl Into<CheckedRequest>,
    now: UnixSeconds,
    answer_bytes: usize,
) -> (SyncResponse, Vec<Push>, bool) {
    let CheckedRequest { req, ahead } = req.into();
    let role = match policy::sync_role(h, peer, &req.doc, now) {
        Ok(r) => r,
        Err((code, detail)) => {
            let disconnect = match refused_whole(h, peer, &req, code, &detail, now) {
                Ok(d) => d,
                Err(e) => {
                    h.failed(peer, "recording a refusal", &e);
                    false
                }
            };
            return (
                SyncResponse::Refused { code, detail },
                Vec::new(),
                disconnect,
            );
        }
    };
    let received = match receive_with(h, peer, &req.doc, role, req.changes, ahead, now) {
        Ok(r) => r,
        Err(e) => {
            h.failed(peer, "storing a sync request's changes", &e);
            return (
                SyncResponse::Refused {
                    code: RefusalCode::Unavailable,
                    detail: "this node could not store the changes; try again later".into(),
                },
                Vec::new(),
                false,
            );
        }
    };
    if received.discarded {
        return (
            SyncResponse::Refused {
                code: RefusalCode::Forbidden,
                detail: "that relationship does not name this node as a member".into(),
            },
            received.pushes,
            received.disconnect,
        );
    }
    let id = req.doc.doc_id();
    let Some(held) = h.doc(&id) else {
        return (
            SyncResponse::Sync {
                heads: Vec::new(),
                changes: Vec::new(),
                more: false,
                refused: received.refused,
            },
            received.pushes,
            received.disconnect,
        );
    };
    let heads = held.heads();
    // The requester holds the history of the heads it reports: when those include all of
    // ours, it lacks nothing (the common end of a sync, spared a walk of the history).
    let reported: HashSet<&ChangeHash> = req.heads.iter().collect();
    let missing = if heads.iter().all(|x| reported.contains(x)) {
        Ok((Vec::new(), false, Vec::new()))
    } else {
        // The requester holds at least the history of the heads it reports. When it
        // reports heads we do not know (it holds changes we lack), that history is partly
        // unknown to us; but it holds what it just sent, with that history, and what we
        // recorded it holding before. Otherwise a sync in several rounds would send each
        // earlier round's changes back.
        let just: HashSet<ChangeHash> = received.applied.iter().copied().collect();
        let mut basis = req.heads.clone();
        if req.heads.iter().any(|c| !held.has_change(c)) {
            basis.extend(just.iter().copied());
            if let Ok(Some(before)) = h.peer_heads(&id, peer) {
                basis.extend(before);
            }
        }
        encoded_missing(h, &id, peer, &basis, &just, answer_bytes)
    };
    let (changes, more) = match missing {
        Ok((changes, more, _)) => (changes, more),
        Err(e) => {
            h.failed(peer, "reading what a peer lacks", &e);
            return (
                SyncResponse::Refused {
                    code: RefusalCode::Unavailable,
                    detail: "this node could not read its store; try again later".into(),
                },
                received.pushes,
                received.disconnect,
            );
        }
    };
    // Record only what the requester proved it holds. Whether it stores this answer is up
    // to it (it may crash first); the heads it reports next time say.
    if let Err(e) = h.put_peer_heads(&id, peer, &req.heads) {
        h.failed(peer, "recording a peer's heads", &e);
    }
    (
        SyncResponse::Sync {
            heads,
            changes,
            more,
            refused: received.refused,
        },
        received.pushes,
        received.disconnect,
    )
}

/// Takes the peer's answer to a request of ours. `sent` lists the changes the request
/// carried. Changes of ours the peer refused for good are not sent to it again; nothing
/// held changes because of what a peer answers (its answer is only a hint).
pub fn handle_response<H: Holder>(
    h: &mut H,
    peer: &IdentityKey,
    doc: &DocRef,
    sent: &[ChangeHash],
    resp: SyncResponse,
    now: UnixSeconds,
) -> Result<(RoundOutcome, Vec<Push>), H::Error> {
    let mut out = RoundOutcome::default();
    let (heads, changes, more, refused) = match resp {
        SyncResponse::Refused { code, detail } => {
            let r = PeerRefusal {
                what: Refused::Request { code },
                reason: detail,
            };
            h.told_refused(peer, doc, &r);
            out.refused.push(r);
            return Ok((out, Vec::new()));
        }
        SyncResponse::Sync {
            heads,
            changes,
            more,
            refused,
        } => (heads, changes, more, refused),
    };
    let Ok(role) = policy::sync_role(h, peer, doc, now) else {
        // Access ended while the round was under way (a revocation): take nothing.
        return Ok((out, Vec::new()));
    };
    let received = receive(h, peer, doc, role, changes, now)?;
    out.received = received.applied.len();
    out.disconnect = received.disconnect;
    let pushes = received.pushes;
    let id = doc.doc_id();
    let sent: HashSet<&ChangeHash> = sent.iter().collect();
    let mut for_good = Vec::new();
    for (hash, kind, reason) in refused {
        if !sent.contains(&hash) || kind.is_transient() {
            // Not ours to hear about, or it waits there for its dependencies: they go in
            // the next round.
            continue;
        }
        let r = PeerRefusal {
            what: Refused::Change {
                change: hash.to_string(),
                kind,
            },
            reason,
        };
        h.told_refused(peer, doc, &r);
        out.refused.push(r);
        for_good.push((hash, kind));
    }
    if !h.holds(&id) {
        h.cursors().remove(&id, peer);
        return Ok((out, pushes));
    }
    h.put_peer_refused(&id, peer, &for_good)?;
    let before = h.peer_heads(&id, peer)?;
    out.peer_moved = before.as_deref() != Some(&heads[..]);
    // The responder kept what it applied before answering: its heads are what it holds now.
    h.put_peer_heads(&id, peer, &heads)?;
    // A cold sync the peer followed exactly goes on with the next stored chunk. After its
    // last chunk, so followed, the peer holds everything stored then: only what was stored
    // since is unsent, read from the store (the document stays unloaded). Anything else (a
    // refusal, heads of its own) is decided on the document.
    let followed = h
        .cursors()
        .get(&id, peer)
        .filter(|c| for_good.is_empty() && same_set(&heads, &c.heads))
        .map(|c| (c.more, c.sent));
    let unsent = match followed {
        Some((true, _)) => true,
        Some((false, sent)) => {
            h.cursors().remove(&id, peer);
            match h.stored_from(&id, sent)? {
                Some((since, _)) => !since.is_empty(),
                None => !to_send(h, &id, peer, &heads)?.is_empty(),
            }
        }
        None => {
            h.cursors().remove(&id, peer);
            !to_send(h, &id, peer, &heads)?.is_empty()
        }
    };
    out.again = more || unsent;
    Ok((out, pushes))
}

/// The changes of `id` to send `peer`, whose heads are `heads`: those not in the history of
/// `heads`, less those [`policy::unblocked`] holds back. In a causal order.
fn to_send<'a, H: Holder>(
    h: &'a H,
    id: &DocId,
    peer: &IdentityKey,
    heads: &[ChangeHash],
) -> Result<Vec<&'a SignedChange>, H::Error> {
    let list = h
        .doc(id)
        .map(|d| d.changes_missing_from(heads))
        .unwrap_or_default();
    if list.is_empty() {
        return Ok(list);
    }
    Ok(policy::unblocked(list, h.peer_refused(id, peer)?))
}

/// [`to_send`] less `skip`, encoded, cut to one message's worth ([`ChunkBudget`]). The flag says more remain; the hashes are those of the changes in the chunk.
fn encoded_missing<H: Holder>(
    h: &H,
    id: &DocId,
    peer: &IdentityKey,
    heads: &[ChangeHash],
    skip: &HashSet<ChangeHash>,
    limit: usize,
) -> Result<Chunk, H::Error> {
    let list = to_send(h, id, peer, heads)?;
    let mut out = Vec::new();
    let mut hashes = Vec::new();
    let mut budget = ChunkBudget::within(limit);
    for c in list.into_iter().filter(|c| !skip.contains(&c.hash())) {
        let bytes = c.encode();
        if !budget.take(bytes.len()) {
            return Ok((out, true, hashes));
        }
        out.push(bytes);
        hashes.push(c.hash());
    }
    Ok((out, false, hashes))
}

/// A request refused whole. A relationship its owner pushes to a node that never agreed to
/// hear from it is unsolicited contact: kept as evidence (its first change) and counted
/// against the peer, like an unsolicited message. Returns whether to disconnect.
fn refused_whole<H: Holder>(
    h: &mut H,
    peer: &IdentityKey,
    req: &SyncRequest,
    code: RefusalCode,
    detail: &str,
    now: UnixSeconds,
) -> Result<bool, H::Error> {
    let unsolicited = code == RefusalCode::Forbidden
        && matches!(req.doc, DocRef::Relationship(r) if r.owner == *peer);
    if !unsolicited || req.changes.is_empty() {
        return Ok(false);
    }
    let first = req
        .changes
        .iter()
        .find_map(|b| SignedChange::decode(b).ok());
    refuse(
        h,
        peer,
        &req.doc,
        first.as_ref(),
        RefusalKind::Forbidden,
        detail,
        now,
    )
}

/// Verifies, checks, applies and keeps changes from `peer`; records refusals.
pub fn receive<H: Holder>(
    h: &mut H,
    peer: &IdentityKey,
    doc: &DocRef,
    role: Role,
    raw: Vec<Vec<u8>>,
    now: UnixSeconds,
) -> Result<Received, H::Error> {
    receive_with(h, peer, doc, role, raw, None, now)
}

/// [`receive`], with the changes already decoded and their signatures checked ahead when
/// `ahead` holds them ([`check_requests`]).
fn receive_with<H: Holder>(
    h: &mut H,
    peer: &IdentityKey,
    doc: &DocRef,
    role: Role,
    raw: Vec<Vec<u8>>,
    ahead: Option<Ahead>,
    now: UnixSeconds,
) -> Result<Received, H::Error> {
    let mut out = Received::default();
    if raw.is_empty() {
        return Ok(out);
    }
    let id = doc.doc_id();
    let me = h.me();
    let (decoded, verified) = match ahead {
        Some(a) if a.decoded.len() == raw.len() && *a.verified.doc() == id => {
            (a.decoded, Some(a.verified))
        }
        _ => (SignedChange::decode_all(&raw), None),
    };
    let verified = verified.as_ref();
    let mut changes = Vec::with_capacity(raw.len());
    // Where each change came from, to find a refused one again without keeping a copy of
    // every change: its encoding, or the changes that waited.
    let mut from_raw = Vec::with_capacity(raw.len());
    for (i, decoded) in decoded.into_iter().enumerate() {
        match decoded {
            Ok(c) => {
                from_raw.push(i);
                changes.push(c);
            }
            Err(e) => {
                let reason = format!("undecodable change: {e}");
                let kind = RefusalKind::Invalid;
                out.disconnect |= refuse(h, peer, doc, None, kind, &reason, now)?;
                out.refused.push((ChangeHash([0; 32]), kind, reason));
            }
        }
    }
    // Changes of this peer that came before what they depend on get another chance.
    let waited = h.waiting().take(&id, peer);
    changes.extend(waited.iter().cloned());
    let hashes: Vec<ChangeHash> = changes.iter().map(SignedChange::hash).collect();
    let existed = h.doc(&id).is_some();
    let rejected: Vec<(ChangeHash, RefusalKind, String)> = match (doc, role) {
        (DocRef::Consent(c), _) => {
            let mut held = match h.take_doc(&id) {
                Some(Doc::Consent(d)) => d,
                _ => ConsentDoc::new(*c)?,
            };
            let mut changes = changes;
            if c.grantee == me && !policy::wrote_in(held.ledger(), &me) {
                // A stranger's grants: at most what the bound leaves room for.
                let room = policy::stranger_room(held.ledger());
                for extra in changes.split_off(room.min(changes.len())) {
                    let reason = format!(
                        "over the {MAX_UNANSWERED_CHANGES} changes this node keeps from you before it answers"
                    );
                    out.refused
                        .push((extra.hash(), RefusalKind::Forbidden, reason));
                }
            }
            let report = held.apply_with(changes, verified);
            out.applied = report.applied;
            if !held.ledger().changes().is_empty() {
                h.insert_doc(Doc::Consent(held));
            }
            report
                .rejected
                .into_iter()
                .map(|(c, e)| (c, e.refusal_kind(), e.to_string()))
                .collect()
        }
        (DocRef::Relationship(_), Role::Owner) => {
            let Some(Doc::Rel(mut r)) = h.take_doc(&id) else {
                return Ok(out);
            };
            let members: HashSet<IdentityKey> = r
                .members()
                .filter(|m| m.removed_at.is_none())
                .map(|m| m.identity)
                .collect();
            let report = r.apply_gated_with(
                changes,
                |author, entries| {
                    let list: Vec<&RelEntry> = entries.iter().map(|(_, e)| e).collect();
                    policy::owner_takes(h, &members, author, &list, now)
                },
                verified,
            );
            out.applied = report.applied;
            h.insert_doc(Doc::Rel(r));
            rel_rejections(report.rejected)
        }
        (DocRef::Relationship(header), _) => {
            let mut r = match h.take_doc(&id) {
                Some(Doc::Rel(r)) => r,
                _ => RelationshipDoc::new(*header),
            };
            let report = r.apply_gated_with(changes, |_, _| Ok(()), verified);
            if !existed && !r.is_member(&me) {
                // Not ours to keep: a relationship only its members hold.
                out.discarded = true;
                out.applied.clear();
                return Ok(out);
            }
            out.applied = report.applied;
            if !r.changes().is_empty() {
                h.insert_doc(Doc::Rel(r));
            }
            rel_rejections(report.rejected)
        }
    };
    h.persist(doc, &out.applied)?;
    // The last copy received of each refused change (a copy may differ in its signature).
    let mut at: HashMap<ChangeHash, usize> = HashMap::new();
    if !rejected.is_empty() {
        at.extend(hashes.iter().enumerate().map(|(i, hash)| (*hash, i)));
    }
    for (hash, kind, reason) in rejected {
        let found = at.get(&hash).and_then(|&i| match from_raw.get(i) {
            Some(&r) => SignedChange::decode(&raw[r]).ok(),
            None => waited.get(i - from_raw.len()).cloned(),
        });
        let change = found.as_ref();
        if kind.is_transient()
            && let Some(c) = change
        {
            h.waiting().keep(id, *peer, c.clone());
        }
        out.disconnect |= refuse(h, peer, doc, change, kind, &reason, now)?;
        out.refused.push((hash, kind, reason));
    }
    if out.applied.is_empty() {
        return Ok(out);
    }
    let pushes = h.react(doc, role, peer, &out.applied, !existed, now)?;
    out.pushes.extend(pushes);
    if let (DocRef::Relationship(header), Role::Owner) = (doc, role) {
        out.pushes
            .extend(policy::rel_pushes(h, header, Some(*peer), now));
    }
    Ok(out)
}

/// Records one refused change and, when its kind is a strike, counts it against the peer,
/// durably; past [`policy::MAX_STRIKES`] the peer is banned (returns true). A change that
/// waits for its dependencies is no strike: an honest peer sends them next round.
pub fn refuse<H: Holder>(
    h: &mut H,
    peer: &IdentityKey,
    doc: &DocRef,
    change: Option<&SignedChange>,
    kind: RefusalKind,
    reason: &str,
    now: UnixSeconds,
) -> Result<bool, H::Error> {
    h.keep_refusal(peer, doc, change, kind, reason, now)?;
    if !kind.is_strike() {
        return Ok(false);
    }
    let mut c = h.conduct(peer)?;
    let ban = c.strike(now);
    h.put_conduct(peer, &c)?;
    Ok(ban)
}

fn rel_rejections(rejected: Vec<(ChangeHash, RelError)>) -> Vec<(ChangeHash, RefusalKind, String)> {
    rejected
        .into_iter()
        .map(|(h, e)| {
            let kind = e.refusal_kind();
            let text = match e {
                RelError::Denied { reason, .. } => reason,
                other => other.to_string(),
            };
            (h, kind, text)
        })
        .collect()
}

// ----- a replica in memory -----

/// A replica all in memory: a person's or a company's documents, keys and what it knows of
/// its peers, with no store and no network. It writes what a node writes (grants,
/// acceptances, revocations and their erasure, relationships, messages) and syncs by the
/// same rounds as a node; whoever drives it carries requests, answers and pushes between
/// replicas. Every input is given, the time included, so it is deterministic.
#[derive(Debug)]
pub struct Replica {
    key: SecretKey,
    me: IdentityKey,
    /// Counts the nonces this replica made (see [`Replica::fresh`]).
    made: u64,
    docs: BTreeMap<DocId, Doc>,
    heads: HashMap<(DocId, IdentityKey), Vec<ChangeHash>>,
    refused_by: HashMap<(DocId, IdentityKey), HashSet<ChangeHash>>,
    conduct: HashMap<IdentityKey, Conduct>,
    waiting: Waiting,
    cursors: Cursors,
    /// Refusals of strike kinds: (peer, document, kind, reason).
    pub evidence: Vec<(IdentityKey, DocId, RefusalKind, String)>,
    /// What peers refused of ours.
    pub told: Vec<(IdentityKey, PeerRefusal)>,
    /// Erasures done on revocation: (customer, relationships deleted).
    pub erased: Vec<(IdentityKey, usize)>,
}

/// What a local write of a [`Replica`] can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    /// A consent rule refused it.
    #[error(transparent)]
    Consent(#[from] ConsentError),
    /// A relationship rule refused it.
    #[error(transparent)]
    Rel(#[from] RelError),
    /// A policy rule refused it.
    #[error("{0}")]
    Refused(String),
    /// No such document or grant here.
    #[error("{0}")]
    NotFound(String),
}

impl Replica {
    /// A replica of the holder of `key`, holding nothing.
    pub fn new(key: SecretKey) -> Self {
        let me = key.identity();
        Replica {
            key,
            me,
            made: 0,
            docs: BTreeMap::new(),
            heads: HashMap::new(),
            refused_by: HashMap::new(),
            conduct: HashMap::new(),
            waiting: Waiting::default(),
            cursors: Cursors::default(),
            evidence: Vec::new(),
            told: Vec::new(),
            erased: Vec::new(),
        }
    }

    /// A fresh nonce: this replica's identity and a count, hashed. Distinct for every call
    /// of one replica, and the same from run to run.
    fn fresh(&mut self) -> [u8; 16] {
        use sha2::{Digest, Sha256};
        self.made += 1;
        let mut h = Sha256::new();
        h.update(self.me.as_bytes());
        h.update(self.made.to_be_bytes());
        let mut n = [0u8; 16];
        n.copy_from_slice(&h.finalize()[..16]);
        n
    }

    /// The documents held.
    pub fn docs(&self) -> impl Iterator<Item = &Doc> {
        self.docs.values()
    }

    /// A relationship held.
    pub fn relationship(&self, id: &DocId) -> Option<&RelationshipDoc> {
        match self.docs.get(id) {
            Some(Doc::Rel(r)) => Some(r),
            _ => None,
        }
    }

    /// The documents this replica syncs with `peer` now (what a node's sweep offers).
    pub fn shared_with(&self, peer: &IdentityKey, now: UnixSeconds) -> Vec<DocRef> {
        self.docs
            .values()
            .map(Doc::doc_ref)
            .filter(|d| policy::sync_role(self, peer, d, now).is_ok())
            .filter(|d| match d {
                DocRef::Consent(_) => true,
                DocRef::Relationship(r) => {
                    r.owner == *peer
                        || self
                            .relationship(&r.doc_id())
                            .is_some_and(|rel| rel.is_member(peer))
                }
            })
            .collect()
    }

    /// Changes waiting for their dependencies.
    pub fn waiting_len(&self) -> usize {
        self.waiting.len()
    }

    fn append_consent(
        &mut self,
        h: ConsentHeader,
        now: UnixSeconds,
        body: EntryBody,
    ) -> Result<EntryId, ReplicaError> {
        let id = h.doc_id();
        let nonce = self.fresh();
        let mut doc = match self.docs.remove(&id) {
            Some(Doc::Consent(c)) => c,
            _ => ConsentDoc::new(h)?,
        };
        let result = doc.append(&self.key, nonce, now, body);
        if !doc.ledger().changes().is_empty() {
            self.docs.insert(id, Doc::Consent(doc));
        }
        Ok(result?.0)
    }

    /// Grants `scopes` to `grantee` for `purpose`, on the roster's first terms.
    pub fn grant(
        &mut self,
        grantee: IdentityKey,
        scopes: Vec<Scope>,
        purpose: &str,
        expires: Option<UnixSeconds>,
        now: UnixSeconds,
    ) -> Result<(EntryId, Vec<Push>), ReplicaError> {
        let h = ConsentHeader {
            customer: self.me,
            grantee,
        };
        let body = EntryBody::Grant {
            scopes,
            purpose: purpose.to_owned(),
            legal_basis: LegalBasis::Consent,
            notice_sha256: "0".repeat(64),
            terms: ROSTER[0].reference(),
            expires,
        };
        let id = self.append_consent(h, now, body)?;
        Ok((id, vec![(grantee, DocRef::Consent(h))]))
    }

    /// Accepts every pending grant of `customer`, on its terms.
    pub fn accept(
        &mut self,
        customer: IdentityKey,
        now: UnixSeconds,
    ) -> Result<(usize, Vec<Push>), ReplicaError> {
        let h = ConsentHeader {
            customer,
            grantee: self.me,
        };
        let pending: Vec<_> = self
            .ledger(customer, self.me)
            .map(|l| l.grants(now))
            .unwrap_or_default()
            .into_iter()
            .filter(|g| g.status == GrantStatus::Pending)
            .collect();
        for g in &pending {
            let body = EntryBody::Accept {
                grant: g.id,
                terms: g.terms.clone(),
            };
            self.append_consent(h, now, body)?;
        }
        Ok((pending.len(), vec![(customer, DocRef::Consent(h))]))
    }

    /// Revokes every grant to `grantee`.
    pub fn revoke(
        &mut self,
        grantee: IdentityKey,
        now: UnixSeconds,
    ) -> Result<(usize, Vec<Push>), ReplicaError> {
        let h = ConsentHeader {
            customer: self.me,
            grantee,
        };
        let open: Vec<EntryId> = self
            .ledger(self.me, grantee)
            .map(|l| l.grants(now))
            .unwrap_or_default()
            .into_iter()
            .filter(|g| g.revoked.is_none())
            .map(|g| g.id)
            .collect();
        for grant in &open {
            let body = EntryBody::Revoke {
                grant: *grant,
                reason: None,
            };
            self.append_consent(h, now, body)?;
        }
        Ok((open.len(), vec![(grantee, DocRef::Consent(h))]))
    }

    /// Opens a relationship with `members`, titled `title`.
    pub fn open(
        &mut self,
        title: &str,
        members: &[IdentityKey],
        now: UnixSeconds,
    ) -> Result<(DocId, Vec<Push>), ReplicaError> {
        let header = RelHeader {
            owner: self.me,
            nonce: self.fresh(),
        };
        let mut doc = RelationshipDoc::new(header);
        let nonce = self.fresh();
        doc.append(
            &self.key,
            nonce,
            now,
            RelBody::Title {
                title: title.to_owned(),
            },
        )?;
        for m in members {
            let name = m.short();
            doc.append(&self.key, nonce, now, RelBody::Member { member: *m, name })?;
        }
        let id = doc.id();
        self.docs.insert(id, Doc::Rel(doc));
        Ok((id, policy::rel_pushes(self, &header, None, now)))
    }

    /// Writes a message in relationship `id`, with the purpose [`policy::message_purpose`]
    /// gives it.
    pub fn send(
        &mut self,
        id: &DocId,
        text: &str,
        now: UnixSeconds,
    ) -> Result<(EntryId, Vec<Push>), ReplicaError> {
        let Some(r) = self.relationship(id) else {
            return Err(ReplicaError::NotFound(format!("no relationship {id}")));
        };
        let header = *r.header();
        let purpose = policy::message_purpose(
            &self.me,
            &header.owner,
            self.ledger(header.owner, self.me),
            None,
            now,
        )
        .map_err(|e| ReplicaError::Refused(e.to_string()))?;
        // Changes of ours the owner refused stay ours, but the next must not depend on them.
        let refused = if header.owner == self.me {
            HashSet::new()
        } else {
            self.peer_refused(id, &header.owner).unwrap_or_default()
        };
        let nonce = self.fresh();
        let Some(Doc::Rel(r)) = self.docs.get_mut(id) else {
            return Err(ReplicaError::NotFound(format!("no relationship {id}")));
        };
        let body = RelBody::Message {
            thread: None,
            text: text.to_owned(),
            purpose,
        };
        let (entry, _) = r.append_excluding(&refused, &self.key, nonce, now, body)?;
        Ok((entry, policy::rel_pushes(self, &header, None, now)))
    }

    /// As the grantee of `h`: acknowledges every revocation due, deleting the
    /// relationships the customer owns when [`policy::erasure_due`] says so.
    fn erase_revoked(&mut self, h: ConsentHeader, now: UnixSeconds) -> Result<bool, ConsentError> {
        let Some(ledger) = self.ledger(h.customer, h.grantee) else {
            return Ok(false);
        };
        let due = policy::erasure_due(ledger, &self.me, now);
        if due.unacked.is_empty() {
            return Ok(false);
        }
        let mut gone = 0;
        if due.erase {
            let owned: Vec<DocId> = self
                .docs
                .iter()
                .filter(|(_, d)| matches!(d, Doc::Rel(r) if r.header().owner == h.customer))
                .map(|(id, _)| *id)
                .collect();
            for id in owned {
                self.docs.remove(&id);
                self.waiting.take(&id, &h.customer);
                gone += 1;
            }
        }
        let erased = if due.erase {
            format!("deleted {gone} relationship document(s)")
        } else {
            "nothing held solely under this grant".to_owned()
        };
        for (grant, revoke) in due.unacked {
            let body = EntryBody::ErasureAck {
                revoke,
                grant,
                erased: erased.clone(),
            };
            self.append_consent(h, now, body).map_err(|e| match e {
                ReplicaError::Consent(c) => c,
                other => ConsentError::Refused(other.to_string()),
            })?;
        }
        self.erased.push((h.customer, gone));
        Ok(true)
    }
}

impl Holdings for Replica {
    fn me(&self) -> IdentityKey {
        self.me
    }

    fn ledger(&self, customer: IdentityKey, grantee: IdentityKey) -> Option<&Ledger> {
        match self.docs.get(&ConsentHeader { customer, grantee }.doc_id()) {
            Some(Doc::Consent(c)) => Some(c.ledger()),
            _ => None,
        }
    }

    fn rel(&self, id: &DocId) -> Option<&RelationshipDoc> {
        self.relationship(id)
    }

    fn rels_owned_by(&self, owner: &IdentityKey) -> usize {
        self.docs
            .values()
            .filter(|d| matches!(d, Doc::Rel(r) if r.header().owner == *owner))
            .count()
    }

    fn unanswered_consents(&self) -> usize {
        self.docs
            .values()
            .filter(|d| {
                matches!(d, Doc::Consent(c)
                    if c.ledger().header().grantee == self.me
                        && !policy::wrote_in(c.ledger(), &self.me))
            })
            .count()
    }
}

impl Holder for Replica {
    type Error = ConsentError;

    fn doc(&self, id: &DocId) -> Option<&Doc> {
        self.docs.get(id)
    }

    fn take_doc(&mut self, id: &DocId) -> Option<Doc> {
        self.docs.remove(id)
    }

    fn insert_doc(&mut self, doc: Doc) {
        let id = doc.doc_ref().doc_id();
        self.docs.insert(id, doc);
    }

    fn waiting(&mut self) -> &mut Waiting {
        &mut self.waiting
    }

    fn cursors(&mut self) -> &mut Cursors {
        &mut self.cursors
    }

    /// The document's changes in the order applied: a replica serves every peer that
    /// holds nothing the way a node serves one from its store.
    fn stored_from(&self, id: &DocId, from: u64) -> Result<Option<Stored>, ConsentError> {
        let Some(doc) = self.docs.get(id) else {
            return Ok(None);
        };
        let all = doc.changes();
        let from = usize::try_from(from).unwrap_or(usize::MAX).min(all.len());
        let mut out = Vec::new();
        let mut budget = ChunkBudget::default();
        for c in &all[from..] {
            let bytes = c.encode();
            if !budget.take(bytes.len()) {
                return Ok(Some((out, true)));
            }
            out.push(bytes);
        }
        Ok(Some((out, false)))
    }

    fn peer_heads(
        &self,
        id: &DocId,
        peer: &IdentityKey,
    ) -> Result<Option<Vec<ChangeHash>>, ConsentError> {
        Ok(self.heads.get(&(*id, *peer)).cloned())
    }

    fn put_peer_heads(
        &mut self,
        id: &DocId,
        peer: &IdentityKey,
        heads: &[ChangeHash],
    ) -> Result<(), ConsentError> {
        self.heads.insert((*id, *peer), heads.to_vec());
        Ok(())
    }

    fn peer_refused(
        &self,
        id: &DocId,
        peer: &IdentityKey,
    ) -> Result<HashSet<ChangeHash>, ConsentError> {
        Ok(self
            .refused_by
            .get(&(*id, *peer))
            .cloned()
            .unwrap_or_default())
    }

    fn put_peer_refused(
        &mut self,
        id: &DocId,
        peer: &IdentityKey,
        refused: &[(ChangeHash, RefusalKind)],
    ) -> Result<(), ConsentError> {
        if !refused.is_empty() {
            self.refused_by
                .entry((*id, *peer))
                .or_default()
                .extend(refused.iter().map(|(h, _)| *h));
        }
        Ok(())
    }

    fn conduct(&self, peer: &IdentityKey) -> Result<Conduct, ConsentError> {
        Ok(self.conduct.get(peer).copied().unwrap_or_default())
    }

    fn put_conduct(&mut self, peer: &IdentityKey, c: &Conduct) -> Result<(), ConsentError> {
        self.conduct.insert(*peer, *c);
        Ok(())
    }

    fn keep_refusal(
        &mut self,
        peer: &IdentityKey,
        doc: &DocRef,
        _change: Option<&SignedChange>,
        kind: RefusalKind,
        reason: &str,
        _now: UnixSeconds,
    ) -> Result<(), ConsentError> {
        if kind.is_strike() {
            self.evidence
                .push((*peer, doc.doc_id(), kind, reason.to_owned()));
        }
        Ok(())
    }

    fn persist(&mut self, _doc: &DocRef, _applied: &[ChangeHash]) -> Result<(), ConsentError> {
        Ok(())
    }

    fn react(
        &mut self,
        doc: &DocRef,
        _role: Role,
        from: &IdentityKey,
        _applied: &[ChangeHash],
        _new: bool,
        now: UnixSeconds,
    ) -> Result<Vec<Push>, ConsentError> {
        let DocRef::Consent(h) = doc else {
            return Ok(Vec::new());
        };
        if h.customer == self.me {
            // An acceptance may open relationships to the grantee: offer them.
            let offered = self
                .shared_with(from, now)
                .into_iter()
                .filter(|d| matches!(d, DocRef::Relationship(_)))
                .map(|d| (*from, d))
                .collect();
            return Ok(offered);
        }
        if self.erase_revoked(*h, now)? {
            return Ok(vec![(h.customer, *doc)]);
        }
        Ok(Vec::new())
    }

    fn told_refused(&mut self, peer: &IdentityKey, _doc: &DocRef, refusal: &PeerRefusal) {
        self.told.push((*peer, refusal.clone()));
    }

    fn failed(&self, _peer: &IdentityKey, _what: &str, _error: &ConsentError) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Peers that start cold syncs and never answer cannot grow what a holder keeps for
    /// them: past [`MAX_CURSORS`] the oldest goes.
    #[test]
    fn cold_syncs_followed_are_bounded_and_the_oldest_goes() {
        let mut cursors = Cursors::default();
        let peer = SecretKey::from_seed([7; 32]).identity();
        let doc = |i: usize| {
            let mut id = [0u8; 32];
            id[..8].copy_from_slice(&(i as u64).to_be_bytes());
            DocId(id)
        };
        let cursor = Cursor {
            sent: 1,
            heads: Vec::new(),
            more: true,
            age: 0,
        };
        for i in 0..MAX_CURSORS + 10 {
            cursors.put(doc(i), peer, cursor.clone());
        }
        assert_eq!(cursors.len(), MAX_CURSORS);
        assert!(cursors.get(&doc(0), &peer).is_none(), "the oldest went");
        assert!(cursors.get(&doc(MAX_CURSORS + 9), &peer).is_some());
        cursors.forget_doc(&doc(MAX_CURSORS + 9));
        assert!(cursors.get(&doc(MAX_CURSORS + 9), &peer).is_none());
    }
}
