//! Prepared lists (NIXL's `prep_xfer_dlist` + `make_prepped_xfer`): a local and a remote
//! list of items (block descriptors) are resolved once — the registration each item
//! lies in, the backends that can carry them, the peer's endpoints and imports — and a
//! transfer is then made per request from two arrays of item indices without looking
//! anything up again.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kv_core::{DescriptorList, EndpointId, Entry, Error, MemKind, Op, Result, TransferRequest};

use crate::cover::{self, Ranges};
use crate::layout::ItemGrid;
use crate::peers::{PeerEntry, PeerId};
use crate::registry::{check_local_writable, LoadedBackend, RegionEntry};
use crate::shared::Shared;
use crate::transfer::{Resolved, Transfer};

/// Per-request options of [`Agent::make_transfer`](crate::Agent::make_transfer); plain
/// struct with `Default`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TransferOptions {
    /// Use this backend only (else the first the remote list was prepared on, by the
    /// agent's preference, that the local list's regions are registered on).
    pub backend: Option<String>,
    /// Deadline of each post (else the agent's default).
    pub deadline: Option<Duration>,
}

/// One item source: the descriptors of a list (one item each, split per registration)
/// or a grid given by a formula.
enum Items {
    List {
        /// Runs of descriptors, each inside one region (index into the side's regions).
        parts: Vec<(Entry, u32)>,
        /// Index of the first item of each part.
        starts: Vec<u64>,
        len: u64,
    },
    Grid {
        grid: ItemGrid,
        /// Region of each plane.
        plane_region: Vec<u32>,
    },
}

impl Items {
    fn len(&self) -> u64 {
        match self {
            Items::List { len, .. } => *len,
            Items::Grid { grid, .. } => grid.len(),
        }
    }

    /// Item `i` and the region it lies in.
    fn item(&self, i: u64) -> Option<(Entry, u32)> {
        match self {
            Items::List { parts, starts, .. } => {
                let p = starts.partition_point(|s| *s <= i).checked_sub(1)?;
                let (e, region) = parts.get(p)?;
                let d = e.get(i - starts[p])?;
                Some((Entry::Single(d), *region))
            }
            Items::Grid { grid, plane_region } => {
                let e = grid.item(i)?;
                Some((e, plane_region[grid.plane_of(i)]))
            }
        }
    }

    /// Splits `list` into runs per region of `ranges`; `err` names a descriptor outside.
    fn of_list(
        list: &DescriptorList,
        ranges: &Ranges,
        err: impl Fn(&kv_core::Descriptor) -> Error,
    ) -> Result<(Items, Vec<usize>)> {
        let (mut parts, mut starts, mut used) = (Vec::new(), Vec::new(), Vec::new());
        let mut next = 0u64;
        for e in list.entries() {
            cover::split_entry(e, ranges, |run, k| {
                let r = used.iter().position(|u| *u == k).unwrap_or_else(|| {
                    used.push(k);
                    used.len() - 1
                });
                starts.push(next);
                next += run.count();
                parts.push((run, r as u32));
            })
            .map_err(|d| err(&d))?;
        }
        if next == 0 {
            return Err(Error::invalid_argument(
                "a prepared list needs at least one byte",
            ));
        }
        Ok((
            Items::List {
                parts,
                starts,
                len: next,
            },
            used,
        ))
    }

    /// Finds the region of every plane of `grid`; `err` names a plane outside.
    fn of_grid(
        grid: &ItemGrid,
        ranges: &Ranges,
        err: impl Fn(&kv_core::Descriptor) -> Error,
    ) -> Result<(Items, Vec<usize>)> {
        grid.validate()?;
        let mut used: Vec<usize> = Vec::new();
        let mut plane_region = Vec::new();
        for p in 0..grid.plane_bases.len() {
            let x = grid.plane_extent(p)?;
            let k = ranges.find(&x).ok_or_else(|| err(&x))?;
            let r = used.iter().position(|u| *u == k).unwrap_or_else(|| {
                used.push(k);
                used.len() - 1
            });
            plane_region.push(r as u32);
        }
        Ok((
            Items::Grid {
                grid: grid.clone(),
                plane_region,
            },
            used,
        ))
    }
}

enum Side {
    Local {
        regions: Vec<Arc<RegionEntry>>,
        /// Backends every region is registered on.
        backends: Vec<String>,
    },
    Remote {
        peer: Arc<PeerEntry>,
        /// Region ids.
        regions: Vec<u64>,
        /// The peer's epoch before importing (a later withdrawal makes posts re-check).
        epoch: u64,
        /// Backends connected to the peer with every region imported, by preference.
        backends: Vec<(Arc<LoadedBackend>, EndpointId)>,
    },
}

