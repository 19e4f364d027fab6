//! What a command prints on standard output. A reader that stops early (`rapport id |
//! head -1`) closes the pipe; the command then ends quietly with what it did done, instead
//! of panicking as `println!` does.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

/// `-v`: identities are shown beside names.
static VERBOSE: AtomicBool = AtomicBool::new(false);

/// Shows identities beside names from now on (`-v`).
pub(crate) fn set_verbose(on: bool) {
    VERBOSE.store(on, Ordering::Relaxed);
}

/// Whether `-v` was given.
pub(crate) fn verbose() -> bool {
    VERBOSE.load(Ordering::Relaxed)
}

/// How a peer with a name is shown: the name, and with `-v` its identity too.
pub(crate) fn named(name: &str, id: &rapport_protocol::IdentityKey) -> String {
    if VERBOSE.load(Ordering::Relaxed) {
        format!("{name} ({id})")
    } else {
        name.to_owned()
    }
}

/// Standard output was closed by its reader.
#[derive(Debug)]
pub(crate) struct ClosedPipe;

impl std::fmt::Display for ClosedPipe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("standard output was closed by its reader")
    }
}

impl std::error::Error for ClosedPipe {}

/// Writes `args` and a newline to standard output.
pub(crate) fn line(args: std::fmt::Arguments<'_>) -> anyhow::Result<()> {
    write(format_args!("{args}\n"))
}

/// `text` with every control character but line feed and tab written as an escape
/// (`\u{1b}`): names and messages come from peers, and a terminal obeys the escape
/// sequences in what it prints (clearing the screen, rewriting earlier lines).
pub(crate) fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    if !text
        .chars()
        .any(|c| c.is_control() && c != '\n' && c != '\t')
    {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() && c != '\n' && c != '\t' {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Writes `args` to standard output (see [`printable`]). A closed pipe is [`ClosedPipe`]; anything else (a
/// full disk behind a redirect) an error worth showing.
pub(crate) fn write(args: std::fmt::Arguments<'_>) -> anyhow::Result<()> {
    let raw = args.to_string();
    let text = printable(&raw);
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(ClosedPipe.into()),
        Err(e) => Err(anyhow::Error::new(e).context("cannot write to standard output")),
    }
}

/// Prints `value` as the one JSON value a command prints under `--json`.
pub(crate) fn json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    line(format_args!("{}", serde_json::to_string_pretty(value)?))
}

/// Reports a write's one outcome: `what: where it went` on standard output (or the
/// outcome as JSON), exit 0; or, when every peer it went to refused it, one error line
/// saying who and why (exit 1). `unsent` says where it is when it went to no peer now.
pub(crate) fn report(
    what: &str,
    out: &rapport_node::WriteOutcome,
    unsent: &str,
    json: bool,
) -> anyhow::Result<()> {
    let went = rapport_node::Deliveries(out.deliveries.clone());
    let refused = !went.refusals().is_empty() && !went.any_delivered();
    let delivery = out.delivery.as_deref().unwrap_or(unsent);
    if json {
        self::json(out)?;
    }
    if refused {
        anyhow::bail!("{what}: {delivery}; it stays only in this node's copy");
    }
    if !json {
        line(format_args!("{what}: {delivery}"))?;
        if let Some(n) = &out.note {
            line(format_args!("note: {n}"))?;
        }
    }
    Ok(())
}

/// A progress bar on standard error for long work (`what`, `len` steps). It is drawn only
/// for a person at a terminal: never into a log file, a pipe or a test's output.
pub(crate) fn progress(what: &str, len: u64) -> indicatif::ProgressBar {
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {human_pos}/{human_len} ({eta})")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar.set_message(what.to_owned());
    bar
}

/// Whether `e` is standard output closed by its reader.
pub(crate) fn closed(e: &anyhow::Error) -> bool {
    e.chain().any(<dyn std::error::Error>::is::<ClosedPipe>)
}

/// `println!` for command output: a closed pipe returns [`ClosedPipe`] from the enclosing
/// function (which returns `anyhow::Result`).
macro_rules! say {
    () => {
        $crate::out::line(format_args!(""))?
    };
    ($($arg:tt)*) => {
        $crate::out::line(format_args!($($arg)*))?
    };
}

/// `print!` for command output, as [`say!`].
macro_rules! say_part {
    ($($arg:tt)*) => {
        $crate::out::write(format_args!($($arg)*))?
    };
}

pub(crate) use {say, say_part};

#[cfg(test)]
mod tests {
    use super::printable;

    #[test]
    fn what_a_peer_wrote_cannot_steer_the_terminal() {
        assert_eq!(printable("plain\n\tline"), "plain\n\tline");
        assert_eq!(printable("\u{1b}[2Jhi\r\u{7}"), "\\u{1b}[2Jhi\\u{d}\\u{7}");
        assert_eq!(printable("Zoë 🌍"), "Zoë 🌍");
    }
}
