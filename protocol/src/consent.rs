//! The consent ledger: one document per customer and grantee, made of append-only entries.
//!
//! Each entry is a JSON text stored under its own id in the root map of an Automerge
//! document. The id is the SHA-256 of the exact entry text, so an entry can never be edited
//! in place: a different text is a different key. A valid change only adds new keys.
//!
//! [`Ledger`] holds the verified changes and entries and answers questions by folding over
//! them; [`ConsentDoc`] adds the materialised Automerge document used for local writes and
//! sync.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

use automerge::{Automerge, ChangeHash};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::append::{
    AppendViolation, Authored, CausalSink, apply_causally, authored_entries, par_map, write_entry,
};
use crate::identity::{IdentityKey, SecretKey};
use crate::scope::Scope;
use crate::signed::{ChangeError, DocId, Signatures, SignedChange, Verified, check_all};
use crate::terms::TermsRef;

/// Seconds since the Unix epoch, UTC. Always passed in; this crate never reads a clock.
pub type UnixSeconds = u64;

/// The largest entry text accepted (8 KiB).
pub const MAX_ENTRY_BYTES: usize = 8 * 1024;
/// Longest purpose text.
pub const MAX_PURPOSE: usize = 200;
/// Most scopes in one grant.
pub const MAX_SCOPES: usize = 64;
/// Longest free text (revocation reason, erasure description).
pub const MAX_NOTE: usize = 2000;
/// Version of the entry schema written by this release.
pub const ENTRY_VERSION: u8 = 1;

const ENTRY_DOMAIN: &[u8] = b"rapport/entry/v1\0";
const CONSENT_DOC_DOMAIN: &[u8] = b"rapport/consent-doc/v1\0";

/// The id of an entry: SHA-256 of its domain-separated text.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EntryId(pub [u8; 32]);

impl EntryId {
    /// The id of an entry text.
    pub fn of(text: &str) -> Self {
        let mut h = Sha256::new();
        h.update(ENTRY_DOMAIN);
        h.update(text.as_bytes());
        Self(h.finalize().into())
    }

    /// Full hex form, the key of the entry in the document.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Reads the hex form.
    pub fn from_hex(s: &str) -> Option<Self> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(Self(out))
    }

    /// The first 8 hex digits, as shown in tables.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..4])
    }
}

impl fmt::Display for EntryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for EntryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EntryId({})", self.short())
    }
}

impl Serialize for EntryId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for EntryId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        EntryId::from_hex(&s)
            .ok_or_else(|| serde::de::Error::custom("entry id is not 64 hex digits"))
    }
}

/// The legal basis a grant records (GDPR article 6(1)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LegalBasis {
    /// 6(1)(a): the customer's consent.
    Consent,
    /// 6(1)(b): performance of a contract with the customer.
    Contract,
    /// 6(1)(c): a legal obligation of the company.
    LegalObligation,
    /// 6(1)(d): vital interests.
    VitalInterests,
    /// 6(1)(e): a task in the public interest.
    PublicTask,
    /// 6(1)(f): legitimate interests.
    LegitimateInterests,
}

impl LegalBasis {
    /// The snake_case name used in files and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            LegalBasis::Consent => "consent",
            LegalBasis::Contract => "contract",
            LegalBasis::LegalObligation => "legal_obligation",
            LegalBasis::VitalInterests => "vital_interests",
            LegalBasis::PublicTask => "public_task",
            LegalBasis::LegitimateInterests => "legitimate_interests",
        }
    }
}

impl std::str::FromStr for LegalBasis {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        serde_json::from_value(serde_json::Value::String(s.replace('-', "_"))).map_err(|_| {
            format!("unknown legal basis {s:?}: expected consent, contract, legal_obligation, vital_interests, public_task or legitimate_interests")
        })
    }
}

/// What an entry says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum EntryBody {
    /// The customer grants scopes to the grantee. Written by the customer.
    Grant {
        /// What the grantee may do.
        scopes: Vec<Scope>,
        /// Why, in the customer's words or the company's notice.
        purpose: String,
        /// The legal basis of the processing.
        legal_basis: LegalBasis,
        /// SHA-256 (hex) of the notice or policy the customer was shown.
        notice_sha256: String,
        /// The customer's terms, which the grantee must accept as they are.
        terms: TermsRef,
        /// When the grant ends, if it does.
        expires: Option<UnixSeconds>,
    },
    /// The customer narrows a grant. Written by the customer.
    Amend {
        /// The grant amended.
        grant: EntryId,
        /// The new scopes (only those also in the grant take effect).
        scopes: Vec<Scope>,
        /// The new end (the earlier of this and the grant's own takes effect).
        expires: Option<UnixSeconds>,
    },
    /// The customer ends a grant for good. Written by the customer.
    Revoke {
        /// The grant revoked.
        grant: EntryId,
        /// Optional reason, for the record.
        reason: Option<String>,
    },
    /// The customer's standing terms for this grantee. Written by the customer.
    TermsProffer {
        /// The terms proffered.
        terms: TermsRef,
    },
    /// The grantee accepts a grant on the customer's exact terms. Written by the grantee.
    Accept {
        /// The grant accepted.
        grant: EntryId,
        /// The terms accepted; must equal the grant's.
        terms: TermsRef,
    },
    /// The grantee confirms it erased what a revocation covers. Written by the grantee.
    ErasureAck {
        /// The revocation acknowledged.
        revoke: EntryId,
        /// The grant it revoked.
        grant: EntryId,
        /// What was erased.
        erased: String,
    },
}

