//! The engine API across two processes over the tcp backend: a decode rank (TP 1,
//! 32-token blocks, its KV planes allocated from a memfd `SharedArena`) in a child
//! process, two prefill ranks (TP 2, 16-token blocks; rank 0's planes from a
//! `SharedArena`, rank 1's on the heap, so both same-host paths run) in this one. Every
//! plane is engine-owned memory registered on its own with `register_external`.
//! Layer-wise WRITE, pull (READ) with leases, and a lease that expires; the child checks
//! every byte against the reference re-layout.
#![cfg(feature = "tcp")]

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::Child;
use kv_agent::layout::{tp, KvDtype, KvLayout, Side};
use kv_agent::{
    Agent, AgentOptions, BlockLeases, BlockLoad, LayerwiseReceiver, LayerwiseTransfer, LeaseEnd,
    LoadFailurePolicy, LoadOutcome, RegisterOptions, Registration, TransferOptions,
};
use kv_core::MemKind;
use kv_mem::{ArenaBuffer, SharedArena};

const KV: u32 = 4;
const TOKENS: u64 = 50;
const SRC_BLOCKS: [u32; 4] = [9, 2, 5, 11];
const DST_BLOCKS: [u32; 2] = [3, 0];
const DST_BLOCKS_PULL: [u32; 2] = [5, 1];

fn layout(tp: u32, rank: u32, block_tokens: u32) -> KvLayout {
    KvLayout::for_rank(4, KV, 16, KvDtype::F16, block_tokens, 12, tp, rank).unwrap()
}

fn agent(name: &str) -> Agent {
    let a = Agent::new(
        name,
        AgentOptions {
            progress_thread: true,
            default_deadline: Duration::from_secs(10),
            // The parent's secret; the child (secret None) reads the same one from
            // KVX_SECRET, which the parent set when it spawned it.
            secret: (!common::is_child()).then(common::secret),
            ..Default::default()
        },
    )
    .unwrap();
    a.add_backend("tcp", &Default::default()).unwrap();
    a
}

/// Engine memory for one rank: every plane a separate allocation, from one arena
/// (memfd) or one heap vector, each registered on its own.
enum Planes {
    Arena(Vec<ArenaBuffer>),
    Heap(Vec<u8>),
}

impl Planes {
    /// Allocates the planes, sets the layout's bases, fills the memory with `image(base,
    /// len)` and registers every plane. The registrations come first in the tuple, so
    /// they drop before the memory.
    fn new(
        agent: &Agent,
        l: &mut KvLayout,
        arena: bool,
        image: impl Fn(&KvLayout, u64, usize) -> Vec<u8>,
    ) -> (Vec<Registration>, Planes) {
        let plane = (l.blocks * l.block_stride()) as usize;
        let n = (l.layers * l.planes()) as usize;
        let mut planes = if arena {
            let a = SharedArena::new(plane * n).unwrap();
            // The buffers keep the arena's mapping alive.
            Planes::Arena((0..n).map(|_| a.alloc(plane, 4096).unwrap()).collect())
        } else {
            Planes::Heap(vec![0u8; plane * n])
        };
        l.bases = (0..n).map(|i| planes.base() + (i * plane) as u64).collect();
        if let Planes::Arena(bufs) = &planes {
            let got: Vec<u64> = bufs.iter().map(|b| b.as_ptr() as u64).collect();
            assert_eq!(got, l.bases, "arena planes are back to back");
        }
        l.validate().unwrap();
        let img = image(l, planes.base(), plane * n);
        planes.write(&img);
        let regs = l
            .bases
            .iter()
            .map(|b| {
                // SAFETY: the plane lies in `planes`, which the caller drops after
                // these registrations (and after every transfer naming them).
                unsafe {
                    agent.register_external(
                        *b,
                        plane as u64,
                        MemKind::Dram,
                        0,
                        &RegisterOptions::default(),
                    )
                }
                .unwrap()
            })
            .collect();
        agent.set_kv_layout(l).unwrap();
        (regs, planes)
    }

    fn base(&self) -> u64 {
        match self {
            Planes::Arena(b) => b[0].as_ptr() as u64,
            Planes::Heap(v) => v.as_ptr() as u64,
        }
    }

