//! Layer-wise hand-off: the sender posts layer `i` as soon as the engine marks it ready
//! (transfer overlaps the compute of the next layers), every layer's post carries a
//! small notification, and the last one carries the request's payload; the receiver
//! waits per layer.
//!
//! A notification reaches the peer after the data of its own post, so layer `i`'s
//! notification says layer `i` landed; the request is complete when every layer's has
//! arrived (the last layer's may overtake earlier layers' data on another lane).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use kv_core::{Error, Notification, Result, Status};

use crate::agent::Agent;
use crate::pace::Pace;
use crate::transfer::Transfer;

const MAGIC: &[u8; 4] = b"kvxL";

/// The notification of one layer: `kvxL`, tag length (u16 LE), tag, layer and layers
/// (u32 LE), then the request's payload on the last layer.
fn encode(tag: &[u8], layer: u32, layers: u32, payload: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(14 + tag.len() + payload.len());
    b.put_slice(MAGIC);
    b.put_u16_le(tag.len() as u16);
    b.put_slice(tag);
    b.put_u32_le(layer);
    b.put_u32_le(layers);
    b.put_slice(payload);
    b.freeze()
}

/// A layer notification: (tag, layer, layers, payload), or `None` for anything else.
fn decode(n: &Bytes) -> Option<(Bytes, u32, u32, Bytes)> {
    let rest = n.strip_prefix(MAGIC)?;
    let (len, rest) = rest.split_first_chunk::<2>()?;
    let len = u16::from_le_bytes(*len) as usize;
    let tag = rest.get(..len)?;
    let (layer, rest) = rest.get(len..)?.split_first_chunk::<4>()?;
    let (layers, payload) = rest.split_first_chunk::<4>()?;
    let (layer, layers) = (u32::from_le_bytes(*layer), u32::from_le_bytes(*layers));
    (layer < layers).then(|| {
        let off = |s: &[u8]| s.as_ptr() as usize - n.as_ptr() as usize;
        (
            n.slice(off(tag)..off(tag) + tag.len()),
            layer,
            layers,
            n.slice(off(payload)..),
        )
    })
}

/// Timing of a layer-wise hand-off. `Clone`, `Send + Sync`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerwiseReport {
    /// From the first post until layer 0 finished.
    pub time_to_first_layer: Option<Duration>,
    /// From the last layer's `layer_ready` until every layer finished: the part of the
    /// transfer the engine's compute did not hide.
    pub exposed: Option<Duration>,
    /// From the first post until every layer finished.
    pub total: Option<Duration>,
    /// Bytes of all layers.
    pub bytes: u64,
}

/// The sender's side of a layer-wise hand-off: one prepared [`Transfer`] per layer
/// (e.g. from [`KvLists::layer_transfers`](crate::KvLists::layer_transfers)), posted as
/// the engine marks each layer ready. `Send + Sync`; methods that post take `&mut`.
pub struct LayerwiseTransfer {
    layers: Vec<Transfer>,
    tag: Bytes,
    payload: Bytes,
    posted: Vec<Option<Instant>>,
    done: Vec<Option<Instant>>,
    first_post: Option<Instant>,
    last_ready: Option<Instant>,
}

impl std::fmt::Debug for LayerwiseTransfer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LayerwiseTransfer")
            .field("layers", &self.layers.len())
            .field("tag", &self.tag)
            .field("posted", &self.posted.iter().flatten().count())
            .field("done", &self.done.iter().flatten().count())
            .finish()
    }
}

impl LayerwiseTransfer {
    /// Layer `i` of the request is `layers[i]`; `tag` names the request in every layer's
    /// notification (at most 1 KiB), `payload` rides on the last layer's.
    pub fn new(layers: Vec<Transfer>, tag: Bytes, payload: Bytes) -> Result<LayerwiseTransfer> {
        if layers.is_empty() || layers.len() > u32::MAX as usize || tag.len() > 1024 {
            return Err(Error::invalid_argument(format!(
                "a layer-wise transfer of {} layers with a {}-byte tag",
                layers.len(),
                tag.len()
            )));
        }
        let n = layers.len();
        Ok(LayerwiseTransfer {
            layers,
            tag,
            payload,
            posted: vec![None; n],
            done: vec![None; n],
            first_post: None,
            last_ready: None,
        })
    }

    /// Number of layers.
    pub fn layers(&self) -> usize {
        self.layers.len()
    }

