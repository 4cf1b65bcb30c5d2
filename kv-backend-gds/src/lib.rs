//! The storage backend of kvx: it moves KV blocks between registered memory and files
//! (or block devices), the NVMe tier of `kv-tier` and the role of NIXL's GDS/POSIX plugins.
//!
//! As in NIXL, storage is a transfer to the agent itself: memory (DRAM, or VRAM with the
//! `cuda` feature) is the local side, `MemKind::File`/`Block` registrations of the same
//! backend imported through a self-endpoint are the "remote" side; `Op::Write` is memory →
//! file and `Op::Read` is file → memory. I/O runs on io_uring (registered buffers and
//! files, `O_DIRECT` with alignment checked at `prepare`, whole descriptor lists submitted
//! in batches); where io_uring is missing it runs on a `pread`/`pwrite` thread pool
//! ([`GdsBackend::engine`] says which).
//!
//! ```
//! use std::os::fd::AsRawFd;
//! use kv_core::{Backend, DescriptorList, MemKind, Op, PostOptions, TransferRequest};
//!
//! let path = std::env::temp_dir().join(format!("kv-gds-doc-{}", std::process::id()));
//! let (file, _direct) = kv_backend_gds::open_direct(&path, true)?;
//! file.set_len(1 << 20).map_err(|e| kv_core::Error::io("set_len", e))?;
//! let gds = kv_backend_gds::GdsBackend::new("agent-0", kv_backend_gds::Options::default())?;
//! let mut buf = kv_mem::HostBuffer::alloc(1 << 20, 4096)?;
//! buf.as_mut_slice().fill(7);
//! let fdesc = kv_core::Descriptor::new(0, 1 << 20, file.as_raw_fd() as u32);
//! // SAFETY: `buf` and `file` outlive the registrations (deregistered at the end).
//! let (mreg, freg) = unsafe { (gds.register(MemKind::Dram, &buf.descriptor())?, gds.register(MemKind::File, &fdesc)?) };
//! let me = gds.connect("agent-0", &gds.connection_info()?)?;
//! gds.import_remote(me, MemKind::File, &fdesc, &gds.remote_key(freg)?)?;
//! let t = gds.prepare(&TransferRequest { op: Op::Write, local_kind: MemKind::Dram,
//!     local: DescriptorList::single(buf.descriptor()), peer: me, remote_kind: MemKind::File,
//!     remote: DescriptorList::single(fdesc) })?;
//! unsafe { gds.post(t, &PostOptions::default())? };
//! assert!(matches!(gds.wait(t, std::time::Duration::from_secs(10)), kv_core::Status::Done));
//! gds.release(t)?; gds.deregister(mreg)?; gds.deregister(freg)?;
//! # std::fs::remove_file(&path).ok();
//! # Ok::<(), kv_core::Error>(())
//! ```
#![warn(missing_docs)]

mod engine;
mod file;
mod memory;
mod pool;
mod request;
mod uring;

#[cfg(feature = "cuda")]
mod cufile;

use std::collections::{HashMap, VecDeque};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kv_core::{
    check_request_shape, segments, Backend, Capabilities, Descriptor, EndpointId, Error, MemKind,
    MemKinds, Notification, Op, Params, PostOptions, RegistrationId, RemoteId, Result, Status,
    TransferId, TransferRequest,
};
use parking_lot::Mutex;

use crate::engine::{Engine, IoDone, IoFail, IoReq};
use crate::memory::{Reg, RegMem, RemoteImport};
use crate::pool::PoolEngine;
use crate::request::{Bounce, Failure, IoOp, Run, Stop, Transfer};
use crate::uring::UringEngine;

pub use crate::file::{is_direct, open_direct};

/// Which I/O engine to use. `Copy`, `Send + Sync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EngineChoice {
    /// io_uring, or the thread pool (with a logged reason) when io_uring is unavailable.
    #[default]
    Auto,
    /// io_uring only: creating the backend fails when io_uring is unavailable.
    Uring,
    /// The `pread`/`pwrite` thread pool, even where io_uring works.
    ThreadPool,
}

/// The engine a backend ended up with. `Copy`, `Send + Sync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    /// io_uring.
    Uring,
    /// Worker threads doing `pread`/`pwrite`.
    ThreadPool,
}

/// Options of the gds backend; [`Options::from_params`] reads them from agent params.
/// `Clone`, `Send + Sync`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Engine choice (param `engine`: `auto`, `uring`, `threads`).
    pub engine: EngineChoice,
    /// Requests in flight at most (param `queue_depth`); the ring's size.
    pub queue_depth: usize,
    /// Pieces larger than this are split (param `max_io_size`, bytes).
    pub max_io_size: u64,
    /// io_uring: queued requests are handed to the kernel as soon as this many wait in
    /// the submission queue (param `submit_batch`, default 4; clamped to
    /// `1..=queue_depth`), so a refill reaches the device while the rest is still being
    /// built. Submitting a whole queue's refill in one call (`submit_batch` =
    /// `queue_depth`) cost about 20 % of 4 KiB random-read throughput on a virtio disk;
    /// 1 (fio's default `iodepth_batch_submit=1`) to 4 measured alike (README).
    pub submit_batch: usize,
    /// Let unaligned pieces on `O_DIRECT` files go through aligned bounce buffers
    /// instead of failing `prepare` (param `bounce`).
    pub bounce: bool,
    /// Worker threads of the thread-pool engine (param `threads`).
    pub threads: usize,
    /// Register DRAM with `IORING_REGISTER_BUFFERS` (param `register_buffers`).
    pub register_buffers: bool,
    /// Register files with the ring (param `register_files`).
    pub register_files: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            engine: EngineChoice::Auto,
            queue_depth: 64,
            max_io_size: 1 << 20,
            submit_batch: 4,
            bounce: false,
            threads: 8,
            register_buffers: true,
            register_files: true,
        }
    }
}

