//! The sync rounds, on the engine: who may sync which document, what is sent, and what is
//! done with what arrives. See `docs/protocol.md`, "Sync".
//!
//! Consent gates everything. The owner of a relationship serves it only to members holding
//! an active, accepted grant with `conversation:read`, and applies a member's change only
//! under [`may_write`]. A member takes a relationship only from its owner. A consent
//! document is synced only between its two parties. Every check runs on every round, so a
//! revocation takes effect on open sessions at once.

use std::collections::HashSet;

use rapport_protocol::access::{may_read, may_take, may_write};
use rapport_protocol::automerge::ChangeHash;
use rapport_protocol::wire::{
    CHUNK_BYTES, DocRef, MAX_CHANGES_PER_MESSAGE, RefusalCode, RefusalKind, SyncRequest,
    SyncResponse,
};
use rapport_protocol::{
    ConsentDoc, IdentityKey, RelBody, RelEntry, RelError, RelationshipDoc, SignedChange,
    UnixSeconds, entry_texts,
};

use crate::engine::{
    BAN_SECONDS, Doc, Engine, EngineError, MAX_RELS_PER_OWNER, MAX_STRIKES, MAX_UNANSWERED_CHANGES,
    MAX_WAITING_BYTES, MAX_WAITING_PER_DOC, Push, RoundOutcome, STRIKE_WINDOW,
};
use crate::net::{PeerRefusal, Refused};
use crate::store::Refusal;
use crate::views::Event;

/// The part a peer plays for one document, from this node's side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// The other party of a consent document.
    Party,
    /// This node owns the relationship; the peer is a member allowed to read it.
    Owner,
    /// The peer owns the relationship; this node is (or may become) a member.
    Member,
}

/// What receiving a batch of changes did.
#[derive(Default)]
pub(crate) struct Received {
    pub(crate) applied: Vec<ChangeHash>,
    pub(crate) refused: Vec<(ChangeHash, RefusalKind, String)>,
    pub(crate) pushes: Vec<Push>,
    disconnect: bool,
    /// A new relationship arrived that does not name this node: it was not kept.
    discarded: bool,
}

/// Encoded changes for one message, whether more remain, and the hashes of those sent.
type Chunk = (Vec<Vec<u8>>, bool, Vec<ChangeHash>);

impl Engine {
    pub(crate) fn role(
        &self,
        peer: &IdentityKey,
        doc: &DocRef,
        now: UnixSeconds,
    ) -> Result<Role, (RefusalCode, String)> {
        let me = self.me();
        match doc {
            DocRef::Consent(h) => {
                if !((h.customer == me && h.grantee == *peer)
                    || (h.grantee == me && h.customer == *peer))
                {
                    return Err((
                        RefusalCode::Forbidden,
                        "a consent document is synced only between its two parties".into(),
                    ));
                }
                let held = self.ledger(h.customer, h.grantee);
                if h.customer == me && held.is_none() {
                    // Only a customer starts a consent document, with a grant.
                    return Err((
                        RefusalCode::Forbidden,
                        "this node granted you nothing: there is no consent document to sync"
                            .into(),
                    ));
                }
                if h.grantee == me && held.is_none_or(|l| !self.wrote_in(l)) {
                    // A stranger's grants: bounded until this node answers one of them.
                    match held {
                        Some(l) if l.changes().len() >= MAX_UNANSWERED_CHANGES => {
                            return Err((
                                RefusalCode::RateLimited,
                                format!(
                                    "this node holds {MAX_UNANSWERED_CHANGES} changes of yours it has not answered; it takes more once it accepts one of your grants"
                                ),
                            ));
                        }
                        None if self.unanswered_consents() >= self.max_unanswered_docs => {
                            return Err((
                                RefusalCode::RateLimited,
                                format!(
                                    "this node holds {} consent documents it has not answered; try again later",
                                    self.max_unanswered_docs
                                ),
                            ));
                        }
                        _ => {}
                    }
                }
                Ok(Role::Party)
            }
            DocRef::Relationship(h) if h.owner == me => {
                let Some(r) = self.rel(&h.doc_id()) else {
                    return Err((
                        RefusalCode::BadRequest,
                        format!("no relationship {} here", h.doc_id()),
                    ));
                };
                self.serves(r, peer, now)
                    .map(|()| Role::Owner)
                    .map_err(|why| (RefusalCode::Forbidden, why))
            }
            DocRef::Relationship(h) if h.owner == *peer => {
                may_take(
                    self.ledger(h.owner, me),
                    self.ledger(me, h.owner),
                    &me,
                    peer,
                    now,
                )
                .map_err(|d| (RefusalCode::Forbidden, d.to_string()))?;
                if self.rel(&h.doc_id()).is_none()
                    && self.rels_owned_by(&h.owner).len() >= MAX_RELS_PER_OWNER
                {
                    return Err((
                        RefusalCode::RateLimited,
                        format!(
                            "this node holds {MAX_RELS_PER_OWNER} relationships of yours already"
                        ),
                    ));
                }
                Ok(Role::Member)
            }
            DocRef::Relationship(_) => Err((
                RefusalCode::Forbidden,
                "a relationship is synced only between its owner and its members".into(),
            )),
        }
    }