    /// The engine finished layer `layer`: post it now (each layer once, in any order).
    pub fn layer_ready(&mut self, layer: usize) -> Result<()> {
        let n = self.layers.len();
        let t = self
            .layers
            .get(layer)
            .ok_or_else(|| Error::OutOfBounds(format!("layer {layer} of a {n}-layer transfer")))?;
        if self.posted[layer].is_some() {
            return Err(Error::invalid_argument(format!(
                "layer {layer} was already posted"
            )));
        }
        let last = self.posted.iter().filter(|p| p.is_some()).count() + 1 == n;
        let note = encode(
            &self.tag,
            layer as u32,
            n as u32,
            if layer + 1 == n { &self.payload } else { &[] },
        );
        let now = Instant::now();
        t.post(Some(note))?;
        self.posted[layer] = Some(now);
        self.first_post.get_or_insert(now);
        if last {
            self.last_ready = Some(now);
        }
        Ok(())
    }

    /// Marks finished layers; fails with the first layer's error (the other layers are
    /// cancelled, so none touches the memory any more). True once every layer is done.
    pub fn poll(&mut self) -> Result<bool> {
        for i in 0..self.layers.len() {
            if self.posted[i].is_none() || self.done[i].is_some() {
                continue;
            }
            match self.layers[i].poll() {
                Status::Done => self.done[i] = Some(Instant::now()),
                Status::Failed(e) => {
                    self.cancel();
                    return Err(e);
                }
                Status::InProgress | Status::Idle => {}
            }
        }
        Ok(self.done.iter().all(Option::is_some))
    }

    /// Waits until every posted layer finished (each post is deadline-bounded) and, if
    /// all layers were posted, returns the timing.
    pub fn wait(&mut self) -> Result<LayerwiseReport> {
        for i in 0..self.layers.len() {
            if self.posted[i].is_some() && self.done[i].is_none() {
                if let Err(e) = self.layers[i].wait() {
                    self.cancel();
                    return Err(e);
                }
                self.done[i] = Some(Instant::now());
            }
        }
        if self.posted.iter().any(Option::is_none) {
            return Err(Error::invalid_argument(
                "wait on a layer-wise transfer with layers not marked ready",
            ));
        }
        Ok(self.report())
    }

    /// The layers' transfers back (cancelled if still running), to post them again for
    /// another request over the same blocks.
    pub fn into_transfers(mut self) -> Vec<Transfer> {
        self.cancel();
        self.layers
    }

    /// Cancels every outstanding layer (the memory is the caller's again on return).
    pub fn cancel(&mut self) {
        for t in &self.layers {
            if let Err(e) = t.cancel() {
                tracing::error!(error = %e, "cancelling a layer failed");
            }
        }
    }

    /// Timing so far.
    pub fn report(&self) -> LayerwiseReport {
        let since = |a: Option<Instant>, b: Option<Instant>| Some(b?.saturating_duration_since(a?));
        let all_done = if self.done.iter().all(Option::is_some) {
            self.done.iter().flatten().max().copied()
        } else {
            None
        };
        LayerwiseReport {
            time_to_first_layer: since(self.first_post, self.done[0]),
            exposed: since(self.last_ready, all_done),
            total: since(self.first_post, all_done),
            bytes: self.layers.iter().map(Transfer::bytes).sum(),
        }
    }
}

/// What a receiver knows of one request.
#[derive(Debug, Default)]
struct Incoming {
    landed: Vec<bool>,
    count: usize,
    payload: Option<Bytes>,
}

/// The receiver's side: sorts layer notifications by request tag so an engine can wait
/// for one layer of one request while others arrive. Other notifications are kept for
/// the caller ([`LayerwiseReceiver::take_unrelated`]). `Send + Sync`; `&mut` methods.
#[derive(Debug, Default)]
pub struct LayerwiseReceiver {
    requests: HashMap<Bytes, Incoming>,
    unrelated: Vec<Notification>,
}

impl LayerwiseReceiver {
    /// A receiver that knows no request yet.
    pub fn new() -> LayerwiseReceiver {
        Self::default()
    }

    /// Takes `n` if it is a layer notification; gives it back otherwise.
    pub fn accept(&mut self, n: Notification) -> Option<Notification> {
        let Some((tag, layer, layers, payload)) = decode(&n.payload) else {
            return Some(n);
        };
        let r = self.requests.entry(tag).or_default();
        if r.landed.len() != layers as usize {
            if r.count > 0 {
                tracing::warn!(
                    layers,
                    known = r.landed.len(),
                    "layer count changed for a request; starting over"
                );
            }
            *r = Incoming {
                landed: vec![false; layers as usize],
                ..Default::default()
            };
        }
        if !std::mem::replace(&mut r.landed[layer as usize], true) {
            r.count += 1;
        }
        if layer + 1 == layers {
            r.payload = Some(payload);
        }
        None
    }

