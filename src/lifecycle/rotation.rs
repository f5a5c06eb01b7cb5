//! The rotation task: one background thread per open pool that
//!
//! 1. advances the epoch when `rotation.period` has passed (new writes follow at once, through
//!    the shared write key);
//! 2. re-keys *hot* stripes first: a stripe accessed at least `rotation.hot_threshold` times in
//!    the current `rotation.hot_window` is re-keyed as soon as it holds a block that is not under
//!    the current (version, epoch), without waiting for `max_age`; counts restart every window
//!    (a threshold of 0 turns this off);
//! 3. re-keys *stale* stripes, oldest key first: stripes with a block under an older master
//!    version, or under an epoch that started more than `rotation.max_age` ago;
//! 4. destroys archived versions whose `rotation.retention` has ended (when no block needs
//!    them).
//!
//! Re-keying goes through [`Volume::rekey_stripe`] (crash-safe, through the journal). The task
//! spends at most `rotation.rate` bytes per second: after re-keying `n` blocks it waits
//! `n × 4096 / rate` seconds, so client I/O keeps the disks. Stale stripes are found by a scan
//! ([`Volume::stale_stripes`], from the generation stamps) at most every [`RESCAN_EVERY`] or when the write key
//! changes, in batches of [`SCAN_BATCH`] stripes.
//!
//! Errors (a disk failing) are recorded in the progress and retried after [`ERROR_BACKOFF`];
//! they never stop the task or the volumes.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use super::{PoolKeys, now_unix};
use crate::layout::{BLOCK_SIZE_U64, StripeId};
use crate::pool::PoolError;
use crate::volume::Volume;

/// Longest pause between two looks at the clock: the epoch changes at most this late.
const MAX_TICK: Duration = Duration::from_secs(1);
/// Shortest pause, so that a tiny test period does not spin.
const MIN_TICK: Duration = Duration::from_millis(20);
/// How often the volumes are scanned for stale stripes when nothing else happens: a scan reads
/// one metadata page per data chunk of every stripe holding data.
pub const RESCAN_EVERY: Duration = Duration::from_secs(60);
/// Stripes taken from one scan of each volume, oldest first.
pub const SCAN_BATCH: usize = 4096;
/// Pause after an error before trying again.
pub const ERROR_BACKOFF: Duration = Duration::from_secs(1);

/// Progress of the rotation task, for `key status` and `status`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RotationProgress {
    pub running: bool,
    /// Stripes re-keyed (visited by a re-key, whether or not a block needed it) since start.
    pub stripes_done: u64,
    /// Blocks rewritten under a newer key since start.
    pub blocks_done: u64,
    /// Of `stripes_done`, those re-keyed because they were hot.
    pub hot_stripes_done: u64,
    /// Stale stripes found by the last scan and not re-keyed yet.
    pub remaining_stripes: u64,
    /// Re-encryption throughput while working, MB/s (10^6 bytes), rate limit included.
    pub rate_mb_s: f64,
    pub last_scan_unix: Option<u64>,
    pub last_error: Option<String>,
}

/// Handle of a running rotation task; stops it when dropped.
pub struct RotationTask {
    stop: Arc<(AtomicBool, Mutex<()>, Condvar)>,
    handle: Option<JoinHandle<()>>,
}

impl RotationTask {
    /// Starts the task for `volumes` (the pool's open volumes).
    pub fn start(keys: Arc<PoolKeys>, volumes: Vec<Arc<Volume>>) -> Result<Self, PoolError> {
        let stop = Arc::new((AtomicBool::new(false), Mutex::new(()), Condvar::new()));
        let s = stop.clone();
        keys.progress_mut().running = true;
        let handle = std::thread::Builder::new()
            .name("key-rotation".into())
            .spawn(move || Worker::new(keys, volumes, s).run())
            .map_err(|e| PoolError::Invalid(format!("cannot start the rotation task: {e}")))?;
        Ok(Self {
            stop,
            handle: Some(handle),
        })
    }

    /// Stops the task and waits for it (a re-key in progress finishes first).
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let (flag, m, cv) = &*self.stop;
        flag.store(true, Ordering::SeqCst);
        drop(m.lock().unwrap_or_else(PoisonError::into_inner));
        cv.notify_all();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for RotationTask {
    fn drop(&mut self) {
        self.shutdown();
    }
}

struct Worker {
    keys: Arc<PoolKeys>,
    volumes: Vec<Arc<Volume>>,
    stop: Arc<(AtomicBool, Mutex<()>, Condvar)>,
    /// Stale stripes to re-key: (volume index, stripe).
    queue: VecDeque<(usize, StripeId)>,
    last_scan: Option<Instant>,
    scanned_for: (u32, u32),
    window_start: Instant,
    /// Hot stripes already re-keyed in this window, and the write key they got.
    hot_done: HashMap<(usize, u64), (u32, u32)>,
    busy: Duration,
    busy_bytes: u64,
}

impl Worker {
    fn new(
        keys: Arc<PoolKeys>,
        volumes: Vec<Arc<Volume>>,
        stop: Arc<(AtomicBool, Mutex<()>, Condvar)>,
    ) -> Self {
        Self {
            keys,
            volumes,
            stop,
            queue: VecDeque::new(),
            last_scan: None,
            scanned_for: (0, 0),
            window_start: Instant::now(),
            hot_done: HashMap::new(),
            busy: Duration::ZERO,
            busy_bytes: 0,
        }
    }

