//! What the node shows: the JSON shapes of the local API and its event stream. The CLI
//! reads the same types back.

use std::collections::BTreeMap;

use rapport_protocol::{DocId, EntryId, GrantView, IdentityKey, UnixSeconds};
use serde::{Deserialize, Serialize};

use crate::net::SyncResult;
use crate::store::Refusal;

/// One grant as listed by `rapport consent list --json` and `GET /v1/consent`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantRow {
    /// The grant id (hex).
    pub grant: EntryId,
    /// `granted` (this node gave it) or `held` (this node holds it).
    pub role: String,
    /// The other party.
    pub peer: IdentityKey,
    /// `pending`, `active`, `expired` or `revoked`.
    pub status: String,
    /// Scopes in effect.
    pub scopes: Vec<String>,
    /// Purpose.
    pub purpose: String,
    /// Legal basis.
    pub legal_basis: String,
    /// Terms id.
    pub terms: String,
    /// When granted.
    pub granted_at: UnixSeconds,
    /// When it ends.
    pub expires: Option<UnixSeconds>,
    /// When accepted.
    pub accepted_at: Option<UnixSeconds>,
    /// When revoked.
    pub revoked_at: Option<UnixSeconds>,
    /// When the grantee acknowledged erasure.
    pub erasure_acked_at: Option<UnixSeconds>,
    /// SHA-256 of the notice shown.
    pub notice_sha256: String,
}

impl GrantRow {
    /// A row for grant `g` seen from `role` with `peer`.
    pub fn new(role: &str, peer: IdentityKey, g: &GrantView) -> Self {
        Self {
            grant: g.id,
            role: role.into(),
            peer,
            status: g.status.as_str().into(),
            scopes: g.scopes.iter().map(ToString::to_string).collect(),
            purpose: g.purpose.clone(),
            legal_basis: g.legal_basis.as_str().into(),
            terms: g.terms.id.clone(),
            granted_at: g.granted_at,
            expires: g.expires,
            accepted_at: g.accepted.map(|a| a.1),
            revoked_at: g.revoked.map(|r| r.1),
            erasure_acked_at: g.erasure_acked.map(|e| e.1),
            notice_sha256: g.notice_sha256.clone(),
        }
    }
}

/// What a write did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteOutcome {
    /// The entry written, if the write was one entry.
    pub entry: Option<EntryId>,
    /// The document written to.
    pub doc: DocId,
    /// The relationship, for relationship writes.
    pub rel: Option<DocId>,
    /// The grant concerned, for consent writes that name one.
    pub grant: Option<EntryId>,
    /// The other party.
    pub peer: IdentityKey,
    /// Where the write went, in a line for people (see `deliveries` for each peer's
    /// outcome).
    pub delivery: Option<String>,
    /// Where the write went, peer by peer.
    #[serde(default)]
    pub deliveries: Vec<Delivery>,
    /// Anything the user should know.
    pub note: Option<String>,
}

impl WriteOutcome {
    /// The outcome of writing entry `entry` to `doc`.
    pub fn entry(entry: EntryId, doc: DocId, peer: IdentityKey) -> Self {
        Self {
            entry: Some(entry),
            doc,
            rel: None,
            grant: None,
            peer,
            delivery: None,
            deliveries: Vec::new(),
            note: None,
        }
    }

    /// The outcome of creating `doc`.
    pub fn doc(doc: DocId, peer: IdentityKey) -> Self {
        Self {
            entry: None,
            doc,
            rel: Some(doc),
            grant: None,
            peer,
            delivery: None,
            deliveries: Vec::new(),
            note: None,
        }
    }
}

/// A member as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRow {
    /// Identity.
    pub identity: IdentityKey,
    /// The owner's name for it.
    pub name: String,
    /// Removed by the owner.
    pub removed: bool,
}

/// One message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageView {
    /// The relationship.
    pub rel: DocId,
    /// The message entry id.
    pub id: EntryId,
    /// The author.
    pub by: IdentityKey,
    /// The author's name as this node knows it.
    pub by_name: String,
    /// The author's time.
    pub at: UnixSeconds,
    /// The text.
    pub text: String,
    /// The purpose, if stated.
    pub purpose: Option<String>,
    /// The thread, if not the main one.
    pub thread: Option<EntryId>,
    /// Written by this node.
    pub mine: bool,
}

/// A thread.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThreadView {
    /// The thread entry id.
    pub id: EntryId,
    /// Title.
    pub title: String,
    /// Who started it.
    pub by: IdentityKey,
    /// When.
    pub at: UnixSeconds,
}

/// A relationship as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelSummary {
    /// The relationship id.
    pub id: DocId,
    /// The owner (a customer).
    pub owner: IdentityKey,
    /// The owner's name, as disclosed.
    pub owner_name: String,
    /// This node owns it.
    pub mine: bool,
    /// Title.
    pub title: Option<String>,
    /// Members.
    pub members: Vec<MemberRow>,
    /// How many messages.
    pub message_count: usize,
    /// Time of the last message, 0 if none.
    pub last_at: UnixSeconds,
    /// The last message.
    pub last: Option<MessageView>,
}

