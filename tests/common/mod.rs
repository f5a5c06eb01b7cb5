//! Helpers shared by several integration-test binaries (each includes this with `mod common;`).
// Each binary uses some of the helpers.
#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use shardvol::disk::{
    Disk, DiskRef, IoBuf, IoOp, MemDisk, Pending, PowerCut, UNLIMITED_OPS, discard, read_at, sync,
    write_at,
};

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
/// in a fresh store, and `n` memory disks behind power cuts large enough for it. The store is
/// both a file (`store_path`) and a copy of it on a memory disk behind the same power cut
/// (`cut_store`); a test uses one or the other.
pub struct MemRig {
    pub dir: tempfile::TempDir,
    pub store_path: std::path::PathBuf,
    pub cut_store: CutStore,
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
        let cut_store = CutStore::load(&store_path);
        Self {
            dir,
            store_path,
            cut_store,
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

/// A redb storage backend on a shardvol disk. Crash tests keep the metadata store on a
/// [`MemDisk`] behind the rig's [`PowerCut`]: a power cut then stops the store at the same
/// instant as the disks, and a crash keeps, drops or tears the store's unsynced writes as it
/// does theirs, so the order in which the volume commits to the store and writes its disks is
/// tested, not only what each one holds. Every read, write and sync is one op of the disk (and
/// of the power-cut budget). `sync_delay_us` microseconds are slept before each sync (0: none;
/// it can change at any time): a slow store commit overlaps more of the volume's other I/O.
/// The sync that brings `syncs_left` to zero cuts the power itself (it sets `budget` to zero
/// and fails), after its delay: a cut inside a store commit, whatever the disks did meanwhile.
struct DiskStore {
    disk: DiskRef,
    /// The store's length: the disk has a fixed size, the store grows inside it.
    len: Arc<AtomicU64>,
    sync_delay_us: Arc<AtomicU64>,
    syncs_left: Arc<AtomicI64>,
    budget: Arc<AtomicI64>,
}

impl DiskStore {
    /// The whole sectors around `len` bytes at `offset`: (their first byte, their content).
    fn sectors(&self, offset: u64, len: usize) -> std::io::Result<(u64, IoBuf)> {
        let start = offset / 512 * 512;
        let end = (offset + len as u64).next_multiple_of(512);
        let buf = read_at(&*self.disk, start, (end - start) as usize).map_err(store_io)?;
        Ok((start, buf))
    }
}

impl std::fmt::Debug for DiskStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskStore")
            .field("disk", &self.disk.name())
            .field("len", &self.len.load(Ordering::SeqCst))
            .finish()
    }
}

fn store_io(e: shardvol::disk::DiskError) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

impl redb::StorageBackend for DiskStore {
    fn len(&self) -> std::io::Result<u64> {
        Ok(self.len.load(Ordering::SeqCst))
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        if offset + out.len() as u64 > self.len.load(Ordering::SeqCst) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "read past the end of the store",
            ));
        }
        let (start, buf) = self.sectors(offset, out.len())?;
        let at = (offset - start) as usize;
        out.copy_from_slice(&buf[at..at + out.len()]);
        Ok(())
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        let old = self.len.load(Ordering::SeqCst);
        if len > self.disk.size() {
            return Err(std::io::Error::other("the store outgrew its disk"));
        }
        if len > old {
            // New positions read as zeros, whatever an earlier, longer store left there.
            let a = old.next_multiple_of(512).min(len);
            if a > old {
                redb::StorageBackend::write(self, old, &vec![0; (a - old) as usize])?;
            }
            let b = len.next_multiple_of(512).min(self.disk.size());
            if b > a {
                discard(&*self.disk, a, b - a).map_err(store_io)?;
            }
        }
        self.len.store(len, Ordering::SeqCst);
        Ok(())
    }
    fn sync_data(&self) -> std::io::Result<()> {
        let delay = self.sync_delay_us.load(Ordering::Relaxed);
        if delay > 0 {
            std::thread::sleep(std::time::Duration::from_micros(delay));
        }
        if self.syncs_left.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.budget.store(0, Ordering::SeqCst);
            return Err(std::io::Error::other("power cut during a store sync"));
        }
        sync(&*self.disk).map_err(store_io)
    }
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        if offset.is_multiple_of(512) && data.len().is_multiple_of(512) {
            return write_at(&*self.disk, offset, data).map_err(store_io);
        }
        // The disk takes whole sectors: an unaligned write rewrites the sectors it touches.
        let (start, mut buf) = self.sectors(offset, data.len())?;
        let at = (offset - start) as usize;
        buf[at..at + data.len()].copy_from_slice(data);
        write_at(&*self.disk, start, &buf).map_err(store_io)
    }
}

/// A metadata store kept on a [`MemDisk`] (see [`DiskStore`]), for rigs that cut the power:
/// loaded from a store file once, then opened, cut and crashed together with the rig's disks.
pub struct CutStore {
    label: std::path::PathBuf,
    pub disk: Arc<MemDisk>,
    len: Arc<AtomicU64>,
    /// Each sync sleeps this many microseconds first; 0 at first.
    pub delay_us: Arc<AtomicU64>,
    /// The sync that brings this to zero cuts the power (see [`CutStore::cut_at_sync`]).
    pub syncs_left: Arc<AtomicI64>,
}

