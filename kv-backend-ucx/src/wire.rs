//! The blobs this backend puts on the wire: connection info, remote keys and the header
//! of a notification's active message.
//!
//! UCX parses worker addresses and packed rkeys without validating them, so each blob is
//! wrapped in a small envelope (magic, version, lengths, CRC32C) that is checked before
//! any byte reaches UCX; a malformed blob is `Error::InvalidMetadata`, never a crash.
//! All integers are little-endian.

use kv_core::codec::Reader;
use kv_core::{Descriptor, Error, Result};

const INFO_MAGIC: &[u8; 4] = b"KVUI";
const KEY_MAGIC: &[u8; 4] = b"KVUK";
const AM_MAGIC: &[u8; 4] = b"KVUN";
const WRITE_MAGIC: &[u8; 4] = b"KVUW";
const ACK_MAGIC: &[u8; 4] = b"KVUA";
const VERSION: u8 = 1;
/// Version of [`RemoteKey`]: 2 added the registration's key id (named by WRITEs sent as
/// active messages; a version-1 key is refused as `InvalidMetadata`).
const KEY_VERSION: u8 = 2;
/// Version of [`ConnInfo`]: 2 added the TCP segment sizes (a version-1 peer's info is
/// refused as `InvalidMetadata` rather than risking the connection reset that mismatched
/// segment sizes cause).
const INFO_VERSION: u8 = 2;
/// Longest agent name carried in connection info and notification headers.
pub const MAX_NAME: usize = 255;

/// What a peer needs to reach this backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnInfo {
    /// The sender's agent name.
    pub name: String,
    /// Random id of the backend instance (tells apart two backends in one process).
    pub instance: u64,
    /// The process id of the backend (in-process peers are checked for liveness).
    pub pid: u32,
    /// Largest TCP segment the peer's UCX sends (`TCP_TX_SEG_SIZE`); 0 when its
    /// transports exclude TCP or the size is unknown.
    pub tcp_tx_seg: u32,
    /// Largest TCP segment the peer's UCX receives (`TCP_RX_SEG_SIZE`); 0 likewise.
    pub tcp_rx_seg: u32,
    /// The UCP worker address (`ucp_worker_get_address`).
    pub worker_address: Vec<u8>,
}

/// A registration's remote key: the packed rkey plus the range it covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteKey {
    /// The registered range on the peer.
    pub range: Descriptor,
    /// Random id of the registration on the peer: WRITEs sent as active messages
    /// ([`WriteHeader`]) name it, and the peer checks them against it.
    pub key_id: u64,
    /// `ucp_rkey_pack` output.
    pub rkey: Vec<u8>,
}

/// The header of a notification active message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AmHeader {
    /// Sender's backend instance.
    pub instance: u64,
    /// Sender's endpoint id (sequence numbers count per endpoint).
    pub endpoint: u64,
    /// Sequence number on that endpoint, from 0.
    pub seq: u64,
    /// Sender's agent name.
    pub name: String,
}

fn check_name(name: &str) -> Result<()> {
    if name.len() > MAX_NAME {
        return Err(Error::invalid_argument(format!(
            "agent name of {} bytes; at most {MAX_NAME}",
            name.len()
        )));
    }
    Ok(())
}

/// Appends a CRC32C of everything before it.
fn seal(mut v: Vec<u8>) -> Vec<u8> {
    let crc = crc32c::crc32c(&v);
    v.extend_from_slice(&crc.to_le_bytes());
    v
}

/// Checks and strips the trailing CRC32C.
fn unseal<'a>(buf: &'a [u8], what: &'static str) -> Result<&'a [u8]> {
    if buf.len() < 4 {
        return Err(Error::invalid_metadata(format!(
            "ucx {what} of {} bytes is too short",
            buf.len()
        )));
    }
    let (body, crc) = buf.split_at(buf.len() - 4);
    let want = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
    if crc32c::crc32c(body) != want {
        return Err(Error::invalid_metadata(format!(
            "ucx {what}: checksum mismatch"
        )));
    }
    Ok(body)
}

