//! Real heap memory for the suite, in safe Rust.

use std::cell::Cell;

use crate::desc::Descriptor;
use crate::error::{Error, Result};

use super::harness::{MemoryFactory, TestMemory};

/// Allocates real, zeroed heap memory: for any backend that moves real host memory
/// (a third-party backend needs nothing else to run the suite). `Send + Sync`.
///
/// Each buffer is a boxed slice, whose address is stable for its life. Its bytes are
/// `Cell<u8>` because the backend under test writes them through raw pointers behind
/// Rust's back; `Cell` (an `UnsafeCell`) tells the compiler they may change under a
/// shared reference.
#[derive(Debug, Clone, Copy, Default)]
pub struct HeapMemoryFactory;

struct HeapMemory(Box<[Cell<u8>]>);

impl HeapMemory {
    fn range(&self, offset: usize, len: usize) -> Result<&[Cell<u8>]> {
        offset
            .checked_add(len)
            .and_then(|end| self.0.get(offset..end))
            .ok_or_else(|| Error::OutOfBounds(format!("{offset}+{len} of {}", self.0.len())))
    }
}

impl TestMemory for HeapMemory {
    fn desc(&self) -> Descriptor {
        Descriptor::new(self.0.as_ptr() as u64, self.0.len() as u64, 0)
    }

    fn write(&mut self, offset: usize, data: &[u8]) -> Result<()> {
        for (c, b) in self.range(offset, data.len())?.iter().zip(data) {
            c.set(*b);
        }
        Ok(())
    }

    fn read(&self, offset: usize, len: usize) -> Result<Vec<u8>> {
        Ok(self.range(offset, len)?.iter().map(Cell::get).collect())
    }
}

impl MemoryFactory for HeapMemoryFactory {
    fn alloc(&self, len: usize) -> Result<Box<dyn TestMemory>> {
        // At least one byte, so every buffer has an address of its own.
        let cells: Box<[Cell<u8>]> = (0..len.max(1)).map(|_| Cell::new(0)).collect();
        Ok(Box::new(HeapMemory(cells)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heap_memory_reads_back_and_stays_put() {
        let mut m = HeapMemoryFactory.alloc(4096).unwrap();
        let d = m.desc();
        assert_eq!(d.len, 4096);
        m.write(10, &[1, 2, 3]).unwrap();
        assert_eq!(m.read(9, 5).unwrap(), vec![0, 1, 2, 3, 0]);
        assert!(m.write(4095, &[1, 2]).is_err());
        assert!(m.read(usize::MAX, 2).is_err());
        assert_eq!(m.desc(), d);
        let moved = m; // moving the box does not move the bytes
        assert_eq!(moved.desc(), d);
    }
}
