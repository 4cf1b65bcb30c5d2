//! Prepared transfers: post many times, poll, wait, cancel, telemetry.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kv_core::{
    DescriptorList, Error, MemKind, Op, PostOptions, Result, Status, TransferId, TransferRequest,
};
use parking_lot::Mutex;

use crate::choice::{self, Need};
use crate::pace::Pace;
use crate::peers::{PeerEntry, PeerId};
use crate::registry::{check_local_writable, LoadedBackend, RegionEntry};
use crate::shared::Shared;
use crate::slow::Deferred;

/// What to move: a local and a remote descriptor list of equal total length. Plain
/// struct; `Clone`, `Send + Sync`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferSpec {
    /// Direction: WRITE pushes local → remote, READ pulls remote → local.
    pub op: Op,
    /// Kind of the local memory.
    pub local_kind: MemKind,
    /// Local ranges (inside registered regions).
    pub local: DescriptorList,
    /// The peer.
    pub peer: PeerId,
    /// Kind of the remote memory.
    pub remote_kind: MemKind,
    /// Remote ranges (inside regions the peer published).
    pub remote: DescriptorList,
    /// Use this backend only (else the agent chooses).
    pub backend: Option<String>,
    /// Deadline of each post (else the agent's default).
    pub deadline: Option<Duration>,
}

impl TransferSpec {
    /// A transfer between `local` memory of `local_kind` and the peer's `remote` memory
    /// of `remote_kind` (VRAM → VRAM for GPU engines, DRAM → FILE for offload, …).
    pub fn new(
        op: Op,
        local_kind: MemKind,
        local: DescriptorList,
        peer: PeerId,
        remote_kind: MemKind,
        remote: DescriptorList,
    ) -> Self {
        TransferSpec {
            op,
            local_kind,
            local,
            peer,
            remote_kind,
            remote,
            backend: None,
            deadline: None,
        }
    }

    /// A DRAM → DRAM WRITE (set other kinds with [`TransferSpec::with_kinds`]).
    pub fn write(local: DescriptorList, peer: PeerId, remote: DescriptorList) -> Self {
        Self::new(Op::Write, MemKind::Dram, local, peer, MemKind::Dram, remote)
    }

    /// A DRAM ← DRAM READ (set other kinds with [`TransferSpec::with_kinds`]).
    pub fn read(local: DescriptorList, peer: PeerId, remote: DescriptorList) -> Self {
        Self::new(Op::Read, MemKind::Dram, local, peer, MemKind::Dram, remote)
    }

    /// The same transfer between memory of other kinds.
    pub fn with_kinds(mut self, local_kind: MemKind, remote_kind: MemKind) -> Self {
        self.local_kind = local_kind;
        self.remote_kind = remote_kind;
        self
    }
}

/// What a transfer was resolved to before the backend prepares it: the backend, the
/// peer, the local regions it pins and the remote regions it names (with the peer's
/// epoch they were checked at).
pub(crate) struct Resolved {
    pub(crate) backend: Arc<LoadedBackend>,
    pub(crate) peer: Arc<PeerEntry>,
    pub(crate) local: Vec<Arc<RegionEntry>>,
    pub(crate) remote_ids: Vec<u64>,
    pub(crate) epoch: u64,
    pub(crate) deadline: Option<Duration>,
    /// Why the agent chose `backend` (and passed over the others).
    pub(crate) choice: String,
}

/// Timing and size of a transfer's last post. `Clone`, `Send + Sync`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferTelemetry {
    /// The backend that carries it.
    pub backend: String,
    /// Bytes per post.
    pub bytes: u64,
    /// Descriptors per post (local side, expanded).
    pub descriptors: u64,
    /// How long `prepare` took.
    pub prepare_time: Duration,
    /// When the last post started.
    pub posted_at: Option<Instant>,
    /// When the last post finished (completed, failed or cancelled).
    pub completed_at: Option<Instant>,
    /// Number of posts so far.
    pub posts: u64,
}

impl TransferTelemetry {
    /// Post-to-completion time of the last post, once it finished.
    pub fn duration(&self) -> Option<Duration> {
        Some(
            self.completed_at?
                .saturating_duration_since(self.posted_at?),
        )
    }
}

struct State {
    /// A post is outstanding and its regions are pinned.
    pinned: bool,
    last: Status,
    deadline_at: Option<Instant>,
    posted_at: Option<Instant>,
    completed_at: Option<Instant>,
    posts: u64,
    /// A cancel after the deadline running on a helper thread (`poll` never waits).
    cancelling: Option<Deferred<Result<Status>>>,
}

