//! Connected peers: one worker thread per data connection ("lane") and the data
//! movement on it (TCP frames, cross-memory attach, shared-memory copies), and the
//! sequencer that delivers notifications after the data of every earlier post, in
//! post order. The control connection and handshake are in `control`.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam::channel::{Receiver, Sender};
use kv_core::{Error, Op, Result};
use parking_lot::{Mutex, MutexGuard};

use crate::channel::Channel;
use crate::control::{ctl_main, message, PeerCore, Reach};
use crate::os::{self, CmaDir};
use crate::request::{self, Completion, Path};
use crate::sys::{self, Watch};
use crate::wire::{self, ChannelKind, FrameOp, Header};

/// A prepared transfer of this backend: to a [`Peer`].
pub(crate) type Transfer = request::Transfer<Peer>;

/// How many WRITE frames a lane sends before it waits for an ACK.
const WRITE_WINDOW: usize = 8;

enum Ready {
    Transfer(u64, Arc<Transfer>),
    Note(u64, Bytes),
}

/// Orders a peer's posts and notifications. Items become ready out of order (lanes
/// finish when they finish), move to `out` in sequence order, and are sent by one
/// thread at a time (`sending`) *without* this lock held, so a slow control connection
/// never blocks lane completions or `notify` callers queueing behind it.
#[derive(Default)]
struct Sequencer {
    next: u64,
    head: u64,
    ready: BTreeMap<u64, Ready>,
    out: VecDeque<Ready>,
    sending: bool,
}

struct Lane {
    tx: Option<Sender<(Arc<Transfer>, usize)>>,
    thread: Option<JoinHandle<()>>,
}

/// A connected peer. `Send + Sync`.
pub(crate) struct Peer {
    pub core: Arc<PeerCore>,
    seq: Mutex<Sequencer>,
    lanes: Mutex<Vec<Lane>>,
    /// Reads REVOKE frames from a same-host peer's control connection.
    ctl_reader: Mutex<Option<JoinHandle<()>>>,
    pub nlanes: usize,
    rot: AtomicUsize,
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer")
            .field("name", &self.core.name)
            .field("addr", &self.core.addr)
            .field("cma", &self.core.cma)
            .finish_non_exhaustive()
    }
}

impl Peer {
    /// Connects the control connection (over the peer's Unix socket when it is on
    /// this host and reachable without TCP) and starts the lanes (their data
    /// connections open lazily) and, for a same-host peer, the control reader.
    pub(crate) fn connect(r: Reach<'_>, completions: Arc<AtomicUsize>) -> Result<Arc<Peer>> {
        let nlanes = r.opts.connections.max(1);
        let core = Arc::new(PeerCore::connect(r, completions)?);
        let ctl_reader = if core.cma {
            let c = core.clone();
            Some(
                std::thread::Builder::new()
                    .name("kv-tcp-ctl".into())
                    .spawn(move || ctl_main(c))
                    .map_err(|e| Error::io("spawning a tcp control thread", e))?,
            )
        } else {
            None
        };
        let mut lanes = Vec::with_capacity(nlanes);
        for i in 0..nlanes {
            let (tx, rx) = crossbeam::channel::unbounded();
            let c = core.clone();
            let thread = std::thread::Builder::new()
                .name(format!("kv-tcp-lane-{i}"))
                .spawn(move || lane_main(c, rx))
                .map_err(|e| Error::io("spawning a tcp lane thread", e))?;
            lanes.push(Lane {
                tx: Some(tx),
                thread: Some(thread),
            });
        }
        Ok(Arc::new(Peer {
            core,
            seq: Mutex::new(Sequencer::default()),
            lanes: Mutex::new(lanes),
            ctl_reader: Mutex::new(ctl_reader),
            nlanes,
            rot: AtomicUsize::new(0),
        }))
    }

    /// Takes the next sequence number (a post or a notification).
    pub(crate) fn next_seq(&self) -> u64 {
        let mut q = self.seq.lock();
        q.next += 1;
        q.next - 1
    }

