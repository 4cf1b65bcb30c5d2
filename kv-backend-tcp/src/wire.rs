//! The framed protocol between two TCP backends, and the blobs they exchange.
//!
//! Every frame starts with a fixed 48-byte little-endian [`Header`] whose last four
//! bytes are the CRC32C of the first 44. A WRITE or READ request names its target
//! either in the header itself (one segment: `key`, `addr`, `len`) or, for `count > 1`,
//! in a segment table that follows the header (`count` × 24 bytes, then the table's
//! CRC32C). A WRITE's payload follows the table; a READ is answered by a DATA frame
//! whose payload is the requested bytes in order. Every WRITE is answered by ACK or
//! ERROR. On the control connection of a same-host importer (HELLO flag
//! [`HELLO_SAME_HOST_CONTROL`]) the target sends REVOKE when it deregisters a
//! registration and the importer answers REVOKE_ACK once it no longer touches it;
//! these two ops are protocol version 2, every other frame still says version 1.
//! Decoders take untrusted bytes and fail with [`Error::InvalidMetadata`],
//! never panic (see the proptest in this module and the `fuzz` crate).
//!
//! ```
//! use kv_backend_tcp::wire::{decode_header, encode_header, FrameOp, Header};
//! let h = Header { op: FrameOp::Write, id: 7, key: 9, addr: 0x1000, len: 4096, count: 1, status: 0 };
//! assert_eq!(decode_header(&encode_header(&h))?, h);
//! # Ok::<(), kv_core::Error>(())
//! ```

use kv_core::codec::Reader;
use kv_core::{Error, Result};

pub use crate::keys::{
    ConnectionInfo, RemoteKey, SharedKey, KEY_FLAG_SHARED, KEY_VERSION, MAX_NAME,
};

/// Size of every frame header.
pub const HEADER_LEN: usize = 48;
/// Size of one segment table entry (key, addr, len).
pub const SEGMENT_LEN: usize = 24;
/// First two bytes of every frame ("KX").
pub const MAGIC: u16 = 0x584b;
/// Protocol version of frames whose op exists since version 1 (every op but REVOKE and
/// REVOKE_ACK); a peer speaking another version is refused.
pub const VERSION: u8 = 1;
/// Protocol version 2 adds REVOKE and REVOKE_ACK on same-host control connections.
/// Every frame carries the version that introduced its op ([`FrameOp::version`]), so
/// a version-1 peer, which never announces [`HELLO_SAME_HOST_CONTROL`] and is never
/// sent a REVOKE, still talks to this one unchanged.
pub const VERSION_REVOKE: u8 = 2;
/// HELLO `status` flag: this is the control connection of a same-host importer that
/// speaks version 2 — send it REVOKE when a registration is deregistered, it answers
/// REVOKE_ACK once it no longer touches the registration.
pub const HELLO_SAME_HOST_CONTROL: u32 = 1;
/// Most segments one WRITE/READ frame may name.
pub const MAX_SEGMENTS: u32 = 1 << 16;
/// Most payload bytes one WRITE/READ/DATA frame may carry.
pub const MAX_FRAME_BYTES: u64 = 1 << 30;
/// Most bytes of an ERROR frame's message.
pub const MAX_ERROR_MESSAGE: u64 = 4096;
/// Most bytes of a NOTIFY payload the decoder accepts (the backend's own limit is lower).
pub const MAX_NOTIFY: u64 = 16 << 20;

/// What a frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameOp {
    /// First frame of a connection: `len` bytes of the sender's agent name follow;
    /// `key` is the target instance the sender expects, `addr` the sender's pid.
    Hello = 1,
    /// Reply to HELLO: `key` is the target's instance id.
    HelloAck = 2,
    /// One-sided write: segments and `len` payload bytes follow.
    Write = 3,
    /// One-sided read: segments follow; answered by DATA with `len` bytes.
    Read = 4,
    /// A WRITE with this `id` landed.
    Ack = 5,
    /// The `len` bytes a READ with this `id` asked for follow.
    Data = 6,
    /// The request with this `id` was refused; `status` is an [`ErrorCode`], `len`
    /// bytes of UTF-8 message follow.
    Error = 7,
    /// `len` bytes of notification payload follow.
    Notify = 8,
    /// Target → same-host importer (version 2): the registration with remote key
    /// `key` is being deregistered; `id` names this revocation.
    Revoke = 9,
    /// Importer → target (version 2): revocation `id` is done (new posts to the
    /// registration are refused and no copy into it is in flight).
    RevokeAck = 10,
}

