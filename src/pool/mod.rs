//! Pools: creating one (disks, superblocks, keys, shares, metadata store), adding volumes,
//! opening one with `t` shares, and describing one without any key.
//!
//! A pool directory holds `pool.redb` (the metadata store), `audit.log` (the audit log of key
//! events, [`crate::audit`]: creation, unlocks, refused unlocks), by default `disks/` (one sparse
//! backing file per disk) and, only when the operator asks for it, `shares/`. Every volume has a
//! region at the same offset on every disk (see `volume::format`); regions are appended.
//!
//! Errors name what is wrong and what to do; nothing here prints or logs key material.
//!
//! [`recover`]: offline recovery of a volume from its disks and `t` shares, without the store.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

use serde::Serialize;
use tracing::info;

use crate::audit::{AuditKey, AuditLog, EventKind, Fields, fields as audit_fields};
use crate::crypto::{KeyRing, MasterKey};
use crate::disk::{DiskOptions, DiskRef};
use crate::kms::{self, Kek, LoadedShare};
use crate::layout::placement::PlacementDisk;
use crate::layout::{DiskId, Geometry};
use crate::meta::{
    DiskRecord, DiskState, KeyRecord, KeyState, MetaStore, PoolRecord, SUPERBLOCK_AREA, Superblock,
    VolumeRecord, read_superblock, write_superblock,
};
use crate::now_unix;
use crate::volume::health::Health;
use crate::volume::{Volume, VolumeError, VolumeParts, WriteKey};

pub mod recover;

mod grow;
pub use grow::{AddOptions, AddReport, RebalanceStatus, rebalance_status, rebalance_view};

mod heal;
pub use heal::{
    DiskHealthView, HealthView, RebuildOptions, RebuildReport, RebuildStatus, ScrubSummary,
    health_view,
};

