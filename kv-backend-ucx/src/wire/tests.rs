//! Round trips, corruption and fuzz-style tests of the wire formats.

use super::*;
use proptest::prelude::*;

fn info() -> ConnInfo {
    ConnInfo {
        name: "prefill-0".into(),
        instance: 7,
        pid: 42,
        tcp_tx_seg: 256 << 10,
        tcp_rx_seg: 64 << 10,
        worker_address: vec![1, 2, 3, 4, 5],
    }
}

fn op() -> OpHeader {
    OpHeader {
        kind: OpKind::Write,
        rndv_reply: false,
        instance: 1,
        op: 2,
        session: 3,
        seq: 4,
        entries: vec![
            OpEntry {
                key_id: u128::MAX - 5,
                offset: 6,
                len: 7,
                local: 0,
            },
            OpEntry {
                key_id: 8,
                offset: 9,
                len: 10,
                local: 0,
            },
        ],
        src: None,
    }
}

#[test]
fn round_trips() {
    let i = info();
    assert_eq!(ConnInfo::decode(&i.encode().unwrap()).unwrap(), i);
    let k = RemoteKey {
        range: Descriptor::new(0x1000, 4096, 0),
        key_id: 0xdead_beef_0000_0000_1234_5678_9abc_def0,
        access: Access::ReadOnly,
    };
    assert_eq!(RemoteKey::decode(&k.encode()).unwrap(), k);
    let o = op();
    let b = o.encode();
    assert_eq!(b.len(), OpHeader::encoded_len(2));
    assert_eq!(OpHeader::decode(&b).unwrap(), o);
    for code in [
        AckCode::Ok,
        AckCode::NotRegistered,
        AckCode::OutOfBounds,
        AckCode::InvalidMetadata,
        AckCode::Failed,
        AckCode::AccessDenied,
        AckCode::Unauthenticated,
    ] {
        let a = Answer {
            code,
            instance: 9,
            op: 8,
            session: 7,
            seq: 6,
            len: 5,
        };
        assert_eq!(Answer::decode(&a.encode()).unwrap(), a);
    }
    let h = NoteHeader {
        instance: 1,
        endpoint: 2,
        number: 3,
        session: 4,
        seq: 5,
        name: "decode-1".into(),
    };
    assert_eq!(NoteHeader::decode(&h.encode().unwrap()).unwrap(), h);
    let m = AuthMsg {
        kind: AuthKind::Proof,
        instance: 1,
        endpoint: 2,
        handshake: 3,
        session: 4,
        body: vec![5; 40],
    };
    assert_eq!(AuthMsg::decode(&m.encode()).unwrap(), m);
}

