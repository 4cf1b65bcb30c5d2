//! The framed protocol between two TCP backends, and the blobs they exchange.
//!
//! A connection starts with an 8-byte [`Preamble`] from the client (which channel it
//! opens and whether it holds a cluster secret) answered by an 8-byte [`Answer`]; with a
//! secret on both sides the `kv_core::auth` handshake follows (purpose
//! [`PURPOSE_DATA`] or [`PURPOSE_CONTROL`]), then HELLO / HELLO_ACK. Every frame after
//! that starts with a fixed 56-byte little-endian [`Header`] whose last four bytes are
//! the CRC32C of the first 52, then its body ([`body_len`]: a WRITE/READ segment table,
//! a name, message, notification or import answer), then — on authenticated
//! connections — a [`TAG_LEN`]-byte tag (`SessionKey::tag` over header and body, with
//! the frame's sequence number in that direction), then the bulk payload of a WRITE or
//! DATA frame ([`payload_len`]), which the tag does not cover (see the crate README,
//! "Trust").
//!
//! A WRITE or READ request names its target either in the header itself (one segment:
//! `key`, `addr`, `len`) or, for `count > 1`, in a segment table (`count` × 32 bytes,
//! then the table's CRC32C). Every WRITE is answered by ACK or ERROR, every READ by
//! DATA or ERROR. On the control connection of a same-host importer (HELLO flag
//! [`HELLO_SAME_HOST_CONTROL`], over the Unix socket) the importer validates each
//! import live (IMPORT → IMPORT_ACK or ERROR, which also subscribes it to REVOKE), the
//! target sends REVOKE when it deregisters a registration and the importer answers
//! REVOKE_ACK once it no longer touches it; BYE says the importer holds nothing any
//! more. Decoders take untrusted bytes and fail with [`Error::InvalidMetadata`], never
//! panic (see the proptests in this module and the `fuzz` crate).
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
    ConnectionInfo, RemoteKey, SharedKey, KEY_FLAG_READ_ONLY, KEY_FLAG_SHARED, KEY_VERSION,
    MAX_NAME,
};

/// Size of every frame header.
pub const HEADER_LEN: usize = 56;
/// Size of one segment table entry (key, addr, len).
pub const SEGMENT_LEN: usize = 32;
/// First two bytes of every frame ("KX").
pub const MAGIC: u16 = 0x584b;
/// Protocol version of every frame and preamble; a peer speaking another is refused.
/// Version 3: 128-bit keys, preamble and authentication, IMPORT and BYE.
pub const VERSION: u8 = 3;
/// Size of the [`Preamble`] and of its [`Answer`].
pub const PREAMBLE_LEN: usize = 8;
/// Length of a frame tag on authenticated connections.
pub const TAG_LEN: usize = kv_core::auth::TAG_LEN;
/// Handshake purpose of data connections (lanes).
pub const PURPOSE_DATA: &[u8] = b"kv-backend-tcp data v3";
/// Handshake purpose of control connections (notifications, imports, revocations).
pub const PURPOSE_CONTROL: &[u8] = b"kv-backend-tcp control v3";
/// HELLO `status` flag: the control connection of a same-host importer — it validates
/// imports with IMPORT and is sent REVOKE when a registration it imported goes.
pub const HELLO_SAME_HOST_CONTROL: u32 = 1;
/// HELLO `status` flag: the importer (HELLO `addr`) holds no import of this target any
/// more; forget its subscriptions (it re-validates what it still wants).
pub const HELLO_RESET: u32 = 2;
/// Most segments one WRITE/READ frame may name.
pub const MAX_SEGMENTS: u32 = 1 << 16;
/// Most payload bytes one WRITE/READ/DATA frame may carry.
pub const MAX_FRAME_BYTES: u64 = 1 << 30;
/// Most bytes of an ERROR frame's message.
pub const MAX_ERROR_MESSAGE: u64 = 4096;
/// Most bytes of a NOTIFY payload the decoder accepts (the backend's own limit is lower).
pub const MAX_NOTIFY: u64 = 16 << 20;
/// Most bytes of an IMPORT_ACK body (an encoded [`RemoteKey`]).
pub const MAX_IMPORT_ACK: u64 = 256;

const PREAMBLE_CLIENT: [u8; 4] = *b"KVXC";
const PREAMBLE_SERVER: [u8; 4] = *b"KVXS";

/// Which channel a connection is. `Copy`, `Send + Sync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChannelKind {
    /// A lane: WRITE/READ requests and their answers.
    Data,
    /// The control connection: notifications and, for same-host importers, imports
    /// and revocations.
    Control,
}

