//! The pure-Rust kvx backend that is always there: remote peers over TCP, same-host
//! peers through shared memory (memfd-backed registrations mapped at import) or
//! cross-memory attach (`process_vm_writev`/`process_vm_readv`).
//!
//! One-sided WRITE and READ are emulated with a small framed protocol ([`wire`]):
//! payloads go with vectored writes straight from registered memory and land straight
//! in the target's registration, over several connections per peer; the target checks
//! every request against its own registrations. It needs no system library, so it is
//! the embedded default of `kv-agent` and the worked example for plugin authors.
//!
//! ```
//! use kv_core::{Backend, Descriptor, DescriptorList, MemKind, Op, Params, PostOptions, Status, TransferRequest};
//! let params = Params::from([("same_host".to_string(), "false".to_string())]);
//! let (a, b) = (kv_backend_tcp::create("prefill", &params)?, kv_backend_tcp::create("decode", &params)?);
//! let (src, mut dst) = (vec![7u8; 4096], vec![0u8; 4096]);
//! let (sd, dd) = (Descriptor::new(src.as_ptr() as u64, 4096, 0), Descriptor::new(dst.as_mut_ptr() as u64, 4096, 0));
//! // SAFETY: both buffers outlive their registrations (deregistered below).
//! let (ra, rb) = unsafe { (a.register(MemKind::Dram, &sd)?, b.register(MemKind::Dram, &dd)?) };
//! let peer = a.connect("decode", &b.connection_info()?)?;
//! a.import_remote(peer, MemKind::Dram, &dd, &b.remote_key(rb)?)?;
//! let t = a.prepare(&TransferRequest { op: Op::Write, local_kind: MemKind::Dram, local: DescriptorList::single(sd),
//!     peer, remote_kind: MemKind::Dram, remote: DescriptorList::single(dd) })?;
//! unsafe { a.post(t, &PostOptions::default())? }; // SAFETY: `src` stays registered until Done.
//! while !a.poll(t).is_finished() { a.progress()?; }
//! assert!(matches!(a.poll(t), Status::Done));
//! a.release(t)?; a.deregister(ra)?; b.deregister(rb)?;
//! assert_eq!(dst, src);
//! # Ok::<(), kv_core::Error>(())
//! ```
//!
//! # Same-host peers
//!
//! When a peer's connection info carries this host's identity (kernel boot id and host
//! name) and a probe read of its process succeeds, data does not cross TCP; only
//! notifications use the control connection. A registration inside a shared
//! (memfd-backed) `kv_mem::HostBuffer` is mapped into the importer at `import_remote`
//! and transfers to it are plain memory copies ([`Path::SharedMemory`]); other memory
//! moves with cross-memory attach ([`Path::CrossMemoryAttach`]). Then the bounds check
//! happens on the initiator, against the ranges the target exported with its remote
//! keys; the target's own check applies to TCP requests only. A target's `deregister`
//! tells its same-host importers (a REVOKE frame on their control connection) and
//! returns only once each acknowledged that it refuses new posts to the registration
//! and no copy into it is in flight; a prepared transfer is also refused once an
//! import it names was released. This fences cooperating peers; a malicious same-host
//! peer with ptrace rights can still write anyway. Set `same_host = false` to force TCP.
#![warn(missing_docs)]

mod endpoint;
mod memory;
mod request;
mod server;
mod shm;
mod sys;
pub mod wire;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kv_core::{
    check_request_shape, segments, Backend, Capabilities, Descriptor, EndpointId, Error, MemKind,
    MemKinds, Notification, Params, PostOptions, RegistrationId, RemoteId, Result, Status,
    TransferId, TransferRequest,
};
use parking_lot::{Mutex, RwLock};

use endpoint::{Peer, RemoteHandle};
use memory::find_containing;
use request::{Phase, PlanSeg, Transfer};
use server::Shared;
use wire::{ConnectionInfo, RemoteKey};

/// The backend's name.
pub const NAME: &str = "tcp";

/// How a prepared transfer moves its data ([`TcpBackend::transfer_path`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Path {
    /// Memory copies into/out of the peer's memfd, mapped at `import_remote`.
    SharedMemory,
    /// `process_vm_writev`/`process_vm_readv` into the peer's address space.
    CrossMemoryAttach,
    /// Frames over the TCP data connections.
    Tcp,
}

