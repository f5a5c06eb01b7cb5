//! Self-healing at the pool level: the health registry of the pool's disks (opened, checked,
//! persisted), scrub of a volume, replacement and rebuild of a disk, and the status report.
//! `docs/self-healing.md` describes the policy and the costs.
//!
//! Persistence: a disk's state is `DiskRecord.state` in the store and in the disk table of every
//! surviving disk's superblock; its counters and rebuild cursor are the `disk_health` table; a
//! volume's last scrub is the `scrubs` table.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::{
    Pool, PoolError, STORE_FILE, hex, now_unix, read_superblock, size_disk, write_superblocks,
};
use crate::audit::{EventKind, Fields};
use crate::disk::{DiskOptions, DiskRef};
use crate::layout::{DiskId, StripeId};
use crate::lifecycle::PoolKeys;
use crate::meta::{DiskRecord, DiskState, MetaStore};
use crate::volume::health::{DiskCounters, DiskHealthRecord, FailurePolicy, Health, MissingDisk};
use crate::volume::scrub::{Progress, ScrubOptions, ScrubReport, pace};

/// How often a rebuild makes its cursor durable (sync of the new disk, then a store commit):
/// at most this much work is redone after a restart, and the commits cost nothing next to the
/// copy.
const CURSOR_EVERY: Duration = Duration::from_millis(500);

/// Opens every disk of the table, checks it, and builds the pool's health registry. A disk
/// recorded as failed is not opened; a disk that cannot be opened, is smaller than the
/// volumes need, or whose superblock is not this pool's disk of that id, is failed (logged once
/// and persisted) and replaced by a [`MissingDisk`].
pub(super) fn open_health(
    store: &Arc<MetaStore>,
    table: &[DiskRecord],
    wrap: &dyn Fn(DiskId, DiskRef) -> DiskRef,
    failures: Arc<FailureAudit>,
) -> Result<Arc<Health>, PoolError> {
    let pool = store.pool()?;
    let need = store
        .volumes()?
        .iter()
        .map(|v| v.region_offset + v.region_size)
        .max()
        .unwrap_or(0);
    let mut disks = Vec::new();
    let mut bad: Vec<(DiskId, String)> = Vec::new();
    for d in table {
        let missing = || -> DiskRef {
            Arc::new(MissingDisk {
                name: d.path.display().to_string(),
                size: d.size,
            })
        };
        if d.state == DiskState::Failed {
            disks.push((d.id, missing()));
            continue;
        }
        let opened = crate::disk::open_disk(&d.path, &DiskOptions::default())
            .map_err(|e| e.to_string())
            .map(|disk| wrap(d.id, disk))
            .and_then(|disk| {
                if disk.size() < need {
                    return Err(format!(
                        "{} bytes, the volumes need {need} (truncated?)",
                        disk.size()
                    ));
                }
                match read_superblock(disk.as_ref()) {
                    Ok(sb) if sb.pool.pool_id == pool.pool_id && sb.disk_id == d.id => Ok(disk),
                    Ok(sb) if sb.pool.pool_id == pool.pool_id => Err(format!(
                        "its superblock is that of disk {} of this pool",
                        sb.disk_id
                    )),
                    Ok(_) => Err("its superblock belongs to another pool".into()),
                    Err(e) => Err(format!("no readable superblock: {e}")),
                }
            });
        match opened {
            Ok(disk) => disks.push((d.id, disk)),
            Err(why) => {
                bad.push((d.id, why));
                disks.push((d.id, missing()));
            }
        }
    }
    let persist_store = store.clone();
    let health = Health::new(
        disks,
        FailurePolicy::default(),
        Box::new(move |h, id, why| {
            persist_state(&persist_store, h, id);
            failures.record(crate::audit::fields([
                ("disk", id.0.to_string()),
                ("path", h.name(id)),
                ("reason", why.to_string()),
            ]));
        }),
    );
    let saved: BTreeMap<u32, DiskHealthRecord> = store.disk_healths()?.into_iter().collect();
    for d in table {
        if let Some(r) = saved.get(&d.id.0) {
            health.load_counters(d.id, &r.counters);
            if let Some((v, s)) = r.cursor {
                health.set_cursor(d.id, v, s);
            }
        }
        if d.state != DiskState::Ok {
            health.set_state(d.id, d.state);
        }
    }
    for (id, why) in bad {
        health.fail(id, &format!("at open: {why}"));
    }
    Ok(health)
}

