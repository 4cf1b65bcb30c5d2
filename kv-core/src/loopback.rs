//! An in-process loopback backend in safe Rust: the simplest complete plugin.
//!
//! Each [`LoopbackBackend`] owns a simulated address space (buffers it allocates with
//! [`LoopbackBackend::alloc`]); transfers between backends of one [`LoopbackFabric`]
//! are plain `memcpy`s between those buffers, done in [`Backend::progress`]. Because
//! the backend only ever touches memory it owns, it needs no `unsafe` — which makes it
//! the reference for the protocol logic (bounds checks, remote keys, notifications
//! after data, cancellation, dead peers) that every real backend must reproduce.
//!
//! ```
//! use kv_core::loopback::LoopbackFabric;
//! # #[allow(unused_imports)]
//! use kv_core::{Access, Backend, BackendInit, MemKind, Op, PostOptions, TransferRequest, DescriptorList};
//!
//! let fabric = LoopbackFabric::new();
//! let (a, b) = (fabric.backend(&BackendInit::new("prefill")), fabric.backend(&BackendInit::new("decode")));
//! let (src, dst) = (a.alloc(4096), b.alloc(4096));
//! a.write_mem(src.addr, &[7u8; 4096]).unwrap();
//! // SAFETY: loopback memory is owned by the backend and lives as long as it.
//! let (ra, rb) = unsafe { (a.register(MemKind::Dram, &src, Access::ReadWrite).unwrap(), b.register(MemKind::Dram, &dst, Access::ReadWrite).unwrap()) };
//! let peer = a.connect("decode", &b.connection_info().unwrap()).unwrap();
//! a.import_remote(peer, MemKind::Dram, &dst, &b.remote_key(rb).unwrap()).unwrap();
//! let t = a.prepare(&TransferRequest { op: Op::Write, local_kind: MemKind::Dram, local: DescriptorList::single(src).unwrap(),
//!     peer, remote_kind: MemKind::Dram, remote: DescriptorList::single(dst).unwrap() }).unwrap();
//! unsafe { a.post(t, &PostOptions::default()).unwrap() };
//! a.progress().unwrap();
//! assert!(matches!(a.poll(t), kv_core::Status::Done));
//! assert_eq!(b.read_mem(dst.addr, 4096).unwrap(), vec![7u8; 4096]);
//! # let _ = ra;
//! ```

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Instant;

use bytes::Bytes;
use parking_lot::Mutex;

use crate::backend::*;
use crate::desc::{segments, Descriptor, MemKind, MemKinds};
use crate::error::{Error, Result};

/// A set of loopback backends that can reach each other. `Clone`, `Send + Sync`.
#[derive(Clone, Default)]
pub struct LoopbackFabric {
    inner: Arc<FabricInner>,
}

#[derive(Default)]
struct FabricInner {
    nodes: Mutex<HashMap<u64, Weak<Node>>>,
    next: AtomicU64,
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

    /// A new backend on this fabric, for the agent `init.agent_name`.
    pub fn backend(&self, init: &BackendInit) -> LoopbackBackend {
        let agent = init.agent_name.as_str();
        let id = self.inner.next.fetch_add(1, Ordering::Relaxed) + 1;
        let node = Arc::new(Node {
            id,
            agent: agent.to_string(),
            state: Mutex::new(NodeState::default()),
            exec: Mutex::new(()),
        });
        self.inner.nodes.lock().insert(id, Arc::downgrade(&node));
        LoopbackBackend {
            node,
            fabric: self.inner.clone(),
        }
    }
}

/// An in-process backend over simulated memory. `Send + Sync` (state behind a mutex).
pub struct LoopbackBackend {
    node: Arc<Node>,
    fabric: Arc<FabricInner>,
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
        self.fabric.nodes.lock().remove(&self.node.id);
    }
}

struct Node {
    id: u64,
    agent: String,
    state: Mutex<NodeState>,
    /// Held while a job runs, so `cancel` can wait for a running copy to end. Always
    /// taken before `state`, never while holding another node's lock.
    exec: Mutex<()>,
}

enum Job {
    Transfer(u64),
    Notify(u64, Bytes),
}

#[derive(Default)]
struct NodeState {
    next_id: u64,
    next_addr: u64,
    /// Simulated allocations by start address.
    memory: BTreeMap<u64, Vec<u8>>,
    regs: HashMap<u64, Reg>,
    peers: HashMap<u64, Peer>,
    remotes: HashMap<u64, Remote>,
    transfers: HashMap<u64, Transfer>,
    queue: VecDeque<Job>,
    inbox: VecDeque<Notification>,
}

