//! The decode side's prefill-offload gate (Dynamo's disaggregated router): should this
//! request's prefill run on a remote prefill worker, or here?
//!
//! Remote prefill pays a fixed price — queueing at the prefill workers, a KV transfer,
//! a notification round trip — and saves the decode engine from stalling its running
//! batch for the prefill. That trade only pays when the prefill is long. What counts is
//! the prefill still to compute: tokens this engine already holds (a prefix-cache hit)
//! cost nothing locally and would have to cross the wire otherwise. And a deep remote
//! queue means the request would wait longer there than the local prefill takes, so
//! then prefill locally too.

/// Thresholds of [`should_offload_prefill`]; plain struct with `Default` (1 000 tokens,
/// as Dynamo's example router, and a queue of 16). Tune both to the measured prefill
/// throughput and transfer cost of the deployment. `Copy`, `Send + Sync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OffloadThresholds {
    /// Prefill locally when at most this many prompt tokens are left to compute.
    pub max_local_prefill_tokens: u64,
    /// Prefill locally when the remote prefill queue holds this many requests or more.
    pub max_prefill_queue_depth: usize,
}

impl Default for OffloadThresholds {
    fn default() -> Self {
        OffloadThresholds {
            max_local_prefill_tokens: 1000,
            max_prefill_queue_depth: 16,
        }
    }
}

/// True when the prefill should go to a remote prefill worker: the tokens left to
/// compute (`effective_prompt_tokens − prefix_hit_tokens`) exceed
/// `max_local_prefill_tokens` and the remote queue is shorter than
/// `max_prefill_queue_depth`. A prefix hit larger than the prompt counts as a full hit.
pub fn should_offload_prefill(
    effective_prompt_tokens: u64,
    prefix_hit_tokens: u64,
    prefill_queue_depth: usize,
    thresholds: &OffloadThresholds,
) -> bool {
    let to_compute = effective_prompt_tokens.saturating_sub(prefix_hit_tokens);
    to_compute > thresholds.max_local_prefill_tokens
        && prefill_queue_depth < thresholds.max_prefill_queue_depth
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: OffloadThresholds = OffloadThresholds {
        max_local_prefill_tokens: 1000,
        max_prefill_queue_depth: 4,
    };

    #[test]
    fn long_uncached_prompts_go_remote_at_the_boundary() {
        assert!(
            !should_offload_prefill(1000, 0, 0, &T),
            "exactly the local limit"
        );
        assert!(should_offload_prefill(1001, 0, 0, &T), "one token more");
        assert!(!should_offload_prefill(0, 0, 0, &T));
    }

    #[test]
    fn prefix_hits_count_against_the_prompt() {
        assert!(!should_offload_prefill(5000, 4000, 0, &T), "1000 left");
        assert!(should_offload_prefill(5000, 3999, 0, &T), "1001 left");
        assert!(
            !should_offload_prefill(100, 200, 0, &T),
            "a hit past the prompt"
        );
    }

    #[test]
    fn a_deep_queue_keeps_prefill_local() {
        assert!(
            should_offload_prefill(10_000, 0, 3, &T),
            "one below the limit"
        );
        assert!(!should_offload_prefill(10_000, 0, 4, &T), "at the limit");
        assert!(!should_offload_prefill(10_000, 0, usize::MAX, &T));
        let never = OffloadThresholds {
            max_prefill_queue_depth: 0,
            ..T
        };
        assert!(!should_offload_prefill(u64::MAX, 0, 0, &never));
        assert_eq!(OffloadThresholds::default().max_local_prefill_tokens, 1000);
    }
}
