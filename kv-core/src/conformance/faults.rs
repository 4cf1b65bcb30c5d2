//! Cases about things going wrong: cancel, deregistration (local and the peer's),
//! deadlines, released transfers, disconnects, dead and unauthenticated peers.

use std::time::{Duration, Instant};

use crate::auth::ClusterSecret;
use crate::backend::*;
use crate::desc::{DescriptorList, MemKind};
use crate::error::{Error, Result};

use super::harness::{check, check_eq, pattern, wait, Conn, Harness, Side};

/// `cancel` returns with the transfer finished (cancelled or done) and its memory free
/// to deregister — or, bounded, `Busy`, after which the transfer ends by itself.
pub fn cancel(h: &dyn Harness) -> Result<()> {
    let c = Conn::new(h)?;
    let len = 16 << 20;
    let l = c.local(len, 71)?;
    let (r, _) = c.remote(len, 72)?;
    let id = c.a.backend.prepare(&c.request(
        Op::Write,
        DescriptorList::strided(l.mem.desc().addr, 4096, (len / 4096) as u64, 4096, 0)?,
        DescriptorList::single(r.mem.desc())?,
    ))?;
    // SAFETY: `l` stays registered until cancel returns.
    unsafe { c.a.backend.post(id, &PostOptions::default())? };
    // Bounded: `Busy` says the native layer may still touch the memory; the transfer
    // must then end by itself (as `cancel_stops_copies` allows).
    let st = match c.a.backend.cancel(id) {
        Ok(()) => c.a.backend.poll(id),
        Err(Error::Busy(_)) => c.wait(id),
        Err(e) => return Err(e),
    };
    check(
        matches!(st, Status::Done | Status::Failed(Error::Canceled)),
        || format!("after cancel the transfer is {st:?}"),
    )?;
    c.a.backend.release(id)?;
    // The memory is ours again: deregistering must succeed now.
    c.finish(vec![l, r])
}

/// After `cancel` returned `Ok`, no copy of the transfer runs any more: the target's
/// bytes do not change while both sides are driven for 100 ms. `Err(Busy)` is allowed
/// only if the transfer then finishes by itself.
pub fn cancel_stops_copies(h: &dyn Harness) -> Result<()> {
    let c = Conn::new(h)?;
    let len = 16 << 20;
    let l = c.local(len, 151)?;
    let (r, _) = c.remote(len, 152)?;
    let id = c.post(&c.single(Op::Write, l.mem.desc(), r.mem.desc())?, None)?;
    match c.a.backend.cancel(id) {
        Ok(()) => {
            let snapshot = r.mem.read(0, len)?;
            c.drive(Duration::from_millis(100));
            check_eq(
                &r.mem.read(0, len)?,
                &snapshot,
                "target memory after cancel returned (a copy kept running)",
            )?;
            let st = c.a.backend.poll(id);
            check(matches!(st, Status::Done | Status::Failed(_)), || {
                format!("after cancel the transfer is {st:?}")
            })?;
        }
        Err(Error::Busy(_)) => {
            let st = c.wait(id);
            check(st.is_finished(), || {
                format!("cancel said Busy and the transfer never finished: {st:?}")
            })?;
        }
        Err(e) => return Err(e),
    }
    c.a.backend.release(id)?;
    c.finish(vec![l, r])
}

