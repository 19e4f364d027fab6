//! `rapport bench sync`: two real nodes on loopback sync relationships from cold, and the
//! same changes are applied by plain Automerge in memory, in the same run, for comparison.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use rapport_node::{Node, NodeConfig, Store};
use rapport_protocol::automerge::Automerge;
use rapport_protocol::wire::DocRef;
use rapport_protocol::{
    ConsentDoc, ConsentHeader, DocId, EntryBody, Kind, LegalBasis, RelBody, RelHeader,
    RelationshipDoc, SecretKey, SignedChange, Terms,
};

/// Benchmarks.
#[derive(Subcommand)]
pub(crate) enum BenchCmd {
    /// Cold sync between two nodes over loopback TCP, against plain Automerge in memory.
    Sync {
        /// Relationship sizes to sync, one run each (messages per relationship).
        #[arg(long, value_delimiter = ',', default_values_t = [1_000usize, 10_000, 100_000])]
        messages: Vec<usize>,
        /// Then many relationships at once: how many …
        #[arg(long, default_value_t = 1_000)]
        rels: usize,
        /// … of how many messages each.
        #[arg(long, default_value_t = 20)]
        per_rel: usize,
    },
    /// Messages through a relay's circuit and through its mailbox against direct, in the
    /// same run; and the cost of a content-key rotation.
    Relay {
        /// Messages the company sends in each case.
        #[arg(long, default_value_t = 2_000)]
        messages: usize,
        /// Relationship sizes (members) to rotate the key of.
        #[arg(long, value_delimiter = ',', default_values_t = [10usize, 1_000])]
        members: Vec<usize>,
    },
}

