//! The paged KV cache the engine owns, its block allocator and the [`KvStore`] interface
//! the model's attention reads and writes through.
//!
//! Layout, as vLLM/SGLang hold it on a GPU: one allocation per layer and plane (K, V),
//! each an array of blocks of `block_tokens` tokens, HND inside a block
//! (`[heads][block_tokens][head_dim]`). Every allocation is a memfd-backed
//! [`kv_mem::HostBuffer`] at an address that never changes while the cache lives, so
//! its `(addr, len)` can be registered with kv-agent as engine-owned memory.

use std::ops::Range;

use kv_mem::HostBuffer;

use crate::error::{Error, Result};

/// Index of a block inside every per-layer plane (block `b` of layer 3's K and of layer
/// 5's V hold the same tokens).
pub type BlockId = u32;

/// Element type of the cache. The one place the element size lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KvDtype {
    /// 32-bit IEEE float, what the model computes in (no conversion on store or load).
    F32,
}

impl KvDtype {
    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            KvDtype::F32 => 4,
        }
    }

    /// Short name, for model identity strings.
    pub const fn name(self) -> &'static str {
        match self {
            KvDtype::F32 => "f32",
        }
    }
}

/// Which of a layer's two tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Plane {
    /// Keys (after RoPE).
    K,
    /// Values.
    V,
}

impl Plane {
    /// Both planes, K first.
    pub const ALL: [Plane; 2] = [Plane::K, Plane::V];

    fn index(self) -> usize {
        match self {
            Plane::K => 0,
            Plane::V => 1,
        }
    }
}

/// Shape of a paged cache: what one block of one plane holds. `Copy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KvLayout {
    /// Decoder layers (one K and one V allocation each).
    pub layers: usize,
    /// KV heads held (all of the model's, or one tensor-parallel rank's shard).
    pub heads: usize,
    /// Elements per head per token.
    pub head_dim: usize,
    /// Tokens per block.
    pub block_tokens: usize,
    /// Element type.
    pub dtype: KvDtype,
}

impl KvLayout {
    /// Elements of one head's slab in a block (`block_tokens × head_dim`).
    pub fn head_elems(&self) -> usize {
        self.block_tokens * self.head_dim
    }

    /// Elements in one block of one plane.
    pub fn block_elems(&self) -> usize {
        self.heads * self.head_elems()
    }

    /// Bytes in one block of one plane.
    pub fn block_bytes(&self) -> usize {
        self.block_elems() * self.dtype.size()
    }

    /// Blocks needed to hold `tokens` tokens.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_tokens)
    }

    /// KV bytes per token over all layers and both planes.
    pub fn bytes_per_token(&self) -> usize {
        2 * self.layers * self.heads * self.head_dim * self.dtype.size()
    }

    fn validate(&self) -> Result<()> {
        if self.layers == 0 || self.heads == 0 || self.head_dim == 0 || self.block_tokens == 0 {
            return Err(Error::invalid(format!("empty KV layout {self:?}")));
        }
        Ok(())
    }
}

/// Where one plane of one layer lives: what kv-agent registers. `Copy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlaneRange {
    /// The layer.
    pub layer: usize,
    /// K or V.
    pub plane: Plane,
    /// Start address (page-aligned, stable for the cache's lifetime).
    pub addr: u64,
    /// Length in bytes (`num_blocks × block_bytes`).
    pub len: u64,
}

/// The engine's paged KV memory: `layers × 2` memfd-backed allocations of `num_blocks`
/// blocks each. `Send + Sync` (its buffers are); mutation needs `&mut`.
#[derive(Debug)]
pub struct KvCache {
    layout: KvLayout,
    num_blocks: usize,
    // Index `layer * 2 + plane`.
    planes: Vec<HostBuffer>,
}

impl KvCache {
    /// A zeroed cache of `num_blocks` blocks per plane.
    pub fn new(layout: KvLayout, num_blocks: usize) -> Result<KvCache> {
        layout.validate()?;
        if num_blocks == 0 || num_blocks > BlockId::MAX as usize {
            return Err(Error::invalid(format!("{num_blocks} KV blocks")));
        }
        let len = num_blocks
            .checked_mul(layout.block_bytes())
            .ok_or_else(|| Error::invalid("KV plane size overflows"))?;
        let planes = (0..layout.layers * 2)
            .map(|_| HostBuffer::shared(len))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(KvCache {
            layout,
            num_blocks,
            planes,
        })
    }

