//! Which registration each part of a descriptor list lies in. Engines build lists that
//! cross registrations (block 5 of every per-layer K and V tensor is one strided run
//! over all of them), so an entry is split into the runs that each lie in one range.

use kv_core::{Descriptor, Entry};

/// Ranges (registrations) in preference order, with a sorted index for lookups when no
/// two of them overlap (the usual case), so a lookup is O(log ranges).
pub(crate) struct Ranges {
    ranges: Vec<Descriptor>,
    /// Indices into `ranges` by (device, addr); `None` when some ranges overlap, where
    /// preference order decides and lookups are linear.
    sorted: Option<Vec<usize>>,
}

impl Ranges {
    /// `ranges` in preference order: where several hold a descriptor, the first wins.
    pub(crate) fn new(ranges: Vec<Descriptor>) -> Ranges {
        let mut order: Vec<usize> = (0..ranges.len()).collect();
        order.sort_by_key(|i| (ranges[*i].device, ranges[*i].addr));
        let disjoint = order
            .windows(2)
            .all(|w| !ranges[w[0]].overlaps(&ranges[w[1]]));
        Ranges {
            sorted: disjoint.then_some(order),
            ranges,
        }
    }

    /// The ranges, in the order given.
    pub(crate) fn get(&self, k: usize) -> Descriptor {
        self.ranges[k]
    }

    /// The preferred range holding all of `d`.
    pub(crate) fn find(&self, d: &Descriptor) -> Option<usize> {
        match &self.sorted {
            Some(order) => {
                let at = order.partition_point(|i| {
                    let r = &self.ranges[*i];
                    (r.device, r.addr) <= (d.device, d.addr)
                });
                let k = *order.get(at.checked_sub(1)?)?;
                self.ranges[k].contains(d).then_some(k)
            }
            None => self.ranges.iter().position(|r| r.contains(d)),
        }
    }
}

/// Splits `e` into maximal runs that each lie wholly inside one of `ranges`, calling
/// `f(run, index into ranges)` in order. Zero-length descriptors move nothing and are
/// skipped.
///
/// Fails with the first descriptor that no range holds. O(runs × log ranges) however
/// many descriptors a strided run expands to.
pub(crate) fn split_entry(
    e: &Entry,
    ranges: &Ranges,
    mut f: impl FnMut(Entry, usize),
) -> Result<(), Descriptor> {
    let (base, stride, count, len, device) = match *e {
        Entry::Single(d) => (d.addr, 0, 1, d.len, d.device),
        Entry::Strided {
            base,
            stride,
            count,
            len,
            device,
        } => (base, stride, count, len, device),
    };
    if len == 0 {
        return Ok(());
    }
    let mut i = 0u64;
    while i < count {
        // Entries in a DescriptorList never overflow (the list checked them).
        let Some(addr) = i.checked_mul(stride).and_then(|o| o.checked_add(base)) else {
            return Err(Descriptor::new(base, len, device));
        };
        let d = Descriptor::new(addr, len, device);
        let Some(k) = ranges.find(&d) else {
            return Err(d);
        };
        // The last descriptor j >= i that still ends inside range k (with overlapping
        // ranges a later descriptor may prefer another range; it still lies in k).
        let last = match (stride, ranges.get(k).end()) {
            (0, _) | (_, None) => count - 1,
            (s, Some(end)) => ((end - len - base) / s).min(count - 1),
        };
        let n = last - i + 1;
        f(
            if n == 1 {
                Entry::Single(d)
            } else {
                Entry::Strided {
                    base: addr,
                    stride,
                    count: n,
                    len,
                    device,
                }
            },
            k,
        );
        i = last + 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runs(e: Entry, ranges: &[Descriptor]) -> Result<Vec<(Entry, usize)>, Descriptor> {
        let mut out = Vec::new();
        split_entry(&e, &Ranges::new(ranges.to_vec()), |r, k| out.push((r, k)))?;
        Ok(out)
    }

    #[test]
    fn a_run_over_four_ranges_splits_into_four() {
        let ranges: Vec<Descriptor> = (0..4)
            .map(|t| Descriptor::new(0x1000 + t * 0x1000, 0x1000, 0))
            .collect();
        let e = Entry::Strided {
            base: 0x1100,
            stride: 0x800,
            count: 8,
            len: 0x100,
            device: 0,
        };
        let got = runs(e, &ranges).unwrap();
        assert_eq!(got.len(), 4);
        for (t, (r, k)) in got.iter().enumerate() {
            assert_eq!(*k, t);
            assert_eq!(r.count(), 2);
            assert!(ranges[*k].contains(&r.extent().unwrap()));
        }
        // One descriptor per range: each becomes a single.
        let e = Entry::Strided {
            base: 0x1000,
            stride: 0x1000,
            count: 4,
            len: 0x1000,
            device: 0,
        };
        let got = runs(e, &ranges).unwrap();
        assert!(got.iter().all(|(r, _)| matches!(r, Entry::Single(_))));
    }

    #[test]
    fn a_gap_or_a_straddle_is_refused_with_the_descriptor() {
        let ranges = [
            Descriptor::new(0x1000, 0x1000, 0),
            Descriptor::new(0x3000, 0x1000, 0),
        ];
        let gap = Entry::Strided {
            base: 0x1000,
            stride: 0x1000,
            count: 3,
            len: 0x10,
            device: 0,
        };
        assert_eq!(runs(gap, &ranges), Err(Descriptor::new(0x2000, 0x10, 0)));
        let straddle = Entry::Single(Descriptor::new(0x1f00, 0x200, 0));
        assert!(runs(straddle, &ranges).is_err());
        let other_device = Entry::Single(Descriptor::new(0x1000, 0x10, 1));
        assert!(runs(other_device, &ranges).is_err());
        assert!(runs(Entry::Single(Descriptor::new(0x9000, 0, 0)), &ranges)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn the_first_range_that_holds_wins_where_ranges_overlap() {
        let ranges = Ranges::new(vec![
            Descriptor::new(0x1000, 0x1000, 0),
            Descriptor::new(0x0, 0x10000, 0),
        ]);
        assert!(ranges.sorted.is_none());
        assert_eq!(ranges.find(&Descriptor::new(0x1800, 0x10, 0)), Some(0));
        assert_eq!(ranges.find(&Descriptor::new(0x2800, 0x10, 0)), Some(1));
        let disjoint = Ranges::new(vec![
            Descriptor::new(0x3000, 0x1000, 0),
            Descriptor::new(0x1000, 0x1000, 0),
            Descriptor::new(0x1000, 0x1000, 1),
        ]);
        assert!(disjoint.sorted.is_some());
        assert_eq!(disjoint.find(&Descriptor::new(0x1000, 0x1000, 1)), Some(2));
        assert_eq!(disjoint.find(&Descriptor::new(0x3fff, 1, 0)), Some(0));
        assert_eq!(disjoint.find(&Descriptor::new(0x2fff, 1, 0)), None);
        assert_eq!(disjoint.find(&Descriptor::new(0x0, 1, 0)), None);
    }
}
