//! Conformance-style storage tests: DRAM ↔ file in both directions on both engines,
//! sizes from 4 KiB to 64 MiB, a 10 000-entry scattered list, and the error paths.
//!
//! Every io_uring test creates its backend through `require_or_skip("gds-uring", …)`:
//! it skips with a reason where io_uring is unavailable, and fails instead when CI sets
//! `KV_REQUIRE_BACKENDS=gds-uring`.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kv_backend_gds::{open_direct, EngineChoice, EngineKind, GdsBackend, Options};
use kv_core::{
    Backend, Descriptor, DescriptorList, EndpointId, Error, MemKind, Op, PostOptions,
    RegistrationId, Status, TransferRequest,
};
use kv_mem::HostBuffer;

const WAIT: Duration = Duration::from_secs(60);

/// A directory under the system temp dir (a real disk here), removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "kv-gds-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn backend(engine: EngineChoice, opts: Options) -> Option<GdsBackend> {
    let o = Options { engine, ..opts };
    match engine {
        EngineChoice::ThreadPool => Some(GdsBackend::new("tester", o).unwrap()),
        _ => kv_core::require_or_skip("gds-uring", GdsBackend::new("tester", o)),
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    kv_core::conformance::pattern(seed, len)
}

/// A backend with one file and one DRAM buffer registered and the file imported
/// through a self-endpoint.
struct Rig {
    b: GdsBackend,
    file: Arc<File>,
    _dir: TempDir,
    buf: HostBuffer,
    mreg: RegistrationId,
    freg: RegistrationId,
    fdesc: Descriptor,
    me: EndpointId,
}

impl Rig {
    fn new(b: GdsBackend, file_len: u64, reg_len: u64, buf_len: usize) -> Rig {
        let dir = TempDir::new("rig");
        let (file, direct) = open_direct(dir.file("data"), true).unwrap();
        if !direct {
            eprintln!(
                "note: {} refuses O_DIRECT; testing buffered I/O",
                dir.0.display()
            );
        }
        file.set_len(file_len).unwrap();
        Self::with_file(b, Arc::new(file), dir, reg_len, buf_len)
    }

    fn with_file(
        b: GdsBackend,
        file: Arc<File>,
        dir: TempDir,
        reg_len: u64,
        buf_len: usize,
    ) -> Rig {
        let buf = HostBuffer::alloc(buf_len, 4096).unwrap();
        let fdesc = Descriptor::new(0, reg_len, file.as_raw_fd() as u32);
        // SAFETY: the buffer and the file live in the rig, which deregisters on drop.
        let (mreg, freg) = unsafe {
            (
                b.register(MemKind::Dram, &buf.descriptor(), kv_core::Access::ReadWrite)
                    .unwrap(),
                b.register(MemKind::File, &fdesc, kv_core::Access::ReadWrite)
                    .unwrap(),
            )
        };
        let me = b.connect("tester", &b.connection_info().unwrap()).unwrap();
        b.import_remote(me, MemKind::File, &fdesc, &b.remote_key(freg).unwrap())
            .unwrap();
        Rig {
            b,
            file,
            _dir: dir,
            buf,
            mreg,
            freg,
            fdesc,
            me,
        }
    }

    fn fd(&self) -> u32 {
        self.fdesc.device
    }

    fn addr(&self, off: u64) -> u64 {
        self.buf.descriptor().addr + off
    }

    fn request(&self, op: Op, local: DescriptorList, remote: DescriptorList) -> TransferRequest {
        TransferRequest {
            op,
            local_kind: MemKind::Dram,
            local,
            peer: self.me,
            remote_kind: MemKind::File,
            remote,
        }
    }

    /// Prepares, posts and waits; releases the transfer.
    fn run(&self, op: Op, local: DescriptorList, remote: DescriptorList) -> Status {
        let t = self.b.prepare(&self.request(op, local, remote)).unwrap();
        // SAFETY: the buffer outlives the wait below.
        unsafe { self.b.post(t, &PostOptions::default()).unwrap() };
        let st = self.b.wait(t, WAIT);
        assert!(st.is_finished(), "transfer did not finish in {WAIT:?}");
        self.b.release(t).unwrap();
        st
    }

