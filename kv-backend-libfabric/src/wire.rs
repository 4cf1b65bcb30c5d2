//! The bytes this backend puts on the wire: connection info, remote keys, and the
//! control frames carried as `FI_MSG` messages (session handshake, notifications,
//! revocations). Little-endian, length-prefixed; anything malformed is
//! [`Error::InvalidMetadata`], never a panic.

use bytes::{BufMut, Bytes, BytesMut};
use kv_core::auth::TAG_LEN;
use kv_core::codec::Reader;
use kv_core::{Access, Error, Result};

const INFO_MAGIC: &[u8; 4] = b"KVFI";
const KEY_MAGIC: &[u8; 4] = b"KVFK";
const FRAME_MAGIC: &[u8; 4] = b"KVFC";
const INFO_VERSION: u8 = 1;
/// Version 2 of the remote key carries the registration's access.
const KEY_VERSION: u8 = 2;
const FRAME_VERSION: u8 = 1;

/// Longest agent name carried in connection info and handshakes.
pub const MAX_NAME: usize = 1024;
/// Longest endpoint address a HELLO carries.
pub const MAX_ADDRESS: usize = 512;
/// Largest notification payload.
pub const MAX_PAYLOAD: usize = 64 << 10;
/// Header of a control frame: magic, version, kind, session, sequence, tag, body length.
pub const FRAME_HEADER: usize = 4 + 1 + 1 + 8 + 8 + TAG_LEN + 4;
/// Largest frame body: a notification payload (every other body is smaller).
const MAX_BODY: usize = MAX_PAYLOAD;
/// Size of each send/receive bounce buffer: the largest possible frame, page-rounded.
pub const MSG_BUF: usize = (FRAME_HEADER + MAX_BODY).div_ceil(4096) * 4096;

/// What a peer needs to reach this backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionInfo {
    /// The agent name the peer announced (informational: notifications carry the name
    /// the sender's session proved).
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
        b.put_u8(INFO_VERSION);
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
        r.expect_header(INFO_MAGIC, INFO_VERSION)?;
        let n = r.u16()? as usize;
        let agent = r.utf8(n)?;
        let n = r.u16()? as usize;
        let provider = r.utf8(n)?;
        let n = r.u16()? as usize;
        let address = r.take(n)?.to_vec();
        r.finish()?;
        if address.is_empty() || address.len() > MAX_ADDRESS {
            return Err(Error::invalid_metadata(format!(
                "libfabric connection info: address of {} bytes",
                address.len()
            )));
        }
        Ok(ConnectionInfo {
            agent,
            provider,
            address,
        })
    }
}

/// A registration's remote key: the MR key, the region's base address and length, and
/// whether peers may write it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteKey {
    /// The MR key (`fi_mr_key`, or the random key we requested).
    pub key: u64,
    /// Virtual address of the registration's first byte on the owner.
    pub base: u64,
    /// Length of the registration.
    pub len: u64,
    /// What peers may do with it (the owner's provider enforces it regardless).
    pub access: Access,
}

impl RemoteKey {
    /// Length of the encoding.
    pub const LEN: usize = 4 + 1 + 24 + 1;

    /// Serialises.
    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(Self::LEN);
        b.put_slice(KEY_MAGIC);
        b.put_u8(KEY_VERSION);
        b.put_u64_le(self.key);
        b.put_u64_le(self.base);
        b.put_u64_le(self.len);
        b.put_u8(self.access.as_u8());
        b.freeze()
    }

    /// Parses what [`RemoteKey::encode`] wrote.
    pub fn decode(buf: &[u8]) -> Result<RemoteKey> {
        let mut r = Reader::named(buf, "libfabric remote key");
        r.expect_header(KEY_MAGIC, KEY_VERSION)?;
        let (key, base, len) = (r.u64()?, r.u64()?, r.u64()?);
        let access = Access::from_u8(r.u8()?)
            .ok_or_else(|| Error::invalid_metadata("libfabric remote key: unknown access"))?;
        r.finish()?;
        Ok(RemoteKey {
            key,
            base,
            len,
            access,
        })
    }
}

/// Refuses a notification payload longer than [`MAX_PAYLOAD`] (checked when it is
/// queued, before anything is posted).
pub fn check_payload(len: usize) -> Result<()> {
    if len > MAX_PAYLOAD {
        return Err(Error::invalid_argument(format!(
            "notification of {len} bytes; the libfabric backend carries at most {MAX_PAYLOAD}"
        )));
    }
    Ok(())
}

