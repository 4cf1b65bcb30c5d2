//! The fallback engine: worker threads doing `pread`/`pwrite`, for kernels without
//! io_uring (or where seccomp blocks it).

use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam::channel::{self, Receiver, RecvTimeoutError, Sender};
use kv_core::{Error, Result};

use crate::file::at_eof;
use crate::io::{IoDone, IoFail, IoReq, MAX_RETRIES};

/// A fixed set of workers fed through a channel. `Send`; dropping it joins them.
pub(crate) struct PoolEngine {
    depth: usize,
    in_flight: usize,
    jobs: Option<Sender<IoReq>>,
    done: Receiver<IoDone>,
    /// Requests that could not be handed to a worker, reported by the next flush.
    orphans: Vec<IoDone>,
    workers: Vec<JoinHandle<()>>,
}

impl PoolEngine {
    /// `threads` workers; at most `depth` requests queued or running.
    pub fn new(threads: usize, depth: usize) -> Result<PoolEngine> {
        let (jobs, job_rx) = channel::unbounded::<IoReq>();
        let (done_tx, done) = channel::unbounded();
        let mut workers = Vec::new();
        for i in 0..threads.max(1) {
            let rx = job_rx.clone();
            let tx = done_tx.clone();
            let h = std::thread::Builder::new()
                .name(format!("kv-gds-io-{i}"))
                .spawn(move || {
                    for req in rx {
                        if tx.send(run(&req)).is_err() {
                            break;
                        }
                    }
                })
                .map_err(|e| Error::io("spawning a gds I/O worker thread", e))?;
            workers.push(h);
        }
        Ok(PoolEngine {
            depth: depth.max(1),
            in_flight: 0,
            jobs: Some(jobs),
            done,
            orphans: Vec::new(),
            workers,
        })
    }

    /// Number of worker threads.
    pub fn threads(&self) -> usize {
        self.workers.len()
    }

    pub fn free(&self) -> usize {
        self.depth.saturating_sub(self.in_flight)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    pub fn push(&mut self, req: IoReq) {
        let tag = req.tag;
        match self.jobs.as_ref().map(|j| j.send(req)) {
            Some(Ok(())) => self.in_flight += 1,
            // Workers gone (cannot happen while the engine lives): report EIO so the
            // transfer fails instead of waiting forever.
            _ => {
                tracing::error!("gds worker threads are gone");
                self.orphans.push(IoDone {
                    tag,
                    bytes: 0,
                    fail: Some(IoFail::Os(libc::EIO)),
                });
            }
        }
    }

    /// Hands out finished requests; with `wait`, blocks up to that long for a first one
    /// when requests are in flight (a worker stuck in the kernel does not hold it longer).
    pub fn flush(&mut self, wait: Option<Duration>, out: &mut Vec<IoDone>) -> Result<()> {
        let before = out.len();
        out.append(&mut self.orphans);
        while let Ok(d) = self.done.try_recv() {
            self.in_flight -= 1;
            out.push(d);
        }
        if let Some(wait) = wait.filter(|_| out.len() == before && self.in_flight > 0) {
            let deadline = Instant::now() + wait;
            // Slices of at most a second, to notice workers that are gone.
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                match self.done.recv_timeout(left.min(Duration::from_secs(1))) {
                    Ok(d) => {
                        self.in_flight -= 1;
                        out.push(d);
                        break;
                    }
                    Err(RecvTimeoutError::Timeout) => {
                        if self.workers.iter().all(|w| w.is_finished()) {
                            return Err(Error::io(
                                "gds thread pool",
                                std::io::Error::other("every worker thread exited"),
                            ));
                        }
                    }
                    Err(RecvTimeoutError::Disconnected) => {
                        return Err(Error::io(
                            "gds thread pool",
                            std::io::Error::other("worker channel closed"),
                        ))
                    }
                }
            }
        }
        Ok(())
    }

    /// Lets the workers go without waiting for them: each exits once its current call
    /// returns. For a backend dropped while a worker is stuck in the kernel.
    pub fn abandon(&mut self) {
        self.jobs = None;
        self.workers.clear();
    }
}

impl Drop for PoolEngine {
    fn drop(&mut self) {
        // Idle workers exit as the channel closes (the backend waited for every request
        // first, or abandoned the workers).
        self.jobs = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// Does one request to the end: short transfers continue, EINTR/EAGAIN retry.
fn run(req: &IoReq) -> IoDone {
    let len = u64::from(req.len);
    let mut done = 0u64;
    let mut retries = 0u32;
    let fail = loop {
        if done >= len {
            break None;
        }
        if req.cancel.load(Ordering::Acquire) {
            break Some(IoFail::Os(libc::ECANCELED));
        }
        let ptr = (req.addr + done) as *mut libc::c_void;
        let n = (len - done) as usize;
        let off = (req.offset + done) as libc::off_t;
        // SAFETY: the range is valid until this request's IoDone is reaped (the
        // `Engine::push` contract); the worker is the only one touching it meanwhile.
        let r = unsafe {
            if req.write {
                libc::pwrite(req.fd, ptr, n, off)
            } else {
                libc::pread(req.fd, ptr, n, off)
            }
        };
        if r < 0 {
            let errno = std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO);
            if matches!(errno, libc::EINTR | libc::EAGAIN) && retries < MAX_RETRIES {
                retries += 1;
                continue;
            }
            break Some(IoFail::Os(errno));
        }
        done += r as u64;
        if done >= len {
            break None;
        }
        if !req.write && (r == 0 || at_eof(req.fd, req.offset + done)) {
            break Some(IoFail::Eof);
        }
        if r == 0 {
            break Some(IoFail::Os(libc::EIO));
        }
    };
    IoDone {
        tag: req.tag,
        bytes: done,
        fail,
    }
}
