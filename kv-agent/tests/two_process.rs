//! Two-process tests over the tcp backend: the test re-executes its own binary as the
//! decode side (`KV_AGENT_CHILD=1`), which registers memory, serves metadata and answers
//! check requests by notification. Every byte is checksummed on the side that owns it.
#![cfg(feature = "tcp")]

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kv_agent::{Agent, AgentOptions, PeerId, TransferSpec};
use kv_core::conformance::pattern;
use kv_core::{DescriptorList, Error};
use kv_mem::{HostBuffer, Region};

const CHILD_LEN: usize = 32 << 20;
const CHILD_SEED: u64 = 4242;

/// The cluster secret of the parent, handed to the child in `KVX_SECRET`.
fn secret() -> kv_core::auth::ClusterSecret {
    static S: std::sync::OnceLock<kv_core::auth::ClusterSecret> = std::sync::OnceLock::new();
    S.get_or_init(|| kv_core::auth::ClusterSecret::generate().unwrap())
        .clone()
}

/// The decode side. Runs when the test binary is started with `KV_AGENT_CHILD=1`; its
/// secret comes from `KVX_SECRET`.
fn child_main() {
    let agent = Agent::new(
        "decode",
        AgentOptions {
            progress_thread: true,
            ..Default::default()
        },
    )
    .unwrap();
    agent
        .add_backend(
            "tcp",
            &params(std::env::var("KV_AGENT_CHILD_TCP_ONLY").is_ok()),
        )
        .unwrap();
    let mut buf = HostBuffer::alloc(CHILD_LEN, 4096).unwrap();
    buf.as_mut_slice()
        .copy_from_slice(&pattern(CHILD_SEED, CHILD_LEN));
    let region = Region::new(buf);
    let _reg = agent.register(&region).unwrap();
    let addr = agent.listen("127.0.0.1:0").unwrap();
    println!("READY {addr}");
    std::io::stdout().flush().unwrap();
    // Exit when the parent closes stdin (or dies).
    let (tx, rx) = mpsc::channel::<()>();
    std::thread::spawn(move || {
        let mut s = String::new();
        while std::io::stdin()
            .read_line(&mut s)
            .map(|n| n > 0)
            .unwrap_or(false)
        {
            s.clear();
        }
        let _ = tx.send(());
    });
    let end = Instant::now() + Duration::from_secs(120);
    while Instant::now() < end && rx.try_recv().is_err() {
        for n in agent.notifications().unwrap() {
            let text = String::from_utf8_lossy(&n.payload).into_owned();
            // "CHECK <offset> <len> <seed>": does the region hold pattern(seed) there?
            if let Some(rest) = text.strip_prefix("CHECK ") {
                let v: Vec<u64> = rest.split(' ').map(|x| x.parse().unwrap()).collect();
                let (off, len, seed) = (v[0] as usize, v[1] as usize, v[2]);
                // SAFETY: the CHECK notification follows the data; the parent sends no
                // more until we answer.
                let got = &unsafe { region.memory() }.as_slice()[off..off + len];
                let ok = got == pattern(seed, len).as_slice();
                println!(
                    "CHECKED {} {:08x} from {}",
                    if ok { "ok" } else { "BAD" },
                    crc32(got),
                    n.peer
                );
                std::io::stdout().flush().unwrap();
            } else {
                println!("NOTE {text}");
                std::io::stdout().flush().unwrap();
            }
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Backend parameters: cross-memory attach for same-host peers, or TCP only.
fn params(tcp_only: bool) -> kv_core::Params {
    let mut p = kv_core::Params::new();
    if tcp_only {
        p.insert("same_host".into(), "false".into());
    }
    p
}

fn crc32(b: &[u8]) -> u32 {
    // A tiny FNV-style checksum; the byte comparison above is the real check.
    b.iter().fold(0x811c_9dc5u32, |h, x| {
        (h ^ *x as u32).wrapping_mul(0x0100_0193)
    })
}

struct Decode {
    child: Child,
    lines: mpsc::Receiver<String>,
    addr: String,
}

impl Decode {
    fn spawn() -> Decode {
        Self::spawn_with(false)
    }

    fn spawn_with(tcp_only: bool) -> Decode {
        let exe = std::env::current_exe().unwrap();
        let mut cmd = Command::new(exe);
        if tcp_only {
            cmd.env("KV_AGENT_CHILD_TCP_ONLY", "1");
        }
        let mut child = cmd
            .args(["--exact", "child_entry", "--nocapture", "--test-threads=1"])
            .env("KV_AGENT_CHILD", "1")
            .env("KVX_SECRET", secret().to_hex())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines() {
                let Ok(l) = l else { break };
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let mut d = Decode {
            child,
            lines: rx,
            addr: String::new(),
        };
        d.addr = d.expect("READY ").trim().to_string();
        d
    }

    fn expect(&mut self, prefix: &str) -> String {
        let end = Instant::now() + Duration::from_secs(30);
        while Instant::now() < end {
            if let Ok(l) = self.lines.recv_timeout(Duration::from_millis(100)) {
                // libtest may print "test child_entry ... " before the child's first line.
                if let Some(i) = l.find(prefix) {
                    return l[i + prefix.len()..].to_string();
                }
            }
        }
        panic!("child did not print {prefix:?} within 30 s");
    }

    fn check(&mut self, agent: &Agent, peer: PeerId, off: usize, len: usize, seed: u64) {
        agent
            .notify(peer, Bytes::from(format!("CHECK {off} {len} {seed}")))
            .unwrap();
        let r = self.expect("CHECKED ");
        assert!(r.starts_with("ok "), "child reports {r}");
        assert!(r.ends_with("from prefill"), "{r}");
        assert!(
            r.contains(&format!("{:08x}", crc32(&pattern(seed, len)))),
            "checksums differ: {r}"
        );
    }
}

impl Drop for Decode {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn child_entry() {
    if std::env::var_os("KV_AGENT_CHILD").is_some() {
        child_main();
    }
}

fn prefill(len: usize, seed: u64) -> (Agent, Region, kv_agent::Registration) {
    prefill_with(len, seed, false)
}

fn prefill_with(len: usize, seed: u64, tcp_only: bool) -> (Agent, Region, kv_agent::Registration) {
    let agent = Agent::new(
        "prefill",
        AgentOptions {
            default_deadline: Duration::from_secs(10),
            secret: Some(secret()),
            ..Default::default()
        },
    )
    .unwrap();
    agent.add_backend("tcp", &params(tcp_only)).unwrap();
    let mut buf = HostBuffer::alloc(len, 4096).unwrap();
    buf.as_mut_slice().copy_from_slice(&pattern(seed, len));
    let region = Region::new(buf);
    let reg = agent.register(&region).unwrap();
    (agent, region, reg)
}

fn remote_base(agent: &Agent, peer: PeerId) -> u64 {
    let (_, _, d) = agent.remote_regions(peer).unwrap().remove(0);
    d.get(0).unwrap().addr
}

#[test]
fn prefill_write_with_notifications_per_layer() {
    layered_write(false);
}

#[test]
fn prefill_write_over_tcp_only() {
    layered_write(true);
}

fn layered_write(tcp_only: bool) {
    let mut d = Decode::spawn_with(tcp_only);
    let (agent, src, reg) = prefill_with(16 << 20, 7, tcp_only);
    let peer = agent.fetch_remote(d.addr.as_str()).unwrap();
    let rbase = remote_base(&agent, peer);
    // 16 "layers" of 1 MiB, each as 32 strided 32 KiB pages, one notification each.
    let mut ts = Vec::new();
    for layer in 0..16u64 {
        let local = DescriptorList::strided(
            reg.descriptor().addr + layer * (1 << 20),
            32 << 10,
            32,
            32 << 10,
            0,
        )
        .unwrap();
        let remote =
            DescriptorList::strided(rbase + layer * (1 << 20), 32 << 10, 32, 32 << 10, 0).unwrap();
        ts.push(
            agent
                .transfer(
                    &TransferSpec::write(local, peer, remote),
                    Some(Bytes::from(format!("layer {layer}"))),
                )
                .unwrap(),
        );
    }
    for t in &ts {
        t.wait().unwrap();
        assert_eq!(t.backend(), "tcp");
    }
    for layer in 0..16 {
        assert_eq!(d.expect("NOTE "), format!("layer {layer}"));
    }
    d.check(&agent, peer, 0, 16 << 20, 7);
    drop(src);
}

#[test]
fn decode_read_pulls_the_cache() {
    let mut d = Decode::spawn();
    let (agent, region, reg) = prefill(CHILD_LEN, 1);
    let peer = agent.fetch_remote(d.addr.as_str()).unwrap();
    let rbase = remote_base(&agent, peer);
    let t = agent
        .transfer(
            &TransferSpec::read(
                DescriptorList::single(reg.descriptor()).unwrap(),
                peer,
                DescriptorList::single(kv_core::Descriptor::new(rbase, CHILD_LEN as u64, 0))
                    .unwrap(),
            ),
            None,
        )
        .unwrap();
    t.wait().unwrap();
    // SAFETY: the READ completed; nothing else writes the region.
    assert!(unsafe { region.memory() }.as_slice() == pattern(CHILD_SEED, CHILD_LEN).as_slice());
    d.check(&agent, peer, 0, CHILD_LEN, CHILD_SEED);
}

#[test]
fn repost_prepared_transfer_1000_times() {
    let mut d = Decode::spawn();
    let (agent, region, reg) = prefill(64 << 10, 0);
    let peer = agent.fetch_remote(d.addr.as_str()).unwrap();
    let rbase = remote_base(&agent, peer);
    let t = agent
        .prepare(&TransferSpec::write(
            DescriptorList::single(reg.descriptor()).unwrap(),
            peer,
            DescriptorList::single(kv_core::Descriptor::new(rbase, 64 << 10, 0)).unwrap(),
        ))
        .unwrap();
    for i in 0..1000u64 {
        // SAFETY: no other thread touches the region, and the previous post finished.
        unsafe { region.write_at(0, &pattern(i, 64 << 10)).unwrap() };
        t.post(None).unwrap();
        t.wait().unwrap();
    }
    assert_eq!(t.telemetry().posts, 1000);
    d.check(&agent, peer, 0, 64 << 10, 999);
}

#[test]
fn peer_killed_mid_transfer_errors_within_deadline() {
    let mut d = Decode::spawn();
    let (agent, _region, reg) = prefill(CHILD_LEN, 3);
    let peer = agent.fetch_remote(d.addr.as_str()).unwrap();
    let rbase = remote_base(&agent, peer);
    let mut spec = TransferSpec::write(
        DescriptorList::strided(
            reg.descriptor().addr,
            4096,
            (CHILD_LEN / 4096) as u64,
            4096,
            0,
        )
        .unwrap(),
        peer,
        DescriptorList::single(kv_core::Descriptor::new(rbase, CHILD_LEN as u64, 0)).unwrap(),
    );
    spec.deadline = Some(Duration::from_secs(5));
    let t = agent.prepare(&spec).unwrap();
    t.post(None).unwrap();
    t.wait().unwrap();
    // Kill the decode process while transfers are in flight.
    let start = Instant::now();
    let mut failed = None;
    for i in 0..10_000 {
        let r = t.post(None).and_then(|_| {
            if i == 0 {
                // Kill the decode process while this post is in flight.
                d.child.kill().unwrap();
                d.child.wait().unwrap();
            }
            t.wait()
        });
        if let Err(e) = r {
            failed = Some(e);
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "transfers kept succeeding after the kill"
        );
    }
    let e = failed.expect("a transfer to the killed peer failed");
    assert!(
        matches!(e, Error::RemoteDisconnected { .. } | Error::TimedOut { .. }),
        "{e}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(7),
        "error took {:?}",
        start.elapsed()
    );
}

#[test]
fn restarted_peer_new_generation_old_handles_refused() {
    let mut d1 = Decode::spawn();
    let (agent, _region, reg) = prefill(1 << 20, 5);
    let old = agent.fetch_remote(d1.addr.as_str()).unwrap();
    let (_, gen1) = agent.peer_info(old).unwrap();
    let spec = |peer, base| {
        TransferSpec::write(
            DescriptorList::single(reg.descriptor()).unwrap(),
            peer,
            DescriptorList::single(kv_core::Descriptor::new(base, 1 << 20, 0)).unwrap(),
        )
    };
    let old_t = agent.prepare(&spec(old, remote_base(&agent, old))).unwrap();
    old_t.post(None).unwrap();
    old_t.wait().unwrap();
    d1.check(&agent, old, 0, 1 << 20, 5);
    drop(d1);

    let mut d2 = Decode::spawn();
    let new = agent.fetch_remote(d2.addr.as_str()).unwrap();
    let (name, gen2) = agent.peer_info(new).unwrap();
    assert_eq!(name, "decode");
    assert!(gen2 > gen1, "generation {gen2} after {gen1}");
    assert_ne!(new, old);
    let e = old_t.post(None).unwrap_err();
    assert!(
        matches!(e, Error::NotRegistered(ref m) if m.contains("restarted")),
        "{e}"
    );
    assert!(agent.prepare(&spec(old, remote_base(&agent, new))).is_err());
    let t = agent
        .transfer(&spec(new, remote_base(&agent, new)), None)
        .unwrap();
    t.wait().unwrap();
    d2.check(&agent, new, 0, 1 << 20, 5);
}