/// A relationship in full.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelDetail {
    /// The summary.
    #[serde(flatten)]
    pub summary: RelSummary,
    /// For the owner: per member, `reads` or why it may not read now.
    pub access: BTreeMap<String, String>,
    /// The disclosed profile.
    pub profile: BTreeMap<String, String>,
    /// Threads.
    pub threads: Vec<ThreadView>,
    /// Messages, oldest first.
    pub messages: Vec<MessageView>,
    /// The newest content-key epoch, if any.
    pub epoch: Option<u32>,
    /// Who the newest epoch's key is sealed to.
    pub epoch_recipients: Vec<String>,
    /// The epochs this node holds keys for.
    pub epochs_held: Vec<u32>,
}

/// Something that happened, as sent on the event stream (`GET /v1/events`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// A new message, received or written here.
    Message(MessageView),
    /// A relationship arrived from its owner.
    Relationship {
        /// Its id.
        rel: DocId,
        /// Its owner.
        owner: IdentityKey,
    },
    /// A consent document changed.
    Consent {
        /// The document.
        doc: DocId,
        /// The customer.
        customer: IdentityKey,
        /// The grantee.
        grantee: IdentityKey,
    },
    /// This node refused a peer's change (kept as evidence).
    Refused(Refusal),
    /// A peer refused a request or a change of ours.
    PeerRefused {
        /// The peer.
        peer: IdentityKey,
        /// The document.
        doc: DocId,
        /// The change, if one was named.
        change: Option<String>,
        /// The peer's reason.
        reason: String,
    },
    /// As a grantee, this node erased what a revocation covers and signed its receipt.
    Erased {
        /// The customer who revoked.
        customer: IdentityKey,
        /// Relationship documents deleted.
        documents: usize,
        /// Messages they held.
        messages: usize,
    },
    /// The relay refused mail this node left for an unreachable peer (a quota, or the peer
    /// has no mailbox there).
    MailRefused {
        /// The peer the mail was for.
        peer: IdentityKey,
        /// The relay's reason.
        reason: String,
    },
    /// A peer connected.
    PeerConnected {
        /// The peer.
        peer: String,
    },
    /// A peer disconnected.
    PeerDisconnected {
        /// The peer.
        peer: String,
    },
}

/// Where a write went, for one peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    /// The peer.
    pub peer: IdentityKey,
    /// How the user knows the peer: their name for a contact, else a name a relationship
    /// gives it (in quotes when the peer gave it to itself); absent when unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// How the sync with it ended.
    pub outcome: SyncResult,
}

/// Where a write went, peer by peer (empty: it concerns no other peer now).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Deliveries(pub Vec<Delivery>);

impl Deliveries {
    /// Whether it reached `peer`.
    pub fn delivered_to(&self, peer: &IdentityKey) -> bool {
        self.0
            .iter()
            .any(|d| d.peer == *peer && d.outcome == SyncResult::Delivered)
    }

    /// Whether it reached some peer.
    pub fn any_delivered(&self) -> bool {
        self.0.iter().any(|d| d.outcome == SyncResult::Delivered)
    }

    /// The reasons of the peers that refused it.
    pub fn refusals(&self) -> Vec<&str> {
        self.0
            .iter()
            .filter_map(|d| match &d.outcome {
                SyncResult::Refused(why) => Some(why.iter().map(|r| r.reason.as_str())),
                _ => None,
            })
            .flatten()
            .collect()
    }

    /// Whether it waits sealed in some peer's mailbox at the relay.
    pub fn any_deposited(&self) -> bool {
        self.0
            .iter()
            .any(|d| matches!(d.outcome, SyncResult::Deposited(_)))
    }

    /// Whether some peer was not reached (it syncs when it connects).
    pub fn any_offline(&self) -> bool {
        self.0
            .iter()
            .any(|d| matches!(d.outcome, SyncResult::Offline(_)))
    }

    /// One line for people, or none when it went to no peer. One vocabulary everywhere:
    /// `delivered to P`, `refused by P: why`, and `stored here; …` (P not reached, waiting
    /// at the relay for P, on its way to P, or not sent to P).
    pub fn summary(&self) -> Option<String> {
        if self.0.is_empty() {
            return None;
        }
        let parts: Vec<String> = self
            .0
            .iter()
            .map(
                |Delivery {
                     peer,
                     name,
                     outcome,
                 }| {
                    let peer = name.clone().unwrap_or_else(|| peer.to_string());
                    match outcome {
                        SyncResult::Delivered => format!("delivered to {peer}"),
                        SyncResult::Refused(why) => {
                            let reasons: Vec<&str> =
                                why.iter().map(|r| r.reason.as_str()).collect();
                            format!("refused by {peer}: {}", reasons.join("; "))
                        }
                        SyncResult::Offline(why) => {
                            format!(
                                "stored here; {peer} not reached ({why}): it goes when they connect"
                            )
                        }
                        SyncResult::NotShared => {
                            format!("stored here; not sent to {peer}, who may not read it now")
                        }
                        SyncResult::Deposited(why) => {
                            format!("stored here; waiting at the relay for {peer} ({why})")
                        }
                        SyncResult::Queued => format!("stored here; on its way to {peer}"),
                    }
                },
            )
            .collect();
        Some(parts.join("; "))
    }
}

impl std::fmt::Display for Deliveries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.summary().unwrap_or_default())
    }
}

impl WriteOutcome {
    /// This outcome with where it went.
    pub fn went(mut self, deliveries: Deliveries) -> Self {
        self.delivery = deliveries.summary();
        self.deliveries = deliveries.0;
        self
    }
}
