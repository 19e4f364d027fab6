//! The mailbox: the relay's durable store of sealed
//! envelopes with per-peer quotas and retention.
//!
//! The relay's store is its own redb file (`relay.redb`), never a node's. Tables:
//!
//! | table | key | value |
//! |---|---|---|
//! | `relay-meta-1` | `schema`, `secret`, `next-seq` | u32 / 32-byte seed / u64 |
//! | `mail-1` | (recipient key, sequence number) | sender key (32) ‖ stored-at (u64) ‖ envelope |
//! | `usage-1` | sender key | bytes the sender has stored (u64) |
//!
//! A deposit is committed (fsync) before it is acknowledged; fetched mail is deleted only
//! when its recipient asks for the next batch, so mail in flight when a node crashes is
//! handed over again.

use std::io;
use std::path::{Path, PathBuf};

use rapport_protocol::mail::{MAX_ENVELOPES_PER_MESSAGE, MAX_MAIL_BATCH_BYTES};
use rapport_protocol::{IdentityKey, SecretKey};
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use zeroize::Zeroizing;

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("relay-meta-1");
const MAIL: TableDefinition<(&[u8; 32], u64), &[u8]> = TableDefinition::new("mail-1");
const USAGE: TableDefinition<&[u8; 32], u64> = TableDefinition::new("usage-1");
const RELAY_SCHEMA: u32 = 1;
/// The relay store's file name in its data directory.
pub const RELAY_DB: &str = "relay.redb";

/// Why the relay store failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RelayStoreError {
    /// redb failed.
    #[error("relay store {path}: {detail}")]
    Db {
        /// The file.
        path: PathBuf,
        /// What failed.
        detail: String,
    },
}

/// A stored piece of mail, as handed over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMail {
    /// Sequence number (increasing across the relay).
    pub seq: u64,
    /// The depositor.
    pub from: [u8; 32],
    /// When stored (unix seconds).
    pub stored_at: u64,
    /// The encoded envelope.
    pub envelope: Vec<u8>,
}

/// The relay's durable mailbox.
#[derive(Debug)]
pub struct RelayStore {
    db: Database,
    path: PathBuf,
}

