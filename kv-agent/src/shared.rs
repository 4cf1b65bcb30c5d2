//! The agent's options and the state every handle shares: [`Shared`] is the one `Arc`
//! that an `Agent`, its `Registration`s and `Transfer`s hold, so the agent lives (its
//! side channel served, its progress thread running) while any of them does. Dropping
//! the last handle joins every thread the agent started.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use kv_core::auth::ClusterSecret;
use kv_core::{Backend, BackendInit, Error, Notification, Result};
use parking_lot::{Mutex, RwLock};

use crate::channel::{ChannelState, Config, Service};
use crate::peers::{local_metadata, PeerId, Peers, Retired};
use crate::registry::{LoadedBackend, RegionEntry, Registry};
use crate::slow::{Deferred, Jobs};

/// The environment variable an agent reads its cluster secret from (hex) when
/// [`AgentOptions::secret`] is `None`.
pub const SECRET_ENV: &str = "KVX_SECRET";

/// Options of an [`Agent`](crate::Agent); plain struct with `Default`.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// Backend preference order by name; backends not listed come after, in the order
    /// they were added. Empty: prefer the backend with the lowest cost estimate.
    pub backend_preference: Vec<String>,
    /// Deadline of a transfer that does not set its own.
    pub default_deadline: Duration,
    /// Run a thread that drives every backend's `progress` (so transfers complete
    /// without the caller polling). Backends whose target side needs progress
    /// (`Capabilities::needs_target_progress`) are driven by such a thread whatever
    /// this says.
    pub progress_thread: bool,
    /// This incarnation's generation; `None` derives one from the clock, so a restarted
    /// agent always publishes a higher number than before.
    pub generation: Option<u64>,
    /// Timeout of side-channel connections (metadata fetch and publish).
    pub channel_timeout: Duration,
    /// The cluster secret every agent of the cluster shares: it authenticates every
    /// side-channel connection and frame, and every backend this agent creates gets it
    /// (in its [`BackendInit`]). Precedence: this field, else `KVX_SECRET` (hex) from
    /// the environment, else none — and without one the agent refuses to listen, fetch,
    /// publish or create a networked backend unless
    /// [`AgentOptions::allow_unauthenticated`] is set.
    pub secret: Option<ClusterSecret>,
    /// Run without a cluster secret: the side channel serves and accepts metadata from
    /// anyone who can reach it, and networked backends are told to accept
    /// unauthenticated peers. Anyone on the network can then read every remote key,
    /// replace a peer and move bytes in and out of registered memory: only for closed
    /// test networks. Ignored when a secret is configured.
    pub allow_unauthenticated: bool,
    /// Where the side channel and the backends this agent creates bind their listeners
    /// (in their [`BackendInit`]); default `127.0.0.1`, so nothing off-host can connect
    /// unless set. `Agent::listen` refuses other addresses (loopback is always allowed;
    /// `0.0.0.0` here allows every address).
    pub bind_ip: IpAddr,
    /// Small named values this agent publishes in its metadata (a KV layout hash, TP
    /// rank and size, …); at most `kv_core::codec::MAX_ATTRIBUTES - 1` (the agent
    /// publishes one of its own), each value at most
    /// [`kv_core::codec::MAX_ATTRIBUTE_BYTES`], names not starting with `kv-agent/`.
    /// Change them with [`Agent::set_attributes`](crate::Agent::set_attributes).
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
            allow_unauthenticated: false,
            bind_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            attributes: Vec::new(),
        }
    }
}

/// The secret an agent with options `opts` uses: `opts.secret`, else `KVX_SECRET`.
pub(crate) fn resolve_secret(opts: &AgentOptions) -> Result<Option<ClusterSecret>> {
    if let Some(s) = &opts.secret {
        return Ok(Some(s.clone()));
    }
    match std::env::var(SECRET_ENV) {
        Ok(hex) if !hex.trim().is_empty() => ClusterSecret::from_hex(&hex)
            .map(Some)
            .map_err(|e| Error::invalid_argument(format!("{SECRET_ENV}: {e}"))),
        _ => Ok(None),
    }
}

/// The thread that drives backends' progress, and the backends it drives.
struct Driver {
    stop: Arc<AtomicBool>,
    backends: Arc<RwLock<Vec<Arc<dyn Backend>>>>,
    thread: Option<JoinHandle<()>>,
}

/// Everything one agent owns.
pub(crate) struct Shared {
    pub(crate) name: String,
    pub(crate) generation: u64,
    /// The options, with `secret` resolved (see [`resolve_secret`]).
    pub(crate) opts: AgentOptions,
    /// Shared with helper jobs, which hold it (never the whole agent) while they run:
    /// a job can then never drop the agent's last reference, so the agent's drop always
    /// runs on a thread that can join every helper.
    pub(crate) registry: Arc<Registry>,
    pub(crate) peers: Peers,
    pub(crate) channel: ChannelState,
    /// The attributes this agent publishes (starts as `opts.attributes`).
    pub(crate) attributes: RwLock<Vec<(String, Bytes)>>,
    driver: Mutex<Option<Driver>>,
    jobs: Jobs,
}

