//! The bytes this backend puts on the wire: connection info, remote keys and
//! notification messages. Little-endian, length-prefixed; anything malformed is
//! [`Error::InvalidMetadata`], never a panic.

use bytes::{BufMut, Bytes, BytesMut};
use kv_core::codec::Reader;
use kv_core::{Error, Result};

const INFO_MAGIC: &[u8; 4] = b"KVFI";
const KEY_MAGIC: &[u8; 4] = b"KVFK";
const MSG_MAGIC: &[u8; 4] = b"KVFN";
const VERSION: u8 = 1;

/// Longest agent name carried in connection info and notifications.
pub const MAX_NAME: usize = 1024;
/// Largest notification payload.
pub const MAX_PAYLOAD: usize = 64 << 10;
/// Header of a notification message: magic, version, name length, payload length.
pub const MSG_HEADER: usize = 4 + 1 + 2 + 4;
/// Size of each send/receive bounce buffer: the largest possible message, page-rounded.
pub const MSG_BUF: usize = (MSG_HEADER + MAX_NAME + MAX_PAYLOAD).div_ceil(4096) * 4096;

/// What a peer needs to reach this backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionInfo {
    /// The agent name notifications will carry.
    pub agent: String,
    /// The provider (`tcp;ofi_rxm`, `shm`, …); both sides must use the same one.
    pub provider: String,
    /// The endpoint name from `fi_getname`.
    pub address: Vec<u8>,
}

fn check_name(name: &str) -> Result<()> {
    if name.len() > MAX_NAME {
        return Err(Error::invalid_argument(format!(
            "agent name is {} bytes; at most {MAX_NAME}",
            name.len()
        )));
    }
    Ok(())
}

impl ConnectionInfo {
    /// Serialises, with a CRC32C trailer.
    pub fn encode(&self) -> Result<Bytes> {
        check_name(&self.agent)?;
        let mut b = BytesMut::new();
        b.put_slice(INFO_MAGIC);
        b.put_u8(VERSION);
        for s in [
            self.agent.as_bytes(),
            self.provider.as_bytes(),
            &self.address,
        ] {
            let len = u16::try_from(s.len())
                .map_err(|_| Error::invalid_argument("connection info field over 64 KiB"))?;
            b.put_u16_le(len);
            b.put_slice(s);
        }
        let crc = crc32c::crc32c(&b);
        b.put_u32_le(crc);
        Ok(b.freeze())
    }

    /// Parses and checks what [`ConnectionInfo::encode`] wrote.
    pub fn decode(buf: &[u8]) -> Result<ConnectionInfo> {
        if buf.len() < 4 {
            return Err(Error::invalid_metadata(
                "libfabric connection info truncated",
            ));
        }
        let (body, crc) = buf.split_at(buf.len() - 4);
        if crc32c::crc32c(body).to_le_bytes() != crc {
            return Err(Error::invalid_metadata(
                "libfabric connection info: checksum mismatch",
            ));
        }
        let mut r = Reader::named(body, "libfabric connection info");
        r.expect_header(INFO_MAGIC, VERSION)?;
        let n = r.u16()? as usize;
        let agent = r.utf8(n)?;
        let n = r.u16()? as usize;
        let provider = r.utf8(n)?;
        let n = r.u16()? as usize;
        let address = r.take(n)?.to_vec();
        r.finish()?;
        if address.is_empty() {
            return Err(Error::invalid_metadata(
                "libfabric connection info: empty address",
            ));
        }
        Ok(ConnectionInfo {
            agent,
            provider,
            address,
        })
    }
}

/// A registration's remote key: the MR key, the region's base address and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteKey {
    /// `fi_mr_key` (or the key we requested).
    pub key: u64,
    /// Virtual address of the registration's first byte on the owner.
    pub base: u64,
    /// Length of the registration.
    pub len: u64,
}

impl RemoteKey {
    /// Length of the encoding.
    pub const LEN: usize = 4 + 1 + 24;

    /// Serialises.
    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(Self::LEN);
        b.put_slice(KEY_MAGIC);
        b.put_u8(VERSION);
        b.put_u64_le(self.key);
        b.put_u64_le(self.base);
        b.put_u64_le(self.len);
        b.freeze()
    }

    /// Parses what [`RemoteKey::encode`] wrote.
    pub fn decode(buf: &[u8]) -> Result<RemoteKey> {
        let mut r = Reader::named(buf, "libfabric remote key");
        r.expect_header(KEY_MAGIC, VERSION)?;
        let k = RemoteKey {
            key: r.u64()?,
            base: r.u64()?,
            len: r.u64()?,
        };
        r.finish()?;
        Ok(k)
    }
}

