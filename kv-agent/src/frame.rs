//! Side-channel wire format: the authentication handshake that opens every connection,
//! then frames, each tagged with the session key and a sequence number.
//!
//! The server speaks first. With a cluster secret it sends a `kv_core::auth`
//! `ServerHello` and the client must answer with a `ClientHello` proving the secret
//! before the server reads a single frame header; without one (the explicit
//! unauthenticated mode) it sends an `OPEN` frame. A client that holds a secret refuses
//! an `OPEN` server, and a client without one cannot answer a hello, so a mixed pair
//! fails at once with a message that says which side lacks the secret.
//!
//! Frame: `"KVXS" | op u8 | 3 zero bytes | len u32 LE | payload | tag` where `tag` (16
//! bytes, authenticated sessions only) is `SessionKey::tag(seq, header ‖ payload)`.
//! Each direction numbers its frames from 0; server frames carry the top bit in `seq`,
//! so a frame cannot be replayed, reordered or reflected back to its sender.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use kv_core::auth::{
    self, ClientHandshake, ClientHello, ClusterSecret, ServerHandshake, ServerHello, ServerProof,
    SessionKey, TAG_LEN,
};
use kv_core::{Error, Result};
use parking_lot::Mutex;

pub(crate) const MAGIC: [u8; 4] = *b"KVXS";
pub(crate) const GET: u8 = 1;
pub(crate) const PUT: u8 = 2;
pub(crate) const META: u8 = 0x81;
pub(crate) const OK: u8 = 0x82;
pub(crate) const ERR: u8 = 0x83;
/// Sent first by a server that runs without a cluster secret.
pub(crate) const OPEN: u8 = 0x84;
const HEADER_LEN: usize = 12;
/// What every side-channel handshake MACs, so its transcripts are useless elsewhere.
const PURPOSE: &[u8] = b"kv-agent side channel v1";
/// Marks server-to-client sequence numbers.
const SERVER_SEQ: u64 = 1 << 63;

/// Checks a 12-byte frame header and returns (op, payload length).
pub fn parse_header(h: &[u8]) -> Result<(u8, usize)> {
    if h.len() != HEADER_LEN {
        return Err(Error::invalid_metadata(format!(
            "side-channel header of {} bytes",
            h.len()
        )));
    }
    if h[..4] != MAGIC {
        return Err(Error::invalid_metadata(
            "side-channel frame has a bad magic",
        ));
    }
    if h[5..8] != [0, 0, 0] {
        return Err(Error::invalid_metadata(
            "side-channel frame has non-zero padding",
        ));
    }
    let op = h[4];
    if ![GET, PUT, META, OK, ERR, OPEN].contains(&op) {
        return Err(Error::invalid_metadata(format!(
            "unknown side-channel op {op:#x}"
        )));
    }
    let len = u32::from_le_bytes([h[8], h[9], h[10], h[11]]) as usize;
    if len > kv_core::codec::MAX_METADATA_BYTES {
        return Err(Error::invalid_metadata(format!(
            "side-channel payload of {len} bytes exceeds the limit"
        )));
    }
    Ok((op, len))
}

fn header(op: u8, len: usize) -> Result<[u8; HEADER_LEN]> {
    let len = u32::try_from(len).map_err(|_| Error::invalid_argument("frame too large"))?;
    let mut h = [0u8; HEADER_LEN];
    h[..4].copy_from_slice(&MAGIC);
    h[4] = op;
    h[8..].copy_from_slice(&len.to_le_bytes());
    Ok(h)
}

/// Bytes of frame payloads being received at once, across all connections of one
/// side channel: a frame's length is reserved before its payload is read.
pub(crate) struct Budget {
    used: Mutex<usize>,
    limit: usize,
}

/// A reservation in a [`Budget`], returned on drop.
pub(crate) struct Reserved<'a>(&'a Budget, usize);

impl Budget {
    pub(crate) fn new(limit: usize) -> Budget {
        Budget {
            used: Mutex::new(0),
            limit,
        }
    }