impl RelayStore {
    /// Opens (or creates) the store in `dir`. It holds the relay's secret key, so like a
    /// node's store the directory is made mode 0700 and the file 0600 (from its first byte
    /// when new; an existing one readable by others is made private).
    pub fn open(dir: &Path) -> Result<Self, RelayStoreError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |e: io::Error| RelayStoreError::Db {
                path,
                detail: e.to_string(),
            }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        restrict(dir, 0o700).map_err(io(dir))?;
        let path = dir.join(RELAY_DB);
        {
            let mut opts = std::fs::OpenOptions::new();
            opts.read(true).write(true).create(true).truncate(false);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
            opts.open(&path).map_err(io(&path))?;
        }
        restrict(&path, 0o600).map_err(io(&path))?;
        // redb initialises an empty file, or opens the existing store, and keeps its mode.
        let db = Database::create(&path).map_err(|e| RelayStoreError::Db {
            path: path.clone(),
            detail: e.to_string(),
        })?;
        let store = Self { db, path };
        store.write(|tx| {
            let mut meta = tx.open_table(META)?;
            if meta.get("schema")?.is_none() {
                meta.insert("schema", &RELAY_SCHEMA.to_be_bytes()[..])?;
            }
            drop(meta);
            tx.open_table(MAIL)?;
            tx.open_table(USAGE)?;
            Ok(())
        })?;
        Ok(store)
    }

    fn err(&self, e: impl Into<redb::Error>) -> RelayStoreError {
        RelayStoreError::Db {
            path: self.path.clone(),
            detail: e.into().to_string(),
        }
    }

    fn write<T>(
        &self,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<T, redb::Error>,
    ) -> Result<T, RelayStoreError> {
        let tx = self.db.begin_write().map_err(|e| self.err(e))?;
        let out = f(&tx).map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))?;
        Ok(out)
    }

    /// The relay's own key, made on first use.
    pub fn secret_key(&self) -> Result<SecretKey, RelayStoreError> {
        self.write(|tx| {
            let mut meta = tx.open_table(META)?;
            let existing = meta
                .get("secret")?
                .map(|v| Zeroizing::new(v.value().to_vec()));
            let mut seed = Zeroizing::new([0u8; 32]);
            match existing.filter(|v| v.len() == 32) {
                Some(s) => seed.copy_from_slice(&s),
                None => {
                    getrandom::fill(&mut *seed).map_err(|e| {
                        redb::Error::Io(io::Error::other(format!("OS random source: {e}")))
                    })?;
                    meta.insert("secret", &seed[..])?;
                }
            }
            Ok(SecretKey::from_seed(*seed))
        })
    }

    /// Bytes `from` has stored here.
    pub fn usage(&self, from: &IdentityKey) -> Result<u64, RelayStoreError> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = tx.open_table(USAGE).map_err(|e| self.err(e))?;
        Ok(t.get(from.as_bytes())
            .map_err(|e| self.err(e))?
            .map_or(0, |v| v.value()))
    }

    /// Stores `items` (recipient, encoded envelope) from `from` in one durable commit,
    /// unless that would take `from` past `max_bytes`: then nothing is stored and the
    /// error says how much is in use.
    pub fn deposit(
        &self,
        from: &IdentityKey,
        items: &[(IdentityKey, Vec<u8>)],
        now: u64,
        max_bytes: u64,
    ) -> Result<Result<(), (u64, u64)>, RelayStoreError> {
        let size: u64 = items.iter().map(|(_, e)| e.len() as u64).sum();
        self.write(|tx| {
            let mut usage = tx.open_table(USAGE)?;
            let used = usage.get(from.as_bytes())?.map_or(0, |v| v.value());
            if used + size > max_bytes {
                return Ok(Err((used, size)));
            }
            usage.insert(from.as_bytes(), used + size)?;
            let mut meta = tx.open_table(META)?;
            let mut seq = meta
                .get("next-seq")?
                .and_then(|v| v.value().try_into().ok())
                .map_or(1, u64::from_be_bytes);
            let mut mail = tx.open_table(MAIL)?;
            for (to, env) in items {
                let mut rec = Vec::with_capacity(40 + env.len());
                rec.extend_from_slice(from.as_bytes());
                rec.extend_from_slice(&now.to_be_bytes());
                rec.extend_from_slice(env);
                mail.insert((to.as_bytes(), seq), rec.as_slice())?;
                seq += 1;
            }
            meta.insert("next-seq", &seq.to_be_bytes()[..])?;
            Ok(Ok(()))
        })
    }

    /// Deletes `to`'s mail up to and including `after`, then returns the next batch (at most
    /// [`MAX_ENVELOPES_PER_MESSAGE`] and about [`MAX_MAIL_BATCH_BYTES`]) and whether more
    /// wait.
    pub fn fetch(
        &self,
        to: &IdentityKey,
        after: u64,
    ) -> Result<(Vec<StoredMail>, bool), RelayStoreError> {
        if after > 0 {
            self.write(|tx| {
                let mut mail = tx.open_table(MAIL)?;
                let mut usage = tx.open_table(USAGE)?;
                let gone: Vec<(u64, [u8; 32], u64)> = mail
                    .range((to.as_bytes(), 0)..=(to.as_bytes(), after))?
                    .map(|r| {
                        r.map(|(k, v)| {
                            let (_, seq) = k.value();
                            let rec = v.value();
                            let from: [u8; 32] = rec[..32].try_into().expect("32 bytes");
                            (seq, from, (rec.len() - 40) as u64)
                        })
                    })
                    .collect::<Result<_, _>>()?;
                for (seq, from, size) in gone {
                    mail.remove((to.as_bytes(), seq))?;
                    release(&mut usage, &from, size)?;
                }
                Ok(())
            })?;
        }
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let mail = tx.open_table(MAIL).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        let mut size = 0;
        let mut more = false;
        for row in mail
            .range((to.as_bytes(), after.saturating_add(1))..=(to.as_bytes(), u64::MAX))
            .map_err(|e| self.err(e))?
        {
            let (k, v) = row.map_err(|e| self.err(e))?;
            let rec = v.value();
            if !out.is_empty()
                && (out.len() >= MAX_ENVELOPES_PER_MESSAGE
                    || size + rec.len() > MAX_MAIL_BATCH_BYTES)
            {
                more = true;
                break;
            }
            size += rec.len();
            out.push(StoredMail {
                seq: k.value().1,
                from: rec[..32].try_into().expect("32 bytes"),
                stored_at: u64::from_be_bytes(rec[32..40].try_into().expect("8 bytes")),
                envelope: rec[40..].to_vec(),
            });
        }
        Ok((out, more))
    }

    /// Deletes mail stored before `cutoff` (unix seconds). Returns how many were deleted.
    pub fn expire(&self, cutoff: u64) -> Result<usize, RelayStoreError> {
        self.write(|tx| {
            let mut mail = tx.open_table(MAIL)?;
            let mut usage = tx.open_table(USAGE)?;
            let mut old = Vec::new();
            for row in mail.iter()? {
                let (k, v) = row?;
                let rec = v.value();
                let at = u64::from_be_bytes(rec[32..40].try_into().expect("8 bytes"));
                if at < cutoff {
                    let (to, seq) = k.value();
                    let from: [u8; 32] = rec[..32].try_into().expect("32 bytes");
                    old.push((*to, seq, from, (rec.len() - 40) as u64));
                }
            }
            for (to, seq, from, size) in &old {
                mail.remove((to, *seq))?;
                release(&mut usage, from, *size)?;
            }
            Ok(old.len())
        })
    }

    /// Every envelope stored, with its recipient: for audits (and tests) of what the relay
    /// holds.
    pub fn all_mail(&self) -> Result<Vec<([u8; 32], StoredMail)>, RelayStoreError> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let mail = tx.open_table(MAIL).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in mail.iter().map_err(|e| self.err(e))? {
            let (k, v) = row.map_err(|e| self.err(e))?;
            let (to, seq) = k.value();
            let rec = v.value();
            out.push((
                *to,
                StoredMail {
                    seq,
                    from: rec[..32].try_into().expect("32 bytes"),
                    stored_at: u64::from_be_bytes(rec[32..40].try_into().expect("8 bytes")),
                    envelope: rec[40..].to_vec(),
                },
            ));
        }
        Ok(out)
    }

    /// How many envelopes wait, for everyone.
    pub fn mail_count(&self) -> Result<u64, RelayStoreError> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let mail = tx.open_table(MAIL).map_err(|e| self.err(e))?;
        mail.len().map_err(|e| self.err(e))
    }
}

