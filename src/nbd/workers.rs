//! The threads that run volume calls for every connection of a server.
//!
//! Volume calls block (disk I/O, stripe locks, journal syncs), so they cannot run on the async
//! runtime. tokio's `spawn_blocking` would do, but costs a hand-off per request: an idle
//! blocking thread is woken (a futex wake and a context switch) for each one, and the task
//! that awaits it is woken again when it ends. Under a queue of 32 small writes that is most
//! of the CPU time outside the volume (see `docs/benchmarks.md`).
//!
//! Here a fixed set of threads takes jobs from one queue. A thread that finishes a job takes
//! the next one without sleeping while the queue is not empty, so a busy server pays the
//! wake-up only when a thread has nothing to do. A job sends its own reply (to the
//! connection's reply writer, see `transmission.rs`); nothing awaits it.
//!
//! Promises:
//! - every job submitted runs exactly once, and dropping [`Workers`] lets the threads drain the
//!   queue before they exit;
//! - jobs start in the order they were submitted, except that the watchdog may move the oldest
//!   job of a lane with nothing running ahead of other lanes' jobs (growth, below); jobs of one
//!   lane always start in order;
//! - a job that panics does not take its thread down: the panic is caught, logged, and the job
//!   gets to answer (see [`Workers::submit`]);
//! - a job still running after `slow_request_warning` is logged, in its own tracing span,
//!   while it runs (by a watchdog thread), and again when it ends.
//!
//! No request waits inside the volume for a request that is still queued (writes wait for
//! running writes and for the destager, which has its own thread), so a bounded number of
//! threads cannot deadlock; it only bounds how many requests are inside the volume at once.
//!
//! Growth: each job names its *lane* (the export it is for). When the oldest queued job has
//! waited `stall` with every thread busy, the watchdog adds a thread if that job's lane has
//! nothing running (another export is holding every thread: it must not starve this one), or
//! while the pool is below twice its base size (a few slow requests of one export, say on a
//! failing disk, must not hold up its other requests for long). A busy export whose requests
//! all wait for the same thing (journal space while destaging catches up: back-pressure) gains
//! nothing from more threads; without this rule a long sequential fill grew the pool to 140
//! threads and 800 MiB of memory, each thread holding a request and its journal copies.
//!
//! Memory at rest: once nothing has been queued or running for 5 s, the watchdog returns the
//! heap's free memory to the kernel, once per idle spell (`disk::release_free_memory`; the
//! measurements are in `docs/nbd.md`).

use std::collections::{HashMap, VecDeque};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use tracing::{Span, debug, warn};

use super::config::ServerStats;

/// A unit of work: runs once on a worker thread. Its argument says whether it panicked before
/// (it is then called a second time with `true`, to answer the request).
pub type JobFn = Box<dyn FnMut(bool) + Send>;

/// Most threads the pool grows to when stalled.
const MAX_THREADS: usize = 256;
/// Up to this many times its base size, the pool grows for any stalled job; beyond it, only
/// for a job whose lane has nothing running.
const SAME_LANE_GROWTH: usize = 2;
/// Threads added for a stall exit after this long without work.
const EXTRA_IDLE: Duration = Duration::from_secs(10);
/// How often the watchdog looks at the pool.
const TICK: Duration = Duration::from_millis(20);
/// After this long with no request queued or running, the watchdog gives the heap's free
/// memory back to the kernel, once per idle spell (see [`IdleTrim`]).
const IDLE_TRIM_AFTER: Duration = Duration::from_secs(5);

struct Job {
    queued: Instant,
    lane: usize,
    span: Span,
    run: JobFn,
}

/// What one thread is running, for the watchdog.
struct Active {
    started: Instant,
    span: Span,
    warned: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    ready: Condvar,
    /// What each thread runs, by thread slot.
    active: Mutex<Slots>,
    base: usize,
    /// How long the oldest queued job may wait, with every thread busy, before the watchdog
    /// adds a thread (`ServerConfig::worker_stall`).
    stall: Duration,
    slow_after: Duration,
    stats: Arc<ServerStats>,
}