    fn reserve(&self, n: usize) -> Result<Reserved<'_>> {
        let mut used = self.used.lock();
        if used.saturating_add(n) > self.limit {
            return Err(Error::Busy(format!(
                "side channel is receiving {} bytes of metadata already (limit {}); retry",
                *used, self.limit
            )));
        }
        *used += n;
        Ok(Reserved(self, n))
    }
}

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        let mut used = self.0.used.lock();
        *used = used.saturating_sub(self.1);
    }
}

/// One side of a side-channel connection after its handshake.
pub(crate) struct Session {
    key: Option<SessionKey>,
    send_seq: u64,
    recv_seq: u64,
}

impl Session {
    fn new(key: Option<SessionKey>, server: bool) -> Session {
        let (send_seq, recv_seq) = if server {
            (SERVER_SEQ, 0)
        } else {
            (0, SERVER_SEQ)
        };
        Session {
            key,
            send_seq,
            recv_seq,
        }
    }

    /// Whether the peer proved the cluster secret.
    pub(crate) fn authenticated(&self) -> bool {
        self.key.is_some()
    }

    /// Sends one frame (tagged when authenticated).
    pub(crate) fn send(&mut self, s: &mut TcpStream, op: u8, payload: &[u8]) -> Result<()> {
        let buf = self.seal(op, payload)?;
        s.write_all(&buf)
            .map_err(|e| Error::io("side channel write", e))
    }

    /// The bytes of the next frame (tagged when authenticated), as `send` writes them.
    pub(crate) fn seal(&mut self, op: u8, payload: &[u8]) -> Result<Vec<u8>> {
        let mut buf = Vec::with_capacity(HEADER_LEN + payload.len() + TAG_LEN);
        buf.extend_from_slice(&header(op, payload.len())?);
        buf.extend_from_slice(payload);
        if let Some(k) = &self.key {
            let tag = k.tag(self.send_seq, &buf);
            buf.extend_from_slice(&tag);
        }
        self.send_seq += 1;
        Ok(buf)
    }

    /// Receives one frame by `deadline`; its payload is reserved in `budget` (if any)
    /// before it is read, and its tag checked before it is returned.
    pub(crate) fn recv(
        &mut self,
        s: &mut TcpStream,
        deadline: Instant,
        budget: Option<&Budget>,
    ) -> Result<(u8, Vec<u8>)> {
        let mut buf = vec![0u8; HEADER_LEN];
        read_exact_by(s, &mut buf, deadline)?;
        let (op, len) = parse_header(&buf)?;
        let _reserved = budget.map(|b| b.reserve(len)).transpose()?;
        // The buffer grows with the bytes that actually arrive.
        let mut chunk = vec![0u8; (64 << 10).min(len.max(1))];
        while buf.len() < HEADER_LEN + len {
            let want = (HEADER_LEN + len - buf.len()).min(chunk.len());
            read_exact_by(s, &mut chunk[..want], deadline)?;
            buf.extend_from_slice(&chunk[..want]);
        }
        if let Some(k) = &self.key {
            let mut tag = [0u8; TAG_LEN];
            read_exact_by(s, &mut tag, deadline)?;
            k.verify(self.recv_seq, &buf, &tag)?;
        }
        self.recv_seq += 1;
        buf.drain(..HEADER_LEN);
        Ok((op, buf))
    }
}

/// Reads exactly `buf.len()` bytes by an absolute deadline: a peer that trickles bytes
/// cannot hold the reader past it.
pub(crate) fn read_exact_by(
    s: &mut TcpStream,
    mut buf: &mut [u8],
    deadline: Instant,
) -> Result<()> {
    while !buf.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error::TimedOut {
                what: "side-channel read".into(),
                after: Duration::ZERO,
            });
        }
        s.set_read_timeout(Some(left))
            .map_err(|e| Error::io("set timeout", e))?;
        match s.read(buf) {
            Ok(0) => return Err(Error::invalid_metadata("side-channel frame truncated")),
            Ok(n) => buf = &mut buf[n..],
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io("side channel read", e)),
        }
    }
    Ok(())
}

