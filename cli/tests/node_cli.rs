//! The real `rapport` binary against running `rapport node run` processes: a customer and
//! a company on loopback, driven only through the CLI.

mod support;

use support::{Party, until};

#[test]
fn customer_and_company_through_the_cli() {
    let tmp = tempfile::tempdir().unwrap();
    let alice = Party::new(tmp.path().join("alice"));
    let acme = Party::new(tmp.path().join("acme"));
    alice.ok(&["init", "--kind", "person", "--name", "Alice"]);
    acme.ok(&["init", "--kind", "org", "--name", "Acme Ltd"]);
    let (alice_id, acme_id) = (alice.identity(), acme.identity());

    // Without a running node, network commands say so.
    let err = alice.fails(&["msg", "send", "abcd", "hi"]);
    assert!(err.contains("no rapport node is running"), "{err}");
    assert!(alice.fails(&["peers"]).contains("rapport node run"));

    let alice_node = alice.run_node();
    let acme_node = acme.run_node();
    // While a node runs, the CLI works through its API (the store is the node's).
    assert!(alice.ok(&["id"]).contains("listening: /ip4/127.0.0.1/tcp/"));
    let acme_addr = acme.listen_addr();
    let out = alice.ok(&["connect", &acme_addr]);
    assert!(out.contains(&acme_id), "{out}");
    let peers = alice.json(&["peers", "--json"]);
    assert!(
        peers
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["peer"] == acme_id.as_str() && p["connected"] == true)
    );

    // Consent over the network: grant, accept, and the acceptance comes back.
    let out = alice.ok(&[
        "consent",
        "grant",
        &acme_id,
        "--scope",
        "conversation:read",
        "--scope",
        "conversation:write",
        "--scope",
        "contact:support",
        "--purpose",
        "support for order 1234",
    ]);
    assert!(out.contains("delivered"), "{out}");
    until("the grant reaching Acme", || {
        acme.json(&["consent", "list", "--json"])[0]["status"] == "pending"
    });
    // One line for the grant, with its one outcome: the acceptance reached Alice.
    let out = acme.ok(&["consent", "accept"]);
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(
        out.starts_with("accepted grant")
            && out
                .trim_end()
                .ends_with(&format!(": delivered to {alice_id}")),
        "{out}"
    );
    until("Alice seeing the acceptance", || {
        alice.json(&["consent", "list", "--json"])[0]["status"] == "active"
    });

    // A relationship and a conversation.
    let out = alice.ok(&[
        "rel",
        "open",
        &acme_id,
        "--name",
        "Acme",
        "--title",
        "Order 1234",
    ]);
    assert!(out.contains("delivered"), "{out}");
    let rel = alice.json(&["rel", "list", "--json"])[0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    until("Acme holding the relationship", || {
        acme.json(&["rel", "list", "--json"])
            .as_array()
            .unwrap()
            .len()
            == 1
    });
    let out = alice.ok(&["msg", "send", &rel[..8], "Where is my order?"]);
    assert!(out.contains("delivered"), "{out}");
    let out = acme.ok(&["msg", "send", &rel[..8], "It ships today."]);
    assert!(out.contains("delivered"), "{out}");
    let inbox = alice.ok(&["inbox"]);
    assert!(inbox.contains("It ships today."), "{inbox}");
    let thread = acme.ok(&["thread", &rel[..8]]);
    assert!(
        thread.contains("Where is my order?") && thread.contains("It ships today."),
        "{thread}"
    );

    // Unsolicited marketing is refused, and Alice sees the evidence.
    let err = acme.fails(&[
        "msg",
        "send",
        &rel[..8],
        "50% off!",
        "--purpose",
        "marketing",
    ]);
    assert!(err.contains("refused"), "{err}");
    let refusals = alice.ok(&["refusals"]);
    assert!(
        refusals.contains("unsolicited") && refusals.contains("50% off!"),
        "{refusals}"
    );

    // Revocation: Acme erases and its receipt arrives; Acme's writes are refused.
    let gid = alice.json(&["consent", "list", "--json"])[0]["grant"]
        .as_str()
        .unwrap()
        .to_owned();
    alice.ok(&[
        "consent",
        "revoke",
        &gid[..8],
        "--reason",
        "closed my account",
    ]);
    until("Acme's erasure receipt reaching Alice", || {
        alice.json(&["consent", "list", "--json"])[0]["erasure_acked_at"].is_u64()
    });
    assert_eq!(
        acme.json(&["rel", "list", "--json"])
            .as_array()
            .unwrap()
            .len(),
        0
    );
    assert!(alice.ok(&["consent", "list"]).contains("erased"));
    let err = acme.fails(&["msg", "send", &rel[..8], "still there?"]);
    assert!(err.contains("no relationship"), "{err}");

    // Both nodes stop cleanly on SIGTERM and leave no node.json behind; the store then
    // opens directly and holds everything.
    assert!(alice_node.terminate(), "alice's node exits 0 on SIGTERM");
    assert!(acme_node.terminate(), "acme's node exits 0 on SIGTERM");
    assert!(!alice.dir.join(rapport_node::NODE_FILE).exists());
    let thread = alice.ok(&["thread", &rel[..8]]);
    assert!(thread.contains("It ships today."), "{thread}");
    let show = acme.json(&["ledger", "show", &alice_id, "--json"]);
    let kinds: Vec<&str> = show[0]["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["entry"]["body"]["type"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["grant", "accept", "revoke", "erasure_ack"]);
}

#[cfg(unix)]
#[test]
fn the_api_token_is_private_and_required() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let alice = Party::new(tmp.path().join("alice"));
    alice.ok(&["init", "--kind", "person", "--name", "Alice"]);
    let node = alice.run_node();
    let token = alice.dir.join(rapport_node::TOKEN_FILE);
    let mode = std::fs::metadata(&token).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let file: rapport_node::NodeFile = serde_json::from_str(
        &std::fs::read_to_string(alice.dir.join(rapport_node::NODE_FILE)).unwrap(),
    )
    .unwrap();
    assert!(file.api.ip().is_loopback());
    // A request without the token is refused; the OpenAPI document is public.
    let resp = raw_get(file.api, "/v1/status", None);
    assert!(resp.starts_with("HTTP/1.1 401"), "{resp}");
    let resp = raw_get(file.api, "/v1/status", Some("wrong"));
    assert!(resp.starts_with("HTTP/1.1 401"), "{resp}");
    let t = std::fs::read_to_string(&token).unwrap();
    let resp = raw_get(file.api, "/v1/status", Some(t.trim()));
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let resp = raw_get(file.api, rapport_node::OPENAPI_PATH, None);
    assert!(resp.starts_with("HTTP/1.1 200") && resp.contains("\"openapi\":\"3.1.0\""));
    assert!(node.terminate());
}

