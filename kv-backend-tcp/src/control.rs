//! The connection to one peer that is not a lane: opening any connection (preamble,
//! cluster-secret handshake, HELLO — which also proves the peer is the instance it
//! published), the control connection (liveness, notifications) and, for a same-host
//! peer (reached over its Unix socket, its pid named by the kernel), live validation
//! of every import (IMPORT), the REVOKE frames it receives, and recovery after the
//! control connection is lost: reconnect, then re-validate what is still imported.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kv_core::auth::ClusterSecret;
use kv_core::{Access, Error, Result};
use parking_lot::{Condvar, Mutex, MutexGuard};

use crate::channel::{self, Channel};
use crate::keys::RemoteKey;
use crate::options::Options;
use crate::os;
use crate::remote::RemoteHandle;
use crate::sys::{Stream, Watch, TICK};
use crate::wire::{
    ChannelKind, ConnectionInfo, ErrorCode, FrameOp, Header, HEADER_LEN, HELLO_RESET,
    HELLO_SAME_HOST_CONTROL,
};

/// How many revoked keys of a peer are remembered (a late import of one is refused
/// without asking; the target refuses it anyway).
const REMEMBERED_REVOKES: usize = 4096;

/// A same-host peer's process as the kernel names it (`SO_PEERCRED`/`SO_PEERPIDFD` of
/// its Unix socket): cross-memory attach and memfd fetches go to this pid only.
#[derive(Debug)]
pub(crate) struct SameHost {
    pub pid: u32,
    pub pidfd: Option<OwnedFd>,
}

/// This peer's imports as the control connection sees them.
#[derive(Default)]
struct ImportSet {
    handles: Vec<Arc<RemoteHandle>>,
    /// IMPORT requests waiting for their answer: request id → handle.
    waiting: HashMap<u64, Arc<RemoteHandle>>,
    /// First validations waiting in `import_remote`: handle id → the answer.
    first: HashMap<u64, Option<Result<RemoteKey>>>,
    revoked: HashSet<u128>,
    revoked_order: VecDeque<u128>,
}

impl ImportSet {
    fn remember_revoked(&mut self, key: u128) {
        if self.revoked.insert(key) {
            self.revoked_order.push_back(key);
            if self.revoked_order.len() > REMEMBERED_REVOKES {
                if let Some(old) = self.revoked_order.pop_front() {
                    self.revoked.remove(&old);
                }
            }
        }
    }
}

/// What lanes and the control connection of one peer share. `Send + Sync`.
pub(crate) struct PeerCore {
    pub name: String,
    pub info: ConnectionInfo,
    pub addr: SocketAddr,
    pub local_name: String,
    pub opts: Options,
    secret: Option<ClusterSecret>,
    /// Data moves by shared memory / cross-memory attach instead of TCP.
    pub cma: bool,
    /// The verified process of a same-host peer (`cma`).
    pub same_host: Option<SameHost>,
    /// Set by `disconnect` and on backend drop: lanes stop at the next tick.
    pub closed: AtomicBool,
    control: Mutex<Option<Arc<Channel>>>,
    /// Names this backend to the peer's target side (it groups subscriptions by it).
    importer: u64,
    imports: Mutex<ImportSet>,
    imports_cv: Condvar,
    next_req: AtomicU64,
    /// Control connections opened after the first (recoveries).
    pub reconnects: AtomicU64,
    /// Backend-wide count of finished posts, reported by `progress`.
    pub completions: Arc<AtomicUsize>,
}

/// Everything needed to reach a peer (the arguments of [`PeerCore::connect`]).
pub(crate) struct Reach<'a> {
    pub name: &'a str,
    pub info: ConnectionInfo,
    pub local_name: &'a str,
    pub opts: &'a Options,
    pub secret: Option<&'a ClusterSecret>,
}

