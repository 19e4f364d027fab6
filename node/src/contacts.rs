//! Contacts and how a command names a peer.
//!
//! A peer id is 52 characters without a checksum: one mistyped character names a valid
//! identity nobody holds, and a grant to it would be signed and mailed for ever. So people
//! name peers by a petname (their own name for a contact added from its invitation), by an
//! invitation link (which carries a checksum), or by an id this node already knows: a
//! contact, a peer it was connected to, or one it shares a document with. Any other id is
//! refused unless the user says it is new (`new_peer`).

use rapport_protocol::{IdentityKey, Invitation, Kind, UnixSeconds, looks_like_invitation};
use serde::{Deserialize, Serialize};

use crate::engine::{Engine, EngineError};
use crate::store::Contact;

type Result<T> = std::result::Result<T, EngineError>;

/// The longest petname, in characters.
pub const MAX_PETNAME: usize = 64;

/// A peer as a command named it, resolved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResolvedPeer {
    /// The peer's identity.
    pub identity: IdentityKey,
    /// The user's name for it, if it is a contact.
    pub petname: Option<String>,
    /// Where it may be reached: a contact's addresses, with `/p2p/<id>`.
    pub addrs: Vec<String>,
    /// The contact this resolution added (it was named by a new invitation).
    pub added: Option<Contact>,
}

/// How the user knows a peer (see [`Engine::names_of`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerName {
    /// The peer.
    pub identity: IdentityKey,
    /// Its name ([`Engine::display_name`]), if this node knows one.
    pub name: Option<String>,
    /// Its kind, if it is a contact (as its invitation said).
    pub kind: Option<Kind>,
}

/// The most peers [`Engine::names_of`] names in one call.
pub const MAX_NAMES: usize = 10_000;

/// Whether `name` may be a petname; the error says why not.
pub fn check_petname(name: &str) -> Result<()> {
    let bad = |why: &str| {
        Err(EngineError::Invalid(format!(
            "{name:?} cannot be a name: {why}"
        )))
    };
    if name.trim().is_empty() {
        return bad("it is empty");
    }
    if name.trim() != name {
        return bad("it starts or ends with a space");
    }
    if name.chars().count() > MAX_PETNAME {
        return bad("it is longer than 64 characters");
    }
    if name.chars().any(char::is_control) {
        return bad("it has control characters");
    }
    if looks_like_invitation(name) {
        return bad("it starts like an invitation link");
    }
    if name.parse::<IdentityKey>().is_ok() {
        return bad("it is an identity");
    }
    Ok(())
}

impl Engine {
    /// The contacts, by petname.
    pub fn contacts(&self) -> Vec<Contact> {
        let mut all: Vec<Contact> = self.contacts.values().cloned().collect();
        all.sort_by_key(|c| c.petname.to_lowercase());
        all
    }

    /// The user's name for `peer`, if it is a contact.
    pub fn petname(&self, peer: &IdentityKey) -> Option<&str> {
        self.contacts.get(peer).map(|c| c.petname.as_str())
    }

    /// How to show `peer` to the user: their petname if it is a contact; else the name a
    /// relationship shared with it gives (the name the user gave it as a member of a
    /// relationship the user owns, or, in quotes, the name it gave itself as the owner);
    /// else `None` (show the id). Reads at most a few summaries from the index.
    pub fn display_name(&self, peer: &IdentityKey) -> Option<String> {
        if let Some(name) = self.petname(peer) {
            return Some(name.to_owned());
        }
        for doc in self.relationships_with(peer, 4) {
            let Ok(Some(r)) = self.store().rel_summary(&doc) else {
                continue;
            };
            if r.owner == *peer && !r.owner_name.trim().is_empty() {
                return Some(format!("{:?}", r.owner_name));
            }
            if let Some(m) = r.members.iter().find(|m| m.identity == *peer)
                && !m.name.trim().is_empty()
            {
                return Some(if r.mine {
                    m.name.clone()
                } else {
                    format!("{:?}", m.name)
                });
            }
        }
        None
    }

    /// How the user knows each of `peers` (at most [`MAX_NAMES`]; the rest are left out),
    /// for lists that show names in place of ids.
    pub fn names_of(&self, peers: &[IdentityKey]) -> Vec<PeerName> {
        peers
            .iter()
            .take(MAX_NAMES)
            .map(|p| PeerName {
                identity: *p,
                name: self.display_name(p),
                kind: self.contacts.get(p).map(|c| c.kind),
            })
            .collect()
    }

    /// The contact whose petname is `name` (ignoring case).
    fn contact_named(&self, name: &str) -> Option<&Contact> {
        let lower = name.to_lowercase();
        self.contacts
            .values()
            .find(|c| c.petname.to_lowercase() == lower)
    }

    /// Whether this node knows `peer`: a contact, a peer it was connected to, or one it
    /// shares a document with.
    pub fn knows(&self, peer: &IdentityKey) -> Result<bool> {
        Ok(*peer == self.me()
            || self.contacts.contains_key(peer)
            || self.has_documents_with(peer)
            || self.store().peer(peer)?.is_some())
    }

