//! The `Agent`: the public facade. Each method checks its arguments and hands the work
//! to the rooms below (registry, peers, choice, transfer, channel); the handles it
//! gives out (`Agent`, `Registration`, `Transfer`) share one [`Shared`].

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use kv_core::{
    Backend, Descriptor, DescriptorList, Error, MemKind, Notification, Op, Params, Result,
};
use kv_mem::{EngineMemory, Memory, Region};

use crate::backends::ParamDoc;
use crate::channel;
use crate::choice;
use crate::kv_lists::{self, KvLists};
use crate::layout::{ItemGrid, KvLayout, Side, LAYOUT_ATTRIBUTE};
use crate::peers::{check_attributes, PeerId};
use crate::prepared::{self, PreparedList, Source, TransferOptions};
use crate::registry::{BackendStats, RegionEntry, RegisterOptions};
use crate::shared::{resolve_secret, AgentOptions, Shared};
use crate::transfer::{Transfer, TransferSpec};

/// The agent an inference engine embeds: it owns backends and registrations, exchanges
/// metadata with peers, and prepares and posts transfers.
///
/// `Send + Sync` and cheap to clone (an `Arc` inside): share one agent between threads.
/// Posting and polling take read locks only; registering memory, loading metadata and
/// adding backends take short write locks.
#[derive(Clone)]
pub struct Agent {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("name", &self.shared.name)
            .field("generation", &self.shared.generation)
            .field("backends", &self.backends())
            .finish_non_exhaustive()
    }
}

impl Agent {
    /// A new agent called `name` (unique among the agents that talk to each other).
    /// Its cluster secret is `opts.secret`, else `KVX_SECRET` (hex) from the
    /// environment; a malformed `KVX_SECRET` is [`Error::InvalidArgument`].
    pub fn new(name: &str, mut opts: AgentOptions) -> Result<Agent> {
        if name.is_empty() || name.len() > kv_core::codec::MAX_NAME_LEN {
            return Err(Error::invalid_argument(format!(
                "agent name must be 1..={} bytes",
                kv_core::codec::MAX_NAME_LEN
            )));
        }
        check_attributes(&opts.attributes)?;
        opts.secret = resolve_secret(&opts)?;
        let generation = opts.generation.unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
        let shared = Arc::new(Shared::new(name, generation, opts));
        Ok(Agent { shared })
    }

    /// The agent's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// This incarnation's generation number.
    pub fn generation(&self) -> u64 {
        self.shared.generation
    }

    /// Creates a backend by name (`tcp`, `ucx`, `libfabric`, `gds`, or one registered
    /// with [`crate::register_backend_factory`]) with its parameters
    /// ([`Agent::backend_params`]) and adds it. A backend whose library is missing fails
    /// with [`Error::BackendUnavailable`] and is listed by [`Agent::unavailable`]. A
    /// networked backend (`Capabilities::remote`) needs the cluster secret (see
    /// [`AgentOptions::secret`]).
    pub fn add_backend(&self, name: &str, params: &Params) -> Result<()> {
        let created = crate::backends::create(
            name,
            &self.shared.backend_init(),
            params,
            self.shared.unauthenticated(),
        );
        match created {
            Ok(b) => {
                if b.capabilities().remote {
                    self.shared
                        .require_secret(&format!("the networked backend {name}"))?;
                }
                self.add_backend_instance(b)
            }
            Err(e) => {
                tracing::info!(backend = name, error = %e, "backend unavailable");
                self.shared.registry.mark_unavailable(name, e.to_string());
                Err(e)
            }
        }
    }

    /// The parameters [`Agent::add_backend`] takes for backend `name`, with defaults and
    /// a line on each (as NIXL's `get_plugin_params`).
    pub fn backend_params(&self, name: &str) -> Result<Vec<ParamDoc>> {
        crate::backends::backend_params(name)
    }

    /// Adds a backend built elsewhere (a third-party plugin). Its `name()` must be unique
    /// in this agent and equal to the name peers use for it. The caller built it with
    /// its own [`kv_core::BackendInit`]: the agent's secret is not checked here.
    pub fn add_backend_instance(&self, backend: Arc<dyn Backend>) -> Result<()> {
        self.shared.add_backend(backend)
    }

    /// Names of the usable backends, in the order they were added.
    pub fn backends(&self) -> Vec<String> {
        self.shared.registry.names()
    }

