//! `KvLists`: the prepared per-layer lists between this engine rank and one peer rank,
//! built from both sides' [`KvLayout`]s — what an engine prepares once per peer and
//! then turns block ids into transfers with, layer by layer.

use std::sync::Arc;

use kv_core::{Error, Op, Result};

use crate::layout::{KvLayout, Relayout, Side, LAYOUT_ATTRIBUTE};
use crate::peers::PeerId;
use crate::prepared::{self, PreparedList, Source, TransferOptions};
use crate::shared::Shared;
use crate::transfer::Transfer;

/// The item indices of one request on each side (the same for every layer). `Clone`,
/// `Send + Sync`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KvItems {
    /// Items of the local lists.
    pub local: Vec<u32>,
    /// Items of the remote lists, pairwise with `local`.
    pub remote: Vec<u32>,
}

/// Prepared lists for every layer between this rank and one peer rank, with the
/// [`Relayout`] that says which heads move. `Send + Sync`.
#[derive(Debug)]
pub struct KvLists {
    relayout: Relayout,
    local_side: Side,
    peer: PeerId,
    /// (local, remote) per layer; empty when nothing moves between the two ranks.
    layers: Vec<(PreparedList, PreparedList)>,
}

/// The layout `peer` published (see `Agent::set_kv_layout`).
pub(crate) fn peer_layout(shared: &Shared, peer: PeerId) -> Result<KvLayout> {
    let p = shared.peers.get(peer)?;
    let attrs = p.attributes();
    let (_, v) = attrs
        .iter()
        .find(|(k, _)| k == LAYOUT_ATTRIBUTE)
        .ok_or_else(|| {
            Error::InvalidMetadata(format!(
                "{} published no KV layout (attribute {LAYOUT_ATTRIBUTE}); it must call set_kv_layout and publish",
                p.name
            ))
        })?;
    KvLayout::decode(v)
}

impl KvLists {
    /// Checks the peer's published layout against `local` (refusing an incompatible
    /// model before any byte moves), then prepares every layer's local and remote
    /// lists. `local_side` says whether this rank holds the KV (it WRITEs) or receives
    /// it (it READs).
    pub(crate) fn prepare(
        shared: &Arc<Shared>,
        peer: PeerId,
        local: &KvLayout,
        local_side: Side,
    ) -> Result<KvLists> {
        let remote = peer_layout(shared, peer)?;
        let relayout = match local_side {
            Side::Source => Relayout::new(local, &remote)?,
            Side::Destination => Relayout::new(&remote, local)?,
        };
        let remote_side = match local_side {
            Side::Source => Side::Destination,
            Side::Destination => Side::Source,
        };
        let mut layers = Vec::new();
        if !relayout.is_empty() {
            for layer in 0..local.layers {
                let l = relayout.grid(local_side, layer)?;
                let r = relayout.grid(remote_side, layer)?;
                layers.push((
                    PreparedList::local(shared, local.kind, Source::Grid(&l))?,
                    PreparedList::remote(shared, peer, remote.kind, Source::Grid(&r))?,
                ));
            }
        }
        Ok(KvLists {
            relayout,
            local_side,
            peer,
            layers,
        })
    }

    /// Which heads move, chunk size, both layouts.
    pub fn relayout(&self) -> &Relayout {
        &self.relayout
    }

    /// The peer.
    pub fn peer(&self) -> PeerId {
        self.peer
    }

    /// True when these two ranks exchange nothing (a replica, or heads the other rank
    /// does not hold): no transfer is needed.
    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }

    /// WRITE when this rank holds the KV, READ when it receives it.
    pub fn op(&self) -> Op {
        match self.local_side {
            Side::Source => Op::Write,
            Side::Destination => Op::Read,
        }
    }

    /// The items of a request: `tokens` tokens held in `src_blocks` (the source rank's
    /// block ids) land in `dst_blocks` (the destination's). Computed once per request,
    /// used for every layer.
    pub fn items(&self, src_blocks: &[u32], dst_blocks: &[u32], tokens: u64) -> Result<KvItems> {
        let (s, d) = self.relayout.items(src_blocks, dst_blocks, tokens)?;
        Ok(match self.local_side {
            Side::Source => KvItems {
                local: s,
                remote: d,
            },
            Side::Destination => KvItems {
                local: d,
                remote: s,
            },
        })
    }

    /// The transfer of one layer of a request.
    pub fn transfer(
        &self,
        layer: u32,
        items: &KvItems,
        opts: &TransferOptions,
    ) -> Result<Transfer> {
        let (l, r) = self.layers.get(layer as usize).ok_or_else(|| {
            Error::OutOfBounds(format!(
                "layer {layer} of {} prepared layers",
                self.layers.len()
            ))
        })?;
        prepared::make_transfer(
            l.shared(),
            self.op(),
            l,
            &items.local,
            r,
            &items.remote,
            opts,
        )
    }

    /// One transfer per layer of a request, in layer order (empty when nothing moves);
    /// hand them to a [`LayerwiseTransfer`](crate::LayerwiseTransfer).
    pub fn layer_transfers(
        &self,
        items: &KvItems,
        opts: &TransferOptions,
    ) -> Result<Vec<Transfer>> {
        (0..self.layers.len() as u32)
            .map(|l| self.transfer(l, items, opts))
            .collect()
    }
}
