//! When things go wrong: cancel, deadlines, disconnects, peers found gone (probes), and
//! the errors failed completions turn into.

use std::collections::{HashMap, HashSet};
use std::ffi::c_void;
use std::time::Instant;

use kv_core::{EndpointId, Error, Result, Status, TransferId};

use super::{State, DISCONNECTED, PROBE_WAIT, STALL};
use crate::endpoint::OutMsg;
use crate::fabric::{self, CqError};
use crate::request::OpKind;

impl State {
    /// Begins cancelling transfer `id`: fails it with `Canceled`, stops posting and asks
    /// the provider to cancel what is posted.
    pub fn start_cancel(&mut self, id: TransferId) -> Result<()> {
        if matches!(self.live(id)?.status, Status::InProgress) {
            self.cancel_ops(id.0);
            self.finish(id.0, Some(Error::Canceled));
        }
        Ok(())
    }

    /// `(the provider still holds operations on id's memory, how many)`.
    pub fn holds_memory(&self, id: u64) -> (bool, usize) {
        self.transfers
            .get(&id)
            .map_or((false, 0), |t| (t.holding, t.user_outstanding))
    }

    /// Forgets `peer` (the body of `Backend::disconnect`): its transfers in progress
    /// fail with `RemoteDisconnected`, its imports go, and its address leaves the AV
    /// once the provider returned every operation to it.
    pub fn disconnect(&mut self, peer: EndpointId) -> Result<()> {
        let p = self
            .peers
            .get_mut(&peer.0)
            .ok_or_else(|| Error::NotRegistered(format!("{peer}")))?;
        if p.gone.as_deref() == Some(DISCONNECTED) {
            return Ok(());
        }
        p.gone = Some(DISCONNECTED.into());
        let addr = p.addr;
        let notes: Vec<OutMsg> = p.outbox.drain(..).collect();
        self.fail_peer_transfers(peer.0, DISCONNECTED);
        drop(notes);
        self.remotes.retain(|_, r| r.peer != peer.0);
        self.msgs.disconnect(peer.0);
        self.graveyard.push(addr);
        self.pump_messages();
        self.sweep_graveyard();
        Ok(())
    }

    /// Ends every transfer in progress to `peer` with `RemoteDisconnected(why)`.
    pub(super) fn fail_peer_transfers(&mut self, peer: u64, why: &str) {
        let name = self.peer_name(peer);
        let tids: Vec<u64> = self
            .active
            .iter()
            .filter(|t| self.transfers.get(t).is_some_and(|t| t.peer == peer))
            .copied()
            .collect();
        for tid in tids {
            self.cancel_ops(tid);
            let e = Error::RemoteDisconnected {
                peer: name.clone(),
                reason: why.into(),
            };
            self.finish(tid, Some(e));
        }
    }

    /// Turns a failed completion for `peer` into an error a caller can act on. A
    /// cancellation we did not ask for means the provider dropped the connection: the
    /// peer is gone (`RemoteDisconnected`) or it refused one of our operations.
    pub(super) fn map_error(&mut self, peer: u64, e: CqError) -> Error {
        if e.code != -(libc::ECANCELED as i64) {
            return fabric::op_error(e.code, e.message, || self.peer_name(peer));
        }
        if self.probe(peer) == Some(false) {
            return Error::RemoteDisconnected {
                peer: self.peer_name(peer),
                reason: format!("the provider dropped the connection ({})", e.message),
            };
        }
        Error::NotRegistered(format!(
            "{} dropped the connection during the transfer: it refused an operation (memory \
             it no longer has registered, or read-only), or it is shutting down ({})",
            self.peer_name(peer),
            e.message
        ))
    }

    /// Fails transfers past their deadline — `RemoteDisconnected` when their peer is
    /// found gone, else `TimedOut` — and, sooner, every transfer to a peer found gone
    /// while one of them stalled (nothing returned for [`STALL`]). Operations the
    /// provider holds are abandoned.
    pub(super) fn check_deadlines(&mut self) {
        let now = Instant::now();
        let mut late = Vec::new();
        let mut stalled = HashSet::new();
        for tid in &self.active {
            let Some(t) = self.transfers.get(tid) else {
                continue;
            };
            if now >= t.deadline {
                late.push(*tid);
            } else if now.duration_since(t.last_activity) > STALL {
                stalled.insert(t.peer);
            }
        }
        for peer in stalled {
            let due = self.peers.get_mut(&peer).is_some_and(|p| p.probe_due(now));
            if due && self.probe(peer) == Some(false) {
                self.fail_peer_transfers(peer, "found gone while a transfer to it stalled");
            }
        }
        let mut probed: HashMap<u64, Option<bool>> = HashMap::new();
        for tid in late {
            let Some(t) = self.transfers.get(&tid) else {
                continue;
            };
            if !matches!(t.status, Status::InProgress) {
                continue;
            }
            let (peer, after) = (t.peer, t.timeout);
            let what = format!("libfabric {} of {} segments", t.op, t.segs.len());
            let alive = match probed.get(&peer) {
                Some(a) => *a,
                None => {
                    let a = self.probe(peer);
                    probed.insert(peer, a);
                    a
                }
            };
            let e = if alive == Some(false) {
                Error::RemoteDisconnected {
                    peer: self.peer_name(peer),
                    reason: format!("found gone when {what} reached its deadline"),
                }
            } else {
                Error::TimedOut { what, after }
            };
            self.cancel_ops(tid);
            self.finish(tid, Some(e));
        }
    }

    /// Probes whether `peer` is alive (see [`Peer::probe`]); marks it gone if not.
    pub(super) fn probe(&mut self, peer: u64) -> Option<bool> {
        let tcp = self.tcp;
        let p = self.peers.get_mut(&peer)?;
        let alive = p.probe(tcp, PROBE_WAIT);
        if alive == Some(false) {
            p.gone
                .get_or_insert_with(|| "the peer's endpoint is gone".into());
        }
        alive
    }

    /// `fi_cancel` on every operation still posted for `tid` (best effort: tcp and shm
    /// cancel only receives; what they keep is abandoned).
    pub(super) fn cancel_ops(&mut self, tid: u64) {
        let ctxs: Vec<usize> = self
            .ops
            .iter()
            .filter(|(_, o)| matches!(o.kind, OpKind::Rma { transfer, .. } if transfer == tid))
            .map(|(k, _)| *k)
            .collect();
        for c in ctxs {
            self.fabric().cancel(c as *mut c_void);
        }
    }

    /// Removes address-vector entries nothing posted names any more.
    pub(super) fn sweep_graveyard(&mut self) {
        let mut keep = Vec::new();
        for addr in std::mem::take(&mut self.graveyard) {
            let busy = self
                .ops
                .values()
                .any(|o| matches!(o.kind, OpKind::Rma { addr: a, .. } if a == addr))
                || self.msgs.sending_to(addr);
            if busy {
                keep.push(addr);
            } else {
                self.fabric().remove(addr);
            }
        }
        self.graveyard = keep;
    }
}
