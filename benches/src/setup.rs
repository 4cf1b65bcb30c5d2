//! What both sides of `kv-bench transfer` share: the arguments (checked before any
//! work), backend parameters, the agents' cluster secret, the KV buffer and its pattern.

use std::sync::OnceLock;
use std::time::Duration;

use kv_agent::layout::{ModelShape, PagedLayout};
use kv_agent::{Agent, AgentOptions, SECRET_ENV};
use kv_core::auth::ClusterSecret;
use kv_core::{Error, Op, Result};
use kv_mem::{HostBuffer, HostOptions};

use crate::pattern;
use crate::stats::Format;

/// Seed of the fill pattern (both processes use it).
pub(crate) const SEED: u64 = 0x6b76_7862_656e_6368;
/// Longest `--deadline`, in seconds (a day).
const MAX_DEADLINE: u64 = 86_400;
/// Arguments of `kv-bench transfer`.
#[derive(Debug, Clone, clap::Args)]
pub struct TransferArgs {
    /// Model shape: llama3-8b, mistral-7b, llama3-70b, llama3.1-405b, qwen2-7b, deepseek-v3, or custom.
    #[arg(long, default_value = "llama3-8b")]
    pub model: String,
    /// Layers (custom model).
    #[arg(long)]
    pub layers: Option<u32>,
    /// KV heads (custom model).
    #[arg(long)]
    pub kv_heads: Option<u32>,
    /// Head dimension (custom model).
    #[arg(long)]
    pub head_dim: Option<u32>,
    /// Element type: bf16, fp16, fp8, fp32.
    #[arg(long, default_value = "bf16")]
    pub dtype: String,
    /// MLA latent layout (custom model): one vector per token per layer.
    #[arg(long)]
    pub latent: bool,
    /// Tokens per page.
    #[arg(long, default_value_t = 16)]
    pub page_tokens: u32,
    /// Tokens of KV to move.
    #[arg(long, default_value_t = 8192)]
    pub tokens: u64,
    /// Coalesce adjacent pages into payloads of at most this many tokens (0: unlimited).
    #[arg(long, default_value_t = 128)]
    pub max_tokens: u32,
    /// Backend(s) to load, comma-separated, in preference order.
    #[arg(long, default_value = "tcp")]
    pub backend: String,
    /// Backend parameters as key=value, comma-separated (e.g. `same_host=false`).
    #[arg(long, default_value = "")]
    pub params: String,
    /// WRITE (prefill pushes) or READ (decode pulls).
    #[arg(long, value_enum, default_value = "write")]
    pub op: OpArg,
    /// Timed iterations over all layers (after one warm-up).
    #[arg(long, default_value_t = 3)]
    pub iters: u32,
    /// Verify every byte on the receiver (default on).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub check: bool,
    /// Also measure a reference in this process and print the ratio: `memcpy`.
    #[arg(long)]
    pub reference: Option<String>,
    /// `active` (default; spawns the passive side unless --peer is given) or `passive`.
    #[arg(long, value_enum, default_value = "active")]
    pub role: Role,
    /// Side-channel address of a passive side already running (two hosts).
    #[arg(long)]
    pub peer: Option<String>,
    /// Side-channel address the passive side listens on.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: String,
    /// Per-transfer deadline in seconds (1..=86400); the passive side also gives up on
    /// an active side it has not heard from for this long.
    #[arg(long, default_value_t = 60)]
    pub deadline: u64,
    /// Also hand the layers off as an engine computes (layer i posted when its compute
    /// ends): time to the first layer and the share of the transfer the compute hides.
    #[arg(long)]
    pub layerwise: bool,
    /// Simulated compute per layer for --layerwise, in microseconds.
    #[arg(long, default_value_t = 1000)]
    pub layer_compute_us: u64,
    /// KV memory: memfd (same-host peers map it) or heap (cross-memory attach).
    #[arg(long, value_enum, default_value = "memfd")]
    pub memory: MemoryArg,
    /// Cluster secret (hex) both sides share in two-host mode; prefer `KVX_SECRET` in
    /// the environment (other users can read a command line). A spawned pair generates
    /// its own.
    #[arg(long)]
    pub secret: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    pub format: Format,
}

