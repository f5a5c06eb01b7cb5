//! The key lifecycle of an open pool: epochs, master key versions, archive and destroy
//! (crypto-shredding), re-splitting the KEK, and the background rotation task
//! ([`rotation`]). `docs/key-lifecycle.md` explains the mechanism and what it guarantees.
//!
//! [`PoolKeys`] holds, for an unlocked pool, the KEK (in memory only), the key ring, the write
//! key that new writes use, and the epoch history. Every administrative change (new master
//! version, archive, destroy, re-split) takes one lock, so two never interleave, and is ordered
//! so that a crash at any step leaves a pool that opens and reads everything:
//!
//! - **rotate-master**: wrapped key into its slot (fsync) → store record `Active` → older
//!   active versions `Retired` → superblocks → write key. A crash before the store commit
//!   leaves an unused slot; after it, the highest `Active` version wins at the next open.
//! - **archive / destroy**: refused while any block (journal included) or any unknown block may
//!   need the version; then every volume destages and reseals its journal checkpoints under the
//!   active version; then the store records the new state; then (destroy) both key slots are
//!   zeroed and fsynced and both superblock slots of every disk are rewritten without it. A
//!   crash after the store commit is finished at the next open ([`PoolKeys::open`] erases the
//!   slots and superblock copies of every destroyed version again).
//! - **reissue**: every live version is wrapped under the new KEK into its second slot (the
//!   old one is protected) → new share files → store commit of the new split id (the switch) →
//!   old slots zeroed → superblocks rewritten twice. Before the commit the old shares open the
//!   pool; after it only the new ones do. A crash after the commit is finished at the next open
//!   (`finish_interrupted`).

pub mod commands;
pub mod rotation;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::audit::{AuditKey, AuditLog, EventKind, Fields, fields};
use crate::crypto::{KeyRing, MasterKey};
use crate::disk::DiskRef;
use crate::kms::epochs::{Epoch, EpochHistory};
use crate::kms::keyslots::KeySlots;
use crate::kms::policy::RotationPolicy;
use crate::kms::{self, Kek, KmsError};
use crate::layout::{DiskId, StripeId};
use crate::meta::{KeyRecord, KeyState, MetaStore};
use crate::now_unix;
use crate::pool::{PoolError, rewrite_superblocks};
use crate::volume::{KeyUsage, Volume, WriteKey};

pub use rotation::{RotationProgress, RotationTask};

/// Key-lifecycle entry holding the epoch history.
const EPOCHS_ENTRY: &str = "epochs";
/// Key-lifecycle entry holding archive and destroy times of master versions.
const KEY_TIMES_ENTRY: &str = "key_times";

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// When a master version was archived or destroyed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyTimes {
    pub archived_unix: Option<u64>,
    pub destroyed_unix: Option<u64>,
}

fn read_json<T: serde::de::DeserializeOwned>(
    store: &MetaStore,
    name: &str,
) -> Result<Option<T>, PoolError> {
    match store.lifecycle_get(name)? {
        None => Ok(None),
        Some(b) => serde_json::from_slice(&b).map(Some).map_err(|e| {
            PoolError::Invalid(format!(
                "{}: key lifecycle entry {name:?} is damaged: {e}",
                store.path().display()
            ))
        }),
    }
}

fn write_json<T: Serialize>(store: &MetaStore, name: &str, v: &T) -> Result<(), PoolError> {
    let bytes = serde_json::to_vec(v)
        .map_err(|e| PoolError::Invalid(format!("cannot encode {name}: {e}")))?;
    Ok(store.lifecycle_put(name, &bytes)?)
}

/// Records the first epoch of a new pool.
pub fn init_store(store: &MetaStore, now: u64) -> Result<(), PoolError> {
    write_json(store, EPOCHS_ENTRY, &EpochHistory::new(now))
}