#[test]
fn corruption_is_invalid_metadata() {
    let i = info();
    let mut b = i.encode().unwrap();
    b[10] ^= 1;
    assert!(matches!(
        ConnInfo::decode(&b),
        Err(Error::InvalidMetadata(_))
    ));
    assert!(matches!(
        ConnInfo::decode(&[0xff; 3]),
        Err(Error::InvalidMetadata(_))
    ));
    assert!(matches!(
        RemoteKey::decode(&[]),
        Err(Error::InvalidMetadata(_))
    ));
    // A version-2 info (UCX RMA peers) is refused, not misread.
    let mut old = i.encode().unwrap();
    old[4] = 2;
    let n = old.len() - 4;
    old.truncate(n);
    assert!(matches!(
        ConnInfo::decode(&seal(old)),
        Err(Error::InvalidMetadata(m)) if m.contains("version 2")
    ));
    // A version-2 key (a packed UCX rkey) is refused likewise.
    let k = RemoteKey {
        range: Descriptor::new(0x1000, 4096, 0),
        key_id: 1,
        access: Access::ReadWrite,
    };
    let mut old = k.encode();
    old[4] = 2;
    let n = old.len() - 4;
    old.truncate(n);
    assert!(matches!(
        RemoteKey::decode(&seal(old)),
        Err(Error::InvalidMetadata(m)) if m.contains("version 2")
    ));
    // An unknown access byte, an empty range, a zero key id.
    let mut bad = k.encode();
    let n = bad.len() - 5;
    bad[n] = 7;
    bad.truncate(bad.len() - 4);
    assert!(RemoteKey::decode(&seal(bad)).is_err());
    for k in [
        RemoteKey {
            range: Descriptor::new(0x1000, 0, 0),
            ..k
        },
        RemoteKey { key_id: 0, ..k },
        RemoteKey {
            range: Descriptor::new(u64::MAX, 2, 0),
            ..k
        },
    ] {
        assert!(RemoteKey::decode(&k.encode()).is_err(), "{k:?}");
    }
    // Operation headers: trailing bytes, a count that disagrees, no entries, too many.
    let mut o = op().encode();
    o.push(0);
    assert!(OpHeader::decode(&o).is_err());
    let mut o = op().encode();
    o[40] = 3;
    assert!(OpHeader::decode(&o).is_err());
    let none = OpHeader {
        entries: Vec::new(),
        ..op()
    };
    assert!(OpHeader::decode(&none.encode()).is_err());
    let many = OpHeader {
        entries: vec![op().entries[0]; MAX_ENTRIES + 1],
        ..op()
    };
    assert!(OpHeader::decode(&many.encode()).is_err());
    let mut a = Answer {
        code: AckCode::Ok,
        instance: 1,
        op: 2,
        session: 0,
        seq: 0,
        len: 0,
    }
    .encode();
    a[5] = 99;
    assert!(matches!(Answer::decode(&a), Err(Error::InvalidMetadata(_))));
    let long = "x".repeat(MAX_NAME + 1);
    assert!(ConnInfo { name: long, ..i }.encode().is_err());
    let mut m = AuthMsg {
        kind: AuthKind::Hello,
        instance: 1,
        endpoint: 2,
        handshake: 0,
        session: 0,
        body: vec![0; kv_core::auth::MAX_HANDSHAKE_MESSAGE + 1],
    }
    .encode();
    assert!(AuthMsg::decode(&m).is_err());
    m[5] = 9;
    assert!(AuthMsg::decode(&m[..40]).is_err());
}

proptest! {
    #[test]
    fn decoders_never_panic(b in proptest::collection::vec(any::<u8>(), 0..400)) {
        let _ = ConnInfo::decode(&b);
        let _ = RemoteKey::decode(&b);
        let _ = NoteHeader::decode(&b);
        let _ = OpHeader::decode(&b);
        let _ = Answer::decode(&b);
        let _ = AuthMsg::decode(&b);
    }

    #[test]
    fn sealed_garbage_never_panics(b in proptest::collection::vec(any::<u8>(), 0..100)) {
        // A correct checksum over garbage reaches the structure checks, which must not panic.
        let sealed = seal(b);
        let _ = ConnInfo::decode(&sealed);
        let _ = RemoteKey::decode(&sealed);
    }
}

fn mapped_op() -> OpHeader {
    let mut h = op();
    for (i, e) in h.entries.iter_mut().enumerate() {
        e.local = 0x1000 + i as u64 * 64;
    }
    h.src = Some(MapSrc {
        id: 11,
        base: 0x1000,
        len: 4096,
        rkey: bytes::Bytes::from_static(&[1, 2, 3, 4, 5]),
    });
    h
}

#[test]
fn mapped_operations_round_trip_and_refuse_damage() {
    let h = mapped_op();
    let b = h.encode();
    assert_eq!(b.len(), OpHeader::encoded_len_mapped(2, 5));
    assert_eq!(OpHeader::decode(&b).unwrap(), h);
    // An unmapped header's entries decode with local 0 and no source.
    let plain = OpHeader::decode(&op().encode()).unwrap();
    assert!(plain.src.is_none() && plain.entries.iter().all(|e| e.local == 0));
    // Unknown flags.
    let mut bad = b.clone();
    bad[7] = 2;
    assert!(OpHeader::decode(&bad).is_err());
    // The mapped flag on a header without a source, and cleared on one with a source.
    let mut bad = op().encode();
    bad[7] = 1;
    assert!(OpHeader::decode(&bad).is_err());
    let mut bad = b.clone();
    bad[7] = 0;
    assert!(OpHeader::decode(&bad).is_err());
    // Key lengths of 0, over the limit, and past the end.
    for klen in [0u64, MAX_PACKED_RKEY as u64 + 1, u64::MAX] {
        let mut bad = b.clone();
        bad[72..80].copy_from_slice(&klen.to_le_bytes());
        assert!(OpHeader::decode(&bad).is_err(), "{klen}");
    }
    // Truncated anywhere.
    for n in 0..b.len() {
        assert!(OpHeader::decode(&b[..n]).is_err(), "{n}");
    }
}
