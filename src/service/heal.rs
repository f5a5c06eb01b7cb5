//! Self-healing on a served pool: the `scrub` and `disk_replace` control commands, and the
//! background healer (scheduled scrubs from `[scrub]`, and the resumption of a rebuild or a
//! rebalance that a restart interrupted, at `[rebuild] rate`).
//!
//! | command | args | progress | result |
//! |---|---|---|---|
//! | `scrub` | `volume`, `repair` (bool), `rate` (bytes/s, 0: none) | `{done, total, bytes, bytes_per_s, eta_s}` | the scrub report |
//! | `disk_replace` | `disk` (id), `with` (path), `rate` (bytes/s) | the same | the rebuild report |
//! | `disk_add` | `path`, `domain` (optional), `rate` (bytes/s) | the same | the rebalance report |

use std::cell::Cell;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tracing::{info, warn};

use super::Service;
use crate::control::{Handlers, Progress as Sink};
use crate::layout::DiskId;
use crate::meta::DiskState;
use crate::pool::{AddOptions, Pool, RebuildOptions};
use crate::volume::scrub::{Progress, ScrubOptions};

/// Least time between two progress lines sent to a client: enough to show a rate, few enough
/// lines for a long scrub.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);
/// How often the background healer looks for work.
const HEALER_TICK: Duration = Duration::from_secs(5);

/// Registers the self-healing commands.
pub(super) fn register(h: &mut Handlers, service: &Arc<Service>) {
    let s = service.clone();
    h.add("scrub", move |args: &Value, sink: &Sink| {
        let pool = unlocked(&s)?;
        let volume = args
            .get("volume")
            .and_then(Value::as_str)
            .ok_or("scrub needs \"volume\": the name of the volume")?;
        let opts = ScrubOptions {
            repair: args.get("repair").and_then(Value::as_bool).unwrap_or(false),
            rate_bytes_per_s: args.get("rate").and_then(Value::as_u64).unwrap_or(0),
        };
        let report = pool
            .scrub(volume, &opts, &throttled(sink))
            .map_err(|e| e.to_string())?;
        serde_json::to_value(report).map_err(|e| e.to_string())
    });
    let s = service.clone();
    h.add("disk_replace", move |args: &Value, sink: &Sink| {
        let pool = unlocked(&s)?;
        let disk = args
            .get("disk")
            .and_then(Value::as_u64)
            .and_then(|d| u32::try_from(d).ok())
            .ok_or("disk_replace needs \"disk\": the id of the failed disk")?;
        let with = args
            .get("with")
            .and_then(Value::as_str)
            .ok_or("disk_replace needs \"with\": the path of the new disk")?;
        let opts = RebuildOptions {
            rate_bytes_per_s: args.get("rate").and_then(Value::as_u64).unwrap_or(0),
            stop: None,
        };
        let report = pool
            .replace_disk(
                DiskId(disk),
                std::path::Path::new(with),
                &opts,
                &throttled(sink),
            )
            .map_err(|e| e.to_string())?;
        serde_json::to_value(report).map_err(|e| e.to_string())
    });
    register_add(h, service);
}

/// Registers `disk_add` (a separate function so `register` stays readable).
fn register_add(h: &mut Handlers, service: &Arc<Service>) {
    let s = service.clone();
    h.add("disk_add", move |args: &Value, sink: &Sink| {
        let pool = unlocked(&s)?;
        let path = args
            .get("path")
            .and_then(Value::as_str)
            .ok_or("disk_add needs \"path\": the path of the new disk")?;
        let opts = AddOptions {
            domain: args
                .get("domain")
                .and_then(Value::as_str)
                .map(str::to_string),
            rate_bytes_per_s: args.get("rate").and_then(Value::as_u64).unwrap_or(0),
            stop: None,
        };
        let report = pool
            .add_disk(std::path::Path::new(path), &opts, &throttled(sink))
            .map_err(|e| e.to_string())?;
        serde_json::to_value(report).map_err(|e| e.to_string())
    });
}

fn unlocked(s: &Service) -> Result<Arc<Pool>, String> {
    s.pool()
        .ok_or_else(|| "the pool is sealed: unlock it first (`shardvol unlock`)".to_string())
}

/// A progress callback that sends at most one line per [`PROGRESS_EVERY`] (and the last one).
fn throttled(sink: &Sink) -> impl Fn(Progress) + '_ {
    let last = Cell::new(Instant::now() - PROGRESS_EVERY);
    move |p: Progress| {
        if last.get().elapsed() >= PROGRESS_EVERY || p.done == p.total {
            last.set(Instant::now());
            sink.send(json!(p));
        }
    }
}

/// Starts the background healer of a served pool: every few seconds, once the pool is
/// unlocked, it resumes the rebuild of any disk left rebuilding (onto the path recorded for
/// it) and scrubs every volume whose last scrub is older than `[scrub] interval`. The thread
/// ends with the service.
pub fn start_background(service: &Arc<Service>) -> std::io::Result<()> {
    let weak = Arc::downgrade(service);
    std::thread::Builder::new()
        .name("healer".into())
        .spawn(move || healer(weak))
        .map(drop)
}

