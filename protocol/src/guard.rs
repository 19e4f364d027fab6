//! Containment for a panic inside a dependency while it reads untrusted input.
//!
//! Automerge 0.12 expands a change's operations by looking up actor indices that
//! `Change::try_from` never range-checks, and unwraps the lookup: a peer can sign a change
//! whose expansion panics. Automerge keeps the operation columns private, so the check
//! cannot be made before expanding; instead the expansion runs here, where a panic becomes
//! an ordinary refusal of that one change. Nothing else is ever run under this guard: a
//! panic anywhere else is a bug, and the node binary stops at once on it (see
//! [`in_guarded_section`]).

use std::cell::Cell;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Once;

thread_local! {
    static GUARDED: Cell<bool> = const { Cell::new(false) };
}

/// Whether the current thread is inside a guarded call. A process-wide panic hook that
/// stops the process on any panic (as `rapport node run` installs) must let these through:
/// they are caught and turned into a refusal.
pub fn in_guarded_section() -> bool {
    GUARDED.with(Cell::get)
}

/// Runs `f`; a panic inside it is caught, reported by no hook, and returned as `None`.
pub(crate) fn guarded<R>(f: impl FnOnce() -> R) -> Option<R> {
    static QUIET: Once = Once::new();
    QUIET.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if !in_guarded_section() {
                previous(info);
            }
        }));
    });
    let was = GUARDED.with(|g| g.replace(true));
    let out = panic::catch_unwind(AssertUnwindSafe(f));
    GUARDED.with(|g| g.set(was));
    out.ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_inside_is_contained_and_the_flag_restored() {
        assert_eq!(guarded(|| 7), Some(7));
        assert_eq!(guarded(|| -> u8 { panic!("boom") }), None);
        assert!(!in_guarded_section());
    }
}
