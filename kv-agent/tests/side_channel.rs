//! The side channel under idle and hostile connections (issue 15 item 8): idle
//! connections can never lock a peer out, what is held for them is bounded, and nothing
//! a client sends before it authenticated makes the agent read (or buffer) a frame.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::opts;
use kv_agent::{Agent, AgentOptions};

fn channel_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm"))
                .is_ok_and(|n| n.starts_with("kv-agent-channe"))
        })
        .count()
}

#[test]
fn idle_connections_never_lock_peers_out() {
    let d = Agent::new(
        "decode",
        AgentOptions {
            channel_timeout: Duration::from_secs(5),
            ..opts()
        },
    )
    .unwrap();
    let addr = d.listen("127.0.0.1:0").unwrap();
    let p = Agent::new("prefill", opts()).unwrap();
    // One client holds many idle connections (more than any cap), from the same
    // address as the real peer.
    let idle: Vec<TcpStream> = (0..200)
        .map(|_| TcpStream::connect(addr).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let start = Instant::now();
    for _ in 0..3 {
        p.fetch_remote(addr).unwrap();
    }
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    // What they hold is bounded: at most the pending cap (plus the accept loop).
    assert!(
        channel_threads() <= 40,
        "{} channel threads",
        channel_threads()
    );
    drop(idle);
}

#[test]
fn nothing_is_read_before_authentication() {
    let d = Agent::new("decode", opts()).unwrap();
    let addr = d.listen("127.0.0.1:0").unwrap();
    // A PUT header claiming 60 MiB, then the 60 MiB.
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut h = [0u8; 12];
    h[..4].copy_from_slice(b"KVXS");
    h[4] = 2;
    h[8..].copy_from_slice(&(60u32 << 20).to_le_bytes());
    let start = Instant::now();
    let mut sent = 0usize;
    if s.write_all(&h).is_ok() {
        let chunk = vec![0u8; 1 << 20];
        while sent < 60 << 20 && s.write_all(&chunk).is_ok() {
            sent += chunk.len();
        }
    }
    assert!(sent < 16 << 20, "the agent took {} MiB", sent >> 20);
    assert!(
        start.elapsed() < Duration::from_secs(4),
        "{:?}",
        start.elapsed()
    );
    // And it still serves peers.
    Agent::new("prefill", opts())
        .unwrap()
        .fetch_remote(addr)
        .unwrap();
}
