//! Signed changes: an Automerge change plus its author's Ed25519 signature over the change
//! hash, bound to one document.
//!
//! The author of a change is named by the change itself: its Automerge actor id is the
//! author's 32 public-key bytes followed by 16 bytes the writing node picks at random (one
//! actor per writer session, so several devices of one identity never collide).
//!
//! The signed message is `"rapport/change/v1\0" || doc_id (32) || change_hash (32)`. Binding
//! the document id stops a change signed for one document from being replayed into another.

use std::collections::HashSet;
use std::fmt;

use automerge::{ActorId, Change, ChangeHash};
use ed25519_dalek::{Signature, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::identity::{IdentityKey, SecretKey};

/// Domain separation for change signatures.
pub const CHANGE_DOMAIN: &[u8] = b"rapport/change/v1\0";
/// Version byte that starts every encoded signed change.
pub const SIGNED_CHANGE_VERSION: u8 = 1;
/// The largest encoded signed change any decoder accepts (1 MiB).
pub const MAX_SIGNED_CHANGE_BYTES: usize = 1 << 20;
/// Length of an actor id: 32 bytes of author key and 16 bytes of writer nonce.
pub const ACTOR_ID_LEN: usize = 48;
/// How many signatures go into one batch verification, at most. A batch of `n` signatures
/// is one multiscalar multiplication of about `n` points, which dalek computes with
/// Straus's method below 190 points and Pippenger's from there, at less per signature as
/// the batch grows: on the reference machine 12.2 µs a signature in batches of 170,
/// 10.8 in batches of 256, 10.3 in batches of 512. So the sets a node checks ahead (up to
/// 512 changes) go as one batch each, not as two small ones of Straus's. A batch that
/// fails (a forged signature) is checked again one signature at a time: at most this many
/// single checks.
const BATCH: usize = 512;

/// From how many signatures [`good_signatures`] splits the work across the machine's cores.
const SPLIT_AT: usize = 2 * BATCH;

/// An unsigned LEB128 number at the start of `bytes` and how many bytes it took; `None`
/// when it is cut short or does not fit 64 bits.
fn uleb(bytes: &[u8]) -> Option<(u64, usize)> {
    let mut value = 0u64;
    for (i, b) in bytes.iter().enumerate().take(10) {
        let part = u64::from(b & 0x7f);
        if i == 9 && part > 1 {
            return None;
        }
        value |= part << (7 * i);
        if b & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

/// The id of a document: 32 bytes, shown as hex.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DocId(pub [u8; 32]);

impl DocId {
    /// Hex text of the id.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Reads a hex id.
    pub fn from_hex(s: &str) -> Option<Self> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(Self(out))
    }
}

impl fmt::Display for DocId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for DocId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DocId({})", self.to_hex())
    }
}

impl Serialize for DocId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for DocId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        DocId::from_hex(&s)
            .ok_or_else(|| serde::de::Error::custom("document id is not 64 hex digits"))
    }
}

/// Why a signed change was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ChangeError {
    /// The encoding is longer than [`MAX_SIGNED_CHANGE_BYTES`].
    #[error("signed change is {0} bytes, more than the limit of {MAX_SIGNED_CHANGE_BYTES}")]
    TooLarge(usize),
    /// The encoding is too short or has an unknown version byte.
    #[error("signed change has an unknown format (version byte or length wrong)")]
    BadFormat,
    /// The Automerge change inside does not parse or its checksum does not match.
    #[error("the Automerge change does not parse: {0}")]
    BadChange(String),
    /// The actor id is not 48 bytes starting with a valid Ed25519 key.
    #[error("change {0} names no valid author (actor id must be 32 key bytes and 16 nonce bytes)")]
    NoAuthor(String),
    /// The author is not among the keys authorised for this document.
    #[error("change {hash} is by {author}, who may not write to this document")]
    Unauthorised {
        /// The change hash (hex).
        hash: String,
        /// The author's identity text.
        author: String,
    },
    /// The signature does not verify for this document, author and change hash.
    #[error("change {0}: signature does not verify for this document and author")]
    BadSignature(String),
}

/// An Automerge change with its author's signature.
#[derive(Clone)]
pub struct SignedChange {
    /// Boxed: Automerge's `Change` is 520 bytes, and a change arriving is moved from one
    /// list to the next several times on its way to the store (decoded, deduplicated,
    /// verified, checked, applied); a boxed one moves as 104.
    change: Box<Change>,
    signature: Signature,
    author: [u8; 32],
}

