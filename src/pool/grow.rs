//! Growing a pool: `shardvol disk add` records a new disk and rebalances every volume onto the
//! grown disk table (`volume::rebalance` moves the stripes; this module does the pool's part).
//!
//! Order of a new add, each step durable before the next:
//! 1. the new disk is sized (a file grows sparse) and gets a superblock that already lists it
//!    and the volumes' rebalance records, so a restart at any later point opens it;
//! 2. one store transaction adds the disk and gives every volume its rebalance record (the old
//!    disk table, cursor 0) and its pinned journal disks (the journal never moves);
//! 3. every disk's superblock is rewritten; the volumes switch to two tables and a cursor;
//! 4. the volumes are rebalanced one after the other, stripe batch by stripe batch, each batch's
//!    cursor committed to the store and the superblocks before anything is written over the new
//!    table. Progress is reported per batch, and the rate can be limited.
//!
//! A rebalance that stops (a stop request, an error, a restart) is in force as it is: stripes
//! below each volume's cursor use the new table, the others the old one. Running `disk add`
//! with the same path resumes it; a served pool also resumes it by itself (the healer).
//!
//! Refused: adding while a disk is failed or rebuilding (replace it first: a rebalance writes
//! every disk), a second add while a rebalance is in progress, a path that already is a disk of
//! the pool or holds a shardvol superblock.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tracing::info;

use super::heal::{Running, absolute, rewrite_superblocks, same_file};
use super::{Pool, PoolError, audit_fields, hex, placement_table, read_superblock, size_disk};
use crate::audit::EventKind;
use crate::disk::DiskOptions;
use crate::layout::DiskId;
use crate::layout::placement::Placement;
use crate::meta::{DiskRecord, DiskState, Rebalance, Superblock, VolumeRecord, write_superblock};
use crate::volume::Volume;
use crate::volume::rebalance::STEP_STRIPES;
use crate::volume::scrub::{Progress, pace};

/// The job name of a rebalance in the registry of running jobs.
const JOB: &str = "rebalance";

/// Options of `disk add`.
#[derive(Clone, Debug, Default)]
pub struct AddOptions {
    /// Failure domain of the new disk (default: its path).
    pub domain: Option<String>,
    /// Most bytes moved per second (0: no limit).
    pub rate_bytes_per_s: u64,
    /// Set to stop after the batch in progress (its cursor is durable; `disk add` resumes).
    pub stop: Option<Arc<AtomicBool>>,
}

/// What `disk add` did.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AddReport {
    pub disk: u32,
    pub path: String,
    pub domain: String,
    /// Whether it resumed a rebalance that had stopped.
    pub resumed: bool,
    /// False when stopped before the end.
    pub completed: bool,
    /// Stripes the cursors passed (all volumes).
    pub stripes: u64,
    /// Stripes rewritten over the new table (they held data and their placement changed).
    pub moved: u64,
    /// Chunk positions whose disk changed.
    pub chunks_moved: u64,
    /// Bytes of data moved.
    pub bytes: u64,
    pub seconds: f64,
}

/// Rebalance progress of a pool, for `status`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RebalanceStatus {
    /// The disk being added.
    pub disk: u32,
    /// Stripes moved over all stripes of every volume, in percent.
    pub percent: f64,
}

/// The rebalance of a pool from its store: the disk being added and the progress, or `None`.
pub fn rebalance_status(store: &crate::meta::MetaStore) -> Option<RebalanceStatus> {
    let vols = store.volumes().ok()?;
    let from = vols.iter().find_map(|v| v.rebalance.as_ref())?.from.clone();
    let disk = store
        .disks()
        .ok()?
        .into_iter()
        .map(|d| d.id)
        .find(|id| !from.contains(id))?;
    let total: u64 = vols.iter().map(|v| v.geometry.stripes_for(v.size)).sum();
    let done: u64 = vols
        .iter()
        .map(|v| {
            let n = v.geometry.stripes_for(v.size);
            v.rebalance.as_ref().map_or(n, |r| r.cursor.min(n))
        })
        .sum();
    Some(RebalanceStatus {
        disk: disk.0,
        percent: if total == 0 {
            100.0
        } else {
            done as f64 * 100.0 / total as f64
        },
    })
}

/// [`rebalance_status`] of a stopped pool's store.
pub fn rebalance_view(dir: &Path) -> Option<RebalanceStatus> {
    let path = dir.join(super::STORE_FILE);
    rebalance_status(&crate::meta::MetaStore::open(&path).ok()?)
}

impl Pool {
    /// Whether a rebalance of this pool runs in this process now.
    pub fn rebalance_running(&self) -> bool {
        Running::is_running(&self.dir, JOB.into())
    }

