//! `UcxBackend::alloc_host`: memory UCX allocates (`UCP_MEM_MAP_ALLOCATE`). Peers reach
//! it through the same checked operations as any registered memory (no UCX RMA), over
//! shared memory and TCP alike; registrations of parts of it and a drop while
//! registered are safe.

use std::time::{Duration, Instant};

use kv_backend_ucx::{Options, UcxBackend, UcxHostMemory};
use kv_core::conformance::pattern;
use kv_core::{
    Backend, Descriptor, DescriptorList, Error, MemKind, Op, PostOptions, Status, TransferRequest,
};

const LEN: usize = 1 << 20;

fn pair(tls: &str) -> Option<(UcxBackend, UcxBackend)> {
    pair_with(Options {
        tls: Some(tls.into()),
        ..Default::default()
    })
}

fn pair_with(opts: Options) -> Option<(UcxBackend, UcxBackend)> {
    let a = kv_core::require_or_skip(
        "ucx",
        UcxBackend::new(&kv_core::BackendInit::new("a"), opts.clone()),
    )?;
    let b = UcxBackend::new(&kv_core::BackendInit::new("b"), opts).expect("second backend");
    Some((a, b))
}

/// Registers `la` on `a` and `lb` on `b`, connects `a` to `b` and imports `lb` there.
fn link(
    a: &UcxBackend,
    b: &UcxBackend,
    la: &UcxHostMemory,
    lb: &UcxHostMemory,
) -> (
    kv_core::RegistrationId,
    kv_core::RegistrationId,
    kv_core::EndpointId,
) {
    // SAFETY: the callers keep the memory alive until they deregister it.
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
    (ra, rb, ep)
}

/// Two backends over shared memory (`posix,cma,self`, mapped operations as `mapped`
/// says), each with `LEN` bytes of `alloc_host` memory registered read-write, `a`'s
/// filled with `pattern(seed)`, `a` connected to `b` and `b`'s memory imported.
struct ShmRig {
    a: UcxBackend,
    b: UcxBackend,
    la: UcxHostMemory,
    lb: UcxHostMemory,
    ra: kv_core::RegistrationId,
    rb: kv_core::RegistrationId,
    ep: kv_core::EndpointId,
}

fn shm_rig(mapped: bool, seed: u64) -> Option<ShmRig> {
    let (a, b) = pair_with(Options {
        tls: Some("posix,cma,self".into()),
        mapped,
        ..Default::default()
    })?;
    let mut la = a.alloc_host(LEN).unwrap();
    let lb = b.alloc_host(LEN).unwrap();
    // SAFETY: not registered yet: nothing else touches it.
    unsafe { la.as_mut_slice() }.copy_from_slice(&pattern(seed, LEN));
    // The memory outlives the registrations (the tests deregister before they drop it).
    let (ra, rb, ep) = link(&a, &b, &la, &lb);
    Some(ShmRig {
        a,
        b,
        la,
        lb,
        ra,
        rb,
        ep,
    })
}

/// Runs one transfer from `a`, driving both. Gives up at 5 s.
fn run(a: &UcxBackend, b: &UcxBackend, req: &TransferRequest) -> Status {
    let t = a.prepare(req).unwrap();
    let st = run_prepared(a, b, t);
    a.release(t).unwrap();
    st
}

/// Posts prepared transfer `t` from `a` and drives both until it finished (5 s).
fn run_prepared(a: &UcxBackend, b: &UcxBackend, t: kv_core::TransferId) -> Status {
    let opts = PostOptions {
        notification: None,
        deadline: Some(Instant::now() + Duration::from_secs(5)),
    };
    // SAFETY: both sides' memory stays registered until the transfer finished.
    unsafe { a.post(t, &opts).unwrap() };
    loop {
        a.progress().unwrap();
        b.progress().unwrap();
        let st = a.poll(t);
        if st.is_finished() {
            break st;
        }
    }
}

fn req(op: Op, local: Descriptor, ep: kv_core::EndpointId, remote: Descriptor) -> TransferRequest {
    TransferRequest {
        op,
        local_kind: MemKind::Dram,
        local: DescriptorList::single(local).unwrap(),
        peer: ep,
        remote_kind: MemKind::Dram,
        remote: DescriptorList::single(remote).unwrap(),
    }
}

