//! Relationships: a shared space owned by a customer, with companies and other customers as
//! members, conversation threads and messages, and the profile fields the owner disclosed.
//!
//! A relationship is an Automerge document of the same append-only shape as the consent
//! ledger (see [`crate::ConsentDoc`]): a root map of content-addressed JSON entries, each
//! added by a change its author signed. The rules every replica checks:
//!
//! - the author is the owner or a member the owner added;
//! - an entry's `by` is the change's signer, so nobody writes words in another's name;
//! - only the owner writes the title, membership, profile and content-key epochs; members
//!   write threads and their own messages;
//! - sizes and shapes are bounded.
//!
//! Whether a member may write *now* (an active grant with `conversation:write`, and
//! `contact:<purpose>` for a message of that purpose) is decided by the owner's node with
//! [`crate::access`], because it depends on the consent ledger and the clock.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::OnceLock;

use automerge::{ActorId, Automerge, ChangeHash};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::append::{
    AppendViolation, Authored, CausalSink, apply_causally, authored_entries, par_map, write_entry,
};
use crate::consent::{EntryId, UnixSeconds};
use crate::identity::{IdentityKey, SecretKey};
use base64::Engine as _;

use crate::scope::valid_name;
use crate::seal::{SEALED_KEY_BYTES, SealedEpoch};
use crate::signed::{ChangeError, DocId, Signatures, SignedChange, Verified, check_all};

/// The largest relationship entry text accepted (192 KiB: an epoch entry sealing a key to
/// 1,025 recipients fits; every other entry type has a tighter bound of its own).
pub const MAX_REL_ENTRY_BYTES: usize = 192 * 1024;
/// The longest message text, in bytes of UTF-8 (16 KiB).
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024;
/// The longest title, name or profile value, in characters.
pub const MAX_TITLE: usize = 200;
/// The most members one relationship may have.
pub const MAX_MEMBERS: usize = 1024;
/// Version of the relationship entry schema written by this release.
pub const REL_ENTRY_VERSION: u8 = 1;

const REL_DOC_DOMAIN: &[u8] = b"rapport/relationship-doc/v1\0";
/// Batches larger than this rebuild the Automerge document instead of applying onto it.
const REBUILD_BATCH: usize = 1024;

/// What names a relationship document: its owner and a random nonce the owner picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RelHeader {
    /// The customer who owns the relationship.
    pub owner: IdentityKey,
    /// 16 random bytes, so one owner can open many relationships.
    #[serde(with = "hex16")]
    pub nonce: [u8; 16],
}

impl RelHeader {
    /// The document id: SHA-256 of `"rapport/relationship-doc/v1\0" || owner || nonce`.
    pub fn doc_id(&self) -> DocId {
        let mut h = Sha256::new();
        h.update(REL_DOC_DOMAIN);
        h.update(self.owner.as_bytes());
        h.update(self.nonce);
        DocId(h.finalize().into())
    }
}

mod hex16 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(v: &[u8; 16], s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&hex::encode(v))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 16], D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        let mut out = [0u8; 16];
        hex::decode_to_slice(s.as_bytes(), &mut out)
            .map_err(|_| serde::de::Error::custom("nonce is not 32 hex digits"))?;
        Ok(out)
    }
}

/// What a relationship entry says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum RelBody {
    /// The relationship's title (the latest by time, then id, counts). Owner only.
    Title {
        /// The title.
        title: String,
    },
    /// Adds a member. Owner only.
    Member {
        /// The member's identity.
        member: IdentityKey,
        /// How the owner names the member.
        name: String,
    },
    /// Removes a member: the member writes nothing more that the owner's node accepts.
    /// Owner only.
    Remove {
        /// The member removed.
        member: IdentityKey,
    },
    /// A profile field the owner discloses to the members. Owner only.
    Profile {
        /// The field's name (as in `profile:<field>:read`).
        field: String,
        /// Its value.
        value: String,
    },
    /// Starts a conversation thread. Owner or member.
    Thread {
        /// The thread's title.
        title: String,
    },
    /// A message. Owner or member; always in the author's own name.
    Message {
        /// The thread, or none for the relationship's main thread.
        thread: Option<EntryId>,
        /// The text.
        text: String,
        /// Why the author writes: a member's message needs `contact:<purpose>`.
        purpose: Option<String>,
    },
    /// Starts a content-key epoch: the epoch's key sealed to each recipient (see
    /// [`crate::seal`]). Owner only.
    Epoch {
        /// The epoch number; each is written once.
        epoch: u32,
        /// The epoch's ephemeral X25519 public key, hex.
        eph: String,
        /// The recipients and the key sealed to each.
        slots: Vec<KeySlot>,
    },
}

/// One recipient's sealed copy of an epoch key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySlot {
    /// The recipient.
    pub member: IdentityKey,
    /// The content key sealed to it, base64 (48 bytes).
    pub key: String,
}

impl KeySlot {
    /// The sealed key's bytes, if well formed.
    pub fn sealed(&self) -> Option<[u8; SEALED_KEY_BYTES]> {
        base64::engine::general_purpose::STANDARD
            .decode(&self.key)
            .ok()?
            .try_into()
            .ok()
    }
}

