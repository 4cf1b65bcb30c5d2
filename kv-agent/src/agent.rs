//! The `Agent`: backends, registrations, peers and transfers.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use kv_core::{
    AgentMetadata, Backend, BackendMetadata, Descriptor, DescriptorList, EndpointId, Error,
    MemKind, Notification, Op, Params, RegistrationId, RegistrationMetadata, RemoteId, Result,
    TransferRequest,
};
use kv_mem::{Memory, Region};
use parking_lot::{Mutex, RwLock};

use crate::transfer::{Transfer, TransferSpec};

/// Options of an [`Agent`]; plain struct with `Default`.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// Backend preference order by name; backends not listed come after, in the order
    /// they were added. Empty: prefer the backend with the lowest cost estimate.
    pub backend_preference: Vec<String>,
    /// Deadline of a transfer that does not set its own.
    pub default_deadline: Duration,
    /// Run a thread that drives every backend's `progress` (so transfers complete
    /// without the caller polling).
    pub progress_thread: bool,
    /// This incarnation's generation; `None` derives one from the clock, so a restarted
    /// agent always publishes a higher number than before.
    pub generation: Option<u64>,
    /// Timeout of side-channel connections (metadata fetch and publish).
    pub channel_timeout: Duration,
}

impl Default for AgentOptions {
    fn default() -> Self {
        AgentOptions {
            backend_preference: Vec::new(),
            default_deadline: Duration::from_secs(30),
            progress_thread: false,
            generation: None,
            channel_timeout: Duration::from_secs(5),
        }
    }
}

/// A peer whose metadata was loaded; valid until the peer publishes a new generation or
/// is invalidated. `Copy`, `Send + Sync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId(pub u64);

impl std::fmt::Display for PeerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "peer#{}", self.0)
    }
}

/// Counters of one backend, summed over every transfer it carried. `Clone`,
/// `Send + Sync`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackendStats {
    /// Posts started.
    pub posted: u64,
    /// Posts that completed.
    pub completed: u64,
    /// Posts that failed (including timeouts and cancellations).
    pub failed: u64,
    /// Bytes of completed posts.
    pub bytes: u64,
}

pub(crate) struct LoadedBackend {
    pub(crate) name: String,
    pub(crate) backend: Arc<dyn Backend>,
    pub(crate) stats: Mutex<BackendStats>,
}

pub(crate) struct RegionEntry {
    pub(crate) id: u64,
    pub(crate) kind: MemKind,
    pub(crate) desc: Descriptor,
    /// Keeps the memory alive while registered (custody); leaked if a backend fails
    /// to deregister, so memory a backend may still touch is never freed.
    keep: Mutex<Option<Arc<dyn Memory>>>,
    /// (backend, its registration id).
    pub(crate) regs: Vec<(Arc<LoadedBackend>, RegistrationId)>,
    /// Pins and the dropped/deregistered flags, under one lock so a post can never pin
    /// a region whose deregistration already started.
    state: Mutex<RegionState>,
}

#[derive(Default)]
struct RegionState {
    /// Posted transfers that name this region.
    inflight: usize,
    /// The user dropped (or deregistered) its handle; deregister once `inflight` is 0.
    dropped: bool,
    /// Deregistration ran (or is running).
    done: bool,
}

impl RegionEntry {
    fn registered_on(&self, backend: &str) -> bool {
        self.regs.iter().any(|(b, _)| b.name == backend)
    }

    fn is_dropped(&self) -> bool {
        self.state.lock().dropped
    }

    /// Pins the region for one posted transfer; refused once it is being deregistered.
    pub(crate) fn pin(&self) -> Result<()> {
        let mut st = self.state.lock();
        if st.dropped || st.done {
            return Err(Error::NotRegistered(format!(
                "region {} was deregistered; register the memory again and re-prepare",
                self.id
            )));
        }
        st.inflight += 1;
        Ok(())
    }

    /// Posted transfers that name this region now.
    pub(crate) fn inflight(&self) -> usize {
        self.state.lock().inflight
    }
}

pub(crate) struct PeerEntry {
    pub(crate) id: PeerId,
    pub(crate) name: String,
    pub(crate) generation: u64,
    pub(crate) state: Mutex<PeerState>,
    /// Set when a newer generation replaced this one or it was invalidated.
    pub(crate) retired: Mutex<Option<String>>,
    /// Bumped whenever an imported region of this peer is withdrawn, so a prepared
    /// transfer re-checks its remote regions before its next post.
    pub(crate) epoch: AtomicU64,
}

