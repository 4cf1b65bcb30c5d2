//! The ids this backend makes and the tables keyed by them: random instance and key
//! ids, the cheap hasher for our own sequential ids, this process's pid, and the set of
//! backend instances alive in this process (a peer in the same process that is gone
//! has freed, or may free, its memory).

use std::collections::{BTreeSet, HashMap};

use parking_lot::Mutex;

/// Backend instances alive in this process: a peer in the same process whose instance
/// is gone has freed (or may free) its memory, so nothing is posted to it. A peer in
/// another process is judged by UCX's error handling and the deadline.
static LIVE: Mutex<BTreeSet<u64>> = Mutex::new(BTreeSet::new());

/// Records that backend `instance` of this process is alive.
pub fn mark_live(instance: u64) {
    LIVE.lock().insert(instance);
}

/// Records that backend `instance` of this process was dropped.
pub fn mark_dropped(instance: u64) {
    LIVE.lock().remove(&instance);
}

/// Whether backend `instance` of this process is alive.
#[inline]
pub fn is_live(instance: u64) -> bool {
    LIVE.lock().contains(&instance)
}

/// A random 64-bit id (backend instances, registration key ids).
pub fn new_instance_id() -> u64 {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let c = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // splitmix64 over pid, time and a counter: unique per process and across restarts.
    let mut z =
        nanos ^ (u64::from(std::process::id()) << 40) ^ c.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Hasher for the tables keyed by our own sequential ids (never peer-chosen): the id
/// itself, spread by one multiply. SipHash showed up at ~8% of a 16 KiB post's time.
#[derive(Default, Clone, Copy)]
pub struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// A table keyed by one of our ids.
pub type IdMap<V> = HashMap<u64, V, std::hash::BuildHasherDefault<IdHasher>>;

/// This process's id, read once (`getpid` is a system call; posts check it).
pub fn own_pid() -> u32 {
    static PID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *PID.get_or_init(std::process::id)
}
