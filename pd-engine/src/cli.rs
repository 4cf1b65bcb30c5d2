//! The command line: `generate` (one prompt) and `serve` (a synthetic prompt set), both
//! single-process for now; the disaggregated roles come with kv-agent's engine API.

use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand, ValueEnum};
use pd_engine::workload::{reusable_prefix_tokens, synthetic_prompts, WorkloadOptions};
use pd_engine::{Engine, EngineOptions, ModelConfig, PrefixHasher, Result};

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
        common: Common,
    },
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
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    /// Human-readable lines.
    Text,
    /// One JSON object on stdout.
    Json,
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
            max_positions: d.max_positions.max(max_tokens),
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
}

/// One report line's value.
enum Value {
    Int(usize),
    Float(f64),
    Text(String),
    Tokens(Vec<u32>),
}

fn render(rows: &[(&str, Value)], format: Format) -> String {
    match format {
        Format::Json => {
            let fields: Vec<String> = rows
                .iter()
                .map(|(k, v)| {
                    let v = match v {
                        Value::Int(i) => i.to_string(),
                        Value::Float(f) if f.is_finite() => format!("{f:.6}"),
                        Value::Float(_) => "null".into(),
                        Value::Text(s) => {
                            format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
                        }
                        Value::Tokens(t) => format!(
                            "[{}]",
                            t.iter()
                                .map(|x| x.to_string())
                                .collect::<Vec<_>>()
                                .join(",")
                        ),
                    };
                    format!("\"{k}\": {v}")
                })
                .collect();
            format!("{{{}}}", fields.join(", "))
        }
        Format::Text => rows
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    Value::Int(i) => i.to_string(),
                    Value::Float(f) => format!("{f:.3}"),
                    Value::Text(s) => s.clone(),
                    Value::Tokens(t) => t
                        .iter()
                        .map(|x| x.to_string())
                        .collect::<Vec<_>>()
                        .join(" "),
                };
                format!("{k:<24} {v}")
            })
            .collect::<Vec<_>>()
            .join("\n"),
    }
}

fn per_s(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

/// The `q`-quantile (nearest rank) of `xs`, in seconds.
fn quantile(xs: &mut [Duration], q: f64) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.sort_unstable();
    let i = ((q * xs.len() as f64).ceil() as usize).clamp(1, xs.len()) - 1;
    xs[i].as_secs_f64()
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
            common,
        } => {
            let mut engine = common.engine(max_len + max_new)?;
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
            let (mut prefill, mut decode, mut generated) = (Duration::ZERO, Duration::ZERO, 0);
            let mut ttft = Vec::with_capacity(set.len());
            let mut digest = xxhash_rust::xxh3::Xxh3::new();
            let t = Instant::now();
            for p in &set {
                let g = engine.generate(p, max_new)?;
                prefill += g.prefill;
                decode += g.decode;
                ttft.push(g.prefill);
                generated += g.tokens.len();
                for tok in &g.tokens {
                    digest.update(&tok.to_le_bytes());
                }
                bar.inc(1);
            }
            bar.finish_and_clear();
            let wall = t.elapsed();
            let rows = [
                ("command", Value::Text("serve".into())),
                ("mode", Value::Text("single-process".into())),
                ("model", Value::Text(cfg.identity())),
                ("prompts", Value::Int(set.len())),
                ("prompt_tokens", Value::Int(prompt_total)),
                ("reusable_prefix_tokens", Value::Int(reusable)),
                ("generated_tokens", Value::Int(generated)),
                ("wall_s", Value::Float(wall.as_secs_f64())),
                ("prefill_s", Value::Float(prefill.as_secs_f64())),
                ("decode_s", Value::Float(decode.as_secs_f64())),
                (
                    "tokens_per_s",
                    Value::Float(per_s(prompt_total + generated, wall)),
                ),
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
                (
                    "output_digest",
                    Value::Text(format!("{:016x}", digest.digest())),
                ),
            ];
            println!("{}", render(&rows, common.format));
        }
    }
    Ok(())
}