impl Options {
    /// Reads the options from `params` (keys as documented on each field); unknown keys
    /// and unparsable values are [`Error::InvalidArgument`].
    pub fn from_params(params: &Params) -> Result<Options> {
        let mut o = Options::default();
        fn num<T: std::str::FromStr>(k: &str, v: &str) -> Result<T> {
            v.parse().map_err(|_| {
                Error::invalid_argument(format!("gds param {k}={v:?} is not a number"))
            })
        }
        fn flag(k: &str, v: &str) -> Result<bool> {
            match v {
                "1" | "true" | "yes" | "on" => Ok(true),
                "0" | "false" | "no" | "off" => Ok(false),
                _ => Err(Error::invalid_argument(format!(
                    "gds param {k}={v:?} is not a boolean (true/false)"
                ))),
            }
        }
        for (k, v) in params {
            match k.as_str() {
                "engine" => {
                    o.engine = match v.as_str() {
                        "auto" => EngineChoice::Auto,
                        "uring" | "io_uring" => EngineChoice::Uring,
                        "threads" | "thread_pool" | "posix" => EngineChoice::ThreadPool,
                        _ => {
                            return Err(Error::invalid_argument(format!(
                                "gds param engine={v:?}: use auto, uring or threads"
                            )))
                        }
                    }
                }
                "queue_depth" => o.queue_depth = num(k, v)?,
                "max_io_size" => o.max_io_size = num(k, v)?,
                "submit_batch" => o.submit_batch = num(k, v)?,
                "bounce" => o.bounce = flag(k, v)?,
                "threads" => o.threads = num(k, v)?,
                "register_buffers" => o.register_buffers = flag(k, v)?,
                "register_files" => o.register_files = flag(k, v)?,
                _ => {
                    return Err(Error::invalid_argument(format!(
                        "unknown gds param {k:?}; known: engine, queue_depth, max_io_size, submit_batch, bounce, threads, register_buffers, register_files"
                    )))
                }
            }
        }
        if o.queue_depth == 0 || o.queue_depth > 4096 {
            return Err(Error::invalid_argument(format!(
                "gds queue_depth {} must be 1..=4096",
                o.queue_depth
            )));
        }
        if o.submit_batch == 0 {
            return Err(Error::invalid_argument(
                "gds submit_batch must be at least 1 (1 = submit each request at once)",
            ));
        }
        if o.max_io_size < 4096 || o.max_io_size > (1 << 30) {
            return Err(Error::invalid_argument(format!(
                "gds max_io_size {} must be 4 KiB..=1 GiB",
                o.max_io_size
            )));
        }
        Ok(o)
    }
}

/// Creates the gds backend for the agent `agent_name` from agent params.
pub fn create(agent_name: &str, params: &Params) -> Result<Arc<dyn Backend>> {
    Ok(Arc::new(GdsBackend::new(
        agent_name,
        Options::from_params(params)?,
    )?))
}

/// Tells backends of different processes (and instances) apart in connection info.
static INSTANCES: AtomicU64 = AtomicU64::new(1);
const INFO_MAGIC: &[u8; 6] = b"KVGDS1";

/// The storage backend. `Send + Sync`: every table and the engine sit behind one
/// mutex; `progress`/`poll` never block, [`GdsBackend::wait`] and `cancel` may.
pub struct GdsBackend {
    agent: String,
    opts: Options,
    instance: u64,
    kind: EngineKind,
    description: String,
    /// The cuFile driver, or why it is unavailable.
    #[cfg(feature = "cuda")]
    cufile: std::result::Result<cufile::CuFile, Error>,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for GdsBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GdsBackend")
            .field("agent", &self.agent)
            .field("engine", &self.description)
            .finish_non_exhaustive()
    }
}

struct Tagged {
    tid: u64,
    /// Index of the piece in the transfer's op list.
    op: usize,
    bounce: Option<Bounce>,
}

struct Inner {
    engine: Engine,
    next_id: u64,
    regs: HashMap<u64, Reg>,
    endpoints: HashMap<u64, String>,
    remotes: HashMap<u64, RemoteImport>,
    transfers: HashMap<u64, Transfer>,
    /// Posted transfers with pieces left to issue, oldest first.
    active: VecDeque<u64>,
    tags: Vec<Option<Tagged>>,
    free_tags: Vec<usize>,
    bounce_write_in_flight: bool,
    /// Some transfer was posted with a deadline (checked on every drive from then on).
    deadlines: bool,
    inbox: VecDeque<Notification>,
    /// Notifications waiting for the transfers posted before them.
    deferred: VecDeque<(Vec<u64>, Bytes)>,
    done: Vec<IoDone>,
}

