//! The shape shared by every Rapport document: a root map of content-addressed entries that
//! a change may only add to.
//!
//! A valid change puts text values at new keys of the root map (no predecessor, so nothing
//! is overwritten or deleted), and each key is the [`EntryId`] of its text. What the text
//! must say is up to each document type.

use automerge::legacy::{Key, ObjectId, OpType};
use automerge::transaction::{CommitOptions, Transactable};
use automerge::{Automerge, ChangeHash, ROOT, ScalarValue};

use crate::consent::EntryId;
use crate::consent::UnixSeconds;
use crate::identity::{IdentityKey, SecretKey};
use crate::signed::{ChangeError, DocId, SignedChange, actor_for};

/// Why a change is not a plain append of entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum AppendViolation {
    /// Structural: the change does something other than add new root keys.
    NotAnAppend(String),
    /// The value is not text, too long, or sits under a key that is not its id.
    BadEntry(String),
}

/// Reads the entries a change adds, as `(id, text)`, checking only the append-only shape and
/// the size bound `max_entry_bytes`.
pub(crate) fn appended_entries(
    sc: &SignedChange,
    max_entry_bytes: usize,
) -> Result<Vec<(EntryId, String)>, AppendViolation> {
    if sc.change().author().is_some() {
        // Automerge binds an author to a writer session once; ours never name one.
        return Err(AppendViolation::NotAnAppend(
            "it names an Automerge author".into(),
        ));
    }
    // The expansion of a crafted change can panic inside Automerge (see `guard`).
    let expanded = crate::guard::contain(|| sc.change().decode()).map_err(|_| {
        AppendViolation::NotAnAppend("its operations name actors it does not list".into())
    })?;
    if expanded.operations.is_empty() {
        return Err(AppendViolation::NotAnAppend("it has no operations".into()));
    }
    let mut out = Vec::with_capacity(expanded.operations.len());
    for op in expanded.operations {
        let (ObjectId::Root, Key::Map(key), false) = (&op.obj, &op.key, op.insert) else {
            return Err(AppendViolation::NotAnAppend(
                "it writes outside the root entry map".into(),
            ));
        };
        if !op.pred.is_empty() {
            return Err(AppendViolation::NotAnAppend(format!(
                "it overwrites or deletes entry {key}"
            )));
        }
        let text = match op.action {
            OpType::Put(ScalarValue::Str(s)) => s,
            OpType::Put(_) => {
                return Err(AppendViolation::BadEntry(format!(
                    "entry {key} is not text"
                )));
            }
            _ => {
                return Err(AppendViolation::NotAnAppend(format!(
                    "it does not put a new entry at {key}"
                )));
            }
        };
        if text.len() > max_entry_bytes {
            return Err(AppendViolation::BadEntry(format!(
                "entry is {} bytes, limit {max_entry_bytes}",
                text.len()
            )));
        }
        let id = EntryId::of(&text);
        if id.to_hex() != key.as_str() {
            return Err(AppendViolation::BadEntry(format!(
                "key {key} is not the id of its entry"
            )));
        }
        out.push((id, text.to_string()));
    }
    Ok(out)
}

/// An entry of some document type: versioned JSON that names its writer.
pub(crate) trait Authored: serde::de::DeserializeOwned {
    /// The entry schema version this build reads.
    const VERSION: u8;
    /// The entry's version field.
    fn version(&self) -> u8;
    /// Who the entry says wrote it.
    fn by(&self) -> &IdentityKey;
}

/// The entries a change adds, parsed, each of the supported version and written in the
/// name of `author` (the change's signer). What an entry may say is left to the caller.
pub(crate) fn authored_entries<E: Authored>(
    sc: &SignedChange,
    max_entry_bytes: usize,
    author: &IdentityKey,
) -> Result<Vec<(EntryId, E)>, AppendViolation> {
    let bad = AppendViolation::BadEntry;
    let texts = appended_entries(sc, max_entry_bytes)?;
    let mut out = Vec::with_capacity(texts.len());
    for (id, text) in texts {
        let entry: E =
            serde_json::from_str(&text).map_err(|e| bad(format!("entry {}: {e}", id.short())))?;
        if entry.version() != E::VERSION {
            return Err(bad(format!(
                "entry version {} is not supported",
                entry.version()
            )));
        }
        if entry.by() != author {
            return Err(bad(format!(
                "entry {} claims to be by {}, but the change is signed by {author}",
                id.short(),
                entry.by()
            )));
        }
        out.push((id, entry));
    }
    Ok(out)
}