    /// The cache's shape.
    pub fn layout(&self) -> &KvLayout {
        &self.layout
    }

    /// Blocks per plane.
    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// The buffer behind one plane (its memfd, for same-host registration).
    pub fn plane_memory(&self, layer: usize, plane: Plane) -> Result<&HostBuffer> {
        self.planes
            .get(self.plane_index(layer, plane)?)
            .ok_or_else(|| Error::invalid("plane index"))
    }

    /// Every plane's `(addr, len)`, layer by layer, K before V.
    pub fn plane_ranges(&self) -> Vec<PlaneRange> {
        (0..self.layout.layers)
            .flat_map(|layer| Plane::ALL.map(|plane| (layer, plane)))
            .map(|(layer, plane)| {
                let d = self.planes[layer * 2 + plane.index()].descriptor();
                PlaneRange {
                    layer,
                    plane,
                    addr: d.addr,
                    len: d.len,
                }
            })
            .collect()
    }

    /// Byte offset of block `id` inside each plane.
    pub fn block_offset(&self, id: BlockId) -> u64 {
        id as u64 * self.layout.block_bytes() as u64
    }

    /// Block `id` of one plane, as elements `[heads][block_tokens][head_dim]`.
    pub fn block(&self, layer: usize, plane: Plane, id: BlockId) -> Result<&[f32]> {
        let r = self.block_range(id)?;
        let buf = &self.planes[self.plane_index(layer, plane)?];
        as_f32(&buf.as_slice()[r])
    }

    /// Block `id` of one plane, for writing.
    pub fn block_mut(&mut self, layer: usize, plane: Plane, id: BlockId) -> Result<&mut [f32]> {
        let r = self.block_range(id)?;
        let i = self.plane_index(layer, plane)?;
        as_f32_mut(&mut self.planes[i].as_mut_slice()[r])
    }

    /// Block `id` of one plane as raw bytes (what a transfer or a tier store moves).
    pub fn block_bytes(&self, layer: usize, plane: Plane, id: BlockId) -> Result<&[u8]> {
        let r = self.block_range(id)?;
        Ok(&self.planes[self.plane_index(layer, plane)?].as_slice()[r])
    }

    /// A [`KvStore`] over the blocks of one sequence: position `p` lives in block
    /// `table[p / block_tokens]` at slot `p % block_tokens`.
    pub fn paged<'a>(&'a mut self, table: &'a [BlockId]) -> PagedKv<'a> {
        PagedKv { cache: self, table }
    }

    fn plane_index(&self, layer: usize, plane: Plane) -> Result<usize> {
        if layer >= self.layout.layers {
            return Err(Error::invalid(format!(
                "layer {layer} of a {}-layer cache",
                self.layout.layers
            )));
        }
        Ok(layer * 2 + plane.index())
    }

    fn block_range(&self, id: BlockId) -> Result<Range<usize>> {
        if id as usize >= self.num_blocks {
            return Err(Error::invalid(format!(
                "block {id} of a {}-block cache",
                self.num_blocks
            )));
        }
        let b = self.layout.block_bytes();
        Ok(id as usize * b..(id as usize + 1) * b)
    }
}

fn as_f32(b: &[u8]) -> Result<&[f32]> {
    bytemuck::try_cast_slice(b).map_err(|e| Error::invalid(format!("KV block view: {e}")))
}

fn as_f32_mut(b: &mut [u8]) -> Result<&mut [f32]> {
    bytemuck::try_cast_slice_mut(b).map_err(|e| Error::invalid(format!("KV block view: {e}")))
}

/// Where attention keeps K and V: the model writes each new token's K/V through it and
/// reads the whole context back. Element layout of both directions: `[heads][n][head_dim]`.
pub trait KvStore {
    /// Stores K and V of the `n` tokens at positions `start..start + n` of `layer`.
    fn write(&mut self, layer: usize, start: usize, n: usize, k: &[f32], v: &[f32]) -> Result<()>;
    /// K and V of positions `0..len` of `layer`.
    fn read(&self, layer: usize, len: usize) -> Result<(Vec<f32>, Vec<f32>)>;
}