#[derive(Default)]
pub(crate) struct PeerState {
    backends: Vec<BackendMetadata>,
    regions: HashMap<u64, RegistrationMetadata>,
    endpoints: HashMap<String, EndpointId>,
    imported: HashMap<(String, u64), Vec<RemoteId>>,
}

impl PeerEntry {
    pub(crate) fn check_current(&self) -> Result<()> {
        match &*self.retired.lock() {
            None => Ok(()),
            Some(why) => Err(Error::NotRegistered(format!(
                "{} ({}, generation {}): {why}",
                self.id, self.name, self.generation
            ))),
        }
    }
}

pub(crate) struct Inner {
    pub(crate) name: String,
    pub(crate) generation: u64,
    pub(crate) opts: AgentOptions,
    pub(crate) backends: RwLock<Vec<Arc<LoadedBackend>>>,
    unavailable: Mutex<Vec<(String, String)>>,
    pub(crate) regions: RwLock<HashMap<u64, Arc<RegionEntry>>>,
    next_region: AtomicU64,
    pub(crate) peers: RwLock<HashMap<PeerId, Arc<PeerEntry>>>,
    by_name: Mutex<HashMap<String, PeerId>>,
    next_peer: AtomicU64,
    pub(crate) channel: crate::channel::ChannelState,
    stop: AtomicBool,
}

