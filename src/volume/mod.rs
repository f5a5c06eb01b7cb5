//! Volumes: byte ranges → blocks and stripes; the journal, destaging, locking and
//! read-modify-write. docs/write-path.md explains the mechanism and its cost.
//!
//! What a [`Volume`] promises (DESIGN.md invariants 1–3):
//! - a write is encrypted, tagged and appended to the journal (replicated on `m + 1` disks)
//!   before it is acknowledged; [`BlockDevice::flush`] and FUA wait for the journal's fsync;
//! - reads see the newest data: the journal index first, then the chunk slots on the disks;
//!   blocks never written (or trimmed) read as zeros without touching a disk;
//! - a background destager merges journaled blocks into stripes (full stripes without reading,
//!   read-modify-write of the touched rows otherwise), fsyncs the disks, persists the allocation
//!   bitmaps, then checkpoints the journal. Destaging is idempotent, so after a crash the journal
//!   is replayed from its last checkpoint and destaged again: a crash can never leave parity
//!   that disagrees with data (no write hole);
//! - every block read from a disk is checked against its tag; a block that fails (or whose disk
//!   fails) is rebuilt from the other chunks of its row and, where its disk still answers,
//!   written back (self-healing read). A block that cannot be rebuilt is an error, never data.
//!
//! Concurrency: writes to one stripe are serialised by a stripe lock (held from journal
//! reservation to index update, so sequence numbers follow the order of updates); reads of a
//! stripe share the lock; different stripes proceed in parallel.

mod destage;
pub mod format;
mod fresh;
pub mod health;
mod io;
pub mod journal;
pub mod mem;
pub mod rebalance;
pub mod rebuild;
mod rekey;
mod scan;
pub mod scrub;
pub mod state;

pub use self::rekey::{AccessCounter, KeyUsage};

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing::{info, warn};

use self::format::{
    BlockMeta, MAX_RECORD_BLOCKS, RecordHeader, RecordKind, RegionLayout, blocks_of, header_pages,
    record_len,
};
use self::health::Health;
use self::journal::{Journal, Reservation};
pub use self::scan::AllocScan;
use self::state::{Alloc, Bits, Dirty, JEntry, LockTable, Stamp, StripeDirty, Trims};
use crate::crypto::{CryptoError, KeyRing, ShardKeyId};
use crate::disk::{DiskRef, IoBuf};
use crate::erasure::Codec;
use crate::layout::placement::{Placement, PlacementDisk};
use crate::layout::{BLOCK_SIZE, BLOCK_SIZE_U64, BlockPos, DiskId, Lba, StripeId};
use crate::meta::{MetaStore, VolumeRecord};

/// Errors of the volume API. The NBD layer maps them to NBD error codes in one place.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("range {offset}+{len} is outside the volume ({size} bytes)")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("volume is read-only")]
    ReadOnly,
    #[error("I/O error: {0}")]
    Io(String),
    #[error("block {lba} cannot be read: {why}")]
    Unrecoverable { lba: u64, why: String },
    #[error("volume configuration: {0}")]
    Config(String),
}

impl From<journal::JournalError> for VolumeError {
    fn from(e: journal::JournalError) -> Self {
        VolumeError::Io(e.to_string())
    }
}

impl From<CryptoError> for VolumeError {
    fn from(e: CryptoError) -> Self {
        VolumeError::Io(e.to_string())
    }
}

/// One run of a block-status answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub len: u64,
    /// Never written or trimmed: reads as zeros and holds no space.
    pub hole: bool,
}

/// The volume API the NBD server uses. Byte ranges of any alignment; safe under concurrent
/// callers. Calls block (run them off the async executor).
pub trait BlockDevice: Send + Sync + 'static {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Fills `buf` with the bytes at `offset`.
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), VolumeError>;
    /// Writes `data` at `offset`; with `fua` the data is durable when this returns.
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), VolumeError>;
    /// Makes every write that completed before this call durable (on any connection).
    fn flush(&self) -> Result<(), VolumeError>;
    /// The range reads as zeros afterwards; whole blocks inside it free their space.
    fn trim(&self, offset: u64, len: u64) -> Result<(), VolumeError>;
    /// The range reads as zeros afterwards; whole blocks free their space unless `no_hole`.
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        no_hole: bool,
        fua: bool,
    ) -> Result<(), VolumeError>;
    /// Allocation status of `[offset, offset+len)` as consecutive extents covering it.
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, VolumeError>;
    /// Writes `data` at `offset` (without FUA) on the calling thread, if that needs no wait
    /// for a lock, journal space, a device or a sync. `None`: it would have waited, nothing was
    /// done, and the caller uses [`BlockDevice::write`]. The NBD server calls this on its async
    /// threads, which must not block, to spare small writes the hand-off to a worker thread.
    fn try_write_now(&self, _offset: u64, _data: &[u8]) -> Option<Result<(), VolumeError>> {
        None
    }
}

/// Largest write [`BlockDevice::try_write_now`] takes on the caller's thread: 64 KiB is
/// sealed and copied to the journal replicas in tens of microseconds, a bound the async
/// threads of the server can afford (see `docs/nbd.md`).
pub const WRITE_NOW_MAX: u64 = 64 * 1024;

/// Which master key version and epoch new writes use. Shared by the volumes of a pool.
#[derive(Debug)]
pub struct WriteKey {
    version: AtomicU64,
    epoch: AtomicU64,
}

impl WriteKey {
    pub fn new(version: u32, epoch: u32) -> Self {
        Self {
            version: AtomicU64::new(version.into()),
            epoch: AtomicU64::new(epoch.into()),
        }
    }
    pub fn get(&self) -> (u32, u32) {
        (
            self.version.load(Ordering::Relaxed) as u32,
            self.epoch.load(Ordering::Relaxed) as u32,
        )
    }
    pub fn set(&self, version: u32, epoch: u32) {
        self.version.store(version.into(), Ordering::Relaxed);
        self.epoch.store(epoch.into(), Ordering::Relaxed);
    }
}

