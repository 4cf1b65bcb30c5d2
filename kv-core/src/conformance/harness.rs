//! What a backend hands the suite (a [`Harness`] of fresh pairs and [`TestMemory`]),
//! and the helpers every case shares.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::backend::*;
use crate::desc::{Descriptor, DescriptorList, MemKind};
use crate::error::{Error, Result};

/// Memory a test can register, fill and read back.
pub trait TestMemory: Send {
    /// The whole buffer as one descriptor.
    fn desc(&self) -> Descriptor;
    /// Copies `data` in at `offset`.
    fn write(&mut self, offset: usize, data: &[u8]) -> Result<()>;
    /// Copies `len` bytes out from `offset`.
    fn read(&self, offset: usize, len: usize) -> Result<Vec<u8>>;
}

/// Allocates [`TestMemory`] that one side's backend can register.
pub trait MemoryFactory: Send + Sync {
    /// `len` bytes of zeroed `MemKind::Dram` memory.
    fn alloc(&self, len: usize) -> Result<Box<dyn TestMemory>>;
}

/// One side of a pair: an agent name, its backend and its memory.
pub struct Side {
    /// The agent name the backend was created for (notifications carry it).
    pub name: String,
    /// The backend under test.
    pub backend: Arc<dyn Backend>,
    /// Memory it can register.
    pub memory: Arc<dyn MemoryFactory>,
}

/// Creates fresh pairs of backends for each case.
pub trait Harness {
    /// Two new, independent backends that can reach each other (for an authenticated
    /// backend: sharing one cluster secret).
    fn pair(&self) -> Result<(Side, Side)>;

    /// Two new backends created from the given contexts (names, secrets). The default
    /// ignores them and calls [`Harness::pair`]; a backend whose capabilities say
    /// `authenticated` must implement it, or `unauthenticated_peer_refused` fails.
    fn pair_with(&self, a: &BackendInit, b: &BackendInit) -> Result<(Side, Side)> {
        let _ = (a, b);
        self.pair()
    }

    /// How long any single wait may take before the case fails.
    fn deadline(&self) -> Duration {
        Duration::from_secs(20)
    }
}

/// A deterministic byte pattern (xorshift), different for each `seed`.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        let n = (len - v.len()).min(8);
        v.extend_from_slice(&b[..n]);
    }
    v
}

/// Drives both backends until `id` on `side` finishes or the deadline passes.
pub fn wait(
    side: &dyn Backend,
    other: Option<&dyn Backend>,
    id: TransferId,
    deadline: Duration,
) -> Status {
    let end = Instant::now() + deadline;
    let mut spins = 0u32;
    loop {
        let _ = side.progress();
        if let Some(o) = other {
            let _ = o.progress();
        }
        let st = side.poll(id);
        if st.is_finished() {
            return st;
        }
        if Instant::now() > end {
            return Status::Failed(Error::TimedOut {
                what: format!("conformance wait for {id}"),
                after: deadline,
            });
        }
        spins += 1;
        if spins > 64 {
            std::thread::sleep(Duration::from_micros(50));
        }
    }
}

/// A connected pair: `a` connected to `b` as `peer`.
pub(super) struct Conn {
    pub a: Side,
    pub b: Side,
    pub peer: EndpointId,
    pub deadline: Duration,
}

/// Registered test memory. Dropping it deregisters it from the backend that registered
/// it and frees it only when that backend no longer has it (`Ok` or `NotRegistered`);
/// otherwise (`Busy`: a transfer still names it) the memory is leaked, never freed under
/// a backend — so a case that fails half-way cannot cause a use-after-free.
pub(super) struct Mem {
    pub mem: std::mem::ManuallyDrop<Box<dyn TestMemory>>,
    pub reg: RegistrationId,
    /// The side that registered it (`a` or `b`): ids are only unique per backend.
    pub on_b: bool,
    /// The backend that registered it (kept alive until the memory is given back).
    owner: Arc<dyn Backend>,
}

impl Drop for Mem {
    #[allow(unsafe_code)]
    fn drop(&mut self) {
        match self.owner.deregister(self.reg) {
            Ok(()) | Err(Error::NotRegistered(_)) => {
                // SAFETY: dropped once, here; the backend no longer has the range.
                unsafe { std::mem::ManuallyDrop::drop(&mut self.mem) }
            }
            Err(_) => {} // still in use by the backend: leaked on purpose
        }
    }
}

impl Mem {
    /// `len` bytes at `offset` of this memory.
    pub fn at(&self, offset: u64, len: u64) -> Descriptor {
        Descriptor::new(self.mem.desc().addr + offset, len, 0)
    }
}

impl Conn {
    pub fn new(h: &dyn Harness) -> Result<Conn> {
        let (a, b) = h.pair()?;
        let info = b.backend.connection_info()?;
        let peer = a.backend.connect(&b.name, &info)?;
        Ok(Conn {
            a,
            b,
            peer,
            deadline: h.deadline(),
        })
    }

    /// Allocates `len` bytes of `pattern(seed)` on `side` and registers `desc(mem)`.
    pub fn mem_with(
        side: &Side,
        len: usize,
        seed: u64,
        access: Access,
        desc: impl FnOnce(Descriptor) -> Descriptor,
    ) -> Result<Mem> {
        let mut mem = side.memory.alloc(len)?;
        mem.write(0, &pattern(seed, len))?;
        // SAFETY: the memory lives in `Mem` and every case deregisters (or drops the
        // backend) before dropping it.
        let reg = unsafe {
            side.backend
                .register(MemKind::Dram, &desc(mem.desc()), access)?
        };
        Ok(Mem {
            mem: std::mem::ManuallyDrop::new(mem),
            reg,
            on_b: false,
            owner: side.backend.clone(),
        })
    }

