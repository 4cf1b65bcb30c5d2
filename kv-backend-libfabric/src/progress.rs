//! The backend's state behind its one mutex, and the steps that move posted work
//! forward: starting a post, posting segments (and the flush read of a write), reading
//! the completion queue, sending notifications in order, deadlines and cancellation.

use std::collections::{HashMap, HashSet, VecDeque};
use std::ffi::c_void;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kv_core::{EndpointId, Error, Notification, PostOptions, Result, Status, TransferId};

use crate::endpoint::{self, OutMsg, Peer};
use crate::fabric::{self, CqError, Fabric};
use crate::ffi;
use crate::memory::{Registry, Remote, Slab};
use crate::request::{OpCtx, OpKind, Transfer};
use crate::wire::{self, MSG_BUF};

/// Number of posted receive buffers for notifications.
const RECV_BUFS: usize = 16;
/// Number of send bounce buffers for notifications.
const SEND_BUFS: usize = 8;

/// Everything the backend holds; one mutex guards it (and so serialises every
/// libfabric call). `Send` (its parts are), not `Sync`.
pub struct State {
    /// Our agent name, carried by every notification.
    agent: String,
    /// The opened fabric objects.
    pub fabric: Fabric,
    next_id: u64,
    /// Local registrations.
    pub regs: Registry,
    /// Connected peers by endpoint id.
    pub peers: HashMap<u64, Peer>,
    /// Imported remote registrations by id.
    pub remotes: HashMap<u64, Remote>,
    /// Prepared transfers by id.
    pub transfers: HashMap<u64, Transfer>,
    /// Transfers with segments left to post, in post order.
    pending: VecDeque<u64>,
    /// Transfers in progress.
    active: HashSet<u64>,
    /// Posted operations by context address.
    ops: HashMap<usize, Box<OpCtx>>,
    send: Slab,
    free_send: Vec<usize>,
    recv: Slab,
    /// Target of the one-byte flush reads (never read by us).
    pub flush: Slab,
    inbox: VecDeque<Notification>,
}

impl State {
    /// The state of agent `agent` on `fabric`: registers the notification buffers and
    /// posts the receive buffers.
    pub fn open(agent: &str, mut fabric: Fabric) -> Result<State> {
        let send = Slab::new(&mut fabric, SEND_BUFS)?;
        let recv = Slab::new(&mut fabric, RECV_BUFS)?;
        let flush = Slab::new(&mut fabric, 1)?;
        let mut s = State {
            agent: agent.to_string(),
            fabric,
            next_id: 0,
            regs: Registry::default(),
            peers: HashMap::new(),
            remotes: HashMap::new(),
            transfers: HashMap::new(),
            pending: VecDeque::new(),
            active: HashSet::new(),
            ops: HashMap::new(),
            send,
            free_send: (0..SEND_BUFS).rev().collect(),
            recv,
            flush,
            inbox: VecDeque::new(),
        };
        if s.fabric.provider == "shm" {
            endpoint::shm_born(&s.fabric.address);
        }
        for slot in 0..RECV_BUFS {
            s.post_recv(slot)?;
        }
        Ok(s)
    }

    /// A fresh id for a registration, peer, import or transfer.
    pub fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn peer_name(&self, peer: u64) -> String {
        self.peers
            .get(&peer)
            .map_or_else(|| format!("endpoint {peer}"), |p| p.name.clone())
    }

    /// Turns a posting or completion error into a `kv_core::Error` for `peer`.
    fn op_error(&self, peer: u64, code: i64, message: String) -> Error {
        fabric::op_error(code, message, || self.peer_name(peer))
    }