impl ChannelKind {
    /// The handshake purpose string of the channel.
    pub fn purpose(self) -> &'static [u8] {
        match self {
            ChannelKind::Data => PURPOSE_DATA,
            ChannelKind::Control => PURPOSE_CONTROL,
        }
    }
}

/// Client → server, the first bytes of every connection. `Copy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preamble {
    /// The channel opened.
    pub kind: ChannelKind,
    /// The client holds a cluster secret and will authenticate.
    pub auth: bool,
}

/// Server → client, the answer to a [`Preamble`]. `Copy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    /// The server authenticates (it holds a cluster secret).
    pub auth: bool,
    /// The server goes on; false: the two disagree about authentication and the server
    /// closes the connection.
    pub ok: bool,
}

/// Encodes a preamble: "KVXC", version, channel, flags, 0.
pub fn encode_preamble(p: &Preamble) -> [u8; PREAMBLE_LEN] {
    let kind = match p.kind {
        ChannelKind::Data => 1,
        ChannelKind::Control => 2,
    };
    let [a, b, c, d] = PREAMBLE_CLIENT;
    [a, b, c, d, VERSION, kind, u8::from(p.auth), 0]
}

/// Decodes a preamble; anything else (another protocol, another version) is refused.
pub fn decode_preamble(b: &[u8]) -> Result<Preamble> {
    let b = fixed(b, PREAMBLE_CLIENT, "preamble")?;
    let kind = match b[5] {
        1 => ChannelKind::Data,
        2 => ChannelKind::Control,
        k => return Err(bad(format!("preamble names channel {k}"))),
    };
    if b[6] > 1 || b[7] != 0 {
        return Err(bad("preamble with unknown flags"));
    }
    Ok(Preamble {
        kind,
        auth: b[6] == 1,
    })
}

/// Encodes an answer: "KVXS", version, flags, ok, 0.
pub fn encode_answer(a: &Answer) -> [u8; PREAMBLE_LEN] {
    let [w, x, y, z] = PREAMBLE_SERVER;
    [w, x, y, z, VERSION, u8::from(a.auth), u8::from(a.ok), 0]
}

/// Decodes an answer.
pub fn decode_answer(b: &[u8]) -> Result<Answer> {
    let b = fixed(b, PREAMBLE_SERVER, "preamble answer")?;
    if b[5] > 1 || b[6] > 1 || b[7] != 0 {
        return Err(bad("preamble answer with unknown flags"));
    }
    Ok(Answer {
        auth: b[5] == 1,
        ok: b[6] == 1,
    })
}

fn fixed<'a>(b: &'a [u8], magic: [u8; 4], what: &str) -> Result<&'a [u8]> {
    if b.len() != PREAMBLE_LEN || b[..4] != magic {
        return Err(bad(format!("not a kv-backend-tcp {what}")));
    }
    if b[4] != VERSION {
        return Err(bad(format!(
            "{what} of protocol version {}, this side speaks {VERSION}; upgrade both peers",
            b[4]
        )));
    }
    Ok(b)
}

/// What a frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameOp {
    /// First frame of a connection: `len` bytes of the sender's agent name follow;
    /// `key` is the target instance the sender expects, `status` [`HELLO_SAME_HOST_CONTROL`]
    /// and [`HELLO_RESET`] flags, `addr` the importer id (same-host control only).
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
    /// Target → same-host importer: the registration with remote key `key` is being
    /// deregistered; `id` names this revocation.
    Revoke = 9,
    /// Importer → target: revocation `id` is done (new posts to the registration are
    /// refused and no copy into it is in flight).
    RevokeAck = 10,
    /// Importer → target (same-host control): request `id` — is `key` a live
    /// registration containing `addr..addr+len`? Subscribes the importer to its REVOKE.
    Import = 11,
    /// Target → importer: yes for request `id`; `len` bytes follow: the registration's
    /// current [`RemoteKey`] (access, shared-memory export).
    ImportAck = 12,
    /// Importer → target: it holds no import of this target any more (it disconnects).
    Bye = 13,
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
            11 => FrameOp::Import,
            12 => FrameOp::ImportAck,
            13 => FrameOp::Bye,
            _ => return None,
        })
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
    /// A WRITE into a read-only registration.
    AccessDenied = 4,
    /// The peer failed authentication.
    Unauthenticated = 5,
}

impl ErrorCode {
    /// The code for a target-side error.
    pub fn of(e: &Error) -> ErrorCode {
        match e {
            Error::OutOfBounds(_) => ErrorCode::OutOfBounds,
            Error::NotRegistered(_) => ErrorCode::NotRegistered,
            Error::AccessDenied(_) => ErrorCode::AccessDenied,
            Error::Unauthenticated(_) => ErrorCode::Unauthenticated,
            _ => ErrorCode::Refused,
        }
    }

