//! Synthetic prompt sets: seeded, with lengths spread over a range and prefixes shared
//! the way real traffic shares them (system prompts, multi-turn conversations).
//!
//! Integer arithmetic only, so a seed gives the same prompts on every host.

use std::collections::HashSet;

use crate::error::{Error, Result};
use crate::prefix::PrefixHasher;
use crate::rng::Rng;

/// What [`synthetic_prompts`] generates. Plain options struct; `Default` is the issue's
/// set: 100 prompts of 8 to 2 000 tokens, 8 shared system prompts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkloadOptions {
    /// Number of prompts.
    pub prompts: usize,
    /// Shortest prompt, in tokens.
    pub min_len: usize,
    /// Longest prompt, in tokens.
    pub max_len: usize,
    /// Distinct shared prefixes ("system prompts").
    pub shared_prefixes: usize,
    /// Seed.
    pub seed: u64,
}

impl Default for WorkloadOptions {
    fn default() -> Self {
        WorkloadOptions {
            prompts: 100,
            min_len: 8,
            max_len: 2000,
            shared_prefixes: 8,
            seed: 1,
        }
    }
}

/// A length in `lo..=hi`, log-spread: a power-of-two band first, then a point in it,
/// so short and long prompts are both common.
fn log_spread(r: &mut Rng, lo: usize, hi: usize) -> usize {
    let mut bands = vec![lo];
    while *bands.last().unwrap_or(&hi) * 2 < hi {
        bands.push(bands[bands.len() - 1] * 2);
    }
    let b = bands[r.below(bands.len() as u64) as usize];
    r.range(b as u64, (b * 2).min(hi) as u64) as usize
}

fn random_tokens(r: &mut Rng, n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|_| r.below(vocab as u64) as u32).collect()
}

/// `opts.prompts` prompts of token ids below `vocab`: about half start with one of the
/// shared system prompts (popular ones more often), a fifth continue an earlier prompt
/// (a conversation's next turn), the rest are fresh.
pub fn synthetic_prompts(opts: &WorkloadOptions, vocab: usize) -> Result<Vec<Vec<u32>>> {
    if opts.min_len == 0 || opts.min_len > opts.max_len || vocab == 0 {
        return Err(Error::invalid(format!(
            "workload {opts:?} over a vocab of {vocab}"
        )));
    }
    let mut r = Rng::new(opts.seed);
    let sys_hi = (opts.max_len / 2).max(opts.min_len);
    let system: Vec<Vec<u32>> = (0..opts.shared_prefixes)
        .map(|_| {
            let n = log_spread(&mut r, opts.min_len.max(16).min(sys_hi), sys_hi);
            random_tokens(&mut r, n, vocab)
        })
        .collect();
    let mut out: Vec<Vec<u32>> = Vec::with_capacity(opts.prompts);
    for _ in 0..opts.prompts {
        let len = log_spread(&mut r, opts.min_len, opts.max_len);
        let kind = r.below(10);
        let mut p = if kind < 5 && !system.is_empty() {
            // Skewed towards the first system prompts (min of two draws).
            let s = r
                .below(system.len() as u64)
                .min(r.below(system.len() as u64));
            let sys = &system[s as usize];
            sys[..sys.len().min(len)].to_vec()
        } else if kind < 7 && !out.is_empty() {
            let prev = &out[r.below(out.len() as u64) as usize];
            if prev.len() + 8 <= opts.max_len {
                prev.clone()
            } else {
                Vec::new()
            }
        } else {
            Vec::new()
        };
        let target = if p.len() >= len && kind >= 5 {
            // A next turn adds 8..=256 tokens.
            (p.len() + r.range(8, 256) as usize).min(opts.max_len)
        } else {
            len.max(p.len())
        };
        let more = target - p.len();
        p.extend(random_tokens(&mut r, more, vocab));
        out.push(p);
    }
    Ok(out)
}

/// Tokens of `prompts` that an ideal prefix cache with unbounded capacity would serve
/// (full blocks whose hash an earlier prompt already produced), and all tokens.
pub fn reusable_prefix_tokens(prompts: &[Vec<u32>], hasher: &PrefixHasher) -> (usize, usize) {
    let mut seen = HashSet::new();
    let (mut hit, mut total) = (0, 0);
    for p in prompts {
        let hashes = hasher.hashes(p);
        hit += hashes.iter().take_while(|h| seen.contains(*h)).count() * hasher.block_tokens();
        total += p.len();
        seen.extend(hashes);
    }
    (hit, total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_are_seeded_bounded_and_share_prefixes() {
        let o = WorkloadOptions::default();
        let a = synthetic_prompts(&o, 4096).unwrap();
        assert_eq!(a, synthetic_prompts(&o, 4096).unwrap());
        assert_ne!(
            a,
            synthetic_prompts(&WorkloadOptions { seed: 2, ..o }, 4096).unwrap()
        );
        assert_eq!(a.len(), 100);
        assert!(a.iter().all(|p| (8..=2000).contains(&p.len())), "lengths");
        assert!(a.iter().flatten().all(|t| *t < 4096));
        assert!(a.iter().any(|p| p.len() < 64) && a.iter().any(|p| p.len() > 1000));
        let (hit, total) = reusable_prefix_tokens(&a, &PrefixHasher::new(1, 16));
        assert!(hit > total / 20, "shared prefixes: {hit} of {total}");
        assert!(synthetic_prompts(&WorkloadOptions { min_len: 0, ..o }, 10).is_err());
        assert!(synthetic_prompts(
            &WorkloadOptions {
                min_len: 9,
                max_len: 8,
                ..o
            },
            10
        )
        .is_err());
        let one = WorkloadOptions {
            min_len: 5,
            max_len: 5,
            ..o
        };
        assert!(synthetic_prompts(&one, 10)
            .unwrap()
            .iter()
            .all(|p| p.len() == 5));
    }
}
