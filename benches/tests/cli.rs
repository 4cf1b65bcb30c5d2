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
fn tier_prints_both_policies() {
    let (rc, out, err) = kv_bench(&["tier", "--requests", "200", "--format", "csv"]);
    assert_eq!(rc, 0, "{out}\n{err}");
    assert_eq!(out.lines().count(), 1 + 2 * 2, "{out}");
    assert!(out.contains("lru") || out.contains("LRU"), "{out}");
}

/// Issue 15 item 10: the main job over `--backend ucx` completes and verifies, both
/// ways (it hung for 120 s: the final notification waited behind an endpoint flush
/// nobody progressed). Skips when UCX is missing unless `KV_REQUIRE_BACKENDS` names it.
#[test]
fn transfer_over_ucx_is_verified() {
    for op in ["write", "read"] {
        let (rc, out, err) = kv_bench(&[
            "transfer",
            "--backend",
            "ucx",
            "--tokens",
            "512",
            "--iters",
            "1",
            "--op",
            op,
            "--deadline",
            "20",
        ]);
        if rc != 0 && err.contains("unavailable") && !kv_core::backend_required("ucx") {
            eprintln!("skipping: {err}");
            return;
        }
        assert_eq!(rc, 0, "{op}: {out}\n{err}");
        assert!(
            out.lines()
                .any(|l| l.split_whitespace().eq(["backend", "ucx"])),
            "{out}"
        );
        assert!(out.contains("verified"), "{op}: {out}");
    }
}
