//! `rapport bench scale`: a company's store with many customers, each with an accepted
//! grant and a relationship holding a short conversation; then a real `rapport node run`
//! on it, measured from outside: how long until its API answers, its memory, how long the
//! inbox of the latest 20 takes, and how long one job held the engine at most while the
//! node started and ran its periodic work.

use crate::out::say;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rapport_node::{EngineStats, Store};
use rapport_protocol::wire::DocRef;
use rapport_protocol::{Kind, RelBody, SecretKey};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::backend::Api;
use crate::bench::{Pair, accepted_consent};

/// Targets (issue 10) for a store of 100,000 relationships.
const TARGET_START_S: f64 = 2.0;
const TARGET_RSS_MIB: f64 = 1024.0;
const TARGET_INBOX_MS: f64 = 10.0;
const TARGET_HOLD_MS: f64 = 10.0;
/// Customers stored per sync of the store while building.
const BUILD_GROUP: usize = 500;

/// What one run measured.
struct Figures {
    relationships: usize,
    build_s: f64,
    start_s: Option<f64>,
    rss_mib: Option<f64>,
    inbox20_ms: Option<f64>,
    max_engine_hold_ms: Option<f64>,
}

pub(crate) fn run(
    relationships: usize,
    start_limit: Duration,
    json: bool,
    keep: Option<PathBuf>,
) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = match keep {
        Some(d) if d.exists() => bail!(
            "{} exists: give a new directory to keep the store in",
            d.display()
        ),
        Some(d) => d,
        None => tmp.path().join("company"),
    };
    if !json {
        say!(
            "rapport bench scale: a company's store with {relationships} customers, then `rapport node run` on it"
        );
    }
    let started = Instant::now();
    build(&dir, relationships, json)?;
    let build_s = started.elapsed().as_secs_f64();
    let mut f = Figures {
        relationships,
        build_s,
        start_s: None,
        rss_mib: None,
        inbox20_ms: None,
        max_engine_hold_ms: None,
    };
    measure(&dir, start_limit, &mut f)?;
    if json {
        say!(
            "{}",
            json!({
                "bench": "scale",
                "relationships": f.relationships,
                "build_s": f.build_s,
                "start_s": f.start_s,
                "rss_mib": f.rss_mib,
                "inbox20_ms": f.inbox20_ms,
                "max_engine_hold_ms": f.max_engine_hold_ms,
                "start_limit_s": start_limit.as_secs(),
            })
        );
        return Ok(());
    }
    let show = |v: Option<f64>, unit: &str, target: f64| match v {
        Some(v) => format!(
            "{v:.3} {unit} (target {target} {unit}: {})",
            if v <= target { "met" } else { "missed" }
        ),
        None => format!("not measured (target {target} {unit}: missed)"),
    };
    say!("store built in {:.1} s", f.build_s);
    match f.start_s {
        Some(_) => say!("start:      {}", show(f.start_s, "s", TARGET_START_S)),
        None => say!(
            "start:      the API did not answer within {} s (target {TARGET_START_S} s: missed)",
            start_limit.as_secs()
        ),
    }
    say!("memory:     {}", show(f.rss_mib, "MiB", TARGET_RSS_MIB));
    say!("inbox(20):  {}", show(f.inbox20_ms, "ms", TARGET_INBOX_MS));
    say!(
        "engine held by one job at most, while starting and running its periodic work: {}",
        show(f.max_engine_hold_ms, "ms", TARGET_HOLD_MS)
    );
    if relationships != 100_000 {
        say!("(the targets are for 100,000 relationships)");
    }
    Ok(())
}

/// A customer's key, the same for the same index in every run.
fn customer(i: usize) -> SecretKey {
    let seed: [u8; 32] = Sha256::new()
        .chain_update(b"rapport bench scale customer")
        .chain_update((i as u64).to_be_bytes())
        .finalize()
        .into();
    SecretKey::from_seed(seed)
}

