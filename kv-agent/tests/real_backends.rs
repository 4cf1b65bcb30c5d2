//! The agent drives every in-tree network backend for the same pair of peers and says
//! which one carried each transfer (tcp always; ucx and libfabric where installed, and
//! required when `KV_REQUIRE_BACKENDS` names them).

use std::time::Duration;

use kv_agent::{Agent, AgentOptions, TransferSpec};
use kv_core::conformance::pattern;
use kv_core::{DescriptorList, Params};
use kv_mem::{HostBuffer, Region};

/// The cluster secret both agents share.
fn secret() -> kv_core::auth::ClusterSecret {
    static S: std::sync::OnceLock<kv_core::auth::ClusterSecret> = std::sync::OnceLock::new();
    S.get_or_init(|| kv_core::auth::ClusterSecret::generate().unwrap())
        .clone()
}

fn agent(name: &str, backends: &[(&str, Params)]) -> (Agent, Vec<String>) {
    let a = Agent::new(
        name,
        AgentOptions {
            progress_thread: true,
            default_deadline: Duration::from_secs(20),
            secret: Some(secret()),
            ..Default::default()
        },
    )
    .unwrap();
    let mut loaded = Vec::new();
    for (b, params) in backends {
        if kv_core::require_or_skip(b, a.add_backend(b, params)).is_some() {
            loaded.push(b.to_string());
        }
    }
    (a, loaded)
}

#[test]
fn tcp_ucx_and_libfabric_for_the_same_peers() {
    let fabric = Params::from([("provider".to_string(), "tcp;ofi_rxm".to_string())]);
    let ucx = Params::from([("tls".to_string(), "tcp".to_string())]);
    let list = [("tcp", Params::new()), ("ucx", ucx), ("libfabric", fabric)];
    let (p, loaded) = agent("prefill", &list);
    let (d, loaded_d) = agent("decode", &list);
    assert_eq!(loaded, loaded_d);
    assert_eq!(p.backends(), loaded);
    let len = 1 << 20;
    let mut buf = HostBuffer::alloc(len, 4096).unwrap();
    buf.as_mut_slice().copy_from_slice(&pattern(11, len));
    let src = Region::new(buf);
    let dst = Region::new(HostBuffer::alloc(len * loaded.len(), 4096).unwrap());
    let rs = p.register(&src).unwrap();
    let _rd = d.register(&dst).unwrap();
    assert_eq!(rs.backends(), loaded, "every backend registers the region");
    let peer = p.load_remote(&d.local_metadata().unwrap()).unwrap();
    for (i, b) in loaded.iter().enumerate() {
        let mut spec = TransferSpec::write(
            DescriptorList::single(rs.descriptor()).unwrap(),
            peer,
            DescriptorList::single(dst.slice(i as u64 * len as u64, len as u64).unwrap()).unwrap(),
        );
        spec.backend = Some(b.clone());
        let t = p.transfer(&spec, Some(format!("via {b}").into())).unwrap();
        t.wait().unwrap_or_else(|e| panic!("{b}: {e}"));
        assert_eq!(t.backend(), b);
        // SAFETY: the transfer into these bytes completed; nothing else writes them.
        let got = unsafe { dst.bytes(i as u64 * len as u64, len as u64).unwrap() };
        assert!(
            got == pattern(11, len).as_slice(),
            "{b} moved the wrong bytes"
        );
    }
    // Each backend delivered its own notification.
    let mut got: Vec<String> = Vec::new();
    let end = std::time::Instant::now() + Duration::from_secs(10);
    while got.len() < loaded.len() && std::time::Instant::now() < end {
        got.extend(
            d.notifications()
                .unwrap()
                .into_iter()
                .map(|n| String::from_utf8_lossy(&n.payload).into_owned()),
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    got.sort();
    let mut want: Vec<String> = loaded.iter().map(|b| format!("via {b}")).collect();
    want.sort();
    assert_eq!(got, want);
    for (name, s) in p.stats() {
        assert_eq!(s.completed, 1, "{name}");
    }
}

/// The decode side frees a registration and registers new memory (often at the same
/// address) without publishing the removal: the next transfer goes to the new, live
/// registration, never to the revoked one.
#[test]
fn reregistered_memory_at_the_same_address_is_used() {
    let (p, _) = agent("prefill", &[("tcp", Params::new())]);
    let (d, _) = agent("decode", &[("tcp", Params::new())]);
    let len = 1 << 20;
    let src = Region::new(HostBuffer::shared(len).unwrap());
    let rs = p.register(&src).unwrap();
    for round in 0..3u64 {
        let dst = Region::new(HostBuffer::shared(len).unwrap());
        let rd = d.register(&dst).unwrap();
        let peer = p
            .load_remote(&d.partial_metadata(&[&rd]).unwrap())
            .or_else(|_| p.load_remote(&d.local_metadata().unwrap()))
            .unwrap();
        let t = p
            .transfer(
                &TransferSpec::write(
                    DescriptorList::single(rs.descriptor()).unwrap(),
                    peer,
                    DescriptorList::single(rd.descriptor()).unwrap(),
                ),
                None,
            )
            .unwrap();
        t.wait().unwrap_or_else(|e| panic!("round {round}: {e}"));
        drop(t);
        drop(rd);
        drop(dst);
    }
}

/// Until a backend enforces read-only registrations on its target side it must refuse
/// them (and say so in its capabilities), never accept one silently.
#[test]
fn read_only_registrations_are_refused_until_enforced() {
    let fabric = Params::from([("provider".to_string(), "tcp;ofi_rxm".to_string())]);
    let list = [
        ("tcp", Params::new()),
        ("ucx", Params::new()),
        ("libfabric", fabric),
        ("gds", Params::new()),
    ];
    let (a, loaded) = agent("ro", &list);
    assert!(loaded.len() >= 2, "{loaded:?}");
    let buf = HostBuffer::alloc(4096, 4096).unwrap();
    for name in &loaded {
        let b = a.backend(name).unwrap();
        if b.capabilities().read_only {
            continue;
        }
        // SAFETY: `buf` outlives the backend's use of it; the registration is refused
        // (and deregistered at once if a backend took it after all).
        let got = unsafe {
            b.register(
                kv_core::MemKind::Dram,
                &buf.descriptor(),
                kv_core::Access::ReadOnly,
            )
        };
        if let Ok(id) = &got {
            b.deregister(*id).unwrap();
        }
        assert!(
            matches!(&got, Err(kv_core::Error::Unsupported(m)) if m.contains("read-only")),
            "{name}: {got:?}"
        );
    }
}