/// `deregister` of memory a posted transfer names is `Busy` (no progress is driven
/// between post and deregister); it succeeds once the transfer finished.
pub fn deregister_busy(h: &dyn Harness) -> Result<()> {
    let c = Conn::new(h)?;
    let len = 16 << 20;
    let mut l = c.local(len, 161)?;
    let (r, _) = c.remote(len, 162)?;
    let req = c.single(Op::Write, l.mem.desc(), r.mem.desc())?;
    let mut seen_busy = false;
    for _ in 0..5 {
        let id = c.post(&req, None)?;
        let res = c.a.backend.deregister(l.reg);
        // Whatever happened, the transfer ends before its memory can go.
        let st = c.wait(id);
        c.a.backend.release(id)?;
        match res {
            Err(Error::Busy(_)) => {
                seen_busy = true;
                break;
            }
            Ok(()) => {
                // Allowed only if the transfer had already finished: look again.
                check(matches!(st, Status::Done), || {
                    format!("deregister returned Ok while the transfer naming the memory was in flight (it ended {st:?})")
                })?;
                // SAFETY: as in `Conn::mem`: `l` outlives its registration.
                l.reg = unsafe {
                    c.a.backend
                        .register(MemKind::Dram, &l.mem.desc(), Access::ReadWrite)?
                };
            }
            Err(e) => return Err(e),
        }
    }
    check(seen_busy, || {
        "deregister returned Ok five times while a posted 16 MiB transfer named the memory; it must be Busy".into()
    })?;
    c.finish(vec![l, r])
}

/// A transfer to a peer whose backend was dropped ends with an error before its
/// deadline. `TimedOut` is accepted beside `RemoteDisconnected`: on some transports a
/// dropped in-process peer looks like a stalled one until the deadline.
pub fn dropped_peer(h: &dyn Harness) -> Result<()> {
    let Conn {
        a,
        b,
        peer,
        deadline,
    } = Conn::new(h)?;
    let l = Conn::mem(&a, 1 << 20, 81)?;
    let rm = Conn::mem(&b, 1 << 20, 82)?;
    let key = b.backend.remote_key(rm.reg)?;
    a.backend
        .import_remote(peer, MemKind::Dram, &rm.mem.desc(), &key)?;
    let rdesc = rm.mem.desc();
    let Side {
        backend, memory, ..
    } = b;
    // The peer dies: its backend goes first (it stops touching its memory), then the memory.
    drop(backend);
    drop(rm);
    drop(memory);
    let start = Instant::now();
    let id = a.backend.prepare(&TransferRequest {
        op: Op::Write,
        local_kind: MemKind::Dram,
        local: DescriptorList::single(l.mem.desc())?,
        peer,
        remote_kind: MemKind::Dram,
        remote: DescriptorList::single(rdesc)?,
    });
    // Some backends learn of the death at prepare; that is a bounded error too.
    let st = match id {
        Err(e) => Status::Failed(e),
        Ok(id) => {
            let opts = PostOptions {
                notification: None,
                deadline: Some(Instant::now() + deadline),
            };
            // SAFETY: `l` stays registered until the transfer finished.
            match unsafe { a.backend.post(id, &opts) } {
                Err(e) => Status::Failed(e),
                Ok(()) => wait(&*a.backend, None, id, deadline + Duration::from_secs(5)),
            }
        }
    };
    check(
        matches!(
            st,
            Status::Failed(Error::RemoteDisconnected { .. })
                | Status::Failed(Error::TimedOut { .. })
        ) && start.elapsed() <= deadline + Duration::from_secs(5),
        || {
            format!(
                "transfer to a dropped peer: {st:?} after {:?}",
                start.elapsed()
            )
        },
    )?;
    a.backend.deregister(l.reg)?;
    Ok(())
}

/// `disconnect(peer)` with a transfer in flight: it ends `Failed(RemoteDisconnected)`
/// (or `Done`), its memory deregisters afterwards, and a later post or prepare to that
/// peer fails with `RemoteDisconnected`.
pub fn disconnect_inflight(h: &dyn Harness) -> Result<()> {
    let c = Conn::new(h)?;
    let len = 16 << 20;
    let mut l = c.local(len, 171)?;
    let (r, _) = c.remote(len, 172)?;
    let req = c.single(Op::Write, l.mem.desc(), r.mem.desc())?;
    let id = c.post(&req, None)?;
    let later = c.a.backend.prepare(&req)?;
    c.a.backend.disconnect(c.peer)?;
    let st = c.wait(id);
    check(
        matches!(
            st,
            Status::Done | Status::Failed(Error::RemoteDisconnected { .. })
        ),
        || format!("in-flight transfer after disconnect ended {st:?}, want RemoteDisconnected"),
    )?;
    c.a.backend.release(id)?;
    c.a.backend.deregister(l.reg)?;
    // SAFETY: as in `Conn::mem`: `l` outlives its registration.
    l.reg = unsafe {
        c.a.backend
            .register(MemKind::Dram, &l.mem.desc(), Access::ReadWrite)?
    };
    let posted = c.post_and_wait(later, &c.opts(None));
    check(
        matches!(posted, Status::Failed(Error::RemoteDisconnected { .. })),
        || format!("post to a disconnected peer gave {posted:?}, want RemoteDisconnected"),
    )?;
    let _ = c.a.backend.release(later);
    let req = c.single(Op::Write, l.mem.desc(), r.mem.desc())?;
    let prepared = c.a.backend.prepare(&req);
    check(
        matches!(prepared, Err(Error::RemoteDisconnected { .. })),
        || format!("prepare to a disconnected peer gave {prepared:?}, want RemoteDisconnected"),
    )?;
    c.finish(vec![l, r])
}

