//! Cases about moving bytes: sizes, scattered and zero-length lists, reposts, bounds
//! (the importer's and the target's), read-only registrations.

use crate::auth::fill_random;
use crate::backend::*;
use crate::desc::{Descriptor, DescriptorList, MemKind};
use crate::error::{Error, Result};

use super::harness::{check, check_eq, pattern, Conn, Harness, Mem};

/// Register, export a key, deregister; a second deregister is `NotRegistered`.
///
/// Contract: remote keys may be empty only for a local backend.
pub fn register_deregister(h: &dyn Harness) -> Result<()> {
    let (a, _b) = h.pair()?;
    let m = Conn::mem(&a, 4096, 1)?;
    let key = a.backend.remote_key(m.reg)?;
    check(!key.is_empty() || a.backend.capabilities().local, || {
        "empty remote key".into()
    })?;
    a.backend.deregister(m.reg)?;
    check(
        matches!(a.backend.deregister(m.reg), Err(Error::NotRegistered(_))),
        || "second deregister did not fail with NotRegistered".into(),
    )?;
    check(a.backend.remote_key(m.reg).is_err(), || {
        "remote_key of a deregistered region succeeded".into()
    })
}

/// Connection info and remote keys cross to the peer; garbage info is refused, and so
/// is a malformed key, with `InvalidMetadata` (never a panic).
pub fn export_import(h: &dyn Harness) -> Result<()> {
    let c = Conn::new(h)?;
    let (m, rid) = c.remote(4096, 2)?;
    c.a.backend.release_remote(rid)?;
    check(c.a.backend.release_remote(rid).is_err(), || {
        "double release_remote succeeded".into()
    })?;
    check(c.a.backend.connect("garbage", &[0xff; 3]).is_err(), || {
        "connect with 3 bytes of garbage succeeded".into()
    })?;
    let key = c.b.backend.remote_key(m.reg)?;
    if !key.is_empty() {
        let mut longer = key.to_vec();
        longer.push(0xff);
        for bad in [&key[..key.len() - 1], &longer[..]] {
            let r =
                c.a.backend
                    .import_remote(c.peer, MemKind::Dram, &m.mem.desc(), bad);
            check(matches!(r, Err(Error::InvalidMetadata(_))), || {
                format!(
                    "import of a {}-byte key (real one {}) gave {r:?}, want InvalidMetadata",
                    bad.len(),
                    key.len()
                )
            })?;
        }
    }
    c.finish(vec![m])
}

fn one_transfer(h: &dyn Harness, op: Op, len: usize) -> Result<()> {
    let c = Conn::new(h)?;
    // Pad both buffers so writes outside the range would be seen.
    let pad = 64;
    let (lseed, rseed) = (10 + len as u64, 20 + len as u64);
    let l = c.local(len + 2 * pad, lseed)?;
    let (r, _) = c.remote(len + 2 * pad, rseed)?;
    let (src, dst) = match op {
        Op::Write => ((&l, lseed), (&r, rseed)),
        Op::Read => ((&r, rseed), (&l, lseed)),
    };
    // Expected bytes come from the source as it was BEFORE the transfer, so a copy in
    // the wrong direction cannot go unseen.
    let src_before = pattern(src.1, len + 2 * pad);
    let mut want = pattern(dst.1, len + 2 * pad);
    want[pad..pad + len].copy_from_slice(&src_before[pad..pad + len]);
    let req = c.single(
        op,
        l.at(pad as u64, len as u64),
        r.at(pad as u64, len as u64),
    )?;
    c.run(&req, None)?;
    check_eq(
        &dst.0.mem.read(0, len + 2 * pad)?,
        &want,
        &format!("{op} of {len} bytes: destination"),
    )?;
    check_eq(
        &src.0.mem.read(0, len + 2 * pad)?,
        &src_before,
        &format!("{op} of {len} bytes: source changed"),
    )?;
    c.finish(vec![l, r])
}

/// WRITE of 1 B, 4 KiB, 1 MiB and 16 MiB, byte-exact, nothing outside touched, source
/// unchanged.
pub fn write_sizes(h: &dyn Harness) -> Result<()> {
    for len in [1, 4096, 1 << 20, 16 << 20] {
        one_transfer(h, Op::Write, len)?;
    }
    Ok(())
}

