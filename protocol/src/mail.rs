//! Sealed envelopes and the mailbox protocol (`/rapport/mailbox/1`) spoken with a relay.
//!
//! An [`Envelope`] carries a batch of signed changes of one document from one node to
//! another through something that is not a member (a relay's mailbox). The batch is
//! encrypted with XChaCha20-Poly1305 either under the relationship's epoch key
//! ([`Seal::Epoch`]) or under a key sealed directly to the recipient ([`Seal::Recipient`]):
//! consent documents, and any batch that carries a new epoch (whose key the recipient cannot
//! hold yet), go the direct way. The sender signs the whole envelope, so a relay can check
//! who deposits and cannot re-address or alter what it stores; the associated data binds
//! sender, recipient, document and epoch into the ciphertext.
//!
//! The relay sees who sends to whom, which document id, the epoch number, sizes and times;
//! never the changes. See `docs/security.md`.

use ed25519_dalek::Signature;

use crate::identity::{IdentityKey, SecretKey};
use crate::seal::{ContentKey, NONCE_BYTES, SealError, direct_key, open_direct_key};
use crate::signed::MAX_SIGNED_CHANGE_BYTES;
use crate::wire::{DocRef, MAX_CHANGES_PER_MESSAGE, Reader, WireError, Writer, open};

/// The mailbox protocol's id.
pub const MAILBOX_PROTOCOL: &str = "/rapport/mailbox/1";
/// The largest envelope.
pub const MAX_ENVELOPE_BYTES: usize = 4 * 1024 * 1024;
/// The plaintext one envelope carries at most (its changes, encoded).
pub const MAX_ENVELOPE_PLAINTEXT: usize = MAX_ENVELOPE_BYTES - 1024;
/// The most envelopes one deposit or one fetched batch carries.
pub const MAX_ENVELOPES_PER_MESSAGE: usize = 256;
/// The most bytes of envelopes one fetched batch carries (so a message stays under the
/// wire limit).
pub const MAX_MAIL_BATCH_BYTES: usize = 16 * 1024 * 1024;

const ENVELOPE_DOMAIN: &[u8] = b"rapport/envelope/v1\0";
const KIND_ENVELOPE: u8 = 6;
const KIND_MAIL_REQUEST: u8 = 7;
const KIND_MAIL_RESPONSE: u8 = 8;

/// How an envelope's content key is found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seal {
    /// The relationship's content key of this epoch.
    Epoch {
        /// The epoch.
        epoch: u32,
        /// The nonce.
        nonce: [u8; NONCE_BYTES],
    },
    /// A one-off key sealed to the recipient with this ephemeral X25519 public key.
    Recipient {
        /// The ephemeral public key.
        eph: [u8; 32],
        /// The nonce.
        nonce: [u8; NONCE_BYTES],
    },
}

/// A batch of signed changes of one document, encrypted for one recipient and signed by
/// its sender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// Who sealed and signed it.
    pub from: IdentityKey,
    /// Whom it is for.
    pub to: IdentityKey,
    /// The document its changes belong to.
    pub doc: DocRef,
    /// How its key is found.
    pub seal: Seal,
    /// The encrypted changes.
    pub ciphertext: Vec<u8>,
    signature: [u8; 64],
}

/// Why an envelope was not sealed or not opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EnvelopeError {
    /// Bad bytes.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// Cannot decrypt.
    #[error(transparent)]
    Seal(#[from] SealError),
    /// The sender's signature does not check.
    #[error("the envelope's signature does not check for its sender")]
    Signature,
    /// It is addressed to someone else.
    #[error("the envelope is addressed to {0}, not to this node")]
    NotForMe(String),
    /// Too much to carry in one envelope.
    #[error("{0} bytes of changes is more than one envelope carries ({MAX_ENVELOPE_PLAINTEXT})")]
    TooLarge(usize),
}

fn header_bytes(from: &IdentityKey, to: &IdentityKey, doc: &DocRef, seal: &Seal) -> Vec<u8> {
    let mut w = Writer(Vec::with_capacity(160));
    w.0.extend_from_slice(ENVELOPE_DOMAIN);
    w.0.extend_from_slice(from.as_bytes());
    w.0.extend_from_slice(to.as_bytes());
    w.doc(doc);
    seal_bytes(&mut w, seal);
    w.0
}

