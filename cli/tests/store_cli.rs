//! The store as the `rapport` binary uses it: damaged files and read-only commands.

mod support;

use std::path::Path;
use std::process::Stdio;
use std::sync::mpsc;
use std::time::Duration;

use rapport_node::{Engine, Store};
use redb::ReadableTable;

/// Where a store made by `rapport init` is damaged: these bytes of every 4 KiB page (each
/// flipped on its own). With redb 4.6 and the store code before this test, 38 of these
/// flips made both `rapport id` and `rapport consent list` exit 101 with a redb panic, e.g.
/// byte 0 of page 1 (`unreachable` at btree.rs:1110), byte 2 of page 4 (transactions.rs:233),
/// byte 4 of page 4 ("Malformed allocator state"), byte 2 of page 6 (slice index out of
/// range in btree_base.rs).
const FLIPPED: [usize; 12] = [0, 1, 2, 3, 4, 5, 8, 12, 16, 20, 32, 64];

/// How long a command that should stop at once may take.
const LIMIT: Duration = Duration::from_secs(60);

/// Runs the binary on `dir` and returns (exit code, stdout, stderr), killing it past
/// [`LIMIT`].
fn run(dir: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let mut child = support::rapport()
        .arg("--data-dir")
        .arg(dir)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run rapport");
    let id = child.id();
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().expect("stdout");
    let stderr = child.stderr.take().expect("stderr");
    std::thread::spawn(move || {
        let read = |mut r: Box<dyn std::io::Read + Send>| {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        };
        let out = std::thread::spawn(move || read(Box::new(stdout)));
        let err = read(Box::new(stderr));
        let _ = tx.send((out.join().unwrap_or_default(), err));
    });
    match rx.recv_timeout(LIMIT) {
        Ok((out, err)) => {
            let status = child.wait().expect("wait for rapport");
            (status.code(), out, err)
        }
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("rapport {args:?} (pid {id}) still ran after {LIMIT:?}");
        }
    }
}

/// Break 11: a store with flipped bytes used to make redb panic (exit 101, a backtrace
/// hint). Every such store must give the one-line "damaged … left untouched" error and
/// stay as it was; a flip that damages nothing the command reads may still succeed.
#[test]
fn a_damaged_store_never_panics_and_is_left_untouched() {
    let tmp = tempfile::tempdir().unwrap();
    let template = tmp.path().join("template");
    let (code, _, err) = run(&template, &["init", "--kind", "person", "--name", "Alice"]);
    assert_eq!(code, Some(0), "{err}");
    let original = std::fs::read(template.join(Store::FILE_NAME)).unwrap();
    let pages = original.len() / 4096;
    assert!(pages > 4, "a fresh store has {pages} pages");

    let work = tmp.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let file = work.join(Store::FILE_NAME);
    let mut damaged_seen = 0;
    let mut panics = Vec::new();
    for page in 1..pages {
        for at in FLIPPED {
            let offset = page * 4096 + at;
            let mut bytes = original.clone();
            bytes[offset] ^= 0xff;
            for args in [&["id"][..], &["consent", "list"][..]] {
                std::fs::write(&file, &bytes).unwrap();
                let (code, _, err) = run(&work, args);
                match code {
                    Some(0) => {}
                    Some(1) => {
                        assert_eq!(
                            err.trim_end().lines().count(),
                            1,
                            "byte {offset} flipped, rapport {args:?}: one line expected:\n{err}"
                        );
                        assert!(
                            err.contains("damaged") && err.contains("left untouched"),
                            "byte {offset} flipped, rapport {args:?}: {err}"
                        );
                        damaged_seen += 1;
                        assert!(
                            std::fs::read(&file).unwrap() == bytes,
                            "byte {offset} flipped, rapport {args:?} changed the damaged store"
                        );
                    }
                    other => panics.push(format!(
                        "byte {offset} flipped, rapport {args:?}: exit {other:?}: {}",
                        err.lines().take(2).collect::<Vec<_>>().join(" / ")
                    )),
                }
            }
        }
    }
    assert!(
        panics.is_empty(),
        "{} run(s) did not end with exit 0 or 1:\n{}",
        panics.len(),
        panics.join("\n")
    );
    assert!(damaged_seen > 0, "no flip was found damaged");
}

