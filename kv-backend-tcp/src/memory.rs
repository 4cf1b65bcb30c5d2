//! Local registrations: what this backend may read and write, for its own transfers
//! and for requests that peers send it, and which same-host importers must hear when
//! one goes (check-and-subscribe, serialised with revocation).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kv_core::{Access, Descriptor, Error, RegistrationId, Result};
use parking_lot::{Mutex, RwLock};

use crate::keys::RemoteKey;

/// Registration ids are unique in the process, so an id from one backend never names
/// another backend's registration.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// One registered range. Shared between the table, prepared transfers and serving
/// threads; `Send + Sync`.
#[derive(Debug)]
pub(crate) struct LocalReg {
    pub id: u64,
    pub desc: Descriptor,
    /// The key peers name it by: 128 random bits from the OS, never 0.
    pub key: u128,
    /// Whether peers (and READs landing here) may write it.
    pub access: Access,
    /// The memfd behind it when it lies in a shared host buffer (same-host peers map it).
    pub shared: Option<crate::shm::Export>,
    /// Same-host importers (their importer ids) that validated an import of it and must
    /// acknowledge its REVOKE. Changed, like `live`, only under this lock: an import
    /// either sees the revocation or is seen by it.
    subscribers: Mutex<Vec<u64>>,
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
    by_key: HashMap<u128, Arc<LocalReg>>,
}

/// The registration table. `Send + Sync`; lookups take a read lock.
#[derive(Default)]
pub(crate) struct Registry {
    t: RwLock<Tables>,
    /// Bumped whenever a registration is revoked: serving threads compare it before
    /// every read or write and look at their own registrations only when it moved.
    epoch: AtomicU64,
}

impl LocalReg {
    /// The remote key peers address it with.
    pub(crate) fn remote_key(&self) -> RemoteKey {
        RemoteKey {
            key: self.key,
            addr: self.desc.addr,
            len: self.desc.len,
            read_only: !self.access.writable(),
            shared: self.shared.as_ref().map(|e| e.key()),
        }
    }

    /// True while peers may use it (until `deregister` began).
    pub(crate) fn is_live(&self) -> bool {
        self.live.load(Ordering::Acquire)
    }
}

impl Registry {
    pub(crate) fn register(&self, desc: Descriptor, access: Access) -> Result<RegistrationId> {
        if desc.len == 0 || desc.end().is_none() || desc.addr == 0 {
            return Err(Error::invalid_argument(format!(
                "cannot register {:#x}+{}",
                desc.addr, desc.len
            )));
        }
        let shared = crate::shm::Export::of(&desc);
        let mut key = kv_core::auth::random_u128()?;
        let mut t = self.t.write();
        while key == 0 || t.by_key.contains_key(&key) {
            key = kv_core::auth::random_u128()?;
        }
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let reg = Arc::new(LocalReg {
            id,
            desc,
            key,
            access,
            shared,
            subscribers: Mutex::new(Vec::new()),
            live: AtomicBool::new(true),
            busy: AtomicU32::new(0),
            serving: AtomicU32::new(0),
        });
        t.by_id.insert(id, reg.clone());
        t.by_key.insert(key, reg);
        Ok(RegistrationId(id))
    }

    /// First step of `deregister`: refuses while a posted transfer names the
    /// registration, else revokes it (peers' new requests and imports are refused,
    /// requests being served stop at their next read or write, new posts are refused).
    /// Returns it with the same-host importers that must acknowledge the revocation.
    /// The registration stays in the table until [`Registry::unlink`].
    pub(crate) fn revoke(&self, id: RegistrationId) -> Result<(Arc<LocalReg>, Vec<u64>)> {
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
        let subs = reg.subscribers.lock();
        reg.live.store(false, Ordering::Release);
        self.epoch.fetch_add(1, Ordering::AcqRel);
        Ok((reg.clone(), subs.clone()))
    }

    /// Check-and-subscribe: `key` must name a live registration containing
    /// `addr..addr+len`; then `importer` is told (REVOKE) when it goes. Serialised with
    /// [`Registry::revoke`] by the registration's subscriber lock.
    pub(crate) fn subscribe(
        &self,
        key: u128,
        addr: u64,
        len: u64,
        importer: u64,
    ) -> Result<Arc<LocalReg>> {
        let reg = self
            .t
            .read()
            .by_key
            .get(&key)
            .cloned()
            .ok_or_else(|| not_registered(key))?;
        let mut subs = reg.subscribers.lock();
        if !reg.is_live() {
            return Err(not_registered(key));
        }
        check_within(&reg, addr, len)?;
        if !subs.contains(&importer) {
            subs.push(importer);
        }
        drop(subs);
        Ok(reg)
    }

