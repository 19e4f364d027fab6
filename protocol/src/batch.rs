//! Batch verification of Ed25519 signatures, with each key's terms summed into one.
//!
//! The equation is the one `ed25519_dalek::verify_batch` checks (cofactorless), for
//! signatures `(Rᵢ, sᵢ)` by keys `Aᵢ` over messages `Mᵢ`:
//!
//! ```text
//! [-Σ zᵢ·sᵢ]·B + Σ zᵢ·Rᵢ + Σ (zᵢ·kᵢ)·Aᵢ = 0,   kᵢ = H(Rᵢ ‖ Aᵢ ‖ Mᵢ)
//! ```
//!
//! with a 128-bit `zᵢ` per signature. The changes a node checks come from few authors (a
//! relationship has two members), so the `Aᵢ` repeat. Their scalars are summed per key before
//! the one multiscalar multiplication, which then has `n + k + 1` points instead of
//! `2n + 1` (k distinct keys): the sum is the same point, at about half the cost.
//!
//! The `zᵢ` come from SHA-512 over every signature's `kᵢ` and `sᵢ` (which bind `Rᵢ`, `Aᵢ` and
//! `Mᵢ`), as dalek derives them from a transcript of the same values. Whoever picks the
//! signatures cannot know the `zᵢ` before picking them all, so invalid signatures that
//! cancel out in the sum take about 2¹²⁸ tries to find.
//!
//! Like dalek's, the batch can accept what `verify_strict` refuses only for a signature
//! with a small-order component (only the holder of the secret key can make one, or a
//! small-order key, which identities refuse). A failed batch says nothing about which
//! signature failed: callers check those one by one, strictly.

use std::collections::HashMap;

use curve25519_dalek::constants::ED25519_BASEPOINT_POINT;
use curve25519_dalek::edwards::{CompressedEdwardsY, EdwardsPoint};
use curve25519_dalek::scalar::Scalar;
use curve25519_dalek::traits::{IsIdentity, VartimeMultiscalarMul};
use ed25519_dalek::{Signature, VerifyingKey};
use sha2::{Digest, Sha512};

/// Separates this use of SHA-512 from every other.
const Z_DOMAIN: &[u8] = b"rapport/batch-verification/v1\0";

/// Whether every signature of the batch holds for its message and key. Empty holds.
pub fn verify_batch<M: AsRef<[u8]>>(items: &[(M, Signature, VerifyingKey)]) -> bool {
    let n = items.len();
    if n == 0 {
        return true;
    }
    let mut seed = Sha512::new();
    seed.update(Z_DOMAIN);
    seed.update((n as u64).to_le_bytes());
    let mut ss = Vec::with_capacity(n);
    let mut ks = Vec::with_capacity(n);
    for (message, sig, key) in items {
        // s must be reduced, as for every other check of ours (no malleable signatures).
        let Some(s) = Option::<Scalar>::from(Scalar::from_canonical_bytes(*sig.s_bytes())) else {
            return false;
        };
        let hram: [u8; 64] = Sha512::new()
            .chain_update(sig.r_bytes())
            .chain_update(key.as_bytes())
            .chain_update(message.as_ref())
            .finalize()
            .into();
        seed.update(hram);
        seed.update(sig.s_bytes());
        ss.push(s);
        ks.push(Scalar::from_bytes_mod_order_wide(&hram));
    }
    let seed: [u8; 64] = seed.finalize().into();
    let zs = coefficients(&seed, n);

    let mut b = Scalar::ZERO;
    let mut slot: HashMap<[u8; 32], usize> = HashMap::new();
    let mut keys: Vec<(Scalar, EdwardsPoint)> = Vec::new();
    for (i, (_, _, key)) in items.iter().enumerate() {
        b += zs[i] * ss[i];
        let zk = zs[i] * ks[i];
        let at = *slot.entry(key.to_bytes()).or_insert_with(|| {
            keys.push((Scalar::ZERO, key.to_edwards()));
            keys.len() - 1
        });
        keys[at].0 += zk;
    }
    let scalars = std::iter::once(-b)
        .chain(zs.iter().copied())
        .chain(keys.iter().map(|(s, _)| *s));
    let points = std::iter::once(Some(ED25519_BASEPOINT_POINT))
        .chain(
            items
                .iter()
                .map(|(_, sig, _)| CompressedEdwardsY(*sig.r_bytes()).decompress()),
        )
        .chain(keys.iter().map(|(_, p)| Some(*p)));
    EdwardsPoint::optional_multiscalar_mul(scalars, points).is_some_and(|p| p.is_identity())
}

