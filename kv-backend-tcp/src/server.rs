//! The target side: a listener thread and one serving thread per incoming connection.
//! Every request is checked against this backend's own registrations before a byte
//! is read into or sent from them.

use std::cell::Cell;
use std::collections::{HashMap, VecDeque};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kv_core::{Error, Notification, RegistrationId, Result};
use parking_lot::{Condvar, Mutex};

use crate::memory::{Registry, Serving};
use crate::options::Options;
use crate::sys::{self, Stream, Watch, TICK};
use crate::wire::{self, ErrorCode, FrameOp, Header, WireSegment, HEADER_LEN};

/// Received notifications waiting for `drain_notifications`, bounded in count and
/// bytes ([`Options::max_inbox`], [`Options::max_inbox_bytes`]).
#[derive(Default)]
pub(crate) struct Inbox {
    q: VecDeque<Notification>,
    bytes: usize,
}

impl Inbox {
    /// Moves every notification to `out`, oldest first; returns how many.
    pub(crate) fn drain_into(&mut self, out: &mut Vec<Notification>) -> usize {
        let n = self.q.len();
        out.extend(self.q.drain(..));
        self.bytes = 0;
        n
    }
}

/// The control connection of a same-host importer (its HELLO carried
/// [`wire::HELLO_SAME_HOST_CONTROL`]): `deregister` sends REVOKE on it and waits for
/// the REVOKE_ACK. `Send + Sync`.
struct Control {
    s: Arc<Stream>,
    /// Serialises writers: the serving thread and `deregister`.
    wlock: Arc<Mutex<()>>,
    peer: String,
}

/// State the serving threads share with the backend. `Send + Sync`.
pub(crate) struct Shared {
    pub regs: Registry,
    pub inbox: Mutex<Inbox>,
    pub instance: u64,
    pub opts: Options,
    pub shutdown: AtomicBool,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Connections being served now (at most `opts.max_connections`).
    conns: AtomicUsize,
    next_conn: AtomicU64,
    /// Same-host importers' control connections, by connection id.
    controls: Mutex<HashMap<u64, Arc<Control>>>,
    /// Revocations waiting for acknowledgements: revoke id → connection ids.
    revokes: Mutex<HashMap<u64, Vec<u64>>>,
    revoked_cv: Condvar,
    next_revoke: AtomicU64,
}

impl Shared {
    pub(crate) fn new(instance: u64, opts: Options) -> Shared {
        Shared {
            regs: Registry::default(),
            inbox: Mutex::new(Inbox::default()),
            instance,
            opts,
            shutdown: AtomicBool::new(false),
            threads: Mutex::new(Vec::new()),
            conns: AtomicUsize::new(0),
            next_conn: AtomicU64::new(1),
            controls: Mutex::new(HashMap::new()),
            revokes: Mutex::new(HashMap::new()),
            revoked_cv: Condvar::new(),
            next_revoke: AtomicU64::new(1),
        }
    }

    /// Stops accepting and serving; waits for every serving thread.
    pub(crate) fn stop(&self, listener: Option<JoinHandle<()>>) {
        self.shutdown.store(true, Ordering::Release);
        if let Some(l) = listener {
            let _ = l.join();
        }
        let threads = std::mem::take(&mut *self.threads.lock());
        for t in threads {
            let _ = t.join();
        }
    }

    /// Deregisters `id`. Revokes it first; waits (at most `io_timeout` + 100 ms) until
    /// every same-host importer acknowledged and no peer request is served from it;
    /// only then unlinks it. Else `Busy`, and it stays registered (revoked).
    pub(crate) fn deregister(&self, id: RegistrationId) -> Result<()> {
        // Revoke first (peers' requests refused, served ones stop at their next read,
        // same-host importers told and acknowledging once their copies into it
        // finished); unlink only when nothing touches the memory any more.
        let reg = self.regs.revoke(id)?;
        let until = Instant::now() + self.deregister_wait();
        let acked = self.revoke_importers(reg.key, until);
        let served = Registry::wait_served(&reg, until);
        if !(acked && served) {
            let who = if acked {
                "a peer request is still being served from it"
            } else {
                "a same-host peer did not acknowledge the revocation"
            };
            tracing::error!(
                "deregistering {id}: {who} after {:?}",
                self.deregister_wait()
            );
            return Err(Error::Busy(format!(
                "{id}: {who}; it stays registered (refusing new requests): keep the memory \
                 and retry deregister"
            )));
        }
        self.regs.unlink(&reg);
        Ok(())
    }

