//! Helpers shared by the agent's newer test files: loopback memory for `Region`s, a
//! cluster secret, and [`Hooked`], a loopback backend with knobs (slow calls, stuck
//! progress, reach, a target that serves peers only when it is progressed).
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use kv_agent::{Agent, AgentOptions, PeerId, Registration, TransferSpec};
use kv_core::auth::ClusterSecret;
use kv_core::conformance::pattern;
use kv_core::loopback::{LoopbackBackend, LoopbackFabric};
use kv_core::{
    Backend, BackendInit, Capabilities, Descriptor, DescriptorList, EndpointId, Error, MemKind,
    Notification, PostOptions, RegistrationId, RemoteId, Status, TransferId, TransferRequest,
};
use kv_mem::{Memory, Region};
use parking_lot::Mutex;

/// Loopback memory as a `kv_mem::Memory`, so the agent can register it.
pub struct LoopMem(pub Descriptor);

// SAFETY: the range is loopback-simulated memory owned by the backend; neither the agent
// nor the loopback backend ever dereferences it as a host address.
unsafe impl Memory for LoopMem {
    fn kind(&self) -> MemKind {
        MemKind::Dram
    }
    fn descriptor(&self) -> Descriptor {
        self.0
    }
}

/// The cluster secret every agent of one test process shares.
pub fn secret() -> ClusterSecret {
    static S: OnceLock<ClusterSecret> = OnceLock::new();
    S.get_or_init(|| ClusterSecret::generate().unwrap()).clone()
}

/// Options with the shared secret.
pub fn opts() -> AgentOptions {
    AgentOptions {
        secret: Some(secret()),
        ..Default::default()
    }
}

/// A post the target has not served yet: target agent name, the initiator's loopback
/// backend, the transfer and its options.
type Pending = (String, Arc<LoopbackBackend>, TransferId, PostOptions);

/// Posts the target side has not served yet (see [`Hooked::hub`]).
#[derive(Default)]
pub struct Hub {
    pending: Mutex<Vec<Pending>>,
}

/// A loopback backend under another name, with knobs.
pub struct Hooked {
    pub inner: Arc<LoopbackBackend>,
    pub name: String,
    /// This agent's name (for the target-progress hub).
    pub agent: String,
    pub local: bool,
    pub remote: bool,
    /// `progress` does nothing and posts ignore their deadline: transfers never end on
    /// their own.
    pub stuck: bool,
    /// `connect` fails (the peer is unreachable over this backend).
    pub fail_connect: bool,
    pub slow_cancel: Duration,
    pub slow_deregister: Duration,
    pub slow_disconnect: Duration,
    /// `deregister` always fails (a peer still writing, say).
    pub fail_deregister: bool,
    /// What `estimate_cost` answers.
    pub cost: Option<Duration>,
    /// The target side serves peers' posts only inside its own `progress`.
    pub hub: Option<Arc<Hub>>,
    /// Endpoint -> peer name, transfer -> peer name (to route posts through the hub).
    peers: Mutex<(HashMap<EndpointId, String>, HashMap<TransferId, String>)>,
}

impl Hooked {
    /// `inner` (of agent `agent`) as backend `name`, with no knob set.
    pub fn new(inner: LoopbackBackend, agent: &str, name: &str) -> Hooked {
        Hooked {
            inner: Arc::new(inner),
            name: name.into(),
            agent: agent.into(),
            local: true,
            remote: false,
            stuck: false,
            fail_connect: false,
            slow_cancel: Duration::ZERO,
            slow_deregister: Duration::ZERO,
            slow_disconnect: Duration::ZERO,
            fail_deregister: false,
            cost: None,
            hub: None,
            peers: Mutex::new(Default::default()),
        }
    }

    /// Memory of `len` bytes in this backend's loopback space, filled with `seed`'s pattern.
    pub fn region(&self, len: usize, seed: u64) -> Region<LoopMem> {
        let d = self.inner.alloc(len);
        self.inner.write_mem(d.addr, &pattern(seed, len)).unwrap();
        Region::new(LoopMem(d))
    }

