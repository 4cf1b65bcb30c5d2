//! The `kv-bench` binary as a user runs it: a real two-process transfer, verified, and
//! one-line errors with exit code 2 for bad input.

use std::process::Command;

fn kv_bench(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kv-bench"))
        .args(args)
        .output()
        .expect("kv-bench runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn transfer_write_is_verified() {
    let (rc, out, err) = kv_bench(&[
        "transfer",
        "--tokens",
        "512",
        "--iters",
        "1",
        "--reference",
        "memcpy",
    ]);
    assert_eq!(rc, 0, "{out}\n{err}");
    assert!(out.contains("verified"), "{out}");
    assert!(out.contains("bandwidth_gbps"), "{out}");
    assert!(out.contains("ratio"), "{out}");
}

#[test]
fn transfer_read_json_over_tcp_only() {
    let (rc, out, err) = kv_bench(&[
        "transfer",
        "--model",
        "qwen2-7b",
        "--tokens",
        "300",
        "--iters",
        "1",
        "--op",
        "read",
        "--params",
        "same_host=false",
        "--format",
        "json",
    ]);
    assert_eq!(rc, 0, "{out}\n{err}");
    assert!(
        out.trim_start().starts_with('{') && out.contains("\"verified\": true"),
        "{out}"
    );
    assert!(out.contains("\"op\": \"READ\""), "{out}");
}

#[test]
fn custom_mla_model_csv() {
    let (rc, out, err) = kv_bench(&[
        "transfer",
        "--model",
        "custom",
        "--layers",
        "4",
        "--kv-heads",
        "1",
        "--head-dim",
        "576",
        "--latent",
        "--tokens",
        "64",
        "--iters",
        "1",
        "--format",
        "csv",
    ]);
    assert_eq!(rc, 0, "{out}\n{err}");
    let mut lines = out.lines();
    assert!(
        lines.next().unwrap_or("").starts_with("model,tokens"),
        "{out}"
    );
    // 4 layers × 576 × 2 bytes, one latent plane.
    assert!(out.contains(",4608,"), "{out}");
}

#[test]
fn bad_input_is_one_line_and_exit_2() {
    for args in [
        &["transfer", "--model", "gpt-9"][..],
        &["transfer", "--tokens", "0"],
        &["transfer", "--tokens", "100000000000"],
        &["transfer", "--backend", "no-such-backend"],
        &["transfer", "--model", "custom", "--layers", "4"],
        &["sweep", "--sizes", "0"],
        &["storage", "--block", "1000"],
        &["tier", "--capacities", "0"],
        &["tier", "--policies", "mru"],
        &["tier", "--gen", "chess"],
    ] {
        let (rc, out, err) = kv_bench(args);
        assert_eq!(rc, 2, "{args:?}: {out}\n{err}");
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{args:?}: {err}");
        assert!(lines[0].starts_with("error: "), "{args:?}: {err}");
    }
}

#[test]
fn sweep_prints_a_row_per_point() {
    let (rc, out, err) = kv_bench(&[
        "sweep",
        "--sizes",
        "4K,1M",
        "--batch",
        "1,4",
        "--op",
        "write,read",
        "--seconds",
        "0.02",
        "--recreate",
        "--format",
        "csv",
    ]);
    assert_eq!(rc, 0, "{out}\n{err}");
    assert_eq!(out.lines().count(), 1 + 2 * 2 * 2 * 2, "{out}");
}

#[test]
fn storage_round_trips_through_a_file() {
    let dir = std::env::temp_dir();
    let (rc, out, err) = kv_bench(&[
        "storage",
        "--dir",
        dir.to_str().unwrap(),
        "--size",
        "8M",
        "--block",
        "256K",
        "--qd",
        "4",
        "--op",
        "write,read,randread",
        "--seconds",
        "0.1",
    ]);
    assert_eq!(rc, 0, "{out}\n{err}");
    assert_eq!(out.lines().count(), 4, "{out}");
}

#[test]
fn tier_replays_generated_and_file_traces() {
    let file = std::env::temp_dir().join(format!("kv-bench-trace-{}.jsonl", std::process::id()));
    let f = file.to_str().unwrap();
    let (rc, out, err) = kv_bench(&[
        "tier",
        "--gen",
        "chat",
        "--requests",
        "300",
        "--capacities",
        "64,256",
        "--policies",
        "lru,s3fifo",
        "--write-trace",
        f,
        "--format",
        "csv",
    ]);
    assert_eq!(rc, 0, "{out}\n{err}");
    assert_eq!(out.lines().count(), 1 + 2 * 2, "{out}");
    assert!(
        out.lines().next().unwrap_or("").contains("hit_ratio"),
        "{out}"
    );
    // The written trace replays the same: equal hit ratios.
    let (rc, again, err) = kv_bench(&[
        "tier",
        "--trace",
        f,
        "--capacities",
        "64,256",
        "--policies",
        "lru,s3fifo",
        "--format",
        "csv",
    ]);
    assert_eq!(rc, 0, "{again}\n{err}");
    let ratios = |s: &str| -> Vec<String> {
        s.lines()
            .skip(1)
            .map(|l| l.split(',').nth(6).unwrap_or("").to_string())
            .collect()
    };
    assert_eq!(ratios(&out), ratios(&again), "{out}\n{again}");
    std::fs::write(&file, "{\"hash_ids\": [1, \"x\"]}\n").unwrap();
    let (rc, _, err) = kv_bench(&["tier", "--trace", f]);
    assert_eq!(rc, 2, "{err}");
    assert!(err.contains("line 1"), "{err}");
    std::fs::remove_file(&file).ok();
}
