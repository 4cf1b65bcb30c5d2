//! Faults the backend must survive without breaking its promises (issue 14, items 4–5):
//! a stuck device must not hold `cancel`, `wait` or the backend's drop forever, nor may
//! memory the kernel still uses be freed; and a `post` whose engine fails after pieces
//! were handed to it reports that in the transfer's status, never as an `Err`.
//!
//! The stuck device is real: an ext4 image on a loop device, frozen with `fsfreeze`.
//! A write to a frozen file system blocks in the kernel (uninterruptibly, waiting in
//! `sb_start_write`) until it is thawed — on io_uring the write is punted to an io-wq
//! worker that a cancel cannot interrupt (`-EALREADY`), on the thread pool the worker
//! sits in `pwrite` — which is what a hung NVMe device or NFS server looks like to us.
//! It is deterministic: stuck until the test thaws it, and the tests wait until a
//! thread of this process really waits there before they act. It needs root (mount,
//! loop devices, FIFREEZE); elsewhere the tests skip and say why, and fail instead when
//! `KV_REQUIRE_BACKENDS` names `gds-stall`.
//!
//! The engine failure is real too: a seccomp filter makes `io_uring_enter` fail with
//! `EPERM` in the posting thread only, after the SQEs were queued in the shared ring.

#[macro_use]
mod common;

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use common::{attach, backend, pattern, Attached, Rig, TempDir, WAIT};
use kv_backend_gds::{leaks, open_direct, EngineChoice, Options};
use kv_core::{Backend, Descriptor, DescriptorList, Error, MemKind, Op, PostOptions, Status};
use kv_mem::HostBuffer;

/// How long the test waits for a step that a stuck device must not hold before it
/// thaws the device and fails.
const STEP: Duration = Duration::from_secs(15);

/// Stall tests run one at a time: each looks for a thread of this process stuck on a
/// frozen file system, which must be its own.
static STALL_TESTS: Mutex<()> = Mutex::new(());

/// A loop-mounted ext4 file system that can be frozen; thawed and unmounted on drop.
struct Stall {
    dir: TempDir,
    mnt: PathBuf,
}

fn run(cmd: &str, args: &[&Path]) -> kv_core::Result<()> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| Error::io(format!("running {cmd}"), e))?;
    if out.status.success() {
        return Ok(());
    }
    Err(Error::Unsupported(format!(
        "{cmd} {args:?} failed ({}): {} (needs root and loop devices)",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    )))
}

impl Stall {
    /// A fresh 64 MiB ext4 file system, or `None` (with the reason printed) where it
    /// cannot be made.
    fn require(tag: &str) -> Option<Stall> {
        kv_core::require_or_skip("gds-stall", Stall::new(tag))
    }

    fn new(tag: &str) -> kv_core::Result<Stall> {
        let dir = TempDir::new(tag);
        let img = dir.file("ext4.img");
        let mnt = dir.file("mnt");
        std::fs::create_dir(&mnt).map_err(|e| Error::io("mkdir", e))?;
        File::create(&img)
            .and_then(|f| f.set_len(64 << 20))
            .map_err(|e| Error::io("creating the image", e))?;
        run("mkfs.ext4", &[Path::new("-q"), Path::new("-F"), &img])?;
        run("mount", &[Path::new("-o"), Path::new("loop"), &img, &mnt])?;
        Ok(Stall { dir, mnt })
    }

    /// An `O_DIRECT` file of `len` bytes on it.
    fn file(&self, len: u64) -> Arc<File> {
        let (f, _) = open_direct(self.mnt.join("data"), true).unwrap();
        f.set_len(len).unwrap();
        Arc::new(f)
    }

    fn freeze(&self) {
        run("fsfreeze", &[Path::new("-f"), &self.mnt]).unwrap();
    }

    fn thaw(&self) {
        let _ = run("fsfreeze", &[Path::new("-u"), &self.mnt]);
    }
}

impl Drop for Stall {
    fn drop(&mut self) {
        self.thaw();
        let _ = run("umount", &[Path::new("-l"), &self.mnt]);
        let _ = &self.dir;
    }
}

