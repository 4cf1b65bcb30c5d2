//! Peers: the metadata this agent publishes and the metadata it loaded from others —
//! generations (a restarted peer replaces the old one), the regions each peer
//! published, the endpoints connected to it and the regions imported from it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use kv_core::{
    Access, AgentMetadata, BackendMetadata, Descriptor, DescriptorList, EndpointId, Error, MemKind,
    RegistrationMetadata, RemoteId, Result,
};
use parking_lot::{Mutex, RwLock};

use crate::registry::{LoadedBackend, RegionEntry, Registry};
use crate::slow::Deferred;

/// A peer whose metadata was loaded; valid until the peer publishes a new generation or
/// is invalidated. `Copy`, `Send + Sync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId(pub u64);

impl std::fmt::Display for PeerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "peer#{}", self.0)
    }
}

/// Most descriptors one remote registration may expand to (agents publish one range
/// per registration; this bounds what a peer can make us iterate).
const MAX_REMOTE_DESCRIPTORS: u64 = 4096;

/// Attribute names the agent publishes itself; users' attributes may not use them.
pub(crate) const RESERVED_PREFIX: &str = "kv-agent/";
/// Where a peer runs: its host's boot id and a random id of its process (32 bytes).
const LOCALITY: &str = "kv-agent/locality";

/// Where a peer runs relative to this process, from the locality it published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Locality {
    /// An agent in this process.
    SameProcess,
    /// Another process on this host.
    SameHost,
    /// Another host (or a host we cannot tell is ours).
    OtherHost,
    /// The peer published no locality (hand-made or foreign metadata).
    Unknown,
}

/// This process's locality value: the host's boot id (zeros if unknown) and a random
/// process id.
fn my_locality() -> &'static [u8; 32] {
    static ME: OnceLock<[u8; 32]> = OnceLock::new();
    ME.get_or_init(|| {
        let mut v = [0u8; 32];
        let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
        let hex: Vec<u8> = boot
            .bytes()
            .filter_map(|c| (c as char).to_digit(16).map(|d| d as u8))
            .collect();
        if hex.len() == 32 {
            for (i, pair) in hex.chunks_exact(2).enumerate() {
                v[i] = pair[0] << 4 | pair[1];
            }
        }
        let process = kv_core::auth::random_u128().unwrap_or_else(|_| {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            t ^ (u128::from(std::process::id()) << 96)
        });
        v[16..].copy_from_slice(&process.to_le_bytes());
        v
    })
}

fn locality_of(v: &[u8]) -> Locality {
    let me = my_locality();
    if v.len() != me.len() {
        Locality::Unknown
    } else if v[16..] == me[16..] {
        Locality::SameProcess
    } else if v[..16] == me[..16] && me[..16] != [0u8; 16] {
        Locality::SameHost
    } else {
        Locality::OtherHost
    }
}

/// Refuses attributes the metadata codec would refuse (too many, too long, counting the
/// one the agent adds) and names the agent reserves.
pub(crate) fn check_attributes(attributes: &[(String, Bytes)]) -> Result<()> {
    if let Some((n, _)) = attributes
        .iter()
        .find(|(n, _)| n.starts_with(RESERVED_PREFIX))
    {
        return Err(Error::invalid_argument(format!(
            "attribute name {n:?}: names starting with {RESERVED_PREFIX} are the agent's own"
        )));
    }
    let mut all = attributes.to_vec();
    all.push((LOCALITY.into(), Bytes::copy_from_slice(my_locality())));
    AgentMetadata {
        name: "check".into(),
        attributes: all,
        ..Default::default()
    }
    .encode()
    .map(|_| ())
}

/// Encodes this agent's metadata: every backend with its connection info and every
/// live registration (`regions: None`), or a partial update naming only `regions`; both
/// carry `attributes` (in a partial one, none means unchanged).
pub(crate) fn local_metadata(
    name: &str,
    generation: u64,
    attributes: Vec<(String, Bytes)>,
    reg: &Registry,
    regions: Option<Vec<Arc<RegionEntry>>>,
) -> Result<Bytes> {
    let backends = reg.backends.read().clone();
    let mut bmeta = Vec::with_capacity(backends.len());
    for b in &backends {
        bmeta.push(BackendMetadata {
            name: b.name.clone(),
            connection: b.backend.connection_info()?,
        });
    }
    let partial = regions.is_some();
    let mut attributes = attributes;
    if !partial {
        attributes.push((LOCALITY.into(), Bytes::copy_from_slice(my_locality())));
    }
    let entries = match regions {
        None => reg.sorted_regions(),
        Some(rs) => rs,
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
            access: e.access,
            descs: DescriptorList::single(e.desc)?,
            keys,
        });
    }
    AgentMetadata {
        name: name.to_string(),
        generation,
        partial,
        attributes,
        backends: bmeta,
        registrations,
        removed: Vec::new(),
    }
    .encode()
}