impl Path {
    /// Short name: `shm`, `cma` or `tcp`.
    pub fn as_str(self) -> &'static str {
        match self {
            Path::SharedMemory => "shm",
            Path::CrossMemoryAttach => "cma",
            Path::Tcp => "tcp",
        }
    }
}

impl std::fmt::Display for Path {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Posts made so far by each [`Path`] ([`TcpBackend::path_counts`]). `Copy`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PathCounts {
    /// Posts over shared memory.
    pub shm: u64,
    /// Posts over cross-memory attach.
    pub cma: u64,
    /// Posts over TCP.
    pub tcp: u64,
}

/// Options of the TCP backend; [`Options::from_params`] reads them from agent
/// parameters (param names in parentheses). `Clone`, `Send + Sync`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Listener address (param `listen`), default `127.0.0.1:0` (loopback, any port).
    pub listen: SocketAddr,
    /// Address published in the connection info (param `advertise`, an IP or
    /// `ip:port`); default: the listener's address, or when it listens on an
    /// unspecified IP (`0.0.0.0`), the IP of the default route (`127.0.0.1` without one).
    pub advertise: Option<String>,
    /// Data connections (and worker threads) per peer (param `connections`), default
    /// `min(available_parallelism, 4)`.
    pub connections: usize,
    /// Use shared memory / cross-memory attach for peers on this host (param
    /// `same_host`), default true.
    pub same_host: bool,
    /// Longest wait for a connection and handshake (param `connect_timeout_ms`), default 5 s.
    pub connect_timeout: Duration,
    /// Longest time a peer may make no progress in a frame before it counts as gone
    /// (param `io_timeout_ms`), default 10 s.
    pub io_timeout: Duration,
    /// Largest notification payload (param `max_notification`), default 64 KiB.
    pub max_notification: usize,
    /// Largest payload of one frame (param `max_frame`), default 4 MiB.
    pub max_frame: usize,
    /// Same-host transfers (shared memory or cross-memory attach) up to this size run
    /// inside `post` instead of on the worker threads (param `inline_max`), default
    /// 4 MiB; larger ones are split over the `connections` worker threads.
    pub inline_max: usize,
    /// Most incoming connections served at once (param `max_connections`), default
    /// 256; more are closed at once with a logged reason. Each peer uses one control
    /// connection plus up to `connections` data connections.
    pub max_connections: usize,
    /// Most received notifications waiting for `drain_notifications` (param
    /// `max_inbox`), default 65 536; a NOTIFY beyond it closes the sender's connection
    /// with a logged reason (the notification is lost).
    pub max_inbox: usize,
    /// Most payload bytes waiting in the notification inbox (param
    /// `max_inbox_bytes`), default 64 MiB; beyond it as for `max_inbox`.
    pub max_inbox_bytes: usize,
}

impl Default for Options {
    fn default() -> Self {
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2);
        Options {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            advertise: None,
            connections: cores.clamp(1, 4),
            same_host: true,
            connect_timeout: Duration::from_secs(5),
            io_timeout: Duration::from_secs(10),
            max_notification: 64 << 10,
            max_frame: 4 << 20,
            inline_max: 4 << 20,
            max_connections: 256,
            max_inbox: 65_536,
            max_inbox_bytes: 64 << 20,
        }
    }
}

impl Options {
    /// Reads the options from agent parameters; unknown keys are refused so typos show.
    pub fn from_params(params: &Params) -> Result<Options> {
        let mut o = Options::default();
        fn num(k: &str, v: &str) -> Result<u64> {
            v.parse().map_err(|_| {
                Error::invalid_argument(format!("tcp option {k}={v:?} is not a number"))
            })
        }
        for (k, v) in params {
            match k.as_str() {
                "listen" => {
                    o.listen = v.parse().map_err(|_| {
                        Error::invalid_argument(format!("tcp option listen={v:?} is not ip:port"))
                    })?
                }
                "advertise" => o.advertise = Some(v.clone()),
                "connections" => o.connections = num(k, v)?.clamp(1, 64) as usize,
                "same_host" => {
                    o.same_host = match v.as_str() {
                        "true" | "1" | "yes" => true,
                        "false" | "0" | "no" => false,
                        _ => {
                            return Err(Error::invalid_argument(format!(
                                "tcp option same_host={v:?} is not a boolean"
                            )))
                        }
                    }
                }
                "connect_timeout_ms" => o.connect_timeout = Duration::from_millis(num(k, v)?),
                "io_timeout_ms" => o.io_timeout = Duration::from_millis(num(k, v)?),
                "max_notification" => {
                    o.max_notification = num(k, v)?.min(wire::MAX_NOTIFY) as usize
                }
                "max_frame" => {
                    o.max_frame = num(k, v)?.clamp(4096, wire::MAX_FRAME_BYTES) as usize
                }
                "inline_max" => o.inline_max = num(k, v)? as usize,
                "max_connections" => o.max_connections = num(k, v)?.max(1) as usize,
                "max_inbox" => o.max_inbox = num(k, v)?.max(1) as usize,
                "max_inbox_bytes" => o.max_inbox_bytes = num(k, v)? as usize,
                _ => {
                    return Err(Error::invalid_argument(format!(
                        "unknown tcp option {k:?} (known: listen, connections, same_host, \
                         connect_timeout_ms, io_timeout_ms, max_notification, max_frame, inline_max, \
                         max_connections, max_inbox, max_inbox_bytes)"
                    )))
                }
            }
        }
        Ok(o)
    }
}

