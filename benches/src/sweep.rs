//! `kv-bench sweep`: block sizes × batch × threads × op × prepared/recreated, per
//! backend, between two agents in this process.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kv_agent::{Agent, AgentOptions, TransferSpec};
use kv_core::{DescriptorList, Error, Op, Result};
use kv_mem::{HostBuffer, HostOptions, Region};

use crate::stats::{gbps, render, us, Format, Row, Summary, Value};
use crate::transfer::agent_with;

/// Arguments of `kv-bench sweep`.
#[derive(Debug, Clone, clap::Args)]
pub struct SweepArgs {
    /// Backends to measure, comma-separated.
    #[arg(long, default_value = "tcp")]
    pub backend: String,
    /// Backend parameters as key=value, comma-separated.
    #[arg(long, default_value = "")]
    pub params: String,
    /// Block sizes (K, M suffixes), comma-separated.
    #[arg(long, default_value = "4K,64K,1M,16M,64M")]
    pub sizes: String,
    /// Blocks per transfer, comma-separated.
    #[arg(long, default_value = "1,16")]
    pub batch: String,
    /// Posting threads, comma-separated.
    #[arg(long, default_value = "1")]
    pub threads: String,
    /// Ops: write, read, or both.
    #[arg(long, default_value = "write,read")]
    pub op: String,
    /// Also measure transfers prepared anew for every post.
    #[arg(long)]
    pub recreate: bool,
    /// Seconds to spend per point (at least 3 posts each).
    #[arg(long, default_value_t = 0.3)]
    pub seconds: f64,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    pub format: Format,
}

