//! The server runtime: one pool, sealed or unlocked, its NBD exports and its control commands.
//!
//! `shardvol serve --pool DIR` without shares starts **sealed**: it listens for NBD clients and
//! on the control socket, but exports nothing (OPT_LIST and OPT_GO see no volume) until the
//! pool is unlocked, by share holders running `shardvol unlock` (each adds one share over the
//! control socket) or, at start, by `--share` files. Once unlocked the volumes are opened, their
//! journals replayed, and every volume is exported by name.
//!
//! Admin commands reach the service through [`Service::handlers`] (see `crate::control`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tracing::{info, warn};

use crate::config::Config;
use crate::control::{Handlers, Progress};
use crate::kms::{self, LoadedShare};
use crate::meta::MetaStore;
use crate::nbd::{Export, ExportTable};
use crate::pool::{self, Pool, PoolError, STORE_FILE};
use crate::volume::BlockDevice;

pub mod heal;

/// A pool served by this process.
pub struct Service {
    pub dir: PathBuf,
    pub config: Config,
    pub exports: Arc<ExportTable>,
    read_only: bool,
    pool: RwLock<Option<Arc<Pool>>>,
    /// Shares given so far to a sealed server (`shardvol unlock`), with when the first arrived.
    pending: Mutex<Pending>,
}

#[derive(Default)]
struct Pending {
    shares: Vec<LoadedShare>,
    since: Option<std::time::Instant>,
}

/// Progress of an unlock: how many distinct valid shares the server holds and how many it needs.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct UnlockProgress {
    pub have: usize,
    pub need: usize,
    pub unlocked: bool,
}

impl Service {
    /// A sealed service for the pool in `dir` (checked to be a pool; nothing is decrypted).
    pub fn new(dir: &Path, config: Config, read_only: bool) -> Result<Arc<Self>, PoolError> {
        if !pool::exists(dir) {
            return Err(PoolError::Invalid(format!(
                "{} is not a shardvol pool (no {STORE_FILE}); create one with `shardvol create --pool {}`",
                dir.display(),
                dir.display()
            )));
        }
        Ok(Arc::new(Self {
            dir: dir.to_path_buf(),
            config,
            exports: Arc::new(ExportTable::empty()),
            read_only,
            pool: RwLock::new(None),
            pending: Mutex::new(Pending::default()),
        }))
    }

