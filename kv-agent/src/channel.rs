//! The side channel: metadata served and pushed over TCP, the embedded default.
//!
//! Every connection opens with the handshake of [`crate::frame`] (the cluster secret
//! proven by both sides), then carries one request: `GET` (empty payload) answered with
//! `META` + this agent's metadata, or `PUT` + metadata (a peer publishing itself, under
//! the name it proved) answered with `OK` or `ERR` + message.
//!
//! Bounded by construction: a connection that has not finished its handshake within
//! the handshake deadline is closed; at most [`MAX_PENDING`] such connections are held
//! ([`MAX_PENDING_PER_SOURCE`] per source address) and a new one evicts the oldest, so
//! idle connections can never lock a peer out; authenticated requests are counted
//! apart ([`MAX_ADMITTED`]); frame lengths are read only after authentication and the
//! payload bytes being received at once are capped ([`MAX_BUFFERED`]). Every thread it
//! starts is joined when the agent is dropped.

use std::cell::Cell;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kv_core::auth::ClusterSecret;
use kv_core::{Error, Result};
use parking_lot::Mutex;

use crate::frame::{self, Budget, Session, ERR, GET, META, OK, PUT};

/// Connections still in their handshake held at once; a new one evicts the oldest.
pub(crate) const MAX_PENDING: usize = 32;
/// Connections from one source address still in their handshake.
pub(crate) const MAX_PENDING_PER_SOURCE: usize = 8;
/// Authenticated requests served at once; more are answered `ERR` (busy).
pub(crate) const MAX_ADMITTED: usize = 64;
/// Payload bytes received at once over all connections (two largest metadata messages).
pub(crate) const MAX_BUFFERED: usize = 2 * kv_core::codec::MAX_METADATA_BYTES;
/// Longest handshake (capped further by the channel timeout).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);

thread_local! {
    /// Set on the channel's own threads: dropping the agent there must not join them.
    static CHANNEL_THREAD: Cell<bool> = const { Cell::new(false) };
}

/// What the side channel serves: this agent's metadata, and loading what a peer
/// pushes. The agent implements it; the channel holds it weakly.
pub(crate) trait Service: Send + Sync + 'static {
    /// This agent's full metadata (answers `GET`).
    fn metadata(&self) -> Result<Bytes>;
    /// Loads metadata a peer pushed (`PUT`); `from` is the name it authenticated as.
    fn load(self: &Arc<Self>, meta: &[u8], from: Option<&str>) -> Result<()>;
}

/// How the side channel authenticates and bounds its connections.
#[derive(Clone)]
pub(crate) struct Config {
    /// This agent's name (proven to servers we connect to).
    pub(crate) agent: String,
    /// The cluster secret; `None` only in the explicit unauthenticated mode.
    pub(crate) secret: Option<ClusterSecret>,
    /// Deadline of one request (and of a client's whole exchange).
    pub(crate) timeout: Duration,
}

struct Listener {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Listener {
    fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
        if let Some(t) = self.thread.take() {
            if !CHANNEL_THREAD.with(Cell::get) {
                let _ = t.join();
            }
        }
    }
}

/// Side-channel state of an agent.
#[derive(Default)]
pub(crate) struct ChannelState {
    listener: Mutex<Option<Listener>>,
    /// Where `publish` pushes: addresses we fetched from or were told about.
    known: Mutex<Vec<SocketAddr>>,
}

impl Drop for ChannelState {
    fn drop(&mut self) {
        if let Some(l) = self.listener.get_mut().take() {
            l.stop();
        }
    }
}

/// One accepted connection, as the accept loop tracks it.
struct Conn {
    id: u64,
    source: IpAddr,
    /// A handle on the socket to cut it off (eviction, shutdown); dropped when its
    /// thread is done so the socket really closes.
    socket: Option<TcpStream>,
    /// Past its handshake: counted against `MAX_ADMITTED`, never evicted.
    admitted: bool,
    evicted: bool,
    thread: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct Table {
    conns: Vec<Conn>,
    next: u64,
}

impl Table {
    /// Joins the threads that finished and forgets their connections.
    fn reap(&mut self) {
        self.conns.retain_mut(|c| {
            let done = c.thread.as_ref().is_none_or(|t| t.is_finished());
            if done {
                if let Some(t) = c.thread.take() {
                    let _ = t.join();
                }
            }
            !done
        });
    }

