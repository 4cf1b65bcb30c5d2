//! A registration cache: many small regions inside one allocation share one backend
//! registration.

use std::collections::BTreeMap;

use kv_core::{Descriptor, Error, Result};

/// A handle to one cached use of a registration; give it back with
/// [`RegistrationCache::release`]. `Copy`, `Send + Sync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CacheKey {
    device: u32,
    start: u64,
}

struct Entry<H> {
    end: u64,
    handle: H,
    refs: usize,
}

/// An interval map from registered ranges to backend handles, reference-counted.
///
/// [`RegistrationCache::acquire`] returns the handle of a cached registration that
/// covers the requested range, or registers the `covering` range (typically the whole
/// allocation the small range lives in) once. Lookups are O(log n). Not internally
/// synchronised: wrap it in a lock to share it (`Send + Sync` when `H` is).
pub struct RegistrationCache<H> {
    map: BTreeMap<(u32, u64), Entry<H>>,
    registrations: u64,
}

impl<H> Default for RegistrationCache<H> {
    fn default() -> Self {
        RegistrationCache {
            map: BTreeMap::new(),
            registrations: 0,
        }
    }
}

impl<H: Copy> RegistrationCache<H> {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// The cached registration covering `desc`, if any.
    pub fn lookup(&self, desc: &Descriptor) -> Option<(CacheKey, H)> {
        let end = desc.end()?;
        let ((dev, start), e) = self.map.range(..=(desc.device, desc.addr)).next_back()?;
        (*dev == desc.device && end <= e.end).then_some((
            CacheKey {
                device: *dev,
                start: *start,
            },
            e.handle,
        ))
    }

    /// The handle for `desc`: a cached registration that covers it, or a new one made
    /// by `register(covering)`. `covering` must contain `desc`.
    pub fn acquire(
        &mut self,
        desc: &Descriptor,
        covering: &Descriptor,
        register: impl FnOnce(&Descriptor) -> Result<H>,
    ) -> Result<(CacheKey, H)> {
        if let Some((key, h)) = self.lookup(desc) {
            if let Some(e) = self.map.get_mut(&(key.device, key.start)) {
                e.refs += 1;
            }
            return Ok((key, h));
        }
        if !covering.contains(desc) {
            return Err(Error::OutOfBounds(format!(
                "{:#x}+{} is not inside the covering range {:#x}+{}",
                desc.addr, desc.len, covering.addr, covering.len
            )));
        }
        let end = covering
            .end()
            .ok_or_else(|| Error::invalid_argument("covering range overflows"))?;
        // A new registration must not overlap a cached one with a different extent:
        // the caller asked for a different allocation over the same bytes.
        if self
            .map
            .range((covering.device, 0)..(covering.device, end))
            .any(|((_, s), e)| *s < end && e.end > covering.addr)
        {
            return Err(Error::Busy(format!(
                "{:#x}+{} overlaps a cached registration of another extent",
                covering.addr, covering.len
            )));
        }
        let handle = register(covering)?;
        self.registrations += 1;
        self.map.insert(
            (covering.device, covering.addr),
            Entry {
                end,
                handle,
                refs: 1,
            },
        );
        Ok((
            CacheKey {
                device: covering.device,
                start: covering.addr,
            },
            handle,
        ))
    }

    /// Gives back one use; returns the handle when it was the last, so the caller
    /// deregisters it.
    pub fn release(&mut self, key: CacheKey) -> Result<Option<H>> {
        let e = self
            .map
            .get_mut(&(key.device, key.start))
            .ok_or_else(|| Error::NotRegistered(format!("cache entry {key:?}")))?;
        e.refs -= 1;
        if e.refs == 0 {
            Ok(self.map.remove(&(key.device, key.start)).map(|e| e.handle))
        } else {
            Ok(None)
        }
    }

    /// Backend registrations made so far (hits do not count).
    pub fn registrations(&self) -> u64 {
        self.registrations
    }

    /// Registrations currently cached.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg_attr(
        miri,
        ignore = "100 000 acquisitions take 10 minutes under Miri; the cache is safe code and \
                  misses_and_overlaps runs its paths there"
    )]
    fn many_small_regions_one_registration() {
        let mut c = RegistrationCache::new();
        let big = Descriptor::new(1 << 30, 100_000 * 64, 0);
        let mut keys = Vec::new();
        for i in 0..100_000u64 {
            let d = Descriptor::new(big.addr + i * 64, 64, 0);
            let (k, h) = c.acquire(&d, &big, |_| Ok(7u32)).unwrap();
            assert_eq!(h, 7);
            keys.push(k);
        }
        assert_eq!(c.registrations(), 1);
        for (i, k) in keys.iter().enumerate() {
            let last = c.release(*k).unwrap();
            assert_eq!(last.is_some(), i == keys.len() - 1);
        }
        assert!(c.is_empty());
    }

    #[test]
    fn misses_and_overlaps() {
        let mut c = RegistrationCache::new();
        let a = Descriptor::new(1000, 100, 0);
        c.acquire(&a, &a, |_| Ok(1)).unwrap();
        assert!(c.lookup(&Descriptor::new(1050, 50, 0)).is_some());
        assert!(c.lookup(&Descriptor::new(1050, 51, 0)).is_none());
        assert!(c.lookup(&Descriptor::new(1050, 10, 1)).is_none());
        let over = Descriptor::new(1090, 100, 0);
        assert!(c.acquire(&over, &over, |_| Ok(2)).is_err());
        let other_dev = Descriptor::new(1000, 100, 1);
        assert_eq!(c.acquire(&other_dev, &other_dev, |_| Ok(3)).unwrap().1, 3);
        let fail = Descriptor::new(5000, 10, 0);
        assert!(c.acquire(&fail, &fail, |_| Err(Error::Canceled)).is_err());
        assert_eq!(c.len(), 2);
    }
}