    /// Forgets `importer`'s subscriptions (it said it holds no import any more).
    pub(crate) fn unsubscribe_all(&self, importer: u64) {
        for reg in self.t.read().by_id.values() {
            reg.subscribers.lock().retain(|i| *i != importer);
        }
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
        let (reg, _) = self.revoke(id)?;
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
    /// that contains the range and, for a WRITE (`write`), is writable. The guard
    /// keeps deregister waiting until it drops.
    pub(crate) fn serve(&self, key: u128, addr: u64, len: u64, write: bool) -> Result<Serving> {
        let t = self.t.read();
        let reg = t
            .by_key
            .get(&key)
            .filter(|r| r.is_live())
            .ok_or_else(|| not_registered(key))?;
        check_within(reg, addr, len)?;
        if write && !reg.access.writable() {
            return Err(Error::AccessDenied(format!(
                "WRITE into the read-only registration {:#x}+{}",
                reg.desc.addr, reg.desc.len
            )));
        }
        reg.serving.fetch_add(1, Ordering::AcqRel);
        Ok(Serving(reg.clone()))
    }
}

fn not_registered(key: u128) -> Error {
    // Only the first bits: enough to tell keys apart in logs, not to reuse one.
    Error::NotRegistered(format!(
        "remote key {:08x}… (not registered, or deregistered, on the target)",
        (key >> 96) as u32
    ))
}

fn check_within(reg: &LocalReg, addr: u64, len: u64) -> Result<()> {
    if !reg
        .desc
        .contains(&Descriptor::new(addr, len, reg.desc.device))
    {
        return Err(Error::OutOfBounds(format!(
            "{addr:#x}+{len} outside the target registration {:#x}+{}",
            reg.desc.addr, reg.desc.len
        )));
    }
    Ok(())
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
        let id = r
            .register(Descriptor::new(0x1000, 0x1000, 0), Access::ReadWrite)
            .unwrap();
        let key = r.get(id).unwrap().key;
        assert!(matches!(
            r.serve(key ^ 1, 0x1000, 1, true),
            Err(Error::NotRegistered(_))
        ));
        assert!(matches!(
            r.serve(key, 0x1fff, 2, true),
            Err(Error::OutOfBounds(_))
        ));
        assert!(matches!(
            r.serve(key, 0xfff, 1, false),
            Err(Error::OutOfBounds(_))
        ));
        let g = r.serve(key, 0x1000, 0x1000, true).unwrap();
        assert_eq!(g.reg().id, id.0);
        assert!(!g.revoked());
        // Busy while served, and the registration stays (revoked) so a retry waits again.
        assert!(matches!(
            r.deregister(id, Duration::from_millis(20)),
            Err(Error::Busy(_))
        ));
        assert!(g.revoked());
        assert!(matches!(
            r.serve(key, 0x1000, 1, false),
            Err(Error::NotRegistered(_))
        ));
        drop(g);
        r.deregister(id, Duration::ZERO).unwrap();
        assert!(matches!(
            r.deregister(id, Duration::ZERO),
            Err(Error::NotRegistered(_))
        ));
        let id = r
            .register(Descriptor::new(0x1000, 0x1000, 0), Access::ReadWrite)
            .unwrap();
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
    fn read_only_refuses_writes_and_subscriptions_race_with_revoke() {
        let r = Registry::default();
        let id = r
            .register(Descriptor::new(0x1000, 0x1000, 0), Access::ReadOnly)
            .unwrap();
        let key = r.get(id).unwrap().key;
        assert!(r.get(id).unwrap().remote_key().read_only);
        assert!(matches!(
            r.serve(key, 0x1000, 8, true),
            Err(Error::AccessDenied(_))
        ));
        drop(r.serve(key, 0x1000, 8, false).unwrap());
        // Subscribed importers are returned by the revoke; afterwards nobody subscribes.
        r.subscribe(key, 0x1000, 0x1000, 7).unwrap();
        r.subscribe(key, 0x1000, 0x10, 7).unwrap();
        assert!(matches!(
            r.subscribe(key, 0x1000, 0x1001, 8),
            Err(Error::OutOfBounds(_))
        ));
        r.subscribe(key, 0x1800, 0x10, 9).unwrap();
        r.unsubscribe_all(9);
        let (_, subs) = r.revoke(id).unwrap();
        assert_eq!(subs, vec![7]);
        assert!(matches!(
            r.subscribe(key, 0x1000, 1, 8),
            Err(Error::NotRegistered(_))
        ));
    }

    #[test]
    fn find_containing_picks_the_right_registration() {
        let r = Registry::default();
        for a in [0x1000u64, 0x3000, 0x8000] {
            r.register(Descriptor::new(a, 0x1000, 0), Access::ReadWrite)
                .unwrap();
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