/// What a control frame is. Client = the side that connected (and sends notifications),
/// server = the side it connected to (and whose memory it may import).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Client → server: opens a session (body: [`Hello`]).
    Hello = 1,
    /// Server → client: the handshake challenge (body: `kv_core::auth::ServerHello`).
    ServerHello = 2,
    /// Client → server: the answer (body: `kv_core::auth::ClientHello`).
    ClientHello = 3,
    /// Server → client: the server's proof (body: `kv_core::auth::ServerProof`).
    ServerProof = 4,
    /// Server → client: an unauthenticated session is open (no secret on either side).
    Ready = 5,
    /// Server → client: the session is refused (body: reason text).
    Reject = 6,
    /// Client → server: a notification (body: payload), tagged when authenticated.
    Note = 7,
    /// Server → client: a registration the client may have imported is gone (body: key).
    Revoke = 8,
    /// Client → server: the client disconnected; forget the session.
    Bye = 9,
    /// Client → server: is the registration with this key live (body: key)? Asked for
    /// every import before the first transfer that names it.
    Check = 10,
    /// Server → client: the answer (body: key, then 1 live / 0 gone).
    Checked = 11,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::Hello,
            2 => Kind::ServerHello,
            3 => Kind::ClientHello,
            4 => Kind::ServerProof,
            5 => Kind::Ready,
            6 => Kind::Reject,
            7 => Kind::Note,
            8 => Kind::Revoke,
            9 => Kind::Bye,
            10 => Kind::Check,
            11 => Kind::Checked,
            _ => return None,
        })
    }

    /// The direction byte the tag covers: `c` for client → server frames, `s` back.
    pub fn direction(self) -> u8 {
        match self {
            Kind::Hello | Kind::ClientHello | Kind::Note | Kind::Bye | Kind::Check => b'c',
            _ => b's',
        }
    }
}

/// A decoded control frame, borrowing its body from the receive buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    /// What it is.
    pub kind: Kind,
    /// The session it belongs to (chosen at random by the client).
    pub hs: u64,
    /// Sequence number (tagged frames).
    pub seq: u64,
    /// Truncated HMAC of [`tag_input`] under the session key; zeros when unauthenticated.
    pub tag: [u8; TAG_LEN],
    /// The body.
    pub body: &'a [u8],
}

/// Writes a frame into `buf` (at least [`MSG_BUF`] bytes); returns its length.
pub fn encode_frame(buf: &mut [u8], f: &Frame<'_>) -> Result<usize> {
    if f.body.len() > MAX_BODY {
        return Err(Error::invalid_argument(format!(
            "control frame body of {} bytes; at most {MAX_BODY}",
            f.body.len()
        )));
    }
    let len = FRAME_HEADER + f.body.len();
    let out = buf
        .get_mut(..len)
        .ok_or_else(|| Error::invalid_argument("message buffer too small"))?;
    out[..4].copy_from_slice(FRAME_MAGIC);
    out[4] = FRAME_VERSION;
    out[5] = f.kind as u8;
    out[6..14].copy_from_slice(&f.hs.to_le_bytes());
    out[14..22].copy_from_slice(&f.seq.to_le_bytes());
    out[22..22 + TAG_LEN].copy_from_slice(&f.tag);
    // The body is at most MAX_BODY (checked above), far below u32::MAX.
    out[22 + TAG_LEN..FRAME_HEADER].copy_from_slice(&(f.body.len() as u32).to_le_bytes());
    out[FRAME_HEADER..].copy_from_slice(f.body);
    Ok(len)
}

/// Parses a received control frame.
pub fn decode_frame(buf: &[u8]) -> Result<Frame<'_>> {
    let mut r = Reader::named(buf, "libfabric control frame");
    r.expect_header(FRAME_MAGIC, FRAME_VERSION)?;
    let kind = Kind::from_u8(r.u8()?)
        .ok_or_else(|| Error::invalid_metadata("libfabric control frame: unknown kind"))?;
    let hs = r.u64()?;
    let seq = r.u64()?;
    let mut tag = [0u8; TAG_LEN];
    tag.copy_from_slice(r.take(TAG_LEN)?);
    let n = r.u32()? as usize;
    if n > MAX_BODY {
        return Err(Error::invalid_metadata(
            "libfabric control frame: oversized body",
        ));
    }
    let body = r.take(n)?;
    r.finish()?;
    Ok(Frame {
        kind,
        hs,
        seq,
        tag,
        body,
    })
}

/// The bytes a frame's tag covers: direction, kind, session and body (the sequence
/// number is mixed in by `SessionKey::tag`). A frame cannot be reflected back to its
/// sender, moved to another session, or turned into another kind.
pub fn tag_input(kind: Kind, hs: u64, body: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(10 + body.len());
    v.push(kind.direction());
    v.push(kind as u8);
    v.extend_from_slice(&hs.to_le_bytes());
    v.extend_from_slice(body);
    v
}

