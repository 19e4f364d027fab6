//! Helpers shared by the node's integration tests.
#![allow(dead_code)] // each test binary uses some of them

use rapport_node::{Engine, GrantArgs, Store};
use rapport_protocol::automerge::ChangeHash;
use rapport_protocol::wire::DocRef;
use rapport_protocol::{ConsentHeader, IdentityKey, Kind, SignedChange};
use tempfile::TempDir;

/// The time the engine-level tests start at.
pub(crate) const T0: u64 = 1_800_000_000;

/// An engine that can be closed and opened again in place.
pub(crate) struct Slot(pub(crate) Option<Engine>);

impl std::ops::Deref for Slot {
    type Target = Engine;
    fn deref(&self) -> &Engine {
        self.0.as_ref().expect("open")
    }
}

impl std::ops::DerefMut for Slot {
    fn deref_mut(&mut self) -> &mut Engine {
        self.0.as_mut().expect("open")
    }
}

pub(crate) struct Side {
    pub(crate) dir: TempDir,
    pub(crate) engine: Slot,
}

impl Side {
    pub(crate) fn new(kind: Kind, name: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::create(dir.path(), kind, name, T0).unwrap();
        let engine = Slot(Some(Engine::open(store).unwrap()));
        Self { dir, engine }
    }

    pub(crate) fn me(&self) -> IdentityKey {
        self.engine.me()
    }

    /// Closes the engine and opens it again on the same file: what a restart sees.
    pub(crate) fn reopen(&mut self) {
        self.engine.0 = None;
        self.engine.0 = Some(Engine::open(Store::open(self.dir.path()).unwrap()).unwrap());
    }
}

pub(crate) fn hashes(changes: &[Vec<u8>]) -> Vec<ChangeHash> {
    changes
        .iter()
        .map(|b| SignedChange::decode(b).unwrap().hash())
        .collect()
}

/// One honest round from `a` to `b` for `doc`; returns whether `a` wants another.
pub(crate) fn round(a: &mut Side, b: &mut Side, doc: &DocRef, now: u64) -> bool {
    let Some(req) = a.engine.start_round(&b.me(), doc, now).unwrap() else {
        return false;
    };
    let sent = hashes(&req.changes);
    let (resp, _, _) = b.engine.handle_request(&a.me(), req, now);
    let (outcome, _) = a
        .engine
        .handle_response(&b.me(), doc, &sent, resp, now)
        .unwrap();
    outcome.again && (outcome.received > 0 || outcome.peer_moved)
}

/// Honest rounds until `a` has nothing more to say, bounded.
pub(crate) fn sync(a: &mut Side, b: &mut Side, doc: &DocRef, now: u64) {
    for _ in 0..20 {
        if !round(a, b, doc, now) {
            return;
        }
    }
    panic!("sync did not settle in 20 rounds");
}

pub(crate) fn consent(customer: &Side, grantee: &Side) -> DocRef {
    DocRef::Consent(ConsentHeader {
        customer: customer.me(),
        grantee: grantee.me(),
    })
}

/// Alice grants `company` read, write and contact:support; the company accepts.
pub(crate) fn granted(alice: &mut Side, company: &mut Side, now: u64) -> String {
    let (out, _) = alice
        .engine
        .grant(
            grant_args(
                company.me(),
                &["conversation:read", "conversation:write", "contact:support"],
                "support",
            ),
            now,
        )
        .unwrap();
    let doc = consent(alice, company);
    sync(alice, company, &doc, now);
    company.engine.accept(None, None, now).unwrap();
    sync(company, alice, &doc, now);
    out.entry.unwrap().to_hex()
}

/// A grant of `scopes` to `grantee` for `purpose`, everything else by default.
pub(crate) fn grant_args(grantee: IdentityKey, scopes: &[&str], purpose: &str) -> GrantArgs {
    GrantArgs {
        grantee,
        scopes: scopes.iter().map(|s| s.parse().unwrap()).collect(),
        purpose: purpose.into(),
        expires: None,
        terms: None,
        legal_basis: None,
        notice_sha256: None,
    }
}