    /// Drains `agent`'s notifications, keeping layer notifications by request and the
    /// rest for [`LayerwiseReceiver::take_unrelated`]; returns how many arrived.
    pub fn pump(&mut self, agent: &Agent) -> Result<usize> {
        let got = agent.notifications()?;
        let n = got.len();
        for x in got {
            if let Some(other) = self.accept(x) {
                self.unrelated.push(other);
            }
        }
        Ok(n)
    }

    /// True once layer `layer` of request `tag` landed.
    pub fn landed(&self, tag: &[u8], layer: u32) -> bool {
        self.requests
            .get(tag)
            .and_then(|r| r.landed.get(layer as usize).copied())
            .unwrap_or(false)
    }

    /// True once every layer of `tag` landed.
    pub fn complete(&self, tag: &[u8]) -> bool {
        self.requests
            .get(tag)
            .is_some_and(|r| r.count == r.landed.len() && r.count > 0)
    }

    /// Waits until layer `layer` of `tag` landed ([`Error::TimedOut`] after `timeout`).
    pub fn wait_layer(
        &mut self,
        agent: &Agent,
        tag: &[u8],
        layer: u32,
        timeout: Duration,
    ) -> Result<()> {
        self.wait_until(
            agent,
            timeout,
            |s| s.landed(tag, layer),
            || format!("layer {layer} of request {}", String::from_utf8_lossy(tag)),
        )
    }

    /// Waits until every layer of `tag` landed; returns the request's payload (from
    /// the last layer) and forgets the request.
    pub fn wait_all(&mut self, agent: &Agent, tag: &[u8], timeout: Duration) -> Result<Bytes> {
        self.wait_until(
            agent,
            timeout,
            |s| s.complete(tag),
            || format!("every layer of request {}", String::from_utf8_lossy(tag)),
        )?;
        Ok(self
            .requests
            .remove(tag)
            .and_then(|r| r.payload)
            .unwrap_or_default())
    }

    /// Forgets request `tag` (e.g. after a failure).
    pub fn forget(&mut self, tag: &[u8]) {
        self.requests.remove(tag);
    }

    /// Notifications that were not layer notifications, oldest first.
    pub fn take_unrelated(&mut self) -> Vec<Notification> {
        std::mem::take(&mut self.unrelated)
    }

    fn wait_until(
        &mut self,
        agent: &Agent,
        timeout: Duration,
        ready: impl Fn(&Self) -> bool,
        what: impl Fn() -> String,
    ) -> Result<()> {
        let end = Instant::now() + timeout;
        let mut pace = Pace::default();
        loop {
            if ready(self) {
                return Ok(());
            }
            if Instant::now() >= end {
                return Err(Error::TimedOut {
                    what: what(),
                    after: timeout,
                });
            }
            agent.progress()?;
            if self.pump(agent)? == 0 {
                pace.idle();
            } else {
                pace.reset();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_round_trip_and_others_pass_through() {
        let b = encode(b"req-7", 3, 4, b"done");
        assert_eq!(
            decode(&b),
            Some((
                Bytes::from_static(b"req-7"),
                3,
                4,
                Bytes::from_static(b"done")
            ))
        );
        for cut in 0..14 {
            assert_eq!(decode(&b.slice(..cut)), None);
        }
        assert_eq!(decode(&encode(b"x", 4, 4, b"")), None, "layer past the end");
        let mut r = LayerwiseReceiver::new();
        let note = |p: Bytes| Notification {
            peer: "prefill".into(),
            payload: p,
        };
        assert!(r.accept(note(Bytes::from_static(b"hello"))).is_some());
        assert!(r.accept(note(encode(b"a", 1, 2, b""))).is_none());
        assert!(r.landed(b"a", 1) && !r.landed(b"a", 0) && !r.complete(b"a"));
        assert!(r.accept(note(encode(b"a", 1, 2, b""))).is_none());
        assert!(!r.complete(b"a"), "a duplicate counts once");
        r.accept(note(encode(b"a", 0, 2, b"")));
        assert!(r.complete(b"a"));
        r.accept(note(encode(b"b", 0, 1, b"payload")));
        assert_eq!(
            r.requests[&Bytes::from_static(b"b")].payload.as_deref(),
            Some(&b"payload"[..])
        );
    }
}
