//! 1 MiB WRITE and READ between two in-process backends, per provider; the target is
//! progressed by its own thread, as a separate process would.
//!
//! `cargo bench -p kv-backend-libfabric --bench rma` runs criterion; with
//! `KV_FABRIC_COMPARE=<iterations>` it instead prints one `ours <provider> <op> <MB/s>`
//! line per case for `scripts/compare.sh` (MB = 10^6 bytes, like fi_pingpong).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, Criterion, Throughput};
use kv_core::{
    Backend, DescriptorList, MemKind, Op, Params, PostOptions, Status, TransferId, TransferRequest,
};
use kv_mem::HostBuffer;

const SIZE: usize = 1 << 20;
const PROVIDERS: &[&str] = &["tcp;ofi_rxm", "shm"];

struct Pair {
    a: Arc<dyn Backend>,
    stop: Arc<AtomicBool>,
    target: Option<std::thread::JoinHandle<()>>,
    write: TransferId,
    read: TransferId,
    _bufs: (HostBuffer, HostBuffer),
}

impl Drop for Pair {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.target.take() {
            let _ = t.join();
        }
    }
}

fn pair(provider: &str) -> kv_core::Result<Pair> {
    let mut p = Params::new();
    p.insert("provider".into(), provider.into());
    if provider.starts_with("tcp") {
        p.insert("node".into(), "127.0.0.1".into());
    }
    let a = kv_backend_libfabric::create(&kv_core::BackendInit::new("bench-a"), &p)?;
    let b = kv_backend_libfabric::create(&kv_core::BackendInit::new("bench-b"), &p)?;
    let src = HostBuffer::alloc(SIZE, 4096)?;
    let dst = HostBuffer::alloc(SIZE, 4096)?;
    // SAFETY: the buffers live in the Pair, which stops the transfers (and drops the
    // backends' last users) before them; the benchmark only waits for finished posts.
    let (_ra, rb) = unsafe {
        (
            a.register(MemKind::Dram, &src.descriptor(), kv_core::Access::ReadWrite)?,
            b.register(MemKind::Dram, &dst.descriptor(), kv_core::Access::ReadWrite)?,
        )
    };
    let peer = a.connect("bench-b", &b.connection_info()?)?;
    a.import_remote(peer, MemKind::Dram, &dst.descriptor(), &b.remote_key(rb)?)?;
    let req = |op| TransferRequest {
        op,
        local_kind: MemKind::Dram,
        local: DescriptorList::single(src.descriptor()).unwrap(),
        peer,
        remote_kind: MemKind::Dram,
        remote: DescriptorList::single(dst.descriptor()).unwrap(),
    };
    let (write, read) = (a.prepare(&req(Op::Write))?, a.prepare(&req(Op::Read))?);
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let target = std::thread::spawn(move || {
        while !s.load(Ordering::Acquire) {
            let _ = b.progress();
        }
    });
    Ok(Pair {
        a,
        stop,
        target: Some(target),
        write,
        read,
        _bufs: (src, dst),
    })
}

fn once(a: &dyn Backend, id: TransferId) {
    let opts = PostOptions {
        notification: None,
        deadline: Some(Instant::now() + Duration::from_secs(10)),
    };
    // SAFETY: the buffers outlive every post (see `pair`).
    unsafe { a.post(id, &opts).expect("post") };
    loop {
        let _ = a.progress();
        match a.poll(id) {
            Status::Done => return,
            Status::Failed(e) => panic!("transfer failed: {e}"),
            _ => {}
        }
    }
}

fn bench(c: &mut Criterion) {
    for prov in PROVIDERS {
        let p = match pair(prov) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("skipping {prov}: {e}");
                continue;
            }
        };
        let mut g = c.benchmark_group(format!("libfabric/{prov}"));
        g.throughput(Throughput::Bytes(SIZE as u64));
        g.bench_function("write_1MiB", |bch| bch.iter(|| once(&*p.a, p.write)));
        g.bench_function("read_1MiB", |bch| bch.iter(|| once(&*p.a, p.read)));
        g.finish();
    }
}

criterion_group!(benches, bench);

fn main() {
    if let Ok(n) = std::env::var("KV_FABRIC_COMPARE") {
        let iters: u32 = n.parse().unwrap_or(200).max(1);
        let only = std::env::var("KV_FABRIC_COMPARE_PROVIDER").ok();
        for prov in PROVIDERS
            .iter()
            .filter(|p| only.as_deref().is_none_or(|o| o == **p))
        {
            let p = match pair(prov) {
                Ok(p) => p,
                Err(e) => {
                    println!("skip {prov} {e}");
                    continue;
                }
            };
            for (name, id) in [("write", p.write), ("read", p.read)] {
                for _ in 0..iters.min(20) {
                    once(&*p.a, id); // warm-up
                }
                let t = Instant::now();
                for _ in 0..iters {
                    once(&*p.a, id);
                }
                let mbs = SIZE as f64 * iters as f64 / t.elapsed().as_secs_f64() / 1e6;
                println!("ours {prov} {name} {mbs:.1}");
            }
        }
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
