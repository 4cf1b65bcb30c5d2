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
//! use kv_core::{Access, Backend, BackendInit, Descriptor, DescriptorList, MemKind, Op, Params, PostOptions, Status, TransferRequest};
//! let params = Params::from([("same_host".to_string(), "false".to_string())]);
//! let create = |name| kv_backend_tcp::create(&BackendInit::new(name), &params);
//! let (a, b) = (create("prefill")?, create("decode")?);
//! let (src, mut dst) = (vec![7u8; 4096], vec![0u8; 4096]);
//! let (sd, dd) = (Descriptor::new(src.as_ptr() as u64, 4096, 0), Descriptor::new(dst.as_mut_ptr() as u64, 4096, 0));
//! // SAFETY: both buffers outlive their registrations (deregistered below).
//! let rw = Access::ReadWrite;
//! let (ra, rb) = unsafe { (a.register(MemKind::Dram, &sd, rw)?, b.register(MemKind::Dram, &dd, rw)?) };
//! let peer = a.connect("decode", &b.connection_info()?)?;
//! a.import_remote(peer, MemKind::Dram, &dd, &b.remote_key(rb)?)?;
//! let t = a.prepare(&TransferRequest { op: Op::Write, local_kind: MemKind::Dram, local: DescriptorList::single(sd)?,
//!     peer, remote_kind: MemKind::Dram, remote: DescriptorList::single(dd)? })?;
//! unsafe { a.post(t, &PostOptions::default())? }; // SAFETY: `src` stays registered until Done.
//! while !a.poll(t).is_finished() { a.progress()?; }
//! assert!(matches!(a.poll(t), Status::Done));
//! a.release(t)?; a.deregister(ra)?; b.deregister(rb)?;
//! assert_eq!(dst, src);
//! # Ok::<(), kv_core::Error>(())
//! ```
//!
//! # Trust
//!
//! With a cluster secret ([`BackendInit::secret`]) every connection is authenticated
//! with the `kv_core::auth` handshake and every frame's header carries a tag with its
//! sequence number; remote keys are 128 random bits; the target checks every TCP
//! request against its live registrations, and refuses WRITEs into read-only ones.
//! Without a secret the backend starts only with `insecure=true`, or on a loopback
//! listener (logged). The crate README ("Trust") says what a network attacker can and
//! cannot do.
//!
//! # Same-host peers
//!
//! When a peer's connection info carries this host's identity (kernel boot id and host
//! name), its control connection goes to its abstract Unix socket, and the kernel names
//! its process (`SO_PEERCRED`) — only that pid is used. Then data does not cross TCP: a
//! registration inside a shared (memfd-backed) `kv_mem::HostBuffer` is mapped into the
//! importer at `import_remote` (read-only for a read-only registration) and transfers
//! to it are plain memory copies ([`Path::SharedMemory`]); other memory moves with
//! cross-memory attach ([`Path::CrossMemoryAttach`]). Every such import is validated
//! live with the target (check-and-subscribe), and a target's `deregister` returns only
//! once each subscribed importer acknowledged its REVOKE (no copy into the range runs,
//! new posts are refused), reconnected holding nothing, or exited; an unreachable one
//! makes it `Busy`. A lost control connection is re-established and the imports
//! re-validated. This fences cooperating peers; a same-host peer with ptrace rights
//! over this process can write its memory anyway. Set `same_host = false` to force TCP.
#![warn(missing_docs)]

// Rooms; each imports only rooms below it in the README's map.
mod channel;
mod control;
mod endpoint;
mod importers;
mod keys;
mod lists;
mod memory;
mod options;
mod os;
mod remote;
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
use kv_core::lists::ListTable;
use kv_core::{
    check_request_shape, Access, Backend, BackendInit, Capabilities, Descriptor, DescriptorList,
    EndpointId, Error, ListId, ListSide, MemKind, MemKinds, Notification, Op, Params, PostOptions,
    RegistrationId, RemoteId, Result, SelectRequest, Status, TransferId, TransferRequest,
};
use parking_lot::{Mutex, RwLock};

