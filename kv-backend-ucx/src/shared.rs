//! [`Shared`]: what UCX's callbacks touch, behind its own short lock — the
//! registrations peers may name (targets), our operations awaiting answers, the
//! authentication state of every endpoint and session, the bounded notification inbox
//! with its per-sender reordering, and the counters. No UCX call here: the callbacks
//! (`crate::am`, `crate::serve`) and the core read and change this state through the
//! methods below.
//!
//! The callbacks run inside UCX calls the core makes with its state lock held (the
//! worker is `UCS_THREAD_MODE_SERIALIZED`), so they never take that lock, and nothing
//! here is held across a UCX call.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use kv_core::auth::ClusterSecret;
use kv_core::{Access, Descriptor, Error, Notification, Result};
use parking_lot::{Mutex, MutexGuard};

use crate::ffi::{self, ucs_status_t, Lib};
use crate::ids::IdMap;
use crate::mapping::Mappings;
use crate::session::{Client, Readiness, Server};
use crate::wire::AckCode;

/// Most out-of-order notifications held per sender before giving up on a gap.
pub const MAX_HELD: usize = 4096;
/// Most senders whose notification order is tracked (least recently used evicted).
pub const MAX_SENDERS: usize = 1024;

/// Runs a callback body; a panic (a bug; peer input never panics) becomes `default`
/// instead of unwinding into UCX's C frames.
pub fn ffi_guard<R>(default: R, f: impl FnOnce() -> R) -> R {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or(default)
}

/// Caps on what peers can make this backend hold.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest notification payload accepted (larger ones are dropped).
    pub max_notification: usize,
    /// Most notifications waiting in the inbox (and held for reordering).
    pub max_inbox: usize,
    /// Most payload bytes waiting in the inbox (and held for reordering).
    pub max_inbox_bytes: usize,
}

/// A local registration as peers' operations see it.
pub struct Target {
    /// The registered range.
    pub desc: Descriptor,
    /// Whether peers may WRITE it.
    pub access: Access,
    /// Rendezvous receives into it and sends from it still running.
    pub inflight: usize,
    /// Deregistration started: new operations naming it are refused.
    pub revoked: bool,
}

/// Where a READ's data goes: the local pieces, in order, and their total.
pub struct ReadDest {
    /// (address, length) of each local piece.
    pub pieces: Vec<(u64, u64)>,
    /// Sum of the lengths.
    pub total: u64,
}

/// One of our operations awaiting its answer.
pub struct OpEntry {
    /// The endpoint (its session checks the answer).
    pub endpoint: u64,
    /// READ only: where the data goes.
    pub read: Option<ReadDest>,
    /// The data is being received (rendezvous) into the local pieces right now.
    pub receiving: bool,
    /// A mapped operation: until it is answered the target may still copy to or from
    /// our memory through its mapping, so forgetting it does not free that memory.
    pub mapped: bool,
}

/// Per-sender reordering of notifications by number.
#[derive(Default)]
pub struct Reorder {
    /// The number delivered next.
    pub next: u64,
    /// Notifications that arrived early, by number.
    pub held: BTreeMap<u64, Notification>,
    /// When it was last used (eviction order).
    pub touched: u64,
}

/// What the callbacks counted (for `describe()` and tests).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    /// Operations from peers served.
    pub accepted: u64,
    /// Operations from peers refused (unknown key, bounds, access, authentication).
    pub refused: u64,
    /// Answers that could not be sent.
    pub unanswered: u64,
    /// Malformed or unverifiable messages dropped.
    pub malformed: u64,
    /// Of the operations served, those copied through a mapping of the initiator's
    /// memory (mapped operations).
    pub mapped: u64,
    /// Notifications dropped (too large, inbox full, unauthenticated).
    pub dropped_notes: u64,
}