impl CutStore {
    /// The store file at `path`, copied onto a new memory disk (the file is not used again).
    pub fn load(path: &Path) -> Self {
        let disk = Arc::new(MemDisk::new("store", 64 << 20));
        let mut bytes = std::fs::read(path).unwrap();
        let len = bytes.len() as u64;
        bytes.resize(bytes.len().next_multiple_of(512), 0);
        write_at(&*disk, 0, &bytes).unwrap();
        sync(&*disk).unwrap();
        Self {
            label: path.to_path_buf(),
            disk,
            len: Arc::new(AtomicU64::new(len)),
            delay_us: Arc::new(AtomicU64::new(0)),
            syncs_left: Arc::new(AtomicI64::new(UNLIMITED_OPS)),
        }
    }

    /// Opens the store behind `budget`, the power cut of the rig's disks.
    pub fn open(&self, budget: &Arc<AtomicI64>) -> Arc<MetaStore> {
        let backend = DiskStore {
            disk: Arc::new(PowerCut::new(self.disk.clone(), budget.clone())),
            len: self.len.clone(),
            sync_delay_us: self.delay_us.clone(),
            syncs_left: self.syncs_left.clone(),
            budget: budget.clone(),
        };
        Arc::new(MetaStore::open_on(&self.label, backend).unwrap())
    }

    /// Arms a power cut at the `n`-th sync of the store from now (1: the next), after its
    /// delay: the cut lands inside a store commit, while the volume's other threads go on.
    pub fn cut_at_sync(&self, n: i64) {
        self.syncs_left.store(n, Ordering::SeqCst);
    }

    /// Whether an armed cut at a sync has happened.
    pub fn cut_at_sync_fired(&self) -> bool {
        self.syncs_left.load(Ordering::SeqCst) <= 0
    }

    /// The power failure, for the store (the store must be closed: every handle dropped):
    /// its unsynced writes kept, dropped or torn as `mode` says; a cut armed at a sync is
    /// disarmed.
    pub fn crash<R: rand::Rng + ?Sized>(&self, rng: &mut R, mode: shardvol::disk::CrashMode) {
        self.disk.crash(rng, mode);
        self.syncs_left.store(UNLIMITED_OPS, Ordering::SeqCst);
    }
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
    kind: Slowed,
    /// Batches sleeping now.
    waiting: Arc<AtomicU64>,
}

impl Slow {
    pub fn writes(inner: DiskRef, delay_us: Arc<AtomicU64>) -> Self {
        let waiting = Arc::new(AtomicU64::new(0));
        Self {
            inner,
            delay_us,
            kind: Slowed::Writes,
            waiting,
        }
    }
    /// Slow reads; `waiting` counts the batches sleeping.
    pub fn reads(inner: DiskRef, delay_us: Arc<AtomicU64>, waiting: Arc<AtomicU64>) -> Self {
        Self {
            inner,
            delay_us,
            kind: Slowed::Reads,
            waiting,
        }
    }
    /// Slow syncs: each batch holding one sleeps a pseudo-random time below `max_delay_us`, so
    /// that of two syncs started one after the other the later one may end first.
    pub fn syncs(inner: DiskRef, max_delay_us: Arc<AtomicU64>) -> Self {
        Self {
            inner,
            delay_us: max_delay_us,
            kind: Slowed::Syncs,
            waiting: Arc::new(AtomicU64::new(0)),
        }
    }
}

/// Which batches a [`Slow`] disk delays.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Slowed {
    Reads,
    Writes,
    Syncs,
}

/// A pseudo-random number below `max` (`max` > 0), different on each call.
fn jitter(max: u64) -> u64 {
    static STATE: AtomicU64 = AtomicU64::new(0x2545_F491_4F6C_DD1D);
    let mut x = STATE.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed);
    x ^= x >> 31;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 29;
    x % max
}

impl Disk for Slow {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn submit(&self, ops: Vec<IoOp>) -> Pending {
        let slowed = |op: &IoOp| match op {
            IoOp::Read { .. } => self.kind == Slowed::Reads,
            IoOp::Write { .. } => self.kind == Slowed::Writes,
            IoOp::Sync => self.kind == Slowed::Syncs,
            IoOp::Discard { .. } => false,
        };
        let delay = match self.delay_us.load(Ordering::SeqCst) {
            0 => 0,
            _ if !ops.iter().any(slowed) => 0,
            max if self.kind == Slowed::Syncs => jitter(max),
            d => d,
        };
        if delay > 0 {
            self.waiting.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_micros(delay));
            self.waiting.fetch_sub(1, Ordering::SeqCst);
        }
        self.inner.submit(ops)
    }
    /// While a write delay is set, writes wait: `Volume::try_write_now` must decline. Slow
    /// reads and syncs do not concern it (it only writes).
    fn completes_in_submit(&self) -> bool {
        (self.kind != Slowed::Writes || self.delay_us.load(Ordering::SeqCst) == 0)
            && self.inner.completes_in_submit()
    }
}
