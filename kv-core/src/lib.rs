//! The ground floor of kvx: memory descriptors, the [`Backend`] plugin trait, the one
//! [`Error`] type and the metadata wire codec.
//!
//! A third-party backend depends on this crate alone: it implements [`Backend`] and
//! proves itself with the `conformance` feature's suite. `kv-core` does no I/O and no
//! unsafe operation (`#![deny(unsafe_code)]`, lifted only where the trait declares its two
//! `unsafe` methods and where the loopback backend and the conformance suite implement or
//! call them); it compiles in seconds.
//!
//! ```
//! use kv_core::{Descriptor, DescriptorList, AgentMetadata};
//!
//! // One layer's K cache: 1 M pages of 32 KiB, one strided entry, not a million.
//! let pages = DescriptorList::strided(0x7f00_0000_0000, 32 << 10, 1 << 20, 32 << 10, 0)?;
//! assert_eq!((pages.len(), pages.entries().len()), (1 << 20, 1));
//! assert_eq!(pages.get(3), Some(Descriptor::new(0x7f00_0000_0000 + 3 * (32 << 10), 32 << 10, 0)));
//!
//! let meta = AgentMetadata { name: "prefill-0".into(), generation: 1, ..Default::default() };
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
pub mod loopback;

pub use backend::{
    backend_required, check_request_shape, require_or_skip, Access, Backend, BackendFactory,
    BackendInit, Capabilities, EndpointId, Notification, Op, Params, PostOptions, RegistrationId,
    RemoteId, Status, TransferId, TransferRequest,
};
/// Shareable byte blobs (connection info, remote keys, notification payloads), re-exported
/// so a backend needs no direct `bytes` dependency.
pub use bytes::Bytes;
pub use codec::{AgentMetadata, BackendMetadata, RegistrationMetadata};
pub use desc::{
    segments, Descriptor, DescriptorList, Entry, Iter, MemKind, MemKinds, Segment, Segments,
};
pub use error::{Error, Result};
