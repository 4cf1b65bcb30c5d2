//! The agent an inference server embeds: the whole NIXL agent workflow with Rust
//! ownership — backends, memory registration, metadata exchange, transfers.
//!
//! An [`Agent`] owns its backends and registrations, publishes metadata to peers (a TCP
//! side channel by default), picks per transfer a backend both peers share, and prepares
//! transfers once to post many times, with deadlines, cancellation and notifications.
//! Memory is registered through [`kv_mem::Region`]s that stay alive while any transfer
//! names them. Peers are authenticated with a cluster secret (see the README's trust
//! model and [`AgentOptions::secret`]).
//!
//! For engines: memory they own ([`Agent::register_external`]), lists prepared once and
//! selected by index per request ([`Agent::make_transfer`]), KV layouts and their
//! re-layout across TP and block sizes ([`layout::KvLayout`], [`Agent::prepare_kv_lists`]),
//! layer-wise hand-off ([`LayerwiseTransfer`]), leases and all-or-nothing loads
//! ([`BlockLeases`], [`BlockLoad`]) and the prefill-offload gate
//! ([`should_offload_prefill`]).
//!
//! ```no_run
//! use kv_agent::{Agent, AgentOptions, TransferSpec};
//! use kv_mem::{HostBuffer, Region};
//!
//! // The cluster secret: AgentOptions::secret, else KVX_SECRET (hex) from the environment.
//! let agent = Agent::new("prefill-0", AgentOptions::default())?;
//! agent.add_backend("tcp", &Default::default())?;
//! let kv = Region::new(HostBuffer::alloc(64 << 20, 4096)?);
//! let reg = agent.register(&kv)?;
//! let decode = agent.fetch_remote("10.0.0.2:7000")?;           // the decode side's channel
//! let (_, _, remote) = agent.remote_regions(decode)?.remove(0);
//! let t = agent.prepare(&TransferSpec::write(kv_core::DescriptorList::single(reg.descriptor())?, decode, remote))?;
//! t.post(Some("req-42 layer 0".into()))?;
//! t.wait()?;
//! # Ok::<(), kv_core::Error>(())
//! ```
#![warn(missing_docs)]

// Rooms; each imports only rooms below it in the README's map.
mod agent;
mod backends;
mod channel;
mod choice;
mod cover;
mod frame;
mod kv_lists;
mod layerwise;
pub mod layout;
mod lease;
mod offload;
mod pace;
mod peers;
mod prepared;
mod registry;
mod shared;
mod slow;
mod transfer;

pub use agent::{Agent, Registration};
pub use backends::{backend_params, register_backend_factory, register_backend_params, ParamDoc};
pub use frame::parse_header as parse_channel_header;
pub use kv_core::{BackendFactory, Error, Result};
pub use kv_lists::{KvItems, KvLists};
pub use layerwise::{LayerwiseReceiver, LayerwiseReport, LayerwiseTransfer};
pub use lease::{
    done_notification, BlockLeases, BlockLoad, LeaseEnd, LoadFailurePolicy, LoadOutcome, Released,
};
pub use offload::{should_offload_prefill, OffloadThresholds};
pub use peers::PeerId;
pub use prepared::{PreparedList, TransferOptions};
pub use registry::{BackendStats, RegisterOptions};
pub use shared::{AgentOptions, SECRET_ENV};
pub use transfer::{Transfer, TransferSpec, TransferTelemetry};

/// The READMEs' Rust examples, compiled as doc tests so they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
#[doc = include_str!("../README.md")]
struct ReadmeExamples;