/// A list of items prepared once for many transfers: local (in this agent's
/// registrations) or remote (in a peer's, connected and imported). Items are selected
/// by index per request with [`Agent::make_transfer`](crate::Agent::make_transfer).
///
/// `Send + Sync`: read-only after preparation; share one between threads.
pub struct PreparedList {
    shared: Arc<Shared>,
    kind: MemKind,
    items: Items,
    side: Side,
}

impl std::fmt::Debug for PreparedList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedList")
            .field("kind", &self.kind)
            .field("items", &self.items.len())
            .field(
                "side",
                &match &self.side {
                    Side::Local { .. } => "local".to_string(),
                    Side::Remote { peer, .. } => format!("remote {}", peer.name),
                },
            )
            .finish()
    }
}

/// What a list is prepared from.
pub(crate) enum Source<'a> {
    List(&'a DescriptorList),
    Grid(&'a ItemGrid),
}

impl PreparedList {
    /// Prepares items in this agent's memory of `kind`.
    pub(crate) fn local(shared: &Arc<Shared>, kind: MemKind, src: Source<'_>) -> Result<Self> {
        let (live, ranges) = shared.registry.live_regions(kind);
        let err = |x: &kv_core::Descriptor| {
            Error::NotRegistered(format!(
                "local range {:#x}+{} is outside every registered {kind} region",
                x.addr, x.len
            ))
        };
        let (items, used) = match src {
            Source::List(l) => Items::of_list(l, &ranges, err)?,
            Source::Grid(g) => Items::of_grid(g, &ranges, err)?,
        };
        let regions: Vec<Arc<RegionEntry>> = used.iter().map(|k| live[*k].clone()).collect();
        let backends = shared
            .registry
            .names()
            .into_iter()
            .filter(|n| regions.iter().all(|r| r.registered_on(n)))
            .collect();
        Ok(PreparedList {
            shared: shared.clone(),
            kind,
            items,
            side: Side::Local { regions, backends },
        })
    }

    /// Prepares items in `peer`'s memory of `kind`: connects to the peer and imports
    /// every region on each backend both sides loaded (a backend that cannot reach the
    /// peer is left out; at least one must).
    pub(crate) fn remote(
        shared: &Arc<Shared>,
        peer: PeerId,
        kind: MemKind,
        src: Source<'_>,
    ) -> Result<Self> {
        let peer = shared.peers.get(peer)?;
        peer.check_current()?;
        let epoch = peer.epoch.load(std::sync::atomic::Ordering::Acquire);
        let (region_of, ranges) = peer.published(kind);
        let err = |x: &kv_core::Descriptor| peer.outside(kind, x);
        let (items, used) = match src {
            Source::List(l) => Items::of_list(l, &ranges, err)?,
            Source::Grid(g) => Items::of_grid(g, &ranges, err)?,
        };
        let regions: Vec<u64> = used.iter().map(|k| region_of[*k]).collect();
        let keyed = peer.key_backends(&regions);
        let mut loaded = shared.registry.backends.read().clone();
        let pref = &shared.opts.backend_preference;
        loaded.sort_by_key(|b| pref.iter().position(|x| *x == b.name).unwrap_or(usize::MAX));
        let (mut backends, mut why) = (Vec::new(), Vec::new());
        for b in loaded {
            if !keyed.contains(&b.name) || !b.backend.capabilities().mem_kinds.contains(kind) {
                continue;
            }
            let ready = peer.endpoint(&b).and_then(|ep| {
                regions
                    .iter()
                    .try_for_each(|id| peer.import(&b, ep, *id))
                    .map(|()| ep)
            });
            match ready {
                Ok(ep) => backends.push((b, ep)),
                Err(e) => {
                    tracing::info!(backend = %b.name, peer = %peer.name, error = %e, "backend left out of a prepared list");
                    why.push(format!("{}: {e}", b.name));
                }
            }
        }
        if backends.is_empty() {
            return Err(Error::NoCommonBackend {
                local: shared.registry.names(),
                remote: if why.is_empty() { keyed } else { why },
            });
        }
        Ok(PreparedList {
            shared: shared.clone(),
            kind,
            items,
            side: Side::Remote {
                peer,
                regions,
                epoch,
                backends,
            },
        })
    }

    /// The agent this list belongs to.
    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Number of items.
    pub fn len(&self) -> u64 {
        self.items.len()
    }

    /// True when the list has no item (never, for a prepared list).
    pub fn is_empty(&self) -> bool {
        self.items.len() == 0
    }

    /// Memory kind of the items.
    pub fn kind(&self) -> MemKind {
        self.kind
    }

    /// Backends a transfer from this list may use (registered on every region, or
    /// connected with every region imported).
    pub fn backends(&self) -> Vec<String> {
        match &self.side {
            Side::Local { backends, .. } => backends.clone(),
            Side::Remote { backends, .. } => backends.iter().map(|(b, _)| b.name.clone()).collect(),
        }
    }

    /// Item `ids` as a descriptor list, marking the regions they lie in.
    fn select(&self, ids: &[u32], used: &mut [bool]) -> Result<DescriptorList> {
        let mut out = DescriptorList::new();
        for &i in ids {
            let (e, r) = self.items.item(i as u64).ok_or_else(|| {
                Error::OutOfBounds(format!(
                    "item {i} of a prepared list of {}",
                    self.items.len()
                ))
            })?;
            out.push_entry(e)?;
            used[r as usize] = true;
        }
        Ok(out)
    }

    fn regions(&self) -> usize {
        match &self.side {
            Side::Local { regions, .. } => regions.len(),
            Side::Remote { regions, .. } => regions.len(),
        }
    }
}

/// A transfer of `local_ids` of `local` to or from `remote_ids` of `remote`: item `k`
/// of one side carries the bytes of item `k` of the other. Only the selection and the
/// backend's own prepare run here.
pub(crate) fn make_transfer(
    shared: &Arc<Shared>,
    op: Op,
    local: &PreparedList,
    local_ids: &[u32],
    remote: &PreparedList,
    remote_ids: &[u32],
    opts: &TransferOptions,
) -> Result<Transfer> {
    let start = Instant::now();
    let (
        Side::Local {
            regions: lregions,
            backends: lbackends,
        },
        Side::Remote {
            peer,
            regions: rregions,
            epoch,
            backends: rbackends,
        },
    ) = (&local.side, &remote.side)
    else {
        return Err(Error::invalid_argument(
            "make_transfer takes a local prepared list, then a remote one",
        ));
    };
    if !Arc::ptr_eq(&local.shared, shared) || !Arc::ptr_eq(&remote.shared, shared) {
        return Err(Error::invalid_argument("a prepared list of another agent"));
    }
    let mut lused = vec![false; local.regions()];
    let mut rused = vec![false; remote.regions()];
    let l = local.select(local_ids, &mut lused)?;
    let r = remote.select(remote_ids, &mut rused)?;
    if l.total_bytes() != r.total_bytes() || l.total_bytes() == 0 {
        return Err(Error::invalid_argument(format!(
            "the local items hold {} bytes and the remote items {}; they must be equal and non-zero",
            l.total_bytes(),
            r.total_bytes()
        )));
    }
    let (backend, ep) = rbackends
        .iter()
        .find(|(b, _)| {
            let c = b.backend.capabilities();
            lbackends.contains(&b.name)
                && opts.backend.as_ref().is_none_or(|want| *want == b.name)
                && c.mem_kinds.contains(local.kind)
                && match op {
                    Op::Write => c.write,
                    Op::Read => c.read,
                }
        })
        .ok_or_else(|| Error::NoCommonBackend {
            local: lbackends.clone(),
            remote: remote.backends(),
        })?;
    peer.check_current()?;
    let req = TransferRequest {
        op,
        local_kind: local.kind,
        local: l,
        peer: *ep,
        remote_kind: remote.kind,
        remote: r,
    };
    let remote_used: Vec<u64> = rregions
        .iter()
        .zip(&rused)
        .filter_map(|(x, u)| u.then_some(*x))
        .collect();
    let local_used: Vec<_> = lregions
        .iter()
        .zip(&lused)
        .filter(|(_, u)| **u)
        .map(|(x, _)| x.clone())
        .collect();
    match op {
        Op::Write => peer.check_writable(&remote_used)?,
        Op::Read => check_local_writable(&local_used)?,
    }
    let resolved = Resolved {
        choice: format!(
            "{}: first backend both prepared lists were registered with",
            backend.name
        ),
        backend: backend.clone(),
        peer: peer.clone(),
        local: local_used,
        remote_ids: remote_used,
        epoch: *epoch,
        deadline: opts.deadline,
    };
    Transfer::from_resolved(shared, resolved, &req, start)
}