fn load_epochs(store: &MetaStore) -> Result<EpochHistory, PoolError> {
    Ok(read_json(store, EPOCHS_ENTRY)?.unwrap_or_else(|| EpochHistory::new(now_unix())))
}

fn load_times(store: &MetaStore) -> Result<BTreeMap<u32, KeyTimes>, PoolError> {
    Ok(read_json(store, KEY_TIMES_ENTRY)?.unwrap_or_default())
}

fn pool_dir(store: &MetaStore) -> PathBuf {
    store
        .path()
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// The wrapped bytes of a key record under the current split: from the key-slot file, or from
/// the record itself for pools made before the key-slot file existed.
fn wrapped_of(
    slots: &KeySlots,
    rec: &KeyRecord,
    split_id: &[u8; 16],
) -> Result<Option<Vec<u8>>, PoolError> {
    if rec.state == KeyState::Destroyed {
        return Ok(None);
    }
    if let Some(w) = slots.get(rec.version, split_id)? {
        return Ok(Some(w));
    }
    Ok((!rec.wrapped.is_empty()).then(|| rec.wrapped.clone()))
}

/// The key records with their wrapped bytes filled in (for the superblocks): destroyed versions
/// carry none.
pub fn keys_with_wrapped(store: &MetaStore) -> Result<Vec<KeyRecord>, PoolError> {
    let pool = store.pool()?;
    let slots = KeySlots::in_pool(&pool_dir(store));
    store
        .keys()?
        .into_iter()
        .map(|mut k| {
            k.wrapped = wrapped_of(&slots, &k, &pool.split_id)?.unwrap_or_default();
            Ok(k)
        })
        .collect()
}

/// The version new writes use: the highest `Active` one.
fn active_of(keys: &[KeyRecord]) -> Option<u32> {
    keys.iter()
        .filter(|k| k.state == KeyState::Active)
        .map(|k| k.version)
        .max()
}

/// Unwraps every readable version (`Active`, `Retired`) into a new key ring. The active
/// version must unwrap: that is what proves the KEK ([`KmsError::WrongKek`] otherwise).
pub fn load_ring(store: &MetaStore, kek: &Kek) -> Result<KeyRing, PoolError> {
    let pool = store.pool()?;
    let slots = KeySlots::in_pool(&pool_dir(store));
    let keys = store.keys()?;
    let active = active_of(&keys);
    let ring = KeyRing::new(pool.pool_id);
    for k in &keys {
        if !matches!(k.state, KeyState::Active | KeyState::Retired) {
            continue;
        }
        let Some(w) = wrapped_of(&slots, k, &pool.split_id)? else {
            if Some(k.version) == active {
                return Err(PoolError::Invalid(format!(
                    "the wrapped active master key (version {}) is missing from {}",
                    k.version,
                    slots.path().display()
                )));
            }
            warn!(
                version = k.version,
                "wrapped master key missing; blocks of this version cannot be read"
            );
            continue;
        };
        ring.insert(
            k.version,
            kms::unwrap_master(kek, &w, pool.pool_id, k.version)?,
        );
    }
    Ok(ring)
}

/// One master key version as `key status` shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VersionStatus {
    pub version: u32,
    pub state: String,
    pub created_unix: u64,
    pub archived_unix: Option<u64>,
    pub destroyed_unix: Option<u64>,
    /// For an archived version: when its retention ends and the rotation task destroys it.
    pub destroy_after_unix: Option<u64>,
    /// Live blocks sealed under this version (journal included).
    pub blocks: u64,
}

/// One (version, epoch) with the blocks it protects.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KeyBlocks {
    pub version: u32,
    pub epoch: u32,
    pub epoch_start_unix: Option<u64>,
    pub blocks: u64,
}