impl EntryBody {
    /// The entry type's name, as in the JSON `type` field.
    pub fn kind(&self) -> &'static str {
        match self {
            EntryBody::Grant { .. } => "grant",
            EntryBody::Amend { .. } => "amend",
            EntryBody::Revoke { .. } => "revoke",
            EntryBody::TermsProffer { .. } => "terms_proffer",
            EntryBody::Accept { .. } => "accept",
            EntryBody::ErasureAck { .. } => "erasure_ack",
        }
    }

    /// The grant this entry names, if it names one.
    fn grant_ref(&self) -> Option<EntryId> {
        match self {
            EntryBody::Amend { grant, .. }
            | EntryBody::Revoke { grant, .. }
            | EntryBody::Accept { grant, .. }
            | EntryBody::ErasureAck { grant, .. } => Some(*grant),
            EntryBody::Grant { .. } | EntryBody::TermsProffer { .. } => None,
        }
    }

    fn by_customer(&self) -> bool {
        matches!(
            self,
            EntryBody::Grant { .. }
                | EntryBody::Amend { .. }
                | EntryBody::Revoke { .. }
                | EntryBody::TermsProffer { .. }
        )
    }

    /// Bounds and shapes every entry must respect, whoever wrote it.
    fn check_shape(&self) -> Result<(), String> {
        match self {
            EntryBody::Grant {
                scopes,
                purpose,
                notice_sha256,
                terms,
                ..
            } => {
                check_scopes(scopes)?;
                if purpose.trim().is_empty() || purpose.chars().count() > MAX_PURPOSE {
                    return Err(format!("purpose must be 1-{MAX_PURPOSE} characters"));
                }
                if notice_sha256.len() != 64 || hex::decode(notice_sha256).is_err() {
                    return Err("notice_sha256 must be 64 hex digits".into());
                }
                check_terms(terms)
            }
            EntryBody::Amend { scopes, .. } => check_scopes(scopes),
            EntryBody::Revoke { reason, .. } => match reason {
                Some(r) if r.chars().count() > MAX_NOTE => {
                    Err(format!("reason is longer than {MAX_NOTE} characters"))
                }
                _ => Ok(()),
            },
            EntryBody::TermsProffer { terms } | EntryBody::Accept { terms, .. } => {
                check_terms(terms)
            }
            EntryBody::ErasureAck { erased, .. } => {
                if erased.chars().count() > MAX_NOTE {
                    Err(format!("erasure note is longer than {MAX_NOTE} characters"))
                } else {
                    Ok(())
                }
            }
        }
    }
}

fn check_scopes(scopes: &[Scope]) -> Result<(), String> {
    if scopes.is_empty() || scopes.len() > MAX_SCOPES {
        return Err(format!("a grant needs 1-{MAX_SCOPES} scopes"));
    }
    Ok(())
}

fn check_terms(terms: &TermsRef) -> Result<(), String> {
    if terms.id.is_empty() || terms.id.len() > 32 || terms.text_sha256.len() != 64 {
        return Err("terms reference is malformed".into());
    }
    Ok(())
}

impl Authored for Entry {
    const VERSION: u8 = ENTRY_VERSION;
    fn version(&self) -> u8 {
        self.v
    }
    fn by(&self) -> &IdentityKey {
        &self.by
    }
}

/// One entry of the ledger.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// Entry schema version.
    pub v: u8,
    /// Who wrote it; must be the author of the change that carries it.
    pub by: IdentityKey,
    /// When, by the writer's clock.
    pub at: UnixSeconds,
    /// What it says.
    pub body: EntryBody,
}

/// Who the consent document is between. Its id is derived from both identities.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ConsentHeader {
    /// The customer who owns the document and grants.
    pub customer: IdentityKey,
    /// The party that is granted, accepts and acknowledges.
    pub grantee: IdentityKey,
}

impl ConsentHeader {
    /// The document id: SHA-256 of `"rapport/consent-doc/v1\0" || customer || grantee`.
    pub fn doc_id(&self) -> DocId {
        let mut h = Sha256::new();
        h.update(CONSENT_DOC_DOMAIN);
        h.update(self.customer.as_bytes());
        h.update(self.grantee.as_bytes());
        DocId(h.finalize().into())
    }

    fn parties(&self) -> [IdentityKey; 2] {
        [self.customer, self.grantee]
    }
}

