//! The pool's redb store. Tables, keys and values are listed in `docs/formats-superblock.md`.

use std::fmt::Display;
use std::fs::{self, OpenOptions};
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use redb::backends::FileBackend;
use redb::{
    Builder, Database, DatabaseError, ReadableDatabase, ReadableTable, StorageBackend,
    TableDefinition, TableError,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{DiskRecord, KeyRecord, MetaError, PoolRecord, VolumeRecord};
use crate::layout::DiskId;

/// Format version of the store's tables and values, kept in the `shardvol` table.
pub const STORE_FORMAT_VERSION: u32 = 1;

/// `"format_version"` → u32: marks the file as a shardvol store and says how to read it.
const FORMAT: TableDefinition<&str, u32> = TableDefinition::new("shardvol");
const FORMAT_KEY: &str = "format_version";
/// `"pool"` → JSON [`PoolRecord`] (one row).
const POOL: TableDefinition<&str, &[u8]> = TableDefinition::new("pool");
const POOL_KEY: &str = "pool";
/// disk id → JSON [`DiskRecord`].
const DISKS: TableDefinition<u32, &[u8]> = TableDefinition::new("disks");
/// volume id → JSON [`VolumeRecord`].
const VOLUMES: TableDefinition<u64, &[u8]> = TableDefinition::new("volumes");
/// volume name → volume id (names are unique).
const VOLUME_NAMES: TableDefinition<&str, u64> = TableDefinition::new("volume_names");
/// master key version → JSON [`KeyRecord`] (wrapped key: ciphertext only).
const KEYS: TableDefinition<u32, &[u8]> = TableDefinition::new("keys");
/// (volume id, stripe) → allocation bitmap, little-endian u64 words.
const ALLOC: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("alloc");
/// name → JSON value of the key lifecycle (`docs/key-lifecycle.md`): `"epochs"` (epoch
/// history), `"key_times"` (archive and destroy times of master versions). Created on first
/// write, so stores made before it open unchanged.
const LIFECYCLE: TableDefinition<&str, &[u8]> = TableDefinition::new("key_lifecycle");
/// (volume id, stripe) → generation stamps of the stripe's blocks as the chunk slots hold them:
/// 16 bytes per block (generation u64, key version u32, epoch u32, little-endian; all zero for a
/// block that holds nothing). Written in the same transaction as the stripe's `alloc` entry.
const STAMPS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("stamps");
/// `"head"` → seq (u64 BE) ‖ SHA-256 hash (32 bytes) of the newest audit-log record (`crate::audit`).
/// Created by the first [`MetaStore::put_audit_head`]; stores made earlier simply lack it.
const AUDIT_HEAD: TableDefinition<&str, &[u8]> = TableDefinition::new("audit_head");
const AUDIT_HEAD_KEY: &str = "head";

/// The pool's redb database.
pub struct MetaStore {
    db: Database,
    path: PathBuf,
}

fn store_err(path: &Path, what: &str, e: impl Display) -> MetaError {
    MetaError::Store {
        path: path.to_path_buf(),
        msg: format!("{what}: {e}"),
    }
}

fn open_err(path: &Path, e: DatabaseError) -> MetaError {
    match e {
        DatabaseError::DatabaseAlreadyOpen => MetaError::Store {
            path: path.to_path_buf(),
            msg: "is already open (by another shardvol process?)".into(),
        },
        DatabaseError::UpgradeRequired(v) => MetaError::Store {
            path: path.to_path_buf(),
            msg: format!("is in redb file format {v}, which this build does not read"),
        },
        e => store_err(
            path,
            "cannot open (not a shardvol metadata store, or damaged)",
            e,
        ),
    }
}

fn encode_words(words: &[u64]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

fn decode_words(bytes: &[u8]) -> Option<Vec<u64>> {
    if !bytes.len().is_multiple_of(8) {
        return None;
    }
    Some(
        bytes
            .chunks_exact(8)
            .map(|c| {
                let mut a = [0u8; 8];
                a.copy_from_slice(c);
                u64::from_le_bytes(a)
            })
            .collect(),
    )
}

impl MetaStore {
    fn builder() -> Builder {
        let mut b = Builder::new();
        // Verify every page checksum at open: a damaged or foreign file is an error, not a panic.
        b.set_check_integrity_on_open(true);
        b
    }

    /// Creates a new, empty store at `path`: all tables and the format-version entry, in one
    /// durable transaction. Fails if `path` exists. On failure the new file is removed.
    pub fn create(path: &Path) -> Result<Self, MetaError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| {
                if e.kind() == ErrorKind::AlreadyExists {
                    MetaError::Store {
                        path: path.to_path_buf(),
                        msg: "already exists; refusing to create a store over it".into(),
                    }
                } else {
                    store_err(path, "cannot create", e)
                }
            })?;
        let result = Self::init_new(path, file);
        if result.is_err() {
            let _ = fs::remove_file(path);
        }
        result
    }

    fn init_new(path: &Path, file: fs::File) -> Result<Self, MetaError> {
        let backend = FileBackend::new(file).map_err(|e| store_err(path, "cannot create", e))?;
        let db = Self::builder()
            .create_with_backend(backend)
            .map_err(|e| store_err(path, "cannot create", e))?;
        let store = MetaStore {
            db,
            path: path.to_path_buf(),
        };
        let what = "cannot initialise";
        let txn = store
            .db
            .begin_write()
            .map_err(|e| store_err(path, what, e))?;
        {
            let mut t = txn
                .open_table(FORMAT)
                .map_err(|e| store_err(path, what, e))?;
            t.insert(FORMAT_KEY, STORE_FORMAT_VERSION)
                .map_err(|e| store_err(path, what, e))?;
            txn.open_table(POOL).map_err(|e| store_err(path, what, e))?;
            txn.open_table(DISKS)
                .map_err(|e| store_err(path, what, e))?;
            txn.open_table(VOLUMES)
                .map_err(|e| store_err(path, what, e))?;
            txn.open_table(VOLUME_NAMES)
                .map_err(|e| store_err(path, what, e))?;
            txn.open_table(KEYS).map_err(|e| store_err(path, what, e))?;
            txn.open_table(ALLOC)
                .map_err(|e| store_err(path, what, e))?;
            txn.open_table(STAMPS)
                .map_err(|e| store_err(path, what, e))?;
        }
        txn.commit().map_err(|e| store_err(path, what, e))?;
        Ok(store)
    }

    /// Opens the store at `path`. Fails if it is missing, is not a redb database, is damaged, has
    /// no shardvol format-version entry, or has a format version this build does not read.
    pub fn open(path: &Path) -> Result<Self, MetaError> {
        match fs::metadata(path) {
            Ok(m) if m.is_file() && m.len() > 0 => {}
            // redb would initialise an empty file as a new database: refuse instead.
            Ok(m) if m.is_file() => {
                return Err(MetaError::Store {
                    path: path.to_path_buf(),
                    msg: "is empty: not a shardvol metadata store".into(),
                });
            }
            Ok(_) => {
                return Err(MetaError::Store {
                    path: path.to_path_buf(),
                    msg: "is not a regular file".into(),
                });
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Err(MetaError::Store {
                    path: path.to_path_buf(),
                    msg: "does not exist (create the pool first, or check the path)".into(),
                });
            }
            Err(e) => return Err(store_err(path, "cannot open", e)),
        }
        let db = Self::builder().open(path).map_err(|e| open_err(path, e))?;
        Self::checked(db, path)
    }

    /// Opens an existing store kept on any redb storage backend rather than a file: crash tests
    /// use one whose writes a simulated power cut can lose. `label` names the store in errors.
    /// Like [`MetaStore::open`], it refuses anything that is not a shardvol store.
    pub fn open_on(label: &Path, backend: impl StorageBackend) -> Result<Self, MetaError> {
        let db = Self::builder()
            .create_with_backend(backend)
            .map_err(|e| open_err(label, e))?;
        Self::checked(db, label)
    }

    /// The store on `db`, once its format-version entry says it is a store this build reads.
    fn checked(db: Database, path: &Path) -> Result<Self, MetaError> {
        let store = MetaStore {
            db,
            path: path.to_path_buf(),
        };
        let not_ours = "not a shardvol metadata store (no format version entry)";
        let txn = store
            .db
            .begin_read()
            .map_err(|e| store_err(path, "cannot read", e))?;
        let table = match txn.open_table(FORMAT) {
            Ok(t) => t,
            Err(TableError::TableDoesNotExist(_)) => {
                return Err(MetaError::Store {
                    path: path.to_path_buf(),
                    msg: not_ours.into(),
                });
            }
            Err(e) => return Err(store_err(path, not_ours, e)),
        };
        let version = table
            .get(FORMAT_KEY)
            .map_err(|e| store_err(path, "cannot read the format version", e))?
            .map(|g| g.value());
        match version {
            Some(STORE_FORMAT_VERSION) => {}
            Some(v) if v > STORE_FORMAT_VERSION => {
                return Err(MetaError::Store {
                    path: path.to_path_buf(),
                    msg: format!(
                        "format version {v} is newer than this build reads ({STORE_FORMAT_VERSION}); use a newer shardvol"
                    ),
                });
            }
            Some(v) => {
                return Err(MetaError::Store {
                    path: path.to_path_buf(),
                    msg: format!("invalid format version {v}"),
                });
            }
            None => {
                return Err(MetaError::Store {
                    path: path.to_path_buf(),
                    msg: not_ours.into(),
                });
            }
        }
        drop(table);
        drop(txn);
        Ok(store)
    }

    /// Path of the store file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, what: &str, e: impl Display) -> MetaError {
        store_err(&self.path, what, e)
    }

    fn encode_json<T: Serialize>(&self, what: &str, v: &T) -> Result<Vec<u8>, MetaError> {
        serde_json::to_vec(v).map_err(|e| self.err(what, e))
    }

    fn decode_json<T: DeserializeOwned>(&self, what: &str, bytes: &[u8]) -> Result<T, MetaError> {
        serde_json::from_slice(bytes).map_err(|e| self.err(&format!("{what} is damaged"), e))
    }

    /// Reads every row of a JSON-valued table, in key order.
    fn read_all<K, T>(
        &self,
        def: TableDefinition<K, &[u8]>,
        what: &str,
    ) -> Result<Vec<T>, MetaError>
    where
        K: redb::Key + 'static,
        T: DeserializeOwned,
    {
        let ctx = format!("cannot read {what}");
        let txn = self.db.begin_read().map_err(|e| self.err(&ctx, e))?;
        let table = txn.open_table(def).map_err(|e| self.err(&ctx, e))?;
        let mut out = Vec::new();
        for row in table.iter().map_err(|e| self.err(&ctx, e))? {
            let (_, v) = row.map_err(|e| self.err(&ctx, e))?;
            out.push(self.decode_json(what, v.value())?);
        }
        Ok(out)
    }

    /// Reads one row of a JSON-valued table.
    fn read_one<'k, K, T>(
        &self,
        def: TableDefinition<K, &[u8]>,
        key: impl std::borrow::Borrow<K::SelfType<'k>>,
        what: &str,
    ) -> Result<Option<T>, MetaError>
    where
        K: redb::Key + 'static,
        T: DeserializeOwned,
    {
        let ctx = format!("cannot read {what}");
        let txn = self.db.begin_read().map_err(|e| self.err(&ctx, e))?;
        let table = txn.open_table(def).map_err(|e| self.err(&ctx, e))?;
        let row = table.get(key).map_err(|e| self.err(&ctx, e))?;
        row.map(|v| self.decode_json(what, v.value())).transpose()
    }

    /// Writes one row of a JSON-valued table in its own durable transaction.
    fn write_one<'k, K>(
        &self,
        def: TableDefinition<K, &[u8]>,
        key: impl std::borrow::Borrow<K::SelfType<'k>>,
        value: &[u8],
        what: &str,
    ) -> Result<(), MetaError>
    where
        K: redb::Key + 'static,
    {
        let ctx = format!("cannot write {what}");
        let txn = self.db.begin_write().map_err(|e| self.err(&ctx, e))?;
        {
            let mut table = txn.open_table(def).map_err(|e| self.err(&ctx, e))?;
            table.insert(key, value).map_err(|e| self.err(&ctx, e))?;
        }
        txn.commit().map_err(|e| self.err(&ctx, e))
    }

    /// The pool record; an error if it was never written.
    pub fn pool(&self) -> Result<PoolRecord, MetaError> {
        self.read_one(POOL, POOL_KEY, "the pool record")?
            .ok_or_else(|| {
                self.err(
                    "no pool record",
                    "the store was created but the pool never initialised",
                )
            })
    }

    /// Writes (or replaces) the pool record.
    pub fn put_pool(&self, p: &PoolRecord) -> Result<(), MetaError> {
        let v = self.encode_json("cannot encode the pool record", p)?;
        self.write_one(POOL, POOL_KEY, &v, "the pool record")
    }

    /// All disks, by id.
    pub fn disks(&self) -> Result<Vec<DiskRecord>, MetaError> {
        self.read_all(DISKS, "the disk table")
    }

    /// One disk, if present.
    pub fn disk(&self, id: DiskId) -> Result<Option<DiskRecord>, MetaError> {
        self.read_one(DISKS, id.0, &format!("disk {id}"))
    }

    /// Writes (or replaces) the record of disk `d.id`.
    pub fn put_disk(&self, d: &DiskRecord) -> Result<(), MetaError> {
        let what = format!("disk {}", d.id);
        let v = self.encode_json(&format!("cannot encode {what}"), d)?;
        self.write_one(DISKS, d.id.0, &v, &what)
    }

    /// A disk joining the pool and the volumes' rebalance records, in one transaction: either
    /// the pool has the disk and every volume knows which stripes moved, or neither.
    pub fn add_disk_with_volumes(
        &self,
        d: &DiskRecord,
        volumes: &[VolumeRecord],
    ) -> Result<(), MetaError> {
        let ctx = format!("cannot add disk {}", d.id);
        let disk = self.encode_json(&ctx, d)?;
        let txn = self.db.begin_write().map_err(|e| self.err(&ctx, e))?;
        {
            let mut disks = txn.open_table(DISKS).map_err(|e| self.err(&ctx, e))?;
            disks
                .insert(d.id.0, disk.as_slice())
                .map_err(|e| self.err(&ctx, e))?;
            let mut vols = txn.open_table(VOLUMES).map_err(|e| self.err(&ctx, e))?;
            for v in volumes {
                let value = self.encode_json(&ctx, v)?;
                vols.insert(v.id, value.as_slice())
                    .map_err(|e| self.err(&ctx, e))?;
            }
        }
        txn.commit().map_err(|e| self.err(&ctx, e))
    }

    /// Changes volume `id`'s record with `f` in one transaction (its name must not change).
    pub fn update_volume(
        &self,
        id: u64,
        f: impl FnOnce(&mut VolumeRecord),
    ) -> Result<VolumeRecord, MetaError> {
        let ctx = format!("cannot update volume {id}");
        let txn = self.db.begin_write().map_err(|e| self.err(&ctx, e))?;
        let rec = {
            let mut vols = txn.open_table(VOLUMES).map_err(|e| self.err(&ctx, e))?;
            let mut rec: VolumeRecord = match vols.get(id).map_err(|e| self.err(&ctx, e))? {
                Some(g) => self.decode_json(&format!("volume {id}"), g.value())?,
                None => return Err(self.err(&ctx, "no such volume")),
            };
            let name = rec.name.clone();
            f(&mut rec);
            if rec.name != name {
                return Err(self.err(&ctx, "the name cannot change here"));
            }
            let value = self.encode_json(&ctx, &rec)?;
            vols.insert(id, value.as_slice())
                .map_err(|e| self.err(&ctx, e))?;
            rec
        };
        txn.commit().map_err(|e| self.err(&ctx, e))?;
        Ok(rec)
    }

    /// All volumes, by id.
    pub fn volumes(&self) -> Result<Vec<VolumeRecord>, MetaError> {
        self.read_all(VOLUMES, "the volume table")
    }

    /// One volume by id, if present.
    pub fn volume(&self, id: u64) -> Result<Option<VolumeRecord>, MetaError> {
        self.read_one(VOLUMES, id, &format!("volume {id}"))
    }

    /// One volume by name, if present.
    pub fn volume_by_name(&self, name: &str) -> Result<Option<VolumeRecord>, MetaError> {
        let ctx = format!("cannot look up volume {name:?}");
        let id = {
            let txn = self.db.begin_read().map_err(|e| self.err(&ctx, e))?;
            let names = txn
                .open_table(VOLUME_NAMES)
                .map_err(|e| self.err(&ctx, e))?;
            names
                .get(name)
                .map_err(|e| self.err(&ctx, e))?
                .map(|g| g.value())
        };
        match id {
            Some(id) => self.volume(id),
            None => Ok(None),
        }
    }

    /// Writes (or replaces) volume `v.id` and its name entry, in one transaction. Fails if another
    /// volume already has the name. Renaming a volume frees its old name.
    pub fn put_volume(&self, v: &VolumeRecord) -> Result<(), MetaError> {
        let ctx = format!("cannot write volume {} ({:?})", v.id, v.name);
        let value = self.encode_json(&ctx, v)?;
        let txn = self.db.begin_write().map_err(|e| self.err(&ctx, e))?;
        {
            let mut names = txn
                .open_table(VOLUME_NAMES)
                .map_err(|e| self.err(&ctx, e))?;
            let mut vols = txn.open_table(VOLUMES).map_err(|e| self.err(&ctx, e))?;
            let holder = names
                .get(v.name.as_str())
                .map_err(|e| self.err(&ctx, e))?
                .map(|g| g.value());
            if let Some(other) = holder.filter(|&id| id != v.id) {
                return Err(self.err(
                    &ctx,
                    format_args!("the name is already used by volume {other}"),
                ));
            }
            let old: Option<VolumeRecord> = match vols.get(v.id).map_err(|e| self.err(&ctx, e))? {
                Some(g) => Some(self.decode_json(&format!("volume {}", v.id), g.value())?),
                None => None,
            };
            if let Some(old) = old.filter(|o| o.name != v.name) {
                names
                    .remove(old.name.as_str())
                    .map_err(|e| self.err(&ctx, e))?;
            }
            names
                .insert(v.name.as_str(), v.id)
                .map_err(|e| self.err(&ctx, e))?;
            vols.insert(v.id, value.as_slice())
                .map_err(|e| self.err(&ctx, e))?;
        }
        txn.commit().map_err(|e| self.err(&ctx, e))
    }

    /// Removes volume `id`, its name and its allocation bitmaps, in one transaction. Returns
    /// whether the volume existed.
    pub fn remove_volume(&self, id: u64) -> Result<bool, MetaError> {
        let ctx = format!("cannot remove volume {id}");
        let txn = self.db.begin_write().map_err(|e| self.err(&ctx, e))?;
        let existed = {
            let mut names = txn
                .open_table(VOLUME_NAMES)
                .map_err(|e| self.err(&ctx, e))?;
            let mut vols = txn.open_table(VOLUMES).map_err(|e| self.err(&ctx, e))?;
            let mut alloc = txn.open_table(ALLOC).map_err(|e| self.err(&ctx, e))?;
            let old: Option<VolumeRecord> = match vols.remove(id).map_err(|e| self.err(&ctx, e))? {
                Some(g) => Some(self.decode_json(&format!("volume {id}"), g.value())?),
                None => None,
            };
            if let Some(old) = &old {
                names
                    .remove(old.name.as_str())
                    .map_err(|e| self.err(&ctx, e))?;
            }
            alloc
                .retain_in((id, 0u64)..=(id, u64::MAX), |_, _| false)
                .map_err(|e| self.err(&ctx, e))?;
            txn.open_table(STAMPS)
                .map_err(|e| self.err(&ctx, e))?
                .retain_in((id, 0u64)..=(id, u64::MAX), |_, _| false)
                .map_err(|e| self.err(&ctx, e))?;
            old.is_some()
        };
        txn.commit().map_err(|e| self.err(&ctx, e))?;
        Ok(existed)
    }

    /// All master key records, by version.
    pub fn keys(&self) -> Result<Vec<KeyRecord>, MetaError> {
        self.read_all(KEYS, "the key table")
    }

    /// One master key record, if present.
    pub fn key(&self, version: u32) -> Result<Option<KeyRecord>, MetaError> {
        self.read_one(KEYS, version, &format!("master key version {version}"))
    }

    /// Writes (or replaces) the record of master key `k.version`.
    pub fn put_key(&self, k: &KeyRecord) -> Result<(), MetaError> {
        let what = format!("master key version {}", k.version);
        let v = self.encode_json(&format!("cannot encode {what}"), k)?;
        self.write_one(KEYS, k.version, &v, &what)
    }

    /// Allocation bitmaps of a volume: (stripe, one bit per logical block of the stripe).
    pub fn alloc_load(&self, volume: u64) -> Result<Vec<(u64, Vec<u64>)>, MetaError> {
        let ctx = format!("cannot read allocation bitmaps of volume {volume}");
        let txn = self.db.begin_read().map_err(|e| self.err(&ctx, e))?;
        let table = txn.open_table(ALLOC).map_err(|e| self.err(&ctx, e))?;
        let mut out = Vec::new();
        for row in table
            .range((volume, 0u64)..=(volume, u64::MAX))
            .map_err(|e| self.err(&ctx, e))?
        {
            let (k, v) = row.map_err(|e| self.err(&ctx, e))?;
            let (_, stripe) = k.value();
            let words = decode_words(v.value()).ok_or_else(|| {
                self.err(
                    &ctx,
                    format_args!(
                        "the entry of stripe {stripe} is damaged (length not a multiple of 8)"
                    ),
                )
            })?;
            out.push((stripe, words));
        }
        Ok(out)
    }

    /// Durably applies bitmap updates in one transaction (`None` deletes the stripe's entry).
    pub fn alloc_commit(
        &self,
        volume: u64,
        updates: &[(u64, Option<Vec<u64>>)],
    ) -> Result<(), MetaError> {
        let ctx = format!("cannot commit allocation bitmaps of volume {volume}");
        let txn = self.db.begin_write().map_err(|e| self.err(&ctx, e))?;
        {
            let mut table = txn.open_table(ALLOC).map_err(|e| self.err(&ctx, e))?;
            for (stripe, bits) in updates {
                match bits {
                    Some(words) => {
                        table
                            .insert((volume, *stripe), encode_words(words).as_slice())
                            .map_err(|e| self.err(&ctx, e))?;
                    }
                    None => {
                        table
                            .remove((volume, *stripe))
                            .map_err(|e| self.err(&ctx, e))?;
                    }
                }
            }
        }
        txn.commit().map_err(|e| self.err(&ctx, e))
    }

    /// Generation stamps of a volume: (stripe, 16 bytes per block). Stores made before stamps
    /// existed have no table: no stamps, which readers treat as "unknown".
    pub fn stamps_load(&self, volume: u64) -> Result<Vec<(u64, Vec<u8>)>, MetaError> {
        let ctx = format!("cannot read generation stamps of volume {volume}");
        let txn = self.db.begin_read().map_err(|e| self.err(&ctx, e))?;
        let table = match txn.open_table(STAMPS) {
            Ok(t) => t,
            Err(TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(self.err(&ctx, e)),
        };
        let mut out = Vec::new();
        for row in table
            .range((volume, 0u64)..=(volume, u64::MAX))
            .map_err(|e| self.err(&ctx, e))?
        {
            let (k, v) = row.map_err(|e| self.err(&ctx, e))?;
            out.push((k.value().1, v.value().to_vec()));
        }
        Ok(out)
    }

    /// Durably applies the home state of destaged stripes in one transaction: allocation bitmap
    /// and generation stamps together (`None` deletes both entries of the stripe).
    #[allow(clippy::type_complexity)]
    pub fn home_commit(
        &self,
        volume: u64,
        updates: &[(u64, Option<(Vec<u64>, Vec<u8>)>)],
    ) -> Result<(), MetaError> {
        let ctx = format!("cannot commit allocation of volume {volume}");
        let txn = self.db.begin_write().map_err(|e| self.err(&ctx, e))?;
        {
            let mut alloc = txn.open_table(ALLOC).map_err(|e| self.err(&ctx, e))?;
            let mut stamps = txn.open_table(STAMPS).map_err(|e| self.err(&ctx, e))?;
            for (stripe, entry) in updates {
                match entry {
                    Some((words, st)) => {
                        alloc
                            .insert((volume, *stripe), encode_words(words).as_slice())
                            .map_err(|e| self.err(&ctx, e))?;
                        stamps
                            .insert((volume, *stripe), st.as_slice())
                            .map_err(|e| self.err(&ctx, e))?;
                    }
                    None => {
                        alloc
                            .remove((volume, *stripe))
                            .map_err(|e| self.err(&ctx, e))?;
                        stamps
                            .remove((volume, *stripe))
                            .map_err(|e| self.err(&ctx, e))?;
                    }
                }
            }
        }
        txn.commit().map_err(|e| self.err(&ctx, e))
    }

    /// The audit log's chain head: (seq, hash) of its newest record, or `None` if no record
    /// was ever appended (or the store predates the audit log).
    pub fn audit_head(&self) -> Result<Option<(u64, [u8; 32])>, MetaError> {
        let ctx = "cannot read the audit chain head";
        let txn = self.db.begin_read().map_err(|e| self.err(ctx, e))?;
        let table = match txn.open_table(AUDIT_HEAD) {
            Ok(t) => t,
            Err(TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(self.err(ctx, e)),
        };
        let Some(v) = table.get(AUDIT_HEAD_KEY).map_err(|e| self.err(ctx, e))? else {
            return Ok(None);
        };
        let bytes = v.value();
        if bytes.len() != 40 {
            return Err(self.err(
                ctx,
                format_args!("the entry is damaged ({} bytes, expected 40)", bytes.len()),
            ));
        }
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&bytes[..8]);
        let mut hash = [0u8; 32];
        hash.copy_from_slice(&bytes[8..]);
        Ok(Some((u64::from_be_bytes(seq), hash)))
    }

    /// Durably records (seq, hash) of the audit log's newest record.
    pub fn put_audit_head(&self, seq: u64, hash: &[u8; 32]) -> Result<(), MetaError> {
        let mut v = [0u8; 40];
        v[..8].copy_from_slice(&seq.to_be_bytes());
        v[8..].copy_from_slice(hash);
        self.write_one(AUDIT_HEAD, AUDIT_HEAD_KEY, &v, "the audit chain head")
    }

    /// A value of the key-lifecycle table, `None` when absent (or when the table was never
    /// written, as in stores made before it existed).
    pub fn lifecycle_get(&self, name: &str) -> Result<Option<Vec<u8>>, MetaError> {
        let ctx = format!("cannot read key lifecycle entry {name:?}");
        let txn = self.db.begin_read().map_err(|e| self.err(&ctx, e))?;
        let table = match txn.open_table(LIFECYCLE) {
            Ok(t) => t,
            Err(TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(self.err(&ctx, e)),
        };
        let row = table.get(name).map_err(|e| self.err(&ctx, e))?;
        Ok(row.map(|v| v.value().to_vec()))
    }

    /// Writes a value of the key-lifecycle table in its own durable transaction.
    pub fn lifecycle_put(&self, name: &str, value: &[u8]) -> Result<(), MetaError> {
        self.write_one(
            LIFECYCLE,
            name,
            value,
            &format!("key lifecycle entry {name:?}"),
        )
    }
}

// ---- Self-healing: disk health and scrub results ----------------------------------------------
//
// Tables created on first write, so that pools made before them open unchanged; reading a table
// that does not exist yet gives nothing.

/// disk id → JSON disk health (counters, rebuild cursor): see `volume::health`.
const DISK_HEALTH: TableDefinition<u32, &[u8]> = TableDefinition::new("disk_health");
/// volume id → JSON result of the volume's last scrub: see `volume::scrub`.
const SCRUBS: TableDefinition<u64, &[u8]> = TableDefinition::new("scrubs");

impl MetaStore {
    /// Rows of a table that may not exist yet, in key order.
    fn read_optional<K, T>(
        &self,
        def: TableDefinition<K, &[u8]>,
        what: &str,
    ) -> Result<Vec<(K, T)>, MetaError>
    where
        K: redb::Key + 'static + for<'a> redb::Value<SelfType<'a> = K>,
        T: DeserializeOwned,
    {
        let ctx = format!("cannot read {what}");
        let txn = self.db.begin_read().map_err(|e| self.err(&ctx, e))?;
        let table = match txn.open_table(def) {
            Ok(t) => t,
            Err(TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(self.err(&ctx, e)),
        };
        let mut out = Vec::new();
        for row in table.iter().map_err(|e| self.err(&ctx, e))? {
            let (k, v) = row.map_err(|e| self.err(&ctx, e))?;
            out.push((k.value(), self.decode_json(what, v.value())?));
        }
        Ok(out)
    }

    /// Health records of every disk that has one, by disk id.
    pub fn disk_healths<T: DeserializeOwned>(&self) -> Result<Vec<(u32, T)>, MetaError> {
        self.read_optional(DISK_HEALTH, "the disk health table")
    }

    /// Writes (or replaces) the health record of disk `id`.
    pub fn put_disk_health<T: Serialize>(&self, id: DiskId, h: &T) -> Result<(), MetaError> {
        let what = format!("health of disk {id}");
        let v = self.encode_json(&format!("cannot encode {what}"), h)?;
        self.write_one(DISK_HEALTH, id.0, &v, &what)
    }

    /// Last scrub result of every volume that has one, by volume id.
    pub fn scrubs<T: DeserializeOwned>(&self) -> Result<Vec<(u64, T)>, MetaError> {
        self.read_optional(SCRUBS, "the scrub table")
    }

    /// Writes (or replaces) the last scrub result of volume `id`.
    pub fn put_scrub<T: Serialize>(&self, volume: u64, s: &T) -> Result<(), MetaError> {
        let what = format!("scrub result of volume {volume}");
        let v = self.encode_json(&format!("cannot encode {what}"), s)?;
        self.write_one(SCRUBS, volume, &v, &what)
    }
}
