//! Content encryption: a content key per relationship and epoch, sealed to each member.
//!
//! **Member keys.** Every identity is an Ed25519 key; its X25519 key is the same secret
//! scalar, and the X25519 public key is the Montgomery form of the Ed25519 point
//! ([`IdentityKey::x25519_public`]). So a member's encryption key is bound to its identity by
//! construction: nothing else is published, and nobody can slip in a key of their own
//! choosing for somebody else's identity.
//!
//! **Epochs.** The owner of a relationship draws a random 32-byte content key per epoch and
//! writes an `epoch` entry (owner only) holding, for each recipient, that key sealed to the
//! recipient: one ephemeral X25519 key per epoch, a wrap key per recipient derived with
//! SHA-512 from the Diffie-Hellman output and both public keys, the document and the epoch,
//! and XChaCha20-Poly1305 over the content key. A recipient left out of an epoch learns
//! nothing of its key.
//!
//! Nothing here reads randomness: callers pass fresh random bytes in, which keeps this crate
//! free of I/O and its tests deterministic. Key material never appears in `Debug` output
//! or in an error.

use chacha20poly1305::aead::{Aead, Payload};
use chacha20poly1305::{KeyInit, XChaCha20Poly1305, XNonce};
use sha2::{Digest, Sha512};
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::identity::{IdentityKey, SecretKey};
use crate::signed::DocId;

/// Bytes of a content key.
pub const KEY_BYTES: usize = 32;
/// Bytes of a sealed content key: the key and its 16-byte tag.
pub const SEALED_KEY_BYTES: usize = KEY_BYTES + 16;
/// Bytes of an XChaCha20-Poly1305 nonce.
pub const NONCE_BYTES: usize = 24;

const WRAP_DOMAIN: &[u8] = b"rapport/epoch-wrap/v1\0";
const DIRECT_DOMAIN: &[u8] = b"rapport/direct-seal/v1\0";

/// A symmetric key: an epoch's content key, or a wrap key. Zeroed on drop; its `Debug`
/// output shows nothing of it.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct ContentKey([u8; KEY_BYTES]);

impl ContentKey {
    /// A key from 32 random bytes (the caller draws them).
    pub fn from_bytes(bytes: [u8; KEY_BYTES]) -> Self {
        Self(bytes)
    }

    /// The raw key, for storage at rest on the node that holds it.
    pub fn expose(&self) -> &[u8; KEY_BYTES] {
        &self.0
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new((&self.0).into())
    }

    /// Encrypts `msg` with `aad` bound in.
    pub(crate) fn encrypt(&self, nonce: &[u8; NONCE_BYTES], msg: &[u8], aad: &[u8]) -> Vec<u8> {
        self.cipher()
            .encrypt(XNonce::from_slice(nonce), Payload { msg, aad })
            .expect("XChaCha20-Poly1305 encrypts any message under 256 GiB")
    }

    /// Decrypts, or fails when the key, nonce, `aad` or ciphertext is not the one sealed.
    pub(crate) fn decrypt(
        &self,
        nonce: &[u8; NONCE_BYTES],
        ct: &[u8],
        aad: &[u8],
    ) -> Result<Vec<u8>, SealError> {
        self.cipher()
            .decrypt(XNonce::from_slice(nonce), Payload { msg: ct, aad })
            .map_err(|_| SealError::Open)
    }
}

impl std::fmt::Debug for ContentKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ContentKey(<redacted>)")
    }
}

/// Why something could not be sealed or opened. Says nothing about key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SealError {
    /// Authentication failed: wrong key, or the bytes were altered.
    #[error("cannot decrypt: not sealed to a key this node holds, or altered in transit")]
    Open,
    /// The other side's public key is a low-order point; no shared secret comes of it.
    #[error("the public key is degenerate (a low-order point)")]
    Degenerate,
    /// This node holds no key for the epoch named.
    #[error("no content key for epoch {0} here")]
    NoKey(u32),
    /// Malformed input.
    #[error("malformed sealed data: {0}")]
    Malformed(&'static str),
}

/// An epoch's content key sealed to each recipient, as an `epoch` entry carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedEpoch {
    /// The epoch's ephemeral X25519 public key.
    pub eph: [u8; 32],
    /// Each recipient and the content key sealed to it.
    pub slots: Vec<(IdentityKey, [u8; SEALED_KEY_BYTES])>,
}