/// Why a change or entry was refused. The document is left exactly as it was.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConsentError {
    /// The signature, author or encoding of the change does not check.
    #[error(transparent)]
    Change(#[from] ChangeError),
    /// The change does something other than add new entries (edits, deletes, nests).
    #[error("change {hash} does not only append entries: {detail}")]
    NotAnAppend {
        /// Change hash.
        hash: String,
        /// What it did instead.
        detail: String,
    },
    /// The author may not write this kind of entry.
    #[error("change {hash}: the {role} may not write a {kind} entry")]
    Forbidden {
        /// Change hash.
        hash: String,
        /// `customer` or `grantee`.
        role: &'static str,
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
    /// The change depends on changes this ledger does not hold.
    #[error("change {hash} depends on {missing} change(s) this ledger does not hold")]
    MissingDeps {
        /// Change hash.
        hash: String,
        /// How many dependencies are missing.
        missing: usize,
    },
    /// Automerge refused the change (should not happen after the checks above).
    #[error("change {hash} could not be applied: {detail}")]
    Apply {
        /// Change hash.
        hash: String,
        /// Automerge's message.
        detail: String,
    },
    /// A local write that breaks a rule of the ledger's state (e.g. amending a revoked grant).
    #[error("{0}")]
    Refused(String),
    /// The two parties of a consent document must differ.
    #[error("a consent document needs two different parties")]
    SameParties,
}

impl ConsentError {
    /// What kind of refusal this is, for the peer that sent the change.
    pub fn refusal_kind(&self) -> crate::wire::RefusalKind {
        use crate::wire::RefusalKind;
        match self {
            ConsentError::MissingDeps { .. } => RefusalKind::MissingDependencies,
            ConsentError::Forbidden { .. } | ConsentError::Refused(_) => RefusalKind::Forbidden,
            ConsentError::Change(_)
            | ConsentError::NotAnAppend { .. }
            | ConsentError::BadEntry { .. }
            | ConsentError::Apply { .. }
            | ConsentError::SameParties => RefusalKind::Invalid,
        }
    }
}

/// Checks the operations of one change and returns the entries it adds.
///
/// The rule: every operation puts a string at a new key of the root map (no predecessor,
/// so nothing is overwritten), the key is the id of the text, the text parses as an entry of
/// at most [`MAX_ENTRY_BYTES`] written by the change's author, and the author's role may
/// write that entry type.
fn check_ops(
    header: &ConsentHeader,
    sc: &SignedChange,
    author: &IdentityKey,
) -> Result<Vec<(EntryId, Entry)>, ConsentError> {
    let hash = || sc.hash().to_string();
    let bad = |detail: String| ConsentError::BadEntry {
        hash: hash(),
        detail,
    };
    let role = if author == &header.customer {
        "customer"
    } else {
        "grantee"
    };
    let entries = authored_entries::<Entry>(sc, MAX_ENTRY_BYTES, author).map_err(|v| match v {
        AppendViolation::NotAnAppend(detail) => ConsentError::NotAnAppend {
            hash: hash(),
            detail,
        },
        AppendViolation::BadEntry(detail) => bad(detail),
    })?;
    let mut out = Vec::with_capacity(entries.len());
    for (id, entry) in entries {
        if entry.body.by_customer() != (role == "customer") {
            return Err(ConsentError::Forbidden {
                hash: hash(),
                role,
                kind: entry.body.kind(),
            });
        }
        entry.body.check_shape().map_err(bad)?;
        out.push((id, entry));
    }
    Ok(out)
}

/// The entries a change adds, or why it is refused.
type Checked = Result<Vec<(EntryId, Entry)>, ConsentError>;

/// A ledger taking checked changes in causal order, with one more check from the caller.
struct LedgerSink<'a, F> {
    ledger: &'a mut Ledger,
    on_apply: F,
}

impl<F> CausalSink for LedgerSink<'_, F>
where
    F: FnMut(&SignedChange, &[(EntryId, Entry)]) -> Result<(), ConsentError>,
{
    type Item = Vec<(EntryId, Entry)>;
    type Error = ConsentError;

    fn holds(&self, hash: &ChangeHash) -> bool {
        self.ledger.known.contains(hash)
    }

    fn take(&mut self, c: SignedChange, entries: Self::Item) -> Result<(), ConsentError> {
        let entries = self.ledger.check_new(&c, entries)?;
        (self.on_apply)(&c, &entries)?;
        self.ledger.record(c, entries);
        Ok(())
    }

    fn missing(&self, c: &SignedChange, missing: usize) -> ConsentError {
        ConsentError::MissingDeps {
            hash: c.hash().to_string(),
            missing,
        }
    }
}

