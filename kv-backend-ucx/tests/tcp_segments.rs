//! This backend raises UCX's TCP segment sizes (1 MiB instead of 8 KiB sent, 64 KiB
//! received). A peer with UCX's own defaults would get segments larger than it receives
//! (UCX resets the connection, after the sender's flush may already have succeeded), so
//! `connect` refuses the mismatch in both directions; peers that agree move 1 MiB both
//! ways, checksummed.

use std::time::{Duration, Instant};

use kv_backend_ucx::{Options, UcxBackend};
use kv_core::conformance::pattern;
use kv_core::{Backend, DescriptorList, MemKind, Op, PostOptions, Status, TransferRequest};
use kv_mem::HostBuffer;

const LEN: usize = 1 << 20;

fn backend(name: &str, config: Vec<(String, String)>) -> Option<UcxBackend> {
    let opts = Options {
        tls: Some("tcp".into()),
        config,
        ..Default::default()
    };
    kv_core::require_or_skip(
        "ucx",
        UcxBackend::new(&kv_core::BackendInit::new(name), opts),
    )
}

/// `from` WRITEs then READs `LEN` bytes to/from `to`, driving both. The endpoint stays
/// open (see the README: a new connection in the reverse direction after a disconnect
/// fails in UCX 1.13).
fn round_trip(from: &UcxBackend, to: &UcxBackend) {
    let mut src = HostBuffer::alloc(LEN, 4096).unwrap();
    src.as_mut_slice().copy_from_slice(&pattern(9, LEN));
    let dst = HostBuffer::alloc(LEN, 4096).unwrap();
    let back = HostBuffer::alloc(LEN, 4096).unwrap();
    // SAFETY: the buffers outlive their registrations (deregistered below).
    let (rs, rd, rb) = unsafe {
        (
            from.register(MemKind::Dram, &src.descriptor(), kv_core::Access::ReadWrite)
                .unwrap(),
            to.register(MemKind::Dram, &dst.descriptor(), kv_core::Access::ReadWrite)
                .unwrap(),
            from.register(
                MemKind::Dram,
                &back.descriptor(),
                kv_core::Access::ReadWrite,
            )
            .unwrap(),
        )
    };
    let ep = from.connect("to", &to.connection_info().unwrap()).unwrap();
    let imp = from
        .import_remote(
            ep,
            MemKind::Dram,
            &dst.descriptor(),
            &to.remote_key(rd).unwrap(),
        )
        .unwrap();
    for (op, local) in [(Op::Write, src.descriptor()), (Op::Read, back.descriptor())] {
        let t = from
            .prepare(&TransferRequest {
                op,
                local_kind: MemKind::Dram,
                local: DescriptorList::single(local).unwrap(),
                peer: ep,
                remote_kind: MemKind::Dram,
                remote: DescriptorList::single(dst.descriptor()).unwrap(),
            })
            .unwrap();
        let opts = PostOptions {
            notification: None,
            deadline: Some(Instant::now() + Duration::from_secs(20)),
        };
        // SAFETY: the buffers stay registered until the transfer finished.
        unsafe { from.post(t, &opts).unwrap() };
        let st = loop {
            from.progress().unwrap();
            to.progress().unwrap();
            let st = from.poll(t);
            if st.is_finished() {
                break st;
            }
        };
        assert!(matches!(st, Status::Done), "{op}: {st:?}");
        from.release(t).unwrap();
    }
    let want = crc32c::crc32c(src.as_slice());
    assert_eq!(crc32c::crc32c(dst.as_slice()), want, "written data");
    assert_eq!(crc32c::crc32c(back.as_slice()), want, "read back");
    from.release_remote(imp).unwrap();
    from.deregister(rs).unwrap();
    from.deregister(rb).unwrap();
    to.deregister(rd).unwrap();
}

#[test]
fn mismatched_tcp_segments_are_refused_at_connect() {
    let ucx_defaults = vec![
        ("TCP_TX_SEG_SIZE".to_string(), "8K".to_string()),
        ("TCP_RX_SEG_SIZE".to_string(), "64K".to_string()),
    ];
    let Some(ours) = backend("ours", Vec::new()) else {
        return;
    };
    let Some(theirs) = backend("theirs", ucx_defaults) else {
        return;
    };
    for (from, to) in [(&ours, &theirs), (&theirs, &ours)] {
        match from.connect("peer", &to.connection_info().unwrap()) {
            Err(kv_core::Error::InvalidArgument(m)) => {
                assert!(m.contains("TX_SEG_SIZE"), "{m}")
            }
            other => panic!("mismatched segments accepted: {other:?}"),
        }
    }
}

#[test]
fn agreeing_tcp_segments_move_data_both_ways() {
    // Only the receive side raised (8 KiB sent, 1 MiB received) fits ours both ways.
    let small_sender = vec![
        ("TCP_TX_SEG_SIZE".to_string(), "8K".to_string()),
        ("TCP_RX_SEG_SIZE".to_string(), "1M".to_string()),
    ];
    let Some(ours) = backend("ours", Vec::new()) else {
        return;
    };
    let Some(theirs) = backend("theirs", small_sender) else {
        return;
    };
    round_trip(&ours, &theirs);
    round_trip(&theirs, &ours);
}
