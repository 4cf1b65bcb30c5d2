//! `kv-bench transfer`: a real two-process prefill → decode transfer of a model-shaped,
//! paged KV cache, layer by layer, verified byte for byte.
//!
//! The active side (this process) prepares one transfer per layer and posts them in
//! order, each with a notification, as a prefill engine does while it computes; the
//! passive side (a child process, or `--role passive` on another host) owns the other
//! buffer and answers on its side channel. For WRITE the passive side checks what
//! arrived; for READ it holds the source and the active side checks.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kv_agent::layout::{ModelShape, PagedLayout};
use kv_agent::{Agent, AgentOptions, TransferSpec};
use kv_core::{Error, Op, Result};
use kv_mem::{HostBuffer, HostOptions, Region};

use crate::pattern;
use crate::stats::{gbps, render, Format, Row, Summary, Value};

/// Seed of the fill pattern (both processes use it).
const SEED: u64 = 0x6b76_7862_656e_6368;

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
    /// Per-transfer deadline in seconds.
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

    fn op(&self) -> Op {
        match self.op {
            OpArg::Write => Op::Write,
            OpArg::Read => Op::Read,
        }
    }

    /// Arguments that make a passive side with the same layout.
    fn passive_args(&self) -> Vec<String> {
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

/// An agent with the requested backends loaded (the first must load).
pub fn agent_with(name: &str, backends: &str, params: &str, opts: AgentOptions) -> Result<Agent> {
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
fn kv_buffer(bytes: u64, copies: u64, memory: MemoryArg) -> Result<HostBuffer> {
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

fn fill_region(buf: &mut HostBuffer) {
    pattern::fill(buf.as_mut_slice(), SEED, 0);
}

/// The passive side: owns a buffer, listens, answers until told it is done.
pub fn run_passive(args: &TransferArgs) -> Result<()> {
    let layout = args.layout()?;
    let agent = agent_with(
        "decode",
        &args.backend,
        &args.params,
        AgentOptions {
            progress_thread: true,
            ..Default::default()
        },
    )?;
    let mut buf = kv_buffer(layout.total_bytes(), 2, args.memory)?;
    if args.op() == Op::Read {
        fill_region(&mut buf);
    }
    let region = Region::new(buf);
    let _reg = agent.register(&region)?;
    let addr = agent.listen(&args.listen)?;
    println!("KVBENCH READY {addr}");
    let _ = std::io::stdout().flush();
    if std::env::var_os("KV_BENCH_CHILD").is_none() {
        eprintln!(
            "passive side listening on {addr} ({} MiB, backends {:?})",
            layout.total_bytes() >> 20,
            agent.backends()
        );
    }

    // Exit if the parent goes away (stdin closes) when we were spawned by it.
    let (eof_tx, eof_rx) = mpsc::channel::<()>();
    if std::env::var_os("KV_BENCH_CHILD").is_some() {
        std::thread::spawn(move || {
            let mut sink = String::new();
            while std::io::stdin()
                .read_line(&mut sink)
                .map(|n| n > 0)
                .unwrap_or(false)
            {
                sink.clear();
            }
            let _ = eof_tx.send(());
        });
    }
    let idle_limit = Duration::from_secs(args.deadline.max(1) * 10);
    let mut last = Instant::now();
    loop {
        if eof_rx.try_recv().is_ok() {
            return Err(Error::RemoteDisconnected {
                peer: "active side".into(),
                reason: "stdin closed".into(),
            });
        }
        for n in agent.notifications()? {
            last = Instant::now();
            if n.payload.starts_with(b"DONE") {
                // SAFETY: DONE follows every transfer's data on the same backend, and the
                // active side posts nothing after it.
                let bytes = unsafe { region.memory() }.as_slice();
                let verdict = if args.check && args.op() == Op::Write {
                    match pattern::first_mismatch(bytes, SEED, 0) {
                        None => "verified".to_string(),
                        Some(off) => format!("MISMATCH at byte {off}"),
                    }
                } else {
                    "unchecked".to_string()
                };
                let crc = crc_of(bytes);
                println!("KVBENCH RESULT {verdict} crc32c={crc:08x}");
                let _ = std::io::stdout().flush();
                return Ok(());
            }
        }
        if last.elapsed() > idle_limit {
            return Err(Error::TimedOut {
                what: "waiting for the active side".into(),
                after: idle_limit,
            });
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn crc_of(b: &[u8]) -> u32 {
    // A CRC over 1 GiB costs ~0.1 s with SSE4.2; it lets two hosts compare by eye.
    crc32c::crc32c(b)
}

struct Passive {
    child: Option<Child>,
    lines: mpsc::Receiver<String>,
    addr: String,
}

impl Passive {
    fn spawn(args: &TransferArgs) -> Result<Passive> {
        let exe =
            std::env::current_exe().map_err(|e| Error::io("finding kv-bench's own path", e))?;
        let mut child = Command::new(exe)
            .args(args.passive_args())
            .env("KV_BENCH_CHILD", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| Error::io("spawning the passive side", e))?;
        let out = child
            .stdout
            .take()
            .ok_or_else(|| Error::invalid_argument("child has no stdout"))?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut p = Passive {
            child: Some(child),
            lines: rx,
            addr: String::new(),
        };
        let ready = p.expect("KVBENCH READY ", Duration::from_secs(120))?;
        p.addr = ready.trim().to_string();
        Ok(p)
    }

    fn expect(&mut self, prefix: &str, timeout: Duration) -> Result<String> {
        let end = Instant::now() + timeout;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    if let Some(rest) = l.strip_prefix(prefix) {
                        return Ok(rest.to_string());
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    return Err(Error::TimedOut {
                        what: format!("passive side to print {prefix:?}"),
                        after: timeout,
                    })
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = self.child.as_mut().and_then(|c| c.wait().ok());
                    return Err(Error::RemoteDisconnected {
                        peer: "passive side".into(),
                        reason: format!("exited ({status:?}) before printing {prefix:?}"),
                    });
                }
            }
        }
    }
}

impl Drop for Passive {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            drop(c.stdin.take());
            let end = Instant::now() + Duration::from_secs(5);
            while Instant::now() < end {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// What one run measured.
pub struct Report {
    rows: Row,
    verified: bool,
}

/// The active side: spawns (or finds) the passive side, moves the cache, reports.
pub fn run_active(args: &TransferArgs) -> Result<Report> {
    let layout = args.layout()?;
    let op = args.op();
    let shape = layout.shape;
    let total = layout.total_bytes();
    let agent = agent_with(
        "prefill",
        &args.backend,
        &args.params,
        AgentOptions {
            default_deadline: Duration::from_secs(args.deadline.max(1)),
            ..Default::default()
        },
    )?;
    let mut buf = kv_buffer(total, if args.peer.is_some() { 1 } else { 2 }, args.memory)?;
    if op == Op::Write {
        fill_region(&mut buf);
    }
    // Everything that can be refused is checked before the passive side starts.
    let mut passive = match &args.peer {
        Some(addr) => Passive {
            child: None,
            lines: mpsc::channel().1,
            addr: addr.clone(),
        },
        None => Passive::spawn(args)?,
    };
    let region = Region::new(buf);
    let reg = agent.register(&region)?;
    let peer = agent.fetch_remote(passive.addr.as_str())?;
    let (_, _, remote) = agent
        .remote_regions(peer)?
        .into_iter()
        .find(|r| r.2.total_bytes() >= total)
        .ok_or_else(|| Error::invalid_argument("the passive side published no region large enough; same --model/--tokens on both sides?"))?;
    let rbase = remote.get(0).map(|d| d.addr).unwrap_or(0);
    let lbase = reg.descriptor().addr;

    // One prepared transfer per layer, every page, coalesced.
    let pages: Vec<u64> = (0..layout.pages).collect();
    let mut prepare_times = Vec::new();
    let mut transfers = Vec::with_capacity(shape.layers as usize);
    let mut descs_per_layer = 0;
    for l in 0..shape.layers {
        let local = layout.layer_descriptors(lbase, l, &pages, args.max_tokens)?;
        let remote = layout.layer_descriptors(rbase, l, &pages, args.max_tokens)?;
        descs_per_layer = local.len();
        let mut spec = TransferSpec::write(local, peer, remote);
        spec.op = op;
        let t0 = Instant::now();
        transfers.push(agent.prepare(&spec)?);
        prepare_times.push(t0.elapsed());
    }
    let backend = transfers
        .first()
        .map(|t| t.backend().to_string())
        .unwrap_or_default();

    let mut layerwise_rows = Vec::new();
    if args.layerwise {
        let per_layer = Duration::from_micros(args.layer_compute_us);
        (transfers, layerwise_rows) = crate::layerwise::measure(transfers, args.iters, per_layer)?;
    }
    let bar = indicatif::ProgressBar::new((args.iters as u64 + 1) * shape.layers as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {msg} [{bar:30}] {pos}/{len} layers")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message(format!("{backend} {op}"));
    let started = Instant::now();
    let mut post_times = Vec::new();
    let mut complete_times = Vec::new();
    let mut first_layer = Vec::new();
    let mut iter_times = Vec::new();
    for iter in 0..=args.iters {
        let t_iter = Instant::now();
        let mut posted_at = Vec::with_capacity(transfers.len());
        for (l, t) in transfers.iter().enumerate() {
            let t0 = Instant::now();
            t.post(Some(Bytes::from(format!("L{iter}:{l}"))))?;
            post_times.push(t0.elapsed());
            posted_at.push(t0);
        }
        for (l, t) in transfers.iter().enumerate() {
            t.wait()?;
            let done = Instant::now();
            if iter > 0 {
                complete_times.push(done - posted_at[l]);
                if l == 0 {
                    first_layer.push(done - t_iter);
                }
            }
            if started.elapsed() > Duration::from_secs(1) {
                bar.set_position((iter as u64) * shape.layers as u64 + l as u64 + 1);
            }
        }
        if iter > 0 {
            iter_times.push(t_iter.elapsed());
        }
    }
    bar.finish_and_clear();

    agent.notify(peer, Bytes::from_static(b"DONE"))?;
    let verdict = match (op, &args.peer) {
        (Op::Write, None) => passive.expect("KVBENCH RESULT ", Duration::from_secs(120))?,
        (Op::Write, Some(_)) => "checked on the passive side".to_string(),
        (Op::Read, _) if args.check => {
            // SAFETY: every READ into the region completed (waited above).
            match pattern::first_mismatch(unsafe { region.memory() }.as_slice(), SEED, 0) {
                None => "verified".to_string(),
                Some(off) => format!("MISMATCH at byte {off}"),
            }
        }
        (Op::Read, _) => "unchecked".to_string(),
    };
    let verified = verdict.starts_with("verified");

    let timed: Duration = iter_times.iter().sum();
    let moved = total * args.iters as u64;
    let bw = gbps(moved, timed);
    let mut rows: Row = vec![
        ("model", Value::Str(args.model.clone())),
        ("tokens", Value::Int(args.tokens)),
        ("page_tokens", Value::Int(args.page_tokens as u64)),
        ("layers", Value::Int(shape.layers as u64)),
        ("bytes_per_token", Value::Int(shape.bytes_per_token())),
        ("kv_bytes", Value::Int(total)),
        ("backend", Value::Str(backend)),
        ("op", Value::Str(op.to_string())),
        ("descriptors_per_layer", Value::Int(descs_per_layer)),
        ("iterations", Value::Int(args.iters as u64)),
        ("bandwidth_gbps", Value::Num(bw)),
        (
            "transfers_per_s",
            Value::Num(complete_times.len() as f64 / timed.as_secs_f64().max(1e-9)),
        ),
    ];
    let mut add = |name: &'static str, mut v: Vec<Duration>| {
        let s = Summary::of(&mut v);
        rows.push((name, Value::Str(s.micros())));
        s
    };
    add("prepare_avg_p50_p99", prepare_times);
    add("post_avg_p50_p99", post_times);
    add("complete_avg_p50_p99", complete_times);
    add("time_to_first_layer_avg_p50_p99", first_layer);
    rows.extend(layerwise_rows);
    if let Some(r) = &args.reference {
        let (name, ref_bw) = reference(r, total)?;
        rows.push(("reference", Value::Str(name)));
        rows.push(("reference_gbps", Value::Num(ref_bw)));
        rows.push(("ratio", Value::Num(bw / ref_bw)));
    }
    rows.push(("check", Value::Str(verdict)));
    rows.push(("verified", Value::Bool(verified)));
    drop(transfers);
    drop(reg);
    Ok(Report { rows, verified })
}

/// Measures a reference in this process: single-thread memcpy of the same bytes.
fn reference(name: &str, bytes: u64) -> Result<(String, f64)> {
    match name {
        "memcpy" => {
            let len =
                usize::try_from(bytes.min(1 << 30)).map_err(|_| Error::invalid_argument("size"))?;
            let mut src = HostBuffer::mmap(len)?;
            let mut dst = HostBuffer::mmap(len)?;
            // Real data: an untouched mapping reads the kernel's shared zero page, which
            // stays in cache and would make the reference look several times faster.
            pattern::fill(src.as_mut_slice(), SEED, 0);
            dst.as_mut_slice().copy_from_slice(src.as_slice()); // fault pages in
            let mut best = Duration::MAX;
            for _ in 0..3 {
                let t = Instant::now();
                dst.as_mut_slice()
                    .copy_from_slice(std::hint::black_box(src.as_slice()));
                best = best.min(t.elapsed());
            }
            Ok(("memcpy (1 thread)".into(), gbps(len as u64, best)))
        }
        other => Err(Error::invalid_argument(format!(
            "unknown --reference {other}; use memcpy (native tools: kv-bench reference)"
        ))),
    }
}

/// Runs `kv-bench transfer` and prints the result.
pub fn main(args: &TransferArgs) -> Result<bool> {
    if args.role == Role::Passive {
        run_passive(args)?;
        return Ok(true);
    }
    let r = run_active(args)?;
    match args.format {
        Format::Table => {
            println!("kv-bench transfer");
            let w = r.rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
            for (k, v) in &r.rows {
                let text = match v {
                    Value::Num(x) if k.ends_with("gbps") => format!("{x:.2} GB/s"),
                    Value::Num(x) if *k == "ratio" => format!("{x:.2}x"),
                    Value::Num(x) => format!("{x:.1}"),
                    Value::Int(x) if *k == "kv_bytes" => {
                        format!("{x} ({:.2} GiB)", *x as f64 / (1u64 << 30) as f64)
                    }
                    Value::Int(x) => x.to_string(),
                    Value::Str(s) => s.clone(),
                    Value::Bool(b) => b.to_string(),
                };
                println!("  {k:<w$}  {text}");
            }
        }
        f => print!("{}", render(std::slice::from_ref(&r.rows), f)),
    }
    Ok(r.verified || !args.check)
}