/// The state of one grant at one moment, as folded from the ledger.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GrantView {
    /// The grant entry's id.
    pub id: EntryId,
    /// When it was granted.
    pub granted_at: UnixSeconds,
    /// The scopes in effect (after amendments).
    pub scopes: Vec<Scope>,
    /// The purpose.
    pub purpose: String,
    /// The legal basis.
    pub legal_basis: LegalBasis,
    /// Hash of the notice shown.
    pub notice_sha256: String,
    /// The customer's terms.
    pub terms: TermsRef,
    /// The end in effect (after amendments).
    pub expires: Option<UnixSeconds>,
    /// The acceptance that counts, if any: entry id and time.
    pub accepted: Option<(EntryId, UnixSeconds)>,
    /// The revocation, if any: entry id and time.
    pub revoked: Option<(EntryId, UnixSeconds)>,
    /// The erasure acknowledgement, if any: entry id and time.
    pub erasure_acked: Option<(EntryId, UnixSeconds)>,
    /// The status at the moment asked about.
    pub status: GrantStatus,
}

/// Where a grant stands at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GrantStatus {
    /// Granted, not yet accepted: gives no access.
    Pending,
    /// Granted, accepted, not expired, not revoked: gives access.
    Active,
    /// Past its end.
    Expired,
    /// Revoked by the customer.
    Revoked,
}

impl GrantStatus {
    /// Lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            GrantStatus::Pending => "pending",
            GrantStatus::Active => "active",
            GrantStatus::Expired => "expired",
            GrantStatus::Revoked => "revoked",
        }
    }
}

/// Verified changes and entries of one consent document.
#[derive(Debug, Clone)]
pub struct Ledger {
    header: ConsentHeader,
    id: DocId,
    entries: BTreeMap<EntryId, Entry>,
    /// Entry ids in the order their changes were applied (a causal order).
    order: Vec<EntryId>,
    /// For each grant id, the entries that name it (amendments, revocations, acceptances,
    /// erasure acknowledgements), so folding one grant does not scan the whole ledger.
    refs: HashMap<EntryId, Vec<EntryId>>,
    /// Applied changes, each after all of its dependencies.
    changes: Vec<SignedChange>,
    known: HashSet<ChangeHash>,
    /// The change (its position in `changes`) that added each entry.
    added_by: HashMap<EntryId, usize>,
}

/// What applying a batch of changes did.
#[derive(Debug, Default)]
pub struct ApplyReport {
    /// Changes newly applied, in the order applied.
    pub applied: Vec<ChangeHash>,
    /// Changes already held.
    pub duplicates: usize,
    /// Changes refused, with the reason. Changes that depend on a refused change are refused
    /// too (as missing dependencies).
    pub rejected: Vec<(ChangeHash, ConsentError)>,
}

impl Ledger {
    /// An empty ledger between two parties.
    pub fn new(header: ConsentHeader) -> Result<Self, ConsentError> {
        if header.customer == header.grantee {
            return Err(ConsentError::SameParties);
        }
        Ok(Self {
            id: header.doc_id(),
            header,
            entries: BTreeMap::new(),
            order: Vec::new(),
            refs: HashMap::new(),
            changes: Vec::new(),
            known: HashSet::new(),
            added_by: HashMap::new(),
        })
    }

    /// Verifies a whole ledger: every change signed by a party, every entry allowed, every
    /// dependency present. Any failure refuses the whole ledger.
    pub fn verify(header: ConsentHeader, changes: Vec<SignedChange>) -> Result<Self, ConsentError> {
        let mut ledger = Self::new(header)?;
        let report = ledger.apply_all(changes);
        match report.rejected.into_iter().next() {
            Some((_, e)) => Err(e),
            None => Ok(ledger),
        }
    }

    /// The parties.
    pub fn header(&self) -> &ConsentHeader {
        &self.header
    }

    /// The document id.
    pub fn id(&self) -> DocId {
        self.id
    }

    /// All entries, by id.
    pub fn entries(&self) -> &BTreeMap<EntryId, Entry> {
        &self.entries
    }

    /// All entries in a causal order: each after every entry its change depended on.
    pub fn entries_in_order(&self) -> impl Iterator<Item = (&EntryId, &Entry)> {
        self.order.iter().map(|id| (id, &self.entries[id]))
    }

    /// All changes, each after its dependencies.
    pub fn changes(&self) -> &[SignedChange] {
        &self.changes
    }

    /// Whether the ledger holds this change.
    pub fn has_change(&self, hash: &ChangeHash) -> bool {
        self.known.contains(hash)
    }

    /// Applies changes received in any order: signatures are batch-verified, then each
    /// change is checked and applied once its dependencies are in. Nothing refused is kept.
    pub fn apply_all(&mut self, changes: Vec<SignedChange>) -> ApplyReport {
        self.apply_all_with(changes, |_, _| Ok(()), Signatures::Verify)
    }

