//! `KvLayout`: where an engine's paged KV cache lives and how a block is laid out —
//! per-layer (and per-plane) allocations, HND or NHD inside a block, K and V separate
//! or interleaved per block (FlashInfer's blocks-first), block size, dtype, MLA latent
//! and the KV heads this tensor-parallel rank holds.

use kv_core::{Error, MemKind, Result};

use super::tp;

/// Element type of the cache. `Copy`, `Send + Sync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KvDtype {
    /// IEEE half precision.
    F16,
    /// bfloat16.
    Bf16,
    /// 8-bit float (either fp8 flavour; peers must agree on which).
    Fp8,
    /// IEEE single precision.
    F32,
}

impl KvDtype {
    /// Bytes per element.
    pub fn bytes(self) -> u64 {
        match self {
            KvDtype::F16 | KvDtype::Bf16 => 2,
            KvDtype::Fp8 => 1,
            KvDtype::F32 => 4,
        }
    }

    /// Lower-case name (`fp16`, `bf16`, `fp8`, `fp32`).
    pub fn as_str(self) -> &'static str {
        match self {
            KvDtype::F16 => "fp16",
            KvDtype::Bf16 => "bf16",
            KvDtype::Fp8 => "fp8",
            KvDtype::F32 => "fp32",
        }
    }

    /// The dtype a name (`fp16`/`f16`, `bf16`, `fp8`, `fp32`/`f32`) stands for.
    pub fn parse(s: &str) -> Option<KvDtype> {
        Some(match s {
            "fp16" | "f16" | "half" => KvDtype::F16,
            "bf16" => KvDtype::Bf16,
            "fp8" | "f8" => KvDtype::Fp8,
            "fp32" | "f32" | "float" => KvDtype::F32,
            _ => return None,
        })
    }

    fn code(self) -> u8 {
        match self {
            KvDtype::F16 => 0,
            KvDtype::Bf16 => 1,
            KvDtype::Fp8 => 2,
            KvDtype::F32 => 3,
        }
    }

    fn from_code(c: u8) -> Option<KvDtype> {
        [KvDtype::F16, KvDtype::Bf16, KvDtype::Fp8, KvDtype::F32]
            .get(c as usize)
            .copied()
    }
}

/// Order of a block's elements. `Copy`, `Send + Sync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HeadOrder {
    /// `[heads][tokens][dim]`: one head's slab of a block is contiguous (vLLM's
    /// preferred layout for transfers: a TP shard of a block is one range).
    Hnd,
    /// `[tokens][heads][dim]`: one token's heads are contiguous.
    Nhd,
}

/// Where a layer's K and V blocks sit relative to each other. `Copy`, `Send + Sync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KvPlacement {
    /// K and V are separate arrays of blocks (separate allocations, or the two halves
    /// of one `[2][blocks]…` tensor): [`KvLayout::bases`] holds one address per layer
    /// and plane.
    Separate,
    /// FlashInfer's blocks-first `[blocks][2]…`: block `b`'s V follows its K, so a
    /// layer is one array of `2 ×`-sized blocks: [`KvLayout::bases`] holds one address
    /// per layer.
    Interleaved,
}

/// The paged KV cache of one engine (one TP rank): shape, block layout and the base
/// address of every layer's memory. Plain struct; `Clone`, `Send + Sync`.
///
/// Block `b` of plane `p` (K = 0, V = 1, or the MLA latent = 0) of layer `l` starts at
/// [`plane_base(l, p)`](KvLayout::plane_base)` + b × `[`block_stride()`](KvLayout::block_stride)
/// and holds `block_tokens × heads_held × head_dim` elements in [`HeadOrder`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KvLayout {
    /// Transformer layers.
    pub layers: u32,
    /// The model's KV heads (all ranks together); 1 for an MLA latent.
    pub kv_heads: u32,
    /// Elements per head per token (the latent width for MLA).
    pub head_dim: u32,
    /// Element type.
    pub dtype: KvDtype,
    /// MLA: one latent vector per token per layer, no separate K and V; not split by TP.
    pub mla: bool,
    /// Tokens per block.
    pub block_tokens: u32,
    /// Blocks per layer and plane.
    pub blocks: u64,
    /// Element order inside a block.
    pub order: HeadOrder,
    /// K and V separate or interleaved per block.
    pub placement: KvPlacement,
    /// First global KV head this rank holds.
    pub first_head: u32,
    /// KV heads this rank holds (consecutive from `first_head`).
    pub heads_held: u32,
    /// This rank in its TP group.
    pub tp_rank: u32,
    /// Size of the TP group.
    pub tp_size: u32,
    /// Kind of the memory (DRAM, or VRAM for a GPU engine).
    pub kind: MemKind,
    /// Device of the memory (GPU ordinal for VRAM, 0 for host memory).
    pub device: u32,
    /// Base addresses: `layers × planes` (index `layer × planes + plane`) for
    /// [`KvPlacement::Separate`], `layers` for [`KvPlacement::Interleaved`].
    pub bases: Vec<u64>,
}

