//! A full cluster-secret handshake whose transcript the fuzzer tampers with: a message
//! changed in flight, a peer with another secret or another channel purpose, or a
//! client hello forged from scratch must never authenticate, and a forged frame tag
//! never verifies. The untouched handshake must succeed (the check is not vacuous).
#![no_main]
use kv_core::auth::{
    ClientHandshake, ClientHello, ClusterSecret, ServerHandshake, ServerHello, ServerProof, TAG_LEN,
};
use libfuzzer_sys::fuzz_target;

const PURPOSE: &[u8] = b"fuzz channel";
const OTHER_PURPOSE: &[u8] = b"fuzz channel 2";
const SECRET: [u8; 32] = [7; 32];

/// Applies the fuzzer's edit to `wire`: XOR a pattern in at an offset, then truncate
/// or extend. Returns `None` when the edit leaves the bytes unchanged.
fn tamper(wire: &[u8], edit: &[u8]) -> Option<Vec<u8>> {
    let (&at, rest) = edit.split_first()?;
    let (&cut, pattern) = rest.split_first()?;
    let mut v = wire.to_vec();
    let start = at as usize % (v.len() + 1);
    for (b, p) in v.iter_mut().skip(start).zip(pattern) {
        *b ^= p;
    }
    match cut % 4 {
        1 => v.truncate(v.len().saturating_sub(1 + cut as usize / 4)),
        2 => v.extend_from_slice(pattern),
        _ => {}
    }
    (v != wire).then_some(v)
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, edit)) = data.split_first() else {
        return;
    };
    let secret = ClusterSecret::new(&SECRET).expect("a 32-byte secret");
    let name = "client-0";
    let (server, hello) = ServerHandshake::start(&secret, PURPOSE).expect("randomness");
    let hello_wire = hello.encode();
    match mode % 6 {
        // The server's hello changed in flight: the server must refuse the answer.
        0 => {
            let Some(v) = tamper(&hello_wire, edit) else {
                return;
            };
            let Ok(h) = ServerHello::decode(&v) else {
                return;
            };
            let (_, answer) =
                ClientHandshake::respond(&secret, PURPOSE, name, &h).expect("respond");
            assert!(
                server.finish(&answer).is_err(),
                "accepted an answer to a changed hello"
            );
        }
        // The client's answer changed in flight: refused by the server.
        1 => {
            let (_, answer) =
                ClientHandshake::respond(&secret, PURPOSE, name, &hello).expect("respond");
            let Some(v) = tamper(&answer.encode(), edit) else {
                return;
            };
            let accepted = ClientHello::decode(&v).and_then(|h| server.finish(&h));
            assert!(accepted.is_err(), "accepted a changed client hello");
        }
        // The server's proof changed in flight: refused by the client.
        2 => {
            let (client, answer) =
                ClientHandshake::respond(&secret, PURPOSE, name, &hello).expect("respond");
            let (proof, _) = server
                .finish(&answer)
                .expect("the genuine answer authenticates");
            let Some(v) = tamper(&proof.encode(), edit) else {
                return;
            };
            let accepted = ServerProof::decode(&v).and_then(|p| client.finish(&p));
            assert!(accepted.is_err(), "accepted a changed server proof");
        }
        // A client with another secret (from the fuzzer), or on another channel.
        3 => {
            let (other, purpose) = if edit.first().is_some_and(|b| b & 1 == 1) {
                (secret.clone(), OTHER_PURPOSE)
            } else {
                let mut s = edit.to_vec();
                s.resize(s.len().max(16), 0);
                (ClusterSecret::new(&s).expect("at least 16 bytes"), PURPOSE)
            };
            let same = purpose == PURPOSE && other.to_hex() == secret.to_hex();
            let (client, answer) =
                ClientHandshake::respond(&other, purpose, name, &hello).expect("respond");
            match server.finish(&answer) {
                Ok((proof, peer)) => {
                    assert!(
                        same,
                        "a client with another secret or purpose authenticated"
                    );
                    let key = client
                        .finish(&proof)
                        .expect("the genuine proof authenticates");
                    peer.key
                        .verify(0, b"frame", &key.tag(0, b"frame"))
                        .expect("same key");
                }
                Err(_) => assert!(!same, "the genuine handshake failed"),
            }
        }
        // A client hello forged without the secret.
        4 => {
            if let Ok(h) = ClientHello::decode(edit) {
                assert!(
                    server.finish(&h).is_err(),
                    "a forged client hello authenticated"
                );
            }
        }
        // A forged frame tag under a genuine session key.
        _ => {
            let (client, answer) =
                ClientHandshake::respond(&secret, PURPOSE, name, &hello).expect("respond");
            let (proof, peer) = server
                .finish(&answer)
                .expect("the genuine answer authenticates");
            let key = client
                .finish(&proof)
                .expect("the genuine proof authenticates");
            let Some((&seq, rest)) = edit.split_first() else {
                return;
            };
            let (tag, frame) = rest.split_at(rest.len().min(TAG_LEN));
            if tag != key.tag(u64::from(seq), frame) {
                assert!(
                    peer.key.verify(u64::from(seq), frame, tag).is_err(),
                    "a forged tag verified"
                );
            }
        }
    }
});
