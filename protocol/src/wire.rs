//! The sync protocol's messages and their binary encoding.
//!
//! One request-response exchange per round: the initiator sends a document's header, its
//! heads, and the signed changes it believes the responder lacks; the responder verifies
//! and stores those, and answers with its own heads and the changes the initiator lacks.
//! Rounds repeat until both hold the same heads.
//!
//! Every message starts with the magic `RPS`, a version byte and a type byte. Integers are
//! big-endian. Decoding checks every length against the limits below before allocating,
//! refuses trailing bytes, and never panics (see the property tests and fuzz target).
//!
//! ```text
//! request   = "RPS" 02 01 docref heads changes
//! response  = "RPS" 02 02 heads changes more:u8 refused
//!           | "RPS" 02 03 code:u8 text
//! docref    = 01 customer:32 grantee:32          (consent document)
//!           | 02 owner:32 nonce:16               (relationship document)
//! heads     = n:u32 (hash:32){n}                 n <= MAX_HEADS
//! changes   = n:u32 (len:u32 bytes){n}           n <= MAX_CHANGES_PER_MESSAGE,
//!                                                len <= MAX_SIGNED_CHANGE_BYTES
//! refused   = n:u32 (hash:32 kind:u8 text){n}    n <= MAX_CHANGES_PER_MESSAGE;
//!                                                kind: see RefusalKind
//! text      = len:u16 utf8                       len <= MAX_REASON_BYTES
//! ```
//!
//! Version 3 (`/rapport/sync/3`) carries the rounds of several documents in one message,
//! in the same order both ways, so a peer with many documents to sync pays for one stream
//! per batch rather than per document:
//!
//! ```text
//! batch     = "RPS" 03 01 n:u16 (docref heads changes){n}    1 <= n <= MAX_BATCH_ROUNDS
//! answers   = "RPS" 03 02 n:u16 answer{n}                    an answer per round, in order
//!           | "RPS" 03 03 code:u8 text                       the batch refused whole
//! answer    = 02 heads changes more:u8 refused | 03 code:u8 text
//! ```
//!
//! A batch's changes, summed over its rounds, are at most `MAX_CHANGES_PER_MESSAGE`.

use automerge::ChangeHash;

use crate::consent::ConsentHeader;
use crate::identity::IdentityKey;
use crate::relationship::RelHeader;
use crate::signed::{DocId, MAX_SIGNED_CHANGE_BYTES};

/// The libp2p protocol id of this version of the sync protocol.
pub const SYNC_PROTOCOL: &str = "/rapport/sync/2";
/// The libp2p protocol id of the batched sync protocol (version 3): the rounds of several
/// documents in one message ([`SyncBatch`], [`SyncBatchResponse`]).
pub const SYNC_BATCH_PROTOCOL: &str = "/rapport/sync/3";
/// The most rounds one batch may carry.
pub const MAX_BATCH_ROUNDS: usize = 16;
/// The largest encoded message (request or response) either side accepts: 32 MiB.
pub const MAX_WIRE_MESSAGE: usize = 32 << 20;
/// The changes a sender puts in one message fit this size, 16 MiB, with their length
/// prefixes (a single larger change goes alone; see [`ChunkBudget`]). The rest follow in
/// later rounds.
pub const CHUNK_BYTES: usize = 16 << 20;
/// The most heads a message may list.
pub const MAX_HEADS: usize = 1024;
/// The most changes one message may carry.
pub const MAX_CHANGES_PER_MESSAGE: usize = 100_000;
/// The longest reason text.
pub const MAX_REASON_BYTES: usize = 1024;

const MAGIC: &[u8; 3] = b"RPS";
/// The version byte of the mailbox messages (see [`crate::mail`]).
const VERSION: u8 = 1;
/// The version byte of sync messages: 2 since refusals carry a [`RefusalKind`].
const SYNC_VERSION: u8 = 2;
/// The version byte of batched sync messages.
const SYNC_BATCH_VERSION: u8 = 3;

/// Which document a sync exchange is about. The header travels so the receiver can derive
/// and check the document id itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DocRef {
    /// A consent document.
    Consent(ConsentHeader),
    /// A relationship document.
    Relationship(RelHeader),
}

impl DocRef {
    /// The document id.
    pub fn doc_id(&self) -> DocId {
        match self {
            DocRef::Consent(h) => h.doc_id(),
            DocRef::Relationship(h) => h.doc_id(),
        }
    }
}