fn release(
    usage: &mut redb::Table<&[u8; 32], u64>,
    from: &[u8; 32],
    size: u64,
) -> Result<(), redb::Error> {
    let used = usage.get(from)?.map_or(0, |v| v.value());
    let left = used.saturating_sub(size);
    if left == 0 {
        usage.remove(from)?;
    } else {
        usage.insert(from, left)?;
    }
    Ok(())
}

/// Sets a file's or directory's mode (Unix only).
fn restrict(path: &Path, mode: u32) -> io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    }
    #[cfg(not(unix))]
    let _ = (path, mode);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> IdentityKey {
        SecretKey::from_seed([n; 32]).identity()
    }

    #[test]
    fn deposit_fetch_ack_expire_and_quota() {
        let dir = tempfile::tempdir().unwrap();
        let s = RelayStore::open(dir.path()).unwrap();
        let (a, b) = (id(1), id(2));
        s.deposit(&a, &[(b, vec![1; 100]), (b, vec![2; 100])], 10, 1000)
            .unwrap()
            .unwrap();
        assert_eq!(s.usage(&a).unwrap(), 200);
        // Over quota: refused whole, nothing stored.
        assert_eq!(
            s.deposit(&a, &[(b, vec![3; 900])], 10, 1000).unwrap(),
            Err((200, 900))
        );
        assert_eq!(s.mail_count().unwrap(), 2);
        // Survives a reopen.
        drop(s);
        let s = RelayStore::open(dir.path()).unwrap();
        let (items, more) = s.fetch(&b, 0).unwrap();
        assert_eq!(items.len(), 2);
        assert!(!more);
        assert_eq!(items[0].envelope, vec![1; 100]);
        // Nothing for a: mail is per recipient.
        assert!(s.fetch(&a, 0).unwrap().0.is_empty());
        // Acknowledging the first frees its bytes.
        let (rest, _) = s.fetch(&b, items[0].seq).unwrap();
        assert_eq!(rest.len(), 1);
        assert_eq!(s.usage(&a).unwrap(), 100);
        assert_eq!(s.expire(11).unwrap(), 1);
        assert_eq!(s.usage(&a).unwrap(), 0);
        assert_eq!(s.mail_count().unwrap(), 0);
    }
}
