//! `rapport bench sync --json` and `rapport bench relay --json` through the real binary, with
//! tiny sizes: stdout is one JSON object with every figure, and the figures are sane.

use std::process::Command;

use serde_json::Value;

fn bench(args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_rapport"))
        .arg("bench")
        .args(args)
        .env_remove("RAPPORT_LOG")
        .output()
        .expect("the rapport binary runs");
    let stdout = String::from_utf8(out.stdout).expect("stdout is UTF-8");
    assert!(
        out.status.success(),
        "rapport bench {args:?} failed: {}\nstdout: {stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Progress bars are for a person at a terminal: none is drawn into a pipe.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains('\r') && !stderr.contains('\u{1b}'),
        "progress drawn into a pipe: {stderr:?}"
    );
    // One JSON object and nothing else (serde_json rejects trailing text).
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("not one JSON object ({e}): {stdout}"))
}

fn positive(case: &Value, field: &str) -> f64 {
    let v = case[field]
        .as_f64()
        .unwrap_or_else(|| panic!("{field} is missing or not a number in {case}"));
    assert!(v.is_finite() && v > 0.0, "{field} = {v} in {case}");
    v
}

#[test]
fn bench_sync_json_has_every_figure() {
    let v = bench(&[
        "sync",
        "--messages",
        "50",
        "--rels",
        "3",
        "--per-rel",
        "5",
        "--runs",
        "2",
        "--json",
    ]);
    assert_eq!(v["bench"], "sync");
    assert_eq!(v["runs"], 2, "{v}");
    let cases = v["cases"].as_array().expect("cases is an array");
    assert_eq!(cases.len(), 2, "{v}");
    // Each relationship also holds its title and its member entry: two changes more.
    for (case, name, rels, per_rel) in [
        (&cases[0], "1 rel x 50", 1, 50),
        (&cases[1], "3 rels x 5", 3, 5),
    ] {
        assert_eq!(case["case"], name);
        assert_eq!(case["rels"], rels);
        assert_eq!(case["per_rel"], per_rel);
        assert_eq!(case["changes"], rels * (per_rel + 2), "{case}");
        let sync = positive(case, "sync_s");
        let floor = positive(case, "floor_s");
        let verify = positive(case, "verify_s");
        let apply = positive(case, "apply_s");
        let samod = positive(case, "samod_s");
        assert!((floor - (verify + apply)).abs() < 1e-9, "{case}");
        for (field, ratio) in [
            ("sync_floor_ratio", sync / floor),
            ("sync_apply_ratio", sync / apply),
            ("sync_samod_ratio", sync / samod),
        ] {
            assert!(
                (positive(case, field) - ratio).abs() < 1e-9 * ratio,
                "{field} in {case}"
            );
        }
        // Every change crossed the wire at least once, with some framing.
        let wire = positive(case, "wire_ratio");
        assert!((1.0..10.0).contains(&wire), "{case}");
        let own = positive(case, "own_bytes_per_change");
        assert!(own > 65.0, "a signed change is over 65 bytes: {case}");
        assert!(positive(case, "wire_bytes_per_change") >= own, "{case}");
        positive(case, "samod_wire_bytes_per_change");
    }
}

#[test]
fn bench_relay_json_has_every_figure() {
    let v = bench(&["relay", "--messages", "5", "--members", "3", "--json"]);
    assert_eq!(v["bench"], "relay");
    assert_eq!(v["messages"], 5);
    let paths = v["paths"].as_array().expect("paths is an array");
    let names: Vec<&str> = paths.iter().filter_map(|p| p["path"].as_str()).collect();
    assert_eq!(names, ["direct", "relayed", "mailbox"]);
    for p in paths {
        let s = positive(p, "s");
        assert!(
            (positive(p, "messages_per_s") - 5.0 / s).abs() < 1e-6 * (5.0 / s),
            "{p}"
        );
        positive(p, "vs_direct");
    }
    assert_eq!(paths[0]["vs_direct"], 1.0);
    let rotations = v["rotations"].as_array().expect("rotations is an array");
    assert_eq!(rotations.len(), 1);
    assert_eq!(rotations[0]["members"], 3);
    let seal = positive(&rotations[0], "seal_ms");
    assert!(positive(&rotations[0], "seal_entry_ms") >= seal);
}

#[test]
fn bench_scale_json_has_every_figure() {
    let v = bench(&["scale", "--relationships", "12", "--json"]);
    assert_eq!(v["bench"], "scale");
    assert_eq!(v["relationships"], 12);
    for field in [
        "build_s",
        "start_s",
        "rss_mib",
        "inbox20_ms",
        "max_engine_hold_ms",
    ] {
        positive(&v, field);
    }
}
