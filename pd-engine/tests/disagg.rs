//! The disaggregated roles as separate processes (`serve --prefill N`): every mode —
//! layer-wise WRITE, pull by lease, prefill TP 2 into decode TP 1, kv-tier prefix hits,
//! a prefill worker killed mid-request, a missed deadline — generates exactly the
//! single-process tokens (`output_digest`).

mod common;

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{field, run};

/// The tiny model, 16 prompts of up to 200 tokens over two shared system prompts; the
/// router keeps prompts of ≤ 32 tokens local.
const WORKLOAD: &str = "--layers 2 --hidden 64 --q-heads 4 --kv-heads 2 --head-dim 16 \
    --intermediate 128 --vocab 256 --num-blocks 512 --prompts 16 --max-len 200 \
    --shared-prefixes 2 --max-new 4 --max-local-prefill 32 --format json";

/// Runs `serve` with `extra` arguments; returns its JSON line.
fn serve(extra: &str) -> String {
    let args: Vec<&str> = WORKLOAD
        .split_whitespace()
        .chain(extra.split_whitespace())
        .collect();
    let args: Vec<&str> = std::iter::once("serve").chain(args).collect();
    let t = Instant::now();
    let (ok, out, err) = run(&args);
    assert!(ok, "serve {extra}: {err}");
    assert!(
        t.elapsed() < Duration::from_secs(60),
        "serve {extra} took {:?}",
        t.elapsed()
    );
    out.trim().to_string()
}

fn reference() -> &'static str {
    static R: OnceLock<String> = OnceLock::new();
    R.get_or_init(|| {
        let r = serve("");
        assert_eq!(field(&r, "mode"), "single-process");
        r
    })
}

fn int(json: &str, key: &str) -> u64 {
    field(json, key)
        .parse()
        .unwrap_or_else(|_| panic!("{key} in {json}"))
}

/// Same tokens as one process, some prefills remote and some local, KV bytes moved.
fn assert_identical(extra: &str) -> String {
    let out = serve(extra);
    assert_eq!(
        field(&out, "output_digest"),
        field(reference(), "output_digest"),
        "{extra}: {out}"
    );
    assert_eq!(
        int(&out, "generated_tokens"),
        int(reference(), "generated_tokens")
    );
    assert!(int(&out, "local_prefills") > 0, "{extra}: {out}");
    assert!(int(&out, "remote_prefills") > 0, "{extra}: {out}");
    out
}

#[test]
fn push_and_pull_give_single_process_tokens() {
    for extra in ["--prefill 2", "--prefill 2 --pull"] {
        let out = assert_identical(extra);
        assert_eq!(int(&out, "recomputed_prefills"), 0, "{extra}: {out}");
        assert!(int(&out, "bytes_moved") > 0, "{extra}: {out}");
    }
}

#[test]
fn prefill_tp2_into_decode_tp1_gives_single_process_tokens() {
    for extra in [
        "--prefill 1 --prefill-tp 2",
        "--prefill 1 --prefill-tp 2 --pull",
    ] {
        let out = assert_identical(extra);
        assert_eq!(int(&out, "recomputed_prefills"), 0, "{extra}: {out}");
        assert!(int(&out, "bytes_moved") > 0, "{extra}: {out}");
    }
}

#[test]
fn prefix_hits_through_kv_tier_give_single_process_tokens() {
    assert!(int(reference(), "reusable_prefix_tokens") > 0);
    for extra in [
        "--prefill 2 --tier-mb 16",
        "--prefill 1 --tier-mb 16 --pull",
    ] {
        let out = assert_identical(extra);
        assert!(int(&out, "tier_hit_blocks") > 0, "{extra}: {out}");
        let ratio: f64 = field(&out, "tier_hit_ratio").parse().unwrap();
        assert!(ratio > 0.0 && ratio <= 1.0, "{extra}: {out}");
    }
}

/// A prefill worker SIGKILLed right after it got a request, and one that misses a
/// 1 ms deadline: the decode worker recomputes locally, no request hangs, same tokens.
#[test]
fn a_killed_or_late_prefill_worker_costs_a_local_recompute() {
    for extra in [
        "--prefill 1 --kill-prefill-after 2",
        "--prefill 1 --pull --kill-prefill-after 3",
        "--prefill 1 --prefill-tp 2 --kill-prefill-after 1",
        "--prefill 1 --remote-deadline-ms 1",
    ] {
        let out = assert_identical(extra);
        assert!(int(&out, "recomputed_prefills") >= 1, "{extra}: {out}");
    }
}

/// A prefill worker that cannot start (TP 3 does not divide 2 KV heads) fails the run
/// at once with both sides' reasons, instead of waiting.
#[test]
fn a_prefill_worker_that_cannot_start_fails_the_run_promptly() {
    let args: Vec<&str> = std::iter::once("serve")
        .chain(WORKLOAD.split_whitespace())
        .chain(["--prefill", "1", "--prefill-tp", "3"])
        .collect();
    let t = Instant::now();
    let (ok, _, err) = run(&args);
    assert!(!ok);
    assert!(err.contains("exited before it was ready"), "{err}");
    assert!(err.contains("TP size 3"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
}
