//! Terms the customer proffers, IEEE P7012 ("MyTerms") style: the customer points to one
//! agreement from a small shipped roster, and the company's `Accept` signs those exact terms.
//!
//! The roster names follow the P7012 `SD-BASE` family. The one-line texts are ours: a plain
//! summary of each agreement, hashed so an `Accept` commits to the exact words shown.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// One agreement in the roster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Terms {
    /// The roster id, e.g. `SD-BASE`.
    pub id: &'static str,
    /// The roster version of this agreement.
    pub version: u32,
    /// The plain-language text the customer proffers.
    pub text: &'static str,
    /// May the company analyse the data (for itself only)?
    pub analytics: bool,
    /// May the company track the customer across sites or services?
    pub tracking: bool,
    /// May the company build a profile of the customer?
    pub profiling: bool,
    /// May the company share data with third parties?
    pub third_party_sharing: bool,
    /// Must the company hand the customer's data back on request, in an open format?
    pub data_portability: bool,
}

/// The roster shipped with this release.
pub const ROSTER: &[Terms] = &[
    Terms {
        id: "SD-BASE",
        version: 1,
        text: "Service delivery only. Use my data only to provide the service I asked for. No analytics, no tracking, no profiling, no sharing with third parties.",
        analytics: false,
        tracking: false,
        profiling: false,
        third_party_sharing: false,
        data_portability: false,
    },
    Terms {
        id: "SD-BASE-A",
        version: 1,
        text: "Service delivery, plus analytics of my data by you alone, to improve the service. No tracking, no profiling, no sharing with third parties.",
        analytics: true,
        tracking: false,
        profiling: false,
        third_party_sharing: false,
        data_portability: false,
    },
    Terms {
        id: "SD-BASE-AT",
        version: 1,
        text: "Service delivery, plus analytics by you alone, plus tracking of my use of your own services. No profiling, no sharing with third parties.",
        analytics: true,
        tracking: true,
        profiling: false,
        third_party_sharing: false,
        data_portability: false,
    },
    Terms {
        id: "SD-BASE-ATP",
        version: 1,
        text: "Service delivery, plus analytics and tracking by you alone, plus a profile of me that you keep to yourself. No sharing with third parties.",
        analytics: true,
        tracking: true,
        profiling: true,
        third_party_sharing: false,
        data_portability: false,
    },
    Terms {
        id: "SD-BASE-DP",
        version: 1,
        text: "Service delivery only, as SD-BASE, and you give me a copy of all data you hold about me, in an open format, whenever I ask.",
        analytics: false,
        tracking: false,
        profiling: false,
        third_party_sharing: false,
        data_portability: true,
    },
];

impl Terms {
    /// Looks an agreement up by roster id.
    pub fn by_id(id: &str) -> Option<&'static Terms> {
        ROSTER.iter().find(|t| t.id == id)
    }

    /// The reference that grants and acceptances carry: id, version and text hash.
    pub fn reference(&self) -> TermsRef {
        let mut h = Sha256::new();
        h.update(b"rapport/terms/v1\0");
        h.update(self.id.as_bytes());
        h.update([0]);
        h.update(self.version.to_be_bytes());
        h.update(self.text.as_bytes());
        TermsRef {
            id: self.id.to_owned(),
            version: self.version,
            text_sha256: hex::encode(h.finalize()),
        }
    }
}

/// A reference to one exact agreement of the roster.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TermsRef {
    /// The roster id, e.g. `SD-BASE`.
    pub id: String,
    /// The roster version.
    pub version: u32,
    /// SHA-256 (hex) of the domain-separated id, version and text.
    pub text_sha256: String,
}

impl TermsRef {
    /// The roster agreement this reference names, if it names one exactly (same id, version
    /// and text hash).
    pub fn resolve(&self) -> Option<&'static Terms> {
        Terms::by_id(&self.id).filter(|t| t.reference() == *self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roster_has_the_sd_base_family_with_distinct_hashes() {
        let ids: Vec<_> = ROSTER.iter().map(|t| t.id).collect();
        assert_eq!(
            ids,
            [
                "SD-BASE",
                "SD-BASE-A",
                "SD-BASE-AT",
                "SD-BASE-ATP",
                "SD-BASE-DP"
            ]
        );
        let mut hashes: Vec<_> = ROSTER.iter().map(|t| t.reference().text_sha256).collect();
        hashes.dedup();
        assert_eq!(hashes.len(), ROSTER.len());
        let base = Terms::by_id("SD-BASE").unwrap();
        assert!(!base.analytics && !base.tracking && !base.profiling && !base.third_party_sharing);
    }

    #[test]
    fn a_reference_with_altered_text_hash_does_not_resolve() {
        let mut r = Terms::by_id("SD-BASE").unwrap().reference();
        assert!(r.resolve().is_some());
        r.text_sha256.replace_range(
            0..1,
            if r.text_sha256.starts_with('0') {
                "1"
            } else {
                "0"
            },
        );
        assert!(r.resolve().is_none());
    }
}