struct Reg {
    kind: MemKind,
    desc: Descriptor,
    key: u64,
    busy: u32,
}

struct Peer {
    name: String,
    node: Weak<Node>,
}

struct Remote {
    peer: u64,
    desc: Descriptor,
    key: u64,
}

struct Transfer {
    req: TransferRequest,
    /// Remote registrations (id into `remotes`) the remote list falls in, with their keys.
    remote_keys: Vec<(Descriptor, u64)>,
    local_regs: Vec<u64>,
    status: Status,
    opts: PostOptions,
}

impl NodeState {
    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// The simulated allocation holding `d`, as (start, buffer).
    fn buffer_mut(&mut self, d: &Descriptor) -> Result<(u64, &mut Vec<u8>)> {
        let end = d
            .end()
            .ok_or_else(|| Error::OutOfBounds(format!("{d:?} overflows")))?;
        match self.memory.range_mut(..=d.addr).next_back() {
            Some((start, buf)) if end <= start + buf.len() as u64 => Ok((*start, buf)),
            _ => Err(Error::OutOfBounds(format!(
                "{:#x}+{} is not loopback memory",
                d.addr, d.len
            ))),
        }
    }

    fn read(&mut self, d: &Descriptor) -> Result<Vec<u8>> {
        let (start, buf) = self.buffer_mut(d)?;
        let o = (d.addr - start) as usize;
        Ok(buf[o..o + d.len as usize].to_vec())
    }

    fn write(&mut self, d: &Descriptor, data: &[u8]) -> Result<()> {
        let (start, buf) = self.buffer_mut(d)?;
        let o = (d.addr - start) as usize;
        buf[o..o + data.len()].copy_from_slice(data);
        Ok(())
    }

    /// Target-side check, as a real target does for requests from the network: the
    /// range must lie in a registration whose key matches.
    fn check_target(&self, d: &Descriptor, key: u64) -> Result<()> {
        let reg = self.regs.values().find(|r| r.key == key).ok_or_else(|| {
            Error::NotRegistered(format!("remote key {key:#x} (deregistered on the target)"))
        })?;
        if !reg.desc.contains(d) {
            return Err(Error::OutOfBounds(format!(
                "{:#x}+{} outside the target registration {:#x}+{}",
                d.addr, d.len, reg.desc.addr, reg.desc.len
            )));
        }
        Ok(())
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

    /// Runs one queued transfer to completion (or failure).
    fn execute(&self, tid: u64) {
        let mut s = self.node.state.lock();
        let Some(t) = s.transfers.get(&tid) else {
            return;
        };
        if !matches!(t.status, Status::InProgress) {
            return;
        }
        let (req, keys, opts) = (t.req.clone(), t.remote_keys.clone(), t.opts.clone());
        let peer = s
            .peers
            .get(&req.peer.0)
            .map(|p| (p.name.clone(), p.node.upgrade()));
        let result = match peer {
            None => Err(Error::NotRegistered(format!("endpoint {}", req.peer))),
            Some((name, None)) => Err(Error::RemoteDisconnected {
                peer: name,
                reason: "peer backend was dropped".into(),
            }),
            Some(_) if opts.deadline.is_some_and(|d| Instant::now() > d) => Err(Error::TimedOut {
                what: format!("loopback {} transfer", req.op),
                after: std::time::Duration::ZERO,
            }),
            Some((_, Some(remote))) => {
                // Move data segment by segment. Locks are taken one at a time (local
                // then remote), never nested, so two nodes writing to each other cannot
                // deadlock.
                let mut res = Ok(());
                let segs = match segments(&req.local, &req.remote) {
                    Ok(x) => x,
                    Err(e) => {
                        s.transfers
                            .entry(tid)
                            .and_modify(|t| t.status = Status::Failed(e));
                        return;
                    }
                };
                drop(s);
                for seg in segs {
                    let key = keys
                        .iter()
                        .find(|(d, _)| d.contains(&seg.remote))
                        .map(|(_, k)| *k)
                        .unwrap_or(0);
                    let r = match req.op {
                        Op::Write => {
                            let data = self.node.state.lock().read(&seg.local);
                            data.and_then(|data| {
                                let mut rs = remote.state.lock();
                                rs.check_target(&seg.remote, key)?;
                                rs.write(&seg.remote, &data)
                            })
                        }
                        Op::Read => {
                            let data = {
                                let mut rs = remote.state.lock();
                                rs.check_target(&seg.remote, key)
                                    .and_then(|_| rs.read(&seg.remote))
                            };
                            data.and_then(|data| self.node.state.lock().write(&seg.local, &data))
                        }
                    };
                    if let Err(e) = r {
                        res = Err(e);
                        break;
                    }
                }
                if res.is_ok() {
                    if let Some(p) = opts.notification.clone() {
                        remote.state.lock().inbox.push_back(Notification {
                            peer: self.node.agent.clone(),
                            payload: p,
                        });
                    }
                }
                s = self.node.state.lock();
                res
            }
        };
        let mut busy = Vec::new();
        if let Some(t) = s.transfers.get_mut(&tid) {
            // A cancel that ran while the lock was dropped wins.
            if matches!(t.status, Status::InProgress) {
                t.status = match result {
                    Ok(()) => Status::Done,
                    Err(e) => Status::Failed(e),
                };
                busy.clone_from(&t.local_regs);
            }
        }
        for r in busy {
            if let Some(r) = s.regs.get_mut(&r) {
                r.busy = r.busy.saturating_sub(1);
            }
        }
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
            ..Capabilities::default()
        }
    }

