//! The worker's in-process tests with forged messages sent from a real UCX endpoint:
//! operations naming what they should not, unauthenticated and replayed operations,
//! and notifications a peer uses to make us hold too much or overflow a counter.

use std::ffi::c_void;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use kv_core::auth::ClusterSecret;
use kv_core::{
    Access, Descriptor, DescriptorList, Error, MemKind, Op, PostOptions, Status, TransferRequest,
};

use super::Core;
use crate::am::AM_NOTE_ID;
use crate::config::Options;
use crate::ffi;
use crate::request::Group;
use crate::serve::AM_OP_ID;
use crate::shared::Counters;
use crate::wire::{NoteHeader, OpEntry, OpHeader, OpKind};

const LO: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

impl Core {
    /// Test hook: rewrites what an import says about the peer's registration.
    fn tamper_remote(&self, rid: u64, key_id: u128, key_base: u64) {
        let mut st = self.state.lock();
        if let Some(r) = st.mem.remotes.get_mut(&rid) {
            r.key_id = key_id;
            r.key_base = key_base;
        }
        // Prepared transfers keep what they need of their imports: forge it there too.
        for t in st.transfers.by_id.values_mut() {
            for (id, imp) in t.remote_ids.iter().zip(t.imports.iter_mut()) {
                if *id == rid {
                    imp.key_id = key_id;
                    imp.key_base = key_base;
                }
            }
        }
    }

    /// Test hook: the import's key id and base.
    fn remote_key_of(&self, rid: u64) -> Option<(u128, u64)> {
        let st = self.state.lock();
        st.mem.remotes.get(&rid).map(|r| (r.key_id, r.key_base))
    }

    /// Test hook: sends active message `id` with `header` and `data` on endpoint
    /// `ep_id` (eager unless `rndv`), bypassing everything. The returned group keeps
    /// the header; `data` must outlive it and the send (drive both until `done()`).
    fn send_raw(&self, ep_id: u64, id: u32, header: &[u8], data: &[u8], rndv: bool) -> Group {
        let lib = &self.lib;
        let st = self.state.lock();
        let mut g = Group::new(lib);
        let Some(uep) = st.eps.get(&ep_id).map(|e| e.ep) else {
            return g;
        };
        let hp = g.keep(header.to_vec());
        let flags = ffi::UCP_AM_SEND_FLAG_REPLY
            | if rndv {
                ffi::UCP_AM_SEND_FLAG_RNDV
            } else {
                ffi::UCP_AM_SEND_FLAG_EAGER
            };
        // SAFETY: live endpoint; the group keeps the header, the caller the data.
        let _ = g.issue(flags, |p| unsafe {
            (lib.am_send_nbx)(
                uep,
                id,
                hp as *const c_void,
                header.len(),
                data.as_ptr() as *const c_void,
                data.len(),
                p,
            )
        });
        g
    }

    /// Test hook: the session id and next sequence number endpoint `ep_id` uses.
    fn session_of(&self, ep_id: u64) -> Option<(u64, u64)> {
        let s = self.shared.lock();
        match s.clients.get(&ep_id)? {
            crate::session::Client::Ready { session, .. } => Some((*session, 0)),
            _ => None,
        }
    }

    fn counters(&self) -> Counters {
        self.shared.counters()
    }
}

/// Two tcp cores (`secret` on both when given), `b`'s 512 KiB of 0x11 registered, `a`
/// connected to `b` with the whole registration imported.
struct Pair {
    a: Core,
    b: Core,
    ep: u64,
    rid: u64,
    src: Vec<u8>,
    dst: kv_mem::HostBuffer,
    rs: u64,
    rd: u64,
}

const LEN: usize = 512 << 10;

fn pair(secret: Option<ClusterSecret>, opts: Options) -> Option<Pair> {
    let a = kv_core::require_or_skip("ucx", Core::new("a", secret.clone(), LO, opts.clone()))?;
    let b = Core::new("b", secret, LO, opts).unwrap();
    let src: Vec<u8> = (0..LEN).map(|i| (i * 7 + 3) as u8).collect();
    // The target's memory is written by UCX behind Rust's back: a HostBuffer, read
    // through fresh borrows only.
    let mut dst = kv_mem::HostBuffer::alloc(LEN, 4096).unwrap();
    dst.as_mut_slice().fill(0x11);
    let sd = Descriptor::new(src.as_ptr() as usize as u64, LEN as u64, 0);
    let rs = a.register(MemKind::Dram, &sd, Access::ReadWrite).unwrap();
    let rd = b
        .register(MemKind::Dram, &dst.descriptor(), Access::ReadWrite)
        .unwrap();
    let ep = a.connect("b", &b.info).unwrap();
    let rid = a
        .import_remote(
            ep,
            MemKind::Dram,
            &dst.descriptor(),
            &b.remote_key(rd).unwrap(),
        )
        .unwrap();
    Some(Pair {
        a,
        b,
        ep,
        rid,
        src,
        dst,
        rs,
        rd,
    })
}

