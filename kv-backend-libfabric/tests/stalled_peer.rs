//! Two processes, faults not scripted by the peer (issue 15): a peer stopped with
//! SIGSTOP for twice the deadline, then resumed; the backend dropped while such a peer
//! holds its operations; a peer killed with SIGKILL.

mod common;

use std::time::{Duration, Instant};

use common::{connect, local, post, request, run, wait, ChildPeer, CHILD_FILL};
use kv_core::{Backend, Error, Op, RegistrationId, Status};

/// The child side; runs only when the parent spawned this binary.
#[test]
fn child() {
    common::child_main();
}

/// Deadline of the transfers posted while the peer is stopped.
const DEADLINE: Duration = Duration::from_secs(2);

fn available(provider: &str) -> bool {
    std::env::var(common::CHILD_ENV).is_err()
        && kv_core::require_or_skip(
            "libfabric",
            kv_backend_libfabric::create(
                &kv_core::BackendInit::new("probe"),
                &common::params(provider),
            ),
        )
        .is_some()
}

/// The peer is stopped for 2 × the deadline: a READ and a WRITE posted meanwhile end
/// `TimedOut` within deadline + 1 s, cancel is bounded, the memory of the abandoned
/// operations stays registered until the resumed peer answers them, and then a second
/// round is byte-exact.
fn stalled_peer(provider: &str) {
    if !available(provider) {
        return;
    }
    let mut child = ChildPeer::spawn(provider);
    let (backend, peer) = connect(provider, &child);
    let (src, rs) = local(&*backend, |i| (i * 13 + i / 4096) as u8);
    let (back, rb) = local(&*backend, |_| 0);
    // Warm up: the session is open and the import checked before the stop.
    run(
        &*backend,
        &request(Op::Write, peer, src.descriptor(), child.remote),
    );

    child.stop();
    let stopped = Instant::now();
    for (op, buf) in [(Op::Read, back.descriptor()), (Op::Write, src.descriptor())] {
        let start = Instant::now();
        let id = post(&*backend, &request(op, peer, buf, child.remote), DEADLINE);
        let st = wait(&*backend, id, DEADLINE * 3);
        let took = start.elapsed();
        assert!(
            matches!(st, Status::Failed(Error::TimedOut { .. })),
            "{op} to a stopped peer: {st:?}"
        );
        assert!(
            took <= DEADLINE + Duration::from_secs(1),
            "{op} to a stopped peer ended after {took:?}; its deadline was {DEADLINE:?}"
        );
        backend.release(id).expect("release");
    }
    // The provider still holds what was posted: the memory stays registered.
    assert!(backend.stats().abandoned_operations > 0);
    let busy = backend.deregister(RegistrationId(rb));
    assert!(matches!(busy, Err(Error::Busy(_))), "{busy:?}");
    // cancel of a transfer the stopped peer holds returns in bounded time.
    let id = post(
        &*backend,
        &request(Op::Read, peer, back.descriptor(), child.remote),
        Duration::from_secs(30),
    );
    std::thread::sleep(Duration::from_millis(50));
    let start = Instant::now();
    let cancelled = backend.cancel(id);
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "cancel took {:?}",
        start.elapsed()
    );
    assert!(
        matches!(cancelled, Ok(()) | Err(Error::Busy(_))),
        "{cancelled:?}"
    );
    assert!(matches!(backend.poll(id), Status::Failed(Error::Canceled)));
    backend.release(id).expect("release a cancelled transfer");

    std::thread::sleep((DEADLINE * 2).saturating_sub(stopped.elapsed()));
    child.resume();
    // The resumed peer answers: everything abandoned comes back.
    let end = Instant::now() + Duration::from_secs(15);
    while backend.stats().abandoned_operations > 0 && Instant::now() < end {
        let _ = backend.progress();
        std::thread::sleep(Duration::from_micros(200));
    }
    assert_eq!(backend.stats().abandoned_operations, 0);
    backend
        .deregister(RegistrationId(rb))
        .expect("deregister once the provider returned everything");

    // A second round after the resume is byte-exact.
    let (src2, rs2) = local(&*backend, |i| (i * 31 + 7) as u8);
    let (mut back2, rb2) = local(&*backend, |_| 0);
    run(
        &*backend,
        &request(Op::Write, peer, src2.descriptor(), child.remote),
    );
    run(
        &*backend,
        &request(Op::Read, peer, back2.descriptor(), child.remote),
    );
    assert!(back2.as_slice() == src2.as_slice(), "READ after the resume");
    back2.as_mut_slice().fill(0);
    assert_eq!(child.finish(), crc32c::crc32c(src2.as_slice()));
    for r in [rs, rs2, rb2] {
        backend.deregister(RegistrationId(r)).expect("deregister");
    }
    drop((src, back));
}

