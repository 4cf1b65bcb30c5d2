//! An in-process loopback backend in safe Rust: the reference implementation of the
//! [`Backend`] contract.
//!
//! Each [`LoopbackBackend`] owns a simulated address space (buffers it allocates with
//! [`LoopbackBackend::alloc`]); transfers between backends of one [`LoopbackFabric`]
//! are `memcpy`s between those buffers, done in [`Backend::progress`] at most
//! 1 MiB per call, so a big transfer is in flight across calls as on a real NIC.
//! Because the backend only touches memory it owns, it needs no `unsafe` — which makes
//! it the place to read the protocol every real backend must reproduce:
//!
//! * `connect` runs the cluster-secret handshake of [`crate::auth`] (both halves run
//!   in the caller's thread, each with only its own side's secret, and the messages
//!   cross as encoded bytes);
//! * every peer operation is a tagged frame the target authenticates, then re-checks
//!   against its own live registrations and access modes (the target side, in
//!   `loopback/node.rs`; the initiator side is in `loopback/engine.rs`);
//! * remote keys are 128 random bits; deregistration cuts peers off at once;
//! * cancel and disconnect wait for a running copy; deadlines, released transfers and
//!   dead peers end in the statuses the trait documents.
//!
//! ```
//! use kv_core::loopback::LoopbackFabric;
//! use kv_core::auth::ClusterSecret;
//! use kv_core::{Access, Backend, BackendInit, DescriptorList, MemKind, Op, PostOptions, Status, TransferRequest};
//!
//! let fabric = LoopbackFabric::new();
//! let secret = ClusterSecret::generate()?;
//! let a = fabric.backend(&BackendInit::new("prefill").with_secret(secret.clone()));
//! let b = fabric.backend(&BackendInit::new("decode").with_secret(secret));
//! let (src, dst) = (a.alloc(4096), b.alloc(4096));
//! a.write_mem(src.addr, &[7u8; 4096])?;
//! // SAFETY: loopback memory is simulated and owned by its backend; nothing dereferences it.
//! let (_ra, rb) = unsafe {
//!     (a.register(MemKind::Dram, &src, Access::ReadWrite)?, b.register(MemKind::Dram, &dst, Access::ReadWrite)?)
//! };
//! let peer = a.connect("decode", &b.connection_info()?)?; // authenticated handshake
//! a.import_remote(peer, MemKind::Dram, &dst, &b.remote_key(rb)?)?;
//! let t = a.prepare(&TransferRequest { op: Op::Write, local_kind: MemKind::Dram, local: DescriptorList::single(src)?,
//!     peer, remote_kind: MemKind::Dram, remote: DescriptorList::single(dst)? })?;
//! // SAFETY: as above.
//! unsafe { a.post(t, &PostOptions::default())? };
//! a.progress()?;
//! assert!(matches!(a.poll(t), Status::Done));
//! assert_eq!(b.read_mem(dst.addr, 4096)?, vec![7u8; 4096]);
//! # Ok::<(), kv_core::Error>(())
//! ```

mod engine;
mod node;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;

use crate::auth::random_u128;
use crate::backend::*;
use crate::desc::{Descriptor, DescriptorList, MemKind, MemKinds};
use crate::error::{Error, Result};
use crate::lists::ListTable;
#[doc(hidden)]
pub use node::Mutation;
use node::{
    disconnected, unknown, Job, Link, Node, NodeState, Peer, Reg, Remote, Transfer, MAX_ENDPOINTS,
};

/// Bytes one `progress` call moves at most.
const PROGRESS_BUDGET: u64 = 1 << 20;

/// A set of loopback backends that can reach each other. `Clone`, `Send + Sync`.
#[derive(Clone, Default)]
pub struct LoopbackFabric {
    inner: Arc<FabricInner>,
}

#[derive(Default)]
struct FabricInner {
    nodes: Mutex<HashMap<u64, Weak<Node>>>,
    next: AtomicU64,
    mutation: Option<Mutation>,
}

impl std::fmt::Debug for LoopbackFabric {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoopbackFabric").finish_non_exhaustive()
    }
}

impl LoopbackFabric {
    /// A new, empty fabric.
    pub fn new() -> Self {
        Self::default()
    }

    /// A fabric whose backends all carry the deliberate bug `m` (mutation testing of
    /// the conformance suite). Not part of the API.
    #[cfg(feature = "conformance")]
    #[doc(hidden)]
    pub fn with_mutation(m: Mutation) -> Self {
        LoopbackFabric {
            inner: Arc::new(FabricInner {
                mutation: Some(m),
                ..FabricInner::default()
            }),
        }
    }

