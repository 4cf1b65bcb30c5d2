//! Prepared lists (`Backend::prepare_list` / `prepare_selected`, NIXL's prepared
//! descriptor lists): each item is resolved once to the local registration or the
//! import it lies in, so a transfer made by index only pairs the selected items' bytes
//! into a [`Route`] — no lookup, no bounds walk per request. Posts re-check liveness as
//! for any prepared transfer (the plan names the registrations and imports it uses).

use std::sync::Arc;

use kv_core::{Descriptor, DescriptorList, Entry, Error, Op, Result};

use crate::memory::LocalReg;
use crate::remote::Imported;
use crate::request::{Path, PlanSeg, Route};

/// Owner index of a zero-byte item (it moves nothing and lies nowhere).
const NOWHERE: u32 = u32::MAX;

/// Whose memory a list names, with what each item's owner index points at.
pub(crate) enum Owners {
    /// This backend's registrations.
    Local(Vec<Arc<LocalReg>>),
    /// Live imports from peer `peer` (sorted by address), and whether every one is
    /// mapped here (shared-memory path when the peer is reachable on this host).
    Remote {
        peer: u64,
        imports: Vec<Imported>,
        /// Per import, what to add to a peer address inside it to get the address in
        /// our mapping of it; `None` when some import is not mapped (no shared-memory
        /// path for this list).
        shifts: Option<Vec<u64>>,
    },
}

/// `count` items of `len` bytes, the `k`-th at `base + k * stride`, all inside one
/// owner; the first is item `start` of the list. Plain numbers: every address was
/// checked not to overflow when the list was built.
#[derive(Debug, Clone, Copy)]
struct Run {
    start: u64,
    count: u64,
    base: u64,
    stride: u64,
    len: u64,
    owner: u32,
}

/// A prepared list: item `i` is descriptor `i` of the list it was prepared from, kept
/// as runs (strided entries split where they cross from one owner to the next), so a
/// list of 100 000 blocks in a few registrations is a few runs and an item is found by
/// arithmetic, not by a load from a 100 000-entry table.
pub(crate) struct TcpList {
    pub owners: Owners,
    /// Runs of items, each inside one owner (`NOWHERE` for zero-length ones), in item
    /// order.
    runs: Vec<Run>,
    len: u64,
    /// The length of every item, when all are alike and not empty.
    uniform: Option<u64>,
}

impl TcpList {
    /// Resolves every item to the registration (sorted by address) it lies in; an item
    /// in none is `NotRegistered`.
    pub(crate) fn local(items: &DescriptorList, regs: Vec<Arc<LocalReg>>) -> Result<TcpList> {
        let runs = resolve(items, |x| {
            let end = regs.partition_point(|r| r.desc.addr <= x.addr);
            regs[..end]
                .iter()
                .rposition(|r| r.desc.contains(x))
                .map(|i| (i, regs[i].desc))
        })
        .map_err(|x| {
            Error::NotRegistered(format!(
                "list item {:#x}+{} lies outside every local registration",
                x.addr, x.len
            ))
        })?;
        Ok(TcpList {
            owners: Owners::Local(regs),
            uniform: uniform(&runs),
            runs,
            len: items.len(),
        })
    }

    /// Resolves every item to the live import from `peer` (sorted by address) it lies
    /// in; an item in none is `OutOfBounds`.
    pub(crate) fn remote(
        items: &DescriptorList,
        peer: u64,
        imports: Vec<Imported>,
    ) -> Result<TcpList> {
        let runs = resolve(items, |x| {
            let end = imports.partition_point(|(d, _, _, _)| d.addr <= x.addr);
            imports[..end]
                .iter()
                .rposition(|(d, _, _, _)| d.contains(x))
                .map(|i| (i, imports[i].0))
        })
        .map_err(|x| {
            Error::OutOfBounds(format!(
                "list item {:#x}+{} lies outside what the peer registered",
                x.addr, x.len
            ))
        })?;
        let shifts = imports
            .iter()
            .map(|(d, _, m, _)| {
                let at = m.as_ref()?.translate(d.addr, d.len)?;
                Some(at.wrapping_sub(d.addr))
            })
            .collect();
        Ok(TcpList {
            owners: Owners::Remote {
                peer,
                imports,
                shifts,
            },
            uniform: uniform(&runs),
            runs,
            len: items.len(),
        })
    }

    fn check_ids(&self, ids: &[u32]) -> Result<()> {
        // `max` over the whole array vectorises; the error path finds the culprit.
        match ids.iter().max() {
            Some(m) if *m as u64 >= self.len => Err(Error::OutOfBounds(format!(
                "item {m} of a prepared list of {} items",
                self.len
            ))),
            _ => Ok(()),
        }
    }
}