/// The body of a [`Kind::Hello`]: how the client wants to talk, where the server
/// reaches it, and (unauthenticated sessions only) its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// The client has a cluster secret and wants the handshake.
    pub authenticated: bool,
    /// The client's endpoint name (`fi_getname`), for the server's address vector.
    pub address: Vec<u8>,
    /// The client's agent name; an authenticated session uses the name the handshake
    /// proves instead.
    pub name: String,
}

impl Hello {
    /// Serialises.
    pub fn encode(&self) -> Result<Vec<u8>> {
        check_name(&self.name)?;
        if self.address.len() > MAX_ADDRESS {
            return Err(Error::invalid_argument("endpoint address too long"));
        }
        let mut b = Vec::with_capacity(5 + self.address.len() + self.name.len());
        b.push(u8::from(self.authenticated));
        // Both fit in u16: checked above.
        b.extend_from_slice(&(self.address.len() as u16).to_le_bytes());
        b.extend_from_slice(&self.address);
        b.extend_from_slice(&(self.name.len() as u16).to_le_bytes());
        b.extend_from_slice(self.name.as_bytes());
        Ok(b)
    }

    /// Parses what [`Hello::encode`] wrote.
    pub fn decode(buf: &[u8]) -> Result<Hello> {
        let mut r = Reader::named(buf, "libfabric hello");
        let authenticated = match r.u8()? {
            0 => false,
            1 => true,
            _ => return Err(Error::invalid_metadata("libfabric hello: bad mode")),
        };
        let n = r.u16()? as usize;
        if n == 0 || n > MAX_ADDRESS {
            return Err(Error::invalid_metadata("libfabric hello: bad address"));
        }
        let address = r.take(n)?.to_vec();
        let n = r.u16()? as usize;
        if n > MAX_NAME {
            return Err(Error::invalid_metadata("libfabric hello: name too long"));
        }
        let name = r.utf8(n)?;
        r.finish()?;
        Ok(Hello {
            authenticated,
            address,
            name,
        })
    }
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
    fn key_round_trips_with_its_access() {
        for access in [Access::ReadWrite, Access::ReadOnly] {
            let k = RemoteKey {
                key: 0x1234_5678_9abc_def0,
                base: 0x7f00_0000_1000,
                len: 4096,
                access,
            };
            let b = k.encode();
            assert_eq!(b.len(), RemoteKey::LEN);
            assert_eq!(RemoteKey::decode(&b).unwrap(), k);
            assert!(RemoteKey::decode(&b[..RemoteKey::LEN - 1]).is_err());
        }
        let mut b = RemoteKey {
            key: 1,
            base: 0,
            len: 1,
            access: Access::ReadOnly,
        }
        .encode()
        .to_vec();
        b[RemoteKey::LEN - 1] = 7;
        assert!(RemoteKey::decode(&b).is_err());
        assert!(RemoteKey::decode(&[0xff; 3]).is_err());
    }

    #[test]
    fn frames_round_trip_and_limits() {
        let mut buf = vec![0u8; MSG_BUF];
        let f = Frame {
            kind: Kind::Note,
            hs: 42,
            seq: 7,
            tag: [9; TAG_LEN],
            body: b"layer-0 done",
        };
        let n = encode_frame(&mut buf, &f).unwrap();
        assert_eq!(decode_frame(&buf[..n]).unwrap(), f);
        assert!(decode_frame(&buf[..n - 1]).is_err());
        let big = vec![1u8; MAX_PAYLOAD];
        let f = Frame { body: &big, ..f };
        let n = encode_frame(&mut buf, &f).unwrap();
        assert_eq!(n, FRAME_HEADER + MAX_PAYLOAD);
        let too_big = vec![1u8; MAX_PAYLOAD + 1];
        assert!(encode_frame(
            &mut buf,
            &Frame {
                body: &too_big,
                ..f
            }
        )
        .is_err());
        buf[5] = 200;
        assert!(decode_frame(&buf[..n]).is_err());
    }

    #[test]
    fn hello_round_trips() {
        let h = Hello {
            authenticated: true,
            address: vec![2, 0, 0x1f, 0x90, 127, 0, 0, 1],
            name: "decode-3".into(),
        };
        assert_eq!(Hello::decode(&h.encode().unwrap()).unwrap(), h);
        let long = Hello {
            name: "x".repeat(MAX_NAME + 1),
            ..h
        };
        assert!(long.encode().is_err());
    }

    #[test]
    fn tags_cover_direction_kind_and_session() {
        let a = tag_input(Kind::Note, 1, b"x");
        assert_ne!(a, tag_input(Kind::Revoke, 1, b"x"));
        assert_ne!(a, tag_input(Kind::Note, 2, b"x"));
        assert_ne!(a, tag_input(Kind::Note, 1, b"y"));
    }

    proptest! {
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = ConnectionInfo::decode(&bytes);
            let _ = RemoteKey::decode(&bytes);
            let _ = decode_frame(&bytes);
            let _ = Hello::decode(&bytes);
        }
    }
}
