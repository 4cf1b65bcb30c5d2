//! Per-backend small and large transfers through the agent (two agents in this process),
//! beside a single-thread memcpy of the same size measured in the same run.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kv_agent::{Agent, AgentOptions, Transfer, TransferSpec};
use kv_core::DescriptorList;
use kv_mem::{HostBuffer, Region};

struct Pair {
    _keep: Vec<kv_agent::Registration>,
    _mem: Vec<Region>,
    t: Transfer,
}

fn pair(backend: &str, size: usize, batch: u64) -> Option<Pair> {
    // Both agents share a cluster secret (networked backends need one).
    let secret = kv_core::auth::ClusterSecret::generate().ok()?;
    let mk = |name: &str, progress| {
        let a = Agent::new(
            name,
            AgentOptions {
                progress_thread: progress,
                secret: Some(secret.clone()),
                ..Default::default()
            },
        )
        .ok()?;
        match a.add_backend(backend, &Default::default()) {
            Ok(()) => Some(a),
            Err(e) => {
                eprintln!("skipping {backend}: {e}");
                None
            }
        }
    };
    let (a, b) = (mk("bench-a", false)?, mk("bench-b", true)?);
    let stride = size as u64 + 4096;
    let len = (stride * batch) as usize;
    let src = Region::new(HostBuffer::shared(len).ok()?);
    let dst = Region::new(HostBuffer::shared(len).ok()?);
    let rs = a.register(&src).ok()?;
    let rd = b.register(&dst).ok()?;
    let peer = a.load_remote(&b.local_metadata().ok()?).ok()?;
    let spec = TransferSpec::write(
        DescriptorList::strided(rs.descriptor().addr, stride, batch, size as u64, 0).ok()?,
        peer,
        DescriptorList::strided(rd.descriptor().addr, stride, batch, size as u64, 0).ok()?,
    );
    let t = a.prepare(&spec).ok()?;
    Some(Pair {
        _keep: vec![rs, rd],
        _mem: vec![src, dst],
        t,
    })
}

fn benches(c: &mut Criterion) {
    for (label, size, batch) in [("4KiB x64", 4096usize, 64u64), ("1MiB", 1 << 20, 1)] {
        let mut g = c.benchmark_group(format!("write {label}"));
        g.throughput(Throughput::Bytes(size as u64 * batch));
        g.measurement_time(Duration::from_secs(2));
        g.warm_up_time(Duration::from_millis(500));
        let src = vec![1u8; size * batch as usize];
        let mut dst = vec![0u8; size * batch as usize];
        g.bench_function("memcpy (reference)", |b| {
            b.iter(|| {
                for (d, s) in dst.chunks_mut(size).zip(src.chunks(size)) {
                    d.copy_from_slice(std::hint::black_box(s));
                }
            })
        });
        for backend in ["tcp", "ucx", "libfabric"] {
            let Some(p) = pair(backend, size, batch) else {
                continue;
            };
            g.bench_function(backend, |b| {
                b.iter(|| {
                    p.t.post(None).expect("post");
                    p.t.wait().expect("wait");
                })
            });
        }
        g.finish();
    }
}

criterion_group!(transfer, benches);
criterion_main!(transfer);