    pub fn read(&self, d: Descriptor) -> Vec<u8> {
        self.inner.read_mem(d.addr, d.len as usize).unwrap()
    }

    fn pending(&self, id: TransferId) -> bool {
        self.hub.as_ref().is_some_and(|h| {
            h.pending
                .lock()
                .iter()
                .any(|(_, b, t, _)| *t == id && Arc::ptr_eq(b, &self.inner))
        })
    }
}

#[allow(unsafe_code)]
impl Backend for Hooked {
    fn name(&self) -> &str {
        &self.name
    }
    fn capabilities(&self) -> Capabilities {
        let mut c = self.inner.capabilities();
        c.local = self.local;
        c.remote = self.remote;
        c.needs_target_progress = self.hub.is_some();
        c
    }
    unsafe fn register(
        &self,
        kind: MemKind,
        desc: &Descriptor,
        access: kv_core::Access,
    ) -> kv_core::Result<RegistrationId> {
        // SAFETY: forwarded contract.
        unsafe { self.inner.register(kind, desc, access) }
    }
    fn deregister(&self, id: RegistrationId) -> kv_core::Result<()> {
        std::thread::sleep(self.slow_deregister);
        if self.fail_deregister {
            return Err(Error::Busy("a peer is still writing".into()));
        }
        self.inner.deregister(id)
    }
    fn remote_key(&self, id: RegistrationId) -> kv_core::Result<Bytes> {
        self.inner.remote_key(id)
    }
    fn connection_info(&self) -> kv_core::Result<Bytes> {
        self.inner.connection_info()
    }
    fn connect(&self, n: &str, info: &[u8]) -> kv_core::Result<EndpointId> {
        if self.fail_connect {
            return Err(Error::RemoteDisconnected {
                peer: n.into(),
                reason: format!("{} cannot reach it (test)", self.name),
            });
        }
        let ep = self.inner.connect(n, info)?;
        self.peers.lock().0.insert(ep, n.to_string());
        Ok(ep)
    }
    fn disconnect(&self, p: EndpointId) -> kv_core::Result<()> {
        std::thread::sleep(self.slow_disconnect);
        self.inner.disconnect(p)
    }
    fn import_remote(
        &self,
        p: EndpointId,
        k: MemKind,
        d: &Descriptor,
        key: &[u8],
    ) -> kv_core::Result<RemoteId> {
        self.inner.import_remote(p, k, d, key)
    }
    fn release_remote(&self, id: RemoteId) -> kv_core::Result<()> {
        self.inner.release_remote(id)
    }
    fn prepare(&self, r: &TransferRequest) -> kv_core::Result<TransferId> {
        let id = self.inner.prepare(r)?;
        let mut peers = self.peers.lock();
        if let Some(n) = peers.0.get(&r.peer).cloned() {
            peers.1.insert(id, n);
        }
        Ok(id)
    }
    unsafe fn post(&self, id: TransferId, o: &PostOptions) -> kv_core::Result<()> {
        if let Some(hub) = &self.hub {
            let target = self.peers.lock().1.get(&id).cloned().unwrap_or_default();
            hub.pending
                .lock()
                .push((target, self.inner.clone(), id, o.clone()));
            return Ok(());
        }
        // A stuck backend does not notice deadlines either: the agent must.
        let mut o = o.clone();
        if self.stuck {
            o.deadline = None;
        }
        // SAFETY: forwarded contract.
        unsafe { self.inner.post(id, &o) }
    }
    fn poll(&self, id: TransferId) -> Status {
        if self.pending(id) {
            return Status::InProgress;
        }
        self.inner.poll(id)
    }
    fn cancel(&self, id: TransferId) -> kv_core::Result<()> {
        std::thread::sleep(self.slow_cancel);
        if let Some(h) = &self.hub {
            h.pending
                .lock()
                .retain(|(_, b, t, _)| !(*t == id && Arc::ptr_eq(b, &self.inner)));
        }
        self.inner.cancel(id)
    }
    fn release(&self, id: TransferId) -> kv_core::Result<()> {
        self.inner.release(id)
    }
    fn progress(&self) -> kv_core::Result<usize> {
        if self.stuck {
            return Ok(0);
        }
        let mut n = 0;
        if let Some(hub) = &self.hub {
            // Serve the posts aimed at this agent: only now do they start moving.
            let mine: Vec<_> = {
                let mut p = hub.pending.lock();
                let (mine, rest) = std::mem::take(&mut *p)
                    .into_iter()
                    .partition(|(t, _, _, _)| *t == self.agent);
                *p = rest;
                mine
            };
            for (_, ini, id, o) in mine {
                // SAFETY: the initiator's agent keeps the memory pinned while the
                // transfer is in progress (it polls InProgress until now).
                if unsafe { ini.post(id, &o) }.is_ok() {
                    n += 1;
                }
            }
        }
        Ok(n + self.inner.progress()?)
    }
    fn notify(&self, p: EndpointId, b: Bytes) -> kv_core::Result<()> {
        self.inner.notify(p, b)
    }
    fn drain_notifications(&self, out: &mut Vec<Notification>) -> kv_core::Result<usize> {
        self.inner.drain_notifications(out)
    }
    fn estimate_cost(&self, _req: &TransferRequest) -> Option<Duration> {
        self.cost
    }
}

