//! Consent gates everything: what a member of a customer's relationship may read and write,
//! decided from the consent ledger between the customer and that member, at a given time.
//!
//! The customer's (owner's) node asks these questions for every sync request it serves and
//! for every change it receives from a member. Consent is opt-in: without an active,
//! accepted grant that covers the act, the answer is no.

use crate::consent::{GrantStatus, Ledger, UnixSeconds};
use crate::identity::IdentityKey;
use crate::relationship::{RelBody, RelEntry};
use crate::scope::Scope;

/// Why the owner's node refuses a member.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Denied {
    /// No consent document with this member at all.
    #[error("{member} holds no grant from the owner")]
    NoGrant {
        /// The member.
        member: String,
    },
    /// The member holds no active, accepted grant with this scope (none given, expired,
    /// not yet accepted, or revoked).
    #[error("{member} holds no active, accepted grant with {scope}")]
    Missing {
        /// The member.
        member: String,
        /// The scope needed.
        scope: Scope,
    },
    /// A member's message must say why it contacts the customer.
    #[error("a message from {member} must state its purpose (it needs contact:<purpose>)")]
    NoPurpose {
        /// The member.
        member: String,
    },
    /// A relationship owned by someone this node never agreed to hear from.
    #[error(
        "unsolicited: {owner} may not start a relationship with this node: it holds no active contact:<purpose> grant from it, and this node accepted no grant of conversation:read from it"
    )]
    Uninvited {
        /// The relationship's owner.
        owner: String,
    },
    /// The member's message is for a purpose the customer did not opt in to.
    #[error(
        "unsolicited: {member} wrote for purpose {purpose:?} without contact:{purpose}; the customer did not opt in"
    )]
    Unsolicited {
        /// The member.
        member: String,
        /// The message's purpose.
        purpose: String,
    },
}

fn need(
    consent: Option<&Ledger>,
    member: &IdentityKey,
    scope: Scope,
    now: UnixSeconds,
) -> Result<(), Denied> {
    let ledger = consent.ok_or_else(|| Denied::NoGrant {
        member: member.to_string(),
    })?;
    if ledger.holds(&scope, now) {
        Ok(())
    } else {
        Err(Denied::Missing {
            member: member.to_string(),
            scope,
        })
    }
}

/// May `member` read the owner's relationships at `now`? It needs `conversation:read`.
/// `consent` is the consent ledger in which the owner is the customer and `member` the
/// grantee.
pub fn may_read(
    consent: Option<&Ledger>,
    member: &IdentityKey,
    now: UnixSeconds,
) -> Result<(), Denied> {
    need(consent, member, Scope::ConversationRead, now)
}

/// May `member` write `entries` into the owner's relationship at `now`? Every write needs
/// `conversation:write`; a message needs a purpose P and `contact:P`.
pub fn may_write(
    consent: Option<&Ledger>,
    member: &IdentityKey,
    entries: &[&RelEntry],
    now: UnixSeconds,
) -> Result<(), Denied> {
    need(consent, member, Scope::ConversationWrite, now)?;
    for e in entries {
        if let RelBody::Message { purpose, .. } = &e.body {
            let purpose = purpose.as_ref().ok_or_else(|| Denied::NoPurpose {
                member: member.to_string(),
            })?;
            if need(consent, member, Scope::Contact(purpose.clone()), now).is_err() {
                return Err(Denied::Unsolicited {
                    member: member.to_string(),
                    purpose: purpose.clone(),
                });
            }
        }
    }
    Ok(())
}

/// May this node take (hold and apply) a relationship that `owner` owns, at `now`? Only by
/// its own act, never by the owner's word alone:
/// - it granted `owner` a `contact:<purpose>` scope that `owner` accepted and that is still
///   active (`to_owner`: the ledger in which this node is the customer and `owner` the
///   grantee): it opted in to hear from `owner`; or
/// - it accepted a grant in which `owner` gives it `conversation:read` (`from_owner`: the
///   ledger in which `owner` is the customer and this node the grantee): the owner invited
///   it to read, and accepting is this node's signed act (how one person joins another's
///   relationship).
///
/// Without either, a relationship naming this node is unsolicited contact: it is refused
/// and kept as evidence, like an unsolicited message.
pub fn may_take(
    from_owner: Option<&Ledger>,
    to_owner: Option<&Ledger>,
    me: &IdentityKey,
    owner: &IdentityKey,
    now: UnixSeconds,
) -> Result<(), Denied> {
    if may_read(from_owner, me, now).is_ok() {
        return Ok(());
    }
    let opted_in = to_owner.is_some_and(|l| {
        l.grants(now).iter().any(|g| {
            g.status == GrantStatus::Active
                && g.scopes.iter().any(|s| matches!(s, Scope::Contact(_)))
        })
    });
    if opted_in {
        Ok(())
    } else {
        Err(Denied::Uninvited {
            owner: owner.to_string(),
        })
    }
}
