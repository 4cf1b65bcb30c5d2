//! The worker's in-process tests: forged headers of WRITEs sent as active messages,
//! and the hooks they use to forge them.

use std::ffi::c_void;
use std::time::{Duration, Instant};

use kv_core::{
    Descriptor, DescriptorList, Error, MemKind, Op, PostOptions, Status, TransferRequest,
};

use super::Core;
use crate::config::Options;
use crate::ffi;
use crate::request::Group;
use crate::wire::WriteHeader;

impl Core {
    /// Test hook: rewrites what an import says about the peer's registration (to forge
    /// the headers of WRITEs sent as active messages).
    fn tamper_remote(&self, rid: u64, key_id: u64, key_base: u64) {
        let mut st = self.state.lock();
        if let Some(r) = st.mem.remotes.get_mut(&rid) {
            r.key_id = key_id;
            r.key_base = key_base;
        }
    }

    /// Test hook: the import's key id and base.
    fn remote_key_of(&self, rid: u64) -> Option<(u64, u64)> {
        let st = self.state.lock();
        st.mem.remotes.get(&rid).map(|r| (r.key_id, r.key_base))
    }

    /// Test hook: sends `header` as the header of a WRITE active message with `data`
    /// (eager unless `rndv`). The returned group keeps the header; `data` must outlive
    /// it and the send (drive both workers until `done()`).
    fn send_raw_write(&self, ep_id: u64, header: &[u8], data: &[u8], rndv: bool) -> Group {
        let lib = &self.lib;
        let st = self.state.lock();
        let mut g = Group::new(lib);
        let Some(uep) = st.eps.get(&ep_id).map(|e| e.ep) else {
            return g;
        };
        let hp = g.keep(header.to_vec().into_boxed_slice());
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
                crate::am::AM_WRITE_ID,
                hp as *const c_void,
                header.len(),
                data.as_ptr() as *const c_void,
                data.len(),
                p,
            )
        });
        g
    }

    /// Test hook: (accepted, refused, malformed) counters of the WRITE handler.
    fn write_counters(&self) -> (u64, u64, u64) {
        let n = self.shared.counters();
        (n.accepted, n.refused, n.malformed)
    }
}

/// Drives `a` and `b` until transfer `t` of `a` finished (10 s at most).
fn run(a: &Core, b: &Core, t: u64) -> Status {
    let opts = PostOptions {
        notification: None,
        deadline: Some(Instant::now() + Duration::from_secs(10)),
    };
    a.post(t, &opts).unwrap();
    loop {
        a.progress().unwrap();
        b.progress().unwrap();
        let st = a.poll(t);
        if st.is_finished() {
            return st;
        }
    }
}

/// WRITEs sent as active messages whose header names an unknown registration, a
/// range outside it, or a length that differs from the data are refused (the
/// initiator gets `NotRegistered` / `OutOfBounds`), a header that does not parse is
/// dropped, and the target's memory is untouched by all of them; a genuine WRITE
/// then lands.
#[test]
fn forged_write_headers_are_refused() {
    const LEN: usize = 512 << 10;
    let opts = Options {
        tls: Some("tcp".into()),
        ..Default::default()
    };
    let Some(a) = kv_core::require_or_skip("ucx", Core::new("a", opts.clone())) else {
        return;
    };
    let b = Core::new("b", opts).unwrap();
    let src: Vec<u8> = (0..LEN).map(|i| (i * 7 + 3) as u8).collect();
    // The target's memory is written by UCX behind Rust's back: a HostBuffer, read
    // through fresh borrows only.
    let mut dst = kv_mem::HostBuffer::alloc(LEN, 4096).unwrap();
    dst.as_mut_slice().fill(0x11);
    let sd = Descriptor::new(src.as_ptr() as usize as u64, LEN as u64, 0);
    let dd = dst.descriptor();
    let rs = a.register(MemKind::Dram, &sd).unwrap();
    let rd = b.register(MemKind::Dram, &dd).unwrap();
    let ep = a.connect("b", &b.info).unwrap();
    assert!(
        a.describe().contains("go as active messages"),
        "{}",
        a.describe()
    );
    let rid = a
        .import_remote(ep, MemKind::Dram, &dd, &b.remote_key(rd).unwrap())
        .unwrap();
    let (key_id, key_base) = a.remote_key_of(rid).unwrap();
    let t = a
        .prepare(&TransferRequest {
            op: Op::Write,
            local_kind: MemKind::Dram,
            local: DescriptorList::single(sd).unwrap(),
            peer: kv_core::EndpointId(ep),
            remote_kind: MemKind::Dram,
            remote: DescriptorList::single(dd).unwrap(),
        })
        .unwrap();
    let untouched = |dst: &kv_mem::HostBuffer, what: &str| {
        assert!(
            dst.as_slice().iter().all(|&x| x == 0x11),
            "target memory written by {what}"
        );
    };
    a.tamper_remote(rid, key_id ^ 1, key_base);
    let st = run(&a, &b, t);
    assert!(
        matches!(st, Status::Failed(Error::NotRegistered(_))),
        "{st:?}"
    );
    untouched(&dst, "a WRITE naming an unknown key");
    a.tamper_remote(rid, key_id, key_base - LEN as u64 / 2);
    let st = run(&a, &b, t);
    assert!(
        matches!(st, Status::Failed(Error::OutOfBounds(_))),
        "{st:?}"
    );
    untouched(&dst, "a WRITE past the registration's end");
    // Offsets that overflow, a zero length, and a length that is not the data's.
    let mut sends = Vec::new();
    for (offset, len, data, rndv) in [
        (u64::MAX - 10, 64, 64, false),
        (0, 0, 0, false),
        (0, LEN as u64, LEN / 2, true),
        (0, 16, 32, false),
    ] {
        let h = WriteHeader {
            instance: a.instance,
            seq: 1 << 40,
            key_id,
            offset,
            len,
        }
        .encode();
        sends.push(a.send_raw_write(ep, &h, &src[..data], rndv));
    }
    let garbage = [0x4bu8; 17];
    sends.push(a.send_raw_write(ep, &garbage, &src[..64], false));
    let end = Instant::now() + Duration::from_secs(5);
    while (b.write_counters() != (0, 6, 1) || !sends.iter().all(Group::done))
        && Instant::now() < end
    {
        b.progress().unwrap();
        a.progress().unwrap();
    }
    assert!(
        sends.iter().all(Group::done),
        "forged sends did not complete"
    );
    drop(sends);
    assert_eq!(
        b.write_counters(),
        (0, 6, 1),
        "(accepted, refused, malformed)"
    );
    untouched(&dst, "forged headers");
    a.tamper_remote(rid, key_id, key_base);
    let st = run(&a, &b, t);
    assert!(matches!(st, Status::Done), "{st:?}");
    assert!(dst.as_slice() == &src[..], "the genuine WRITE");
    assert_eq!(b.write_counters().0, 1);
    a.release(t).unwrap();
    a.release_remote(rid).unwrap();
    a.deregister(rs).unwrap();
    b.deregister(rd).unwrap();
}
