//! The libfabric backend of kvx: one-sided `fi_write`/`fi_read` between registered
//! memory over an `FI_EP_RDM` endpoint, with notifications as messages after the data.
//!
//! `libfabric.so.1` is opened at run time (`KV_FABRIC_LIB` overrides the path), so the
//! crate builds and links without libfabric; where it is missing, [`create`] fails with
//! [`kv_core::Error::BackendUnavailable`]. The provider is chosen at run time: the
//! `provider` option, else `FI_PROVIDER`, else `verbs;ofi_rxm`, `efa`, `tcp;ofi_rxm`
//! (never `sockets`); `shm` is selectable for peers on one host.
//!
//! ```no_run
//! use kv_backend_libfabric::{create, Options};
//! use kv_core::Params;
//!
//! let mut params = Params::new();
//! params.insert("provider".into(), "tcp;ofi_rxm".into());
//! params.insert("node".into(), "127.0.0.1".into());
//! let backend = create(&kv_core::BackendInit::new("prefill-0"), &params)?;
//! let info = backend.connection_info()?; // hand this to the peer's `connect`
//! assert_eq!(backend.name(), "libfabric");
//! # let _ = (info, Options::default());
//! # Ok::<(), kv_core::Error>(())
//! ```
#![warn(missing_docs)]

mod endpoint;
mod fabric;
mod ffi;
mod memory;
mod progress;
mod request;
mod wire;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kv_core::{
    check_request_shape, Access, Backend, BackendInit, Capabilities, Descriptor, EndpointId, Error,
    MemKind, MemKinds, Notification, Params, PostOptions, RegistrationId, RemoteId, Result, Status,
    TransferId, TransferRequest,
};
use parking_lot::Mutex;

use endpoint::Peer;
use fabric::Fabric;
use memory::{Registration, Remote};
use progress::State;
use request::{Addressing, Transfer};
use wire::{ConnectionInfo, RemoteKey};

pub use fabric::DEFAULT_PROVIDERS;

/// Options of the libfabric backend. `Clone`, `Send + Sync`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Provider to use (`tcp;ofi_rxm`, `shm`, `verbs;ofi_rxm`, `efa`); param `provider`.
    /// `None`: `FI_PROVIDER`, else [`DEFAULT_PROVIDERS`] in order.
    pub provider: Option<String>,
    /// Local address to bind (`127.0.0.1`), passed to `fi_getinfo` with `FI_SOURCE`;
    /// param `node`.
    pub node: Option<String>,
    /// Deadline for posts that carry none, for notifications and for `cancel`;
    /// param `timeout_ms`.
    pub timeout: Duration,
    /// Path of `libfabric.so.1` (else `KV_FABRIC_LIB`, else the loader's search);
    /// param `library`.
    pub library: Option<String>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            provider: None,
            node: None,
            timeout: Duration::from_secs(30),
            library: None,
        }
    }
}

impl Options {
    /// Reads `provider`, `node`, `timeout_ms` and `library`; unknown keys are refused.
    pub fn from_params(params: &Params) -> Result<Options> {
        let mut o = Options::default();
        for (k, v) in params {
            match k.as_str() {
                "provider" => o.provider = Some(v.clone()).filter(|s| !s.is_empty()),
                "node" => o.node = Some(v.clone()).filter(|s| !s.is_empty()),
                "library" => o.library = Some(v.clone()).filter(|s| !s.is_empty()),
                "timeout_ms" => {
                    let ms: u64 = v.parse().map_err(|_| {
                        Error::invalid_argument(format!("timeout_ms={v:?} is not a number"))
                    })?;
                    o.timeout = Duration::from_millis(ms.max(1));
                }
                _ => {
                    return Err(Error::invalid_argument(format!(
                        "unknown libfabric parameter {k:?} (known: provider, node, timeout_ms, library)"
                    )))
                }
            }
        }
        Ok(o)
    }
}

