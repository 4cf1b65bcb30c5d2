//! The bytes this backend hands out. There is no network peer: the connection info
//! only lets `connect` recognise this very backend instance (magic, instance id, agent
//! name), and a remote key names one of its own file registrations (registration id and
//! secret), the "remote" side of a storage transfer.

use bytes::Bytes;
use kv_core::{Error, Result};

const INFO_MAGIC: &[u8; 6] = b"KVGDS1";

/// Encodes the connection info of backend instance `instance` of agent `agent`.
pub(crate) fn encode_info(instance: u64, agent: &str) -> Bytes {
    let mut v = Vec::with_capacity(14 + agent.len());
    v.extend_from_slice(INFO_MAGIC);
    v.extend_from_slice(&instance.to_le_bytes());
    v.extend_from_slice(agent.as_bytes());
    Bytes::from(v)
}

/// The backend instance named by connection info; [`Error::InvalidMetadata`] when it is
/// not gds connection info.
pub(crate) fn decode_info(info: &[u8]) -> Result<u64> {
    if info.len() < 14 || &info[..6] != INFO_MAGIC {
        return Err(Error::invalid_metadata(
            "gds connection info must start with KVGDS1 and an 8-byte instance id",
        ));
    }
    let mut inst = [0u8; 8];
    inst.copy_from_slice(&info[6..14]);
    Ok(u64::from_le_bytes(inst))
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