/// A DRAM WRITE of one local range into one remote range.
pub fn write1(local: Descriptor, peer: PeerId, remote: Descriptor) -> TransferSpec {
    TransferSpec::write(
        DescriptorList::single(local).unwrap(),
        peer,
        DescriptorList::single(remote).unwrap(),
    )
}

/// An agent with the shared secret and `backends` added.
pub fn agent(name: &str, o: AgentOptions, backends: Vec<Arc<Hooked>>) -> Agent {
    let a = Agent::new(name, o).unwrap();
    for b in backends {
        a.add_backend_instance(b).unwrap();
    }
    a
}

/// A fresh fabric's backend for agent `name`.
pub fn loopback(f: &LoopbackFabric, name: &str) -> LoopbackBackend {
    f.backend(&BackendInit::new(name))
}

/// A prefill and a decode agent on one loopback fabric, each with a `Hooked` backend
/// called `backend` (set up by `pk` / `dk`) and one registered 4 KiB region (patterns
/// `seed`, `seed + 1`); prefill loaded decode's metadata as `peer`.
pub struct Pair {
    pub p: Agent,
    pub d: Agent,
    pub pb: Arc<Hooked>,
    pub db: Arc<Hooked>,
    pub src: Region<LoopMem>,
    pub dst: Region<LoopMem>,
    pub rs: Registration,
    pub rd: Registration,
    pub peer: PeerId,
}

pub fn pair(
    backend: &str,
    seed: u64,
    pk: impl FnOnce(&mut Hooked),
    dk: impl FnOnce(&mut Hooked),
) -> Pair {
    let f = LoopbackFabric::new();
    let (mut pb, mut db) = (
        Hooked::new(loopback(&f, "prefill"), "prefill", backend),
        Hooked::new(loopback(&f, "decode"), "decode", backend),
    );
    pk(&mut pb);
    dk(&mut db);
    let (pb, db) = (Arc::new(pb), Arc::new(db));
    let p = agent("prefill", opts(), vec![pb.clone()]);
    let d = agent("decode", opts(), vec![db.clone()]);
    let (src, dst) = (pb.region(4096, seed), db.region(4096, seed + 1));
    let rs = p.register(&src).unwrap();
    let rd = d.register(&dst).unwrap();
    let peer = p.load_remote(&d.local_metadata().unwrap()).unwrap();
    Pair {
        p,
        d,
        pb,
        db,
        src,
        dst,
        rs,
        rd,
        peer,
    }
}

impl Pair {
    /// A WRITE of the whole source region into the whole destination region.
    pub fn write(&self) -> TransferSpec {
        write1(self.src.descriptor(), self.peer, self.rd.descriptor())
    }
}

mod reference;
#[allow(unused_imports)] // only the engine tests use the reference re-layout
pub use reference::*;
