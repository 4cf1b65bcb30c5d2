//! Prepared lists (NIXL's `prep_xfer_dlist` + `make_prepped_xfer`): a local and a remote
//! list of items (block descriptors) are resolved once — the registration each item
//! lies in, the backends that can carry them, the peer's endpoints and imports — and a
//! transfer is then made per request from two arrays of item indices without looking
//! anything up again.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kv_core::{
    DescriptorList, EndpointId, Entry, Error, ListId, ListSide, MemKind, Op, Result, SelectRequest,
    TransferRequest,
};

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

    /// The items as a list whose descriptor `i` is item `i`, for a backend's
    /// `prepare_list` (compact: a run of blocks stays one entry); `None` when items are
    /// several descriptors each or too many (the agent then builds lists per request).
    fn to_list(&self) -> Option<DescriptorList> {
        if self.len() > MAX_BACKEND_ITEMS {
            return None;
        }
        let mut out = DescriptorList::new();
        match self {
            Items::List { parts, .. } => {
                for (run, _) in parts {
                    out.push_entry(*run).ok()?;
                }
            }
            Items::Grid { grid, .. } => {
                for i in 0..grid.len() {
                    let e = grid.item(i)?;
                    if e.count() != 1 {
                        return None;
                    }
                    out.push(e.get(0)?).ok()?;
                }
            }
        }
        (out.len() == self.len()).then_some(out)
    }

    /// (bytes, descriptors) of every item when all items are alike.
    fn uniform(&self) -> Option<(u64, u64)> {
        match self {
            Items::List { parts, .. } => {
                let len = parts.first()?.0.bytes() / parts.first()?.0.count().max(1);
                parts
                    .iter()
                    .all(|(run, _)| run.bytes() == len * run.count())
                    .then_some((len, 1))
            }
            Items::Grid { grid, .. } => {
                let first = grid.item(0)?;
                Some((grid.item_bytes(), first.count()))
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

/// More items than this are not handed to a backend's `prepare_list` (each costs the
/// backend a table entry); such lists are built per request.
const MAX_BACKEND_ITEMS: u64 = 1 << 22;

enum Side {
    Local {
        regions: Vec<Arc<RegionEntry>>,
        /// Backends every region is registered on, with the list each prepared (`None`:
        /// the backend has no prepared lists).
        backends: Vec<(Arc<LoadedBackend>, Option<ListId>)>,
    },
    Remote {
        peer: Arc<PeerEntry>,
        /// Region ids.
        regions: Vec<u64>,
        /// The peer's epoch before importing (a later withdrawal makes posts re-check).
        epoch: u64,
        /// Backends connected to the peer with every region imported, by preference,
        /// with the list each prepared.
        backends: Vec<(Arc<LoadedBackend>, EndpointId, Option<ListId>)>,
    },
}

/// Has `backend` prepare `items` as one of its lists, when it can (`None` otherwise,
/// and transfers from this list are built per request on it).
fn backend_list(
    backend: &LoadedBackend,
    side: ListSide,
    kind: MemKind,
    items: Option<&DescriptorList>,
) -> Option<ListId> {
    match backend.backend.prepare_list(side, kind, items?) {
        Ok(id) => Some(id),
        Err(Error::Unsupported(_)) => None,
        Err(e) => {
            tracing::debug!(backend = %backend.name, error = %e, "backend did not prepare the list; requests build lists instead");
            None
        }
    }
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
    /// (bytes, descriptors) of each item when all are alike.
    uniform: Option<(u64, u64)>,
    /// Every region of the list may be written (so no request needs to find which it
    /// names before a WRITE into them or a READ into them).
    writable: bool,
    side: Side,
}

impl Drop for PreparedList {
    fn drop(&mut self) {
        let lists: Vec<(&LoadedBackend, ListId)> = match &self.side {
            Side::Local { backends, .. } => backends
                .iter()
                .filter_map(|(b, l)| Some((&**b, (*l)?)))
                .collect(),
            Side::Remote { backends, .. } => backends
                .iter()
                .filter_map(|(b, _, l)| Some((&**b, (*l)?)))
                .collect(),
        };
        for (b, id) in lists {
            if let Err(e) = b.backend.release_list(id) {
                tracing::debug!(backend = %b.name, error = %e, "release_list failed");
            }
        }
    }
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
        let entries = items.to_list();
        let backends = shared
            .registry
            .backends
            .read()
            .iter()
            .filter(|b| regions.iter().all(|r| r.registered_on(&b.name)))
            .map(|b| {
                let list = backend_list(b, ListSide::Local, kind, entries.as_ref());
                (b.clone(), list)
            })
            .collect();
        Ok(PreparedList {
            shared: shared.clone(),
            kind,
            uniform: items.uniform(),
            writable: check_local_writable(&regions).is_ok(),
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
        let entries = items.to_list();
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
                Ok(ep) => {
                    let list = backend_list(&b, ListSide::Remote(ep), kind, entries.as_ref());
                    backends.push((b, ep, list))
                }
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
            uniform: items.uniform(),
            writable: peer.check_writable(&regions).is_ok(),
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
            Side::Local { backends, .. } => backends.iter().map(|(b, _)| b.name.clone()).collect(),
            Side::Remote { backends, .. } => {
                backends.iter().map(|(b, _, _)| b.name.clone()).collect()
            }
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
/// of one side carries the bytes of item `k` of the other. When the chosen backend
/// prepared both lists, it makes the transfer from the indices alone (the agent pins
/// every region of the local list and checks every region of the remote one at post);
/// otherwise the items' descriptors are gathered and the backend prepares them.
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
    let ((backend, llist), (ep, rlist)) = rbackends
        .iter()
        .find_map(|(b, ep, rlist)| {
            let c = b.backend.capabilities();
            let usable = opts.backend.as_ref().is_none_or(|want| *want == b.name)
                && c.mem_kinds.contains(local.kind)
                && match op {
                    Op::Write => c.write,
                    Op::Read => c.read,
                };
            let (_, llist) = lbackends
                .iter()
                .find(|(lb, _)| usable && lb.name == b.name)?;
            Some(((b, *llist), (*ep, *rlist)))
        })
        .ok_or_else(|| Error::NoCommonBackend {
            local: local.backends(),
            remote: remote.backends(),
        })?;
    peer.check_current()?;
    let writable = match op {
        Op::Write => remote.writable,
        Op::Read => local.writable,
    };
    let resolved = |local: Vec<Arc<RegionEntry>>, remote_ids: Vec<u64>| Resolved {
        choice: format!(
            "{}: first backend both prepared lists were registered with",
            backend.name
        ),
        backend: backend.clone(),
        peer: peer.clone(),
        local,
        remote_ids,
        epoch: *epoch,
        deadline: opts.deadline,
    };
    if let (Some(llist), Some(rlist), true, Some((bytes, descs))) =
        (llist, rlist, writable, local.uniform)
    {
        let id = backend.backend.prepare_selected(&SelectRequest {
            op,
            local: llist,
            local_items: local_ids,
            remote: rlist,
            remote_items: remote_ids,
        })?;
        let n = local_ids.len() as u64;
        let r = resolved(lregions.clone(), rregions.clone());
        return Ok(Transfer::from_backend(
            shared,
            r,
            id,
            (n * bytes, n * descs),
            start,
        ));
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
    let req = TransferRequest {
        op,
        local_kind: local.kind,
        local: l,
        peer: ep,
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
    Transfer::from_resolved(shared, resolved(local_used, remote_used), &req, start)
}
