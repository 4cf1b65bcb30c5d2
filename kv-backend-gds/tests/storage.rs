//! Conformance-style storage tests: DRAM ↔ file in both directions on both engines,
//! sizes from 4 KiB to 64 MiB, a 10 000-entry scattered list, and the error paths.
//!
//! Every io_uring test creates its backend through `require_or_skip("gds-uring", …)`:
//! it skips with a reason where io_uring is unavailable, and fails instead when CI sets
//! `KV_REQUIRE_BACKENDS=gds-uring`.

#[macro_use]
mod common;

use std::fs::File;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use common::{assert_done, backend, pattern, Rig, TempDir, WAIT};
use kv_backend_gds::{open_direct, EngineChoice, EngineKind, GdsBackend, Options};
use kv_core::{Backend, Descriptor, DescriptorList, Error, MemKind, Op, PostOptions, Status};

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

/// Remote keys carry 128 random bits from the OS (issue 14): they are not derived from
/// the instance and registration ids (which connection info and the key itself reveal),
/// registrations and backends get unrelated keys, and forged keys are refused.
#[test]
fn remote_keys_are_random_and_forgeries_refused() {
    let new = || backend(EngineChoice::ThreadPool, Options::default()).unwrap();
    let (a, b) = (new(), new());
    let rig = Rig::new(a, 0, 1 << 20, 4096);
    // Registrations of the same file, on this backend and on another one.
    let mut keys = Vec::new();
    let mut regs = Vec::new();
    for be in [&rig.b, &b] {
        for _ in 0..32 {
            // SAFETY: a file range; the file lives in the rig.
            let r = unsafe {
                be.register(MemKind::File, &rig.fdesc, kv_core::Access::ReadWrite)
                    .unwrap()
            };
            keys.push(be.remote_key(r).unwrap().to_vec());
            regs.push(r);
        }
    }
    assert!(
        keys.iter().all(|k| k.len() >= 8 + 16),
        "{} bytes",
        keys[0].len()
    );
    // Unrelated: every secret differs, and each of their bits is set in about half of
    // them (8..=56 of 64 fails by chance with probability below 1e-7).
    let secrets: Vec<&[u8]> = keys.iter().map(|k| &k[8..]).collect();
    for (i, s) in secrets.iter().enumerate() {
        assert!(!secrets[..i].contains(s), "secret {i} repeats");
    }
    for bit in 0..secrets[0].len() * 8 {
        let set = secrets
            .iter()
            .filter(|s| s[bit / 8] & (1 << (bit % 8)) != 0)
            .count();
        assert!(
            (8..=56).contains(&set),
            "bit {bit} set in {set} of 64 secrets"
        );
    }
    let import = |key: &[u8]| rig.b.import_remote(rig.me, MemKind::File, &rig.fdesc, key);
    let own = rig.b.remote_key(rig.freg).unwrap().to_vec();
    assert!(import(&own).is_ok());
    // The old derivation from public ids (connection info's instance id, the key's
    // registration id, a time term of a few nanoseconds) must not open anything.
    let info = rig.b.connection_info().unwrap();
    let instance = u64::from_le_bytes(info[6..14].try_into().unwrap());
    let id = u64::from_le_bytes(own[..8].try_into().unwrap());
    let derived = (instance ^ id.wrapping_mul(0x9E37_79B9_7F4A_7C15)).rotate_left(17);
    for ns in 0..4096u64 {
        let mut forged = id.to_le_bytes().to_vec();
        forged.extend_from_slice(&(derived ^ ns).to_le_bytes());
        forged.resize(own.len(), 0);
        assert!(
            import(&forged).is_err(),
            "a key derived from public ids was accepted"
        );
    }
    // Random secrets, another registration's secret, another backend's key.
    for i in 0..256u64 {
        let mut forged = own.clone();
        let noise = kv_core::conformance::pattern(i, own.len() - 8);
        forged[8..].copy_from_slice(&noise);
        assert!(import(&forged).is_err(), "random secret {i} accepted");
    }
    let mut swapped = own.clone();
    swapped[8..].copy_from_slice(&keys[0][8..]);
    assert!(
        import(&swapped).is_err(),
        "another registration's secret accepted"
    );
    assert!(import(&keys[40]).is_err(), "another backend's key accepted");
    for (i, r) in regs.into_iter().enumerate() {
        let be = if i < 32 { &rig.b } else { &b };
        be.deregister(r).unwrap();
    }
}

