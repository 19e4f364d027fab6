//! Any text pasted as an invitation: reading it never panics, and what reads re-encodes to
//! the same link (in lowercase, without spaces), so a link cannot mean two things.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rapport_protocol::Invitation;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(inv) = Invitation::decode(text) {
        let link = inv.encode().expect("what was read encodes");
        let compact: String = text.chars().filter(|c| !c.is_whitespace()).collect();
        assert_eq!(link, compact.to_ascii_lowercase(), "a link read as another");
        assert_eq!(Invitation::decode(&link).expect("reads again"), inv);
    }
});