    /// The error an initiator reports for an ERROR frame with `status` and `message`.
    pub fn to_error(status: u32, message: &str) -> Error {
        let msg = format!("refused by the target: {message}");
        match status {
            1 => Error::OutOfBounds(msg),
            2 => Error::NotRegistered(msg),
            4 => Error::AccessDenied(msg),
            5 => Error::Unauthenticated(msg),
            _ => Error::invalid_argument(msg),
        }
    }
}

/// A decoded frame header. `Copy`, `Send + Sync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Header {
    /// What the frame is.
    pub op: FrameOp,
    /// Status code (ERROR), flags (HELLO), access (IMPORT_ACK); 0 otherwise.
    pub status: u32,
    /// The request (transfer, import, revocation) id an answer refers to.
    pub id: u64,
    /// Remote key of the single segment (`count == 1`), of an IMPORT or REVOKE, or the
    /// instance (HELLO, HELLO_ACK); else 0.
    pub key: u128,
    /// Target address of the single segment (`count == 1`) or IMPORT, else 0.
    pub addr: u64,
    /// Payload bytes (WRITE, DATA, NOTIFY, HELLO, ERROR, IMPORT_ACK) or bytes asked for
    /// (READ, IMPORT).
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

/// Bytes between the header and the tag (covered by the tag): the segment table of a
/// WRITE/READ, the body of HELLO, ERROR, NOTIFY and IMPORT_ACK; 0 for the others.
pub fn body_len(h: &Header) -> usize {
    match h.op {
        FrameOp::Write | FrameOp::Read => h.table_len(),
        // Bounded by decode_header's per-op limits (≤ MAX_NOTIFY).
        FrameOp::Hello | FrameOp::Error | FrameOp::Notify | FrameOp::ImportAck => h.len as usize,
        _ => 0,
    }
}

/// Bulk bytes after the tag (not covered by it): the payload of WRITE and DATA.
pub fn payload_len(h: &Header) -> u64 {
    match h.op {
        FrameOp::Write | FrameOp::Data => h.len,
        _ => 0,
    }
}

/// Encodes `h` with its checksum.
pub fn encode_header(h: &Header) -> [u8; HEADER_LEN] {
    let mut b = [0u8; HEADER_LEN];
    b[0..2].copy_from_slice(&MAGIC.to_le_bytes());
    b[2] = VERSION;
    b[3] = h.op as u8;
    b[4..8].copy_from_slice(&h.status.to_le_bytes());
    b[8..16].copy_from_slice(&h.id.to_le_bytes());
    b[16..32].copy_from_slice(&h.key.to_le_bytes());
    b[32..40].copy_from_slice(&h.addr.to_le_bytes());
    b[40..48].copy_from_slice(&h.len.to_le_bytes());
    b[48..52].copy_from_slice(&h.count.to_le_bytes());
    let crc = crc32c::crc32c(&b[..52]);
    b[52..56].copy_from_slice(&crc.to_le_bytes());
    b
}

fn bad(why: impl Into<String>) -> Error {
    Error::InvalidMetadata(why.into())
}

