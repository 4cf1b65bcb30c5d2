//! The progress engine of [`Core`]: issuing posts once their endpoint authenticated,
//! `advance` (answers, endpoint failures, notifications, quarantine, finished and late
//! transfers), ending a post (`stop`, `end_flight`: release or quarantine), the error a
//! failed request maps to, and the small helpers the operations share (driving the
//! worker for a bounded time, closing an endpoint). Everything here runs with the state
//! lock held.

use std::time::{Duration, Instant};

use kv_core::{Error, Result, Status};

use super::{Core, State};
use crate::endpoint::{self, Endpoint};
use crate::ffi::{self, ucs_status_t};
use crate::memory::Memory;
use crate::request::{Fail, Issue, Issued, NoteState, Quarantined, Transfer};
use crate::session::Readiness;
use crate::shared::ack_error;

impl Core {
    /// The transfers in flight on endpoint `ep`.
    pub(super) fn transfers_on(&self, st: &State, ep: u64) -> Vec<u64> {
        st.transfers
            .active
            .iter()
            .copied()
            .filter(|t| st.transfers.by_id.get(t).is_some_and(|t| t.endpoint == ep))
            .collect()
    }

    /// Whether transfer `tid` has a post in flight.
    pub(super) fn in_flight(st: &State, tid: u64) -> bool {
        st.transfers
            .by_id
            .get(&tid)
            .is_some_and(|t| t.flight.is_some())
    }

    /// Drives the worker and the state machine until `done` or `limit` passed.
    pub(super) fn drive_until(
        &self,
        st: &mut State,
        limit: Duration,
        done: impl Fn(&State) -> bool,
    ) {
        let end = Instant::now() + limit;
        while !done(st) && Instant::now() < end {
            // SAFETY: valid worker, under the state lock.
            unsafe { (self.lib.worker_progress)(st.worker) };
            self.advance(st);
        }
    }

    /// Closes endpoint `id` (see [`Endpoint::close`]).
    pub(super) fn close_endpoint(&self, st: &mut State, id: u64, reason: &str) {
        if let Some(ep) = st.eps.get_mut(&id) {
            ep.close(&self.lib, reason);
        }
    }

    /// Whether transfer `tid` has no post waiting to be issued.
    pub(super) fn issued(st: &State, tid: u64) -> bool {
        st.transfers
            .by_id
            .get(&tid)
            .and_then(|t| t.flight.as_ref())
            .is_none_or(|f| f.issued)
    }

    /// Whether transfer `tid`'s post already failed while issuing.
    pub(super) fn failed_to_issue(st: &State, tid: u64) -> bool {
        st.transfers
            .by_id
            .get(&tid)
            .and_then(|t| t.flight.as_ref())
            .is_some_and(|f| f.issued && f.error.is_some())
    }

    /// Issues the operations of transfer `tid`'s post once its endpoint authenticated
    /// (or fails it when that failed).
    pub(super) fn try_issue(&self, st: &mut State, tid: u64) {
        let State {
            transfers,
            eps,
            mem,
            ..
        } = st;
        let Some(t) = transfers.by_id.get_mut(&tid) else {
            return;
        };
        if t.flight.as_ref().is_none_or(|f| f.issued) {
            return;
        }
        let Some(ep) = eps.get(&t.endpoint) else {
            return;
        };
        let issued = self.issue_post(t, tid, ep, mem, &mut transfers.next_op);
        let Some(f) = t.flight.as_mut() else {
            return;
        };
        match issued {
            Ok(None) => {}
            Err(e) => {
                f.error = Some(e);
                f.issued = true;
            }
            Ok(Some(issued)) => {
                transfers.sent += issued.ops.len() as u64;
                for &op in &issued.ops {
                    transfers.ops.insert(op, (tid, f.post));
                }
                f.issued = true;
                f.unanswered = issued.ops.len();
                f.ops = issued.ops;
                f.data = issued.data;
                f.error = issued.error;
            }
        }
    }

