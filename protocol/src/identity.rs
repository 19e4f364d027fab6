//! Identities: Ed25519 keys and their one text form.
//!
//! The text form of an identity is the base58btc encoding of the libp2p `PeerId` of the same
//! key (an identity multihash over the protobuf-encoded public key), so a Rapport identity
//! and the `PeerId` of the node holding that key are the same string: `12D3KooW…`.

use std::fmt;
use std::str::FromStr;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

/// Bytes that precede the 32-byte key in a libp2p `PeerId` of an Ed25519 key:
/// multihash code 0x00 (identity), length 36, then protobuf `PublicKey { Type: Ed25519 (1),
/// Data: 32 bytes }`.
const PEER_ID_PREFIX: [u8; 6] = [0x00, 0x24, 0x08, 0x01, 0x12, 0x20];

/// Why a text could not be read as an identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// The text is not base58btc.
    #[error("identity {0:?} is not base58 text (expected something like 12D3KooW…)")]
    NotBase58(String),
    /// The decoded bytes are not a libp2p `PeerId` of an Ed25519 key.
    #[error(
        "identity {0:?} is not an Ed25519 identity (expected 38 bytes starting 00 24 08 01 12 20)"
    )]
    NotEd25519(String),
    /// The 32 key bytes are not a usable Ed25519 public key (off the curve or of small order).
    #[error("identity {0:?} holds an invalid or weak Ed25519 public key")]
    InvalidKey(String),
}

/// A public identity: an Ed25519 public key, kept as its 32 bytes (checked to be a valid,
/// strong key when read; see [`IdentityKey::from_bytes`]). Its [`Display`](fmt::Display)
/// and [`FromStr`] forms are the libp2p `PeerId` text of the same key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct IdentityKey([u8; 32]);

thread_local! {
    /// Set while this thread reads back what its node stored itself ([`read_trusted`]).
    static TRUSTED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// The last keys decompressed on this thread. Decompressing a key costs about as much
    /// as half a signature check, and a ledger names the same few keys in every entry
    /// (valid keys only; a pure cache, it changes no answer).
    static SEEN: std::cell::RefCell<std::collections::HashMap<[u8; 32], VerifyingKey>> =
        std::cell::RefCell::new(std::collections::HashMap::new());
    /// The text forms of identities lately shown: a document names a handful of identities
    /// thousands of times, and base58 encoding is quadratic in its input.
    static TEXTS: std::cell::RefCell<std::collections::HashMap<[u8; 32], std::rc::Rc<str>>> =
        std::cell::RefCell::new(std::collections::HashMap::new());
}

/// Entries the text cache holds before it starts again.
const TEXT_CACHE: usize = 256;

/// Remembers the text of `key`.
fn remember(key: [u8; 32], text: std::rc::Rc<str>) {
    TEXTS.with(|m| {
        let mut m = m.borrow_mut();
        if m.len() >= TEXT_CACHE {
            m.clear();
        }
        m.insert(key, text);
    });
}

/// The base58btc (Bitcoin) alphabet.
const BASE58: &[u8; 58] = b"123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";

/// The value of each base58 digit, by its byte; 0xff for a byte that is none.
const BASE58_DIGITS: [u8; 256] = {
    let mut t = [0xffu8; 256];
    let mut i = 0;
    while i < 58 {
        t[BASE58[i] as usize] = i as u8;
        i += 1;
    }
    t
};

