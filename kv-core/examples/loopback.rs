//! Moves one Llama-3-8B-shaped layer of KV pages between two loopback backends and
//! verifies it: the smallest end-to-end use of the `Backend` trait.

use kv_core::loopback::LoopbackFabric;
use kv_core::{
    Access, Backend, BackendInit, DescriptorList, MemKind, Op, PostOptions, Status, TransferRequest,
};

fn main() -> kv_core::Result<()> {
    // One layer's K and V: 512 pages of 16 tokens × 8 kv-heads × 128 dims × 2 bytes = 32 KiB.
    let (pages, page) = (512u64, 16 * 8 * 128 * 2u64);
    let fabric = LoopbackFabric::new();
    // Both agents share a cluster secret: `connect` runs the authentication handshake.
    let secret = kv_core::auth::ClusterSecret::generate()?;
    let (prefill, decode) = (
        fabric.backend(&BackendInit::new("prefill").with_secret(secret.clone())),
        fabric.backend(&BackendInit::new("decode").with_secret(secret)),
    );
    let src = prefill.alloc((2 * pages * page) as usize);
    let dst = decode.alloc((2 * pages * page) as usize);
    let data = kv_core::conformance::pattern(1, src.len as usize);
    prefill.write_mem(src.addr, &data)?;
    // SAFETY: loopback memory is owned by its backend and outlives the registration.
    let (_rs, rd) = unsafe {
        (
            prefill.register(MemKind::Dram, &src, Access::ReadWrite)?,
            decode.register(MemKind::Dram, &dst, Access::ReadWrite)?,
        )
    };
    let peer = prefill.connect("decode", &decode.connection_info()?)?;
    prefill.import_remote(peer, MemKind::Dram, &dst, &decode.remote_key(rd)?)?;
    let req = TransferRequest {
        op: Op::Write,
        local_kind: MemKind::Dram,
        local: DescriptorList::strided(src.addr, page, 2 * pages, page, 0)?,
        peer,
        remote_kind: MemKind::Dram,
        remote: DescriptorList::strided(dst.addr, page, 2 * pages, page, 0)?,
    };
    let t = prefill.prepare(&req)?;
    let start = std::time::Instant::now();
    // SAFETY: the source stays registered until the transfer is done.
    unsafe { prefill.post(t, &PostOptions::default())? };
    // The loopback moves at most 1 MiB per `progress` call, like a NIC with a queue.
    let mut st = prefill.poll(t);
    for _ in 0..10_000 {
        if st.is_finished() {
            break;
        }
        prefill.progress()?;
        st = prefill.poll(t);
    }
    let Status::Done = st else {
        return Err(kv_core::Error::invalid_argument(format!(
            "transfer ended {st:?}"
        )));
    };
    let ok = decode.read_mem(dst.addr, dst.len as usize)? == data;
    println!(
        "moved {} pages ({} MiB) in {:?}: {}",
        2 * pages,
        dst.len >> 20,
        start.elapsed(),
        if ok { "verified" } else { "MISMATCH" }
    );
    if ok {
        Ok(())
    } else {
        Err(kv_core::Error::Corrupt("destination differs".into()))
    }
}