    /// Hands the plan's lanes to worker threads; returns how many were started.
    pub(crate) fn dispatch(&self, t: &Arc<Transfer>) {
        let n = t.plan.lanes;
        let rot = self.rot.fetch_add(1, Ordering::Relaxed);
        let lanes = self.lanes.lock();
        for l in 0..n {
            let sent = lanes
                .get((l + rot) % lanes.len().max(1))
                .and_then(|lane| lane.tx.as_ref())
                .map(|tx| tx.send((t.clone(), l)));
            if !matches!(sent, Some(Ok(()))) {
                t.lane_done(Err(self.core.gone("disconnected")));
            }
        }
    }

    /// Runs a shared-memory or CMA transfer in the calling thread, as one lane.
    pub(crate) fn run_inline(&self, t: &Arc<Transfer>) {
        t.pending.store(1, Ordering::Release);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.run_lanes(t)))
            .unwrap_or_else(|_| Err(lane_panicked()));
        t.lane_done(r);
    }

    /// Moves every lane's frames of a shared-memory or CMA transfer.
    fn run_lanes(&self, t: &Transfer) -> Result<()> {
        let mut l = Vec::new();
        let mut r = Vec::new();
        for lane in 0..t.plan.lanes {
            match t.plan.path {
                Path::SharedMemory => run_shm(&self.core, t, lane)?,
                _ => run_cma(&self.core, t, lane, &mut l, &mut r)?,
            }
        }
        Ok(())
    }

    /// Sends a notification after every earlier post; errors only when this call sent
    /// it itself and sending failed.
    pub(crate) fn notify(&self, payload: Bytes) -> Result<()> {
        let s = self.next_seq();
        self.flush(s, Ready::Note(s, payload)).unwrap_or(Ok(()))
    }

    /// Queues `item` in sequence order and, unless another thread is sending, sends
    /// every item that is ready — without the sequencer lock held during the network
    /// I/O. Returns the send result of the notification `item` when it is one and this
    /// call sent it.
    fn flush(&self, seq: u64, item: Ready) -> Option<Result<()>> {
        let mine = match &item {
            Ready::Note(s, _) => Some(*s),
            Ready::Transfer(..) => None,
        };
        let mut q = self.seq.lock();
        // In-order completion (the common case) skips the map: no allocation.
        if seq == q.head {
            q.out.push_back(item);
            q.head += 1;
        } else {
            q.ready.insert(seq, item);
        }
        while !q.ready.is_empty() {
            let head = q.head;
            match q.ready.remove(&head) {
                Some(i) => {
                    q.out.push_back(i);
                    q.head += 1;
                }
                None => break,
            }
        }
        if q.sending {
            return None; // the sending thread picks it up, in order
        }
        q.sending = true;
        let mut result = None;
        while let Some(item) = q.out.pop_front() {
            MutexGuard::unlocked(&mut q, || match item {
                Ready::Transfer(seq, t) => t.settle(seq, |n| self.core.send_notify(n)),
                Ready::Note(s, n) => {
                    let r = self.core.send_notify(&n);
                    if Some(s) == mine {
                        result = Some(r);
                    } else if let Err(e) = r {
                        tracing::warn!("notification to {} lost: {e}", self.core.name);
                    }
                }
            });
        }
        q.sending = false;
        result
    }

    /// Stops the lanes (in-flight transfers fail with `RemoteDisconnected`) and closes
    /// the connections. Waits for the lane threads.
    pub(crate) fn close(&self) {
        self.core.closed.store(true, Ordering::Release);
        let mut lanes = std::mem::take(&mut *self.lanes.lock());
        for l in &mut lanes {
            l.tx = None;
        }
        for l in &mut lanes {
            if let Some(t) = l.thread.take() {
                let _ = t.join();
            }
        }
        if let Some(t) = self.ctl_reader.lock().take() {
            let _ = t.join();
        }
        self.core.close_control();
    }
}

impl Completion for Peer {
    /// A post's data is done: queue it (or send in order).
    fn complete(&self, seq: u64, t: Arc<Transfer>) {
        self.core.completions.fetch_add(1, Ordering::Relaxed);
        self.flush(seq, Ready::Transfer(seq, t));
    }
}

