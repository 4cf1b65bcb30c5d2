//! WRITE throughput of the TCP backend between two backends in one process, over
//! loopback TCP (`tcp`), same-host cross-memory attach (`same_host`, heap buffers) and
//! same-host shared memory (`shm`, source and target allocated with
//! `HostBuffer::shared`, the target mapped at import), against a single-thread
//! `memcpy` of the same bytes measured in the same run.
//!
//! Cases: `4KiBx256` (256 scattered 4 KiB descriptors, one post), `64KiB`, `1MiB`,
//! `16MiB` (one descriptor each). Each iteration posts `WINDOW` transfers of the case
//! (distinct ranges) and waits for all of them, as `ucx_perftest`'s bandwidth tests
//! keep several operations in flight. These cases reuse the same few MiB, which stay
//! in the CPU caches; `1MiB@256MiB` moves the same 1 MiB transfers but each round
//! takes the next window of a 256 MiB span, so source, target and the memcpy
//! reference stream from DRAM as `kv-bench transfer` (a 1 GiB KV cache) does.
//!
//! `KV_TCP_BENCH_ONLY=tcp:1MiB` (comma-separated `mode:case`, `*` for any) limits the
//! cases. After criterion's runs a summary prints one line per case:
//! `RESULT mode=tcp case=1MiB ours_MiBps=… memcpy_MiBps=… ratio=…`.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kv_backend_tcp::{Options, Path, TcpBackend};
use kv_core::{
    Backend, DescriptorList, MemKind, Op, PostOptions, Status, TransferId, TransferRequest,
};
use kv_mem::HostBuffer;

const WINDOW: usize = 4;
/// Name, piece size, pieces per transfer, and how many windows of transfers the rounds
/// cycle through (the span: `sets * WINDOW` transfers).
const CASES: [(&str, usize, usize, usize); 5] = [
    ("4KiBx256", 4096, 256, 1),
    ("64KiB", 64 << 10, 1, 1),
    ("1MiB", 1 << 20, 1, 1),
    ("16MiB", 16 << 20, 1, 1),
    ("1MiB@256MiB", 1 << 20, 1, 64),
];
const MODES: [&str; 3] = ["tcp", "same_host", "shm"];

fn selected(mode: &str, case: &str) -> bool {
    match std::env::var("KV_TCP_BENCH_ONLY") {
        Err(_) => true,
        Ok(v) => v.split(',').any(|sel| {
            let mut p = sel.trim().splitn(2, ':');
            let (m, c) = (p.next().unwrap_or("*"), p.next().unwrap_or("*"));
            (m == "*" || m == mode) && (c == "*" || c == case)
        }),
    }
}

/// Descriptors of `count` pieces of `piece` bytes inside `buf`, with a gap after each
/// when `count > 1` (so they are not merged into one range).
fn pieces(base: u64, piece: usize, count: usize) -> DescriptorList {
    let stride = if count > 1 { piece + 4096 } else { piece } as u64;
    DescriptorList::strided(base, stride, count as u64, piece as u64, 0).expect("list")
}

fn span(piece: usize, count: usize) -> usize {
    if count > 1 {
        count * (piece + 4096)
    } else {
        piece
    }
}

/// Two backends, `sets * WINDOW` prepared transfers, and the buffers they name.
struct Rig {
    a: TcpBackend,
    _b: TcpBackend,
    ids: Vec<TransferId>,
    /// The window the next round posts.
    next: std::cell::Cell<usize>,
    _bufs: Vec<HostBuffer>,
}

