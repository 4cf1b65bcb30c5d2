//! GPU memory (VRAM) allocated through the CUDA driver API, loaded at run time by
//! `cudarc` (no CUDA toolkit at build time; `BackendUnavailable` without a driver).

use cudarc::driver::{result, sys};
use kv_core::{Descriptor, Error, MemKind, Result};

use crate::Memory;

/// `len` bytes of device memory on GPU `device`, zeroed, freed on drop.
///
/// `Send + Sync`: it owns a device allocation (an integer address) and a reference on
/// the device's primary context; `&self` methods only copy through the driver, which
/// is thread-safe.
#[derive(Debug)]
pub struct VramBuffer {
    ptr: sys::CUdeviceptr,
    len: usize,
    device: u32,
    dev: sys::CUdevice,
    ctx: sys::CUcontext,
}

// SAFETY: the allocation and context reference are owned; the CUDA driver API may be
// called from any thread once the context is made current there (every method does).
unsafe impl Send for VramBuffer {}
// SAFETY: shared access only copies through the driver (thread-safe); no host state.
unsafe impl Sync for VramBuffer {}

fn unavailable(reason: String) -> Error {
    Error::BackendUnavailable {
        name: "cuda".into(),
        reason,
    }
}

fn driver_err(what: &str, e: result::DriverError) -> Error {
    Error::Backend {
        name: "cuda".into(),
        code: e.0 as i64,
        message: format!("{what}: {e:?}"),
    }
}

impl VramBuffer {
    /// Allocates `len` zeroed bytes on GPU `device`. [`Error::BackendUnavailable`] when
    /// the NVIDIA driver (`libcuda.so`) or the GPU is missing.
    pub fn alloc(device: u32, len: usize) -> Result<VramBuffer> {
        if len == 0 {
            return Err(Error::invalid_argument("a VRAM buffer of zero bytes"));
        }
        // SAFETY: only tries to dlopen the driver library (cudarc panics on calls
        // without it, so this check comes first).
        if !unsafe { sys::is_culib_present() } {
            return Err(unavailable(
                "libcuda.so not found: no NVIDIA driver on this host".into(),
            ));
        }
        result::init()
            .map_err(|e| unavailable(format!("cuInit failed: {e:?} (no usable GPU?)")))?;
        let dev = result::device::get(device as i32)
            .map_err(|e| unavailable(format!("GPU {device} not found: {e:?}")))?;
        // SAFETY: `dev` is a valid device handle; the reference is released on drop.
        let ctx = unsafe { result::primary_ctx::retain(dev) }
            .map_err(|e| driver_err("cuDevicePrimaryCtxRetain", e))?;
        let mut b = VramBuffer {
            ptr: 0,
            len,
            device,
            dev,
            ctx,
        };
        b.make_current()?;
        // SAFETY: the context is current; the result is checked.
        b.ptr = unsafe { result::malloc_sync(len) }.map_err(|e| driver_err("cuMemAlloc", e))?;
        // SAFETY: zeroing our own fresh allocation.
        unsafe { result::memset_d8_sync(b.ptr, 0, len) }
            .map_err(|e| driver_err("cuMemsetD8", e))?;
        Ok(b)
    }

    fn make_current(&self) -> Result<()> {
        // SAFETY: `ctx` is a retained primary context.
        unsafe { result::ctx::set_current(self.ctx) }.map_err(|e| driver_err("cuCtxSetCurrent", e))
    }

    fn check(&self, offset: usize, n: usize) -> Result<()> {
        match offset.checked_add(n) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(Error::OutOfBounds(format!(
                "{offset}+{n} of a VRAM buffer of {} bytes",
                self.len
            ))),
        }
    }

    /// Copies `data` from host memory into the buffer at `offset` (synchronous).
    pub fn copy_from_host(&self, offset: usize, data: &[u8]) -> Result<()> {
        self.check(offset, data.len())?;
        self.make_current()?;
        // SAFETY: the destination lies inside our allocation (checked).
        unsafe { result::memcpy_htod_sync(self.ptr + offset as u64, data) }
            .map_err(|e| driver_err("cuMemcpyHtoD", e))
    }

    /// Copies `out.len()` bytes at `offset` out to host memory (synchronous).
    pub fn copy_to_host(&self, offset: usize, out: &mut [u8]) -> Result<()> {
        self.check(offset, out.len())?;
        self.make_current()?;
        // SAFETY: the source lies inside our allocation (checked).
        unsafe { result::memcpy_dtoh_sync(out, self.ptr + offset as u64) }
            .map_err(|e| driver_err("cuMemcpyDtoH", e))
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: buffers have at least one byte.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The whole buffer as a VRAM descriptor (`device` = GPU ordinal).
    pub fn descriptor(&self) -> Descriptor {
        Descriptor::new(self.ptr, self.len as u64, self.device)
    }
}

impl Drop for VramBuffer {
    fn drop(&mut self) {
        if self.make_current().is_ok() && self.ptr != 0 {
            // SAFETY: freeing our own allocation once.
            let _ = unsafe { result::free_sync(self.ptr) };
        }
        // SAFETY: releases the reference taken in `alloc`.
        let _ = unsafe { result::primary_ctx::release(self.dev) };
    }
}

// SAFETY: a device allocation at a fixed address, owned until drop.
unsafe impl Memory for VramBuffer {
    fn kind(&self) -> MemKind {
        MemKind::Vram
    }
    fn descriptor(&self) -> Descriptor {
        VramBuffer::descriptor(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absent_driver_is_reported_not_a_panic() {
        match VramBuffer::alloc(0, 4096) {
            Ok(b) => assert_eq!(b.descriptor().len, 4096),
            Err(Error::BackendUnavailable { reason, .. }) => assert!(!reason.is_empty()),
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
}
