//! Every thread an agent starts (progress, side channel, its connections, helpers) is
//! joined when the agent is dropped (issue 14 item 11). One test in its own binary, so
//! no other test's agents are counted.

mod common;

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{loopback, opts, Hooked};
use kv_agent::{Agent, AgentOptions};
use kv_core::loopback::LoopbackFabric;

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

#[test]
fn dropping_the_agent_joins_its_threads() {
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
    assert!(
        agent_threads().is_empty(),
        "still running after drop: {:?}",
        agent_threads()
    );
    let _ = idle.flush();
}