/// A symmetric key from X25519 between `secret` and `public`, bound to `context`.
fn derive(
    domain: &[u8],
    secret: &x25519_dalek::StaticSecret,
    public: &[u8; 32],
    context: &[&[u8]],
) -> Result<ContentKey, SealError> {
    let shared = secret.diffie_hellman(&x25519_dalek::PublicKey::from(*public));
    if !shared.was_contributory() {
        return Err(SealError::Degenerate);
    }
    let mut h = Sha512::new();
    h.update(domain);
    h.update(shared.as_bytes());
    for part in context {
        h.update((part.len() as u32).to_be_bytes());
        h.update(part);
    }
    let out = h.finalize();
    let mut key = [0u8; KEY_BYTES];
    key.copy_from_slice(&out[..KEY_BYTES]);
    Ok(ContentKey(key))
}

/// The wrap key of one epoch slot. Each epoch has a fresh ephemeral key, so each wrap key is
/// used for exactly one encryption and its nonce can be fixed.
fn wrap_context(doc: &DocId, epoch: u32, eph: &[u8; 32], member: &IdentityKey) -> Vec<Vec<u8>> {
    vec![
        eph.to_vec(),
        member.x25519_public().to_vec(),
        member.as_bytes().to_vec(),
        doc.0.to_vec(),
        epoch.to_be_bytes().to_vec(),
    ]
}

/// Seals `key` (epoch `epoch` of `doc`) to each of `recipients` with the ephemeral secret
/// `eph_secret` (32 fresh random bytes, never reused). Recipients whose key is degenerate
/// cannot be sealed to and are left out; the result says which were.
pub fn seal_epoch(
    doc: &DocId,
    epoch: u32,
    key: &ContentKey,
    eph_secret: [u8; 32],
    recipients: &[IdentityKey],
) -> SealedEpoch {
    let eph_secret = x25519_dalek::StaticSecret::from(eph_secret);
    let eph = x25519_dalek::PublicKey::from(&eph_secret).to_bytes();
    let mut slots = Vec::with_capacity(recipients.len());
    for r in recipients {
        let ctx = wrap_context(doc, epoch, &eph, r);
        let parts: Vec<&[u8]> = ctx.iter().map(Vec::as_slice).collect();
        let Ok(wrap) = derive(WRAP_DOMAIN, &eph_secret, &r.x25519_public(), &parts) else {
            continue;
        };
        let ct = wrap.encrypt(&[0; NONCE_BYTES], key.expose(), r.as_bytes());
        slots.push((*r, ct.try_into().expect("32 bytes and a 16-byte tag")));
    }
    SealedEpoch { eph, slots }
}

/// Opens the slot sealed to `me` in an epoch entry.
pub fn open_epoch(
    doc: &DocId,
    epoch: u32,
    eph: &[u8; 32],
    sealed: &[u8; SEALED_KEY_BYTES],
    me: &SecretKey,
) -> Result<ContentKey, SealError> {
    let id = me.identity();
    let ctx = wrap_context(doc, epoch, eph, &id);
    let parts: Vec<&[u8]> = ctx.iter().map(Vec::as_slice).collect();
    let wrap = derive(WRAP_DOMAIN, &me.x25519_secret(), eph, &parts)?;
    let mut plain = wrap.decrypt(&[0; NONCE_BYTES], sealed, id.as_bytes())?;
    let bytes: [u8; KEY_BYTES] = plain
        .as_slice()
        .try_into()
        .map_err(|_| SealError::Malformed("a sealed key is not 32 bytes"))?;
    plain.zeroize();
    Ok(ContentKey(bytes))
}

/// A one-off key sealed directly to `to`, from the ephemeral secret `eph_secret`. Returns
/// the key and the ephemeral public key to send along.
pub(crate) fn direct_key(
    eph_secret: [u8; 32],
    to: &IdentityKey,
    context: &[u8],
) -> Result<(ContentKey, [u8; 32]), SealError> {
    let secret = x25519_dalek::StaticSecret::from(eph_secret);
    let eph = x25519_dalek::PublicKey::from(&secret).to_bytes();
    let key = derive(
        DIRECT_DOMAIN,
        &secret,
        &to.x25519_public(),
        &[&eph, to.as_bytes(), context],
    )?;
    Ok((key, eph))
}

