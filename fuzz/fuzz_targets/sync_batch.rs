//! Any bytes a peer sends as a batch of sync rounds, or as its answer to ours: decoding
//! never panics, and what decodes encodes back to the same bytes (the encoding is
//! canonical).
#![no_main]

use libfuzzer_sys::fuzz_target;
use rapport_protocol::wire::{SyncBatch, SyncBatchResponse};

fuzz_target!(|data: &[u8]| {
    if let Ok(batch) = SyncBatch::decode(data) {
        assert_eq!(
            batch.encode(),
            data,
            "a decoded batch re-encodes to other bytes"
        );
    }
    if let Ok(answer) = SyncBatchResponse::decode(data) {
        assert_eq!(
            answer.encode(),
            data,
            "a decoded answer re-encodes to other bytes"
        );
    }
});
