//! The side channel: metadata served and pushed over TCP, the embedded default.
//!
//! Frame: `"KVXS" | op u8 | 3 zero bytes | len u32 LE | payload`. Requests: `GET` (empty
//! payload) answered with `META` + this agent's metadata; `PUT` + metadata (a peer
//! publishing) answered with `OK` or `ERR` + message. Payloads are bounded by
//! [`kv_core::codec::MAX_METADATA_BYTES`] and read by an absolute deadline into a buffer
//! that grows with what arrives; at most 64 requests are served at once; a malformed
//! frame closes that connection only.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use kv_core::{Error, Result};
use parking_lot::Mutex;

const MAGIC: [u8; 4] = *b"KVXS";
const GET: u8 = 1;
const PUT: u8 = 2;
const META: u8 = 0x81;
const OK: u8 = 0x82;
const ERR: u8 = 0x83;
/// Side-channel requests served at once; more connections are closed unread.
const MAX_CONNECTIONS: usize = 64;

/// Side-channel state of an agent.
#[derive(Default)]
pub(crate) struct ChannelState {
    listener: Mutex<Option<(SocketAddr, Arc<AtomicBool>)>>,
    /// Where `publish` pushes: addresses we fetched from or were told about.
    known: Mutex<Vec<SocketAddr>>,
}

impl Drop for ChannelState {
    fn drop(&mut self) {
        if let Some((addr, stop)) = self.listener.lock().take() {
            stop.store(true, Ordering::Relaxed);
            // Wake the accept loop so it sees the flag.
            let _ = TcpStream::connect_timeout(&addr, Duration::from_millis(200));
        }
    }
}

fn write_frame(s: &mut TcpStream, op: u8, payload: &[u8]) -> Result<()> {
    let len =
        u32::try_from(payload.len()).map_err(|_| Error::invalid_argument("frame too large"))?;
    let mut h = [0u8; 12];
    h[..4].copy_from_slice(&MAGIC);
    h[4] = op;
    h[8..].copy_from_slice(&len.to_le_bytes());
    s.write_all(&h)
        .and_then(|_| s.write_all(payload))
        .map_err(|e| Error::io("side channel write", e))
}

