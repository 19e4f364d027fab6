//! `rapport demo`: the consent story on temporary stores, through the same code paths as
//! the commands, checking each step. Exits non-zero if any step does not hold.

use std::path::Path;

use anyhow::{Result, ensure};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use rapport_node::Store;
use rapport_protocol::GrantStatus;

use crate::{ConsentCmd, KindArg, consent, init, ledger_verify, now};

fn step(n: u32, text: &str) {
    println!("\n── {n}. {text}");
}

fn status(dir: &Path) -> Result<Vec<(String, GrantStatus, bool)>> {
    let store = Store::open(dir)?;
    let mut out = Vec::new();
    for h in store.consent_headers()? {
        for g in store.load_consent(&h.doc_id())?.ledger().grants(now()) {
            out.push((g.id.to_hex(), g.status, g.erasure_acked.is_some()));
        }
    }
    Ok(out)
}

fn identity(dir: &Path) -> Result<String> {
    Ok(Store::open(dir)?.profile()?.identity.to_string())
}

/// Runs the demo.
pub(crate) fn run() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let alice = tmp.path().join("alice");
    let acme = tmp.path().join("acme");
    let file = |name: &str| tmp.path().join(name);
    println!("Rapport demo: a customer (Alice) and a company (Acme) on two temporary stores.");
    println!("Consent travels between them as signed ledger files.");

    step(1, "Alice and Acme create their identities");
    init(&alice, KindArg::Person, "Alice")?;
    init(&acme, KindArg::Org, "Acme Ltd")?;
    let (alice_id, acme_id) = (identity(&alice)?, identity(&acme)?);

    step(
        2,
        "Alice grants Acme conversation access and support contact, on her terms",
    );
    consent(
        &alice,
        ConsentCmd::Grant {
            identity: acme_id.clone(),
            scopes: vec![
                "conversation:read".into(),
                "conversation:write".into(),
                "contact:support".into(),
            ],
            purpose: "support for order 1234".into(),
            expires: Some("2099-12-31".into()),
            terms: Some("SD-BASE".into()),
            legal_basis: "consent".into(),
            notice: None,
            notice_sha256: None,
        },
    )?;
    let grants = status(&alice)?;
    ensure!(
        grants.len() == 1 && grants[0].1 == GrantStatus::Pending,
        "the grant should be pending"
    );
    let grant = grants[0].0.clone();

    step(
        3,
        "Alice exports the ledger; Acme verifies it and accepts on Alice's terms",
    );
    consent(
        &alice,
        ConsentCmd::Export {
            identity: acme_id.clone(),
            out: file("1-grant.json"),
        },
    )?;
    ledger_verify(&file("1-grant.json"))?;
    consent(
        &acme,
        ConsentCmd::Accept {
            file: file("1-grant.json"),
            grant: None,
        },
    )?;
    ensure!(
        status(&acme)?[0].1 == GrantStatus::Active,
        "Acme should hold an active grant"
    );

    step(4, "Acme's signed acceptance reaches Alice");
    consent(
        &acme,
        ConsentCmd::Export {
            identity: alice_id.clone(),
            out: file("2-accept.json"),
        },
    )?;
    consent(
        &alice,
        ConsentCmd::Import {
            file: file("2-accept.json"),
        },
    )?;
    ensure!(
        status(&alice)?[0].1 == GrantStatus::Active,
        "Alice should see the grant active"
    );
    consent(&alice, ConsentCmd::List { json: false })?;

    step(
        5,
        "Someone tampers with a ledger file in transit: it is refused",
    );
    // Change "support" to "selling" inside the signed grant, keeping the file well formed.
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(file("2-accept.json"))?)?;
    let mut raw = B64.decode(v["changes"][0].as_str().unwrap_or_default())?;
    let at = raw
        .windows(7)
        .position(|w| w == b"support")
        .ok_or_else(|| anyhow::anyhow!("the grant text was not found"))?;
    raw[at..at + 7].copy_from_slice(b"selling");
    v["changes"][0] = serde_json::Value::String(B64.encode(&raw));
    std::fs::write(file("tampered.json"), serde_json::to_vec(&v)?)?;
    match consent(
        &alice,
        ConsentCmd::Import {
            file: file("tampered.json"),
        },
    ) {
        Ok(()) => anyhow::bail!("a tampered file was accepted"),
        Err(e) => println!("refused: {e:#}"),
    }

    step(6, "Alice revokes in one step");
    consent(
        &alice,
        ConsentCmd::Revoke {
            grant: grant[..8].to_owned(),
            reason: Some("I closed my account".into()),
        },
    )?;
    ensure!(
        status(&alice)?[0].1 == GrantStatus::Revoked,
        "the grant should be revoked"
    );

    step(
        7,
        "The revocation reaches Acme, which erases and signs an erasure receipt",
    );
    consent(
        &alice,
        ConsentCmd::Export {
            identity: acme_id.clone(),
            out: file("3-revoke.json"),
        },
    )?;
    consent(
        &acme,
        ConsentCmd::Import {
            file: file("3-revoke.json"),
        },
    )?;
    ensure!(
        status(&acme)?[0].1 == GrantStatus::Revoked,
        "Acme should see the revocation"
    );
    consent(
        &acme,
        ConsentCmd::AckErasure {
            grant: grant.clone(),
            erased: "conversation copy and support notes".into(),
        },
    )?;
    consent(
        &acme,
        ConsentCmd::Export {
            identity: alice_id.clone(),
            out: file("4-erasure.json"),
        },
    )?;
    consent(
        &alice,
        ConsentCmd::Import {
            file: file("4-erasure.json"),
        },
    )?;
    let s = status(&alice)?;
    ensure!(
        s[0].1 == GrantStatus::Revoked && s[0].2,
        "Alice should hold Acme's erasure receipt"
    );

    step(8, "Both ledgers verify, entry by entry");
    ledger_verify(&file("4-erasure.json"))?;
    crate::ledger_show(&alice, None, false)?;

    println!("\nEvery step held.");
    Ok(())
}
