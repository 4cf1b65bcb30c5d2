//! UCX's callbacks: the active-message handlers (operations and answers are served in
//! [`crate::serve`]; notifications and the authentication handshake here) and the
//! endpoint error handler, installed on the worker with the [`Shared`] as their `arg`.
//!
//! The callbacks run inside UCX calls the core makes with its state lock held (the
//! worker is `UCS_THREAD_MODE_SERIALIZED`), so they never take that lock; every body
//! runs under [`ffi_guard`] so nothing unwinds into UCX.

use std::ffi::c_void;

use bytes::Bytes;
use kv_core::auth::{ClientHandshake, ClientHello, ServerHandshake, ServerHello, ServerProof};
use kv_core::Result;

use crate::ffi::{self, ucs_status_t};
use crate::send::{send, Payload};
use crate::serve::{self, am_callback, shared_of, Msg, AM_ANSWER_ID, AM_OP_ID};
use crate::session::{random_id, Client, Keyed, PURPOSE};
use crate::shared::{ffi_guard, Shared};
use crate::wire::{AuthKind, AuthMsg, NoteHeader};

/// Active-message id of notifications.
pub const AM_NOTE_ID: u32 = 0x4b56;
/// Active-message id of the authentication handshake.
pub const AM_AUTH_ID: u32 = 0x4b59;

/// Installs the active-message handlers on `shared`'s worker with `shared` as their
/// `arg`: `shared` must stay at its address (boxed) and outlive the worker.
pub fn install(shared: &Shared) -> Result<()> {
    let (lib, worker) = (&shared.lib, shared.worker);
    let handlers: [(u32, ffi::ucp_am_recv_callback_t); 4] = [
        (AM_NOTE_ID, on_note),
        (AM_OP_ID, serve::on_op),
        (AM_ANSWER_ID, serve::on_answer),
        (AM_AUTH_ID, on_auth),
    ];
    for (id, cb) in handlers {
        let hp = ffi::ucp_am_handler_param_t {
            field_mask: ffi::UCP_AM_HANDLER_PARAM_FIELD_ID
                | ffi::UCP_AM_HANDLER_PARAM_FIELD_FLAGS
                | ffi::UCP_AM_HANDLER_PARAM_FIELD_CB
                | ffi::UCP_AM_HANDLER_PARAM_FIELD_ARG,
            id,
            flags: ffi::UCP_AM_FLAG_WHOLE_MSG,
            cb: Some(cb),
            arg: shared as *const Shared as *mut c_void,
        };
        // SAFETY: valid worker and params; `arg` outlives the worker (the caller's
        // contract).
        lib.check("ucp_worker_set_am_recv_handler", unsafe {
            (lib.worker_set_am_recv_handler)(worker, &hp)
        })?;
    }
    Ok(())
}

/// The error handler for endpoints of `shared`'s worker ([`on_ep_error`] with
/// `shared`, which outlives the worker, as its `arg`).
pub fn err_handler(shared: &Shared) -> ffi::ucp_err_handler_t {
    ffi::ucp_err_handler_t {
        cb: Some(on_ep_error),
        arg: shared as *const Shared as *mut c_void,
    }
}

/// `ucp_err_handler_cb_t`: an endpoint failed (peer died, connection reset, timeout).
///
/// # Safety
/// Called only by UCX, as the error handler [`err_handler`] installed: `arg` is the
/// `Shared` of the core that owns the worker (it outlives the worker, so every endpoint
/// and every call of this handler) or null; `ep` is only compared, never dereferenced.
unsafe extern "C" fn on_ep_error(arg: *mut c_void, ep: ffi::ucp_ep_h, status: ucs_status_t) {
    ffi_guard((), || {
        // SAFETY: `arg` is the `Shared` of the core that owns the worker.
        if let Some(shared) = unsafe { shared_of(arg) } {
            shared.ep_failed(ep as usize, status);
        }
    })
}

