//! The NVMe tier's I/O through kv-backend-gds: storage as a transfer to the store itself.
//!
//! With `Arena::read`/`Arena::write` (kv-mem's `unsafe` region copies), this is the only
//! place kv-tier lifts `deny(unsafe_code)`: for the two calls the `Backend` trait marks
//! `unsafe` (`register`, `post`); each says why it is sound.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use kv_backend_gds::GdsBackend;
use kv_core::{
    Backend, Descriptor, DescriptorList, EndpointId, Error, MemKind, Op, PostOptions,
    RegistrationId, RemoteId, Result, Status, TransferRequest,
};
use kv_mem::HostBuffer;

use crate::arena::Arena;

/// The gds backend with a self-endpoint and the DRAM arena registered. `Send + Sync`.
pub(crate) struct GdsIo {
    backend: GdsBackend,
    me: EndpointId,
    arena_reg: RegistrationId,
    /// Keeps the arena's memory alive for as long as it is registered, and quarantines
    /// the slots a transfer that could not be cancelled names.
    arena: Arc<Arena>,
    timeout: Duration,
}

/// A file registered with the backend and imported through the self-endpoint.
pub(crate) struct FileReg {
    io: Arc<GdsIo>,
    reg: RegistrationId,
    remote: RemoteId,
    fd: u32,
    /// Keeps the descriptor number valid while registered.
    _file: Arc<File>,
}

impl FileReg {
    /// The file range `offset..offset+len` as a remote descriptor.
    pub fn range(&self, offset: u64, len: u64) -> Descriptor {
        Descriptor::new(offset, len, self.fd)
    }
}

impl Drop for FileReg {
    fn drop(&mut self) {
        let _ = self.io.backend.release_remote(self.remote);
        if let Err(e) = self.io.backend.deregister(self.reg) {
            tracing::warn!("kv-tier: deregistering a segment file: {e}");
        }
    }
}

/// A private bounce buffer registered with the backend (segment cleaning).
pub(crate) struct Bounce {
    io: Arc<GdsIo>,
    reg: RegistrationId,
    /// Freed only once the backend let go of it (see `Drop`).
    pub buf: std::mem::ManuallyDrop<HostBuffer>,
}

impl Drop for Bounce {
    #[allow(unsafe_code)]
    fn drop(&mut self) {
        match self.io.backend.deregister(self.reg) {
            // SAFETY: `buf` is dropped exactly once, here, and never used after.
            Ok(()) => unsafe { std::mem::ManuallyDrop::drop(&mut self.buf) },
            // A transfer the kernel has not given back still names it (a cancel that
            // returned Busy): leak the buffer rather than unmap memory it may write.
            Err(e) => tracing::error!("kv-tier: a bounce buffer stays mapped (leaked): {e}"),
        }
    }
}

impl GdsIo {
    #[allow(unsafe_code)]
    pub fn new(
        opts: kv_backend_gds::Options,
        arena: Arc<Arena>,
        timeout: Duration,
    ) -> Result<GdsIo> {
        let backend = GdsBackend::new("kv-tier", opts)?;
        let me = backend.connect("kv-tier", &backend.connection_info()?)?;
        // SAFETY: `arena` (an `Arc`, so the memory cannot be freed) is held by this
        // struct, and `Drop` deregisters before the field is released.
        let arena_reg = unsafe {
            backend.register(
                MemKind::Dram,
                &arena.region().descriptor(),
                kv_core::Access::ReadWrite,
            )?
        };
        Ok(GdsIo {
            backend,
            me,
            arena_reg,
            arena,
            timeout,
        })
    }

    /// One line describing the engine (io_uring or thread pool).
    pub fn describe(&self) -> String {
        self.backend.describe()
    }

    /// Arena offset → DRAM descriptor.
    pub fn arena_range(&self, offset: u64, len: u64) -> Descriptor {
        Descriptor::new(self.arena.region().descriptor().addr + offset, len, 0)
    }