/// Name of the metadata store inside a pool directory.
pub const STORE_FILE: &str = "pool.redb";
/// Regions start on 1 MiB boundaries, so that every volume's slots stay aligned for
/// O_DIRECT and for devices with large physical sectors.
const REGION_ALIGN: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Meta(#[from] crate::meta::MetaError),
    #[error(transparent)]
    Kms(#[from] crate::kms::KmsError),
    #[error(transparent)]
    Disk(#[from] crate::disk::DiskError),
    #[error(transparent)]
    Volume(#[from] VolumeError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditError),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PoolError + '_ {
    move |source| PoolError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Where the disks of a new pool come from.
#[derive(Clone, Debug)]
pub enum DiskSpec {
    /// `n` sparse files under `POOL/disks`, each its own failure domain.
    Files(usize),
    /// Given paths (files are created if absent; block devices are used as they are), each
    /// with a failure domain (default: the path).
    Paths(Vec<(PathBuf, Option<String>)>),
}

/// Parameters of `shardvol create`.
#[derive(Clone, Debug)]
pub struct CreateOptions {
    pub pool: PathBuf,
    pub volume: String,
    pub size: u64,
    pub data: u16,
    pub parity: u16,
    pub chunk_size: u32,
    pub disks: DiskSpec,
    pub shares: u8,
    pub threshold: u8,
    pub share_dir: PathBuf,
    pub journal_size: u64,
}

/// What `create` made.
#[derive(Debug)]
pub struct Created {
    pub pool_id: [u8; 16],
    pub new_pool: bool,
    pub share_files: Vec<PathBuf>,
    pub disks: Vec<PathBuf>,
}

fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    rand::fill(&mut b[..]);
    b
}

/// Whether `dir` holds a pool.
pub fn exists(dir: &Path) -> bool {
    dir.join(STORE_FILE).exists()
}

fn validate_name(name: &str) -> Result<(), PoolError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(PoolError::Invalid(format!(
            "volume name {name:?}: use 1-64 letters, digits, '-', '_' or '.'"
        )))
    }
}

/// Creates a pool with its first volume, or adds a volume to an existing pool (no shares are
/// needed for that: the new volume uses the pool's master keys when the pool is opened).
pub fn create(opts: &CreateOptions) -> Result<Created, PoolError> {
    validate_name(&opts.volume)?;
    let geometry = Geometry::new(opts.data, opts.parity, opts.chunk_size)
        .map_err(|e| PoolError::Invalid(e.to_string()))?;
    if opts.size == 0 || !opts.size.is_multiple_of(4096) {
        return Err(PoolError::Invalid(format!(
            "volume size {} must be a positive multiple of 4 KiB",
            opts.size
        )));
    }
    if exists(&opts.pool) {
        return add_volume(opts, geometry);
    }
    fs::create_dir_all(&opts.pool).map_err(io_err(&opts.pool))?;
    let disk_list: Vec<(PathBuf, String)> = match &opts.disks {
        DiskSpec::Files(n) => {
            let dir = opts.pool.join("disks");
            fs::create_dir_all(&dir).map_err(io_err(&dir))?;
            (0..*n)
                .map(|i| (dir.join(format!("disk-{i}.img")), format!("disk-{i}")))
                .collect()
        }
        DiskSpec::Paths(p) => p
            .iter()
            .map(|(path, dom)| {
                (
                    path.clone(),
                    dom.clone().unwrap_or_else(|| path.display().to_string()),
                )
            })
            .collect(),
    };
    if disk_list.len() < geometry.width() {
        return Err(PoolError::Invalid(format!(
            "{}+{} needs at least {} disks; {} given",
            geometry.k,
            geometry.m,
            geometry.width(),
            disk_list.len()
        )));
    }
    let pool_id: [u8; 16] = random();
    let kek = Kek::generate();
    let shares = kms::split(&kek, pool_id, opts.shares, opts.threshold)?;
    let split_id = shares.first().map(|s| s.split_id).unwrap_or_default();
    let pool_rec = PoolRecord {
        pool_id,
        split_id,
        share_count: opts.shares,
        threshold: opts.threshold,
        created_unix: now_unix(),
    };
    let master = MasterKey::generate();
    // The wrapped key lives in the key-slot file, which can be erased in place; the store
    // (copy-on-write) only records its state (see `kms::keyslots`).
    let wrapped = kms::wrap_master(&kek, &master, pool_id, 1);
    let key = KeyRecord {
        version: 1,
        wrapped: vec![],
        state: KeyState::Active,
        created_unix: now_unix(),
    };

    let mut disks = Vec::new();
    let mut table = Vec::new();
    for (i, (path, domain)) in disk_list.iter().enumerate() {
        let id = DiskId(i as u32);
        table.push(DiskRecord {
            id,
            path: path.clone(),
            domain: domain.clone(),
            size: 0,
            state: DiskState::Ok,
        });
        disks.push(id);
    }
    let vol = new_volume_record(opts, geometry, 1, SUPERBLOCK_AREA);
    size_disks(&mut table, &vol)?;
    let store = MetaStore::create(&opts.pool.join(STORE_FILE))?;
    store.put_pool(&pool_rec)?;
    for d in &table {
        store.put_disk(d)?;
    }
    kms::keyslots::KeySlots::in_pool(&opts.pool).put(1, &split_id, &wrapped, None)?;
    store.put_key(&key)?;
    crate::lifecycle::init_store(&store, now_unix())?;
    let refs = open_disks(&table)?;
    let parts = parts_for(&vol, &refs, &table, Arc::new(store), None)?;
    Volume::format(&parts)?;
    parts.store.put_volume(&vol)?;
    write_superblocks(&parts.store, &refs, 1)?;
    let share_files = kms::write_share_files(&opts.share_dir, &shares)?;
    audit_pool_create(opts, &parts.store, &pool_id, &master)?;
    info!(pool = %opts.pool.display(), volume = %opts.volume, "pool created");
    Ok(Created {
        pool_id,
        new_pool: true,
        share_files,
        disks: table.iter().map(|d| d.path.clone()).collect(),
    })
}

fn new_volume_record(
    opts: &CreateOptions,
    geometry: Geometry,
    id: u64,
    region_offset: u64,
) -> VolumeRecord {
    let mut v = VolumeRecord {
        id,
        name: opts.volume.clone(),
        size: opts.size,
        geometry,
        placement_seed: random(),
        region_offset,
        journal_size: opts.journal_size,
        region_size: 0,
        journal_disks: Vec::new(),
        rebalance: None,
        created_unix: now_unix(),
    };
    v.region_size = Volume::layout_of(&v).region_size();
    v
}

/// Makes every disk large enough for a volume's region: files grow (sparse); block devices
/// must already be large enough.
fn size_disks(table: &mut [DiskRecord], vol: &VolumeRecord) -> Result<(), PoolError> {
    let need = vol.region_offset + vol.region_size;
    for d in table.iter_mut() {
        size_disk(d, need)?;
    }
    Ok(())
}

/// Makes one disk at least `need` bytes (a file grows, sparse) and records its size.
fn size_disk(d: &mut DiskRecord, need: u64) -> Result<(), PoolError> {
    {
        let meta = fs::metadata(&d.path);
        let is_dev = meta.as_ref().is_ok_and(|m| {
            use std::os::unix::fs::FileTypeExt;
            m.file_type().is_block_device()
        });
        if is_dev {
            let size = device_size(&d.path)?;
            if size < need {
                return Err(PoolError::Invalid(format!(
                    "{}: {size} bytes, the volume needs {need}",
                    d.path.display()
                )));
            }
            d.size = size;
        } else {
            if let Some(parent) = d.path.parent() {
                fs::create_dir_all(parent).map_err(io_err(parent))?;
            }
            let f = fs::OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(false)
                .open(&d.path)
                .map_err(io_err(&d.path))?;
            let cur = f.metadata().map_err(io_err(&d.path))?.len();
            if cur < need {
                f.set_len(need).map_err(io_err(&d.path))?;
            }
            d.size = cur.max(need);
        }
    }
    Ok(())
}

/// Size of a block device, by seeking to its end.
fn device_size(path: &Path) -> Result<u64, PoolError> {
    use std::io::{Seek, SeekFrom};
    let mut f = fs::File::open(path).map_err(io_err(path))?;
    f.seek(SeekFrom::End(0)).map_err(io_err(path))
}

fn add_volume(opts: &CreateOptions, geometry: Geometry) -> Result<Created, PoolError> {
    let store = MetaStore::open(&opts.pool.join(STORE_FILE))?;
    let vols = store.volumes()?;
    if vols.iter().any(|v| v.name == opts.volume) {
        return Err(PoolError::Invalid(format!(
            "the pool already has a volume named {:?}",
            opts.volume
        )));
    }
    let mut table = store.disks()?;
    if table.len() < geometry.width() {
        return Err(PoolError::Invalid(format!(
            "{}+{} needs {} disks; the pool has {}",
            geometry.k,
            geometry.m,
            geometry.width(),
            table.len()
        )));
    }
    let end = vols
        .iter()
        .map(|v| v.region_offset + v.region_size)
        .max()
        .unwrap_or(SUPERBLOCK_AREA);
    let id = vols.iter().map(|v| v.id).max().unwrap_or(0) + 1;
    let vol = new_volume_record(
        opts,
        geometry,
        id,
        end.div_ceil(REGION_ALIGN) * REGION_ALIGN,
    );
    size_disks(&mut table, &vol)?;
    for d in &table {
        store.put_disk(d)?;
    }
    let refs = open_disks(&table)?;
    let pool = store.pool()?;
    let parts = parts_for(&vol, &refs, &table, Arc::new(store), None)?;
    Volume::format(&parts)?;
    parts.store.put_volume(&vol)?;
    let seq = read_superblock(
        refs.values()
            .next()
            .map(|d| d.as_ref())
            .ok_or_else(|| PoolError::Invalid("pool has no disks".into()))?,
    )
    .map(|s| s.seq + 1)
    .unwrap_or(1);
    write_superblocks(&parts.store, &refs, seq)?;
    info!(pool = %opts.pool.display(), volume = %opts.volume, "volume added");
    Ok(Created {
        pool_id: pool.pool_id,
        new_pool: false,
        share_files: vec![],
        disks: table.iter().map(|d| d.path.clone()).collect(),
    })
}

fn open_disks(table: &[DiskRecord]) -> Result<HashMap<DiskId, DiskRef>, PoolError> {
    let opts = DiskOptions::default();
    table
        .iter()
        .map(|d| Ok((d.id, crate::disk::open_disk(&d.path, &opts)?)))
        .collect()
}

fn placement_table(table: &[DiskRecord]) -> Vec<PlacementDisk> {
    table
        .iter()
        .map(|d| PlacementDisk {
            id: d.id,
            domain: d.domain.clone(),
        })
        .collect()
}

fn parts_for(
    vol: &VolumeRecord,
    disks: &HashMap<DiskId, DiskRef>,
    table: &[DiskRecord],
    store: Arc<MetaStore>,
    keys: Option<(Arc<KeyRing>, Arc<WriteKey>)>,
) -> Result<VolumeParts, PoolError> {
    let (keys, write_key) = keys.unwrap_or_else(|| {
        (
            Arc::new(KeyRing::new([0; 16])),
            Arc::new(WriteKey::new(1, 1)),
        )
    });
    Ok(VolumeParts {
        record: vol.clone(),
        disks: disks.clone(),
        table: placement_table(table),
        keys,
        write_key,
        store,
    })
}

/// Writes the current pool description to the superblock of every disk.
pub(crate) fn write_superblocks(
    store: &MetaStore,
    disks: &HashMap<DiskId, DiskRef>,
    seq: u64,
) -> Result<(), PoolError> {
    let pool = store.pool()?;
    let table = store.disks()?;
    let volumes = store.volumes()?;
    let keys = crate::lifecycle::keys_with_wrapped(store)?;
    for (id, d) in disks {
        let sb = Superblock {
            seq,
            disk_id: *id,
            pool: pool.clone(),
            disks: table.clone(),
            volumes: volumes.clone(),
            keys: keys.clone(),
        };
        write_superblock(d.as_ref(), &sb)?;
    }
    Ok(())
}

/// An open, unlocked pool: its volumes are ready for I/O.
pub struct Pool {
    pub dir: PathBuf,
    pub store: Arc<MetaStore>,
    pub volumes: BTreeMap<String, Arc<Volume>>,
    /// The pool's keys and their lifecycle (epochs, versions, rotation): `crate::lifecycle`.
    pub keys: Arc<crate::lifecycle::PoolKeys>,
    /// Health of the pool's disks, shared by its volumes (see `volume::health`).
    pub health: Arc<Health>,
    /// The pool's audit log; [`Pool::audit`] appends to it with the pool's audit key.
    pub audit: Arc<AuditLog>,
    audit_key: Arc<RwLock<AuditKey>>,
}

/// Reads and combines share files, and unwraps the pool's master keys.
pub fn unlock(store: &MetaStore, share_files: &[PathBuf]) -> Result<KeyRing, PoolError> {
    let shares = load_shares(share_files)?;
    unlock_loaded(store, &shares)
}

/// Combines loaded shares and unwraps the pool's master keys.
pub fn unlock_loaded(store: &MetaStore, shares: &[LoadedShare]) -> Result<KeyRing, PoolError> {
    let kek = kek_from_loaded(store, shares)?;
    crate::lifecycle::load_ring(store, &kek)
}

/// Reads and combines share files into the KEK, and proves it by unwrapping the pool's master
/// keys (a wrong KEK is [`kms::KmsError::WrongKek`], never a wrong key).
pub fn unlock_kek(store: &MetaStore, share_files: &[PathBuf]) -> Result<Kek, PoolError> {
    kek_from_loaded(store, &load_shares(share_files)?)
}

/// [`unlock_kek`] with shares already read.
pub fn kek_from_loaded(store: &MetaStore, shares: &[LoadedShare]) -> Result<Kek, PoolError> {
    let pool = store.pool()?;
    let kek = kms::combine(shares, pool.pool_id, pool.split_id, pool.threshold)?;
    crate::lifecycle::load_ring(store, &kek)?;
    Ok(kek)
}

fn load_shares(share_files: &[PathBuf]) -> Result<Vec<LoadedShare>, PoolError> {
    Ok(share_files
        .iter()
        .map(|p| kms::load_share_file(p))
        .collect::<Result<_, _>>()?)
}

/// Opens the metadata store of the pool in `dir`, with a clear error when there is none.
pub fn open_store(dir: &Path) -> Result<MetaStore, PoolError> {
    let path = dir.join(STORE_FILE);
    if !path.exists() {
        return Err(PoolError::Invalid(format!(
            "{} is not a shardvol pool (no {STORE_FILE}); create one with `shardvol create --pool {}`",
            dir.display(),
            dir.display()
        )));
    }
    Ok(MetaStore::open(&path)?)
}

/// Opens every disk of the pool's disk table.
pub fn open_pool_disks(store: &MetaStore) -> Result<HashMap<DiskId, DiskRef>, PoolError> {
    open_disks(&store.disks()?)
}

/// Writes the superblock of every disk twice (both slots, sequence numbers after the newest
/// found on any disk), so that neither slot keeps an older description: used after a master key
/// is archived or destroyed, or the KEK re-split.
pub fn rewrite_superblocks(
    store: &MetaStore,
    disks: &HashMap<DiskId, DiskRef>,
) -> Result<(), PoolError> {
    let newest = disks
        .values()
        .filter_map(|d| read_superblock(d.as_ref()).ok().map(|s| s.seq))
        .max()
        .unwrap_or(0);
    write_superblocks(store, disks, newest + 1)?;
    write_superblocks(store, disks, newest + 2)
}

/// Share files in a directory (`share-*.txt`), sorted.
pub fn shares_in(dir: &Path) -> Result<Vec<PathBuf>, PoolError> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(io_err(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("share-") && n.ends_with(".txt"))
        })
        .collect();
    v.sort();
    Ok(v)
}

