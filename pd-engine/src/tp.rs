//! Tensor parallelism over KV heads: which heads a rank holds, and a rank's head shard
//! of a block.
//!
//! The rule is vLLM's: with TP size `t ≤ kv_heads`, rank `r` holds `kv_heads / t`
//! consecutive heads; with `t > kv_heads` every rank holds one head, replicated on
//! `t / kv_heads` consecutive ranks. Blocks are HND (`[heads][tokens][dim]`), so a
//! rank's shard of a block is one contiguous range of it.

use std::ops::Range;

use crate::error::{Error, Result};
use crate::kv_cache::{BlockId, KvCache, KvLayout, Plane};

/// One rank of a tensor-parallel group. `Copy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TpRank {
    /// Ranks in the group.
    pub size: usize,
    /// This rank, `0..size`.
    pub rank: usize,
}

impl TpRank {
    /// The single rank of an unsharded engine.
    pub const SINGLE: TpRank = TpRank { size: 1, rank: 0 };

    /// The KV heads this rank holds, of `kv_heads`.
    pub fn kv_heads(&self, kv_heads: usize) -> Result<Range<usize>> {
        kv_heads_for_rank(kv_heads, self.size, self.rank)
    }
}

fn check_tp(kv_heads: usize, tp: usize) -> Result<()> {
    let ok = kv_heads > 0
        && tp > 0
        && if tp <= kv_heads {
            kv_heads % tp == 0
        } else {
            tp % kv_heads == 0
        };
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "TP size {tp} does not divide (or is not a multiple of) {kv_heads} KV heads"
        )))
    }
}

/// The KV heads rank `rank` of a TP group of `tp` holds, for a model with `kv_heads`.
pub fn kv_heads_for_rank(kv_heads: usize, tp: usize, rank: usize) -> Result<Range<usize>> {
    check_tp(kv_heads, tp)?;
    if rank >= tp {
        return Err(Error::invalid(format!("rank {rank} of a TP group of {tp}")));
    }
    Ok(if tp <= kv_heads {
        let per = kv_heads / tp;
        rank * per..(rank + 1) * per
    } else {
        let h = rank / (tp / kv_heads);
        h..h + 1
    })
}

/// The ranks of a TP group of `tp` that hold KV head `head` (more than one when heads
/// are replicated).
pub fn ranks_for_head(kv_heads: usize, tp: usize, head: usize) -> Result<Range<usize>> {
    check_tp(kv_heads, tp)?;
    if head >= kv_heads {
        return Err(Error::invalid(format!("head {head} of {kv_heads}")));
    }
    Ok(if tp <= kv_heads {
        let r = head / (kv_heads / tp);
        r..r + 1
    } else {
        let rep = tp / kv_heads;
        head * rep..(head + 1) * rep
    })
}

/// One piece of a re-layout between TP groups: `heads` go from `src` rank to `dst` rank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardMove {
    /// Sending rank (in the source group).
    pub src: usize,
    /// Receiving rank (in the destination group).
    pub dst: usize,
    /// Global KV heads moved, consecutive.
    pub heads: Range<usize>,
}

/// Who sends which heads to whom when a source TP group hands KV to a destination TP
/// group: every destination rank receives exactly its heads, each from one source rank
/// that holds it (the first, when replicated). The reference kv-agent's re-layout must
/// agree with.
pub fn shard_moves(kv_heads: usize, src_tp: usize, dst_tp: usize) -> Result<Vec<ShardMove>> {
    check_tp(kv_heads, src_tp)?;
    let mut out: Vec<ShardMove> = Vec::new();
    for dst in 0..dst_tp {
        for head in kv_heads_for_rank(kv_heads, dst_tp, dst)? {
            let src = ranks_for_head(kv_heads, src_tp, head)?.start;
            match out.last_mut() {
                Some(m) if m.dst == dst && m.src == src && m.heads.end == head => m.heads.end += 1,
                _ => out.push(ShardMove {
                    src,
                    dst,
                    heads: head..head + 1,
                }),
            }
        }
    }
    Ok(out)
}

/// Element range of global heads `heads` inside a block laid out as `layout` that holds
/// global heads `held`.
pub fn shard_range(
    layout: &KvLayout,
    held: &Range<usize>,
    heads: &Range<usize>,
) -> Result<Range<usize>> {
    if held.len() != layout.heads
        || heads.start < held.start
        || heads.end > held.end
        || heads.is_empty()
    {
        return Err(Error::invalid(format!(
            "heads {heads:?} are not inside a block holding {held:?} ({} heads)",
            layout.heads
        )));
    }
    let e = layout.head_elems();
    Ok((heads.start - held.start) * e..(heads.end - held.start) * e)
}