pub(crate) struct PeerEntry {
    pub(crate) id: PeerId,
    pub(crate) name: String,
    pub(crate) generation: u64,
    state: Mutex<PeerState>,
    /// Set when a newer generation replaced this one or it was invalidated.
    retired: Mutex<Option<String>>,
    /// Bumped whenever an imported region of this peer is withdrawn, so a prepared
    /// transfer re-checks its remote regions before its next post.
    pub(crate) epoch: AtomicU64,
    /// The retirement of the generation this one replaced: connecting waits for it, so
    /// the old connections are closed before new ones open.
    predecessor: Option<Deferred<()>>,
}

struct PeerState {
    /// The attributes the peer published (its own, not the agent's reserved ones).
    attributes: Vec<(String, Bytes)>,
    /// Where the peer runs, from its latest full metadata.
    locality: Locality,
    backends: Vec<BackendMetadata>,
    regions: HashMap<u64, RegistrationMetadata>,
    endpoints: HashMap<String, EndpointId>,
    imported: HashMap<(String, u64), Vec<RemoteId>>,
}

impl Default for PeerState {
    fn default() -> Self {
        PeerState {
            attributes: Vec::new(),
            locality: Locality::Unknown,
            backends: Vec::new(),
            regions: HashMap::new(),
            endpoints: HashMap::new(),
            imported: HashMap::new(),
        }
    }
}

/// What a retired peer generation still holds on our backends: released and
/// disconnected by [`Retired::run`], which may take a backend's disconnect timeout.
pub(crate) struct Retired {
    imports: Vec<(String, Vec<RemoteId>)>,
    endpoints: Vec<(String, EndpointId)>,
}

impl Retired {
    /// Releases the imports and closes the endpoints.
    pub(crate) fn run(self, reg: &Registry) {
        for (backend, rids) in self.imports {
            if let Some(b) = reg.backend(&backend) {
                for rid in rids {
                    let _ = b.release_remote(rid);
                }
            }
        }
        for (backend, ep) in self.endpoints {
            if let Some(b) = reg.backend(&backend) {
                let _ = b.disconnect(ep);
            }
        }
    }
}

/// The peers whose metadata was loaded, by id and by name.
pub(crate) struct Peers {
    peers: RwLock<HashMap<PeerId, Arc<PeerEntry>>>,
    by_name: Mutex<HashMap<String, PeerId>>,
    next_peer: AtomicU64,
}

impl Default for Peers {
    fn default() -> Self {
        Peers {
            peers: RwLock::new(HashMap::new()),
            by_name: Mutex::new(HashMap::new()),
            next_peer: AtomicU64::new(1),
        }
    }
}

impl Peers {
    /// Loads a peer's metadata (full or partial). A higher generation than the one
    /// known replaces it: the old [`PeerId`] is refused from then on, and what it held
    /// goes to `retire` (which must not block: it runs under the name lock). `from` is
    /// the name the sender authenticated as: it may publish only itself.
    pub(crate) fn load(
        &self,
        reg: &Registry,
        bytes: &[u8],
        from: Option<&str>,
        retire: &dyn Fn(Retired) -> Deferred<()>,
    ) -> Result<PeerId> {
        let meta = AgentMetadata::decode(bytes)?;
        if let Some(from) = from.filter(|f| *f != meta.name) {
            return Err(Error::AccessDenied(format!(
                "a peer authenticated as {from:?} pushed metadata for {:?}; an agent may publish only itself",
                meta.name
            )));
        }
        let mut by_name = self.by_name.lock();
        let known = by_name
            .get(&meta.name)
            .and_then(|id| self.peers.read().get(id).cloned());
        let mut predecessor = None;
        if let Some(p) = &known {
            if meta.generation < p.generation {
                return Err(Error::InvalidMetadata(format!(
                    "stale metadata for {}: generation {} is older than the loaded {}",
                    meta.name, meta.generation, p.generation
                )));
            }
            if meta.generation == p.generation {
                p.apply(reg, meta)?;
                return Ok(p.id);
            }
            if meta.partial {
                // Never let a partial message knock out the live incarnation.
                return Err(Error::InvalidMetadata(format!(
                    "partial metadata for {} generation {} but generation {} is loaded; load full metadata of the new generation",
                    meta.name, meta.generation, p.generation
                )));
            }
            let why = format!(
                "the peer restarted (generation {} replaced it); use the PeerId from the new load_remote",
                meta.generation
            );
            predecessor = Some(retire(self.retire(p, why)));
        }
        if meta.partial {
            return Err(Error::InvalidMetadata(format!(
                "partial metadata for {} (generation {}) but no full metadata of that generation was loaded",
                meta.name, meta.generation
            )));
        }
        let id = PeerId(self.next_peer.fetch_add(1, Ordering::Relaxed));
        let entry = Arc::new(PeerEntry {
            id,
            name: meta.name.clone(),
            generation: meta.generation,
            state: Mutex::new(PeerState::default()),
            retired: Mutex::new(None),
            epoch: AtomicU64::new(0),
            predecessor,
        });
        entry.apply(reg, meta)?;
        by_name.insert(entry.name.clone(), id);
        self.peers.write().insert(id, entry);
        Ok(id)
    }

