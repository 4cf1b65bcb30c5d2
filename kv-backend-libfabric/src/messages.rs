//! Messages over `FI_MSG`: the registered send and receive buffers, the queue of
//! control frames to send, the sessions (ours with the peers we connected to, and
//! theirs with us), and the bounded inbox of received notifications.
//!
//! Everything here runs under the backend's one mutex. Send and receive operations
//! have their own contexts (`ops`); the transfer engine (`progress.rs`) hands over the
//! completions it does not recognise.

use std::collections::{HashMap, VecDeque};
use std::ffi::c_void;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kv_core::auth::{ClusterSecret, TAG_LEN};
use kv_core::{Error, Notification, Result};

use crate::endpoint;
use crate::fabric::{CqError, Fabric, MrUse};
use crate::ffi;
use crate::memory::Slab;
use crate::request::{OpCtx, OpKind};
use crate::session::{Client, ClientStep, ServerStep, Servers, To};
use crate::wire::{self, Frame, Kind, MSG_BUF};

/// Number of posted receive buffers.
pub const RECV_BUFS: usize = 16;
/// Number of send buffers.
const SEND_BUFS: usize = 8;
/// Most control frames waiting for a send buffer (beyond it new frames are refused:
/// the peers are not reading).
const MAX_QUEUED_FRAMES: usize = 65_536;

/// Caps on received notifications waiting to be drained.
#[derive(Debug, Clone, Copy)]
pub struct InboxLimits {
    /// Most notifications.
    pub messages: usize,
    /// Most payload bytes.
    pub bytes: usize,
}

/// A frame waiting for a send buffer.
struct OutFrame {
    addr: u64,
    kind: Kind,
    hs: u64,
    seq: u64,
    tag: [u8; TAG_LEN],
    body: Bytes,
    transfer: Option<(u64, u64)>,
    close: bool,
}

/// Something the transfer engine acts on.
#[derive(Debug)]
pub enum Event {
    /// The notification of transfer `(id, epoch)` was sent (or failed to be).
    NoteSent((u64, u64), Option<CqError>),
    /// Peer `ep` says its registration with `key` is gone.
    Revoked(u64, u64),
    /// Peer `ep` answered our check of its registration `key`: live or not.
    Checked(u64, u64, bool),
    /// Session `hs` asks whether our registration `key` is live (answer with
    /// [`Messages::answer`]).
    Check(u64, u64),
    /// An address-vector entry is no longer needed by the sessions.
    Release(u64),
}

/// How a queued notification fared.
#[derive(Debug)]
pub enum Queued {
    /// In the send queue.
    Yes,
    /// The session is still opening: try again later.
    NotYet,
}

/// Our session with one peer.
struct ClientEntry {
    session: Client,
    /// The peer's address-vector entry.
    addr: u64,
    /// Frames to send once the session is open (checks of imports).
    deferred: Vec<(Kind, Bytes)>,
    /// Keys we asked about and got no answer for yet (asked again on a new session).
    unanswered: Vec<u64>,
}

/// The message layer's state. `Send`, not `Sync` (used under the backend's mutex).
pub struct Messages {
    agent: String,
    secret: Option<ClusterSecret>,
    /// Our endpoint name (what a HELLO tells the server).
    address: Vec<u8>,
    send: Slab,
    recv: Slab,
    free_send: Vec<usize>,
    /// Posted sends and receives by context address.
    ops: HashMap<usize, Box<OpCtx>>,
    out: VecDeque<OutFrame>,
    /// Our sessions with the peers we connected to, by endpoint id.
    clients: HashMap<u64, ClientEntry>,
    /// Endpoint id of each of our sessions, by session id.
    by_hs: HashMap<u64, u64>,
    /// Their sessions with us.
    servers: Servers,
    /// Endpoint name of every address-vector entry frames go to (liveness checks).
    names: HashMap<u64, Vec<u8>>,
    inbox: VecDeque<Notification>,
    inbox_bytes: usize,
    limits: InboxLimits,
    /// Received notifications beyond the inbox caps, each holding its receive buffer
    /// (not re-posted until drained: senders are held back by the provider).
    parked: VecDeque<(usize, Notification)>,
    /// Frames dropped: malformed, unauthenticated, replayed.
    pub dropped: u64,
}

