//! Rule 4 under fire: nothing acknowledged is ever lost, not on a crash, not on a restart.
//!
//! Two real `rapport node run` processes on loopback (a customer and a company with the
//! consent both need to write) send messages to each other in one relationship, both ways
//! at once, while one of them (the receiver or the sender, alternately) is killed with
//! SIGKILL at pseudo-random moments and restarted on the same store and the same port.
//! The writers use each node's local API (`POST /v1/relationships/{id}/messages`); every
//! message the API answered 2xx was acknowledged. It must be on its writer after every
//! restart and at every moment a watcher looks (both nodes, every 300 ms), and on both nodes
//! once they have converged. Sends that fail (the node being killed) are not required, but
//! must not stop the nodes from converging. `RAPPORT_KEEP=1` keeps the stores and the
//! nodes' logs (at `RAPPORT_LOG`, default info) for a look afterwards.

mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rapport_tests::free_port;
use serde_json::Value;
use support::{NodeProcess, Party};

/// How many times a node is killed (`RAPPORT_CRASH_KILLS` overrides, for a longer run).
const KILLS: usize = 12;
/// Pseudo-random delays before each kill, in milliseconds (from a fixed seed).
const DELAY_MS: std::ops::Range<u64> = 100..600;
/// How long a killed node stays down before its restart, in milliseconds.
const DOWN_MS: std::ops::Range<u64> = 0..500;
/// The seed of the fault schedule.
const SEED: u64 = 0x5eed_4a11_c0ff_ee00;
/// Writer threads per node, each with a send in flight most of the time.
const WRITERS: usize = 2;
/// Each node's writers stop once it has acknowledged this many messages: a restart loads
/// the whole store, so the store must stay small for the test to stay quick
/// (`RAPPORT_CRASH_CAP` overrides, for a harder run).
const CAP: usize = 350;

/// `name` from the environment if set, else `default`.
fn knob(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
/// How long the nodes get to converge once the faults stop.
const CONVERGE: Duration = Duration::from_secs(40);

/// A small deterministic generator (Knuth's MMIX LCG); the fault schedule is the same on
/// every run.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }

    fn in_range(&mut self, r: std::ops::Range<u64>) -> u64 {
        r.start + self.next() % (r.end - r.start)
    }
}

/// The message texts the running node holds in `rel`, or `None` if it cannot say now.
fn texts(p: &Party, rel: &str) -> Option<BTreeSet<String>> {
    let (status, body) = api(&p.dir, "GET", &format!("/v1/relationships/{rel}"), "").ok()?;
    if status != 200 {
        return None;
    }
    let v: Value = serde_json::from_str(&body).ok()?;
    Some(
        v["messages"]
            .as_array()?
            .iter()
            .filter_map(|m| m["text"].as_str().map(str::to_owned))
            .collect(),
    )
}

/// One side of the test: its store, its fixed port, its node, its log.
struct Side {
    name: &'static str,
    party: Arc<Party>,
    port: u16,
    peer_addr: String,
    log: std::path::PathBuf,
    node: Option<NodeProcess>,
    /// The texts whose send this side's node acknowledged.
    acked: Arc<Mutex<Vec<String>>>,
    /// How many of those the peer had taken when the send was acknowledged.
    delivered: Arc<AtomicUsize>,
}

impl Side {
    fn start(&mut self) {
        let listen = format!("/ip4/127.0.0.1/tcp/{}", self.port);
        let mut args = vec!["--listen", listen.as_str()];
        if !self.peer_addr.is_empty() {
            args.extend(["--bootstrap", self.peer_addr.as_str()]);
        }
        self.node = Some(self.party.run_node_logged(&args, &self.log));
    }

    fn kill(&mut self) {
        if let Some(n) = self.node.take() {
            n.kill();
        }
    }
}

/// What a writer saw.
#[derive(Default)]
struct Tally {
    /// Acknowledged, delivered to the peer.
    delivered: usize,
    /// Acknowledged, stored for later (the peer not reached).
    stored: usize,
    /// Acknowledged (2xx), but the peer refused it (by its `deliveries`).
    refused: Vec<String>,
    /// Not acknowledged: what went wrong, and how often.
    errors: std::collections::BTreeMap<String, usize>,
}

