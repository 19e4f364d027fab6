//! `rapport invite` and `rapport contact`: how people hand each other their identities
//! without typing 52-character ids.

use std::io::IsTerminal;
use std::path::Path;

use anyhow::Result;
use rapport_node::Store;
use rapport_protocol::Invitation;
use serde_json::{Value, json};

use crate::ContactCmd;
use crate::backend::{Api, Backend};
use crate::out::{self, say};

/// Prints this node's invitation: from the running node, with the addresses it listens on
/// now; else from the store, with none.
pub(crate) fn invite(dir: &Path, no_qr: bool, json: bool) -> Result<()> {
    let v: Value = match Api::find(dir) {
        Some(api) => api.get("/v1/invitation")?,
        None => {
            let p = Store::open_read_only(dir)?.profile()?;
            let inv = Invitation::new(p.identity, &p.name, p.kind, &[]);
            eprintln!(
                "note: no node is running, so the invitation carries no address; it still names you. Start `rapport node run` and invite again to give your addresses too."
            );
            json!({
                "link": inv.to_string(),
                "identity": inv.identity,
                "name": inv.name,
                "kind": inv.kind,
                "addrs": Vec::<String>::new(),
            })
        }
    };
    if json {
        return out::json(&v);
    }
    let link = v["link"].as_str().unwrap_or_default();
    say!("{link}");
    if std::io::stdout().is_terminal() {
        if !no_qr {
            say!("{}", qr(link)?);
        }
        say!(
            "They add you with: rapport contact add {link}\nIt names {} ({}) with {} address(es); a typo in it is caught by its checksum.",
            v["name"].as_str().unwrap_or_default(),
            v["kind"].as_str().unwrap_or_default(),
            v["addrs"].as_array().map_or(0, Vec::len)
        );
    }
    Ok(())
}

/// The link as a QR code drawn with block characters, light on dark (most terminals). It
/// carries the link in capitals, which QR codes hold in fewer modules; the link reads the
/// same in either case.
fn qr(link: &str) -> Result<String> {
    use qrcode::render::unicode::Dense1x2;
    // Low error correction: a code on a screen is not soiled or torn, and it keeps the
    // largest invitation within 80 columns.
    let code = qrcode::QrCode::with_error_correction_level(
        link.to_ascii_uppercase().as_bytes(),
        qrcode::EcLevel::L,
    )?;
    Ok(code
        .render::<Dense1x2>()
        .dark_color(Dense1x2::Light)
        .light_color(Dense1x2::Dark)
        .quiet_zone(true)
        .build())
}

pub(crate) fn contact(dir: &Path, cmd: ContactCmd, json: bool) -> Result<()> {
    match cmd {
        ContactCmd::Add { link, name } => {
            let mut node = Backend::open(dir)?;
            let (c, new) = node.add_contact(&link, name)?;
            if json {
                return out::json(&json!({"contact": c, "new": new}));
            }
            say!(
                "{} contact {} ({}): it calls itself {:?}, {} address(es)",
                if new { "added" } else { "updated" },
                out::named(&c.petname, &c.identity),
                c.kind,
                c.name,
                c.addrs.len()
            );
        }
        ContactCmd::List => {
            let contacts = Backend::open_read_only(dir)?.contacts()?;
            if json {
                return out::json(&contacts);
            }
            if contacts.is_empty() {
                say!("no contacts yet: add one with `rapport contact add rapport:…`");
                return Ok(());
            }
            say!(
                "{:<24} {:<10} {:<24} addresses",
                "name",
                "kind",
                "calls itself"
            );
            for c in contacts {
                say!(
                    "{:<24} {:<10} {:<24} {}",
                    out::named(&c.petname, &c.identity),
                    c.kind,
                    format!("{:?}", c.name),
                    c.addrs.len()
                );
            }
        }
        ContactCmd::Rename { contact, name } => {
            let c = Backend::open(dir)?.rename_contact(&contact, name)?;
            if json {
                return out::json(&c);
            }
            say!(
                "renamed contact {} ({})",
                out::named(&c.petname, &c.identity),
                c.kind
            );
        }
        ContactCmd::Remove { contact } => {
            let c = Backend::open(dir)?.remove_contact(&contact)?;
            if json {
                return out::json(&c);
            }
            say!(
                "removed contact {} ({}); what you share with them stays",
                out::named(&c.petname, &c.identity),
                c.kind
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use rapport_protocol::{Invitation, Kind, SecretKey};

    /// The QR code of the longest invitation (a 64-byte name, four relayed addresses) still
    /// fits a terminal 80 columns wide, quiet zone included, and is square.
    #[test]
    fn the_largest_invitation_fits_a_terminal_as_a_qr_code() {
        let me = SecretKey::from_seed([7; 32]).identity();
        let relay = SecretKey::from_seed([8; 32]).identity();
        let addrs: Vec<_> = (0..4)
            .map(|i| {
                format!("/ip6/2001:db8::{i}/udp/4001/quic-v1/p2p/{relay}/p2p-circuit")
                    .parse()
                    .unwrap()
            })
            .collect();
        let link = Invitation::new(me, &"é".repeat(40), Kind::Org, &addrs).to_string();
        let drawn = super::qr(&link).unwrap();
        let rows: Vec<&str> = drawn.lines().collect();
        let width = rows[0].chars().count();
        assert!(width <= 80, "{width} columns for {} characters", link.len());
        assert!(rows.iter().all(|r| r.chars().count() == width));
        // Two modules per character row: as many module rows as columns, give or take one.
        assert!(
            (2 * rows.len()).abs_diff(width) <= 1,
            "{} rows, {width} columns",
            rows.len()
        );
    }
}