/// The key [`direct_key`] made, recomputed by its recipient `me`.
pub(crate) fn open_direct_key(
    eph: &[u8; 32],
    me: &SecretKey,
    context: &[u8],
) -> Result<ContentKey, SealError> {
    derive(
        DIRECT_DOMAIN,
        &me.x25519_secret(),
        eph,
        &[eph, me.identity().as_bytes(), context],
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(n: u8) -> SecretKey {
        SecretKey::from_seed([n; 32])
    }

    #[test]
    fn identity_and_x25519_keys_agree() {
        // DH from either side with the bound keys gives the same secret.
        let (a, b) = (key(1), key(2));
        let ab = a
            .x25519_secret()
            .diffie_hellman(&x25519_dalek::PublicKey::from(b.identity().x25519_public()));
        let ba = b
            .x25519_secret()
            .diffie_hellman(&x25519_dalek::PublicKey::from(a.identity().x25519_public()));
        assert_eq!(ab.as_bytes(), ba.as_bytes());
        assert_eq!(
            x25519_dalek::PublicKey::from(&a.x25519_secret()).to_bytes(),
            a.identity().x25519_public()
        );
    }

    #[test]
    fn members_open_their_slot_and_nobody_else_does() {
        let doc = DocId([7; 32]);
        let content = ContentKey::from_bytes([9; 32]);
        let members = [key(1), key(2), key(3)];
        let ids: Vec<IdentityKey> = members[..2].iter().map(SecretKey::identity).collect();
        let sealed = seal_epoch(&doc, 4, &content, [5; 32], &ids);
        assert_eq!(sealed.slots.len(), 2);
        for (m, (id, slot)) in members.iter().zip(&sealed.slots) {
            assert_eq!(m.identity(), *id);
            assert_eq!(open_epoch(&doc, 4, &sealed.eph, slot, m).unwrap(), content);
        }
        // The third, left out, cannot open any slot; nor can a member under another epoch
        // or document.
        for (_, slot) in &sealed.slots {
            assert_eq!(
                open_epoch(&doc, 4, &sealed.eph, slot, &members[2]),
                Err(SealError::Open)
            );
        }
        let slot = &sealed.slots[0].1;
        assert!(open_epoch(&doc, 5, &sealed.eph, slot, &members[0]).is_err());
        assert!(open_epoch(&DocId([8; 32]), 4, &sealed.eph, slot, &members[0]).is_err());
    }

    #[test]
    fn debug_shows_no_key() {
        let k = ContentKey::from_bytes([0xAB; 32]);
        let shown = format!("{k:?}");
        assert!(!shown.to_lowercase().contains("ab"), "{shown}");
    }

    #[test]
    fn degenerate_public_keys_are_refused() {
        // The identity point's Montgomery u-coordinate is 1... use the all-zero point.
        let me = key(1);
        assert_eq!(
            open_direct_key(&[0; 32], &me, b"x").unwrap_err(),
            SealError::Degenerate
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        #[test]
        fn any_flipped_bit_fails_to_open(byte in 0usize..SEALED_KEY_BYTES, bit in 0u8..8) {
            let doc = DocId([1; 32]);
            let m = key(3);
            let sealed = seal_epoch(&doc, 0, &ContentKey::from_bytes([2; 32]), [4; 32], &[m.identity()]);
            let mut slot = sealed.slots[0].1;
            slot[byte] ^= 1 << bit;
            prop_assert_eq!(open_epoch(&doc, 0, &sealed.eph, &slot, &m), Err(SealError::Open));
        }

        #[test]
        fn direct_keys_agree(seed in any::<[u8; 32]>(), eph in any::<[u8; 32]>(), ctx in proptest::collection::vec(any::<u8>(), 0..64)) {
            let to = SecretKey::from_seed(seed);
            let (k, pubkey) = direct_key(eph, &to.identity(), &ctx).unwrap();
            prop_assert_eq!(open_direct_key(&pubkey, &to, &ctx).unwrap(), k);
        }
    }
}
