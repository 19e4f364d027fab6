//! Helpers shared by the node's integration tests.
#![allow(dead_code)] // each test binary uses some of them

use rapport_node::GrantArgs;
use rapport_protocol::IdentityKey;

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
}

impl FullDisk {
    fn check(&self) -> std::io::Result<()> {
        if self.full.load(std::sync::atomic::Ordering::SeqCst) {
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
    let full = full.clone();
    let file_path = path.to_path_buf();
    rapport_node::Store::open_with_backend(path, move || {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&file_path)?;
        Ok(FullDisk {
            inner: redb::backends::FileBackend::new(file)
                .map_err(|e| std::io::Error::other(e.to_string()))?,
            full: full.clone(),
        })
    })
    .unwrap()
}