fn healer(weak: Weak<Service>) {
    loop {
        std::thread::sleep(HEALER_TICK);
        let Some(service) = weak.upgrade() else {
            return;
        };
        let Some(pool) = service.pool() else { continue };
        let mb = |rate: f64| (rate * 1e6) as u64;
        for id in pool.health.ids() {
            if pool.health.state(id) != DiskState::Rebuilding || pool.rebuild_running(id) {
                continue;
            }
            let Ok(Some(rec)) = pool.store.disk(id) else {
                continue;
            };
            let opts = RebuildOptions {
                rate_bytes_per_s: mb(service.config.rebuild.rate),
                stop: None,
            };
            info!(disk = id.0, "resuming an interrupted rebuild");
            if let Err(e) = pool.replace_disk(id, &rec.path, &opts, &|_| {}) {
                warn!(disk = id.0, error = %e, "the rebuild did not complete; it is retried");
            }
        }
        resume_rebalance(&service, &pool);
        let interval = service.config.scrub.interval.0;
        if interval.is_zero() {
            continue;
        }
        let view = match pool.health_view() {
            Ok(v) => v,
            Err(_) => continue,
        };
        let now = crate::now_unix();
        for (name, volume) in &pool.volumes {
            let last = view.scrubs.get(name).map(|s| s.finished_unix);
            if !scrub_due(now, last, volume.record().created_unix, interval) {
                continue;
            }
            let opts = ScrubOptions {
                repair: service.config.scrub.repair,
                rate_bytes_per_s: mb(service.config.scrub.rate),
            };
            info!(volume = %name, "scheduled scrub");
            if let Err(e) = pool.scrub(name, &opts, &|_| {}) {
                warn!(volume = %name, error = %e, "scheduled scrub failed");
            }
        }
    }
}

/// When a volume's next scheduled scrub is due (seconds since the epoch), `None` with
/// scheduled scrubs off: one `interval` after its last scrub, or, if it was never scrubbed,
/// after its creation. A new volume holds nothing worth checking, and a scrub right after the
/// first start would compete with the first writes. Volumes whose creation time is unknown
/// (0) and that were never scrubbed are due at once.
pub(super) fn next_scrub_unix(
    last_scrub: Option<u64>,
    created: u64,
    interval: Duration,
) -> Option<u64> {
    (!interval.is_zero()).then(|| {
        last_scrub
            .unwrap_or(created)
            .saturating_add(interval.as_secs())
    })
}

/// Whether a volume is due for its scheduled scrub at `now` ([`next_scrub_unix`]).
fn scrub_due(now: u64, last_scrub: Option<u64>, created: u64, interval: Duration) -> bool {
    next_scrub_unix(last_scrub, created, interval).is_some_and(|due| now >= due)
}

/// Resumes a rebalance that a restart interrupted (onto the disk being added), unless one runs.
fn resume_rebalance(service: &Service, pool: &Pool) {
    if pool.rebalance_running() {
        return;
    }
    let Some(st) = crate::pool::rebalance_status(&pool.store) else {
        return;
    };
    let Ok(Some(rec)) = pool.store.disk(DiskId(st.disk)) else {
        return;
    };
    let opts = AddOptions {
        domain: None,
        rate_bytes_per_s: (service.config.rebuild.rate * 1e6) as u64,
        stop: None,
    };
    match pool.add_disk(&rec.path, &opts, &|_| {}) {
        Ok(r) => info!(
            disk = st.disk,
            moved = r.moved,
            "interrupted rebalance finished"
        ),
        Err(e) => {
            warn!(disk = st.disk, error = %e, "the rebalance did not complete; it is retried")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WEEK: Duration = Duration::from_secs(7 * 86_400);
    const NOW: u64 = 1_800_000_000;

    #[test]
    fn a_new_volume_waits_one_interval_from_its_creation() {
        assert!(!scrub_due(NOW, None, NOW - 60, WEEK));
        assert!(!scrub_due(NOW, None, NOW - WEEK.as_secs() + 1, WEEK));
        assert!(scrub_due(NOW, None, NOW - WEEK.as_secs(), WEEK));
    }

    #[test]
    fn a_scrubbed_volume_waits_one_interval_from_its_last_scrub() {
        let created = NOW - 30 * 86_400;
        assert!(!scrub_due(NOW, Some(NOW - 3_600), created, WEEK));
        assert!(scrub_due(NOW, Some(NOW - WEEK.as_secs()), created, WEEK));
    }

    #[test]
    fn a_volume_of_unknown_age_never_scrubbed_is_due_at_once() {
        assert!(scrub_due(NOW, None, 0, WEEK));
    }

    #[test]
    fn no_scrub_is_due_with_scheduled_scrubs_off() {
        assert!(!scrub_due(NOW, None, 0, Duration::ZERO));
        assert_eq!(next_scrub_unix(Some(5), 0, Duration::ZERO), None);
        assert_eq!(next_scrub_unix(Some(5), 0, WEEK), Some(5 + WEEK.as_secs()));
    }

    #[test]
    fn a_clock_set_back_does_not_make_a_scrub_due() {
        assert!(!scrub_due(NOW, Some(NOW + 3_600), 0, WEEK));
        assert!(!scrub_due(NOW, None, NOW + 3_600, WEEK));
    }
}
