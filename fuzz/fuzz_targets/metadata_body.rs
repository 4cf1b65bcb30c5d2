//! The v2 metadata body past the header checks: the harness frames the fuzzer's bytes
//! with a valid header, length and CRC32C, so every input reaches the field decoders
//! (attributes, backends, registrations with their access mode and keys, removals).
//! Decoding never panics, what decodes respects the limits and re-encodes to the same
//! value.
#![no_main]
use kv_core::codec::{HEADER_LEN, MAGIC, MAX_ATTRIBUTES, MAX_ATTRIBUTE_BYTES, VERSION};
use kv_core::{Access, AgentMetadata};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, body)) = data.split_first() else {
        return;
    };
    let mut msg = Vec::with_capacity(HEADER_LEN + body.len());
    msg.extend_from_slice(&MAGIC);
    msg.extend_from_slice(&VERSION.to_le_bytes());
    // Mostly the two valid flag values; sometimes unknown bits.
    msg.extend_from_slice(&u16::from(flags % 3).to_le_bytes());
    msg.extend_from_slice(&(body.len() as u32).to_le_bytes());
    msg.extend_from_slice(&crc32c::crc32c(body).to_le_bytes());
    msg.extend_from_slice(&[0; 4]);
    msg.extend_from_slice(body);
    let Ok(m) = AgentMetadata::decode(&msg) else {
        return;
    };
    assert_eq!(m.partial, flags % 3 == 1);
    assert!(m.attributes.len() <= MAX_ATTRIBUTES);
    assert!(m
        .attributes
        .iter()
        .all(|(_, v)| v.len() <= MAX_ATTRIBUTE_BYTES));
    for r in &m.registrations {
        assert_eq!(Access::from_u8(r.access.as_u8()), Some(r.access));
        assert!(r.keys.iter().all(|(i, _)| (*i as usize) < m.backends.len()));
    }
    let again = m.encode().expect("a decoded message re-encodes");
    assert_eq!(AgentMetadata::decode(&again).expect("round trip"), m);
});