impl ConnInfo {
    /// Serialises the info.
    pub fn encode(&self) -> Result<Vec<u8>> {
        check_name(&self.name)?;
        let addr_len = u32::try_from(self.worker_address.len())
            .map_err(|_| Error::invalid_argument("worker address over 4 GiB"))?;
        let mut v = Vec::with_capacity(32 + self.name.len() + self.worker_address.len());
        v.extend_from_slice(INFO_MAGIC);
        v.push(INFO_VERSION);
        v.push(self.name.len() as u8);
        v.extend_from_slice(&self.instance.to_le_bytes());
        v.extend_from_slice(&self.pid.to_le_bytes());
        v.extend_from_slice(&self.tcp_tx_seg.to_le_bytes());
        v.extend_from_slice(&self.tcp_rx_seg.to_le_bytes());
        v.extend_from_slice(&addr_len.to_le_bytes());
        v.extend_from_slice(self.name.as_bytes());
        v.extend_from_slice(&self.worker_address);
        Ok(seal(v))
    }

    /// Parses and checks info produced by [`ConnInfo::encode`].
    pub fn decode(buf: &[u8]) -> Result<ConnInfo> {
        let body = unseal(buf, "connection info")?;
        let mut r = Reader::named(body, "ucx connection info");
        r.expect_header(INFO_MAGIC, INFO_VERSION)?;
        let name_len = r.u8()? as usize;
        let instance = r.u64()?;
        let pid = r.u32()?;
        let tcp_tx_seg = r.u32()?;
        let tcp_rx_seg = r.u32()?;
        let addr_len = r.u32()? as usize;
        let name = r.utf8(name_len)?;
        let worker_address = r.take(addr_len)?.to_vec();
        r.finish()?;
        if worker_address.is_empty() {
            return Err(Error::invalid_metadata(
                "ucx connection info: empty worker address",
            ));
        }
        Ok(ConnInfo {
            name,
            instance,
            pid,
            tcp_tx_seg,
            tcp_rx_seg,
            worker_address,
        })
    }
}

impl RemoteKey {
    /// Serialises the key.
    pub fn encode(&self) -> Result<Vec<u8>> {
        let len = u32::try_from(self.rkey.len())
            .map_err(|_| Error::invalid_argument("packed rkey over 4 GiB"))?;
        let mut v = Vec::with_capacity(32 + self.rkey.len());
        v.extend_from_slice(KEY_MAGIC);
        v.push(KEY_VERSION);
        v.extend_from_slice(&self.key_id.to_le_bytes());
        v.extend_from_slice(&self.range.addr.to_le_bytes());
        v.extend_from_slice(&self.range.len.to_le_bytes());
        v.extend_from_slice(&self.range.device.to_le_bytes());
        v.extend_from_slice(&len.to_le_bytes());
        v.extend_from_slice(&self.rkey);
        Ok(seal(v))
    }

    /// Parses and checks a key produced by [`RemoteKey::encode`].
    pub fn decode(buf: &[u8]) -> Result<RemoteKey> {
        let body = unseal(buf, "remote key")?;
        let mut r = Reader::named(body, "ucx remote key");
        r.expect_header(KEY_MAGIC, KEY_VERSION)?;
        let key_id = r.u64()?;
        let range = Descriptor::new(r.u64()?, r.u64()?, r.u32()?);
        let len = r.u32()? as usize;
        let rkey = r.take(len)?.to_vec();
        r.finish()?;
        if rkey.is_empty() || range.end().is_none() {
            return Err(Error::invalid_metadata(
                "ucx remote key: empty rkey or range overflows",
            ));
        }
        Ok(RemoteKey {
            range,
            key_id,
            rkey,
        })
    }
}

/// The header of a WRITE sent as an active message (TCP): which registration of the
/// target, where in it, how long, and the initiator's sequence number for the ack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteHeader {
    /// Initiator's backend instance (echoed in the ack).
    pub instance: u64,
    /// Initiator's sequence number of this WRITE (echoed in the ack).
    pub seq: u64,
    /// The target registration's [`RemoteKey::key_id`].
    pub key_id: u64,
    /// Offset of the data in that registration.
    pub offset: u64,
    /// Length of the data (must equal the message's data length).
    pub len: u64,
}

/// Encoded size of a [`WriteHeader`].
pub const WRITE_HEADER_LEN: usize = 5 + 5 * 8;

impl WriteHeader {
    /// Serialises the header (fixed size, [`WRITE_HEADER_LEN`]).
    pub fn encode(&self) -> [u8; WRITE_HEADER_LEN] {
        let mut v = [0u8; WRITE_HEADER_LEN];
        v[..4].copy_from_slice(WRITE_MAGIC);
        v[4] = VERSION;
        for (i, x) in [self.instance, self.seq, self.key_id, self.offset, self.len]
            .into_iter()
            .enumerate()
        {
            v[5 + 8 * i..13 + 8 * i].copy_from_slice(&x.to_le_bytes());
        }
        v
    }