    /// How long `deregister` waits for same-host importers' acknowledgements and
    /// requests being served (each served request has an absolute `io_timeout` limit
    /// and stops within a tick of the revoke).
    fn deregister_wait(&self) -> Duration {
        self.opts.io_timeout + Duration::from_millis(100)
    }

    /// Tells every connected same-host importer that the registration with `key` is
    /// gone (REVOKE) and waits until each acknowledged it — an importer acks once it
    /// refuses new posts to it and its in-flight copies into it finished — or its
    /// control connection closed. False when `until` passed first.
    pub(crate) fn revoke_importers(&self, key: u64, until: Instant) -> bool {
        let ctls: Vec<(u64, Arc<Control>)> = self
            .controls
            .lock()
            .iter()
            .map(|(id, c)| (*id, c.clone()))
            .collect();
        if ctls.is_empty() {
            return true;
        }
        let rid = self.next_revoke.fetch_add(1, Ordering::Relaxed);
        self.revokes
            .lock()
            .insert(rid, ctls.iter().map(|(id, _)| *id).collect());
        let h = wire::encode_header(&Header {
            id: rid,
            key,
            ..Header::new(FrameOp::Revoke)
        });
        for (id, c) in &ctls {
            let sent = match c.wlock.try_lock_until(until) {
                Some(_g) => {
                    let mut w =
                        Watch::new(&c.peer, until.saturating_duration_since(Instant::now()));
                    w.shutdown = Some(&self.shutdown);
                    w.limit = Some(until);
                    c.s.send_bytes(&[&h], &mut w)
                }
                None => Err(Error::Busy("control connection busy".into())),
            };
            if let Err(e) = sent {
                // It cannot be told: close it (its importer then treats every import
                // of ours as revoked) and do not wait for it.
                tracing::warn!("revoke to {}: {e}; closing its control connection", c.peer);
                c.s.shutdown();
                self.acked(rid, *id);
            }
        }
        let mut r = self.revokes.lock();
        loop {
            if r.get(&rid).is_none_or(|v| v.is_empty()) {
                r.remove(&rid);
                return true;
            }
            if Instant::now() >= until {
                r.remove(&rid);
                return false;
            }
            self.revoked_cv.wait_until(&mut r, until);
        }
    }

    /// Connection `conn` acknowledged revoke `rid` (or can no longer).
    fn acked(&self, rid: u64, conn: u64) {
        if let Some(v) = self.revokes.lock().get_mut(&rid) {
            v.retain(|c| *c != conn);
        }
        self.revoked_cv.notify_all();
    }

    /// Connection `conn` ended: forget it and stop waiting for its acks.
    fn control_closed(&self, conn: u64) {
        if self.controls.lock().remove(&conn).is_none() {
            return;
        }
        for v in self.revokes.lock().values_mut() {
            v.retain(|c| *c != conn);
        }
        self.revoked_cv.notify_all();
    }
}

/// Binds the listener and starts its thread.
pub(crate) fn start(shared: Arc<Shared>) -> Result<(SocketAddr, JoinHandle<()>)> {
    let l = TcpListener::bind(shared.opts.listen)
        .map_err(|e| Error::io(format!("binding {}", shared.opts.listen), e))?;
    l.set_nonblocking(true)
        .map_err(|e| Error::io("listener", e))?;
    let addr = l.local_addr().map_err(|e| Error::io("listener", e))?;
    let t = std::thread::Builder::new()
        .name("kv-tcp-listen".into())
        .spawn(move || listen(l, shared))
        .map_err(|e| Error::io("spawning the tcp listener thread", e))?;
    Ok((addr, t))
}

