//! Backends as first-class plugins (issue 16): capabilities decide backend choice
//! (`local`/`remote`, fall-through with reasons), a third-party factory is created by
//! name like the built-ins, parameters are discoverable, a backend whose target side
//! needs progress is driven by the agent; and a WRITE into a region a peer published
//! read-only is refused before anything moves.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{agent, loopback, opts, pair, write1, Hooked, Hub};
use kv_agent::{Agent, AgentOptions};
use kv_core::conformance::pattern;
use kv_core::loopback::LoopbackFabric;
use kv_core::{Access, AgentMetadata, BackendInit, Error};

/// One side: a local-only backend `lo` on fabric `f1` and a remote-only `re` on `f2`,
/// with one region registered on both (the same simulated address in each space).
struct Side {
    agent: Agent,
    lo: Arc<Hooked>,
    region: kv_mem::Region<common::LoopMem>,
    _reg: kv_agent::Registration,
}

fn side(f1: &LoopbackFabric, f2: &LoopbackFabric, name: &str, o: AgentOptions, seed: u64) -> Side {
    let lo = Arc::new(Hooked::new(loopback(f1, name), name, "lo"));
    let mut re = Hooked::new(loopback(f2, name), name, "re");
    (re.local, re.remote) = (false, true);
    let re = Arc::new(re);
    let region = lo.region(4096, seed);
    assert_eq!(re.inner.alloc(4096), kv_mem::Region::descriptor(&region));
    re.inner
        .write_mem(region.descriptor().addr, &pattern(seed, 4096))
        .unwrap();
    let agent = agent(name, o, vec![lo.clone(), re]);
    let _reg = agent.register(&region).unwrap();
    Side {
        agent,
        lo,
        region,
        _reg,
    }
}

/// `meta` with its locality attribute replaced (as if published from another host).
fn elsewhere(meta: &[u8]) -> Bytes {
    let mut m = AgentMetadata::decode(meta).unwrap();
    for (n, v) in &mut m.attributes {
        if n == "kv-agent/locality" {
            *v = Bytes::from(vec![0x5a; 32]);
        }
    }
    m.encode().unwrap()
}

