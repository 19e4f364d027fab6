//! Schema versions and migrations.
//!
//! | schema | release | what changed |
//! |---|---|---|
//! | 1 | foundation | meta, docs, changes, change index, snapshots |
//! | 2 | network | relationship documents in `docs-1`; new tables `peers-1`, `peer-heads-1`, `refusals-1` |
//! | 3 | relays | new table `epoch-keys-1` (content keys per relationship and epoch) |
//! | 4 | core | new tables `peer-refused-1` (our changes a peer refused for good) and `conduct-1` (strikes and bans) |
//! | 5 | engine | new tables `doc-facts-1`, `rel-summaries-1` and `inbox-1`, built from every document held, so a node starts without loading its documents |
//! | 6 | names | new table `contacts-1` (the user's contacts and their petnames) |
//! | 7 | engine | table `change-index-1` dropped: the engine knows which changes it holds from its documents, and `Store::put_changes` from the changes themselves |

/// The schema this build writes and reads.
pub(crate) const SCHEMA_VERSION: u32 = 7;

/// What to do with a store of schema `found`.
pub(crate) enum Plan {
    /// Nothing: the store is current.
    Current,
    /// Migrate from this older schema, step by step, in one write transaction.
    Migrate(u32),
    /// The store is newer than this build.
    TooNew,
}

/// Plans the migration of a store at schema `found` to [`SCHEMA_VERSION`].
pub(crate) fn plan(found: u32) -> Plan {
    match found {
        f if f > SCHEMA_VERSION => Plan::TooNew,
        f if f == SCHEMA_VERSION => Plan::Current,
        f => Plan::Migrate(f),
    }
}

/// Runs the steps from `from` to [`SCHEMA_VERSION`] inside `tx`.
pub(crate) fn migrate(tx: &redb::WriteTransaction, from: u32) -> Result<(), redb::Error> {
    use super::tables::*;
    if from < 2 {
        // Schema 2 only adds tables; documents of schema 1 are read as they are.
        tx.open_table(PEERS)?;
        tx.open_table(PEER_HEADS)?;
        tx.open_table(REFUSALS)?;
    }
    if from < 3 {
        // Schema 3 adds content keys; relationships opened before it get their first epoch
        // when their owner next writes or syncs with a relay.
        tx.open_table(EPOCH_KEYS)?;
    }
    if from < 4 {
        // Schema 4 adds what a peer refused of ours and each peer's conduct. Stores of
        // earlier schemas start with both empty.
        tx.open_table(PEER_REFUSED)?;
        tx.open_table(CONDUCT)?;
    }
    if from < 5 {
        // Schema 5 indexes every document: what the node must know of each without loading
        // it, relationship summaries and the inbox. A document that does not verify any
        // more stops the migration (and nothing of it is written): it could not be loaded
        // by the schema it came from either.
        tx.open_table(DOC_FACTS)?;
        tx.open_table(REL_SUMMARIES)?;
        tx.open_table(INBOX)?;
        super::index_all(tx)?;
    }
    if from < 6 {
        // Schema 6 adds contacts; a store of an earlier schema has none.
        tx.open_table(CONTACTS)?;
    }
    if from < 7 {
        // Schema 7 drops the change index: a write of a change then costs one row, not
        // two.
        tx.delete_table(CHANGE_INDEX)?;
    }
    tx.open_table(META)?
        .insert(META_SCHEMA, &SCHEMA_VERSION.to_be_bytes()[..])?;
    Ok(())
}