fn listen(l: TcpListener, shared: Arc<Shared>) {
    while !shared.shutdown.load(Ordering::Acquire) {
        let mut p = libc::pollfd {
            fd: l.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd; bounded timeout so shutdown is noticed.
        unsafe { libc::poll(&mut p, 1, TICK.as_millis() as libc::c_int) };
        let (sock, from) = match l.accept() {
            Ok(x) => x,
            Err(_) => continue,
        };
        // Only this thread adds connections, so the check cannot race past the cap.
        let live = shared.conns.load(Ordering::Acquire);
        if live >= shared.opts.max_connections {
            tracing::warn!(
                "refusing connection from {from}: {live} connections already served (max_connections = {})",
                shared.opts.max_connections
            );
            drop(sock);
            continue;
        }
        let stream = match sock
            .set_nonblocking(false)
            .and_then(|_| Stream::from_std(sock))
        {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("dropping connection from {from}: {e}");
                continue;
            }
        };
        shared.conns.fetch_add(1, Ordering::AcqRel);
        let sh = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("kv-tcp-serve".into())
            .spawn(move || serve(stream, from, sh));
        let mut threads = shared.threads.lock();
        threads.retain(|t| !t.is_finished());
        match spawned {
            Ok(t) => threads.push(t),
            Err(e) => {
                shared.conns.fetch_sub(1, Ordering::AcqRel);
                tracing::warn!("cannot serve {from}: {e}")
            }
        }
    }
}

/// Per-connection buffers, reused across requests (nothing allocated per request on
/// the hot path once they have grown).
struct Conn {
    id: u64,
    s: Arc<Stream>,
    /// Serialises our writes with `deregister`'s REVOKE frames on a control connection.
    wlock: Arc<Mutex<()>>,
    from: SocketAddr,
    peer: String,
    table: Vec<u8>,
    segs: Vec<WireSegment>,
    guards: Vec<Serving>,
    iov: Vec<libc::iovec>,
    scratch: Vec<u8>,
    /// Absolute limit of the request being served.
    limit: Instant,
    /// The registry's revoke epoch when the request's checks began.
    epoch: u64,
}

fn serve(s: Stream, from: SocketAddr, shared: Arc<Shared>) {
    let mut c = Conn {
        id: shared.next_conn.fetch_add(1, Ordering::Relaxed),
        s: Arc::new(s),
        wlock: Arc::new(Mutex::new(())),
        from,
        peer: from.to_string(),
        table: Vec::new(),
        segs: Vec::new(),
        guards: Vec::new(),
        iov: Vec::new(),
        scratch: Vec::new(),
        limit: Instant::now(),
        epoch: 0,
    };
    match c.run(&shared) {
        Ok(()) => {}
        Err(
            e @ (Error::InvalidMetadata(_)
            | Error::Busy(_)
            | Error::TimedOut { .. }
            | Error::NotRegistered(_)),
        ) => tracing::warn!("closing connection from {} ({}): {e}", c.peer, c.from),
        Err(e) => tracing::debug!("connection from {} ({}) ended: {e}", c.peer, c.from),
    }
    // Nothing of a registration is touched after its guard drops.
    c.guards.clear();
    c.s.shutdown();
    shared.control_closed(c.id);
    shared.conns.fetch_sub(1, Ordering::AcqRel);
}

fn watch<'a>(peer: &'a str, shared: &'a Shared, idle: bool) -> Watch<'a> {
    let mut w = Watch::new(peer, shared.opts.io_timeout);
    w.shutdown = Some(&shared.shutdown);
    w.idle_ok = idle;
    w
}

impl Conn {
    /// A watch for the request being served: absolute limit, stall and shutdown.
    fn request_watch<'a>(&'a self, shared: &'a Shared) -> Watch<'a> {
        let mut w = watch(&self.peer, shared, false);
        w.limit = Some(self.limit);
        w
    }

