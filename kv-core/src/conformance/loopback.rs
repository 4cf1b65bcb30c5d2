//! The harness for the in-process loopback backend, and its deliberately broken
//! variants.

use std::sync::{Arc, Weak};

use crate::auth::ClusterSecret;
use crate::backend::BackendInit;
use crate::desc::Descriptor;
use crate::error::{Error, Result};
use crate::loopback::{LoopbackBackend, LoopbackFabric, Mutation};

use super::harness::{Harness, MemoryFactory, Side, TestMemory};

/// The harness for the in-process [`LoopbackBackend`]: every pair shares a freshly
/// generated cluster secret, so connections are authenticated.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoopbackHarness;

/// The loopback harness on a fabric whose backends carry a deliberate bug (see
/// `kv-core/tests/mutants.rs`). Not part of the API.
#[doc(hidden)]
#[derive(Debug, Clone, Copy)]
pub struct MutantHarness(pub Mutation);

fn pair_on(fabric: LoopbackFabric, a: &BackendInit, b: &BackendInit) -> Result<(Side, Side)> {
    let side = |init: &BackendInit| {
        let backend = Arc::new(fabric.backend(init));
        Side {
            name: init.agent_name.clone(),
            memory: Arc::new(LoopbackFactory(Arc::downgrade(&backend))),
            backend,
        }
    };
    Ok((side(a), side(b)))
}

fn shared_secret_inits() -> Result<(BackendInit, BackendInit)> {
    let secret = ClusterSecret::generate()?;
    Ok((
        BackendInit::new("a").with_secret(secret.clone()),
        BackendInit::new("b").with_secret(secret),
    ))
}

impl Harness for LoopbackHarness {
    fn pair(&self) -> Result<(Side, Side)> {
        let (a, b) = shared_secret_inits()?;
        self.pair_with(&a, &b)
    }

    fn pair_with(&self, a: &BackendInit, b: &BackendInit) -> Result<(Side, Side)> {
        pair_on(LoopbackFabric::new(), a, b)
    }
}

impl Harness for MutantHarness {
    fn pair(&self) -> Result<(Side, Side)> {
        let (a, b) = shared_secret_inits()?;
        self.pair_with(&a, &b)
    }

    fn pair_with(&self, a: &BackendInit, b: &BackendInit) -> Result<(Side, Side)> {
        pair_on(LoopbackFabric::with_mutation(self.0), a, b)
    }
}

/// Memory in a loopback backend's simulated address space.
struct LoopbackMemory {
    backend: Weak<LoopbackBackend>,
    desc: Descriptor,
}

impl LoopbackMemory {
    fn backend(&self) -> Result<Arc<LoopbackBackend>> {
        self.backend
            .upgrade()
            .ok_or_else(|| Error::NotRegistered("loopback backend dropped".into()))
    }
}

impl TestMemory for LoopbackMemory {
    fn desc(&self) -> Descriptor {
        self.desc
    }
    fn write(&mut self, offset: usize, data: &[u8]) -> Result<()> {
        self.backend()?
            .write_mem(self.desc.addr + offset as u64, data)
    }
    fn read(&self, offset: usize, len: usize) -> Result<Vec<u8>> {
        self.backend()?
            .read_mem(self.desc.addr + offset as u64, len)
    }
}

impl Drop for LoopbackMemory {
    fn drop(&mut self) {
        if let Some(b) = self.backend.upgrade() {
            let _ = b.free(&self.desc);
        }
    }
}

struct LoopbackFactory(Weak<LoopbackBackend>);

impl MemoryFactory for LoopbackFactory {
    fn alloc(&self, len: usize) -> Result<Box<dyn TestMemory>> {
        let b = self
            .0
            .upgrade()
            .ok_or_else(|| Error::NotRegistered("loopback backend dropped".into()))?;
        Ok(Box::new(LoopbackMemory {
            desc: b.alloc(len),
            backend: self.0.clone(),
        }))
    }
}
