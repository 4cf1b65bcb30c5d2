//! The command line: `generate` (one prompt) and `serve` (a synthetic prompt set), both
//! single-process for now; the disaggregated roles come with kv-agent's engine API.

use std::time::{Duration, Instant};

use crate::decode::{serve, DisaggOptions};
use crate::report::{per_s, quantile, render, Format, Value};
use crate::worker::WorkerArgs;

use clap::{Args, Parser, Subcommand};
use pd_engine::workload::{reusable_prefix_tokens, synthetic_prompts, WorkloadOptions};
use pd_engine::{Engine, EngineOptions, ModelConfig, PrefixHasher, Result, TpRank};

/// A small Llama-architecture engine with a paged KV cache, for kvx's prefill/decode
/// disaggregation.
#[derive(Debug, Parser)]
#[command(name = "pd-engine", version)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate from one synthetic prompt in this process.
    Generate {
        /// Prompt length in tokens.
        #[arg(long, default_value_t = 512)]
        prompt_tokens: usize,
        /// Tokens to generate.
        #[arg(long, default_value_t = 32)]
        max_new: usize,
        /// Seed of the prompt's tokens.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[command(flatten)]
        common: Common,
    },
    /// Serve a synthetic prompt set (single-process reference) and report throughput.
    Serve {
        /// Number of prompts.
        #[arg(long, default_value_t = 100)]
        prompts: usize,
        /// Tokens to generate per prompt.
        #[arg(long, default_value_t = 32)]
        max_new: usize,
        /// Shortest prompt.
        #[arg(long, default_value_t = 8)]
        min_len: usize,
        /// Longest prompt.
        #[arg(long, default_value_t = 2000)]
        max_len: usize,
        /// Distinct shared prefixes (system prompts) in the set.
        #[arg(long, default_value_t = 8)]
        shared_prefixes: usize,
        /// Seed of the prompt set.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[command(flatten)]
        disagg: Disagg,
        #[command(flatten)]
        common: Common,
    },
    /// A prefill worker rank (started by `serve --prefill N`, not by hand).
    #[command(hide = true)]
    PrefillWorker {
        /// The decode worker's side channel.
        #[arg(long)]
        decode: String,
        /// This TP rank.
        #[arg(long, default_value_t = 0)]
        rank: usize,
        /// TP size of the worker.
        #[arg(long, default_value_t = 1)]
        tp: usize,
        /// Hold the KV for the decode worker to read.
        #[arg(long)]
        pull: bool,
        /// Prefix store DRAM, MiB (0: none).
        #[arg(long, default_value_t = 0)]
        tier_mb: usize,
        /// Agent name.
        #[arg(long)]
        name: String,
        #[command(flatten)]
        common: Common,
    },
}

/// The disaggregated roles of `serve`.
#[derive(Debug, Args)]
struct Disagg {
    /// Prefill workers, each started as its own process(es); 0 runs single-process.
    #[arg(long, default_value_t = 0)]
    prefill: usize,
    /// Decode workers (the decode worker is this process; only 1 is supported).
    #[arg(long, default_value_t = 1)]
    decode: usize,
    /// The decode worker READs the KV from the prefill worker (vLLM) instead of the
    /// prefill worker WRITEing it (Dynamo).
    #[arg(long)]
    pull: bool,
    /// TP size of each prefill worker (one process per rank; decode is TP 1).
    #[arg(long, default_value_t = 1)]
    prefill_tp: usize,
    /// Prefix store per prefill rank in MiB (kv-tier DRAM; 0: no prefix reuse).
    #[arg(long, default_value_t = 0)]
    tier_mb: usize,
    /// Prompts with at most this many tokens are prefilled locally.
    #[arg(long, default_value_t = kv_agent::OffloadThresholds::default().max_local_prefill_tokens)]
    max_local_prefill: u64,
    /// Prefill locally when this many remote prefills are in flight.
    #[arg(long, default_value_t = kv_agent::OffloadThresholds::default().max_prefill_queue_depth)]
    max_prefill_queue: usize,
    /// Requests prefilling or decoding at once.
    #[arg(long, default_value_t = 16)]
    max_batch: usize,
    /// A remote prefill not done within this many ms is recomputed locally.
    #[arg(long, default_value_t = 30_000)]
    remote_deadline_ms: u64,
    /// Fault injection: SIGKILL the worker of the n-th remote request after queueing it.
    #[arg(long, hide = true)]
    kill_prefill_after: Option<usize>,
}

