//! `kv-bench tier`: replays a request trace — a Mooncake-format JSON-lines file, or one
//! from kv-tier's generator — through the real kv-tier `Store` API at several DRAM
//! capacities and eviction policies, and prints hit ratios (prefix semantics), resident
//! memory and replay speed.

use std::path::PathBuf;

use kv_core::{Error, Result};
use kv_tier::trace::{generate, replay, GenParams, Replay, Trace};
use kv_tier::PolicyKind;

use crate::stats::{render, Format, Row, Value};
use crate::sweep::parse_size;

/// Arguments of `kv-bench tier`.
#[derive(Debug, Clone, clap::Args)]
pub struct TierArgs {
    /// A trace file: one JSON object per line with `timestamp`, `input_length`,
    /// `output_length` and `hash_ids` (Mooncake's format). Without it, a generated trace.
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// Generated trace preset: chat, agent or mixed (without --trace).
    #[arg(long, default_value = "mixed")]
    pub gen: String,
    /// Requests of the generated trace.
    #[arg(long, default_value_t = 20_000)]
    pub requests: usize,
    /// Seed of the generated trace (0: the preset's).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Writes the generated trace to this file (JSON lines) before replaying it.
    #[arg(long)]
    pub write_trace: Option<PathBuf>,
    /// Tokens per block (hash id) of the trace.
    #[arg(long, default_value_t = 512)]
    pub block_tokens: usize,
    /// DRAM capacities in blocks (comma-separated).
    #[arg(long, default_value = "512,1024,2048,4096")]
    pub capacities: String,
    /// Eviction policies (comma-separated): lru, s3fifo, default.
    #[arg(long, default_value = "lru,s3fifo,default")]
    pub policies: String,
    /// Payload bytes per block (K/M; hit ratios do not depend on it).
    #[arg(long, default_value = "4K")]
    pub block: String,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    pub format: Format,
}

fn list<T>(s: &str, what: &str, f: impl Fn(&str) -> Result<T>) -> Result<Vec<T>> {
    let v = s
        .split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(f)
        .collect::<Result<Vec<T>>>()?;
    if v.is_empty() {
        return Err(Error::invalid_argument(format!("--{what} is empty")));
    }
    Ok(v)
}

fn load(args: &TierArgs) -> Result<Trace> {
    if let Some(path) = &args.trace {
        return Trace::read_jsonl(path, args.block_tokens);
    }
    let mut p = match args.gen.as_str() {
        "chat" => GenParams::chat(),
        "agent" => GenParams::agent(),
        "mixed" => GenParams::mixed(),
        o => {
            return Err(Error::invalid_argument(format!(
                "unknown --gen {o}; use chat, agent or mixed"
            )))
        }
    };
    if args.requests == 0 {
        return Err(Error::invalid_argument("--requests must be at least 1"));
    }
    p.requests = args.requests;
    p.block_tokens = args.block_tokens;
    if args.seed != 0 {
        p.seed = args.seed;
    }
    let t = generate(&p);
    if let Some(out) = &args.write_trace {
        std::fs::write(out, t.to_jsonl())
            .map_err(|e| Error::io(format!("writing {}", out.display()), e))?;
    }
    Ok(t)
}

/// Replays the trace at every capacity and policy and prints a row for each.
pub fn main(args: &TierArgs) -> Result<bool> {
    if args.block_tokens == 0 {
        return Err(Error::invalid_argument("--block-tokens must be at least 1"));
    }
    let block = parse_size(&args.block)?;
    if block > 64 << 20 {
        return Err(Error::invalid_argument("--block is at most 64M"));
    }
    let capacities = list(&args.capacities, "capacities", |c| {
        c.parse::<u64>()
            .ok()
            .filter(|n| (1..=1 << 24).contains(n))
            .ok_or_else(|| {
                Error::invalid_argument(format!(
                    "capacity {c:?} is not a block count within 1..=16777216"
                ))
            })
    })?;
    let policies = list(&args.policies, "policies", str::parse::<PolicyKind>)?;
    let trace = load(args)?;
    let mut rows: Vec<Row> = Vec::new();
    for &cap in &capacities {
        for &policy in &policies {
            let r = replay(
                &trace,
                &Replay {
                    capacity_blocks: cap,
                    block_bytes: block as usize,
                    policy,
                },
            )?;
            rows.push(vec![
                ("trace", Value::Str(trace.name.clone())),
                ("requests", Value::Int(r.requests)),
                ("blocks", Value::Int(r.blocks)),
                ("capacity_blocks", Value::Int(cap)),
                (
                    "capacity_mib",
                    Value::Num((cap * block) as f64 / (1 << 20) as f64),
                ),
                ("policy", Value::Str(r.policy.to_string())),
                ("hit_ratio", Value::Num(r.hit_ratio())),
                ("rss_mib", Value::Num(r.rss_bytes as f64 / (1 << 20) as f64)),
                ("blocks_per_s", Value::Num(r.blocks_per_sec())),
                ("requests_per_s", Value::Num(r.requests_per_sec())),
            ]);
        }
    }
    print!("{}", render(&rows, args.format));
    Ok(true)
}