/// Creates the backend for the agent `init` names from `params` (see [`Options`]).
pub fn create(init: &BackendInit, params: &Params) -> Result<Arc<dyn Backend>> {
    Ok(Arc::new(FabricBackend::new(
        init,
        Options::from_params(params)?,
    )?))
}

/// The libfabric backend. `Send + Sync`: all state sits behind one mutex, which also
/// serialises every libfabric call (the domain is opened `FI_THREAD_DOMAIN`).
pub struct FabricBackend {
    /// The agent name, cluster secret and bind address it was created with (the secret
    /// and bind address are not used yet).
    init: BackendInit,
    timeout: Duration,
    state: Mutex<State>,
}

impl std::fmt::Debug for FabricBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FabricBackend")
            .field("agent", &self.init.agent_name)
            .field("provider", &self.state.lock().fabric.provider)
            .finish_non_exhaustive()
    }
}

impl FabricBackend {
    /// Opens libfabric and an endpoint for the agent `init` names.
    pub fn new(init: &BackendInit, opts: Options) -> Result<FabricBackend> {
        let agent_name = init.agent_name.as_str();
        if agent_name.len() > wire::MAX_NAME {
            return Err(Error::invalid_argument("agent name longer than 1024 bytes"));
        }
        let lib = ffi::Lib::open(opts.library.as_deref())?;
        let fabric = Fabric::open(lib, opts.provider.as_deref(), opts.node.as_deref())?;
        Ok(FabricBackend {
            init: init.clone(),
            timeout: opts.timeout,
            state: Mutex::new(State::open(agent_name, fabric)?),
        })
    }

    /// The provider in use (`tcp;ofi_rxm`, `shm`, …).
    pub fn provider(&self) -> String {
        self.state.lock().fabric.provider.clone()
    }

    /// The `FI_MR_*` mode bits the provider asked for.
    pub fn mr_mode(&self) -> i32 {
        self.state.lock().fabric.mr_mode
    }
}

#[allow(unsafe_code)]
impl Backend for FabricBackend {
    fn name(&self) -> &str {
        "libfabric"
    }

    fn capabilities(&self) -> Capabilities {
        let mut c = Capabilities::default();
        c.local = true;
        c.remote = true;
        c.notifications = true;
        c.write = true;
        c.read = true;
        c.mem_kinds = MemKinds::of(&[MemKind::Dram]);
        // No thread of its own: the target's completion queue (notifications, and the
        // software RMA of providers like ofi_rxm) is read only inside `progress()`.
        c.needs_target_progress = true;
        // Not authenticated and no read-only registrations yet (the defaults).
        c
    }

    unsafe fn register(
        &self,
        kind: MemKind,
        desc: &Descriptor,
        access: Access,
    ) -> Result<RegistrationId> {
        if access == Access::ReadOnly {
            return Err(Error::Unsupported(
                "libfabric: read-only registrations not supported yet".into(),
            ));
        }
        if kind != MemKind::Dram {
            return Err(Error::Unsupported(format!(
                "libfabric registers dram, not {kind}"
            )));
        }
        if desc.len == 0 || desc.end().is_none() || desc.len > usize::MAX as u64 {
            return Err(Error::invalid_argument(format!("cannot register {desc:?}")));
        }
        let mut s = self.state.lock();
        let id = s.id();
        // SAFETY: the caller promises the range stays valid until deregister, which
        // closes the region first.
        let mr = unsafe { s.fabric.register(desc.addr, desc.len as usize, id)? };
        let key = if s.fabric.prov_key() { mr.key() } else { id };
        s.regs.insert(
            id,
            Registration {
                desc: *desc,
                key,
                mr: Some(mr),
                busy: 0,
            },
        );
        Ok(RegistrationId(id))
    }

