//! The engine: a [`Model`], the paged [`KvCache`] it owns, a block allocator, and the
//! operations a server runs — prefill (optionally after a prefix hit), decode steps,
//! and single-process generation.
//!
//! # Why the computation order is fixed
//!
//! Token identity across processes needs the KV of a prompt to be bit-identical
//! whoever computes it. candle's CPU matmul (gemm) may sum in a different order when
//! the number of rows changes, so a prompt computed in one call is not guaranteed to
//! give the bits of the same prompt computed as "cached prefix + suffix". The engine
//! therefore always prefills in chunks aligned to absolute block boundaries
//! (`[0, 16)`, `[16, 32)`, …, the last one partial) and decodes one token per model
//! call. A prefix hit is a whole number of blocks, so the suffix starts on a chunk
//! boundary and runs exactly the calls a full prefill would have run; a decode step's
//! bits never depend on which other sequences are in the batch. (A prefill that finds
//! the whole prompt cached still recomputes the chunk holding the last token, for its
//! logits.)

use std::ops::Range;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::kv_cache::{BlockAllocator, BlockId, KvCache, KvDtype, KvLayout};
use crate::model::{greedy, Model, ModelConfig};
use crate::prefix::{BlockHash, PrefixHasher};

/// How to build an [`Engine`]. Plain options struct.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineOptions {
    /// Blocks in the KV pool (per layer and plane).
    pub num_blocks: usize,
    /// Tokens per block, which is also the prefill chunk.
    pub block_tokens: usize,
    /// Element type of the cache.
    pub dtype: KvDtype,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            num_blocks: 2048,
            block_tokens: 16,
            dtype: KvDtype::F32,
        }
    }
}

/// One request's state: its tokens (prompt, then generated), its block table and how
/// many positions have KV in the cache. `Send + Sync`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sequence {
    tokens: Vec<u32>,
    prompt_len: usize,
    blocks: Vec<BlockId>,
    computed: usize,
}

impl Sequence {
    /// Prompt and generated tokens.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// The prompt.
    pub fn prompt(&self) -> &[u32] {
        &self.tokens[..self.prompt_len]
    }

    /// Tokens generated so far.
    pub fn generated(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }

    /// The block table: position `p` is in `blocks()[p / block_tokens]`.
    pub fn blocks(&self) -> &[BlockId] {
        &self.blocks
    }

    /// Positions whose KV is in the cache.
    pub fn computed(&self) -> usize {
        self.computed
    }
}

/// Reported by [`Engine::prefill_observed`]: the K/V of `positions` in `layer` are in
/// their blocks and will not change. `positions` is one chunk (at most one block).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvReady {
    /// The layer.
    pub layer: usize,
    /// The positions, within one block.
    pub positions: Range<usize>,
}

/// What [`Engine::generate`] returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generation {
    /// The generated tokens (the first from prefill, the rest from decode steps).
    pub tokens: Vec<u32>,
    /// Time in prefill (to the first token).
    pub prefill: Duration,
    /// Time in decode steps.
    pub decode: Duration,
}

/// The engine. Owns its KV memory for its whole life, so the addresses in
/// [`KvCache::plane_ranges`] stay valid (and registrable) until it is dropped.
/// `Send + Sync`; operations take `&mut self`.
#[derive(Debug)]
pub struct Engine {
    model: Model,
    cache: KvCache,
    alloc: BlockAllocator,
    hasher: PrefixHasher,
}

impl Engine {
    /// An engine for the model `cfg` (seeded weights) with `opts.num_blocks` blocks.
    pub fn new(cfg: ModelConfig, opts: EngineOptions) -> Result<Engine> {
        let model = Model::new(cfg)?;
        let cache = KvCache::new(
            cfg.kv_layout(opts.block_tokens, opts.dtype),
            opts.num_blocks,
        )?;
        Ok(Engine {
            hasher: PrefixHasher::new(cfg.fingerprint(), opts.block_tokens),
            alloc: BlockAllocator::new(opts.num_blocks),
            model,
            cache,
        })
    }