/// Where disk failures go in the audit log (`disk-failed`): through the pool's keys, which
/// append key-side events with the current audit key. The health registry exists before the
/// keys do (a disk can fail while the pool opens), so failures seen before
/// [`FailureAudit::attach`] wait in memory and are recorded by it.
///
/// It holds the keys weakly: the keys hold the disks, whose health registry holds this.
#[derive(Default)]
pub(super) struct FailureAudit {
    state: Mutex<(Option<Weak<PoolKeys>>, Vec<Fields>)>,
}

impl FailureAudit {
    fn record(&self, fields: Fields) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match &st.0 {
            // Keys gone: the pool is closing, and nothing records anything any more.
            Some(keys) => {
                if let Some(keys) = keys.upgrade() {
                    keys.record(EventKind::DiskFailed, fields);
                }
            }
            None => st.1.push(fields),
        }
    }

    /// From now on, failures are recorded through `keys`; those seen before are now.
    pub(super) fn attach(&self, keys: &Arc<PoolKeys>) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        for f in std::mem::take(&mut st.1) {
            keys.record(EventKind::DiskFailed, f);
        }
        st.0 = Some(Arc::downgrade(keys));
    }
}

/// The pool's persistence hook: the disk's state in the store and its counters, then a new
/// superblock on every disk that is not failed. Errors are logged: the state is already in
/// force in memory, and the next change or close tries again.
fn persist_state(store: &MetaStore, h: &Health, id: DiskId) {
    let state = h.state(id);
    match store.disk(id) {
        Ok(Some(mut rec)) if rec.state != state => {
            rec.state = state;
            if let Err(e) = store.put_disk(&rec) {
                warn!(disk = id.0, error = %e, "cannot record the disk's state in the store");
            }
        }
        Ok(_) => {}
        Err(e) => warn!(disk = id.0, error = %e, "cannot read the disk's record"),
    }
    save_disk_health(store, h, id);
    if let Err(e) = rewrite_superblocks(store, h) {
        warn!(disk = id.0, error = %e, "cannot rewrite the superblocks");
    }
}

fn save_disk_health(store: &MetaStore, h: &Health, id: DiskId) {
    let cursor = (h.state(id) == DiskState::Rebuilding).then(|| h.cursor(id));
    let rec = DiskHealthRecord {
        counters: h.counters(id),
        cursor,
    };
    if let Err(e) = store.put_disk_health(id, &rec) {
        warn!(disk = id.0, error = %e, "cannot save the disk's counters");
    }
}

/// Writes the store's pool description to the superblock of every disk that is not failed,
/// with a sequence number above every superblock found on them.
pub(super) fn rewrite_superblocks(store: &MetaStore, h: &Health) -> Result<(), PoolError> {
    let disks: std::collections::HashMap<DiskId, DiskRef> = h
        .ids()
        .into_iter()
        .filter(|id| !h.is_failed(*id))
        .filter_map(|id| h.disk(id).map(|d| (id, d)))
        .collect();
    let seq = disks
        .values()
        .filter_map(|d| read_superblock(d.as_ref()).ok())
        .map(|sb| sb.seq)
        .max()
        .unwrap_or(0)
        + 1;
    write_superblocks(store, &disks, seq)
}