/// A prepared transfer. Post it with [`Transfer::post`], then [`Transfer::wait`] or
/// [`Transfer::poll`]; post again once it finished. While posted it keeps its local
/// regions registered and alive; dropping it cancels an outstanding post.
///
/// `Send + Sync`: each transfer has its own small lock, so threads posting different
/// transfers never contend.
pub struct Transfer {
    shared: Arc<Shared>,
    backend: Arc<LoadedBackend>,
    id: TransferId,
    peer: Arc<PeerEntry>,
    local: Vec<Arc<RegionEntry>>,
    /// Remote region ids it writes or reads, and the peer epoch they were last checked at.
    remote_ids: Vec<u64>,
    epoch: std::sync::atomic::AtomicU64,
    bytes: u64,
    descriptors: u64,
    deadline: Duration,
    prepare_time: Duration,
    /// Why the agent chose `backend` (and passed over the others).
    choice: String,
    state: Mutex<State>,
}

impl std::fmt::Debug for Transfer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transfer")
            .field("backend", &self.backend.name)
            .field("peer", &self.peer.name)
            .field("bytes", &self.bytes)
            .finish_non_exhaustive()
    }
}

impl Transfer {
    pub(crate) fn prepare(shared: &Arc<Shared>, spec: &TransferSpec) -> Result<Transfer> {
        let start = Instant::now();
        if spec.local.total_bytes() != spec.remote.total_bytes() || spec.local.total_bytes() == 0 {
            return Err(Error::invalid_argument(format!(
                "local list has {} bytes and remote list {}; they must be equal and non-zero",
                spec.local.total_bytes(),
                spec.remote.total_bytes()
            )));
        }
        let peer = shared.peers.get(spec.peer)?;
        peer.check_current()?;
        // Read before importing: a withdrawal racing with this prepare makes the first
        // post re-check.
        let epoch = peer.epoch.load(std::sync::atomic::Ordering::Acquire);
        let local = shared
            .registry
            .local_regions_for(spec.local_kind, &spec.local)?;
        let (remote_ids, remote_backends) = peer.regions_for(spec.remote_kind, &spec.remote)?;
        match spec.op {
            Op::Write => peer.check_writable(&remote_ids)?,
            Op::Read => check_local_writable(&local)?,
        }
        let need = Need {
            op: spec.op,
            local_kind: spec.local_kind,
            local: &spec.local,
            remote_kind: spec.remote_kind,
            remote: &spec.remote,
            backend: spec.backend.as_deref(),
        };
        let chosen = choice::for_transfer(
            &shared.registry,
            &shared.opts.backend_preference,
            &need,
            &local,
            &remote_backends,
            &peer,
        )?;
        let backend = chosen.backend;
        let ep = peer.endpoint(&backend)?;
        for id in &remote_ids {
            peer.import(&backend, ep, *id)?;
        }
        let req = TransferRequest {
            op: spec.op,
            local_kind: spec.local_kind,
            local: spec.local.clone(),
            peer: ep,
            remote_kind: spec.remote_kind,
            remote: spec.remote.clone(),
        };
        let resolved = Resolved {
            choice: chosen.reason,
            backend,
            peer,
            local,
            remote_ids,
            epoch,
            deadline: spec.deadline,
        };
        Self::from_resolved(shared, resolved, &req, start)
    }

    /// Has the backend prepare `req` (whose regions, backend and imports `r` resolved)
    /// and wraps it; `start` is when preparing began, for telemetry.
    pub(crate) fn from_resolved(
        shared: &Arc<Shared>,
        r: Resolved,
        req: &TransferRequest,
        start: Instant,
    ) -> Result<Transfer> {
        let id = r.backend.backend.prepare(req)?;
        let size = (req.local.total_bytes(), req.local.len());
        Ok(Self::from_backend(shared, r, id, size, start))
    }

    /// Wraps transfer `id` the backend prepared as `r` resolved it; `size` is its
    /// (bytes, local descriptors) per post.
    pub(crate) fn from_backend(
        shared: &Arc<Shared>,
        r: Resolved,
        id: TransferId,
        (bytes, descriptors): (u64, u64),
        start: Instant,
    ) -> Transfer {
        Transfer {
            shared: shared.clone(),
            bytes,
            descriptors,
            deadline: r.deadline.unwrap_or(shared.opts.default_deadline),
            prepare_time: start.elapsed(),
            choice: r.choice,
            backend: r.backend,
            id,
            peer: r.peer,
            local: r.local,
            remote_ids: r.remote_ids,
            epoch: std::sync::atomic::AtomicU64::new(r.epoch),
            state: Mutex::new(State {
                pinned: false,
                last: Status::Idle,
                deadline_at: None,
                posted_at: None,
                completed_at: None,
                posts: 0,
                cancelling: None,
            }),
        }
    }