    fn apply_all_with(
        &mut self,
        changes: Vec<SignedChange>,
        on_apply: impl FnMut(&SignedChange, &[(EntryId, Entry)]) -> Result<(), ConsentError>,
        sigs: Signatures,
    ) -> ApplyReport {
        let mut report = ApplyReport::default();
        // Exact copies are dropped here; copies of one change hash with different
        // signatures all go to verification, so a forged copy sent first cannot shadow the
        // honest one (only the first copy that verifies is kept, below).
        let mut seen = HashSet::new();
        let fresh: Vec<SignedChange> = changes
            .into_iter()
            .filter(|c| {
                let new =
                    !self.known.contains(&c.hash()) && seen.insert((c.hash(), c.signature_bytes()));
                if !new {
                    report.duplicates += 1;
                }
                new
            })
            .collect();
        let verdicts = check_all(&self.id, &fresh, &self.header.parties(), sigs);
        let mut verified: Vec<(SignedChange, IdentityKey)> = Vec::with_capacity(fresh.len());
        let mut kept = HashSet::new();
        for (c, verdict) in fresh.into_iter().zip(verdicts) {
            match verdict {
                Ok(_) if !kept.insert(c.hash()) => report.duplicates += 1,
                Ok(author) => verified.push((c, author)),
                Err(e) => report.rejected.push((c.hash(), e.into())),
            }
        }
        // The per-change rules depend only on the change, so they run on all cores; only
        // the checks against the ledger's state run in order below.
        let header = self.header;
        let checked = par_map(&verified, |(c, author)| check_ops(&header, c, author));
        let waiting: Vec<(SignedChange, Checked)> =
            verified.into_iter().map(|(c, _)| c).zip(checked).collect();
        let mut sink = LedgerSink {
            ledger: self,
            on_apply,
        };
        apply_causally(
            &mut sink,
            waiting,
            &mut report.applied,
            &mut report.rejected,
        );
        report
    }

    fn check(
        &self,
        sc: &SignedChange,
        author: &IdentityKey,
    ) -> Result<Vec<(EntryId, Entry)>, ConsentError> {
        self.check_new(sc, check_ops(&self.header, sc, author)?)
    }

    /// Refuses entries the ledger already holds.
    fn check_new(
        &self,
        sc: &SignedChange,
        entries: Vec<(EntryId, Entry)>,
    ) -> Result<Vec<(EntryId, Entry)>, ConsentError> {
        for (id, _) in &entries {
            if self.entries.contains_key(id) {
                return Err(ConsentError::NotAnAppend {
                    hash: sc.hash().to_string(),
                    detail: format!("entry {} already exists", id.short()),
                });
            }
        }
        Ok(entries)
    }

    fn record(&mut self, sc: SignedChange, entries: Vec<(EntryId, Entry)>) {
        self.known.insert(sc.hash());
        for (id, _) in &entries {
            self.added_by.insert(*id, self.changes.len());
        }
        self.changes.push(sc);
        self.order.extend(entries.iter().map(|(id, _)| *id));
        for (id, e) in &entries {
            if let Some(grant) = e.body.grant_ref() {
                self.refs.entry(grant).or_default().push(*id);
            }
        }
        self.entries.extend(entries);
    }

    /// Forgets every change after the first `len`, with their entries.
    fn truncate(&mut self, len: usize) {
        for c in self.changes.drain(len..) {
            self.known.remove(&c.hash());
        }
        let keep: usize = self
            .changes
            .iter()
            .map(|c| c.change().len())
            .sum::<usize>()
            .min(self.order.len());
        for id in self.order.drain(keep..) {
            self.added_by.remove(&id);
            if let Some(e) = self.entries.remove(&id)
                && let Some(grant) = e.body.grant_ref()
                && let Some(list) = self.refs.get_mut(&grant)
            {
                list.retain(|x| *x != id);
            }
        }
    }

