//! Registrations: host memory (fixed buffers), files and block devices (registered
//! files), and imported "remote" file registrations of the backend itself; how
//! `prepare` finds the registration holding a range.

use std::collections::HashMap;

use kv_core::{Access, Descriptor, Error, MemKind, Result};

use crate::file::FileInfo;
use crate::wire::Secret;

/// One local registration.
pub(crate) struct Reg {
    pub kind: MemKind,
    pub desc: Descriptor,
    /// The secret half of the remote key (random, see [`crate::wire::new_secret`]).
    pub key: Secret,
    /// Posted transfers that name it.
    pub busy: u32,
    /// `ReadOnly`: the backend never writes into it (no READ lands in read-only memory,
    /// no WRITE in a read-only file range).
    pub access: Access,
    pub mem: RegMem,
}

/// What a registration holds, by kind.
pub(crate) enum RegMem {
    /// DRAM: its slot in the ring's registered-buffer table, if it got one.
    Host { buf_index: Option<u16> },
    /// A file or block device: our dup of the fd and its registered-file slot.
    File { info: FileInfo, fixed: Option<u32> },
    /// VRAM registered with cuFile.
    #[cfg(feature = "cuda")]
    Vram,
}

impl Reg {
    /// Checks that `desc` of `kind` may be imported under this registration's key.
    pub fn check_import(&self, kind: MemKind, desc: &Descriptor) -> Result<()> {
        if self.kind != kind {
            return Err(Error::invalid_argument(format!(
                "the key names a {} registration, not {kind}",
                self.kind
            )));
        }
        if !self.desc.contains(desc) {
            return Err(Error::OutOfBounds(format!(
                "{kind} range {}+{} of fd {} is outside the registration {}+{}",
                desc.addr, desc.len, desc.device, self.desc.addr, self.desc.len
            )));
        }
        Ok(())
    }

    /// The file behind a file registration.
    pub fn file(&self) -> Option<(&FileInfo, Option<u32>)> {
        match &self.mem {
            RegMem::File { info, fixed } => Some((info, *fixed)),
            _ => None,
        }
    }
}

/// A file registration of this backend imported through a self-endpoint.
pub(crate) struct RemoteImport {
    pub peer: u64,
    pub kind: MemKind,
    pub desc: Descriptor,
    /// The local registration it names.
    pub reg: u64,
}

/// A local registration as `prepare` needs it: id, fixed-buffer index, start address.
pub(crate) type LocalReg = (u64, Option<u16>, u64);

/// The local registrations of `kind`, as candidates for [`find`].
pub(crate) fn local_candidates(
    regs: &HashMap<u64, Reg>,
    kind: MemKind,
) -> Vec<(Descriptor, LocalReg)> {
    regs.iter()
        .filter(|(_, r)| r.kind == kind)
        .map(|(id, r)| {
            let bi = match r.mem {
                RegMem::Host { buf_index } => buf_index,
                _ => None,
            };
            (r.desc, (*id, bi, r.desc.addr))
        })
        .collect()
}

/// The imports of `kind` through endpoint `peer` whose registration still exists, as
/// candidates for [`find`] (the value is the registration id).
pub(crate) fn remote_candidates(
    remotes: &HashMap<u64, RemoteImport>,
    regs: &HashMap<u64, Reg>,
    peer: u64,
    kind: MemKind,
) -> Vec<(Descriptor, u64)> {
    remotes
        .values()
        .filter(|r| r.peer == peer && r.kind == kind)
        .filter(|r| regs.contains_key(&r.reg))
        .map(|r| (r.desc, r.reg))
        .collect()
}

/// Finds the registration holding `d` among `cands`, trying the last hit first.
pub(crate) fn find<T: Copy>(
    cands: &[(Descriptor, T)],
    d: &Descriptor,
    last: &mut usize,
) -> Option<T> {
    if let Some((c, v)) = cands.get(*last) {
        if c.contains(d) {
            return Some(*v);
        }
    }
    let i = cands.iter().position(|(c, _)| c.contains(d))?;
    *last = i;
    Some(cands[i].1)
}
