//! Where a command runs: against the running node's local API when one is running for the
//! data directory, else directly on the store (commands that need the network say so).

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use rapport_node::{
    Contact, Deliveries, Engine, GrantArgs, GrantRow, MessageView, NODE_FILE, NodeFile, PeerName,
    Refusal, RelDetail, RelSummary, ResolvedPeer, Store, TOKEN_FILE, WriteOutcome,
};
use rapport_protocol::{IdentityKey, Kind, Scope, UnixSeconds};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::now;

/// The names this node knows for peers, to show instead of ids: the user's petnames for
/// contacts (with their kind), and else the name a relationship gives (the engine's
/// `display_name`: in quotes when the peer gave it to itself).
#[derive(Debug, Default)]
pub(crate) struct Names(pub(crate) std::collections::HashMap<IdentityKey, (String, Option<Kind>)>);

impl Names {
    /// How to show `peer`: its name, else its id; with `-v`, the id beside the name.
    pub(crate) fn of(&self, peer: &IdentityKey) -> String {
        match self.0.get(peer) {
            Some((name, _)) => crate::out::named(name, peer),
            None => peer.to_string(),
        }
    }

    /// The user's petname for `peer` if it is a contact, else `given` (the name a
    /// relationship gives it).
    pub(crate) fn or(&self, peer: &IdentityKey, given: &str) -> String {
        crate::out::named(&self.plain_or(peer, given), peer)
    }

    /// [`Names::or`] without the identity, even with `-v`.
    pub(crate) fn plain_or(&self, peer: &IdentityKey, given: &str) -> String {
        match self.0.get(peer) {
            Some((name, Some(_))) => name.clone(),
            _ => given.to_owned(),
        }
    }

    /// [`Names::of`] with the kind its invitation gave, if any: `Acme (org)`.
    pub(crate) fn with_kind(&self, peer: &IdentityKey) -> String {
        match self.0.get(peer) {
            Some((_, Some(kind))) => format!("{} ({kind})", self.of(peer)),
            _ => self.of(peer),
        }
    }
}

/// A client of a running node's API.
pub(crate) struct Api {
    base: String,
    token: String,
    agent: ureq::Agent,
}

impl Api {
    /// The running node of `dir`, if its `node.json` names an API that answers.
    pub(crate) fn find(dir: &Path) -> Option<Api> {
        let text = std::fs::read_to_string(dir.join(NODE_FILE)).ok()?;
        let file: NodeFile = serde_json::from_str(&text).ok()?;
        let token = std::fs::read_to_string(dir.join(TOKEN_FILE)).ok()?;
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(120)))
            .build()
            .into();
        let api = Api {
            base: format!("http://{}", file.api),
            token: token.trim().to_owned(),
            agent,
        };
        // A node that stopped without cleaning up leaves node.json behind: check it answers.
        api.get::<Value>("/v1/status").ok()?;
        Some(api)
    }

    fn read<T: DeserializeOwned>(
        &self,
        resp: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<T> {
        let mut resp = resp.map_err(|e| anyhow!("the node's API did not answer: {e}"))?;
        let status = resp.status();
        let text = resp
            .body_mut()
            .with_config()
            .limit(512 << 20)
            .read_to_string()
            .map_err(|e| anyhow!("the node's API answer could not be read: {e}"))?;
        if !status.is_success() {
            let msg = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_owned))
                .unwrap_or(text);
            bail!("{msg}");
        }
        serde_json::from_str(&text).context("the node's API answered something unexpected")
    }

    pub(crate) fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.read(
            self.agent
                .get(format!("{}{path}", self.base))
                .header("Authorization", format!("Bearer {}", self.token))
                .call(),
        )
    }

    pub(crate) fn post<T: DeserializeOwned>(&self, path: &str, body: Value) -> Result<T> {
        self.read(
            self.agent
                .post(format!("{}{path}", self.base))
                .header("Authorization", format!("Bearer {}", self.token))
                .send_json(body),
        )
    }

    fn post_bytes<T: DeserializeOwned>(&self, path: &str, body: &[u8]) -> Result<T> {
        self.read(
            self.agent
                .post(format!("{}{path}", self.base))
                .header("Authorization", format!("Bearer {}", self.token))
                .header("Content-Type", "application/json")
                .send(body),
        )
    }
}

