//! What the CLI tests share: run the real `rapport` binary, the one cargo builds for these
//! tests (`CARGO_BIN_EXE_rapport`), against real stores in temporary directories, as
//! one-shot commands and as running `rapport node run` and `rapport relay run` processes.
//! Each test file uses a part of it.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The `rapport` binary cargo built for these tests; `RAPPORT_BIN` names another one
/// instead (to run a test against an older build).
pub(crate) fn bin() -> PathBuf {
    std::env::var_os("RAPPORT_BIN").map_or_else(
        || PathBuf::from(env!("CARGO_BIN_EXE_rapport")),
        PathBuf::from,
    )
}

/// A command running [`bin`], with no `RAPPORT_HOME` from the test's environment.
pub(crate) fn rapport() -> Command {
    let mut cmd = Command::new(bin());
    cmd.env_remove("RAPPORT_HOME");
    cmd
}

/// One node's data directory, used through the real binary.
pub(crate) struct Party {
    /// The data directory.
    pub(crate) dir: PathBuf,
}

/// What one run of the binary printed.
pub(crate) struct Run {
    /// Exit status was success.
    pub(crate) ok: bool,
    /// Standard output.
    pub(crate) stdout: String,
    /// Standard error.
    pub(crate) stderr: String,
}

impl Party {
    /// A party whose store lives in `dir` (not yet initialised).
    pub(crate) fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// Runs a command that prints JSON and parses what it printed.
    pub(crate) fn json(&self, args: &[&str]) -> serde_json::Value {
        serde_json::from_str(&self.ok(args)).expect("the command prints JSON")
    }

    /// Runs `rapport --data-dir DIR ARGS…`.
    pub(crate) fn run(&self, args: &[&str]) -> Run {
        let out = rapport()
            .arg("--data-dir")
            .arg(&self.dir)
            .args(args)
            .output()
            .expect("run rapport");
        to_run(out)
    }

    /// Runs and insists on success; returns stdout.
    pub(crate) fn ok(&self, args: &[&str]) -> String {
        let r = self.run(args);
        assert!(
            r.ok,
            "rapport {args:?} failed:\nstdout: {}\nstderr: {}",
            r.stdout, r.stderr
        );
        r.stdout
    }

    /// Runs and insists on failure; returns stderr.
    pub(crate) fn fails(&self, args: &[&str]) -> String {
        let r = self.run(args);
        assert!(
            !r.ok,
            "rapport {args:?} should have failed:\nstdout: {}",
            r.stdout
        );
        r.stderr
    }

    /// This party's invitation link (with its running node's addresses, if it runs).
    pub(crate) fn invitation(&self) -> String {
        self.json(&["invite", "--json"])["link"]
            .as_str()
            .expect("a link")
            .to_owned()
    }

    /// Adds `other` as a contact called `name`, from its invitation.
    pub(crate) fn add_contact(&self, other: &Party, name: &str) {
        self.ok(&["contact", "add", &other.invitation(), "--name", name]);
    }

    /// This party's identity text.
    pub(crate) fn identity(&self) -> String {
        self.ok(&["id"])
            .lines()
            .next()
            .expect("identity line")
            .trim()
            .to_owned()
    }
}

/// Runs the binary with explicit environment and no `--data-dir`.
pub(crate) fn run_with_env(args: &[&str], env: &[(&str, &Path)]) -> Run {
    let mut cmd = rapport();
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    to_run(cmd.output().expect("run rapport"))
}