/// Creates the backend for the agent named `agent_name` with [`Options::from_params`].
pub fn create(agent_name: &str, params: &Params) -> Result<Arc<dyn Backend>> {
    Ok(Arc::new(TcpBackend::new(
        agent_name,
        Options::from_params(params)?,
    )?))
}

/// The address peers should connect to (see [`Options::advertise`]).
fn advertise(opts: &Options, bound: SocketAddr) -> Result<SocketAddr> {
    if let Some(a) = &opts.advertise {
        if let Ok(sa) = a.parse::<SocketAddr>() {
            return Ok(sa);
        }
        let ip: std::net::IpAddr = a.parse().map_err(|_| {
            Error::invalid_argument(format!(
                "tcp option advertise={a:?} is not an IP or ip:port"
            ))
        })?;
        return Ok(SocketAddr::new(ip, bound.port()));
    }
    if !bound.ip().is_unspecified() {
        return Ok(bound);
    }
    // The source address of the default route; connecting a UDP socket sends nothing.
    let ip = std::net::UdpSocket::bind("0.0.0.0:0")
        .and_then(|s| s.connect("192.0.2.1:9").map(|_| s))
        .and_then(|s| s.local_addr())
        .map(|a| a.ip())
        .unwrap_or(std::net::IpAddr::from([127, 0, 0, 1]));
    Ok(SocketAddr::new(ip, bound.port()))
}

struct Remote {
    peer: u64,
    desc: Descriptor,
    key: u64,
    /// The peer's registration mapped here (shared-memory path), if it could be.
    shm: Option<Arc<shm::Import>>,
    /// Released/revoked flags and in-flight count, shared with prepared transfers.
    handle: Arc<RemoteHandle>,
}

/// The TCP / shared-memory / cross-memory-attach backend. `Send + Sync`: tables sit behind locks and
/// the I/O runs on its own threads. Dropping it stops its threads and closes its
/// connections (peers then see `RemoteDisconnected`).
pub struct TcpBackend {
    agent: String,
    opts: Options,
    shared: Arc<Shared>,
    addr: SocketAddr,
    advertised: SocketAddr,
    listener: Mutex<Option<JoinHandle<()>>>,
    /// Holds the instance id for same-host peers' probe reads (stable address).
    probe: Box<u64>,
    peers: RwLock<HashMap<u64, Arc<Peer>>>,
    remotes: RwLock<HashMap<u64, Remote>>,
    transfers: RwLock<HashMap<u64, Arc<Transfer>>>,
    next_id: AtomicU64,
    completions: Arc<AtomicUsize>,
    /// Posts by path: shared memory, cross-memory attach, TCP.
    posts: [AtomicU64; 3],
}

