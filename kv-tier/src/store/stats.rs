//! The store's counters, latency histograms and the [`Stats`] snapshot.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crate::policy::PolicySizes;

/// Counters bumped by every room of the store (relaxed atomics: each is exact, a
/// snapshot of several is not taken at one instant).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub dram_hits: AtomicU64,
    pub nvme_hits: AtomicU64,
    pub misses: AtomicU64,
    pub dram_evictions: AtomicU64,
    pub nvme_evictions: AtomicU64,
    pub write_backs: AtomicU64,
    pub write_back_failures: AtomicU64,
    pub wb_queue: AtomicU64,
    pub prefetched: AtomicU64,
    pub corrupt_dram: AtomicU64,
    pub corrupt: AtomicU64,
    pub compactions: AtomicU64,
    pub dropped_writes: AtomicU64,
    pub get_ns: Histogram,
    pub put_ns: Histogram,
    pub nvme_read_ns: Histogram,
}

/// Buckets per power of two (quarter-octave resolution: a percentile is at most 19 %
/// above the true value).
const SUB: usize = 4;

/// A lock-free latency histogram in nanoseconds.
#[derive(Debug)]
pub(crate) struct Histogram([AtomicU64; 64 * SUB]);

impl Default for Histogram {
    fn default() -> Self {
        Histogram(std::array::from_fn(|_| AtomicU64::new(0)))
    }
}

impl Histogram {
    fn bucket(ns: u64) -> usize {
        let v = ns.max(1);
        let msb = 63 - v.leading_zeros() as usize;
        if msb < 2 {
            return v as usize;
        }
        msb * SUB + ((v >> (msb - 2)) & 3) as usize
    }

    /// The largest value of bucket `b`.
    fn upper(b: usize) -> u64 {
        let (msb, sub) = (b / SUB, (b % SUB) as u64);
        if msb < 2 {
            return b as u64;
        }
        ((SUB as u64 + sub + 1) << (msb - 2)) - 1
    }

    /// Records the time since `start`.
    pub fn since(&self, start: Instant) {
        let ns = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.0[Self::bucket(ns)].fetch_add(1, Ordering::Relaxed);
    }

    pub fn summary(&self) -> Latency {
        let counts: Vec<u64> = self.0.iter().map(|c| c.load(Ordering::Relaxed)).collect();
        let n: u64 = counts.iter().sum();
        let at = |q: f64| {
            let want = ((n as f64 * q).ceil() as u64).max(1);
            let mut acc = 0;
            for (b, c) in counts.iter().enumerate() {
                acc += c;
                if acc >= want {
                    return Self::upper(b);
                }
            }
            0
        };
        if n == 0 {
            return Latency::default();
        }
        Latency {
            count: n,
            p50_ns: at(0.5),
            p99_ns: at(0.99),
        }
    }
}

/// Latency percentiles of one operation (quarter-octave buckets: each figure is the
/// top of its bucket, at most 19 % above the true value). `Copy`, `Send + Sync`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Latency {
    /// Operations recorded.
    pub count: u64,
    /// Median, nanoseconds.
    pub p50_ns: u64,
    /// 99th percentile, nanoseconds.
    pub p99_ns: u64,
}

/// Counters and sizes of a store, from [`crate::Store::stats`]. Each tier is counted on
/// its own: a block read from NVMe is an NVMe hit, not a DRAM hit. `Clone`,
/// `Send + Sync`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Blocks read (`get`, `get_many`) from a DRAM copy.
    pub dram_hits: u64,
    /// Blocks read from NVMe (no DRAM copy at the time).
    pub nvme_hits: u64,
    /// Reads of keys in no tier (or dropped as corrupt).
    pub misses: u64,
    /// Blocks with a DRAM copy.
    pub dram_blocks: u64,
    /// Arena bytes in use (slots, 4 KiB granular; with an NVMe tier a slot also holds
    /// the record's header page).
    pub dram_bytes: u64,
    /// Arena size (exactly `Options::dram_capacity`).
    pub dram_capacity: u64,
    /// Arena bytes never handed out again because a transfer the storage backend could
    /// not cancel names them (included in `dram_bytes`; should stay 0).
    pub dram_quarantined: u64,
    /// Blocks with an NVMe copy.
    pub nvme_blocks: u64,
    /// Bytes of live records on NVMe (tombstones included).
    pub nvme_bytes: u64,
    /// Bytes of segment files.
    pub nvme_file_bytes: u64,
    /// Configured NVMe capacity (0 without an NVMe tier).
    pub nvme_capacity: u64,
    /// DRAM copies dropped to make room (after write-back when needed).
    pub dram_evictions: u64,
    /// NVMe copies dropped to make room.
    pub nvme_evictions: u64,
    /// Blocks written to NVMe.
    pub write_backs: u64,
    /// Blocks whose write-back failed (dropped from DRAM unwritten unless pinned).
    pub write_back_failures: u64,
    /// Write-back jobs waiting.
    pub write_back_queue: u64,
    /// Blocks `put_many` dropped because DRAM had no room without waiting.
    pub dropped_writes: u64,
    /// Blocks brought from NVMe into DRAM by `prefetch`/`fetch`/`get`.
    pub prefetched: u64,
    /// DRAM copies that failed their checksum on a read and were dropped.
    pub corrupt_dram: u64,
    /// NVMe records that failed their checks (at recovery or on a read) and were
    /// dropped.
    pub corrupt_records: u64,
    /// Segments cleaned (live records copied out, file deleted).
    pub compactions: u64,
    /// Segment files.
    pub segments: u64,
    /// The DRAM policy's sizes (tracked, probation and ghost lists, orphans).
    pub dram_policy: PolicySizes,
    /// The NVMe policy's sizes (zero without an NVMe tier).
    pub nvme_policy: PolicySizes,
    /// Each `get` and `get_many` call (checksums and NVMe reads included).
    pub get_latency: Latency,
    /// Each `put` and `put_many` call.
    pub put_latency: Latency,
    /// One batch of NVMe reads (promotion, `get_many`, prefetch).
    pub nvme_read_latency: Latency,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_bound_their_values() {
        for v in [1u64, 3, 4, 5, 7, 100, 1000, 123_456, 1 << 40] {
            let b = Histogram::bucket(v);
            assert!(Histogram::upper(b) >= v, "{v}");
            assert!(Histogram::upper(b) as f64 <= v as f64 * 1.25 + 1.0, "{v}");
            // The bucket below ends below v.
            assert!(
                Histogram::upper(Histogram::bucket(v - 1)) < v || Histogram::bucket(v - 1) == b
            );
        }
        let h = Histogram::default();
        for ns in 1..=100u64 {
            h.0[Histogram::bucket(ns * 1000)].fetch_add(1, Ordering::Relaxed);
        }
        let s = h.summary();
        assert_eq!(s.count, 100);
        assert!((50_000..=62_000).contains(&s.p50_ns), "{s:?}");
        assert!((99_000..=124_000).contains(&s.p99_ns), "{s:?}");
    }
}
