//! Calls documented as prompt stay prompt when a backend is slow (issue 14 item 9):
//! `Transfer::poll` never waits for a cancel or a deregistration, and `load_remote` /
//! `invalidate_remote` never wait for the disconnect of the generation they replace.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{agent, loopback, opts, pair, write1, Hooked};
use kv_core::conformance::pattern;
use kv_core::loopback::LoopbackFabric;
use kv_core::{Error, Status};

const SLOW: Duration = Duration::from_millis(1500);
const PROMPT: Duration = Duration::from_millis(300);

fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let t = Instant::now();
    let v = f();
    (v, t.elapsed())
}

#[test]
fn poll_past_the_deadline_does_not_wait_for_a_slow_cancel() {
    let x = pair(
        "lb",
        1,
        |pb| (pb.stuck, pb.slow_cancel) = (true, SLOW),
        |_| {},
    );
    let (p, src) = (&x.p, &x.src);
    let mut spec = x.write();
    spec.deadline = Some(Duration::from_millis(50));
    let t = p.transfer(&spec, None).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let (s, took) = timed(|| t.poll());
    assert!(matches!(s, Status::Failed(Error::TimedOut { .. })), "{s:?}");
    assert!(took < PROMPT, "poll took {took:?}");
    // While the cancel runs the memory stays pinned: a new post waits its turn.
    let r = t.post(None);
    assert!(matches!(r, Err(Error::Busy(_))), "{r:?}");
    let (s, took) = timed(|| t.poll());
    assert!(matches!(s, Status::Failed(Error::TimedOut { .. })), "{s:?}");
    assert!(took < PROMPT, "second poll took {took:?}");
    // cancel() waits for the cancel in flight; then the regions are free.
    t.cancel().unwrap();
    assert_eq!(src.holders(), 2);
    assert_eq!(p.stats()[0].1.failed, 1);
}

#[test]
fn poll_does_not_wait_for_a_slow_deregistration() {
    let x = pair("lb", 3, |pb| pb.slow_deregister = SLOW, |_| {});
    let t = x.p.transfer(&x.write(), None).unwrap();
    let (p, src, db, dst) = (&x.p, &x.src, &x.db, &x.dst);
    // Dropped while in flight: deregistration is due when the transfer ends.
    drop(x.rs);
    let end = Instant::now() + Duration::from_secs(5);
    let mut status = Status::InProgress;
    while matches!(status, Status::InProgress) && Instant::now() < end {
        p.progress().unwrap();
        let (s, took) = timed(|| t.poll());
        assert!(took < PROMPT, "poll took {took:?}");
        status = s;
    }
    assert!(matches!(status, Status::Done), "{status:?}");
    assert_eq!(db.read(dst.descriptor()), pattern(3, 4096));
    // The deregistration finishes on its own.
    let end = Instant::now() + SLOW + Duration::from_secs(3);
    while src.holders() > 2 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(t);
    let end = Instant::now() + SLOW + Duration::from_secs(3);
    while src.holders() > 1 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(src.holders(), 1, "the deregistration never finished");
}

#[test]
fn load_remote_does_not_wait_for_the_old_generation_to_disconnect() {
    let f = LoopbackFabric::new();
    let mut pb = Hooked::new(loopback(&f, "prefill"), "prefill", "lb");
    pb.slow_disconnect = SLOW;
    let pb = Arc::new(pb);
    let p = agent("prefill", opts(), vec![pb.clone()]);
    let src = pb.region(4096, 5);
    let _rs = p.register(&src).unwrap();
    let decode = |generation| {
        let b = Arc::new(Hooked::new(loopback(&f, "decode"), "decode", "lb"));
        let a = agent(
            "decode",
            kv_agent::AgentOptions {
                generation: Some(generation),
                ..opts()
            },
            vec![b.clone()],
        );
        let dst = b.region(4096, 0);
        let reg = a.register(&dst).unwrap();
        (a, b, dst, reg)
    };
    let (d1, _b1, dst1, r1) = decode(1);
    let old = p.load_remote(&d1.local_metadata().unwrap()).unwrap();
    p.transfer(&write1(src.descriptor(), old, dst1.descriptor()), None)
        .unwrap()
        .wait()
        .unwrap();
    drop(r1);
    let (d2, b2, dst2, _r2) = decode(2);
    let (new, took) = timed(|| p.load_remote(&d2.local_metadata().unwrap()).unwrap());
    assert!(took < PROMPT, "load_remote took {took:?}");
    assert_ne!(new, old);
    // Other peers load meanwhile, and the new generation works (its first connect
    // waits for the old one to be closed).
    let (d3, ..) = decode(3);
    let mut m = kv_core::AgentMetadata::decode(&d3.local_metadata().unwrap()).unwrap();
    m.name = "other".into();
    let (_, took) = timed(|| p.load_remote(&m.encode().unwrap()).unwrap());
    assert!(took < PROMPT, "loading another peer took {took:?}");
    p.transfer(&write1(src.descriptor(), new, dst2.descriptor()), None)
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(b2.read(dst2.descriptor()), pattern(5, 4096));
    let (r, took) = timed(|| p.invalidate_remote(new));
    r.unwrap();
    assert!(took < PROMPT, "invalidate_remote took {took:?}");
}
