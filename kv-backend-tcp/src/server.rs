//! The target side: a listener thread (TCP, and an abstract Unix socket for same-host
//! peers) and one serving thread per incoming connection. A connection is *pending*
//! until it authenticated (preamble, handshake, HELLO within `handshake_timeout`);
//! pending connections are counted apart (`max_pending`, oldest closed first) from
//! authenticated ones (`max_connections`), so idle or unauthenticated connections
//! never push a real peer out. Every request is checked against this backend's own
//! registrations before a byte is read into or sent from them.

use std::cell::Cell;
use std::collections::VecDeque;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kv_core::auth::ClusterSecret;
use kv_core::{Error, Notification, RegistrationId, Result};
use parking_lot::Mutex;

use crate::channel::{self, Accepted, Channel};
use crate::importers::Importers;
use crate::memory::{Registry, Serving};
use crate::options::Options;
use crate::sys::{self, ShutdownHandle, Stream, Watch, TICK};
use crate::wire::{
    self, ChannelKind, ErrorCode, FrameOp, Header, WireSegment, HEADER_LEN, HELLO_RESET,
    HELLO_SAME_HOST_CONTROL,
};

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

/// State the serving threads share with the backend. `Send + Sync`.
pub(crate) struct Shared {
    pub regs: Registry,
    pub inbox: Mutex<Inbox>,
    pub instance: u64,
    pub opts: Options,
    /// The cluster secret every connection authenticates with (`None`: insecure).
    pub secret: Option<ClusterSecret>,
    pub shutdown: AtomicBool,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Authenticated connections being served now (at most `opts.max_connections`).
    conns: AtomicUsize,
    /// Connections still authenticating, oldest first (at most `opts.max_pending`).
    pending: Mutex<VecDeque<(u64, ShutdownHandle)>>,
    next_conn: AtomicU64,
    /// Same-host importers (their control connections and subscriptions).
    importers: Importers,
}

