//! Issue 11's numbered problems, each through the real `rapport` binary: what a person hit
//! trying Rapport as a new user, shown fixed.

use std::process::Stdio;

mod support;

use support::{Party, rapport};

fn initialised(tmp: &tempfile::TempDir, name: &str) -> Party {
    let p = Party::new(tmp.path().join(name));
    p.ok(&["init", "--kind", "person", "--name", name]);
    p
}

/// 5: a reader that stops early (`rapport id | head -1`) closes the pipe. The command ends
/// quietly with exit 0; it used to panic with "failed printing to stdout" (exit 101).
#[test]
fn a_closed_pipe_ends_a_command_quietly() {
    let tmp = tempfile::tempdir().unwrap();
    let alice = initialised(&tmp, "Alice");
    let dir = alice.dir.to_str().unwrap();
    for args in [
        &["--data-dir", dir, "id"][..],
        &["--data-dir", dir, "id", "--json"],
        &["--data-dir", dir, "ledger", "show", "--json"],
        &["consent", "terms"],
        &["--data-dir", dir, "consent", "export-records", "--help"],
    ] {
        let (reader, writer) = std::io::pipe().unwrap();
        // No one reads: every write finds the pipe closed.
        drop(reader);
        let child = rapport()
            .args(args)
            .stdout(writer)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert_eq!(out.status.code(), Some(0), "{args:?}: {stderr}");
        assert!(stderr.is_empty(), "{args:?}: {stderr}");
    }
}

/// 6: a node's log written to a file holds no colour codes, and a fresh node with no peer
/// logs no warning for that normal condition.
#[test]
fn a_log_in_a_file_has_no_colour_and_no_warning_for_normal_conditions() {
    let tmp = tempfile::tempdir().unwrap();
    let alice = initialised(&tmp, "Alice");
    let log = tmp.path().join("node.log");
    let node = alice.run_node_logged(&[], &log);
    // A command through the running node, so the log has more than the start.
    alice.ok(&["peers"]);
    assert!(node.terminate(), "the node stops cleanly");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("INFO"), "the log is at info: {text}");
    assert!(
        !text.contains('\u{1b}'),
        "colour codes in a log file: {text:?}"
    );
    let warnings: Vec<&str> = text.lines().filter(|l| l.contains("WARN")).collect();
    assert!(warnings.is_empty(), "{warnings:#?}");
}

/// 7: `init --kind company` made a community (clap suggested `community` for the typo);
/// a company is an organisation. And `rel`'s help says what it does.
#[test]
fn a_company_is_an_organisation_and_help_says_what_commands_do() {
    let tmp = tempfile::tempdir().unwrap();
    let acme = Party::new(tmp.path().join("acme"));
    acme.ok(&["init", "--kind", "company", "--name", "Acme"]);
    assert_eq!(acme.json(&["id", "--json"])["kind"], "org");
    let help = acme.ok(&["--help"]);
    let rel = help
        .lines()
        .find(|l| l.trim_start().starts_with("rel "))
        .expect("rel in the help");
    for word in ["open", "members", "disclose"] {
        assert!(rel.contains(word), "{rel}");
    }
}

/// 7: `consent amend` needed every scope typed again to change only the end. Now what is
/// not given stays as the grant has it.
#[test]
fn consent_amend_changes_only_what_is_given() {
    let tmp = tempfile::tempdir().unwrap();
    let alice = initialised(&tmp, "Alice");
    let acme = Party::new(tmp.path().join("acme"));
    acme.ok(&["init", "--kind", "org", "--name", "Acme"]);
    alice.ok(&[
        "consent",
        "grant",
        &acme.identity(),
        "--new-peer",
        "--scope",
        "conversation:read",
        "--scope",
        "contact:support",
        "--purpose",
        "support",
        "--expires",
        "2099-12-31",
    ]);
    let grant = || alice.json(&["consent", "list", "--json"])[0].clone();
    let id = grant()["grant"].as_str().unwrap().to_owned();
    let scopes = |g: &serde_json::Value| g["scopes"].to_string();
    let (scopes0, expires0) = (scopes(&grant()), grant()["expires"].clone());
    assert!(scopes0.contains("contact:support"), "{scopes0}");

    alice.ok(&["consent", "amend", &id[..8], "--expires", "2098-01-01"]);
    let g = grant();
    assert_eq!(scopes(&g), scopes0, "the scopes stay");
    assert_ne!(g["expires"], expires0, "the end moved");
    let expires1 = g["expires"].clone();

    alice.ok(&["consent", "amend", &id[..8], "--scope", "conversation:read"]);
    let g = grant();
    assert!(!scopes(&g).contains("contact:support"), "{g}");
    assert!(scopes(&g).contains("conversation:read"), "{g}");
    assert_eq!(g["expires"], expires1, "the end stays");

    let err = alice.fails(&["consent", "amend", &id[..8]]);
    assert!(err.contains("nothing to amend"), "{err}");
}

