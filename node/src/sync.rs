//! The engine as a [`Holder`] of the sync rounds of [`rapport_protocol::replica`]: the
//! rounds and every rule they ask ([`rapport_protocol::policy`]) live in the protocol crate;
//! here the engine keeps what they decide (in its store), logs and raises events. See
//! `docs/protocol.md`, "Sync".

use std::collections::HashSet;

use rapport_protocol::automerge::ChangeHash;
use rapport_protocol::policy::{self, Conduct, Holdings, Role, may_read};
use rapport_protocol::replica::{
    self, CheckedRequest, Cursors, Doc, Holder, PeerRefusal, Refused, Stored, Waiting,
};
use rapport_protocol::wire::{DocRef, RefusalKind, SyncRequest, SyncResponse};
use rapport_protocol::{
    DocId, IdentityKey, Ledger, RelBody, RelationshipDoc, SignedChange, UnixSeconds, entry_texts,
};

use crate::engine::{Engine, EngineError, Push, RoundOutcome};
use crate::store::Refusal;
use crate::views::Event;

impl Holdings for Engine {
    fn me(&self) -> IdentityKey {
        Engine::me(self)
    }

    fn ledger(&self, customer: IdentityKey, grantee: IdentityKey) -> Option<&Ledger> {
        Engine::ledger(self, customer, grantee)
    }

    fn rel(&self, id: &DocId) -> Option<&RelationshipDoc> {
        Engine::rel(self, id)
    }

    fn rel_member(&self, id: &DocId, who: &IdentityKey) -> Option<bool> {
        self.indexed_member(id, who)
    }

    fn rels_owned_by(&self, owner: &IdentityKey) -> usize {
        Engine::rels_owned_count(self, owner)
    }

    fn unanswered_consents(&self) -> usize {
        self.unanswered_consent_count(&Engine::me(self))
    }

    fn max_unanswered_docs(&self) -> usize {
        self.max_unanswered_docs
    }
}

impl Holder for Engine {
    type Error = EngineError;

    fn doc(&self, id: &DocId) -> Option<&Doc> {
        Engine::doc(self, id)
    }

    fn take_doc(&mut self, id: &DocId) -> Option<Doc> {
        Engine::take_doc(self, id)
    }

    fn insert_doc(&mut self, doc: Doc) {
        Engine::insert_doc(self, doc);
    }

    fn waiting(&mut self) -> &mut Waiting {
        &mut self.waiting
    }

    fn cursors(&mut self) -> &mut Cursors {
        &mut self.cursors
    }

    fn holds(&self, id: &DocId) -> bool {
        self.holds_doc(id)
    }

    fn stored_from(&self, id: &DocId, from: u64) -> Result<Option<Stored>, EngineError> {
        if self.is_loaded(id) {
            return Ok(None);
        }
        Ok(Some(self.store().changes_raw(id, from)?))
    }

    fn peer_heads(
        &self,
        id: &DocId,
        peer: &IdentityKey,
    ) -> Result<Option<Vec<ChangeHash>>, EngineError> {
        Engine::peer_heads(self, id, peer)
    }

    fn put_peer_heads(
        &mut self,
        id: &DocId,
        peer: &IdentityKey,
        heads: &[ChangeHash],
    ) -> Result<(), EngineError> {
        self.record_peer_heads(id, peer, heads)
    }

    fn peer_refused(
        &self,
        id: &DocId,
        peer: &IdentityKey,
    ) -> Result<HashSet<ChangeHash>, EngineError> {
        Ok(self.store().peer_refused(id, peer)?)
    }

    fn put_peer_refused(
        &mut self,
        id: &DocId,
        peer: &IdentityKey,
        refused: &[(ChangeHash, RefusalKind)],
    ) -> Result<(), EngineError> {
        Ok(self.store().put_peer_refused(id, peer, refused)?)
    }

    fn conduct(&self, peer: &IdentityKey) -> Result<Conduct, EngineError> {
        Ok(self.store().conduct(peer)?.unwrap_or_default())
    }

    fn put_conduct(&mut self, peer: &IdentityKey, c: &Conduct) -> Result<(), EngineError> {
        Ok(self.store().put_conduct(peer, c)?)
    }

    fn keep_refusal(
        &mut self,
        peer: &IdentityKey,
        doc: &DocRef,
        change: Option<&SignedChange>,
        kind: RefusalKind,
        reason: &str,
        now: UnixSeconds,
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
        Ok(())
    }

    fn persist(&mut self, doc: &DocRef, applied: &[ChangeHash]) -> Result<(), EngineError> {
        Engine::persist(self, doc, applied)?;
        if matches!(doc, DocRef::Relationship(_)) && !applied.is_empty() {
            self.learn_keys(&doc.doc_id())?;
        }
        Ok(())
    }