fn write_and_read(tls: &str) {
    let Some((a, b)) = pair(tls) else { return };
    let mut la: UcxHostMemory = a.alloc_host(LEN).unwrap();
    let mut lb = b.alloc_host(LEN).unwrap();
    assert_eq!(la.len(), LEN);
    assert!(la.to_vec().iter().all(|&x| x == 0), "alloc_host zeroes");
    // SAFETY: not registered yet: nothing else touches it.
    unsafe { lb.as_mut_slice() }.copy_from_slice(&pattern(3, LEN));
    // The memory outlives the registrations (deregistered below).
    let (ra, rb, ep) = link(&a, &b, &la, &lb);
    let st = run(&a, &b, &req(Op::Read, la.descriptor(), ep, lb.descriptor()));
    assert!(matches!(st, Status::Done), "READ over {tls}: {st:?}");
    assert_eq!(la.to_vec(), pattern(3, LEN), "READ data over {tls}");
    // SAFETY: no transfer names it now (the READ finished) and this thread drives both.
    unsafe { la.as_mut_slice() }.copy_from_slice(&pattern(4, LEN));
    // The second half of a's memory into the first half of b's: offsets must map.
    let half = (LEN / 2) as u64;
    let (ld, rd) = (la.descriptor(), lb.descriptor());
    let src = Descriptor::new(ld.addr + half, half, 0);
    let dst = Descriptor::new(rd.addr, half, 0);
    let st = run(&a, &b, &req(Op::Write, src, ep, dst));
    assert!(matches!(st, Status::Done), "WRITE over {tls}: {st:?}");
    let got = lb.to_vec();
    assert_eq!(got[..LEN / 2], pattern(4, LEN)[LEN / 2..], "WRITE data");
    assert_eq!(got[LEN / 2..], pattern(3, LEN)[LEN / 2..], "untouched half");
    // Over shared memory both went as mapped operations (b copied through its mapping
    // of a's memory); over TCP as messages.
    let mapped = if tls == "tcp" { 0 } else { 2 };
    assert!(
        b.describe().contains(&format!("(mapped {mapped})")),
        "{}",
        b.describe()
    );
    a.deregister(ra).unwrap();
    b.deregister(rb).unwrap();
}

#[test]
fn shm_moves_ucx_memory_like_any_memory() {
    write_and_read("posix,cma,self");
}

#[test]
fn tcp_moves_ucx_memory_like_any_memory() {
    write_and_read("tcp");
}

#[test]
fn registrations_of_parts_and_late_drops_are_safe() {
    let Some((a, _b)) = pair("posix,cma,self") else {
        return;
    };
    assert!(matches!(a.alloc_host(0), Err(Error::InvalidArgument(_))));
    let m = a.alloc_host(LEN).unwrap();
    let d = m.descriptor();
    // SAFETY: `m` is kept alive by the registrations' contract until deregistered; the
    // drop below happens while registered on purpose (the unmap must wait).
    let (whole, part) = unsafe {
        (
            a.register(MemKind::Dram, &d, kv_core::Access::ReadWrite)
                .unwrap(),
            a.register(
                MemKind::Dram,
                &Descriptor::new(d.addr + 4096, 4096, 0),
                kv_core::Access::ReadWrite,
            )
            .unwrap(),
        )
    };
    assert!(!a.remote_key(part).unwrap().is_empty());
    drop(m);
    // Still mapped (UCX's unmap waits for the last registration): deregistering works.
    a.deregister(part).unwrap();
    a.deregister(whole).unwrap();
    assert!(matches!(a.deregister(whole), Err(Error::NotRegistered(_))));
}

/// 64 pieces of 16 KiB, spread over 1 MiB in reverse order on the target, as one
/// mapped operation each way: byte-exact; with `mapped=false` the same through
/// messages.
#[test]
fn spread_pieces_between_ucx_memory() {
    for mapped in [true, false] {
        let Some(ShmRig {
            a,
            b,
            mut la,
            lb,
            ra,
            rb,
            ep,
        }) = shm_rig(mapped, 9)
        else {
            return;
        };
        const PIECE: u64 = 16 << 10;
        let n = LEN as u64 / PIECE;
        let (ld, rd) = (la.descriptor(), lb.descriptor());
        let local: Vec<Descriptor> = (0..n)
            .map(|i| Descriptor::new(ld.addr + i * PIECE, PIECE, 0))
            .collect();
        let remote: Vec<Descriptor> = (0..n)
            .map(|i| Descriptor::new(rd.addr + (n - 1 - i) * PIECE, PIECE, 0))
            .collect();
        let spread = |op| TransferRequest {
            op,
            local_kind: MemKind::Dram,
            local: DescriptorList::try_from_iter(local.clone()).unwrap(),
            peer: ep,
            remote_kind: MemKind::Dram,
            remote: DescriptorList::try_from_iter(remote.clone()).unwrap(),
        };
        let st = run(&a, &b, &spread(Op::Write));
        assert!(matches!(st, Status::Done), "WRITE: {st:?}");
        let want = pattern(9, LEN);
        let got = lb.to_vec();
        for i in 0..n as usize {
            let (p, l) = (PIECE as usize, (n as usize - 1 - i) * PIECE as usize);
            assert_eq!(got[l..l + p], want[i * p..(i + 1) * p], "piece {i}");
        }
        // Back again into zeroed memory: the READ restores the pattern.
        // SAFETY: no transfer names it now; this thread drives both sides.
        unsafe { la.as_mut_slice() }.fill(0);
        let st = run(&a, &b, &spread(Op::Read));
        assert!(matches!(st, Status::Done), "READ: {st:?}");
        assert_eq!(la.to_vec(), want, "READ data");
        let m = if mapped { 2 } else { 0 };
        assert!(
            b.describe().contains(&format!("(mapped {m})")),
            "{}",
            b.describe()
        );
        a.deregister(ra).unwrap();
        b.deregister(rb).unwrap();
    }
}