    fn stopped(&self) -> bool {
        self.stop.0.load(Ordering::SeqCst)
    }

    /// Waits `d` or until stopped; returns whether stopped.
    fn pause(&self, d: Duration) -> bool {
        let (flag, m, cv) = &*self.stop;
        let g = m.lock().unwrap_or_else(PoisonError::into_inner);
        if flag.load(Ordering::SeqCst) {
            return true;
        }
        let _ = cv.wait_timeout(g, d);
        flag.load(Ordering::SeqCst)
    }

    fn tick(&self) -> Duration {
        (self.keys.policy().period / 4).clamp(MIN_TICK, MAX_TICK)
    }

    fn run(mut self) {
        while !self.stopped() {
            let worked = match self.step() {
                Ok(w) => w,
                Err(e) => {
                    warn!(error = %e, "key rotation failed; retrying");
                    self.keys.progress_mut().last_error = Some(e.to_string());
                    self.queue.clear();
                    if self.pause(ERROR_BACKOFF) {
                        break;
                    }
                    continue;
                }
            };
            if !worked && self.pause(self.tick()) {
                break;
            }
        }
        self.keys.progress_mut().running = false;
    }

    /// Re-keys one stripe of `vol`, then waits what the rate limit asks. Returns whether the
    /// task was stopped meanwhile.
    fn rekey(&mut self, vol: usize, stripe: StripeId, hot: bool) -> Result<bool, PoolError> {
        let t0 = Instant::now();
        let n = self.volumes[vol].rekey_stripe(stripe)?;
        let bytes = n * BLOCK_SIZE_U64;
        let rate = self.keys.policy().rate_bytes;
        let wait = if rate > 0 {
            Duration::from_secs_f64(bytes as f64 / rate as f64).saturating_sub(t0.elapsed())
        } else {
            Duration::ZERO
        };
        let stopped = !wait.is_zero() && self.pause(wait);
        self.busy += t0.elapsed();
        self.busy_bytes += bytes;
        let mut p = self.keys.progress_mut();
        p.stripes_done += 1;
        p.blocks_done += n;
        if hot {
            p.hot_stripes_done += 1;
        }
        if self.busy > Duration::ZERO {
            p.rate_mb_s = self.busy_bytes as f64 / 1e6 / self.busy.as_secs_f64();
        }
        p.last_error = None;
        Ok(stopped)
    }

    /// One step: returns whether anything was re-keyed (then the next step follows at once).
    fn step(&mut self) -> Result<bool, PoolError> {
        let now = now_unix();
        self.keys.tick_epoch(now)?;
        let policy = self.keys.policy();
        if self.window_start.elapsed() >= policy.hot_window {
            for v in &self.volumes {
                v.reset_access_counts();
            }
            self.hot_done.clear();
            self.window_start = Instant::now();
        }
        let wk = self.keys.write_key();

        // Hot stripes first.
        let mut hot = Vec::new();
        // A threshold of 0 turns the hot-stripe rule off.
        let counted = if policy.hot_threshold == 0 {
            &[][..]
        } else {
            &self.volumes[..]
        };
        for (i, v) in counted.iter().enumerate() {
            for (s, _) in v.hot_stripes(policy.hot_threshold) {
                if self.hot_done.get(&(i, s.0)) != Some(&wk) {
                    hot.push((i, s));
                }
            }
        }
        if let Some(&(i, s)) = hot.first() {
            debug!(
                volume = self.volumes[i].name(),
                stripe = s.0,
                "re-keying a hot stripe"
            );
            self.hot_done.insert((i, s.0), wk);
            self.rekey(i, s, true)?;
            return Ok(true);
        }

        // Then stale stripes, oldest first.
        let rescan = self.queue.is_empty()
            && (self
                .last_scan
                .is_none_or(|t| t.elapsed() >= RESCAN_EVERY.min(policy.period))
                || self.scanned_for != wk);
        if rescan {
            self.scan(now)?;
        }
        if let Some((i, s)) = self.queue.pop_front() {
            self.keys.progress_mut().remaining_stripes = self.queue.len() as u64;
            self.rekey(i, s, false)?;
            return Ok(true);
        }
        Ok(false)
    }

    fn scan(&mut self, now: u64) -> Result<(), PoolError> {
        let due = self.keys.due_key(now);
        let mut found = Vec::new();
        for (i, v) in self.volumes.iter().enumerate() {
            for (s, k) in v.stale_stripes(due, SCAN_BATCH) {
                found.push((k, i, s));
            }
        }
        found.sort_by_key(|(k, i, s)| (*k, *i, s.0));
        self.queue = found.into_iter().map(|(_, i, s)| (i, s)).collect();
        self.last_scan = Some(Instant::now());
        self.scanned_for = self.keys.write_key();
        {
            let mut p = self.keys.progress_mut();
            p.remaining_stripes = self.queue.len() as u64;
            p.last_scan_unix = Some(now);
        }
        if self.queue.is_empty() {
            self.keys.destroy_expired(&self.volumes, now)?;
        }
        Ok(())
    }
}
