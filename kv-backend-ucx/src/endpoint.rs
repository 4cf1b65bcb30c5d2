//! Connected peers: the UCP endpoint (created with peer error handling where the
//! transports allow it, force-closed to stop transfers), whether the peer is still
//! there, and the ordered queue of notifications waiting to go out after their data.
//! A disconnected endpoint stays as a tombstone, so later uses of its id say
//! `RemoteDisconnected`.

use std::collections::VecDeque;
use std::ffi::c_void;
use std::sync::Arc;

use bytes::Bytes;
use kv_core::{Error, Result};

use crate::am::{err_handler, AM_NOTE_ID};
use crate::config::TCP_DEFAULTS;
use crate::ffi::{self, ucp_ep_h, ucs_status_t, Lib};
use crate::ids::{is_live, own_pid, IdMap};
use crate::mapping::{every_lane, lanes_on_host};
use crate::request::{Group, NoteState, Transfer};
use crate::session::Readiness;
use crate::shared::Shared;
use crate::wire::{ConnInfo, NoteHeader};

/// What must finish before a queued notification may be sent.
pub enum Gate {
    /// The data of post number `post` of transfer `transfer`.
    Transfer {
        /// The transfer.
        transfer: u64,
        /// Which post of it (a released-and-reposted transfer does not open the gate).
        post: u64,
    },
    /// Every post that was in flight on the endpoint when `notify` was called.
    Posts(Vec<(u64, u64)>),
}

/// A notification on its way to the peer.
pub struct Note {
    /// What it waits for.
    pub gate: Gate,
    /// Its number on this endpoint (the receiver reorders by it).
    pub number: u64,
    /// Payload.
    pub payload: Bytes,
    /// The active-message send (it keeps header and payload alive), once issued.
    pub sent: Option<Group>,
}

/// One connected peer.
pub struct Endpoint {
    /// The UCP endpoint (null once closed).
    pub ep: ucp_ep_h,
    /// The name the caller gave the peer.
    pub peer_name: String,
    /// What the peer published.
    pub info: ConnInfo,
    /// Created with `UCP_ERR_HANDLING_MODE_PEER` (else `NONE`: the transports cannot
    /// detect a dead peer and only deadlines bound a transfer).
    pub peer_errors: bool,
    /// Every lane UCX chose is TCP.
    pub tcp_only: bool,
    /// Every lane is a same-host transport (shared memory): posts from `alloc_host`
    /// memory go as mapped operations.
    pub on_host: bool,
    /// Segments of at least this many bytes go alone, by rendezvous.
    pub rndv_min: u64,
    /// Why the endpoint can no longer be used, once it cannot.
    pub dead: Option<String>,
    /// `disconnect` was called: the id stays only to say so.
    pub gone: bool,
    /// Number of the next notification.
    pub next_note: u64,
    /// Notifications in send order.
    pub notes: VecDeque<Note>,
    /// A close in flush mode still running (freed once complete).
    pub closing: Option<*mut c_void>,
}

impl Endpoint {
    /// `RemoteDisconnected` for this peer with `reason`.
    pub fn disconnected(&self, reason: impl Into<String>) -> Error {
        Error::RemoteDisconnected {
            peer: self.peer_name.clone(),
            reason: reason.into(),
        }
    }

