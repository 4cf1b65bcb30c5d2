//! The shared-memory path for same-host peers.
//!
//! Exporter: a registration inside a memfd-backed `kv_mem::HostBuffer` (found with
//! [`kv_mem::shared_backing`]) keeps a `dup` of the memfd and announces it in its remote
//! key ([`SharedKey`]: pid, fd number, offset, memfd length and identity).
//!
//! Importer: [`Import::open`] fetches the memfd from the exporter — the process the
//! kernel named for its Unix socket (pidfd from `SO_PEERPIDFD`), never a claimed pid —
//! with `pidfd_getfd` (else `/proc/<pid>/fd/<fd>`), checks it is the same file (device
//! and inode), sealed and large enough, and maps the registration (page-aligned around
//! it) `MAP_SHARED`: read-write, or `PROT_READ` for a read-only registration. The
//! description it maps comes from the exporter's live answer to IMPORT, not from the
//! remote-key blob, so a stale key never maps (nor falls back to cross-memory attach).
//! Transfers to it are then plain memory copies.
//!
//! Lifetime and trust: the mapping holds its own reference to the memfd's pages, so a
//! copy can never touch unmapped memory, even if the exporter deregisters, frees its
//! buffer or dies mid-transfer. Revocation (REVOKE, acknowledged once no copy runs)
//! keeps a cooperating importer out after `deregister`; a malicious importer with
//! ptrace rights over the exporter (which `pidfd_getfd` requires) could keep or remap
//! the memfd writable anyway — see the crate README, "Trust". The exporter's own
//! bounds checks do not run; the initiator checks every range against the exported
//! registration. The exporter cannot shrink the memfd: only sealed memfds
//! (`F_SEAL_SHRINK`) are mapped, so a copy never faults with `SIGBUS`.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use kv_core::Descriptor;

use crate::keys::{RemoteKey, SharedKey};
use crate::os::{self, Mapping};

/// The exporter's side: the memfd behind a registration, kept open while it lives.
#[derive(Debug)]
pub(crate) struct Export {
    fd: OwnedFd,
    offset: u64,
    memfd_len: u64,
    dev: u64,
    ino: u64,
}

impl Export {
    /// The memfd behind `desc` when it lies in a shared `HostBuffer`; `None` otherwise
    /// (or when the memfd cannot be duplicated, logged).
    pub(crate) fn of(desc: &Descriptor) -> Option<Export> {
        let b = kv_mem::shared_backing(desc)?;
        let fd = match os::dup_cloexec(b.fd) {
            Ok(fd) => fd,
            Err(e) => {
                tracing::info!(
                    "registration {:#x}+{} is memfd-backed but dup failed ({e}); peers use cross-memory attach or TCP",
                    desc.addr,
                    desc.len
                );
                return None;
            }
        };
        match os::shm_identity(fd.as_fd()) {
            Ok((dev, ino, size, true)) if size >= b.offset.saturating_add(desc.len) => {
                Some(Export {
                    fd,
                    offset: b.offset,
                    memfd_len: size,
                    dev,
                    ino,
                })
            }
            r => {
                tracing::info!(
                    "registration {:#x}+{}: its memfd does not check out ({r:?}); not sharing it",
                    desc.addr,
                    desc.len
                );
                None
            }
        }
    }

    /// What goes into the remote key.
    pub(crate) fn key(&self) -> SharedKey {
        SharedKey {
            pid: std::process::id(),
            fd: self.fd.as_raw_fd(),
            offset: self.offset,
            memfd_len: self.memfd_len,
            dev: self.dev,
            ino: self.ino,
        }
    }
}

/// The importer's side: an exported registration mapped into this process. Dropping
/// it unmaps. `Send + Sync`.
#[derive(Debug)]
pub(crate) struct Import {
    map: Mapping,
    /// The registration's range in the exporter's address space.
    reg: Descriptor,
    /// Where the registration's first byte is in our mapping.
    reg_ptr: u64,
    /// Mapped `PROT_READ` (a read-only registration).
    read_only: bool,
}