/// Shell completions and the manual come from the command definitions, so they list
/// every command there is.
#[test]
fn completions_and_manual_pages_cover_every_command() {
    let tmp = tempfile::tempdir().unwrap();
    let p = Party::new(tmp.path().join("unused"));
    for shell in ["bash", "zsh", "fish"] {
        let script = p.ok(&["completions", shell]);
        for word in [
            "consent",
            "export-records",
            "--controller-address",
            "completions",
        ] {
            assert!(script.contains(word), "{shell}: {word}");
        }
    }
    let page = p.ok(&["man"]);
    assert!(page.contains(".TH rapport 1"), "{page}");
    let dir = tmp.path().join("man");
    let out = p.ok(&["man", "--out", dir.to_str().unwrap()]);
    assert!(out.starts_with("wrote "), "{out}");
    let amend = std::fs::read_to_string(dir.join("rapport-consent-amend.1")).unwrap();
    assert!(amend.contains("rapport consent amend"), "{amend}");
    assert!(amend.contains("what is not given stays"), "{amend}");
    assert!(!tmp.path().join("unused").exists(), "no store was made");
}

/// 7: for a node reachable only through a relay (`--listen none`), `rapport id` printed a
/// circuit address with its own id twice (`…/p2p-circuit/p2p/X/p2p/X`), and `connect` to
/// such an address answered with the relay, to which it was already connected, not the
/// node.
#[test]
fn a_relayed_node_shows_one_dialable_address_and_connect_reaches_it() {
    let tmp = tempfile::tempdir().unwrap();
    let community = Party::new(tmp.path().join("relay"));
    let alice = initialised(&tmp, "Alice");
    let acme = Party::new(tmp.path().join("acme"));
    acme.ok(&["init", "--kind", "org", "--name", "Acme"]);
    let (alice_id, acme_id) = (alice.identity(), acme.identity());
    for id in [&alice_id, &acme_id] {
        community.ok(&["relay", "allow", id]);
    }
    let relay = community.run_relay(&["--listen", "/ip4/127.0.0.1/tcp/0"]);
    let args = ["--listen", "none", "--relay", relay.addr.as_str()];
    let alice_node = alice.run_node_with(&args);
    let acme_node = acme.run_node_with(&args);
    let circuit = |p: &Party| -> Option<String> {
        p.json(&["id", "--json"])["listen"]
            .as_array()?
            .iter()
            .filter_map(|a| a.as_str())
            .find(|a| a.contains("p2p-circuit"))
            .map(str::to_owned)
    };
    support::until("both reachable through the relay", || {
        circuit(&alice).is_some() && circuit(&acme).is_some()
    });
    let addr = circuit(&acme).unwrap();
    assert_eq!(
        addr.matches(&format!("/p2p/{acme_id}")).count(),
        1,
        "{addr}"
    );
    assert!(
        addr.ends_with(&format!("/p2p-circuit/p2p/{acme_id}")),
        "{addr}"
    );
    let out = alice.ok(&["connect", &addr]);
    assert_eq!(out.trim(), format!("connected to {acme_id} at {addr}"));
    assert!(alice_node.terminate());
    assert!(acme_node.terminate());
    assert!(relay.terminate());
}

