//! Slow work off the caller's path: a backend `cancel`, a deregistration that waits for
//! peers to let go, the disconnects of a retired peer. [`Jobs`] runs each on a helper
//! thread and joins them all when the agent goes; [`Deferred`] is where a job leaves
//! its result.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::thread::JoinHandle;

use kv_core::{Error, Result};
use parking_lot::{Condvar, Mutex};

/// The result of a job once it finished (`Err` if it panicked). Cheap to clone (an
/// `Arc` inside).
pub(crate) struct Deferred<T>(Arc<(Mutex<Option<Result<T>>>, Condvar)>);

impl<T> Clone for Deferred<T> {
    fn clone(&self) -> Self {
        Deferred(self.0.clone())
    }
}

impl<T> Deferred<T> {
    fn new() -> Self {
        Deferred(Arc::new((Mutex::new(None), Condvar::new())))
    }

    /// Runs `f`, keeping its result (or that it panicked: a waiter must never hang).
    fn run(&self, f: impl FnOnce() -> T) {
        let v = catch_unwind(AssertUnwindSafe(f)).map_err(|_| Error::Backend {
            name: "kv-agent".into(),
            code: 0,
            message: "a backend call on a helper thread panicked".into(),
        });
        *self.0 .0.lock() = Some(v);
        self.0 .1.notify_all();
    }

    /// The result if the job finished (taking it; later calls see `None`).
    pub(crate) fn try_take(&self) -> Option<Result<T>> {
        self.0 .0.lock().take()
    }

    /// Blocks until the job finished and takes its result. Call only while nobody else
    /// takes it.
    pub(crate) fn take(&self) -> Result<T> {
        let mut g = self.0 .0.lock();
        loop {
            if let Some(v) = g.take() {
                return v;
            }
            self.0 .1.wait(&mut g);
        }
    }

    /// Blocks until the job finished; leaves its result in place.
    pub(crate) fn wait(&self) {
        let mut g = self.0 .0.lock();
        while g.is_none() {
            self.0 .1.wait(&mut g);
        }
    }
}

/// Helper threads running slow jobs; joined on drop.
#[derive(Default)]
pub(crate) struct Jobs {
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Jobs {
    /// Runs `f` on a helper thread (inline if no thread can be started: the work must
    /// happen either way); its result lands in the returned [`Deferred`].
    pub(crate) fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Deferred<T> {
        let out = Deferred::new();
        let job = Arc::new(Mutex::new(Some(f)));
        let (j, o) = (job.clone(), out.clone());
        let spawned = std::thread::Builder::new()
            .name("kv-agent-slow".into())
            .spawn(move || {
                let f = j.lock().take();
                if let Some(f) = f {
                    o.run(f);
                }
            });
        let mut threads = self.threads.lock();
        threads.retain(|t| !t.is_finished());
        match spawned {
            Ok(t) => threads.push(t),
            Err(e) => {
                drop(threads);
                tracing::warn!(error = %e, "no helper thread; running slow work inline");
                let f = job.lock().take();
                if let Some(f) = f {
                    out.run(f);
                }
            }
        }
        out
    }
}

impl Jobs {
    /// Waits for every helper thread started so far (and any a finishing job started).
    pub(crate) fn join_all(&self) {
        let me = std::thread::current().id();
        loop {
            let batch: Vec<_> = self.threads.lock().drain(..).collect();
            if batch.is_empty() {
                return;
            }
            for t in batch {
                // Never true: jobs do not hold the agent, so they cannot be the ones
                // dropping it (kept so a mistake detaches instead of deadlocking).
                if t.thread().id() != me {
                    let _ = t.join();
                }
            }
        }
    }
}

impl Drop for Jobs {
    fn drop(&mut self) {
        self.join_all();
    }
}
