//! kv-backend-tcp wire input from a peer: frame headers, segment tables, connection
//! info and remote keys never panic; what decodes re-encodes to the same header.
#![no_main]
use kv_backend_tcp::wire;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = wire::decode_header(data) {
        assert_eq!(wire::decode_header(&wire::encode_header(&h)).ok(), Some(h.clone()));
        let mut out = Vec::new();
        let rest = data.get(wire::HEADER_LEN..).unwrap_or(&[]);
        let _ = wire::decode_segments(&h, rest, &mut out);
    }
    let _ = wire::ConnectionInfo::decode(data);
    let _ = wire::RemoteKey::decode(data);
});
