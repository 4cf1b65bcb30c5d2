//! The blobs and message headers this backend puts on the wire: connection info, remote
//! keys, and the headers of its active messages (operations, answers, notifications,
//! authentication).
//!
//! UCX parses worker addresses without validating them, so connection info is wrapped
//! in a small envelope (magic, version, lengths, CRC32C) that is checked before any byte
//! reaches UCX; remote keys carry the same envelope. A malformed blob or header is
//! `Error::InvalidMetadata`, never a crash. Message headers that a session
//! authenticates end with a 16-byte tag ([`TAG_LEN`]) over everything before it (see
//! `crate::session`). All integers are little-endian.

use kv_core::auth::TAG_LEN;
use kv_core::codec::Reader;
use kv_core::{Access, Descriptor, Error, Result};

const INFO_MAGIC: &[u8; 4] = b"KVUI";
const KEY_MAGIC: &[u8; 4] = b"KVUK";
const NOTE_MAGIC: &[u8; 4] = b"KVUN";
const OP_MAGIC: &[u8; 4] = b"KVUO";
const ANSWER_MAGIC: &[u8; 4] = b"KVUR";
const AUTH_MAGIC: &[u8; 4] = b"KVUH";
/// Version of the active-message headers: 2 is the authenticated operation protocol
/// (every WRITE and READ an active message the target checks).
const MSG_VERSION: u8 = 2;
/// Version of [`RemoteKey`]: 3 dropped UCX's packed rkey (peers never address our
/// memory through UCX's RMA) and made the key id 128 random bits with the access.
const KEY_VERSION: u8 = 3;
/// Version of [`ConnInfo`]: 3 is the authenticated operation protocol (a version-2 peer
/// speaks UCX RMA and is refused as `InvalidMetadata`); 4 added mapped operations
/// ([`MapSrc`]), which a version-3 target would drop.
const INFO_VERSION: u8 = 4;
/// Longest agent name carried in connection info and notification headers.
pub const MAX_NAME: usize = 255;
/// Most descriptors one operation message carries.
pub const MAX_ENTRIES: usize = 128;
/// Bytes of the fixed part of an [`OpHeader`] (before its entries).
const OP_FIXED: usize = 48;
/// Bytes of one [`OpEntry`].
const ENTRY_LEN: usize = 32;
/// Bytes of one [`OpEntry`] of a mapped operation (its local address added).
const MAPPED_ENTRY_LEN: usize = 40;
/// Bytes of a [`MapSrc`] before its packed key.
const SRC_FIXED: usize = 32;
/// Longest packed UCX remote key a [`MapSrc`] carries.
pub const MAX_PACKED_RKEY: usize = 1024;
/// Encoded size of an [`Answer`].
pub const ANSWER_LEN: usize = 48 + TAG_LEN;

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

/// A registration's remote key: the range it covers, its random id and its access.
/// Nothing in it lets a peer address the memory without the owner's checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteKey {
    /// The registered range on the peer.
    pub range: Descriptor,
    /// 128 random bits naming the registration; every operation names it and the
    /// owner checks it against its live registrations.
    pub key_id: u128,
    /// Whether peers may WRITE it (the owner enforces it; the importer refuses early).
    pub access: Access,
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

fn u128_of(r: &mut Reader<'_>) -> Result<u128> {
    let lo = r.u64()?;
    let hi = r.u64()?;
    Ok(u128::from(lo) | (u128::from(hi) << 64))
}

fn put_u128(v: &mut Vec<u8>, x: u128) {
    v.extend_from_slice(&(x as u64).to_le_bytes());
    v.extend_from_slice(&((x >> 64) as u64).to_le_bytes());
}