    /// The latest of `entries`, the same on every replica that holds them: the one with the
    /// greatest `at`; among several in the same second, the one written after seeing the
    /// others (its change descends from theirs); among those written apart, the greatest
    /// entry id.
    fn latest<'a>(
        &self,
        entries: Vec<(&'a EntryId, &'a Entry)>,
    ) -> Option<(&'a EntryId, &'a Entry)> {
        let at = entries.iter().map(|(_, e)| e.at).max()?;
        let same: Vec<(&EntryId, &Entry)> =
            entries.into_iter().filter(|(_, e)| e.at == at).collect();
        if same.len() == 1 {
            return same.into_iter().next();
        }
        let changes: Vec<usize> = same
            .iter()
            .filter_map(|(id, _)| self.added_by.get(*id).copied())
            .collect();
        let last = same
            .iter()
            .filter(|(id, _)| {
                let Some(&mine) = self.added_by.get(*id) else {
                    return true;
                };
                // Not an ancestor of another one's change.
                !changes
                    .iter()
                    .any(|&other| other != mine && self.descends(other, mine))
            })
            .max_by_key(|(id, _)| **id)
            .copied();
        last.or_else(|| same.into_iter().max_by_key(|(id, _)| *id))
    }

    /// Whether change `later` (a position in `changes`) has change `earlier` in its history.
    fn descends(&self, later: usize, earlier: usize) -> bool {
        if later <= earlier {
            // Applied in a causal order: nothing depends on what comes after it.
            return false;
        }
        let target = self.changes[earlier].hash();
        let position: HashMap<ChangeHash, usize> = self.changes[earlier..=later]
            .iter()
            .enumerate()
            .map(|(i, c)| (c.hash(), earlier + i))
            .collect();
        let mut stack = vec![later];
        let mut seen = HashSet::new();
        while let Some(i) = stack.pop() {
            for d in self.changes[i].change().deps() {
                if *d == target {
                    return true;
                }
                if let Some(&j) = position.get(d)
                    && seen.insert(j)
                {
                    stack.push(j);
                }
            }
        }
        false
    }

    /// Entries naming grant `grant` that match `pred`.
    fn refs_of<'a>(
        &'a self,
        grant: &EntryId,
        pred: impl Fn(&EntryBody) -> bool + 'a,
    ) -> impl Iterator<Item = (&'a EntryId, &'a Entry)> + 'a {
        self.refs
            .get(grant)
            .into_iter()
            .flatten()
            .map(|id| (id, &self.entries[id]))
            .filter(move |(_, e)| pred(&e.body))
    }

    fn entries_of<'a>(
        &'a self,
        pred: impl Fn(&EntryBody) -> bool + 'a,
    ) -> impl Iterator<Item = (&'a EntryId, &'a Entry)> + 'a {
        self.entries.iter().filter(move |(_, e)| pred(&e.body))
    }

    /// Every grant and where it stands at `now`, oldest first.
    pub fn grants(&self, now: UnixSeconds) -> Vec<GrantView> {
        let mut views: Vec<GrantView> = self
            .entries
            .iter()
            .filter_map(|(id, e)| self.view(id, e, now))
            .collect();
        views.sort_by_key(|v| (v.granted_at, v.id));
        views
    }

    /// One grant at `now`.
    pub fn grant(&self, id: &EntryId, now: UnixSeconds) -> Option<GrantView> {
        self.entries.get(id).and_then(|e| self.view(id, e, now))
    }

    /// Does the grantee hold `scope` at time `at`? Only if some grant made by then covers it,
    /// was accepted on its terms by then, has not expired and has not been revoked by then.
    pub fn holds(&self, scope: &Scope, at: UnixSeconds) -> bool {
        self.grants(at)
            .iter()
            .any(|g| g.status == GrantStatus::Active && g.scopes.contains(scope))
    }

    fn view(&self, id: &EntryId, entry: &Entry, now: UnixSeconds) -> Option<GrantView> {
        let EntryBody::Grant {
            scopes,
            purpose,
            legal_basis,
            notice_sha256,
            terms,
            expires,
        } = &entry.body
        else {
            return None;
        };
        if entry.at > now {
            return None;
        }
        // The latest amendment made by `now` wins (see `latest`). An amendment can only
        // narrow.
        let amend = self.latest(
            self.refs_of(
                id,
                |b| matches!(b, EntryBody::Amend { grant, .. } if grant == id),
            )
            .filter(|(_, e)| e.at <= now)
            .collect(),
        );
        let (scopes, expires) = match amend {
            Some((_, a)) => {
                let EntryBody::Amend {
                    scopes: s,
                    expires: x,
                    ..
                } = &a.body
                else {
                    unreachable!()
                };
                let mut narrowed: Vec<Scope> =
                    s.iter().filter(|sc| scopes.contains(sc)).cloned().collect();
                narrowed.sort();
                narrowed.dedup();
                let end = match (expires, x) {
                    (Some(a), Some(b)) => Some((*a).min(*b)),
                    (a, b) => a.or(*b),
                };
                (narrowed, end)
            }
            None => {
                let mut s = scopes.clone();
                s.sort();
                s.dedup();
                (s, *expires)
            }
        };
        let earliest = |it: &mut dyn Iterator<Item = (&EntryId, &Entry)>| {
            it.filter(|(_, e)| e.at <= now)
                .min_by_key(|(eid, e)| (e.at, **eid))
                .map(|(eid, e)| (*eid, e.at))
        };
        let accepted = earliest(&mut self.refs_of(
            id,
            |b| matches!(b, EntryBody::Accept { grant, terms: t } if grant == id && t == terms),
        ));
        let revoked = earliest(&mut self.refs_of(
            id,
            |b| matches!(b, EntryBody::Revoke { grant, .. } if grant == id),
        ));
        let erasure_acked = revoked.and_then(|(rid, _)| {
            earliest(&mut self.refs_of(id, move |b| {
                matches!(b, EntryBody::ErasureAck { revoke, grant, .. } if *revoke == rid && grant == id)
            }))
        });
        let status = if revoked.is_some() {
            GrantStatus::Revoked
        } else if expires.is_some_and(|x| x <= now) {
            GrantStatus::Expired
        } else if accepted.is_some() {
            GrantStatus::Active
        } else {
            GrantStatus::Pending
        };
        Some(GrantView {
            id: *id,
            granted_at: entry.at,
            scopes,
            purpose: purpose.clone(),
            legal_basis: *legal_basis,
            notice_sha256: notice_sha256.clone(),
            terms: terms.clone(),
            expires,
            accepted,
            revoked,
            erasure_acked,
            status,
        })
    }

    /// The terms the customer proffered last (by time, then id), if any.
    pub fn proffered_terms(&self) -> Option<&TermsRef> {
        self.entries_of(|b| matches!(b, EntryBody::TermsProffer { .. }))
            .max_by_key(|(id, e)| (e.at, **id))
            .map(|(_, e)| match &e.body {
                EntryBody::TermsProffer { terms } => terms,
                _ => unreachable!(),
            })
    }

    /// Rules a local writer must respect on top of what every replica checks: references
    /// must point at entries that exist, and the state must allow the step.
    fn check_local(
        &self,
        author: &IdentityKey,
        body: &EntryBody,
        at: UnixSeconds,
    ) -> Result<(), ConsentError> {
        let refused = |m: String| Err(ConsentError::Refused(m));
        if body.by_customer() != (author == &self.header.customer) {
            let role = if author == &self.header.customer {
                "customer"
            } else {
                "grantee"
            };
            return refused(format!("the {role} may not write a {} entry", body.kind()));
        }
        body.check_shape().map_err(ConsentError::Refused)?;
        let grant_at = |g: &EntryId| -> Result<GrantView, ConsentError> {
            self.grant(g, UnixSeconds::MAX)
                .ok_or_else(|| ConsentError::Refused(format!("there is no grant {}", g.short())))
        };
        match body {
            EntryBody::Grant { terms, expires, .. } => {
                if terms.resolve().is_none() {
                    return refused(format!(
                        "terms {} v{} are not in this release's roster",
                        terms.id, terms.version
                    ));
                }
                if expires.is_some_and(|x| x <= at) {
                    return refused("the expiry date is already past".into());
                }
            }
            EntryBody::TermsProffer { terms } => {
                if terms.resolve().is_none() {
                    return refused(format!(
                        "terms {} are not in this release's roster",
                        terms.id
                    ));
                }
            }
            EntryBody::Amend {
                grant,
                scopes,
                expires,
            } => {
                let g = grant_at(grant)?;
                if g.revoked.is_some() {
                    return refused(format!("grant {} is already revoked", grant.short()));
                }
                let Some(EntryBody::Grant {
                    scopes: original,
                    expires: original_end,
                    ..
                }) = self.entries.get(grant).map(|e| &e.body)
                else {
                    unreachable!()
                };
                if let Some(extra) = scopes.iter().find(|s| !original.contains(s)) {
                    return refused(format!(
                        "an amendment can only narrow a grant, and {extra} is not in grant {}; make a new grant instead",
                        grant.short()
                    ));
                }
                if let Some(end) = original_end
                    && expires.is_none_or(|n| n > *end)
                {
                    return refused(format!(
                        "an amendment cannot extend grant {} past its end; make a new grant instead",
                        grant.short()
                    ));
                }
            }
            EntryBody::Revoke { grant, .. } => {
                if grant_at(grant)?.revoked.is_some() {
                    return refused(format!("grant {} is already revoked", grant.short()));
                }
            }
            EntryBody::Accept { grant, terms } => {
                let g = grant_at(grant)?;
                if g.revoked.is_some() {
                    return refused(format!(
                        "grant {} is revoked and cannot be accepted",
                        grant.short()
                    ));
                }
                if g.accepted.is_some() {
                    return refused(format!("grant {} is already accepted", grant.short()));
                }
                if &g.terms != terms {
                    return refused(format!(
                        "grant {} is on terms {}, not {}",
                        grant.short(),
                        g.terms.id,
                        terms.id
                    ));
                }
            }
            EntryBody::ErasureAck { revoke, grant, .. } => {
                let g = grant_at(grant)?;
                match g.revoked {
                    Some((rid, _)) if rid == *revoke => {}
                    _ => {
                        return refused(format!(
                            "grant {} has no revocation {}",
                            grant.short(),
                            revoke.short()
                        ));
                    }
                }
                if g.erasure_acked.is_some() {
                    return refused(format!(
                        "erasure of grant {} is already acknowledged",
                        grant.short()
                    ));
                }
            }
        }
        Ok(())
    }
}

