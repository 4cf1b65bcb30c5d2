//! Transfers and the operations posted for them.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kv_core::{Error, Op, Status};

/// One RMA operation of a transfer, resolved at prepare.
#[derive(Debug, Clone, Copy)]
pub struct Seg {
    /// Local address.
    pub local: u64,
    /// Bytes.
    pub len: usize,
    /// `fi_mr_desc` of the local registration (0 when FI_MR_LOCAL is off).
    pub desc: usize,
    /// Remote address as the provider wants it (virtual address or offset).
    pub raddr: u64,
    /// Remote key.
    pub key: u64,
}

/// A prepared transfer and the state of its current post.
pub struct Transfer {
    /// Direction.
    pub op: Op,
    /// Endpoint id of the peer.
    pub peer: u64,
    /// The operations, in order.
    pub segs: Vec<Seg>,
    /// Local registrations named by the transfer (busy while it runs).
    pub local_regs: Vec<u64>,
    /// What `poll` reports.
    pub status: Status,
    /// Incremented per post, so completions of an earlier post are recognised.
    pub epoch: u64,
    /// Next segment to post.
    pub next: usize,
    /// Posted and not yet completed operations.
    pub outstanding: usize,
    /// First error seen; the transfer fails with it once nothing is outstanding.
    pub error: Option<Error>,
    /// When the current post must have finished.
    pub deadline: Instant,
    /// How long it was given.
    pub timeout: Duration,
    /// A notification waits to be sent (or its send to complete) after the data.
    pub notify_pending: bool,
    /// For writes: a one-byte read of the last target range, posted once every write
    /// completed. A write completion only says the data left this side; the read's
    /// completion (ordered after the writes on the peer) says it landed.
    pub flush: Option<Seg>,
    /// The flush of the current post was posted.
    pub flushed: bool,
}

impl Transfer {
    /// All operations of the current post are posted and completed (or abandoned).
    pub fn data_done(&self) -> bool {
        self.outstanding == 0
            && (self.error.is_some()
                || (self.next >= self.segs.len() && (self.flush.is_none() || self.flushed)))
    }

    /// Every write completed and the flush read is due.
    pub fn flush_due(&self) -> bool {
        self.error.is_none()
            && self.outstanding == 0
            && self.next >= self.segs.len()
            && self.flush.is_some()
            && !self.flushed
    }

    /// Stops posting further segments and records `e` unless an error is already set.
    pub fn fail(&mut self, e: Error) {
        if self.error.is_none() {
            self.error = Some(e);
        }
    }
}

/// What a posted operation was for.
#[derive(Debug, Clone, Copy)]
pub enum OpKind {
    /// A segment of a transfer.
    Rma {
        /// Transfer id.
        transfer: u64,
        /// Its epoch at post.
        epoch: u64,
    },
    /// A notification message from send buffer `slot`.
    Send {
        /// Send buffer.
        slot: usize,
        /// The transfer (and epoch) whose notification it is, if any.
        transfer: Option<(u64, u64)>,
    },
    /// A posted receive buffer.
    Recv {
        /// Receive buffer.
        slot: usize,
    },
}

/// The `void *context` of a posted operation. The first 64 bytes are the provider's
/// when it asks for `FI_CONTEXT`/`FI_CONTEXT2`; the box stays allocated until the
/// operation's completion is read.
#[repr(C)]
pub struct OpCtx {
    scratch: [usize; 8],
    /// What the operation was.
    pub kind: OpKind,
}

impl OpCtx {
    /// A boxed context (its address is what the provider returns).
    pub fn new(kind: OpKind) -> Box<OpCtx> {
        Box::new(OpCtx {
            scratch: [0; 8],
            kind,
        })
    }
}

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
        crate::ffi::process_exists(pid)
    }
}