/// An epoch entry, parsed: its number, ephemeral key and slots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpochView {
    /// The epoch.
    pub epoch: u32,
    /// Ephemeral public key.
    pub eph: [u8; 32],
    /// Recipients and sealed keys.
    pub slots: Vec<(IdentityKey, [u8; SEALED_KEY_BYTES])>,
}

impl EpochView {
    /// The slot sealed to `who`, if any.
    pub fn slot_for(&self, who: &IdentityKey) -> Option<&[u8; SEALED_KEY_BYTES]> {
        self.slots.iter().find(|(m, _)| m == who).map(|(_, k)| k)
    }

    /// The entry body that carries a sealed epoch.
    pub fn body(epoch: u32, sealed: &SealedEpoch) -> RelBody {
        RelBody::Epoch {
            epoch,
            eph: hex::encode(sealed.eph),
            slots: sealed
                .slots
                .iter()
                .map(|(m, k)| KeySlot {
                    member: *m,
                    key: base64::engine::general_purpose::STANDARD.encode(k),
                })
                .collect(),
        }
    }

    fn parse(body: &RelBody) -> Option<Self> {
        let RelBody::Epoch { epoch, eph, slots } = body else {
            return None;
        };
        let eph: [u8; 32] = hex::decode(eph).ok()?.try_into().ok()?;
        let slots = slots
            .iter()
            .map(|s| Some((s.member, s.sealed()?)))
            .collect::<Option<Vec<_>>>()?;
        Some(Self {
            epoch: *epoch,
            eph,
            slots,
        })
    }
}

impl RelBody {
    /// The entry type's name, as in the JSON `type` field.
    pub fn kind(&self) -> &'static str {
        match self {
            RelBody::Title { .. } => "title",
            RelBody::Member { .. } => "member",
            RelBody::Remove { .. } => "remove",
            RelBody::Profile { .. } => "profile",
            RelBody::Thread { .. } => "thread",
            RelBody::Message { .. } => "message",
            RelBody::Epoch { .. } => "epoch",
        }
    }

    /// Whether only the owner may write this entry type.
    pub fn owner_only(&self) -> bool {
        matches!(
            self,
            RelBody::Title { .. }
                | RelBody::Member { .. }
                | RelBody::Remove { .. }
                | RelBody::Profile { .. }
                | RelBody::Epoch { .. }
        )
    }

    fn check_shape(&self) -> Result<(), String> {
        let short = |what: &str, s: &str| {
            if s.trim().is_empty() || s.chars().count() > MAX_TITLE {
                Err(format!("{what} must be 1-{MAX_TITLE} characters"))
            } else {
                Ok(())
            }
        };
        match self {
            RelBody::Title { title } | RelBody::Thread { title } => short("a title", title),
            RelBody::Member { name, .. } => short("a member's name", name),
            RelBody::Remove { .. } => Ok(()),
            RelBody::Epoch { slots, .. } => {
                if EpochView::parse(self).is_none() {
                    return Err(
                        "an epoch entry needs a 32-byte hex key and 48-byte base64 slots".into(),
                    );
                }
                if slots.is_empty() || slots.len() > MAX_MEMBERS + 1 {
                    return Err(format!("an epoch has 1-{} recipients", MAX_MEMBERS + 1));
                }
                let mut seen = std::collections::HashSet::new();
                if !slots.iter().all(|s| seen.insert(s.member)) {
                    return Err("an epoch names a recipient twice".into());
                }
                Ok(())
            }
            RelBody::Profile { field, value } => {
                if !valid_name(field) {
                    return Err(format!(
                        "profile field {:?} must be 1-64 characters a-z 0-9 _ . -",
                        field.chars().take(80).collect::<String>()
                    ));
                }
                if value.chars().count() > MAX_TITLE {
                    return Err(format!(
                        "a profile value must be at most {MAX_TITLE} characters"
                    ));
                }
                Ok(())
            }
            RelBody::Message { text, purpose, .. } => {
                if text.trim().is_empty() {
                    return Err("a message cannot be empty".into());
                }
                if text.len() > MAX_MESSAGE_BYTES {
                    return Err(format!(
                        "a message is {} bytes, more than the limit of {MAX_MESSAGE_BYTES}",
                        text.len()
                    ));
                }
                match purpose {
                    Some(p) if !valid_name(p) => Err(format!(
                        "purpose {:?} must be 1-64 characters a-z 0-9 _ . -",
                        p.chars().take(80).collect::<String>()
                    )),
                    _ => Ok(()),
                }
            }
        }
    }
}

/// One entry of a relationship.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelEntry {
    /// Entry schema version.
    pub v: u8,
    /// Who wrote it; must be the author of the change that carries it.
    pub by: IdentityKey,
    /// When, by the writer's clock.
    pub at: UnixSeconds,
    /// What it says.
    pub body: RelBody,
}