    /// The open pool, if unlocked.
    pub fn pool(&self) -> Option<Arc<Pool>> {
        self.pool.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn is_sealed(&self) -> bool {
        self.pool().is_none()
    }

    /// Unlocks with share files given at start (`--share`).
    pub fn unlock_with_files(&self, files: &[PathBuf]) -> Result<(), PoolError> {
        let shares: Vec<LoadedShare> = files
            .iter()
            .map(|p| kms::load_share_file(p))
            .collect::<Result<_, _>>()?;
        self.open_with(&shares)
    }

    /// Adds one share (the text of a share file) to a sealed server; opens the pool when the
    /// threshold is met. A corrupt, foreign or repeated share is refused on its own.
    pub fn add_share(&self, text: &str, origin: &str) -> Result<UnlockProgress, PoolError> {
        if let Some(p) = self.pool() {
            let need = usize::from(p.store.pool()?.threshold);
            return Ok(UnlockProgress {
                have: need,
                need,
                unlocked: true,
            });
        }
        let rec = MetaStore::open(&self.dir.join(STORE_FILE))?.pool()?;
        let share = kms::parse_share_file(text, Path::new(origin))?;
        let loaded = LoadedShare {
            source: origin.to_string(),
            share,
        };
        // Alone, a share can be checked against the pool: its pool, split and threshold.
        kms::check_share(&loaded, rec.pool_id, rec.split_id, rec.threshold)?;
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let timeout = self.config.unlock.timeout.0;
        if pending.since.is_some_and(|t| t.elapsed() > timeout) {
            warn!(
                discarded = pending.shares.len(),
                "unlock timed out; the shares given so far are discarded"
            );
            *pending = Pending::default();
        }
        if pending
            .shares
            .iter()
            .any(|s| s.share.index == loaded.share.index)
        {
            return Err(PoolError::Invalid(format!(
                "{origin}: share {} was already given",
                loaded.share.index
            )));
        }
        pending.shares.push(loaded);
        pending.since.get_or_insert_with(std::time::Instant::now);
        let have = pending.shares.len();
        let need = usize::from(rec.threshold);
        info!(have, need, "unlock share accepted");
        if have < need {
            return Ok(UnlockProgress {
                have,
                need,
                unlocked: false,
            });
        }
        let shares = std::mem::take(&mut pending.shares);
        *pending = Pending::default();
        drop(pending);
        self.open_with(&shares)?;
        Ok(UnlockProgress {
            have,
            need,
            unlocked: true,
        })
    }

    fn open_with(&self, shares: &[LoadedShare]) -> Result<(), PoolError> {
        let mut slot = self.pool.write().unwrap_or_else(|p| p.into_inner());
        if slot.is_some() {
            return Ok(());
        }
        let p = Arc::new(Pool::open_loaded(&self.dir, shares)?);
        let exports: Vec<Export> = p
            .volumes
            .values()
            .map(|v| {
                let g = v.record().geometry;
                Export::new(v.name(), v.clone() as Arc<dyn BlockDevice>)
                    .with_description(format!(
                        "shardvol {}+{} chunk {} KiB",
                        g.k,
                        g.m,
                        g.chunk_size / 1024
                    ))
                    .with_read_only(self.read_only)
            })
            .collect();
        self.exports
            .set(exports)
            .map_err(|e| PoolError::Invalid(e.to_string()))?;
        info!(volumes = p.volumes.len(), "pool unlocked; volumes exported");
        *slot = Some(p);
        Ok(())
    }

    /// Stops exporting and closes the pool (destage, checkpoint). Idempotent.
    pub fn close(&self) -> Result<(), PoolError> {
        let _ = self.exports.set(Vec::new());
        let p = self.pool.write().unwrap_or_else(|p| p.into_inner()).take();
        match p {
            Some(p) => p.close(),
            None => Ok(()),
        }
    }

    /// The pool's status as `shardvol status` prints it.
    pub fn status(&self) -> Result<Status, PoolError> {
        match self.pool() {
            Some(p) => Ok(Status::of_open(&self.dir, &p)),
            None => {
                let mut s = Status::offline(&self.dir)?;
                s.state = "sealed".into();
                let pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
                s.unlock = Some(UnlockProgress {
                    have: pending.shares.len(),
                    need: s.threshold,
                    unlocked: false,
                });
                Ok(s)
            }
        }
    }

    /// The control commands of this service.
    pub fn handlers(self: &Arc<Self>) -> Handlers {
        let mut h = Handlers::new();
        let s = self.clone();
        h.add("status", move |_, _| {
            s.status()
                .map_err(|e| e.to_string())
                .and_then(|st| serde_json::to_value(st).map_err(|e| e.to_string()))
        });
        let s = self.clone();
        h.add("unlock", move |args: &Value, _p: &Progress| {
            let text = args
                .get("share")
                .and_then(Value::as_str)
                .ok_or("unlock needs the text of a share file in \"share\"")?;
            let origin = args
                .get("origin")
                .and_then(Value::as_str)
                .unwrap_or("share");
            let pr = s.add_share(text, origin).map_err(|e| e.to_string())?;
            serde_json::to_value(pr).map_err(|e| e.to_string())
        });
        h.add("ping", |_, _| Ok(json!("pong")));
        heal::register(&mut h, self);
        h
    }
}

/// What `shardvol status` shows: per volume and per disk.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    pub pool: String,
    /// "unlocked", "sealed" (a server waits for shares) or "stopped" (no server runs).
    pub state: String,
    pub threshold: usize,
    pub shares: usize,
    pub unlock: Option<UnlockProgress>,
    pub volumes: Vec<VolumeStatus>,
    pub disks: Vec<DiskStatus>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VolumeStatus {
    pub name: String,
    pub size: u64,
    /// "ok", "degraded" (a disk of the pool failed) or "failed".
    pub state: String,
    pub allocated_bytes: u64,
    pub journal_used_bytes: Option<u64>,
    pub counters: Option<VolumeCounters>,
    /// The volume's last scrub.
    #[serde(default)]
    pub last_scrub: Option<pool::ScrubSummary>,
}

#[derive(Clone, Debug, Serialize, Deserialize, Default)]
pub struct VolumeCounters {
    pub blocks_written: u64,
    pub blocks_read: u64,
    pub blocks_reconstructed: u64,
    pub blocks_repaired: u64,
    pub rollbacks_detected: u64,
    pub stripes_destaged: u64,
    pub destage_errors: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DiskStatus {
    pub id: u32,
    pub path: String,
    pub domain: String,
    /// "ok", "failed" or "rebuilding".
    pub state: String,
    /// Errors, tag failures, repairs and rebuilt chunks (persisted across restarts).
    #[serde(default)]
    pub counters: Option<crate::volume::health::DiskCounters>,
    /// Progress of the rebuild of a replacement disk.
    #[serde(default)]
    pub rebuild: Option<pool::RebuildStatus>,
}

impl Status {
    /// Status of a pool no server holds, from its store.
    pub fn offline(dir: &Path) -> Result<Self, PoolError> {
        let info = pool::inspect(dir)?;
        let health = pool::health_view(dir)?;
        Ok(Status {
            pool: dir.display().to_string(),
            state: "stopped".into(),
            threshold: usize::from(info.threshold),
            shares: usize::from(info.shares),
            unlock: None,
            volumes: info
                .volumes
                .iter()
                .map(|v| VolumeStatus {
                    name: v.name.clone(),
                    size: v.size,
                    state: health.volume_state(v.parity_chunks).into(),
                    allocated_bytes: v.allocated_blocks * 4096,
                    journal_used_bytes: None,
                    counters: None,
                    last_scrub: health.scrubs.get(&v.name).cloned(),
                })
                .collect(),
            disks: info
                .disks
                .iter()
                .map(|d| {
                    let h = health.disks.get(&d.id);
                    DiskStatus {
                        id: d.id,
                        path: d.path.clone(),
                        domain: d.domain.clone(),
                        state: d.state.clone(),
                        counters: h.map(|h| h.counters),
                        rebuild: h.and_then(|h| h.rebuild.clone()),
                    }
                })
                .collect(),
        })
    }

