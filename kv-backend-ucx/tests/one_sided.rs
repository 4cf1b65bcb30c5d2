//! What happens on UCX 1.13's shared-memory transports when the target never progresses:
//! every operation is served by the target's worker, so the transfer cannot finish; its
//! deadline fails it with `TimedOut` (or a `disconnect` with `RemoteDisconnected`), its
//! memory stays busy while UCX holds requests (no forced close without peer error
//! handling), and it is released once the target progresses again.

use std::time::{Duration, Instant};

use kv_backend_ucx::{Options, UcxBackend};
use kv_core::{
    Backend, DescriptorList, EndpointId, Error, MemKind, Op, PostOptions, RegistrationId, Status,
    TransferRequest,
};
use kv_mem::HostBuffer;

/// Two shm backends (`b` never progresses unless told), 1 MiB registered on each, `a`
/// connected to `b` with `b`'s memory imported.
struct Stuck {
    a: UcxBackend,
    b: UcxBackend,
    ra: RegistrationId,
    rb: RegistrationId,
    req: TransferRequest,
    // Dropped after the backends (declared last): the registrations' contract.
    _mem: (HostBuffer, HostBuffer),
}

fn stuck() -> Option<Stuck> {
    let opts = Options {
        tls: Some("posix,cma,self".into()),
        cancel_grace: Duration::from_millis(20),
        ..Default::default()
    };
    let a = kv_core::require_or_skip(
        "ucx",
        UcxBackend::new(&kv_core::BackendInit::new("a"), opts.clone()),
    )?;
    let b = UcxBackend::new(&kv_core::BackendInit::new("b"), opts).unwrap();
    let len = 1 << 20;
    let mut la = HostBuffer::alloc(len, 4096).unwrap();
    la.as_mut_slice().fill(7);
    let lb = HostBuffer::alloc(len, 4096).unwrap();
    // SAFETY: both buffers outlive their registrations (`Stuck` drops the backends
    // before the buffers).
    let (ra, rb) = unsafe {
        (
            a.register(MemKind::Dram, &la.descriptor(), kv_core::Access::ReadWrite)
                .unwrap(),
            b.register(MemKind::Dram, &lb.descriptor(), kv_core::Access::ReadWrite)
                .unwrap(),
        )
    };
    let ep: EndpointId = a.connect("b", &b.connection_info().unwrap()).unwrap();
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
    Some(Stuck {
        a,
        b,
        ra,
        rb,
        req,
        _mem: (la, lb),
    })
}

impl Stuck {
    /// Drives both until `a`'s memory can be deregistered (10 s at most).
    fn released_once_b_progresses(&self) -> bool {
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            self.b.progress().unwrap();
            self.a.progress().unwrap();
            match self.a.deregister(self.ra) {
                Ok(()) => return true,
                Err(Error::Busy(_)) if Instant::now() < end => continue,
                Err(_) => return false,
            }
        }
    }
}

#[test]
fn shm_deadline_fails_a_stuck_transfer_and_keeps_its_memory_busy() {
    let Some(s) = stuck() else {
        return;
    };
    let t = s.a.prepare(&s.req).unwrap();
    let start = Instant::now();
    let opts = PostOptions {
        notification: None,
        deadline: Some(start + Duration::from_millis(200)),
    };
    // SAFETY: `a`'s memory stays registered (and alive) until the end of the test.
    unsafe { s.a.post(t, &opts).unwrap() };
    let st = loop {
        s.a.progress().unwrap();
        let st = s.a.poll(t);
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
    assert!(matches!(s.a.deregister(s.ra), Err(Error::Busy(_))));
    // Once the target progresses, UCX completes them and the memory is free.
    assert!(
        s.released_once_b_progresses(),
        "memory still busy after the target progressed"
    );
    s.a.release(t).unwrap();
    s.b.deregister(s.rb).unwrap();
}

/// Issue 14 item 2: `disconnect` with a transfer UCX cannot give back (shm, the target
/// stopped) returns at once, ends the transfer `RemoteDisconnected`, and keeps what UCX
/// still reads alive: the local memory stays busy (`deregister` says `Busy`) until the
/// target progresses and UCX completes the request; later prepares say
/// `RemoteDisconnected`.
#[test]
fn shm_disconnect_keeps_what_ucx_still_reads() {
    let Some(s) = stuck() else {
        return;
    };
    let t = s.a.prepare(&s.req).unwrap();
    let opts = PostOptions {
        notification: Some(bytes::Bytes::from_static(b"never")),
        deadline: Some(Instant::now() + Duration::from_secs(20)),
    };
    // SAFETY: `a`'s memory stays registered (and alive) until the end of the test.
    unsafe { s.a.post(t, &opts).unwrap() };
    s.a.progress().unwrap();
    let start = Instant::now();
    s.a.disconnect(s.req.peer).unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    let st = s.a.poll(t);
    assert!(
        matches!(st, Status::Failed(Error::RemoteDisconnected { .. })),
        "{st:?}"
    );
    assert!(
        matches!(s.a.deregister(s.ra), Err(Error::Busy(_))),
        "memory UCX still reads was released"
    );
    assert!(matches!(
        s.a.prepare(&s.req),
        Err(Error::RemoteDisconnected { .. })
    ));
    assert!(
        s.released_once_b_progresses(),
        "memory still busy after the target progressed"
    );
    s.a.release(t).unwrap();
    s.b.deregister(s.rb).unwrap();
}