    /// Starts transfer `id` (the body of `Backend::post`): marks its registrations
    /// busy, queues its notification, and posts what the provider takes now.
    pub fn post(&mut self, id: TransferId, opts: &PostOptions, timeout: Duration) -> Result<()> {
        let now = Instant::now();
        let t = self
            .transfers
            .get_mut(&id.0)
            .ok_or_else(|| Error::NotRegistered(format!("{id}")))?;
        if matches!(t.status, Status::InProgress) {
            return Err(Error::Busy(format!("{id} is already in progress")));
        }
        if t.outstanding != 0 {
            return Err(Error::Busy(format!("{id} still has operations in flight")));
        }
        // The transfer's pieces carry the local MRs' descriptors: a deregistered (closed)
        // MR must never reach the provider.
        if let Some(r) = self.regs.missing(&t.local_regs) {
            return Err(Error::NotRegistered(format!(
                "local registration {r} of {id} was deregistered; prepare the transfer again"
            )));
        }
        let deadline = opts.deadline.unwrap_or(now + timeout);
        t.arm(now, deadline, opts.notification.is_some());
        let (peer, epoch) = (t.peer, t.epoch);
        self.regs.mark_busy(&t.local_regs);
        self.active.insert(id.0);
        if let Some(payload) = &opts.notification {
            if let Some(p) = self.peers.get_mut(&peer) {
                p.outbox.push_back(OutMsg {
                    payload: payload.clone(),
                    after: vec![(id.0, epoch)],
                    transfer: Some((id.0, epoch)),
                });
            }
        }
        self.pending.push_back(id.0);
        // Post what the provider takes now; on EAGAIN, reap completions and retry a
        // few times, then leave the rest to `progress`.
        for _ in 0..4 {
            self.post_pending();
            if self.pending.is_empty() {
                break;
            }
            self.poll_cq()?;
        }
        self.check_finished(id.0);
        Ok(())
    }

    /// Begins cancelling transfer `id`: fails it, stops posting and asks the provider
    /// to cancel what is posted. False when it was not in progress.
    pub fn start_cancel(&mut self, id: TransferId) -> Result<bool> {
        let t = self
            .transfers
            .get_mut(&id.0)
            .ok_or_else(|| Error::NotRegistered(format!("{id}")))?;
        if !matches!(t.status, Status::InProgress) {
            return Ok(false);
        }
        t.fail(Error::Canceled);
        self.pending.retain(|x| *x != id.0);
        self.cancel_ops(id.0);
        self.check_finished(id.0);
        Ok(true)
    }

    /// Progresses once and reports whether transfer `tid` is still in progress.
    pub fn still_running(&mut self, tid: u64) -> bool {
        let _ = self.progress();
        self.check_finished(tid);
        matches!(
            self.transfers.get(&tid),
            Some(t) if matches!(t.status, Status::InProgress)
        )
    }

    /// Forgets `peer` (the body of `Backend::disconnect`): its transfers in progress
    /// fail with `RemoteDisconnected`, its imports go, its address leaves the AV.
    pub fn disconnect(&mut self, peer: EndpointId) -> Result<()> {
        let p = self
            .peers
            .get(&peer.0)
            .ok_or_else(|| Error::NotRegistered(format!("{peer}")))?;
        let name = p.name.clone();
        let tids: Vec<u64> = self
            .active
            .iter()
            .filter(|t| self.transfers.get(t).is_some_and(|t| t.peer == peer.0))
            .copied()
            .collect();
        for tid in tids {
            if let Some(t) = self.transfers.get_mut(&tid) {
                t.fail(Error::RemoteDisconnected {
                    peer: name.clone(),
                    reason: "disconnected locally".into(),
                });
                t.notify_pending = false;
            }
            self.cancel_ops(tid);
            self.check_finished(tid);
        }
        self.remotes.retain(|_, r| r.peer != peer.0);
        // Keep the AV entry while operations to it may still be outstanding; they
        // complete (or fail) and are then ignored.
        if let Some(p) = self.peers.remove(&peer.0) {
            if !self.ops.is_empty() {
                tracing::debug!("disconnect of {} with operations outstanding", p.name);
            }
            self.fabric.remove(p.addr);
        }
        Ok(())
    }