/// One round, from the initiator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncRequest {
    /// The document.
    pub doc: DocRef,
    /// The initiator's heads.
    pub heads: Vec<ChangeHash>,
    /// Encoded signed changes the initiator believes the responder lacks, each after its
    /// dependencies.
    pub changes: Vec<Vec<u8>>,
}

/// Why a responder refuses a whole request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum RefusalCode {
    /// The requester may not sync this document (no grant, revoked, not a party).
    Forbidden = 1,
    /// The request is malformed or its document is unknown and cannot be created.
    BadRequest = 2,
    /// The requester sent too much or too often.
    RateLimited = 3,
    /// The responder failed (its store); try again later.
    Unavailable = 4,
}

impl RefusalCode {
    fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            1 => Self::Forbidden,
            2 => Self::BadRequest,
            3 => Self::RateLimited,
            4 => Self::Unavailable,
            _ => return None,
        })
    }
}

/// Why one change was refused, as a code: what the sender may do about it is decided by
/// this code, never by the reason's text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum RefusalKind {
    /// Its dependencies are not held here yet. The change itself may be fine: send what it
    /// depends on and then the change again. Never a reason to change anything held.
    MissingDependencies = 1,
    /// It does not verify or is malformed (signature, encoding, author, shape).
    Invalid = 2,
    /// Its author may not write it here now (membership, role, consent).
    Forbidden = 3,
}

impl RefusalKind {
    /// The code's byte, as on the wire.
    pub fn to_u8(self) -> u8 {
        self as u8
    }

    /// The code of a byte, if known.
    pub fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            1 => Self::MissingDependencies,
            2 => Self::Invalid,
            3 => Self::Forbidden,
            _ => return None,
        })
    }

    /// Whether the same change may be accepted later (once its dependencies arrive).
    pub fn is_transient(self) -> bool {
        self == Self::MissingDependencies
    }

    /// Whether it counts against the sender's good conduct: everything but a change that
    /// waits for its dependencies, which an honest peer sends in a later round.
    pub fn is_strike(self) -> bool {
        !self.is_transient()
    }
}

impl std::fmt::Display for RefusalKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::MissingDependencies => "missing dependencies",
            Self::Invalid => "invalid",
            Self::Forbidden => "forbidden",
        })
    }
}

/// The responder's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncResponse {
    /// The round went through.
    Sync {
        /// The responder's heads after applying the request's changes.
        heads: Vec<ChangeHash>,
        /// Encoded signed changes the initiator lacks, each after its dependencies.
        changes: Vec<Vec<u8>>,
        /// More changes follow in the next round (this message was cut at
        /// [`CHUNK_BYTES`]).
        more: bool,
        /// The request's changes the responder refused, with the kind and the reason.
        refused: Vec<(ChangeHash, RefusalKind, String)>,
    },
    /// The whole request was refused.
    Refused {
        /// Why, as a code.
        code: RefusalCode,
        /// Why, for a person.
        detail: String,
    },
}

/// The rounds of several documents, from the initiator, each as in a [`SyncRequest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncBatch {
    /// The rounds, at least one and at most [`MAX_BATCH_ROUNDS`].
    pub rounds: Vec<SyncRequest>,
}

/// The responder's answer to a [`SyncBatch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncBatchResponse {
    /// An answer per round, in the order of the batch's rounds.
    Rounds(Vec<SyncResponse>),
    /// The whole batch was refused (it could not be decoded, the responder is overloaded).
    Refused {
        /// Why, as a code.
        code: RefusalCode,
        /// Why, for a person.
        detail: String,
    },
}