/// One request to the local API of the node running for `dir` (its address and token
/// found as the CLI finds them); returns (status, body), or what went wrong if the API could
/// not be reached. Never opens the store itself, so it cannot get in a starting node's way.
fn api(dir: &Path, method: &str, path: &str, body: &str) -> Result<(u16, String), String> {
    use std::io::{Read, Write};
    let file = std::fs::read_to_string(dir.join(rapport_node::NODE_FILE))
        .map_err(|_| "node down".to_owned())?;
    let file: rapport_node::NodeFile =
        serde_json::from_str(&file).map_err(|_| "node down".to_owned())?;
    let token = std::fs::read_to_string(dir.join(rapport_node::TOKEN_FILE))
        .map_err(|_| "node down".to_owned())?;
    let mut s = std::net::TcpStream::connect_timeout(&file.api, Duration::from_secs(2))
        .map_err(|_| "node down".to_owned())?;
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\n\
         Authorization: Bearer {}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        token.trim(),
        body.len()
    )
    .map_err(|e| format!("request not sent: {}", e.kind()))?;
    let mut out = String::new();
    s.read_to_string(&mut out)
        .map_err(|e| format!("no answer: {}", e.kind()))?;
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| "no answer: connection closed".to_owned())?;
    let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Ok((status, body.to_owned()))
}

/// Sends one message through the node's local API.
fn post_message(dir: &Path, rel: &str, text: &str) -> Result<(u16, String), String> {
    let body = serde_json::json!({ "text": text }).to_string();
    api(
        dir,
        "POST",
        &format!("/v1/relationships/{rel}/messages"),
        &body,
    )
}

/// Sends `"{name} {n}"` for n = 0, 1, … through the node's local API until `stop`; records
/// every text whose send the API acknowledged (a 2xx answer).
fn writer(
    name: String,
    party: Arc<Party>,
    rel: String,
    acked: Arc<Mutex<Vec<String>>>,
    delivered: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Tally> {
    std::thread::spawn(move || {
        let mut tally = Tally::default();
        let cap = knob("RAPPORT_CRASH_CAP", CAP);
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) {
            if acked.lock().unwrap().len() >= cap {
                // This node has written its share: the faults go on without it writing.
                break;
            }
            let text = format!("{name} {n}");
            n += 1;
            match post_message(&party.dir, &rel, &text) {
                Ok((status, body)) if (200..300).contains(&status) => {
                    let v: Value = serde_json::from_str(&body).unwrap_or_default();
                    let outcomes: Vec<&str> = v["deliveries"]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .filter_map(|d| d["outcome"]["result"].as_str())
                                .collect()
                        })
                        .unwrap_or_default();
                    if outcomes.contains(&"refused") {
                        if tally.refused.is_empty() {
                            eprintln!("{text}: acknowledged, delivery: {}", v["delivery"]);
                        }
                        tally.refused.push(text.clone());
                    } else if outcomes.contains(&"delivered") {
                        tally.delivered += 1;
                        delivered.fetch_add(1, Ordering::SeqCst);
                    } else {
                        tally.stored += 1;
                    }
                    acked.lock().unwrap().push(text);
                }
                Ok((status, body)) => {
                    let v: Value = serde_json::from_str(&body).unwrap_or_default();
                    let why: String = v["error"]
                        .as_str()
                        .unwrap_or(&body)
                        .chars()
                        .take(80)
                        .collect();
                    *tally.errors.entry(format!("{status} {why}")).or_default() += 1;
                    // A backoff before the next send, not a wait for anything.
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    *tally.errors.entry(e).or_default() += 1;
                    // The node is down or going down: do not spin while it restarts.
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
        tally
    })
}

/// The log lines of `log` that contain `needle`.
fn log_lines(log: &Path, needle: &str) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_owned)
        .collect()
}

