//! A write-back stuck in the kernel (UNSAFE.md, `GdsIo::transfer`): the NVMe tier lies on
//! an ext4 image frozen with `fsfreeze`, so the O_DIRECT write of a DRAM slot blocks in
//! the kernel and the gds backend's cancel returns `Busy` after `io_timeout`. The slot
//! that write still names must then never return to the arena's allocator (the kernel
//! may write it whenever the device wakes up): it is quarantined and counted.
//!
//! Needs root (mount, loop devices, FIFREEZE); elsewhere it skips and says why, and fails
//! instead when `KV_REQUIRE_BACKENDS` names `gds-stall` (as kv-backend-gds's stall
//! tests).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

use common::{block, opts, tmpdir};
use kv_core::Error;
use kv_tier::{BlockKey, PolicyKind, Store};

/// How long a step the stall must not hold may take before the test thaws and fails.
const STEP: Duration = Duration::from_secs(30);

fn run(cmd: &str, args: &[&Path]) -> kv_core::Result<()> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| Error::io(format!("running {cmd}"), e))?;
    if out.status.success() {
        return Ok(());
    }
    Err(Error::Unsupported(format!(
        "{cmd} {args:?} failed ({}): {} (needs root and loop devices)",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    )))
}

/// A loop-mounted 64 MiB ext4 file system; thawed and unmounted on drop.
struct Frozen {
    dir: PathBuf,
    mnt: PathBuf,
}

impl Frozen {
    fn new() -> kv_core::Result<Frozen> {
        let dir = tmpdir("stall");
        let (img, mnt) = (dir.join("ext4.img"), dir.join("mnt"));
        std::fs::create_dir(&mnt).map_err(|e| Error::io("mkdir", e))?;
        std::fs::File::create(&img)
            .and_then(|f| f.set_len(64 << 20))
            .map_err(|e| Error::io("creating the image", e))?;
        run("mkfs.ext4", &[Path::new("-q"), Path::new("-F"), &img])?;
        run("mount", &[Path::new("-o"), Path::new("loop"), &img, &mnt])?;
        Ok(Frozen { dir, mnt })
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = run("fsfreeze", &[Path::new("-u"), &self.mnt]);
        let _ = run("umount", &[Path::new("-l"), &self.mnt]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn a_slot_named_by_a_write_that_cannot_be_cancelled_is_quarantined() {
    let Some(fs) = kv_core::require_or_skip("gds-stall", Frozen::new()) else {
        return;
    };
    let mut o = opts(
        &fs.mnt.join("store"),
        512 << 10,
        8 << 20,
        1 << 20,
        PolicyKind::Lru,
    );
    if let Some(n) = o.nvme.as_mut() {
        n.io_timeout = Duration::from_secs(1);
    }
    let s = std::sync::Arc::new(Store::open(o).unwrap());
    // A first block on NVMe: the segment file exists before the freeze.
    s.put(BlockKey::from_u64(0), &block(0, 50_000)).unwrap();
    s.flush().unwrap();
    run("fsfreeze", &[Path::new("-f"), &fs.mnt]).unwrap();
    // Whatever happens below, the file system is thawed after 2 × STEP (a stuck kernel
    // write would otherwise keep this process alive).
    let mnt = fs.mnt.clone();
    std::thread::spawn(move || {
        std::thread::sleep(2 * STEP);
        let _ = run("fsfreeze", &[Path::new("-u"), &mnt]);
    });
    s.put(BlockKey::from_u64(1), &block(1, 50_000)).unwrap();
    // The write-back of block 1 blocks in the kernel; after io_timeout the cancel fails.
    let (tx, rx) = mpsc::channel();
    let s2 = s.clone();
    std::thread::spawn(move || {
        let _ = tx.send(s2.flush());
    });
    let flushed = rx.recv_timeout(STEP);
    let stuck = matches!(flushed, Ok(Err(Error::TimedOut { .. })));
    assert!(stuck, "flush on a frozen file system: {flushed:?}");
    assert_eq!(s.stats().dram_quarantined, 0, "nothing freed yet");
    // Thawed, the stuck write ends in the kernel, but the store cannot know when: the
    // slot it named stays out of the allocator once the block lets go of it.
    run("fsfreeze", &[Path::new("-u"), &fs.mnt]).unwrap();
    assert!(s.remove(BlockKey::from_u64(1)).unwrap());
    let st = s.stats();
    assert!(st.dram_quarantined >= 50_000, "{st:?}");
    assert!(st.dram_bytes >= st.dram_quarantined, "{st:?}");
    // The store goes on working around it.
    for i in 2..40 {
        s.put(BlockKey::from_u64(i), &block(i, 50_000)).unwrap();
    }
    s.flush().unwrap();
    assert_eq!(
        s.get(BlockKey::from_u64(39)).unwrap().map(|h| h.to_vec()),
        Some(block(39, 50_000))
    );
    drop(fs);
    drop(s);
}