impl PeerCore {
    /// Opens the control connection: over the peer's Unix socket when it is on this
    /// host (and the kernel's pid for it agrees with its published one and cross-memory
    /// attach reaches it), else over TCP.
    pub(crate) fn connect(r: Reach<'_>, completions: Arc<AtomicUsize>) -> Result<PeerCore> {
        let addr: SocketAddr = r
            .info
            .addr
            .parse()
            .map_err(|_| Error::invalid_metadata(format!("bad address {:?}", r.info.addr)))?;
        let importer = u64::try_from(kv_core::auth::random_u128()? >> 64).unwrap_or(1);
        let mut core = PeerCore {
            name: r.name.to_string(),
            info: r.info,
            addr,
            local_name: r.local_name.to_string(),
            opts: r.opts.clone(),
            secret: r.secret.cloned(),
            cma: false,
            same_host: None,
            closed: AtomicBool::new(false),
            control: Mutex::new(None),
            importer,
            imports: Mutex::new(ImportSet::default()),
            imports_cv: Condvar::new(),
            next_req: AtomicU64::new(1),
            reconnects: AtomicU64::new(0),
            completions,
        };
        if core.opts.same_host
            && core.info.host == os::host_identity()
            && !core.info.local.is_empty()
        {
            match core.probe_same_host() {
                Ok((ch, sh)) => {
                    core.cma = true;
                    core.same_host = Some(sh);
                    *core.control.lock() = Some(Arc::new(ch));
                }
                Err(why) => tracing::info!(
                    "peer {} is on this host but not reachable without TCP ({why}); using TCP",
                    core.name
                ),
            }
        }
        if core.control.lock().is_none() {
            let ch = core.open(ChannelKind::Control, false, None)?;
            *core.control.lock() = Some(Arc::new(ch));
        }
        Ok(core)
    }

    /// The Unix-socket control connection of a same-host peer and its verified process.
    fn probe_same_host(&self) -> std::result::Result<(Channel, SameHost), String> {
        let s = Stream::connect_local(&self.info.local, self.opts.connect_timeout)
            .map_err(|e| format!("its Unix socket: {e}"))?;
        let pid = s
            .peer_pid()
            .ok_or_else(|| "the kernel names no peer process".to_string())?;
        if pid != self.info.pid {
            return Err(format!(
                "it publishes pid {} but the kernel says {pid} (another pid namespace?)",
                self.info.pid
            ));
        }
        let pidfd = s.peer_pidfd();
        let ch = self
            .handshake(
                s,
                ChannelKind::Control,
                HELLO_SAME_HOST_CONTROL | HELLO_RESET,
                None,
            )
            .map_err(|e| e.to_string())?;
        match os::cma_probe(pid, self.info.probe_addr) {
            Ok(v) if v == self.info.instance => Ok((ch, SameHost { pid, pidfd })),
            Ok(_) => Err(format!("pid {pid} does not hold the instance it published")),
            Err(e) => Err(format!(
                "cross-memory attach to pid {pid}: {e} (see ptrace_scope)"
            )),
        }
    }

    /// The error of a transfer or handshake with this peer that is gone.
    pub(crate) fn gone(&self, reason: impl Into<String>) -> Error {
        Error::RemoteDisconnected {
            peer: self.name.clone(),
            reason: reason.into(),
        }
    }

    /// Opens and handshakes a connection of `kind`. A same-host peer's control
    /// connection goes to its Unix socket (the kernel must name the same process);
    /// `reset` tells the target this importer holds nothing of it any more. `until`
    /// (a transfer's deadline) bounds it beside `connect_timeout`.
    pub(crate) fn open(
        &self,
        kind: ChannelKind,
        reset: bool,
        until: Option<Instant>,
    ) -> Result<Channel> {
        let timeout = match until {
            Some(u) => self
                .opts
                .connect_timeout
                .min(u.saturating_duration_since(Instant::now())),
            None => self.opts.connect_timeout,
        };
        if until.is_some_and(|u| Instant::now() >= u) {
            return Err(Error::TimedOut {
                what: format!("connecting to {}", self.name),
                after: Duration::ZERO,
            });
        }
        let local = kind == ChannelKind::Control && self.cma;
        let s = if local {
            Stream::connect_local(&self.info.local, timeout)
                .map_err(|e| self.gone(format!("connect to its Unix socket: {e}")))?
        } else {
            Stream::connect(&self.addr, timeout)
                .map_err(|e| self.gone(format!("connect to {}: {e}", self.addr)))?
        };
        let mut flags = 0;
        if local {
            let want = self.same_host.as_ref().map(|s| s.pid);
            if s.peer_pid() != want {
                return Err(self.gone("its Unix socket belongs to another process"));
            }
            flags = HELLO_SAME_HOST_CONTROL | if reset { HELLO_RESET } else { 0 };
        }
        self.handshake(s, kind, flags, until)
    }