/// One sequence's view of a [`KvCache`] through its block table.
#[derive(Debug)]
pub struct PagedKv<'a> {
    cache: &'a mut KvCache,
    table: &'a [BlockId],
}

impl PagedKv<'_> {
    /// The runs `(block, first slot, first position, tokens)` that `start..start + n`
    /// falls into, checking the table covers them.
    fn runs(&self, start: usize, n: usize) -> Result<Vec<(BlockId, usize, usize, usize)>> {
        let bt = self.cache.layout.block_tokens;
        let end = start + n;
        if end > self.table.len() * bt {
            return Err(Error::invalid(format!(
                "positions up to {end} need {} blocks, the table has {}",
                end.div_ceil(bt),
                self.table.len()
            )));
        }
        let mut out = Vec::with_capacity(n / bt + 2);
        let mut p = start;
        while p < end {
            let slot = p % bt;
            let take = (bt - slot).min(end - p);
            out.push((self.table[p / bt], slot, p - start, take));
            p += take;
        }
        Ok(out)
    }
}

impl KvStore for PagedKv<'_> {
    fn write(&mut self, layer: usize, start: usize, n: usize, k: &[f32], v: &[f32]) -> Result<()> {
        let l = self.cache.layout;
        check_len(&l, n, k, v)?;
        for (id, slot, off, take) in self.runs(start, n)? {
            for (plane, src) in [(Plane::K, k), (Plane::V, v)] {
                let block = self.cache.block_mut(layer, plane, id)?;
                for h in 0..l.heads {
                    let dst = (h * l.block_tokens + slot) * l.head_dim;
                    let s = (h * n + off) * l.head_dim;
                    block[dst..dst + take * l.head_dim]
                        .copy_from_slice(&src[s..s + take * l.head_dim]);
                }
            }
        }
        Ok(())
    }

    fn read(&self, layer: usize, len: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        let l = self.cache.layout;
        let mut k = vec![0f32; l.heads * len * l.head_dim];
        let mut v = vec![0f32; k.len()];
        for (id, slot, off, take) in self.runs(0, len)? {
            for (plane, dst) in [(Plane::K, &mut k), (Plane::V, &mut v)] {
                let block = self.cache.block(layer, plane, id)?;
                for h in 0..l.heads {
                    let s = (h * l.block_tokens + slot) * l.head_dim;
                    let d = (h * len + off) * l.head_dim;
                    dst[d..d + take * l.head_dim].copy_from_slice(&block[s..s + take * l.head_dim]);
                }
            }
        }
        Ok((k, v))
    }
}

fn check_len(l: &KvLayout, n: usize, k: &[f32], v: &[f32]) -> Result<()> {
    let want = l.heads * n * l.head_dim;
    if k.len() != want || v.len() != want {
        return Err(Error::invalid(format!(
            "K/V of {n} tokens must have {want} elements, got {} and {}",
            k.len(),
            v.len()
        )));
    }
    Ok(())
}

/// A contiguous, unpaged store (token-major inside, `[pos][heads][head_dim]`): the
/// reference that paged attention must match bit for bit.
#[derive(Debug, Clone)]
pub struct DenseKv {
    layout: KvLayout,
    // Per layer: K then V.
    data: Vec<[Vec<f32>; 2]>,
}

impl DenseKv {
    /// An empty store for `layout` (its block size is ignored).
    pub fn new(layout: KvLayout) -> Self {
        DenseKv {
            layout,
            data: vec![[Vec::new(), Vec::new()]; layout.layers],
        }
    }

    /// Tokens stored in `layer`.
    pub fn len(&self, layer: usize) -> usize {
        self.data.get(layer).map_or(0, |d| {
            d[0].len() / (self.layout.heads * self.layout.head_dim)
        })
    }

    /// True when nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.len(0) == 0
    }
}

impl KvStore for DenseKv {
    fn write(&mut self, layer: usize, start: usize, n: usize, k: &[f32], v: &[f32]) -> Result<()> {
        let l = self.layout;
        check_len(&l, n, k, v)?;
        let tok = l.heads * l.head_dim;
        let planes = self
            .data
            .get_mut(layer)
            .ok_or_else(|| Error::invalid(format!("layer {layer}")))?;
        for (dst, src) in planes.iter_mut().zip([k, v]) {
            if dst.len() < (start + n) * tok {
                dst.resize((start + n) * tok, 0.0);
            }
            for h in 0..l.heads {
                for i in 0..n {
                    let s = (h * n + i) * l.head_dim;
                    let d = (start + i) * tok + h * l.head_dim;
                    dst[d..d + l.head_dim].copy_from_slice(&src[s..s + l.head_dim]);
                }
            }
        }
        Ok(())
    }

