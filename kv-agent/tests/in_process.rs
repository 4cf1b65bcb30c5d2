//! Agent protocol logic with in-process loopback backends: metadata, generations,
//! backend choice, custody, deadlines, notifications, threads, the side channel.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kv_agent::{Agent, AgentOptions, PeerId, TransferSpec};
use kv_core::conformance::pattern;
use kv_core::loopback::{LoopbackBackend, LoopbackFabric};
use kv_core::{BackendInit, Descriptor, DescriptorList, Error, Notification, Status};
use kv_mem::Region;

mod common;

use common::{Hooked, LoopMem};

struct Node {
    agent: Agent,
    lb: Arc<LoopbackBackend>,
}

fn node(fabric: &LoopbackFabric, name: &str, opts: AgentOptions) -> Node {
    let lb = Arc::new(fabric.backend(&BackendInit::new(name)));
    let agent = Agent::new(name, opts).unwrap();
    agent.add_backend_instance(lb.clone()).unwrap();
    Node { agent, lb }
}

impl Node {
    /// Loads `other`'s full metadata; its PeerId.
    fn load(&self, other: &Node) -> PeerId {
        self.agent
            .load_remote(&other.agent.local_metadata().unwrap())
            .unwrap()
    }

    fn region(&self, len: usize, seed: u64) -> Region<LoopMem> {
        let d = self.lb.alloc(len);
        self.lb.write_mem(d.addr, &pattern(seed, len)).unwrap();
        Region::new(LoopMem(d))
    }
    fn read(&self, d: Descriptor) -> Vec<u8> {
        self.lb.read_mem(d.addr, d.len as usize).unwrap()
    }
}

/// A DRAM WRITE of one local range into one remote range.
fn write1(local: Descriptor, peer: PeerId, remote: Descriptor) -> TransferSpec {
    TransferSpec::write(
        DescriptorList::single(local).unwrap(),
        peer,
        DescriptorList::single(remote).unwrap(),
    )
}

/// The cluster secret every agent of these tests shares (the side channel needs one).
fn secret() -> Option<kv_core::auth::ClusterSecret> {
    static S: std::sync::OnceLock<kv_core::auth::ClusterSecret> = std::sync::OnceLock::new();
    Some(
        S.get_or_init(|| kv_core::auth::ClusterSecret::generate().unwrap())
            .clone(),
    )
}

fn pair() -> (Node, Node) {
    let f = LoopbackFabric::new();
    let opts = || AgentOptions {
        secret: secret(),
        ..Default::default()
    };
    (node(&f, "prefill", opts()), node(&f, "decode", opts()))
}

#[test]
fn write_with_notification_then_read() {
    let (p, d) = pair();
    let src = p.region(1 << 20, 1);
    let dst = d.region(1 << 20, 2);
    let _rs = p.agent.register(&src).unwrap();
    let rd = d.agent.register(&dst).unwrap();
    let peer = p.load(&d);
    assert_eq!(p.agent.peer_info(peer).unwrap().0, "decode");
    let remote = DescriptorList::single(rd.descriptor()).unwrap();
    let t = p
        .agent
        .transfer(
            &TransferSpec::write(
                DescriptorList::single(src.descriptor()).unwrap(),
                peer,
                remote.clone(),
            ),
            Some(Bytes::from_static(b"req-1")),
        )
        .unwrap();
    t.wait().unwrap();
    assert_eq!(t.backend(), "loopback");
    assert_eq!(d.read(dst.descriptor()), pattern(1, 1 << 20));
    let n = d.agent.notifications().unwrap();
    assert_eq!(
        n,
        vec![Notification {
            peer: "prefill".into(),
            payload: Bytes::from_static(b"req-1")
        }]
    );
    let tel = t.telemetry();
    assert_eq!((tel.bytes, tel.descriptors, tel.posts), (1 << 20, 1, 1));
    assert!(tel.duration().is_some());

    // Decode-shaped READ of half the remote into the second half of the source.
    d.lb.write_mem(dst.descriptor().addr, &pattern(9, 1 << 19))
        .unwrap();
    let local = DescriptorList::single(src.slice(1 << 19, 1 << 19).unwrap()).unwrap();
    let remote = DescriptorList::single(dst.slice(0, 1 << 19).unwrap()).unwrap();
    let t = p
        .agent
        .transfer(&TransferSpec::read(local, peer, remote), None)
        .unwrap();
    t.wait().unwrap();
    assert_eq!(
        p.read(src.slice(1 << 19, 1 << 19).unwrap()),
        pattern(9, 1 << 19)
    );
    assert_eq!(p.agent.stats()[0].1.completed, 2);
}

