//! Local registrations: what this backend may read and write, for its own transfers
//! and for requests that peers send it.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kv_core::{Descriptor, Error, RegistrationId, Result};
use parking_lot::RwLock;

/// Registration ids are unique in the process, so an id from one backend never names
/// another backend's registration.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A random 64-bit value (std's per-process random hasher keys, mixed with a counter).
pub(crate) fn random_u64() -> u64 {
    static CTR: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(CTR.fetch_add(1, Ordering::Relaxed));
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.write_u32(std::process::id());
    h.finish()
}

/// One registered range. Shared between the table, prepared transfers and serving
/// threads; `Send + Sync` (atomics only).
#[derive(Debug)]
pub(crate) struct LocalReg {
    pub id: u64,
    pub desc: Descriptor,
    /// The key peers name it by (random, never 0).
    pub key: u64,
    /// The memfd behind it when it lies in a shared host buffer (same-host peers map it).
    pub shared: Option<crate::shm::Export>,
    /// False once `deregister` began: peers' requests and new posts are refused and
    /// requests being served stop at their next read or write. The registration stays
    /// in the table until nothing touches it any more (a `Busy` deregister leaves it
    /// there, revoked, for a retry to wait again).
    live: AtomicBool,
    /// Posted local transfers naming it.
    busy: AtomicU32,
    /// Peer requests being served into or out of it right now.
    serving: AtomicU32,
}

/// Holds a registration for the duration of one served request; deregister waits for
/// it to drop.
#[derive(Debug)]
pub(crate) struct Serving(Arc<LocalReg>);

impl Drop for Serving {
    fn drop(&mut self) {
        self.0.serving.fetch_sub(1, Ordering::Release);
    }
}

impl Serving {
    #[cfg(test)]
    pub(crate) fn reg(&self) -> &LocalReg {
        &self.0
    }

    /// True once `deregister` of the registration began: the serving thread must stop
    /// touching it.
    pub(crate) fn revoked(&self) -> bool {
        !self.0.live.load(Ordering::Acquire)
    }

    /// True when both guards hold the same registration.
    pub(crate) fn same(&self, other: &Serving) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

#[derive(Default)]
struct Tables {
    by_id: HashMap<u64, Arc<LocalReg>>,
    by_key: HashMap<u64, Arc<LocalReg>>,
}

/// The registration table. `Send + Sync`; lookups take a read lock.
#[derive(Default)]
pub(crate) struct Registry {
    t: RwLock<Tables>,
    /// Bumped whenever a registration is revoked: serving threads compare it before
    /// every read or write and look at their own registrations only when it moved.
    epoch: AtomicU64,
}

impl Registry {
    pub(crate) fn register(&self, desc: Descriptor) -> Result<RegistrationId> {
        if desc.len == 0 || desc.end().is_none() || desc.addr == 0 {
            return Err(Error::invalid_argument(format!(
                "cannot register {:#x}+{}",
                desc.addr, desc.len
            )));
        }
        let shared = crate::shm::Export::of(&desc);
        let mut t = self.t.write();
        let key = loop {
            let k = random_u64();
            if k != 0 && !t.by_key.contains_key(&k) {
                break k;
            }
        };
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let reg = Arc::new(LocalReg {
            id,
            desc,
            key,
            shared,
            live: AtomicBool::new(true),
            busy: AtomicU32::new(0),
            serving: AtomicU32::new(0),
        });
        t.by_id.insert(id, reg.clone());
        t.by_key.insert(key, reg);
        Ok(RegistrationId(id))
    }

    /// First step of `deregister`: refuses while a posted transfer names the
    /// registration, else revokes it (peers' new requests are refused, requests being
    /// served stop at their next read or write, new posts are refused). The
    /// registration stays in the table until [`Registry::unlink`].
    pub(crate) fn revoke(&self, id: RegistrationId) -> Result<Arc<LocalReg>> {
        let t = self.t.write();
        let reg = t
            .by_id
            .get(&id.0)
            .ok_or_else(|| Error::NotRegistered(format!("{id}")))?;
        let busy = reg.busy.load(Ordering::Acquire);
        if busy > 0 {
            return Err(Error::Busy(format!(
                "{id} is named by {busy} posted transfer(s); wait or cancel them first"
            )));
        }
        reg.live.store(false, Ordering::Release);
        self.epoch.fetch_add(1, Ordering::AcqRel);
        Ok(reg.clone())
    }

