//! The TCP backend passes the public conformance suite in-process three times: with
//! same-host cross-memory attach (heap memory), with same-host shared memory (memfd
//! memory from `HostBuffer::shared`, which the importer maps), and forced onto TCP.

use std::sync::Arc;

use kv_core::auth::ClusterSecret;
use kv_core::conformance::{Harness, MemoryFactory, Side, TestMemory};
use kv_core::{BackendInit, Descriptor, Error, Params, Result};
use kv_mem::conformance::HostMemoryFactory;
use kv_mem::HostBuffer;

/// Allocates memfd-backed [`HostBuffer::shared`] buffers, so registrations are
/// shareable and same-host transfers take the shared-memory path.
#[derive(Debug, Clone, Copy)]
struct SharedMemoryFactory;

struct SharedTestMemory(HostBuffer);

impl SharedTestMemory {
    fn range(&self, offset: usize, len: usize) -> Result<std::ops::Range<usize>> {
        offset
            .checked_add(len)
            .filter(|e| *e <= self.0.len())
            .map(|e| offset..e)
            .ok_or_else(|| Error::OutOfBounds(format!("{offset}+{len}")))
    }
}

impl TestMemory for SharedTestMemory {
    fn desc(&self) -> Descriptor {
        self.0.descriptor()
    }

    fn write(&mut self, offset: usize, data: &[u8]) -> Result<()> {
        let r = self.range(offset, data.len())?;
        self.0.as_mut_slice()[r].copy_from_slice(data);
        Ok(())
    }

    fn read(&self, offset: usize, len: usize) -> Result<Vec<u8>> {
        let r = self.range(offset, len)?;
        Ok(self.0.as_slice()[r].to_vec())
    }
}

impl MemoryFactory for SharedMemoryFactory {
    fn alloc(&self, len: usize) -> Result<Box<dyn TestMemory>> {
        Ok(Box::new(SharedTestMemory(HostBuffer::shared(len.max(1))?)))
    }
}

/// Two fresh backends with the given `same_host` setting and memory.
struct TcpHarness {
    same_host: bool,
    shared_memory: bool,
}

impl Harness for TcpHarness {
    fn pair(&self) -> Result<(Side, Side)> {
        let secret = ClusterSecret::generate()?;
        self.pair_with(
            &BackendInit::new("a").with_secret(secret.clone()),
            &BackendInit::new("b").with_secret(secret),
        )
    }

    fn pair_with(&self, a: &BackendInit, b: &BackendInit) -> Result<(Side, Side)> {
        let params = Params::from([("same_host".to_string(), self.same_host.to_string())]);
        let side = |init: &BackendInit| -> Result<Side> {
            let backend = kv_core::require_or_skip("tcp", kv_backend_tcp::create(init, &params))
                .ok_or_else(|| kv_core::Error::BackendUnavailable {
                    name: "tcp".into(),
                    reason: "could not be created".into(),
                })?;
            let memory: Arc<dyn MemoryFactory> = if self.shared_memory {
                Arc::new(SharedMemoryFactory)
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

mod same_host {
    kv_core::conformance_tests!(super::TcpHarness {
        same_host: true,
        shared_memory: false
    });
}

mod shared_memory {
    kv_core::conformance_tests!(super::TcpHarness {
        same_host: true,
        shared_memory: true
    });
}

mod forced_tcp {
    kv_core::conformance_tests!(super::TcpHarness {
        same_host: false,
        shared_memory: false
    });
}
