//! Tensor parallelism over KV heads: which heads a rank holds and which heads go from
//! which rank to which when a TP group hands its KV cache to another.
//!
//! The rule is vLLM's (and `pd_engine::tp`'s): with TP size `t ≤ kv_heads`, rank `r`
//! holds the `kv_heads / t` consecutive heads starting at `r × kv_heads / t`; with
//! `t > kv_heads` every rank holds one head, replicated on `t / kv_heads` consecutive
//! ranks. An MLA latent is one "head" every rank holds.

use std::ops::Range;

use kv_core::{Error, Result};

fn check(kv_heads: u32, tp: u32) -> Result<()> {
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
        Err(Error::invalid_argument(format!(
            "TP size {tp} neither divides nor is a multiple of {kv_heads} KV heads"
        )))
    }
}

/// The global KV heads rank `rank` of a TP group of `tp` holds.
pub fn heads_for_rank(kv_heads: u32, tp: u32, rank: u32) -> Result<Range<u32>> {
    check(kv_heads, tp)?;
    if rank >= tp {
        return Err(Error::invalid_argument(format!(
            "rank {rank} of a TP group of {tp}"
        )));
    }
    Ok(if tp <= kv_heads {
        let per = kv_heads / tp;
        rank * per..(rank + 1) * per
    } else {
        let h = rank / (tp / kv_heads);
        h..h + 1
    })
}

/// The ranks of a TP group of `tp` that hold KV head `head` (several when replicated).
pub fn ranks_for_head(kv_heads: u32, tp: u32, head: u32) -> Result<Range<u32>> {
    check(kv_heads, tp)?;
    if head >= kv_heads {
        return Err(Error::invalid_argument(format!(
            "head {head} of {kv_heads}"
        )));
    }
    Ok(if tp <= kv_heads {
        let r = head / (kv_heads / tp);
        r..r + 1
    } else {
        let rep = tp / kv_heads;
        head * rep..(head + 1) * rep
    })
}

/// One piece of a re-layout between TP groups: `heads` go from rank `src` of the
/// source group to rank `dst` of the destination group. `Clone`, `Send + Sync`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardMove {
    /// Sending rank.
    pub src: u32,
    /// Receiving rank.
    pub dst: u32,
    /// Consecutive global KV heads moved.
    pub heads: Range<u32>,
}

/// The heads rank `src_rank` of a source group of `src_tp` sends to rank `dst_rank` of
/// a destination group of `dst_tp`: the destination's heads whose first holder in the
/// source group is `src_rank` (a replicated head is sent once, by its first holder).
/// Consecutive, possibly empty.
pub fn moved_heads(
    kv_heads: u32,
    src_tp: u32,
    src_rank: u32,
    dst_tp: u32,
    dst_rank: u32,
) -> Result<Range<u32>> {
    heads_for_rank(kv_heads, src_tp, src_rank)?;
    let want = heads_for_rank(kv_heads, dst_tp, dst_rank)?;
    let mut out: Option<Range<u32>> = None;
    for h in want {
        if ranks_for_head(kv_heads, src_tp, h)?.start == src_rank {
            out = Some(match out {
                None => h..h + 1,
                Some(r) => r.start..h + 1,
            });
        }
    }
    Ok(out.unwrap_or(0..0))
}

/// Every move of a re-layout from a group of `src_tp` to a group of `dst_tp`: each
/// destination rank receives exactly its heads, each from one source rank. Agrees with
/// `pd_engine::tp::shard_moves`.
pub fn shard_moves(kv_heads: u32, src_tp: u32, dst_tp: u32) -> Result<Vec<ShardMove>> {
    check(kv_heads, src_tp)?;
    let mut out = Vec::new();
    for dst in 0..dst_tp {
        for src in 0..src_tp {
            let heads = moved_heads(kv_heads, src_tp, src, dst_tp, dst)?;
            if !heads.is_empty() {
                out.push(ShardMove { src, dst, heads });
            }
        }
    }
    out.sort_by_key(|m| (m.dst, m.heads.start));
    Ok(out)
}

/// How many ranks of a destination group of `dst_tp` read from rank `src_rank` of a
/// source group of `src_tp` (the "done" notifications a lease on that rank waits for).
pub fn readers_of(kv_heads: u32, src_tp: u32, src_rank: u32, dst_tp: u32) -> Result<u32> {
    let mut n = 0;
    for dst in 0..dst_tp {
        if !moved_heads(kv_heads, src_tp, src_rank, dst_tp, dst)?.is_empty() {
            n += 1;
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_follow_the_vllm_rule() {
        assert_eq!(heads_for_rank(8, 2, 1).unwrap(), 4..8);
        assert_eq!(heads_for_rank(8, 1, 0).unwrap(), 0..8);
        assert_eq!(heads_for_rank(2, 8, 5).unwrap(), 1..2);
        assert_eq!(heads_for_rank(8, 16, 15).unwrap(), 7..8);
        assert_eq!(heads_for_rank(1, 4, 3).unwrap(), 0..1, "an MLA latent");
        assert_eq!(ranks_for_head(2, 8, 1).unwrap(), 4..8);
        assert_eq!(ranks_for_head(8, 2, 5).unwrap(), 1..2);
        for (kv, tp, rank) in [
            (2, 3, 0),
            (8, 3, 0),
            (8, 12, 0),
            (2, 0, 0),
            (0, 1, 0),
            (8, 2, 2),
        ] {
            assert!(heads_for_rank(kv, tp, rank).is_err(), "{kv} {tp} {rank}");
        }
        assert!(ranks_for_head(2, 2, 2).is_err());
    }

    /// Brute force: every destination head comes from exactly one source rank that
    /// holds it, the first of its holders.
    #[test]
    fn moves_give_each_destination_exactly_its_heads_once() {
        for kv in [1, 2, 8] {
            for src_tp in [1, 2, 4, 8, 16] {
                for dst_tp in [1, 2, 4, 8, 16] {
                    let moves = shard_moves(kv, src_tp, dst_tp).unwrap();
                    for dst in 0..dst_tp {
                        let mut got: Vec<u32> = Vec::new();
                        for m in moves.iter().filter(|m| m.dst == dst) {
                            for h in m.heads.clone() {
                                let holders = ranks_for_head(kv, src_tp, h).unwrap();
                                assert_eq!(holders.start, m.src, "first holder sends");
                                got.push(h);
                            }
                        }
                        let want: Vec<u32> = heads_for_rank(kv, dst_tp, dst).unwrap().collect();
                        assert_eq!(got, want, "kv {kv} {src_tp}->{dst_tp} rank {dst}");
                    }
                }
            }
        }
        // TP 2 -> 1 with 2 heads: one head from each prefill rank (as pd-engine says).
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
        // 16 -> 2 with 8 heads: replicas (odd source ranks) send nothing.
        assert_eq!(moved_heads(8, 16, 1, 2, 0).unwrap(), 0..0);
        assert_eq!(moved_heads(8, 16, 6, 2, 0).unwrap(), 3..4);
        assert_eq!(moved_heads(8, 16, 8, 2, 1).unwrap(), 4..5);
        assert_eq!(
            readers_of(8, 2, 1, 8).unwrap(),
            4,
            "each of 4 heads to its rank"
        );
        assert_eq!(
            readers_of(2, 1, 0, 8).unwrap(),
            8,
            "replicated on every reader"
        );
        assert_eq!(
            readers_of(8, 16, 1, 2).unwrap(),
            0,
            "a replica is read by nobody"
        );
    }
}