/// Counters, read by `status` and tests.
#[derive(Debug, Default)]
pub struct Stats {
    pub blocks_written: AtomicU64,
    pub blocks_read: AtomicU64,
    pub blocks_reconstructed: AtomicU64,
    pub blocks_repaired: AtomicU64,
    pub stripes_destaged: AtomicU64,
    pub full_stripe_destages: AtomicU64,
    /// Checkpoints a destage round took before its end, freeing the journal's tail early
    /// (`destage.rs`, `Volume::round_parts`).
    pub early_checkpoints: AtomicU64,
    /// Whole stripes written in place without the journal (empty stripes, `fresh.rs`).
    pub fresh_stripe_writes: AtomicU64,
    pub destage_errors: AtomicU64,
    /// Blocks whose slot held a valid but older copy (generation below the recorded one).
    pub rollbacks_detected: AtomicU64,
    /// Blocks re-encrypted under a newer key by [`Volume::rekey_stripe`].
    pub blocks_rekeyed: AtomicU64,
    /// Stripes rewritten over a new disk table (`rebalance.rs`).
    pub stripes_rebalanced: AtomicU64,
}

/// Journal space (fraction of capacity) above which the destager runs without waiting for
/// its timer: leaves half the journal to absorb bursts while destaging catches up.
const DESTAGE_HIGH_WATER: f64 = 0.5;
/// Idle period after which the destager drains whatever is journaled: short enough that a
/// quiet volume's journal empties within a second, long enough to merge bursts into stripes.
const DESTAGE_INTERVAL: Duration = Duration::from_millis(200);
/// How long a writer waits for journal space before giving up with an I/O error. The
/// destager frees space within milliseconds unless the disks fail.
const JOURNAL_FULL_TIMEOUT: Duration = Duration::from_secs(30);

/// Domain label of the tag that seals journal headers and checkpoints (block tags use the
/// 32-byte metadata header instead, so the two can never be confused).
const JOURNAL_SEAL_LABEL: &[u8] = b"shardvol journal seal v1";

/// Everything needed to open a volume.
pub struct VolumeParts {
    pub record: VolumeRecord,
    /// Every disk of the pool by id.
    pub disks: HashMap<DiskId, DiskRef>,
    /// The pool's disk table, for placement.
    pub table: Vec<PlacementDisk>,
    pub keys: Arc<KeyRing>,
    pub write_key: Arc<WriteKey>,
    pub store: Arc<MetaStore>,
}

/// An open volume.
pub struct Volume {
    record: VolumeRecord,
    layout: RegionLayout,
    /// Proxies of the pool's disks by id (grows when a disk is added).
    disks: RwLock<HashMap<DiskId, DiskRef>>,
    /// Where stripes are: one table, or two during a rebalance (`rebalance.rs`).
    placement: RwLock<rebalance::Placements>,
    codec: Codec,
    keys: Arc<KeyRing>,
    write_key: Arc<WriteKey>,
    journal: Journal,
    locks: LockTable,
    dirty: Mutex<Dirty>,
    alloc: Alloc,
    store: Arc<MetaStore>,
    destage_lock: Mutex<()>,
    /// Stripes written by `write_fresh_stripe` whose allocation is not committed yet.
    fresh: Mutex<Vec<u64>>,
    /// Whether the home bitmaps say what the slots hold (false in offline recovery, where
    /// the store was rebuilt without them): only then is a stripe with nothing at home empty.
    allocation_known: bool,
    kick: Condvar,
    kick_flag: Mutex<bool>,
    stop: AtomicBool,
    destager: Mutex<Option<JoinHandle<()>>>,
    pub stats: Stats,
    /// The pool's disk health registry (see [`health`]).
    health: Arc<Health>,
    /// Accesses per stripe, for the rotation task's "hot stripe" rule (`rekey.rs`).
    access: AccessCounter,
}

impl Volume {
    /// The region layout of a volume record.
    pub fn layout_of(record: &VolumeRecord) -> RegionLayout {
        RegionLayout {
            geometry: record.geometry,
            region_offset: record.region_offset,
            journal_size: record.journal_size,
            stripes: record.geometry.stripes_for(record.size),
        }
    }

    /// The journal disks of a volume: the first `m + 1` disks that placement gives a stripe
    /// number no data stripe uses.
    pub fn journal_disks(
        placement: &Placement,
        record: &VolumeRecord,
    ) -> Result<Vec<DiskId>, VolumeError> {
        if !record.journal_disks.is_empty() {
            return Ok(record.journal_disks.clone());
        }
        let width = record.geometry.width();
        let mut d = placement
            .place(StripeId(u64::MAX), width)
            .map_err(|e| VolumeError::Config(e.to_string()))?;
        d.truncate(usize::from(record.geometry.m) + 1);
        Ok(d)
    }

    fn placement_of(parts: &VolumeParts) -> Result<Placement, VolumeError> {
        Placement::new(parts.record.placement_seed, parts.table.clone())
            .map_err(|e| VolumeError::Config(e.to_string()))
    }

    /// The volume's disks for `ids`, in order (proxies through the health registry).
    fn disk_refs(&self, ids: &[DiskId]) -> Result<Vec<DiskRef>, VolumeError> {
        {
            let map = self.disks.read().unwrap_or_else(|p| p.into_inner());
            if ids.iter().all(|id| map.contains_key(id)) {
                return Self::refs_in(&map, ids);
            }
        }
        // A disk added to the pool since the volume opened.
        let mut map = self.disks.write().unwrap_or_else(|p| p.into_inner());
        for id in ids {
            if !map.contains_key(id) && self.health.ids().contains(id) {
                map.insert(*id, self.health.proxy(*id));
            }
        }
        Self::refs_in(&map, ids)
    }

    fn refs_in(
        disks: &HashMap<DiskId, DiskRef>,
        ids: &[DiskId],
    ) -> Result<Vec<DiskRef>, VolumeError> {
        ids.iter()
            .map(|id| {
                disks
                    .get(id)
                    .cloned()
                    .ok_or_else(|| VolumeError::Config(format!("disk {id} is not in the pool")))
            })
            .collect()
    }

