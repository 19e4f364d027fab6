//! Contacts and how a command names a peer (issue 11): from the side of a user who mistypes,
//! a link that was changed on its way, and a store that restarts.

mod common;

use common::{Side, T0, granted};
use rapport_node::EngineError;
use rapport_protocol::{Invitation, Kind};

fn invitation(side: &Side, name: &str, kind: Kind) -> String {
    let addrs = ["/ip4/127.0.0.1/tcp/4001".parse().unwrap()];
    Invitation::new(side.me(), name, kind, &addrs).to_string()
}

#[test]
fn a_contact_is_kept_under_a_name_of_its_own_and_survives_a_restart() {
    let mut alice = Side::new(Kind::Person, "Alice");
    let acme = Side::new(Kind::Org, "Acme");
    let other = Side::new(Kind::Org, "Acme");
    let (c, new) = alice
        .engine
        .add_contact(&invitation(&acme, "Acme", Kind::Org), None, T0)
        .unwrap();
    assert!(new);
    assert_eq!((c.petname.as_str(), c.kind), ("Acme", Kind::Org));
    assert_eq!(c.addrs, ["/ip4/127.0.0.1/tcp/4001"]);
    // Another party calling itself Acme gets a name of its own: names stay unique.
    let (c2, _) = alice
        .engine
        .add_contact(&invitation(&other, "Acme", Kind::Org), None, T0)
        .unwrap();
    assert_eq!(c2.petname, "Acme 2");
    // Adding Acme again updates it and keeps the user's name for it.
    alice
        .engine
        .rename_contact("acme", "Acme Support".into())
        .unwrap();
    let (again, new) = alice
        .engine
        .add_contact(&invitation(&acme, "Acme Ltd", Kind::Org), None, T0 + 5)
        .unwrap();
    assert!(!new);
    assert_eq!(
        (again.petname.as_str(), again.name.as_str()),
        ("Acme Support", "Acme Ltd")
    );
    assert_eq!(again.added_at, T0);

    alice.reopen();
    let names: Vec<String> = alice
        .engine
        .contacts()
        .into_iter()
        .map(|c| c.petname)
        .collect();
    assert_eq!(names, ["Acme 2", "Acme Support"]);
    assert_eq!(alice.engine.petname(&acme.me()), Some("Acme Support"));
    // Its addresses are where the node dials it.
    let rec = alice.engine.store().peer(&acme.me()).unwrap().unwrap();
    assert_eq!(rec.addrs, ["/ip4/127.0.0.1/tcp/4001"]);
}

#[test]
fn names_that_would_mislead_are_refused_and_change_nothing() {
    let mut alice = Side::new(Kind::Person, "Alice");
    let acme = Side::new(Kind::Org, "Acme");
    let bob = Side::new(Kind::Person, "Bob");
    alice
        .engine
        .add_contact(&invitation(&acme, "Acme", Kind::Org), None, T0)
        .unwrap();
    alice
        .engine
        .add_contact(&invitation(&bob, "Bob", Kind::Person), None, T0)
        .unwrap();
    let bob_id = bob.me().to_string();
    let link = invitation(&bob, "Bob", Kind::Person);
    for bad in [
        "",
        " Bob",
        "a\nb",
        bob_id.as_str(),
        link.as_str(),
        &"x".repeat(65),
    ] {
        let err = alice.engine.rename_contact("Acme", bad.into()).unwrap_err();
        assert!(matches!(err, EngineError::Invalid(_)), "{bad:?}: {err}");
    }
    // Bob's name is Bob's: Acme cannot take it, in any case.
    let err = alice
        .engine
        .rename_contact("Acme", "BOB".into())
        .unwrap_err();
    assert!(matches!(err, EngineError::Refused(_)), "{err}");
    let err = alice
        .engine
        .add_contact(
            &invitation(&acme, "Acme", Kind::Org),
            Some("bob".into()),
            T0,
        )
        .unwrap_err();
    assert!(matches!(err, EngineError::Refused(_)), "{err}");
    assert_eq!(alice.engine.petname(&acme.me()), Some("Acme"));
    // This node's own invitation is not a contact.
    let own = invitation(&alice, "Alice", Kind::Person);
    assert!(alice.engine.add_contact(&own, None, T0).is_err());
    assert_eq!(alice.engine.contacts().len(), 2);
}