impl Rig {
    fn new(mode: &str, piece: usize, count: usize, sets: usize) -> Rig {
        let same_host = mode != "tcp";
        let path = match mode {
            "tcp" => Path::Tcp,
            "shm" => Path::SharedMemory,
            _ => Path::CrossMemoryAttach,
        };
        let alloc = |n: usize| {
            if path == Path::SharedMemory {
                HostBuffer::shared(n).unwrap()
            } else {
                HostBuffer::alloc(n, 4096).unwrap()
            }
        };
        let mut opts = Options {
            same_host,
            ..Options::default()
        };
        if let Some(n) = std::env::var("KV_TCP_BENCH_CONNECTIONS")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            opts.connections = n;
        }
        if let Some(n) = std::env::var("KV_TCP_BENCH_INLINE_MAX")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            opts.inline_max = n;
        }
        // Authenticated, as deployed (KV_TCP_BENCH_INSECURE=1: without a secret).
        let init = |name: &str| {
            let i = kv_core::BackendInit::new(name);
            if std::env::var("KV_TCP_BENCH_INSECURE").is_ok() {
                i
            } else {
                i.with_secret(kv_core::auth::ClusterSecret::generate().expect("OS randomness"))
            }
        };
        let (ia, mut ib) = (init("bench-a"), init("bench-b"));
        ib.secret = ia.secret.clone();
        let a = TcpBackend::new(&ia, opts.clone()).expect("backend a");
        let b = TcpBackend::new(&ib, opts).expect("backend b");
        let peer = a.connect("bench-b", &b.connection_info().unwrap()).unwrap();
        assert_eq!(
            a.uses_cma(peer).unwrap(),
            same_host,
            "same-host path not taken"
        );
        // One registration per side (as an agent registers its KV cache once); the
        // transfers lie side by side in it.
        let n = span(piece, count);
        let mut src = alloc(n * WINDOW * sets);
        src.as_mut_slice().fill(0x5a);
        let mut dst = alloc(n * WINDOW * sets);
        // Fault the target pages in before the first round.
        dst.as_mut_slice().fill(0);
        // SAFETY: the buffers live in the rig, which drops the backends first.
        let rb = unsafe {
            a.register(MemKind::Dram, &src.descriptor(), kv_core::Access::ReadWrite)
                .unwrap();
            b.register(MemKind::Dram, &dst.descriptor(), kv_core::Access::ReadWrite)
                .unwrap()
        };
        a.import_remote(
            peer,
            MemKind::Dram,
            &dst.descriptor(),
            &b.remote_key(rb).unwrap(),
        )
        .unwrap();
        let mut ids = Vec::new();
        for k in 0..WINDOW * sets {
            let off = (k * n) as u64;
            let id = a
                .prepare(&TransferRequest {
                    op: Op::Write,
                    local_kind: MemKind::Dram,
                    local: pieces(src.descriptor().addr + off, piece, count),
                    peer,
                    remote_kind: MemKind::Dram,
                    remote: pieces(dst.descriptor().addr + off, piece, count),
                })
                .unwrap();
            assert_eq!(a.transfer_path(id).unwrap(), path, "{mode}: path not taken");
            ids.push(id);
        }
        let bufs = vec![src, dst];
        Rig {
            a,
            _b: b,
            ids,
            next: std::cell::Cell::new(0),
            _bufs: bufs,
        }
    }

    /// Posts every transfer of the next window and waits for all.
    fn round(&self) {
        let opts = PostOptions {
            notification: None,
            deadline: Some(Instant::now() + Duration::from_secs(30)),
        };
        let w = self.next.get();
        self.next.set((w + 1) % (self.ids.len() / WINDOW));
        let ids = &self.ids[w * WINDOW..(w + 1) * WINDOW];
        for id in ids {
            // SAFETY: the rig keeps the buffers registered; each round waits for the end.
            unsafe { self.a.post(*id, &opts).expect("post") };
        }
        for id in ids {
            loop {
                match self.a.poll(*id) {
                    Status::Done => break,
                    // Let the worker threads have the core (this host may have few).
                    Status::InProgress => std::thread::yield_now(),
                    s => panic!("transfer ended with {s:?}"),
                }
            }
        }
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        for id in &self.ids {
            let _ = self.a.release(*id);
        }
    }
}

/// Copies the same pieces between two buffers with one thread. The buffers are
/// page-aligned like the backend's (a `Vec` of this size starts 16 bytes into a page,
/// which makes 4 KiB copies straddle cache lines and slows the reference down).
struct Memcpy {
    src: HostBuffer,
    dst: HostBuffer,
    piece: usize,
    count: usize,
    sets: usize,
    next: usize,
}

impl Memcpy {
    fn new(piece: usize, count: usize, sets: usize) -> Memcpy {
        let n = span(piece, count) * WINDOW * sets;
        let mut src = HostBuffer::alloc(n, 4096).expect("memcpy source");
        src.as_mut_slice().fill(0x5a);
        let mut dst = HostBuffer::alloc(n, 4096).expect("memcpy target");
        dst.as_mut_slice().fill(0); // fault the pages in, as the rig's targets are
        Memcpy {
            src,
            dst,
            piece,
            count,
            sets,
            next: 0,
        }
    }

