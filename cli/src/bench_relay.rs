//! `rapport bench relay`: the same batch of messages from a company to a customer, directly,
//! through a relay's circuit, and through a relay's mailbox, in one run; then the cost of a
//! content-key rotation. With `--json` the figures are printed as one JSON object on stdout.

use crate::out::say;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use libp2p::Multiaddr;
use rapport_node::relay::{Quotas, Relay, RelayConfig};
use rapport_node::{Node, NodeConfig, Store, SyncResult};
use rapport_protocol::seal::{ContentKey, seal_epoch};
use rapport_protocol::wire::DocRef;
use rapport_protocol::{
    DocId, EpochView, IdentityKey, RelBody, RelHeader, RelationshipDoc, SecretKey,
};

use crate::bench::key_of;

pub(crate) fn run(messages: usize, members: &[usize], json: bool) -> Result<()> {
    let rt = crate::runtime("off")?;
    if !json {
        say!(
            "rapport bench relay: {messages} messages from a company to a customer on 127.0.0.1, encrypted mail"
        );
        say!(
            "{:<10} {:>10} {:>12} {:>14}",
            "path",
            "seconds",
            "messages/s",
            "vs direct"
        );
    }
    let direct = rt.block_on(case(Path::new("direct"), messages))?;
    let relayed = rt.block_on(case(Path::new("relayed"), messages))?;
    let mailbox = rt.block_on(case(Path::new("mailbox"), messages))?;
    let paths = [
        ("direct", direct),
        ("relayed", relayed),
        ("mailbox", mailbox),
    ];
    let rotations: Vec<(usize, f64, f64)> = members
        .iter()
        .map(|&n| rotation(n).map(|(seal, entry)| (n, seal, entry)))
        .collect::<Result<_>>()?;
    if json {
        let paths: Vec<serde_json::Value> = paths
            .iter()
            .map(|&(name, t)| {
                serde_json::json!({
                    "path": name,
                    "messages": messages,
                    "s": t,
                    "messages_per_s": messages as f64 / t,
                    "vs_direct": direct / t,
                })
            })
            .collect();
        let rotations: Vec<serde_json::Value> = rotations
            .iter()
            .map(|&(n, seal, entry)| {
                serde_json::json!({
                    "members": n,
                    "seal_ms": seal * 1e3,
                    "seal_entry_ms": entry * 1e3,
                })
            })
            .collect();
        say!(
            "{}",
            serde_json::json!({
                "bench": "relay",
                "messages": messages,
                "paths": paths,
                "rotations": rotations,
            })
        );
        return Ok(());
    }
    for (name, t) in paths {
        say!(
            "{:<10} {:>10.3} {:>12.0} {:>14.2}",
            name,
            t,
            messages as f64 / t,
            direct / t
        );
    }
    say!("\nseconds: from the company's node starting until the customer's node holds every");
    say!("message, verified and durable (mailbox: the company seals and deposits, leaves, then");
    say!("the customer comes online and drains). Target: relayed >= 0.5 of direct.\n");

    say!("key rotation (on one thread, so wall time bounds its CPU time; median of 9)");
    say!(
        "{:<10} {:>14} {:>20}",
        "members",
        "seal ms",
        "seal + signed entry ms"
    );
    for (n, seal, entry) in rotations {
        say!("{:<10} {:>14.2} {:>20.2}", n, seal * 1e3, entry * 1e3);
    }
    say!("\nseal: the new key sealed to every member (X25519 + XChaCha20-Poly1305 each). seal +");
    say!("signed entry: also the epoch entry written, signed and applied to the document, as");
    say!(
        "the owner's node does it (its one durable commit not counted). Target: < 100 ms at 1,000."
    );
    Ok(())
}