    /// Marks `p` retired and takes what it holds (to be released off this path).
    fn retire(&self, p: &PeerEntry, why: String) -> Retired {
        *p.retired.lock() = Some(why);
        let mut st = p.state.lock();
        let retired = Retired {
            imports: st
                .imported
                .drain()
                .map(|((backend, _), rids)| (backend, rids))
                .collect(),
            endpoints: st.endpoints.drain().collect(),
        };
        self.peers.write().remove(&p.id);
        retired
    }

    /// Forgets a peer: its [`PeerId`] is refused from then on; what it held is returned
    /// to be released off this path.
    pub(crate) fn invalidate(&self, peer: PeerId) -> Result<Retired> {
        let p = self.get(peer)?;
        let mut by_name = self.by_name.lock();
        if by_name.get(&p.name) == Some(&peer) {
            by_name.remove(&p.name);
        }
        Ok(self.retire(&p, "invalidated by the local agent".into()))
    }

    /// The current [`PeerId`] of the agent called `name`, if its metadata is loaded.
    pub(crate) fn by_name(&self, name: &str) -> Option<PeerId> {
        self.by_name.lock().get(name).copied()
    }

    /// The loaded peer `peer`.
    pub(crate) fn get(&self, peer: PeerId) -> Result<Arc<PeerEntry>> {
        self.peers.read().get(&peer).cloned().ok_or_else(|| {
            Error::NotRegistered(format!(
                "{peer} is not loaded (invalidated, or replaced by a newer generation); load_remote again"
            ))
        })
    }
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

