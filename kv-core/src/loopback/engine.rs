//! One loopback node's *initiator* side: the handshake it opens connections with, and
//! the jobs `progress` runs — transfers moved piece by piece as authenticated peer
//! operations the target serves, and notifications after their data.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::auth::{
    ClientHandshake, ClientHello, ServerHandshake, ServerHello, ServerProof, SessionKey,
};
use crate::backend::{Op, Status, TransferRequest};
use crate::desc::{segments, Descriptor, Segment};
use crate::error::{Error, Result};

use super::node::{note_frame, Mutation, Node, NodeState, PeerOp, Remote};

/// The handshake purpose of loopback connections (see [`crate::auth`]).
const PURPOSE: &[u8] = b"kv-core loopback data";
/// Largest piece one peer operation moves (a real NIC's message size), so a big
/// descriptor is in flight across several `progress` calls too.
const MAX_PIECE: u64 = 256 << 10;

impl Node {
    /// Runs the handshake with `target` as the client; returns the session the target
    /// accepted and the session key (both `None`-keyed on an unauthenticated fabric).
    pub fn handshake(&self, target: &Node) -> Result<(u64, Option<SessionKey>)> {
        let (mine, theirs) = match (&self.secret, &target.secret) {
            (None, None) => {
                let session = target.state.lock().accept(self.agent.clone(), None)?;
                return Ok((session, None));
            }
            (Some(mine), Some(theirs)) => (mine, theirs),
            _ => {
                return Err(Error::Unauthenticated(
                    "one side has a cluster secret and the other none".into(),
                ))
            }
        };
        // Target: a fresh challenge.
        let (server, hello) = ServerHandshake::start(theirs, PURPOSE)?;
        // Us: answer it.
        let (client, answer) = ClientHandshake::respond(
            mine,
            PURPOSE,
            &self.agent,
            &ServerHello::decode(&hello.encode())?,
        )?;
        // Target: check the answer.
        let (proof, peer) = match server.finish(&ClientHello::decode(&answer.encode())?) {
            Ok(x) => x,
            Err(_) if self.mutant(Mutation::UnauthenticatedAccepted) => {
                let session = target.state.lock().accept(answer.name, None)?;
                return Ok((session, None));
            }
            Err(e) => return Err(e),
        };
        // Us: check the target's proof.
        let key = client.finish(&ServerProof::decode(&proof.encode())?)?;
        let session = target.state.lock().accept(peer.name, Some(peer.key))?;
        Ok((session, Some(key)))
    }

