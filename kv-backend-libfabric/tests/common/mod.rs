//! The two-process harness: the test binary spawns itself as a child that registers
//! memory, prints its connection info, address and key, serves until told "done", then
//! prints a checksum of its memory. Children are killed when their guard drops, so a
//! failing test never leaves one behind.
#![allow(dead_code)] // each test binary uses part of it

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[allow(unused_imports)]
use kv_backend_libfabric::{FabricBackend, Options};
use kv_core::{
    Access, Backend, Descriptor, DescriptorList, EndpointId, MemKind, Op, Params, PostOptions,
    Status, TransferId, TransferRequest,
};
use kv_mem::HostBuffer;

/// Bytes the child registers.
pub const LEN: usize = 4 << 20;
/// Set (to the provider) in the child's environment.
pub const CHILD_ENV: &str = "KV_FABRIC_TWO_PROCESS_CHILD";
/// What the child's memory holds at start.
pub const CHILD_FILL: u8 = 0x5a;
/// The longest a test with a child may run: then the watchdog kills the child and
/// aborts the test binary, so no test hangs (a provider call may spin forever).
pub const WATCHDOG: Duration = Duration::from_secs(90);

const SERVE: u8 = 0;
const PAUSE: u8 = 1;
const DONE: u8 = 2;

/// Backend parameters for `provider`, bound to loopback.
pub fn params(provider: &str) -> Params {
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

/// The child side: runs only when the parent spawned this binary with `CHILD_ENV`.
pub fn child_main() {
    let Ok(provider) = std::env::var(CHILD_ENV) else {
        return;
    };
    let backend =
        kv_backend_libfabric::create(&kv_core::BackendInit::new("child"), &params(&provider))
            .expect("child backend");
    let mut buf = HostBuffer::alloc(LEN, 4096).expect("child buffer");
    buf.as_mut_slice().fill(CHILD_FILL);
    let desc = buf.descriptor();
    // SAFETY: `buf` outlives the registration (deregistered below, before it drops).
    let reg = unsafe {
        backend
            .register(MemKind::Dram, &desc, Access::ReadWrite)
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
    // Serve until the parent says "done" on stdin (or 120 s pass). "pause" stops the
    // calls into libfabric (answered "PAUSED" once none runs), "resume" restarts them.
    let state = Arc::new(AtomicU8::new(SERVE));
    let st = state.clone();
    std::thread::spawn(move || {
        let mut line = String::new();
        loop {
            line.clear();
            let next = match std::io::stdin().read_line(&mut line) {
                Ok(n) if n > 0 && line.trim() == "pause" => PAUSE,
                Ok(n) if n > 0 && line.trim() == "resume" => SERVE,
                _ => DONE,
            };
            st.store(next, Ordering::Release);
            if next == DONE {
                return;
            }
        }
    });
    let end = Instant::now() + Duration::from_secs(120);
    let mut paused = false;
    while Instant::now() < end {
        match state.load(Ordering::Acquire) {
            DONE => break,
            PAUSE => {
                if !paused {
                    paused = true;
                    println!("PAUSED");
                    std::io::stdout().flush().expect("stdout");
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            _ => {
                paused = false;
                let _ = backend.progress();
                std::thread::yield_now();
            }
        }
    }
    backend.deregister(reg).expect("deregister");
    println!("CRC {}", crc32c::crc32c(buf.as_slice()));
    std::io::stdout().flush().expect("stdout");
}

/// A running child, killed (and reaped) when dropped.
pub struct ChildPeer {
    child: Child,
    provider: String,
    /// Set when the guard drops; the watchdog then stands down.
    finished: Arc<AtomicBool>,
    stdin: Option<ChildStdin>,
    out: BufReader<ChildStdout>,
    /// Its connection info.
    pub info: Vec<u8>,
    /// Its registered memory.
    pub remote: Descriptor,
    /// Its remote key.
    pub key: Vec<u8>,
}

impl ChildPeer {
    /// Spawns this test binary's `child` test on `provider` and reads its header.
    pub fn spawn(provider: &str) -> ChildPeer {
        let exe = std::env::current_exe().expect("test binary");
        let mut child = Command::new(exe)
            .args(["--exact", "child", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, provider)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn child");
        let stdin = child.stdin.take();
        let out = BufReader::new(child.stdout.take().expect("child stdout"));
        let finished = Arc::new(AtomicBool::new(false));
        watchdog(child.id() as i32, finished.clone());
        let mut c = ChildPeer {
            child,
            provider: provider.to_string(),
            finished,
            stdin,
            out,
            info: Vec::new(),
            remote: Descriptor::new(0, 0, 0),
            key: Vec::new(),
        };
        let header = c.line_with("KVFI ");
        let f: Vec<&str> = header.split(' ').collect();
        assert_eq!(f.len(), 4, "child header {header:?}");
        c.info = unhex(f[0]);
        c.remote = Descriptor::new(f[1].parse().expect("addr"), f[2].parse().expect("len"), 0);
        c.key = unhex(f[3]);
        c
    }

    /// The rest of the first stdout line containing `tag` (libtest prints "test child
    /// ... " on the same line first).
    fn line_with(&mut self, tag: &str) -> String {
        let mut line = String::new();
        loop {
            line.clear();
            let n = self.out.read_line(&mut line).expect("read child");
            assert!(n > 0, "child exited before printing {tag:?}");
            if let Some(at) = line.find(tag) {
                return line[at + tag.len()..].trim().to_string();
            }
        }
    }

    /// The child's pid.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends `sig` (SIGSTOP, SIGCONT, SIGKILL) to the child.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill on our own child's pid; it is not reaped until this guard drops.
        let rc = unsafe { libc::kill(self.pid(), sig) };
        assert_eq!(rc, 0, "kill({}, {sig})", self.pid());
    }

    /// Stalls the child: SIGSTOP, and returns once the kernel says it is stopped. On
    /// `shm` the child first stops calling libfabric: a shm peer stopped inside its
    /// progress holds its region's spinlock, and libfabric 1.17 then spins in every
    /// operation to it (inside `fi_write`, not boundable by the backend; README).
    pub fn stop(&mut self) {
        if self.provider == "shm" {
            let stdin = self.stdin.as_mut().expect("child stdin");
            writeln!(stdin, "pause").expect("tell child");
            self.line_with("PAUSED");
        }
        self.signal(libc::SIGSTOP);
        let end = Instant::now() + Duration::from_secs(5);
        let stat = format!("/proc/{}/stat", self.pid());
        loop {
            // The state follows the parenthesised command name: "pid (comm) T ...".
            let s = std::fs::read_to_string(&stat).expect("child stat");
            let state = s.rsplit(") ").next().and_then(|r| r.chars().next());
            if state == Some('T') {
                return;
            }
            assert!(Instant::now() < end, "child not stopped after 5 s: {s}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Resumes a child stopped by [`ChildPeer::stop`].
    pub fn resume(&mut self) {
        self.signal(libc::SIGCONT);
        if self.provider == "shm" {
            let stdin = self.stdin.as_mut().expect("child stdin");
            writeln!(stdin, "resume").expect("tell child");
        }
    }

    /// Kills the child and waits until it is gone.
    pub fn kill_and_reap(&mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.child.wait();
    }

    /// Tells the child to finish; returns the checksum of its memory and checks it
    /// exited cleanly.
    pub fn finish(mut self) -> u32 {
        let stdin = self.stdin.as_mut().expect("child stdin");
        writeln!(stdin, "done").expect("tell child");
        let crc = self.line_with("CRC ").parse::<u32>().expect("crc");
        let status = self.child.wait().expect("child exit");
        assert!(status.success(), "child exited with {status}");
        crc
    }
}

impl Drop for ChildPeer {
    fn drop(&mut self) {
        self.finished.store(true, Ordering::Release);
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: as in `signal`; SIGCONT first so a stopped child can die.
            unsafe {
                libc::kill(self.pid(), libc::SIGCONT);
                libc::kill(self.pid(), libc::SIGKILL);
            }
            let _ = self.child.wait();
        }
    }
}

/// After [`WATCHDOG`], unless `finished`: kills the child `pid` (resumed first) and
/// aborts this test binary.
fn watchdog(pid: i32, finished: Arc<AtomicBool>) {
    std::thread::spawn(move || {
        let end = Instant::now() + WATCHDOG;
        while Instant::now() < end {
            if finished.load(Ordering::Acquire) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("watchdog: a two-process test ran past {WATCHDOG:?}; killing child {pid}");
        // SAFETY: kill on our own child's pid; it is reaped only by its guard, which
        // has not dropped (`finished` is false).
        unsafe {
            libc::kill(pid, libc::SIGCONT);
            libc::kill(pid, libc::SIGKILL);
        }
        std::process::abort();
    });
}

/// A backend connected to `child`, with the child's memory imported.
pub fn connect(provider: &str, child: &ChildPeer) -> (Arc<FabricBackend>, EndpointId) {
    let opts = Options::from_params(&params(provider)).expect("options");
    let backend = Arc::new(
        FabricBackend::new(&kv_core::BackendInit::new("parent"), opts).expect("parent backend"),
    );
    let peer = backend.connect("child", &child.info).expect("connect");
    backend
        .import_remote(peer, MemKind::Dram, &child.remote, &child.key)
        .expect("import");
    (backend, peer)
}

/// `len` bytes of page-aligned host memory filled by `fill(i)`, registered read-write.
pub fn local(backend: &dyn Backend, fill: impl Fn(usize) -> u8) -> (HostBuffer, u64) {
    let mut b = HostBuffer::alloc(LEN, 4096).expect("buffer");
    for (i, x) in b.as_mut_slice().iter_mut().enumerate() {
        *x = fill(i);
    }
    // SAFETY: every caller deregisters (or leaks) the buffer before dropping it.
    let reg = unsafe {
        backend
            .register(MemKind::Dram, &b.descriptor(), Access::ReadWrite)
            .expect("register")
    };
    (b, reg.0)
}

/// The request moving all of `local` to or from the child's memory.
pub fn request(op: Op, peer: EndpointId, local: Descriptor, remote: Descriptor) -> TransferRequest {
    TransferRequest {
        op,
        local_kind: MemKind::Dram,
        local: DescriptorList::single(local).expect("list"),
        peer,
        remote_kind: MemKind::Dram,
        remote: DescriptorList::single(remote).expect("list"),
    }
}

/// Prepares and posts `req` with `deadline` from now.
pub fn post(backend: &dyn Backend, req: &TransferRequest, deadline: Duration) -> TransferId {
    let id = backend.prepare(req).expect("prepare");
    let opts = PostOptions {
        notification: None,
        deadline: Some(Instant::now() + deadline),
    };
    // SAFETY: the local buffers outlive the transfer (callers wait, or leak them).
    unsafe { backend.post(id, &opts).expect("post") };
    id
}

/// Polls `id` (driving progress) until it finishes or `limit` passes.
pub fn wait(backend: &dyn Backend, id: TransferId, limit: Duration) -> Status {
    kv_core::conformance::wait(backend, None, id, limit)
}

/// Runs `req` to the end and requires `Done`.
pub fn run(backend: &dyn Backend, req: &TransferRequest) {
    let id = post(backend, req, Duration::from_secs(20));
    let st = wait(backend, id, Duration::from_secs(25));
    assert!(matches!(st, Status::Done), "{} transfer: {st:?}", req.op);
    backend.release(id).expect("release");
}
