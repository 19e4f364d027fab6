//! `rapport node run` and the commands that talk to a running node.

use crate::out::{self, say, say_part};
use std::net::SocketAddr;
use std::path::Path;

use anyhow::{Result, anyhow, bail};
use rapport_node::{MessageView, NetConfig, Node, NodeConfig, PeerInfo, RelSummary, WriteOutcome};
use serde_json::{Value, json};

use crate::backend::{Api, Backend, Names};
use crate::{RelCmd, show_time};

fn multiaddrs(list: &[String], what: &str) -> Result<Vec<libp2p::Multiaddr>> {
    list.iter()
        .map(|a| {
            a.trim()
                .parse()
                .map_err(|e| anyhow!("{what} {a:?} is not a multiaddr: {e}"))
        })
        .collect()
}

/// Makes any panic stop the process at once, loudly. A panic is a bug; a node that went on
/// would hold a poisoned engine and sessions that never end. Everything acknowledged is in
/// the store, so a supervisor's restart resumes cleanly. Panics that Rapport contains on
/// purpose (a crafted change that makes Automerge panic while it is read, see
/// `rapport_protocol::in_guarded_section`) are refused changes, not crashes.
pub(crate) fn stop_on_panic() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if rapport_protocol::in_guarded_section() {
            return;
        }
        report(info);
        eprintln!("rapport: stopping at once after an internal error; restart it to resume");
        std::process::abort();
    }));
}

/// Runs the node in the foreground until Ctrl-C or SIGTERM.
pub(crate) fn run(
    dir: &Path,
    listen: Vec<String>,
    bootstrap: Vec<String>,
    mdns: bool,
    relay: Option<String>,
    api: SocketAddr,
    accept_grants: bool,
) -> Result<()> {
    if !api.ip().is_loopback() {
        bail!("the local API listens on loopback only; {api} is not a loopback address");
    }
    stop_on_panic();
    let listen = if listen.iter().any(|l| l == "none") {
        // Reachable only through the relay (a node behind NAT, or a test of one).
        Vec::new()
    } else if listen.is_empty() {
        vec![
            "/ip4/0.0.0.0/tcp/0".to_string(),
            "/ip4/0.0.0.0/udp/0/quic-v1".to_string(),
        ]
    } else {
        listen
    };
    let config = NodeConfig {
        data_dir: dir.to_path_buf(),
        net: NetConfig {
            listen: multiaddrs(&listen, "--listen")?,
            bootstrap: multiaddrs(&bootstrap, "--bootstrap")?,
            mdns,
            relay: relay
                .map(|r| multiaddrs(&[r], "--relay").map(|mut v| v.remove(0)))
                .transpose()?,
            redial_every: rapport_node::REDIAL_EVERY,
        },
        api: Some(api),
        auto_accept: accept_grants,
    };
    let rt = crate::runtime("warn")?;
    rt.block_on(async {
        let stop = StopSignal::install();
        let node = Node::start(config).await?;
        say!("rapport node {} running", node.identity());
        for a in node.listening().await {
            say!("listening: {a}");
        }
        if let Some(a) = node.api_addr() {
            say!(
                "api: http://{a}  (token in {})",
                dir.join(rapport_node::TOKEN_FILE).display()
            );
        }
        say!("stop with Ctrl-C");
        stop.wait().await;
        say!("stopping…");
        node.shutdown().await;
        say!("stopped; every acknowledged change is on disk");
        Ok::<(), anyhow::Error>(())
    })
}

/// Ctrl-C or SIGTERM, listened for from the moment this is made: a stop asked for while
/// the node is still starting is kept, and the node then stops cleanly once started,
/// instead of the process dying of the signal.
pub(crate) struct StopSignal {
    #[cfg(unix)]
    term: Option<tokio::signal::unix::Signal>,
    ctrl_c: std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<()>> + Send>>,
}

