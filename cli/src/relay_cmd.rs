//! `rapport relay`: run a community relay, and manage who it admits.

use crate::out::{self, say};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use clap::Subcommand;
use rapport_node::relay::{
    ALLOW_FILE, Quotas, Relay, RelayConfig, edit_allow_list, read_allow_list,
};

use crate::parse_identity;

#[derive(Subcommand)]
pub(crate) enum RelayCmd {
    /// Run the relay in the foreground until Ctrl-C or SIGTERM.
    Run {
        /// A libp2p address to listen on; repeat for more [default: TCP and QUIC port
        /// 4002 on all interfaces].
        #[arg(long, value_name = "MULTIADDR")]
        listen: Vec<String>,
        /// Admit anyone; without it only identities in the allow-list may connect.
        #[arg(long)]
        open: bool,
        /// Mail one peer may have stored here at once, in MiB.
        #[arg(long, default_value_t = 64)]
        max_stored_mib: u64,
        /// Envelopes one peer may deposit per minute.
        #[arg(long, default_value_t = 600)]
        max_deposits_per_minute: u32,
        /// Days mail is kept before it is deleted unread.
        #[arg(long, default_value_t = 14)]
        retention_days: u64,
        /// Bytes one relayed circuit may carry, in MiB.
        #[arg(long, default_value_t = 256)]
        max_circuit_mib: u64,
        /// Minutes one relayed circuit may last.
        #[arg(long, default_value_t = 30)]
        max_circuit_minutes: u64,
        /// Circuits one peer may have open at once.
        #[arg(long, default_value_t = 16)]
        max_circuits_per_peer: usize,
    },
    /// Admit an identity (a running relay picks it up within seconds).
    Allow {
        /// The member's invitation link (rapport:…, checked by its checksum) or identity.
        identity: String,
    },
    /// Stop admitting an identity (its connections are refused from then on).
    Deny {
        /// The member's invitation link or identity.
        identity: String,
    },
    /// List the identities admitted.
    Members,
}

/// The identity a member gave: from their invitation link (checked), with the name and
/// kind it carries for the message, or an identity as typed.
fn member(text: &str) -> Result<(rapport_protocol::IdentityKey, String)> {
    if rapport_protocol::looks_like_invitation(text) {
        let inv = rapport_protocol::Invitation::decode(text)?;
        return Ok((inv.identity, format!("{:?} ({}) ", inv.name, inv.kind)));
    }
    Ok((parse_identity(text)?, String::new()))
}

pub(crate) fn run(dir: &Path, cmd: RelayCmd, json: bool) -> Result<()> {
    match cmd {
        RelayCmd::Allow { identity } => {
            let (id, who) = member(&identity)?;
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            let changed = edit_allow_list(dir, &id, true).map_err(|e| anyhow!(e))?;
            if json {
                return out::json(
                    &serde_json::json!({"identity": id.to_string(), "admitted": true, "changed": changed}),
                );
            }
            say!(
                "{who}{id} {} admitted ({})",
                if changed { "is now" } else { "was already" },
                dir.join(ALLOW_FILE).display()
            );
            Ok(())
        }
        RelayCmd::Deny { identity } => {
            let (id, who) = member(&identity)?;
            let changed = edit_allow_list(dir, &id, false).map_err(|e| anyhow!(e))?;
            if json {
                return out::json(
                    &serde_json::json!({"identity": id.to_string(), "admitted": false, "changed": changed}),
                );
            }
            say!(
                "{who}{id} {}",
                if changed {
                    "is no longer admitted"
                } else {
                    "was not admitted"
                }
            );
            Ok(())
        }
        RelayCmd::Members => {
            let members = read_allow_list(dir).map_err(|e| anyhow!(e))?;
            if json {
                let list: Vec<String> = members.iter().map(ToString::to_string).collect();
                return out::json(&list);
            }
            for id in members {
                say!("{id}");
            }
            Ok(())
        }
        RelayCmd::Run {
            listen,
            open,
            max_stored_mib,
            max_deposits_per_minute,
            retention_days,
            max_circuit_mib,
            max_circuit_minutes,
            max_circuits_per_peer,
        } => {
            crate::node_cmd::stop_on_panic();
            let listen = if listen.is_empty() {
                vec![
                    "/ip4/0.0.0.0/tcp/4002".to_string(),
                    "/ip4/0.0.0.0/udp/4002/quic-v1".to_string(),
                ]
            } else {
                listen
            };
            let listen = listen
                .iter()
                .map(|a| {
                    a.parse()
                        .map_err(|e| anyhow!("--listen {a:?} is not a multiaddr: {e}"))
                })
                .collect::<Result<Vec<_>>>()?;
            let config = RelayConfig {
                data_dir: dir.to_path_buf(),
                listen,
                open,
                quotas: Quotas {
                    max_stored_bytes: max_stored_mib.saturating_mul(1024 * 1024),
                    max_deposits_per_minute,
                    retention: Duration::from_secs(retention_days.saturating_mul(86_400)),
                    max_circuit_bytes: max_circuit_mib.saturating_mul(1024 * 1024),
                    max_circuit_duration: Duration::from_secs(
                        max_circuit_minutes.saturating_mul(60),
                    ),
                    max_circuits_per_peer,
                    ..Quotas::default()
                },
            };
            let rt = crate::runtime("warn")?;
            rt.block_on(async {
                let stop = crate::node_cmd::StopSignal::install();
                let relay = Relay::start(config).await.map_err(|e| anyhow!(e))?;
                say!("rapport relay {} running", relay.identity());
                if open {
                    say!("mode: open (anyone may use it, within the quotas)");
                } else {
                    let n = read_allow_list(dir).map_err(|e| anyhow!(e))?.len();
                    say!(
                        "mode: allow-list ({n} admitted; add with `rapport relay allow <identity>`)"
                    );
                }
                for a in relay.addrs() {
                    say!("listening: {a}");
                }
                say!("members start their nodes with --relay <one of the addresses above>");
                say!("stop with Ctrl-C");
                stop.wait().await;
                say!("stopping…");
                relay.shutdown().await;
                say!("stopped; stored mail is on disk");
                Ok::<(), anyhow::Error>(())
            })
        }
    }
}
