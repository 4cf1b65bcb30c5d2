//! The target side of same-host importers: their control connections (by the importer
//! id of their HELLO), and the revocation `deregister` runs — REVOKE to every importer
//! subscribed to the registration, then a wait until each is done with it: it
//! acknowledged, it said it holds nothing (a reconnect with `HELLO_RESET`, or BYE), or
//! its process exited (its pidfd, from the kernel). An importer that cannot be reached
//! is never counted as done: `deregister` then returns `Busy`.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::channel::Channel;
use crate::memory::Registry;
use crate::sys::{self, Watch, TICK};
use crate::wire::{FrameOp, Header};

/// One same-host importer.
struct Importer {
    /// Its current control connection (connection id, channel); `None` while it has none.
    conn: Option<(u64, Arc<Channel>)>,
    /// Its process, as the kernel named it for the Unix socket.
    pidfd: Option<Arc<OwnedFd>>,
    /// Its agent name (logs).
    name: String,
    /// Bumped whenever it says it holds nothing of ours.
    resets: u64,
    /// Revocations it acknowledged (pruned when their wait ends).
    acked: HashSet<u64>,
}

impl Importer {
    fn exited(&self) -> bool {
        self.pidfd
            .as_ref()
            .is_some_and(|p| sys::pidfd_exited(p.as_fd()))
    }
}

/// Every same-host importer of this backend. `Send + Sync`.
#[derive(Default)]
pub(crate) struct Importers {
    t: Mutex<HashMap<u64, Importer>>,
    cv: Condvar,
    next_revoke: AtomicU64,
}

/// A subscriber a revocation waits for.
struct Wait {
    importer: u64,
    /// Its reset count when the revocation began.
    resets: u64,
    /// The connection the REVOKE went out on.
    sent_on: Option<u64>,
    done: bool,
}

impl Importers {
    /// Importer `id` (process `pidfd`, agent `name`) opened control connection `conn`;
    /// with `reset` it holds nothing of ours, so its subscriptions are dropped.
    pub(crate) fn attach(
        &self,
        id: u64,
        conn: (u64, Arc<Channel>),
        pidfd: Option<OwnedFd>,
        name: &str,
        reset: bool,
        regs: &Registry,
    ) {
        if reset {
            regs.unsubscribe_all(id);
        }
        let mut t = self.t.lock();
        // Importers whose process exited hold nothing; forget them (bounds the table).
        let dead: Vec<u64> = t
            .iter()
            .filter(|(i, e)| **i != id && e.conn.is_none() && e.exited())
            .map(|(i, _)| *i)
            .collect();
        for i in dead {
            t.remove(&i);
            regs.unsubscribe_all(i);
        }
        let e = t.entry(id).or_insert_with(|| Importer {
            conn: None,
            pidfd: None,
            name: name.to_string(),
            resets: 0,
            acked: HashSet::new(),
        });
        e.conn = Some(conn);
        if let Some(p) = pidfd {
            e.pidfd = Some(Arc::new(p));
        }
        if reset {
            e.resets += 1;
        }
        drop(t);
        self.cv.notify_all();
    }

    /// Connection `conn` of importer `id` ended. Its subscriptions stay: it may still
    /// be copying, until it reconnects holding nothing or its process exits.
    pub(crate) fn detach(&self, id: u64, conn: u64) {
        if let Some(e) = self.t.lock().get_mut(&id) {
            if e.conn.as_ref().is_some_and(|(c, _)| *c == conn) {
                e.conn = None;
            }
        }
        self.cv.notify_all();
    }

    /// Importer `id` said BYE: it holds nothing of ours any more.
    pub(crate) fn bye(&self, id: u64, regs: &Registry) {
        regs.unsubscribe_all(id);
        self.t.lock().remove(&id);
        self.cv.notify_all();
    }

    /// Importer `id` acknowledged revocation `rid`.
    pub(crate) fn acked(&self, id: u64, rid: u64) {
        if let Some(e) = self.t.lock().get_mut(&id) {
            e.acked.insert(rid);
        }
        self.cv.notify_all();
    }