/// Parses `4K`, `1M`, `64M`, `1G`, `4096`.
pub fn parse_size(s: &str) -> Result<u64> {
    let s = s.trim();
    let (num, mul) = match s.char_indices().last() {
        Some((i, 'K' | 'k')) => (&s[..i], 1u64 << 10),
        Some((i, 'M' | 'm')) => (&s[..i], 1 << 20),
        Some((i, 'G' | 'g')) => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    let n: u64 = num.parse().map_err(|_| {
        Error::invalid_argument(format!("size {s:?} is not a number with an optional K/M/G"))
    })?;
    if n == 0 {
        return Err(Error::invalid_argument("sizes must be non-zero"));
    }
    n.checked_mul(mul)
        .ok_or_else(|| Error::invalid_argument(format!("size {s} overflows")))
}

fn list<T>(s: &str, f: impl Fn(&str) -> Result<T>) -> Result<Vec<T>> {
    s.split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(f)
        .collect()
}

struct Point {
    backend: String,
    op: Op,
    size: u64,
    batch: u64,
    threads: u64,
    recreate: bool,
}

fn measure(p: &Point, a: &Agent, b: &Agent, seconds: f64) -> Result<Row> {
    let peer = a.fetch_remote_or_load(b)?;
    let bytes_each = p.size * p.batch;
    let mut handles = Vec::new();
    let start_gate = Arc::new(std::sync::Barrier::new(p.threads as usize));
    for _ in 0..p.threads {
        let len = usize::try_from(bytes_each).map_err(|_| Error::invalid_argument("size"))?;
        // Gaps between blocks keep them from coalescing into one range.
        let stride = p.size + 4096;
        let buf_len =
            usize::try_from(stride * p.batch).map_err(|_| Error::invalid_argument("size"))?;
        let src = Region::new(HostBuffer::with_options(
            buf_len.max(len),
            HostOptions {
                shared: true,
                ..Default::default()
            },
        )?);
        let dst = Region::new(HostBuffer::with_options(
            buf_len.max(len),
            HostOptions {
                shared: true,
                ..Default::default()
            },
        )?);
        let rs = a.register(&src)?;
        let rd = b.register(&dst)?;
        let peer = a.load_remote(&b.partial_metadata(&[&rd])?).unwrap_or(peer);
        let local = DescriptorList::strided(src.descriptor().addr, stride, p.batch, p.size, 0)?;
        let remote = DescriptorList::strided(dst.descriptor().addr, stride, p.batch, p.size, 0)?;
        let mut spec = TransferSpec::write(local, peer, remote);
        spec.op = p.op;
        spec.backend = Some(p.backend.clone());
        let (a, recreate, gate) = (a.clone(), p.recreate, start_gate.clone());
        let budget = Duration::from_secs_f64(seconds);
        handles.push(std::thread::spawn(
            move || -> Result<(u64, Duration, Vec<Duration>)> {
                let _keep = (rs, rd, src, dst);
                let mut t = a.prepare(&spec)?;
                t.post(None)?;
                t.wait()?; // warm-up: connections, page faults
                gate.wait();
                let start = Instant::now();
                let mut lat = Vec::new();
                let mut n = 0u64;
                while n < 3 || (start.elapsed() < budget && n < 1_000_000) {
                    let t0 = Instant::now();
                    if recreate {
                        t = a.prepare(&spec)?;
                    }
                    t.post(None)?;
                    t.wait()?;
                    lat.push(t0.elapsed());
                    n += 1;
                }
                Ok((n, start.elapsed(), lat))
            },
        ));
    }
    let mut ops = 0;
    let mut wall = Duration::ZERO;
    let mut lat = Vec::new();
    for h in handles {
        let (n, d, l) = h
            .join()
            .map_err(|_| Error::invalid_argument("a sweep thread panicked"))??;
        ops += n;
        wall = wall.max(d);
        lat.extend(l);
    }
    let s = Summary::of(&mut lat);
    Ok(vec![
        ("backend", Value::Str(p.backend.clone())),
        ("op", Value::Str(p.op.to_string())),
        ("block_bytes", Value::Int(p.size)),
        ("batch", Value::Int(p.batch)),
        ("threads", Value::Int(p.threads)),
        (
            "mode",
            Value::Str(if p.recreate { "recreated" } else { "prepared" }.into()),
        ),
        ("gbps", Value::Num(gbps(ops * bytes_each, wall))),
        (
            "transfers_per_s",
            Value::Num(ops as f64 / wall.as_secs_f64().max(1e-9)),
        ),
        ("lat_avg_us", Value::Num(us(s.avg))),
        ("lat_p99_us", Value::Num(us(s.p99))),
    ])
}

trait LoadPeer {
    fn fetch_remote_or_load(&self, other: &Agent) -> Result<kv_agent::PeerId>;
}

impl LoadPeer for Agent {
    fn fetch_remote_or_load(&self, other: &Agent) -> Result<kv_agent::PeerId> {
        match self.peer_by_name(other.name()) {
            Some(p) => Ok(p),
            None => self.load_remote(&other.local_metadata()?),
        }
    }
}

/// Runs the sweep and prints a row per point.
pub fn main(args: &SweepArgs) -> Result<bool> {
    let sizes = list(&args.sizes, parse_size)?;
    let batches = list(&args.batch, |s| {
        s.parse::<u64>()
            .ok()
            .filter(|b| *b > 0)
            .ok_or_else(|| Error::invalid_argument(format!("batch {s:?}")))
    })?;
    let threads = list(&args.threads, |s| {
        s.parse::<u64>()
            .ok()
            .filter(|b| (1..=64).contains(b))
            .ok_or_else(|| Error::invalid_argument(format!("threads {s:?} (1..=64)")))
    })?;
    let ops = list(&args.op, |s| match s {
        "write" => Ok(Op::Write),
        "read" => Ok(Op::Read),
        o => Err(Error::invalid_argument(format!(
            "op {o:?}; use write or read"
        ))),
    })?;
    if !(0.0..=60.0).contains(&args.seconds) {
        return Err(Error::invalid_argument("--seconds must be within 0..=60"));
    }
    let mut rows = Vec::new();
    for backend in args
        .backend
        .split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
    {
        let a = agent_with("sweep-a", backend, &args.params, AgentOptions::default())?;
        let b = agent_with(
            "sweep-b",
            backend,
            &args.params,
            AgentOptions {
                progress_thread: true,
                ..Default::default()
            },
        )?;
        for &op in &ops {
            for &size in &sizes {
                for &batch in &batches {
                    for &t in &threads {
                        for recreate in if args.recreate {
                            vec![false, true]
                        } else {
                            vec![false]
                        } {
                            let p = Point {
                                backend: backend.to_string(),
                                op,
                                size,
                                batch,
                                threads: t,
                                recreate,
                            };
                            let row = measure(&p, &a, &b, args.seconds)?;
                            if args.format == Format::Table && rows.is_empty() {
                                eprintln!(
                                    "measuring {} points...",
                                    ops.len() * sizes.len() * batches.len() * threads.len()
                                );
                            }
                            rows.push(row);
                        }
                    }
                }
            }
        }
    }
    print!("{}", render(&rows, args.format));
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4K").unwrap(), 4096);
        assert_eq!(parse_size("64M").unwrap(), 64 << 20);
        assert_eq!(parse_size("123").unwrap(), 123);
        assert!(parse_size("0").is_err());
        assert!(parse_size("x").is_err());
        assert!(parse_size("99999999999999G").is_err());
    }
}
