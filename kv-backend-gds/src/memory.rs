//! Registrations: host memory (fixed buffers), files and block devices (registered
//! files), and imported "remote" file registrations of the backend itself.

use kv_core::{Descriptor, MemKind};

use crate::file::FileInfo;

/// One local registration.
pub(crate) struct Reg {
    pub kind: MemKind,
    pub desc: Descriptor,
    /// The secret half of the remote key.
    pub key: u64,
    /// Posted transfers that name it.
    pub busy: u32,
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

/// Remote keys are the registration id and a per-registration secret, little-endian.
pub(crate) const KEY_LEN: usize = 16;

/// Encodes a remote key.
pub(crate) fn encode_key(id: u64, secret: u64) -> [u8; KEY_LEN] {
    let mut k = [0u8; KEY_LEN];
    k[..8].copy_from_slice(&id.to_le_bytes());
    k[8..].copy_from_slice(&secret.to_le_bytes());
    k
}

/// Decodes a remote key; `None` when it has the wrong length.
pub(crate) fn decode_key(key: &[u8]) -> Option<(u64, u64)> {
    let k: &[u8; KEY_LEN] = key.try_into().ok()?;
    let mut a = [0u8; 8];
    let mut b = [0u8; 8];
    a.copy_from_slice(&k[..8]);
    b.copy_from_slice(&k[8..]);
    Some((u64::from_le_bytes(a), u64::from_le_bytes(b)))
}