/// Transfer direction on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OpArg {
    /// Active side pushes into the passive side.
    Write,
    /// Active side pulls from the passive side.
    Read,
}

/// What backs the KV buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MemoryArg {
    /// A memfd mapping (`HostOptions::shared`).
    Memfd,
    /// Plain heap memory.
    Heap,
}

/// Which side this process plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// Prepares and posts the transfers.
    Active,
    /// Owns the other buffer; answers on its side channel.
    Passive,
}

impl TransferArgs {
    /// The model shape the arguments name.
    pub fn shape(&self) -> Result<ModelShape> {
        let dtype_bytes = match self.dtype.as_str() {
            "bf16" | "fp16" => 2,
            "fp8" => 1,
            "fp32" => 4,
            other => {
                return Err(Error::invalid_argument(format!(
                    "unknown --dtype {other}; use bf16, fp16, fp8 or fp32"
                )))
            }
        };
        let shape = if self.model == "custom" {
            let need = |v: Option<u32>, name: &str| {
                v.ok_or_else(|| Error::invalid_argument(format!("--model custom needs --{name}")))
            };
            ModelShape {
                layers: need(self.layers, "layers")?,
                kv_heads: need(self.kv_heads, "kv-heads")?,
                head_dim: need(self.head_dim, "head-dim")?,
                dtype_bytes,
                latent: self.latent,
            }
        } else {
            let mut s = ModelShape::preset(&self.model).ok_or_else(|| {
                Error::invalid_argument(format!(
                    "unknown --model {}; use one of {} or custom",
                    self.model,
                    ModelShape::PRESETS.join(", ")
                ))
            })?;
            s.dtype_bytes = dtype_bytes;
            s
        };
        shape.validate()?;
        Ok(shape)
    }

    /// The paged layout of the KV cache to move.
    pub fn layout(&self) -> Result<PagedLayout> {
        if self.tokens == 0 {
            return Err(Error::invalid_argument("--tokens must be at least 1"));
        }
        PagedLayout::for_tokens(self.shape()?, self.page_tokens, self.tokens)
    }

    /// Checks every argument before any work (no buffer, agent or child yet).
    pub fn validate(&self) -> Result<()> {
        self.layout()?;
        if !(1..=MAX_DEADLINE).contains(&self.deadline) {
            return Err(Error::invalid_argument(format!(
                "--deadline {} is out of range; use 1..={MAX_DEADLINE} seconds",
                self.deadline
            )));
        }
        if let Some(r) = &self.reference {
            if r != "memcpy" {
                return Err(Error::invalid_argument(format!(
                    "unknown --reference {r}; use memcpy (the native tools run beside it in scripts/compare.sh)"
                )));
            }
        }
        parse_params(&self.params)?;
        if let Some(s) = &self.secret {
            ClusterSecret::from_hex(s)?;
        }
        if self.role == Role::Passive && self.peer.is_some() {
            return Err(Error::invalid_argument(
                "--peer is for the active side; the passive side listens (--listen)",
            ));
        }
        Ok(())
    }

    pub(crate) fn deadline(&self) -> Duration {
        Duration::from_secs(self.deadline)
    }

    /// The secret given on the command line or in `KVX_SECRET`, if any.
    pub(crate) fn given_secret(&self) -> Result<Option<ClusterSecret>> {
        if let Some(s) = &self.secret {
            return ClusterSecret::from_hex(s).map(Some);
        }
        match std::env::var(SECRET_ENV) {
            Ok(hex) if !hex.trim().is_empty() => ClusterSecret::from_hex(&hex)
                .map(Some)
                .map_err(|e| Error::invalid_argument(format!("{SECRET_ENV}: {e}"))),
            _ => Ok(None),
        }
    }

    pub(crate) fn op(&self) -> Op {
        match self.op {
            OpArg::Write => Op::Write,
            OpArg::Read => Op::Read,
        }
    }

