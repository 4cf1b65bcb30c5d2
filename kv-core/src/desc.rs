//! Memory kinds, descriptors and compact descriptor lists.

use crate::error::{Error, Result};

/// Where a range of memory lives. `Copy`, `Send + Sync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum MemKind {
    /// Host memory (heap, `mmap`, huge pages).
    Dram = 0,
    /// GPU memory; `Descriptor::device` is the GPU ordinal.
    Vram = 1,
    /// A file; `Descriptor::device` names the file registered with the backend and
    /// `Descriptor::addr` is an offset in it.
    File = 2,
    /// A raw block device; addressed like [`MemKind::File`].
    Block = 3,
    /// An object store bucket; `addr` is an offset into the object named by `device`.
    Object = 4,
}

impl MemKind {
    /// Every kind, in wire order.
    pub const ALL: [MemKind; 5] = [
        MemKind::Dram,
        MemKind::Vram,
        MemKind::File,
        MemKind::Block,
        MemKind::Object,
    ];

    /// The kind for a wire byte, if it names one.
    pub fn from_u8(v: u8) -> Option<MemKind> {
        MemKind::ALL.get(v as usize).copied()
    }

    /// The lower-case name used in logs and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            MemKind::Dram => "dram",
            MemKind::Vram => "vram",
            MemKind::File => "file",
            MemKind::Block => "block",
            MemKind::Object => "object",
        }
    }
}