impl std::fmt::Debug for TcpBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpBackend")
            .field("agent", &self.agent)
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl TcpBackend {
    /// Starts the listener and returns the backend.
    pub fn new(agent_name: &str, opts: Options) -> Result<TcpBackend> {
        let instance = memory::random_u64() | 1;
        let shared = Arc::new(Shared::new(instance, opts.clone()));
        let (addr, listener) = server::start(shared.clone())?;
        let advertised = match advertise(&opts, addr) {
            Ok(a) => a,
            Err(e) => {
                shared.stop(Some(listener));
                return Err(e);
            }
        };
        Ok(TcpBackend {
            agent: agent_name.to_string(),
            opts,
            shared,
            addr,
            advertised,
            listener: Mutex::new(Some(listener)),
            probe: Box::new(instance),
            peers: RwLock::new(HashMap::new()),
            remotes: RwLock::new(HashMap::new()),
            transfers: RwLock::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            completions: Arc::new(AtomicUsize::new(0)),
            posts: Default::default(),
        })
    }

    /// The address the listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// True when `peer` is on this host and reachable without TCP: transfers to it use
    /// shared memory (registrations mapped at import) or cross-memory attach (see
    /// [`TcpBackend::transfer_path`]).
    pub fn uses_cma(&self, peer: EndpointId) -> Result<bool> {
        Ok(self.peer(peer)?.core.cma)
    }

    /// How the prepared transfer `id` moves its data: shared memory when every remote
    /// range lies in a registration mapped at import, else cross-memory attach for a
    /// same-host peer, else TCP.
    pub fn transfer_path(&self, id: TransferId) -> Result<Path> {
        Ok(self.transfer(id)?.plan.path)
    }

    /// How many posts went each way so far.
    pub fn path_counts(&self) -> PathCounts {
        let n = |i: usize| self.posts[i].load(Ordering::Relaxed);
        PathCounts {
            shm: n(0),
            cma: n(1),
            tcp: n(2),
        }
    }

    /// True when the imported remote registration `id` is mapped here, so transfers
    /// to it can use [`Path::SharedMemory`].
    pub fn remote_is_mapped(&self, id: RemoteId) -> Result<bool> {
        self.remotes
            .read()
            .get(&id.0)
            .map(|r| r.shm.is_some())
            .ok_or_else(|| Error::NotRegistered(format!("{id}")))
    }

    fn id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    fn peer(&self, id: EndpointId) -> Result<Arc<Peer>> {
        self.peers
            .read()
            .get(&id.0)
            .cloned()
            .ok_or_else(|| Error::NotRegistered(format!("{id}")))
    }

    fn transfer(&self, id: TransferId) -> Result<Arc<Transfer>> {
        self.transfers
            .read()
            .get(&id.0)
            .cloned()
            .ok_or_else(|| Error::NotRegistered(format!("{id}")))
    }

    /// Maps the peer registration `k` names (shared-memory path), reusing the mapping
    /// of an earlier import of the same registration. Logs why when it cannot.
    fn map_remote(&self, peer: EndpointId, p: &Peer, k: &RemoteKey) -> Option<Arc<shm::Import>> {
        let reg = Descriptor::new(k.addr, k.len, 0);
        if let Some(m) = self.remotes.read().values().find_map(|r| {
            r.shm
                .as_ref()
                .filter(|m| r.peer == peer.0 && r.key == k.key && *m.reg() == reg)
                .cloned()
        }) {
            return Some(m);
        }
        match shm::Import::open(p.core.info.pid, k) {
            Ok(m) => Some(Arc::new(m)),
            Err(why) => {
                tracing::info!(
                    "peer {}: registration {:#x}+{} is memfd-backed but not mapped ({why}); using cross-memory attach",
                    p.core.name,
                    k.addr,
                    k.len
                );
                None
            }
        }
    }

    /// How long `deregister` waits for same-host importers' acknowledgements and
    /// requests being served (each served request has an absolute `io_timeout` limit
    /// and stops within a tick of the revoke).
    fn deregister_wait(&self) -> Duration {
        self.opts.io_timeout + Duration::from_millis(100)
    }

    /// Marks an import released and forgets it in its peer.
    fn forget_remote(&self, r: &Remote) {
        r.handle.release();
        if let Some(p) = self.peers.read().get(&r.peer) {
            p.core.imports.lock().retain(|h| !Arc::ptr_eq(h, &r.handle));
        }
    }
}

impl Drop for TcpBackend {
    fn drop(&mut self) {
        // Fail and stop in-flight transfers before the threads go, so no thread touches
        // registered memory after drop returns.
        let peers: Vec<_> = self.peers.write().drain().map(|(_, p)| p).collect();
        for p in &peers {
            p.close();
        }
        self.shared.stop(self.listener.lock().take());
    }
}