    /// Queues `payload` for `peer` behind the data of its transfers in progress (the
    /// body of `Backend::notify`) and sends what is due.
    pub fn notify(&mut self, peer: EndpointId, payload: Bytes) -> Result<()> {
        let after: Vec<(u64, u64)> = self
            .active
            .iter()
            .filter_map(|t| {
                self.transfers
                    .get(t)
                    .filter(|x| x.peer == peer.0)
                    .map(|x| (*t, x.epoch))
            })
            .collect();
        let p = self
            .peers
            .get_mut(&peer.0)
            .ok_or_else(|| Error::NotRegistered(format!("{peer}")))?;
        if !p.alive() {
            return Err(Error::RemoteDisconnected {
                peer: p.name.clone(),
                reason: "the peer's endpoint is closed".into(),
            });
        }
        p.outbox.push_back(OutMsg {
            payload,
            after,
            transfer: None,
        });
        self.pump_outboxes();
        Ok(())
    }

    /// Moves received notifications to `out`; returns how many.
    pub fn drain_inbox(&mut self, out: &mut Vec<Notification>) -> usize {
        let n = self.inbox.len();
        out.extend(self.inbox.drain(..));
        n
    }

    fn post_recv(&mut self, slot: usize) -> Result<()> {
        let ctx = OpCtx::new(OpKind::Recv { slot });
        let key = &*ctx as *const OpCtx as usize;
        let (buf, desc) = (self.recv.buf(slot), self.recv.desc());
        // SAFETY: the slab and the boxed context live until the completion is read or
        // the endpoint is closed (State::drop closes it before freeing either).
        let rc = unsafe { self.fabric.recv(buf, MSG_BUF, desc, key as *mut c_void) };
        if rc < 0 {
            return Err(self.fabric.lib.error("fi_recv", rc as i64));
        }
        self.ops.insert(key, ctx);
        Ok(())
    }

    /// Posts the next segments of `tid`. Returns false when the provider said EAGAIN.
    fn post_segments(&mut self, tid: u64) -> bool {
        let Some(addr) = self.live_peer_addr(tid) else {
            return true;
        };
        loop {
            let Some(t) = self.transfers.get(&tid) else {
                return true;
            };
            let Some((seg, write, is_flush)) = t.next_op() else {
                return true;
            };
            let epoch = t.epoch;
            let ctx = OpCtx::new(OpKind::Rma {
                transfer: tid,
                epoch,
            });
            let key = &*ctx as *const OpCtx as usize;
            // SAFETY: the local range lies in a registration the caller of `post`
            // promised to keep valid until the transfer finishes, and a transfer only
            // finishes once every posted operation completed; the boxed context is kept
            // in `ops` until then.
            let rc = unsafe {
                self.fabric.rma(
                    write,
                    seg.local,
                    seg.len,
                    seg.desc as *mut c_void,
                    addr,
                    seg.raddr,
                    seg.key,
                    key as *mut c_void,
                )
            };
            if rc == -ffi::FI_EAGAIN {
                return false;
            }
            if rc < 0 {
                let msg = format!(
                    "fi_{}: {}",
                    if write { "write" } else { "read" },
                    self.fabric.lib.strerror(rc as i32)
                );
                let peer = self.transfers.get(&tid).map_or(0, |t| t.peer);
                let e = self.op_error(peer, rc as i64, msg);
                if let Some(t) = self.transfers.get_mut(&tid) {
                    t.fail(e);
                }
                return true;
            }
            self.ops.insert(key, ctx);
            if let Some(t) = self.transfers.get_mut(&tid) {
                t.posted(is_flush);
            }
        }
    }

