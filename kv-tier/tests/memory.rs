//! Memory use stays bounded by the configured capacities (own process, so RSS is ours).

mod common;

use common::{block, opts, tmpdir};
use kv_tier::{BlockKey, PolicyKind, Store};

fn rss() -> u64 {
    let s = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    s.split_whitespace()
        .nth(1)
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
        * 4096
}

#[test]
fn rss_stays_within_dram_capacity_while_writing_ten_times_more() {
    let dir = tmpdir("memory");
    let dram = 32u64 << 20;
    let mut o = opts(&dir, dram, 48 << 20, 8 << 20, PolicyKind::S3Fifo);
    o.slab_page_bytes = 8 << 20;
    let before = rss();
    let s = Store::open(o).unwrap();
    let data: Vec<Vec<u8>> = (0..4).map(|i| block(i, 1 << 20)).collect();
    let mut peak = 0;
    for i in 0..320u64 {
        s.put(BlockKey::from_u64(i), &data[(i % 4) as usize])
            .unwrap();
        if i % 16 == 0 {
            peak = peak.max(rss());
            let st = s.stats();
            assert!(
                st.dram_bytes <= dram && st.nvme_file_bytes <= 48 << 20,
                "{st:?}"
            );
        }
    }
    s.flush().unwrap();
    peak = peak.max(rss());
    let grown = peak.saturating_sub(before);
    // The arena, plus slack for the test's own 4 MiB of data, allocator and thread stacks.
    assert!(
        grown <= dram + (24 << 20),
        "RSS grew by {} MiB writing 320 MiB through a 32 MiB DRAM tier",
        grown >> 20
    );
    let st = s.stats();
    assert!(st.dram_evictions > 0 && st.nvme_evictions > 0, "{st:?}");
    drop(s);
    std::fs::remove_dir_all(&dir).ok();
}