impl GdsBackend {
    /// A backend for agent `agent` with `opts`.
    ///
    /// Fails with [`Error::BackendUnavailable`] when `opts.engine` is `Uring` and io_uring
    /// cannot be used; with `Auto` it falls back to the thread pool and logs why.
    pub fn new(agent: &str, opts: Options) -> Result<GdsBackend> {
        let (engine, kind, description) = match opts.engine {
            EngineChoice::ThreadPool => {
                let p = PoolEngine::new(opts.threads, opts.queue_depth)?;
                let d = format!(
                    "thread pool ({} threads, queue depth {}; chosen by option)",
                    p.threads(),
                    opts.queue_depth
                );
                (Engine::Pool(p), EngineKind::ThreadPool, d)
            }
            choice => {
                match UringEngine::new(
                    opts.queue_depth,
                    opts.submit_batch,
                    opts.register_buffers,
                    opts.register_files,
                ) {
                    Ok(u) => {
                        let (b, f) = u.fixed();
                        let d = format!(
                            "io_uring (queue depth {}, submit batch {}, registered buffers {}, registered files {})",
                            u.depth(),
                            u.submit_batch(),
                            if b { "on" } else { "off" },
                            if f { "on" } else { "off" }
                        );
                        (Engine::Uring(Box::new(u)), EngineKind::Uring, d)
                    }
                    Err(e) if choice == EngineChoice::Auto => {
                        tracing::warn!("gds: {e}; falling back to a pread/pwrite thread pool");
                        let p = PoolEngine::new(opts.threads, opts.queue_depth)?;
                        let d = format!(
                            "thread pool ({} threads, queue depth {}; io_uring unavailable: {e})",
                            p.threads(),
                            opts.queue_depth
                        );
                        (Engine::Pool(p), EngineKind::ThreadPool, d)
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        let instance =
            (u64::from(std::process::id()) << 32) | INSTANCES.fetch_add(1, Ordering::Relaxed);
        Ok(GdsBackend {
            agent: agent.to_string(),
            opts,
            instance,
            kind,
            description,
            #[cfg(feature = "cuda")]
            cufile: cufile::CuFile::open(),
            inner: Mutex::new(Inner {
                engine,
                next_id: 0,
                regs: HashMap::new(),
                endpoints: HashMap::new(),
                remotes: HashMap::new(),
                transfers: HashMap::new(),
                active: VecDeque::new(),
                tags: Vec::new(),
                free_tags: Vec::new(),
                bounce_write_in_flight: false,
                deadlines: false,
                inbox: VecDeque::new(),
                deferred: VecDeque::new(),
                done: Vec::new(),
            }),
        })
    }

    /// The engine in use.
    pub fn engine(&self) -> EngineKind {
        self.kind
    }

    /// One line for logs and telemetry: engine, queue depth, fixed buffers/files, and
    /// why the thread pool was chosen when it was.
    pub fn describe(&self) -> String {
        self.description.clone()
    }

    /// For a file or block registration: `Some(alignment)` when it is in `O_DIRECT` mode
    /// (offsets, lengths and addresses must be multiples of it), `None` when buffered.
    pub fn file_alignment(&self, id: RegistrationId) -> Result<Option<u64>> {
        let g = self.inner.lock();
        let r = g
            .regs
            .get(&id.0)
            .ok_or_else(|| Error::NotRegistered(format!("{id}")))?;
        let (info, _) = r
            .file()
            .ok_or_else(|| Error::invalid_argument(format!("{id} is not a file registration")))?;
        Ok(info.direct.then_some(info.align))
    }

    /// The options the backend was created with.
    pub fn options(&self) -> &Options {
        &self.opts
    }

    /// Drives the engine, blocking for completions, until `id` finishes or `timeout`
    /// passes (then the current status, usually `InProgress`, is returned).
    pub fn wait(&self, id: TransferId, timeout: Duration) -> Status {
        let end = Instant::now() + timeout;
        loop {
            let mut g = self.inner.lock();
            let st = match g.transfers.get(&id.0) {
                Some(t) => t.status.clone(),
                None => return Status::Failed(Error::NotRegistered(format!("{id}"))),
            };
            if !matches!(st, Status::InProgress) || Instant::now() >= end {
                return st;
            }
            // Blocking for one completion is bounded: storage I/O always completes,
            // and the thread pool wakes at least once a second.
            if let Err(e) = self.drive(&mut g, true) {
                return Status::Failed(e);
            }
        }
    }

    /// Issues pieces, flushes the engine and handles completions once.
    fn drive(&self, g: &mut Inner, block: bool) -> Result<usize> {
        self.check_deadlines(g);
        self.pump(g);
        let mut done = std::mem::take(&mut g.done);
        done.clear();
        let r = g.engine.flush(block, &mut done);
        let n = done.len();
        for d in done.drain(..) {
            self.complete(g, d);
        }
        g.done = done;
        r?;
        if n > 0 {
            // Refill the queue right away so the device stays busy between calls. A
            // blocking caller loops into `flush` again, which submits the refill and
            // waits in one system call (as fio does); a non-blocking one submits now.
            self.pump(g);
            if block {
                return Ok(n);
            }
            let mut more = std::mem::take(&mut g.done);
            let r = g.engine.flush(false, &mut more);
            for d in more.drain(..) {
                self.complete(g, d);
            }
            g.done = more;
            r?;
        }
        Ok(n)
    }

    fn check_deadlines(&self, g: &mut Inner) {
        if !g.deadlines {
            return;
        }
        let now = Instant::now();
        let expired: Vec<u64> = g
            .transfers
            .iter()
            .filter(|(_, t)| {
                matches!(t.status, Status::InProgress)
                    && t.run.stop.is_none()
                    && t.deadline.is_some_and(|d| now > d)
            })
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            if let Some(t) = g.transfers.get_mut(&id) {
                let start = t.run.started.unwrap_or(now);
                t.run.stop = Some(Stop::TimedOut(start));
                t.run.cancel_flag.store(true, Ordering::Release);
            }
            self.cancel_in_engine(g, id);
            self.maybe_finish(g, id);
        }
    }

    /// Hands pieces of the active transfers to the engine while it has room.
    fn pump(&self, g: &mut Inner) {
        while g.engine.free() > 0 {
            let Some(&tid) = g.active.front() else {
                return;
            };
            let Some(t) = g.transfers.get_mut(&tid) else {
                g.active.pop_front();
                continue;
            };
            if t.run.issuing_done(t.ops.len()) {
                g.active.pop_front();
                continue;
            }
            let op_index = t.run.next;
            let op = t.ops[op_index];
            let write = t.op == Op::Write;
            #[cfg(feature = "cuda")]
            if op.vram {
                {
                    t.run.next += 1;
                    let r = match &self.cufile {
                        Ok(c) => c.transfer(&op, write),
                        Err(_) => Err(IoFail::Os(libc::ENODEV)),
                    };
                    match r {
                        Ok(n) => t.run.landed += n,
                        Err(fail) => {
                            t.run.failure.get_or_insert(Failure { fail, op, bytes: 0 });
                        }
                    }
                    self.maybe_finish(g, tid);
                    continue;
                }
            }
            let (bounce, addr, len, offset) = if op.bounce {
                if write && g.bounce_write_in_flight {
                    // Read-modify-write of shared edge blocks must not interleave.
                    return;
                }
                // SAFETY: the transfer is posted, so its local ranges are valid (the
                // `post` contract) until it finishes.
                match unsafe { Bounce::new(&op, write) } {
                    Ok((b, addr, len, offset)) => (Some(b), addr, len, offset),
                    Err(e) => {
                        tracing::warn!("gds bounce buffer for fd {}: {e}", op.fd);
                        t.run.next += 1;
                        t.run.failure.get_or_insert(Failure {
                            fail: IoFail::Os(libc::ENOMEM),
                            op,
                            bytes: 0,
                        });
                        self.maybe_finish(g, tid);
                        continue;
                    }
                }
            } else {
                (None, op.addr, op.len, op.offset)
            };
            t.run.next += 1;
            t.run.in_flight += 1;
            let cancel = t.run.cancel_flag.clone();
            if bounce.as_ref().is_some_and(|b| b.is_write()) {
                g.bounce_write_in_flight = true;
            }
            let buf_index = if bounce.is_some() { None } else { op.buf_index };
            let tag = match g.free_tags.pop() {
                Some(i) => {
                    g.tags[i] = Some(Tagged {
                        tid,
                        op: op_index,
                        bounce,
                    });
                    i
                }
                None => {
                    g.tags.push(Some(Tagged {
                        tid,
                        op: op_index,
                        bounce,
                    }));
                    g.tags.len() - 1
                }
            };
            let req = IoReq {
                tag: tag as u64,
                write,
                fd: op.fd,
                fixed_file: op.fixed_file,
                addr,
                len,
                offset,
                buf_index,
                cancel,
            };
            // SAFETY: the memory is either the user's (valid and registered until the
            // transfer finishes: the `post` contract, and the transfer cannot finish
            // while this piece is in flight) or a bounce buffer owned by the tag entry,
            // which is freed only after the completion is reaped.
            unsafe { g.engine.push(req) };
        }
    }

    /// Accounts one finished piece.
    fn complete(&self, g: &mut Inner, d: IoDone) {
        let Some(tagged) = g.tags.get_mut(d.tag as usize).and_then(|t| t.take()) else {
            tracing::warn!(tag = d.tag, "gds completion for an unknown tag");
            return;
        };
        g.free_tags.push(d.tag as usize);
        if tagged.bounce.as_ref().is_some_and(|b| b.is_write()) {
            g.bounce_write_in_flight = false;
        }
        let Some(t) = g.transfers.get_mut(&tagged.tid) else {
            return;
        };
        t.run.in_flight = t.run.in_flight.saturating_sub(1);
        let result = match &tagged.bounce {
            // SAFETY: the transfer is still in progress (this piece was in flight), so
            // its memory is valid.
            Some(b) => unsafe { b.finish(d.bytes, d.fail) }.map_err(|f| (f, 0)),
            None => match d.fail {
                None => Ok(d.bytes),
                Some(f) => Err((f, d.bytes)),
            },
        };
        match result {
            Ok(n) => t.run.landed += n,
            Err((fail, bytes)) => {
                t.run.landed += bytes;
                let canceled = fail == IoFail::Os(libc::ECANCELED) && t.run.stop.is_some();
                if !canceled && t.run.failure.is_none() {
                    if let Some(op) = t.ops.get(tagged.op).copied() {
                        t.run.failure = Some(Failure { fail, op, bytes });
                    }
                }
            }
        }
        let tid = tagged.tid;
        self.maybe_finish(g, tid);
    }

    /// Turns a run whose pieces are all issued and reaped into `Done`/`Failed`.
    fn maybe_finish(&self, g: &mut Inner, tid: u64) {
        let Some(t) = g.transfers.get_mut(&tid) else {
            return;
        };
        if !matches!(t.status, Status::InProgress)
            || t.run.in_flight > 0
            || !t.run.issuing_done(t.ops.len())
        {
            return;
        }
        t.status = match t.final_error() {
            Some(e) => Status::Failed(e),
            None => {
                if let Some(p) = t.notification.take() {
                    g.inbox.push_back(Notification {
                        peer: self.agent.clone(),
                        payload: p,
                    });
                }
                Status::Done
            }
        };
        for r in t.regs.clone() {
            if let Some(r) = g.regs.get_mut(&r) {
                r.busy = r.busy.saturating_sub(1);
            }
        }
        self.deliver_deferred(g);
    }

    /// Delivers notifications whose earlier transfers have all finished, in order.
    fn deliver_deferred(&self, g: &mut Inner) {
        while let Some((after, _)) = g.deferred.front() {
            let waiting = after.iter().any(|id| {
                g.transfers
                    .get(id)
                    .is_some_and(|t| matches!(t.status, Status::InProgress))
            });
            if waiting {
                return;
            }
            if let Some((_, payload)) = g.deferred.pop_front() {
                g.inbox.push_back(Notification {
                    peer: self.agent.clone(),
                    payload,
                });
            }
        }
    }

    fn cancel_in_engine(&self, g: &mut Inner, tid: u64) {
        let tags = &g.tags;
        g.engine.cancel(&|tag| {
            tags.get(tag as usize)
                .and_then(|t| t.as_ref())
                .is_some_and(|t| t.tid == tid)
        });
    }

    fn next_id(g: &mut Inner) -> u64 {
        g.next_id += 1;
        g.next_id
    }
}

/// A local registration as `prepare` needs it: id, fixed-buffer index, start address.
type LocalReg = (u64, Option<u16>, u64);

/// Finds the registration holding `d` among `cands`, trying the last hit first.
fn find<T: Copy>(cands: &[(Descriptor, T)], d: &Descriptor, last: &mut usize) -> Option<T> {
    if let Some((c, v)) = cands.get(*last) {
        if c.contains(d) {
            return Some(*v);
        }
    }
    let i = cands.iter().position(|(c, _)| c.contains(d))?;
    *last = i;
    Some(cands[i].1)
}

// `register` and `post` are unsafe because the trait says so; the I/O they set up is
// issued in `pump` under the contracts documented there.
impl Backend for GdsBackend {
    fn name(&self) -> &str {
        "gds"
    }

    fn capabilities(&self) -> Capabilities {
        #[allow(unused_mut)]
        let mut kinds = vec![MemKind::Dram, MemKind::File, MemKind::Block];
        #[cfg(feature = "cuda")]
        if self.cufile.is_ok() {
            kinds.push(MemKind::Vram);
        }
        Capabilities {
            local: true,
            remote: false,
            notifications: true,
            write: true,
            read: true,
            mem_kinds: MemKinds::of(&kinds),
        }
    }

    unsafe fn register(&self, kind: MemKind, desc: &Descriptor) -> Result<RegistrationId> {
        if desc.len == 0 || desc.end().is_none() {
            return Err(Error::invalid_argument(format!(
                "cannot register {kind} range {:#x}+{}",
                desc.addr, desc.len
            )));
        }
        let mut g = self.inner.lock();
        let mem = match kind {
            MemKind::Dram => {
                if desc.addr == 0 {
                    return Err(Error::invalid_argument("dram registration at address 0"));
                }
                let buf_index = if self.opts.register_buffers {
                    // SAFETY: the caller keeps the range valid until `deregister`, which
                    // clears the slot.
                    unsafe { g.engine.register_buffer(desc.addr, desc.len) }
                } else {
                    None
                };
                RegMem::Host { buf_index }
            }
            MemKind::File | MemKind::Block => {
                let info = file::probe(desc.device as i32)?;
                if kind == MemKind::Block && !info.block {
                    return Err(Error::invalid_argument(format!(
                        "fd {} is not a block device; register it as MemKind::File",
                        desc.device
                    )));
                }
                let fixed = if self.opts.register_files {
                    g.engine.register_file(info.fd.as_raw_fd())
                } else {
                    None
                };
                RegMem::File { info, fixed }
            }
            #[cfg(feature = "cuda")]
            MemKind::Vram => {
                let c = self.cufile.as_ref().map_err(Clone::clone)?;
                c.register_buffer(desc)?;
                RegMem::Vram
            }
            other => {
                return Err(Error::Unsupported(format!(
                    "gds registers dram, file and block memory, not {other}"
                )))
            }
        };
        let id = Self::next_id(&mut g);
        let key = (self.instance ^ id.wrapping_mul(0x9E37_79B9_7F4A_7C15)).rotate_left(17)
            ^ (Instant::now().elapsed().as_nanos() as u64);
        g.regs.insert(
            id,
            Reg {
                kind,
                desc: *desc,
                key,
                busy: 0,
                mem,
            },
        );
        Ok(RegistrationId(id))
    }

    fn deregister(&self, id: RegistrationId) -> Result<()> {
        let mut g = self.inner.lock();
        match g.regs.get(&id.0) {
            None => return Err(Error::NotRegistered(format!("{id}"))),
            Some(r) if r.busy > 0 => {
                return Err(Error::Busy(format!(
                    "{id} is named by {} posted transfer(s); wait or cancel them first",
                    r.busy
                )))
            }
            Some(_) => {}
        }
        let Some(reg) = g.regs.remove(&id.0) else {
            return Err(Error::NotRegistered(format!("{id}")));
        };
        match reg.mem {
            RegMem::Host { buf_index: Some(i) } => g.engine.unregister_buffer(i),
            RegMem::Host { buf_index: None } => {}
            RegMem::File { ref info, fixed } => {
                if let Some(i) = fixed {
                    g.engine.unregister_file(i);
                }
                #[cfg(feature = "cuda")]
                if let Ok(c) = &self.cufile {
                    c.forget_file(info.fd.as_raw_fd());
                }
                let _ = info;
            }
            #[cfg(feature = "cuda")]
            RegMem::Vram => {
                if let Ok(c) = &self.cufile {
                    c.deregister_buffer(&reg.desc);
                }
            }
        }
        // Our fd dup closes as `reg` drops.
        Ok(())
    }

    fn remote_key(&self, id: RegistrationId) -> Result<Bytes> {
        let g = self.inner.lock();
        let r = g
            .regs
            .get(&id.0)
            .ok_or_else(|| Error::NotRegistered(format!("{id}")))?;
        Ok(Bytes::copy_from_slice(&memory::encode_key(id.0, r.key)))
    }

    fn connection_info(&self) -> Result<Bytes> {
        let mut v = Vec::with_capacity(14 + self.agent.len());
        v.extend_from_slice(INFO_MAGIC);
        v.extend_from_slice(&self.instance.to_le_bytes());
        v.extend_from_slice(self.agent.as_bytes());
        Ok(Bytes::from(v))
    }

    fn connect(&self, peer_name: &str, info: &[u8]) -> Result<EndpointId> {
        if info.len() < 14 || &info[..6] != INFO_MAGIC {
            return Err(Error::invalid_metadata(
                "gds connection info must start with KVGDS1 and an 8-byte instance id",
            ));
        }
        let mut inst = [0u8; 8];
        inst.copy_from_slice(&info[6..14]);
        if u64::from_le_bytes(inst) != self.instance {
            return Err(Error::Unsupported(format!(
                "gds moves data between this agent's memory and its own files; it cannot reach agent {peer_name:?} (connect it to this backend's own connection info)"
            )));
        }
        let mut g = self.inner.lock();
        let id = Self::next_id(&mut g);
        g.endpoints.insert(id, peer_name.to_string());
        Ok(EndpointId(id))
    }

    fn disconnect(&self, peer: EndpointId) -> Result<()> {
        let mut g = self.inner.lock();
        g.endpoints
            .remove(&peer.0)
            .ok_or_else(|| Error::NotRegistered(format!("{peer}")))?;
        g.remotes.retain(|_, r| r.peer != peer.0);
        Ok(())
    }

    fn import_remote(
        &self,
        peer: EndpointId,
        kind: MemKind,
        desc: &Descriptor,
        key: &[u8],
    ) -> Result<RemoteId> {
        if !matches!(kind, MemKind::File | MemKind::Block) {
            return Err(Error::Unsupported(format!(
                "gds addresses files and block devices as the remote side, not {kind}"
            )));
        }
        let (reg_id, secret) = memory::decode_key(key).ok_or_else(|| {
            Error::invalid_metadata(format!(
                "gds remote key is {} bytes, not {}",
                key.len(),
                memory::KEY_LEN
            ))
        })?;
        let mut g = self.inner.lock();
        if !g.endpoints.contains_key(&peer.0) {
            return Err(Error::NotRegistered(format!("{peer}")));
        }
        let reg = g
            .regs
            .get(&reg_id)
            .filter(|r| r.key == secret)
            .ok_or_else(|| {
                Error::NotRegistered(format!("gds remote key for registration {reg_id}"))
            })?;
        if reg.kind != kind {
            return Err(Error::invalid_argument(format!(
                "the key names a {} registration, not {kind}",
                reg.kind
            )));
        }
        if !reg.desc.contains(desc) {
            return Err(Error::OutOfBounds(format!(
                "{kind} range {}+{} of fd {} is outside the registration {}+{}",
                desc.addr, desc.len, desc.device, reg.desc.addr, reg.desc.len
            )));
        }
        let id = Self::next_id(&mut g);
        g.remotes.insert(
            id,
            RemoteImport {
                peer: peer.0,
                kind,
                desc: *desc,
                reg: reg_id,
            },
        );
        Ok(RemoteId(id))
    }

    fn release_remote(&self, id: RemoteId) -> Result<()> {
        self.inner
            .lock()
            .remotes
            .remove(&id.0)
            .map(|_| ())
            .ok_or_else(|| Error::NotRegistered(format!("{id}")))
    }

    fn prepare(&self, req: &TransferRequest) -> Result<TransferId> {
        check_request_shape(req)?;
        let vram = match req.local_kind {
            MemKind::Dram => false,
            #[cfg(feature = "cuda")]
            MemKind::Vram => true,
            k => {
                return Err(Error::Unsupported(format!(
                    "gds moves dram{} to and from files, not {k}",
                    if cfg!(feature = "cuda") {
                        " or vram"
                    } else {
                        ""
                    }
                )))
            }
        };
        if !matches!(req.remote_kind, MemKind::File | MemKind::Block) {
            return Err(Error::Unsupported(format!(
                "gds transfers go to files or block devices, not {}",
                req.remote_kind
            )));
        }
        let mut g = self.inner.lock();
        if !g.endpoints.contains_key(&req.peer.0) {
            return Err(Error::NotRegistered(format!("{}", req.peer)));
        }
        let local: Vec<(Descriptor, LocalReg)> = g
            .regs
            .iter()
            .filter(|(_, r)| r.kind == req.local_kind)
            .map(|(id, r)| {
                let bi = match r.mem {
                    RegMem::Host { buf_index } => buf_index,
                    _ => None,
                };
                (r.desc, (*id, bi, r.desc.addr))
            })
            .collect();
        let remote: Vec<(Descriptor, u64)> = g
            .remotes
            .values()
            .filter(|r| r.peer == req.peer.0 && r.kind == req.remote_kind)
            .filter(|r| g.regs.contains_key(&r.reg))
            .map(|r| (r.desc, r.reg))
            .collect();
        let max_io = self.opts.max_io_size;
        let mut ops = Vec::new();
        let mut regs: Vec<u64> = Vec::new();
        let (mut li, mut ri) = (0usize, 0usize);
        for seg in segments(&req.local, &req.remote)? {
            let (lreg, buf_index, base) = find(&local, &seg.local, &mut li).ok_or_else(|| {
                Error::NotRegistered(format!(
                    "local {} range {:#x}+{} lies outside every local registration",
                    req.local_kind, seg.local.addr, seg.local.len
                ))
            })?;
            let freg = find(&remote, &seg.remote, &mut ri).ok_or_else(|| {
                Error::OutOfBounds(format!(
                    "{} range {}+{} of fd {} lies outside every imported registration",
                    req.remote_kind, seg.remote.addr, seg.remote.len, seg.remote.device
                ))
            })?;
            for r in [lreg, freg] {
                if !regs.contains(&r) {
                    regs.push(r);
                }
            }
            let Some((info, fixed)) = g.regs.get(&freg).and_then(|r| r.file()) else {
                return Err(Error::NotRegistered(format!("file registration {freg}")));
            };
            let fd = info.fd.as_raw_fd();
            let align = info.align;
            let aligned = seg.remote.addr % align == 0
                && seg.local.len % align == 0
                && (vram || seg.local.addr % align == 0);
            if !aligned && !self.opts.bounce {
                return Err(Error::invalid_argument(format!(
                    "fd {} is open with O_DIRECT, which needs file offset, length and memory address aligned to {align} bytes (its logical block size); got offset {}, length {}, address {:#x}. Align the blocks, open the file without O_DIRECT, or create the backend with bounce: true",
                    seg.remote.device, seg.remote.addr, seg.local.len, seg.local.addr
                )));
            }
            if !aligned && vram {
                return Err(Error::invalid_argument(format!(
                    "vram transfers to O_DIRECT files need offsets and lengths aligned to {align} bytes"
                )));
            }
            if !aligned {
                let len = u32::try_from(seg.local.len).map_err(|_| {
                    Error::invalid_argument(format!(
                        "an unaligned piece of {} bytes is too large for the bounce path (4 GiB at most)",
                        seg.local.len
                    ))
                })?;
                ops.push(IoOp {
                    fd,
                    fixed_file: fixed,
                    offset: seg.remote.addr,
                    addr: seg.local.addr,
                    len,
                    buf_index: None,
                    bounce: true,
                    align,
                    vram,
                    base,
                });
                continue;
            }
            // Split at max_io, kept a multiple of the alignment.
            let step = (max_io - max_io % align).max(align);
            let mut off = 0u64;
            while off < seg.local.len {
                let n = step.min(seg.local.len - off);
                ops.push(IoOp {
                    fd,
                    fixed_file: fixed,
                    offset: seg.remote.addr + off,
                    addr: seg.local.addr + off,
                    len: n as u32,
                    buf_index: if vram { None } else { buf_index },
                    bounce: false,
                    align,
                    vram,
                    base,
                });
                off += n;
            }
        }
        let id = Self::next_id(&mut g);
        g.transfers.insert(
            id,
            Transfer {
                op: req.op,
                ops,
                regs,
                total: req.local.total_bytes(),
                status: Status::Idle,
                run: Run::default(),
                notification: None,
                deadline: None,
            },
        );
        Ok(TransferId(id))
    }

    unsafe fn post(&self, id: TransferId, opts: &PostOptions) -> Result<()> {
        let mut g = self.inner.lock();
        let g = &mut *g;
        let t = g
            .transfers
            .get_mut(&id.0)
            .ok_or_else(|| Error::NotRegistered(format!("{id}")))?;
        if matches!(t.status, Status::InProgress) {
            return Err(Error::Busy(format!("{id} is already in progress")));
        }
        if let Some(missing) = t.regs.iter().find(|r| !g.regs.contains_key(r)) {
            return Err(Error::NotRegistered(format!(
                "registration {missing} named by {id} was deregistered; prepare the transfer again"
            )));
        }
        for r in &t.regs {
            if let Some(r) = g.regs.get_mut(r) {
                r.busy += 1;
            }
        }
        t.run = Run {
            started: Some(Instant::now()),
            ..Run::default()
        };
        t.status = Status::InProgress;
        t.notification = opts.notification.clone();
        t.deadline = opts.deadline;
        g.deadlines |= opts.deadline.is_some();
        g.active.push_back(id.0);
        // Start the I/O now; completions are reaped by progress/poll/wait.
        self.drive(g, false)?;
        Ok(())
    }

    fn poll(&self, id: TransferId) -> Status {
        let mut g = self.inner.lock();
        match g.transfers.get(&id.0) {
            None => return Status::Failed(Error::NotRegistered(format!("{id}"))),
            Some(t) if !matches!(t.status, Status::InProgress) => return t.status.clone(),
            Some(_) => {}
        }
        if let Err(e) = self.drive(&mut g, false) {
            tracing::warn!("gds progress: {e}");
        }
        g.transfers
            .get(&id.0)
            .map(|t| t.status.clone())
            .unwrap_or(Status::Failed(Error::NotRegistered(format!("{id}"))))
    }

    fn cancel(&self, id: TransferId) -> Result<()> {
        let mut g = self.inner.lock();
        let t = g
            .transfers
            .get_mut(&id.0)
            .ok_or_else(|| Error::NotRegistered(format!("{id}")))?;
        if !matches!(t.status, Status::InProgress) {
            return Ok(());
        }
        t.run.stop = Some(Stop::Canceled);
        t.run.cancel_flag.store(true, Ordering::Release);
        self.cancel_in_engine(&mut g, id.0);
        // Return only once the kernel (or a worker) no longer touches the memory: every
        // piece in flight has been reaped. Storage requests always complete.
        loop {
            let in_flight = g.transfers.get(&id.0).map_or(0, |t| t.run.in_flight);
            if in_flight == 0 {
                break;
            }
            let mut done = std::mem::take(&mut g.done);
            done.clear();
            let r = g.engine.flush(true, &mut done);
            for d in done.drain(..) {
                self.complete(&mut g, d);
            }
            g.done = done;
            if let Err(e) = r {
                tracing::error!("gds cancel could not reap completions: {e}");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        self.maybe_finish(&mut g, id.0);
        Ok(())
    }

    fn release(&self, id: TransferId) -> Result<()> {
        let mut g = self.inner.lock();
        match g.transfers.get(&id.0) {
            None => Err(Error::NotRegistered(format!("{id}"))),
            Some(t) if matches!(t.status, Status::InProgress) => {
                Err(Error::Busy(format!("{id} is in progress; cancel it first")))
            }
            Some(_) => {
                g.transfers.remove(&id.0);
                Ok(())
            }
        }
    }

    fn progress(&self) -> Result<usize> {
        let mut g = self.inner.lock();
        self.drive(&mut g, false)
    }

    fn notify(&self, peer: EndpointId, payload: Bytes) -> Result<()> {
        let mut g = self.inner.lock();
        if !g.endpoints.contains_key(&peer.0) {
            return Err(Error::NotRegistered(format!("{peer}")));
        }
        let after: Vec<u64> = g
            .transfers
            .iter()
            .filter(|(_, t)| matches!(t.status, Status::InProgress))
            .map(|(id, _)| *id)
            .collect();
        g.deferred.push_back((after, payload));
        self.deliver_deferred(&mut g);
        Ok(())
    }

    fn drain_notifications(&self, out: &mut Vec<Notification>) -> Result<usize> {
        let mut g = self.inner.lock();
        let n = g.inbox.len();
        out.extend(g.inbox.drain(..));
        Ok(n)
    }

    fn estimate_cost(&self, req: &TransferRequest) -> Option<Duration> {
        // A rough NVMe figure (2 GB/s plus 20 µs per piece), enough to rank backends.
        let pieces = req.local.len().max(req.remote.len());
        Some(Duration::from_nanos(
            req.local.total_bytes() / 2 + pieces.saturating_mul(20_000),
        ))
    }
}

impl Drop for GdsBackend {
    fn drop(&mut self) {
        // Nothing may still write into user memory once the backend is gone: wait for
        // whatever is in flight (user memory outlives it by the `post` contract).
        let g = self.inner.get_mut();
        let mut done = Vec::new();
        let mut rounds = 0;
        while g.engine.in_flight() > 0 && rounds < 100_000 {
            if g.engine.flush(true, &mut done).is_err() {
                break;
            }
            rounds += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_parse_and_refuse() {
        let mut p = Params::new();
        p.insert("engine".into(), "threads".into());
        p.insert("queue_depth".into(), "32".into());
        p.insert("bounce".into(), "true".into());
        let o = Options::from_params(&p).unwrap();
        assert_eq!(o.engine, EngineChoice::ThreadPool);
        assert_eq!(o.queue_depth, 32);
        assert!(o.bounce);
        p.insert("qd".into(), "1".into());
        assert!(Options::from_params(&p).is_err());
        let mut p = Params::new();
        p.insert("queue_depth".into(), "0".into());
        assert!(Options::from_params(&p).is_err());
        let mut p = Params::new();
        p.insert("submit_batch".into(), "0".into());
        assert!(Options::from_params(&p).is_err());
        p.insert("submit_batch".into(), "8".into());
        assert_eq!(Options::from_params(&p).unwrap().submit_batch, 8);
        let mut p = Params::new();
        p.insert("engine".into(), "spdk".into());
        assert!(Options::from_params(&p).is_err());
    }

    #[test]
    fn backend_is_send_sync() {
        fn check<T: Send + Sync>() {}
        check::<GdsBackend>();
    }

    #[test]
    fn keys_round_trip_and_reject_garbage() {
        let k = memory::encode_key(7, 0xdead_beef);
        assert_eq!(memory::decode_key(&k), Some((7, 0xdead_beef)));
        assert_eq!(memory::decode_key(&k[..15]), None);
    }

    #[test]
    fn connect_refuses_other_agents_and_garbage() {
        let a = GdsBackend::new("a", Options::default()).unwrap();
        let b = GdsBackend::new("b", Options::default()).unwrap();
        let info_b = b.connection_info().unwrap();
        assert!(matches!(
            a.connect("b", &info_b),
            Err(Error::Unsupported(_))
        ));
        assert!(matches!(
            a.connect("b", b"junk"),
            Err(Error::InvalidMetadata(_))
        ));
        let me = a.connect("a", &a.connection_info().unwrap()).unwrap();
        a.notify(me, Bytes::from_static(b"hi")).unwrap();
        let mut out = Vec::new();
        a.drain_notifications(&mut out).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].peer, "a");
        assert_eq!(&out[0].payload[..], b"hi");
    }
}