/// A redb backend over the real file that fails every write, resize and sync with "No
/// space left on device" while `full` is set, as a full disk does.
#[derive(Debug)]
pub(crate) struct FullDisk {
    pub(crate) inner: redb::backends::FileBackend,
    pub(crate) full: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Writes to the file so far (those refused included).
    pub(crate) writes: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Writes, resizes and syncs refused so far.
    pub(crate) refused: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl FullDisk {
    fn check(&self) -> std::io::Result<()> {
        if self.full.load(std::sync::atomic::Ordering::SeqCst) {
            self.refused
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Err(std::io::Error::new(
                std::io::ErrorKind::StorageFull,
                "No space left on device (injected)",
            ))
        } else {
            Ok(())
        }
    }
}

impl redb::StorageBackend for FullDisk {
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        self.inner.read(offset, out)
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.check()?;
        self.inner.set_len(len)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.check()?;
        self.inner.sync_data()
    }
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.writes
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.check()?;
        self.inner.write(offset, data)
    }
    fn close(&self) -> std::io::Result<()> {
        self.inner.close()
    }
    fn try_lock_range(
        &self,
        start: std::ops::Bound<u64>,
        end: std::ops::Bound<u64>,
    ) -> Result<bool, redb::BackendError> {
        self.inner.try_lock_range(start, end)
    }
    fn try_lock_shared_range(
        &self,
        start: std::ops::Bound<u64>,
        end: std::ops::Bound<u64>,
    ) -> Result<bool, redb::BackendError> {
        self.inner.try_lock_shared_range(start, end)
    }
    fn lock_range(
        &self,
        start: std::ops::Bound<u64>,
        end: std::ops::Bound<u64>,
    ) -> Result<(), redb::BackendError> {
        self.inner.lock_range(start, end)
    }
    fn lock_shared_range(
        &self,
        start: std::ops::Bound<u64>,
        end: std::ops::Bound<u64>,
    ) -> Result<(), redb::BackendError> {
        self.inner.lock_shared_range(start, end)
    }
    fn unlock_range(
        &self,
        start: std::ops::Bound<u64>,
        end: std::ops::Bound<u64>,
    ) -> Result<(), redb::BackendError> {
        self.inner.unlock_range(start, end)
    }
    fn query_lock_range(
        &self,
        start: std::ops::Bound<u64>,
        end: std::ops::Bound<u64>,
    ) -> Result<bool, redb::BackendError> {
        self.inner.query_lock_range(start, end)
    }
}

/// The store file at `path` opened through [`FullDisk`], failing while `full` is set.
pub(crate) fn full_disk_store(
    path: &std::path::Path,
    full: &std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> rapport_node::Store {
    full_disk_store_counted(path, full).0
}

/// [`full_disk_store`], and the count of its writes to the file.
pub(crate) fn full_disk_store_counted(
    path: &std::path::Path,
    full: &std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> (
    rapport_node::Store,
    std::sync::Arc<std::sync::atomic::AtomicU64>,
) {
    try_full_disk_store(path, full).unwrap()
}

/// [`full_disk_store_counted`], or why the store did not open (a migration that could not
/// be written, say).
pub(crate) fn try_full_disk_store(
    path: &std::path::Path,
    full: &std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Result<
    (
        rapport_node::Store,
        std::sync::Arc<std::sync::atomic::AtomicU64>,
    ),
    rapport_node::StoreError,
> {
    full_disk_store_watched(path, full).map(|(store, writes, _)| (store, writes))
}

/// [`try_full_disk_store`], with the count of writes, resizes and syncs the full disk
/// refused as well.
pub(crate) fn full_disk_store_watched(
    path: &std::path::Path,
    full: &std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Result<
    (
        rapport_node::Store,
        std::sync::Arc<std::sync::atomic::AtomicU64>,
        std::sync::Arc<std::sync::atomic::AtomicU64>,
    ),
    rapport_node::StoreError,
> {
    let full = full.clone();
    let writes = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let refused = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (counted, refusals) = (writes.clone(), refused.clone());
    let file_path = path.to_path_buf();
    let store = rapport_node::Store::open_with_backend(path, move || {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&file_path)?;
        Ok(FullDisk {
            inner: redb::backends::FileBackend::new(file)
                .map_err(|e| std::io::Error::other(e.to_string()))?,
            full: full.clone(),
            writes: counted.clone(),
            refused: refusals.clone(),
        })
    })?;
    Ok((store, writes, refused))
}

/// Alice and Acme, with consent both ways, in one relationship Alice owns and both hold.
pub(crate) fn conversation(now: u64) -> (Side, Side, String, DocRef) {
    let mut alice = Side::new(Kind::Person, "Alice");
    let mut acme = Side::new(Kind::Org, "Acme");
    granted(&mut alice, &mut acme, now);
    let (rel, _) = alice
        .engine
        .open_relationship(acme.me(), Some("Acme".into()), None, now)
        .unwrap();
    let rel = rel.doc.to_hex();
    let doc = rel_doc(&alice, &rel, now);
    sync(&mut alice, &mut acme, &doc, now);
    (alice, acme, rel, doc)
}

pub(crate) fn rel_doc(side: &Side, rel: &str, now: u64) -> DocRef {
    let id = side.engine.relationship(rel, now).unwrap().summary.id;
    side.engine
        .counterparts()
        .into_iter()
        .flat_map(|p| side.engine.shared_with(&p, now))
        .find(|d| d.doc_id() == id)
        .expect("the relationship is shared with someone")
}

/// The texts of the messages `side` holds in `rel`, sorted.
pub(crate) fn sorted_texts(side: &Side, rel: &str, now: u64) -> Vec<String> {
    let mut texts: Vec<String> = side
        .engine
        .relationship(rel, now)
        .unwrap()
        .messages
        .into_iter()
        .map(|m| m.text)
        .collect();
    texts.sort();
    texts
}