/// Why bytes are not a sync message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// Longer than [`MAX_WIRE_MESSAGE`].
    #[error("sync message is {0} bytes, more than the limit of {MAX_WIRE_MESSAGE}")]
    TooLarge(usize),
    /// Not a message of this protocol version.
    #[error("not a Rapport sync message of version 1")]
    BadMagic,
    /// Ends early, has bytes left over, or a field is out of range.
    #[error("malformed sync message: {0}")]
    Malformed(&'static str),
    /// A count or length over its limit.
    #[error("sync message field over its limit: {0}")]
    OverLimit(&'static str),
    /// An identity in the header is not a valid key.
    #[error("sync message names an invalid identity")]
    BadIdentity,
}

pub(crate) struct Writer(pub(crate) Vec<u8>);

impl Writer {
    pub(crate) fn new(kind: u8) -> Self {
        Self::versioned(VERSION, kind)
    }

    fn versioned(version: u8, kind: u8) -> Self {
        let mut v = Vec::with_capacity(64);
        v.extend_from_slice(MAGIC);
        v.push(version);
        v.push(kind);
        Self(v)
    }

    pub(crate) fn u32(&mut self, n: usize) {
        self.0
            .extend_from_slice(&u32::try_from(n).expect("bounded by limits").to_be_bytes());
    }

    fn u16(&mut self, n: usize) {
        self.0
            .extend_from_slice(&u16::try_from(n).expect("bounded by limits").to_be_bytes());
    }

    /// A request's body: document, heads, changes.
    fn request(&mut self, req: &SyncRequest) {
        self.doc(&req.doc);
        self.heads(&req.heads);
        self.changes(&req.changes);
    }

    /// A response's body, after its type byte.
    fn response_body(&mut self, resp: &SyncResponse) {
        match resp {
            SyncResponse::Sync {
                heads,
                changes,
                more,
                refused,
            } => {
                self.heads(heads);
                self.changes(changes);
                self.0.push(u8::from(*more));
                self.u32(refused.len());
                for (h, kind, why) in refused {
                    self.0.extend_from_slice(&h.0);
                    self.0.push(kind.to_u8());
                    self.text(why);
                }
            }
            SyncResponse::Refused { code, detail } => {
                self.0.push(*code as u8);
                self.text(detail);
            }
        }
    }

    fn heads(&mut self, heads: &[ChangeHash]) {
        self.u32(heads.len());
        for h in heads {
            self.0.extend_from_slice(&h.0);
        }
    }

    pub(crate) fn changes(&mut self, changes: &[Vec<u8>]) {
        // One allocation for the lot: a chunk runs to megabytes.
        self.0
            .reserve(4 + changes.iter().map(|c| 4 + c.len()).sum::<usize>());
        self.u32(changes.len());
        for c in changes {
            self.u32(c.len());
            self.0.extend_from_slice(c);
        }
    }

    pub(crate) fn doc(&mut self, doc: &DocRef) {
        match doc {
            DocRef::Consent(h) => {
                self.0.push(1);
                self.0.extend_from_slice(h.customer.as_bytes());
                self.0.extend_from_slice(h.grantee.as_bytes());
            }
            DocRef::Relationship(h) => {
                self.0.push(2);
                self.0.extend_from_slice(h.owner.as_bytes());
                self.0.extend_from_slice(&h.nonce);
            }
        }
    }

    /// A length-prefixed byte string.
    pub(crate) fn bytes(&mut self, b: &[u8]) {
        self.u32(b.len());
        self.0.extend_from_slice(b);
    }

    pub(crate) fn text(&mut self, s: &str) {
        let s = truncate(s, MAX_REASON_BYTES);
        self.0.extend_from_slice(&(s.len() as u16).to_be_bytes());
        self.0.extend_from_slice(s.as_bytes());
    }
}

/// Cuts `s` to at most `max` bytes on a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

pub(crate) struct Reader<'a>(pub(crate) &'a [u8]);

impl<'a> Reader<'a> {
    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.0.len() < n {
            return Err(WireError::Malformed("message ends early"));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }

    pub(crate) fn u32(&mut self) -> Result<usize, WireError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes(b.try_into().expect("4 bytes")) as usize)
    }

    pub(crate) fn arr<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        Ok(self.take(N)?.try_into().expect("N bytes"))
    }

    pub(crate) fn identity(&mut self) -> Result<IdentityKey, WireError> {
        IdentityKey::from_bytes(&self.arr::<32>()?).map_err(|_| WireError::BadIdentity)
    }

    fn heads(&mut self) -> Result<Vec<ChangeHash>, WireError> {
        let n = self.u32()?;
        if n > MAX_HEADS {
            return Err(WireError::OverLimit("heads"));
        }
        if self.0.len() < n * 32 {
            return Err(WireError::Malformed("message ends early"));
        }
        (0..n).map(|_| Ok(ChangeHash(self.arr()?))).collect()
    }

    pub(crate) fn changes(&mut self) -> Result<Vec<Vec<u8>>, WireError> {
        let n = self.u32()?;
        if n > MAX_CHANGES_PER_MESSAGE {
            return Err(WireError::OverLimit("changes"));
        }
        // Each change takes at least its 4-byte length, so a count the rest cannot hold is
        // refused before anything is allocated.
        if self.0.len() < n * 4 {
            return Err(WireError::Malformed("message ends early"));
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let len = self.u32()?;
            if len > MAX_SIGNED_CHANGE_BYTES {
                return Err(WireError::OverLimit("change size"));
            }
            out.push(self.take(len)?.to_vec());
        }
        Ok(out)
    }

    pub(crate) fn doc(&mut self) -> Result<DocRef, WireError> {
        Ok(match self.u8()? {
            1 => {
                let customer = self.identity()?;
                let grantee = self.identity()?;
                if customer == grantee {
                    return Err(WireError::Malformed("a consent document needs two parties"));
                }
                DocRef::Consent(ConsentHeader { customer, grantee })
            }
            2 => DocRef::Relationship(RelHeader {
                owner: self.identity()?,
                nonce: self.arr()?,
            }),
            _ => return Err(WireError::Malformed("unknown document kind")),
        })
    }

    /// A length-prefixed byte string of at most `max` bytes.
    pub(crate) fn bytes(&mut self, max: usize, what: &'static str) -> Result<&'a [u8], WireError> {
        let n = self.u32()?;
        if n > max {
            return Err(WireError::OverLimit(what));
        }
        self.take(n)
    }

    pub(crate) fn text(&mut self) -> Result<String, WireError> {
        let b = self.take(2)?;
        let len = u16::from_be_bytes([b[0], b[1]]) as usize;
        if len > MAX_REASON_BYTES {
            return Err(WireError::OverLimit("reason text"));
        }
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| WireError::Malformed("text is not UTF-8"))
    }

    /// A batch's count of rounds: 1 to [`MAX_BATCH_ROUNDS`].
    fn rounds(&mut self) -> Result<usize, WireError> {
        let b = self.take(2)?;
        let n = u16::from_be_bytes([b[0], b[1]]) as usize;
        if n == 0 {
            return Err(WireError::Malformed("a batch without rounds"));
        }
        if n > MAX_BATCH_ROUNDS {
            return Err(WireError::OverLimit("rounds"));
        }
        Ok(n)
    }

    /// A request's body.
    fn request(&mut self) -> Result<SyncRequest, WireError> {
        let doc = self.doc()?;
        let heads = self.heads()?;
        let changes = self.changes()?;
        Ok(SyncRequest {
            doc,
            heads,
            changes,
        })
    }

    /// A response's body of type `kind` (2 a round, 3 a refusal).
    fn response_body(&mut self, kind: u8) -> Result<SyncResponse, WireError> {
        Ok(if kind == 2 {
            let heads = self.heads()?;
            let changes = self.changes()?;
            let more = match self.u8()? {
                0 => false,
                1 => true,
                _ => return Err(WireError::Malformed("the `more` flag is not 0 or 1")),
            };
            let n = self.u32()?;
            if n > MAX_CHANGES_PER_MESSAGE {
                return Err(WireError::OverLimit("refused"));
            }
            if self.0.len() < n * 35 {
                return Err(WireError::Malformed("message ends early"));
            }
            let mut refused = Vec::with_capacity(n);
            for _ in 0..n {
                let hash = ChangeHash(self.arr()?);
                let kind = RefusalKind::from_u8(self.u8()?)
                    .ok_or(WireError::Malformed("unknown refusal kind"))?;
                refused.push((hash, kind, self.text()?));
            }
            SyncResponse::Sync {
                heads,
                changes,
                more,
                refused,
            }
        } else {
            let code = RefusalCode::from_u8(self.u8()?)
                .ok_or(WireError::Malformed("unknown refusal code"))?;
            SyncResponse::Refused {
                code,
                detail: self.text()?,
            }
        })
    }

    pub(crate) fn end(self) -> Result<(), WireError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(WireError::Malformed("bytes follow the message"))
        }
    }
}

pub(crate) fn open<'a>(bytes: &'a [u8], kinds: &[u8]) -> Result<(u8, Reader<'a>), WireError> {
    open_versioned(bytes, VERSION, kinds)
}

fn open_versioned<'a>(
    bytes: &'a [u8],
    version: u8,
    kinds: &[u8],
) -> Result<(u8, Reader<'a>), WireError> {
    if bytes.len() > MAX_WIRE_MESSAGE {
        return Err(WireError::TooLarge(bytes.len()));
    }
    let mut r = Reader(bytes);
    let head = r.take(5).map_err(|_| WireError::BadMagic)?;
    if &head[..3] != MAGIC || head[3] != version || !kinds.contains(&head[4]) {
        return Err(WireError::BadMagic);
    }
    Ok((head[4], r))
}