#[test]
fn repost_a_prepared_transfer_1000_times() {
    let (p, d) = pair();
    let src = p.region(4096, 1);
    let dst = d.region(4096, 2);
    let _rs = p.agent.register(&src).unwrap();
    let rd = d.agent.register(&dst).unwrap();
    let peer = p.load(&d);
    let t = p
        .agent
        .prepare(&write1(src.descriptor(), peer, rd.descriptor()))
        .unwrap();
    for i in 0..1000u64 {
        p.lb.write_mem(src.descriptor().addr, &pattern(100 + i, 4096))
            .unwrap();
        t.post(Some(Bytes::copy_from_slice(&i.to_le_bytes())))
            .unwrap();
        t.wait().unwrap();
        assert_eq!(d.read(dst.descriptor()), pattern(100 + i, 4096), "post {i}");
    }
    let n = d.agent.notifications().unwrap();
    assert_eq!(n.len(), 1000);
    assert!(n
        .iter()
        .enumerate()
        .all(|(i, x)| x.payload[..] == (i as u64).to_le_bytes()));
    assert_eq!(t.telemetry().posts, 1000);
}

#[test]
fn restarted_peer_replaces_old_generation() {
    let f = LoopbackFabric::new();
    let p = node(&f, "prefill", AgentOptions::default());
    let d1 = node(
        &f,
        "decode",
        AgentOptions {
            generation: Some(1),
            ..Default::default()
        },
    );
    let src = p.region(4096, 1);
    let _rs = p.agent.register(&src).unwrap();
    let dst1 = d1.region(4096, 2);
    let r1 = d1.agent.register(&dst1).unwrap();
    let old_meta = d1.agent.local_metadata().unwrap();
    let old = p.agent.load_remote(&old_meta).unwrap();
    let spec = |peer, r: Descriptor| {
        TransferSpec::write(
            DescriptorList::single(src.descriptor()).unwrap(),
            peer,
            DescriptorList::single(r).unwrap(),
        )
    };
    let prepared = p.agent.prepare(&spec(old, r1.descriptor())).unwrap();
    // Same generation again: same PeerId.
    assert_eq!(p.agent.load_remote(&old_meta).unwrap(), old);

    // The decode process restarts: new agent, same name, higher generation.
    drop((r1, dst1, d1));
    let d2 = node(
        &f,
        "decode",
        AgentOptions {
            generation: Some(2),
            ..Default::default()
        },
    );
    let dst2 = d2.region(4096, 3);
    let r2 = d2.agent.register(&dst2).unwrap();
    let new = p.load(&d2);
    assert_ne!(new, old);
    assert_eq!(p.agent.peer_by_name("decode"), Some(new));
    // Old handles are refused with a clear error.
    let e = p.agent.prepare(&spec(old, r2.descriptor())).unwrap_err();
    assert!(
        matches!(e, Error::NotRegistered(ref m) if m.contains("newer generation")),
        "{e}"
    );
    let e = prepared.post(None).unwrap_err();
    assert!(
        matches!(e, Error::NotRegistered(ref m) if m.contains("restarted")),
        "{e}"
    );
    // Stale metadata is refused.
    assert!(
        matches!(p.agent.load_remote(&old_meta), Err(Error::InvalidMetadata(m)) if m.contains("stale"))
    );
    // The new generation works.
    p.agent
        .transfer(&spec(new, r2.descriptor()), None)
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(d2.read(dst2.descriptor()), pattern(1, 4096));
    // Invalidation refuses the handle too.
    p.agent.invalidate_remote(new).unwrap();
    assert!(p.agent.prepare(&spec(new, r2.descriptor())).is_err());
}

