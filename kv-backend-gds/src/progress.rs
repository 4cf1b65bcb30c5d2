//! The backend's state behind its one mutex, and the steps that drive posted transfers:
//! issuing pieces to the engine (through bounce buffers where needed, or cuFile for
//! VRAM), accounting completions, deadlines, cancellation, and notifications delivered
//! after the transfers posted before them.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use kv_core::{Error, Notification, Op, PostOptions, Result, Status, TransferId};

#[cfg(feature = "cuda")]
use crate::cufile::CuFile;
use crate::engine::Engine;
use crate::io::{IoDone, IoFail, IoReq};
use crate::memory::{Reg, RemoteImport};
use crate::request::{Bounce, Failure, Run, Stop, Transfer};

/// What this process gave up to the kernel: backends dropped while I/O was still in
/// flight, whose ring (or stuck workers), files and bounce buffers were leaked rather
/// than freed under the kernel. `Copy`; read with [`leaks`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Leaks {
    /// Backends dropped with I/O in flight (their state was leaked).
    pub backends: u64,
    /// Pieces of I/O that were still in flight when their backend was dropped.
    pub requests: u64,
    /// Bytes of bounce buffers leaked with them.
    pub bounce_bytes: u64,
}

static LEAKED_BACKENDS: AtomicU64 = AtomicU64::new(0);
static LEAKED_REQUESTS: AtomicU64 = AtomicU64::new(0);
static LEAKED_BOUNCE_BYTES: AtomicU64 = AtomicU64::new(0);

/// What every gds backend of this process leaked so far (see [`Leaks`]).
pub fn leaks() -> Leaks {
    Leaks {
        backends: LEAKED_BACKENDS.load(Ordering::Relaxed),
        requests: LEAKED_REQUESTS.load(Ordering::Relaxed),
        bounce_bytes: LEAKED_BOUNCE_BYTES.load(Ordering::Relaxed),
    }
}

/// What an in-flight engine request belongs to.
struct Tagged {
    tid: u64,
    /// Index of the piece in the transfer's op list.
    op: usize,
    bounce: Option<Bounce>,
}

/// Everything behind the backend's mutex: the engine and every table. `Send`.
pub(crate) struct State {
    pub engine: Engine,
    next_id: u64,
    pub regs: HashMap<u64, Reg>,
    /// Self-endpoints (the only peers there are), by id: the name they were opened with.
    pub endpoints: HashMap<u64, String>,
    pub remotes: HashMap<u64, RemoteImport>,
    pub transfers: HashMap<u64, Transfer>,
    /// Posted transfers with pieces left to issue, oldest first.
    active: VecDeque<u64>,
    tags: Vec<Option<Tagged>>,
    free_tags: Vec<usize>,
    bounce_write_in_flight: bool,
    /// Some transfer was posted with a deadline (checked on every drive from then on).
    deadlines: bool,
    pub inbox: VecDeque<Notification>,
    /// Notifications waiting for the transfers posted before them.
    pub deferred: VecDeque<(Vec<u64>, Bytes)>,
    done: Vec<IoDone>,
}

impl State {
    /// Empty tables around `engine`.
    pub fn new(engine: Engine) -> State {
        State {
            engine,
            next_id: 0,
            regs: HashMap::new(),
            endpoints: HashMap::new(),
            remotes: HashMap::new(),
            transfers: HashMap::new(),
            active: VecDeque::new(),
            tags: Vec::new(),
            free_tags: Vec::new(),
            bounce_write_in_flight: false,
            deadlines: false,
            inbox: VecDeque::new(),
            deferred: VecDeque::new(),
            done: Vec::new(),
        }
    }

    /// A fresh id for a registration, endpoint, import or transfer.
    pub fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Stores `t` in a free tag slot (or a new one) and returns its index.
    fn tag(&mut self, t: Tagged) -> usize {
        match self.free_tags.pop() {
            Some(i) => {
                self.tags[i] = Some(t);
                i
            }
            None => {
                self.tags.push(Some(t));
                self.tags.len() - 1
            }
        }
    }
}

/// The parts of the backend fixed at creation that driving needs: the agent name
/// (the sender of every notification) and the cuFile driver. `Send + Sync`.
pub(crate) struct Driver {
    /// The agent this backend belongs to.
    pub agent: String,
    /// The cuFile driver, or why it is unavailable.
    #[cfg(feature = "cuda")]
    pub cufile: std::result::Result<CuFile, Error>,
}

