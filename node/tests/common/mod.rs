//! Helpers shared by the node's integration tests.

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
