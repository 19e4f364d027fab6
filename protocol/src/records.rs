//! Exports of the consent held in a [`Ledger`] in two open shapes: ISO/IEC TS 27560:2023
//! consent records and Kantara Consent Receipt v1.1 receipts, one of each per grant.
//!
//! Everything comes from the verified ledger and from what the caller passes in
//! ([`RecordContext`]): nothing is invented. A field either format requires that only the
//! caller can supply (the controller's address, the jurisdiction, …) and that is empty gives
//! [`RecordError::MissingFields`], naming every such field at once, instead of a placeholder. Time is passed in, as everywhere in
//! this crate: a grant's status is its status at [`RecordContext::now`].
//!
//! # ISO/IEC TS 27560:2023 consent record (`rapport-27560/1`)
//!
//! Field names are the snake_case names of ISO/IEC TS 27560 clause 6.3 as used by the DPV
//! 27560 guide; fields marked *ext* are ours.
//!
//! | JSON field | 27560 | from |
//! |---|---|---|
//! | `schema` | – (*ext*) | `{"standard": "ISO/IEC TS 27560:2023", "mapping": "rapport-27560/1"}` |
//! | `schema_version` | schema_version | `"rapport-27560/1"` |
//! | `record_id` | record_id | grant entry id (hex) |
//! | `pii_principal_id` | pii_principal_id | customer identity text |
//! | `pii_principal` | party (PII principal) | `party_id` = customer identity, `party_name` = [`RecordContext::customer_name`] if given |
//! | `created` | (DCT `created`) | grant time, RFC 3339 UTC |
//! | `last_updated` | (DCT `modified`) | time of the latest event |
//! | `generated` | – (*ext*) | [`RecordContext::now`] |
//! | `language` | language | `"en"` |
//! | `privacy_notice` | privacy_notice | `notice_sha256` of the grant; `policy_url` if given |
//! | `jurisdiction` | jurisdiction | [`RecordContext::jurisdiction`] |
//! | `collection_method` | collection_method | [`RecordContext::collection_method`], if given |
//! | `pii_controllers[]` | pii_controllers / party fields | `party_id` = grantee identity; `party_name`, `party_contact`, `party_address`, `party_email`, `party_phone`, `party_url` from [`ControllerInfo`]; `party_role` = `"pii_controller"` |
//! | `purposes[].purpose` | purposes | grant purpose |
//! | `purposes[].lawful_basis` | lawful_basis | `basis` (as in the ledger), `gdpr` article, `dpv` concept (`eu-gdpr:A6-1-a` …) |
//! | `purposes[].pii_information[]` | pii_information / pii_type, pii_attribute_id | from the scopes in effect: `profile:<f>:read` → `<f>`, `conversation:*` → `conversation content`, `contact:<p>` → `contact for <p>`, `segment:<s>:read` → `membership of segment <s>`; `pii_attribute_id` lists the scopes |
//! | `purposes[].processing_method[]` | processing_method | one `{scope, operation}` per scope in effect |
//! | `purposes[].pii_controllers` | pii_controllers | grantee identity |
//! | `purposes[].third_party_disclosure` | – (*ext*) | terms: `third_party_sharing` |
//! | `purposes[].recipient_third_parties` | recipient_third_parties | `[]` unless the terms allow sharing |
//! | `purposes[].scopes` | – (*ext*) | scopes in effect (after amendments) |
//! | `terms` | – (*ext*) | the customer's terms: roster id, version, text hash, text and what they allow |
//! | `withdrawal_method` | withdrawal_method | a signed `revoke` entry in the consent ledger |
//! | `retention_period` | retention_period | until expiry or revocation, then erasure, acknowledged by a signed `erasure_ack` |
//! | `validity_duration` | validity_duration | `start` = grant time, `end` = end in effect or `null` |
//! | `status` | event_state (current) | `pending`, `active`, `expired` or `revoked` at `now` |
//! | `consent_status` | event_state (current) | the DPV consent status of `status` |
//! | `events[]` | events | state history, oldest first (see below) |
//! | `evidence` | – (*ext*) | `consent_document_id` and the `entry_ids` of every event |
//!
//! Each event has `event_time` (RFC 3339), `event_state` (`given`, `accepted`, `amended`,
//! `expired`, `revoked`, `erasure_acknowledged`), `consent_status` (the DPV status after the
//! event), `event_type` (`dpv:ExplicitlyExpressedConsent` for `given`), `entity_id` (the
//! identity that signed the entry; absent for `expired`, which nobody signs), `evidence`
//! (`entry_id` and `entry_type` of the ledger entry that proves it; for `expired`, the entry
//! that set the end) and `details` (what the entry says: scopes, end, reason, erasure note).
//! Only entries made by `now` count, as in [`Ledger::grants`]; the acceptance, revocation and
//! erasure acknowledgement listed are the ones that count in the ledger's fold.
//!
//! # Kantara Consent Receipt v1.1
//!
//! `version` `"KI-CR-v1.1.0"`; `jurisdiction`, `collectionMethod` and `policyUrl` from the
//! context; `consentTimestamp` = grant time (Unix seconds); `consentReceiptID` = grant entry
//! id (hex), so the same grant always gets the same receipt id; `publicKey` = the PII
//! controller's (grantee's) identity, as the specification defines the field;
//! `language` `"en"`; `piiPrincipalId` = customer identity; `piiControllers` = one
//! controller from [`ControllerInfo`] (`address` as a schema.org `PostalAddress` whose
//! `streetAddress` is the caller's text); one `services` entry whose `service` is the grant
//! purpose, with one purpose: `purposeCategory` (Kantara categories mapped from the scopes),
//! `consentType` `"EXPLICIT"`, `piiCategory` (as `pii_information` above),
//! `primaryPurpose` `true`, `termination` (the end in effect, or revocation by the PII
//! principal), `thirdPartyDisclosure` (the terms' `third_party_sharing`) and `thirdPartyName`
//! only when that is true; `sensitive` `false` and `spiCat` `[]`. Scopes and end are those in
//! effect at `now` (after amendments).