impl Driver {
    /// Starts transfer `id` (the body of `Backend::post`): marks its registrations busy
    /// and issues its first pieces; completions are reaped by progress/poll/wait.
    pub fn post(&self, g: &mut State, id: TransferId, opts: &PostOptions) -> Result<()> {
        let t = g
            .transfers
            .get_mut(&id.0)
            .ok_or_else(|| Error::NotRegistered(format!("{id}")))?;
        if matches!(t.status, Status::InProgress) {
            return Err(Error::Busy(format!("{id} is already in progress")));
        }
        if let Some(missing) = t.regs.iter().find(|r| !g.regs.contains_key(r)) {
            return Err(Error::NotRegistered(format!(
                "registration {missing} named by {id} was deregistered; prepare the transfer again"
            )));
        }
        for r in &t.regs {
            if let Some(r) = g.regs.get_mut(r) {
                r.busy += 1;
            }
        }
        t.run = Run {
            started: Some(Instant::now()),
            ..Run::default()
        };
        t.status = Status::InProgress;
        t.notification = opts.notification.clone();
        t.deadline = opts.deadline;
        g.deadlines |= opts.deadline.is_some();
        g.active.push_back(id.0);
        // Start the I/O now; completions are reaped by progress/poll/wait. From here on
        // pieces may be in the kernel's hands, so the post has happened: a failure goes
        // into the transfer's status, never into an `Err` (the caller would free memory
        // the kernel may still use).
        if let Err(e) = self.drive(g, None) {
            tracing::warn!("gds post of {id}: {e}; the transfer ends with this error");
            if let Some(t) = g.transfers.get_mut(&id.0) {
                t.run.engine_error.get_or_insert(e);
            }
            self.maybe_finish(g, id.0);
        }
        Ok(())
    }