impl StopSignal {
    /// Starts listening (inside a tokio runtime).
    pub(crate) fn install() -> Self {
        let mut ctrl_c = Box::pin(tokio::signal::ctrl_c());
        // Polled once here, so its handler is registered now.
        let waker = futures::task::noop_waker();
        let _ = ctrl_c
            .as_mut()
            .poll(&mut std::task::Context::from_waker(&waker));
        Self {
            #[cfg(unix)]
            term: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok(),
            ctrl_c,
        }
    }

    /// Waits for the signal.
    pub(crate) async fn wait(mut self) {
        #[cfg(unix)]
        if let Some(term) = self.term.as_mut() {
            tokio::select! {
                _ = &mut self.ctrl_c => {}
                _ = term.recv() => {}
            }
            return;
        }
        let _ = self.ctrl_c.await;
    }
}

/// Where a write is when it went to no peer now.
const STORED: &str = "stored here";

pub(crate) fn rel(dir: &Path, cmd: RelCmd, json: bool) -> Result<()> {
    match cmd {
        RelCmd::List => {
            let backend = Backend::open_read_only(dir)?;
            let rels = backend.relationships()?;
            if json {
                say!("{}", serde_json::to_string_pretty(&rels)?);
            } else {
                print_rels(&rels, &backend.me()?, &backend.petnames()?)?;
            }
        }
        RelCmd::Open {
            identity,
            new_peer,
            addr,
            name,
            title,
        } => {
            let mut node = Backend::running_backend(dir)?;
            let (peer, who) = crate::peer(&mut node, &identity, new_peer)?;
            let out: WriteOutcome = node.api()?.post(
                "/v1/relationships",
                json!({"peer": peer, "addr": addr, "name": name, "title": title}),
            )?;
            let what = format!("opened relationship {} with {who}", out.doc);
            out::report(&what, &out, STORED, json)?;
        }
        RelCmd::Add {
            rel,
            identity,
            new_peer,
            name,
        } => {
            let rel = seg(&rel)?;
            let mut node = Backend::running_backend(dir)?;
            let (peer, who) = crate::peer(&mut node, &identity, new_peer)?;
            let out: WriteOutcome = node.api()?.post(
                &format!("/v1/relationships/{rel}/members"),
                json!({"peer": peer, "name": name}),
            )?;
            let what = format!("added {who} to relationship {}", out.doc.to_hex());
            out::report(&what, &out, STORED, json)?;
        }
        RelCmd::Remove { rel, identity } => {
            let rel = seg(&rel)?;
            let mut node = Backend::running_backend(dir)?;
            let (peer, who) = crate::peer(&mut node, &identity, true)?;
            let out: WriteOutcome = node.api()?.post(
                &format!("/v1/relationships/{rel}/removals"),
                json!({"peer": peer}),
            )?;
            let what = format!(
                "removed {who} from relationship {}; a new content-key epoch excludes them",
                out.doc.to_hex()
            );
            out::report(&what, &out, STORED, json)?;
        }
        RelCmd::Disclose { rel, field, value } => {
            let api = Backend::running(dir)?;
            let out: WriteOutcome = api.post(
                &format!("/v1/relationships/{}/profile", seg(&rel)?),
                json!({"field": field, "value": value}),
            )?;
            let what = format!("disclosed {field} in relationship {}", out.doc.to_hex());
            out::report(&what, &out, STORED, json)?;
        }
    }
    Ok(())
}

fn seg(s: &str) -> Result<String> {
    let s = s.trim().to_ascii_lowercase();
    if s.len() < 4 || s.len() > 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!(
            "{s:?} is not a relationship id: give at least 4 hex digits of an id from `rapport rel list`"
        );
    }
    Ok(s)
}

