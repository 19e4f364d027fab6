//! Invitations: how one party hands another its identity, name, kind and addresses, as a
//! short link (`rapport:…`) that can be read aloud, pasted or shown as a QR code.
//!
//! A peer id is 52 characters with no checksum, so one mistyped character names another,
//! valid-looking identity. An invitation carries a checksum over everything in it: a
//! typo, a character dropped or added, or a truncated paste is refused with a clear error
//! instead of naming someone else.
//!
//! The link is not signed. It is exactly as trustworthy as the channel it came through (a
//! message from a person you know, a company's web site): whoever can change it in transit
//! can also put a different identity and a matching checksum in it, and a signature by the
//! key inside would prove nothing about that. The name inside is what the party calls
//! itself; the person who adds it keeps their own petname for it. Addresses are hints only:
//! a connection to one authenticates the identity (Noise), so a wrong address cannot
//! impersonate anyone.
//!
//! Layout (version 1), before the checksum:
//!
//! | bytes | field |
//! |---|---|
//! | 1 | version, `1` |
//! | 32 | the Ed25519 public key |
//! | 1 | kind: `0` person, `1` org, `2` community |
//! | 1 + n | name: its length (at most [`MAX_INVITE_NAME`]) and UTF-8 bytes |
//! | 1 + … | addresses: how many (at most [`MAX_INVITE_ADDRS`]), each as its length (at most [`MAX_INVITE_ADDR`]) and multiaddr bytes, without the final `/p2p/<id>` (a relayed address keeps its relay's) |
//!
//! then 4 bytes: the first four of SHA-256(`"rapport invitation v1"` ‖ the bytes above). The
//! text is `rapport:` and the whole in base32 (RFC 4648, no padding), lowercase; it is read
//! in either case (a QR code carries it uppercase, which QR codes store more compactly),
//! and spaces and line breaks in it are ignored.

use std::fmt;

use data_encoding::BASE32_NOPAD;
use multiaddr::{Multiaddr, Protocol};
use sha2::{Digest, Sha256};

use crate::identity::{IdentityKey, Kind};

/// What every invitation link starts with.
pub const INVITE_PREFIX: &str = "rapport:";
/// The longest name an invitation carries, in bytes.
pub const MAX_INVITE_NAME: usize = 64;
/// The most addresses an invitation carries.
pub const MAX_INVITE_ADDRS: usize = 4;
/// The longest address an invitation carries, in bytes.
pub const MAX_INVITE_ADDR: usize = 128;
/// The longest invitation text read, in characters (whitespace included).
pub const MAX_INVITE_TEXT: usize = 2048;
/// The most bytes an invitation holds before its checksum: a link of at most 336
/// characters, whose QR code fits an 80-column terminal.
pub const MAX_INVITE_BYTES: usize = 200;

const VERSION: u8 = 1;
const CHECKSUM_DOMAIN: &[u8] = b"rapport invitation v1";
const CHECKSUM_LEN: usize = 4;

/// An invitation: who a party is, what it calls itself, and where it can be reached now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invitation {
    /// The party's identity.
    pub identity: IdentityKey,
    /// What it calls itself.
    pub name: String,
    /// What kind of party it is.
    pub kind: Kind,
    /// Where it listened when it made the invitation (without the final `/p2p/<id>`).
    pub addrs: Vec<Multiaddr>,
}

/// Why a text is not a valid invitation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InviteError {
    /// It does not start with `rapport:`.
    #[error("an invitation starts with \"rapport:\"")]
    NotAnInvitation,
    /// It is longer than any invitation.
    #[error("an invitation is at most {MAX_INVITE_TEXT} characters; this is {0}")]
    TooLong(usize),
    /// It has characters base32 does not use, or a length base32 never gives.
    #[error(
        "the invitation has characters an invitation never has (only a-z and 2-7 follow \"rapport:\"): check it was copied whole"
    )]
    NotBase32,
    /// The checksum does not match: a character was mistyped, dropped or added.
    #[error(
        "the invitation's checksum does not match: a character was changed, dropped or added, or it was cut short; copy it again"
    )]
    Checksum,
    /// A version this build does not read.
    #[error("the invitation is of version {0}; this build reads version {VERSION}")]
    Version(u8),
    /// The checksum matches but the content is not well formed (it was not made by rapport).
    #[error("the invitation is not well formed: {0}")]
    Malformed(&'static str),
    /// The key in it is not a valid Ed25519 key.
    #[error("the invitation's identity is not a valid key")]
    BadKey,
}

