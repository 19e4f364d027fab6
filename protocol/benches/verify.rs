//! Verifying a consent ledger of 100k signed changes, against raw ed25519-dalek
//! verification (single and batch) of the same signatures over the same messages.
//!
//! `cargo bench -p rapport-protocol --bench verify` prints criterion's figures and then a
//! plain summary: changes per second for each, and the ratio of full verification to raw
//! batch verification (target: at least 0.7).

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use ed25519_dalek::{Signature, VerifyingKey};
use rapport_protocol::{
    ConsentDoc, ConsentHeader, EntryBody, EntryId, Ledger, LegalBasis, SecretKey, SignedChange,
    Terms, signing_message,
};

const N: usize = 100_000;

struct Fixture {
    header: ConsentHeader,
    encoded: Vec<Vec<u8>>,
    messages: Vec<[u8; 82]>,
    signatures: Vec<Signature>,
    keys: Vec<VerifyingKey>,
}

/// A realistic ledger: the customer grants, narrows and revokes; the grantee accepts and
/// acknowledges erasure; both write from their own replica and sync now and then, so the
/// history is a DAG with real dependencies.
fn fixture() -> Fixture {
    let customer = SecretKey::from_seed([1; 32]);
    let grantee = SecretKey::from_seed([2; 32]);
    let header = ConsentHeader {
        customer: customer.identity(),
        grantee: grantee.identity(),
    };
    let mut c = ConsentDoc::new(header).expect("parties differ");
    let mut g = ConsentDoc::new(header).expect("parties differ");
    let terms = Terms::by_id("SD-BASE").expect("in roster").reference();
    let mut at = 1_700_000_000u64;
    let mut open: Vec<EntryId> = Vec::new();
    let mut to_accept: Vec<EntryId> = Vec::new();
    let mut revoked: Vec<(EntryId, EntryId)> = Vec::new();
    let mut total = 0;
    let mut round = 0usize;
    // Changes are kept in application order, so each side sends only what it added since.
    let (mut seen_c, mut seen_g) = (0, 0);
    while total < N {
        at += 1;
        round += 1;
        // Writers mostly work apart and sync every 500 rounds: Automerge's apply costs grow
        // with the document, so syncing after every few changes would dominate the set-up.
        let step = if round % 500 < 10 {
            round % 10
        } else {
            round % 6
        };
        let made = match step {
            0..=3 => {
                let (id, _) = c
                    .append(
                        &customer,
                        [1; 16],
                        at,
                        EntryBody::Grant {
                            scopes: vec![
                                "conversation:read".parse().expect("scope"),
                                "contact:support".parse().expect("scope"),
                            ],
                            purpose: format!("support case {total}"),
                            legal_basis: LegalBasis::Consent,
                            notice_sha256: "ab".repeat(32),
                            terms: terms.clone(),
                            expires: (total % 3 == 0).then_some(at + 86_400 * 365),
                        },
                    )
                    .expect("grant");
                open.push(id);
                to_accept.push(id);
                true
            }
            4 => match open.last() {
                Some(&gid) => c
                    .append(
                        &customer,
                        [1; 16],
                        at,
                        EntryBody::Amend {
                            grant: gid,
                            scopes: vec!["contact:support".parse().expect("scope")],
                            expires: Some(at + 86_400),
                        },
                    )
                    .is_ok(),
                None => false,
            },
            5 => match open.pop() {
                Some(gid) => {
                    let (rid, _) = c
                        .append(
                            &customer,
                            [1; 16],
                            at,
                            EntryBody::Revoke {
                                grant: gid,
                                reason: None,
                            },
                        )
                        .expect("revoke");
                    revoked.push((rid, gid));
                    true
                }
                None => false,
            },
            6 => {
                // Sync customer -> grantee, then the grantee accepts what is pending.
                g.apply(c.ledger().changes()[seen_c..].to_vec());
                seen_c = c.ledger().changes().len();
                let pending: Vec<_> = std::mem::take(&mut to_accept)
                    .into_iter()
                    .filter_map(|gid| g.ledger().grant(&gid, u64::MAX))
                    .filter(|v| v.accepted.is_none() && v.revoked.is_none())
                    .map(|v| (v.id, v.terms))
                    .take(N - total)
                    .collect();
                for (gid, t) in pending {
                    at += 1;
                    g.append(
                        &grantee,
                        [2; 16],
                        at,
                        EntryBody::Accept {
                            grant: gid,
                            terms: t,
                        },
                    )
                    .expect("accept");
                    total += 1;
                }
                false
            }
            7 => {
                let todo = std::mem::take(&mut revoked);
                for (rid, gid) in todo {
                    if total >= N {
                        break;
                    }
                    if g.ledger()
                        .grant(&gid, u64::MAX)
                        .is_some_and(|v| v.revoked.is_some())
                    {
                        at += 1;
                        g.append(
                            &grantee,
                            [2; 16],
                            at,
                            EntryBody::ErasureAck {
                                revoke: rid,
                                grant: gid,
                                erased: "all".into(),
                            },
                        )
                        .expect("erasure");
                        total += 1;
                    }
                }
                false
            }
            _ => {
                c.apply(g.ledger().changes()[seen_g..].to_vec());
                seen_g = g.ledger().changes().len();
                false
            }
        };
        if made {
            total += 1;
        }
    }
    c.apply(g.ledger().changes()[seen_g..].to_vec());
    let changes: Vec<SignedChange> = c.ledger().changes().to_vec();
    assert!(changes.len() >= N, "built {} changes", changes.len());
    let changes = &changes[..N];
    let doc = header.doc_id();
    let encoded: Vec<Vec<u8>> = changes.iter().map(SignedChange::encode).collect();
    let messages = changes
        .iter()
        .map(|c| signing_message(&doc, &c.hash()))
        .collect();
    let signatures = encoded
        .iter()
        .map(|e| Signature::from_bytes(e[1..65].try_into().expect("64 bytes")))
        .collect();
    let keys = changes
        .iter()
        .map(|c| {
            if c.author_bytes() == customer.identity().as_bytes() {
                customer.identity().verifying_key().expect("a valid key")
            } else {
                grantee.identity().verifying_key().expect("a valid key")
            }
        })
        .collect();
    Fixture {
        header,
        encoded,
        messages,
        signatures,
        keys,
    }
}