/// The length of every item of `runs`, when all are alike and not empty.
fn uniform(runs: &[Run]) -> Option<u64> {
    let len = runs.first()?.len;
    (len > 0 && runs.iter().all(|r| r.len == len)).then_some(len)
}

/// Splits the entries of `items` into runs each inside one owner, found by `find`
/// (index and extent of the owner holding a descriptor); `Err(descriptor)` for one in
/// none. A strided entry jumps from owner to owner, never visiting each descriptor.
fn resolve(
    items: &DescriptorList,
    find: impl Fn(&Descriptor) -> Option<(usize, Descriptor)>,
) -> std::result::Result<Vec<Run>, Descriptor> {
    let mut runs = Vec::new();
    let mut next = 0u64;
    for e in items.entries() {
        let (base, stride, count, len) = match *e {
            Entry::Single(d) => (d.addr, 0, 1, d.len),
            Entry::Strided {
                base,
                stride,
                count,
                len,
                ..
            } => (base, stride, count, len),
        };
        let mut k = 0u64;
        while k < count {
            // In range: the list validated every address of its entries.
            let d = e.get(k).ok_or(Descriptor::default())?;
            let (owner, last) = if len == 0 {
                (NOWHERE, count - 1)
            } else {
                let (owner, x) = find(&d).ok_or(d)?;
                // The last descriptor j with base + j * stride + len <= the owner's end
                // (>= d.addr + len >= base + len).
                let last = match stride {
                    0 => count - 1,
                    s => ((x.addr + x.len - len - base) / s).min(count - 1),
                };
                (owner as u32, last)
            };
            runs.push(Run {
                start: next + k,
                count: last - k + 1,
                base: d.addr,
                stride,
                len,
                owner,
            });
            k = last + 1;
        }
        next += count;
    }
    Ok(runs)
}

/// The bytes of the selected items, one item at a time: (address, length, owner).
struct Cursor<'a> {
    runs: &'a [Run],
    ids: std::slice::Iter<'a, u32>,
    /// The run the last item was found in (most selections stay in one run).
    run: Run,
}

impl<'a> Cursor<'a> {
    fn new(list: &'a TcpList, ids: &'a [u32]) -> Self {
        Cursor {
            runs: &list.runs,
            ids: ids.iter(),
            run: list.runs[0],
        }
    }

    /// Address and owner of item `i` (checked in range); leaves its run current.
    #[inline]
    fn locate(&mut self, i: u64) -> (u64, u32) {
        let mut k = i.wrapping_sub(self.run.start);
        if k >= self.run.count {
            let at = self.runs.partition_point(|r| r.start <= i);
            self.run = self.runs[at.saturating_sub(1)];
            k = i - self.run.start;
        }
        (self.run.base + k * self.run.stride, self.run.owner)
    }

    /// The next non-empty item of the selection: (address, length, owner).
    #[inline]
    fn next(&mut self) -> Option<(u64, u64, u32)> {
        loop {
            let i = *self.ids.next()? as u64;
            let (addr, owner) = self.locate(i);
            if self.run.len > 0 {
                return Some((addr, self.run.len, owner));
            }
        }
    }
}