/// Most base addresses a layout carries (what fits in one metadata attribute).
pub const MAX_BASES: usize = 480;

/// The metadata attribute a layout is published under (see `Agent::set_kv_layout`).
pub const LAYOUT_ATTRIBUTE: &str = "kvx.kv_layout";

const WIRE_VERSION: u8 = 1;

impl KvLayout {
    /// A layout of one TP rank with the heads the vLLM rule gives it, with no base
    /// addresses yet (set [`KvLayout::bases`], or use [`KvLayout::contiguous`]).
    #[allow(clippy::too_many_arguments)] // the shape of a KV cache has this many facets
    pub fn for_rank(
        layers: u32,
        kv_heads: u32,
        head_dim: u32,
        dtype: KvDtype,
        block_tokens: u32,
        blocks: u64,
        tp_size: u32,
        tp_rank: u32,
    ) -> Result<KvLayout> {
        let heads = tp::heads_for_rank(kv_heads, tp_size, tp_rank)?;
        Ok(KvLayout {
            layers,
            kv_heads,
            head_dim,
            dtype,
            mla: false,
            block_tokens,
            blocks,
            order: HeadOrder::Hnd,
            placement: KvPlacement::Separate,
            first_head: heads.start,
            heads_held: heads.end - heads.start,
            tp_rank,
            tp_size,
            kind: MemKind::Dram,
            device: 0,
            bases: Vec::new(),
        })
    }

    /// An MLA layout (one latent of `latent_dim` per token per layer, replicated on
    /// every TP rank).
    pub fn mla(
        layers: u32,
        latent_dim: u32,
        dtype: KvDtype,
        block_tokens: u32,
        blocks: u64,
        tp_size: u32,
        tp_rank: u32,
    ) -> Result<KvLayout> {
        let mut l = Self::for_rank(
            layers,
            1,
            latent_dim,
            dtype,
            block_tokens,
            blocks,
            tp_size,
            tp_rank,
        )?;
        l.mla = true;
        Ok(l)
    }

    /// Sets the base addresses as if the whole cache were one allocation at `base`,
    /// layer after layer, each layer's planes (or interleaved blocks) back to back.
    /// Returns the total bytes.
    pub fn contiguous(&mut self, base: u64) -> Result<u64> {
        self.bases.clear();
        let per_base = self.blocks * self.block_stride();
        let n = match self.placement {
            KvPlacement::Separate => self.layers * self.planes(),
            KvPlacement::Interleaved => self.layers,
        };
        for i in 0..n as u64 {
            self.bases.push(base + i * per_base);
        }
        self.validate()?;
        Ok(per_base * n as u64)
    }

    /// 2 (K and V) or 1 (MLA latent).
    pub fn planes(&self) -> u32 {
        if self.mla {
            1
        } else {
            2
        }
    }

    /// Bytes of one head of one token.
    pub fn head_bytes(&self) -> u64 {
        self.head_dim as u64 * self.dtype.bytes()
    }

    /// Bytes of one block of one plane.
    pub fn block_bytes(&self) -> u64 {
        self.block_tokens as u64 * self.heads_held as u64 * self.head_bytes()
    }

    /// Distance between consecutive blocks of a plane.
    pub fn block_stride(&self) -> u64 {
        match self.placement {
            KvPlacement::Separate => self.block_bytes(),
            KvPlacement::Interleaved => self.block_bytes() * self.planes() as u64,
        }
    }

    /// Where block 0 of `plane` of `layer` starts.
    pub fn plane_base(&self, layer: u32, plane: u32) -> Result<u64> {
        if layer >= self.layers || plane >= self.planes() {
            return Err(Error::OutOfBounds(format!(
                "layer {layer} plane {plane} of a layout with {} layers and {} planes",
                self.layers,
                self.planes()
            )));
        }
        let at = |i: u32| {
            self.bases.get(i as usize).copied().ok_or_else(|| {
                Error::invalid_argument(format!(
                    "the layout has {} base addresses; set one per layer{}",
                    self.bases.len(),
                    if self.placement == KvPlacement::Separate {
                        " and plane"
                    } else {
                        ""
                    }
                ))
            })
        };
        Ok(match self.placement {
            KvPlacement::Separate => at(layer * self.planes() + plane)?,
            KvPlacement::Interleaved => at(layer)? + plane as u64 * self.block_bytes(),
        })
    }