/// Where consent commands run.
pub(crate) enum Backend {
    /// On the store, with no network: changes sync the next time the node runs.
    Local(Box<Engine>),
    /// Through the running node.
    Remote(Api),
}

impl Backend {
    /// The running node's API if there is one, else the store itself.
    pub(crate) fn open(dir: &Path) -> Result<Backend> {
        if let Some(api) = Api::find(dir) {
            return Ok(Backend::Remote(api));
        }
        Ok(Backend::Local(Box::new(Engine::open(Store::open(dir)?)?)))
    }

    /// Like [`Backend::open`], for commands that change nothing: the store is opened
    /// read-only, so they work on a store file the user cannot write, and never change it.
    pub(crate) fn open_read_only(dir: &Path) -> Result<Backend> {
        if let Some(api) = Api::find(dir) {
            return Ok(Backend::Remote(api));
        }
        Ok(Backend::Local(Box::new(Engine::open(
            Store::open_read_only(dir)?,
        )?)))
    }

    /// The running node's API, or a clear error.
    pub(crate) fn running(dir: &Path) -> Result<Api> {
        Api::find(dir).ok_or_else(|| {
            anyhow!(
                "no rapport node is running for {}: start one with `rapport node run` (same data directory)",
                dir.display()
            )
        })
    }

    /// The running node of `dir` as a backend, or a clear error.
    pub(crate) fn running_backend(dir: &Path) -> Result<Backend> {
        Ok(Backend::Remote(Self::running(dir)?))
    }

    /// The running node's API, if this backend is one.
    pub(crate) fn api(&self) -> Result<&Api> {
        match self {
            Backend::Remote(api) => Ok(api),
            Backend::Local(_) => Err(anyhow!("this needs a running node")),
        }
    }

    pub(crate) fn me(&self) -> Result<IdentityKey> {
        match self {
            Backend::Local(e) => Ok(e.me()),
            Backend::Remote(api) => {
                let v: Value = api.get("/v1/status")?;
                Ok(serde_json::from_value(v["identity"].clone())?)
            }
        }
    }

    pub(crate) fn name(&self) -> Result<String> {
        match self {
            Backend::Local(e) => Ok(e.profile().name.clone()),
            Backend::Remote(api) => {
                let v: Value = api.get("/v1/status")?;
                Ok(v["name"].as_str().unwrap_or_default().to_owned())
            }
        }
    }

    /// The peer `text` names: a petname, an invitation link (added as a contact if new) or
    /// an identity this node knows (or any identity, with `new_peer`).
    pub(crate) fn resolve(&mut self, text: &str, new_peer: bool) -> Result<ResolvedPeer> {
        match self {
            Backend::Local(e) => Ok(e.resolve_peer(text, new_peer, now())?),
            Backend::Remote(api) => api.post(
                "/v1/contacts/resolve",
                json!({"peer": text, "new_peer": new_peer}),
            ),
        }
    }

    /// The user's name for each peer that is a contact.
    pub(crate) fn petnames(&self) -> Result<Names> {
        Ok(Names(
            self.contacts()?
                .into_iter()
                .map(|c| (c.identity, (c.petname, Some(c.kind))))
                .collect(),
        ))
    }

