//! Connected peers: each one's address-vector entry, its queue of notifications in
//! send order, and whether it is still alive.

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use bytes::Bytes;

/// Most notifications queued for one peer (behind its transfers or its handshake);
/// `notify` beyond it is refused with `Busy`.
pub const MAX_OUTBOX: usize = 4096;

/// A notification queued for a peer, sent in order once what it waits for is done.
pub struct OutMsg {
    /// The payload.
    pub payload: Bytes,
    /// Transfers (id, epoch) whose data must be done first.
    pub after: Vec<(u64, u64)>,
    /// The transfer this notification completes, if any.
    pub transfer: Option<(u64, u64)>,
}

/// A connected peer.
pub struct Peer {
    /// Its agent name.
    pub name: String,
    /// Its address-vector entry.
    pub addr: u64,
    /// Notifications not yet handed to the provider, oldest first.
    pub outbox: VecDeque<OutMsg>,
    /// Its endpoint name, for liveness checks.
    pub address: Vec<u8>,
    /// Set once the peer was disconnected (locally) or found dead: why. Transfers,
    /// prepares and notifications to it fail with `RemoteDisconnected`.
    pub gone: Option<String>,
    /// When a stalled transfer may probe the peer again, and the wait after that.
    pub next_probe: (Instant, Duration),
}

/// Addresses of the shm endpoints alive in this process.
///
/// The shm provider maps a peer's region; when that peer lives in this process and is
/// closed, the provider's later writes to it touch freed memory. Checking this set
/// before posting turns that into `RemoteDisconnected`.
static LIVE_SHM: std::sync::Mutex<Vec<Vec<u8>>> = std::sync::Mutex::new(Vec::new());

/// Records a live shm endpoint of this process.
pub fn shm_born(address: &[u8]) {
    if let Ok(mut v) = LIVE_SHM.lock() {
        v.push(address.to_vec());
    }
}

/// Forgets a closed shm endpoint of this process.
pub fn shm_died(address: &[u8]) {
    if let Ok(mut v) = LIVE_SHM.lock() {
        v.retain(|a| a != address);
    }
}

/// The process id in an shm endpoint name (`fi_shm://PID:…`).
fn shm_pid(address: &[u8]) -> Option<i32> {
    let s = std::str::from_utf8(address).ok()?;
    let rest = s.strip_prefix("fi_shm://")?;
    rest.split(':').next()?.trim_end_matches('\0').parse().ok()
}

/// The socket address in a `tcp;ofi_rxm` (or verbs) endpoint name: a `sockaddr_in` or
/// `sockaddr_in6` as `fi_getname` returns it.
pub fn socket_addr(address: &[u8]) -> Option<SocketAddr> {
    let family = u16::from_ne_bytes([*address.first()?, *address.get(1)?]);
    let port = u16::from_be_bytes([*address.get(2)?, *address.get(3)?]);
    let ip = if family == libc::AF_INET as u16 {
        let o = address.get(4..8)?;
        IpAddr::V4(Ipv4Addr::new(o[0], o[1], o[2], o[3]))
    } else if family == libc::AF_INET6 as u16 {
        let o: [u8; 16] = address.get(8..24)?.try_into().ok()?;
        IpAddr::V6(Ipv6Addr::from(o))
    } else {
        return None;
    };
    Some(SocketAddr::new(ip, port))
}

impl Peer {
    /// A peer named `name` at address-vector entry `addr`, whose endpoint name is
    /// `address`, with an empty outbox.
    pub fn new(name: String, addr: u64, address: Vec<u8>) -> Peer {
        Peer {
            name,
            addr,
            outbox: VecDeque::new(),
            address,
            gone: None,
            next_probe: (Instant::now(), Duration::from_secs(1)),
        }
    }

    /// Whether a stalled transfer should probe the peer now (at most once a second,
    /// backing off to once every 8 s while it answers).
    pub fn probe_due(&mut self, now: Instant) -> bool {
        if now < self.next_probe.0 {
            return false;
        }
        let wait = self.next_probe.1;
        self.next_probe = (now + wait, (wait * 2).min(Duration::from_secs(8)));
        true
    }

    /// False when the peer's endpoint is known to be gone: an shm endpoint closed in
    /// this process or whose process exited. Cheap; other providers report dead peers
    /// through their errors (see [`Peer::probe`]).
    pub fn alive(&self) -> bool {
        alive(&self.address)
    }

    /// A stronger check, for deciding between "the peer is gone" and "it is slow" when
    /// a transfer failed or timed out. For a peer of the `tcp` provider (`tcp` true),
    /// whether its listening port still accepts connections: a stopped process's kernel
    /// still accepts, a dead one refuses. Bounded by `wait`. `None` when it cannot tell.
    pub fn probe(&self, tcp: bool, wait: Duration) -> Option<bool> {
        if shm_pid(&self.address).is_some() {
            return Some(self.alive());
        }
        if !tcp {
            return None;
        }
        let sa = socket_addr(&self.address)?;
        match TcpStream::connect_timeout(&sa, wait) {
            Ok(_) => Some(true),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Some(false),
            Err(_) => None,
        }
    }
}

/// False when the endpoint named `address` is known to be gone: an shm endpoint closed
/// in this process or whose process exited (sending to one touches unmapped memory).
pub fn alive(address: &[u8]) -> bool {
    let Some(pid) = shm_pid(address) else {
        return true;
    };
    if pid == std::process::id() as i32 {
        return LIVE_SHM
            .lock()
            .map(|v| v.iter().any(|a| a == address))
            .unwrap_or(true);
    }
    process_exists(pid)
}

/// False only when `pid` names no process (`kill(pid, 0)` fails with `ESRCH`).
pub fn process_exists(pid: i32) -> bool {
    // SAFETY: signal 0 sends nothing; it only checks that the process exists.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_addresses_are_read_from_endpoint_names() {
        let mut v4 = vec![0u8; 16];
        v4[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        v4[2..4].copy_from_slice(&8080u16.to_be_bytes());
        v4[4..8].copy_from_slice(&[127, 0, 0, 1]);
        assert_eq!(socket_addr(&v4), Some("127.0.0.1:8080".parse().unwrap()));
        assert_eq!(socket_addr(b"fi_shm://123:0"), None);
        assert_eq!(socket_addr(&[2]), None);
        assert_eq!(shm_pid(b"fi_shm://4321:7\0"), Some(4321));
    }
}
