//! The authenticated control plane (issue 14 item 12): without the cluster secret a
//! process can neither load an agent's metadata, nor replace one of its peers, nor move a
//! byte; an agent without a secret refuses its networked parts unless told it runs on a
//! closed test network; the side channel binds where it is told.
#![cfg(feature = "tcp")]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use common::{loopback, opts, secret, Hooked};
use kv_agent::{Agent, AgentOptions, TransferSpec};
use kv_core::auth::ClusterSecret;
use kv_core::conformance::pattern;
use kv_core::loopback::LoopbackFabric;
use kv_core::{DescriptorList, Error};
use kv_mem::{HostBuffer, Region};

const LEN: usize = 1 << 20;

/// The attacker: started with `KV_AGENT_TRUST_CHILD=<mode>` and the victim's side
/// channel in `KV_AGENT_TRUST_ADDR`. Mode `none`: no secret (the explicit
/// unauthenticated mode); `other`: another secret, from `KVX_SECRET`.
fn child_main(mode: &str) {
    let addr = std::env::var("KV_AGENT_TRUST_ADDR").unwrap();
    let mut o = AgentOptions {
        // Claims the name of the victim's real peer, with the highest generation.
        generation: Some(u64::MAX),
        ..Default::default()
    };
    if mode == "none" {
        o.allow_unauthenticated = true;
    }
    let a = Agent::new("prefill", o).unwrap();
    if let Err(e) = a.add_backend("tcp", &Default::default()) {
        println!("NOTE no tcp backend: {e}");
    }
    let mut buf = HostBuffer::alloc(LEN, 4096).unwrap();
    buf.as_mut_slice().fill(0xEE);
    let region = Region::new(buf);
    let reg = a.register(&region).ok();
    // 1. Load the victim's metadata; if that works, overwrite its memory.
    match a.fetch_remote(addr.as_str()) {
        Ok(peer) => {
            let (_, _, remote) = a.remote_regions(peer).unwrap().remove(0);
            let local = DescriptorList::single(reg.as_ref().unwrap().descriptor()).unwrap();
            let at = remote.get(0).unwrap();
            let remote =
                DescriptorList::single(kv_core::Descriptor::new(at.addr, LEN as u64, at.device))
                    .unwrap();
            let moved = a
                .transfer(&TransferSpec::write(local, peer, remote), None)
                .and_then(|t| t.wait());
            println!("RESULT fetch ok, write {moved:?}");
        }
        Err(e) => println!("RESULT fetch refused: {e}"),
    }
    // 2. Push metadata that would replace the victim's peer "prefill".
    match a.publish_to(addr.as_str()) {
        Ok(()) => println!("RESULT put ok"),
        Err(e) => println!("RESULT put refused: {e}"),
    }
    println!("RESULT done");
    // Stay reachable until the parent is done.
    let mut s = String::new();
    let _ = std::io::stdin().read_line(&mut s);
}

#[test]
fn child_entry() {
    if let Ok(mode) = std::env::var("KV_AGENT_TRUST_CHILD") {
        child_main(&mode);
    }
}

struct Attacker(Child, mpsc::Receiver<String>);

impl Attacker {
    fn spawn(mode: &str, addr: &str, env_secret: Option<&ClusterSecret>) -> Attacker {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args(["--exact", "child_entry", "--nocapture", "--test-threads=1"])
            .env("KV_AGENT_TRUST_CHILD", mode)
            .env("KV_AGENT_TRUST_ADDR", addr)
            .env_remove("KVX_SECRET")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        if let Some(s) = env_secret {
            cmd.env("KVX_SECRET", s.to_hex());
        }
        let mut child = cmd.spawn().unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(|l| l.ok()) {
                let _ = tx.send(l);
            }
        });
        Attacker(child, rx)
    }

    /// The attacker's RESULT lines, up to `RESULT done`.
    fn results(&self) -> Vec<String> {
        let end = Instant::now() + Duration::from_secs(30);
        let mut v = Vec::new();
        while Instant::now() < end {
            if let Ok(l) = self.1.recv_timeout(Duration::from_millis(100)) {
                if let Some(i) = l.find("RESULT ") {
                    let r = l[i + 7..].to_string();
                    if r == "done" {
                        return v;
                    }
                    v.push(r);
                }
            }
        }
        panic!("the attacker did not finish: {v:?}");
    }
}

impl Drop for Attacker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn host_region(seed: u64) -> Region<HostBuffer> {
    let mut buf = HostBuffer::alloc(LEN, 4096).unwrap();
    buf.as_mut_slice().copy_from_slice(&pattern(seed, LEN));
    Region::new(buf)
}

fn tcp_agent(name: &str) -> Agent {
    let a = Agent::new(
        name,
        AgentOptions {
            progress_thread: true,
            default_deadline: Duration::from_secs(5),
            ..opts()
        },
    )
    .unwrap();
    a.add_backend("tcp", &Default::default()).unwrap();
    a
}