    /// Whether a rebalance is in progress (running or stopped).
    pub fn rebalance_pending(&self) -> bool {
        self.volumes
            .values()
            .any(|v| v.rebalance_cursor().is_some())
    }

    /// Connects every volume's rebalance commits to the superblocks (at open).
    pub(super) fn install_rebalance_hooks(&self) -> Result<(), PoolError> {
        for v in self.volumes.values() {
            let (store, health) = (self.store.clone(), self.health.clone());
            v.set_rebalance_hook(Arc::new(move || {
                rewrite_superblocks(&store, &health).map_err(|e| e.to_string())
            }));
        }
        if self.rebalance_pending() {
            // The store may be ahead of the superblocks after a crash between the two commits.
            rewrite_superblocks(&self.store, &self.health)?;
            info!(
                "a rebalance is in progress; it resumes in the background or with `shardvol disk add`"
            );
        }
        Ok(())
    }

    /// Adds the disk at `path` and rebalances every volume onto it, or resumes the rebalance
    /// when `path` is the disk being added (see the module docs). `progress` is called after
    /// every batch.
    pub fn add_disk(
        &self,
        path: &Path,
        opts: &AddOptions,
        progress: &dyn Fn(Progress),
    ) -> Result<AddReport, PoolError> {
        let started = Instant::now();
        let _running = Running::claim(
            &self.dir,
            JOB.into(),
            "a rebalance of this pool is already running (`shardvol status` shows it)",
        )?;
        let path = absolute(path);
        let table = self.store.disks()?;
        let pending = self.rebalance_pending();
        let existing = table.iter().find(|d| same_file(&d.path, &path)).cloned();
        let (rec, resumed) = match existing {
            Some(d) if pending && self.is_being_added(d.id)? => {
                if let Some(dom) = &opts.domain
                    && *dom != d.domain
                {
                    return Err(PoolError::Invalid(format!(
                        "disk {} joined the pool in domain {:?}, not {dom:?}",
                        d.id, d.domain
                    )));
                }
                info!(disk = d.id.0, path = %path.display(), "resuming the rebalance");
                (d, true)
            }
            Some(d) => {
                return Err(PoolError::Invalid(format!(
                    "{} is already disk {} of this pool",
                    path.display(),
                    d.id
                )));
            }
            None if pending => {
                let adding = table
                    .iter()
                    .find(|d| self.is_being_added(d.id).unwrap_or(false));
                return Err(PoolError::Invalid(format!(
                    "a rebalance onto {} is in progress; let it finish (or resume it with `shardvol disk add --pool {} {}`) before adding another disk",
                    adding.map_or_else(|| "a new disk".into(), |d| d.path.display().to_string()),
                    self.dir.display(),
                    adding.map_or_else(String::new, |d| d.path.display().to_string()),
                )));
            }
            None => (self.join(&path, &table, opts)?, false),
        };
        let mut report = AddReport {
            disk: rec.id.0,
            path: rec.path.display().to_string(),
            domain: rec.domain.clone(),
            resumed,
            ..Default::default()
        };
        let mut vols: Vec<_> = self.volumes.values().cloned().collect();
        vols.sort_by_key(|v| v.record().id);
        let total: u64 = vols.iter().map(|v| v.stripes()).sum();
        let mut done: u64 = vols
            .iter()
            .map(|v| v.rebalance_cursor().unwrap_or(v.stripes()))
            .sum();
        for v in &vols {
            while v.rebalance_cursor().is_some() {
                if opts.stop.as_ref().is_some_and(|f| f.load(Ordering::SeqCst)) {
                    report.seconds = started.elapsed().as_secs_f64();
                    info!(
                        disk = rec.id.0,
                        "rebalance stopped; it resumes with the same command"
                    );
                    return Ok(report);
                }
                let before = v.rebalance_cursor().unwrap_or(0);
                let r = v.rebalance_step(STEP_STRIPES)?;
                done += r.cursor.saturating_sub(before).max(if r.finished {
                    v.stripes().saturating_sub(before)
                } else {
                    0
                });
                report.stripes += r.stripes;
                report.moved += r.moved;
                report.chunks_moved += r.chunks_moved;
                report.bytes += r.bytes;
                progress(Progress::at(done.min(total), total, report.bytes, started));
                pace(report.bytes, opts.rate_bytes_per_s, started);
            }
        }
        report.completed = true;
        report.seconds = started.elapsed().as_secs_f64();
        self.audit(
            EventKind::DiskAdded,
            audit_fields([
                ("disk", rec.id.0.to_string()),
                ("path", rec.path.display().to_string()),
                ("domain", rec.domain.clone()),
                ("outcome", "rebalanced".to_string()),
                ("stripes_moved", report.moved.to_string()),
            ]),
        )?;
        info!(
            disk = rec.id.0,
            moved = report.moved,
            seconds = report.seconds,
            "rebalance finished; every volume uses the new disk"
        );
        Ok(report)
    }

