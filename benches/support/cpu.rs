//! On-CPU timing for benchmarks, shared by the bench targets that include it with `#[path]`.

use std::time::{Duration, Instant};

/// Time spent on a CPU by the calling thread, from `se.sum_exec_runtime` (milliseconds, six
/// decimals) in `/proc/thread-self/sched`; `None` where that file is missing. The development
/// machines are shared by several builds, so wall time mostly measures the queue for a core.
pub fn thread_cpu_time() -> Option<Duration> {
    let sched = std::fs::read_to_string("/proc/thread-self/sched").ok()?;
    let line = sched
        .lines()
        .find(|l| l.starts_with("se.sum_exec_runtime"))?;
    let ms: f64 = line.split(':').nth(1)?.trim().parse().ok()?;
    Some(Duration::from_secs_f64(ms / 1e3))
}

/// Runs `f` `iters` times and returns the on-CPU time it took (wall time if the CPU time of the
/// thread cannot be read). The kernel updates the figure at least every scheduler tick, so
/// samples are kept long (flat sampling, 20 samples over the measurement time).
pub fn on_cpu(iters: u64, mut f: impl FnMut()) -> Duration {
    let (cpu0, wall0) = (thread_cpu_time(), Instant::now());
    for _ in 0..iters {
        f();
    }
    match (cpu0, thread_cpu_time()) {
        (Some(a), Some(b)) => b.saturating_sub(a),
        _ => wall0.elapsed(),
    }
}