impl Invitation {
    /// Checks the fields fit an invitation; the error says which does not.
    fn check(&self) -> Result<(), InviteError> {
        if self.name.len() > MAX_INVITE_NAME {
            return Err(InviteError::Malformed("the name is longer than 64 bytes"));
        }
        if self.addrs.len() > MAX_INVITE_ADDRS {
            return Err(InviteError::Malformed("more than 4 addresses"));
        }
        if self
            .addrs
            .iter()
            .any(|a| a.as_ref().len() > MAX_INVITE_ADDR)
        {
            return Err(InviteError::Malformed(
                "an address is longer than 128 bytes",
            ));
        }
        if self.body().len() > MAX_INVITE_BYTES {
            return Err(InviteError::Malformed("longer than 200 bytes"));
        }
        Ok(())
    }

    /// An invitation for `identity`, keeping the name and addresses that fit: the name is
    /// cut to [`MAX_INVITE_NAME`] bytes (at a character boundary), a final `/p2p/…` is
    /// taken off each address (a relayed one keeps its relay's), and at most [`MAX_INVITE_ADDRS`] addresses of at most
    /// [`MAX_INVITE_ADDR`] bytes are kept, in the order given, without repeats, while the
    /// whole stays within [`MAX_INVITE_BYTES`] (an address that does not fit is left out).
    pub fn new(identity: IdentityKey, name: &str, kind: Kind, addrs: &[Multiaddr]) -> Self {
        let mut cut = name.len().min(MAX_INVITE_NAME);
        while !name.is_char_boundary(cut) {
            cut -= 1;
        }
        let mut kept: Vec<Multiaddr> = Vec::new();
        // Version, key, kind, the name's length and bytes, the address count.
        let mut size = 1 + 32 + 1 + 1 + cut + 1;
        for a in addrs {
            let mut bare = a.clone();
            while matches!(bare.iter().last(), Some(Protocol::P2p(_))) {
                bare.pop();
            }
            let len = bare.as_ref().len();
            if bare.is_empty()
                || len > MAX_INVITE_ADDR
                || size + 1 + len > MAX_INVITE_BYTES
                || kept.contains(&bare)
            {
                continue;
            }
            if kept.len() == MAX_INVITE_ADDRS {
                break;
            }
            size += 1 + len;
            kept.push(bare);
        }
        Self {
            identity,
            name: name[..cut].to_owned(),
            kind,
            addrs: kept,
        }
    }

    /// The bytes before the checksum.
    fn body(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(64);
        b.push(VERSION);
        b.extend_from_slice(self.identity.as_bytes());
        b.push(match self.kind {
            Kind::Person => 0,
            Kind::Org => 1,
            Kind::Community => 2,
        });
        b.push(self.name.len() as u8);
        b.extend_from_slice(self.name.as_bytes());
        b.push(self.addrs.len() as u8);
        for a in &self.addrs {
            b.push(a.as_ref().len() as u8);
            b.extend_from_slice(a.as_ref());
        }
        b
    }

    /// The link, `rapport:` and lowercase base32. Fails only for an invitation built by hand
    /// with fields too long ([`Invitation::new`] never makes one).
    pub fn encode(&self) -> Result<String, InviteError> {
        self.check()?;
        let mut b = self.body();
        let sum = checksum(&b);
        b.extend_from_slice(&sum);
        Ok(format!(
            "{INVITE_PREFIX}{}",
            BASE32_NOPAD.encode(&b).to_ascii_lowercase()
        ))
    }

