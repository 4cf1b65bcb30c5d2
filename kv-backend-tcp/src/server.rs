//! The target side: a listener thread and one serving thread per incoming connection.
//! Every request is checked against this backend's own registrations before a byte
//! is read into or sent from them.

use std::collections::VecDeque;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use bytes::Bytes;
use kv_core::{Error, Notification, Result};
use parking_lot::Mutex;

use crate::memory::{Registry, Serving};
use crate::sys::{self, Stream, Watch, TICK};
use crate::wire::{self, ErrorCode, FrameOp, Header, WireSegment, HEADER_LEN};
use crate::Options;

/// State the serving threads share with the backend. `Send + Sync`.
pub(crate) struct Shared {
    pub regs: Registry,
    pub inbox: Mutex<VecDeque<Notification>>,
    pub instance: u64,
    pub opts: Options,
    pub shutdown: AtomicBool,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Shared {
    pub(crate) fn new(instance: u64, opts: Options) -> Shared {
        Shared {
            regs: Registry::default(),
            inbox: Mutex::new(VecDeque::new()),
            instance,
            opts,
            shutdown: AtomicBool::new(false),
            threads: Mutex::new(Vec::new()),
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
        let sh = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("kv-tcp-serve".into())
            .spawn(move || serve(stream, from, sh));
        let mut threads = shared.threads.lock();
        threads.retain(|t| !t.is_finished());
        match spawned {
            Ok(t) => threads.push(t),
            Err(e) => tracing::warn!("cannot serve {from}: {e}"),
        }
    }
}

/// Per-connection buffers, reused across requests (nothing allocated per request on
/// the hot path once they have grown).
struct Conn {
    s: Stream,
    from: SocketAddr,
    peer: String,
    table: Vec<u8>,
    segs: Vec<WireSegment>,
    guards: Vec<Serving>,
    iov: Vec<libc::iovec>,
    scratch: Vec<u8>,
}

fn serve(s: Stream, from: SocketAddr, shared: Arc<Shared>) {
    let mut c = Conn {
        s,
        from,
        peer: from.to_string(),
        table: Vec::new(),
        segs: Vec::new(),
        guards: Vec::new(),
        iov: Vec::new(),
        scratch: Vec::new(),
    };
    match c.run(&shared) {
        Ok(()) => {}
        Err(e @ Error::InvalidMetadata(_)) => {
            tracing::warn!("closing connection from {} ({}): {e}", c.peer, c.from)
        }
        Err(e) => tracing::debug!("connection from {} ({}) ended: {e}", c.peer, c.from),
    }
    c.guards.clear();
    c.s.shutdown();
}

impl Conn {
    fn watch<'a>(&'a self, shared: &'a Shared, idle: bool) -> Watch<'a> {
        let mut w = Watch::new(&self.peer, shared.opts.io_timeout);
        w.shutdown = Some(&shared.shutdown);
        w.idle_ok = idle;
        w
    }

    /// Reads the next header; `Ok(None)` on a clean close between frames.
    fn next_header(&self, shared: &Shared) -> Result<Option<Header>> {
        let mut buf = [0u8; HEADER_LEN];
        let mut w = self.watch(shared, true);
        match self.s.recv_exact(&mut buf, &mut w) {
            Ok(()) => wire::decode_header(&buf).map(Some),
            Err(Error::RemoteDisconnected { .. }) if shared.shutdown.load(Ordering::Acquire) => {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    fn send(&self, shared: &Shared, h: &Header, payload: &[u8]) -> Result<()> {
        let mut w = self.watch(shared, false);
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
        let mut w = self.watch(shared, false);
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
                FrameOp::Notify => {
                    if h.len > shared.opts.max_notification as u64 {
                        return Err(Error::invalid_metadata(format!(
                            "notification of {} bytes exceeds {}",
                            h.len, shared.opts.max_notification
                        )));
                    }
                    let mut payload = vec![0u8; h.len as usize];
                    let mut w = self.watch(shared, false);
                    self.s.recv_exact(&mut payload, &mut w)?;
                    shared.inbox.lock().push_back(Notification {
                        peer: self.peer.clone(),
                        payload: Bytes::from(payload),
                    });
                }
                op => {
                    return Err(Error::invalid_metadata(format!(
                        "unexpected {op:?} frame from an initiator"
                    )))
                }
            }
        }
        Ok(())
    }

    /// One WRITE or READ: table, checks, then data straight into / out of the
    /// registrations.
    fn request(&mut self, shared: &Shared, h: &Header) -> Result<()> {
        let tl = h.table_len();
        self.table.resize(tl, 0);
        if tl > 0 {
            let mut table = std::mem::take(&mut self.table);
            let mut w = self.watch(shared, false);
            let r = self.s.recv_exact(&mut table, &mut w);
            self.table = table;
            r?;
        }
        wire::decode_segments(h, &self.table, &mut self.segs)?;
        self.guards.clear();
        let mut refused = None;
        for s in &self.segs {
            match shared.regs.serve(s.key, s.addr, s.len) {
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

    fn receive_into(&mut self, shared: &Shared, h: &Header) -> Result<()> {
        self.iov.clear();
        self.iov
            .extend(self.segs.iter().map(|s| sys::iovec(s.addr, s.len)));
        let mut iov = std::mem::take(&mut self.iov);
        let mut w = self.watch(shared, false);
        // SAFETY: every segment lies in a live registration (checked by `serve`, held by
        // `self.guards` so deregister waits); the registrant promised the range is
        // valid for writes while registered.
        let r = unsafe { self.s.recv_all(&mut iov, &mut w) };
        self.iov = iov;
        r?;
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
        let mut w = self.watch(shared, false);
        // SAFETY: `head` lives on this frame; the segments lie in live registrations held
        // by `self.guards`, valid for reads while registered.
        let r = unsafe { self.s.send_all(&mut iov, &mut w) };
        self.iov = iov;
        r
    }

    /// Reads and drops `len` payload bytes of a refused WRITE, keeping the stream in step.
    fn discard(&mut self, shared: &Shared, mut len: u64) -> Result<()> {
        self.scratch.resize(64 << 10, 0);
        let mut scratch = std::mem::take(&mut self.scratch);
        let mut w = self.watch(shared, false);
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
