//! The blobs two TCP backends exchange out of band (through the agent's metadata):
//! [`ConnectionInfo`] (how to reach a backend) and [`RemoteKey`] (one registration,
//! with a [`SharedKey`] when a same-host peer may map it). Each is magic, version,
//! fields and a CRC32C; decoders take untrusted bytes and fail with
//! [`Error::InvalidMetadata`], never panic. Re-exported by [`crate::wire`].
//!
//! Nothing in them is secret or trusted: keys are 128 random bits (unguessable, but a
//! peer that holds one still has to pass the cluster-secret handshake to use it), a
//! claimed pid is never used (same-host peers are identified by the kernel,
//! `SO_PEERCRED`), and a same-host importer maps a registration only as its owner
//! describes it when asked live (the `IMPORT_ACK` carries a fresh [`RemoteKey`]).

use bytes::{BufMut, Bytes, BytesMut};
use kv_core::codec::Reader;
use kv_core::{Error, Result};

/// Most bytes of an agent name in HELLO, and of each connection-info string.
pub const MAX_NAME: u64 = 1024;
/// Format version of [`ConnectionInfo`] blobs: 2 adds the same-host socket name.
const INFO_VERSION: u8 = 2;
/// Format version of [`RemoteKey`] blobs: 3 has 128-bit keys; older keys (64-bit,
/// guessable) are refused.
pub const KEY_VERSION: u8 = 3;
/// Remote-key flag: the registration is backed by a memfd a same-host peer may map.
pub const KEY_FLAG_SHARED: u8 = 1;
/// Remote-key flag: the registration is read-only (peers may only READ it).
pub const KEY_FLAG_READ_ONLY: u8 = 2;
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
    /// Name of the backend's abstract Unix socket (same-host control connections, whose
    /// peer the kernel identifies); empty when it has none.
    pub local: String,
    /// Process id as the backend sees it; a same-host peer uses the pid the kernel
    /// reports for the Unix socket (`SO_PEERCRED`) and requires the two to agree.
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
        let mut b =
            BytesMut::with_capacity(64 + self.agent.len() + self.host.len() + self.local.len());
        b.put_u32_le(INFO_MAGIC);
        b.put_u8(INFO_VERSION);
        for s in [&self.agent, &self.addr, &self.host, &self.local] {
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
        let (v, body) = versioned_body(buf, INFO_MAGIC, "connection info")?;
        if v != INFO_VERSION {
            return Err(Error::invalid_metadata(format!(
                "connection info version {v}, want {INFO_VERSION} (upgrade both peers)"
            )));
        }
        let mut r = Reader::new(body);
        let mut s = || -> Result<String> {
            let n = r.u16()? as usize;
            if n as u64 > MAX_NAME {
                return Err(Error::invalid_metadata("connection info string too long"));
            }
            String::from_utf8(r.take(n)?.to_vec())
                .map_err(|_| Error::invalid_metadata("connection info string is not UTF-8"))
        };
        let (agent, addr, host, local) = (s()?, s()?, s()?, s()?);
        let info = ConnectionInfo {
            agent,
            addr,
            host,
            local,
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
/// covers, whether peers may write it and, for memfd-backed memory, how a same-host
/// peer maps it. `Copy`, `Send + Sync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteKey {
    /// The registration's key: 128 random bits from the OS.
    pub key: u128,
    /// Start address of the registration in the target process.
    pub addr: u64,
    /// Its length.
    pub len: u64,
    /// Peers may only READ it (a hint for early refusal; the target enforces it).
    pub read_only: bool,
    /// Set when the registration is backed by a memfd a same-host peer may map.
    pub shared: Option<SharedKey>,
}

impl RemoteKey {
    /// Encodes the blob (magic, version 3, key, addr, len, flags, shared fields when
    /// flagged, CRC32C).
    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(96);
        b.put_u32_le(KEY_MAGIC);
        b.put_u8(KEY_VERSION);
        b.put_u128_le(self.key);
        b.put_u64_le(self.addr);
        b.put_u64_le(self.len);
        let ro = if self.read_only {
            KEY_FLAG_READ_ONLY
        } else {
            0
        };
        match &self.shared {
            None => b.put_u8(ro),
            Some(s) => {
                b.put_u8(KEY_FLAG_SHARED | ro);
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

    /// Decodes a blob made by [`RemoteKey::encode`]; keys of older versions (64-bit)
    /// are refused.
    pub fn decode(buf: &[u8]) -> Result<RemoteKey> {
        let (version, body) = versioned_body(buf, KEY_MAGIC, "remote key")?;
        if version != KEY_VERSION {
            return Err(Error::invalid_metadata(format!(
                "remote key version {version}, want {KEY_VERSION} (upgrade both peers)"
            )));
        }
        let mut r = Reader::new(body);
        let key = r.take(16)?;
        let mut k = RemoteKey {
            key: u128::from_le_bytes(
                key.try_into()
                    .map_err(|_| Error::invalid_metadata("remote key: truncated key"))?,
            ),
            addr: r.u64()?,
            len: r.u64()?,
            read_only: false,
            shared: None,
        };
        {
            let flags = r.u8()?;
            if flags & !(KEY_FLAG_SHARED | KEY_FLAG_READ_ONLY) != 0 {
                return Err(Error::invalid_metadata(format!(
                    "unknown remote key flags {flags:#x}"
                )));
            }
            k.read_only = flags & KEY_FLAG_READ_ONLY != 0;
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
            local: "kvx-tcp-1234".into(),
            pid: 77,
            instance: 0x1234,
            probe_addr: 0x5555_0000,
        };
        let b = i.encode().unwrap();
        assert_eq!(ConnectionInfo::decode(&b).unwrap(), i);
        assert!(ConnectionInfo::decode(&b[..b.len() - 1]).is_err());
        let k = RemoteKey {
            key: u128::MAX - 5,
            addr: 4096,
            len: 8192,
            read_only: false,
            shared: None,
        };
        assert_eq!(RemoteKey::decode(&k.encode()).unwrap(), k);
        let ro = RemoteKey {
            read_only: true,
            ..k
        };
        assert_eq!(RemoteKey::decode(&ro.encode()).unwrap(), ro);
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
            ..ro
        };
        assert_eq!(RemoteKey::decode(&ks.encode()).unwrap(), ks);
        // An old 64-bit key (version 2) is refused: it would be guessable.
        let mut v2 = BytesMut::new();
        v2.put_u32_le(KEY_MAGIC);
        v2.put_u8(2);
        for x in [5u64, 4096, 8192] {
            v2.put_u64_le(x);
        }
        v2.put_u8(0);
        let crc = crc32c::crc32c(&v2);
        v2.put_u32_le(crc);
        assert!(matches!(
            RemoteKey::decode(&v2),
            Err(Error::InvalidMetadata(_))
        ));
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
        // magic 4 + version 1 + key 16 + addr 8 + len 8 = the flags byte at 37.
        flagged[37] |= 0x80;
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
        fn remote_keys_with_random_fields(key: u128, addr: u64, len: u64, ro: bool, shared: bool, pid: u32, fd: i32, offset: u64, memfd_len: u64, ino: u64, cut in 0usize..100, flip in 0usize..100) {
            let k = RemoteKey { key, addr, len, read_only: ro, shared: shared.then_some(SharedKey { pid, fd, offset, memfd_len, dev: 1, ino }) };
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