impl Pair {
    fn write(&self) -> u64 {
        let sd = Descriptor::new(self.src.as_ptr() as usize as u64, LEN as u64, 0);
        self.a
            .prepare(&TransferRequest {
                op: Op::Write,
                local_kind: MemKind::Dram,
                local: DescriptorList::single(sd).unwrap(),
                peer: kv_core::EndpointId(self.ep),
                remote_kind: MemKind::Dram,
                remote: DescriptorList::single(self.dst.descriptor()).unwrap(),
            })
            .unwrap()
    }

    /// Posts `t` and drives both until it finished (10 s at most).
    fn run(&self, t: u64) -> Status {
        let opts = PostOptions {
            notification: None,
            deadline: Some(Instant::now() + Duration::from_secs(10)),
        };
        self.a.post(t, &opts).unwrap();
        loop {
            self.a.progress().unwrap();
            self.b.progress().unwrap();
            let st = self.a.poll(t);
            if st.is_finished() {
                return st;
            }
        }
    }

    /// Drives both until `b`'s counters satisfy `want` and `sends` completed (5 s).
    fn settle(&self, sends: &[Group], want: impl Fn(&Counters) -> bool) -> Counters {
        let end = Instant::now() + Duration::from_secs(5);
        while !(want(&self.b.counters()) && sends.iter().all(Group::done)) && Instant::now() < end {
            self.b.progress().unwrap();
            self.a.progress().unwrap();
        }
        assert!(
            sends.iter().all(Group::done),
            "forged sends did not complete"
        );
        self.b.counters()
    }

    fn untouched(&self, what: &str) {
        assert!(
            self.dst.as_slice().iter().all(|&x| x == 0x11),
            "target memory written by {what}"
        );
    }

    fn op(&self, kind: OpKind, key_id: u128, offset: u64, len: u64) -> Vec<u8> {
        OpHeader {
            kind,
            rndv_reply: false,
            instance: self.a.instance,
            op: 1 << 40,
            session: 0,
            seq: 0,
            entries: vec![OpEntry {
                key_id,
                offset,
                len,
                local: 0,
            }],
            src: None,
        }
        .encode()
    }

    fn finish(self, t: u64) {
        self.a.release(t).unwrap();
        self.a.release_remote(self.rid).unwrap();
        self.a.deregister(self.rs).unwrap();
        self.b.deregister(self.rd).unwrap();
    }
}

/// Operations whose header names an unknown registration, a range outside it, an
/// overflowing offset, a zero length, or a length that differs from the data are
/// refused (the initiator gets `NotRegistered` / `OutOfBounds`), a header that does not
/// parse is dropped, and the target's memory is untouched by all of them; a genuine
/// WRITE then lands.
#[test]
fn forged_operations_are_refused() {
    let opts = Options {
        tls: Some("tcp".into()),
        ..Default::default()
    };
    let Some(p) = pair(None, opts) else {
        return;
    };
    let (key_id, key_base) = p.a.remote_key_of(p.rid).unwrap();
    let t = p.write();
    p.a.tamper_remote(p.rid, key_id ^ 1, key_base);
    let st = p.run(t);
    assert!(
        matches!(st, Status::Failed(Error::NotRegistered(_))),
        "{st:?}"
    );
    p.untouched("a WRITE naming an unknown key");
    p.a.tamper_remote(p.rid, key_id, key_base - LEN as u64 / 2);
    let st = p.run(t);
    assert!(
        matches!(st, Status::Failed(Error::OutOfBounds(_))),
        "{st:?}"
    );
    p.untouched("a WRITE past the registration's end");
    let mut sends = Vec::new();
    for (offset, len, data, rndv) in [
        (u64::MAX - 10, 64, 64, false),
        (0, 0, 0, false),
        (0, LEN as u64, LEN / 2, true),
        (0, 16, 32, false),
        (0, 16, 16, true), // rendezvous data for a READ
    ] {
        let kind = if rndv && len == 16 {
            OpKind::Read
        } else {
            OpKind::Write
        };
        let h = p.op(kind, key_id, offset, len);
        sends.push(p.a.send_raw(p.ep, AM_OP_ID, &h, &p.src[..data], rndv));
    }
    sends.push(p.a.send_raw(p.ep, AM_OP_ID, &[0x4b; 17], &p.src[..64], false));
    let n = p.settle(&sends, |n| n.refused == 7 && n.malformed == 1);
    drop(sends);
    assert_eq!((n.accepted, n.refused, n.malformed), (0, 7, 1), "{n:?}");
    p.untouched("forged headers");
    p.a.tamper_remote(p.rid, key_id, key_base);
    let st = p.run(t);
    assert!(matches!(st, Status::Done), "{st:?}");
    assert!(p.dst.as_slice() == &p.src[..], "the genuine WRITE");
    assert_eq!(p.b.counters().accepted, 1);
    p.finish(t);
}