/// The tag at the end of `buf` and everything before it, or `None` when `buf` is
/// shorter than a tag.
pub fn split_tag(buf: &[u8]) -> Option<(&[u8], &[u8])> {
    buf.len().checked_sub(TAG_LEN).map(|n| buf.split_at(n))
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
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(48);
        v.extend_from_slice(KEY_MAGIC);
        v.push(KEY_VERSION);
        put_u128(&mut v, self.key_id);
        v.extend_from_slice(&self.range.addr.to_le_bytes());
        v.extend_from_slice(&self.range.len.to_le_bytes());
        v.extend_from_slice(&self.range.device.to_le_bytes());
        v.push(self.access.as_u8());
        seal(v)
    }

    /// Parses and checks a key produced by [`RemoteKey::encode`].
    pub fn decode(buf: &[u8]) -> Result<RemoteKey> {
        let body = unseal(buf, "remote key")?;
        let mut r = Reader::named(body, "ucx remote key");
        r.expect_header(KEY_MAGIC, KEY_VERSION)?;
        let key_id = u128_of(&mut r)?;
        let range = Descriptor::new(r.u64()?, r.u64()?, r.u32()?);
        let access = Access::from_u8(r.u8()?)
            .ok_or_else(|| Error::invalid_metadata("ucx remote key: unknown access"))?;
        r.finish()?;
        if range.len == 0 || range.end().is_none() || key_id == 0 {
            return Err(Error::invalid_metadata(
                "ucx remote key: empty or overflowing range, or no key id",
            ));
        }
        Ok(RemoteKey {
            range,
            key_id,
            access,
        })
    }
}

/// What an operation asks of the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum OpKind {
    /// Land the message's data in the entries' ranges.
    Write = 1,
    /// Send the entries' ranges back in an [`Answer`].
    Read = 2,
}

/// One range of a target registration that an operation names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpEntry {
    /// The registration ([`RemoteKey::key_id`]).
    pub key_id: u128,
    /// Offset in it.
    pub offset: u64,
    /// Length (never 0).
    pub len: u64,
    /// Mapped operations only: where the initiator's piece starts in its own memory
    /// (inside the operation's [`MapSrc`]); 0 otherwise.
    pub local: u64,
}

/// The initiator's memory a *mapped* operation names: memory UCX allocated for it
/// (`alloc_host`), which a target on the same host maps from the packed remote key and
/// copies to or from itself — one copy, no data in the message. Only the target writes
/// its own memory; see the README, "Mapped operations".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapSrc {
    /// Random id of that allocation (with the initiator's instance, the target's cache
    /// key: a new allocation never reuses a stale mapping).
    pub id: u64,
    /// Where the allocation starts in the initiator.
    pub base: u64,
    /// Its length.
    pub len: u64,
    /// `ucp_rkey_pack` of its memory handle.
    pub rkey: bytes::Bytes,
}

/// The header of an operation (a WRITE with its data, or a READ request): who asks
/// (instance, operation number), under which session and sequence number, which
/// ranges; the tag authenticates all of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpHeader {
    /// WRITE or READ.
    pub kind: OpKind,
    /// READ only: answer with rendezvous (one entry, received straight into place).
    pub rndv_reply: bool,
    /// The initiator's backend instance (echoed in the answer).
    pub instance: u64,
    /// The initiator's operation number (echoed in the answer).
    pub op: u64,
    /// The target's session id (0: unauthenticated).
    pub session: u64,
    /// The initiator's sequence number in that session.
    pub seq: u64,
    /// The ranges, in data order.
    pub entries: Vec<OpEntry>,
    /// A mapped operation: the initiator's memory its entries' `local` lie in (no data
    /// travels: the target copies through the mapping).
    pub src: Option<MapSrc>,
}

impl OpHeader {
    /// Encoded size with `n` entries (tag included).
    pub fn encoded_len(n: usize) -> usize {
        OP_FIXED + n * ENTRY_LEN + TAG_LEN
    }

    /// Encoded size of a mapped operation with `n` entries and a packed key of
    /// `rkey_len` bytes (tag included).
    pub fn encoded_len_mapped(n: usize, rkey_len: usize) -> usize {
        OP_FIXED + SRC_FIXED + rkey_len + n * MAPPED_ENTRY_LEN + TAG_LEN
    }

