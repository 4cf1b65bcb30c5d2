//! Imports of peers' registrations (`RemoteId`s): the table of what was imported from
//! which peer, the shared-memory mappings of same-host registrations, and the
//! [`RemoteHandle`] through which prepared transfers see an import released or revoked.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use kv_core::{Descriptor, DescriptorList, Error, RemoteId, Result};
use parking_lot::RwLock;

use crate::keys::RemoteKey;
use crate::shm::Import;

/// One imported remote registration (a `RemoteId`), shared by the import table,
/// the peer (which revokes it) and the prepared transfers that address it. A post
/// checks it and counts itself in; `Send + Sync` (atomics only).
#[derive(Debug)]
pub(crate) struct RemoteHandle {
    /// The `RemoteId`.
    pub id: u64,
    /// The peer's key of the registration.
    pub key: u64,
    /// Set by `release_remote` and `disconnect`.
    released: AtomicBool,
    /// Set when the peer deregistered the registration (REVOKE) or, for a same-host
    /// peer, when its control connection was lost (a REVOKE may have been missed).
    revoked: AtomicBool,
    /// Posts that may touch the registration right now.
    inflight: AtomicUsize,
}

impl RemoteHandle {
    pub(crate) fn new(id: u64, key: u64) -> RemoteHandle {
        RemoteHandle {
            id,
            key,
            released: AtomicBool::new(false),
            revoked: AtomicBool::new(false),
            inflight: AtomicUsize::new(0),
        }
    }

    /// Marks the import released: posts naming it are refused from now on.
    pub(crate) fn release(&self) {
        self.released.store(true, Ordering::SeqCst);
    }

    /// Marks the registration revoked by the peer (REVOKE, or a same-host peer's lost
    /// control connection): posts naming it are refused from now on.
    pub(crate) fn revoke(&self) {
        self.revoked.store(true, Ordering::SeqCst);
    }

    /// Posts that may touch the registration right now.
    pub(crate) fn inflight(&self) -> usize {
        self.inflight.load(Ordering::SeqCst)
    }

    /// True once the peer revoked the registration.
    pub(crate) fn is_revoked(&self) -> bool {
        self.revoked.load(Ordering::SeqCst)
    }

    /// True while new transfers may use the import (neither released nor revoked).
    pub(crate) fn usable(&self) -> bool {
        self.refusal().is_none()
    }

    fn refusal(&self) -> Option<Error> {
        if self.released.load(Ordering::SeqCst) {
            Some(Error::NotRegistered(format!(
                "RemoteId#{} was released after the transfer was prepared",
                self.id
            )))
        } else if self.is_revoked() {
            Some(Error::NotRegistered(format!(
                "RemoteId#{}: the peer deregistered the registration (or its control \
                 connection was lost); import it again",
                self.id
            )))
        } else {
            None
        }
    }