    /// Arguments that make a passive side with the same layout.
    pub(crate) fn passive_args(&self) -> Vec<String> {
        let mut a = vec![
            "transfer".into(),
            "--role".into(),
            "passive".into(),
            "--model".into(),
            self.model.clone(),
            "--dtype".into(),
            self.dtype.clone(),
            "--page-tokens".into(),
            self.page_tokens.to_string(),
            "--tokens".into(),
            self.tokens.to_string(),
            "--backend".into(),
            self.backend.clone(),
            "--params".into(),
            self.params.clone(),
            "--op".into(),
            match self.op {
                OpArg::Write => "write".into(),
                OpArg::Read => "read".into(),
            },
            "--check".into(),
            self.check.to_string(),
            "--memory".into(),
            match self.memory {
                MemoryArg::Memfd => "memfd".into(),
                MemoryArg::Heap => "heap".into(),
            },
            "--deadline".into(),
            self.deadline.to_string(),
        ];
        for (flag, v) in [
            ("--layers", self.layers),
            ("--kv-heads", self.kv_heads),
            ("--head-dim", self.head_dim),
        ] {
            if let Some(v) = v {
                a.push(flag.into());
                a.push(v.to_string());
            }
        }
        if self.latent {
            a.push("--latent".into());
        }
        a
    }
}

/// Parses `k=v,k=v` backend parameters.
pub fn parse_params(s: &str) -> Result<kv_core::Params> {
    let mut p = kv_core::Params::new();
    for kv in s.split(',').map(str::trim).filter(|x| !x.is_empty()) {
        let (k, v) = kv.split_once('=').ok_or_else(|| {
            Error::invalid_argument(format!("--params entry {kv:?} is not key=value"))
        })?;
        p.insert(k.trim().to_string(), v.trim().to_string());
    }
    Ok(p)
}

/// The secret this process's agents share when none is given: `KVX_SECRET`, else one
/// generated once (so agents of one process can talk to each other).
fn process_secret() -> Result<ClusterSecret> {
    static GENERATED: OnceLock<ClusterSecret> = OnceLock::new();
    if let Ok(hex) = std::env::var(SECRET_ENV) {
        if !hex.trim().is_empty() {
            return ClusterSecret::from_hex(&hex)
                .map_err(|e| Error::invalid_argument(format!("{SECRET_ENV}: {e}")));
        }
    }
    if let Some(s) = GENERATED.get() {
        return Ok(s.clone());
    }
    let s = ClusterSecret::generate()?;
    Ok(GENERATED.get_or_init(|| s).clone())
}

/// An agent with the requested backends loaded (the first must load); without a secret
/// in `opts` it gets this process's ([`process_secret`]).
pub fn agent_with(
    name: &str,
    backends: &str,
    params: &str,
    mut opts: AgentOptions,
) -> Result<Agent> {
    if opts.secret.is_none() {
        opts.secret = Some(process_secret()?);
    }
    let agent = Agent::new(name, opts)?;
    let params = parse_params(params)?;
    let mut errors = Vec::new();
    for b in backends.split(',').map(str::trim).filter(|x| !x.is_empty()) {
        if let Err(e) = agent.add_backend(b, &params) {
            errors.push(e);
        }
    }
    if agent.backends().is_empty() {
        return Err(errors
            .into_iter()
            .next()
            .unwrap_or_else(|| Error::invalid_argument("--backend names no backend")));
    }
    for e in errors {
        eprintln!("note: {e}");
    }
    Ok(agent)
}

/// Bytes of memory the OS says are available, if it says.
fn available_memory() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Allocates the KV buffer; refuses sizes the machine cannot hold.
pub(crate) fn kv_buffer(bytes: u64, copies: u64, memory: MemoryArg) -> Result<HostBuffer> {
    if let Some(avail) = available_memory() {
        if bytes.saturating_mul(copies) > avail / 10 * 9 {
            return Err(Error::invalid_argument(format!(
                "the KV cache needs {} MiB x {copies} but only {} MiB are available; lower --tokens",
                bytes >> 20,
                avail >> 20
            )));
        }
    }
    let len = usize::try_from(bytes).map_err(|_| Error::invalid_argument("KV cache too large"))?;
    HostBuffer::with_options(
        len,
        HostOptions {
            shared: memory == MemoryArg::Memfd,
            ..Default::default()
        },
    )
}

pub(crate) fn fill_region(buf: &mut HostBuffer) {
    pattern::fill(buf.as_mut_slice(), SEED, 0);
}

pub(crate) fn crc_of(b: &[u8]) -> u32 {
    // A CRC over 1 GiB costs ~0.1 s with SSE4.2; it lets two hosts compare by eye.
    crc32c::crc32c(b)
}