impl Messages {
    /// Registers the buffers on `fabric` and posts the receives. On failure, what was
    /// registered is closed again before its memory is freed.
    pub fn open(
        fabric: &mut Fabric,
        agent: &str,
        secret: Option<ClusterSecret>,
        limits: InboxLimits,
    ) -> Result<Messages> {
        let send = Slab::new(fabric, SEND_BUFS, MrUse::Send)?;
        let recv = match Slab::new(fabric, RECV_BUFS, MrUse::Recv) {
            Ok(r) => r,
            Err(e) => {
                let mut send = send;
                send.close(fabric);
                return Err(e);
            }
        };
        let mut m = Messages {
            agent: agent.to_string(),
            secret,
            address: fabric.address.clone(),
            send,
            recv,
            free_send: (0..SEND_BUFS).rev().collect(),
            limits,
            ..Messages::empty()
        };
        for slot in 0..RECV_BUFS {
            if let Err(e) = m.post_recv(fabric, slot) {
                // Nothing is sent yet; the receives posted so far go with the endpoint,
                // which the caller closes before the buffers are freed.
                m.close_on_failure(fabric);
                return Err(e);
            }
        }
        Ok(m)
    }

    /// An empty message layer with no buffers (what a leaked one leaves behind).
    pub fn empty() -> Messages {
        Messages {
            agent: String::new(),
            secret: None,
            address: Vec::new(),
            send: Slab::empty(),
            recv: Slab::empty(),
            free_send: Vec::new(),
            ops: HashMap::new(),
            out: VecDeque::new(),
            clients: HashMap::new(),
            by_hs: HashMap::new(),
            servers: Servers::default(),
            names: HashMap::new(),
            inbox: VecDeque::new(),
            inbox_bytes: 0,
            limits: InboxLimits {
                messages: 0,
                bytes: 0,
            },
            parked: VecDeque::new(),
            dropped: 0,
        }
    }

    /// After a failed `open` (or by the owner's drop, once the endpoint is closed):
    /// closes both registrations so the buffers can be freed.
    pub fn close_on_failure(&mut self, fabric: &mut Fabric) {
        fabric.close_ep();
        self.close(fabric);
    }

    /// Closes both registrations (the endpoint must be closed already).
    pub fn close(&mut self, fabric: &mut Fabric) {
        self.send.close(fabric);
        self.recv.close(fabric);
    }

    /// Leaks the buffers (the provider may still hold them), kept reachable.
    pub fn leak(self) {
        crate::memory::keep_forever(self);
    }

    /// True when a posted send to `addr` has not completed.
    pub fn sending_to(&self, addr: u64) -> bool {
        self.ops
            .values()
            .any(|o| matches!(o.kind, OpKind::Send { addr: a, .. } if a == addr))
            || self.out.iter().any(|f| f.addr == addr)
    }

    /// Number of sends the provider still holds.
    pub fn sends_outstanding(&self) -> usize {
        self.ops
            .values()
            .filter(|o| matches!(o.kind, OpKind::Send { .. }))
            .count()
    }

    /// Opens our session with the peer `ep` (address-vector entry `addr`, endpoint name
    /// `name`): queues the HELLO.
    pub fn connect(&mut self, ep: u64, addr: u64, name: &[u8]) -> Result<()> {
        self.names.insert(addr, name.to_vec());
        self.start(ep, addr)
    }

