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
mod tests;