impl Pool {
    /// Opens a pool with share files: unlocks the keys, opens the disks, replays every
    /// volume's journal. Default key policy.
    pub fn open(dir: &Path, share_files: &[PathBuf]) -> Result<Self, PoolError> {
        Self::open_with(dir, share_files, &crate::kms::policy::KeyPolicy::default())
    }

    /// Opens a pool with shares already read (e.g. received over the control socket).
    pub fn open_loaded(dir: &Path, shares: &[LoadedShare]) -> Result<Self, PoolError> {
        Self::open_loaded_with(dir, shares, &crate::kms::policy::KeyPolicy::default())
    }

    /// [`Pool::open`] under a key policy: the unlock windows are checked before the shares are
    /// combined, and the epoch schedule follows `policy.rotation`.
    pub fn open_with(
        dir: &Path,
        share_files: &[PathBuf],
        policy: &crate::kms::policy::KeyPolicy,
    ) -> Result<Self, PoolError> {
        let shares = match load_shares(share_files) {
            Ok(s) => s,
            Err(e) => {
                if let Ok(store) = MetaStore::open(&dir.join(STORE_FILE)) {
                    let audit = AuditLog::open(dir, Arc::new(store));
                    audit_unlock_refused(&audit, "?", &e);
                }
                return Err(e);
            }
        };
        Self::open_loaded_with(dir, &shares, policy)
    }