/// `n` 128-bit coefficients expanded from `seed`, four per SHA-512 block.
fn coefficients(seed: &[u8; 64], n: usize) -> Vec<Scalar> {
    let mut zs = Vec::with_capacity(n);
    for block in 0..n.div_ceil(4) as u64 {
        let out: [u8; 64] = Sha512::new()
            .chain_update(seed)
            .chain_update(block.to_le_bytes())
            .finalize()
            .into();
        for z in out.chunks_exact(16) {
            if zs.len() < n {
                let z: [u8; 16] = z.try_into().expect("16 bytes");
                zs.push(Scalar::from(u128::from_le_bytes(z)));
            }
        }
    }
    zs
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signer, SigningKey};
    use proptest::prelude::*;

    fn signed(keys: &[SigningKey], n: usize) -> Vec<(Vec<u8>, Signature, VerifyingKey)> {
        (0..n)
            .map(|i| {
                let k = &keys[i % keys.len()];
                let m = format!("message {i}").into_bytes();
                let s = k.sign(&m);
                (m, s, k.verifying_key())
            })
            .collect()
    }

    fn keys(n: u8) -> Vec<SigningKey> {
        (0..n)
            .map(|i| SigningKey::from_bytes(&[i + 1; 32]))
            .collect()
    }

    /// What dalek's batch says of the same items.
    fn dalek(items: &[(Vec<u8>, Signature, VerifyingKey)]) -> bool {
        let m: Vec<&[u8]> = items.iter().map(|(m, _, _)| &m[..]).collect();
        let s: Vec<Signature> = items.iter().map(|(_, s, _)| *s).collect();
        let k: Vec<VerifyingKey> = items.iter().map(|(_, _, k)| *k).collect();
        ed25519_dalek::verify_batch(&m, &s, &k).is_ok()
    }

    #[test]
    fn good_signatures_hold_in_batches_of_any_size_and_keys() {
        for (n, k) in [
            (0, 1),
            (1, 1),
            (2, 2),
            (7, 3),
            (64, 2),
            (300, 5),
            (257, 200),
        ] {
            let items = signed(&keys(k), n);
            assert!(verify_batch(&items), "{n} signatures by {k} keys");
        }
    }

    /// The coefficients differ from one to the next and are not zero: a zero one would
    /// drop its signature from the equation.
    #[test]
    fn coefficients_are_distinct_and_not_zero() {
        let zs = coefficients(&[9; 64], 1000);
        assert_eq!(zs.len(), 1000);
        let set: std::collections::HashSet<[u8; 32]> = zs.iter().map(Scalar::to_bytes).collect();
        assert_eq!(set.len(), 1000);
        assert!(!set.contains(&[0; 32]));
    }

    /// Two forged signatures whose errors cancel: one `s` raised by δ, another lowered by
    /// δ. Each fails on its own, and a plain sum of the equations would hold; the
    /// coefficients are what makes the batch fail.
    #[test]
    fn errors_that_cancel_in_a_plain_sum_fail() {
        let mut items = signed(&keys(2), 10);
        let delta = Scalar::from(12_345u64);
        for (i, d) in [(3, delta), (6, -delta)] {
            let mut b = items[i].1.to_bytes();
            let s = Scalar::from_canonical_bytes(b[32..].try_into().unwrap()).unwrap();
            b[32..].copy_from_slice((s + d).as_bytes());
            items[i].1 = Signature::from_bytes(&b);
            assert!(items[i].2.verify_strict(&items[i].0, &items[i].1).is_err());
        }
        assert!(!verify_batch(&items));
    }

    /// A signature whose `s` is not reduced (s + ℓ) holds in the group but is a second
    /// encoding of the same signature: refused, as `verify_strict` refuses it.
    #[test]
    fn an_unreduced_s_fails() {
        let mut items = signed(&keys(2), 5);
        let mut bytes = items[2].1.to_bytes();
        let s = Scalar::from_canonical_bytes(bytes[32..].try_into().unwrap()).unwrap();
        // ℓ = 2^252 + 27742317777372353535851937790883648493, little-endian.
        let l: [u8; 32] = [
            0xed, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7, 0xa2, 0xde, 0xf9,
            0xde, 0x14, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
        ];
        let mut sum = [0u8; 32];
        let mut carry = 0u16;
        for i in 0..32 {
            let v = u16::from(s.to_bytes()[i]) + u16::from(l[i]) + carry;
            sum[i] = v as u8;
            carry = v >> 8;
        }
        assert_eq!(carry, 0);
        bytes[32..].copy_from_slice(&sum);
        items[2].1 = Signature::from_bytes(&bytes);
        assert!(!verify_batch(&items));
        assert!(items[2].2.verify_strict(&items[2].0, &items[2].1).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Any byte of any signature, message or key changed, in a batch of good ones by
        /// one to four keys: the batch fails, and dalek's batch agrees on every outcome.
        #[test]
        fn any_change_to_a_batch_fails_it(
            n in 1usize..40,
            k in 1u8..5,
            which in any::<prop::sample::Index>(),
            part in 0u8..3,
            pos in any::<prop::sample::Index>(),
            flip in 1u8..=255,
        ) {
            let mut items = signed(&keys(k), n);
            prop_assert!(verify_batch(&items));
            let i = which.index(n);
            match part {
                0 => {
                    let mut b = items[i].1.to_bytes();
                    b[pos.index(64)] ^= flip;
                    items[i].1 = Signature::from_bytes(&b);
                }
                1 => {
                    let m = &mut items[i].0;
                    let at = pos.index(m.len());
                    m[at] ^= flip;
                }
                _ => {
                    let mut b = items[i].2.to_bytes();
                    b[pos.index(32)] ^= flip;
                    match VerifyingKey::from_bytes(&b) {
                        Ok(key) => items[i].2 = key,
                        // Not a point: nothing to batch with it.
                        Err(_) => return Ok(()),
                    }
                }
            }
            prop_assert!(!verify_batch(&items));
            prop_assert_eq!(verify_batch(&items), dalek(&items));
        }

        /// On good batches the two agree too, whatever the mix of keys.
        #[test]
        fn agrees_with_dalek_on_good_batches(n in 0usize..80, k in 1u8..9) {
            let items = signed(&keys(k), n);
            prop_assert_eq!(verify_batch(&items), dalek(&items));
            prop_assert!(verify_batch(&items));
        }
    }
}