/// Long jobs running in this process, by (pool directory, job): a rebuild per disk
/// (`rebuild N`), one rebalance per pool (`rebalance`).
static RUNNING: Mutex<BTreeSet<(PathBuf, String)>> = Mutex::new(BTreeSet::new());

/// A claim on one job of one pool, released on drop.
pub(super) struct Running((PathBuf, String));

impl Running {
    /// Claims `job` on the pool at `dir`; `busy` is the error when it already runs.
    pub(super) fn claim(dir: &Path, job: String, busy: &str) -> Result<Self, PoolError> {
        let key = (dir.to_path_buf(), job);
        let mut r = RUNNING.lock().unwrap_or_else(|p| p.into_inner());
        if !r.insert(key.clone()) {
            return Err(PoolError::Invalid(busy.to_string()));
        }
        Ok(Self(key))
    }

    /// Whether `job` runs on the pool at `dir`.
    pub(super) fn is_running(dir: &Path, job: String) -> bool {
        RUNNING
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&(dir.to_path_buf(), job))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        RUNNING
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.0);
    }
}

impl Pool {
    /// Bytes every disk must hold: the end of the last volume's region.
    pub(super) fn disk_bytes_needed(&self) -> u64 {
        self.volumes
            .values()
            .map(|v| v.record().region_offset + v.record().region_size)
            .max()
            .unwrap_or(0)
    }

    /// Whether a rebuild of disk `id` runs in this process.
    pub fn rebuild_running(&self, id: DiskId) -> bool {
        Running::is_running(&self.dir, format!("rebuild {id}"))
    }
}

/// Options of a rebuild.
#[derive(Clone, Debug, Default)]
pub struct RebuildOptions {
    /// Most bytes read per second (0: no limit).
    pub rate_bytes_per_s: u64,
    /// Set to stop the rebuild after the stripe in progress (its cursor is saved first).
    pub stop: Option<Arc<AtomicBool>>,
}

/// What a rebuild did.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RebuildReport {
    pub disk: u32,
    pub path: String,
    /// Whether it resumed a rebuild that a restart had interrupted.
    pub resumed: bool,
    /// False when stopped before the end (`RebuildOptions::stop`).
    pub completed: bool,
    /// Chunks written to the new disk.
    pub chunks: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// Allocated blocks that no combination of the other chunks rebuilds.
    pub unrecoverable: u64,
    pub seconds: f64,
}

/// Summary of a volume's last scrub, as `status` shows it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ScrubSummary {
    pub finished_unix: u64,
    pub repair: bool,
    pub stripes: u64,
    pub blocks_checked: u64,
    pub parity_checked: u64,
    pub bad_found: u64,
    pub repaired: u64,
    pub unrecoverable: u64,
    pub seconds: f64,
}

impl Pool {
    /// Saves every disk's counters (and rebuild cursor) in the store.
    pub fn save_health(&self) -> Result<(), PoolError> {
        for id in self.health.ids() {
            save_disk_health(&self.store, &self.health, id);
        }
        Ok(())
    }

    /// Scrubs a volume (see `volume::scrub`) and records the result for `status`.
    pub fn scrub(
        &self,
        volume: &str,
        opts: &ScrubOptions,
        progress: &dyn Fn(Progress),
    ) -> Result<ScrubReport, PoolError> {
        let v = self.volume(volume)?;
        let report = v.scrub(opts, progress)?;
        let summary = ScrubSummary {
            finished_unix: now_unix(),
            repair: opts.repair,
            stripes: report.stripes,
            blocks_checked: report.blocks_checked,
            parity_checked: report.parity_checked,
            bad_found: report.bad_found,
            repaired: report.repaired,
            unrecoverable: report.unrecoverable,
            seconds: report.seconds,
        };
        self.store.put_scrub(v.record().id, &summary)?;
        self.save_health()?;
        Ok(report)
    }

