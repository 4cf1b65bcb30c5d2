//! `ItemGrid`: a descriptor list given by a formula instead of stored entries — item
//! `i` of a layer's KV memory, for prepared lists of a hundred thousand blocks that
//! cost a few bytes each rather than a stored descriptor.

use kv_core::{Descriptor, DescriptorList, Entry, Error, Result};

/// The items of one layer's KV memory as a grid: item
/// `((plane × blocks + block) × chunks + chunk) × heads + head` is one descriptor run
/// (a [`kv_core::Entry`]) at
/// `plane_bases[plane] + block × block_stride + chunk × chunk_stride + head × head_stride`,
/// made of `inner_count` ranges of `inner_len` bytes, `inner_stride` apart.
/// `Clone`, `Send + Sync`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemGrid {
    /// First byte of item 0 of each plane.
    pub plane_bases: Vec<u64>,
    /// Blocks per plane.
    pub blocks: u64,
    /// Distance between blocks.
    pub block_stride: u64,
    /// Chunks (runs of tokens) per block.
    pub chunks: u64,
    /// Distance between chunks of a block.
    pub chunk_stride: u64,
    /// Items per chunk (one per head when heads are moved one by one, else 1).
    pub heads: u64,
    /// Distance between those heads.
    pub head_stride: u64,
    /// Ranges per item.
    pub inner_count: u64,
    /// Distance between the ranges of an item.
    pub inner_stride: u64,
    /// Bytes of each range.
    pub inner_len: u64,
    /// Device of the memory.
    pub device: u32,
}

impl ItemGrid {
    /// Number of items.
    pub fn len(&self) -> u64 {
        self.plane_bases.len() as u64 * self.blocks * self.chunks * self.heads
    }

    /// True when the grid has no item.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of one item.
    pub fn item_bytes(&self) -> u64 {
        self.inner_count * self.inner_len
    }

    /// Checks that every item's address fits in a `u64` and items are not empty.
    pub fn validate(&self) -> Result<()> {
        if self.inner_count == 0 || self.inner_len == 0 || self.is_empty() {
            return Err(Error::invalid_argument("an item grid with empty items"));
        }
        for p in 0..self.plane_bases.len() {
            self.plane_extent(p)?;
        }
        Ok(())
    }

    /// The range every item of `plane` lies in.
    pub fn plane_extent(&self, plane: usize) -> Result<Descriptor> {
        let base = *self
            .plane_bases
            .get(plane)
            .ok_or_else(|| Error::OutOfBounds(format!("plane {plane} of an item grid")))?;
        let last = |n: u64, stride: u64| n.saturating_sub(1).checked_mul(stride);
        let end = [
            last(self.blocks, self.block_stride),
            last(self.chunks, self.chunk_stride),
            last(self.heads, self.head_stride),
            last(self.inner_count, self.inner_stride),
            Some(base),
            Some(self.inner_len),
        ]
        .into_iter()
        .try_fold(0u64, |acc, x| x.and_then(|x| acc.checked_add(x)))
        .ok_or_else(|| Error::invalid_argument("an item grid overflows the address space"))?;
        Ok(Descriptor::new(base, end - base, self.device))
    }

    /// The plane item `i` belongs to.
    pub fn plane_of(&self, i: u64) -> usize {
        (i / (self.blocks * self.chunks * self.heads).max(1)) as usize
    }

    /// Item `i`, or `None` past the end. Never overflows for a validated grid.
    pub fn item(&self, i: u64) -> Option<Entry> {
        if i >= self.len() {
            return None;
        }
        let head = i % self.heads;
        let rest = i / self.heads;
        let chunk = rest % self.chunks;
        let rest = rest / self.chunks;
        let block = rest % self.blocks;
        let plane = (rest / self.blocks) as usize;
        let addr = self.plane_bases[plane]
            + block * self.block_stride
            + chunk * self.chunk_stride
            + head * self.head_stride;
        Some(
            if self.inner_count == 1 || self.inner_stride == self.inner_len {
                Entry::Single(Descriptor::new(addr, self.item_bytes(), self.device))
            } else {
                Entry::Strided {
                    base: addr,
                    stride: self.inner_stride,
                    count: self.inner_count,
                    len: self.inner_len,
                    device: self.device,
                }
            },
        )
    }

    /// Items `ids`, in order, as one descriptor list (consecutive items that continue a
    /// regular run merge into strided entries).
    pub fn select(&self, ids: &[u32]) -> Result<DescriptorList> {
        let mut out = DescriptorList::new();
        for &i in ids {
            let e = self.item(i as u64).ok_or_else(|| {
                Error::OutOfBounds(format!("item {i} of a grid of {}", self.len()))
            })?;
            out.push_entry(e)?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grid() -> ItemGrid {
        ItemGrid {
            plane_bases: vec![0x10000, 0x20000],
            blocks: 4,
            block_stride: 0x1000,
            chunks: 2,
            chunk_stride: 0x100,
            heads: 1,
            head_stride: 0,
            inner_count: 3,
            inner_stride: 0x400,
            inner_len: 0x80,
            device: 0,
        }
    }

    #[test]
    fn items_follow_the_formula() {
        let g = grid();
        g.validate().unwrap();
        assert_eq!(g.len(), 16);
        assert_eq!(
            g.item(2 * 4 + 3 * 2 + 1),
            Some(Entry::Strided {
                base: 0x20000 + 3 * 0x1000 + 0x100,
                stride: 0x400,
                count: 3,
                len: 0x80,
                device: 0
            })
        );
        assert_eq!(g.plane_of(9), 1);
        assert_eq!(g.item(16), None);
        let e = g.plane_extent(1).unwrap();
        assert_eq!(e.addr, 0x20000);
        assert_eq!(e.len, 3 * 0x1000 + 0x100 + 2 * 0x400 + 0x80);
        let every = g.select(&(0..16).collect::<Vec<u32>>()).unwrap();
        assert_eq!(every.total_bytes(), 16 * g.item_bytes());
        assert!(every.within(&[g.plane_extent(0).unwrap(), e]));
        assert!(g.select(&[16]).is_err());
        let mut flat = g.clone();
        flat.inner_stride = flat.inner_len;
        assert!(matches!(flat.item(0), Some(Entry::Single(d)) if d.len == 3 * 0x80));
        let mut huge = g;
        huge.plane_bases[0] = u64::MAX - 10;
        assert!(huge.validate().is_err());
    }
}
