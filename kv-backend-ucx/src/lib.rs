//! The UCX backend of kvx: one-sided `put`/`get` between registered host memory of two
//! agents over whatever transport UCX picks (shared memory, cross-memory attach, TCP, or
//! RDMA where present), with notifications carried as UCX active messages.
//!
//! `libucp.so.0` is opened at run time (no build-time UCX, no link dependency); where it
//! is missing [`create`] returns [`kv_core::Error::BackendUnavailable`] saying what to
//! install. Transfers are driven by [`kv_core::Backend::progress`] (or the optional
//! progress thread), and a dead peer turns into `RemoteDisconnected` or `TimedOut`.
//!
//! ```no_run
//! use kv_backend_ucx::{Options, UcxBackend};
//! use kv_core::{Backend, BackendInit};
//!
//! let opts = Options { tls: Some("posix,cma,self".into()), ..Default::default() };
//! let prefill = UcxBackend::new(&BackendInit::new("prefill-0"), opts.clone())?;
//! let decode = UcxBackend::new(&BackendInit::new("decode-0"), opts)?;
//! let peer = prefill.connect("decode-0", &decode.connection_info()?)?;
//! // register memory on both sides, export `remote_key`, `import_remote`, `prepare`,
//! // `post`, then `progress` + `poll` until `Status::Done`.
//! println!("{}", prefill.describe());
//! # let _ = peer;
//! # Ok::<(), kv_core::Error>(())
//! ```
//!
//! # Threads
//!
//! [`UcxBackend`] is `Send + Sync`. The UCP worker is created with
//! `UCS_THREAD_MODE_SERIALIZED` and every UCX call happens under one
//! `parking_lot::Mutex`, so any thread may call any method; they run one at a time.
//!
//! # Operations, and what a peer can do
//!
//! The UCP context has active messages only (no `UCP_FEATURE_RMA`): UCX 1.13 emulates
//! RMA over TCP and over shared memory for heap memory with handlers that write and
//! read *any* address a peer names, and nothing a target does revokes a peer's access
//! to memory it mapped. So every WRITE and READ is an operation message that the
//! target's worker checks against its live registrations (key id of 128 random bits,
//! range, access) before it moves a byte: a deregistered, read-only or foreign range is
//! refused and nothing moves. Large pieces go by rendezvous straight into or out of
//! place; small ones are batched. With a cluster secret (`BackendInit::secret`) every
//! endpoint first runs a challenge–response handshake and every operation, answer and
//! notification is tagged under its session key; without one the backend starts only
//! as [`Options::insecure`] allows. The target must progress
//! (`Capabilities::needs_target_progress`, or the progress thread). See the README,
//! "Trust".
//!
//! # Peer failure
//!
//! Endpoints use `UCP_ERR_HANDLING_MODE_PEER` with an error callback: where the
//! transport notices a dead peer (TCP) its transfers fail with `RemoteDisconnected`.
//! Shared-memory transports may not notice; a transfer's `PostOptions::deadline` is the
//! fallback (`TimedOut`), and a peer backend in the same process is known dead as soon
//! as it is dropped. A deadline never closes the endpoint: what UCX still holds stays
//! in quarantine (its memory busy) until UCX gives it back.
#![warn(missing_docs)]

mod am;
mod clock;
mod config;
mod context;
mod endpoint;
mod ffi;
mod guard;
mod ids;
mod mapping;
mod memory;
mod request;
mod send;
mod serve;
mod session;
mod shared;
mod wire;
mod worker;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use kv_core::{
    Access, Backend, BackendInit, Capabilities, Descriptor, EndpointId, MemKind, MemKinds,
    Notification, Params, PostOptions, RegistrationId, RemoteId, Result, Status, TransferId,
    TransferRequest,
};

pub use config::Options;
pub use memory::UcxHostMemory;
use worker::Core;

/// Creates the backend for the agent `init` names from `params` (see
/// [`Options::from_params`]).
pub fn create(init: &BackendInit, params: &Params) -> Result<Arc<dyn Backend>> {
    Ok(Arc::new(UcxBackend::new(
        init,
        Options::from_params(params)?,
    )?))
}

/// The UCX backend. `Send + Sync` (see the crate docs, "Threads").
pub struct UcxBackend {
    /// The agent name, cluster secret and bind address it was created with.
    init: BackendInit,
    core: Arc<Core>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UcxBackend {
    /// Loads UCX and creates a context and worker for the agent `init` names (its
    /// cluster secret authenticates every operation; UCX's TCP transport uses the
    /// interface of its `bind_ip` only, see [`Options`]).
    pub fn new(init: &BackendInit, opts: Options) -> Result<UcxBackend> {
        let progress_thread = opts.progress_thread;
        let core = Arc::new(Core::new(
            &init.agent_name,
            init.secret.clone(),
            init.bind_ip,
            opts,
        )?);
        let stop = Arc::new(AtomicBool::new(false));
        let thread = progress_thread.then(|| {
            let (weak, stop) = (Arc::downgrade(&core), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Acquire) {
                    let Some(core) = weak.upgrade() else { break };
                    let n = core.progress().unwrap_or(0);
                    drop(core);
                    if n == 0 {
                        // Measured on a busy 2-core host: polling with `yield_now` for
                        // 2 ms after the last work instead made a 1 MiB TCP WRITE to
                        // this target take 1.9-3.0 ms rather than 0.3-0.4 ms.
                        std::thread::sleep(Duration::from_micros(50));
                    }
                }
            })
        });
        Ok(UcxBackend {
            init: init.clone(),
            core,
            stop,
            thread,
        })
    }

    /// The UCX version, transports setting and, per endpoint, the transports and lanes
    /// UCX chose (`ucp_ep_print_info`).
    pub fn describe(&self) -> String {
        self.core.describe()
    }

    /// `len` bytes of host memory allocated by UCX for this backend (zeroed,
    /// `UCP_MEM_MAP_ALLOCATE`). Register it with this backend like any memory; peers
    /// reach it through the same checked operations as any registration.
    pub fn alloc_host(&self, len: usize) -> Result<UcxHostMemory> {
        UcxHostMemory::new(self.core.clone(), len)
    }

    /// The agent name notifications from this backend carry.
    pub fn agent_name(&self) -> &str {
        &self.init.agent_name
    }
}

