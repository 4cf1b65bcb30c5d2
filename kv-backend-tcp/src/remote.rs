//! Imports of peers' registrations (`RemoteId`s): the table of what was imported from
//! which peer, the shared-memory mappings of same-host registrations, and the
//! [`RemoteHandle`] through which prepared transfers see an import released, revoked
//! or waiting to be re-validated.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;

use kv_core::{Access, Descriptor, DescriptorList, Error, RemoteId, Result};
use parking_lot::RwLock;

use crate::keys::RemoteKey;
use crate::shm::Import;

/// The import may be used.
const LIVE: u8 = 0;
/// Waiting for the target to confirm it live (a same-host import being validated, or
/// re-validated after the control connection was lost).
const PENDING: u8 = 1;
/// The target deregistered it (or refused it): never usable again.
const REVOKED: u8 = 2;

/// One imported remote registration (a `RemoteId`), shared by the import table,
/// the peer (which revokes and re-validates it) and the prepared transfers that
/// address it. A post checks it and counts itself in; `Send + Sync` (atomics only).
#[derive(Debug)]
pub(crate) struct RemoteHandle {
    /// The `RemoteId`.
    pub id: u64,
    /// The peer's key of the registration.
    pub key: u128,
    /// The range imported (what a same-host import validates with the target).
    pub desc: Descriptor,
    /// Set by `release_remote` and `disconnect`.
    released: AtomicBool,
    /// [`LIVE`], [`PENDING`] or [`REVOKED`].
    state: AtomicU8,
    /// The access the target reported ([`Access::as_u8`]).
    access: AtomicU8,
    /// Posts that may touch the registration right now.
    inflight: AtomicUsize,
}

impl RemoteHandle {
    /// A live import (TCP peers: the target checks every request itself).
    pub(crate) fn new(id: u64, key: u128, desc: Descriptor, access: Access) -> RemoteHandle {
        RemoteHandle {
            id,
            key,
            desc,
            released: AtomicBool::new(false),
            state: AtomicU8::new(LIVE),
            access: AtomicU8::new(access.as_u8()),
            inflight: AtomicUsize::new(0),
        }
    }

    /// An import that is usable only once the target confirms it
    /// ([`RemoteHandle::validated`]).
    pub(crate) fn pending(id: u64, key: u128, desc: Descriptor) -> RemoteHandle {
        let h = RemoteHandle::new(id, key, desc, Access::ReadOnly);
        h.state.store(PENDING, Ordering::SeqCst);
        h
    }

    /// Marks the import released: posts naming it are refused from now on.
    pub(crate) fn release(&self) {
        self.released.store(true, Ordering::SeqCst);
    }

    /// True once released.
    pub(crate) fn is_released(&self) -> bool {
        self.released.load(Ordering::SeqCst)
    }

    /// The peer deregistered the registration (REVOKE) or refused it: posts naming it
    /// are refused from now on, for good.
    pub(crate) fn revoke(&self) {
        self.state.store(REVOKED, Ordering::SeqCst);
    }

    /// The control connection was lost (a REVOKE may have been missed): posts are
    /// refused until the target confirms the registration again.
    pub(crate) fn suspend(&self) {
        let _ = self
            .state
            .compare_exchange(LIVE, PENDING, Ordering::SeqCst, Ordering::SeqCst);
    }

    /// The target confirmed the registration live with `access`; never revives a
    /// revoked import.
    pub(crate) fn validated(&self, access: Access) {
        self.access.store(access.as_u8(), Ordering::SeqCst);
        let _ = self
            .state
            .compare_exchange(PENDING, LIVE, Ordering::SeqCst, Ordering::SeqCst);
    }

    /// Posts that may touch the registration right now.
    pub(crate) fn inflight(&self) -> usize {
        self.inflight.load(Ordering::SeqCst)
    }

    /// True once the peer revoked the registration.
    pub(crate) fn is_revoked(&self) -> bool {
        self.state.load(Ordering::SeqCst) == REVOKED
    }

    /// True while the target has not (re-)confirmed the import.
    pub(crate) fn is_pending(&self) -> bool {
        self.state.load(Ordering::SeqCst) == PENDING
    }

