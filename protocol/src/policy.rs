//! Every rule of who may do what, in one place a reader can audit: access (what a member of
//! a customer's relationship may read and write, decided from the consent ledger between
//! the customer and that member), the part a peer plays in a sync, whom an epoch is sealed
//! to, what a revocation erases, which purpose a message gets, the bounds on what a
//! stranger can make a node store, and strikes.
//!
//! Consent gates everything: without an active, accepted grant that covers the act, the
//! answer is no. Everything here is a pure function of the documents a node holds and the
//! time it is given; the node's sync ([`crate::replica`]) and its local writes ask these
//! questions and nothing else decides.

use std::collections::{BTreeSet, HashSet};

use automerge::ChangeHash;
use serde::{Deserialize, Serialize};

use crate::consent::{EntryId, GrantStatus, Ledger, UnixSeconds};
use crate::identity::IdentityKey;
use crate::relationship::{RelBody, RelEntry, RelHeader, RelationshipDoc};
use crate::scope::Scope;
use crate::signed::{DocId, SignedChange};
use crate::wire::{DocRef, RefusalCode};

// ----- limits -----

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
pub const MAX_WAITING_PER_DOC: usize = 1024;
/// The most bytes of changes waiting for their dependencies, over all documents.
pub const MAX_WAITING_BYTES: usize = 16 << 20;
/// The most relationships one owner may place on this node.
pub const MAX_RELS_PER_OWNER: usize = 100_000;

/// A document to sync with a peer, asked for after a change.
pub type Push = (IdentityKey, DocRef);

/// Why the owner's node refuses a member.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Denied {
    /// No consent document with this member at all.
    #[error("{member} holds no grant from the owner")]
    NoGrant {
        /// The member.
        member: String,
    },
    /// The member holds no active, accepted grant with this scope (none given, expired,
    /// not yet accepted, or revoked).
    #[error("{member} holds no active, accepted grant with {scope}")]
    Missing {
        /// The member.
        member: String,
        /// The scope needed.
        scope: Scope,
    },
    /// A member's message must say why it contacts the customer.
    #[error("a message from {member} must state its purpose (it needs contact:<purpose>)")]
    NoPurpose {
        /// The member.
        member: String,
    },
    /// A relationship owned by someone this node never agreed to hear from.
    #[error(
        "unsolicited: {owner} may not start a relationship with this node: it holds no active contact:<purpose> grant from it, and this node accepted no grant of conversation:read from it"
    )]
    Uninvited {
        /// The relationship's owner.
        owner: String,
    },
    /// The member's message is for a purpose the customer did not opt in to.
    #[error(
        "unsolicited: {member} wrote for purpose {purpose:?} without contact:{purpose}; the customer did not opt in"
    )]
    Unsolicited {
        /// The member.
        member: String,
        /// The message's purpose.
        purpose: String,
    },
}

fn need(
    consent: Option<&Ledger>,
    member: &IdentityKey,
    scope: Scope,
    now: UnixSeconds,
) -> Result<(), Denied> {
    let ledger = consent.ok_or_else(|| Denied::NoGrant {
        member: member.to_string(),
    })?;
    if ledger.holds(&scope, now) {
        Ok(())
    } else {
        Err(Denied::Missing {
            member: member.to_string(),
            scope,
        })
    }
}

/// May `member` read the owner's relationships at `now`? It needs `conversation:read`.
/// `consent` is the consent ledger in which the owner is the customer and `member` the
/// grantee.
pub fn may_read(
    consent: Option<&Ledger>,
    member: &IdentityKey,
    now: UnixSeconds,
) -> Result<(), Denied> {
    need(consent, member, Scope::ConversationRead, now)
}

/// May `member` write `entries` into the owner's relationship at `now`? Every write needs
/// `conversation:write`; a message needs a purpose P and `contact:P`.
pub fn may_write(
    consent: Option<&Ledger>,
    member: &IdentityKey,
    entries: &[&RelEntry],
    now: UnixSeconds,
) -> Result<(), Denied> {
    need(consent, member, Scope::ConversationWrite, now)?;
    for e in entries {
        if let RelBody::Message { purpose, .. } = &e.body {
            let purpose = purpose.as_ref().ok_or_else(|| Denied::NoPurpose {
                member: member.to_string(),
            })?;
            if need(consent, member, Scope::Contact(purpose.clone()), now).is_err() {
                return Err(Denied::Unsolicited {
                    member: member.to_string(),
                    purpose: purpose.clone(),
                });
            }
        }
    }
    Ok(())
}

