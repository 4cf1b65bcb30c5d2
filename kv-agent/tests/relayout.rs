//! Byte-exact checks of `Relayout` against the reference re-layout (`common`: every
//! element's value from its logical coordinates) over simulated memory: every TP pair
//! of the issue, different block sizes, HND/NHD, blocks-first, MLA.

mod common;

use kv_agent::layout::{HeadOrder, KvDtype, KvLayout, KvPlacement, Relayout, Side};
use kv_core::DescriptorList;

/// A simulated address space: one allocation at `base`.
struct Mem {
    base: u64,
    bytes: Vec<u8>,
}

fn layout(
    kv: u32,
    tp: u32,
    rank: u32,
    block_tokens: u32,
    order: HeadOrder,
    placement: KvPlacement,
    base: u64,
) -> (KvLayout, Mem) {
    let mut l = KvLayout::for_rank(2, kv, 4, KvDtype::F16, block_tokens, 7, tp, rank).unwrap();
    l.order = order;
    l.placement = placement;
    let len = l.contiguous(base).unwrap();
    (
        l,
        Mem {
            base,
            bytes: vec![0xee; len as usize],
        },
    )
}

/// Moves bytes as a backend does: the source list's bytes, in order, into the
/// destination list's ranges, in order.
fn apply(src: &Mem, sl: &DescriptorList, dst: &mut Mem, dl: &DescriptorList) {
    assert_eq!(sl.total_bytes(), dl.total_bytes());
    let mut bytes = Vec::new();
    for d in sl.iter() {
        let at = (d.addr - src.base) as usize;
        bytes.extend_from_slice(&src.bytes[at..at + d.len as usize]);
    }
    let mut off = 0;
    for d in dl.iter() {
        let at = (d.addr - dst.base) as usize;
        dst.bytes[at..at + d.len as usize].copy_from_slice(&bytes[off..off + d.len as usize]);
        off += d.len as usize;
    }
}

#[allow(clippy::too_many_arguments)]
fn check(
    kv: u32,
    (a, b): (u32, u32),
    (sbt, dbt): (u32, u32),
    (so, dorder): (HeadOrder, HeadOrder),
    (sp, dp): (KvPlacement, KvPlacement),
    tokens: u64,
    via_items: bool,
) {
    let what = format!("kv {kv} TP {a}->{b} blocks {sbt}->{dbt} {so:?}->{dorder:?} {sp:?}->{dp:?}");
    let src_blocks: Vec<u32> = [5, 0, 3, 6, 1, 2, 4].to_vec();
    let dst_blocks: Vec<u32> = [2, 6, 0, 4, 5, 1, 3].to_vec();
    let srcs: Vec<(KvLayout, Mem)> = (0..a)
        .map(|r| {
            let (l, mut m) = layout(kv, a, r, sbt, so, sp, 0x1000_0000 * (r as u64 + 1));
            m.bytes = common::source_image(&l, m.base, m.bytes.len(), &src_blocks, tokens);
            (l, m)
        })
        .collect();
    for r in 0..b {
        let (dl, mut got) = layout(kv, b, r, dbt, dorder, dp, 0x100_0000_0000);
        let mut moved = 0;
        let mut chunk = 0;
        for (sl, sm) in &srcs {
            let rl = Relayout::new(sl, &dl).unwrap();
            if rl.is_empty() {
                continue;
            }
            moved += rl.heads().len();
            chunk = rl.chunk_tokens();
            for layer in 0..2 {
                let (s, d) = if via_items {
                    let (si, di) = rl.items(&src_blocks, &dst_blocks, tokens).unwrap();
                    (
                        rl.grid(Side::Source, layer).unwrap().select(&si).unwrap(),
                        rl.grid(Side::Destination, layer)
                            .unwrap()
                            .select(&di)
                            .unwrap(),
                    )
                } else {
                    rl.lists(layer, &src_blocks, &dst_blocks, tokens).unwrap()
                };
                apply(sm, &s, &mut got, &d);
            }
        }
        assert_eq!(moved, dl.heads_held as usize, "{what}: rank {r} heads");
        let want = common::expected_image(
            &dl,
            &vec![0xee; got.bytes.len()],
            got.base,
            &dst_blocks,
            tokens,
            chunk as u64,
        );
        if let Some(i) = common::first_difference(&got.bytes, &want) {
            panic!("{what}: rank {r} differs first at byte {i}");
        }
    }
}

use HeadOrder::{Hnd, Nhd};
use KvPlacement::{Interleaved, Separate};

