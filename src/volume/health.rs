//! Disk health: one registry per pool, shared by its volumes, that counts what each disk does
//! wrong and decides when a disk is failed.
//!
//! Every disk a volume uses is a [`HealthDisk`]: a proxy that forwards batches to the disk the
//! registry holds for that id, reports each completed batch to the registry, and refuses every
//! batch of a failed disk at once (with [`DiskError::Gone`]) without touching it. The real disk
//! behind an id can be swapped ([`Health::replace`]): that is how a replacement disk takes a
//! failed disk's id while the volumes stay open.
//!
//! States ([`DiskState`]): `Ok`; `Failed` (never read or written again; the volumes rebuild its
//! chunks from the other chunks of each row and write around it); `Rebuilding` (a replacement
//! being filled: chunks of stripes before the rebuild cursor are valid and used, the others are
//! treated as failed, see [`Health::chunk_usable`]).
//!
//! Failure policy ([`FailurePolicy::default`], what a pool uses):
//! - a disk that is gone (pulled, its backend stopped), or whose reads end before its size (a
//!   file truncated under the pool), is failed at once;
//! - any failed write, discard or sync is a failed disk: the disk now holds something other
//!   than what the volume believes, and only a rebuild makes it trustworthy again;
//! - [`READ_ERRORS_TO_FAIL`] failed reads in a row (no successful batch between) fail it: one
//!   unreadable sector is repaired from parity, a disk that stops answering is not;
//! - [`TAG_FAILURES_TO_FAIL`] blocks in a row that fail their tag (no verified block between)
//!   fail it: scattered rot is repaired in place, a disk that returns garbage everywhere
//!   (overwritten, truncated, replaced by another disk) is not;
//! - a disk missing, too small or with a foreign superblock at open is failed by the pool.
//!
//! A transition to failed is logged once (warn) and persisted through the registry's
//! [`Persist`] hook before the request that caused it returns: the pool's hook writes
//! `DiskRecord.state` to the store and a new superblock to every surviving disk. A volume
//! opened alone ([`super::Volume::open`]) uses [`FailurePolicy::never`]: it counts, but leaves
//! the decision to a pool.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::disk::{Disk, DiskError, DiskRef, IoOp, Pending};
use crate::layout::DiskId;
use crate::meta::DiskState;

/// Failed reads in a row that fail a disk. Eight: a bad sector fails one batch, a retry or the
/// next request succeeds and resets the count; a disk that failed eight batches in a row with
/// nothing succeeding between is not coming back by itself.
pub const READ_ERRORS_TO_FAIL: u64 = 8;
/// Blocks in a row that fail their tag on one disk with no verified block between. Random rot
/// hits a block here and there (each is repaired); sixteen in a row means the disk is returning
/// something else than what was written.
pub const TAG_FAILURES_TO_FAIL: u64 = 16;

/// When the registry marks a disk failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FailurePolicy {
    /// Fail a disk on its first failed write, discard or sync, and when it is gone.
    pub fail_on_write_error: bool,
    /// Failed read batches in a row that fail a disk (0: never).
    pub read_errors_in_row: u64,
    /// Tag failures in a row that fail a disk (0: never).
    pub tag_failures_in_row: u64,
}

impl Default for FailurePolicy {
    fn default() -> Self {
        Self {
            fail_on_write_error: true,
            read_errors_in_row: READ_ERRORS_TO_FAIL,
            tag_failures_in_row: TAG_FAILURES_TO_FAIL,
        }
    }
}

impl FailurePolicy {
    /// Count errors, never fail a disk.
    pub fn never() -> Self {
        Self {
            fail_on_write_error: false,
            read_errors_in_row: 0,
            tag_failures_in_row: 0,
        }
    }
}

/// Counters of one disk, as persisted and reported by `status`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskCounters {
    /// Batches that failed (reads, writes, syncs, discards), gone batches included.
    pub io_errors: u64,
    /// Blocks read from this disk that failed their tag (or parity found bad by scrub).
    pub tag_failures: u64,
    /// Blocks of this disk rebuilt from parity and written back in place.
    pub repaired: u64,
    /// Chunks written to this disk by a rebuild.
    pub rebuilt_chunks: u64,
}