#[test]
fn capabilities_local_and_remote_decide_the_backend() {
    let (f1, f2) = (LoopbackFabric::new(), LoopbackFabric::new());
    // The preference names the remote-only backend first: a peer in this process
    // cannot be served by it, so the choice falls through to the local one.
    let p = side(
        &f1,
        &f2,
        "prefill",
        AgentOptions {
            backend_preference: vec!["re".into(), "lo".into()],
            ..opts()
        },
        1,
    );
    let d = side(&f1, &f2, "decode", opts(), 2);
    let peer = p
        .agent
        .load_remote(&d.agent.local_metadata().unwrap())
        .unwrap();
    let spec = write1(p.region.descriptor(), peer, d.region.descriptor());
    let t = p.agent.transfer(&spec, None).unwrap();
    t.wait().unwrap();
    assert_eq!(t.backend(), "lo", "{}", t.choice_reason());
    assert!(
        t.choice_reason()
            .contains("re (the peer is in this process"),
        "{}",
        t.choice_reason()
    );
    assert_eq!(d.lo.read(d.region.descriptor()), pattern(1, 4096));

    // The same peer published from another host: only the remote-capable backend fits.
    let far = side(&f1, &f2, "far", opts(), 3);
    let peer = p
        .agent
        .load_remote(&elsewhere(&far.agent.local_metadata().unwrap()))
        .unwrap();
    let t = p
        .agent
        .prepare(&write1(
            p.region.descriptor(),
            peer,
            far.region.descriptor(),
        ))
        .unwrap();
    assert_eq!(t.backend(), "re", "{}", t.choice_reason());
    assert!(t
        .choice_reason()
        .contains("lo (the peer runs on another host"));
    // Naming the local-only backend for it is refused with every backend's reason.
    let mut s = write1(p.region.descriptor(), peer, far.region.descriptor());
    s.backend = Some("lo".into());
    match p.agent.prepare(&s) {
        Err(Error::Unsupported(m)) => {
            assert!(m.contains("lo (the peer runs on another host"), "{m}");
            assert!(m.contains("re (the spec names another backend"), "{m}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_unreachable_preferred_backend_falls_through() {
    let (f1, f2) = (LoopbackFabric::new(), LoopbackFabric::new());
    let mk = |name: &str, o: AgentOptions, seed| {
        let mut broken = Hooked::new(loopback(&f1, name), name, "broken");
        broken.fail_connect = true;
        let broken = Arc::new(broken);
        let good = Arc::new(Hooked::new(loopback(&f2, name), name, "good"));
        let region = good.region(4096, seed);
        assert_eq!(broken.inner.alloc(4096), region.descriptor());
        let a = agent(name, o, vec![broken, good.clone()]);
        let reg = a.register(&region).unwrap();
        (a, good, region, reg)
    };
    let (p, _, src, _rs) = mk(
        "prefill",
        AgentOptions {
            backend_preference: vec!["broken".into(), "good".into()],
            ..opts()
        },
        7,
    );
    let (d, dgood, dst, _rd) = mk("decode", opts(), 8);
    let peer = p.load_remote(&d.local_metadata().unwrap()).unwrap();
    let t = p
        .transfer(&write1(src.descriptor(), peer, dst.descriptor()), None)
        .unwrap();
    t.wait().unwrap();
    assert_eq!(t.backend(), "good");
    assert!(
        t.choice_reason().contains("broken (cannot reach the peer"),
        "{}",
        t.choice_reason()
    );
    assert_eq!(dgood.read(dst.descriptor()), pattern(7, 4096));
}

fn third_party(
    init: &BackendInit,
    _: &kv_core::Params,
) -> kv_core::Result<Arc<dyn kv_core::Backend>> {
    static F: std::sync::OnceLock<LoopbackFabric> = std::sync::OnceLock::new();
    let f = F.get_or_init(LoopbackFabric::new);
    Ok(Arc::new(Hooked::new(
        f.backend(init),
        &init.agent_name,
        "third-party",
    )))
}

#[test]
fn a_registered_factory_works_like_the_built_ins() {
    let a = Agent::new("a", AgentOptions::default()).unwrap();
    let e = a
        .add_backend("third-party", &Default::default())
        .unwrap_err();
    assert!(matches!(e, Error::BackendUnavailable { .. }), "{e}");
    kv_agent::register_backend_factory("third-party", third_party).unwrap();
    assert!(kv_agent::register_backend_factory("third-party", third_party).is_err());
    assert!(kv_agent::register_backend_factory("tcp", third_party).is_err());
    kv_agent::register_backend_params(
        "third-party",
        vec![kv_agent::ParamDoc::new("depth", "4", "how deep")],
    )
    .unwrap();
    // Local-only (not networked): it needs no cluster secret.
    a.add_backend("third-party", &Default::default()).unwrap();
    assert_eq!(a.backends(), vec!["third-party".to_string()]);
    let docs = a.backend_params("third-party").unwrap();
    assert_eq!(docs[0].name, "depth");
    let tcp = a.backend_params("tcp").unwrap();
    assert!(tcp
        .iter()
        .any(|p| p.name == "same_host" && p.default == "true"));
    assert!(a.backend_params("no-such").is_err());
}

/// Every documented parameter of every in-tree backend is one the backend knows (a
/// wrong value may be refused, an unknown key must not be).
#[test]
#[cfg(all(
    feature = "tcp",
    feature = "ucx",
    feature = "libfabric",
    feature = "gds"
))]
fn documented_params_are_known_to_their_backends() {
    let init = BackendInit::new("params").with_secret(common::secret());
    for (backend, unknown) in [
        ("tcp", "unknown tcp option"),
        ("ucx", "unknown ucx param"),
        ("libfabric", "unknown libfabric parameter"),
        ("gds", "unknown gds param"),
    ] {
        let docs = kv_agent::backend_params(backend).unwrap();
        assert!(!docs.is_empty(), "{backend}");
        for d in docs {
            let name = d.name.replace("<NAME>", "TEST");
            let params = kv_core::Params::from([(name.clone(), "\u{1}".to_string())]);
            let made = match backend {
                "tcp" => kv_backend_tcp::create(&init, &params).map(drop),
                "ucx" => kv_backend_ucx::create(&init, &params).map(drop),
                "libfabric" => kv_backend_libfabric::create(&init, &params).map(drop),
                _ => kv_backend_gds::create(&init, &params).map(drop),
            };
            if let Err(e) = made {
                assert!(!e.to_string().contains(unknown), "{backend} {name}: {e}");
            }
        }
    }
}