    fn apply(&self, reg: &Registry, meta: AgentMetadata) -> Result<()> {
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
        let mut st = self.state.lock();
        let (reserved, own): (Vec<_>, Vec<_>) = meta
            .attributes
            .into_iter()
            .partition(|(n, _)| n.starts_with(RESERVED_PREFIX));
        if !meta.partial {
            st.locality = reserved
                .iter()
                .find(|(n, _)| n == LOCALITY)
                .map_or(Locality::Unknown, |(_, v)| locality_of(v));
        }
        // A full message replaces the attributes; a partial one only when it carries any.
        if !meta.partial || !own.is_empty() {
            st.attributes = own;
        }
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
                self.drop_remote_region(reg, &mut st, id);
            }
        }
        for r in meta.registrations {
            let mut r = r;
            // Keys name backends by index into this message's backend list; store names.
            r.keys.retain(|(i, _)| (*i as usize) < meta.backends.len());
            let changed = st.regions.get(&r.id).is_some_and(|old| *old != r);
            if changed {
                self.drop_remote_region(reg, &mut st, r.id);
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
            self.drop_remote_region(reg, &mut st, id);
        }
        Ok(())
    }

    fn drop_remote_region(&self, reg: &Registry, st: &mut PeerState, id: u64) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        st.regions.remove(&id);
        let keys: Vec<(String, u64)> = st
            .imported
            .keys()
            .filter(|(_, r)| *r == id)
            .cloned()
            .collect();
        for k in keys {
            if let (Some(rids), Some(b)) = (st.imported.remove(&k), reg.backend(&k.0)) {
                for rid in rids {
                    let _ = b.release_remote(rid);
                }
            }
        }
    }

    /// The attributes the peer published (the latest full message, or a later partial
    /// one that carried attributes).
    pub(crate) fn attributes(&self) -> Vec<(String, Bytes)> {
        self.state.lock().attributes.clone()
    }

    /// Names of the backends the peer published.
    pub(crate) fn backend_names(&self) -> Vec<String> {
        self.state
            .lock()
            .backends
            .iter()
            .map(|b| b.name.clone())
            .collect()
    }

    /// Registration ids (and their descriptors) the peer published, by id.
    pub(crate) fn regions(&self) -> Vec<(u64, MemKind, DescriptorList)> {
        let st = self.state.lock();
        let mut v: Vec<_> = st
            .regions
            .values()
            .map(|r| (r.id, r.kind, r.descs.clone()))
            .collect();
        v.sort_by_key(|x| x.0);
        v
    }

    /// Where the peer runs relative to this process.
    pub(crate) fn locality(&self) -> Locality {
        self.state.lock().locality
    }

    /// The endpoint of this peer on `b`, connecting on first use (after the generation
    /// it replaced is disconnected).
    pub(crate) fn endpoint(&self, b: &LoadedBackend) -> Result<EndpointId> {
        if let Some(p) = &self.predecessor {
            p.wait();
        }
        let info = {
            let st = self.state.lock();
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
        let ep = b.backend.connect(&self.name, &info)?;
        let mut st = self.state.lock();
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
        backend: &str,
        ids: &[u64],
        seen: &AtomicU64,
    ) -> Result<()> {
        let now = self.epoch.load(Ordering::Acquire);
        if seen.load(Ordering::Acquire) == now {
            return Ok(());
        }
        let st = self.state.lock();
        for id in ids {
            if !st.imported.contains_key(&(backend.to_string(), *id)) {
                return Err(Error::NotRegistered(format!(
                    "remote region {id} of {} was withdrawn (deregistered or replaced in new metadata); prepare the transfer again",
                    self.name
                )));
            }
        }
        seen.store(now, Ordering::Release);
        Ok(())
    }

    /// Refuses a WRITE into remote regions the peer published read-only.
    pub(crate) fn check_writable(&self, ids: &[u64]) -> Result<()> {
        let st = self.state.lock();
        match ids.iter().find(|id| {
            st.regions
                .get(id)
                .is_some_and(|r| r.access == Access::ReadOnly)
        }) {
            Some(id) => Err(Error::AccessDenied(format!(
                "remote region {id} of {} is published read-only; only READs may name it",
                self.name
            ))),
            None => Ok(()),
        }
    }

    /// Imports remote region `id` of this peer on `b` if not done yet.
    pub(crate) fn import(&self, b: &LoadedBackend, ep: EndpointId, id: u64) -> Result<()> {
        let mut st = self.state.lock();
        if st.imported.contains_key(&(b.name.clone(), id)) {
            return Ok(());
        }
        let r = st
            .regions
            .get(&id)
            .ok_or_else(|| Error::NotRegistered(format!("remote region {id} of {}", self.name)))?;
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
                    self.name, b.name
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

    /// The ranges this peer published for `kind`, with the region id of each. Memory
    /// freed and registered again shows up as a newer region over the same addresses
    /// (the peer may not have published the removal): the newest registration is the
    /// live one, so newer regions come first.
    pub(crate) fn published(&self, kind: MemKind) -> (Vec<u64>, crate::cover::Ranges) {
        let st = self.state.lock();
        let mut published: Vec<(u64, Descriptor)> = st
            .regions
            .values()
            .filter(|r| r.kind == kind)
            .flat_map(|r| r.descs.iter().map(move |d| (r.id, d)))
            .collect();
        published.sort_by_key(|(id, d)| (std::cmp::Reverse(*id), d.addr));
        let ranges = crate::cover::Ranges::new(published.iter().map(|(_, d)| *d).collect());
        (published.into_iter().map(|(id, _)| id).collect(), ranges)
    }

    /// The backends that hold a key for every region in `ids` (none if one vanished).
    pub(crate) fn key_backends(&self, ids: &[u64]) -> Vec<String> {
        let st = self.state.lock();
        let mut backends: Option<Vec<String>> = None;
        for id in ids {
            let names: Vec<String> = st
                .regions
                .get(id)
                .map(|r| {
                    r.keys
                        .iter()
                        .filter_map(|(i, _)| st.backends.get(*i as usize).map(|b| b.name.clone()))
                        .collect()
                })
                .unwrap_or_default();
            backends = Some(match backends {
                None => names,
                Some(prev) => prev.into_iter().filter(|n| names.contains(n)).collect(),
            });
        }
        backends.unwrap_or_default()
    }

    /// Remote regions of this peer that hold `list` (every descriptor lies wholly in
    /// one; a strided entry may cross several), and the backends that hold a key for
    /// all of them.
    pub(crate) fn regions_for(
        &self,
        kind: MemKind,
        list: &DescriptorList,
    ) -> Result<(Vec<u64>, Vec<String>)> {
        let (region_of, ranges) = self.published(kind);
        let mut ids = Vec::new();
        for e in list.entries() {
            crate::cover::split_entry(e, &ranges, |_, k| {
                if !ids.contains(&region_of[k]) {
                    ids.push(region_of[k]);
                }
            })
            .map_err(|x| self.outside(kind, &x))?;
        }
        let backends = self.key_backends(&ids);
        Ok((ids, backends))
    }

    /// The error for a remote range outside every region this peer published.
    pub(crate) fn outside(&self, kind: MemKind, x: &Descriptor) -> Error {
        Error::OutOfBounds(format!(
            "remote range {:#x}+{} is outside every {kind} region {} registered",
            x.addr, x.len, self.name
        ))
    }
}