    unsafe fn register(
        &self,
        kind: MemKind,
        desc: &Descriptor,
        _access: Access,
    ) -> Result<RegistrationId> {
        if kind != MemKind::Dram {
            return Err(Error::Unsupported(format!(
                "loopback registers dram, not {kind}"
            )));
        }
        let mut s = self.node.state.lock();
        s.buffer_mut(desc)?;
        let id = s.id();
        let key = (self.node.id << 32) ^ id.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        s.regs.insert(
            id,
            Reg {
                kind,
                desc: *desc,
                key,
                busy: 0,
            },
        );
        Ok(RegistrationId(id))
    }

    fn deregister(&self, id: RegistrationId) -> Result<()> {
        let mut s = self.node.state.lock();
        match s.regs.get(&id.0) {
            None => Err(Error::NotRegistered(format!("{id}"))),
            Some(r) if r.busy > 0 => Err(Error::Busy(format!(
                "{id} is named by {} posted transfer(s); wait or cancel them first",
                r.busy
            ))),
            Some(_) => {
                s.regs.remove(&id.0);
                Ok(())
            }
        }
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
        let node = self
            .fabric
            .nodes
            .lock()
            .get(&u64::from_le_bytes(id))
            .cloned()
            .ok_or_else(|| Error::RemoteDisconnected {
                peer: peer_name.into(),
                reason: "no such loopback node on this fabric".into(),
            })?;
        let mut s = self.node.state.lock();
        let ep = s.id();
        s.peers.insert(
            ep,
            Peer {
                name: peer_name.into(),
                node,
            },
        );
        Ok(EndpointId(ep))
    }

    fn disconnect(&self, peer: EndpointId) -> Result<()> {
        let mut s = self.node.state.lock();
        s.peers
            .remove(&peer.0)
            .ok_or_else(|| Error::NotRegistered(format!("{peer}")))?;
        s.remotes.retain(|_, r| r.peer != peer.0);
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
        let key: [u8; 8] = key
            .try_into()
            .map_err(|_| Error::invalid_metadata("loopback remote key is 8 bytes"))?;
        let mut s = self.node.state.lock();
        if !s.peers.contains_key(&peer.0) {
            return Err(Error::NotRegistered(format!("{peer}")));
        }
        let id = s.id();
        s.remotes.insert(
            id,
            Remote {
                peer: peer.0,
                desc: *desc,
                key: u64::from_le_bytes(key),
            },
        );
        Ok(RemoteId(id))
    }

    fn release_remote(&self, id: RemoteId) -> Result<()> {
        self.node
            .state
            .lock()
            .remotes
            .remove(&id.0)
            .map(|_| ())
            .ok_or_else(|| Error::NotRegistered(format!("{id}")))
    }

    fn prepare(&self, req: &TransferRequest) -> Result<TransferId> {
        check_request_shape(req)?;
        if req.local_kind != MemKind::Dram || req.remote_kind != MemKind::Dram {
            return Err(Error::Unsupported("loopback moves dram only".into()));
        }
        let mut s = self.node.state.lock();
        if !s.peers.contains_key(&req.peer.0) {
            return Err(Error::NotRegistered(format!("{}", req.peer)));
        }
        let local: Vec<(u64, Descriptor)> = s.regs.iter().map(|(i, r)| (*i, r.desc)).collect();
        let local_descs: Vec<Descriptor> = local.iter().map(|(_, d)| *d).collect();
        if !req.local.within(&local_descs) {
            return Err(Error::NotRegistered(
                "a local descriptor lies outside every local registration".into(),
            ));
        }
        let remote: Vec<(Descriptor, u64)> = s
            .remotes
            .values()
            .filter(|r| r.peer == req.peer.0)
            .map(|r| (r.desc, r.key))
            .collect();
        let remote_descs: Vec<Descriptor> = remote.iter().map(|(d, _)| *d).collect();
        if !req.remote.within(&remote_descs) {
            return Err(Error::OutOfBounds(
                "a remote descriptor lies outside what the peer registered".into(),
            ));
        }
        let local_regs = local
            .iter()
            .filter(|(_, d)| req.local.iter().any(|x| d.contains(&x)))
            .map(|(i, _)| *i)
            .collect();
        let id = s.id();
        s.transfers.insert(
            id,
            Transfer {
                req: req.clone(),
                remote_keys: remote,
                local_regs,
                status: Status::Idle,
                opts: PostOptions::default(),
            },
        );
        Ok(TransferId(id))
    }

