//! KV-cache layout helpers: bytes per token, paged blocks → descriptors, coalescing,
//! layer-wise lists and tensor-parallel re-layout.
//!
//! Two levels. [`ModelShape`] and [`PagedLayout`] describe kvx's own paged buffer
//! (`[layer][plane][page][token][head][dim]` in one allocation), what `kv-bench` moves.
//! [`KvLayout`] describes a cache as engines hold it — per-layer (and per-plane)
//! allocations, HND or NHD blocks, K and V separate or interleaved per block, block
//! size, dtype, MLA latent, the heads one TP rank holds — and [`Relayout`] builds the
//! lists that move one rank's blocks into another's across TP sizes, block sizes and
//! element orders ([`tp`] says which heads go where).

use kv_core::{Descriptor, DescriptorList, Error, Result};

mod grid;
mod kv;
mod relayout;
pub mod tp;

pub use grid::ItemGrid;
pub use kv::{HeadOrder, KvDtype, KvLayout, KvPlacement, LAYOUT_ATTRIBUTE, MAX_BASES};
pub use relayout::{Relayout, Side};

/// The shape of a model's KV cache. `Copy`, `Send + Sync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelShape {
    /// Number of transformer layers.
    pub layers: u32,
    /// KV heads per layer (1 for MLA's latent).
    pub kv_heads: u32,
    /// Width of one head (or of the MLA latent).
    pub head_dim: u32,
    /// Bytes per element (2 for bf16/fp16, 1 for fp8).
    pub dtype_bytes: u32,
    /// MLA: one latent vector per token per layer instead of separate K and V; TP does
    /// not split it by heads.
    pub latent: bool,
}

impl ModelShape {
    /// Model presets by name (public configs, bf16): `llama3-8b`, `mistral-7b`,
    /// `llama3-70b`, `llama3.1-405b`, `qwen2-7b`, `deepseek-v3`.
    pub fn preset(name: &str) -> Option<ModelShape> {
        let s = |layers, kv_heads, head_dim, latent| ModelShape {
            layers,
            kv_heads,
            head_dim,
            dtype_bytes: 2,
            latent,
        };
        Some(match name.to_ascii_lowercase().as_str() {
            "llama3-8b" | "llama-3-8b" | "mistral-7b" => s(32, 8, 128, false),
            "llama3-70b" | "llama-3-70b" => s(80, 8, 128, false),
            "llama3.1-405b" | "llama-3.1-405b" | "llama3-405b" => s(126, 8, 128, false),
            "qwen2-7b" => s(28, 4, 128, false),
            "deepseek-v3" => s(61, 1, 576, true),
            _ => return None,
        })
    }

    /// Names accepted by [`ModelShape::preset`].
    pub const PRESETS: &'static [&'static str] = &[
        "llama3-8b",
        "mistral-7b",
        "llama3-70b",
        "llama3.1-405b",
        "qwen2-7b",
        "deepseek-v3",
    ];

    /// Checks that no dimension is zero.
    pub fn validate(&self) -> Result<()> {
        if self.layers == 0 || self.kv_heads == 0 || self.head_dim == 0 || self.dtype_bytes == 0 {
            return Err(Error::invalid_argument(format!(
                "model shape {self:?} has a zero dimension"
            )));
        }
        Ok(())
    }

    /// 2 (K and V) or 1 (MLA latent).
    pub fn planes(&self) -> u32 {
        if self.latent {
            1
        } else {
            2
        }
    }

    /// Bytes of one token in one plane of one layer.
    pub fn token_bytes(&self) -> u64 {
        self.kv_heads as u64 * self.head_dim as u64 * self.dtype_bytes as u64
    }

    /// Bytes of one token across all layers and planes:
    /// `planes × layers × kv_heads × head_dim × dtype_bytes`.
    pub fn bytes_per_token(&self) -> u64 {
        self.planes() as u64 * self.layers as u64 * self.token_bytes()
    }

    /// The shape one rank holds under tensor parallelism of degree `tp`: heads are
    /// split; an MLA latent is replicated, not split.
    pub fn tp_shard(&self, tp: u32) -> Result<ModelShape> {
        if self.latent || tp <= 1 {
            return Ok(*self);
        }
        if self.kv_heads % tp != 0 {
            return Err(Error::invalid_argument(format!(
                "{} kv heads do not split over TP={tp}",
                self.kv_heads
            )));
        }
        Ok(ModelShape {
            kv_heads: self.kv_heads / tp,
            ..*self
        })
    }
}