    /// The model.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The KV cache (read access, e.g. to send or store blocks).
    pub fn cache(&self) -> &KvCache {
        &self.cache
    }

    /// The KV cache, for writing blocks that arrive from elsewhere (a peer, a store).
    pub fn cache_mut(&mut self) -> &mut KvCache {
        &mut self.cache
    }

    /// The cache layout.
    pub fn layout(&self) -> KvLayout {
        *self.cache.layout()
    }

    /// The block allocator.
    pub fn allocator(&self) -> &BlockAllocator {
        &self.alloc
    }

    /// Prefix hashes of every full block of `tokens` (for this model and block size).
    pub fn block_hashes(&self, tokens: &[u32]) -> Vec<BlockHash> {
        self.hasher.hashes(tokens)
    }

    /// The model calls a prefill of `len` tokens runs when the first `cached` tokens'
    /// KV is already present: block-aligned chunks from the block holding position
    /// `cached` (or, when everything is cached, the last chunk) to the end.
    pub fn prefill_chunks(&self, len: usize, cached: usize) -> Vec<Range<usize>> {
        let bt = self.cache.layout().block_tokens;
        if len == 0 {
            return Vec::new();
        }
        let first = cached.min(len - 1) / bt * bt;
        (first..len)
            .step_by(bt)
            .map(|s| s..(s + bt).min(len))
            .collect()
    }

    /// Computes the KV of `tokens` into `blocks` (position `p` in `blocks[p / 16]`),
    /// trusting that the first `cached` positions are already there (a prefix hit), and
    /// returns the first generated token.
    pub fn prefill(&mut self, tokens: &[u32], blocks: &[BlockId], cached: usize) -> Result<u32> {
        self.prefill_observed(tokens, blocks, cached, &mut |_| Ok(()))
    }

    /// [`Engine::prefill`], calling `on_kv` each time a layer's K/V for a chunk is in
    /// its blocks (chunk by chunk, layer by layer, before that layer's attention runs):
    /// the hook a layer-wise sender posts from. An error from `on_kv` stops the prefill.
    pub fn prefill_observed(
        &mut self,
        tokens: &[u32],
        blocks: &[BlockId],
        cached: usize,
        on_kv: &mut dyn FnMut(KvReady) -> Result<()>,
    ) -> Result<u32> {
        if tokens.is_empty() || cached > tokens.len() {
            return Err(Error::invalid(format!(
                "prefill of {} tokens with {cached} cached",
                tokens.len()
            )));
        }
        let chunks = self.prefill_chunks(tokens.len(), cached);
        let mut kv = self.cache.paged(blocks);
        let mut logits = None;
        for (i, c) in chunks.iter().enumerate() {
            let last = i + 1 == chunks.len();
            let mut ready = |layer| {
                on_kv(KvReady {
                    layer,
                    positions: c.clone(),
                })
            };
            logits = self.model.forward_observed(
                &tokens[c.clone()],
                c.start,
                &mut kv,
                last,
                &mut ready,
            )?;
        }
        greedy(&logits.ok_or_else(|| Error::invalid("prefill ran no chunk"))?)
    }

    /// A new sequence for `prompt` with blocks for all of it.
    pub fn start(&mut self, prompt: Vec<u32>) -> Result<Sequence> {
        if prompt.is_empty() {
            return Err(Error::invalid("an empty prompt"));
        }
        let blocks = self
            .alloc
            .alloc(self.cache.layout().blocks_for(prompt.len()))?;
        Ok(Sequence {
            prompt_len: prompt.len(),
            tokens: prompt,
            blocks,
            computed: 0,
        })
    }