/// What `key status` reports.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KeyStatus {
    pub pool_id: String,
    pub split_id: String,
    pub shares: u8,
    pub threshold: u8,
    pub write_version: u32,
    pub current_epoch: Epoch,
    pub epoch_period_secs: u64,
    pub max_age_secs: u64,
    pub versions: Vec<VersionStatus>,
    pub keys: Vec<KeyBlocks>,
    /// Live blocks whose key could not be read (a disk missing or damaged).
    pub unknown_blocks: u64,
    /// Recent epochs, newest last.
    pub epochs: Vec<Epoch>,
    pub rotation: RotationProgress,
}

/// The pool's audit log and the audit key its records are MAC'd with.
type AuditSink = (Arc<AuditLog>, Arc<RwLock<AuditKey>>);

/// The keys of an unlocked pool and their lifecycle. Shared by the volumes (ring, write key),
/// the rotation task and the administrative commands.
pub struct PoolKeys {
    store: Arc<MetaStore>,
    pool_id: [u8; 16],
    kek: Mutex<Kek>,
    ring: Arc<KeyRing>,
    write_key: Arc<WriteKey>,
    epochs: Mutex<EpochHistory>,
    policy: RwLock<RotationPolicy>,
    slots: KeySlots,
    disks: HashMap<DiskId, DiskRef>,
    admin: Mutex<()>,
    progress: Mutex<RotationProgress>,
    /// Where key events go: the pool's audit log and its audit key (set by the pool once open).
    audit: Mutex<Option<AuditSink>>,
    /// Key events from before the audit log was attached (an epoch advanced while the pool
    /// opened), appended by [`PoolKeys::attach_audit`].
    pending: Mutex<Vec<(EventKind, Fields)>>,
}

impl std::fmt::Debug for PoolKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolKeys")
            .field("write_key", &self.write_key.get())
            .finish_non_exhaustive()
    }
}

impl PoolKeys {
    /// Loads the keys of a pool whose KEK is known: unwraps the readable versions, finishes a
    /// destroy that a crash interrupted, advances the epoch if its period has passed, and sets
    /// the write key.
    pub fn open(
        dir: &Path,
        store: Arc<MetaStore>,
        kek: Kek,
        disks: HashMap<DiskId, DiskRef>,
        policy: RotationPolicy,
    ) -> Result<Arc<Self>, PoolError> {
        let pool = store.pool()?;
        let ring = Arc::new(load_ring(&store, &kek)?);
        let slots = KeySlots::in_pool(dir);
        let mut keys = store.keys()?;
        let active = active_of(&keys).ok_or_else(|| {
            PoolError::Invalid(format!(
                "{}: no active master key version (damaged key table)",
                store.path().display()
            ))
        })?;
        // A crash between recording a new active version and retiring the old one leaves two.
        for k in keys.iter_mut() {
            if k.state == KeyState::Active && k.version != active {
                k.state = KeyState::Retired;
                store.put_key(k)?;
            }
        }
        let this = Arc::new(Self {
            store: store.clone(),
            pool_id: pool.pool_id,
            kek: Mutex::new(kek),
            ring,
            write_key: Arc::new(WriteKey::new(active, 1)),
            epochs: Mutex::new(load_epochs(&store)?),
            policy: RwLock::new(policy),
            slots,
            disks,
            admin: Mutex::new(()),
            progress: Mutex::new(RotationProgress::default()),
            audit: Mutex::new(None),
            pending: Mutex::new(Vec::new()),
        });
        this.finish_interrupted()?;
        let advanced = {
            let mut h = lock(&this.epochs);
            let advanced = h.advance_if_due(now_unix(), this.policy().period);
            write_json(&store, EPOCHS_ENTRY, &*h)?;
            this.write_key.set(active, h.current().number);
            advanced
        };
        if let Some(e) = advanced {
            info!(epoch = e.number, "new epoch at open: its period had passed");
            this.record(
                EventKind::Rotate,
                fields([
                    ("epoch", e.number.to_string()),
                    ("reason", "period".to_string()),
                ]),
            );
        }
        Ok(this)
    }