#[test]
fn stalled_peer_tcp() {
    stalled_peer("tcp;ofi_rxm");
}

#[test]
fn stalled_peer_shm() {
    stalled_peer("shm");
}

/// The backend is dropped while a stopped peer holds its operations (the agent drops it
/// after a timeout): no crash, no hang; the endpoint and the memory are leaked, and the
/// resumed peer carries on.
fn drop_after_stall(provider: &str) {
    if !available(provider) {
        return;
    }
    let mut child = ChildPeer::spawn(provider);
    let (backend, peer) = connect(provider, &child);
    let (back, _rb) = local(&*backend, |_| 0);
    run(
        &*backend,
        &request(Op::Read, peer, back.descriptor(), child.remote),
    );
    child.stop();
    let id = post(
        &*backend,
        &request(Op::Read, peer, back.descriptor(), child.remote),
        DEADLINE,
    );
    let st = wait(&*backend, id, DEADLINE * 3);
    assert!(
        matches!(st, Status::Failed(Error::TimedOut { .. })),
        "{st:?}"
    );
    let leaked = kv_backend_libfabric::leaked_endpoints();
    let start = Instant::now();
    drop(backend);
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "drop took {:?}",
        start.elapsed()
    );
    assert!(kv_backend_libfabric::leaked_endpoints() > leaked);
    // The resumed peer may still write the READ's destination: it is never freed.
    std::mem::forget(back);
    child.resume();
    let crc = child.finish();
    assert_eq!(crc, crc32c::crc32c(&vec![CHILD_FILL; common::LEN]));
}

#[test]
fn drop_after_stall_tcp() {
    drop_after_stall("tcp;ofi_rxm");
}

#[test]
fn drop_after_stall_shm() {
    drop_after_stall("shm");
}

/// A peer killed with SIGKILL: the next transfer to it ends `RemoteDisconnected` well
/// within its deadline (not `TimedOut`, not `Canceled`).
fn dead_peer(provider: &str) {
    if !available(provider) {
        return;
    }
    let mut child = ChildPeer::spawn(provider);
    let (backend, peer) = connect(provider, &child);
    let (back, rb) = local(&*backend, |_| 0);
    let req = request(Op::Read, peer, back.descriptor(), child.remote);
    run(&*backend, &req);
    child.kill_and_reap();
    let start = Instant::now();
    let deadline = Duration::from_secs(10);
    let st = match backend.prepare(&req) {
        Err(e) => Status::Failed(e),
        Ok(id) => {
            let opts = kv_core::PostOptions {
                notification: None,
                deadline: Some(Instant::now() + deadline),
            };
            // SAFETY: `back` outlives the transfer (waited for below).
            match unsafe { backend.post(id, &opts) } {
                Err(e) => Status::Failed(e),
                Ok(()) => wait(&*backend, id, deadline + Duration::from_secs(2)),
            }
        }
    };
    assert!(
        matches!(st, Status::Failed(Error::RemoteDisconnected { .. })),
        "transfer to a killed peer: {st:?} after {:?}",
        start.elapsed()
    );
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "noticed after {:?}",
        start.elapsed()
    );
    // What the provider may still hold of the dead peer's transfers keeps the memory
    // registered; if it never lets go, the memory is leaked, never freed.
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        if backend.deregister(RegistrationId(rb)).is_ok() {
            break;
        }
        if Instant::now() > end {
            std::mem::forget(back);
            break;
        }
        let _ = backend.progress();
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn dead_peer_tcp() {
    dead_peer("tcp;ofi_rxm");
}

#[test]
fn dead_peer_shm() {
    dead_peer("shm");
}