    /// [`Pool::open_loaded`] under a key policy. A refusal by the access windows is recorded
    /// in the audit log as a policy refusal.
    pub fn open_loaded_with(
        dir: &Path,
        shares: &[LoadedShare],
        policy: &crate::kms::policy::KeyPolicy,
    ) -> Result<Self, PoolError> {
        Self::open_wrapped_with(dir, shares, policy, &|_, d| d)
    }

    /// [`Pool::open_loaded`], with every disk that opens passed through `wrap` first (tests
    /// put fault-injecting disks there). A disk that is missing, too small or carries another
    /// disk's superblock is marked failed and the pool opens without it.
    pub fn open_wrapped(
        dir: &Path,
        shares: &[LoadedShare],
        wrap: &dyn Fn(DiskId, DiskRef) -> DiskRef,
    ) -> Result<Self, PoolError> {
        Self::open_wrapped_with(dir, shares, &crate::kms::policy::KeyPolicy::default(), wrap)
    }

    /// [`Pool::open_wrapped`] under a key policy.
    pub fn open_wrapped_with(
        dir: &Path,
        shares: &[LoadedShare],
        policy: &crate::kms::policy::KeyPolicy,
        wrap: &dyn Fn(DiskId, DiskRef) -> DiskRef,
    ) -> Result<Self, PoolError> {
        let store = Arc::new(open_store(dir)?);
        let audit = Arc::new(AuditLog::open(dir, store.clone()));
        if let Err(r) = policy.unlock.check(now_unix()) {
            audit_policy_refusal(&audit, &share_indexes(shares), &r);
            return Err(PoolError::Kms(r.into()));
        }
        let kek = kek_from_loaded(&store, shares).inspect_err(|e| {
            audit_unlock_refused(&audit, &share_indexes(shares), e);
        })?;
        drop(audit);
        Self::open_unlocked_wrapped(dir, store, kek, policy, &share_indexes(shares), wrap)
    }