    /// Prepares the region of a new volume: an empty journal on its journal disks.
    pub fn format(parts: &VolumeParts) -> Result<(), VolumeError> {
        let layout = Self::layout_of(&parts.record);
        if layout.log_end() - layout.log_start() < 4 << 20 {
            return Err(VolumeError::Config("journal must be at least 4 MiB".into()));
        }
        let placement = Self::placement_of(parts)?;
        let jd = Self::refs_in(
            &parts.disks,
            &Self::journal_disks(&placement, &parts.record)?,
        )?;
        Journal::format(&layout, parts.record.id, &jd)?;
        Ok(())
    }

    /// Opens a volume: replays its journal, destages what it finds, and starts the destager.
    /// The volume has a health registry of its own that counts errors but fails no disk
    /// ([`Health::observe_only`]); a pool opens its volumes with [`Volume::open_with`].
    pub fn open(parts: VolumeParts) -> Result<Arc<Self>, VolumeError> {
        let health = Health::observe_only(parts.disks.clone());
        Self::open_with(parts, health)
    }

    /// Opens a volume whose disks are those of `health` (the pool's registry, shared by every
    /// volume of the pool): the volume does its I/O through the registry's proxies, so a disk
    /// the registry fails is written around and rebuilt from parity (`parts.disks` is not used).
    pub fn open_with(parts: VolumeParts, health: Arc<Health>) -> Result<Arc<Self>, VolumeError> {
        Self::open_inner(parts, health, true)
    }

    /// Opens a volume whose metadata store does not know which blocks are at home (offline
    /// recovery, before [`Volume::scan_allocation`]): destaging then never takes a stripe
    /// for empty because the store says so (see `fresh.rs`), and reads the rows it keeps.
    pub fn open_for_recovery(parts: VolumeParts) -> Result<Arc<Self>, VolumeError> {
        let health = Health::observe_only(parts.disks.clone());
        Self::open_inner(parts, health, false)
    }