fn full_verify(f: &Fixture) -> Ledger {
    let changes: Vec<SignedChange> = f
        .encoded
        .iter()
        .map(|b| SignedChange::decode(b).expect("decodes"))
        .collect();
    Ledger::verify(f.header, changes).expect("verifies")
}

fn raw_single(f: &Fixture) {
    for i in 0..f.messages.len() {
        f.keys[i]
            .verify_strict(&f.messages[i], &f.signatures[i])
            .expect("valid");
    }
}

fn raw_batch(f: &Fixture) {
    for start in (0..f.messages.len()).step_by(256) {
        let end = (start + 256).min(f.messages.len());
        let msgs: Vec<&[u8]> = f.messages[start..end].iter().map(|m| &m[..]).collect();
        ed25519_dalek::verify_batch(&msgs, &f.signatures[start..end], &f.keys[start..end])
            .expect("valid");
    }
}

/// The same batches through ours, which sums each key's terms (two keys here).
fn our_batch(f: &Fixture) {
    for start in (0..f.messages.len()).step_by(256) {
        let end = (start + 256).min(f.messages.len());
        let items: Vec<([u8; 82], Signature, VerifyingKey)> = (start..end)
            .map(|i| (f.messages[i], f.signatures[i], f.keys[i]))
            .collect();
        assert!(rapport_protocol::batch::verify_batch(&items), "valid");
    }
}

fn decode_only(f: &Fixture) -> Vec<SignedChange> {
    f.encoded
        .iter()
        .map(|b| SignedChange::decode(b).expect("decodes"))
        .collect()
}

fn benches(c: &mut Criterion, f: &Fixture) {
    let mut group = c.benchmark_group("consent_ledger_100k");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(12));
    group.warm_up_time(Duration::from_secs(1));
    group.throughput(Throughput::Elements(N as u64));
    group.bench_function("full_verify", |b| b.iter(|| black_box(full_verify(f))));
    group.bench_function("raw_batch", |b| b.iter(|| raw_batch(black_box(f))));
    group.bench_function("our_batch", |b| b.iter(|| our_batch(black_box(f))));
    group.bench_function("raw_single", |b| b.iter(|| raw_single(black_box(f))));
    group.finish();
}

fn median(mut runs: impl FnMut(), n: usize) -> Duration {
    let mut times: Vec<Duration> = (0..n)
        .map(|_| {
            let t = Instant::now();
            runs();
            t.elapsed()
        })
        .collect();
    times.sort();
    times[n / 2]
}

fn summary(f: &Fixture) {
    let per_sec = |d: Duration| N as f64 / d.as_secs_f64();
    let full = median(|| drop(black_box(full_verify(f))), 3);
    let batch = median(|| raw_batch(black_box(f)), 3);
    let ours = median(|| our_batch(black_box(f)), 3);
    let single = median(|| raw_single(black_box(f)), 3);
    let decode = median(|| drop(black_box(decode_only(f))), 3);
    let load = median(
        || {
            let changes = f
                .encoded
                .iter()
                .map(|b| SignedChange::decode(b).expect("decodes"))
                .collect();
            black_box(ConsentDoc::load(f.header, changes).expect("loads"));
        },
        1,
    );
    let ratio = per_sec(full) / per_sec(batch);
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    println!("\n== consent ledger verification, {N} signed changes (median of 3)");
    println!(
        "full verification splits signature batches over {} core(s); raw figures use one core",
        cores.min(4)
    );
    println!("(run under `taskset -c 0` for the single-core comparison)");
    println!(
        "raw ed25519 single (verify_strict)  {:>10.0} changes/s",
        per_sec(single)
    );
    println!(
        "raw ed25519 batch (256 per batch)   {:>10.0} changes/s",
        per_sec(batch)
    );
    println!(
        "our batch (keys' terms summed)      {:>10.0} changes/s ({:.2}x dalek's batch)",
        per_sec(ours),
        batch.as_secs_f64() / ours.as_secs_f64()
    );
    println!(
        "full ledger verification            {:>10.0} changes/s",
        per_sec(full)
    );
    println!(
        "  of which decoding the changes     {:>10.0} changes/s",
        per_sec(decode)
    );
    println!(
        "verify + build the Automerge doc    {:>10.0} changes/s (ConsentDoc::load)",
        per_sec(load)
    );
    println!(
        "ratio full / raw batch: {ratio:.2} (target >= 0.70: {})",
        if ratio >= 0.7 { "met" } else { "NOT met" }
    );
    println!(
        "ratio full / raw single: {:.2}",
        per_sec(full) / per_sec(single)
    );
}

fn main() {
    let f = fixture();
    let mut c = Criterion::default().configure_from_args();
    benches(&mut c, &f);
    c.final_summary();
    summary(&f);
}