/// Everything behind [`Shared`]'s lock.
#[derive(Default)]
pub struct Inner {
    /// Endpoints UCX reported failed: (endpoint address, status); recorded with
    /// [`Shared::ep_failed`].
    ep_errors: Vec<(usize, ucs_status_t)>,
    /// Answers to our operations: (operation, outcome); recorded with
    /// [`Shared::answered`].
    answers: Vec<(u64, AckCode)>,
    /// Notifications ready to drain, in order.
    pub inbox: VecDeque<Notification>,
    /// Payload bytes in `inbox` and held in `order`.
    pub inbox_bytes: usize,
    /// Notifications held in `order`.
    pub held: usize,
    /// Reordering per sender: (session, instance, endpoint).
    pub order: HashMap<(u64, u64, u64), Reorder>,
    /// Use counter for `order`'s eviction.
    pub tick: u64,
    /// Local registrations by key id (peer-chosen lookups: SipHash).
    pub targets: HashMap<u128, Target>,
    /// Our operations awaiting answers, by operation number.
    pub ops: IdMap<OpEntry>,
    /// Client-side authentication per endpoint id.
    pub clients: IdMap<Client>,
    /// Server-side sessions and handshakes.
    pub server: Server,
    /// Endpoints whose target could not map our memory: their posts copy through
    /// messages from then on.
    pub unmapped: std::collections::HashSet<u64>,
    /// Counters.
    pub n: Counters,
}

/// What the callbacks recorded for the core ([`Shared::take_events`]).
#[derive(Default)]
pub struct Events {
    /// Endpoints UCX reported failed: (endpoint address, status).
    pub ep_errors: Vec<(usize, ucs_status_t)>,
    /// Answers to our operations: (operation, outcome).
    pub answers: Vec<(u64, AckCode)>,
}

/// The callbacks' state for one worker (see the module docs). Kept in a `Box` whose
/// address is the callbacks' `arg`; it outlives the worker.
pub struct Shared {
    inner: Mutex<Inner>,
    /// Set when `Inner`'s answers or endpoint errors got one more entry: the core's
    /// `advance` takes `inner`'s lock for them only then.
    events: AtomicBool,
    /// Peers' memory mapped here for their mapped operations. Its own lock, which (unlike
    /// `inner`'s) is held across the UCX calls that map and unmap; taken only inside
    /// callbacks and at teardown, under the core's state lock, so never contended.
    pub maps: Mutex<Mappings>,
    /// The library.
    pub lib: Arc<Lib>,
    /// The worker (used only inside callbacks, under the core's state lock).
    pub worker: ffi::ucp_worker_h,
    /// Our backend instance.
    pub instance: u64,
    /// Our agent name (what we prove as a client).
    pub name: String,
    /// The cluster secret (`None`: unauthenticated).
    pub secret: Option<ClusterSecret>,
    /// Caps on peer input.
    pub limits: Limits,
}

// SAFETY: `worker` is used only inside UCX's callbacks, which run inside UCX calls made
// with the core's state lock held (UCS_THREAD_MODE_SERIALIZED); the rest is a lock
// around plain data and an `Arc<Lib>` of function pointers.
unsafe impl Send for Shared {}
// SAFETY: as above.
unsafe impl Sync for Shared {}

impl Shared {
    /// The state for `worker` of backend `instance` (agent `name`).
    pub fn new(
        lib: Arc<Lib>,
        worker: ffi::ucp_worker_h,
        instance: u64,
        name: &str,
        secret: Option<ClusterSecret>,
        limits: Limits,
    ) -> Shared {
        Shared {
            inner: Mutex::new(Inner::default()),
            events: AtomicBool::new(false),
            maps: Mutex::new(Mappings::default()),
            lib,
            worker,
            instance,
            name: name.to_owned(),
            secret,
            limits,
        }
    }