impl Authored for RelEntry {
    const VERSION: u8 = REL_ENTRY_VERSION;
    fn version(&self) -> u8 {
        self.v
    }
    fn by(&self) -> &IdentityKey {
        &self.by
    }
}

/// Why a relationship change or write was refused. The document is left as it was.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RelError {
    /// The signature, author or encoding of the change does not check.
    #[error(transparent)]
    Change(#[from] ChangeError),
    /// The author is neither the owner nor a member.
    #[error("change {hash} is by {author}, who is not a member of this relationship")]
    NotAMember {
        /// Change hash.
        hash: String,
        /// The author's identity.
        author: String,
    },
    /// The change does something other than add new entries.
    #[error("change {hash} does not only append entries: {detail}")]
    NotAnAppend {
        /// Change hash.
        hash: String,
        /// What it did instead.
        detail: String,
    },
    /// A member wrote an entry only the owner may write.
    #[error("change {hash}: only the owner may write a {kind} entry")]
    OwnerOnly {
        /// Change hash.
        hash: String,
        /// Entry type.
        kind: &'static str,
    },
    /// An entry is malformed, too large, or claims another author.
    #[error("change {hash}: bad entry: {detail}")]
    BadEntry {
        /// Change hash.
        hash: String,
        /// What is wrong.
        detail: String,
    },
    /// The change depends on changes this document does not hold.
    #[error("change {hash} depends on {missing} change(s) this document does not hold")]
    MissingDeps {
        /// Change hash.
        hash: String,
        /// How many are missing.
        missing: usize,
    },
    /// The owner's node refused the change under the consent rules (see [`crate::access`]).
    #[error("change {hash} refused: {reason}")]
    Denied {
        /// Change hash.
        hash: String,
        /// Why.
        reason: String,
    },
    /// A local write that breaks a rule.
    #[error("{0}")]
    Refused(String),
}

impl RelError {
    /// What kind of refusal this is, for the peer that sent the change.
    pub fn refusal_kind(&self) -> crate::wire::RefusalKind {
        use crate::wire::RefusalKind;
        match self {
            RelError::MissingDeps { .. } => RefusalKind::MissingDependencies,
            RelError::NotAMember { .. }
            | RelError::OwnerOnly { .. }
            | RelError::Denied { .. }
            | RelError::Refused(_) => RefusalKind::Forbidden,
            RelError::Change(_) | RelError::NotAnAppend { .. } | RelError::BadEntry { .. } => {
                RefusalKind::Invalid
            }
        }
    }
}

/// A member as folded from the document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MemberView {
    /// The member's identity.
    pub identity: IdentityKey,
    /// The owner's name for the member.
    pub name: String,
    /// When added.
    pub added_at: UnixSeconds,
    /// When removed, if removed.
    pub removed_at: Option<UnixSeconds>,
}

/// What applying a batch of relationship changes did.
#[derive(Debug, Default)]
pub struct RelApplyReport {
    /// Changes newly applied, in the order applied.
    pub applied: Vec<ChangeHash>,
    /// Changes already held.
    pub duplicates: usize,
    /// Changes refused, with the reason.
    pub rejected: Vec<(ChangeHash, RelError)>,
}

/// A relationship document: the verified changes, the entries they add, and the Automerge
/// document they make.
///
/// The Automerge document is a view, built on first use (a write, or [`automerge`]) and
/// kept up to date from then on: loading a stored relationship or taking a peer's changes
/// does not pay for it. The rules here refuse everything Automerge would refuse of an
/// append (a second change under one writer session's number, an Automerge author), so
/// every change this document holds builds it.
///
/// [`automerge`]: Self::automerge
#[derive(Debug, Clone)]
pub struct RelationshipDoc {
    header: RelHeader,
    id: DocId,
    entries: BTreeMap<EntryId, RelEntry>,
    /// Entry ids in the order their changes were applied (a causal order).
    order: Vec<EntryId>,
    changes: Vec<SignedChange>,
    /// Position of each held change in `changes`.
    index: HashMap<ChangeHash, usize>,
    /// The entries each change added.
    by_change: HashMap<ChangeHash, Vec<EntryId>>,
    /// Everyone the owner ever added, with the latest membership state.
    members: BTreeMap<IdentityKey, MemberView>,
    /// The latest value of each profile field, with its (time, id) order key.
    profile: BTreeMap<String, ((UnixSeconds, EntryId), String)>,
    /// The latest title, with its order key.
    title: Option<((UnixSeconds, EntryId), String)>,
    /// The entry of each content-key epoch.
    epochs: BTreeMap<u32, EntryId>,
    /// How many messages it holds, and the latest by time then id: kept as changes go in,
    /// so a summary costs nothing however long the conversation.
    message_count: usize,
    last_message: Option<EntryId>,
    /// The held changes no held change depends on.
    heads: BTreeSet<ChangeHash>,
    /// The change numbers each writer session (Automerge actor) used.
    seqs: HashMap<ActorId, HashSet<u64>>,
    /// The Automerge document, once built. Boxed: unbuilt it is a pointer, where inline
    /// it made every relationship about 4 KiB, copied each time one moved.
    doc: OnceLock<Box<Automerge>>,
}

