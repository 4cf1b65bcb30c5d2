//! Memory a kvx user can register: aligned host buffers (heap, `mmap`, huge pages,
//! locked), file segments and GPU memory, kept alive by an owned [`Region`].
//!
//! A [`Region`] owns its memory behind an `Arc`; registrations and in-flight transfers
//! hold clones, so the memory cannot be freed while anything may still touch it, and
//! [`Region::into_inner`] gives it back only when nothing does. The
//! [`RegistrationCache`] makes many small registrations inside one allocation cost one
//! backend registration.
//!
//! Memory the engine allocated itself (a tensor's storage, pinned host memory, a VRAM
//! pointer) is wrapped with the `unsafe` [`EngineMemory`] constructor. An engine that
//! allocates its KV tensors from a [`SharedArena`] gets memfd-backed memory, which
//! same-host peers map instead of copying it through the kernel.
//!
//! ```
//! use kv_mem::{HostBuffer, Region};
//!
//! let mut buf = HostBuffer::alloc(1 << 20, 4096)?;     // 1 MiB, page-aligned, zeroed
//! buf.as_mut_slice()[..5].copy_from_slice(b"hello");
//! let region = Region::new(buf);
//! let d = region.descriptor();
//! assert_eq!((d.len, d.addr % 4096), (1 << 20, 0));
//! let page = region.slice(4096, 4096)?;                 // a sub-range for a transfer
//! assert_eq!(page.addr, d.addr + 4096);
//! let buf = region.into_inner().map_err(|_| "still shared").unwrap(); // nothing holds it now
//! assert_eq!(&buf.as_slice()[..5], b"hello");
//! # Ok::<(), kv_core::Error>(())
//! ```

#![warn(missing_docs)]

mod arena;
mod cache;
#[cfg(feature = "conformance")]
pub mod conformance;
mod engine;
mod file;
mod host;
mod region;
#[cfg(feature = "cuda")]
mod vram;

pub use arena::{ArenaBuffer, SharedArena};
pub use cache::{CacheKey, RegistrationCache};
pub use engine::EngineMemory;
pub use file::FileSegment;
pub use host::{shared_backing, HostBuffer, HostOptions, SharedBacking};
pub use region::{Memory, Region};
#[cfg(feature = "cuda")]
pub use vram::VramBuffer;
