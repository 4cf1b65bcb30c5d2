//! Prepared transfers: the route (which registrations and imports the ranges lie in,
//! and the [`Path`] the data takes) and the plan computed once at `prepare` (segments
//! split into frames, frame headers encoded), and the per-post state shared with the
//! worker threads.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kv_core::{
    segments, Descriptor, Error, Op, PostOptions, Result, Status, TransferId, TransferRequest,
};
use parking_lot::{Condvar, Mutex};

use crate::memory::{find_containing, LocalReg, Registry};
use crate::remote::{Imported, RemoteHandle};
use crate::shm::Import;
use crate::wire::{self, FrameOp, Header, WireSegment};

/// How a prepared transfer moves its data ([`TcpBackend::transfer_path`](crate::TcpBackend::transfer_path)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Path {
    /// Memory copies into/out of the peer's memfd, mapped at `import_remote`.
    SharedMemory,
    /// `process_vm_writev`/`process_vm_readv` into the peer's address space.
    CrossMemoryAttach,
    /// Frames over the TCP data connections.
    Tcp,
}

impl Path {
    /// Short name: `shm`, `cma` or `tcp`.
    pub fn as_str(self) -> &'static str {
        match self {
            Path::SharedMemory => "shm",
            Path::CrossMemoryAttach => "cma",
            Path::Tcp => "tcp",
        }
    }
}

impl std::fmt::Display for Path {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Posts made so far by each [`Path`] ([`TcpBackend::path_counts`](crate::TcpBackend::path_counts)). `Copy`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PathCounts {
    /// Posts over shared memory.
    pub shm: u64,
    /// Posts over cross-memory attach.
    pub cma: u64,
    /// Posts over TCP.
    pub tcp: u64,
}

/// Posts made so far by each [`Path`].
#[derive(Default)]
pub(crate) struct PostCounts([AtomicU64; 3]);

impl PostCounts {
    /// Counts one post by `path`.
    pub(crate) fn add(&self, path: Path) {
        self.0[match path {
            Path::SharedMemory => 0,
            Path::CrossMemoryAttach => 1,
            Path::Tcp => 2,
        }]
        .fetch_add(1, Ordering::Relaxed);
    }

    /// The counts so far.
    pub(crate) fn get(&self) -> PathCounts {
        let n = |i: usize| self.0[i].load(Ordering::Relaxed);
        PathCounts {
            shm: n(0),
            cma: n(1),
            tcp: n(2),
        }
    }
}

/// One piece of a transfer: `len` bytes between a local address and a remote one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PlanSeg {
    pub local: u64,
    /// The peer's address; on the shared-memory path, our address of it in the mapping.
    pub remote: u64,
    pub len: u64,
    /// The peer's key of the registration, as an index into the plan's `keys` (a
    /// segment of 32 bytes, not 48: plans of thousands of blocks are built per request).
    pub key: u32,
}

/// A run of segments sent as one frame (or moved by one CMA call batch).
#[derive(Debug)]
pub(crate) struct Frame {
    pub segs: Range<usize>,
    pub bytes: u64,
    /// Header and segment table, encoded once (TCP peers only).
    pub head: Vec<u8>,
}

/// Everything `prepare` decides; immutable afterwards. `Send + Sync`.
#[derive(Debug)]
pub(crate) struct Plan {
    pub op: Op,
    pub segs: Vec<PlanSeg>,
    pub frames: Vec<Frame>,
    pub total: u64,
    pub local_regs: Vec<Arc<LocalReg>>,
    /// How many lanes (worker threads) the frames are spread over.
    pub lanes: usize,
    /// How the data moves.
    pub path: Path,
    /// The peer registrations mapped for the shared-memory path, kept mapped while
    /// this plan exists (even if the import is released meanwhile). Held, never read.
    #[allow(dead_code)]
    pub maps: Vec<Arc<Import>>,
    /// The imports (`RemoteId`s) the remote ranges lie in: a post is refused once one
    /// was released or revoked, and counts itself in on them while it runs.
    pub remotes: Vec<Arc<RemoteHandle>>,
}

