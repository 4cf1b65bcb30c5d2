//! WRITE throughput of the UCX backend between two processes with several posts in
//! flight: the shape of `ucx_perftest -t ucp_put_bw` (a client process putting, a server
//! process progressing, puts not waited for one by one), where `benches/throughput.rs`
//! runs both sides on one thread with one post at a time.
//!
//! The parent (initiator) allocates the bytes of one post with `UcxBackend::alloc_host`,
//! starts this binary again as the target (`KV_UCX_BENCH_CHILD`), which allocates and
//! registers as much and busy-polls `progress()` as `ucx_perftest`'s server does. The
//! parent prepares `window` transfers over that same memory (as `ucx_perftest` puts the
//! same buffer again and again), posts them all, and waits for the oldest, reposting each as it
//! completes (one `poll` per wait, which drives the parent's worker); 0.3 s warm-up, then
//! `KV_UCX_BENCH_SECS` (default 2) measured. Every post has a 20 s deadline. Then it
//! checks the bytes: a pattern written through each of the case's transfers once must
//! give the child's memory the expected crc32c.
//!
//! Cases (`KV_UCX_BENCH_CASE`, comma-separated; default all): `1MiB` (one 1 MiB piece
//! per post, 4 in flight), `16KiB` (one 16 KiB piece per post, 16 in flight),
//! `64x16KiB` (64 pieces of 16 KiB per post, adjacent locally and in reverse order
//! remotely, as `throughput.rs`'s batched cases, 4 in flight). `KV_UCX_BENCH_TLS`
//! (default `posix,cma,self`), `KV_UCX_BENCH_MAPPED=0` turns mapped operations off.
//!
//! Prints `RESULT case=… window=… MiBps=… posts=… served=…` per case (`served` is the
//! target's `describe()` line of operations served, mapped ones counted).
//!
//! `KV_UCX_BENCH_REF=memcpy` runs, instead, the copy a case asks of the target and
//! nothing else: the same pieces, from one buffer of the post's size into another, in
//! the same order, in this process (`RESULT case=… ref=memcpy MiBps=…`), the ceiling of
//! a post's bandwidth when the target copies (mapped operations). Run without
//! `--bench` (as `cargo test --benches` does) it runs each case for 50 ms, checks and
//! prints the same lines. Skips with a message when libucp is missing.

use std::io::Write;
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

#[path = "../tests/support/child.rs"]
mod child;
use child::{hex, stdin_lines, unhex, ChildProc};

use kv_backend_ucx::{Options, UcxBackend, UcxHostMemory};
use kv_core::conformance::pattern;
use kv_core::{
    Access, Backend, BackendInit, Descriptor, DescriptorList, MemKind, Op, PostOptions, Status,
    TransferId, TransferRequest,
};

/// A case: name, bytes per piece, pieces per post, posts in flight.
const CASES: [(&str, u64, u64, usize); 3] = [
    ("1MiB", 1 << 20, 1, 4),
    ("16KiB", 16 << 10, 1, 16),
    ("64x16KiB", 16 << 10, 64, 4),
];
/// How long the parent waits for one post.
const DEADLINE: Duration = Duration::from_secs(20);

fn options() -> Options {
    Options {
        tls: Some(std::env::var("KV_UCX_BENCH_TLS").unwrap_or_else(|_| "posix,cma,self".into())),
        mapped: std::env::var("KV_UCX_BENCH_MAPPED").map_or(true, |v| v != "0"),
        ..Default::default()
    }
}

/// The target: allocates and registers `len` bytes, prints how to reach them, then
/// busy-polls `progress()` and answers `SUM` (crc32c of its memory) and `STATS` until
/// `EXIT` or its stdin closes.
fn child(len: usize) {
    let b = UcxBackend::new(&BackendInit::new("target"), options()).expect("child backend");
    let mem = b.alloc_host(len).expect("alloc_host");
    // SAFETY: `mem` outlives the registration (deregistered before it drops).
    let reg = unsafe { b.register(MemKind::Dram, &mem.descriptor(), Access::ReadWrite) }
        .expect("register");
    let d = mem.descriptor();
    println!("INFO {}", hex(&b.connection_info().expect("info")));
    println!("KEY {}", hex(&b.remote_key(reg).expect("key")));
    println!("DESC {} {}", d.addr, d.len);
    let rx = stdin_lines();
    // Bounded: the parent ends every case within a minute.
    let end = Instant::now() + Duration::from_secs(120);
    while Instant::now() < end {
        for _ in 0..1024 {
            let _ = b.progress();
        }
        match rx.try_recv() {
            Ok(cmd) if cmd == "SUM" => println!("SUM {}", crc32c::crc32c(&mem.to_vec())),
            Ok(cmd) if cmd == "STATS" => {
                let d = b.describe();
                let line = d.lines().find(|l| l.starts_with("operations:"));
                println!("STATS {}", line.unwrap_or("none").trim());
            }
            Ok(_) | Err(mpsc::TryRecvError::Disconnected) => break,
            Err(mpsc::TryRecvError::Empty) => continue,
        }
        let _ = std::io::stdout().flush();
    }
    let _ = b.deregister(reg);
}

