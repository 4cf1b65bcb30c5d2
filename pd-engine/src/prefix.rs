//! Prefix block hashes: a chained xxh3-128 over each full block of token ids, rooted in
//! the model's identity, so equal hashes mean "same tokens from position 0, same model,
//! same block size" — the key a prefix store (kv-tier) looks blocks up by.
//!
//! Only full blocks get a hash: a trailing partial block is never shared (its KV would
//! also be computed over a different chunk, see `engine`).

use xxhash_rust::xxh3::xxh3_128;

/// The hash of one full block and everything before it. `Copy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockHash(pub u128);

impl std::fmt::Display for BlockHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// Computes chained block hashes for one model and block size. `Copy`, `Send + Sync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefixHasher {
    block_tokens: usize,
    root: u128,
}

impl PrefixHasher {
    /// A hasher for the model with identity `model_fingerprint` (see
    /// `ModelConfig::fingerprint`) and blocks of `block_tokens` tokens.
    pub fn new(model_fingerprint: u64, block_tokens: usize) -> Self {
        let mut seed = b"pd-engine/prefix/v1".to_vec();
        seed.extend_from_slice(&model_fingerprint.to_le_bytes());
        seed.extend_from_slice(&(block_tokens as u64).to_le_bytes());
        PrefixHasher {
            block_tokens: block_tokens.max(1),
            root: xxh3_128(&seed),
        }
    }

    /// Tokens per block.
    pub fn block_tokens(&self) -> usize {
        self.block_tokens
    }

    /// The hash of `block` following `parent` (`None` for the first block). Hashes the
    /// whole block in one call.
    pub fn next(&self, parent: Option<BlockHash>, block: &[u32]) -> BlockHash {
        let mut buf = Vec::with_capacity(16 + 4 * block.len());
        buf.extend_from_slice(&parent.map_or(self.root, |p| p.0).to_le_bytes());
        for t in block {
            buf.extend_from_slice(&t.to_le_bytes());
        }
        BlockHash(xxh3_128(&buf))
    }

    /// Hashes of every full block of `tokens`, in order.
    pub fn hashes(&self, tokens: &[u32]) -> Vec<BlockHash> {
        let mut out = Vec::with_capacity(tokens.len() / self.block_tokens);
        let mut parent = None;
        for block in tokens.chunks_exact(self.block_tokens) {
            let h = self.next(parent, block);
            out.push(h);
            parent = Some(h);
        }
        out
    }
}

/// How many leading blocks two hash chains share.
pub fn common_blocks(a: &[BlockHash], b: &[BlockHash]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_chain_and_depend_on_model_and_block_size() {
        let h = PrefixHasher::new(42, 4);
        let a: Vec<u32> = (0..14).collect();
        let ha = h.hashes(&a);
        assert_eq!(ha.len(), 3, "the partial block has no hash");
        assert_eq!(ha, PrefixHasher::new(42, 4).hashes(&a), "deterministic");
        // A pinned value: the hashes are keys in stores that outlive a process.
        assert_eq!(
            h.hashes(&[1, 2, 3, 4])[0].to_string(),
            "49a2826361ff9fb5a2978a78ff8bbc74"
        );
        let mut b = a.clone();
        b[2] = 99; // first block changes: every later hash changes
        assert!(ha.iter().zip(h.hashes(&b)).all(|(x, y)| *x != y));
        let mut c = a.clone();
        c[9] = 99; // only the third block changes
        let hc = h.hashes(&c);
        assert_eq!(common_blocks(&ha, &hc), 2);
        assert_eq!(common_blocks(&ha, &ha[..1]), 1);
        assert_ne!(ha, PrefixHasher::new(43, 4).hashes(&a), "model identity");
        assert_ne!(ha[0], PrefixHasher::new(42, 2).hashes(&a)[0], "block size");
        // Same tokens at another depth hash differently.
        let d: Vec<u32> = (0..4).chain(0..4).collect();
        let hd = h.hashes(&d);
        assert_ne!(hd[0], hd[1]);
    }
}