/// 7: `--data-dir` is offered on every command; where it does nothing, the command says so
/// (on standard error, so a wrapper that always passes it keeps working).
#[test]
fn data_dir_where_it_does_nothing_is_said() {
    let tmp = tempfile::tempdir().unwrap();
    let p = Party::new(tmp.path().join("none"));
    let run = p.run(&["consent", "terms"]);
    assert!(run.ok);
    assert!(
        run.stderr
            .contains("--data-dir does nothing for `rapport consent terms`"),
        "{}",
        run.stderr
    );
    assert!(!p.dir.exists(), "no store was made");
    let run = p.run(&["man"]);
    assert!(
        run.ok && run.stderr.contains("does nothing"),
        "{}",
        run.stderr
    );
    let run = p.run(&["id"]);
    assert!(
        !run.ok && !run.stderr.contains("does nothing"),
        "{}",
        run.stderr
    );
}

/// `--json` is accepted by every command, before or after it, and a write prints what it
/// did as one JSON value.
#[test]
fn every_command_takes_json_and_a_write_prints_what_it_did() {
    let tmp = tempfile::tempdir().unwrap();
    let alice = Party::new(tmp.path().join("alice"));
    let made = alice.json(&["--json", "init", "--kind", "person", "--name", "Alice"]);
    assert_eq!(made["kind"], "person");
    let acme = Party::new(tmp.path().join("acme"));
    acme.ok(&["init", "--kind", "org", "--name", "Acme"]);
    let acme_id = acme.identity();
    let granted = alice.json(&[
        "consent",
        "grant",
        &acme_id,
        "--new-peer",
        "--scope",
        "conversation:read",
        "--purpose",
        "support",
        "--json",
    ]);
    let grant = granted["entry"].as_str().unwrap().to_owned();
    assert_eq!(granted["peer"], acme_id.as_str());
    let amended = alice.json(&[
        "consent",
        "amend",
        &grant[..8],
        "--expires",
        "2099-01-01",
        "--json",
    ]);
    assert_eq!(amended["grant"], grant.as_str());
    let file = tmp.path().join("ledger.json");
    let exported = alice.json(&[
        "consent",
        "export",
        &acme_id,
        "--out",
        file.to_str().unwrap(),
        "--json",
    ]);
    assert!(exported["changes"].as_u64().unwrap() >= 2, "{exported}");
    let checked = alice.json(&["ledger", "verify", file.to_str().unwrap(), "--json"]);
    assert_eq!(checked["verified"], true);
    let revoked = alice.json(&["consent", "revoke", &grant[..8], "--json"]);
    assert_eq!(revoked["grant"], grant.as_str());
    let roster = alice.json(&["consent", "terms", "--json"]);
    assert!(roster.as_array().is_some_and(|r| !r.is_empty()), "{roster}");
    let relay = Party::new(tmp.path().join("relay"));
    let allowed = relay.json(&["relay", "allow", &acme_id, "--json"]);
    assert_eq!(allowed["admitted"], true);
    assert_eq!(
        relay.json(&["relay", "members", "--json"])[0],
        acme_id.as_str()
    );
    for reads in [
        &["id", "--json"][..],
        &["consent", "list", "--json"],
        &["inbox", "--json"],
    ] {
        alice.json(reads);
    }
}

