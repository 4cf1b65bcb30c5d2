//! NVMe-tier reads: blocks that are only on NVMe brought into DRAM with
//! [`Store::fetch`], `batch` (the queue depth) records at a time, through the gds backend
//! (io_uring, `O_DIRECT`).
//!
//! `cargo bench -p kv-tier --bench nvme` runs it under criterion. With
//! `KV_TIER_BENCH_RAW=1` it instead reads for `KV_TIER_BENCH_SECS` seconds and prints
//! `RESULT nvme_read <record bytes per second>` (records are the 2 MiB payload plus the
//! 4 KiB header page: 2052 KiB), which `scripts/compare.sh` sets beside fio's figure for
//! the same block size and queue depth. `KV_TIER_BENCH_DIR` (default: the temp dir),
//! `KV_TIER_BENCH_BLOCKS` (default 128), `KV_TIER_BENCH_QD` (default 16) and
//! `KV_TIER_BENCH_BLOCK` (payload bytes, default 2 MiB) shape it.

use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use kv_tier::{BlockKey, NvmeOptions, Options, PolicyKind, Store};

fn env_u64(k: &str, d: u64) -> u64 {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

struct Setup {
    store: Store,
    keys: Vec<BlockKey>,
    record: u64,
    qd: usize,
    dir: std::path::PathBuf,
}

fn setup() -> Setup {
    let blocks = env_u64("KV_TIER_BENCH_BLOCKS", 128);
    let block = env_u64("KV_TIER_BENCH_BLOCK", 2 << 20);
    let qd = env_u64("KV_TIER_BENCH_QD", 16) as usize;
    let base = std::env::var_os("KV_TIER_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = base.join(format!("kv-tier-bench-{}", std::process::id()));
    let record = kv_tier::record::record_len(block);
    let data_bytes = blocks * record;
    let seg = (64u64 << 20).max(record * 4);
    let store = Store::open(Options {
        dram_capacity: data_bytes + (64 << 20),
        slab_page_bytes: (record * 8).max(64 << 20),
        dram_policy: PolicyKind::S3Fifo,
        nvme: Some(NvmeOptions {
            capacity: (data_bytes * 2).div_ceil(seg) * seg + 3 * seg,
            segment_bytes: seg,
            batch: qd,
            gds: kv_backend_gds::Options {
                queue_depth: qd.max(1),
                max_io_size: record.next_power_of_two(),
                ..Default::default()
            },
            ..NvmeOptions::new(&dir)
        }),
        ..Options::for_model("bench")
    })
    .expect("open store");
    let mut buf = vec![0u8; block as usize];
    let keys: Vec<BlockKey> = (0..blocks).map(BlockKey::from_u64).collect();
    for (i, k) in keys.iter().enumerate() {
        buf[..8].copy_from_slice(&(i as u64).to_le_bytes());
        store.put(*k, &buf).expect("put");
    }
    store.flush().expect("flush");
    // Read in a scrambled order, as a prefix lookup over many requests would.
    let mut keys = keys;
    let n = keys.len();
    for i in 0..n {
        keys.swap(i, (i * 7919 + 13) % n);
    }
    Setup {
        store,
        keys,
        record,
        qd,
        dir,
    }
}

impl Setup {
    fn demote_all(&self) {
        for k in &self.keys {
            self.store.evict_from_dram(*k);
        }
    }

    /// Reads every block once; returns the time spent in `fetch`.
    fn pass(&self) -> Duration {
        self.demote_all();
        let t = Instant::now();
        let n = self.store.fetch(&self.keys).expect("fetch");
        let d = t.elapsed();
        assert_eq!(n, self.keys.len(), "every block read from NVMe");
        d
    }
}

fn main() {
    let s = setup();
    eprintln!(
        "nvme bench: {} blocks of {} record bytes, queue depth {}, engine {}",
        s.keys.len(),
        s.record,
        s.qd,
        s.store.nvme_engine().unwrap_or_default()
    );
    if std::env::var("KV_TIER_BENCH_RAW").is_ok_and(|v| v == "1") {
        let secs = env_u64("KV_TIER_BENCH_SECS", 5);
        let (mut busy, mut bytes) = (Duration::ZERO, 0u64);
        let end = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < end {
            busy += s.pass();
            bytes += s.keys.len() as u64 * s.record;
        }
        println!("RESULT nvme_read {:.0}", bytes as f64 / busy.as_secs_f64());
    } else {
        let mut c = Criterion::default().configure_from_args();
        let mut g = c.benchmark_group("nvme_read");
        g.throughput(Throughput::Bytes(s.keys.len() as u64 * s.record));
        g.sample_size(10);
        g.bench_function(format!("fetch_{}_qd{}", s.record, s.qd), |b| {
            b.iter_custom(|iters| (0..iters).map(|_| s.pass()).sum())
        });
        g.finish();
        c.final_summary();
    }
    let dir = s.dir.clone();
    drop(s);
    std::fs::remove_dir_all(dir).ok();
}