/// Posts `t` with a deadline `DEADLINE` after `now` (the caller's last clock reading:
/// one per post, as `ucx_perftest` reads its clock once per iteration).
fn post(a: &UcxBackend, t: TransferId, now: Instant) {
    let opts = PostOptions {
        notification: None,
        deadline: Some(now + DEADLINE),
    };
    // SAFETY: the parent's memory stays registered until every transfer finished.
    unsafe { a.post(t, &opts) }.expect("post");
}

/// Waits (polling, which drives the worker) until `t` is done; the clock is read
/// every 256 polls (the transfer's own deadline ends it well before this bound).
fn wait(a: &UcxBackend, t: TransferId) {
    let end = Instant::now() + DEADLINE + Duration::from_secs(5);
    for spin in 0u64.. {
        match a.poll(t) {
            Status::Done => return,
            Status::Failed(e) => panic!("transfer failed: {e}"),
            _ if spin % 256 == 255 && Instant::now() > end => panic!("transfer did not finish"),
            _ => {}
        }
    }
}

/// One case; `measure` is the measured time. Returns the RESULT line.
fn run(case: (&str, u64, u64, usize), measure: Duration) -> Option<String> {
    let (name, piece, count, window) = case;
    let per_post = piece * count;
    let len = per_post as usize;
    let a = match UcxBackend::new(&BackendInit::new("initiator"), options()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("skipping the two-process ucx bench: {e}");
            return None;
        }
    };
    let mut cmd = Command::new(std::env::current_exe().expect("own path"));
    cmd.env("KV_UCX_BENCH_CHILD", len.to_string());
    let mut target = ChildProc::spawn(cmd);
    let info = unhex(&target.expect("INFO ")).expect("hex");
    let key = unhex(&target.expect("KEY ")).expect("hex");
    let desc = target.expect("DESC ");
    let mut it = desc.split(' ').filter_map(|x| x.parse::<u64>().ok());
    let (raddr, rlen) = (it.next().expect("addr"), it.next().expect("len"));
    let ep = a.connect("target", &info).expect("connect");
    a.import_remote(ep, MemKind::Dram, &Descriptor::new(raddr, rlen, 0), &key)
        .expect("import");
    let mut mem: UcxHostMemory = a.alloc_host(len).expect("alloc_host");
    let laddr = mem.descriptor().addr;
    // SAFETY: `mem` outlives the registration (deregistered below, before it drops).
    let reg = unsafe { a.register(MemKind::Dram, &mem.descriptor(), Access::ReadWrite) }
        .expect("register");
    // Every transfer names the same memory (as ucx_perftest puts the same buffer again
    // and again): local pieces adjacent, remote ones in reverse order.
    let remote_at = |j: u64| remote_off(piece, count, j);
    let tids: Vec<TransferId> = (0..window)
        .map(|_| {
            let remote = (0..count)
                .map(|j| Descriptor::new(raddr + remote_at(j), piece, 0))
                .collect::<kv_core::Result<DescriptorList>>()
                .expect("remote list");
            a.prepare(&TransferRequest {
                op: Op::Write,
                local_kind: MemKind::Dram,
                local: DescriptorList::strided(laddr, piece, count, piece, 0).expect("local list"),
                peer: ep,
                remote_kind: MemKind::Dram,
                remote,
            })
            .expect("prepare")
        })
        .collect();

    // Warm-up, then the measured run: keep `window` posts in flight, oldest first.
    let now = Instant::now();
    for &t in &tids {
        post(&a, t, now);
    }
    let warm_end = Instant::now() + Duration::from_millis(300).min(measure);
    let mut start = None::<Instant>;
    let mut posts = 0u64;
    let mut head = 0;
    let end = loop {
        wait(&a, tids[head]);
        let now = Instant::now();
        match start {
            None if now >= warm_end => start = Some(now),
            Some(s) if now >= s + measure => {
                posts += 1;
                break now;
            }
            Some(_) => posts += 1,
            None => {}
        }
        post(&a, tids[head], now);
        head = (head + 1) % window;
    };
    for k in 1..window {
        wait(&a, tids[(head + k) % window]);
    }
    let secs = (end - start.expect("start")).as_secs_f64();
    let mibps = (posts * per_post) as f64 / secs / 1048576.0;

    // The bytes: a pattern through each transfer once; the child's crc must match.
    let data = pattern(7, len);
    // SAFETY: no transfer is in flight.
    unsafe { mem.as_mut_slice() }.copy_from_slice(&data);
    let mut expected = vec![0u8; len];
    for j in 0..count {
        let (from, to) = ((j * piece) as usize, remote_at(j) as usize);
        expected[to..to + piece as usize].copy_from_slice(&data[from..from + piece as usize]);
    }
    for &t in &tids {
        post(&a, t, Instant::now());
        wait(&a, t);
    }
    let sum: u32 = target.ask("SUM").parse().expect("crc");
    assert_eq!(
        sum,
        crc32c::crc32c(&expected),
        "case {name}: the target's memory is not what was written"
    );
    let served = target.ask("STATS");
    for t in tids {
        a.release(t).expect("release");
    }
    a.deregister(reg).expect("deregister");
    Some(format!(
        "RESULT case={name} window={window} MiBps={mibps:.0} posts={posts} served=\"{served}\" check=crc32c:{sum:08x}"
    ))
}