/// With a cluster secret, an operation that claims no session is refused, one under
/// a real session id with a wrong tag is dropped, and a replayed genuine header
/// (same session, sequence number and tag) is dropped: none moves a byte.
#[test]
fn unauthenticated_and_replayed_operations_move_nothing() {
    let opts = Options {
        tls: Some("tcp".into()),
        ..Default::default()
    };
    let Some(p) = pair(Some(ClusterSecret::generate().unwrap()), opts) else {
        return;
    };
    let (key_id, _) = p.a.remote_key_of(p.rid).unwrap();
    // A genuine small READ authenticates the endpoint (and is served).
    let mut back = vec![0u8; 64];
    let bd = Descriptor::new(back.as_mut_ptr() as usize as u64, 64, 0);
    let rb = p.a.register(MemKind::Dram, &bd, Access::ReadWrite).unwrap();
    let r =
        p.a.prepare(&TransferRequest {
            op: Op::Read,
            local_kind: MemKind::Dram,
            local: DescriptorList::single(bd).unwrap(),
            peer: kv_core::EndpointId(p.ep),
            remote_kind: MemKind::Dram,
            remote: DescriptorList::single(Descriptor::new(p.dst.descriptor().addr, 64, 0))
                .unwrap(),
        })
        .unwrap();
    assert!(matches!(p.run(r), Status::Done));
    let (session, _) = p.a.session_of(p.ep).expect("authenticated");
    let mut sends = Vec::new();
    // No session.
    let h = p.op(OpKind::Write, key_id, 0, 64);
    sends.push(p.a.send_raw(p.ep, AM_OP_ID, &h, &p.src[..64], false));
    // The real session, a made-up tag.
    let mut forged = OpHeader::decode(&h).unwrap();
    forged.session = session;
    forged.seq = 1000;
    let mut fb = forged.encode();
    let n = fb.len();
    fb[n - 16..].copy_from_slice(&[0xa5; 16]);
    sends.push(p.a.send_raw(p.ep, AM_OP_ID, &fb, &p.src[..64], false));
    // A genuine header, sealed by the session, sent twice: the second is a replay.
    let base = OpHeader::decode(&p.op(OpKind::Write, key_id, 0, 64)).unwrap();
    let sealed =
        p.a.shared
            .seal_for(p.ep, &[], |session, seq| {
                Ok(OpHeader {
                    session,
                    seq,
                    ..base.clone()
                }
                .encode())
            })
            .unwrap();
    sends.push(p.a.send_raw(p.ep, AM_OP_ID, &sealed, &p.src[..64], false));
    let c = p.settle(&sends, |n| n.accepted == 2);
    assert_eq!(c.accepted, 2, "the sealed header is served once: {c:?}");
    // The genuine one landed: put the canary back, then replay it.
    // SAFETY: no transfer names `dst` now; nothing else writes it.
    p.dst_fill(0x11);
    let replay = vec![p.a.send_raw(p.ep, AM_OP_ID, &sealed, &p.src[..64], false)];
    let c = p.settle(&replay, |n| n.malformed >= 2);
    drop((sends, replay));
    assert_eq!(
        (c.accepted, c.refused, c.malformed),
        (2, 1, 2),
        "(served, refused, dropped): {c:?}"
    );
    p.untouched("unauthenticated, forged and replayed operations");
    p.a.release(r).unwrap();
    p.a.deregister(rb).unwrap();
    let t = p.write();
    p.finish(t);
}

