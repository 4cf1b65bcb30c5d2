//! The case for prepared lists (optional: a backend without them returns `Unsupported`).

use crate::backend::*;
use crate::desc::{DescriptorList, MemKind};
use crate::error::{Error, Result};

use super::harness::{check, check_eq, pattern, Conn, Harness, Mem};

const N: usize = 32;
const B: usize = 256;

/// Whether a refusal is the one wanted.
type IsWant = fn(&Error) -> bool;

/// A list's items as (memory, offset, length): memory 0 or 1 of its side.
type Items = Vec<(usize, usize, usize)>;

/// Items `0..N`: the blocks of memory 0; item `N`: 128 bytes at `tail`; item `N + 1`:
/// block `extra` of memory 1 (another registration).
fn items(tail: usize, extra: usize) -> Items {
    (0..N)
        .map(|i| (0, i * B, B))
        .chain([(0, tail, 128), (1, extra * B, B)])
        .collect()
}

/// The items as a descriptor list over `mems`.
fn list(items: &Items, mems: [&Mem; 2]) -> Result<DescriptorList> {
    DescriptorList::try_from_iter(
        items
            .iter()
            .map(|(m, o, n)| mems[*m].at(*o as u64, *n as u64)),
    )
}

/// Copies item `si` of `src` (in `sbufs`) over item `di` of `dst` (in `dbufs`).
fn copy_item(
    sbufs: &[Vec<u8>; 2],
    s: (usize, usize, usize),
    dbufs: &mut [Vec<u8>; 2],
    d: (usize, usize, usize),
) {
    let bytes = sbufs[s.0][s.1..s.1 + s.2].to_vec();
    dbufs[d.0][d.1..d.1 + d.2].copy_from_slice(&bytes);
}

