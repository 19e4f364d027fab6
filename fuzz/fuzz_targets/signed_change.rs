//! Any bytes inside a sync message's change list: decoding never panics, what decodes
//! re-encodes to the same bytes, and verification of it never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rapport_protocol::{DocId, SecretKey, SignedChange, verify_all};

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = SignedChange::decode(data) {
        assert_eq!(
            c.encode(),
            data,
            "a decoded change re-encodes to other bytes"
        );
        let key = SecretKey::from_seed([1; 32]).identity();
        let _ = verify_all(&DocId([0; 32]), &[c], &[key]);
    }
});
