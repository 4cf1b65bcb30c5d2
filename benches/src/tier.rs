//! `kv-bench tier`: hit ratios of the kv-tier block store's eviction policies (LRU vs
//! S3-FIFO) per tier, on synthetic multi-turn-chat and shared-system-prompt traces with
//! Zipfian prefix popularity.

use kv_core::{Error, Result};
use kv_tier::trace::{
    multi_turn_chat, run_trace, shared_system_prompt, Capacity, ChatParams, PromptParams,
};
use kv_tier::PolicyKind;

use crate::stats::{render, Format, Row, Value};
use crate::sweep::parse_size;

/// Arguments of `kv-bench tier`.
#[derive(Debug, Clone, clap::Args)]
pub struct TierArgs {
    /// DRAM tier capacity (K/M/G).
    #[arg(long, default_value = "2G")]
    pub dram: String,
    /// NVMe tier capacity (K/M/G).
    #[arg(long, default_value = "8G")]
    pub nvme: String,
    /// Bytes per stored chunk (K/M).
    #[arg(long, default_value = "2M")]
    pub block: String,
    /// Traces: chat, prompt (comma-separated).
    #[arg(long, default_value = "chat,prompt")]
    pub trace: String,
    /// Requests per trace (0: the trace's default).
    #[arg(long, default_value_t = 0)]
    pub requests: usize,
    /// Zipf exponent of prefix popularity (0: the trace's default).
    #[arg(long, default_value_t = 0.0)]
    pub zipf: f64,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    pub format: Format,
}

/// Runs the trace bench and prints a row per trace and policy.
pub fn main(args: &TierArgs) -> Result<bool> {
    let cap = Capacity {
        dram_bytes: parse_size(&args.dram)?,
        nvme_bytes: parse_size(&args.nvme)?,
        block_bytes: parse_size(&args.block)?,
    };
    if !(0.0..=5.0).contains(&args.zipf) {
        return Err(Error::invalid_argument("--zipf must be within 0..=5"));
    }
    let mut rows: Vec<Row> = Vec::new();
    for name in args
        .trace
        .split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
    {
        let trace = match name {
            "chat" => {
                let mut p = ChatParams::default();
                if args.requests > 0 {
                    p.requests = args.requests;
                }
                if args.zipf > 0.0 {
                    p.zipf_s = args.zipf;
                }
                multi_turn_chat(&p)
            }
            "prompt" => {
                let mut p = PromptParams::default();
                if args.requests > 0 {
                    p.requests = args.requests;
                }
                if args.zipf > 0.0 {
                    p.zipf_s = args.zipf;
                }
                shared_system_prompt(&p)
            }
            o => {
                return Err(Error::invalid_argument(format!(
                    "unknown --trace {o}; use chat or prompt"
                )))
            }
        };
        for policy in [PolicyKind::Lru, PolicyKind::S3Fifo] {
            let r = run_trace(policy, cap, &trace);
            rows.push(vec![
                ("trace", Value::Str(trace.name.clone())),
                ("requests", Value::Int(r.requests)),
                ("chunks", Value::Int(r.chunks)),
                ("policy", Value::Str(r.policy.to_string())),
                ("dram_hit_ratio", Value::Num(r.dram_hit_ratio())),
                ("nvme_hit_ratio", Value::Num(r.nvme_hit_ratio())),
                ("total_hit_ratio", Value::Num(r.hit_ratio())),
            ]);
        }
    }
    print!("{}", render(&rows, args.format));
    Ok(true)
}