impl SyncRequest {
    /// Encodes the request.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::versioned(SYNC_VERSION, 1);
        w.request(self);
        w.0
    }

    /// Decodes a request, checking every bound.
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let (_, mut r) = open_versioned(bytes, SYNC_VERSION, &[1])?;
        let req = r.request()?;
        r.end()?;
        Ok(req)
    }
}

impl SyncResponse {
    /// Encodes the response.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::versioned(SYNC_VERSION, self.kind());
        w.response_body(self);
        w.0
    }

    /// Decodes a response, checking every bound.
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let (kind, mut r) = open_versioned(bytes, SYNC_VERSION, &[2, 3])?;
        let out = r.response_body(kind)?;
        r.end()?;
        Ok(out)
    }

    /// Its type byte: 2 a round, 3 refused whole.
    fn kind(&self) -> u8 {
        match self {
            SyncResponse::Sync { .. } => 2,
            SyncResponse::Refused { .. } => 3,
        }
    }

    /// The changes it carries.
    fn change_count(&self) -> usize {
        match self {
            SyncResponse::Sync { changes, .. } => changes.len(),
            SyncResponse::Refused { .. } => 0,
        }
    }
}

impl SyncBatch {
    /// Encodes the batch.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::versioned(SYNC_BATCH_VERSION, 1);
        w.u16(self.rounds.len());
        for req in &self.rounds {
            w.request(req);
        }
        w.0
    }

    /// Decodes a batch, checking every bound: 1 to [`MAX_BATCH_ROUNDS`] rounds, at most
    /// [`MAX_CHANGES_PER_MESSAGE`] changes in all.
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let (_, mut r) = open_versioned(bytes, SYNC_BATCH_VERSION, &[1])?;
        let n = r.rounds()?;
        let mut rounds = Vec::with_capacity(n);
        let mut changes = 0;
        for _ in 0..n {
            let req = r.request()?;
            changes += req.changes.len();
            if changes > MAX_CHANGES_PER_MESSAGE {
                return Err(WireError::OverLimit("changes"));
            }
            rounds.push(req);
        }
        r.end()?;
        Ok(Self { rounds })
    }

    /// The size of its encoding, without encoding it.
    pub fn encoded_len(rounds: &[SyncRequest]) -> usize {
        5 + 2
            + rounds
                .iter()
                .map(SyncRequest::encoded_body_len)
                .sum::<usize>()
    }
}

impl SyncRequest {
    /// The size of the request's body (its encoding less the 5-byte message head).
    pub fn encoded_body_len(&self) -> usize {
        let doc = match self.doc {
            DocRef::Consent(_) => 65,
            DocRef::Relationship(_) => 49,
        };
        doc + 4
            + 32 * self.heads.len()
            + 4
            + self.changes.iter().map(|c| 4 + c.len()).sum::<usize>()
    }
}

impl SyncBatchResponse {
    /// Encodes the answer.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            SyncBatchResponse::Rounds(rounds) => {
                let mut w = Writer::versioned(SYNC_BATCH_VERSION, 2);
                w.u16(rounds.len());
                for resp in rounds {
                    w.0.push(resp.kind());
                    w.response_body(resp);
                }
                w.0
            }
            SyncBatchResponse::Refused { code, detail } => {
                let mut w = Writer::versioned(SYNC_BATCH_VERSION, 3);
                w.0.push(*code as u8);
                w.text(detail);
                w.0
            }
        }
    }

    /// Decodes an answer, checking every bound as [`SyncBatch::decode`] does.
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let (kind, mut r) = open_versioned(bytes, SYNC_BATCH_VERSION, &[2, 3])?;
        let out = if kind == 2 {
            let n = r.rounds()?;
            let mut rounds = Vec::with_capacity(n);
            let mut changes = 0;
            for _ in 0..n {
                let kind = r.u8()?;
                if kind != 2 && kind != 3 {
                    return Err(WireError::Malformed("unknown answer type"));
                }
                let resp = r.response_body(kind)?;
                changes += resp.change_count();
                if changes > MAX_CHANGES_PER_MESSAGE {
                    return Err(WireError::OverLimit("changes"));
                }
                rounds.push(resp);
            }
            SyncBatchResponse::Rounds(rounds)
        } else {
            r.response_body(3).map(|resp| match resp {
                SyncResponse::Refused { code, detail } => {
                    SyncBatchResponse::Refused { code, detail }
                }
                SyncResponse::Sync { .. } => unreachable!("type 3 is a refusal"),
            })?
        };
        r.end()?;
        Ok(out)
    }
}