/// The relationships as a table: for each, the others in it (`with`): the members for
/// its owner; the owner and the other members for a member.
fn print_rels(
    rels: &[RelSummary],
    me: &rapport_protocol::IdentityKey,
    names: &Names,
) -> anyhow::Result<()> {
    if rels.is_empty() {
        say!("no relationships yet");
        return Ok(());
    }
    say!(
        "{:<10} {:<6} {:<24} {:<28} {:>4}  last",
        "rel",
        "role",
        "title",
        "with",
        "msgs"
    );
    for r in rels {
        // In a relationship another owns, its names are the owner's (and the owner's own
        // name is what it calls itself): quoted, unless the peer is one of your contacts.
        let given = |name: &str| {
            if r.mine {
                name.to_owned()
            } else {
                format!("{name:?}")
            }
        };
        let owner = (!r.mine).then(|| names.or(&r.owner, &given(&r.owner_name)));
        let members: Vec<String> = owner
            .into_iter()
            .chain(r.members.iter().filter(|m| m.identity != *me).map(|m| {
                let name = names.or(&m.identity, &given(&m.name));
                if m.removed {
                    format!("{name} (removed)")
                } else {
                    name
                }
            }))
            .collect();
        say!(
            "{:<10} {:<6} {:<24} {:<28} {:>4}  {}",
            &r.id.to_hex()[..8],
            if r.mine { "owner" } else { "member" },
            r.title
                .clone()
                .unwrap_or_default()
                .chars()
                .take(24)
                .collect::<String>(),
            members
                .join(", ")
                .chars()
                .take(if out::verbose() { 200 } else { 28 })
                .collect::<String>(),
            r.message_count,
            r.last
                .as_ref()
                .map(|m| format!(
                    "{} {}: {}",
                    show_time(m.at),
                    names.or(&m.by, &m.by_name),
                    m.text.chars().take(40).collect::<String>()
                ))
                .unwrap_or_default()
        );
    }
    Ok(())
}

pub(crate) fn send(
    dir: &Path,
    rel: &str,
    text: &str,
    purpose: Option<String>,
    json: bool,
) -> Result<()> {
    let api = Backend::running(dir)?;
    let out: WriteOutcome = api.post(
        &format!("/v1/relationships/{}/messages", seg(rel)?),
        json!({"text": text, "purpose": purpose}),
    )?;
    let what = format!(
        "message {} in relationship {}",
        out.entry.map(|e| e.short()).unwrap_or_default(),
        &out.doc.to_hex()[..8]
    );
    out::report(&what, &out, STORED, json)?;
    Ok(())
}

fn print_messages(msgs: &[MessageView], names: &Names) -> anyhow::Result<()> {
    for m in msgs {
        say!(
            "{}  {:<16} {}{}",
            show_time(m.at),
            names
                .or(&m.by, &m.by_name)
                .chars()
                .take(if out::verbose() { 80 } else { 16 })
                .collect::<String>(),
            m.purpose
                .as_ref()
                .map(|p| format!("[{p}] "))
                .unwrap_or_default(),
            m.text
        );
    }
    Ok(())
}

pub(crate) fn inbox(dir: &Path, limit: usize, json: bool) -> Result<()> {
    let node = Backend::open_read_only(dir)?;
    let msgs = node.inbox(limit)?;
    let names = node.petnames()?;
    if json {
        say!("{}", serde_json::to_string_pretty(&msgs)?);
    } else if msgs.is_empty() {
        say!("inbox empty");
    } else {
        for m in &msgs {
            say_part!("{}  ", &m.rel.to_hex()[..8]);
            print_messages(std::slice::from_ref(m), &names)?;
        }
    }
    Ok(())
}

pub(crate) fn thread(dir: &Path, rel: &str, json: bool) -> Result<()> {
    let node = Backend::open_read_only(dir)?;
    let d = node.relationship(rel)?;
    let names = node.petnames()?;
    if json {
        say!("{}", serde_json::to_string_pretty(&d)?);
        return Ok(());
    }
    say!(
        "relationship {}  {}",
        d.summary.id,
        d.summary.title.clone().unwrap_or_default()
    );
    say!(
        "owner: {} ({})",
        names.plain_or(&d.summary.owner, &d.summary.owner_name),
        d.summary.owner
    );
    for m in &d.summary.members {
        let access = d
            .access
            .get(&m.identity.to_string())
            .map(|a| format!("  [{a}]"))
            .unwrap_or_default();
        say!(
            "member: {} ({}){}{}",
            names.plain_or(&m.identity, &m.name),
            m.identity,
            if m.removed { " removed" } else { "" },
            if access == "  []" {
                String::new()
            } else {
                access
            }
        );
    }
    for (f, v) in &d.profile {
        say!("profile: {f} = {v}");
    }
    say!();
    if d.messages.is_empty() {
        say!("no messages yet");
    }
    print_messages(&d.messages, &names)?;
    Ok(())
}