fn lane_main(core: Arc<PeerCore>, rx: Receiver<(Arc<Transfer>, usize)>) {
    let mut conn: Option<Channel> = None;
    let mut iov: Vec<libc::iovec> = Vec::new();
    let mut riov: Vec<libc::iovec> = Vec::new();
    while let Ok((t, lane)) = rx.recv() {
        // A panicking lane fails its transfer instead of leaving it running forever.
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match t.plan.path {
            Path::SharedMemory => run_shm(&core, &t, lane),
            Path::CrossMemoryAttach => run_cma(&core, &t, lane, &mut iov, &mut riov),
            Path::Tcp => run_tcp(&core, &mut conn, &t, lane, &mut iov),
        }))
        .unwrap_or_else(|_| {
            conn = None; // may be out of step with the peer
            Err(lane_panicked())
        });
        iov.clear();
        riov.clear();
        t.lane_done(r);
    }
}

/// The error of a lane that panicked.
fn lane_panicked() -> Error {
    Error::Backend {
        name: "tcp".into(),
        code: 0,
        message: "a transfer worker panicked (bug); the transfer failed".into(),
    }
}

/// Checks cancel, disconnect, revocation and deadline between frames of a same-host
/// lane.
fn same_host_tick(core: &PeerCore, t: &Transfer, deadline: Option<Instant>) -> Result<()> {
    if t.cancel.load(Ordering::Acquire) {
        return Err(Error::Canceled);
    }
    if core.closed.load(Ordering::Acquire) {
        return Err(core.gone("disconnected"));
    }
    if let Some(h) = t
        .plan
        .remotes
        .iter()
        .find(|h| h.is_revoked() || h.is_pending())
    {
        if core.peer_gone() {
            return Err(core.gone("process exited (control connection closed)"));
        }
        return Err(Error::NotRegistered(format!(
            "RemoteId#{}: the peer deregistered the registration during the transfer (or \
             its control connection was lost)",
            h.id
        )));
    }
    if deadline.is_some_and(|d| Instant::now() >= d) {
        return Err(Error::TimedOut {
            what: format!("same-host {} with {}", t.plan.op, core.name),
            after: Duration::ZERO,
        });
    }
    Ok(())
}

/// Moves one lane's frames with memory copies between local memory and the peer's
/// mapped memfd. Copies cannot fail (the mapping keeps the pages alive), so before
/// reporting success the lane checks that the peer's control connection is still up:
/// a transfer to a peer that died ends with `RemoteDisconnected`, as over CMA or TCP.
fn run_shm(core: &PeerCore, t: &Transfer, lane: usize) -> Result<()> {
    let deadline = t.state.lock().deadline;
    // A large post streams past the caches (see `os::copy_streaming`).
    let copy = if t.plan.total >= os::STREAMING_MIN {
        os::copy_streaming
    } else {
        os::copy
    };
    for f in t.plan.lane_frames(lane) {
        same_host_tick(core, t, deadline)?;
        for s in &t.plan.segs[f.segs.clone()] {
            // SAFETY: local ranges lie in registrations pinned by this post (the caller
            // of `post` keeps them valid and untouched); `s.remote` was translated at
            // prepare into a mapping held by the plan (`plan.maps`) and checked to lie
            // inside the peer's exported registration, so both ranges are mapped for
            // the whole copy. The peer may touch its side concurrently (its contract),
            // which gives torn data, never a fault: the copy uses raw pointers only.
            unsafe {
                match t.plan.op {
                    Op::Write => copy(s.remote, s.local, s.len),
                    Op::Read => copy(s.local, s.remote, s.len),
                }
            }
        }
    }
    if core.peer_gone() {
        return Err(core.gone("process exited (control connection closed)"));
    }
    Ok(())
}