/// The company's store: for each customer, a consent document (a grant and the company's
/// acceptance) and a relationship (title, the company as member, a question and a reply).
fn build(dir: &Path, n: usize, quiet: bool) -> Result<()> {
    let bar = if quiet {
        indicatif::ProgressBar::hidden()
    } else {
        crate::out::progress("building the company's store", n as u64)
    };
    let store = Store::create(dir, Kind::Org, "Acme", rapport_node::now())?;
    let gk = store.secret_key()?;
    let t0 = rapport_node::now() - 3600;
    let mut i = 0;
    while i < n {
        store.begin_group();
        for c in i..(i + BUILD_GROUP).min(n) {
            let ck = customer(c);
            let consent = accepted_consent(&ck, &gk, t0, "support")?;
            let h = *consent.ledger().header();
            store.put_consent_changes(&h, consent.ledger().changes())?;
            let mut nonce = [0u8; 16];
            nonce[..8].copy_from_slice(&(c as u64).to_be_bytes());
            let mut rel = Pair::open(&ck, &gk, nonce, t0, format!("customer {c}"))?;
            let at = t0 + c as u64;
            rel.append(
                &ck,
                [1; 16],
                at,
                RelBody::Message {
                    thread: None,
                    text: format!("customer {c}: where is my order?"),
                    purpose: None,
                },
            )?;
            rel.append(
                &gk,
                [2; 16],
                at + 1,
                RelBody::Message {
                    thread: None,
                    text: format!("to customer {c}: it ships today"),
                    purpose: Some("support".into()),
                },
            )?;
            store.put_changes(&DocRef::Relationship(*rel.header()), rel.changes())?;
        }
        store.end_group()?;
        i = (i + BUILD_GROUP).min(n);
        bar.set_position(i as u64);
    }
    bar.finish_and_clear();
    Ok(())
}

/// Starts `rapport node run` on the store and measures it from outside.
fn measure(dir: &Path, start_limit: Duration, f: &mut Figures) -> Result<()> {
    let exe = std::env::current_exe().context("cannot find this program to run the node")?;
    let started = Instant::now();
    let mut child = Command::new(exe)
        .arg("--data-dir")
        .arg(dir)
        .args([
            "node",
            "run",
            "--no-mdns",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
        ])
        .env_remove("RAPPORT_HOME")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start `rapport node run`")?;
    let result = (|| -> Result<()> {
        let api = loop {
            if let Some(api) = Api::find(dir) {
                break api;
            }
            if let Ok(Some(status)) = child.try_wait() {
                bail!("`rapport node run` exited ({status}) before its API answered");
            }
            if started.elapsed() > start_limit {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10)); // backoff between polls
        };
        f.start_s = Some(started.elapsed().as_secs_f64());
        f.rss_mib = rss_mib(child.id());
        // What held the engine while the node started and ran its periodic work (the
        // redial sweep runs at once), before any request of ours but the status.
        let status: Value = api.get("/v1/status")?;
        let stats: EngineStats = serde_json::from_value(status["engine"].clone())
            .context("the node's status has no engine figures")?;
        f.max_engine_hold_ms = Some(stats.max_job_us as f64 / 1000.0);
        let mut times = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            let inbox: Value = api.get("/v1/inbox?limit=20")?;
            times.push(t.elapsed().as_secs_f64() * 1000.0);
            // The inbox holds messages from others: one question per customer.
            if inbox.as_array().map_or(0, Vec::len) != 20.min(f.relationships) {
                bail!("the inbox did not hold the latest messages: {inbox}");
            }
        }
        times.sort_by(f64::total_cmp);
        f.inbox20_ms = Some(times[times.len() / 2]);
        f.rss_mib = match (f.rss_mib, rss_mib(child.id())) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        Ok(())
    })();
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20)); // backoff between polls
    }
    result
}

/// The resident memory of process `pid`, in MiB (Linux).
fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}