    /// Address of element `dim` of global head `head` of token `token` (within the
    /// block) of `block` of `plane` of `layer`.
    pub fn element_addr(
        &self,
        layer: u32,
        plane: u32,
        block: u64,
        token: u32,
        head: u32,
        dim: u32,
    ) -> Result<u64> {
        let h = head.wrapping_sub(self.first_head);
        if block >= self.blocks
            || token >= self.block_tokens
            || h >= self.heads_held
            || dim >= self.head_dim
        {
            return Err(Error::OutOfBounds(format!(
                "block {block} token {token} head {head} dim {dim} of {}",
                self.describe()
            )));
        }
        let (t, h) = (token as u64, h as u64);
        let inner = match self.order {
            HeadOrder::Hnd => h * self.block_tokens as u64 + t,
            HeadOrder::Nhd => t * self.heads_held as u64 + h,
        };
        Ok(self.plane_base(layer, plane)?
            + block * self.block_stride()
            + inner * self.head_bytes()
            + dim as u64 * self.dtype.bytes())
    }

    /// The bytes one plane of one layer spans (`blocks × block_stride`, less the
    /// interleaved tail).
    pub fn plane_span(&self) -> u64 {
        self.blocks.saturating_sub(1) * self.block_stride() + self.block_bytes()
    }

    /// Checks the shape (no zero sizes, heads inside the model and as the TP rule
    /// gives them, no overflow) and the base addresses.
    pub fn validate(&self) -> Result<()> {
        let bad = |why: String| Err(Error::invalid_argument(format!("KV layout: {why}")));
        if self.layers == 0
            || self.kv_heads == 0
            || self.head_dim == 0
            || self.block_tokens == 0
            || self.blocks == 0
            || self.heads_held == 0
        {
            return bad(format!("a zero size in {self:?}"));
        }
        if self.mla && self.kv_heads != 1 {
            return bad("an MLA layout has one latent \"head\"".into());
        }
        let want = tp::heads_for_rank(self.kv_heads, self.tp_size, self.tp_rank)?;
        if want != (self.first_head..self.first_head + self.heads_held) {
            return bad(format!(
                "rank {} of TP {} holds heads {want:?} by the vLLM rule, not {}..{}",
                self.tp_rank,
                self.tp_size,
                self.first_head,
                self.first_head + self.heads_held
            ));
        }
        let total = self
            .block_bytes()
            .checked_mul(self.planes() as u64)
            .and_then(|b| b.checked_mul(self.blocks))
            .and_then(|b| b.checked_mul(self.layers as u64));
        if total.is_none() || self.block_tokens as u64 * self.heads_held as u64 > u32::MAX as u64 {
            return bad("its size overflows".into());
        }
        let n = match self.placement {
            KvPlacement::Separate => self.layers as usize * self.planes() as usize,
            KvPlacement::Interleaved => self.layers as usize,
        };
        if self.bases.len() != n || n > MAX_BASES {
            return bad(format!(
                "{} base addresses for {n} allocations (at most {MAX_BASES})",
                self.bases.len()
            ));
        }
        let span = self.plane_span() + (self.planes() as u64 - 1) * self.block_bytes();
        if self.bases.iter().any(|b| b.checked_add(span).is_none()) {
            return bad("a layer's memory overflows the address space".into());
        }
        Ok(())
    }

    /// A hash of what two peers must share to exchange KV at all: layers, KV heads,
    /// head dim, dtype and MLA. (FNV-1a, stable across hosts and builds.)
    pub fn model_hash(&self) -> u64 {
        let mut h = Fnv::default();
        h.u32(self.layers);
        h.u32(self.kv_heads);
        h.u32(self.head_dim);
        h.u8(self.dtype.code());
        h.u8(self.mla as u8);
        h.0
    }

    /// A hash of the whole layout as peers see it: the model, block size, TP rank and
    /// size, element order and K/V placement (not the addresses).
    pub fn hash(&self) -> u64 {
        let mut h = Fnv(self.model_hash());
        h.u32(self.block_tokens);
        h.u32(self.tp_rank);
        h.u32(self.tp_size);
        h.u8(matches!(self.order, HeadOrder::Nhd) as u8);
        h.u8(matches!(self.placement, KvPlacement::Interleaved) as u8);
        h.0
    }

