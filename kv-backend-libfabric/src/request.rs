//! Transfers: how `prepare` resolves a request into RMA operations, the state of each
//! post, and the context every posted operation carries.

use std::time::{Duration, Instant};

use kv_core::{Access, Error, Op, Result, Status, TransferRequest};

use crate::memory::{Liveness, Registration, Registry, Remote};

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
    /// Local registrations named by the transfer (busy while it runs, and while the
    /// provider holds any of its operations on them).
    pub local_regs: Vec<u64>,
    /// The peer's imported registrations it names (checked at every post).
    pub remotes: Vec<u64>,
    /// What `poll` reports.
    pub status: Status,
    /// Incremented per post, so completions of an earlier post are recognised.
    pub epoch: u64,
    /// Next segment to post.
    pub next: usize,
    /// Posted and not yet completed operations (of any post).
    pub outstanding: usize,
    /// Those of them that touch the caller's memory (all but the flush read).
    pub user_outstanding: usize,
    /// `local_regs` are marked busy on this transfer's behalf.
    pub holding: bool,
    /// The caller released the transfer while the provider still held operations: it
    /// is forgotten once they come back.
    pub released: bool,
    /// First error seen; the transfer fails with it once nothing is outstanding.
    pub error: Option<Error>,
    /// When the current post must have finished.
    pub deadline: Instant,
    /// When the provider last returned one of its operations (or it was posted).
    pub last_activity: Instant,
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
    /// A prepared, idle transfer of `op` to `peer` with the operations of `plan`.
    pub fn new(op: Op, peer: u64, plan: Plan, flush: Option<Seg>, timeout: Duration) -> Self {
        Transfer {
            flush,
            flushed: false,
            op,
            peer,
            segs: plan.segs,
            local_regs: plan.local_regs,
            remotes: plan.remotes,
            status: Status::Idle,
            epoch: 0,
            next: 0,
            outstanding: 0,
            user_outstanding: 0,
            holding: false,
            released: false,
            error: None,
            deadline: Instant::now(),
            last_activity: Instant::now(),
            timeout,
            notify_pending: false,
        }
    }

    /// Starts a new post (a new epoch) that must finish by `deadline`; `notify` when a
    /// notification follows the data.
    pub fn arm(&mut self, now: Instant, deadline: Instant, notify: bool) {
        self.status = Status::InProgress;
        self.epoch += 1;
        self.next = 0;
        self.flushed = false;
        self.error = None;
        self.deadline = deadline;
        self.last_activity = now;
        self.timeout = deadline.saturating_duration_since(now);
        self.notify_pending = notify;
    }

    /// All operations of the current post are posted and completed (or abandoned).
    pub fn data_done(&self) -> bool {
        self.outstanding == 0
            && (self.error.is_some()
                || (self.next >= self.segs.len() && (self.flush.is_none() || self.flushed)))
    }

    /// The next operation of the current post: `(segment, is a write, is the flush
    /// read)`; `None` once the post failed or nothing is left to post now.
    pub fn next_op(&self) -> Option<(Seg, bool, bool)> {
        if self.error.is_some() {
            None
        } else if self.next < self.segs.len() {
            Some((self.segs[self.next], self.op == Op::Write, false))
        } else if let (true, Some(f)) = (self.flush_due(), self.flush) {
            Some((f, false, true))
        } else {
            None
        }
    }

    /// Records that the operation [`Transfer::next_op`] returned was posted.
    pub fn posted(&mut self, is_flush: bool) {
        if is_flush {
            self.flushed = true;
        } else {
            self.next += 1;
            self.user_outstanding += 1;
        }
        self.outstanding += 1;
    }

    /// Records that the provider returned one operation.
    pub fn returned(&mut self, user: bool) {
        self.last_activity = Instant::now();
        self.outstanding = self.outstanding.saturating_sub(1);
        if user {
            self.user_outstanding = self.user_outstanding.saturating_sub(1);
        }
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
    /// A segment (or the flush read) of a transfer.
    Rma {
        /// Transfer id.
        transfer: u64,
        /// It touches the caller's memory (false for the flush read).
        user: bool,
        /// The peer's address-vector entry.
        addr: u64,
    },
    /// A control frame (notification, handshake, revocation) from send buffer `slot`.
    Send {
        /// Send buffer.
        slot: usize,
        /// The transfer (and epoch) whose notification it is, if any.
        transfer: Option<(u64, u64)>,
        /// The destination's address-vector entry.
        addr: u64,
        /// Release that entry once this frame is sent (a refused peer).
        close: bool,
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

/// How the provider wants RMA operations addressed (its `mr_mode` answer).
#[derive(Debug, Clone, Copy)]
pub struct Addressing {
    /// Remote addresses are virtual addresses (`FI_MR_VIRT_ADDR`), else offsets into
    /// the peer's region.
    pub virt: bool,
    /// Local buffers carry their registration's descriptor (`FI_MR_LOCAL`).
    pub local_mr: bool,
    /// Largest single operation; longer pieces are split.
    pub max: u64,
}

/// What `prepare` resolved: the operations in order and the registrations named.
pub struct Plan {
    /// The operations.
    pub segs: Vec<Seg>,
    /// Local registrations the operations lie in, each once.
    pub local_regs: Vec<u64>,
    /// The peer's imported registrations they address, each once.
    pub remotes: Vec<u64>,
}

/// Resolves every piece of `req` against the local registrations and the peer's
/// imported ones (`remotes`, with their ids), split at the provider's largest
/// operation. A READ into read-only local memory, a WRITE into a registration the peer
/// exported read-only and anything naming a revoked import are refused here.
pub fn plan(
    req: &TransferRequest,
    regs: &Registry,
    remotes: &[(u64, &Remote)],
    how: Addressing,
) -> Result<Plan> {
    let mut segs = Vec::new();
    let mut local_regs = Vec::new();
    let mut remote_ids: Vec<u64> = Vec::new();
    for seg in kv_core::segments(&req.local, &req.remote)? {
        let (l, r) = (seg.local, seg.remote);
        let reg = regs.find(&l).ok_or_else(|| {
            Error::NotRegistered(format!(
                "local range {:#x}+{} lies outside every local registration",
                l.addr, l.len
            ))
        })?;
        // Of several imports holding the range (a peer re-registered reused memory),
        // the newest one not known to be gone.
        let (rid, rem) = remotes
            .iter()
            .filter(|(_, x)| x.desc.contains(&r))
            .max_by_key(|(id, x)| (x.live != Liveness::Gone, *id))
            .ok_or_else(|| {
                Error::OutOfBounds(format!(
                    "remote range {:#x}+{} lies outside what the peer registered",
                    r.addr, r.len
                ))
            })?;
        if rem.live == Liveness::Gone {
            return Err(Error::NotRegistered(format!(
                "remote range {:#x}+{}: the peer deregistered it",
                r.addr, r.len
            )));
        }
        if req.op == Op::Write && rem.key.access == Access::ReadOnly {
            return Err(Error::AccessDenied(format!(
                "remote range {:#x}+{} is registered read-only by the peer",
                r.addr, r.len
            )));
        }
        if req.op == Op::Read && regs.get(reg).is_some_and(|x| x.access == Access::ReadOnly) {
            return Err(Error::AccessDenied(format!(
                "local range {:#x}+{} is registered read-only; a READ cannot land in it",
                l.addr, l.len
            )));
        }
        if local_regs.last() != Some(&reg) && !local_regs.contains(&reg) {
            local_regs.push(reg);
        }
        if !remote_ids.contains(rid) {
            remote_ids.push(*rid);
        }
        let desc = if how.local_mr {
            regs.get(reg).map_or(0, Registration::mr_desc)
        } else {
            0
        };
        let mut off = 0;
        while off < l.len {
            let n = (l.len - off).min(how.max);
            let raddr = if how.virt {
                r.addr + off
            } else {
                r.addr - rem.key.base + off
            };
            segs.push(Seg {
                local: l.addr + off,
                len: n as usize,
                desc,
                raddr,
                key: rem.key.key,
            });
            off += n;
        }
    }
    Ok(Plan {
        segs,
        local_regs,
        remotes: remote_ids,
    })
}

/// For a write: the one-byte read of the last target byte that proves the data landed
/// (see [`Transfer::flush`]), into the registered byte at `buf` (descriptor `desc`).
pub fn flush_seg(op: Op, segs: &[Seg], buf: u64, desc: usize) -> Option<Seg> {
    match (op, segs.last()) {
        (Op::Write, Some(last)) => Some(Seg {
            local: buf,
            len: 1,
            desc,
            raddr: last.raddr + last.len as u64 - 1,
            key: last.key,
        }),
        _ => None,
    }
}
