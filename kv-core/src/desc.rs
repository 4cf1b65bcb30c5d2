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

    /// Total bytes of the expanded descriptors.
    pub fn bytes(&self) -> u64 {
        match self {
            Entry::Single(d) => d.len,
            Entry::Strided { count, len, .. } => count.saturating_mul(*len),
        }
    }

    /// The `i`-th descriptor (`i < count()`).
    pub fn get(&self, i: u64) -> Option<Descriptor> {
        match *self {
            Entry::Single(d) => (i == 0).then_some(d),
            Entry::Strided {
                base,
                stride,
                count,
                len,
                device,
            } => (i < count).then(|| Descriptor::new(base.wrapping_add(i * stride), len, device)),
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
}

/// An ordered list of descriptors, kept compact: regular layouts are stored as strided
/// entries and expanded lazily, so a paged KV cache of a million blocks costs a few
/// entries, not a million allocations. `Clone`, `Send + Sync`.
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

    /// A list of one descriptor.
    pub fn single(desc: Descriptor) -> Self {
        let mut l = Self::new();
        l.push(desc);
        l
    }

    /// A list of one strided run (see [`Entry::Strided`]).
    pub fn strided(base: u64, stride: u64, count: u64, len: u64, device: u32) -> Result<Self> {
        let mut l = Self::new();
        l.push_strided(base, stride, count, len, device)?;
        Ok(l)
    }

    /// Appends one descriptor. A descriptor that continues the last strided run (same
    /// device, length and stride) extends it instead of adding an entry.
    pub fn push(&mut self, desc: Descriptor) {
        self.count = self.count.saturating_add(1);
        self.bytes = self.bytes.saturating_add(desc.len);
        if let Some(last) = self.entries.last_mut() {
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
        if count == 0 || len == 0 {
            return Ok(());
        }
        let e = Entry::Strided {
            base,
            stride,
            count,
            len,
            device,
        };
        if e.extent().is_none() || count.checked_mul(len).is_none() {
            return Err(Error::invalid_argument(format!(
                "strided run base={base:#x} stride={stride} count={count} len={len} overflows the address space"
            )));
        }
        self.push_entry(e);
        Ok(())
    }

    /// Appends an entry as is (used by decoders; strided entries are not re-merged).
    pub fn push_entry(&mut self, e: Entry) {
        if e.count() == 0 || matches!(e, Entry::Strided { len: 0, .. }) {
            return;
        }
        self.count = self.count.saturating_add(e.count());
        self.bytes = self.bytes.saturating_add(e.bytes());
        if let Entry::Single(d) = e {
            // Let a single continue a run, as `push` does.
            self.count -= 1;
            self.bytes -= d.len;
            self.push(d);
        } else {
            self.entries.push(e);
        }
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

    /// Total bytes of all descriptors.
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
                    Entry::Single(d) => out.push(d),
                    Entry::Strided {
                        base,
                        stride,
                        len,
                        device,
                        ..
                    } => {
                        let b = base + (lo - pos) * stride;
                        out.push_strided(b, stride, hi - lo, len, device)?;
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
    ///
    /// Strided entries are checked by their extent, so this is O(entries × outer entries)
    /// for lists whose runs do not straddle gaps in `outer`.
    pub fn within(&self, outer: &[Descriptor]) -> bool {
        self.entries.iter().all(|e| match e.extent() {
            Some(x) if outer.iter().any(|o| o.contains(&x)) => true,
            Some(_) => match *e {
                // The run's extent straddles several outer ranges: check each descriptor.
                Entry::Strided { count, .. } => (0..count).all(|i| {
                    e.get(i)
                        .is_some_and(|d| outer.iter().any(|o| o.contains(&d)))
                }),
                Entry::Single(_) => false,
            },
            None => false,
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
        let mut out: Vec<Descriptor> = Vec::new();
        let mut list = DescriptorList::new();
        for e in &self.entries {
            let flat = match *e {
                Entry::Strided {
                    base,
                    stride,
                    count,
                    len,
                    device,
                } if stride == len => Some(Descriptor::new(base, len * count, device)),
                Entry::Single(d) => Some(d),
                Entry::Strided { .. } => None,
            };
            match flat {
                Some(d) => match out.last_mut() {
                    Some(prev)
                        if prev.device == d.device
                            && prev.end() == Some(d.addr)
                            && prev.len.checked_add(d.len).is_some() =>
                    {
                        prev.len += d.len;
                    }
                    _ => out.push(d),
                },
                None => {
                    for d in out.drain(..) {
                        list.push(d);
                    }
                    list.push_entry(*e);
                }
            }
        }
        for d in out {
            list.push(d);
        }
        list
    }
}

impl FromIterator<Descriptor> for DescriptorList {
    fn from_iter<I: IntoIterator<Item = Descriptor>>(iter: I) -> Self {
        let mut l = DescriptorList::new();
        for d in iter {
            l.push(d);
        }
        l
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
            .collect();
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
        l.push(Descriptor::new(5000, 7, 1));
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
        assert!(DescriptorList::strided(1000, 100, 10, 100, 0)
            .unwrap()
            .within(&reg));
        assert!(!DescriptorList::strided(1000, 100, 10, 101, 0)
            .unwrap()
            .within(&reg));
        assert!(!DescriptorList::single(Descriptor::new(1000, 10, 1)).within(&reg));
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
        });
        assert!(l.is_empty());
        l.push_strided(0, 0, u64::MAX, 1, 0).unwrap();
        l.push(Descriptor::new(0, 1, 0));
        assert_eq!(l.len(), u64::MAX);
        assert!(l.slice(u64::MAX - 2, u64::MAX).is_ok());
        let big: DescriptorList = [
            Descriptor::new(0, u64::MAX - 1, 0),
            Descriptor::new(u64::MAX - 1, 1, 0),
        ]
        .into_iter()
        .collect();
        assert_eq!(big.coalesced().len(), 1);
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
        .collect();
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
            .collect();
        let remote = DescriptorList::strided(1000, 8, 2, 8, 0).unwrap();
        let s: Vec<_> = segments(&local, &remote).unwrap().collect();
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].local, Descriptor::new(0, 8, 0));
        assert_eq!(s[1].local, Descriptor::new(8, 2, 0));
        assert_eq!(s[1].remote, Descriptor::new(1008, 2, 0));
        assert_eq!(s[2].local, Descriptor::new(100, 6, 0));
        assert_eq!(s[2].remote, Descriptor::new(1010, 6, 0));
        let short = DescriptorList::single(Descriptor::new(0, 1, 0));
        assert!(segments(&local, &short).is_err());
    }

    fn arb_desc() -> impl Strategy<Value = Descriptor> {
        (0u64..1 << 40, 0u64..4096, 0u32..3).prop_map(|(a, l, d)| Descriptor::new(a, l, d))
    }

    proptest! {
        #[test]
        fn compact_form_expands_to_what_was_pushed(v in proptest::collection::vec(arb_desc(), 0..200)) {
            let l: DescriptorList = v.iter().copied().collect();
            let back: Vec<_> = l.iter().collect();
            prop_assert_eq!(&back, &v);
            prop_assert_eq!(l.len(), v.len() as u64);
            prop_assert_eq!(l.total_bytes(), v.iter().map(|d| d.len).sum::<u64>());
        }

        #[test]
        fn regular_runs_compress(base in 0u64..1 << 40, stride in 1u64..1 << 20, n in 1u64..5000) {
            let l: DescriptorList = (0..n).map(|i| Descriptor::new(base + i * stride, stride.min(64), 0)).collect();
            prop_assert!(l.entries().len() <= 1);
            prop_assert_eq!(l.len(), n);
        }

        #[test]
        fn coalescing_keeps_bytes_in_order(v in proptest::collection::vec(arb_desc(), 0..100)) {
            let l: DescriptorList = v.iter().copied().collect();
            let c = l.coalesced();
            prop_assert_eq!(c.total_bytes(), l.total_bytes());
            let a: Vec<(u32, u64)> = l.iter().flat_map(|d| (0..d.len).map(move |i| (d.device, d.addr + i))).take(10_000).collect();
            let b: Vec<(u32, u64)> = c.iter().flat_map(|d| (0..d.len).map(move |i| (d.device, d.addr + i))).take(10_000).collect();
            prop_assert_eq!(a, b);
        }

        #[test]
        fn slices_match_expansion(v in proptest::collection::vec(arb_desc(), 0..100), a in 0usize..100, b in 0usize..100) {
            let l: DescriptorList = v.iter().copied().collect();
            let (a, b) = (a.min(v.len()), b.min(v.len()));
            let (a, b) = (a.min(b), a.max(b));
            let s = l.slice(a as u64, b as u64).unwrap();
            prop_assert_eq!(s.iter().collect::<Vec<_>>(), v[a..b].to_vec());
        }
    }
}