impl Shared {
    pub(crate) fn new(instance: u64, opts: Options, secret: Option<ClusterSecret>) -> Shared {
        Shared {
            regs: Registry::default(),
            inbox: Mutex::new(Inbox::default()),
            instance,
            opts,
            secret,
            shutdown: AtomicBool::new(false),
            threads: Mutex::new(Vec::new()),
            conns: AtomicUsize::new(0),
            pending: Mutex::new(VecDeque::new()),
            next_conn: AtomicU64::new(1),
            importers: Importers::default(),
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

    /// Deregisters `id`. Revokes it first (peers' requests and imports refused);
    /// tells every same-host importer subscribed to it and waits (at most
    /// `io_timeout` plus 100 ms) until each is done with it and no peer request is
    /// served from it; only then unlinks it. Else `Busy`, and it stays registered (revoked).
    pub(crate) fn deregister(&self, id: RegistrationId) -> Result<()> {
        let (reg, subscribers) = self.regs.revoke(id)?;
        let until = Instant::now() + self.deregister_wait();
        let acked = subscribers.is_empty()
            || self
                .importers
                .revoke(reg.key, &subscribers, until, &self.shutdown);
        let served = Registry::wait_served(&reg, until);
        if !(acked && served) {
            let who = if acked {
                "a peer request is still being served from it"
            } else {
                "a same-host importer did not acknowledge the revocation (or cannot be reached)"
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

    /// Counts a new connection as pending, closing the oldest pending one when full.
    fn add_pending(&self, id: u64, h: ShutdownHandle) {
        let mut p = self.pending.lock();
        while p.len() >= self.opts.max_pending.max(1) {
            if let Some((old, oh)) = p.pop_front() {
                tracing::warn!(
                    "closing connection {old}: still not authenticated while {} newer ones wait (max_pending = {})",
                    p.len() + 1,
                    self.opts.max_pending
                );
                oh.shutdown();
            }
        }
        p.push_back((id, h));
    }

    fn end_pending(&self, id: u64) {
        self.pending.lock().retain(|(i, _)| *i != id);
    }
}

/// Binds the listeners (TCP at `listen`, and a fresh abstract Unix socket for
/// same-host peers unless `same_host` is off) and starts the listener thread. Returns
/// the TCP address and the Unix socket's name (empty when there is none).
pub(crate) fn start(
    shared: Arc<Shared>,
    listen: SocketAddr,
) -> Result<(SocketAddr, String, JoinHandle<()>)> {
    let l = TcpListener::bind(listen).map_err(|e| Error::io(format!("binding {listen}"), e))?;
    l.set_nonblocking(true)
        .map_err(|e| Error::io("listener", e))?;
    let addr = l.local_addr().map_err(|e| Error::io("listener", e))?;
    let (name, local) = if shared.opts.same_host {
        let name = format!("kvx-tcp-{:032x}", kv_core::auth::random_u128()?);
        match sys::listen_local(&name) {
            Ok(fd) => (name, Some(fd)),
            Err(e) => {
                tracing::info!("no same-host socket ({e}); same-host peers use TCP");
                (String::new(), None)
            }
        }
    } else {
        (String::new(), None)
    };
    let t = std::thread::Builder::new()
        .name("kv-tcp-listen".into())
        .spawn(move || listen_loop(l, local, shared))
        .map_err(|e| Error::io("spawning the tcp listener thread", e))?;
    Ok((addr, name, t))
}

fn listen_loop(l: TcpListener, local: Option<OwnedFd>, shared: Arc<Shared>) {
    while !shared.shutdown.load(Ordering::Acquire) {
        let mut fds = [
            libc::pollfd {
                fd: l.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: local.as_ref().map_or(-1, |f| f.as_raw_fd()),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfds (a negative fd is ignored); bounded timeout so
        // shutdown is noticed.
        unsafe { libc::poll(fds.as_mut_ptr(), 2, TICK.as_millis() as libc::c_int) };
        if let Ok((sock, from)) = l.accept() {
            match Stream::from_std(sock) {
                Ok(s) => spawn_serve(&shared, s, from.to_string()),
                Err(e) => tracing::warn!("dropping connection from {from}: {e}"),
            }
        }
        if let Some(f) = &local {
            if let Ok(s) = sys::accept_local(f.as_fd()) {
                let from = match s.peer_pid() {
                    Some(p) => format!("local pid {p}"),
                    None => "local".into(),
                };
                spawn_serve(&shared, s, from);
            }
        }
    }
}

fn spawn_serve(shared: &Arc<Shared>, s: Stream, from: String) {
    let id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
    match s.shutdown_handle() {
        Ok(h) => shared.add_pending(id, h),
        Err(e) => {
            tracing::warn!("dropping connection from {from}: {e}");
            return;
        }
    }
    let sh = shared.clone();
    let spawned = std::thread::Builder::new()
        .name("kv-tcp-serve".into())
        .spawn(move || serve(id, s, from, sh));
    let mut threads = shared.threads.lock();
    threads.retain(|t| !t.is_finished());
    match spawned {
        Ok(t) => threads.push(t),
        Err(e) => {
            shared.end_pending(id);
            tracing::warn!("cannot serve a connection: {e}")
        }
    }
}

/// Per-connection state and buffers, reused across requests (nothing allocated per
/// request on the hot path once they have grown).
struct Conn {
    id: u64,
    ch: Arc<Channel>,
    from: String,
    peer: String,
    /// The importer id of a same-host control connection.
    importer: Option<u64>,
    /// The current frame's header and body.
    raw: Vec<u8>,
    segs: Vec<WireSegment>,
    guards: Vec<Serving>,
    iov: Vec<libc::iovec>,
    scratch: Vec<u8>,
    /// Absolute limit of the request being served.
    limit: Instant,
    /// The registry's revoke epoch when the request's checks began.
    epoch: u64,
}

fn serve(id: u64, s: Stream, from: String, shared: Arc<Shared>) {
    let pidfd = s.peer_pidfd();
    let local = s.is_local();
    let mut w = Watch::new(&from, shared.opts.handshake_timeout);
    w.limit = Some(Instant::now() + shared.opts.handshake_timeout);
    w.shutdown = Some(&shared.shutdown);
    let accepted = channel::accept(s, shared.secret.as_ref(), &mut w);
    shared.end_pending(id);
    let (ch, acc) = match accepted {
        Ok(x) => x,
        Err(e) => {
            tracing::warn!("refusing connection from {from}: {e}");
            return;
        }
    };
    let mut c = Conn {
        id,
        ch: Arc::new(ch),
        peer: acc.name.clone(),
        from,
        importer: None,
        raw: Vec::new(),
        segs: Vec::new(),
        guards: Vec::new(),
        iov: Vec::new(),
        scratch: Vec::new(),
        limit: Instant::now(),
        epoch: 0,
    };
    // Only authenticated connections count against max_connections.
    if shared.conns.fetch_add(1, Ordering::AcqRel) >= shared.opts.max_connections {
        shared.conns.fetch_sub(1, Ordering::AcqRel);
        tracing::warn!(
            "refusing {} ({}): max_connections = {} connections already served",
            c.peer,
            c.from,
            shared.opts.max_connections
        );
        let e = Error::Busy("too many connections".into());
        let _ = c.refuse(&shared, 0, &e);
        c.ch.shutdown();
        return;
    }
    match c.run(&shared, &acc, local, pidfd) {
        Ok(()) => {}
        Err(
            e @ (Error::InvalidMetadata(_)
            | Error::Unauthenticated(_)
            | Error::Busy(_)
            | Error::TimedOut { .. }
            | Error::NotRegistered(_)),
        ) => tracing::warn!("closing connection from {} ({}): {e}", c.peer, c.from),
        Err(e) => tracing::debug!("connection from {} ({}) ended: {e}", c.peer, c.from),
    }
    // Nothing of a registration is touched after its guard drops.
    c.guards.clear();
    c.ch.shutdown();
    if let Some(i) = c.importer {
        shared.importers.detach(i, c.id);
    }
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

    fn send(&self, shared: &Shared, h: &Header, body: &[u8]) -> Result<()> {
        let mut w = watch(&self.peer, shared, false);
        self.ch.send(h, body, &mut w)
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

    fn run(
        &mut self,
        shared: &Shared,
        acc: &Accepted,
        local: bool,
        pidfd: Option<OwnedFd>,
    ) -> Result<()> {
        let h = acc.hello;
        if h.key != u128::from(shared.instance) {
            let e = Error::RemoteDisconnected {
                peer: self.peer.clone(),
                reason: "this listener belongs to a newer instance".into(),
            };
            return self.refuse(shared, 0, &e);
        }
        if h.status & HELLO_SAME_HOST_CONTROL != 0 {
            if !local || acc.kind != ChannelKind::Control {
                let e = Error::invalid_argument(
                    "a same-host control connection must come over the Unix socket",
                );
                self.refuse(shared, 0, &e)?;
                return Err(e);
            }
            // Known before the importer hears HELLO_ACK (and can import anything).
            self.importer = Some(h.addr);
            shared.importers.attach(
                h.addr,
                (self.id, self.ch.clone()),
                pidfd,
                &self.peer,
                h.status & HELLO_RESET != 0,
                &shared.regs,
            );
        }
        self.send(
            shared,
            &Header {
                key: u128::from(shared.instance),
                ..Header::new(FrameOp::HelloAck)
            },
            &[],
        )?;
        loop {
            let mut w = watch(&self.peer, shared, true);
            let h = match self.ch.recv_header(&mut self.raw, &mut w) {
                Ok(h) => h,
                Err(Error::RemoteDisconnected { .. })
                    if shared.shutdown.load(Ordering::Acquire) =>
                {
                    return Ok(())
                }
                Err(e) => return Err(e),
            };
            match (h.op, self.importer) {
                (FrameOp::Write | FrameOp::Read, _) => self.request(shared, &h)?,
                (FrameOp::Notify, _) => self.notification(shared, &h)?,
                (FrameOp::RevokeAck, Some(i)) => {
                    self.rest(shared, &h)?;
                    shared.importers.acked(i, h.id);
                }
                (FrameOp::Import, Some(i)) => {
                    self.rest(shared, &h)?;
                    match shared.regs.subscribe(h.key, h.addr, h.len, i) {
                        Ok(reg) => {
                            let k = reg.remote_key().encode();
                            let ack = Header {
                                id: h.id,
                                len: k.len() as u64,
                                ..Header::new(FrameOp::ImportAck)
                            };
                            self.send(shared, &ack, &k)?;
                        }
                        Err(e) => self.refuse(shared, h.id, &e)?,
                    }
                }
                (FrameOp::Bye, Some(i)) => {
                    self.rest(shared, &h)?;
                    shared.importers.bye(i, &shared.regs);
                    self.importer = None;
                }
                (op, _) => {
                    return Err(Error::invalid_metadata(format!(
                        "unexpected {op:?} frame from an initiator"
                    )))
                }
            }
        }
    }

    /// Reads the body and tag of a small frame (bounded by `io_timeout`).
    fn rest(&mut self, shared: &Shared, h: &Header) -> Result<()> {
        let mut w = watch(&self.peer, shared, false);
        self.ch.recv_rest(h, &mut self.raw, &mut w)
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
        self.rest(shared, h)?;
        let payload = Bytes::copy_from_slice(&self.raw[HEADER_LEN..]);
        let mut ib = shared.inbox.lock();
        // Only serving threads add, each checked first; a racing sender may overshoot
        // by one notification per connection, still bounded.
        ib.bytes += len;
        ib.q.push_back(Notification {
            peer: self.peer.clone(),
            payload,
        });
        Ok(())
    }

    /// One WRITE or READ: table, checks, then data straight into / out of the
    /// registrations, all within one absolute limit (`io_timeout`).
    fn request(&mut self, shared: &Shared, h: &Header) -> Result<()> {
        self.limit = Instant::now() + shared.opts.io_timeout;
        {
            let mut raw = std::mem::take(&mut self.raw);
            let mut w = self.request_watch(shared);
            let r = self.ch.recv_rest(h, &mut raw, &mut w);
            self.raw = raw;
            r?;
        }
        wire::decode_segments(h, &self.raw[HEADER_LEN..], &mut self.segs)?;
        self.guards.clear();
        // Read before the checks: a revoke after them moves the epoch.
        self.epoch = shared.regs.epoch();
        let write = h.op == FrameOp::Write;
        let mut refused = None;
        for s in &self.segs {
            match shared.regs.serve(s.key, s.addr, s.len, write) {
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
        // SAFETY: every segment lies in a writable registration that was live when
        // checked by `request` and is held by `self.guards` (deregister waits for them
        // to drop); the call stops before its next read once the registration is
        // revoked or the request's limit passed. The registrant promised the range is
        // valid for writes while registered.
        let r = unsafe { self.ch.recv_payload(&mut iov, &mut w) };
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
        // Header and tag go first; `send_parts` fills them in.
        self.iov.extend([sys::iovec(0, 0), sys::iovec(0, 0)]);
        self.iov
            .extend(self.segs.iter().map(|s| sys::iovec(s.addr, s.len)));
        let mut iov = std::mem::take(&mut self.iov);
        let seen = Cell::new(self.epoch);
        let guards = &self.guards;
        let abort = || Self::revoked(&shared.regs, &seen, guards);
        let mut w = watch(&self.peer, shared, false);
        w.limit = Some(self.limit);
        w.abort = Some(&abort);
        // SAFETY: the segments lie in registrations held by `self.guards`, valid for
        // reads while registered; the call stops before its next write once one is
        // revoked or the request's limit passed.
        let r = unsafe { self.ch.send_parts(&head, &mut iov, &mut w) };
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
            r = self.ch.recv_exact(&mut scratch[..n], &mut w);
            len -= n as u64;
        }
        self.scratch = scratch;
        r
    }
}