    /// Moves up to `budget` bytes of transfer `tid`. Returns false if it is not finished
    /// (budget spent), true once it ended (or was gone already).
    pub fn run_transfer(&self, tid: u64, budget: &mut u64) -> bool {
        let mut s = self.state.lock();
        let Some(t) = s.transfers.get(&tid) else {
            return true;
        };
        // A transfer that ended (cancelled, timed out, disconnected) moves nothing more.
        let runs = match t.status {
            Status::InProgress => true,
            Status::Failed(Error::Canceled) => self.mutant(Mutation::CancelLeavesCopyQueued),
            _ => false,
        };
        if !runs {
            return true;
        }
        let (op, ep, segs, start, mut notified) =
            (t.op, t.peer, t.segs.clone(), t.done, t.notified);
        let opts = t.opts.clone();
        if opts.deadline.is_some_and(|d| Instant::now() > d)
            && !self.mutant(Mutation::DeadlineIgnored)
        {
            let what = format!("loopback {op} transfer");
            s.finish(
                tid,
                Status::Failed(Error::TimedOut {
                    what,
                    after: Duration::ZERO,
                }),
            );
            return true;
        }
        let (session, key, mut seq, remote) = match s.link(ep) {
            Ok((_, l, node)) => (l.session, l.key.clone(), l.seq, node),
            Err(e) => {
                s.finish(tid, Status::Failed(e));
                return true;
            }
        };
        s.running = Some(tid);
        drop(s);

        let notify = |seq: &mut u64| match opts.notification.clone() {
            Some(p) => {
                let tag = key
                    .as_ref()
                    .map_or([0; 16], |k| k.tag(*seq, &note_frame(&p)));
                *seq += 1;
                remote.state.lock().deliver(session, &tag, p)
            }
            None => Ok(()),
        };
        let mut result = Ok(());
        if !notified && self.mutant(Mutation::NotifyBeforeData) {
            notified = true;
            result = notify(&mut seq);
        }
        let mut done = start;
        // One lock at a time (ours, then the target's), never nested, so two nodes
        // copying to each other cannot deadlock.
        while result.is_ok() && done < segs.len() && *budget > 0 {
            let (seg, rkey) = segs[done];
            let wire_op = match op {
                Op::Read if self.mutant(Mutation::ReadWrongDirection) => Op::Write,
                op => op,
            };
            let frame = PeerOp::frame(wire_op, &seg.remote, rkey);
            let peer_op = PeerOp {
                session,
                tag: key.as_ref().map_or([0; 16], |k| k.tag(seq, &frame)),
                op: wire_op,
                desc: seg.remote,
                key: rkey,
            };
            seq += 1;
            let mutation = self.mutation;
            result = match wire_op {
                Op::Write => {
                    let data = self.state.lock().read(&seg.local);
                    data.and_then(|d| remote.state.lock().serve(mutation, &peer_op, Some(&d)))
                        .map(|_| ())
                }
                Op::Read => match remote.state.lock().serve(mutation, &peer_op, None) {
                    Ok(Some(d)) => self.state.lock().write(&seg.local, &d),
                    Ok(None) => Err(Error::invalid_argument("READ returned no data")),
                    Err(e) => Err(e),
                },
            };
            *budget = budget.saturating_sub(seg.local.len.max(1));
            done += 1;
        }
        let finished = result.is_err() || done == segs.len();
        if finished && result.is_ok() && !notified {
            // After the last byte landed: the contract's order.
            result = notify(&mut seq);
        }

        let mut s = self.state.lock();
        s.running = None;
        if let Some(l) = s.peers.get_mut(&ep).and_then(|p| p.link.as_mut()) {
            l.seq = seq;
        }
        if let Some(t) = s.transfers.get_mut(&tid) {
            t.done = done;
            t.notified = notified;
        }
        match result {
            Err(e) => s.finish(tid, Status::Failed(e)),
            Ok(()) if finished => s.finish(tid, Status::Done),
            Ok(()) => return false,
        }
        true
    }

    /// Sends a notification queued by `notify`. A peer that vanished (or whose inbox is
    /// full) after `notify` accepted the payload loses it, as a real network would.
    pub fn send_notification(&self, ep: u64, payload: Bytes) {
        let mut s = self.state.lock();
        let Ok((_, link, node)) = s.link(ep) else {
            return;
        };
        let (session, seq) = (link.session, link.seq);
        let tag = link
            .key
            .as_ref()
            .map_or([0; 16], |k| k.tag(seq, &note_frame(&payload)));
        if let Some(l) = s.peers.get_mut(&ep).and_then(|p| p.link.as_mut()) {
            l.seq += 1;
        }
        drop(s);
        let _ = node.state.lock().deliver(session, &tag, payload);
    }

    /// The transfer's pieces with the key of the import each remote piece lies in.
    pub fn plan(&self, s: &NodeState, req: &TransferRequest) -> Result<Arc<[(Segment, u128)]>> {
        let imports: Vec<&Remote> = s
            .remotes
            .values()
            .filter(|r| r.peer == req.peer.0)
            .collect();
        let mut out = Vec::new();
        for seg in segments(&req.local, &req.remote)? {
            let key = imports
                .iter()
                .find(|r| r.desc.contains(&seg.remote))
                .map(|r| r.key)
                .ok_or_else(|| {
                    Error::OutOfBounds("a remote piece spans two imported registrations".into())
                })?;
            let mut at = 0;
            while at < seg.local.len {
                let n = (seg.local.len - at).min(MAX_PIECE);
                let piece = |d: Descriptor| Descriptor::new(d.addr + at, n, d.device);
                let seg = Segment {
                    local: piece(seg.local),
                    remote: piece(seg.remote),
                };
                out.push((seg, key));
                at += n;
            }
        }
        if self.mutant(Mutation::ZeroLengthEndsList) {
            // The bug: everything after the first zero-length local descriptor is dropped.
            let before: u64 = req
                .local
                .iter()
                .take_while(|d| d.len > 0)
                .map(|d| d.len)
                .sum();
            let mut moved = 0;
            out.retain(|(seg, _)| {
                moved += seg.local.len;
                moved <= before
            });
        }
        Ok(out.into())
    }
}
