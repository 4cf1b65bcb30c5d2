//! The engine API's per-request cost (issue 17), beside its reference measured in the
//! same run: a transfer of 1 000 blocks picked out of prepared 100 000-block lists
//! (`make_transfer` with two index arrays) against rebuilding a `TransferSpec` of the
//! same blocks and preparing it (goal: ≥ 10× cheaper and ≤ 20 µs), on the tcp backend
//! and on a null backend whose prepare costs nothing (the agent's own cost), with the
//! floor both pay: pushing the request's descriptors into kv-core lists.
//!
//! Two agents in this process. The same-host figures for engine memory come from
//! `kv-bench transfer --memory heap|memfd` (two processes) and the kv-mem example
//! `same_host`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use kv_agent::{Agent, AgentOptions, PeerId, Registration, TransferOptions, TransferSpec};
use kv_core::{
    Backend, Capabilities, Descriptor, DescriptorList, EndpointId, ListId, ListSide, MemKind,
    MemKinds, Notification, Op, PostOptions, RegistrationId, RemoteId, SelectRequest, Status,
    TransferId, TransferRequest,
};
use kv_mem::HostBuffer;

const BLOCKS: u64 = 100_000;
const BLOCK: u64 = 512;
const PICK: usize = 1000;

/// A backend that moves nothing and checks nothing: its prepare (and prepared lists)
/// cost a counter, so timing through it shows the agent's own per-request cost.
struct NullBackend(AtomicU64);

impl Backend for NullBackend {
    fn name(&self) -> &str {
        "null"
    }
    fn capabilities(&self) -> Capabilities {
        let mut c = Capabilities::default();
        c.mem_kinds = MemKinds::of(&[MemKind::Dram]);
        (c.local, c.remote, c.write, c.read) = (true, true, true, true);
        c
    }
    unsafe fn register(
        &self,
        _: MemKind,
        _: &Descriptor,
        _: kv_core::Access,
    ) -> kv_core::Result<RegistrationId> {
        Ok(RegistrationId(self.0.fetch_add(1, Ordering::Relaxed)))
    }
    fn deregister(&self, _: RegistrationId) -> kv_core::Result<()> {
        Ok(())
    }
    fn remote_key(&self, _: RegistrationId) -> kv_core::Result<Bytes> {
        Ok(Bytes::from_static(b"key"))
    }
    fn connection_info(&self) -> kv_core::Result<Bytes> {
        Ok(Bytes::from_static(b"null"))
    }
    fn connect(&self, _: &str, _: &[u8]) -> kv_core::Result<EndpointId> {
        Ok(EndpointId(1))
    }
    fn disconnect(&self, _: EndpointId) -> kv_core::Result<()> {
        Ok(())
    }
    fn import_remote(
        &self,
        _: EndpointId,
        _: MemKind,
        _: &Descriptor,
        _: &[u8],
    ) -> kv_core::Result<RemoteId> {
        Ok(RemoteId(self.0.fetch_add(1, Ordering::Relaxed)))
    }
    fn release_remote(&self, _: RemoteId) -> kv_core::Result<()> {
        Ok(())
    }
    fn prepare(&self, _: &TransferRequest) -> kv_core::Result<TransferId> {
        Ok(TransferId(self.0.fetch_add(1, Ordering::Relaxed)))
    }
    fn prepare_list(&self, _: ListSide, _: MemKind, _: &DescriptorList) -> kv_core::Result<ListId> {
        Ok(ListId(self.0.fetch_add(1, Ordering::Relaxed)))
    }
    fn prepare_selected(&self, _: &SelectRequest<'_>) -> kv_core::Result<TransferId> {
        Ok(TransferId(self.0.fetch_add(1, Ordering::Relaxed)))
    }
    fn release_list(&self, _: ListId) -> kv_core::Result<()> {
        Ok(())
    }
    unsafe fn post(&self, _: TransferId, _: &PostOptions) -> kv_core::Result<()> {
        Err(kv_core::Error::Unsupported(
            "the null backend moves nothing".into(),
        ))
    }
    fn poll(&self, _: TransferId) -> Status {
        Status::Idle
    }
    fn cancel(&self, _: TransferId) -> kv_core::Result<()> {
        Ok(())
    }
    fn release(&self, _: TransferId) -> kv_core::Result<()> {
        Ok(())
    }
    fn progress(&self) -> kv_core::Result<usize> {
        Ok(0)
    }
    fn notify(&self, _: EndpointId, _: Bytes) -> kv_core::Result<()> {
        Ok(())
    }
    fn drain_notifications(&self, _: &mut Vec<Notification>) -> kv_core::Result<usize> {
        Ok(0)
    }
}

/// Two agents with `backend` (`tcp` or `null`).
fn pair_on(backend: &str, progress: bool) -> (Agent, Agent, PeerId) {
    // Both agents share a cluster secret (networked backends need one).
    let secret = kv_core::auth::ClusterSecret::generate().expect("secret");
    let mk = |name: &str, progress_thread| {
        let a = Agent::new(
            name,
            AgentOptions {
                progress_thread,
                secret: Some(secret.clone()),
                ..Default::default()
            },
        )
        .expect("agent");
        if backend == "null" {
            a.add_backend_instance(Arc::new(NullBackend(AtomicU64::new(1))))
                .expect("null");
        } else {
            a.add_backend(backend, &Default::default())
                .expect("backend");
        }
        a
    };
    let (a, b) = (mk("bench-prefill", progress), mk("bench-decode", true));
    let peer = a
        .load_remote(&b.local_metadata().expect("metadata"))
        .expect("load");
    (a, b, peer)
}

