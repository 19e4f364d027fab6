//! `rapport node run` and the commands that talk to a running node.

use crate::out::{self, say, say_part};
use std::net::SocketAddr;
use std::path::Path;

use anyhow::{Result, anyhow, bail};
use rapport_node::{MessageView, NetConfig, Node, NodeConfig, PeerInfo, RelSummary, WriteOutcome};
use serde_json::{Value, json};

use crate::backend::{Api, Backend};
use crate::{RelCmd, parse_identity, show_time};

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
        wait_for_signal().await;
        say!("stopping…");
        node.shutdown().await;
        say!("stopped; every acknowledged change is on disk");
        Ok::<(), anyhow::Error>(())
    })
}

pub(crate) async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut term) = signal(SignalKind::terminate()) else {
            let _ = tokio::signal::ctrl_c().await;
            return;
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
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
                print_rels(&rels, &backend.me()?)?;
            }
        }
        RelCmd::Open {
            identity,
            addr,
            name,
            title,
        } => {
            let peer = parse_identity(&identity)?;
            let api = Backend::running(dir)?;
            let out: WriteOutcome = api.post(
                "/v1/relationships",
                json!({"peer": peer, "addr": addr, "name": name, "title": title}),
            )?;
            let what = format!("opened relationship {} with {peer}", out.doc);
            out::report(&what, &out, STORED, json)?;
        }
        RelCmd::Add {
            rel,
            identity,
            name,
        } => {
            let peer = parse_identity(&identity)?;
            let api = Backend::running(dir)?;
            let out: WriteOutcome = api.post(
                &format!("/v1/relationships/{}/members", seg(&rel)?),
                json!({"peer": peer, "name": name}),
            )?;
            let what = format!("added {peer} to relationship {}", out.doc.to_hex());
            out::report(&what, &out, STORED, json)?;
        }
        RelCmd::Remove { rel, identity } => {
            let peer = parse_identity(&identity)?;
            let api = Backend::running(dir)?;
            let out: WriteOutcome = api.post(
                &format!("/v1/relationships/{}/removals", seg(&rel)?),
                json!({"peer": peer}),
            )?;
            let what = format!(
                "removed {peer} from relationship {}; a new content-key epoch excludes it",
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
fn print_rels(rels: &[RelSummary], me: &rapport_protocol::IdentityKey) -> anyhow::Result<()> {
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
        let owner = (!r.mine).then(|| r.owner_name.clone());
        let members: Vec<String> = owner
            .into_iter()
            .chain(r.members.iter().filter(|m| m.identity != *me).map(|m| {
                if m.removed {
                    format!("{} (removed)", m.name)
                } else {
                    m.name.clone()
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
            members.join(", ").chars().take(28).collect::<String>(),
            r.message_count,
            r.last
                .as_ref()
                .map(|m| format!(
                    "{} {}: {}",
                    show_time(m.at),
                    m.by_name,
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

fn print_messages(msgs: &[MessageView]) -> anyhow::Result<()> {
    for m in msgs {
        say!(
            "{}  {:<16} {}{}",
            show_time(m.at),
            m.by_name.chars().take(16).collect::<String>(),
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
    let msgs = Backend::open_read_only(dir)?.inbox(limit)?;
    if json {
        say!("{}", serde_json::to_string_pretty(&msgs)?);
    } else if msgs.is_empty() {
        say!("inbox empty");
    } else {
        for m in &msgs {
            say_part!("{}  ", &m.rel.to_hex()[..8]);
            print_messages(std::slice::from_ref(m))?;
        }
    }
    Ok(())
}

pub(crate) fn thread(dir: &Path, rel: &str, json: bool) -> Result<()> {
    let d = Backend::open_read_only(dir)?.relationship(rel)?;
    if json {
        say!("{}", serde_json::to_string_pretty(&d)?);
        return Ok(());
    }
    say!(
        "relationship {}  {}",
        d.summary.id,
        d.summary.title.clone().unwrap_or_default()
    );
    say!("owner: {} ({})", d.summary.owner_name, d.summary.owner);
    for m in &d.summary.members {
        let access = d
            .access
            .get(&m.identity.to_string())
            .map(|a| format!("  [{a}]"))
            .unwrap_or_default();
        say!(
            "member: {} ({}){}{}",
            m.name,
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
    print_messages(&d.messages)?;
    Ok(())
}

pub(crate) fn peers(dir: &Path, json: bool) -> Result<()> {
    let peers: Vec<PeerInfo> = Backend::running(dir)?.get("/v1/peers")?;
    if json {
        say!("{}", serde_json::to_string_pretty(&peers)?);
        return Ok(());
    }
    if peers.is_empty() {
        say!("no peers known yet");
    }
    for p in peers {
        say!(
            "{} {}  {}{}",
            if p.connected {
                "connected"
            } else {
                "known    "
            },
            p.peer,
            p.addrs.first().cloned().unwrap_or_default(),
            p.rtt_ms
                .map(|r| format!("  rtt {r} ms"))
                .unwrap_or_default()
        );
    }
    Ok(())
}

pub(crate) fn connect(dir: &Path, addr: &str, json: bool) -> Result<()> {
    let api: Api = Backend::running(dir)?;
    let v: Value = api.post("/v1/peers", json!({"addr": addr}))?;
    if json {
        return out::json(&v);
    }
    say!("connected to {}", v["peer"].as_str().unwrap_or_default());
    Ok(())
}

pub(crate) fn refusals(dir: &Path, limit: usize, json: bool) -> Result<()> {
    let list = Backend::open_read_only(dir)?.refusals(limit)?;
    if json {
        say!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    if list.is_empty() {
        say!("nothing refused");
    }
    for r in list {
        say!(
            "{}  from {}  change {}  {}",
            show_time(r.at),
            r.peer.short(),
            r.change.chars().take(8).collect::<String>(),
            r.reason
        );
        for e in &r.entries {
            say!("    {}", e.chars().take(200).collect::<String>());
        }
    }
    Ok(())
}