#[derive(Debug, Args)]
struct Common {
    /// Decoder layers.
    #[arg(long, default_value_t = ModelConfig::default().layers)]
    layers: usize,
    /// Hidden size.
    #[arg(long, default_value_t = ModelConfig::default().hidden)]
    hidden: usize,
    /// Query heads.
    #[arg(long, default_value_t = ModelConfig::default().q_heads)]
    q_heads: usize,
    /// KV heads.
    #[arg(long, default_value_t = ModelConfig::default().kv_heads)]
    kv_heads: usize,
    /// Head dimension.
    #[arg(long, default_value_t = ModelConfig::default().head_dim)]
    head_dim: usize,
    /// MLP width.
    #[arg(long, default_value_t = ModelConfig::default().intermediate)]
    intermediate: usize,
    /// Vocabulary size.
    #[arg(long, default_value_t = ModelConfig::default().vocab)]
    vocab: usize,
    /// Seed of the weights.
    #[arg(long, default_value_t = ModelConfig::default().seed)]
    model_seed: u64,
    /// KV blocks in the pool.
    #[arg(long, default_value_t = EngineOptions::default().num_blocks)]
    num_blocks: usize,
    /// Longest sequence the model supports (0: the default, or what the run needs).
    #[arg(long, default_value_t = 0, hide = true)]
    max_positions: usize,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
}

impl Common {
    fn engine(&self, max_tokens: usize) -> Result<Engine> {
        let d = ModelConfig::default();
        let cfg = ModelConfig {
            layers: self.layers,
            hidden: self.hidden,
            q_heads: self.q_heads,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            intermediate: self.intermediate,
            vocab: self.vocab,
            seed: self.model_seed,
            max_positions: if self.max_positions > 0 {
                self.max_positions
            } else {
                d.max_positions.max(max_tokens)
            },
            ..d
        };
        Engine::new(
            cfg,
            EngineOptions {
                num_blocks: self.num_blocks,
                ..Default::default()
            },
        )
    }

    /// The model and engine arguments that rebuild `engine` in a child process.
    fn child_args(&self, engine: &Engine) -> Vec<String> {
        let c = engine.model().config();
        [
            ("--layers", c.layers.to_string()),
            ("--hidden", c.hidden.to_string()),
            ("--q-heads", c.q_heads.to_string()),
            ("--kv-heads", c.kv_heads.to_string()),
            ("--head-dim", c.head_dim.to_string()),
            ("--intermediate", c.intermediate.to_string()),
            ("--vocab", c.vocab.to_string()),
            ("--model-seed", c.seed.to_string()),
            ("--num-blocks", self.num_blocks.to_string()),
            ("--max-positions", c.max_positions.to_string()),
        ]
        .into_iter()
        .flat_map(|(k, v)| [k.to_string(), v])
        .collect()
    }
}

/// Runs one command and prints its report.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Generate {
            prompt_tokens,
            max_new,
            seed,
            common,
        } => {
            let mut engine = common.engine(prompt_tokens + max_new)?;
            let vocab = engine.model().config().vocab as u64;
            let mut r = pd_engine::rng::Rng::new(seed);
            let prompt: Vec<u32> = (0..prompt_tokens).map(|_| r.below(vocab) as u32).collect();
            let g = engine.generate(&prompt, max_new)?;
            let rows = [
                ("command", Value::Text("generate".into())),
                ("model", Value::Text(engine.model().config().identity())),
                ("prompt_tokens", Value::Int(prompt_tokens)),
                ("generated_tokens", Value::Int(g.tokens.len())),
                ("prefill_s", Value::Float(g.prefill.as_secs_f64())),
                ("decode_s", Value::Float(g.decode.as_secs_f64())),
                (
                    "prefill_tokens_per_s",
                    Value::Float(per_s(prompt_tokens, g.prefill)),
                ),
                (
                    "decode_tokens_per_s",
                    Value::Float(per_s(g.tokens.len().saturating_sub(1), g.decode)),
                ),
                ("tokens", Value::Tokens(g.tokens)),
            ];
            println!("{}", render(&rows, common.format));
        }
        Command::Serve {
            prompts,
            max_new,
            min_len,
            max_len,
            shared_prefixes,
            seed,
            disagg,
            common,
        } => {
            if max_new == 0 || disagg.decode != 1 || disagg.prefill_tp == 0 {
                return Err(pd_engine::Error::invalid(
                    "serve needs --max-new ≥ 1, --decode 1 and --prefill-tp ≥ 1",
                ));
            }
            let engine = common.engine(max_len + max_new)?;
            let cfg = *engine.model().config();
            let opts = WorkloadOptions {
                prompts,
                min_len,
                max_len,
                shared_prefixes,
                seed,
            };
            let set = synthetic_prompts(&opts, cfg.vocab)?;
            let hasher = PrefixHasher::new(cfg.fingerprint(), engine.layout().block_tokens);
            let (reusable, prompt_total) = reusable_prefix_tokens(&set, &hasher);
            let bar = indicatif::ProgressBar::new(set.len() as u64);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:40} {pos}/{len} prompts {elapsed} (eta {eta})",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            let mut rows = vec![
                ("command", Value::Text("serve".into())),
                ("model", Value::Text(cfg.identity())),
                ("prompts", Value::Int(set.len())),
                ("prompt_tokens", Value::Int(prompt_total)),
                ("reusable_prefix_tokens", Value::Int(reusable)),
            ];
            let t = Instant::now();
            let outputs = if disagg.prefill == 0 {
                serve_single(engine, &set, max_new, &bar, &mut rows)?
            } else {
                let model_args = common.child_args(&engine);
                serve_disagg(engine, &set, max_new, &disagg, model_args, &bar, &mut rows)?
            };
            bar.finish_and_clear();
            let wall = t.elapsed();
            let generated: usize = outputs.iter().map(Vec::len).sum();
            let mut digest = xxhash_rust::xxh3::Xxh3::new();
            for tok in outputs.iter().flatten() {
                digest.update(&tok.to_le_bytes());
            }
            rows.extend([
                ("generated_tokens", Value::Int(generated)),
                ("wall_s", Value::Float(wall.as_secs_f64())),
                (
                    "tokens_per_s",
                    Value::Float(per_s(prompt_total + generated, wall)),
                ),
                (
                    "output_digest",
                    Value::Text(format!("{:016x}", digest.digest())),
                ),
            ]);
            println!("{}", render(&rows, common.format));
        }
        Command::PrefillWorker {
            decode,
            rank,
            tp,
            pull,
            tier_mb,
            name,
            common,
        } => {
            let engine = common.engine(0)?;
            let args = WorkerArgs {
                decode_addr: decode,
                tp: TpRank { size: tp, rank },
                pull,
                tier_mb,
                name,
            };
            crate::worker::run(engine, args)?;
        }
    }
    Ok(())
}