impl Drop for Shared {
    fn drop(&mut self) {
        if let Some(mut d) = self.driver.get_mut().take() {
            d.stop.store(true, Ordering::Release);
            if let Some(t) = d.thread.take() {
                let _ = t.join();
            }
        }
        // Helper jobs first, while everything they might touch is still whole (they hold
        // only the registry, so this drop never runs on one of them); `channel` joins its
        // threads as it drops.
        self.jobs.join_all();
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
            registry: Arc::default(),
            peers: Peers::default(),
            channel: Default::default(),
            driver: Mutex::new(None),
            jobs: Jobs::default(),
        }
    }

    /// Refuses `what` (a networked part) without a cluster secret unless the options
    /// opt out.
    pub(crate) fn require_secret(&self, what: &str) -> Result<()> {
        if self.opts.secret.is_some() || self.opts.allow_unauthenticated {
            return Ok(());
        }
        Err(Error::invalid_argument(format!(
            "{what} needs a cluster secret: set AgentOptions::secret or {SECRET_ENV}=<hex> to \
             the same value on every agent (e.g. ClusterSecret::generate()?.to_hex()), or set \
             AgentOptions::allow_unauthenticated on a closed test network"
        )))
    }

    /// Whether backends must be told to run without authentication.
    pub(crate) fn unauthenticated(&self) -> bool {
        self.opts.secret.is_none() && self.opts.allow_unauthenticated
    }

    /// How the side channel authenticates and bounds its connections.
    pub(crate) fn channel_config(&self) -> Config {
        Config {
            agent: self.name.clone(),
            secret: self.opts.secret.clone(),
            timeout: self.opts.channel_timeout,
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

    /// Adds a backend; drives it from the progress thread if the options ask for one or
    /// its target side needs progress.
    pub(crate) fn add_backend(&self, backend: Arc<dyn Backend>) -> Result<()> {
        let target = backend.capabilities().needs_target_progress;
        self.registry.add_backend(backend.clone())?;
        if self.opts.progress_thread || target {
            self.drive(backend)?;
        }
        Ok(())
    }

    /// Starts the progress thread if needed and adds `backend` to what it drives.
    fn drive(&self, backend: Arc<dyn Backend>) -> Result<()> {
        let mut driver = self.driver.lock();
        if driver.is_none() {
            let stop = Arc::new(AtomicBool::new(false));
            let backends = Arc::new(RwLock::new(Vec::new()));
            let (s, b) = (stop.clone(), backends.clone());
            let thread = std::thread::Builder::new()
                .name(format!("kv-agent-progress-{}", self.name))
                .spawn(move || progress_loop(&s, &b))
                .map_err(|e| Error::io("starting the progress thread", e))?;
            *driver = Some(Driver {
                stop,
                backends,
                thread: Some(thread),
            });
        }
        if let Some(d) = driver.as_ref() {
            d.backends.write().push(backend);
        }
        Ok(())
    }

    /// Loads a peer's metadata (full or partial); `from` is the name the sender
    /// authenticated as, if it came over the side channel. A replaced generation is
    /// disconnected on a helper thread.
    pub(crate) fn load_remote(
        self: &Arc<Self>,
        bytes: &[u8],
        from: Option<&str>,
    ) -> Result<PeerId> {
        self.peers
            .load(&self.registry, bytes, from, &|r| self.retire_later(r))
    }

    /// Forgets a peer; its connections are closed on a helper thread.
    pub(crate) fn invalidate(self: &Arc<Self>, peer: PeerId) -> Result<()> {
        let retired = self.peers.invalidate(peer)?;
        self.retire_later(retired);
        Ok(())
    }

    fn retire_later(&self, r: Retired) -> Deferred<()> {
        self.defer(move |registry| r.run(registry))
    }

    /// Runs `f` on a helper thread (slow backend calls that must not block a caller
    /// that was promised a prompt answer). The job gets the registry, not the agent: it
    /// must not keep the agent alive (see [`Shared::registry`]).
    pub(crate) fn defer<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Registry) -> T + Send + 'static,
    ) -> Deferred<T> {
        let registry = self.registry.clone();
        self.jobs.run(move || f(&registry))
    }

    /// Ends one pin of `r` like `Registry::unpin`, but runs a deregistration that is
    /// due on a helper thread.
    pub(crate) fn unpin_later(self: &Arc<Self>, r: &Arc<RegionEntry>) {
        if self.registry.release_pin(r) {
            let r = r.clone();
            self.defer(move |registry| registry.deregister_now(&r));
        }
    }

    /// Drives every backend once; returns the number of events handled.
    pub(crate) fn progress(&self) -> Result<usize> {
        let mut n = 0;
        for b in self.registry.backends.read().iter() {
            n += b.backend.progress()?;
        }
        Ok(n)
    }

    /// Drives `own` (a transfer's backend, unless the progress thread does) and every
    /// backend whose target side needs progress.
    pub(crate) fn progress_for_wait(&self, own: &LoadedBackend) -> Result<()> {
        if !self.opts.progress_thread {
            own.backend.progress()?;
        }
        for b in self.registry.backends.read().iter() {
            if b.name != own.name && b.backend.capabilities().needs_target_progress {
                b.backend.progress()?;
            }
        }
        Ok(())
    }

    /// Drains every backend's notifications, driving first those whose target side
    /// needs progress (their peers' data and notifications land only then).
    pub(crate) fn notifications(&self) -> Result<Vec<Notification>> {
        let mut out = Vec::new();
        for b in self.registry.backends.read().iter() {
            if b.backend.capabilities().needs_target_progress {
                b.backend.progress()?;
            }
            b.backend.drain_notifications(&mut out)?;
        }
        Ok(out)
    }
}

impl Service for Shared {
    fn metadata(&self) -> Result<Bytes> {
        Shared::metadata(self, None)
    }

    fn load(self: &Arc<Self>, meta: &[u8], from: Option<&str>) -> Result<()> {
        self.load_remote(meta, from).map(|_| ())
    }
}

/// The progress thread's body: drives `backends` until `stop` is set.
fn progress_loop(stop: &AtomicBool, backends: &RwLock<Vec<Arc<dyn Backend>>>) {
    let mut idle = 0u32;
    while !stop.load(Ordering::Acquire) {
        let list = backends.read().clone();
        let n: usize = list.iter().map(|b| b.progress().unwrap_or(0)).sum();
        drop(list);
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
