//! Issue 15 item 9: UCX's TCP transport listens where `BackendInit::bind_ip` says
//! (loopback by default), and idle connections to it are capped (`max_connections`):
//! a flood of them is shut down beyond the cap while an established peer keeps working.

use std::net::TcpStream;
use std::time::{Duration, Instant};

use kv_backend_ucx::{Options, UcxBackend};
use kv_core::{
    Access, Backend, BackendInit, DescriptorList, MemKind, Op, PostOptions, Status, TransferRequest,
};
use kv_mem::HostBuffer;

const CAP: usize = 16;
const FLOOD: usize = 200;

/// Established TCP sockets of this host whose local port is `port` (the accepted ends).
fn accepted(port: u16) -> usize {
    let mut n = 0;
    for p in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(t) = std::fs::read_to_string(p) else {
            continue;
        };
        for line in t.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let local_port = f
                .get(1)
                .and_then(|l| l.rsplit_once(':'))
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            if local_port == Some(port) && f.get(3) == Some(&"01") {
                n += 1;
            }
        }
    }
    n
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

fn write(a: &UcxBackend, b: &UcxBackend, t: kv_core::TransferId) -> Status {
    let opts = PostOptions {
        notification: None,
        deadline: Some(Instant::now() + Duration::from_secs(10)),
    };
    // SAFETY: the memory stays registered until the end of the test.
    unsafe { a.post(t, &opts).unwrap() };
    loop {
        a.progress().unwrap();
        let st = a.poll(t);
        if st.is_finished() {
            return st;
        }
        let _ = b; // b progresses on its own thread
        std::thread::sleep(Duration::from_micros(50));
    }
}

#[test]
fn listeners_bind_loopback_and_idle_connections_are_capped() {
    let opts = Options {
        tls: Some("tcp".into()),
        progress_thread: true,
        max_connections: CAP,
        ..Default::default()
    };
    let Some(b) = kv_core::require_or_skip("ucx", UcxBackend::new(&BackendInit::new("b"), opts))
    else {
        return;
    };
    let a = UcxBackend::new(
        &BackendInit::new("a"),
        Options {
            tls: Some("tcp".into()),
            ..Default::default()
        },
    )
    .unwrap();
    // Where b's UCX listens: loopback only (the default bind_ip).
    let d = b.describe();
    let line = d
        .lines()
        .find_map(|l| l.strip_prefix("UCX TCP listeners: "))
        .expect("describe names the listeners");
    let addrs: Vec<&str> = line.split(';').next().unwrap().split(", ").collect();
    assert!(!addrs.is_empty() && addrs[0] != "none", "{d}");
    assert!(
        addrs.iter().all(|a| a.starts_with("127.0.0.1:")),
        "UCX listens beyond loopback: {line}"
    );
    let port: u16 = addrs[0].rsplit_once(':').unwrap().1.parse().unwrap();
    // A legitimate peer first: its connection is the oldest.
    let src = HostBuffer::alloc(1 << 20, 4096).unwrap();
    let dst = HostBuffer::alloc(1 << 20, 4096).unwrap();
    // SAFETY: both buffers outlive the backends' use of them (deregistered below).
    let (rs, rd) = unsafe {
        (
            a.register(MemKind::Dram, &src.descriptor(), Access::ReadWrite)
                .unwrap(),
            b.register(MemKind::Dram, &dst.descriptor(), Access::ReadWrite)
                .unwrap(),
        )
    };
    let ep = a.connect("b", &b.connection_info().unwrap()).unwrap();
    a.import_remote(
        ep,
        MemKind::Dram,
        &dst.descriptor(),
        &b.remote_key(rd).unwrap(),
    )
    .unwrap();
    let t = a
        .prepare(&TransferRequest {
            op: Op::Write,
            local_kind: MemKind::Dram,
            local: DescriptorList::single(src.descriptor()).unwrap(),
            peer: ep,
            remote_kind: MemKind::Dram,
            remote: DescriptorList::single(dst.descriptor()).unwrap(),
        })
        .unwrap();
    assert!(matches!(write(&a, &b, t), Status::Done));
    let fds_before = open_fds();
    // The flood: idle connections that never say a word.
    let flood: Vec<TcpStream> = (0..FLOOD)
        .filter_map(|_| TcpStream::connect(("127.0.0.1", port)).ok())
        .collect();
    assert_eq!(flood.len(), FLOOD);
    let end = Instant::now() + Duration::from_secs(10);
    while accepted(port) > CAP && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(50));
    }
    let kept = accepted(port);
    assert!(kept <= CAP, "{kept} accepted connections kept, cap {CAP}");
    // b's own fds (the test's client ends are FLOOD of them) stay bounded too.
    let end = Instant::now() + Duration::from_secs(5);
    while open_fds() > fds_before + FLOOD + CAP && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        open_fds() <= fds_before + FLOOD + CAP,
        "{} fds open, {fds_before} before a flood of {FLOOD}",
        open_fds()
    );
    assert!(b.describe().contains("shut down)"));
    // The established peer still moves data.
    let st = write(&a, &b, t);
    assert!(
        matches!(st, Status::Done),
        "after the flood: {st:?}\n{}",
        a.describe()
    );
    drop(flood);
    a.release(t).unwrap();
    a.deregister(rs).unwrap();
    b.deregister(rd).unwrap();
}
