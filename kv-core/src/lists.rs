//! Prepared lists kept the simple way, for backends that implement
//! [`Backend::prepare_list`](crate::Backend::prepare_list) without a faster plan of
//! their own: [`ListTable`] stores each list's items and turns a [`SelectRequest`] into
//! the [`TransferRequest`] its selected items make, for the backend's own `prepare`.
//! The [`loopback`](crate::loopback) backend uses it; a backend that wants the per-request
//! cost NIXL's prepared lists have resolves its items once in `prepare_list` instead
//! (the tcp backend does).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;

use crate::backend::{ListId, ListSide, SelectRequest, TransferRequest};
use crate::desc::{Descriptor, DescriptorList, Entry, MemKind};
use crate::error::{Error, Result};

/// One stored list: whose memory, its kind and its items. `Send + Sync`.
#[derive(Debug, Clone)]
pub struct StoredList {
    /// Whose memory the items name.
    pub side: ListSide,
    /// Kind of that memory.
    pub kind: MemKind,
    /// Item `i` is descriptor `i`.
    pub items: ItemIndex,
}

/// A [`DescriptorList`] with O(log entries) access to descriptor `i` (where
/// [`DescriptorList::get`] walks the entries). `Clone`, `Send + Sync`.
#[derive(Debug, Clone)]
pub struct ItemIndex {
    entries: Vec<Entry>,
    /// Index of the first descriptor of each entry.
    starts: Vec<u64>,
    len: u64,
}

impl ItemIndex {
    /// Indexes `list`.
    pub fn new(list: &DescriptorList) -> Self {
        let mut starts = Vec::with_capacity(list.entries().len());
        let mut next = 0u64;
        for e in list.entries() {
            starts.push(next);
            next += e.count();
        }
        ItemIndex {
            entries: list.entries().to_vec(),
            starts,
            len: list.len(),
        }
    }

    /// Number of items.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when there is no item.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Item `i`, with the index of the entry it comes from.
    pub fn get(&self, i: u64) -> Option<(Descriptor, usize)> {
        let e = self.starts.partition_point(|s| *s <= i).checked_sub(1)?;
        Some((self.entries[e].get(i - self.starts[e])?, e))
    }

    /// The compact entries.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// Index of the first item of each entry.
    pub fn starts(&self) -> &[u64] {
        &self.starts
    }
}

/// Prepared lists by id: the items as kv-core keeps them ([`StoredList`], the default)
/// or a backend's own resolved form `T`. `Send + Sync`; cheap to look up from many
/// threads.
#[derive(Debug)]
pub struct ListTable<T = StoredList> {
    next: AtomicU64,
    lists: RwLock<HashMap<u64, Arc<T>>>,
}

impl<T> Default for ListTable<T> {
    fn default() -> Self {
        ListTable {
            next: AtomicU64::new(0),
            lists: RwLock::new(HashMap::new()),
        }
    }
}

impl<T> ListTable<T> {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Stores `list` under a new id.
    pub fn insert_list(&self, list: T) -> ListId {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        self.lists.write().insert(id, Arc::new(list));
        ListId(id)
    }

    /// The list `id` (`NotRegistered` once released or never prepared).
    pub fn get(&self, id: ListId) -> Result<Arc<T>> {
        self.lists
            .read()
            .get(&id.0)
            .cloned()
            .ok_or_else(|| Error::NotRegistered(format!("{id} is released or unknown")))
    }

    /// Forgets list `id`.
    pub fn remove(&self, id: ListId) -> Result<()> {
        self.lists
            .write()
            .remove(&id.0)
            .map(|_| ())
            .ok_or_else(|| Error::NotRegistered(format!("{id} is released or unknown")))
    }
}

impl ListTable<StoredList> {
    /// Stores a list of items (its shape checked with [`check_items`]).
    pub fn insert(&self, side: ListSide, kind: MemKind, items: &DescriptorList) -> Result<ListId> {
        check_items(items)?;
        Ok(self.insert_list(StoredList {
            side,
            kind,
            items: ItemIndex::new(items),
        }))
    }

    /// The request `req` selects: the chosen items' descriptors, each side in the order
    /// of its index array. Refuses what the contract refuses (a local list named as
    /// remote or the reverse, index arrays of different lengths or empty, an index
    /// past the end); equal non-zero totals are left to `prepare`.
    pub fn request(&self, req: &SelectRequest<'_>) -> Result<TransferRequest> {
        let (local, remote) = (self.get(req.local)?, self.get(req.remote)?);
        let ListSide::Remote(peer) = remote.side else {
            return Err(Error::invalid_argument(format!(
                "{} names local memory; a transfer's remote side needs a remote list",
                req.remote
            )));
        };
        if local.side != ListSide::Local {
            return Err(Error::invalid_argument(format!(
                "{} names a peer's memory; a transfer's local side needs a local list",
                req.local
            )));
        }
        check_selection(req)?;
        Ok(TransferRequest {
            op: req.op,
            local_kind: local.kind,
            local: select(&local.items, req.local_items)?,
            peer,
            remote_kind: remote.kind,
            remote: select(&remote.items, req.remote_items)?,
        })
    }
}