    /// Status of an open pool, with live counters.
    pub fn of_open(dir: &Path, p: &Pool) -> Self {
        use std::sync::atomic::Ordering::Relaxed;
        let rec = p.store.pool().ok();
        let health = p.health_view().unwrap_or_default();
        let disks: Vec<DiskStatus> = p
            .store
            .disks()
            .unwrap_or_default()
            .into_iter()
            .map(|d| {
                let h = health.disks.get(&d.id.0);
                DiskStatus {
                    id: d.id.0,
                    path: d.path.display().to_string(),
                    domain: d.domain,
                    state: h.map_or_else(
                        || format!("{:?}", d.state).to_lowercase(),
                        |h| h.state.clone(),
                    ),
                    counters: h.map(|h| h.counters),
                    rebuild: h.and_then(|h| h.rebuild.clone()),
                }
            })
            .collect();
        Status {
            pool: dir.display().to_string(),
            state: "unlocked".into(),
            threshold: rec.as_ref().map_or(0, |r| usize::from(r.threshold)),
            shares: rec.as_ref().map_or(0, |r| usize::from(r.share_count)),
            unlock: None,
            volumes: p
                .volumes
                .values()
                .map(|v| {
                    let s = &v.stats;
                    VolumeStatus {
                        name: v.name().to_string(),
                        size: v.record().size,
                        state: health.volume_state(v.record().geometry.m).into(),
                        allocated_bytes: v.allocated_blocks() * 4096,
                        journal_used_bytes: Some(v.journal_used()),
                        counters: Some(VolumeCounters {
                            blocks_written: s.blocks_written.load(Relaxed),
                            blocks_read: s.blocks_read.load(Relaxed),
                            blocks_reconstructed: s.blocks_reconstructed.load(Relaxed),
                            blocks_repaired: s.blocks_repaired.load(Relaxed),
                            rollbacks_detected: s.rollbacks_detected.load(Relaxed),
                            stripes_destaged: s.stripes_destaged.load(Relaxed),
                            destage_errors: s.destage_errors.load(Relaxed),
                        }),
                        last_scrub: health.scrubs.get(v.name()).cloned(),
                    }
                })
                .collect(),
            disks,
        }
    }
}