    /// A new backend on this fabric, for the agent `init.agent_name`, authenticating its
    /// connections with `init.secret` (two backends connect only if both have the same
    /// secret, or both none).
    pub fn backend(&self, init: &BackendInit) -> LoopbackBackend {
        let id = self.inner.next.fetch_add(1, Ordering::Relaxed) + 1;
        let node = Arc::new(Node {
            id,
            agent: init.agent_name.clone(),
            secret: init.secret.clone(),
            mutation: self.inner.mutation,
            state: Mutex::new(NodeState::default()),
            exec: Mutex::new(()),
        });
        self.inner.nodes.lock().insert(id, Arc::downgrade(&node));
        LoopbackBackend {
            node,
            fabric: self.inner.clone(),
            lists: ListTable::new(),
        }
    }
}

/// An in-process backend over simulated memory. `Send + Sync` (state behind a mutex).
pub struct LoopbackBackend {
    node: Arc<Node>,
    fabric: Arc<FabricInner>,
    /// Prepared lists, kept as items and expanded per request (the simple way).
    lists: ListTable,
}

impl std::fmt::Debug for LoopbackBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoopbackBackend")
            .field("agent", &self.node.agent)
            .finish_non_exhaustive()
    }
}

impl Drop for LoopbackBackend {
    fn drop(&mut self) {
        // No threads to stop. Peers hold the node weakly: once the last strong reference
        // (ours, or a copy in progress) is gone, they see `RemoteDisconnected`.
        self.fabric.nodes.lock().remove(&self.node.id);
    }
}

impl LoopbackBackend {
    /// Allocates `len` zeroed bytes in this backend's simulated address space.
    pub fn alloc(&self, len: usize) -> Descriptor {
        let mut s = self.node.state.lock();
        // Addresses start high and leave a gap between buffers so overruns are visible.
        let addr = 0x1000_0000 + s.next_addr;
        s.next_addr += (len as u64).div_ceil(4096) * 4096 + 4096;
        s.memory.insert(addr, vec![0; len]);
        Descriptor::new(addr, len as u64, 0)
    }

    /// Frees an allocation made by [`LoopbackBackend::alloc`].
    pub fn free(&self, desc: &Descriptor) -> Result<()> {
        let mut s = self.node.state.lock();
        if s.regs.values().any(|r| r.desc.overlaps(desc)) {
            return Err(Error::Busy("memory is still registered".into()));
        }
        s.memory
            .remove(&desc.addr)
            .map(|_| ())
            .ok_or_else(|| Error::NotRegistered(format!("no allocation at {:#x}", desc.addr)))
    }

    /// Copies `data` into simulated memory at `addr`.
    pub fn write_mem(&self, addr: u64, data: &[u8]) -> Result<()> {
        let d = Descriptor::new(addr, data.len() as u64, 0);
        self.node.state.lock().write(&d, data)
    }

    /// Copies `len` bytes of simulated memory at `addr` out.
    pub fn read_mem(&self, addr: u64, len: usize) -> Result<Vec<u8>> {
        self.node
            .state
            .lock()
            .read(&Descriptor::new(addr, len as u64, 0))
    }
}

// The two `unsafe fn`s below are unsafe only because the trait says so: loopback memory
// is owned by the backend, so their bodies need no unsafe operation.
#[allow(unsafe_code)]
impl Backend for LoopbackBackend {
    fn name(&self) -> &str {
        "loopback"
    }

    fn capabilities(&self) -> Capabilities {
        // Outside kv-core `Capabilities` is non-exhaustive: start from
        // `Capabilities::default()` and set the fields.
        Capabilities {
            local: true,
            notifications: true,
            write: true,
            read: true,
            mem_kinds: MemKinds::of(&[MemKind::Dram]),
            // Peers are served only inside the initiator's `progress`; the target
            // needs no progress of its own.
            needs_target_progress: false,
            authenticated: self.node.secret.is_some(),
            read_only: true,
            ..Capabilities::default()
        }
    }