fn seal_bytes(w: &mut Writer, seal: &Seal) {
    match seal {
        Seal::Epoch { epoch, nonce } => {
            w.0.push(1);
            w.0.extend_from_slice(&epoch.to_be_bytes());
            w.0.extend_from_slice(nonce);
        }
        Seal::Recipient { eph, nonce } => {
            w.0.push(2);
            w.0.extend_from_slice(eph);
            w.0.extend_from_slice(nonce);
        }
    }
}

fn plaintext(changes: &[Vec<u8>]) -> Result<Vec<u8>, EnvelopeError> {
    let size: usize = changes.iter().map(|c| c.len() + 4).sum::<usize>() + 4;
    if size > MAX_ENVELOPE_PLAINTEXT {
        return Err(EnvelopeError::TooLarge(size));
    }
    let mut w = Writer(Vec::with_capacity(size));
    w.changes(changes);
    Ok(w.0)
}

impl Envelope {
    fn signed(
        key: &SecretKey,
        to: IdentityKey,
        doc: DocRef,
        seal: Seal,
        content: &ContentKey,
        changes: &[Vec<u8>],
    ) -> Result<Self, EnvelopeError> {
        let from = key.identity();
        let header = header_bytes(&from, &to, &doc, &seal);
        let nonce = match seal {
            Seal::Epoch { nonce, .. } | Seal::Recipient { nonce, .. } => nonce,
        };
        let ciphertext = content.encrypt(&nonce, &plaintext(changes)?, &header);
        let mut msg = header;
        msg.extend_from_slice(&ciphertext);
        let signature = key.sign_raw(&msg).to_bytes();
        Ok(Self {
            from,
            to,
            doc,
            seal,
            ciphertext,
            signature,
        })
    }

    /// Seals `changes` (encoded signed changes) under the content key of `epoch`.
    pub fn seal_epoch(
        key: &SecretKey,
        to: IdentityKey,
        doc: DocRef,
        epoch: u32,
        content: &ContentKey,
        nonce: [u8; NONCE_BYTES],
        changes: &[Vec<u8>],
    ) -> Result<Self, EnvelopeError> {
        Self::signed(key, to, doc, Seal::Epoch { epoch, nonce }, content, changes)
    }

    /// Seals `changes` directly to `to`, with an ephemeral secret (32 fresh random bytes).
    pub fn seal_to(
        key: &SecretKey,
        to: IdentityKey,
        doc: DocRef,
        eph_secret: [u8; 32],
        nonce: [u8; NONCE_BYTES],
        changes: &[Vec<u8>],
    ) -> Result<Self, EnvelopeError> {
        let (content, eph) = direct_key(eph_secret, &to, &doc.doc_id().0)?;
        Self::signed(
            key,
            to,
            doc,
            Seal::Recipient { eph, nonce },
            &content,
            changes,
        )
    }

    /// Checks the sender's signature. A relay does this before it stores anything.
    pub fn verify(&self) -> Result<(), EnvelopeError> {
        let mut msg = header_bytes(&self.from, &self.to, &self.doc, &self.seal);
        msg.extend_from_slice(&self.ciphertext);
        self.from
            .verifying_key()
            .map_err(|_| EnvelopeError::Signature)?
            .verify_strict(&msg, &Signature::from_bytes(&self.signature))
            .map_err(|_| EnvelopeError::Signature)
    }

    /// Checks the signature, decrypts with `me`'s key or the epoch key `epoch_key` finds, and
    /// returns the encoded changes (still to be verified one by one by the caller).
    pub fn open(
        &self,
        me: &SecretKey,
        epoch_key: impl FnOnce(u32) -> Option<ContentKey>,
    ) -> Result<Vec<Vec<u8>>, EnvelopeError> {
        if self.to != me.identity() {
            return Err(EnvelopeError::NotForMe(self.to.to_string()));
        }
        self.verify()?;
        let (content, nonce) = match self.seal {
            Seal::Epoch { epoch, nonce } => {
                (epoch_key(epoch).ok_or(SealError::NoKey(epoch))?, nonce)
            }
            Seal::Recipient { eph, nonce } => {
                (open_direct_key(&eph, me, &self.doc.doc_id().0)?, nonce)
            }
        };
        self.open_with(&content, &nonce)
    }