    /// What peers may do with the registration, as the target says.
    pub(crate) fn access(&self) -> Access {
        Access::from_u8(self.access.load(Ordering::SeqCst)).unwrap_or(Access::ReadOnly)
    }

    /// True while new transfers may use the import (neither released, revoked nor
    /// waiting for validation).
    pub(crate) fn usable(&self) -> bool {
        self.refusal().is_none()
    }

    fn refusal(&self) -> Option<Error> {
        if self.released.load(Ordering::SeqCst) {
            return Some(Error::NotRegistered(format!(
                "RemoteId#{} was released after the transfer was prepared",
                self.id
            )));
        }
        match self.state.load(Ordering::SeqCst) {
            LIVE => None,
            PENDING => Some(Error::NotRegistered(format!(
                "RemoteId#{}: the peer has not confirmed the registration (its control \
                 connection was lost and is being re-established)",
                self.id
            ))),
            _ => Some(Error::NotRegistered(format!(
                "RemoteId#{}: the peer deregistered the registration; import it again",
                self.id
            ))),
        }
    }

    /// Counts a post in on every handle; refuses (counting nothing) when one is not
    /// usable. Paired with [`RemoteHandle::exit_all`] once the post no longer touches
    /// the peer's memory. The count is raised before the state is read (and a revoke or
    /// suspension sets the state before it reads the count), so a revoke either sees
    /// this post or this post sees the revoke.
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
    key: u128,
    /// The peer's registration mapped here (shared-memory path), if it could be.
    shm: Option<Arc<Import>>,
    /// Released/revoked flags and in-flight count, shared with prepared transfers.
    pub handle: Arc<RemoteHandle>,
}

/// An import a transfer may address: its range, the peer's key, the mapping (if
/// mapped) and its handle.
pub(crate) type Imported = (Descriptor, u128, Option<Arc<Import>>, Arc<RemoteHandle>);

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
        key: u128,
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

    /// The imports from `peer` waiting for the target to confirm them again.
    pub(crate) fn pending(&self, peer: u64) -> Vec<Arc<RemoteHandle>> {
        self.t
            .read()
            .values()
            .filter(|r| r.peer == peer && r.handle.is_pending() && !r.handle.is_released())
            .map(|r| r.handle.clone())
            .collect()
    }

    /// True when import `id` is mapped here.
    pub(crate) fn is_mapped(&self, id: RemoteId) -> Result<bool> {
        self.t
            .read()
            .get(&id.0)
            .map(|r| r.shm.is_some())
            .ok_or_else(|| Error::NotRegistered(format!("{id}")))
    }

    /// Maps the registration of `peer` (process `pid` / `pidfd`, called `name`) that
    /// `k` — the target's live description — names (shared-memory path), reusing the
    /// mapping of an earlier import of the same registration with the same access.
    /// `Ok(None)`: not mappable (logged; cross-memory attach is used); `Err`: the key
    /// is stale, refuse the import.
    pub(crate) fn map(
        &self,
        peer: u64,
        proc: (Option<std::os::fd::BorrowedFd<'_>>, u32),
        name: &str,
        k: &RemoteKey,
    ) -> Result<Option<Arc<Import>>> {
        let reg = Descriptor::new(k.addr, k.len, 0);
        if let Some(m) = self.t.read().values().find_map(|r| {
            r.shm
                .as_ref()
                .filter(|m| {
                    r.peer == peer
                        && r.key == k.key
                        && *m.reg() == reg
                        && m.read_only() == k.read_only
                })
                .cloned()
        }) {
            return Ok(Some(m));
        }
        match Import::open(proc.0, proc.1, k) {
            Ok(m) => Ok(Some(Arc::new(m))),
            Err((true, why)) => Err(Error::NotRegistered(format!(
                "peer {name}: registration {:#x}+{} cannot be mapped ({why})",
                k.addr, k.len
            ))),
            Err((false, why)) => {
                if k.shared.is_some() {
                    tracing::info!(
                        "peer {}: registration {:#x}+{} is memfd-backed but not mapped ({why}); using cross-memory attach",
                        name,
                        k.addr,
                        k.len
                    );
                }
                Ok(None)
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