impl std::fmt::Display for MemKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A set of [`MemKind`]s, as a bit mask. `Copy`, `Send + Sync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct MemKinds(u8);

impl MemKinds {
    /// No kinds.
    pub const NONE: MemKinds = MemKinds(0);

    /// The set holding exactly the given kinds.
    pub fn of(kinds: &[MemKind]) -> MemKinds {
        MemKinds(kinds.iter().fold(0, |m, k| m | (1 << *k as u8)))
    }

    /// True when `kind` is in the set.
    pub fn contains(self, kind: MemKind) -> bool {
        self.0 & (1 << kind as u8) != 0
    }

    /// The kinds in the set.
    pub fn iter(self) -> impl Iterator<Item = MemKind> {
        MemKind::ALL.into_iter().filter(move |k| self.contains(*k))
    }
}

/// One contiguous range: `len` bytes at `addr` on `device`. `Copy`, `Send + Sync`.
///
/// For DRAM `addr` is a virtual address and `device` is 0; for VRAM `device` is the GPU;
/// for files `addr` is an offset and `device` the file's registration number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Descriptor {
    /// Start address (or offset).
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// Device id (GPU ordinal, file number); 0 for host memory.
    pub device: u32,
}

impl Descriptor {
    /// A descriptor of `len` bytes at `addr` on `device`.
    pub const fn new(addr: u64, len: u64, device: u32) -> Self {
        Descriptor { addr, len, device }
    }

    /// One past the last byte, or `None` if `addr + len` overflows.
    pub fn end(&self) -> Option<u64> {
        self.addr.checked_add(self.len)
    }

    /// True when `other` lies wholly inside `self` (same device).
    pub fn contains(&self, other: &Descriptor) -> bool {
        match (self.end(), other.end()) {
            (Some(end), Some(oend)) => {
                self.device == other.device && other.addr >= self.addr && oend <= end
            }
            _ => false,
        }
    }

    /// True when the two ranges share at least one byte (same device).
    pub fn overlaps(&self, other: &Descriptor) -> bool {
        if self.device != other.device || self.len == 0 || other.len == 0 {
            return false;
        }
        let (Some(end), Some(oend)) = (self.end(), other.end()) else {
            return false;
        };
        self.addr < oend && other.addr < end
    }
}

/// One entry of a [`DescriptorList`]: a single range or a strided run of equal ranges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Entry {
    /// One range.
    Single(Descriptor),
    /// `count` ranges of `len` bytes, the `i`-th at `base + i * stride`.
    Strided {
        /// Address of the first range.
        base: u64,
        /// Distance between the starts of consecutive ranges.
        stride: u64,
        /// Number of ranges.
        count: u64,
        /// Length of each range.
        len: u64,
        /// Device of every range.
        device: u32,
    },
}

impl Entry {
    /// Number of descriptors this entry expands to.
    pub fn count(&self) -> u64 {
        match self {
            Entry::Single(_) => 1,
            Entry::Strided { count, .. } => *count,
        }
    }

    /// Total bytes of the expanded descriptors. Exact for every entry a
    /// [`DescriptorList`] holds (the list refuses entries whose total overflows).
    pub fn bytes(&self) -> u64 {
        match self {
            Entry::Single(d) => d.len,
            Entry::Strided { count, len, .. } => count.saturating_mul(*len),
        }
    }

    /// The `i`-th descriptor (`None` past the end or if its address would overflow).
    pub fn get(&self, i: u64) -> Option<Descriptor> {
        match *self {
            Entry::Single(d) => (i == 0).then_some(d),
            Entry::Strided {
                base,
                stride,
                count,
                len,
                device,
            } => {
                if i >= count {
                    return None;
                }
                let addr = i.checked_mul(stride)?.checked_add(base)?;
                Some(Descriptor::new(addr, len, device))
            }
        }
    }

    /// The smallest range holding every descriptor of the entry, or `None` on overflow
    /// or when the entry is empty.
    pub fn extent(&self) -> Option<Descriptor> {
        match *self {
            Entry::Single(d) => d.end().map(|_| d),
            Entry::Strided {
                base,
                stride,
                count,
                len,
                device,
            } => {
                if count == 0 {
                    return None;
                }
                let last = stride.checked_mul(count - 1)?.checked_add(base)?;
                let end = last.checked_add(len)?;
                let start = base;
                Some(Descriptor::new(start, end.checked_sub(start)?, device))
            }
        }
    }

    /// (descriptors, bytes) the entry adds to a list, or why no list may hold it: every
    /// address (`base + (count-1)*stride + len`) and the byte total must fit in a `u64`.
    fn checked_size(&self) -> Result<(u64, u64)> {
        match *self {
            Entry::Single(d) => match d.end() {
                Some(_) => Ok((1, d.len)),
                None => Err(Error::invalid_argument(format!(
                    "descriptor {:#x}+{} overflows the address space",
                    d.addr, d.len
                ))),
            },
            // A run of zero-length descriptors moves nothing and is not kept.
            Entry::Strided { count: 0, .. } | Entry::Strided { len: 0, .. } => Ok((0, 0)),
            Entry::Strided {
                base,
                stride,
                count,
                len,
                ..
            } => match (self.extent(), count.checked_mul(len)) {
                (Some(_), Some(bytes)) => Ok((count, bytes)),
                _ => Err(Error::invalid_argument(format!(
                    "strided run base={base:#x} stride={stride} count={count} len={len} overflows the address space"
                ))),
            },
        }
    }
}

/// An ordered list of descriptors, kept compact: regular layouts are stored as strided
/// entries and expanded lazily, so a paged KV cache of a million blocks costs a few
/// entries, not a million allocations. `Clone`, `Send + Sync`.
///
/// Every constructor validates what it is given: no descriptor's address computation
/// overflows a `u64`, and neither do the descriptor count and the byte total, so
/// [`get`](Self::get), [`slice`](Self::slice), [`coalesced`](Self::coalesced) and
/// [`total_bytes`](Self::total_bytes) are exact and cannot panic. Zero-length
/// descriptors are kept (they move nothing); zero-length strided runs are dropped.
/// Build one from descriptors with `collect::<Result<DescriptorList>>()`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct DescriptorList {
    entries: Vec<Entry>,
    count: u64,
    bytes: u64,
}

impl DescriptorList {
    /// An empty list.
    pub fn new() -> Self {
        Self::default()
    }

    /// A list of one descriptor; [`Error::InvalidArgument`] if `addr + len` overflows.
    pub fn single(desc: Descriptor) -> Result<Self> {
        let mut l = Self::new();
        l.push(desc)?;
        Ok(l)
    }

    /// A list of one strided run (see [`Entry::Strided`]).
    pub fn strided(base: u64, stride: u64, count: u64, len: u64, device: u32) -> Result<Self> {
        let mut l = Self::new();
        l.push_strided(base, stride, count, len, device)?;
        Ok(l)
    }

    /// A list of the given descriptors, in order (as `collect::<Result<DescriptorList>>()`).
    pub fn try_from_iter(descs: impl IntoIterator<Item = Descriptor>) -> Result<Self> {
        let mut l = Self::new();
        for d in descs {
            l.push(d)?;
        }
        Ok(l)
    }

    /// Appends one descriptor. A descriptor that continues the last run (same device and
    /// non-zero length, the next address at the same stride) extends it instead of
    /// adding an entry. [`Error::InvalidArgument`] if its end or the list's totals
    /// would overflow.
    pub fn push(&mut self, desc: Descriptor) -> Result<()> {
        self.push_entry(Entry::Single(desc))
    }

    /// Appends a strided run of `count` descriptors of `len` bytes, `stride` apart. A run
    /// of zero-length descriptors moves nothing and is not added.
    ///
    /// Fails with [`Error::InvalidArgument`] when the run's addresses overflow.
    pub fn push_strided(
        &mut self,
        base: u64,
        stride: u64,
        count: u64,
        len: u64,
        device: u32,
    ) -> Result<()> {
        self.push_entry(Entry::Strided {
            base,
            stride,
            count,
            len,
            device,
        })
    }

    /// Appends an entry (used by decoders: a strided entry is kept as is, a single one
    /// may continue the last run). Validated like [`DescriptorList::push_strided`].
    pub fn push_entry(&mut self, e: Entry) -> Result<()> {
        let (count, bytes) = e.checked_size()?;
        if count == 0 {
            return Ok(());
        }
        let (Some(new_count), Some(new_bytes)) =
            (self.count.checked_add(count), self.bytes.checked_add(bytes))
        else {
            return Err(Error::invalid_argument(format!(
                "appending {count} descriptors of {bytes} bytes to a list of {} descriptors and {} bytes overflows",
                self.count, self.bytes
            )));
        };
        self.count = new_count;
        self.bytes = new_bytes;
        match e {
            Entry::Single(d) => self.append_single(d),
            Entry::Strided { .. } => self.entries.push(e),
        }
        Ok(())
    }

    /// Adds a validated single descriptor, extending the last run where it continues it.
    fn append_single(&mut self, desc: Descriptor) {
        if let (Some(last), true) = (self.entries.last_mut(), desc.len > 0) {
            match *last {
                Entry::Single(prev)
                    if prev.device == desc.device
                        && prev.len == desc.len
                        && desc.addr > prev.addr =>
                {
                    *last = Entry::Strided {
                        base: prev.addr,
                        stride: desc.addr - prev.addr,
                        count: 2,
                        len: desc.len,
                        device: desc.device,
                    };
                    return;
                }
                Entry::Strided {
                    base,
                    stride,
                    count,
                    len,
                    device,
                } if device == desc.device
                    && len == desc.len
                    && count < u64::MAX
                    && Some(desc.addr)
                        == stride.checked_mul(count).and_then(|o| o.checked_add(base)) =>
                {
                    if let Entry::Strided { count, .. } = last {
                        *count += 1;
                    }
                    return;
                }
                _ => {}
            }
        }
        self.entries.push(Entry::Single(desc));
    }

    /// The compact entries.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// Number of descriptors (after expansion).
    pub fn len(&self) -> u64 {
        self.count
    }

    /// True when the list holds no descriptor.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Total bytes of all descriptors (exact: the list refuses totals above `u64::MAX`).
    pub fn total_bytes(&self) -> u64 {
        self.bytes
    }

    /// Iterates the expanded descriptors, lazily.
    pub fn iter(&self) -> Iter<'_> {
        Iter {
            entries: &self.entries,
            entry: 0,
            index: 0,
        }
    }

    /// The `i`-th descriptor (O(entries)).
    pub fn get(&self, mut i: u64) -> Option<Descriptor> {
        for e in &self.entries {
            let c = e.count();
            if i < c {
                return e.get(i);
            }
            i -= c;
        }
        None
    }

    /// The descriptors `start..end` as a new (still compact) list.
    pub fn slice(&self, start: u64, end: u64) -> Result<DescriptorList> {
        if start > end || end > self.count {
            return Err(Error::OutOfBounds(format!(
                "slice {start}..{end} of a list of {} descriptors",
                self.count
            )));
        }
        let mut out = DescriptorList::new();
        let mut pos = 0u64;
        for e in &self.entries {
            let c = e.count();
            let (lo, hi) = (start.max(pos), end.min(pos.saturating_add(c)));
            if lo < hi {
                match *e {
                    Entry::Single(d) => out.push(d)?,
                    Entry::Strided {
                        stride,
                        len,
                        device,
                        ..
                    } => {
                        let first = e.get(lo - pos).ok_or_else(|| {
                            Error::invalid_argument("strided entry overflows (list invariant)")
                        })?;
                        out.push_strided(first.addr, stride, hi - lo, len, device)?;
                    }
                }
            }
            pos = pos.saturating_add(c);
            if pos >= end {
                break;
            }
        }
        Ok(out)
    }

    /// True when every descriptor of `self` lies inside some descriptor of `outer`.
    /// Zero-length descriptors touch no byte and are always inside.
    ///
    /// O(entries × outer²) however many descriptors a strided run expands to.
    pub fn within(&self, outer: &[Descriptor]) -> bool {
        self.entries.iter().all(|e| match *e {
            Entry::Single(d) => d.len == 0 || outer.iter().any(|o| o.contains(&d)),
            Entry::Strided {
                base,
                stride,
                count,
                len,
                device,
            } => run_within(base, stride, count, len, device, outer),
        })
    }

    /// True when any two descriptors of the list share a byte.
    pub fn has_overlap(&self) -> bool {
        let mut v: Vec<Descriptor> = self.iter().filter(|d| d.len > 0).collect();
        v.sort_by_key(|d| (d.device, d.addr));
        v.windows(2).any(|w| w[0].overlaps(&w[1]))
    }

    /// A list with adjacent descriptors (one ending where the next starts, same device)
    /// merged into one; order is kept. Strided runs whose stride equals their length
    /// become single ranges.
    pub fn coalesced(&self) -> DescriptorList {
        // Every merged range covers exactly bytes of validated ranges, so the rebuild
        // cannot overflow; should it ever fail, the list itself is a correct answer.
        self.try_coalesced().unwrap_or_else(|_| self.clone())
    }

    fn try_coalesced(&self) -> Result<DescriptorList> {
        let mut out: Vec<Descriptor> = Vec::new();
        let mut list = DescriptorList::new();
        for e in &self.entries {
            let flat = match *e {
                Entry::Strided {
                    base,
                    stride,
                    len,
                    device,
                    ..
                } if stride == len => Some(Descriptor::new(base, e.bytes(), device)),
                Entry::Single(d) => Some(d),
                Entry::Strided { .. } => None,
            };
            match flat {
                Some(d) => match out.last_mut() {
                    Some(prev)
                        if prev.device == d.device
                            && prev.end() == Some(d.addr)
                            && d.end().is_some() =>
                    {
                        prev.len += d.len;
                    }
                    _ => out.push(d),
                },
                None => {
                    for d in out.drain(..) {
                        list.push(d)?;
                    }
                    list.push_entry(*e)?;
                }
            }
        }
        for d in out {
            list.push(d)?;
        }
        Ok(list)
    }
}

/// Whether the strided run lies in `outer`: jumps from one outer range to the next
/// instead of visiting each descriptor, so a run of 2^64 descriptors is checked in
/// O(outer²).
fn run_within(
    base: u64,
    stride: u64,
    count: u64,
    len: u64,
    device: u32,
    outer: &[Descriptor],
) -> bool {
    let mut i = 0u64;
    while i < count {
        let Some(addr) = i.checked_mul(stride).and_then(|o| o.checked_add(base)) else {
            return false;
        };
        let d = Descriptor::new(addr, len, device);
        // The containing range that reaches furthest: each jump then lands past its end,
        // so no outer range is chosen twice.
        let Some(end) = outer
            .iter()
            .filter(|o| o.contains(&d))
            .filter_map(|o| o.end())
            .max()
        else {
            return false;
        };
        if stride == 0 {
            return true;
        }
        // The last descriptor j >= i with addr_j + len <= end.
        let fits = (end - len - base) / stride; // end >= addr + len >= base + len
        i = fits.saturating_add(1).max(i + 1);
    }
    true
}

impl FromIterator<Descriptor> for Result<DescriptorList> {
    /// Collects descriptors into a list, failing on the first one the list refuses.
    fn from_iter<I: IntoIterator<Item = Descriptor>>(iter: I) -> Self {
        DescriptorList::try_from_iter(iter)
    }
}

impl<'a> IntoIterator for &'a DescriptorList {
    type Item = Descriptor;
    type IntoIter = Iter<'a>;
    fn into_iter(self) -> Iter<'a> {
        self.iter()
    }
}

/// Lazy iterator over the descriptors of a [`DescriptorList`].
#[derive(Debug, Clone)]
pub struct Iter<'a> {
    entries: &'a [Entry],
    entry: usize,
    index: u64,
}

impl Iterator for Iter<'_> {
    type Item = Descriptor;

    #[inline]
    fn next(&mut self) -> Option<Descriptor> {
        loop {
            let e = self.entries.get(self.entry)?;
            if let Some(d) = e.get(self.index) {
                self.index += 1;
                return Some(d);
            }
            self.entry += 1;
            self.index = 0;
        }
    }
}

/// One piece of a transfer: `len` bytes between a local and a remote address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Local descriptor piece.
    pub local: Descriptor,
    /// Remote descriptor piece (same length).
    pub remote: Descriptor,
}

/// Pairs a local and a remote list of equal total length into segments, splitting
/// where either side's descriptor boundary falls. Lazy; zero-length descriptors are skipped.
pub fn segments<'a>(local: &'a DescriptorList, remote: &'a DescriptorList) -> Result<Segments<'a>> {
    if local.total_bytes() != remote.total_bytes() {
        return Err(Error::invalid_argument(format!(
            "local list has {} bytes but remote list has {}; they must be equal",
            local.total_bytes(),
            remote.total_bytes()
        )));
    }
    Ok(Segments {
        local: local.iter(),
        remote: remote.iter(),
        l: None,
        r: None,
    })
}

/// Iterator returned by [`segments`].
#[derive(Debug, Clone)]
pub struct Segments<'a> {
    local: Iter<'a>,
    remote: Iter<'a>,
    l: Option<Descriptor>,
    r: Option<Descriptor>,
}

impl Iterator for Segments<'_> {
    type Item = Segment;

    fn next(&mut self) -> Option<Segment> {
        let mut l = match self.l.take() {
            Some(d) => d,
            None => self.local.by_ref().find(|d| d.len > 0)?,
        };
        let mut r = match self.r.take() {
            Some(d) => d,
            None => self.remote.by_ref().find(|d| d.len > 0)?,
        };
        let n = l.len.min(r.len);
        let seg = Segment {
            local: Descriptor::new(l.addr, n, l.device),
            remote: Descriptor::new(r.addr, n, r.device),
        };
        if l.len > n {
            l.addr += n;
            l.len -= n;
            self.l = Some(l);
        }
        if r.len > n {
            r.addr += n;
            r.len -= n;
            self.r = Some(r);
        }
        Some(seg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn push_builds_strided_runs() {
        let l: DescriptorList = (0..1000u64)
            .map(|i| Descriptor::new(0x1000 + i * 64, 32, 0))
            .collect::<Result<_>>()
            .unwrap();
        assert_eq!(l.entries().len(), 1);
        assert_eq!(l.len(), 1000);
        assert_eq!(l.total_bytes(), 32_000);
        assert_eq!(l.get(999), Some(Descriptor::new(0x1000 + 999 * 64, 32, 0)));
        assert_eq!(l.iter().count(), 1000);
    }

    #[test]
    fn million_blocks_are_one_entry() {
        let l = DescriptorList::strided(0x10_0000, 32 * 1024, 1 << 20, 32 * 1024, 0).unwrap();
        assert_eq!(l.entries().len(), 1);
        assert_eq!(l.len(), 1 << 20);
        let c = l.coalesced();
        assert_eq!(c.entries().len(), 1);
        assert_eq!(c.len(), 1);
        assert_eq!(c.total_bytes(), 32 << 30);
    }

    #[test]
    fn slicing_keeps_runs() {
        let mut l = DescriptorList::strided(0, 100, 10, 10, 0).unwrap();
        l.push(Descriptor::new(5000, 7, 1)).unwrap();
        let s = l.slice(3, 11).unwrap();
        assert_eq!(s.len(), 8);
        assert_eq!(s.get(0), Some(Descriptor::new(300, 10, 0)));
        assert_eq!(s.get(7), Some(Descriptor::new(5000, 7, 1)));
        assert!(l.slice(3, 12).is_err());
        assert!(l.slice(4, 3).is_err());
    }

    #[test]
    fn bounds_and_overlap() {
        let reg = [Descriptor::new(1000, 1000, 0)];
        // Zero-length descriptors touch nothing, wherever they point.
        let zero = DescriptorList::single(Descriptor::new(5, 0, 3)).unwrap();
        assert!(zero.within(&reg) && zero.within(&[]));
        assert!(DescriptorList::strided(1000, 100, 10, 100, 0)
            .unwrap()
            .within(&reg));
        assert!(!DescriptorList::strided(1000, 100, 10, 101, 0)
            .unwrap()
            .within(&reg));
        assert!(!DescriptorList::single(Descriptor::new(1000, 10, 1))
            .unwrap()
            .within(&reg));
        let two = [Descriptor::new(0, 50, 0), Descriptor::new(100, 50, 0)];
        assert!(DescriptorList::strided(0, 100, 2, 50, 0)
            .unwrap()
            .within(&two));
        assert!(!DescriptorList::strided(0, 100, 2, 51, 0)
            .unwrap()
            .within(&two));
        assert!(!DescriptorList::strided(0, 10, 3, 20, 0)
            .unwrap()
            .iter()
            .all(|_| false));
        assert!(DescriptorList::strided(0, 10, 3, 20, 0)
            .unwrap()
            .has_overlap());
        assert!(!DescriptorList::strided(0, 20, 3, 20, 0)
            .unwrap()
            .has_overlap());
        assert!(DescriptorList::strided(u64::MAX - 10, 10, 3, 1, 0).is_err());
    }

    #[test]
    fn extremes_do_not_overflow_or_hang() {
        let mut l = DescriptorList::new();
        l.push_strided(0, 1, u64::MAX, 0, 0).unwrap(); // zero-length run: nothing
        assert!(l.is_empty());
        l.push_entry(Entry::Strided {
            base: 0,
            stride: 0,
            count: u64::MAX,
            len: 0,
            device: 0,
        })
        .unwrap();
        assert!(l.is_empty());
        l.push_strided(0, 0, u64::MAX - 1, 1, 0).unwrap();
        l.push(Descriptor::new(0, 1, 0)).unwrap();
        assert_eq!(l.len(), u64::MAX);
        // One more descriptor would overflow the count: refused, list unchanged.
        let before = l.clone();
        assert!(matches!(
            l.push(Descriptor::new(0, 1, 0)),
            Err(Error::InvalidArgument(_))
        ));
        assert_eq!(l, before);
        assert!(l.slice(u64::MAX - 2, u64::MAX).is_ok());
        let big: DescriptorList = [
            Descriptor::new(0, u64::MAX - 1, 0),
            Descriptor::new(u64::MAX - 1, 1, 0),
        ]
        .into_iter()
        .collect::<Result<_>>()
        .unwrap();
        assert_eq!(big.coalesced().len(), 1);
        assert_eq!(big.total_bytes(), u64::MAX);
    }

    #[test]
    fn overflowing_descriptors_are_refused() {
        let refused = |r: Result<()>| matches!(r, Err(Error::InvalidArgument(_)));
        let mut l = DescriptorList::new();
        assert!(refused(l.push(Descriptor::new(u64::MAX, 1, 0))));
        assert!(DescriptorList::single(Descriptor::new(u64::MAX, 1, 0)).is_err());
        assert!(DescriptorList::single(Descriptor::new(u64::MAX, 0, 0)).is_ok());
        // base + (count-1)*stride + len must fit: the last byte here would be at 2^64.
        assert!(DescriptorList::strided(u64::MAX - 100, 50, 3, 1, 0).is_err());
        assert!(DescriptorList::strided(u64::MAX - 101, 50, 3, 1, 0).is_ok());
        // count * len must fit even when the addresses do (stride 0 repeats one range).
        assert!(DescriptorList::strided(0, 0, u64::MAX, 2, 0).is_err());
        // Totals across entries must fit too.
        let mut l = DescriptorList::single(Descriptor::new(0, u64::MAX, 0)).unwrap();
        assert!(refused(l.push(Descriptor::new(0, 1, 0))));
        assert!(refused(l.push_entry(Entry::Strided {
            base: 0,
            stride: 1,
            count: 2,
            len: 1,
            device: 0
        })));
        assert_eq!((l.len(), l.total_bytes()), (1, u64::MAX));
        let r: Result<DescriptorList> = [Descriptor::new(1, 1, 0), Descriptor::new(u64::MAX, 2, 0)]
            .into_iter()
            .collect();
        assert!(matches!(r, Err(Error::InvalidArgument(_))));
    }

    #[test]
    fn huge_runs_are_checked_without_expanding() {
        let half = 1u64 << 62;
        let outer = [
            Descriptor::new(0, half, 0),
            Descriptor::new(half + 1, u64::MAX - half - 1, 0),
        ];
        // 2^64-1 one-byte descriptors: one falls into the gap at 2^62.
        let run = DescriptorList::strided(0, 1, u64::MAX, 1, 0).unwrap();
        let start = std::time::Instant::now();
        assert!(!run.within(&outer));
        // Stepping over the gap: every descriptor lies in one of the two ranges.
        let around = DescriptorList::strided(half - 1, 2, (u64::MAX - half) / 2, 1, 0).unwrap();
        assert!(around.within(&outer));
        assert!(start.elapsed() < std::time::Duration::from_secs(1));
    }

    #[test]
    fn coalesce_merges_adjacent() {
        let l: DescriptorList = [
            Descriptor::new(0, 10, 0),
            Descriptor::new(10, 10, 0),
            Descriptor::new(30, 10, 0),
            Descriptor::new(40, 5, 0),
            Descriptor::new(45, 5, 1),
        ]
        .into_iter()
        .collect::<Result<_>>()
        .unwrap();
        let c: Vec<_> = l.coalesced().iter().collect();
        assert_eq!(
            c,
            vec![
                Descriptor::new(0, 20, 0),
                Descriptor::new(30, 15, 0),
                Descriptor::new(45, 5, 1)
            ]
        );
    }

    #[test]
    fn segments_split_at_both_boundaries() {
        let local: DescriptorList = [Descriptor::new(0, 10, 0), Descriptor::new(100, 6, 0)]
            .into_iter()
            .collect::<Result<_>>()
            .unwrap();
        let remote = DescriptorList::strided(1000, 8, 2, 8, 0).unwrap();
        let s: Vec<_> = segments(&local, &remote).unwrap().collect();
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].local, Descriptor::new(0, 8, 0));
        assert_eq!(s[1].local, Descriptor::new(8, 2, 0));
        assert_eq!(s[1].remote, Descriptor::new(1008, 2, 0));
        assert_eq!(s[2].local, Descriptor::new(100, 6, 0));
        assert_eq!(s[2].remote, Descriptor::new(1010, 6, 0));
        let short = DescriptorList::single(Descriptor::new(0, 1, 0)).unwrap();
        assert!(segments(&local, &short).is_err());
    }

    fn arb_desc() -> impl Strategy<Value = Descriptor> {
        (0u64..1 << 40, 0u64..4096, 0u32..3).prop_map(|(a, l, d)| Descriptor::new(a, l, d))
    }

    fn arb_entry() -> impl Strategy<Value = Entry> {
        let edge = prop_oneof![
            any::<u64>(),
            Just(0u64),
            Just(1u64),
            Just(u64::MAX),
            (0u64..64).prop_map(|d| u64::MAX - d),
            (0u32..64).prop_map(|s| 1u64 << s),
        ];
        prop_oneof![
            (edge.clone(), edge.clone(), any::<u32>())
                .prop_map(|(a, l, d)| Entry::Single(Descriptor::new(a, l, d))),
            (edge.clone(), edge.clone(), edge.clone(), edge, 0u32..2).prop_map(
                |(base, stride, count, len, device)| Entry::Strided {
                    base,
                    stride,
                    count,
                    len,
                    device
                }
            ),
        ]
    }

    proptest! {
        /// Whatever entries arrive (from a peer's metadata, say), a list either refuses
        /// one with InvalidArgument and stays unchanged, or holds only entries whose every
        /// address and total fit: then nothing panics or wraps.
        #[test]
        fn any_entries_keep_the_invariant(es in proptest::collection::vec(arb_entry(), 0..6)) {
            let mut l = DescriptorList::new();
            let (mut count, mut bytes) = (0u128, 0u128);
            for e in es {
                let before = l.clone();
                match l.push_entry(e) {
                    Ok(()) => {
                        let each = match e {
                            Entry::Single(d) => d.len,
                            Entry::Strided { len, .. } => len,
                        };
                        let kept = matches!(e, Entry::Single(_)) || (each > 0 && e.count() > 0);
                        if kept {
                            count += e.count() as u128;
                            bytes += e.count() as u128 * each as u128;
                            let fits = e.extent().is_some_and(|x| x.end().is_some());
                            prop_assert!(fits, "accepted an overflowing entry {:?}", e);
                        }
                    }
                    Err(err) => {
                        prop_assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
                        prop_assert_eq!(&l, &before);
                    }
                }
            }
            prop_assert_eq!(l.len() as u128, count);
            prop_assert_eq!(l.total_bytes() as u128, bytes);
            for i in [0, 1, l.len() / 2, l.len().saturating_sub(1), l.len()] {
                let d = l.get(i);
                prop_assert_eq!(d.is_some(), i < l.len());
                prop_assert!(d.is_none_or(|d| d.end().is_some()));
            }
            let _ = l.slice(l.len() / 3, l.len() / 2).unwrap();
            let c = l.coalesced();
            prop_assert_eq!(c.total_bytes(), l.total_bytes());
            let _ = l.within(&[Descriptor::new(0, u64::MAX, 0), Descriptor::new(1 << 40, 1 << 20, 1)]);
            prop_assert!(l.iter().take(1000).all(|d| d.end().is_some()));
        }

        #[test]
        fn compact_form_expands_to_what_was_pushed(v in proptest::collection::vec(arb_desc(), 0..200)) {
            let l = DescriptorList::try_from_iter(v.iter().copied()).unwrap();
            let back: Vec<_> = l.iter().collect();
            prop_assert_eq!(&back, &v);
            prop_assert_eq!(l.len(), v.len() as u64);
            prop_assert_eq!(l.total_bytes(), v.iter().map(|d| d.len).sum::<u64>());
        }

        #[test]
        fn regular_runs_compress(base in 0u64..1 << 40, stride in 1u64..1 << 20, n in 1u64..5000) {
            let l = DescriptorList::try_from_iter((0..n).map(|i| Descriptor::new(base + i * stride, stride.min(64), 0))).unwrap();
            prop_assert!(l.entries().len() <= 1);
            prop_assert_eq!(l.len(), n);
        }

        #[test]
        fn coalescing_keeps_bytes_in_order(v in proptest::collection::vec(arb_desc(), 0..100)) {
            let l = DescriptorList::try_from_iter(v.iter().copied()).unwrap();
            let c = l.coalesced();
            prop_assert_eq!(c.total_bytes(), l.total_bytes());
            let a: Vec<(u32, u64)> = l.iter().flat_map(|d| (0..d.len).map(move |i| (d.device, d.addr + i))).take(10_000).collect();
            let b: Vec<(u32, u64)> = c.iter().flat_map(|d| (0..d.len).map(move |i| (d.device, d.addr + i))).take(10_000).collect();
            prop_assert_eq!(a, b);
        }

        #[test]
        fn slices_match_expansion(v in proptest::collection::vec(arb_desc(), 0..100), a in 0usize..100, b in 0usize..100) {
            let l = DescriptorList::try_from_iter(v.iter().copied()).unwrap();
            let (a, b) = (a.min(v.len()), b.min(v.len()));
            let (a, b) = (a.min(b), a.max(b));
            let s = l.slice(a as u64, b as u64).unwrap();
            prop_assert_eq!(s.iter().collect::<Vec<_>>(), v[a..b].to_vec());
        }
    }
}
