//! Scopes: what a grant lets its grantee do. Consent is opt-in: no scope, no access.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Longest name allowed inside a scope (a purpose, profile field or segment).
pub const MAX_SCOPE_NAME: usize = 64;

/// One permission a customer can grant.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    /// Read the shared conversation.
    ConversationRead,
    /// Write messages into the shared conversation.
    ConversationWrite,
    /// Read one profile field the customer disclosed.
    ProfileRead(String),
    /// Contact the customer for one purpose (`support`, `marketing`, …).
    Contact(String),
    /// Read the customer's membership of one segment.
    SegmentRead(String),
}

/// Why a text is not a scope.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0:?} is not a scope: expected conversation:read, conversation:write, profile:<field>:read, contact:<purpose> or segment:<name>:read, with names of 1-64 characters a-z 0-9 _ . -"
)]
pub struct ScopeError(pub String);

pub(crate) fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_SCOPE_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b))
}

impl FromStr for Scope {
    type Err = ScopeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ScopeError(s.chars().take(100).collect());
        let parts: Vec<&str> = s.split(':').collect();
        let scope = match parts.as_slice() {
            ["conversation", "read"] => Scope::ConversationRead,
            ["conversation", "write"] => Scope::ConversationWrite,
            ["profile", field, "read"] if valid_name(field) => Scope::ProfileRead((*field).into()),
            ["contact", purpose] if valid_name(purpose) => Scope::Contact((*purpose).into()),
            ["segment", name, "read"] if valid_name(name) => Scope::SegmentRead((*name).into()),
            _ => return Err(err()),
        };
        Ok(scope)
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::ConversationRead => f.write_str("conversation:read"),
            Scope::ConversationWrite => f.write_str("conversation:write"),
            Scope::ProfileRead(field) => write!(f, "profile:{field}:read"),
            Scope::Contact(purpose) => write!(f, "contact:{purpose}"),
            Scope::SegmentRead(name) => write!(f, "segment:{name}:read"),
        }
    }
}

impl Serialize for Scope {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Scope {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_forms_parse() {
        for s in [
            "conversation:read",
            "conversation:write",
            "profile:email:read",
            "contact:support",
            "contact:marketing",
            "segment:vip:read",
        ] {
            assert_eq!(s.parse::<Scope>().unwrap().to_string(), s);
        }
    }

    #[test]
    fn bad_forms_are_refused() {
        for s in [
            "",
            "conversation",
            "conversation:delete",
            "contact:",
            "contact:Marketing",
            "contact:a:b",
            "profile:email",
            "profile::read",
            "segment:x:write",
        ] {
            assert!(s.parse::<Scope>().is_err(), "{s}");
        }
        assert!(
            format!("contact:{}", "a".repeat(65))
                .parse::<Scope>()
                .is_err()
        );
    }

    fn scope() -> impl Strategy<Value = Scope> {
        let name = "[a-z0-9_.-]{1,64}";
        prop_oneof![
            Just(Scope::ConversationRead),
            Just(Scope::ConversationWrite),
            name.prop_map(Scope::ProfileRead),
            name.prop_map(Scope::Contact),
            name.prop_map(Scope::SegmentRead),
        ]
    }

    proptest! {
        #[test]
        fn display_and_parse_round_trip(s in scope()) {
            prop_assert_eq!(s.to_string().parse::<Scope>().unwrap(), s);
        }

        #[test]
        fn parse_never_panics(s in "\\PC{0,120}") {
            if let Ok(scope) = s.parse::<Scope>() {
                prop_assert_eq!(scope.to_string(), s);
            }
        }
    }
}