/// Where piece `j` of a post of `count` pieces of `piece` bytes lands in the target's
/// memory: local pieces adjacent, remote ones in reverse order (so none merge).
fn remote_off(piece: u64, count: u64, j: u64) -> u64 {
    (count - 1 - j) * piece
}

/// The `len` bytes of `buf` from its first page boundary on (`buf` has a page to spare).
fn page_aligned(buf: &mut [u8], len: usize) -> &mut [u8] {
    let off = buf.as_ptr().align_offset(4096);
    &mut buf[off..off + len]
}

/// The copies one post of `case` asks of the target, in a loop for `measure`: MiB/s.
fn memcpy_ref(case: (&str, u64, u64, usize), measure: Duration) -> f64 {
    let (_, piece, count, _) = case;
    let len = (piece * count) as usize;
    // Page-aligned, as the backend's `alloc_host` memory on both sides.
    let (mut src_buf, mut dst_buf) = (vec![0u8; len + 4096], vec![0u8; len + 4096]);
    let src = page_aligned(&mut src_buf, len);
    src.copy_from_slice(&pattern(3, len));
    let src = &*src;
    let dst = page_aligned(&mut dst_buf, len);
    let post = |dst: &mut [u8]| {
        for j in 0..count {
            let (from, to) = ((j * piece) as usize, remote_off(piece, count, j) as usize);
            dst[to..to + piece as usize].copy_from_slice(&src[from..from + piece as usize]);
        }
        std::hint::black_box(&mut *dst);
    };
    // At least 64 posts between clock readings (a 16 KiB post copies in well under 1 µs).
    let burst = ((64 << 20) / len.max(1) as u64).max(64);
    let warm_end = Instant::now() + Duration::from_millis(100);
    while Instant::now() < warm_end {
        post(dst);
    }
    let (start, mut posts) = (Instant::now(), 0u64);
    while start.elapsed() < measure {
        for _ in 0..burst {
            post(dst);
        }
        posts += burst;
    }
    (posts * len as u64) as f64 / start.elapsed().as_secs_f64() / 1048576.0
}

fn main() {
    if let Ok(len) = std::env::var("KV_UCX_BENCH_CHILD") {
        child(len.parse().expect("KV_UCX_BENCH_CHILD: a length"));
        return;
    }
    let bench = std::env::args().any(|a| a == "--bench");
    let measure = if bench {
        let secs = std::env::var("KV_UCX_BENCH_SECS")
            .ok()
            .and_then(|s| s.parse::<f64>().ok())
            .unwrap_or(2.0);
        Duration::from_secs_f64(secs.clamp(0.05, 60.0))
    } else {
        Duration::from_millis(50)
    };
    let only = std::env::var("KV_UCX_BENCH_CASE").ok();
    for case in CASES {
        if only
            .as_ref()
            .is_some_and(|o| !o.split(',').any(|c| c.trim() == case.0))
        {
            continue;
        }
        if std::env::var("KV_UCX_BENCH_REF").is_ok_and(|r| r == "memcpy") {
            let mibps = memcpy_ref(case, measure);
            println!("RESULT case={} ref=memcpy MiBps={mibps:.0}", case.0);
            continue;
        }
        match run(case, measure) {
            Some(line) => println!("{line}"),
            None => return,
        }
    }
}
