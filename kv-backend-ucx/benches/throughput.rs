//! WRITE throughput of the UCX backend between two in-process backends, per transport
//! and size, for comparison with `ucx_perftest` (see `scripts/compare.sh`).
//!
//! Cases (throughput is bytes moved per post):
//! * `shm_put/1MiB`: one 1 MiB descriptor, `tls = posix,cma,self`.
//! * `shm_put_batched/16KiB`: 64 descriptors of 16 KiB in one post.
//! * `tcp_put/1MiB`: one 1 MiB descriptor, `tls = tcp`.
//!
//! * `shm_put_ucxmem/1MiB`, `shm_put_ucxmem_batched/16KiB`, `shm_put_ucxmem/16KiB`:
//!   the same with `UcxBackend::alloc_host` memory on both sides (direct copies).
//! * `tcp_put_target_thread/1MiB`: as `tcp_put/1MiB` with the target driven by its own
//!   progress thread instead of the posting thread.
//!
//! Batched cases post `count` pieces that are adjacent locally and in reverse order
//! remotely (same footprint as one big put, nothing merges). One thread drives both
//! backends' `progress()` (UCX 1.13 emulates RMA on heap memory over these transports,
//! so the target's worker must progress). `KV_BENCH_WARMUP_MS` / `KV_BENCH_MEASURE_MS`
//! set criterion's times (default 500 / 3000). Skips with a message when libucp is
//! missing.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kv_backend_ucx::{Options, UcxBackend};
use kv_core::{
    Backend, Descriptor, DescriptorList, MemKind, Op, PostOptions, Status, TransferRequest,
};
use kv_mem::{HostBuffer, Memory};

struct Pair {
    a: UcxBackend,
    b: UcxBackend,
    _mem: (Box<dyn Memory>, Box<dyn Memory>),
    id: kv_core::TransferId,
    ep: kv_core::EndpointId,
    /// `b` runs its own progress thread (the driving loop leaves it alone).
    b_thread: bool,
}

/// Where the bench's buffers come from.
#[derive(Clone, Copy, PartialEq)]
enum Mem {
    /// `HostBuffer` (the caller's heap/mmap memory, registered).
    Heap,
    /// `UcxBackend::alloc_host` on each side (UCX's shared mapping, as ucx_perftest).
    Ucx,
}

fn pair(tls: &str, count: u64, len: u64, mem: Mem, b_thread: bool) -> Option<Pair> {
    let opts = Options {
        tls: Some(tls.into()),
        ..Default::default()
    };
    let b_opts = Options {
        progress_thread: b_thread,
        ..opts.clone()
    };
    let a = match UcxBackend::new("a", opts.clone()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("skipping ucx bench: {e}");
            return None;
        }
    };
    let b = UcxBackend::new("b", b_opts).ok()?;
    // The local pieces are adjacent, the remote ones in reverse order: `count` puts
    // of `len` bytes over the same footprint as one `count * len` put (nothing merges).
    let size = (len * count) as usize;
    let (la, lb): (Box<dyn Memory>, Box<dyn Memory>) = match mem {
        Mem::Heap => (
            Box::new(HostBuffer::alloc(size, 4096).ok()?),
            Box::new(HostBuffer::alloc(size, 4096).ok()?),
        ),
        Mem::Ucx => (
            Box::new(a.alloc_host(size).ok()?),
            Box::new(b.alloc_host(size).ok()?),
        ),
    };
    // SAFETY: the buffers live in the returned `Pair`, dropped after the backends.
    let rb = unsafe {
        a.register(MemKind::Dram, &la.descriptor()).ok()?;
        b.register(MemKind::Dram, &lb.descriptor()).ok()?
    };
    let ep = a.connect("b", &b.connection_info().ok()?).ok()?;
    a.import_remote(ep, MemKind::Dram, &lb.descriptor(), &b.remote_key(rb).ok()?)
        .ok()?;
    let id = a
        .prepare(&TransferRequest {
            op: Op::Write,
            local_kind: MemKind::Dram,
            local: DescriptorList::strided(la.descriptor().addr, len, count, len, 0).ok()?,
            peer: ep,
            remote_kind: MemKind::Dram,
            remote: (0..count)
                .rev()
                .map(|i| Descriptor::new(lb.descriptor().addr + i * len, len, 0))
                .collect(),
        })
        .ok()?;
    Some(Pair {
        a,
        b,
        _mem: (la, lb),
        id,
        ep,
        b_thread,
    })
}