impl SignedChange {
    /// Signs `change` for document `doc`. The change's actor id must name `key`'s identity.
    pub fn sign(doc: &DocId, change: Change, key: &SecretKey) -> Result<Self, ChangeError> {
        let author = author_bytes(&change)?;
        if &author != key.identity().as_bytes() {
            return Err(ChangeError::Unauthorised {
                hash: change.hash().to_string(),
                author: key.identity().to_string(),
            });
        }
        let signature = key.sign_raw(&signing_message(doc, &change.hash()));
        Ok(Self {
            change: Box::new(change),
            signature,
            author,
        })
    }

    /// Decodes `[version 1][signature 64][automerge change bytes]`. Checks format, size and
    /// the change's own checksum; the signature is checked by [`verify`](Self::verify) or
    /// [`verify_all`].
    pub fn decode(bytes: &[u8]) -> Result<Self, ChangeError> {
        if bytes.len() > MAX_SIGNED_CHANGE_BYTES {
            return Err(ChangeError::TooLarge(bytes.len()));
        }
        if bytes.len() < 65 || bytes[0] != SIGNED_CHANGE_VERSION {
            return Err(ChangeError::BadFormat);
        }
        let signature = Signature::from_bytes(bytes[1..65].try_into().expect("64 bytes"));
        // Automerge 0.12's parser itself panics on some chunks (an operation counter over
        // 32 bits), and this runs before any signature is checked: contain it.
        let change = crate::guard::contain(|| Change::try_from(&bytes[65..]))
            .map_err(|_| ChangeError::BadChange("Automerge cannot parse the change".into()))?
            .map_err(|e| ChangeError::BadChange(e.to_string()))?;
        // Automerge does not check a change chunk's checksum field on parse, and the hash
        // leaves that field out, so bytes that differ only there would carry a valid
        // signature. Insist on the one canonical encoding: checksum = first 4 hash bytes, and
        // nothing after the chunk.
        let chunk = &bytes[65..];
        if chunk.len() < 8
            || chunk[4..8] != change.hash().0[..4]
            || change.raw_bytes().len() != chunk.len()
        {
            return Err(ChangeError::BadChange(
                "checksum does not match the change hash, or bytes follow the change".into(),
            ));
        }
        let author = author_bytes(&change)?;
        Ok(Self {
            change: Box::new(change),
            signature,
            author,
        })
    }

    /// [`decode`](Self::decode) of many encodings, on up to four threads for a large set
    /// (parsing an Automerge change and hashing it is most of a change's cost on arrival
    /// and when a document is read back from a store). In the order given.
    pub fn decode_all<B: AsRef<[u8]> + Sync>(encoded: &[B]) -> Vec<Result<Self, ChangeError>> {
        crate::append::par_map(encoded, |b| Self::decode(b.as_ref()))
    }

