//! Any bytes a peer sends as a sync request: decoding never panics, and what decodes
//! encodes back to the same bytes (the encoding is canonical).
#![no_main]

use libfuzzer_sys::fuzz_target;
use rapport_protocol::wire::SyncRequest;

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = SyncRequest::decode(data) {
        assert_eq!(
            req.encode(),
            data,
            "a decoded request re-encodes to other bytes"
        );
    }
});
