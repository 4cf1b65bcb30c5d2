//! The `Backend` plugin trait, the types that cross it, and the contract every backend
//! keeps (written once, in [`Backend`]'s docs).

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::auth::ClusterSecret;
use crate::desc::{DescriptorList, MemKind, MemKinds};
use crate::error::{Error, Result};

macro_rules! id_type {
    ($(#[$m:meta])* $name:ident) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub u64);

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "{}#{}", stringify!($name), self.0)
            }
        }
    };
}

id_type!(
    /// A local registration, handed out by [`Backend::register`]. `Copy`, `Send + Sync`.
    RegistrationId
);
id_type!(
    /// A connected peer, handed out by [`Backend::connect`]. `Copy`, `Send + Sync`.
    EndpointId
);
id_type!(
    /// A peer's registration imported with [`Backend::import_remote`]. `Copy`, `Send + Sync`.
    RemoteId
);
id_type!(
    /// A prepared transfer, handed out by [`Backend::prepare`]. `Copy`, `Send + Sync`.
    TransferId
);
id_type!(
    /// A list of items prepared once, handed out by [`Backend::prepare_list`]. `Copy`,
    /// `Send + Sync`.
    ListId
);

/// The direction of a one-sided transfer. `Copy`, `Send + Sync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// Local memory → remote memory (prefill pushes KV to decode).
    Write,
    /// Remote memory → local memory (decode pulls KV from prefill).
    Read,
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Op::Write => "WRITE",
            Op::Read => "READ",
        })
    }
}

/// Who may touch a registration. `Copy`, `Send + Sync`; `Default` is `ReadWrite`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Access {
    /// Peers may READ and WRITE it; it may be a READ's local destination.
    #[default]
    ReadWrite,
    /// Peers may only READ it, and the backend never writes into it — not even as the
    /// local destination of a READ (such a prepare is refused with
    /// [`Error::AccessDenied`]). The caller then only promises the range is valid for
    /// reads, which lets an owner hand out safe `&[u8]` over it.
    ReadOnly,
}

impl Access {
    /// The wire byte (`0` read-write, `1` read-only).
    pub fn as_u8(self) -> u8 {
        match self {
            Access::ReadWrite => 0,
            Access::ReadOnly => 1,
        }
    }

    /// The access for a wire byte, if it names one.
    pub fn from_u8(v: u8) -> Option<Access> {
        match v {
            0 => Some(Access::ReadWrite),
            1 => Some(Access::ReadOnly),
            _ => None,
        }
    }

    /// True when peers (and READs landing locally) may write into the registration.
    pub fn writable(self) -> bool {
        self == Access::ReadWrite
    }
}

impl std::fmt::Display for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Access::ReadWrite => "read-write",
            Access::ReadOnly => "read-only",
        })
    }
}

/// The construction-time context an agent passes to every backend factory (beside its
/// [`Params`]). `Clone`, `Send + Sync`; `Debug` shows the secret's fingerprint only.
///
/// Built with [`BackendInit::new`] and the `with_*` setters (or by setting the pub
/// fields); `#[non_exhaustive]` so fields can be added without breaking backends.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct BackendInit {
    /// The agent's name: what notifications from this backend carry as their sender
    /// ([`Notification::peer`]) and what it proves in authentication handshakes.
    pub agent_name: String,
    /// The cluster secret every data-plane connection is authenticated with; `None`
    /// means unauthenticated (tests, or an explicit opt-out by the operator).
    pub secret: Option<ClusterSecret>,
    /// Where the backend's listeners bind (default `127.0.0.1`: nothing off-host can
    /// connect unless the operator says so).
    pub bind_ip: IpAddr,
}

impl BackendInit {
    /// The context for agent `agent_name`: no secret, listeners on `127.0.0.1`.
    pub fn new(agent_name: impl Into<String>) -> Self {
        BackendInit {
            agent_name: agent_name.into(),
            secret: None,
            bind_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        }
    }