    fn react(
        &mut self,
        doc: &DocRef,
        _role: Role,
        _from: &IdentityKey,
        applied: &[ChangeHash],
        new: bool,
        now: UnixSeconds,
    ) -> Result<Vec<Push>, EngineError> {
        let id = doc.doc_id();
        match doc {
            DocRef::Consent(h) => self.after_consent(*h, now),
            DocRef::Relationship(h) => {
                if new {
                    self.emit(Event::Relationship {
                        rel: id,
                        owner: h.owner,
                    });
                }
                // A view per message, for the API's listeners; none listening, none built.
                if !self.listened() {
                    return Ok(Vec::new());
                }
                if let Some(r) = Engine::rel(self, &id) {
                    for hash in applied {
                        for (eid, e) in r.entries_of_change(hash) {
                            if matches!(e.body, RelBody::Message { .. })
                                && let Some(v) = self.message_view(r, eid)
                            {
                                self.emit(Event::Message(v));
                            }
                        }
                    }
                }
                Ok(Vec::new())
            }
        }
    }

    fn told_refused(&mut self, peer: &IdentityKey, doc: &DocRef, refusal: &PeerRefusal) {
        let change = match &refusal.what {
            Refused::Request { code } => {
                tracing::info!(%peer, doc = %doc.doc_id(), ?code, "peer refused sync: {}", refusal.reason);
                None
            }
            Refused::Change { change, .. } => Some(change.clone()),
        };
        self.emit(Event::PeerRefused {
            peer: *peer,
            doc: doc.doc_id(),
            change,
            reason: refusal.reason.clone(),
        });
    }

    fn failed(&self, peer: &IdentityKey, what: &str, error: &EngineError) {
        tracing::warn!(%peer, "{what} failed: {error}");
    }
}

impl Engine {
    /// Builds the first (or next) request of a round with `peer` for `doc`: this node's
    /// heads, and the changes the peer lacks by the heads it last reported (all of them,
    /// cut to one message, on first contact). `None` when this node may not or need not
    /// sync the document with the peer.
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
        replica::round_request(self, peer, doc, now)
    }

    /// Answers a peer's request ([`replica::handle_request`]): the response, the pushes to
    /// make, and whether the peer passed the misbehaviour limit. The request may have been
    /// checked ahead ([`replica::check_requests`]), or be a plain [`SyncRequest`].
    pub fn handle_request(
        &mut self,
        peer: &IdentityKey,
        req: impl Into<CheckedRequest>,
        now: UnixSeconds,
    ) -> (SyncResponse, Vec<Push>, bool) {
        replica::handle_request(self, peer, req, now)
    }

    /// [`Engine::handle_request`] for one round of a batch of `rounds`: its answer carries
    /// at most its share of a message ([`rapport_protocol::wire::batch_answer_bytes`]).
    pub fn handle_batch_round(
        &mut self,
        peer: &IdentityKey,
        req: impl Into<CheckedRequest>,
        now: UnixSeconds,
        rounds: usize,
    ) -> (SyncResponse, Vec<Push>, bool) {
        let limit = rapport_protocol::wire::batch_answer_bytes(rounds);
        replica::handle_request_within(self, peer, req, now, limit)
    }

    /// Takes the peer's answer to a request of ours ([`replica::handle_response`]).
    /// `sent` lists the changes the request carried.
    pub fn handle_response(
        &mut self,
        peer: &IdentityKey,
        doc: &DocRef,
        sent: &[ChangeHash],
        resp: SyncResponse,
        now: UnixSeconds,
    ) -> Result<(RoundOutcome, Vec<Push>), EngineError> {
        replica::handle_response(self, peer, doc, sent, resp, now)
    }

    /// The part `peer` plays for `doc` ([`policy::sync_role`]).
    pub(crate) fn role(
        &self,
        peer: &IdentityKey,
        doc: &DocRef,
        now: UnixSeconds,
    ) -> Result<Role, (rapport_protocol::wire::RefusalCode, String)> {
        policy::sync_role(self, peer, doc, now)
    }

    /// This node's heads of `id`.
    pub(crate) fn heads_of(&self, id: &DocId) -> Vec<ChangeHash> {
        Engine::doc(self, id).map(Doc::heads).unwrap_or_default()
    }

    /// Whether the customer's grants let `member` read now (used by the API for views).
    pub fn member_reads(&self, member: &IdentityKey, now: UnixSeconds) -> bool {
        may_read(Engine::ledger(self, Engine::me(self), *member), member, now).is_ok()
    }
}
