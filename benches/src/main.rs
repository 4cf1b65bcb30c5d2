//! `kv-bench`: what the hardware gives, measured the way an inference server moves KV.
//!
//! `kv-bench transfer` moves a model-shaped KV cache from a prefill process to a decode
//! process layer by layer and verifies every byte; `kv-bench sweep` maps bandwidth and
//! latency over block sizes, batches, threads and backends; `kv-bench storage` measures
//! memory <-> file transfers beside fio; `kv-bench tier` replays a request trace through
//! the block store and prints hit ratios per capacity and eviction policy.

#![warn(missing_docs)]

mod layerwise;
mod passive;
mod pattern;
mod setup;
mod stats;
mod storage;
mod sweep;
mod tier;
mod transfer;

use clap::{Parser, Subcommand};

/// kvx benchmarks.
#[derive(Debug, Parser)]
#[command(
    name = "kv-bench",
    version,
    about = "Moves LLM KV caches and says how fast"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Two-process prefill -> decode transfer of a model-shaped paged KV cache, verified.
    Transfer(transfer::TransferArgs),
    /// Bandwidth and latency over block sizes, batch sizes, threads, ops and backends.
    Sweep(sweep::SweepArgs),
    /// KV blocks between memory and a file (gds backend: io_uring, O_DIRECT), beside fio.
    Storage(storage::StorageArgs),
    /// Replays a request trace (Mooncake JSON lines, or generated) through the kv-tier
    /// store: hit ratio, RSS and speed per DRAM capacity and eviction policy.
    Tier(tier::TierArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match &cli.cmd {
        Cmd::Transfer(a) => transfer::main(a),
        Cmd::Sweep(a) => sweep::main(a),
        Cmd::Storage(a) => storage::main(a),
        Cmd::Tier(a) => tier::main(a),
    };
    match result {
        Ok(true) => {}
        Ok(false) => {
            eprintln!("error: data check failed");
            std::process::exit(1);
        }
        Err(e) => {
            eprintln!("error: {e}");
            let code = match e {
                kv_core::Error::InvalidArgument(_)
                | kv_core::Error::BackendUnavailable { .. }
                | kv_core::Error::Unsupported(_) => 2,
                _ => 1,
            };
            std::process::exit(code);
        }
    }
}
