//! Any Automerge change bytes, signed by a member with a valid signature (what any peer
//! can do with its own key), applied to a relationship and verified as a consent ledger:
//! nothing panics, and a refused change leaves the document as it was.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rapport_protocol::automerge::Change;
use rapport_protocol::{
    ConsentHeader, Ledger, RelHeader, RelationshipDoc, SecretKey, SignedChange,
};

fuzz_target!(|data: &[u8]| {
    // Parsed as the node parses a peer's change (Automerge's own parser can panic; see
    // `SignedChange::decode`).
    let Ok(Ok(change)) = rapport_protocol::contain(|| Change::try_from(data)) else {
        return;
    };
    let author = SecretKey::from_seed([2; 32]);
    let owner = SecretKey::from_seed([1; 32]);
    let rel = RelHeader {
        owner: owner.identity(),
        nonce: [0; 16],
    };
    if let Ok(signed) = SignedChange::sign(&rel.doc_id(), change.clone(), &author) {
        let mut doc = RelationshipDoc::new(rel);
        let report = doc.apply(vec![signed]);
        if !report.rejected.is_empty() {
            assert!(doc.changes().is_empty(), "a refused change left a trace");
        }
    }
    let consent = ConsentHeader {
        customer: owner.identity(),
        grantee: author.identity(),
    };
    if let Ok(signed) = SignedChange::sign(&consent.doc_id(), change, &author) {
        let _ = Ledger::verify(consent, vec![signed]);
    }
});