    /// Parses a header produced by [`WriteHeader::encode`].
    pub fn decode(buf: &[u8]) -> Result<WriteHeader> {
        let mut r = Reader::named(buf, "ucx write header");
        r.expect_header(WRITE_MAGIC, VERSION)?;
        let h = WriteHeader {
            instance: r.u64()?,
            seq: r.u64()?,
            key_id: r.u64()?,
            offset: r.u64()?,
            len: r.u64()?,
        };
        r.finish()?;
        Ok(h)
    }
}

/// Outcome of a WRITE sent as an active message, as the target reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum AckCode {
    /// The data is in the target's registered memory.
    Ok = 0,
    /// No registration with that key id (never was, or deregistered).
    NotRegistered = 1,
    /// The range is not inside the registration.
    OutOfBounds = 2,
    /// The header's length did not match the data, or the target could not parse it.
    InvalidMetadata = 3,
    /// The target's UCX failed to receive the data.
    Failed = 4,
}

impl AckCode {
    fn from_u8(b: u8) -> Option<AckCode> {
        Some(match b {
            0 => AckCode::Ok,
            1 => AckCode::NotRegistered,
            2 => AckCode::OutOfBounds,
            3 => AckCode::InvalidMetadata,
            4 => AckCode::Failed,
            _ => return None,
        })
    }
}

/// The target's answer to a [`WriteHeader`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    /// The initiator's instance, from the header.
    pub instance: u64,
    /// The initiator's sequence number, from the header.
    pub seq: u64,
    /// What happened.
    pub code: AckCode,
}

/// Encoded size of an [`Ack`].
pub const ACK_LEN: usize = 5 + 8 + 8 + 1;

impl Ack {
    /// Serialises the ack (fixed size, [`ACK_LEN`]).
    pub fn encode(&self) -> [u8; ACK_LEN] {
        let mut v = [0u8; ACK_LEN];
        v[..4].copy_from_slice(ACK_MAGIC);
        v[4] = VERSION;
        v[5..13].copy_from_slice(&self.instance.to_le_bytes());
        v[13..21].copy_from_slice(&self.seq.to_le_bytes());
        v[21] = self.code as u8;
        v
    }

    /// Parses an ack produced by [`Ack::encode`].
    pub fn decode(buf: &[u8]) -> Result<Ack> {
        let mut r = Reader::named(buf, "ucx write ack");
        r.expect_header(ACK_MAGIC, VERSION)?;
        let instance = r.u64()?;
        let seq = r.u64()?;
        let code = AckCode::from_u8(r.u8()?)
            .ok_or_else(|| Error::invalid_metadata("ucx ack: unknown code"))?;
        r.finish()?;
        Ok(Ack {
            instance,
            seq,
            code,
        })
    }
}

impl AmHeader {
    /// Serialises the header (no checksum: UCX's transports deliver it intact).
    pub fn encode(&self) -> Result<Vec<u8>> {
        check_name(&self.name)?;
        let mut v = Vec::with_capacity(32 + self.name.len());
        v.extend_from_slice(AM_MAGIC);
        v.push(VERSION);
        v.extend_from_slice(&(self.name.len() as u16).to_le_bytes());
        v.extend_from_slice(&self.instance.to_le_bytes());
        v.extend_from_slice(&self.endpoint.to_le_bytes());
        v.extend_from_slice(&self.seq.to_le_bytes());
        v.extend_from_slice(self.name.as_bytes());
        Ok(v)
    }