/// Drives both until `a` can deregister `ra` (the target answered what it still owed);
/// fails after 10 s.
fn deregister_once_b_answers(a: &UcxBackend, b: &UcxBackend, ra: kv_core::RegistrationId) {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        b.progress().unwrap();
        a.progress().unwrap();
        match a.deregister(ra) {
            Ok(()) => return,
            Err(Error::Busy(_)) if Instant::now() < end => continue,
            Err(e) => panic!("memory still busy after the target answered: {e}"),
        }
    }
}

/// Posts `t` with a deadline of 200 ms while only `a` progresses (the target is stuck):
/// the post fails `TimedOut`.
fn time_out(a: &UcxBackend, t: kv_core::TransferId) {
    let start = Instant::now();
    let opts = PostOptions {
        notification: None,
        deadline: Some(start + Duration::from_millis(200)),
    };
    // SAFETY: the caller keeps both sides' memory registered until the end of its test.
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
        "{st:?}"
    );
}

/// A mapped READ whose target does not progress fails at its deadline, but the target
/// can still copy into our memory whenever it resumes — so that memory stays busy
/// (`deregister` says `Busy`) until the target answered; then the late data is there
/// and the memory is free. When the target backend is gone instead, the memory is
/// freed without an answer.
#[test]
fn a_timed_out_mapped_read_keeps_its_memory_until_the_target_answers() {
    for target_resumes in [true, false] {
        let Some((a, b)) = pair("posix,cma,self") else {
            return;
        };
        let mut la = a.alloc_host(LEN).unwrap();
        let mut lb = b.alloc_host(LEN).unwrap();
        // SAFETY: not registered yet: nothing else touches it.
        unsafe { lb.as_mut_slice() }.copy_from_slice(&pattern(5, LEN));
        let (ra, rb, ep) = link(&a, &b, &la, &lb);
        let t = a
            .prepare(&req(Op::Read, la.descriptor(), ep, lb.descriptor()))
            .unwrap();
        // Once with both progressing (UCX's endpoint is wired up: later sends complete
        // at once), then our copy of the data is wiped.
        assert!(matches!(run_prepared(&a, &b, t), Status::Done));
        // SAFETY: no transfer names it now; this thread drives both sides.
        unsafe { la.as_mut_slice() }.fill(0);
        time_out(&a, t);
        assert!(matches!(a.deregister(ra), Err(Error::Busy(_))));
        if target_resumes {
            // The target serves the stale READ: its copy lands, then the memory is free.
            deregister_once_b_answers(&a, &b, ra);
            assert_eq!(la.to_vec(), pattern(5, LEN), "the late copy landed");
            b.deregister(rb).unwrap();
        } else {
            b.deregister(rb).unwrap();
            drop((lb, b)); // the target backend is gone (its memory with it)
            a.progress().unwrap();
            a.deregister(ra).unwrap();
        }
        a.release(t).unwrap();
    }
}

