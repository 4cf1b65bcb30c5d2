//! The public test suite every backend runs.
//!
//! A backend proves itself by handing the suite a [`Harness`] that creates two fresh
//! backends (and memory each can register) and calling [`run_all`] — or, for one test
//! per case, the [`conformance_tests!`](crate::conformance_tests) macro:
//!
//! ```
//! # #[cfg(feature = "conformance")] {
//! use kv_core::conformance::{self, LoopbackHarness};
//! conformance::run_all(&LoopbackHarness).unwrap();
//! # }
//! ```
//!
//! Each case checks one clause of the contract written in the [`Backend`] docs and says
//! which in its own docs. Every case moves data with a deterministic pattern and checks
//! it byte for byte — including that bytes outside the target ranges, and the source,
//! were not touched.
//!
//! **Memory.** A backend that moves real host memory can use [`HeapMemoryFactory`]
//! (safe-Rust boxed slices) for its [`Side::memory`]; `kv_mem::conformance` has
//! page-aligned and memfd-backed factories too.
//!
//! **Authentication.** [`Harness::pair`] gives two backends sharing a cluster secret;
//! [`Harness::pair_with`] builds them from given [`BackendInit`]s, which
//! `unauthenticated_peer_refused` uses to create peers with different secrets. A
//! backend whose capabilities say `authenticated` must implement it.
//!
//! **A suite that fails on broken backends.** `kv-core/tests/mutants.rs` runs the suite
//! against deliberately broken variants of the loopback backend (a READ copying the
//! wrong way, a notification before its data, a cancel that lets the copy run, …) and
//! requires each to fail, in the case named for it.
//!
//! The suite calls the backends' `unsafe` methods, keeping their contracts (memory is
//! deregistered before it is freed; transfers finish before their memory goes).
#![allow(unsafe_code)]

mod faults;
mod harness;
mod lists;
mod loopback;
mod memory;
mod notify;
mod transfers;

use crate::error::{Error, Result};
#[cfg(doc)]
use crate::{Backend, BackendInit};

pub use faults::{
    cancel, cancel_stops_copies, deregister_busy, disconnect_inflight, dropped_peer,
    expired_deadline, poll_after_release, post_after_deregister, post_after_peer_deregister,
    unauthenticated_peer_refused,
};
pub use harness::{pattern, wait, Harness, MemoryFactory, Side, TestMemory};
pub use lists::prepared_lists;
pub use loopback::LoopbackHarness;
#[doc(hidden)]
pub use loopback::MutantHarness;
pub use memory::HeapMemoryFactory;
pub use notify::{notification_after_data, notifications, read_notification};
pub use transfers::{
    bounds_forged, bounds_refused, export_import, read_only, read_sizes, register_deregister,
    repost, scattered_read, scattered_write, write_sizes, zero_length_descriptors,
};

/// One conformance case.
pub type Case = fn(&dyn Harness) -> Result<()>;

/// Every case, by name, in the order [`run_all`] runs them.
pub const CASES: &[(&str, Case)] = &[
    ("register_deregister", register_deregister),
    ("export_import", export_import),
    ("write_sizes", write_sizes),
    ("read_sizes", read_sizes),
    ("scattered_write", scattered_write),
    ("scattered_read", scattered_read),
    ("zero_length_descriptors", zero_length_descriptors),
    ("notifications", notifications),
    ("notification_after_data", notification_after_data),
    ("read_notification", read_notification),
    ("bounds_refused", bounds_refused),
    ("bounds_forged", bounds_forged),
    ("repost", repost),
    ("cancel", cancel),
    ("cancel_stops_copies", cancel_stops_copies),
    ("deregister_busy", deregister_busy),
    ("dropped_peer", dropped_peer),
    ("disconnect_inflight", disconnect_inflight),
    ("expired_deadline", expired_deadline),
    ("poll_after_release", poll_after_release),
    ("post_after_deregister", post_after_deregister),
    ("post_after_peer_deregister", post_after_peer_deregister),
    ("read_only", read_only),
    ("unauthenticated_peer_refused", unauthenticated_peer_refused),
    ("prepared_lists", prepared_lists),
];

/// Runs every case; the first failure is returned as `Corrupt("conformance case NAME:
/// …")`.
pub fn run_all(h: &dyn Harness) -> Result<()> {
    for (name, case) in CASES {
        case(h).map_err(|e| Error::Corrupt(format!("conformance case {name}: {e}")))?;
    }
    Ok(())
}

/// Expands to one `#[test]` per conformance case, each calling `$harness` (an
/// expression whose value implements [`Harness`]).
///
/// ```ignore
/// kv_core::conformance_tests!(MyHarness::default());
/// ```
#[macro_export]
macro_rules! conformance_tests {
    ($harness:expr) => {
        $crate::conformance_tests!(@case $harness; register_deregister, export_import,
            write_sizes, read_sizes, scattered_write, scattered_read, zero_length_descriptors,
            notifications, notification_after_data, read_notification, bounds_refused,
            bounds_forged, repost, cancel, cancel_stops_copies, deregister_busy, dropped_peer,
            disconnect_inflight, expired_deadline, poll_after_release, post_after_deregister,
            post_after_peer_deregister, read_only, unauthenticated_peer_refused,
            prepared_lists);
    };
    (@case $harness:expr; $($name:ident),*) => {
        $(
            #[test]
            fn $name() {
                let h = $harness;
                if let Err(e) = $crate::conformance::$name(&h) {
                    panic!("conformance case {} failed: {e}", stringify!($name));
                }
            }
        )*
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_macro_lists_every_case() {
        let src = include_str!("mod.rs");
        let start = src.find("@case $harness; ").unwrap_or(0);
        let listed = src[start..].split(");").next().unwrap_or("");
        for (name, _) in CASES {
            assert!(listed.contains(name), "conformance_tests! misses {name}");
        }
    }
}