/// Notifications a peer forges to make us hold too much or overflow (issue 14 item 7):
/// one larger than `max_notification` is dropped; a gap that never fills, ending at
/// number `u64::MAX`, is given up after `MAX_HELD` held notifications and delivered
/// without any arithmetic overflow inside the callback (the old `seq + 1` aborted the
/// process); beyond `max_inbox` waiting notifications the rest are dropped.
#[test]
fn notifications_from_a_peer_are_bounded() {
    let held = crate::shared::MAX_HELD as u64;
    let opts = Options {
        tls: Some("tcp".into()),
        max_notification: 1024,
        max_inbox: held as usize + 104,
        ..Default::default()
    };
    let Some(p) = pair(None, opts) else {
        return;
    };
    let note = |number: u64, endpoint: u64| {
        NoteHeader {
            instance: 77,
            endpoint,
            number,
            session: 0,
            seq: 0,
            name: "forger".into(),
        }
        .encode()
        .unwrap()
    };
    let big = vec![7u8; 4096];
    let mut sends = vec![p.a.send_raw(p.ep, AM_NOTE_ID, &note(0, 1), &big, false)];
    for i in 0..=held {
        sends.push(p.a.send_raw(p.ep, AM_NOTE_ID, &note(u64::MAX - i, 2), b"x", false));
    }
    for i in 0..200 {
        sends.push(p.a.send_raw(p.ep, AM_NOTE_ID, &note(i, 3), b"y", false));
    }
    let c = p.settle(&sends, |n| n.dropped_notes >= 98);
    drop(sends);
    let mut out = Vec::new();
    p.b.drain_notifications(&mut out).unwrap();
    assert_eq!(c.dropped_notes, 98, "{c:?}");
    assert_eq!(out.len(), held as usize + 104);
    assert!(out
        .iter()
        .all(|n| n.payload.len() == 1 && n.peer == "forger"));
    let t = p.write();
    assert!(matches!(p.run(t), Status::Done), "the backend still works");
    p.finish(t);
}

impl Pair {
    fn dst_fill(&self, b: u8) {
        let d = self.dst.descriptor();
        // SAFETY: `dst` is alive; no transfer or peer operation runs (both sides are
        // driven only by this thread, which is here).
        unsafe { std::ptr::write_bytes(d.addr as usize as *mut u8, b, d.len as usize) };
    }
}

impl Core {
    /// Test hook: allocates `len` bytes with `alloc_host`, fills them with `fill`, and
    /// returns the allocation's id and what a mapped operation names of it.
    fn mappable(&self, len: usize, fill: u8) -> (u64, crate::wire::MapSrc) {
        let (id, d) = crate::memory::HostAllocator::alloc_host(self, len).unwrap();
        // SAFETY: just allocated, not registered: nothing else touches it.
        unsafe { std::ptr::write_bytes(d.addr as usize as *mut u8, fill, len) };
        let st = self.state.lock();
        let src = st.mem.allocs.get(&id).and_then(|a| a.map.clone());
        (id, src.expect("UCX packs a key for alloc_host memory"))
    }
}

/// A mapped WRITE of one entry `local..local + len` of `src` into offset 0 of `key_id`.
fn mapped_write(
    p: &Pair,
    key_id: u128,
    src: &crate::wire::MapSrc,
    local: u64,
    len: u64,
) -> Vec<u8> {
    OpHeader {
        kind: OpKind::Write,
        rndv_reply: false,
        instance: p.a.instance,
        op: 1 << 41,
        session: 0,
        seq: 0,
        entries: vec![OpEntry {
            key_id,
            offset: 0,
            len,
            local,
        }],
        src: Some(src.clone()),
    }
    .encode()
}

