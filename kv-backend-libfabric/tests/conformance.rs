//! The libfabric backend passes the public conformance suite, once per provider.

use std::sync::Arc;

use kv_core::auth::ClusterSecret;
use kv_core::conformance::{Harness, Side};
use kv_core::{BackendInit, Error, Params, Result};

/// Two fresh backends on one provider, bound to loopback.
struct FabricHarness {
    provider: &'static str,
}

impl FabricHarness {
    fn side(&self, init: &BackendInit) -> Result<Side> {
        let mut p = Params::new();
        p.insert("provider".into(), self.provider.into());
        if self.provider.starts_with("tcp") {
            p.insert("node".into(), "127.0.0.1".into());
        }
        Ok(Side {
            name: init.agent_name.clone(),
            backend: kv_backend_libfabric::create(init, &p)?,
            memory: Arc::new(kv_mem::conformance::HostMemoryFactory),
        })
    }
}

impl Harness for FabricHarness {
    fn pair(&self) -> Result<(Side, Side)> {
        let secret = ClusterSecret::generate()?;
        self.pair_with(
            &BackendInit::new("a").with_secret(secret.clone()),
            &BackendInit::new("b").with_secret(secret),
        )
    }

    fn pair_with(&self, a: &BackendInit, b: &BackendInit) -> Result<(Side, Side)> {
        Ok((self.side(a)?, self.side(b)?))
    }
    fn deadline(&self) -> std::time::Duration {
        std::time::Duration::from_secs(10)
    }
}

fn available(provider: &'static str) -> Option<FabricHarness> {
    let h = FabricHarness { provider };
    kv_core::require_or_skip("libfabric", h.side(&BackendInit::new("probe")).map(|_| ()))?;
    Some(h)
}

// Each generated test evaluates the block: when libfabric is missing it returns early
// (skip, or panic under KV_REQUIRE_BACKENDS) before the case runs.
mod tcp_rxm {
    use super::*;
    kv_core::conformance_tests!({
        let Some(h) = available("tcp;ofi_rxm") else {
            return;
        };
        h
    });
}

mod shm {
    use super::*;
    kv_core::conformance_tests!({
        let Some(h) = available("shm") else {
            return;
        };
        h
    });
}
#[test]
fn missing_library_is_backend_unavailable() {
    let mut p = Params::new();
    p.insert("library".into(), "/nonexistent/libfabric.so.1".into());
    match kv_backend_libfabric::create(&kv_core::BackendInit::new("x"), &p) {
        Err(Error::BackendUnavailable { name, reason }) => {
            assert_eq!(name, "libfabric");
            assert!(reason.contains("KV_FABRIC_LIB"), "{reason}");
        }
        Err(e) => panic!("want BackendUnavailable, got {e}"),
        Ok(_) => panic!("a nonexistent library loaded"),
    }
}

/// The trust cases run for real: with the cluster secret the harness gives both sides,
/// each reports `authenticated` and `read_only` (else `read_only` and
/// `unauthenticated_peer_refused` would pass without checking anything); without a
/// secret, on loopback, a backend starts but says it is not authenticated.
#[test]
fn trust_cases_are_armed() {
    for provider in ["tcp;ofi_rxm", "shm"] {
        let Some(h) = available(provider) else {
            continue;
        };
        let (a, b) = h.pair().expect("pair");
        for side in [&a, &b] {
            let c = side.backend.capabilities();
            assert!(c.authenticated && c.read_only, "{provider}: {c:?}");
        }
        let plain = h
            .side(&BackendInit::new("plain"))
            .expect("no secret, loopback");
        assert!(!plain.backend.capabilities().authenticated, "{provider}");
    }
}
