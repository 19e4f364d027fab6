//! A read of the store that sees the writes of the group under way (see
//! [`super::Store::begin_group`]): through the group's write transaction once the group has
//! written, else through a read transaction of its own.

use std::borrow::Borrow;
use std::ops::RangeBounds;

use redb::{
    AccessGuard, Key, Range, ReadOnlyTable, ReadableTable, ReadableTableMetadata, Table,
    TableDefinition, TableError, TableStats, Value,
};

/// What a read of the store runs in.
pub(crate) enum Reader<'t> {
    /// A read transaction: the store as last committed.
    Snapshot(&'t redb::ReadTransaction),
    /// The group's write transaction: the store with the group's writes so far.
    Group(&'t redb::WriteTransaction),
}

impl Reader<'_> {
    /// Opens a table for reading. (A write transaction would create a missing table; every
    /// table exists from the store's creation or its migration on, and a group only runs
    /// on an opened store.)
    pub(crate) fn open_table<K: Key + 'static, V: Value + 'static>(
        &self,
        def: TableDefinition<K, V>,
    ) -> Result<AnyTable<'_, K, V>, TableError> {
        match self {
            Reader::Snapshot(tx) => tx.open_table(def).map(AnyTable::Snapshot),
            Reader::Group(tx) => tx.open_table(def).map(AnyTable::Group),
        }
    }
}

/// A table opened by a [`Reader`]: read-only, whichever transaction it came from.
pub(crate) enum AnyTable<'t, K: Key + 'static, V: Value + 'static> {
    Snapshot(ReadOnlyTable<K, V>),
    Group(Table<'t, K, V>),
}

impl<K: Key + 'static, V: Value + 'static> ReadableTableMetadata for AnyTable<'_, K, V> {
    fn stats(&self) -> Result<TableStats, redb::StorageError> {
        match self {
            AnyTable::Snapshot(t) => t.stats(),
            AnyTable::Group(t) => t.stats(),
        }
    }

    fn len(&self) -> Result<u64, redb::StorageError> {
        match self {
            AnyTable::Snapshot(t) => t.len(),
            AnyTable::Group(t) => t.len(),
        }
    }
}

impl<K: Key + 'static, V: Value + 'static> ReadableTable<K, V> for AnyTable<'_, K, V> {
    fn get<'a>(
        &self,
        key: impl Borrow<K::SelfType<'a>>,
    ) -> Result<Option<AccessGuard<'_, V>>, redb::StorageError> {
        match self {
            AnyTable::Snapshot(t) => t.get(key),
            AnyTable::Group(t) => t.get(key),
        }
    }

    fn range<'a, KR>(
        &self,
        range: impl RangeBounds<KR> + 'a,
    ) -> Result<Range<'_, K, V>, redb::StorageError>
    where
        KR: Borrow<K::SelfType<'a>> + 'a,
    {
        match self {
            AnyTable::Snapshot(t) => t.range(range),
            AnyTable::Group(t) => t.range(range),
        }
    }

    fn first(
        &self,
    ) -> Result<Option<(AccessGuard<'_, K>, AccessGuard<'_, V>)>, redb::StorageError> {
        match self {
            AnyTable::Snapshot(t) => t.first(),
            AnyTable::Group(t) => t.first(),
        }
    }

    fn last(&self) -> Result<Option<(AccessGuard<'_, K>, AccessGuard<'_, V>)>, redb::StorageError> {
        match self {
            AnyTable::Snapshot(t) => t.last(),
            AnyTable::Group(t) => t.last(),
        }
    }
}
