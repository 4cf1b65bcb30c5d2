//! Backends the agent creates by name: the in-tree ones (one cargo feature each) and
//! those third-party crates register with [`register_backend_factory`], each with its
//! documented parameters ([`backend_params`]).

use std::sync::{Arc, RwLock};

use kv_core::{Backend, BackendFactory, BackendInit, Error, Params, Result};

/// One parameter a backend takes in [`crate::Agent::add_backend`]: its name, default
/// and what it does (as NIXL's `get_plugin_params`). `Clone`, `Send + Sync`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamDoc {
    /// The key in [`Params`].
    pub name: String,
    /// The value used when the key is absent (or how it is derived).
    pub default: String,
    /// One line on what it does.
    pub doc: String,
}

impl ParamDoc {
    /// A parameter `name` with its `default` and a one-line `doc`.
    pub fn new(name: &str, default: &str, doc: &str) -> ParamDoc {
        ParamDoc {
            name: name.into(),
            default: default.into(),
            doc: doc.into(),
        }
    }
}

/// A backend known by name.
struct Entry {
    name: String,
    factory: BackendFactory,
    params: Vec<ParamDoc>,
}

/// Backends third-party crates registered, in registration order.
static PLUGINS: RwLock<Vec<Entry>> = RwLock::new(Vec::new());

const BUILT_IN: &[(&str, BackendFactory)] = &[
    #[cfg(feature = "tcp")]
    ("tcp", kv_backend_tcp::create),
    #[cfg(feature = "ucx")]
    ("ucx", kv_backend_ucx::create),
    #[cfg(feature = "libfabric")]
    ("libfabric", kv_backend_libfabric::create),
    #[cfg(feature = "gds")]
    ("gds", kv_backend_gds::create),
];

/// What an in-tree backend is told when the agent runs without a cluster secret
/// ([`crate::AgentOptions::allow_unauthenticated`]): the parameter that makes it accept
/// unauthenticated peers instead of refusing to start.
const UNAUTHENTICATED_OPT_OUT: &[(&str, &str, &str)] = &[
    ("tcp", "insecure", "true"),
    ("ucx", "insecure", "true"),
    ("libfabric", "insecure", "true"),
];

/// Makes [`crate::Agent::add_backend`]`(name, params)` create backends with `factory`,
/// as it does the in-tree ones, in every agent of this process. Fails with
/// [`Error::InvalidArgument`] for an in-tree name or one already registered.
pub fn register_backend_factory(name: &str, factory: BackendFactory) -> Result<()> {
    if name.is_empty() || BUILT_IN.iter().any(|(n, _)| *n == name) {
        return Err(Error::invalid_argument(format!(
            "backend name {name:?} is empty or an in-tree backend's"
        )));
    }
    let mut plugins = PLUGINS.write().unwrap_or_else(|e| e.into_inner());
    if plugins.iter().any(|e| e.name == name) {
        return Err(Error::invalid_argument(format!(
            "a backend factory named {name:?} is already registered"
        )));
    }
    plugins.push(Entry {
        name: name.into(),
        factory,
        params: Vec::new(),
    });
    Ok(())
}

/// Documents the parameters of the registered third-party backend `name` (what
/// [`backend_params`] returns for it).
pub fn register_backend_params(name: &str, params: Vec<ParamDoc>) -> Result<()> {
    let mut plugins = PLUGINS.write().unwrap_or_else(|e| e.into_inner());
    let e = plugins.iter_mut().find(|e| e.name == name).ok_or_else(|| {
        Error::invalid_argument(format!("no backend factory named {name:?} is registered"))
    })?;
    e.params = params;
    Ok(())
}

/// The parameters backend `name` takes, with defaults and docs; fails with
/// [`Error::BackendUnavailable`] for a name this process does not know.
pub fn backend_params(name: &str) -> Result<Vec<ParamDoc>> {
    if BUILT_IN.iter().any(|(n, _)| *n == name) {
        return Ok(built_in_params(name));
    }
    let plugins = PLUGINS.read().unwrap_or_else(|e| e.into_inner());
    match plugins.iter().find(|e| e.name == name) {
        Some(e) => Ok(e.params.clone()),
        None => Err(unknown(name)),
    }
}

/// Names of the backends this process can create: in-tree, then registered.
pub(crate) fn known() -> Vec<String> {
    let mut v: Vec<String> = BUILT_IN.iter().map(|(n, _)| n.to_string()).collect();
    let plugins = PLUGINS.read().unwrap_or_else(|e| e.into_inner());
    v.extend(plugins.iter().map(|e| e.name.clone()));
    v
}

fn unknown(name: &str) -> Error {
    Error::BackendUnavailable {
        name: name.into(),
        reason: format!(
            "unknown backend; this process knows [{}] (a third-party backend must be \
             registered with kv_agent::register_backend_factory first)",
            known().join(", ")
        ),
    }
}

