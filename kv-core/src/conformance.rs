//! The public test suite every backend runs.
//!
//! A backend proves itself by handing the suite a [`Harness`] that creates two fresh
//! backends (and memory each can register) and calling [`run_all`] — or, for one test
//! per case, the [`conformance_tests!`](crate::conformance_tests) macro:
//!
//! ```
//! # #[cfg(feature = "conformance")] {
//! use kv_core::conformance::{self, LoopbackHarness};
//! conformance::run_all(&LoopbackHarness).unwrap();
//! # }
//! ```
//!
//! Every case moves data with a deterministic pattern and checks it byte for byte,
//! including that bytes outside the target ranges were not touched.
//!
//! The suite calls the backends' `unsafe` methods, keeping their contracts (memory is
//! deregistered before it is freed; transfers finish before their memory goes).
#![allow(unsafe_code)]

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::backend::*;
use crate::desc::{Descriptor, DescriptorList, MemKind};
use crate::error::{Error, Result};
use crate::loopback::{LoopbackBackend, LoopbackFabric};

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
    /// Two new, independent backends that can reach each other.
    fn pair(&self) -> Result<(Side, Side)>;

    /// How long any single wait may take before the case fails.
    fn deadline(&self) -> Duration {
        Duration::from_secs(20)
    }
}

/// The harness for the in-process [`LoopbackBackend`].
#[derive(Debug, Clone, Copy, Default)]
pub struct LoopbackHarness;

struct LoopbackMemory {
    backend: Weak<LoopbackBackend>,
    desc: Descriptor,
}

impl LoopbackMemory {
    fn backend(&self) -> Result<Arc<LoopbackBackend>> {
        self.backend
            .upgrade()
            .ok_or_else(|| Error::NotRegistered("loopback backend dropped".into()))
    }
}

impl TestMemory for LoopbackMemory {
    fn desc(&self) -> Descriptor {
        self.desc
    }
    fn write(&mut self, offset: usize, data: &[u8]) -> Result<()> {
        self.backend()?
            .write_mem(self.desc.addr + offset as u64, data)
    }
    fn read(&self, offset: usize, len: usize) -> Result<Vec<u8>> {
        self.backend()?
            .read_mem(self.desc.addr + offset as u64, len)
    }
}

impl Drop for LoopbackMemory {
    fn drop(&mut self) {
        if let Some(b) = self.backend.upgrade() {
            let _ = b.free(&self.desc);
        }
    }
}

struct LoopbackFactory(Weak<LoopbackBackend>);

impl MemoryFactory for LoopbackFactory {
    fn alloc(&self, len: usize) -> Result<Box<dyn TestMemory>> {
        let b = self
            .0
            .upgrade()
            .ok_or_else(|| Error::NotRegistered("loopback backend dropped".into()))?;
        Ok(Box::new(LoopbackMemory {
            desc: b.alloc(len),
            backend: self.0.clone(),
        }))
    }
}