    /// Serialises the header with a zero tag (the session fills it).
    pub fn encode(&self) -> Vec<u8> {
        let n = self.entries.len();
        let mut v = Vec::with_capacity(match &self.src {
            Some(src) => Self::encoded_len_mapped(n, src.rkey.len()),
            None => Self::encoded_len(n),
        });
        v.extend_from_slice(OP_MAGIC);
        v.push(MSG_VERSION);
        v.push(self.kind as u8);
        v.push(u8::from(self.rndv_reply));
        v.push(u8::from(self.src.is_some()));
        for x in [self.instance, self.op, self.session, self.seq] {
            v.extend_from_slice(&x.to_le_bytes());
        }
        // At most MAX_ENTRIES (checked by the sender and by decode).
        v.extend_from_slice(&(n as u16).to_le_bytes());
        v.extend_from_slice(&[0u8; 6]);
        if let Some(src) = &self.src {
            for x in [src.id, src.base, src.len] {
                v.extend_from_slice(&x.to_le_bytes());
            }
            // At most MAX_PACKED_RKEY (checked by the sender and by decode).
            v.extend_from_slice(&(src.rkey.len() as u64).to_le_bytes());
            v.extend_from_slice(&src.rkey);
        }
        for e in &self.entries {
            put_u128(&mut v, e.key_id);
            v.extend_from_slice(&e.offset.to_le_bytes());
            v.extend_from_slice(&e.len.to_le_bytes());
            if self.src.is_some() {
                v.extend_from_slice(&e.local.to_le_bytes());
            }
        }
        v.extend_from_slice(&[0u8; TAG_LEN]);
        v
    }

    /// Parses a header produced by [`OpHeader::encode`] (tag not checked here).
    pub fn decode(buf: &[u8]) -> Result<OpHeader> {
        let mut r = Reader::named(buf, "ucx operation header");
        r.expect_header(OP_MAGIC, MSG_VERSION)?;
        let kind = match r.u8()? {
            1 => OpKind::Write,
            2 => OpKind::Read,
            _ => return Err(Error::invalid_metadata("ucx operation: unknown kind")),
        };
        let rndv_reply = r.u8()? != 0;
        let mapped = match r.u8()? {
            0 => false,
            1 => true,
            _ => return Err(Error::invalid_metadata("ucx operation: unknown flags")),
        };
        let (instance, op, session, seq) = (r.u64()?, r.u64()?, r.u64()?, r.u64()?);
        let n = r.u16()? as usize;
        r.take(6)?;
        let src = if mapped {
            let (id, base, len, klen) = (r.u64()?, r.u64()?, r.u64()?, r.u64()?);
            if klen == 0 || klen > MAX_PACKED_RKEY as u64 {
                return Err(Error::invalid_metadata(format!(
                    "ucx operation: packed key of {klen} bytes"
                )));
            }
            let rkey = bytes::Bytes::copy_from_slice(r.take(klen as usize)?);
            Some(MapSrc {
                id,
                base,
                len,
                rkey,
            })
        } else {
            None
        };
        let entry_len = if mapped { MAPPED_ENTRY_LEN } else { ENTRY_LEN };
        if n == 0 || n > MAX_ENTRIES || r.buf.len() != n * entry_len + TAG_LEN {
            return Err(Error::invalid_metadata(format!(
                "ucx operation: {n} entries in {} bytes",
                buf.len()
            )));
        }
        let mut entries = Vec::with_capacity(n);
        for _ in 0..n {
            entries.push(OpEntry {
                key_id: u128_of(&mut r)?,
                offset: r.u64()?,
                len: r.u64()?,
                local: if mapped { r.u64()? } else { 0 },
            });
        }
        r.take(TAG_LEN)?;
        r.finish()?;
        Ok(OpHeader {
            kind,
            rndv_reply,
            instance,
            op,
            session,
            seq,
            entries,
            src,
        })
    }
}

