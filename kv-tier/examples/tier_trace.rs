//! The policy table of the README: hit ratio (prefix semantics) and replay throughput
//! of each eviction policy at several DRAM capacities, on the generator's traces,
//! replayed through the real `Store` API (DRAM-only).
//!
//! `cargo run --release -p kv-tier --example tier_trace [requests]`; with `throughput
//! [requests] [policy]` first, the DRAM-only replay speed instead (median of five runs,
//! LRU unless a policy is named).

use kv_tier::trace::{generate, replay, GenParams, Replay};
use kv_tier::PolicyKind;

/// `throughput`: DRAM-only replay speed of the mixed trace (2048 blocks) under
/// `policy`, five runs, median.
fn throughput(requests: usize, policy: PolicyKind) -> Result<(), kv_core::Error> {
    let t = generate(&GenParams {
        requests,
        ..GenParams::mixed()
    });
    let mut v = Vec::new();
    for _ in 0..5 {
        let r = replay(
            &t,
            &Replay {
                capacity_blocks: 2048,
                policy,
                ..Default::default()
            },
        )?;
        v.push(r.blocks_per_sec());
        println!(
            "  {:.0} blocks/s, {:.0} requests/s, hit ratio {:.4}",
            r.blocks_per_sec(),
            r.requests_per_sec(),
            r.hit_ratio()
        );
    }
    v.sort_by(f64::total_cmp);
    println!(
        "median {:.0} blocks/s ({} requests, {} blocks, {})",
        v[2],
        t.requests.len(),
        t.blocks(),
        policy.as_str()
    );
    Ok(())
}

fn main() -> Result<(), kv_core::Error> {
    let mut args = std::env::args().skip(1);
    let first = args.next();
    if first.as_deref() == Some("throughput") {
        let requests = args.next().and_then(|a| a.parse().ok()).unwrap_or(20_000);
        let policy = match args.next() {
            Some(p) => p.parse()?,
            None => PolicyKind::Lru,
        };
        return throughput(requests, policy);
    }
    let requests = first.and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let policies = [PolicyKind::Lru, PolicyKind::S3Fifo, PolicyKind::Prefix];
    for p in [GenParams::chat(), GenParams::agent(), GenParams::mixed()] {
        let t = generate(&GenParams { requests, ..p });
        let unique = t.unique_blocks() as u64;
        println!(
            "{}: {} requests, {} blocks, {} unique",
            t.name,
            t.requests.len(),
            t.blocks(),
            unique
        );
        for div in [64, 32, 16, 8, 4] {
            let cap = (unique / div).max(16);
            let mut line = format!("  {cap:>7} blocks (1/{div:<2})");
            for policy in policies {
                let r = replay(
                    &t,
                    &Replay {
                        capacity_blocks: cap,
                        policy,
                        ..Default::default()
                    },
                )?;
                line += &format!(
                    "  {} {:.4} ({:.2} M blocks/s)",
                    r.policy,
                    r.hit_ratio(),
                    r.blocks_per_sec() / 1e6
                );
            }
            println!("{line}");
        }
    }
    Ok(())
}
