//! The kvx KV block store: KV blocks that left the GPU are kept in a DRAM tier, spilled
//! to an NVMe tier, found again by prefix and brought back before they are needed — the
//! job of LMCache's storage mode and the AIBrix KV pool.
//!
//! A chunk of tokens (256 by default) is keyed by a chained **xxh3-128** hash of its
//! parent chunk's key, its token ids and the model identity (required), so
//! [`Store::lookup`] finds — and pins — the longest stored prefix of a request. DRAM is
//! one fixed arena (a registrable [`kv_mem::HostBuffer`]) carved by a slab allocator;
//! the NVMe tier is log-structured, checksummed (crc32c) segment files written with
//! io_uring and `O_DIRECT` through `kv-backend-gds`, recovered on open. Every read checks
//! a checksum. Eviction is behind [`EvictionPolicy`]: LRU, S3-FIFO, or the default
//! prefix-aware adaptive policy, which uses the chain structure [`Store::put_many`]
//! records. A prefill engine's loop:
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
//! let keys = store.chunk_keys(&tokens);                  // two full chunks of 4 tokens
//! let hit = store.lookup_keys(&keys);                    // the stored prefix, pinned
//! let mut kv = vec![vec![0u8; 5000]; keys.len()];        // the engine's KV blocks
//! let mut outs: Vec<&mut [u8]> = kv.iter_mut().map(|b| &mut b[..]).collect();
//! let n = store.get_many(hit.keys(), &mut outs)?;        // reload the hits (none yet)
//! drop(hit);
//! // ... compute the KV of chunks n.. ...
//! let blocks: Vec<&[u8]> = vec![&[7u8; 5000][..]; keys.len() - n];
//! assert_eq!(store.put_many(&keys, n, &blocks)?, 2);     // store the rest, never waits
//! assert_eq!(store.lookup(&tokens).tokens(), 8);
//! # drop(store); std::fs::remove_dir_all(&dir).ok();
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