impl Drop for UcxBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Backend for UcxBackend {
    fn name(&self) -> &str {
        "ucx"
    }

    fn capabilities(&self) -> Capabilities {
        let mut c = Capabilities::default();
        c.local = true;
        c.remote = true;
        c.notifications = true;
        c.write = true;
        c.read = true;
        c.mem_kinds = MemKinds::of(&[MemKind::Dram]);
        // Every operation and notification is served by the target's worker: only
        // while it progresses (by the caller, unless the progress thread does it).
        c.needs_target_progress = !self.core.opts.progress_thread;
        // The target checks every operation against its live registrations, including
        // their access (no UCX RMA a peer could use instead).
        c.read_only = true;
        // With a cluster secret, every operation and notification this backend serves
        // comes from an endpoint that proved the secret (handshake + tag per message).
        // UCX's own connection and wire protocol stay unauthenticated: README, "Trust".
        c.authenticated = self.core.authenticated();
        c
    }

    unsafe fn register(
        &self,
        kind: MemKind,
        desc: &Descriptor,
        access: Access,
    ) -> Result<RegistrationId> {
        self.core.register(kind, desc, access).map(RegistrationId)
    }

    fn deregister(&self, id: RegistrationId) -> Result<()> {
        self.core.deregister(id.0)
    }

    fn remote_key(&self, id: RegistrationId) -> Result<Bytes> {
        self.core.remote_key(id.0)
    }

    fn connection_info(&self) -> Result<Bytes> {
        Ok(self.core.info.clone())
    }

    fn connect(&self, peer_name: &str, info: &[u8]) -> Result<EndpointId> {
        self.core.connect(peer_name, info).map(EndpointId)
    }

    fn disconnect(&self, peer: EndpointId) -> Result<()> {
        self.core.disconnect(peer.0)
    }

    fn import_remote(
        &self,
        peer: EndpointId,
        kind: MemKind,
        desc: &Descriptor,
        key: &[u8],
    ) -> Result<RemoteId> {
        self.core
            .import_remote(peer.0, kind, desc, key)
            .map(RemoteId)
    }

    fn release_remote(&self, id: RemoteId) -> Result<()> {
        self.core.release_remote(id.0)
    }

    fn prepare(&self, req: &TransferRequest) -> Result<TransferId> {
        self.core.prepare(req).map(TransferId)
    }

    unsafe fn post(&self, id: TransferId, opts: &PostOptions) -> Result<()> {
        self.core.post(id.0, opts)
    }

    fn poll(&self, id: TransferId) -> Status {
        self.core.poll(id.0)
    }

    fn cancel(&self, id: TransferId) -> Result<()> {
        self.core.cancel(id.0)
    }

    fn release(&self, id: TransferId) -> Result<()> {
        self.core.release(id.0)
    }

    fn progress(&self) -> Result<usize> {
        self.core.progress()
    }

    fn notify(&self, peer: EndpointId, payload: Bytes) -> Result<()> {
        self.core.notify(peer.0, payload)
    }

    fn drain_notifications(&self, out: &mut Vec<Notification>) -> Result<usize> {
        self.core.drain_notifications(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kv_core::Error;

    #[test]
    fn backend_is_send_sync() {
        fn check<T: Send + Sync>() {}
        check::<UcxBackend>();
        check::<Options>();
    }

    #[test]
    fn missing_library_is_unavailable_not_a_panic() {
        let opts = Options {
            lib_path: Some("/nonexistent/libucp.so.0".into()),
            ..Default::default()
        };
        match UcxBackend::new(&BackendInit::new("a"), opts) {
            Err(Error::BackendUnavailable { name, reason }) => {
                assert_eq!(name, "ucx");
                assert!(reason.contains("libucx0"), "{reason}");
            }
            Err(e) => panic!("wrong error {e}"),
            Ok(_) => panic!("created a backend from a nonexistent library"),
        }
    }

    /// Without a secret, UCX's TCP transport on every interface needs `insecure=true`;
    /// the refusal comes before UCX is loaded.
    #[test]
    fn no_secret_beyond_this_host_needs_insecure() {
        let opts = Options {
            tls: Some("tcp".into()),
            ..Default::default()
        };
        let init = BackendInit::new("a").with_bind_ip([0, 0, 0, 0].into());
        assert!(matches!(
            UcxBackend::new(&init, opts.clone()),
            Err(Error::Unauthenticated(_))
        ));
        let opts = Options {
            insecure: Some(true),
            ..opts
        };
        if let Some(b) = kv_core::require_or_skip("ucx", UcxBackend::new(&init, opts)) {
            assert!(!b.capabilities().authenticated);
        }
    }
}
