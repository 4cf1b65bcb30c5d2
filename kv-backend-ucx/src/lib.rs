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
//! use kv_core::Backend;
//!
//! let opts = Options { tls: Some("posix,cma,self".into()), ..Default::default() };
//! let prefill = UcxBackend::new("prefill-0", opts.clone())?;
//! let decode = UcxBackend::new("decode-0", opts)?;
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
//! # Memory
//!
//! Any host memory can be registered, but over shared memory UCX 1.13 emulates RMA on
//! heap memory through the target's worker (which must then progress). Memory from
//! [`UcxBackend::alloc_host`] is UCX's own shared mapping: peers' puts and gets are a
//! plain copy into it, about three times faster for 1 MiB on the reference machine.
//!
//! # WRITEs over TCP
//!
//! UCX 1.13 has no RMA lane on TCP and emulates put with active messages that the
//! target copies. Over endpoints whose lanes are all TCP, WRITE segments of at least
//! [`Options::am_write_min`] bytes are sent as active messages with rendezvous instead:
//! the target checks the header against its registrations, receives the data straight
//! into the registered range and answers; the post completes on that answer. The target
//! must progress (as for emulated put). See the README, "TCP WRITEs".
//!
//! # Peer failure
//!
//! Endpoints use `UCP_ERR_HANDLING_MODE_PEER` with an error callback: where the
//! transport notices a dead peer (TCP) its transfers fail with `RemoteDisconnected`.
//! Shared-memory transports may not notice; a transfer's `PostOptions::deadline` is the
//! fallback (`TimedOut`), and a peer backend in the same process is known dead as soon
//! as it is dropped. Cancelling and deadlines cancel UCX's requests and, when UCX cannot
//! cancel them, force-close the endpoint, so that memory is never released while UCX
//! may still touch it.
#![warn(missing_docs)]

mod endpoint;
mod ffi;
mod memory;
mod request;
mod wire;
mod worker;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use kv_core::{
    Backend, Capabilities, Descriptor, EndpointId, Error, MemKind, MemKinds, Notification, Params,
    PostOptions, RegistrationId, RemoteId, Result, Status, TransferId, TransferRequest,
};

pub use memory::UcxHostMemory;
use worker::Core;

/// Settings of a [`UcxBackend`]. `Clone`, `Send + Sync`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Transports UCX may use (`UCX_TLS` syntax: `"tcp"`, `"posix,cma,self"`); `None`
    /// leaves it to the `UCX_TLS` environment or UCX's default. Param `tls`.
    pub tls: Option<String>,
    /// Path of `libucp.so.0`; `None` means `KV_UCX_LIB`, else the loader's search path.
    /// Param `lib`.
    pub lib_path: Option<PathBuf>,
    /// Run a thread that calls `progress()` so transfers move without the caller
    /// driving them (it sleeps 50 µs whenever a poll found nothing). Param
    /// `progress_thread` (`true`/`false`).
    pub progress_thread: bool,
    /// Largest notification payload accepted. Param `max_notification`.
    pub max_notification: usize,
    /// How long `cancel` waits for UCX to cancel requests before force-closing the
    /// endpoint. Param `cancel_grace_ms`.
    pub cancel_grace: Duration,
    /// Over endpoints whose lanes are all TCP, WRITE segments of at least this many
    /// bytes are sent as active messages with rendezvous that the target receives
    /// straight into its registered memory (UCX 1.13 emulates put over TCP with
    /// messages the target copies); smaller segments stay `ucp_put_nbx`. `u64::MAX`
    /// turns it off. Param `am_write_min` (bytes, or `off`). See README, "TCP WRITEs".
    pub am_write_min: u64,
    /// Further UCX settings (`ucp_config_modify` names without the `UCX_` prefix, e.g.
    /// `("RNDV_THRESH", "8k")`, `("TCP_TX_SEG_SIZE", "1M")`). Params `ucx.<NAME>`.
    /// `TCP_*` names are passed without `TCP_` (how UCX 1.13 applies transport settings
    /// per context). Over TCP this backend's defaults differ from UCX's: see README,
    /// "TCP segments"; peers must agree (checked at `connect`).
    pub config: Vec<(String, String)>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            tls: None,
            lib_path: None,
            progress_thread: false,
            max_notification: 1 << 20,
            cancel_grace: Duration::from_millis(100),
            am_write_min: worker::AM_WRITE_MIN,
            config: Vec::new(),
        }
    }
}

