//! Host memory for the kv-core conformance suite, for backends that move real memory.

use kv_core::conformance::{MemoryFactory, TestMemory};
use kv_core::{Descriptor, Error, Result};

use crate::HostBuffer;

/// Allocates page-aligned [`HostBuffer`]s for [`kv_core::conformance`]. `Send + Sync`.
#[derive(Debug, Clone, Copy, Default)]
pub struct HostMemoryFactory;

/// Allocates memfd-backed [`HostBuffer::shared`] buffers, so same-host backends can
/// exercise their shared-mapping path. `Send + Sync`.
#[derive(Debug, Clone, Copy, Default)]
pub struct SharedHostMemoryFactory;

impl MemoryFactory for SharedHostMemoryFactory {
    fn alloc(&self, len: usize) -> Result<Box<dyn TestMemory>> {
        Ok(Box::new(HostTestMemory(HostBuffer::shared(len.max(1))?)))
    }
}

struct HostTestMemory(HostBuffer);

impl TestMemory for HostTestMemory {
    fn desc(&self) -> Descriptor {
        self.0.descriptor()
    }

    fn write(&mut self, offset: usize, data: &[u8]) -> Result<()> {
        let end = offset
            .checked_add(data.len())
            .filter(|e| *e <= self.0.len())
            .ok_or_else(|| Error::OutOfBounds(format!("{offset}+{}", data.len())))?;
        self.0.as_mut_slice()[offset..end].copy_from_slice(data);
        Ok(())
    }

    fn read(&self, offset: usize, len: usize) -> Result<Vec<u8>> {
        let end = offset
            .checked_add(len)
            .filter(|e| *e <= self.0.len())
            .ok_or_else(|| Error::OutOfBounds(format!("{offset}+{len}")))?;
        Ok(self.0.as_slice()[offset..end].to_vec())
    }
}

impl MemoryFactory for HostMemoryFactory {
    fn alloc(&self, len: usize) -> Result<Box<dyn TestMemory>> {
        Ok(Box::new(HostTestMemory(HostBuffer::alloc(
            len.max(1),
            4096,
        )?)))
    }
}
