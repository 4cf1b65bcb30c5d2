//! Cases about notifications: exactly once, in order, after their data, and for READs
//! to the peer whose memory was read.

use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::backend::*;
use crate::error::{Error, Result};

use super::harness::{check, check_eq, pattern, Conn, Harness};

/// Notifications arrive exactly once, with their payload and the sender's agent name,
/// after the data they follow; notifications alone keep their order.
pub fn notifications(h: &dyn Harness) -> Result<()> {
    let c = Conn::new(h)?;
    let l = c.local(8192, 41)?;
    let (r, _) = c.remote(8192, 42)?;
    let req = c.single(Op::Write, l.mem.desc(), r.mem.desc())?;
    c.run(&req, Some(Bytes::from_static(b"layer-0 done")))?;
    let got = c.drain_b(1)?;
    check(got.len() == 1, || {
        format!("{} notifications, want 1", got.len())
    })?;
    check(
        got[0].payload == Bytes::from_static(b"layer-0 done") && got[0].peer == c.a.name,
        || format!("notification {:?}", got[0]),
    )?;
    check_eq(
        &r.mem.read(0, 8192)?,
        &pattern(41, 8192),
        "data before notification",
    )?;
    // Notifications alone keep their order; a big payload survives.
    let big = Bytes::from(pattern(43, 60_000));
    for i in 0..5u8 {
        c.a.backend.notify(c.peer, Bytes::from(vec![i; 3]))?;
    }
    c.a.backend.notify(c.peer, big.clone())?;
    let got = c.drain_b(6)?;
    check(got.len() == 6, || {
        format!("{} notifications, want 6", got.len())
    })?;
    for (i, n) in got.iter().take(5).enumerate() {
        check(n.payload[..] == [i as u8; 3], || {
            format!("notification {i} out of order: {:?}", n.payload)
        })?;
    }
    check(got[5].payload == big, || {
        "60 000-byte payload changed".into()
    })?;
    // Exactly once: nothing more arrives.
    c.drive(Duration::from_millis(20));
    let mut more = Vec::new();
    c.b.backend.drain_notifications(&mut more)?;
    check(more.is_empty(), || {
        format!("{} duplicate notifications", more.len())
    })?;
    c.finish(vec![l, r])
}

/// Posts an `op` of `len` bytes with a notification, then drives both sides and drains
/// B's notifications — without polling the transfer — until it arrives; at that moment
/// the destination must already hold all the data. A gets no notification of its own.
fn notified(h: &dyn Harness, op: Op, len: usize, what: &str) -> Result<()> {
    let c = Conn::new(h)?;
    let (lseed, rseed) = (131 + len as u64, 132 + len as u64);
    let l = c.local(len, lseed)?;
    let (r, _) = c.remote(len, rseed)?;
    let payload = Bytes::from_static(b"kv ready");
    let id = c.post(
        &c.single(op, l.mem.desc(), r.mem.desc())?,
        Some(payload.clone()),
    )?;
    let (dst, want) = match op {
        Op::Write => (&r, pattern(lseed, len)),
        Op::Read => (&l, pattern(rseed, len)),
    };
    let end = Instant::now() + c.deadline;
    let mut got = Vec::new();
    let arrived = loop {
        if Instant::now() > end {
            break Err(Error::Corrupt(
                "no notification arrived before the deadline".into(),
            ));
        }
        let _ = c.a.backend.progress();
        let _ = c.b.backend.progress();
        c.b.backend.drain_notifications(&mut got)?;
        if let Some(n) = got.first() {
            // Checked at once: the data must not still be on its way.
            break check(n.payload == payload && n.peer == c.a.name, || {
                format!("notification {n:?}")
            })
            .and_then(|_| check_eq(&dst.mem.read(0, len)?, &want, what));
        }
    };
    // Whatever happened, the transfer ends before its memory can go.
    let st = c.wait(id);
    let _ = c.a.backend.release(id);
    arrived?;
    check(matches!(st, Status::Done), || {
        format!("transfer ended {st:?}")
    })?;
    c.drive(Duration::from_millis(10));
    let mut at_a = Vec::new();
    c.b.backend.drain_notifications(&mut got)?;
    c.a.backend.drain_notifications(&mut at_a)?;
    check(got.len() == 1 && at_a.is_empty(), || {
        format!(
            "{} notifications at the peer and {} at the initiator for one {op}",
            got.len(),
            at_a.len()
        )
    })?;
    c.finish(vec![l, r])
}

/// A big WRITE with a notification: the target drains notifications while driving
/// progress (not waiting for `Done` first), and the moment the notification shows up
/// the data must already be complete.
pub fn notification_after_data(h: &dyn Harness) -> Result<()> {
    notified(
        h,
        Op::Write,
        8 << 20,
        "target memory when the WRITE's notification arrived (notification before its data)",
    )
}

/// A READ with a notification: the peer whose memory was read gets it, after the read
/// finished (the data is in the reader's memory when it arrives); the reader gets none.
pub fn read_notification(h: &dyn Harness) -> Result<()> {
    notified(
        h,
        Op::Read,
        4 << 20,
        "reader's memory when the READ's notification arrived",
    )
}