    /// The backend the agent chose for this transfer.
    pub fn backend(&self) -> &str {
        &self.backend.name
    }

    /// Why the agent chose this backend, and why it passed over each other loaded one
    /// (e.g. `"tcp: first candidate in backend_preference; passed over: ucx (cannot
    /// reach the peer: …)"`).
    pub fn choice_reason(&self) -> &str {
        &self.choice
    }

    /// The peer it moves data to or from.
    pub fn peer(&self) -> PeerId {
        self.peer.id
    }

    /// Bytes moved per post.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Starts the transfer; `notification` reaches the peer after the data. Fails with
    /// [`Error::Busy`] while a previous post is outstanding.
    pub fn post(&self, notification: Option<Bytes>) -> Result<()> {
        let mut st = self.state.lock();
        if st.pinned {
            return Err(Error::Busy("the previous post has not finished".into()));
        }
        self.peer.check_current()?;
        self.peer
            .check_remote_regions(&self.backend.name, &self.remote_ids, &self.epoch)?;
        for (i, r) in self.local.iter().enumerate() {
            if let Err(e) = r.pin() {
                for r in &self.local[..i] {
                    self.shared.registry.unpin(r);
                }
                return Err(e);
            }
        }
        let now = Instant::now();
        let deadline_at = deadline_from_now(self.deadline);
        let opts = PostOptions {
            notification,
            deadline: Some(deadline_at),
        };
        // SAFETY: every local range lies in a region this transfer holds (`self.local`
        // keeps the memory alive) and pinned above (a pin defers its
        // deregistration) until `finish` runs after the backend reported the end or
        // `cancel` returned.
        if let Err(e) = unsafe { self.backend.backend.post(self.id, &opts) } {
            for r in &self.local {
                self.shared.registry.unpin(r);
            }
            return Err(e);
        }
        st.pinned = true;
        st.last = Status::InProgress;
        st.deadline_at = Some(deadline_at);
        st.posted_at = Some(now);
        st.completed_at = None;
        st.posts += 1;
        self.backend.stats.lock().posted += 1;
        Ok(())
    }

    /// Records the end of the outstanding post and unpins its regions; a deregistration
    /// that becomes due runs here if `inline`, else on a helper thread.
    fn finish(&self, st: &mut State, status: Status, inline: bool) {
        if st.pinned {
            st.pinned = false;
            for r in &self.local {
                if inline {
                    self.shared.registry.unpin(r);
                } else {
                    self.shared.unpin_later(r);
                }
            }
            st.completed_at = Some(Instant::now());
            let mut stats = self.backend.stats.lock();
            match status {
                Status::Done => {
                    stats.completed += 1;
                    stats.bytes += self.bytes;
                }
                _ => stats.failed += 1,
            }
        }
        st.last = status;
    }

    /// The state of the last post; never blocks. A post past its deadline is reported
    /// as [`Error::TimedOut`] at once; its cancel (and any deregistration that becomes
    /// due) runs on a helper thread, and the regions stay pinned — a new `post` is
    /// `Busy` — until the backend let go.
    pub fn poll(&self) -> Status {
        self.poll_with(false)
    }

    /// `poll`, running the cancel and deregistration that are due here (blocking) if
    /// `inline`, else on a helper thread.
    fn poll_with(&self, inline: bool) -> Status {
        let mut st = self.state.lock();
        if let Some(job) = st.cancelling.take() {
            let done = if inline {
                Some(job.take())
            } else {
                job.try_take()
            };
            match done {
                Some(r) => self.cancelled(&mut st, r.and_then(|x| x), inline),
                None => st.cancelling = Some(job),
            }
            return st.last.clone();
        }
        if !st.pinned {
            return st.last.clone();
        }
        let s = self.backend.backend.poll(self.id);
        match s {
            Status::Done | Status::Failed(_) => self.finish(&mut st, s, inline),
            Status::InProgress | Status::Idle => {
                if st.deadline_at.is_some_and(|d| Instant::now() > d) {
                    let timed_out = Error::TimedOut {
                        what: format!(
                            "{}-byte transfer to {} over {}",
                            self.bytes, self.peer.name, self.backend.name
                        ),
                        after: self.deadline,
                    };
                    if inline {
                        let r = cancel_after_deadline(&self.backend, self.id, timed_out);
                        self.cancelled(&mut st, r, true);
                    } else {
                        st.last = Status::Failed(timed_out.clone());
                        let (b, id) = (self.backend.clone(), self.id);
                        st.cancelling = Some(
                            self.shared
                                .defer(move |_| cancel_after_deadline(&b, id, timed_out)),
                        );
                    }
                }
            }
        }
        st.last.clone()
    }

