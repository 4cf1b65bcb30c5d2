//! pd-engine: a small real LLM engine for kvx's prefill/decode disaggregation.
//!
//! A Llama-architecture decoder on candle (CPU, seeded weights) with a paged KV cache the
//! engine owns in the layout GPU engines use — per-layer K and V allocations, 16-token
//! blocks, HND inside a block — at stable, registrable addresses. Prefill runs in
//! block-aligned chunks so that the KV of a prompt is bit-identical whichever process
//! computes it and however much of it was cached; this is what makes disaggregated
//! decode token-identical to one process.
//!
//! ```
//! use pd_engine::{Engine, EngineOptions, ModelConfig};
//!
//! let mut engine = Engine::new(ModelConfig::tiny(), EngineOptions { num_blocks: 64, ..Default::default() })?;
//! let prompt: Vec<u32> = (0..40).map(|i| (i * 7 % 256) as u32).collect();
//! let out = engine.generate(&prompt, 5)?;
//! assert_eq!(out.tokens.len(), 5);
//! assert_eq!(engine.allocator().free_count(), 64); // blocks are returned
//! # Ok::<(), pd_engine::Error>(())
//! ```

#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod engine;
mod error;
pub mod kv_cache;
#[allow(unsafe_code)] // register_cache: engine-owned memory handed to kv-agent
pub mod kvnet;
pub mod model;
pub mod prefix;
pub mod rng;
pub mod tp;
pub mod workload;

pub use engine::{Engine, EngineOptions, Generation, KvReady, Sequence};
pub use error::{Error, Result};
pub use kv_cache::{BlockAllocator, BlockId, KvCache, KvDtype, KvLayout, Plane};
pub use model::{Model, ModelConfig};
pub use prefix::{BlockHash, PrefixHasher};
pub use tp::TpRank;
