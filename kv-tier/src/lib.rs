//! The kvx KV block store: KV blocks that left the GPU are kept in a DRAM tier, spilled
//! to an NVMe tier, found again by prefix and brought back before they are needed — the
//! job of LMCache's storage mode and the AIBrix KV pool.
//!
//! A chunk of tokens (256 by default) is keyed by a chained **xxh3-128** hash of its
//! parent chunk's key, its token ids and a model/layout compatibility hash, so
//! [`Store::lookup_prefix`] finds the longest stored prefix of a request. DRAM is one
//! fixed arena (a registrable [`kv_mem::HostBuffer`]) carved by a slab allocator; the
//! NVMe tier is log-structured, checksummed (crc32c) segment files written with io_uring
//! and `O_DIRECT` through `kv-backend-gds`, recovered on open; eviction is LRU or
//! S3-FIFO (the default) behind [`EvictionPolicy`], and pinned blocks never leave.
//!
//! ```
//! use kv_tier::{NvmeOptions, Options, Store};
//!
//! let dir = std::env::temp_dir().join(format!("kv-tier-doc-{}", std::process::id()));
//! let store = Store::open(Options {
//!     dram_capacity: 8 << 20,
//!     chunk_tokens: 4,
//!     nvme: Some(NvmeOptions { capacity: 12 << 20, segment_bytes: 4 << 20, ..NvmeOptions::new(&dir) }),
//!     ..Options::for_model("llama-3-8b/bf16/tp1")
//! })?;
//! let tokens: Vec<u32> = (0..10).collect();
//! let keys = store.chunk_keys(&tokens);                 // two full chunks of 4 tokens
//! for k in &keys { store.put_durable(*k, &[7u8; 5000])?; }
//! assert_eq!(store.lookup_prefix(&tokens), 8);
//! let block = store.get(keys[1])?.expect("stored");     // pinned while `block` lives
//! assert_eq!(block.as_slice(), &[7u8; 5000][..]);
//! # drop(block); drop(store); std::fs::remove_dir_all(&dir).ok();
//! # Ok::<(), kv_core::Error>(())
//! ```
#![deny(unsafe_code)]
#![warn(missing_docs)]

mod arena;
mod io;
mod key;
mod nvme;
mod options;
pub mod policy;
pub mod record;
mod store;
pub mod trace;

pub use key::{BlockKey, ChunkHasher};
pub use options::{NvmeOptions, Options};
pub use policy::{ChainPos, EvictionPolicy, PolicyKind, PolicySizes};
pub use store::{BlockHandle, Latency, Prefix, Stats, Store};