/// Moves one lane's frames with `process_vm_writev`/`readv`.
fn run_cma(
    core: &PeerCore,
    t: &Transfer,
    lane: usize,
    l: &mut Vec<libc::iovec>,
    r: &mut Vec<libc::iovec>,
) -> Result<()> {
    let deadline = t.state.lock().deadline;
    let dir = match t.plan.op {
        Op::Write => CmaDir::Write,
        Op::Read => CmaDir::Read,
    };
    for f in t.plan.lane_frames(lane) {
        same_host_tick(core, t, deadline)?;
        l.clear();
        r.clear();
        for s in &t.plan.segs[f.segs.clone()] {
            l.push(sys::iovec(s.local, s.len));
            r.push(sys::iovec(s.remote, s.len));
        }
        let Some((_, pid)) = core.process() else {
            return Err(core.gone("no verified same-host process"));
        };
        // SAFETY: local ranges lie in registrations pinned by this post (the caller of
        // `post` keeps them valid); remote ranges were checked against what the peer
        // exported at prepare and validated live with it (imports are revoked before
        // its deregister returns). The kernel refuses remote ranges that are not
        // mapped; `pid` is the peer's as the kernel named it for its Unix socket.
        let n = unsafe { os::cma(dir, pid, l, r) };
        match n {
            Ok(n) if n as u64 == f.bytes => {}
            Ok(_) | Err(_) if core.peer_gone() => return Err(core.gone("process exited")),
            Ok(n) => {
                return Err(Error::OutOfBounds(format!(
                    "cross-memory {} moved {n} of {} bytes: the peer unmapped its memory",
                    t.plan.op, f.bytes
                )))
            }
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {
                return Err(core.gone("process exited"))
            }
            Err(e) => {
                return Err(Error::Backend {
                    name: "tcp".into(),
                    code: i64::from(e.raw_os_error().unwrap_or(0)),
                    message: format!("cross-memory {} with {}: {e}", t.plan.op, core.name),
                })
            }
        }
    }
    Ok(())
}

/// A lane's failure: whether the connection is still in step with the peer.
struct LaneError {
    e: Error,
    broken: bool,
}

impl From<Error> for LaneError {
    fn from(e: Error) -> LaneError {
        LaneError { e, broken: true }
    }
}

fn run_tcp(
    core: &PeerCore,
    conn: &mut Option<Channel>,
    t: &Transfer,
    lane: usize,
    iov: &mut Vec<libc::iovec>,
) -> Result<()> {
    if core.closed.load(Ordering::Acquire) {
        return Err(core.gone("disconnected"));
    }
    let deadline = t.state.lock().deadline;
    if t.cancel.load(Ordering::Acquire) {
        return Err(Error::Canceled);
    }
    if deadline.is_some_and(|d| Instant::now() >= d) {
        // Queued behind a lane that blocked: fail at the deadline, not after a connect.
        return Err(Error::TimedOut {
            what: format!("tcp {} with {}", t.plan.op, core.name),
            after: Duration::ZERO,
        });
    }
    if conn.is_none() {
        *conn = Some(core.open(ChannelKind::Data, false, deadline)?);
    }
    let Some(s) = conn.as_ref() else {
        return Err(core.gone("no connection"));
    };
    let r = match t.plan.op {
        Op::Write => tcp_write(core, s, t, lane, iov),
        Op::Read => tcp_read(core, s, t, lane, iov),
    };
    match r {
        Ok(()) => Ok(()),
        Err(LaneError { e, broken }) => {
            if broken {
                s.shutdown();
                *conn = None;
            }
            Err(e)
        }
    }
}

fn watch<'a>(core: &'a PeerCore, t: &'a Transfer, cancel: bool) -> Watch<'a> {
    let mut w = Watch::new(&core.name, core.opts.io_timeout);
    w.deadline = t.state.lock().deadline;
    w.shutdown = Some(&core.closed);
    if cancel {
        w.cancel = Some(&t.cancel);
    }
    w
}