    fn deregister(&self, id: RegistrationId) -> Result<()> {
        let mut s = self.state.lock();
        let r = s
            .regs
            .get(id.0)
            .ok_or_else(|| Error::NotRegistered(format!("{id}")))?;
        if r.busy > 0 {
            return Err(Error::Busy(format!(
                "{id} is named by {} transfer(s) in progress; wait or cancel them first",
                r.busy
            )));
        }
        if let Some(mut r) = s.regs.remove(id.0) {
            if let Some(mr) = r.mr.take() {
                s.fabric.close_mr(mr);
            }
        }
        Ok(())
    }

    fn remote_key(&self, id: RegistrationId) -> Result<Bytes> {
        let s = self.state.lock();
        let r = s
            .regs
            .get(id.0)
            .ok_or_else(|| Error::NotRegistered(format!("{id}")))?;
        Ok(r.remote_key().encode())
    }

    fn connection_info(&self) -> Result<Bytes> {
        let s = self.state.lock();
        ConnectionInfo {
            agent: self.init.agent_name.clone(),
            provider: s.fabric.provider.clone(),
            address: s.fabric.address.clone(),
        }
        .encode()
    }

    fn connect(&self, peer_name: &str, info: &[u8]) -> Result<EndpointId> {
        let info = ConnectionInfo::decode(info)?;
        let mut s = self.state.lock();
        if info.provider != s.fabric.provider {
            return Err(Error::Unsupported(format!(
                "peer {peer_name} uses provider {:?}, this backend {:?}; choose the same provider on both",
                info.provider, s.fabric.provider
            )));
        }
        let addr = s.fabric.insert(&info.address)?;
        let id = s.id();
        let name = if peer_name.is_empty() {
            info.agent.clone()
        } else {
            peer_name.to_string()
        };
        s.peers.insert(id, Peer::new(name, addr, info.address));
        Ok(EndpointId(id))
    }

    fn disconnect(&self, peer: EndpointId) -> Result<()> {
        self.state.lock().disconnect(peer)
    }

    fn import_remote(
        &self,
        peer: EndpointId,
        kind: MemKind,
        desc: &Descriptor,
        key: &[u8],
    ) -> Result<RemoteId> {
        if kind != MemKind::Dram {
            return Err(Error::Unsupported(format!(
                "libfabric addresses dram, not {kind}"
            )));
        }
        let key = RemoteKey::decode(key)?;
        if key.base != desc.addr || key.len != desc.len {
            return Err(Error::invalid_metadata(format!(
                "remote key is for {:#x}+{}, the descriptor says {:#x}+{}",
                key.base, key.len, desc.addr, desc.len
            )));
        }
        let mut s = self.state.lock();
        if !s.peers.contains_key(&peer.0) {
            return Err(Error::NotRegistered(format!("{peer}")));
        }
        let id = s.id();
        s.remotes.insert(
            id,
            Remote {
                peer: peer.0,
                desc: *desc,
                key,
            },
        );
        Ok(RemoteId(id))
    }

    fn release_remote(&self, id: RemoteId) -> Result<()> {
        self.state
            .lock()
            .remotes
            .remove(&id.0)
            .map(|_| ())
            .ok_or_else(|| Error::NotRegistered(format!("{id}")))
    }

    fn prepare(&self, req: &TransferRequest) -> Result<TransferId> {
        check_request_shape(req)?;
        if req.local_kind != MemKind::Dram || req.remote_kind != MemKind::Dram {
            return Err(Error::Unsupported("libfabric moves dram only".into()));
        }
        let mut s = self.state.lock();
        if !s.peers.contains_key(&req.peer.0) {
            return Err(Error::NotRegistered(format!("{}", req.peer)));
        }
        let remotes: Vec<&Remote> = s
            .remotes
            .values()
            .filter(|r| r.peer == req.peer.0)
            .collect();
        let how = Addressing {
            virt: s.fabric.virt_addr(),
            local_mr: s.fabric.local_mr(),
            max: s.fabric.max_msg_size as u64,
        };
        let plan = request::plan(req, &s.regs, &remotes, how)?;
        let flush_desc = if how.local_mr {
            s.flush.desc() as usize
        } else {
            0
        };
        let flush = request::flush_seg(req.op, &plan.segs, s.flush.buf(0) as u64, flush_desc);
        let id = s.id();
        let t = Transfer::new(req.op, req.peer.0, plan, flush, self.timeout);
        s.transfers.insert(id, t);
        Ok(TransferId(id))
    }