impl Import {
    /// Maps the registration `k` (the exporter's live description of it) from the
    /// process `pidfd` names, pid `pid` (both from the kernel). The error says why the
    /// shared path is not used, and whether the key is stale (`true`: refuse the
    /// import) or the path merely unavailable (`false`: cross-memory attach is fine).
    pub(crate) fn open(
        pidfd: Option<BorrowedFd<'_>>,
        pid: u32,
        k: &RemoteKey,
    ) -> std::result::Result<Import, (bool, String)> {
        let s = k
            .shared
            .as_ref()
            .ok_or_else(|| (false, "the registration is not memfd-backed".to_string()))?;
        if s.pid != pid {
            return Err((
                true,
                format!("the key names pid {} but the peer is pid {pid}", s.pid),
            ));
        }
        let fd = os::peer_fd(pidfd, pid, s.fd)
            .map_err(|e| (false, format!("fetching the peer's memfd: {e}")))?;
        let (dev, ino, size, sealed) = os::shm_identity(fd.as_fd())
            .map_err(|e| (false, format!("fstat of the memfd: {e}")))?;
        if (dev, ino) != (s.dev, s.ino) {
            return Err((
                true,
                format!(
                    "fd {} of pid {pid} is not the exported memfd (deregistered?)",
                    s.fd
                ),
            ));
        }
        if !sealed {
            // Unsealed, the peer could shrink it and make our copies fault (SIGBUS).
            return Err((
                false,
                "the memfd is not sealed against shrinking (F_SEAL_SHRINK)".into(),
            ));
        }
        let end = s
            .offset
            .checked_add(k.len)
            .ok_or_else(|| (true, "range overflows".to_string()))?;
        if size < end {
            return Err((
                true,
                format!("the memfd has {size} bytes, the registration needs {end}"),
            ));
        }
        let page = os::page_size();
        let start = s.offset / page * page;
        let len = usize::try_from(end.div_ceil(page) * page - start)
            .map_err(|_| (false, "registration too large to map".to_string()))?;
        let map = Mapping::map_shared(fd.as_fd(), start, len, !k.read_only)
            .map_err(|e| (false, format!("mmap of {len} bytes of the memfd: {e}")))?;
        let reg_ptr = map.addr() + (s.offset - start);
        Ok(Import {
            map,
            reg: Descriptor::new(k.addr, k.len, 0),
            reg_ptr,
            read_only: k.read_only,
        })
    }

    /// The exporter's registration this maps.
    pub(crate) fn reg(&self) -> &Descriptor {
        &self.reg
    }

    /// True when mapped read-only (only READs may use it).
    pub(crate) fn read_only(&self) -> bool {
        self.read_only
    }

    /// Our address of the exporter's `addr..addr+len`, when it lies in the registration.
    pub(crate) fn translate(&self, addr: u64, len: u64) -> Option<u64> {
        let d = Descriptor::new(addr, len, self.reg.device);
        if !self.reg.contains(&d) {
            return None;
        }
        let p = self.reg_ptr + (addr - self.reg.addr);
        debug_assert!(p + len <= self.map.addr() + self.map.len());
        Some(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kv_mem::HostBuffer;

    #[test]
    fn export_and_import_in_one_process() {
        let mut buf = HostBuffer::shared(5 * 4096 + 100).unwrap();
        let d = Descriptor::new(buf.descriptor().addr + 4096 + 10, 3 * 4096, 0);
        let e = Export::of(&d).expect("memfd-backed");
        let key = RemoteKey {
            key: 1,
            addr: d.addr,
            len: d.len,
            read_only: false,
            shared: Some(e.key()),
        };
        assert_eq!(e.key().offset, 4096 + 10);
        let me = std::process::id();
        let i = Import::open(None, me, &key).unwrap();
        let p = i.translate(d.addr + 5, 4).unwrap();
        let v = [1u8, 2, 3, 4];
        // SAFETY: `p` is inside the mapping of the registration; `v` is readable.
        unsafe { os::copy(p, v.as_ptr() as u64, 4) };
        assert_eq!(&buf.as_mut_slice()[4096 + 15..4096 + 19], &v);
        assert!(i.translate(d.addr - 1, 4).is_none());
        assert!(i.translate(d.addr + d.len - 3, 4).is_none());
        // A read-only registration maps read-only (reads work; a write would fault).
        let ro = Import::open(
            None,
            me,
            &RemoteKey {
                read_only: true,
                ..key
            },
        )
        .unwrap();
        let mut got = [0u8; 4];
        // SAFETY: `got` is writable; the source lies in the read-only mapping.
        unsafe {
            os::copy(
                got.as_mut_ptr() as u64,
                ro.translate(d.addr + 5, 4).unwrap(),
                4,
            )
        };
        assert_eq!(got, v);
        // The wrong pid is a stale key; a heap buffer or an unflagged key merely unshared.
        assert!(matches!(Import::open(None, me + 1, &key), Err((true, _))));
        assert!(matches!(
            Import::open(
                None,
                me,
                &RemoteKey {
                    shared: None,
                    ..key
                }
            ),
            Err((false, _))
        ));
        let heap = HostBuffer::alloc(4096, 4096).unwrap();
        assert!(Export::of(&heap.descriptor()).is_none());
        // Once the export's fd is closed, its number does not map another file.
        let k2 = e.key();
        drop(e);
        let other = std::fs::File::open("/proc/self/status").unwrap();
        let _ = other.as_raw_fd();
        assert!(Import::open(
            None,
            me,
            &RemoteKey {
                shared: Some(k2),
                ..key
            }
        )
        .is_err());
        // The first mapping still works after the export is gone.
        // SAFETY: as above.
        unsafe { os::copy(p, v.as_ptr() as u64 + 1, 2) };
        drop(i);
    }
}