use std::fmt;

use serde_json::{Map, Value, json};

use crate::consent::{
    Entry, EntryBody, EntryId, GrantStatus, GrantView, Ledger, LegalBasis, UnixSeconds,
};
use crate::scope::Scope;
use crate::terms::Terms;

/// The ISO/IEC TS 27560 profile written by this release.
pub const ISO27560_MAPPING: &str = "rapport-27560/1";
/// The Kantara Consent Receipt version written.
pub const KANTARA_CR_VERSION: &str = "KI-CR-v1.1.0";

const ISO27560_STANDARD: &str = "ISO/IEC TS 27560:2023";
const LANGUAGE: &str = "en";
const REVOCATION: &str = "revocation by the PII principal";

/// What the caller knows about the PII controller (the grantee). The ledger only knows its
/// identity; everything else comes from here.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ControllerInfo {
    /// Legal name.
    pub name: String,
    /// A contact person or office.
    pub contact: String,
    /// Postal address.
    pub address: String,
    /// Contact email.
    pub email: String,
    /// Contact phone.
    pub phone: String,
    /// Web site, if known.
    pub url: Option<String>,
}

/// Everything an export needs besides the ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordContext {
    /// The moment the records describe (status, history and ends are as of then).
    pub now: UnixSeconds,
    /// The jurisdiction(s) that apply, e.g. `EU` or `DE`.
    pub jurisdiction: String,
    /// The controller's privacy policy.
    pub policy_url: String,
    /// How consent was collected, e.g. `rapport signed consent ledger`.
    pub collection_method: String,
    /// The PII controller.
    pub controller: ControllerInfo,
    /// The customer's name, if they want it in the records.
    pub customer_name: Option<String>,
}

/// Why an export was refused. Nothing is exported in part.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RecordError {
    /// Fields the format requires that were not given (or are blank), every one of them,
    /// e.g. `["controller email"]`.
    MissingFields(Vec<&'static str>),
    /// A grant names terms this release does not know, so what they allow (third-party
    /// disclosure) cannot be stated.
    UnknownTerms {
        /// The grant's entry id (hex).
        grant: String,
        /// The terms' roster id and version.
        terms: String,
    },
}

impl fmt::Display for RecordError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecordError::MissingFields(fields) => {
                let flags: Vec<String> = fields
                    .iter()
                    .map(|f| format!("--{}", f.replace(' ', "-")))
                    .collect();
                let verb = if fields.len() == 1 { "is" } else { "are" };
                write!(
                    f,
                    "{} {verb} empty: pass {}",
                    fields.join(", "),
                    flags.join(" ")
                )
            }
            RecordError::UnknownTerms { grant, terms } => write!(
                f,
                "grant {grant} is on terms {terms}, which this release does not know: upgrade to export it"
            ),
        }
    }
}

impl std::error::Error for RecordError {}