    /// Sets the cluster secret connections are authenticated with.
    pub fn with_secret(mut self, secret: ClusterSecret) -> Self {
        self.secret = Some(secret);
        self
    }

    /// Sets the address listeners bind to.
    pub fn with_bind_ip(mut self, ip: IpAddr) -> Self {
        self.bind_ip = ip;
        self
    }
}

/// How an agent creates a backend by name: every in-tree backend crate exports one
/// (`create`), and a third-party crate registers its own with the agent.
pub type BackendFactory = fn(&BackendInit, &Params) -> Result<Arc<dyn Backend>>;

/// What a backend can do. `Copy`, `Send + Sync`.
///
/// `#[non_exhaustive]`: build it from `Capabilities::default()` and set the fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Capabilities {
    /// Moves data between two backends in the same process (or on one host).
    pub local: bool,
    /// Moves data to a peer in another process or host.
    pub remote: bool,
    /// Carries notifications (alone or after a transfer's data).
    pub notifications: bool,
    /// Supports [`Op::Write`].
    pub write: bool,
    /// Supports [`Op::Read`].
    pub read: bool,
    /// Memory kinds it can register locally and address remotely.
    pub mem_kinds: MemKinds,
    /// The target side must call [`Backend::progress`] to serve peers' operations and
    /// notifications (e.g. UCX active-message writes); the agent then drives it.
    pub needs_target_progress: bool,
    /// Every data-plane connection this backend accepts is authenticated with the
    /// cluster secret of its [`BackendInit`].
    pub authenticated: bool,
    /// Enforces [`Access::ReadOnly`] on its target side (and for READ destinations). An
    /// agent refuses to register read-only memory on a backend that says `false`.
    pub read_only: bool,
}

/// A transfer to prepare: a local and a remote descriptor list of equal total length.
///
/// The remote list must fall inside registrations imported from `peer`; the local list
/// inside registrations made on this backend. `Clone`, `Send + Sync`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferRequest {
    /// Direction.
    pub op: Op,
    /// Kind of the local memory.
    pub local_kind: MemKind,
    /// Local ranges, in transfer order.
    pub local: DescriptorList,
    /// The peer.
    pub peer: EndpointId,
    /// Kind of the remote memory.
    pub remote_kind: MemKind,
    /// Remote ranges, in transfer order.
    pub remote: DescriptorList,
}

/// Whose memory a prepared list names ([`Backend::prepare_list`]). `Copy`, `Send + Sync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ListSide {
    /// This backend's registrations.
    Local,
    /// Registrations imported from this peer.
    Remote(EndpointId),
}

/// A transfer made from two prepared lists by item index ([`Backend::prepare_selected`]):
/// the bytes of `local` items `local_items[0], local_items[1], …`, in that order, move
/// to or from the bytes of `remote` items `remote_items[0], …` — exactly the transfer
/// [`Backend::prepare`] makes of the [`TransferRequest`] whose lists hold those items'
/// descriptors in that order. `Copy`, `Send + Sync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SelectRequest<'a> {
    /// Direction.
    pub op: Op,
    /// A list prepared with [`ListSide::Local`].
    pub local: ListId,
    /// Indices into `local`, in transfer order.
    pub local_items: &'a [u32],
    /// A list prepared with [`ListSide::Remote`]; the transfer goes to that peer.
    pub remote: ListId,
    /// Indices into `remote`, in transfer order.
    pub remote_items: &'a [u32],
}

/// Per-post options. `Clone`, `Send + Sync`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PostOptions {
    /// Delivered to the peer after all the data of this post has landed.
    pub notification: Option<Bytes>,
    /// The transfer fails with [`Error::TimedOut`] if it has not finished by then.
    pub deadline: Option<Instant>,
}

/// The state of a posted transfer. `Clone`, `Send + Sync`.
///
/// `poll` of a released or unknown id is `Failed(Error::InvalidArgument(..))` naming the
/// id — never `Idle`, which would let a caller wait forever on a transfer that is gone.
#[derive(Debug, Clone)]
pub enum Status {
    /// Prepared but not posted.
    Idle,
    /// Posted and not finished.
    InProgress,
    /// Every byte landed (and the notification, if any, was handed to the peer).
    Done,
    /// The transfer failed; the memory is no longer touched.
    Failed(Error),
}