    fn handshake(
        &self,
        s: Stream,
        kind: ChannelKind,
        flags: u32,
        until: Option<Instant>,
    ) -> Result<Channel> {
        let hello = Header {
            status: flags,
            key: u128::from(self.info.instance),
            addr: self.importer,
            ..Header::new(FrameOp::Hello)
        };
        let mut w = Watch::new(&self.name, self.opts.connect_timeout);
        w.shutdown = Some(&self.closed);
        w.deadline = until;
        let (ch, ack) = channel::connect(
            s,
            kind,
            self.secret.as_ref(),
            &self.local_name,
            &hello,
            &mut w,
        )?;
        if ack.key != u128::from(self.info.instance) {
            return Err(self.gone(
                "handshake answered by another instance (the peer restarted; re-fetch its metadata)",
            ));
        }
        Ok(ch)
    }

    /// The control connection, reopened (and, for a same-host peer, every import
    /// re-validated) if it broke.
    pub(crate) fn ensure_control(&self, until: Option<Instant>) -> Result<Arc<Channel>> {
        if self.closed.load(Ordering::Acquire) {
            return Err(self.gone("disconnected"));
        }
        {
            let mut c = self.control.lock();
            match c.as_ref() {
                Some(s) if !s.peer_closed() => return Ok(s.clone()),
                Some(_) => self.lost(&mut c),
                None => {}
            }
        }
        // Tell the target we hold nothing only once no copy into its memory runs. The
        // lock is not held meanwhile: a copying lane looks at the connection. No post
        // starts meanwhile (the imports are suspended).
        let reset = self.cma && self.drain(until);
        let mut c = self.control.lock();
        if let Some(s) = c.as_ref().filter(|s| !s.peer_closed()) {
            return Ok(s.clone()); // another thread reconnected meanwhile
        }
        let ch = Arc::new(self.open(ChannelKind::Control, reset, until)?);
        self.reconnects.fetch_add(1, Ordering::Relaxed);
        *c = Some(ch.clone());
        if self.cma {
            let pending: Vec<_> = {
                let set = self.imports.lock();
                set.handles
                    .iter()
                    .filter(|h| h.is_pending())
                    .cloned()
                    .collect()
            };
            for h in pending {
                if self.request(&mut c, &h).is_err() {
                    break;
                }
            }
        }
        Ok(ch)
    }

    /// Sends IMPORT for `h` on the current control connection (the caller holds its
    /// lock); a failed send loses the connection.
    fn request(
        &self,
        c: &mut MutexGuard<'_, Option<Arc<Channel>>>,
        h: &Arc<RemoteHandle>,
    ) -> Result<()> {
        let Some(ch) = c.as_ref().cloned() else {
            return Err(self.gone("no control connection"));
        };
        let id = self.next_req.fetch_add(1, Ordering::Relaxed);
        self.imports.lock().waiting.insert(id, h.clone());
        let f = Header {
            id,
            key: h.key,
            addr: h.desc.addr,
            len: h.desc.len,
            ..Header::new(FrameOp::Import)
        };
        let mut w = Watch::new(&self.name, self.opts.io_timeout);
        w.shutdown = Some(&self.closed);
        let r = ch.send(&f, &[], &mut w);
        if r.is_err() {
            self.lost(c);
        }
        r
    }