    /// An endpoint of `shared`'s worker to the peer that published `info`, with peer
    /// error handling unless `shm_only` transports refuse it. Segments of at least
    /// `rndv_min` bytes (`None`: 512 KiB over TCP-only lanes, else 64 KiB) go alone, by
    /// rendezvous. Called under the state lock.
    pub fn open(
        shared: &Shared,
        peer_name: &str,
        info: ConnInfo,
        shm_only: bool,
        rndv_min: Option<u64>,
    ) -> Result<Endpoint> {
        let (lib, worker) = (&shared.lib, shared.worker);
        let create = |mode: std::ffi::c_uint| {
            let params = ffi::ucp_ep_params_t {
                field_mask: ffi::UCP_EP_PARAM_FIELD_REMOTE_ADDRESS
                    | ffi::UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE
                    | ffi::UCP_EP_PARAM_FIELD_ERR_HANDLER,
                address: info.worker_address.as_ptr() as *const c_void,
                err_mode: mode,
                err_handler: err_handler(shared),
                user_data: std::ptr::null_mut(),
                flags: 0,
                sockaddr: ffi::ucs_sock_addr_t {
                    addr: std::ptr::null(),
                    addrlen: 0,
                },
                conn_request: std::ptr::null_mut(),
                name: std::ptr::null(),
                local_sockaddr: ffi::ucs_sock_addr_t {
                    addr: std::ptr::null(),
                    addrlen: 0,
                },
            };
            let mut ep: ffi::ucp_ep_h = std::ptr::null_mut();
            // SAFETY: valid worker, params (the address bytes passed our envelope checks
            // and live through the call) and out-pointer; under the state lock.
            let s = unsafe { (lib.ep_create)(worker, &params, &mut ep) };
            (s, ep)
        };
        // Peer error handling first; UCX 1.13's shared-memory transports have no peer
        // failure detection and refuse it (UCS_ERR_UNREACHABLE), so those endpoints fall
        // back to no error handling, the deadline and the in-process liveness check.
        let (mut s, mut ep, mut peer_errors) = if shm_only {
            (ffi::UCS_ERR_UNREACHABLE, std::ptr::null_mut(), false)
        } else {
            let (s, ep) = create(ffi::UCP_ERR_HANDLING_MODE_PEER);
            (s, ep, true)
        };
        if s == ffi::UCS_ERR_UNREACHABLE {
            (s, ep) = create(ffi::UCP_ERR_HANDLING_MODE_NONE);
            peer_errors = false;
            tracing::debug!("ucx: transports without peer failure detection; deadlines only");
        }
        if s != ffi::UCS_OK {
            return Err(if ffi::is_disconnect_status(s) {
                Error::RemoteDisconnected {
                    peer: peer_name.to_owned(),
                    reason: lib.status_text(s),
                }
            } else {
                lib.error("ucp_ep_create", s)
            });
        }
        // SAFETY: the endpoint created above and an open FILE stream, under the lock.
        let lanes = ffi::capture_file(|f| unsafe { (lib.ep_print_info)(ep, f) });
        let tcp_only = lanes.as_deref().is_some_and(all_lanes_tcp);
        let on_host = lanes.as_deref().is_some_and(lanes_on_host);
        let default_min = if tcp_only { 512 << 10 } else { 64 << 10 };
        Ok(Endpoint {
            ep,
            peer_name: peer_name.to_owned(),
            info,
            peer_errors,
            tcp_only,
            on_host,
            rndv_min: rndv_min.unwrap_or(default_min).max(1),
            dead: None,
            gone: false,
            next_note: 0,
            notes: VecDeque::new(),
            closing: None,
        })
    }

    /// Refuses to use the endpoint once it is dead.
    #[inline]
    pub fn usable(&self) -> Result<()> {
        if let Some(why) = &self.dead {
            return Err(self.disconnected(why.clone()));
        }
        Ok(())
    }

    /// As [`Endpoint::usable`], noticing first a peer backend of this process that was
    /// dropped (before a post or a notification).
    #[inline]
    pub fn usable_now(&mut self) -> Result<()> {
        if self.dead.is_none() {
            if let Some(why) = peer_gone(&self.info) {
                self.dead = Some(why);
            }
        }
        self.usable()
    }

