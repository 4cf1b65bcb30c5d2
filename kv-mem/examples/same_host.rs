//! What Linux gives for copying KV between two processes on one host, measured: a
//! child process owns the destination (heap memory, and a memfd-backed `SharedArena`
//! buffer); this process writes into it with `process_vm_writev` (cross-memory attach,
//! by iovec size and thread count) and through its own mapping of the child's memfd,
//! beside a local memcpy of the same bytes.
//!
//! ```sh
//! cargo run --release -p kv-mem --example same_host -- 256   # MiB per copy
//! ```

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kv_mem::SharedArena;

fn gbps(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}

/// The child: owns the destinations, prints where they are, waits for stdin to close.
fn child(len: usize) {
    let mut heap = vec![0u8; len];
    heap.iter_mut().step_by(4096).for_each(|b| *b = 1); // fault the pages in
    let arena = SharedArena::new(len).expect("arena");
    let mut shared = arena.alloc(len, 4096).expect("alloc");
    shared
        .as_mut_slice()
        .iter_mut()
        .step_by(4096)
        .for_each(|b| *b = 1);
    let fd = kv_mem::shared_backing(&shared.descriptor()).expect("memfd-backed");
    println!(
        "READY {} {} {} {} {}",
        std::process::id(),
        heap.as_ptr() as u64,
        shared.as_ptr() as u64,
        fd.fd,
        fd.offset
    );
    std::io::stdout().flush().expect("stdout");
    let mut line = String::new();
    while std::io::stdin()
        .read_line(&mut line)
        .map(|n| n > 0)
        .unwrap_or(false)
    {
        line.clear();
    }
    std::hint::black_box((&heap, &shared));
}

/// `process_vm_writev` of `src` to `dst` in process `pid`, in iovecs of `iov` bytes
/// (at most IOV_MAX per call), split over `threads` threads.
fn cma(pid: i32, src: &[u8], dst: u64, iov: usize, threads: usize) -> Duration {
    let per = src.len() / threads;
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let part = &src[t * per..(t + 1) * per];
            let base = dst + (t * per) as u64;
            s.spawn(move || {
                let mut off = 0;
                while off < part.len() {
                    let n = (part.len() - off).div_ceil(iov).min(1024);
                    let mut l = Vec::with_capacity(n);
                    let mut r = Vec::with_capacity(n);
                    let mut bytes = 0;
                    for i in 0..n {
                        let at = off + i * iov;
                        let len = iov.min(part.len() - at);
                        l.push(libc::iovec {
                            iov_base: part[at..].as_ptr() as *mut libc::c_void,
                            iov_len: len,
                        });
                        r.push(libc::iovec {
                            iov_base: (base + at as u64) as *mut libc::c_void,
                            iov_len: len,
                        });
                        bytes += len;
                    }
                    // SAFETY: the local iovecs lie in `part`; the kernel checks the
                    // remote ones against the child's mappings.
                    let got = unsafe {
                        libc::process_vm_writev(pid, l.as_ptr(), n as _, r.as_ptr(), n as _, 0)
                    };
                    assert_eq!(
                        got,
                        bytes as isize,
                        "process_vm_writev: {}",
                        std::io::Error::last_os_error()
                    );
                    off += bytes;
                }
            });
        }
    });
    start.elapsed()
}

/// memcpy of `src` into `dst`, split over `threads` threads.
fn copy(src: &[u8], dst: &mut [u8], threads: usize) -> Duration {
    let per = src.len() / threads;
    let start = Instant::now();
    std::thread::scope(|s| {
        for (d, c) in dst.chunks_mut(per).zip(src.chunks(per)) {
            s.spawn(move || d.copy_from_slice(std::hint::black_box(c)));
        }
    });
    start.elapsed()
}

fn best(f: impl FnMut() -> Duration) -> Duration {
    std::iter::repeat_with(f).take(5).min().unwrap_or_default()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("child") {
        child(args[2].parse().expect("len"));
        return;
    }
    let mib: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(256);
    let len = mib << 20;
    let mut c = Command::new(std::env::current_exe().expect("exe"))
        .args(["child", &len.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut out = BufReader::new(c.stdout.take().expect("stdout"));
    let mut line = String::new();
    out.read_line(&mut line).expect("READY");
    let v: Vec<u64> = line
        .trim()
        .strip_prefix("READY ")
        .expect("READY")
        .split(' ')
        .map(|x| x.parse().expect("number"))
        .collect();
    let (pid, heap, shared, fd, offset) = (v[0] as i32, v[1], v[2], v[3], v[4]);

    let src: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
    let mut local = vec![0u8; len];
    local.copy_from_slice(&src);
    println!("same-host copies of {mib} MiB into another process (best of 5), GB/s and x memcpy 1 thread");
    let m1 = gbps(len, best(|| copy(&src, &mut local, 1)));
    let m2 = gbps(len, best(|| copy(&src, &mut local, 2)));
    println!(
        "  memcpy, local               1 thread {m1:6.2}   2 threads {m2:6.2} ({:.2}x)",
        m2 / m1
    );

    // The child's memfd, mapped here as the tcp backend's shared-memory path does.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/proc/{pid}/fd/{fd}"))
        .expect("the child's memfd");
    // SAFETY: a shared mapping of the child's memfd; nothing else in this process uses
    // it, and the memfd is sealed against shrinking.
    let mut map = unsafe {
        memmap2::MmapOptions::new()
            .offset(offset)
            .len(len)
            .map_mut(&file)
    }
    .expect("map");
    let s1 = gbps(len, best(|| copy(&src, &mut map, 1)));
    let s2 = gbps(len, best(|| copy(&src, &mut map, 2)));
    println!(
        "  memfd mapping (shared path) 1 thread {s1:6.2} ({:.2}x)   2 threads {s2:6.2} ({:.2}x)",
        s1 / m1,
        s2 / m1
    );

    for iov in [4 << 10, 64 << 10, 1 << 20, 16 << 20] {
        for (name, dst) in [("heap ", heap), ("memfd", shared)] {
            let g1 = gbps(len, best(|| cma(pid, &src, dst, iov, 1)));
            let g2 = gbps(len, best(|| cma(pid, &src, dst, iov, 2)));
            println!(
                "  process_vm_writev {name} iov {:>5} KiB: 1 thread {g1:6.2} ({:.2}x)   2 threads {g2:6.2} ({:.2}x)",
                iov >> 10,
                g1 / m1,
                g2 / m1
            );
        }
    }
    drop(c.stdin.take());
    let _ = c.wait();
}
