//! Agent attributes travel in metadata: a full message replaces what a peer knew, a
//! partial one replaces them only when it carries any.

use std::sync::Arc;

use bytes::Bytes;
use kv_agent::{Agent, AgentOptions};
use kv_core::loopback::LoopbackFabric;
use kv_core::BackendInit;

fn attr(name: &str, value: &'static [u8]) -> (String, Bytes) {
    (name.to_string(), Bytes::from_static(value))
}

fn agent(f: &LoopbackFabric, name: &str, opts: AgentOptions) -> Agent {
    let a = Agent::new(name, opts).unwrap();
    a.add_backend_instance(Arc::new(f.backend(&BackendInit::new(name))))
        .unwrap();
    a
}

#[test]
fn attributes_follow_full_and_partial_metadata() {
    let f = LoopbackFabric::new();
    let opts = AgentOptions {
        attributes: vec![attr("kv_layout", b"llama/bf16/16"), attr("tp", b"0/2")],
        ..Default::default()
    };
    let d = agent(&f, "decode", opts);
    let p = agent(&f, "prefill", AgentOptions::default());
    let peer = p.load_remote(&d.local_metadata().unwrap()).unwrap();
    assert_eq!(
        p.peer_attributes(peer).unwrap(),
        vec![attr("kv_layout", b"llama/bf16/16"), attr("tp", b"0/2")]
    );

    // A partial message carries the current attributes: they replace the old ones.
    d.set_attributes(vec![attr("tp", b"1/2")]).unwrap();
    assert_eq!(
        p.load_remote(&d.partial_metadata(&[]).unwrap()).unwrap(),
        peer
    );
    assert_eq!(p.peer_attributes(peer).unwrap(), vec![attr("tp", b"1/2")]);

    // A partial message without attributes leaves them as they were; a full one clears.
    d.set_attributes(Vec::new()).unwrap();
    p.load_remote(&d.partial_metadata(&[]).unwrap()).unwrap();
    assert_eq!(p.peer_attributes(peer).unwrap(), vec![attr("tp", b"1/2")]);
    p.load_remote(&d.local_metadata().unwrap()).unwrap();
    assert!(p.peer_attributes(peer).unwrap().is_empty());
}

#[test]
fn oversized_attributes_are_refused_up_front() {
    let too_long = Bytes::from(vec![0u8; kv_core::codec::MAX_ATTRIBUTE_BYTES + 1]);
    let opts = AgentOptions {
        attributes: vec![("big".into(), too_long.clone())],
        ..Default::default()
    };
    assert!(Agent::new("a", opts).is_err());
    let a = Agent::new("a", AgentOptions::default()).unwrap();
    let many = (0..=kv_core::codec::MAX_ATTRIBUTES)
        .map(|i| (format!("k{i}"), Bytes::new()))
        .collect();
    assert!(a.set_attributes(many).is_err());
    assert!(a.set_attributes(vec![("big".into(), too_long)]).is_err());
    a.set_attributes(vec![attr("ok", b"1")]).unwrap();
}
