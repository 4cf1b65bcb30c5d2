//! Backend choice: which loaded backend carries a transfer (or a notification) to a
//! peer — one both sides loaded that holds every region and supports both memory kinds
//! and the op; then by the user's preference, else by the backends' cost estimates,
//! else in load order.

use std::sync::Arc;

use kv_core::{DescriptorList, Error, MemKind, Op, Result, TransferRequest};

use crate::peers::PeerEntry;
use crate::registry::{LoadedBackend, RegionEntry, Registry};

/// What a transfer needs from its backend (borrowed from the transfer's spec).
pub(crate) struct Need<'a> {
    pub(crate) op: Op,
    pub(crate) local_kind: MemKind,
    pub(crate) local: &'a DescriptorList,
    pub(crate) remote_kind: MemKind,
    pub(crate) remote: &'a DescriptorList,
    /// Only this backend, if the spec names one.
    pub(crate) backend: Option<&'a str>,
}

/// Chooses the backend for a transfer: loaded here, published by the peer, holding
/// every region on both sides, supporting both kinds and the op; then by `preference`.
pub(crate) fn for_transfer(
    reg: &Registry,
    preference: &[String],
    need: &Need<'_>,
    local: &[Arc<RegionEntry>],
    remote_backends: &[String],
    p: &PeerEntry,
) -> Result<Arc<LoadedBackend>> {
    let backends = reg.backends.read().clone();
    let mut cands: Vec<Arc<LoadedBackend>> = backends
        .iter()
        .filter(|b| {
            let c = b.backend.capabilities();
            c.mem_kinds.contains(need.local_kind)
                && c.mem_kinds.contains(need.remote_kind)
                && match need.op {
                    Op::Write => c.write,
                    Op::Read => c.read,
                }
                && local.iter().all(|r| r.registered_on(&b.name))
                && remote_backends.contains(&b.name)
                && need.backend.is_none_or(|want| want == b.name)
        })
        .cloned()
        .collect();
    if cands.is_empty() {
        return Err(Error::NoCommonBackend {
            local: backends.iter().map(|b| b.name.clone()).collect(),
            remote: p.backend_names(),
        });
    }
    if !preference.is_empty() || cands.len() == 1 {
        cands.sort_by_key(|b| {
            preference
                .iter()
                .position(|x| *x == b.name)
                .unwrap_or(usize::MAX)
        });
        return Ok(cands.swap_remove(0));
    }
    // No preference: ask each candidate what the transfer would cost (connecting to
    // the peer if needed); backends that give no estimate keep their load order
    // after those that do, and a backend that cannot reach the peer drops out.
    let mut costed = Vec::with_capacity(cands.len());
    let mut last_err = None;
    for (i, b) in cands.into_iter().enumerate() {
        match p.endpoint(&b) {
            Ok(ep) => {
                let cost = b.backend.estimate_cost(&TransferRequest {
                    op: need.op,
                    local_kind: need.local_kind,
                    local: need.local.clone(),
                    peer: ep,
                    remote_kind: need.remote_kind,
                    remote: need.remote.clone(),
                });
                costed.push((cost.is_none(), cost, i, b));
            }
            Err(e) => last_err = Some(e),
        }
    }
    costed.sort_by_key(|(none, cost, i, _)| (*none, *cost, *i));
    match costed.into_iter().next() {
        Some((_, _, _, b)) => Ok(b),
        None => Err(last_err.unwrap_or_else(|| Error::invalid_argument("no candidate backend"))),
    }
}

/// Chooses the backend that carries a notification alone to `p`: one that carries
/// notifications and that the peer published, by `preference`.
pub(crate) fn for_notification(
    reg: &Registry,
    preference: &[String],
    p: &PeerEntry,
) -> Result<Arc<LoadedBackend>> {
    let published = p.backend_names();
    let backends = reg.backends.read().clone();
    let mut cands: Vec<_> = backends
        .into_iter()
        .filter(|b| b.backend.capabilities().notifications && published.contains(&b.name))
        .collect();
    cands.sort_by_key(|b| {
        preference
            .iter()
            .position(|x| *x == b.name)
            .unwrap_or(usize::MAX)
    });
    cands
        .into_iter()
        .next()
        .ok_or_else(|| Error::NoCommonBackend {
            local: reg.names(),
            remote: published,
        })
}