impl Plan {
    /// Splits `segs` (already merged where contiguous) into frames of about
    /// `frame_bytes` and at most [`wire::MAX_SEGMENTS`] segments, spread over `lanes`;
    /// frame headers are encoded for the TCP path only.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn build(
        id: u64,
        op: Op,
        segs: Vec<PlanSeg>,
        local_regs: Vec<Arc<LocalReg>>,
        lanes: usize,
        max_frame: u64,
        path: Path,
        maps: Vec<Arc<Import>>,
        remotes: Vec<Arc<RemoteHandle>>,
        keys: Vec<u128>,
    ) -> Plan {
        let encode = path == Path::Tcp;
        let total: u64 = segs.iter().map(|s| s.len).sum();
        let lanes = lanes.max(1);
        let frame_bytes = total
            .div_ceil(lanes as u64)
            .clamp(64 << 10, max_frame.max(4096));
        let (out_segs, mut frames) = match frames_in_place(&segs, frame_bytes) {
            // No frame boundary falls inside a segment (blocks that divide the frame
            // size): the segments are kept as they are, not copied.
            Some(frames) => (segs, frames),
            None => split_into_frames(segs, frame_bytes),
        };
        if encode {
            let mut table = Vec::new();
            for f in &mut frames {
                let segs = &out_segs[f.segs.clone()];
                let first = segs[0];
                let single = segs.len() == 1;
                let h = Header {
                    op: match op {
                        Op::Write => FrameOp::Write,
                        Op::Read => FrameOp::Read,
                    },
                    status: 0,
                    id,
                    key: if single { keys[first.key as usize] } else { 0 },
                    addr: if single { first.remote } else { 0 },
                    len: f.bytes,
                    count: segs.len() as u32,
                };
                f.head.extend_from_slice(&wire::encode_header(&h));
                if !single {
                    table.clear();
                    table.extend(segs.iter().map(|s| WireSegment {
                        key: keys[s.key as usize],
                        addr: s.remote,
                        len: s.len,
                    }));
                    wire::encode_segments(&table, &mut f.head);
                }
            }
        }
        let lanes = lanes.min(frames.len()).max(1);
        Plan {
            op,
            segs: out_segs,
            frames,
            total,
            local_regs,
            lanes,
            path,
            maps,
            remotes,
        }
    }

    /// The frames a lane moves.
    pub(crate) fn lane_frames(&self, lane: usize) -> impl Iterator<Item = &Frame> {
        let lanes = self.lanes;
        self.frames
            .iter()
            .enumerate()
            .filter(move |(i, _)| i % lanes == lane)
            .map(|(_, f)| f)
    }
}

/// The frames of `segs` when no frame boundary falls inside a segment (and none is
/// empty) — the frames [`split_into_frames`] makes of them then — or `None`.
fn frames_in_place(segs: &[PlanSeg], frame_bytes: u64) -> Option<Vec<Frame>> {
    let mut frames = Vec::new();
    let (mut start, mut bytes) = (0usize, 0u64);
    for (i, s) in segs.iter().enumerate() {
        bytes += s.len;
        if bytes > frame_bytes || s.len == 0 {
            return None;
        }
        if bytes == frame_bytes || i + 1 - start == wire::MAX_SEGMENTS as usize {
            frames.push(Frame {
                segs: start..i + 1,
                bytes,
                head: Vec::new(),
            });
            start = i + 1;
            bytes = 0;
        }
    }
    if start < segs.len() {
        frames.push(Frame {
            segs: start..segs.len(),
            bytes,
            head: Vec::new(),
        });
    }
    Some(frames)
}