am_callback! {
    /// `ucp_am_recv_callback_t` for [`AM_NOTE_ID`]: a notification arrived. It is
    /// delivered (in order per sender) only when it is eager, within
    /// `max_notification`, and — with a cluster secret — tagged under a session this
    /// backend created; its sender is the name that session proved.
    fn on_note(|shared, m| {
        if let Err(why) = take_note(shared, &m) {
            shared.lock().n.dropped_notes += 1;
            tracing::warn!("ucx: dropped a notification: {why}");
        }
    })
}

fn take_note(shared: &Shared, m: &Msg<'_>) -> std::result::Result<(), String> {
    // Our senders force eager sends, so a rendezvous message is foreign.
    if m.rndv {
        return Err("sent by rendezvous".into());
    }
    if m.length > shared.limits.max_notification {
        return Err(format!(
            "{} bytes; the limit is {} (max_notification)",
            m.length, shared.limits.max_notification
        ));
    }
    let h = NoteHeader::decode(m.header).map_err(|e| e.to_string())?;
    // SAFETY: during the callback.
    let payload = unsafe { m.eager() };
    let name = if shared.secret.is_some() {
        let mut s = shared.lock();
        let sess = s
            .server
            .sessions
            .get_mut(&h.session)
            .ok_or("no session of ours")?;
        sess.keyed
            .open(h.seq, m.header, payload)
            .map_err(|e| e.to_string())?;
        if sess.name != h.name {
            return Err(format!(
                "names {:?}, the session proved {:?}",
                h.name, sess.name
            ));
        }
        sess.used = std::time::Instant::now();
        sess.name.clone()
    } else if h.session != 0 {
        return Err("authenticated, and this backend has no cluster secret".into());
    } else {
        h.name
    };
    shared.deliver(
        (h.session, h.instance, h.endpoint),
        h.number,
        name,
        Bytes::copy_from_slice(payload),
    );
    Ok(())
}

/// The client's first step on a new endpoint: asks the peer for a challenge.
pub fn start_client(shared: &Shared, ep: ffi::ucp_ep_h, ep_id: u64) {
    shared.set_client(ep_id, Client::Waiting(None));
    let hello = AuthMsg {
        kind: AuthKind::Hello,
        instance: shared.instance,
        endpoint: ep_id,
        handshake: 0,
        session: 0,
        body: Vec::new(),
    };
    if !send_auth(shared, ep, hello) {
        shared.set_client(ep_id, Client::Failed("could not send the handshake".into()));
    }
}

fn send_auth(shared: &Shared, ep: ffi::ucp_ep_h, m: AuthMsg) -> bool {
    send(
        shared,
        ep,
        AM_AUTH_ID,
        &m.encode(),
        Payload::None,
        ffi::UCP_AM_SEND_FLAG_EAGER | ffi::UCP_AM_SEND_FLAG_REPLY,
    )
}

am_callback! {
    /// `ucp_am_recv_callback_t` for [`AM_AUTH_ID`]: a step of the handshake.
    fn on_auth(|shared, m| {
        match AuthMsg::decode(m.header) {
            Ok(a) => step(shared, m.reply_ep, a),
            Err(_) => shared.lock().n.malformed += 1,
        }
    })
}