    /// Adds the party of invitation `link` as a contact, or updates the contact it already
    /// is (its name, kind and addresses; the petname changes only if `petname` is given).
    /// Without `petname`, the contact is named by the name in the invitation, with a number
    /// added if another contact has that name. Returns the contact and whether it is new.
    pub fn add_contact(
        &mut self,
        link: &str,
        petname: Option<String>,
        now: UnixSeconds,
    ) -> Result<(Contact, bool)> {
        let inv = Invitation::decode(link).map_err(|e| EngineError::Invalid(e.to_string()))?;
        if inv.identity == self.me() {
            return Err(EngineError::Invalid(
                "that is this node's own invitation".into(),
            ));
        }
        if let Some(p) = &petname {
            check_petname(p)?;
            if let Some(other) = self.contact_named(p)
                && other.identity != inv.identity
            {
                return Err(EngineError::Refused(format!(
                    "another contact is called {:?} ({}); choose another name",
                    other.petname, other.identity
                )));
            }
        }
        let existing = self.contacts.get(&inv.identity).cloned();
        let petname = match (petname, &existing) {
            (Some(p), _) => p,
            (None, Some(c)) => c.petname.clone(),
            (None, None) => self.free_petname(&inv.name, inv.kind),
        };
        let contact = Contact {
            identity: inv.identity,
            petname,
            name: inv.name.clone(),
            kind: inv.kind,
            addrs: inv.addrs.iter().map(ToString::to_string).collect(),
            added_at: existing.as_ref().map_or(now, |c| c.added_at),
        };
        // With its addresses, which join those the node dials for it, in one transaction.
        self.store().put_contact(&contact)?;
        self.contacts.insert(contact.identity, contact.clone());
        Ok((contact, existing.is_none()))
    }

    /// A petname no contact has, from the name `wanted` (or the kind, if it is empty or
    /// cannot be a petname): `wanted`, else `wanted 2`, `wanted 3`, …
    fn free_petname(&self, wanted: &str, kind: Kind) -> String {
        let mut base: String = wanted
            .chars()
            .filter(|c| !c.is_control())
            .take(MAX_PETNAME - 4)
            .collect::<String>()
            .trim()
            .to_owned();
        if check_petname(&base).is_err() {
            base = kind.as_str().to_owned();
        }
        let mut name = base.clone();
        let mut n = 2;
        while self.contact_named(&name).is_some() {
            name = format!("{base} {n}");
            n += 1;
        }
        name
    }

    /// Renames the contact `who` (a petname, an invitation or an identity) to `petname`.
    pub fn rename_contact(&mut self, who: &str, petname: String) -> Result<Contact> {
        check_petname(&petname)?;
        let id = self.contact_id(who)?;
        if let Some(other) = self.contact_named(&petname)
            && other.identity != id
        {
            return Err(EngineError::Refused(format!(
                "another contact is called {:?} ({}); choose another name",
                other.petname, other.identity
            )));
        }
        let mut c = self.contacts[&id].clone();
        c.petname = petname;
        self.store().put_contact(&c)?;
        self.contacts.insert(id, c.clone());
        Ok(c)
    }

    /// Removes the contact `who`. Documents shared with it stay as they are.
    pub fn remove_contact(&mut self, who: &str) -> Result<Contact> {
        let id = self.contact_id(who)?;
        self.store().delete_contact(&id)?;
        Ok(self.contacts.remove(&id).expect("the contact was found"))
    }

    /// The identity of the contact `who` names (a petname, an invitation or an identity).
    fn contact_id(&self, who: &str) -> Result<IdentityKey> {
        let found = if looks_like_invitation(who) {
            let inv = Invitation::decode(who).map_err(|e| EngineError::Invalid(e.to_string()))?;
            self.contacts.get(&inv.identity)
        } else if let Ok(id) = who.trim().parse::<IdentityKey>() {
            self.contacts.get(&id)
        } else {
            self.contact_named(who.trim())
        };
        found.map(|c| c.identity).ok_or_else(|| {
            EngineError::NotFound(format!(
                "no contact is called {who:?}; `rapport contact list` shows them"
            ))
        })
    }

    /// The peer `text` names: a petname, an invitation link (its party becomes a contact if
    /// it is not one), or an identity this node knows. An identity it does not know is
    /// refused unless `new_peer` (the user confirmed it): one mistyped character in an id
    /// names somebody else.
    pub fn resolve_peer(
        &mut self,
        text: &str,
        new_peer: bool,
        now: UnixSeconds,
    ) -> Result<ResolvedPeer> {
        let text = text.trim();
        if looks_like_invitation(text) {
            let (c, new) = self.add_contact(text, None, now)?;
            return Ok(self.resolved(c.identity, new.then_some(c)));
        }
        if let Some(c) = self.contact_named(text) {
            return Ok(self.resolved(c.identity, None));
        }
        let id: IdentityKey = match text.parse() {
            Ok(id) => id,
            Err(e) => {
                return Err(EngineError::NotFound(format!(
                    "{text:?} is not a contact, an invitation link (rapport:…) or an identity ({e}); `rapport contact list` shows your contacts"
                )));
            }
        };
        if !new_peer && !self.knows(&id)? {
            return Err(EngineError::Refused(format!(
                "{id} is not a contact and this node has never been in touch with it. Check the id: one mistyped character names somebody else. Add them from their invitation (`rapport contact add rapport:…`), or pass --new-peer if you are sure of the id"
            )));
        }
        Ok(self.resolved(id, None))
    }

    fn resolved(&self, identity: IdentityKey, added: Option<Contact>) -> ResolvedPeer {
        let contact = self.contacts.get(&identity);
        ResolvedPeer {
            identity,
            petname: contact.map(|c| c.petname.clone()),
            addrs: contact
                .map(|c| {
                    c.addrs
                        .iter()
                        .map(|a| format!("{a}/p2p/{identity}"))
                        .collect()
                })
                .unwrap_or_default(),
            added,
        }
    }
}