    /// Opens a pool whose KEK is already combined (by an unlock session, or by
    /// [`Pool::open_with`]); `shares` names the shares that made it, for the audit log.
    pub fn open_unlocked(
        dir: &Path,
        store: Arc<MetaStore>,
        kek: Kek,
        policy: &crate::kms::policy::KeyPolicy,
        shares: &str,
    ) -> Result<Self, PoolError> {
        Self::open_unlocked_wrapped(dir, store, kek, policy, shares, &|_, d| d)
    }

    /// [`Pool::open_unlocked`] with every disk passed through `wrap` (see
    /// [`Pool::open_wrapped`]).
    pub fn open_unlocked_wrapped(
        dir: &Path,
        store: Arc<MetaStore>,
        kek: Kek,
        policy: &crate::kms::policy::KeyPolicy,
        shares: &str,
        wrap: &dyn Fn(DiskId, DiskRef) -> DiskRef,
    ) -> Result<Self, PoolError> {
        let audit = Arc::new(AuditLog::open(dir, store.clone()));
        let table = store.disks()?;
        let failures = Arc::new(heal::FailureAudit::default());
        let health = heal::open_health(&store, &table, wrap, failures.clone())?;
        let disks = health.proxies();
        let keys = crate::lifecycle::PoolKeys::open(
            dir,
            store.clone(),
            kek,
            disks.clone(),
            policy.rotation.clone(),
        )?;
        let audit_key = AuditKey::from_ring(&keys.ring(), keys.write_key().0)?;
        audit.attest(&audit_key)?;
        audit.append(
            EventKind::Unlock,
            audit_fields([("shares", shares.to_string())]),
            Some(&audit_key),
        )?;
        let audit_key = Arc::new(RwLock::new(audit_key));
        keys.attach_audit(audit.clone(), audit_key.clone());
        failures.attach(&keys);
        let mut volumes = BTreeMap::new();
        for v in store.volumes()? {
            let parts = parts_for(
                &v,
                &disks,
                &table,
                store.clone(),
                Some((keys.ring(), keys.write_key_handle())),
            )?;
            volumes.insert(v.name.clone(), Volume::open_with(parts, health.clone())?);
        }
        let pool = Self {
            dir: dir.to_path_buf(),
            store,
            volumes,
            keys,
            health,
            audit,
            audit_key,
        };
        pool.install_rebalance_hooks()?;
        Ok(pool)
    }