/// Formats Unix seconds as an RFC 3339 UTC timestamp, e.g. `2023-11-14T22:13:20Z`.
///
/// Years past 9999 (only reachable with absurd expiry dates) are written with as many digits
/// as they need.
pub fn rfc3339_utc(secs: UnixSeconds) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Proleptic Gregorian (year, month, day) of a day count since 1970-01-01 (H. Hinnant's
/// `civil_from_days`, unsigned since days are never before the epoch here).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097; // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365], from 1 March
    let mp = (5 * doy + 2) / 153; // [0, 11], March = 0
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

/// One ISO/IEC TS 27560 consent record per grant in `ledger`, oldest grant first. See the
/// module documentation for the fields.
pub fn iso27560_records(ledger: &Ledger, ctx: &RecordContext) -> Result<Vec<Value>, RecordError> {
    let c = &ctx.controller;
    require(iso27560_missing(ctx))?;
    let header = ledger.header();
    let customer = header.customer.to_string();
    let grantee = header.grantee.to_string();

    let mut controller = Map::new();
    controller.insert("party_id".into(), json!(grantee));
    controller.insert("party_role".into(), json!("pii_controller"));
    controller.insert("party_name".into(), json!(c.name));
    controller.insert("party_contact".into(), json!(c.contact));
    controller.insert("party_address".into(), json!(c.address));
    insert_given(&mut controller, "party_email", Some(&c.email));
    insert_given(&mut controller, "party_phone", Some(&c.phone));
    insert_given(&mut controller, "party_url", c.url.as_ref());

    let mut principal = Map::new();
    principal.insert("party_id".into(), json!(customer));
    principal.insert("party_role".into(), json!("pii_principal"));
    insert_given(&mut principal, "party_name", ctx.customer_name.as_ref());

    let mut out = Vec::new();
    for view in ledger.grants(ctx.now) {
        let terms = resolve_terms(&view)?;
        let events = history(ledger, &view, ctx.now);
        let last = events.last().map_or(view.granted_at, |e| e.at);

        let mut notice = Map::new();
        notice.insert("notice_sha256".into(), json!(view.notice_sha256));
        insert_given(&mut notice, "policy_url", Some(&ctx.policy_url));

        let mut record = Map::new();
        record.insert(
            "schema".into(),
            json!({ "standard": ISO27560_STANDARD, "mapping": ISO27560_MAPPING }),
        );
        record.insert("schema_version".into(), json!(ISO27560_MAPPING));
        record.insert("record_id".into(), json!(view.id.to_hex()));
        record.insert("pii_principal_id".into(), json!(customer));
        record.insert("pii_principal".into(), Value::Object(principal.clone()));
        record.insert("created".into(), json!(rfc3339_utc(view.granted_at)));
        record.insert("last_updated".into(), json!(rfc3339_utc(last)));
        record.insert("generated".into(), json!(rfc3339_utc(ctx.now)));
        record.insert("language".into(), json!(LANGUAGE));
        record.insert("privacy_notice".into(), Value::Object(notice));
        record.insert("jurisdiction".into(), json!(ctx.jurisdiction));
        insert_given(
            &mut record,
            "collection_method",
            Some(&ctx.collection_method),
        );
        record.insert(
            "pii_controllers".into(),
            json!([Value::Object(controller.clone())]),
        );
        record.insert(
            "purposes".into(),
            json!([{
                "purpose": view.purpose,
                "lawful_basis": lawful_basis(view.legal_basis),
                "pii_information": view.scopes.iter().fold(Vec::<Value>::new(), |mut acc, s| {
                    let t = pii_category(s);
                    match acc.iter_mut().find(|v| v["pii_type"] == t.as_str()) {
                        Some(v) => v["pii_attribute_id"].as_array_mut().expect("array").push(json!(s.to_string())),
                        None => acc.push(json!({ "pii_type": t, "pii_attribute_id": [s.to_string()] })),
                    }
                    acc
                }),
                "processing_method": view.scopes.iter().map(|s| json!({
                    "scope": s.to_string(),
                    "operation": operation(s),
                })).collect::<Vec<_>>(),
                "pii_controllers": [grantee],
                "third_party_disclosure": terms.third_party_sharing,
                "recipient_third_parties": third_parties(terms).into_iter().collect::<Vec<_>>(),
                "scopes": view.scopes.iter().map(ToString::to_string).collect::<Vec<_>>(),
            }]),
        );
        record.insert(
            "terms".into(),
            json!({
                "id": view.terms.id,
                "version": view.terms.version,
                "text_sha256": view.terms.text_sha256,
                "text": terms.text,
                "analytics": terms.analytics,
                "tracking": terms.tracking,
                "profiling": terms.profiling,
                "third_party_sharing": terms.third_party_sharing,
                "data_portability": terms.data_portability,
            }),
        );
        record.insert(
            "withdrawal_method".into(),
            json!("revocation by the PII principal: a signed revoke entry appended to the shared consent ledger"),
        );
        record.insert(
            "retention_period".into(),
            json!(format!(
                "until {}; on revocation the PII controller erases what the grant covers and signs an erasure acknowledgement",
                termination(&view)
            )),
        );
        record.insert(
            "validity_duration".into(),
            json!({
                "start": rfc3339_utc(view.granted_at),
                "end": view.expires.map(rfc3339_utc),
            }),
        );
        record.insert("status".into(), json!(view.status.as_str()));
        record.insert("consent_status".into(), json!(dpv_status(view.status)));
        record.insert(
            "evidence".into(),
            json!({
                "consent_document_id": ledger.id().to_hex(),
                "entry_ids": events.iter().map(|e| e.entry.to_hex()).collect::<Vec<_>>(),
            }),
        );
        record.insert(
            "events".into(),
            Value::Array(events.iter().map(Event::to_json).collect()),
        );
        out.push(Value::Object(record));
    }
    Ok(out)
}

/// One Kantara Consent Receipt v1.1 per grant in `ledger`, oldest grant first. See the module
/// documentation for the fields.
pub fn kantara_receipts(ledger: &Ledger, ctx: &RecordContext) -> Result<Vec<Value>, RecordError> {
    let c = &ctx.controller;
    require(kantara_missing(ctx))?;
    let header = ledger.header();

    let mut controller = Map::new();
    controller.insert("piiController".into(), json!(c.name));
    controller.insert("contact".into(), json!(c.contact));
    controller.insert("address".into(), json!({ "streetAddress": c.address }));
    controller.insert("email".into(), json!(c.email));
    controller.insert("phone".into(), json!(c.phone));
    insert_given(&mut controller, "piiControllerUrl", c.url.as_ref());

    let mut out = Vec::new();
    for view in ledger.grants(ctx.now) {
        let terms = resolve_terms(&view)?;
        let mut categories: Vec<(u8, &str)> = view.scopes.iter().map(purpose_category).collect();
        categories.sort_unstable();
        categories.dedup();
        let mut purpose = Map::new();
        purpose.insert("purpose".into(), json!(view.purpose));
        purpose.insert(
            "purposeCategory".into(),
            json!(
                categories
                    .iter()
                    .map(|(n, name)| format!("{n} - {name}"))
                    .collect::<Vec<_>>()
            ),
        );
        purpose.insert("consentType".into(), json!("EXPLICIT"));
        purpose.insert("piiCategory".into(), json!(pii_categories(&view.scopes)));
        purpose.insert("primaryPurpose".into(), json!(true));
        purpose.insert("termination".into(), json!(termination(&view)));
        purpose.insert(
            "thirdPartyDisclosure".into(),
            json!(terms.third_party_sharing),
        );
        if let Some(name) = third_parties(terms) {
            purpose.insert("thirdPartyName".into(), json!(name));
        }
        out.push(json!({
            "version": KANTARA_CR_VERSION,
            "jurisdiction": ctx.jurisdiction,
            "consentTimestamp": view.granted_at,
            "collectionMethod": ctx.collection_method,
            "consentReceiptID": view.id.to_hex(),
            "publicKey": header.grantee.to_string(),
            "language": LANGUAGE,
            "piiPrincipalId": header.customer.to_string(),
            "piiControllers": [Value::Object(controller.clone())],
            "policyUrl": ctx.policy_url,
            "services": [{
                "service": view.purpose,
                "purposes": [Value::Object(purpose)],
            }],
            "sensitive": false,
            "spiCat": [],
        }));
    }
    Ok(out)
}

/// The fields ISO/IEC TS 27560 records need from `ctx` that are empty, in the order of the
/// command's options.
pub fn iso27560_missing(ctx: &RecordContext) -> Vec<&'static str> {
    let c = &ctx.controller;
    blank(&[
        (&c.name, "controller name"),
        (&c.contact, "controller contact"),
        (&c.address, "controller address"),
        (&ctx.jurisdiction, "jurisdiction"),
    ])
}

