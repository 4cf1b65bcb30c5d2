//! The agent's options and the state every handle shares: [`Shared`] is the one `Arc`
//! that an `Agent`, its `Registration`s and `Transfer`s hold, so the agent lives (its
//! side channel served, its progress thread running) while any of them does.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use kv_core::Result;

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
}

impl Default for AgentOptions {
    fn default() -> Self {
        AgentOptions {
            backend_preference: Vec::new(),
            default_deadline: Duration::from_secs(30),
            progress_thread: false,
            generation: None,
            channel_timeout: Duration::from_secs(5),
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
            opts,
            registry: Registry::default(),
            peers: Peers::default(),
            channel: Default::default(),
            stop: AtomicBool::new(false),
        }
    }

    /// This agent's metadata: full (`regions: None`) or naming only `regions`.
    pub(crate) fn metadata(&self, regions: Option<Vec<Arc<RegionEntry>>>) -> Result<Bytes> {
        local_metadata(&self.name, self.generation, &self.registry, regions)
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