/// 3: a message refused by its reader printed "sent message …", then "refused by …", then
/// an error. Now a write says one outcome: where it went (exit 0), or who refused it and
/// why (exit 1, nothing on standard output), the message staying in the sender's copy.
#[test]
fn a_message_reports_one_outcome() {
    let tmp = tempfile::tempdir().unwrap();
    let alice = initialised(&tmp, "Alice");
    let acme = Party::new(tmp.path().join("acme"));
    acme.ok(&["init", "--kind", "org", "--name", "Acme"]);
    let alice_id = alice.identity();
    let alice_node = alice.run_node();
    let acme_node = acme.run_node();
    alice.ok(&["connect", &acme.listen_addr()]);
    let rel = support::consent_and_open(&alice, &acme, &["--name", "Acme"]);

    // Acme knows Alice by the name she gave herself as the relationship's owner (in
    // quotes: hers, not Acme's), not by her id.
    let out = acme.ok(&["msg", "send", &rel[..8], "It ships today."]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 1, "{out}");
    assert!(
        lines[0].starts_with("message ") && lines[0].ends_with(": delivered to \"Alice\""),
        "{out}"
    );
    assert!(!out.contains(&alice_id), "{out}");

    // Acme holds no contact:marketing: Alice's node refuses it.
    let run = acme.run(&[
        "msg",
        "send",
        &rel[..8],
        "50% off!",
        "--purpose",
        "marketing",
    ]);
    assert!(!run.ok);
    assert!(run.stdout.is_empty(), "{}", run.stdout);
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{}", run.stderr);
    assert!(lines[0].starts_with("error: message "), "{}", run.stderr);
    assert!(
        lines[0].contains("refused by \"Alice\": "),
        "{}",
        run.stderr
    );
    assert!(
        lines[0].ends_with("it stays only in this node's copy"),
        "{}",
        run.stderr
    );
    assert!(
        acme.ok(&["thread", &rel[..8]]).contains("50% off!"),
        "kept where written"
    );

    // What a peer wrote cannot steer Alice's terminal: an escape sequence in a message is
    // shown escaped, in the thread and the inbox, and kept as written under --json.
    acme.ok(&["msg", "send", &rel[..8], "\u{1b}[2J\u{1b}[Hall clear"]);
    support::until("Alice holding Acme's second message", || {
        alice.ok(&["thread", &rel[..8]]).contains("all clear")
    });
    for shown in [alice.ok(&["thread", &rel[..8]]), alice.ok(&["inbox"])] {
        assert!(!shown.contains('\u{1b}'), "{shown:?}");
        assert!(shown.contains("\\u{1b}[2J"), "{shown:?}");
    }
    assert!(alice.ok(&["inbox", "--json"]).contains("\\u001b[2J"));

    // 2: at Acme, `rel list` showed Acme's own name as the relationship's members; it
    // shows the others in it: Alice, by the name she disclosed.
    let with = |p: &Party| -> String {
        let list = p.ok(&["rel", "list"]);
        let mut lines = list.lines();
        let at = lines.next().unwrap().find("with").expect("a with column");
        // Columns are padded by characters (the title may hold a "…").
        let row = lines.next().expect("one relationship");
        row.chars()
            .skip(at)
            .take(28)
            .collect::<String>()
            .trim()
            .to_owned()
    };
    assert_eq!(
        with(&acme),
        "\"Alice\"",
        "the name Alice gave herself, quoted"
    );
    assert_eq!(with(&alice), "Acme");

    // A consent write says its one outcome the same way, naming Acme as Alice named it
    // (she added it from its invitation).
    let grant = alice.json(&["consent", "list", "--json"])[0]["grant"]
        .as_str()
        .unwrap()
        .to_owned();
    let out = alice.ok(&["consent", "amend", &grant[..8], "--expires", "2099-01-01"]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 1, "{out}");
    assert!(
        lines[0].starts_with("amended grant ") && lines[0].ends_with(": delivered to Acme"),
        "{out}"
    );
    assert!(alice_node.terminate());
    assert!(acme_node.terminate());
}

/// Exit codes: 2 for a command line that is wrong (clap's usage message), 1 for a
/// refused command (one `error:` line), 0 for done.
#[test]
fn exit_codes_say_usage_refused_or_done() {
    let tmp = tempfile::tempdir().unwrap();
    let alice = initialised(&tmp, "Alice");
    let code = |args: &[&str]| {
        rapport()
            .arg("--data-dir")
            .arg(&alice.dir)
            .args(args)
            .output()
            .unwrap()
            .status
            .code()
    };
    assert_eq!(code(&["consent", "grant"]), Some(2), "a missing argument");
    assert_eq!(code(&["no-such-command"]), Some(2));
    assert_eq!(
        code(&["consent", "revoke", "ffff"]),
        Some(1),
        "no such grant"
    );
    assert_eq!(code(&["id"]), Some(0));
}