    /// Parses a header produced by [`AmHeader::encode`].
    pub fn decode(buf: &[u8]) -> Result<AmHeader> {
        let mut r = Reader::named(buf, "ucx notification header");
        r.expect_header(AM_MAGIC, VERSION)?;
        let name_len = r.u16()? as usize;
        if name_len > MAX_NAME {
            return Err(Error::invalid_metadata("ucx notification: name too long"));
        }
        let instance = r.u64()?;
        let endpoint = r.u64()?;
        let seq = r.u64()?;
        let name = r.utf8(name_len)?;
        r.finish()?;
        Ok(AmHeader {
            instance,
            endpoint,
            seq,
            name,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trips() {
        let i = ConnInfo {
            name: "prefill-0".into(),
            instance: 7,
            pid: 42,
            tcp_tx_seg: 256 << 10,
            tcp_rx_seg: 64 << 10,
            worker_address: vec![1, 2, 3, 4, 5],
        };
        assert_eq!(ConnInfo::decode(&i.encode().unwrap()).unwrap(), i);
        let k = RemoteKey {
            range: Descriptor::new(0x1000, 4096, 0),
            key_id: 0xdead_beef,
            rkey: vec![9; 40],
        };
        assert_eq!(RemoteKey::decode(&k.encode().unwrap()).unwrap(), k);
        let w = WriteHeader {
            instance: 1,
            seq: 2,
            key_id: 3,
            offset: 4,
            len: 5,
        };
        assert_eq!(WriteHeader::decode(&w.encode()).unwrap(), w);
        for code in [
            AckCode::Ok,
            AckCode::NotRegistered,
            AckCode::OutOfBounds,
            AckCode::InvalidMetadata,
            AckCode::Failed,
        ] {
            let a = Ack {
                instance: 9,
                seq: 8,
                code,
            };
            assert_eq!(Ack::decode(&a.encode()).unwrap(), a);
        }
        let h = AmHeader {
            instance: 1,
            endpoint: 2,
            seq: 3,
            name: "decode-1".into(),
        };
        assert_eq!(AmHeader::decode(&h.encode().unwrap()).unwrap(), h);
    }

    #[test]
    fn corruption_is_invalid_metadata() {
        let i = ConnInfo {
            name: "a".into(),
            instance: 7,
            pid: 42,
            tcp_tx_seg: 0,
            tcp_rx_seg: 0,
            worker_address: vec![1, 2, 3],
        };
        let mut b = i.encode().unwrap();
        b[10] ^= 1;
        assert!(matches!(
            ConnInfo::decode(&b),
            Err(Error::InvalidMetadata(_))
        ));
        assert!(matches!(
            ConnInfo::decode(&[0xff; 3]),
            Err(Error::InvalidMetadata(_))
        ));
        assert!(matches!(
            RemoteKey::decode(&[]),
            Err(Error::InvalidMetadata(_))
        ));
        // A version-1 info (before the TCP segment sizes) is refused, not misread.
        let mut old = i.encode().unwrap();
        old[4] = 1;
        let n = old.len() - 4;
        old.truncate(n);
        let old = seal(old);
        assert!(matches!(
            ConnInfo::decode(&old),
            Err(Error::InvalidMetadata(m)) if m.contains("version 1")
        ));
        let mut w = WriteHeader {
            instance: 1,
            seq: 2,
            key_id: 3,
            offset: 4,
            len: 5,
        }
        .encode()
        .to_vec();
        w.push(0);
        assert!(matches!(
            WriteHeader::decode(&w),
            Err(Error::InvalidMetadata(_))
        ));
        let mut a = Ack {
            instance: 1,
            seq: 2,
            code: AckCode::Ok,
        }
        .encode();
        a[ACK_LEN - 1] = 99;
        assert!(matches!(Ack::decode(&a), Err(Error::InvalidMetadata(_))));
        // A version-1 key (before the key id) is refused, not misread.
        let k = RemoteKey {
            range: Descriptor::new(0x1000, 4096, 0),
            key_id: 1,
            rkey: vec![1; 8],
        };
        let mut old = k.encode().unwrap();
        old[4] = 1;
        let n = old.len() - 4;
        old.truncate(n);
        let old = seal(old);
        assert!(matches!(
            RemoteKey::decode(&old),
            Err(Error::InvalidMetadata(m)) if m.contains("version 1")
        ));
        let long = "x".repeat(MAX_NAME + 1);
        assert!(ConnInfo { name: long, ..i }.encode().is_err());
    }

    proptest! {
        #[test]
        fn decoders_never_panic(b in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = ConnInfo::decode(&b);
            let _ = RemoteKey::decode(&b);
            let _ = AmHeader::decode(&b);
            let _ = WriteHeader::decode(&b);
            let _ = Ack::decode(&b);
        }

        #[test]
        fn sealed_garbage_never_panics(b in proptest::collection::vec(any::<u8>(), 0..100)) {
            // A correct checksum over garbage reaches the structure checks, which must not panic.
            let sealed = seal(b);
            let _ = ConnInfo::decode(&sealed);
            let _ = RemoteKey::decode(&sealed);
        }
    }
}
