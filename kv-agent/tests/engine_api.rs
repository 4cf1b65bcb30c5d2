//! The engine API with in-process loopback agents, one per TP rank: per-layer
//! registrations of engine memory, published KV layouts, prepared lists by block id,
//! heterogeneous TP and block sizes (byte-exact against the reference re-layout),
//! layer-wise hand-off, leases and loads.

mod common;

use common::LoopMem;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kv_agent::layout::{tp, HeadOrder, KvDtype, KvLayout, Side};
use kv_agent::{
    Agent, AgentOptions, BlockLeases, BlockLoad, LayerwiseReceiver, LayerwiseTransfer, LeaseEnd,
    LoadFailurePolicy, LoadOutcome, PeerId, Registration, TransferOptions,
};
use kv_core::loopback::{LoopbackBackend, LoopbackFabric};
use kv_core::{BackendInit, Descriptor, DescriptorList, Error, MemKind, Op};
use kv_mem::Region;

/// One engine rank: its cache is one loopback allocation laid out as `layout`, with
/// one registration per layer and plane.
struct Rank {
    agent: Agent,
    lb: Arc<LoopbackBackend>,
    layout: KvLayout,
    base: u64,
    len: usize,
    _regs: Vec<Registration>,
}

impl Rank {
    fn new(f: &LoopbackFabric, name: &str, mut layout: KvLayout) -> Rank {
        let lb = Arc::new(f.backend(&BackendInit::new(name)));
        // A progress thread: loopback moves data and notifications when the initiator
        // progresses, and these tests wait on the other side.
        let opts = AgentOptions {
            progress_thread: true,
            ..Default::default()
        };
        let agent = Agent::new(name, opts).unwrap();
        agent.add_backend_instance(lb.clone()).unwrap();
        let probe = layout.clone().contiguous(0).unwrap();
        let all = lb.alloc(probe as usize);
        let len = layout.contiguous(all.addr).unwrap() as usize;
        lb.write_mem(all.addr, &vec![0xee; len]).unwrap();
        let mut regs = Vec::new();
        for layer in 0..layout.layers {
            for plane in 0..layout.planes() {
                let d = Descriptor::new(
                    layout.plane_base(layer, plane).unwrap(),
                    layout.blocks * layout.block_stride(),
                    0,
                );
                regs.push(agent.register(&Region::new(LoopMem(d))).unwrap());
            }
        }
        agent.set_kv_layout(&layout).unwrap();
        Rank {
            agent,
            lb,
            layout,
            base: all.addr,
            len,
            _regs: regs,
        }
    }

    fn load(&self, other: &Rank) -> PeerId {
        self.agent
            .load_remote(&other.agent.local_metadata().unwrap())
            .unwrap()
    }

    /// Writes the reference values of a request held in `blocks` (source side).
    fn fill_source(&self, blocks: &[u32], tokens: u64) {
        let img = common::source_image(&self.layout, self.base, self.len, blocks, tokens);
        self.lb.write_mem(self.base, &img).unwrap();
    }

    fn image(&self) -> Vec<u8> {
        self.lb.read_mem(self.base, self.len).unwrap()
    }
}

fn layout(kv: u32, tp: u32, rank: u32, block_tokens: u32) -> KvLayout {
    KvLayout::for_rank(3, kv, 8, KvDtype::Bf16, block_tokens, 9, tp, rank).unwrap()
}

const SRC_BLOCKS: [u32; 6] = [4, 0, 7, 2, 8, 5];
const DST_BLOCKS: [u32; 6] = [1, 6, 3, 0, 8, 2];