    fn one(&self, op: Op, mem_off: u64, file_off: u64, len: u64) -> Status {
        self.run(
            op,
            DescriptorList::single(Descriptor::new(self.addr(mem_off), len, 0)).unwrap(),
            DescriptorList::single(Descriptor::new(file_off, len, self.fd())).unwrap(),
        )
    }

    fn read_file(&self, off: u64, len: usize) -> Vec<u8> {
        // A separate buffered handle: what another reader of the file would see.
        let mut f = File::open(format!("/proc/self/fd/{}", self.file.as_raw_fd())).unwrap();
        f.seek(SeekFrom::Start(off)).unwrap();
        let mut v = vec![0u8; len];
        f.read_exact(&mut v).unwrap();
        v
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = self.b.deregister(self.mreg);
        let _ = self.b.deregister(self.freg);
    }
}

fn assert_done(st: &Status, what: &str) {
    assert!(matches!(st, Status::Done), "{what}: {st:?}");
}

fn round_trip_sizes(engine: EngineChoice) {
    const MAX: usize = 64 << 20;
    let Some(b) = backend(engine, Options::default()) else {
        return;
    };
    let mut rig = Rig::new(b, 0, 1 << 30, MAX);
    if let Some(a) = rig.b.file_alignment(rig.freg).unwrap() {
        assert!(
            a == 512 || a == 4096 || a.is_power_of_two(),
            "alignment {a}"
        );
    }
    let mut off = 0u64;
    for (i, len) in [4usize << 10, 64 << 10, 1 << 20, 16 << 20, 64 << 20]
        .into_iter()
        .enumerate()
    {
        let data = pattern(i as u64 + 1, len);
        rig.buf.as_mut_slice()[..len].copy_from_slice(&data);
        assert_done(&rig.one(Op::Write, 0, off, len as u64), "write");
        let on_disk = rig.read_file(off, len);
        assert_eq!(
            crc32c::crc32c(&on_disk),
            crc32c::crc32c(&data),
            "file content after writing {len} bytes"
        );
        rig.buf.as_mut_slice()[..len].fill(0);
        assert_done(&rig.one(Op::Read, 0, off, len as u64), "read");
        assert_eq!(
            crc32c::crc32c(&rig.buf.as_slice()[..len]),
            crc32c::crc32c(&data),
            "memory after reading {len} bytes"
        );
        off += len as u64 + 4096;
    }
}

/// 10 000 4 KiB blocks, memory in order, file slots permuted with gaps between them.
fn scattered(engine: EngineChoice) {
    scattered_with(engine, Options::default());
}

/// The same with requests handed to the kernel a whole queue at a time instead of one
/// by one (`submit_batch` = `queue_depth`).
#[test]
fn scattered_batched_submission() {
    let opts = Options {
        queue_depth: 32,
        submit_batch: 32,
        ..Options::default()
    };
    scattered_with(EngineChoice::Uring, opts);
}

