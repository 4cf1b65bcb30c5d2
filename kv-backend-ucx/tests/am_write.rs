//! One WRITE over TCP mixing large pieces (one operation each, rendezvous, received
//! straight into the target's registration at an offset) and a small one (an eager
//! operation), into a sub-range the initiator imported; the notification arrives only
//! once all of the data is in place, and nothing outside the written pieces changes.

use std::time::{Duration, Instant};

use bytes::Bytes;
use kv_backend_ucx::{Options, UcxBackend};
use kv_core::conformance::pattern;
use kv_core::{
    Backend, Descriptor, DescriptorList, MemKind, Notification, Op, PostOptions, Status,
    TransferRequest,
};
use kv_mem::HostBuffer;

const MIB: usize = 1 << 20;

#[test]
fn mixed_write_lands_before_its_notification() {
    let opts = Options {
        tls: Some("tcp".into()),
        ..Default::default()
    };
    let Some(a) = kv_core::require_or_skip(
        "ucx",
        UcxBackend::new(&kv_core::BackendInit::new("init"), opts.clone()),
    ) else {
        return;
    };
    let b = UcxBackend::new(&kv_core::BackendInit::new("target"), opts).unwrap();
    let mut src = HostBuffer::alloc(2 * MIB, 4096).unwrap();
    src.as_mut_slice().copy_from_slice(&pattern(3, 2 * MIB));
    let mut dst = HostBuffer::alloc(4 * MIB, 4096).unwrap();
    dst.as_mut_slice().fill(0xee);
    // SAFETY: both buffers outlive their registrations (deregistered below).
    let (rs, rd) = unsafe {
        (
            a.register(MemKind::Dram, &src.descriptor(), kv_core::Access::ReadWrite)
                .unwrap(),
            b.register(MemKind::Dram, &dst.descriptor(), kv_core::Access::ReadWrite)
                .unwrap(),
        )
    };
    let ep = a.connect("target", &b.connection_info().unwrap()).unwrap();
    let (s0, d0) = (src.descriptor().addr, dst.descriptor().addr);
    // Import only [1 MiB, 3 MiB) of the target's 4 MiB registration.
    let window = Descriptor::new(d0 + MIB as u64, 2 * MIB as u64, 0);
    let imp = a
        .import_remote(ep, MemKind::Dram, &window, &b.remote_key(rd).unwrap())
        .unwrap();
    // Two 768 KiB pieces (rendezvous) and one 64 KiB piece (eager), reordered.
    let pieces: [(u64, u64, u64); 3] = [
        (0, (MIB + 1024 * 1024) as u64, 768 << 10),
        (768 << 10, (MIB + 4096) as u64, 768 << 10),
        (1536 << 10, (2 * MIB + (768 << 10) + 4096) as u64, 64 << 10),
    ];
    let local: DescriptorList = pieces
        .iter()
        .map(|&(l, _, n)| Descriptor::new(s0 + l, n, 0))
        .collect::<kv_core::Result<_>>()
        .unwrap();
    let remote: DescriptorList = pieces
        .iter()
        .map(|&(_, r, n)| Descriptor::new(d0 + r, n, 0))
        .collect::<kv_core::Result<_>>()
        .unwrap();
    let t = a
        .prepare(&TransferRequest {
            op: Op::Write,
            local_kind: MemKind::Dram,
            local,
            peer: ep,
            remote_kind: MemKind::Dram,
            remote,
        })
        .unwrap();
    let opts = PostOptions {
        notification: Some(Bytes::from_static(b"kv ready")),
        deadline: Some(Instant::now() + Duration::from_secs(20)),
    };
    // SAFETY: `src` stays registered until the transfer finished.
    unsafe { a.post(t, &opts).unwrap() };
    let expect = |dst: &HostBuffer| {
        pieces.iter().all(|&(l, r, n)| {
            let (l, r, n) = (l as usize, r as usize, n as usize);
            dst.as_slice()[r..r + n] == src.as_slice()[l..l + n]
        })
    };
    let mut notes: Vec<Notification> = Vec::new();
    let end = Instant::now() + Duration::from_secs(20);
    let mut done = false;
    while notes.is_empty() || !done {
        assert!(Instant::now() < end, "no completion or notification");
        a.progress().unwrap();
        b.progress().unwrap();
        b.drain_notifications(&mut notes).unwrap();
        if !notes.is_empty() {
            // The notification is only sent once the target answered every piece.
            assert!(expect(&dst), "notification arrived before the data");
        }
        match a.poll(t) {
            Status::Done => done = true,
            Status::Failed(e) => panic!("WRITE failed: {e}"),
            _ => {}
        }
    }
    assert_eq!(notes.len(), 1);
    assert_eq!(notes[0].peer, "init");
    assert_eq!(&notes[0].payload[..], b"kv ready");
    // Nothing outside the pieces changed.
    let mut want = vec![0xeeu8; 4 * MIB];
    for &(l, r, n) in &pieces {
        let (l, r, n) = (l as usize, r as usize, n as usize);
        want[r..r + n].copy_from_slice(&src.as_slice()[l..l + n]);
    }
    assert_eq!(
        crc32c::crc32c(dst.as_slice()),
        crc32c::crc32c(&want),
        "target memory"
    );
    let d = a.describe();
    assert!(d.contains("operations: sent 3;"), "{d}");
    assert!(
        b.describe().contains("served 3 (mapped 0), refused 0"),
        "{}",
        b.describe()
    );
    a.release(t).unwrap();
    a.release_remote(imp).unwrap();
    a.deregister(rs).unwrap();
    b.deregister(rd).unwrap();
}