/// Prefill TP `a` → decode TP `b`; the prefill ranks WRITE (`op` Write) or the decode
/// ranks READ, each pair through `prepare_kv_lists`, layer by layer.
fn hand_off(kv: u32, (a, b): (u32, u32), (sbt, dbt): (u32, u32), op: Op, tokens: u64) {
    let f = LoopbackFabric::new();
    let prefill: Vec<Rank> = (0..a)
        .map(|r| Rank::new(&f, &format!("prefill-{r}"), layout(kv, a, r, sbt)))
        .collect();
    let decode: Vec<Rank> = (0..b)
        .map(|r| Rank::new(&f, &format!("decode-{r}"), layout(kv, b, r, dbt)))
        .collect();
    for p in &prefill {
        p.fill_source(&SRC_BLOCKS, tokens);
    }
    let mut moved = vec![0u32; b as usize];
    for p in &prefill {
        for (j, d) in decode.iter().enumerate() {
            let (me, peer, side) = match op {
                Op::Write => (p, p.load(d), Side::Source),
                Op::Read => (d, d.load(p), Side::Destination),
            };
            let lists = me.agent.prepare_kv_lists(peer, &me.layout, side).unwrap();
            assert_eq!(lists.op(), op);
            if lists.is_empty() {
                continue;
            }
            moved[j] += lists.relayout().heads().len() as u32;
            let items = lists.items(&SRC_BLOCKS, &DST_BLOCKS, tokens).unwrap();
            for t in lists
                .layer_transfers(&items, &TransferOptions::default())
                .unwrap()
            {
                t.post(None).unwrap();
                t.wait().unwrap();
            }
        }
    }
    let chunk = (sbt.min(dbt) as u64).max(1);
    for (j, d) in decode.iter().enumerate() {
        assert_eq!(
            moved[j], d.layout.heads_held,
            "rank {j} received its heads once"
        );
        let want = common::expected_image(
            &d.layout,
            &vec![0xee; d.len],
            d.base,
            &DST_BLOCKS,
            tokens,
            chunk,
        );
        if let Some(i) = common::first_difference(&d.image(), &want) {
            panic!(
                "kv {kv} TP {a}->{b} blocks {sbt}->{dbt} {op}: decode rank {j} differs at byte {i}"
            );
        }
    }
}

#[test]
fn heterogeneous_tp_by_write_byte_exact() {
    for tp in [(1, 2), (2, 1), (2, 8), (8, 2), (4, 4), (16, 2)] {
        hand_off(8, tp, (16, 16), Op::Write, 70);
    }
}

#[test]
fn heterogeneous_tp_and_block_sizes_by_read_byte_exact() {
    for tp in [(1, 2), (2, 1), (2, 8), (8, 2), (4, 4), (16, 2)] {
        hand_off(8, tp, (16, 32), Op::Read, 70);
    }
    hand_off(2, (1, 4), (32, 8), Op::Write, 45);
    hand_off(2, (4, 1), (8, 16), Op::Read, 45);
}

#[test]
fn incompatible_layouts_refuse_before_moving_a_byte() {
    let f = LoopbackFabric::new();
    let p = Rank::new(&f, "prefill", layout(8, 1, 0, 16));
    let mut other = layout(8, 1, 0, 16);
    other.head_dim = 16;
    let d = Rank::new(&f, "decode", other);
    let peer = p.load(&d);
    let e = p
        .agent
        .prepare_kv_lists(peer, &p.layout, Side::Source)
        .unwrap_err();
    assert!(
        matches!(e, Error::InvalidMetadata(ref m) if m.contains("incompatible KV layouts")),
        "{e}"
    );
    assert_eq!(p.agent.stats()[0].1.posted, 0);
    // A peer that published no layout is refused as clearly.
    let bare = Agent::new("bare", AgentOptions::default()).unwrap();
    bare.add_backend_instance(Arc::new(f.backend(&BackendInit::new("bare"))))
        .unwrap();
    let peer = p
        .agent
        .load_remote(&bare.local_metadata().unwrap())
        .unwrap();
    let e = p.agent.peer_kv_layout(peer).unwrap_err();
    assert!(e.to_string().contains("published no KV layout"), "{e}");
}