    /// Overwrites the memory. Only while no transfer writes it.
    fn write(&mut self, img: &[u8]) {
        match self {
            Planes::Arena(bufs) => {
                let mut at = 0;
                for b in bufs {
                    let n = b.len();
                    b.as_mut_slice().copy_from_slice(&img[at..at + n]);
                    at += n;
                }
            }
            Planes::Heap(v) => v.copy_from_slice(img),
        }
    }

    /// The memory. Only once every transfer that writes it finished.
    fn read(&self) -> Vec<u8> {
        match self {
            Planes::Arena(bufs) => bufs.iter().flat_map(|b| b.as_slice().to_vec()).collect(),
            Planes::Heap(v) => v.clone(),
        }
    }
}

/// The decode rank: answers `RECV <tag>...` (layer-wise WRITEs landed: check) and
/// `PULL <addr>...` (READ from every prefill rank by lease: check) on stdin.
fn child_main() {
    let agent = agent("decode");
    let mut l = layout(1, 0, 32);
    let (regs, mut planes) = Planes::new(&agent, &mut l, true, |_, _, len| vec![0xee; len]);
    let addr = agent.listen("127.0.0.1:0").unwrap();
    println!("READY {addr}");
    let cmds = common::commands();
    let mut rx = LayerwiseReceiver::new();
    let check = |planes: &Planes, blocks: &[u32]| {
        let want = common::expected_image(
            &l,
            &vec![0xee; planes.read().len()],
            planes.base(),
            blocks,
            TOKENS,
            16,
        );
        match common::first_difference(&planes.read(), &want) {
            None => "ok".to_string(),
            Some(i) => format!("BAD at byte {i}"),
        }
    };
    while let Ok(cmd) = cmds.recv_timeout(Duration::from_secs(60)) {
        let words: Vec<&str> = cmd.split(' ').collect();
        match words[0] {
            "RECV" => {
                let mut payloads = Vec::new();
                for tag in &words[1..] {
                    payloads.push(
                        rx.wait_all(&agent, tag.as_bytes(), Duration::from_secs(10))
                            .unwrap(),
                    );
                }
                let p: Vec<String> = payloads
                    .iter()
                    .map(|p| String::from_utf8_lossy(p).into_owned())
                    .collect();
                println!("CHECKED {} {}", check(&planes, &DST_BLOCKS), p.join(","));
            }
            "PULL" => {
                planes.write(&vec![0xee; planes.read().len()]);
                for a in &words[2..] {
                    let peer = agent.fetch_remote(*a).unwrap();
                    let lists = agent.prepare_kv_lists(peer, &l, Side::Destination).unwrap();
                    let items = lists.items(&SRC_BLOCKS, &DST_BLOCKS_PULL, TOKENS).unwrap();
                    let ts = lists
                        .layer_transfers(&items, &TransferOptions::default())
                        .unwrap();
                    let holder = Some((peer, words[1].to_string()));
                    let mut load = BlockLoad::start(
                        &agent,
                        ts,
                        DST_BLOCKS_PULL.to_vec(),
                        LoadFailurePolicy::Fail,
                        holder,
                    );
                    assert!(matches!(load.wait().unwrap(), LoadOutcome::Loaded));
                }
                println!("PULLED {}", check(&planes, &DST_BLOCKS_PULL));
            }
            other => panic!("unknown command {other}"),
        }
    }
    // The registrations go before the memory they name (a tuple binding would drop
    // `planes` first).
    drop(regs);
    drop(planes);
}

#[test]
fn child_entry() {
    if common::is_child() {
        child_main();
    }
}

struct Prefill {
    agent: Agent,
    layout: KvLayout,
    _regs: Vec<Registration>,
    _planes: Planes,
}