/// What the store keeps of a disk's health (table `disk_health`): its counters and, while it
/// rebuilds, the cursor up to which its chunks are rebuilt and durable.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskHealthRecord {
    pub counters: DiskCounters,
    /// (volume id, stripe) of the rebuild: chunks of earlier stripes are on the disk.
    #[serde(default)]
    pub cursor: Option<(u64, u64)>,
}

/// Called after a disk is marked failed (with the registry, the disk's id and the reason), to
/// make the change durable and record it. Runs in the thread that saw the failure; must not call back into the volumes.
pub type Persist = dyn Fn(&Health, DiskId, &str) + Send + Sync;

struct Slot {
    disk: RwLock<DiskRef>,
    name: RwLock<String>,
    state: AtomicU8,
    /// (volume id, stripe): while rebuilding, chunks of stripes before this are valid.
    cursor: Mutex<(u64, u64)>,
    io_errors: AtomicU64,
    read_errors_in_row: AtomicU64,
    tag_failures: AtomicU64,
    tags_in_row: AtomicU64,
    repaired: AtomicU64,
    rebuilt_chunks: AtomicU64,
}

impl Slot {
    fn new(d: DiskRef) -> Self {
        let name = d.name().to_string();
        Self {
            disk: RwLock::new(d),
            name: RwLock::new(name),
            state: AtomicU8::new(OK),
            cursor: Mutex::new((0, 0)),
            io_errors: AtomicU64::new(0),
            read_errors_in_row: AtomicU64::new(0),
            tag_failures: AtomicU64::new(0),
            tags_in_row: AtomicU64::new(0),
            repaired: AtomicU64::new(0),
            rebuilt_chunks: AtomicU64::new(0),
        }
    }
}

const OK: u8 = 0;
const FAILED: u8 = 1;
const REBUILDING: u8 = 2;

fn code(s: DiskState) -> u8 {
    match s {
        DiskState::Ok => OK,
        DiskState::Failed => FAILED,
        DiskState::Rebuilding => REBUILDING,
    }
}

fn state_of(c: u8) -> DiskState {
    match c {
        FAILED => DiskState::Failed,
        REBUILDING => DiskState::Rebuilding,
        _ => DiskState::Ok,
    }
}

/// The health registry of a pool's disks. See the module docs.
pub struct Health {
    /// By id; disks are added (`shardvol disk add`), never removed.
    slots: RwLock<BTreeMap<DiskId, Arc<Slot>>>,
    policy: FailurePolicy,
    persist: Box<Persist>,
    /// Serialises persistence (store and superblock writes).
    persist_lock: Mutex<()>,
    /// True while any disk is not ok: lets the data path skip per-disk checks.
    degraded: AtomicBool,
}

impl Health {
    /// A registry for `disks` (all ok, counters zero) with a failure policy and a persistence
    /// hook.
    pub fn new(
        disks: impl IntoIterator<Item = (DiskId, DiskRef)>,
        policy: FailurePolicy,
        persist: Box<Persist>,
    ) -> Arc<Self> {
        let slots = disks
            .into_iter()
            .map(|(id, d)| (id, Arc::new(Slot::new(d))))
            .collect();
        Arc::new(Self {
            slots: RwLock::new(slots),
            policy,
            persist,
            persist_lock: Mutex::new(()),
            degraded: AtomicBool::new(false),
        })
    }

    /// A registry that never fails a disk and persists nothing: what a volume opened on its
    /// own uses.
    pub fn observe_only(disks: impl IntoIterator<Item = (DiskId, DiskRef)>) -> Arc<Self> {
        Self::new(disks, FailurePolicy::never(), Box::new(|_, _, _| {}))
    }

    fn slot(&self, id: DiskId) -> Option<Arc<Slot>> {
        self.slots
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned()
    }

