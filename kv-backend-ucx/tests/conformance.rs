//! The UCX backend passes the public conformance suite on UCX's TCP and shared-memory
//! transports, both in this one process (each backend gets its own `tls` setting).

use std::sync::Arc;

use kv_backend_ucx::{Options, UcxBackend};
use kv_core::conformance::{Harness, Side};
use kv_core::Result;
use kv_mem::conformance::HostMemoryFactory;

/// Two fresh UCX backends restricted to the transports `tls`.
///
/// On shared memory UCX 1.13 emulates `put`/`get` on user memory in software (the
/// target's worker writes the data), so a target must progress on its own for a
/// transfer (or its cancellation) to complete while the initiator alone is driven;
/// the shm harness therefore turns on each backend's progress thread, as a deployment
/// on these transports must.
pub struct UcxHarness {
    tls: &'static str,
    progress_thread: bool,
}

impl UcxHarness {
    /// The harness, or `None` (with the reason printed) when UCX cannot be loaded;
    /// panics instead when `KV_REQUIRE_BACKENDS` names `ucx`.
    fn or_skip(tls: &'static str, progress_thread: bool) -> Option<UcxHarness> {
        let h = UcxHarness {
            tls,
            progress_thread,
        };
        kv_core::require_or_skip("ucx", h.backend("probe"))?;
        Some(h)
    }

    fn backend(&self, name: &str) -> Result<UcxBackend> {
        let opts = Options {
            tls: Some(self.tls.into()),
            progress_thread: self.progress_thread,
            ..Default::default()
        };
        UcxBackend::new(name, opts)
    }
}

impl Harness for UcxHarness {
    fn pair(&self) -> Result<(Side, Side)> {
        let side = |name: &str| -> Result<Side> {
            Ok(Side {
                name: name.into(),
                backend: Arc::new(self.backend(name)?),
                memory: Arc::new(HostMemoryFactory),
            })
        };
        Ok((side("a")?, side("b")?))
    }
}

mod tcp {
    use super::*;
    kv_core::conformance_tests!(match UcxHarness::or_skip("tcp", false) {
        Some(h) => h,
        None => return,
    });
}

mod shm {
    use super::*;
    kv_core::conformance_tests!(match UcxHarness::or_skip("posix,cma,self", true) {
        Some(h) => h,
        None => return,
    });
}