/// 1 000 block ids scattered over 100 000 (no two adjacent), the same every run.
fn picks(seed: u64) -> Vec<u32> {
    let mut x = seed;
    let mut v: Vec<u32> = (0..PICK)
        .map(|i| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            // One block in each stretch of 100, at a pseudo-random place.
            (i as u64 * 100 + (x >> 33) % 99) as u32
        })
        .collect();
    v.reverse();
    v
}

fn blocks_list(base: u64, ids: &[u32]) -> DescriptorList {
    ids.iter()
        .map(|b| Descriptor::new(base + *b as u64 * BLOCK, BLOCK, 0))
        .collect::<kv_core::Result<DescriptorList>>()
        .expect("list")
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn prepared_lists(c: &mut Criterion) {
    // The floor of any per-request list: kv-core's DescriptorList::push of the 2 x 1000
    // block descriptors a transfer names (both paths below pay it).
    let (li, ri) = (picks(1), picks(2));
    let floor = median(
        (0..400)
            .map(|_| {
                let s = Instant::now();
                black_box((blocks_list(0x1000_0000, &li), blocks_list(0x9000_0000, &ri)));
                s.elapsed()
            })
            .collect(),
    );
    println!(
        "floor: pushing the 2 x {PICK} descriptors of a request into kv-core DescriptorLists costs {:.1} us",
        floor.as_secs_f64() * 1e6
    );
    for backend in ["tcp", "null"] {
        lists_on(c, backend);
    }
}

fn lists_on(c: &mut Criterion, backend: &str) {
    let (a, b, _) = pair_on(backend, false);
    let len = (BLOCKS * BLOCK) as usize;
    let (src, dst) = (
        kv_mem::Region::new(HostBuffer::shared(len).expect("src")),
        kv_mem::Region::new(HostBuffer::shared(len).expect("dst")),
    );
    let _keep: Vec<Registration> = vec![
        a.register(&src).expect("register"),
        b.register(&dst).expect("register"),
    ];
    // The decode side's registration reaches us with its metadata.
    let peer = a
        .load_remote(&b.local_metadata().expect("metadata"))
        .expect("reload");
    let every = |base| DescriptorList::strided(base, BLOCK, BLOCKS, BLOCK, 0).expect("list");
    let t0 = Instant::now();
    let local = a
        .prepare_local_list(MemKind::Dram, &every(src.descriptor().addr))
        .expect("local list");
    let remote = a
        .prepare_remote_list(peer, MemKind::Dram, &every(dst.descriptor().addr))
        .expect("remote list");
    let prep = t0.elapsed();
    let (li, ri) = (picks(1), picks(2));
    let opts = TransferOptions::default();
    let make = || {
        a.make_transfer(Op::Write, &local, &li, &remote, &ri, &opts)
            .expect("make")
    };
    let rebuild = || {
        let spec = TransferSpec::write(
            blocks_list(src.descriptor().addr, &li),
            peer,
            blocks_list(dst.descriptor().addr, &ri),
        );
        a.prepare(&spec).expect("prepare")
    };
    if backend == "tcp" {
        // The transfer moves the right blocks (checked once, outside the timing).
        // SAFETY: nothing else touches the buffers during the set-up.
        unsafe { src.write_at(li[0] as u64 * BLOCK, &[0xab; BLOCK as usize]) }.expect("write");
        let t = make();
        t.post(None).expect("post");
        t.wait().expect("wait");
        // SAFETY: the WRITE completed; nothing writes the destination now.
        let landed = unsafe { dst.bytes(ri[0] as u64 * BLOCK, BLOCK) }.expect("bytes")[0];
        assert_eq!(landed, 0xab);
    }

    // One timed pass outside criterion, so the ratio and the goal print together.
    let time = |f: &dyn Fn() -> kv_agent::Transfer| {
        median(
            (0..400)
                .map(|_| {
                    let s = Instant::now();
                    black_box(f());
                    s.elapsed()
                })
                .collect(),
        )
    };
    let (m, r) = (time(&make), time(&rebuild));
    let ratio = r.as_secs_f64() / m.as_secs_f64();
    println!(
        "prepared lists on {backend}: 2 x {BLOCKS} blocks prepared once in {:.1} ms; per request ({PICK} blocks, make + release): {:.1} us, rebuilding a TransferSpec: {:.1} us -> {ratio:.1}x cheaper (goal >= 10x and <= 20 us: {})",
        prep.as_secs_f64() * 1e3,
        m.as_secs_f64() * 1e6,
        r.as_secs_f64() * 1e6,
        if ratio >= 10.0 && m <= Duration::from_micros(20) { "met" } else { "MISSED" }
    );

    let mut g = c.benchmark_group(format!("per request on {backend}: 1000 of 100000 blocks"));
    g.bench_function("make_transfer (prepared lists)", |bch| {
        bch.iter(|| black_box(make()))
    });
    g.bench_function("TransferSpec + prepare (reference)", |bch| {
        bch.iter(|| black_box(rebuild()))
    });
    g.finish();
}

criterion_group!(engine, prepared_lists);
criterion_main!(engine);
