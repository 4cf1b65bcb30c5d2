//! The registry: the backends this agent loaded (with their counters) and the memory
//! registered on them, with custody — a region stays alive and registered while any
//! posted transfer pins it, and is deregistered once its handle is dropped and no pin is
//! left.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use kv_core::{
    Access, Backend, Descriptor, DescriptorList, Error, MemKind, RegistrationId, Result,
};
use kv_mem::{Memory, Region};
use parking_lot::{Mutex, RwLock};

use crate::cover::{self, Ranges};

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

/// Options of a registration; plain struct with `Default` (read-write, on every loaded
/// backend that supports the memory's kind).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegisterOptions {
    /// Register on these backends only (NIXL's `backends=`); each must be loaded and
    /// able to register the memory. Empty: every loaded backend that supports the kind.
    pub backends: Vec<String>,
    /// [`Access::ReadOnly`]: peers may only READ the memory, and no transfer writes into
    /// it (not even a local READ's destination). Registered only on backends that
    /// enforce it on their target side (`Capabilities::read_only`); a named backend that
    /// does not fails the call, an unnamed one is skipped. Published with the metadata,
    /// so a peer's agent refuses a WRITE before it reaches the backend.
    pub access: Access,
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
    /// What peers may do with it (published in the metadata).
    pub(crate) access: Access,
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

/// Refuses local regions a transfer would write into (a READ's destination) when one of
/// them is registered read-only.
pub(crate) fn check_local_writable(regions: &[Arc<RegionEntry>]) -> Result<()> {
    match regions.iter().find(|r| r.access == Access::ReadOnly) {
        Some(r) => Err(Error::AccessDenied(format!(
            "local region {} is registered read-only; it cannot be a READ's destination",
            r.id
        ))),
        None => Ok(()),
    }
}

impl RegionEntry {
    pub(crate) fn registered_on(&self, backend: &str) -> bool {
        self.regs.iter().any(|(b, _)| b.name == backend)
    }

    pub(crate) fn is_dropped(&self) -> bool {
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

/// The loaded backends and the registered regions of one agent.
pub(crate) struct Registry {
    pub(crate) backends: RwLock<Vec<Arc<LoadedBackend>>>,
    unavailable: Mutex<Vec<(String, String)>>,
    regions: RwLock<HashMap<u64, Arc<RegionEntry>>>,
    next_region: AtomicU64,
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            backends: RwLock::new(Vec::new()),
            unavailable: Mutex::new(Vec::new()),
            regions: RwLock::new(HashMap::new()),
            next_region: AtomicU64::new(1),
        }
    }
}

impl Registry {
    /// Remembers a backend that could not be created, with the reason.
    pub(crate) fn mark_unavailable(&self, name: &str, why: String) {
        self.unavailable.lock().push((name.to_string(), why));
    }

    /// Backends that could not be created, with the reason.
    pub(crate) fn unavailable(&self) -> Vec<(String, String)> {
        self.unavailable.lock().clone()
    }

