//! Unit and property tests of the parent module.
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