    /// Reads a link, checking its checksum first and then every field. Untrusted input of
    /// any size: anything longer than [`MAX_INVITE_TEXT`] is refused before decoding.
    pub fn decode(text: &str) -> Result<Self, InviteError> {
        if text.len() > MAX_INVITE_TEXT {
            return Err(InviteError::TooLong(text.chars().count()));
        }
        let compact: String = text.chars().filter(|c| !c.is_whitespace()).collect();
        let head = compact.get(..INVITE_PREFIX.len()).unwrap_or_default();
        if !head.eq_ignore_ascii_case(INVITE_PREFIX) {
            return Err(InviteError::NotAnInvitation);
        }
        let data = compact[INVITE_PREFIX.len()..].to_ascii_uppercase();
        let bytes = BASE32_NOPAD
            .decode(data.as_bytes())
            .map_err(|_| InviteError::NotBase32)?;
        if bytes.len() < 1 + CHECKSUM_LEN {
            return Err(InviteError::Checksum);
        }
        if bytes.len() > MAX_INVITE_BYTES + CHECKSUM_LEN {
            return Err(InviteError::Malformed("longer than 200 bytes"));
        }
        let (body, sum) = bytes.split_at(bytes.len() - CHECKSUM_LEN);
        if checksum(body)[..] != *sum {
            return Err(InviteError::Checksum);
        }
        Self::parse(body)
    }

    fn parse(body: &[u8]) -> Result<Self, InviteError> {
        let mut r = Reader(body);
        let version = r.byte()?;
        if version != VERSION {
            return Err(InviteError::Version(version));
        }
        let key: [u8; 32] = r.take(32)?.try_into().expect("32 bytes");
        let identity = IdentityKey::from_bytes(&key).map_err(|_| InviteError::BadKey)?;
        let kind = match r.byte()? {
            0 => Kind::Person,
            1 => Kind::Org,
            2 => Kind::Community,
            _ => return Err(InviteError::Malformed("an unknown kind")),
        };
        let n = r.byte()? as usize;
        if n > MAX_INVITE_NAME {
            return Err(InviteError::Malformed("the name is longer than 64 bytes"));
        }
        let name = std::str::from_utf8(r.take(n)?)
            .map_err(|_| InviteError::Malformed("the name is not UTF-8"))?
            .to_owned();
        let count = r.byte()? as usize;
        if count > MAX_INVITE_ADDRS {
            return Err(InviteError::Malformed("more than 4 addresses"));
        }
        let mut addrs = Vec::with_capacity(count);
        for _ in 0..count {
            let len = r.byte()? as usize;
            if len > MAX_INVITE_ADDR {
                return Err(InviteError::Malformed(
                    "an address is longer than 128 bytes",
                ));
            }
            let a = Multiaddr::try_from(r.take(len)?.to_vec())
                .map_err(|_| InviteError::Malformed("an address is not a multiaddr"))?;
            if a.is_empty() || matches!(a.iter().last(), Some(Protocol::P2p(_))) {
                return Err(InviteError::Malformed(
                    "an address is empty or ends with a peer",
                ));
            }
            addrs.push(a);
        }
        if !r.0.is_empty() {
            return Err(InviteError::Malformed("bytes after the addresses"));
        }
        Ok(Self {
            identity,
            name,
            kind,
            addrs,
        })
    }
}

impl fmt::Display for Invitation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.encode() {
            Ok(s) => f.write_str(&s),
            Err(_) => Err(fmt::Error),
        }
    }
}

/// Whether `text` looks like an invitation link (it may still not be a valid one).
pub fn looks_like_invitation(text: &str) -> bool {
    text.trim_start()
        .get(..INVITE_PREFIX.len())
        .is_some_and(|h| h.eq_ignore_ascii_case(INVITE_PREFIX))
}