    /// The end of a cancel after the deadline: the backend let go (`Ok`), or it may
    /// still touch the memory (`Err`): stay pinned (no deregistration, memory kept) and
    /// report the failure.
    fn cancelled(&self, st: &mut State, r: Result<Status>, inline: bool) {
        match r {
            Ok(s) => self.finish(st, s, inline),
            Err(e) => {
                tracing::error!(error = %e, "cancel after the deadline failed; keeping the regions pinned");
                st.last = Status::Failed(e);
            }
        }
    }

    /// Drives progress until the last post finishes (or its deadline passes).
    pub fn wait(&self) -> Result<()> {
        let mut pace = Pace::default();
        loop {
            self.shared.progress_for_wait(&self.backend)?;
            match self.poll_with(true) {
                Status::Done => return Ok(()),
                Status::Failed(e) => return Err(e),
                Status::Idle => {
                    return Err(Error::invalid_argument(
                        "wait on a transfer that was never posted",
                    ))
                }
                Status::InProgress => pace.idle(),
            }
        }
    }

    /// Waits like [`Transfer::wait`], from async code (tokio's timer drives the polling);
    /// like `poll`, it never blocks on a cancel or a deregistration.
    #[cfg(feature = "tokio")]
    pub async fn wait_async(&self) -> Result<()> {
        loop {
            self.shared.progress_for_wait(&self.backend)?;
            // Never block the executor: a cancel after the deadline runs on a helper.
            match self.poll() {
                Status::Done => return Ok(()),
                Status::Failed(e) => return Err(e),
                Status::Idle => {
                    return Err(Error::invalid_argument(
                        "wait on a transfer that was never posted",
                    ))
                }
                Status::InProgress => tokio::time::sleep(Duration::from_micros(50)).await,
            }
        }
    }

    /// Stops an outstanding post. When it returns, the backend no longer touches the
    /// memory and the regions are the caller's again.
    pub fn cancel(&self) -> Result<()> {
        let mut st = self.state.lock();
        if let Some(job) = st.cancelling.take() {
            // A cancel after the deadline is running: its end is this cancel's.
            return match job.take().and_then(|x| x) {
                Ok(s) => {
                    self.finish(&mut st, s, true);
                    Ok(())
                }
                Err(e) => {
                    st.last = Status::Failed(e.clone());
                    Err(e)
                }
            };
        }
        if !st.pinned {
            return Ok(());
        }
        self.backend.backend.cancel(self.id)?;
        let s = match self.backend.backend.poll(self.id) {
            Status::Done => Status::Done,
            _ => Status::Failed(Error::Canceled),
        };
        self.finish(&mut st, s, true);
        Ok(())
    }

    /// Size, backend and timing of the last post.
    pub fn telemetry(&self) -> TransferTelemetry {
        let st = self.state.lock();
        TransferTelemetry {
            backend: self.backend.name.clone(),
            bytes: self.bytes,
            descriptors: self.descriptors,
            prepare_time: self.prepare_time,
            posted_at: st.posted_at,
            completed_at: st.completed_at,
            posts: st.posts,
        }
    }
}

impl Drop for Transfer {
    fn drop(&mut self) {
        if let Err(e) = self.cancel() {
            // The backend may still touch the memory: leak our hold on it (and leave it
            // pinned, so it is never deregistered) rather than free it under the device.
            tracing::error!(error = %e, "cancel on drop failed; leaking the transfer's regions");
            std::mem::forget(std::mem::take(&mut self.local));
            return;
        }
        if let Err(e) = self.backend.backend.release(self.id) {
            tracing::debug!(error = %e, "release on drop failed");
        }
    }
}

/// Cancels transfer `id` on `b` after its deadline passed: `Done` if it finished
/// meanwhile, else `timed_out`; `Err` if the backend may still touch the memory.
fn cancel_after_deadline(b: &LoadedBackend, id: TransferId, timed_out: Error) -> Result<Status> {
    b.backend.cancel(id)?;
    Ok(match b.backend.poll(id) {
        Status::Done => Status::Done,
        _ => Status::Failed(timed_out),
    })
}

/// Returns a deadline `d` from now (saturating).
fn deadline_from_now(d: Duration) -> Instant {
    Instant::now()
        .checked_add(d)
        .unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400 * 365))
}