impl Status {
    /// True for `Done` and `Failed`.
    pub fn is_finished(&self) -> bool {
        matches!(self, Status::Done | Status::Failed(_))
    }
}

/// A notification received from a peer. `Clone`, `Send + Sync`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    /// The sender's agent name ([`BackendInit::agent_name`] of its backend).
    pub peer: String,
    /// The payload.
    pub payload: Bytes,
}

/// A data-movement plugin: UCX, libfabric, TCP, io_uring, a loopback for tests.
///
/// The agent holds backends as `Arc<dyn Backend>` (created by a [`BackendFactory`]) and
/// calls them from many threads, so every method takes `&self` and implementations
/// synchronise inside (`Send + Sync` is required). The trait is synchronous and
/// poll-driven: [`Backend::post`] starts a transfer, [`Backend::progress`] drives
/// completions, [`Backend::poll`] reports them. Handles are small typed ids into the
/// backend's own tables; blobs that cross the wire (connection info, remote keys) are
/// opaque [`Bytes`] the backend produces and consumes.
///
/// # The contract
///
/// Every clause below is checked by the case of the `conformance` suite named at its end
/// (in `kv_core::conformance`); the in-process [`loopback`](crate::loopback) backend is the reference.
///
/// * **Bounds.** Local ranges must lie in this backend's registrations and remote ranges
///   in imported ones, else `prepare` fails ([`Error::OutOfBounds`] /
///   [`Error::NotRegistered`]) (case `bounds_refused`). The *target* re-checks every peer
///   operation against its own registrations and the key it names, whatever the
///   importer claimed: a forged descriptor or key never moves a byte outside that key's
///   registration (case `bounds_forged`).
/// * **Remote keys** may be empty only if `capabilities().local` and the backend needs
///   none. Keys a backend chooses itself are ≥ 128 random bits from the OS
///   ([`crate::auth::random_u128`]). `import_remote` of a malformed key fails with
///   [`Error::InvalidMetadata`] and never panics (case `export_import`).
/// * **Revocation.** `deregister` returns only when no peer operation can touch the
///   range any more (bounded; [`Error::Busy`] otherwise), and every later peer operation
///   naming it is refused ([`Error::NotRegistered`]) and moves nothing — also for a
///   transfer prepared before the peer deregistered (case `post_after_peer_deregister`). A
///   peer's in-flight operation does not make a local deregister `Busy`; only this
///   backend's own posted transfers do (case `deregister_busy`), and a post whose local
///   registration is gone is refused (case `post_after_deregister`).
/// * **Read-only** registrations ([`Access::ReadOnly`]): peers may READ them, a WRITE
///   into one is refused ([`Error::AccessDenied`], at prepare, post or in its status)
///   and moves nothing, and one is never a READ's local destination (case `read_only`).
/// * **Descriptors.** Zero-length descriptors inside a list are allowed and move
///   nothing (case `zero_length_descriptors`); a transfer of zero total bytes is refused
///   ([`check_request_shape`]).
/// * **Notifications** are delivered after all data of their post landed at the target,
///   in order per (sender, receiver), exactly once (cases
///   `notifications`, `notification_after_data`); for a READ the notification goes to the peer whose
///   memory was read, after the read finished (case `read_notification`).
///   [`Notification::peer`] is the sender's [`BackendInit::agent_name`].
/// * **Target progress.** If `capabilities().needs_target_progress`, peers are served
///   only while someone calls `progress()` on the target; otherwise the backend serves
///   them on its own threads.
/// * **Deadlines.** A transfer not finished by its deadline ends `Failed(TimedOut)`; a
///   post whose deadline has already passed fails with [`Error::TimedOut`] (at post or
///   in its status) and moves nothing (case `expired_deadline`).
/// * **Cancel** is bounded: it returns within a bounded time and, once it returned
///   `Ok`, no copy of that transfer runs any more (cases `cancel`, `cancel_stops_copies`).
///   If the native layer may still touch the memory, it returns [`Error::Busy`] and
///   keeps (leaks) what that layer may touch — never `Ok` while a copy can still run.
/// * **Released transfers.** `poll` of a released or unknown id is
///   `Failed(Error::InvalidArgument)` naming the id (case `poll_after_release`).
/// * **Disconnect.** After `disconnect(peer)`, or when the peer is gone, in-flight
///   transfers to it end `Failed(`[`Error::RemoteDisconnected`]`)` within their deadline,
///   and later prepares and posts to it fail with `RemoteDisconnected`
///   (cases `disconnect_inflight`, `dropped_peer`).
/// * **Authentication.** If `capabilities().authenticated`, a peer without the cluster
///   secret cannot connect, import or move a byte, and is refused within the deadline
///   (case `unauthenticated_peer_refused`).
/// * **Prepared lists** (optional; NIXL's `prepXferDlist` / `makeXferReq` by index). A
///   backend that implements [`Backend::prepare_list`] checks every item once there (as
///   `prepare` would: `NotRegistered` / `OutOfBounds` / `Unsupported`), and
///   [`Backend::prepare_selected`] then makes the same transfer `prepare` would make of
///   the selected items' descriptors — same bytes, same refusals at post (a local
///   registration or an import withdrawn since is refused, read-only access enforced) —
///   without checking the items again. An index past the end is [`Error::OutOfBounds`];
///   index arrays of different lengths, unequal or zero totals are
///   [`Error::InvalidArgument`]; a released list is [`Error::NotRegistered`]. A list
///   pins nothing: it never makes `deregister` `Busy`, and transfers made from it stay
///   valid after `release_list` (case `prepared_lists`). Backends without the methods
///   return `Unsupported` and the agent builds lists per request instead.
/// * **Bounded peer input.** Frame sizes, inbox messages and bytes, reorder state and
///   connections are bounded; peer input never panics or unwinds across FFI.
///
/// # Safety
///
/// The trait is safe to implement, but two methods are `unsafe` to call because the
/// backend reads and writes raw addresses the compiler cannot check:
///
/// * [`Backend::register`]: the caller promises the range is valid for reads (and, for
///   [`Access::ReadWrite`], for writes: a peer may write into it at any time) until
///   [`Backend::deregister`] of it returned `Ok` — or, if it never does, for as long as
///   the backend lives.
/// * [`Backend::post`]: the caller promises the local ranges of the transfer stay valid
///   and registered until [`Backend::poll`] reports it finished or [`Backend::cancel`]
///   returned `Ok`.
///
/// In return an implementation promises:
///
/// * never to touch a registered range after `deregister` of it returned `Ok`, nor a
///   transfer's local ranges after it reported `Done`/`Failed` or `cancel` returned
///   `Ok`; never to write into an [`Access::ReadOnly`] registration;
/// * to refuse (with [`Error::OutOfBounds`] or [`Error::NotRegistered`]) any local or
///   remote range outside the registrations it knows — including ranges requested by
///   a peer over the network;
/// * when dropped (its last `Arc`), to stop its threads and afterwards touch no
///   registered memory; whatever the kernel or a NIC may still write is leaked, never
///   freed.
pub trait Backend: Send + Sync {
    /// Short name (`tcp`, `ucx`, `libfabric`, `gds`, `loopback`).
    fn name(&self) -> &str;

