//! `kv-bench transfer`: a real two-process prefill → decode transfer of a model-shaped,
//! paged KV cache, layer by layer, verified byte for byte.
//!
//! The active side (this process) prepares one transfer per layer and posts them in
//! order, each with a notification, as a prefill engine does while it computes; the
//! passive side (a child process, or `--role passive` on another host) owns the other
//! buffer and answers on its side channel. For WRITE the passive side checks what
//! arrived and publishes its verdict in its metadata (an attribute the active side
//! fetches); for READ it holds the source and the active side checks.
//!
//! Both sides share a cluster secret: generated for a spawned pair (handed to the child
//! in `KVX_SECRET`), given with `--secret`/`KVX_SECRET` in two-host mode (a passive
//! side without one generates one and prints how to pass it). The active side sends a
//! heartbeat notification every quarter deadline, so the passive side notices a dead
//! or stalled active side within `--deadline`.

use std::time::{Duration, Instant};

use bytes::Bytes;
use kv_agent::{AgentOptions, TransferSpec, SECRET_ENV};
use kv_core::auth::ClusterSecret;
use kv_core::{Error, Op, Result};
use kv_mem::{HostBuffer, Region};

use crate::passive::{passive_verdict, run_passive, Heartbeat, Passive};
use crate::pattern;
pub use crate::setup::{agent_with, Role, TransferArgs};
use crate::setup::{fill_region, kv_buffer, SEED};
use crate::stats::{gbps, render, Format, Row, Summary, Value};

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
    let secret = match (args.given_secret()?, &args.peer) {
        (Some(s), _) => s,
        (None, None) => ClusterSecret::generate()?,
        (None, Some(_)) => {
            return Err(Error::invalid_argument(format!(
                "two-host mode needs the passive side's cluster secret: set {SECRET_ENV}=<hex> \
                 (or --secret <hex>); a passive side started without one prints the one it \
                 generated"
            )))
        }
    };
    let agent = agent_with(
        "prefill",
        &args.backend,
        &args.params,
        AgentOptions {
            default_deadline: args.deadline(),
            secret: Some(secret.clone()),
            ..Default::default()
        },
    )?;
    let mut buf = kv_buffer(total, if args.peer.is_some() { 1 } else { 2 }, args.memory)?;
    if op == Op::Write {
        fill_region(&mut buf);
    }
    // Everything that can be refused is checked before the passive side starts.
    let passive = match &args.peer {
        Some(addr) => Passive::at(addr),
        None => Passive::spawn(args, &secret)?,
    };
    let region = Region::new(buf);
    let reg = agent.register(&region)?;
    let peer = agent.fetch_remote(passive.addr.as_str())?;
    let heartbeat = Heartbeat::start(&agent, peer, args.deadline() / 4);
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
    // CPU time of both processes over the timed iterations (1..=iters).
    let procs = [Some(std::process::id()), passive.pid()];
    let mut cpu_start = Duration::ZERO;
    for iter in 0..=args.iters {
        if iter == 1 {
            cpu_start = cpu_of(&procs);
        }
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
    let cpu = cpu_of(&procs).saturating_sub(cpu_start);
    bar.finish_and_clear();

    agent.notify(peer, Bytes::from_static(b"DONE"))?;
    let verdict = match op {
        Op::Write => passive_verdict(&agent, &passive.addr, peer)?,
        Op::Read if args.check => {
            // SAFETY: every READ into the region completed (waited above).
            match pattern::first_mismatch(unsafe { region.memory() }.as_slice(), SEED, 0) {
                None => "verified".to_string(),
                Some(off) => format!("MISMATCH at byte {off}"),
            }
        }
        Op::Read => "unchecked".to_string(),
    };
    drop(heartbeat);
    let _ = agent.notify(peer, Bytes::from_static(b"BYE"));
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
            "cpu_ms_per_gib",
            Value::Num(cpu.as_secs_f64() * 1e3 / (moved as f64 / (1u64 << 30) as f64).max(1e-12)),
        ),
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

/// CPU time used so far by every thread of the processes `pids` (this side and a
/// spawned passive side), from `/proc/<pid>/task/*/schedstat`: what moving the bytes
/// costs, little disturbed by other load on a shared machine, unlike the bandwidth.
/// Threads that already exited and kernel threads (`ksoftirqd`) are not counted; 0
/// where `/proc` is unavailable.
fn cpu_of(pids: &[Option<u32>]) -> Duration {
    let mut ns = 0u64;
    for pid in pids.iter().flatten() {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task"));
        for t in tasks.into_iter().flatten().flatten() {
            let stat = std::fs::read_to_string(t.path().join("schedstat")).unwrap_or_default();
            ns += stat
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Duration::from_nanos(ns)
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
            "unknown --reference {other}; use memcpy (the native tools run beside it in scripts/compare.sh)"
        ))),
    }
}

/// Runs `kv-bench transfer` and prints the result.
pub fn main(args: &TransferArgs) -> Result<bool> {
    args.validate()?;
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
