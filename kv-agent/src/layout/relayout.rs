//! `Relayout`: the descriptor lists that move one TP rank's KV blocks into another
//! rank's blocks when the two differ in TP size, block size or element order — each
//! destination rank receives exactly its heads, byte for byte in its own layout.
//!
//! The unit of a transfer is an *item*: the moved heads of one plane for a run of
//! `g = gcd(source block, destination block)` tokens (one item per head when one side
//! is HND and the other NHD, so both sides list the bytes in the same order). Both
//! sides' items are [`ItemGrid`]s, so a request is two index arrays computed from the
//! block ids, and a prepared list of a hundred thousand blocks stores no descriptors.

use std::ops::Range;

use kv_core::{Descriptor, DescriptorList, Error, Result};

use super::grid::ItemGrid;
use super::kv::{HeadOrder, KvLayout};
use super::tp;

/// Which side of a [`Relayout`]. `Copy`, `Send + Sync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// The rank that holds the KV (the prefill side).
    Source,
    /// The rank that receives it (the decode side).
    Destination,
}

/// How the KV of one source rank lands in one destination rank. `Clone`, `Send + Sync`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relayout {
    src: KvLayout,
    dst: KvLayout,
    heads: Range<u32>,
    chunk_tokens: u32,
    per_head: bool,
    max_payload_tokens: u32,
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

impl Relayout {
    /// The re-layout from `src` (a rank holding KV) to `dst` (a rank receiving it).
    /// Refuses incompatible models ([`KvLayout::check_compatible`]); the heads that move
    /// may be none (a replica, or a rank the destination does not need).
    pub fn new(src: &KvLayout, dst: &KvLayout) -> Result<Relayout> {
        src.validate()?;
        dst.validate()?;
        src.check_compatible(dst)?;
        let heads = tp::moved_heads(
            src.kv_heads,
            src.tp_size,
            src.tp_rank,
            dst.tp_size,
            dst.tp_rank,
        )?;
        Ok(Relayout {
            per_head: src.order != dst.order && heads.len() > 1,
            chunk_tokens: gcd(src.block_tokens, dst.block_tokens),
            heads,
            src: src.clone(),
            dst: dst.clone(),
            max_payload_tokens: 128,
        })
    }

    /// Caps how many tokens adjacent items are coalesced into in [`Relayout::lists`]
    /// (default 128; 0: no cap).
    pub fn with_max_payload_tokens(mut self, tokens: u32) -> Relayout {
        self.max_payload_tokens = tokens;
        self
    }

    /// The global KV heads that move (empty: these two ranks exchange nothing).
    pub fn heads(&self) -> Range<u32> {
        self.heads.clone()
    }

    /// True when nothing moves between these two ranks.
    pub fn is_empty(&self) -> bool {
        self.heads.is_empty()
    }

    /// Tokens per item: the gcd of the two block sizes.
    pub fn chunk_tokens(&self) -> u32 {
        self.chunk_tokens
    }

    /// The layout of `side`.
    pub fn layout(&self, side: Side) -> &KvLayout {
        match side {
            Side::Source => &self.src,
            Side::Destination => &self.dst,
        }
    }

    /// Bytes one token of the moved heads carries per plane.
    fn token_bytes(&self) -> u64 {
        self.heads.len() as u64 * self.src.head_bytes()
    }

    /// Items per chunk of tokens and plane.
    fn items_per_chunk(&self) -> u64 {
        if self.per_head {
            self.heads.len() as u64
        } else {
            1
        }
    }

    /// The items of `layer` on `side`, every block of it. Item indices fit in a `u32`.
    pub fn grid(&self, side: Side, layer: u32) -> Result<ItemGrid> {
        if self.is_empty() {
            return Err(Error::invalid_argument(format!(
                "rank {} of TP {} sends nothing to rank {} of TP {}",
                self.src.tp_rank, self.src.tp_size, self.dst.tp_rank, self.dst.tp_size
            )));
        }
        let l = self.layout(side);
        let g = self.chunk_tokens as u64;
        let hb = l.head_bytes();
        let (n, held) = (self.heads.len() as u64, l.heads_held as u64);
        let first = (self.heads.start - l.first_head) as u64;
        let bt = l.block_tokens as u64;
        // (offset of the first moved head, chunk stride, head stride, inner run).
        let (offset, chunk_stride, head_stride, inner) = match (l.order, self.per_head) {
            (HeadOrder::Hnd, true) => (first * bt * hb, g * hb, bt * hb, (1, g * hb, g * hb)),
            (HeadOrder::Hnd, false) => (first * bt * hb, g * hb, 0, (n, bt * hb, g * hb)),
            (HeadOrder::Nhd, true) => (first * hb, g * held * hb, hb, (g, held * hb, hb)),
            (HeadOrder::Nhd, false) => (first * hb, g * held * hb, 0, (g, held * hb, n * hb)),
        };
        let plane_bases = (0..l.planes())
            .map(|p| Ok(l.plane_base(layer, p)? + offset))
            .collect::<Result<Vec<u64>>>()?;
        let grid = ItemGrid {
            plane_bases,
            blocks: l.blocks,
            block_stride: l.block_stride(),
            chunks: bt / g,
            chunk_stride,
            heads: self.items_per_chunk(),
            head_stride,
            inner_count: inner.0,
            inner_stride: inner.1,
            inner_len: inner.2,
            device: l.device,
        };
        grid.validate()?;
        if grid.len() > u32::MAX as u64 + 1 {
            return Err(Error::invalid_argument(format!(
                "{} items per layer do not fit u32 indices; use fewer blocks per list",
                grid.len()
            )));
        }
        Ok(grid)
    }