/// The TP pairs of the issue, per-layer HND tensors, same and different block sizes.
#[test]
fn tp_pairs_of_the_issue_land_byte_exact() {
    for tp in [(1, 2), (2, 1), (2, 8), (8, 2), (4, 4), (16, 2)] {
        for blocks in [(16, 16), (16, 32), (32, 8)] {
            check(8, tp, blocks, (Hnd, Hnd), (Separate, Separate), 37, true);
        }
    }
}

/// TP larger than the KV heads on the destination (replicated heads), and both ways.
#[test]
fn replicated_heads_and_odd_block_sizes() {
    for tp in [(1, 4), (4, 1), (2, 8), (8, 8)] {
        check(2, tp, (6, 4), (Hnd, Hnd), (Separate, Separate), 23, true);
    }
}

/// HND on one side and NHD on the other (items per head), NHD both, blocks-first.
#[test]
fn element_orders_and_interleaved_planes() {
    for orders in [(Hnd, Nhd), (Nhd, Hnd), (Nhd, Nhd)] {
        for tp in [(2, 1), (1, 4), (4, 4)] {
            check(8, tp, (16, 8), orders, (Separate, Interleaved), 29, true);
            check(8, tp, (8, 16), orders, (Interleaved, Separate), 29, false);
        }
    }
}

/// Coalesced request lists move the same bytes as the items they merge.
#[test]
fn coalesced_lists_match_items() {
    check(
        8,
        (2, 4),
        (16, 16),
        (Hnd, Hnd),
        (Separate, Separate),
        100,
        false,
    );
    let (s, _) = layout(8, 1, 0, 16, Hnd, Separate, 0x1000);
    let (d, _) = layout(8, 1, 0, 16, Hnd, Separate, 0x100_0000);
    let rl = Relayout::new(&s, &d).unwrap();
    // Seven blocks in order: one run per plane, capped at 128 tokens (8 blocks).
    let ids: Vec<u32> = (0..7).collect();
    let (sl, dl) = rl.lists(0, &ids, &ids, 7 * 16).unwrap();
    assert_eq!((sl.len(), dl.len()), (2, 2));
    let (sl, _) = rl
        .clone()
        .with_max_payload_tokens(32)
        .lists(0, &ids, &ids, 7 * 16)
        .unwrap();
    // Payloads of at most 2 blocks: 2+2+2+1 per plane, and K's last block touches V's
    // first (the planes are back to back), which merge.
    assert_eq!(sl.len(), 7);
    assert!(sl.iter().all(|d| d.len <= 2 * s.block_bytes()));
}

#[test]
fn mla_latents_come_from_the_first_rank_only() {
    let mut srcs = Vec::new();
    for r in 0..2 {
        let mut l = KvLayout::mla(2, 8, KvDtype::Bf16, 16, 4, 2, r).unwrap();
        l.contiguous(0x10000 * (r as u64 + 1)).unwrap();
        srcs.push(l);
    }
    let mut d = KvLayout::mla(2, 8, KvDtype::Bf16, 32, 4, 4, 3).unwrap();
    d.contiguous(0x100000).unwrap();
    let moving: Vec<bool> = srcs
        .iter()
        .map(|s| !Relayout::new(s, &d).unwrap().is_empty())
        .collect();
    assert_eq!(moving, vec![true, false]);
    let rl = Relayout::new(&srcs[0], &d).unwrap();
    let (si, di) = rl.items(&[0, 1], &[2], 32).unwrap();
    assert_eq!(
        (si.len(), di.len()),
        (2, 2),
        "one plane, two 16-token chunks"
    );
}

#[test]
fn bad_requests_are_refused() {
    let (s, _) = layout(8, 2, 0, 16, Hnd, Separate, 0x1000);
    let (d, _) = layout(8, 2, 1, 16, Hnd, Separate, 0x100_0000);
    assert!(Relayout::new(&s, &d).unwrap().is_empty());
    assert!(Relayout::new(&s, &d)
        .unwrap()
        .grid(Side::Source, 0)
        .is_err());
    let (d, _) = layout(8, 1, 0, 16, Hnd, Separate, 0x100_0000);
    let rl = Relayout::new(&s, &d).unwrap();
    assert!(
        rl.items(&[0], &[0, 1], 32).is_err(),
        "too few source blocks"
    );
    assert!(rl.items(&[0, 7], &[0, 1], 32).is_err(), "block 7 of 7");
    assert!(rl.grid(Side::Source, 2).is_err(), "layer 2 of 2");
    let mut other = d.clone();
    other.head_dim = 8;
    other.contiguous(0x100_0000).unwrap();
    let e = Relayout::new(&s, &other).unwrap_err();
    assert!(e.to_string().contains("incompatible"), "{e}");
}