    /// Prefills `seq`'s prompt (the first `cached` positions already in its blocks) and
    /// appends the first generated token, which it returns.
    pub fn prefill_sequence(&mut self, seq: &mut Sequence, cached: usize) -> Result<u32> {
        if seq.computed != 0 || seq.tokens.len() != seq.prompt_len {
            return Err(Error::invalid(
                "prefill of a sequence that was already prefilled",
            ));
        }
        let first = self.prefill(&seq.tokens, &seq.blocks, cached)?;
        Ok(Self::finish_prefill(seq, first))
    }

    /// Marks `seq`'s prompt KV as present — written into its blocks by someone else (a
    /// prefill worker, a prefix store) — with `first` the token that prefill produced.
    pub fn adopt_prefill(&mut self, seq: &mut Sequence, first: u32) -> Result<()> {
        if seq.computed != 0 || seq.tokens.len() != seq.prompt_len {
            return Err(Error::invalid(
                "adopting a prefill for a sequence already prefilled",
            ));
        }
        if first as usize >= self.model.config().vocab {
            return Err(Error::invalid(format!(
                "first token {first} outside the vocab"
            )));
        }
        Self::finish_prefill(seq, first);
        Ok(())
    }

    fn finish_prefill(seq: &mut Sequence, first: u32) -> u32 {
        seq.computed = seq.prompt_len;
        seq.tokens.push(first);
        first
    }

    /// One decode step for each sequence: computes the KV of its last token and appends
    /// the next one (returned in order). Allocates a block for a sequence that needs
    /// one, all or nothing. Sequences run one model call each, so a sequence's tokens do
    /// not depend on what it is batched with.
    pub fn decode_step(&mut self, seqs: &mut [Sequence]) -> Result<Vec<u32>> {
        let layout = *self.cache.layout();
        let mut need = 0;
        for s in seqs.iter() {
            if s.computed < s.prompt_len || s.computed + 1 != s.tokens.len() {
                return Err(Error::invalid(
                    "decode of a sequence that was not prefilled",
                ));
            }
            need += layout
                .blocks_for(s.computed + 1)
                .saturating_sub(s.blocks.len());
        }
        if need > self.alloc.free_count() {
            return Err(Error::OutOfBlocks {
                needed: need,
                free: self.alloc.free_count(),
            });
        }
        let mut out = Vec::with_capacity(seqs.len());
        for s in seqs.iter_mut() {
            let more = layout
                .blocks_for(s.computed + 1)
                .saturating_sub(s.blocks.len());
            s.blocks.extend(self.alloc.alloc(more)?);
            let pos = s.computed;
            let mut kv = self.cache.paged(&s.blocks);
            let logits = self
                .model
                .forward(&s.tokens[pos..pos + 1], pos, &mut kv, true)?;
            let next = greedy(&logits.ok_or_else(|| Error::invalid("decode gave no logits"))?)?;
            s.computed += 1;
            s.tokens.push(next);
            out.push(next);
        }
        Ok(out)
    }

    /// Returns `seq`'s blocks to the pool.
    pub fn release(&mut self, seq: Sequence) -> Result<()> {
        self.alloc.free(&seq.blocks)
    }

    /// The single-process reference: prefill `prompt`, then decode until
    /// `max_new_tokens` tokens are generated; blocks are released at the end.
    pub fn generate(&mut self, prompt: &[u32], max_new_tokens: usize) -> Result<Generation> {
        let mut out = Generation {
            tokens: Vec::new(),
            prefill: Duration::ZERO,
            decode: Duration::ZERO,
        };
        if max_new_tokens == 0 {
            return Ok(out);
        }
        let mut seq = [self.start(prompt.to_vec())?];
        let run = (|| {
            let t = Instant::now();
            self.prefill_sequence(&mut seq[0], 0)?;
            out.prefill = t.elapsed();
            let t = Instant::now();
            for _ in 1..max_new_tokens {
                self.decode_step(&mut seq)?;
            }
            out.decode = t.elapsed();
            Ok(())
        })();
        let [seq] = seq;
        out.tokens = seq.generated().to_vec();
        self.release(seq)?;
        run.map(|()| out)
    }
}
