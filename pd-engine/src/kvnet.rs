//! The engine's KV cache on kvx's data plane: its layout in kv-agent's terms
//! ([`agent_layout`]), its planes registered as engine-owned memory
//! ([`register_cache`]), and its blocks as kv-tier payloads ([`block_payload`],
//! [`restore_block`]).

use kv_agent::layout::{KvDtype as AgentDtype, KvLayout as AgentLayout};
use kv_agent::{Agent, RegisterOptions, Registration};
use kv_core::MemKind;

use crate::error::{Error, Result};
use crate::kv_cache::{BlockId, KvCache, KvDtype, Plane};
use crate::tp::TpRank;

/// kv-agent's description of `cache`, held by `tp` of a model with `model_kv_heads` KV
/// heads: per-layer K and V bases, HND blocks, the heads the rank holds.
pub fn agent_layout(cache: &KvCache, model_kv_heads: usize, tp: TpRank) -> Result<AgentLayout> {
    let l = cache.layout();
    let dtype = match l.dtype {
        KvDtype::F32 => AgentDtype::F32,
    };
    let mut a = AgentLayout::for_rank(
        l.layers as u32,
        model_kv_heads as u32,
        l.head_dim as u32,
        dtype,
        l.block_tokens as u32,
        cache.num_blocks() as u64,
        tp.size as u32,
        tp.rank as u32,
    )?;
    if a.heads_held as usize != l.heads {
        return Err(Error::invalid(format!(
            "a cache of {} heads for rank {} of TP {} ({} heads of {model_kv_heads})",
            l.heads, tp.rank, tp.size, a.heads_held
        )));
    }
    // Index `layer × 2 + plane`, K first: the order of `plane_ranges`.
    a.bases = cache.plane_ranges().iter().map(|r| r.addr).collect();
    a.validate()?;
    Ok(a)
}

/// Registers every plane of `cache` with `agent` as engine-owned DRAM and publishes its
/// layout (see [`agent_layout`]). Returns the registrations and the layout.
///
/// # Safety
///
/// `cache` must stay alive, and its planes must not be replaced (e.g. by assigning a new
/// cache through `Engine::cache_mut`), until every returned [`Registration`] is dropped
/// and every transfer naming them finished.
pub unsafe fn register_cache(
    agent: &Agent,
    cache: &KvCache,
    model_kv_heads: usize,
    tp: TpRank,
) -> Result<(Vec<Registration>, AgentLayout)> {
    let layout = agent_layout(cache, model_kv_heads, tp)?;
    let mut regs = Vec::with_capacity(layout.bases.len());
    for r in cache.plane_ranges() {
        // SAFETY: the range is one of `cache`'s planes (a HostBuffer at a fixed address
        // for the cache's life); the caller keeps the cache alive and unreplaced until
        // the registrations and their transfers are gone.
        let reg = unsafe {
            agent.register_external(r.addr, r.len, MemKind::Dram, 0, &RegisterOptions::default())
        }?;
        regs.push(reg);
    }
    agent.set_kv_layout(&layout)?;
    Ok((regs, layout))
}

/// Block `id` of every layer and plane of `cache`, back to back (layer by layer, K
/// before V): one kv-tier payload.
pub fn block_payload(cache: &KvCache, id: BlockId) -> Result<Vec<u8>> {
    let l = cache.layout();
    let mut out = Vec::with_capacity(l.layers * 2 * l.block_bytes());
    for layer in 0..l.layers {
        for plane in Plane::ALL {
            out.extend_from_slice(cache.block_bytes(layer, plane, id)?);
        }
    }
    Ok(out)
}

/// Writes a payload of [`block_payload`]'s shape into block `id` of `cache`.
pub fn restore_block(cache: &mut KvCache, id: BlockId, payload: &[u8]) -> Result<()> {
    let l = *cache.layout();
    let n = l.block_bytes();
    if payload.len() != l.layers * 2 * n {
        return Err(Error::invalid(format!(
            "a {}-byte block payload for a {}-byte block",
            payload.len(),
            l.layers * 2 * n
        )));
    }
    let floats: &[f32] = bytemuck::try_cast_slice(payload)
        .map_err(|e| Error::invalid(format!("block payload view: {e}")))?;
    let per = n / l.dtype.size();
    for layer in 0..l.layers {
        for plane in Plane::ALL {
            let at = (layer * 2 + usize::from(plane == Plane::V)) * per;
            cache
                .block_mut(layer, plane, id)?
                .copy_from_slice(&floats[at..at + per]);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv_cache::KvLayout;

    #[test]
    fn payload_round_trip_and_layout_bases() {
        let l = KvLayout {
            layers: 2,
            heads: 2,
            head_dim: 4,
            block_tokens: 4,
            dtype: KvDtype::F32,
        };
        let mut c = KvCache::new(l, 3).unwrap();
        for layer in 0..2 {
            for plane in Plane::ALL {
                for (i, x) in c.block_mut(layer, plane, 1).unwrap().iter_mut().enumerate() {
                    *x = (layer * 1000 + i) as f32 + if plane == Plane::V { 0.5 } else { 0.0 };
                }
            }
        }
        let p = block_payload(&c, 1).unwrap();
        let mut d = KvCache::new(l, 3).unwrap();
        restore_block(&mut d, 2, &p).unwrap();
        for layer in 0..2 {
            for plane in Plane::ALL {
                assert_eq!(
                    d.block(layer, plane, 2).unwrap(),
                    c.block(layer, plane, 1).unwrap()
                );
            }
        }
        assert!(restore_block(&mut d, 2, &p[4..]).is_err());
        let a = agent_layout(&c, 2, TpRank::SINGLE).unwrap();
        assert_eq!(a.bases.len(), 4);
        assert_eq!(a.bases[3], c.plane_ranges()[3].addr);
        assert!(
            agent_layout(&c, 4, TpRank { size: 2, rank: 0 }).is_ok(),
            "2 of 4 heads"
        );
        assert!(agent_layout(&c, 2, TpRank { size: 2, rank: 0 }).is_err());
    }
}