/// The 38 bytes that a base58btc text of a `PeerId` of an Ed25519 key decodes to; `None`
/// for a text that does not decode to exactly 38 bytes (the caller then decodes it again
/// the slow way, for the reason). Same result as `bs58::decode`, in 32-bit limbs, five
/// digits at a time: bs58 works a byte at a time, quadratic in the text, and that was an
/// eighth of the start of a node holding 100,000 customers, whose store names each of
/// them as text.
fn decode_peer_id_text(s: &str) -> Option<[u8; 38]> {
    // 58^5 < 2^32: five digits fit one limb step. Ten limbs hold 320 bits, more than the
    // 304 of 38 bytes; anything larger overflows and is refused.
    const STEP: u64 = 58u64.pow(5);
    let text = s.as_bytes();
    if text.len() > 64 {
        return None;
    }
    let mut limbs = [0u32; 10]; // little-endian
    let mut used = 0; // limbs below this may be non-zero
    for group in text.chunks(5) {
        let mut value = 0u64;
        let mut scale = 1u64;
        for &c in group {
            let d = BASE58_DIGITS[c as usize];
            if d == 0xff {
                return None;
            }
            value = value * 58 + u64::from(d);
            scale *= 58;
        }
        let scale = if group.len() == 5 { STEP } else { scale };
        let mut carry = value;
        for limb in &mut limbs[..used] {
            let x = u64::from(*limb) * scale + carry;
            *limb = x as u32;
            carry = x >> 32;
        }
        // The carry is below 2^32 (the limb, the scale and the carry in are), so it takes
        // one limb more at most.
        if carry != 0 {
            if used == limbs.len() {
                return None;
            }
            limbs[used] = carry as u32;
            used += 1;
        }
    }
    let mut number = [0u8; 40];
    for (i, limb) in limbs.iter().enumerate() {
        number[40 - 4 * (i + 1)..40 - 4 * i].copy_from_slice(&limb.to_be_bytes());
    }
    // Leading '1's stand for leading zero bytes; the number follows without its own.
    let zeros = text.iter().take_while(|&&c| c == b'1').count();
    let significant = &number[number.iter().take_while(|&&b| b == 0).count()..];
    if zeros + significant.len() != 38 {
        return None;
    }
    let mut out = [0u8; 38];
    out[zeros..].copy_from_slice(significant);
    Some(out)
}

/// Runs `read` with identities taken as they are, without the curve check of
/// [`IdentityKey::from_bytes`]: for a node reading back its own store, which holds only
/// identities checked when they arrived. At 100,000 customers the check was half of a
/// node's start. An identity so read that is not a valid key (a store changed outside the
/// node) still verifies no signature and is sealed nothing.
pub fn read_trusted<T>(read: impl FnOnce() -> T) -> T {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            TRUSTED.with(|t| t.set(self.0));
        }
    }
    let _reset = Reset(TRUSTED.with(|t| t.replace(true)));
    read()
}

/// The curve point of a key, refusing invalid and weak keys.
fn decompress(bytes: &[u8; 32]) -> Result<VerifyingKey, IdentityError> {
    if let Some(key) = SEEN.with(|m| m.borrow().get(bytes).copied()) {
        return Ok(key);
    }
    let key = VerifyingKey::from_bytes(bytes)
        .map_err(|_| IdentityError::InvalidKey(hex::encode(bytes)))?;
    if key.is_weak() {
        return Err(IdentityError::InvalidKey(hex::encode(bytes)));
    }
    SEEN.with(|m| {
        let mut m = m.borrow_mut();
        if m.len() >= 256 {
            m.clear();
        }
        m.insert(*bytes, key);
    });
    Ok(key)
}

impl IdentityKey {
    /// Reads an identity from its 32 raw public-key bytes, refusing invalid and weak keys
    /// (inside [`read_trusted`], taking them as they are).
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<Self, IdentityError> {
        if !TRUSTED.with(std::cell::Cell::get) {
            decompress(bytes)?;
        }
        Ok(Self(*bytes))
    }

    /// The 32 raw public-key bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The bytes of the libp2p `PeerId` of this key.
    pub fn peer_id_bytes(&self) -> [u8; 38] {
        let mut out = [0u8; 38];
        out[..6].copy_from_slice(&PEER_ID_PREFIX);
        out[6..].copy_from_slice(self.as_bytes());
        out
    }

