//! The UCX backend passes the public conformance suite on UCX's TCP and shared-memory
//! transports, both in this one process (each backend gets its own `tls` setting), and
//! on shared memory again with every buffer from `UcxBackend::alloc_host`.

use std::sync::Arc;

use kv_backend_ucx::{Options, UcxBackend, UcxHostMemory};
use kv_core::auth::ClusterSecret;
use kv_core::conformance::{Harness, MemoryFactory, Side, TestMemory};
use kv_core::{BackendInit, Descriptor, Error, Result};
use kv_mem::conformance::HostMemoryFactory;

/// Memory from the side's own backend (`alloc_host`).
struct UcxMemoryFactory(Arc<UcxBackend>);

struct UcxTestMemory(UcxHostMemory);

impl TestMemory for UcxTestMemory {
    fn desc(&self) -> Descriptor {
        self.0.descriptor()
    }
    fn write(&mut self, offset: usize, data: &[u8]) -> Result<()> {
        let end = offset
            .checked_add(data.len())
            .filter(|&e| e <= self.0.len());
        let end = end.ok_or_else(|| Error::OutOfBounds(format!("write at {offset}")))?;
        // SAFETY: the suite writes test memory only while no transfer names it.
        let mem = unsafe { self.0.as_mut_slice() };
        mem[offset..end].copy_from_slice(data);
        Ok(())
    }
    fn read(&self, offset: usize, len: usize) -> Result<Vec<u8>> {
        let end = offset.checked_add(len).filter(|&e| e <= self.0.len());
        let end = end.ok_or_else(|| Error::OutOfBounds(format!("read at {offset}")))?;
        Ok(self.0.to_vec()[offset..end].to_vec())
    }
}

impl MemoryFactory for UcxMemoryFactory {
    fn alloc(&self, len: usize) -> Result<Box<dyn TestMemory>> {
        Ok(Box::new(UcxTestMemory(self.0.alloc_host(len)?)))
    }
}

/// Two fresh UCX backends restricted to the transports `tls`.
///
/// Every operation is served by the target's worker, so a target must progress on its
/// own for a transfer (or its cancellation) to complete while the initiator alone is
/// driven: the shm harnesses turn on each backend's progress thread, as a deployment
/// does; the tcp harness leaves progress to the suite (`needs_target_progress`).
pub struct UcxHarness {
    tls: &'static str,
    progress_thread: bool,
    ucx_memory: bool,
}

impl UcxHarness {
    /// The harness, or `None` (with the reason printed) when UCX cannot be loaded;
    /// panics instead when `KV_REQUIRE_BACKENDS` names `ucx`.
    fn or_skip(tls: &'static str, progress_thread: bool, ucx_memory: bool) -> Option<UcxHarness> {
        let h = UcxHarness {
            tls,
            progress_thread,
            ucx_memory,
        };
        kv_core::require_or_skip("ucx", h.backend(&BackendInit::new("probe")))?;
        Some(h)
    }

    fn backend(&self, init: &BackendInit) -> Result<UcxBackend> {
        let opts = Options {
            tls: Some(self.tls.into()),
            progress_thread: self.progress_thread,
            ..Default::default()
        };
        UcxBackend::new(init, opts)
    }
}

impl Harness for UcxHarness {
    fn pair(&self) -> Result<(Side, Side)> {
        let secret = ClusterSecret::generate()?;
        self.pair_with(
            &BackendInit::new("a").with_secret(secret.clone()),
            &BackendInit::new("b").with_secret(secret),
        )
    }

    fn pair_with(&self, a: &BackendInit, b: &BackendInit) -> Result<(Side, Side)> {
        let side = |init: &BackendInit| -> Result<Side> {
            let backend = Arc::new(self.backend(init)?);
            let memory: Arc<dyn MemoryFactory> = if self.ucx_memory {
                Arc::new(UcxMemoryFactory(backend.clone()))
            } else {
                Arc::new(HostMemoryFactory)
            };
            Ok(Side {
                name: init.agent_name.clone(),
                backend,
                memory,
            })
        };
        Ok((side(a)?, side(b)?))
    }
}

mod tcp {
    use super::*;
    kv_core::conformance_tests!(match UcxHarness::or_skip("tcp", false, false) {
        Some(h) => h,
        None => return,
    });
}

mod shm {
    use super::*;
    kv_core::conformance_tests!(match UcxHarness::or_skip("posix,cma,self", true, false) {
        Some(h) => h,
        None => return,
    });
}

/// UCX-allocated memory on both sides. Peers reach it through checked operations like
/// any memory (no UCX RMA), so targets progress on their own threads here too.
mod shm_ucx_memory {
    use super::*;
    kv_core::conformance_tests!(match UcxHarness::or_skip("posix,cma,self", true, true) {
        Some(h) => h,
        None => return,
    });
}
