//! Content keys and sealed mail, on the engine. See `docs/security.md`.
//!
//! The owner of a relationship keeps one rule: the newest epoch is sealed to exactly the
//! owner and the members it serves now. When that set changes (a member added or removed, a
//! grant accepted, revoked or expired) the next write, revocation or deposit starts a new
//! epoch, whose key only the remaining readers receive ([`Engine::ensure_epoch`]).
//!
//! Changes leave this node in the clear only to members, over Noise. For a relay's mailbox
//! they are sealed ([`Engine::envelopes_for`]); mail fetched from a relay is opened and
//! then verified and applied exactly as changes from a direct peer ([`Engine::open_mail`]).

use std::collections::BTreeSet;

use rapport_protocol::automerge::ChangeHash;
use rapport_protocol::mail::{Envelope, envelope_batches};
use rapport_protocol::seal::{ContentKey, open_epoch, seal_epoch};
use rapport_protocol::wire::{DocRef, RefusalKind};
use rapport_protocol::{DocId, EpochView, IdentityKey, RelBody, RelationshipDoc, UnixSeconds};

use crate::engine::{Doc, Engine, EngineError, Push};

type Result<T> = std::result::Result<T, EngineError>;

/// What opening a batch of mail did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MailReport {
    /// Envelopes opened and taken.
    pub opened: usize,
    /// Changes newly applied from them.
    pub applied: usize,
    /// Envelopes or changes refused (kept as evidence in `rapport refusals`).
    pub refused: usize,
}

/// Mail sealed for one peer: encoded envelopes, and the heads the peer holds once it has
/// taken them.
#[derive(Debug, Default)]
pub struct Sealed {
    /// The encoded envelopes, in the order they must be applied.
    pub envelopes: Vec<Vec<u8>>,
    /// This node's heads for the document when sealed.
    pub heads: Vec<ChangeHash>,
}

impl Engine {
    /// Who an epoch of `r` must be sealed to now ([`policy::readers`]).
    fn readers(&self, r: &RelationshipDoc, now: UnixSeconds) -> BTreeSet<IdentityKey> {
        rapport_protocol::policy::readers(self, r, now)
    }

    /// As the owner of `id`: starts a new epoch when the newest one is not sealed to exactly
    /// the readers of now. Returns the pushes of the epoch entry, if one was written.
    pub fn ensure_epoch(&mut self, id: &DocId, now: UnixSeconds) -> Result<Vec<Push>> {
        let Some(r) = self.rel(id) else {
            return Ok(Vec::new());
        };
        if r.header().owner != self.me() {
            return Ok(Vec::new());
        }
        let readers = self.readers(r, now);
        if let Some(e) = r.latest_epoch().and_then(|n| r.epoch(n)) {
            let sealed: BTreeSet<IdentityKey> = e.slots.iter().map(|(m, _)| *m).collect();
            let held = self
                .keys
                .borrow()
                .get(id)
                .is_some_and(|k| k.contains_key(&e.epoch));
            if sealed == readers && held {
                return Ok(Vec::new());
            }
        }
        self.rotate(id, readers, now)
    }

    /// Writes a new epoch for `readers` and keeps its key.
    fn rotate(
        &mut self,
        id: &DocId,
        readers: BTreeSet<IdentityKey>,
        now: UnixSeconds,
    ) -> Result<Vec<Push>> {
        let Some(r) = self.rel(id) else {
            return Ok(Vec::new());
        };
        let next = match r.latest_epoch() {
            None => 0,
            Some(n) => n.checked_add(1).ok_or_else(|| {
                EngineError::Refused("this relationship has used every epoch number".into())
            })?,
        };
        let key = ContentKey::from_bytes(self.random()?);
        let list: Vec<IdentityKey> = readers.into_iter().collect();
        let sealed = seal_epoch(id, next, &key, self.random()?, &list);
        // The key is stored before the entry that announces it, so a crash in between
        // leaves at most an unused key, never an epoch this node cannot read.
        self.store().put_epoch_key(id, next, &key)?;
        self.keys
            .borrow_mut()
            .entry(*id)
            .or_default()
            .insert(next, key);
        let (_, pushes) = self.write_rel(*id, EpochView::body(next, &sealed), now)?;
        tracing::info!(doc = %id, epoch = next, recipients = list.len(), "new content-key epoch");
        Ok(pushes)
    }