impl Options {
    /// Reads the keys documented on each field from `params`; unknown keys are refused.
    pub fn from_params(params: &Params) -> Result<Options> {
        let mut o = Options::default();
        let bad = |k: &str, v: &str| Error::invalid_argument(format!("ucx param {k}={v:?}"));
        for (k, v) in params {
            match k.as_str() {
                "tls" => o.tls = Some(v.clone()),
                "lib" => o.lib_path = Some(PathBuf::from(v)),
                "progress_thread" => o.progress_thread = v.parse().map_err(|_| bad(k, v))?,
                "max_notification" => o.max_notification = v.parse().map_err(|_| bad(k, v))?,
                "am_write_min" => {
                    o.am_write_min = match v.as_str() {
                        "off" => u64::MAX,
                        n => n.parse().map_err(|_| bad(k, v))?,
                    }
                }
                "cancel_grace_ms" => {
                    o.cancel_grace = Duration::from_millis(v.parse().map_err(|_| bad(k, v))?)
                }
                _ => match k.strip_prefix("ucx.") {
                    Some(name) if !name.is_empty() => o.config.push((name.into(), v.clone())),
                    _ => {
                        return Err(Error::invalid_argument(format!(
                            "unknown ucx param {k:?} (known: tls, lib, progress_thread, \
                             max_notification, cancel_grace_ms, am_write_min, ucx.<NAME>)"
                        )))
                    }
                },
            }
        }
        Ok(o)
    }
}

/// Creates the backend for `agent_name` from `params` (see [`Options::from_params`]).
pub fn create(agent_name: &str, params: &Params) -> Result<Arc<dyn Backend>> {
    Ok(Arc::new(UcxBackend::new(
        agent_name,
        Options::from_params(params)?,
    )?))
}

/// The UCX backend. `Send + Sync` (see the crate docs, "Threads").
pub struct UcxBackend {
    core: Arc<Core>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UcxBackend {
    /// Loads UCX and creates a context and worker for `agent_name`.
    pub fn new(agent_name: &str, opts: Options) -> Result<UcxBackend> {
        let progress_thread = opts.progress_thread;
        let core = Arc::new(Core::new(agent_name, opts)?);
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
        Ok(UcxBackend { core, stop, thread })
    }

    /// The UCX version, transports setting and, per endpoint, the transports and lanes
    /// UCX chose (`ucp_ep_print_info`).
    pub fn describe(&self) -> String {
        self.core.describe()
    }

    /// `len` bytes of host memory allocated by UCX for this backend (zeroed). Register
    /// it with this backend like any memory: with shared-memory transports, peers then
    /// write and read it with a direct copy into UCX's shared mapping rather than
    /// software-emulated RMA, and without this backend having to progress. Over TCP it
    /// is ordinary memory.
    pub fn alloc_host(&self, len: usize) -> Result<UcxHostMemory> {
        UcxHostMemory::new(self.core.clone(), len)
    }

    /// The agent name notifications from this backend carry.
    pub fn agent_name(&self) -> &str {
        &self.core.agent
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
        Capabilities {
            local: true,
            remote: true,
            notifications: true,
            write: true,
            read: true,
            mem_kinds: MemKinds::of(&[MemKind::Dram]),
        }
    }

    unsafe fn register(&self, kind: MemKind, desc: &Descriptor) -> Result<RegistrationId> {
        self.core.register(kind, desc).map(RegistrationId)
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

    #[test]
    fn backend_is_send_sync() {
        fn check<T: Send + Sync>() {}
        check::<UcxBackend>();
        check::<Options>();
    }

    #[test]
    fn options_from_params() {
        let mut p = Params::new();
        p.insert("tls".into(), "tcp".into());
        p.insert("progress_thread".into(), "true".into());
        p.insert("cancel_grace_ms".into(), "5".into());
        p.insert("ucx.RNDV_THRESH".into(), "8k".into());
        p.insert("am_write_min".into(), "off".into());
        let o = Options::from_params(&p).unwrap();
        assert_eq!(o.am_write_min, u64::MAX);
        assert_eq!(o.tls.as_deref(), Some("tcp"));
        assert!(o.progress_thread);
        assert_eq!(o.cancel_grace, Duration::from_millis(5));
        assert_eq!(
            o.config,
            vec![("RNDV_THRESH".to_string(), "8k".to_string())]
        );
        p.insert("bogus".into(), "1".into());
        assert!(Options::from_params(&p).is_err());
        let mut p = Params::new();
        p.insert("progress_thread".into(), "maybe".into());
        assert!(matches!(
            Options::from_params(&p),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn missing_library_is_unavailable_not_a_panic() {
        let opts = Options {
            lib_path: Some("/nonexistent/libucp.so.0".into()),
            ..Default::default()
        };
        match UcxBackend::new("a", opts) {
            Err(Error::BackendUnavailable { name, reason }) => {
                assert_eq!(name, "ucx");
                assert!(reason.contains("libucx0"), "{reason}");
            }
            Err(e) => panic!("wrong error {e}"),
            Ok(_) => panic!("created a backend from a nonexistent library"),
        }
    }
}
