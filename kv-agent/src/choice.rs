//! Backend choice: which loaded backend carries a transfer (or a notification) to a
//! peer — one both sides loaded that holds every region, supports both memory kinds and
//! the op, and can reach where the peer runs (`Capabilities::local` / `remote`); then by
//! the user's preference, else by the backends' cost estimates, else in load order. A
//! candidate that cannot connect to the peer falls through to the next, and the choice
//! says why each backend was passed over.

use std::sync::Arc;

use kv_core::{Capabilities, DescriptorList, Error, MemKind, Op, Result, TransferRequest};

use crate::peers::{Locality, PeerEntry};
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

/// The backend chosen for a transfer, connected to the peer, and why it was chosen.
pub(crate) struct Chosen {
    pub(crate) backend: Arc<LoadedBackend>,
    pub(crate) reason: String,
}

/// Why `c` cannot reach a peer running at `where_`, if it cannot.
pub(crate) fn unreachable(c: &Capabilities, where_: Locality) -> Option<&'static str> {
    match where_ {
        Locality::SameProcess if !c.local => {
            Some("the peer is in this process and the backend moves data only between processes")
        }
        Locality::SameHost if !c.local && !c.remote => {
            Some("the peer is another process and the backend moves data to no other process")
        }
        Locality::OtherHost if !c.remote => {
            Some("the peer runs on another host and the backend is local only")
        }
        _ => None,
    }
}

/// Why `b` cannot carry the transfer, if it cannot (before trying to connect).
fn unfit(
    b: &LoadedBackend,
    need: &Need<'_>,
    local: &[Arc<RegionEntry>],
    remote_backends: &[String],
    published: &[String],
    where_: Locality,
) -> Option<String> {
    let c = b.backend.capabilities();
    let why = if need.backend.is_some_and(|want| want != b.name) {
        "the spec names another backend".to_string()
    } else if !published.contains(&b.name) {
        "the peer did not load it".to_string()
    } else if let Some(why) = unreachable(&c, where_) {
        why.to_string()
    } else if !c.mem_kinds.contains(need.local_kind) || !c.mem_kinds.contains(need.remote_kind) {
        format!(
            "does not move {} <-> {} memory",
            need.local_kind, need.remote_kind
        )
    } else if !match need.op {
        Op::Write => c.write,
        Op::Read => c.read,
    } {
        format!("does not support {}", need.op)
    } else if !local.iter().all(|r| r.registered_on(&b.name)) {
        "a local region is not registered on it".to_string()
    } else if !remote_backends.contains(&b.name) {
        "the peer published no key for a remote region on it".to_string()
    } else {
        return None;
    };
    Some(why)
}

/// Chooses and connects the backend for a transfer: loaded here, published by the peer,
/// holding every region on both sides, supporting both kinds and the op, able to reach
/// the peer; then by `preference` (else cost, else load order); one that fails to
/// connect falls through to the next.
pub(crate) fn for_transfer(
    reg: &Registry,
    preference: &[String],
    need: &Need<'_>,
    local: &[Arc<RegionEntry>],
    remote_backends: &[String],
    p: &PeerEntry,
) -> Result<Chosen> {
    let backends = reg.backends.read().clone();
    let published = p.backend_names();
    let where_ = p.locality();
    let mut passed = Vec::new();
    let mut cands = Vec::new();
    for b in &backends {
        match unfit(b, need, local, remote_backends, &published, where_) {
            Some(why) => passed.push(format!("{} ({why})", b.name)),
            None => cands.push(b.clone()),
        }
    }
    if cands.is_empty() {
        if !backends.iter().any(|b| published.contains(&b.name)) {
            return Err(Error::NoCommonBackend {
                local: backends.iter().map(|b| b.name.clone()).collect(),
                remote: published,
            });
        }
        return Err(Error::Unsupported(format!(
            "no backend can carry this {} to {}: {}",
            need.op,
            p.name,
            passed.join("; ")
        )));
    }
    let mut first_err = None;
    let (ordered, how) = if !preference.is_empty() || cands.len() == 1 {
        let how = if cands.len() == 1 {
            "the only candidate"
        } else {
            "first candidate in backend_preference"
        };
        cands.sort_by_key(|b| {
            preference
                .iter()
                .position(|x| *x == b.name)
                .unwrap_or(usize::MAX)
        });
        (cands, how)
    } else {
        // No preference: ask each candidate what the transfer would cost (connecting to
        // the peer to do so); backends that give no estimate keep their load order
        // after those that do.
        let mut costed = Vec::with_capacity(cands.len());
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
                Err(e) => {
                    passed.push(format!("{} (cannot reach the peer: {e})", b.name));
                    first_err.get_or_insert(e);
                }
            }
        }
        costed.sort_by_key(|(none, cost, i, _)| (*none, *cost, *i));
        let how = match costed.first() {
            Some((_, Some(_), _, _)) => "lowest cost estimate",
            _ => "first loaded (no cost estimates)",
        };
        (costed.into_iter().map(|x| x.3).collect(), how)
    };
    for b in ordered {
        match p.endpoint(&b) {
            Ok(_) => {
                let mut reason = format!("{}: {how}", b.name);
                if !passed.is_empty() {
                    reason.push_str("; passed over: ");
                    reason.push_str(&passed.join("; "));
                }
                return Ok(Chosen { backend: b, reason });
            }
            Err(e) => {
                passed.push(format!("{} (cannot reach the peer: {e})", b.name));
                first_err.get_or_insert(e);
            }
        }
    }
    Err(match first_err {
        // Keep the kind of the first failure (a caller acts on it), with every reason.
        Some(Error::RemoteDisconnected { peer, reason }) => Error::RemoteDisconnected {
            peer,
            reason: format!("{reason}; tried: {}", passed.join("; ")),
        },
        Some(e) => {
            tracing::info!(tried = %passed.join("; "), "no candidate backend reached the peer");
            e
        }
        None => Error::invalid_argument("no candidate backend"),
    })
}

/// Chooses the backend that carries a notification alone to `p`: one that carries
/// notifications, that the peer published and that can reach it, by `preference`.
pub(crate) fn for_notification(
    reg: &Registry,
    preference: &[String],
    p: &PeerEntry,
) -> Result<Arc<LoadedBackend>> {
    let published = p.backend_names();
    let where_ = p.locality();
    let backends = reg.backends.read().clone();
    let mut cands: Vec<_> = backends
        .into_iter()
        .filter(|b| {
            let c = b.backend.capabilities();
            c.notifications && published.contains(&b.name) && unreachable(&c, where_).is_none()
        })
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
