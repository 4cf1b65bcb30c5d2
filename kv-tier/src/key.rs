//! Block keys: a chained xxh3-128 hash over token chunks.

/// The key of one stored block: 128 bits of xxh3. `Copy`, `Send + Sync`.
///
/// A chunk's key hashes its parent's key, the chunk's token ids and the model/layout
/// compatibility hash, so equal keys mean "same tokens from the start of the sequence,
/// same model and layout".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockKey(pub u128);

impl BlockKey {
    /// The key's 16 bytes, little-endian (as stored in segment records).
    pub fn to_bytes(self) -> [u8; 16] {
        self.0.to_le_bytes()
    }

    /// The key from its 16 little-endian bytes.
    pub fn from_bytes(b: [u8; 16]) -> Self {
        BlockKey(u128::from_le_bytes(b))
    }

    /// A key for a block that is not a token chunk (tests, user-chosen ids).
    pub fn from_u64(v: u64) -> Self {
        BlockKey(xxhash_rust::xxh3::xxh3_128(&v.to_le_bytes()))
    }

    /// Which of `n` shards the key falls in.
    pub(crate) fn shard(self, n: usize) -> usize {
        // The low bits of xxh3 are uniform; n is a power of two.
        (self.0 as usize) & (n - 1)
    }
}

impl std::fmt::Display for BlockKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// Computes chained chunk keys for token sequences. `Copy`, `Send + Sync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHasher {
    /// Tokens per chunk (default 256).
    pub chunk_tokens: usize,
    /// Hash of everything that makes two caches incompatible: model, dtype, layout, TP.
    pub compat: u64,
}

impl ChunkHasher {
    /// A hasher with `chunk_tokens` per chunk and compatibility hash `compat`.
    pub fn new(chunk_tokens: usize, compat: u64) -> Self {
        ChunkHasher {
            chunk_tokens: chunk_tokens.max(1),
            compat,
        }
    }

    /// The compatibility hash of a free-form description (`"llama-3-8b/bf16/paged16/tp1"`).
    pub fn compat_of(description: &str) -> u64 {
        xxhash_rust::xxh3::xxh3_64(description.as_bytes())
    }

    /// The key of one chunk given its parent's key (`None` for the first chunk).
    pub fn chunk_key(&self, parent: Option<BlockKey>, tokens: &[u32]) -> BlockKey {
        self.chunk_key_with(parent, tokens, &mut Vec::new())
    }

    /// [`ChunkHasher::chunk_key`] with a caller's scratch buffer: the chunk is laid out
    /// as bytes once and hashed in one call (xxh3 over a contiguous buffer), which is
    /// several times faster than feeding a streaming hasher token by token. The bytes —
    /// parent key, compatibility hash, token count, tokens (all little-endian) — and so
    /// the keys are the same as before.
    pub fn chunk_key_with(
        &self,
        parent: Option<BlockKey>,
        tokens: &[u32],
        buf: &mut Vec<u8>,
    ) -> BlockKey {
        buf.clear();
        buf.reserve(32 + 4 * tokens.len());
        buf.extend_from_slice(&parent.map_or([0u8; 16], BlockKey::to_bytes));
        buf.extend_from_slice(&self.compat.to_le_bytes());
        buf.extend_from_slice(&(tokens.len() as u64).to_le_bytes());
        for t in tokens {
            buf.extend_from_slice(&t.to_le_bytes());
        }
        BlockKey(xxhash_rust::xxh3::xxh3_128(buf))
    }

    /// Keys of every full chunk of `tokens`, in order (a trailing partial chunk has none).
    pub fn keys(&self, tokens: &[u32]) -> Vec<BlockKey> {
        let mut out = Vec::with_capacity(tokens.len() / self.chunk_tokens);
        let mut parent = None;
        let mut buf = Vec::new();
        for c in tokens.chunks_exact(self.chunk_tokens) {
            let k = self.chunk_key_with(parent, c, &mut buf);
            out.push(k);
            parent = Some(k);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_chain_and_depend_on_everything() {
        let h = ChunkHasher::new(4, 1);
        let a: Vec<u32> = (0..12).collect();
        let ka = h.keys(&a);
        assert_eq!(ka.len(), 3);
        let mut b = a.clone();
        b[1] = 99; // changes the first chunk, so every later key changes too
        let kb = h.keys(&b);
        assert!(ka.iter().zip(&kb).all(|(x, y)| x != y));
        let mut c = a.clone();
        c[9] = 99; // only the last chunk changes
        let kc = h.keys(&c);
        assert_eq!(&ka[..2], &kc[..2]);
        assert_ne!(ka[2], kc[2]);
        assert_ne!(ka, ChunkHasher::new(4, 2).keys(&a));
        assert_eq!(h.keys(&a[..11]).len(), 2);
        assert_eq!(BlockKey::from_bytes(ka[0].to_bytes()), ka[0]);
    }

    /// The one-call hash gives the keys the token-by-token streaming hash gave (stores
    /// written before keep their keys).
    #[test]
    fn whole_chunk_hash_equals_the_streaming_hash() {
        fn streaming(h: &ChunkHasher, parent: Option<BlockKey>, tokens: &[u32]) -> BlockKey {
            let mut x = xxhash_rust::xxh3::Xxh3::new();
            x.update(&parent.map_or([0u8; 16], BlockKey::to_bytes));
            x.update(&h.compat.to_le_bytes());
            x.update(&(tokens.len() as u64).to_le_bytes());
            for t in tokens {
                x.update(&t.to_le_bytes());
            }
            BlockKey(x.digest128())
        }
        let h = ChunkHasher::new(512, ChunkHasher::compat_of("m"));
        let tokens: Vec<u32> = (0..2048u32)
            .map(|i| i.wrapping_mul(2_654_435_761))
            .collect();
        let mut parent = None;
        for (c, k) in tokens.chunks_exact(512).zip(h.keys(&tokens)) {
            assert_eq!(streaming(&h, parent, c), k);
            parent = Some(k);
        }
    }
}