/// Prefill ranks 0 (arena) and 1 (heap) of TP 2, holding the request in SRC_BLOCKS.
fn prefill_ranks() -> Vec<Prefill> {
    (0..2)
        .map(|r| {
            let agent = agent(&format!("prefill-{r}"));
            let mut layout = layout(2, r, 16);
            let (regs, planes) = Planes::new(&agent, &mut layout, r == 0, |l, base, len| {
                common::source_image(l, base, len, &SRC_BLOCKS, TOKENS)
            });
            Prefill {
                agent,
                layout,
                _regs: regs,
                _planes: planes,
            }
        })
        .collect()
}

#[test]
fn layerwise_write_from_two_tp_ranks_into_one() {
    if common::is_child() {
        return;
    }
    let mut child = Child::spawn("child_entry");
    let addr = child.expect("READY ").trim().to_string();
    let ranks = prefill_ranks();
    let mut tags = Vec::new();
    for (r, p) in ranks.iter().enumerate() {
        let peer = p.agent.fetch_remote(addr.as_str()).unwrap();
        p.agent.make_connection(peer).unwrap();
        let lists = p
            .agent
            .prepare_kv_lists(peer, &p.layout, Side::Source)
            .unwrap();
        assert_eq!(lists.relayout().heads(), r as u32 * 2..r as u32 * 2 + 2);
        let items = lists.items(&SRC_BLOCKS, &DST_BLOCKS, TOKENS).unwrap();
        let layers = lists
            .layer_transfers(&items, &TransferOptions::default())
            .unwrap();
        let tag = format!("req-1/{r}");
        let mut lw = LayerwiseTransfer::new(
            layers,
            Bytes::from(tag.clone()),
            Bytes::from(format!("from-{r}")),
        )
        .unwrap();
        for layer in 0..lw.layers() {
            lw.layer_ready(layer).unwrap();
        }
        let report = lw.wait().unwrap();
        assert!(report.time_to_first_layer.is_some());
        assert_eq!(lists.peer(), peer);
        tags.push(tag);
    }
    child.send(&format!("RECV {}", tags.join(" ")));
    let r = child.expect("CHECKED ");
    assert_eq!(r, "ok from-0,from-1", "the decode rank reports {r}");
}

#[test]
fn pull_by_lease_and_a_lease_that_expires() {
    if common::is_child() {
        return;
    }
    let mut child = Child::spawn("child_entry");
    child.expect("READY ");
    let ranks = prefill_ranks();
    let mut leases: Vec<BlockLeases> = Vec::new();
    let mut addrs = Vec::new();
    for (r, p) in ranks.iter().enumerate() {
        addrs.push(p.agent.listen("127.0.0.1:0").unwrap().to_string());
        let mut t = BlockLeases::new(Duration::from_millis(1500));
        let readers = tp::readers_of(KV, 2, r as u32, 1).unwrap();
        t.hold("req-2", SRC_BLOCKS.to_vec(), readers).unwrap();
        t.hold("req-3", SRC_BLOCKS.to_vec(), readers).unwrap();
        leases.push(t);
    }
    child.send(&format!("PULL req-2 {}", addrs.join(" ")));
    let end = Instant::now() + Duration::from_secs(20);
    let mut done = [false, false];
    while done.iter().any(|d| !d) {
        assert!(
            Instant::now() < end,
            "the decode rank's done notifications never came"
        );
        for (r, p) in ranks.iter().enumerate() {
            for n in p.agent.notifications().unwrap() {
                if let Ok(Some(rel)) = leases[r].on_notification(n) {
                    assert_eq!((rel.request.as_str(), &rel.end), ("req-2", &LeaseEnd::Done));
                    assert_eq!(rel.blocks, SRC_BLOCKS.to_vec());
                    done[r] = true;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(child.expect("PULLED "), "ok");
    // req-3 was never read: its lease expires on both ranks and counts an abort.
    let expiry = leases[0].next_expiry().unwrap();
    std::thread::sleep(
        expiry.saturating_duration_since(Instant::now()) + Duration::from_millis(10),
    );
    for t in &mut leases {
        let gone = t.expire(Instant::now());
        assert_eq!(gone.len(), 1);
        assert_eq!(
            (gone[0].request.as_str(), &gone[0].end),
            ("req-3", &LeaseEnd::Expired)
        );
        assert_eq!((t.aborts(), t.completed(), t.held()), (1, 1, 0));
    }
}