    fn volume(&self, name: &str) -> Result<&Arc<crate::volume::Volume>, PoolError> {
        self.volumes.get(name).ok_or_else(|| {
            PoolError::Invalid(format!(
                "the pool has no volume {name:?} (it has: {})",
                self.volumes.keys().cloned().collect::<Vec<_>>().join(", ")
            ))
        })
    }

    /// Replaces disk `id` by the disk at `path` and rebuilds onto it every chunk that placement
    /// puts on that id, volume by volume, stripe by stripe, while the volumes stay in service.
    /// The disk must be failed, or rebuilding (then a rebuild onto the same path resumes at its
    /// saved cursor; another path starts over). `path` may be a file (created sparse, or grown)
    /// or a block device large enough; it must not be another disk of the pool or hold another
    /// pool's superblock. `progress` is called after every stripe.
    pub fn replace_disk(
        &self,
        id: DiskId,
        path: &Path,
        opts: &RebuildOptions,
        progress: &dyn Fn(Progress),
    ) -> Result<RebuildReport, PoolError> {
        let started = Instant::now();
        let _running = Running::claim(
            &self.dir,
            format!("rebuild {id}"),
            &format!("a rebuild of disk {id} is already running"),
        )?;
        let table = self.store.disks()?;
        let Some(mut rec) = table.iter().find(|d| d.id == id).cloned() else {
            return Err(PoolError::Invalid(format!(
                "the pool has no disk {id}; `shardvol status --pool {}` lists its disks",
                self.dir.display()
            )));
        };
        let path = absolute(path);
        if let Some(other) = table
            .iter()
            .find(|d| d.id != id && same_file(&d.path, &path))
        {
            return Err(PoolError::Invalid(format!(
                "{} is disk {} of this pool; give a new disk",
                path.display(),
                other.id
            )));
        }
        if self.rebalance_pending() {
            return Err(PoolError::Invalid(
                "a rebalance after `disk add` is in progress: it writes around the failed disk; replace it once the rebalance has finished".into(),
            ));
        }
        let state = self.health.state(id);
        let resume = state == DiskState::Rebuilding && same_file(&rec.path, &path);
        if state == DiskState::Ok {
            return Err(PoolError::Invalid(format!(
                "disk {id} ({}) is in service; only a failed disk is replaced (a disk is failed when it errors, goes missing or returns bad blocks: see `shardvol status`)",
                rec.path.display()
            )));
        }
        if !resume {
            let need = self.disk_bytes_needed();
            rec.path = path.clone();
            size_disk(&mut rec, need)?;
            let disk = crate::disk::open_disk(&path, &DiskOptions::default())?;
            let pool_id = self.store.pool()?.pool_id;
            if let Ok(sb) = read_superblock(disk.as_ref())
                && sb.pool.pool_id != pool_id
            {
                return Err(PoolError::Invalid(format!(
                    "{} holds a disk of another shardvol pool ({}); wipe it first if it is really free",
                    path.display(),
                    hex(&sb.pool.pool_id)
                )));
            }
            // Nothing of the new disk is used until the cursor passes it: cursor at the start.
            self.health.set_cursor(id, 0, 0);
            self.health.replace(id, disk);
            self.health.set_state(id, DiskState::Rebuilding);
            rec.state = DiskState::Rebuilding;
            self.store.put_disk(&rec)?;
            save_disk_health(&self.store, &self.health, id);
            rewrite_superblocks(&self.store, &self.health)?;
            info!(disk = id.0, path = %path.display(), "disk replaced; rebuilding its chunks");
        } else {
            let (v, s) = self.health.cursor(id);
            info!(disk = id.0, path = %path.display(), volume = v, stripe = s, "resuming the rebuild");
        }
        let mut report = RebuildReport {
            disk: id.0,
            path: path.display().to_string(),
            resumed: resume,
            ..Default::default()
        };
        let mut vols: Vec<_> = self.volumes.values().cloned().collect();
        vols.sort_by_key(|v| v.record().id);
        let total: u64 = vols.iter().map(|v| v.stripe_count()).sum();
        let (cv, cs) = self.health.cursor(id);
        let mut done: u64 = vols
            .iter()
            .filter(|v| v.record().id < cv)
            .map(|v| v.stripe_count())
            .sum();
        let mut saved = Instant::now();
        let raw = || self.health.disk(id);
        // The cursor becomes durable only after what it covers is.
        let save_cursor = || -> Result<(), PoolError> {
            if let Some(d) = raw() {
                crate::disk::sync(d.as_ref())?;
            }
            save_disk_health(&self.store, &self.health, id);
            Ok(())
        };
        for v in &vols {
            let vid = v.record().id;
            if vid < cv {
                continue;
            }
            let from = if vid == cv { cs } else { 0 };
            done += from.min(v.stripe_count());
            if from == 0 {
                self.health.set_cursor(id, vid, 0);
            }
            for s in from..v.stripe_count() {
                if opts.stop.as_ref().is_some_and(|f| f.load(Ordering::SeqCst)) {
                    save_cursor()?;
                    report.seconds = started.elapsed().as_secs_f64();
                    info!(
                        disk = id.0,
                        "rebuild stopped; it resumes with the same command"
                    );
                    return Ok(report);
                }
                let r = v.rebuild_stripe(id, StripeId(s)).inspect_err(|_| {
                    let _ = save_cursor();
                })?;
                if r.placed {
                    report.chunks += 1;
                }
                report.bytes_read += r.bytes_read;
                report.bytes_written += r.bytes_written;
                report.unrecoverable += r.unrecoverable;
                done += 1;
                if saved.elapsed() >= CURSOR_EVERY {
                    save_cursor()?;
                    saved = Instant::now();
                }
                progress(Progress::at(
                    done,
                    total,
                    report.bytes_read + report.bytes_written,
                    started,
                ));
                pace(report.bytes_read, opts.rate_bytes_per_s, started);
            }
            // The whole volume is on the new disk now.
            self.health.set_cursor(id, vid + 1, 0);
        }
        if let Some(d) = raw() {
            crate::disk::sync(d.as_ref())?;
        }
        self.health.set_state(id, DiskState::Ok);
        rec.state = DiskState::Ok;
        self.store.put_disk(&rec)?;
        save_disk_health(&self.store, &self.health, id);
        rewrite_superblocks(&self.store, &self.health)?;
        for v in &vols {
            if let Err(e) = v.destage_now() {
                warn!(volume = %v.name(), error = %e, "destaging after the rebuild failed; the destager retries");
            }
        }
        report.completed = true;
        report.seconds = started.elapsed().as_secs_f64();
        self.audit(
            crate::audit::EventKind::DiskReplaced,
            crate::audit::fields([
                ("disk", id.0.to_string()),
                ("path", path.display().to_string()),
                ("chunks", report.chunks.to_string()),
                ("unrecoverable", report.unrecoverable.to_string()),
            ]),
        )?;
        info!(
            disk = id.0,
            chunks = report.chunks,
            unrecoverable = report.unrecoverable,
            seconds = report.seconds,
            "rebuild finished; the disk is in service"
        );
        Ok(report)
    }

