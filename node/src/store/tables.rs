//! The store's tables. Names carry a version; a layout change gets a new name and a
//! migration in `migrations.rs`.

use redb::TableDefinition;

/// Node metadata. Key: a name from the `META_*` constants. Value: bytes, per key:
/// `schema` = u32 big-endian; `profile` = JSON of [`crate::Profile`]; `secret` = 32-byte
/// Ed25519 seed.
pub(crate) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta-1");
/// Schema version key in [`META`].
pub(crate) const META_SCHEMA: &str = "schema";
/// Profile key in [`META`].
pub(crate) const META_PROFILE: &str = "profile";
/// Secret key seed in [`META`].
pub(crate) const META_SECRET: &str = "secret";

/// Documents held. Key: document id (32 bytes). Value: JSON header
/// `{"kind":"consent","customer":…,"grantee":…}` or
/// `{"kind":"relationship","owner":…,"nonce":"<32 hex>"}`.
pub(crate) const DOCS: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("docs-1");

/// Signed changes. Key: (document id, sequence number in storage order). Value: the encoded
/// signed change (`SignedChange::encode`). A document's changes are stored each after its
/// dependencies, so reading them in key order is a causal order.
pub(crate) const CHANGES: TableDefinition<(&[u8; 32], u64), &[u8]> =
    TableDefinition::new("changes-1");

/// Which changes are held (schemas 1 to 6). Key: (document id, change hash). Value: the
/// sequence number in [`CHANGES`]. Schema 7 drops it; only the migrations read it.
pub(crate) const CHANGE_INDEX: TableDefinition<(&[u8; 32], &[u8; 32]), u64> =
    TableDefinition::new("change-index-1");

/// Automerge snapshots. Key: document id. Value: `Automerge::save()` bytes. A snapshot is an
/// optimisation only: signatures are always checked from [`CHANGES`].
pub(crate) const SNAPSHOTS: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("snapshots-1");

/// Known peers (schema 2). Key: the peer's identity text (`12D3KooW…`). Value: JSON
/// `{"addrs":["/ip4/…"],"last_seen":<unix seconds>}`; a restarted node dials these.
pub(crate) const PEERS: TableDefinition<&str, &[u8]> = TableDefinition::new("peers-1");

/// The heads a peer last reported for a document (schema 2), so a reconnecting sync sends
/// what the peer lacks at once. Key: (document id, peer key bytes). Value: the heads, 32
/// bytes each, concatenated.
pub(crate) const PEER_HEADS: TableDefinition<(&[u8; 32], &[u8; 32]), &[u8]> =
    TableDefinition::new("peer-heads-1");

/// Changes this node refused, kept as evidence (schema 2). Key: sequence number. Value:
/// JSON of [`crate::Refusal`]. The oldest are dropped past [`crate::MAX_REFUSALS`].
pub(crate) const REFUSALS: TableDefinition<u64, &[u8]> = TableDefinition::new("refusals-1");

/// Content keys this node holds (schema 3). Key: (document id, epoch). Value: the 32-byte
/// key. Read only by the engine; deleted with the document.
pub(crate) const EPOCH_KEYS: TableDefinition<(&[u8; 32], u32), &[u8; 32]> =
    TableDefinition::new("epoch-keys-1");

/// Changes of ours a peer refused for good (schema 4), so they are not sent to that peer
/// again; our own history keeps them. Key: (document id, peer key bytes, change hash).
/// Value: the [`rapport_protocol::wire::RefusalKind`] byte the peer gave.
pub(crate) const PEER_REFUSED: TableDefinition<PeerRefusedKey, u8> =
    TableDefinition::new("peer-refused-1");

/// (document id, peer key bytes, change hash).
pub(crate) type PeerRefusedKey<'a> = (&'a [u8; 32], &'a [u8; 32], &'a [u8; 32]);

/// Each peer's conduct (schema 4): strikes for changes this node refused and any ban, so a
/// restart neither forgives a misbehaving peer nor forgets a ban. Key: peer key bytes.
/// Value: JSON of [`crate::store::Conduct`].
pub(crate) const CONDUCT: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("conduct-1");

/// What the node keeps in memory about each document (schema 5), so it starts without
/// loading any. Key: document id. Value: JSON of [`crate::index::Facts`]. Written with the
/// document's changes, in the same transaction.
pub(crate) const DOC_FACTS: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("doc-facts-1");

/// Each relationship as listed (schema 5). Key: document id. Value: JSON of
/// [`crate::RelSummary`]. Written with the relationship's changes.
pub(crate) const REL_SUMMARIES: TableDefinition<&[u8; 32], &[u8]> =
    TableDefinition::new("rel-summaries-1");

/// Messages from others, for the inbox (schema 5). Key: (time, document id, entry id), so
/// the newest come last. Value: the rest of the [`crate::MessageView`], binary (see
/// `inbox.rs`; stores written before it hold JSON of the whole view, still read). Written
/// with the changes that carry them; deleted with the document.
pub(crate) const INBOX: TableDefinition<InboxKey, &[u8]> = TableDefinition::new("inbox-1");

/// (time, document id, entry id).
pub(crate) type InboxKey<'a> = (u64, &'a [u8; 32], &'a [u8; 32]);

/// The user's contacts (schema 6): parties added from an invitation, under a petname the
/// user chose. Key: the contact's key bytes. Value: JSON of [`crate::store::Contact`].
/// Contacts are few (people add them one by one), so a petname is found by a scan.
pub(crate) const CONTACTS: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("contacts-1");