/// READ of 1 B, 4 KiB, 1 MiB and 16 MiB, byte-exact, nothing outside touched, source
/// unchanged.
pub fn read_sizes(h: &dyn Harness) -> Result<()> {
    for len in [1, 4096, 1 << 20, 16 << 20] {
        one_transfer(h, Op::Read, len)?;
    }
    Ok(())
}

/// A scattered list, the (offset, length) of each descriptor, and the buffer size.
type Scatter = (DescriptorList, Vec<(usize, usize)>, usize);

/// Builds `n` scattered descriptors of varied length inside a buffer at `base`, placed
/// in the order given by `reverse`.
fn scatter(base: u64, n: usize, reverse: bool) -> Result<Scatter> {
    let lens: Vec<usize> = (0..n).map(|i| 16 + (i * 7919 % 241)).collect();
    let mut offs = vec![0usize; n];
    let mut pos = 0usize;
    let order: Vec<usize> = if reverse {
        (0..n).rev().collect()
    } else {
        (0..n).collect()
    };
    for i in order {
        pos += 8 + i % 5; // gaps, so neighbours are never merged
        offs[i] = pos;
        pos += lens[i];
    }
    let list = (0..n)
        .map(|i| Descriptor::new(base + offs[i] as u64, lens[i] as u64, 0))
        .collect::<Result<_>>()?;
    Ok((list, offs.into_iter().zip(lens).collect(), pos + 64))
}

fn scattered(h: &dyn Harness, op: Op) -> Result<()> {
    const N: usize = 10_000;
    let c = Conn::new(h)?;
    let (_, _, lsize) = scatter(0, N, false)?;
    let (_, _, rsize) = scatter(0, N, true)?;
    let l = c.local(lsize, 31)?;
    let (r, _) = c.remote(rsize, 32)?;
    let (ll, loffs, _) = scatter(l.mem.desc().addr, N, false)?;
    let (rl, roffs, _) = scatter(r.mem.desc().addr, N, true)?;
    check(ll.len() == N as u64 && rl.len() == N as u64, || {
        "scatter lists lost entries".into()
    })?;
    c.run(&c.request(op, ll, rl), None)?;
    let (lbuf, rbuf) = (pattern(31, lsize), pattern(32, rsize));
    let (src, src_offs, mut want, dst, dst_offs) = match op {
        Op::Write => (lbuf, &loffs, rbuf, &r, &roffs),
        Op::Read => (rbuf, &roffs, lbuf, &l, &loffs),
    };
    for ((so, n), (d, _)) in src_offs.iter().zip(dst_offs) {
        want[*d..*d + *n].copy_from_slice(&src[*so..*so + *n]);
    }
    check_eq(
        &dst.mem.read(0, want.len())?,
        &want,
        &format!("scattered {op} of {N} descriptors"),
    )?;
    c.finish(vec![l, r])
}

/// WRITE of a 10 000-descriptor scattered list onto a differently scattered list.
pub fn scattered_write(h: &dyn Harness) -> Result<()> {
    scattered(h, Op::Write)
}

/// READ of a 10 000-descriptor scattered list from a differently scattered list.
pub fn scattered_read(h: &dyn Harness) -> Result<()> {
    scattered(h, Op::Read)
}

/// Lists with zero-length descriptors between (and after) real ones move exactly the
/// real bytes, both ways.
///
/// Contract: zero-length descriptors inside a list are allowed and move nothing.
pub fn zero_length_descriptors(h: &dyn Harness) -> Result<()> {
    let c = Conn::new(h)?;
    // (offset, len) pieces; the zero-length ones sit inside the buffers.
    let lp = [
        (0u64, 100u64),
        (100, 0),
        (200, 300),
        (600, 0),
        (700, 0),
        (800, 50),
    ];
    let rp = [(0u64, 0u64), (64, 50), (1000, 0), (1100, 400), (2048, 0)];
    for op in [Op::Write, Op::Read] {
        let l = c.local(4096, 101)?;
        let (r, _) = c.remote(4096, 102)?;
        let list = |m: &Mem, p: &[(u64, u64)]| {
            DescriptorList::try_from_iter(p.iter().map(|(o, n)| m.at(*o, *n)))
        };
        c.run(&c.request(op, list(&l, &lp)?, list(&r, &rp)?), None)?;
        let (lbuf, rbuf) = (pattern(101, 4096), pattern(102, 4096));
        let flat = |buf: &[u8], p: &[(u64, u64)]| -> Vec<u8> {
            p.iter()
                .flat_map(|(o, n)| buf[*o as usize..(*o + *n) as usize].to_vec())
                .collect()
        };
        let (src, dst, dst_p, mut want, what) = match op {
            Op::Write => (flat(&lbuf, &lp), &r, &rp[..], rbuf, "remote"),
            Op::Read => (flat(&rbuf, &rp), &l, &lp[..], lbuf, "local"),
        };
        let mut at = 0;
        for (o, n) in dst_p.iter().filter(|(_, n)| *n > 0) {
            want[*o as usize..(*o + *n) as usize].copy_from_slice(&src[at..at + *n as usize]);
            at += *n as usize;
        }
        check_eq(
            &dst.mem.read(0, 4096)?,
            &want,
            &format!("{op} with zero-length descriptors: {what} memory"),
        )?;
        c.a.backend.deregister(l.reg)?;
        c.b.backend.deregister(r.reg)?;
    }
    Ok(())
}