    /// The address of `tid`'s peer. `None` when there is no such transfer, or when the
    /// peer's endpoint is gone (then the transfer is failed).
    fn live_peer_addr(&mut self, tid: u64) -> Option<u64> {
        let t = self.transfers.get(&tid)?;
        if let Some(addr) = self
            .peers
            .get(&t.peer)
            .filter(|p| p.alive())
            .map(|p| p.addr)
        {
            return Some(addr);
        }
        let e = Error::RemoteDisconnected {
            peer: self.peer_name(t.peer),
            reason: "the peer's endpoint is closed (or it was disconnected)".into(),
        };
        if let Some(t) = self.transfers.get_mut(&tid) {
            t.fail(e);
        }
        None
    }

    /// Posts what the pending transfers still have to post, oldest first.
    fn post_pending(&mut self) -> usize {
        let mut n = 0;
        while let Some(&tid) = self.pending.front() {
            if !self.post_segments(tid) {
                break;
            }
            self.pending.pop_front();
            n += 1;
            self.check_finished(tid);
        }
        n
    }

    /// Ends `tid` if its data (and notification) are done.
    fn check_finished(&mut self, tid: u64) {
        let Some(t) = self.transfers.get_mut(&tid) else {
            return;
        };
        if !matches!(t.status, Status::InProgress) || !t.data_done() {
            return;
        }
        if t.error.is_none() && t.notify_pending {
            return; // the outbox sends it; the send completion finishes the transfer
        }
        let (peer, epoch) = (t.peer, t.epoch);
        let failed = t.error.take();
        if failed.is_some() && t.notify_pending {
            if let Some(p) = self.peers.get_mut(&peer) {
                p.outbox.retain(|m| m.transfer != Some((tid, epoch)));
            }
        }
        self.finish(tid, failed);
    }

    fn finish(&mut self, tid: u64, error: Option<Error>) {
        let Some(t) = self.transfers.get_mut(&tid) else {
            return;
        };
        if !matches!(t.status, Status::InProgress) {
            return;
        }
        t.status = match error {
            None => Status::Done,
            Some(e) => Status::Failed(e),
        };
        t.notify_pending = false;
        self.regs.release(&t.local_regs);
        self.active.remove(&tid);
    }

    /// True once the data of transfer `(tid, epoch)` no longer holds a message back.
    fn data_finished(&self, tid: u64, epoch: u64) -> bool {
        match self.transfers.get(&tid) {
            Some(t) if t.epoch == epoch && matches!(t.status, Status::InProgress) => t.data_done(),
            _ => true,
        }
    }

    /// Sends queued notifications whose turn has come.
    fn pump_outboxes(&mut self) -> usize {
        let mut n = 0;
        let peers: Vec<u64> = self
            .peers
            .iter()
            .filter(|(_, p)| !p.outbox.is_empty())
            .map(|(k, _)| *k)
            .collect();
        for pid in peers {
            if self.peers.get(&pid).is_some_and(|p| !p.alive()) {
                self.fail_outbox(pid);
                continue;
            }
            n += self.send_outbox(pid);
        }
        n
    }

    /// `pid`'s endpoint is gone: the transfers whose notifications wait in its outbox
    /// fail with `RemoteDisconnected`.
    fn fail_outbox(&mut self, pid: u64) {
        let msgs: Vec<OutMsg> = self
            .peers
            .get_mut(&pid)
            .map(|p| p.outbox.drain(..).collect())
            .unwrap_or_default();
        for m in msgs {
            if let Some((t, _)) = m.transfer {
                let e = Error::RemoteDisconnected {
                    peer: self.peer_name(pid),
                    reason: "the peer's endpoint is closed".into(),
                };
                if let Some(x) = self.transfers.get_mut(&t) {
                    x.fail(e);
                    x.notify_pending = false;
                }
                self.check_finished(t);
            }
        }
    }