use control::Reach;
use endpoint::{Peer, Transfer};
use lists::TcpList;
use remote::{Imports, Remote, RemoteHandle};
use request::{Phase, PostCounts, Route};
use server::Shared;
use wire::{ConnectionInfo, RemoteKey};

pub use options::Options;
pub use request::{Path, PathCounts};

/// The backend's name.
pub const NAME: &str = "tcp";

/// Creates the backend for the agent `init` names with [`Options::from_params`].
pub fn create(init: &BackendInit, params: &Params) -> Result<Arc<dyn Backend>> {
    Ok(Arc::new(TcpBackend::new(
        init,
        Options::from_params(params)?,
    )?))
}

/// The TCP / shared-memory / cross-memory-attach backend. `Send + Sync`: tables sit behind locks and
/// the I/O runs on its own threads. Dropping it stops its threads and closes its
/// connections (peers then see `RemoteDisconnected`).
pub struct TcpBackend {
    /// The agent name, cluster secret and bind address it was created with.
    init: BackendInit,
    opts: Options,
    shared: Arc<Shared>,
    addr: SocketAddr,
    advertised: SocketAddr,
    /// The abstract Unix socket same-host peers connect to (empty: none).
    local: String,
    listener: Mutex<Option<JoinHandle<()>>>,
    /// Holds the instance id for same-host peers' probe reads (stable address).
    probe: Box<u64>,
    peers: RwLock<HashMap<u64, Arc<Peer>>>,
    /// Endpoint ids are counted apart: an id below this that is not in `peers` was
    /// disconnected (`RemoteDisconnected`), never issued otherwise.
    next_peer: AtomicU64,
    remotes: Imports,
    transfers: RwLock<HashMap<u64, Arc<Transfer>>>,
    /// Prepared lists, items resolved to their registrations or imports.
    lists: ListTable<TcpList>,
    next_id: AtomicU64,
    completions: Arc<AtomicUsize>,
    /// Posts by path.
    posts: PostCounts,
}