/// How many threads a large check may use: the machine's cores, up to four. Asked of
/// the system once: `available_parallelism` reads the cgroup's files each time, which cost
/// more than checking a small document's changes.
pub(crate) fn check_threads() -> usize {
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *THREADS.get_or_init(|| {
        std::thread::available_parallelism()
            .map_or(1, std::num::NonZeroUsize::get)
            .min(4)
    })
}

/// Maps `f` over `items`, on several threads when there are many.
pub(crate) fn par_map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    if items.len() < 1024 || check_threads() < 2 {
        return items.iter().map(f).collect();
    }
    let threads = check_threads();
    let per = items.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let parts: Vec<_> = items
            .chunks(per)
            .map(|part| scope.spawn(|| part.iter().map(&f).collect::<Vec<R>>()))
            .collect();
        parts
            .into_iter()
            .flat_map(|h| h.join().expect("rule-check threads do not panic"))
            .collect()
    })
}

/// The texts a change puts into its document, best effort and unchecked: for showing a
/// refused change to a person. Empty when the change is not an append of text values.
pub fn entry_texts(sc: &SignedChange) -> Vec<String> {
    appended_entries(sc, usize::MAX)
        .map(|v| v.into_iter().map(|(_, t)| t).collect())
        .unwrap_or_default()
}

/// A document that takes checked changes, one at a time, once their dependencies are in.
pub(crate) trait CausalSink {
    /// What the per-change checks produced for a change (its entries, its author …).
    type Item;
    /// Why a change is refused.
    type Error;
    /// Whether the document holds this change.
    fn holds(&self, hash: &ChangeHash) -> bool;
    /// Checks a change against the document's state and records it, or says why not.
    fn take(&mut self, change: SignedChange, item: Self::Item) -> Result<(), Self::Error>;
    /// The refusal of a change whose dependencies never arrived (`missing` of them).
    fn missing(&self, change: &SignedChange, missing: usize) -> Self::Error;
}

/// A change waiting to be taken, with what its per-change checks said.
pub(crate) type Pending<S> = (
    SignedChange,
    Result<<S as CausalSink>::Item, <S as CausalSink>::Error>,
);

/// Applies changes received in any order: each pass takes every change whose dependencies
/// are in, until a pass takes none (honest input in causal order goes through in one
/// pass). Changes whose dependencies never arrive are refused as missing them.
pub(crate) fn apply_causally<S: CausalSink>(
    sink: &mut S,
    mut waiting: Vec<Pending<S>>,
    applied: &mut Vec<ChangeHash>,
    rejected: &mut Vec<(ChangeHash, S::Error)>,
) {
    loop {
        let before = waiting.len();
        let mut still = Vec::new();
        for (c, item) in waiting {
            if !c.change().deps().iter().all(|d| sink.holds(d)) {
                still.push((c, item));
                continue;
            }
            let hash = c.hash();
            match item.and_then(|i| sink.take(c, i)) {
                Ok(()) => applied.push(hash),
                Err(e) => rejected.push((hash, e)),
            }
        }
        waiting = still;
        if waiting.is_empty() || waiting.len() == before {
            break;
        }
    }
    for (c, _) in waiting {
        let missing = c.change().deps().iter().filter(|d| !sink.holds(d)).count();
        rejected.push((c.hash(), sink.missing(&c, missing)));
    }
}

/// Writes one entry text at its id into `doc`, as `key`'s writer session `nonce` at time
/// `at`, and signs the change for document `doc_id`. Callers check every rule first;
/// writing in place (not on a fork) keeps an append O(1) in the size of the document.
pub(crate) fn write_entry(
    doc: &mut Automerge,
    doc_id: &DocId,
    key: &SecretKey,
    nonce: [u8; 16],
    at: UnixSeconds,
    id: &EntryId,
    text: String,
) -> Result<SignedChange, ChangeError> {
    let actor = actor_for(&key.identity(), nonce);
    if doc.get_actor() != &actor {
        doc.set_actor(actor);
    }
    let mut tx = doc.transaction();
    tx.put(ROOT, id.to_hex(), text)
        .map_err(|e| ChangeError::BadChange(e.to_string()))?;
    tx.commit_with(CommitOptions::default().with_time(at as i64));
    let change = doc
        .get_last_local_change()
        .expect("a change was just committed");
    SignedChange::sign(doc_id, change, key)
}
