//! The blobs two TCP backends exchange out of band (through the agent's metadata):
//! [`ConnectionInfo`] (how to reach a backend) and [`RemoteKey`] (one registration,
//! with a [`SharedKey`] when a same-host peer may map it). Each is magic, version,
//! fields and a CRC32C; decoders take untrusted bytes and fail with
//! [`Error::InvalidMetadata`], never panic. Re-exported by [`crate::wire`].

use bytes::{BufMut, Bytes, BytesMut};
use kv_core::codec::Reader;
use kv_core::{Error, Result};

/// Most bytes of an agent name in HELLO, and of each connection-info string.
pub const MAX_NAME: u64 = 1024;
/// Format version of [`ConnectionInfo`] blobs (and of version-1 [`RemoteKey`] blobs).
const BLOB_VERSION: u8 = 1;
/// Format version of [`RemoteKey`] blobs: 2 adds a flags byte and, with
/// [`KEY_FLAG_SHARED`], a [`SharedKey`]. Version-1 keys still decode (not shareable).
pub const KEY_VERSION: u8 = 2;
/// Remote-key flag: the registration is backed by a memfd a same-host peer may map.
pub const KEY_FLAG_SHARED: u8 = 1;
const INFO_MAGIC: u32 = 0x4b58_5443; // "CTXK"
const KEY_MAGIC: u32 = 0x4b58_524b; // "KRXK"

/// What a peer needs to reach this backend: published by `connection_info`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionInfo {
    /// The agent name the backend was created for.
    pub agent: String,
    /// The listener's address (`ip:port`).
    pub addr: String,
    /// Host identity: boot id and host name; equal on both sides means same host.
    pub host: String,
    /// Process id, for cross-memory attach.
    pub pid: u32,
    /// Random id of this backend instance; a reconnect to a new process is refused.
    pub instance: u64,
    /// Address of 8 bytes holding `instance`, read by a same-host peer to prove that
    /// cross-memory attach works and reaches the right process.
    pub probe_addr: u64,
}

impl ConnectionInfo {
    /// Encodes the blob (magic, version, fields, CRC32C).
    pub fn encode(&self) -> Result<Bytes> {
        let mut b = BytesMut::with_capacity(64 + self.agent.len() + self.host.len());
        b.put_u32_le(INFO_MAGIC);
        b.put_u8(BLOB_VERSION);
        for s in [&self.agent, &self.addr, &self.host] {
            let n = u16::try_from(s.len())
                .ok()
                .filter(|n| u64::from(*n) <= MAX_NAME)
                .ok_or_else(|| Error::invalid_argument(format!("{s:?} is too long")))?;
            b.put_u16_le(n);
            b.put_slice(s.as_bytes());
        }
        b.put_u32_le(self.pid);
        b.put_u64_le(self.instance);
        b.put_u64_le(self.probe_addr);
        let crc = crc32c::crc32c(&b);
        b.put_u32_le(crc);
        Ok(b.freeze())
    }

    /// Decodes a blob made by [`ConnectionInfo::encode`].
    pub fn decode(buf: &[u8]) -> Result<ConnectionInfo> {
        let body = checked_body(buf, INFO_MAGIC, "connection info")?;
        let mut r = Reader::new(body);
        let mut s = || -> Result<String> {
            let n = r.u16()? as usize;
            if n as u64 > MAX_NAME {
                return Err(Error::invalid_metadata("connection info string too long"));
            }
            String::from_utf8(r.take(n)?.to_vec())
                .map_err(|_| Error::invalid_metadata("connection info string is not UTF-8"))
        };
        let (agent, addr, host) = (s()?, s()?, s()?);
        let info = ConnectionInfo {
            agent,
            addr,
            host,
            pid: r.u32()?,
            instance: r.u64()?,
            probe_addr: r.u64()?,
        };
        if !r.buf.is_empty() {
            return Err(Error::invalid_metadata("trailing bytes in connection info"));
        }
        Ok(info)
    }
}

/// Checks magic, version and trailing CRC of a blob; returns the bytes between.
fn checked_body<'a>(buf: &'a [u8], magic: u32, what: &str) -> Result<&'a [u8]> {
    let (v, body) = versioned_body(buf, magic, what)?;
    if v != BLOB_VERSION {
        return Err(Error::invalid_metadata(format!(
            "{what} version {v}, want {BLOB_VERSION}"
        )));
    }
    Ok(body)
}

