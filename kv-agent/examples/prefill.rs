//! The prefill side: fetches the decode side's metadata, then writes the KV cache into
//! it layer by layer, each layer followed by a notification, as a prefill engine does
//! while it computes. Run `decode` first (see examples/decode.rs) and give this side the
//! secret it printed in `KVX_SECRET` (the agent reads it from there).

use bytes::Bytes;
use kv_agent::layout::{ModelShape, PagedLayout};
use kv_agent::{Agent, AgentOptions, TransferSpec};
use kv_mem::{HostBuffer, Region};

fn main() -> kv_core::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:7000".into());
    let layout =
        PagedLayout::for_tokens(ModelShape::preset("llama3-8b").expect("preset"), 16, 2048)?;
    let agent = Agent::new("prefill", AgentOptions::default())?;
    agent.add_backend("tcp", &Default::default())?;
    let mut buf = HostBuffer::shared(layout.total_bytes() as usize)?;
    buf.as_mut_slice()
        .iter_mut()
        .enumerate()
        .for_each(|(i, b)| *b = (i % 251) as u8);
    let kv = Region::new(buf);
    let reg = agent.register(&kv)?;
    let decode = agent.fetch_remote(addr.as_str())?;
    let (_, _, remote) = agent.remote_regions(decode)?.remove(0);
    let (lbase, rbase) = (
        reg.descriptor().addr,
        remote.get(0).map(|d| d.addr).unwrap_or(0),
    );
    let pages: Vec<u64> = (0..layout.pages).collect();
    let start = std::time::Instant::now();
    let mut transfers = Vec::new();
    for layer in 0..layout.shape.layers {
        let spec = TransferSpec::write(
            layout.layer_descriptors(lbase, layer, &pages, 128)?,
            decode,
            layout.layer_descriptors(rbase, layer, &pages, 128)?,
        );
        // Post as each layer is "computed"; the transfer overlaps the next layer.
        transfers.push(agent.transfer(&spec, Some(Bytes::from(format!("layer {layer}"))))?);
    }
    for t in &transfers {
        t.wait()?;
    }
    agent.notify(decode, Bytes::from_static(b"done"))?;
    let secs = start.elapsed().as_secs_f64();
    println!(
        "prefill: {} MiB in {} layers over {} in {:.1} ms ({:.2} GB/s)",
        layout.total_bytes() >> 20,
        layout.shape.layers,
        transfers[0].backend(),
        secs * 1e3,
        layout.total_bytes() as f64 / secs / 1e9
    );
    Ok(())
}
