//! kvx benchmarks and the kv-bench CLI.