#[test]
fn a_process_without_the_secret_cannot_load_replace_or_move() {
    // The victim: decode, serving its side channel, with a real peer "prefill" loaded.
    let decode = tcp_agent("decode");
    let canary = host_region(1);
    let _rc = decode.register(&canary).unwrap();
    let addr = decode.listen("127.0.0.1:0").unwrap().to_string();
    let prefill = tcp_agent("prefill");
    let source = host_region(2);
    let rs = prefill.register(&source).unwrap();
    prefill.publish_to(addr.as_str()).unwrap();
    let real = decode.peer_by_name("prefill").unwrap();
    let (_, real_generation) = decode.peer_info(real).unwrap();

    let other = ClusterSecret::generate().unwrap();
    for (mode, env) in [("none", None), ("other", Some(&other))] {
        let attacker = Attacker::spawn(mode, &addr, env);
        let r = attacker.results();
        assert!(r[0].starts_with("fetch refused"), "{mode}: {r:?}");
        assert!(r[1].starts_with("put refused"), "{mode}: {r:?}");
        // The real peer is still the one loaded…
        assert_eq!(decode.peer_by_name("prefill"), Some(real), "{mode}");
        assert_eq!(decode.peer_info(real).unwrap().1, real_generation);
        // …so a READ from "prefill" brings the real peer's bytes, not the attacker's.
        let mut into = HostBuffer::alloc(LEN, 4096).unwrap();
        into.as_mut_slice().fill(0);
        let into = Region::new(into);
        let ri = decode.register(&into).unwrap();
        let t = decode
            .transfer(
                &TransferSpec::read(
                    DescriptorList::single(ri.descriptor()).unwrap(),
                    real,
                    DescriptorList::single(rs.descriptor()).unwrap(),
                ),
                None,
            )
            .unwrap();
        t.wait().unwrap();
        drop(t);
        // SAFETY: the READ into `into` completed; nothing else writes it.
        assert!(unsafe { into.memory() }.as_slice() == pattern(2, LEN).as_slice());
        // And not a byte of decode's memory changed.
        // SAFETY: no transfer names the canary now.
        assert!(
            unsafe { canary.memory() }.as_slice() == pattern(1, LEN).as_slice(),
            "{mode}"
        );
    }
}

#[test]
fn without_a_secret_networked_parts_refuse_to_start() {
    let a = Agent::new("lonely", AgentOptions::default());
    // The test harness may run with KVX_SECRET set; then the agent has one.
    if std::env::var_os("KVX_SECRET").is_some() {
        return;
    }
    let a = a.unwrap();
    let says_how = |e: Error| {
        let m = e.to_string();
        assert!(matches!(e, Error::InvalidArgument(_)), "{m}");
        assert!(
            m.contains("KVX_SECRET") && m.contains("allow_unauthenticated"),
            "{m}"
        );
    };
    says_how(a.listen("127.0.0.1:0").unwrap_err());
    says_how(a.fetch_remote("127.0.0.1:9").unwrap_err());
    says_how(a.publish_to("127.0.0.1:9").unwrap_err());
    says_how(a.add_backend("tcp", &Default::default()).unwrap_err());
    assert!(a.backends().is_empty());
    // A backend that moves data only in this process needs none.
    let f = LoopbackFabric::new();
    a.add_backend_instance(Arc::new(Hooked::new(
        loopback(&f, "lonely"),
        "lonely",
        "lb",
    )))
    .unwrap();
}

#[test]
fn unauthenticated_mode_is_explicit_and_does_not_mix() {
    let open = || AgentOptions {
        allow_unauthenticated: true,
        secret: None,
        ..Default::default()
    };
    if std::env::var_os("KVX_SECRET").is_some() {
        return;
    }
    let f = LoopbackFabric::new();
    let mk = |name: &str, o| {
        let a = Agent::new(name, o).unwrap();
        a.add_backend_instance(Arc::new(Hooked::new(loopback(&f, name), name, "lb")))
            .unwrap();
        a
    };
    let (d, p) = (mk("decode", open()), mk("prefill", open()));
    let addr = d.listen("127.0.0.1:0").unwrap();
    p.fetch_remote(addr).unwrap();
    p.publish_to(addr).unwrap();
    assert!(d.peer_by_name("prefill").is_some());
    // A client with the secret refuses an open server, and an open client cannot
    // answer a server that wants the secret: both say so.
    let s = mk("secure", opts());
    let e = s.fetch_remote(addr).unwrap_err();
    assert!(
        matches!(e, Error::Unauthenticated(ref m) if m.contains("without a cluster secret")),
        "{e}"
    );
    let saddr = s.listen("127.0.0.1:0").unwrap();
    let e = p.fetch_remote(saddr).unwrap_err();
    assert!(
        matches!(e, Error::Unauthenticated(ref m) if m.contains("requires the cluster secret")),
        "{e}"
    );
    // Another secret: refused at the handshake.
    let o = mk(
        "other",
        AgentOptions {
            secret: Some(ClusterSecret::generate().unwrap()),
            ..Default::default()
        },
    );
    assert!(matches!(
        o.fetch_remote(saddr),
        Err(Error::Unauthenticated(_))
    ));
    // The same secret: served.
    mk("friend", opts()).fetch_remote(saddr).unwrap();
    let _ = secret();
}

#[test]
fn the_side_channel_binds_to_loopback_unless_told() {
    let a = Agent::new("a", opts()).unwrap();
    let e = a.listen("0.0.0.0:0").unwrap_err();
    assert!(e.to_string().contains("bind_ip"), "{e}");
    let b = Agent::new(
        "b",
        AgentOptions {
            bind_ip: "0.0.0.0".parse().unwrap(),
            ..opts()
        },
    )
    .unwrap();
    b.listen("0.0.0.0:0").unwrap();
}
