//! What happens on UCX 1.13's shared-memory transports when the target never progresses:
//! every operation is served by the target's worker, so the transfer cannot finish; its
//! deadline fails it with `TimedOut` (or a `disconnect` with `RemoteDisconnected`), its
//! memory stays busy while UCX holds requests (no forced close without peer error
//! handling), and it is released once the target progresses again.

use std::time::{Duration, Instant};

use kv_backend_ucx::{Options, UcxBackend};
use kv_core::{Backend, DescriptorList, Error, MemKind, Op, PostOptions, Status, TransferRequest};
use kv_mem::HostBuffer;

#[test]
fn shm_deadline_fails_a_stuck_transfer_and_keeps_its_memory_busy() {
    let opts = Options {
        tls: Some("posix,cma,self".into()),
        cancel_grace: Duration::from_millis(20),
        ..Default::default()
    };
    let Some(a) = kv_core::require_or_skip(
        "ucx",
        UcxBackend::new(&kv_core::BackendInit::new("a"), opts.clone()),
    ) else {
        return;
    };
    let b = UcxBackend::new(&kv_core::BackendInit::new("b"), opts).unwrap();
    let len = 1 << 20;
    let mut la = HostBuffer::alloc(len, 4096).unwrap();
    la.as_mut_slice().fill(7);
    let lb = HostBuffer::alloc(len, 4096).unwrap();
    // SAFETY: both buffers outlive their registrations (deregistered or the backends
    // dropped before the buffers).
    let (ra, rb) = unsafe {
        (
            a.register(MemKind::Dram, &la.descriptor(), kv_core::Access::ReadWrite)
                .unwrap(),
            b.register(MemKind::Dram, &lb.descriptor(), kv_core::Access::ReadWrite)
                .unwrap(),
        )
    };
    let ep = a.connect("b", &b.connection_info().unwrap()).unwrap();
    a.import_remote(
        ep,
        MemKind::Dram,
        &lb.descriptor(),
        &b.remote_key(rb).unwrap(),
    )
    .unwrap();
    let t = a
        .prepare(&TransferRequest {
            op: Op::Write,
            local_kind: MemKind::Dram,
            local: DescriptorList::single(la.descriptor()).unwrap(),
            peer: ep,
            remote_kind: MemKind::Dram,
            remote: DescriptorList::single(lb.descriptor()).unwrap(),
        })
        .unwrap();
    let start = Instant::now();
    let opts = PostOptions {
        notification: None,
        deadline: Some(start + Duration::from_millis(200)),
    };
    // SAFETY: `la` stays registered (and alive) until the end of the test.
    unsafe { a.post(t, &opts).unwrap() };
    let st = loop {
        a.progress().unwrap();
        let st = a.poll(t);
        if st.is_finished() || start.elapsed() > Duration::from_secs(5) {
            break st;
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    assert!(
        matches!(st, Status::Failed(Error::TimedOut { .. })),
        "{st:?} after {:?}",
        start.elapsed()
    );
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    // UCX still holds the requests: the local memory cannot be deregistered yet.
    assert!(matches!(a.deregister(ra), Err(Error::Busy(_))));
    // Once the target progresses, UCX completes them and the memory is free.
    let end = Instant::now() + Duration::from_secs(10);
    let freed = loop {
        b.progress().unwrap();
        a.progress().unwrap();
        match a.deregister(ra) {
            Ok(()) => break true,
            Err(Error::Busy(_)) if Instant::now() < end => continue,
            Err(_) => break false,
        }
    };
    assert!(freed, "memory still busy after the target progressed");
    a.release(t).unwrap();
    b.deregister(rb).unwrap();
}

/// Issue 14 item 2: `disconnect` with a transfer UCX cannot give back (shm, the target
/// stopped) returns at once, ends the transfer `RemoteDisconnected`, and keeps what UCX
/// still reads alive: the local memory stays busy (`deregister` says `Busy`) until the
/// target progresses and UCX completes the request; later prepares say
/// `RemoteDisconnected`.
#[test]
fn shm_disconnect_keeps_what_ucx_still_reads() {
    let opts = Options {
        tls: Some("posix,cma,self".into()),
        cancel_grace: Duration::from_millis(20),
        ..Default::default()
    };
    let Some(a) = kv_core::require_or_skip(
        "ucx",
        UcxBackend::new(&kv_core::BackendInit::new("a"), opts.clone()),
    ) else {
        return;
    };
    let b = UcxBackend::new(&kv_core::BackendInit::new("b"), opts).unwrap();
    let len = 1 << 20;
    let la = HostBuffer::alloc(len, 4096).unwrap();
    let lb = HostBuffer::alloc(len, 4096).unwrap();
    // SAFETY: both buffers outlive their registrations (deregistered below).
    let (ra, rb) = unsafe {
        (
            a.register(MemKind::Dram, &la.descriptor(), kv_core::Access::ReadWrite)
                .unwrap(),
            b.register(MemKind::Dram, &lb.descriptor(), kv_core::Access::ReadWrite)
                .unwrap(),
        )
    };
    let ep = a.connect("b", &b.connection_info().unwrap()).unwrap();
    a.import_remote(
        ep,
        MemKind::Dram,
        &lb.descriptor(),
        &b.remote_key(rb).unwrap(),
    )
    .unwrap();
    let req = TransferRequest {
        op: Op::Write,
        local_kind: MemKind::Dram,
        local: DescriptorList::single(la.descriptor()).unwrap(),
        peer: ep,
        remote_kind: MemKind::Dram,
        remote: DescriptorList::single(lb.descriptor()).unwrap(),
    };
    let t = a.prepare(&req).unwrap();
    let opts = PostOptions {
        notification: Some(bytes::Bytes::from_static(b"never")),
        deadline: Some(Instant::now() + Duration::from_secs(20)),
    };
    // SAFETY: `la` stays registered (and alive) until the end of the test.
    unsafe { a.post(t, &opts).unwrap() };
    a.progress().unwrap();
    let start = Instant::now();
    a.disconnect(ep).unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    let st = a.poll(t);
    assert!(
        matches!(st, Status::Failed(Error::RemoteDisconnected { .. })),
        "{st:?}"
    );
    assert!(
        matches!(a.deregister(ra), Err(Error::Busy(_))),
        "memory UCX still reads was released"
    );
    assert!(matches!(
        a.prepare(&req),
        Err(Error::RemoteDisconnected { .. })
    ));
    let end = Instant::now() + Duration::from_secs(10);
    let freed = loop {
        b.progress().unwrap();
        a.progress().unwrap();
        match a.deregister(ra) {
            Ok(()) => break true,
            Err(Error::Busy(_)) if Instant::now() < end => continue,
            Err(_) => break false,
        }
    };
    assert!(freed, "memory still busy after the target progressed");
    a.release(t).unwrap();
    b.deregister(rb).unwrap();
}