    /// The hash and the dependencies of an encoded signed change, read from the change
    /// chunk's header without parsing its operations: for a node sending changes from its
    /// own store, which needs no more. `None` when the encoding is not a plain
    /// (uncompressed) change chunk whose checksum matches the hash so computed; the caller
    /// then decodes it in full. Checks nothing else, the signature least of all.
    pub fn peek(encoded: &[u8]) -> Option<(ChangeHash, Vec<ChangeHash>)> {
        use sha2::{Digest, Sha256};
        const MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];
        const CHANGE_CHUNK: u8 = 1;
        let chunk = encoded.get(65..)?;
        if encoded.first() != Some(&SIGNED_CHANGE_VERSION) || chunk.get(..4)? != MAGIC {
            return None;
        }
        // [magic 4][checksum 4][type 1][length uLEB128][body]; the hash covers type,
        // length and body, and the checksum is its first four bytes.
        if *chunk.get(8)? != CHANGE_CHUNK {
            return None;
        }
        let (len, n) = uleb(chunk.get(9..)?)?;
        let body = chunk.get(9 + n..)?;
        if u64::try_from(body.len()).ok()? != len {
            return None;
        }
        let hash: [u8; 32] = Sha256::digest(&chunk[8..]).into();
        if chunk[4..8] != hash[..4] {
            return None;
        }
        // The body starts with the dependencies: a count, then that many hashes.
        let (count, n) = uleb(body)?;
        let deps = body.get(n..)?;
        let count = usize::try_from(count).ok()?;
        if deps.len() / 32 < count {
            return None;
        }
        let deps = deps
            .chunks_exact(32)
            .take(count)
            .map(|d| ChangeHash(d.try_into().expect("32 bytes")))
            .collect();
        Some((ChangeHash(hash), deps))
    }

    /// The encoding read by [`decode`](Self::decode).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(65 + self.change.raw_bytes().len());
        self.encode_into(&mut out);
        out
    }

    /// [`encode`](Self::encode) into `out`, replacing what it held (to reuse one buffer).
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.clear();
        out.push(SIGNED_CHANGE_VERSION);
        out.extend_from_slice(&self.signature.to_bytes());
        out.extend_from_slice(self.change.raw_bytes());
    }

    /// The Automerge change.
    pub fn change(&self) -> &Change {
        &self.change
    }

    /// The change hash.
    pub fn hash(&self) -> ChangeHash {
        self.change.hash()
    }

    /// The 64 signature bytes.
    pub fn signature_bytes(&self) -> [u8; 64] {
        self.signature.to_bytes()
    }

    /// The 32 key bytes of the author named by the change's actor id (not yet verified).
    pub fn author_bytes(&self) -> &[u8; 32] {
        &self.author
    }

    /// Checks this one change: its author is one of `authorised` and the signature verifies
    /// for `doc`. Returns the author.
    pub fn verify(
        &self,
        doc: &DocId,
        authorised: &[IdentityKey],
    ) -> Result<IdentityKey, ChangeError> {
        let author = self.authorised_author(authorised)?;
        author
            .verifying_key()
            .ok()
            .filter(|k| {
                k.verify_strict(&signing_message(doc, &self.hash()), &self.signature)
                    .is_ok()
            })
            .ok_or_else(|| ChangeError::BadSignature(self.hash().to_string()))?;
        Ok(author)
    }

    fn authorised_author(&self, authorised: &[IdentityKey]) -> Result<IdentityKey, ChangeError> {
        authorised
            .iter()
            .find(|k| k.as_bytes() == &self.author)
            .copied()
            .ok_or_else(|| ChangeError::Unauthorised {
                hash: self.hash().to_string(),
                author: IdentityKey::from_bytes(&self.author)
                    .map(|k| k.to_string())
                    .unwrap_or_else(|_| hex::encode(self.author)),
            })
    }
}

impl fmt::Debug for SignedChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignedChange")
            .field("hash", &self.hash())
            .field("author", &hex::encode(self.author))
            .finish()
    }
}

impl PartialEq for SignedChange {
    fn eq(&self, other: &Self) -> bool {
        self.hash() == other.hash() && self.signature == other.signature
    }
}

/// The actor id an author uses for one writer session.
pub fn actor_for(author: &IdentityKey, nonce: [u8; 16]) -> ActorId {
    let mut bytes = [0u8; ACTOR_ID_LEN];
    bytes[..32].copy_from_slice(author.as_bytes());
    bytes[32..].copy_from_slice(&nonce);
    ActorId::from(&bytes[..])
}

fn author_bytes(change: &Change) -> Result<[u8; 32], ChangeError> {
    let actor = change.actor_id().to_bytes();
    if actor.len() != ACTOR_ID_LEN {
        return Err(ChangeError::NoAuthor(change.hash().to_string()));
    }
    Ok(actor[..32].try_into().expect("32 bytes"))
}

/// The exact bytes an author signs for a change of a document.
pub fn signing_message(doc: &DocId, hash: &ChangeHash) -> [u8; 82] {
    let mut m = [0u8; 82];
    m[..18].copy_from_slice(CHANGE_DOMAIN);
    m[18..50].copy_from_slice(&doc.0);
    m[50..].copy_from_slice(&hash.0);
    m
}

/// Whether a batch of changes has its signatures checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signatures<'a> {
    /// Check every signature: changes from a peer, a file, anything from outside.
    Verify,
    /// The changes come from this node's own store, which only ever holds changes verified
    /// when they arrived: do not check their signatures again (each change is still checked
    /// against every other rule). `rapport store verify` re-checks the store on demand.
    Trusted,
    /// Signatures this node checked ahead ([`verify_named`], off the thread that applies
    /// them): a change whose exact copy (hash and signature) it vouches for, for this very
    /// document, is not checked again; every other change is.
    Checked(&'a Verified),
}

