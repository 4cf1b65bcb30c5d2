//! What reads hand out: block handles (pinned DRAM copies) and pinned prefixes.

use std::sync::Arc;

use kv_core::{Descriptor, Error, Result};

use super::inner::Inner;
use crate::arena::Slot;
use crate::key::BlockKey;

/// A block kept readable in DRAM while the handle lives (it holds the slot, so the block
/// is not evicted and its memory not reused). `Send + Sync`.
#[derive(Debug, Clone)]
pub struct BlockHandle {
    pub(crate) key: BlockKey,
    pub(crate) len: u64,
    /// The payload's offset in the arena.
    pub(crate) offset: u64,
    pub(crate) slot: Arc<Slot>,
}

impl BlockHandle {
    /// The block's key.
    pub fn key(&self) -> BlockKey {
        self.key
    }

    /// Payload length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True for an empty block (never: blocks have at least one byte).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The payload's offset in [`Store::arena`].
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The payload as a DRAM descriptor inside the arena: an agent that registered
    /// [`Store::arena`] can transfer straight from it.
    pub fn descriptor(&self) -> Descriptor {
        let base = self.slot.arena().region().descriptor().addr;
        Descriptor::new(base + self.offset(), self.len, 0)
    }

    /// The payload bytes, without copying. [`BlockHandle::read_into`] and
    /// [`BlockHandle::to_vec`] copy them without any promise.
    ///
    /// # Safety
    ///
    /// Nothing may write into [`Store::arena`](crate::Store::arena) through a registration
    /// of it while the slice lives: register the arena with an agent or backend only
    /// read-only (`kv_agent::RegisterOptions { access: Access::ReadOnly, .. }`; peers may
    /// then only READ it) or not at all. The store itself never writes a block's bytes
    /// while a handle to it exists.
    #[allow(unsafe_code)]
    pub unsafe fn as_slice(&self) -> &[u8] {
        // SAFETY: the caller's promise is `Arena::bytes`'s; the store does not write a
        // slot a handle pins.
        unsafe { self.slot.arena().bytes(self.offset(), self.len) }
            .expect("a handle's range lies in its slot, inside the arena")
    }

    /// Copies the payload into `out` (which must be exactly `len()` bytes).
    pub fn read_into(&self, out: &mut [u8]) -> Result<()> {
        if out.len() as u64 != self.len {
            return Err(Error::invalid_argument(format!(
                "read_into a buffer of {} bytes; the block has {}",
                out.len(),
                self.len
            )));
        }
        self.slot.arena().read(self.offset(), out)
    }

    /// The payload as a new vector.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.len as usize];
        // Cannot fail: `v` has exactly `len` bytes and the range lies in the arena.
        if let Err(e) = self.read_into(&mut v) {
            tracing::error!(error = %e, "copying a block out of the arena failed");
        }
        v
    }
}

/// The stored prefix of a request, from [`Store::lookup`]: the keys of its leading
/// stored chunks in order, each pinned (no tier evicts it) until this is dropped, so
/// every key here can be read with [`Store::get`]. `Send + Sync`.
pub struct Prefix {
    pub(crate) inner: Arc<Inner>,
    pub(crate) keys: Vec<BlockKey>,
    pub(crate) chunk_tokens: usize,
}

impl std::fmt::Debug for Prefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prefix").field("keys", &self.keys).finish()
    }
}

impl Prefix {
    /// The matched chunks' keys, in order.
    pub fn keys(&self) -> &[BlockKey] {
        &self.keys
    }

    /// Matched chunks.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// True when not even the first chunk is stored.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Matched tokens (full chunks).
    pub fn tokens(&self) -> usize {
        self.keys.len() * self.chunk_tokens
    }
}

impl Drop for Prefix {
    fn drop(&mut self) {
        for k in &self.keys {
            if let Some(e) = self.inner.shard(*k).write().get_mut(k) {
                e.pins = e.pins.saturating_sub(1);
            }
        }
    }
}