/// A paged KV cache in one contiguous buffer: `pages` pages of `page_tokens` tokens for
/// every layer and plane. `Copy`, `Send + Sync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagedLayout {
    /// The model.
    pub shape: ModelShape,
    /// Tokens per page (vLLM's block size; 16 by default).
    pub page_tokens: u32,
    /// Pages per layer and plane.
    pub pages: u64,
}

impl PagedLayout {
    /// A layout, checked for zero sizes and overflow.
    pub fn new(shape: ModelShape, page_tokens: u32, pages: u64) -> Result<PagedLayout> {
        shape.validate()?;
        if page_tokens == 0 || pages == 0 {
            return Err(Error::invalid_argument(
                "page size and page count must be non-zero",
            ));
        }
        let l = PagedLayout {
            shape,
            page_tokens,
            pages,
        };
        l.page_bytes()
            .checked_mul(pages)
            .and_then(|b| b.checked_mul(shape.layers as u64 * shape.planes() as u64))
            .ok_or_else(|| Error::invalid_argument("layout size overflows"))?;
        Ok(l)
    }

    /// The layout holding at least `tokens` tokens.
    pub fn for_tokens(shape: ModelShape, page_tokens: u32, tokens: u64) -> Result<PagedLayout> {
        if page_tokens == 0 {
            return Err(Error::invalid_argument("page size must be non-zero"));
        }
        Self::new(shape, page_tokens, tokens.div_ceil(page_tokens as u64))
    }

    /// Bytes of one page of one plane of one layer.
    pub fn page_bytes(&self) -> u64 {
        self.page_tokens as u64 * self.shape.token_bytes()
    }

    /// Bytes of one layer (all planes, all pages).
    pub fn layer_bytes(&self) -> u64 {
        self.page_bytes() * self.pages * self.shape.planes() as u64
    }

    /// Total bytes of the buffer.
    pub fn total_bytes(&self) -> u64 {
        self.layer_bytes() * self.shape.layers as u64
    }

    /// Offset of `page` of `plane` of `layer` from the start of the buffer.
    pub fn offset(&self, layer: u32, plane: u32, page: u64) -> u64 {
        ((layer as u64 * self.shape.planes() as u64 + plane as u64) * self.pages + page)
            * self.page_bytes()
    }

    /// Descriptors for `pages` (page numbers, in transfer order) of one layer, every
    /// plane, in a buffer starting at `base`. Runs of consecutive page numbers are
    /// coalesced into payloads of at most `max_tokens` tokens (0 = no limit), and equal
    /// payloads at a regular distance stay one strided entry.
    pub fn layer_descriptors(
        &self,
        base: u64,
        layer: u32,
        pages: &[u64],
        max_tokens: u32,
    ) -> Result<DescriptorList> {
        if layer >= self.shape.layers {
            return Err(Error::OutOfBounds(format!(
                "layer {layer} of {}",
                self.shape.layers
            )));
        }
        if let Some(p) = pages.iter().find(|p| **p >= self.pages) {
            return Err(Error::OutOfBounds(format!("page {p} of {}", self.pages)));
        }
        let per_run = if max_tokens == 0 {
            u64::MAX
        } else {
            (max_tokens / self.page_tokens).max(1) as u64
        };
        let mut out = DescriptorList::new();
        for plane in 0..self.shape.planes() {
            let mut i = 0;
            while i < pages.len() {
                let mut n = 1u64;
                while i + (n as usize) < pages.len()
                    && n < per_run
                    && pages[i + n as usize] == pages[i] + n
                {
                    n += 1;
                }
                out.push(Descriptor::new(
                    base + self.offset(layer, plane, pages[i]),
                    n * self.page_bytes(),
                    0,
                ))?;
                i += n as usize;
            }
        }
        Ok(out)
    }

    /// Descriptors for every page of one layer (two strided entries, or one for MLA).
    pub fn whole_layer(&self, base: u64, layer: u32) -> Result<DescriptorList> {
        let pages: Vec<u64> = (0..self.pages).collect();
        self.layer_descriptors(base, layer, &pages, 0)
    }