    /// Adds a backend; its name must be unique in this registry.
    pub(crate) fn add_backend(&self, backend: Arc<dyn Backend>) -> Result<()> {
        let name = backend.name().to_string();
        let mut bs = self.backends.write();
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

    /// Names of the loaded backends, in the order they were added.
    pub(crate) fn names(&self) -> Vec<String> {
        self.backends
            .read()
            .iter()
            .map(|b| b.name.clone())
            .collect()
    }

    /// The loaded backend called `name`.
    pub(crate) fn backend(&self, name: &str) -> Option<Arc<dyn Backend>> {
        self.backends
            .read()
            .iter()
            .find(|b| b.name == name)
            .map(|b| b.backend.clone())
    }

    /// Counters of every loaded backend.
    pub(crate) fn stats(&self) -> Vec<(String, BackendStats)> {
        self.backends
            .read()
            .iter()
            .map(|b| (b.name.clone(), b.stats.lock().clone()))
            .collect()
    }

    /// Registers `region` with the loaded backends `opts` names (every one that
    /// supports its kind when it names none) and takes custody of its memory. A named
    /// backend that is not loaded or cannot register the memory fails the call.
    pub(crate) fn register<M: Memory>(
        &self,
        region: &Region<M>,
        opts: &RegisterOptions,
    ) -> Result<Arc<RegionEntry>> {
        let (kind, desc) = (region.kind(), region.descriptor());
        let loaded = self.backends.read().clone();
        if let Some(missing) = opts
            .backends
            .iter()
            .find(|n| !loaded.iter().any(|b| &b.name == *n))
        {
            return Err(Error::BackendUnavailable {
                name: missing.clone(),
                reason: format!(
                    "not loaded in this agent (loaded: [{}]); add it before registering on it",
                    loaded
                        .iter()
                        .map(|b| b.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            });
        }
        let named = !opts.backends.is_empty();
        let mut regs = Vec::new();
        let mut why = Vec::new();
        for b in loaded {
            if named && !opts.backends.contains(&b.name) {
                continue;
            }
            let caps = b.backend.capabilities();
            if !caps.mem_kinds.contains(kind) {
                why.push(format!("{}: does not support {kind}", b.name));
                continue;
            }
            if opts.access == Access::ReadOnly && !caps.read_only {
                why.push(format!(
                    "{}: does not enforce read-only registrations",
                    b.name
                ));
                continue;
            }
            // SAFETY: `region.keep_alive()` is stored in the entry below and dropped
            // only after every backend deregistered, so the memory outlives the
            // registration (kv_mem::Memory promises a stable, valid range).
            match unsafe { b.backend.register(kind, &desc, opts.access) } {
                Ok(id) => regs.push((b, id)),
                Err(e) => {
                    tracing::debug!(backend = %b.name, error = %e, "registration skipped");
                    why.push(format!("{}: {e}", b.name));
                }
            }
        }
        if named && regs.len() < opts.backends.len() {
            for (b, id) in regs {
                if let Err(e) = b.backend.deregister(id) {
                    tracing::error!(backend = %b.name, error = %e, "undoing a partial registration failed; leaking the memory");
                    std::mem::forget(region.keep_alive());
                }
            }
            return Err(Error::Unsupported(format!(
                "not every named backend could register {kind} memory [{}]",
                why.join("; ")
            )));
        }
        if regs.is_empty() {
            return Err(Error::Unsupported(format!(
                "no loaded backend could register {kind} memory [{}]",
                why.join("; ")
            )));
        }
        let id = self.next_region.fetch_add(1, Ordering::Relaxed);
        let entry = Arc::new(RegionEntry {
            id,
            kind,
            desc,
            access: opts.access,
            keep: Mutex::new(Some(region.keep_alive())),
            regs,
            state: Mutex::new(RegionState::default()),
        });
        self.regions.write().insert(id, entry.clone());
        Ok(entry)
    }

    /// Every registered region, by id.
    pub(crate) fn sorted_regions(&self) -> Vec<Arc<RegionEntry>> {
        let mut v: Vec<_> = self.regions.read().values().cloned().collect();
        v.sort_by_key(|e| e.id);
        v
    }

    /// Live local regions of `kind`, with their ranges for [`cover::split_entry`].
    pub(crate) fn live_regions(&self, kind: MemKind) -> (Vec<Arc<RegionEntry>>, Ranges) {
        let regions = self.regions.read();
        let mut live: Vec<Arc<RegionEntry>> = regions
            .values()
            .filter(|r| r.kind == kind && !r.is_dropped())
            .cloned()
            .collect();
        live.sort_by_key(|r| r.id);
        let ranges = Ranges::new(live.iter().map(|r| r.desc).collect());
        (live, ranges)
    }

    /// The local regions `list` lies in: every descriptor must lie wholly inside one
    /// registered region of `kind` (a strided entry may cross several of them).
    pub(crate) fn local_regions_for(
        &self,
        kind: MemKind,
        list: &DescriptorList,
    ) -> Result<Vec<Arc<RegionEntry>>> {
        let (live, ranges) = self.live_regions(kind);
        let mut used = vec![false; live.len()];
        for e in list.entries() {
            cover::split_entry(e, &ranges, |_, k| used[k] = true).map_err(|x| {
                Error::NotRegistered(format!(
                    "local range {:#x}+{} is outside every registered {kind} region",
                    x.addr, x.len
                ))
            })?;
        }
        Ok(live
            .into_iter()
            .zip(used)
            .filter_map(|(r, u)| u.then_some(r))
            .collect())
    }

    /// Called when a posted transfer that named `r` finished.
    pub(crate) fn unpin(&self, r: &RegionEntry) {
        if self.release_pin(r) {
            self.deregister_now(r);
        }
    }

    /// Ends one pin of `r`; true if its deregistration is now due (the caller runs
    /// [`Registry::deregister_now`]).
    pub(crate) fn release_pin(&self, r: &RegionEntry) -> bool {
        let mut st = r.state.lock();
        st.inflight = st.inflight.saturating_sub(1);
        let run = st.inflight == 0 && st.dropped && !st.done;
        st.done |= run;
        run
    }

    /// Marks the region dropped; deregisters now if nothing is in flight.
    pub(crate) fn drop_region(&self, r: &RegionEntry) {
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

    pub(crate) fn deregister_now(&self, r: &RegionEntry) {
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