    /// Finishes what a crash may have interrupted after its store commit: erases, again, the
    /// key slots of every destroyed version and the slots wrapped under an older split (a
    /// re-split), and rewrites the superblocks if one still carries either.
    fn finish_interrupted(&self) -> Result<(), PoolError> {
        let split = self.store.pool()?.split_id;
        let keys = self.store.keys()?;
        let destroyed: Vec<u32> = keys
            .iter()
            .filter(|k| k.state == KeyState::Destroyed)
            .map(|k| k.version)
            .collect();
        for k in &keys {
            if destroyed.contains(&k.version) {
                self.slots.erase(k.version, None)?;
            } else {
                self.slots.erase(k.version, Some(&split))?;
            }
        }
        let mut stale = false;
        for d in self.disks.values() {
            if let Ok(sb) = crate::meta::read_superblock(d.as_ref()) {
                stale |= sb.pool.split_id != split
                    || sb
                        .keys
                        .iter()
                        .any(|k| destroyed.contains(&k.version) && !k.wrapped.is_empty());
            }
        }
        if stale {
            warn!("finishing an interrupted destroy or re-split: rewriting the superblocks");
            rewrite_superblocks(&self.store, &self.disks)?;
        }
        Ok(())
    }

    /// Sends key events to the pool's audit log, MAC'd under `key` (which this keeps in step
    /// with the loaded master versions: a new active version MACs from then on, a destroyed
    /// one's audit key is dropped).
    pub fn attach_audit(&self, log: Arc<AuditLog>, key: Arc<RwLock<AuditKey>>) {
        let pending = {
            let mut audit = lock(&self.audit);
            *audit = Some((log, key));
            std::mem::take(&mut *lock(&self.pending))
        };
        for (kind, f) in pending {
            self.record(kind, f);
        }
    }

    /// Appends an event to the audit log under the current audit key (kept until the log is
    /// attached): key events, and the disk failures the pool's health registry reports. The
    /// event already happened: a failure to record it is logged, not returned.
    pub fn record(&self, kind: EventKind, fields: Fields) {
        let sink = {
            let audit = lock(&self.audit);
            if audit.is_none() {
                // Under the audit lock, so that `attach_audit` cannot miss it.
                lock(&self.pending).push((kind, fields));
                return;
            }
            audit.clone()
        };
        let Some((log, key)) = sink else {
            return;
        };
        let active = self.write_key.get().0;
        let mut k = key.write().unwrap_or_else(PoisonError::into_inner);
        if k.current_version() != active || k.versions() != self.ring.versions() {
            match AuditKey::from_ring(&self.ring, active) {
                Ok(nk) => *k = nk,
                Err(e) => warn!(error = %e, "cannot refresh the audit key"),
            }
        }
        if let Err(e) = log.append(kind, fields, Some(&k)) {
            warn!(error = %e, event = kind.name(), "cannot record a key event in the audit log");
        }
    }

    /// The key ring the volumes read and write with.
    pub fn ring(&self) -> Arc<KeyRing> {
        self.ring.clone()
    }

    /// The write key shared by the volumes.
    pub fn write_key_handle(&self) -> Arc<WriteKey> {
        self.write_key.clone()
    }

    /// (master version, epoch) of new writes.
    pub fn write_key(&self) -> (u32, u32) {
        self.write_key.get()
    }

    /// The rotation policy in force.
    pub fn policy(&self) -> RotationPolicy {
        self.policy
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Replaces the rotation policy (a reloaded configuration).
    pub fn set_policy(&self, p: RotationPolicy) {
        *self.policy.write().unwrap_or_else(PoisonError::into_inner) = p;
    }

    /// The epoch history.
    pub fn epochs(&self) -> EpochHistory {
        lock(&self.epochs).clone()
    }

    /// Progress of the rotation task.
    pub fn progress(&self) -> RotationProgress {
        lock(&self.progress).clone()
    }

    pub(crate) fn progress_mut(&self) -> MutexGuard<'_, RotationProgress> {
        lock(&self.progress)
    }