/// The cost of sealing a new epoch key to `n` members, and of writing its entry.
fn rotation(n: usize) -> Result<(f64, f64)> {
    let owner = SecretKey::from_seed([1; 32]);
    let header = RelHeader {
        owner: owner.identity(),
        nonce: [3; 16],
    };
    let mut doc = RelationshipDoc::new(header);
    let mut ids: Vec<IdentityKey> = vec![owner.identity()];
    for i in 0..n {
        let mut seed = [7u8; 32];
        seed[..8].copy_from_slice(&(i as u64).to_be_bytes());
        let m = SecretKey::from_seed(seed).identity();
        doc.append(
            &owner,
            [1; 16],
            1,
            RelBody::Member {
                member: m,
                name: format!("member {i}"),
            },
        )?;
        ids.push(m);
    }
    let mut seals = Vec::new();
    let mut entries = Vec::new();
    for round in 0..9u32 {
        let key = ContentKey::from_bytes([round as u8; 32]);
        let w0 = Instant::now();
        let sealed = seal_epoch(&doc.id(), round, &key, [round as u8 + 9; 32], &ids);
        let w1 = Instant::now();
        doc.append(&owner, [1; 16], 2, EpochView::body(round, &sealed))?;
        let w2 = Instant::now();
        seals.push((w1 - w0).as_secs_f64());
        entries.push((w2 - w0).as_secs_f64());
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Ok((median(seals), median(entries)))
}

/// Stores for a customer and a company that share a relationship (epoch 0 sealed to both);
/// the company holds `messages` more messages the customer lacks. Returns the directories
/// and the relationship.
fn build(root: &Path, messages: usize) -> Result<(std::path::PathBuf, std::path::PathBuf, DocRef)> {
    let crate::bench::Pair {
        cdir,
        gdir,
        ck,
        gk,
        t0,
    } = crate::bench::pair(root)?;
    let mut doc = crate::bench::Pair::open(&ck, &gk, [5; 16], t0, "benchmark".into())?;
    let header = *doc.header();
    let sealed = seal_epoch(
        &doc.id(),
        0,
        &ContentKey::from_bytes(random()?),
        random()?,
        &[ck.identity(), gk.identity()],
    );
    doc.append(&ck, [1; 16], t0, EpochView::body(0, &sealed))?;
    let shared = doc.changes().to_vec();
    let heads = doc.heads();
    for i in 0..messages {
        doc.append(
            &gk,
            [2; 16],
            t0 + i as u64,
            RelBody::Message {
                thread: None,
                text: format!("message {i}: your parcel left our warehouse this morning"),
                purpose: Some("support".into()),
            },
        )?;
    }
    let d = DocRef::Relationship(header);
    let cs = Store::open(&cdir)?;
    cs.put_changes(&d, &shared)?;
    drop(cs);
    let gs = Store::open(&gdir)?;
    gs.put_changes(&d, doc.changes())?;
    // They synced before: the company knows what the customer holds.
    gs.put_peer_heads(&doc.id(), &ck.identity(), &heads)?;
    drop(gs);
    Ok((cdir, gdir, d))
}

fn random() -> Result<[u8; 32]> {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).map_err(|e| anyhow!("OS random source: {e}"))?;
    Ok(b)
}

fn node_config(dir: &Path, relay: Option<&Multiaddr>) -> NodeConfig {
    let mut c = NodeConfig::loopback(dir);
    if let Some(r) = relay {
        // Reachable only through the relay.
        c.net.listen.clear();
        c.net.relay = Some(r.clone());
    }
    c
}

async fn reserved(node: &Node) -> Result<()> {
    match node.circuit_address(Duration::from_secs(30)).await {
        Some(_) => Ok(()),
        None => bail!("no circuit reserved at the relay within 30s"),
    }
}

async fn holds_all(node: &Node, id: DocId, want: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(600);
    let h = node.handle();
    while h.read(move |e| e.change_count(&id)).await != Some(want) {
        if Instant::now() > deadline {
            bail!("the customer did not receive every message within 10 minutes");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// One path; returns seconds.
async fn case(path: &Path, messages: usize) -> Result<f64> {
    let tmp = tempfile::tempdir()?;
    let (cdir, gdir, d) = build(tmp.path(), messages)?;
    let id = d.doc_id();
    let want = messages + 3;
    let customer_id = key_of(&cdir)?.identity();
    let mode = path.to_str().unwrap_or("direct");
    let relay = if mode == "direct" {
        None
    } else {
        Some(
            Relay::start(RelayConfig {
                data_dir: tmp.path().join("relay"),
                listen: vec!["/ip4/127.0.0.1/tcp/0".parse()?],
                open: true,
                quotas: Quotas::default(),
            })
            .await
            .map_err(|e| anyhow!(e))?,
        )
    };
    let raddr = relay.as_ref().map(|r| r.addrs()[0].clone());
    let secs = match mode {
        "direct" | "relayed" => {
            let customer = Node::start(node_config(&cdir, raddr.as_ref())).await?;
            if raddr.is_some() {
                reserved(&customer).await?;
            }
            let start = Instant::now();
            let company = Node::start(node_config(&gdir, raddr.as_ref())).await?;
            if let Some(a) = customer
                .listening()
                .await
                .first()
                .filter(|_| raddr.is_none())
            {
                company
                    .handle()
                    .net()
                    .dial(a.clone())
                    .await
                    .map_err(|e| anyhow!("dial: {e}"))?;
            }
            let net = company.handle().net().clone();
            tokio::spawn(async move { net.sync(customer_id, d, Duration::from_secs(600)).await });
            holds_all(&customer, id, want).await?;
            let t = start.elapsed().as_secs_f64();
            company.shutdown().await;
            customer.shutdown().await;
            t
        }
        _ => {
            let start = Instant::now();
            let company = Node::start(node_config(&gdir, raddr.as_ref())).await?;
            reserved(&company).await?;
            match company
                .handle()
                .net()
                .sync(customer_id, d, Duration::from_secs(600))
                .await
            {
                SyncResult::Deposited(_) => {}
                other => bail!("the company's mail was not deposited: {other:?}"),
            }
            company.shutdown().await;
            let customer = Node::start(node_config(&cdir, raddr.as_ref())).await?;
            holds_all(&customer, id, want).await?;
            let t = start.elapsed().as_secs_f64();
            customer.shutdown().await;
            t
        }
    };
    if let Some(r) = relay {
        r.shutdown().await;
    }
    Ok(secs)
}