    unsafe fn post(&self, id: TransferId, opts: &PostOptions) -> Result<()> {
        let mut s = self.node.state.lock();
        let t = s
            .transfers
            .get_mut(&id.0)
            .ok_or_else(|| Error::NotRegistered(format!("{id}")))?;
        if matches!(t.status, Status::InProgress) {
            return Err(Error::Busy(format!("{id} is already in progress")));
        }
        let regs = t.local_regs.clone();
        if let Some(r) = regs.iter().find(|r| !s.regs.contains_key(r)) {
            return Err(Error::NotRegistered(format!(
                "local registration {r} of {id} was deregistered; prepare again"
            )));
        }
        let t = s
            .transfers
            .get_mut(&id.0)
            .ok_or_else(|| Error::NotRegistered(format!("{id}")))?;
        t.status = Status::InProgress;
        t.opts = opts.clone();
        for r in t.local_regs.clone() {
            if let Some(r) = s.regs.get_mut(&r) {
                r.busy += 1;
            }
        }
        s.queue.push_back(Job::Transfer(id.0));
        Ok(())
    }

    fn poll(&self, id: TransferId) -> Status {
        match self.node.state.lock().transfers.get(&id.0) {
            Some(t) => t.status.clone(),
            None => Status::Failed(Error::NotRegistered(format!("{id}"))),
        }
    }

    fn cancel(&self, id: TransferId) -> Result<()> {
        // Wait for a running copy to end: after this returns nothing touches the memory.
        let _exec = self.node.exec.lock();
        let mut s = self.node.state.lock();
        let t = s
            .transfers
            .get_mut(&id.0)
            .ok_or_else(|| Error::NotRegistered(format!("{id}")))?;
        if matches!(t.status, Status::InProgress) {
            t.status = Status::Failed(Error::Canceled);
            for r in t.local_regs.clone() {
                if let Some(r) = s.regs.get_mut(&r) {
                    r.busy = r.busy.saturating_sub(1);
                }
            }
        }
        Ok(())
    }

    fn release(&self, id: TransferId) -> Result<()> {
        let mut s = self.node.state.lock();
        match s.transfers.get(&id.0) {
            None => Err(Error::NotRegistered(format!("{id}"))),
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
        let mut n = 0;
        loop {
            let _exec = self.node.exec.lock();
            let next = self.node.state.lock().queue.pop_front();
            match next {
                None => break,
                Some(Job::Transfer(tid)) => self.execute(tid),
                Some(Job::Notify(peer, payload)) => {
                    let node = self
                        .node
                        .state
                        .lock()
                        .peers
                        .get(&peer)
                        .and_then(|p| p.node.upgrade());
                    // A peer that vanished after `notify` accepted the payload loses it,
                    // as a real network would.
                    if let Some(node) = node {
                        node.state.lock().inbox.push_back(Notification {
                            peer: self.node.agent.clone(),
                            payload,
                        });
                    }
                }
            }
            n += 1;
        }
        Ok(n)
    }

    fn notify(&self, peer: EndpointId, payload: Bytes) -> Result<()> {
        let mut s = self.node.state.lock();
        let p = s
            .peers
            .get(&peer.0)
            .ok_or_else(|| Error::NotRegistered(format!("{peer}")))?;
        if p.node.strong_count() == 0 {
            return Err(Error::RemoteDisconnected {
                peer: p.name.clone(),
                reason: "peer backend was dropped".into(),
            });
        }
        // Queued behind earlier posts so it arrives after their data.
        s.queue.push_back(Job::Notify(peer.0, payload));
        Ok(())
    }

    fn drain_notifications(&self, out: &mut Vec<Notification>) -> Result<usize> {
        let mut s = self.node.state.lock();
        let n = s.inbox.len();
        out.extend(s.inbox.drain(..));
        Ok(n)
    }
}