impl FrameOp {
    fn from_u8(v: u8) -> Option<FrameOp> {
        Some(match v {
            1 => FrameOp::Hello,
            2 => FrameOp::HelloAck,
            3 => FrameOp::Write,
            4 => FrameOp::Read,
            5 => FrameOp::Ack,
            6 => FrameOp::Data,
            7 => FrameOp::Error,
            8 => FrameOp::Notify,
            9 => FrameOp::Revoke,
            10 => FrameOp::RevokeAck,
            _ => return None,
        })
    }

    /// The protocol version that introduced the op, written in (and required of) its
    /// frames.
    pub fn version(self) -> u8 {
        match self {
            FrameOp::Revoke | FrameOp::RevokeAck => VERSION_REVOKE,
            _ => VERSION,
        }
    }
}

/// Why a target refused a request (the `status` of an ERROR frame).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum ErrorCode {
    /// A range lies outside the registration its key names.
    OutOfBounds = 1,
    /// The key names no (or no longer a) registration.
    NotRegistered = 2,
    /// The request was malformed or refused for another reason.
    Refused = 3,
}

impl ErrorCode {
    /// The code for a target-side error.
    pub fn of(e: &Error) -> ErrorCode {
        match e {
            Error::OutOfBounds(_) => ErrorCode::OutOfBounds,
            Error::NotRegistered(_) => ErrorCode::NotRegistered,
            _ => ErrorCode::Refused,
        }
    }

    /// The error an initiator reports for an ERROR frame with `status` and `message`.
    pub fn to_error(status: u32, message: &str) -> Error {
        let msg = format!("refused by the target: {message}");
        match status {
            1 => Error::OutOfBounds(msg),
            2 => Error::NotRegistered(msg),
            _ => Error::invalid_argument(msg),
        }
    }
}

/// A decoded frame header. `Copy`, `Send + Sync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Header {
    /// What the frame is.
    pub op: FrameOp,
    /// Status code (ERROR frames), 0 otherwise.
    pub status: u32,
    /// The request (transfer) id an answer refers to.
    pub id: u64,
    /// Remote key of the single segment (`count == 1`), else 0.
    pub key: u64,
    /// Target address of the single segment (`count == 1`), else 0.
    pub addr: u64,
    /// Payload bytes (WRITE, DATA, NOTIFY, HELLO, ERROR) or bytes asked for (READ).
    pub len: u64,
    /// Number of segments of a WRITE/READ (≥ 1); 0 for other frames.
    pub count: u32,
}

impl Header {
    /// A header of `op` with every other field zero.
    pub fn new(op: FrameOp) -> Header {
        Header {
            op,
            status: 0,
            id: 0,
            key: 0,
            addr: 0,
            len: 0,
            count: 0,
        }
    }

    /// Bytes of segment table (with its CRC) that follow this header.
    pub fn table_len(&self) -> usize {
        if matches!(self.op, FrameOp::Write | FrameOp::Read) && self.count > 1 {
            self.count as usize * SEGMENT_LEN + 4
        } else {
            0
        }
    }
}

/// Encodes `h` with its checksum.
pub fn encode_header(h: &Header) -> [u8; HEADER_LEN] {
    let mut b = [0u8; HEADER_LEN];
    b[0..2].copy_from_slice(&MAGIC.to_le_bytes());
    b[2] = h.op.version();
    b[3] = h.op as u8;
    b[4..8].copy_from_slice(&h.status.to_le_bytes());
    b[8..16].copy_from_slice(&h.id.to_le_bytes());
    b[16..24].copy_from_slice(&h.key.to_le_bytes());
    b[24..32].copy_from_slice(&h.addr.to_le_bytes());
    b[32..40].copy_from_slice(&h.len.to_le_bytes());
    b[40..44].copy_from_slice(&h.count.to_le_bytes());
    let crc = crc32c::crc32c(&b[..44]);
    b[44..48].copy_from_slice(&crc.to_le_bytes());
    b
}

fn bad(why: impl Into<String>) -> Error {
    Error::InvalidMetadata(why.into())
}