    /// Tells every importer in `subscribers` that the registration `key` is gone and
    /// waits (until `until`) until each is done with it (see the module docs); REVOKE
    /// is sent again on an importer's new connection. False when `until` passed first.
    pub(crate) fn revoke(
        &self,
        key: u128,
        subscribers: &[u64],
        until: Instant,
        shutdown: &AtomicBool,
    ) -> bool {
        let rid = self.next_revoke.fetch_add(1, Ordering::Relaxed) + 1;
        let mut waits: Vec<Wait> = {
            let t = self.t.lock();
            subscribers
                .iter()
                .map(|i| Wait {
                    importer: *i,
                    resets: t.get(i).map_or(0, |e| e.resets),
                    sent_on: None,
                    done: !t.contains_key(i),
                })
                .collect()
        };
        let frame = Header {
            id: rid,
            key,
            ..Header::new(FrameOp::Revoke)
        };
        let mut t = self.t.lock();
        let done = loop {
            let mut send = Vec::new();
            for w in waits.iter_mut().filter(|w| !w.done) {
                let Some(e) = t.get(&w.importer) else {
                    w.done = true;
                    continue;
                };
                if e.resets > w.resets || e.acked.contains(&rid) || e.exited() {
                    w.done = true;
                    continue;
                }
                if let Some((cid, ch)) = &e.conn {
                    if w.sent_on != Some(*cid) {
                        w.sent_on = Some(*cid);
                        send.push((ch.clone(), e.name.clone()));
                    }
                }
            }
            if waits.iter().all(|w| w.done) {
                break true;
            }
            if Instant::now() >= until || shutdown.load(Ordering::Acquire) {
                let who: Vec<String> = waits
                    .iter()
                    .filter(|w| !w.done)
                    .map(|w| t.get(&w.importer).map_or("?".into(), |e| e.name.clone()))
                    .collect();
                tracing::error!("revocation not acknowledged by same-host importer(s) {who:?}");
                break false;
            }
            if !send.is_empty() {
                drop(t);
                for (ch, name) in send {
                    let mut w = Watch::new(&name, until.saturating_duration_since(Instant::now()));
                    w.limit = Some(until);
                    w.shutdown = Some(shutdown);
                    if let Err(e) = ch.send(&frame, &[], &mut w) {
                        // It cannot be told: close the connection. It then suspends its
                        // imports and reconnects holding nothing (a reset) — or it is
                        // gone. Until then it is not done.
                        tracing::warn!("revoke to {name}: {e}; closing its control connection");
                        ch.shutdown();
                    }
                }
                t = self.t.lock();
                continue;
            }
            self.cv.wait_until(
                &mut t,
                until.min(Instant::now() + TICK.max(Duration::from_millis(5))),
            );
        };
        for e in t.values_mut() {
            e.acked.remove(&rid);
        }
        done
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kv_core::{Access, Descriptor};
    use std::os::unix::net::UnixStream;

    fn channel() -> (Arc<Channel>, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        let s = crate::sys::Stream::from_unix(OwnedFd::from(a)).unwrap();
        (Arc::new(Channel::for_test(s)), b)
    }

    /// Issue 14 item 1: a control connection closed (by us, or lost) while its
    /// importer may still copy used to leave the wait set — counted as acknowledged.
    /// Now only an acknowledgement, a reset, a BYE or the importer's exit count.
    #[test]
    fn an_unreachable_importer_is_never_counted_as_done() {
        let regs = Registry::default();
        let id = regs
            .register(Descriptor::new(0x1000, 0x1000, 0), Access::ReadWrite)
            .unwrap();
        let key = regs.get(id).unwrap().key;
        regs.subscribe(key, 0x1000, 0x10, 7).unwrap();
        let imp = Importers::default();
        let no = AtomicBool::new(false);
        let (ch, _peer) = channel();
        imp.attach(7, (1, ch), None, "importer", false, &regs);
        imp.detach(7, 1);
        let (_, subs) = regs.revoke(id).unwrap();
        assert_eq!(subs, vec![7]);
        let short = Instant::now() + Duration::from_millis(100);
        assert!(
            !imp.revoke(key, &subs, short, &no),
            "unreachable counted as done"
        );
        // It reconnects and REVOKE goes out again; it acknowledges.
        std::thread::scope(|s| {
            let (ch2, mut peer2) = channel();
            let (imp, regs) = (&imp, &regs);
            s.spawn(move || {
                imp.attach(7, (2, ch2), None, "importer", false, regs);
                use std::io::Read;
                let mut f = [0u8; crate::wire::HEADER_LEN];
                peer2.read_exact(&mut f).unwrap();
                let h = crate::wire::decode_header(&f).unwrap();
                assert_eq!((h.op, h.key), (FrameOp::Revoke, key));
                imp.acked(7, h.id);
            });
            let until = Instant::now() + Duration::from_secs(5);
            assert!(imp.revoke(key, &subs, until, &no));
        });
        // A reset (reconnect holding nothing) counts, and so does an exited process.
        imp.detach(7, 2);
        std::thread::scope(|s| {
            let (ch3, _p3) = channel();
            let imp = &imp;
            let regs = &regs;
            s.spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                imp.attach(7, (3, ch3), None, "importer", true, regs);
            });
            assert!(imp.revoke(key, &subs, Instant::now() + Duration::from_secs(5), &no));
        });
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pidfd = crate::sys::pidfd_open(child.id()).unwrap();
        child.wait().unwrap();
        let (ch4, _p4) = channel();
        imp.attach(8, (4, ch4), Some(pidfd), "gone", false, &regs);
        imp.detach(8, 4);
        assert!(imp.revoke(key, &[8], Instant::now() + Duration::from_secs(5), &no));
        // BYE forgets it.
        imp.bye(7, &regs);
        assert!(imp.revoke(key, &[7], Instant::now(), &no));
    }
}