    /// Counts a post in on every handle; refuses (counting nothing) when one was
    /// released or revoked. Paired with [`RemoteHandle::exit_all`] once the post no
    /// longer touches the peer's memory. The count is raised before the flags are
    /// read (and a revoke sets the flag before it reads the count), so a revoke
    /// either sees this post or this post sees the revoke.
    pub(crate) fn enter_all(hs: &[Arc<RemoteHandle>]) -> Result<()> {
        for (i, h) in hs.iter().enumerate() {
            h.inflight.fetch_add(1, Ordering::SeqCst);
            if let Some(e) = h.refusal() {
                Self::exit_all(&hs[..=i]);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Undoes [`RemoteHandle::enter_all`].
    pub(crate) fn exit_all(hs: &[Arc<RemoteHandle>]) {
        for h in hs {
            h.inflight.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// One import: a range of a peer's registration that transfers may address.
pub(crate) struct Remote {
    /// The endpoint (`EndpointId`) of the peer it came from.
    pub peer: u64,
    desc: Descriptor,
    key: u64,
    /// The peer's registration mapped here (shared-memory path), if it could be.
    shm: Option<Arc<Import>>,
    /// Released/revoked flags and in-flight count, shared with prepared transfers.
    pub handle: Arc<RemoteHandle>,
}

/// An import a transfer may address: its range, the peer's key, the mapping (if
/// mapped) and its handle.
pub(crate) type Imported = (Descriptor, u64, Option<Arc<Import>>, Arc<RemoteHandle>);

/// Every import of one backend, by `RemoteId`. `Send + Sync`.
#[derive(Default)]
pub(crate) struct Imports {
    t: RwLock<HashMap<u64, Remote>>,
}

impl Imports {
    /// Adds import `id` of `desc` (inside the registration `key` names) from `peer`.
    pub(crate) fn insert(
        &self,
        id: u64,
        peer: u64,
        desc: Descriptor,
        key: u64,
        shm: Option<Arc<Import>>,
        handle: Arc<RemoteHandle>,
    ) {
        self.t.write().insert(
            id,
            Remote {
                peer,
                desc,
                key,
                shm,
                handle,
            },
        );
    }

    /// Removes import `id`; the caller marks it released.
    pub(crate) fn remove(&self, id: RemoteId) -> Result<Remote> {
        self.t
            .write()
            .remove(&id.0)
            .ok_or_else(|| Error::NotRegistered(format!("{id}")))
    }

    /// Releases and forgets every import from `peer` (it was disconnected).
    pub(crate) fn remove_peer(&self, peer: u64) {
        self.t.write().retain(|_, r| {
            if r.peer == peer {
                r.handle.release();
            }
            r.peer != peer
        });
    }

    /// True when import `id` is mapped here.
    pub(crate) fn is_mapped(&self, id: RemoteId) -> Result<bool> {
        self.t
            .read()
            .get(&id.0)
            .map(|r| r.shm.is_some())
            .ok_or_else(|| Error::NotRegistered(format!("{id}")))
    }

    /// Maps the registration of `peer` (process `pid`, called `name`) that `k` names
    /// (shared-memory path), reusing the mapping of an earlier import of the same
    /// registration. Logs why when it cannot.
    pub(crate) fn map(
        &self,
        peer: u64,
        pid: u32,
        name: &str,
        k: &RemoteKey,
    ) -> Option<Arc<Import>> {
        let reg = Descriptor::new(k.addr, k.len, 0);
        if let Some(m) = self.t.read().values().find_map(|r| {
            r.shm
                .as_ref()
                .filter(|m| r.peer == peer && r.key == k.key && *m.reg() == reg)
                .cloned()
        }) {
            return Some(m);
        }
        match Import::open(pid, k) {
            Ok(m) => Some(Arc::new(m)),
            Err(why) => {
                tracing::info!(
                    "peer {}: registration {:#x}+{} is memfd-backed but not mapped ({why}); using cross-memory attach",
                    name,
                    k.addr,
                    k.len
                );
                None
            }
        }
    }

    /// The live imports from `peer`, sorted by address, for a transfer to `remote`. When
    /// `remote` is covered only with imports that were revoked or released, says why:
    /// the peer is gone (`peer_gone`, `name`) or the registration was withdrawn.
    pub(crate) fn live(
        &self,
        peer: u64,
        remote: &DescriptorList,
        peer_gone: impl FnOnce() -> bool,
        name: &str,
    ) -> Result<Vec<Imported>> {
        let (mut imports, dead): (Vec<Imported>, Vec<Imported>) = self
            .t
            .read()
            .values()
            .filter(|r| r.peer == peer)
            .map(|r| (r.desc, r.key, r.shm.clone(), r.handle.clone()))
            // A revoked import may still cover the range (its memory was freed and the
            // address reused by a newer registration): only live imports count.
            .partition(|(_, _, _, h)| h.usable());
        if !dead.is_empty() {
            let live: Vec<Descriptor> = imports.iter().map(|(d, _, _, _)| *d).collect();
            let all: Vec<Descriptor> = live
                .iter()
                .chain(dead.iter().map(|(d, _, _, _)| d))
                .copied()
                .collect();
            if !remote.within(&live) && remote.within(&all) {
                // Covered only by imports that were revoked or released: say why.
                if peer_gone() {
                    return Err(Error::RemoteDisconnected {
                        peer: name.to_string(),
                        reason:
                            "the peer closed its control connection; its registrations were revoked"
                                .into(),
                    });
                }
                return Err(Error::NotRegistered(
                    "the remote registration was revoked by the peer (deregistered) or released; import it again".into(),
                ));
            }
        }
        imports.sort_by_key(|(d, _, _, _)| d.addr);
        Ok(imports)
    }
}
