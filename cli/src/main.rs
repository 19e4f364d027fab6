//! `rapport`: the command-line program of a Rapport node.
//!
//! Every command opens the node's store, does one thing, and exits. Errors are one line on
//! stderr with a non-zero exit, and nothing on disk changes when a command fails.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use clap::{Parser, Subcommand, ValueEnum};
use rapport_node::Store;
use rapport_protocol::{
    ControllerInfo, EntryBody, GrantStatus, IdentityKey, Kind, Ledger, LegalBasis,
    MAX_LEDGER_FILE_BYTES, RecordContext, Scope, Terms, UnixSeconds, iso27560_records,
    kantara_receipts, read_ledger_file,
};
use sha2::{Digest, Sha256};

mod backend;
mod bench;
mod bench_relay;
mod bench_samod;
mod bench_scale;
mod contact_cmd;
mod demo;
mod node_cmd;
mod out;
mod relay_cmd;

use backend::Backend;
use out::say;

#[derive(Parser)]
#[command(
    name = "rapport",
    version,
    about = "Rapport: a customer-owned relationship ledger",
    long_about = "Rapport: a customer-owned relationship ledger. Customers grant companies signed, scoped, expiring consent, and revoke it with a signature."
)]
struct Cli {
    /// Where the node keeps its store [default: $RAPPORT_HOME, else the platform data
    /// directory]. Not used by demo, bench, completions, man, ledger verify, consent terms.
    #[arg(long, global = true, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Print what the command did or found as JSON on standard output (one value), for
    /// scripts; messages for people go to standard error or are left out.
    #[arg(long, global = true)]
    json: bool,
    /// Show identities beside the names of peers.
    #[arg(short, long, global = true)]
    verbose: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create this node's identity and store.
    Init {
        /// What kind of party this node is.
        #[arg(long)]
        kind: KindArg,
        /// A display name (yours, or your organisation's).
        #[arg(long)]
        name: String,
    },
    /// Show this node's identity.
    Id,
    /// Print this node's invitation: a link (and a QR code, at a terminal) with its
    /// identity, name, kind and current addresses, and a checksum. Give it to whoever
    /// should reach you; they add it with `rapport contact add`.
    Invite {
        /// Print the link only, without the QR code.
        #[arg(long)]
        no_qr: bool,
    },
    /// Your contacts: the parties you added from their invitations, under your names for them.
    #[command(subcommand)]
    Contact(ContactCmd),
    /// Grant, accept, revoke and exchange consent.
    #[command(subcommand)]
    Consent(ConsentCmd),
    /// Inspect and verify consent ledgers.
    #[command(subcommand)]
    Ledger(LedgerCmd),
    /// Run this node: sync with peers and serve the local API (Ctrl-C stops it cleanly).
    #[command(subcommand)]
    Node(NodeCmd),
    /// Relationships: open and list them, add and remove members, disclose profile fields.
    #[command(subcommand)]
    Rel(RelCmd),
    /// Send messages (needs a running node).
    #[command(subcommand)]
    Msg(MsgCmd),
    /// Messages from others across every relationship, newest first.
    Inbox {
        /// How many.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// One relationship's conversation, oldest first.
    Thread {
        /// The relationship id (or a unique prefix of at least 4 hex digits).
        rel: String,
    },
    /// Peers the running node knows and is connected to.
    Peers,
    /// Connect the running node to a peer.
    Connect {
        /// The peer's address (/ip4/192.0.2.7/tcp/4001/p2p/12D3KooW…), or a contact's name
        /// or invitation link (the addresses it carries are dialled).
        addr: String,
    },
    /// Changes this node refused (unsolicited, forged, over-scoped), kept as evidence.
    Refusals {
        /// How many, newest first.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Check this node's store.
    #[command(subcommand)]
    Store(StoreCmd),
    /// Run or manage a community relay (circuit relay, rendezvous point, mailbox).
    #[command(subcommand)]
    Relay(relay_cmd::RelayCmd),
    /// Benchmarks on this machine.
    #[command(subcommand)]
    Bench(bench::BenchCmd),
    /// Run the whole story, narrated, on temporary stores: a customer and two companies as
    /// real nodes on loopback, syncing consent and a conversation; exits 0 only if every
    /// step held.
    Demo,
    /// Print a shell completion script: `rapport completions bash > ~/.local/share/bash-completion/completions/rapport`.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), or write one page per command into a directory.
    Man {
        /// Write rapport.1 and a page per command (rapport-consent-grant.1, …) here.
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum ContactCmd {
    /// Add a contact from its invitation link (rapport:…), after checking its checksum.
    Add {
        /// The invitation link.
        link: String,
        /// Your name for them [default: the name in the invitation].
        #[arg(long)]
        name: Option<String>,
    },
    /// List your contacts.
    List,
    /// Give a contact another name.
    Rename {
        /// The contact: its current name, invitation link or identity.
        contact: String,
        /// The new name.
        name: String,
    },
    /// Remove a contact (what you share with them stays).
    Remove {
        /// The contact: its name, invitation link or identity.
        contact: String,
    },
}

#[derive(Subcommand)]
enum NodeCmd {
    /// Run the node in the foreground until Ctrl-C or SIGTERM.
    Run {
        /// A libp2p address to listen on; repeat for more, or `none` to be reachable only
        /// through the relay [default: TCP and QUIC on all interfaces, OS-chosen ports].
        #[arg(long, value_name = "MULTIADDR")]
        listen: Vec<String>,
        /// A peer to dial at start (and to seed Kademlia with, if it ends in /p2p/<id>).
        #[arg(long, value_name = "MULTIADDR")]
        bootstrap: Vec<String>,
        /// Do not discover peers on the local network.
        #[arg(long)]
        no_mdns: bool,
        /// A community relay, /…/p2p/<relay id>: reserve a circuit there (reachable
        /// behind NAT), find members at its rendezvous point, and use its mailbox for peers
        /// that are offline.
        #[arg(long, value_name = "MULTIADDR")]
        relay: Option<String>,
        /// Where the local API listens (loopback only).
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:0")]
        api: std::net::SocketAddr,
        /// Accept every grant made to this node on the customer's terms as it arrives.
        #[arg(long)]
        accept_grants: bool,
    },
}

#[derive(Subcommand)]
enum RelCmd {
    /// Open a relationship with a company or person (you own it).
    Open {
        /// Who: a contact's name, their invitation link (rapport:…), or their identity.
        identity: String,
        /// Confirm an identity this node never met (not a contact, never connected).
        #[arg(long)]
        new_peer: bool,
        /// Their address, if known (the node connects at once).
        #[arg(long, value_name = "MULTIADDR")]
        addr: Option<String>,
        /// How you name them in the relationship [default: your contact's name for them].
        #[arg(long)]
        name: Option<String>,
        /// A title for the relationship.
        #[arg(long)]
        title: Option<String>,
    },
    /// List relationships, newest activity first.
    List,
    /// Add another member to a relationship you own (many-to-many).
    Add {
        /// The relationship id (or prefix).
        rel: String,
        /// The new member: a contact's name, their invitation link, or their identity.
        identity: String,
        /// Confirm an identity this node never met (not a contact, never connected).
        #[arg(long)]
        new_peer: bool,
        /// How you name them in the relationship [default: your contact's name for them].
        #[arg(long)]
        name: Option<String>,
    },
    /// Remove a member from a relationship you own; a new content-key epoch starts at once.
    Remove {
        /// The relationship id (or prefix).
        rel: String,
        /// The member: a contact's name or their identity.
        identity: String,
    },
    /// Disclose a profile field to a relationship's members.
    Disclose {
        /// The relationship id (or prefix).
        rel: String,
        /// The field (e.g. email).
        field: String,
        /// Its value.
        value: String,
    },
}

#[derive(Subcommand)]
enum MsgCmd {
    /// Send a message in a relationship.
    Send {
        /// The relationship id (or prefix).
        rel: String,
        /// The text.
        text: String,
        /// Why you write (a member needs contact:<purpose>; default: the one its grants allow).
        #[arg(long)]
        purpose: Option<String>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum KindArg {
    /// A customer: one person.
    Person,
    /// A company or other organisation, with many agents under one identity.
    #[value(alias = "company", alias = "organisation", alias = "organization")]
    Org,
    /// A community that hosts a relay for its members.
    Community,
}

#[derive(Subcommand)]
enum ConsentCmd {
    /// Grant scopes to a company or person (run by the customer).
    Grant {
        /// The grantee: a contact's name, their invitation link (rapport:…), or their
        /// identity (12D3KooW…).
        identity: String,
        /// Confirm an identity this node never met (not a contact, never connected): a
        /// mistyped id names somebody else.
        #[arg(long)]
        new_peer: bool,
        /// A scope to grant; repeat for more (conversation:read, conversation:write,
        /// profile:<field>:read, contact:<purpose>, segment:<name>:read).
        #[arg(long = "scope", required = true)]
        scopes: Vec<String>,
        /// Why the grantee may do this.
        #[arg(long)]
        purpose: String,
        /// When the grant ends: YYYY-MM-DD (end of that day, UTC) or an RFC 3339 time.
        #[arg(long)]
        expires: Option<String>,
        /// Your terms, from the roster (see `rapport consent terms`) [default: the terms you
        /// proffered to this grantee, else SD-BASE].
        #[arg(long)]
        terms: Option<String>,
        /// The legal basis of the processing.
        #[arg(long, default_value = "consent")]
        legal_basis: String,
        /// The notice or policy you were shown; its SHA-256 is recorded.
        #[arg(long, value_name = "FILE", conflicts_with = "notice_sha256")]
        notice: Option<PathBuf>,
        /// The SHA-256 (hex) of the notice you were shown, if you have the hash only.
        #[arg(long, value_name = "HEX")]
        notice_sha256: Option<String>,
    },
    /// Narrow a grant: fewer scopes, an earlier end, or both; what is not given stays as it
    /// is (run by the customer).
    Amend {
        /// The grant id (or a unique prefix of it).
        grant: String,
        /// A scope that remains; repeat for more [default: the scopes the grant has now].
        #[arg(long = "scope")]
        scopes: Vec<String>,
        /// The new end: YYYY-MM-DD or RFC 3339 [default: the end the grant has now].
        #[arg(long)]
        expires: Option<String>,
    },
    /// Revoke a grant for good (run by the customer).
    Revoke {
        /// The grant id (or a unique prefix of it).
        grant: String,
        /// A reason, kept in the ledger.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Proffer your standing terms to a grantee (run by the customer).
    Proffer {
        /// The grantee: a contact's name, their invitation link, or their identity.
        identity: String,
        /// Confirm an identity this node never met (not a contact, never connected).
        #[arg(long)]
        new_peer: bool,
        /// Terms from the roster.
        #[arg(long)]
        terms: String,
    },
    /// Accept pending grants on the customer's terms (run by the company): those that
    /// arrived over the network, or those in a ledger file the customer sent.
    Accept {
        /// A ledger file the customer exported (not needed when grants came over the network).
        file: Option<PathBuf>,
        /// Accept only this grant (id or prefix) [default: every pending grant].
        #[arg(long)]
        grant: Option<String>,
    },
    /// Acknowledge that you erased what a revocation covers (run by the company).
    AckErasure {
        /// The revoked grant's id (or prefix).
        grant: String,
        /// What was erased.
        #[arg(long, default_value = "all data held under this grant")]
        erased: String,
    },
    /// List the grants you gave or hold.
    List,
    /// Write the consent document shared with a peer to a file, to send it to them.
    Export {
        /// The other party (the grantee if you are the customer, the customer if you are
        /// the grantee): a contact's name or their identity.
        identity: String,
        /// Where to write the ledger file.
        #[arg(long)]
        out: PathBuf,
    },
    /// Verify a ledger file and merge it into your store.
    Import {
        /// The ledger file.
        file: PathBuf,
    },
    /// Export consent records in a standard format.
    ExportRecords {
        /// The record format.
        #[arg(long)]
        format: RecordFormat,
        /// Write to this file instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
        /// The controller's (grantee's) name [default: the grantee's identity].
        #[arg(long)]
        controller_name: Option<String>,
        /// The controller's contact (a person or role). Required by both formats.
        #[arg(long)]
        controller_contact: Option<String>,
        /// The controller's postal address. Required by both formats.
        #[arg(long)]
        controller_address: Option<String>,
        /// The controller's email. Required by kantara.
        #[arg(long)]
        controller_email: Option<String>,
        /// The controller's phone. Required by kantara.
        #[arg(long)]
        controller_phone: Option<String>,
        /// The controller's web site.
        #[arg(long)]
        controller_url: Option<String>,
        /// The jurisdiction the consent is given under.
        #[arg(long, default_value = "EU")]
        jurisdiction: String,
        /// The URL of the controller's privacy policy. Required by kantara.
        #[arg(long)]
        policy_url: Option<String>,
    },
    /// Show the terms roster.
    Terms,
}

#[derive(Clone, Copy, ValueEnum)]
enum RecordFormat {
    /// ISO/IEC TS 27560 consent records (need --controller-contact and --controller-address).
    Iso27560,
    /// Kantara Consent Receipt v1.1 (need --controller-contact, --controller-address,
    /// --controller-email, --controller-phone and --policy-url).
    Kantara,
}

impl RecordFormat {
    /// What the format's output is called.
    fn label(self) -> &'static str {
        match self {
            RecordFormat::Iso27560 => "ISO/IEC TS 27560 records:",
            RecordFormat::Kantara => "Kantara receipts:",
        }
    }
}

#[derive(Subcommand)]
enum StoreCmd {
    /// Check every stored change again (signature, author, rules) and that the index kept
    /// beside each document says what the document says. Changes nothing; exits 1 if
    /// anything does not check. A running node holds the store: stop it first.
    Verify,
}

#[derive(Subcommand)]
enum LedgerCmd {
    /// Verify a ledger file: every signature, author, rule and hash link.
    Verify {
        /// The ledger file.
        file: PathBuf,
    },
    /// Show every entry of the ledgers you hold, oldest first.
    Show {
        /// Only the ledger shared with this party: a contact's name or their identity.
        identity: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        // The reader stopped early (`rapport id | head -1`): what was asked is done.
        Err(e) if out::closed(&e) => ExitCode::SUCCESS,
        Err(e) => {
            // A refusal quotes the peer's reason: escaped as standard output is.
            eprintln!("error: {}", out::printable(&format!("{e:#}")));
            ExitCode::FAILURE
        }
    }
}

fn now() -> UnixSeconds {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Logs to stderr as `RAPPORT_LOG` says (default: warnings), and a multi-threaded runtime
/// for the commands that run a node, a relay or a benchmark.
pub(crate) fn runtime(default_log: &str) -> Result<tokio::runtime::Runtime> {
    let spec = std::env::var("RAPPORT_LOG").ok();
    let filter = log_filter(spec.as_deref(), default_log);
    // Colour only for a person at a terminal, never into a file or a pipe.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colour)
        .try_init();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// What libp2p's Kademlia warns of is the normal life of a peer-to-peer node (no peer known
/// yet to bootstrap from at first start, a peer gone while replicating), not something for
/// its owner to act on: only its errors are logged, unless `RAPPORT_LOG` names it.
const QUIET_BY_DEFAULT: &str = "libp2p_kad=error";

/// The log filter: `spec` (from `RAPPORT_LOG`) if it parses, else `default`; with
/// [`QUIET_BY_DEFAULT`] unless `spec` names Kademlia itself.
fn log_filter(spec: Option<&str>, default: &str) -> tracing_subscriber::EnvFilter {
    let base = spec
        .filter(|s| tracing_subscriber::EnvFilter::try_new(s).is_ok())
        .unwrap_or(default);
    if base.contains("libp2p_kad") {
        tracing_subscriber::EnvFilter::new(base)
    } else {
        tracing_subscriber::EnvFilter::new(format!("{base},{QUIET_BY_DEFAULT}"))
    }
}

/// A shell's completion script, from the command definitions.
fn completions(shell: clap_complete::Shell) -> Result<()> {
    let mut script = Vec::new();
    clap_complete::generate(
        shell,
        &mut <Cli as clap::CommandFactory>::command(),
        "rapport",
        &mut script,
    );
    out::write(format_args!("{}", String::from_utf8_lossy(&script)))
}

/// The manual: one page on standard output, or a page per command written into `dir`.
fn man(dir: Option<&Path>) -> Result<()> {
    let cmd = <Cli as clap::CommandFactory>::command();
    let Some(dir) = dir else {
        let mut page = Vec::new();
        clap_mangen::Man::new(cmd).render(&mut page)?;
        return out::write(format_args!("{}", String::from_utf8_lossy(&page)));
    };
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut written = 0;
    // (command, page name, how it is typed)
    let mut pending = vec![(cmd, "rapport".to_string(), "rapport".to_string())];
    while let Some((cmd, name, typed)) = pending.pop() {
        let cmd = cmd.name(name.clone()).bin_name(typed.clone());
        for sub in cmd.get_subcommands() {
            if sub.get_name() != "help" {
                let n = sub.get_name();
                pending.push((sub.clone(), format!("{name}-{n}"), format!("{typed} {n}")));
            }
        }
        let mut page = Vec::new();
        clap_mangen::Man::new(cmd).render(&mut page)?;
        let path = dir.join(format!("{name}.1"));
        std::fs::write(&path, page).with_context(|| format!("cannot write {}", path.display()))?;
        written += 1;
    }
    say!("wrote {written} manual pages to {}", dir.display());
    Ok(())
}

fn data_dir(cli: &Option<PathBuf>) -> Result<PathBuf> {
    if let Some(dir) = cli {
        return Ok(dir.clone());
    }
    if let Some(home) = std::env::var_os("RAPPORT_HOME").filter(|h| !h.is_empty()) {
        return Ok(PathBuf::from(home));
    }
    dirs::data_dir().map(|d| d.join("rapport")).ok_or_else(|| {
        anyhow!("no data directory on this platform: pass --data-dir or set RAPPORT_HOME")
    })
}

fn run(cli: Cli) -> Result<()> {
    let storeless = match &cli.command {
        Command::Demo => Some("demo`, which makes temporary stores"),
        Command::Bench(_) => Some("bench`, which makes temporary stores"),
        Command::Completions { .. } => Some("completions`"),
        Command::Man { .. } => Some("man`"),
        Command::Ledger(LedgerCmd::Verify { .. }) => {
            Some("ledger verify`, which reads the file given")
        }
        Command::Consent(ConsentCmd::Terms) => Some("consent terms`"),
        _ => None,
    };
    if let (Some(what), Some(_)) = (storeless, &cli.data_dir) {
        // A note, not an error: a wrapper that always passes --data-dir keeps working.
        eprintln!("note: --data-dir does nothing for `rapport {what}");
    }
    let json = cli.json;
    out::set_verbose(cli.verbose);
    if json
        && matches!(
            cli.command,
            Command::Demo
                | Command::Completions { .. }
                | Command::Man { .. }
                | Command::Node(NodeCmd::Run { .. })
                | Command::Relay(relay_cmd::RelayCmd::Run { .. })
        )
    {
        eprintln!("note: --json does nothing for this command");
    }
    match cli.command {
        Command::Demo => return demo::run(),
        Command::Bench(cmd) => return bench::run(cmd, json),
        Command::Completions { shell } => return completions(shell),
        Command::Man { out } => return man(out.as_deref()),
        _ => {}
    }
    let dir = data_dir(&cli.data_dir)?;
    match cli.command {
        Command::Init { kind, name } => init(&dir, kind, &name, json),
        Command::Id => id(&dir, json),
        Command::Invite { no_qr } => contact_cmd::invite(&dir, no_qr, json),
        Command::Contact(cmd) => contact_cmd::contact(&dir, cmd, json),
        Command::Consent(cmd) => consent(&dir, cmd, json),
        Command::Ledger(LedgerCmd::Verify { file }) => ledger_verify(&file, json),
        Command::Ledger(LedgerCmd::Show { identity }) => ledger_show(&dir, identity, json),
        Command::Node(NodeCmd::Run {
            listen,
            bootstrap,
            no_mdns,
            relay,
            api,
            accept_grants,
        }) => node_cmd::run(&dir, listen, bootstrap, !no_mdns, relay, api, accept_grants),
        Command::Relay(cmd) => relay_cmd::run(&dir, cmd, json),
        Command::Store(StoreCmd::Verify) => store_verify(&dir, json),
        Command::Rel(cmd) => node_cmd::rel(&dir, cmd, json),
        Command::Msg(MsgCmd::Send { rel, text, purpose }) => {
            node_cmd::send(&dir, &rel, &text, purpose, json)
        }
        Command::Inbox { limit } => node_cmd::inbox(&dir, limit, json),
        Command::Thread { rel } => node_cmd::thread(&dir, &rel, json),
        Command::Peers => node_cmd::peers(&dir, json),
        Command::Connect { addr } => node_cmd::connect(&dir, &addr, json),
        Command::Refusals { limit } => node_cmd::refusals(&dir, limit, json),
        Command::Demo | Command::Bench(_) | Command::Completions { .. } | Command::Man { .. } => {
            unreachable!("handled above")
        }
    }
}

fn store_verify(dir: &Path, json: bool) -> Result<()> {
    let store = Store::open_read_only(dir)?;
    // A company's store holds hundreds of thousands of documents: show how far it is.
    let bar = out::progress("checking documents", 0);
    let report = store.verify_with(|done, total| {
        bar.set_length(total);
        bar.set_position(done);
    })?;
    bar.finish_and_clear();
    if json {
        say!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for p in &report.problems {
            say!("document {}: {}", p.doc, p.detail);
        }
        say!(
            "checked {} documents and {} changes: {}",
            report.documents,
            report.changes,
            match report.problems.len() {
                0 => "everything checks".to_string(),
                n => format!("{n} problem(s)"),
            }
        );
    }
    if report.problems.is_empty() {
        Ok(())
    } else {
        bail!("the store does not check: see above")
    }
}

fn init(dir: &Path, kind: KindArg, name: &str, json: bool) -> Result<()> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 100 {
        bail!("a name must be 1-100 characters");
    }
    let kind = match kind {
        KindArg::Person => Kind::Person,
        KindArg::Org => Kind::Org,
        KindArg::Community => Kind::Community,
    };
    let store = Store::create(dir, kind, name, now())?;
    let profile = store.profile()?;
    if json {
        return out::json(&serde_json::json!({
            "identity": profile.identity.to_string(),
            "kind": profile.kind,
            "name": profile.name,
            "store": store.path(),
        }));
    }
    say!("created {} identity for {:?}", profile.kind, profile.name);
    say!("identity: {}", profile.identity);
    say!("store:    {}", store.path().display());
    Ok(())
}

fn id(dir: &Path, json: bool) -> Result<()> {
    if let Some(api) = backend::Api::find(dir) {
        let v: serde_json::Value = api.get("/v1/status")?;
        if json {
            say!("{v}");
        } else {
            say!("{}", v["identity"].as_str().unwrap_or_default());
            say!(
                "kind: {}  name: {}",
                v["kind"].as_str().unwrap_or_default(),
                v["name"].as_str().unwrap_or_default()
            );
            for a in v["listen"].as_array().into_iter().flatten() {
                say!("listening: {}", a.as_str().unwrap_or_default());
            }
        }
        return Ok(());
    }
    let store = Store::open_read_only(dir)?;
    let p = store.profile()?;
    if json {
        say!(
            "{}",
            serde_json::json!({
                "identity": p.identity.to_string(),
                "kind": p.kind,
                "name": p.name,
                "created_at": p.created_at,
                "store": store.path(),
            })
        );
    } else {
        say!("{}", p.identity);
        say!("kind: {}  name: {}", p.kind, p.name);
    }
    Ok(())
}

fn read_bounded(file: &Path) -> Result<Vec<u8>> {
    let meta =
        std::fs::metadata(file).with_context(|| format!("cannot read {}", file.display()))?;
    if meta.len() > MAX_LEDGER_FILE_BYTES as u64 {
        bail!(
            "{} is {} bytes, more than the limit of {MAX_LEDGER_FILE_BYTES}",
            file.display(),
            meta.len()
        );
    }
    std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))
}

fn parse_identity(s: &str) -> Result<IdentityKey> {
    Ok(s.trim().parse()?)
}

fn parse_scopes(list: &[String]) -> Result<Vec<Scope>> {
    list.iter()
        .map(|s| Ok(s.trim().parse::<Scope>()?))
        .collect()
}

/// YYYY-MM-DD means the end of that day, UTC; otherwise RFC 3339.
fn parse_date(s: &str) -> Result<UnixSeconds> {
    use time::format_description::well_known::Rfc3339;
    let s = s.trim();
    let t = if let Ok(date) =
        time::Date::parse(s, time::macros::format_description!("[year]-[month]-[day]"))
    {
        date.with_hms(23, 59, 59).expect("valid time").assume_utc()
    } else {
        time::OffsetDateTime::parse(s, &Rfc3339).map_err(|_| {
            anyhow!(
                "{s:?} is not a date: use YYYY-MM-DD or an RFC 3339 time like 2027-01-31T12:00:00Z"
            )
        })?
    };
    u64::try_from(t.unix_timestamp()).map_err(|_| anyhow!("{s:?} is before 1970"))
}

fn show_time(t: UnixSeconds) -> String {
    i64::try_from(t)
        .ok()
        .and_then(|t| time::OffsetDateTime::from_unix_timestamp(t).ok())
        .and_then(|t| {
            t.format(time::macros::format_description!(
                "[year]-[month]-[day] [hour]:[minute]Z"
            ))
            .ok()
        })
        .unwrap_or_else(|| t.to_string())
}

fn terms_named(id: &str) -> Result<&'static Terms> {
    Terms::by_id(id.trim()).ok_or_else(|| {
        let names: Vec<&str> = rapport_protocol::ROSTER.iter().map(|t| t.id).collect();
        anyhow!("unknown terms {id:?}: the roster has {}", names.join(", "))
    })
}

fn consent(dir: &Path, cmd: ConsentCmd, json: bool) -> Result<()> {
    if let ConsentCmd::Terms = cmd {
        if json {
            let roster: Vec<serde_json::Value> = rapport_protocol::ROSTER
                .iter()
                .map(|t| serde_json::json!({"id": t.id, "version": t.version, "text": t.text}))
                .collect();
            return out::json(&roster);
        }
        for t in rapport_protocol::ROSTER {
            say!("{:<12} v{}  {}", t.id, t.version, t.text);
        }
        return Ok(());
    }
    let reads_only = matches!(
        cmd,
        ConsentCmd::List | ConsentCmd::Export { .. } | ConsentCmd::ExportRecords { .. }
    );
    let mut node = if reads_only {
        Backend::open_read_only(dir)?
    } else {
        Backend::open(dir)?
    };
    match cmd {
        ConsentCmd::Grant {
            identity,
            new_peer,
            scopes,
            purpose,
            expires,
            terms,
            legal_basis,
            notice,
            notice_sha256,
        } => {
            let scopes = parse_scopes(&scopes)?;
            let expires = expires.as_deref().map(parse_date).transpose()?;
            let legal_basis: LegalBasis = legal_basis.parse().map_err(|e: String| anyhow!(e))?;
            if let Some(t) = &terms {
                terms_named(t)?;
            }
            let notice_sha256 = match (notice, notice_sha256) {
                (Some(path), _) => Some(hex::encode(Sha256::digest(read_bounded(&path)?))),
                (None, h) => h,
            };
            let (grantee, who) = peer(&mut node, &identity, new_peer)?;
            let out = node.grant(rapport_node::GrantArgs {
                grantee,
                scopes,
                purpose,
                expires,
                terms,
                legal_basis: Some(legal_basis),
                notice_sha256,
            })?;
            let what = format!(
                "granted {} to {who}, pending until they accept",
                out.entry.expect("a grant entry")
            );
            out::report(&what, &out, &unsent(&grantee, &who), json)?;
        }
        ConsentCmd::Amend {
            grant,
            scopes,
            expires,
        } => {
            let scopes = if scopes.is_empty() {
                None
            } else {
                Some(parse_scopes(&scopes)?)
            };
            let expires = expires.as_deref().map(parse_date).transpose()?;
            let out = node.amend(&grant, scopes, expires)?;
            let who = node.names_of([out.peer])?.of(&out.peer);
            let what = format!(
                "amended grant {} to {who} (amendment {})",
                out.grant.expect("named").short(),
                out.entry.expect("an entry").short()
            );
            out::report(&what, &out, &unsent(&out.peer, &who), json)?;
        }
        ConsentCmd::Revoke { grant, reason } => {
            let out = node.revoke(&grant, reason)?;
            let who = node.names_of([out.peer])?.of(&out.peer);
            let what = format!(
                "revoked grant {} to {who} (revocation {})",
                out.grant.expect("named"),
                out.entry.expect("an entry").short()
            );
            out::report(&what, &out, &unsent(&out.peer, &who), json)?;
        }
        ConsentCmd::Proffer {
            identity,
            new_peer,
            terms,
        } => {
            terms_named(&terms)?;
            let (grantee, who) = peer(&mut node, &identity, new_peer)?;
            let out = node.proffer(grantee, &terms)?;
            let what = format!(
                "proffered {} to {who} ({})",
                terms_named(&terms)?.id,
                out.entry.expect("an entry").short()
            );
            out::report(&what, &out, &unsent(&grantee, &who), json)?;
        }
        ConsentCmd::Accept { file, grant } => {
            let mut customer = None;
            if let Some(file) = &file {
                let bytes = read_bounded(file)?;
                let (header, changes) = read_ledger_file(&bytes)
                    .with_context(|| format!("{} was refused", file.display()))?;
                let ledger = Ledger::verify(header, changes)
                    .with_context(|| format!("{} was refused", file.display()))?;
                let me = node.me()?;
                if header.customer == me {
                    bail!(
                        "{} holds grants you gave, not grants to you: nothing to accept",
                        file.display()
                    );
                }
                if header.grantee != me {
                    bail!(
                        "{} is a consent document between {} and {}, not with you ({me})",
                        file.display(),
                        header.customer,
                        header.grantee
                    );
                }
                let pending = ledger.grants(now()).into_iter().any(|g| {
                    g.status == GrantStatus::Pending
                        && grant
                            .as_deref()
                            .is_none_or(|p| g.id.to_hex().starts_with(&p.to_ascii_lowercase()))
                });
                if !pending {
                    bail!("{} holds no pending grant to accept", file.display());
                }
                node.import(&bytes)
                    .with_context(|| format!("{} was refused", file.display()))?;
                customer = Some(header.customer);
            }
            let (rows, went) = node.accept(grant.as_deref(), customer)?;
            if json {
                return out::json(&serde_json::json!({
                    "accepted": rows,
                    "delivery": went.summary(),
                    "deliveries": went,
                }));
            }
            let names = node.names_of(rows.iter().map(|g| g.peer))?;
            let mut refused = Vec::new();
            for g in &rows {
                // One line per grant, with its one outcome: where the acceptance went.
                let who = names.of(&g.peer);
                let to_them = rapport_node::Deliveries(
                    went.0
                        .iter()
                        .filter(|d| d.peer == g.peer)
                        .cloned()
                        .collect(),
                );
                let outcome = match to_them.summary() {
                    Some(s) => s,
                    None if matches!(node, Backend::Local(_)) => unsent(&g.peer, &who),
                    None => "stored here".to_owned(),
                };
                let line = format!(
                    "accepted grant {} from {who}: {} for {:?} on terms {}: {outcome}",
                    g.grant,
                    g.scopes.join(", "),
                    g.purpose,
                    g.terms
                );
                if !to_them.refusals().is_empty() && !to_them.any_delivered() {
                    refused.push(line);
                } else {
                    say!("{line}");
                }
            }
            if !refused.is_empty() {
                bail!("{}; it stays only in this node's copy", refused.join("\n"));
            }
        }
        ConsentCmd::AckErasure { grant, erased } => {
            let out = node.ack_erasure(&grant, erased)?;
            let who = node.names_of([out.peer])?.of(&out.peer);
            let what = format!(
                "acknowledged erasure for grant {} from {who} ({})",
                out.grant.expect("named").short(),
                out.entry.expect("an entry").short()
            );
            out::report(&what, &out, &unsent(&out.peer, &who), json)?;
        }
        ConsentCmd::List => list(&node, json)?,
        ConsentCmd::Export { identity, out } => {
            let (peer, _) = peer(&mut node, &identity, true)?;
            let text = node.export(&peer)?;
            let n = read_ledger_file(text.as_bytes())
                .map(|(_, c)| c.len())
                .unwrap_or(0);
            write_new_file(&out, text.as_bytes())?;
            if json {
                return out::json(&serde_json::json!({"file": out, "changes": n}));
            }
            say!("wrote {n} changes to {}", out.display());
        }
        ConsentCmd::Import { file } => {
            let bytes = read_bounded(&file)?;
            let applied = node
                .import(&bytes)
                .with_context(|| format!("{} was refused", file.display()))?;
            if json {
                return out::json(&serde_json::json!({"file": file, "applied": applied}));
            }
            say!("imported {applied} new change(s) from {}", file.display());
            let (header, _) = read_ledger_file(&bytes)?;
            for g in node.grants()? {
                let in_file = (g.peer == header.customer || g.peer == header.grantee)
                    && (g.role == "granted") == (header.customer != g.peer);
                if in_file {
                    say!("  grant {}  {}", g.grant.short(), g.status);
                }
            }
        }
        ConsentCmd::ExportRecords {
            format,
            out,
            controller_name,
            controller_contact,
            controller_address,
            controller_email,
            controller_phone,
            controller_url,
            jurisdiction,
            policy_url,
        } => {
            let me = node.me()?;
            let my_name = node.name()?;
            let template = RecordContext {
                now: now(),
                jurisdiction,
                policy_url: policy_url.unwrap_or_default(),
                collection_method: "Rapport signed consent ledger".into(),
                controller: ControllerInfo {
                    // Each ledger's grantee when not given: never empty.
                    name: controller_name.clone().unwrap_or_else(|| me.to_string()),
                    contact: controller_contact.unwrap_or_default(),
                    address: controller_address.unwrap_or_default(),
                    email: controller_email.unwrap_or_default(),
                    phone: controller_phone.unwrap_or_default(),
                    url: controller_url,
                },
                customer_name: None,
            };
            // Every field the format needs, named at once, before anything is read.
            let missing = match format {
                RecordFormat::Iso27560 => rapport_protocol::iso27560_missing(&template),
                RecordFormat::Kantara => rapport_protocol::kantara_missing(&template),
            };
            if !missing.is_empty() {
                bail!(
                    "{} {}",
                    format.label(),
                    rapport_protocol::RecordError::MissingFields(missing)
                );
            }
            let mut all = Vec::new();
            for ledger in ledgers(&node)? {
                let mut ctx = template.clone();
                ctx.controller.name = controller_name
                    .clone()
                    .unwrap_or_else(|| ledger.header().grantee.to_string());
                ctx.customer_name = (ledger.header().customer == me).then(|| my_name.clone());
                let records = match format {
                    RecordFormat::Iso27560 => iso27560_records(&ledger, &ctx),
                    RecordFormat::Kantara => kantara_receipts(&ledger, &ctx),
                }
                .map_err(|e| anyhow!("{e}"))?;
                all.extend(records);
            }
            let text = serde_json::to_string_pretty(&all)?;
            match out {
                Some(path) => {
                    write_new_file(&path, text.as_bytes())?;
                    if json {
                        return out::json(&serde_json::json!({"file": path, "records": all.len()}));
                    }
                    say!("wrote {} record(s) to {}", all.len(), path.display());
                }
                None => say!("{text}"),
            }
        }
        ConsentCmd::Terms => unreachable!("handled above"),
    }
    Ok(())
}

/// Where a consent write is when this node is not running: in the store, until the node
/// runs or the ledger is carried to `peer` (shown as `who`) by hand.
fn unsent(peer: &IdentityKey, who: &str) -> String {
    format!(
        "stored here; it reaches {who} when your node runs (`rapport node run`), or send it with `rapport consent export {peer} --out FILE`"
    )
}

/// The peer a command's argument names (see [`Backend::resolve`]), and how to show it. An
/// invitation that adds a contact says so on standard error.
pub(crate) fn peer(
    node: &mut Backend,
    text: &str,
    new_peer: bool,
) -> Result<(IdentityKey, String)> {
    let r = node.resolve(text, new_peer)?;
    if let Some(c) = &r.added {
        eprintln!(
            "added {} ({}) to your contacts as {:?}; rename it with `rapport contact rename`",
            c.name, c.kind, c.petname
        );
    }
    let who = match &r.petname {
        Some(name) => out::named(name, &r.identity),
        None => r.identity.to_string(),
    };
    Ok((r.identity, who))
}

/// Every consent ledger the node holds, verified again here.
fn ledgers(node: &Backend) -> Result<Vec<Ledger>> {
    node.ledger_files()?
        .iter()
        .map(|f| {
            let (h, c) = read_ledger_file(f.as_bytes())?;
            Ok(Ledger::verify(h, c)?)
        })
        .collect()
}

/// Writes a file through a temporary sibling and a rename, so a failed write leaves no
/// half-written file behind.
fn write_new_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("rapport-tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", path.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

fn list(node: &Backend, json: bool) -> Result<()> {
    let rows = node.grants()?;
    if json {
        say!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    if rows.is_empty() {
        say!("no grants yet");
        return Ok(());
    }
    let names = node.names_of(rows.iter().map(|g| g.peer))?;
    let width = rows
        .iter()
        .map(|g| names.with_kind(&g.peer).chars().count())
        .max()
        .unwrap_or(4)
        .max(4);
    say!(
        "{:<10} {:<8} {:<width$} {:<9} {:<12} {:<18} {:<30} purpose",
        "grant",
        "role",
        "peer",
        "status",
        "terms",
        "expires",
        "scopes"
    );
    for g in rows {
        let status = if g.status == "revoked" && g.erasure_acked_at.is_some() {
            "erased".to_string()
        } else {
            g.status.clone()
        };
        say!(
            "{:<10} {:<8} {:<width$} {:<9} {:<12} {:<18} {:<30} {}",
            g.grant.short(),
            g.role,
            names.with_kind(&g.peer),
            status,
            g.terms,
            g.expires.map(show_time).unwrap_or_else(|| "never".into()),
            g.scopes.join(","),
            g.purpose
        );
    }
    Ok(())
}

fn ledger_verify(file: &Path, json: bool) -> Result<()> {
    let bytes = read_bounded(file)?;
    let (header, changes) = read_ledger_file(&bytes)
        .with_context(|| format!("{} failed verification", file.display()))?;
    let n = changes.len();
    let ledger = Ledger::verify(header, changes)
        .with_context(|| format!("{} failed verification", file.display()))?;
    if json {
        return out::json(&serde_json::json!({
            "file": file,
            "verified": true,
            "document": ledger.id().to_hex(),
            "customer": header.customer.to_string(),
            "grantee": header.grantee.to_string(),
            "changes": n,
            "entries": ledger.entries().len(),
            "grants": ledger.grants(now()).iter().map(|g| serde_json::json!({
                "grant": g.id.to_hex(),
                "status": g.status.as_str(),
            })).collect::<Vec<_>>(),
        }));
    }
    say!("{}: OK", file.display());
    say!("  document  {}", ledger.id());
    say!("  customer  {}", header.customer);
    say!("  grantee   {}", header.grantee);
    say!(
        "  {n} signed change(s), {} entries, every signature, author, rule and hash link checked",
        ledger.entries().len()
    );
    for g in ledger.grants(now()) {
        say!("  grant {}  {}", g.id.short(), g.status.as_str());
    }
    Ok(())
}

fn ledger_show(dir: &Path, identity: Option<String>, json: bool) -> Result<()> {
    let mut backend = Backend::open_read_only(dir)?;
    let peer = match identity.as_deref() {
        Some(text) => Some(peer(&mut backend, text, true)?.0),
        None => None,
    };
    let ledgers = ledgers(&backend)?;
    let names = backend.names_of(
        ledgers
            .iter()
            .flat_map(|l| [l.header().customer, l.header().grantee]),
    )?;
    let mut out = Vec::new();
    for ledger in ledgers {
        let h = *ledger.header();
        if peer.is_some_and(|p| p != h.customer && p != h.grantee) {
            continue;
        }
        let entries: Vec<_> = ledger.entries_in_order().collect();
        if json {
            out.push(serde_json::json!({
                "document": ledger.id(),
                "customer": h.customer,
                "grantee": h.grantee,
                "changes": ledger.changes().len(),
                "entries": entries.iter().map(|(id, e)| serde_json::json!({"id": id, "entry": e})).collect::<Vec<_>>(),
            }));
            continue;
        }
        say!(
            "ledger {}  customer {}  grantee {}",
            ledger.id(),
            names.with_kind(&h.customer),
            names.with_kind(&h.grantee)
        );
        for (id, e) in entries {
            let who = if e.by == h.customer {
                "customer"
            } else {
                "grantee"
            };
            let what = match &e.body {
                EntryBody::Grant {
                    scopes,
                    purpose,
                    terms,
                    expires,
                    ..
                } => format!(
                    "{} for {purpose:?} on {}{}",
                    scopes
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(","),
                    terms.id,
                    expires
                        .map(|x| format!(", until {}", show_time(x)))
                        .unwrap_or_default()
                ),
                EntryBody::Amend {
                    grant,
                    scopes,
                    expires,
                } => format!(
                    "grant {} to {}{}",
                    grant.short(),
                    scopes
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(","),
                    expires
                        .map(|x| format!(", until {}", show_time(x)))
                        .unwrap_or_default()
                ),
                EntryBody::Revoke { grant, reason } => format!(
                    "grant {}{}",
                    grant.short(),
                    reason
                        .as_ref()
                        .map(|r| format!(": {r}"))
                        .unwrap_or_default()
                ),
                EntryBody::TermsProffer { terms } => terms.id.clone(),
                EntryBody::Accept { grant, terms } => {
                    format!("grant {} on {}", grant.short(), terms.id)
                }
                EntryBody::ErasureAck { grant, erased, .. } => {
                    format!("grant {}: {erased}", grant.short())
                }
            };
            say!(
                "  {}  {}  {:<8} {:<13} {}",
                show_time(e.at),
                id.short(),
                who,
                e.body.kind(),
                what
            );
        }
    }
    if json {
        say!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::log_filter;
    use std::sync::{Arc, Mutex};
    use tracing_subscriber::fmt::MakeWriter;

    /// Captures what a subscriber writes.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Captured {
        type Writer = Captured;
        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }

    /// What one warning from Kademlia and one from the node print under `spec`.
    fn logged(spec: Option<&str>) -> String {
        let out = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(log_filter(spec, "warn"))
            .with_writer(out.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(target: "libp2p_kad::behaviour", "Failed to trigger bootstrap: No known peers.");
            tracing::warn!(target: "rapport_node::net", "a warning of ours");
        });
        String::from_utf8(out.0.lock().unwrap().clone()).unwrap()
    }

    /// Issue 11, 6: every fresh start logged Kademlia's bootstrap warning. It is quiet by
    /// default and at any level the owner sets, and shows when the owner asks for Kademlia.
    #[test]
    fn kademlia_warnings_of_normal_conditions_are_quiet_unless_asked_for() {
        for spec in [None, Some("info"), Some("debug"), Some("not a filter[")] {
            let text = logged(spec);
            assert!(text.contains("a warning of ours"), "{spec:?}: {text}");
            assert!(!text.contains("bootstrap"), "{spec:?}: {text}");
        }
        let text = logged(Some("warn,libp2p_kad=warn"));
        assert!(text.contains("Failed to trigger bootstrap"), "{text}");
    }
}