    /// Backends that could not be created, with the reason.
    pub fn unavailable(&self) -> Vec<(String, String)> {
        self.shared.registry.unavailable()
    }

    /// The loaded backend called `name`.
    pub fn backend(&self, name: &str) -> Option<Arc<dyn Backend>> {
        self.shared.registry.backend(name)
    }

    /// Counters of every loaded backend.
    pub fn stats(&self) -> Vec<(String, BackendStats)> {
        self.shared.registry.stats()
    }

    /// Registers `region` read-write with every loaded backend that supports its kind. The returned
    /// handle keeps the memory alive; dropping it deregisters once no posted transfer
    /// names the region.
    pub fn register<M: Memory>(&self, region: &Region<M>) -> Result<Registration> {
        self.register_with(region, &RegisterOptions::default())
    }

    /// Registers `region` on the backends `opts` names (NIXL's `backends=`; every
    /// loaded backend that supports its kind when it names none). Custody as
    /// [`Agent::register`].
    pub fn register_with<M: Memory>(
        &self,
        region: &Region<M>,
        opts: &RegisterOptions,
    ) -> Result<Registration> {
        let entry = self.shared.registry.register(region, opts)?;
        Ok(Registration {
            shared: self.shared.clone(),
            entry,
        })
    }

    /// Registers memory the engine owns — `len` bytes at `addr` of `kind` on `device`
    /// (a tensor's storage, an `mmap`, pinned host memory, a VRAM pointer) — on the
    /// backends `opts` names. DRAM inside a [`kv_mem::SharedArena`] or a shared
    /// `HostBuffer` is memfd-backed, so same-host peers map it.
    ///
    /// # Safety
    ///
    /// The range must stay valid for reads and writes, at that address, until the
    /// returned [`Registration`] is dropped *and* every transfer that names it finished
    /// (custody defers deregistration until then; [`Registration::deregister`] returning
    /// `Ok` proves it is over). Bytes that peers write arrive outside the compiler's
    /// view: read them only after the transfer completed or its notification arrived.
    /// Use [`kv_mem::EngineMemory::with_owner`] and [`Agent::register_with`] to tie the
    /// allocation's lifetime to the registration instead.
    pub unsafe fn register_external(
        &self,
        addr: u64,
        len: u64,
        kind: MemKind,
        device: u32,
        opts: &RegisterOptions,
    ) -> Result<Registration> {
        // SAFETY: forwarded to our caller (valid until the registration and every
        // transfer naming it are gone, which is when the EngineMemory drops).
        let mem = unsafe { EngineMemory::new(addr, len, kind, device)? };
        self.register_with(&Region::new(mem), opts)
    }

    /// Everything a peer needs: backends with connection info and every registration.
    pub fn local_metadata(&self) -> Result<Bytes> {
        self.shared.metadata(None)
    }

    /// An incremental update naming only `regions` (added or changed).
    pub fn partial_metadata(&self, regions: &[&Registration]) -> Result<Bytes> {
        self.shared
            .metadata(Some(regions.iter().map(|r| r.entry.clone()).collect()))
    }

    /// Loads a peer's metadata (full or partial). A higher generation than the one
    /// known replaces it: the old [`PeerId`] is refused from then on.
    /// The generation it replaces is disconnected on a helper thread, so this returns
    /// without waiting for any backend.
    pub fn load_remote(&self, bytes: &[u8]) -> Result<PeerId> {
        self.shared.load_remote(bytes, None)
    }

    /// Forgets a peer: its [`PeerId`] is refused from then on (its connections close on
    /// a helper thread).
    pub fn invalidate_remote(&self, peer: PeerId) -> Result<()> {
        self.shared.invalidate(peer)
    }

    /// The name and generation of a loaded peer.
    pub fn peer_info(&self, peer: PeerId) -> Result<(String, u64)> {
        let p = self.shared.peers.get(peer)?;
        Ok((p.name.clone(), p.generation))
    }

    /// The attributes a loaded peer published (see [`AgentOptions::attributes`]).
    pub fn peer_attributes(&self, peer: PeerId) -> Result<Vec<(String, Bytes)>> {
        Ok(self.shared.peers.get(peer)?.attributes())
    }