/// Mapped operations over shared memory: a piece outside the memory the peer names, or
/// memory the peer claims larger than it is, moves nothing; a good one is one copy.
#[test]
fn mapped_operations_are_checked_against_the_mapping() {
    let opts = Options {
        tls: Some("posix,cma,self".into()),
        ..Default::default()
    };
    let Some(p) = pair(None, opts) else {
        return;
    };
    let (key_id, _) = p.a.remote_key_of(p.rid).unwrap();
    let (_, src) = p.a.mappable(64 << 10, 0x5a);
    let mut sends = Vec::new();
    // Ends 10 bytes past the allocation.
    let h = mapped_write(&p, key_id, &src, src.base + src.len - 54, 64);
    sends.push(p.a.send_raw(p.ep, AM_OP_ID, &h, &[], false));
    // Claims 1 TiB where 64 KiB are mapped.
    let huge = crate::wire::MapSrc {
        len: 1 << 40,
        ..src.clone()
    };
    let h = mapped_write(&p, key_id, &huge, src.base, 64);
    sends.push(p.a.send_raw(p.ep, AM_OP_ID, &h, &[], false));
    let c = p.settle(&sends, |n| n.accepted == 2);
    drop(sends); // their requests go before the worker does
    assert_eq!((c.accepted, c.mapped), (2, 0), "{c:?}");
    p.untouched("mapped operations outside the peer's memory");
    // The same allocation, truthfully: 64 bytes land.
    let h = mapped_write(&p, key_id, &src, src.base + 100, 64);
    let sends = vec![p.a.send_raw(p.ep, AM_OP_ID, &h, &[], false)];
    let c = p.settle(&sends, |n| n.mapped == 1);
    drop(sends);
    assert_eq!(c.mapped, 1, "{c:?}");
    let got = p.dst.as_slice();
    assert!(got[..64].iter().all(|&x| x == 0x5a) && got[64..].iter().all(|&x| x == 0x11));
    // A WRITE from heap memory still sends its data in messages.
    p.dst_fill(0x11);
    let t = p.write();
    assert!(matches!(p.run(t), Status::Done));
    assert_eq!(p.b.counters().mapped, 1);
    assert_eq!(p.dst.as_slice(), &p.src[..]);
    p.finish(t);
}

/// A peer that reaches us over TCP cannot make us map memory: its mapped operation is
/// answered `Unmapped` and moves nothing (UCX never sees its key).
#[test]
fn mapped_operations_over_tcp_are_refused() {
    let opts = Options {
        tls: Some("tcp".into()),
        ..Default::default()
    };
    let Some(p) = pair(None, opts) else {
        return;
    };
    let (key_id, _) = p.a.remote_key_of(p.rid).unwrap();
    let src = crate::wire::MapSrc {
        id: 1,
        base: p.src.as_ptr() as usize as u64,
        len: LEN as u64,
        rkey: bytes::Bytes::from_static(&[0xff; 64]),
    };
    let h = mapped_write(&p, key_id, &src, src.base, 64);
    let sends = vec![p.a.send_raw(p.ep, AM_OP_ID, &h, &[], false)];
    let c = p.settle(&sends, |n| n.accepted == 1);
    drop(sends);
    assert_eq!((c.accepted, c.mapped), (1, 0), "{c:?}");
    p.untouched("a mapped operation over TCP");
    assert_eq!(p.b.shared.maps.lock().len(), 0);
}

impl Core {
    /// Test hook: makes the core treat endpoint `ep` as reached over shared memory.
    fn force_on_host(&self, ep: u64) {
        if let Some(e) = self.state.lock().eps.get_mut(&ep) {
            e.on_host = true;
        }
    }
}

/// The initiator's fallback: a target that will not map our memory (here: it receives
/// the operation over TCP) answers `Unmapped`; that post fails saying so and moves
/// nothing, and the endpoint's later posts send their data in messages.
#[test]
fn an_unmapped_answer_turns_mapped_operations_off_for_the_endpoint() {
    let opts = Options {
        tls: Some("tcp".into()),
        ..Default::default()
    };
    let Some(p) = pair(None, opts) else {
        return;
    };
    p.a.force_on_host(p.ep);
    let (_, src) = p.a.mappable(LEN, 0x77);
    let local = Descriptor::new(src.base, LEN as u64, 0);
    let rl =
        p.a.register(MemKind::Dram, &local, Access::ReadWrite)
            .unwrap();
    let t =
        p.a.prepare(&TransferRequest {
            op: Op::Write,
            local_kind: MemKind::Dram,
            local: DescriptorList::single(local).unwrap(),
            peer: kv_core::EndpointId(p.ep),
            remote_kind: MemKind::Dram,
            remote: DescriptorList::single(p.dst.descriptor()).unwrap(),
        })
        .unwrap();
    match p.run(t) {
        Status::Failed(Error::Backend { message, .. }) => {
            assert!(message.contains("could not map"), "{message}")
        }
        other => panic!("a mapped WRITE over TCP: {other:?}"),
    }
    p.untouched("a mapped operation the target would not map");
    // The same transfer again: its data now travels in messages.
    assert!(matches!(p.run(t), Status::Done));
    assert!(p.dst.as_slice().iter().all(|&x| x == 0x77));
    assert_eq!(p.b.counters().mapped, 0);
    p.a.release(t).unwrap();
    p.a.deregister(rl).unwrap();
    let w = p.write();
    p.finish(w);
}