    /// What the backend supports.
    fn capabilities(&self) -> Capabilities;

    /// Registers `desc` of `kind` with `access` so it can be a transfer's local side or a
    /// peer's target.
    ///
    /// # Safety
    ///
    /// The range must be valid for reads — and, for [`Access::ReadWrite`], for writes —
    /// (for DRAM/VRAM: mapped, not freed) until `deregister` of the returned id returned
    /// `Ok`.
    #[allow(unsafe_code)] // declares the contract; kv-core itself dereferences nothing
    unsafe fn register(
        &self,
        kind: MemKind,
        desc: &crate::Descriptor,
        access: Access,
    ) -> Result<RegistrationId>;

    /// Ends a registration. Fails with [`Error::Busy`] while a transfer this backend
    /// posted names it (a peer's in-flight operation does not count: it is cut off).
    /// Returns only when no peer operation can touch the range any more.
    fn deregister(&self, id: RegistrationId) -> Result<()>;

    /// The public part of a registration a peer needs to address it (the remote key).
    fn remote_key(&self, id: RegistrationId) -> Result<Bytes>;

    /// This backend's connection info (addresses, worker blobs) for peers to connect.
    fn connection_info(&self) -> Result<Bytes>;

    /// Connects to (or prepares to address) a peer from its connection info;
    /// authenticated backends run the cluster-secret handshake here (or on first use).
    fn connect(&self, peer_name: &str, info: &[u8]) -> Result<EndpointId>;

