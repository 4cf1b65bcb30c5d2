//! `kv-bench transfer --layerwise`: the same per-layer transfers handed off as an engine
//! computes — layer `i` is posted as soon as its (simulated) compute ends — against
//! posting every layer after the whole compute. Reports the time to the first layer
//! and how much of the transfer the compute hides.

use std::time::{Duration, Instant};

use bytes::Bytes;
use kv_agent::{LayerwiseTransfer, Transfer};
use kv_core::Result;

use crate::stats::{Row, Summary, Value};

/// The engine computing one layer: the CPU is free meanwhile, as with a GPU kernel.
fn compute(d: Duration) {
    if !d.is_zero() {
        std::thread::sleep(d);
    }
}

/// Runs `iters` requests each way over `transfers` (one per layer); returns them and
/// the rows to print.
pub fn measure(
    mut transfers: Vec<Transfer>,
    iters: u32,
    per_layer: Duration,
) -> Result<(Vec<Transfer>, Row)> {
    let (mut first, mut exposed, mut whole) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..=iters {
        // After the compute: every layer posted at once, waited.
        for _ in &transfers {
            compute(per_layer);
        }
        let t0 = Instant::now();
        for t in &transfers {
            t.post(None)?;
        }
        for t in &transfers {
            t.wait()?;
        }
        if i > 0 {
            whole.push(t0.elapsed());
        }
        // Layer-wise: each layer as its compute ends.
        let mut lw =
            LayerwiseTransfer::new(transfers, Bytes::from(format!("lw-{i}")), Bytes::new())?;
        for l in 0..lw.layers() {
            compute(per_layer);
            lw.layer_ready(l)?;
            lw.poll()?;
        }
        let r = lw.wait()?;
        if i > 0 {
            first.extend(r.time_to_first_layer);
            exposed.extend(r.exposed);
        }
        transfers = lw.into_transfers();
    }
    let (w, e) = (Summary::of(&mut whole), Summary::of(&mut exposed));
    let overlap = 1.0 - e.avg.as_secs_f64() / w.avg.as_secs_f64().max(1e-12);
    let rows: Row = vec![
        (
            "layerwise_compute_per_layer_us",
            Value::Int(per_layer.as_micros() as u64),
        ),
        (
            "layerwise_time_to_first_layer_avg_p50_p99",
            Value::Str(Summary::of(&mut first).micros()),
        ),
        (
            "after_compute_all_layers_avg_p50_p99",
            Value::Str(w.micros()),
        ),
        (
            "after_compute_layerwise_avg_p50_p99",
            Value::Str(e.micros()),
        ),
        (
            "layerwise_overlap",
            Value::Str(format!("{:.1} %", 100.0 * overlap.clamp(0.0, 1.0))),
        ),
    ];
    Ok((transfers, rows))
}
