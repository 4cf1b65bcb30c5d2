//! The TCP backend passes the public conformance suite in-process, once with same-host
//! cross-memory attach and once forced onto TCP.

use std::sync::Arc;

use kv_core::conformance::{Harness, Side};
use kv_core::{Params, Result};
use kv_mem::conformance::HostMemoryFactory;

/// Two fresh backends with the given `same_host` setting.
struct TcpHarness {
    same_host: bool,
}

impl Harness for TcpHarness {
    fn pair(&self) -> Result<(Side, Side)> {
        let params = Params::from([("same_host".to_string(), self.same_host.to_string())]);
        let side = |name: &str| -> Result<Side> {
            let backend = kv_core::require_or_skip("tcp", kv_backend_tcp::create(name, &params))
                .ok_or_else(|| kv_core::Error::BackendUnavailable {
                    name: "tcp".into(),
                    reason: "could not be created".into(),
                })?;
            Ok(Side {
                name: name.into(),
                backend,
                memory: Arc::new(HostMemoryFactory),
            })
        };
        Ok((side("a")?, side("b")?))
    }
}

mod same_host {
    kv_core::conformance_tests!(super::TcpHarness { same_host: true });
}

mod forced_tcp {
    kv_core::conformance_tests!(super::TcpHarness { same_host: false });
}