#[test]
fn partial_metadata_adds_regions() {
    let (p, d) = pair();
    let src = p.region(8192, 1);
    let _rs = p.agent.register(&src).unwrap();
    let a = d.region(4096, 2);
    let _ra = d.agent.register(&a).unwrap();
    let peer = p.load(&d);
    let b = d.region(8192, 3);
    let rb = d.agent.register(&b).unwrap();
    let spec = write1(src.descriptor(), peer, rb.descriptor());
    assert!(matches!(p.agent.prepare(&spec), Err(Error::OutOfBounds(_))));
    assert_eq!(
        p.agent
            .load_remote(&d.agent.partial_metadata(&[&rb]).unwrap())
            .unwrap(),
        peer
    );
    assert_eq!(p.agent.remote_regions(peer).unwrap().len(), 2);
    p.agent.transfer(&spec, None).unwrap().wait().unwrap();
    assert_eq!(d.read(b.descriptor()), pattern(1, 8192));
    // Partial metadata for a peer never loaded in full is refused.
    let f = LoopbackFabric::new();
    let other = node(&f, "other", AgentOptions::default());
    assert!(matches!(
        other
            .agent
            .load_remote(&d.agent.partial_metadata(&[&rb]).unwrap()),
        Err(Error::InvalidMetadata(_))
    ));
}

#[test]
fn bounds_and_registration_are_checked() {
    let (p, d) = pair();
    let src = p.region(4096, 1);
    let unregistered = p.region(4096, 1);
    let _rs = p.agent.register(&src).unwrap();
    let dst = d.region(4096, 2);
    let rd = d.agent.register(&dst).unwrap();
    let peer = p.load(&d);
    let big = Descriptor::new(rd.descriptor().addr, 4097, 0);
    let e = p.agent.prepare(&TransferSpec::write(
        DescriptorList::single(Descriptor::new(src.descriptor().addr, 4097, 0)).unwrap(),
        peer,
        DescriptorList::single(big).unwrap(),
    ));
    assert!(e.is_err());
    let e = p
        .agent
        .prepare(&write1(unregistered.descriptor(), peer, rd.descriptor()));
    assert!(matches!(e, Err(Error::NotRegistered(_))), "{e:?}");
    let e = p.agent.prepare(&TransferSpec::write(
        DescriptorList::single(src.slice(0, 10).unwrap()).unwrap(),
        peer,
        DescriptorList::single(rd.descriptor()).unwrap(),
    ));
    assert!(matches!(e, Err(Error::InvalidArgument(_))), "{e:?}");
    assert!(d.read(dst.descriptor()) == pattern(2, 4096));
}

#[test]
fn no_common_backend_lists_both_sides() {
    let f1 = LoopbackFabric::new();
    let p = node(&f1, "prefill", AgentOptions::default());
    let d = Agent::new("decode", AgentOptions::default()).unwrap();
    let src = p.region(4096, 1);
    let _rs = p.agent.register(&src).unwrap();
    let peer = p.agent.load_remote(&d.local_metadata().unwrap()).unwrap();
    let e = p.agent.prepare(&TransferSpec::write(
        DescriptorList::single(src.descriptor()).unwrap(),
        peer,
        DescriptorList::single(Descriptor::new(0, 4096, 0)).unwrap(),
    ));
    // The peer published no region, so the range is out of bounds before backend choice.
    assert!(e.is_err());
    let e = p.agent.notify(peer, Bytes::from_static(b"x")).unwrap_err();
    match e {
        Error::NoCommonBackend { local, remote } => {
            assert_eq!(local, vec!["loopback".to_string()]);
            assert!(remote.is_empty());
        }
        e => panic!("{e}"),
    }
}

