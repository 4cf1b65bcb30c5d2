//! DRAM-tier throughput for 2 MiB blocks, against a single-thread memcpy of 2 MiB
//! measured in the same run.
//!
//! `cargo bench -p kv-tier --bench dram` runs the criterion groups and then prints
//! ratios (goal ≥ 0.8): `put` copies the block into the arena and indexes it (replacing
//! an older block, so slots are recycled); `get` looks the block up, pins it and copies
//! it out into a caller buffer. Two references: `memcpy` between the same two hot 2 MiB
//! buffers (mostly in cache), and `memcpy_ws` over the same working set the store
//! touches (one hot buffer ↔ 33 rotating 2 MiB buffers, like 32 keys in the arena).

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use kv_tier::{BlockKey, Options, Store};

const BLOCK: usize = 2 << 20;
const KEYS: u64 = 32;

fn store() -> Store {
    Store::open(Options {
        dram_capacity: (KEYS + 4) * (BLOCK as u64 + 4096) + (64 << 20),
        ..Options::for_model("bench")
    })
    .expect("open store")
}

fn fill(v: &mut [u8], seed: u8) {
    for (i, b) in v.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(31).wrapping_add(seed);
    }
}

/// Best-of-`rounds` bytes per second of `f` moving `BLOCK` bytes per call.
fn rate(rounds: usize, iters: usize, mut f: impl FnMut(usize)) -> f64 {
    let mut best = Duration::MAX;
    for _ in 0..rounds {
        let t = Instant::now();
        for i in 0..iters {
            f(i);
        }
        best = best.min(t.elapsed());
    }
    (iters * BLOCK) as f64 / best.as_secs_f64()
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let s = store();
    let mut src = vec![0u8; BLOCK];
    fill(&mut src, 1);
    let mut dst = vec![0u8; BLOCK];
    let keys: Vec<BlockKey> = (0..KEYS).map(BlockKey::from_u64).collect();
    for k in &keys {
        s.put(*k, &src).expect("put");
    }
    {
        let mut g = c.benchmark_group("dram_2MiB");
        g.throughput(Throughput::Bytes(BLOCK as u64));
        g.bench_function("memcpy", |b| {
            b.iter(|| dst.copy_from_slice(black_box(&src)))
        });
        let mut i = 0usize;
        g.bench_function("put", |b| {
            b.iter(|| {
                i += 1;
                s.put(keys[i % keys.len()], black_box(&src)).expect("put")
            })
        });
        g.bench_function("get_read_into", |b| {
            b.iter(|| {
                i += 1;
                let h = s.get(keys[i % keys.len()]).expect("get").expect("hit");
                h.read_into(black_box(&mut dst)).expect("read")
            })
        });
        g.bench_function("get_zero_copy", |b| {
            b.iter(|| {
                i += 1;
                let h = s.get(keys[i % keys.len()]).expect("get").expect("hit");
                // SAFETY: the arena is registered with nothing outside the store.
                black_box(unsafe { h.as_slice() }[BLOCK - 1])
            })
        });
        g.finish();
    }
    c.final_summary();

    // Ratios from one interleaved run (so both see the same machine state).
    let (rounds, iters) = (15, 64);
    let mut pool: Vec<Vec<u8>> = (0..KEYS + 1)
        .map(|i| {
            let mut v = vec![0u8; BLOCK];
            fill(&mut v, i as u8);
            v
        })
        .collect();
    let n = pool.len();
    let (mut memcpy, mut ws_in, mut ws_out) = (0f64, 0f64, 0f64);
    let mut put = 0f64;
    let mut get = 0f64;
    for _ in 0..3 {
        memcpy = memcpy.max(rate(rounds, iters, |_| {
            dst.copy_from_slice(black_box(&src))
        }));
        ws_in = ws_in.max(rate(rounds, iters, |i| {
            pool[i % n].copy_from_slice(black_box(&src))
        }));
        ws_out = ws_out.max(rate(rounds, iters, |i| {
            dst.copy_from_slice(black_box(&pool[i % n]))
        }));
        put = put.max(rate(rounds, iters, |i| {
            s.put(keys[i % keys.len()], black_box(&src)).expect("put")
        }));
        get = get.max(rate(rounds, iters, |i| {
            let h = s.get(keys[i % keys.len()]).expect("get").expect("hit");
            h.read_into(black_box(&mut dst)).expect("read")
        }));
    }
    let mib = |r: f64| r / (1 << 20) as f64;
    println!("RESULT memcpy_2MiB {:.0} MiB/s", mib(memcpy));
    println!("RESULT put_2MiB {:.0} MiB/s", mib(put));
    println!("RESULT get_2MiB {:.0} MiB/s", mib(get));
    println!("RESULT memcpy_ws_in_2MiB {:.0} MiB/s", mib(ws_in));
    println!("RESULT memcpy_ws_out_2MiB {:.0} MiB/s", mib(ws_out));
    println!("RATIO put/memcpy {:.2}", put / memcpy);
    println!("RATIO get/memcpy {:.2}", get / memcpy);
    println!("RATIO put/memcpy_ws {:.2}", put / ws_in);
    println!("RATIO get/memcpy_ws {:.2}", get / ws_out);
}