    unsafe fn register(
        &self,
        kind: MemKind,
        desc: &Descriptor,
        access: Access,
    ) -> Result<RegistrationId> {
        if kind != MemKind::Dram {
            return Err(Error::Unsupported(format!(
                "loopback registers dram, not {kind}"
            )));
        }
        let mut key = random_u128()?;
        let mut s = self.node.state.lock();
        s.check_memory(desc)?;
        while s.keys.contains_key(&key) || s.zombies.contains_key(&key) {
            key = random_u128()?;
        }
        let id = s.id();
        let reg = Reg {
            kind,
            desc: *desc,
            access,
            key,
            busy: 0,
        };
        s.regs.insert(id, reg);
        s.keys.insert(key, id);
        Ok(RegistrationId(id))
    }

    fn deregister(&self, id: RegistrationId) -> Result<()> {
        // Peer operations run under this same lock: once it is ours, none is mid-copy,
        // and every later one finds the key gone.
        let mut s = self.node.state.lock();
        let reg = s
            .regs
            .get(&id.0)
            .ok_or_else(|| Error::NotRegistered(format!("{id}")))?;
        if reg.busy > 0 && !self.node.mutant(Mutation::DeregisterNeverBusy) {
            return Err(Error::Busy(format!(
                "{id} is named by {} posted transfer(s); wait or cancel them first",
                reg.busy
            )));
        }
        let (key, desc) = (reg.key, reg.desc);
        s.regs.remove(&id.0);
        s.keys.remove(&key);
        if self.node.mutant(Mutation::NoLivenessCheck) {
            s.zombies.insert(key, desc);
        }
        Ok(())
    }

    fn remote_key(&self, id: RegistrationId) -> Result<Bytes> {
        let s = self.node.state.lock();
        let r = s
            .regs
            .get(&id.0)
            .ok_or_else(|| Error::NotRegistered(format!("{id}")))?;
        debug_assert_eq!(r.kind, MemKind::Dram);
        Ok(Bytes::copy_from_slice(&r.key.to_le_bytes()))
    }

    fn connection_info(&self) -> Result<Bytes> {
        Ok(Bytes::copy_from_slice(&self.node.id.to_le_bytes()))
    }

    fn connect(&self, peer_name: &str, info: &[u8]) -> Result<EndpointId> {
        let id: [u8; 8] = info
            .try_into()
            .map_err(|_| Error::invalid_metadata("loopback connection info is 8 bytes"))?;
        let target = self
            .fabric
            .nodes
            .lock()
            .get(&u64::from_le_bytes(id))
            .and_then(Weak::upgrade)
            .ok_or_else(|| disconnected(peer_name, "no such loopback node on this fabric"))?;
        let (session, key) = self.node.handshake(&target)?;
        let mut s = self.node.state.lock();
        if s.peers.len() >= MAX_ENDPOINTS {
            s.peers.retain(|_, p| p.link.is_some());
        }
        if s.peers.len() >= MAX_ENDPOINTS {
            drop(s);
            target.state.lock().sessions.remove(&session);
            return Err(Error::Busy(format!(
                "{MAX_ENDPOINTS} loopback endpoints connected; disconnect some"
            )));
        }
        let ep = s.id();
        let link = Link {
            node: Arc::downgrade(&target),
            session,
            key,
            seq: 0,
        };
        let peer = Peer {
            name: peer_name.into(),
            link: Some(link),
        };
        s.peers.insert(ep, peer);
        Ok(EndpointId(ep))
    }