/// A prepared transfer posts many times; each post moves the current data.
pub fn repost(h: &dyn Harness) -> Result<()> {
    let c = Conn::new(h)?;
    let mut l = c.local(4096, 61)?;
    let (r, _) = c.remote(4096, 62)?;
    let id =
        c.a.backend
            .prepare(&c.single(Op::Write, l.mem.desc(), r.mem.desc())?)?;
    for i in 0..100u64 {
        let data = pattern(1000 + i, 4096);
        l.mem.write(0, &data)?;
        let opts = c.opts(Some(bytes::Bytes::copy_from_slice(&i.to_le_bytes())));
        // SAFETY: `l` stays registered until the transfer is released below.
        unsafe { c.a.backend.post(id, &opts)? };
        match c.wait(id) {
            Status::Done => {}
            Status::Failed(e) => return Err(e),
            s => return Err(Error::invalid_argument(format!("status {s:?}"))),
        }
        check_eq(&r.mem.read(0, 4096)?, &data, &format!("repost {i}"))?;
    }
    let got = c.drain_b(100)?;
    check(got.len() == 100, || {
        format!("{} notifications for 100 posts", got.len())
    })?;
    for (i, n) in got.iter().enumerate() {
        check(n.payload[..] == (i as u64).to_le_bytes(), || {
            format!("repost notification {i} out of order")
        })?;
    }
    c.a.backend.release(id)?;
    c.finish(vec![l, r])
}

/// Remote ranges outside the peer's registration, local ranges outside every local
/// registration, and unequal lengths are refused at prepare, before anything moves.
pub fn bounds_refused(h: &dyn Harness) -> Result<()> {
    let c = Conn::new(h)?;
    let l = c.local(8192, 51)?;
    let (r, _) = c.remote(4096, 52)?;
    let (la, ra) = (l.mem.desc().addr, r.mem.desc().addr);
    let d = |a, n| Descriptor::new(a, n, 0);
    let e =
        c.a.backend
            .prepare(&c.single(Op::Write, d(la, 4097), d(ra, 4097))?);
    check(matches!(e, Err(Error::OutOfBounds(_))), || {
        format!("remote range past the end gave {e:?}, want OutOfBounds")
    })?;
    let before = c.single(Op::Read, d(la, 16), d(ra - 16, 16))?;
    check(c.a.backend.prepare(&before).is_err(), || {
        "remote range before the registration was accepted".into()
    })?;
    let unregistered_local = c.single(Op::Write, d(la + 8192, 16), d(ra, 16))?;
    check(c.a.backend.prepare(&unregistered_local).is_err(), || {
        "unregistered local range was accepted".into()
    })?;
    let unequal = c.single(Op::Write, d(la, 16), d(ra, 32))?;
    check(
        matches!(
            c.a.backend.prepare(&unequal),
            Err(Error::InvalidArgument(_))
        ),
        || "unequal lengths were accepted".into(),
    )?;
    check_eq(
        &r.mem.read(0, 4096)?,
        &pattern(52, 4096),
        "target after refusals",
    )?;
    c.finish(vec![l, r])
}