/// A plain HTTP/1.1 GET on loopback; returns the whole response text.
fn raw_get(addr: std::net::SocketAddr, path: &str, token: Option<&str>) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// A node killed with SIGKILL mid-work loses nothing it acknowledged: every message the
/// CLI reported as sent is in the store after the crash, and the store opens again.
#[test]
fn nothing_acknowledged_is_lost_when_the_node_is_killed() {
    let tmp = tempfile::tempdir().unwrap();
    let alice = Party::new(tmp.path().join("alice"));
    let acme = Party::new(tmp.path().join("acme"));
    alice.ok(&["init", "--kind", "person", "--name", "Alice"]);
    acme.ok(&["init", "--kind", "org", "--name", "Acme"]);
    let acme_id = acme.identity();
    let node = alice.run_node();
    alice.ok(&[
        "rel",
        "open",
        &acme_id,
        "--new-peer",
        "--title",
        "crash test",
    ]);
    let rel = alice.json(&["rel", "list", "--json"])[0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    for i in 0..20 {
        alice.ok(&["msg", "send", &rel[..8], &format!("acknowledged {i}")]);
    }
    drop(node); // SIGKILL, no clean shutdown
    let thread = alice.json(&["thread", &rel[..8], "--json"]);
    let texts: Vec<&str> = thread["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["text"].as_str().unwrap())
        .collect();
    for i in 0..20 {
        assert!(
            texts.contains(&format!("acknowledged {i}").as_str()),
            "message {i} was lost"
        );
    }
    // And the node runs again on the same store.
    let node = alice.run_node();
    assert!(node.terminate());
}

/// A second node asked to listen on a port another process holds refuses to start, with a
/// clear error, instead of sharing the port in silence (and half the connections).
#[test]
fn a_second_node_on_a_port_in_use_refuses_to_start() {
    let tmp = tempfile::tempdir().unwrap();
    let alice = Party::new(tmp.path().join("alice"));
    let bob = Party::new(tmp.path().join("bob"));
    alice.ok(&["init", "--kind", "person", "--name", "Alice"]);
    bob.ok(&["init", "--kind", "person", "--name", "Bob"]);
    let port = rapport_tests::free_port();
    let listen = format!("/ip4/127.0.0.1/tcp/{port}");
    let node = alice.run_node_with(&["--listen", &listen]);
    let dir = bob.dir.to_str().unwrap();
    match support::run_until_listening_or_exit(&[
        "--data-dir",
        dir,
        "node",
        "run",
        "--no-mdns",
        "--listen",
        &listen,
    ]) {
        support::Outcome::Started => {
            panic!("a second node started on port {port}, which a running node holds")
        }
        support::Outcome::Exited { ok, stderr } => {
            assert!(!ok, "it must exit with an error");
            assert!(
                stderr.contains(&format!("port {port} is in use by another process")),
                "{stderr}"
            );
        }
    }
    assert!(node.terminate());
}

/// Hundreds of idle connections and half-sent request headers to the local API (no token
/// needed to open a socket) do not lock the owner out: with the node's open-file limit
/// below their number, an authorised request still answers promptly.
#[cfg(unix)]
#[test]
fn the_api_answers_its_owner_under_a_flood_of_idle_connections() {
    use std::io::{Read, Write};
    let tmp = tempfile::tempdir().unwrap();
    let alice = Party::new(tmp.path().join("alice"));
    alice.ok(&["init", "--kind", "person", "--name", "Alice"]);
    // The node runs with an open-file limit of 256; the flood is 300 sockets.
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg("ulimit -n 256 && exec \"$0\" \"$@\"")
        .arg(support::bin())
        .arg("--data-dir")
        .arg(&alice.dir)
        .args([
            "node",
            "run",
            "--no-mdns",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
        ])
        .env_remove("RAPPORT_HOME")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    until("the node's API answers", || {
        alice.dir.join(rapport_node::NODE_FILE).exists() && alice.run(&["peers"]).ok
    });
    let file: rapport_node::NodeFile = serde_json::from_str(
        &std::fs::read_to_string(alice.dir.join(rapport_node::NODE_FILE)).unwrap(),
    )
    .unwrap();
    let token = std::fs::read_to_string(alice.dir.join(rapport_node::TOKEN_FILE)).unwrap();
    let mut flood = Vec::new();
    for i in 0..300 {
        let mut s = std::net::TcpStream::connect(file.api).unwrap();
        if i % 2 == 0 {
            // Half a request: headers that never end.
            let _ = s.write_all(b"GET /v1/status HTTP/1.1\r\nHost: localhost\r\n");
        }
        flood.push(s);
    }
    let started = std::time::Instant::now();
    let mut s = std::net::TcpStream::connect(file.api).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    write!(
        s,
        "GET /v1/status HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
        token.trim()
    )
    .unwrap();
    let mut out = String::new();
    let read = s.read_to_string(&mut out);
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        read.is_ok() && out.starts_with("HTTP/1.1 200"),
        "the owner's request did not answer within 20s under the flood ({:?} after {:?}): {out:?}",
        read.err(),
        started.elapsed()
    );
    drop(flood);
}