fn checksum(body: &[u8]) -> [u8; CHECKSUM_LEN] {
    let mut h = Sha256::new();
    h.update(CHECKSUM_DOMAIN);
    h.update(body);
    let d = h.finalize();
    [d[0], d[1], d[2], d[3]]
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn byte(&mut self) -> Result<u8, InviteError> {
        Ok(self.take(1)?[0])
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], InviteError> {
        if self.0.len() < n {
            return Err(InviteError::Malformed("it ends early"));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::SecretKey;
    use proptest::prelude::*;

    fn key(seed: u8) -> IdentityKey {
        SecretKey::from_seed([seed; 32]).identity()
    }

    fn kind() -> impl Strategy<Value = Kind> {
        prop_oneof![Just(Kind::Person), Just(Kind::Org), Just(Kind::Community)]
    }

    fn addr() -> impl Strategy<Value = Multiaddr> {
        (any::<[u8; 4]>(), any::<u16>(), any::<bool>()).prop_map(|(ip, port, quic)| {
            let s = if quic {
                format!(
                    "/ip4/{}.{}.{}.{}/udp/{port}/quic-v1",
                    ip[0], ip[1], ip[2], ip[3]
                )
            } else {
                format!("/ip4/{}.{}.{}.{}/tcp/{port}", ip[0], ip[1], ip[2], ip[3])
            };
            s.parse().expect("a multiaddr")
        })
    }

    fn invitation() -> impl Strategy<Value = Invitation> {
        (
            any::<u8>(),
            ".{0,40}",
            kind(),
            proptest::collection::vec(addr(), 0..6),
        )
            .prop_map(|(seed, name, kind, addrs)| Invitation::new(key(seed), &name, kind, &addrs))
    }

    #[test]
    fn a_link_is_short_enough_to_read_and_scan() {
        let addrs: Vec<Multiaddr> = vec![
            "/ip4/192.0.2.7/tcp/4001".parse().unwrap(),
            "/ip4/192.0.2.7/udp/4001/quic-v1".parse().unwrap(),
        ];
        let link = Invitation::new(key(1), "Acme Support", Kind::Org, &addrs)
            .encode()
            .unwrap();
        assert!(link.starts_with("rapport:"), "{link}");
        assert!(link.len() < 140, "{} characters: {link}", link.len());
    }

    #[test]
    fn the_peer_part_of_an_address_is_left_out() {
        let me = key(2);
        let with: Multiaddr = format!("/ip4/127.0.0.1/tcp/9/p2p/{me}").parse().unwrap();
        let inv = Invitation::new(me, "Bob", Kind::Person, &[with.clone(), with]);
        assert_eq!(
            inv.addrs,
            vec!["/ip4/127.0.0.1/tcp/9".parse::<Multiaddr>().unwrap()]
        );
    }

    #[test]
    fn a_relayed_address_keeps_its_relay() {
        let me = key(5);
        let relay = key(6);
        let a: Multiaddr = format!("/ip4/192.0.2.1/tcp/4001/p2p/{relay}/p2p-circuit/p2p/{me}")
            .parse()
            .unwrap();
        let inv = Invitation::new(me, "Bob", Kind::Person, &[a]);
        let want: Multiaddr = format!("/ip4/192.0.2.1/tcp/4001/p2p/{relay}/p2p-circuit")
            .parse()
            .unwrap();
        assert_eq!(inv.addrs, vec![want]);
        assert_eq!(Invitation::decode(&inv.encode().unwrap()).unwrap(), inv);
    }

    #[test]
    fn a_crafted_body_with_a_valid_checksum_is_still_checked() {
        // Bytes after the addresses, with a correct checksum: made by hand, refused.
        let inv = Invitation::new(key(3), "x", Kind::Person, &[]);
        let mut b = inv.body();
        b.push(0);
        let sum = checksum(&b);
        b.extend_from_slice(&sum);
        let text = format!("rapport:{}", BASE32_NOPAD.encode(&b));
        assert_eq!(
            Invitation::decode(&text),
            Err(InviteError::Malformed("bytes after the addresses"))
        );
        // A kind that does not exist.
        let mut b = inv.body();
        b[33] = 9;
        let sum = checksum(&b);
        b.extend_from_slice(&sum);
        let text = format!("rapport:{}", BASE32_NOPAD.encode(&b));
        assert!(matches!(
            Invitation::decode(&text),
            Err(InviteError::Malformed(_))
        ));
    }

    #[test]
    fn oversized_text_is_refused_before_decoding() {
        let text = format!("rapport:{}", "a".repeat(MAX_INVITE_TEXT));
        assert!(matches!(
            Invitation::decode(&text),
            Err(InviteError::TooLong(_))
        ));
        assert_eq!(
            Invitation::decode("12D3KooWabc"),
            Err(InviteError::NotAnInvitation)
        );
    }

    proptest! {
        #[test]
        fn a_link_reads_back_as_it_was_written(inv in invitation()) {
            let link = inv.encode().unwrap();
            prop_assert_eq!(Invitation::decode(&link).unwrap(), inv.clone());
            // In upper case (a QR code), and wrapped over lines (a terminal), too.
            prop_assert_eq!(Invitation::decode(&link.to_ascii_uppercase()).unwrap(), inv.clone());
            let wrapped: String = link
                .chars()
                .enumerate()
                .flat_map(|(i, c)| if i % 20 == 19 { vec![c, '\n', ' '] } else { vec![c] })
                .collect();
            prop_assert_eq!(Invitation::decode(&wrapped).unwrap(), inv);
        }

        #[test]
        fn any_one_character_changed_is_refused(inv in invitation(), at in any::<prop::sample::Index>(), to in "[a-z2-7]") {
            let link = inv.encode().unwrap();
            let body = INVITE_PREFIX.len();
            let i = body + at.index(link.len() - body);
            let to = to.chars().next().unwrap();
            prop_assume!(link.as_bytes()[i] as char != to);
            let mut typo = link.clone();
            typo.replace_range(i..=i, &to.to_string());
            prop_assert!(Invitation::decode(&typo).is_err(), "{} read as valid", typo);
        }

        #[test]
        fn a_dropped_added_or_swapped_character_or_a_cut_is_refused(inv in invitation(), at in any::<prop::sample::Index>(), extra in "[a-z2-7]") {
            let link = inv.encode().unwrap();
            let body = INVITE_PREFIX.len();
            let i = body + at.index(link.len() - body);
            let mut dropped = link.clone();
            dropped.remove(i);
            prop_assert!(Invitation::decode(&dropped).is_err());
            let mut added = link.clone();
            added.insert_str(i, &extra);
            prop_assert!(Invitation::decode(&added).is_err());
            if i + 1 < link.len() && link.as_bytes()[i] != link.as_bytes()[i + 1] {
                let mut swapped = link.clone().into_bytes();
                swapped.swap(i, i + 1);
                prop_assert!(Invitation::decode(std::str::from_utf8(&swapped).unwrap()).is_err());
            }
            prop_assert!(Invitation::decode(&link[..i]).is_err());
        }

        #[test]
        fn any_text_is_refused_or_read_without_panicking(text in ".{0,300}") {
            let _ = Invitation::decode(&text);
            let _ = Invitation::decode(&format!("rapport:{text}"));
        }

        #[test]
        fn an_invitation_stays_within_its_size_however_many_addresses_it_is_given(
            name in ".{0,80}",
            addrs in proptest::collection::vec(addr(), 0..12),
        ) {
            let relay = key(9);
            let relayed: Vec<Multiaddr> = addrs
                .iter()
                .map(|a| format!("{a}/p2p/{relay}/p2p-circuit").parse().unwrap())
                .chain(addrs.iter().cloned())
                .collect();
            let inv = Invitation::new(key(4), &name, Kind::Org, &relayed);
            let link = inv.encode().unwrap();
            let most = INVITE_PREFIX.len() + (MAX_INVITE_BYTES + CHECKSUM_LEN).div_ceil(5) * 8;
            prop_assert!(link.len() <= most, "{} > {most}", link.len());
            prop_assert_eq!(Invitation::decode(&link).unwrap(), inv);
        }

        #[test]
        fn a_name_is_cut_at_a_character_boundary(name in ".{0,100}") {
            let inv = Invitation::new(key(4), &name, Kind::Person, &[]);
            prop_assert!(inv.name.len() <= MAX_INVITE_NAME);
            prop_assert!(name.starts_with(&inv.name));
            prop_assert_eq!(Invitation::decode(&inv.encode().unwrap()).unwrap(), inv);
        }
    }
}
