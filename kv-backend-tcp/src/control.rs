//! The connection to one peer that is not a lane: the HELLO handshake (which also
//! proves the peer is the instance it published), the control connection (liveness,
//! notifications) and, for a same-host peer, the REVOKE frames it receives.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kv_core::{Error, Result};
use parking_lot::{Mutex, MutexGuard};

use crate::options::Options;
use crate::remote::RemoteHandle;
use crate::sys::{Stream, Watch, TICK};
use crate::wire::{self, ConnectionInfo, FrameOp, Header, HEADER_LEN};

/// What lanes and the control connection of one peer share. `Send + Sync`.
pub(crate) struct PeerCore {
    pub name: String,
    pub info: ConnectionInfo,
    pub addr: SocketAddr,
    pub local_name: String,
    pub opts: Options,
    /// Data moves by cross-memory attach instead of TCP.
    pub cma: bool,
    /// Set by `disconnect` and on backend drop: lanes stop at the next tick.
    pub closed: AtomicBool,
    control: Mutex<Option<Arc<Stream>>>,
    /// This peer's registrations imported here (revoked by REVOKE frames).
    pub imports: Mutex<Vec<Arc<RemoteHandle>>>,
    /// Backend-wide count of finished posts, reported by `progress`.
    pub completions: Arc<AtomicUsize>,
}

