//! The target's side of *mapped* operations: peers' `alloc_host` memory mapped into
//! this process from their packed UCX remote keys, cached, so that a WRITE or READ
//! between two processes of one host is one `memcpy` done by the target (which checked
//! the operation against its own registrations first) instead of a copy through UCX's
//! shared-memory FIFO or a cross-memory-attach rendezvous.
//!
//! A peer's key is unpacked only when the peer reaches this worker over shared memory
//! (every lane of the endpoint UCX answers it on is a same-host transport), so a peer
//! across the network can never make this process map memory of the host; the mapped
//! range is checked against the process's own memory map before it is used. Unpacked
//! keys are cached per (peer instance, allocation id) — at most [`MAX_MAPPINGS`], least
//! recently used destroyed first — and destroyed before the worker is.
//!
//! Every function here runs inside UCX's callbacks or the core's teardown, under the
//! core's state lock (the worker is `UCS_THREAD_MODE_SERIALIZED`).

use std::collections::HashMap;
use std::ffi::c_void;

use crate::ffi::{self, Lib};
use crate::wire::{AckCode, MapSrc};

/// Most peer allocations kept mapped at once.
pub const MAX_MAPPINGS: usize = 64;

/// One peer allocation mapped here.
struct Mapping {
    /// The unpacked key (`ucp_rkey_h`); destroying it unmaps the memory.
    rkey: usize,
    /// What the peer sent (a different key under the same id replaces the mapping).
    src: MapSrc,
    /// Where `src.base` is mapped in this process.
    local: usize,
    /// Use tick (eviction order).
    used: u64,
}

/// Peers' allocations mapped into this process, by (peer instance, allocation id).
#[derive(Default)]
pub struct Mappings {
    map: HashMap<(u64, u64), Mapping>,
    tick: u64,
}

// SAFETY: the raw key handles are used only under the core's state lock (inside UCX's
// callbacks or the core's teardown) on the one worker that unpacked them.
unsafe impl Send for Mappings {}

impl Mappings {
    /// Where `src.base` of peer `instance` lies in this process, mapping it on first use
    /// through `reply_ep` (the endpoint the peer's operation arrived on).
    ///
    /// `Err(Unmapped)` when the peer does not reach us over shared memory only or UCX
    /// cannot map the key; `Err(OutOfBounds)` when the range the peer claims is not
    /// mapped here as one writable region.
    pub fn resolve(
        &mut self,
        lib: &Lib,
        reply_ep: ffi::ucp_ep_h,
        instance: u64,
        src: &MapSrc,
    ) -> Result<usize, AckCode> {
        self.tick += 1;
        let key = (instance, src.id);
        if let Some(m) = self.map.get_mut(&key) {
            if m.src == *src {
                m.used = self.tick;
                return Ok(m.local);
            }
        }
        if reply_ep.is_null() || !endpoint_on_host(lib, reply_ep) {
            return Err(AckCode::Unmapped);
        }
        let end = src.base.checked_add(src.len).ok_or(AckCode::OutOfBounds)?;
        if src.len == 0 || end > usize::MAX as u64 {
            return Err(AckCode::OutOfBounds);
        }
        let mut rkey: ffi::ucp_rkey_h = std::ptr::null_mut();
        // SAFETY: a live endpoint of this worker (UCX's reply endpoint of the running
        // callback), the peer's bytes (UCX reads at most what its own header says; the
        // peer proved it reaches us over shared memory, i.e. runs on this host as a
        // user who can open our segments) and a valid out-pointer.
        let s = unsafe { (lib.ep_rkey_unpack)(reply_ep, src.rkey.as_ptr().cast(), &mut rkey) };
        if s != ffi::UCS_OK || rkey.is_null() {
            tracing::warn!("ucx: could not unpack a peer's key: {}", lib.status_text(s));
            return Err(AckCode::Unmapped);
        }
        let mut p: *mut c_void = std::ptr::null_mut();
        // SAFETY: the key unpacked above; a valid out-pointer.
        let s = unsafe { (lib.rkey_ptr)(rkey, src.base, &mut p) };
        let local = p as usize;
        let checked = if s != ffi::UCS_OK || p.is_null() {
            Err(AckCode::Unmapped)
        } else if !mapped_writable(local, src.len as usize) {
            Err(AckCode::OutOfBounds)
        } else {
            Ok(local)
        };
        if let Err(code) = checked {
            // SAFETY: the key unpacked above, destroyed once; nothing else holds it.
            unsafe { (lib.rkey_destroy)(rkey) };
            return Err(code);
        }
        let old = self.map.insert(
            key,
            Mapping {
                rkey: rkey as usize,
                src: src.clone(),
                local,
                used: self.tick,
            },
        );
        if let Some(old) = old {
            destroy(lib, old);
        }
        while self.map.len() > MAX_MAPPINGS {
            let Some(oldest) = self.map.iter().min_by_key(|(_, m)| m.used).map(|(k, _)| *k) else {
                break;
            };
            if let Some(m) = self.map.remove(&oldest) {
                destroy(lib, m);
            }
        }
        Ok(local)
    }