    /// The control connection broke: close it and, for a same-host peer, suspend every
    /// import until the target confirms it again (a REVOKE may have been missed).
    fn lost(&self, c: &mut MutexGuard<'_, Option<Arc<Channel>>>) {
        if let Some(s) = c.take() {
            s.shutdown();
        }
        if self.cma {
            let mut set = self.imports.lock();
            for h in &set.handles {
                h.suspend();
            }
            set.waiting.clear();
        }
        self.imports_cv.notify_all();
    }

    /// Waits (until `until`, at most `io_timeout`) for every post into this peer's
    /// memory to end; true when none runs any more.
    fn drain(&self, until: Option<Instant>) -> bool {
        let limit = Instant::now() + self.opts.io_timeout;
        let end = until.map_or(limit, |u| u.min(limit));
        loop {
            let busy = self.imports.lock().handles.iter().any(|h| h.inflight() > 0);
            if !busy {
                return true;
            }
            if Instant::now() >= end {
                return false;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Validates a same-host import live with the target (check-and-subscribe): the
    /// registration must exist, be live and contain `h.desc`. Returns the target's
    /// current description of it (access, shared-memory export).
    pub(crate) fn validate(&self, h: &Arc<RemoteHandle>) -> Result<RemoteKey> {
        if h.desc.len == 0 {
            // The target's frame decoder refuses an IMPORT of zero bytes and closes the
            // connection: asking would only reconnect and ask again until the timeout.
            return Err(Error::invalid_argument(
                "a same-host import of zero bytes (nothing to validate or address)",
            ));
        }
        {
            let mut set = self.imports.lock();
            if set.revoked.contains(&h.key) {
                return Err(Error::NotRegistered(
                    "the peer deregistered this registration; fetch its metadata again".into(),
                ));
            }
            set.handles.push(h.clone());
            set.first.insert(h.id, None);
        }
        let until = Instant::now() + self.opts.connect_timeout.max(self.opts.io_timeout);
        let r = self.await_first(h, until);
        let mut set = self.imports.lock();
        set.first.remove(&h.id);
        if r.is_err() {
            h.revoke();
            set.handles.retain(|x| !Arc::ptr_eq(x, h));
            set.waiting.retain(|_, x| !Arc::ptr_eq(x, h));
        }
        r
    }

    /// Sends IMPORT for `h` unless a request for it is outstanding.
    fn ask(&self, h: &Arc<RemoteHandle>) {
        let mut c = self.control.lock();
        let asked = self
            .imports
            .lock()
            .waiting
            .values()
            .any(|x| Arc::ptr_eq(x, h));
        if !asked && h.is_pending() {
            // Nobody asked yet, or the connection that carried the request was lost.
            let _ = self.request(&mut c, h);
        }
    }

    fn await_first(&self, h: &Arc<RemoteHandle>, until: Instant) -> Result<RemoteKey> {
        loop {
            self.ensure_control(Some(until))?;
            self.ask(h);
            let mut set = self.imports.lock();
            loop {
                if let Some(Some(r)) = set.first.get_mut(&h.id).map(Option::take) {
                    return r;
                }
                if Instant::now() >= until {
                    return Err(Error::TimedOut {
                        what: format!("validating an import with {}", self.name),
                        after: self.opts.connect_timeout,
                    });
                }
                if !set.waiting.values().any(|x| Arc::ptr_eq(x, h)) {
                    break; // the request was lost with its connection: ask again
                }
                self.imports_cv.wait_until(
                    &mut set,
                    until.min(Instant::now() + Duration::from_millis(50)),
                );
            }
        }
    }

    /// Before a transfer uses `hs`: when some wait for re-validation (the control
    /// connection was lost), reconnect and wait (until `until`) for the target's answer.
    pub(crate) fn recover(&self, hs: &[Arc<RemoteHandle>], until: Instant) -> Result<()> {
        while hs.iter().any(|h| h.is_pending()) && Instant::now() < until {
            self.ensure_control(Some(until))?;
            for h in hs {
                self.ask(h);
            }
            let mut set = self.imports.lock();
            if hs.iter().any(|h| h.is_pending()) {
                self.imports_cv.wait_until(
                    &mut set,
                    until.min(Instant::now() + Duration::from_millis(50)),
                );
            }
        }
        Ok(())
    }

    /// The target answered request `id`: the import is live (with the answer's
    /// access), or refused (revoked for good).
    fn resolve(&self, id: u64, r: Result<RemoteKey>) {
        let mut set = self.imports.lock();
        if let Some(h) = set.waiting.remove(&id) {
            match &r {
                Ok(k) if k.key == h.key => h.validated(if k.read_only {
                    Access::ReadOnly
                } else {
                    Access::ReadWrite
                }),
                Err(Error::NotRegistered(_)) => {
                    h.revoke();
                    set.remember_revoked(h.key);
                }
                _ => h.revoke(),
            }
            if let Some(slot) = set.first.get_mut(&h.id) {
                *slot = Some(r);
            }
        }
        drop(set);
        self.imports_cv.notify_all();
    }

    /// Forgets the import `h` (released, or the peer disconnected).
    pub(crate) fn forget(&self, h: &Arc<RemoteHandle>) {
        self.imports.lock().handles.retain(|x| !Arc::ptr_eq(x, h));
    }

    /// True when the control connection is down or was closed by the peer (it exited
    /// or dropped its backend).
    pub(crate) fn peer_gone(&self) -> bool {
        self.control.lock().as_ref().is_none_or(|s| s.peer_closed())
    }

    /// Sends one notification on the control connection.
    pub(crate) fn send_notify(&self, payload: &[u8]) -> Result<()> {
        let ch = self.ensure_control(None)?;
        let h = Header {
            len: payload.len() as u64,
            ..Header::new(FrameOp::Notify)
        };
        let mut w = Watch::new(&self.name, self.opts.io_timeout);
        w.shutdown = Some(&self.closed);
        let r = ch.send(&h, payload, &mut w);
        if r.is_err() {
            let mut c = self.control.lock();
            if c.as_ref().is_some_and(|cur| Arc::ptr_eq(cur, &ch)) {
                self.lost(&mut c);
            }
        }
        r
    }

    /// At close: once no copy into the peer's memory runs, tells a same-host target
    /// (BYE) that this importer holds nothing of it, then shuts the connection down.
    pub(crate) fn close_control(&self) {
        let taken = self.control.lock().take();
        if let Some(s) = taken {
            if self.cma && self.drain(None) {
                let mut w =
                    Watch::new(&self.name, self.opts.io_timeout.min(Duration::from_secs(1)));
                if let Err(e) = s.send(&Header::new(FrameOp::Bye), &[], &mut w) {
                    tracing::debug!("saying goodbye to {}: {e}", self.name);
                }
            }
            s.shutdown();
        }
    }

    /// A REVOKE arrived on `s`: refuse new posts to the registration, wait (up to
    /// `io_timeout`) for the posts copying into it, then acknowledge. Without the
    /// acknowledgement the target's `deregister` returns `Busy` and keeps the memory.
    fn on_revoke(&self, s: &Arc<Channel>, rid: u64, key: u128) {
        let hs: Vec<Arc<RemoteHandle>> = {
            let mut set = self.imports.lock();
            set.remember_revoked(key);
            let hs: Vec<_> = set
                .handles
                .iter()
                .filter(|h| h.key == key)
                .cloned()
                .collect();
            for h in &hs {
                h.revoke();
            }
            hs
        };
        self.imports_cv.notify_all();
        let end = Instant::now() + self.opts.io_timeout;
        while hs.iter().any(|h| h.inflight() > 0) {
            if Instant::now() >= end || self.closed.load(Ordering::Acquire) {
                tracing::warn!(
                    "peer {} revoked a registration but a transfer still copies into it after {:?}; not acknowledging",
                    self.name,
                    self.opts.io_timeout
                );
                return;
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        let c = self.control.lock();
        if !c.as_ref().is_some_and(|cur| Arc::ptr_eq(cur, s)) {
            return; // that connection is gone; the target resends on the new one
        }
        let h = Header {
            id: rid,
            ..Header::new(FrameOp::RevokeAck)
        };
        let mut w = Watch::new(&self.name, self.opts.io_timeout);
        w.shutdown = Some(&self.closed);
        if let Err(e) = s.send(&h, &[], &mut w) {
            tracing::debug!("acknowledging a revoke to {}: {e}", self.name);
        }
    }

    /// The pid and pidfd cross-memory attach and memfd fetches use.
    pub(crate) fn process(&self) -> Option<(Option<std::os::fd::BorrowedFd<'_>>, u32)> {
        self.same_host
            .as_ref()
            .map(|s| (s.pidfd.as_ref().map(|f| f.as_fd()), s.pid))
    }
}

/// Reads a same-host peer's control connection (REVOKE, IMPORT answers) and keeps it
/// up: after a loss it reconnects (with backoff) and re-validates the imports, so a
/// live peer keeps working and its pending revocations resolve.
pub(crate) fn ctl_main(core: Arc<PeerCore>) {
    let mut raw = Vec::new();
    let mut backoff = TICK;
    while !core.closed.load(Ordering::Acquire) {
        let s = match core.ensure_control(None) {
            Ok(s) => {
                backoff = TICK;
                s
            }
            Err(e) => {
                tracing::debug!("reconnecting the control connection to {}: {e}", core.name);
                let end = Instant::now() + backoff;
                while Instant::now() < end && !core.closed.load(Ordering::Acquire) {
                    std::thread::sleep(TICK);
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let mut w = Watch::new(&core.name, core.opts.io_timeout);
        w.shutdown = Some(&core.closed);
        w.idle_ok = true;
        let e = match s.recv_frame(&mut raw, &mut w) {
            Ok(h) => match h.op {
                FrameOp::Revoke => {
                    core.on_revoke(&s, h.id, h.key);
                    continue;
                }
                FrameOp::ImportAck => {
                    core.resolve(h.id, RemoteKey::decode(&raw[HEADER_LEN..]));
                    continue;
                }
                FrameOp::Error => {
                    let msg = String::from_utf8_lossy(&raw[HEADER_LEN..]).into_owned();
                    core.resolve(h.id, Err(ErrorCode::to_error(h.status, &msg)));
                    continue;
                }
                op => Error::invalid_metadata(format!("unexpected {op:?} frame from the target")),
            },
            Err(e) => e,
        };
        if core.closed.load(Ordering::Acquire) {
            break;
        }
        match e {
            Error::InvalidMetadata(_) | Error::Unauthenticated(_) => {
                tracing::warn!("closing the control connection to {}: {e}", core.name)
            }
            _ => tracing::debug!("control connection to {} ended: {e}", core.name),
        }
        let mut c = core.control.lock();
        if c.as_ref().is_some_and(|cur| Arc::ptr_eq(cur, &s)) {
            core.lost(&mut c);
        }
    }
}

/// The message of an ERROR frame whose header and body are in `raw`.
pub(crate) fn message(raw: &[u8]) -> String {
    String::from_utf8_lossy(raw.get(HEADER_LEN..).unwrap_or(&[])).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revoked_keys_are_remembered_within_a_bound() {
        let mut s = ImportSet::default();
        for k in 0..(REMEMBERED_REVOKES as u128 + 10) {
            s.remember_revoked(k);
            s.remember_revoked(k);
        }
        assert_eq!(s.revoked.len(), REMEMBERED_REVOKES);
        assert!(!s.revoked.contains(&0) && s.revoked.contains(&(REMEMBERED_REVOKES as u128 + 9)));
    }
}
