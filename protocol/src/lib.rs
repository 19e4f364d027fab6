//! Rapport's pure core: identities, signed changes, the consent ledger, relationships, the
//! consent rules that gate them, scopes, terms, content encryption, the wire formats and
//! the sync session machine.
//!
//! Nothing here does I/O or reads the clock: time and randomness are passed in, so every
//! rule is deterministic and testable.

mod append;
pub mod batch;
mod consent;
mod guard;
mod identity;
mod invite;
mod ledger_file;
pub mod mail;
pub mod policy;
mod records;
mod relationship;
pub mod replica;
mod scope;
pub mod seal;
pub mod session;
mod signed;
mod terms;
pub mod wire;

pub use append::entry_texts;
pub use consent::{
    ApplyReport, ConsentDoc, ConsentError, ConsentHeader, ENTRY_VERSION, Entry, EntryBody, EntryId,
    GrantStatus, GrantView, Ledger, LegalBasis, MAX_ENTRY_BYTES, MAX_NOTE, MAX_PURPOSE, MAX_SCOPES,
    UnixSeconds,
};
pub use guard::{contain, in_guarded_section};
pub use identity::{IdentityError, IdentityKey, Kind, SecretKey, read_trusted};
pub use invite::{
    INVITE_PREFIX, Invitation, InviteError, MAX_INVITE_ADDR, MAX_INVITE_ADDRS, MAX_INVITE_BYTES,
    MAX_INVITE_NAME, MAX_INVITE_TEXT, looks_like_invitation,
};
pub use ledger_file::{
    LEDGER_FORMAT, LedgerFileError, MAX_LEDGER_CHANGES, MAX_LEDGER_FILE_BYTES, read_ledger_file,
    write_ledger_file,
};
pub use records::{
    ControllerInfo, ISO27560_MAPPING, KANTARA_CR_VERSION, RecordContext, RecordError,
    iso27560_missing, iso27560_records, kantara_missing, kantara_receipts, rfc3339_utc,
};
pub use relationship::{
    EpochView, KeySlot, MAX_MEMBERS, MAX_MESSAGE_BYTES, MAX_REL_ENTRY_BYTES, MAX_TITLE, MemberView,
    REL_ENTRY_VERSION, RelApplyReport, RelBody, RelEntry, RelError, RelHeader, RelationshipDoc,
};
pub use scope::{MAX_SCOPE_NAME, Scope, ScopeError};
pub use signed::{
    ACTOR_ID_LEN, CHANGE_DOMAIN, ChangeError, DocId, MAX_SIGNED_CHANGE_BYTES,
    SIGNED_CHANGE_VERSION, Signatures, SignedChange, Verified, actor_for, check_all,
    signing_message, verify_all, verify_named,
};
pub use terms::{ROSTER, Terms, TermsRef};

pub use automerge;