    /// Tensor-parallel re-layout: the descriptors, in this (unsharded) layout, of the
    /// heads that rank `rank` of `tp` holds, for `page` of one layer and plane — one
    /// strided run of `page_tokens` slices. Pairs with the whole page of the same plane
    /// in the rank's own [`ModelShape::tp_shard`] layout. MLA latents are not split: the
    /// whole page is returned.
    pub fn tp_slice(
        &self,
        base: u64,
        layer: u32,
        plane: u32,
        page: u64,
        tp: u32,
        rank: u32,
    ) -> Result<DescriptorList> {
        if rank >= tp.max(1)
            || layer >= self.shape.layers
            || page >= self.pages
            || plane >= self.shape.planes()
        {
            return Err(Error::OutOfBounds(format!(
                "rank {rank}/{tp} layer {layer} plane {plane} page {page}"
            )));
        }
        let start = base + self.offset(layer, plane, page);
        let shard = self.shape.tp_shard(tp)?;
        if shard == self.shape {
            return DescriptorList::single(Descriptor::new(start, self.page_bytes(), 0));
        }
        let slice = shard.token_bytes();
        DescriptorList::strided(
            start + rank as u64 * slice,
            self.shape.token_bytes(),
            self.page_tokens as u64,
            slice,
            0,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_per_token_match_the_design_table() {
        let want = [
            ("llama3-8b", 131_072),
            ("llama3-70b", 327_680),
            ("llama3.1-405b", 516_096),
            ("qwen2-7b", 57_344),
            ("deepseek-v3", 70_272),
        ];
        for (m, b) in want {
            assert_eq!(ModelShape::preset(m).unwrap().bytes_per_token(), b, "{m}");
        }
        assert!(ModelShape::preset("gpt-5").is_none());
    }

    #[test]
    fn llama_page_is_32k() {
        let l =
            PagedLayout::for_tokens(ModelShape::preset("llama3-8b").unwrap(), 16, 8192).unwrap();
        assert_eq!(l.page_bytes(), 32 * 1024);
        assert_eq!(l.total_bytes(), 8192 * 131_072);
        let d = l.whole_layer(0, 1).unwrap();
        // K and V of one layer are adjacent: everything coalesces into one range.
        assert_eq!(d.entries().len(), 1);
        assert_eq!(d.total_bytes(), l.layer_bytes());
    }

    #[test]
    fn coalescing_caps_payloads() {
        let l = PagedLayout::new(ModelShape::preset("llama3-8b").unwrap(), 16, 64).unwrap();
        let pages: Vec<u64> = (0..32).collect();
        let d = l.layer_descriptors(0, 0, &pages, 128).unwrap();
        // 32 pages of 16 tokens in runs of 8 pages (128 tokens), per plane.
        assert_eq!(d.len(), 8);
        assert!(d.iter().all(|x| x.len == 8 * l.page_bytes()));
        let scattered = [5u64, 9, 10, 11, 40];
        let d = l.layer_descriptors(0, 0, &scattered, 0).unwrap();
        assert_eq!(d.len(), 6);
        assert!(l.layer_descriptors(0, 0, &[64], 0).is_err());
        assert!(l.layer_descriptors(0, 32, &[0], 0).is_err());
    }

    #[test]
    fn tp_slices_cover_the_page_exactly_once() {
        let l = PagedLayout::new(ModelShape::preset("llama3-8b").unwrap(), 16, 4).unwrap();
        let mut seen = vec![0u8; l.page_bytes() as usize];
        for rank in 0..4 {
            let d = l.tp_slice(0, 0, 1, 2, 4, rank).unwrap();
            assert_eq!(d.total_bytes(), l.page_bytes() / 4);
            for x in d.iter() {
                for b in x.addr..x.addr + x.len {
                    seen[(b - l.offset(0, 1, 2)) as usize] += 1;
                }
            }
        }
        assert!(seen.iter().all(|c| *c == 1));
        let mla = PagedLayout::new(ModelShape::preset("deepseek-v3").unwrap(), 16, 4).unwrap();
        assert_eq!(
            mla.tp_slice(0, 0, 0, 0, 8, 3).unwrap().total_bytes(),
            mla.page_bytes()
        );
        assert!(l.tp_slice(0, 0, 0, 0, 3, 0).is_err());
    }
}