/// NIXL's pattern: lists of every block of every per-layer tensor prepared once; a
/// request selects blocks by index.
#[test]
fn prepared_lists_select_blocks_by_index() {
    let f = LoopbackFabric::new();
    let mut l = layout(8, 1, 0, 16);
    l.order = HeadOrder::Nhd;
    let p = Rank::new(&f, "prefill", l.clone());
    let d = Rank::new(&f, "decode", l.clone());
    p.fill_source(&[0, 1, 2, 3, 4, 5, 6, 7, 8], 9 * 16);
    let peer = p.load(&d);
    assert_eq!(p.agent.make_connection(peer).unwrap(), vec!["loopback"]);
    // Every block of every (layer, plane) tensor, tensor-major: item = t * 9 + block.
    let every = |r: &Rank| {
        let mut list = DescriptorList::new();
        for layer in 0..3 {
            for plane in 0..2 {
                let base = r.layout.plane_base(layer, plane).unwrap();
                list.push_strided(base, l.block_stride(), 9, l.block_bytes(), 0)
                    .unwrap();
            }
        }
        list
    };
    let local = p
        .agent
        .prepare_local_list(MemKind::Dram, &every(&p))
        .unwrap();
    let remote = p
        .agent
        .prepare_remote_list(peer, MemKind::Dram, &every(&d))
        .unwrap();
    assert_eq!((local.len(), remote.len()), (54, 54));
    // Blocks 2 and 7 of every tensor into blocks 5 and 0.
    let li: Vec<u32> = (0..6).flat_map(|t| [t * 9 + 2, t * 9 + 7]).collect();
    let ri: Vec<u32> = (0..6).flat_map(|t| [t * 9 + 5, t * 9]).collect();
    let t = p
        .agent
        .make_transfer(
            Op::Write,
            &local,
            &li,
            &remote,
            &ri,
            &TransferOptions::default(),
        )
        .unwrap();
    t.post(None).unwrap();
    t.wait().unwrap();
    let got = d.image();
    let src = p.image();
    for layer in 0..3 {
        for plane in 0..2 {
            for (s, dd) in [(2u64, 5u64), (7, 0)] {
                let at = |r: &Rank, b: u64| {
                    (r.layout.plane_base(layer, plane).unwrap() + b * l.block_stride() - r.base)
                        as usize
                };
                let n = l.block_bytes() as usize;
                assert!(
                    got[at(&d, dd)..][..n] == src[at(&p, s)..][..n],
                    "layer {layer} plane {plane}"
                );
            }
        }
    }
    // Wrong arguments are refused before anything is prepared on the backend.
    let opts = TransferOptions::default();
    for (li, ri) in [
        (vec![54u32], vec![0u32]),
        (vec![0], vec![0, 1]),
        (vec![], vec![]),
    ] {
        assert!(p
            .agent
            .make_transfer(Op::Write, &local, &li, &remote, &ri, &opts)
            .is_err());
    }
    assert!(p
        .agent
        .make_transfer(Op::Write, &remote, &[0], &local, &[0], &opts)
        .is_err());
    let named = TransferOptions {
        backend: Some("ucx".into()),
        ..Default::default()
    };
    assert!(matches!(
        p.agent
            .make_transfer(Op::Write, &local, &[0], &remote, &[0], &named),
        Err(Error::NoCommonBackend { .. })
    ));
    // A list of another agent is refused.
    let q = Rank::new(&f, "other", l.clone());
    let theirs = q
        .agent
        .prepare_local_list(MemKind::Dram, &every(&q))
        .unwrap();
    assert!(p
        .agent
        .make_transfer(Op::Write, &theirs, &[0], &remote, &[0], &opts)
        .is_err());
}

/// A prepared list outlives a registration: the transfer made from it is refused at
/// post once the region is gone.
#[test]
fn prepared_list_after_deregistration_is_refused_at_post() {
    let f = LoopbackFabric::new();
    let mut p = Rank::new(&f, "prefill", layout(8, 1, 0, 16));
    let d = Rank::new(&f, "decode", layout(8, 1, 0, 16));
    let peer = p.load(&d);
    let lists = p
        .agent
        .prepare_kv_lists(peer, &p.layout, Side::Source)
        .unwrap();
    let items = lists.items(&[0], &[0], 16).unwrap();
    let t = lists
        .transfer(0, &items, &TransferOptions::default())
        .unwrap();
    p._regs.clear();
    let e = t.post(None).unwrap_err();
    assert!(matches!(e, Error::NotRegistered(_)), "{e}");
}