    /// Decrypts with a given key (what an attacker holding old keys would try).
    pub fn open_with(
        &self,
        content: &ContentKey,
        nonce: &[u8; NONCE_BYTES],
    ) -> Result<Vec<Vec<u8>>, EnvelopeError> {
        let header = header_bytes(&self.from, &self.to, &self.doc, &self.seal);
        let plain = content.decrypt(nonce, &self.ciphertext, &header)?;
        let mut r = Reader(&plain);
        let changes = r.changes()?;
        r.end()?;
        Ok(changes)
    }

    /// The epoch this envelope is sealed under, if it is sealed under one.
    pub fn epoch(&self) -> Option<u32> {
        match self.seal {
            Seal::Epoch { epoch, .. } => Some(epoch),
            Seal::Recipient { .. } => None,
        }
    }

    /// Encodes the envelope.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new(KIND_ENVELOPE);
        w.0.extend_from_slice(self.from.as_bytes());
        w.0.extend_from_slice(self.to.as_bytes());
        w.doc(&self.doc);
        seal_bytes(&mut w, &self.seal);
        w.bytes(&self.ciphertext);
        w.0.extend_from_slice(&self.signature);
        w.0
    }

    /// Decodes an envelope, checking every bound (not the signature: see [`Self::verify`]).
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        if bytes.len() > MAX_ENVELOPE_BYTES {
            return Err(WireError::TooLarge(bytes.len()));
        }
        let (_, mut r) = open(bytes, &[KIND_ENVELOPE])?;
        let from = r.identity()?;
        let to = r.identity()?;
        let doc = r.doc()?;
        let seal = match r.u8()? {
            1 => Seal::Epoch {
                epoch: u32::from_be_bytes(r.arr()?),
                nonce: r.arr()?,
            },
            2 => Seal::Recipient {
                eph: r.arr()?,
                nonce: r.arr()?,
            },
            _ => return Err(WireError::Malformed("unknown seal kind")),
        };
        let ciphertext = r.bytes(MAX_ENVELOPE_BYTES, "envelope ciphertext")?.to_vec();
        let signature = r.arr()?;
        r.end()?;
        Ok(Self {
            from,
            to,
            doc,
            seal,
            ciphertext,
            signature,
        })
    }
}

/// A request to a relay's mailbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MailRequest {
    /// Store these envelopes (encoded, each from the requester) for their recipients.
    Deposit(Vec<Vec<u8>>),
    /// Hand over the requester's mail after sequence number `after`, deleting everything up
    /// to and including `after` (the last batch the requester has made durable).
    Fetch {
        /// The last sequence number already taken (0 for none).
        after: u64,
    },
}

/// Why a relay refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum MailRefusal {
    /// The requester is not admitted to this relay.
    NotAdmitted = 1,
    /// The requester's stored bytes would pass its quota.
    QuotaBytes = 2,
    /// The requester deposits too often.
    QuotaRate = 3,
    /// An envelope is malformed, badly signed, or not from the requester.
    BadEnvelope = 4,
    /// The relay could not store it (its disk); try later.
    Unavailable = 5,
}

impl MailRefusal {
    fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            1 => Self::NotAdmitted,
            2 => Self::QuotaBytes,
            3 => Self::QuotaRate,
            4 => Self::BadEnvelope,
            5 => Self::Unavailable,
            _ => return None,
        })
    }
}

/// A relay's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MailResponse {
    /// All envelopes of the deposit are stored durably.
    Stored {
        /// How many.
        count: u32,
    },
    /// Mail for the requester, in order: (sequence number, encoded envelope).
    Mail {
        /// The envelopes.
        items: Vec<(u64, Vec<u8>)>,
        /// More wait after these.
        more: bool,
    },
    /// Refused; nothing was stored.
    Refused {
        /// Why, as a code.
        code: MailRefusal,
        /// Why, in words.
        detail: String,
    },
}

impl MailRequest {
    /// Encodes the request.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new(KIND_MAIL_REQUEST);
        match self {
            MailRequest::Deposit(list) => {
                w.0.push(1);
                w.u32(list.len());
                for e in list {
                    w.bytes(e);
                }
            }
            MailRequest::Fetch { after } => {
                w.0.push(2);
                w.0.extend_from_slice(&after.to_be_bytes());
            }
        }
        w.0
    }

    /// Decodes a request, checking every bound.
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let (_, mut r) = open(bytes, &[KIND_MAIL_REQUEST])?;
        let out = match r.u8()? {
            1 => MailRequest::Deposit(envelope_list(&mut r)?),
            2 => MailRequest::Fetch {
                after: u64::from_be_bytes(r.arr()?),
            },
            _ => return Err(WireError::Malformed("unknown mailbox request")),
        };
        r.end()?;
        Ok(out)
    }
}