/// 1: a one-character typo in a peer id made a signed grant to an identity nobody holds
/// (exit 0), mailed for ever. Now an id this node never met is refused unless the user
/// confirms it, and people hand each other invitations, whose checksum catches a typo.
#[test]
fn a_mistyped_id_is_refused_and_an_invitation_catches_typos() {
    let tmp = tempfile::tempdir().unwrap();
    let alice = initialised(&tmp, "Alice");
    let acme = Party::new(tmp.path().join("acme"));
    acme.ok(&["init", "--kind", "company", "--name", "Acme Ltd"]);
    let acme_id = acme.identity();
    let grant = |who: &str, extra: &[&str]| {
        let mut args = vec![
            "consent",
            "grant",
            who,
            "--scope",
            "conversation:read",
            "--purpose",
            "support",
        ];
        args.extend_from_slice(extra);
        alice.run(&args)
    };

    // The id with its last character changed: refused, nothing signed. Some changes
    // give no valid key at all; at least one of these gives a valid one nobody holds.
    let mut never_met = 0;
    for c in "abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ".chars() {
        let mut typo = acme_id.clone();
        if typo.ends_with(c) {
            continue;
        }
        typo.pop();
        typo.push(c);
        let run = grant(&typo, &[]);
        assert!(!run.ok, "a grant to {typo} went through: {}", run.stdout);
        assert_eq!(run.stderr.trim().lines().count(), 1, "{}", run.stderr);
        if run.stderr.contains("never been in touch") {
            assert!(run.stderr.contains("--new-peer"), "{}", run.stderr);
            never_met += 1;
        }
    }
    assert!(never_met > 0, "no typo gave a valid key");
    assert_eq!(alice.ok(&["consent", "list"]).trim(), "no grants yet");

    // Acme's invitation, with one character changed, cut short, or not one at all.
    let link = acme.invitation();
    assert!(link.starts_with("rapport:"), "{link}");
    let mut typo = link.clone().into_bytes();
    let last = typo.len() - 3;
    typo[last] = if typo[last] == b'a' { b'b' } else { b'a' };
    let typo = String::from_utf8(typo).unwrap();
    for (bad, why) in [
        (typo.as_str(), "checksum"),
        (&link[..link.len() - 5], "checksum"),
        ("rapport:not+base32", "copied whole"),
    ] {
        let err = alice.fails(&["contact", "add", bad]);
        assert!(err.contains(why), "{bad}: {err}");
        let err = grant(bad, &[]).stderr;
        assert!(err.contains(why), "{bad}: {err}");
    }
    assert!(alice.ok(&["contact", "list"]).contains("no contacts yet"));
    assert_eq!(alice.ok(&["consent", "list"]).trim(), "no grants yet");

    // The link as a QR code would carry it (capitals) and wrapped by a terminal: the same
    // contact, named by what Acme calls itself unless Alice chooses a name.
    let wrapped = format!("{}\n  {}", &link[..30], &link[30..]).to_uppercase();
    let added = alice.json(&["contact", "add", &wrapped, "--json"]);
    assert_eq!(added["new"], true);
    assert_eq!(added["contact"]["petname"], "Acme Ltd");
    assert_eq!(added["contact"]["kind"], "org");
    assert_eq!(added["contact"]["identity"], acme_id.as_str());
    alice.ok(&["contact", "rename", "Acme Ltd", "Acme"]);
    let list = alice.ok(&["contact", "list"]);
    assert!(list.contains("Acme ") && list.contains("org"), "{list}");
    assert!(!list.contains(&acme_id), "ids only with -v: {list}");
    assert!(alice.ok(&["contact", "list", "-v"]).contains(&acme_id));

    // Now the grant goes to Acme by name; every list names it.
    let out = grant("acme", &[]).stdout;
    assert!(
        out.starts_with("granted ") && out.contains(" to Acme, "),
        "{out}"
    );
    let list = alice.ok(&["consent", "list"]);
    assert!(
        list.contains("Acme (org)") && !list.contains(&acme_id),
        "{list}"
    );
    assert!(alice.ok(&["consent", "list", "-v"]).contains(&acme_id));
    let shown = alice.ok(&["ledger", "show", "Acme"]);
    assert!(
        shown
            .lines()
            .next()
            .unwrap()
            .contains("customer you  grantee Acme (org)"),
        "{shown}"
    );
    assert_eq!(
        alice.json(&["consent", "list", "--json"])[0]["peer"],
        acme_id.as_str(),
        "the id under --json"
    );

    // The id itself works once confirmed, and from then on (it shares a ledger now).
    let bob = Party::new(tmp.path().join("bob"));
    bob.ok(&["init", "--kind", "person", "--name", "Bob"]);
    let bob_id = bob.identity();
    assert!(!grant(&bob_id, &[]).ok);
    assert!(grant(&bob_id, &["--new-peer"]).ok);
    // (Another expiry: the same grant in the same second is the same entry.)
    let again = grant(&bob_id, &["--expires", "2099-01-01"]);
    assert!(again.ok, "{}", again.stderr);
}

