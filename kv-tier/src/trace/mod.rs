//! Request traces in the Mooncake format, a generator of realistic synthetic ones, and
//! a replay through the real [`crate::Store`] API as an engine drives it.
//!
//! A trace is a list of requests, each the hash ids of its prompt's blocks of
//! `block_tokens` tokens (512 in Mooncake's published traces): equal ids at equal
//! positions mean equal prefixes. [`Trace::parse_jsonl`] reads one JSON object per line
//! with the fields `timestamp`, `input_length`, `output_length` and `hash_ids`;
//! [`generate`] writes such traces for multi-turn chats, shared system prompts with
//! Zipfian popularity and tool/agent loops; [`replay`] feeds one to a store
//! (`lookup_keys`, read the hits, store the rest) and counts prefix hits.
//!
//! ```
//! use kv_tier::trace::{generate, replay, GenParams, Replay};
//! use kv_tier::PolicyKind;
//!
//! let trace = generate(&GenParams { requests: 300, ..GenParams::chat() });
//! let r = replay(&trace, &Replay { capacity_blocks: 200, policy: PolicyKind::Lru, ..Default::default() })?;
//! println!("{}: hit ratio {:.3}, {:.0} blocks/s", r.policy, r.hit_ratio(), r.blocks_per_sec());
//! # Ok::<(), kv_core::Error>(())
//! ```

mod gen;
mod replay;

use kv_core::{Error, Result};

pub use gen::{generate, GenParams};
pub use replay::{replay, Replay, ReplayResult};

/// One request of a trace (Mooncake's fields). `Clone`, `Send + Sync`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Arrival time in milliseconds from the start of the trace.
    pub timestamp: u64,
    /// Prompt tokens.
    pub input_length: u64,
    /// Generated tokens.
    pub output_length: u64,
    /// One id per prompt block (the last one may be partial): equal ids at equal
    /// positions mean equal prefixes.
    pub hash_ids: Vec<u64>,
}

/// A request trace. `Clone`, `Send + Sync`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trace {
    /// What it is (file name or generator preset).
    pub name: String,
    /// Tokens per block (hash id): 512 in Mooncake's traces.
    pub block_tokens: usize,
    /// The requests, in arrival order.
    pub requests: Vec<Request>,
}

/// Longest hash-id list a trace line may carry (about 33 M tokens of 512).
const MAX_BLOCKS_PER_REQUEST: usize = 1 << 16;

impl Trace {
    /// Parses JSON lines (blank lines skipped). A malformed line is
    /// [`Error::InvalidArgument`] naming the line; never panics.
    pub fn parse_jsonl(name: &str, text: &str, block_tokens: usize) -> Result<Trace> {
        if block_tokens == 0 {
            return Err(Error::invalid_argument("block_tokens must be at least 1"));
        }
        let mut requests = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let bad =
                |what: &str| Error::invalid_argument(format!("{name}: line {}: {what}", n + 1));
            let v: serde_json::Value =
                serde_json::from_str(line).map_err(|e| bad(&format!("not JSON ({e})")))?;
            let num = |field: &str| -> Result<u64> {
                match v.get(field) {
                    None => Ok(0),
                    Some(x) => x
                        .as_u64()
                        .ok_or_else(|| bad(&format!("{field} is not a non-negative integer"))),
                }
            };
            let ids = v
                .get("hash_ids")
                .and_then(|h| h.as_array())
                .ok_or_else(|| bad("no hash_ids array"))?;
            if ids.len() > MAX_BLOCKS_PER_REQUEST {
                return Err(bad(&format!(
                    "{} hash ids (at most {MAX_BLOCKS_PER_REQUEST})",
                    ids.len()
                )));
            }
            let hash_ids = ids
                .iter()
                .map(|x| {
                    x.as_u64()
                        .ok_or_else(|| bad("a hash id is not a non-negative integer"))
                })
                .collect::<Result<Vec<u64>>>()?;
            requests.push(Request {
                timestamp: num("timestamp")?,
                input_length: num("input_length")?,
                output_length: num("output_length")?,
                hash_ids,
            });
        }
        Ok(Trace {
            name: name.to_string(),
            block_tokens,
            requests,
        })
    }

    /// Reads a JSON-lines trace file.
    pub fn read_jsonl(path: &std::path::Path, block_tokens: usize) -> Result<Trace> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        let name = path.file_name().map_or_else(
            || path.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        Trace::parse_jsonl(&name, &text, block_tokens)
    }

    /// The trace as JSON lines (Mooncake's fields), one request per line.
    pub fn to_jsonl(&self) -> String {
        let mut out = String::new();
        for r in &self.requests {
            let v = serde_json::json!({
                "timestamp": r.timestamp,
                "input_length": r.input_length,
                "output_length": r.output_length,
                "hash_ids": r.hash_ids,
            });
            out.push_str(&v.to_string());
            out.push('\n');
        }
        out
    }

    /// Blocks over all requests.
    pub fn blocks(&self) -> usize {
        self.requests.iter().map(|r| r.hash_ids.len()).sum()
    }

    /// Distinct blocks (prefix-distinct: a hash id at a position after a different
    /// prefix counts again).
    pub fn unique_blocks(&self) -> usize {
        let mut seen = std::collections::HashSet::new();
        for r in &self.requests {
            let mut h = 0u64;
            for id in &r.hash_ids {
                h = mix(h ^ mix(*id));
                seen.insert(h);
            }
        }
        seen.len()
    }
}

/// splitmix64's finaliser: cheap, well mixed.
pub(crate) fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The token ids of one block of `n` tokens with hash id `id` (a deterministic
/// stand-in for the real tokens, which a trace does not carry), appended to `out`.
pub fn block_tokens(id: u64, n: usize, out: &mut Vec<u32>) {
    let base = mix(id);
    out.extend((0..n as u64).map(|j| (mix(base ^ j) % 128_000) as u32));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonl_round_trips_and_rejects_bad_lines() {
        let text = "{\"timestamp\": 0, \"input_length\": 1030, \"output_length\": 9, \"hash_ids\": [1, 2, 3]}\n\n{\"timestamp\": 5, \"input_length\": 600, \"output_length\": 1, \"hash_ids\": [1, 7]}\n";
        let t = Trace::parse_jsonl("t", text, 512).unwrap();
        assert_eq!(t.requests.len(), 2);
        assert_eq!(t.requests[0].hash_ids, vec![1, 2, 3]);
        assert_eq!(t.requests[1].timestamp, 5);
        assert_eq!((t.blocks(), t.unique_blocks()), (5, 4));
        assert_eq!(Trace::parse_jsonl("t", &t.to_jsonl(), 512).unwrap(), t);
        for bad in [
            "{",
            "{\"hash_ids\": [1, -2]}",
            "{\"timestamp\": 1}",
            "[1]",
            "{\"hash_ids\": [1], \"timestamp\": \"x\"}",
        ] {
            let e = Trace::parse_jsonl("t", bad, 512).unwrap_err();
            assert!(e.to_string().contains("line 1"), "{e}");
        }
    }
}