    /// Health of the open pool's disks (live states and counters) and its volumes' last
    /// scrubs, for `status`.
    pub fn health_view(&self) -> Result<HealthView, PoolError> {
        let mut view = health_view_of(&self.store)?;
        for id in self.health.ids() {
            let state = self.health.state(id);
            view.disks.insert(
                id.0,
                DiskHealthView {
                    state: state_name(state).into(),
                    counters: self.health.counters(id),
                    rebuild: rebuild_status(state, Some(self.health.cursor(id)), &self.store),
                },
            );
        }
        Ok(view)
    }
}

/// What `status` shows of the disks' health and the volumes' scrubs.
#[derive(Clone, Debug, Default)]
pub struct HealthView {
    /// By disk id.
    pub disks: BTreeMap<u32, DiskHealthView>,
    /// Last scrub, by volume name.
    pub scrubs: BTreeMap<String, ScrubSummary>,
}

impl HealthView {
    /// State of a volume with `m` parity chunks: "ok", "degraded" (some disks failed or
    /// rebuilding, at most `m`: everything is served) or "failed" (more than `m` disks out:
    /// the stripes placed on them give I/O errors).
    pub fn volume_state(&self, m: u16) -> &'static str {
        match self.disks.values().filter(|d| d.state != "ok").count() {
            0 => "ok",
            n if n <= usize::from(m) => "degraded",
            _ => "failed",
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DiskHealthView {
    /// "ok", "failed" or "rebuilding".
    pub state: String,
    pub counters: DiskCounters,
    pub rebuild: Option<RebuildStatus>,
}

/// Rebuild progress of a disk.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RebuildStatus {
    /// The cursor: volume id and stripe.
    pub volume: u64,
    pub stripe: u64,
    /// Stripes done over the stripes of every volume, in percent.
    pub percent: f64,
}

fn state_name(s: DiskState) -> &'static str {
    match s {
        DiskState::Ok => "ok",
        DiskState::Failed => "failed",
        DiskState::Rebuilding => "rebuilding",
    }
}