    /// Cancels transfer `id` (the body of `Backend::cancel`): asks the engine to stop
    /// its pieces and waits up to `wait` for every one of them to be reaped. Returns
    /// `Ok` once the kernel (or a worker) no longer touches the memory, else
    /// [`Error::Busy`]: the transfer stays in progress (canceled) until its pieces end,
    /// and its memory must be kept until `poll` reports that.
    pub fn cancel(&self, g: &mut State, id: TransferId, wait: Duration) -> Result<()> {
        let t = g
            .transfers
            .get_mut(&id.0)
            .ok_or_else(|| Error::NotRegistered(format!("{id}")))?;
        if !matches!(t.status, Status::InProgress) {
            return Ok(());
        }
        t.run.stop = Some(Stop::Canceled);
        t.run.cancel_flag.store(true, Ordering::Release);
        self.cancel_in_engine(g, id.0);
        let end = Instant::now() + wait;
        loop {
            let in_flight = g.transfers.get(&id.0).map_or(0, |t| t.run.in_flight);
            if in_flight == 0 {
                break;
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Busy(format!(
                    "{id} is canceled but {in_flight} of its pieces are still in the kernel after {wait:?} (a stuck device?); keep its memory until poll reports the end"
                )));
            }
            if let (_, Err(e)) = self.reap(g, Some(left)) {
                tracing::error!("gds cancel could not reap completions: {e}");
                std::thread::sleep(left.min(Duration::from_millis(1)));
            }
        }
        self.maybe_finish(g, id.0);
        Ok(())
    }

    /// Stops every transfer and waits up to `wait` for the engine to go idle (the body
    /// of the backend's `Drop`). Returns false, having counted the leak in [`leaks`],
    /// when requests are still in flight: the caller must then leak `g` (the kernel may
    /// still use the ring, the files and the bounce buffers it owns).
    pub fn shutdown(&self, g: &mut State, wait: Duration) -> bool {
        for t in g.transfers.values_mut() {
            if matches!(t.status, Status::InProgress) {
                t.run.stop.get_or_insert(Stop::Canceled);
                t.run.cancel_flag.store(true, Ordering::Release);
            }
        }
        g.engine.cancel(&|_| true);
        let end = Instant::now() + wait;
        while g.engine.in_flight() > 0 {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            if let (_, Err(e)) = self.reap(g, Some(left)) {
                tracing::error!("gds shutdown could not reap completions: {e}");
                break;
            }
        }
        let requests = g.engine.in_flight() as u64;
        if requests == 0 {
            return true;
        }
        let bounce: u64 = g
            .tags
            .iter()
            .flatten()
            .filter_map(|t| t.bounce.as_ref())
            .map(|b| b.bytes() as u64)
            .sum();
        tracing::error!(
            requests,
            bounce_bytes = bounce,
            "gds backend dropped with I/O still in flight after {wait:?} (a stuck device?); leaking its ring, files and bounce buffers instead of freeing them under the kernel"
        );
        g.engine.abandon();
        LEAKED_BACKENDS.fetch_add(1, Ordering::Relaxed);
        LEAKED_REQUESTS.fetch_add(requests, Ordering::Relaxed);
        LEAKED_BOUNCE_BYTES.fetch_add(bounce, Ordering::Relaxed);
        false
    }

    /// Issues pieces, flushes the engine and handles completions once; with `block`,
    /// waits up to that long for at least one completion.
    pub fn drive(&self, g: &mut State, block: Option<Duration>) -> Result<usize> {
        self.check_deadlines(g);
        self.pump(g);
        let (n, r) = self.reap(g, block);
        r?;
        if n > 0 {
            // Refill the queue right away so the device stays busy between calls. A
            // blocking caller loops into `flush` again, which submits the refill and
            // waits in one system call (as fio does); a non-blocking one submits now.
            self.pump(g);
            if block.is_some() {
                return Ok(n);
            }
            self.reap(g, None).1?;
        }
        Ok(n)
    }

    /// Flushes the engine (submitting what was queued; with `block`, waiting up to that
    /// long for a completion) and accounts every finished piece. Returns how many
    /// finished, and the engine's result.
    fn reap(&self, g: &mut State, block: Option<Duration>) -> (usize, Result<()>) {
        let mut done = std::mem::take(&mut g.done);
        done.clear();
        let r = g.engine.flush(block, &mut done);
        let n = done.len();
        for d in done.drain(..) {
            self.complete(g, d);
        }
        g.done = done;
        (n, r)
    }

    /// Stops transfers past their deadline (as for `cancel`, without waiting).
    fn check_deadlines(&self, g: &mut State) {
        if !g.deadlines {
            return;
        }
        let now = Instant::now();
        let expired: Vec<u64> = g
            .transfers
            .iter()
            .filter(|(_, t)| {
                matches!(t.status, Status::InProgress)
                    && t.run.stop.is_none()
                    && t.deadline.is_some_and(|d| now > d)
            })
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            if let Some(t) = g.transfers.get_mut(&id) {
                let start = t.run.started.unwrap_or(now);
                t.run.stop = Some(Stop::TimedOut(start));
                t.run.cancel_flag.store(true, Ordering::Release);
            }
            self.cancel_in_engine(g, id);
            self.maybe_finish(g, id);
        }
    }

    /// Hands pieces of the active transfers to the engine while it has room.
    fn pump(&self, g: &mut State) {
        while g.engine.free() > 0 {
            let Some(&tid) = g.active.front() else {
                return;
            };
            let Some(t) = g.transfers.get_mut(&tid) else {
                g.active.pop_front();
                continue;
            };
            if t.run.issuing_done(t.ops.len()) {
                g.active.pop_front();
                continue;
            }
            let op_index = t.run.next;
            let op = t.ops[op_index];
            let write = t.op == Op::Write;
            #[cfg(feature = "cuda")]
            if op.vram {
                self.cufile_piece(t, op, write);
                self.maybe_finish(g, tid);
                continue;
            }
            let (bounce, addr, len, offset) = if op.bounce {
                if write && g.bounce_write_in_flight {
                    // Read-modify-write of shared edge blocks must not interleave.
                    return;
                }
                // SAFETY: the transfer is posted, so its local ranges are valid (the
                // `post` contract) until it finishes.
                match unsafe { Bounce::new(&op, write) } {
                    Ok((b, addr, len, offset)) => (Some(b), addr, len, offset),
                    Err(e) => {
                        tracing::warn!("gds bounce buffer for fd {}: {e}", op.fd);
                        t.run.next += 1;
                        t.run.failure.get_or_insert(Failure {
                            fail: IoFail::Os(libc::ENOMEM),
                            op,
                            bytes: 0,
                        });
                        self.maybe_finish(g, tid);
                        continue;
                    }
                }
            } else {
                (None, op.addr, op.len, op.offset)
            };
            t.run.next += 1;
            t.run.in_flight += 1;
            let cancel = t.run.cancel_flag.clone();
            if bounce.as_ref().is_some_and(|b| b.is_write()) {
                g.bounce_write_in_flight = true;
            }
            let buf_index = if bounce.is_some() { None } else { op.buf_index };
            let tag = g.tag(Tagged {
                tid,
                op: op_index,
                bounce,
            });
            let req = IoReq {
                tag: tag as u64,
                write,
                fd: op.fd,
                fixed_file: op.fixed_file,
                addr,
                len,
                offset,
                buf_index,
                cancel,
            };
            // SAFETY: the memory is either the user's (valid and registered until the
            // transfer finishes: the `post` contract, and the transfer cannot finish
            // while this piece is in flight) or a bounce buffer owned by the tag entry,
            // which is freed only after the completion is reaped.
            unsafe { g.engine.push(req) };
        }
    }

    /// Moves VRAM piece `op` (the next of `t`) through cuFile, synchronously.
    #[cfg(feature = "cuda")]
    fn cufile_piece(&self, t: &mut Transfer, op: crate::request::IoOp, write: bool) {
        t.run.next += 1;
        let r = match &self.cufile {
            Ok(c) => c.transfer(&op, write),
            Err(_) => Err(IoFail::Os(libc::ENODEV)),
        };
        match r {
            Ok(n) => t.run.landed += n,
            Err(fail) => {
                t.run.failure.get_or_insert(Failure { fail, op, bytes: 0 });
            }
        }
    }

    /// Accounts one finished piece.
    fn complete(&self, g: &mut State, d: IoDone) {
        let Some(tagged) = g.tags.get_mut(d.tag as usize).and_then(|t| t.take()) else {
            tracing::warn!(tag = d.tag, "gds completion for an unknown tag");
            return;
        };
        g.free_tags.push(d.tag as usize);
        if tagged.bounce.as_ref().is_some_and(|b| b.is_write()) {
            g.bounce_write_in_flight = false;
        }
        let Some(t) = g.transfers.get_mut(&tagged.tid) else {
            return;
        };
        t.run.in_flight = t.run.in_flight.saturating_sub(1);
        let result = match &tagged.bounce {
            // SAFETY: the transfer is still in progress (this piece was in flight), so
            // its memory is valid.
            Some(b) => unsafe { b.finish(d.bytes, d.fail) }.map_err(|f| (f, 0)),
            None => match d.fail {
                None => Ok(d.bytes),
                Some(f) => Err((f, d.bytes)),
            },
        };
        match result {
            Ok(n) => t.run.landed += n,
            Err((fail, bytes)) => {
                t.run.landed += bytes;
                let canceled = fail == IoFail::Os(libc::ECANCELED) && t.run.stop.is_some();
                if !canceled && t.run.failure.is_none() {
                    if let Some(op) = t.ops.get(tagged.op).copied() {
                        t.run.failure = Some(Failure { fail, op, bytes });
                    }
                }
            }
        }
        let tid = tagged.tid;
        self.maybe_finish(g, tid);
    }

    /// Turns a run whose pieces are all issued and reaped into `Done`/`Failed`.
    fn maybe_finish(&self, g: &mut State, tid: u64) {
        let Some(t) = g.transfers.get_mut(&tid) else {
            return;
        };
        if !matches!(t.status, Status::InProgress)
            || t.run.in_flight > 0
            || !t.run.issuing_done(t.ops.len())
        {
            return;
        }
        t.status = match t.final_error() {
            Some(e) => Status::Failed(e),
            None => {
                if let Some(p) = t.notification.take() {
                    g.inbox.push_back(Notification {
                        peer: self.agent.clone(),
                        payload: p,
                    });
                }
                Status::Done
            }
        };
        for r in t.regs.clone() {
            if let Some(r) = g.regs.get_mut(&r) {
                r.busy = r.busy.saturating_sub(1);
            }
        }
        self.deliver_deferred(g);
    }

    /// Delivers notifications whose earlier transfers have all finished, in order.
    pub fn deliver_deferred(&self, g: &mut State) {
        while let Some((after, _)) = g.deferred.front() {
            let waiting = after.iter().any(|id| {
                g.transfers
                    .get(id)
                    .is_some_and(|t| matches!(t.status, Status::InProgress))
            });
            if waiting {
                return;
            }
            if let Some((_, payload)) = g.deferred.pop_front() {
                g.inbox.push_back(Notification {
                    peer: self.agent.clone(),
                    payload,
                });
            }
        }
    }

    /// Asks the engine to cancel every piece of `tid` in flight.
    fn cancel_in_engine(&self, g: &mut State, tid: u64) {
        let tags = &g.tags;
        g.engine.cancel(&|tag| {
            tags.get(tag as usize)
                .and_then(|t| t.as_ref())
                .is_some_and(|t| t.tid == tid)
        });
    }
}
