//! WRITE throughput of the UCX backend between two in-process backends, per transport
//! and size, for comparison with `ucx_perftest` (see `scripts/compare.sh`).
//!
//! Cases (throughput is bytes moved per post):
//! * `shm_put/1MiB`: one 1 MiB descriptor, `tls = posix,cma,self`.
//! * `shm_put_batched/16KiB`: 64 descriptors of 16 KiB (not adjacent) in one post.
//! * `tcp_put/1MiB`: one 1 MiB descriptor, `tls = tcp`.
//!
//! One thread drives both backends' `progress()` (UCX 1.13 emulates RMA on user memory
//! over these transports, so the target's worker must progress). Skips with a message
//! when libucp is missing.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kv_backend_ucx::{Options, UcxBackend};
use kv_core::{Backend, DescriptorList, MemKind, Op, PostOptions, Status, TransferRequest};
use kv_mem::HostBuffer;

struct Pair {
    a: UcxBackend,
    b: UcxBackend,
    _mem: (HostBuffer, HostBuffer),
    id: kv_core::TransferId,
}

fn pair(tls: &str, count: u64, len: u64) -> Option<Pair> {
    let opts = Options {
        tls: Some(tls.into()),
        ..Default::default()
    };
    let a = match UcxBackend::new("a", opts.clone()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("skipping ucx bench: {e}");
            return None;
        }
    };
    let b = UcxBackend::new("b", opts).ok()?;
    // Non-adjacent pieces (stride twice the length) so nothing coalesces.
    let stride = if count > 1 { 2 * len } else { len };
    let size = (stride * count) as usize;
    let la = HostBuffer::alloc(size, 4096).ok()?;
    let lb = HostBuffer::alloc(size, 4096).ok()?;
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
            local: DescriptorList::strided(la.descriptor().addr, stride, count, len, 0).ok()?,
            peer: ep,
            remote_kind: MemKind::Dram,
            remote: DescriptorList::strided(lb.descriptor().addr, stride, count, len, 0).ok()?,
        })
        .ok()?;
    Some(Pair {
        a,
        b,
        _mem: (la, lb),
        id,
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
            let _ = self.b.progress();
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
    }
}

fn bench(c: &mut Criterion) {
    let cases: [(&str, &str, u64, u64); 3] = [
        ("shm_put/1MiB", "posix,cma,self", 1, 1 << 20),
        ("shm_put_batched/16KiB", "posix,cma,self", 64, 16 << 10),
        ("tcp_put/1MiB", "tcp", 1, 1 << 20),
    ];
    let mut g = c.benchmark_group("ucx");
    g.sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    for (name, tls, count, len) in cases {
        let Some(p) = pair(tls, count, len) else {
            return;
        };
        g.throughput(Throughput::Bytes(count * len));
        g.bench_function(name, |bch| bch.iter(|| p.write_once()));
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