/// A consent document: the verified [`Ledger`] plus the Automerge document it materialises,
/// for local writes and sync.
#[derive(Debug, Clone)]
pub struct ConsentDoc {
    ledger: Ledger,
    /// Boxed, like a relationship's: inline it made the document about 4 KiB, copied each
    /// time one moved.
    doc: Box<Automerge>,
}

impl ConsentDoc {
    /// An empty document between two parties.
    pub fn new(header: ConsentHeader) -> Result<Self, ConsentError> {
        Ok(Self {
            ledger: Ledger::new(header)?,
            doc: Box::default(),
        })
    }

    /// Builds a document from changes, refusing it whole if any change does not check.
    pub fn load(header: ConsentHeader, changes: Vec<SignedChange>) -> Result<Self, ConsentError> {
        Self::load_as(header, changes, Signatures::Verify)
    }

    /// [`load`](Self::load) for changes from this node's own store, verified when they
    /// arrived: their signatures are not checked again; every other rule is.
    pub fn load_trusted(
        header: ConsentHeader,
        changes: Vec<SignedChange>,
    ) -> Result<Self, ConsentError> {
        Self::load_as(header, changes, Signatures::Trusted)
    }

    fn load_as(
        header: ConsentHeader,
        changes: Vec<SignedChange>,
        sigs: Signatures,
    ) -> Result<Self, ConsentError> {
        let mut doc = Self::new(header)?;
        let report = doc.apply_as(changes, sigs);
        match report.rejected.into_iter().next() {
            Some((_, e)) => Err(e),
            None => Ok(doc),
        }
    }

