//! The records of the inbox table ([`super::tables::INBOX`]): one per message from others,
//! written with the changes that carry it.
//!
//! A record is binary: the key already says when, in which relationship and which entry,
//! so the value holds only the rest, with lengths in front of its texts. Records written
//! before this format are JSON of the whole [`MessageView`], and still read: JSON starts
//! with `{`, a record of this format with [`FORMAT`].
//!
//! ```text
//! FORMAT (1) | by (32) | flags (1) | [thread (32)] | by_name | text | [purpose]
//! each text: its length in bytes (u32, little-endian), then its UTF-8
//! flags: 1 mine, 2 a purpose follows, 4 a thread is named; no other bit is set
//! ```

use rapport_protocol::{DocId, EntryId, IdentityKey};

use crate::views::MessageView;

/// The first byte of a record in this format.
const FORMAT: u8 = 1;

const MINE: u8 = 1;
const PURPOSE: u8 = 2;
const THREAD: u8 = 4;

/// The record of `m`, whose time, relationship and entry id go in its key.
pub(crate) fn encode(m: &MessageView) -> Vec<u8> {
    let texts = m.by_name.len() + m.text.len() + m.purpose.as_ref().map_or(0, String::len);
    let mut out = Vec::with_capacity(1 + 32 + 1 + 32 + 12 + texts);
    out.push(FORMAT);
    out.extend_from_slice(m.by.as_bytes());
    let flags = if m.mine { MINE } else { 0 }
        | if m.purpose.is_some() { PURPOSE } else { 0 }
        | if m.thread.is_some() { THREAD } else { 0 };
    out.push(flags);
    if let Some(t) = &m.thread {
        out.extend_from_slice(&t.0);
    }
    put_text(&mut out, &m.by_name);
    put_text(&mut out, &m.text);
    if let Some(p) = &m.purpose {
        put_text(&mut out, p);
    }
    out
}

