//! Helpers the storage test binaries share: a temp dir, a backend per engine, and a
//! rig with one file and one DRAM buffer registered and the file imported.
#![allow(dead_code)] // each test binary uses a different part

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kv_backend_gds::{open_direct, EngineChoice, GdsBackend, Options};
use kv_core::{
    Backend, Descriptor, DescriptorList, EndpointId, MemKind, Op, PostOptions, RegistrationId,
    Status, TransferRequest,
};
use kv_mem::HostBuffer;

pub const WAIT: Duration = Duration::from_secs(60);

/// A directory under the system temp dir (a real disk here), removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "kv-gds-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn backend(engine: EngineChoice, opts: Options) -> Option<GdsBackend> {
    let o = Options { engine, ..opts };
    match engine {
        EngineChoice::ThreadPool => Some(GdsBackend::new("tester", o).unwrap()),
        _ => kv_core::require_or_skip("gds-uring", GdsBackend::new("tester", o)),
    }
}

pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    kv_core::conformance::pattern(seed, len)
}

/// A backend with one file and one DRAM buffer registered and the file imported
/// through a self-endpoint.
pub struct Rig {
    pub b: GdsBackend,
    pub file: Arc<File>,
    pub _dir: TempDir,
    pub buf: HostBuffer,
    pub mreg: RegistrationId,
    pub freg: RegistrationId,
    pub fdesc: Descriptor,
    pub me: EndpointId,
}

impl Rig {
    pub fn new(b: GdsBackend, file_len: u64, reg_len: u64, buf_len: usize) -> Rig {
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

    pub fn with_file(
        b: GdsBackend,
        file: Arc<File>,
        dir: TempDir,
        reg_len: u64,
        buf_len: usize,
    ) -> Rig {
        let buf = HostBuffer::alloc(buf_len, 4096).unwrap();
        // SAFETY: the buffer and the file live in the rig, which deregisters on drop.
        let Attached {
            mreg,
            freg,
            fdesc,
            me,
        } = unsafe { attach(&b, &buf, &file, reg_len) };
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

    pub fn fd(&self) -> u32 {
        self.fdesc.device
    }

    pub fn addr(&self, off: u64) -> u64 {
        self.buf.descriptor().addr + off
    }

    pub fn request(
        &self,
        op: Op,
        local: DescriptorList,
        remote: DescriptorList,
    ) -> TransferRequest {
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
    pub fn run(&self, op: Op, local: DescriptorList, remote: DescriptorList) -> Status {
        let t = self.b.prepare(&self.request(op, local, remote)).unwrap();
        // SAFETY: the buffer outlives the wait below.
        unsafe { self.b.post(t, &PostOptions::default()).unwrap() };
        let st = self.b.wait(t, WAIT);
        assert!(st.is_finished(), "transfer did not finish in {WAIT:?}");
        self.b.release(t).unwrap();
        st
    }

    pub fn one(&self, op: Op, mem_off: u64, file_off: u64, len: u64) -> Status {
        self.run(
            op,
            DescriptorList::single(Descriptor::new(self.addr(mem_off), len, 0)).unwrap(),
            DescriptorList::single(Descriptor::new(file_off, len, self.fd())).unwrap(),
        )
    }

    pub fn read_file(&self, off: u64, len: usize) -> Vec<u8> {
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

/// What [`attach`] set up.
pub struct Attached {
    pub mreg: RegistrationId,
    pub freg: RegistrationId,
    /// The file's first `reg_len` bytes, as registered and imported.
    pub fdesc: Descriptor,
    /// The self-endpoint the file is imported through.
    pub me: EndpointId,
}

/// Registers `buf` and the first `reg_len` bytes of `file` on `b` and imports the file
/// through a self-endpoint.
///
/// # Safety
///
/// `buf` and `file` must outlive the registrations.
pub unsafe fn attach(b: &GdsBackend, buf: &HostBuffer, file: &File, reg_len: u64) -> Attached {
    let fdesc = Descriptor::new(0, reg_len, file.as_raw_fd() as u32);
    // SAFETY: the caller keeps both alive.
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
    Attached {
        mreg,
        freg,
        fdesc,
        me,
    }
}

/// One test per engine: `per_engine!(f, g)` makes `uring::f`, `thread_pool::f`, … that
/// call `f(EngineChoice::…)`.
#[macro_export]
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

pub fn assert_done(st: &Status, what: &str) {
    assert!(matches!(st, Status::Done), "{what}: {st:?}");
}
