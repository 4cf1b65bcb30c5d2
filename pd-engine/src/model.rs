//! The model: a Llama-architecture decoder (RMSNorm, RoPE, grouped-query attention,
//! SwiGLU MLP) on candle's CPU backend, with weights drawn from a seed.
//!
//! [`Model::forward`] runs a span of consecutive tokens: it writes their K/V through a
//! [`KvStore`] and attends over everything the store holds up to the span's end. One
//! call shape serves prefill chunks and decode steps alike; *which* spans are run is
//! the engine's decision (it fixes them so that every mode computes identical bits).

use candle_core::{DType, Device, Tensor};
use candle_nn::{Embedding, Linear, Module};

use crate::error::{Error, Result};
use crate::kv_cache::{KvDtype, KvLayout, KvStore};
use crate::rng::Rng;

/// Shape and identity of a model. Plain options struct; `Default` is the engine's
/// default model (8 layers, hidden 256, 8 query heads, 2 KV heads, head dim 32,
/// vocab 4096).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelConfig {
    /// Decoder layers.
    pub layers: usize,
    /// Width of the residual stream.
    pub hidden: usize,
    /// Query heads.
    pub q_heads: usize,
    /// Key/value heads (grouped-query attention: `q_heads` is a multiple).
    pub kv_heads: usize,
    /// Elements per head (even, for RoPE).
    pub head_dim: usize,
    /// Width of the SwiGLU MLP.
    pub intermediate: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// RoPE base.
    pub rope_theta: f64,
    /// RMSNorm epsilon.
    pub rms_eps: f32,
    /// Longest sequence (prompt plus generated tokens) the RoPE table covers.
    pub max_positions: usize,
    /// Seed the weights are drawn from.
    pub seed: u64,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            layers: 8,
            hidden: 256,
            q_heads: 8,
            kv_heads: 2,
            head_dim: 32,
            intermediate: 704,
            vocab: 4096,
            rope_theta: 10_000.0,
            rms_eps: 1e-5,
            max_positions: 4096,
            seed: 0x5eed,
        }
    }
}

impl ModelConfig {
    /// A small model for tests: 2 layers, hidden 64, 4 query heads, 2 KV heads.
    pub fn tiny() -> Self {
        ModelConfig {
            layers: 2,
            hidden: 64,
            q_heads: 4,
            kv_heads: 2,
            head_dim: 16,
            intermediate: 128,
            vocab: 256,
            max_positions: 512,
            ..Default::default()
        }
    }

    /// Checks the shape is usable.
    pub fn validate(&self) -> Result<()> {
        let bad = |why: &str| Err(Error::invalid(format!("model config: {why} ({self:?})")));
        if [
            self.layers,
            self.hidden,
            self.q_heads,
            self.kv_heads,
            self.head_dim,
        ]
        .contains(&0)
            || self.intermediate == 0
            || self.vocab == 0
            || self.max_positions == 0
        {
            return bad("every size must be non-zero");
        }
        if self.q_heads % self.kv_heads != 0 {
            return bad("q_heads must be a multiple of kv_heads");
        }
        if self.head_dim % 2 != 0 {
            return bad("head_dim must be even (RoPE rotates pairs)");
        }
        if self.vocab > u32::MAX as usize {
            return bad("vocab must fit token ids in u32");
        }
        Ok(())
    }

    /// Query heads per KV head.
    pub fn group(&self) -> usize {
        self.q_heads / self.kv_heads
    }

    /// Everything that decides the model's outputs, as text.
    pub fn identity(&self) -> String {
        format!(
            "pd-engine/llama/l{}-h{}-q{}-kv{}-d{}-i{}-v{}-theta{}-eps{}-seed{:x}",
            self.layers,
            self.hidden,
            self.q_heads,
            self.kv_heads,
            self.head_dim,
            self.intermediate,
            self.vocab,
            self.rope_theta,
            self.rms_eps,
            self.seed
        )
    }

    /// A 64-bit fingerprint of [`ModelConfig::identity`]: the model's part of prefix
    /// hashes and of layout compatibility checks.
    pub fn fingerprint(&self) -> u64 {
        xxhash_rust::xxh3::xxh3_64(self.identity().as_bytes())
    }

    /// The paged-cache layout for all of this model's KV heads.
    pub fn kv_layout(&self, block_tokens: usize, dtype: KvDtype) -> KvLayout {
        KvLayout {
            layers: self.layers,
            heads: self.kv_heads,
            head_dim: self.head_dim,
            block_tokens,
            dtype,
        }
    }
}

