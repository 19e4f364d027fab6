//! The ledger file: how a consent document travels as a file (`rapport consent export`) and
//! is read back (`consent import`, `ledger verify`).
//!
//! ```json
//! {
//!   "format": "rapport-ledger/1",
//!   "document": "consent",
//!   "doc_id": "<64 hex>",
//!   "customer": "12D3KooW…",
//!   "grantee": "12D3KooW…",
//!   "changes": ["<base64 of an encoded SignedChange>", …]
//! }
//! ```
//!
//! Changes are listed each after its dependencies. Parsing checks shape and bounds only;
//! [`Ledger::verify`] checks signatures and rules.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};

use crate::consent::{ConsentHeader, Ledger};
use crate::identity::IdentityKey;
use crate::signed::{ChangeError, DocId, MAX_SIGNED_CHANGE_BYTES, SignedChange};

/// The `format` value of this version of the file.
pub const LEDGER_FORMAT: &str = "rapport-ledger/1";
/// The largest ledger file read (256 MiB).
pub const MAX_LEDGER_FILE_BYTES: usize = 256 << 20;
/// The most changes one ledger file may hold.
pub const MAX_LEDGER_CHANGES: usize = 1_000_000;

/// Why a ledger file could not be read. Nothing is imported from a file that fails.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LedgerFileError {
    /// Larger than [`MAX_LEDGER_FILE_BYTES`].
    #[error("ledger file is {0} bytes, more than the limit of {MAX_LEDGER_FILE_BYTES}")]
    TooLarge(usize),
    /// Not JSON of the expected shape.
    #[error("not a Rapport ledger file: {0}")]
    NotALedger(String),
    /// A format this release does not read.
    #[error("ledger format {0:?} is not supported (this release reads {LEDGER_FORMAT})")]
    UnknownFormat(String),
    /// The stated document id is not the one derived from the parties.
    #[error(
        "document id {stated} does not belong to these parties (expected {expected}): the file was altered"
    )]
    DocIdMismatch {
        /// The id in the file.
        stated: DocId,
        /// The id derived from customer and grantee.
        expected: DocId,
    },
    /// More than [`MAX_LEDGER_CHANGES`] changes.
    #[error("ledger file holds {0} changes, more than the limit of {MAX_LEDGER_CHANGES}")]
    TooManyChanges(usize),
    /// A change is not valid base64 or not a valid signed change.
    #[error("change #{index} in the file is damaged: {reason}")]
    BadChange {
        /// Position in the file, from 0.
        index: usize,
        /// What is wrong.
        reason: String,
    },
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRepr {
    format: String,
    document: String,
    doc_id: DocId,
    customer: IdentityKey,
    grantee: IdentityKey,
    changes: Vec<String>,
}

/// Writes a ledger as a ledger file (pretty JSON).
pub fn write_ledger_file(ledger: &Ledger) -> String {
    let repr = FileRepr {
        format: LEDGER_FORMAT.into(),
        document: "consent".into(),
        doc_id: ledger.id(),
        customer: ledger.header().customer,
        grantee: ledger.header().grantee,
        changes: ledger
            .changes()
            .iter()
            .map(|c| BASE64.encode(c.encode()))
            .collect(),
    };
    serde_json::to_string_pretty(&repr).expect("ledger files serialise")
}

/// Reads a ledger file into its parties and signed changes (not yet verified).
pub fn read_ledger_file(
    bytes: &[u8],
) -> Result<(ConsentHeader, Vec<SignedChange>), LedgerFileError> {
    if bytes.len() > MAX_LEDGER_FILE_BYTES {
        return Err(LedgerFileError::TooLarge(bytes.len()));
    }
    let repr: FileRepr =
        serde_json::from_slice(bytes).map_err(|e| LedgerFileError::NotALedger(e.to_string()))?;
    if repr.format != LEDGER_FORMAT {
        return Err(LedgerFileError::UnknownFormat(
            repr.format.chars().take(64).collect(),
        ));
    }
    if repr.document != "consent" {
        return Err(LedgerFileError::NotALedger(format!(
            "document kind {:?} is not \"consent\"",
            repr.document.chars().take(64).collect::<String>()
        )));
    }
    if repr.changes.len() > MAX_LEDGER_CHANGES {
        return Err(LedgerFileError::TooManyChanges(repr.changes.len()));
    }
    let header = ConsentHeader {
        customer: repr.customer,
        grantee: repr.grantee,
    };
    if header.doc_id() != repr.doc_id {
        return Err(LedgerFileError::DocIdMismatch {
            stated: repr.doc_id,
            expected: header.doc_id(),
        });
    }
    let changes = repr
        .changes
        .iter()
        .enumerate()
        .map(|(index, text)| {
            let bad = |reason: String| LedgerFileError::BadChange { index, reason };
            if text.len() > MAX_SIGNED_CHANGE_BYTES / 3 * 4 + 4 {
                return Err(bad(ChangeError::TooLarge(text.len() / 4 * 3).to_string()));
            }
            let raw = BASE64
                .decode(text)
                .map_err(|e| bad(format!("not base64: {e}")))?;
            SignedChange::decode(&raw).map_err(|e| bad(e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((header, changes))
}