/// A change's author and the entries it adds, or why it is refused.
type Checked = Result<(IdentityKey, Vec<(EntryId, RelEntry)>), RelError>;

impl RelationshipDoc {
    /// An empty relationship.
    pub fn new(header: RelHeader) -> Self {
        Self {
            id: header.doc_id(),
            header,
            entries: BTreeMap::new(),
            order: Vec::new(),
            changes: Vec::new(),
            index: HashMap::new(),
            by_change: HashMap::new(),
            members: BTreeMap::new(),
            profile: BTreeMap::new(),
            title: None,
            epochs: BTreeMap::new(),
            message_count: 0,
            last_message: None,
            heads: BTreeSet::new(),
            seqs: HashMap::new(),
            doc: OnceLock::new(),
        }
    }

    /// The content-key epochs written so far, oldest first.
    pub fn epochs(&self) -> impl Iterator<Item = EpochView> + '_ {
        self.epochs
            .values()
            .filter_map(|id| self.entries.get(id).and_then(|e| EpochView::parse(&e.body)))
    }

    /// One epoch, if written.
    pub fn epoch(&self, n: u32) -> Option<EpochView> {
        self.epochs
            .get(&n)
            .and_then(|id| self.entries.get(id))
            .and_then(|e| EpochView::parse(&e.body))
    }

    /// The numbers of the epochs written, oldest first.
    pub fn epoch_numbers(&self) -> impl Iterator<Item = u32> + '_ {
        self.epochs.keys().copied()
    }

    /// The newest epoch's number, if any was written.
    pub fn latest_epoch(&self) -> Option<u32> {
        self.epochs.keys().next_back().copied()
    }

    /// Builds a relationship from stored changes, refusing it whole if any does not check.
    pub fn load(header: RelHeader, changes: Vec<SignedChange>) -> Result<Self, RelError> {
        Self::load_as(header, changes, Signatures::Verify)
    }

    /// [`load`](Self::load) for changes from this node's own store, verified when they
    /// arrived: their signatures are not checked again; every other rule is.
    pub fn load_trusted(header: RelHeader, changes: Vec<SignedChange>) -> Result<Self, RelError> {
        Self::load_as(header, changes, Signatures::Trusted)
    }

    fn load_as(
        header: RelHeader,
        changes: Vec<SignedChange>,
        sigs: Signatures,
    ) -> Result<Self, RelError> {
        let mut doc = Self::new(header);
        let report = doc.apply_as(changes, |_, _| Ok(()), sigs);
        match report.rejected.into_iter().next() {
            Some((_, e)) => Err(e),
            None => Ok(doc),
        }
    }

    /// Who owns it and its nonce.
    pub fn header(&self) -> &RelHeader {
        &self.header
    }

    /// The document id.
    pub fn id(&self) -> DocId {
        self.id
    }

    /// The current heads, in order (as Automerge gives them).
    pub fn heads(&self) -> Vec<ChangeHash> {
        self.heads.iter().copied().collect()
    }

    /// All changes, each after its dependencies.
    pub fn changes(&self) -> &[SignedChange] {
        &self.changes
    }

    /// Whether the document holds this change.
    pub fn has_change(&self, hash: &ChangeHash) -> bool {
        self.index.contains_key(hash)
    }

    /// The Automerge document, built from the changes on first use.
    ///
    /// # Panics
    ///
    /// If Automerge refuses changes every rule here accepted, which the rules exclude.
    pub fn automerge(&self) -> &Automerge {
        self.doc.get_or_init(|| {
            Box::new(
                self.build()
                    .expect("Automerge takes every change the rules accept"),
            )
        })
    }

    /// The Automerge document, built on first use, to write to.
    fn automerge_mut(&mut self) -> Result<&mut Automerge, RelError> {
        if self.doc.get().is_none() {
            let built = self
                .build()
                .map_err(|e| RelError::Refused(format!("cannot build the document: {e}")))?;
            let _ = self.doc.set(Box::new(built));
        }
        Ok(self.doc.get_mut().expect("built above"))
    }

    /// A new Automerge document holding every change.
    fn build(&self) -> Result<Automerge, automerge::AutomergeError> {
        let mut doc = Automerge::new();
        doc.apply_changes(self.changes.iter().map(|c| c.change().clone()))?;
        Ok(doc)
    }

    /// All entries, by id.
    pub fn entries(&self) -> &BTreeMap<EntryId, RelEntry> {
        &self.entries
    }

    /// Entries in a causal order.
    pub fn entries_in_order(&self) -> impl Iterator<Item = (&EntryId, &RelEntry)> {
        self.order.iter().map(|id| (id, &self.entries[id]))
    }

    /// The entries a held change added.
    pub fn entries_of_change(&self, hash: &ChangeHash) -> Vec<(EntryId, &RelEntry)> {
        self.by_change
            .get(hash)
            .into_iter()
            .flatten()
            .map(|id| (*id, &self.entries[id]))
            .collect()
    }

    /// The title: the latest `title` entry by time then id, if any.
    pub fn title(&self) -> Option<&str> {
        self.title.as_ref().map(|(_, t)| t.as_str())
    }

    /// Everyone the owner ever added, with their current state.
    pub fn members(&self) -> impl Iterator<Item = &MemberView> {
        self.members.values()
    }

    /// Whether `who` is a member now (added and not removed).
    pub fn is_member(&self, who: &IdentityKey) -> bool {
        self.members
            .get(who)
            .is_some_and(|m| m.removed_at.is_none())
    }

    /// The disclosed profile: the latest value of each field.
    pub fn profile(&self) -> BTreeMap<String, String> {
        self.profile
            .iter()
            .map(|(f, (_, v))| (f.clone(), v.clone()))
            .collect()
    }

    /// One disclosed profile field's latest value.
    pub fn profile_field(&self, field: &str) -> Option<&str> {
        self.profile.get(field).map(|(_, v)| v.as_str())
    }

    /// Every message, oldest first (by the author's time, then id).
    pub fn messages(&self) -> Vec<(EntryId, &RelEntry)> {
        let mut out: Vec<(EntryId, &RelEntry)> = self
            .entries
            .iter()
            .filter(|(_, e)| matches!(e.body, RelBody::Message { .. }))
            .map(|(id, e)| (*id, e))
            .collect();
        out.sort_by_key(|(id, e)| (e.at, *id));
        out
    }

    /// How many messages it holds ([`messages`](Self::messages)`().len()`, without
    /// listing them).
    pub fn message_count(&self) -> usize {
        self.message_count
    }

    /// The latest message by time then id ([`messages`](Self::messages)`().last()`,
    /// without listing them).
    pub fn last_message(&self) -> Option<(EntryId, &RelEntry)> {
        let id = self.last_message?;
        self.entries.get(&id).map(|e| (id, e))
    }

    /// The changes this document holds that are not in the history of `heads` (the heads
    /// another replica reported), in a causal order. Heads this document does not know are
    /// ignored, so the answer may include changes the other side already holds.
    pub fn changes_missing_from(&self, heads: &[ChangeHash]) -> Vec<&SignedChange> {
        missing_from(&self.changes, &self.index, heads)
    }

    /// Applies received changes, refusing those that do not check. Nothing refused is kept.
    pub fn apply(&mut self, changes: Vec<SignedChange>) -> RelApplyReport {
        self.apply_gated(changes, |_, _| Ok(()))
    }

    /// Like [`apply`](Self::apply), with one more rule: `gate` sees each change's author and
    /// entries once every other rule holds, and may refuse it with a reason (the owner's
    /// node uses this for the consent rules).
    pub fn apply_gated(
        &mut self,
        changes: Vec<SignedChange>,
        gate: impl FnMut(&IdentityKey, &[(EntryId, RelEntry)]) -> Result<(), String>,
    ) -> RelApplyReport {
        self.apply_as(changes, gate, Signatures::Verify)
    }

    /// [`apply_gated`](Self::apply_gated) for changes whose signatures this node may have
    /// checked ahead ([`crate::verify_named`]): the copies `ahead` vouches for are not
    /// verified again; every other change is, and every other rule runs for all.
    pub fn apply_gated_with(
        &mut self,
        changes: Vec<SignedChange>,
        gate: impl FnMut(&IdentityKey, &[(EntryId, RelEntry)]) -> Result<(), String>,
        ahead: Option<&Verified>,
    ) -> RelApplyReport {
        let sigs = ahead.map_or(Signatures::Verify, Signatures::Checked);
        self.apply_as(changes, gate, sigs)
    }

    fn apply_as(
        &mut self,
        changes: Vec<SignedChange>,
        gate: impl FnMut(&IdentityKey, &[(EntryId, RelEntry)]) -> Result<(), String>,
        sigs: Signatures,
    ) -> RelApplyReport {
        let mut report = RelApplyReport::default();
        // Exact copies are dropped here; copies of one change hash with different
        // signatures all go to verification, so a forged copy sent first cannot shadow the
        // honest one (only the first copy that verifies is kept, below).
        let mut seen = HashSet::with_capacity(changes.len());
        let fresh: Vec<SignedChange> = changes
            .into_iter()
            .filter(|c| {
                let new = !self.index.contains_key(&c.hash())
                    && seen.insert((c.hash(), c.signature_bytes()));
                if !new {
                    report.duplicates += 1;
                }
                new
            })
            .collect();
        // Signatures first, against the key each change names; whether that key may write
        // here is decided in causal order below, since a batch may add a member and carry
        // that member's first message.
        let mut named: Vec<IdentityKey> = Vec::new();
        for c in &fresh {
            if let Ok(k) = IdentityKey::from_bytes(c.author_bytes())
                && !named.contains(&k)
            {
                named.push(k);
            }
        }
        let verdicts = check_all(&self.id, &fresh, &named, sigs);
        let mut verified = Vec::with_capacity(fresh.len());
        let mut kept = HashSet::new();
        for (c, verdict) in fresh.into_iter().zip(verdicts) {
            match verdict {
                Ok(_) if !kept.insert(c.hash()) => report.duplicates += 1,
                Ok(author) => verified.push((c, author)),
                Err(e) => report.rejected.push((c.hash(), e.into())),
            }
        }
        let owner = self.header.owner;
        let checked = par_map(&verified, |(c, author)| check_ops(&owner, c, author));
        let waiting: Vec<(SignedChange, Checked)> = verified
            .into_iter()
            .zip(checked)
            .map(|((c, a), r)| (c, r.map(|entries| (a, entries))))
            .collect();
        let before = self.changes.len();
        // Room for the batch at once, rather than growing (and rehashing) as it goes in.
        let n = waiting.len();
        self.changes.reserve(n);
        self.order.reserve(n);
        self.index.reserve(n);
        self.by_change.reserve(n);
        let mut sink = RelSink { doc: self, gate };
        apply_causally(
            &mut sink,
            waiting,
            &mut report.applied,
            &mut report.rejected,
        );
        if !self.changes[before..].is_empty() && self.materialise(before).is_err() {
            // Automerge refused what every rule accepted; it should not. Keep the document
            // as it was and refuse the batch rather than hold a ledger it cannot show.
            let refused: Vec<SignedChange> = self.changes[before..].to_vec();
            *self = Self::load_trusted(self.header, self.changes[..before].to_vec())
                .expect("changes applied before apply again");
            report.applied.clear();
            for c in refused {
                report.rejected.push((
                    c.hash(),
                    RelError::BadEntry {
                        hash: c.hash().to_string(),
                        detail: "Automerge could not apply the change".into(),
                    },
                ));
            }
        }
        report
    }

    /// Brings the Automerge document, if built, up to date with the changes recorded from
    /// index `before` on. Automerge 0.12 applies a large batch onto a non-empty document
    /// far more slowly (and with far more memory) than it builds a document from scratch,
    /// so a large batch drops the document, to be built again when next used.
    fn materialise(&mut self, before: usize) -> Result<(), automerge::AutomergeError> {
        let Some(doc) = self.doc.get_mut() else {
            return Ok(());
        };
        if before > 0 && self.changes.len() - before > REBUILD_BATCH {
            self.doc = OnceLock::new();
            return Ok(());
        }
        doc.apply_changes(self.changes[before..].iter().map(|c| c.change().clone()))
    }

    /// Writes one entry as `key`'s identity at time `at`, signing the change. Returns the
    /// entry id and the signed change to store and send. On any error nothing changes.
    pub fn append(
        &mut self,
        key: &SecretKey,
        nonce: [u8; 16],
        at: UnixSeconds,
        body: RelBody,
    ) -> Result<(EntryId, SignedChange), RelError> {
        self.write(key, nonce, at, body, None)
    }

    /// Like [`append`](Self::append), but the change does not depend on the changes in
    /// `exclude` nor on anything built on them: a member whose changes the owner refused
    /// keeps them (its history is its own) and still reaches the owner with the next one.
    /// `nonce` must name a writer session that wrote none of the excluded changes (a fresh
    /// one), since the change numbers its author's changes from the fork it is built on.
    pub fn append_excluding(
        &mut self,
        exclude: &HashSet<ChangeHash>,
        key: &SecretKey,
        nonce: [u8; 16],
        at: UnixSeconds,
        body: RelBody,
    ) -> Result<(EntryId, SignedChange), RelError> {
        if exclude.iter().any(|h| self.index.contains_key(h)) {
            self.write(key, nonce, at, body, Some(exclude))
        } else {
            self.write(key, nonce, at, body, None)
        }
    }

    fn write(
        &mut self,
        key: &SecretKey,
        nonce: [u8; 16],
        at: UnixSeconds,
        body: RelBody,
        exclude: Option<&HashSet<ChangeHash>>,
    ) -> Result<(EntryId, SignedChange), RelError> {
        let author = key.identity();
        body.check_shape().map_err(RelError::Refused)?;
        if author != self.header.owner {
            if !self.is_member(&author) {
                return Err(RelError::Refused(format!(
                    "{author} is not a member of relationship {}",
                    self.id
                )));
            }
            if body.owner_only() {
                return Err(RelError::Refused(format!(
                    "only the owner may write a {} entry",
                    body.kind()
                )));
            }
        }
        match &body {
            RelBody::Member { member, .. } => {
                if *member == self.header.owner {
                    return Err(RelError::Refused(
                        "the owner is not added as a member of their own relationship".into(),
                    ));
                }
                if self.is_member(member) {
                    return Err(RelError::Refused(format!("{member} is already a member")));
                }
            }
            RelBody::Epoch { epoch, .. } if self.epochs.contains_key(epoch) => {
                return Err(RelError::Refused(format!(
                    "epoch {epoch} is already written"
                )));
            }
            RelBody::Remove { member } if !self.is_member(member) => {
                return Err(RelError::Refused(format!("{member} is not a member")));
            }
            RelBody::Message {
                thread: Some(t), ..
            } if !matches!(
                self.entries.get(t).map(|e| &e.body),
                Some(RelBody::Thread { .. })
            ) =>
            {
                return Err(RelError::Refused(format!(
                    "there is no thread {} in this relationship",
                    t.short()
                )));
            }
            _ => {}
        }
        let entry = RelEntry {
            v: REL_ENTRY_VERSION,
            by: author,
            at,
            body,
        };
        let text = serde_json::to_string(&entry).expect("entries serialise");
        if text.len() > MAX_REL_ENTRY_BYTES {
            return Err(RelError::Refused(format!(
                "the entry is {} bytes, more than the limit of {MAX_REL_ENTRY_BYTES}",
                text.len()
            )));
        }
        let id = EntryId::of(&text);
        if self.entries.contains_key(&id) {
            return Err(RelError::Refused(format!(
                "entry {} already exists",
                id.short()
            )));
        }
        let doc_id = self.id;
        let signed = match exclude {
            None => write_entry(self.automerge_mut()?, &doc_id, key, nonce, at, &id, text)?,
            Some(exclude) => {
                // Built on the document as the owner holds it: without the changes it
                // refused and what was built on them (a fork: this costs a pass over the
                // document, and happens only where something of ours was refused).
                let heads = self.heads_without(exclude);
                let doc = self.automerge_mut()?;
                let mut fork = doc
                    .fork_at(&heads)
                    .map_err(|e| RelError::Refused(format!("cannot build the change: {e}")))?;
                let signed = write_entry(&mut fork, &doc_id, key, nonce, at, &id, text)?;
                doc.apply_changes([signed.change().clone()])
                    .map_err(|e| RelError::Refused(format!("cannot apply the change: {e}")))?;
                signed
            }
        };
        let entries = check_ops(&self.header.owner, &signed, &author)?;
        self.check_state(&signed, &author, &entries)?;
        self.record(signed.clone(), entries);
        Ok((id, signed))
    }

    /// The heads of the document less the changes in `exclude` and every change that
    /// depends on one of them.
    fn heads_without(&self, exclude: &HashSet<ChangeHash>) -> Vec<ChangeHash> {
        let mut blocked: HashSet<ChangeHash> = HashSet::new();
        let mut kept: Vec<&SignedChange> = Vec::new();
        for c in &self.changes {
            let h = c.hash();
            if exclude.contains(&h) || c.change().deps().iter().any(|d| blocked.contains(d)) {
                blocked.insert(h);
            } else {
                kept.push(c);
            }
        }
        let depended: HashSet<&ChangeHash> =
            kept.iter().flat_map(|c| c.change().deps().iter()).collect();
        kept.iter()
            .map(|c| c.hash())
            .filter(|h| !depended.contains(h))
            .collect()
    }

    /// Rules that depend on what the document already holds.
    fn check_state(
        &self,
        sc: &SignedChange,
        author: &IdentityKey,
        entries: &[(EntryId, RelEntry)],
    ) -> Result<(), RelError> {
        if *author != self.header.owner && !self.members.contains_key(author) {
            return Err(RelError::NotAMember {
                hash: sc.hash().to_string(),
                author: author.to_string(),
            });
        }
        let c = sc.change();
        if self
            .seqs
            .get(c.actor_id())
            .is_some_and(|s| s.contains(&c.seq()))
        {
            // Automerge holds one change per number of a writer session.
            return Err(RelError::NotAnAppend {
                hash: sc.hash().to_string(),
                detail: format!(
                    "its writer session already wrote a change numbered {}",
                    c.seq()
                ),
            });
        }
        for (id, e) in entries {
            if self.entries.contains_key(id) {
                return Err(RelError::NotAnAppend {
                    hash: sc.hash().to_string(),
                    detail: format!("entry {} already exists", id.short()),
                });
            }
            if let RelBody::Epoch { epoch, .. } = &e.body
                && self.epochs.contains_key(epoch)
            {
                return Err(RelError::BadEntry {
                    hash: sc.hash().to_string(),
                    detail: format!("epoch {epoch} is already written"),
                });
            }
            if let RelBody::Member { member, .. } = &e.body {
                if *member == self.header.owner {
                    return Err(RelError::BadEntry {
                        hash: sc.hash().to_string(),
                        detail: "the owner cannot be added as a member".into(),
                    });
                }
                if !self.members.contains_key(member) && self.members.len() >= MAX_MEMBERS {
                    return Err(RelError::BadEntry {
                        hash: sc.hash().to_string(),
                        detail: format!("a relationship has at most {MAX_MEMBERS} members"),
                    });
                }
            }
        }
        Ok(())
    }

    fn record(&mut self, sc: SignedChange, entries: Vec<(EntryId, RelEntry)>) {
        let hash = sc.hash();
        // Recorded in a causal order: what it depends on is held, and no held change
        // depends on it.
        for d in sc.change().deps() {
            self.heads.remove(d);
        }
        self.heads.insert(hash);
        let (actor, seq) = (sc.change().actor_id(), sc.change().seq());
        match self.seqs.get_mut(actor) {
            Some(s) => {
                s.insert(seq);
            }
            None => {
                self.seqs.insert(actor.clone(), HashSet::from([seq]));
            }
        }
        self.index.insert(hash, self.changes.len());
        self.changes.push(sc);
        let mut ids = Vec::with_capacity(entries.len());
        for (id, e) in entries {
            match &e.body {
                RelBody::Member { member, name } => {
                    let m = self.members.entry(*member).or_insert_with(|| MemberView {
                        identity: *member,
                        name: name.clone(),
                        added_at: e.at,
                        removed_at: None,
                    });
                    // A later addition (by time) after a removal re-admits the member.
                    if m.removed_at.is_some_and(|r| r <= e.at) {
                        m.removed_at = None;
                        m.added_at = e.at;
                        m.name = name.clone();
                    }
                }
                RelBody::Title { title } => {
                    let key = (e.at, id);
                    if self.title.as_ref().is_none_or(|(k, _)| *k < key) {
                        self.title = Some((key, title.clone()));
                    }
                }
                RelBody::Profile { field, value } => {
                    let key = (e.at, id);
                    if self.profile.get(field).is_none_or(|(k, _)| *k < key) {
                        self.profile.insert(field.clone(), (key, value.clone()));
                    }
                }
                RelBody::Epoch { epoch, .. } => {
                    self.epochs.insert(*epoch, id);
                }
                RelBody::Message { .. } => {
                    self.message_count += 1;
                    let later = |last: EntryId| {
                        self.entries
                            .get(&last)
                            .is_none_or(|l| (l.at, last) < (e.at, id))
                    };
                    if self.last_message.is_none_or(later) {
                        self.last_message = Some(id);
                    }
                }
                RelBody::Remove { member } => {
                    if let Some(m) = self.members.get_mut(member)
                        && m.added_at <= e.at
                        && m.removed_at.is_none_or(|r| r > e.at)
                    {
                        m.removed_at = Some(e.at);
                    }
                }
                _ => {}
            }
            self.order.push(id);
            ids.push(id);
            self.entries.insert(id, e);
        }
        self.by_change.insert(hash, ids);
    }
}