    /// Starts a new epoch if the period has passed (the rotation task calls this on its timer).
    pub fn tick_epoch(&self, now: u64) -> Result<Option<Epoch>, PoolError> {
        let period = self.policy().period;
        let mut h = lock(&self.epochs);
        let Some(e) = h.advance_if_due(now, period) else {
            return Ok(None);
        };
        write_json(&self.store, EPOCHS_ENTRY, &*h)?;
        drop(h);
        self.write_key.set(self.write_key.get().0, e.number);
        info!(epoch = e.number, "new epoch: new writes use it");
        self.record(
            EventKind::Rotate,
            fields([
                ("epoch", e.number.to_string()),
                ("reason", "period".to_string()),
            ]),
        );
        Ok(Some(e))
    }

    /// Starts a new epoch now, whatever the period (`key rotate`).
    pub fn advance_epoch(&self, now: u64) -> Result<Epoch, PoolError> {
        let mut h = lock(&self.epochs);
        let e = h.advance(now);
        write_json(&self.store, EPOCHS_ENTRY, &*h)?;
        drop(h);
        self.write_key.set(self.write_key.get().0, e.number);
        info!(epoch = e.number, "new epoch started on request");
        self.record(
            EventKind::Rotate,
            fields([
                ("epoch", e.number.to_string()),
                ("reason", "request".to_string()),
            ]),
        );
        Ok(e)
    }

    /// The key below which blocks are due for re-encryption at `now`: older master versions,
    /// and epochs that started more than `max_age` ago (never the current one).
    pub fn due_key(&self, now: u64) -> (u32, u32) {
        let active = self.write_key.get().0;
        let cutoff = now.saturating_sub(self.policy().max_age.as_secs());
        match lock(&self.epochs).due_through(cutoff) {
            Some(e) => (active, e.saturating_add(1)),
            None => (active, 0),
        }
    }

    fn key_record(&self, version: u32) -> Result<KeyRecord, PoolError> {
        self.store.key(version)?.ok_or_else(|| {
            PoolError::Invalid(format!(
                "master key version {version} does not exist (see `shardvol key status`)"
            ))
        })
    }

    /// Creates a new master key version, makes it the one new writes use, and leaves the
    /// re-encryption of older blocks to the rotation task. Returns the new version.
    pub fn rotate_master(&self) -> Result<u32, PoolError> {
        let _admin = lock(&self.admin);
        let pool = self.store.pool()?;
        let keys = self.store.keys()?;
        let version = keys.iter().map(|k| k.version).max().unwrap_or(0) + 1;
        let master = MasterKey::try_generate()
            .map_err(|e| PoolError::Invalid(format!("cannot make a master key: {e}")))?;
        let wrapped = kms::wrap_master(&lock(&self.kek), &master, self.pool_id, version);
        self.slots
            .put(version, &pool.split_id, &wrapped, Some(&pool.split_id))?;
        self.store.put_key(&KeyRecord {
            version,
            wrapped: vec![],
            state: KeyState::Active,
            created_unix: now_unix(),
        })?;
        for mut k in keys.into_iter().filter(|k| k.state == KeyState::Active) {
            k.state = KeyState::Retired;
            self.store.put_key(&k)?;
        }
        self.ring.insert(version, master);
        let epoch = self.write_key.get().1;
        self.write_key.set(version, epoch);
        rewrite_superblocks(&self.store, &self.disks)?;
        info!(
            version,
            "new master key version; older blocks re-encrypt in the background"
        );
        self.record(
            EventKind::RotateMaster,
            fields([("version", version.to_string())]),
        );
        Ok(version)
    }

    /// Key usage over the given volumes.
    pub fn usage(volumes: &[Arc<Volume>]) -> Result<KeyUsage, PoolError> {
        let mut u = KeyUsage::default();
        for v in volumes {
            u.merge(&v.scan_key_usage()?);
        }
        Ok(u)
    }