    /// Short description for errors: `l32 kv8 d128 bf16 b16 tp1/2 HND`.
    pub fn describe(&self) -> String {
        format!(
            "l{} kv{} d{} {}{} b{} tp{}/{} {:?}",
            self.layers,
            self.kv_heads,
            self.head_dim,
            self.dtype.as_str(),
            if self.mla { " mla" } else { "" },
            self.block_tokens,
            self.tp_rank,
            self.tp_size,
            self.order
        )
    }

    /// Refuses a peer whose cache cannot exchange KV with ours: a different model
    /// (layers, KV heads, head dim, dtype, MLA), whatever the addresses. Block size, TP
    /// size and element order may differ: a [`Relayout`](super::Relayout) bridges them.
    pub fn check_compatible(&self, peer: &KvLayout) -> Result<()> {
        if self.model_hash() != peer.model_hash() {
            return Err(Error::InvalidMetadata(format!(
                "incompatible KV layouts: ours is {} (model hash {:016x}), the peer's is {} ({:016x}); refusing before moving any byte",
                self.describe(),
                self.model_hash(),
                peer.describe(),
                peer.model_hash()
            )));
        }
        Ok(())
    }

    /// The layout as a metadata attribute value (versioned, little-endian, with the
    /// model hash for a cross-check).
    pub fn encode(&self) -> Result<Vec<u8>> {
        self.validate()?;
        let mut b = Vec::with_capacity(64 + 8 * self.bases.len());
        b.push(WIRE_VERSION);
        for v in [self.layers, self.kv_heads, self.head_dim] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.push(self.dtype.code());
        b.push(self.mla as u8);
        b.extend_from_slice(&self.block_tokens.to_le_bytes());
        b.extend_from_slice(&self.blocks.to_le_bytes());
        b.push(matches!(self.order, HeadOrder::Nhd) as u8);
        b.push(matches!(self.placement, KvPlacement::Interleaved) as u8);
        b.push(self.kind as u8);
        for v in [
            self.first_head,
            self.heads_held,
            self.tp_rank,
            self.tp_size,
            self.device,
            self.bases.len() as u32,
        ] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        for a in &self.bases {
            b.extend_from_slice(&a.to_le_bytes());
        }
        b.extend_from_slice(&self.model_hash().to_le_bytes());
        Ok(b)
    }

    /// Decodes and validates what [`KvLayout::encode`] produced (a peer's input: every
    /// malformed value is [`Error::InvalidMetadata`], never a panic).
    pub fn decode(bytes: &[u8]) -> Result<KvLayout> {
        let bad = |why: &str| Error::InvalidMetadata(format!("KV layout attribute: {why}"));
        let mut r = Reader(bytes);
        if r.u8()? != WIRE_VERSION {
            return Err(bad("unknown version"));
        }
        let (layers, kv_heads, head_dim) = (r.u32()?, r.u32()?, r.u32()?);
        let dtype = KvDtype::from_code(r.u8()?).ok_or_else(|| bad("unknown dtype"))?;
        let mla = r.flag()?;
        let block_tokens = r.u32()?;
        let blocks = r.u64()?;
        let order = if r.flag()? {
            HeadOrder::Nhd
        } else {
            HeadOrder::Hnd
        };
        let placement = if r.flag()? {
            KvPlacement::Interleaved
        } else {
            KvPlacement::Separate
        };
        let kind = MemKind::from_u8(r.u8()?).ok_or_else(|| bad("unknown memory kind"))?;
        let (first_head, heads_held, tp_rank, tp_size, device) =
            (r.u32()?, r.u32()?, r.u32()?, r.u32()?, r.u32()?);
        let n = r.u32()? as usize;
        if n > MAX_BASES {
            return Err(bad("too many base addresses"));
        }
        let bases = (0..n).map(|_| r.u64()).collect::<Result<Vec<u64>>>()?;
        let hash = r.u64()?;
        if !r.0.is_empty() {
            return Err(bad("trailing bytes"));
        }
        let l = KvLayout {
            layers,
            kv_heads,
            head_dim,
            dtype,
            mla,
            block_tokens,
            blocks,
            order,
            placement,
            first_head,
            heads_held,
            tp_rank,
            tp_size,
            kind,
            device,
            bases,
        };
        l.validate()
            .map_err(|e| Error::InvalidMetadata(format!("KV layout attribute: {e}")))?;
        if l.model_hash() != hash {
            return Err(bad("model hash does not match the fields"));
        }
        Ok(l)
    }
}

