//! WRITE throughput of the UCX backend between two in-process backends, per transport
//! and size, for comparison with `ucx_perftest` (see `scripts/compare.sh`).
//!
//! Cases (throughput is bytes moved per post):
//! * `shm_put/1MiB`: one 1 MiB descriptor, `tls = posix,cma,self`.
//! * `shm_put_batched/16KiB`: 64 descriptors of 16 KiB in one post.
//! * `tcp_put/1MiB`: one 1 MiB descriptor, `tls = tcp`.
//!
//! * `shm_put_ucxmem/1MiB`, `shm_put_ucxmem_batched/16KiB`, `shm_put_ucxmem/16KiB`:
//!   the same with `UcxBackend::alloc_host` memory on both sides: mapped operations (the
//!   target copies once through its mapping of the initiator's memory; README, "Mapped
//!   operations").
//! * `shm_put_ucxmem_messages/1MiB`, `shm_put_ucxmem_messages_batched/16KiB`: the same
//!   with `mapped = false` (data in messages), to show what mapping gains.
//! * `shm_put_ucxmem_same/16KiB`: 64 descriptors that all name the same 16 KiB on both
//!   sides (the shape of `ucx_perftest -t ucp_put_bw -s 16384`, which puts the same
//!   buffer again and again).
//! * `tcp_put/{16KiB,64KiB,256KiB,512KiB,1MiB}`: WRITEs over TCP with the backend's
//!   defaults (rendezvous from `rndv_min` = 512 KiB up, eager below);
//!   `tcp_put_eager/...`: the same with every piece eager (`rndv_min` = `u64::MAX`).
//! * `shm_put/4KiB`, `tcp_put/4KiB`: one 4 KiB descriptor per post (eager; the cost
//!   of one operation and its answer).
//! * `*_auth/...`: the same with a cluster secret on both sides (every operation and
//!   answer tagged under the session key).
//! * `tcp_put_target_thread/1MiB`: as `tcp_put/1MiB` with the target driven by its own
//!   progress thread instead of the posting thread.
//!
//! `KV_BENCH_DESCRIBE=1` prints the initiator's `describe()` after each case.
//!
//! Batched cases post `count` pieces that are adjacent locally and in reverse order
//! remotely (same footprint as one big put, nothing merges). One thread drives both
//! backends' `progress()` (the target's worker serves every operation). `KV_BENCH_WARMUP_MS` / `KV_BENCH_MEASURE_MS`
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

/// One bench case.
#[derive(Clone, Copy)]
struct Case {
    name: &'static str,
    tls: &'static str,
    /// Descriptors per post.
    count: u64,
    /// Bytes per descriptor.
    len: u64,
    mem: Mem,
    /// The target runs its own progress thread.
    b_thread: bool,
    /// Every descriptor names the same `len` bytes on both sides (as `ucx_perftest`
    /// puts the same buffer again and again) instead of `count` different pieces.
    same: bool,
    /// Pieces of `rndv_min` bytes and more go by rendezvous (the default); `false`
    /// sends every piece eager.
    rndv: bool,
    /// Both sides share a cluster secret (authenticated operations).
    auth: bool,
    /// Mapped operations where possible (`Options::mapped`, the default).
    mapped: bool,
}