/// Read-only registrations (contract v2, `Access::ReadOnly`): a read-only buffer is
/// written to a file but never filled by a READ, a read-only file range is read but never
/// written; each refusal is `AccessDenied` at prepare and moves nothing.
#[test]
fn read_only_registrations_are_never_written() {
    let Some(b) = backend(EngineChoice::ThreadPool, Options::default()) else {
        return;
    };
    assert!(b.capabilities().read_only);
    let dir = TempDir::new("ro");
    let (file, _) = open_direct(dir.file("data"), true).unwrap();
    file.set_len(1 << 20).unwrap();
    let len = 64u64 << 10;
    let mut src = kv_mem::HostBuffer::alloc(len as usize, 4096).unwrap();
    src.as_mut_slice()
        .copy_from_slice(&pattern(7, len as usize));
    let mut dst = kv_mem::HostBuffer::alloc(len as usize, 4096).unwrap();
    dst.as_mut_slice().fill(0xEE);
    let fd = std::os::fd::AsRawFd::as_raw_fd(&file) as u32;
    let ro = kv_core::Access::ReadOnly;
    let rw = kv_core::Access::ReadWrite;
    // SAFETY: the buffers and the file outlive the registrations (deregistered below).
    let (msrc, mdst, fro, frw) = unsafe {
        (
            b.register(MemKind::Dram, &src.descriptor(), ro).unwrap(),
            b.register(MemKind::Dram, &dst.descriptor(), ro).unwrap(),
            b.register(MemKind::File, &Descriptor::new(0, len, fd), ro)
                .unwrap(),
            b.register(MemKind::File, &Descriptor::new(len, len, fd), rw)
                .unwrap(),
        )
    };
    let me = b.connect("tester", &b.connection_info().unwrap()).unwrap();
    for (reg, off) in [(fro, 0), (frw, len)] {
        let key = b.remote_key(reg).unwrap();
        b.import_remote(me, MemKind::File, &Descriptor::new(off, len, fd), &key)
            .unwrap();
    }
    let req = |op, mem: &kv_mem::HostBuffer, off| kv_core::TransferRequest {
        op,
        local_kind: MemKind::Dram,
        local: DescriptorList::single(mem.descriptor()).unwrap(),
        peer: me,
        remote_kind: MemKind::File,
        remote: DescriptorList::single(Descriptor::new(off, len, fd)).unwrap(),
    };
    let run = |r: &kv_core::TransferRequest| {
        let t = b.prepare(r)?;
        // SAFETY: the buffers outlive the wait.
        unsafe { b.post(t, &PostOptions::default())? };
        let st = b.wait(t, WAIT);
        b.release(t)?;
        match st {
            Status::Done => Ok(()),
            other => panic!("transfer ended {other:?}"),
        }
    };
    // A read-only buffer is a WRITE's source: allowed, into the writable file range.
    run(&req(Op::Write, &src, len)).unwrap();
    // The read-only file range is never written, whatever the source.
    let e = run(&req(Op::Write, &src, 0)).unwrap_err();
    assert!(matches!(e, Error::AccessDenied(_)), "{e}");
    // A read-only buffer is never a READ's destination.
    let e = run(&req(Op::Read, &dst, len)).unwrap_err();
    assert!(matches!(e, Error::AccessDenied(_)), "{e}");
    assert!(
        dst.as_slice().iter().all(|&x| x == 0xEE),
        "read-only memory changed"
    );
    // The file holds what the allowed WRITE put there, and nothing at the read-only range.
    // A buffered reader of the file (the backend's handle may be O_DIRECT).
    let on_disk = std::fs::read(dir.file("data")).unwrap();
    assert!(
        on_disk[..len as usize].iter().all(|&x| x == 0),
        "read-only file range written"
    );
    assert_eq!(
        &on_disk[len as usize..2 * len as usize],
        &pattern(7, len as usize)[..]
    );
    for r in [msrc, mdst, fro, frw] {
        b.deregister(r).unwrap();
    }
}