#[test]
fn nothing_acknowledged_is_lost_when_nodes_are_killed_while_writing_both_ways() {
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    // RAPPORT_KEEP=1 keeps the stores and the nodes' logs for a look afterwards.
    if std::env::var_os("RAPPORT_KEEP").is_some() {
        eprintln!("stores and logs in {}", tmp.path().display());
    }
    let alice = Arc::new(Party::new(tmp.path().join("alice")));
    let acme = Arc::new(Party::new(tmp.path().join("acme")));
    alice.ok(&["init", "--kind", "person", "--name", "Alice"]);
    acme.ok(&["init", "--kind", "org", "--name", "Acme"]);

    let mut a = Side {
        name: "alice",
        party: alice.clone(),
        port: free_port(),
        peer_addr: String::new(),
        log: tmp.path().join("alice.log"),
        node: None,
        acked: Arc::default(),
        delivered: Arc::default(),
    };
    let mut b = Side {
        name: "acme",
        party: acme.clone(),
        port: free_port(),
        peer_addr: String::new(),
        log: tmp.path().join("acme.log"),
        node: None,
        acked: Arc::default(),
        delivered: Arc::default(),
    };
    a.start();
    b.start();
    // From now on each side dials the other at start, on the other's fixed port.
    a.peer_addr = acme.listen_addr();
    b.peer_addr = alice.listen_addr();
    alice.ok(&["connect", &a.peer_addr]);

    // Consent for both to write: Alice grants, Acme accepts, Alice sees it active.
    let rel = support::consent_and_open(&alice, &acme, &["--title", "crash loop"]);
    let setup = started.elapsed();

    // Both write, both ways, while one or the other is killed and restarted.
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for side in [&a, &b] {
        for w in 0..WRITERS {
            writers.push((
                side.name,
                writer(
                    format!("{}.{w}", side.name),
                    side.party.clone(),
                    rel.clone(),
                    side.acked.clone(),
                    side.delivered.clone(),
                    stop.clone(),
                ),
            ));
        }
    }
    let mut rng = Lcg(SEED);
    // Acknowledged messages missing from their writer right after a restart.
    let lost_on_writer: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    // Meanwhile a watcher reads both nodes over and over: an acknowledged message must never
    // be missing from its writer, not even for a while (the peer might never give it back).
    let watcher = {
        let sides = [
            (a.name, a.party.clone(), a.acked.clone()),
            (b.name, b.party.clone(), b.acked.clone()),
        ];
        let (rel, stop, lost) = (rel.clone(), stop.clone(), lost_on_writer.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                for (name, party, acked) in &sides {
                    let acked: Vec<String> = acked.lock().unwrap().clone();
                    let Some(held) = texts(party, &rel) else {
                        continue;
                    };
                    let missing: Vec<&String> =
                        acked.iter().filter(|t| !held.contains(*t)).collect();
                    let mut lost = lost.lock().unwrap();
                    let new = missing.iter().filter(|t| !lost.contains(**t)).count();
                    if new > 0 {
                        eprintln!(
                            "{name}: {} of {} acknowledged message(s) missing from their \
                             writer, e.g. {:?}",
                            missing.len(),
                            acked.len(),
                            &missing[..missing.len().min(3)]
                        );
                    }
                    lost.extend(missing.into_iter().cloned());
                }
                // The watcher's polling interval.
                std::thread::sleep(Duration::from_millis(300));
            }
        })
    };
    let kills = knob("RAPPORT_CRASH_KILLS", KILLS);
    for k in 0..kills {
        // The fault schedule: a pseudo-random delay before each kill.
        std::thread::sleep(Duration::from_millis(rng.in_range(DELAY_MS)));
        // The victim alternates; so does the moment: right after the victim's own message
        // reached the other node (the sender killed once its peer builds on that message),
        // or right after the other node's message reached the victim (the receiver killed
        // mid-sync, having just taken a change).
        let (side, other) = if k % 2 == 0 {
            (&mut a, &b)
        } else {
            (&mut b, &a)
        };
        let trigger = if (k / 2) % 2 == 0 {
            side.acked.clone()
        } else {
            other.acked.clone()
        };
        let seen = trigger.lock().unwrap().len();
        let wait = Instant::now() + Duration::from_secs(3);
        while trigger.lock().unwrap().len() == seen && Instant::now() < wait {
            std::thread::sleep(Duration::from_millis(1));
        }
        // The fault schedule: a pseudo-random moment just after the trigger.
        std::thread::sleep(Duration::from_millis(rng.in_range(0..30)));
        let t0 = Instant::now();
        side.kill();
        // Down for a while: the other node stores what it writes meanwhile for later.
        std::thread::sleep(Duration::from_millis(rng.in_range(DOWN_MS)));
        side.start();
        let up = t0.elapsed();
        // Everything this writer had acknowledged so far is on its node after the restart.
        let acked: Vec<String> = side.acked.lock().unwrap().clone();
        let held = texts(&side.party, &rel);
        eprintln!(
            "kill {k}: {} restarted in {up:.1?}, its thread read in {:.1?}; acknowledged so far: {}",
            side.name,
            t0.elapsed() - up,
            acked.len()
        );
        if let Some(held) = held {
            let missing: Vec<&String> = acked.iter().filter(|t| !held.contains(*t)).collect();
            if !missing.is_empty() {
                eprintln!(
                    "kill {k} ({}): {} of {} acknowledged message(s) missing after restart, e.g. {:?}",
                    side.name,
                    missing.len(),
                    acked.len(),
                    &missing[..missing.len().min(3)]
                );
                lost_on_writer
                    .lock()
                    .unwrap()
                    .extend(missing.into_iter().cloned());
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    watcher.join().unwrap();
    let lost_on_writer: Vec<String> = lost_on_writer.lock().unwrap().iter().cloned().collect();
    let mut tallies: [Tally; 2] = Default::default();
    for (name, w) in writers {
        let t = w.join().unwrap();
        let sum = &mut tallies[usize::from(name != a.name)];
        sum.delivered += t.delivered;
        sum.stored += t.stored;
        sum.refused.extend(t.refused);
        for (k, n) in t.errors {
            *sum.errors.entry(k).or_default() += n;
        }
    }
    let faults = started.elapsed() - setup;

    // Both nodes run; wait until they hold the same messages.
    let deadline = Instant::now() + CONVERGE;
    let (held_a, held_b, converged) = loop {
        let (ha, hb) = (texts(&alice, &rel), texts(&acme, &rel));
        if let (Some(ha), Some(hb)) = (&ha, &hb)
            && ha == hb
        {
            break (ha.clone(), hb.clone(), true);
        }
        if Instant::now() > deadline {
            break (ha.unwrap_or_default(), hb.unwrap_or_default(), false);
        }
        std::thread::sleep(Duration::from_millis(250));
    };

    let mut report = Vec::new();
    let mut lost = Vec::new();
    for (side, tally, own, peer) in [
        (&a, &tallies[0], &held_a, &held_b),
        (&b, &tallies[1], &held_b, &held_a),
    ] {
        let acked = side.acked.lock().unwrap().clone();
        let on_writer: Vec<&String> = acked.iter().filter(|t| own.contains(*t)).collect();
        let on_peer: Vec<&String> = acked.iter().filter(|t| peer.contains(*t)).collect();
        let missing: Vec<&String> = acked
            .iter()
            .filter(|t| !own.contains(*t) || !peer.contains(*t))
            .collect();
        let refused_lost = tally
            .refused
            .iter()
            .filter(|t| !own.contains(*t) || !peer.contains(*t))
            .count();
        report.push(format!(
            "{}: acknowledged {} ({} delivered, {} stored for later, {} answered 2xx with \
             'refused by' in the delivery ({} of them missing)), present on writer {}, \
             present on peer {}; not acknowledged: {:?}; log: {} rollback(s), {} 'does not \
             hold' refusal(s)",
            side.name,
            acked.len(),
            tally.delivered,
            tally.stored,
            tally.refused.len(),
            refused_lost,
            on_writer.len(),
            on_peer.len(),
            tally.errors,
            log_lines(&side.log, "rolled back").len(),
            log_lines(&side.log, "does not hold").len(),
        ));
        lost.extend(missing.into_iter().cloned());
    }
    let total = started.elapsed();
    report.push(format!(
        "{kills} kills; converged: {converged} (alice holds {}, acme holds {}); \
         setup {setup:.1?}, faults {faults:.1?}, \
         total {total:.1?}",
        held_a.len(),
        held_b.len()
    ));
    if !lost_on_writer.is_empty() {
        report.push(format!(
            "acknowledged but missing from their writer at some point (after a restart or while \
             running): {} (e.g. {:?})",
            lost_on_writer.len(),
            &lost_on_writer[..lost_on_writer.len().min(5)]
        ));
    }
    let report = report.join("\n");
    eprintln!("{report}");
    if !lost.is_empty() || !converged || !lost_on_writer.is_empty() {
        for side in [&a, &b] {
            let lines = log_lines(&side.log, "rolled back");
            eprintln!(
                "{} log, first rollbacks: {:#?}",
                side.name,
                &lines[..lines.len().min(5)]
            );
        }
    }
    if std::env::var_os("RAPPORT_KEEP").is_some() {
        let _ = tmp.keep();
    }
    assert!(
        lost.is_empty() && converged && lost_on_writer.is_empty(),
        "acknowledged messages were lost or the nodes never converged:\n{report}\n\
         {} acknowledged message(s) missing from their writer or its peer, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(8)]
    );
}