impl std::fmt::Debug for TcpBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpBackend")
            .field("agent", &self.init.agent_name)
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl TcpBackend {
    /// Starts the listeners and returns the backend. Without a cluster secret in
    /// `init` it starts only as [`Options::insecure`] allows.
    pub fn new(init: &BackendInit, opts: Options) -> Result<TcpBackend> {
        let instance = u64::try_from(kv_core::auth::random_u128()? >> 64).unwrap_or(1) | 1;
        let listen = options::listen_addr(&opts, init);
        let secret = if options::authenticates(&opts, init, listen)? {
            init.secret.clone()
        } else {
            None
        };
        let shared = Arc::new(Shared::new(instance, opts.clone(), secret));
        let (addr, local, listener) = server::start(shared.clone(), listen)?;
        let advertised = match options::advertise(&opts, addr) {
            Ok(a) => a,
            Err(e) => {
                shared.stop(Some(listener));
                return Err(e);
            }
        };
        Ok(TcpBackend {
            init: init.clone(),
            opts,
            shared,
            addr,
            advertised,
            local,
            listener: Mutex::new(Some(listener)),
            probe: Box::new(instance),
            peers: RwLock::new(HashMap::new()),
            next_peer: AtomicU64::new(1),
            remotes: Imports::default(),
            transfers: RwLock::new(HashMap::new()),
            lists: ListTable::new(),
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
        self.posts.get()
    }

    /// How many times the control connection to `peer` was re-established after it
    /// broke (then, for a same-host peer, every import is re-validated with it).
    pub fn control_reconnects(&self, peer: EndpointId) -> Result<u64> {
        Ok(self.peer(peer)?.core.reconnects.load(Ordering::Relaxed))
    }

    /// True when the imported remote registration `id` is mapped here, so transfers
    /// to it can use [`Path::SharedMemory`].
    pub fn remote_is_mapped(&self, id: RemoteId) -> Result<bool> {
        self.remotes.is_mapped(id)
    }

    fn id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Re-validates imports from a same-host peer that a lost control connection
    /// suspended (before a transfer to it is prepared).
    fn recover_imports(&self, ep: EndpointId, peer: &Peer) -> Result<()> {
        if peer.core.cma {
            let pending = self.remotes.pending(ep.0);
            peer.core
                .recover(&pending, Instant::now() + self.opts.connect_timeout)?;
        }
        Ok(())
    }

    /// Plans `route` and keeps it as a prepared transfer to `peer`.
    fn keep(&self, op: Op, route: Route, peer: Arc<Peer>) -> TransferId {
        let id = self.id();
        let plan = request::Plan::build(
            id,
            op,
            route.segs,
            route.regs,
            peer.nlanes,
            self.opts.max_frame as u64,
            route.path,
            route.maps,
            route.remotes,
            route.keys,
        );
        self.transfers
            .write()
            .insert(id, Arc::new(Transfer::new(id, plan, peer)));
        TransferId(id)
    }

    fn peer(&self, id: EndpointId) -> Result<Arc<Peer>> {
        match self.peers.read().get(&id.0) {
            Some(p) if p.core.closed.load(Ordering::Acquire) => Err(p.core.gone("disconnected")),
            Some(p) => Ok(p.clone()),
            None if id.0 > 0 && id.0 < self.next_peer.load(Ordering::Acquire) => {
                Err(Error::RemoteDisconnected {
                    peer: format!("{id}"),
                    reason: "disconnected".into(),
                })
            }
            None => Err(Error::NotRegistered(format!("{id}"))),
        }
    }

    fn transfer(&self, id: TransferId) -> Result<Arc<Transfer>> {
        self.transfers
            .read()
            .get(&id.0)
            .cloned()
            .ok_or_else(|| Error::NotRegistered(format!("{id}")))
    }

    /// Refuses a notification longer than `max_notification`.
    fn check_notification(&self, len: usize) -> Result<()> {
        if len > self.opts.max_notification {
            return Err(Error::invalid_argument(format!(
                "notification of {} bytes exceeds max_notification = {}",
                len, self.opts.max_notification
            )));
        }
        Ok(())
    }

    /// Marks an import released and forgets it in its peer.
    fn forget_remote(&self, r: &Remote) {
        r.handle.release();
        if let Some(p) = self.peers.read().get(&r.peer) {
            p.core.forget(&r.handle);
        }
    }

    /// A same-host import: validated live with the target (check-and-subscribe) and
    /// mapped, as the target describes it now, when it lies in a sealed memfd.
    fn import_same_host(
        &self,
        p: &Peer,
        peer: u64,
        desc: &Descriptor,
        k: &RemoteKey,
    ) -> Result<u64> {
        let id = self.id();
        let handle = Arc::new(RemoteHandle::pending(id, k.key, *desc));
        let live = p.core.validate(&handle)?;
        let mapped = if (live.addr, live.len) != (k.addr, k.len) {
            Err(Error::invalid_metadata(
                "the remote key describes another range than its registration",
            ))
        } else if live.shared.is_some() {
            match p.core.process() {
                Some(proc) => self.remotes.map(peer, proc, &p.core.name, &live),
                None => Ok(None),
            }
        } else {
            Ok(None)
        };
        match mapped {
            Ok(shm) => {
                self.remotes.insert(id, peer, *desc, k.key, shm, handle);
                Ok(id)
            }
            Err(e) => {
                handle.release();
                p.core.forget(&handle);
                Err(e)
            }
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
        let mut c = Capabilities::default();
        c.local = true;
        c.remote = true;
        c.notifications = true;
        c.write = true;
        c.read = true;
        c.mem_kinds = MemKinds::of(&[MemKind::Dram]);
        // The listener and lanes serve peers on their own threads
        // (needs_target_progress false). Authenticated when it has a cluster secret.
        c.authenticated = self.shared.secret.is_some();
        c.read_only = true;
        c
    }

    unsafe fn register(
        &self,
        kind: MemKind,
        desc: &Descriptor,
        access: Access,
    ) -> Result<RegistrationId> {
        if kind != MemKind::Dram {
            return Err(Error::Unsupported(format!(
                "tcp registers dram, not {kind}"
            )));
        }
        self.shared.regs.register(*desc, access)
    }

    fn deregister(&self, id: RegistrationId) -> Result<()> {
        self.shared.deregister(id)
    }

    fn remote_key(&self, id: RegistrationId) -> Result<Bytes> {
        Ok(self.shared.regs.get(id)?.remote_key().encode())
    }

    fn connection_info(&self) -> Result<Bytes> {
        ConnectionInfo {
            agent: self.init.agent_name.clone(),
            addr: self.advertised.to_string(),
            host: os::host_identity(),
            local: self.local.clone(),
            pid: std::process::id(),
            instance: self.shared.instance,
            probe_addr: &*self.probe as *const u64 as usize as u64,
        }
        .encode()
    }

    fn connect(&self, peer_name: &str, info: &[u8]) -> Result<EndpointId> {
        let info = ConnectionInfo::decode(info)?;
        let peer = Peer::connect(
            Reach {
                name: peer_name,
                info,
                local_name: &self.init.agent_name,
                opts: &self.opts,
                secret: self.shared.secret.as_ref(),
            },
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
        let id = self.next_peer.fetch_add(1, Ordering::AcqRel);
        self.peers.write().insert(id, peer);
        Ok(EndpointId(id))
    }

    fn disconnect(&self, peer: EndpointId) -> Result<()> {
        let p = self.peers.write().remove(&peer.0);
        let p = match p {
            Some(p) => p,
            None => return self.peer(peer).map(|_| ()),
        };
        p.close();
        self.remotes.remove_peer(peer.0);
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
        if p.core.cma {
            return self.import_same_host(&p, peer.0, desc, &k).map(RemoteId);
        }
        // Over TCP the target checks every request against its live registrations.
        let id = self.id();
        let access = if k.read_only {
            Access::ReadOnly
        } else {
            Access::ReadWrite
        };
        let handle = Arc::new(RemoteHandle::new(id, k.key, *desc, access));
        self.remotes.insert(id, peer.0, *desc, k.key, None, handle);
        Ok(RemoteId(id))
    }

    fn release_remote(&self, id: RemoteId) -> Result<()> {
        // Dropping the import unmaps the peer's memory once no prepared transfer holds
        // the mapping any more.
        // Prepared transfers naming it are refused from now on.
        let r = self.remotes.remove(id)?;
        self.forget_remote(&r);
        Ok(())
    }

    fn prepare(&self, req: &TransferRequest) -> Result<TransferId> {
        check_request_shape(req)?;
        if req.local_kind != MemKind::Dram || req.remote_kind != MemKind::Dram {
            return Err(Error::Unsupported("tcp moves dram only".into()));
        }
        let peer = self.peer(req.peer)?;
        self.recover_imports(req.peer, &peer)?;
        let imports = self.remotes.live(
            req.peer.0,
            &req.remote,
            || peer.core.peer_gone(),
            &peer.core.name,
        )?;
        let local = self.shared.regs.snapshot();
        let route = request::route(req, &imports, &local, peer.core.cma)?;
        Ok(self.keep(req.op, route, peer))
    }

    fn prepare_list(
        &self,
        side: ListSide,
        kind: MemKind,
        items: &DescriptorList,
    ) -> Result<ListId> {
        kv_core::lists::check_items(items)?;
        if kind != MemKind::Dram {
            return Err(Error::Unsupported("tcp moves dram only".into()));
        }
        let list = match side {
            ListSide::Local => TcpList::local(items, self.shared.regs.snapshot())?,
            ListSide::Remote(ep) => {
                let peer = self.peer(ep)?;
                self.recover_imports(ep, &peer)?;
                let imports =
                    self.remotes
                        .live(ep.0, items, || peer.core.peer_gone(), &peer.core.name)?;
                TcpList::remote(items, ep.0, imports)?
            }
        };
        Ok(self.lists.insert_list(list))
    }

    fn prepare_selected(&self, req: &SelectRequest<'_>) -> Result<TransferId> {
        let (local, remote) = (self.lists.get(req.local)?, self.lists.get(req.remote)?);
        let ep = match remote.owners {
            lists::Owners::Remote { peer, .. } => EndpointId(peer),
            lists::Owners::Local(_) => {
                return Err(Error::invalid_argument(format!(
                    "{} names local memory; a transfer's remote side needs a remote list",
                    req.remote
                )))
            }
        };
        kv_core::lists::check_selection(req)?;
        let peer = self.peer(ep)?;
        self.recover_imports(ep, &peer)?;
        let route = lists::route(
            req.op,
            (&local, req.local_items),
            (&remote, req.remote_items),
            peer.core.cma,
        )?;
        Ok(self.keep(req.op, route, peer))
    }

    fn release_list(&self, id: ListId) -> Result<()> {
        self.lists.remove(id)
    }

    unsafe fn post(&self, id: TransferId, opts: &PostOptions) -> Result<()> {
        let t = self.transfer(id)?;
        if let Some(n) = &opts.notification {
            self.check_notification(n.len())?;
        }
        let peer = t.peer.clone();
        if peer.core.closed.load(Ordering::Acquire) {
            return Err(peer.core.gone("disconnected"));
        }
        if opts.deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(Error::TimedOut {
                what: format!("tcp {} {id}", t.plan.op),
                after: Duration::ZERO,
            });
        }
        let path = t.plan.path;
        if path != Path::Tcp {
            // Data does not cross the control connection, so check that the peer is
            // still there before writing into its memory (checked again after the
            // copies on the shared-memory path, which cannot fail by themselves), and
            // re-validate imports a lost control connection suspended.
            let limit = Instant::now() + self.opts.connect_timeout;
            let until = opts.deadline.map_or(limit, |d| d.min(limit));
            peer.core.ensure_control(Some(until))?;
            peer.core.recover(&t.plan.remotes, until)?;
        }
        t.begin(&self.shared.regs, opts)?;
        // Taken outside the state lock: the sequencer locks transfer states while it
        // holds its own lock.
        t.seq.store(peer.next_seq(), Ordering::Release);
        self.posts.add(path);
        if path != Path::Tcp && t.plan.total <= self.opts.inline_max as u64 {
            peer.run_inline(&t);
        } else {
            peer.dispatch(&t);
        }
        Ok(())
    }

    fn poll(&self, id: TransferId) -> Status {
        match self.transfer(id) {
            Ok(t) => t.status(),
            Err(_) => Status::Failed(Error::invalid_argument(format!(
                "{id} is released or unknown"
            ))),
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
        self.check_notification(payload.len())?;
        self.peer(peer)?.notify(payload)
    }

    fn drain_notifications(&self, out: &mut Vec<Notification>) -> Result<usize> {
        Ok(self.shared.inbox.lock().drain_into(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Review defect 5: a lane that wedged (or panicked) left `cancel` waiting forever.
    #[test]
    fn cancel_of_a_wedged_transfer_is_bounded() {
        let o = Options {
            same_host: false,
            io_timeout: Duration::from_millis(200),
            ..Options::default()
        };
        let a = Arc::new(TcpBackend::new(&BackendInit::new("a"), o.clone()).unwrap());
        let b = TcpBackend::new(&BackendInit::new("b"), o).unwrap();
        let (l, r) = (vec![1u8; 4096], vec![0u8; 4096]);
        let (ld, rd) = (
            Descriptor::new(l.as_ptr() as u64, 4096, 0),
            Descriptor::new(r.as_ptr() as u64, 4096, 0),
        );
        // SAFETY: the vectors outlive both backends (dropped at the end).
        let (_la, rb) = unsafe {
            (
                a.register(MemKind::Dram, &ld, Access::ReadWrite).unwrap(),
                b.register(MemKind::Dram, &rd, Access::ReadWrite).unwrap(),
            )
        };
        let peer = a.connect("b", &b.connection_info().unwrap()).unwrap();
        a.import_remote(peer, MemKind::Dram, &rd, &b.remote_key(rb).unwrap())
            .unwrap();
        let id = a
            .prepare(&TransferRequest {
                op: kv_core::Op::Write,
                local_kind: MemKind::Dram,
                local: kv_core::DescriptorList::single(ld).unwrap(),
                peer,
                remote_kind: MemKind::Dram,
                remote: kv_core::DescriptorList::single(rd).unwrap(),
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
