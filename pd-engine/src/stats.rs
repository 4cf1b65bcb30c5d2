//! What a disaggregated run measures, and its report rows.

use std::time::Duration;

use crate::proto::WorkerStats;
use crate::report::{quantile, Value};

/// Measurements of one disaggregated run (decode worker's view plus what prefill
/// ranks reported).
#[derive(Debug, Default)]
pub struct Metrics {
    /// Per request: admission to the first decode step's token.
    pub ttft: Vec<Duration>,
    /// TTFT of the requests prefilled remotely (and not recomputed).
    pub ttft_remote: Vec<Duration>,
    /// Per request: admission (or worker arrival) to prefill start.
    pub queue: Vec<Duration>,
    /// Per request: prefill compute (remote: the slowest rank).
    pub prefill: Vec<Duration>,
    /// Per request: KV hand-off time not spent queueing or computing (0 when local).
    pub transfer: Vec<Duration>,
    /// Per request: from KV ready to the first decode step's token.
    pub first_decode: Vec<Duration>,
    /// Prefills run on the decode worker by the router's choice.
    pub local: usize,
    /// Prefills sent to prefill workers.
    pub remote: usize,
    /// Remote prefills that failed (dead worker, error, deadline) and were recomputed.
    pub recomputed: usize,
    /// KV bytes moved between processes.
    pub bytes: u64,
    /// Layer-wise transfers completed (one per rank per request) and their layers.
    pub transfers: u64,
    /// Sum of those transfers' durations (first post to last layer done).
    pub transfer_total: Duration,
    /// Sum of the part of it after the last layer was ready.
    pub transfer_exposed: Duration,
    /// Full blocks the prefill ranks looked up in their prefix stores (rank 0s).
    pub lookups: u64,
    /// Blocks they loaded from the store.
    pub hits: u64,
    /// Time in decode steps.
    pub decode: Duration,
    /// Tokens generated.
    pub generated: usize,
}

impl Metrics {
    /// Adds one request's TTFT, its split `(queue, prefill, transfer)` and whether its
    /// prefill ran remotely.
    pub fn add_ttft(
        &mut self,
        ttft: Duration,
        split: (Duration, Duration, Duration),
        first_decode: Duration,
        remote: bool,
    ) {
        if remote {
            self.ttft_remote.push(ttft);
        }
        self.ttft.push(ttft);
        self.queue.push(split.0);
        self.prefill.push(split.1);
        self.transfer.push(split.2);
        self.first_decode.push(first_decode);
    }

    /// Adds what one prefill rank reported for one request (prefix-store figures from
    /// rank 0 only: every rank looks up the same blocks).
    pub fn add_worker(&mut self, s: &WorkerStats, rank0: bool) {
        if s.bytes > 0 {
            self.bytes += s.bytes;
            self.transfers += 1;
            self.transfer_total += s.transfer;
            self.transfer_exposed += s.exposed;
        }
        if rank0 {
            self.lookups += s.lookup_blocks;
            self.hits += s.hit_blocks;
        }
    }

    /// Adds one pull load (all ranks' READs of a request).
    pub fn add_pull(&mut self, d: Duration) {
        self.transfers += 1;
        self.transfer_total += d;
        self.transfer_exposed += d;
    }

    /// The report rows (`layers` of the model, for the per-layer figure).
    pub fn rows(&mut self, layers: usize) -> Vec<(&'static str, Value)> {
        let mut rows = vec![
            ("local_prefills", Value::Int(self.local)),
            ("remote_prefills", Value::Int(self.remote)),
            ("recomputed_prefills", Value::Int(self.recomputed)),
        ];
        for (p50, p99, xs) in [
            ("ttft_p50_s", "ttft_p99_s", &mut self.ttft),
            ("queue_p50_s", "queue_p99_s", &mut self.queue),
            ("prefill_p50_s", "prefill_p99_s", &mut self.prefill),
            ("transfer_p50_s", "transfer_p99_s", &mut self.transfer),
            (
                "first_decode_p50_s",
                "first_decode_p99_s",
                &mut self.first_decode,
            ),
            (
                "remote_ttft_p50_s",
                "remote_ttft_p99_s",
                &mut self.ttft_remote,
            ),
        ] {
            rows.push((p50, Value::Float(quantile(xs, 0.5))));
            rows.push((p99, Value::Float(quantile(xs, 0.99))));
        }
        let n = self.transfers.max(1) as f64;
        let total = self.transfer_total.as_secs_f64();
        rows.extend([
            ("bytes_moved", Value::Int(self.bytes as usize)),
            (
                "transfer_per_layer_ms",
                Value::Float(total / n / layers.max(1) as f64 * 1e3),
            ),
            (
                "transfer_overlap",
                Value::Float(if total > 0.0 {
                    1.0 - self.transfer_exposed.as_secs_f64() / total
                } else {
                    f64::NAN
                }),
            ),
            ("tier_lookup_blocks", Value::Int(self.lookups as usize)),
            ("tier_hit_blocks", Value::Int(self.hits as usize)),
            (
                "tier_hit_ratio",
                Value::Float(if self.lookups > 0 {
                    self.hits as f64 / self.lookups as f64
                } else {
                    f64::NAN
                }),
            ),
        ]);
        rows
    }
}
