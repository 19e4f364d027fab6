//! What the store keeps beside each document so the node can answer without loading it.
//!
//! A company's node holds hundreds of thousands of documents; it loads a document only when
//! an operation needs its changes. What the node must know of every document at once (whom
//! it is shared with, which grants it holds), what lists show (a relationship's summary)
//! and the inbox come from these records instead. They are derived from the document and
//! written in the same store transaction as its changes ([`crate::Store::put_changes`]),
//! so they never disagree with it; a store of an older schema gets them in its migration.

use std::collections::HashSet;

use rapport_protocol::automerge::ChangeHash;
use rapport_protocol::{ConsentDoc, EntryId, IdentityKey, RelBody, RelationshipDoc, UnixSeconds};
use serde::{Deserialize, Serialize};

use crate::views::{MemberRow, MessageView, RelSummary};

/// What the node keeps in memory about every document it holds. Stored as
/// `{"kind":"consent","grants":[…],"answered":…}` or
/// `{"kind":"relationship","members":[[…,…],…]}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(crate) enum Facts {
    /// A consent document.
    Consent {
        /// Every grant in it.
        grants: Vec<EntryId>,
        /// This node wrote in it (it answered the grants).
        answered: bool,
    },
    /// A relationship.
    Relationship {
        /// Everyone the owner added: identity, and whether removed since.
        members: Vec<(IdentityKey, bool)>,
    },
}

/// The fields of stored facts, read flat: serde's internally tagged enums buffer every
/// field before reading it, and a node reads 200,000 of these as it starts with 100,000
/// customers.
#[derive(Deserialize)]
struct FactFields {
    kind: FactKind,
    grants: Option<Vec<EntryId>>,
    answered: Option<bool>,
    members: Option<Vec<(IdentityKey, bool)>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum FactKind {
    Consent,
    Relationship,
}

impl<'de> Deserialize<'de> for Facts {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let f = FactFields::deserialize(d)?;
        // A list read from JSON has room for more than it holds (four at least), and the
        // node keeps these for every document it holds: each is kept as an exact copy
        // (shrinking it in place would leave a hole beside each, about 19 MiB at 100,000
        // customers; the list read is freed for the next document's).
        Ok(match f.kind {
            FactKind::Consent => {
                let grants = f.grants.ok_or_else(|| D::Error::missing_field("grants"))?;
                let answered = f
                    .answered
                    .ok_or_else(|| D::Error::missing_field("answered"))?;
                Facts::Consent {
                    grants: grants.to_vec(),
                    answered,
                }
            }
            FactKind::Relationship => {
                let members = f
                    .members
                    .ok_or_else(|| D::Error::missing_field("members"))?;
                Facts::Relationship {
                    members: members.to_vec(),
                }
            }
        })
    }
}

impl Facts {
    /// The facts of a consent document, for the node `me`.
    pub(crate) fn of_consent(me: &IdentityKey, c: &ConsentDoc) -> Self {
        let l = c.ledger();
        Facts::Consent {
            grants: l.grants(UnixSeconds::MAX).iter().map(|g| g.id).collect(),
            answered: l
                .changes()
                .iter()
                .any(|ch| ch.author_bytes() == me.as_bytes()),
        }
    }

    /// The facts of a relationship.
    pub(crate) fn of_rel(r: &RelationshipDoc) -> Self {
        Facts::Relationship {
            members: r
                .members()
                .map(|m| (m.identity, m.removed_at.is_some()))
                .collect(),
        }
    }

    /// Whether `who` is a member now (added and not removed).
    pub(crate) fn is_member(&self, who: &IdentityKey) -> bool {
        matches!(self, Facts::Relationship { members } if members.iter().any(|(m, gone)| m == who && !gone))
    }

    /// Whether the owner ever added `who`.
    pub(crate) fn ever_member(&self, who: &IdentityKey) -> bool {
        matches!(self, Facts::Relationship { members } if members.iter().any(|(m, _)| m == who))
    }
}

/// Everything indexed for one document after a change to it.
#[derive(Debug, Clone)]
pub(crate) struct Indexed {
    /// Its facts.
    pub(crate) facts: Facts,
    /// Its summary, for a relationship.
    pub(crate) summary: Option<RelSummary>,
    /// Messages from others that the change added (for the inbox).
    pub(crate) inbox: Vec<MessageView>,
}

/// Whom a node is: the two things its views need.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Viewer<'a> {
    /// The node's identity.
    pub(crate) me: IdentityKey,
    /// The node's own name.
    pub(crate) name: &'a str,
}