/// A post whose deadline already passed fails with `TimedOut` (at post or in its
/// status) and moves nothing.
pub fn expired_deadline(h: &dyn Harness) -> Result<()> {
    let c = Conn::new(h)?;
    let l = c.local(4096, 181)?;
    let (r, _) = c.remote(4096, 182)?;
    let id =
        c.a.backend
            .prepare(&c.single(Op::Write, l.mem.desc(), r.mem.desc())?)?;
    let past = Instant::now();
    std::thread::sleep(Duration::from_millis(2));
    let opts = PostOptions {
        notification: None,
        deadline: Some(past),
    };
    let st = c.post_and_wait(id, &opts);
    check(matches!(st, Status::Failed(Error::TimedOut { .. })), || {
        format!("post with a deadline in the past gave {st:?}, want TimedOut")
    })?;
    let _ = c.a.backend.release(id);
    check_eq(
        &r.mem.read(0, 4096)?,
        &pattern(182, 4096),
        "target after an expired post",
    )?;
    c.finish(vec![l, r])
}

/// `poll` of a released transfer, or of an id never issued, is
/// `Failed(InvalidArgument)` naming the id.
pub fn poll_after_release(h: &dyn Harness) -> Result<()> {
    let c = Conn::new(h)?;
    let l = c.local(4096, 191)?;
    let (r, _) = c.remote(4096, 192)?;
    let id = c.post(&c.single(Op::Write, l.mem.desc(), r.mem.desc())?, None)?;
    let st = c.wait(id);
    check(matches!(st, Status::Done), || {
        format!("transfer ended {st:?}")
    })?;
    c.a.backend.release(id)?;
    for (what, id) in [("released", id), ("never issued", TransferId(u64::MAX - 7))] {
        let st = c.a.backend.poll(id);
        let named = matches!(&st, Status::Failed(Error::InvalidArgument(m)) if m.contains(&id.0.to_string()));
        check(named, || {
            format!(
                "poll of a {what} transfer gave {st:?}, want Failed(InvalidArgument) naming {id}"
            )
        })?;
    }
    c.finish(vec![l, r])
}

/// A prepared transfer whose local registration was deregistered is refused (at post,
/// or it fails) and moves nothing: the backend never reads memory it no longer owns.
pub fn post_after_deregister(h: &dyn Harness) -> Result<()> {
    let c = Conn::new(h)?;
    let l = c.local(4096, 91)?;
    let (r, _) = c.remote(4096, 92)?;
    let id =
        c.a.backend
            .prepare(&c.single(Op::Write, l.mem.desc(), r.mem.desc())?)?;
    c.a.backend.deregister(l.reg)?;
    // The memory itself is still alive (`l` is held), only deregistered; a conforming
    // backend refuses to touch it.
    let st = c.post_and_wait(id, &c.opts(None));
    check(matches!(st, Status::Failed(_)), || {
        format!("post after the local registration was deregistered gave {st:?}")
    })?;
    let _ = c.a.backend.release(id);
    check_eq(
        &r.mem.read(0, 4096)?,
        &pattern(92, 4096),
        "target after a refused post",
    )?;
    c.b.backend.deregister(r.reg)?;
    Ok(())
}