    /// The operations of transfer `t`'s post, sent on `ep`; `None` while the endpoint
    /// still authenticates.
    fn issue_post(
        &self,
        t: &Transfer,
        tid: u64,
        ep: &Endpoint,
        mem: &Memory,
        next_op: &mut u64,
    ) -> Result<Option<Issued>> {
        ep.usable()?;
        let (ready, unmapped) = self.shared.issue_state(t.endpoint);
        match ready {
            Readiness::Pending => return Ok(None),
            Readiness::Failed(why) => {
                return Err(Error::Unauthenticated(format!(
                    "ucx peer {}: {why}",
                    ep.peer_name
                )))
            }
            Readiness::Ready => {}
        }
        // Refused when an import was released since the post (an endpoint that
        // authenticated late); what the transfer kept of them is then still theirs.
        mem.check_imports(&t.remote_ids, tid)?;
        let imports = &t.imports;
        let segs = t.segments(imports)?;
        let src = (self.opts.mapped && ep.on_host && !unmapped)
            .then(|| mem.map_src(&t.local_regs))
            .flatten();
        let issue = Issue {
            lib: &self.lib,
            shared: &self.shared,
            op: t.op,
            uep: ep.ep,
            ep_id: t.endpoint,
            rndv_min: ep.rndv_min,
            max_entries: self.max_entries,
            imports,
            instance: self.instance,
            src,
            max_header: self.max_header,
        };
        Ok(Some(issue.run(&segs, next_op)))
    }

    /// Moves every in-flight transfer and queued notification as far as it can go
    /// without waiting; returns how many state changes happened.
    pub(super) fn advance(&self, st: &mut State) -> usize {
        let lib = &self.lib;
        // Endpoint failures reported by UCX, answers to our operations.
        let taken = self.shared.take_events();
        let mut events = st.transfers.apply_answers(taken.answers);
        events += endpoint::mark_failed(&mut st.eps, taken.ep_errors, lib);
        // Posts waiting for their endpoint to authenticate (only those: no walk over
        // every transfer in flight per call).
        if !st.transfers.unissued.is_empty() {
            for tid in std::mem::take(&mut st.transfers.unissued) {
                self.try_issue(st, tid);
                if !Self::issued(st, tid) {
                    st.transfers.unissued.push(tid);
                }
            }
        }
        // Posts on dead endpoints (looked for only while an endpoint is dead; by index:
        // nothing here adds to or removes from `active`).
        if st.eps.values().any(|e| e.dead.is_some()) {
            for i in 0..st.transfers.active.len() {
                let tid = st.transfers.active[i];
                let Some(t) = st.transfers.by_id.get_mut(&tid) else {
                    continue;
                };
                let (Some(f), Some(ep)) = (t.flight.as_mut(), st.eps.get(&t.endpoint)) else {
                    continue;
                };
                if let (Some(why), None) = (&ep.dead, &f.error) {
                    f.error = Some(ep.disconnected(why.clone()));
                    events += 1;
                }
            }
        }
        // Notifications: send, in order, each whose data is complete.
        for (id, ep) in st.eps.iter_mut() {
            events += ep.advance_notes(*id, &self.shared, lib, &mut st.transfers.by_id);
            ep.reap_close(lib);
        }
        st.graveyard.retain(|g| !g.done());
        // Quarantined requests that UCX (or the peer) finally gave back.
        events += self.release_quarantined(st);
        // Transfers: finish the complete ones, end the late ones.
        let (finished, late) = st.transfers.due();
        for (tid, fail) in finished {
            let canceled = st
                .transfers
                .by_id
                .get(&tid)
                .and_then(|t| t.flight.as_ref())
                .is_some_and(|f| f.canceled);
            let status = match fail {
                None => Status::Done,
                Some(_) if canceled => Status::Failed(Error::Canceled),
                Some(Fail::Ucs(s)) => Status::Failed(self.map_status(st, tid, s)),
                Some(Fail::Ack(c)) => Status::Failed(ack_error(c)),
                Some(Fail::Other(e)) => Status::Failed(e),
            };
            self.end_flight(st, tid, status);
            events += 1;
        }
        for tid in late {
            let after = st
                .transfers
                .by_id
                .get(&tid)
                .and_then(|t| t.flight.as_ref())
                .and_then(|f| {
                    f.deadline
                        .zip(f.posted)
                        .map(|(d, p)| d.at.saturating_duration_since(p))
                })
                .unwrap_or_default();
            let what = format!("ucx transfer TransferId#{tid}");
            self.stop(st, tid, Error::TimedOut { what, after });
            events += 1;
        }
        events
    }

