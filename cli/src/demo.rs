//! `rapport demo`: a community relay, a customer and two companies as real nodes in this
//! process, on loopback, with temporary stores, syncing consent and conversations over
//! libp2p, and mail through the relay. Each step is
//! checked; the demo exits non-zero if any does not hold.

use crate::out::say;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use libp2p::Multiaddr;
use rapport_node::relay::{Quotas, Relay, RelayConfig};
use rapport_node::{
    Deliveries, GrantArgs, Node, NodeConfig, NodeHandle, RelayStore, Store, SyncResult, now,
};
use rapport_protocol::wire::DocRef;
use rapport_protocol::{ConsentHeader, IdentityKey, Kind, Ledger, read_ledger_file};

const WAIT: Duration = Duration::from_secs(10);

/// `addr` without its trailing `/p2p/<id>`.
fn strip_p2p(addr: &Multiaddr) -> Multiaddr {
    addr.iter()
        .filter(|p| !matches!(p, libp2p::multiaddr::Protocol::P2p(_)))
        .collect()
}

fn step(n: u32, text: &str) -> anyhow::Result<()> {
    say!("\n── {n}. {text}");
    Ok(())
}

async fn start(dir: &std::path::Path, kind: Kind, name: &str, relay: &Multiaddr) -> Result<Node> {
    Store::create(dir, kind, name, now())?;
    run_node(dir, relay).await
}

/// A node on loopback that also uses the community relay.
async fn run_node(dir: &std::path::Path, relay: &Multiaddr) -> Result<Node> {
    let mut config = NodeConfig::loopback(dir);
    config.net.relay = Some(relay.clone());
    let node = Node::start(config).await?;
    if node.circuit_address(WAIT).await.is_none() {
        bail!("step failed: no circuit reserved at the relay");
    }
    Ok(node)
}