/// The fields Kantara receipts need from `ctx` that are empty, in the order of the
/// command's options.
pub fn kantara_missing(ctx: &RecordContext) -> Vec<&'static str> {
    let c = &ctx.controller;
    blank(&[
        (&c.name, "controller name"),
        (&c.contact, "controller contact"),
        (&c.address, "controller address"),
        (&c.email, "controller email"),
        (&c.phone, "controller phone"),
        (&ctx.jurisdiction, "jurisdiction"),
        (&ctx.policy_url, "policy url"),
        (&ctx.collection_method, "collection method"),
    ])
}

fn blank(fields: &[(&String, &'static str)]) -> Vec<&'static str> {
    fields
        .iter()
        .filter(|(v, _)| v.trim().is_empty())
        .map(|(_, name)| *name)
        .collect()
}

fn require(missing: Vec<&'static str>) -> Result<(), RecordError> {
    if missing.is_empty() {
        Ok(())
    } else {
        Err(RecordError::MissingFields(missing))
    }
}

/// Inserts `value` only if it is given and not blank.
fn insert_given(map: &mut Map<String, Value>, key: &str, value: Option<&String>) {
    if let Some(v) = value.filter(|v| !v.trim().is_empty()) {
        map.insert(key.into(), json!(v));
    }
}

fn resolve_terms(view: &GrantView) -> Result<&'static Terms, RecordError> {
    view.terms
        .resolve()
        .ok_or_else(|| RecordError::UnknownTerms {
            grant: view.id.to_hex(),
            terms: format!("{} v{}", view.terms.id, view.terms.version),
        })
}

/// Who the terms let the controller disclose to, if anyone. The roster names no recipients,
/// so this says no more than the terms do.
fn third_parties(terms: &Terms) -> Option<String> {
    terms.third_party_sharing.then(|| {
        format!(
            "third parties as allowed by terms {} v{}",
            terms.id, terms.version
        )
    })
}

fn termination(view: &GrantView) -> String {
    match view.expires {
        Some(end) => format!("{} (expiry), or earlier on {REVOCATION}", rfc3339_utc(end)),
        None => REVOCATION.to_owned(),
    }
}

/// The category of personal data a scope exposes.
fn pii_category(scope: &Scope) -> String {
    match scope {
        Scope::ConversationRead | Scope::ConversationWrite => "conversation content".into(),
        Scope::ProfileRead(field) => field.clone(),
        Scope::Contact(purpose) => format!("contact for {purpose}"),
        Scope::SegmentRead(name) => format!("membership of segment {name}"),
    }
}

/// The distinct categories of a list of scopes, in scope order.
fn pii_categories(scopes: &[Scope]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for s in scopes {
        let c = pii_category(s);
        if !out.contains(&c) {
            out.push(c);
        }
    }
    out
}

fn operation(scope: &Scope) -> String {
    match scope {
        Scope::ConversationRead => "read the shared conversation".into(),
        Scope::ConversationWrite => "write messages into the shared conversation".into(),
        Scope::ProfileRead(field) => format!("read the profile field {field}"),
        Scope::Contact(purpose) => format!("contact the PII principal for {purpose}"),
        Scope::SegmentRead(name) => {
            format!("read the PII principal's membership of segment {name}")
        }
    }
}

/// Kantara v1.1 purpose category (number and name) for a scope.
fn purpose_category(scope: &Scope) -> (u8, &'static str) {
    match scope {
        Scope::ConversationRead | Scope::ConversationWrite => (1, "Core Function"),
        Scope::ProfileRead(_) => (2, "Contracted Service"),
        Scope::Contact(p) if p == "marketing" => (6, "Marketing"),
        Scope::Contact(_) => (4, "Contact Requested"),
        Scope::SegmentRead(_) => (5, "Personalized Experience"),
    }
}

fn lawful_basis(basis: LegalBasis) -> Value {
    let (article, dpv) = match basis {
        LegalBasis::Consent => ("GDPR Art. 6(1)(a)", "eu-gdpr:A6-1-a"),
        LegalBasis::Contract => ("GDPR Art. 6(1)(b)", "eu-gdpr:A6-1-b"),
        LegalBasis::LegalObligation => ("GDPR Art. 6(1)(c)", "eu-gdpr:A6-1-c"),
        LegalBasis::VitalInterests => ("GDPR Art. 6(1)(d)", "eu-gdpr:A6-1-d"),
        LegalBasis::PublicTask => ("GDPR Art. 6(1)(e)", "eu-gdpr:A6-1-e"),
        LegalBasis::LegitimateInterests => ("GDPR Art. 6(1)(f)", "eu-gdpr:A6-1-f"),
    };
    json!({ "basis": basis.as_str(), "gdpr": article, "dpv": dpv })
}

fn dpv_status(status: GrantStatus) -> &'static str {
    match status {
        GrantStatus::Pending | GrantStatus::Active => "dpv:ConsentGiven",
        GrantStatus::Expired => "dpv:ConsentExpired",
        GrantStatus::Revoked => "dpv:ConsentWithdrawn",
    }
}

/// One step of a grant's history.
struct Event {
    at: UnixSeconds,
    state: State,
    entry: EntryId,
    entry_type: &'static str,
    by: Option<String>,
    details: Value,
    /// The DPV status once this event has happened.
    status: &'static str,
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum State {
    Given,
    Accepted,
    Amended,
    Expired,
    Revoked,
    ErasureAcknowledged,
}

impl State {
    fn as_str(self) -> &'static str {
        match self {
            State::Given => "given",
            State::Accepted => "accepted",
            State::Amended => "amended",
            State::Expired => "expired",
            State::Revoked => "revoked",
            State::ErasureAcknowledged => "erasure_acknowledged",
        }
    }
}

impl Event {
    fn of(state: State, id: EntryId, e: &Entry, details: Value) -> Self {
        Self {
            at: e.at,
            state,
            entry: id,
            entry_type: e.body.kind(),
            by: Some(e.by.to_string()),
            details,
            status: "",
        }
    }

    fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("event_time".into(), json!(rfc3339_utc(self.at)));
        m.insert("event_state".into(), json!(self.state.as_str()));
        m.insert("consent_status".into(), json!(self.status));
        if self.state == State::Given {
            m.insert("event_type".into(), json!("dpv:ExplicitlyExpressedConsent"));
        }
        if let Some(by) = &self.by {
            m.insert("entity_id".into(), json!(by));
        }
        m.insert(
            "evidence".into(),
            json!({ "entry_id": self.entry.to_hex(), "entry_type": self.entry_type }),
        );
        m.insert("details".into(), self.details.clone());
        Value::Object(m)
    }
}