    /// How many peer allocations are mapped.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Unmaps everything (before the worker is destroyed).
    pub fn clear(&mut self, lib: &Lib) {
        for (_, m) in self.map.drain() {
            destroy(lib, m);
        }
    }
}

fn destroy(lib: &Lib, m: Mapping) {
    // SAFETY: a key `resolve` unpacked and kept only in the map it was just taken
    // from; no copy through it is running (they run inside the callback that resolved
    // it, under the same lock).
    unsafe { (lib.rkey_destroy)(m.rkey as ffi::ucp_rkey_h) };
}

/// Whether `ucp_ep_print_info`'s report shows lanes and every one of them is a
/// same-host transport (shared memory, cross-memory attach, loopback to itself).
pub fn lanes_on_host(report: &str) -> bool {
    const LOCAL: [&str; 6] = ["posix/", "sysv/", "cma/", "knem/", "xpmem/", "self/"];
    every_lane(report, |l| LOCAL.iter().any(|t| l.contains(t)))
}

/// Whether `ucp_ep_print_info`'s report shows lanes and `f` holds for every one.
pub fn every_lane(report: &str, f: impl Fn(&str) -> bool) -> bool {
    let mut lanes = report.lines().filter(|l| l.contains("lane["));
    let mut any = false;
    lanes.all(|l| {
        any = true;
        f(l)
    }) && any
}

/// Whether UCX reaches the peer of `ep` over same-host transports only.
fn endpoint_on_host(lib: &Lib, ep: ffi::ucp_ep_h) -> bool {
    // SAFETY: a live endpoint of this worker and an open FILE stream, under the lock.
    ffi::capture_file(|f| unsafe { (lib.ep_print_info)(ep, f) })
        .as_deref()
        .is_some_and(lanes_on_host)
}

/// Whether `[addr, addr + len)` lies inside one readable and writable mapping of this
/// process (`/proc/self/maps`).
fn mapped_writable(addr: usize, len: usize) -> bool {
    let Some(end) = addr.checked_add(len) else {
        return false;
    };
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
        return false;
    };
    maps.lines().any(|line| {
        let mut f = line.split_whitespace();
        let (Some(range), Some(perms)) = (f.next(), f.next()) else {
            return false;
        };
        let Some((lo, hi)) = range.split_once('-') else {
            return false;
        };
        let (Ok(lo), Ok(hi)) = (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
        else {
            return false;
        };
        perms.starts_with("rw") && lo <= addr && end <= hi
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lane_report_on_host() {
        let tcp = "#  lane[0]:  0:tcp/lo.0 md[0] -> md[0]/tcp/sysdev[255] am am_bw#0\n";
        let shm = "#  lane[0]:  1:posix/memory.0 md[1] am\n#  lane[1]:  2:cma/memory.0 rma_bw#0\n";
        let mixed = format!("{shm}#  lane[2]:  0:tcp/lo.0 md[0] am_bw#1\n");
        assert!(lanes_on_host(shm));
        assert!(!lanes_on_host(tcp));
        assert!(!lanes_on_host(&mixed));
        assert!(!lanes_on_host("no lanes at all"));
    }

    #[test]
    fn maps_check_finds_our_memory_and_refuses_beyond() {
        let v = vec![7u8; 1 << 20];
        let p = v.as_ptr() as usize;
        assert!(mapped_writable(p, v.len()));
        assert!(!mapped_writable(p, usize::MAX));
        assert!(!mapped_writable(0, 4096));
        // Code is mapped but not writable.
        let f = mapped_writable as *const () as usize;
        assert!(!mapped_writable(f, 1));
    }
}
