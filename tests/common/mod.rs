//! Helpers shared by several integration-test binaries (each includes this with `mod common;`).
// Each binary uses some of the helpers.
#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use shardvol::disk::{Disk, DiskRef, IoOp, MemDisk, Pending, PowerCut, UNLIMITED_OPS};

use shardvol::layout::Geometry;
use shardvol::meta::{MetaStore, VolumeRecord};
use shardvol::volume::Volume;

/// `len` deterministic pseudo-random bytes from `seed` (xorshift): test payloads that differ per
/// seed and never look like zeros.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A volume record for a rig of memory disks (region at 1 MiB, sized for `size`), stored in a new
/// metadata store at `store_path`. The disks must hold `region_offset + region_size` bytes.
pub fn stored_record(
    store_path: &Path,
    id: u64,
    name: &str,
    size: u64,
    geometry: Geometry,
    placement_seed: [u8; 32],
    journal_size: u64,
) -> VolumeRecord {
    let store = MetaStore::create(store_path).unwrap();
    let mut record = VolumeRecord {
        id,
        name: name.into(),
        size,
        geometry,
        placement_seed,
        region_offset: 1 << 20,
        journal_size,
        region_size: 0,
        journal_disks: Vec::new(),
        rebalance: None,
        created_unix: 0,
    };
    record.region_size = Volume::layout_of(&record).region_size();
    store.put_volume(&record).unwrap();
    record
}

/// A volume of `size` bytes (4+2, `chunk`-byte chunks, a 4 MiB + 8 KiB journal) recorded as id 1
/// in a fresh store, and `n` memory disks behind power cuts large enough for it.
pub struct MemRig {
    pub dir: tempfile::TempDir,
    pub store_path: std::path::PathBuf,
    pub record: VolumeRecord,
    pub mems: Vec<Arc<MemDisk>>,
    pub disks: Vec<DiskRef>,
    pub budget: Arc<AtomicI64>,
}

impl MemRig {
    pub fn new(name: &str, placement_seed: [u8; 32], n: usize, size: u64, chunk: u32) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store_path = dir.path().join("pool.redb");
        let record = stored_record(
            &store_path,
            1,
            name,
            size,
            Geometry::new(4, 2, chunk).unwrap(),
            placement_seed,
            (4 << 20) + 8192,
        );
        let (mems, disks, budget) = cut_disks(n, record.region_offset + record.region_size);
        Self {
            dir,
            store_path,
            record,
            mems,
            disks,
            budget,
        }
    }
}

/// `n` memory disks of `size` bytes, each behind a [`PowerCut`] sharing one op budget (unlimited
/// to start): (the memory disks, the disks to use, the budget).
pub fn cut_disks(n: usize, size: u64) -> (Vec<Arc<MemDisk>>, Vec<DiskRef>, Arc<AtomicI64>) {
    let mems: Vec<Arc<MemDisk>> = (0..n)
        .map(|i| Arc::new(MemDisk::new(format!("m{i}"), size)))
        .collect();
    let budget = Arc::new(AtomicI64::new(UNLIMITED_OPS));
    let disks = mems
        .iter()
        .map(|m| Arc::new(PowerCut::new(m.clone(), budget.clone())) as DiskRef)
        .collect();
    (mems, disks, budget)
}

/// Stops a volume as a crash would (no destaging, no checkpoint) and drops it; the caller must
/// hold the only reference.
pub fn kill(vol: Arc<Volume>) {
    vol.halt();
    assert_eq!(Arc::strong_count(&vol), 1);
    drop(vol);
}

/// A disk whose batches holding a write (or, built with [`Slow::reads`], a read) sleep
/// `delay_us` microseconds (0: none; it can change at any time) before they are passed on.
/// Slow writes make concurrent writers overlap inside the journal append, as they do on a
/// loaded disk, instead of finishing one after another; slow reads stand for a long read
/// under a stripe lock (the destager's).
pub struct Slow {
    inner: DiskRef,
    delay_us: Arc<AtomicU64>,
    reads: bool,
    /// Batches sleeping now.
    waiting: Arc<AtomicU64>,
}

impl Slow {
    pub fn writes(inner: DiskRef, delay_us: Arc<AtomicU64>) -> Self {
        let waiting = Arc::new(AtomicU64::new(0));
        Self {
            inner,
            delay_us,
            reads: false,
            waiting,
        }
    }
    /// Slow reads; `waiting` counts the batches sleeping.
    pub fn reads(inner: DiskRef, delay_us: Arc<AtomicU64>, waiting: Arc<AtomicU64>) -> Self {
        Self {
            inner,
            delay_us,
            reads: true,
            waiting,
        }
    }
}

impl Disk for Slow {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn submit(&self, ops: Vec<IoOp>) -> Pending {
        let delay = self.delay_us.load(Ordering::SeqCst);
        let slowed = |op: &IoOp| match op {
            IoOp::Read { .. } => self.reads,
            IoOp::Write { .. } => !self.reads,
            _ => false,
        };
        if delay > 0 && ops.iter().any(slowed) {
            self.waiting.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_micros(delay));
            self.waiting.fetch_sub(1, Ordering::SeqCst);
        }
        self.inner.submit(ops)
    }
    /// While a write delay is set, writes wait: `Volume::try_write_now` must decline. Slow
    /// reads do not concern it (it only writes).
    fn completes_in_submit(&self) -> bool {
        (self.reads || self.delay_us.load(Ordering::SeqCst) == 0)
            && self.inner.completes_in_submit()
    }
}