fn rebuild_status(
    state: DiskState,
    cursor: Option<(u64, u64)>,
    store: &MetaStore,
) -> Option<RebuildStatus> {
    if state != DiskState::Rebuilding {
        return None;
    }
    let (v, s) = cursor.unwrap_or((0, 0));
    let vols = store.volumes().ok()?;
    let total: u64 = vols.iter().map(|x| x.geometry.stripes_for(x.size)).sum();
    let done: u64 = vols
        .iter()
        .map(|x| {
            let n = x.geometry.stripes_for(x.size);
            match x.id.cmp(&v) {
                std::cmp::Ordering::Less => n,
                std::cmp::Ordering::Equal => s.min(n),
                std::cmp::Ordering::Greater => 0,
            }
        })
        .sum();
    Some(RebuildStatus {
        volume: v,
        stripe: s,
        percent: if total == 0 {
            100.0
        } else {
            done as f64 * 100.0 / total as f64
        },
    })
}

/// Health of a stopped pool's disks and its volumes' last scrubs, from the store alone (no
/// key, no disk I/O).
pub fn health_view(dir: &Path) -> Result<HealthView, PoolError> {
    let path = dir.join(STORE_FILE);
    if !path.exists() {
        return Err(PoolError::Invalid(format!(
            "{} is not a shardvol pool (no {STORE_FILE})",
            dir.display()
        )));
    }
    health_view_of(&MetaStore::open(&path)?)
}

fn health_view_of(store: &MetaStore) -> Result<HealthView, PoolError> {
    let healths: BTreeMap<u32, DiskHealthRecord> = store.disk_healths()?.into_iter().collect();
    let by_id: BTreeMap<u64, ScrubSummary> = store.scrubs()?.into_iter().collect();
    let disks = store
        .disks()?
        .into_iter()
        .map(|d| {
            let h = healths.get(&d.id.0).copied().unwrap_or_default();
            (
                d.id.0,
                DiskHealthView {
                    state: state_name(d.state).into(),
                    counters: h.counters,
                    rebuild: rebuild_status(d.state, h.cursor, store),
                },
            )
        })
        .collect();
    let scrubs = store
        .volumes()?
        .into_iter()
        .filter_map(|v| by_id.get(&v.id).map(|s| (v.name, s.clone())))
        .collect();
    Ok(HealthView { disks, scrubs })
}

pub(super) fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Whether two paths name the same file (the same inode when both exist).
pub(super) fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => absolute(a) == absolute(b),
    }
}