/// A relationship taking checked changes in causal order, with the caller's gate.
struct RelSink<'a, G> {
    doc: &'a mut RelationshipDoc,
    gate: G,
}

impl<G> CausalSink for RelSink<'_, G>
where
    G: FnMut(&IdentityKey, &[(EntryId, RelEntry)]) -> Result<(), String>,
{
    type Item = (IdentityKey, Vec<(EntryId, RelEntry)>);
    type Error = RelError;

    fn holds(&self, hash: &ChangeHash) -> bool {
        self.doc.index.contains_key(hash)
    }

    fn take(&mut self, c: SignedChange, (author, entries): Self::Item) -> Result<(), RelError> {
        self.doc.check_state(&c, &author, &entries)?;
        (self.gate)(&author, &entries).map_err(|reason| RelError::Denied {
            hash: c.hash().to_string(),
            reason,
        })?;
        self.doc.record(c, entries);
        Ok(())
    }

    fn missing(&self, c: &SignedChange, missing: usize) -> RelError {
        RelError::MissingDeps {
            hash: c.hash().to_string(),
            missing,
        }
    }
}

/// Changes of `changes` (in causal order, with `index` giving positions) that are not in
/// the history of the known members of `heads`.
pub(crate) fn missing_from<'a>(
    changes: &'a [SignedChange],
    index: &HashMap<ChangeHash, usize>,
    heads: &[ChangeHash],
) -> Vec<&'a SignedChange> {
    let mut have = vec![false; changes.len()];
    let mut stack: Vec<usize> = heads.iter().filter_map(|h| index.get(h).copied()).collect();
    while let Some(i) = stack.pop() {
        if std::mem::replace(&mut have[i], true) {
            continue;
        }
        for d in changes[i].change().deps() {
            if let Some(&j) = index.get(d)
                && !have[j]
            {
                stack.push(j);
            }
        }
    }
    changes
        .iter()
        .zip(have)
        .filter(|(_, h)| !h)
        .map(|(c, _)| c)
        .collect()
}

/// Checks one change's entries against the rules that depend only on the change.
fn check_ops(
    owner: &IdentityKey,
    sc: &SignedChange,
    author: &IdentityKey,
) -> Result<Vec<(EntryId, RelEntry)>, RelError> {
    let hash = || sc.hash().to_string();
    let bad = |detail: String| RelError::BadEntry {
        hash: hash(),
        detail,
    };
    let entries =
        authored_entries::<RelEntry>(sc, MAX_REL_ENTRY_BYTES, author).map_err(|v| match v {
            AppendViolation::NotAnAppend(detail) => RelError::NotAnAppend {
                hash: hash(),
                detail,
            },
            AppendViolation::BadEntry(detail) => bad(detail),
        })?;
    let mut out = Vec::with_capacity(entries.len());
    for (id, entry) in entries {
        if entry.body.owner_only() && author != owner {
            return Err(RelError::OwnerOnly {
                hash: hash(),
                kind: entry.body.kind(),
            });
        }
        entry.body.check_shape().map_err(bad)?;
        out.push((id, entry));
    }
    Ok(out)
}
