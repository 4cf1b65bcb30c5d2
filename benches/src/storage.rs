//! `kv-bench storage`: KV blocks between memory and a file through the agent and the gds
//! backend (io_uring, `O_DIRECT`), at a fixed queue depth, beside `fio` with the same
//! parameters when `--reference fio` is given.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kv_agent::{AgentOptions, TransferSpec};
use kv_core::{Descriptor, DescriptorList, Error, MemKind, Op, Result};
use kv_mem::{FileSegment, HostBuffer, Region};

use crate::stats::{render, Format, Row, Value};
use crate::sweep::parse_size;
use crate::transfer::agent_with;

/// Arguments of `kv-bench storage`.
#[derive(Debug, Clone, clap::Args)]
pub struct StorageArgs {
    /// Directory of the test file (on the device to measure).
    #[arg(long, default_value = "/tmp")]
    pub dir: PathBuf,
    /// File size (K/M/G).
    #[arg(long, default_value = "256M")]
    pub size: String,
    /// Block size (K/M).
    #[arg(long, default_value = "1M")]
    pub block: String,
    /// Blocks in flight.
    #[arg(long, default_value_t = 8)]
    pub qd: usize,
    /// Workloads: write, read, randread (comma-separated).
    #[arg(long, default_value = "write,read")]
    pub op: String,
    /// Seconds per workload.
    #[arg(long, default_value_t = 2.0)]
    pub seconds: f64,
    /// gds backend parameters as key=value, comma-separated (e.g. `engine=threads`).
    #[arg(long, default_value = "")]
    pub params: String,
    /// Also run `fio` with the same parameters and print the ratio.
    #[arg(long)]
    pub reference: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    pub format: Format,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Workload {
    Write,
    Read,
    RandRead,
}

impl Workload {
    fn parse(s: &str) -> Result<Workload> {
        match s {
            "write" => Ok(Workload::Write),
            "read" => Ok(Workload::Read),
            "randread" => Ok(Workload::RandRead),
            o => Err(Error::invalid_argument(format!(
                "storage op {o:?}; use write, read or randread"
            ))),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Workload::Write => "write",
            Workload::Read => "read",
            Workload::RandRead => "randread",
        }
    }
}

/// MiB/s of our path for one workload.
fn ours(
    args: &StorageArgs,
    w: Workload,
    path: &std::path::Path,
    size: u64,
    block: u64,
) -> Result<f64> {
    let qd = args.qd;
    let agent = agent_with("storage", "gds", &args.params, AgentOptions::default())?;
    let (file, direct) = kv_backend_gds::open_direct(path, true)?;
    if !direct {
        eprintln!(
            "note: {} does not take O_DIRECT; measuring buffered I/O",
            path.display()
        );
    }
    file.set_len(size)
        .map_err(|e| Error::io("sizing the test file", e))?;
    let file = Arc::new(file);
    let fseg = Region::new(FileSegment::new(file.clone(), 0, size)?);
    let freg = agent.register(&fseg)?;
    let slot_len = usize::try_from(block).map_err(|_| Error::invalid_argument("block"))?;
    let buf = Region::new(HostBuffer::alloc(slot_len * qd, 4096)?);
    let breg = agent.register(&buf)?;
    // Storage is a transfer to the agent itself.
    let me = agent.load_remote(&agent.local_metadata()?)?;
    let blocks = size / block;
    let mut order: Vec<u64> = (0..blocks).collect();
    if w == Workload::RandRead {
        // A fixed xorshift shuffle: the same order every run.
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for i in (1..order.len()).rev() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            order.swap(i, (x % (i as u64 + 1)) as usize);
        }
    }
    let op = if w == Workload::Write {
        Op::Write
    } else {
        Op::Read
    };
    let fd = freg.descriptor().device;
    // One prepared transfer per (slot, block) would be blocks × qd; prepare per block and
    // bind it to the slot it runs in (block i runs in slot i % qd).
    let mut transfers = Vec::with_capacity(order.len());
    for (i, b) in order.iter().enumerate() {
        let slot = (i % qd) as u64;
        let spec = TransferSpec {
            op,
            local_kind: MemKind::Dram,
            local: DescriptorList::single(Descriptor::new(
                breg.descriptor().addr + slot * block,
                block,
                0,
            ))?,
            peer: me,
            remote_kind: MemKind::File,
            remote: DescriptorList::single(Descriptor::new(b * block, block, fd))?,
            backend: Some("gds".into()),
            deadline: None,
        };
        transfers.push(agent.prepare(&spec)?);
    }
    if w != Workload::Write {
        // Lay the data down once so reads read real blocks.
        let mut i = 0;
        let wagent = &agent;
        while i < blocks {
            let n = (blocks - i).min(qd as u64);
            let spec = TransferSpec {
                op: Op::Write,
                local_kind: MemKind::Dram,
                local: DescriptorList::strided(breg.descriptor().addr, block, n, block, 0)?,
                peer: me,
                remote_kind: MemKind::File,
                remote: DescriptorList::strided(i * block, block, n, block, fd)?,
                backend: Some("gds".into()),
                deadline: None,
            };
            wagent.transfer(&spec, None)?.wait()?;
            i += n;
        }
    }
    let budget = Duration::from_secs_f64(args.seconds);
    let start = Instant::now();
    let mut done = 0u64;
    let mut next = 0usize;
    let mut in_flight: Vec<Option<usize>> = vec![None; qd];
    loop {
        let slot = next % qd;
        if let Some(prev) = in_flight[slot].take() {
            transfers[prev].wait()?;
            done += 1;
        }
        if start.elapsed() >= budget && next >= qd {
            break;
        }
        let idx = next % transfers.len();
        // A block's transfer is bound to slot idx % qd; with len % qd == 0 it matches.
        transfers[idx].post(None)?;
        in_flight[slot] = Some(idx);
        next += 1;
    }
    for s in in_flight.into_iter().flatten() {
        transfers[s].wait()?;
        done += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    drop(transfers);
    drop((breg, freg));
    Ok(done as f64 * block as f64 / secs / (1 << 20) as f64)
}

/// MiB/s `fio` reports for the same workload.
fn fio(
    args: &StorageArgs,
    w: Workload,
    path: &std::path::Path,
    size: u64,
    block: u64,
) -> Result<f64> {
    let out = Command::new("fio")
        .args([
            "--name=kvx",
            &format!("--filename={}", path.display()),
            &format!("--size={size}"),
            &format!("--bs={block}"),
            &format!("--iodepth={}", args.qd),
            "--ioengine=io_uring",
            "--direct=1",
            &format!("--rw={}", w.name()),
            &format!("--runtime={}", args.seconds.max(1.0)),
            "--time_based",
            "--output-format=json",
        ])
        .output()
        .map_err(|e| Error::io("running fio (install the fio package)", e))?;
    if !out.status.success() {
        return Err(Error::invalid_argument(format!(
            "fio failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let json = String::from_utf8_lossy(&out.stdout);
    let dir = if w == Workload::Write {
        "\"write\""
    } else {
        "\"read\""
    };
    let section = json
        .find(&format!("{dir} : {{"))
        .map(|i| &json[i..])
        .ok_or_else(|| Error::invalid_argument("fio output has no job section"))?;
    let bw = section
        .find("\"bw_bytes\" : ")
        .map(|i| &section[i + 13..])
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse::<f64>().ok())
        .ok_or_else(|| Error::invalid_argument("fio output has no bw_bytes"))?;
    Ok(bw / (1 << 20) as f64)
}

/// Runs the storage bench and prints a row per workload.
pub fn main(args: &StorageArgs) -> Result<bool> {
    let size = parse_size(&args.size)?;
    let block = parse_size(&args.block)?;
    if block % 4096 != 0 || size % block != 0 || size / block < args.qd as u64 || args.qd == 0 {
        return Err(Error::invalid_argument(
            "--block must be a multiple of 4K, --size a multiple of --block, with at least --qd blocks",
        ));
    }
    if let Some(r) = &args.reference {
        if r != "fio" {
            return Err(Error::invalid_argument(format!(
                "unknown --reference {r}; use fio"
            )));
        }
    }
    let path = args
        .dir
        .join(format!("kv-bench-storage-{}.dat", std::process::id()));
    let workloads: Vec<Workload> = args
        .op
        .split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(Workload::parse)
        .collect::<Result<_>>()?;
    let mut rows: Vec<Row> = Vec::new();
    let result = (|| -> Result<()> {
        for w in workloads {
            let mine = ours(args, w, &path, size, block)?;
            let mut row: Row = vec![
                ("op", Value::Str(w.name().into())),
                ("block_bytes", Value::Int(block)),
                ("qd", Value::Int(args.qd as u64)),
                ("file_bytes", Value::Int(size)),
                ("ours_mib_s", Value::Num(mine)),
            ];
            if args.reference.is_some() {
                let theirs = fio(args, w, &path, size, block)?;
                row.push(("fio_mib_s", Value::Num(theirs)));
                row.push(("ratio", Value::Num(mine / theirs)));
            }
            rows.push(row);
        }
        Ok(())
    })();
    let _ = std::fs::remove_file(&path);
    result?;
    print!("{}", render(&rows, args.format));
    Ok(true)
}