/// One entry per thread slot, `None` while its thread has no job; slots of threads that
/// exited are in `free`, for the next thread started.
#[derive(Default)]
struct Slots {
    running: Vec<Option<Active>>,
    free: Vec<usize>,
}

struct Queue {
    jobs: VecDeque<Job>,
    closed: bool,
    /// Threads alive, and how many of them are waiting for a job.
    threads: usize,
    idle: usize,
    /// Jobs running, by lane (lanes with none are absent).
    running: HashMap<usize, usize>,
}

/// A pool of threads for volume calls: `threads` of them always, more while the queue is
/// stalled (see `ServerConfig::worker_stall`). Dropping it lets the threads finish the queue and exit.
pub struct Workers {
    shared: Arc<Shared>,
}

impl Workers {
    /// Starts `threads` workers (at least one) and their watchdog.
    pub fn new(
        threads: usize,
        stall: Duration,
        slow_after: Duration,
        stats: Arc<ServerStats>,
    ) -> Self {
        let base = threads.max(1);
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                jobs: VecDeque::new(),
                closed: false,
                threads: 0,
                idle: 0,
                running: HashMap::new(),
            }),
            ready: Condvar::new(),
            active: Mutex::new(Slots::default()),
            base,
            stall,
            slow_after,
            stats,
        });
        for _ in 0..base {
            shared.start_thread();
        }
        let weak = Arc::downgrade(&shared);
        std::thread::Builder::new()
            .name("nbd-watchdog".into())
            .spawn(move || watchdog(weak))
            .expect("cannot start the NBD watchdog thread");
        Self { shared }
    }

    /// Queues `run`, to be called once with `false` inside `span`. If that call panics, the
    /// panic is logged and `run` is called again with `true`, so that the request still gets
    /// an answer (an error); a second panic is only logged. `lane` names what the job is for
    /// (the export), for the pool's growth rule (see the module docs).
    pub fn submit(&self, lane: usize, span: Span, run: JobFn) {
        let mut q = self.shared.lock_queue();
        q.jobs.push_back(Job {
            queued: Instant::now(),
            lane,
            span,
            run,
        });
        let wake = q.idle > 0;
        drop(q);
        // A busy pool takes the job when a thread finishes its current one: no wake-up.
        if wake {
            self.shared.ready.notify_one();
        }
    }

    /// Threads alive now (the base count, plus any added for a stall).
    pub fn threads(&self) -> usize {
        self.shared.lock_queue().threads
    }

    /// Default thread count: four per CPU, at least eight. Requests that wait inside the
    /// volume (a journal sync, a stripe lock) hold a thread each; four per CPU keeps the CPUs
    /// busy behind a few such waits without the context-switch storm of one thread per
    /// request.
    pub fn default_threads() -> usize {
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        (cpus * 4).max(8)
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.shared.lock_queue().closed = true;
        self.shared.ready.notify_all();
    }
}

impl Shared {
    /// Whether the queue is stalled in a way another thread would help (see the module docs).
    /// When the job to help is not at the front (its lane has nothing running, the jobs before
    /// it belong to busy lanes), it is moved to the front, so that the new thread takes it; jobs
    /// of one lane keep their order.
    fn take_stalled(&self, q: &mut Queue) -> bool {
        let waited = |j: &Job| j.queued.elapsed() >= self.stall;
        if !q.jobs.front().is_some_and(waited) {
            return false;
        }
        if q.threads < SAME_LANE_GROWTH * self.base {
            return true;
        }
        let Some(i) = q
            .jobs
            .iter()
            .take_while(|j| waited(j))
            .position(|j| !q.running.contains_key(&j.lane))
        else {
            return false;
        };
        if let Some(j) = q.jobs.remove(i) {
            q.jobs.push_front(j);
        }
        true
    }