/// [`verify_all`] when `sigs` says so; for [`Signatures::Trusted`] only whether each
/// change names an authorised author; for [`Signatures::Checked`] [`verify_all`] of the
/// changes it does not vouch for.
pub fn check_all(
    doc: &DocId,
    changes: &[SignedChange],
    authorised: &[IdentityKey],
    sigs: Signatures<'_>,
) -> Vec<Result<IdentityKey, ChangeError>> {
    match sigs {
        Signatures::Verify => verify_all(doc, changes, authorised),
        Signatures::Trusted => changes
            .iter()
            .map(|c| c.authorised_author(authorised))
            .collect(),
        Signatures::Checked(v) => {
            let (vouched, rest): (Vec<usize>, Vec<usize>) =
                (0..changes.len()).partition(|&i| v.vouches_for(doc, &changes[i]));
            if rest.is_empty() {
                return changes
                    .iter()
                    .map(|c| c.authorised_author(authorised))
                    .collect();
            }
            let others: Vec<SignedChange> = rest.iter().map(|&i| changes[i].clone()).collect();
            let mut results: Vec<Option<Result<IdentityKey, ChangeError>>> =
                vec![None; changes.len()];
            for i in vouched {
                results[i] = Some(changes[i].authorised_author(authorised));
            }
            for (i, r) in rest.into_iter().zip(verify_all(doc, &others, authorised)) {
                results[i] = Some(r);
            }
            results
                .into_iter()
                .map(|r| r.expect("every change is vouched for or verified"))
                .collect()
        }
    }
}

/// The changes of one document whose signatures [`verify_named`] found good, each by the
/// author its actor id names. Says nothing of whether that author may write to the
/// document: that is the document's rules, checked when the changes are applied. Only
/// [`verify_named`] makes one, so holding one is proof the checks ran here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    doc: DocId,
    good: HashSet<(ChangeHash, [u8; 64])>,
}

impl Verified {
    /// The document the signatures were checked for.
    pub fn doc(&self) -> &DocId {
        &self.doc
    }

    /// How many changes it vouches for.
    pub fn len(&self) -> usize {
        self.good.len()
    }

    /// Whether it vouches for no change.
    pub fn is_empty(&self) -> bool {
        self.good.is_empty()
    }

    /// Whether this exact copy of `change` (its hash and its signature) was found signed
    /// by its author for `doc`.
    pub fn vouches_for(&self, doc: &DocId, change: &SignedChange) -> bool {
        self.doc == *doc
            && self
                .good
                .contains(&(change.hash(), change.signature_bytes()))
    }
}

/// Checks the signatures of the changes of several documents at once, each against the
/// author its change names, in batches that cross documents (a batch's cost per signature
/// falls as it grows, and a node that takes many small requests would otherwise verify
/// each on its own). One [`Verified`] per part, in order. A change whose signature fails,
/// or that names no valid key, is simply not vouched for: applying it verifies it again
/// and refuses it with the reason.
pub fn verify_named(parts: &[(DocId, Vec<&SignedChange>)]) -> Vec<Verified> {
    let mut items: Vec<(usize, usize)> = Vec::new();
    let mut keys: Vec<VerifyingKey> = Vec::new();
    for (p, (_, changes)) in parts.iter().enumerate() {
        for (i, c) in changes.iter().enumerate() {
            // Through the identity, as every other check: weak keys are refused, and the
            // curve point of a key seen lately is not computed again (per change, that
            // would cost more than the batch verification itself).
            if let Ok(k) = IdentityKey::from_bytes(c.author_bytes()).and_then(|k| k.verifying_key())
            {
                items.push((p, i));
                keys.push(k);
            }
        }
    }
    let good = good_signatures(items.len(), |n| {
        let (p, i) = items[n];
        let (doc, changes) = &parts[p];
        (
            signing_message(doc, &changes[i].hash()),
            changes[i].signature,
            keys[n],
        )
    });
    let mut out: Vec<Verified> = parts
        .iter()
        .map(|(doc, _)| Verified {
            doc: *doc,
            good: HashSet::new(),
        })
        .collect();
    for ((p, i), ok) in items.into_iter().zip(good) {
        if ok {
            let c = &parts[p].1[i];
            out[p].good.insert((c.hash(), c.signature_bytes()));
        }
    }
    out
}