fn to_run(out: Output) -> Run {
    Run {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A `rapport node run` process on loopback (no mDNS); killed on drop if still running.
pub(crate) struct NodeProcess {
    child: std::process::Child,
}

impl Party {
    /// Starts `rapport node run` for this party and waits (at most 30 s) until its API
    /// answers.
    pub(crate) fn run_node(&self) -> NodeProcess {
        self.run_node_with(&["--listen", "/ip4/127.0.0.1/tcp/0"])
    }

    /// Starts `rapport node run` (no mDNS) with these arguments; returns once its API
    /// answers.
    pub(crate) fn run_node_with(&self, args: &[&str]) -> NodeProcess {
        self.spawn_node(args, std::process::Stdio::null(), None)
    }

    /// Starts `rapport node run` (no mDNS) with these arguments, appending its log (at
    /// `RAPPORT_LOG`, default `info`) to the file `log`; returns once its API answers.
    pub(crate) fn run_node_logged(&self, args: &[&str], log: &Path) -> NodeProcess {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("open the node's log file");
        let level = std::env::var("RAPPORT_LOG").unwrap_or_else(|_| "info".into());
        self.spawn_node(args, file.into(), Some(level))
    }

    fn spawn_node(
        &self,
        args: &[&str],
        stderr: std::process::Stdio,
        log: Option<String>,
    ) -> NodeProcess {
        let mut cmd = rapport();
        cmd.arg("--data-dir")
            .arg(&self.dir)
            .args(["node", "run", "--no-mdns"])
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(stderr);
        if let Some(level) = log {
            cmd.env("RAPPORT_LOG", level);
        }
        let child = cmd.spawn().expect("spawn rapport node run");
        let proc = NodeProcess { child };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            if self.dir.join(rapport_node::NODE_FILE).exists() && self.run(&["peers"]).ok {
                return proc;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "rapport node run did not come up"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// The running node's first listen address (from `rapport id --json`).
    pub(crate) fn listen_addr(&self) -> String {
        let v: serde_json::Value =
            serde_json::from_str(&self.ok(&["id", "--json"])).expect("id --json");
        v["listen"][0]
            .as_str()
            .expect("a listen address")
            .to_owned()
    }
}

impl NodeProcess {
    /// Kills the node with SIGKILL (no clean shutdown) and waits for it to be gone.
    pub(crate) fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits (at most 20 s) for the exit; returns whether it exited 0.
    pub(crate) fn terminate(mut self) -> bool {
        terminate(&mut self.child)
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Sends SIGTERM to `child` and waits (at most 20 s) for the exit; returns whether it
/// exited 0.
fn terminate(child: &mut std::process::Child) -> bool {
    let pid = child.id().to_string();
    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return status.success();
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// A `rapport relay run` process.
pub(crate) struct RelayProcess {
    /// The child.
    pub(crate) child: std::process::Child,
    /// The address members pass to `--relay`.
    pub(crate) addr: String,
}

impl Party {
    /// Starts `rapport relay run` on this party's data directory with these arguments and
    /// returns once it prints its address.
    pub(crate) fn run_relay(&self, args: &[&str]) -> RelayProcess {
        use std::io::BufRead;
        let mut child = rapport()
            .arg("--data-dir")
            .arg(&self.dir)
            .args(["relay", "run"])
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn rapport relay run");
        let out = child.stdout.take().expect("stdout");
        let mut lines = std::io::BufReader::new(out).lines();
        let addr = loop {
            let line = lines
                .next()
                .expect("rapport relay run printed its address")
                .expect("a line");
            if let Some(a) = line.strip_prefix("listening: ") {
                break a.to_owned();
            }
        };
        // Keep reading so the relay never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        RelayProcess { child, addr }
    }
}

impl RelayProcess {
    /// Sends SIGTERM and waits (at most 20 s); true if it exited 0.
    pub(crate) fn terminate(mut self) -> bool {
        terminate(&mut self.child)
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How a `rapport` process that should refuse to start ended.
pub(crate) enum Outcome {
    /// It exited, with this status and standard error.
    Exited {
        /// Exit status was success.
        ok: bool,
        /// Standard error.
        stderr: String,
    },
    /// It printed a `listening:` line: it started.
    Started,
}

/// Runs `rapport ARGS…` and waits (at most 30 s) until it either exits or prints that it
/// listens; a process that started is killed.
pub(crate) fn run_until_listening_or_exit(args: &[&str]) -> Outcome {
    use std::io::{BufRead, Read};
    let mut child = rapport()
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn rapport");
    let out = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if line.starts_with("listening:") {
                let _ = tx.send(());
            }
        }
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            let mut stderr = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut stderr);
            }
            return Outcome::Exited {
                ok: status.success(),
                stderr,
            };
        }
        if rx
            .recv_timeout(std::time::Duration::from_millis(50))
            .is_ok()
        {
            let _ = child.kill();
            let _ = child.wait();
            return Outcome::Started;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "rapport {args:?} neither exited nor started within 30s"
        );
    }
}

/// Polls `check` (a CLI query, say) every 100 ms until it holds; panics after 30 s.
pub(crate) fn until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !check() {
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Through the CLI of two running nodes: `customer` grants `company` read, write and
/// contact:support, the company accepts, the customer sees the grant active and opens a
/// relationship with it (`open` adds arguments to `rel open`), and the company holds it.
/// Returns the relationship's id.
pub(crate) fn consent_and_open(customer: &Party, company: &Party, open: &[&str]) -> String {
    let company_id = company.identity();
    // The customer names the company by its invitation (it becomes a contact).
    let link = company.invitation();
    customer.ok(&[
        "consent",
        "grant",
        &link,
        "--scope",
        "conversation:read",
        "--scope",
        "conversation:write",
        "--scope",
        "contact:support",
        "--purpose",
        "support",
    ]);
    until("the grant reaching the company", || {
        company.json(&["consent", "list", "--json"])[0]["status"] == "pending"
    });
    company.ok(&["consent", "accept"]);
    until("the customer seeing the acceptance", || {
        customer.json(&["consent", "list", "--json"])[0]["status"] == "active"
    });
    let mut args = vec!["rel", "open", company_id.as_str()];
    args.extend_from_slice(open);
    customer.ok(&args);
    let rel = customer.json(&["rel", "list", "--json"])[0]["id"]
        .as_str()
        .expect("a relationship id")
        .to_owned();
    until("the company holding the relationship", || {
        company
            .json(&["rel", "list", "--json"])
            .as_array()
            .is_some_and(|a| a.len() == 1)
    });
    rel
}
