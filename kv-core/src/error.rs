//! The one error type of the kvx crate family.

use std::sync::Arc;
use std::time::Duration;

/// A `Result` whose error is [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while moving KV blocks.
///
/// Variants are what a caller can act on: retry after a reconnect
/// ([`Error::RemoteDisconnected`]), pick another backend
/// ([`Error::BackendUnavailable`]), fix the request ([`Error::OutOfBounds`]), fix the
/// configuration ([`Error::Unauthenticated`]: the cluster secrets differ), or stop asking
/// ([`Error::AccessDenied`]: a WRITE into a read-only registration).
/// The type is `Clone` (sources are shared behind `Arc`) so a failed transfer can report
/// the same error to every poll. `Send + Sync`.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The peer closed its connection or died; re-fetch its metadata and try again.
    #[error("peer {peer} disconnected: {reason}")]
    RemoteDisconnected {
        /// The peer's name (or address when the name is not known yet).
        peer: String,
        /// What was observed (connection reset, EOF, …).
        reason: String,
    },
    /// An operation did not finish before its deadline.
    #[error(
        "{what} timed out after {after:?}; raise the deadline or check that the peer is alive"
    )]
    TimedOut {
        /// The operation.
        what: String,
        /// How long it was given.
        after: Duration,
    },
    /// The transfer was cancelled by the caller.
    #[error("transfer was cancelled")]
    Canceled,
    /// A handle or address names memory that is not (or no longer) registered.
    #[error("not registered: {0}; register the memory (or re-load the peer's metadata) first")]
    NotRegistered(String),
    /// A range falls outside the registration it names.
    #[error("out of bounds: {0}")]
    OutOfBounds(String),
    /// The two peers share no backend that supports both memory kinds.
    #[error("no common backend: local has [{}], remote has [{}]; load a backend both sides have", .local.join(", "), .remote.join(", "))]
    NoCommonBackend {
        /// Backends usable locally.
        local: Vec<String>,
        /// Backends the peer published.
        remote: Vec<String>,
    },
    /// A backend cannot be used on this host (library missing, no device, …).
    #[error("backend {name} unavailable: {reason}")]
    BackendUnavailable {
        /// The backend's name.
        name: String,
        /// Why, and what to install or set.
        reason: String,
    },
    /// Bytes that claim to be metadata (or a wire frame) are malformed.
    #[error("invalid metadata: {0}")]
    InvalidMetadata(String),
    /// Stored data failed its checksum or structure check.
    #[error("corrupt data: {0}")]
    Corrupt(String),
    /// The request is malformed (mismatched lengths, zero size, wrong kind, …).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The backend does not support what was asked (memory kind, operation, …).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// The object is in use (e.g. deregistering memory that an in-flight transfer names).
    #[error("busy: {0}")]
    Busy(String),
    /// A peer (or this side) failed the cluster-secret handshake or a frame's MAC check.
    #[error("peer failed authentication ({0}); both sides must use the same cluster secret (KVX_SECRET)")]
    Unauthenticated(String),
    /// The operation is not allowed on that memory (a WRITE into a read-only registration,
    /// a READ whose destination is registered read-only, …).
    #[error("access denied: {0}")]
    AccessDenied(String),
    /// A native library or the operating system reported an error.
    #[error("{name}: {message} (code {code})")]
    Backend {
        /// The backend or library (`ucx`, `libfabric`, `io_uring`, …).
        name: String,
        /// The native status code (errno, `ucs_status_t`, `-FI_E*`).
        code: i64,
        /// The native error text.
        message: String,
    },
    /// An I/O error from the operating system, with what was being done.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: Arc<std::io::Error>,
    },
}

impl Error {
    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source: Arc::new(source),
        }
    }

    /// Builds [`Error::InvalidMetadata`].
    pub fn invalid_metadata(why: impl Into<String>) -> Self {
        Error::InvalidMetadata(why.into())
    }

    /// Builds [`Error::InvalidArgument`].
    pub fn invalid_argument(why: impl Into<String>) -> Self {
        Error::InvalidArgument(why.into())
    }

    /// True when the error means the peer is gone (the caller should re-fetch metadata).
    pub fn is_disconnect(&self) -> bool {
        matches!(self, Error::RemoteDisconnected { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_is_send_sync_clone() {
        fn check<T: Send + Sync + Clone + 'static>() {}
        check::<Error>();
    }

    #[test]
    fn messages_say_what_to_do() {
        let e = Error::NoCommonBackend {
            local: vec!["tcp".into()],
            remote: vec!["ucx".into()],
        };
        assert_eq!(
            e.to_string(),
            "no common backend: local has [tcp], remote has [ucx]; load a backend both sides have"
        );
        let e = Error::io(
            "open /x",
            std::io::Error::from(std::io::ErrorKind::NotFound),
        );
        assert!(e.to_string().starts_with("open /x: "));
        let e = Error::Unauthenticated("bad MAC from 127.0.0.1:4000".into());
        assert!(e.to_string().contains("same cluster secret (KVX_SECRET)"));
    }
}