    /// Whether disk `id` is the one a rebalance in progress is adding.
    fn is_being_added(&self, id: DiskId) -> Result<bool, PoolError> {
        Ok(self
            .store
            .volumes()?
            .iter()
            .find_map(|v| v.rebalance.as_ref())
            .is_some_and(|r| !r.from.contains(&id)))
    }

    /// Steps 1–3 of the module docs: the disk joins the pool and the volumes switch to two
    /// tables. Returns the new disk's record.
    fn join(
        &self,
        path: &Path,
        table: &[DiskRecord],
        opts: &AddOptions,
    ) -> Result<DiskRecord, PoolError> {
        if let Some(d) = table
            .iter()
            .find(|d| self.health.state(d.id) != DiskState::Ok)
        {
            return Err(PoolError::Invalid(format!(
                "disk {} ({}) is not in service: replace it first (`shardvol disk replace`); a rebalance needs every disk",
                d.id,
                d.path.display()
            )));
        }
        let id = DiskId(table.iter().map(|d| d.id.0 + 1).max().unwrap_or(0));
        let mut rec = DiskRecord {
            id,
            path: path.to_path_buf(),
            domain: opts
                .domain
                .clone()
                .unwrap_or_else(|| path.display().to_string()),
            size: 0,
            state: DiskState::Ok,
        };
        let need = self.disk_bytes_needed();
        let pool = self.store.pool()?;
        if let Ok(disk) = crate::disk::open_disk(path, &DiskOptions::default())
            && let Ok(sb) = read_superblock(disk.as_ref())
        {
            return Err(PoolError::Invalid(if sb.pool.pool_id == pool.pool_id {
                format!(
                    "{} holds a superblock of this pool (it was disk {}); wipe it first if it is really free",
                    path.display(),
                    sb.disk_id
                )
            } else {
                format!(
                    "{} holds a disk of another shardvol pool ({}); wipe it first if it is really free",
                    path.display(),
                    hex(&sb.pool.pool_id)
                )
            }));
        }
        size_disk(&mut rec, need)?;
        let disk = crate::disk::open_disk(path, &DiskOptions::default())?;

        let old_table = placement_table(table);
        let mut grown = table.to_vec();
        grown.push(rec.clone());
        let new_table = placement_table(&grown);
        let mut volumes: Vec<VolumeRecord> = Vec::new();
        for mut v in self.store.volumes()? {
            Placement::new(v.placement_seed, new_table.clone())
                .and_then(|p| p.place(crate::layout::StripeId(0), v.geometry.width()))
                .map_err(|e| PoolError::Invalid(format!("volume {}: {e}", v.name)))?;
            if v.journal_disks.is_empty() {
                let old = Placement::new(v.placement_seed, old_table.clone())
                    .map_err(|e| PoolError::Invalid(e.to_string()))?;
                v.journal_disks = Volume::journal_disks(&old, &v)?;
            }
            v.rebalance = Some(Rebalance {
                from: table.iter().map(|d| d.id).collect(),
                cursor: 0,
            });
            volumes.push(v);
        }
        // 1. The new disk's superblock first, already describing the grown pool.
        let seq = self
            .health
            .ids()
            .into_iter()
            .filter_map(|i| self.health.disk(i))
            .filter_map(|d| read_superblock(d.as_ref()).ok().map(|s| s.seq))
            .max()
            .unwrap_or(0)
            + 1;
        let sb = Superblock {
            seq,
            disk_id: id,
            pool,
            disks: grown,
            volumes: volumes.clone(),
            keys: crate::lifecycle::keys_with_wrapped(&self.store)?,
        };
        write_superblock(disk.as_ref(), &sb)?;
        // 2. One transaction: the disk and every volume's rebalance record.
        self.store.add_disk_with_volumes(&rec, &volumes)?;
        // 3. The registry, every superblock, then the volumes' tables.
        self.health.add(id, disk);
        rewrite_superblocks(&self.store, &self.health)?;
        for v in self.volumes.values() {
            v.begin_rebalance(new_table.clone())?;
        }
        info!(disk = id.0, path = %path.display(), domain = %rec.domain, "disk added; rebalancing the volumes onto it");
        Ok(rec)
    }
}
