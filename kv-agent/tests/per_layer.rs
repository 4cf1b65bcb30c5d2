//! Lists as engines build them, with in-process loopback backends: one registration per
//! layer and plane, and descriptor lists that cross them (block 5 of every K and V
//! tensor in one list).

use std::sync::Arc;

mod common;

use common::LoopMem;
use kv_agent::{Agent, AgentOptions, PeerId, Registration, TransferSpec};
use kv_core::conformance::pattern;
use kv_core::loopback::{LoopbackBackend, LoopbackFabric};
use kv_core::{BackendInit, Descriptor, DescriptorList, Error};
use kv_mem::Region;

const LAYERS: u64 = 4;
const BLOCKS: u64 = 8;
const BLOCK: u64 = 4096;
const TENSOR: u64 = BLOCKS * BLOCK;

/// An agent whose KV cache is one loopback allocation registered as one region per
/// layer and plane (the tensors sit back to back, so a run over them is regular).
struct Side {
    agent: Agent,
    lb: Arc<LoopbackBackend>,
    base: u64,
    _regs: Vec<Registration>,
}

fn side(f: &LoopbackFabric, name: &str, seed: u64) -> Side {
    let lb = Arc::new(f.backend(&BackendInit::new(name)));
    let agent = Agent::new(name, AgentOptions::default()).unwrap();
    agent.add_backend_instance(lb.clone()).unwrap();
    let all = lb.alloc((LAYERS * 2 * TENSOR) as usize);
    lb.write_mem(all.addr, &pattern(seed, all.len as usize))
        .unwrap();
    let regs = (0..LAYERS * 2)
        .map(|t| {
            let d = Descriptor::new(all.addr + t * TENSOR, TENSOR, 0);
            agent.register(&Region::new(LoopMem(d))).unwrap()
        })
        .collect();
    Side {
        agent,
        lb,
        base: all.addr,
        _regs: regs,
    }
}

/// Block `b` of every layer's K and V tensor, in one list.
fn block_of_every_tensor(base: u64, b: u64) -> DescriptorList {
    (0..LAYERS * 2)
        .map(|t| Descriptor::new(base + t * TENSOR + b * BLOCK, BLOCK, 0))
        .collect::<kv_core::Result<DescriptorList>>()
        .unwrap()
}

fn pair() -> (Side, Side, PeerId) {
    let f = LoopbackFabric::new();
    let p = side(&f, "prefill", 1);
    let d = side(&f, "decode", 2);
    let peer = p
        .agent
        .load_remote(&d.agent.local_metadata().unwrap())
        .unwrap();
    (p, d, peer)
}

/// Regression: a strided entry that crosses per-layer registrations was checked whole
/// against each one and refused with `NotRegistered` (local) or `OutOfBounds` (remote).
#[test]
fn list_across_per_layer_registrations_moves_block_5_of_every_tensor() {
    let (p, d, peer) = pair();
    let local = block_of_every_tensor(p.base, 5);
    let remote = block_of_every_tensor(d.base, 2);
    // The list is one strided run over eight registrations on each side.
    assert_eq!((local.entries().len(), remote.entries().len()), (1, 1));
    let t = p
        .agent
        .transfer(&TransferSpec::write(local, peer, remote), None)
        .unwrap();
    t.wait().unwrap();
    let src = pattern(1, (LAYERS * 2 * TENSOR) as usize);
    let dst_before = pattern(2, (LAYERS * 2 * TENSOR) as usize);
    let got =
        d.lb.read_mem(d.base, (LAYERS * 2 * TENSOR) as usize)
            .unwrap();
    for t in 0..(LAYERS * 2) as usize {
        for b in 0..BLOCKS as usize {
            let at = t * TENSOR as usize + b * BLOCK as usize;
            let want = if b == 2 {
                &src[t * TENSOR as usize + 5 * BLOCK as usize..][..BLOCK as usize]
            } else {
                &dst_before[at..at + BLOCK as usize]
            };
            assert!(
                got[at..at + BLOCK as usize] == *want,
                "tensor {t} block {b}"
            );
        }
    }
}

/// The same list read back the other way (READ), and a descriptor that straddles two
/// registrations is still refused.
#[test]
fn read_across_registrations_and_straddling_refused() {
    let (p, d, peer) = pair();
    let t = p
        .agent
        .transfer(
            &TransferSpec::read(
                block_of_every_tensor(p.base, 0),
                peer,
                block_of_every_tensor(d.base, 7),
            ),
            None,
        )
        .unwrap();
    t.wait().unwrap();
    let src = pattern(2, (LAYERS * 2 * TENSOR) as usize);
    let got =
        p.lb.read_mem(p.base, (LAYERS * 2 * TENSOR) as usize)
            .unwrap();
    for t in 0..(LAYERS * 2) as usize {
        let at = t * TENSOR as usize;
        assert!(
            got[at..at + BLOCK as usize] == src[at + 7 * BLOCK as usize..][..BLOCK as usize],
            "tensor {t}"
        );
    }
    // One range over the end of tensor 0 and the start of tensor 1: no registration
    // holds it whole.
    let straddle =
        DescriptorList::single(Descriptor::new(p.base + TENSOR - BLOCK, 2 * BLOCK, 0)).unwrap();
    let e = p
        .agent
        .prepare(&TransferSpec::write(
            straddle,
            peer,
            DescriptorList::single(Descriptor::new(d.base, 2 * BLOCK, 0)).unwrap(),
        ))
        .unwrap_err();
    assert!(matches!(e, Error::NotRegistered(_)), "{e}");
}

/// `TransferSpec` carries memory kinds: a VRAM spec is looked up among VRAM regions.
#[test]
fn transfer_spec_carries_memory_kinds() {
    let (p, d, peer) = pair();
    let (l, r) = (
        block_of_every_tensor(p.base, 1),
        block_of_every_tensor(d.base, 1),
    );
    let spec = TransferSpec::new(
        kv_core::Op::Write,
        kv_core::MemKind::Dram,
        l.clone(),
        peer,
        kv_core::MemKind::Dram,
        r.clone(),
    );
    assert_eq!(spec, TransferSpec::write(l.clone(), peer, r.clone()));
    let vram =
        TransferSpec::write(l, peer, r).with_kinds(kv_core::MemKind::Vram, kv_core::MemKind::Dram);
    assert_eq!(vram.local_kind, kv_core::MemKind::Vram);
    let e = p.agent.prepare(&vram).unwrap_err();
    assert!(
        matches!(e, Error::NotRegistered(ref m) if m.contains("vram")),
        "{e}"
    );
    p.agent.prepare(&spec).unwrap();
}