/// The single-process reference: `generate` per prompt, in order.
fn serve_single(
    mut engine: Engine,
    set: &[Vec<u32>],
    max_new: usize,
    bar: &indicatif::ProgressBar,
    rows: &mut Vec<(&str, Value)>,
) -> Result<Vec<Vec<u32>>> {
    let (mut prefill, mut decode) = (Duration::ZERO, Duration::ZERO);
    let mut ttft = Vec::with_capacity(set.len());
    let mut outputs = Vec::with_capacity(set.len());
    let prompt_total: usize = set.iter().map(Vec::len).sum();
    for p in set {
        let g = engine.generate(p, max_new)?;
        prefill += g.prefill;
        decode += g.decode;
        ttft.push(g.prefill);
        outputs.push(g.tokens);
        bar.inc(1);
    }
    let generated: usize = outputs.iter().map(Vec::len).sum();
    rows.extend([
        ("mode", Value::Text("single-process".into())),
        ("prefill_s", Value::Float(prefill.as_secs_f64())),
        ("decode_s", Value::Float(decode.as_secs_f64())),
        (
            "prefill_tokens_per_s",
            Value::Float(per_s(prompt_total, prefill)),
        ),
        (
            "decode_tokens_per_s",
            Value::Float(per_s(generated.saturating_sub(set.len()), decode)),
        ),
        ("ttft_p50_s", Value::Float(quantile(&mut ttft, 0.5))),
        ("ttft_p99_s", Value::Float(quantile(&mut ttft, 0.99))),
    ]);
    Ok(outputs)
}

/// The disaggregated run: this process is the decode worker, prefill workers are
/// children.
fn serve_disagg(
    engine: Engine,
    set: &[Vec<u32>],
    max_new: usize,
    d: &Disagg,
    model_args: Vec<String>,
    bar: &indicatif::ProgressBar,
    rows: &mut Vec<(&str, Value)>,
) -> Result<Vec<Vec<u32>>> {
    let layers = engine.layout().layers;
    let opts = DisaggOptions {
        prefill: d.prefill,
        tp: d.prefill_tp,
        pull: d.pull,
        tier_mb: d.tier_mb,
        thresholds: kv_agent::OffloadThresholds {
            max_local_prefill_tokens: d.max_local_prefill,
            max_prefill_queue_depth: d.max_prefill_queue,
        },
        max_batch: d.max_batch,
        remote_deadline: Duration::from_millis(d.remote_deadline_ms),
        kill_after: d.kill_prefill_after,
        max_new,
        model_args,
    };
    let mode = format!(
        "disaggregated: {} prefill worker(s) of TP {} -> 1 decode (TP 1), {}{}",
        d.prefill,
        d.prefill_tp,
        if d.pull {
            "pull (READ)"
        } else {
            "push (layer-wise WRITE)"
        },
        if d.tier_mb > 0 {
            ", kv-tier prefix reuse"
        } else {
            ""
        }
    );
    let mut out = serve(engine, set, &opts, &mut || bar.inc(1))?;
    rows.push(("mode", Value::Text(mode)));
    rows.push(("decode_s", Value::Float(out.metrics.decode.as_secs_f64())));
    rows.extend(out.metrics.rows(layers));
    Ok(out.outputs)
}