/// Splits `segs` into frames of `frame_bytes` (the last one shorter) and at most
/// [`wire::MAX_SEGMENTS`] segments, cutting segments at frame boundaries.
fn split_into_frames(segs: Vec<PlanSeg>, frame_bytes: u64) -> (Vec<PlanSeg>, Vec<Frame>) {
    let mut out_segs = Vec::with_capacity(segs.len());
    let mut frames = Vec::new();
    let mut start = 0usize;
    let mut bytes = 0u64;
    for mut s in segs {
        while s.len > 0 {
            let take = s.len.min(frame_bytes - bytes);
            out_segs.push(PlanSeg { len: take, ..s });
            s.local += take;
            s.remote += take;
            s.len -= take;
            bytes += take;
            let n = out_segs.len() - start;
            if bytes == frame_bytes || n == wire::MAX_SEGMENTS as usize {
                frames.push(Frame {
                    segs: start..out_segs.len(),
                    bytes,
                    head: Vec::new(),
                });
                start = out_segs.len();
                bytes = 0;
            }
        }
    }
    if start < out_segs.len() {
        frames.push(Frame {
            segs: start..out_segs.len(),
            bytes,
            head: Vec::new(),
        });
    }
    (out_segs, frames)
}

/// Where a transfer's ranges lie: its segments (merged where contiguous), the local
/// registrations and the imports they lie in, and the path the data takes.
pub(crate) struct Route {
    pub segs: Vec<PlanSeg>,
    pub regs: Vec<Arc<LocalReg>>,
    pub path: Path,
    /// The mappings the segments address (shared-memory path only).
    pub maps: Vec<Arc<Import>>,
    pub remotes: Vec<Arc<RemoteHandle>>,
    /// The peer's keys the segments name (`PlanSeg::key` indexes it).
    pub keys: Vec<u128>,
}

/// Routes `req` through the local registrations `local` (sorted by address) and the
/// live `imports` from its peer (sorted by address); `cma` when the peer is on this
/// host and reachable by cross-memory attach. Every range must lie in one of each; a
/// READ never lands in a read-only local registration and a WRITE never goes to a
/// read-only import (`AccessDenied`; the target refuses such a WRITE anyway).
pub(crate) fn route(
    req: &TransferRequest,
    imports: &[Imported],
    local: &[Arc<LocalReg>],
    cma: bool,
) -> Result<Route> {
    let descs: Vec<Descriptor> = imports.iter().map(|(d, _, _, _)| *d).collect();
    let mut handles: Vec<Arc<RemoteHandle>> = Vec::new();
    // The shared-memory path needs every remote range in a mapped registration.
    let mut maps: Vec<Arc<Import>> = Vec::new();
    let mut all_mapped = cma;
    if !req.remote.within(&descs) {
        return Err(Error::OutOfBounds(
            "a remote descriptor lies outside what the peer registered".into(),
        ));
    }
    let mut segs: Vec<PlanSeg> = Vec::new();
    let mut regs: Vec<Arc<LocalReg>> = Vec::new();
    let mut keys: Vec<u128> = Vec::new();
    for s in segments(&req.local, &req.remote)? {
        let reg = find_containing(local, &s.local).ok_or_else(|| {
            Error::NotRegistered(format!(
                "local range {:#x}+{} lies outside every local registration",
                s.local.addr, s.local.len
            ))
        })?;
        if req.op == Op::Read && !reg.access.writable() {
            return Err(Error::AccessDenied(format!(
                "a READ into the read-only local registration {:#x}+{}",
                reg.desc.addr, reg.desc.len
            )));
        }
        if !regs.iter().any(|r| Arc::ptr_eq(r, reg)) {
            regs.push(reg.clone());
        }
        let end = imports.partition_point(|(d, _, _, _)| d.addr <= s.remote.addr);
        let (_, key, map, handle) = imports[..end]
            .iter()
            .rev()
            .find(|(d, _, _, _)| d.contains(&s.remote))
            .ok_or_else(|| {
                Error::OutOfBounds(format!(
                    "remote range {:#x}+{} lies outside what the peer registered",
                    s.remote.addr, s.remote.len
                ))
            })?;
        let key = match keys.iter().position(|k| k == key) {
            Some(i) => i as u32,
            None => {
                keys.push(*key);
                (keys.len() - 1) as u32
            }
        };
        if req.op == Op::Write && !handle.access().writable() {
            return Err(Error::AccessDenied(format!(
                "a WRITE into the peer's read-only registration (RemoteId#{})",
                handle.id
            )));
        }
        if !handles.iter().any(|h| Arc::ptr_eq(h, handle)) {
            handles.push(handle.clone());
        }
        match map {
            Some(m) if all_mapped => {
                if !maps.iter().any(|x| Arc::ptr_eq(x, m)) {
                    maps.push(m.clone());
                }
            }
            _ => all_mapped = false,
        }
        match segs.last_mut() {
            Some(p)
                if p.key == key
                    && p.local + p.len == s.local.addr
                    && p.remote + p.len == s.remote.addr =>
            {
                p.len += s.local.len
            }
            _ => segs.push(PlanSeg {
                local: s.local.addr,
                key,
                remote: s.remote.addr,
                len: s.local.len,
            }),
        }
    }
    let path = if all_mapped && !segs.is_empty() {
        // Address the peer's memory through our mappings. Merged segments share a
        // key, so each lies in one registration (the one its key names).
        for s in &mut segs {
            s.remote = maps
                .iter()
                .find_map(|m| m.translate(s.remote, s.len))
                .ok_or_else(|| {
                    Error::OutOfBounds(format!(
                        "remote range {:#x}+{} is not inside a mapped registration",
                        s.remote, s.len
                    ))
                })?;
        }
        Path::SharedMemory
    } else if cma {
        maps.clear();
        Path::CrossMemoryAttach
    } else {
        maps.clear();
        Path::Tcp
    };
    Ok(Route {
        segs,
        regs,
        path,
        maps,
        remotes: handles,
        keys,
    })
}