/// Which of `n` signatures verify, where `item(k)` gives the k-th message, signature and
/// key: batch-verified in equal batches of at most [`BATCH`], a failed batch re-checked
/// one by one (`verify_strict`), and from [`SPLIT_AT`] on split across the machine's cores
/// (up to four).
fn good_signatures(
    n: usize,
    item: impl Fn(usize) -> ([u8; 82], Signature, VerifyingKey) + Sync,
) -> Vec<bool> {
    let threads = crate::append::check_threads();
    let part = |range: std::ops::Range<usize>| -> Vec<bool> {
        let mut out = Vec::with_capacity(range.len());
        let indices: Vec<usize> = range.collect();
        // Equal batches of at most BATCH: 600 signatures go as two of 300, not 512 and a
        // small, dearer one of 88.
        let size = indices
            .len()
            .div_ceil(indices.len().div_ceil(BATCH).max(1))
            .max(1);
        for chunk in indices.chunks(size) {
            let all: Vec<([u8; 82], Signature, VerifyingKey)> =
                chunk.iter().map(|&k| item(k)).collect();
            if crate::batch::verify_batch(&all) {
                out.extend(std::iter::repeat_n(true, chunk.len()));
                continue;
            }
            out.extend(all.iter().map(|(m, s, k)| k.verify_strict(m, s).is_ok()));
        }
        out
    };
    if threads < 2 || n < SPLIT_AT {
        return part(0..n);
    }
    let per = n.div_ceil(threads);
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..n)
            .step_by(per)
            .map(|start| {
                let part = &part;
                scope.spawn(move || part(start..(start + per).min(n)))
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("verification threads do not panic"))
            .collect()
    })
}