/// Reads one frame; malformed input is `InvalidMetadata`. Used on in-memory bytes
/// (tests, fuzzing); sockets go through [`read_frame_by`].
#[cfg(test)]
pub(crate) fn read_frame(s: &mut impl Read) -> Result<(u8, Vec<u8>)> {
    let mut h = [0u8; 12];
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

/// Reads one frame from a socket by an absolute deadline: a peer that trickles bytes
/// cannot hold the reader past it, and the buffer grows with the bytes that actually
/// arrive (a header claiming 64 MiB allocates nothing up front).
fn read_frame_by(s: &mut TcpStream, deadline: Instant) -> Result<(u8, Vec<u8>)> {
    let mut h = [0u8; 12];
    read_exact_by(s, &mut h, deadline)?;
    let (op, len) = parse_header(&h)?;
    let mut v = Vec::new();
    let mut chunk = vec![0u8; 64 << 10];
    while v.len() < len {
        let want = (len - v.len()).min(chunk.len());
        read_exact_by(s, &mut chunk[..want], deadline)?;
        v.extend_from_slice(&chunk[..want]);
    }
    Ok((op, v))
}

fn read_exact_by(s: &mut TcpStream, mut buf: &mut [u8], deadline: Instant) -> Result<()> {
    while !buf.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error::TimedOut {
                what: "side-channel frame".into(),
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

/// Checks a 12-byte frame header and returns (op, payload length).
pub fn parse_header(h: &[u8]) -> Result<(u8, usize)> {
    if h.len() != 12 {
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
    if ![GET, PUT, META, OK, ERR].contains(&op) {
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

/// What the side channel serves: this agent's metadata, and loading what a peer
/// pushes. The agent implements it; the channel holds it weakly.
pub(crate) trait Service: Send + Sync + 'static {
    /// This agent's full metadata (answers `GET`).
    fn metadata(&self) -> Result<Bytes>;
    /// Loads metadata a peer pushed (`PUT`).
    fn load(&self, meta: &[u8]) -> Result<()>;
}

fn serve<S: Service>(service: &Weak<S>, mut s: TcpStream, timeout: Duration) -> Result<()> {
    s.set_write_timeout(Some(timeout))
        .map_err(|e| Error::io("set timeout", e))?;
    let (op, payload) = read_frame_by(&mut s, Instant::now() + timeout)?;
    let Some(service) = service.upgrade() else {
        return Ok(());
    };
    match op {
        GET => write_frame(&mut s, META, &service.metadata()?),
        PUT => match service.load(&payload) {
            Ok(()) => write_frame(&mut s, OK, &[]),
            Err(e) => write_frame(&mut s, ERR, e.to_string().as_bytes()),
        },
        other => Err(Error::invalid_metadata(format!(
            "unexpected side-channel request {other:#x}"
        ))),
    }
}

fn connect(addr: SocketAddr, timeout: Duration) -> Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| Error::RemoteDisconnected {
        peer: addr.to_string(),
        reason: format!("side channel connect: {e}"),
    })?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| Error::io("set timeout", e))?;
    s.set_write_timeout(Some(timeout))
        .map_err(|e| Error::io("set timeout", e))?;
    let _ = s.set_nodelay(true);
    Ok(s)
}

/// The first address `addr` resolves to.
pub(crate) fn resolve(addr: impl ToSocketAddrs) -> Result<SocketAddr> {
    addr.to_socket_addrs()
        .map_err(|e| Error::io("resolving side-channel address", e))?
        .next()
        .ok_or_else(|| Error::invalid_argument("address resolves to nothing"))
}

impl ChannelState {
    /// Serves `service` on `addr` from a background thread (named after `agent`) until
    /// the service is dropped or another `listen` replaces it; returns the bound
    /// address.
    pub(crate) fn listen<S: Service>(
        &self,
        addr: impl ToSocketAddrs,
        agent: &str,
        timeout: Duration,
        weak: Weak<S>,
    ) -> Result<SocketAddr> {
        let listener =
            TcpListener::bind(addr).map_err(|e| Error::io("binding the side channel", e))?;
        let local = listener
            .local_addr()
            .map_err(|e| Error::io("side channel address", e))?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        std::thread::Builder::new()
            .name(format!("kv-agent-channel-{agent}"))
            .spawn(move || {
                let active = Arc::new(AtomicUsize::new(0));
                for conn in listener.incoming() {
                    if flag.load(Ordering::Relaxed) || weak.strong_count() == 0 {
                        return;
                    }
                    let Ok(conn) = conn else { continue };
                    if active.load(Ordering::Acquire) >= MAX_CONNECTIONS {
                        tracing::warn!("side channel: {MAX_CONNECTIONS} requests in progress; refusing a connection");
                        continue;
                    }
                    active.fetch_add(1, Ordering::AcqRel);
                    let (w, act) = (weak.clone(), active.clone());
                    // One short-lived thread per request keeps a slow client from
                    // blocking the others; each is bounded by the frame deadline.
                    let spawned = std::thread::Builder::new()
                        .name("kv-agent-channel-conn".into())
                        .spawn(move || {
                            if let Err(e) = serve(&w, conn, timeout) {
                                tracing::debug!(error = %e, "side-channel request failed");
                            }
                            act.fetch_sub(1, Ordering::AcqRel);
                        });
                    if spawned.is_err() {
                        active.fetch_sub(1, Ordering::AcqRel);
                    }
                }
            })
            .map_err(|e| Error::io("starting the side-channel thread", e))?;
        if let Some((old, old_stop)) = self.listener.lock().replace((local, stop)) {
            old_stop.store(true, Ordering::Relaxed);
            let _ = TcpStream::connect_timeout(&old, Duration::from_millis(200));
        }
        Ok(local)
    }

    /// Fetches a peer's metadata from its side channel at `addr` and hands it to
    /// `load`; once loaded, remembers the address for [`ChannelState::known`].
    pub(crate) fn fetch<T>(
        &self,
        addr: SocketAddr,
        timeout: Duration,
        load: impl FnOnce(&[u8]) -> Result<T>,
    ) -> Result<T> {
        let mut s = connect(addr, timeout)?;
        write_frame(&mut s, GET, &[])?;
        let (op, payload) = read_frame_by(&mut s, Instant::now() + timeout)?;
        if op != META {
            return Err(Error::invalid_metadata(format!(
                "side channel answered op {op:#x} to GET"
            )));
        }
        let loaded = load(&payload)?;
        self.remember(addr);
        Ok(loaded)
    }

    /// Pushes `meta` to the side channel at `addr`; once accepted, remembers the
    /// address for [`ChannelState::known`].
    pub(crate) fn push(&self, addr: SocketAddr, timeout: Duration, meta: &[u8]) -> Result<()> {
        let mut s = connect(addr, timeout)?;
        write_frame(&mut s, PUT, meta)?;
        let (op, payload) = read_frame_by(&mut s, Instant::now() + timeout)?;
        match op {
            OK => {
                self.remember(addr);
                Ok(())
            }
            ERR => Err(Error::Backend {
                name: "side-channel".into(),
                code: 0,
                message: String::from_utf8_lossy(&payload).into_owned(),
            }),
            other => Err(Error::invalid_metadata(format!(
                "side channel answered op {other:#x} to PUT"
            ))),
        }
    }

    fn remember(&self, addr: SocketAddr) {
        let mut known = self.known.lock();
        if !known.contains(&addr) {
            known.push(addr);
        }
    }

    /// Side channels this agent fetched from or published to.
    pub(crate) fn known(&self) -> Vec<SocketAddr> {
        self.known.lock().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn headers_never_panic(v in proptest::collection::vec(any::<u8>(), 0..24)) {
            let _ = parse_header(&v);
            let _ = read_frame(&mut &v[..]);
        }
    }

    #[test]
    fn oversized_frames_are_refused() {
        let mut h = [0u8; 12];
        h[..4].copy_from_slice(&MAGIC);
        h[4] = PUT;
        h[8..].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(parse_header(&h), Err(Error::InvalidMetadata(_))));
    }
}
