//! The engine's one error type.

/// A `Result` whose error is [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong in the engine. Variants are what a caller can act on: free blocks
/// ([`Error::OutOfBlocks`]), fix the request ([`Error::InvalidArgument`]). `Send + Sync`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The block pool has fewer free blocks than a request needs; finish or release
    /// sequences, or start the engine with more blocks.
    #[error(
        "out of KV blocks: {needed} needed, {free} free (raise --num-blocks or release sequences)"
    )]
    OutOfBlocks {
        /// Blocks the request needed.
        needed: usize,
        /// Blocks that were free.
        free: usize,
    },
    /// A request or configuration that cannot be served as given.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A tensor operation failed (shape mismatch, allocation).
    #[error("tensor operation failed: {0}")]
    Tensor(#[from] candle_core::Error),
    /// Allocating the KV memory failed.
    #[error("KV memory: {0}")]
    Memory(#[from] kv_core::Error),
    /// A disaggregated role failed: a transfer, a peer, a child process, a message.
    #[error("{context}: {cause}")]
    Role {
        /// What was being done.
        context: String,
        /// Why it failed.
        cause: String,
    },
}

impl Error {
    /// An [`Error::InvalidArgument`] with `msg`.
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidArgument(msg.into())
    }

    /// An [`Error::Role`]: `context` failed because of `cause`.
    pub fn role(context: impl Into<String>, cause: impl std::fmt::Display) -> Self {
        Error::Role {
            context: context.into(),
            cause: cause.to_string(),
        }
    }
}