/// Verifies many changes of one document at once, in batches, and reports each one's
/// result in order. A batch that fails is re-checked one change at a time, so one bad
/// signature never hides the good ones around it.
///
/// Single checks use `verify_strict`. The batch equation is cofactorless too, so a batch can
/// differ from strict checking only for a signature carrying a small-order component, which
/// only the holder of the secret key can make.
pub fn verify_all(
    doc: &DocId,
    changes: &[SignedChange],
    authorised: &[IdentityKey],
) -> Vec<Result<IdentityKey, ChangeError>> {
    let mut results: Vec<Result<IdentityKey, ChangeError>> = changes
        .iter()
        .map(|c| c.authorised_author(authorised))
        .collect();
    let keys: Vec<Option<VerifyingKey>> = results
        .iter()
        .map(|r| r.as_ref().ok().and_then(|k| k.verifying_key().ok()))
        .collect();
    // An author whose bytes are no valid key verifies nothing.
    for (i, k) in keys.iter().enumerate() {
        if k.is_none() && results[i].is_ok() {
            results[i] = Err(ChangeError::BadSignature(changes[i].hash().to_string()));
        }
    }
    let candidates: Vec<usize> = (0..changes.len()).filter(|&i| results[i].is_ok()).collect();
    let good = good_signatures(candidates.len(), |n| {
        let i = candidates[n];
        (
            signing_message(doc, &changes[i].hash()),
            changes[i].signature,
            keys[i].expect("candidates are authorised"),
        )
    });
    for (i, ok) in candidates.into_iter().zip(good) {
        if !ok {
            results[i] = Err(ChangeError::BadSignature(changes[i].hash().to_string()));
        }
    }
    results
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::{
        Automerge, ROOT,
        transaction::{CommitOptions, Transactable},
    };
    use proptest::prelude::*;

    fn doc_id(n: u8) -> DocId {
        DocId([n; 32])
    }

    fn make_change(key: &SecretKey, text: &str) -> Change {
        let mut doc = Automerge::new().with_actor(actor_for(&key.identity(), [9; 16]));
        let mut tx = doc.transaction();
        tx.put(ROOT, "k", text).unwrap();
        tx.commit_with(CommitOptions::default().with_time(1));
        doc.get_last_local_change().unwrap()
    }

    #[test]
    fn sign_encode_decode_verify() {
        let key = SecretKey::from_seed([1; 32]);
        let sc = SignedChange::sign(&doc_id(1), make_change(&key, "hello"), &key).unwrap();
        let back = SignedChange::decode(&sc.encode()).unwrap();
        assert_eq!(back, sc);
        assert_eq!(
            back.verify(&doc_id(1), &[key.identity()]).unwrap(),
            key.identity()
        );
    }

    #[test]
    fn replay_into_another_document_is_refused() {
        let key = SecretKey::from_seed([1; 32]);
        let sc = SignedChange::sign(&doc_id(1), make_change(&key, "hello"), &key).unwrap();
        assert!(matches!(
            sc.verify(&doc_id(2), &[key.identity()]),
            Err(ChangeError::BadSignature(_))
        ));
    }

    #[test]
    fn a_change_claiming_another_author_cannot_be_signed_or_verified() {
        let alice = SecretKey::from_seed([1; 32]);
        let mallory = SecretKey::from_seed([2; 32]);
        // Mallory makes a change whose actor names Alice, and signs it with her own key.
        let change = make_change(&alice, "I never said this");
        assert!(SignedChange::sign(&doc_id(1), change.clone(), &mallory).is_err());
        let forged = SignedChange {
            signature: mallory.sign_raw(&signing_message(&doc_id(1), &change.hash())),
            author: *alice.identity().as_bytes(),
            change: Box::new(change),
        };
        assert!(matches!(
            forged.verify(&doc_id(1), &[alice.identity(), mallory.identity()]),
            Err(ChangeError::BadSignature(_))
        ));
        // And a change by someone not authorised is refused before any signature work.
        let sc = SignedChange::sign(&doc_id(1), make_change(&mallory, "x"), &mallory).unwrap();
        assert!(matches!(
            sc.verify(&doc_id(1), &[alice.identity()]),
            Err(ChangeError::Unauthorised { .. })
        ));
    }

    #[test]
    fn oversized_and_truncated_input_is_refused() {
        assert_eq!(
            SignedChange::decode(&vec![1u8; MAX_SIGNED_CHANGE_BYTES + 1]).unwrap_err(),
            ChangeError::TooLarge(MAX_SIGNED_CHANGE_BYTES + 1)
        );
        assert_eq!(
            SignedChange::decode(&[1u8; 10]).unwrap_err(),
            ChangeError::BadFormat
        );
        assert_eq!(
            SignedChange::decode(&[]).unwrap_err(),
            ChangeError::BadFormat
        );
    }

    #[test]
    fn batch_finds_the_one_bad_signature() {
        let key = SecretKey::from_seed([1; 32]);
        let good: Vec<SignedChange> = (0..1100)
            .map(|i| {
                SignedChange::sign(&doc_id(1), make_change(&key, &i.to_string()), &key).unwrap()
            })
            .collect();
        // One thread in one batch, uneven batches (600 = two of 300), split across
        // threads when the machine has cores (from SPLIT_AT on), and split into several
        // batches per thread; bad signatures first, last and where batches meet.
        for (n, bad) in [
            (300, vec![0, 150, 299]),
            (600, vec![0, 299, 300, 599]),
            (SPLIT_AT, vec![0, SPLIT_AT / 2, SPLIT_AT - 1]),
            (1100, vec![270, 1050]),
        ] {
            let mut changes = good[..n].to_vec();
            for &b in &bad {
                let mut sig = changes[b].signature.to_bytes();
                sig[5] ^= 1;
                changes[b].signature = Signature::from_bytes(&sig);
            }
            let results = verify_all(&doc_id(1), &changes, &[key.identity()]);
            assert_eq!(results.len(), n);
            for (i, r) in results.iter().enumerate() {
                assert_eq!(r.is_ok(), !bad.contains(&i), "change {i} of {n}");
            }
        }
    }

    /// An author named by a small-order ("weak") key admits signatures made without any
    /// secret: with the identity point as key, `R = s·B` satisfies the cofactorless
    /// equation for every message, which a batch does not catch on its own. Checking
    /// ahead must not vouch for such a change, as strict checking refuses it.
    #[test]
    fn checked_ahead_does_not_vouch_for_a_weak_key() {
        use curve25519_dalek::constants::ED25519_BASEPOINT_POINT;
        let mut weak = [0u8; 32];
        weak[0] = 1; // the identity point, compressed
        let mut actor = weak.to_vec();
        actor.extend_from_slice(&[7; 16]);
        let mut doc = Automerge::new().with_actor(ActorId::from(&actor[..]));
        let mut tx = doc.transaction();
        tx.put(ROOT, "k", "no secret needed").unwrap();
        tx.commit_with(CommitOptions::default().with_time(1));
        let change = doc.get_last_local_change().unwrap();
        let mut sig = [0u8; 64];
        sig[..32].copy_from_slice(ED25519_BASEPOINT_POINT.compress().as_bytes());
        sig[32] = 1; // s = 1, so s·B = R
        let mut bytes = vec![SIGNED_CHANGE_VERSION];
        bytes.extend_from_slice(&sig);
        bytes.extend_from_slice(change.raw_bytes());
        let forged = SignedChange::decode(&bytes).unwrap();
        let a = doc_id(1);
        let message = signing_message(&a, &forged.hash());
        let key = VerifyingKey::from_bytes(&weak).unwrap();
        assert!(
            crate::batch::verify_batch(&[(message, forged.signature, key)]),
            "the forgery passes a batch on its own"
        );
        let v = verify_named(&[(a, vec![&forged])]);
        assert!(!v[0].vouches_for(&a, &forged));
    }

    /// `verify_named` vouches for exactly the copies whose signature holds for their own
    /// document, and a `Verified` vouches for nothing in another document: a change it
    /// vouches for, replayed into a second document, is verified again and refused there.
    #[test]
    fn checked_ahead_vouches_only_for_the_copy_and_the_document_checked() {
        let key = SecretKey::from_seed([3; 32]);
        let (a, b) = (doc_id(1), doc_id(2));
        let good = SignedChange::sign(&a, make_change(&key, "hello"), &key).unwrap();
        let mut bytes = good.encode();
        bytes[10] ^= 1;
        let flipped = SignedChange::decode(&bytes).unwrap();
        let in_b = SignedChange::sign(&b, make_change(&key, "other"), &key).unwrap();
        let v = verify_named(&[(a, vec![&flipped, &good]), (b, vec![&in_b, &good])]);
        assert!(v[0].vouches_for(&a, &good));
        assert!(
            !v[0].vouches_for(&a, &flipped),
            "same hash, other signature"
        );
        assert!(v[1].vouches_for(&b, &in_b));
        assert!(!v[1].vouches_for(&b, &good), "signed for another document");
        assert!(!v[0].vouches_for(&b, &good), "vouched for document a only");
        assert_eq!((v[0].len(), v[1].len()), (1, 1));
        let who = [key.identity()];
        let checked = check_all(
            &b,
            std::slice::from_ref(&good),
            &who,
            Signatures::Checked(&v[0]),
        );
        assert!(
            matches!(checked[0], Err(ChangeError::BadSignature(_))),
            "{checked:?}"
        );
        let checked = check_all(&a, &[flipped, good], &who, Signatures::Checked(&v[0]));
        assert!(matches!(checked[0], Err(ChangeError::BadSignature(_))));
        assert!(checked[1].is_ok());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(12))]

        /// Across documents and within batches, what
        /// `verify_named` vouches for is exactly what `verify` accepts, one by one.
        #[test]
        fn checked_ahead_agrees_with_one_by_one_verification(
            parts in prop::collection::vec(prop::collection::vec((any::<bool>(), 0u8..3), 1..12), 1..5),
        ) {
            let keys = [SecretKey::from_seed([4; 32]), SecretKey::from_seed([5; 32])];
            let mut owned: Vec<(DocId, Vec<SignedChange>)> = Vec::new();
            for (p, spec) in parts.iter().enumerate() {
                let doc = doc_id(p as u8);
                let mut changes = Vec::new();
                for (i, (flip, how)) in spec.iter().enumerate() {
                    let k = &keys[i % 2];
                    // Signed for this document, for the next one, or with a bit flipped.
                    let signed_for = if *how == 1 { doc_id(p as u8 + 1) } else { doc };
                    let c = SignedChange::sign(&signed_for, make_change(k, &format!("{p} {i}")), k).unwrap();
                    let mut bytes = c.encode();
                    if *flip && *how == 2 {
                        bytes[10] ^= 1;
                    }
                    changes.push(SignedChange::decode(&bytes).unwrap());
                }
                owned.push((doc, changes));
            }
            let parts: Vec<(DocId, Vec<&SignedChange>)> =
                owned.iter().map(|(d, cs)| (*d, cs.iter().collect())).collect();
            let verified = verify_named(&parts);
            let who: Vec<IdentityKey> = keys.iter().map(SecretKey::identity).collect();
            for ((doc, changes), v) in owned.iter().zip(&verified) {
                prop_assert_eq!(v.doc(), doc);
                for c in changes {
                    prop_assert_eq!(v.vouches_for(doc, c), c.verify(doc, &who).is_ok());
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn any_tampered_byte_is_detected(text in "[a-z]{0,40}", pos in any::<prop::sample::Index>(), flip in 1u8..=255) {
            let key = SecretKey::from_seed([3; 32]);
            let sc = SignedChange::sign(&doc_id(7), make_change(&key, &text), &key).unwrap();
            let mut bytes = sc.encode();
            let i = pos.index(bytes.len());
            bytes[i] ^= flip;
            match SignedChange::decode(&bytes) {
                Err(_) => {}
                Ok(t) => {
                    prop_assert!(t.verify(&doc_id(7), &[key.identity()]).is_err());
                    let batch = verify_all(&doc_id(7), &[t], &[key.identity()]);
                    prop_assert!(batch[0].is_err());
                }
            }
        }

        #[test]
        fn decode_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
            let _ = SignedChange::decode(&bytes);
            let _ = SignedChange::peek(&bytes);
        }

        /// What `peek` reads of a change's header is what Automerge parses, for changes
        /// with any number of dependencies; and any byte changed in the chunk makes it
        /// read nothing or what the full decode reads of the changed bytes.
        #[test]
        fn peek_reads_what_decode_parses(
            texts in prop::collection::vec("[a-z]{0,300}", 1..6),
            pos in any::<prop::sample::Index>(),
            flip in 1u8..=255,
        ) {
            let key = SecretKey::from_seed([4; 32]);
            let mut doc = Automerge::new();
            let mut encoded = Vec::new();
            for (i, text) in texts.iter().enumerate() {
                // A fork per change after the first, so later ones depend on several.
                let mut branch = doc.fork().with_actor(actor_for(&key.identity(), [i as u8; 16]));
                let mut tx = branch.transaction();
                tx.put(ROOT, format!("k{i}"), text.as_str()).unwrap();
                tx.commit_with(CommitOptions::default().with_time(1));
                let change = branch.get_last_local_change().unwrap();
                doc.apply_changes([change.clone()]).unwrap();
                let sc = SignedChange::sign(&doc_id(7), change, &key).unwrap();
                encoded.push(sc.encode());
            }
            for bytes in &encoded {
                let full = SignedChange::decode(bytes).unwrap();
                prop_assert_eq!(
                    SignedChange::peek(bytes),
                    Some((full.hash(), full.change().deps().to_vec()))
                );
            }
            let mut bytes = encoded.last().unwrap().clone();
            let i = 65 + pos.index(bytes.len() - 65);
            bytes[i] ^= flip;
            if let Some((hash, deps)) = SignedChange::peek(&bytes) {
                let full = SignedChange::decode(&bytes);
                prop_assert!(full.is_ok(), "peek read bytes decode refuses");
                let full = full.unwrap();
                prop_assert_eq!((hash, deps), (full.hash(), full.change().deps().to_vec()));
            }
        }
    }

    /// Found by the `apply` fuzz target: a change chunk whose operation counter does not
    /// fit 32 bits makes `Change::try_from` itself panic inside Automerge 0.12 (types.rs,
    /// `OpId::new`). It arrives before any signature is checked, so any stranger could
    /// send it.
    #[test]
    fn a_chunk_that_panics_automerges_parser_is_refused() {
        use base64::Engine as _;
        let chunk = base64::engine::general_purpose::STANDARD
            .decode(
                "hW9KgxzbtPgBggEAMIE5dw6ofRdfVqNUZsNMf8zLjYqRtO40ol32D1uPybOUAgICAgICAmUCAgIC\
                 AgICAgEBAAAACgEGAgYVCTQBQgRWBlcNcAVxAnMCAgICAgFtAv////9rBH8AAwECAgEBBAABAAEA\
                 AX8BbQIBYX8BawR/AGl0dGVueQB+AQB/AH8C",
            )
            .unwrap();
        let mut bytes = vec![SIGNED_CHANGE_VERSION];
        bytes.extend_from_slice(&[0u8; 64]);
        bytes.extend_from_slice(&chunk);
        assert!(matches!(
            SignedChange::decode(&bytes),
            Err(ChangeError::BadChange(_))
        ));
    }
}