fn pair(c: &Case) -> Option<Pair> {
    let Case {
        tls,
        count,
        len,
        mem,
        b_thread,
        same,
        ..
    } = *c;
    let secret = c
        .auth
        .then(|| kv_core::auth::ClusterSecret::generate().ok())
        .flatten();
    let opts = Options {
        tls: Some(tls.into()),
        rndv_min: if c.rndv { None } else { Some(u64::MAX) },
        mapped: c.mapped,
        ..Default::default()
    };
    let b_opts = Options {
        progress_thread: b_thread,
        ..opts.clone()
    };
    let init = |name: &str| match &secret {
        Some(s) => kv_core::BackendInit::new(name).with_secret(s.clone()),
        None => kv_core::BackendInit::new(name),
    };
    let a = match UcxBackend::new(&init("a"), opts.clone()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("skipping ucx bench: {e}");
            return None;
        }
    };
    let b = UcxBackend::new(&init("b"), b_opts).ok()?;
    // The local pieces are adjacent, the remote ones in reverse order: `count` puts
    // of `len` bytes over the same footprint as one `count * len` put (nothing merges).
    let size = if same { len } else { len * count } as usize;
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
        a.register(MemKind::Dram, &la.descriptor(), kv_core::Access::ReadWrite)
            .ok()?;
        b.register(MemKind::Dram, &lb.descriptor(), kv_core::Access::ReadWrite)
            .ok()?
    };
    let ep = a.connect("b", &b.connection_info().ok()?).ok()?;
    a.import_remote(ep, MemKind::Dram, &lb.descriptor(), &b.remote_key(rb).ok()?)
        .ok()?;
    let id = a
        .prepare(&TransferRequest {
            op: Op::Write,
            local_kind: MemKind::Dram,
            local: DescriptorList::strided(
                la.descriptor().addr,
                if same { 0 } else { len },
                count,
                len,
                0,
            )
            .ok()?,
            peer: ep,
            remote_kind: MemKind::Dram,
            remote: (0..count)
                .rev()
                .map(|i| {
                    let at = if same { 0 } else { i * len };
                    Descriptor::new(lb.descriptor().addr + at, len, 0)
                })
                .collect::<kv_core::Result<_>>()
                .ok()?,
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
    const SHM: &str = "posix,cma,self";
    let case = |name, tls, count, len, mem, b_thread, same, rndv| Case {
        name,
        tls,
        count,
        len,
        mem,
        b_thread,
        same,
        rndv,
        auth: false,
        mapped: true,
    };
    let auth = |c: Case, name| Case {
        name,
        auth: true,
        ..c
    };
    let messages = |c: Case, name| Case {
        name,
        mapped: false,
        ..c
    };
    let (heap, ucx) = (Mem::Heap, Mem::Ucx);
    let shm_batched = case(
        "shm_put_batched/16KiB",
        SHM,
        64,
        16 << 10,
        heap,
        false,
        false,
        true,
    );
    let tcp_1m = case("tcp_put/1MiB", "tcp", 1, 1 << 20, heap, false, false, true);
    let cases = [
        case("shm_put/1MiB", SHM, 1, 1 << 20, heap, false, false, true),
        shm_batched,
        case(
            "shm_put_ucxmem/1MiB",
            SHM,
            1,
            1 << 20,
            ucx,
            false,
            false,
            true,
        ),
        case(
            "shm_put_ucxmem_batched/16KiB",
            SHM,
            64,
            16 << 10,
            ucx,
            false,
            false,
            true,
        ),
        messages(
            case("", SHM, 1, 1 << 20, ucx, false, false, true),
            "shm_put_ucxmem_messages/1MiB",
        ),
        messages(
            case("", SHM, 64, 16 << 10, ucx, false, false, true),
            "shm_put_ucxmem_messages_batched/16KiB",
        ),
        case(
            "shm_put_ucxmem_same/16KiB",
            SHM,
            64,
            16 << 10,
            ucx,
            false,
            true,
            true,
        ),
        case(
            "shm_put_ucxmem/16KiB",
            SHM,
            1,
            16 << 10,
            ucx,
            false,
            false,
            true,
        ),
        tcp_1m,
        case(
            "tcp_put_eager/1MiB",
            "tcp",
            1,
            1 << 20,
            heap,
            false,
            false,
            false,
        ),
        case(
            "tcp_put/512KiB",
            "tcp",
            1,
            512 << 10,
            heap,
            false,
            false,
            true,
        ),
        case(
            "tcp_put_eager/512KiB",
            "tcp",
            1,
            512 << 10,
            heap,
            false,
            false,
            false,
        ),
        case(
            "tcp_put/256KiB",
            "tcp",
            1,
            256 << 10,
            heap,
            false,
            false,
            true,
        ),
        case(
            "tcp_put_eager/256KiB",
            "tcp",
            1,
            256 << 10,
            heap,
            false,
            false,
            false,
        ),
        case(
            "tcp_put/64KiB",
            "tcp",
            1,
            64 << 10,
            heap,
            false,
            false,
            true,
        ),
        case(
            "tcp_put_eager/64KiB",
            "tcp",
            1,
            64 << 10,
            heap,
            false,
            false,
            false,
        ),
        case(
            "tcp_put/16KiB",
            "tcp",
            1,
            16 << 10,
            heap,
            false,
            false,
            true,
        ),
        case(
            "tcp_put_eager/16KiB",
            "tcp",
            1,
            16 << 10,
            heap,
            false,
            false,
            false,
        ),
        auth(tcp_1m, "tcp_put_auth/1MiB"),
        auth(shm_batched, "shm_put_batched_auth/16KiB"),
        case("shm_put/4KiB", SHM, 1, 4 << 10, heap, false, false, true),
        case("tcp_put/4KiB", "tcp", 1, 4 << 10, heap, false, false, true),
        case(
            "tcp_put_target_thread/1MiB",
            "tcp",
            1,
            1 << 20,
            heap,
            true,
            false,
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
    for c in &cases {
        if !filter_matches(c.name) {
            continue;
        }
        let Some(p) = pair(c) else {
            return;
        };
        g.throughput(Throughput::Bytes(c.count * c.len));
        g.bench_function(c.name, |bch| bch.iter(|| p.write_once()));
        if std::env::var_os("KV_BENCH_DESCRIBE").is_some() {
            eprintln!("{}", p.a.describe());
        }
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
