//! Local registrations (`ucp_mem_map` of the caller's memory) and imported remote
//! registrations (unpacked rkeys), plus the range checks that guard both.

use bytes::Bytes;
use kv_core::{Descriptor, DescriptorList, Entry};

use crate::ffi::{ucp_mem_h, ucp_rkey_h};

/// A local registration: the UCX memory handle over the caller's range and the remote
/// key peers need to address it.
pub struct Registration {
    /// `ucp_mem_map` handle (mapped over existing memory, never allocated by UCX).
    pub memh: ucp_mem_h,
    /// The registered range.
    pub desc: Descriptor,
    /// The encoded remote key ([`crate::wire::RemoteKey`]).
    pub key: Bytes,
    /// Posted transfers that name this registration; deregistering waits for zero.
    pub busy: usize,
}

/// A peer's registration imported on one endpoint.
pub struct Remote {
    /// The endpoint it was imported on.
    pub endpoint: u64,
    /// The range the peer registered (what transfers are checked against).
    pub desc: Descriptor,
    /// The packed rkey bytes (key into the endpoint's rkey cache).
    pub packed: Vec<u8>,
    /// The unpacked rkey (shared through the cache).
    pub rkey: ucp_rkey_h,
    /// Posted transfers that use this rkey; releasing waits for zero.
    pub busy: usize,
}

/// For every descriptor of `list`, finds a range of `ranges` that holds it; returns the
/// indices of the ranges used (sorted, deduplicated) or `None` if some descriptor lies
/// outside every range. Strided runs are checked by their extent first, one by one only
/// when the extent straddles ranges.
pub fn covering(list: &DescriptorList, ranges: &[Descriptor]) -> Option<Vec<usize>> {
    let mut used = Vec::new();
    let find = |d: &Descriptor| ranges.iter().position(|r| r.contains(d));
    for e in list.entries() {
        match e.extent().and_then(|x| find(&x)) {
            Some(i) => used.push(i),
            None => match *e {
                Entry::Single(_) => return None,
                Entry::Strided { count, .. } => {
                    for i in 0..count {
                        let d = e.get(i)?;
                        used.push(find(&d)?);
                    }
                }
            },
        }
    }
    used.sort_unstable();
    used.dedup();
    Some(used)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn covering_finds_ranges_and_refuses_outside() {
        let ranges = [Descriptor::new(0, 100, 0), Descriptor::new(200, 100, 0)];
        let l: DescriptorList = [Descriptor::new(10, 10, 0), Descriptor::new(250, 10, 0)]
            .into_iter()
            .collect();
        assert_eq!(covering(&l, &ranges), Some(vec![0, 1]));
        // A strided run whose extent straddles the gap but whose pieces do not.
        let s = DescriptorList::strided(0, 200, 2, 50, 0).unwrap();
        assert_eq!(covering(&s, &ranges), Some(vec![0, 1]));
        let out = DescriptorList::single(Descriptor::new(90, 20, 0));
        assert_eq!(covering(&out, &ranges), None);
        let other_dev = DescriptorList::single(Descriptor::new(10, 1, 1));
        assert_eq!(covering(&other_dev, &ranges), None);
    }
}