/// Reads one length-prefixed handshake message (at most `auth::MAX_HANDSHAKE_MESSAGE`
/// bytes), given its first four bytes.
fn read_handshake(s: &mut TcpStream, prefix: [u8; 4], deadline: Instant) -> Result<Vec<u8>> {
    let n = auth::message_len(prefix)?;
    let mut v = vec![0u8; n];
    v[..4].copy_from_slice(&prefix);
    read_exact_by(s, &mut v[4..], deadline)?;
    Ok(v)
}

fn write_all(s: &mut TcpStream, b: &[u8]) -> Result<()> {
    s.write_all(b)
        .map_err(|e| Error::io("side channel handshake write", e))
}

/// The server's half: with a secret, authenticates the client (reading nothing but
/// handshake messages until it has) and returns its session and proven name; without
/// one, announces the unauthenticated mode.
pub(crate) fn accept(
    s: &mut TcpStream,
    secret: Option<&ClusterSecret>,
    deadline: Instant,
) -> Result<(Session, Option<String>)> {
    let Some(secret) = secret else {
        write_all(s, &header(OPEN, 0)?)?;
        return Ok((Session::new(None, true), None));
    };
    let (hs, hello) = ServerHandshake::start(secret, PURPOSE)?;
    write_all(s, &hello.encode())?;
    let mut prefix = [0u8; 4];
    read_exact_by(s, &mut prefix, deadline)?;
    let answer = ClientHello::decode(&read_handshake(s, prefix, deadline)?)?;
    let (proof, peer) = hs.finish(&answer)?;
    write_all(s, &proof.encode())?;
    Ok((Session::new(Some(peer.key), true), Some(peer.name)))
}

/// The client's half: proves the secret as agent `name` and checks the server's proof;
/// refuses a server that runs without a secret when we hold one, and the other way
/// round.
pub(crate) fn connect(
    s: &mut TcpStream,
    name: &str,
    secret: Option<&ClusterSecret>,
    deadline: Instant,
) -> Result<Session> {
    let mut prefix = [0u8; 4];
    read_exact_by(s, &mut prefix, deadline)?;
    if prefix == MAGIC {
        let mut h = [0u8; HEADER_LEN];
        h[..4].copy_from_slice(&prefix);
        read_exact_by(s, &mut h[4..], deadline)?;
        if parse_header(&h)? != (OPEN, 0) {
            return Err(Error::invalid_metadata(
                "side channel sent a frame before its handshake",
            ));
        }
        if secret.is_some() {
            return Err(Error::Unauthenticated(
                "the side channel runs without a cluster secret, so its metadata cannot be \
                 trusted; give it the same secret"
                    .into(),
            ));
        }
        return Ok(Session::new(None, false));
    }
    let hello = ServerHello::decode(&read_handshake(s, prefix, deadline)?)?;
    let Some(secret) = secret else {
        return Err(Error::Unauthenticated(
            "the side channel requires the cluster secret and this agent has none; set \
             AgentOptions::secret or KVX_SECRET"
                .into(),
        ));
    };
    let (hs, answer) = ClientHandshake::respond(secret, PURPOSE, name, &hello)?;
    write_all(s, &answer.encode())?;
    read_exact_by(s, &mut prefix, deadline).map_err(|e| {
        Error::Unauthenticated(format!(
            "the side channel closed during the handshake ({e})"
        ))
    })?;
    let proof = ServerProof::decode(&read_handshake(s, prefix, deadline)?)?;
    Ok(Session::new(Some(hs.finish(&proof)?), false))
}

/// Reads one frame from in-memory bytes (unauthenticated); malformed input is
/// `InvalidMetadata`. For tests and fuzzing.
#[cfg(test)]
pub(crate) fn read_frame(s: &mut impl Read) -> Result<(u8, Vec<u8>)> {
    let mut h = [0u8; HEADER_LEN];
    s.read_exact(&mut h)
        .map_err(|e| Error::io("side channel read", e))?;
    let (op, len) = parse_header(&h)?;
    let mut v = Vec::new();
    s.take(len as u64)
        .read_to_end(&mut v)
        .map_err(|e| Error::io("side channel read", e))?;
    if v.len() != len {
        return Err(Error::invalid_metadata("side-channel frame truncated"));
    }
    Ok((op, v))
}