/// Prepared lists (`prepare_list` / `prepare_selected` / `release_list`), when the
/// backend has them: items selected by index move exactly their bytes, both ways, in
/// index order (items of two registrations in one list, items of different sizes); a
/// list naming memory outside the registrations is refused; bad selections are
/// refused; transfers outlive the list they were made from; a list pins nothing, and a
/// transfer made from one is refused (moving nothing) once its local registration or
/// the peer's is withdrawn.
///
/// Contract: "Prepared lists" in the `Backend` docs.
pub fn prepared_lists(h: &dyn Harness) -> Result<()> {
    let c = Conn::new(h)?;
    let size = (N + 2) * B;
    let seeds = [[301, 303], [302, 304]];
    let (l, l1) = (c.local(size, seeds[0][0])?, c.local(B, seeds[0][1])?);
    let (r, _) = c.remote(size, seeds[1][0])?;
    let (r1, _) = c.remote(size, seeds[1][1])?;
    let (litems, ritems) = (items(N * B, 0), items(N * B + 64, 3));
    let a = &c.a.backend;
    let la = match a.prepare_list(ListSide::Local, MemKind::Dram, &list(&litems, [&l, &l1])?) {
        Err(Error::Unsupported(_)) => return c.finish(vec![l, l1, r, r1]),
        x => x?,
    };
    let rlist = list(&ritems, [&r, &r1])?;
    let ra = a.prepare_list(ListSide::Remote(c.peer), MemKind::Dram, &rlist)?;
    let mut lbufs = [pattern(seeds[0][0], size), pattern(seeds[0][1], B)];
    let mut rbufs = [pattern(seeds[1][0], size), pattern(seeds[1][1], size)];

    // A list naming a byte outside the registrations is refused, on either side.
    let past = |m: &Mem, at: usize| {
        let mut bad = DescriptorList::strided(m.at(0, 0).addr, B as u64, 4, B as u64, 0)?;
        bad.push(m.at(at as u64 - 8, 16))?;
        Ok::<_, Error>(bad)
    };
    for (side, bad) in [
        (ListSide::Local, past(&l, size)?),
        (ListSide::Remote(c.peer), past(&r1, size)?),
    ] {
        let got = a.prepare_list(side, MemKind::Dram, &bad);
        check(
            matches!(got, Err(Error::NotRegistered(_) | Error::OutOfBounds(_))),
            || {
                format!("a list naming memory outside the registrations was accepted ({side:?}: {got:?})")
            },
        )?;
    }

    let run_on = |op: Op, (la, lids): (ListId, &[u32]), (ra, rids): (ListId, &[u32])| {
        let id = a.prepare_selected(&SelectRequest {
            op,
            local: la,
            local_items: lids,
            remote: ra,
            remote_items: rids,
        })?;
        let st = c.post_and_wait(id, &c.opts(None));
        if st.is_finished() {
            a.release(id)?;
        }
        match st {
            Status::Done => Ok(()),
            s => Err(Error::Corrupt(format!("{op} of selected items: {s:?}"))),
        }
    };
    let run = |op: Op, lids: &[u32], rids: &[u32]| run_on(op, (la, lids), (ra, rids));
    let (n, m) = (N as u32, N as u32 + 1);
    let check_mems = |mems: [&Mem; 2], want: &[Vec<u8>; 2], what: &str| -> Result<()> {
        for (k, mem) in mems.iter().enumerate() {
            check_eq(&mem.mem.read(0, want[k].len())?, &want[k], what)?;
        }
        Ok(())
    };
    // WRITE, both registrations and the short item included.
    let (lids, rids) = ([5u32, 0, 31, n, 7, m], [9u32, 31, 2, n, 4, m]);
    run(Op::Write, &lids, &rids)?;
    for (li, ri) in lids.iter().zip(&rids) {
        copy_item(
            &lbufs,
            litems[*li as usize],
            &mut rbufs,
            ritems[*ri as usize],
        );
    }
    check_mems([&r, &r1], &rbufs, "WRITE of selected items: remote memory")?;
    // READ.
    let (lids, rids) = ([1u32, 2, n, 3, m], [30u32, 0, n, 17, 12]);
    run(Op::Read, &lids, &rids)?;
    for (li, ri) in lids.iter().zip(&rids) {
        copy_item(
            &rbufs,
            ritems[*ri as usize],
            &mut lbufs,
            litems[*li as usize],
        );
    }
    check_mems([&l, &l1], &lbufs, "READ of selected items: local memory")?;
    // Lists whose items are all alike (the blocks only: a backend may plan them
    // faster), both ways.
    let blocks =
        |m: &Mem| DescriptorList::strided(m.at(0, 0).addr, B as u64, N as u64, B as u64, 0);
    let (lb, rb) = (
        a.prepare_list(ListSide::Local, MemKind::Dram, &blocks(&l)?)?,
        a.prepare_list(ListSide::Remote(c.peer), MemKind::Dram, &blocks(&r)?)?,
    );
    for (op, lids, rids) in [
        (Op::Write, [3u32, 8, 20, 9], [21u32, 5, 11, 6]),
        (Op::Read, [7, 6, 30, 31], [1, 2, 3, 29]),
    ] {
        run_on(op, (lb, &lids), (rb, &rids))?;
        for (li, ri) in lids.iter().zip(&rids) {
            let (lx, rx) = (litems[*li as usize], ritems[*ri as usize]);
            match op {
                Op::Write => copy_item(&lbufs, lx, &mut rbufs, rx),
                Op::Read => copy_item(&rbufs, rx, &mut lbufs, lx),
            }
        }
    }
    check_mems(
        [&r, &r1],
        &rbufs,
        "selected blocks of like lists: remote memory",
    )?;
    check_mems(
        [&l, &l1],
        &lbufs,
        "selected blocks of like lists: local memory",
    )?;
    a.release_list(lb)?;
    a.release_list(rb)?;

    // Bad selections.
    let select = |op, local, li: &[u32], remote, ri: &[u32]| {
        a.prepare_selected(&SelectRequest {
            op,
            local,
            local_items: li,
            remote,
            remote_items: ri,
        })
    };
    let bad: [(&str, Result<TransferId>, IsWant); 5] = [
        (
            "an index past the end",
            select(Op::Write, la, &[N as u32 + 2], ra, &[0]),
            |e| matches!(e, Error::OutOfBounds(_)),
        ),
        (
            "index arrays of different lengths",
            select(Op::Write, la, &[0, 1], ra, &[0]),
            |e| matches!(e, Error::InvalidArgument(_)),
        ),
        ("no index", select(Op::Write, la, &[], ra, &[]), |e| {
            matches!(e, Error::InvalidArgument(_))
        }),
        (
            "unequal totals",
            select(Op::Write, la, &[0], ra, &[N as u32]),
            |e| matches!(e, Error::InvalidArgument(_)),
        ),
        (
            "the local list as the remote one",
            select(Op::Write, ra, &[0], la, &[0]),
            |e| matches!(e, Error::InvalidArgument(_)),
        ),
    ];
    for (what, got, ok) in bad {
        if let Ok(id) = got {
            let _ = a.release(id);
        }
        check(got.as_ref().err().is_some_and(ok), || {
            format!("prepare_selected with {what} gave {got:?}")
        })?;
    }

    // A transfer outlives its list; a released list is refused.
    let kept = select(Op::Write, la, &[6], ra, &[6])?;
    a.release_list(ra)?;
    let got = select(Op::Write, la, &[6], ra, &[6]);
    check(matches!(got, Err(Error::NotRegistered(_))), || {
        format!("prepare_selected naming a released list gave {got:?}")
    })?;
    check(a.release_list(ra).is_err(), || {
        "a second release_list succeeded".into()
    })?;
    match c.post_and_wait(kept, &c.opts(None)) {
        Status::Done => a.release(kept)?,
        s => {
            return Err(Error::Corrupt(format!(
                "a transfer made before its list was released: {s:?}"
            )))
        }
    }
    copy_item(&lbufs, litems[6], &mut rbufs, ritems[6]);
    check_mems(
        [&r, &r1],
        &rbufs,
        "a transfer made before its list was released: remote memory",
    )?;

    // A list pins nothing: the local registration is withdrawn (not Busy: nothing is
    // posted) and a transfer made from the list is refused, moving nothing.
    let ra = a.prepare_list(ListSide::Remote(c.peer), MemKind::Dram, &rlist)?;
    let after_local = select(Op::Read, la, &[11], ra, &[12]);
    a.deregister(l.reg).map_err(|e| {
        Error::Corrupt(format!(
            "deregister with a prepared list and an unposted transfer: {e}"
        ))
    })?;
    if let Ok(id) = after_local {
        let st = c.post_and_wait(id, &c.opts(None));
        check(!matches!(st, Status::Done), || {
            "a READ of selected items into a deregistered region gave Done".into()
        })?;
    }
    check_mems(
        [&l, &l1],
        &lbufs,
        "a READ of selected items after the local deregistration: local memory",
    )?;
    // Same once the peer withdrew its registration.
    let l2 = c.local(B, 305)?;
    let la2 = a.prepare_list(
        ListSide::Local,
        MemKind::Dram,
        &DescriptorList::single(l2.at(0, B as u64))?,
    )?;
    let after_peer = select(Op::Write, la2, &[0], ra, &[10])?;
    c.b.backend.deregister(r.reg)?;
    let st = c.post_and_wait(after_peer, &c.opts(None));
    check(!matches!(st, Status::Done), || {
        "a WRITE of selected items after the peer deregistered gave Done".into()
    })?;
    check_mems(
        [&r, &r1],
        &rbufs,
        "a WRITE of selected items after the peer deregistered: remote memory",
    )?;
    for list in [la, la2, ra] {
        a.release_list(list)?;
    }
    drop((l, r));
    c.finish(vec![l1, l2, r1])
}