#[test]
fn layerwise_hand_off_waits_per_layer() {
    let f = LoopbackFabric::new();
    let p = Rank::new(&f, "prefill", layout(8, 2, 1, 16));
    let d = Rank::new(&f, "decode", layout(8, 1, 0, 32));
    p.fill_source(&SRC_BLOCKS, 70);
    let peer = p.load(&d);
    let lists = p
        .agent
        .prepare_kv_lists(peer, &p.layout, Side::Source)
        .unwrap();
    let items = lists.items(&SRC_BLOCKS, &DST_BLOCKS, 70).unwrap();
    let layers = lists
        .layer_transfers(&items, &TransferOptions::default())
        .unwrap();
    let mut lw = LayerwiseTransfer::new(
        layers,
        Bytes::from_static(b"req-9"),
        Bytes::from_static(b"first token 42"),
    )
    .unwrap();
    let mut rx = LayerwiseReceiver::new();
    p.agent
        .notify(peer, Bytes::from_static(b"not a layer"))
        .unwrap();
    for layer in 0..3u32 {
        assert!(!rx.landed(b"req-9", layer));
        lw.layer_ready(layer as usize).unwrap();
        lw.poll().unwrap();
        rx.wait_layer(&d.agent, b"req-9", layer, Duration::from_secs(10))
            .unwrap();
        assert!(lw.layer_ready(layer as usize).is_err(), "each layer once");
    }
    let report = lw.wait().unwrap();
    assert!(report.time_to_first_layer.is_some() && report.exposed.is_some());
    assert_eq!(
        rx.wait_all(&d.agent, b"req-9", Duration::from_secs(10))
            .unwrap(),
        Bytes::from_static(b"first token 42")
    );
    // Heads 4..8 of a TP-2 prefill rank, into a TP-1 decode rank with 32-token blocks.
    let want = {
        let mut full =
            common::expected_image(&d.layout, &vec![0xee; d.len], d.base, &DST_BLOCKS, 70, 16);
        // The other prefill rank's heads (0..4) did not move: put back what was there.
        let untouched = vec![0xee; d.len];
        for layer in 0..3 {
            for plane in 0..2 {
                for t in 0..80u64 {
                    for head in 0..4 {
                        for dim in 0..8 {
                            let a = d
                                .layout
                                .element_addr(
                                    layer,
                                    plane,
                                    DST_BLOCKS[(t / 32) as usize] as u64,
                                    (t % 32) as u32,
                                    head,
                                    dim,
                                )
                                .unwrap();
                            let i = (a - d.base) as usize;
                            full[i..i + 2].copy_from_slice(&untouched[i..i + 2]);
                        }
                    }
                }
            }
        }
        full
    };
    assert_eq!(common::first_difference(&d.image(), &want), None);
    let other = rx.take_unrelated();
    assert_eq!(other.len(), 1);
    assert_eq!(other[0].payload, Bytes::from_static(b"not a layer"));
}