/// One decoder layer's weights, row-major `[out][in]` like PyTorch's `nn.Linear`.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerWeights {
    /// RMSNorm before attention, `[hidden]`.
    pub attn_norm: Vec<f32>,
    /// Query projection, `[q_heads × head_dim][hidden]`.
    pub wq: Vec<f32>,
    /// Key projection, `[kv_heads × head_dim][hidden]`.
    pub wk: Vec<f32>,
    /// Value projection, `[kv_heads × head_dim][hidden]`.
    pub wv: Vec<f32>,
    /// Output projection, `[hidden][q_heads × head_dim]`.
    pub wo: Vec<f32>,
    /// RMSNorm before the MLP, `[hidden]`.
    pub mlp_norm: Vec<f32>,
    /// SwiGLU gate, `[intermediate][hidden]`.
    pub w_gate: Vec<f32>,
    /// SwiGLU up, `[intermediate][hidden]`.
    pub w_up: Vec<f32>,
    /// SwiGLU down, `[hidden][intermediate]`.
    pub w_down: Vec<f32>,
}

/// All weights as plain arrays: what [`Model`] is built from and what a reference
/// implementation can read.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelWeights {
    /// Token embeddings, `[vocab][hidden]`.
    pub embed: Vec<f32>,
    /// Decoder layers.
    pub layers: Vec<LayerWeights>,
    /// Final RMSNorm, `[hidden]`.
    pub norm: Vec<f32>,
    /// Output projection, `[vocab][hidden]`.
    pub lm_head: Vec<f32>,
}

impl ModelWeights {
    /// Weights drawn from `cfg.seed`: uniform with the variance of the usual
    /// `1/fan_in` init, norms near 1. Same bits on every host (integer generator).
    pub fn seeded(cfg: &ModelConfig) -> Self {
        let (h, qd, kd) = (
            cfg.hidden,
            cfg.q_heads * cfg.head_dim,
            cfg.kv_heads * cfg.head_dim,
        );
        let draw = |name: &str, n: usize, fan_in: usize| -> Vec<f32> {
            let a = (3.0f32 / fan_in as f32).sqrt();
            let mut r = Rng::stream(cfg.seed, name);
            (0..n).map(|_| r.symmetric(a)).collect()
        };
        let norm = |name: &str| -> Vec<f32> {
            let mut r = Rng::stream(cfg.seed, name);
            (0..h).map(|_| 1.0 + r.symmetric(0.1)).collect()
        };
        let layers = (0..cfg.layers)
            .map(|l| LayerWeights {
                attn_norm: norm(&format!("l{l}.attn_norm")),
                wq: draw(&format!("l{l}.wq"), qd * h, h),
                wk: draw(&format!("l{l}.wk"), kd * h, h),
                wv: draw(&format!("l{l}.wv"), kd * h, h),
                wo: draw(&format!("l{l}.wo"), h * qd, qd),
                mlp_norm: norm(&format!("l{l}.mlp_norm")),
                w_gate: draw(&format!("l{l}.w_gate"), cfg.intermediate * h, h),
                w_up: draw(&format!("l{l}.w_up"), cfg.intermediate * h, h),
                w_down: draw(
                    &format!("l{l}.w_down"),
                    h * cfg.intermediate,
                    cfg.intermediate,
                ),
            })
            .collect();
        ModelWeights {
            // Unit-variance embeddings, as a trained model's roughly are.
            embed: draw("embed", cfg.vocab * h, 1),
            layers,
            norm: norm("norm"),
            lm_head: draw("lm_head", cfg.vocab * h, h),
        }
    }
}

/// RoPE angle tables for positions `0..max_positions`: `(cos, sin)`, each
/// `[max_positions][head_dim / 2]`, pair `i` rotating by `pos / theta^(2i / head_dim)`.
pub fn rope_tables(cfg: &ModelConfig) -> (Vec<f32>, Vec<f32>) {
    let half = cfg.head_dim / 2;
    let mut cos = Vec::with_capacity(cfg.max_positions * half);
    let mut sin = Vec::with_capacity(cfg.max_positions * half);
    for p in 0..cfg.max_positions {
        for i in 0..half {
            let inv = 1.0 / cfg.rope_theta.powf(2.0 * i as f64 / cfg.head_dim as f64);
            let a = p as f64 * inv;
            cos.push(a.cos() as f32);
            sin.push(a.sin() as f32);
        }
    }
    (cos, sin)
}

