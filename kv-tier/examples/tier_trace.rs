//! Prints LRU vs S3-FIFO hit ratios per tier on the two synthetic traces — what
//! `kv-bench tier` shows. `cargo run --release -p kv-tier --example tier_trace`.

use kv_tier::trace::{
    multi_turn_chat, run_trace, shared_system_prompt, Capacity, ChatParams, PromptParams,
};
use kv_tier::PolicyKind;

fn main() {
    // 2 MiB per 256-token chunk (one layer group of a Llama-3-8B-sized cache).
    let cap = Capacity {
        dram_bytes: 2 << 30,
        nvme_bytes: 8 << 30,
        block_bytes: 2 << 20,
    };
    let traces = [
        multi_turn_chat(&ChatParams::default()),
        shared_system_prompt(&PromptParams::default()),
    ];
    println!(
        "DRAM {} MiB, NVMe {} MiB, {} KiB blocks",
        cap.dram_bytes >> 20,
        cap.nvme_bytes >> 20,
        cap.block_bytes >> 10
    );
    for t in &traces {
        println!(
            "{} — {} requests, {} tokens",
            t.name,
            t.requests.len(),
            t.tokens()
        );
        for p in [PolicyKind::Lru, PolicyKind::S3Fifo] {
            let r = run_trace(p, cap, t);
            println!(
                "  {:7} dram {:.3}  nvme {:.3}  total {:.3}  ({} chunks)",
                r.policy,
                r.dram_hit_ratio(),
                r.nvme_hit_ratio(),
                r.hit_ratio(),
                r.chunks
            );
        }
    }
}
