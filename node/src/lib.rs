//! Rapport's node runtime: everything that has effects. Today that is the store; the
//! network, sync engine and local API build on it.
//!
//! ```no_run
//! use rapport_node::Store;
//! use rapport_protocol::Kind;
//! # fn main() -> Result<(), rapport_node::StoreError> {
//! let dir = std::path::Path::new("/tmp/alice");
//! let store = Store::create(dir, Kind::Person, "Alice", 1_700_000_000)?;
//! println!("I am {}", store.profile()?.identity);
//! # Ok(()) }
//! ```

mod error;
mod store;

pub use error::StoreError;
pub use store::{Profile, Store};