/// Where a post is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Never posted.
    Idle,
    /// Lanes are moving data.
    Running,
    /// Data moved (memory no longer touched); waiting for earlier posts to the same
    /// peer so the notification goes out in order.
    Flushing,
    /// The notification is being sent (memory no longer touched).
    Notifying,
    /// `status` is final.
    Finished,
}

#[derive(Debug)]
pub(crate) struct Slot {
    pub phase: Phase,
    pub status: Status,
    pub error: Option<Error>,
    pub notification: Option<Bytes>,
    pub deadline: Option<Instant>,
}

/// What a transfer needs from the peer it goes to (`endpoint::Peer`): a post whose
/// lanes all finished is handed back to it, to settle in post order. A type parameter
/// of [`Transfer`], so that this room does not import the peer's.
pub(crate) trait Completion: Sized {
    /// Takes post `seq` of `t`, whose data is done (moved or failed).
    fn complete(&self, seq: u64, t: Arc<Transfer<Self>>);
}

/// A prepared transfer to a peer `P` and the state of its current post. `Send + Sync`.
#[derive(Debug)]
pub(crate) struct Transfer<P> {
    pub id: u64,
    pub plan: Plan,
    pub peer: Arc<P>,
    pub state: Mutex<Slot>,
    pub cv: Condvar,
    /// Lanes still touching local memory for the current post.
    pub pending: AtomicUsize,
    pub cancel: AtomicBool,
    /// Sequence number of the current post among the peer's posts and notifications.
    pub seq: AtomicU64,
}

impl<P> Transfer<P> {
    pub(crate) fn new(id: u64, plan: Plan, peer: Arc<P>) -> Transfer<P> {
        Transfer {
            id,
            plan,
            peer,
            state: Mutex::new(Slot {
                phase: Phase::Idle,
                status: Status::Idle,
                error: None,
                notification: None,
                deadline: None,
            }),
            cv: Condvar::new(),
            pending: AtomicUsize::new(0),
            cancel: AtomicBool::new(false),
            seq: AtomicU64::new(0),
        }
    }

    pub(crate) fn status(&self) -> Status {
        let s = self.state.lock();
        match s.phase {
            Phase::Idle => Status::Idle,
            Phase::Running | Phase::Flushing | Phase::Notifying => Status::InProgress,
            Phase::Finished => s.status.clone(),
        }
    }