    /// Appends an audit record MAC'd under the pool's audit key; returns its seq.
    pub fn audit(&self, kind: EventKind, fields: Fields) -> Result<u64, PoolError> {
        let key = self
            .audit_key
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        Ok(self.audit.append(kind, fields, Some(&key))?)
    }

    /// Verifies the audit log with the pool's audit keys (MACs included): (log path, report).
    pub fn audit_verify(&self) -> Result<(String, crate::audit::VerifyReport), PoolError> {
        let key = self
            .audit_key
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let r = self.audit.verify(Some(&key))?;
        Ok((self.audit.path().display().to_string(), r))
    }

    /// Replaces the audit key (after a master-key rotation: build it with
    /// [`AuditKey::from_ring`] and the new active version).
    pub fn set_audit_key(&self, key: AuditKey) {
        *self
            .audit_key
            .write()
            .unwrap_or_else(PoisonError::into_inner) = key;
    }

    /// Destages and checkpoints every volume, and saves the disks' health counters.
    pub fn close(&self) -> Result<(), PoolError> {
        for v in self.volumes.values() {
            v.close()?;
        }
        self.save_health()
    }
}

/// A pool as `inspect` shows it: never a key.
#[derive(Debug, Serialize)]
pub struct PoolInfo {
    pub pool_id: String,
    pub shares: u8,
    pub threshold: u8,
    pub volumes: Vec<VolumeInfo>,
    pub disks: Vec<DiskInfo>,
    pub keys: Vec<KeyInfo>,
}

#[derive(Debug, Serialize)]
pub struct VolumeInfo {
    pub name: String,
    pub id: u64,
    pub size: u64,
    pub data_chunks: u16,
    pub parity_chunks: u16,
    pub chunk_size: u32,
    pub stripes: u64,
    pub journal_size: u64,
    pub allocated_blocks: u64,
}

#[derive(Debug, Serialize)]
pub struct DiskInfo {
    pub id: u32,
    pub path: String,
    pub domain: String,
    pub size: u64,
    pub state: String,
    /// What the disk's superblock says: "ok (seq N)" or the error.
    pub superblock: String,
}

#[derive(Debug, Serialize)]
pub struct KeyInfo {
    pub version: u32,
    pub state: String,
    pub created_unix: u64,
}