    /// Closes the endpoint: forced (UCX completes its outstanding requests with
    /// `UCS_ERR_CANCELED`) with peer error handling, else in flush mode (UCX requires
    /// peer error handling on both sides for a forced close; the requests then complete
    /// only if the peer progresses, and the close request is kept in `closing`).
    /// Unsent notifications are dropped. Called under the state lock.
    pub fn close(&mut self, lib: &Lib, reason: &str) {
        if self.dead.is_none() {
            self.dead = Some(reason.to_owned());
        }
        if self.ep.is_null() {
            return;
        }
        let mut p = ffi::ucp_request_param_t::empty();
        if self.peer_errors {
            p.op_attr_mask = ffi::UCP_OP_ATTR_FIELD_FLAGS;
            p.flags = ffi::UCP_EP_CLOSE_FLAG_FORCE;
        }
        // SAFETY: a live endpoint of this worker, closed once (set to null below).
        let r = unsafe { (lib.ep_close_nbx)(self.ep, &p) };
        self.ep = std::ptr::null_mut();
        self.notes.retain(|n| n.sent.is_some());
        if ffi::ptr_is_request(r) {
            self.closing = Some(r);
        }
    }

    /// Frees the close request once UCX completed it; true when none is left.
    pub fn reap_close(&mut self, lib: &Lib) -> bool {
        let Some(r) = self.closing else {
            return true;
        };
        // SAFETY: `r` is a live request of this worker until freed below.
        if unsafe { (lib.request_check_status)(r) } == ffi::UCS_INPROGRESS {
            return false;
        }
        // SAFETY: freeing the completed close request once.
        unsafe { (lib.request_free)(r) };
        self.closing = None;
        true
    }

    /// Queues a notification with `payload` behind `gate`, taking the next number.
    #[inline]
    pub fn queue_note(&mut self, gate: Gate, payload: Bytes) {
        self.notes.push_back(Note {
            gate,
            number: self.next_note,
            payload,
            sent: None,
        });
        self.next_note += 1;
    }

    /// Drops the unsent notification of post `post` of transfer `tid` (it was aborted).
    pub fn drop_unsent(&mut self, tid: u64, post: u64) {
        self.notes.retain(|n| {
            n.sent.is_some()
                || !matches!(n.gate, Gate::Transfer { transfer, post: p } if transfer == tid && p == post)
        });
    }

    /// Sends, in order, each queued notification whose data is complete (dropping
    /// those whose data failed, or all when the endpoint is dead or failed to
    /// authenticate), and lets completed sends leave the queue, recording the outcome in
    /// their transfer's flight. Returns how many state changes happened.
    pub fn advance_notes(
        &mut self,
        id: u64,
        shared: &Shared,
        lib: &Arc<Lib>,
        transfers: &mut IdMap<Transfer>,
    ) -> usize {
        if self.notes.is_empty() {
            return 0; // the common case: nothing queued, no lock taken
        }
        let mut events = 0;
        let mut blocked = false;
        let readiness = shared.readiness(id);
        let dead =
            self.dead.is_some() || self.ep.is_null() || matches!(readiness, Readiness::Failed(_));
        let uep = self.ep;
        let mut i = 0;
        while i < self.notes.len() {
            let n = &mut self.notes[i];
            if n.sent.is_none() && !blocked {
                // None: wait; Some(true): send; Some(false): drop.
                let ready = match &n.gate {
                    Gate::Posts(posts) => posts
                        .iter()
                        .all(|(t, p)| {
                            transfers
                                .get(t)
                                .and_then(|t| t.flight.as_ref())
                                .is_none_or(|f| f.post != *p)
                        })
                        .then_some(true),
                    Gate::Transfer { transfer, post } => match transfers.get(transfer) {
                        Some(Transfer {
                            flight: Some(f), ..
                        }) if f.post == *post => f.complete().then_some(f.failure().is_none()),
                        _ => Some(false),
                    },
                };
                let ready = match ready {
                    Some(true) if !dead && readiness == Readiness::Pending => None,
                    r => r,
                };
                match ready {
                    None => blocked = true,
                    Some(false) => {
                        set_note(transfers, &n.gate, NoteState::Failed(ffi::UCS_ERR_CANCELED));
                        self.notes.remove(i);
                        events += 1;
                        continue;
                    }
                    Some(true) if dead => {
                        set_note(
                            transfers,
                            &n.gate,
                            NoteState::Failed(ffi::UCS_ERR_NOT_CONNECTED),
                        );
                        self.notes.remove(i);
                        events += 1;
                        continue;
                    }
                    Some(true) => {
                        let state = match send_note(shared, lib, uep, id, n) {
                            Ok(g) => {
                                n.sent = Some(g);
                                NoteState::Issued
                            }
                            Err(s) => NoteState::Failed(s),
                        };
                        set_note(transfers, &n.gate, state);
                        events += 1;
                        if n.sent.is_none() {
                            self.notes.remove(i);
                            continue;
                        }
                    }
                }
            }
            // Completed sends leave the queue.
            let n = &mut self.notes[i];
            if let Some(g) = &n.sent {
                if g.done() {
                    let state = match g.error() {
                        None => NoteState::Delivered,
                        Some(s) => NoteState::Failed(s),
                    };
                    if let Gate::Transfer { transfer, post } = n.gate {
                        if let Some(f) =
                            transfers.get_mut(&transfer).and_then(|t| t.flight.as_mut())
                        {
                            if f.post == post {
                                f.note = state;
                            }
                        }
                    }
                    self.notes.remove(i);
                    events += 1;
                    continue;
                }
            }
            i += 1;
        }
        events
    }