    fn open_inner(
        mut parts: VolumeParts,
        health: Arc<Health>,
        allocation_known: bool,
    ) -> Result<Arc<Self>, VolumeError> {
        parts.disks = health.proxies();
        let layout = Self::layout_of(&parts.record);
        let placement = Self::placement_of(&parts)?;
        let placements = rebalance::Placements::load(&parts.record, &placement, &parts.table)?;
        let jd = Self::refs_in(
            &parts.disks,
            &Self::journal_disks(&placement, &parts.record)?,
        )?;
        let blocks = parts.record.size.div_ceil(BLOCK_SIZE_U64);
        let bps = layout.geometry.blocks_per_stripe();
        let valid = |h: &RecordHeader| record_fits(h, blocks, bps);
        let key = {
            let (keys, write_key, volume) =
                (parts.keys.clone(), parts.write_key.clone(), parts.record.id);
            Arc::new(journal::HeaderKey {
                version: Box::new(move || write_key.get().0),
                mac: Box::new(move |version, bytes| {
                    keys.tag_key(version, volume)
                        .ok()
                        .map(|k| k.tag(JOURNAL_SEAL_LABEL, bytes))
                }),
            })
        };
        let (journal, replayed) = Journal::open(layout, parts.record.id, jd, &valid, key)?;
        let codec = Codec::new(
            usize::from(layout.geometry.k),
            usize::from(layout.geometry.m),
        )
        .map_err(|e| VolumeError::Config(e.to_string()))?;
        let home: HashMap<u64, Bits> = parts
            .store
            .alloc_load(parts.record.id)
            .map_err(|e| VolumeError::Io(e.to_string()))?
            .into_iter()
            .map(|(s, words)| (s, Bits(words)))
            .collect();
        let mut stamps = HashMap::new();
        for (s, bytes) in parts
            .store
            .stamps_load(parts.record.id)
            .map_err(|e| VolumeError::Io(e.to_string()))?
        {
            let v = Stamp::decode_all(&bytes, bps as usize).ok_or_else(|| {
                VolumeError::Io(format!(
                    "metadata store: the generation stamps of stripe {s} of volume {} are damaged ({} bytes)",
                    parts.record.name,
                    bytes.len()
                ))
            })?;
            stamps.insert(s, v);
        }
        let vol = Arc::new(Self {
            record: parts.record,
            layout,
            disks: RwLock::new(parts.disks),
            placement: RwLock::new(placements),
            codec,
            keys: parts.keys,
            write_key: parts.write_key,
            journal,
            locks: LockTable::new(),
            dirty: Mutex::new(Dirty::default()),
            alloc: Alloc::with_stamps(bps, home, stamps),
            store: parts.store,
            destage_lock: Mutex::new(()),
            fresh: Mutex::new(Vec::new()),
            allocation_known,
            kick: Condvar::new(),
            kick_flag: Mutex::new(false),
            stop: AtomicBool::new(false),
            destager: Mutex::new(None),
            stats: Stats::default(),
            health,
            access: AccessCounter::new(),
        });
        let n = replayed.len();
        for r in &replayed {
            vol.apply_replayed(r);
        }
        let destaged = if n > 0 {
            info!(volume = %vol.record.name, records = n, "journal replayed; destaging");
            vol.destage_all()
        } else {
            Ok(())
        };
        // Never reuse sequence numbers a crash may have left in the log (see Journal::restart).
        match destaged {
            Ok(()) => vol.journal.restart()?,
            Err(e) => {
                // A disk that cannot be written (missing, failing) must not keep the volume
                // offline: the replayed blocks are served from the journal, and the destager
                // retries in the background.
                warn!(volume = %vol.record.name, error = %e, "replayed journal cannot be destaged now; serving it from the journal");
                vol.journal.jump()?;
            }
        }
        let weak = Arc::downgrade(&vol);
        let handle = std::thread::Builder::new()
            .name(format!("destage-{}", vol.record.name))
            .spawn(move || destage::run(weak))
            .map_err(|e| VolumeError::Io(format!("cannot start destager: {e}")))?;
        *vol.destager.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle);
        Ok(vol)
    }

    pub fn name(&self) -> &str {
        &self.record.name
    }
    pub fn record(&self) -> &VolumeRecord {
        &self.record
    }
    pub fn layout(&self) -> &RegionLayout {
        &self.layout
    }
    /// Blocks that hold data.
    pub fn allocated_blocks(&self) -> u64 {
        self.alloc.live_blocks()
    }
    /// Bytes of journal in use.
    pub fn journal_used(&self) -> u64 {
        self.journal.used()
    }
    /// Blocks whose newest copy is only in the journal.
    pub fn journaled_blocks(&self) -> usize {
        self.dirty().blocks()
    }

    /// Blocks per (master key version, epoch) that reads or a journal replay may still need:
    /// every allocated block of the chunk slots, as its stamp records it, and every journaled
    /// block. `(0, 0)` counts slot blocks whose stamp is unknown (destaged before stamps were
    /// recorded): they may need any version.
    pub fn key_usage(&self) -> std::collections::BTreeMap<(u32, u32), u64> {
        let mut out = std::collections::BTreeMap::new();
        let bps = self.layout.geometry.blocks_per_stripe();
        {
            let home = self.alloc.home();
            let stamps = self.alloc.stamps();
            for (s, bits) in home.iter() {
                let st = stamps.get(s);
                for i in (0..bps).filter(|i| bits.get(*i)) {
                    let key = st
                        .and_then(|v| v.get(i as usize))
                        .map_or((0, 0), |x| (x.version, x.epoch));
                    *out.entry(key).or_insert(0) += 1;
                }
            }
        }
        for sd in self.dirty().stripes.values() {
            for e in sd.blocks.values() {
                *out.entry((e.meta.version, e.meta.epoch)).or_insert(0) += 1;
            }
        }
        out
    }

    /// Stripes holding a block sealed with a (version, epoch) older than `older_than`
    /// (lexicographic: an older version, or the same version and an older epoch), oldest
    /// first, at most `limit`; each with its oldest (version, epoch). Unknown stamps count as
    /// oldest.
    pub fn stale_stripes(
        &self,
        older_than: (u32, u32),
        limit: usize,
    ) -> Vec<(StripeId, (u32, u32))> {
        let bps = self.layout.geometry.blocks_per_stripe();
        let mut oldest: HashMap<u64, (u32, u32)> = HashMap::new();
        let mut note = |s: u64, key: (u32, u32)| {
            if key < older_than {
                let e = oldest.entry(s).or_insert(key);
                *e = (*e).min(key);
            }
        };
        {
            let home = self.alloc.home();
            let stamps = self.alloc.stamps();
            for (s, bits) in home.iter() {
                let st = stamps.get(s);
                for i in (0..bps).filter(|i| bits.get(*i)) {
                    note(
                        *s,
                        st.and_then(|v| v.get(i as usize))
                            .map_or((0, 0), |x| (x.version, x.epoch)),
                    );
                }
            }
        }
        for (s, sd) in self.dirty().stripes.iter() {
            for e in sd.blocks.values() {
                note(*s, (e.meta.version, e.meta.epoch));
            }
        }
        let mut v: Vec<(StripeId, (u32, u32))> =
            oldest.into_iter().map(|(s, k)| (StripeId(s), k)).collect();
        v.sort_by_key(|(s, k)| (*k, s.0));
        v.truncate(limit);
        v
    }

    /// Runs one destaging round now (the background destager also runs by itself). Returns
    /// whether anything was destaged.
    pub fn destage(&self) -> Result<bool, VolumeError> {
        self.destage_once()
    }

    /// Stops the destager without destaging or flushing anything: the state a power cut
    /// leaves behind. The journal is replayed at the next open. Crash tests use it.
    pub fn halt(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.kick_destager();
        if let Some(h) = self
            .destager
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            let _ = h.join();
        }
    }

    /// Stops the destager, destages everything and checkpoints: a clean shutdown.
    pub fn close(&self) -> Result<(), VolumeError> {
        self.halt();
        self.destage_all()
    }

    fn dirty(&self) -> std::sync::MutexGuard<'_, Dirty> {
        self.dirty.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn kick_destager(&self) {
        *self.kick_flag.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.kick.notify_all();
    }

    /// Disks holding the chunks of a stripe, in chunk order.
    fn stripe_disks(&self, stripe: StripeId) -> Result<Vec<DiskRef>, VolumeError> {
        self.disk_refs(&self.stripe_ids(stripe)?)
    }

    /// Ids of the disks holding the chunks of a stripe, in chunk order.
    fn stripe_ids(&self, stripe: StripeId) -> Result<Vec<DiskId>, VolumeError> {
        self.placement
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .of(stripe)
            .place(stripe, self.layout.geometry.width())
            .map_err(|e| VolumeError::Config(e.to_string()))
    }

    /// Which chunks of a stripe may be read and written (their disk is neither failed nor
    /// rebuilding past this stripe). Call with the stripe's lock held.
    fn usable(&self, stripe: StripeId, ids: &[DiskId]) -> Vec<bool> {
        if !self.health.degraded() {
            return vec![true; ids.len()];
        }
        ids.iter()
            .map(|id| self.health.chunk_usable(*id, self.record.id, stripe.0))
            .collect()
    }

    /// An error when more than `m` chunks of a stripe are unusable: its blocks that are not in
    /// the journal cannot be read, and nothing new can be destaged to it.
    fn check_stripe(&self, stripe: StripeId) -> Result<(), VolumeError> {
        if !self.health.degraded() {
            return Ok(());
        }
        let ids = self.stripe_ids(stripe)?;
        let gone = self.usable(stripe, &ids).iter().filter(|u| !**u).count();
        let m = usize::from(self.layout.geometry.m);
        if gone > m {
            return Err(VolumeError::Io(format!(
                "stripe {stripe} of volume {} has {gone} of its {} disks failed and tolerates {m}: replace the failed disks",
                self.record.name,
                ids.len()
            )));
        }
        Ok(())
    }

    /// The pool's disk health registry.
    pub fn health(&self) -> &Arc<Health> {
        &self.health
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), VolumeError> {
        let size = self.record.size;
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(VolumeError::OutOfRange { offset, len, size });
        }
        Ok(())
    }

    /// Splits `[offset, offset + len)` into per-stripe pieces: (stripe, byte offset, length).
    fn pieces(&self, offset: u64, len: u64) -> Vec<(StripeId, u64, u64)> {
        let stripe_bytes = self.layout.geometry.blocks_per_stripe() * BLOCK_SIZE_U64;
        let mut out = Vec::new();
        let mut at = offset;
        let end = offset + len;
        while at < end {
            let s = at / stripe_bytes;
            let next = ((s + 1) * stripe_bytes).min(end);
            out.push((StripeId(s), at, next - at));
            at = next;
        }
        out
    }

    // ---- crypto of one block ----

    fn shard_id(&self, pos: BlockPos, version: u32, epoch: u32) -> ShardKeyId {
        ShardKeyId {
            version,
            volume: self.record.id,
            stripe: pos.stripe,
            chunk: pos.chunk,
            epoch,
        }
    }

    /// Encrypts a plaintext block in place and returns its metadata (tag included).
    fn seal(&self, lba: Lba, generation: u64, buf: &mut [u8]) -> Result<BlockMeta, VolumeError> {
        let (version, epoch) = self.write_key.get();
        let pos = self.layout.geometry.locate(lba);
        self.keys
            .shard_cipher(self.shard_id(pos, version, epoch))?
            .encrypt(lba.0, buf)?;
        let mut meta = BlockMeta {
            generation,
            version,
            epoch,
            lba: lba.0,
            flags: 0,
            reserved: 0,
            tag: [0; 32],
        };
        meta.tag = self
            .keys
            .tag_key(version, self.record.id)?
            .tag(&meta.header(), buf);
        Ok(meta)
    }

    /// Whether `meta` + `ciphertext` is an intact copy of `lba`.
    fn verify(&self, lba: Lba, meta: &BlockMeta, ciphertext: &[u8]) -> bool {
        if meta.lba != lba.0 || meta.generation == 0 {
            return false;
        }
        match self.keys.tag_key(meta.version, self.record.id) {
            Ok(k) => k.verify(&meta.header(), ciphertext, &meta.tag).is_ok(),
            Err(_) => false,
        }
    }

    /// Whether `meta` + `ciphertext`, read from the chunk slot of `lba`, is the copy the slot
    /// should hold: intact (tag) and current (its generation is the one the metadata store
    /// recorded when the block was destaged). An older copy with a valid tag, put back by a
    /// rolled-back disk, fails here and is rebuilt from its row like a rotten block.
    fn verify_home(&self, lba: Lba, meta: &BlockMeta, ciphertext: &[u8]) -> bool {
        self.verify(lba, meta, ciphertext) && !self.rolled_back(lba, meta)
    }

    /// Whether `meta` (of an intact block) is older than what the slot of `lba` should hold.
    fn rolled_back(&self, lba: Lba, meta: &BlockMeta) -> bool {
        let pos = self.layout.geometry.locate(lba);
        let bps = self.layout.geometry.blocks_per_stripe();
        let want = self.alloc.stamp(pos.stripe, lba.0 - pos.stripe.0 * bps);
        want.generation != 0 && want.generation != meta.generation
    }

    /// Decrypts a verified block in place.
    fn unseal(&self, lba: Lba, meta: &BlockMeta, buf: &mut [u8]) -> Result<(), VolumeError> {
        let pos = self.layout.geometry.locate(lba);
        self.keys
            .shard_cipher(self.shard_id(pos, meta.version, meta.epoch))?
            .decrypt(lba.0, buf)?;
        Ok(())
    }

    // ---- journal append ----

    /// Appends one record under the stripe lock that `lock` takes, applying `build` to fill
    /// it once its sequence number is known. Retries (without the lock) while the journal is
    /// full.
    fn append<F>(
        &self,
        stripe: StripeId,
        payload_blocks: usize,
        build: F,
    ) -> Result<(), VolumeError>
    where
        F: FnOnce(&Reservation) -> Result<(IoBuf, RecordApply), VolumeError>,
    {
        let (guard, r) = self.reserve_locked(stripe, record_len(payload_blocks))?;
        self.append_reserved(stripe, guard, r, build)
    }

    /// The rest of [`Volume::append`], once the stripe is locked (`guard`) and the record's
    /// space reserved (`r`): builds, writes and applies the record, and marks it complete
    /// whatever happens.
    fn append_reserved<F>(
        &self,
        stripe: StripeId,
        guard: std::sync::RwLockWriteGuard<'_, ()>,
        r: Reservation,
        build: F,
    ) -> Result<(), VolumeError>
    where
        F: FnOnce(&Reservation) -> Result<(IoBuf, RecordApply), VolumeError>,
    {
        let result = match build(&r) {
            Ok((record, apply)) => self
                .journal
                .write(&r, record)
                .map_err(VolumeError::from)
                .map(|()| self.apply(stripe, &r, apply)),
            Err(e) => {
                // The space is reserved: fill it with a record that says so, or replay
                // would stop here and drop every later record.
                match self.journal.write(&r, self.skip_record(&r)) {
                    Ok(()) => Err(e),
                    Err(j) => Err(VolumeError::Io(format!(
                        "{e}; and the journal could not record the failure: {j}"
                    ))),
                }
            }
        };
        self.journal.complete(&r);
        drop(guard);
        if self.journal.used() as f64 > self.journal.capacity() as f64 * DESTAGE_HIGH_WATER {
            self.kick_destager();
        }
        result
    }

    /// Takes the write lock of `stripe` and reserves `len` bytes of journal, waiting (lock
    /// released) for the destager to free space while the journal is full.
    fn reserve_locked(
        &self,
        stripe: StripeId,
        len: u64,
    ) -> Result<(std::sync::RwLockWriteGuard<'_, ()>, Reservation), VolumeError> {
        let deadline = std::time::Instant::now() + JOURNAL_FULL_TIMEOUT;
        loop {
            let guard = self.locks.write(stripe);
            if let Some(r) = self.journal.reserve(len)? {
                return Ok((guard, r));
            }
            drop(guard);
            self.kick_destager();
            if std::time::Instant::now() > deadline {
                return Err(VolumeError::Io(
                    "journal full: destaging is not making progress".into(),
                ));
            }
            self.journal.wait_for_space(Duration::from_millis(20));
        }
    }

    /// A record that fills reservation `r` and carries nothing: replay passes over it.
    fn skip_record(&self, r: &Reservation) -> IoBuf {
        let skip = RecordHeader {
            seq: r.seq,
            volume: self.record.id,
            kind: RecordKind::Skip,
            trim_lba: 0,
            trim_count: r.len / BLOCK_SIZE_U64,
            payload_crc: crc32c::crc32c(&[]),
            entries: vec![],
        };
        let mut record = IoBuf::zeroed(r.len as usize);
        record[..BLOCK_SIZE].copy_from_slice(&skip.encode());
        record
    }

    /// Applies a written record to the index and the live bitmap (stripe lock held).
    fn apply(&self, stripe: StripeId, r: &Reservation, apply: RecordApply) {
        let bps = self.layout.geometry.blocks_per_stripe();
        let first_lba = stripe.0 * bps;
        match apply {
            RecordApply::Write(entries) => {
                let mut dirty = self.dirty();
                let sd = dirty.stripes.entry(stripe.0).or_default();
                let mut lo = u64::MAX;
                let mut hi = 0;
                let hp = header_pages(entries.len());
                for (i, meta) in entries.into_iter().enumerate() {
                    let offset = r.position + ((hp + i) * BLOCK_SIZE) as u64;
                    if let Some(t) = sd.trims.as_mut() {
                        t.bits.set(meta.lba - first_lba, false);
                    }
                    lo = lo.min(meta.lba - first_lba);
                    hi = hi.max(meta.lba - first_lba + 1);
                    sd.blocks.insert(
                        meta.lba,
                        JEntry {
                            seq: r.seq,
                            offset,
                            meta,
                        },
                    );
                }
                drop(dirty);
                if lo < hi {
                    // Entries of one record are consecutive blocks.
                    self.alloc.set_live(stripe, lo, hi, true);
                }
            }
            RecordApply::Trim { from, to } => {
                let mut dirty = self.dirty();
                let sd = dirty.stripes.entry(stripe.0).or_default();
                let t = sd.trims.get_or_insert_with(|| Trims {
                    bits: Bits::new(bps),
                    seq: 0,
                });
                t.seq = r.seq;
                for i in from..to {
                    t.bits.set(i, true);
                    sd.blocks.remove(&(first_lba + i));
                }
                drop(dirty);
                self.alloc.set_live(stripe, from, to, false);
            }
        }
    }

    /// Re-applies a record found by journal replay.
    fn apply_replayed(&self, r: &journal::Replayed) {
        let h = &r.header;
        let bps = self.layout.geometry.blocks_per_stripe();
        let res = |pos| Reservation {
            seq: h.seq,
            position: pos,
            len: h.record_len(),
            wrap: None,
        };
        match h.kind {
            RecordKind::Write => {
                let Some(first) = h.entries.first() else {
                    return;
                };
                let stripe = StripeId(first.lba / bps);
                self.apply(
                    stripe,
                    &res(r.position),
                    RecordApply::Write(h.entries.clone()),
                );
            }
            RecordKind::Trim => {
                let stripe = StripeId(h.trim_lba / bps);
                let from = h.trim_lba % bps;
                self.apply(
                    stripe,
                    &res(r.position),
                    RecordApply::Trim {
                        from,
                        to: from + h.trim_count,
                    },
                );
            }
            RecordKind::Wrap | RecordKind::Skip => {}
        }
    }

    // ---- the volume API ----

    fn write_blocks(&self, offset: u64, data: &[u8]) -> Result<(), VolumeError> {
        for (stripe, at, len) in self.pieces(offset, data.len() as u64) {
            // A stripe that lost more than m chunks could never be destaged: refuse up front.
            self.check_stripe(stripe)?;
            self.access.touch(stripe);
            let (first, count) = blocks_of(at, len);
            if len == self.layout.geometry.blocks_per_stripe() * BLOCK_SIZE_U64
                && self.write_fresh_stripe(
                    stripe,
                    &data[(at - offset) as usize..(at - offset + len) as usize],
                )?
            {
                self.stats
                    .blocks_written
                    .fetch_add(count, Ordering::Relaxed);
                continue;
            }
            let mut done = 0u64;
            while done < count {
                let n = (count - done).min(MAX_RECORD_BLOCKS as u64);
                let lba0 = first.0 + done;
                self.append(stripe, n as usize, |r| {
                    self.build_write_record(r, lba0, n as usize, |lba, page| {
                        self.fill_block(offset, data, lba, page)
                    })
                })?;
                done += n;
            }
            self.stats
                .blocks_written
                .fetch_add(count, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Puts the plaintext that block `lba` will hold after writing `data` at `offset` into
    /// `page` (stripe lock held): the part `data` covers, and the block's current content
    /// around it when `data` covers only part of it.
    fn fill_block(
        &self,
        offset: u64,
        data: &[u8],
        lba: Lba,
        page: &mut [u8],
    ) -> Result<(), VolumeError> {
        let block_start = lba.0 * BLOCK_SIZE_U64;
        let from = offset.max(block_start);
        let to = (offset + data.len() as u64).min(block_start + BLOCK_SIZE_U64);
        if to - from < BLOCK_SIZE_U64 {
            self.read_block_locked(lba, page)?;
        }
        page[(from - block_start) as usize..(to - block_start) as usize]
            .copy_from_slice(&data[(from - offset) as usize..(to - offset) as usize]);
        Ok(())
    }

    /// [`BlockDevice::try_write_now`] for a range inside the volume. Taken only by a write of
    /// whole blocks, at most [`WRITE_NOW_MAX`], inside one stripe and not all of it (a whole
    /// stripe may go to its chunk slots instead), on a volume with no failed disk, whose
    /// journal disks complete their writes inside the call (the page cache or memory, not a
    /// device waited on); then only if the stripe's lock is free and the journal has room.
    /// Otherwise nothing is done. What is done is exactly what [`Volume::write_blocks`] does.
    fn write_now(&self, offset: u64, data: &[u8]) -> Option<Result<(), VolumeError>> {
        let len = data.len() as u64;
        let stripe_bytes = self.layout.geometry.blocks_per_stripe() * BLOCK_SIZE_U64;
        let stripe = StripeId(offset / stripe_bytes);
        let eligible = len <= WRITE_NOW_MAX
            && offset.is_multiple_of(BLOCK_SIZE_U64)
            && len.is_multiple_of(BLOCK_SIZE_U64)
            && (offset + len - 1) / stripe_bytes == stripe.0
            && len < stripe_bytes
            && !self.health.degraded()
            && self.journal.completes_in_submit();
        if !eligible {
            return None;
        }
        let guard = self.locks.try_write(stripe)?;
        let n = (len / BLOCK_SIZE_U64) as usize;
        let r = match self.journal.reserve(record_len(n)) {
            Ok(Some(r)) => r,
            Ok(None) => {
                drop(guard);
                self.kick_destager();
                return None;
            }
            Err(e) => return Some(Err(e.into())),
        };
        self.access.touch(stripe);
        let lba0 = offset / BLOCK_SIZE_U64;
        let result = self.append_reserved(stripe, guard, r, |r| {
            self.build_write_record(r, lba0, n, |lba, page| {
                self.fill_block(offset, data, lba, page)
            })
        });
        if result.is_ok() {
            self.stats
                .blocks_written
                .fetch_add(n as u64, Ordering::Relaxed);
        }
        Some(result)
    }

    /// Builds the write record of `n` consecutive blocks from `lba0` inside [`Volume::append`]
    /// (stripe lock held): `fill` puts each block's plaintext into its payload page, which is
    /// then sealed under the current write key.
    fn build_write_record(
        &self,
        r: &Reservation,
        lba0: u64,
        n: usize,
        mut fill: impl FnMut(Lba, &mut [u8]) -> Result<(), VolumeError>,
    ) -> Result<(IoBuf, RecordApply), VolumeError> {
        let hp = header_pages(n);
        let mut record = IoBuf::zeroed((hp + n) * BLOCK_SIZE);
        let mut entries = Vec::with_capacity(n);
        for i in 0..n {
            let lba = Lba(lba0 + i as u64);
            let page = &mut record[(hp + i) * BLOCK_SIZE..][..BLOCK_SIZE];
            fill(lba, page)?;
            entries.push(self.seal(lba, r.seq, page)?);
        }
        let payload_crc = crc32c::crc32c(&record[hp * BLOCK_SIZE..]);
        let header = RecordHeader {
            seq: r.seq,
            volume: self.record.id,
            kind: RecordKind::Write,
            trim_lba: 0,
            trim_count: 0,
            payload_crc,
            entries: entries.clone(),
        };
        record[..hp * BLOCK_SIZE].copy_from_slice(&header.encode());
        Ok((record, RecordApply::Write(entries)))
    }

    /// Reads the current plaintext of one block while its stripe lock is held.
    fn read_block_locked(&self, lba: Lba, out: &mut [u8]) -> Result<(), VolumeError> {
        let pos = self.layout.geometry.locate(lba);
        let mut bufs = self.read_stripe_blocks(pos.stripe, lba, 1)?;
        out.copy_from_slice(&bufs.pop().unwrap_or_else(|| vec![0; BLOCK_SIZE]));
        Ok(())
    }

    /// Plaintext of `count` consecutive blocks from `first`, all in `stripe` (lock held).
    fn read_stripe_blocks(
        &self,
        stripe: StripeId,
        first: Lba,
        count: u64,
    ) -> Result<Vec<Vec<u8>>, VolumeError> {
        let g = self.layout.geometry;
        let first_in_stripe = stripe.0 * g.blocks_per_stripe();
        let mut out: Vec<Vec<u8>> = vec![Vec::new(); count as usize];
        let mut from_journal = Vec::new();
        let mut from_home = Vec::new();
        {
            let dirty = self.dirty();
            let sd = dirty.stripes.get(&stripe.0);
            let live = self.alloc.live_bits(stripe);
            for i in 0..count {
                let lba = Lba(first.0 + i);
                if let Some(e) = sd.and_then(|s| s.blocks.get(&lba.0)) {
                    from_journal.push((i as usize, lba, *e));
                } else if live.get(lba.0 - first_in_stripe) {
                    from_home.push((i as usize, lba));
                } else {
                    out[i as usize] = vec![0; BLOCK_SIZE];
                }
            }
        }
        if !from_journal.is_empty() {
            let offsets: Vec<u64> = from_journal.iter().map(|(_, _, e)| e.offset).collect();
            let mut pages = self
                .journal
                .read_pages(&offsets, |i, p| {
                    self.verify(from_journal[i].1, &from_journal[i].2.meta, p)
                })
                .map_err(|e| VolumeError::Unrecoverable {
                    lba: from_journal[0].1.0,
                    why: e.to_string(),
                })?;
            for (n, (i, lba, e)) in from_journal.into_iter().enumerate() {
                let page = pages.get_mut(n);
                self.unseal(lba, &e.meta, page)?;
                out[i] = page.to_vec();
            }
        }
        if !from_home.is_empty() {
            let lbas: Vec<Lba> = from_home.iter().map(|(_, l)| *l).collect();
            let blocks = self.read_home(stripe, &lbas)?;
            for ((i, _), b) in from_home.into_iter().zip(blocks) {
                out[i] = b;
            }
        }
        self.stats.blocks_read.fetch_add(count, Ordering::Relaxed);
        Ok(out)
    }

    fn trim_blocks(&self, offset: u64, len: u64) -> Result<(), VolumeError> {
        // Partial blocks at either end are zeroed by writing; whole blocks are trimmed.
        let end = offset + len;
        let first_whole = offset.div_ceil(BLOCK_SIZE_U64) * BLOCK_SIZE_U64;
        let last_whole = end / BLOCK_SIZE_U64 * BLOCK_SIZE_U64;
        if first_whole >= last_whole {
            return self.write_blocks(offset, &vec![0u8; len as usize]);
        }
        if offset < first_whole {
            self.write_blocks(offset, &vec![0u8; (first_whole - offset) as usize])?;
        }
        if last_whole < end {
            self.write_blocks(last_whole, &vec![0u8; (end - last_whole) as usize])?;
        }
        let bps = self.layout.geometry.blocks_per_stripe();
        for (stripe, at, plen) in self.pieces(first_whole, last_whole - first_whole) {
            self.check_stripe(stripe)?;
            let (first, count) = blocks_of(at, plen);
            let from = first.0 - stripe.0 * bps;
            self.append(stripe, 0, |r| {
                let header = RecordHeader {
                    seq: r.seq,
                    volume: self.record.id,
                    kind: RecordKind::Trim,
                    trim_lba: first.0,
                    trim_count: count,
                    payload_crc: crc32c::crc32c(&[]),
                    entries: vec![],
                };
                Ok((
                    IoBuf::from_slice(&header.encode()),
                    RecordApply::Trim {
                        from,
                        to: from + count,
                    },
                ))
            })?;
        }
        Ok(())
    }
}

/// Whether a checksummed record's contents fit the volume: a write covers consecutive blocks
/// of one stripe with its own sequence number as generation, a trim a non-empty range of one
/// stripe, both inside the volume.
fn record_fits(h: &RecordHeader, blocks: u64, bps: u64) -> bool {
    match h.kind {
        RecordKind::Write => {
            let (Some(first), Some(last)) = (h.entries.first(), h.entries.last()) else {
                return false;
            };
            h.entries
                .iter()
                .enumerate()
                .all(|(i, e)| e.lba == first.lba + i as u64 && e.generation == h.seq)
                && last.lba < blocks
                && first.lba / bps == last.lba / bps
        }
        RecordKind::Trim => {
            h.trim_count >= 1
                && h.trim_lba
                    .checked_add(h.trim_count)
                    .is_some_and(|end| end <= blocks)
                && h.trim_lba / bps == (h.trim_lba + h.trim_count - 1) / bps
        }
        RecordKind::Wrap | RecordKind::Skip => true,
    }
}

/// What a journal record changes in memory once written.
enum RecordApply {
    /// Metadata of consecutive blocks, in payload order.
    Write(Vec<BlockMeta>),
    /// Blocks `[from, to)` of the stripe (indexes within the stripe) read as zeros.
    Trim { from: u64, to: u64 },
}

impl BlockDevice for Volume {
    fn size(&self) -> u64 {
        self.record.size
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), VolumeError> {
        self.check_range(offset, buf.len() as u64)?;
        let base = offset;
        for (stripe, at, len) in self.pieces(offset, buf.len() as u64) {
            self.access.touch(stripe);
            let (first, count) = blocks_of(at, len);
            let blocks = {
                let _g = self.locks.read(stripe);
                self.read_stripe_blocks(stripe, first, count)?
            };
            for (i, b) in blocks.iter().enumerate() {
                let block_start = (first.0 + i as u64) * BLOCK_SIZE_U64;
                let from = at.max(block_start);
                let to = (at + len).min(block_start + BLOCK_SIZE_U64);
                buf[(from - base) as usize..(to - base) as usize].copy_from_slice(
                    &b[(from - block_start) as usize..(to - block_start) as usize],
                );
            }
        }
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), VolumeError> {
        self.check_range(offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        self.write_blocks(offset, data)?;
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    fn try_write_now(&self, offset: u64, data: &[u8]) -> Option<Result<(), VolumeError>> {
        if let Err(e) = self.check_range(offset, data.len() as u64) {
            return Some(Err(e));
        }
        if data.is_empty() {
            return Some(Ok(()));
        }
        self.write_now(offset, data)
    }

    fn flush(&self) -> Result<(), VolumeError> {
        self.journal.flush()?;
        self.commit_fresh()
    }

    fn trim(&self, offset: u64, len: u64) -> Result<(), VolumeError> {
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.trim_blocks(offset, len)
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        no_hole: bool,
        fua: bool,
    ) -> Result<(), VolumeError> {
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        if no_hole {
            // Allocated zeros: write them, at most 1 MiB at a time.
            let chunk = 1 << 20;
            let zeros = vec![0u8; chunk];
            let mut at = offset;
            while at < offset + len {
                let n = (offset + len - at).min(chunk as u64);
                self.write_blocks(at, &zeros[..n as usize])?;
                at += n;
            }
        } else {
            self.trim_blocks(offset, len)?;
        }
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, VolumeError> {
        self.check_range(offset, len)?;
        let mut out: Vec<Extent> = Vec::new();
        let bps = self.layout.geometry.blocks_per_stripe();
        for (stripe, at, plen) in self.pieces(offset, len) {
            let bits = self.alloc.live_bits(stripe);
            let mut pos = at;
            while pos < at + plen {
                let lba = pos / BLOCK_SIZE_U64;
                let hole = !bits.get(lba % bps);
                let next = ((lba + 1) * BLOCK_SIZE_U64).min(at + plen);
                match out.last_mut() {
                    Some(e) if e.hole == hole => e.len += next - pos,
                    _ => out.push(Extent {
                        len: next - pos,
                        hole,
                    }),
                }
                pos = next;
            }
        }
        Ok(out)
    }
}

impl Drop for Volume {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.kick.notify_all();
        if !self.dirty().stripes.is_empty() {
            warn!(volume = %self.record.name, "volume dropped with journaled blocks; the journal replays them at the next open");
        }
    }
}

/// Whether a dirty-stripe snapshot is empty.
fn snapshot_empty(s: &StripeDirty) -> bool {
    s.blocks.is_empty() && s.trims.as_ref().is_none_or(|t| t.bits.is_empty())
}
