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
use crate::kms::policy::KeyPolicy;
use crate::kms::unlock::{Step, UnlockSession};
use crate::kms::{self, KmsError, LoadedShare};
use crate::lifecycle::{RotationProgress, RotationTask};
use crate::meta::MetaStore;
use crate::nbd::{Export, ExportTable};
use crate::pool::{self, Pool, PoolError, STORE_FILE};
use crate::volume::BlockDevice;

mod audit;
pub mod heal;

pub use audit::{AuditVerifyOutput, audit_show_lines, audit_verify_output};

/// A pool served by this process.
pub struct Service {
    pub dir: PathBuf,
    pub config: Config,
    pub exports: Arc<ExportTable>,
    read_only: bool,
    pool: RwLock<Option<Arc<Pool>>>,
    /// The unlock session of a sealed server: shares given so far (`shardvol unlock`).
    session: Mutex<Option<UnlockSession>>,
    /// The key policy of `config` (rotation, unlock windows).
    policy: KeyPolicy,
    /// The background rotation task of the open pool.
    rotation: Mutex<Option<RotationTask>>,
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
            policy: KeyPolicy::from_config(&config),
            config,
            exports: Arc::new(ExportTable::empty()),
            read_only,
            pool: RwLock::new(None),
            session: Mutex::new(None),
            rotation: Mutex::new(None),
        }))
    }

    /// The open pool, if unlocked.
    pub fn pool(&self) -> Option<Arc<Pool>> {
        self.pool.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn is_sealed(&self) -> bool {
        self.pool().is_none()
    }

    /// Unlocks with share files given at start (`--share`). The access windows apply.
    pub fn unlock_with_files(&self, files: &[PathBuf]) -> Result<(), PoolError> {
        let shares: Vec<LoadedShare> = files
            .iter()
            .map(|p| kms::load_share_file(p))
            .collect::<Result<_, _>>()?;
        let mut slot = self.pool.write().unwrap_or_else(|p| p.into_inner());
        if slot.is_some() {
            return Ok(());
        }
        let p = Pool::open_loaded_with(&self.dir, &shares, &self.policy)?;
        self.export(&mut slot, p)
    }

    /// Adds one share (the text of a share file) to a sealed server's unlock session; opens the
    /// pool when the threshold is met. A corrupt, foreign or repeated share is refused on its
    /// own (the shares given before it stay); outside the access windows every share is refused
    /// and the session is emptied; partial progress older than `unlock.timeout` is discarded.
    pub fn add_share(&self, text: &str, origin: &str) -> Result<UnlockProgress, PoolError> {
        if let Some(p) = self.pool() {
            let need = usize::from(p.store.pool()?.threshold);
            return Ok(UnlockProgress {
                have: need,
                need,
                unlocked: true,
            });
        }
        let store = Arc::new(MetaStore::open(&self.dir.join(STORE_FILE))?);
        let audit = crate::audit::AuditLog::open(&self.dir, store.clone());
        let attempt = |index: &str, outcome: &str, reason: &str| {
            let f = crate::audit::fields([
                ("share", index.to_string()),
                ("origin", origin.to_string()),
                ("outcome", outcome.to_string()),
                ("reason", reason.to_string()),
            ]);
            if let Err(e) = audit.append(crate::audit::EventKind::UnlockAttempt, f, None) {
                warn!(error = %e, "cannot record the unlock attempt in the audit log");
            }
        };
        let share = match kms::parse_share_file(text, Path::new(origin)) {
            Ok(s) => s,
            Err(e) => {
                attempt("?", "refused", &e.to_string());
                return Err(e.into());
            }
        };
        let index = share.index.to_string();
        let loaded = LoadedShare {
            source: origin.to_string(),
            share,
        };
        let mut session = self.session.lock().unwrap_or_else(|p| p.into_inner());
        let rec = store.pool()?;
        let s = session.get_or_insert_with(|| {
            UnlockSession::new(
                rec.pool_id,
                rec.split_id,
                rec.threshold,
                self.policy.unlock.clone(),
            )
        });
        let now = crate::now_unix();
        let (before, need) = s.progress(now);
        let mut given = s.given();
        given.push(loaded.share.index);
        match s.add(loaded, now) {
            Ok(Step::Progress { have, need }) => {
                info!(have, need, "unlock share accepted");
                attempt(&index, "accepted", &format!("{have} of {need}"));
                Ok(UnlockProgress {
                    have: usize::from(have),
                    need: usize::from(need),
                    unlocked: false,
                })
            }
            Ok(Step::Complete(kek)) => {
                *session = None;
                drop(session);
                attempt(&index, "accepted", &format!("{need} of {need}"));
                let mut slot = self.pool.write().unwrap_or_else(|p| p.into_inner());
                if slot.is_some() {
                    return Ok(UnlockProgress {
                        have: usize::from(need),
                        need: usize::from(need),
                        unlocked: true,
                    });
                }
                let shares = given
                    .iter()
                    .map(u8::to_string)
                    .collect::<Vec<_>>()
                    .join(",");
                drop(audit);
                let p = Pool::open_unlocked(&self.dir, store, kek, &self.policy, &shares)
                    .inspect_err(|e| {
                        warn!(error = %e, "the shares given do not open the pool; the unlock starts over");
                        if let Ok(st) = MetaStore::open(&self.dir.join(STORE_FILE)) {
                            let audit = crate::audit::AuditLog::open(&self.dir, Arc::new(st));
                            pool::audit_unlock_refused(&audit, &shares, e);
                        }
                    })?;
                self.export(&mut slot, p)?;
                Ok(UnlockProgress {
                    have: usize::from(need),
                    need: usize::from(need),
                    unlocked: true,
                })
            }
            Err(e) => {
                if let KmsError::Policy(r) = &e {
                    drop(session);
                    pool::audit_policy_refusal(&audit, &index, r);
                } else {
                    attempt(&index, "refused", &e.to_string());
                    if before > 0 && s.progress(now).0 == 0 {
                        warn!(discarded = before, "unlock progress discarded");
                    }
                }
                Err(e.into())
            }
        }
    }

    /// Exports the volumes of a newly opened pool and starts its rotation task.
    fn export(&self, slot: &mut Option<Arc<Pool>>, p: Pool) -> Result<(), PoolError> {
        let p = Arc::new(p);
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
        if !self.read_only {
            let task = RotationTask::start(p.keys.clone(), p.volumes.values().cloned().collect())?;
            *self.rotation.lock().unwrap_or_else(|p| p.into_inner()) = Some(task);
        }
        info!(volumes = p.volumes.len(), "pool unlocked; volumes exported");
        *slot = Some(p);
        Ok(())
    }

    /// Stops exporting and closes the pool (destage, checkpoint). Idempotent.
    pub fn close(&self) -> Result<(), PoolError> {
        let _ = self.exports.set(Vec::new());
        if let Some(t) = self
            .rotation
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            t.stop();
        }
        let p = self.pool.write().unwrap_or_else(|p| p.into_inner()).take();
        match p {
            Some(p) => {
                let closed = p.close();
                // The keys leave memory with the pool: the server is sealed from here on.
                p.keys.record(
                    crate::audit::EventKind::Seal,
                    crate::audit::fields([(
                        "outcome",
                        if closed.is_ok() { "clean" } else { "error" }.to_string(),
                    )]),
                );
                closed
            }
            None => Ok(()),
        }
    }

    /// The pool's status as `shardvol status` prints it.
    pub fn status(&self) -> Result<Status, PoolError> {
        match self.pool() {
            Some(p) => Ok(Status::of_open(&self.dir, &p, self.config.scrub.interval.0)),
            None => {
                let mut s = Status::offline(&self.dir)?;
                s.state = "sealed".into();
                let have = self
                    .session
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .as_mut()
                    .map_or(0, |x| usize::from(x.progress(crate::now_unix()).0));
                s.unlock = Some(UnlockProgress {
                    have,
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
        let s = self.clone();
        h.add(
            crate::lifecycle::commands::CONTROL_COMMAND,
            move |args: &Value, p: &Progress| {
                let cmd: crate::lifecycle::commands::KeyCommand =
                    serde_json::from_value(args.clone())
                        .map_err(|e| format!("malformed key command: {e}"))?;
                let pool = s.pool().ok_or(
                    "the server is sealed: unlock it first (`shardvol unlock --pool DIR --share FILE`)",
                )?;
                crate::lifecycle::commands::run(&pool, &cmd, &|v| p.send(v))
                    .map_err(|e| e.to_string())
            },
        );
        h.add("ping", |_, _| Ok(json!("pong")));
        heal::register(&mut h, self);
        audit::register(self, &mut h);
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
    /// Background re-encryption of an open pool: the key epoch and the rotation task's progress.
    #[serde(default)]
    pub keys: Option<KeysStatus>,
    /// A rebalance after `disk add` in progress: the disk being added and the progress.
    #[serde(default)]
    pub rebalance: Option<pool::RebalanceStatus>,
}

/// Key rotation as `status` shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KeysStatus {
    /// Master key version and epoch of new writes.
    pub write_version: u32,
    pub write_epoch: u32,
    pub rotation: RotationProgress,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VolumeStatus {
    pub name: String,
    pub size: u64,
    /// "ok", "degraded" (a disk of the pool failed) or "failed".
    pub state: String,
    pub allocated_bytes: u64,
    /// Journal size per journal disk.
    #[serde(default)]
    pub journal_size_bytes: u64,
    /// Journal in use (only known while the volume is open).
    pub journal_used_bytes: Option<u64>,
    pub counters: Option<VolumeCounters>,
    /// The volume's last scrub.
    #[serde(default)]
    pub last_scrub: Option<pool::ScrubSummary>,
    /// When the next scheduled scrub is due (seconds since the epoch); known only to a running
    /// server with `[scrub] interval` set.
    #[serde(default)]
    pub next_scrub_unix: Option<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize, Default)]
pub struct VolumeCounters {
    pub blocks_written: u64,
    pub blocks_read: u64,
    pub blocks_reconstructed: u64,
    pub blocks_repaired: u64,
    pub rollbacks_detected: u64,
    pub stripes_destaged: u64,
    /// Whole stripes written into empty stripes without the journal.
    #[serde(default)]
    pub stripes_written_whole: u64,
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
                    journal_size_bytes: v.journal_size,
                    journal_used_bytes: None,
                    counters: None,
                    last_scrub: health.scrubs.get(&v.name).cloned(),
                    next_scrub_unix: None,
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
            keys: None,
            rebalance: pool::rebalance_view(dir),
        })
    }

    /// Status of an open pool, with live counters; `scrub_interval` is `[scrub] interval`.
    pub fn of_open(dir: &Path, p: &Pool, scrub_interval: std::time::Duration) -> Self {
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
        let (write_version, write_epoch) = p.keys.write_key();
        Status {
            rebalance: pool::rebalance_status(&p.store),
            keys: Some(KeysStatus {
                write_version,
                write_epoch,
                rotation: p.keys.progress(),
            }),
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
                    let last_scrub = health.scrubs.get(v.name()).cloned();
                    VolumeStatus {
                        name: v.name().to_string(),
                        size: v.record().size,
                        state: health.volume_state(v.record().geometry.m).into(),
                        allocated_bytes: v.allocated_blocks() * 4096,
                        journal_size_bytes: v.record().journal_size,
                        journal_used_bytes: Some(v.journal_used()),
                        counters: Some(VolumeCounters {
                            blocks_written: s.blocks_written.load(Relaxed),
                            blocks_read: s.blocks_read.load(Relaxed),
                            blocks_reconstructed: s.blocks_reconstructed.load(Relaxed),
                            blocks_repaired: s.blocks_repaired.load(Relaxed),
                            rollbacks_detected: s.rollbacks_detected.load(Relaxed),
                            stripes_destaged: s.stripes_destaged.load(Relaxed),
                            stripes_written_whole: s.fresh_stripe_writes.load(Relaxed),
                            destage_errors: s.destage_errors.load(Relaxed),
                        }),
                        next_scrub_unix: heal::next_scrub_unix(
                            last_scrub.as_ref().map(|s| s.finished_unix),
                            v.record().created_unix,
                            scrub_interval,
                        ),
                        last_scrub,
                    }
                })
                .collect(),
            disks,
        }
    }
}