// `register` and `post` are unsafe only because the trait says so; the raw-address I/O
// they enable lives in `sys` and the lanes, each with its own SAFETY comment.
impl Backend for TcpBackend {
    fn name(&self) -> &str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            local: true,
            remote: true,
            notifications: true,
            write: true,
            read: true,
            mem_kinds: MemKinds::of(&[MemKind::Dram]),
        }
    }

    unsafe fn register(&self, kind: MemKind, desc: &Descriptor) -> Result<RegistrationId> {
        if kind != MemKind::Dram {
            return Err(Error::Unsupported(format!(
                "tcp registers dram, not {kind}"
            )));
        }
        self.shared.regs.register(*desc)
    }

    fn deregister(&self, id: RegistrationId) -> Result<()> {
        // Revoke first (peers' requests refused, served ones stop at their next read,
        // same-host importers told and acknowledging once their copies into it
        // finished); unlink only when nothing touches the memory any more.
        let reg = self.shared.regs.revoke(id)?;
        let until = Instant::now() + self.deregister_wait();
        let acked = self.shared.revoke_importers(reg.key, until);
        let served = memory::Registry::wait_served(&reg, until);
        if !(acked && served) {
            let who = if acked {
                "a peer request is still being served from it"
            } else {
                "a same-host peer did not acknowledge the revocation"
            };
            tracing::error!(
                "deregistering {id}: {who} after {:?}",
                self.deregister_wait()
            );
            return Err(Error::Busy(format!(
                "{id}: {who}; it stays registered (refusing new requests): keep the memory \
                 and retry deregister"
            )));
        }
        self.shared.regs.unlink(&reg);
        Ok(())
    }

    fn remote_key(&self, id: RegistrationId) -> Result<Bytes> {
        let r = self.shared.regs.get(id)?;
        Ok(RemoteKey {
            key: r.key,
            addr: r.desc.addr,
            len: r.desc.len,
            shared: r.shared.as_ref().map(|e| e.key()),
        }
        .encode())
    }

    fn connection_info(&self) -> Result<Bytes> {
        ConnectionInfo {
            agent: self.agent.clone(),
            addr: self.advertised.to_string(),
            host: sys::host_identity(),
            pid: std::process::id(),
            instance: self.shared.instance,
            probe_addr: &*self.probe as *const u64 as usize as u64,
        }
        .encode()
    }

    fn connect(&self, peer_name: &str, info: &[u8]) -> Result<EndpointId> {
        let info = ConnectionInfo::decode(info)?;
        let peer = Peer::connect(
            peer_name,
            info,
            &self.agent,
            &self.opts,
            self.completions.clone(),
        )?;
        tracing::debug!(
            "connected to {peer_name} at {} ({})",
            peer.core.addr,
            if peer.core.cma {
                "cross-memory attach"
            } else {
                "tcp"
            }
        );
        let id = self.id();
        self.peers.write().insert(id, peer);
        Ok(EndpointId(id))
    }

    fn disconnect(&self, peer: EndpointId) -> Result<()> {
        let p = self
            .peers
            .write()
            .remove(&peer.0)
            .ok_or_else(|| Error::NotRegistered(format!("{peer}")))?;
        p.close();
        self.remotes.write().retain(|_, r| {
            if r.peer == peer.0 {
                r.handle.release();
            }
            r.peer != peer.0
        });
        Ok(())
    }

    fn import_remote(
        &self,
        peer: EndpointId,
        kind: MemKind,
        desc: &Descriptor,
        key: &[u8],
    ) -> Result<RemoteId> {
        if kind != MemKind::Dram {
            return Err(Error::Unsupported(format!(
                "tcp addresses dram, not {kind}"
            )));
        }
        let k = RemoteKey::decode(key)?;
        let p = self.peer(peer)?;
        let exported = Descriptor::new(k.addr, k.len, desc.device);
        if !exported.contains(desc) {
            return Err(Error::OutOfBounds(format!(
                "{:#x}+{} is not inside the registration {:#x}+{} its key names",
                desc.addr, desc.len, k.addr, k.len
            )));
        }
        let shm = if p.core.cma && k.shared.is_some() {
            self.map_remote(peer, &p, &k)
        } else {
            None
        };
        let id = self.id();
        let handle = Arc::new(RemoteHandle::new(id, k.key));
        p.core.imports.lock().push(handle.clone());
        self.remotes.write().insert(
            id,
            Remote {
                peer: peer.0,
                desc: *desc,
                key: k.key,
                shm,
                handle,
            },
        );
        Ok(RemoteId(id))
    }

    fn release_remote(&self, id: RemoteId) -> Result<()> {
        // Dropping the import unmaps the peer's memory once no prepared transfer holds
        // the mapping any more.
        // Prepared transfers naming it are refused from now on.
        let r = self
            .remotes
            .write()
            .remove(&id.0)
            .ok_or_else(|| Error::NotRegistered(format!("{id}")))?;
        self.forget_remote(&r);
        Ok(())
    }

    fn prepare(&self, req: &TransferRequest) -> Result<TransferId> {
        check_request_shape(req)?;
        if req.local_kind != MemKind::Dram || req.remote_kind != MemKind::Dram {
            return Err(Error::Unsupported("tcp moves dram only".into()));
        }
        let peer = self.peer(req.peer)?;
        type Imported = (Descriptor, u64, Option<Arc<shm::Import>>, Arc<RemoteHandle>);
        let (mut imports, dead): (Vec<Imported>, Vec<Imported>) = self
            .remotes
            .read()
            .values()
            .filter(|r| r.peer == req.peer.0)
            .map(|r| (r.desc, r.key, r.shm.clone(), r.handle.clone()))
            // A revoked import may still cover the range (its memory was freed and the
            // address reused by a newer registration): only live imports count.
            .partition(|(_, _, _, h)| h.usable());
        if !dead.is_empty() {
            let live: Vec<Descriptor> = imports.iter().map(|(d, _, _, _)| *d).collect();
            let all: Vec<Descriptor> = live
                .iter()
                .chain(dead.iter().map(|(d, _, _, _)| d))
                .copied()
                .collect();
            if !req.remote.within(&live) && req.remote.within(&all) {
                // Covered only by imports that were revoked or released: say why.
                if peer.core.peer_gone() {
                    return Err(Error::RemoteDisconnected {
                        peer: peer.core.name.clone(),
                        reason:
                            "the peer closed its control connection; its registrations were revoked"
                                .into(),
                    });
                }
                return Err(Error::NotRegistered(
                    "the remote registration was revoked by the peer (deregistered) or released; import it again".into(),
                ));
            }
        }
        imports.sort_by_key(|(d, _, _, _)| d.addr);
        let local = self.shared.regs.snapshot();
        let descs: Vec<Descriptor> = imports.iter().map(|(d, _, _, _)| *d).collect();
        let mut handles: Vec<Arc<RemoteHandle>> = Vec::new();
        // The shared-memory path needs every remote range in a mapped registration.
        let mut maps: Vec<Arc<shm::Import>> = Vec::new();
        let mut all_mapped = peer.core.cma;
        if !req.remote.within(&descs) {
            return Err(Error::OutOfBounds(
                "a remote descriptor lies outside what the peer registered".into(),
            ));
        }
        let mut segs: Vec<PlanSeg> = Vec::new();
        let mut regs: Vec<Arc<memory::LocalReg>> = Vec::new();
        for s in segments(&req.local, &req.remote)? {
            let reg = find_containing(&local, &s.local).ok_or_else(|| {
                Error::NotRegistered(format!(
                    "local range {:#x}+{} lies outside every local registration",
                    s.local.addr, s.local.len
                ))
            })?;
            if !regs.iter().any(|r| Arc::ptr_eq(r, reg)) {
                regs.push(reg.clone());
            }
            let end = imports.partition_point(|(d, _, _, _)| d.addr <= s.remote.addr);
            let (_, key, map, handle) = imports[..end]
                .iter()
                .rev()
                .find(|(d, _, _, _)| d.contains(&s.remote))
                .ok_or_else(|| {
                    Error::OutOfBounds(format!(
                        "remote range {:#x}+{} lies outside what the peer registered",
                        s.remote.addr, s.remote.len
                    ))
                })?;
            let key = *key;
            if !handles.iter().any(|h| Arc::ptr_eq(h, handle)) {
                handles.push(handle.clone());
            }
            match map {
                Some(m) if all_mapped => {
                    if !maps.iter().any(|x| Arc::ptr_eq(x, m)) {
                        maps.push(m.clone());
                    }
                }
                _ => all_mapped = false,
            }
            match segs.last_mut() {
                Some(p)
                    if p.key == key
                        && p.local + p.len == s.local.addr
                        && p.remote + p.len == s.remote.addr =>
                {
                    p.len += s.local.len
                }
                _ => segs.push(PlanSeg {
                    local: s.local.addr,
                    key,
                    remote: s.remote.addr,
                    len: s.local.len,
                }),
            }
        }
        let path = if all_mapped && !segs.is_empty() {
            // Address the peer's memory through our mappings. Merged segments share a
            // key, so each lies in one registration (the one its key names).
            for s in &mut segs {
                s.remote = maps
                    .iter()
                    .find_map(|m| m.translate(s.remote, s.len))
                    .ok_or_else(|| {
                        Error::OutOfBounds(format!(
                            "remote range {:#x}+{} is not inside a mapped registration",
                            s.remote, s.len
                        ))
                    })?;
            }
            Path::SharedMemory
        } else if peer.core.cma {
            maps.clear();
            Path::CrossMemoryAttach
        } else {
            maps.clear();
            Path::Tcp
        };
        let id = self.id();
        let plan = request::Plan::build(
            id,
            req.op,
            segs,
            regs,
            peer.nlanes,
            self.opts.max_frame as u64,
            path,
            maps,
            handles,
        );
        self.transfers
            .write()
            .insert(id, Arc::new(Transfer::new(id, plan, peer)));
        Ok(TransferId(id))
    }

    unsafe fn post(&self, id: TransferId, opts: &PostOptions) -> Result<()> {
        let t = self.transfer(id)?;
        if let Some(n) = &opts.notification {
            if n.len() > self.opts.max_notification {
                return Err(Error::invalid_argument(format!(
                    "notification of {} bytes exceeds max_notification = {}",
                    n.len(),
                    self.opts.max_notification
                )));
            }
        }
        let peer = t.peer.clone();
        let path = t.plan.path;
        if path != Path::Tcp {
            // Data does not cross the control connection, so check that the peer is
            // still there before writing into its memory (checked again after the
            // copies on the shared-memory path, which cannot fail by themselves).
            peer.core.check_alive()?;
        }
        if opts.deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(Error::TimedOut {
                what: format!("tcp {} {id}", t.plan.op),
                after: Duration::ZERO,
            });
        }
        {
            let mut s = t.state.lock();
            if matches!(s.phase, Phase::Running | Phase::Flushing | Phase::Notifying) {
                return Err(Error::Busy(format!("{id} is already in progress")));
            }
            self.shared.regs.pin(&t.plan.local_regs)?;
            // Refused once an import it addresses was released or revoked by the peer.
            if let Err(e) = RemoteHandle::enter_all(&t.plan.remotes) {
                memory::Registry::unpin(&t.plan.local_regs);
                return Err(e);
            }
            s.phase = Phase::Running;
            s.status = Status::InProgress;
            s.error = None;
            s.notification = opts.notification.clone();
            s.deadline = opts.deadline;
            t.cancel.store(false, Ordering::Release);
            t.pending.store(t.plan.lanes, Ordering::Release);
        }
        // Taken outside the state lock: the sequencer locks transfer states while it
        // holds its own lock.
        t.seq.store(peer.next_seq(), Ordering::Release);
        self.posts[match path {
            Path::SharedMemory => 0,
            Path::CrossMemoryAttach => 1,
            Path::Tcp => 2,
        }]
        .fetch_add(1, Ordering::Relaxed);
        if path != Path::Tcp && t.plan.total <= self.opts.inline_max as u64 {
            t.pending.store(1, Ordering::Release);
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| peer.run_inline(&t)))
                .unwrap_or_else(|_| Err(endpoint::lane_panicked()));
            t.lane_done(r);
        } else {
            peer.dispatch(&t);
        }
        Ok(())
    }

    fn poll(&self, id: TransferId) -> Status {
        match self.transfer(id) {
            Ok(t) => t.status(),
            Err(e) => Status::Failed(e),
        }
    }

    fn cancel(&self, id: TransferId) -> Result<()> {
        // Lanes notice the flag within a tick; their I/O is bounded by io_timeout.
        self.transfer(id)?
            .cancel(self.opts.io_timeout + Duration::from_secs(1))
    }

    fn release(&self, id: TransferId) -> Result<()> {
        let mut t = self.transfers.write();
        match t.get(&id.0) {
            None => Err(Error::NotRegistered(format!("{id}"))),
            Some(x)
                if matches!(
                    x.state.lock().phase,
                    Phase::Running | Phase::Flushing | Phase::Notifying
                ) =>
            {
                Err(Error::Busy(format!("{id} is in progress; cancel it first")))
            }
            Some(_) => {
                t.remove(&id.0);
                Ok(())
            }
        }
    }

    fn progress(&self) -> Result<usize> {
        Ok(self.completions.swap(0, Ordering::Relaxed))
    }

    fn notify(&self, peer: EndpointId, payload: Bytes) -> Result<()> {
        if payload.len() > self.opts.max_notification {
            return Err(Error::invalid_argument(format!(
                "notification of {} bytes exceeds max_notification = {}",
                payload.len(),
                self.opts.max_notification
            )));
        }
        self.peer(peer)?.notify(payload)
    }

    fn drain_notifications(&self, out: &mut Vec<Notification>) -> Result<usize> {
        Ok(self.shared.inbox.lock().drain_into(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_from_params() {
        let p = Params::from([
            ("connections".to_string(), "3".to_string()),
            ("same_host".to_string(), "false".to_string()),
            ("listen".to_string(), "127.0.0.1:0".to_string()),
        ]);
        let o = Options::from_params(&p).unwrap();
        assert_eq!((o.connections, o.same_host), (3, false));
        assert!(Options::from_params(&Params::from([("conections".into(), "3".into())])).is_err());
        assert!(
            Options::from_params(&Params::from([("same_host".into(), "maybe".into())])).is_err()
        );
        assert!(Options::default().connections >= 1);
    }

    #[test]
    fn advertised_address_is_connectable() {
        let any = SocketAddr::from(([0, 0, 0, 0], 4000));
        assert!(!advertise(&Options::default(), any)
            .unwrap()
            .ip()
            .is_unspecified());
        let o = Options {
            advertise: Some("10.1.2.3".into()),
            ..Options::default()
        };
        assert_eq!(
            advertise(&o, any).unwrap(),
            "10.1.2.3:4000".parse().unwrap()
        );
        let lo = SocketAddr::from(([127, 0, 0, 1], 5000));
        assert_eq!(advertise(&Options::default(), lo).unwrap(), lo);
    }

    /// Review defect 5: a lane that wedged (or panicked) left `cancel` waiting forever.
    #[test]
    fn cancel_of_a_wedged_transfer_is_bounded() {
        let o = Options {
            same_host: false,
            io_timeout: Duration::from_millis(200),
            ..Options::default()
        };
        let a = Arc::new(TcpBackend::new("a", o.clone()).unwrap());
        let b = TcpBackend::new("b", o).unwrap();
        let (l, r) = (vec![1u8; 4096], vec![0u8; 4096]);
        let (ld, rd) = (
            Descriptor::new(l.as_ptr() as u64, 4096, 0),
            Descriptor::new(r.as_ptr() as u64, 4096, 0),
        );
        // SAFETY: the vectors outlive both backends (dropped at the end).
        let (_la, rb) = unsafe {
            (
                a.register(MemKind::Dram, &ld).unwrap(),
                b.register(MemKind::Dram, &rd).unwrap(),
            )
        };
        let peer = a.connect("b", &b.connection_info().unwrap()).unwrap();
        a.import_remote(peer, MemKind::Dram, &rd, &b.remote_key(rb).unwrap())
            .unwrap();
        let id = a
            .prepare(&TransferRequest {
                op: kv_core::Op::Write,
                local_kind: MemKind::Dram,
                local: kv_core::DescriptorList::single(ld),
                peer,
                remote_kind: MemKind::Dram,
                remote: kv_core::DescriptorList::single(rd),
            })
            .unwrap();
        // A post whose only lane never reports back.
        let t = a.transfer(id).unwrap();
        a.shared.regs.pin(&t.plan.local_regs).unwrap();
        RemoteHandle::enter_all(&t.plan.remotes).unwrap();
        t.pending.store(1, Ordering::Release);
        t.state.lock().phase = Phase::Running;
        let (tx, rx) = std::sync::mpsc::channel();
        let a2 = a.clone();
        std::thread::spawn(move || tx.send(a2.cancel(id)));
        let start = Instant::now();
        let got = rx.recv_timeout(Duration::from_secs(5));
        assert!(matches!(got, Ok(Err(Error::Busy(_)))), "{got:?}");
        assert!(start.elapsed() < Duration::from_secs(3));
        // The memory stays pinned: deregister refuses.
        assert!(matches!(a.deregister(_la), Err(Error::Busy(_))));
        // The lane lets go at last: the post finishes, canceled or done.
        t.lane_done(Ok(()));
        let st = a.poll(id);
        assert!(
            matches!(st, Status::Done | Status::Failed(Error::Canceled)),
            "{st:?}"
        );
        drop((a, b));
        drop((l, r));
    }

    #[test]
    fn backend_is_send_sync() {
        fn check<T: Send + Sync>() {}
        check::<TcpBackend>();
        check::<Options>();
    }
}