    fn start(&mut self, ep: u64, addr: u64) -> Result<()> {
        let session = Client::new()?;
        let body = Client::hello(self.secret.as_ref(), &self.address, &self.agent)?;
        self.push(
            addr,
            Kind::Hello,
            session.hs,
            0,
            [0; TAG_LEN],
            body.into(),
            None,
        );
        self.by_hs.insert(session.hs, ep);
        // A restarted session asks again what the old one left unanswered.
        let (deferred, unanswered) = match self.clients.remove(&ep) {
            Some(old) => {
                let mut d: Vec<(Kind, Bytes)> = old
                    .unanswered
                    .iter()
                    .map(|k| (Kind::Check, Bytes::copy_from_slice(&k.to_le_bytes())))
                    .collect();
                d.extend(old.deferred.into_iter().filter(|(k, _)| *k != Kind::Check));
                (d, old.unanswered)
            }
            None => (Vec::new(), Vec::new()),
        };
        self.clients.insert(
            ep,
            ClientEntry {
                session,
                addr,
                deferred,
                unanswered,
            },
        );
        Ok(())
    }

    /// Closes our session with `ep` (after `disconnect`): tells the peer, best effort.
    pub fn disconnect(&mut self, ep: u64) {
        if let Some(mut c) = self.clients.remove(&ep) {
            self.by_hs.remove(&c.session.hs);
            if let Some((seq, tag)) = c.session.seal(Kind::Bye, &[]) {
                self.push(
                    c.addr,
                    Kind::Bye,
                    c.session.hs,
                    seq,
                    tag,
                    Bytes::new(),
                    None,
                );
            }
        }
    }

    /// The error our session with `ep` failed with, if it did.
    pub fn client_failure(&self, ep: u64) -> Option<Error> {
        self.clients
            .get(&ep)
            .and_then(|c| c.session.failure().cloned())
    }

    /// Asks peer `ep` whether its registration `key` is live (sent once the session
    /// is open); the answer comes back as [`Event::Checked`].
    pub fn check(&mut self, ep: u64, key: u64) {
        let body = Bytes::copy_from_slice(&key.to_le_bytes());
        if let Some(c) = self.clients.get_mut(&ep) {
            if c.unanswered.contains(&key) {
                return;
            }
            c.unanswered.push(key);
            c.deferred.push((Kind::Check, body));
        }
        self.flush_deferred(ep);
    }

    /// Sends `ep`'s deferred frames if its session is open.
    fn flush_deferred(&mut self, ep: u64) {
        let Some(c) = self.clients.get_mut(&ep) else {
            return;
        };
        if !c.session.is_open() {
            return;
        }
        let (addr, hs) = (c.addr, c.session.hs);
        let mut sealed = Vec::new();
        for (kind, body) in std::mem::take(&mut c.deferred) {
            if let Some((seq, tag)) = c.session.seal(kind, &body) {
                sealed.push((kind, seq, tag, body));
            }
        }
        for (kind, seq, tag, body) in sealed {
            self.push(addr, kind, hs, seq, tag, body, None);
        }
    }

    /// Answers session `hs`'s check of our registration `key`.
    pub fn answer(&mut self, hs: u64, key: u64, live: bool) {
        let mut body = key.to_le_bytes().to_vec();
        body.push(u8::from(live));
        if let Some((addr, seq, tag)) = self.servers.seal(hs, Kind::Checked, &body) {
            self.push(addr, Kind::Checked, hs, seq, tag, body.into(), None);
        }
    }

    /// Restarts handshakes that took longer than `timeout` (the peer may have been
    /// stopped): a fresh session id and HELLO. Refused sessions stay refused.
    pub fn retry_handshakes(&mut self, timeout: Duration) {
        let now = Instant::now();
        let stale: Vec<(u64, u64, u64)> = self
            .clients
            .iter()
            .filter(|(_, c)| !c.session.is_open() && c.session.failure().is_none())
            .filter(|(_, c)| now.duration_since(c.session.started) > timeout)
            .map(|(ep, c)| (*ep, c.addr, c.session.hs))
            .collect();
        for (ep, addr, hs) in stale {
            self.by_hs.remove(&hs);
            if let Err(e) = self.start(ep, addr) {
                tracing::warn!("libfabric: restarting a handshake: {e}");
            }
        }
    }

