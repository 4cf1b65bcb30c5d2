//! Two processes: a child registers memory and prints its connection info and remote
//! key; the parent READs and WRITEs a few MiB with UCX (TCP, where the WRITE goes as an
//! active message received into the child's registration, then shared memory, then
//! shared memory with `alloc_host` memory on both sides, whose packed rkey must let the
//! other process map it) and both sides compare checksums. The child is this test
//! binary re-run with `KV_UCX_CHILD=<tls>` (and `KV_UCX_CHILD_ALLOC=1` for UCX-allocated
//! memory; see `child_main`).

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kv_backend_ucx::{Options, UcxBackend};
use kv_core::conformance::pattern;
use kv_core::{
    Backend, Descriptor, DescriptorList, MemKind, Notification, Op, PostOptions, Status,
    TransferRequest,
};
use kv_mem::HostBuffer;

/// Host memory from the heap or from UCX (`alloc_host`), as the test asks.
enum Mem {
    Heap(HostBuffer),
    Ucx(kv_backend_ucx::UcxHostMemory),
}

impl Mem {
    fn new(b: &UcxBackend, ucx: bool) -> Mem {
        if ucx {
            Mem::Ucx(b.alloc_host(LEN).unwrap())
        } else {
            Mem::Heap(HostBuffer::alloc(LEN, 4096).unwrap())
        }
    }
    fn descriptor(&self) -> Descriptor {
        match self {
            Mem::Heap(m) => m.descriptor(),
            Mem::Ucx(m) => m.descriptor(),
        }
    }
    fn as_slice(&self) -> &[u8] {
        match self {
            Mem::Heap(m) => m.as_slice(),
            Mem::Ucx(m) => m.as_slice(),
        }
    }
    fn as_mut_slice(&mut self) -> &mut [u8] {
        match self {
            Mem::Heap(m) => m.as_mut_slice(),
            Mem::Ucx(m) => m.as_mut_slice(),
        }
    }
}

const LEN: usize = 4 << 20;
const DEADLINE: Duration = Duration::from_secs(20);

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn backend(name: &str, tls: &str) -> kv_core::Result<UcxBackend> {
    UcxBackend::new(
        &kv_core::BackendInit::new(name),
        Options {
            tls: Some(tls.into()),
            ..Default::default()
        },
    )
}

/// The child side; does nothing unless `KV_UCX_CHILD` is set.
#[test]
fn child_main() {
    let Ok(tls) = std::env::var("KV_UCX_CHILD") else {
        return;
    };
    let b = backend("child", &tls).expect("child backend");
    let mut mem = Mem::new(&b, std::env::var_os("KV_UCX_CHILD_ALLOC").is_some());
    mem.as_mut_slice().copy_from_slice(&pattern(2, LEN));
    // SAFETY: `mem` outlives the registration (deregistered before it drops).
    let reg = unsafe {
        b.register(MemKind::Dram, &mem.descriptor(), kv_core::Access::ReadWrite)
            .unwrap()
    };
    let d = mem.descriptor();
    println!("INFO {}", hex(&b.connection_info().unwrap()));
    println!("KEY {}", hex(&b.remote_key(reg).unwrap()));
    println!("DESC {} {}", d.addr, d.len);
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let end = Instant::now() + Duration::from_secs(60);
    let mut notes: Vec<Notification> = Vec::new();
    let mut hold = false;
    while Instant::now() < end {
        // The target progresses: TCP and shared-memory RMA on heap memory complete
        // through its worker. `HOLD` stops that (UCX-allocated memory needs none).
        if hold || b.progress().unwrap() == 0 {
            std::thread::sleep(Duration::from_micros(20));
        }
        b.drain_notifications(&mut notes).unwrap();
        match rx.try_recv() {
            Ok(cmd) if cmd == "SUM" => println!("SUM {}", crc32c::crc32c(mem.as_slice())),
            Ok(cmd) if cmd == "STATS" => {
                let d = b.describe();
                let line = d.lines().find(|l| l.starts_with("active-message WRITEs"));
                println!("STATS {}", line.unwrap_or("none"));
            }
            Ok(cmd) if cmd == "HOLD" || cmd == "RESUME" => {
                hold = cmd == "HOLD";
                println!("{cmd} done");
            }
            Ok(cmd) if cmd == "NOTES" => {
                for n in notes.drain(..) {
                    println!("NOTE {} {}", n.peer, hex(&n.payload));
                }
                println!("END");
            }
            Ok(_) | Err(mpsc::TryRecvError::Disconnected) => break,
            Err(mpsc::TryRecvError::Empty) => {}
        }
        std::io::stdout().flush().unwrap();
    }
    b.deregister(reg).unwrap();
}

struct ChildProc {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl ChildProc {
    fn spawn(tls: &str, ucx_mem: bool) -> ChildProc {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        if ucx_mem {
            cmd.env("KV_UCX_CHILD_ALLOC", "1");
        }
        let mut child = cmd
            .args(["--exact", "child_main", "--nocapture", "--test-threads=1"])
            .env("KV_UCX_CHILD", tls)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn child");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                // libtest prints "test child_main ... " before the child's first line.
                let line = match line.split_once("test child_main ... ") {
                    Some((_, rest)) => rest.to_owned(),
                    None => line,
                };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        ChildProc {
            child,
            stdin,
            lines,
        }
    }