    /// Registers `len` bytes of `file` (from offset 0) and imports it for transfers.
    #[allow(unsafe_code)]
    pub fn register_file(self: &Arc<Self>, file: Arc<File>, len: u64) -> Result<FileReg> {
        let fd = u32::try_from(file.as_raw_fd())
            .map_err(|_| Error::invalid_argument("negative file descriptor"))?;
        let d = Descriptor::new(0, len, fd);
        // SAFETY: a File registration names a descriptor, not memory; the backend dups
        // the fd, and `file` is kept open by the returned FileReg anyway.
        let reg = unsafe {
            self.backend
                .register(MemKind::File, &d, kv_core::Access::ReadWrite)?
        };
        let key = self.backend.remote_key(reg)?;
        let remote = match self.backend.import_remote(self.me, MemKind::File, &d, &key) {
            Ok(r) => r,
            Err(e) => {
                let _ = self.backend.deregister(reg);
                return Err(e);
            }
        };
        Ok(FileReg {
            io: self.clone(),
            reg,
            remote,
            fd,
            _file: file,
        })
    }

    /// A zeroed, 4 KiB-aligned buffer of `len` bytes registered for transfers.
    #[allow(unsafe_code)]
    pub fn bounce(self: &Arc<Self>, len: usize) -> Result<Bounce> {
        // A private mapping, so the memory goes back to the system when dropped.
        let buf = HostBuffer::mmap(len.max(4096))?;
        // SAFETY: the buffer is owned by the returned Bounce, whose Drop deregisters it
        // before the buffer field is dropped (fields drop after `drop` runs).
        let reg = unsafe {
            self.backend
                .register(MemKind::Dram, &buf.descriptor(), kv_core::Access::ReadWrite)?
        };
        Ok(Bounce {
            io: self.clone(),
            reg,
            buf: std::mem::ManuallyDrop::new(buf),
        })
    }

    /// Moves every `(memory, file)` pair (`Op::Write`: memory → file; `Op::Read`: file →
    /// memory) and waits for the end.
    ///
    /// The memory ranges must lie in the arena or in a [`Bounce`] the caller holds
    /// across the call.
    #[allow(unsafe_code)]
    pub fn transfer(&self, op: Op, pairs: &[(Descriptor, Descriptor)]) -> Result<()> {
        if pairs.is_empty() {
            return Ok(());
        }
        let mut local = DescriptorList::new();
        let mut remote = DescriptorList::new();
        for (l, r) in pairs {
            local.push(*l)?;
            remote.push(*r)?;
        }
        let t = self.backend.prepare(&TransferRequest {
            op,
            local_kind: MemKind::Dram,
            local,
            peer: self.me,
            remote_kind: MemKind::File,
            remote,
        })?;
        // SAFETY: the local ranges are in the arena (registered and kept alive by
        // `self.arena`) or in a registered bounce buffer that the caller holds for the
        // duration of this call; we do not return before the transfer finished or
        // `cancel` returned, so nothing is freed while the backend may touch it.
        let posted = unsafe { self.backend.post(t, &PostOptions::default()) };
        let result = match posted {
            Err(e) => Err(e),
            Ok(()) => match self.backend.wait(t, self.timeout) {
                Status::Done => Ok(()),
                Status::Failed(e) => Err(e),
                _ => {
                    let timed_out = Error::TimedOut {
                        what: format!("kv-tier {op} of {} block(s)", pairs.len()),
                        after: self.timeout,
                    };
                    if let Err(e) = self.backend.cancel(t) {
                        // The kernel still holds the transfer: it is neither released
                        // nor its registrations freed (their deregistration fails Busy,
                        // so a bounce buffer or the arena is leaked, never unmapped),
                        // and the arena slots it names are never handed out again.
                        tracing::error!("kv-tier: {timed_out}; cancel failed ({e}), the transfer stays registered");
                        self.quarantine(pairs);
                        return Err(timed_out);
                    }
                    Err(timed_out)
                }
            },
        };
        let _ = self.backend.release(t);
        result
    }

    /// Quarantines the arena ranges among `pairs`' memory sides (a bounce buffer's are
    /// kept by its failing deregistration instead).
    fn quarantine(&self, pairs: &[(Descriptor, Descriptor)]) {
        let base = self.arena.region().descriptor().addr;
        for (l, _) in pairs {
            if let Some(off) = l
                .addr
                .checked_sub(base)
                .filter(|o| *o < self.arena.capacity())
            {
                self.arena.quarantine(off, l.len);
            }
        }
    }
}

impl Drop for GdsIo {
    fn drop(&mut self) {
        if let Err(e) = self.backend.deregister(self.arena_reg) {
            // The backend may still write into it: keep the arena mapped for good.
            tracing::error!("kv-tier: the arena stays mapped (leaked): {e}");
            std::mem::forget(self.arena.clone());
        }
    }
}