/// After the PEER deregistered memory A imported, A's WRITEs into it and READs from it
/// fail and move nothing — also when A prepared the transfer before the deregister.
pub fn post_after_peer_deregister(h: &dyn Harness) -> Result<()> {
    let c = Conn::new(h)?;
    let l = c.local(4096, 201)?;
    for (op, prepare_first) in [(Op::Write, false), (Op::Read, false), (Op::Write, true)] {
        let (r, _) = c.remote(4096, 202)?;
        let req = c.single(op, l.mem.desc(), r.mem.desc())?;
        let early = if prepare_first {
            Some(c.a.backend.prepare(&req)?)
        } else {
            None
        };
        c.b.backend.deregister(r.reg)?;
        let st = match early {
            Some(id) => {
                let st = c.post_and_wait(id, &c.opts(None));
                let _ = c.a.backend.release(id);
                st
            }
            None => match c.run(&req, None) {
                Ok(()) => Status::Done,
                Err(e) => Status::Failed(e),
            },
        };
        let what = format!(
            "{op} {} the peer deregistered",
            if prepare_first {
                "prepared before, posted after"
            } else {
                "after"
            }
        );
        check(matches!(st, Status::Failed(_)), || {
            format!("{what} gave {st:?}")
        })?;
        check_eq(
            &r.mem.read(0, 4096)?,
            &pattern(202, 4096),
            &format!("peer memory, {what}"),
        )?;
        check_eq(
            &l.mem.read(0, 4096)?,
            &pattern(201, 4096),
            &format!("local memory, {what}"),
        )?;
    }
    c.finish(vec![l])
}

/// A peer with another cluster secret cannot connect, import or move a byte, and is
/// refused within the deadline. Runs when `capabilities().authenticated`.
pub fn unauthenticated_peer_refused(h: &dyn Harness) -> Result<()> {
    let init = |name: &str| -> Result<BackendInit> {
        Ok(BackendInit::new(name).with_secret(ClusterSecret::generate()?))
    };
    let (a, b) = h.pair_with(&init("a")?, &init("b")?)?;
    if !a.backend.capabilities().authenticated || !b.backend.capabilities().authenticated {
        return Ok(());
    }
    let deadline = h.deadline();
    let l = Conn::mem(&a, 4096, 211)?;
    let mut r = Conn::mem(&b, 4096, 212)?;
    r.on_b = true;
    let start = Instant::now();
    let mut outcomes = Vec::new();
    let connected = b
        .backend
        .connection_info()
        .and_then(|info| a.backend.connect(&b.name, &info));
    if let Ok(peer) = connected {
        let c = Conn {
            a,
            b,
            peer,
            deadline,
        };
        let imported = c.import(&r, r.mem.desc());
        if imported.is_ok() {
            for op in [Op::Write, Op::Read] {
                outcomes.push((op, c.run(&c.single(op, l.mem.desc(), r.mem.desc())?, None)));
            }
        }
        check(outcomes.iter().all(|(_, o)| o.is_err()), || {
            format!("a peer with another cluster secret moved data: {outcomes:?}")
        })?;
        check_eq(
            &r.mem.read(0, 4096)?,
            &pattern(212, 4096),
            "memory of the peer that refused",
        )?;
        check_eq(
            &l.mem.read(0, 4096)?,
            &pattern(211, 4096),
            "memory of the unauthenticated side",
        )?;
        check(
            start.elapsed() <= deadline * 3 + Duration::from_secs(5),
            || {
                format!(
                    "refusing the unauthenticated peer took {:?}",
                    start.elapsed()
                )
            },
        )?;
        return c.finish(vec![l, r]);
    }
    check(start.elapsed() <= deadline + Duration::from_secs(5), || {
        format!(
            "refusing the unauthenticated peer took {:?}",
            start.elapsed()
        )
    })?;
    a.backend.deregister(l.reg)?;
    b.backend.deregister(r.reg)
}