#[test]
fn a_target_that_needs_progress_is_driven_by_its_agent() {
    let hub = Arc::new(Hub::default());
    // Decode never calls progress, wait or notifications itself.
    let x = pair(
        "tp",
        5,
        |pb| pb.hub = Some(hub.clone()),
        |db| db.hub = Some(hub.clone()),
    );
    let (p, d, db, dst) = (&x.p, &x.d, &x.db, &x.dst);
    let mut spec = x.write();
    spec.deadline = Some(Duration::from_secs(3));
    let t = p.transfer(&spec, Some("after the data".into())).unwrap();
    let start = Instant::now();
    t.wait().unwrap();
    assert!(start.elapsed() < Duration::from_secs(2));
    assert_eq!(db.read(dst.descriptor()), pattern(5, 4096));
    let end = Instant::now() + Duration::from_secs(2);
    let mut got = Vec::new();
    while got.is_empty() && Instant::now() < end {
        got = d.notifications().unwrap();
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(
        got.first().map(|n| n.payload.clone()),
        Some("after the data".into())
    );
}

#[test]
fn a_write_into_a_read_only_remote_region_is_refused_early() {
    let x = pair("lb", 1, |_| {}, |_| {});
    let (p, pb, db, src, dst) = (&x.p, &x.pb, &x.db, &x.src, &x.dst);
    // Decode publishes its region read-only.
    let mut m = AgentMetadata::decode(&x.d.local_metadata().unwrap()).unwrap();
    m.registrations[0].access = Access::ReadOnly;
    let peer = p.load_remote(&m.encode().unwrap()).unwrap();
    assert_eq!(peer, x.peer);
    let e = p.prepare(&x.write()).unwrap_err();
    assert!(matches!(e, Error::AccessDenied(_)), "{e}");
    assert_eq!(db.read(dst.descriptor()), pattern(2, 4096));
    // READs from it are fine.
    let mut s = x.write();
    s.op = kv_core::Op::Read;
    p.transfer(&s, None).unwrap().wait().unwrap();
    assert_eq!(pb.read(src.descriptor()), pattern(2, 4096));
}

/// Issue 14 item 3 through the agent: `RegisterOptions::access = ReadOnly` reaches the
/// backend and the metadata. A peer's WRITE into the region is refused before it moves a
/// byte, its READ works; a local read-only region is a WRITE's source but never a READ's
/// destination.
#[test]
fn read_only_registrations_through_the_agent() {
    let x = pair("lb", 5, |_| {}, |_| {});
    let ro = kv_agent::RegisterOptions {
        access: Access::ReadOnly,
        ..Default::default()
    };
    // Decode exports a second region read-only.
    let shared = x.db.region(4096, 40);
    let rshared = x.d.register_with(&shared, &ro).unwrap();
    let m = AgentMetadata::decode(&x.d.local_metadata().unwrap()).unwrap();
    let published: Vec<_> = m.registrations.iter().map(|r| r.access).collect();
    assert!(published.contains(&Access::ReadOnly), "{published:?}");
    let peer = x.p.load_remote(&x.d.local_metadata().unwrap()).unwrap();
    let into_ro = write1(x.src.descriptor(), peer, rshared.descriptor());
    let e = x.p.prepare(&into_ro).unwrap_err();
    assert!(matches!(e, Error::AccessDenied(_)), "{e}");
    assert_eq!(x.db.read(shared.descriptor()), pattern(40, 4096));
    let mut read = into_ro.clone();
    read.op = kv_core::Op::Read;
    x.p.transfer(&read, None).unwrap().wait().unwrap();
    assert_eq!(x.pb.read(x.src.descriptor()), pattern(40, 4096));
    // Prefill's own read-only region: a WRITE's source, never a READ's destination.
    let mine = x.pb.region(4096, 41);
    let rmine = x.p.register_with(&mine, &ro).unwrap();
    let mut pull = write1(rmine.descriptor(), peer, x.rd.descriptor());
    pull.op = kv_core::Op::Read;
    let e = x.p.prepare(&pull).unwrap_err();
    assert!(matches!(e, Error::AccessDenied(_)), "{e}");
    assert_eq!(x.pb.read(mine.descriptor()), pattern(41, 4096));
    let push = write1(rmine.descriptor(), peer, x.rd.descriptor());
    x.p.transfer(&push, None).unwrap().wait().unwrap();
    assert_eq!(x.db.read(x.rd.descriptor()), pattern(41, 4096));
}