    /// Quarantined requests that UCX completed (and receives that ended) release their
    /// memory; returns how many.
    fn release_quarantined(&self, st: &mut State) -> usize {
        let mut events = 0;
        let mut i = 0;
        while i < st.transfers.quarantine.len() {
            let q = &st.transfers.quarantine[i];
            // Mapped operations end with their answer, or when the target is gone (its
            // mapping of our memory went with it).
            let mapped_done = !self.shared.ops_pending(&q.mapped)
                || q.peer
                    .is_some_and(|(pid, instance)| endpoint::process_gone(pid, instance));
            if q.data.done() && !self.shared.ops_pending(&q.receiving) && mapped_done {
                let q = st.transfers.quarantine.swap_remove(i);
                self.shared.drop_ops(&q.mapped);
                st.mem.release(&q.local_regs, &q.remote_ids);
                // A disconnected endpoint's session was kept for these answers only.
                if st.eps.get(&q.endpoint).is_some_and(|e| e.gone)
                    && !Self::awaits_mapped(st, q.endpoint)
                {
                    self.shared.remove_client(q.endpoint);
                }
                events += 1;
            } else {
                i += 1;
            }
        }
        events
    }

    /// Whether quarantined mapped operations sent through endpoint `ep` still await
    /// their answers.
    pub(super) fn awaits_mapped(st: &State, ep: u64) -> bool {
        st.transfers
            .quarantine
            .iter()
            .any(|q| q.endpoint == ep && !q.mapped.is_empty())
    }

    /// Ends transfer `tid`'s post with `err` now, whatever UCX still holds: its
    /// unanswered operations are forgotten (answers ignored, no READ data lands) and
    /// what UCX has not given back goes to quarantine (the memory stays busy). True when
    /// something went to quarantine.
    pub(super) fn stop(&self, st: &mut State, tid: u64, err: Error) -> bool {
        let Some(t) = st.transfers.by_id.get(&tid) else {
            return false;
        };
        let Some(f) = &t.flight else {
            return false;
        };
        if let Some(ep) = st.eps.get_mut(&t.endpoint) {
            ep.drop_unsent(tid, f.post);
        }
        let won = f.complete()
            && f.failure().is_none()
            && matches!(f.note, NoteState::None | NoteState::Delivered);
        let status = if won {
            Status::Done
        } else {
            Status::Failed(err)
        };
        self.end_flight(st, tid, status)
    }

    /// Records `status` for transfer `tid` and takes its post off the books: its
    /// operations are forgotten, and its memory is released — or quarantined while UCX
    /// still holds a request or a READ receive still runs (then true).
    pub(super) fn end_flight(&self, st: &mut State, tid: u64, status: Status) -> bool {
        let Some(t) = st.transfers.by_id.get_mut(&tid) else {
            return false;
        };
        let Some(flight) = t.flight.take() else {
            return false;
        };
        t.status = status;
        for op in &flight.ops {
            st.transfers.ops.remove(op);
        }
        // Every answered operation already left the callbacks' table: with all answered
        // there is nothing to forget (and no lock to take).
        let (receiving, mapped) = if flight.unanswered == 0 {
            (Vec::new(), Vec::new())
        } else {
            self.shared.forget_ops(&flight.ops)
        };
        st.transfers.active.retain(|x| *x != tid);
        if flight.data.done() && receiving.is_empty() && mapped.is_empty() {
            st.mem.release(&t.local_regs, &t.remote_ids);
            return false;
        }
        tracing::warn!(
            "ucx: TransferId#{tid} ended with requests UCX still holds or mapped operations \
             the target has not answered; its memory stays busy"
        );
        let peer = st
            .eps
            .get(&t.endpoint)
            .map(|e| (e.info.pid, e.info.instance));
        st.transfers.quarantine.push(Quarantined {
            data: flight.data,
            receiving,
            mapped,
            peer,
            endpoint: t.endpoint,
            local_regs: t.local_regs.clone(),
            remote_ids: t.remote_ids.clone(),
        });
        true
    }

    /// The error for a transfer whose requests failed with `s`.
    fn map_status(&self, st: &State, tid: u64, s: ucs_status_t) -> Error {
        let ep = st
            .transfers
            .by_id
            .get(&tid)
            .and_then(|t| st.eps.get(&t.endpoint));
        match ep {
            Some(ep) if ep.dead.is_some() || ffi::is_disconnect_status(s) => {
                ep.disconnected(ep.dead.clone().unwrap_or_else(|| {
                    format!(
                        "the peer is gone or unreachable (UCX: {})",
                        self.lib.status_text(s)
                    )
                }))
            }
            _ if s == ffi::UCS_ERR_CANCELED => Error::Canceled,
            _ => self.lib.error("transfer", s),
        }
    }
}
