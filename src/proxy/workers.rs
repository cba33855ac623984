//! Serving threads: every accepted client connection is served on one of a few single-threaded
//! runtimes, one per CPU, picked in turn. A connection, its requests and the upstream
//! connections they open (the pool keeps one shard per thread) then all run on one thread: no
//! work-stealing scheduler, no wake-up crossing threads between a client connection and its
//! upstream connection. The main runtime keeps accepting, the admin listener, reloads and
//! background refreshes.
//!
//! Measured (docs/benchmarks.md): a single-threaded runtime spent about 15 % less CPU per plain
//! request than the multi-threaded one serving the same connections.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

thread_local! {
    /// 1-based index of the serving thread this is, 0 on any other thread.
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// Which serving thread the caller runs on: `1..=n` on serving threads, 0 anywhere else.
pub fn current() -> usize {
    WORKER.with(Cell::get)
}

/// The serving threads of one proxy. [`Workers::stop`] (or dropping this) ends them; their
/// runtimes drop whatever still runs on them, which after shutdown's drain is nothing.
pub struct Workers {
    handles: Vec<Handle>,
    next: AtomicUsize,
    stop: CancellationToken,
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl std::fmt::Debug for Workers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workers")
            .field("threads", &self.handles.len())
            .finish_non_exhaustive()
    }
}

impl Workers {
    /// Starts one serving thread per available CPU (as the OS and cgroup quota report them).
    pub fn start() -> std::io::Result<Self> {
        let count = std::thread::available_parallelism().map_or(1, usize::from);
        // Built first, so that a thread failing to start drops it and stops those already
        // running.
        let mut workers = Self {
            handles: Vec::with_capacity(count),
            next: AtomicUsize::new(0),
            stop: CancellationToken::new(),
        };
        for index in 1..=count {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let handle = runtime.handle().clone();
            let stopped = workers.stop.clone();
            std::thread::Builder::new()
                .name(format!("portcullis-serve-{index}"))
                .spawn(move || {
                    WORKER.with(|w| w.set(index));
                    runtime.block_on(stopped.cancelled());
                })?;
            workers.handles.push(handle);
        }
        Ok(workers)
    }

    /// Ends the serving threads.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// The serving thread for the next connection (round robin).
    pub fn pick(&self) -> &Handle {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        // `start` made at least one.
        &self.handles[n % self.handles.len()]
    }
}