    /// Copies the pieces of the next window, as [`Rig::round`] moves them.
    fn round(&mut self) {
        let stride = if self.count > 1 {
            self.piece + 4096
        } else {
            self.piece
        };
        let set = self.next;
        self.next = (self.next + 1) % self.sets;
        for w in set * WINDOW..(set + 1) * WINDOW {
            let base = w * span(self.piece, self.count);
            for i in 0..self.count {
                let o = base + i * stride;
                self.dst.as_mut_slice()[o..o + self.piece]
                    .copy_from_slice(&self.src.as_slice()[o..o + self.piece]);
            }
        }
        std::hint::black_box(&mut self.dst);
    }
}

/// Alternating bursts per side in `rates`.
const BURSTS: u32 = 6;

/// CPU time the backends' worker threads (`kv-tcp-*`: lanes and serving threads) of
/// this process have used so far, from `/proc/self/task/*/schedstat`: the cost of
/// moving the bytes, without the bench thread's polling, and little disturbed by other
/// load on a shared machine (unlike wall-clock rates).
fn worker_cpu() -> Duration {
    let mut ns = 0u64;
    for t in std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
    {
        let p = t.path();
        let comm = std::fs::read_to_string(p.join("comm")).unwrap_or_default();
        if !comm.starts_with("kv-tcp-") {
            continue;
        }
        let stat = std::fs::read_to_string(p.join("schedstat")).unwrap_or_default();
        ns += stat
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    }
    Duration::from_nanos(ns)
}

/// What [`rates`] measured.
struct Rates {
    /// Best burst of ours, MiB/s.
    ours: f64,
    /// Best burst of the reference, MiB/s.
    reference: f64,
    /// Worker CPU time per GiB moved over all of our bursts, milliseconds.
    cpu_ms_per_gib: f64,
}

/// MiB/s of `f` and of `g` over about `budget` each: bursts of the two alternate and
/// the best burst of each counts, so a load spike on this shared machine does not hit
/// only one side of the ratio. Also the worker CPU time `f` takes per GiB.
fn rates(bytes: usize, budget: Duration, mut f: impl FnMut(), mut g: impl FnMut()) -> Rates {
    f();
    g();
    let burst = |h: &mut dyn FnMut()| {
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed() < budget / BURSTS || n < 3 {
            h();
            n += 1;
        }
        (
            n,
            (bytes as f64 * n as f64) / start.elapsed().as_secs_f64() / (1 << 20) as f64,
        )
    };
    let (mut bf, mut bg) = (0f64, 0f64);
    let (mut cpu, mut rounds) = (Duration::ZERO, 0u64);
    for _ in 0..BURSTS {
        let c0 = worker_cpu();
        let (n, r) = burst(&mut f);
        cpu += worker_cpu().saturating_sub(c0);
        rounds += n;
        bf = bf.max(r);
        bg = bg.max(burst(&mut g).1);
    }
    let gib = (bytes as f64 * rounds as f64) / (1u64 << 30) as f64;
    Rates {
        ours: bf,
        reference: bg,
        cpu_ms_per_gib: cpu.as_secs_f64() * 1e3 / gib.max(1e-12),
    }
}

fn benches(c: &mut Criterion) {
    let mut summary = Vec::new();
    for mode in MODES {
        for (case, piece, count, sets) in CASES {
            if !selected(mode, case) {
                continue;
            }
            let bytes = piece * count * WINDOW;
            let rig = Rig::new(mode, piece, count, sets);
            let mut copy = Memcpy::new(piece, count, sets);
            let mut g = c.benchmark_group(format!("{mode}/{case}"));
            g.throughput(Throughput::Bytes(bytes as u64));
            g.bench_function("ours", |b| b.iter(|| rig.round()));
            g.bench_function("memcpy", |b| b.iter(|| copy.round()));
            g.finish();
            let budget = Duration::from_millis(900);
            let r = rates(bytes, budget, || rig.round(), || copy.round());
            summary.push(format!(
                "RESULT mode={mode} case={case} window={WINDOW} ours_MiBps={:.0} memcpy_MiBps={:.0} ratio={:.3} worker_cpu_ms_per_GiB={:.0}",
                r.ours, r.reference, r.ours / r.reference, r.cpu_ms_per_gib
            ));
        }
    }
    for l in summary {
        println!("{l}");
    }
}

criterion_group! {
    name = transfer;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    targets = benches
}
criterion_main!(transfer);
