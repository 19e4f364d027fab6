//! Any bytes a peer sends on the mailbox protocol (requests at a relay, responses at a
//! node): decoding never panics, and what decodes re-encodes to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rapport_protocol::mail::{MailRequest, MailResponse};

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = MailRequest::decode(data) {
        assert_eq!(req.encode(), data, "a decoded request re-encodes to other bytes");
    }
    if let Ok(resp) = MailResponse::decode(data) {
        assert_eq!(resp.encode(), data, "a decoded response re-encodes to other bytes");
    }
});
