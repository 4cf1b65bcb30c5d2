//! The blobs this backend puts on the wire: connection info, remote keys and the header
//! of a notification's active message.
//!
//! UCX parses worker addresses and packed rkeys without validating them, so each blob is
//! wrapped in a small envelope (magic, version, lengths, CRC32C) that is checked before
//! any byte reaches UCX; a malformed blob is `Error::InvalidMetadata`, never a crash.
//! All integers are little-endian.

use kv_core::{Descriptor, Error, Result};

const INFO_MAGIC: &[u8; 4] = b"KVUI";
const KEY_MAGIC: &[u8; 4] = b"KVUK";
const AM_MAGIC: &[u8; 4] = b"KVUN";
const VERSION: u8 = 1;
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

struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.buf.len() < n {
            return Err(Error::invalid_metadata(format!(
                "ucx {} truncated: need {n} more bytes, have {}",
                self.what,
                self.buf.len()
            )));
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(a))
    }
    fn u64(&mut self) -> Result<u64> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    fn header(&mut self, magic: &[u8; 4]) -> Result<()> {
        self.versioned(magic, VERSION)
    }
    fn versioned(&mut self, magic: &[u8; 4], version: u8) -> Result<()> {
        if self.take(4)? != magic {
            return Err(Error::invalid_metadata(format!(
                "not ucx {} (bad magic)",
                self.what
            )));
        }
        let v = self.u8()?;
        if v != version {
            return Err(Error::invalid_metadata(format!(
                "ucx {} version {v}, this build reads {version}",
                self.what
            )));
        }
        Ok(())
    }
    fn name(&mut self, len: usize) -> Result<String> {
        String::from_utf8(self.take(len)?.to_vec())
            .map_err(|_| Error::invalid_metadata(format!("ucx {}: name is not UTF-8", self.what)))
    }
    fn end(&self) -> Result<()> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(Error::invalid_metadata(format!(
                "ucx {}: {} trailing bytes",
                self.what,
                self.buf.len()
            )))
        }
    }
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
        let mut r = Reader {
            buf: body,
            what: "connection info",
        };
        r.versioned(INFO_MAGIC, INFO_VERSION)?;
        let name_len = r.u8()? as usize;
        let instance = r.u64()?;
        let pid = r.u32()?;
        let tcp_tx_seg = r.u32()?;
        let tcp_rx_seg = r.u32()?;
        let addr_len = r.u32()? as usize;
        let name = r.name(name_len)?;
        let worker_address = r.take(addr_len)?.to_vec();
        r.end()?;
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
        v.push(VERSION);
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
        let mut r = Reader {
            buf: body,
            what: "remote key",
        };
        r.header(KEY_MAGIC)?;
        let range = Descriptor::new(r.u64()?, r.u64()?, r.u32()?);
        let len = r.u32()? as usize;
        let rkey = r.take(len)?.to_vec();
        r.end()?;
        if rkey.is_empty() || range.end().is_none() {
            return Err(Error::invalid_metadata(
                "ucx remote key: empty rkey or range overflows",
            ));
        }
        Ok(RemoteKey { range, rkey })
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
        let mut r = Reader {
            buf,
            what: "notification header",
        };
        r.header(AM_MAGIC)?;
        let name_len = r.u16()? as usize;
        if name_len > MAX_NAME {
            return Err(Error::invalid_metadata("ucx notification: name too long"));
        }
        let instance = r.u64()?;
        let endpoint = r.u64()?;
        let seq = r.u64()?;
        let name = r.name(name_len)?;
        r.end()?;
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
            rkey: vec![9; 40],
        };
        assert_eq!(RemoteKey::decode(&k.encode().unwrap()).unwrap(), k);
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
        let long = "x".repeat(MAX_NAME + 1);
        assert!(ConnInfo { name: long, ..i }.encode().is_err());
    }

    proptest! {
        #[test]
        fn decoders_never_panic(b in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = ConnInfo::decode(&b);
            let _ = RemoteKey::decode(&b);
            let _ = AmHeader::decode(&b);
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