fn scattered_with(engine: EngineChoice, opts: Options) {
    const N: u64 = 10_000;
    const BS: u64 = 4096;
    let Some(b) = backend(engine, opts) else {
        return;
    };
    let mut rig = Rig::new(b, 0, 2 * N * BS, (N * BS) as usize);
    // A permutation of 0..N (multiplication by a unit mod N), slots two blocks apart.
    let slot = |i: u64| (i * 7919 + 13) % N * 2 * BS;
    let local = DescriptorList::strided(rig.addr(0), BS, N, BS, 0).unwrap();
    let remote: DescriptorList = (0..N)
        .map(|i| Descriptor::new(slot(i), BS, rig.fd()))
        .collect::<kv_core::Result<_>>()
        .unwrap();
    assert_eq!(remote.len(), N);
    let data = pattern(99, (N * BS) as usize);
    rig.buf.as_mut_slice().copy_from_slice(&data);
    assert_done(
        &rig.run(Op::Write, local.clone(), remote.clone()),
        "scattered write",
    );
    for i in [0, 1, 4999, N - 1] {
        let got = rig.read_file(slot(i), BS as usize);
        assert_eq!(
            got,
            &data[(i * BS) as usize..((i + 1) * BS) as usize],
            "block {i}"
        );
    }
    // Read back in reverse memory order.
    rig.buf.as_mut_slice().fill(0);
    let rev_local: DescriptorList = (0..N)
        .rev()
        .map(|i| Descriptor::new(rig.addr(i * BS), BS, 0))
        .collect::<kv_core::Result<_>>()
        .unwrap();
    let rev_remote: DescriptorList = (0..N)
        .rev()
        .map(|i| Descriptor::new(slot(i), BS, rig.fd()))
        .collect::<kv_core::Result<_>>()
        .unwrap();
    assert_done(&rig.run(Op::Read, rev_local, rev_remote), "scattered read");
    assert_eq!(crc32c::crc32c(rig.buf.as_slice()), crc32c::crc32c(&data));
}

fn read_past_end(engine: EngineChoice) {
    let Some(b) = backend(engine, Options::default()) else {
        return;
    };
    let rig = Rig::new(b, 64 << 10, 1 << 20, 1 << 20);
    // Half inside the file, half beyond.
    match rig.one(Op::Read, 0, 0, 128 << 10) {
        Status::Failed(Error::OutOfBounds(m)) => {
            assert!(m.contains("past the end"), "{m}");
            assert!(m.contains("65536 of 131072 bytes"), "{m}");
        }
        other => panic!("expected a read-past-end failure, got {other:?}"),
    }
    // Wholly beyond.
    match rig.one(Op::Read, 0, 512 << 10, 4096) {
        Status::Failed(Error::OutOfBounds(m)) => assert!(m.contains("0 of 4096 bytes"), "{m}"),
        other => panic!("expected a read-past-end failure, got {other:?}"),
    }
    // The backend is still usable afterwards.
    assert_done(&rig.one(Op::Read, 0, 0, 64 << 10), "read inside the file");
}

/// A 1 MiB tmpfs: writing 2 MiB fails with ENOSPC and says how much landed.
fn enospc(engine: EngineChoice) {
    struct Mount(TempDir);
    impl Drop for Mount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg(&self.0 .0)
                .status();
        }
    }
    let dir = TempDir::new("enospc");
    let ok = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&dir.0)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("skipping ENOSPC test: cannot mount a size-limited tmpfs here (needs root / CAP_SYS_ADMIN)");
        return;
    }
    let mount = Mount(dir);
    let Some(b) = backend(engine, Options::default()) else {
        return;
    };
    let (file, _) = open_direct(mount.0.file("full"), true).unwrap();
    let rig = Rig::with_file(b, Arc::new(file), TempDir::new("unused"), 4 << 20, 2 << 20);
    match rig.one(Op::Write, 0, 0, 2 << 20) {
        Status::Failed(Error::Io { context, source }) => {
            assert_eq!(
                source.raw_os_error(),
                Some(libc_enospc()),
                "{context}: {source}"
            );
            assert!(
                context.contains("of 2097152 bytes of the transfer landed"),
                "{context}"
            );
        }
        other => panic!("expected ENOSPC, got {other:?}"),
    }
    drop(rig);
}

fn libc_enospc() -> i32 {
    28 // ENOSPC on Linux
}