    /// Builds the first (or next) request of a round with `peer` for `doc`: this node's
    /// heads, and the changes the peer lacks by the heads it last reported (all of them,
    /// cut to one message, on first contact). `None` when this
    /// node may not or need not sync the document with the peer.
    pub fn start_round(
        &mut self,
        peer: &IdentityKey,
        doc: &DocRef,
        now: UnixSeconds,
    ) -> Result<Option<SyncRequest>, EngineError> {
        Ok(self.round_request(peer, doc, now)?.map(|(req, _)| req))
    }

    /// [`Engine::start_round`], with the hashes of the changes the request carries (what
    /// `handle_response` needs to know what the peer refused).
    pub fn round_request(
        &mut self,
        peer: &IdentityKey,
        doc: &DocRef,
        now: UnixSeconds,
    ) -> Result<Option<(SyncRequest, Vec<ChangeHash>)>, EngineError> {
        if self.role(peer, doc, now).is_err() {
            return Ok(None);
        }
        let id = doc.doc_id();
        if !self.holds(&id) {
            return Ok(None);
        }
        // The heads the peer last proved it holds are a hint of what it lacks; never synced
        // with this peer: it most likely lacks the document, so the first round carries its
        // first chunk instead of costing a round trip to find out.
        let known = self.store().peer_heads(&id, peer)?.unwrap_or_default();
        let (changes, _, sent) = self.encoded_missing(&id, peer, &known, &HashSet::new())?;
        Ok(Some((
            SyncRequest {
                doc: *doc,
                heads: self.heads_of(&id),
                changes,
            },
            sent,
        )))
    }

