//! Block leases and loads: the pull model of vLLM's NIXL connector, with its abort
//! timeout.
//!
//! The side that computed a request's KV (prefill) keeps the blocks after the request
//! finished there — a *lease* — until every peer that reads them says "done" (a
//! notification), or until a timeout, when it frees them anyway and counts an abort
//! (the reader crashed, or gave up). The reading side (decode) runs a [`BlockLoad`]:
//! it posts the READs, and either every byte lands or the engine gets an error it can
//! act on — never a silently partial cache.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kv_core::{Error, Notification, Result, Status};

use crate::agent::Agent;
use crate::pace::Pace;
use crate::peers::PeerId;
use crate::transfer::Transfer;

const DONE: &[u8] = b"kvx/done/";

/// The notification a reader sends the holder when it no longer needs `request`'s
/// blocks.
pub fn done_notification(request: &str) -> Bytes {
    let mut v = DONE.to_vec();
    v.extend_from_slice(request.as_bytes());
    Bytes::from(v)
}

/// Why a lease ended. `Clone`, `Send + Sync`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseEnd {
    /// Every reader said it is done.
    Done,
    /// The timeout passed first (an abort).
    Expired,
}

/// A lease that ended: the engine frees these blocks now. `Clone`, `Send + Sync`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Released {
    /// The request.
    pub request: String,
    /// Its blocks.
    pub blocks: Vec<u32>,
    /// Why.
    pub end: LeaseEnd,
}

#[derive(Debug)]
struct Lease {
    blocks: Vec<u32>,
    expires: Instant,
    readers: u32,
    done: u32,
}

/// The holder's table of leased blocks. Feed it the notifications that arrive
/// ([`BlockLeases::on_notification`]) and call [`BlockLeases::expire`] now and then
/// (each engine step); free what they return. `Send + Sync`; `&mut` methods.
#[derive(Debug)]
pub struct BlockLeases {
    timeout: Duration,
    leases: HashMap<String, Lease>,
    aborts: u64,
    completed: u64,
}

impl BlockLeases {
    /// A table whose leases expire `timeout` after they were taken (vLLM's
    /// `VLLM_NIXL_ABORT_REQUEST_TIMEOUT`).
    pub fn new(timeout: Duration) -> BlockLeases {
        BlockLeases {
            timeout,
            leases: HashMap::new(),
            aborts: 0,
            completed: 0,
        }
    }

    /// Keeps `blocks` of `request` until `readers` peers said done (several decode
    /// ranks read one prefill rank under heterogeneous TP: see
    /// [`tp::readers_of`](crate::layout::tp::readers_of)) or the timeout passes.
    pub fn hold(&mut self, request: &str, blocks: Vec<u32>, readers: u32) -> Result<()> {
        if readers == 0 || self.leases.contains_key(request) {
            return Err(Error::invalid_argument(format!(
                "lease of {request}: {readers} readers, or already held"
            )));
        }
        self.leases.insert(
            request.to_string(),
            Lease {
                blocks,
                expires: Instant::now() + self.timeout,
                readers,
                done: 0,
            },
        );
        Ok(())
    }

    /// One reader of `request` is done; the lease ends when all are.
    pub fn done(&mut self, request: &str) -> Option<Released> {
        let l = self.leases.get_mut(request)?;
        l.done += 1;
        if l.done < l.readers {
            return None;
        }
        let l = self.leases.remove(request)?;
        self.completed += 1;
        Some(Released {
            request: request.to_string(),
            blocks: l.blocks,
            end: LeaseEnd::Done,
        })
    }

    /// Handles a "done" notification ([`done_notification`]); `Err(n)` gives back any
    /// other notification. A "done" for an unknown request (it expired, or was never
    /// held) is logged and dropped.
    pub fn on_notification(
        &mut self,
        n: Notification,
    ) -> std::result::Result<Option<Released>, Notification> {
        let Some(req) = n.payload.strip_prefix(DONE) else {
            return Err(n);
        };
        let req = String::from_utf8_lossy(req).into_owned();
        let r = self.done(&req);
        if r.is_none() && !self.leases.contains_key(&req) {
            tracing::warn!(request = %req, peer = %n.peer, "done for a request whose lease is gone (expired?)");
        }
        Ok(r)
    }

    /// Ends every lease whose timeout passed by `now`; each counts as an abort.
    pub fn expire(&mut self, now: Instant) -> Vec<Released> {
        let gone: Vec<String> = self
            .leases
            .iter()
            .filter(|(_, l)| l.expires <= now)
            .map(|(k, _)| k.clone())
            .collect();
        let mut out = Vec::with_capacity(gone.len());
        for request in gone {
            if let Some(l) = self.leases.remove(&request) {
                tracing::warn!(%request, blocks = l.blocks.len(), readers_done = l.done, readers = l.readers, "lease expired; freeing the blocks");
                self.aborts += 1;
                out.push(Released {
                    request,
                    blocks: l.blocks,
                    end: LeaseEnd::Expired,
                });
            }
        }
        out
    }

    /// Leases that expired so far.
    pub fn aborts(&self) -> u64 {
        self.aborts
    }

    /// Leases that ended with every reader done.
    pub fn completed(&self) -> u64 {
        self.completed
    }

    /// Leases held now.
    pub fn held(&self) -> usize {
        self.leases.len()
    }

    /// When the next lease expires.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.leases.values().map(|l| l.expires).min()
    }
}