    /// Forgets a peer: its in-flight transfers end `Failed(RemoteDisconnected)`, its
    /// imported registrations are released, and later prepares and posts naming it fail
    /// with [`Error::RemoteDisconnected`].
    fn disconnect(&self, peer: EndpointId) -> Result<()>;

    /// Imports a peer's registration: `desc` is what the peer registered and `key` the
    /// remote key it exported for it. A malformed key is [`Error::InvalidMetadata`].
    fn import_remote(
        &self,
        peer: EndpointId,
        kind: MemKind,
        desc: &crate::Descriptor,
        key: &[u8],
    ) -> Result<RemoteId>;

    /// Releases an imported registration.
    fn release_remote(&self, id: RemoteId) -> Result<()>;

    /// Checks a transfer once (bounds against local and imported registrations, equal
    /// lengths, supported kinds) and keeps it for any number of posts.
    fn prepare(&self, req: &TransferRequest) -> Result<TransferId>;

    /// Starts a prepared transfer. A transfer that finished may be posted again. A
    /// deadline that already passed fails with [`Error::TimedOut`] (here or in the
    /// status) and moves nothing.
    ///
    /// # Safety
    ///
    /// The local ranges of the transfer must stay valid and registered until `poll`
    /// reports `Done`/`Failed` or `cancel` returns.
    #[allow(unsafe_code)] // declares the contract; kv-core itself dereferences nothing
    unsafe fn post(&self, id: TransferId, opts: &PostOptions) -> Result<()>;

    /// The transfer's state. Does not block; may drive progress. A released or unknown
    /// id is `Failed(InvalidArgument)`.
    fn poll(&self, id: TransferId) -> Status;

    /// Stops a transfer. Returns `Ok` only when the backend will no longer touch its
    /// memory; the transfer then reports `Failed(Canceled)` (or `Done` if it won the
    /// race). Bounded: [`Error::Busy`] if the native layer may still touch the memory.
    fn cancel(&self, id: TransferId) -> Result<()>;

    /// Forgets a prepared transfer. Fails with [`Error::Busy`] while it is in progress.
    fn release(&self, id: TransferId) -> Result<()>;

    /// Drives completions; returns how many events were handled.
    fn progress(&self) -> Result<usize>;

    /// Sends a notification alone (no data) to a peer, in order with earlier posts.
    fn notify(&self, peer: EndpointId, payload: Bytes) -> Result<()>;

    /// Appends received notifications to `out`, oldest first; returns how many.
    fn drain_notifications(&self, out: &mut Vec<Notification>) -> Result<usize>;

    /// Prepares a list of items once for many [`Backend::prepare_selected`] calls: item
    /// `i` is descriptor `i` of `items` (kept compact: a strided run of blocks is one
    /// entry however many items it holds), in this backend's registrations
    /// ([`ListSide::Local`]) or in registrations imported from a peer. Every item is
    /// checked here, as `prepare` checks a request's ranges. The default is
    /// [`Error::Unsupported`] (the agent then builds lists per request).
    fn prepare_list(
        &self,
        side: ListSide,
        kind: MemKind,
        items: &DescriptorList,
    ) -> Result<ListId> {
        let _ = (side, kind, items);
        Err(Error::Unsupported(format!(
            "{} does not prepare lists",
            self.name()
        )))
    }

