//! Turning a panic inside redb into an error.
//!
//! redb trusts the pages it reads: some damaged pages make it panic (`unreachable!` in its
//! B-tree code) instead of returning `Corrupted`. A store call must never take the process
//! down, so every call into redb runs under [`guarded`], which catches the panic, keeps its
//! message for the error, and stops the default hook from printing it (the person sees one
//! clear line from the caller instead of a backtrace).

use std::cell::{Cell, RefCell};
use std::panic::{self, AssertUnwindSafe};
use std::sync::Once;

thread_local! {
    /// How many [`guarded`] calls are running on this thread.
    static DEPTH: Cell<u32> = const { Cell::new(0) };
    /// What the last panic inside a guarded call said, and where.
    static LAST: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Chains a hook in front of the current panic hook, once per process: a panic inside a
/// guarded call is recorded instead of printed; every other panic goes to the previous hook.
fn install_hook() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if DEPTH.with(Cell::get) > 0 {
                let msg = info
                    .payload()
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| info.payload().downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic".to_owned());
                let at = info
                    .location()
                    .map(|l| format!(" at {}:{}", short_path(l.file()), l.line()))
                    .unwrap_or_default();
                let line = format!("{msg}{at}").replace('\n', " ");
                LAST.with(|l| *l.borrow_mut() = Some(line));
            } else {
                previous(info);
            }
        }));
    });
}

/// A source path without the cargo registry's directories: `redb-4.6.0/src/…`.
fn short_path(file: &str) -> &str {
    match file.rsplit_once("/registry/src/") {
        Some((_, rest)) => rest
            .split_once('/')
            .map_or(rest, |(_, crate_path)| crate_path),
        None => file,
    }
}

/// Runs `f`; a panic inside it becomes `Err` with the panic's message and location.
pub(super) fn guarded<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    install_hook();
    DEPTH.with(|d| d.set(d.get() + 1));
    let out = panic::catch_unwind(AssertUnwindSafe(f));
    DEPTH.with(|d| d.set(d.get() - 1));
    out.map_err(|_| {
        LAST.with(|l| l.borrow_mut().take())
            .unwrap_or_else(|| "a panic".to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::guarded;

    #[test]
    fn a_panic_becomes_an_error_with_its_message() {
        assert_eq!(guarded(|| 7), Ok(7));
        let err = guarded(|| -> u8 { unreachable!("page type") }).unwrap_err();
        assert!(err.contains("page type"), "{err}");
        assert!(err.contains("guard.rs"), "{err}");
        assert_eq!(
            super::short_path(
                "/root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/redb-4.6.0/src/tree_store/btree.rs"
            ),
            "redb-4.6.0/src/tree_store/btree.rs"
        );
        // Nested calls and later calls still work.
        assert_eq!(guarded(|| guarded(|| 1)), Ok(Ok(1)));
    }
}
