//! Connected peers: each one's address-vector entry, its queue of notifications in
//! send order, and whether it is still alive (the shm provider needs the check).

use std::collections::VecDeque;

use bytes::Bytes;

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
    /// Its endpoint name, for the liveness check of shm peers.
    pub address: Vec<u8>,
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

impl Peer {
    /// A peer named `name` at address-vector entry `addr`, whose endpoint name is
    /// `address`, with an empty outbox.
    pub fn new(name: String, addr: u64, address: Vec<u8>) -> Peer {
        Peer {
            name,
            addr,
            outbox: VecDeque::new(),
            address,
        }
    }

    /// False when the peer is an shm endpoint known to be gone: closed in this process,
    /// or its process has exited. Other providers report dead peers themselves.
    pub fn alive(&self) -> bool {
        let Some(pid) = shm_pid(&self.address) else {
            return true;
        };
        if pid == std::process::id() as i32 {
            return LIVE_SHM
                .lock()
                .map(|v| v.contains(&self.address))
                .unwrap_or(true);
        }
        process_exists(pid)
    }
}

/// False only when `pid` names no process (`kill(pid, 0)` fails with `ESRCH`).
pub fn process_exists(pid: i32) -> bool {
    // SAFETY: signal 0 sends nothing; it only checks that the process exists.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}