    /// Sends `pid`'s queued notifications, oldest first, while the data each waits for
    /// is done and a send buffer is free; returns how many were handed to the provider.
    fn send_outbox(&mut self, pid: u64) -> usize {
        let mut n = 0;
        while let Some(p) = self.peers.get(&pid) {
            let Some(m) = p.outbox.front() else { break };
            if !m.after.iter().all(|(t, e)| self.data_finished(*t, *e)) {
                break;
            }
            // A transfer whose data failed drops its notification.
            if let Some((t, e)) = m.transfer {
                let ok = self.transfers.get(&t).is_some_and(|x| {
                    x.epoch == e && matches!(x.status, Status::InProgress) && x.error.is_none()
                });
                if !ok {
                    if let Some(p) = self.peers.get_mut(&pid) {
                        p.outbox.pop_front();
                    }
                    self.check_finished(t);
                    continue;
                }
            }
            let Some(slot) = self.free_send.pop() else {
                break;
            };
            let addr = p.addr;
            let transfer = m.transfer;
            let len =
                match wire::encode_notification(self.send.slice_mut(slot), &self.agent, &m.payload)
                {
                    Ok(l) => l,
                    Err(e) => {
                        // Checked at queue time; only a bug gets here.
                        tracing::warn!("dropping notification: {e}");
                        self.free_send.push(slot);
                        if let Some(p) = self.peers.get_mut(&pid) {
                            p.outbox.pop_front();
                        }
                        continue;
                    }
                };
            let ctx = OpCtx::new(OpKind::Send { slot, transfer });
            let key = &*ctx as *const OpCtx as usize;
            // SAFETY: the slab and the boxed context live until the completion is
            // read or the endpoint is closed.
            let rc = unsafe {
                self.fabric.send(
                    self.send.buf(slot),
                    len,
                    self.send.desc(),
                    addr,
                    key as *mut c_void,
                )
            };
            if rc == -ffi::FI_EAGAIN {
                self.free_send.push(slot);
                break;
            }
            if let Some(p) = self.peers.get_mut(&pid) {
                p.outbox.pop_front();
            }
            if rc < 0 {
                self.free_send.push(slot);
                let e = self.op_error(
                    pid,
                    rc as i64,
                    format!("fi_send: {}", self.fabric.lib.strerror(rc as i32)),
                );
                tracing::debug!("notification to {} failed: {e}", self.peer_name(pid));
                if let Some((t, _)) = transfer {
                    self.finish(t, Some(e));
                }
                continue;
            }
            self.ops.insert(key, ctx);
            n += 1;
        }
        n
    }

    /// Handles one completion (or failed completion) of the operation at `ctx`.
    fn complete(&mut self, ctx: usize, len: usize, err: Option<CqError>) {
        let Some(op) = self.ops.remove(&ctx) else {
            tracing::warn!("completion for an unknown context {ctx:#x}");
            return;
        };
        match op.kind {
            OpKind::Rma { transfer, epoch } => {
                let peer = self.transfers.get(&transfer).map_or(0, |t| t.peer);
                let e = err.map(|e| self.op_error(peer, e.code, e.message));
                if let Some(t) = self.transfers.get_mut(&transfer) {
                    if t.epoch == epoch {
                        t.outstanding = t.outstanding.saturating_sub(1);
                        if let Some(e) = e {
                            t.fail(e);
                        }
                        if t.flush_due() && !self.pending.contains(&transfer) {
                            self.pending.push_back(transfer);
                        }
                    }
                }
                self.check_finished(transfer);
            }
            OpKind::Send { slot, transfer } => {
                self.free_send.push(slot);
                if let Some((tid, epoch)) = transfer {
                    let current = self.transfers.get(&tid).is_some_and(|t| t.epoch == epoch);
                    if current {
                        let peer = self.transfers.get(&tid).map_or(0, |t| t.peer);
                        let e = err.map(|e| self.op_error(peer, e.code, e.message));
                        self.finish(tid, e);
                    }
                } else if let Some(e) = err {
                    tracing::warn!("notification send failed: {}", e.message);
                }
            }
            OpKind::Recv { slot } => {
                match err {
                    Some(e) if e.code == -(libc::ECANCELED as i64) => return,
                    Some(e) => tracing::warn!("notification receive failed: {}", e.message),
                    None => match wire::decode_notification(self.recv.slice(slot, len)) {
                        Ok((peer, payload)) => self.inbox.push_back(Notification { peer, payload }),
                        Err(e) => tracing::warn!("dropping malformed notification: {e}"),
                    },
                }
                if let Err(e) = self.post_recv(slot) {
                    tracing::warn!("re-posting a notification buffer: {e}");
                }
            }
        }
    }