macro_rules! per_engine {
    ($($name:ident),*) => {
        mod uring {
            $( #[test] fn $name() { super::$name(kv_backend_gds::EngineChoice::Uring) } )*
        }
        mod thread_pool {
            $( #[test] fn $name() { super::$name(kv_backend_gds::EngineChoice::ThreadPool) } )*
        }
    };
}

per_engine!(round_trip_sizes, scattered, read_past_end, enospc);

#[test]
fn engines_report_themselves() {
    let p = backend(EngineChoice::ThreadPool, Options::default()).unwrap();
    assert_eq!(p.engine(), EngineKind::ThreadPool);
    assert!(p.describe().contains("thread pool"), "{}", p.describe());
    let Some(u) = backend(EngineChoice::Uring, Options::default()) else {
        return;
    };
    assert_eq!(u.engine(), EngineKind::Uring);
    assert!(u.describe().contains("io_uring"), "{}", u.describe());
    let auto = GdsBackend::new("x", Options::default()).unwrap();
    assert_eq!(auto.engine(), EngineKind::Uring);
}

#[test]
fn missing_file_and_bad_fd() {
    let dir = TempDir::new("missing");
    match open_direct(dir.file("nope"), false) {
        Err(Error::Io { source, .. }) => assert_eq!(source.kind(), std::io::ErrorKind::NotFound),
        other => panic!("expected NotFound, got {other:?}"),
    }
    let Some(b) = backend(EngineChoice::Uring, Options::default()) else {
        return;
    };
    // A descriptor number nothing has open.
    let bad = Descriptor::new(0, 4096, 1_000_000);
    // SAFETY: registration of a file range touches no memory.
    let r = unsafe { b.register(MemKind::File, &bad, kv_core::Access::ReadWrite) };
    assert!(matches!(r, Err(Error::Io { .. })), "{r:?}");
}

#[test]
fn unaligned_io_is_refused_with_the_alignment() {
    let Some(b) = backend(EngineChoice::Uring, Options::default()) else {
        return;
    };
    let rig = Rig::new(b, 1 << 20, 1 << 20, 1 << 20);
    let Some(align) = rig.b.file_alignment(rig.freg).unwrap() else {
        eprintln!("skipping: the temp dir's file system refuses O_DIRECT, nothing to align");
        return;
    };
    let cases = [
        (0, 100, 4096u64, "offset"),
        (0, 0, 1000, "length"),
        (8, 0, 4096, "address"),
    ];
    for (mem_off, file_off, len, what) in cases {
        let req = rig.request(
            Op::Write,
            DescriptorList::single(Descriptor::new(rig.addr(mem_off), len, 0)).unwrap(),
            DescriptorList::single(Descriptor::new(file_off, len, rig.fd())).unwrap(),
        );
        match rig.b.prepare(&req) {
            Err(Error::InvalidArgument(m)) => {
                assert!(
                    m.contains(&format!("aligned to {align} bytes")),
                    "{what}: {m}"
                )
            }
            other => panic!("unaligned {what} accepted: {other:?}"),
        }
    }
}

fn bounce_rig(engine: EngineChoice) -> Option<Rig> {
    let b = backend(
        engine,
        Options {
            bounce: true,
            ..Options::default()
        },
    )?;
    let dir = TempDir::new("bounce");
    let path = dir.file("data");
    let mut f = File::create(&path).unwrap();
    f.write_all(&pattern(5, 3 * 4096)).unwrap();
    drop(f);
    let (file, _) = open_direct(&path, false).unwrap();
    Some(Rig::with_file(b, Arc::new(file), dir, 1 << 20, 64 << 10))
}

fn bounce(engine: EngineChoice) {
    let Some(mut rig) = bounce_rig(engine) else {
        return;
    };
    let before = pattern(5, 3 * 4096);
    // Unaligned offset, length and address, across a block boundary.
    let data = pattern(6, 5000);
    rig.buf.as_mut_slice()[3..5003].copy_from_slice(&data);
    assert_done(&rig.one(Op::Write, 3, 1000, 5000), "bounce write");
    let mut want = before.clone();
    want[1000..6000].copy_from_slice(&data);
    assert_eq!(
        rig.read_file(0, want.len()),
        want,
        "bytes around the write unchanged"
    );
    assert_eq!(
        rig.file.metadata().unwrap().len(),
        3 * 4096,
        "file size unchanged"
    );
    // Read an unaligned piece back into an unaligned address.
    rig.buf.as_mut_slice().fill(0);
    assert_done(&rig.one(Op::Read, 7, 999, 5002), "bounce read");
    assert_eq!(&rig.buf.as_slice()[7..5009], &want[999..6001]);
    // A write that extends the file ends exactly where the user's bytes end.
    rig.buf.as_mut_slice()[..100].copy_from_slice(&pattern(7, 100));
    assert_done(
        &rig.one(Op::Write, 0, 3 * 4096 - 10, 100),
        "extending bounce write",
    );
    assert_eq!(rig.file.metadata().unwrap().len(), 3 * 4096 + 90);
    assert_eq!(rig.read_file(3 * 4096 - 10, 100), pattern(7, 100));
    // The unaligned tail can be read back although the aligned read stops at EOF.
    assert_done(
        &rig.one(Op::Read, 1, 3 * 4096 - 10, 100),
        "bounce read at EOF",
    );
    assert_eq!(&rig.buf.as_slice()[1..101], &pattern(7, 100)[..]);
}

#[test]
fn bounce_uring() {
    bounce(EngineChoice::Uring)
}

#[test]
fn bounce_thread_pool() {
    bounce(EngineChoice::ThreadPool)
}

#[test]
fn cancel_returns_after_the_kernel_let_go() {
    let Some(b) = backend(EngineChoice::Uring, Options::default()) else {
        return;
    };
    let rig = Rig::new(b, 0, 1 << 30, 32 << 20);
    let local = DescriptorList::strided(rig.addr(0), 4096, 8192, 4096, 0).unwrap();
    let remote = DescriptorList::strided(0, 8192, 8192, 4096, rig.fd()).unwrap();
    let t = rig
        .b
        .prepare(&rig.request(Op::Write, local, remote))
        .unwrap();
    // SAFETY: the buffer outlives the cancel below.
    unsafe { rig.b.post(t, &PostOptions::default()).unwrap() };
    // While it runs its memory cannot be deregistered.
    let busy = rig.b.deregister(rig.mreg);
    rig.b.cancel(t).unwrap();
    // Only the first queue-depth pieces were issued (nothing drove progress since), so
    // the cancel cannot lose the race.
    match rig.b.poll(t) {
        Status::Failed(Error::Canceled) => {}
        other => panic!("after cancel: {other:?}"),
    }
    assert!(matches!(busy, Err(Error::Busy(_))), "{busy:?}");
    rig.b.release(t).unwrap();
    // The transfer no longer holds the registrations; re-posting a fresh one works.
    assert_done(&rig.one(Op::Write, 0, 0, 1 << 20), "write after cancel");
}

#[test]
fn notifications_follow_the_data() {
    let Some(b) = backend(EngineChoice::Uring, Options::default()) else {
        return;
    };
    let rig = Rig::new(b, 0, 1 << 20, 1 << 20);
    let req = rig.request(
        Op::Write,
        DescriptorList::single(Descriptor::new(rig.addr(0), 1 << 20, 0)).unwrap(),
        DescriptorList::single(Descriptor::new(0, 1 << 20, rig.fd())).unwrap(),
    );
    let t = rig.b.prepare(&req).unwrap();
    let opts = PostOptions {
        notification: Some(bytes::Bytes::from_static(b"layer-0")),
        ..Default::default()
    };
    // SAFETY: the buffer outlives the wait.
    unsafe { rig.b.post(t, &opts).unwrap() };
    rig.b
        .notify(rig.me, bytes::Bytes::from_static(b"after"))
        .unwrap();
    assert_done(&rig.b.wait(t, WAIT), "write");
    let mut got = Vec::new();
    rig.b.drain_notifications(&mut got).unwrap();
    let payloads: Vec<&[u8]> = got.iter().map(|n| &n.payload[..]).collect();
    assert_eq!(payloads, vec![&b"layer-0"[..], &b"after"[..]]);
    assert!(got.iter().all(|n| n.peer == "tester"));
    assert!(rig.b.capabilities().notifications);
}

#[test]
fn bounds_and_kinds_are_checked() {
    let Some(b) = backend(EngineChoice::Uring, Options::default()) else {
        return;
    };
    let rig = Rig::new(b, 0, 1 << 20, 1 << 20);
    let mem = |off, len| DescriptorList::single(Descriptor::new(rig.addr(off), len, 0)).unwrap();
    let file = |off, len| DescriptorList::single(Descriptor::new(off, len, rig.fd())).unwrap();
    assert!(matches!(
        rig.b
            .prepare(&rig.request(Op::Write, mem(0, 8192), file((1 << 20) - 4096, 8192))),
        Err(Error::OutOfBounds(_))
    ));
    assert!(matches!(
        rig.b
            .prepare(&rig.request(Op::Write, mem((1 << 20) - 4096, 8192), file(0, 8192))),
        Err(Error::NotRegistered(_))
    ));
    assert!(matches!(
        rig.b
            .prepare(&rig.request(Op::Write, mem(0, 4096), file(0, 8192))),
        Err(Error::InvalidArgument(_))
    ));
    let mut wrong = rig.request(Op::Write, mem(0, 4096), file(0, 4096));
    wrong.remote_kind = MemKind::Dram;
    assert!(matches!(rig.b.prepare(&wrong), Err(Error::Unsupported(_))));
    // A forged key is refused.
    let mut key = rig.b.remote_key(rig.freg).unwrap().to_vec();
    key[15] ^= 1;
    assert!(rig
        .b
        .import_remote(rig.me, MemKind::File, &rig.fdesc, &key)
        .is_err());
    assert!(matches!(
        rig.b
            .import_remote(rig.me, MemKind::File, &rig.fdesc, b"short"),
        Err(Error::InvalidMetadata(_))
    ));
}

#[test]
fn deadline_fails_the_transfer() {
    let Some(b) = backend(EngineChoice::Uring, Options::default()) else {
        return;
    };
    let rig = Rig::new(b, 0, 1 << 30, 1 << 20);
    let req = rig.request(
        Op::Write,
        DescriptorList::single(Descriptor::new(rig.addr(0), 1 << 20, 0)).unwrap(),
        DescriptorList::single(Descriptor::new(0, 1 << 20, rig.fd())).unwrap(),
    );
    let t = rig.b.prepare(&req).unwrap();
    let opts = PostOptions {
        deadline: Some(std::time::Instant::now() - Duration::from_millis(1)),
        ..Default::default()
    };
    // SAFETY: the buffer outlives the wait.
    unsafe { rig.b.post(t, &opts).unwrap() };
    match rig.b.wait(t, WAIT) {
        Status::Failed(Error::TimedOut { .. }) => {}
        other => panic!("expected a timeout: {other:?}"),
    }
}

/// Without a GPU driver the cuFile path reports itself unavailable, never panics.
#[cfg(feature = "cuda")]
#[test]
fn cufile_absence_is_reported_cleanly() {
    let b = GdsBackend::new("tester", Options::default()).unwrap();
    match kv_mem::VramBuffer::alloc(0, 1 << 20) {
        Ok(v) => {
            // A GPU host: VRAM registers when cuFile is there, else says why not.
            // SAFETY: `v` outlives the registration (deregistered below).
            match unsafe { b.register(MemKind::Vram, &v.descriptor(), kv_core::Access::ReadWrite) }
            {
                Ok(r) => b.deregister(r).unwrap(),
                Err(e) => assert!(
                    matches!(e, Error::BackendUnavailable { .. } | Error::Backend { .. }),
                    "{e}"
                ),
            }
        }
        Err(Error::BackendUnavailable { reason, .. }) => {
            assert!(!reason.is_empty());
            assert!(!b.capabilities().mem_kinds.contains(MemKind::Vram));
            let fake = Descriptor::new(0x7000_0000_0000, 4096, 0);
            // SAFETY: refused before anything touches the range.
            match unsafe { b.register(MemKind::Vram, &fake, kv_core::Access::ReadWrite) } {
                Err(Error::BackendUnavailable { reason, .. }) => {
                    assert!(
                        reason.contains("libcuda")
                            || reason.contains("cufile")
                            || reason.contains("cuFile"),
                        "{reason}"
                    )
                }
                other => panic!("expected BackendUnavailable, got {other:?}"),
            }
        }
        Err(e) => panic!("unexpected error: {e}"),
    }
}