/// The route of a transfer of items `lids` of `local` to or from items `rids` of
/// `remote` (whose peer is reachable by cross-memory attach when `cma`), the index
/// arrays already checked to pair up: the same segments, registrations, imports,
/// access checks and path [`crate::request::route`] finds for the equivalent request.
pub(crate) fn route(
    op: Op,
    (local, lids): (&TcpList, &[u32]),
    (remote, rids): (&TcpList, &[u32]),
    cma: bool,
) -> Result<Route> {
    let Owners::Local(regs) = &local.owners else {
        return Err(Error::invalid_argument(
            "the local side of a transfer needs a list prepared as local",
        ));
    };
    let Owners::Remote {
        imports, shifts, ..
    } = &remote.owners
    else {
        return Err(Error::invalid_argument(
            "the remote side of a transfer needs a list prepared as remote",
        ));
    };
    let shifts = shifts.as_deref().filter(|_| cma);
    local.check_ids(lids)?;
    remote.check_ids(rids)?;
    let mut own = Owned {
        op,
        regs,
        imports,
        shifts,
        lused: vec![false; regs.len()],
        rused: vec![false; imports.len()],
        lseen: NOWHERE,
        rseen: NOWHERE,
        key: 0,
        shift: 0,
    };
    let mut segs: Vec<PlanSeg> = Vec::with_capacity(lids.len());
    let (mut lc, mut rc) = (Cursor::new(local, lids), Cursor::new(remote, rids));
    match (local.uniform, remote.uniform) {
        (Some(n), Some(m)) if n == m => {
            // Every item on both sides is one descriptor of `n` bytes: each pair is one
            // segment, no remainder to carry.
            for (&li, &ri) in lids.iter().zip(rids) {
                let (la, lo) = lc.locate(li as u64);
                let (ra, ro) = rc.locate(ri as u64);
                own.local(lo)?;
                let same = own.remote(ro)?;
                push(&mut segs, same, la, ra.wrapping_add(own.shift), n, own.key);
            }
        }
        _ => {
            let (mut l, mut r) = (lc.next(), rc.next());
            while let (Some((la, ln, lo)), Some((ra, rn, ro))) = (l, r) {
                let n = ln.min(rn);
                own.local(lo)?;
                let same = own.remote(ro)?;
                push(&mut segs, same, la, ra.wrapping_add(own.shift), n, own.key);
                l = if ln > n {
                    Some((la + n, ln - n, lo))
                } else {
                    lc.next()
                };
                r = if rn > n {
                    Some((ra + n, rn - n, ro))
                } else {
                    rc.next()
                };
            }
            if l.is_some() || r.is_some() {
                segs.clear();
            }
        }
    }
    if segs.is_empty() {
        return Err(Error::invalid_argument(
            "the selected local and remote items must hold the same number of bytes, more than zero",
        ));
    }
    let (lused, rused) = (own.lused, own.rused);
    let local_regs = used(&lused).map(|i| regs[i].clone()).collect();
    let remotes = used(&rused).map(|i| imports[i].3.clone()).collect();
    let (path, maps) = if shifts.is_some() {
        let maps = used(&rused).filter_map(|i| imports[i].2.clone()).collect();
        (Path::SharedMemory, maps)
    } else if cma {
        (Path::CrossMemoryAttach, Vec::new())
    } else {
        (Path::Tcp, Vec::new())
    };
    Ok(Route {
        segs,
        regs: local_regs,
        path,
        maps,
        remotes,
        keys: imports.iter().map(|(_, k, _, _)| *k).collect(),
    })
}

/// The owners a route has named so far (checked once each), and the key and mapping
/// shift of the last remote one.
struct Owned<'a> {
    op: Op,
    regs: &'a [Arc<LocalReg>],
    imports: &'a [Imported],
    shifts: Option<&'a [u64]>,
    lused: Vec<bool>,
    rused: Vec<bool>,
    lseen: u32,
    rseen: u32,
    key: u32,
    shift: u64,
}

impl Owned<'_> {
    /// Checks local owner `lo` (a READ never lands in a read-only registration).
    #[inline]
    fn local(&mut self, lo: u32) -> Result<()> {
        if lo != self.lseen {
            let reg = &self.regs[lo as usize];
            if self.op == Op::Read && !reg.access.writable() {
                return Err(Error::AccessDenied(format!(
                    "a READ into the read-only local registration {:#x}+{}",
                    reg.desc.addr, reg.desc.len
                )));
            }
            self.lused[lo as usize] = true;
            self.lseen = lo;
        }
        Ok(())
    }

    /// Checks remote owner `ro` (a WRITE never goes to a read-only import); true when
    /// it is the same import as the last one's.
    #[inline]
    fn remote(&mut self, ro: u32) -> Result<bool> {
        if ro == self.rseen {
            return Ok(true);
        }
        let handle = &self.imports[ro as usize].3;
        if self.op == Op::Write && !handle.access().writable() {
            return Err(Error::AccessDenied(format!(
                "a WRITE into the peer's read-only registration (RemoteId#{})",
                handle.id
            )));
        }
        self.rused[ro as usize] = true;
        self.rseen = ro;
        self.key = ro;
        // Shared-memory path: the peer's memory is addressed through our mapping.
        self.shift = self.shifts.map_or(0, |s| s[ro as usize]);
        Ok(false)
    }
}

/// Appends a segment, merged with the last one when it continues it in the same import
/// (`same`: so with the same key) — a segment lies in one registration on each side.
#[inline]
fn push(segs: &mut Vec<PlanSeg>, same: bool, local: u64, remote: u64, len: u64, key: u32) {
    match segs.last_mut() {
        Some(p) if same && p.local + p.len == local && p.remote + p.len == remote => p.len += len,
        _ => segs.push(PlanSeg {
            local,
            remote,
            len,
            key,
        }),
    }
}

/// The indices whose flag is set.
fn used(flags: &[bool]) -> impl Iterator<Item = usize> + '_ {
    flags
        .iter()
        .enumerate()
        .filter(|(_, u)| **u)
        .map(|(i, _)| i)
}