    /// The state, locked (never across a UCX call).
    #[inline]
    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock()
    }

    /// Lets peers' operations name registration `key_id`.
    pub fn add_target(&self, key_id: u128, desc: Descriptor, access: Access) {
        self.lock().targets.insert(
            key_id,
            Target {
                desc,
                access,
                inflight: 0,
                revoked: false,
            },
        );
    }

    /// Refuses every new operation naming `key_id`; returns how many rendezvous
    /// transfers into or out of it still run.
    pub fn revoke_target(&self, key_id: u128) -> usize {
        let mut s = self.lock();
        match s.targets.get_mut(&key_id) {
            Some(t) => {
                t.revoked = true;
                t.inflight
            }
            None => 0,
        }
    }

    /// Rendezvous transfers into or out of `key_id` still running.
    pub fn target_inflight(&self, key_id: u128) -> usize {
        self.lock().targets.get(&key_id).map_or(0, |t| t.inflight)
    }

    /// Forgets registration `key_id` (after [`Shared::revoke_target`] found it idle).
    pub fn remove_target(&self, key_id: u128) {
        self.lock().targets.remove(&key_id);
    }

    /// One rendezvous transfer into or out of `key_id` ended.
    pub fn release_target(&self, key_id: u128) {
        if let Some(t) = self.lock().targets.get_mut(&key_id) {
            t.inflight = t.inflight.saturating_sub(1);
        }
    }

    /// Forgets operations `ops` (their answers will be ignored); returns those that may
    /// still touch local memory, kept until they end: (data being received right now,
    /// mapped operations not answered yet).
    pub fn forget_ops(&self, ops: &[u64]) -> (Vec<u64>, Vec<u64>) {
        let mut s = self.lock();
        let (mut receiving, mut mapped) = (Vec::new(), Vec::new());
        for op in ops {
            match s.ops.get(op) {
                Some(e) if e.receiving => receiving.push(*op),
                Some(e) if e.mapped => mapped.push(*op),
                Some(_) => {
                    s.ops.remove(op);
                }
                None => {}
            }
        }
        (receiving, mapped)
    }

    /// Drops operations `ops` outright (mapped operations of a peer that is gone).
    pub fn drop_ops(&self, ops: &[u64]) {
        let mut s = self.lock();
        for op in ops {
            s.ops.remove(op);
        }
    }

    /// Whether any of `ops` is still recorded (a receive into local memory running).
    pub fn ops_pending(&self, ops: &[u64]) -> bool {
        let s = self.lock();
        ops.iter().any(|op| s.ops.contains_key(op))
    }

    /// Sets endpoint `ep`'s client authentication state.
    pub fn set_client(&self, ep: u64, c: Client) {
        self.lock().clients.insert(ep, c);
    }

    /// Forgets endpoint `ep`'s client authentication state.
    pub fn remove_client(&self, ep: u64) {
        self.lock().clients.remove(&ep);
    }

    /// Where endpoint `ep`'s authentication stands.
    pub fn readiness(&self, ep: u64) -> Readiness {
        self.issue_state(ep).0
    }

    /// [`Shared::readiness`] of endpoint `ep`, and whether its peer refused mapped
    /// operations (`unmapped`), under one lock.
    pub fn issue_state(&self, ep: u64) -> (Readiness, bool) {
        let s = self.lock();
        let ready = match s.clients.get(&ep) {
            Some(c) => c.readiness(),
            None => Readiness::Failed("the endpoint is closed".into()),
        };
        (ready, s.unmapped.contains(&ep))
    }

    /// Builds a message for endpoint `ep` with `build(session, seq)` and tags it (its
    /// last `TAG_LEN` bytes) together with `extra` (bytes sent after it that the tag
    /// covers). Unauthenticated endpoints get session 0 and no tag.
    pub fn seal_for(
        &self,
        ep: u64,
        extra: &[u8],
        build: impl FnOnce(u64, u64) -> Result<Vec<u8>>,
    ) -> Result<Vec<u8>> {
        Self::seal_in(&mut self.lock(), ep, extra, build)
    }

    /// [`Shared::seal_for`] of operation `op`'s header, and `op` recorded as awaiting
    /// its answer (`entry`) once sealed, under one lock.
    pub fn seal_op(
        &self,
        ep: u64,
        op: u64,
        entry: OpEntry,
        build: impl FnOnce(u64, u64) -> Result<Vec<u8>>,
    ) -> Result<Vec<u8>> {
        let mut s = self.lock();
        let v = Self::seal_in(&mut s, ep, &[], build)?;
        s.ops.insert(op, entry);
        Ok(v)
    }

    fn seal_in(
        s: &mut Inner,
        ep: u64,
        extra: &[u8],
        build: impl FnOnce(u64, u64) -> Result<Vec<u8>>,
    ) -> Result<Vec<u8>> {
        match s.clients.get_mut(&ep) {
            Some(Client::Open) => build(0, 0),
            Some(Client::Ready { session, keyed }) => {
                let seq = keyed.next_seq();
                let mut v = build(*session, seq)?;
                keyed.seal(seq, &mut v, extra);
                Ok(v)
            }
            Some(Client::Waiting(_)) => Err(Error::Busy("still authenticating".into())),
            Some(Client::Failed(why)) => Err(Error::Unauthenticated(why.clone())),
            None => Err(Error::NotRegistered(format!("EndpointId#{ep}"))),
        }
    }

    /// Records the answer `code` to our operation `op` (in `s`, this `Shared`'s state).
    pub fn answered(&self, s: &mut Inner, op: u64, code: AckCode) {
        s.answers.push((op, code));
        self.events.store(true, Ordering::Release);
    }

    /// Records that UCX reported endpoint `ep` failed with `status`.
    pub fn ep_failed(&self, ep: usize, status: ucs_status_t) {
        self.lock().ep_errors.push((ep, status));
        self.events.store(true, Ordering::Release);
    }

    /// Takes what the callbacks recorded for the core since the last call (no lock
    /// when nothing was).
    #[inline]
    pub fn take_events(&self) -> Events {
        if !self.events.swap(false, Ordering::Acquire) {
            return Events::default();
        }
        let mut s = self.lock();
        Events {
            ep_errors: std::mem::take(&mut s.ep_errors),
            answers: std::mem::take(&mut s.answers),
        }
    }

    /// Moves the received notifications, in order, to `out`; returns how many.
    pub fn drain_inbox(&self, out: &mut Vec<Notification>) -> usize {
        let mut s = self.lock();
        let n = s.inbox.len();
        let bytes: usize = s.inbox.iter().map(|n| n.payload.len()).sum();
        s.inbox_bytes = s.inbox_bytes.saturating_sub(bytes);
        out.extend(s.inbox.drain(..));
        n
    }

    /// The counters.
    pub fn counters(&self) -> Counters {
        self.lock().n
    }

    /// Delivers notification `number` from sender `key` (name `peer`) in order, within
    /// the inbox's caps (dropped and counted beyond them).
    pub fn deliver(&self, key: (u64, u64, u64), number: u64, peer: String, payload: Bytes) {
        let mut guard = self.lock();
        let s = &mut *guard;
        let len = payload.len();
        if s.inbox.len() + s.held >= self.limits.max_inbox
            || s.inbox_bytes.saturating_add(len) > self.limits.max_inbox_bytes
        {
            s.n.dropped_notes += 1;
            tracing::warn!(
                "ucx: notification inbox full ({} notifications, {} bytes; max_inbox = {}, \
                 max_inbox_bytes = {}): the application does not drain it; dropped one from {peer}",
                s.inbox.len() + s.held,
                s.inbox_bytes,
                self.limits.max_inbox,
                self.limits.max_inbox_bytes
            );
            return;
        }
        s.tick = s.tick.wrapping_add(1);
        if !s.order.contains_key(&key) && s.order.len() >= MAX_SENDERS {
            evict_sender(s);
        }
        let tick = s.tick;
        let Inner {
            inbox,
            order,
            inbox_bytes,
            held,
            n: counters,
            ..
        } = s;
        let r = order.entry(key).or_default();
        r.touched = tick;
        let n = Notification { peer, payload };
        if number < r.next {
            counters.malformed += 1;
            return; // a duplicate
        }
        *inbox_bytes += len;
        if number > r.next {
            r.held.insert(number, n);
            *held += 1;
            if r.held.len() > MAX_HELD {
                // The gap will not fill (the sender lost a message); deliver what we have.
                tracing::warn!("ucx: notification gap before number {number}; skipping");
                flush_held(r, inbox, held);
            }
            return;
        }
        inbox.push_back(n);
        let Some(next) = r.next.checked_add(1) else {
            return; // number u64::MAX: nothing can follow it
        };
        r.next = next;
        while let Some(n) = r.held.remove(&r.next) {
            *held -= 1;
            inbox.push_back(n);
            match r.next.checked_add(1) {
                Some(x) => r.next = x,
                None => break,
            }
        }
    }
}