/// May this node take (hold and apply) a relationship that `owner` owns, at `now`? Only by
/// its own act, never by the owner's word alone:
/// - it granted `owner` a `contact:<purpose>` scope that `owner` accepted and that is still
///   active (`to_owner`: the ledger in which this node is the customer and `owner` the
///   grantee): it opted in to hear from `owner`; or
/// - it accepted a grant in which `owner` gives it `conversation:read` (`from_owner`: the
///   ledger in which `owner` is the customer and this node the grantee): the owner invited
///   it to read, and accepting is this node's signed act (how one person joins another's
///   relationship).
///
/// Without either, a relationship naming this node is unsolicited contact: it is refused
/// and kept as evidence, like an unsolicited message.
pub fn may_take(
    from_owner: Option<&Ledger>,
    to_owner: Option<&Ledger>,
    me: &IdentityKey,
    owner: &IdentityKey,
    now: UnixSeconds,
) -> Result<(), Denied> {
    if may_read(from_owner, me, now).is_ok() {
        return Ok(());
    }
    let opted_in = to_owner.is_some_and(|l| {
        l.grants(now).iter().any(|g| {
            g.status == GrantStatus::Active
                && g.scopes.iter().any(|s| matches!(s, Scope::Contact(_)))
        })
    });
    if opted_in {
        Ok(())
    } else {
        Err(Denied::Uninvited {
            owner: owner.to_string(),
        })
    }
}

// ----- what the rules look at -----

/// What the rules need to know of the documents a node holds. Read-only: a rule decides,
/// its caller acts.
pub trait Holdings {
    /// This node's identity.
    fn me(&self) -> IdentityKey;
    /// The consent ledger between `customer` and `grantee`, if held.
    fn ledger(&self, customer: IdentityKey, grantee: IdentityKey) -> Option<&Ledger>;
    /// A relationship, if held.
    fn rel(&self, id: &DocId) -> Option<&RelationshipDoc>;
    /// Whether `who` is a member of relationship `id` now (added and not removed); `None`
    /// when the relationship is not held. A holder that indexes members answers without
    /// loading the relationship.
    fn rel_member(&self, id: &DocId, who: &IdentityKey) -> Option<bool> {
        self.rel(id).map(|r| r.is_member(who))
    }
    /// How many relationships `owner` owns on this node.
    fn rels_owned_by(&self, owner: &IdentityKey) -> usize;
    /// How many consent documents hold grants to this node that it never answered.
    fn unanswered_consents(&self) -> usize;
    /// See [`MAX_UNANSWERED_DOCS`]; a node may set a lower bound.
    fn max_unanswered_docs(&self) -> usize {
        MAX_UNANSWERED_DOCS
    }
}

// ----- sync -----

/// The part a peer plays for one document, from this node's side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The other party of a consent document.
    Party,
    /// This node owns the relationship; the peer is a member allowed to read it.
    Owner,
    /// The peer owns the relationship; this node is (or may become) a member.
    Member,
}