    /// Reads an identity from libp2p `PeerId` bytes.
    pub fn from_peer_id_bytes(bytes: &[u8]) -> Result<Self, IdentityError> {
        let key: &[u8; 32] = bytes
            .strip_prefix(&PEER_ID_PREFIX[..])
            .and_then(|rest| rest.try_into().ok())
            .ok_or_else(|| IdentityError::NotEd25519(bs58::encode(bytes).into_string()))?;
        Self::from_bytes(key)
    }

    /// The verifying key (the curve point), or why these bytes are none (only an identity
    /// read inside [`read_trusted`] from a store changed outside the node can fail here).
    pub fn verifying_key(&self) -> Result<VerifyingKey, IdentityError> {
        decompress(&self.0)
    }

    /// The X25519 public key bound to this identity: the Montgomery form of the Ed25519
    /// point (see [`crate::seal`]). All zeros for bytes that are no valid key (see
    /// [`IdentityKey::verifying_key`]), which sealing refuses as a degenerate key.
    pub fn x25519_public(&self) -> [u8; 32] {
        self.verifying_key()
            .map_or([0; 32], |k| k.to_montgomery().to_bytes())
    }

    /// A short form for tables and logs: the last 8 characters of the text form.
    pub fn short(&self) -> String {
        let s = self.to_string();
        format!("…{}", &s[s.len() - 8..])
    }
}

impl PartialOrd for IdentityKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// Identities order by their key bytes, so maps of identities iterate the same everywhere.
impl Ord for IdentityKey {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_bytes().cmp(other.as_bytes())
    }
}

impl fmt::Display for IdentityKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(text) = TEXTS.with(|m| m.borrow().get(&self.0).cloned()) {
            return f.write_str(&text);
        }
        let text: std::rc::Rc<str> = bs58::encode(self.peer_id_bytes()).into_string().into();
        remember(self.0, text.clone());
        f.write_str(&text)
    }
}

impl fmt::Debug for IdentityKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IdentityKey({self})")
    }
}

impl FromStr for IdentityKey {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // A PeerId text is 52 characters; anything much longer is not one, so refuse before
        // decoding untrusted input of any size.
        if s.len() > 64 {
            return Err(IdentityError::NotEd25519(s.chars().take(64).collect()));
        }
        let fast = decode_peer_id_text(s);
        let slow: Vec<u8>;
        let bytes: &[u8] = match &fast {
            Some(b) => b,
            None => {
                slow = bs58::decode(s)
                    .into_vec()
                    .map_err(|_| IdentityError::NotBase58(s.to_owned()))?;
                &slow
            }
        };
        Self::from_peer_id_bytes(bytes).map_err(|e| match e {
            IdentityError::NotEd25519(_) => IdentityError::NotEd25519(s.to_owned()),
            IdentityError::InvalidKey(_) => IdentityError::InvalidKey(s.to_owned()),
            other => other,
        })
    }
}

impl Serialize for IdentityKey {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for IdentityKey {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A secret signing key. It never appears in `Debug` output, and its bytes are zeroed when
/// it is dropped (ed25519-dalek's `SigningKey` zeroizes itself).
#[derive(Clone)]
pub struct SecretKey(SigningKey);

/// `SigningKey`, the only field, zeroizes on drop.
impl ZeroizeOnDrop for SecretKey {}

impl SecretKey {
    /// Builds the key from a 32-byte seed, and zeroes this copy of the seed. The caller
    /// supplies the randomness, so this crate stays free of I/O.
    pub fn from_seed(mut seed: [u8; 32]) -> Self {
        let key = Self(SigningKey::from_bytes(&seed));
        seed.zeroize();
        key
    }

    /// The 32-byte seed, for storage at rest; zeroed when the returned value is dropped.
    pub fn to_seed(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.0.to_bytes())
    }

    /// The public identity of this key.
    pub fn identity(&self) -> IdentityKey {
        IdentityKey(self.0.verifying_key().to_bytes())
    }

    /// Signs raw bytes. Callers add their own domain separation.
    pub(crate) fn sign_raw(&self, message: &[u8]) -> Signature {
        self.0.sign(message)
    }

