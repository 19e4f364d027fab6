//! Schema versions and migrations.

/// The schema this build writes and reads.
pub(crate) const SCHEMA_VERSION: u32 = 1;

/// What to do with a store of schema `found`.
pub(crate) enum Plan {
    /// Nothing: the store is current.
    Current,
    /// The store is newer than this build.
    TooNew,
}

/// Plans the migration of a store at schema `found` to [`SCHEMA_VERSION`]. Version 1 is the
/// first schema, so there is nothing to migrate from yet; the next schema adds a step here.
pub(crate) fn plan(found: u32) -> Plan {
    if found > SCHEMA_VERSION {
        Plan::TooNew
    } else {
        Plan::Current
    }
}
