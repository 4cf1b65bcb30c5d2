//! The I/O engines: io_uring, or a thread pool of `pread`/`pwrite` workers.
//!
//! Both take [`IoReq`]s (one contiguous piece between memory and a file) and hand back
//! [`IoDone`]s. Each engine finishes a request completely before reporting it: short
//! transfers are resubmitted for the remainder, `EINTR`/`EAGAIN` are retried, a read
//! that reaches the end of the file is reported as [`IoFail::Eof`](crate::io::IoFail).
//! Which engine a backend gets is decided here too ([`Engine::open`]).

use std::os::fd::RawFd;
use std::time::Duration;

use kv_core::Result;

use crate::io::{IoDone, IoReq};
use crate::pool::PoolEngine;
use crate::uring::UringEngine;

/// Which I/O engine to use. `Copy`, `Send + Sync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EngineChoice {
    /// io_uring, or the thread pool (with a logged reason) when io_uring is unavailable.
    #[default]
    Auto,
    /// io_uring only: creating the backend fails when io_uring is unavailable.
    Uring,
    /// The `pread`/`pwrite` thread pool, even where io_uring works.
    ThreadPool,
}

/// The engine a backend ended up with. `Copy`, `Send + Sync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    /// io_uring.
    Uring,
    /// Worker threads doing `pread`/`pwrite`.
    ThreadPool,
}

/// The engine in use. `Send`.
pub(crate) enum Engine {
    Uring(Box<UringEngine>),
    Pool(PoolEngine),
}

impl Engine {
    /// Opens the engine `choice` asks for: `queue_depth` requests in flight, io_uring
    /// handing SQEs over every `submit_batch`, with registered buffers and files when
    /// asked, or `threads` workers. With `Auto`, falls back to the thread pool (and
    /// logs why) when io_uring is unavailable. Returns the engine, its kind and a
    /// one-line description for `describe()`.
    pub fn open(
        choice: EngineChoice,
        queue_depth: usize,
        submit_batch: usize,
        threads: usize,
        register_buffers: bool,
        register_files: bool,
    ) -> Result<(Engine, EngineKind, String)> {
        Ok(match choice {
            EngineChoice::ThreadPool => {
                let p = PoolEngine::new(threads, queue_depth)?;
                let d = format!(
                    "thread pool ({} threads, queue depth {}; chosen by option)",
                    p.threads(),
                    queue_depth
                );
                (Engine::Pool(p), EngineKind::ThreadPool, d)
            }
            choice => {
                match UringEngine::new(queue_depth, submit_batch, register_buffers, register_files)
                {
                    Ok(u) => {
                        let (b, f) = u.fixed();
                        let d = format!(
                            "io_uring (queue depth {}, submit batch {}, registered buffers {}, registered files {})",
                            u.depth(),
                            u.submit_batch(),
                            if b { "on" } else { "off" },
                            if f { "on" } else { "off" }
                        );
                        (Engine::Uring(Box::new(u)), EngineKind::Uring, d)
                    }
                    Err(e) if choice == EngineChoice::Auto => {
                        tracing::warn!("gds: {e}; falling back to a pread/pwrite thread pool");
                        let p = PoolEngine::new(threads, queue_depth)?;
                        let d = format!(
                            "thread pool ({} threads, queue depth {}; io_uring unavailable: {e})",
                            p.threads(),
                            queue_depth
                        );
                        (Engine::Pool(p), EngineKind::ThreadPool, d)
                    }
                    Err(e) => return Err(e),
                }
            }
        })
    }

    /// Requests that can be added now without exceeding the queue depth.
    pub fn free(&self) -> usize {
        match self {
            Engine::Uring(e) => e.free(),
            Engine::Pool(e) => e.free(),
        }
    }

    /// Requests in flight (queued or running).
    pub fn in_flight(&self) -> usize {
        match self {
            Engine::Uring(e) => e.in_flight(),
            Engine::Pool(e) => e.in_flight(),
        }
    }

    /// Queues `req`; the caller checked [`Engine::free`].
    ///
    /// # Safety
    ///
    /// `req.addr..+len` must stay valid for the kernel (or a worker) to read or write
    /// until the request's [`IoDone`] has been returned by [`Engine::flush`].
    pub unsafe fn push(&mut self, req: IoReq) {
        match self {
            // SAFETY: forwarded contract.
            Engine::Uring(e) => unsafe { e.push(req) },
            Engine::Pool(e) => e.push(req),
        }
    }

    /// Submits what was queued and appends finished requests to `out`; with `wait`,
    /// blocks up to that long for at least one request to finish (if any is in flight).
    /// Never longer: a stuck device cannot hold the caller.
    pub fn flush(&mut self, wait: Option<Duration>, out: &mut Vec<IoDone>) -> Result<()> {
        match self {
            Engine::Uring(e) => e.flush(wait, out),
            Engine::Pool(e) => e.flush(wait, out),
        }
    }

    /// Asks the kernel to cancel the in-flight requests whose tag matches; they still
    /// report through [`Engine::flush`] (as `ECANCELED` or with their real result).
    pub fn cancel(&mut self, matches: &dyn Fn(u64) -> bool) {
        match self {
            Engine::Uring(e) => e.cancel(matches),
            // Workers watch the request's cancel flag; nothing to submit.
            Engine::Pool(_) => {}
        }
    }

    /// Gives up on requests still in flight when the backend is dropped: the thread
    /// pool's workers are let go without being joined. The caller leaks the engine
    /// (the ring, its registered buffers and files stay as the kernel may use them).
    pub fn abandon(&mut self) {
        if let Engine::Pool(e) = self {
            e.abandon()
        }
    }

    /// Registers a memory range as a fixed buffer; `None` when the engine has none
    /// (thread pool, table full, kernel refused).
    ///
    /// # Safety
    ///
    /// The range must stay valid until [`Engine::unregister_buffer`] of the index.
    pub unsafe fn register_buffer(&mut self, addr: u64, len: u64) -> Option<u16> {
        match self {
            // SAFETY: forwarded contract.
            Engine::Uring(e) => unsafe { e.register_buffer(addr, len) },
            Engine::Pool(_) => None,
        }
    }

    /// Frees a fixed-buffer slot (no request may still use it).
    pub fn unregister_buffer(&mut self, index: u16) {
        if let Engine::Uring(e) = self {
            e.unregister_buffer(index)
        }
    }

    /// Registers a file in the ring's table; `None` when not possible.
    pub fn register_file(&mut self, fd: RawFd) -> Option<u32> {
        match self {
            Engine::Uring(e) => e.register_file(fd),
            Engine::Pool(_) => None,
        }
    }

    /// Frees a registered-file slot (no request may still use it).
    pub fn unregister_file(&mut self, index: u32) {
        if let Engine::Uring(e) = self {
            e.unregister_file(index)
        }
    }
}