pub(crate) fn run(cmd: BenchCmd) -> Result<()> {
    let (messages, rels, per_rel) = match cmd {
        BenchCmd::Sync {
            messages,
            rels,
            per_rel,
        } => (messages, rels, per_rel),
        BenchCmd::Relay { messages, members } => {
            return crate::bench_relay::run(messages, &members);
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    println!("rapport bench sync: two nodes on 127.0.0.1 (TCP, Noise, Yamux), cold stores");
    println!(
        "{:<16} {:>9} {:>10} {:>12} {:>11} {:>7} {:>11} {:>11} {:>6}",
        "case",
        "changes",
        "sync s",
        "changes/s",
        "automerge s",
        "ratio",
        "wire B/chg",
        "own B/chg",
        "ratio"
    );
    for n in messages {
        rt.block_on(case(&format!("1 rel x {n}"), 1, n))?;
    }
    if rels > 0 {
        rt.block_on(case(&format!("{rels} rels x {per_rel}"), rels, per_rel))?;
    }
    println!("\nsync s: from dialling until the company's node holds every change, verified and");
    println!("durable. automerge s: Automerge::apply_changes of the same changes in memory, one");
    println!("call per document. Targets: time ratio <= 3, wire ratio <= 2.");
    Ok(())
}

pub(crate) fn key_of(dir: &Path) -> Result<SecretKey> {
    Ok(Store::open(dir)?.secret_key()?)
}

/// A customer's and a company's stores under `root`, with a grant the company accepted
/// (`conversation:read`, `conversation:write`, `contact:support`) in both.
pub(crate) struct Pair {
    pub(crate) cdir: std::path::PathBuf,
    pub(crate) gdir: std::path::PathBuf,
    pub(crate) ck: SecretKey,
    pub(crate) gk: SecretKey,
    pub(crate) t0: u64,
}

impl Pair {
    /// A relationship owned by `ck` with `gk` as member: its title and membership.
    pub(crate) fn open(
        ck: &SecretKey,
        gk: &SecretKey,
        nonce: [u8; 16],
        t0: u64,
        title: String,
    ) -> Result<RelationshipDoc> {
        let mut doc = RelationshipDoc::new(RelHeader {
            owner: ck.identity(),
            nonce,
        });
        doc.append(ck, [1; 16], t0, RelBody::Title { title })?;
        doc.append(
            ck,
            [1; 16],
            t0,
            RelBody::Member {
                member: gk.identity(),
                name: "Company".into(),
            },
        )?;
        Ok(doc)
    }
}

pub(crate) fn pair(root: &Path) -> Result<Pair> {
    let (cdir, gdir) = (root.join("customer"), root.join("company"));
    Store::create(&cdir, Kind::Person, "Customer", rapport_node::now())?;
    Store::create(&gdir, Kind::Org, "Company", rapport_node::now())?;
    let (ck, gk) = (key_of(&cdir)?, key_of(&gdir)?);
    let t0 = rapport_node::now() - 10;
    let h = ConsentHeader {
        customer: ck.identity(),
        grantee: gk.identity(),
    };
    let mut consent = ConsentDoc::new(h)?;
    let terms = Terms::by_id("SD-BASE").expect("roster").reference();
    let (grant, _) = consent.append(
        &ck,
        [1; 16],
        t0,
        EntryBody::Grant {
            scopes: ["conversation:read", "conversation:write", "contact:support"]
                .iter()
                .map(|s| s.parse().expect("scope"))
                .collect(),
            purpose: "benchmark".into(),
            legal_basis: LegalBasis::Consent,
            notice_sha256: "00".repeat(32),
            terms: terms.clone(),
            expires: None,
        },
    )?;
    consent.append(&gk, [2; 16], t0, EntryBody::Accept { grant, terms })?;
    for dir in [&cdir, &gdir] {
        Store::open(dir)?.put_consent_changes(&h, consent.ledger().changes())?;
    }
    Ok(Pair {
        cdir,
        gdir,
        ck,
        gk,
        t0,
    })
}

/// Builds both stores, then measures one cold sync.
async fn case(label: &str, rels: usize, per_rel: usize) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let Pair {
        cdir,
        gdir,
        ck,
        gk,
        t0,
    } = pair(tmp.path())?;

    // Relationships, written in memory and stored in one transaction each.
    let store = Store::open(&cdir)?;
    let mut ids: Vec<DocId> = Vec::new();
    let mut all: Vec<Vec<SignedChange>> = Vec::new();
    for r in 0..rels {
        let mut nonce = [0u8; 16];
        nonce[..8].copy_from_slice(&(r as u64).to_be_bytes());
        let mut doc = Pair::open(&ck, &gk, nonce, t0, format!("relationship {r}"))?;
        let header = *doc.header();
        for i in 0..per_rel {
            // Customer and company take turns, as in a conversation.
            let (key, nonce, purpose) = if i % 2 == 0 {
                (&ck, [1; 16], None)
            } else {
                (&gk, [2; 16], Some("support".to_string()))
            };
            doc.append(
                key,
                nonce,
                t0 + i as u64,
                RelBody::Message {
                    thread: None,
                    text: format!("message {i}: where is my order? it was due on Tuesday"),
                    purpose,
                },
            )?;
        }
        store.put_changes(&DocRef::Relationship(header), doc.changes())?;
        ids.push(doc.id());
        all.push(doc.changes().to_vec());
    }
    drop(store);
    let total: usize = all.iter().map(Vec::len).sum();
    let own_bytes: usize = all.iter().flatten().map(|c| c.encode().len()).sum();

    // Plain Automerge, in memory, the same changes.
    let raw: Vec<Vec<rapport_protocol::automerge::Change>> = all
        .iter()
        .map(|cs| cs.iter().map(|c| c.change().clone()).collect())
        .collect();
    let start = Instant::now();
    for cs in raw {
        let mut doc = Automerge::new();
        doc.apply_changes(cs)?;
    }
    let automerge = start.elapsed();

    let customer = Node::start(NodeConfig::loopback(&cdir)).await?;
    let company = Node::start(NodeConfig::loopback(&gdir)).await?;
    let addr = customer
        .listening()
        .await
        .into_iter()
        .next()
        .context("no address")?;
    let h2 = company.handle();
    let start = Instant::now();
    h2.net()
        .dial(addr)
        .await
        .map_err(|e| anyhow::anyhow!("dial: {e}"))?;
    let deadline = start + Duration::from_secs(1800);
    let want: Vec<(DocId, usize)> = ids.iter().copied().zip(all.iter().map(Vec::len)).collect();
    loop {
        let want = want.clone();
        let done = h2
            .read(move |e| want.iter().all(|(id, n)| e.change_count(id) == Some(*n)))
            .await;
        if done {
            break;
        }
        if Instant::now() > deadline {
            bail!("{label}: the sync did not finish in 30 minutes");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let synced = start.elapsed();
    let stats = h2.net().stats();
    let wire = stats.sent.load(Ordering::Relaxed) + stats.received.load(Ordering::Relaxed);
    customer.shutdown().await;
    company.shutdown().await;
    println!(
        "{:<16} {:>9} {:>10.3} {:>12.0} {:>11.3} {:>7.2} {:>11.1} {:>11.1} {:>6.2}",
        label,
        total,
        synced.as_secs_f64(),
        total as f64 / synced.as_secs_f64(),
        automerge.as_secs_f64(),
        synced.as_secs_f64() / automerge.as_secs_f64(),
        wire as f64 / total as f64,
        own_bytes as f64 / total as f64,
        wire as f64 / own_bytes as f64
    );
    Ok(())
}