/// Decodes and checks a frame header: magic, version, checksum, a known op, and
/// lengths and counts within the protocol's limits for that op.
pub fn decode_header(buf: &[u8]) -> Result<Header> {
    let mut r = Reader::new(buf);
    let head = r.take(HEADER_LEN)?;
    let mut r = Reader::new(head);
    let magic = r.u16()?;
    if magic != MAGIC {
        return Err(bad(format!("frame magic {magic:#06x}, want {MAGIC:#06x}")));
    }
    let version = r.u8()?;
    if version != VERSION && version != VERSION_REVOKE {
        return Err(bad(format!(
            "frame version {version}, this side speaks {VERSION} and {VERSION_REVOKE}"
        )));
    }
    let op_byte = r.u8()?;
    let status = r.u32()?;
    let id = r.u64()?;
    let key = r.u64()?;
    let addr = r.u64()?;
    let len = r.u64()?;
    let count = r.u32()?;
    let crc = r.u32()?;
    let want = crc32c::crc32c(&head[..44]);
    if crc != want {
        return Err(bad(format!(
            "frame header checksum {crc:#010x}, computed {want:#010x}"
        )));
    }
    let op = FrameOp::from_u8(op_byte).ok_or_else(|| bad(format!("unknown frame op {op_byte}")))?;
    if version != op.version() {
        return Err(bad(format!(
            "{op:?} frame of version {version}, want {}",
            op.version()
        )));
    }
    let h = Header {
        op,
        status,
        id,
        key,
        addr,
        len,
        count,
    };
    let limit = match op {
        FrameOp::Write | FrameOp::Read => {
            if count == 0 || count > MAX_SEGMENTS {
                return Err(bad(format!(
                    "{op:?} frame names {count} segments (1..={MAX_SEGMENTS})"
                )));
            }
            if len == 0 {
                return Err(bad(format!("{op:?} frame of zero bytes")));
            }
            MAX_FRAME_BYTES
        }
        FrameOp::Data => MAX_FRAME_BYTES,
        FrameOp::Hello => MAX_NAME,
        FrameOp::Error => MAX_ERROR_MESSAGE,
        FrameOp::Notify => MAX_NOTIFY,
        FrameOp::HelloAck | FrameOp::Ack | FrameOp::Revoke | FrameOp::RevokeAck => 0,
    };
    if len > limit {
        return Err(bad(format!("{op:?} frame of {len} bytes exceeds {limit}")));
    }
    if !matches!(op, FrameOp::Write | FrameOp::Read) && count != 0 {
        return Err(bad(format!("{op:?} frame with a segment count")));
    }
    Ok(h)
}

/// One target range of a WRITE/READ. `Copy`, `Send + Sync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct WireSegment {
    /// Remote key of the registration the range lies in.
    pub key: u64,
    /// Target virtual address.
    pub addr: u64,
    /// Length in bytes (> 0).
    pub len: u64,
}

/// Appends the segment table for `segs` (entries, then their CRC32C) to `out`.
pub fn encode_segments(segs: &[WireSegment], out: &mut Vec<u8>) {
    let start = out.len();
    for s in segs {
        out.extend_from_slice(&s.key.to_le_bytes());
        out.extend_from_slice(&s.addr.to_le_bytes());
        out.extend_from_slice(&s.len.to_le_bytes());
    }
    let crc = crc32c::crc32c(&out[start..]);
    out.extend_from_slice(&crc.to_le_bytes());
}

