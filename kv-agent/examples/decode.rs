//! The decode side of a disaggregated pair: registers a KV cache, serves its metadata on
//! a side channel, and reports each layer as the prefill side's notifications arrive.
//!
//! Both sides must share a cluster secret (`KVX_SECRET`, hex); without one the decode
//! side generates one and prints it:
//!
//! ```sh
//! cargo run --release -p kv-agent --example decode -- 127.0.0.1:7000   # prints KVX_SECRET=…
//! KVX_SECRET=<printed> cargo run --release -p kv-agent --example prefill -- 127.0.0.1:7000
//! ```

use std::time::{Duration, Instant};

use kv_agent::layout::{ModelShape, PagedLayout};
use kv_agent::{Agent, AgentOptions};
use kv_core::auth::ClusterSecret;
use kv_mem::{HostBuffer, Region};

fn main() -> kv_core::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:7000".into());
    // Llama-3-8B, 2048 tokens in 16-token pages: 256 MiB of KV.
    let layout =
        PagedLayout::for_tokens(ModelShape::preset("llama3-8b").expect("preset"), 16, 2048)?;
    // The secret from KVX_SECRET, else a fresh one the prefill side must be given.
    let secret = match std::env::var(kv_agent::SECRET_ENV) {
        Ok(hex) => ClusterSecret::from_hex(&hex)?,
        Err(_) => {
            let s = ClusterSecret::generate()?;
            println!("decode: start prefill with KVX_SECRET={}", s.to_hex());
            s
        }
    };
    let agent = Agent::new(
        "decode",
        AgentOptions {
            progress_thread: true,
            secret: Some(secret),
            ..Default::default()
        },
    )?;
    agent.add_backend("tcp", &Default::default())?;
    let kv = Region::new(HostBuffer::shared(layout.total_bytes() as usize)?);
    let _reg = agent.register(&kv)?;
    let bound = agent.listen(&addr)?;
    println!(
        "decode: {} MiB of KV registered; metadata on {bound}; waiting for prefill",
        layout.total_bytes() >> 20
    );
    let start = Instant::now();
    let mut layers = 0;
    while start.elapsed() < Duration::from_secs(600) {
        for n in agent.notifications()? {
            let text = String::from_utf8_lossy(&n.payload).into_owned();
            if text == "done" {
                // SAFETY: "done" follows every layer's data; prefill posts nothing more.
                let sum: u64 = unsafe { kv.memory() }
                    .as_slice()
                    .iter()
                    .step_by(4096)
                    .map(|b| *b as u64)
                    .sum();
                println!(
                    "decode: all {layers} layers arrived from {} (sample sum {sum})",
                    n.peer
                );
                return Ok(());
            }
            layers += 1;
            println!("decode: {text} from {}", n.peer);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Err(kv_core::Error::TimedOut {
        what: "waiting for prefill".into(),
        after: Duration::from_secs(600),
    })
}