/// One handshake step: the server side answers `Hello` and `Response`, the client
/// side `Challenge`, `Proof` and `Refuse`.
fn step(shared: &Shared, reply_ep: ffi::ucp_ep_h, a: AuthMsg) {
    let reply = |kind, handshake, session, body| AuthMsg {
        kind,
        instance: a.instance,
        endpoint: a.endpoint,
        handshake,
        session,
        body,
    };
    match a.kind {
        AuthKind::Hello => {
            let out = match server_hello(shared) {
                Some((id, hello)) => reply(AuthKind::Challenge, id, 0, hello.encode().to_vec()),
                None => reply(AuthKind::Refuse, 0, 0, Vec::new()),
            };
            send_auth(shared, reply_ep, out);
        }
        AuthKind::Response => {
            let out = match server_finish(shared, &a) {
                Some((session, proof)) => reply(
                    AuthKind::Proof,
                    a.handshake,
                    session,
                    proof.encode().to_vec(),
                ),
                None => {
                    shared.lock().n.refused += 1;
                    tracing::warn!("ucx: a peer failed authentication (another cluster secret?)");
                    reply(AuthKind::Refuse, a.handshake, 0, Vec::new())
                }
            };
            send_auth(shared, reply_ep, out);
        }
        AuthKind::Challenge if a.instance == shared.instance => {
            if let Some(answer) = client_respond(shared, &a) {
                send_auth(
                    shared,
                    reply_ep,
                    reply(AuthKind::Response, a.handshake, 0, answer.encode().to_vec()),
                );
            }
        }
        AuthKind::Proof if a.instance == shared.instance => client_finish(shared, &a),
        AuthKind::Refuse if a.instance == shared.instance => {
            let mut s = shared.lock();
            if let Some(c @ Client::Waiting(_)) = s.clients.get_mut(&a.endpoint) {
                *c = Client::Failed(
                    "the peer refused authentication; both sides must use the same cluster \
                     secret (KVX_SECRET)"
                        .into(),
                );
            }
        }
        _ => shared.lock().n.malformed += 1,
    }
}

/// Server: a fresh challenge, kept under a random id (`None`: no secret, or no
/// randomness).
fn server_hello(shared: &Shared) -> Option<(u64, ServerHello)> {
    let secret = shared.secret.as_ref()?;
    let (hs, hello) = ServerHandshake::start(secret, PURPOSE).ok()?;
    let id = random_id().ok()?;
    shared.lock().server.add_handshake(id, hs);
    Some((id, hello))
}

/// Server: checks the client's answer; a new session and the proof, or `None`.
fn server_finish(shared: &Shared, a: &AuthMsg) -> Option<(u64, ServerProof)> {
    let hs = shared.lock().server.handshakes.remove(&a.handshake)?.0;
    let hello = ClientHello::decode(&a.body).ok()?;
    let (proof, peer) = hs.finish(&hello).ok()?;
    let session = random_id().ok()?;
    shared
        .lock()
        .server
        .add_session(session, peer.name, peer.key);
    Some((session, proof))
}

/// Client: answers the server's challenge on an endpoint waiting for one.
fn client_respond(shared: &Shared, a: &AuthMsg) -> Option<ClientHello> {
    let secret = shared.secret.as_ref()?;
    let mut s = shared.lock();
    let c = s.clients.get_mut(&a.endpoint)?;
    if !matches!(c, Client::Waiting(None)) {
        return None;
    }
    let answered = ServerHello::decode(&a.body)
        .and_then(|h| ClientHandshake::respond(secret, PURPOSE, &shared.name, &h));
    match answered {
        Ok((hs, answer)) => {
            *c = Client::Waiting(Some(hs));
            Some(answer)
        }
        Err(e) => {
            *c = Client::Failed(format!("authentication failed: {e}"));
            None
        }
    }
}

/// Client: checks the server's proof; the endpoint is then ready (or failed).
fn client_finish(shared: &Shared, a: &AuthMsg) {
    let mut s = shared.lock();
    let Some(c) = s.clients.get_mut(&a.endpoint) else {
        return;
    };
    let Client::Waiting(hs) = c else {
        return;
    };
    let Some(hs) = hs.take() else {
        *c = Client::Failed("authentication: proof before challenge".into());
        return;
    };
    *c = match ServerProof::decode(&a.body).and_then(|p| hs.finish(&p)) {
        Ok(key) => Client::Ready {
            session: a.session,
            keyed: Keyed::new(key),
        },
        Err(_) => Client::Failed(
            "the peer could not prove the cluster secret; both sides must use the same \
             cluster secret (KVX_SECRET)"
                .into(),
        ),
    };
}