/// Outcome of an operation, as the target reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum AckCode {
    /// WRITE: the data is in place; READ: the data follows.
    Ok = 0,
    /// No live registration with that key id (never was, or deregistered).
    NotRegistered = 1,
    /// A range is not inside its registration.
    OutOfBounds = 2,
    /// The header disagrees with itself or with the data.
    InvalidMetadata = 3,
    /// The target's UCX failed to move the data.
    Failed = 4,
    /// A WRITE into a read-only registration.
    AccessDenied = 5,
    /// The operation was not authenticated by a session the target knows.
    Unauthenticated = 6,
    /// A mapped operation whose memory the target could not (or may not) map; the
    /// initiator copies through messages from then on.
    Unmapped = 7,
}

impl AckCode {
    fn from_u8(b: u8) -> Option<AckCode> {
        Some(match b {
            0 => AckCode::Ok,
            1 => AckCode::NotRegistered,
            2 => AckCode::OutOfBounds,
            3 => AckCode::InvalidMetadata,
            4 => AckCode::Failed,
            5 => AckCode::AccessDenied,
            6 => AckCode::Unauthenticated,
            7 => AckCode::Unmapped,
            _ => return None,
        })
    }
}

/// The target's answer to an [`OpHeader`] (for a READ answered `Ok`, the data follows
/// as the message's data).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    /// What happened.
    pub code: AckCode,
    /// The initiator's instance, from the header.
    pub instance: u64,
    /// The initiator's operation number, from the header.
    pub op: u64,
    /// The session (0: unauthenticated or refused before a session was found).
    pub session: u64,
    /// The target's sequence number in that session.
    pub seq: u64,
    /// Bytes of data that follow (READ).
    pub len: u64,
}

impl Answer {
    /// Serialises the answer with a zero tag (the session fills it).
    pub fn encode(&self) -> [u8; ANSWER_LEN] {
        let mut v = [0u8; ANSWER_LEN];
        v[..4].copy_from_slice(ANSWER_MAGIC);
        v[4] = MSG_VERSION;
        v[5] = self.code as u8;
        for (i, x) in [self.instance, self.op, self.session, self.seq, self.len]
            .into_iter()
            .enumerate()
        {
            v[8 + 8 * i..16 + 8 * i].copy_from_slice(&x.to_le_bytes());
        }
        v
    }

    /// Parses an answer produced by [`Answer::encode`] (tag not checked here).
    pub fn decode(buf: &[u8]) -> Result<Answer> {
        let mut r = Reader::named(buf, "ucx answer");
        r.expect_header(ANSWER_MAGIC, MSG_VERSION)?;
        let code = AckCode::from_u8(r.u8()?)
            .ok_or_else(|| Error::invalid_metadata("ucx answer: unknown code"))?;
        r.take(2)?;
        let a = Answer {
            code,
            instance: r.u64()?,
            op: r.u64()?,
            session: r.u64()?,
            seq: r.u64()?,
            len: r.u64()?,
        };
        r.take(TAG_LEN)?;
        r.finish()?;
        Ok(a)
    }
}

/// The header of a notification active message; the tag covers it and the payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoteHeader {
    /// Sender's backend instance.
    pub instance: u64,
    /// Sender's endpoint id (notification numbers count per endpoint).
    pub endpoint: u64,
    /// Notification number on that endpoint, from 0 (the receiver reorders by it).
    pub number: u64,
    /// The receiver's session id (0: unauthenticated).
    pub session: u64,
    /// The sender's sequence number in that session.
    pub seq: u64,
    /// Sender's agent name.
    pub name: String,
}

