//! The pure-Rust kvx backend: shared memory for same-host peers, TCP for remote ones
