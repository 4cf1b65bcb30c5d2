//! The bytes this backend hands out. There is no network peer: the connection info
//! only lets `connect` recognise this very backend instance (magic, instance id, agent
//! name), and a remote key names one of its own file registrations (registration id and
//! a 128-bit secret from the OS), the "remote" side of a storage transfer.

use bytes::Bytes;
use kv_core::{Error, Result};

const INFO_MAGIC: &[u8; 6] = b"KVGDS1";

/// Bytes of a remote key's secret: 128 random bits.
pub(crate) const SECRET_LEN: usize = 16;

/// The secret half of a remote key.
pub(crate) type Secret = [u8; SECRET_LEN];

/// Fills `out` with random bytes from the OS. The one place this crate draws randomness
/// (to become `kv_core::auth::fill_random` with contract v2).
pub(crate) fn fill_random(out: &mut [u8]) -> Result<()> {
    getrandom::fill(out).map_err(|e| {
        let source = match e.raw_os_error() {
            Some(errno) => std::io::Error::from_raw_os_error(errno),
            None => std::io::Error::other(e.to_string()),
        };
        Error::io("reading random bytes from the OS (getrandom)", source)
    })
}

/// A fresh remote-key secret: 128 random bits from the OS, unrelated to any id.
pub(crate) fn new_secret() -> Result<Secret> {
    let mut s = [0u8; SECRET_LEN];
    fill_random(&mut s)?;
    Ok(s)
}

/// A fresh backend instance id (random, so connection info names nothing guessable).
pub(crate) fn new_instance() -> Result<u64> {
    let mut b = [0u8; 8];
    fill_random(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

/// True when two secrets are equal, comparing every byte (no early exit).
pub(crate) fn same_secret(a: &Secret, b: &Secret) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

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

/// Remote keys are the registration id (8 bytes, little-endian) and its secret.
pub(crate) const KEY_LEN: usize = 8 + SECRET_LEN;

/// Encodes a remote key.
pub(crate) fn encode_key(id: u64, secret: &Secret) -> [u8; KEY_LEN] {
    let mut k = [0u8; KEY_LEN];
    k[..8].copy_from_slice(&id.to_le_bytes());
    k[8..].copy_from_slice(secret);
    k
}

/// Decodes a remote key; `None` when it has the wrong length.
pub(crate) fn decode_key(key: &[u8]) -> Option<(u64, Secret)> {
    let k: &[u8; KEY_LEN] = key.try_into().ok()?;
    let mut id = [0u8; 8];
    let mut secret = [0u8; SECRET_LEN];
    id.copy_from_slice(&k[..8]);
    secret.copy_from_slice(&k[8..]);
    Some((u64::from_le_bytes(id), secret))
}