/// True once a thread of this process waits on a frozen file system (within 10 s).
fn kernel_is_stuck() -> bool {
    let end = Instant::now() + Duration::from_secs(10);
    while Instant::now() < end {
        let tasks = std::fs::read_dir("/proc/self/task").into_iter().flatten();
        for t in tasks.flatten() {
            let wchan = std::fs::read_to_string(t.path().join("wchan")).unwrap_or_default();
            if wchan.trim() == "percpu_rwsem_wait" {
                return true;
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// A write of 1 MiB from a registered buffer, stuck on a frozen file system: `cancel`
/// returns `Busy` within its bound (the old code waited for the device forever), `wait`
/// and `poll` return, the memory stays registered; after the thaw the transfer ends as
/// canceled.
fn cancel_is_bounded(engine: EngineChoice) {
    let _one = STALL_TESTS.lock().unwrap_or_else(|e| e.into_inner());
    let Some(stall) = Stall::require("cancel") else {
        return;
    };
    let opts = Options {
        cancel_wait: Duration::from_millis(200),
        ..Options::default()
    };
    let Some(b) = backend(engine, opts) else {
        return;
    };
    let mut rig = Rig::with_file(
        b,
        stall.file(4 << 20),
        TempDir::new("unused"),
        4 << 20,
        1 << 20,
    );
    rig.buf
        .as_mut_slice()
        .copy_from_slice(&pattern(11, 1 << 20));
    let rig = Arc::new(rig);
    stall.freeze();
    let (tx, rx) = mpsc::channel();
    let r = rig.clone();
    std::thread::spawn(move || {
        let req = r.request(
            Op::Write,
            DescriptorList::single(Descriptor::new(r.addr(0), 1 << 20, 0)).unwrap(),
            DescriptorList::single(Descriptor::new(0, 1 << 20, r.fd())).unwrap(),
        );
        let t = r.b.prepare(&req).unwrap();
        // SAFETY: the buffer lives in the rig, kept until the transfer ends below.
        unsafe { r.b.post(t, &PostOptions::default()).unwrap() };
        if !kernel_is_stuck() {
            let _ = tx.send(Err("the write never got stuck on the frozen file system"));
            return;
        }
        let start = Instant::now();
        let canceled = r.b.cancel(t);
        let cancel_took = start.elapsed();
        let start = Instant::now();
        let waited = r.b.wait(t, Duration::from_millis(100));
        let polled = r.b.poll(t);
        let dereg = r.b.deregister(r.mreg);
        let _ = tx.send(Ok((
            t,
            canceled,
            cancel_took,
            waited,
            polled,
            start.elapsed(),
            dereg,
        )));
    });
    let got = rx.recv_timeout(STEP);
    stall.thaw();
    let (t, canceled, cancel_took, waited, polled, wait_took, dereg) = got
        .expect("cancel of a write stuck in the kernel did not return within 15 s")
        .unwrap();
    assert!(
        matches!(canceled, Err(Error::Busy(_))),
        "cancel: {canceled:?}"
    );
    assert!(
        cancel_took < Duration::from_secs(5),
        "cancel took {cancel_took:?}"
    );
    assert!(matches!(waited, Status::InProgress), "wait: {waited:?}");
    assert!(matches!(polled, Status::InProgress), "poll: {polled:?}");
    assert!(
        wait_took < Duration::from_secs(5),
        "wait and poll took {wait_took:?}"
    );
    assert!(
        matches!(dereg, Err(Error::Busy(_))),
        "deregister: {dereg:?}"
    );
    // Thawed, the write finishes and the transfer ends as canceled; its memory is free.
    match rig.b.wait(t, WAIT) {
        Status::Failed(Error::Canceled) => {}
        other => panic!("after the thaw: {other:?}"),
    }
    assert!(rig.b.cancel(t).is_ok());
    rig.b.release(t).unwrap();
}

/// A backend dropped with a bounce-buffer write stuck on a frozen file system: the drop
/// returns within its bound (the old code waited forever) and leaks the bounce buffer
/// rather than freeing it; after the thaw the kernel's write lands the user's bytes
/// from that still-valid buffer.
fn drop_is_bounded_and_leaks(engine: EngineChoice) {
    let _one = STALL_TESTS.lock().unwrap_or_else(|e| e.into_inner());
    let Some(stall) = Stall::require("drop") else {
        return;
    };
    let opts = Options {
        bounce: true,
        drop_wait: Duration::from_millis(300),
        ..Options::default()
    };
    let Some(b) = backend(engine, opts) else {
        return;
    };
    let file = stall.file(1 << 20);
    let mut buf = HostBuffer::alloc(64 << 10, 4096).unwrap();
    let data = pattern(12, 5000);
    buf.as_mut_slice()[3..5003].copy_from_slice(&data);
    // SAFETY: `buf` and `file` outlive the backend (dropped in the thread below).
    let Attached { fdesc, me, .. } = unsafe { attach(&b, &buf, &file, 1 << 20) };
    let req = kv_core::TransferRequest {
        op: Op::Write,
        local_kind: MemKind::Dram,
        local: DescriptorList::single(Descriptor::new(buf.descriptor().addr + 3, 5000, 0)).unwrap(),
        peer: me,
        remote_kind: MemKind::File,
        remote: DescriptorList::single(Descriptor::new(1000, 5000, fdesc.device)).unwrap(),
    };
    let t = b.prepare(&req).unwrap();
    stall.freeze();
    let before = leaks();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        // SAFETY: `buf` outlives the backend (the bounce path copies it at issue).
        unsafe { b.post(t, &PostOptions::default()).unwrap() };
        if !kernel_is_stuck() {
            let _ = tx.send(Err("the write never got stuck on the frozen file system"));
            return;
        }
        let start = Instant::now();
        drop(b);
        let _ = tx.send(Ok(start.elapsed()));
    });
    let got = rx.recv_timeout(STEP);
    let after = leaks();
    stall.thaw();
    let took = got
        .expect("dropping the backend with a write stuck in the kernel did not return within 15 s")
        .unwrap();
    assert!(took < Duration::from_secs(5), "drop took {took:?}");
    assert!(after.backends > before.backends, "{before:?} -> {after:?}");
    assert!(after.requests > before.requests, "{before:?} -> {after:?}");
    assert!(
        after.bounce_bytes >= before.bounce_bytes + 5000,
        "{before:?} -> {after:?}"
    );
    // Thawed, the kernel finishes the write from the leaked bounce buffer.
    let path = format!("/proc/self/fd/{}", file.as_raw_fd());
    let end = Instant::now() + STEP;
    let mut got = vec![0u8; 5000];
    loop {
        let mut f = File::open(&path).unwrap();
        std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(1000)).unwrap();
        f.read_exact(&mut got).unwrap();
        if got == data || Instant::now() > end {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        got == data,
        "the bytes written from the leaked bounce buffer"
    );
    drop(buf);
}

per_engine!(cancel_is_bounded, drop_is_bounded_and_leaks);

/// Makes `io_uring_enter` fail with `EPERM` in the calling thread (and nowhere else).
fn deny_io_uring_enter_in_this_thread() {
    let insn = |code: u32, jt: u8, jf: u8, k: u32| libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    };
    let filter = [
        // Load seccomp_data.nr (offset 0).
        insn(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 0, 0, 0),
        insn(
            libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K,
            0,
            1,
            libc::SYS_io_uring_enter as u32,
        ),
        insn(
            libc::BPF_RET | libc::BPF_K,
            0,
            0,
            libc::SECCOMP_RET_ERRNO | libc::EPERM as u32,
        ),
        insn(libc::BPF_RET | libc::BPF_K, 0, 0, libc::SECCOMP_RET_ALLOW),
    ];
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: prctl with a valid filter program that outlives the call; the filter
    // applies to this thread only (no TSYNC).
    unsafe {
        assert_eq!(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), 0);
        assert_eq!(
            libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &prog as *const libc::sock_fprog
            ),
            0,
            "seccomp: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// `post` queues the pieces in the ring, then `io_uring_enter` fails: the pieces may
/// still reach the kernel (any later enter submits them), so `post` must return `Ok`
/// and the failure must show in the transfer's status. The old code returned `Err`,
/// telling the caller it could free memory the kernel was about to use.
#[test]
fn post_reports_engine_failure_in_status() {
    let Some(b) = backend(EngineChoice::Uring, Options::default()) else {
        return;
    };
    let mut rig = Rig::new(b, 0, 16 << 20, 8 << 20);
    rig.buf
        .as_mut_slice()
        .copy_from_slice(&pattern(13, 8 << 20));
    let rig = Arc::new(rig);
    let r = rig.clone();
    let (t, posted) = std::thread::spawn(move || {
        let req = r.request(
            Op::Write,
            DescriptorList::single(Descriptor::new(r.addr(0), 8 << 20, 0)).unwrap(),
            DescriptorList::single(Descriptor::new(0, 8 << 20, r.fd())).unwrap(),
        );
        let t = r.b.prepare(&req).unwrap();
        deny_io_uring_enter_in_this_thread();
        // SAFETY: the buffer lives in the rig, kept until the transfer ends below.
        (t, unsafe { r.b.post(t, &PostOptions::default()) })
    })
    .join()
    .unwrap();
    assert!(
        posted.is_ok(),
        "post returned {posted:?} after handing pieces to the ring"
    );
    // Driven from a thread whose io_uring_enter works, the queued pieces run and the
    // transfer ends with the error the post hit.
    match rig.b.wait(t, WAIT) {
        Status::Failed(Error::Io { context, source }) => {
            assert!(context.contains("io_uring_enter"), "{context}: {source}");
            assert_eq!(source.raw_os_error(), Some(libc::EPERM));
        }
        other => panic!("expected the post's engine failure, got {other:?}"),
    }
    rig.b.release(t).unwrap();
    rig.b.deregister(rig.mreg).unwrap();
}