/// The agent an inference engine embeds: it owns backends and registrations, exchanges
/// metadata with peers, and prepares and posts transfers.
///
/// `Send + Sync` and cheap to clone (an `Arc` inside): share one agent between threads.
/// Posting and polling take read locks only; registering memory, loading metadata and
/// adding backends take short write locks.
#[derive(Clone)]
pub struct Agent {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("name", &self.inner.name)
            .field("generation", &self.inner.generation)
            .field("backends", &self.backends())
            .finish_non_exhaustive()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Most descriptors one remote registration may expand to (agents publish one range
/// per registration; this bounds what a peer can make us iterate).
const MAX_REMOTE_DESCRIPTORS: u64 = 4096;

/// Type of a function that creates a backend by name: `(agent name, params)`.
pub type BackendFactory = fn(&str, &Params) -> Result<Arc<dyn Backend>>;

impl Agent {
    /// A new agent called `name` (unique among the agents that talk to each other).
    pub fn new(name: &str, opts: AgentOptions) -> Result<Agent> {
        if name.is_empty() || name.len() > kv_core::codec::MAX_NAME_LEN {
            return Err(Error::invalid_argument(format!(
                "agent name must be 1..={} bytes",
                kv_core::codec::MAX_NAME_LEN
            )));
        }
        let generation = opts.generation.unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
        let inner = Arc::new(Inner {
            name: name.to_string(),
            generation,
            opts: opts.clone(),
            backends: RwLock::new(Vec::new()),
            unavailable: Mutex::new(Vec::new()),
            regions: RwLock::new(HashMap::new()),
            next_region: AtomicU64::new(1),
            peers: RwLock::new(HashMap::new()),
            by_name: Mutex::new(HashMap::new()),
            next_peer: AtomicU64::new(1),
            channel: Default::default(),
            stop: AtomicBool::new(false),
        });
        if opts.progress_thread {
            let weak = Arc::downgrade(&inner);
            std::thread::Builder::new()
                .name(format!("kv-agent-progress-{name}"))
                .spawn(move || progress_loop(weak))
                .map_err(|e| Error::io("starting the progress thread", e))?;
        }
        Ok(Agent { inner })
    }

    /// The agent's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// This incarnation's generation number.
    pub fn generation(&self) -> u64 {
        self.inner.generation
    }

    /// Creates a backend by name (`tcp`, `ucx`, `libfabric`, `gds`) with its parameters
    /// and adds it. A backend whose library is missing fails with
    /// [`Error::BackendUnavailable`] and is listed by [`Agent::unavailable`].
    pub fn add_backend(&self, name: &str, params: &Params) -> Result<()> {
        let factory = crate::backends::factory(name).ok_or_else(|| Error::BackendUnavailable {
            name: name.into(),
            reason: format!(
                "unknown backend; this build knows [{}]",
                crate::backends::known().join(", ")
            ),
        })?;
        match factory(&self.inner.name, params) {
            Ok(b) => self.add_backend_instance(b),
            Err(e) => {
                tracing::info!(backend = name, error = %e, "backend unavailable");
                self.inner
                    .unavailable
                    .lock()
                    .push((name.to_string(), e.to_string()));
                Err(e)
            }
        }
    }

    /// Adds a backend built elsewhere (a third-party plugin). Its `name()` must be unique
    /// in this agent and equal to the name peers use for it.
    pub fn add_backend_instance(&self, backend: Arc<dyn Backend>) -> Result<()> {
        let name = backend.name().to_string();
        let mut bs = self.inner.backends.write();
        if bs.iter().any(|b| b.name == name) {
            return Err(Error::invalid_argument(format!(
                "backend {name} is already loaded"
            )));
        }
        bs.push(Arc::new(LoadedBackend {
            name,
            backend,
            stats: Mutex::new(BackendStats::default()),
        }));
        Ok(())
    }

    /// Names of the usable backends, in the order they were added.
    pub fn backends(&self) -> Vec<String> {
        self.inner
            .backends
            .read()
            .iter()
            .map(|b| b.name.clone())
            .collect()
    }

    /// Backends that could not be created, with the reason.
    pub fn unavailable(&self) -> Vec<(String, String)> {
        self.inner.unavailable.lock().clone()
    }

    /// The loaded backend called `name`.
    pub fn backend(&self, name: &str) -> Option<Arc<dyn Backend>> {
        self.inner
            .backends
            .read()
            .iter()
            .find(|b| b.name == name)
            .map(|b| b.backend.clone())
    }

    /// Counters of every loaded backend.
    pub fn stats(&self) -> Vec<(String, BackendStats)> {
        self.inner
            .backends
            .read()
            .iter()
            .map(|b| (b.name.clone(), b.stats.lock().clone()))
            .collect()
    }

    /// Registers `region` with every loaded backend that supports its kind. The returned
    /// handle keeps the memory alive; dropping it deregisters once no posted transfer
    /// names the region.
    pub fn register<M: Memory>(&self, region: &Region<M>) -> Result<Registration> {
        let (kind, desc) = (region.kind(), region.descriptor());
        let backends = self.inner.backends.read().clone();
        let mut regs = Vec::new();
        let mut why = Vec::new();
        for b in backends {
            if !b.backend.capabilities().mem_kinds.contains(kind) {
                why.push(format!("{}: does not support {kind}", b.name));
                continue;
            }
            // SAFETY: `region.keep_alive()` is stored in the entry below and dropped
            // only after every backend deregistered, so the memory outlives the
            // registration (kv_mem::Memory promises a stable, valid range).
            match unsafe { b.backend.register(kind, &desc) } {
                Ok(id) => regs.push((b, id)),
                Err(e) => {
                    tracing::debug!(backend = %b.name, error = %e, "registration skipped");
                    why.push(format!("{}: {e}", b.name));
                }
            }
        }
        if regs.is_empty() {
            return Err(Error::Unsupported(format!(
                "no loaded backend could register {kind} memory [{}]",
                why.join("; ")
            )));
        }
        let id = self.inner.next_region.fetch_add(1, Ordering::Relaxed);
        let entry = Arc::new(RegionEntry {
            id,
            kind,
            desc,
            keep: Mutex::new(Some(region.keep_alive())),
            regs,
            state: Mutex::new(RegionState::default()),
        });
        self.inner.regions.write().insert(id, entry.clone());
        Ok(Registration {
            inner: self.inner.clone(),
            entry,
        })
    }

    fn metadata_for(&self, regions: Option<&[&Registration]>) -> Result<Bytes> {
        let backends = self.inner.backends.read().clone();
        let mut bmeta = Vec::with_capacity(backends.len());
        for b in &backends {
            bmeta.push(BackendMetadata {
                name: b.name.clone(),
                connection: b.backend.connection_info()?,
            });
        }
        let entries: Vec<Arc<RegionEntry>> = match regions {
            None => {
                let mut v: Vec<_> = self.inner.regions.read().values().cloned().collect();
                v.sort_by_key(|e| e.id);
                v
            }
            Some(rs) => rs.iter().map(|r| r.entry.clone()).collect(),
        };
        let mut registrations = Vec::with_capacity(entries.len());
        for e in entries.iter().filter(|e| !e.is_dropped()) {
            let mut keys = Vec::new();
            for (b, rid) in &e.regs {
                if let Some(idx) = backends.iter().position(|x| x.name == b.name) {
                    keys.push((idx as u16, b.backend.remote_key(*rid)?));
                }
            }
            registrations.push(RegistrationMetadata {
                id: e.id,
                kind: e.kind,
                descs: DescriptorList::single(e.desc),
                keys,
            });
        }
        AgentMetadata {
            name: self.inner.name.clone(),
            generation: self.inner.generation,
            partial: regions.is_some(),
            backends: bmeta,
            registrations,
            removed: Vec::new(),
        }
        .encode()
    }

    /// Everything a peer needs: backends with connection info and every registration.
    pub fn local_metadata(&self) -> Result<Bytes> {
        self.metadata_for(None)
    }

    /// An incremental update naming only `regions` (added or changed).
    pub fn partial_metadata(&self, regions: &[&Registration]) -> Result<Bytes> {
        self.metadata_for(Some(regions))
    }

    /// Loads a peer's metadata (full or partial). A higher generation than the one
    /// known replaces it: the old [`PeerId`] is refused from then on.
    pub fn load_remote(&self, bytes: &[u8]) -> Result<PeerId> {
        let meta = AgentMetadata::decode(bytes)?;
        let mut by_name = self.inner.by_name.lock();
        let known = by_name
            .get(&meta.name)
            .and_then(|id| self.inner.peers.read().get(id).cloned());
        if let Some(p) = &known {
            if meta.generation < p.generation {
                return Err(Error::InvalidMetadata(format!(
                    "stale metadata for {}: generation {} is older than the loaded {}",
                    meta.name, meta.generation, p.generation
                )));
            }
            if meta.generation == p.generation {
                self.apply(p, meta)?;
                return Ok(p.id);
            }
            if meta.partial {
                // Never let a partial message knock out the live incarnation.
                return Err(Error::InvalidMetadata(format!(
                    "partial metadata for {} generation {} but generation {} is loaded; load full metadata of the new generation",
                    meta.name, meta.generation, p.generation
                )));
            }
            self.retire(
                p,
                format!(
                    "the peer restarted (generation {} replaced it); use the PeerId from the new load_remote",
                    meta.generation
                ),
            );
        }
        if meta.partial {
            return Err(Error::InvalidMetadata(format!(
                "partial metadata for {} (generation {}) but no full metadata of that generation was loaded",
                meta.name, meta.generation
            )));
        }
        let id = PeerId(self.inner.next_peer.fetch_add(1, Ordering::Relaxed));
        let entry = Arc::new(PeerEntry {
            id,
            name: meta.name.clone(),
            generation: meta.generation,
            state: Mutex::new(PeerState::default()),
            retired: Mutex::new(None),
            epoch: AtomicU64::new(0),
        });
        self.apply(&entry, meta)?;
        by_name.insert(entry.name.clone(), id);
        self.inner.peers.write().insert(id, entry);
        Ok(id)
    }

    fn apply(&self, p: &PeerEntry, meta: AgentMetadata) -> Result<()> {
        if let Some(r) = meta
            .registrations
            .iter()
            .find(|r| r.descs.len() > MAX_REMOTE_DESCRIPTORS)
        {
            return Err(Error::InvalidMetadata(format!(
                "registration {} of {} has {} descriptors; at most {MAX_REMOTE_DESCRIPTORS} are accepted",
                r.id,
                meta.name,
                r.descs.len()
            )));
        }
        let mut st = p.state.lock();
        if !meta.partial {
            // A full message replaces the registrations; imported ones that vanished
            // are released below.
            st.backends = meta.backends.clone();
            let keep: std::collections::HashSet<u64> =
                meta.registrations.iter().map(|r| r.id).collect();
            let gone: Vec<u64> = st
                .regions
                .keys()
                .filter(|k| !keep.contains(k))
                .copied()
                .collect();
            for id in gone {
                self.drop_remote_region(p, &mut st, id);
            }
        }
        for r in meta.registrations {
            let mut r = r;
            // Keys name backends by index into this message's backend list; store names.
            r.keys.retain(|(i, _)| (*i as usize) < meta.backends.len());
            let changed = st.regions.get(&r.id).is_some_and(|old| *old != r);
            if changed {
                self.drop_remote_region(p, &mut st, r.id);
            }
            let mut named = r.clone();
            named.keys = r
                .keys
                .iter()
                .filter_map(|(i, k)| {
                    let name = &meta.backends[*i as usize].name;
                    st.backends
                        .iter()
                        .position(|b| &b.name == name)
                        .map(|j| (j as u16, k.clone()))
                })
                .collect();
            st.regions.insert(r.id, named);
        }
        for id in meta.removed {
            self.drop_remote_region(p, &mut st, id);
        }
        Ok(())
    }

    fn drop_remote_region(&self, p: &PeerEntry, st: &mut PeerState, id: u64) {
        p.epoch.fetch_add(1, Ordering::AcqRel);
        st.regions.remove(&id);
        let keys: Vec<(String, u64)> = st
            .imported
            .keys()
            .filter(|(_, r)| *r == id)
            .cloned()
            .collect();
        for k in keys {
            if let (Some(rids), Some(b)) = (st.imported.remove(&k), self.backend(&k.0)) {
                for rid in rids {
                    let _ = b.release_remote(rid);
                }
            }
        }
    }

    fn retire(&self, p: &PeerEntry, why: String) {
        *p.retired.lock() = Some(why);
        let mut st = p.state.lock();
        for ((backend, _), rids) in st.imported.drain() {
            if let Some(b) = self.backend(&backend) {
                for rid in rids {
                    let _ = b.release_remote(rid);
                }
            }
        }
        for (backend, ep) in st.endpoints.drain() {
            if let Some(b) = self.backend(&backend) {
                let _ = b.disconnect(ep);
            }
        }
        self.inner.peers.write().remove(&p.id);
    }

    /// Forgets a peer: its [`PeerId`] is refused from then on.
    pub fn invalidate_remote(&self, peer: PeerId) -> Result<()> {
        let p = self.peer(peer)?;
        let mut by_name = self.inner.by_name.lock();
        if by_name.get(&p.name) == Some(&peer) {
            by_name.remove(&p.name);
        }
        self.retire(&p, "invalidated by the local agent".into());
        Ok(())
    }

    /// The name and generation of a loaded peer.
    pub fn peer_info(&self, peer: PeerId) -> Result<(String, u64)> {
        let p = self.peer(peer)?;
        Ok((p.name.clone(), p.generation))
    }

    /// The current [`PeerId`] of the agent called `name`, if its metadata is loaded.
    pub fn peer_by_name(&self, name: &str) -> Option<PeerId> {
        self.inner.by_name.lock().get(name).copied()
    }

    /// Registration ids (and their descriptors) a peer published.
    pub fn remote_regions(&self, peer: PeerId) -> Result<Vec<(u64, MemKind, DescriptorList)>> {
        let p = self.peer(peer)?;
        let st = p.state.lock();
        let mut v: Vec<_> = st
            .regions
            .values()
            .map(|r| (r.id, r.kind, r.descs.clone()))
            .collect();
        v.sort_by_key(|x| x.0);
        Ok(v)
    }

    pub(crate) fn peer(&self, peer: PeerId) -> Result<Arc<PeerEntry>> {
        self.inner.peers.read().get(&peer).cloned().ok_or_else(|| {
            Error::NotRegistered(format!(
                "{peer} is not loaded (invalidated, or replaced by a newer generation); load_remote again"
            ))
        })
    }

    /// The endpoint of `peer` on `backend`, connecting on first use.
    pub(crate) fn endpoint(&self, p: &PeerEntry, b: &LoadedBackend) -> Result<EndpointId> {
        let info = {
            let st = p.state.lock();
            if let Some(ep) = st.endpoints.get(&b.name) {
                return Ok(*ep);
            }
            st.backends
                .iter()
                .find(|x| x.name == b.name)
                .map(|x| x.connection.clone())
                .ok_or_else(|| Error::NoCommonBackend {
                    local: vec![b.name.clone()],
                    remote: st.backends.iter().map(|x| x.name.clone()).collect(),
                })?
        };
        // Connect without holding the peer's lock: it may take up to the backend's
        // connect timeout.
        let ep = b.backend.connect(&p.name, &info)?;
        let mut st = p.state.lock();
        match st.endpoints.get(&b.name) {
            Some(existing) => {
                // Another thread connected first; keep its endpoint.
                let existing = *existing;
                drop(st);
                let _ = b.backend.disconnect(ep);
                Ok(existing)
            }
            None => {
                st.endpoints.insert(b.name.clone(), ep);
                Ok(ep)
            }
        }
    }

    /// Refuses a post whose remote regions were withdrawn since it was prepared.
    pub(crate) fn check_remote_regions(
        &self,
        p: &PeerEntry,
        backend: &str,
        ids: &[u64],
        seen: &AtomicU64,
    ) -> Result<()> {
        let now = p.epoch.load(Ordering::Acquire);
        if seen.load(Ordering::Acquire) == now {
            return Ok(());
        }
        let st = p.state.lock();
        for id in ids {
            if !st.imported.contains_key(&(backend.to_string(), *id)) {
                return Err(Error::NotRegistered(format!(
                    "remote region {id} of {} was withdrawn (deregistered or replaced in new metadata); prepare the transfer again",
                    p.name
                )));
            }
        }
        seen.store(now, Ordering::Release);
        Ok(())
    }

    /// Imports remote region `id` of `p` on `b` if not done yet.
    pub(crate) fn import(
        &self,
        p: &PeerEntry,
        b: &LoadedBackend,
        ep: EndpointId,
        id: u64,
    ) -> Result<()> {
        let mut st = p.state.lock();
        if st.imported.contains_key(&(b.name.clone(), id)) {
            return Ok(());
        }
        let r = st
            .regions
            .get(&id)
            .ok_or_else(|| Error::NotRegistered(format!("remote region {id} of {}", p.name)))?;
        let key = r
            .keys
            .iter()
            .find(|(i, _)| {
                st.backends
                    .get(*i as usize)
                    .is_some_and(|x| x.name == b.name)
            })
            .map(|(_, k)| k.clone())
            .ok_or_else(|| {
                Error::NotRegistered(format!(
                    "remote region {id} of {} has no key for backend {}",
                    p.name, b.name
                ))
            })?;
        let kind = r.kind;
        let descs: Vec<Descriptor> = r.descs.iter().collect();
        let mut rids = Vec::with_capacity(descs.len());
        for d in descs {
            match b.backend.import_remote(ep, kind, &d, &key) {
                Ok(x) => rids.push(x),
                Err(e) => {
                    for x in rids {
                        let _ = b.backend.release_remote(x);
                    }
                    return Err(e);
                }
            }
        }
        st.imported.insert((b.name.clone(), id), rids);
        Ok(())
    }

    /// Remote regions of `p` whose ranges contain every entry of `list`, and their
    /// backends' key availability.
    pub(crate) fn remote_regions_for(
        &self,
        p: &PeerEntry,
        kind: MemKind,
        list: &DescriptorList,
    ) -> Result<(Vec<u64>, Vec<String>)> {
        let st = p.state.lock();
        let mut ids = Vec::new();
        for e in list.entries() {
            let x = e
                .extent()
                .ok_or_else(|| Error::OutOfBounds("remote entry overflows".into()))?;
            let r = st
                .regions
                .values()
                .filter(|r| r.kind == kind && r.descs.iter().any(|d| d.contains(&x)))
                // Memory freed and registered again shows up as a newer region over the
                // same addresses (the peer may not have published the removal): the
                // newest registration is the live one.
                .max_by_key(|r| r.id)
                .ok_or_else(|| {
                    Error::OutOfBounds(format!(
                        "remote range {:#x}+{} is outside every {kind} region {} registered",
                        x.addr, x.len, p.name
                    ))
                })?;
            if !ids.contains(&r.id) {
                ids.push(r.id);
            }
        }
        let mut backends: Option<Vec<String>> = None;
        for id in &ids {
            let names: Vec<String> = st.regions[id]
                .keys
                .iter()
                .filter_map(|(i, _)| st.backends.get(*i as usize).map(|b| b.name.clone()))
                .collect();
            backends = Some(match backends {
                None => names,
                Some(prev) => prev.into_iter().filter(|n| names.contains(n)).collect(),
            });
        }
        Ok((ids, backends.unwrap_or_default()))
    }

    /// Local regions whose ranges contain every entry of `list`.
    pub(crate) fn local_regions_for(
        &self,
        kind: MemKind,
        list: &DescriptorList,
    ) -> Result<Vec<Arc<RegionEntry>>> {
        let regions = self.inner.regions.read();
        let mut out: Vec<Arc<RegionEntry>> = Vec::new();
        for e in list.entries() {
            let x = e
                .extent()
                .ok_or_else(|| Error::OutOfBounds("local entry overflows".into()))?;
            if out.iter().any(|r| r.desc.contains(&x)) {
                continue;
            }
            let r = regions
                .values()
                .find(|r| r.kind == kind && r.desc.contains(&x) && !r.is_dropped())
                .ok_or_else(|| {
                    Error::NotRegistered(format!(
                        "local range {:#x}+{} is outside every registered {kind} region",
                        x.addr, x.len
                    ))
                })?;
            out.push(r.clone());
        }
        Ok(out)
    }

    /// Chooses the backend for a transfer: loaded here, published by the peer, holding
    /// every region on both sides, supporting both kinds and the op; then by preference.
    pub(crate) fn choose_backend(
        &self,
        spec: &TransferSpec,
        local: &[Arc<RegionEntry>],
        remote_backends: &[String],
        p: &PeerEntry,
    ) -> Result<Arc<LoadedBackend>> {
        let backends = self.inner.backends.read().clone();
        let mut cands: Vec<Arc<LoadedBackend>> = backends
            .iter()
            .filter(|b| {
                let c = b.backend.capabilities();
                c.mem_kinds.contains(spec.local_kind)
                    && c.mem_kinds.contains(spec.remote_kind)
                    && match spec.op {
                        Op::Write => c.write,
                        Op::Read => c.read,
                    }
                    && local.iter().all(|r| r.registered_on(&b.name))
                    && remote_backends.contains(&b.name)
                    && spec.backend.as_ref().is_none_or(|want| *want == b.name)
            })
            .cloned()
            .collect();
        if cands.is_empty() {
            let remote = p
                .state
                .lock()
                .backends
                .iter()
                .map(|b| b.name.clone())
                .collect();
            return Err(Error::NoCommonBackend {
                local: backends.iter().map(|b| b.name.clone()).collect(),
                remote,
            });
        }
        let pref = &self.inner.opts.backend_preference;
        if !pref.is_empty() || cands.len() == 1 {
            cands.sort_by_key(|b| pref.iter().position(|x| *x == b.name).unwrap_or(usize::MAX));
            return Ok(cands.swap_remove(0));
        }
        // No preference: ask each candidate what the transfer would cost (connecting to
        // the peer if needed); backends that give no estimate keep their load order
        // after those that do, and a backend that cannot reach the peer drops out.
        let mut costed = Vec::with_capacity(cands.len());
        let mut last_err = None;
        for (i, b) in cands.into_iter().enumerate() {
            match self.endpoint(p, &b) {
                Ok(ep) => {
                    let cost = b.backend.estimate_cost(&TransferRequest {
                        op: spec.op,
                        local_kind: spec.local_kind,
                        local: spec.local.clone(),
                        peer: ep,
                        remote_kind: spec.remote_kind,
                        remote: spec.remote.clone(),
                    });
                    costed.push((cost.is_none(), cost, i, b));
                }
                Err(e) => last_err = Some(e),
            }
        }
        costed.sort_by_key(|(none, cost, i, _)| (*none, *cost, *i));
        match costed.into_iter().next() {
            Some((_, _, _, b)) => Ok(b),
            None => {
                Err(last_err.unwrap_or_else(|| Error::invalid_argument("no candidate backend")))
            }
        }
    }

    /// Prepares a transfer once; post it any number of times.
    pub fn prepare(&self, spec: &TransferSpec) -> Result<Transfer> {
        Transfer::prepare(self, spec)
    }

    /// Prepares and posts a transfer in one call (the one-shot case).
    pub fn transfer(&self, spec: &TransferSpec, notification: Option<Bytes>) -> Result<Transfer> {
        let t = self.prepare(spec)?;
        t.post(notification)?;
        Ok(t)
    }

    /// Sends a notification alone (no data) to `peer`, after earlier posts on the same
    /// backend.
    pub fn notify(&self, peer: PeerId, payload: Bytes) -> Result<()> {
        let p = self.peer(peer)?;
        p.check_current()?;
        let published: Vec<String> = p
            .state
            .lock()
            .backends
            .iter()
            .map(|b| b.name.clone())
            .collect();
        let backends = self.inner.backends.read().clone();
        let mut cands: Vec<_> = backends
            .into_iter()
            .filter(|b| b.backend.capabilities().notifications && published.contains(&b.name))
            .collect();
        let pref = &self.inner.opts.backend_preference;
        cands.sort_by_key(|b| pref.iter().position(|x| *x == b.name).unwrap_or(usize::MAX));
        let b = cands.first().ok_or_else(|| Error::NoCommonBackend {
            local: self.backends(),
            remote: published.clone(),
        })?;
        let ep = self.endpoint(&p, b)?;
        b.backend.notify(ep, payload)
    }

    /// Drains the notifications received on every backend, oldest first per backend.
    pub fn notifications(&self) -> Result<Vec<Notification>> {
        let mut out = Vec::new();
        for b in self.inner.backends.read().iter() {
            b.backend.drain_notifications(&mut out)?;
        }
        Ok(out)
    }

    /// Drives every backend once; returns the number of events handled.
    pub fn progress(&self) -> Result<usize> {
        progress_all(&self.inner)
    }
}

fn progress_all(inner: &Inner) -> Result<usize> {
    let mut n = 0;
    for b in inner.backends.read().iter() {
        n += b.backend.progress()?;
    }
    Ok(n)
}

fn progress_loop(weak: Weak<Inner>) {
    let mut idle = 0u32;
    loop {
        let Some(inner) = weak.upgrade() else { return };
        if inner.stop.load(Ordering::Relaxed) {
            return;
        }
        let n = progress_all(&inner).unwrap_or(0);
        drop(inner);
        if n == 0 {
            idle = idle.saturating_add(1);
            // Spin briefly after activity, then back off to 1 ms.
            if idle > 100 {
                std::thread::sleep(Duration::from_millis(1));
            } else {
                std::thread::yield_now();
            }
        } else {
            idle = 0;
        }
    }
}

impl Inner {
    /// Called when a posted transfer that named `r` finished.
    pub(crate) fn unpin(&self, r: &RegionEntry) {
        let run = {
            let mut st = r.state.lock();
            st.inflight = st.inflight.saturating_sub(1);
            let run = st.inflight == 0 && st.dropped && !st.done;
            st.done |= run;
            run
        };
        if run {
            self.deregister_now(r);
        }
    }

    /// Marks the region dropped; deregisters now if nothing is in flight.
    fn drop_region(&self, r: &RegionEntry) {
        let run = {
            let mut st = r.state.lock();
            st.dropped = true;
            let run = st.inflight == 0 && !st.done;
            st.done |= run;
            run
        };
        if run {
            self.deregister_now(r);
        }
    }

    fn deregister_now(&self, r: &RegionEntry) {
        let mut failed = false;
        for (b, id) in &r.regs {
            if let Err(e) = b.backend.deregister(*id) {
                tracing::error!(backend = %b.name, region = r.id, error = %e, "deregistration failed; keeping the memory alive");
                failed = true;
            }
        }
        if failed {
            // A backend may still touch the memory: never free it.
            if let Some(k) = r.keep.lock().take() {
                std::mem::forget(k);
            }
        }
        self.regions.write().remove(&r.id);
    }
}

/// A registered region. Dropping it deregisters the memory once no posted transfer names
/// it (custody); until then the memory is kept alive. `Send + Sync`.
pub struct Registration {
    inner: Arc<Inner>,
    pub(crate) entry: Arc<RegionEntry>,
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registration")
            .field("id", &self.entry.id)
            .field("kind", &self.entry.kind)
            .field("desc", &self.entry.desc)
            .field("backends", &self.backends())
            .finish()
    }
}

impl Registration {
    /// The agent-wide id peers see in metadata.
    pub fn id(&self) -> u64 {
        self.entry.id
    }

    /// The registered range.
    pub fn descriptor(&self) -> Descriptor {
        self.entry.desc
    }

    /// Memory kind.
    pub fn kind(&self) -> MemKind {
        self.entry.kind
    }

    /// Backends that registered it.
    pub fn backends(&self) -> Vec<String> {
        self.entry
            .regs
            .iter()
            .map(|(b, _)| b.name.clone())
            .collect()
    }

    /// Deregisters now; fails with [`Error::Busy`] (and keeps the registration) while a
    /// posted transfer names it.
    pub fn deregister(self) -> std::result::Result<(), (Error, Registration)> {
        let n = self.entry.inflight();
        if n > 0 {
            return Err((
                Error::Busy(format!(
                    "region {} is named by {n} posted transfer(s); wait or cancel them first",
                    self.entry.id
                )),
                self,
            ));
        }
        drop(self);
        Ok(())
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.inner.drop_region(&self.entry);
    }
}

/// Returns a deadline `d` from now (saturating).
pub(crate) fn deadline_from_now(d: Duration) -> Instant {
    Instant::now()
        .checked_add(d)
        .unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400 * 365))
}
