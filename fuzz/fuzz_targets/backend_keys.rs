//! Remote keys from a peer through the public `Backend` surface of the UCX, libfabric
//! and TCP backends (their wire decoders are private to the crates): `import_remote`
//! of a fuzzed key — from scratch or a genuine key with bytes changed, optionally
//! resealed with a valid trailing CRC32C so checksummed formats reach their field
//! decoders (and UCX's `ucp_ep_rkey_unpack`) — never panics or crashes, an import
//! never covers more than its key, and `prepare` against it checks bounds.
//!
//! UCX is fuzzed only with `KVX_FUZZ_UCX=1`: UCX 1.13 crashes (SIGSEGV in
//! `uct_posix_rkey_release`, from the error path of `ucp_ep_rkey_unpack`) on a packed
//! rkey with a few bytes changed, which stops every run at once; the input is kept in
//! `fuzz/known-crashes/` (see fuzz/README.md).
//!
//! Each pair of backends is connected once, on loopback or shared memory, to a genuine
//! peer; connection info is not fuzzed here, because a forged address could make a
//! transport connect to an address that is not on this machine.
#![no_main]
use std::sync::{Arc, OnceLock};

use kv_core::auth::ClusterSecret;
use kv_core::{
    Access, Backend, BackendInit, Descriptor, DescriptorList, EndpointId, MemKind, Op, Params,
    RegistrationId, TransferRequest,
};
use libfuzzer_sys::fuzz_target;

const BUF: usize = 64 << 10;

/// One connected pair: `a` imports keys of `b`'s registration `key`.
struct Pair {
    a: Arc<dyn Backend>,
    _b: Arc<dyn Backend>,
    peer: EndpointId,
    key: Vec<u8>,
    /// `b`'s registered range (what a genuine key covers).
    target: Descriptor,
    /// `a`'s registered local buffer.
    local: Descriptor,
    _regs: (RegistrationId, RegistrationId),
}

fn params(kv: &[(&str, &str)]) -> Params {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn pair(create: kv_core::BackendFactory, p: &Params) -> Option<Pair> {
    let secret = ClusterSecret::new(&[9; 32]).ok()?;
    let a = create(&BackendInit::new("a").with_secret(secret.clone()), p).ok()?;
    let b = create(&BackendInit::new("b").with_secret(secret), p).ok()?;
    // Buffers that live as long as the process: the backends may touch them until then.
    let buf = |n| {
        Descriptor::new(
            Box::leak(vec![0u8; n].into_boxed_slice()).as_ptr() as u64,
            n as u64,
            0,
        )
    };
    let (local, target) = (buf(BUF), buf(BUF));
    // SAFETY: both ranges are leaked heap buffers, valid for reads and writes forever.
    let ra = unsafe { a.register(MemKind::Dram, &local, Access::ReadWrite) }.ok()?;
    // SAFETY: as above.
    let rb = unsafe { b.register(MemKind::Dram, &target, Access::ReadWrite) }.ok()?;
    let peer = a.connect("b", &b.connection_info().ok()?).ok()?;
    let key = b.remote_key(rb).ok()?.to_vec();
    Some(Pair {
        a,
        _b: b,
        peer,
        key,
        target,
        local,
        _regs: (ra, rb),
    })
}

fn pairs() -> &'static [Pair] {
    static PAIRS: OnceLock<Vec<Pair>> = OnceLock::new();
    PAIRS.get_or_init(|| {
        let ucx = std::env::var_os("KVX_FUZZ_UCX").is_some_and(|v| v == "1");
        if ucx {
            // UCX's malloc/mmap hooks (UCM) patch the functions AddressSanitizer
            // intercepts; with them on, the instrumented process jumps to a wild address.
            std::env::set_var("UCX_MEM_EVENTS", "no");
        }
        let all = [
            ucx.then(|| {
                pair(
                    kv_backend_ucx::create,
                    &params(&[("tls", "posix,cma,self")]),
                )
            })
            .flatten(),
            pair(
                kv_backend_libfabric::create,
                &params(&[("provider", "shm")]),
            ),
            pair(
                kv_backend_tcp::create,
                &params(&[("listen", "127.0.0.1:0")]),
            ),
        ];
        let names = ["ucx", "libfabric", "tcp"];
        for (p, n) in all.iter().zip(names) {
            if p.is_none() {
                eprintln!("backend_keys: {n} unavailable, not fuzzed");
            }
        }
        all.into_iter().flatten().collect()
    })
}

fn u64_at(d: &[u8], i: usize) -> u64 {
    let mut b = [0u8; 8];
    for (j, x) in b.iter_mut().enumerate() {
        *x = d.get(i + j).copied().unwrap_or(0);
    }
    u64::from_le_bytes(b)
}

fuzz_target!(|data: &[u8]| {
    let pairs = pairs();
    if pairs.is_empty() || data.len() < 18 {
        return;
    }
    let mode = data[0];
    let p = &pairs[(mode >> 2) as usize % pairs.len()];
    let (off, len) = (u64_at(data, 2), u64_at(data, 10));
    let rest = &data[18..];
    let mut key = if mode & 2 == 0 {
        rest.to_vec()
    } else {
        // A genuine key, changed: XOR the fuzzer's bytes in at an offset.
        let mut k = p.key.clone();
        let at = data[1] as usize % (k.len() + 1);
        for (b, x) in k.iter_mut().skip(at).zip(rest) {
            *b ^= x;
        }
        k
    };
    if mode & 1 == 1 && key.len() >= 4 {
        // Reseal: a valid trailing CRC32C over the rest.
        let n = key.len() - 4;
        let crc = crc32c::crc32c(&key[..n]);
        key[n..].copy_from_slice(&crc.to_le_bytes());
    }
    // Offsets mostly relative to the genuine target, so imports land near it.
    let desc = if data[1] & 0x80 == 0 {
        Descriptor::new(
            p.target.addr.wrapping_add(off % (2 * BUF as u64)),
            len % (2 * BUF as u64),
            0,
        )
    } else {
        Descriptor::new(off, len, (data[1] & 3) as u32)
    };
    let kind = MemKind::from_u8(data[1] % 6).unwrap_or(MemKind::Dram);
    let Ok(remote) = p.a.import_remote(p.peer, kind, &desc, &key) else {
        return;
    };
    if key == p.key {
        assert!(
            p.target.contains(&desc),
            "genuine key imported {desc:?} outside {:?}",
            p.target
        );
    }
    // A READ of the first bytes of the import, and one past its end, into local memory.
    let n = desc.len.min(BUF as u64);
    for (r, should_fit) in [(desc.addr, true), (desc.addr.wrapping_add(desc.len), false)] {
        let (Ok(l), Ok(rm)) = (
            DescriptorList::single(Descriptor::new(p.local.addr, n.max(1), 0)),
            DescriptorList::single(Descriptor::new(r, n.max(1), desc.device)),
        ) else {
            continue;
        };
        let req = TransferRequest {
            op: Op::Read,
            local_kind: MemKind::Dram,
            local: l,
            peer: p.peer,
            remote_kind: kind,
            remote: rm,
        };
        match p.a.prepare(&req) {
            Ok(t) => {
                assert!(
                    should_fit && n > 0,
                    "prepared a READ outside the import {desc:?}"
                );
                let _ = p.a.release(t);
            }
            Err(_) => {}
        }
    }
    p.a.release_remote(remote).expect("releasing an import");
});