    unsafe fn post(&self, id: TransferId, opts: &PostOptions) -> Result<()> {
        if let Some(p) = &opts.notification {
            wire::check_payload(p.len())?;
        }
        self.state.lock().post(id, opts, self.timeout)
    }

    fn poll(&self, id: TransferId) -> Status {
        match self.state.lock().transfers.get(&id.0) {
            Some(t) => t.status.clone(),
            None => Status::Failed(Error::invalid_argument(format!(
                "{id} is released or unknown"
            ))),
        }
    }

    fn cancel(&self, id: TransferId) -> Result<()> {
        let end = Instant::now() + self.timeout;
        if !self.state.lock().start_cancel(id)? {
            return Ok(());
        }
        // Drain until the provider gave back every posted operation.
        loop {
            if !self.state.lock().still_running(id.0) {
                return Ok(());
            }
            if Instant::now() > end {
                return Err(Error::TimedOut {
                    what: format!("cancel of {id} (the provider still holds its buffers)"),
                    after: self.timeout,
                });
            }
            std::thread::yield_now();
        }
    }

    fn release(&self, id: TransferId) -> Result<()> {
        let mut s = self.state.lock();
        match s.transfers.get(&id.0) {
            None => Err(Error::NotRegistered(format!("{id}"))),
            Some(t) if matches!(t.status, Status::InProgress) => {
                Err(Error::Busy(format!("{id} is in progress; cancel it first")))
            }
            Some(_) => {
                s.transfers.remove(&id.0);
                Ok(())
            }
        }
    }

    fn progress(&self) -> Result<usize> {
        self.state.lock().progress()
    }

    fn notify(&self, peer: EndpointId, payload: Bytes) -> Result<()> {
        wire::check_payload(payload.len())?;
        self.state.lock().notify(peer, payload)
    }

    fn drain_notifications(&self, out: &mut Vec<Notification>) -> Result<usize> {
        Ok(self.state.lock().drain_inbox(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_is_send_sync() {
        fn check<T: Send + Sync>() {}
        check::<FabricBackend>();
        check::<Options>();
    }

    #[test]
    fn options_from_params() {
        let mut p = Params::new();
        p.insert("provider".into(), "shm".into());
        p.insert("timeout_ms".into(), "250".into());
        let o = Options::from_params(&p).unwrap();
        assert_eq!(o.provider.as_deref(), Some("shm"));
        assert_eq!(o.timeout, Duration::from_millis(250));
        p.insert("timeout_ms".into(), "soon".into());
        assert!(matches!(
            Options::from_params(&p),
            Err(Error::InvalidArgument(_))
        ));
        let mut q = Params::new();
        q.insert("colour".into(), "blue".into());
        assert!(Options::from_params(&q).is_err());
    }

    #[test]
    fn connect_refuses_another_provider_and_garbage() {
        let open = |prov: &str| {
            let mut p = Params::new();
            p.insert("provider".into(), prov.into());
            kv_core::require_or_skip(
                "libfabric",
                FabricBackend::new(&BackendInit::new("t"), Options::from_params(&p)?),
            )
            .map(Ok)
            .unwrap_or(Err(Error::Canceled))
        };
        let (Ok(shm), Ok(tcp)) = (open("shm"), open("tcp;ofi_rxm")) else {
            return;
        };
        assert_eq!(shm.provider(), "shm");
        let e = shm.connect("tcp-peer", &tcp.connection_info().unwrap());
        assert!(matches!(e, Err(Error::Unsupported(_))), "{e:?}");
        let mut info = shm.connection_info().unwrap().to_vec();
        info[6] ^= 0x40;
        assert!(matches!(
            shm.connect("x", &info),
            Err(Error::InvalidMetadata(_))
        ));
    }
}
