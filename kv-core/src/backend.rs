//! The `Backend` plugin trait and the types that cross it.

use std::time::{Duration, Instant};

use bytes::Bytes;

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

/// What a backend can do. `Copy`, `Send + Sync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
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

/// Per-post options. `Clone`, `Send + Sync`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PostOptions {
    /// Delivered to the peer after all the data of this post has landed.
    pub notification: Option<Bytes>,
    /// The transfer fails with [`Error::TimedOut`] if it has not finished by then.
    pub deadline: Option<Instant>,
}

/// The state of a posted transfer. `Clone`, `Send + Sync`.
#[derive(Debug, Clone)]
pub enum Status {
    /// Prepared but not posted (or released).
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
    /// The peer's name, as it gave it in its connection info.
    pub peer: String,
    /// The payload.
    pub payload: Bytes,
}

/// A data-movement plugin: UCX, libfabric, TCP, io_uring, a loopback for tests.
///
/// The agent holds backends as `Arc<dyn Backend>` and calls them from many threads, so
/// every method takes `&self` and implementations synchronise inside (`Send + Sync`
/// is required). The trait is synchronous and poll-driven: [`Backend::post`] starts a
/// transfer, [`Backend::progress`] drives completions, [`Backend::poll`] reports them.
///
/// Handles are small typed ids into the backend's own tables; blobs that cross the wire
/// (connection info, remote keys) are opaque [`Bytes`] the backend produces and consumes.
///
/// # Safety
///
/// The trait is safe to implement, but two methods are `unsafe` to call because the
/// backend reads and writes raw addresses the compiler cannot check:
///
/// * [`Backend::register`]: the caller promises the range is valid for reads and writes
///   until [`Backend::deregister`] returns (a peer may write into it at any time while
///   it is registered).
/// * [`Backend::post`]: the caller promises the local ranges of the transfer stay valid
///   and registered until [`Backend::poll`] reports it finished or [`Backend::cancel`]
///   returns.
///
/// In return an implementation promises never to touch a registered range after
/// `deregister` returns, nor a transfer's local ranges after it reported `Done`/`Failed`
/// or `cancel` returned, and to refuse (with [`Error::OutOfBounds`] or
/// [`Error::NotRegistered`]) any local or remote range outside the registrations it
/// knows — including ranges requested by a peer over the network.
pub trait Backend: Send + Sync {
    /// Short name (`tcp`, `ucx`, `libfabric`, `gds`, `loopback`).
    fn name(&self) -> &str;

    /// What the backend supports.
    fn capabilities(&self) -> Capabilities;

    /// Registers `desc` of `kind` so it can be a transfer's local side or a peer's target.
    ///
    /// # Safety
    ///
    /// The range must be valid for reads and writes (for DRAM/VRAM: mapped, not freed)
    /// until `deregister` of the returned id returns.
    #[allow(unsafe_code)] // declares the contract; kv-core itself dereferences nothing
    unsafe fn register(&self, kind: MemKind, desc: &crate::Descriptor) -> Result<RegistrationId>;

    /// Ends a registration. Fails with [`Error::Busy`] while a posted transfer names it.
    fn deregister(&self, id: RegistrationId) -> Result<()>;

    /// The public part of a registration a peer needs to address it (the remote key).
    fn remote_key(&self, id: RegistrationId) -> Result<Bytes>;

    /// This backend's connection info (addresses, worker blobs) for peers to connect.
    fn connection_info(&self) -> Result<Bytes>;

    /// Connects to (or prepares to address) a peer from its connection info.
    fn connect(&self, peer_name: &str, info: &[u8]) -> Result<EndpointId>;

    /// Forgets a peer: its transfers fail with [`Error::RemoteDisconnected`] and its
    /// imported registrations are released.
    fn disconnect(&self, peer: EndpointId) -> Result<()>;

    /// Imports a peer's registration: `desc` is what the peer registered and `key` the
    /// remote key it exported for it.
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

    /// Starts a prepared transfer. A transfer that finished may be posted again.
    ///
    /// # Safety
    ///
    /// The local ranges of the transfer must stay valid and registered until `poll`
    /// reports `Done`/`Failed` or `cancel` returns.
    #[allow(unsafe_code)] // declares the contract; kv-core itself dereferences nothing
    unsafe fn post(&self, id: TransferId, opts: &PostOptions) -> Result<()>;

    /// The transfer's state. Does not block; may drive progress.
    fn poll(&self, id: TransferId) -> Status;

    /// Stops a transfer. Returns only when the backend will no longer touch its memory;
    /// the transfer then reports `Failed(Canceled)` (or `Done` if it won the race).
    fn cancel(&self, id: TransferId) -> Result<()>;

    /// Forgets a prepared transfer. Fails with [`Error::Busy`] while it is in progress.
    fn release(&self, id: TransferId) -> Result<()>;

    /// Drives completions; returns how many events were handled.
    fn progress(&self) -> Result<usize>;

    /// Sends a notification alone (no data) to a peer, in order with earlier posts.
    fn notify(&self, peer: EndpointId, payload: Bytes) -> Result<()>;

    /// Appends received notifications to `out`, oldest first; returns how many.
    fn drain_notifications(&self, out: &mut Vec<Notification>) -> Result<usize>;

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

/// Helper for backends: checks that the local and remote lists of a request are
/// non-empty and of equal total length.
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
    fn backend_is_object_safe_and_shareable() {
        fn check<T: Send + Sync + ?Sized>() {}
        check::<dyn Backend>();
        let _: Option<std::sync::Arc<dyn Backend>> = None;
        let _: Option<Box<dyn Backend>> = None;
    }
}