impl Viewer<'_> {
    /// The name this node knows `who` by in `rel`.
    pub(crate) fn name_of(&self, rel: &RelationshipDoc, who: &IdentityKey) -> String {
        if *who == self.me {
            return self.name.to_owned();
        }
        if *who == rel.header().owner {
            return rel
                .profile_field("name")
                .map_or_else(|| who.short(), str::to_owned);
        }
        rel.members()
            .find(|m| m.identity == *who)
            .map(|m| m.name.clone())
            .unwrap_or_else(|| who.short())
    }

    /// A message of `rel`, as shown.
    pub(crate) fn message(&self, rel: &RelationshipDoc, id: EntryId) -> Option<MessageView> {
        let e = rel.entries().get(&id)?;
        let RelBody::Message {
            thread,
            text,
            purpose,
        } = &e.body
        else {
            return None;
        };
        Some(MessageView {
            rel: rel.id(),
            id,
            by: e.by,
            by_name: self.name_of(rel, &e.by),
            at: e.at,
            text: text.clone(),
            purpose: purpose.clone(),
            thread: *thread,
            mine: e.by == self.me,
        })
    }

    /// A relationship as listed.
    pub(crate) fn summary(&self, r: &RelationshipDoc) -> RelSummary {
        let last = r.last_message().and_then(|(id, _)| self.message(r, id));
        RelSummary {
            id: r.id(),
            owner: r.header().owner,
            owner_name: self.name_of(r, &r.header().owner),
            mine: r.header().owner == self.me,
            title: r.title().map(str::to_owned),
            members: r
                .members()
                .map(|m| MemberRow {
                    identity: m.identity,
                    name: m.name.clone(),
                    removed: m.removed_at.is_some(),
                })
                .collect(),
            message_count: r.message_count(),
            last_at: last.as_ref().map_or(0, |m| m.at),
            last,
        }
    }

    /// The messages from others that the changes `hashes` of `r` added.
    pub(crate) fn inbox_of<'h>(
        &self,
        r: &RelationshipDoc,
        hashes: impl IntoIterator<Item = &'h ChangeHash>,
    ) -> Vec<MessageView> {
        let mut seen = HashSet::new();
        hashes
            .into_iter()
            .flat_map(|h| r.entries_of_change(h))
            .filter(|(id, e)| e.by != self.me && seen.insert(*id))
            .filter_map(|(id, _)| self.message(r, id))
            .collect()
    }

    /// The index records of a consent document after a change.
    pub(crate) fn consent(&self, c: &ConsentDoc) -> Indexed {
        Indexed {
            facts: Facts::of_consent(&self.me, c),
            summary: None,
            inbox: Vec::new(),
        }
    }

    /// The index records of relationship `r` after the changes `new` were added to it.
    pub(crate) fn rel<'h>(
        &self,
        r: &RelationshipDoc,
        new: impl IntoIterator<Item = &'h ChangeHash>,
    ) -> Indexed {
        Indexed {
            facts: Facts::of_rel(r),
            summary: Some(self.summary(r)),
            inbox: self.inbox_of(r, new),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rapport_protocol::SecretKey;

    fn key(seed: u8) -> IdentityKey {
        SecretKey::from_seed([seed; 32]).identity()
    }

    proptest! {
        /// Facts read back flat are the facts written tagged.
        #[test]
        fn facts_read_back_as_written(
            grants in proptest::collection::vec(any::<[u8; 32]>(), 0..4),
            answered in any::<bool>(),
            members in proptest::collection::vec((1u8..20, any::<bool>()), 0..4),
        ) {
            let consent = Facts::Consent {
                grants: grants.into_iter().map(EntryId).collect(),
                answered,
            };
            let rel = Facts::Relationship {
                members: members.into_iter().map(|(s, gone)| (key(s), gone)).collect(),
            };
            for f in [consent, rel] {
                let json = serde_json::to_vec(&f).unwrap();
                prop_assert_eq!(serde_json::from_slice::<Facts>(&json).unwrap(), f);
            }
        }
    }

    #[test]
    fn facts_are_stored_as_a_tagged_object_and_a_missing_field_is_refused() {
        let f = Facts::Relationship {
            members: vec![(key(1), true)],
        };
        let json = serde_json::to_string(&f).unwrap();
        assert_eq!(
            json,
            format!(
                r#"{{"kind":"relationship","members":[["{}",true]]}}"#,
                key(1)
            )
        );
        let consent: Facts =
            serde_json::from_str(r#"{"answered":false,"kind":"consent","grants":[]}"#).unwrap();
        assert_eq!(
            consent,
            Facts::Consent {
                grants: vec![],
                answered: false
            }
        );
        for bad in [
            r#"{"kind":"consent","grants":[]}"#,
            r#"{"kind":"relationship"}"#,
            r#"{"kind":"other","members":[]}"#,
            r#"{"members":[]}"#,
        ] {
            assert!(serde_json::from_str::<Facts>(bad).is_err(), "{bad}");
        }
    }
}