    /// Queues a notification to `ep` (at `addr`). `Err` when its session was refused.
    pub fn note(
        &mut self,
        ep: u64,
        addr: u64,
        payload: &Bytes,
        transfer: Option<(u64, u64)>,
    ) -> Result<Queued> {
        if self.out.len() >= MAX_QUEUED_FRAMES {
            return Err(Error::Busy(
                "too many notifications waiting to be sent; the peers are not reading".into(),
            ));
        }
        let Some(c) = self.clients.get_mut(&ep) else {
            return Err(Error::NotRegistered(format!("session of endpoint {ep}")));
        };
        if let Some(e) = c.session.failure() {
            return Err(e.clone());
        }
        let Some((seq, tag)) = c.session.seal(Kind::Note, payload) else {
            return Ok(Queued::NotYet);
        };
        let hs = c.session.hs;
        self.push(addr, Kind::Note, hs, seq, tag, payload.clone(), transfer);
        Ok(Queued::Yes)
    }

    /// Tells every peer with an open session that registration `key` is gone, so it
    /// refuses transfers naming it instead of sending the provider an operation we would
    /// refuse.
    pub fn revoke(&mut self, key: u64) {
        let body = key.to_le_bytes();
        for (hs, _) in self.servers.open_sessions() {
            if let Some((addr, seq, tag)) = self.servers.seal(hs, Kind::Revoke, &body) {
                let b = Bytes::copy_from_slice(&body);
                self.push(addr, Kind::Revoke, hs, seq, tag, b, None);
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn push(
        &mut self,
        addr: u64,
        kind: Kind,
        hs: u64,
        seq: u64,
        tag: [u8; TAG_LEN],
        body: Bytes,
        transfer: Option<(u64, u64)>,
    ) {
        self.push_frame(OutFrame {
            addr,
            kind,
            hs,
            seq,
            tag,
            body,
            transfer,
            close: false,
        });
    }

    fn push_frame(&mut self, f: OutFrame) {
        if self.out.len() >= MAX_QUEUED_FRAMES && f.transfer.is_none() {
            self.dropped += 1;
            return;
        }
        self.out.push_back(f);
    }

    /// Hands queued frames to the provider while send buffers are free; returns how
    /// many, and the events of frames that failed at once.
    pub fn pump(&mut self, fabric: &mut Fabric, events: &mut Vec<Event>) -> usize {
        let mut n = 0;
        while let Some(f) = self.out.front() {
            if !self.names.get(&f.addr).is_none_or(|a| endpoint::alive(a)) {
                // Sending to an shm endpoint that is gone touches unmapped memory.
                if let Some(f) = self.out.pop_front() {
                    let e = cq_error(
                        -(libc::ENOTCONN as i64),
                        "the peer's endpoint is closed".into(),
                    );
                    if let Some(t) = f.transfer {
                        events.push(Event::NoteSent(t, Some(e)));
                    }
                    if f.close {
                        events.push(Event::Release(f.addr));
                    }
                }
                continue;
            }
            let Some(slot) = self.free_send.pop() else {
                break;
            };
            let frame = Frame {
                kind: f.kind,
                hs: f.hs,
                seq: f.seq,
                tag: f.tag,
                body: &f.body,
            };
            // SAFETY: `slot` came off `free_send`: its last send completed (or it was
            // never posted), and it is posted again only below, after the slice ended.
            let buf = unsafe { self.send.slice_mut(slot) };
            let len = match wire::encode_frame(buf, &frame) {
                Ok(l) => l,
                Err(e) => {
                    // Bodies are checked when queued; only a bug gets here.
                    tracing::warn!("libfabric: dropping a control frame: {e}");
                    self.free_send.push(slot);
                    if let Some(f) = self.out.pop_front() {
                        if let Some(t) = f.transfer {
                            events.push(Event::NoteSent(t, Some(cq_error(-5, format!("{e}")))));
                        }
                    }
                    continue;
                }
            };
            let ctx = OpCtx::new(OpKind::Send {
                slot,
                transfer: f.transfer,
                addr: f.addr,
                close: f.close,
            });
            let key = &*ctx as *const OpCtx as usize;
            // SAFETY: the slab and the boxed context live until the completion is read
            // or the endpoint is closed (or both are leaked).
            let rc = unsafe {
                fabric.send(
                    self.send.buf(slot),
                    len,
                    self.send.desc(),
                    f.addr,
                    key as *mut c_void,
                )
            };
            if rc == -ffi::FI_EAGAIN {
                self.free_send.push(slot);
                break;
            }
            let Some(f) = self.out.pop_front() else { break };
            if rc < 0 {
                self.free_send.push(slot);
                let e = cq_error(
                    rc as i64,
                    format!("fi_send: {}", fabric.lib.strerror(rc as i32)),
                );
                tracing::debug!("libfabric: a control frame failed: {}", e.message);
                if let Some(t) = f.transfer {
                    events.push(Event::NoteSent(t, Some(e)));
                }
                if f.close {
                    events.push(Event::Release(f.addr));
                }
                continue;
            }
            self.ops.insert(key, ctx);
            n += 1;
        }
        n
    }

    fn post_recv(&mut self, fabric: &mut Fabric, slot: usize) -> Result<()> {
        let ctx = OpCtx::new(OpKind::Recv { slot });
        let key = &*ctx as *const OpCtx as usize;
        let (buf, desc) = (self.recv.buf(slot), self.recv.desc());
        // SAFETY: the slab and the boxed context live until the completion is read or
        // the endpoint is closed (the owner closes it before freeing either).
        let rc = unsafe { fabric.recv(buf, MSG_BUF, desc, key as *mut c_void) };
        if rc < 0 {
            return Err(fabric.lib.error("fi_recv", rc as i64));
        }
        self.ops.insert(key, ctx);
        Ok(())
    }

    /// Handles the completion of a send or receive posted here. `false` when `ctx` is
    /// not ours.
    pub fn complete(
        &mut self,
        fabric: &mut Fabric,
        ctx: usize,
        len: usize,
        err: Option<CqError>,
        events: &mut Vec<Event>,
    ) -> bool {
        let Some(op) = self.ops.remove(&ctx) else {
            return false;
        };
        match op.kind {
            OpKind::Send {
                slot,
                transfer,
                addr,
                close,
            } => {
                self.free_send.push(slot);
                if let Some(t) = transfer {
                    events.push(Event::NoteSent(t, err));
                } else if let Some(e) = err {
                    tracing::debug!("libfabric: control frame send failed: {}", e.message);
                }
                if close {
                    events.push(Event::Release(addr));
                }
            }
            OpKind::Recv { slot } => {
                match err {
                    Some(e) if e.code == -(libc::ECANCELED as i64) => return true,
                    Some(e) => tracing::warn!("libfabric: a receive failed: {}", e.message),
                    None => {
                        if self.on_frame(fabric, slot, len, events) {
                            return true; // parked: re-posted when drained
                        }
                    }
                }
                if let Err(e) = self.post_recv(fabric, slot) {
                    tracing::warn!("libfabric: re-posting a receive buffer: {e}");
                }
            }
            OpKind::Rma { .. } => return false,
        }
        true
    }

    /// Handles one received frame; `true` when its buffer is parked in the inbox.
    fn on_frame(
        &mut self,
        fabric: &mut Fabric,
        slot: usize,
        len: usize,
        events: &mut Vec<Event>,
    ) -> bool {
        // SAFETY: the provider completed this receive (`slot` came off its completion)
        // and it is re-posted only after the frame was handled.
        let buf = unsafe { self.recv.slice(slot, len) };
        let Ok(f) = wire::decode_frame(buf) else {
            self.dropped += 1;
            return false;
        };
        if f.kind.direction() == b's' {
            let Some(&ep) = self.by_hs.get(&f.hs) else {
                self.dropped += 1;
                return false;
            };
            let Some(c) = self.clients.get_mut(&ep) else {
                return false;
            };
            let addr = c.addr;
            match c.session.on_frame(self.secret.as_ref(), &self.agent, &f) {
                ClientStep::Nothing => {}
                ClientStep::Opened => self.flush_deferred(ep),
                ClientStep::Revoke(key) => events.push(Event::Revoked(ep, key)),
                ClientStep::Checked(key, live) => {
                    c.unanswered.retain(|k| *k != key);
                    events.push(Event::Checked(ep, key, live));
                }
                ClientStep::Send(kind, body) => {
                    let hs = f.hs;
                    self.push(addr, kind, hs, 0, [0; TAG_LEN], body.into(), None);
                }
            }
            return false;
        }
        let hs = f.hs;
        match self.servers.on_frame(self.secret.as_ref(), &f) {
            ServerStep::Nothing => self.dropped += 1,
            ServerStep::Note(peer) => {
                let payload = Bytes::copy_from_slice(f.body);
                let n = Notification { peer, payload };
                let full = self.inbox.len() >= self.limits.messages
                    || self.inbox_bytes.saturating_add(n.payload.len()) > self.limits.bytes;
                if full || !self.parked.is_empty() {
                    self.parked.push_back((slot, n));
                    return true;
                }
                self.inbox_bytes += n.payload.len();
                self.inbox.push_back(n);
            }
            ServerStep::Close(addr) => events.push(Event::Release(addr)),
            ServerStep::Check(hs, key) => events.push(Event::Check(hs, key)),
            ServerStep::Reply {
                to,
                kind,
                body,
                close,
            } => {
                let addr = match to {
                    To::Entry(a) => a,
                    To::Address(address) => match fabric.insert(&address) {
                        Ok(a) => {
                            if !close {
                                self.servers.open(hs, a);
                            }
                            self.names.insert(a, address);
                            a
                        }
                        Err(e) => {
                            tracing::debug!("libfabric: a peer's HELLO named a bad address: {e}");
                            self.servers.abort(hs);
                            return false;
                        }
                    },
                };
                self.push_frame(OutFrame {
                    addr,
                    kind,
                    hs,
                    seq: 0,
                    tag: [0; TAG_LEN],
                    body: body.into(),
                    transfer: None,
                    close,
                });
            }
        }
        false
    }

    /// Moves received notifications to `out`, oldest first, and re-posts the receive
    /// buffers that were held back; returns how many.
    pub fn drain(&mut self, fabric: &mut Fabric, out: &mut Vec<Notification>) -> usize {
        let n = self.inbox.len() + self.parked.len();
        out.extend(self.inbox.drain(..));
        self.inbox_bytes = 0;
        while let Some((slot, note)) = self.parked.pop_front() {
            out.push(note);
            if let Err(e) = self.post_recv(fabric, slot) {
                tracing::warn!("libfabric: re-posting a receive buffer: {e}");
            }
        }
        n
    }

    /// `(notifications waiting, their payload bytes, receive buffers held back)`.
    pub fn inbox_len(&self) -> (usize, usize, usize) {
        let parked: usize = self.parked.iter().map(|(_, n)| n.payload.len()).sum();
        (
            self.inbox.len() + self.parked.len(),
            self.inbox_bytes + parked,
            self.parked.len(),
        )
    }
}

/// A completion-style error for a frame that failed before reaching the provider.
fn cq_error(code: i64, message: String) -> CqError {
    CqError {
        context: std::ptr::null_mut(),
        code,
        message,
    }
}