/// The shard of `block` (holding `held`) for `heads`: a sub-slice, no copy.
pub fn extract_shard<'a>(
    layout: &KvLayout,
    held: &Range<usize>,
    block: &'a [f32],
    heads: &Range<usize>,
) -> Result<&'a [f32]> {
    let r = shard_range(layout, held, heads)?;
    block
        .get(r)
        .ok_or_else(|| Error::invalid("block shorter than its layout"))
}

/// Writes `shard` (heads `heads`) into `block` (holding `held`).
pub fn place_shard(
    layout: &KvLayout,
    held: &Range<usize>,
    block: &mut [f32],
    heads: &Range<usize>,
    shard: &[f32],
) -> Result<()> {
    let r = shard_range(layout, held, heads)?;
    let dst = block
        .get_mut(r)
        .ok_or_else(|| Error::invalid("block shorter than its layout"))?;
    if dst.len() != shard.len() {
        return Err(Error::invalid(format!(
            "a shard of {} elements for {} slots",
            shard.len(),
            dst.len()
        )));
    }
    dst.copy_from_slice(shard);
    Ok(())
}

/// Copies heads `heads` of every layer and plane from blocks of `src` (holding
/// `src_held`) to blocks of `dst` (holding `dst_held`), for each `(src id, dst id)`.
/// What a prefill rank that computed all heads does to keep only its shard, and what a
/// re-layout does in one process.
pub fn copy_heads(
    src: &KvCache,
    src_held: &Range<usize>,
    dst: &mut KvCache,
    dst_held: &Range<usize>,
    heads: &Range<usize>,
    pairs: &[(BlockId, BlockId)],
) -> Result<()> {
    let (sl, dl) = (*src.layout(), *dst.layout());
    if (sl.layers, sl.head_dim, sl.block_tokens, sl.dtype)
        != (dl.layers, dl.head_dim, dl.block_tokens, dl.dtype)
    {
        return Err(Error::invalid(format!(
            "copying heads between incompatible layouts {sl:?} and {dl:?}"
        )));
    }
    for layer in 0..sl.layers {
        copy_layer_heads(src, src_held, dst, dst_held, heads, layer, pairs)?;
    }
    Ok(())
}