    /// Refuses unless no block of any volume (journal included) needs `version`.
    fn check_unused(
        &self,
        version: u32,
        what: &str,
        volumes: &[Arc<Volume>],
    ) -> Result<(), PoolError> {
        let u = Self::usage(volumes)?;
        let n = u.blocks_of_version(version);
        if n > 0 {
            return Err(PoolError::Invalid(format!(
                "cannot {what} master key version {version}: {n} blocks still need it; \
                 run `shardvol key rotate` (or let the rotation task finish) and try again"
            )));
        }
        if u.unknown > 0 {
            return Err(PoolError::Invalid(format!(
                "cannot {what} master key version {version}: the key of {} blocks cannot be read \
                 (a disk is missing or damaged), so they may need it; repair the pool and try again",
                u.unknown
            )));
        }
        Ok(())
    }

    fn set_times(&self, version: u32, f: impl FnOnce(&mut KeyTimes)) -> Result<(), PoolError> {
        let mut times = load_times(&self.store)?;
        f(times.entry(version).or_default());
        write_json(&self.store, KEY_TIMES_ENTRY, &times)
    }

    /// Archives a retired version: it is no longer used for reading, and is kept wrapped until
    /// the retention period ends. Refused for the active version and while blocks need it.
    pub fn archive(&self, version: u32, volumes: &[Arc<Volume>]) -> Result<(), PoolError> {
        let _admin = lock(&self.admin);
        let mut rec = self.key_record(version)?;
        match rec.state {
            KeyState::Retired => {}
            KeyState::Active => {
                return Err(PoolError::Invalid(format!(
                    "master key version {version} is the active one: run `shardvol key rotate-master` first"
                )));
            }
            KeyState::Archived => {
                return Err(PoolError::Invalid(format!(
                    "master key version {version} is already archived"
                )));
            }
            KeyState::Destroyed => {
                return Err(PoolError::Invalid(format!(
                    "master key version {version} is destroyed"
                )));
            }
        }
        // Destage first: until a re-keyed block is destaged, its old copy in the chunk slot is
        // still what a crash would bring back, so it counts as needing the old version.
        for v in volumes {
            v.reseal_journal()?;
        }
        self.check_unused(version, "archive", volumes)?;
        rec.state = KeyState::Archived;
        self.store.put_key(&rec)?;
        self.set_times(version, |t| t.archived_unix = Some(now_unix()))?;
        self.ring.remove(version);
        rewrite_superblocks(&self.store, &self.disks)?;
        info!(version, "master key version archived");
        self.record(
            EventKind::Archive,
            fields([("version", version.to_string())]),
        );
        Ok(())
    }

    /// Destroys a version: refused for the active version and while any block needs it; then
    /// its wrapped key is erased from the key-slot file and from both superblock slots of every
    /// disk (crypto-shredding: whatever it protected can no longer be decrypted).
    pub fn destroy(&self, version: u32, volumes: &[Arc<Volume>]) -> Result<(), PoolError> {
        let _admin = lock(&self.admin);
        let mut rec = self.key_record(version)?;
        match rec.state {
            KeyState::Retired | KeyState::Archived => {}
            KeyState::Active => {
                return Err(PoolError::Invalid(format!(
                    "master key version {version} is the active one: run `shardvol key rotate-master` first"
                )));
            }
            KeyState::Destroyed => {
                return Err(PoolError::Invalid(format!(
                    "master key version {version} is already destroyed"
                )));
            }
        }
        // Destage first: until a re-keyed block is destaged, its old copy in the chunk slot is
        // still what a crash would bring back, so it counts as needing the old version.
        for v in volumes {
            v.reseal_journal()?;
        }
        self.check_unused(version, "destroy", volumes)?;
        rec.state = KeyState::Destroyed;
        rec.wrapped.clear();
        self.store.put_key(&rec)?;
        self.set_times(version, |t| t.destroyed_unix = Some(now_unix()))?;
        self.ring.remove(version);
        self.slots.erase(version, None)?;
        rewrite_superblocks(&self.store, &self.disks)?;
        info!(version, "master key version destroyed");
        self.record(
            EventKind::Destroy,
            fields([("version", version.to_string())]),
        );
        Ok(())
    }