fn envelope_list(r: &mut Reader<'_>) -> Result<Vec<Vec<u8>>, WireError> {
    let n = r.u32()?;
    if n > MAX_ENVELOPES_PER_MESSAGE {
        return Err(WireError::OverLimit("envelopes"));
    }
    if r.0.len() < n * 4 {
        return Err(WireError::Malformed("message ends early"));
    }
    (0..n)
        .map(|_| Ok(r.bytes(MAX_ENVELOPE_BYTES, "envelope size")?.to_vec()))
        .collect()
}

impl MailResponse {
    /// Encodes the response.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new(KIND_MAIL_RESPONSE);
        match self {
            MailResponse::Stored { count } => {
                w.0.push(1);
                w.0.extend_from_slice(&count.to_be_bytes());
            }
            MailResponse::Mail { items, more } => {
                w.0.push(2);
                w.u32(items.len());
                for (seq, e) in items {
                    w.0.extend_from_slice(&seq.to_be_bytes());
                    w.bytes(e);
                }
                w.0.push(u8::from(*more));
            }
            MailResponse::Refused { code, detail } => {
                w.0.push(3);
                w.0.push(*code as u8);
                w.text(detail);
            }
        }
        w.0
    }

    /// Decodes a response, checking every bound.
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let (_, mut r) = open(bytes, &[KIND_MAIL_RESPONSE])?;
        let out = match r.u8()? {
            1 => MailResponse::Stored {
                count: u32::from_be_bytes(r.arr()?),
            },
            2 => {
                let n = r.u32()?;
                if n > MAX_ENVELOPES_PER_MESSAGE {
                    return Err(WireError::OverLimit("envelopes"));
                }
                if r.0.len() < n * 12 {
                    return Err(WireError::Malformed("message ends early"));
                }
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    let seq = u64::from_be_bytes(r.arr()?);
                    items.push((seq, r.bytes(MAX_ENVELOPE_BYTES, "envelope size")?.to_vec()));
                }
                let more = match r.u8()? {
                    0 => false,
                    1 => true,
                    _ => return Err(WireError::Malformed("the `more` flag is not 0 or 1")),
                };
                MailResponse::Mail { items, more }
            }
            3 => MailResponse::Refused {
                code: MailRefusal::from_u8(r.u8()?)
                    .ok_or(WireError::Malformed("unknown refusal code"))?,
                detail: r.text()?,
            },
            _ => return Err(WireError::Malformed("unknown mailbox response")),
        };
        r.end()?;
        Ok(out)
    }
}