    /// Opens and keeps the epoch keys of `id` sealed to this node that it does not hold yet.
    pub(crate) fn learn_keys(&mut self, id: &DocId) -> Result<()> {
        match self.rel(id) {
            Some(r) => self.learn_keys_of(r),
            None => Ok(()),
        }
    }

    /// Opens and keeps the epoch keys of `r` sealed to this node that it does not hold yet.
    pub(crate) fn learn_keys_of(&self, r: &RelationshipDoc) -> Result<()> {
        let id = r.id();
        let missing: Vec<u32> = {
            let keys = self.keys.borrow();
            let held = keys.get(&id);
            r.epoch_numbers()
                .filter(|n| !held.is_some_and(|k| k.contains_key(n)))
                .collect()
        };
        let me = self.me();
        let mut found = Vec::new();
        for n in missing {
            let Some(e) = r.epoch(n) else { continue };
            let Some(slot) = e.slot_for(&me) else {
                continue;
            };
            match open_epoch(&id, n, &e.eph, slot, &self.key) {
                Ok(k) => found.push((n, k)),
                Err(err) => {
                    tracing::warn!(doc = %id, epoch = n, "cannot open the key sealed to this node: {err}");
                }
            }
        }
        for (n, k) in found {
            match self.store().put_epoch_key(&id, n, &k) {
                // A read-only command keeps the key in memory; the next writable open stores it.
                Ok(()) | Err(crate::StoreError::ReadOnly(_)) => {}
                Err(e) => return Err(e.into()),
            }
            self.keys.borrow_mut().entry(id).or_default().insert(n, k);
        }
        Ok(())
    }

    /// The newest epoch of `r` this node holds a key for and `to` was sealed, if any.
    fn epoch_for(&self, r: &RelationshipDoc, to: &IdentityKey) -> Option<(u32, ContentKey)> {
        let keys = self.keys.borrow();
        keys.get(&r.id())?
            .iter()
            .rev()
            .find(|(n, _)| r.epoch(**n).is_some_and(|e| e.slot_for(to).is_some()))
            .map(|(n, k)| (*n, k.clone()))
    }

    /// Seals for `peer`'s mailbox the changes of `doc` it lacks, by the heads it last
    /// reported and what was deposited for it before. Nothing when the document is not
    /// shared with the peer now, or it lacks nothing. Relationship changes go under the
    /// newest epoch sealed to the peer; a batch that carries an epoch entry, and consent
    /// documents, are sealed to the peer directly. Returns the pushes of a new epoch, if
    /// the owner had to start one first.
    pub fn envelopes_for(
        &mut self,
        peer: &IdentityKey,
        doc: &DocRef,
        now: UnixSeconds,
    ) -> Result<(Sealed, Vec<Push>)> {
        if self.role(peer, doc, now).is_err() {
            return Ok((Sealed::default(), Vec::new()));
        }
        let id = doc.doc_id();
        let pushes = match doc {
            DocRef::Relationship(h) if h.owner == self.me() => self.ensure_epoch(&id, now)?,
            _ => Vec::new(),
        };
        let mut known = self.peer_heads(&id, peer)?.unwrap_or_default();
        if let Some(d) = self.deposited.get(&(id, *peer)) {
            known.extend(d.iter().copied());
        }
        // Each change, encoded, with whether it starts an epoch.
        let list: Vec<(Vec<u8>, bool)> = match self.doc(&id) {
            Some(Doc::Consent(c)) => c
                .changes_missing_from(&known)
                .into_iter()
                .map(|c| (c.encode(), false))
                .collect(),
            Some(Doc::Rel(r)) => r
                .changes_missing_from(&known)
                .into_iter()
                .map(|c| {
                    let epoch = r
                        .entries_of_change(&c.hash())
                        .iter()
                        .any(|(_, e)| matches!(e.body, RelBody::Epoch { .. }));
                    (c.encode(), epoch)
                })
                .collect(),
            None => Vec::new(),
        };
        if list.is_empty() {
            return Ok((Sealed::default(), pushes));
        }
        let epoch = match self.doc(&id) {
            Some(Doc::Rel(r)) => self.epoch_for(r, peer),
            _ => None,
        };
        let mut envelopes = Vec::new();
        for batch in envelope_batches(list, |(c, _)| c.len()) {
            let (batch, starts_epoch): (Vec<Vec<u8>>, Vec<bool>) = batch.into_iter().unzip();
            let direct = epoch.is_none() || starts_epoch.contains(&true);
            let env = match (&epoch, direct) {
                (Some((n, k)), false) => {
                    Envelope::seal_epoch(&self.key, *peer, *doc, *n, k, self.random()?, &batch)
                }
                _ => Envelope::seal_to(
                    &self.key,
                    *peer,
                    *doc,
                    self.random()?,
                    self.random()?,
                    &batch,
                ),
            }
            .map_err(|e| EngineError::Invalid(format!("cannot seal mail: {e}")))?;
            envelopes.push(env.encode());
        }
        Ok((
            Sealed {
                envelopes,
                heads: self.heads_of(&id),
            },
            pushes,
        ))
    }