/// Decodes the segment table of `h` from `table` (exactly [`Header::table_len`] bytes)
/// into `out` (cleared first); for `count == 1` the header's own segment is used.
/// Checks the CRC, that no segment is empty, and that the lengths add up to `h.len`.
pub fn decode_segments(h: &Header, table: &[u8], out: &mut Vec<WireSegment>) -> Result<()> {
    out.clear();
    if h.count <= 1 {
        if !table.is_empty() {
            return Err(bad("single-segment frame with a segment table"));
        }
        out.push(WireSegment {
            key: h.key,
            addr: h.addr,
            len: h.len,
        });
        return Ok(());
    }
    if table.len() != h.table_len() {
        return Err(bad(format!(
            "segment table of {} bytes, header says {}",
            table.len(),
            h.table_len()
        )));
    }
    let (entries, crc) = table.split_at(table.len() - 4);
    let mut r = Reader::new(crc);
    let crc = r.u32()?;
    let want = crc32c::crc32c(entries);
    if crc != want {
        return Err(bad(format!(
            "segment table checksum {crc:#010x}, computed {want:#010x}"
        )));
    }
    let mut r = Reader::new(entries);
    let mut total = 0u64;
    for _ in 0..h.count {
        let s = WireSegment {
            key: r.u64()?,
            addr: r.u64()?,
            len: r.u64()?,
        };
        if s.len == 0 {
            return Err(bad("empty segment in a segment table"));
        }
        total = total
            .checked_add(s.len)
            .ok_or_else(|| bad("segment lengths overflow"))?;
        out.push(s);
    }
    if total != h.len {
        return Err(bad(format!(
            "segments add up to {total} bytes, header says {}",
            h.len
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn header_round_trip_and_corruption() {
        let h = Header {
            op: FrameOp::Read,
            status: 0,
            id: 42,
            key: 0xdead_beef,
            addr: 0x7f00_0000_1000,
            len: 1 << 20,
            count: 3,
        };
        let b = encode_header(&h);
        assert_eq!(decode_header(&b).unwrap(), h);
        for i in 0..HEADER_LEN {
            let mut c = b;
            c[i] ^= 0x10;
            assert!(
                matches!(decode_header(&c), Err(Error::InvalidMetadata(_))),
                "byte {i}"
            );
        }
        assert!(decode_header(&b[..47]).is_err());
        let big = Header {
            len: MAX_FRAME_BYTES + 1,
            ..h
        };
        assert!(decode_header(&encode_header(&big)).is_err());
        let notify_with_count = Header {
            op: FrameOp::Notify,
            ..h
        };
        assert!(decode_header(&encode_header(&notify_with_count)).is_err());
    }

    #[test]
    fn revoke_frames_are_version_2_only() {
        for op in [FrameOp::Revoke, FrameOp::RevokeAck] {
            let h = Header {
                id: 3,
                key: 0xfeed,
                ..Header::new(op)
            };
            let b = encode_header(&h);
            assert_eq!(b[2], VERSION_REVOKE);
            assert_eq!(decode_header(&b).unwrap(), h);
            // The same op claimed as version 1, or with a payload, is refused.
            let mut v1 = b;
            v1[2] = VERSION;
            let crc = crc32c::crc32c(&v1[..44]);
            v1[44..48].copy_from_slice(&crc.to_le_bytes());
            assert!(matches!(decode_header(&v1), Err(Error::InvalidMetadata(_))));
            let long = Header { len: 1, ..h };
            assert!(matches!(
                decode_header(&encode_header(&long)),
                Err(Error::InvalidMetadata(_))
            ));
        }
        // Version-1 ops stay version 1 on the wire (a version-1 peer understands them).
        let w = encode_header(&Header {
            count: 1,
            len: 1,
            ..Header::new(FrameOp::Write)
        });
        assert_eq!(w[2], VERSION);
        let mut v2 = w;
        v2[2] = VERSION_REVOKE;
        let crc = crc32c::crc32c(&v2[..44]);
        v2[44..48].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(decode_header(&v2), Err(Error::InvalidMetadata(_))));
    }

    #[test]
    fn segment_table_round_trip() {
        let segs = [
            WireSegment {
                key: 1,
                addr: 100,
                len: 10,
            },
            WireSegment {
                key: 2,
                addr: 300,
                len: 20,
            },
        ];
        let h = Header {
            count: 2,
            len: 30,
            ..Header::new(FrameOp::Write)
        };
        let mut t = Vec::new();
        encode_segments(&segs, &mut t);
        let mut out = Vec::new();
        decode_segments(&h, &t, &mut out).unwrap();
        assert_eq!(out, segs);
        let wrong_len = Header { len: 31, ..h };
        assert!(decode_segments(&wrong_len, &t, &mut out).is_err());
        t[3] ^= 1;
        assert!(decode_segments(&h, &t, &mut out).is_err());
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(v in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_header(&v);
            let _ = ConnectionInfo::decode(&v);
            let _ = RemoteKey::decode(&v);
            if let Ok(h) = decode_header(&v) {
                let mut out = Vec::new();
                let _ = decode_segments(&h, &v[HEADER_LEN.min(v.len())..], &mut out);
            }
        }

        #[test]
        fn valid_headers_with_random_fields(op in 0u8..=12, version in 0u8..=3, status: u32, id: u64, key: u64, addr: u64, len: u64, count: u32, flip in 0usize..HEADER_LEN) {
            let mut b = [0u8; HEADER_LEN];
            b[0..2].copy_from_slice(&MAGIC.to_le_bytes());
            b[2] = version;
            b[3] = op;
            b[4..8].copy_from_slice(&status.to_le_bytes());
            b[8..16].copy_from_slice(&id.to_le_bytes());
            b[16..24].copy_from_slice(&key.to_le_bytes());
            b[24..32].copy_from_slice(&addr.to_le_bytes());
            b[32..40].copy_from_slice(&len.to_le_bytes());
            b[40..44].copy_from_slice(&count.to_le_bytes());
            let crc = crc32c::crc32c(&b[..44]);
            b[44..48].copy_from_slice(&crc.to_le_bytes());
            match decode_header(&b) {
                Err(e) => prop_assert!(matches!(e, Error::InvalidMetadata(_)), "{e:?}"),
                Ok(h) => {
                    // Each op has exactly one version; REVOKE/REVOKE_ACK only in 2.
                    prop_assert_eq!(version, h.op.version());
                    prop_assert!(matches!(h.op, FrameOp::Revoke | FrameOp::RevokeAck) == (version == VERSION_REVOKE));
                    prop_assert!((1..=10).contains(&op));
                }
            }
            if let Ok(h) = decode_header(&b) {
                prop_assert_eq!(encode_header(&h), b);
                let mut out = Vec::new();
                let table = vec![0u8; h.table_len().min(4096)];
                let _ = decode_segments(&h, &table, &mut out);
            }
            b[flip] ^= 0x80;
            prop_assert!(decode_header(&b).is_err());
        }
    }
}
