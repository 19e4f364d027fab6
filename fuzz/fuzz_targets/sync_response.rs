//! Any bytes a peer sends as a sync response: decoding never panics, and what decodes
//! encodes back to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rapport_protocol::wire::SyncResponse;

fuzz_target!(|data: &[u8]| {
    if let Ok(resp) = SyncResponse::decode(data) {
        assert_eq!(
            resp.encode(),
            data,
            "a decoded response re-encodes to other bytes"
        );
    }
});