/// Describes a pool from its store and disks, without unlocking it.
pub fn inspect(dir: &Path) -> Result<PoolInfo, PoolError> {
    let path = dir.join(STORE_FILE);
    if !path.exists() {
        return Err(PoolError::Invalid(format!(
            "{} is not a shardvol pool (no {STORE_FILE})",
            dir.display()
        )));
    }
    let store = MetaStore::open(&path)?;
    let pool = store.pool()?;
    let alloc = |id| {
        store.alloc_load(id).map(|v| {
            v.iter()
                .map(|(_, w)| w.iter().map(|x| u64::from(x.count_ones())).sum::<u64>())
                .sum()
        })
    };
    let volumes = store
        .volumes()?
        .into_iter()
        .map(|v| {
            Ok(VolumeInfo {
                allocated_blocks: alloc(v.id)?,
                stripes: v.geometry.stripes_for(v.size),
                name: v.name,
                id: v.id,
                size: v.size,
                data_chunks: v.geometry.k,
                parity_chunks: v.geometry.m,
                chunk_size: v.geometry.chunk_size,
                journal_size: v.journal_size,
            })
        })
        .collect::<Result<Vec<_>, PoolError>>()?;
    let disks = store
        .disks()?
        .into_iter()
        .map(|d| {
            let superblock = match crate::disk::open_disk(&d.path, &DiskOptions::default()) {
                Ok(disk) => match read_superblock(disk.as_ref()) {
                    Ok(sb) if sb.pool.pool_id == pool.pool_id => format!("ok (seq {})", sb.seq),
                    Ok(_) => "belongs to another pool".to_string(),
                    Err(e) => e.to_string(),
                },
                Err(e) => e.to_string(),
            };
            DiskInfo {
                id: d.id.0,
                path: d.path.display().to_string(),
                domain: d.domain,
                size: d.size,
                state: format!("{:?}", d.state).to_lowercase(),
                superblock,
            }
        })
        .collect();
    let keys = store
        .keys()?
        .into_iter()
        .map(|k| KeyInfo {
            version: k.version,
            state: format!("{:?}", k.state).to_lowercase(),
            created_unix: k.created_unix,
        })
        .collect();
    Ok(PoolInfo {
        pool_id: hex(&pool.pool_id),
        shares: pool.share_count,
        threshold: pool.threshold,
        volumes,
        disks,
        keys,
    })
}

/// Lower-case hex.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Records the creation of a pool, MAC'd under the new master key's audit key.
fn audit_pool_create(
    opts: &CreateOptions,
    store: &Arc<MetaStore>,
    pool_id: &[u8; 16],
    master: &MasterKey,
) -> Result<(), PoolError> {
    let key = AuditKey::from_master(pool_id, master, 1)?;
    AuditLog::open(&opts.pool, store.clone()).append(
        EventKind::PoolCreate,
        audit_fields([
            ("pool_id", hex(pool_id)),
            ("volume", opts.volume.clone()),
            ("size", opts.size.to_string()),
            ("geometry", format!("{}+{}", opts.data, opts.parity)),
            ("shares", opts.shares.to_string()),
            ("threshold", opts.threshold.to_string()),
        ]),
        Some(&key),
    )?;
    Ok(())
}

/// Records a refused unlock (sealed: no key). A failure to record it is logged, not returned:
/// the caller reports the refusal itself.
pub(crate) fn audit_unlock_refused(audit: &AuditLog, shares: &str, e: &PoolError) {
    let f = audit_fields([
        ("shares", shares.to_string()),
        ("outcome", "refused".to_string()),
        ("reason", e.to_string()),
    ]);
    if let Err(err) = audit.append(EventKind::UnlockRefused, f, None) {
        tracing::warn!(error = %err, "cannot record the refused unlock in the audit log");
    }
}

/// Records an unseal refused by the access windows (sealed: no key); a failure to record it is
/// logged, not returned.
pub(crate) fn audit_policy_refusal(
    audit: &AuditLog,
    shares: &str,
    r: &crate::kms::policy::PolicyRefusal,
) {
    tracing::warn!(refusal = %r, "unseal refused by policy");
    let f = audit_fields([("shares", shares.to_string()), ("reason", r.to_string())]);
    if let Err(err) = audit.append(EventKind::PolicyRefusal, f, None) {
        tracing::warn!(error = %err, "cannot record the policy refusal in the audit log");
    }
}

/// Share indexes of the given shares, for audit records.
pub(crate) fn share_indexes(shares: &[LoadedShare]) -> String {
    shares
        .iter()
        .map(|s| s.share.index.to_string())
        .collect::<Vec<_>>()
        .join(",")
}