#[test]
fn a_peer_is_named_by_petname_link_or_an_id_this_node_knows() {
    let mut alice = Side::new(Kind::Person, "Alice");
    let mut acme = Side::new(Kind::Org, "Acme");
    let stranger = Side::new(Kind::Org, "Stranger");
    let link = invitation(&acme, "Acme", Kind::Org);

    // An id never met is refused unless confirmed; nothing is added.
    let err = alice
        .engine
        .resolve_peer(&acme.me().to_string(), false, T0)
        .unwrap_err();
    assert!(err.to_string().contains("never been in touch"), "{err}");
    assert!(alice.engine.contacts().is_empty());
    let r = alice
        .engine
        .resolve_peer(&acme.me().to_string(), true, T0)
        .unwrap();
    assert_eq!((r.identity, r.petname), (acme.me(), None));

    // A link with one character changed names nobody; the link itself adds Acme.
    let mut typo = link.clone();
    let i = typo.len() - 2;
    let c = if &typo[i..=i] == "a" { "b" } else { "a" };
    typo.replace_range(i..=i, c);
    assert!(alice.engine.resolve_peer(&typo, true, T0).is_err());
    assert!(alice.engine.contacts().is_empty());
    let r = alice.engine.resolve_peer(&link, false, T0).unwrap();
    assert_eq!(r.identity, acme.me());
    assert_eq!(r.added.as_ref().map(|c| c.petname.as_str()), Some("Acme"));
    assert_eq!(
        r.addrs,
        [format!("/ip4/127.0.0.1/tcp/4001/p2p/{}", acme.me())]
    );
    // Named again by its link, it is not added twice.
    assert!(
        alice
            .engine
            .resolve_peer(&link, false, T0)
            .unwrap()
            .added
            .is_none()
    );
    // By name, in any case, and by id now that it is a contact.
    assert_eq!(
        alice
            .engine
            .resolve_peer("ACME", false, T0)
            .unwrap()
            .identity,
        acme.me()
    );
    assert_eq!(
        alice
            .engine
            .resolve_peer(&acme.me().to_string(), false, T0)
            .unwrap()
            .identity,
        acme.me()
    );
    let err = alice
        .engine
        .resolve_peer("Acme Corp", false, T0)
        .unwrap_err();
    assert!(matches!(err, EngineError::NotFound(_)), "{err}");

    // A party this node shares a ledger with is known without being a contact: the
    // company knows the customer who granted it.
    granted(&mut alice, &mut acme, T0);
    assert!(
        acme.engine
            .resolve_peer(&alice.me().to_string(), false, T0)
            .is_ok()
    );
    assert!(
        acme.engine
            .resolve_peer(&stranger.me().to_string(), false, T0)
            .is_err()
    );

    // A removed contact is no longer a name.
    alice.engine.remove_contact("Acme").unwrap();
    assert!(alice.engine.resolve_peer("Acme", false, T0).is_err());
}

/// A full disk: adding a contact fails with the disk's error and leaves nothing behind, in
/// memory or in the store (the contact and its addresses are one transaction); once space
/// is free it goes through without a restart.
#[test]
fn a_contact_added_on_a_full_disk_leaves_nothing_behind() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let acme = Side::new(Kind::Org, "Acme");
    let tmp = tempfile::tempdir().unwrap();
    drop(rapport_node::Store::create(tmp.path(), Kind::Person, "Alice", T0).unwrap());
    let full = Arc::new(AtomicBool::new(false));
    let path = tmp.path().join(rapport_node::Store::FILE_NAME);
    let mut alice = rapport_node::Engine::open(common::full_disk_store(&path, &full)).unwrap();
    let link = invitation(&acme, "Acme", Kind::Org);

    full.store(true, Ordering::SeqCst);
    let err = alice.add_contact(&link, None, T0).unwrap_err();
    assert!(err.to_string().contains("disk"), "{err}");
    assert!(alice.contacts().is_empty());
    assert!(alice.resolve_peer("Acme", false, T0).is_err());

    full.store(false, Ordering::SeqCst);
    assert!(alice.store().peer(&acme.me()).unwrap().is_none());
    assert!(alice.store().contacts().unwrap().is_empty());
    alice.add_contact(&link, None, T0).unwrap();
    drop(alice);
    let alice = rapport_node::Engine::open(rapport_node::Store::open(tmp.path()).unwrap()).unwrap();
    assert_eq!(alice.petname(&acme.me()), Some("Acme"));
    assert!(alice.store().peer(&acme.me()).unwrap().is_some());
}