/// Cuts items (encoded changes, or anything carrying one; `len` gives its encoded size)
/// into batches that each fit one envelope, in order.
pub fn envelope_batches<T>(items: Vec<T>, len: impl Fn(&T) -> usize) -> Vec<Vec<T>> {
    let mut out = Vec::new();
    let mut cur: Vec<T> = Vec::new();
    let mut size = 4;
    for c in items {
        let n = len(&c) + 4;
        if !cur.is_empty()
            && (size + n > MAX_ENVELOPE_PLAINTEXT || cur.len() >= MAX_CHANGES_PER_MESSAGE)
        {
            out.push(std::mem::take(&mut cur));
            size = 4;
        }
        size += n;
        cur.push(c);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

// A change larger than an envelope cannot exist: signed changes are bounded well below it.
const _: () = assert!(MAX_SIGNED_CHANGE_BYTES + 8 < MAX_ENVELOPE_PLAINTEXT);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relationship::RelHeader;
    use proptest::prelude::*;

    fn key(n: u8) -> SecretKey {
        SecretKey::from_seed([n; 32])
    }

    fn doc() -> DocRef {
        DocRef::Relationship(RelHeader {
            owner: key(1).identity(),
            nonce: [3; 16],
        })
    }

    #[test]
    fn epoch_and_direct_envelopes_round_trip() {
        let (a, b) = (key(1), key(2));
        let k = ContentKey::from_bytes([5; 32]);
        let changes = vec![b"one".to_vec(), b"two".to_vec()];
        let e = Envelope::seal_epoch(&a, b.identity(), doc(), 3, &k, [1; 24], &changes).unwrap();
        let back = Envelope::decode(&e.encode()).unwrap();
        assert_eq!(back, e);
        // `RAPPORT_FUZZ_SEEDS=dir cargo test` writes seeds for the fuzz targets.
        if let Some(dir) = std::env::var_os("RAPPORT_FUZZ_SEEDS") {
            let dir = std::path::PathBuf::from(dir);
            std::fs::create_dir_all(dir.join("envelope")).unwrap();
            std::fs::create_dir_all(dir.join("mail_message")).unwrap();
            std::fs::write(dir.join("envelope/epoch"), e.encode()).unwrap();
            let deposit = MailRequest::Deposit(vec![e.encode()]).encode();
            std::fs::write(dir.join("mail_message/deposit"), deposit).unwrap();
            let mail = MailResponse::Mail {
                items: vec![(7, e.encode())],
                more: true,
            };
            std::fs::write(dir.join("mail_message/mail"), mail.encode()).unwrap();
        }
        assert_eq!(
            back.open(&b, |n| (n == 3).then(|| k.clone())).unwrap(),
            changes
        );
        assert_eq!(
            back.open(&b, |_| None).unwrap_err(),
            EnvelopeError::Seal(SealError::NoKey(3))
        );
        // Not for a third party, even with the right epoch key (it is addressed to b).
        assert!(matches!(
            back.open(&key(3), |_| Some(k.clone())),
            Err(EnvelopeError::NotForMe(_))
        ));
        let d = Envelope::seal_to(&a, b.identity(), doc(), [7; 32], [2; 24], &changes).unwrap();
        assert_eq!(d.open(&b, |_| None).unwrap(), changes);
        // Another node cannot open it even if it rewrites the address: the signature breaks.
        let mut stolen = d.clone();
        stolen.to = key(3).identity();
        assert_eq!(
            stolen.open(&key(3), |_| None).unwrap_err(),
            EnvelopeError::Signature
        );
    }

    #[test]
    fn plaintext_never_shows_in_the_bytes() {
        let e = Envelope::seal_epoch(
            &key(1),
            key(2).identity(),
            doc(),
            0,
            &ContentKey::from_bytes([5; 32]),
            [1; 24],
            &[b"the secret message text".to_vec()],
        )
        .unwrap();
        let bytes = e.encode();
        assert!(!bytes.windows(6).any(|w| w == b"secret"));
    }

    #[test]
    fn batches_fit_envelopes() {
        let big = vec![vec![0u8; 1024 * 1024]; 9];
        let batches = envelope_batches(big, Vec::len);
        assert!(batches.len() >= 3);
        for b in &batches {
            assert!(b.iter().map(|c| c.len() + 4).sum::<usize>() + 4 <= MAX_ENVELOPE_PLAINTEXT);
        }
        assert_eq!(batches.iter().map(Vec::len).sum::<usize>(), 9);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Envelope::decode(&bytes);
            let _ = MailRequest::decode(&bytes);
            let _ = MailResponse::decode(&bytes);
        }

        #[test]
        fn altered_envelopes_are_refused(pos in any::<prop::sample::Index>(), bit in 0u8..8) {
            let (a, b) = (key(1), key(2));
            let e = Envelope::seal_to(&a, b.identity(), doc(), [7; 32], [2; 24], &[b"hello".to_vec()]).unwrap();
            let mut bytes = e.encode();
            let i = pos.index(bytes.len());
            bytes[i] ^= 1 << bit;
            if let Ok(e2) = Envelope::decode(&bytes) {
                prop_assert!(e2.open(&b, |_| None).is_err());
            }
        }

        #[test]
        fn mail_messages_round_trip(after in any::<u64>(), items in proptest::collection::vec((any::<u64>(), proptest::collection::vec(any::<u8>(), 0..64)), 0..8), more in any::<bool>(), detail in ".{0,40}") {
            let envs: Vec<Vec<u8>> = items.iter().map(|(_, e)| e.clone()).collect();
            for req in [MailRequest::Deposit(envs), MailRequest::Fetch { after }] {
                prop_assert_eq!(MailRequest::decode(&req.encode()).unwrap(), req);
            }
            for resp in [
                MailResponse::Stored { count: items.len() as u32 },
                MailResponse::Mail { items: items.clone(), more },
                MailResponse::Refused { code: MailRefusal::QuotaBytes, detail: detail.clone() },
            ] {
                prop_assert_eq!(MailResponse::decode(&resp.encode()).unwrap(), resp);
            }
        }
    }
}
