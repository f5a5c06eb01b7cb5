//! Metadata: the redb store of a pool and the on-disk superblock. (Interface; implementation to come.)

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::disk::{Disk, DiskError};
use crate::layout::{DiskId, Geometry};

#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("metadata store {path}: {msg}")]
    Store { path: PathBuf, msg: String },
    #[error("superblock on {disk}: {msg}")]
    Superblock { disk: String, msg: String },
    #[error(transparent)]
    Disk(#[from] DiskError),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolRecord {
    pub pool_id: [u8; 16],
    pub split_id: [u8; 16],
    pub share_count: u8,
    pub threshold: u8,
    pub created_unix: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DiskState { Ok, Failed, Rebuilding }

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskRecord {
    pub id: DiskId,
    pub path: PathBuf,
    pub domain: String,
    pub size: u64,
    pub state: DiskState,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub id: u64,
    pub name: String,
    pub size: u64,
    pub geometry: Geometry,
    pub placement_seed: [u8; 32],
    /// Byte offset, identical on every disk, where this volume's region starts.
    pub region_offset: u64,
    /// Bytes of the region reserved for the journal (the data area follows it).
    pub journal_size: u64,
    /// Bytes of the whole region on each disk.
    pub region_size: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeyState { Active, Retired, Archived, Destroyed }

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    pub version: u32,
    pub wrapped: Vec<u8>,
    pub state: KeyState,
    pub created_unix: u64,
}

/// Everything a disk carries to make the pool recoverable without the store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Superblock {
    pub seq: u64,
    pub disk_id: DiskId,
    pub pool: PoolRecord,
    pub disks: Vec<DiskRecord>,
    pub volumes: Vec<VolumeRecord>,
    pub keys: Vec<KeyRecord>,
}

/// Bytes reserved at the start of every disk for superblocks.
pub const SUPERBLOCK_AREA: u64 = 1 << 20;

pub fn write_superblock(_disk: &dyn Disk, _sb: &Superblock) -> Result<(), MetaError> { todo!() }
pub fn read_superblock(_disk: &dyn Disk) -> Result<Superblock, MetaError> { todo!() }

/// The pool's redb database.
pub struct MetaStore;
impl MetaStore {
    pub fn create(_path: &Path) -> Result<Self, MetaError> { todo!() }
    pub fn open(_path: &Path) -> Result<Self, MetaError> { todo!() }
    pub fn pool(&self) -> Result<PoolRecord, MetaError> { todo!() }
    pub fn put_pool(&self, _p: &PoolRecord) -> Result<(), MetaError> { todo!() }
    pub fn disks(&self) -> Result<Vec<DiskRecord>, MetaError> { todo!() }
    pub fn put_disk(&self, _d: &DiskRecord) -> Result<(), MetaError> { todo!() }
    pub fn volumes(&self) -> Result<Vec<VolumeRecord>, MetaError> { todo!() }
    pub fn put_volume(&self, _v: &VolumeRecord) -> Result<(), MetaError> { todo!() }
    pub fn keys(&self) -> Result<Vec<KeyRecord>, MetaError> { todo!() }
    pub fn put_key(&self, _k: &KeyRecord) -> Result<(), MetaError> { todo!() }
    /// Allocation bitmaps of a volume: (stripe, one bit per logical block of the stripe).
    pub fn alloc_load(&self, _volume: u64) -> Result<Vec<(u64, Vec<u64>)>, MetaError> { todo!() }
    /// Durably applies bitmap updates in one transaction (`None` deletes the stripe's entry).
    pub fn alloc_commit(&self, _volume: u64, _updates: &[(u64, Option<Vec<u64>>)]) -> Result<(), MetaError> { todo!() }
}