    /// Starts a post: refused while the previous one runs; pins the local
    /// registrations in `regs` and counts the post in on its imports (refused once one
    /// was released or revoked by the peer), then arms the lanes.
    pub(crate) fn begin(&self, regs: &Registry, opts: &PostOptions) -> Result<()> {
        let mut s = self.state.lock();
        if matches!(s.phase, Phase::Running | Phase::Flushing | Phase::Notifying) {
            return Err(Error::Busy(format!(
                "{} is already in progress",
                TransferId(self.id)
            )));
        }
        regs.pin(&self.plan.local_regs)?;
        // Refused once an import it addresses was released or revoked by the peer.
        if let Err(e) = RemoteHandle::enter_all(&self.plan.remotes) {
            Registry::unpin(&self.plan.local_regs);
            return Err(e);
        }
        s.phase = Phase::Running;
        s.status = Status::InProgress;
        s.error = None;
        s.notification = opts.notification.clone();
        s.deadline = opts.deadline;
        self.cancel.store(false, Ordering::Release);
        self.pending.store(self.plan.lanes, Ordering::Release);
        Ok(())
    }

    /// Called by the sequencer in post order: fail, or send the notification and finish.
    /// The state lock is not held while the notification is sent (`poll` never waits
    /// for the network).
    pub(crate) fn settle(&self, seq: u64, send: impl FnOnce(&Bytes) -> Result<()>) {
        let n = {
            let mut s = self.state.lock();
            if s.phase != Phase::Flushing || self.seq.load(Ordering::Acquire) != seq {
                return; // cancelled while flushing (and maybe posted again since)
            }
            let n = match (s.error.take(), s.notification.take()) {
                (Some(e), _) => Err(Status::Failed(e)),
                (None, None) => Err(Status::Done),
                (None, Some(n)) => Ok(n),
            };
            match n {
                Ok(n) => {
                    s.phase = Phase::Notifying;
                    n
                }
                Err(status) => {
                    s.status = status;
                    s.phase = Phase::Finished;
                    self.cv.notify_all();
                    return;
                }
            }
        };
        let status = match send(&n) {
            Ok(()) => Status::Done,
            Err(e) => Status::Failed(e),
        };
        let mut s = self.state.lock();
        s.status = status;
        s.phase = Phase::Finished;
        self.cv.notify_all();
    }

    /// Waits until no lane touches local memory any more, then makes the post report
    /// `Failed(Canceled)` unless it already finished. Gives up after `limit` (a lane
    /// that wedged): `Err(Busy)`, and the memory must stay valid and registered.
    pub(crate) fn cancel(&self, limit: Duration) -> Result<()> {
        self.cancel.store(true, Ordering::Release);
        let end = Instant::now() + limit;
        let mut s = self.state.lock();
        loop {
            match s.phase {
                Phase::Idle | Phase::Finished => return Ok(()),
                Phase::Flushing => {
                    s.phase = Phase::Finished;
                    s.status = match s.error.take() {
                        Some(e) if !matches!(e, Error::Canceled) => Status::Failed(e),
                        _ => Status::Failed(Error::Canceled),
                    };
                    s.notification = None;
                    self.cv.notify_all();
                    return Ok(());
                }
                Phase::Running | Phase::Notifying => {
                    // Lanes notice the flag within a tick and their I/O is bounded by
                    // the stall timeout; a notification send by io_timeout.
                    let now = Instant::now();
                    if now >= end {
                        tracing::error!(
                            "cancel of transfer {}: a worker still holds it after {limit:?}",
                            self.id
                        );
                        return Err(Error::Busy(format!(
                            "cancel of transfer {}: a worker still touches its memory after \
                             {limit:?}; keep the memory registered and valid until poll \
                             reports it finished",
                            self.id
                        )));
                    }
                    self.cv
                        .wait_until(&mut s, end.min(now + Duration::from_millis(50)));
                }
            }
        }
    }
}