/// Custody: a registration dropped while a transfer names it stays registered (and its
/// memory alive) until the transfer ends.
#[test]
fn custody_defers_deregistration() {
    let (p, d) = pair();
    let src = p.region(4096, 1);
    let rs = p.agent.register(&src).unwrap();
    let dst = d.region(4096, 2);
    let rd = d.agent.register(&dst).unwrap();
    let peer = p.load(&d);
    let t = p
        .agent
        .prepare(&write1(src.descriptor(), peer, rd.descriptor()))
        .unwrap();
    t.post(None).unwrap();
    // Explicit deregistration while in flight is refused and hands the handle back.
    let (e, rs) = rs.deregister().unwrap_err();
    assert!(matches!(e, Error::Busy(_)));
    assert!(src.holders() >= 2);
    drop(rs);
    // Still registered: the loopback refuses to free registered memory.
    assert!(matches!(p.lb.free(&src.descriptor()), Err(Error::Busy(_))));
    t.wait().unwrap();
    assert_eq!(d.read(dst.descriptor()), pattern(1, 4096));
    // Transfer done: the deferred deregistration ran (the backend lets the memory go)…
    assert!(p.lb.free(&src.descriptor()).is_ok());
    // …and once the prepared transfer is gone, nothing but the user holds the region.
    assert_eq!(src.holders(), 2);
    drop(t);
    assert_eq!(src.holders(), 1);
}

/// A loopback backend named "stuck": progress does nothing, so its transfers never
/// complete.
fn stuck(inner: LoopbackBackend, agent: &str) -> Hooked {
    let mut w = Hooked::new(inner, agent, "stuck");
    w.stuck = true;
    w
}

/// Without a preference the agent picks the backend with the lowest cost estimate;
/// with one, the preference wins; a spec naming a backend gets exactly that one.
#[test]
fn backend_choice_by_cost_then_preference() {
    let (f1, f2) = (LoopbackFabric::new(), LoopbackFabric::new());
    let mk = |name: &str, opts: AgentOptions| {
        let agent = Agent::new(name, opts).unwrap();
        // Memory lives in the "slow" backend's loopback space; both share the fabric
        // addresses only by name, so each side registers one region per backend.
        let mut slow = Hooked::new(f1.backend(&BackendInit::new(name)), name, "slow");
        slow.cost = Some(Duration::from_millis(10));
        let mut fast = Hooked::new(f2.backend(&BackendInit::new(name)), name, "fast");
        fast.cost = Some(Duration::from_millis(1));
        let (slow, fast) = (Arc::new(slow), Arc::new(fast));
        agent.add_backend_instance(slow.clone()).unwrap();
        agent.add_backend_instance(fast.clone()).unwrap();
        (agent, slow, fast)
    };
    for (pref, want) in [(vec![], "fast"), (vec!["slow".to_string()], "slow")] {
        let (p, ps, pf) = mk(
            "prefill",
            AgentOptions {
                backend_preference: pref.clone(),
                ..Default::default()
            },
        );
        let (d, ds, df) = mk("decode", AgentOptions::default());
        // The same simulated address in both loopback spaces, so one region registers
        // with both backends on each side.
        let (a1, a2) = (ps.inner.alloc(4096), pf.inner.alloc(4096));
        let (b1, b2) = (ds.inner.alloc(4096), df.inner.alloc(4096));
        assert_eq!((a1, b1), (a2, b2));
        let src = Region::new(LoopMem(a1));
        let dst = Region::new(LoopMem(b1));
        let rs = p.register(&src).unwrap();
        let rd = d.register(&dst).unwrap();
        assert_eq!(rs.backends(), vec!["slow".to_string(), "fast".to_string()]);
        let peer = p.load_remote(&d.local_metadata().unwrap()).unwrap();
        let spec = write1(rs.descriptor(), peer, rd.descriptor());
        let t = p.transfer(&spec, None).unwrap();
        t.wait().unwrap();
        assert_eq!(t.backend(), want, "preference {pref:?}");
        for name in ["slow", "fast"] {
            let mut s = spec.clone();
            s.backend = Some(name.into());
            let t = p.transfer(&s, None).unwrap();
            t.wait().unwrap();
            assert_eq!(t.backend(), name);
        }
        let stats = p.stats();
        let count = |n: &str| stats.iter().find(|(b, _)| b == n).unwrap().1.completed;
        assert_eq!(count(want), 2);
    }
}