    /// Appends what `describe()` says about this endpoint (number `id`): the peer,
    /// error handling, and the transports and lanes UCX chose (`ucp_ep_print_info`).
    /// Called under the state lock.
    pub fn describe(&self, id: u64, lib: &Lib, s: &mut String) {
        s.push_str(&format!(
            "endpoint {} -> {} (error handling {})",
            id,
            self.peer_name,
            if self.peer_errors {
                "PEER"
            } else {
                "NONE: deadline only"
            }
        ));
        if let Some(d) = &self.dead {
            s.push_str(&format!(" (dead: {d})\n"));
            return;
        }
        s.push('\n');
        s.push_str(&format!(
            "pieces of >= {} bytes go alone by rendezvous, smaller ones batched{}\n",
            self.rndv_min,
            if self.tcp_only {
                " (all lanes TCP)"
            } else {
                ""
            }
        ));
        let uep = self.ep;
        // SAFETY: live endpoint and an open FILE stream, under the state lock.
        if let Some(text) = ffi::capture_file(|f| unsafe { (lib.ep_print_info)(uep, f) }) {
            s.push_str(&text);
        }
    }
}

/// Sends notification `n` on endpoint `uep` (our id `id`): eager, its header sealed by
/// the endpoint's session together with the payload.
fn send_note(
    shared: &Shared,
    lib: &Arc<Lib>,
    uep: ucp_ep_h,
    id: u64,
    n: &Note,
) -> std::result::Result<Group, ucs_status_t> {
    let header = shared
        .seal_for(id, &n.payload, |session, seq| {
            NoteHeader {
                instance: shared.instance,
                endpoint: id,
                number: n.number,
                session,
                seq,
                name: shared.name.clone(),
            }
            .encode()
        })
        .map_err(|_| ffi::UCS_ERR_NOT_CONNECTED)?;
    let mut g = Group::new(lib);
    let hl = header.len();
    let hp = g.keep(header);
    let pl = n.payload.len();
    let pp = g.keep_bytes(n.payload.clone());
    // SAFETY: live endpoint (not dead, checked by the caller under the lock); header
    // and payload stay alive in the group until its request completes.
    g.issue(ffi::UCP_AM_SEND_FLAG_EAGER, |prm| unsafe {
        (lib.am_send_nbx)(
            uep,
            AM_NOTE_ID,
            hp as *const c_void,
            hl,
            pp as *const c_void,
            pl,
            prm,
        )
    })?;
    Ok(g)
}