    fn disconnect(&self, peer: EndpointId) -> Result<()> {
        // Wait for a running copy: afterwards no copy to this peer runs any more.
        let _exec = self.node.exec.lock();
        let mut s = self.node.state.lock();
        let p = s.peers.get_mut(&peer.0).ok_or_else(|| unknown(peer))?;
        let Some(link) = p.link.take() else {
            return Ok(());
        };
        let err = if self.node.mutant(Mutation::DisconnectEndsNotRegistered) {
            Error::NotRegistered(format!("{peer}"))
        } else {
            disconnected(&p.name, "disconnected locally")
        };
        let inflight: Vec<u64> = s
            .transfers
            .iter()
            .filter(|(_, t)| t.peer == peer.0 && matches!(t.status, Status::InProgress))
            .map(|(id, _)| *id)
            .collect();
        for id in inflight {
            s.finish(id, Status::Failed(err.clone()));
        }
        s.remotes.retain(|_, r| r.peer != peer.0);
        drop(s);
        if let Some(node) = link.node.upgrade() {
            node.state.lock().sessions.remove(&link.session);
        }
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
                "loopback addresses dram, not {kind}"
            )));
        }
        let key: [u8; 16] = key
            .try_into()
            .map_err(|_| Error::invalid_metadata("loopback remote key is 16 bytes"))?;
        if desc.end().is_none() {
            return Err(Error::invalid_argument(format!("{desc:?} overflows")));
        }
        // Nothing is checked with the target here: it re-checks every operation, which
        // is what makes a forged or stale import harmless.
        let mut s = self.node.state.lock();
        s.link(peer.0)?;
        let id = s.id();
        let remote = Remote {
            peer: peer.0,
            desc: *desc,
            key: u128::from_le_bytes(key),
        };
        s.remotes.insert(id, remote);
        Ok(RemoteId(id))
    }

    fn release_remote(&self, id: RemoteId) -> Result<()> {
        let mut s = self.node.state.lock();
        s.remotes
            .remove(&id.0)
            .map(|_| ())
            .ok_or_else(|| unknown(id))
    }

    fn prepare(&self, req: &TransferRequest) -> Result<TransferId> {
        check_request_shape(req)?;
        if req.local_kind != MemKind::Dram || req.remote_kind != MemKind::Dram {
            return Err(Error::Unsupported("loopback moves dram only".into()));
        }
        let mut s = self.node.state.lock();
        s.link(req.peer.0)?;
        // A READ writes into its local ranges: only writable registrations may hold them.
        let enforce_ro = !self.node.mutant(Mutation::ReadOnlyNotEnforced);
        let usable: Vec<(u64, Descriptor)> = s
            .regs
            .iter()
            .filter(|(_, r)| req.op == Op::Write || r.access.writable() || !enforce_ro)
            .map(|(i, r)| (*i, r.desc))
            .collect();
        let descs: Vec<Descriptor> = usable.iter().map(|(_, d)| *d).collect();
        if !req.local.within(&descs) {
            let all: Vec<Descriptor> = s.regs.values().map(|r| r.desc).collect();
            return Err(if req.local.within(&all) {
                Error::AccessDenied("a READ's local destination is registered read-only".into())
            } else {
                Error::NotRegistered(
                    "a local descriptor lies outside every local registration".into(),
                )
            });
        }
        let imported: Vec<Descriptor> = s
            .remotes
            .values()
            .filter(|r| r.peer == req.peer.0)
            .map(|r| r.desc)
            .collect();
        if !req.remote.within(&imported) {
            return Err(Error::OutOfBounds(
                "a remote descriptor lies outside what the peer registered".into(),
            ));
        }
        let local_regs = usable
            .iter()
            .filter(|(_, d)| req.local.iter().any(|x| x.len > 0 && d.contains(&x)))
            .map(|(i, _)| *i)
            .collect();
        let segs = self.node.plan(&s, req)?;
        let id = s.id();
        let t = Transfer {
            op: req.op,
            peer: req.peer.0,
            segs,
            local_regs,
            status: Status::Idle,
            opts: PostOptions::default(),
            done: 0,
            notified: false,
        };
        s.transfers.insert(id, t);
        Ok(TransferId(id))
    }

    unsafe fn post(&self, id: TransferId, opts: &PostOptions) -> Result<()> {
        let mut s = self.node.state.lock();
        let t = s.transfers.get(&id.0).ok_or_else(|| unknown(id))?;
        if matches!(t.status, Status::InProgress) {
            return Err(Error::Busy(format!("{id} is already in progress")));
        }
        s.link(t.peer)?;
        if let Some(r) = t.local_regs.iter().find(|r| !s.regs.contains_key(r)) {
            return Err(Error::NotRegistered(format!(
                "local registration {r} of {id} was deregistered; prepare again"
            )));
        }
        if opts.deadline.is_some_and(|d| Instant::now() >= d)
            && !self.node.mutant(Mutation::DeadlineIgnored)
        {
            return Err(Error::TimedOut {
                what: format!("posting {id}"),
                after: Duration::ZERO,
            });
        }
        let regs = t.local_regs.clone();
        for r in &regs {
            if let Some(r) = s.regs.get_mut(r) {
                r.busy += 1;
            }
        }
        if let Some(t) = s.transfers.get_mut(&id.0) {
            t.status = Status::InProgress;
            t.opts = opts.clone();
            t.done = 0;
            t.notified = false;
        }
        s.queue.push_back(Job::Transfer(id.0));
        Ok(())
    }

    fn poll(&self, id: TransferId) -> Status {
        let mut s = self.node.state.lock();
        let running = s.running;
        let Some(t) = s.transfers.get(&id.0) else {
            if self.node.mutant(Mutation::PollAfterReleaseIdle) {
                return Status::Idle;
            }
            return Status::Failed(unknown(id));
        };
        let expired = t.opts.deadline.is_some_and(|d| Instant::now() > d);
        if matches!(t.status, Status::InProgress)
            && expired
            && running != Some(id.0)
            && !self.node.mutant(Mutation::DeadlineIgnored)
        {
            // Not being copied right now (that copy checks its own deadline), so it can
            // be ended here: its queued job will find it finished.
            let what = format!("loopback transfer {id}");
            s.finish(
                id.0,
                Status::Failed(Error::TimedOut {
                    what,
                    after: Duration::ZERO,
                }),
            );
        }
        s.transfers
            .get(&id.0)
            .map_or_else(|| Status::Failed(unknown(id)), |t| t.status.clone())
    }

    fn cancel(&self, id: TransferId) -> Result<()> {
        // Wait for a running copy to end: after this returns nothing touches the memory.
        let _exec = self.node.exec.lock();
        let mut s = self.node.state.lock();
        if !s.transfers.contains_key(&id.0) {
            return Err(unknown(id));
        }
        // Its queued job, when it comes up, finds it finished and moves nothing.
        s.finish(id.0, Status::Failed(Error::Canceled));
        Ok(())
    }

    fn prepare_list(
        &self,
        side: ListSide,
        kind: MemKind,
        items: &DescriptorList,
    ) -> Result<ListId> {
        crate::lists::check_items(items)?;
        if kind != MemKind::Dram {
            return Err(Error::Unsupported("loopback moves dram only".into()));
        }
        let all = items;
        let s = self.node.state.lock();
        let (within, what) = match side {
            ListSide::Local => {
                let regs: Vec<Descriptor> = s.regs.values().map(|r| r.desc).collect();
                (all.within(&regs), "every local registration")
            }
            ListSide::Remote(peer) => {
                s.link(peer.0)?;
                let imported: Vec<Descriptor> = s
                    .remotes
                    .values()
                    .filter(|r| r.peer == peer.0)
                    .map(|r| r.desc)
                    .collect();
                (all.within(&imported), "what the peer registered")
            }
        };
        drop(s);
        if !within && !self.node.mutant(Mutation::ListNotChecked) {
            return Err(Error::NotRegistered(format!(
                "an item of the list lies outside {what}"
            )));
        }
        self.lists.insert(side, kind, items)
    }

    fn prepare_selected(&self, req: &SelectRequest<'_>) -> Result<TransferId> {
        let identity: Vec<u32> = (0..req.local_items.len() as u32).collect();
        let req = if self.node.mutant(Mutation::SelectionIgnored) {
            SelectRequest {
                local_items: &identity,
                remote_items: &identity,
                ..*req
            }
        } else {
            *req
        };
        // The reference does it the simple way: the selected items' request, prepared
        // (and so checked) like any other.
        self.prepare(&self.lists.request(&req)?)
    }

    fn release_list(&self, id: ListId) -> Result<()> {
        self.lists.remove(id)
    }

    fn release(&self, id: TransferId) -> Result<()> {
        let mut s = self.node.state.lock();
        match s.transfers.get(&id.0) {
            None => Err(unknown(id)),
            Some(t) if matches!(t.status, Status::InProgress) => {
                Err(Error::Busy(format!("{id} is in progress; cancel it first")))
            }
            Some(_) => {
                s.transfers.remove(&id.0);
                Ok(())
            }
        }
    }

    fn progress(&self) -> Result<usize> {
        let _exec = self.node.exec.lock();
        let (mut budget, mut n) = (PROGRESS_BUDGET, 0);
        while budget > 0 {
            let Some(job) = self.node.state.lock().queue.pop_front() else {
                break;
            };
            match job {
                Job::Transfer(tid) => {
                    if !self.node.run_transfer(tid, &mut budget) {
                        // Not finished: it stays first, so later notifications wait for it.
                        self.node.state.lock().queue.push_front(job);
                        break;
                    }
                }
                Job::Notify(ep, payload) => self.node.send_notification(ep, payload),
            }
            n += 1;
        }
        Ok(n)
    }

    fn notify(&self, peer: EndpointId, payload: Bytes) -> Result<()> {
        let mut s = self.node.state.lock();
        s.link(peer.0)?;
        // Queued behind earlier posts so it arrives after their data.
        s.queue.push_back(Job::Notify(peer.0, payload));
        Ok(())
    }

    fn drain_notifications(&self, out: &mut Vec<Notification>) -> Result<usize> {
        Ok(self.node.state.lock().drain(out))
    }
}