impl<P: Completion> Transfer<P> {
    /// A lane finished (successfully or not); the last one hands the post to the
    /// peer's sequencer.
    pub(crate) fn lane_done(self: &Arc<Self>, r: Result<()>) {
        if let Err(e) = r {
            let mut s = self.state.lock();
            // The first error wins, but a real failure beats the echo of a cancel.
            if s.error.is_none() || matches!(s.error, Some(Error::Canceled)) {
                s.error = Some(e);
            }
        }
        if self.pending.fetch_sub(1, Ordering::AcqRel) == 1 {
            Registry::unpin(&self.plan.local_regs);
            RemoteHandle::exit_all(&self.plan.remotes);
            {
                let mut s = self.state.lock();
                if s.phase == Phase::Running {
                    s.phase = Phase::Flushing;
                }
                self.cv.notify_all();
            }
            self.peer
                .complete(self.seq.load(Ordering::Acquire), self.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(local: u64, remote: u64, len: u64) -> PlanSeg {
        PlanSeg {
            local,
            key: 0,
            remote,
            len,
        }
    }

    /// Segments kept in place give exactly the frames the splitting path makes.
    #[test]
    fn frames_in_place_match_the_splitting_path() {
        let frame = 64 << 10;
        let cases: Vec<Vec<u64>> = vec![
            vec![512; 1000],
            vec![frame; 3],
            vec![4096; 2 * wire::MAX_SEGMENTS as usize + 7],
            vec![1 << 14, 1 << 15, 1 << 14, 100, 28, 1 << 14],
            vec![frame / 2, frame, frame / 2], // a boundary inside: split
            vec![100, 0, 100],                 // an empty segment: split path
        ];
        for lens in cases {
            let segs: Vec<PlanSeg> = lens
                .iter()
                .scan(0u64, |at, n| {
                    *at += n + 8;
                    Some(seg(*at, *at << 1, *n))
                })
                .collect();
            let (want_segs, want) = split_into_frames(segs.clone(), frame);
            let shape = |f: &[Frame]| {
                f.iter()
                    .map(|f| (f.segs.clone(), f.bytes))
                    .collect::<Vec<_>>()
            };
            match frames_in_place(&segs, frame) {
                Some(got) => {
                    assert_eq!(segs, want_segs, "{lens:?}");
                    assert_eq!(shape(&got), shape(&want), "{lens:?}");
                }
                None => assert!(
                    want_segs.len() != segs.len() || lens.contains(&0),
                    "in place refused a list needing no split: {lens:?}"
                ),
            }
        }
    }

    #[test]
    fn frames_split_large_segments_and_spread_over_lanes() {
        let p = Plan::build(
            1,
            Op::Write,
            vec![seg(0, 1 << 40, 16 << 20)],
            vec![],
            4,
            4 << 20,
            Path::Tcp,
            vec![],
            vec![],
            vec![1],
        );
        assert_eq!(p.frames.len(), 4);
        assert_eq!(p.lanes, 4);
        assert!(p
            .frames
            .iter()
            .all(|f| f.bytes == 4 << 20 && f.head.len() == wire::HEADER_LEN));
        assert_eq!(p.segs[1], seg(4 << 20, (1 << 40) + (4 << 20), 4 << 20));
        assert_eq!(p.lane_frames(1).count(), 1);
        let h = wire::decode_header(&p.frames[2].head).unwrap();
        assert_eq!(
            (h.addr, h.len, h.count),
            ((1 << 40) + (8 << 20), 4 << 20, 1)
        );
    }

    #[test]
    fn many_small_segments_get_a_table() {
        let segs: Vec<_> = (0..1000)
            .map(|i| seg(i * 8192, i * 4096 * 3, 4096))
            .collect();
        let p = Plan::build(
            9,
            Op::Read,
            segs,
            vec![],
            2,
            4 << 20,
            Path::Tcp,
            vec![],
            vec![],
            vec![1],
        );
        assert_eq!(p.frames.len(), 2);
        assert_eq!(p.total, 1000 * 4096);
        let f = &p.frames[0];
        let h = wire::decode_header(&f.head).unwrap();
        assert_eq!(
            (h.op, h.count as usize, h.id),
            (FrameOp::Read, f.segs.len(), 9)
        );
        let mut out = Vec::new();
        wire::decode_segments(&h, &f.head[wire::HEADER_LEN..], &mut out).unwrap();
        assert_eq!(
            out[3],
            WireSegment {
                key: 1,
                addr: 3 * 4096 * 3,
                len: 4096
            }
        );
        let small = Plan::build(
            2,
            Op::Write,
            vec![seg(0, 0, 10)],
            vec![],
            4,
            4 << 20,
            Path::SharedMemory,
            vec![],
            vec![],
            vec![1],
        );
        assert_eq!((small.frames.len(), small.lanes), (1, 1));
        assert!(small.frames[0].head.is_empty());
    }
}