    /// Destroys archived versions whose retention has ended and that no block needs. Returns
    /// the versions destroyed.
    pub fn destroy_expired(
        &self,
        volumes: &[Arc<Volume>],
        now: u64,
    ) -> Result<Vec<u32>, PoolError> {
        let retention = self.policy().retention.as_secs();
        let times = load_times(&self.store)?;
        let due: Vec<u32> = self
            .store
            .keys()?
            .iter()
            .filter(|k| k.state == KeyState::Archived)
            .filter(|k| {
                times
                    .get(&k.version)
                    .and_then(|t| t.archived_unix)
                    .is_some_and(|a| now >= a.saturating_add(retention))
            })
            .map(|k| k.version)
            .collect();
        let mut done = Vec::new();
        for v in due {
            match self.destroy(v, volumes) {
                Ok(()) => done.push(v),
                Err(e) => {
                    warn!(version = v, error = %e, "retention ended but the version cannot be destroyed yet")
                }
            }
        }
        Ok(done)
    }

    /// Splits a new KEK into `count` shares (any `threshold` unlock), rewraps every version that
    /// is not destroyed under it, writes the new share files into `share_dir`, and makes every
    /// old share useless. Returns the new share files.
    pub fn reissue(
        &self,
        count: u8,
        threshold: u8,
        share_dir: &Path,
    ) -> Result<Vec<PathBuf>, PoolError> {
        let _admin = lock(&self.admin);
        let mut kek = lock(&self.kek);
        let (new_kek, paths) =
            reissue_with(&self.store, &self.disks, &kek, count, threshold, share_dir)?;
        *kek = new_kek;
        drop(kek);
        let split = self.store.pool()?.split_id;
        self.record(
            EventKind::Reissue,
            fields([
                ("shares", count.to_string()),
                ("threshold", threshold.to_string()),
                ("split", crate::pool::hex(&split)),
            ]),
        );
        Ok(paths)
    }

    /// `key status`: versions, epochs, blocks per key, rotation progress.
    pub fn status(&self, volumes: &[Arc<Volume>]) -> Result<KeyStatus, PoolError> {
        let pool = self.store.pool()?;
        let usage = Self::usage(volumes)?;
        let times = load_times(&self.store)?;
        let policy = self.policy();
        let epochs = self.epochs();
        let versions = self
            .store
            .keys()?
            .into_iter()
            .map(|k| {
                let t = times.get(&k.version).copied().unwrap_or_default();
                VersionStatus {
                    version: k.version,
                    state: format!("{:?}", k.state).to_lowercase(),
                    created_unix: k.created_unix,
                    archived_unix: t.archived_unix,
                    destroyed_unix: t.destroyed_unix,
                    destroy_after_unix: (k.state == KeyState::Archived)
                        .then(|| t.archived_unix.map(|a| a + policy.retention.as_secs()))
                        .flatten(),
                    blocks: usage.blocks_of_version(k.version),
                }
            })
            .collect();
        let keys = usage
            .by_key
            .iter()
            .map(|((v, e), n)| KeyBlocks {
                version: *v,
                epoch: *e,
                epoch_start_unix: epochs.start_of(*e),
                blocks: *n,
            })
            .collect();
        let (write_version, _) = self.write_key();
        let recent = epochs.epochs.len().saturating_sub(10);
        Ok(KeyStatus {
            pool_id: crate::pool::hex(&pool.pool_id),
            split_id: crate::pool::hex(&pool.split_id),
            shares: pool.share_count,
            threshold: pool.threshold,
            write_version,
            current_epoch: epochs.current(),
            epoch_period_secs: policy.period.as_secs(),
            max_age_secs: policy.max_age.as_secs(),
            versions,
            keys,
            unknown_blocks: usage.unknown,
            epochs: epochs.epochs[recent..].to_vec(),
            rotation: self.progress(),
        })
    }