fn put_text(out: &mut Vec<u8>, s: &str) {
    // Entries are bounded far below 4 GiB (`MAX_ENTRY_BYTES`); names by `MAX_NAME`.
    let len = u32::try_from(s.len()).expect("a text of the inbox fits in 4 GiB");
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// The message of the record `value` under the key (`at`, `rel`, `id`), in this format or
/// as JSON of an earlier release. The store's file may be damaged: every length is
/// checked against what is there, and anything left over or unknown is an error.
pub(crate) fn decode(
    at: u64,
    rel: &[u8; 32],
    id: &[u8; 32],
    value: &[u8],
) -> Result<MessageView, String> {
    match value.first() {
        Some(b'{') => serde_json::from_slice(value).map_err(|e| e.to_string()),
        Some(&FORMAT) => {
            let mut r = Reader(&value[1..]);
            let by = IdentityKey::from_bytes(&r.array()?).map_err(|e| e.to_string())?;
            let flags = r.take(1)?[0];
            if flags & !(MINE | PURPOSE | THREAD) != 0 {
                return Err(format!("unknown flags {flags:#04x}"));
            }
            let thread = if flags & THREAD != 0 {
                Some(EntryId(r.array()?))
            } else {
                None
            };
            let by_name = r.text()?;
            let text = r.text()?;
            let purpose = if flags & PURPOSE != 0 {
                Some(r.text()?)
            } else {
                None
            };
            if !r.0.is_empty() {
                return Err(format!("{} bytes past its end", r.0.len()));
            }
            Ok(MessageView {
                rel: DocId(*rel),
                id: EntryId(*id),
                by,
                by_name,
                at,
                text,
                purpose,
                thread,
                mine: flags & MINE != 0,
            })
        }
        Some(other) => Err(format!("unknown record format {other}")),
        None => Err("an empty record".into()),
    }
}

/// What is left of a record being read.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err(format!(
                "cut short: {n} bytes wanted, {} left",
                self.0.len()
            ));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn array(&mut self) -> Result<[u8; 32], String> {
        Ok(self.take(32)?.try_into().expect("32 bytes taken"))
    }

    fn text(&mut self) -> Result<String, String> {
        let len = u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes taken"));
        let bytes = self.take(len as usize)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| "a text that is not UTF-8".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rapport_protocol::SecretKey;

    fn message(
        seed: u8,
        text: String,
        by_name: String,
        purpose: Option<String>,
        thread: Option<[u8; 32]>,
        mine: bool,
    ) -> MessageView {
        MessageView {
            rel: DocId([seed; 32]),
            id: EntryId([seed.wrapping_add(1); 32]),
            by: SecretKey::from_seed([seed; 32]).identity(),
            by_name,
            at: 1_700_000_000 + u64::from(seed),
            text,
            purpose,
            thread: thread.map(EntryId),
            mine,
        }
    }

    fn decode_of(m: &MessageView, value: &[u8]) -> Result<MessageView, String> {
        decode(m.at, &m.rel.0, &m.id.0, value)
    }

    proptest! {
        /// Any message comes back whole from its record and its key.
        #[test]
        fn a_record_round_trips(
            seed in any::<u8>(),
            text in ".{0,200}",
            by_name in ".{0,40}",
            purpose in proptest::option::of(".{0,30}"),
            thread in proptest::option::of(any::<[u8; 32]>()),
            mine in any::<bool>(),
        ) {
            let m = message(seed, text, by_name, purpose, thread, mine);
            prop_assert_eq!(decode_of(&m, &encode(&m)), Ok(m));
        }

        /// A damaged record is an error or, where the damage still reads as a record, a
        /// message; never a panic. Cut short, it is always an error.
        #[test]
        fn a_damaged_record_never_panics(
            seed in any::<u8>(),
            text in ".{0,60}",
            purpose in proptest::option::of(".{0,10}"),
            at in any::<prop::sample::Index>(),
            byte in any::<u8>(),
        ) {
            let m = message(seed, text, "Ada".into(), purpose, None, false);
            let mut v = encode(&m);
            let i = at.index(v.len());
            prop_assert!(decode_of(&m, &v[..i]).is_err());
            v[i] = byte;
            let _ = decode_of(&m, &v);
        }
    }

    /// Records an earlier release wrote, JSON of the whole view, still read.
    #[test]
    fn a_json_record_of_an_earlier_release_reads() {
        let m = message(
            7,
            "where is my order?".into(),
            "Ada".into(),
            Some("support".into()),
            Some([3; 32]),
            true,
        );
        let json = serde_json::to_vec(&m).unwrap();
        assert_eq!(decode_of(&m, &json), Ok(m));
    }

    /// A record is a fraction of the JSON it replaces (the ids are in the key).
    #[test]
    fn a_record_is_smaller_than_its_json() {
        let m = message(
            7,
            "message 3: where is my order? it was due on Tuesday".into(),
            "Ada".into(),
            None,
            None,
            false,
        );
        let (binary, json) = (encode(&m).len(), serde_json::to_vec(&m).unwrap().len());
        assert!(binary * 2 < json, "{binary} bytes against {json} of JSON");
    }

    #[test]
    fn unknown_formats_flags_and_trailing_bytes_are_refused() {
        let m = message(1, "hi".into(), "Ada".into(), None, None, false);
        let good = encode(&m);
        assert!(decode_of(&m, &[]).is_err());
        assert!(decode_of(&m, &[2]).unwrap_err().contains("format"));
        let mut flags = good.clone();
        flags[33] = 0x80;
        assert!(decode_of(&m, &flags).unwrap_err().contains("flags"));
        let mut long = good.clone();
        long.push(0);
        assert!(decode_of(&m, &long).unwrap_err().contains("past its end"));
        let mut huge = good;
        // by_name's length, claiming more than the record holds.
        huge[34..38].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode_of(&m, &huge).unwrap_err().contains("cut short"));
    }
}