/// What one message may still carry of encoded changes: at most [`CHUNK_BYTES`] with
/// their length prefixes (but always at least one change) and at most
/// [`MAX_CHANGES_PER_MESSAGE`]. Every sender of changes cuts its messages with one.
#[derive(Debug)]
pub struct ChunkBudget {
    size: usize,
    n: usize,
    limit: usize,
}

impl Default for ChunkBudget {
    fn default() -> Self {
        Self::within(CHUNK_BYTES)
    }
}

impl ChunkBudget {
    /// A budget of `limit` bytes instead of [`CHUNK_BYTES`] (but still at least one change).
    pub fn within(limit: usize) -> Self {
        ChunkBudget {
            size: 0,
            n: 0,
            limit: limit.min(CHUNK_BYTES),
        }
    }

    /// Whether one more change of `len` encoded bytes fits; if so it is counted.
    pub fn take(&mut self, len: usize) -> bool {
        if self.n > 0 && (self.size + len + 4 > self.limit || self.n >= MAX_CHANGES_PER_MESSAGE) {
            return false;
        }
        self.size += len + 4;
        self.n += 1;
        true
    }
}

/// The bytes of changes each answer of a batch of `rounds` rounds may carry: all of
/// [`CHUNK_BYTES`] for a batch of one, else a share small enough that the whole answer,
/// with each round's one change allowed past its share (at most
/// [`MAX_SIGNED_CHANGE_BYTES`]), stays well under [`MAX_WIRE_MESSAGE`].
pub fn batch_answer_bytes(rounds: usize) -> usize {
    if rounds <= 1 {
        CHUNK_BYTES
    } else {
        CHUNK_BYTES / (2 * rounds)
    }
}