    /// Registers `len` bytes of `pattern(seed)` on `side`, read-write.
    pub fn mem(side: &Side, len: usize, seed: u64) -> Result<Mem> {
        Self::mem_with(side, len, seed, Access::ReadWrite, |d| d)
    }

    pub fn local(&self, len: usize, seed: u64) -> Result<Mem> {
        Self::mem(&self.a, len, seed)
    }

    /// Registers memory on `b` and imports it on `a`.
    pub fn remote(&self, len: usize, seed: u64) -> Result<(Mem, RemoteId)> {
        let mut m = Self::mem(&self.b, len, seed)?;
        m.on_b = true;
        let rid = self.import(&m, m.mem.desc())?;
        Ok((m, rid))
    }

    /// Imports `desc` on `a` with the remote key of `m` (registered on `b`).
    pub fn import(&self, m: &Mem, desc: Descriptor) -> Result<RemoteId> {
        let key = self.b.backend.remote_key(m.reg)?;
        self.a
            .backend
            .import_remote(self.peer, MemKind::Dram, &desc, &key)
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
            peer: self.peer,
            remote_kind: MemKind::Dram,
            remote,
        }
    }

    /// A one-descriptor request each side.
    pub fn single(&self, op: Op, local: Descriptor, remote: Descriptor) -> Result<TransferRequest> {
        Ok(self.request(
            op,
            DescriptorList::single(local)?,
            DescriptorList::single(remote)?,
        ))
    }

    pub fn opts(&self, notification: Option<Bytes>) -> PostOptions {
        PostOptions {
            notification,
            deadline: Some(Instant::now() + self.deadline),
        }
    }

    /// Prepares and posts `req` (with the case's deadline).
    pub fn post(&self, req: &TransferRequest, notification: Option<Bytes>) -> Result<TransferId> {
        let id = self.a.backend.prepare(req)?;
        // SAFETY: every case keeps its memory registered until the transfer finished.
        if let Err(e) = unsafe { self.a.backend.post(id, &self.opts(notification)) } {
            let _ = self.a.backend.release(id);
            return Err(e);
        }
        Ok(id)
    }

    pub fn wait(&self, id: TransferId) -> Status {
        wait(&*self.a.backend, Some(&*self.b.backend), id, self.deadline)
    }

    /// Posts the prepared `id` with `opts` and waits; a refused post is the `Failed`.
    pub fn post_and_wait(&self, id: TransferId, opts: &PostOptions) -> Status {
        // SAFETY: every case keeps its local memory alive and registered until the
        // transfer finished (cases that deregister first rely on the refusal).
        match unsafe { self.a.backend.post(id, opts) } {
            Err(e) => Status::Failed(e),
            Ok(()) => self.wait(id),
        }
    }

    /// Prepares, posts and waits for `req`; releases it. Any refusal (at prepare, post
    /// or in the status) is the `Err`.
    pub fn run(&self, req: &TransferRequest, notification: Option<Bytes>) -> Result<()> {
        let id = self.post(req, notification)?;
        let st = self.wait(id);
        if st.is_finished() {
            self.a.backend.release(id)?;
        }
        match st {
            Status::Done => Ok(()),
            Status::Failed(e) => Err(e),
            s => Err(Error::invalid_argument(format!("unexpected status {s:?}"))),
        }
    }

    pub fn drain_b(&self, want: usize) -> Result<Vec<Notification>> {
        let end = Instant::now() + self.deadline;
        let mut out = Vec::new();
        while out.len() < want && Instant::now() < end {
            let _ = self.a.backend.progress();
            let _ = self.b.backend.progress();
            self.b.backend.drain_notifications(&mut out)?;
            if out.len() < want {
                std::thread::sleep(Duration::from_micros(100));
            }
        }
        Ok(out)
    }

    /// Drives both sides' progress for `d` without polling anything.
    pub fn drive(&self, d: Duration) {
        let end = Instant::now() + d;
        while Instant::now() < end {
            let _ = self.a.backend.progress();
            let _ = self.b.backend.progress();
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    pub fn finish(self, mems: Vec<Mem>) -> Result<()> {
        for m in &mems {
            let side = if m.on_b { &self.b } else { &self.a };
            side.backend.deregister(m.reg)?;
        }
        Ok(())
    }
}

/// `Ok` when `cond` holds, else the case fails with `what`.
pub(super) fn check(cond: bool, what: impl FnOnce() -> String) -> Result<()> {
    if cond {
        Ok(())
    } else {
        Err(Error::Corrupt(what()))
    }
}

/// `Ok` when `got == want`, else says how many bytes differ and where the first is.
pub(super) fn check_eq(got: &[u8], want: &[u8], what: &str) -> Result<()> {
    if got == want {
        return Ok(());
    }
    let first = got.iter().zip(want).position(|(a, b)| a != b);
    Err(Error::Corrupt(format!(
        "{what}: {} bytes differ from expected (lengths {} vs {}), first at {first:?}",
        got.iter().zip(want).filter(|(a, b)| a != b).count(),
        got.len(),
        want.len()
    )))
}
