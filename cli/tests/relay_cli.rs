//! The real binary: `rapport relay run` with an allow-list, and two `rapport node run`
//! processes that can reach each other only through it. They converse; the company goes
//! offline and its mail waits at the relay across a relay restart.

mod support;

use support::{Party, until};

fn reachable_through_relay(p: &Party) -> bool {
    p.json(&["id", "--json"])["listen"]
        .as_array()
        .is_some_and(|a| {
            a.iter()
                .any(|x| x.as_str().unwrap_or("").contains("p2p-circuit"))
        })
}

#[test]
fn a_community_relay_through_the_cli() {
    let tmp = tempfile::tempdir().unwrap();
    let community = Party::new(tmp.path().join("relay"));
    let alice = Party::new(tmp.path().join("alice"));
    let acme = Party::new(tmp.path().join("acme"));
    alice.ok(&["init", "--kind", "person", "--name", "Alice"]);
    acme.ok(&["init", "--kind", "org", "--name", "Acme Ltd"]);
    let (alice_id, acme_id) = (alice.identity(), acme.identity());
    for id in [&alice_id, &acme_id] {
        let out = community.ok(&["relay", "allow", id]);
        assert!(out.contains("is now admitted"), "{out}");
    }
    assert!(
        community
            .ok(&["relay", "allow", &alice_id])
            .contains("already")
    );
    let members = community.ok(&["relay", "members"]);
    assert!(
        members.contains(&alice_id) && members.contains(&acme_id),
        "{members}"
    );
    assert!(
        community
            .fails(&["relay", "allow", "not-an-identity"])
            .contains("identity")
    );

    let relay = community.run_relay(&["--listen", "/ip4/127.0.0.1/tcp/0"]);
    let addr = relay.addr.clone();
    let port = addr
        .split("/tcp/")
        .nth(1)
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    let args = ["--listen", "none", "--relay", addr.as_str()];
    let alice_node = alice.run_node_with(&args);
    let acme_node = acme.run_node_with(&args);
    until("both reachable through the relay", || {
        reachable_through_relay(&alice) && reachable_through_relay(&acme)
    });

    let rel = support::consent_and_open(&alice, &acme, &["--name", "Acme"]);
    let out = alice.ok(&["msg", "send", &rel[..8], "Hello via the community relay"]);
    assert!(out.contains("delivered"), "{out}");
    until("Acme reading it", || {
        acme.ok(&["thread", &rel[..8]])
            .contains("Hello via the community relay")
    });

    // Acme goes offline; Alice's message waits, sealed, in its mailbox.
    assert!(acme_node.terminate(), "the node stops cleanly");
    let out = alice.ok(&["msg", "send", &rel[..8], "Are you there?"]);
    assert!(out.contains("mailbox"), "{out}");
    // The relay restarts on the same port; the mail survives.
    assert!(relay.terminate(), "the relay stops cleanly");
    let relay = community.run_relay(&["--listen", &format!("/ip4/127.0.0.1/tcp/{port}")]);
    assert_eq!(relay.addr, addr);
    let acme_node = acme.run_node_with(&args);
    until("Acme reading the mail", || {
        acme.ok(&["thread", &rel[..8]]).contains("Are you there?")
    });

    // A removal takes effect at once, with a new epoch.
    let out = alice.ok(&["rel", "remove", &rel[..8], &acme_id]);
    assert!(out.contains("new content-key epoch"), "{out}");
    assert!(alice_node.terminate());
    assert!(acme_node.terminate());
    assert!(relay.terminate());
}

/// A second relay asked to listen on a port another process holds refuses to start, with
/// a clear error.
#[test]
fn a_second_relay_on_a_port_in_use_refuses_to_start() {
    let tmp = tempfile::tempdir().unwrap();
    let first = Party::new(tmp.path().join("first"));
    let port = rapport_tests::free_port();
    let listen = format!("/ip4/127.0.0.1/tcp/{port}");
    let relay = first.run_relay(&["--open", "--listen", &listen]);
    let dir = tmp.path().join("second");
    match support::run_until_listening_or_exit(&[
        "--data-dir",
        dir.to_str().unwrap(),
        "relay",
        "run",
        "--open",
        "--listen",
        &listen,
    ]) {
        support::Outcome::Started => {
            panic!("a second relay started on port {port}, which a running relay holds")
        }
        support::Outcome::Exited { ok, stderr } => {
            assert!(!ok, "it must exit with an error");
            assert!(
                stderr.contains(&format!("port {port} is in use by another process")),
                "{stderr}"
            );
        }
    }
    assert!(relay.terminate());
}