/// FNV-1a, 64 bits.
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    fn u8(&mut self, b: u8) {
        self.0 = (self.0 ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    fn u32(&mut self, v: u32) {
        for b in v.to_le_bytes() {
            self.u8(b);
        }
    }
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N]> {
        let (head, rest) = self
            .0
            .split_first_chunk::<N>()
            .ok_or_else(|| Error::InvalidMetadata("KV layout attribute: truncated".into()))?;
        self.0 = rest;
        Ok(*head)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take::<1>()?[0])
    }
    fn flag(&mut self) -> Result<bool> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(Error::InvalidMetadata(
                "KV layout attribute: a flag is neither 0 nor 1".into(),
            )),
        }
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take()?))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llama(tp: u32, rank: u32) -> KvLayout {
        let mut l = KvLayout::for_rank(32, 8, 128, KvDtype::Bf16, 16, 100, tp, rank).unwrap();
        l.contiguous(1 << 30).unwrap();
        l
    }

    #[test]
    fn sizes_and_bases() {
        let l = llama(2, 1);
        assert_eq!((l.first_head, l.heads_held), (4, 4));
        assert_eq!(l.block_bytes(), 16 * 4 * 128 * 2);
        assert_eq!(
            l.plane_base(0, 1).unwrap(),
            (1 << 30) + 100 * l.block_bytes()
        );
        assert!(l.plane_base(32, 0).is_err() && l.plane_base(0, 2).is_err());
        let mut fi = llama(1, 0);
        fi.placement = KvPlacement::Interleaved;
        let total = fi.contiguous(4096).unwrap();
        assert_eq!(fi.bases.len(), 32);
        assert_eq!(fi.block_stride(), 2 * fi.block_bytes());
        assert_eq!(
            fi.plane_base(1, 1).unwrap(),
            4096 + total / 32 + fi.block_bytes()
        );
        let mla = KvLayout::mla(61, 576, KvDtype::Bf16, 64, 10, 8, 3).unwrap();
        assert_eq!((mla.planes(), mla.first_head, mla.heads_held), (1, 0, 1));
    }

    #[test]
    fn validation_refuses_bad_shapes() {
        let mut l = llama(2, 0);
        l.first_head = 1;
        assert!(l.validate().is_err(), "heads off the TP rule");
        let mut l = llama(2, 0);
        l.bases.pop();
        assert!(l.validate().is_err());
        let mut l = llama(2, 0);
        l.blocks = 0;
        assert!(l.validate().is_err());
        assert!(KvLayout::for_rank(32, 8, 128, KvDtype::Bf16, 16, 1, 3, 0).is_err());
    }

    #[test]
    fn hashes_separate_model_from_deployment() {
        let (a, b) = (llama(1, 0), llama(2, 1));
        assert_eq!(a.model_hash(), b.model_hash());
        assert_ne!(a.hash(), b.hash());
        a.check_compatible(&b).unwrap();
        let mut c = llama(1, 0);
        c.dtype = KvDtype::F16;
        let e = a.check_compatible(&c).unwrap_err();
        assert!(e.to_string().contains("incompatible KV layouts"), "{e}");
        let mut d = llama(1, 0);
        d.block_tokens = 32;
        a.check_compatible(&d).unwrap();
        assert_ne!(a.hash(), d.hash());
    }

    #[test]
    fn encodes_round_trip_and_garbage_is_refused() {
        let mut l = llama(4, 2);
        l.order = HeadOrder::Nhd;
        let b = l.encode().unwrap();
        assert!(b.len() <= kv_core::codec::MAX_ATTRIBUTE_BYTES);
        assert_eq!(KvLayout::decode(&b).unwrap(), l);
        for cut in 0..b.len() {
            assert!(KvLayout::decode(&b[..cut]).is_err());
        }
        let mut flipped = b.clone();
        flipped[2] ^= 1; // layers changes: the hash no longer matches
        assert!(KvLayout::decode(&flipped).is_err());
        let mut long = b;
        long.push(0);
        assert!(KvLayout::decode(&long).is_err());
    }

    proptest::proptest! {
        #[test]
        fn decoding_random_bytes_never_panics(bytes in proptest::collection::vec(0u8..=255, 0..200)) {
            let _ = KvLayout::decode(&bytes);
        }
    }
}