    /// Replaces the attributes this agent publishes from its next metadata message on
    /// (peers see them after the next [`Agent::publish`] or fetch). At most
    /// [`kv_core::codec::MAX_ATTRIBUTES`], each value at most
    /// [`kv_core::codec::MAX_ATTRIBUTE_BYTES`]. A partial message cannot clear them:
    /// publish full metadata after setting none.
    pub fn set_attributes(&self, attributes: Vec<(String, Bytes)>) -> Result<()> {
        check_attributes(&attributes)?;
        *self.shared.attributes.write() = attributes;
        Ok(())
    }

    /// Publishes this engine rank's KV layout (attribute [`LAYOUT_ATTRIBUTE`]) from the
    /// next metadata message on, keeping the other attributes.
    pub fn set_kv_layout(&self, layout: &KvLayout) -> Result<()> {
        let value = Bytes::from(layout.encode()?);
        let mut attrs = self.shared.attributes.read().clone();
        attrs.retain(|(k, _)| k != LAYOUT_ATTRIBUTE);
        attrs.push((LAYOUT_ATTRIBUTE.to_string(), value));
        self.set_attributes(attrs)
    }

    /// The KV layout `peer` published ([`Error::InvalidMetadata`] if none or malformed).
    pub fn peer_kv_layout(&self, peer: PeerId) -> Result<KvLayout> {
        kv_lists::peer_layout(&self.shared, peer)
    }

    /// Connects to `peer` now on every backend both sides loaded (else the first
    /// transfer pays for it); returns the backends connected. Fails only if none could.
    pub fn make_connection(&self, peer: PeerId) -> Result<Vec<String>> {
        let p = self.shared.peers.get(peer)?;
        p.check_current()?;
        let published = p.backend_names();
        let (mut ok, mut last) = (Vec::new(), None);
        for b in self.shared.registry.backends.read().clone() {
            if published.contains(&b.name) {
                match p.endpoint(&b) {
                    Ok(_) => ok.push(b.name.clone()),
                    Err(e) => last = Some(e),
                }
            }
        }
        if ok.is_empty() {
            return Err(last.unwrap_or_else(|| Error::NoCommonBackend {
                local: self.backends(),
                remote: published,
            }));
        }
        Ok(ok)
    }

    /// Prepares a list of local items once (NIXL's `prep_xfer_dlist`): every descriptor
    /// of `list` is an item, and must lie in a registered region of `kind` (a list may
    /// cross regions).
    pub fn prepare_local_list(&self, kind: MemKind, list: &DescriptorList) -> Result<PreparedList> {
        PreparedList::local(&self.shared, kind, Source::List(list))
    }

    /// Prepares a list of `peer`'s items once: checked against what it published,
    /// connected and imported on every backend both sides loaded.
    pub fn prepare_remote_list(
        &self,
        peer: PeerId,
        kind: MemKind,
        list: &DescriptorList,
    ) -> Result<PreparedList> {
        PreparedList::remote(&self.shared, peer, kind, Source::List(list))
    }

    /// Like [`Agent::prepare_local_list`], with items given by a formula (no stored
    /// descriptors; each plane of the grid must lie in one registered region).
    pub fn prepare_local_grid(&self, kind: MemKind, grid: &ItemGrid) -> Result<PreparedList> {
        PreparedList::local(&self.shared, kind, Source::Grid(grid))
    }

    /// Like [`Agent::prepare_remote_list`], with items given by a formula.
    pub fn prepare_remote_grid(
        &self,
        peer: PeerId,
        kind: MemKind,
        grid: &ItemGrid,
    ) -> Result<PreparedList> {
        PreparedList::remote(&self.shared, peer, kind, Source::Grid(grid))
    }

    /// A transfer of items `local_items` of `local` to (WRITE) or from (READ) items
    /// `remote_items` of `remote` (NIXL's `make_prepped_xfer`): item `k` of one side
    /// carries the bytes of item `k` of the other. Only the selection and the backend's
    /// own prepare run; post it like any [`Transfer`]. On a backend that prepared both
    /// lists itself (tcp), the backend makes the transfer from the indices alone and a
    /// post pins every region of the local list (deregistering one of them waits for
    /// the post, as for regions the transfer names).
    pub fn make_transfer(
        &self,
        op: Op,
        local: &PreparedList,
        local_items: &[u32],
        remote: &PreparedList,
        remote_items: &[u32],
        opts: &TransferOptions,
    ) -> Result<Transfer> {
        prepared::make_transfer(
            &self.shared,
            op,
            local,
            local_items,
            remote,
            remote_items,
            opts,
        )
    }

