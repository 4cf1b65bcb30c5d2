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
//! use kv_core::{Access, Backend, DescriptorList, MemKind, Op, PostOptions, TransferRequest};
//!
//! let path = std::env::temp_dir().join(format!("kv-gds-doc-{}", std::process::id()));
//! let (file, _direct) = kv_backend_gds::open_direct(&path, true)?;
//! file.set_len(1 << 20).map_err(|e| kv_core::Error::io("set_len", e))?;
//! let gds = kv_backend_gds::GdsBackend::new("agent-0", kv_backend_gds::Options::default())?;
//! let mut buf = kv_mem::HostBuffer::alloc(1 << 20, 4096)?;
//! buf.as_mut_slice().fill(7);
//! let fdesc = kv_core::Descriptor::new(0, 1 << 20, file.as_raw_fd() as u32);
//! // SAFETY: `buf` and `file` outlive the registrations (deregistered at the end).
//! let rw = Access::ReadWrite;
//! let (mreg, freg) = unsafe { (gds.register(MemKind::Dram, &buf.descriptor(), rw)?, gds.register(MemKind::File, &fdesc, rw)?) };
//! let me = gds.connect("agent-0", &gds.connection_info()?)?;
//! gds.import_remote(me, MemKind::File, &fdesc, &gds.remote_key(freg)?)?;
//! let t = gds.prepare(&TransferRequest { op: Op::Write, local_kind: MemKind::Dram,
//!     local: DescriptorList::single(buf.descriptor())?, peer: me, remote_kind: MemKind::File,
//!     remote: DescriptorList::single(fdesc)? })?;
//! unsafe { gds.post(t, &PostOptions::default())? };
//! assert!(matches!(gds.wait(t, std::time::Duration::from_secs(10)), kv_core::Status::Done));
//! gds.release(t)?; gds.deregister(mreg)?; gds.deregister(freg)?;
//! # std::fs::remove_file(&path).ok();
//! # Ok::<(), kv_core::Error>(())
//! ```
#![warn(missing_docs)]

mod engine;
mod file;
mod io;
mod memory;
mod pool;
mod progress;
mod request;
mod uring;
mod wire;

#[cfg(feature = "cuda")]
mod cufile;

use std::mem::ManuallyDrop;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kv_core::{
    check_request_shape, Access, Backend, BackendInit, Capabilities, Descriptor, EndpointId, Error,
    MemKind, MemKinds, Notification, Params, PostOptions, RegistrationId, RemoteId, Result, Status,
    TransferId, TransferRequest,
};
use parking_lot::Mutex;

use crate::engine::Engine;
use crate::memory::{Reg, RegMem, RemoteImport};
use crate::progress::{Driver, State};
use crate::request::{Shape, Transfer};