/// Break 11: `node run` on a store redb panicked on gives the same one-line error and exit 1.
#[test]
fn node_run_on_a_damaged_store_says_so_in_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("n");
    let (code, _, err) = run(&dir, &["init", "--kind", "person", "--name", "Alice"]);
    assert_eq!(code, Some(0), "{err}");
    let file = dir.join(Store::FILE_NAME);
    let original = std::fs::read(&file).unwrap();
    let pages = original.len() / 4096;
    // The first flips `id` does not get past (most made redb panic, see FLIPPED); `node run`
    // reads at least what `id` reads.
    let mut tried = 0;
    for page in 1..pages {
        for at in FLIPPED {
            let mut bytes = original.clone();
            bytes[page * 4096 + at] ^= 0xff;
            std::fs::write(&file, &bytes).unwrap();
            let (code, _, _) = run(&dir, &["id"]);
            if code == Some(0) {
                continue;
            }
            tried += 1;
            let (code, out, err) = run(&dir, &["node", "run", "--listen", "none", "--no-mdns"]);
            assert_eq!(code, Some(1), "flip at {page}:{at}: {out}\n{err}");
            assert_eq!(err.trim_end().lines().count(), 1, "{err}");
            assert!(err.contains("damaged"), "{err}");
            if tried == 3 {
                return;
            }
        }
    }
    panic!("only {tried} damaging flip(s) found");
}

/// A command that only reads opens the store read-only: it works while another process
/// holds the store open for reading, and (for a user other than root) on a file the user
/// cannot write.
#[test]
fn thread_and_other_reads_open_the_store_read_only() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("r");
    let (code, _, err) = run(&dir, &["init", "--kind", "person", "--name", "Alice"]);
    assert_eq!(code, Some(0), "{err}");
    let rel = {
        let mut engine = Engine::open(Store::open(&dir).unwrap()).unwrap();
        let peer = rapport_protocol::SecretKey::from_seed([5; 32]).identity();
        let (out, _) = engine
            .open_relationship(peer, None, Some("Repairs".into()), rapport_node::now())
            .unwrap();
        out.doc.to_hex()
    };
    let file = dir.join(Store::FILE_NAME);
    let before = std::fs::read(&file).unwrap();

    // Another reader holds the file (a shared lock): a writer could not open it now.
    let reader = redb::Database::builder().open_read_only(&file).unwrap();
    let reads: [&[&str]; 5] = [
        &["thread", &rel],
        &["id"],
        &["consent", "list"],
        &["rel", "list"],
        &["inbox"],
    ];
    for args in reads {
        let (code, out, err) = run(&dir, args);
        assert_eq!(code, Some(0), "rapport {args:?}: {out}\n{err}");
    }
    let (_, out, _) = run(&dir, &["thread", &rel]);
    assert!(out.contains("Repairs"), "{out}");
    drop(reader);
    assert!(
        std::fs::read(&file).unwrap() == before,
        "a read changed the store"
    );

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o400)).unwrap();
        // Root writes whatever the mode says; the check means something for other users.
        if std::fs::OpenOptions::new().write(true).open(&file).is_err() {
            let (code, out, err) = run(&dir, &["thread", &rel]);
            assert_eq!(code, Some(0), "{out}\n{err}");
        }
    }
}