impl PeerCore {
    /// The shared state of a peer called `name` at `addr`; no connection yet.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        name: &str,
        info: ConnectionInfo,
        addr: SocketAddr,
        local_name: &str,
        opts: &Options,
        cma: bool,
        completions: Arc<AtomicUsize>,
    ) -> PeerCore {
        PeerCore {
            name: name.to_string(),
            info,
            addr,
            local_name: local_name.to_string(),
            opts: opts.clone(),
            cma,
            closed: AtomicBool::new(false),
            control: Mutex::new(None),
            imports: Mutex::new(Vec::new()),
            completions,
        }
    }

    /// The error of a transfer or handshake with this peer that is gone.
    pub(crate) fn gone(&self, reason: impl Into<String>) -> Error {
        Error::RemoteDisconnected {
            peer: self.name.clone(),
            reason: reason.into(),
        }
    }

    /// Opens a connection and does the HELLO handshake, which also proves that the
    /// listener still belongs to the instance the peer published.
    /// `control` marks the control connection of a same-host peer, on which the
    /// target sends REVOKE frames.
    pub(crate) fn open(&self, control: bool) -> Result<Stream> {
        let s = Stream::connect(&self.addr, self.opts.connect_timeout)
            .map_err(|e| self.gone(format!("connect to {}: {e}", self.addr)))?;
        let h = Header {
            status: if control && self.cma {
                wire::HELLO_SAME_HOST_CONTROL
            } else {
                0
            },
            key: self.info.instance,
            addr: u64::from(std::process::id()),
            len: self.local_name.len() as u64,
            ..Header::new(FrameOp::Hello)
        };
        let mut w = Watch::new(&self.name, self.opts.connect_timeout);
        w.shutdown = Some(&self.closed);
        s.send_bytes(
            &[&wire::encode_header(&h), self.local_name.as_bytes()],
            &mut w,
        )?;
        let mut buf = [0u8; HEADER_LEN];
        s.recv_exact(&mut buf, &mut w)?;
        let r = wire::decode_header(&buf)?;
        match r.op {
            FrameOp::HelloAck if r.key == self.info.instance => Ok(s),
            FrameOp::Error => {
                let msg = read_message(&s, &r, &mut w)?;
                Err(self.gone(format!("handshake refused: {msg}")))
            }
            _ => Err(self.gone(
                "handshake answered by another instance (the peer restarted; re-fetch its metadata)",
            )),
        }
    }

    /// Opens the control connection (at connect).
    pub(crate) fn open_control(&self) -> Result<()> {
        *self.control.lock() = Some(Arc::new(self.open(true)?));
        Ok(())
    }

    /// Shuts the control connection down (at close).
    pub(crate) fn close_control(&self) {
        if let Some(s) = self.control.lock().take() {
            s.shutdown();
        }
    }

    /// True when the control connection is up (reopening it if it broke).
    pub(crate) fn check_alive(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(self.gone("disconnected"));
        }
        let mut c = self.control.lock();
        if c.as_ref().is_some_and(|s| s.peer_closed()) {
            self.lost_control(&mut c);
        }
        if c.is_none() {
            *c = Some(Arc::new(self.open(true)?));
        }
        Ok(())
    }

    /// The control connection broke: close it and, for a same-host peer, revoke every
    /// import (a REVOKE may have been missed; its registrations must be imported
    /// again).
    fn lost_control(&self, c: &mut MutexGuard<'_, Option<Arc<Stream>>>) {
        if let Some(s) = c.take() {
            s.shutdown();
        }
        if self.cma {
            for h in self.imports.lock().iter() {
                h.revoke();
            }
        }
    }

    /// True when the control connection was closed by the peer (it exited or dropped
    /// its backend).
    pub(crate) fn peer_gone(&self) -> bool {
        self.control.lock().as_ref().is_none_or(|s| s.peer_closed())
    }

    /// Sends one notification on the control connection.
    pub(crate) fn send_notify(&self, payload: &[u8]) -> Result<()> {
        let mut c = self.control.lock();
        if c.is_none() {
            *c = Some(Arc::new(self.open(true)?));
        }
        let h = Header {
            len: payload.len() as u64,
            ..Header::new(FrameOp::Notify)
        };
        let mut w = Watch::new(&self.name, self.opts.io_timeout);
        w.shutdown = Some(&self.closed);
        let r = c
            .as_ref()
            .map(|s| s.send_bytes(&[&wire::encode_header(&h), payload], &mut w))
            .unwrap_or_else(|| Err(self.gone("no control connection")));
        if r.is_err() {
            self.lost_control(&mut c);
        }
        r
    }

    /// A REVOKE arrived on `s`: refuse new posts to the registration, wait (up to
    /// `io_timeout`) for the posts copying into it, then acknowledge. Without the
    /// acknowledgement the target's `deregister` returns `Busy` and keeps the memory.
    fn on_revoke(&self, s: &Arc<Stream>, rid: u64, key: u64) {
        let hs: Vec<Arc<RemoteHandle>> = self
            .imports
            .lock()
            .iter()
            .filter(|h| h.key == key)
            .cloned()
            .collect();
        for h in &hs {
            h.revoke();
        }
        let end = Instant::now() + self.opts.io_timeout;
        while hs.iter().any(|h| h.inflight() > 0) {
            if Instant::now() >= end || self.closed.load(Ordering::Acquire) {
                tracing::warn!(
                    "peer {} revoked registration {key:#x} but a transfer still copies into it after {:?}; not acknowledging",
                    self.name,
                    self.opts.io_timeout
                );
                return;
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        let c = self.control.lock();
        if !c.as_ref().is_some_and(|cur| Arc::ptr_eq(cur, s)) {
            return; // that connection is gone; the target stopped waiting for it
        }
        let h = Header {
            id: rid,
            ..Header::new(FrameOp::RevokeAck)
        };
        let mut w = Watch::new(&self.name, self.opts.io_timeout);
        w.shutdown = Some(&self.closed);
        if let Err(e) = s.send_bytes(&[&wire::encode_header(&h)], &mut w) {
            tracing::debug!("acknowledging a revoke to {}: {e}", self.name);
        }
    }
}

/// Reads a same-host peer's control connection: REVOKE frames; anything else closes it.
pub(crate) fn ctl_main(core: Arc<PeerCore>) {
    let mut buf = [0u8; HEADER_LEN];
    while !core.closed.load(Ordering::Acquire) {
        let Some(s) = core.control.lock().clone() else {
            std::thread::sleep(TICK);
            continue;
        };
        let mut w = Watch::new(&core.name, core.opts.io_timeout);
        w.shutdown = Some(&core.closed);
        w.idle_ok = true;
        let r = s
            .recv_exact(&mut buf, &mut w)
            .and_then(|()| wire::decode_header(&buf));
        let e = match r {
            Ok(h) if h.op == FrameOp::Revoke => {
                core.on_revoke(&s, h.id, h.key);
                continue;
            }
            Ok(h) => {
                Error::invalid_metadata(format!("unexpected {:?} frame from the target", h.op))
            }
            Err(e) => e,
        };
        if core.closed.load(Ordering::Acquire) {
            break;
        }
        match e {
            Error::InvalidMetadata(_) => {
                tracing::warn!("closing the control connection to {}: {e}", core.name)
            }
            _ => tracing::debug!("control connection to {} ended: {e}", core.name),
        }
        let mut c = core.control.lock();
        if c.as_ref().is_some_and(|cur| Arc::ptr_eq(cur, &s)) {
            core.lost_control(&mut c);
        }
    }
}

/// Reads the message of an ERROR frame `h`.
pub(crate) fn read_message(s: &Stream, h: &Header, w: &mut Watch<'_>) -> Result<String> {
    let mut msg = vec![0u8; h.len as usize];
    s.recv_exact(&mut msg, w)?;
    Ok(String::from_utf8_lossy(&msg).into_owned())
}
