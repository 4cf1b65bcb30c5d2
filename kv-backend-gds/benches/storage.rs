//! Storage throughput of the gds backend, in the shapes fio measures: 1 MiB sequential
//! write and read at queue depth 8, and 4 KiB random read at queue depth 32, on an
//! `O_DIRECT` file.
//!
//! `cargo bench -p kv-backend-gds --bench storage` runs it under criterion. With
//! `KV_GDS_BENCH_RAW=1` it instead runs each case for `KV_GDS_BENCH_SECS` seconds (like
//! fio's `time_based`) and prints `RESULT <case> <bytes per second>` lines, which
//! `scripts/compare.sh` sets beside fio's figures. `KV_GDS_BENCH_FILE` (default: a file
//! in the temp dir) and `KV_GDS_BENCH_SIZE` (bytes, default 256 MiB) pick the file;
//! `KV_GDS_BENCH_CASES` (comma-separated) picks the cases; `KV_GDS_BENCH_FIXED=0` turns
//! registered buffers and files off, `KV_GDS_BENCH_ENGINE=threads` measures the thread
//! pool, `KV_GDS_BENCH_SUBMIT_BATCH=n` sets [`Options::submit_batch`],
//! `KV_GDS_BENCH_MEM` the bytes of memory the blocks cycle through (default queue depth
//! × block size, as fio), `KV_GDS_BENCH_THP=1` puts that memory on transparent huge
//! pages.

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use kv_backend_gds::{open_direct, EngineChoice, GdsBackend, Options};
use kv_core::{
    Backend, Descriptor, DescriptorList, EndpointId, MemKind, Op, PostOptions, Status, TransferId,
    TransferRequest,
};
use kv_mem::HostBuffer;

const MIB: u64 = 1 << 20;

struct Case {
    name: &'static str,
    op: Op,
    bs: u64,
    qd: usize,
    random: bool,
}

const CASES: [Case; 3] = [
    Case {
        name: "write_1m_qd8",
        op: Op::Write,
        bs: MIB,
        qd: 8,
        random: false,
    },
    Case {
        name: "read_1m_qd8",
        op: Op::Read,
        bs: MIB,
        qd: 8,
        random: false,
    },
    Case {
        name: "randread_4k_qd32",
        op: Op::Read,
        bs: 4096,
        qd: 32,
        random: true,
    },
];

fn env_u64(k: &str, default: u64) -> u64 {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn bench_file() -> PathBuf {
    std::env::var_os("KV_GDS_BENCH_FILE")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("kv-gds-bench.dat"))
}

/// The bench's memory: `len` bytes filled with a pattern, and the range to use. With
/// `KV_GDS_BENCH_THP=1` the range is 2 MiB-aligned and advised for transparent huge
/// pages (physically contiguous), else plain heap pages.
fn ring(len: u64) -> (HostBuffer, Descriptor) {
    let thp = std::env::var("KV_GDS_BENCH_THP").as_deref() == Ok("1");
    let (mut buf, skip) = if thp {
        const HUGE: u64 = 2 * MIB;
        let buf = HostBuffer::mmap((len + HUGE) as usize).expect("mapping");
        let addr = buf.descriptor().addr;
        let skip = addr.next_multiple_of(HUGE) - addr;
        // SAFETY: advice on our own mapping; it changes no contents.
        let rc = unsafe {
            libc::madvise(
                buf.descriptor().addr as *mut libc::c_void,
                buf.len(),
                libc::MADV_HUGEPAGE,
            )
        };
        assert_eq!(rc, 0, "madvise(MADV_HUGEPAGE)");
        (buf, skip)
    } else {
        (
            HostBuffer::alloc(len as usize, 4096).expect("allocating"),
            0,
        )
    };
    buf.as_mut_slice()
        .iter_mut()
        .enumerate()
        .for_each(|(i, x)| *x = i as u8);
    let d = Descriptor::new(buf.descriptor().addr + skip, len, 0);
    (buf, d)
}

/// One case set up: the backend, the file and buffer registered, and two transfers that
/// each cover half the file so one can be re-posted while the other keeps the queue full.
struct Setup {
    b: GdsBackend,
    _file: std::fs::File,
    _buf: HostBuffer,
    halves: [TransferId; 2],
    bytes_per_half: u64,
}

