//! Any bytes a relay hands over as an envelope: decoding never panics, what decodes
//! re-encodes to the same bytes, and opening it with a node's key fails cleanly unless it
//! was really sealed and signed for that node.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rapport_protocol::SecretKey;
use rapport_protocol::mail::Envelope;
use rapport_protocol::seal::ContentKey;

fuzz_target!(|data: &[u8]| {
    if let Ok(env) = Envelope::decode(data) {
        assert_eq!(env.encode(), data, "a decoded envelope re-encodes to other bytes");
        let me = SecretKey::from_seed([1; 32]);
        let _ = env.open(&me, |_| Some(ContentKey::from_bytes([2; 32])));
    }
});