    /// Reads the next header; `Ok(None)` on a clean close between frames.
    fn next_header(&self, shared: &Shared) -> Result<Option<Header>> {
        let mut buf = [0u8; HEADER_LEN];
        let mut w = watch(&self.peer, shared, true);
        match self.s.recv_exact(&mut buf, &mut w) {
            Ok(()) => wire::decode_header(&buf).map(Some),
            Err(Error::RemoteDisconnected { .. }) if shared.shutdown.load(Ordering::Acquire) => {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    fn send(&self, shared: &Shared, h: &Header, payload: &[u8]) -> Result<()> {
        let _g = self.wlock.lock();
        let mut w = watch(&self.peer, shared, false);
        self.s
            .send_bytes(&[&wire::encode_header(h), payload], &mut w)
    }

    fn refuse(&self, shared: &Shared, id: u64, e: &Error) -> Result<()> {
        let mut msg = e.to_string();
        msg.truncate(wire::MAX_ERROR_MESSAGE as usize);
        while !msg.is_char_boundary(msg.len()) {
            msg.pop();
        }
        let h = Header {
            id,
            status: ErrorCode::of(e) as u32,
            len: msg.len() as u64,
            ..Header::new(FrameOp::Error)
        };
        self.send(shared, &h, msg.as_bytes())
    }

    fn run(&mut self, shared: &Shared) -> Result<()> {
        // The first frame names the peer and the instance it expects.
        let Some(h) = self.next_header(shared)? else {
            return Ok(());
        };
        if h.op != FrameOp::Hello {
            return Err(Error::invalid_metadata(format!(
                "first frame is {:?}, not Hello",
                h.op
            )));
        }
        let mut name = vec![0u8; h.len as usize];
        let mut w = watch(&self.peer, shared, false);
        self.s.recv_exact(&mut name, &mut w)?;
        let name = String::from_utf8(name)
            .map_err(|_| Error::invalid_metadata("peer name is not UTF-8"))?;
        if h.key != shared.instance {
            let e = Error::RemoteDisconnected {
                peer: name,
                reason: "this listener belongs to a newer instance".into(),
            };
            self.refuse(shared, 0, &e)?;
            return Ok(());
        }
        self.peer = name;
        // Known before the importer hears HELLO_ACK (and can import anything), so no
        // deregister misses it.
        if h.status & wire::HELLO_SAME_HOST_CONTROL != 0 {
            shared.controls.lock().insert(
                self.id,
                Arc::new(Control {
                    s: self.s.clone(),
                    wlock: self.wlock.clone(),
                    peer: self.peer.clone(),
                }),
            );
        }
        self.send(
            shared,
            &Header {
                key: shared.instance,
                ..Header::new(FrameOp::HelloAck)
            },
            &[],
        )?;
        while let Some(h) = self.next_header(shared)? {
            match h.op {
                FrameOp::Write | FrameOp::Read => self.request(shared, &h)?,
                FrameOp::Notify => self.notification(shared, &h)?,
                FrameOp::RevokeAck => shared.acked(h.id, self.id),
                op => {
                    return Err(Error::invalid_metadata(format!(
                        "unexpected {op:?} frame from an initiator"
                    )))
                }
            }
        }
        Ok(())
    }

    /// One NOTIFY: into the bounded inbox, or the connection closes (never blocks).
    fn notification(&mut self, shared: &Shared, h: &Header) -> Result<()> {
        let o = &shared.opts;
        if h.len > o.max_notification as u64 {
            return Err(Error::invalid_metadata(format!(
                "notification of {} bytes exceeds {}",
                h.len, o.max_notification
            )));
        }
        let len = h.len as usize;
        {
            let ib = shared.inbox.lock();
            if ib.q.len() >= o.max_inbox || ib.bytes.saturating_add(len) > o.max_inbox_bytes {
                return Err(Error::Busy(format!(
                    "notification inbox full ({} notifications, {} bytes; max_inbox = {}, \
                     max_inbox_bytes = {}): the application does not drain it",
                    ib.q.len(),
                    ib.bytes,
                    o.max_inbox,
                    o.max_inbox_bytes
                )));
            }
        }
        let mut payload = vec![0u8; len];
        let mut w = watch(&self.peer, shared, false);
        self.s.recv_exact(&mut payload, &mut w)?;
        let mut ib = shared.inbox.lock();
        // Only serving threads add, each checked first; a racing sender may overshoot
        // by one notification per connection, still bounded.
        ib.bytes += len;
        ib.q.push_back(Notification {
            peer: self.peer.clone(),
            payload: Bytes::from(payload),
        });
        Ok(())
    }

    /// One WRITE or READ: table, checks, then data straight into / out of the
    /// registrations, all within one absolute limit (`io_timeout`).
    fn request(&mut self, shared: &Shared, h: &Header) -> Result<()> {
        self.limit = Instant::now() + shared.opts.io_timeout;
        let tl = h.table_len();
        self.table.resize(tl, 0);
        if tl > 0 {
            let mut table = std::mem::take(&mut self.table);
            let mut w = self.request_watch(shared);
            let r = self.s.recv_exact(&mut table, &mut w);
            self.table = table;
            r?;
        }
        wire::decode_segments(h, &self.table, &mut self.segs)?;
        self.guards.clear();
        // Read before the checks: a revoke after them moves the epoch.
        self.epoch = shared.regs.epoch();
        let mut refused = None;
        for s in &self.segs {
            match shared.regs.serve(s.key, s.addr, s.len) {
                // One guard per run of segments in the same registration.
                Ok(g) if self.guards.last().is_some_and(|l| l.same(&g)) => {}
                Ok(g) => self.guards.push(g),
                Err(e) => {
                    refused = Some(e);
                    break;
                }
            }
        }
        let r = match (h.op, refused) {
            (FrameOp::Write, None) => self.receive_into(shared, h),
            (FrameOp::Read, None) => self.send_from(shared, h),
            (op, Some(e)) => {
                tracing::debug!("refusing {op:?} from {}: {e}", self.peer);
                self.guards.clear();
                if op == FrameOp::Write {
                    self.discard(shared, h.len)?;
                }
                self.refuse(shared, h.id, &e)
            }
            _ => Ok(()),
        };
        self.guards.clear();
        r
    }

    /// True once a registration this request touches was revoked (cheap unless some
    /// registration was revoked since the request began).
    fn revoked(regs: &Registry, seen: &Cell<u64>, guards: &[Serving]) -> bool {
        let e = regs.epoch();
        if e == seen.get() {
            return false;
        }
        if guards.iter().any(|g| g.revoked()) {
            return true;
        }
        seen.set(e);
        false
    }

    fn receive_into(&mut self, shared: &Shared, h: &Header) -> Result<()> {
        self.iov.clear();
        self.iov
            .extend(self.segs.iter().map(|s| sys::iovec(s.addr, s.len)));
        let mut iov = std::mem::take(&mut self.iov);
        let seen = Cell::new(self.epoch);
        let guards = &self.guards;
        let abort = || Self::revoked(&shared.regs, &seen, guards);
        let mut w = watch(&self.peer, shared, false);
        w.limit = Some(self.limit);
        w.abort = Some(&abort);
        // SAFETY: every segment lies in a registration that was live when checked by
        // `serve` and is held by `self.guards` (deregister waits for them to drop);
        // the call stops before its next read once the registration is revoked or the
        // request's limit passed. The registrant promised the range is valid for
        // writes while registered.
        let r = unsafe { self.s.recv_all(&mut iov, &mut w) };
        self.iov = iov;
        r?;
        self.guards.clear();
        self.send(
            shared,
            &Header {
                id: h.id,
                ..Header::new(FrameOp::Ack)
            },
            &[],
        )
    }

    fn send_from(&mut self, shared: &Shared, h: &Header) -> Result<()> {
        let head = wire::encode_header(&Header {
            id: h.id,
            len: h.len,
            ..Header::new(FrameOp::Data)
        });
        self.iov.clear();
        self.iov
            .push(sys::iovec(head.as_ptr() as usize as u64, HEADER_LEN as u64));
        self.iov
            .extend(self.segs.iter().map(|s| sys::iovec(s.addr, s.len)));
        let mut iov = std::mem::take(&mut self.iov);
        let seen = Cell::new(self.epoch);
        let guards = &self.guards;
        let abort = || Self::revoked(&shared.regs, &seen, guards);
        let _g = self.wlock.lock();
        let mut w = watch(&self.peer, shared, false);
        w.limit = Some(self.limit);
        w.abort = Some(&abort);
        // SAFETY: `head` lives on this frame; the segments lie in registrations held by
        // `self.guards`, valid for reads while registered; the call stops before its
        // next write once one is revoked or the request's limit passed.
        let r = unsafe { self.s.send_all(&mut iov, &mut w) };
        self.iov = iov;
        r
    }

    /// Reads and drops `len` payload bytes of a refused WRITE, keeping the stream in step.
    fn discard(&mut self, shared: &Shared, mut len: u64) -> Result<()> {
        self.scratch.resize(64 << 10, 0);
        let mut scratch = std::mem::take(&mut self.scratch);
        let mut w = self.request_watch(shared);
        let mut r = Ok(());
        while len > 0 && r.is_ok() {
            let n = len.min(scratch.len() as u64) as usize;
            r = self.s.recv_exact(&mut scratch[..n], &mut w);
            len -= n as u64;
        }
        self.scratch = scratch;
        r
    }
}