impl Pair {
    fn write_once(&self) {
        let opts = PostOptions {
            notification: None,
            deadline: Some(Instant::now() + Duration::from_secs(20)),
        };
        // SAFETY: the buffers stay registered for the pair's life.
        unsafe { self.a.post(self.id, &opts).expect("post") };
        loop {
            let _ = self.a.progress();
            if !self.b_thread {
                let _ = self.b.progress();
            }
            match self.a.poll(self.id) {
                Status::Done => return,
                Status::Failed(e) => panic!("transfer failed: {e}"),
                _ => {}
            }
        }
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        let _ = self.a.release(self.id);
        // Closing a shared-memory endpoint flushes it, which needs the peer's worker to
        // progress: drive `b` from a second thread meanwhile.
        let done = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                while !self.b_thread && !done.load(std::sync::atomic::Ordering::Acquire) {
                    let _ = self.b.progress();
                    std::thread::yield_now();
                }
            });
            let _ = self.a.disconnect(self.ep);
            done.store(true, std::sync::atomic::Ordering::Release);
        });
    }
}

fn bench(c: &mut Criterion) {
    let cases: [(&str, &str, u64, u64, Mem, bool); 7] = [
        (
            "shm_put/1MiB",
            "posix,cma,self",
            1,
            1 << 20,
            Mem::Heap,
            false,
        ),
        (
            "shm_put_batched/16KiB",
            "posix,cma,self",
            64,
            16 << 10,
            Mem::Heap,
            false,
        ),
        (
            "shm_put_ucxmem/1MiB",
            "posix,cma,self",
            1,
            1 << 20,
            Mem::Ucx,
            false,
        ),
        (
            "shm_put_ucxmem_batched/16KiB",
            "posix,cma,self",
            64,
            16 << 10,
            Mem::Ucx,
            false,
        ),
        (
            "shm_put_ucxmem/16KiB",
            "posix,cma,self",
            1,
            16 << 10,
            Mem::Ucx,
            false,
        ),
        ("tcp_put/1MiB", "tcp", 1, 1 << 20, Mem::Heap, false),
        (
            "tcp_put_target_thread/1MiB",
            "tcp",
            1,
            1 << 20,
            Mem::Heap,
            true,
        ),
    ];
    let mut g = c.benchmark_group("ucx");
    // Group settings override criterion's command line, so the times come from the
    // environment (scripts/compare.sh shortens them for CI).
    let ms = |var: &str, default: u64| {
        Duration::from_millis(
            std::env::var(var)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(default),
        )
    };
    g.sample_size(20)
        .warm_up_time(ms("KV_BENCH_WARMUP_MS", 500))
        .measurement_time(ms("KV_BENCH_MEASURE_MS", 3000));
    for (name, tls, count, len, mem, b_thread) in cases {
        if !filter_matches(name) {
            continue;
        }
        let Some(p) = pair(tls, count, len, mem, b_thread) else {
            return;
        };
        g.throughput(Throughput::Bytes(count * len));
        g.bench_function(name, |bch| bch.iter(|| p.write_once()));
    }
    g.finish();
}

/// Whether the command line's filter (the first free argument, a substring as in
/// criterion) selects `name`: building pairs that will not run costs seconds.
fn filter_matches(name: &str) -> bool {
    let mut args = std::env::args().skip(1);
    let mut filter = None;
    while let Some(a) = args.next() {
        if a.starts_with("--") {
            // Options that take a value.
            if matches!(
                a.as_str(),
                "--warm-up-time"
                    | "--measurement-time"
                    | "--output-format"
                    | "--sample-size"
                    | "--save-baseline"
                    | "--baseline"
                    | "--color"
                    | "--profile-time"
            ) {
                args.next();
            }
        } else if filter.is_none() {
            filter = Some(a);
        }
    }
    filter.is_none_or(|f| format!("ucx/{name}").contains(&f))
}

criterion_group!(benches, bench);
criterion_main!(benches);