fn u128_at(r: &mut Reader<'_>) -> Result<u128> {
    let b = r.take(16)?;
    let mut a = [0u8; 16];
    a.copy_from_slice(b);
    Ok(u128::from_le_bytes(a))
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
    if version != VERSION {
        return Err(bad(format!(
            "frame version {version}, this side speaks {VERSION}; upgrade both peers"
        )));
    }
    let op_byte = r.u8()?;
    let status = r.u32()?;
    let id = r.u64()?;
    let key = u128_at(&mut r)?;
    let addr = r.u64()?;
    let len = r.u64()?;
    let count = r.u32()?;
    let crc = r.u32()?;
    let want = crc32c::crc32c(&head[..52]);
    if crc != want {
        return Err(bad(format!(
            "frame header checksum {crc:#010x}, computed {want:#010x}"
        )));
    }
    let op = FrameOp::from_u8(op_byte).ok_or_else(|| bad(format!("unknown frame op {op_byte}")))?;
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
        FrameOp::Import => {
            if len == 0 {
                return Err(bad("IMPORT of zero bytes"));
            }
            u64::MAX
        }
        FrameOp::Data => MAX_FRAME_BYTES,
        FrameOp::Hello => MAX_NAME,
        FrameOp::Error => MAX_ERROR_MESSAGE,
        FrameOp::Notify => MAX_NOTIFY,
        FrameOp::ImportAck => MAX_IMPORT_ACK,
        FrameOp::HelloAck | FrameOp::Ack | FrameOp::Revoke | FrameOp::RevokeAck | FrameOp::Bye => 0,
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
    pub key: u128,
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
            key: u128_at(&mut r)?,
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
            key: 0xdead_beef_0000_0000_0000_0000_1234_5678,
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
        assert!(decode_header(&b[..HEADER_LEN - 1]).is_err());
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
        // An older version (64-bit keys) is refused even with a valid checksum.
        let mut old = b;
        old[2] = 2;
        let crc = crc32c::crc32c(&old[..52]);
        old[52..56].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            decode_header(&old),
            Err(Error::InvalidMetadata(_))
        ));
    }

    #[test]
    fn control_frames_carry_no_payload_but_their_body() {
        for op in [
            FrameOp::Revoke,
            FrameOp::RevokeAck,
            FrameOp::Bye,
            FrameOp::HelloAck,
        ] {
            let h = Header {
                id: 3,
                key: 0xfeed,
                ..Header::new(op)
            };
            assert_eq!(decode_header(&encode_header(&h)).unwrap(), h);
            assert_eq!((body_len(&h), payload_len(&h)), (0, 0));
            let long = Header { len: 1, ..h };
            assert!(matches!(
                decode_header(&encode_header(&long)),
                Err(Error::InvalidMetadata(_))
            ));
        }
        let ack = Header {
            len: MAX_IMPORT_ACK,
            ..Header::new(FrameOp::ImportAck)
        };
        assert_eq!(body_len(&decode_header(&encode_header(&ack)).unwrap()), 256);
        let too_long = Header {
            len: MAX_IMPORT_ACK + 1,
            ..ack
        };
        assert!(decode_header(&encode_header(&too_long)).is_err());
        let import = Header {
            len: 1 << 40,
            ..Header::new(FrameOp::Import)
        };
        assert_eq!(
            body_len(&import),
            0,
            "an IMPORT's len is a range, not a body"
        );
        let w = Header {
            len: 10,
            count: 2,
            ..Header::new(FrameOp::Write)
        };
        assert_eq!((body_len(&w), payload_len(&w)), (2 * SEGMENT_LEN + 4, 10));
    }

    #[test]
    fn preambles_round_trip_and_refuse_others() {
        for kind in [ChannelKind::Data, ChannelKind::Control] {
            for auth in [false, true] {
                let p = Preamble { kind, auth };
                assert_eq!(decode_preamble(&encode_preamble(&p)).unwrap(), p);
                let a = Answer { auth, ok: !auth };
                assert_eq!(decode_answer(&encode_answer(&a)).unwrap(), a);
            }
        }
        let p = encode_preamble(&Preamble {
            kind: ChannelKind::Data,
            auth: true,
        });
        assert!(decode_answer(&p).is_err(), "a preamble is not an answer");
        let mut v2 = p;
        v2[4] = 2;
        assert!(decode_preamble(&v2).is_err());
        assert!(decode_preamble(&encode_header(&Header::new(FrameOp::Hello))[..8]).is_err());
        assert_ne!(PURPOSE_DATA, PURPOSE_CONTROL);
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
                key: u128::MAX,
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
        assert_eq!(t.len(), h.table_len());
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
            let _ = decode_preamble(&v);
            let _ = decode_answer(&v);
            let _ = ConnectionInfo::decode(&v);
            let _ = RemoteKey::decode(&v);
            if let Ok(h) = decode_header(&v) {
                let mut out = Vec::new();
                let _ = decode_segments(&h, &v[HEADER_LEN.min(v.len())..], &mut out);
            }
        }

        #[test]
        fn valid_headers_with_random_fields(op in 0u8..=15, version in 1u8..=4, status: u32, id: u64, key: u128, addr: u64, len: u64, count: u32, flip in 0usize..HEADER_LEN) {
            let mut b = [0u8; HEADER_LEN];
            b[0..2].copy_from_slice(&MAGIC.to_le_bytes());
            b[2] = version;
            b[3] = op;
            b[4..8].copy_from_slice(&status.to_le_bytes());
            b[8..16].copy_from_slice(&id.to_le_bytes());
            b[16..32].copy_from_slice(&key.to_le_bytes());
            b[32..40].copy_from_slice(&addr.to_le_bytes());
            b[40..48].copy_from_slice(&len.to_le_bytes());
            b[48..52].copy_from_slice(&count.to_le_bytes());
            let crc = crc32c::crc32c(&b[..52]);
            b[52..56].copy_from_slice(&crc.to_le_bytes());
            match decode_header(&b) {
                Err(e) => prop_assert!(matches!(e, Error::InvalidMetadata(_)), "{e:?}"),
                Ok(h) => {
                    prop_assert_eq!(version, VERSION);
                    prop_assert!((1..=13).contains(&op));
                    prop_assert!(body_len(&h) as u64 <= MAX_NOTIFY.max(u64::from(MAX_SEGMENTS) * SEGMENT_LEN as u64 + 4));
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
