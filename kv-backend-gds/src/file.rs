//! Files and block devices: opening with `O_DIRECT`, probing alignment, owning a dup.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use kv_core::{Error, Result};

/// Opens `path` for reading and writing with `O_DIRECT`, creating it when `create`.
///
/// When the file system refuses `O_DIRECT` (`EINVAL`, as older tmpfs and some FUSE file
/// systems do) the file is opened buffered instead and the reason is logged. Returns the
/// file and whether it is in `O_DIRECT` mode.
pub fn open_direct(path: impl AsRef<Path>, create: bool) -> Result<(File, bool)> {
    let path = path.as_ref();
    let open = |direct: bool| {
        let mut o = OpenOptions::new();
        o.read(true).write(true).create(create);
        if direct {
            o.custom_flags(libc::O_DIRECT);
        }
        o.open(path)
    };
    match open(true) {
        Ok(f) => Ok((f, true)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            tracing::info!(
                path = %path.display(),
                "O_DIRECT refused by the file system ({e}); using buffered I/O (page cache) instead"
            );
            let f = open(false)
                .map_err(|e| Error::io(format!("opening {} (buffered)", path.display()), e))?;
            Ok((f, false))
        }
        Err(e) => Err(Error::io(format!("opening {}", path.display()), e)),
    }
}

/// What the backend knows about a registered file descriptor.
#[derive(Debug)]
pub(crate) struct FileInfo {
    /// Our own duplicate of the caller's fd: closing theirs cannot make us write into
    /// another file that reuses the number.
    pub fd: OwnedFd,
    /// The open file description has `O_DIRECT`.
    pub direct: bool,
    /// Offsets, lengths and memory addresses must be multiples of this (1 when buffered).
    pub align: u64,
    /// A block device rather than a regular file.
    pub block: bool,
}

/// Duplicates `fd` and probes its mode and alignment.
pub(crate) fn probe(fd: RawFd) -> Result<FileInfo> {
    if fd < 0 {
        return Err(Error::invalid_argument(format!(
            "file descriptor {fd} is negative"
        )));
    }
    // SAFETY: F_DUPFD_CLOEXEC on any integer is memory-safe; a bad fd gives EBADF.
    let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if dup < 0 {
        return Err(Error::io(
            format!("duplicating file descriptor {fd} (is it open?)"),
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: `dup` is a fresh descriptor we own.
    let owned = unsafe { OwnedFd::from_raw_fd(dup) };
    // SAFETY: F_GETFL on our own open descriptor.
    let flags = unsafe { libc::fcntl(dup, libc::F_GETFL) };
    if flags < 0 {
        return Err(Error::io(
            format!("reading flags of fd {fd}"),
            std::io::Error::last_os_error(),
        ));
    }
    if flags & libc::O_ACCMODE == libc::O_RDONLY || flags & libc::O_ACCMODE == libc::O_WRONLY {
        tracing::debug!(
            fd,
            "file is open for one direction only; the other fails with EBADF"
        );
    }
    let direct = flags & libc::O_DIRECT != 0;
    // Borrow as a File to read the metadata, without closing it.
    let file = std::mem::ManuallyDrop::new(
        // SAFETY: `dup` stays owned by `owned`; ManuallyDrop keeps File from closing it.
        unsafe { File::from_raw_fd(dup) },
    );
    let meta = file
        .metadata()
        .map_err(|e| Error::io(format!("fstat of fd {fd}"), e))?;
    let block = meta.file_type().is_block_device();
    if !(meta.file_type().is_file() || block) {
        return Err(Error::invalid_argument(format!(
            "fd {fd} is neither a regular file nor a block device"
        )));
    }
    let align = if direct { dio_align(dup, block) } else { 1 };
    Ok(FileInfo {
        fd: owned,
        direct,
        align,
        block,
    })
}

/// The `O_DIRECT` alignment of an open file: `statx(STATX_DIOALIGN)` (Linux 6.1+), the
/// logical block size of a block device, else a conservative 4096.
fn dio_align(fd: RawFd, block: bool) -> u64 {
    // SAFETY: zeroed statx is a valid out-parameter.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: empty path with AT_EMPTY_PATH stats `fd` itself; `stx` is writable.
    let rc = unsafe {
        libc::statx(
            fd,
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    let mut align = 0u64;
    if rc == 0 && stx.stx_mask & libc::STATX_DIOALIGN != 0 {
        align = u64::from(stx.stx_dio_offset_align.max(stx.stx_dio_mem_align));
    }
    if align == 0 && block {
        let mut ssz: libc::c_int = 0;
        // SAFETY: BLKSSZGET writes one int.
        if unsafe { libc::ioctl(fd, libc::BLKSSZGET, &mut ssz) } == 0 && ssz > 0 {
            align = ssz as u64;
        }
    }
    if align == 0 || !align.is_power_of_two() {
        align = 4096;
    }
    align
}

/// `_IOR(0x12, 114, u64)`: libc does not export it; the value is the same on every
/// 64-bit Linux architecture with the generic ioctl layout (x86_64, aarch64, riscv64).
const BLKGETSIZE64: libc::Ioctl = 0x8008_1272;

/// Current size of an open file (block devices: their capacity).
pub(crate) fn size_of(fd: RawFd) -> std::io::Result<u64> {
    // SAFETY: zeroed stat is a valid out-parameter.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes into `st`.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if st.st_mode & libc::S_IFMT == libc::S_IFBLK {
        let mut bytes: u64 = 0;
        // SAFETY: BLKGETSIZE64 writes one u64.
        if unsafe { libc::ioctl(fd, BLKGETSIZE64, &mut bytes) } == 0 {
            return Ok(bytes);
        }
        return Err(std::io::Error::last_os_error());
    }
    Ok(st.st_size as u64)
}

/// True when `pos` is at or past the end of the file open as `fd` (a short read there
/// is the end of the file, not a partial read to resubmit).
pub(crate) fn at_eof(fd: RawFd, pos: u64) -> bool {
    size_of(fd).is_ok_and(|size| pos >= size)
}

/// Whether `fd`'s file is in `O_DIRECT` mode (for users who opened it themselves).
pub fn is_direct(file: &File) -> bool {
    // SAFETY: F_GETFL on an open descriptor borrowed from `file`.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    flags >= 0 && flags & libc::O_DIRECT != 0
}