    fn all_slots(&self) -> Vec<Arc<Slot>> {
        self.slots
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// The proxy a volume uses for disk `id` (whether or not the id is in the registry yet).
    pub fn proxy(self: &Arc<Self>, id: DiskId) -> DiskRef {
        Arc::new(HealthDisk {
            id,
            label: format!("disk {id}"),
            health: self.clone(),
        })
    }

    /// Proxies for every disk, by id: what the volumes use.
    pub fn proxies(self: &Arc<Self>) -> std::collections::HashMap<DiskId, DiskRef> {
        self.ids()
            .into_iter()
            .map(|id| (id, self.proxy(id)))
            .collect()
    }

    /// Adds a disk to the registry (a disk joining the pool): ok, counters zero. An id already
    /// there is left as it is; returns whether the disk was added.
    pub fn add(&self, id: DiskId, disk: DiskRef) -> bool {
        let mut slots = self.slots.write().unwrap_or_else(|p| p.into_inner());
        if slots.contains_key(&id) {
            return false;
        }
        slots.insert(id, Arc::new(Slot::new(disk)));
        true
    }

    /// Disk ids in the registry.
    pub fn ids(&self) -> Vec<DiskId> {
        self.slots
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .copied()
            .collect()
    }

    /// The real disk behind an id (not the proxy): for superblock writes and rebuild checks.
    pub fn disk(&self, id: DiskId) -> Option<DiskRef> {
        self.slot(id)
            .map(|s| s.disk.read().unwrap_or_else(|p| p.into_inner()).clone())
    }

    /// Name of the disk behind an id (its path), for messages.
    pub fn name(&self, id: DiskId) -> String {
        self.slot(id).map_or_else(
            || format!("disk {id}"),
            |s| s.name.read().unwrap_or_else(|p| p.into_inner()).clone(),
        )
    }

    pub fn state(&self, id: DiskId) -> DiskState {
        self.slot(id).map_or(DiskState::Failed, |s| {
            state_of(s.state.load(Ordering::Acquire))
        })
    }

    pub fn is_failed(&self, id: DiskId) -> bool {
        self.state(id) == DiskState::Failed
    }

    /// Whether any disk is failed or rebuilding.
    pub fn degraded(&self) -> bool {
        self.degraded.load(Ordering::Acquire)
    }

    fn update_degraded(&self) {
        let any = self
            .all_slots()
            .iter()
            .any(|s| s.state.load(Ordering::Acquire) != OK);
        self.degraded.store(any, Ordering::Release);
    }

    /// Whether the chunk of `(volume, stripe)` on disk `id` may be read and written: the disk
    /// is ok, or it is rebuilding and the stripe is before its cursor. A caller holds the
    /// stripe's lock, so the answer cannot change under it (the rebuild advances its cursor
    /// under the same lock).
    pub fn chunk_usable(&self, id: DiskId, volume: u64, stripe: u64) -> bool {
        let Some(s) = self.slot(id) else {
            return false;
        };
        match s.state.load(Ordering::Acquire) {
            OK => true,
            REBUILDING => {
                let (v, c) = *s.cursor.lock().unwrap_or_else(|p| p.into_inner());
                volume < v || (volume == v && stripe < c)
            }
            _ => false,
        }
    }

    /// The rebuild cursor of a disk: (volume id, stripe).
    pub fn cursor(&self, id: DiskId) -> (u64, u64) {
        self.slot(id).map_or((0, 0), |s| {
            *s.cursor.lock().unwrap_or_else(|p| p.into_inner())
        })
    }

    /// Moves the rebuild cursor (call with the lock of the stripe just rebuilt held).
    pub fn set_cursor(&self, id: DiskId, volume: u64, stripe: u64) {
        if let Some(s) = self.slot(id) {
            *s.cursor.lock().unwrap_or_else(|p| p.into_inner()) = (volume, stripe);
        }
    }

    /// Sets a state without the failure log or persistence (loading from the store, and the
    /// rebuild's own transitions, which persist themselves).
    pub fn set_state(&self, id: DiskId, state: DiskState) {
        if let Some(s) = self.slot(id) {
            s.state.store(code(state), Ordering::Release);
            if state == DiskState::Ok {
                s.read_errors_in_row.store(0, Ordering::Relaxed);
                s.tags_in_row.store(0, Ordering::Relaxed);
            }
        }
        self.update_degraded();
    }

    /// Puts `disk` behind `id` (a replacement disk taking a failed disk's place).
    pub fn replace(&self, id: DiskId, disk: DiskRef) {
        if let Some(s) = self.slot(id) {
            *s.name.write().unwrap_or_else(|p| p.into_inner()) = disk.name().to_string();
            *s.disk.write().unwrap_or_else(|p| p.into_inner()) = disk;
        }
    }

    /// Marks a disk failed: logs it once, persists it, and from now on refuses its I/O.
    /// Returns whether this call made the change.
    pub fn fail(&self, id: DiskId, why: &str) -> bool {
        let Some(s) = self.slot(id) else {
            return false;
        };
        let prev = s.state.swap(FAILED, Ordering::AcqRel);
        if prev == FAILED {
            return false;
        }
        self.update_degraded();
        warn!(disk = id.0, path = %self.name(id), reason = why, "disk failed: it is no longer read or written; the volumes serve its chunks from parity until it is replaced (`shardvol disk replace`)");
        let _g = self.persist_lock.lock().unwrap_or_else(|p| p.into_inner());
        (self.persist)(self, id, why);
        true
    }

    /// Counters of a disk.
    pub fn counters(&self, id: DiskId) -> DiskCounters {
        self.slot(id)
            .map_or_else(DiskCounters::default, |s| DiskCounters {
                io_errors: s.io_errors.load(Ordering::Relaxed),
                tag_failures: s.tag_failures.load(Ordering::Relaxed),
                repaired: s.repaired.load(Ordering::Relaxed),
                rebuilt_chunks: s.rebuilt_chunks.load(Ordering::Relaxed),
            })
    }

    /// Starts a disk's counters from persisted values.
    pub fn load_counters(&self, id: DiskId, c: &DiskCounters) {
        if let Some(s) = self.slot(id) {
            s.io_errors.store(c.io_errors, Ordering::Relaxed);
            s.tag_failures.store(c.tag_failures, Ordering::Relaxed);
            s.repaired.store(c.repaired, Ordering::Relaxed);
            s.rebuilt_chunks.store(c.rebuilt_chunks, Ordering::Relaxed);
        }
    }

    /// A batch of `id` completed without error.
    fn io_ok(&self, id: DiskId) {
        if let Some(s) = self.slot(id)
            && s.read_errors_in_row.load(Ordering::Relaxed) != 0
        {
            s.read_errors_in_row.store(0, Ordering::Relaxed);
        }
    }

    /// A batch of `id` failed. `changes`: the batch wrote, discarded or synced something.
    fn io_error(&self, id: DiskId, e: &DiskError, changes: bool) {
        let Some(s) = self.slot(id) else { return };
        // Requests the disk never saw are the caller's mistakes, not the disk's.
        if matches!(
            e,
            DiskError::OutOfRange { .. } | DiskError::Unaligned { .. }
        ) {
            return;
        }
        s.io_errors.fetch_add(1, Ordering::Relaxed);
        let p = self.policy;
        if p.fail_on_write_error && matches!(e, DiskError::Gone { .. }) {
            self.fail(id, "the disk is gone");
        } else if p.fail_on_write_error && ends_early(e) {
            // The disk ends before the size it was opened with: a file truncated under the
            // pool. Everything past its new end is lost, and the writes that extend it again
            // would keep the reads around them failing without ever making a row of errors.
            self.fail(id, &format!("it ends before its size: truncated? ({e})"));
        } else if p.fail_on_write_error && changes {
            self.fail(id, &format!("write failed: {e}"));
        } else {
            let n = s.read_errors_in_row.fetch_add(1, Ordering::Relaxed) + 1;
            if p.read_errors_in_row > 0 && n >= p.read_errors_in_row {
                self.fail(id, &format!("{n} read errors in a row (last: {e})"));
            }
        }
    }

    /// A block read from `id` verified.
    pub fn tag_ok(&self, id: DiskId) {
        if let Some(s) = self.slot(id)
            && s.tags_in_row.load(Ordering::Relaxed) != 0
        {
            s.tags_in_row.store(0, Ordering::Relaxed);
        }
    }

    /// A block read from `id` failed its check.
    pub fn tag_failure(&self, id: DiskId) {
        let Some(s) = self.slot(id) else { return };
        s.tag_failures.fetch_add(1, Ordering::Relaxed);
        let n = s.tags_in_row.fetch_add(1, Ordering::Relaxed) + 1;
        let limit = self.policy.tag_failures_in_row;
        if limit > 0 && n >= limit {
            self.fail(id, &format!("{n} blocks in a row failed their tags"));
        }
    }

    /// A block of `id` was rebuilt from parity and written back.
    pub fn repaired(&self, id: DiskId, n: u64) {
        if let Some(s) = self.slot(id) {
            s.repaired.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// A chunk was written to `id` by a rebuild.
    pub fn rebuilt_chunk(&self, id: DiskId) {
        if let Some(s) = self.slot(id) {
            s.rebuilt_chunks.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Whether `e` is a read that met the end of the disk inside the disk's size (checked by
/// every backend before the op runs), which only a disk that shrank can give.
fn ends_early(e: &DiskError) -> bool {
    matches!(e, DiskError::Io { op: "read", source, .. } if source.kind() == std::io::ErrorKind::UnexpectedEof)
}

/// The disk a volume uses for an id: forwards to the registry's disk and reports each batch.
pub struct HealthDisk {
    id: DiskId,
    /// "disk N": stable across replacement (the path is in [`Health::name`]).
    label: String,
    health: Arc<Health>,
}

impl HealthDisk {
    pub fn id(&self) -> DiskId {
        self.id
    }
}

impl Disk for HealthDisk {
    fn name(&self) -> &str {
        &self.label
    }

    fn size(&self) -> u64 {
        self.health.disk(self.id).map_or(0, |d| d.size())
    }

    fn submit(&self, ops: Vec<IoOp>) -> Pending {
        let h = &self.health;
        let id = self.id;
        if h.is_failed(id) {
            return Pending::ready(Err(DiskError::Gone { disk: h.name(id) }));
        }
        let Some(d) = h.disk(id) else {
            return Pending::ready(Err(DiskError::Gone { disk: h.name(id) }));
        };
        let changes = ops.iter().any(|op| !matches!(op, IoOp::Read { .. }));
        let health = h.clone();
        d.submit(ops).then(move |r| {
            match &r {
                Ok(_) => health.io_ok(id),
                Err(e) => health.io_error(id, e, changes),
            }
            r
        })
    }

    fn backend(&self) -> &'static str {
        "health"
    }

    fn completes_in_submit(&self) -> bool {
        self.health
            .disk(self.id)
            .is_some_and(|d| d.completes_in_submit())
    }
}

/// A disk that is not there (missing at open, or failed and not opened): every batch is
/// refused with [`DiskError::Gone`].
pub struct MissingDisk {
    pub name: String,
    pub size: u64,
}

impl Disk for MissingDisk {
    fn name(&self) -> &str {
        &self.name
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn submit(&self, _ops: Vec<IoOp>) -> Pending {
        Pending::ready(Err(DiskError::Gone {
            disk: self.name.clone(),
        }))
    }
    fn backend(&self) -> &'static str {
        "missing"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::{FaultDisk, MemDisk, Trigger};
    use std::sync::atomic::AtomicUsize;

    fn registry() -> (Arc<Health>, crate::disk::FaultHandle, Arc<AtomicUsize>) {
        let f = FaultDisk::new(Arc::new(MemDisk::new("m0", 1 << 20)));
        let h = f.handle();
        let persisted = Arc::new(AtomicUsize::new(0));
        let p = persisted.clone();
        let health = Health::new(
            [(DiskId(0), Arc::new(f) as DiskRef)],
            FailurePolicy::default(),
            Box::new(move |_, _, _| {
                p.fetch_add(1, Ordering::SeqCst);
            }),
        );
        (health, h, persisted)
    }

    #[test]
    fn read_errors_fail_a_disk_only_in_a_row() {
        let (health, faults, persisted) = registry();
        let d = health.proxies().remove(&DiskId(0)).unwrap();
        faults.fail_reads(Trigger::always());
        for _ in 0..READ_ERRORS_TO_FAIL - 1 {
            assert!(crate::disk::read_at(d.as_ref(), 0, 4096).is_err());
        }
        // A success resets the count.
        faults.clear();
        crate::disk::read_at(d.as_ref(), 0, 4096).unwrap();
        faults.fail_reads(Trigger::always());
        for _ in 0..READ_ERRORS_TO_FAIL - 1 {
            let _ = crate::disk::read_at(d.as_ref(), 0, 4096);
        }
        assert_eq!(health.state(DiskId(0)), DiskState::Ok);
        let _ = crate::disk::read_at(d.as_ref(), 0, 4096);
        assert!(health.is_failed(DiskId(0)));
        assert_eq!(persisted.load(Ordering::SeqCst), 1);
        // Failed: refused without reaching the disk, and persisted once only.
        faults.clear();
        assert!(crate::disk::read_at(d.as_ref(), 0, 4096).is_err());
        assert!(!health.fail(DiskId(0), "again"));
        assert_eq!(persisted.load(Ordering::SeqCst), 1);
        assert_eq!(
            health.counters(DiskId(0)).io_errors,
            2 * READ_ERRORS_TO_FAIL - 1
        );
    }

    #[test]
    fn a_write_error_or_a_gone_disk_fails_at_once_and_tags_fail_in_a_row() {
        let (health, faults, _) = registry();
        let d = health.proxies().remove(&DiskId(0)).unwrap();
        faults.fail_writes(Trigger::always().times(1));
        assert!(crate::disk::write_at(d.as_ref(), 0, &[1; 4096]).is_err());
        assert!(health.is_failed(DiskId(0)));

        let (health, faults, _) = registry();
        let d = health.proxies().remove(&DiskId(0)).unwrap();
        faults.set_gone(true);
        assert!(crate::disk::read_at(d.as_ref(), 0, 4096).is_err());
        assert!(health.is_failed(DiskId(0)));

        let (health, _, _) = registry();
        for _ in 0..TAG_FAILURES_TO_FAIL - 1 {
            health.tag_failure(DiskId(0));
        }
        health.tag_ok(DiskId(0));
        for _ in 0..TAG_FAILURES_TO_FAIL - 1 {
            health.tag_failure(DiskId(0));
        }
        assert_eq!(health.state(DiskId(0)), DiskState::Ok);
        health.tag_failure(DiskId(0));
        assert!(health.is_failed(DiskId(0)));
    }

    #[test]
    fn a_disk_file_truncated_under_the_pool_fails_at_the_first_read_past_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d0.img");
        std::fs::write(&path, vec![7u8; 1 << 20]).unwrap();
        let opts = crate::disk::DiskOptions {
            backend: crate::disk::Backend::Inline,
            ..Default::default()
        };
        let disk = crate::disk::open_disk(&path, &opts).unwrap();
        let health = Health::new(
            [(DiskId(0), disk)],
            FailurePolicy::default(),
            Box::new(|_, _, _| {}),
        );
        let d = health.proxies().remove(&DiskId(0)).unwrap();
        assert_eq!(
            crate::disk::read_at(d.as_ref(), 0, 4096).unwrap()[..],
            [7u8; 4096]
        );
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(64 << 10)
            .unwrap();
        // Inside the new end: still fine. Past it: the disk is failed at once.
        crate::disk::read_at(d.as_ref(), 0, 4096).unwrap();
        assert!(crate::disk::read_at(d.as_ref(), 512 << 10, 4096).is_err());
        assert!(health.is_failed(DiskId(0)));
    }

    #[test]
    fn rebuilding_chunks_are_usable_only_before_the_cursor() {
        let (health, _, _) = registry();
        assert!(health.chunk_usable(DiskId(0), 2, 9));
        health.set_state(DiskId(0), DiskState::Rebuilding);
        health.set_cursor(DiskId(0), 2, 10);
        assert!(health.degraded());
        assert!(health.chunk_usable(DiskId(0), 1, 500));
        assert!(health.chunk_usable(DiskId(0), 2, 9));
        assert!(!health.chunk_usable(DiskId(0), 2, 10));
        assert!(!health.chunk_usable(DiskId(0), 3, 0));
        assert!(!health.chunk_usable(DiskId(7), 0, 0), "unknown disk");
        health.set_state(DiskId(0), DiskState::Ok);
        assert!(!health.degraded());
    }
}