    /// Makes room for one more pending connection from `source` by cutting off the
    /// oldest pending one (of that source first).
    fn make_room(&mut self, source: IpAddr) {
        let pending = |c: &&mut Conn| !c.admitted && !c.evicted;
        let from_source = self
            .conns
            .iter_mut()
            .filter(pending)
            .filter(|c| c.source == source)
            .count();
        let total = self.conns.iter_mut().filter(pending).count();
        let victim = if from_source >= MAX_PENDING_PER_SOURCE {
            self.conns
                .iter_mut()
                .find(|c| !c.admitted && !c.evicted && c.source == source)
        } else if total >= MAX_PENDING {
            self.conns.iter_mut().find(|c| !c.admitted && !c.evicted)
        } else {
            None
        };
        if let Some(c) = victim {
            tracing::debug!(source = %c.source, "side channel: evicting the oldest connection still in its handshake");
            c.evicted = true;
            if let Some(s) = &c.socket {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
    }

    /// Marks connection `id` admitted if fewer than `MAX_ADMITTED` are.
    fn admit(&mut self, id: u64) -> bool {
        let admitted = self.conns.iter().filter(|c| c.admitted).count();
        match self.conns.iter_mut().find(|c| c.id == id) {
            Some(c) if !c.evicted && admitted < MAX_ADMITTED => {
                c.admitted = true;
                true
            }
            _ => false,
        }
    }

    /// Forgets the socket of connection `id` (its thread is done with it) and stops
    /// counting it.
    fn closed(&mut self, id: u64) {
        if let Some(c) = self.conns.iter_mut().find(|c| c.id == id) {
            c.socket = None;
            (c.admitted, c.evicted) = (false, true);
        }
    }
}

/// Cuts every connection off and joins its thread (without the table's lock: a
/// finishing thread takes it).
fn shutdown_all(table: &Mutex<Table>) {
    let conns = std::mem::take(&mut table.lock().conns);
    for c in &conns {
        if let Some(s) = &c.socket {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
    for mut c in conns {
        if let Some(t) = c.thread.take() {
            let _ = t.join();
        }
    }
}

/// What every connection thread of one listener shares.
struct Server<S> {
    service: Weak<S>,
    config: Config,
    table: Mutex<Table>,
    budget: Budget,
}

impl<S: Service> Server<S> {
    fn serve(&self, id: u64, s: &mut TcpStream) -> Result<()> {
        let timeout = self.config.timeout;
        s.set_write_timeout(Some(timeout))
            .map_err(|e| Error::io("set timeout", e))?;
        let start = Instant::now();
        let hs_deadline = start + timeout.min(HANDSHAKE_TIMEOUT);
        let (mut session, from) = frame::accept(s, self.config.secret.as_ref(), hs_deadline)?;
        // Authenticated peers are admitted before their request is read (so a slow
        // PUT is never evicted); without a secret, only once it is read.
        if session.authenticated() && !self.table.lock().admit(id) {
            return session.send(s, ERR, b"side channel busy; retry");
        }
        let req_deadline = if session.authenticated() {
            Instant::now() + timeout
        } else {
            hs_deadline
        };
        let (op, payload) = match session.recv(s, req_deadline, Some(&self.budget)) {
            Err(Error::Busy(m)) => return session.send(s, ERR, m.as_bytes()),
            r => r?,
        };
        if !session.authenticated() && !self.table.lock().admit(id) {
            return session.send(s, ERR, b"side channel busy; retry");
        }
        let Some(service) = self.service.upgrade() else {
            return Ok(());
        };
        match op {
            GET => {
                let meta = service.metadata();
                drop(service);
                session.send(s, META, &meta?)
            }
            PUT => {
                let loaded = Service::load(&service, &payload, from.as_deref());
                drop(service);
                match loaded {
                    Ok(()) => session.send(s, OK, &[]),
                    Err(e) => session.send(s, ERR, e.to_string().as_bytes()),
                }
            }
            other => Err(Error::invalid_metadata(format!(
                "unexpected side-channel request {other:#x}"
            ))),
        }
    }

    fn accept_loop(self: Arc<Self>, listener: TcpListener, stop: Arc<AtomicBool>) {
        CHANNEL_THREAD.with(|c| c.set(true));
        for conn in listener.incoming() {
            if stop.load(Ordering::Acquire) || self.service.strong_count() == 0 {
                break;
            }
            let Ok(conn) = conn else { continue };
            let (Ok(peer), Ok(socket)) = (conn.peer_addr(), conn.try_clone()) else {
                continue;
            };
            let mut table = self.table.lock();
            table.reap();
            table.make_room(peer.ip());
            let id = table.next;
            table.next += 1;
            let server = self.clone();
            let mut conn = conn;
            let spawned = std::thread::Builder::new()
                .name("kv-agent-channel-conn".into())
                .spawn(move || {
                    CHANNEL_THREAD.with(|c| c.set(true));
                    if let Err(e) = server.serve(id, &mut conn) {
                        tracing::debug!(error = %e, "side-channel request failed");
                    }
                    // Close it for real (the accept loop holds a clone): unread bytes
                    // make the kernel reset the connection, so a sender stops at once.
                    server.table.lock().closed(id);
                    drop(conn);
                });
            match spawned {
                Ok(t) => table.conns.push(Conn {
                    id,
                    source: peer.ip(),
                    socket: Some(socket),
                    admitted: false,
                    evicted: false,
                    thread: Some(t),
                }),
                Err(e) => tracing::warn!(error = %e, "side channel: cannot start a thread"),
            }
        }
        shutdown_all(&self.table);
    }
}

fn connect(addr: SocketAddr, timeout: Duration) -> Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| Error::RemoteDisconnected {
        peer: addr.to_string(),
        reason: format!("side channel connect: {e}"),
    })?;
    s.set_write_timeout(Some(timeout))
        .map_err(|e| Error::io("set timeout", e))?;
    let _ = s.set_nodelay(true);
    Ok(s)
}

/// The first address `addr` resolves to.
pub(crate) fn resolve(addr: impl ToSocketAddrs) -> Result<SocketAddr> {
    addr.to_socket_addrs()
        .map_err(|e| Error::io("resolving side-channel address", e))?
        .next()
        .ok_or_else(|| Error::invalid_argument("address resolves to nothing"))
}

impl ChannelState {
    /// Serves `service` on `addr` from a background thread until the service is
    /// dropped or another `listen` replaces it; returns the bound address.
    pub(crate) fn listen<S: Service>(
        &self,
        addr: SocketAddr,
        config: Config,
        service: Weak<S>,
    ) -> Result<SocketAddr> {
        let listener =
            TcpListener::bind(addr).map_err(|e| Error::io("binding the side channel", e))?;
        let local = listener
            .local_addr()
            .map_err(|e| Error::io("side channel address", e))?;
        let stop = Arc::new(AtomicBool::new(false));
        let name = format!("kv-agent-channel-{}", config.agent);
        let server = Arc::new(Server {
            service,
            config,
            table: Mutex::new(Table::default()),
            budget: Budget::new(MAX_BUFFERED),
        });
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || server.accept_loop(listener, flag))
            .map_err(|e| Error::io("starting the side-channel thread", e))?;
        let new = Listener {
            addr: local,
            stop,
            thread: Some(thread),
        };
        let old = self.listener.lock().replace(new);
        if let Some(old) = old {
            old.stop();
        }
        Ok(local)
    }

    /// Opens an authenticated session with the side channel at `addr`.
    fn open(&self, addr: SocketAddr, config: &Config) -> Result<(TcpStream, Session, Instant)> {
        let deadline = Instant::now() + config.timeout;
        let mut s = connect(addr, config.timeout)?;
        let session = frame::connect(&mut s, &config.agent, config.secret.as_ref(), deadline)
            .map_err(|e| match e {
                Error::Unauthenticated(m) => Error::Unauthenticated(format!("{addr}: {m}")),
                e => e,
            })?;
        Ok((s, session, deadline))
    }

    /// Fetches a peer's metadata from its side channel at `addr` and hands it to
    /// `load`; once loaded, remembers the address for [`ChannelState::known`].
    pub(crate) fn fetch<T>(
        &self,
        addr: SocketAddr,
        config: &Config,
        load: impl FnOnce(&[u8]) -> Result<T>,
    ) -> Result<T> {
        let (mut s, mut session, deadline) = self.open(addr, config)?;
        session.send(&mut s, GET, &[])?;
        let (op, payload) = session.recv(&mut s, deadline, None)?;
        match op {
            META => {}
            ERR => return Err(answered_err(&payload)),
            op => {
                return Err(Error::invalid_metadata(format!(
                    "side channel answered op {op:#x} to GET"
                )))
            }
        }
        let loaded = load(&payload)?;
        self.remember(addr);
        Ok(loaded)
    }

    /// Pushes `meta` to the side channel at `addr`; once accepted, remembers the
    /// address for [`ChannelState::known`].
    pub(crate) fn push(&self, addr: SocketAddr, config: &Config, meta: &[u8]) -> Result<()> {
        let (mut s, mut session, deadline) = self.open(addr, config)?;
        session.send(&mut s, PUT, meta)?;
        let (op, payload) = session.recv(&mut s, deadline, None)?;
        match op {
            OK => {
                self.remember(addr);
                Ok(())
            }
            ERR => Err(answered_err(&payload)),
            other => Err(Error::invalid_metadata(format!(
                "side channel answered op {other:#x} to PUT"
            ))),
        }
    }

    fn remember(&self, addr: SocketAddr) {
        let mut known = self.known.lock();
        if !known.contains(&addr) {
            known.push(addr);
        }
    }

    /// Side channels this agent fetched from or published to.
    pub(crate) fn known(&self) -> Vec<SocketAddr> {
        self.known.lock().clone()
    }
}

fn answered_err(payload: &[u8]) -> Error {
    Error::Backend {
        name: "side-channel".into(),
        code: 0,
        message: String::from_utf8_lossy(payload).into_owned(),
    }
}

#[cfg(test)]
mod tests;