    /// `key rotate`: starts a new epoch, then re-encrypts, now and without rate limit, every
    /// stale block of the chosen volumes (or one stripe). `progress` hears (stripes done,
    /// stripes to do, blocks rewritten) after each stripe. Returns (stripes visited, blocks
    /// rewritten).
    pub fn rotate_now(
        &self,
        volumes: &[Arc<Volume>],
        stripe: Option<StripeId>,
        progress: &dyn Fn(u64, u64, u64),
    ) -> Result<(u64, u64), PoolError> {
        self.advance_epoch(now_unix())?;
        let mut work = Vec::new();
        for v in volumes {
            match stripe {
                Some(s) => work.push((v.clone(), s)),
                None => work.extend(
                    v.stale_stripes(self.write_key(), usize::MAX)
                        .into_iter()
                        .map(|(s, _)| (v.clone(), s)),
                ),
            }
        }
        let total = work.len() as u64;
        let mut stripes = 0;
        let mut blocks = 0;
        for (v, s) in work {
            blocks += v.rekey_stripe(s)?;
            stripes += 1;
            progress(stripes, total, blocks);
        }
        let mut p = self.progress_mut();
        p.stripes_done += stripes;
        p.blocks_done += blocks;
        Ok((stripes, blocks))
    }
}

/// Re-splits the KEK of a pool (see the module docs for the order of steps). Works on a
/// stopped pool (store and disks) as well as an open one; returns the new KEK and share files.
pub fn reissue_with(
    store: &MetaStore,
    disks: &HashMap<DiskId, DiskRef>,
    old_kek: &Kek,
    count: u8,
    threshold: u8,
    share_dir: &Path,
) -> Result<(Kek, Vec<PathBuf>), PoolError> {
    kms::validate_split_params(count, threshold)?;
    let mut pool = store.pool()?;
    let slots = KeySlots::in_pool(&pool_dir(store));
    let keys = store.keys()?;
    let mut masters = Vec::new();
    for k in keys.iter().filter(|k| k.state != KeyState::Destroyed) {
        let Some(w) = wrapped_of(&slots, k, &pool.split_id)? else {
            return Err(PoolError::Invalid(format!(
                "the wrapped key of master version {} is missing from {}: refusing to re-split \
                 (it would be lost)",
                k.version,
                slots.path().display()
            )));
        };
        masters.push((
            k.version,
            kms::unwrap_master(old_kek, &w, pool.pool_id, k.version)?,
        ));
    }
    let new_kek = Kek::generate();
    let shares = kms::split(&new_kek, pool.pool_id, count, threshold)?;
    let new_split = shares
        .first()
        .map(|s| s.split_id)
        .ok_or_else(|| KmsError::Share("the split made no shares".into()))?;
    for (v, m) in &masters {
        let w = kms::wrap_master(&new_kek, m, pool.pool_id, *v);
        slots.put(*v, &new_split, &w, Some(&pool.split_id))?;
    }
    drop(masters);
    let paths = kms::write_share_files(share_dir, &shares)?;
    pool.split_id = new_split;
    pool.share_count = count;
    pool.threshold = threshold;
    store.put_pool(&pool)?;
    for k in &keys {
        slots.erase(k.version, Some(&new_split))?;
        if !k.wrapped.is_empty() {
            // A record from before the key-slot file: its bytes are wrapped under the old KEK.
            let mut k = k.clone();
            k.wrapped.clear();
            store.put_key(&k)?;
        }
    }
    rewrite_superblocks(store, disks)?;
    info!(
        shares = count,
        threshold, "KEK re-split; the old shares no longer unlock the pool"
    );
    Ok((new_kek, paths))
}
