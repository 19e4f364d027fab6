//! Containment for a panic inside a dependency while it reads untrusted input.
//!
//! Two dependencies panic on input a peer or a damaged disk can produce. Automerge 0.12
//! expands a change's operations by looking up actor indices that `Change::try_from` never
//! range-checks, and unwraps the lookup, so a peer can sign a change whose expansion
//! panics; its operation columns are private, so the check cannot be made before
//! expanding. redb trusts the pages it reads, and some damaged pages make it panic
//! (`unreachable!` in its B-tree code) instead of returning an error. Those calls, and
//! nothing else, run under [`contain`], where a panic becomes an ordinary error: the
//! refusal of that one change, or "the store is damaged". A panic anywhere else is a bug,
//! and the node binary stops at once on it (see [`in_guarded_section`]).

use std::cell::{Cell, RefCell};
use std::panic::{self, AssertUnwindSafe};
use std::sync::Once;

thread_local! {
    /// How many [`contain`] calls are running on this thread.
    static DEPTH: Cell<u32> = const { Cell::new(0) };
    /// What the last panic inside a contained call said, and where.
    static LAST: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Whether the current thread is inside a [`contain`] call. A process-wide panic hook that
/// stops the process on any panic (as `rapport node run` installs) must let these through:
/// they are caught and turned into an error.
pub fn in_guarded_section() -> bool {
    DEPTH.with(Cell::get) > 0
}

/// Chains a hook in front of the current panic hook, once per process: a panic inside a
/// contained call is recorded instead of printed; every other panic goes to the previous
/// hook.
fn install_hook() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if !in_guarded_section() {
                previous(info);
                return;
            }
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

/// Runs `f`; a panic inside it is caught, printed by no hook, and returned as `Err` with
/// the panic's message and location.
pub fn contain<T>(f: impl FnOnce() -> T) -> Result<T, String> {
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
    use super::*;

    #[test]
    fn a_panic_becomes_an_error_with_its_message_and_the_flag_is_restored() {
        assert_eq!(contain(|| 7), Ok(7));
        let err = contain(|| -> u8 { unreachable!("page type") }).unwrap_err();
        assert!(err.contains("page type"), "{err}");
        assert!(err.contains("guard.rs"), "{err}");
        assert!(!in_guarded_section());
        assert_eq!(
            short_path(
                "/root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/redb-4.6.0/src/tree_store/btree.rs"
            ),
            "redb-4.6.0/src/tree_store/btree.rs"
        );
        // Nested calls and later calls still work.
        assert_eq!(contain(|| contain(|| 1)), Ok(Ok(1)));
    }
}