/// Picks a prefix of `changes` (already encoded) that fits one message
/// ([`ChunkBudget`]). Returns the prefix and whether anything was left out.
pub fn chunk(changes: Vec<Vec<u8>>) -> (Vec<Vec<u8>>, bool) {
    let mut budget = ChunkBudget::default();
    let n = changes.iter().take_while(|c| budget.take(c.len())).count();
    let more = n < changes.len();
    let mut changes = changes;
    changes.truncate(n);
    (changes, more)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::SecretKey;
    use proptest::prelude::*;

    fn key(n: u8) -> IdentityKey {
        SecretKey::from_seed([n; 32]).identity()
    }

    fn arb_hash() -> impl Strategy<Value = ChangeHash> {
        any::<[u8; 32]>().prop_map(ChangeHash)
    }

    fn arb_doc() -> impl Strategy<Value = DocRef> {
        prop_oneof![
            (1u8..100, 100u8..200).prop_map(|(a, b)| DocRef::Consent(ConsentHeader {
                customer: key(a),
                grantee: key(b)
            })),
            (1u8..100, any::<[u8; 16]>()).prop_map(|(a, nonce)| DocRef::Relationship(RelHeader {
                owner: key(a),
                nonce
            })),
        ]
    }

    fn arb_changes() -> impl Strategy<Value = Vec<Vec<u8>>> {
        prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 0..8)
    }

    proptest! {
        #[test]
        fn requests_round_trip(doc in arb_doc(), heads in prop::collection::vec(arb_hash(), 0..5), changes in arb_changes()) {
            let req = SyncRequest { doc, heads, changes };
            prop_assert_eq!(SyncRequest::decode(&req.encode()).unwrap(), req);
        }

        #[test]
        fn responses_round_trip(heads in prop::collection::vec(arb_hash(), 0..5), changes in arb_changes(), more: bool,
                                refused in prop::collection::vec((arb_hash(), 1u8..=3, "\\PC{0,40}"), 0..4), detail in "\\PC{0,60}", forbidden: bool) {
            let refused = refused.into_iter().map(|(h, k, t)| (h, RefusalKind::from_u8(k).unwrap(), t)).collect();
            let r = SyncResponse::Sync { heads, changes, more, refused };
            prop_assert_eq!(SyncResponse::decode(&r.encode()).unwrap(), r);
            let code = if forbidden { RefusalCode::Forbidden } else { RefusalCode::RateLimited };
            let r = SyncResponse::Refused { code, detail };
            prop_assert_eq!(SyncResponse::decode(&r.encode()).unwrap(), r);
        }

        #[test]
        fn decoders_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
            let _ = SyncRequest::decode(&bytes);
            let _ = SyncResponse::decode(&bytes);
        }

        #[test]
        fn any_truncation_or_extension_is_refused(doc in arb_doc(), changes in arb_changes(), cut in any::<prop::sample::Index>(), extra in 1u8..=255) {
            let bytes = SyncRequest { doc, heads: vec![], changes }.encode();
            let i = cut.index(bytes.len());
            prop_assert!(SyncRequest::decode(&bytes[..i]).is_err());
            let mut longer = bytes.clone();
            longer.push(extra);
            prop_assert!(SyncRequest::decode(&longer).is_err());
        }

        #[test]
        fn batches_round_trip(rounds in prop::collection::vec((arb_doc(), prop::collection::vec(arb_hash(), 0..3), arb_changes()), 1..=MAX_BATCH_ROUNDS)) {
            let batch = SyncBatch { rounds: rounds.into_iter().map(|(doc, heads, changes)| SyncRequest { doc, heads, changes }).collect() };
            let bytes = batch.encode();
            prop_assert_eq!(bytes.len(), SyncBatch::encoded_len(&batch.rounds));
            prop_assert_eq!(SyncBatch::decode(&bytes).unwrap(), batch);
        }

        #[test]
        fn batch_answers_round_trip(answers in prop::collection::vec((arb_changes(), any::<bool>(), prop::collection::vec((arb_hash(), 1u8..=3, "\\PC{0,20}"), 0..3), any::<bool>()), 1..=MAX_BATCH_ROUNDS), detail in "\\PC{0,60}") {
            let rounds = answers.into_iter().map(|(changes, more, refused, whole)| if whole {
                SyncResponse::Refused { code: RefusalCode::Forbidden, detail: detail.clone() }
            } else {
                let refused = refused.into_iter().map(|(h, k, t)| (h, RefusalKind::from_u8(k).unwrap(), t)).collect();
                SyncResponse::Sync { heads: vec![], changes, more, refused }
            }).collect();
            let r = SyncBatchResponse::Rounds(rounds);
            prop_assert_eq!(SyncBatchResponse::decode(&r.encode()).unwrap(), r);
            let r = SyncBatchResponse::Refused { code: RefusalCode::RateLimited, detail };
            prop_assert_eq!(SyncBatchResponse::decode(&r.encode()).unwrap(), r);
        }

        #[test]
        fn batch_decoders_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..600), kind in 1u8..=3) {
            let _ = SyncBatch::decode(&bytes);
            let _ = SyncBatchResponse::decode(&bytes);
            // The same with a valid head, so the bodies are reached.
            let mut framed = b"RPS\x03".to_vec();
            framed.push(kind);
            framed.extend_from_slice(&bytes);
            let _ = SyncBatch::decode(&framed);
            let _ = SyncBatchResponse::decode(&framed);
        }

        #[test]
        fn any_truncation_or_extension_of_a_batch_is_refused(doc in arb_doc(), changes in arb_changes(), n in 1usize..4, cut in any::<prop::sample::Index>(), extra in 1u8..=255) {
            let rounds = vec![SyncRequest { doc, heads: vec![], changes }; n];
            let bytes = SyncBatch { rounds }.encode();
            let i = cut.index(bytes.len());
            prop_assert!(SyncBatch::decode(&bytes[..i]).is_err());
            let mut longer = bytes.clone();
            longer.push(extra);
            prop_assert!(SyncBatch::decode(&longer).is_err());
        }

        #[test]
        fn budgets_hold_their_limit(limit in 0usize..4096, sizes in prop::collection::vec(0usize..1024, 0..40)) {
            let mut budget = ChunkBudget::within(limit);
            let taken: Vec<usize> = sizes.iter().copied().take_while(|&n| budget.take(n)).collect();
            prop_assert!(sizes.is_empty() || !taken.is_empty());
            let size: usize = taken.iter().map(|n| n + 4).sum();
            prop_assert!(taken.len() == 1 || size <= limit);
        }

        #[test]
        fn chunks_are_prefixes_within_bounds(sizes in prop::collection::vec(0usize..(2 << 20), 0..12)) {
            let changes: Vec<Vec<u8>> = sizes.iter().map(|&n| vec![0u8; n]).collect();
            let (part, more) = chunk(changes.clone());
            prop_assert_eq!(more, part.len() < changes.len());
            prop_assert!(changes.is_empty() || !part.is_empty());
            let size: usize = part.iter().map(|c| c.len() + 4).sum();
            prop_assert!(part.len() == 1 || size <= CHUNK_BYTES);
        }
    }

    #[test]
    fn batches_hold_one_to_the_most_rounds_and_a_bounded_number_of_changes() {
        let doc = DocRef::Relationship(RelHeader {
            owner: key(1),
            nonce: [0; 16],
        });
        let round = |changes: usize| SyncRequest {
            doc,
            heads: vec![],
            changes: vec![Vec::new(); changes],
        };
        let empty = SyncBatch { rounds: vec![] }.encode();
        assert_eq!(
            SyncBatch::decode(&empty),
            Err(WireError::Malformed("a batch without rounds"))
        );
        let most = SyncBatch {
            rounds: vec![round(0); MAX_BATCH_ROUNDS],
        };
        assert_eq!(SyncBatch::decode(&most.encode()), Ok(most));
        let over = SyncBatch {
            rounds: vec![round(0); MAX_BATCH_ROUNDS + 1],
        };
        assert_eq!(
            SyncBatch::decode(&over.encode()),
            Err(WireError::OverLimit("rounds"))
        );
        // Each round within the limit, all of them together over it.
        let many = SyncBatch {
            rounds: vec![round(MAX_CHANGES_PER_MESSAGE / 2 + 1); 2],
        };
        assert_eq!(
            SyncBatch::decode(&many.encode()),
            Err(WireError::OverLimit("changes"))
        );
        let answers = SyncBatchResponse::Rounds(vec![
            SyncResponse::Sync {
                heads: vec![],
                changes: vec![Vec::new(); MAX_CHANGES_PER_MESSAGE / 2 + 1],
                more: false,
                refused: vec![],
            };
            2
        ]);
        assert_eq!(
            SyncBatchResponse::decode(&answers.encode()),
            Err(WireError::OverLimit("changes"))
        );
        // `RAPPORT_FUZZ_SEEDS=dir cargo test` writes seeds for the fuzz target.
        if let Some(dir) = std::env::var_os("RAPPORT_FUZZ_SEEDS") {
            let dir = std::path::PathBuf::from(dir).join("sync_batch");
            std::fs::create_dir_all(&dir).unwrap();
            let batch = SyncBatch {
                rounds: vec![round(2), round(0)],
            };
            std::fs::write(dir.join("batch"), batch.encode()).unwrap();
            let answers = SyncBatchResponse::Rounds(vec![
                SyncResponse::Sync {
                    heads: vec![ChangeHash([3; 32])],
                    changes: vec![vec![1, 2, 3]],
                    more: true,
                    refused: vec![(ChangeHash([4; 32]), RefusalKind::Invalid, "bad".into())],
                },
                SyncResponse::Refused {
                    code: RefusalCode::Forbidden,
                    detail: "not a party".into(),
                },
            ]);
            std::fs::write(dir.join("answers"), answers.encode()).unwrap();
        }
        // Version 2 messages are not batches, nor the other way round.
        assert_eq!(
            SyncBatch::decode(&round(1).encode()),
            Err(WireError::BadMagic)
        );
        assert_eq!(
            SyncRequest::decode(
                &SyncBatch {
                    rounds: vec![round(1)]
                }
                .encode()
            ),
            Err(WireError::BadMagic)
        );
    }

    #[test]
    fn a_full_batch_answer_fits_a_message() {
        // Every round's share, plus the one change allowed past it, plus the most heads.
        let per_round = batch_answer_bytes(MAX_BATCH_ROUNDS)
            + MAX_SIGNED_CHANGE_BYTES
            + 4
            + 32 * MAX_HEADS
            + 16;
        assert!(MAX_BATCH_ROUNDS * per_round < MAX_WIRE_MESSAGE);
        assert_eq!(batch_answer_bytes(1), CHUNK_BYTES);
    }

    #[test]
    fn oversized_counts_are_refused_before_allocating() {
        let mut bytes = SyncRequest {
            doc: DocRef::Relationship(RelHeader {
                owner: key(1),
                nonce: [0; 16],
            }),
            heads: vec![],
            changes: vec![],
        }
        .encode();
        // Claim a huge number of changes in a tiny message.
        let n = bytes.len();
        bytes[n - 4..].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(
            SyncRequest::decode(&bytes),
            Err(WireError::OverLimit("changes"))
        );
        bytes[n - 4..].copy_from_slice(&1000u32.to_be_bytes());
        assert_eq!(
            SyncRequest::decode(&bytes),
            Err(WireError::Malformed("message ends early"))
        );
        assert_eq!(
            SyncRequest::decode(&vec![0u8; MAX_WIRE_MESSAGE + 1]),
            Err(WireError::TooLarge(MAX_WIRE_MESSAGE + 1))
        );
    }
}
