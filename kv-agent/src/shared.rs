//! The agent's options and the state every handle shares: [`Shared`] is the one `Arc`
//! that an `Agent`, its `Registration`s and `Transfer`s hold, so the agent lives (its
//! side channel served, its progress thread running) while any of them does.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use kv_core::auth::ClusterSecret;
use kv_core::{BackendInit, Result};
use parking_lot::RwLock;

use crate::channel::{ChannelState, Service};
use crate::peers::{local_metadata, PeerId, Peers};
use crate::registry::{RegionEntry, Registry};

/// Options of an [`Agent`](crate::Agent); plain struct with `Default`.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// Backend preference order by name; backends not listed come after, in the order
    /// they were added. Empty: prefer the backend with the lowest cost estimate.
    pub backend_preference: Vec<String>,
    /// Deadline of a transfer that does not set its own.
    pub default_deadline: Duration,
    /// Run a thread that drives every backend's `progress` (so transfers complete
    /// without the caller polling).
    pub progress_thread: bool,
    /// This incarnation's generation; `None` derives one from the clock, so a restarted
    /// agent always publishes a higher number than before.
    pub generation: Option<u64>,
    /// Timeout of side-channel connections (metadata fetch and publish).
    pub channel_timeout: Duration,
    /// The cluster secret handed to every backend this agent creates (in its
    /// [`BackendInit`]); backends that authenticate their connections use it. `None`
    /// (the default): unauthenticated. The side channel does not use it yet.
    pub secret: Option<ClusterSecret>,
    /// Where the backends this agent creates bind their listeners (in their
    /// [`BackendInit`]); default `127.0.0.1`, so nothing off-host can connect unless set.
    pub bind_ip: IpAddr,
    /// Small named values this agent publishes in its metadata (a KV layout hash, TP
    /// rank and size, …); at most [`kv_core::codec::MAX_ATTRIBUTES`], each value at
    /// most [`kv_core::codec::MAX_ATTRIBUTE_BYTES`]. Change them with
    /// [`Agent::set_attributes`](crate::Agent::set_attributes).
    pub attributes: Vec<(String, Bytes)>,
}

impl Default for AgentOptions {
    fn default() -> Self {
        AgentOptions {
            backend_preference: Vec::new(),
            default_deadline: Duration::from_secs(30),
            progress_thread: false,
            generation: None,
            channel_timeout: Duration::from_secs(5),
            secret: None,
            bind_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            attributes: Vec::new(),
        }
    }
}

/// Everything one agent owns.
pub(crate) struct Shared {
    pub(crate) name: String,
    pub(crate) generation: u64,
    pub(crate) opts: AgentOptions,
    pub(crate) registry: Registry,
    pub(crate) peers: Peers,
    pub(crate) channel: ChannelState,
    /// The attributes this agent publishes (starts as `opts.attributes`).
    pub(crate) attributes: RwLock<Vec<(String, Bytes)>>,
    stop: AtomicBool,
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Shared {
    /// The state of a new agent; nothing loaded, registered or served yet.
    pub(crate) fn new(name: &str, generation: u64, opts: AgentOptions) -> Shared {
        Shared {
            name: name.to_string(),
            generation,
            attributes: RwLock::new(opts.attributes.clone()),
            opts,
            registry: Registry::default(),
            peers: Peers::default(),
            channel: Default::default(),
            stop: AtomicBool::new(false),
        }
    }

    /// This agent's metadata: full (`regions: None`) or naming only `regions`.
    pub(crate) fn metadata(&self, regions: Option<Vec<Arc<RegionEntry>>>) -> Result<Bytes> {
        let attributes = self.attributes.read().clone();
        local_metadata(
            &self.name,
            self.generation,
            attributes,
            &self.registry,
            regions,
        )
    }

    /// The context every backend this agent creates gets: its name, the cluster
    /// secret and the bind address from the options.
    pub(crate) fn backend_init(&self) -> BackendInit {
        let mut init = BackendInit::new(self.name.clone()).with_bind_ip(self.opts.bind_ip);
        init.secret = self.opts.secret.clone();
        init
    }

    /// Loads a peer's metadata (full or partial).
    pub(crate) fn load_remote(&self, bytes: &[u8]) -> Result<PeerId> {
        self.peers.load(&self.registry, bytes)
    }

    /// Drives every backend once; returns the number of events handled.
    pub(crate) fn progress(&self) -> Result<usize> {
        let mut n = 0;
        for b in self.registry.backends.read().iter() {
            n += b.backend.progress()?;
        }
        Ok(n)
    }
}

impl Service for Shared {
    fn metadata(&self) -> Result<Bytes> {
        Shared::metadata(self, None)
    }

    fn load(&self, meta: &[u8]) -> Result<()> {
        self.load_remote(meta).map(|_| ())
    }
}

/// The progress thread's body: drives every backend until the agent is dropped.
pub(crate) fn progress_loop(weak: Weak<Shared>) {
    let mut idle = 0u32;
    loop {
        let Some(shared) = weak.upgrade() else { return };
        if shared.stop.load(Ordering::Relaxed) {
            return;
        }
        let n = shared.progress().unwrap_or(0);
        drop(shared);
        if n == 0 {
            idle = idle.saturating_add(1);
            // Spin briefly after activity, then back off to 1 ms.
            if idle > 100 {
                std::thread::sleep(Duration::from_millis(1));
            } else {
                std::thread::yield_now();
            }
        } else {
            idle = 0;
        }
    }
}