    /// How the node names `peers` (see [`Names`]), this node itself as "you". Answered by
    /// the node's index, a few reads per peer: never a scan of every relationship.
    pub(crate) fn names_of(&self, peers: impl IntoIterator<Item = IdentityKey>) -> Result<Names> {
        let me = self.me()?;
        let mut wanted: Vec<IdentityKey> = peers.into_iter().filter(|p| *p != me).collect();
        wanted.sort();
        wanted.dedup();
        let mut names = Names::default();
        names.0.insert(me, ("you".into(), None));
        for chunk in wanted.chunks(rapport_node::MAX_NAMES) {
            let named: Vec<PeerName> = match self {
                Backend::Local(e) => e.names_of(chunk),
                Backend::Remote(api) => api.post("/v1/names", json!({ "peers": chunk }))?,
            };
            for n in named {
                if let Some(name) = n.name {
                    names.0.insert(n.identity, (name, n.kind));
                }
            }
        }
        Ok(names)
    }

    pub(crate) fn contacts(&self) -> Result<Vec<Contact>> {
        match self {
            Backend::Local(e) => Ok(e.contacts()),
            Backend::Remote(api) => api.get("/v1/contacts"),
        }
    }

    /// Adds a contact from its invitation; whether it is new.
    pub(crate) fn add_contact(
        &mut self,
        link: &str,
        name: Option<String>,
    ) -> Result<(Contact, bool)> {
        match self {
            Backend::Local(e) => Ok(e.add_contact(link, name, now())?),
            Backend::Remote(api) => {
                let v: Value = api.post("/v1/contacts", json!({"link": link, "name": name}))?;
                Ok((
                    serde_json::from_value(v["contact"].clone())?,
                    v["new"].as_bool().unwrap_or(false),
                ))
            }
        }
    }

    pub(crate) fn rename_contact(&mut self, who: &str, name: String) -> Result<Contact> {
        match self {
            Backend::Local(e) => Ok(e.rename_contact(who, name)?),
            Backend::Remote(api) => {
                api.post("/v1/contacts/rename", json!({"contact": who, "name": name}))
            }
        }
    }

    pub(crate) fn remove_contact(&mut self, who: &str) -> Result<Contact> {
        match self {
            Backend::Local(e) => Ok(e.remove_contact(who)?),
            Backend::Remote(api) => api.post("/v1/contacts/remove", json!({"contact": who})),
        }
    }

    pub(crate) fn grant(&mut self, a: GrantArgs) -> Result<WriteOutcome> {
        match self {
            Backend::Local(e) => Ok(e.grant(a, now())?.0),
            Backend::Remote(api) => api.post(
                "/v1/consent/grants",
                json!({
                    "grantee": a.grantee,
                    "scopes": a.scopes.iter().map(ToString::to_string).collect::<Vec<_>>(),
                    "purpose": a.purpose,
                    "expires": a.expires,
                    "terms": a.terms,
                    "legal_basis": a.legal_basis.map(rapport_protocol::LegalBasis::as_str),
                    "notice_sha256": a.notice_sha256,
                }),
            ),
        }
    }

    pub(crate) fn amend(
        &mut self,
        grant: &str,
        scopes: Option<Vec<Scope>>,
        expires: Option<UnixSeconds>,
    ) -> Result<WriteOutcome> {
        match self {
            Backend::Local(e) => Ok(e.amend(grant, scopes, expires, now())?.0),
            Backend::Remote(api) => api.post(
                &format!("/v1/consent/grants/{}/amend", path_seg(grant)?),
                json!({
                    "scopes": scopes.map(|s| s.iter().map(ToString::to_string).collect::<Vec<_>>()),
                    "expires": expires,
                }),
            ),
        }
    }

    pub(crate) fn revoke(&mut self, grant: &str, reason: Option<String>) -> Result<WriteOutcome> {
        match self {
            Backend::Local(e) => Ok(e.revoke(grant, reason, now())?.0),
            Backend::Remote(api) => api.post(
                &format!("/v1/consent/grants/{}/revoke", path_seg(grant)?),
                json!({ "reason": reason }),
            ),
        }
    }

    pub(crate) fn proffer(&mut self, grantee: IdentityKey, terms: &str) -> Result<WriteOutcome> {
        match self {
            Backend::Local(e) => Ok(e.proffer(grantee, terms, now())?.0),
            Backend::Remote(api) => api.post(
                "/v1/consent/proffer",
                json!({"grantee": grantee, "terms": terms}),
            ),
        }
    }