/// Polls `check` until it holds or 10 seconds pass.
async fn until<F, Fut>(what: &str, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + WAIT;
    while !check().await {
        if Instant::now() > deadline {
            bail!(
                "step failed: {what} did not happen within {}s",
                WAIT.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

async fn grant_status(h: &NodeHandle, grant: &str) -> (String, bool) {
    let g = grant.to_owned();
    h.read(move |e| {
        e.grants(now())
            .into_iter()
            .find(|r| r.grant.to_hex() == g)
            .map(|r| (r.status, r.erasure_acked_at.is_some()))
            .unwrap_or_default()
    })
    .await
}

async fn grant(
    h: &NodeHandle,
    to: IdentityKey,
    name: &str,
    scopes: &[&str],
    purpose: &str,
) -> Result<String> {
    let args = GrantArgs {
        grantee: to,
        scopes: scopes.iter().map(|s| s.parse().expect("scope")).collect(),
        purpose: purpose.into(),
        expires: Some(now() + 365 * 86_400),
        terms: Some("SD-BASE".into()),
        legal_basis: None,
        notice_sha256: None,
    };
    let (out, delivery) = h.write(WAIT, move |e| e.grant(args, now())).await?;
    let id = out.entry.context("a grant entry")?.to_hex();
    say!("   grant {} to {name}: {}", &id[..8], scopes.join(", "));
    say!("   {delivery}");
    Ok(id)
}

async fn say(
    h: &NodeHandle,
    who: &str,
    rel: &str,
    text: &str,
    purpose: Option<&str>,
) -> Result<Deliveries> {
    let (r, t, p) = (rel.to_owned(), text.to_owned(), purpose.map(str::to_owned));
    let (_, delivery) = h
        .write(WAIT, move |e| e.send_message(&r, t, p, None, now()))
        .await?;
    let line = delivery
        .summary()
        .unwrap_or_else(|| "kept here only: no member may read it now".into());
    say!(
        "   {who}{}: {text:?}\n     → {line}",
        purpose.map(|p| format!(" [{p}]")).unwrap_or_default()
    );
    Ok(delivery)
}

async fn messages(h: &NodeHandle, rel: &str) -> usize {
    let r = rel.to_owned();
    h.read(move |e| {
        e.relationship(&r, now())
            .map(|d| d.messages.len())
            .unwrap_or(0)
    })
    .await
}

async fn rel_count(h: &NodeHandle) -> usize {
    h.read(|e| e.relationships().expect("the store answers").len())
        .await
}

/// Verifies every consent ledger a node holds, from its exported files.
async fn verify_ledgers(h: &NodeHandle, who: &str) -> Result<Vec<String>> {
    let files = h.read(rapport_node::Engine::ledger_files).await;
    for f in &files {
        let (header, changes) = read_ledger_file(f.as_bytes())?;
        let n = changes.len();
        let ledger = Ledger::verify(header, changes)?;
        say!(
            "   {who}: ledger {} verified: {n} signed changes, {} entries",
            &ledger.id().to_hex()[..8],
            ledger.entries().len()
        );
    }
    Ok(files)
}

/// Runs the demo.
pub(crate) fn run() -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(story())
}

async fn story() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    say!("Rapport demo: a customer (Alice) and two companies (Acme, Globex), each a real");
    say!("node on 127.0.0.1 with its own temporary store, syncing over libp2p.");

    step(
        1,
        "A community relay and three nodes start; Alice connects to both companies",
    )?;
    let relay_dir = tmp.path().join("relay");
    let relay_config = RelayConfig {
        data_dir: relay_dir.clone(),
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse()?],
        open: true,
        quotas: Quotas::default(),
    };
    let relay = Relay::start(relay_config)
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    let r = relay.addrs()[0].clone();
    say!("   the community's relay listens at {r}");
    let alice_dir = tmp.path().join("alice");
    let alice = start(&alice_dir, Kind::Person, "Alice", &r).await?;
    let acme = start(&tmp.path().join("acme"), Kind::Org, "Acme Ltd", &r).await?;
    let globex = start(&tmp.path().join("globex"), Kind::Org, "Globex", &r).await?;
    let (a, ac, gx) = (alice.handle(), acme.handle(), globex.handle());
    for (name, node) in [("Acme", &acme), ("Globex", &globex)] {
        // Each company hands out its invitation (a link with a checksum); Alice adds it
        // under her name for the company and dials the address it carries.
        let addrs = node.listening().await;
        let profile = node.handle().read(|e| e.profile().clone()).await;
        let link = rapport_protocol::Invitation::new(
            profile.identity,
            &profile.name,
            profile.kind,
            &addrs,
        )
        .to_string();
        let petname = name.to_owned();
        let (contact, _) = a
            .engine()
            .try_call(move |e| e.add_contact(&link, Some(petname), now()))
            .await?;
        let addr: libp2p::Multiaddr = format!(
            "{}/p2p/{}",
            contact.addrs.first().context("an address")?,
            contact.identity
        )
        .parse()?;
        a.net()
            .dial(addr.clone())
            .await
            .map_err(|e| anyhow::anyhow!(e))?;
        say!(
            "   Alice adds {name}'s invitation ({:?}, checksum checked) and connects at {addr}",
            contact.name
        );
    }

    step(
        2,
        "Alice grants each company conversation access and support contact, on her terms",
    )?;
    let scopes = ["conversation:read", "conversation:write", "contact:support"];
    let g_acme = grant(
        &a,
        acme.identity(),
        "Acme",
        &scopes,
        "support for order 1234",
    )
    .await?;
    let g_globex = grant(&a, globex.identity(), "Globex", &scopes, "warranty claims").await?;

    step(
        3,
        "The grants reach the companies' nodes; each accepts on Alice's terms",
    )?;
    for (name, h, g) in [("Acme", &ac, &g_acme), ("Globex", &gx, &g_globex)] {
        until("the grant arriving", || async {
            grant_status(h, g).await.0 == "pending"
        })
        .await?;
        let (rows, delivery) = h.write(WAIT, |e| e.accept(None, None, now())).await?;
        ensure!(rows.len() == 1, "{name} should accept one grant");
        say!("   {name} signs its acceptance: {}", delivery);
        until("Alice seeing the acceptance", || async {
            grant_status(&a, g).await.0 == "active"
        })
        .await?;
    }
    say!("   Alice: both grants active");

    step(4, "Alice opens a relationship with each company")?;
    let mut rels = Vec::new();
    for (name, id) in [("Acme", acme.identity()), ("Globex", globex.identity())] {
        let title = format!("{name} and Alice");
        let (out, delivery) = a
            .write(WAIT, move |e| {
                e.open_relationship(id, Some(name.into()), Some(title), now())
            })
            .await?;
        let rel = out.rel.context("a relationship")?.to_hex();
        say!("   relationship {} with {name}: {}", &rel[..8], delivery);
        rels.push(rel);
    }
    let (r_acme, r_globex) = (rels[0].clone(), rels[1].clone());
    until("both companies holding their relationship", || async {
        rel_count(&ac).await == 1 && rel_count(&gx).await == 1
    })
    .await?;

    step(5, "A conversation, synced both ways")?;
    let d = say(&a, "Alice", &r_acme, "My order 1234 has not arrived.", None).await?;
    ensure!(d.any_delivered(), "Alice's message should reach Acme");
    let d = say(
        &ac,
        "Acme",
        &r_acme,
        "Sorry, Alice! It ships today.",
        Some("support"),
    )
    .await?;
    ensure!(d.any_delivered(), "Acme's reply should reach Alice");
    until("both holding both messages", || async {
        messages(&a, &r_acme).await == 2 && messages(&ac, &r_acme).await == 2
    })
    .await?;
    say!("   Alice and Acme each hold the same 2 messages");

    step(
        6,
        "Acme sends an unsolicited marketing message: Alice's node refuses it",
    )?;
    let d = say(
        &ac,
        "Acme",
        &r_acme,
        "50% off everything this weekend!",
        Some("marketing"),
    )
    .await?;
    ensure!(
        !d.refusals().is_empty(),
        "the marketing message should be refused"
    );
    ensure!(
        messages(&a, &r_acme).await == 2,
        "Alice should not hold the refused message"
    );
    // Acme keeps what it wrote: a peer's refusal never changes a node's own history.
    ensure!(
        messages(&ac, &r_acme).await == 3,
        "Acme should keep its own refused message"
    );
    let refusals = a.read(|e| e.refusals(10)).await?;
    ensure!(
        refusals.len() == 1,
        "Alice should keep one refusal as evidence"
    );
    let from = refusals[0].peer;
    let from = a
        .read(move |e| e.display_name(&from))
        .await
        .unwrap_or_else(|| from.to_string());
    say!(
        "   kept as evidence at Alice's node: change {} from {from}: {}",
        &refusals[0].change[..8],
        refusals[0].reason
    );
    say!(
        "   with Acme's signed change ({} bytes) and its text",
        refusals[0]
            .signed_change
            .as_ref()
            .map_or(0, |s| s.len() / 2)
    );

    step(7, "Alice revokes Acme's grant")?;
    let g = g_acme.clone();
    let (_, delivery) = a
        .write(WAIT, move |e| {
            e.revoke(&g, Some("closed my account".into()), now())
        })
        .await?;
    say!("   revocation: {}", delivery);

    step(
        8,
        "Acme's node erases what the revocation covers and signs its erasure receipt",
    )?;
    until("Acme erasing the relationship", || async {
        rel_count(&ac).await == 0
    })
    .await?;
    until("the erasure receipt reaching Alice", || async {
        grant_status(&a, &g_acme).await == ("revoked".into(), true)
    })
    .await?;
    say!("   Acme holds no relationship data; Alice holds Acme's signed ErasureAck");
    let r2 = r_acme.clone();
    let (epoch, sealed_to) = a
        .read(move |e| {
            e.relationship(&r2, now())
                .map(|d| (d.epoch, d.epoch_recipients))
                .unwrap_or_default()
        })
        .await;
    ensure!(
        !sealed_to.contains(&ac.identity().to_string()),
        "the new content key must not be sealed to Acme"
    );
    say!(
        "   a new content key (epoch {}) is sealed to {} reader(s), not to Acme",
        epoch.unwrap_or_default(),
        sealed_to.len()
    );

    step(9, "Acme is cut off: nothing Alice writes now reaches it")?;
    let d = say(
        &a,
        "Alice",
        &r_acme,
        "Note to self: find a new supplier.",
        None,
    )
    .await?;
    ensure!(
        !d.any_delivered(),
        "nothing should be delivered to a revoked company"
    );
    // A sync of the consent ledger Alice and Acme still share goes both ways after that
    // note; Acme still holds nothing.
    let ledger = DocRef::Consent(ConsentHeader {
        customer: a.identity(),
        grantee: ac.identity(),
    });
    let synced = a.net().sync(ac.identity(), ledger, WAIT).await;
    ensure!(
        synced == SyncResult::Delivered,
        "step failed: the consent ledger did not sync with Acme: {synced:?}"
    );
    ensure!(rel_count(&ac).await == 0, "Acme should hold nothing");
    say!("   Acme still holds 0 relationships; it keeps the consent ledger as its proof");

    step(10, "Globex is unaffected")?;
    let d = say(
        &a,
        "Alice",
        &r_globex,
        "My kettle broke after a week.",
        None,
    )
    .await?;
    ensure!(d.any_delivered(), "Globex should still be served");
    let d = say(
        &gx,
        "Globex",
        &r_globex,
        "We will send a new one.",
        Some("support"),
    )
    .await?;
    ensure!(d.any_delivered(), "Globex's reply should reach Alice");
    ensure!(
        grant_status(&a, &g_globex).await.0 == "active",
        "Globex's grant stays active"
    );

    step(
        11,
        "Every ledger verifies, and both sides hold the same ones",
    )?;
    let la = verify_ledgers(&a, "Alice").await?;
    let lac = verify_ledgers(&ac, "Acme").await?;
    let lgx = verify_ledgers(&gx, "Globex").await?;
    for l in lac.iter().chain(&lgx) {
        ensure!(
            la.contains(l),
            "a company's ledger should equal Alice's copy"
        );
    }
    say!("   Acme's and Globex's ledgers are identical to Alice's copies");

    step(
        12,
        "Alice goes offline; Globex's reply waits for her, sealed, at the community relay",
    )?;
    alice.shutdown().await;
    // The handle holds the store open; let it go so the node can start again later.
    drop(a);
    let text = "Your new kettle ships on Monday.";
    let d = say(&gx, "Globex", &r_globex, text, Some("support")).await?;
    ensure!(
        d.any_deposited(),
        "Globex's reply should go to Alice's mailbox"
    );
    let stats = relay.stats().await;
    say!(
        "   the relay stored {} sealed envelope(s); it holds no key that opens them",
        stats.deposited
    );
    relay.shutdown().await;
    let held = RelayStore::open(&relay_dir)?.all_mail()?;
    ensure!(
        held.iter()
            .all(|(_, m)| !m.envelope.windows(text.len()).any(|w| w == text.as_bytes())),
        "the relay must hold no plaintext"
    );
    say!(
        "   the relay restarts; its store holds {} envelope(s) and not one byte of the text",
        held.len()
    );
    let relay = Relay::start(RelayConfig {
        data_dir: relay_dir.clone(),
        listen: vec![strip_p2p(&r)],
        open: true,
        quotas: Quotas::default(),
    })
    .await
    .map_err(|e| anyhow::anyhow!(e))?;

    step(13, "Alice comes back and reads it from her mailbox")?;
    let alice = run_node(&alice_dir, &r).await?;
    let a = alice.handle();
    let r2 = r_globex.clone();
    until("Alice receiving her mail", || {
        let r2 = r2.clone();
        let a = a.clone();
        async move {
            a.read(move |e| {
                e.relationship(&r2, now())
                    .map(|d| d.messages.iter().any(|m| m.text == text))
                    .unwrap_or(false)
            })
            .await
        }
    })
    .await?;
    say!("   Alice: \"{text}\" (from Globex, via the relay's mailbox, verified like any change)");

    for n in [alice, acme, globex] {
        n.shutdown().await;
    }
    relay.shutdown().await;
    say!("\nEvery step held.");
    Ok(())
}