/// Refuses a notification payload longer than [`MAX_PAYLOAD`] (checked when it is
/// queued, before anything is posted).
pub fn check_payload(len: usize) -> Result<()> {
    if len > MAX_PAYLOAD {
        return Err(Error::invalid_argument(format!(
            "notification of {len} bytes; at most {MAX_PAYLOAD}"
        )));
    }
    Ok(())
}

/// Writes a notification message into `buf` (at least [`MSG_BUF`] bytes); returns
/// its length.
pub fn encode_notification(buf: &mut [u8], agent: &str, payload: &[u8]) -> Result<usize> {
    check_name(agent)?;
    if payload.len() > MAX_PAYLOAD {
        return Err(Error::invalid_argument(format!(
            "notification of {} bytes; the libfabric backend carries at most {MAX_PAYLOAD}",
            payload.len()
        )));
    }
    let len = MSG_HEADER + agent.len() + payload.len();
    let out = buf
        .get_mut(..len)
        .ok_or_else(|| Error::invalid_argument("notification buffer too small"))?;
    out[..4].copy_from_slice(MSG_MAGIC);
    out[4] = VERSION;
    out[5..7].copy_from_slice(&(agent.len() as u16).to_le_bytes());
    out[7..11].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    out[11..11 + agent.len()].copy_from_slice(agent.as_bytes());
    out[11 + agent.len()..].copy_from_slice(payload);
    Ok(len)
}

/// Parses a received notification message: `(sender agent, payload)`.
pub fn decode_notification(buf: &[u8]) -> Result<(String, Bytes)> {
    let mut r = Reader::named(buf, "libfabric notification");
    r.expect_header(MSG_MAGIC, VERSION)?;
    let n = r.u16()? as usize;
    let p = r.u32()? as usize;
    if n > MAX_NAME || p > MAX_PAYLOAD {
        return Err(Error::invalid_metadata(
            "libfabric notification: oversized fields",
        ));
    }
    let agent = r.utf8(n)?;
    let payload = Bytes::copy_from_slice(r.take(p)?);
    r.finish()?;
    Ok((agent, payload))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn info_round_trips_and_rejects_garbage() {
        let i = ConnectionInfo {
            agent: "prefill-0".into(),
            provider: "tcp;ofi_rxm".into(),
            address: vec![2, 0, 1, 2, 127, 0, 0, 1],
        };
        let b = i.encode().unwrap();
        assert_eq!(ConnectionInfo::decode(&b).unwrap(), i);
        for cut in 0..b.len() {
            assert!(ConnectionInfo::decode(&b[..cut]).is_err());
        }
        let mut bad = b.to_vec();
        bad[7] ^= 1;
        assert!(matches!(
            ConnectionInfo::decode(&bad),
            Err(Error::InvalidMetadata(_))
        ));
    }

    #[test]
    fn key_round_trips() {
        let k = RemoteKey {
            key: 7,
            base: 0x7f00_0000_1000,
            len: 4096,
        };
        assert_eq!(RemoteKey::decode(&k.encode()).unwrap(), k);
        assert!(RemoteKey::decode(&k.encode()[..RemoteKey::LEN - 1]).is_err());
        assert!(RemoteKey::decode(&[0xff; 3]).is_err());
    }

    #[test]
    fn notification_round_trips_and_limits() {
        let mut buf = vec![0u8; MSG_BUF];
        let n = encode_notification(&mut buf, "a", b"layer-0 done").unwrap();
        let (who, p) = decode_notification(&buf[..n]).unwrap();
        assert_eq!((who.as_str(), &p[..]), ("a", &b"layer-0 done"[..]));
        assert!(decode_notification(&buf[..n - 1]).is_err());
        assert!(encode_notification(&mut buf, "a", &vec![0; MAX_PAYLOAD + 1]).is_err());
        let big = "x".repeat(MAX_NAME);
        assert!(encode_notification(&mut buf, &big, &vec![1; MAX_PAYLOAD]).is_ok());
    }

    proptest! {
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = ConnectionInfo::decode(&bytes);
            let _ = RemoteKey::decode(&bytes);
            let _ = decode_notification(&bytes);
        }
    }
}