    /// Reads the completion queue until it is empty (bounded); returns entries handled.
    fn poll_cq(&mut self) -> Result<usize> {
        let mut buf = [ffi::fi_cq_data_entry {
            op_context: std::ptr::null_mut(),
            flags: 0,
            len: 0,
            buf: std::ptr::null_mut(),
            data: 0,
        }; 32];
        let mut n = 0;
        for _ in 0..64 {
            match self.fabric.read_cq(&mut buf) {
                Ok(0) => break,
                Ok(k) => {
                    for e in &buf[..k] {
                        self.complete(e.op_context as usize, e.len, None);
                    }
                    n += k;
                }
                Err(e) if e.context.is_null() => {
                    return Err(Error::Backend {
                        name: "libfabric".into(),
                        code: e.code,
                        message: e.message,
                    })
                }
                Err(e) => {
                    let ctx = e.context as usize;
                    let len = 0;
                    self.complete(ctx, len, Some(e));
                    n += 1;
                }
            }
        }
        Ok(n)
    }

    /// Fails transfers past their deadline: stops posting, cancels what is posted.
    fn check_deadlines(&mut self) {
        let now = Instant::now();
        let late: Vec<u64> = self
            .active
            .iter()
            .filter(|t| self.transfers.get(t).is_some_and(|t| now > t.deadline))
            .copied()
            .collect();
        for tid in late {
            let Some(t) = self.transfers.get_mut(&tid) else {
                continue;
            };
            let what = format!("libfabric {} of {} segments", t.op, t.segs.len());
            let after = t.timeout;
            t.fail(Error::TimedOut { what, after });
            if t.data_done() && t.notify_pending {
                // Waiting for the notification: the data is done, nothing touches the
                // user's memory any more.
                let e = t.error.take();
                let epoch = t.epoch;
                let peer = t.peer;
                if let Some(p) = self.peers.get_mut(&peer) {
                    p.outbox.retain(|m| m.transfer != Some((tid, epoch)));
                }
                self.finish(tid, e);
                continue;
            }
            self.cancel_ops(tid);
            self.check_finished(tid);
        }
    }

    /// `fi_cancel` on every operation still posted for `tid`.
    fn cancel_ops(&mut self, tid: u64) {
        let ctxs: Vec<usize> = self
            .ops
            .iter()
            .filter(|(_, o)| matches!(o.kind, OpKind::Rma { transfer, .. } if transfer == tid))
            .map(|(k, _)| *k)
            .collect();
        for c in ctxs {
            self.fabric.cancel(c as *mut c_void);
        }
    }

    /// Reads completions, posts what is pending, sends due notifications and fails
    /// transfers past their deadline; returns the work done.
    pub fn progress(&mut self) -> Result<usize> {
        let mut n = self.poll_cq()?;
        n += self.post_pending();
        n += self.pump_outboxes();
        self.check_deadlines();
        Ok(n)
    }
}

impl Drop for State {
    fn drop(&mut self) {
        endpoint::shm_died(&self.fabric.address);
        // The endpoint first: afterwards the provider touches no posted buffer.
        self.fabric.close_ep();
        let mrs: Vec<_> = self
            .regs
            .take_mrs()
            .chain(self.send.mr.take())
            .chain(self.recv.mr.take())
            .chain(self.flush.mr.take())
            .collect();
        for mr in mrs {
            self.fabric.close_mr(mr);
        }
    }
}