/// The pull model: decode READs, then says done and the prefill side frees its lease;
/// a load that fails reaches the engine as an error (Fail) or a recompute (Recompute),
/// and the lease it never released expires and counts an abort.
#[test]
fn leases_and_loads() {
    let f = LoopbackFabric::new();
    let p = Rank::new(&f, "prefill", layout(8, 1, 0, 16));
    let d = Rank::new(&f, "decode", layout(8, 1, 0, 16));
    p.fill_source(&SRC_BLOCKS, 70);
    let mut leases = BlockLeases::new(Duration::from_millis(200));
    let readers = tp::readers_of(8, 1, 0, 1).unwrap();
    leases.hold("r1", SRC_BLOCKS.to_vec(), readers).unwrap();
    leases.hold("r2", SRC_BLOCKS.to_vec(), readers).unwrap();
    p.load(&d);
    let peer = d.load(&p);
    let lists = d
        .agent
        .prepare_kv_lists(peer, &d.layout, Side::Destination)
        .unwrap();
    let items = lists.items(&SRC_BLOCKS, &DST_BLOCKS, 70).unwrap();
    let opts = TransferOptions::default();
    let mut load = BlockLoad::start(
        &d.agent,
        lists.layer_transfers(&items, &opts).unwrap(),
        DST_BLOCKS.to_vec(),
        LoadFailurePolicy::Fail,
        Some((peer, "r1".into())),
    );
    assert!(matches!(load.wait().unwrap(), LoadOutcome::Loaded));
    let want = common::expected_image(&d.layout, &vec![0xee; d.len], d.base, &DST_BLOCKS, 70, 16);
    assert_eq!(common::first_difference(&d.image(), &want), None);
    let end = Instant::now() + Duration::from_secs(5);
    let mut released = None;
    while released.is_none() && Instant::now() < end {
        p.agent.progress().unwrap();
        for n in p.agent.notifications().unwrap() {
            released = leases.on_notification(n).unwrap();
        }
    }
    let r = released.expect("r1's lease ends with decode's done");
    assert_eq!((r.request.as_str(), r.end), ("r1", LeaseEnd::Done));

    // r2: the decode side loses the peer before its load; under Fail the engine gets
    // the error, under Recompute the blocks to recompute — never a partial "Loaded".
    let ts = lists.layer_transfers(&items, &opts).unwrap();
    let ts2 = lists.layer_transfers(&items, &opts).unwrap();
    d.agent.invalidate_remote(peer).unwrap();
    let mut load = BlockLoad::start(
        &d.agent,
        ts,
        DST_BLOCKS.to_vec(),
        LoadFailurePolicy::Fail,
        Some((peer, "r2".into())),
    );
    assert!(matches!(load.wait(), Err(Error::NotRegistered(_))));
    let mut load = BlockLoad::start(
        &d.agent,
        ts2,
        DST_BLOCKS.to_vec(),
        LoadFailurePolicy::Recompute,
        None,
    );
    match load.wait().unwrap() {
        LoadOutcome::Recompute { blocks, cause } => {
            assert_eq!(blocks, DST_BLOCKS.to_vec());
            assert!(matches!(cause, Error::NotRegistered(_)), "{cause}");
        }
        LoadOutcome::Loaded => panic!("a failed load reported Loaded"),
    }
    assert!(leases.expire(Instant::now()).is_empty());
    std::thread::sleep(Duration::from_millis(250));
    let gone = leases.expire(Instant::now());
    assert_eq!(gone.len(), 1);
    assert_eq!(
        (gone[0].request.as_str(), &gone[0].end),
        ("r2", &LeaseEnd::Expired)
    );
    assert_eq!((leases.aborts(), leases.completed()), (1, 1));
}

#[test]
fn registration_on_named_backends() {
    let f = LoopbackFabric::new();
    let p = Rank::new(&f, "prefill", layout(8, 1, 0, 16));
    let d = p.lb.alloc(4096);
    let named = kv_agent::RegisterOptions {
        backends: vec!["loopback".into()],
        ..Default::default()
    };
    let r = p
        .agent
        .register_with(&Region::new(LoopMem(d)), &named)
        .unwrap();
    assert_eq!(r.backends(), vec!["loopback"]);
    let missing = kv_agent::RegisterOptions {
        backends: vec!["ucx".into()],
        ..Default::default()
    };
    let e = p
        .agent
        .register_with(&Region::new(LoopMem(p.lb.alloc(4096))), &missing)
        .unwrap_err();
    assert!(
        matches!(e, Error::BackendUnavailable { ref name, .. } if name == "ucx"),
        "{e}"
    );
}

#[test]
fn engine_types_are_send_sync() {
    fn check<T: Send + Sync>() {}
    check::<kv_agent::PreparedList>();
    check::<kv_agent::KvLists>();
    check::<kv_agent::KvItems>();
    check::<LayerwiseTransfer>();
    check::<LayerwiseReceiver>();
    check::<BlockLeases>();
    check::<BlockLoad>();
    check::<KvLayout>();
    check::<kv_agent::layout::Relayout>();
    check::<kv_agent::layout::ItemGrid>();
}