/// `rapport store verify` checks every stored change again and the index beside each
/// document, from the side of whoever damaged the file: a change whose signature no
/// longer checks, and an index row that lies about whom a document is shared with.
#[test]
fn store_verify_finds_a_bad_signature_and_a_lying_index() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("v");
    let (code, _, err) = run(&dir, &["init", "--kind", "person", "--name", "Alice"]);
    assert_eq!(code, Some(0), "{err}");
    let rel = {
        let mut engine = Engine::open(Store::open(&dir).unwrap()).unwrap();
        let peer = rapport_protocol::SecretKey::from_seed([5; 32]).identity();
        let (out, _) = engine
            .open_relationship(peer, None, Some("Repairs".into()), rapport_node::now())
            .unwrap();
        engine
            .send_message(
                &out.doc.to_hex(),
                "hello".into(),
                None,
                None,
                rapport_node::now(),
            )
            .unwrap();
        out.doc
    };
    let (code, out, err) = run(&dir, &["store", "verify"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(out.contains("checked 1 documents and "), "{out}");
    assert!(out.contains("everything checks"), "{out}");

    let file = dir.join(Store::FILE_NAME);
    let clean = std::fs::read(&file).unwrap();
    let changes: redb::TableDefinition<(&[u8; 32], u64), &[u8]> =
        redb::TableDefinition::new("changes-1");
    let facts: redb::TableDefinition<&[u8; 32], &[u8]> = redb::TableDefinition::new("doc-facts-1");

    // A flipped bit in the first change's signature (a stored change is its format
    // version, its 64 signature bytes, then the Automerge change).
    {
        let db = redb::Database::open(&file).unwrap();
        let tx = db.begin_write().unwrap();
        {
            let mut t = tx.open_table(changes).unwrap();
            let mut bytes = t.get((&rel.0, 0)).unwrap().unwrap().value().to_vec();
            bytes[10] ^= 1;
            t.insert((&rel.0, 0), bytes.as_slice()).unwrap();
        }
        tx.commit().unwrap();
    }
    let (code, out, err) = run(&dir, &["store", "verify", "--json"]);
    assert_eq!(code, Some(1), "{out}\n{err}");
    let report: rapport_node::VerifyReport = serde_json::from_str(&out).unwrap();
    assert_eq!(report.problems.len(), 1, "{out}");
    assert_eq!(report.problems[0].doc, rel.to_hex());
    assert!(err.contains("does not check"), "{err}");
    // The node itself loads its own store without checking signatures again (they were
    // checked when the changes arrived): the thread still opens; `store verify` is the check.
    let (code, out, err) = run(&dir, &["thread", &rel.to_hex(), "--json"]);
    assert_eq!(code, Some(0), "{out}\n{err}");

    // A damaged change body: the document cannot be loaded, and the node says so (it used
    // to panic on a listed document it could not load).
    std::fs::write(&file, &clean).unwrap();
    {
        let db = redb::Database::open(&file).unwrap();
        let tx = db.begin_write().unwrap();
        {
            let mut t = tx.open_table(changes).unwrap();
            let mut bytes = t.get((&rel.0, 0)).unwrap().unwrap().value().to_vec();
            *bytes.last_mut().unwrap() ^= 1;
            t.insert((&rel.0, 0), bytes.as_slice()).unwrap();
        }
        tx.commit().unwrap();
    }
    let (code, out, err) = run(&dir, &["thread", &rel.to_hex()]);
    assert_eq!(code, Some(1), "{out}\n{err}");
    assert!(err.contains("cannot be loaded"), "{err}");

    // An index that says the relationship is shared with nobody.
    std::fs::write(&file, &clean).unwrap();
    {
        let db = redb::Database::open(&file).unwrap();
        let tx = db.begin_write().unwrap();
        tx.open_table(facts)
            .unwrap()
            .insert(
                &rel.0,
                br#"{"kind":"relationship","members":[]}"#.as_slice(),
            )
            .unwrap();
        tx.commit().unwrap();
    }
    let (code, out, _) = run(&dir, &["store", "verify"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains(&format!("document {}: its index", rel.to_hex())),
        "{out}"
    );

    // A header moved under another id (a node starts from the ids as stored, without
    // hashing every header again).
    std::fs::write(&file, &clean).unwrap();
    let docs: redb::TableDefinition<&[u8; 32], &[u8]> = redb::TableDefinition::new("docs-1");
    let elsewhere = [7u8; 32];
    {
        let db = redb::Database::open(&file).unwrap();
        let tx = db.begin_write().unwrap();
        {
            let mut t = tx.open_table(docs).unwrap();
            let header = t.remove(&rel.0).unwrap().unwrap().value().to_vec();
            t.insert(&elsewhere, header.as_slice()).unwrap();
        }
        tx.commit().unwrap();
    }
    let (code, out, _) = run(&dir, &["store", "verify"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains(&format!(
            "document {}: it is stored under this id, but its header is that of document {}",
            hex::encode(elsewhere),
            rel.to_hex()
        )),
        "{out}"
    );
}
