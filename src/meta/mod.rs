//! Metadata: the redb store of a pool ([`MetaStore`]) and the on-disk superblock
//! ([`write_superblock`] / [`read_superblock`]).
//!
//! The store is the pool's working metadata: pool record, disk table, volumes, wrapped master
//! keys, allocation bitmaps. Every write is one durable redb transaction (redb's default
//! durability: fsynced before `commit` returns). The store refuses to create over an existing
//! file, and refuses to open a file that is missing, is not a redb database, or has no shardvol
//! format-version entry; a damaged file gives an error naming the path, never a panic (redb's
//! integrity check runs on every open).
//!
//! Every disk carries a superblock, two slots in the first [`SUPERBLOCK_AREA`] bytes, so that the
//! disks plus `t` shares recover the pool if the store is lost. The slots are written alternately
//! (slot `seq % 2`), so a torn write damages only the slot being written and the other one still
//! holds the previous superblock. Byte tables and the rules are in `docs/formats-superblock.md`.
//!
//! Value encodings: records are serde_json (small, inspectable, tolerant of added fields);
//! allocation bitmaps, the only large and numerous values, are little-endian `u64` words.

#![forbid(unsafe_code)]

mod store;
mod superblock;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::disk::DiskError;
use crate::layout::{DiskId, Geometry};

pub use store::{MetaStore, STORE_FORMAT_VERSION};
pub use superblock::{
    MAX_BODY_LEN, SLOT_HEADER_LEN, SLOT_OFFSETS, SLOT_SIZE, SUPERBLOCK_FORMAT_VERSION,
    SUPERBLOCK_MAGIC, SlotError, choose_slot, decode_slot, encode_slot, read_superblock,
    slot_for_seq, write_superblock,
};

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
pub enum DiskState {
    Ok,
    Failed,
    Rebuilding,
}

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
    /// The disks of the volume's journal, fixed by the first `disk add` (placement of the
    /// journal would otherwise change with the disk table). Empty: the disks placement gives
    /// (`Volume::journal_disks`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub journal_disks: Vec<DiskId>,
    /// A rebalance in progress after a `disk add` (`volume::rebalance`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebalance: Option<Rebalance>,
    /// When the volume was created (seconds since the epoch; 0 for volumes created before this
    /// was recorded). The first scheduled scrub comes one `[scrub] interval` after it.
    #[serde(default)]
    pub created_unix: u64,
}

/// The state of a volume's rebalance onto a grown disk table: stripes below `cursor` are
/// placed over every disk of the pool, the others still over the disks of `from`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rebalance {
    /// The disk ids of the table before the disk was added.
    pub from: Vec<DiskId>,
    /// Stripes before this one have moved.
    pub cursor: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeyState {
    Active,
    Retired,
    Archived,
    Destroyed,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    pub version: u32,
    /// The master key wrapped by the KEK (`kms::wrap_master`): ciphertext only.
    pub wrapped: Vec<u8>,
    pub state: KeyState,
    pub created_unix: u64,
}

/// Everything a disk carries to make the pool recoverable without the store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Superblock {
    /// Increases by one at every superblock update of the pool; picks the slot and the newest copy.
    pub seq: u64,
    pub disk_id: DiskId,
    pub pool: PoolRecord,
    pub disks: Vec<DiskRecord>,
    pub volumes: Vec<VolumeRecord>,
    pub keys: Vec<KeyRecord>,
}

/// Bytes reserved at the start of every disk for superblocks: two slots of 512 KiB, room for a
/// disk table and volume list of thousands of entries; 1 MiB also keeps the data area aligned
/// for any device.
pub const SUPERBLOCK_AREA: u64 = 1 << 20;
