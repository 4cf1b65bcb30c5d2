//! Notifications: queuing them behind their transfers' data, handing due ones to the
//! message layer in order, draining received ones, and what the message layer reports
//! back (sent notifications, checks and revocations of imported registrations).

use bytes::Bytes;
use kv_core::{EndpointId, Error, Notification, Result, Status};

use super::State;
use crate::endpoint::{OutMsg, MAX_OUTBOX};
use crate::memory::Liveness;
use crate::messages::{Event, Queued};

impl State {
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
        let p = self.live_peer(peer.0)?;
        if p.outbox.len() >= MAX_OUTBOX {
            return Err(Error::Busy(format!(
                "{MAX_OUTBOX} notifications to {} wait already (its session is not open, or \
                 it does not read)",
                p.name
            )));
        }
        p.outbox.push_back(OutMsg {
            payload,
            after,
            transfer: None,
        });
        self.pump_outboxes();
        self.pump_messages();
        Ok(())
    }

    /// Moves received notifications to `out`; returns how many.
    pub fn drain_inbox(&mut self, out: &mut Vec<Notification>) -> usize {
        let Some(fabric) = self.fabric.as_mut() else {
            return 0;
        };
        self.msgs.drain(fabric, out)
    }

    /// True once the data of transfer `(tid, epoch)` no longer holds a message back.
    pub(super) fn data_finished(&self, tid: u64, epoch: u64) -> bool {
        match self.transfers.get(&tid) {
            Some(t) if t.epoch == epoch && matches!(t.status, Status::InProgress) => t.data_done(),
            _ => true,
        }
    }

    /// Hands due notifications to the message layer, per peer in order.
    pub(super) fn pump_outboxes(&mut self) -> usize {
        let mut n = 0;
        let peers: Vec<u64> = self
            .peers
            .iter()
            .filter(|(_, p)| !p.outbox.is_empty())
            .map(|(k, _)| *k)
            .collect();
        for pid in peers {
            if let Err(e) = self.live_peer(pid) {
                self.fail_outbox(pid, e);
                continue;
            }
            n += self.send_outbox(pid);
        }
        n
    }

    /// `pid`'s queued notifications cannot go: the transfers waiting for theirs fail.
    pub(super) fn fail_outbox(&mut self, pid: u64, e: Error) {
        let msgs: Vec<OutMsg> = self
            .peers
            .get_mut(&pid)
            .map(|p| p.outbox.drain(..).collect())
            .unwrap_or_default();
        for m in msgs {
            if let Some((t, _)) = m.transfer {
                self.finish(t, Some(e.clone()));
            }
        }
    }

    /// Queues `pid`'s notifications, oldest first, while the data each waits for is
    /// done and its session is open; returns how many.
    pub(super) fn send_outbox(&mut self, pid: u64) -> usize {
        let mut n = 0;
        while let Some(p) = self.peers.get(&pid) {
            let Some(m) = p.outbox.front() else { break };
            if !m.after.iter().all(|(t, e)| self.data_finished(*t, *e)) {
                break;
            }
            // A transfer whose data failed dropped its notification already; one whose
            // post is over (a later epoch) sends nothing.
            if let Some((t, e)) = m.transfer {
                let ok = self.transfers.get(&t).is_some_and(|x| {
                    x.epoch == e && matches!(x.status, Status::InProgress) && x.error.is_none()
                });
                if !ok {
                    if let Some(p) = self.peers.get_mut(&pid) {
                        p.outbox.pop_front();
                    }
                    continue;
                }
            }
            let (addr, payload, transfer) = (p.addr, m.payload.clone(), m.transfer);
            match self.msgs.note(pid, addr, &payload, transfer) {
                Ok(Queued::NotYet) => break,
                Ok(Queued::Yes) => n += 1,
                Err(e) => match transfer {
                    Some((t, _)) => self.finish(t, Some(e)),
                    None => tracing::warn!("libfabric: a notification to {pid} is dropped: {e}"),
                },
            }
            if let Some(p) = self.peers.get_mut(&pid) {
                p.outbox.pop_front();
            }
        }
        n
    }

    /// Hands queued control frames to the provider and applies what happened.
    pub(super) fn pump_messages(&mut self) -> usize {
        let mut events = Vec::new();
        let Some(fabric) = self.fabric.as_mut() else {
            return 0;
        };
        let n = self.msgs.pump(fabric, &mut events);
        self.apply(events);
        n
    }

    pub(super) fn apply(&mut self, events: Vec<Event>) {
        for e in events {
            match e {
                Event::NoteSent((tid, epoch), err) => {
                    let current = self.transfers.get(&tid).is_some_and(|t| t.epoch == epoch);
                    if current {
                        let peer = self.transfers.get(&tid).map_or(0, |t| t.peer);
                        let err = err.map(|e| self.map_error(peer, e));
                        self.finish(tid, err);
                    }
                }
                Event::Revoked(ep, key) => self.set_liveness(ep, key, Liveness::Gone),
                Event::Checked(ep, key, live) => {
                    let l = if live { Liveness::Live } else { Liveness::Gone };
                    self.set_liveness(ep, key, l);
                }
                Event::Check(hs, key) => {
                    let live = self.regs.has_key(key);
                    self.msgs.answer(hs, key, live);
                }
                Event::Release(addr) => self.graveyard.push(addr),
            }
        }
    }

    /// Records what peer `ep` said about its registration `key`; a revocation is final.
    pub(super) fn set_liveness(&mut self, ep: u64, key: u64, live: Liveness) {
        for r in self.remotes.values_mut() {
            if r.peer == ep && r.key.key == key && r.live != Liveness::Gone {
                r.live = live;
            }
        }
    }
}