/// Checks magic and trailing CRC of a blob; returns its version and the bytes after it.
fn versioned_body<'a>(buf: &'a [u8], magic: u32, what: &str) -> Result<(u8, &'a [u8])> {
    if buf.len() < 9 {
        return Err(Error::invalid_metadata(format!(
            "{what} of {} bytes is too short",
            buf.len()
        )));
    }
    let (body, crc) = buf.split_at(buf.len() - 4);
    let crc = Reader::new(crc).u32()?;
    if crc32c::crc32c(body) != crc {
        return Err(Error::invalid_metadata(format!("{what} checksum mismatch")));
    }
    let mut r = Reader::new(body);
    if r.u32()? != magic {
        return Err(Error::invalid_metadata(format!("not a tcp backend {what}")));
    }
    let v = r.u8()?;
    Ok((v, r.buf))
}

/// How a same-host peer reaches a memfd-backed registration: the exporting process,
/// the file descriptor (in that process) of the memfd, where the registration sits in
/// it, and the memfd's identity (so a reused fd number is noticed). `Copy`,
/// `Send + Sync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedKey {
    /// Process id of the exporter.
    pub pid: u32,
    /// The memfd's descriptor number in the exporter (≥ 0).
    pub fd: i32,
    /// Offset of the registration's first byte in the memfd.
    pub offset: u64,
    /// Length of the memfd (offset + registration length ≤ this).
    pub memfd_len: u64,
    /// `st_dev` of the memfd.
    pub dev: u64,
    /// `st_ino` of the memfd.
    pub ino: u64,
}

/// The remote key of one registration: the key to name it in frames, the range it
/// covers and, for memfd-backed memory, how a same-host peer maps it. `Copy`,
/// `Send + Sync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteKey {
    /// The registration's random key.
    pub key: u64,
    /// Start address of the registration in the target process.
    pub addr: u64,
    /// Its length.
    pub len: u64,
    /// Set when the registration is backed by a memfd a same-host peer may map.
    pub shared: Option<SharedKey>,
}