/// The target re-checks what the importer claims: B registers the first half of a
/// buffer, A imports the whole buffer under that key and WRITEs into the second half;
/// A imports with a forged key (random bytes) and with another registration's key. All
/// are refused (at import, prepare, post or in the status) and no byte outside the
/// key's registration moves.
pub fn bounds_forged(h: &dyn Harness) -> Result<()> {
    let c = Conn::new(h)?;
    let l = c.local(4096, 111)?;
    // B's buffer: 8 KiB, only the first half registered.
    let mut half = Conn::mem_with(&c.b, 8192, 112, Access::ReadWrite, |d| {
        Descriptor::new(d.addr, 4096, d.device)
    })?;
    half.on_b = true;
    let mut other = Conn::mem(&c.b, 4096, 113)?;
    other.on_b = true;
    let attempt = |key: &[u8], import: Descriptor, target: Descriptor| -> Status {
        let r =
            c.a.backend
                .import_remote(c.peer, MemKind::Dram, &import, key)
                .and_then(|rid| {
                    let r = c.run(&c.single(Op::Write, l.mem.desc(), target)?, None);
                    let _ = c.a.backend.release_remote(rid);
                    r
                });
        match r {
            Ok(()) => Status::Done,
            Err(e) => Status::Failed(e),
        }
    };
    let unchanged = |what: &str| -> Result<()> {
        check_eq(&half.mem.read(0, 8192)?, &pattern(112, 8192), what)?;
        check_eq(&other.mem.read(0, 4096)?, &pattern(113, 4096), what)
    };
    let key = c.b.backend.remote_key(half.reg)?;
    let st = attempt(&key, half.mem.desc(), half.at(4096, 4096));
    check(!matches!(st, Status::Done), || {
        "a WRITE past the registration (imported larger than registered) succeeded".into()
    })?;
    unchanged("B's memory after a WRITE past the registration")?;
    if !key.is_empty() {
        let mut forged = vec![0u8; key.len()];
        fill_random(&mut forged)?;
        let st = attempt(&forged, half.at(0, 4096), half.at(0, 4096));
        check(!matches!(st, Status::Done), || {
            "a WRITE under a forged (random) key succeeded".into()
        })?;
        unchanged("B's memory after a WRITE under a forged key")?;
    }
    let other_key = c.b.backend.remote_key(other.reg)?;
    if other_key != key {
        let st = attempt(&other_key, half.at(0, 4096), half.at(0, 4096));
        check(!matches!(st, Status::Done), || {
            "a WRITE into one registration under another registration's key succeeded".into()
        })?;
        unchanged("B's memory after a WRITE under another registration's key")?;
    }
    c.finish(vec![l, half, other])
}

/// A read-only registration on B: a READ of it is byte-exact, a WRITE into it is refused
/// and moves nothing; a read-only registration on A is never a READ's destination.
/// Runs when `capabilities().read_only`.
pub fn read_only(h: &dyn Harness) -> Result<()> {
    let c = Conn::new(h)?;
    if !c.b.backend.capabilities().read_only {
        return Ok(());
    }
    let l = c.local(4096, 121)?;
    let mut r = Conn::mem_with(&c.b, 4096, 122, Access::ReadOnly, |d| d)?;
    r.on_b = true;
    c.import(&r, r.mem.desc())?;
    c.run(&c.single(Op::Read, l.mem.desc(), r.mem.desc())?, None)?;
    check_eq(
        &l.mem.read(0, 4096)?,
        &pattern(122, 4096),
        "READ of a read-only registration",
    )?;
    let w = c.local(4096, 123)?;
    let res = c.run(&c.single(Op::Write, w.mem.desc(), r.mem.desc())?, None);
    check(res.is_err(), || {
        "a WRITE into a read-only registration succeeded".into()
    })?;
    check_eq(
        &r.mem.read(0, 4096)?,
        &pattern(122, 4096),
        "read-only registration after a refused WRITE",
    )?;
    let ro = Conn::mem_with(&c.a, 4096, 124, Access::ReadOnly, |d| d)?;
    let res = c.run(&c.single(Op::Read, ro.mem.desc(), r.mem.desc())?, None);
    check(res.is_err(), || {
        "a READ into a read-only local registration succeeded".into()
    })?;
    check_eq(
        &ro.mem.read(0, 4096)?,
        &pattern(124, 4096),
        "read-only local memory after a refused READ",
    )?;
    c.finish(vec![l, r, w, ro])
}