/// Sets the notification state of the flight a `Gate::Transfer` names.
fn set_note(transfers: &mut IdMap<Transfer>, gate: &Gate, state: NoteState) {
    if let Gate::Transfer { transfer, .. } = *gate {
        if let Some(f) = transfers.get_mut(&transfer).and_then(|t| t.flight.as_mut()) {
            f.note = state;
        }
    }
}

/// Marks dead the endpoints UCX reported failed (`errors`: endpoint address, status);
/// returns how many it marked.
#[inline]
pub fn mark_failed(
    eps: &mut IdMap<Endpoint>,
    errors: Vec<(usize, ucs_status_t)>,
    lib: &Lib,
) -> usize {
    let mut events = 0;
    for (ptr, status) in errors {
        for ep in eps.values_mut() {
            if !ep.ep.is_null() && ep.ep as usize == ptr && ep.dead.is_none() {
                ep.dead = Some(format!(
                    "the peer is gone or unreachable (UCX: {})",
                    lib.status_text(status)
                ));
                events += 1;
            }
        }
    }
    events
}

/// Refuses a peer whose UCX would send TCP segments larger than ours receives, or
/// receive smaller ones than ours sends: UCX resets such a connection (and a write
/// can report success before the reset). `ours`: our (send, receive) sizes.
pub fn check_segments(ours: (u32, u32), peer_name: &str, peer: &ConnInfo) -> Result<()> {
    let (tx, rx) = ours;
    let fits = |send: u32, recv: u32| send == 0 || recv == 0 || send <= recv;
    if fits(tx, peer.tcp_rx_seg) && fits(peer.tcp_tx_seg, rx) {
        return Ok(());
    }
    Err(Error::invalid_argument(format!(
        "ucx: TCP segment sizes do not match {peer_name}: we send {tx} and receive {rx} \
         bytes, it sends {} and receives {}; every sender's TCP_TX_SEG_SIZE must be at \
         most its receiver's TCP_RX_SEG_SIZE (params ucx.TCP_TX_SEG_SIZE / \
         ucx.TCP_RX_SEG_SIZE; this backend's defaults are {:?})",
        peer.tcp_tx_seg, peer.tcp_rx_seg, TCP_DEFAULTS
    )))
}

/// Whether `ucp_ep_print_info`'s report shows lanes and every one of them is TCP.
fn all_lanes_tcp(report: &str) -> bool {
    every_lane(report, |l| l.contains("tcp/"))
}

/// Whether the backend `instance` of process `pid` is gone: dropped (a backend of this
/// process) or its process exited (`/proc/<pid>` gone; a reused pid only delays this).
pub fn process_gone(pid: u32, instance: u64) -> bool {
    if pid == own_pid() {
        !is_live(instance)
    } else {
        !std::path::Path::new(&format!("/proc/{pid}")).exists()
    }
}

/// `Some(reason)` when the peer is a backend of this process that was dropped.
#[inline]
pub fn peer_gone(info: &ConnInfo) -> Option<String> {
    (info.pid == own_pid() && !is_live(info.instance))
        .then(|| "the peer backend in this process was dropped".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lane_report_detection() {
        let tcp = "#  lane[0]:  0:tcp/lo.0 md[0] -> md[0]/tcp/sysdev[255] am am_bw#0\n";
        let shm = "#  lane[0]:  1:posix/memory.0 md[1] am\n#  lane[1]:  2:cma/memory.0 rma_bw#0\n";
        let mixed = format!("{tcp}#  lane[1]:  2:cma/memory.0 rma_bw#0\n");
        assert!(all_lanes_tcp(tcp));
        assert!(!all_lanes_tcp(shm));
        assert!(!all_lanes_tcp(&mixed));
        assert!(!all_lanes_tcp("no lanes at all"));
    }
}