    /// The item indices of a request, source and destination, in the same order (item
    /// `k` of one side carries the bytes of item `k` of the other): `tokens` tokens held
    /// in `src_blocks` (block size of the source) land in `dst_blocks`. Each list needs
    /// at least `tokens / block_tokens` blocks (rounded up); later ones are not used.
    /// The same indices serve every layer.
    pub fn items(
        &self,
        src_blocks: &[u32],
        dst_blocks: &[u32],
        tokens: u64,
    ) -> Result<(Vec<u32>, Vec<u32>)> {
        let (s, d) = (&self.src, &self.dst);
        for (l, ids, what) in [(s, src_blocks, "source"), (d, dst_blocks, "destination")] {
            let need = tokens.div_ceil(l.block_tokens as u64);
            if (ids.len() as u64) < need {
                return Err(Error::invalid_argument(format!(
                    "{tokens} tokens need {need} {what} blocks of {}; got {}",
                    l.block_tokens,
                    ids.len()
                )));
            }
            if let Some(b) = ids.iter().find(|b| **b as u64 >= l.blocks) {
                return Err(Error::OutOfBounds(format!(
                    "{what} block {b} of {}",
                    l.blocks
                )));
            }
        }
        let g = self.chunk_tokens as u64;
        let hm = self.items_per_chunk();
        let chunks = tokens.div_ceil(g);
        let cap = (s.planes() as u64 * chunks * hm) as usize;
        let (mut si, mut di) = (Vec::with_capacity(cap), Vec::with_capacity(cap));
        let index = |l: &KvLayout, blocks: &[u32], p: u64, t: u64, h: u64| {
            let bt = l.block_tokens as u64;
            let block = blocks[(t / bt) as usize] as u64;
            let chunk = (t % bt) / g;
            (((p * l.blocks + block) * (bt / g) + chunk) * hm + h) as u32
        };
        for p in 0..s.planes() as u64 {
            for k in 0..chunks {
                for h in 0..hm {
                    si.push(index(s, src_blocks, p, k * g, h));
                    di.push(index(d, dst_blocks, p, k * g, h));
                }
            }
        }
        Ok((si, di))
    }

    /// The source and destination lists of one layer for a request (what a
    /// `TransferSpec` carries), with adjacent items coalesced into payloads of at most
    /// the configured number of tokens.
    pub fn lists(
        &self,
        layer: u32,
        src_blocks: &[u32],
        dst_blocks: &[u32],
        tokens: u64,
    ) -> Result<(DescriptorList, DescriptorList)> {
        let (si, di) = self.items(src_blocks, dst_blocks, tokens)?;
        let cap = match self.max_payload_tokens {
            0 => u64::MAX,
            t => t as u64 * self.token_bytes(),
        };
        Ok((
            coalesce(&self.grid(Side::Source, layer)?.select(&si)?, cap)?,
            coalesce(&self.grid(Side::Destination, layer)?.select(&di)?, cap)?,
        ))
    }
}

/// `list` with adjacent descriptors merged while the merged one stays within `cap`
/// bytes; runs that do not touch stay as they are.
fn coalesce(list: &DescriptorList, cap: u64) -> Result<DescriptorList> {
    let mut out = DescriptorList::new();
    let mut pending: Option<Descriptor> = None;
    for d in list.iter() {
        match &mut pending {
            Some(p) if p.end() == Some(d.addr) && p.device == d.device && p.len + d.len <= cap => {
                p.len += d.len
            }
            _ => {
                if let Some(p) = pending.replace(d) {
                    out.push(p)?;
                }
            }
        }
    }
    if let Some(p) = pending {
        out.push(p)?;
    }
    Ok(out)
}

// Byte-exact tests against the reference re-layout: tests/relayout.rs.