    /// The rest of the next line that starts with `prefix`.
    fn expect(&self, prefix: &str) -> String {
        let end = Instant::now() + DEADLINE;
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            let line = self.lines.recv_timeout(left).expect("child output");
            if let Some(rest) = line.strip_prefix(prefix) {
                return rest.trim().to_owned();
            }
        }
        panic!("child did not print {prefix}");
    }

    fn send(&mut self, cmd: &str) {
        writeln!(self.stdin, "{cmd}").unwrap();
        self.stdin.flush().unwrap();
    }

    fn sum(&mut self) -> u32 {
        self.send("SUM");
        self.expect("SUM ").parse().unwrap()
    }
}

impl Drop for ChildProc {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "EXIT");
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run(a: &UcxBackend, req: &TransferRequest, note: Option<&'static [u8]>) {
    let t = a.prepare(req).unwrap();
    let opts = PostOptions {
        notification: note.map(Bytes::from_static),
        deadline: Some(Instant::now() + DEADLINE),
    };
    // SAFETY: the local buffer stays registered until the transfer finished.
    unsafe { a.post(t, &opts).unwrap() };
    let st = loop {
        if a.progress().unwrap() == 0 {
            std::thread::sleep(Duration::from_micros(20));
        }
        let st = a.poll(t);
        if st.is_finished() {
            break st;
        }
    };
    assert!(matches!(st, Status::Done), "{} over UCX: {st:?}", req.op);
    a.release(t).unwrap();
}

fn two_processes(tls: &str, ucx_mem: bool) {
    let Some(a) = kv_core::require_or_skip("ucx", backend("parent", tls)) else {
        return;
    };
    let mut child = ChildProc::spawn(tls, ucx_mem);
    let info = unhex(&child.expect("INFO ")).unwrap();
    let key = unhex(&child.expect("KEY ")).unwrap();
    let desc = child.expect("DESC ");
    let mut it = desc.split(' ').map(|x| x.parse::<u64>().unwrap());
    let rdesc = Descriptor::new(it.next().unwrap(), it.next().unwrap(), 0);
    let ep = a.connect("child", &info).unwrap();
    a.import_remote(ep, MemKind::Dram, &rdesc, &key).unwrap();
    let mut mem = Mem::new(&a, ucx_mem);
    // SAFETY: `mem` outlives the registration (deregistered below).
    let reg = unsafe {
        a.register(MemKind::Dram, &mem.descriptor(), kv_core::Access::ReadWrite)
            .unwrap()
    };
    let mdesc = mem.descriptor();
    let req = |op| TransferRequest {
        op,
        local_kind: MemKind::Dram,
        local: DescriptorList::single(mdesc).unwrap(),
        peer: ep,
        remote_kind: MemKind::Dram,
        remote: DescriptorList::single(rdesc).unwrap(),
    };
    if ucx_mem {
        // The child's worker stands still: puts and gets are copies into its mapping.
        child.send("HOLD");
        child.expect("HOLD done");
    }
    // READ the child's pattern; both checksums must agree.
    run(&a, &req(Op::Read), None);
    let got = crc32c::crc32c(mem.as_slice());
    assert_eq!(got, crc32c::crc32c(&pattern(2, LEN)), "READ data");
    assert_eq!(child.sum(), got, "child's checksum after READ");
    if ucx_mem {
        mem.as_mut_slice().copy_from_slice(&pattern(5, LEN));
        run(&a, &req(Op::Write), None);
        assert_eq!(
            child.sum(),
            crc32c::crc32c(&pattern(5, LEN)),
            "child's checksum after a WRITE it did not progress for"
        );
        child.send("RESUME");
        child.expect("RESUME done");
    }
    // WRITE a new pattern with a notification; the child sees both.
    mem.as_mut_slice().copy_from_slice(&pattern(1, LEN));
    run(&a, &req(Op::Write), Some(b"written"));
    assert_eq!(
        child.sum(),
        crc32c::crc32c(&pattern(1, LEN)),
        "child's checksum after WRITE"
    );
    let end = Instant::now() + DEADLINE;
    let note = loop {
        child.send("NOTES");
        let n = child.expect("");
        if n.starts_with("NOTE ") {
            break n;
        }
        assert!(Instant::now() < end, "no notification reached the child");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(note, format!("NOTE parent {}", hex(b"written")));
    // Over TCP the 4 MiB WRITE went as one active message with rendezvous, received by
    // the child straight into its registration (checksummed above on both sides).
    let (sent, received) = if tls == "tcp" { (1, 1) } else { (0, 0) };
    let d = a.describe();
    assert!(
        d.contains(&format!("active-message WRITEs: sent {sent},")),
        "{d}"
    );
    child.send("STATS");
    let stats = child.expect("STATS ");
    assert!(
        stats.contains(&format!("received {received}, refused 0")),
        "{stats}"
    );
    a.deregister(reg).unwrap();
}

#[test]
fn tcp_between_two_processes() {
    if std::env::var_os("KV_UCX_CHILD").is_none() {
        two_processes("tcp", false);
    }
}

#[test]
fn shm_between_two_processes() {
    if std::env::var_os("KV_UCX_CHILD").is_none() {
        two_processes("posix,cma,self", false);
    }
}

#[test]
fn shm_between_two_processes_with_ucx_memory() {
    if std::env::var_os("KV_UCX_CHILD").is_none() {
        two_processes("posix,cma,self", true);
    }
}