/// Reads one answer frame (into `raw`); ERROR frames become a target-refused error
/// that leaves the connection usable.
fn answer(
    s: &Channel,
    t: &Transfer,
    want: FrameOp,
    raw: &mut Vec<u8>,
    w: &mut Watch<'_>,
) -> std::result::Result<Header, LaneError> {
    let h = s.recv_frame(raw, w)?;
    if h.id != t.id {
        return Err(Error::invalid_metadata(format!(
            "answer for request {} while waiting for {}",
            h.id, t.id
        ))
        .into());
    }
    match h.op {
        op if op == want => Ok(h),
        FrameOp::Error => Err(LaneError {
            e: wire::ErrorCode::to_error(h.status, &message(raw)),
            broken: false,
        }),
        op => Err(Error::invalid_metadata(format!("unexpected {op:?} frame")).into()),
    }
}

/// Keeps the first target-refused error; a broken connection ends the lane.
fn note(
    r: std::result::Result<Header, LaneError>,
    first: &mut Option<LaneError>,
) -> std::result::Result<(), LaneError> {
    match r {
        Ok(_) => Ok(()),
        Err(e) if !e.broken => {
            first.get_or_insert(e);
            Ok(())
        }
        Err(e) => Err(e),
    }
}

fn tcp_write(
    core: &PeerCore,
    s: &Channel,
    t: &Transfer,
    lane: usize,
    iov: &mut Vec<libc::iovec>,
) -> std::result::Result<(), LaneError> {
    let mut w = watch(core, t, true);
    let mut raw = Vec::new();
    let mut outstanding = 0usize;
    let mut first: Option<LaneError> = None;
    for f in t.plan.lane_frames(lane) {
        if t.cancel.load(Ordering::Acquire) {
            first.get_or_insert(LaneError {
                e: Error::Canceled,
                broken: false,
            });
            break;
        }
        iov.clear();
        // Header (with its table) and tag go first; `send_parts` fills them in.
        iov.extend([sys::iovec(0, 0), sys::iovec(0, 0)]);
        for seg in &t.plan.segs[f.segs.clone()] {
            iov.push(sys::iovec(seg.local, seg.len));
        }
        // SAFETY: the local ranges lie in registrations pinned by this post, which the
        // caller of `post` keeps valid until it ends.
        unsafe { s.send_parts(&f.head, iov, &mut w)? };
        outstanding += 1;
        if outstanding == WRITE_WINDOW {
            let mut aw = watch(core, t, false);
            note(answer(s, t, FrameOp::Ack, &mut raw, &mut aw), &mut first)?;
            outstanding -= 1;
        }
    }
    // Local memory is no longer read; wait for the ACKs without the cancel flag so the
    // connection stays in step.
    let mut aw = watch(core, t, false);
    while outstanding > 0 {
        note(answer(s, t, FrameOp::Ack, &mut raw, &mut aw), &mut first)?;
        outstanding -= 1;
    }
    match first {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn tcp_read(
    core: &PeerCore,
    s: &Channel,
    t: &Transfer,
    lane: usize,
    iov: &mut Vec<libc::iovec>,
) -> std::result::Result<(), LaneError> {
    let mut w = watch(core, t, true);
    let mut raw = Vec::new();
    for f in t.plan.lane_frames(lane) {
        if t.cancel.load(Ordering::Acquire) {
            return Err(LaneError {
                e: Error::Canceled,
                broken: false,
            });
        }
        let mut head = [sys::iovec(0, 0), sys::iovec(0, 0)];
        // SAFETY: no payload follows a READ request; only `f.head` and its tag are sent.
        unsafe { s.send_parts(&f.head, &mut head, &mut w)? };
        let h = answer(s, t, FrameOp::Data, &mut raw, &mut w)?;
        if h.len != f.bytes {
            return Err(Error::invalid_metadata(format!(
                "DATA of {} bytes for a READ of {}",
                h.len, f.bytes
            ))
            .into());
        }
        iov.clear();
        for seg in &t.plan.segs[f.segs.clone()] {
            iov.push(sys::iovec(seg.local, seg.len));
        }
        // SAFETY: the local ranges lie in registrations pinned by this post; the caller
        // of `post` promised they stay valid and untouched until it ends.
        unsafe { s.recv_payload(iov, &mut w)? };
    }
    Ok(())
}