/// `disconnect` while a mapped WRITE waits for a target that does not progress: the
/// post ends `RemoteDisconnected` and its memory stays busy; when the target resumes,
/// its answer still verifies (the session is kept for it) and frees the memory.
#[test]
fn a_disconnected_mapped_post_frees_its_memory_once_the_target_answers() {
    let Some((a, b)) = pair_with(Options {
        tls: Some("posix,cma,self".into()),
        cancel_grace: Duration::from_millis(20),
        ..Default::default()
    }) else {
        return;
    };
    let mut la = a.alloc_host(LEN).unwrap();
    let lb = b.alloc_host(LEN).unwrap();
    let (ra, rb, ep) = link(&a, &b, &la, &lb);
    let t = a
        .prepare(&req(Op::Write, la.descriptor(), ep, lb.descriptor()))
        .unwrap();
    assert!(matches!(run_prepared(&a, &b, t), Status::Done)); // wires the endpoint up
                                                              // SAFETY: no transfer names it now; this thread drives both sides.
    unsafe { la.as_mut_slice() }.copy_from_slice(&pattern(6, LEN));
    let opts = PostOptions {
        notification: None,
        deadline: Some(Instant::now() + Duration::from_secs(5)),
    };
    // SAFETY: both sides' memory stays registered until the end of the test.
    unsafe { a.post(t, &opts).unwrap() };
    a.progress().unwrap();
    a.disconnect(ep).unwrap();
    let st = a.poll(t);
    assert!(
        matches!(st, Status::Failed(Error::RemoteDisconnected { .. })),
        "{st:?}"
    );
    assert!(matches!(a.deregister(ra), Err(Error::Busy(_))));
    deregister_once_b_answers(&a, &b, ra);
    assert_eq!(
        lb.to_vec(),
        pattern(6, LEN),
        "the target served the cut-off WRITE"
    );
    a.release(t).unwrap();
    b.deregister(rb).unwrap();
}

/// More operations than UCX's shared-memory FIFO holds, posted while the target does not
/// progress: UCX queues the rest and sends them later from the headers (and gathered
/// data) we gave it, which must still be ours then. Each transfer writes two 2 KiB
/// pieces with their halves swapped (so they cannot merge into one); every transfer
/// ends `Done` and every byte lands where it belongs; mapped operations (headers only)
/// and messages with the data gathered into them alike.
#[test]
fn operations_queued_by_ucx_while_the_target_is_busy_all_land() {
    for mapped in [true, false] {
        let Some(ShmRig {
            a,
            b,
            la,
            lb,
            ra,
            rb,
            ep,
        }) = shm_rig(mapped, 21)
        else {
            return;
        };
        const PIECE: u64 = 2 << 10;
        let n = LEN as u64 / (2 * PIECE);
        let (ld, rd) = (la.descriptor(), lb.descriptor());
        let tids: Vec<_> = (0..n)
            .map(|i| {
                let base = i * 2 * PIECE;
                let d = |addr: u64| Descriptor::new(addr, PIECE, 0);
                a.prepare(&TransferRequest {
                    op: Op::Write,
                    local_kind: MemKind::Dram,
                    local: DescriptorList::try_from_iter([
                        d(ld.addr + base),
                        d(ld.addr + base + PIECE),
                    ])
                    .unwrap(),
                    peer: ep,
                    remote_kind: MemKind::Dram,
                    remote: DescriptorList::try_from_iter([
                        d(rd.addr + base + PIECE),
                        d(rd.addr + base),
                    ])
                    .unwrap(),
                })
                .unwrap()
            })
            .collect();
        let opts = PostOptions {
            notification: None,
            deadline: Some(Instant::now() + Duration::from_secs(10)),
        };
        for &t in &tids {
            // SAFETY: both sides' memory stays registered until every transfer finished.
            unsafe { a.post(t, &opts).unwrap() };
        }
        let end = Instant::now() + Duration::from_secs(15);
        let mut left = tids.clone();
        while !left.is_empty() {
            assert!(
                Instant::now() < end,
                "{} transfers did not finish",
                left.len()
            );
            a.progress().unwrap();
            b.progress().unwrap();
            left.retain(|&t| match a.poll(t) {
                Status::Done => false,
                Status::Failed(e) => panic!("mapped={mapped}: {e}"),
                _ => true,
            });
        }
        let (want, got) = (pattern(21, LEN), lb.to_vec());
        let p = PIECE as usize;
        for i in 0..n as usize {
            let base = i * 2 * p;
            assert_eq!(
                got[base + p..base + 2 * p],
                want[base..base + p],
                "transfer {i}"
            );
            assert_eq!(
                got[base..base + p],
                want[base + p..base + 2 * p],
                "transfer {i}"
            );
        }
        let m = if mapped { n } else { 0 };
        assert!(
            b.describe().contains(&format!("(mapped {m})")),
            "{}",
            b.describe()
        );
        for t in tids {
            a.release(t).unwrap();
        }
        a.deregister(ra).unwrap();
        b.deregister(rb).unwrap();
    }
}