struct Layer {
    attn_norm: Tensor,
    wq: Linear,
    wk: Linear,
    wv: Linear,
    wo: Linear,
    mlp_norm: Tensor,
    w_gate: Linear,
    w_up: Linear,
    w_down: Linear,
}

/// The decoder on candle (CPU). Immutable after construction; `Send + Sync`, so one
/// model can serve several threads.
pub struct Model {
    cfg: ModelConfig,
    embed: Embedding,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Linear,
    cos: Tensor,
    sin: Tensor,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl Model {
    /// The model `cfg` describes, with weights drawn from `cfg.seed`.
    pub fn new(cfg: ModelConfig) -> Result<Model> {
        cfg.validate()?;
        Self::from_weights(cfg, &ModelWeights::seeded(&cfg))
    }

    /// The model `cfg` describes, with the given weights.
    pub fn from_weights(cfg: ModelConfig, w: &ModelWeights) -> Result<Model> {
        cfg.validate()?;
        let dev = Device::Cpu;
        let t2 = |v: &[f32], rows: usize, cols: usize| -> Result<Tensor> {
            Ok(Tensor::from_slice(v, (rows, cols), &dev)?)
        };
        let t1 = |v: &[f32]| -> Result<Tensor> { Ok(Tensor::from_slice(v, v.len(), &dev)?) };
        let (h, qd, kd) = (
            cfg.hidden,
            cfg.q_heads * cfg.head_dim,
            cfg.kv_heads * cfg.head_dim,
        );
        if w.layers.len() != cfg.layers {
            return Err(Error::invalid(format!(
                "{} layers of weights for a {}-layer model",
                w.layers.len(),
                cfg.layers
            )));
        }
        let lin = |v: &[f32], out: usize, inp: usize| -> Result<Linear> {
            Ok(Linear::new(t2(v, out, inp)?, None))
        };
        let layers = w
            .layers
            .iter()
            .map(|l| {
                Ok(Layer {
                    attn_norm: t1(&l.attn_norm)?,
                    wq: lin(&l.wq, qd, h)?,
                    wk: lin(&l.wk, kd, h)?,
                    wv: lin(&l.wv, kd, h)?,
                    wo: lin(&l.wo, h, qd)?,
                    mlp_norm: t1(&l.mlp_norm)?,
                    w_gate: lin(&l.w_gate, cfg.intermediate, h)?,
                    w_up: lin(&l.w_up, cfg.intermediate, h)?,
                    w_down: lin(&l.w_down, h, cfg.intermediate)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let (cos, sin) = rope_tables(&cfg);
        let half = cfg.head_dim / 2;
        Ok(Model {
            embed: Embedding::new(t2(&w.embed, cfg.vocab, h)?, h),
            layers,
            norm: t1(&w.norm)?,
            lm_head: Linear::new(t2(&w.lm_head, cfg.vocab, h)?, None),
            cos: t2(&cos, cfg.max_positions, half)?,
            sin: t2(&sin, cfg.max_positions, half)?,
            cfg,
        })
    }

    /// The model's shape.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Runs `tokens` at positions `start..start + tokens.len()`: writes their K/V into
    /// `kv` (which must already hold positions `0..start`) and, when `logits` is set,
    /// returns the logits after the last token.
    pub fn forward(
        &self,
        tokens: &[u32],
        start: usize,
        kv: &mut dyn KvStore,
        logits: bool,
    ) -> Result<Option<Vec<f32>>> {
        self.forward_observed(tokens, start, kv, logits, &mut |_| Ok(()))
    }

    /// [`Model::forward`], calling `on_kv(layer)` as soon as each layer's K/V for the
    /// span is in `kv` (before that layer's attention runs), so a caller can start
    /// moving it while the rest of the forward computes. An error from `on_kv` stops
    /// the forward.
    pub fn forward_observed(
        &self,
        tokens: &[u32],
        start: usize,
        kv: &mut dyn KvStore,
        logits: bool,
        on_kv: &mut dyn FnMut(usize) -> Result<()>,
    ) -> Result<Option<Vec<f32>>> {
        let c = &self.cfg;
        let n = tokens.len();
        if n == 0 || start + n > c.max_positions {
            return Err(Error::invalid(format!(
                "a span of {n} tokens at {start}: spans are non-empty and end by position {}",
                c.max_positions
            )));
        }
        if let Some(t) = tokens.iter().find(|t| **t as usize >= c.vocab) {
            return Err(Error::invalid(format!(
                "token {t} outside a vocab of {}",
                c.vocab
            )));
        }
        let (nq, nkv, d, g) = (c.q_heads, c.kv_heads, c.head_dim, c.group());
        let ctx = start + n;
        let dev = Device::Cpu;
        let cos = self.cos.narrow(0, start, n)?;
        let sin = self.sin.narrow(0, start, n)?;
        let mask = causal_mask(g, n, start, &dev)?;
        let scale = 1.0 / (d as f64).sqrt();
        let ids = Tensor::from_slice(tokens, n, &dev)?;
        let mut x = self.embed.forward(&ids)?; // [n, hidden]
        for (l, layer) in self.layers.iter().enumerate() {
            let hn = candle_nn::ops::rms_norm(&x, &layer.attn_norm, c.rms_eps)?;
            // [n, heads * d] -> [1, heads, n, d], the shape candle's rope takes.
            let heads = |t: Tensor, h: usize| -> Result<Tensor> {
                Ok(t.reshape((n, h, d))?
                    .transpose(0, 1)?
                    .contiguous()?
                    .unsqueeze(0)?)
            };
            let q = heads(layer.wq.forward(&hn)?, nq)?;
            let k = heads(layer.wk.forward(&hn)?, nkv)?;
            let v = heads(layer.wv.forward(&hn)?, nkv)?;
            let q = candle_nn::rotary_emb::rope(&q, &cos, &sin)?;
            let k = candle_nn::rotary_emb::rope(&k, &cos, &sin)?;
            kv.write(
                l,
                start,
                n,
                &k.flatten_all()?.to_vec1()?,
                &v.flatten_all()?.to_vec1()?,
            )?;
            on_kv(l)?;
            let (kc, vc) = kv.read(l, ctx)?;
            let kc = Tensor::from_vec(kc, (nkv, ctx, d), &dev)?;
            let vc = Tensor::from_vec(vc, (nkv, ctx, d), &dev)?;
            // Query heads of one KV head are adjacent: [nkv, g * n, d] against [nkv, ctx, d].
            let q = (q.reshape((nkv, g * n, d))? * scale)?;
            let att = q.matmul(&kc.t()?)?.broadcast_add(&mask)?;
            let att = candle_nn::ops::softmax_last_dim(&att)?;
            let o = att.matmul(&vc)?; // [nkv, g * n, d]
            let o = o
                .reshape((nq, n, d))?
                .transpose(0, 1)?
                .reshape((n, nq * d))?;
            x = (x + layer.wo.forward(&o)?)?;
            let hn = candle_nn::ops::rms_norm(&x, &layer.mlp_norm, c.rms_eps)?;
            let gate = candle_nn::ops::silu(&layer.w_gate.forward(&hn)?)?;
            let m = (gate * layer.w_up.forward(&hn)?)?;
            x = (x + layer.w_down.forward(&m)?)?;
        }
        if !logits {
            return Ok(None);
        }
        let last = x.narrow(0, n - 1, 1)?;
        let last = candle_nn::ops::rms_norm(&last, &self.norm, c.rms_eps)?;
        let out = self.lm_head.forward(&last)?.to_dtype(DType::F32)?;
        Ok(Some(out.flatten_all()?.to_vec1()?))
    }
}

/// Additive causal mask `[g * n, start + n]`: row `r` is the query at position
/// `start + r % n`, which may see positions up to its own.
fn causal_mask(g: usize, n: usize, start: usize, dev: &Device) -> Result<Tensor> {
    let ctx = start + n;
    let mut m = Vec::with_capacity(g * n * ctx);
    for _ in 0..g {
        for i in 0..n {
            m.extend((0..ctx).map(|j| {
                if j <= start + i {
                    0.0f32
                } else {
                    f32::NEG_INFINITY
                }
            }));
        }
    }
    Ok(Tensor::from_vec(m, (g * n, ctx), dev)?)
}

/// Greedy sampling: the index of the largest logit (the first on ties).
pub fn greedy(logits: &[f32]) -> Result<u32> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &x) in logits.iter().enumerate() {
        if x.is_nan() {
            return Err(Error::invalid(format!("logit {i} is NaN")));
        }
        if best.is_none_or(|(_, b)| x > b) {
            best = Some((i, x));
        }
    }
    best.map(|(i, _)| i as u32)
        .ok_or_else(|| Error::invalid("greedy sampling over no logits"))
}
