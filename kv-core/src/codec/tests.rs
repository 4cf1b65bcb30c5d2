//! Unit and property tests of the parent module.
use super::*;
use proptest::prelude::*;

fn sample() -> AgentMetadata {
    AgentMetadata {
        name: "prefill-0".into(),
        generation: 7,
        partial: false,
        attributes: vec![
            ("kv_layout".into(), Bytes::from_static(&[0xab; 32])),
            ("tp".into(), Bytes::from_static(b"2/8")),
        ],
        backends: vec![
            BackendMetadata {
                name: "tcp".into(),
                connection: Bytes::from_static(b"127.0.0.1:5000"),
            },
            BackendMetadata {
                name: "ucx".into(),
                connection: Bytes::from_static(&[1, 2, 3]),
            },
        ],
        registrations: vec![RegistrationMetadata {
            id: 1,
            kind: MemKind::Dram,
            access: Access::ReadOnly,
            descs: DescriptorList::strided(0x7f00_0000_0000, 1 << 15, 100_000, 1 << 15, 0).unwrap(),
            keys: vec![
                (0, Bytes::from_static(b"k0")),
                (1, Bytes::from_static(b"k1")),
            ],
        }],
        removed: vec![3, 4],
    }
}

#[test]
fn round_trip() {
    let m = sample();
    let b = m.encode().unwrap();
    assert_eq!(AgentMetadata::decode(&b).unwrap(), m);
}

#[test]
fn every_truncation_is_refused() {
    let b = sample().encode().unwrap();
    for n in 0..b.len() {
        match AgentMetadata::decode(&b[..n]) {
            Err(Error::InvalidMetadata(_)) => {}
            other => panic!("truncation to {n} gave {other:?}"),
        }
    }
}

#[test]
fn bad_headers_are_refused_with_reason() {
    let b = sample().encode().unwrap();
    let mut v = b.to_vec();
    v[0] = b'X';
    assert!(
        matches!(AgentMetadata::decode(&v), Err(Error::InvalidMetadata(m)) if m.contains("magic"))
    );
    let mut v = b.to_vec();
    v[4] = 9;
    assert!(
        matches!(AgentMetadata::decode(&v), Err(Error::InvalidMetadata(m)) if m.contains("version") || m.contains("v9"))
    );
    let mut v = b.to_vec();
    let last = v.len() - 1;
    v[last] ^= 0xff;
    assert!(
        matches!(AgentMetadata::decode(&v), Err(Error::InvalidMetadata(m)) if m.contains("checksum"))
    );
    let mut v = b.to_vec();
    v.push(0);
    assert!(AgentMetadata::decode(&v).is_err());
}

/// Builds a body with a valid header so the body parser itself is exercised.
fn with_header(body: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&MAGIC);
    v.extend_from_slice(&VERSION.to_le_bytes());
    v.extend_from_slice(&0u16.to_le_bytes());
    v.extend_from_slice(&(body.len() as u32).to_le_bytes());
    v.extend_from_slice(&crc32c::crc32c(body).to_le_bytes());
    v.extend_from_slice(&[0; 4]);
    v.extend_from_slice(body);
    v
}

