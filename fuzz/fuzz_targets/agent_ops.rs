//! Random sequences of agent operations over loopback backends: register, drop,
//! load metadata (valid, partial, garbage), prepare, post, poll, cancel, notify. No
//! sequence may panic, hang or let a transfer outlive its memory.
#![no_main]
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use kv_agent::{Agent, AgentOptions, TransferSpec};
use kv_core::loopback::{LoopbackBackend, LoopbackFabric};
use kv_core::{BackendInit, Descriptor, DescriptorList, MemKind};
use kv_mem::{Memory, Region};
use libfuzzer_sys::fuzz_target;

struct LoopMem(Descriptor);
// SAFETY: loopback memory is simulated; nothing dereferences these addresses.
unsafe impl Memory for LoopMem {
    fn kind(&self) -> MemKind {
        MemKind::Dram
    }
    fn descriptor(&self) -> Descriptor {
        self.0
    }
}

fuzz_target!(|data: &[u8]| {
    let f = LoopbackFabric::new();
    let opts = || AgentOptions { default_deadline: Duration::from_millis(50), ..Default::default() };
    let (la, lb): (Arc<LoopbackBackend>, Arc<LoopbackBackend>) = (Arc::new(f.backend(&BackendInit::new("a"))), Arc::new(f.backend(&BackendInit::new("b"))));
    let (a, b) = (Agent::new("a", opts()).unwrap(), Agent::new("b", opts()).unwrap());
    a.add_backend_instance(la.clone()).unwrap();
    b.add_backend_instance(lb.clone()).unwrap();
    let mut regs_a = Vec::new();
    let mut regs_b = Vec::new();
    let mut peer = None;
    let mut transfers = Vec::new();
    for chunk in data.chunks(3).take(64) {
        let (op, x, y) = (chunk[0] % 10, *chunk.get(1).unwrap_or(&0) as u64, *chunk.get(2).unwrap_or(&0) as u64);
        match op {
            0 => regs_a.push(a.register(&Region::new(LoopMem(la.alloc(4096 + x as usize)))).unwrap()),
            1 => regs_b.push(b.register(&Region::new(LoopMem(lb.alloc(4096 + y as usize)))).unwrap()),
            2 => {
                if !regs_a.is_empty() {
                    regs_a.remove(x as usize % regs_a.len());
                }
            }
            3 => peer = a.load_remote(&b.local_metadata().unwrap()).ok(),
            4 => {
                let _ = a.load_remote(chunk);
            }
            5 => {
                if let (Some(p), Some(ra), Some(rb)) = (peer, regs_a.first(), regs_b.first()) {
                    let len = 1 + (x * 31 + y) % 4096;
                    let (Ok(l), Ok(r)) = (
                        DescriptorList::single(Descriptor::new(ra.descriptor().addr + y, len, 0)),
                        DescriptorList::single(Descriptor::new(rb.descriptor().addr + x, len, 0)),
                    ) else {
                        continue;
                    };
                    if let Ok(t) = a.prepare(&TransferSpec::write(l, p, r)) {
                        transfers.push(t);
                    }
                }
            }
            6 => {
                if let Some(t) = transfers.get(x as usize % transfers.len().max(1)) {
                    let _ = t.post(Some(Bytes::from_static(b"n")));
                }
            }
            7 => {
                let _ = a.progress();
                for t in &transfers {
                    let _ = t.poll();
                }
            }
            8 => {
                if let Some(t) = transfers.get(y as usize % transfers.len().max(1)) {
                    let _ = t.cancel();
                }
            }
            _ => {
                if let Some(p) = peer {
                    let _ = a.notify(p, Bytes::copy_from_slice(chunk));
                }
                let _ = b.notifications();
            }
        }
    }
});