fn setup(case: &Case, size: u64) -> Setup {
    let path = bench_file();
    let (file, direct) = open_direct(&path, true).expect("opening the bench file");
    if !direct {
        eprintln!(
            "note: {} refuses O_DIRECT; measuring buffered I/O",
            path.display()
        );
    }
    if file.metadata().map(|m| m.len()).unwrap_or(0) < size {
        file.set_len(size).expect("sizing the bench file");
    }
    let opts = Options {
        engine: if std::env::var("KV_GDS_BENCH_ENGINE").as_deref() == Ok("threads") {
            EngineChoice::ThreadPool
        } else {
            EngineChoice::Uring
        },
        queue_depth: case.qd,
        register_buffers: std::env::var("KV_GDS_BENCH_FIXED").as_deref() != Ok("0"),
        register_files: std::env::var("KV_GDS_BENCH_FIXED").as_deref() != Ok("0"),
        max_io_size: case.bs.max(4096),
        submit_batch: env_u64(
            "KV_GDS_BENCH_SUBMIT_BATCH",
            Options::default().submit_batch as u64,
        ) as usize,
        ..Options::default()
    };
    let b = GdsBackend::new("bench", opts).expect("creating the gds backend");
    // Memory: queue depth × block size, reused round-robin — fio's own footprint (its
    // iodepth buffers). A 16 MiB ring read 4 KiB blocks about 7 % slower than a
    // 128 KiB one on this VM (README), so the footprint must match.
    let mem_len = env_u64("KV_GDS_BENCH_MEM", case.qd as u64 * case.bs).max(case.bs);
    let (buf, mem) = ring(mem_len);
    let fd = file.as_raw_fd() as u32;
    let fdesc = Descriptor::new(0, size, fd);
    // SAFETY: `buf` and `file` live in `Setup`, which outlives every transfer.
    let (_m, f) = unsafe {
        (
            b.register(MemKind::Dram, &mem, kv_core::Access::ReadWrite)
                .expect("register dram"),
            b.register(MemKind::File, &fdesc, kv_core::Access::ReadWrite)
                .expect("register file"),
        )
    };
    let me: EndpointId = b.connect("bench", &b.connection_info().unwrap()).unwrap();
    b.import_remote(me, MemKind::File, &fdesc, &b.remote_key(f).unwrap())
        .unwrap();
    let blocks = size / case.bs;
    let per_mem = mem_len / case.bs;
    // Random order without repeats (fio's default random map): a shuffled permutation
    // of the block numbers.
    let mut order: Vec<u64> = (0..blocks).collect();
    if case.random {
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        for i in (1..order.len()).rev() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            order.swap(i, (x % (i as u64 + 1)) as usize);
        }
    }
    let block_at = |i: u64| order[i as usize];
    let half = blocks / 2;
    let mk = |range: std::ops::Range<u64>| {
        let local: DescriptorList = range
            .clone()
            .map(|i| Descriptor::new(mem.addr + (i % per_mem) * case.bs, case.bs, 0))
            .collect::<kv_core::Result<_>>()
            .unwrap();
        let remote: DescriptorList = range
            .map(|i| Descriptor::new(block_at(i) * case.bs, case.bs, fd))
            .collect::<kv_core::Result<_>>()
            .unwrap();
        b.prepare(&TransferRequest {
            op: case.op,
            local_kind: MemKind::Dram,
            local,
            peer: me,
            remote_kind: MemKind::File,
            remote,
        })
        .expect("prepare")
    };
    let halves = [mk(0..half), mk(half..2 * half)];
    Setup {
        _file: file,
        _buf: buf,
        bytes_per_half: half * case.bs,
        halves,
        b,
    }
}

impl Setup {
    /// Keeps both halves posted for `dur` (or `passes` full passes); returns bytes moved.
    fn run(&self, dur: Option<Duration>, passes: u64) -> u64 {
        let start = Instant::now();
        let mut moved = 0u64;
        let mut posted = [false; 2];
        let mut remaining = passes * 2;
        let post = |t: TransferId| {
            // SAFETY: the buffer lives in `self`.
            unsafe { self.b.post(t, &PostOptions::default()).expect("post") }
        };
        loop {
            let time_left = match dur {
                Some(d) => start.elapsed() < d,
                None => true,
            };
            for (i, t) in self.halves.iter().enumerate() {
                if !posted[i] && time_left && remaining > 0 {
                    post(*t);
                    posted[i] = true;
                    remaining -= 1;
                }
            }
            if !posted.iter().any(|p| *p) {
                return moved;
            }
            // Block on whichever half is older (the first posted finishes first).
            let i = if posted[0] { 0 } else { 1 };
            match self.b.wait(self.halves[i], Duration::from_secs(60)) {
                Status::Done => {
                    moved += self.bytes_per_half;
                    posted[i] = false;
                }
                Status::InProgress => {}
                other => panic!("bench transfer failed: {other:?}"),
            }
            // The other half may have finished meanwhile.
            let j = 1 - i;
            if posted[j] && matches!(self.b.poll(self.halves[j]), Status::Done) {
                moved += self.bytes_per_half;
                posted[j] = false;
            }
        }
    }
}

fn selected(case: &Case) -> bool {
    match std::env::var("KV_GDS_BENCH_CASES") {
        Ok(v) => v.split(',').any(|c| c.trim() == case.name),
        Err(_) => true,
    }
}

fn raw() {
    let size = env_u64("KV_GDS_BENCH_SIZE", 256 * MIB);
    let secs = env_u64("KV_GDS_BENCH_SECS", 3);
    for case in CASES.iter().filter(|c| selected(c)) {
        let s = setup(case, size);
        let start = Instant::now();
        let moved = s.run(Some(Duration::from_secs(secs)), u64::MAX / 4);
        let rate = moved as f64 / start.elapsed().as_secs_f64();
        println!("RESULT {} {:.0} ({})", case.name, rate, s.b.describe());
    }
}

fn criterion_benches(c: &mut Criterion) {
    let size = env_u64("KV_GDS_BENCH_SIZE", 64 * MIB);
    let mut g = c.benchmark_group("gds");
    g.sample_size(10).measurement_time(Duration::from_secs(3));
    for case in CASES.iter().filter(|c| selected(c)) {
        let s = setup(case, size);
        g.throughput(Throughput::Bytes(2 * s.bytes_per_half));
        g.bench_function(case.name, |bch| bch.iter(|| s.run(None, 1)));
    }
    g.finish();
}

fn main() {
    if std::env::var("KV_GDS_BENCH_RAW").is_ok_and(|v| v == "1") {
        raw();
        return;
    }
    let mut c = Criterion::default().configure_from_args();
    criterion_benches(&mut c);
    c.final_summary();
}