/// [`copy_heads`] for one layer (both planes): what a TP rank does as each layer of a
/// prefill lands, before posting that layer. Layouts are checked by [`copy_heads`]'s
/// callers; a mismatch here fails on the shard bounds.
pub fn copy_layer_heads(
    src: &KvCache,
    src_held: &Range<usize>,
    dst: &mut KvCache,
    dst_held: &Range<usize>,
    heads: &Range<usize>,
    layer: usize,
    pairs: &[(BlockId, BlockId)],
) -> Result<()> {
    let (sl, dl) = (*src.layout(), *dst.layout());
    for plane in Plane::ALL {
        for &(s, d) in pairs {
            let shard = extract_shard(&sl, src_held, src.block(layer, plane, s)?, heads)?;
            place_shard(&dl, dst_held, dst.block_mut(layer, plane, d)?, heads, shard)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv_cache::KvDtype;

    fn layout(heads: usize) -> KvLayout {
        KvLayout {
            layers: 2,
            heads,
            head_dim: 4,
            block_tokens: 2,
            dtype: KvDtype::F32,
        }
    }

    #[test]
    fn heads_per_rank_follow_the_vllm_rule() {
        assert_eq!(kv_heads_for_rank(8, 2, 1).unwrap(), 4..8);
        assert_eq!(kv_heads_for_rank(8, 1, 0).unwrap(), 0..8);
        assert_eq!(kv_heads_for_rank(2, 8, 5).unwrap(), 1..2);
        assert_eq!(kv_heads_for_rank(8, 16, 15).unwrap(), 7..8);
        assert_eq!(ranks_for_head(2, 8, 1).unwrap(), 4..8);
        assert_eq!(ranks_for_head(8, 2, 5).unwrap(), 1..2);
        for bad in [
            (2, 3, 0),
            (8, 3, 0),
            (8, 12, 0),
            (2, 0, 0),
            (0, 1, 0),
            (8, 2, 2),
        ] {
            assert!(kv_heads_for_rank(bad.0, bad.1, bad.2).is_err(), "{bad:?}");
        }
        assert!(ranks_for_head(2, 2, 2).is_err());
        assert_eq!(TpRank::SINGLE.kv_heads(2).unwrap(), 0..2);
    }

    /// Every rank's shard out of a full cache and back: byte-identical, replicas equal.
    #[test]
    fn shards_round_trip_for_every_tp_size() {
        for kv in [2, 8] {
            let full = layout(kv);
            let all = 0..kv;
            let mut src = KvCache::new(full, 3).unwrap();
            for layer in 0..2 {
                for plane in Plane::ALL {
                    for b in 0..3 {
                        for (i, x) in src
                            .block_mut(layer, plane, b)
                            .unwrap()
                            .iter_mut()
                            .enumerate()
                        {
                            *x = (layer * 100_000 + b as usize * 1000 + i) as f32
                                + if plane == Plane::V { 0.5 } else { 0.0 };
                        }
                    }
                }
            }
            for tp in [1, 2, 4, 8, 16] {
                let mut back = KvCache::new(full, 3).unwrap();
                let mut holders = vec![0; kv];
                let mut first_copy: Vec<Option<Vec<f32>>> = vec![None; kv];
                for rank in 0..tp {
                    let heads = kv_heads_for_rank(kv, tp, rank).unwrap();
                    for h in heads.clone() {
                        holders[h] += 1;
                        assert!(ranks_for_head(kv, tp, h).unwrap().contains(&rank));
                    }
                    // The rank keeps only its shard, in blocks of its own numbering.
                    let mut shard = KvCache::new(layout(heads.len()), 3).unwrap();
                    copy_heads(
                        &src,
                        &all,
                        &mut shard,
                        &heads,
                        &heads,
                        &[(0, 2), (2, 0), (1, 1)],
                    )
                    .unwrap();
                    let got = shard.block(1, Plane::V, 2).unwrap().to_vec();
                    let want =
                        extract_shard(&full, &all, src.block(1, Plane::V, 0).unwrap(), &heads)
                            .unwrap();
                    assert_eq!(got, want);
                    match &first_copy[heads.start] {
                        Some(c) => assert_eq!(c, &got, "replicas of head {} differ", heads.start),
                        None => first_copy[heads.start] = Some(got),
                    }
                    copy_heads(
                        &shard,
                        &heads,
                        &mut back,
                        &all,
                        &heads,
                        &[(2, 0), (0, 2), (1, 1)],
                    )
                    .unwrap();
                }
                assert!(
                    holders.iter().all(|n| *n == (tp / kv).max(1)),
                    "tp {tp} kv {kv}: {holders:?}"
                );
                for layer in 0..2 {
                    for plane in Plane::ALL {
                        for b in 0..3 {
                            assert_eq!(
                                back.block(layer, plane, b).unwrap(),
                                src.block(layer, plane, b).unwrap(),
                                "tp {tp} kv {kv}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn shard_bounds_are_checked() {
        let l = layout(2);
        let mut block = vec![0f32; l.block_elems()];
        assert!(extract_shard(&l, &(0..2), &block, &(1..3)).is_err());
        assert!(
            extract_shard(&l, &(0..1), &block, &(0..1)).is_err(),
            "held must match layout"
        );
        assert!(place_shard(&l, &(0..2), &mut block, &(1..2), &[1.0; 3]).is_err());
        place_shard(&l, &(0..2), &mut block, &(1..2), &[1.0; 8]).unwrap();
        assert_eq!(block.iter().filter(|x| **x == 1.0).count(), 8);
        assert!(block[8..].iter().all(|x| *x == 1.0));
        let other = KvCache::new(
            KvLayout {
                head_dim: 8,
                ..layout(2)
            },
            1,
        )
        .unwrap();
        let mut dst = KvCache::new(layout(2), 1).unwrap();
        assert!(copy_heads(&other, &(0..2), &mut dst, &(0..2), &(0..2), &[(0, 0)]).is_err());
    }

    #[test]
    fn shard_moves_give_each_destination_exactly_its_heads() {
        for kv in [2, 8] {
            for src_tp in [1, 2, 4, 8, 16] {
                for dst_tp in [1, 2, 4, 8, 16] {
                    let moves = shard_moves(kv, src_tp, dst_tp).unwrap();
                    for dst in 0..dst_tp {
                        let mut got: Vec<usize> = moves
                            .iter()
                            .filter(|m| m.dst == dst)
                            .flat_map(|m| {
                                for h in m.heads.clone() {
                                    assert!(kv_heads_for_rank(kv, src_tp, m.src)
                                        .unwrap()
                                        .contains(&h));
                                }
                                m.heads.clone()
                            })
                            .collect();
                        got.sort_unstable();
                        let want: Vec<usize> =
                            kv_heads_for_rank(kv, dst_tp, dst).unwrap().collect();
                        assert_eq!(got, want, "kv {kv} {src_tp}->{dst_tp} rank {dst}");
                    }
                }
            }
        }
        // TP 2 -> 1 with 2 heads: one head from each prefill rank.
        assert_eq!(
            shard_moves(2, 2, 1).unwrap(),
            vec![
                ShardMove {
                    src: 0,
                    dst: 0,
                    heads: 0..1
                },
                ShardMove {
                    src: 1,
                    dst: 0,
                    heads: 1..2
                }
            ]
        );
    }
}