impl RemoteKey {
    /// Encodes the blob (magic, version 2, key, addr, len, flags, shared fields when
    /// flagged, CRC32C).
    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(80);
        b.put_u32_le(KEY_MAGIC);
        b.put_u8(KEY_VERSION);
        b.put_u64_le(self.key);
        b.put_u64_le(self.addr);
        b.put_u64_le(self.len);
        match &self.shared {
            None => b.put_u8(0),
            Some(s) => {
                b.put_u8(KEY_FLAG_SHARED);
                b.put_u32_le(s.pid);
                b.put_i32_le(s.fd);
                b.put_u64_le(s.offset);
                b.put_u64_le(s.memfd_len);
                b.put_u64_le(s.dev);
                b.put_u64_le(s.ino);
            }
        }
        let crc = crc32c::crc32c(&b);
        b.put_u32_le(crc);
        b.freeze()
    }

    /// Decodes a blob made by [`RemoteKey::encode`] (version 2) or by a version-1
    /// encoder (no flags, never shared).
    pub fn decode(buf: &[u8]) -> Result<RemoteKey> {
        let (version, body) = versioned_body(buf, KEY_MAGIC, "remote key")?;
        if version != BLOB_VERSION && version != KEY_VERSION {
            return Err(Error::invalid_metadata(format!(
                "remote key version {version}, want {BLOB_VERSION} or {KEY_VERSION}"
            )));
        }
        let mut r = Reader::new(body);
        let mut k = RemoteKey {
            key: r.u64()?,
            addr: r.u64()?,
            len: r.u64()?,
            shared: None,
        };
        if version == KEY_VERSION {
            let flags = r.u8()?;
            if flags & !KEY_FLAG_SHARED != 0 {
                return Err(Error::invalid_metadata(format!(
                    "unknown remote key flags {flags:#x}"
                )));
            }
            if flags & KEY_FLAG_SHARED != 0 {
                let s = SharedKey {
                    pid: r.u32()?,
                    fd: r.u32()? as i32,
                    offset: r.u64()?,
                    memfd_len: r.u64()?,
                    dev: r.u64()?,
                    ino: r.u64()?,
                };
                if s.pid == 0 || s.fd < 0 {
                    return Err(Error::invalid_metadata(format!(
                        "shared remote key names pid {} fd {}",
                        s.pid, s.fd
                    )));
                }
                if s.offset.checked_add(k.len).is_none_or(|e| e > s.memfd_len) {
                    return Err(Error::invalid_metadata(format!(
                        "shared remote key: {}+{} lies outside the memfd of {} bytes",
                        s.offset, k.len, s.memfd_len
                    )));
                }
                k.shared = Some(s);
            }
        }
        if !r.buf.is_empty() {
            return Err(Error::invalid_metadata("trailing bytes in remote key"));
        }
        Ok(k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn blobs_round_trip() {
        let i = ConnectionInfo {
            agent: "prefill-0".into(),
            addr: "127.0.0.1:5000".into(),
            host: "boot/host".into(),
            pid: 77,
            instance: 0x1234,
            probe_addr: 0x5555_0000,
        };
        let b = i.encode().unwrap();
        assert_eq!(ConnectionInfo::decode(&b).unwrap(), i);
        assert!(ConnectionInfo::decode(&b[..b.len() - 1]).is_err());
        let k = RemoteKey {
            key: 5,
            addr: 4096,
            len: 8192,
            shared: None,
        };
        assert_eq!(RemoteKey::decode(&k.encode()).unwrap(), k);
        let shared = SharedKey {
            pid: 42,
            fd: 7,
            offset: 4096,
            memfd_len: 16384,
            dev: 3,
            ino: 99,
        };
        let ks = RemoteKey {
            shared: Some(shared),
            ..k
        };
        assert_eq!(RemoteKey::decode(&ks.encode()).unwrap(), ks);
        // A version-1 key (no flags byte) still decodes, as not shareable.
        let mut v1 = BytesMut::new();
        v1.put_u32_le(KEY_MAGIC);
        v1.put_u8(1);
        for x in [5u64, 4096, 8192] {
            v1.put_u64_le(x);
        }
        let crc = crc32c::crc32c(&v1);
        v1.put_u32_le(crc);
        assert_eq!(RemoteKey::decode(&v1).unwrap(), k);
        // Shared ranges outside the memfd, negative fds and unknown flags are refused.
        for bad_key in [
            RemoteKey {
                shared: Some(SharedKey {
                    memfd_len: 8191 + 4096,
                    ..shared
                }),
                ..ks
            },
            RemoteKey {
                shared: Some(SharedKey {
                    offset: u64::MAX,
                    ..shared
                }),
                ..ks
            },
            RemoteKey {
                shared: Some(SharedKey { fd: -1, ..shared }),
                ..ks
            },
            RemoteKey {
                shared: Some(SharedKey { pid: 0, ..shared }),
                ..ks
            },
        ] {
            assert!(matches!(
                RemoteKey::decode(&bad_key.encode()),
                Err(Error::InvalidMetadata(_))
            ));
        }
        let mut flagged = ks.encode().to_vec();
        flagged.truncate(flagged.len() - 4);
        flagged[29] |= 0x80;
        let crc = crc32c::crc32c(&flagged);
        flagged.extend_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            RemoteKey::decode(&flagged),
            Err(Error::InvalidMetadata(_))
        ));
        assert!(RemoteKey::decode(&b).is_err());
        assert!(ConnectionInfo::decode(&k.encode()).is_err());
    }

    proptest! {
        #[test]
        fn remote_keys_with_random_fields(key: u64, addr: u64, len: u64, shared: bool, pid: u32, fd: i32, offset: u64, memfd_len: u64, ino: u64, cut in 0usize..80, flip in 0usize..80) {
            let k = RemoteKey { key, addr, len, shared: shared.then_some(SharedKey { pid, fd, offset, memfd_len, dev: 1, ino }) };
            let b = k.encode();
            match RemoteKey::decode(&b) {
                Ok(d) => {
                    prop_assert_eq!(d, k);
                    if let Some(s) = d.shared {
                        prop_assert!(s.fd >= 0 && s.pid != 0);
                        prop_assert!(s.offset.checked_add(d.len).is_some_and(|e| e <= s.memfd_len));
                    }
                }
                Err(e) => prop_assert!(matches!(e, Error::InvalidMetadata(_)), "{e:?}"),
            }
            // Truncated or corrupted blobs fail with InvalidMetadata, never a panic.
            let r = RemoteKey::decode(&b[..cut.min(b.len())]);
            prop_assert!(cut >= b.len() || matches!(r, Err(Error::InvalidMetadata(_))));
            let mut c = b.to_vec();
            let i = flip % c.len();
            c[i] ^= 0x10;
            prop_assert!(matches!(RemoteKey::decode(&c), Err(Error::InvalidMetadata(_))));
        }
    }
}