/// Checks the shape of a list: 1 to 2^32 - 1 items (indices are `u32`), not where they
/// lie (that is the backend's check).
pub fn check_items(items: &DescriptorList) -> Result<()> {
    if items.is_empty() || items.len() > u32::MAX as u64 {
        return Err(Error::invalid_argument(format!(
            "a prepared list holds 1..=2^32-1 items, not {}",
            items.len()
        )));
    }
    Ok(())
}

/// Refuses index arrays of different lengths or with no index.
pub fn check_selection(req: &SelectRequest<'_>) -> Result<()> {
    if req.local_items.len() != req.remote_items.len() || req.local_items.is_empty() {
        return Err(Error::invalid_argument(format!(
            "{} local and {} remote items selected; they must pair up, at least one",
            req.local_items.len(),
            req.remote_items.len()
        )));
    }
    Ok(())
}

/// The descriptors of items `ids` of `items`, in that order.
pub fn select(items: &ItemIndex, ids: &[u32]) -> Result<DescriptorList> {
    let mut out = DescriptorList::new();
    for &i in ids {
        let (d, _) = items.get(i as u64).ok_or_else(|| {
            Error::OutOfBounds(format!(
                "item {i} of a prepared list of {} items",
                items.len()
            ))
        })?;
        out.push(d)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{EndpointId, Op};

    fn list(ds: &[(u64, u64)]) -> DescriptorList {
        DescriptorList::try_from_iter(ds.iter().map(|(a, l)| Descriptor::new(*a, *l, 0))).unwrap()
    }

    #[test]
    fn selection_takes_items_in_index_order() {
        let t = ListTable::new();
        let local = t
            .insert(
                ListSide::Local,
                MemKind::Dram,
                &list(&[(0, 8), (100, 8), (200, 8)]),
            )
            .unwrap();
        let mut r = DescriptorList::strided(1000, 16, 4, 8, 0).unwrap();
        r.push(Descriptor::new(500, 8, 0)).unwrap();
        let remote = t
            .insert(ListSide::Remote(EndpointId(7)), MemKind::Dram, &r)
            .unwrap();
        let req = t
            .request(&SelectRequest {
                op: Op::Write,
                local,
                local_items: &[2, 0, 1],
                remote,
                remote_items: &[4, 3, 0],
            })
            .unwrap();
        assert_eq!(req.peer, EndpointId(7));
        let l: Vec<_> = req.local.iter().map(|d| d.addr).collect();
        let r: Vec<_> = req.remote.iter().map(|d| d.addr).collect();
        assert_eq!((l, r), (vec![200, 0, 100], vec![500, 1048, 1000]));
    }

    #[test]
    fn index_finds_items_across_entries() {
        let mut l = DescriptorList::strided(0, 100, 3, 10, 0).unwrap();
        l.push(Descriptor::new(7, 1, 0)).unwrap();
        l.push_strided(5000, 10, 2, 10, 0).unwrap();
        let ix = ItemIndex::new(&l);
        let all: Vec<_> = (0..ix.len()).map(|i| ix.get(i).unwrap().0).collect();
        assert_eq!(all, l.iter().collect::<Vec<_>>());
        assert!(ix.get(ix.len()).is_none());
    }

    #[test]
    fn refusals() {
        let t = ListTable::new();
        assert!(t
            .insert(ListSide::Local, MemKind::Dram, &DescriptorList::new())
            .is_err());
        let l = t
            .insert(ListSide::Local, MemKind::Dram, &list(&[(0, 8)]))
            .unwrap();
        let r = t
            .insert(
                ListSide::Remote(EndpointId(1)),
                MemKind::Dram,
                &list(&[(0, 8)]),
            )
            .unwrap();
        let req = |local, li: &'static [u32], remote, ri: &'static [u32]| SelectRequest {
            op: Op::Read,
            local,
            local_items: li,
            remote,
            remote_items: ri,
        };
        assert!(matches!(
            t.request(&req(l, &[1], r, &[0])),
            Err(Error::OutOfBounds(_))
        ));
        assert!(matches!(
            t.request(&req(l, &[0, 0], r, &[0])),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            t.request(&req(r, &[0], l, &[0])),
            Err(Error::InvalidArgument(_))
        ));
        t.remove(r).unwrap();
        assert!(matches!(
            t.request(&req(l, &[0], r, &[0])),
            Err(Error::NotRegistered(_))
        ));
        assert!(t.remove(r).is_err());
    }
}