/// Creates backend `name`; `unauthenticated` adds the opt-out parameter an in-tree
/// backend needs to start without a cluster secret.
pub(crate) fn create(
    name: &str,
    init: &BackendInit,
    params: &Params,
    unauthenticated: bool,
) -> Result<Arc<dyn Backend>> {
    if let Some((_, f)) = BUILT_IN.iter().find(|(n, _)| *n == name) {
        let mut params = params.clone();
        if unauthenticated {
            for (_, k, v) in UNAUTHENTICATED_OPT_OUT
                .iter()
                .filter(|(b, _, _)| *b == name)
            {
                params.entry(k.to_string()).or_insert_with(|| v.to_string());
            }
        }
        return f(init, &params);
    }
    let factory = {
        let plugins = PLUGINS.read().unwrap_or_else(|e| e.into_inner());
        plugins.iter().find(|e| e.name == name).map(|e| e.factory)
    };
    match factory {
        Some(f) => f(init, params),
        None => Err(unknown(name)),
    }
}

/// The documented parameters of in-tree backend `name` (kept beside each backend's
/// `Options::from_params`; `tests/backend_params.rs` checks every name is accepted).
fn built_in_params(name: &str) -> Vec<ParamDoc> {
    let p = ParamDoc::new;
    match name {
        "tcp" => vec![
            p("listen", "<bind_ip>:0", "listener address (ip:port)"),
            p("advertise", "the listener's address", "address (ip or ip:port) published to peers"),
            p("connections", "min(cores, 4)", "data connections and worker threads per peer (1..=64)"),
            p("same_host", "true", "use shared memory / cross-memory attach for peers on this host"),
            p("connect_timeout_ms", "5000", "longest wait for a connection and its handshake"),
            p("io_timeout_ms", "10000", "longest time a peer may make no progress in a frame"),
            p("max_notification", "65536", "largest notification payload in bytes"),
            p("max_frame", "4194304", "largest payload of one frame in bytes"),
            p("inline_max", "4194304", "same-host transfers up to this size run inside post"),
            p("max_connections", "256", "most incoming connections served at once"),
            p("max_inbox", "65536", "most received notifications waiting to be drained"),
            p("max_inbox_bytes", "67108864", "most notification bytes waiting to be drained"),
            p("handshake_timeout_ms", "3000", "how long a new connection has to authenticate"),
            p("max_pending", "64", "most connections still in their handshake (the oldest is closed first)"),
            p("insecure", "unset: unauthenticated only on loopback", "true: run without a cluster secret (closed test networks); false: always require one"),
        ],
        "ucx" => vec![
            p("tls", "UCX_TLS or UCX's default", "transports UCX may use (UCX_TLS syntax: tcp, posix,cma,self)"),
            p("lib", "KV_UCX_LIB, else the loader's path", "path of libucp.so.0"),
            p("progress_thread", "false", "run a thread that drives UCX progress"),
            p("max_notification", "1048576", "largest notification payload accepted in bytes"),
            p("cancel_grace_ms", "100", "how long cancel waits for UCX before force-closing the endpoint"),
            p("rndv_min", "524288 over TCP lanes, else 65536", "pieces of at least this many bytes go alone by rendezvous; smaller ones are batched into eager messages"),
            p("max_inbox", "65536", "most received notifications waiting to be drained"),
            p("max_inbox_bytes", "67108864", "most notification bytes waiting to be drained"),
            p("max_connections", "512", "most TCP connections UCX keeps accepted (the quietest beyond it are shut down)"),
            p("insecure", "unset: unauthenticated only on loopback", "true: run without a cluster secret (closed test networks); false: always require one"),
            p("ucx.<NAME>", "UCX's (TCP segments 1M)", "any UCX setting without the UCX_ prefix, e.g. ucx.RNDV_THRESH=8k"),
        ],
        "libfabric" => vec![
            p("provider", "FI_PROVIDER, else tcp;ofi_rxm, shm, ...", "provider to use (tcp;ofi_rxm, shm, verbs;ofi_rxm, efa)"),
            p("node", "any", "local address to bind, passed to fi_getinfo with FI_SOURCE"),
            p("timeout_ms", "30000", "deadline of posts that carry none, of notifications and of cancel"),
            p("library", "KV_FABRIC_LIB, else the loader's path", "path of libfabric.so.1"),
            p("max_inbox", "65536", "most received notifications waiting to be drained (then senders wait)"),
            p("max_inbox_bytes", "67108864", "most notification bytes waiting to be drained"),
            p("insecure", "unset: unauthenticated only on shm or loopback", "true: run without a cluster secret (closed test networks); false: always require one"),
        ],
        "gds" => vec![
            p("engine", "auto", "auto, uring or threads"),
            p("queue_depth", "64", "requests in flight at most (1..=4096)"),
            p("max_io_size", "1048576", "pieces larger than this are split (4 KiB..=1 GiB)"),
            p("submit_batch", "4", "io_uring: queued requests go to the kernel once this many wait"),
            p("bounce", "false", "let unaligned O_DIRECT pieces go through aligned bounce buffers"),
            p("threads", "8", "worker threads of the thread-pool engine"),
            p("register_buffers", "true", "register DRAM with IORING_REGISTER_BUFFERS"),
            p("register_files", "true", "register files with the ring"),
            p("cancel_wait_ms", "100", "how long cancel waits for the kernel before returning Busy"),
            p("drop_wait_ms", "2000", "how long dropping the backend waits for I/O before leaking"),
        ],
        _ => Vec::new(),
    }
}