/// Delivers everything `r` holds, in order, and moves past it.
fn flush_held(r: &mut Reorder, inbox: &mut VecDeque<Notification>, held: &mut usize) {
    while let Some((number, n)) = r.held.pop_first() {
        *held -= 1;
        inbox.push_back(n);
        r.next = number.saturating_add(1);
    }
}

/// Evicts the least recently used sender's ordering state (delivering what it held).
fn evict_sender(s: &mut Inner) {
    let Some(key) = s
        .order
        .iter()
        .min_by_key(|(_, r)| r.touched)
        .map(|(k, _)| *k)
    else {
        return;
    };
    if let Some(mut r) = s.order.remove(&key) {
        flush_held(&mut r, &mut s.inbox, &mut s.held);
    }
}

/// The error for an operation the target refused.
pub fn ack_error(c: AckCode) -> Error {
    let what = "the peer refused the operation";
    match c {
        AckCode::NotRegistered => Error::NotRegistered(format!(
            "{what}: it has no such registration (deregistered?)"
        )),
        AckCode::OutOfBounds => {
            Error::OutOfBounds(format!("{what}: the range lies outside its registration"))
        }
        AckCode::InvalidMetadata => {
            Error::invalid_metadata(format!("{what}: header and data disagree"))
        }
        AckCode::AccessDenied => {
            Error::AccessDenied(format!("{what}: the registration is read-only"))
        }
        AckCode::Unauthenticated => Error::Unauthenticated(format!(
            "{what}: it does not know our session; both sides must use the same cluster \
             secret (KVX_SECRET)"
        )),
        AckCode::Unmapped => Error::Backend {
            name: "ucx".into(),
            code: 0,
            message: format!(
                "{what}: it could not map our UCX-allocated memory (it does not reach us \
                 over shared memory only, or its UCX failed); later posts on this endpoint \
                 send their data in messages"
            ),
        },
        AckCode::Ok | AckCode::Failed => Error::Backend {
            name: "ucx".into(),
            code: 0,
            message: format!("{what}: its UCX failed to move the data"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared(max_inbox: usize, max_inbox_bytes: usize) -> Option<Shared> {
        let lib = Lib::shared(None).ok()?;
        Some(Shared::new(
            lib,
            std::ptr::null_mut(),
            1,
            "me",
            None,
            Limits {
                max_notification: 1 << 20,
                max_inbox,
                max_inbox_bytes,
            },
        ))
    }

    fn drain(s: &Shared) -> Vec<u8> {
        let mut out = Vec::new();
        s.drain_inbox(&mut out);
        out.iter().map(|n| n.payload[0]).collect()
    }

    #[test]
    fn notifications_reorder_within_caps() {
        let Some(s) = kv_core::require_or_skip("ucx", shared(8, 1 << 20).ok_or(Error::Canceled))
        else {
            return;
        };
        let k = (0, 7, 1);
        let note = |b: u8| Bytes::from(vec![b]);
        s.deliver(k, 1, "p".into(), note(1));
        s.deliver(k, 0, "p".into(), note(0));
        s.deliver(k, 0, "p".into(), note(9)); // duplicate
        assert_eq!(drain(&s), vec![0, 1]);
        // The last number: delivered, nothing wraps (issue 14 item 7).
        s.deliver((0, 8, 1), 0, "q".into(), note(5));
        let mut big = s.lock();
        big.order.get_mut(&(0, 8, 1)).unwrap().next = u64::MAX;
        drop(big);
        s.deliver((0, 8, 1), u64::MAX, "q".into(), note(6));
        assert_eq!(drain(&s), vec![5, 6]);
        // The inbox cap: beyond 8 waiting notifications they are dropped and counted.
        for i in 0..12u64 {
            s.deliver((0, 9, 1), i, "r".into(), note(i as u8));
        }
        assert_eq!(drain(&s).len(), 8);
        assert_eq!(s.counters().dropped_notes, 4);
        assert_eq!(s.lock().inbox_bytes, 0);
    }

    #[test]
    fn senders_are_bounded() {
        let Some(s) =
            kv_core::require_or_skip("ucx", shared(1 << 20, 1 << 30).ok_or(Error::Canceled))
        else {
            return;
        };
        for i in 0..(MAX_SENDERS as u64 + 50) {
            // Each sender holds one early notification (number 1).
            s.deliver((0, i, 0), 1, "x".into(), Bytes::from_static(b"z"));
        }
        let st = s.lock();
        assert_eq!(st.order.len(), MAX_SENDERS);
        // The evicted senders' held notifications were delivered, not lost.
        assert_eq!(st.inbox.len(), 50);
        assert_eq!(st.held, MAX_SENDERS);
    }
}