pub(crate) fn peers(dir: &Path, json: bool) -> Result<()> {
    let node = Backend::running_backend(dir)?;
    let peers: Vec<PeerInfo> = node.api()?.get("/v1/peers")?;
    if json {
        say!("{}", serde_json::to_string_pretty(&peers)?);
        return Ok(());
    }
    // The relay first: when it turns this node away, that is why no one else is here.
    let status: Value = node.api()?.get("/v1/status")?;
    if let Ok(Some(relay)) =
        serde_json::from_value::<Option<rapport_node::RelayStatus>>(status["relay"].clone())
    {
        match (&relay.problem, relay.reserved) {
            (None, true) => say!("relay     {}  circuit reserved", relay.addr),
            (Some(p), _) => say!("relay     {}  {p}", relay.addr),
            (None, false) => say!("relay     {}  connecting", relay.addr),
        }
    }
    if peers.is_empty() {
        say!("no peers known yet");
    }
    let names = node.names_of(peers.iter().filter_map(|p| p.peer.parse().ok()))?;
    for p in peers {
        say!(
            "{} {}  {}{}",
            if p.connected {
                "connected"
            } else {
                "known    "
            },
            p.peer
                .parse()
                .map_or_else(|_| p.peer.clone(), |id| names.with_kind(&id)),
            p.addrs.first().cloned().unwrap_or_default(),
            p.rtt_ms
                .map(|r| format!("  rtt {r} ms"))
                .unwrap_or_default()
        );
    }
    Ok(())
}

/// Connects to an address, or to a contact (named, or by its invitation) at the addresses
/// its invitation carried, first reachable first.
pub(crate) fn connect(dir: &Path, addr: &str, json: bool) -> Result<()> {
    let mut node = Backend::running_backend(dir)?;
    let addrs = if addr.trim_start().starts_with('/') {
        vec![addr.to_owned()]
    } else {
        let r = node.resolve(addr, false)?;
        if r.addrs.is_empty() {
            bail!(
                "{} gave no address in their invitation: ask them for a new one while their node runs, or connect to an address",
                r.petname.as_deref().unwrap_or(addr)
            );
        }
        r.addrs
    };
    let api: &Api = node.api()?;
    let mut failed = Vec::new();
    for a in &addrs {
        match api.post::<Value>("/v1/peers", json!({"addr": a})) {
            Ok(v) => {
                if json {
                    return out::json(&v);
                }
                let who = v["peer"].as_str().and_then(|p| p.parse().ok()).map_or_else(
                    String::new,
                    |id| {
                        node.names_of([id])
                            .map_or_else(|_| id.to_string(), |n| n.with_kind(&id))
                    },
                );
                say!("connected to {who} at {a}");
                return Ok(());
            }
            Err(e) => failed.push(format!("{a}: {e}")),
        }
    }
    bail!("could not connect: {}", failed.join("; "))
}

pub(crate) fn refusals(dir: &Path, limit: usize, json: bool) -> Result<()> {
    let node = Backend::open_read_only(dir)?;
    let list = node.refusals(limit)?;
    if json {
        say!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    if list.is_empty() {
        say!("nothing refused");
    }
    let names = node.names_of(list.iter().map(|r| r.peer))?;
    for r in list {
        say!(
            "{}  from {}  change {}  {}",
            show_time(r.at),
            names.with_kind(&r.peer),
            r.change.chars().take(8).collect::<String>(),
            r.reason
        );
        for e in &r.entries {
            say!("    {}", e.chars().take(200).collect::<String>());
        }
    }
    Ok(())
}