#[test]
fn version_1_is_refused_clearly() {
    // A v1 peer's message: the v1 header and a body v1 would accept.
    let mut v = with_header(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    v[4..6].copy_from_slice(&1u16.to_le_bytes());
    match AgentMetadata::decode(&v) {
        Err(Error::InvalidMetadata(m)) => assert!(
            m.contains("peer speaks metadata v1, this build speaks v2; upgrade both"),
            "{m}"
        ),
        other => panic!("v1 message gave {other:?}"),
    }
}

#[test]
fn attributes_are_bounded() {
    let mut m = sample();
    m.attributes = (0..=MAX_ATTRIBUTES)
        .map(|i| (format!("a{i}"), Bytes::new()))
        .collect();
    assert!(matches!(m.encode(), Err(Error::InvalidArgument(_))));
    m.attributes.pop();
    assert_eq!(AgentMetadata::decode(&m.encode().unwrap()).unwrap(), m);
    m.attributes = vec![("big".into(), Bytes::from(vec![0; MAX_ATTRIBUTE_BYTES + 1]))];
    assert!(matches!(m.encode(), Err(Error::InvalidArgument(_))));
    // A peer that sends too many or too large anyway is refused at decode.
    let mut body = vec![0, 0];
    body.extend_from_slice(&0u64.to_le_bytes());
    body.extend_from_slice(&1u16.to_le_bytes());
    body.extend_from_slice(&[1, 0, b'x']);
    body.extend_from_slice(&((MAX_ATTRIBUTE_BYTES + 1) as u32).to_le_bytes());
    body.extend(std::iter::repeat_n(0u8, MAX_ATTRIBUTE_BYTES + 1));
    body.extend_from_slice(&[0; 2 + 4 + 4]);
    assert!(
        matches!(AgentMetadata::decode(&with_header(&body)), Err(Error::InvalidMetadata(m)) if m.contains("exceeds"))
    );
    let mut body = vec![0, 0];
    body.extend_from_slice(&0u64.to_le_bytes());
    body.extend_from_slice(&((MAX_ATTRIBUTES + 1) as u16).to_le_bytes());
    for _ in 0..=MAX_ATTRIBUTES {
        body.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    }
    body.extend_from_slice(&[0; 2 + 4 + 4]);
    assert!(
        matches!(AgentMetadata::decode(&with_header(&body)), Err(Error::InvalidMetadata(m)) if m.contains("attributes exceed"))
    );
}

#[test]
fn unknown_access_is_refused() {
    let m = sample();
    let mut v = m.encode().unwrap().to_vec();
    // The access byte follows the registration's id and kind.
    let body = &v[HEADER_LEN..];
    let at = HEADER_LEN
        + body
            .windows(9)
            .position(|w| w[..8] == 1u64.to_le_bytes() && w[8] == MemKind::Dram as u8)
            .unwrap()
        + 9;
    assert_eq!(v[at], Access::ReadOnly.as_u8());
    v[at] = 7;
    let crc = crc32c::crc32c(&v[HEADER_LEN..]);
    v[12..16].copy_from_slice(&crc.to_le_bytes());
    assert!(
        matches!(AgentMetadata::decode(&v), Err(Error::InvalidMetadata(m)) if m.contains("access"))
    );
}

#[test]
fn huge_counts_do_not_allocate() {
    // name "", generation 0, no attributes, u16::MAX backends with nothing behind them.
    let mut body = vec![0, 0];
    body.extend_from_slice(&0u64.to_le_bytes());
    body.extend_from_slice(&0u16.to_le_bytes());
    body.extend_from_slice(&u16::MAX.to_le_bytes());
    assert!(
        matches!(AgentMetadata::decode(&with_header(&body)), Err(Error::InvalidMetadata(m)) if m.contains("cannot fit"))
    );
    // 0 attributes, 0 backends, u32::MAX registrations.
    let mut body = vec![0, 0];
    body.extend_from_slice(&0u64.to_le_bytes());
    body.extend_from_slice(&0u16.to_le_bytes());
    body.extend_from_slice(&0u16.to_le_bytes());
    body.extend_from_slice(&u32::MAX.to_le_bytes());
    assert!(AgentMetadata::decode(&with_header(&body)).is_err());
}

#[test]
fn paged_layout_is_small() {
    // 15 000 pages in each of 32 layers × K/V: one strided entry per layer and side.
    let mut descs = DescriptorList::new();
    let page = 32 * 1024u64;
    for l in 0..64u64 {
        descs
            .push_strided(0x7000_0000_0000 + l * 15_000 * page, page, 15_000, page, 0)
            .unwrap();
    }
    let m = AgentMetadata {
        name: "p".into(),
        registrations: vec![RegistrationMetadata {
            id: 0,
            kind: MemKind::Dram,
            access: Access::ReadWrite,
            descs,
            keys: vec![],
        }],
        ..Default::default()
    };
    let b = m.encode().unwrap();
    assert!(b.len() < 64 * 1024, "{} bytes", b.len());
}

fn arb_list() -> impl Strategy<Value = DescriptorList> {
    proptest::collection::vec(
        prop_oneof![
            (any::<u32>(), 0u64..1 << 20, any::<u32>())
                .prop_map(|(a, l, d)| Entry::Single(Descriptor::new(a as u64, l, d))),
            (
                any::<u32>(),
                0u64..1 << 20,
                1u64..1 << 20,
                0u64..1 << 16,
                any::<u32>()
            )
                .prop_map(|(b, s, c, l, d)| Entry::Strided {
                    base: b as u64,
                    stride: s,
                    count: c,
                    len: l,
                    device: d
                }),
        ],
        0..20,
    )
    .prop_map(|es| {
        let mut l = DescriptorList::new();
        for e in es {
            l.push_entry(e).unwrap();
        }
        l
    })
}

fn arb_meta() -> impl Strategy<Value = AgentMetadata> {
    (
        "[a-z0-9-]{0,40}",
        any::<u64>(),
        any::<bool>(),
        proptest::collection::vec(
            ("[a-z]{1,10}", proptest::collection::vec(any::<u8>(), 0..64)),
            1..4,
        ),
        proptest::collection::vec(
            (
                any::<u64>(),
                0u8..5,
                arb_list(),
                proptest::collection::vec(any::<u8>(), 0..32),
                any::<bool>(),
            ),
            0..8,
        ),
        proptest::collection::vec(any::<u64>(), 0..8),
        proptest::collection::vec(
            (
                "[a-z_]{1,16}",
                proptest::collection::vec(any::<u8>(), 0..64),
            ),
            0..4,
        ),
    )
        .prop_map(
            |(name, generation, partial, bes, regs, removed, attrs)| AgentMetadata {
                name,
                generation,
                partial,
                attributes: attrs
                    .into_iter()
                    .map(|(n, v)| (n, Bytes::from(v)))
                    .collect(),
                registrations: regs
                    .into_iter()
                    .map(|(id, k, descs, key, ro)| RegistrationMetadata {
                        id,
                        kind: MemKind::from_u8(k).unwrap(),
                        access: if ro {
                            Access::ReadOnly
                        } else {
                            Access::ReadWrite
                        },
                        descs,
                        keys: vec![(0, Bytes::from(key))],
                    })
                    .collect(),
                backends: bes
                    .into_iter()
                    .map(|(name, c)| BackendMetadata {
                        name,
                        connection: Bytes::from(c),
                    })
                    .collect(),
                removed,
            },
        )
}

proptest! {
    #[test]
    fn decode_inverts_encode(m in arb_meta()) {
        let b = m.encode().unwrap();
        prop_assert_eq!(AgentMetadata::decode(&b).unwrap(), m);
    }

    #[test]
    fn random_bytes_never_panic(v in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = AgentMetadata::decode(&v);
        let _ = AgentMetadata::decode(&with_header(&v));
    }

    #[test]
    fn flipped_bytes_are_detected(m in arb_meta(), pos in any::<prop::sample::Index>(), bit in 0u8..8) {
        let mut v = m.encode().unwrap().to_vec();
        let i = pos.index(v.len());
        v[i] ^= 1 << bit;
        prop_assert!(AgentMetadata::decode(&v).is_err(), "flip at byte {}", i);
    }
}