    /// The X25519 secret bound to this identity (see [`crate::seal`]): the same scalar as
    /// the Ed25519 key, so no second key has to be published or trusted.
    pub(crate) fn x25519_secret(&self) -> x25519_dalek::StaticSecret {
        let scalar = Zeroizing::new(self.0.to_scalar_bytes());
        x25519_dalek::StaticSecret::from(*scalar)
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey(for {})", self.identity())
    }
}

/// What kind of party an identity belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A customer: a person.
    Person,
    /// A company or other organisation.
    Org,
    /// A community, which typically runs a relay.
    Community,
}

impl Kind {
    /// The lowercase name used on the command line and in files.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Person => "person",
            Kind::Org => "org",
            Kind::Community => "community",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Kind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "person" => Ok(Kind::Person),
            "org" => Ok(Kind::Org),
            "community" => Ok(Kind::Community),
            other => Err(format!(
                "unknown kind {other:?}: expected person, org or community"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Every type that holds the node's seed zeroes it on drop.
    #[test]
    fn secret_keys_zeroize_on_drop() {
        fn assert_zeroize_on_drop<T: ZeroizeOnDrop>() {}
        assert_zeroize_on_drop::<SecretKey>();
        assert_zeroize_on_drop::<SigningKey>();
        assert_zeroize_on_drop::<Zeroizing<[u8; 32]>>();
        assert_zeroize_on_drop::<x25519_dalek::StaticSecret>();
        let key = SecretKey::from_seed([7; 32]);
        let seed: Zeroizing<[u8; 32]> = key.to_seed();
        assert_eq!(*seed, [7; 32]);
    }

    proptest! {
        /// The fast decoding gives what bs58 gives, for every 38 bytes' text and for any
        /// text: exactly the 38 bytes, or nothing where bs58 gives an error or other bytes.
        #[test]
        fn peer_id_text_decodes_as_bs58_does(
            bytes in proptest::collection::vec(any::<u8>(), 38),
            zeros in 0usize..39,
            text in "[1-9A-HJ-NP-Za-km-z0OIl+]{0,64}",
        ) {
            let mut b = bytes.clone();
            b[..zeros].fill(0);
            let encoded = bs58::encode(&b).into_string();
            prop_assert_eq!(decode_peer_id_text(&encoded).map(|d| d.to_vec()), Some(b));
            let expected = bs58::decode(&text).into_vec().ok().filter(|d| d.len() == 38);
            prop_assert_eq!(decode_peer_id_text(&text).map(|d| d.to_vec()), expected);
            // One digit more or less is another length, or another number.
            let longer = format!("{encoded}z");
            let expected = bs58::decode(&longer).into_vec().ok().filter(|d| d.len() == 38);
            prop_assert_eq!(decode_peer_id_text(&longer).map(|d| d.to_vec()), expected);
        }
    }

    #[test]
    fn peer_id_text_decoding_edges() {
        // The largest 38 bytes, and one past them; all '1's; a leading zero too many.
        let max = bs58::encode([0xffu8; 38]).into_string();
        assert_eq!(decode_peer_id_text(&max), Some([0xff; 38]));
        let past = bs58::encode([&[1u8][..], &[0u8; 38][..]].concat()).into_string();
        assert_eq!(decode_peer_id_text(&past), None);
        assert_eq!(decode_peer_id_text(&"1".repeat(38)), Some([0; 38]));
        assert_eq!(decode_peer_id_text(&"1".repeat(39)), None);
        let id = SecretKey::from_seed([9; 32]).identity();
        let text = id.to_string();
        assert_eq!(decode_peer_id_text(&text), Some(id.peer_id_bytes()));
        assert_eq!(decode_peer_id_text(&format!("1{text}")), None);
    }

    #[test]
    fn text_form_is_a_libp2p_ed25519_peer_id() {
        let id = SecretKey::from_seed([7; 32]).identity();
        let text = id.to_string();
        assert!(text.starts_with("12D3KooW"), "{text}");
        assert_eq!(text.len(), 52);
        assert_eq!(text.parse::<IdentityKey>().unwrap(), id);
    }

    #[test]
    fn parser_rejects_bad_input_with_a_reason() {
        assert!(matches!(
            "not-base58-0OIl".parse::<IdentityKey>(),
            Err(IdentityError::NotBase58(_))
        ));
        // A valid base58 string of the wrong shape (a secp256k1-style or sha256 PeerId).
        assert!(matches!(
            "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N".parse::<IdentityKey>(),
            Err(IdentityError::NotEd25519(_))
        ));
        assert!(matches!(
            "x".repeat(500).parse::<IdentityKey>(),
            Err(IdentityError::NotEd25519(_))
        ));
        // The identity point (small order) is refused.
        let mut weak = [0u8; 32];
        weak[0] = 1;
        assert!(matches!(
            IdentityKey::from_bytes(&weak),
            Err(IdentityError::InvalidKey(_))
        ));
    }

    #[test]
    fn a_trusted_read_skips_the_curve_check_only_inside_it_and_a_bad_key_stays_useless() {
        let mut weak = [0u8; 32];
        weak[0] = 1;
        let taken = read_trusted(|| IdentityKey::from_bytes(&weak)).unwrap();
        assert_eq!(taken.as_bytes(), &weak);
        // Outside, and after a read that panicked, the check is back.
        assert!(IdentityKey::from_bytes(&weak).is_err());
        let _ = std::panic::catch_unwind(|| read_trusted(|| panic!("a read failed")));
        assert!(IdentityKey::from_bytes(&weak).is_err());
        // Such a key verifies nothing and is sealed nothing.
        assert!(taken.verifying_key().is_err());
        assert_eq!(taken.x25519_public(), [0; 32]);
        // A good key read either way is the same identity.
        let good = SecretKey::from_seed([4; 32]).identity();
        let again = read_trusted(|| IdentityKey::from_bytes(good.as_bytes())).unwrap();
        assert_eq!(again, good);
        assert!(again.verifying_key().is_ok());
    }

    proptest! {
        #[test]
        fn text_round_trips(seed in any::<[u8; 32]>()) {
            let id = SecretKey::from_seed(seed).identity();
            prop_assert_eq!(id.to_string().parse::<IdentityKey>().unwrap(), id);
        }

        #[test]
        fn parser_never_panics(s in "\\PC{0,80}") {
            let _ = s.parse::<IdentityKey>();
        }

        /// The text caches change no answer: the same text reads the same way the first
        /// time and after, and an identity shows as the base58 of its PeerId bytes.
        #[test]
        fn the_text_caches_change_no_answer(seed in any::<[u8; 32]>(), noise in "[1-9A-HJ-NP-Za-km-z]{0,60}") {
            let id = SecretKey::from_seed(seed).identity();
            let direct = bs58::encode(id.peer_id_bytes()).into_string();
            prop_assert_eq!(id.to_string(), direct.clone());
            prop_assert_eq!(id.to_string(), direct.clone());
            for text in [direct.as_str(), noise.as_str()] {
                let first = text.parse::<IdentityKey>();
                prop_assert_eq!(text.parse::<IdentityKey>(), first.clone());
                prop_assert_eq!(first.is_ok(), text == direct);
            }
        }

        #[test]
        fn any_changed_character_is_refused_or_another_key(seed in any::<[u8; 32]>(), pos in 0usize..52, c in "[1-9A-HJ-NP-Za-km-z]") {
            let id = SecretKey::from_seed(seed).identity();
            let mut text: Vec<char> = id.to_string().chars().collect();
            let new = c.chars().next().unwrap();
            prop_assume!(text[pos] != new);
            text[pos] = new;
            let text: String = text.into_iter().collect();
            if let Ok(other) = text.parse::<IdentityKey>() { prop_assert_ne!(other, id) }
        }
    }
}