fn scope_texts(scopes: &[Scope]) -> Vec<String> {
    scopes.iter().map(ToString::to_string).collect()
}

/// The state history of one grant as of `now`, oldest first.
fn history(ledger: &Ledger, view: &GrantView, now: UnixSeconds) -> Vec<Event> {
    let entries = ledger.entries();
    let mut events = Vec::new();
    let grant = &entries[&view.id];
    let EntryBody::Grant {
        scopes,
        expires: grant_end,
        ..
    } = &grant.body
    else {
        unreachable!("a grant view is made from a grant entry")
    };
    events.push(Event::of(
        State::Given,
        view.id,
        grant,
        json!({ "scopes": scope_texts(scopes), "expires": grant_end.map(rfc3339_utc) }),
    ));
    if let Some((id, _)) = view.accepted {
        let e = &entries[&id];
        events.push(Event::of(
            State::Accepted,
            id,
            e,
            json!({ "terms": format!("{} v{}", view.terms.id, view.terms.version) }),
        ));
    }
    // Every amendment made by `now`; the last one (by time, then id) is the one in effect,
    // as in the ledger's fold.
    let mut amendments: Vec<(&EntryId, &Entry)> = entries
        .iter()
        .filter(|(_, e)| {
            e.at <= now && matches!(&e.body, EntryBody::Amend { grant, .. } if *grant == view.id)
        })
        .collect();
    amendments.sort_by_key(|(id, e)| (e.at, **id));
    for (id, e) in &amendments {
        let EntryBody::Amend {
            scopes, expires, ..
        } = &e.body
        else {
            unreachable!()
        };
        events.push(Event::of(
            State::Amended,
            **id,
            e,
            json!({ "scopes": scope_texts(scopes), "expires": expires.map(rfc3339_utc) }),
        ));
    }
    if let Some(end) = view.expires.filter(|end| *end <= now) {
        // Expiry after a revocation changes nothing: the grant had already ended.
        if view.revoked.is_none_or(|(_, r)| r >= end) {
            let set_by = match amendments.last() {
                Some((id, _)) if *grant_end != Some(end) => **id,
                _ => view.id,
            };
            let e = &entries[&set_by];
            events.push(Event {
                at: end,
                state: State::Expired,
                entry: set_by,
                entry_type: e.body.kind(),
                by: None,
                details: json!({ "expires": rfc3339_utc(end) }),
                status: "",
            });
        }
    }
    if let Some((id, _)) = view.revoked {
        let e = &entries[&id];
        let reason = match &e.body {
            EntryBody::Revoke { reason, .. } => reason.clone(),
            _ => None,
        };
        events.push(Event::of(
            State::Revoked,
            id,
            e,
            json!({ "reason": reason }),
        ));
    }
    if let Some((id, _)) = view.erasure_acked {
        let e = &entries[&id];
        let erased = match &e.body {
            EntryBody::ErasureAck { erased, .. } => erased.clone(),
            _ => String::new(),
        };
        events.push(Event::of(
            State::ErasureAcknowledged,
            id,
            e,
            json!({ "erased": erased }),
        ));
    }
    events.sort_by_key(|e| (e.at, e.state, e.entry));
    let mut status = "dpv:ConsentGiven";
    for e in &mut events {
        status = match e.state {
            State::Revoked => "dpv:ConsentWithdrawn",
            State::Expired if status != "dpv:ConsentWithdrawn" => "dpv:ConsentExpired",
            _ => status,
        };
        e.status = status;
    }
    events
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consent::{ConsentDoc, ConsentHeader};
    use crate::identity::SecretKey;

    const T0: UnixSeconds = 1_700_000_000;

    fn keys() -> (SecretKey, SecretKey) {
        (SecretKey::from_seed([1; 32]), SecretKey::from_seed([2; 32]))
    }

    fn doc(c: &SecretKey, g: &SecretKey) -> ConsentDoc {
        ConsentDoc::new(ConsentHeader {
            customer: c.identity(),
            grantee: g.identity(),
        })
        .unwrap()
    }

    fn scopes(list: &[&str]) -> Vec<Scope> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn grant(list: &[&str], expires: Option<UnixSeconds>) -> EntryBody {
        EntryBody::Grant {
            scopes: scopes(list),
            purpose: "Support for my order".into(),
            legal_basis: LegalBasis::Consent,
            notice_sha256: "ab".repeat(32),
            terms: Terms::by_id("SD-BASE").unwrap().reference(),
            expires,
        }
    }

    fn ctx(now: UnixSeconds) -> RecordContext {
        RecordContext {
            now,
            jurisdiction: "EU".into(),
            policy_url: "https://shop.example/privacy".into(),
            collection_method: "rapport signed consent ledger".into(),
            controller: ControllerInfo {
                name: "Example Shop GmbH".into(),
                contact: "Data Protection Office".into(),
                address: "Hauptstrasse 1, 10115 Berlin, DE".into(),
                email: "privacy@shop.example".into(),
                phone: "+49 30 1234567".into(),
                url: Some("https://shop.example".into()),
            },
            customer_name: Some("Alice".into()),
        }
    }

    /// Every string non-empty and nothing null, anywhere in `v`.
    fn assert_all_filled(v: &Value, path: &str) {
        match v {
            Value::Null => panic!("{path} is null"),
            Value::String(s) => assert!(!s.trim().is_empty(), "{path} is empty"),
            Value::Array(a) => a
                .iter()
                .enumerate()
                .for_each(|(i, x)| assert_all_filled(x, &format!("{path}[{i}]"))),
            Value::Object(m) => m
                .iter()
                .for_each(|(k, x)| assert_all_filled(x, &format!("{path}.{k}"))),
            _ => {}
        }
    }

    #[test]
    fn rfc3339_of_known_instants() {
        assert_eq!(rfc3339_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_utc(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339_utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339_utc(1_709_208_000), "2024-02-29T12:00:00Z");
        assert_eq!(rfc3339_utc(1_709_251_199), "2024-02-29T23:59:59Z");
        assert_eq!(rfc3339_utc(1_709_251_200), "2024-03-01T00:00:00Z");
        assert_eq!(rfc3339_utc(4_107_542_400), "2100-03-01T00:00:00Z");
        assert_eq!(rfc3339_utc(253_402_300_799), "9999-12-31T23:59:59Z");
        assert!(rfc3339_utc(UnixSeconds::MAX).ends_with('Z'));
    }

    /// Grant, accept, amend, revoke, erasure acknowledgement: both formats carry all of it.
    #[test]
    fn full_lifecycle_exports_real_data() {
        let (c, g) = keys();
        let mut d = doc(&c, &g);
        let end = T0 + 365 * 86_400;
        let (gid, _) = d
            .append(
                &c,
                [1; 16],
                T0,
                grant(
                    &["conversation:read", "profile:email:read", "contact:support"],
                    Some(end),
                ),
            )
            .unwrap();
        let terms = d.ledger().grant(&gid, T0).unwrap().terms;
        let (aid, _) = d
            .append(
                &g,
                [2; 16],
                T0 + 60,
                EntryBody::Accept { grant: gid, terms },
            )
            .unwrap();
        let (mid, _) = d
            .append(
                &c,
                [1; 16],
                T0 + 120,
                EntryBody::Amend {
                    grant: gid,
                    scopes: scopes(&["conversation:read", "profile:email:read"]),
                    expires: Some(end - 86_400),
                },
            )
            .unwrap();
        let (rid, _) = d
            .append(
                &c,
                [1; 16],
                T0 + 3600,
                EntryBody::Revoke {
                    grant: gid,
                    reason: Some("moved away".into()),
                },
            )
            .unwrap();
        let (eid, _) = d
            .append(
                &g,
                [2; 16],
                T0 + 3700,
                EntryBody::ErasureAck {
                    revoke: rid,
                    grant: gid,
                    erased: "email, conversation".into(),
                },
            )
            .unwrap();
        let ledger = d.ledger();
        let ctx = ctx(T0 + 4000);
        let customer = c.identity().to_string();
        let grantee = g.identity().to_string();

        let records = iso27560_records(ledger, &ctx).unwrap();
        assert_eq!(records.len(), 1);
        let r = &records[0];
        assert_all_filled(&r["schema"], "schema");
        assert_eq!(r["schema"]["standard"], "ISO/IEC TS 27560:2023");
        assert_eq!(r["schema"]["mapping"], "rapport-27560/1");
        assert_eq!(r["schema_version"], "rapport-27560/1");
        assert_eq!(r["record_id"], gid.to_hex());
        assert_eq!(r["pii_principal_id"], customer);
        assert_eq!(r["pii_principal"]["party_id"], customer);
        assert_eq!(r["pii_principal"]["party_name"], "Alice");
        assert_eq!(r["created"], "2023-11-14T22:13:20Z");
        assert_eq!(r["last_updated"], rfc3339_utc(T0 + 3700));
        assert_eq!(r["generated"], rfc3339_utc(T0 + 4000));
        assert_eq!(r["language"], "en");
        assert_eq!(r["privacy_notice"]["notice_sha256"], "ab".repeat(32));
        assert_eq!(
            r["privacy_notice"]["policy_url"],
            "https://shop.example/privacy"
        );
        assert_eq!(r["jurisdiction"], "EU");
        assert_eq!(r["collection_method"], "rapport signed consent ledger");
        let pc = &r["pii_controllers"][0];
        assert_eq!(pc["party_id"], grantee);
        assert_eq!(pc["party_name"], "Example Shop GmbH");
        assert_eq!(pc["party_contact"], "Data Protection Office");
        assert_eq!(pc["party_address"], "Hauptstrasse 1, 10115 Berlin, DE");
        assert_eq!(pc["party_email"], "privacy@shop.example");
        assert_eq!(pc["party_phone"], "+49 30 1234567");
        assert_eq!(pc["party_url"], "https://shop.example");
        let p = &r["purposes"][0];
        assert_eq!(p["purpose"], "Support for my order");
        assert_eq!(p["lawful_basis"]["basis"], "consent");
        assert_eq!(p["lawful_basis"]["dpv"], "eu-gdpr:A6-1-a");
        // The amendment dropped contact:support.
        assert_eq!(
            p["scopes"],
            json!(["conversation:read", "profile:email:read"])
        );
        assert_eq!(
            p["pii_information"],
            json!([
                { "pii_type": "conversation content", "pii_attribute_id": ["conversation:read"] },
                { "pii_type": "email", "pii_attribute_id": ["profile:email:read"] },
            ])
        );
        assert_eq!(p["processing_method"].as_array().unwrap().len(), 2);
        assert_eq!(p["pii_controllers"], json!([grantee]));
        assert_eq!(p["third_party_disclosure"], false);
        assert_eq!(p["recipient_third_parties"], json!([]));
        assert_eq!(r["terms"]["id"], "SD-BASE");
        assert_eq!(r["terms"]["third_party_sharing"], false);
        assert_eq!(r["validity_duration"]["start"], rfc3339_utc(T0));
        assert_eq!(r["validity_duration"]["end"], rfc3339_utc(end - 86_400));
        assert_eq!(r["status"], "revoked");
        assert_eq!(r["consent_status"], "dpv:ConsentWithdrawn");
        for key in ["withdrawal_method", "retention_period"] {
            assert_all_filled(&r[key], key);
        }

        let events = r["events"].as_array().unwrap();
        let got: Vec<(&str, &str, &str, &str)> = events
            .iter()
            .map(|e| {
                (
                    e["event_state"].as_str().unwrap(),
                    e["event_time"].as_str().unwrap(),
                    e["evidence"]["entry_id"].as_str().unwrap(),
                    e["entity_id"].as_str().unwrap(),
                )
            })
            .collect();
        let want = [
            ("given", rfc3339_utc(T0), gid.to_hex(), &customer),
            ("accepted", rfc3339_utc(T0 + 60), aid.to_hex(), &grantee),
            ("amended", rfc3339_utc(T0 + 120), mid.to_hex(), &customer),
            ("revoked", rfc3339_utc(T0 + 3600), rid.to_hex(), &customer),
            (
                "erasure_acknowledged",
                rfc3339_utc(T0 + 3700),
                eid.to_hex(),
                &grantee,
            ),
        ];
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(*g, (w.0, w.1.as_str(), w.2.as_str(), w.3.as_str()));
        }
        let statuses: Vec<_> = events
            .iter()
            .map(|e| e["consent_status"].as_str().unwrap())
            .collect();
        assert_eq!(
            statuses,
            [
                "dpv:ConsentGiven",
                "dpv:ConsentGiven",
                "dpv:ConsentGiven",
                "dpv:ConsentWithdrawn",
                "dpv:ConsentWithdrawn"
            ]
        );
        assert_eq!(events[0]["event_type"], "dpv:ExplicitlyExpressedConsent");
        assert_eq!(
            events[0]["details"]["scopes"],
            json!(["conversation:read", "profile:email:read", "contact:support"])
        );
        assert_eq!(events[3]["details"]["reason"], "moved away");
        assert_eq!(events[4]["details"]["erased"], "email, conversation");
        assert_eq!(r["evidence"]["consent_document_id"], ledger.id().to_hex());
        assert_eq!(
            r["evidence"]["entry_ids"],
            json!([
                gid.to_hex(),
                aid.to_hex(),
                mid.to_hex(),
                rid.to_hex(),
                eid.to_hex()
            ])
        );

        let receipts = kantara_receipts(ledger, &ctx).unwrap();
        assert_eq!(receipts.len(), 1);
        let k = &receipts[0];
        assert_all_filled(k, "receipt");
        for key in [
            "version",
            "jurisdiction",
            "consentTimestamp",
            "collectionMethod",
            "consentReceiptID",
            "publicKey",
            "language",
            "piiPrincipalId",
            "piiControllers",
            "policyUrl",
            "services",
            "sensitive",
            "spiCat",
        ] {
            assert!(k.get(key).is_some(), "{key} missing");
        }
        assert_eq!(k["version"], "KI-CR-v1.1.0");
        assert_eq!(k["jurisdiction"], "EU");
        assert_eq!(k["consentTimestamp"], T0);
        assert_eq!(k["collectionMethod"], "rapport signed consent ledger");
        assert_eq!(k["consentReceiptID"], gid.to_hex());
        assert_eq!(k["publicKey"], grantee);
        assert_eq!(k["language"], "en");
        assert_eq!(k["piiPrincipalId"], customer);
        assert_eq!(k["policyUrl"], "https://shop.example/privacy");
        assert_eq!(k["sensitive"], false);
        assert_eq!(k["spiCat"], json!([]));
        let kc = &k["piiControllers"][0];
        assert_eq!(kc["piiController"], "Example Shop GmbH");
        assert_eq!(kc["contact"], "Data Protection Office");
        assert_eq!(
            kc["address"]["streetAddress"],
            "Hauptstrasse 1, 10115 Berlin, DE"
        );
        assert_eq!(kc["email"], "privacy@shop.example");
        assert_eq!(kc["phone"], "+49 30 1234567");
        assert_eq!(kc["piiControllerUrl"], "https://shop.example");
        let s = &k["services"][0];
        assert_eq!(s["service"], "Support for my order");
        let kp = &s["purposes"][0];
        assert_eq!(kp["purpose"], "Support for my order");
        assert_eq!(
            kp["purposeCategory"],
            json!(["1 - Core Function", "2 - Contracted Service"])
        );
        assert_eq!(kp["consentType"], "EXPLICIT");
        assert_eq!(kp["piiCategory"], json!(["conversation content", "email"]));
        assert_eq!(kp["primaryPurpose"], true);
        assert_eq!(
            kp["termination"],
            format!(
                "{} (expiry), or earlier on revocation by the PII principal",
                rfc3339_utc(end - 86_400)
            )
        );
        assert_eq!(kp["thirdPartyDisclosure"], false);
        assert!(kp.get("thirdPartyName").is_none());

        // Same ledger, same context: same output.
        assert_eq!(iso27560_records(ledger, &ctx).unwrap(), records);
        assert_eq!(kantara_receipts(ledger, &ctx).unwrap(), receipts);
    }

    #[test]
    fn a_missing_controller_field_is_named_not_invented() {
        let (c, g) = keys();
        let mut d = doc(&c, &g);
        d.append(&c, [1; 16], T0, grant(&["conversation:read"], None))
            .unwrap();
        let mut ctx = ctx(T0 + 1);
        ctx.controller.email = "  ".into();
        let err = kantara_receipts(d.ledger(), &ctx).unwrap_err();
        assert_eq!(err, RecordError::MissingFields(vec!["controller email"]));
        assert_eq!(
            err.to_string(),
            "controller email is empty: pass --controller-email"
        );
        // Email is optional in 27560, so the record leaves it out.
        let r = &iso27560_records(d.ledger(), &ctx).unwrap()[0];
        assert!(r["pii_controllers"][0].get("party_email").is_none());

        ctx.controller.address = String::new();
        assert_eq!(
            iso27560_records(d.ledger(), &ctx).unwrap_err(),
            RecordError::MissingFields(vec!["controller address"])
        );
        // Every missing field at once, not one per attempt.
        ctx.controller.phone = String::new();
        ctx.jurisdiction = " ".into();
        assert_eq!(
            kantara_receipts(d.ledger(), &ctx).unwrap_err().to_string(),
            "controller address, controller email, controller phone, jurisdiction are empty: pass --controller-address --controller-email --controller-phone --jurisdiction"
        );
        let mut ctx2 = self::ctx(T0 + 1);
        ctx2.policy_url = String::new();
        assert_eq!(
            kantara_receipts(d.ledger(), &ctx2).unwrap_err().to_string(),
            "policy url is empty: pass --policy-url"
        );
        for field in ["name", "contact", "phone"] {
            let mut ctx3 = self::ctx(T0 + 1);
            match field {
                "name" => ctx3.controller.name.clear(),
                "contact" => ctx3.controller.contact.clear(),
                _ => ctx3.controller.phone.clear(),
            }
            let err = kantara_receipts(d.ledger(), &ctx3).unwrap_err();
            assert!(
                err.to_string()
                    .starts_with(&format!("controller {field} is empty")),
                "{err}"
            );
        }
    }

    #[test]
    fn a_pending_grant_is_exported_with_its_status() {
        let (c, g) = keys();
        let mut d = doc(&c, &g);
        let (gid, _) = d
            .append(
                &c,
                [1; 16],
                T0,
                grant(&["contact:marketing", "segment:vip:read"], None),
            )
            .unwrap();
        let mut ctx = ctx(T0 + 5);
        ctx.customer_name = None;
        let r = &iso27560_records(d.ledger(), &ctx).unwrap()[0];
        assert_eq!(r["record_id"], gid.to_hex());
        assert_eq!(r["status"], "pending");
        assert_eq!(r["consent_status"], "dpv:ConsentGiven");
        assert!(r["pii_principal"].get("party_name").is_none());
        assert_eq!(r["validity_duration"]["end"], Value::Null);
        let events = r["events"].as_array().unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0]["event_state"], "given");
        assert_eq!(events[0]["evidence"]["entry_id"], gid.to_hex());
        assert_eq!(
            r["purposes"][0]["pii_information"],
            json!([
                { "pii_type": "contact for marketing", "pii_attribute_id": ["contact:marketing"] },
                { "pii_type": "membership of segment vip", "pii_attribute_id": ["segment:vip:read"] },
            ])
        );

        let k = &kantara_receipts(d.ledger(), &ctx).unwrap()[0];
        assert_all_filled(k, "receipt");
        let kp = &k["services"][0]["purposes"][0];
        assert_eq!(
            kp["purposeCategory"],
            json!(["5 - Personalized Experience", "6 - Marketing"])
        );
        assert_eq!(kp["termination"], "revocation by the PII principal");

        // A grant made after `now` is not part of the records of `now`.
        assert!(
            iso27560_records(d.ledger(), &self::ctx(T0 - 1))
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn an_expired_grant_records_its_expiry_with_the_entry_that_set_it() {
        let (c, g) = keys();
        let mut d = doc(&c, &g);
        let (gid, _) = d
            .append(
                &c,
                [1; 16],
                T0,
                grant(&["conversation:read"], Some(T0 + 100)),
            )
            .unwrap();
        let terms = d.ledger().grant(&gid, T0).unwrap().terms;
        d.append(
            &g,
            [2; 16],
            T0 + 10,
            EntryBody::Accept { grant: gid, terms },
        )
        .unwrap();
        let r = &iso27560_records(d.ledger(), &ctx(T0 + 200)).unwrap()[0];
        assert_eq!(r["status"], "expired");
        let states: Vec<_> = r["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["event_state"].as_str().unwrap())
            .collect();
        assert_eq!(states, ["given", "accepted", "expired"]);
        let exp = &r["events"][2];
        assert_eq!(exp["event_time"], rfc3339_utc(T0 + 100));
        assert_eq!(exp["evidence"]["entry_id"], gid.to_hex());
        assert_eq!(exp["consent_status"], "dpv:ConsentExpired");
        assert!(exp.get("entity_id").is_none());
        // Before the end it is active, with no expiry event.
        let r = &iso27560_records(d.ledger(), &ctx(T0 + 50)).unwrap()[0];
        assert_eq!(r["status"], "active");
        assert_eq!(r["events"].as_array().unwrap().len(), 2);
    }
}