    /// Prepares the per-layer lists between this engine rank (laid out as `local`) and
    /// `peer`'s rank (the layout it published): refuses an incompatible model with
    /// [`Error::InvalidMetadata`] before any byte moves, works out which heads move
    /// (heterogeneous TP and block sizes), and prepares every layer's lists on both
    /// sides. `local_side` is [`Side::Source`] on the rank holding the KV (it WRITEs),
    /// [`Side::Destination`] on the rank receiving it (it READs).
    pub fn prepare_kv_lists(
        &self,
        peer: PeerId,
        local: &KvLayout,
        local_side: Side,
    ) -> Result<KvLists> {
        KvLists::prepare(&self.shared, peer, local, local_side)
    }

    /// The current [`PeerId`] of the agent called `name`, if its metadata is loaded.
    pub fn peer_by_name(&self, name: &str) -> Option<PeerId> {
        self.shared.peers.by_name(name)
    }

    /// Registration ids (and their descriptors) a peer published.
    pub fn remote_regions(&self, peer: PeerId) -> Result<Vec<(u64, MemKind, DescriptorList)>> {
        Ok(self.shared.peers.get(peer)?.regions())
    }

    /// Prepares a transfer once; post it any number of times.
    pub fn prepare(&self, spec: &TransferSpec) -> Result<Transfer> {
        Transfer::prepare(&self.shared, spec)
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
        let p = self.shared.peers.get(peer)?;
        p.check_current()?;
        let b = choice::for_notification(
            &self.shared.registry,
            &self.shared.opts.backend_preference,
            &p,
        )?;
        let ep = p.endpoint(&b)?;
        b.backend.notify(ep, payload)
    }

    /// Drains the notifications received on every backend, oldest first per backend
    /// (driving first the backends whose target side needs progress).
    pub fn notifications(&self) -> Result<Vec<Notification>> {
        self.shared.notifications()
    }

    /// Drives every backend once; returns the number of events handled.
    pub fn progress(&self) -> Result<usize> {
        self.shared.progress()
    }

    /// Serves this agent's metadata on `addr` (e.g. `127.0.0.1:0`) from a background
    /// thread until the agent is dropped; returns the bound address. Only peers that
    /// prove the cluster secret are served. `addr` must be loopback or on
    /// [`AgentOptions::bind_ip`].
    pub fn listen(&self, addr: impl ToSocketAddrs) -> Result<SocketAddr> {
        self.shared.require_secret("the side channel")?;
        let addr = channel::resolve(addr)?;
        let bind = self.shared.opts.bind_ip;
        if !addr.ip().is_loopback() && !bind.is_unspecified() && addr.ip() != bind {
            return Err(Error::invalid_argument(format!(
                "the side channel binds to loopback or AgentOptions::bind_ip ({bind}); set                  bind_ip to {} to listen on {addr}",
                addr.ip()
            )));
        }
        self.shared.channel.listen(
            addr,
            self.shared.channel_config(),
            Arc::downgrade(&self.shared),
        )
    }

    /// Fetches a peer's metadata from its side channel and loads it; remembers the
    /// address for [`Agent::publish`].
    pub fn fetch_remote(&self, addr: impl ToSocketAddrs) -> Result<PeerId> {
        self.shared.require_secret("fetching metadata")?;
        let addr = channel::resolve(addr)?;
        self.shared
            .channel
            .fetch(addr, &self.shared.channel_config(), |meta| {
                self.load_remote(meta)
            })
    }

    /// Pushes this agent's full metadata to the side channel at `addr`.
    pub fn publish_to(&self, addr: impl ToSocketAddrs) -> Result<()> {
        self.shared.require_secret("publishing metadata")?;
        let addr = channel::resolve(addr)?;
        let meta = self.local_metadata()?;
        self.shared
            .channel
            .push(addr, &self.shared.channel_config(), &meta)
    }

    /// Pushes this agent's metadata to every side channel it fetched from or published
    /// to; returns the addresses that failed, with why.
    pub fn publish(&self) -> Vec<(SocketAddr, Error)> {
        let known = self.shared.channel.known();
        known
            .into_iter()
            .filter_map(|a| self.publish_to(a).err().map(|e| (a, e)))
            .collect()
    }
}

/// A registered region. Dropping it deregisters the memory once no posted transfer names
/// it (custody); until then the memory is kept alive. `Send + Sync`.
pub struct Registration {
    shared: Arc<Shared>,
    entry: Arc<RegionEntry>,
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
        self.shared.registry.drop_region(&self.entry);
    }
}