    /// Records that `peer`'s mailbox holds `doc` up to `heads`.
    pub fn deposited(&mut self, peer: &IdentityKey, doc: &DocRef, heads: Vec<ChangeHash>) {
        self.deposited.insert((doc.doc_id(), *peer), heads);
    }

    /// Opens mail fetched from a relay and applies what it carries exactly as changes from a
    /// direct peer: the sender's signature on the envelope, then every change's signature,
    /// author and scope. What cannot be opened or does not check is kept as evidence.
    /// Returns what was done and the pushes that follow.
    pub fn open_mail(
        &mut self,
        items: &[Vec<u8>],
        now: UnixSeconds,
    ) -> Result<(MailReport, Vec<Push>)> {
        let mut report = MailReport::default();
        let mut pushes = Vec::new();
        for bytes in items {
            let env = match Envelope::decode(bytes) {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!("undecodable mail from the relay: {e}");
                    report.refused += 1;
                    continue;
                }
            };
            let id = env.doc.doc_id();
            let opened = env.open(&self.key, |n| {
                self.keys.borrow().get(&id).and_then(|k| k.get(&n)).cloned()
            });
            let changes = match opened {
                Ok(c) => c,
                Err(e) => {
                    let reason = format!("mail could not be opened: {e}");
                    let kind = RefusalKind::Invalid;
                    rapport_protocol::replica::refuse(
                        self, &env.from, &env.doc, None, kind, &reason, now,
                    )?;
                    report.refused += 1;
                    continue;
                }
            };
            let role = match self.role(&env.from, &env.doc, now) {
                Ok(r) => r,
                Err((_, why)) => {
                    let reason = format!("mail refused: {why}");
                    let kind = RefusalKind::Forbidden;
                    rapport_protocol::replica::refuse(
                        self, &env.from, &env.doc, None, kind, &reason, now,
                    )?;
                    report.refused += 1;
                    continue;
                }
            };
            let received =
                rapport_protocol::replica::receive(self, &env.from, &env.doc, role, changes, now)?;
            report.opened += 1;
            report.applied += received.applied.len();
            report.refused += received.refused.len();
            pushes.extend(received.pushes);
        }
        Ok((report, pushes))
    }

    /// The epochs of relationship `id` this node holds keys for.
    pub fn held_epochs(&self, id: &DocId) -> Vec<u32> {
        self.keys
            .borrow()
            .get(id)
            .map(|k| k.keys().copied().collect())
            .unwrap_or_default()
    }
}