    /// Prepares the transfer of `req`'s selected items (see [`SelectRequest`]) without
    /// checking the items again; post it like any prepared transfer. The default is
    /// [`Error::Unsupported`].
    fn prepare_selected(&self, req: &SelectRequest<'_>) -> Result<TransferId> {
        let _ = req;
        Err(Error::Unsupported(format!(
            "{} does not prepare lists",
            self.name()
        )))
    }

    /// Forgets a prepared list; transfers already made from it are not affected. The
    /// default is [`Error::Unsupported`].
    fn release_list(&self, id: ListId) -> Result<()> {
        Err(Error::Unsupported(format!(
            "{} does not prepare lists ({id})",
            self.name()
        )))
    }

    /// An estimate of how long `req` would take, used to choose among backends.
    fn estimate_cost(&self, _req: &TransferRequest) -> Option<Duration> {
        None
    }
}

/// Backend parameters by name, as the agent passes them to a backend's `create`
/// function (`"port" => "0"`, `"tls" => "tcp"`); each backend documents its keys and
/// also offers a typed options struct.
pub type Params = std::collections::BTreeMap<String, String>;

/// True when `KV_REQUIRE_BACKENDS` (comma-separated) names `backend`: a test that would
/// skip because the backend's native library is missing must fail instead.
pub fn backend_required(backend: &str) -> bool {
    std::env::var("KV_REQUIRE_BACKENDS")
        .map(|v| v.split(',').any(|b| b.trim() == backend))
        .unwrap_or(false)
}

/// For tests: `Some(value)` when the backend could be created; when it is unavailable,
/// prints why and returns `None` (skip) — or panics if [`backend_required`] says it
/// must be there.
pub fn require_or_skip<T>(backend: &str, created: Result<T>) -> Option<T> {
    match created {
        Ok(v) => Some(v),
        Err(e) if backend_required(backend) => {
            panic!("backend {backend} is required by KV_REQUIRE_BACKENDS but unavailable: {e}")
        }
        Err(e) => {
            eprintln!("skipping: backend {backend} unavailable: {e}");
            None
        }
    }
}

/// Helper for backends: checks that the local and remote lists of a request are of
/// equal, non-zero total length (zero-length descriptors inside them are fine).
pub fn check_request_shape(req: &TransferRequest) -> Result<()> {
    if req.local.total_bytes() != req.remote.total_bytes() {
        return Err(Error::invalid_argument(format!(
            "local list has {} bytes but remote list has {}; they must be equal",
            req.local.total_bytes(),
            req.remote.total_bytes()
        )));
    }
    if req.local.total_bytes() == 0 {
        return Err(Error::invalid_argument("transfer of zero bytes"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_hides_its_secret() {
        let s = ClusterSecret::generate().unwrap();
        let init = BackendInit::new("prefill-0")
            .with_secret(s.clone())
            .with_bind_ip(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        let dbg = format!("{init:?}");
        assert!(dbg.contains("prefill-0") && dbg.contains(&s.fingerprint()));
        assert!(!dbg.contains(&s.to_hex()), "{dbg}");
        assert_eq!(
            BackendInit::new("x").bind_ip,
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        );
        fn check<T: Send + Sync + Clone>() {}
        check::<BackendInit>();
    }

    #[test]
    fn access_round_trips() {
        for a in [Access::ReadWrite, Access::ReadOnly] {
            assert_eq!(Access::from_u8(a.as_u8()), Some(a));
        }
        assert_eq!(Access::from_u8(2), None);
        assert_eq!(Access::default(), Access::ReadWrite);
    }

    #[test]
    fn backend_is_object_safe_and_shareable() {
        fn check<T: Send + Sync + ?Sized>() {}
        check::<dyn Backend>();
        let _: Option<std::sync::Arc<dyn Backend>> = None;
        let _: Option<Box<dyn Backend>> = None;
    }
}