    /// Waits until no peer request is being served from `reg` (they stop within a
    /// tick of the revoke); false when `until` passed first.
    pub(crate) fn wait_served(reg: &LocalReg, until: Instant) -> bool {
        while reg.serving.load(Ordering::Acquire) > 0 {
            if Instant::now() >= until {
                return false;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        true
    }

    /// Last step of `deregister`: removes the revoked registration from the table.
    pub(crate) fn unlink(&self, reg: &LocalReg) {
        let mut t = self.t.write();
        t.by_id.remove(&reg.id);
        t.by_key.remove(&reg.key);
    }

    /// Revokes, waits (until `until`) for served requests, and unlinks: the whole
    /// deregistration when no same-host importer has to be told (unit tests).
    #[cfg(test)]
    pub(crate) fn deregister(&self, id: RegistrationId, wait: Duration) -> Result<()> {
        let reg = self.revoke(id)?;
        if !Self::wait_served(&reg, Instant::now() + wait) {
            return Err(Error::Busy(format!(
                "{id}: a peer request is still being served; retry to wait again"
            )));
        }
        self.unlink(&reg);
        Ok(())
    }

    /// The revoke epoch (see [`Registry::revoke`]).
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    pub(crate) fn get(&self, id: RegistrationId) -> Result<Arc<LocalReg>> {
        self.t
            .read()
            .by_id
            .get(&id.0)
            .cloned()
            .ok_or_else(|| Error::NotRegistered(format!("{id}")))
    }

    /// A snapshot of every registration, sorted by address (for prepare).
    pub(crate) fn snapshot(&self) -> Vec<Arc<LocalReg>> {
        let mut v: Vec<_> = self.t.read().by_id.values().cloned().collect();
        v.sort_by_key(|r| r.desc.addr);
        v
    }

    /// Marks the registrations as named by a posted transfer; fails if one is gone.
    pub(crate) fn pin(&self, regs: &[Arc<LocalReg>]) -> Result<()> {
        let _t = self.t.read();
        if let Some(r) = regs.iter().find(|r| !r.live.load(Ordering::Acquire)) {
            return Err(Error::NotRegistered(format!(
                "RegistrationId#{} was deregistered after the transfer was prepared",
                r.id
            )));
        }
        for r in regs {
            r.busy.fetch_add(1, Ordering::AcqRel);
        }
        Ok(())
    }

    /// Undoes [`Registry::pin`].
    pub(crate) fn unpin(regs: &[Arc<LocalReg>]) {
        for r in regs {
            r.busy.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Target-side check of a peer's request: the key must name a live registration
    /// that contains the range. The guard keeps deregister waiting until it drops.
    pub(crate) fn serve(&self, key: u64, addr: u64, len: u64) -> Result<Serving> {
        let t = self.t.read();
        let reg = t
            .by_key
            .get(&key)
            .filter(|r| r.live.load(Ordering::Acquire))
            .ok_or_else(|| {
                Error::NotRegistered(format!("remote key {key:#x} (deregistered on the target)"))
            })?;
        if !reg
            .desc
            .contains(&Descriptor::new(addr, len, reg.desc.device))
        {
            return Err(Error::OutOfBounds(format!(
                "{addr:#x}+{len} outside the target registration {:#x}+{}",
                reg.desc.addr, reg.desc.len
            )));
        }
        reg.serving.fetch_add(1, Ordering::AcqRel);
        Ok(Serving(reg.clone()))
    }
}

/// The registration in `sorted` (by address) that contains `d`, if any.
pub(crate) fn find_containing<'a>(
    sorted: &'a [Arc<LocalReg>],
    d: &Descriptor,
) -> Option<&'a Arc<LocalReg>> {
    let end = sorted.partition_point(|r| r.desc.addr <= d.addr);
    sorted[..end].iter().rev().find(|r| r.desc.contains(d))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serve_checks_key_and_range_and_deregister_waits() {
        let r = Registry::default();
        let id = r.register(Descriptor::new(0x1000, 0x1000, 0)).unwrap();
        let key = r.get(id).unwrap().key;
        assert!(matches!(
            r.serve(key ^ 1, 0x1000, 1),
            Err(Error::NotRegistered(_))
        ));
        assert!(matches!(
            r.serve(key, 0x1fff, 2),
            Err(Error::OutOfBounds(_))
        ));
        assert!(matches!(r.serve(key, 0xfff, 1), Err(Error::OutOfBounds(_))));
        let g = r.serve(key, 0x1000, 0x1000).unwrap();
        assert_eq!(g.reg().id, id.0);
        assert!(!g.revoked());
        // Busy while served, and the registration stays (revoked) so a retry waits again.
        assert!(matches!(
            r.deregister(id, Duration::from_millis(20)),
            Err(Error::Busy(_))
        ));
        assert!(g.revoked());
        assert!(matches!(
            r.serve(key, 0x1000, 1),
            Err(Error::NotRegistered(_))
        ));
        drop(g);
        r.deregister(id, Duration::ZERO).unwrap();
        assert!(matches!(
            r.deregister(id, Duration::ZERO),
            Err(Error::NotRegistered(_))
        ));
        let id = r.register(Descriptor::new(0x1000, 0x1000, 0)).unwrap();
        let reg = r.get(id).unwrap();
        r.pin(std::slice::from_ref(&reg)).unwrap();
        assert!(matches!(
            r.deregister(id, Duration::ZERO),
            Err(Error::Busy(_))
        ));
        Registry::unpin(std::slice::from_ref(&reg));
        r.deregister(id, Duration::ZERO).unwrap();
        assert!(r.pin(&[reg]).is_err());
    }

    #[test]
    fn find_containing_picks_the_right_registration() {
        let r = Registry::default();
        for a in [0x1000u64, 0x3000, 0x8000] {
            r.register(Descriptor::new(a, 0x1000, 0)).unwrap();
        }
        let s = r.snapshot();
        assert_eq!(
            find_containing(&s, &Descriptor::new(0x3800, 0x800, 0))
                .unwrap()
                .desc
                .addr,
            0x3000
        );
        assert!(find_containing(&s, &Descriptor::new(0x3800, 0x801, 0)).is_none());
        assert!(find_containing(&s, &Descriptor::new(0x100, 1, 0)).is_none());
    }
}