    /// The verified ledger.
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// The Automerge document.
    pub fn automerge(&self) -> &Automerge {
        &self.doc
    }

    /// The current heads.
    pub fn heads(&self) -> Vec<ChangeHash> {
        self.doc.get_heads()
    }

    /// The changes this document holds that are not in the history of `heads` (the heads
    /// another replica reported), in a causal order. Unknown heads are ignored.
    pub fn changes_missing_from(&self, heads: &[ChangeHash]) -> Vec<&SignedChange> {
        let index: HashMap<ChangeHash, usize> = self
            .ledger
            .changes
            .iter()
            .enumerate()
            .map(|(i, c)| (c.hash(), i))
            .collect();
        crate::relationship::missing_from(&self.ledger.changes, &index, heads)
    }

    /// Applies received changes; refused ones change nothing and are reported.
    pub fn apply(&mut self, changes: Vec<SignedChange>) -> ApplyReport {
        self.apply_as(changes, Signatures::Verify)
    }

    /// [`apply`](Self::apply) for changes whose signatures this node may have checked
    /// ahead ([`crate::verify_named`]): the copies `ahead` vouches for are not verified
    /// again; every other change is, and every other rule runs for all.
    pub fn apply_with(
        &mut self,
        changes: Vec<SignedChange>,
        ahead: Option<&Verified>,
    ) -> ApplyReport {
        self.apply_as(
            changes,
            ahead.map_or(Signatures::Verify, Signatures::Checked),
        )
    }

    fn apply_as(&mut self, changes: Vec<SignedChange>, sigs: Signatures) -> ApplyReport {
        // Check everything against the ledger first, then hand Automerge all accepted changes
        // in one call: applying one change at a time costs Automerge far more per change.
        let before = self.ledger.changes.len();
        let mut report = self.ledger.apply_all_with(changes, |_, _| Ok(()), sigs);
        let fresh: Vec<automerge::Change> = self.ledger.changes[before..]
            .iter()
            .map(|c| c.change().clone())
            .collect();
        if fresh.is_empty() || self.doc.apply_changes(fresh).is_ok() {
            return report;
        }
        // Automerge refused a change the ledger accepted (it should not). Undo, rebuild the
        // document from the ledger, and go change by change so only the culprit is refused.
        let accepted = self.ledger.changes[before..].to_vec();
        self.ledger.truncate(before);
        let mut doc = Automerge::new();
        doc.apply_changes(self.ledger.changes.iter().map(|c| c.change().clone()))
            .expect("changes Automerge applied before apply again");
        *self.doc = doc;
        let doc = &mut self.doc;
        let retry = self.ledger.apply_all_with(
            accepted,
            |c, _| {
                doc.apply_changes([c.change().clone()])
                    .map_err(|e| ConsentError::Apply {
                        hash: c.hash().to_string(),
                        detail: e.to_string(),
                    })
            },
            // Verified a moment ago, in this call.
            Signatures::Trusted,
        );
        report.applied = retry.applied;
        report.rejected.extend(retry.rejected);
        report
    }

    /// Writes one entry as `key`'s identity, at time `at`, signing the change. `nonce` names
    /// the writer session (see [`actor_for`]). Returns the entry id and the signed change to
    /// store and send. On any error nothing changes.
    pub fn append(
        &mut self,
        key: &SecretKey,
        nonce: [u8; 16],
        at: UnixSeconds,
        body: EntryBody,
    ) -> Result<(EntryId, SignedChange), ConsentError> {
        let author = key.identity();
        if !self.ledger.header.parties().contains(&author) {
            return Err(ConsentError::Refused(format!(
                "{author} is not a party to this consent document"
            )));
        }
        self.ledger.check_local(&author, &body, at)?;
        let entry = Entry {
            v: ENTRY_VERSION,
            by: author,
            at,
            body,
        };
        let text = serde_json::to_string(&entry).expect("entries serialise");
        let id = EntryId::of(&text);
        if self.ledger.entries.contains_key(&id) {
            return Err(ConsentError::Refused(format!(
                "entry {} already exists",
                id.short()
            )));
        }
        // Every rule was checked above, so the write below cannot be refused.
        let signed = write_entry(&mut self.doc, &self.ledger.id, key, nonce, at, &id, text)?;
        let entries = self.ledger.check(&signed, &author)?;
        self.ledger.record(signed.clone(), entries);
        Ok((id, signed))
    }
}