/// What the engine does when loading remote KV fails. `Copy`, `Send + Sync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LoadFailurePolicy {
    /// The load fails with the transfer's error ([`BlockLoad::wait`] returns `Err`):
    /// the engine fails the request (or retries it elsewhere) and frees its blocks.
    Fail,
    /// The load reports [`LoadOutcome::Recompute`] with the blocks and the cause: the
    /// engine computes their KV itself (prefills locally) before decoding. The blocks
    /// hold garbage until then.
    Recompute,
}

/// How a load ended. `Clone`, `Send + Sync`.
#[derive(Debug, Clone)]
pub enum LoadOutcome {
    /// Every byte of every block landed.
    Loaded,
    /// Under [`LoadFailurePolicy::Recompute`]: nothing in `blocks` may be used; compute
    /// them again.
    Recompute {
        /// The request's blocks (all of them: a partial load is never reported).
        blocks: Vec<u32>,
        /// The transfer error that ended the load.
        cause: Error,
    },
}

/// The reader's side: the READs of one request into its `blocks`, all or nothing.
/// Once it ended (either way) no transfer touches the blocks any more, and the holder
/// was told "done" so it frees its lease. `Send + Sync`; `&mut` methods.
#[derive(Debug)]
pub struct BlockLoad {
    agent: Agent,
    transfers: Vec<Transfer>,
    blocks: Vec<u32>,
    policy: LoadFailurePolicy,
    holder: Option<(PeerId, String)>,
    outcome: Option<LoadOutcome>,
}

impl BlockLoad {
    /// Posts every transfer (e.g. [`KvLists::layer_transfers`](crate::KvLists) of a
    /// READ); `holder` (the peer and its request id) is told "done" when the load
    /// ends. A post that fails ends the load at once, by `policy`.
    pub fn start(
        agent: &Agent,
        transfers: Vec<Transfer>,
        blocks: Vec<u32>,
        policy: LoadFailurePolicy,
        holder: Option<(PeerId, String)>,
    ) -> BlockLoad {
        let mut l = BlockLoad {
            agent: agent.clone(),
            transfers,
            blocks,
            policy,
            holder,
            outcome: None,
        };
        for i in 0..l.transfers.len() {
            if let Err(e) = l.transfers[i].post(None) {
                l.fail(e);
                break;
            }
        }
        l
    }

    /// Cancels what is in flight, tells the holder, records the outcome.
    fn fail(&mut self, cause: Error) {
        for t in &self.transfers {
            if let Err(e) = t.cancel() {
                tracing::error!(error = %e, "cancelling a failed load's transfer failed");
            }
        }
        self.finish(LoadOutcome::Recompute {
            blocks: self.blocks.clone(),
            cause,
        });
    }

    fn finish(&mut self, outcome: LoadOutcome) {
        if let Some((peer, request)) = self.holder.take() {
            if let Err(e) = self.agent.notify(peer, done_notification(&request)) {
                tracing::info!(error = %e, %request, "could not tell the holder; its lease will expire");
            }
        }
        self.outcome = Some(outcome);
    }

    /// The outcome once the load ended, `Ok(None)` while it runs; `Err` under
    /// [`LoadFailurePolicy::Fail`].
    pub fn poll(&mut self) -> Result<Option<LoadOutcome>> {
        if self.outcome.is_none() {
            let mut all = true;
            let mut failed = None;
            for t in &self.transfers {
                match t.poll() {
                    Status::Done => {}
                    Status::Failed(e) => {
                        failed = Some(e);
                        break;
                    }
                    Status::InProgress | Status::Idle => all = false,
                }
            }
            match failed {
                Some(e) => self.fail(e),
                None if all => self.finish(LoadOutcome::Loaded),
                None => return Ok(None),
            }
        }
        match (&self.outcome, self.policy) {
            (Some(LoadOutcome::Recompute { cause, .. }), LoadFailurePolicy::Fail) => {
                Err(cause.clone())
            }
            (o, _) => Ok(o.clone()),
        }
    }

    /// Drives progress until the load ended (each transfer is deadline-bounded).
    pub fn wait(&mut self) -> Result<LoadOutcome> {
        let mut pace = Pace::default();
        loop {
            self.agent.progress()?;
            if let Some(o) = self.poll()? {
                return Ok(o);
            }
            pace.idle();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_end_on_every_reader_or_on_the_timeout() {
        let mut t = BlockLeases::new(Duration::from_millis(50));
        t.hold("a", vec![1, 2], 2).unwrap();
        t.hold("b", vec![3], 1).unwrap();
        assert!(t.hold("a", vec![9], 1).is_err(), "held twice");
        assert!(t.hold("c", vec![9], 0).is_err(), "no reader");
        let note = |r: &str| Notification {
            peer: "decode".into(),
            payload: done_notification(r),
        };
        assert_eq!(
            t.on_notification(note("a")).unwrap(),
            None,
            "one of two readers"
        );
        let r = t.on_notification(note("a")).unwrap().unwrap();
        assert_eq!((r.blocks, r.end), (vec![1, 2], LeaseEnd::Done));
        let other = Notification {
            peer: "decode".into(),
            payload: Bytes::from_static(b"hello"),
        };
        assert!(t.on_notification(other).is_err());
        assert!(t.expire(Instant::now()).is_empty());
        let later = Instant::now() + Duration::from_millis(60);
        let gone = t.expire(later);
        assert_eq!(gone.len(), 1);
        assert_eq!(
            (gone[0].request.as_str(), &gone[0].end),
            ("b", &LeaseEnd::Expired)
        );
        assert_eq!((t.aborts(), t.completed(), t.held()), (1, 1, 0));
        assert_eq!(t.on_notification(note("b")).unwrap(), None, "late done");
        assert_eq!(t.aborts(), 1);
    }
}