    fn lock_queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_active(&self) -> MutexGuard<'_, Slots> {
        self.active.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts one more thread (queue lock not held).
    fn start_thread(self: &Arc<Self>) {
        let i = {
            let mut a = self.lock_active();
            a.free.pop().unwrap_or_else(|| {
                a.running.push(None);
                a.running.len() - 1
            })
        };
        self.lock_queue().threads += 1;
        let s = self.clone();
        if let Err(e) = std::thread::Builder::new()
            .name(format!("nbd-worker-{i}"))
            .spawn(move || {
                s.work(i);
                s.lock_active().free.push(i);
            })
        {
            self.lock_queue().threads -= 1;
            self.lock_active().free.push(i);
            warn!("cannot start an NBD worker thread: {e}");
        }
    }

    fn work(&self, i: usize) {
        loop {
            let job = {
                let mut q = self.lock_queue();
                loop {
                    if let Some(j) = q.jobs.pop_front() {
                        *q.running.entry(j.lane).or_default() += 1;
                        break j;
                    }
                    if q.closed {
                        q.threads -= 1;
                        return;
                    }
                    q.idle += 1;
                    let (g, timeout) = self
                        .ready
                        .wait_timeout(q, EXTRA_IDLE)
                        .unwrap_or_else(|p| p.into_inner());
                    q = g;
                    q.idle -= 1;
                    if timeout.timed_out() && q.jobs.is_empty() && q.threads > self.base {
                        q.threads -= 1;
                        return;
                    }
                }
            };
            let Job {
                span,
                mut run,
                lane,
                ..
            } = job;
            let started = Instant::now();
            self.lock_active().running[i] = Some(Active {
                started,
                span: span.clone(),
                warned: false,
            });
            let _enter = span.enter();
            if let Err(p) = catch_unwind(AssertUnwindSafe(|| run(false))) {
                warn!(
                    "request panicked: {}; answering it with an error",
                    panic_text(&p)
                );
                if let Err(p) = catch_unwind(AssertUnwindSafe(|| run(true))) {
                    warn!("request panicked again while answering: {}", panic_text(&p));
                }
            }
            {
                let mut q = self.lock_queue();
                if let Some(n) = q.running.get_mut(&lane) {
                    *n -= 1;
                    if *n == 0 {
                        q.running.remove(&lane);
                    }
                }
            }
            let was = self.lock_active().running[i].take();
            if was.is_some_and(|a| a.warned) {
                warn!(
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "slow request finished"
                );
            }
        }
    }
}

pub(super) fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

/// When an idle server returns its free heap to the kernel: once per idle spell, after
/// [`IDLE_TRIM_AFTER`] without a request queued or running. A busy server keeps freed buffers
/// for its next requests (`disk::configure_allocator`); an idle one need not hold them.
/// Destaging and other background work may still run then; what they free later waits for the
/// next idle spell.
struct IdleTrim {
    after: Duration,
    busy_at: Instant,
    done: bool,
}

impl IdleTrim {
    fn new(after: Duration, now: Instant) -> Self {
        IdleTrim {
            after,
            busy_at: now,
            done: false,
        }
    }

    /// Records whether the pool is busy at `now`; true when memory should be released now.
    fn observe(&mut self, busy: bool, now: Instant) -> bool {
        if busy {
            self.busy_at = now;
            self.done = false;
            return false;
        }
        if self.done || now.saturating_duration_since(self.busy_at) < self.after {
            return false;
        }
        self.done = true;
        true
    }
}

