//! The kvx KV block store: DRAM and NVMe tiers, eviction, prefetch