pub use crate::engine::{EngineChoice, EngineKind};
pub use crate::file::{is_direct, open_direct};
pub use crate::progress::{leaks, Leaks};

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
    /// How long `cancel` waits for the kernel to let go of a transfer's memory before
    /// it returns [`Error::Busy`] (param `cancel_wait_ms`, default 100 ms).
    pub cancel_wait: Duration,
    /// How long dropping the backend waits for I/O in flight before it leaks the ring,
    /// files and bounce buffers instead (param `drop_wait_ms`, default 2 s; see
    /// [`leaks`]).
    pub drop_wait: Duration,
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
            cancel_wait: Duration::from_millis(100),
            drop_wait: Duration::from_secs(2),
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
                "cancel_wait_ms" => o.cancel_wait = Duration::from_millis(num(k, v)?),
                "drop_wait_ms" => o.drop_wait = Duration::from_millis(num(k, v)?),
                _ => {
                    return Err(Error::invalid_argument(format!(
                        "unknown gds param {k:?}; known: engine, queue_depth, max_io_size, submit_batch, bounce, threads, register_buffers, register_files, cancel_wait_ms, drop_wait_ms"
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

/// Creates the gds backend for the agent `init` names from agent params (it has no
/// peers and no listener, so `init`'s secret and bind address do not apply).
pub fn create(init: &BackendInit, params: &Params) -> Result<Arc<dyn Backend>> {
    Ok(Arc::new(GdsBackend::new(
        &init.agent_name,
        Options::from_params(params)?,
    )?))
}

/// The storage backend. `Send + Sync`: every table and the engine sit behind one
/// mutex; `progress`/`poll` never block, [`GdsBackend::wait`] and `cancel` block for a
/// bounded time.
pub struct GdsBackend {
    opts: Options,
    instance: u64,
    kind: EngineKind,
    description: String,
    /// The agent name and the cuFile driver (or why it is unavailable).
    driver: Driver,
    /// Not dropped when the backend is dropped with I/O in flight (see `Drop`).
    inner: ManuallyDrop<Mutex<State>>,
}

impl std::fmt::Debug for GdsBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GdsBackend")
            .field("agent", &self.driver.agent)
            .field("engine", &self.description)
            .finish_non_exhaustive()
    }
}

impl GdsBackend {
    /// A backend for agent `agent` with `opts`.
    ///
    /// Fails with [`Error::BackendUnavailable`] when `opts.engine` is `Uring` and io_uring
    /// cannot be used; with `Auto` it falls back to the thread pool and logs why.
    pub fn new(agent: &str, opts: Options) -> Result<GdsBackend> {
        let (engine, kind, description) = Engine::open(
            opts.engine,
            opts.queue_depth,
            opts.submit_batch,
            opts.threads,
            opts.register_buffers,
            opts.register_files,
        )?;
        let instance = wire::new_instance()?;
        Ok(GdsBackend {
            opts,
            instance,
            kind,
            description,
            driver: Driver {
                agent: agent.to_string(),
                #[cfg(feature = "cuda")]
                cufile: cufile::CuFile::open(),
            },
            inner: ManuallyDrop::new(Mutex::new(State::new(engine))),
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
    /// passes (then the current status, usually `InProgress`, is returned). A stuck
    /// device does not hold it past `timeout`.
    pub fn wait(&self, id: TransferId, timeout: Duration) -> Status {
        let end = Instant::now() + timeout;
        loop {
            let mut g = self.inner.lock();
            let st = match g.transfers.get(&id.0) {
                Some(t) => t.status.clone(),
                None => return Status::Failed(Error::NotRegistered(format!("{id}"))),
            };
            let left = end.saturating_duration_since(Instant::now());
            if !matches!(st, Status::InProgress) || left.is_zero() {
                return st;
            }
            if let Err(e) = self.driver.drive(&mut g, Some(left)) {
                // The engine failed; the transfer's pieces may still be in the kernel, so
                // its status stays as it is. Report, and let the caller decide.
                tracing::warn!("gds wait for {id}: {e}");
                drop(g);
                std::thread::sleep(left.min(Duration::from_millis(1)));
            }
        }
    }

    /// Sets up what a registration of `kind` holds: a fixed-buffer slot for DRAM, a dup
    /// of the fd (probed, and a registered-file slot) for files, a cuFile registration
    /// for VRAM.
    ///
    /// # Safety
    ///
    /// As for [`Backend::register`]: the range stays valid until `deregister`.
    unsafe fn register_mem(
        &self,
        g: &mut State,
        kind: MemKind,
        desc: &Descriptor,
    ) -> Result<RegMem> {
        Ok(match kind {
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
                let c = self.driver.cufile.as_ref().map_err(Clone::clone)?;
                c.register_buffer(desc)?;
                RegMem::Vram
            }
            other => {
                return Err(Error::Unsupported(format!(
                    "gds registers dram, file and block memory, not {other}"
                )))
            }
        })
    }

    /// Undoes [`GdsBackend::register_mem`] for a registration just removed.
    fn release_mem(&self, g: &mut State, reg: &Reg) {
        match reg.mem {
            RegMem::Host { buf_index: Some(i) } => g.engine.unregister_buffer(i),
            RegMem::Host { buf_index: None } => {}
            RegMem::File { ref info, fixed } => {
                if let Some(i) = fixed {
                    g.engine.unregister_file(i);
                }
                #[cfg(feature = "cuda")]
                if let Ok(c) = &self.driver.cufile {
                    c.forget_file(info.fd.as_raw_fd());
                }
                let _ = info;
            }
            #[cfg(feature = "cuda")]
            RegMem::Vram => {
                if let Ok(c) = &self.driver.cufile {
                    c.deregister_buffer(&reg.desc);
                }
            }
        }
    }
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
        if self.driver.cufile.is_ok() {
            kinds.push(MemKind::Vram);
        }
        let mut c = Capabilities::default();
        c.local = true;
        c.remote = false;
        c.notifications = true;
        c.write = true;
        c.read = true;
        c.mem_kinds = MemKinds::of(&kinds);
        // A read-only memory registration is never a READ's destination and a read-only
        // file range never a WRITE's (checked at prepare, see `request::plan`).
        c.read_only = true;
        // Its only peer is itself: nothing to serve for another agent
        // (needs_target_progress false) and nobody to authenticate.
        c
    }

    unsafe fn register(
        &self,
        kind: MemKind,
        desc: &Descriptor,
        access: Access,
    ) -> Result<RegistrationId> {
        if desc.len == 0 || desc.end().is_none() {
            return Err(Error::invalid_argument(format!(
                "cannot register {kind} range {:#x}+{}",
                desc.addr, desc.len
            )));
        }
        let key = wire::new_secret()?;
        let mut g = self.inner.lock();
        // SAFETY: forwarded contract (the caller keeps the range valid until deregister).
        let mem = unsafe { self.register_mem(&mut g, kind, desc)? };
        let id = g.next_id();
        g.regs.insert(
            id,
            Reg {
                kind,
                desc: *desc,
                key,
                busy: 0,
                access,
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
        self.release_mem(&mut g, &reg);
        // Our fd dup closes as `reg` drops.
        Ok(())
    }

    fn remote_key(&self, id: RegistrationId) -> Result<Bytes> {
        let g = self.inner.lock();
        let r = g
            .regs
            .get(&id.0)
            .ok_or_else(|| Error::NotRegistered(format!("{id}")))?;
        Ok(Bytes::copy_from_slice(&wire::encode_key(id.0, &r.key)))
    }

    fn connection_info(&self) -> Result<Bytes> {
        Ok(wire::encode_info(self.instance, &self.driver.agent))
    }

    fn connect(&self, peer_name: &str, info: &[u8]) -> Result<EndpointId> {
        if wire::decode_info(info)? != self.instance {
            return Err(Error::Unsupported(format!(
                "gds moves data between this agent's memory and its own files; it cannot reach agent {peer_name:?} (connect it to this backend's own connection info)"
            )));
        }
        let mut g = self.inner.lock();
        let id = g.next_id();
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
        let (reg_id, secret) = wire::decode_key(key).ok_or_else(|| {
            Error::invalid_metadata(format!(
                "gds remote key is {} bytes, not {}",
                key.len(),
                wire::KEY_LEN
            ))
        })?;
        let mut g = self.inner.lock();
        if !g.endpoints.contains_key(&peer.0) {
            return Err(Error::NotRegistered(format!("{peer}")));
        }
        g.regs
            .get(&reg_id)
            .filter(|r| wire::same_secret(&r.key, &secret))
            .ok_or_else(|| {
                Error::NotRegistered(format!("gds remote key for registration {reg_id}"))
            })?
            .check_import(kind, desc)?;
        let id = g.next_id();
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
        let local = memory::local_candidates(&g.regs, req.local_kind);
        let remote = memory::remote_candidates(&g.remotes, &g.regs, req.peer.0, req.remote_kind);
        let shape = Shape {
            vram,
            max_io: self.opts.max_io_size,
            bounce: self.opts.bounce,
        };
        let (ops, regs) = request::plan(req, &g.regs, &local, &remote, shape)?;
        let id = g.next_id();
        let t = Transfer::new(req.op, ops, regs, req.local.total_bytes());
        g.transfers.insert(id, t);
        Ok(TransferId(id))
    }

    unsafe fn post(&self, id: TransferId, opts: &PostOptions) -> Result<()> {
        let mut g = self.inner.lock();
        self.driver.post(&mut g, id, opts)
    }

    fn poll(&self, id: TransferId) -> Status {
        let mut g = self.inner.lock();
        match g.transfers.get(&id.0) {
            None => return Status::Failed(Error::NotRegistered(format!("{id}"))),
            Some(t) if !matches!(t.status, Status::InProgress) => return t.status.clone(),
            Some(_) => {}
        }
        if let Err(e) = self.driver.drive(&mut g, None) {
            tracing::warn!("gds progress: {e}");
        }
        g.transfers
            .get(&id.0)
            .map(|t| t.status.clone())
            .unwrap_or(Status::Failed(Error::NotRegistered(format!("{id}"))))
    }

    /// Bounded: waits up to [`Options::cancel_wait`] for the kernel to let go of the
    /// transfer's memory; after that returns [`Error::Busy`] and the transfer stays in
    /// progress (canceled) until `poll` sees its last piece end — keep its memory.
    fn cancel(&self, id: TransferId) -> Result<()> {
        let mut g = self.inner.lock();
        self.driver.cancel(&mut g, id, self.opts.cancel_wait)
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
        self.driver.drive(&mut g, None)
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
        self.driver.deliver_deferred(&mut g);
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
        // Cancel whatever is in flight and wait for it, but not forever: after
        // `drop_wait` the state (ring, registered files and buffers, bounce buffers) is
        // leaked, never freed while the kernel may still use it (counted in `leaks()`).
        if self
            .driver
            .shutdown(self.inner.get_mut(), self.opts.drop_wait)
        {
            // SAFETY: dropped once, here; nothing is in flight any more.
            unsafe { ManuallyDrop::drop(&mut self.inner) };
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
        let s = wire::new_secret().unwrap();
        let k = wire::encode_key(7, &s);
        assert_eq!(wire::decode_key(&k), Some((7, s)));
        assert_eq!(wire::decode_key(&k[..k.len() - 1]), None);
        assert!(wire::same_secret(&s, &s));
        let mut t = s;
        t[SECRET_LAST] ^= 0x80;
        assert!(!wire::same_secret(&s, &t));
    }

    const SECRET_LAST: usize = wire::SECRET_LEN - 1;

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