/// Every [`TICK`]: logs, once each, the requests that have run longer than `slow_after`, and
/// adds a thread when the oldest queued job has waited `stall` with no thread idle (under the
/// lane rule of the module docs); after [`IDLE_TRIM_AFTER`] with nothing queued or running,
/// returns the heap's free memory to the kernel ([`IdleTrim`]). Exits once the pool and its
/// threads are gone.
fn watchdog(shared: Weak<Shared>) {
    let mut trim = IdleTrim::new(IDLE_TRIM_AFTER, Instant::now());
    loop {
        std::thread::sleep(TICK);
        let Some(s) = shared.upgrade() else {
            return;
        };
        let (stalled, busy) = {
            let mut q = s.lock_queue();
            let busy = !q.jobs.is_empty() || q.idle < q.threads;
            let stalled = q.idle == 0 && q.threads < MAX_THREADS && s.take_stalled(&mut q);
            (stalled, busy)
        };
        if trim.observe(busy, Instant::now()) {
            let before = crate::disk::resident_bytes();
            let released = crate::disk::release_free_memory();
            let after = crate::disk::resident_bytes();
            debug!(
                released,
                rss_before_mib = before.map(|b| b >> 20),
                rss_after_mib = after.map(|b| b >> 20),
                "NBD workers idle: free heap memory returned to the kernel"
            );
        }
        if stalled {
            s.start_thread();
            debug!(
                threads = s.lock_queue().threads,
                "requests queued for {} ms with every NBD worker busy: one more worker",
                s.stall.as_millis()
            );
        }
        for a in s.lock_active().running.iter_mut().flatten() {
            if !a.warned && a.started.elapsed() >= s.slow_after {
                a.warned = true;
                s.stats.slow_request();
                a.span.in_scope(|| {
                    warn!(
                        after_ms = s.slow_after.as_millis() as u64,
                        "request still running"
                    )
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;

    #[test]
    fn idle_trim_fires_once_per_idle_spell_and_only_after_the_delay() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut trim = IdleTrim::new(Duration::from_secs(5), t0);
        // Busy, then idle: nothing until five seconds after the last busy look.
        assert!(!trim.observe(true, at(1_000)));
        assert!(!trim.observe(false, at(1_020)));
        assert!(!trim.observe(false, at(5_990)));
        assert!(trim.observe(false, at(6_000)));
        // Once per spell, however long it lasts.
        assert!(!trim.observe(false, at(6_020)));
        assert!(!trim.observe(false, at(60_000)));
        // A request restarts the clock and allows another release.
        assert!(!trim.observe(true, at(61_000)));
        assert!(!trim.observe(false, at(65_000)));
        assert!(trim.observe(false, at(66_000)));
        // A clock that goes backwards (or a look at the same instant) never fires early.
        let mut fresh = IdleTrim::new(Duration::from_secs(5), at(10_000));
        assert!(!fresh.observe(false, at(9_000)));
        assert!(fresh.observe(false, at(15_000)));
    }

    #[test]
    fn every_job_runs_once_even_after_the_pool_is_dropped() {
        let stats = Arc::new(ServerStats::default());
        let pool = Workers::new(
            3,
            Duration::from_millis(100),
            Duration::from_secs(10),
            stats,
        );
        let count = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = mpsc::channel();
        for _ in 0..200 {
            let c = count.clone();
            let tx = tx.clone();
            pool.submit(
                0,
                Span::none(),
                Box::new(move |_| {
                    c.fetch_add(1, Ordering::SeqCst);
                    let _ = tx.send(());
                }),
            );
        }
        drop(pool);
        for _ in 0..200 {
            rx.recv_timeout(Duration::from_secs(10))
                .expect("a job did not run");
        }
        assert_eq!(count.load(Ordering::SeqCst), 200);
    }

    #[test]
    fn a_panicking_job_is_called_again_to_answer_and_the_thread_survives() {
        let stats = Arc::new(ServerStats::default());
        // No growth within the test: printing the panic may take longer than a short stall.
        let pool = Workers::new(1, Duration::from_secs(600), Duration::from_secs(10), stats);
        let (tx, rx) = mpsc::channel();
        let t = tx.clone();
        pool.submit(
            0,
            Span::none(),
            Box::new(move |panicked| {
                if !panicked {
                    panic!("boom");
                }
                let _ = t.send("answered");
            }),
        );
        pool.submit(
            0,
            Span::none(),
            Box::new(move |_| {
                let _ = tx.send("next");
            }),
        );
        let got: Vec<_> = (0..2)
            .map(|_| rx.recv_timeout(Duration::from_secs(10)).unwrap())
            .collect();
        assert_eq!(got, ["answered", "next"]);
    }

    #[test]
    fn a_slow_job_is_counted_while_it_runs() {
        let stats = Arc::new(ServerStats::default());
        let pool = Workers::new(
            2,
            Duration::from_millis(100),
            Duration::from_millis(50),
            stats.clone(),
        );
        let (tx, rx) = mpsc::channel::<()>();
        let (done_tx, done_rx) = mpsc::channel();
        pool.submit(
            0,
            Span::none(),
            Box::new(move |_| {
                let _ = rx.recv_timeout(Duration::from_secs(10));
                let _ = done_tx.send(());
            }),
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while stats.slow_requests() == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(stats.slow_requests(), 1, "not reported while running");
        tx.send(()).unwrap();
        done_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    }

    #[test]
    fn a_stalled_pool_grows_so_queued_jobs_still_run() {
        let stats = Arc::new(ServerStats::default());
        let pool = Workers::new(
            1,
            Duration::from_millis(100),
            Duration::from_secs(10),
            stats,
        );
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let (done_tx, done_rx) = mpsc::channel();
        let d = done_tx.clone();
        // The only thread blocks until the second job runs: without a new thread, it never does.
        pool.submit(
            0,
            Span::none(),
            Box::new(move |_| {
                let ok = release_rx.recv_timeout(Duration::from_secs(10)).is_ok();
                let _ = d.send(ok);
            }),
        );
        pool.submit(
            0,
            Span::none(),
            Box::new(move |_| {
                let _ = release_tx.send(());
                let _ = done_tx.send(true);
            }),
        );
        let got: Vec<bool> = (0..2)
            .map(|_| done_rx.recv_timeout(Duration::from_secs(20)).unwrap())
            .collect();
        assert_eq!(
            got,
            [true, true],
            "the blocked job was released by the queued one"
        );
        assert_eq!(pool.threads(), 2);
    }

    #[test]
    fn a_busy_lane_grows_the_pool_only_to_twice_its_base_but_an_idle_lane_still_runs() {
        let stats = Arc::new(ServerStats::default());
        let pool = Workers::new(1, Duration::from_millis(50), Duration::from_secs(10), stats);
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let started = Arc::new(AtomicUsize::new(0));
        // Lane 0: four jobs that block until the gate opens.
        for _ in 0..4 {
            let (gate, started) = (gate.clone(), started.clone());
            pool.submit(
                0,
                Span::none(),
                Box::new(move |_| {
                    started.fetch_add(1, Ordering::SeqCst);
                    let (open, cv) = &*gate;
                    let mut g = open.lock().unwrap();
                    let deadline = Instant::now() + Duration::from_secs(20);
                    while !*g && Instant::now() < deadline {
                        g = cv.wait_timeout(g, Duration::from_millis(50)).unwrap().0;
                    }
                }),
            );
        }
        // The pool doubles for lane 0 (the second job starts), then stays there through many
        // more stall periods.
        let deadline = Instant::now() + Duration::from_secs(10);
        while started.load(Ordering::SeqCst) < 2 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(400));
        assert_eq!(
            pool.threads(),
            2,
            "same-lane growth stops at twice the base"
        );
        assert_eq!(started.load(Ordering::SeqCst), 2);
        // Lane 1 has nothing running: its job gets a thread of its own.
        let (tx, rx) = mpsc::channel();
        pool.submit(
            1,
            Span::none(),
            Box::new(move |_| {
                let _ = tx.send(());
            }),
        );
        rx.recv_timeout(Duration::from_secs(10))
            .expect("a job of another lane runs while lane 0 holds every thread");
        assert_eq!(pool.threads(), 3);
        let (open, cv) = &*gate;
        *open.lock().unwrap() = true;
        cv.notify_all();
    }
}
