//! A cap on the TCP connections UCX accepts.
//!
//! UCX 1.13's TCP transport accepts every connection to its listening port on its own
//! async thread and keeps it (one fd each, no timeout for a peer that never speaks;
//! `uct_tcp_iface_connect_handler`), and closes its listener for good once `accept`
//! fails (for instance out of fds). There is no setting to limit that. So this backend
//! watches from outside: it learns UCX's listening ports when the worker is created
//! (new listening sockets whose port is in the worker address), and when more than
//! `max_connections` accepted connections to them exist it shuts down (`shutdown(2)`,
//! never `close`: the fd stays UCX's) the ones beyond the cap that received the fewest
//! bytes (`TCP_INFO`; idle ones first); UCX then sees the connection end and closes it
//! itself. Established peers, which have talked, stay.
//!
//! Linux only (`/proc/net/tcp{,6}`, `/proc/self/fd`); elsewhere it does nothing.

use std::collections::HashSet;
use std::time::{Duration, Instant};

/// How often [`Guard::check`] looks.
const EVERY: Duration = Duration::from_millis(500);

/// TCP states in `/proc/net/tcp`.
const ESTABLISHED: u8 = 0x01;
const LISTEN: u8 = 0x0a;

/// One socket of `/proc/net/tcp{,6}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Sock {
    local_port: u16,
    local_v4: Option<[u8; 4]>,
    state: u8,
    inode: u64,
}

/// Parses `/proc/net/tcp` or `tcp6` text.
fn parse(text: &str) -> Vec<Sock> {
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (Some(local), Some(st), Some(inode)) = (f.get(1), f.get(3), f.get(9)) else {
            continue;
        };
        let Some((addr, port)) = local.split_once(':') else {
            continue;
        };
        let (Ok(port), Ok(state), Ok(inode)) = (
            u16::from_str_radix(port, 16),
            u8::from_str_radix(st, 16),
            inode.parse::<u64>(),
        ) else {
            continue;
        };
        // IPv4: one 32-bit word in host (little-endian) order.
        let local_v4 = (addr.len() == 8)
            .then(|| u32::from_str_radix(addr, 16).ok())
            .flatten()
            .map(|w| w.to_le_bytes());
        out.push(Sock {
            local_port: port,
            local_v4,
            state,
            inode,
        });
    }
    out
}

fn sockets() -> Vec<Sock> {
    let mut v = Vec::new();
    for p in ["/proc/net/tcp", "/proc/net/tcp6"] {
        if let Ok(t) = std::fs::read_to_string(p) {
            v.extend(parse(&t));
        }
    }
    v
}

/// Inodes of the listening TCP sockets of this host (namespace) now.
pub fn listening() -> HashSet<u64> {
    sockets()
        .into_iter()
        .filter(|s| s.state == LISTEN)
        .map(|s| s.inode)
        .collect()
}

/// The cap on connections to UCX's listening ports.
pub struct Guard {
    /// UCX's listening ports, with the IPv4 address each is bound to (if IPv4).
    pub ports: Vec<(u16, Option<[u8; 4]>)>,
    /// Most accepted connections kept.
    pub cap: usize,
    next: Instant,
    /// Connections shut down so far.
    pub shut: u64,
}

impl Guard {
    /// A guard with nothing to watch (no TCP listener).
    pub fn idle() -> Guard {
        Guard {
            ports: Vec::new(),
            cap: 0,
            next: Instant::now(),
            shut: 0,
        }
    }

    /// The guard for the listeners that appeared since `before` (see [`listening`])
    /// whose port (network order) occurs in `worker_address`.
    pub fn new(before: &HashSet<u64>, worker_address: &[u8], cap: usize) -> Guard {
        let ports = sockets()
            .into_iter()
            .filter(|s| s.state == LISTEN && !before.contains(&s.inode))
            .filter(|s| {
                let be = s.local_port.to_be_bytes();
                worker_address.windows(2).any(|w| w == be)
            })
            .map(|s| (s.local_port, s.local_v4))
            .collect();
        Guard {
            ports,
            cap,
            next: Instant::now(),
            shut: 0,
        }
    }

    /// At most every 500 ms: when more than `cap` accepted connections to UCX's ports
    /// exist, shuts down the quietest ones beyond it. Returns how many it shut down.
    pub fn check(&mut self) -> usize {
        if self.ports.is_empty() {
            return 0; // no TCP listener (shared memory only): no clock read either
        }
        let now = Instant::now();
        if now < self.next {
            return 0;
        }
        self.next = now + EVERY;
        // Every accepted connection is an fd of this process: few fds, nothing to do
        // (and no walk of the host's whole socket table).
        let fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count());
        if fds <= self.cap {
            return 0;
        }
        let conns: Vec<u64> = sockets()
            .into_iter()
            .filter(|s| s.state == ESTABLISHED && self.ports.iter().any(|p| p.0 == s.local_port))
            .map(|s| s.inode)
            .collect();
        if conns.len() <= self.cap {
            return 0;
        }
        let wanted: HashSet<u64> = conns.iter().copied().collect();
        let mut held = crate::ffi::hold_sockets(&wanted);
        // Peers that never sent a byte go first, then those that sent least: an
        // established peer has sent far more than a connection that only opened.
        held.sort_by_key(|h| h.bytes_received);
        let excess = held.len().saturating_sub(self.cap);
        let n = held[..excess].iter().filter(|h| h.shutdown()).count();
        self.shut += n as u64;
        tracing::warn!(
            "ucx: {} connections to UCX's TCP port(s) {:?} (cap {}, param max_connections); \
             shut down the {n} quietest",
            conns.len(),
            self.ports.iter().map(|p| p.0).collect::<Vec<_>>(),
            self.cap
        );
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_net_tcp() {
        let t = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12345 1 0000000000000000 100 0 0 10 0\n   1: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 12346 1\n garbage\n";
        let s = parse(t);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].local_port, 8080);
        assert_eq!(s[0].local_v4, Some([127, 0, 0, 1]));
        assert_eq!(s[0].state, LISTEN);
        assert_eq!(s[1].state, ESTABLISHED);
        assert_eq!(s[1].inode, 12346);
        let six = "sl local\n 0: 00000000000000000000000001000000:1F90 00000000000000000000000000000000:0000 0A 0:0 0:0 0 0 0 77 1\n";
        let s = parse(six);
        assert_eq!(s[0].local_v4, None);
        assert_eq!(s[0].inode, 77);
    }
}
