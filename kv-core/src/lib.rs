//! The ground floor of kvx: memory descriptors, the [`Backend`] plugin trait and its
//! contract, the one [`Error`] type, the metadata wire codec and the cluster-secret
//! authentication primitives.
//!
//! A third-party backend depends on this crate alone: it implements [`Backend`] — whose
//! docs are the contract, clause by clause — exports a [`BackendFactory`] the agent
//! calls with a [`BackendInit`] (agent name, cluster secret, bind address), and proves
//! itself with the `conformance` feature's suite, which `tests/mutants.rs` shows failing
//! on fourteen deliberately broken backends. The in-process [`loopback`] backend is the
//! reference implementation to read; [`lists`] keeps prepared lists the simple way for a
//! backend that implements the optional prepared-list methods without a plan of its
//! own. `kv-core` does no I/O besides reading OS randomness ([`auth`]) and no unsafe
//! operation (`#![deny(unsafe_code)]`, lifted only where the
//! trait declares its two `unsafe` methods and where the loopback backend and the
//! conformance suite implement or call them); it compiles in seconds.
//!
//! ```
//! use kv_core::{Access, AgentMetadata, Bytes, Descriptor, DescriptorList, MemKind, RegistrationMetadata};
//!
//! // One layer's K cache: 1 M pages of 32 KiB, one strided entry, not a million.
//! let pages = DescriptorList::strided(0x7f00_0000_0000, 32 << 10, 1 << 20, 32 << 10, 0)?;
//! assert_eq!((pages.len(), pages.entries().len()), (1 << 20, 1));
//! assert_eq!(pages.get(3), Some(Descriptor::new(0x7f00_0000_0000 + 3 * (32 << 10), 32 << 10, 0)));
//! // Lists refuse what would overflow the address space instead of wrapping.
//! assert!(DescriptorList::strided(u64::MAX - 4096, 32 << 10, 2, 32 << 10, 0).is_err());
//!
//! // What an agent publishes: its registrations (read-only ones too) and small attributes.
//! let meta = AgentMetadata {
//!     name: "prefill-0".into(),
//!     generation: 1,
//!     attributes: vec![("kv_layout".into(), Bytes::from_static(b"llama3-8b/bf16/16"))],
//!     registrations: vec![RegistrationMetadata {
//!         id: 1, kind: MemKind::Dram, access: Access::ReadOnly, descs: pages, keys: vec![],
//!     }],
//!     ..Default::default()
//! };
//! let wire = meta.encode()?;
//! assert_eq!(AgentMetadata::decode(&wire)?, meta);
//! # Ok::<(), kv_core::Error>(())
//! ```
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod auth;
mod backend;
pub mod codec;
#[cfg(feature = "conformance")]
pub mod conformance;
mod desc;
mod error;
pub mod lists;
pub mod loopback;

pub use backend::{
    backend_required, check_request_shape, require_or_skip, Access, Backend, BackendFactory,
    BackendInit, Capabilities, EndpointId, ListId, ListSide, Notification, Op, Params, PostOptions,
    RegistrationId, RemoteId, SelectRequest, Status, TransferId, TransferRequest,
};
/// Shareable byte blobs (connection info, remote keys, notification payloads), re-exported
/// so a backend needs no direct `bytes` dependency.
pub use bytes::Bytes;
pub use codec::{AgentMetadata, BackendMetadata, RegistrationMetadata};
pub use desc::{
    segments, Descriptor, DescriptorList, Entry, Iter, MemKind, MemKinds, Segment, Segments,
};
pub use error::{Error, Result};