/// May this node sync `doc` with `peer` at `now`, and as what? Asked on every round, so a
/// revocation takes effect on open sessions at once.
///
/// - A consent document is synced only between its two parties, and started only by its
///   customer; a stranger's grants are bounded ([`MAX_UNANSWERED_CHANGES`] per document,
///   [`Holdings::max_unanswered_docs`] documents) until this node answers one.
/// - The owner serves a relationship only to a member holding an active, accepted grant of
///   `conversation:read` ([`serves`]).
/// - A member takes a relationship only from its owner, and only when it opted in
///   ([`may_take`]); at most [`MAX_RELS_PER_OWNER`] of them.
pub fn sync_role(
    h: &impl Holdings,
    peer: &IdentityKey,
    doc: &DocRef,
    now: UnixSeconds,
) -> Result<Role, (RefusalCode, String)> {
    let me = h.me();
    match doc {
        DocRef::Consent(c) => {
            if !((c.customer == me && c.grantee == *peer)
                || (c.grantee == me && c.customer == *peer))
            {
                return Err((
                    RefusalCode::Forbidden,
                    "a consent document is synced only between its two parties".into(),
                ));
            }
            let held = h.ledger(c.customer, c.grantee);
            if c.customer == me && held.is_none() {
                // Only a customer starts a consent document, with a grant.
                return Err((
                    RefusalCode::Forbidden,
                    "this node granted you nothing: there is no consent document to sync".into(),
                ));
            }
            if c.grantee == me && held.is_none_or(|l| !wrote_in(l, &me)) {
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
                    None if h.unanswered_consents() >= h.max_unanswered_docs() => {
                        return Err((
                            RefusalCode::RateLimited,
                            format!(
                                "this node holds {} consent documents it has not answered; try again later",
                                h.max_unanswered_docs()
                            ),
                        ));
                    }
                    _ => {}
                }
            }
            Ok(Role::Party)
        }
        DocRef::Relationship(r) if r.owner == me => {
            let Some(member) = h.rel_member(&r.doc_id(), peer) else {
                return Err((
                    RefusalCode::BadRequest,
                    format!("no relationship {} here", r.doc_id()),
                ));
            };
            serves_member(h, &r.doc_id(), member, peer, now)
                .map(|()| Role::Owner)
                .map_err(|why| (RefusalCode::Forbidden, why))
        }
        DocRef::Relationship(r) if r.owner == *peer => {
            may_take(h.ledger(r.owner, me), h.ledger(me, r.owner), &me, peer, now)
                .map_err(|d| (RefusalCode::Forbidden, d.to_string()))?;
            if h.rel_member(&r.doc_id(), &me).is_none()
                && h.rels_owned_by(&r.owner) >= MAX_RELS_PER_OWNER
            {
                return Err((
                    RefusalCode::RateLimited,
                    format!("this node holds {MAX_RELS_PER_OWNER} relationships of yours already"),
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

/// Whether this node (the owner) serves relationship `r` to `peer` now: a listed member
/// that may read ([`may_read`]).
pub fn serves(
    h: &impl Holdings,
    r: &RelationshipDoc,
    peer: &IdentityKey,
    now: UnixSeconds,
) -> Result<(), String> {
    serves_member(h, &r.id(), r.is_member(peer), peer, now)
}

/// [`serves`], given whether `peer` is a member of relationship `id` now.
fn serves_member(
    h: &impl Holdings,
    id: &DocId,
    member: bool,
    peer: &IdentityKey,
    now: UnixSeconds,
) -> Result<(), String> {
    if !member {
        return Err(format!("{peer} is not a member of relationship {id}"));
    }
    may_read(h.ledger(h.me(), *peer), peer, now).map_err(|e| e.to_string())
}

/// Whom a relationship's new changes go to: its owner, or (as the owner) every member it
/// serves now, except `skip`.
pub fn rel_pushes(
    h: &impl Holdings,
    header: &RelHeader,
    skip: Option<IdentityKey>,
    now: UnixSeconds,
) -> Vec<Push> {
    let d = DocRef::Relationship(*header);
    if header.owner != h.me() {
        return vec![(header.owner, d)];
    }
    let Some(r) = h.rel(&header.doc_id()) else {
        return Vec::new();
    };
    r.members()
        .map(|m| m.identity)
        .filter(|m| Some(*m) != skip && serves(h, r, m, now).is_ok())
        .map(|m| (m, d))
        .collect()
}

/// The owner's gate on a member's change to its relationship: the owner's own changes
/// pass; a member's must come from a current member and be allowed by [`may_write`].
/// `members` are the current (not removed) members.
pub fn owner_takes(
    h: &impl Holdings,
    members: &HashSet<IdentityKey>,
    author: &IdentityKey,
    entries: &[&RelEntry],
    now: UnixSeconds,
) -> Result<(), String> {
    let me = h.me();
    if *author == me {
        return Ok(());
    }
    if !members.contains(author) {
        return Err(format!("{author} is no longer a member"));
    }
    may_write(h.ledger(me, *author), author, entries, now).map_err(|e| e.to_string())
}

/// Whether `me` wrote any change of the ledger (accepted or acknowledged): until it has,
/// the customer is a stranger whose grants are bounded.
pub fn wrote_in(ledger: &Ledger, me: &IdentityKey) -> bool {
    let me = *me.as_bytes();
    ledger.changes().iter().any(|c| c.author_bytes() == &me)
}

/// How many more changes a stranger's consent document may take before this node answers.
pub fn stranger_room(ledger: &Ledger) -> usize {
    MAX_UNANSWERED_CHANGES.saturating_sub(ledger.changes().len())
}

/// The changes of `list` (in causal order) that may go to a peer that refused those in
/// `blocked` for good: every change it refused and every change built on one (it would
/// refuse those as missing dependencies) stay back.
pub fn unblocked(list: Vec<&SignedChange>, mut blocked: HashSet<ChangeHash>) -> Vec<&SignedChange> {
    if blocked.is_empty() {
        return list;
    }
    list.into_iter()
        .filter(|c| {
            let out = blocked.contains(&c.hash())
                || c.change().deps().iter().any(|d| blocked.contains(d));
            if out {
                blocked.insert(c.hash());
            }
            !out
        })
        .collect()
}

// ----- keys -----

/// Whom an epoch of `r` must be sealed to now: its owner and every current member it
/// serves ([`serves`]). A member whose grant ended reads nothing written after.
pub fn readers(h: &impl Holdings, r: &RelationshipDoc, now: UnixSeconds) -> BTreeSet<IdentityKey> {
    let mut set: BTreeSet<IdentityKey> = r
        .members()
        .filter(|m| m.removed_at.is_none() && serves(h, r, &m.identity, now).is_ok())
        .map(|m| m.identity)
        .collect();
    set.insert(r.header().owner);
    set
}

// ----- erasure -----

/// What a grantee owes after a revocation.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ErasureDue {
    /// Revoked grants not yet acknowledged: (grant, revocation).
    pub unacked: Vec<(EntryId, EntryId)>,
    /// Whether the relationships the customer owns must go: true unless another active
    /// grant still gives `conversation:read`.
    pub erase: bool,
}

/// As the grantee `me` of `ledger`, at `now`: which revocations to acknowledge, and whether
/// to delete what the customer shared. A revocation covers everything shared under
/// `conversation:read`; if another active grant still gives it, nothing goes, and the
/// acknowledgement says so.
pub fn erasure_due(ledger: &Ledger, me: &IdentityKey, now: UnixSeconds) -> ErasureDue {
    let unacked: Vec<(EntryId, EntryId)> = ledger
        .grants(UnixSeconds::MAX)
        .into_iter()
        .filter_map(|g| match (g.revoked, g.erasure_acked) {
            (Some((rid, at)), None) if at <= now => Some((g.id, rid)),
            _ => None,
        })
        .collect();
    if unacked.is_empty() {
        return ErasureDue::default();
    }
    let erase = may_read(Some(ledger), me, now).is_err();
    ErasureDue { unacked, erase }
}

// ----- purpose -----

/// Why a message has no purpose it may carry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PurposeError {
    /// The owner opted in to no contact from this node.
    #[error(
        "{owner} has not opted in to contact from you for any purpose (no active contact:<purpose> grant); nothing was sent"
    )]
    NotOptedIn {
        /// The relationship's owner.
        owner: String,
    },
    /// More than one purpose is open: the writer must say which.
    #[error("say why you write: --purpose one of {}", .0.join(", "))]
    Ambiguous(Vec<String>),
}

/// The purpose a message of `me` in a relationship of `owner` carries: the one given, none
/// when `me` is the owner, else the one purpose the owner opted in to hear about (from
/// `to_me`, the ledger in which `owner` is the customer and `me` the grantee).
pub fn message_purpose(
    me: &IdentityKey,
    owner: &IdentityKey,
    to_me: Option<&Ledger>,
    given: Option<String>,
    now: UnixSeconds,
) -> Result<Option<String>, PurposeError> {
    if let Some(p) = given {
        return Ok(Some(p.trim().to_owned()));
    }
    if owner == me {
        return Ok(None);
    }
    let mut open: Vec<String> = to_me
        .map(|l| {
            l.grants(now)
                .into_iter()
                .filter(|g| g.status == GrantStatus::Active)
                .flat_map(|g| g.scopes)
                .filter_map(|s| match s {
                    Scope::Contact(p) => Some(p),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    open.sort();
    open.dedup();
    match open.len() {
        0 => Err(PurposeError::NotOptedIn {
            owner: owner.to_string(),
        }),
        1 => Ok(open.pop()),
        _ => Err(PurposeError::Ambiguous(open)),
    }
}

// ----- strikes -----

/// How a peer has behaved: strikes in the current window and any ban.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conduct {
    /// Start of the current strike window (Unix seconds).
    pub since: u64,
    /// Strikes counted in the window.
    pub strikes: u32,
    /// Banned until then (Unix seconds); 0 when never banned.
    pub banned_until: u64,
}

impl Conduct {
    /// Counts one strike at `now`: a window older than [`STRIKE_WINDOW`] starts over; past
    /// [`MAX_STRIKES`] within it the peer is banned for [`BAN_SECONDS`] and the count
    /// restarts. Returns whether this strike banned the peer.
    pub fn strike(&mut self, now: UnixSeconds) -> bool {
        if self.strikes == 0 || now.saturating_sub(self.since) > STRIKE_WINDOW {
            self.since = now;
            self.strikes = 0;
        }
        self.strikes += 1;
        let ban = self.strikes > MAX_STRIKES;
        if ban {
            self.banned_until = now + BAN_SECONDS;
            self.strikes = 0;
        }
        ban
    }

    /// Whether the peer is banned at `now`.
    pub fn banned(&self, now: UnixSeconds) -> bool {
        self.banned_until > now
    }
}
