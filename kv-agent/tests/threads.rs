//! Every thread an agent starts (progress, side channel, its connections, helpers) is
//! joined when the agent is dropped (issue 14 item 11). In their own binary, one test at
//! a time (`ONE`), so no other test's agents are counted.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{loopback, opts, pair, Hooked};
use kv_agent::{Agent, AgentOptions};
use kv_core::loopback::LoopbackFabric;
use kv_core::Status;

/// Held by each test: they count the whole process's threads.
static ONE: Mutex<()> = Mutex::new(());

/// Names of this process's threads that the agent started (`kv-agent-*`; the kernel
/// keeps 15 bytes of a name).
fn agent_threads() -> Vec<String> {
    let mut v = Vec::new();
    for t in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        if let Ok(name) = std::fs::read_to_string(t.path().join("comm")) {
            if name.starts_with("kv-agent") {
                v.push(name.trim().to_string());
            }
        }
    }
    v
}

/// The agent's threads once those just joined have left `/proc/self/task`: the kernel
/// wakes a joiner when the thread clears its tid, a moment before it removes the task,
/// so a joined thread can still be listed briefly (more so on a busy machine). Waits up
/// to 100 ms for `done` to hold — far less than a thread still at work stays (the
/// helper below sleeps 1.5 s; connection threads block on their sockets).
fn threads_after_join(done: impl Fn(&[String]) -> bool) -> Vec<String> {
    let end = Instant::now() + Duration::from_millis(100);
    loop {
        let t = agent_threads();
        if done(&t) || Instant::now() >= end {
            return t;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn dropping_the_agent_joins_its_threads() {
    let _one = ONE.lock().unwrap_or_else(|e| e.into_inner());
    assert!(agent_threads().is_empty(), "{:?}", agent_threads());
    let f = LoopbackFabric::new();
    let d = Agent::new(
        "decode",
        AgentOptions {
            progress_thread: true,
            ..opts()
        },
    )
    .unwrap();
    d.add_backend_instance(Arc::new(Hooked::new(
        loopback(&f, "decode"),
        "decode",
        "lb",
    )))
    .unwrap();
    let addr = d.listen("127.0.0.1:0").unwrap();
    // A client that connects and says nothing keeps a connection thread busy.
    let mut idle = std::net::TcpStream::connect(addr).unwrap();
    let mut half = std::net::TcpStream::connect(addr).unwrap();
    half.write_all(&[0, 0]).unwrap();
    let end = Instant::now() + Duration::from_secs(5);
    while agent_threads().len() < 4 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(agent_threads().len() >= 4, "{:?}", agent_threads());
    drop(d);
    let left = threads_after_join(|t| t.is_empty());
    assert!(left.is_empty(), "still running after drop: {left:?}");
    let _ = idle.flush();
}

/// A helper job still running when the last handle goes (here a slow deregistration
/// that a finished transfer started) is joined by that drop: before the fix the job held
/// the agent, so the drop only released a reference and the job later dropped the agent
/// on its own thread, detaching itself (fuzz/README.md, agent_ops LeakSanitizer report).
#[test]
fn dropping_the_agent_joins_a_running_helper_job() {
    let _one = ONE.lock().unwrap_or_else(|e| e.into_inner());
    assert!(agent_threads().is_empty(), "{:?}", agent_threads());
    let slow = Duration::from_millis(1500);
    let x = pair("lb", 7, |pb| pb.slow_deregister = slow, |_| {});
    let t = x.p.transfer(&x.write(), None).unwrap();
    // Dropped while in flight: the deregistration runs on a helper when the transfer ends.
    drop(x.rs);
    let end = Instant::now() + Duration::from_secs(5);
    let mut status = Status::InProgress;
    while matches!(status, Status::InProgress) && Instant::now() < end {
        x.p.progress().unwrap();
        status = t.poll();
    }
    assert!(matches!(status, Status::Done), "{status:?}");
    let helpers = || {
        agent_threads()
            .into_iter()
            .filter(|n| n.starts_with("kv-agent-slow"))
            .count()
    };
    // (A new thread names itself once it runs.)
    let end = Instant::now() + Duration::from_secs(1);
    while helpers() == 0 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(helpers(), 1, "{:?}", agent_threads());
    drop(t);
    let started = Instant::now();
    drop(x.p);
    // The drop waited for the job (it sleeps `slow` in the backend's deregister) ...
    let left = threads_after_join(|t| !t.iter().any(|n| n.starts_with("kv-agent-slow")));
    assert_eq!(
        left.iter()
            .filter(|n| n.starts_with("kv-agent-slow"))
            .count(),
        0,
        "a helper outlived the agent: {left:?}"
    );
    assert!(started.elapsed() < slow + Duration::from_secs(5));
    // ... and the deregistration it ran finished: only the test's region holds the memory.
    assert_eq!(x.src.holders(), 1);
    drop((x.d, x.rd));
    let left = threads_after_join(|t| t.is_empty());
    assert!(left.is_empty(), "{left:?}");
}