impl Harness for LoopbackHarness {
    fn pair(&self) -> Result<(Side, Side)> {
        let fabric = LoopbackFabric::new();
        let side = |name: &str| {
            let b = Arc::new(fabric.backend(&BackendInit::new(name)));
            Side {
                name: name.into(),
                memory: Arc::new(LoopbackFactory(Arc::downgrade(&b))),
                backend: b,
            }
        };
        Ok((side("a"), side("b")))
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

/// Everything a case needs once a pair is connected.
struct Conn {
    a: Side,
    b: Side,
    peer: EndpointId,
    deadline: Duration,
}

struct Mem {
    mem: Box<dyn TestMemory>,
    reg: RegistrationId,
    /// The side that registered it (`a` or `b`): ids are only unique per backend.
    on_b: bool,
}

impl Conn {
    fn new(h: &dyn Harness) -> Result<Conn> {
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

    fn mem(side: &Side, len: usize, seed: u64) -> Result<Mem> {
        let mut mem = side.memory.alloc(len)?;
        mem.write(0, &pattern(seed, len))?;
        // SAFETY: the memory lives in `Mem` and every case deregisters (or drops the
        // backend) before dropping it.
        let reg = unsafe {
            side.backend
                .register(MemKind::Dram, &mem.desc(), Access::ReadWrite)?
        };
        Ok(Mem {
            mem,
            reg,
            on_b: false,
        })
    }

    fn local(&self, len: usize, seed: u64) -> Result<Mem> {
        Self::mem(&self.a, len, seed)
    }

    /// Registers memory on `b` and imports it on `a`.
    fn remote(&self, len: usize, seed: u64) -> Result<(Mem, RemoteId)> {
        let mut m = Self::mem(&self.b, len, seed)?;
        m.on_b = true;
        let key = self.b.backend.remote_key(m.reg)?;
        let rid = self
            .a
            .backend
            .import_remote(self.peer, MemKind::Dram, &m.mem.desc(), &key)?;
        Ok((m, rid))
    }

    fn request(&self, op: Op, local: DescriptorList, remote: DescriptorList) -> TransferRequest {
        TransferRequest {
            op,
            local_kind: MemKind::Dram,
            local,
            peer: self.peer,
            remote_kind: MemKind::Dram,
            remote,
        }
    }

    fn run(&self, req: &TransferRequest, notification: Option<Bytes>) -> Result<()> {
        let id = self.a.backend.prepare(req)?;
        let opts = PostOptions {
            notification,
            deadline: Some(Instant::now() + self.deadline),
        };
        // SAFETY: every case keeps its memory registered until the transfer finished.
        unsafe { self.a.backend.post(id, &opts)? };
        let st = wait(&*self.a.backend, Some(&*self.b.backend), id, self.deadline);
        self.a.backend.release(id)?;
        match st {
            Status::Done => Ok(()),
            Status::Failed(e) => Err(e),
            s => Err(Error::invalid_argument(format!("unexpected status {s:?}"))),
        }
    }

    fn drain_b(&self, want: usize) -> Result<Vec<Notification>> {
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

    fn finish(self, mems: Vec<Mem>) -> Result<()> {
        for m in &mems {
            let side = if m.on_b { &self.b } else { &self.a };
            side.backend.deregister(m.reg)?;
        }
        Ok(())
    }
}

fn check(cond: bool, what: impl FnOnce() -> String) -> Result<()> {
    if cond {
        Ok(())
    } else {
        Err(Error::Corrupt(what()))
    }
}

fn check_eq(got: &[u8], want: &[u8], what: &str) -> Result<()> {
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

/// Register, export a key, deregister; a second deregister is `NotRegistered`.
pub fn register_deregister(h: &dyn Harness) -> Result<()> {
    let (a, _b) = h.pair()?;
    let m = Conn::mem(&a, 4096, 1)?;
    let key = a.backend.remote_key(m.reg)?;
    check(!key.is_empty() || a.backend.capabilities().local, || {
        "empty remote key".into()
    })?;
    a.backend.deregister(m.reg)?;
    check(
        matches!(a.backend.deregister(m.reg), Err(Error::NotRegistered(_))),
        || "second deregister did not fail with NotRegistered".into(),
    )?;
    check(a.backend.remote_key(m.reg).is_err(), || {
        "remote_key of a deregistered region succeeded".into()
    })
}

/// Connection info and remote keys cross to the peer; garbage info is refused.
pub fn export_import(h: &dyn Harness) -> Result<()> {
    let c = Conn::new(h)?;
    let (m, rid) = c.remote(4096, 2)?;
    c.a.backend.release_remote(rid)?;
    check(c.a.backend.release_remote(rid).is_err(), || {
        "double release_remote succeeded".into()
    })?;
    check(c.a.backend.connect("garbage", &[0xff; 3]).is_err(), || {
        "connect with 3 bytes of garbage succeeded".into()
    })?;
    c.finish(vec![m])
}

fn one_transfer(h: &dyn Harness, op: Op, len: usize) -> Result<()> {
    let c = Conn::new(h)?;
    // Pad both buffers so writes outside the range would be seen.
    let pad = 64;
    let l = c.local(len + 2 * pad, 10 + len as u64)?;
    let (r, _) = c.remote(len + 2 * pad, 20 + len as u64)?;
    let ld = Descriptor::new(l.mem.desc().addr + pad as u64, len as u64, 0);
    let rd = Descriptor::new(r.mem.desc().addr + pad as u64, len as u64, 0);
    c.run(
        &c.request(op, DescriptorList::single(ld)?, DescriptorList::single(rd)?),
        None,
    )?;
    let (src, dst) = match op {
        Op::Write => (&l, &r),
        Op::Read => (&r, &l),
    };
    let before = pattern(
        if op == Op::Write { 20 } else { 10 } + len as u64,
        len + 2 * pad,
    );
    let mut want = before.clone();
    want[pad..pad + len].copy_from_slice(&src.mem.read(pad, len)?);
    check_eq(
        &dst.mem.read(0, len + 2 * pad)?,
        &want,
        &format!("{op} of {len} bytes"),
    )?;
    c.finish(vec![l, r])
}

/// WRITE of 1 B, 4 KiB, 1 MiB and 16 MiB, byte-exact, nothing outside touched.
pub fn write_sizes(h: &dyn Harness) -> Result<()> {
    for len in [1, 4096, 1 << 20, 16 << 20] {
        one_transfer(h, Op::Write, len)?;
    }
    Ok(())
}

/// READ of 1 B, 4 KiB, 1 MiB and 16 MiB, byte-exact, nothing outside touched.
pub fn read_sizes(h: &dyn Harness) -> Result<()> {
    for len in [1, 4096, 1 << 20, 16 << 20] {
        one_transfer(h, Op::Read, len)?;
    }
    Ok(())
}

/// Builds `n` scattered descriptors of varied length inside a buffer at `base`, placed
/// in the order given by `reverse`; returns the list, the offsets and the buffer size.
/// A scattered list, the (offset, length) of each descriptor, and the buffer size.
type Scatter = (DescriptorList, Vec<(usize, usize)>, usize);

fn scatter(base: u64, n: usize, reverse: bool) -> Result<Scatter> {
    let lens: Vec<usize> = (0..n).map(|i| 16 + (i * 7919 % 241)).collect();
    let mut offs = vec![0usize; n];
    let mut pos = 0usize;
    let order: Vec<usize> = if reverse {
        (0..n).rev().collect()
    } else {
        (0..n).collect()
    };
    for i in order {
        pos += 8 + i % 5; // gaps, so neighbours are never merged
        offs[i] = pos;
        pos += lens[i];
    }
    let list = (0..n)
        .map(|i| Descriptor::new(base + offs[i] as u64, lens[i] as u64, 0))
        .collect::<Result<_>>()?;
    Ok((list, offs.into_iter().zip(lens).collect(), pos + 64))
}

fn scattered(h: &dyn Harness, op: Op) -> Result<()> {
    const N: usize = 10_000;
    let c = Conn::new(h)?;
    let (_, _, lsize) = scatter(0, N, false)?;
    let (_, _, rsize) = scatter(0, N, true)?;
    let l = c.local(lsize, 31)?;
    let (r, _) = c.remote(rsize, 32)?;
    let (ll, loffs, _) = scatter(l.mem.desc().addr, N, false)?;
    let (rl, roffs, _) = scatter(r.mem.desc().addr, N, true)?;
    check(ll.len() == N as u64 && rl.len() == N as u64, || {
        "scatter lists lost entries".into()
    })?;
    c.run(&c.request(op, ll, rl), None)?;
    let (lbuf, rbuf) = (pattern(31, lsize), pattern(32, rsize));
    let (src, src_offs, mut want, dst, dst_offs) = match op {
        Op::Write => (lbuf, &loffs, rbuf, &r, &roffs),
        Op::Read => (rbuf, &roffs, lbuf, &l, &loffs),
    };
    for ((so, n), (d, _)) in src_offs.iter().zip(dst_offs) {
        want[*d..*d + *n].copy_from_slice(&src[*so..*so + *n]);
    }
    check_eq(
        &dst.mem.read(0, want.len())?,
        &want,
        &format!("scattered {op} of {N} descriptors"),
    )?;
    c.finish(vec![l, r])
}

/// WRITE of a 10 000-descriptor scattered list onto a differently scattered list.
pub fn scattered_write(h: &dyn Harness) -> Result<()> {
    scattered(h, Op::Write)
}

/// READ of a 10 000-descriptor scattered list from a differently scattered list.
pub fn scattered_read(h: &dyn Harness) -> Result<()> {
    scattered(h, Op::Read)
}

/// Notifications arrive exactly once, with their payload, after the data they follow.
pub fn notifications(h: &dyn Harness) -> Result<()> {
    let c = Conn::new(h)?;
    let l = c.local(8192, 41)?;
    let (r, _) = c.remote(8192, 42)?;
    let req = c.request(
        Op::Write,
        DescriptorList::single(l.mem.desc())?,
        DescriptorList::single(r.mem.desc())?,
    );
    c.run(&req, Some(Bytes::from_static(b"layer-0 done")))?;
    // The data must be there once the notification is.
    let got = c.drain_b(1)?;
    check(got.len() == 1, || {
        format!("{} notifications, want 1", got.len())
    })?;
    check(
        got[0].payload == Bytes::from_static(b"layer-0 done") && got[0].peer == c.a.name,
        || format!("notification {:?}", got[0]),
    )?;
    check_eq(
        &r.mem.read(0, 8192)?,
        &pattern(41, 8192),
        "data before notification",
    )?;
    // Notifications alone keep their order; a big payload survives.
    let big = Bytes::from(pattern(43, 60_000));
    for i in 0..5u8 {
        c.a.backend.notify(c.peer, Bytes::from(vec![i; 3]))?;
    }
    c.a.backend.notify(c.peer, big.clone())?;
    let got = c.drain_b(6)?;
    check(got.len() == 6, || {
        format!("{} notifications, want 6", got.len())
    })?;
    for (i, n) in got.iter().take(5).enumerate() {
        check(n.payload[..] == [i as u8; 3], || {
            format!("notification {i} out of order: {:?}", n.payload)
        })?;
    }
    check(got[5].payload == big, || {
        "60 000-byte payload changed".into()
    })?;
    // Exactly once: nothing more arrives.
    std::thread::sleep(Duration::from_millis(20));
    let _ = c.a.backend.progress();
    let _ = c.b.backend.progress();
    let mut more = Vec::new();
    c.b.backend.drain_notifications(&mut more)?;
    check(more.is_empty(), || {
        format!("{} duplicate notifications", more.len())
    })?;
    c.finish(vec![l, r])
}

/// Remote ranges outside the peer's registration, local ranges outside every local
/// registration, and unequal lengths are refused at prepare, before anything moves.
pub fn bounds_refused(h: &dyn Harness) -> Result<()> {
    let c = Conn::new(h)?;
    let l = c.local(8192, 51)?;
    let (r, _) = c.remote(4096, 52)?;
    let (la, ra) = (l.mem.desc().addr, r.mem.desc().addr);
    let past_end = c.request(
        Op::Write,
        DescriptorList::single(Descriptor::new(la, 4097, 0))?,
        DescriptorList::single(Descriptor::new(ra, 4097, 0))?,
    );
    let e = c.a.backend.prepare(&past_end);
    check(matches!(e, Err(Error::OutOfBounds(_))), || {
        format!("remote range past the end gave {e:?}, want OutOfBounds")
    })?;
    let before = c.request(
        Op::Read,
        DescriptorList::single(Descriptor::new(la, 16, 0))?,
        DescriptorList::single(Descriptor::new(ra - 16, 16, 0))?,
    );
    check(c.a.backend.prepare(&before).is_err(), || {
        "remote range before the registration was accepted".into()
    })?;
    let unregistered_local = c.request(
        Op::Write,
        DescriptorList::single(Descriptor::new(la + 8192, 16, 0))?,
        DescriptorList::single(Descriptor::new(ra, 16, 0))?,
    );
    check(c.a.backend.prepare(&unregistered_local).is_err(), || {
        "unregistered local range was accepted".into()
    })?;
    let unequal = c.request(
        Op::Write,
        DescriptorList::single(Descriptor::new(la, 16, 0))?,
        DescriptorList::single(Descriptor::new(ra, 32, 0))?,
    );
    check(
        matches!(
            c.a.backend.prepare(&unequal),
            Err(Error::InvalidArgument(_))
        ),
        || "unequal lengths were accepted".into(),
    )?;
    check_eq(
        &r.mem.read(0, 4096)?,
        &pattern(52, 4096),
        "target after refusals",
    )?;
    c.finish(vec![l, r])
}

/// A prepared transfer posts many times; each post moves the current data.
pub fn repost(h: &dyn Harness) -> Result<()> {
    let c = Conn::new(h)?;
    let mut l = c.local(4096, 61)?;
    let (r, _) = c.remote(4096, 62)?;
    let id = c.a.backend.prepare(&c.request(
        Op::Write,
        DescriptorList::single(l.mem.desc())?,
        DescriptorList::single(r.mem.desc())?,
    ))?;
    for i in 0..100u64 {
        let data = pattern(1000 + i, 4096);
        l.mem.write(0, &data)?;
        let opts = PostOptions {
            notification: Some(Bytes::copy_from_slice(&i.to_le_bytes())),
            deadline: Some(Instant::now() + c.deadline),
        };
        // SAFETY: `l` stays registered until the transfer is released below.
        unsafe { c.a.backend.post(id, &opts)? };
        match wait(&*c.a.backend, Some(&*c.b.backend), id, c.deadline) {
            Status::Done => {}
            Status::Failed(e) => return Err(e),
            s => return Err(Error::invalid_argument(format!("status {s:?}"))),
        }
        check_eq(&r.mem.read(0, 4096)?, &data, &format!("repost {i}"))?;
    }
    let got = c.drain_b(100)?;
    check(got.len() == 100, || {
        format!("{} notifications for 100 posts", got.len())
    })?;
    for (i, n) in got.iter().enumerate() {
        check(n.payload[..] == (i as u64).to_le_bytes(), || {
            format!("repost notification {i} out of order")
        })?;
    }
    c.a.backend.release(id)?;
    c.finish(vec![l, r])
}

/// `cancel` returns with the transfer finished (cancelled or done) and its memory free
/// to deregister.
pub fn cancel(h: &dyn Harness) -> Result<()> {
    let c = Conn::new(h)?;
    let len = 16 << 20;
    let l = c.local(len, 71)?;
    let (r, _) = c.remote(len, 72)?;
    let id = c.a.backend.prepare(&c.request(
        Op::Write,
        DescriptorList::strided(l.mem.desc().addr, 4096, (len / 4096) as u64, 4096, 0)?,
        DescriptorList::single(r.mem.desc())?,
    ))?;
    // SAFETY: `l` stays registered until cancel returns.
    unsafe { c.a.backend.post(id, &PostOptions::default())? };
    c.a.backend.cancel(id)?;
    let st = c.a.backend.poll(id);
    check(
        matches!(st, Status::Done | Status::Failed(Error::Canceled)),
        || format!("after cancel the transfer is {st:?}"),
    )?;
    c.a.backend.release(id)?;
    // The memory is ours again: deregistering must succeed now.
    c.finish(vec![l, r])
}

/// A transfer to a peer whose backend was dropped ends with an error before its deadline.
pub fn dropped_peer(h: &dyn Harness) -> Result<()> {
    let Conn {
        a,
        b,
        peer,
        deadline,
    } = Conn::new(h)?;
    let l = Conn::mem(&a, 1 << 20, 81)?;
    let rm = Conn::mem(&b, 1 << 20, 82)?;
    let key = b.backend.remote_key(rm.reg)?;
    a.backend
        .import_remote(peer, MemKind::Dram, &rm.mem.desc(), &key)?;
    let rdesc = rm.mem.desc();
    let Side {
        backend, memory, ..
    } = b;
    // The peer dies: its backend goes first (it stops touching its memory), then the memory.
    drop(backend);
    drop(rm);
    drop(memory);
    let start = Instant::now();
    let id = a.backend.prepare(&TransferRequest {
        op: Op::Write,
        local_kind: MemKind::Dram,
        local: DescriptorList::single(l.mem.desc())?,
        peer,
        remote_kind: MemKind::Dram,
        remote: DescriptorList::single(rdesc)?,
    });
    // Some backends learn of the death at prepare; that is a bounded error too.
    let st = match id {
        Err(e) => Status::Failed(e),
        Ok(id) => {
            let opts = PostOptions {
                notification: None,
                deadline: Some(Instant::now() + deadline),
            };
            // SAFETY: `l` stays registered until the transfer finished.
            match unsafe { a.backend.post(id, &opts) } {
                Err(e) => Status::Failed(e),
                Ok(()) => wait(&*a.backend, None, id, deadline + Duration::from_secs(5)),
            }
        }
    };
    check(
        matches!(
            st,
            Status::Failed(Error::RemoteDisconnected { .. })
                | Status::Failed(Error::TimedOut { .. })
        ) && start.elapsed() <= deadline + Duration::from_secs(5),
        || {
            format!(
                "transfer to a dropped peer: {st:?} after {:?}",
                start.elapsed()
            )
        },
    )?;
    a.backend.deregister(l.reg)?;
    Ok(())
}

/// A prepared transfer whose local registration was deregistered is refused (at post,
/// or it fails) and moves nothing: the backend never reads memory it no longer owns.
pub fn post_after_deregister(h: &dyn Harness) -> Result<()> {
    let c = Conn::new(h)?;
    let l = c.local(4096, 91)?;
    let (r, _) = c.remote(4096, 92)?;
    let id = c.a.backend.prepare(&c.request(
        Op::Write,
        DescriptorList::single(l.mem.desc())?,
        DescriptorList::single(r.mem.desc())?,
    ))?;
    c.a.backend.deregister(l.reg)?;
    let opts = PostOptions {
        notification: None,
        deadline: Some(Instant::now() + c.deadline),
    };
    // SAFETY: the memory itself is still alive (`l` is held), only deregistered; a
    // conforming backend refuses to touch it.
    let st = match unsafe { c.a.backend.post(id, &opts) } {
        Err(e) => Status::Failed(e),
        Ok(()) => wait(&*c.a.backend, Some(&*c.b.backend), id, c.deadline),
    };
    check(matches!(st, Status::Failed(_)), || {
        format!("post after the local registration was deregistered gave {st:?}")
    })?;
    let _ = c.a.backend.release(id);
    check_eq(
        &r.mem.read(0, 4096)?,
        &pattern(92, 4096),
        "target after a refused post",
    )?;
    c.b.backend.deregister(r.reg)?;
    Ok(())
}

/// One conformance case.
pub type Case = fn(&dyn Harness) -> Result<()>;

/// Every case, by name.
pub const CASES: &[(&str, Case)] = &[
    ("register_deregister", register_deregister),
    ("export_import", export_import),
    ("write_sizes", write_sizes),
    ("read_sizes", read_sizes),
    ("scattered_write", scattered_write),
    ("scattered_read", scattered_read),
    ("notifications", notifications),
    ("bounds_refused", bounds_refused),
    ("repost", repost),
    ("cancel", cancel),
    ("dropped_peer", dropped_peer),
    ("post_after_deregister", post_after_deregister),
];

/// Runs every case; the first failure is returned with the case's name.
pub fn run_all(h: &dyn Harness) -> Result<()> {
    for (name, case) in CASES {
        case(h).map_err(|e| Error::Corrupt(format!("conformance case {name}: {e}")))?;
    }
    Ok(())
}

/// Expands to one `#[test]` per conformance case, each calling `$harness` (an
/// expression whose value implements [`Harness`]).
///
/// ```ignore
/// kv_core::conformance_tests!(MyHarness::default());
/// ```
#[macro_export]
macro_rules! conformance_tests {
    ($harness:expr) => {
        $crate::conformance_tests!(@case $harness; register_deregister, export_import,
            write_sizes, read_sizes, scattered_write, scattered_read, notifications,
            bounds_refused, repost, cancel, dropped_peer, post_after_deregister);
    };
    (@case $harness:expr; $($name:ident),*) => {
        $(
            #[test]
            fn $name() {
                let h = $harness;
                if let Err(e) = $crate::conformance::$name(&h) {
                    panic!("conformance case {} failed: {e}", stringify!($name));
                }
            }
        )*
    };
}
