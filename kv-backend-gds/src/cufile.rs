//! The cuFile (GPUDirect Storage) path for VRAM ↔ file, through `cudarc`'s dynamically
//! loaded bindings. Every call checks first that `libcufile.so` is present (cudarc
//! panics otherwise).

use std::collections::HashMap;
use std::os::fd::RawFd;

use cudarc::cufile::sys;
use kv_core::{Descriptor, Error, Result};
use parking_lot::Mutex;

use crate::io::IoFail;
use crate::request::IoOp;

/// A cuFile handle (an opaque pointer owned by the cuFile library).
struct Handle(sys::CUfileHandle_t);
// SAFETY: cuFile handles are process-wide tokens usable from any thread (the cuFile
// API is thread-safe); we only pass them back to cuFile.
unsafe impl Send for Handle {}

/// An open cuFile driver and the file handles registered with it. `Send + Sync`.
pub(crate) struct CuFile {
    handles: Mutex<HashMap<RawFd, Handle>>,
}

fn unavailable(reason: impl Into<String>) -> Error {
    Error::BackendUnavailable {
        name: "gds".into(),
        reason: reason.into(),
    }
}

impl CuFile {
    /// Loads libcufile and opens the driver; [`Error::BackendUnavailable`] when either
    /// the library or the nvidia-fs driver / GPU is missing.
    pub fn open() -> Result<CuFile> {
        // SAFETY: only tries to dlopen the library names.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(unavailable(
                "libcuda.so not found: no NVIDIA driver on this host (cuFile needs it)",
            ));
        }
        // SAFETY: as above.
        if !unsafe { sys::is_culib_present() } {
            return Err(unavailable(
                "libcufile.so not found; install GPUDirect Storage (nvidia-gds / libcufile) for VRAM <-> file transfers",
            ));
        }
        // SAFETY: the library is present (checked above); the call takes no arguments.
        let st = unsafe { sys::cuFileDriverOpen() };
        if st.err != sys::CUfileOpError::CU_FILE_SUCCESS {
            return Err(unavailable(format!(
                "cuFileDriverOpen failed ({:?}, CUDA {:?}); is the nvidia-fs driver loaded?",
                st.err, st.cu_err
            )));
        }
        Ok(CuFile {
            handles: Mutex::new(HashMap::new()),
        })
    }

    /// `cuFileBufRegister` of a VRAM range.
    pub fn register_buffer(&self, desc: &Descriptor) -> Result<()> {
        // SAFETY: registration pins the caller's VRAM range, valid until deregistration
        // (the `register` contract).
        let st = unsafe {
            sys::cuFileBufRegister(desc.addr as *const std::ffi::c_void, desc.len as usize, 0)
        };
        if st.err != sys::CUfileOpError::CU_FILE_SUCCESS {
            return Err(Error::Backend {
                name: "cufile".into(),
                code: st.err as i64,
                message: format!(
                    "cuFileBufRegister of {:#x}+{}: {:?}",
                    desc.addr, desc.len, st.err
                ),
            });
        }
        Ok(())
    }

    /// `cuFileBufDeregister`.
    pub fn deregister_buffer(&self, desc: &Descriptor) {
        // SAFETY: the range was registered by `register_buffer`.
        let st = unsafe { sys::cuFileBufDeregister(desc.addr as *const std::ffi::c_void) };
        if st.err != sys::CUfileOpError::CU_FILE_SUCCESS {
            tracing::warn!("cuFileBufDeregister of {:#x}: {:?}", desc.addr, st.err);
        }
    }

    /// Forgets the cuFile handle of `fd` (before the fd is closed).
    pub fn forget_file(&self, fd: RawFd) {
        if let Some(h) = self.handles.lock().remove(&fd) {
            // SAFETY: the handle came from cuFileHandleRegister and is dropped once.
            unsafe { sys::cuFileHandleDeregister(h.0) };
        }
    }

    fn handle(&self, fd: RawFd) -> std::result::Result<sys::CUfileHandle_t, IoFail> {
        let mut map = self.handles.lock();
        if let Some(h) = map.get(&fd) {
            return Ok(h.0);
        }
        // SAFETY: zeroed descriptor, then the fd variant of its union is set.
        let mut descr: sys::CUfileDescr_t = unsafe { std::mem::zeroed() };
        descr.type_ = sys::CUfileFileHandleType::CU_FILE_HANDLE_TYPE_OPAQUE_FD;
        descr.handle.fd = fd;
        let mut h: sys::CUfileHandle_t = std::ptr::null_mut();
        // SAFETY: both pointers are valid for the call; fd is our open dup.
        let st = unsafe { sys::cuFileHandleRegister(&mut h, &mut descr) };
        if st.err != sys::CUfileOpError::CU_FILE_SUCCESS {
            tracing::warn!(fd, "cuFileHandleRegister: {:?}", st.err);
            return Err(IoFail::Os(libc::EIO));
        }
        map.insert(fd, Handle(h));
        Ok(h)
    }

    /// Moves one piece synchronously with `cuFileRead`/`cuFileWrite`, resubmitting the
    /// remainder of short transfers. Returns the bytes moved.
    pub fn transfer(&self, op: &IoOp, write: bool) -> std::result::Result<u64, IoFail> {
        let fh = self.handle(op.fd)?;
        let len = u64::from(op.len);
        let mut done = 0u64;
        while done < len {
            // SAFETY: the VRAM range is registered and valid while the transfer runs
            // (the `post` contract); the base/offset pair addresses inside it.
            let r = unsafe {
                if write {
                    sys::cuFileWrite(
                        fh,
                        op.base as *const std::ffi::c_void,
                        (len - done) as usize,
                        (op.offset + done) as libc::off_t,
                        (op.addr - op.base + done) as libc::off_t,
                    )
                } else {
                    sys::cuFileRead(
                        fh,
                        op.base as *mut std::ffi::c_void,
                        (len - done) as usize,
                        (op.offset + done) as libc::off_t,
                        (op.addr - op.base + done) as libc::off_t,
                    )
                }
            };
            match r {
                n if n > 0 => done += n as u64,
                0 if !write => return Err(IoFail::Eof),
                0 => return Err(IoFail::Os(libc::EIO)),
                -1 => {
                    let errno = std::io::Error::last_os_error()
                        .raw_os_error()
                        .unwrap_or(libc::EIO);
                    if !matches!(errno, libc::EINTR | libc::EAGAIN) {
                        return Err(IoFail::Os(errno));
                    }
                }
                // Other negatives are -CUfileOpError codes.
                _ => return Err(IoFail::Os(libc::EIO)),
            }
        }
        Ok(done)
    }
}

impl Drop for CuFile {
    fn drop(&mut self) {
        for (_, h) in self.handles.get_mut().drain() {
            // SAFETY: each handle is deregistered once.
            unsafe { sys::cuFileHandleDeregister(h.0) };
        }
        // SAFETY: the driver was opened in `open`.
        unsafe { sys::cuFileDriverClose() };
    }
}