    fn read(&self, layer: usize, len: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        let l = self.layout;
        if len > self.len(layer) {
            return Err(Error::invalid(format!(
                "reading {len} tokens of layer {layer}, {} stored",
                self.len(layer)
            )));
        }
        let tok = l.heads * l.head_dim;
        let mut out = [Vec::new(), Vec::new()];
        for (o, src) in out.iter_mut().zip(&self.data[layer]) {
            o.reserve(len * tok);
            for h in 0..l.heads {
                for p in 0..len {
                    let s = p * tok + h * l.head_dim;
                    o.extend_from_slice(&src[s..s + l.head_dim]);
                }
            }
        }
        let [k, v] = out;
        Ok((k, v))
    }
}

/// Hands out block ids from a free list. Allocation is all-or-nothing and
/// deterministic (lowest ids first on a fresh pool); freeing checks every id.
/// `Send + Sync`; not shared (mutation needs `&mut`).
#[derive(Debug, Clone)]
pub struct BlockAllocator {
    free: Vec<BlockId>,
    used: Vec<bool>,
}

impl BlockAllocator {
    /// A pool of `num_blocks` free blocks.
    pub fn new(num_blocks: usize) -> Self {
        BlockAllocator {
            free: (0..num_blocks as BlockId).rev().collect(),
            used: vec![false; num_blocks],
        }
    }

    /// Blocks in the pool.
    pub fn total(&self) -> usize {
        self.used.len()
    }

    /// Blocks free now.
    pub fn free_count(&self) -> usize {
        self.free.len()
    }

    /// `n` blocks, or [`Error::OutOfBlocks`] (and nothing taken).
    pub fn alloc(&mut self, n: usize) -> Result<Vec<BlockId>> {
        if n > self.free.len() {
            return Err(Error::OutOfBlocks {
                needed: n,
                free: self.free.len(),
            });
        }
        let out: Vec<BlockId> = (0..n).filter_map(|_| self.free.pop()).collect();
        for &b in &out {
            self.used[b as usize] = true;
        }
        Ok(out)
    }