    /// Answers a peer's request: checks access, applies and stores its changes (each one
    /// checked), and returns the changes it lacks. The second value lists pushes to make;
    /// the third says the peer passed the misbehaviour limit and must be disconnected.
    pub fn handle_request(
        &mut self,
        peer: &IdentityKey,
        req: SyncRequest,
        now: UnixSeconds,
    ) -> (SyncResponse, Vec<Push>, bool) {
        let role = match self.role(peer, &req.doc, now) {
            Ok(r) => r,
            Err((code, detail)) => {
                let disconnect = match self.refused_whole(peer, &req, code, &detail, now) {
                    Ok(d) => d,
                    Err(e) => {
                        tracing::warn!(%peer, "could not record a refusal: {e}");
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
        let received = match self.receive(peer, &req.doc, role, req.changes, now) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(%peer, "sync request failed: {e}");
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
        let just: HashSet<ChangeHash> = received.applied.iter().copied().collect();
        // The requester holds at least the history of the heads it reports. When it reports
        // heads we do not know (it holds changes we lack), that history is partly unknown
        // to us, so also count what we recorded it holding before; otherwise a cold sync in
        // several rounds would send earlier rounds' changes back.
        let mut basis = req.heads.clone();
        if req.heads.iter().any(|h| !self.has_change(&id, h))
            && let Ok(Some(before)) = self.store().peer_heads(&id, peer)
        {
            basis.extend(before);
        }
        let (changes, more) = if self.holds(&id) {
            match self.encoded_missing(&id, peer, &basis, &just) {
                Ok((changes, more, _)) => (changes, more),
                Err(e) => {
                    tracing::warn!(%peer, "sync request failed: {e}");
                    return (
                        SyncResponse::Refused {
                            code: RefusalCode::Unavailable,
                            detail: "this node could not read its store; try again later".into(),
                        },
                        received.pushes,
                        received.disconnect,
                    );
                }
            }
        } else {
            (Vec::new(), false)
        };
        let heads = self.heads_of(&id);
        // Record only what the requester proved it holds. Whether it stores this answer is
        // up to it (it may crash first); the heads it reports next time say.
        if self.holds(&id)
            && let Err(e) = self.store().put_peer_heads(&id, peer, &req.heads)
        {
            tracing::warn!("could not record peer heads: {e}");
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
    /// we hold changes because of what a peer answers (its answer is only a hint).
    pub fn handle_response(
        &mut self,
        peer: &IdentityKey,
        doc: &DocRef,
        sent: &[ChangeHash],
        resp: SyncResponse,
        now: UnixSeconds,
    ) -> Result<(RoundOutcome, Vec<Push>), EngineError> {
        let mut out = RoundOutcome::default();
        let (heads, changes, more, refused) = match resp {
            SyncResponse::Refused { code, detail } => {
                tracing::info!(%peer, doc = %doc.doc_id(), ?code, "peer refused sync: {detail}");
                self.emit(Event::PeerRefused {
                    peer: *peer,
                    doc: doc.doc_id(),
                    change: None,
                    reason: detail.clone(),
                });
                out.refused.push(PeerRefusal {
                    what: Refused::Request { code },
                    reason: detail,
                });
                return Ok((out, Vec::new()));
            }
            SyncResponse::Sync {
                heads,
                changes,
                more,
                refused,
            } => (heads, changes, more, refused),
        };
        let Ok(role) = self.role(peer, doc, now) else {
            // Access ended while the round was under way (a revocation): take nothing.
            return Ok((out, Vec::new()));
        };
        let received = self.receive(peer, doc, role, changes, now)?;
        out.received = received.applied.len();
        out.disconnect = received.disconnect;
        let pushes = received.pushes;
        let id = doc.doc_id();
        let sent: HashSet<&ChangeHash> = sent.iter().collect();
        let mut for_good = Vec::new();
        for (hash, kind, reason) in refused {
            if !sent.contains(&hash) {
                continue;
            }
            if kind.is_transient() {
                // It waits there for its dependencies: they go in the next round.
                continue;
            }
            self.emit(Event::PeerRefused {
                peer: *peer,
                doc: id,
                change: Some(hash.to_string()),
                reason: reason.clone(),
            });
            out.refused.push(PeerRefusal {
                what: Refused::Change {
                    change: hash.to_string(),
                    kind,
                },
                reason,
            });
            for_good.push((hash, kind));
        }
        if !self.holds(&id) {
            return Ok((out, pushes));
        }
        self.store().put_peer_refused(&id, peer, &for_good)?;
        let before = self.store().peer_heads(&id, peer)?;
        out.peer_moved = before.as_deref() != Some(&heads[..]);
        // The responder stored what it applied before answering: its heads are what it
        // holds now.
        self.store().put_peer_heads(&id, peer, &heads)?;
        let unsent = !self.to_send(&id, peer, &heads)?.is_empty();
        out.again = more || unsent;
        Ok((out, pushes))
    }

    /// The changes of `id` to send `peer`, whose heads are `heads`: those not in the history
    /// of `heads`, less the ones `peer` refused for good and every change built on them
    /// (it would refuse those as missing dependencies). In a causal order.
    fn to_send(
        &self,
        id: &rapport_protocol::DocId,
        peer: &IdentityKey,
        heads: &[ChangeHash],
    ) -> Result<Vec<&SignedChange>, EngineError> {
        let list: Vec<&SignedChange> = match self.doc(id) {
            Some(Doc::Consent(c)) => c.changes_missing_from(heads),
            Some(Doc::Rel(r)) => r.changes_missing_from(heads),
            None => Vec::new(),
        };
        if list.is_empty() {
            return Ok(list);
        }
        let mut blocked = self.store().peer_refused(id, peer)?;
        if blocked.is_empty() {
            return Ok(list);
        }
        Ok(list
            .into_iter()
            .filter(|c| {
                let out = blocked.contains(&c.hash())
                    || c.change().deps().iter().any(|d| blocked.contains(d));
                if out {
                    blocked.insert(c.hash());
                }
                !out
            })
            .collect())
    }

    /// [`to_send`](Self::to_send) less `skip`, encoded, cut to one message's worth
    /// ([`CHUNK_BYTES`], at least one change). The flag says more remain; the hashes are
    /// those of the changes in the chunk.
    fn encoded_missing(
        &self,
        id: &rapport_protocol::DocId,
        peer: &IdentityKey,
        heads: &[ChangeHash],
        skip: &HashSet<ChangeHash>,
    ) -> Result<Chunk, EngineError> {
        let list = self.to_send(id, peer, heads)?;
        let mut out = Vec::new();
        let mut hashes = Vec::new();
        let mut size = 0;
        let mut rest = list.into_iter().filter(|c| !skip.contains(&c.hash()));
        for c in rest.by_ref() {
            let bytes = c.encode();
            size += bytes.len() + 4;
            out.push(bytes);
            hashes.push(c.hash());
            if size >= CHUNK_BYTES || out.len() >= MAX_CHANGES_PER_MESSAGE {
                break;
            }
        }
        let more = rest.next().is_some();
        Ok((out, more, hashes))
    }

    /// A request refused whole. A relationship its owner pushes to a node that never agreed
    /// to hear from it is unsolicited contact: kept as evidence (its first change) and
    /// counted against the peer, like an unsolicited message. Returns whether to disconnect.
    fn refused_whole(
        &mut self,
        peer: &IdentityKey,
        req: &SyncRequest,
        code: RefusalCode,
        detail: &str,
        now: UnixSeconds,
    ) -> Result<bool, EngineError> {
        let unsolicited = code == RefusalCode::Forbidden
            && matches!(req.doc, DocRef::Relationship(h) if h.owner == *peer);
        if !unsolicited || req.changes.is_empty() {
            return Ok(false);
        }
        let first = req
            .changes
            .iter()
            .find_map(|b| SignedChange::decode(b).ok());
        let mut out = Received::default();
        self.refuse(
            peer,
            &req.doc,
            first.as_ref(),
            RefusalKind::Forbidden,
            detail,
            now,
            &mut out,
        )?;
        Ok(out.disconnect)
    }

    /// Keeps a change whose dependencies have not arrived, until the same peer sends more
    /// of the document. Bounded: past [`MAX_WAITING_PER_DOC`] a document's oldest goes, past
    /// [`MAX_WAITING_BYTES`] whole queues go. Not durable: nothing waiting was acknowledged,
    /// and the sender still holds it and sends it again with its dependencies.
    fn wait(&mut self, doc: rapport_protocol::DocId, peer: IdentityKey, change: SignedChange) {
        let size = change.encode().len();
        let list = self.waiting.entry((doc, peer)).or_default();
        if list.iter().any(|c| c.hash() == change.hash()) {
            return;
        }
        list.push(change);
        self.waiting_bytes += size;
        if list.len() > MAX_WAITING_PER_DOC {
            let gone = list.remove(0);
            self.waiting_bytes -= gone.encode().len();
        }
        while self.waiting_bytes > MAX_WAITING_BYTES {
            let Some(key) = self.waiting.keys().next().copied() else {
                break;
            };
            for c in self.waiting.remove(&key).unwrap_or_default() {
                self.waiting_bytes -= c.encode().len();
            }
        }
    }

    /// The changes of `peer` waiting for their dependencies in `doc`.
    fn take_waiting(
        &mut self,
        doc: &rapport_protocol::DocId,
        peer: &IdentityKey,
    ) -> Vec<SignedChange> {
        let list = self.waiting.remove(&(*doc, *peer)).unwrap_or_default();
        for c in &list {
            self.waiting_bytes -= c.encode().len();
        }
        list
    }

    /// Whether this node wrote any change of the ledger (accepted or acknowledged).
    fn wrote_in(&self, ledger: &rapport_protocol::Ledger) -> bool {
        let me = *self.me().as_bytes();
        ledger.changes().iter().any(|c| c.author_bytes() == &me)
    }

    /// How many consent documents hold grants to this node that it never answered.
    fn unanswered_consents(&self) -> usize {
        let me = self.me();
        self.unanswered_consent_count(&me)
    }

    pub(crate) fn heads_of(&self, id: &rapport_protocol::DocId) -> Vec<ChangeHash> {
        match self.doc(id) {
            Some(Doc::Consent(c)) => c.heads(),
            Some(Doc::Rel(r)) => r.heads(),
            None => Vec::new(),
        }
    }

    fn has_change(&self, id: &rapport_protocol::DocId, h: &ChangeHash) -> bool {
        match self.doc(id) {
            Some(Doc::Consent(c)) => c.ledger().has_change(h),
            Some(Doc::Rel(r)) => r.has_change(h),
            None => false,
        }
    }

    fn holds(&self, id: &rapport_protocol::DocId) -> bool {
        self.holds_doc(id)
    }

    /// Verifies, checks, applies and stores changes from `peer`; records refusals.
    pub(crate) fn receive(
        &mut self,
        peer: &IdentityKey,
        doc: &DocRef,
        role: Role,
        raw: Vec<Vec<u8>>,
        now: UnixSeconds,
    ) -> Result<Received, EngineError> {
        let mut out = Received::default();
        if raw.is_empty() {
            return Ok(out);
        }
        let id = doc.doc_id();
        let mut changes = Vec::with_capacity(raw.len());
        for bytes in &raw {
            match SignedChange::decode(bytes) {
                Ok(c) => changes.push(c),
                Err(e) => {
                    let reason = format!("undecodable change: {e}");
                    let kind = RefusalKind::Invalid;
                    self.refuse(peer, doc, None, kind, &reason, now, &mut out)?;
                    out.refused.push((ChangeHash([0; 32]), kind, reason));
                }
            }
        }
        // Changes of this peer that came before what they depend on get another chance.
        changes.extend(self.take_waiting(&id, peer));
        let by_hash: std::collections::HashMap<ChangeHash, SignedChange> =
            changes.iter().map(|c| (c.hash(), c.clone())).collect();
        let rejected: Vec<(ChangeHash, RefusalKind, String)> = match (doc, role) {
            (DocRef::Consent(h), _) => {
                let mut c = match self.take_doc(&id) {
                    Some(Doc::Consent(c)) => c,
                    _ => ConsentDoc::new(*h).map_err(|e| EngineError::Invalid(e.to_string()))?,
                };
                let mut changes = changes;
                if h.grantee == self.me() && !self.wrote_in(c.ledger()) {
                    // A stranger's grants: at most what the bound leaves room for.
                    let room = MAX_UNANSWERED_CHANGES.saturating_sub(c.ledger().changes().len());
                    for extra in changes.split_off(room.min(changes.len())) {
                        let reason = format!(
                            "over the {MAX_UNANSWERED_CHANGES} changes this node keeps from you before it answers"
                        );
                        out.refused
                            .push((extra.hash(), RefusalKind::Forbidden, reason));
                    }
                }
                let report = c.apply(changes);
                out.applied = report.applied;
                if !c.ledger().changes().is_empty() {
                    self.insert_doc(Doc::Consent(c));
                }
                report
                    .rejected
                    .into_iter()
                    .map(|(h, e)| (h, e.refusal_kind(), e.to_string()))
                    .collect()
            }
            (DocRef::Relationship(_), Role::Owner) => {
                let Some(Doc::Rel(mut r)) = self.take_doc(&id) else {
                    return Ok(out);
                };
                let me = self.me();
                let members: HashSet<IdentityKey> = r
                    .members()
                    .filter(|m| m.removed_at.is_none())
                    .map(|m| m.identity)
                    .collect();
                let report = r.apply_gated(changes, |author, entries| {
                    if *author == me {
                        return Ok(());
                    }
                    if !members.contains(author) {
                        return Err(format!("{author} is no longer a member"));
                    }
                    let list: Vec<&RelEntry> = entries.iter().map(|(_, e)| e).collect();
                    may_write(self.ledger(me, *author), author, &list, now)
                        .map_err(|e| e.to_string())
                });
                out.applied = report.applied;
                self.insert_doc(Doc::Rel(r));
                rel_rejections(report.rejected)
            }
            (DocRef::Relationship(h), _) => {
                let existed = self.holds(&id);
                let mut r = match self.take_doc(&id) {
                    Some(Doc::Rel(r)) => r,
                    _ => RelationshipDoc::new(*h),
                };
                let report = r.apply(changes);
                if !existed && !r.is_member(&self.me()) {
                    // Not ours to keep: a relationship only its members hold.
                    out.discarded = true;
                    out.applied.clear();
                    return Ok(out);
                }
                out.applied = report.applied;
                if !r.changes().is_empty() {
                    self.insert_doc(Doc::Rel(r));
                }
                if !existed && !out.applied.is_empty() {
                    self.emit(Event::Relationship {
                        rel: id,
                        owner: h.owner,
                    });
                }
                rel_rejections(report.rejected)
            }
        };
        self.persist(doc, &out.applied)?;
        if matches!(doc, DocRef::Relationship(_)) && !out.applied.is_empty() {
            self.learn_keys(&id)?;
        }
        for (hash, kind, reason) in rejected {
            let change = by_hash.get(&hash);
            if kind.is_transient()
                && let Some(c) = change
            {
                self.wait(id, *peer, c.clone());
            }
            self.refuse(peer, doc, change, kind, &reason, now, &mut out)?;
            out.refused.push((hash, kind, reason));
        }
        if out.applied.is_empty() {
            return Ok(out);
        }
        match doc {
            DocRef::Consent(h) => {
                let pushes = self.after_consent(*h, now)?;
                out.pushes.extend(pushes);
            }
            DocRef::Relationship(h) => {
                if let Some(r) = self.rel(&id) {
                    let mut msgs = Vec::new();
                    for hash in &out.applied {
                        for (eid, e) in r.entries_of_change(hash) {
                            if matches!(e.body, RelBody::Message { .. }) {
                                msgs.push(eid);
                            }
                        }
                    }
                    for m in msgs {
                        if let Some(v) = self.rel(&id).and_then(|r| self.message_view(r, m)) {
                            self.emit(Event::Message(v));
                        }
                    }
                }
                if role == Role::Owner {
                    out.pushes.extend(self.rel_pushes(h, Some(*peer), now));
                }
            }
        }
        Ok(out)
    }

    /// Records one refused change as evidence and counts it against the peer. A change
    /// that waits for its dependencies is neither: an honest peer sends them next round.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn refuse(
        &mut self,
        peer: &IdentityKey,
        doc: &DocRef,
        change: Option<&SignedChange>,
        kind: RefusalKind,
        reason: &str,
        now: UnixSeconds,
        out: &mut Received,
    ) -> Result<(), EngineError> {
        let hash = change.map(|c| c.hash().to_string()).unwrap_or_default();
        tracing::info!(%peer, doc = %doc.doc_id(), %kind, "refused change {hash}: {reason}");
        if !kind.is_strike() {
            return Ok(());
        }
        let record = Refusal {
            at: now,
            peer: *peer,
            doc: doc.doc_id(),
            change: hash,
            author: change.and_then(|c| {
                IdentityKey::from_bytes(c.author_bytes())
                    .ok()
                    .map(|k| k.to_string())
            }),
            reason: reason.to_owned(),
            kind: Some(kind),
            entries: change.map(entry_texts).unwrap_or_default(),
            signed_change: change
                .map(SignedChange::encode)
                .filter(|b| b.len() <= 64 * 1024)
                .map(hex::encode),
        };
        self.store().add_refusal(&record)?;
        self.emit(Event::Refused(record));
        if self.strike(peer, now)? {
            out.disconnect = true;
        }
        Ok(())
    }

    /// Counts one strike against `peer`, durably; past [`MAX_STRIKES`] within
    /// [`STRIKE_WINDOW`] the peer is banned for [`BAN_SECONDS`] (returns true).
    pub(crate) fn strike(
        &mut self,
        peer: &IdentityKey,
        now: UnixSeconds,
    ) -> Result<bool, EngineError> {
        let mut c = self.store().conduct(peer)?.unwrap_or_default();
        if c.strikes == 0 || now.saturating_sub(c.since) > STRIKE_WINDOW {
            c.since = now;
            c.strikes = 0;
        }
        c.strikes += 1;
        let ban = c.strikes > MAX_STRIKES;
        if ban {
            c.banned_until = now + BAN_SECONDS;
            c.strikes = 0;
        }
        self.store().put_conduct(peer, &c)?;
        Ok(ban)
    }

    /// Whether the customer's grants let `member` read now (used by the API for views).
    pub fn member_reads(&self, member: &IdentityKey, now: UnixSeconds) -> bool {
        may_read(self.ledger(self.me(), *member), member, now).is_ok()
    }
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
