//! Two processes: a child registers memory and prints its connection info, address and
//! key; the parent WRITEs and READs a few MiB into it; both checksum.

mod common;

use common::{connect, local, request, run, ChildPeer, LEN};
use kv_core::{Backend, Op};

/// The child side; runs only when the parent spawned this binary.
#[test]
fn child() {
    common::child_main();
}

fn parent(provider: &str) {
    if kv_core::require_or_skip(
        "libfabric",
        kv_backend_libfabric::create(
            &kv_core::BackendInit::new("probe"),
            &common::params(provider),
        ),
    )
    .is_none()
    {
        return;
    }
    let child = ChildPeer::spawn(provider);
    let (backend, peer) = connect(provider, &child);
    let (src, rs) = local(&*backend, |i| (i * 7 + i / 4096) as u8);
    let (mut back, rb) = local(&*backend, |_| 0);
    run(
        &*backend,
        &request(Op::Write, peer, src.descriptor(), child.remote),
    );
    run(
        &*backend,
        &request(Op::Read, peer, back.descriptor(), child.remote),
    );
    assert!(
        back.as_slice() == src.as_slice(),
        "READ back differs from what was written"
    );
    back.as_mut_slice().fill(0);
    assert_eq!(
        child.finish(),
        crc32c::crc32c(src.as_slice()),
        "child's checksum of its buffer"
    );
    assert_eq!(src.as_slice().len(), LEN);
    backend.deregister(kv_core::RegistrationId(rs)).unwrap();
    backend.deregister(kv_core::RegistrationId(rb)).unwrap();
}

#[test]
fn two_processes_tcp() {
    if std::env::var(common::CHILD_ENV).is_err() {
        parent("tcp;ofi_rxm");
    }
}

#[test]
fn two_processes_shm() {
    if std::env::var(common::CHILD_ENV).is_err() {
        parent("shm");
    }
}