    pub(crate) fn accept(
        &mut self,
        grant: Option<&str>,
        customer: Option<IdentityKey>,
    ) -> Result<(Vec<GrantRow>, Deliveries)> {
        match self {
            Backend::Local(e) => Ok((e.accept(grant, customer, now())?.0, Deliveries::default())),
            Backend::Remote(api) => {
                let v: Value = api.post(
                    "/v1/consent/accept",
                    json!({"grant": grant, "customer": customer}),
                )?;
                Ok((
                    serde_json::from_value(v["accepted"].clone())?,
                    serde_json::from_value(v["deliveries"].clone())?,
                ))
            }
        }
    }

    pub(crate) fn ack_erasure(&mut self, grant: &str, erased: String) -> Result<WriteOutcome> {
        match self {
            Backend::Local(e) => Ok(e.ack_erasure(grant, erased, now())?.0),
            Backend::Remote(api) => api.post(
                &format!("/v1/consent/grants/{}/erasure", path_seg(grant)?),
                json!({ "erased": erased }),
            ),
        }
    }

    pub(crate) fn grants(&self) -> Result<Vec<GrantRow>> {
        match self {
            Backend::Local(e) => Ok(e.grants(now())),
            Backend::Remote(api) => api.get("/v1/consent"),
        }
    }

    pub(crate) fn export(&self, peer: &IdentityKey) -> Result<String> {
        match self {
            Backend::Local(e) => Ok(e.export_ledger(peer)?),
            Backend::Remote(api) => {
                let v: Value = api.get(&format!("/v1/consent/ledgers/{peer}"))?;
                Ok(serde_json::to_string_pretty(&v)?)
            }
        }
    }

    pub(crate) fn import(&mut self, bytes: &[u8]) -> Result<usize> {
        match self {
            Backend::Local(e) => Ok(e.import_ledger(bytes, now())?.0),
            Backend::Remote(api) => {
                let v: Value = api.post_bytes("/v1/consent/import", bytes)?;
                Ok(v["imported"].as_u64().unwrap_or(0) as usize)
            }
        }
    }

    pub(crate) fn ledger_files(&self) -> Result<Vec<String>> {
        match self {
            Backend::Local(e) => Ok(e.ledger_files()),
            Backend::Remote(api) => {
                let v: Vec<Value> = api.get("/v1/consent/ledgers")?;
                Ok(v.iter().map(ToString::to_string).collect())
            }
        }
    }

    pub(crate) fn refusals(&self, limit: usize) -> Result<Vec<Refusal>> {
        match self {
            Backend::Local(e) => Ok(e.refusals(limit)?),
            Backend::Remote(api) => api.get(&format!("/v1/refusals?limit={limit}")),
        }
    }

    pub(crate) fn relationships(&self) -> Result<Vec<RelSummary>> {
        match self {
            Backend::Local(e) => Ok(e.relationships()?),
            Backend::Remote(api) => api.get("/v1/relationships"),
        }
    }

    pub(crate) fn relationship(&self, id: &str) -> Result<RelDetail> {
        match self {
            Backend::Local(e) => Ok(e.relationship(id, now())?),
            Backend::Remote(api) => api.get(&format!("/v1/relationships/{}", path_seg(id)?)),
        }
    }

    pub(crate) fn inbox(&self, limit: usize) -> Result<Vec<MessageView>> {
        match self {
            Backend::Local(e) => Ok(e.inbox(limit)?),
            Backend::Remote(api) => api.get(&format!("/v1/inbox?limit={limit}")),
        }
    }
}

/// A grant or relationship id as a path segment: hex only, so nothing else reaches the URL.
fn path_seg(s: &str) -> Result<String> {
    let s = s.trim().to_ascii_lowercase();
    if s.is_empty() || s.len() > 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!(
            "{s:?} is not an id: give hex digits of an id shown by `rapport consent list` or `rapport rel list`"
        );
    }
    Ok(s)
}