/// 2: outcomes and lists showed ids ("delivered to 12D3KooW…", peers by 8-character
/// suffixes). A contact added from the invitation of a running node is dialled at the
/// addresses it carries, and named in outcomes, `peers` and `connect`.
#[test]
fn a_contact_is_reached_by_its_invitation_and_named_everywhere() {
    let tmp = tempfile::tempdir().unwrap();
    let alice = initialised(&tmp, "Alice");
    let acme = Party::new(tmp.path().join("acme"));
    acme.ok(&["init", "--kind", "org", "--name", "Acme"]);
    let alice_node = alice.run_node();
    let acme_node = acme.run_node();
    let invite = acme.json(&["invite", "--json"]);
    let addrs = invite["addrs"].as_array().unwrap();
    assert!(
        addrs
            .iter()
            .any(|a| a.as_str().unwrap().starts_with("/ip4/127.0.0.1/tcp/")),
        "{invite}"
    );
    // Piped, `invite` prints the link alone (a QR code is for a terminal).
    assert_eq!(
        acme.ok(&["invite"]).trim(),
        invite["link"].as_str().unwrap()
    );

    alice.ok(&[
        "contact",
        "add",
        invite["link"].as_str().unwrap(),
        "--name",
        "Acme Support",
    ]);
    let out = alice.ok(&["connect", "Acme Support"]);
    assert!(
        out.starts_with("connected to Acme Support (org) at /ip4/127.0.0.1/"),
        "{out}"
    );
    let peers = alice.ok(&["peers"]);
    assert!(peers.contains("connected Acme Support (org)"), "{peers}");

    let out = alice.ok(&[
        "consent",
        "grant",
        "Acme Support",
        "--scope",
        "conversation:read",
        "--purpose",
        "support",
    ]);
    assert!(
        out.contains(" to Acme Support, pending until they accept: delivered to Acme Support"),
        "{out}"
    );
    // A relationship names the contact as Alice does, unless she says otherwise.
    let out = alice.ok(&["rel", "open", "acme support"]);
    assert!(out.contains(" with Acme Support: "), "{out}");
    let rels = alice.json(&["rel", "list", "--json"]);
    assert_eq!(rels[0]["members"][0]["name"], "Acme Support", "{rels}");
    assert_eq!(rels[0]["title"], "Alice and Acme Support", "{rels}");
    assert!(alice_node.terminate());
    assert!(acme_node.terminate());
}

/// 6: a node the relay does not admit (not on its allow-list) logged nothing and showed "no
/// peers known yet". Now its log says the relay turned it away and what to do, once, and
/// `peers` says so too.
#[test]
fn a_node_the_relay_turns_away_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let community = Party::new(tmp.path().join("relay"));
    let alice = initialised(&tmp, "Alice");
    let relay = community.run_relay(&["--listen", "/ip4/127.0.0.1/tcp/0"]);
    let log = tmp.path().join("alice.log");
    let node = alice.run_node_logged(&["--listen", "none", "--relay", relay.addr.as_str()], &log);
    let said = || std::fs::read_to_string(&log).unwrap_or_default();
    support::until("the log saying the relay turned the node away", || {
        said().contains("allow-list")
    });
    let line = said()
        .lines()
        .find(|l| l.contains("allow-list"))
        .unwrap()
        .to_owned();
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains(&alice.identity()), "what to ask for: {line}");
    let peers = alice.ok(&["peers"]);
    assert!(peers.contains("allow-list"), "{peers}");

    // Doing what it says works: the community admits Alice by her invitation, and her
    // node, trying again by itself, reserves a circuit.
    let out = community.ok(&["relay", "allow", &alice.invitation()]);
    assert!(out.starts_with("\"Alice\" (person) "), "{out}");
    support::until("Alice's node reserving a circuit at the relay", || {
        alice.ok(&["peers"]).contains("circuit reserved")
    });
    let warned = said().lines().filter(|l| l.contains("allow-list")).count();
    assert_eq!(warned, 1, "said once, not at every retry: {}", said());
    assert!(node.terminate());
}