#[test]
fn deadline_ends_a_stuck_transfer() {
    let f = LoopbackFabric::new();
    let (lp, ld) = (
        Arc::new(stuck(f.backend(&BackendInit::new("prefill")), "prefill")),
        Arc::new(stuck(f.backend(&BackendInit::new("decode")), "decode")),
    );
    let p = Agent::new("prefill", AgentOptions::default()).unwrap();
    let d = Agent::new("decode", AgentOptions::default()).unwrap();
    p.add_backend_instance(lp.clone()).unwrap();
    d.add_backend_instance(ld.clone()).unwrap();
    let src = Region::new(LoopMem(lp.inner.alloc(4096)));
    let dst = Region::new(LoopMem(ld.inner.alloc(4096)));
    let _rs = p.register(&src).unwrap();
    let rd = d.register(&dst).unwrap();
    let peer = p.load_remote(&d.local_metadata().unwrap()).unwrap();
    let mut spec = write1(src.descriptor(), peer, rd.descriptor());
    spec.deadline = Some(Duration::from_millis(200));
    let t = p.transfer(&spec, None).unwrap();
    let start = Instant::now();
    let e = t.wait().unwrap_err();
    assert!(matches!(e, Error::TimedOut { .. }), "{e}");
    assert!(start.elapsed() < Duration::from_secs(2));
    assert_eq!(p.stats()[0].1.failed, 1);
    // The memory is free again after the timeout.
    assert_eq!(src.holders(), 2); // the region and its registration; no transfer pin
                                  // Explicit cancel works too.
    t.post(None).unwrap();
    t.cancel().unwrap();
    assert!(matches!(t.poll(), Status::Failed(Error::Canceled)));
}

#[test]
fn dead_peer_fails_transfers() {
    let (p, d) = pair();
    let src = p.region(4096, 1);
    let _rs = p.agent.register(&src).unwrap();
    let dst = d.region(4096, 2);
    let rd = d.agent.register(&dst).unwrap();
    let peer = p.load(&d);
    let spec = write1(src.descriptor(), peer, rd.descriptor());
    // Connected and working, then the peer dies: the prepared transfer fails.
    let t = p.agent.prepare(&spec).unwrap();
    t.post(None).unwrap();
    t.wait().unwrap();
    drop(rd);
    drop(dst);
    drop(d);
    let start = Instant::now();
    // The contract allows the refusal at post or in the status.
    let e = match t.post(None) {
        Err(e) => e,
        Ok(()) => t.wait().unwrap_err(),
    };
    assert!(e.is_disconnect(), "{e}");
    // A new transfer fails at connect or completion, never hangs.
    let p2 = p.agent.clone();
    let (_, fresh) = pair();
    let fresh_peer = p2
        .load_remote(&fresh.agent.local_metadata().unwrap())
        .unwrap();
    drop(fresh);
    let e = p2
        .transfer(
            &TransferSpec::write(
                DescriptorList::single(src.descriptor()).unwrap(),
                fresh_peer,
                DescriptorList::single(Descriptor::new(0, 4096, 0)).unwrap(),
            ),
            None,
        )
        .and_then(|t| t.wait())
        .unwrap_err();
    assert!(
        matches!(e, Error::OutOfBounds(_) | Error::RemoteDisconnected { .. }),
        "{e}"
    );
    assert!(start.elapsed() < Duration::from_secs(5));
}

#[test]
fn threads_post_concurrently() {
    let (p, d) = pair();
    let p = Arc::new(p);
    let mut handles = Vec::new();
    let mut keep = Vec::new();
    for i in 0..4u64 {
        let src = p.region(8192, i);
        let rs = p.agent.register(&src).unwrap();
        let dst = d.region(8192, 50 + i);
        let rd = d.agent.register(&dst).unwrap();
        keep.push((rs, rd, dst.clone(), src.clone()));
    }
    let peer = p.load(&d);
    for (i, (_, rd, _, src)) in keep.iter().enumerate() {
        let agent = p.agent.clone();
        let spec = write1(src.descriptor(), peer, rd.descriptor());
        handles.push(std::thread::spawn(move || {
            let t = agent.prepare(&spec).unwrap();
            for _ in 0..200 {
                t.post(None).unwrap();
                t.wait().unwrap();
            }
            i
        }));
    }
    for h in handles {
        h.join().unwrap();
    }
    for (i, (_, _, dst, _)) in keep.iter().enumerate() {
        assert_eq!(d.read(dst.descriptor()), pattern(i as u64, 8192));
    }
    assert_eq!(p.agent.stats()[0].1.completed, 800);
    fn check<T: Send + Sync>() {}
    check::<Agent>();
    check::<kv_agent::Transfer>();
    check::<kv_agent::Registration>();
}

