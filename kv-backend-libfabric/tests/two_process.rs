//! Two processes: a child registers memory and prints its connection info, address and
//! key; the parent WRITEs and READs a few MiB into it; both checksum.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kv_core::{
    Backend, Descriptor, DescriptorList, MemKind, Op, Params, PostOptions, Status, TransferRequest,
};
use kv_mem::HostBuffer;

const LEN: usize = 4 << 20;
const CHILD_ENV: &str = "KV_FABRIC_TWO_PROCESS_CHILD";

fn params(provider: &str) -> Params {
    let mut p = Params::new();
    p.insert("provider".into(), provider.into());
    if provider.starts_with("tcp") {
        p.insert("node".into(), "127.0.0.1".into());
    }
    p
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).expect("child wrote hex"))
        .collect()
}

/// The child side; runs only when the parent spawned this binary with `CHILD_ENV`.
#[test]
fn child() {
    let Ok(provider) = std::env::var(CHILD_ENV) else {
        return;
    };
    let backend =
        kv_backend_libfabric::create(&kv_core::BackendInit::new("child"), &params(&provider))
            .expect("child backend");
    let mut buf = HostBuffer::alloc(LEN, 4096).expect("child buffer");
    buf.as_mut_slice().fill(0x5a);
    let desc = buf.descriptor();
    // SAFETY: `buf` outlives the registration (deregistered below, before it drops).
    let reg = unsafe {
        backend
            .register(MemKind::Dram, &desc, kv_core::Access::ReadWrite)
            .expect("register")
    };
    let key = backend.remote_key(reg).expect("key");
    let info = backend.connection_info().expect("info");
    println!(
        "KVFI {} {} {} {}",
        hex(&info),
        desc.addr,
        desc.len,
        hex(&key)
    );
    std::io::stdout().flush().expect("stdout");
    // Progress until the parent says "done" on stdin (or 60 s pass).
    let done = Arc::new(AtomicBool::new(false));
    let d = done.clone();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
        d.store(true, Ordering::Release);
    });
    let end = Instant::now() + Duration::from_secs(60);
    while !done.load(Ordering::Acquire) && Instant::now() < end {
        let _ = backend.progress();
        std::thread::yield_now();
    }
    backend.deregister(reg).expect("deregister");
    println!("CRC {}", crc32c::crc32c(buf.as_slice()));
    std::io::stdout().flush().expect("stdout");
}

fn run(backend: &dyn Backend, req: &TransferRequest) {
    let id = backend.prepare(req).expect("prepare");
    let opts = PostOptions {
        notification: None,
        deadline: Some(Instant::now() + Duration::from_secs(20)),
    };
    // SAFETY: the local buffers outlive the transfer (waited for below).
    unsafe { backend.post(id, &opts).expect("post") };
    let st = kv_core::conformance::wait(backend, None, id, Duration::from_secs(25));
    assert!(matches!(st, Status::Done), "{} transfer: {st:?}", req.op);
    backend.release(id).expect("release");
}

fn parent(provider: &str) {
    let Some(backend) = kv_core::require_or_skip(
        "libfabric",
        kv_backend_libfabric::create(&kv_core::BackendInit::new("parent"), &params(provider)),
    ) else {
        return;
    };
    let exe = std::env::current_exe().expect("test binary");
    let mut child = Command::new(exe)
        .args(["--exact", "child", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, provider)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn child");
    let mut out = BufReader::new(child.stdout.take().expect("child stdout"));
    let mut line = String::new();
    let header = loop {
        line.clear();
        assert!(
            out.read_line(&mut line).expect("read child") > 0,
            "child exited early"
        );
        // libtest prints "test child ... " on the same line first.
        if let Some(at) = line.find("KVFI ") {
            break line[at + 5..].trim().to_string();
        }
    };
    let f: Vec<&str> = header.split(' ').collect();
    let (info, addr, len, key) = (
        unhex(f[0]),
        f[1].parse().unwrap(),
        f[2].parse().unwrap(),
        unhex(f[3]),
    );
    let remote = Descriptor::new(addr, len, 0);
    let peer = backend.connect("child", &info).expect("connect");
    backend
        .import_remote(peer, MemKind::Dram, &remote, &key)
        .expect("import");

    let mut src = HostBuffer::alloc(LEN, 4096).unwrap();
    for (i, b) in src.as_mut_slice().iter_mut().enumerate() {
        *b = (i * 7 + i / 4096) as u8;
    }
    let mut back = HostBuffer::alloc(LEN, 4096).unwrap();
    // SAFETY: both buffers outlive their registrations (deregistered below).
    let (rs, rb) = unsafe {
        (
            backend
                .register(MemKind::Dram, &src.descriptor(), kv_core::Access::ReadWrite)
                .unwrap(),
            backend
                .register(
                    MemKind::Dram,
                    &back.descriptor(),
                    kv_core::Access::ReadWrite,
                )
                .unwrap(),
        )
    };
    let req = |op, local: Descriptor| TransferRequest {
        op,
        local_kind: MemKind::Dram,
        local: DescriptorList::single(local).unwrap(),
        peer,
        remote_kind: MemKind::Dram,
        remote: DescriptorList::single(remote).unwrap(),
    };
    run(&*backend, &req(Op::Write, src.descriptor()));
    run(&*backend, &req(Op::Read, back.descriptor()));
    assert!(
        back.as_slice() == src.as_slice(),
        "READ back differs from what was written"
    );
    back.as_mut_slice().fill(0);

    let stdin = child.stdin.as_mut().expect("child stdin");
    writeln!(stdin, "done").expect("tell child");
    let crc = loop {
        line.clear();
        assert!(
            out.read_line(&mut line).expect("read child") > 0,
            "child gave no checksum"
        );
        if let Some(at) = line.find("CRC ") {
            break line[at + 4..].trim().parse::<u32>().expect("crc");
        }
    };
    assert_eq!(
        crc,
        crc32c::crc32c(src.as_slice()),
        "child's checksum of its buffer"
    );
    assert!(child.wait().expect("child exit").success());
    backend.deregister(rs).unwrap();
    backend.deregister(rb).unwrap();
}

#[test]
fn two_processes_tcp() {
    if std::env::var(CHILD_ENV).is_err() {
        parent("tcp;ofi_rxm");
    }
}

#[test]
fn two_processes_shm() {
    if std::env::var(CHILD_ENV).is_err() {
        parent("shm");
    }
}
