//! The whole consent story through the real `rapport` binary, two real stores.

use std::path::Path;

mod support;

use serde_json::Value;
use support::{Party, run_with_env};

fn grants(p: &Party) -> Vec<Value> {
    serde_json::from_str::<Value>(&p.ok(&["consent", "list", "--json"]))
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn grant_accept_revoke_erase_and_verify() {
    let tmp = tempfile::tempdir().unwrap();
    let alice = Party::new(tmp.path().join("alice"));
    let acme = Party::new(tmp.path().join("acme"));
    alice.ok(&["init", "--kind", "person", "--name", "Alice"]);
    acme.ok(&["init", "--kind", "org", "--name", "Acme Ltd"]);
    let alice_id = alice.identity();
    let acme_id = acme.identity();
    assert!(alice_id.starts_with("12D3KooW") && acme_id.starts_with("12D3KooW"));

    // Acme's invitation reaches Alice (a link on its web site); she names it Acme.
    alice.add_contact(&acme, "Acme");

    // Alice grants, with a notice file whose hash is recorded.
    let notice = tmp.path().join("acme-privacy.txt");
    std::fs::write(&notice, "Acme privacy notice v3").unwrap();
    let out = alice.ok(&[
        "consent",
        "grant",
        "Acme",
        "--scope",
        "conversation:read",
        "--scope",
        "contact:support",
        "--purpose",
        "support for order 1234",
        "--expires",
        "2099-12-31",
        "--terms",
        "SD-BASE-A",
        "--notice",
        path(&notice),
    ]);
    assert!(
        out.contains("granted") && out.contains(" to Acme,"),
        "{out}"
    );
    let g = &grants(&alice)[0];
    assert_eq!(g["status"], "pending");
    assert_eq!(g["terms"], "SD-BASE-A");
    // sha256 of the notice file, as `sha256sum` prints it.
    assert_eq!(
        g["notice_sha256"],
        "7e75be6c3cc1aae01db12fdadfeb5534b79732d5a591046db443d23a69802364"
    );
    let grant_id = g["grant"].as_str().unwrap().to_owned();

    // Alice sends her ledger; Acme verifies and accepts it.
    let to_acme = tmp.path().join("to-acme.json");
    alice.ok(&["consent", "export", "Acme", "--out", path(&to_acme)]);
    let out = acme.ok(&["ledger", "verify", path(&to_acme)]);
    assert!(out.contains("OK"), "{out}");
    let out = acme.ok(&["consent", "accept", path(&to_acme)]);
    assert!(out.contains(&format!("accepted grant {grant_id}")), "{out}");
    let g = &grants(&acme)[0];
    assert_eq!(g["status"], "active");
    assert_eq!(g["role"], "held");

    // Acme sends the acceptance back.
    let to_alice = tmp.path().join("to-alice.json");
    acme.ok(&["consent", "export", &alice_id, "--out", path(&to_alice)]);
    alice.ok(&["consent", "import", path(&to_alice)]);
    assert_eq!(grants(&alice)[0]["status"], "active");
    let table = alice.ok(&["consent", "list"]);
    assert!(
        table.contains("active") && table.contains("SD-BASE-A"),
        "{table}"
    );

    // Alice revokes by a short prefix of the id.
    alice.ok(&[
        "consent",
        "revoke",
        &grant_id[..8],
        "--reason",
        "no longer a customer",
    ]);
    assert_eq!(grants(&alice)[0]["status"], "revoked");
    std::fs::remove_file(&to_acme).unwrap();
    alice.ok(&["consent", "export", &acme_id, "--out", path(&to_acme)]);
    acme.ok(&["consent", "import", path(&to_acme)]);
    // Importing the revocation erases and signs the receipt at once, as over the network;
    // acknowledging again by hand is refused.
    assert_eq!(grants(&acme)[0]["status"], "revoked");
    assert!(grants(&acme)[0]["erasure_acked_at"].is_u64());
    let err = acme.fails(&["consent", "ack-erasure", &grant_id]);
    assert!(err.contains("already acknowledged"), "{err}");
    std::fs::remove_file(&to_alice).unwrap();
    acme.ok(&["consent", "export", &alice_id, "--out", path(&to_alice)]);
    alice.ok(&["consent", "import", path(&to_alice)]);
    let g = &grants(&alice)[0];
    assert_eq!(g["status"], "revoked");
    assert!(g["erasure_acked_at"].is_u64());
    assert!(alice.ok(&["consent", "list"]).contains("erased"));

    // Both ledgers verify, and both parties hold the same entries.
    let out = alice.ok(&["ledger", "verify", path(&to_alice)]);
    assert!(
        out.contains("6 signed change(s)") || out.contains("signed change(s)"),
        "{out}"
    );
    acme.ok(&["ledger", "verify", path(&to_acme)]);
    let show_a: Value = serde_json::from_str(&alice.ok(&["ledger", "show", "--json"])).unwrap();
    let show_b: Value = serde_json::from_str(&acme.ok(&["ledger", "show", "--json"])).unwrap();
    assert_eq!(show_a[0]["entries"], show_b[0]["entries"]);
    let kinds: Vec<&str> = show_a[0]["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["entry"]["body"]["type"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["grant", "accept", "revoke", "erasure_ack"]);
    let text = alice.ok(&["ledger", "show"]);
    assert!(
        text.contains("erasure_ack") && text.contains("no longer a customer"),
        "{text}"
    );

    // Standard consent records, filled from the real ledger.
    let records = |format: &str| -> Value {
        let out = acme.ok(&[
            "consent",
            "export-records",
            "--format",
            format,
            "--controller-name",
            "Acme Ltd",
            "--controller-contact",
            "DPO",
            "--controller-address",
            "1 Main St",
            "--controller-email",
            "dpo@acme.example",
            "--controller-phone",
            "+44 20 0000 0000",
            "--policy-url",
            "https://acme.example/privacy",
        ]);
        serde_json::from_str(&out).unwrap()
    };
    let iso = records("iso27560");
    let rec = iso[0].to_string();
    assert!(
        rec.contains(&grant_id)
            && rec.contains(&alice_id)
            && rec.contains("support for order 1234"),
        "{rec}"
    );
    let kantara = records("kantara");
    let r = &kantara[0];
    assert_eq!(r["piiPrincipalId"], alice_id.as_str());
    assert_eq!(r["consentReceiptID"], grant_id.as_str());
    assert_eq!(r["piiControllers"][0]["piiController"], "Acme Ltd");
    // Required fields left out are refused, not invented, and named all at once (issue
    // 11, 4: they came one error per run, while --help showed them defaulting to empty).
    let err = acme.fails(&["consent", "export-records", "--format", "kantara"]);
    assert!(
        err.contains("Kantara receipts: controller contact, controller address, controller email, controller phone, policy url are empty: pass --controller-contact --controller-address --controller-email --controller-phone --policy-url"),
        "{err}"
    );
    let err = acme.fails(&[
        "consent",
        "export-records",
        "--format",
        "iso27560",
        "--controller-contact",
        "DPO",
    ]);
    assert!(
        err.contains("controller address is empty: pass --controller-address"),
        "{err}"
    );
    let help = acme.ok(&["consent", "export-records", "--help"]);
    assert!(!help.contains("[default: ]"), "{help}");
    assert!(help.contains("Required by kantara"), "{help}");
}

#[test]
fn a_tampered_export_is_refused_and_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let alice = Party::new(tmp.path().join("alice"));
    let acme = Party::new(tmp.path().join("acme"));
    alice.ok(&["init", "--kind", "person", "--name", "Alice"]);
    acme.ok(&["init", "--kind", "org", "--name", "Acme"]);
    let acme_id = acme.identity();
    alice.ok(&[
        "consent",
        "grant",
        &acme_id,
        "--new-peer",
        "--scope",
        "contact:support",
        "--purpose",
        "support",
    ]);
    let file = tmp.path().join("ledger.json");
    alice.ok(&["consent", "export", &acme_id, "--out", path(&file)]);
    let text = std::fs::read_to_string(&file).unwrap();

    // Change the purpose inside the signed change: decode base64, edit, re-encode.
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut v: Value = serde_json::from_str(&text).unwrap();
    let mut raw = b64.decode(v["changes"][0].as_str().unwrap()).unwrap();
    let pos = raw.windows(7).position(|w| w == b"support").unwrap();
    raw[pos..pos + 7].copy_from_slice(b"selling");
    v["changes"][0] = Value::String(b64.encode(&raw));
    let tampered = tmp.path().join("tampered.json");
    std::fs::write(&tampered, serde_json::to_vec(&v).unwrap()).unwrap();

    let err = acme.fails(&["ledger", "verify", path(&tampered)]);
    assert!(err.contains("failed verification"), "{err}");
    let before = acme.ok(&["ledger", "show", "--json"]);
    let err = acme.fails(&["consent", "import", path(&tampered)]);
    assert!(err.contains("refused"), "{err}");
    let err = acme.fails(&["consent", "accept", path(&tampered)]);
    assert!(err.contains("refused"), "{err}");
    assert_eq!(acme.ok(&["ledger", "show", "--json"]), before);
    assert_eq!(before.trim(), "[]");

    // Garbage and oversized-looking input get one clear line each.
    let junk = tmp.path().join("junk.json");
    std::fs::write(&junk, b"{not json").unwrap();
    let err = acme.fails(&["consent", "import", path(&junk)]);
    assert!(err.contains("not a Rapport ledger file"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    // The untampered file still imports.
    acme.ok(&["consent", "import", path(&file)]);

    // A file whose change Acme already holds, but with a swapped signature, is refused too.
    let mut v: Value = serde_json::from_str(&text).unwrap();
    let mut raw = b64.decode(v["changes"][0].as_str().unwrap()).unwrap();
    raw[10] ^= 0x40;
    v["changes"][0] = Value::String(b64.encode(&raw));
    std::fs::write(&tampered, serde_json::to_vec(&v).unwrap()).unwrap();
    let err = acme.fails(&["consent", "import", path(&tampered)]);
    assert!(err.contains("signature does not verify"), "{err}");
}

#[test]
fn errors_are_one_clear_line_and_change_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let alice = Party::new(tmp.path().join("alice"));
    let err = alice.fails(&["id"]);
    assert!(err.contains("rapport init"), "{err}");
    assert!(
        !alice.dir.join("rapport.redb").exists(),
        "a failed command created a store"
    );

    alice.ok(&["init", "--kind", "person", "--name", "Alice"]);
    let id = alice.identity();
    let err = alice.fails(&["init", "--kind", "org", "--name", "Other"]);
    assert!(err.contains("already"), "{err}");
    assert_eq!(
        alice.identity(),
        id,
        "init twice must not replace the identity"
    );

    let acme = Party::new(tmp.path().join("acme"));
    acme.ok(&["init", "--kind", "org", "--name", "Acme"]);
    let acme_id = acme.identity();
    alice.add_contact(&acme, "Acme");
    for (args, expect) in [
        (
            vec![
                "consent",
                "grant",
                "12D3KooWnotakey",
                "--scope",
                "contact:support",
                "--purpose",
                "x",
            ],
            "identity",
        ),
        (
            vec![
                "consent",
                "grant",
                acme_id.as_str(),
                "--scope",
                "contact:",
                "--purpose",
                "x",
            ],
            "not a scope",
        ),
        (
            vec![
                "consent",
                "grant",
                acme_id.as_str(),
                "--scope",
                "contact:support",
                "--purpose",
                "x",
                "--expires",
                "tomorrow",
            ],
            "not a date",
        ),
        (
            vec![
                "consent",
                "grant",
                acme_id.as_str(),
                "--scope",
                "contact:support",
                "--purpose",
                "x",
                "--expires",
                "2001-01-01",
            ],
            "past",
        ),
        (
            vec![
                "consent",
                "grant",
                acme_id.as_str(),
                "--scope",
                "contact:support",
                "--purpose",
                "x",
                "--terms",
                "ALL-YOURS",
            ],
            "unknown terms",
        ),
        (
            vec![
                "consent",
                "grant",
                id.as_str(),
                "--scope",
                "contact:support",
                "--purpose",
                "x",
            ],
            "yourself",
        ),
        (vec!["consent", "revoke", "abcd1234"], "no grant"),
    ] {
        let err = alice.fails(&args);
        assert!(err.contains(expect), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
    }
    assert_eq!(alice.ok(&["consent", "list"]).trim(), "no grants yet");

    // Revoking twice says so.
    alice.ok(&[
        "consent",
        "grant",
        &acme_id,
        "--scope",
        "contact:support",
        "--purpose",
        "x",
    ]);
    let gid = serde_json::from_str::<Value>(&alice.ok(&["consent", "list", "--json"])).unwrap()[0]
        ["grant"]
        .as_str()
        .unwrap()
        .to_owned();
    alice.ok(&["consent", "revoke", &gid]);
    let err = alice.fails(&["consent", "revoke", &gid]);
    assert!(err.contains("already revoked"), "{err}");
}

#[test]
fn store_location_permissions_and_damage() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    let r = run_with_env(
        &["init", "--kind", "community", "--name", "Makers"],
        &[("RAPPORT_HOME", &home)],
    );
    assert!(r.ok, "{}", r.stderr);
    let store = home.join("rapport.redb");
    assert!(store.exists());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&store).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the store holds the secret key");
    }
    let r = run_with_env(&["id", "--json"], &[("RAPPORT_HOME", &home)]);
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["kind"], "community");

    // A damaged store gives a clear error and is left exactly as it was.
    let bad = Party::new(tmp.path().join("bad"));
    std::fs::create_dir_all(&bad.dir).unwrap();
    let junk: Vec<u8> = (0..4096u32).map(|i| (i * 31 % 251) as u8).collect();
    std::fs::write(bad.dir.join("rapport.redb"), &junk).unwrap();
    let err = bad.fails(&["id"]);
    assert!(
        err.contains("damaged") || err.contains("not a Rapport store"),
        "{err}"
    );
    bad.fails(&["init", "--kind", "person", "--name", "X"]);
    assert!(
        std::fs::read(bad.dir.join("rapport.redb")).unwrap() == junk,
        "the damaged store was changed"
    );
}