#[test]
fn side_channel_fetch_and_publish() {
    let (p, d) = pair();
    let dst = d.region(4096, 2);
    let _rd = d.agent.register(&dst).unwrap();
    let daddr = d.agent.listen("127.0.0.1:0").unwrap();
    let paddr = p.agent.listen("127.0.0.1:0").unwrap();
    let peer = p.agent.fetch_remote(daddr).unwrap();
    assert_eq!(p.agent.remote_regions(peer).unwrap().len(), 1);
    // The prefill side publishes itself to decode's channel.
    p.agent.publish_to(daddr).unwrap();
    assert!(d.agent.peer_by_name("prefill").is_some());
    // Decode adds a region and publishes; the channel it fetched from is not known to
    // decode, so publish there explicitly, then prefill re-fetches.
    let dst2 = d.region(4096, 3);
    let _rd2 = d.agent.register(&dst2).unwrap();
    d.agent.publish_to(paddr).unwrap();
    assert_eq!(p.agent.remote_regions(peer).unwrap().len(), 2);
    assert!(p.agent.publish().is_empty());
    // Garbage on the channel closes that connection only.
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(daddr).unwrap();
    s.write_all(b"GARBAGE-GARBAGE-GARBAGE").unwrap();
    drop(s);
    assert_eq!(p.agent.fetch_remote(daddr).unwrap(), peer);
    // A dead channel is an error, quickly (registrations keep their agent alive).
    drop((_rd, _rd2));
    drop(d);
    std::thread::sleep(Duration::from_millis(50));
    let start = Instant::now();
    assert!(p.agent.fetch_remote(daddr).is_err());
    assert!(start.elapsed() < Duration::from_secs(6));
}

#[test]
fn progress_thread_completes_without_polling() {
    let f = LoopbackFabric::new();
    let p = node(
        &f,
        "prefill",
        AgentOptions {
            progress_thread: true,
            ..Default::default()
        },
    );
    let d = node(&f, "decode", AgentOptions::default());
    let src = p.region(4096, 1);
    let _rs = p.agent.register(&src).unwrap();
    let dst = d.region(4096, 2);
    let rd = d.agent.register(&dst).unwrap();
    let peer = p.load(&d);
    let t = p
        .agent
        .transfer(&write1(src.descriptor(), peer, rd.descriptor()), None)
        .unwrap();
    let end = Instant::now() + Duration::from_secs(5);
    while !t.poll().is_finished() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(matches!(t.poll(), Status::Done));
}

/// A prepared transfer whose local registration was dropped is refused at post; the
/// registration is not resurrected.
#[test]
fn post_after_local_deregistration_is_refused() {
    let (p, d) = pair();
    let src = p.region(4096, 1);
    let rs = p.agent.register(&src).unwrap();
    let dst = d.region(4096, 2);
    let rd = d.agent.register(&dst).unwrap();
    let peer = p.load(&d);
    let t = p
        .agent
        .prepare(&write1(rs.descriptor(), peer, rd.descriptor()))
        .unwrap();
    drop(rs);
    let e = t.post(None).unwrap_err();
    assert!(
        matches!(e, Error::NotRegistered(ref m) if m.contains("deregistered")),
        "{e}"
    );
    // The backend no longer holds it: the loopback lets the memory go.
    assert!(p.lb.free(&src.descriptor()).is_ok());
}

/// The peer withdraws a region (deregisters and republishes): transfers prepared
/// against it are refused at their next post instead of writing into it.
#[test]
fn post_after_remote_withdrawal_is_refused() {
    let (p, d) = pair();
    let src = p.region(4096, 1);
    let rs = p.agent.register(&src).unwrap();
    let (a, b) = (d.region(4096, 2), d.region(4096, 3));
    let ra = d.agent.register(&a).unwrap();
    let rb = d.agent.register(&b).unwrap();
    let peer = p.load(&d);
    let spec = |r: &kv_agent::Registration| write1(rs.descriptor(), peer, r.descriptor());
    let ta = p.agent.prepare(&spec(&ra)).unwrap();
    let tb = p.agent.prepare(&spec(&rb)).unwrap();
    ta.post(None).unwrap();
    ta.wait().unwrap();
    drop(ra);
    p.load(&d);
    let e = ta.post(None).unwrap_err();
    assert!(
        matches!(e, Error::NotRegistered(ref m) if m.contains("withdrawn")),
        "{e}"
    );
    // Transfers to regions still published keep working.
    tb.post(None).unwrap();
    tb.wait().unwrap();
    assert_eq!(d.read(b.descriptor()), pattern(1, 4096));
}