impl NoteHeader {
    /// Serialises the header with a zero tag.
    pub fn encode(&self) -> Result<Vec<u8>> {
        check_name(&self.name)?;
        let mut v = Vec::with_capacity(48 + self.name.len() + TAG_LEN);
        v.extend_from_slice(NOTE_MAGIC);
        v.push(MSG_VERSION);
        v.extend_from_slice(&(self.name.len() as u16).to_le_bytes());
        for x in [
            self.instance,
            self.endpoint,
            self.number,
            self.session,
            self.seq,
        ] {
            v.extend_from_slice(&x.to_le_bytes());
        }
        v.extend_from_slice(self.name.as_bytes());
        v.extend_from_slice(&[0u8; TAG_LEN]);
        Ok(v)
    }

    /// Parses a header produced by [`NoteHeader::encode`] (tag not checked here).
    pub fn decode(buf: &[u8]) -> Result<NoteHeader> {
        let mut r = Reader::named(buf, "ucx notification header");
        r.expect_header(NOTE_MAGIC, MSG_VERSION)?;
        let name_len = r.u16()? as usize;
        if name_len > MAX_NAME {
            return Err(Error::invalid_metadata("ucx notification: name too long"));
        }
        let h = NoteHeader {
            instance: r.u64()?,
            endpoint: r.u64()?,
            number: r.u64()?,
            session: r.u64()?,
            seq: r.u64()?,
            name: r.utf8(name_len)?,
        };
        r.take(TAG_LEN)?;
        r.finish()?;
        Ok(h)
    }
}

/// The steps of the authentication handshake (see `crate::session`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum AuthKind {
    /// Client → server: please challenge me (no body).
    Hello = 1,
    /// Server → client: `kv_core::auth::ServerHello`.
    Challenge = 2,
    /// Client → server: `kv_core::auth::ClientHello`.
    Response = 3,
    /// Server → client: `kv_core::auth::ServerProof` and the session id.
    Proof = 4,
    /// Server → client: refused (no secret, wrong secret, too many sessions).
    Refuse = 5,
}

/// An authentication message: which client endpoint it concerns, the server's
/// handshake and session ids, and the handshake message itself (`body`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthMsg {
    /// The step.
    pub kind: AuthKind,
    /// The client's backend instance.
    pub instance: u64,
    /// The client's endpoint id.
    pub endpoint: u64,
    /// The server's handshake id (0 in `Hello`).
    pub handshake: u64,
    /// The session id (`Proof` only).
    pub session: u64,
    /// The encoded `kv_core::auth` message (empty for `Hello` and `Refuse`).
    pub body: Vec<u8>,
}

impl AuthMsg {
    /// Serialises the message.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(40 + self.body.len());
        v.extend_from_slice(AUTH_MAGIC);
        v.push(MSG_VERSION);
        v.push(self.kind as u8);
        v.extend_from_slice(&[0u8; 2]);
        for x in [self.instance, self.endpoint, self.handshake, self.session] {
            v.extend_from_slice(&x.to_le_bytes());
        }
        v.extend_from_slice(&self.body);
        v
    }

    /// Parses a message produced by [`AuthMsg::encode`]; bodies over
    /// `kv_core::auth::MAX_HANDSHAKE_MESSAGE` are refused.
    pub fn decode(buf: &[u8]) -> Result<AuthMsg> {
        let mut r = Reader::named(buf, "ucx authentication message");
        r.expect_header(AUTH_MAGIC, MSG_VERSION)?;
        let kind = match r.u8()? {
            1 => AuthKind::Hello,
            2 => AuthKind::Challenge,
            3 => AuthKind::Response,
            4 => AuthKind::Proof,
            5 => AuthKind::Refuse,
            _ => return Err(Error::invalid_metadata("ucx authentication: unknown step")),
        };
        r.take(2)?;
        let (instance, endpoint, handshake, session) = (r.u64()?, r.u64()?, r.u64()?, r.u64()?);
        if r.buf.len() > kv_core::auth::MAX_HANDSHAKE_MESSAGE {
            return Err(Error::invalid_metadata("ucx authentication: body too long"));
        }
        Ok(AuthMsg {
            kind,
            instance,
            endpoint,
            handshake,
            session,
            body: r.buf.to_vec(),
        })
    }
}

#[cfg(test)]
mod tests;
