//! `rapport`: the command-line program of a Rapport node.
//!
//! Every command opens the node's store, does one thing, and exits. Errors are one line on
//! stderr with a non-zero exit, and nothing on disk changes when a command fails.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use clap::{Parser, Subcommand, ValueEnum};
use rapport_node::{Profile, Store};
use rapport_protocol::{
    ConsentDoc, ConsentHeader, ControllerInfo, EntryBody, EntryId, GrantStatus, GrantView,
    IdentityKey, Kind, Ledger, LegalBasis, MAX_LEDGER_FILE_BYTES, RecordContext, Scope, SecretKey,
    Terms, UnixSeconds, iso27560_records, kantara_receipts, read_ledger_file, write_ledger_file,
};
use sha2::{Digest, Sha256};

mod demo;

#[derive(Parser)]
#[command(
    name = "rapport",
    version,
    about = "Rapport: a customer-owned relationship ledger",
    long_about = "Rapport: a customer-owned relationship ledger. Customers grant companies signed, scoped, expiring consent, and revoke it with a signature."
)]
struct Cli {
    /// Where the node keeps its store [default: $RAPPORT_HOME, else the platform data directory]
    #[arg(long, global = true, value_name = "DIR")]
    data_dir: Option<PathBuf>,
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
    Id {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Grant, accept, revoke and exchange consent.
    #[command(subcommand)]
    Consent(ConsentCmd),
    /// Inspect and verify consent ledgers.
    #[command(subcommand)]
    Ledger(LedgerCmd),
    /// Run the whole consent story between a customer and a company on temporary stores,
    /// narrated, checking every step.
    Demo,
}

#[derive(Clone, Copy, ValueEnum)]
enum KindArg {
    Person,
    Org,
    Community,
}

#[derive(Subcommand)]
enum ConsentCmd {
    /// Grant scopes to a company or person (run by the customer).
    Grant {
        /// The grantee's identity (12D3KooW…).
        identity: String,
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
    /// Narrow a grant: fewer scopes or an earlier end (run by the customer).
    Amend {
        /// The grant id (or a unique prefix of it).
        grant: String,
        /// The scopes that remain; repeat for more.
        #[arg(long = "scope", required = true)]
        scopes: Vec<String>,
        /// The new end: YYYY-MM-DD or RFC 3339.
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
        /// The grantee's identity.
        identity: String,
        /// Terms from the roster.
        #[arg(long)]
        terms: String,
    },
    /// Import a consent file a customer sent and accept its pending grants on the
    /// customer's terms (run by the company).
    Accept {
        /// The ledger file the customer exported.
        file: PathBuf,
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
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write the consent document shared with a peer to a file, to send it to them.
    Export {
        /// The other party: the grantee if you are the customer, the customer if you are
        /// the grantee.
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
        /// The controller's contact (a person or role).
        #[arg(long, default_value = "")]
        controller_contact: String,
        /// The controller's postal address.
        #[arg(long, default_value = "")]
        controller_address: String,
        /// The controller's email.
        #[arg(long, default_value = "")]
        controller_email: String,
        /// The controller's phone.
        #[arg(long, default_value = "")]
        controller_phone: String,
        /// The controller's web site.
        #[arg(long)]
        controller_url: Option<String>,
        /// The jurisdiction the consent is given under.
        #[arg(long, default_value = "EU")]
        jurisdiction: String,
        /// The URL of the controller's privacy policy.
        #[arg(long, default_value = "")]
        policy_url: String,
    },
    /// Show the terms roster.
    Terms,
}

#[derive(Clone, Copy, ValueEnum)]
enum RecordFormat {
    /// ISO/IEC TS 27560 consent records.
    Iso27560,
    /// Kantara Consent Receipt v1.1.
    Kantara,
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
        /// Only the ledger shared with this identity.
        identity: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
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

/// One writer session per process: the actor nonce names it.
fn nonce() -> Result<[u8; 16]> {
    let mut n = [0u8; 16];
    getrandom::fill(&mut n).map_err(|e| anyhow!("the OS random source failed: {e}"))?;
    Ok(n)
}

fn run(cli: Cli) -> Result<()> {
    if let Command::Demo = cli.command {
        return demo::run();
    }
    let dir = data_dir(&cli.data_dir)?;
    match cli.command {
        Command::Init { kind, name } => init(&dir, kind, &name),
        Command::Id { json } => id(&dir, json),
        Command::Consent(cmd) => consent(&dir, cmd),
        Command::Ledger(LedgerCmd::Verify { file }) => ledger_verify(&file),
        Command::Ledger(LedgerCmd::Show { identity, json }) => ledger_show(&dir, identity, json),
        Command::Demo => unreachable!("handled above"),
    }
}

fn init(dir: &Path, kind: KindArg, name: &str) -> Result<()> {
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
    println!("created {} identity for {:?}", profile.kind, profile.name);
    println!("identity: {}", profile.identity);
    println!("store:    {}", store.path().display());
    Ok(())
}

fn id(dir: &Path, json: bool) -> Result<()> {
    let store = Store::open(dir)?;
    let p = store.profile()?;
    if json {
        println!(
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
        println!("{}", p.identity);
        println!("kind: {}  name: {}", p.kind, p.name);
    }
    Ok(())
}

struct Node {
    store: Store,
    profile: Profile,
    key: SecretKey,
}

impl Node {
    fn open(dir: &Path) -> Result<Self> {
        let store = Store::open(dir)?;
        let profile = store.profile()?;
        let key = store.secret_key()?;
        Ok(Self {
            store,
            profile,
            key,
        })
    }

    fn me(&self) -> IdentityKey {
        self.profile.identity
    }

    fn docs(&self) -> Result<Vec<ConsentDoc>> {
        self.store
            .consent_headers()?
            .iter()
            .map(|h| Ok(self.store.load_consent(&h.doc_id())?))
            .collect()
    }

    fn doc_with(&self, header: ConsentHeader) -> Result<ConsentDoc> {
        match self.store.consent_header(&header.doc_id())? {
            Some(_) => Ok(self.store.load_consent(&header.doc_id())?),
            None => Ok(ConsentDoc::new(header)?),
        }
    }

    /// Finds the one grant whose id starts with `prefix`, in any document held.
    fn find_grant(&self, prefix: &str) -> Result<(ConsentDoc, EntryId)> {
        let prefix = prefix.trim().to_ascii_lowercase();
        if prefix.len() < 4 || !prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
            bail!(
                "{prefix:?} is not a grant id: give at least 4 hex digits of the id shown by `rapport consent list`"
            );
        }
        let mut found = Vec::new();
        for doc in self.docs()? {
            let ids: Vec<EntryId> = doc
                .ledger()
                .grants(UnixSeconds::MAX)
                .iter()
                .filter(|g| g.id.to_hex().starts_with(&prefix))
                .map(|g| g.id)
                .collect();
            for id in ids {
                found.push((doc.clone(), id));
            }
        }
        match found.len() {
            0 => bail!("no grant {prefix} in this node's ledgers (see `rapport consent list`)"),
            1 => Ok(found.pop().expect("one")),
            n => bail!("{n} grants start with {prefix}: give more digits"),
        }
    }

    /// Appends one entry and stores the new change durably.
    fn append(&self, doc: &mut ConsentDoc, body: EntryBody) -> Result<EntryId> {
        let (id, change) = doc.append(&self.key, nonce()?, now(), body)?;
        self.store
            .put_consent_changes(doc.ledger().header(), &[change])?;
        Ok(id)
    }

    /// Reads and verifies a ledger file addressed to this node, merged with what it holds.
    /// Nothing is stored.
    fn read_file(&self, file: &Path) -> Result<(ConsentDoc, usize)> {
        let bytes = read_bounded(file)?;
        let (header, changes) =
            read_ledger_file(&bytes).with_context(|| format!("{} was refused", file.display()))?;
        // The whole file is verified on its own first, so a file with any bad change is refused
        // even where the bad change has the hash of one we already hold (a swapped signature),
        // which merging alone would skip as a duplicate.
        Ledger::verify(header, changes.clone())
            .with_context(|| format!("{} was refused", file.display()))?;
        if header.customer != self.me() && header.grantee != self.me() {
            bail!(
                "{} is a consent document between {} and {}, not with you ({})",
                file.display(),
                header.customer,
                header.grantee,
                self.me()
            );
        }
        let mut doc = self.doc_with(header)?;
        let report = doc.apply(changes);
        if let Some((_, e)) = report.rejected.into_iter().next() {
            return Err(anyhow!(e).context(format!("{} was refused", file.display())));
        }
        Ok((doc, report.applied.len()))
    }

    fn store_doc(&self, doc: &ConsentDoc) -> Result<usize> {
        Ok(self
            .store
            .put_consent_changes(doc.ledger().header(), doc.ledger().changes())?)
    }
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

fn consent(dir: &Path, cmd: ConsentCmd) -> Result<()> {
    if let ConsentCmd::Terms = cmd {
        for t in rapport_protocol::ROSTER {
            println!("{:<12} v{}  {}", t.id, t.version, t.text);
        }
        return Ok(());
    }
    let node = Node::open(dir)?;
    match cmd {
        ConsentCmd::Grant {
            identity,
            scopes,
            purpose,
            expires,
            terms,
            legal_basis,
            notice,
            notice_sha256,
        } => {
            let grantee = parse_identity(&identity)?;
            let scopes = parse_scopes(&scopes)?;
            let expires = expires.as_deref().map(parse_date).transpose()?;
            let legal_basis: LegalBasis = legal_basis.parse().map_err(|e: String| anyhow!(e))?;
            let header = ConsentHeader {
                customer: node.me(),
                grantee,
            };
            if grantee == node.me() {
                bail!("you cannot grant consent to yourself");
            }
            let mut doc = node.doc_with(header)?;
            let terms = match terms {
                Some(t) => terms_named(&t)?.reference(),
                None => doc
                    .ledger()
                    .proffered_terms()
                    .cloned()
                    .unwrap_or_else(|| Terms::by_id("SD-BASE").expect("in roster").reference()),
            };
            let notice_sha256 = match (notice, notice_sha256) {
                (Some(path), _) => hex::encode(Sha256::digest(read_bounded(&path)?)),
                (None, Some(h)) => h.trim().to_ascii_lowercase(),
                // Without a company notice, what the customer saw is this command's own
                // statement of the grant; record the hash of exactly that text.
                (None, None) => hex::encode(Sha256::digest(
                    format!(
                        "You grant {grantee} the scopes {} for the purpose {purpose:?} on terms {} v{}.",
                        scopes.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "),
                        terms.id,
                        terms.version
                    )
                    .as_bytes(),
                )),
            };
            let id = node.append(
                &mut doc,
                EntryBody::Grant {
                    scopes,
                    purpose,
                    legal_basis,
                    notice_sha256,
                    terms,
                    expires,
                },
            )?;
            println!("granted {} to {grantee}", id);
            println!(
                "status: pending until {} accepts; send it with `rapport consent export {grantee} --out FILE`",
                grantee.short()
            );
        }
        ConsentCmd::Amend {
            grant,
            scopes,
            expires,
        } => {
            let (mut doc, gid) = node.find_grant(&grant)?;
            let scopes = parse_scopes(&scopes)?;
            let expires = expires.as_deref().map(parse_date).transpose()?;
            let id = node.append(
                &mut doc,
                EntryBody::Amend {
                    grant: gid,
                    scopes,
                    expires,
                },
            )?;
            println!("amended grant {} (amendment {})", gid.short(), id.short());
        }
        ConsentCmd::Revoke { grant, reason } => {
            let (mut doc, gid) = node.find_grant(&grant)?;
            let id = node.append(&mut doc, EntryBody::Revoke { grant: gid, reason })?;
            let grantee = doc.ledger().header().grantee;
            println!("revoked grant {} (revocation {})", gid, id.short());
            println!("send it with `rapport consent export {grantee} --out FILE`");
        }
        ConsentCmd::Proffer { identity, terms } => {
            let grantee = parse_identity(&identity)?;
            let mut doc = node.doc_with(ConsentHeader {
                customer: node.me(),
                grantee,
            })?;
            let terms = terms_named(&terms)?.reference();
            let id = node.append(
                &mut doc,
                EntryBody::TermsProffer {
                    terms: terms.clone(),
                },
            )?;
            println!("proffered {} to {grantee} ({})", terms.id, id.short());
        }
        ConsentCmd::Accept { file, grant } => {
            let (mut doc, _) = node.read_file(&file)?;
            if doc.ledger().header().grantee != node.me() {
                bail!(
                    "{} holds grants you gave, not grants to you: nothing to accept",
                    file.display()
                );
            }
            let pending: Vec<GrantView> = doc
                .ledger()
                .grants(now())
                .into_iter()
                .filter(|g| g.status == GrantStatus::Pending)
                .filter(|g| {
                    grant
                        .as_deref()
                        .is_none_or(|p| g.id.to_hex().starts_with(&p.to_ascii_lowercase()))
                })
                .collect();
            if pending.is_empty() {
                bail!("{} holds no pending grant to accept", file.display());
            }
            let mut accepted = Vec::new();
            for g in &pending {
                let (_, change) = doc.append(
                    &node.key,
                    nonce()?,
                    now(),
                    EntryBody::Accept {
                        grant: g.id,
                        terms: g.terms.clone(),
                    },
                )?;
                accepted.push(change);
            }
            // The customer's changes and our acceptances land in one durable write.
            node.store_doc(&doc)?;
            let customer = doc.ledger().header().customer;
            for g in &pending {
                println!(
                    "accepted grant {} from {}: {} for {:?} on terms {}",
                    g.id,
                    customer.short(),
                    g.scopes
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", "),
                    g.purpose,
                    g.terms.id
                );
            }
            println!(
                "send your acceptance back with `rapport consent export {customer} --out FILE`"
            );
        }
        ConsentCmd::AckErasure { grant, erased } => {
            let (mut doc, gid) = node.find_grant(&grant)?;
            let view = doc.ledger().grant(&gid, UnixSeconds::MAX).expect("found");
            let Some((rid, _)) = view.revoked else {
                bail!(
                    "grant {} is not revoked: there is nothing to erase",
                    gid.short()
                );
            };
            let id = node.append(
                &mut doc,
                EntryBody::ErasureAck {
                    revoke: rid,
                    grant: gid,
                    erased,
                },
            )?;
            println!(
                "acknowledged erasure for grant {} ({})",
                gid.short(),
                id.short()
            );
        }
        ConsentCmd::List { json } => list(&node, json)?,
        ConsentCmd::Export { identity, out } => {
            let peer = parse_identity(&identity)?;
            let doc = node
                .docs()?
                .into_iter()
                .find(|d| {
                    let h = d.ledger().header();
                    (h.customer == node.me() && h.grantee == peer)
                        || (h.grantee == node.me() && h.customer == peer)
                })
                .ok_or_else(|| anyhow!("you share no consent document with {peer}"))?;
            write_new_file(&out, write_ledger_file(doc.ledger()).as_bytes())?;
            println!(
                "wrote {} changes to {}",
                doc.ledger().changes().len(),
                out.display()
            );
        }
        ConsentCmd::Import { file } => {
            let (doc, applied) = node.read_file(&file)?;
            node.store_doc(&doc)?;
            println!("imported {applied} new change(s) from {}", file.display());
            for g in doc.ledger().grants(now()) {
                println!("  grant {}  {}", g.id.short(), g.status.as_str());
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
            let mut all = Vec::new();
            for doc in node.docs()? {
                let ledger = doc.ledger();
                let controller = ControllerInfo {
                    name: controller_name
                        .clone()
                        .unwrap_or_else(|| ledger.header().grantee.to_string()),
                    contact: controller_contact.clone(),
                    address: controller_address.clone(),
                    email: controller_email.clone(),
                    phone: controller_phone.clone(),
                    url: controller_url.clone(),
                };
                let ctx = RecordContext {
                    now: now(),
                    jurisdiction: jurisdiction.clone(),
                    policy_url: policy_url.clone(),
                    collection_method: "Rapport signed consent ledger".into(),
                    controller,
                    customer_name: (ledger.header().customer == node.me())
                        .then(|| node.profile.name.clone()),
                };
                let records = match format {
                    RecordFormat::Iso27560 => iso27560_records(ledger, &ctx),
                    RecordFormat::Kantara => kantara_receipts(ledger, &ctx),
                }
                .map_err(|e| anyhow!("{e}"))?;
                all.extend(records);
            }
            let text = serde_json::to_string_pretty(&all)?;
            match out {
                Some(path) => {
                    write_new_file(&path, text.as_bytes())?;
                    println!("wrote {} record(s) to {}", all.len(), path.display());
                }
                None => println!("{text}"),
            }
        }
        ConsentCmd::Terms => unreachable!("handled above"),
    }
    Ok(())
}

/// Writes a file through a temporary sibling and a rename, so a failed write leaves no
/// half-written file behind.
fn write_new_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("rapport-tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", path.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

fn list(node: &Node, json: bool) -> Result<()> {
    let t = now();
    let mut rows = Vec::new();
    for doc in node.docs()? {
        let h = *doc.ledger().header();
        let (role, peer) = if h.customer == node.me() {
            ("granted", h.grantee)
        } else {
            ("held", h.customer)
        };
        for g in doc.ledger().grants(t) {
            rows.push((role, peer, g));
        }
    }
    if json {
        let v: Vec<serde_json::Value> = rows
            .iter()
            .map(|(role, peer, g)| {
                serde_json::json!({
                    "grant": g.id.to_hex(),
                    "role": role,
                    "peer": peer.to_string(),
                    "status": g.status.as_str(),
                    "scopes": g.scopes.iter().map(ToString::to_string).collect::<Vec<_>>(),
                    "purpose": g.purpose,
                    "legal_basis": g.legal_basis.as_str(),
                    "terms": g.terms.id,
                    "granted_at": g.granted_at,
                    "expires": g.expires,
                    "accepted_at": g.accepted.map(|a| a.1),
                    "revoked_at": g.revoked.map(|r| r.1),
                    "erasure_acked_at": g.erasure_acked.map(|e| e.1),
                    "notice_sha256": g.notice_sha256,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    if rows.is_empty() {
        println!("no grants yet");
        return Ok(());
    }
    println!(
        "{:<10} {:<8} {:<12} {:<9} {:<12} {:<18} {:<30} purpose",
        "grant", "role", "peer", "status", "terms", "expires", "scopes"
    );
    for (role, peer, g) in rows {
        let status = match (g.status, g.erasure_acked) {
            (GrantStatus::Revoked, Some(_)) => "erased".to_string(),
            (s, _) => s.as_str().to_string(),
        };
        println!(
            "{:<10} {:<8} {:<12} {:<9} {:<12} {:<18} {:<30} {}",
            g.id.short(),
            role,
            peer.short(),
            status,
            g.terms.id,
            g.expires.map(show_time).unwrap_or_else(|| "never".into()),
            g.scopes
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(","),
            g.purpose
        );
    }
    Ok(())
}

fn ledger_verify(file: &Path) -> Result<()> {
    let bytes = read_bounded(file)?;
    let (header, changes) = read_ledger_file(&bytes)
        .with_context(|| format!("{} failed verification", file.display()))?;
    let n = changes.len();
    let ledger = Ledger::verify(header, changes)
        .with_context(|| format!("{} failed verification", file.display()))?;
    println!("{}: OK", file.display());
    println!("  document  {}", ledger.id());
    println!("  customer  {}", header.customer);
    println!("  grantee   {}", header.grantee);
    println!(
        "  {n} signed change(s), {} entries, every signature, author, rule and hash link checked",
        ledger.entries().len()
    );
    for g in ledger.grants(now()) {
        println!("  grant {}  {}", g.id.short(), g.status.as_str());
    }
    Ok(())
}

fn ledger_show(dir: &Path, identity: Option<String>, json: bool) -> Result<()> {
    let node = Node::open(dir)?;
    let peer = identity.as_deref().map(parse_identity).transpose()?;
    let mut out = Vec::new();
    for doc in node.docs()? {
        let h = *doc.ledger().header();
        if peer.is_some_and(|p| p != h.customer && p != h.grantee) {
            continue;
        }
        let entries: Vec<_> = doc.ledger().entries_in_order().collect();
        if json {
            out.push(serde_json::json!({
                "document": doc.ledger().id(),
                "customer": h.customer,
                "grantee": h.grantee,
                "changes": doc.ledger().changes().len(),
                "entries": entries.iter().map(|(id, e)| serde_json::json!({"id": id, "entry": e})).collect::<Vec<_>>(),
            }));
            continue;
        }
        println!(
            "ledger {}  customer {}  grantee {}",
            doc.ledger().id(),
            h.customer,
            h.grantee
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
            println!(
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
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(())
}