    /// Returns `blocks` to the pool; refuses (freeing none) an id that is out of range,
    /// not allocated, or listed twice.
    pub fn free(&mut self, blocks: &[BlockId]) -> Result<()> {
        let mut seen = std::collections::HashSet::with_capacity(blocks.len());
        for &b in blocks {
            if !self.used.get(b as usize).copied().unwrap_or(false) || !seen.insert(b) {
                return Err(Error::invalid(format!(
                    "freeing block {b}, which is not allocated"
                )));
            }
        }
        for &b in blocks.iter().rev() {
            self.used[b as usize] = false;
            self.free.push(b);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> KvLayout {
        KvLayout {
            layers: 2,
            heads: 3,
            head_dim: 4,
            block_tokens: 4,
            dtype: KvDtype::F32,
        }
    }

    /// K/V of `n` tokens from `start`, each element naming (head, pos, dim).
    fn kv(l: &KvLayout, start: usize, n: usize, salt: f32) -> (Vec<f32>, Vec<f32>) {
        let mut k = Vec::new();
        for h in 0..l.heads {
            for i in 0..n {
                for d in 0..l.head_dim {
                    k.push(salt + (h * 10_000 + (start + i) * 10 + d) as f32);
                }
            }
        }
        let v = k.iter().map(|x| -x).collect();
        (k, v)
    }

    #[test]
    fn layout_arithmetic() {
        let l = layout();
        assert_eq!(l.block_elems(), 48);
        assert_eq!(l.block_bytes(), 192);
        assert_eq!(l.blocks_for(0), 0);
        assert_eq!(l.blocks_for(4), 1);
        assert_eq!(l.blocks_for(5), 2);
        assert_eq!(l.bytes_per_token(), 2 * 2 * 3 * 4 * 4);
    }

    #[test]
    fn planes_are_separate_stable_and_shared() {
        let c = KvCache::new(layout(), 10).unwrap();
        let r = c.plane_ranges();
        assert_eq!(r.len(), 4);
        assert_eq!((r[1].layer, r[1].plane), (0, Plane::V));
        for p in &r {
            assert_eq!(p.len, 10 * 192);
            assert_eq!(p.addr % 4096, 0);
            let d = kv_core::Descriptor::new(p.addr, p.len, 0);
            assert!(kv_mem::shared_backing(&d).is_some(), "memfd-backed");
        }
        let mut addrs: Vec<u64> = r.iter().map(|p| p.addr).collect();
        addrs.dedup();
        assert_eq!(addrs.len(), 4);
        let moved = c; // moving the cache moves no memory
        assert_eq!(moved.plane_ranges(), r);
        assert!(KvCache::new(layout(), 0).is_err());
    }

    #[test]
    fn paged_writes_land_hnd_in_the_table_blocks() {
        let l = layout();
        let mut c = KvCache::new(l, 8).unwrap();
        let table = [5, 2, 7];
        let (k, v) = kv(&l, 0, 6, 0.0);
        c.paged(&table).write(1, 0, 6, &k, &v).unwrap();
        // Position 5 is block table[1] = 2, slot 1; head 2's slab starts at 2*4*4.
        let b = c.block(1, Plane::K, 2).unwrap();
        let at = (2 * 4 + 1) * 4;
        assert_eq!(&b[at..at + 4], &[20_050.0, 20_051.0, 20_052.0, 20_053.0]);
        assert_eq!(c.block(1, Plane::V, 5).unwrap()[0], -0.0);
        assert_eq!(c.block(1, Plane::V, 5).unwrap()[5], -11.0, "slot 1, dim 1");
        // Layer 0 untouched.
        assert!(c.block(0, Plane::K, 5).unwrap().iter().all(|x| *x == 0.0));
        // Past the table is refused.
        assert!(c
            .paged(&table)
            .write(1, 10, 3, &kv(&l, 10, 3, 0.0).0, &kv(&l, 10, 3, 0.0).1)
            .is_err());
        assert!(c.block(0, Plane::K, 8).is_err());
        assert!(c.block(2, Plane::K, 0).is_err());
    }

    #[test]
    fn paged_and_dense_read_back_the_same_bits() {
        let l = layout();
        let mut c = KvCache::new(l, 8).unwrap();
        let mut d = DenseKv::new(l);
        let table = [3, 0, 6, 1];
        // Writes in uneven chunks that straddle blocks.
        for (start, n) in [(0, 3), (3, 1), (4, 6), (10, 1), (11, 2)] {
            let (k, v) = kv(&l, start, n, 0.5);
            c.paged(&table).write(0, start, n, &k, &v).unwrap();
            d.write(0, start, n, &k, &v).unwrap();
        }
        for len in [1, 4, 5, 13] {
            let p = c.paged(&table).read(0, len).unwrap();
            assert_eq!(p, d.read(0, len).unwrap());
            assert_eq!(p.0, kv(&l, 0, len, 0.5).0);
        }
        assert!(d.read(0, 14).is_err());
        assert!(c.paged(&table).read(0, 17).is_err());
    }

    #[test]
    fn allocator_is_all_or_nothing_and_checks_frees() {
        let mut a = BlockAllocator::new(4);
        assert_eq!(a.alloc(3).unwrap(), vec![0, 1, 2]);
        assert!(matches!(
            a.alloc(2),
            Err(Error::OutOfBlocks { needed: 2, free: 1 })
        ));
        assert_eq!(a.free_count(), 1);
        assert!(a.free(&[1, 1]).is_err(), "listed twice");
        assert!(a.free(&[3]).is_err(), "never allocated");
        assert!(a.free(&[9]).is_err(), "out of range");
        assert_eq!(a.free_count(), 1, "a refused free frees nothing");
        a.free(&[2, 0]).unwrap();
        assert!(a.free(&[0]).is_err(), "double free");
        assert_eq!(a.free_count(), 3);
        let again = a.alloc(3).unwrap();
        assert_eq!(again.len(), 3);
        assert!(!again.contains(&1));
        assert_eq!(a.total(), 4);
    }

    #[test]
    fn is_send_sync() {
        fn check<T: Send + Sync>() {}
        check::<KvCache>();
        check::<BlockAllocator>();
        check::<DenseKv>();
    }
}