/// A partial message of a newer generation is refused and leaves the live peer alone.
#[test]
fn newer_partial_metadata_does_not_retire_the_peer() {
    let f = LoopbackFabric::new();
    let p = node(&f, "prefill", AgentOptions::default());
    let d1 = node(
        &f,
        "decode",
        AgentOptions {
            generation: Some(1),
            ..Default::default()
        },
    );
    let dst = d1.region(4096, 2);
    let _r1 = d1.agent.register(&dst).unwrap();
    let peer = p.load(&d1);
    let d2 = node(
        &LoopbackFabric::new(),
        "decode",
        AgentOptions {
            generation: Some(2),
            ..Default::default()
        },
    );
    let x = d2.region(4096, 3);
    let r2 = d2.agent.register(&x).unwrap();
    let e = p
        .agent
        .load_remote(&d2.agent.partial_metadata(&[&r2]).unwrap())
        .unwrap_err();
    assert!(matches!(e, Error::InvalidMetadata(_)), "{e}");
    assert_eq!(p.agent.peer_by_name("decode"), Some(peer));
    assert_eq!(p.agent.remote_regions(peer).unwrap().len(), 1);
}

/// A backend that cannot deregister keeps custody: the memory is never freed.
#[test]
fn failed_deregistration_keeps_the_memory() {
    let f = LoopbackFabric::new();
    let mut lb = Hooked::new(f.backend(&BackendInit::new("a")), "a", "nodereg");
    lb.fail_deregister = true;
    let d = lb.inner.alloc(4096);
    let agent = Agent::new("a", AgentOptions::default()).unwrap();
    agent.add_backend_instance(Arc::new(lb)).unwrap();
    let region = Region::new(LoopMem(d));
    let reg = agent.register(&region).unwrap();
    assert_eq!(region.holders(), 2);
    drop(reg);
    // The agent could not deregister: it leaked its hold rather than free the memory.
    assert_eq!(region.holders(), 2);
    assert!(region.into_inner().is_err());
}

/// A side-channel client that trickles bytes is cut off at the frame deadline, and a
/// header claiming a huge payload allocates nothing up front.
#[test]
fn side_channel_trickle_is_bounded() {
    use std::io::{Read, Write};
    let d = Agent::new(
        "decode",
        AgentOptions {
            channel_timeout: Duration::from_millis(300),
            secret: secret(),
            ..Default::default()
        },
    )
    .unwrap();
    let addr = d.listen("127.0.0.1:0").unwrap();
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    // A PUT header claiming 60 MiB, then one byte every 100 ms.
    let mut h = [0u8; 12];
    h[..4].copy_from_slice(b"KVXS");
    h[4] = 2;
    h[8..].copy_from_slice(&(60u32 << 20).to_le_bytes());
    s.write_all(&h).unwrap();
    let start = Instant::now();
    let mut closed = false;
    for _ in 0..50 {
        if s.write_all(&[0]).is_err() {
            closed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        s.set_read_timeout(Some(Duration::from_millis(1))).unwrap();
        let mut b = [0u8; 1];
        match s.read(&mut b) {
            // EOF, or a reset because our unread bytes were still queued at close.
            Ok(0) => closed = true,
            Err(e)
                if !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                closed = true
            }
            _ => {}
        }
        if closed {
            break;
        }
    }
    assert!(closed, "the trickling connection was never closed");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    // The channel still serves others.
    let p = Agent::new(
        "prefill",
        AgentOptions {
            secret: secret(),
            ..Default::default()
        },
    )
    .unwrap();
    p.fetch_remote(addr).unwrap();
}
