//! Handshake messages from an unauthenticated peer (`kv_core::auth`): decoding never
//! panics; whatever decodes is exactly what its encoder writes, and the length prefix
//! a reader trusts ([`message_len`]) agrees with it.
#![no_main]
use kv_core::auth::{message_len, ClientHello, ServerHello, ServerProof, MAX_HANDSHAKE_MESSAGE};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let framed = |encoded: &[u8]| {
        assert_eq!(encoded, data, "a decoded message re-encodes to other bytes");
        assert!(data.len() <= MAX_HANDSHAKE_MESSAGE);
        let prefix = [data[0], data[1], data[2], data[3]];
        assert_eq!(message_len(prefix).ok(), Some(data.len()));
    };
    if let Ok(m) = ServerHello::decode(data) {
        framed(&m.encode());
    }
    if let Ok(m) = ClientHello::decode(data) {
        framed(&m.encode());
    }
    if let Ok(m) = ServerProof::decode(data) {
        framed(&m.encode());
    }
    if let Some(p) = data.get(..4) {
        if let Ok(n) = message_len([p[0], p[1], p[2], p[3]]) {
            assert!((4..=MAX_HANDSHAKE_MESSAGE).contains(&n));
        }
    }
});
