//! Crash consistency (DESIGN.md invariants 1–3) on in-memory disks with a power-cut model.
//!
//! Each cycle runs a random sequence of writes (aligned and not), trims, write-zeroes,
//! flushes, reads and destaging rounds against a volume while its background destager also
//! runs; then the power is cut: at a random I/O (every op after it fails and never reaches a
//! disk) or at the end of the sequence. Every unsynced write on every disk is then kept, dropped
//! or torn at 512-byte granularity. The volume is reopened (journal replay) and every block is
//! checked against a model: a block reads back as its content at the last completed flush, or
//! as one of the versions written after it — nothing else, whichever stripe it shares. In some
//! cycles `m` disks are then pulled and every block is checked again (degraded reads).
//!
//! `SHARDVOL_CRASH_CYCLES` sets the number of cycles (default 2000, the test script runs more in
//! release mode); `SHARDVOL_CRASH_SEED` picks the seed.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use shardvol::crypto::{KeyRing, MasterKey};
use shardvol::disk::{CrashMode, DiskRef, FaultDisk, MemDisk, PowerCut, UNLIMITED_OPS};
use shardvol::layout::placement::PlacementDisk;
use shardvol::layout::{DiskId, Geometry};
use shardvol::meta::VolumeRecord;
use shardvol::volume::{BlockDevice, Volume, VolumeError, VolumeParts, WriteKey};

mod common;

const BS: usize = 4096;
/// Blocks per stripe of the rig: 4 data chunks of 16 KiB.
const STRIPE_BLOCKS: usize = 16;

struct Rig {
    _dir: tempfile::TempDir,
    /// The metadata store, on a memory disk behind the same power cut as the volume's disks,
    /// crashed with them.
    store: common::CutStore,
    /// Each disk sync sleeps a random time below this many microseconds; 0 at first.
    sync_delay: Arc<AtomicU64>,
    mems: Vec<Arc<MemDisk>>,
    /// Each disk: the power-cut budget below, a pull switch (degraded reads) above.
    cuts: Vec<Arc<FaultDisk>>,
    budget: Arc<AtomicI64>,
    record: VolumeRecord,
    keys: Arc<KeyRing>,
    /// Every batch holding a write sleeps this many microseconds before it is passed on (see
    /// [`common::Slow::writes`]); 0 at first, changed at any time.
    write_delay: Arc<AtomicU64>,
}

const UNLIMITED: i64 = UNLIMITED_OPS;

impl Rig {
    fn new(seed: u64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store_path = dir.path().join("pool.redb");
        let geometry = Geometry::new(4, 2, 16 * 1024).unwrap();
        let mut seed_bytes = [0u8; 32];
        seed_bytes[..8].copy_from_slice(&seed.to_le_bytes());
        let record = common::stored_record(
            &store_path,
            7,
            "crash",
            24 * 16 * BS as u64,
            geometry,
            seed_bytes,
            (4 << 20) + 8192,
        );
        let size = record.region_offset + record.region_size;
        let mems: Vec<Arc<MemDisk>> = (0..6)
            .map(|i| Arc::new(MemDisk::new(format!("mem{i}"), size)))
            .collect();
        let budget = Arc::new(AtomicI64::new(UNLIMITED));
        let cuts = mems
            .iter()
            .enumerate()
            .map(|(i, m)| {
                Arc::new(FaultDisk::with_seed(
                    Arc::new(PowerCut::new(m.clone(), budget.clone())) as DiskRef,
                    i as u64,
                ))
            })
            .collect();
        let keys = Arc::new(KeyRing::new([9; 16]));
        keys.insert(1, MasterKey::from_bytes([seed as u8; 32]));
        let rig = Self {
            _dir: dir,
            store: common::CutStore::load(&store_path),
            sync_delay: Arc::new(AtomicU64::new(0)),
            mems,
            cuts,
            budget,
            record,
            keys,
            write_delay: Arc::new(AtomicU64::new(0)),
        };
        Volume::format(&rig.parts()).unwrap();
        rig
    }

    fn parts(&self) -> VolumeParts {
        let disks: HashMap<DiskId, DiskRef> = self
            .cuts
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let d = c.clone() as DiskRef;
                let d = Arc::new(common::Slow::writes(d, self.write_delay.clone())) as DiskRef;
                let d = Arc::new(common::Slow::syncs(d, self.sync_delay.clone())) as DiskRef;
                (DiskId(i as u32), d)
            })
            .collect();
        let table = (0..6)
            .map(|i| PlacementDisk {
                id: DiskId(i),
                domain: format!("d{i}"),
            })
            .collect();
        let store = self.store.open(&self.budget);
        VolumeParts {
            record: self.record.clone(),
            disks,
            table,
            keys: self.keys.clone(),
            write_key: Arc::new(WriteKey::new(1, 1)),
            store,
        }
    }

    fn open(&self) -> Arc<Volume> {
        Volume::open(self.parts()).expect("volume reopens after a crash")
    }

    /// A new rig (seeded from `rng`) whose power-cut budget this thread's checks read, and its
    /// volume, open.
    fn started(rng: &mut StdRng) -> (Rig, Arc<Volume>) {
        let rig = Rig::new(rng.random());
        BUDGET.with(|b| *b.borrow_mut() = Some(rig.budget.clone()));
        let vol = rig.open();
        (rig, vol)
    }

    /// With probability 0.7, arms a power cut after a random number of I/Os below `max_ops`
    /// (the cut happens only if that many are issued); otherwise leaves the power on.
    fn arm_power_cut(&self, rng: &mut StdRng, max_ops: i64) {
        let budget = if rng.random_bool(0.7) {
            rng.random_range(1..max_ops)
        } else {
            UNLIMITED
        };
        self.budget.store(budget, Ordering::SeqCst);
    }

    /// Cuts the power: nothing more reaches the disks, the volume stops as in a crash, and
    /// every unsynced write is kept, dropped or torn as `mode` says (`None`: all, none or a
    /// third each, at random). Then the power comes back and the volume is reopened (journal
    /// replay). Returns it and the (kept, dropped, torn) counts.
    fn crash_and_reopen(
        &self,
        vol: Arc<Volume>,
        rng: &mut StdRng,
        mode: Option<CrashMode>,
    ) -> (Arc<Volume>, [u64; 3]) {
        self.budget.store(0, Ordering::SeqCst);
        vol.halt();
        drop(vol);
        let mode = mode.unwrap_or_else(|| match rng.random_range(0..3) {
            0 => CrashMode::DropAll,
            1 => CrashMode::KeepAll,
            _ => CrashMode::THIRDS,
        });
        let mut counts = [0; 3];
        for m in &self.mems {
            let r = m.crash(rng, mode);
            counts[0] += r.kept;
            counts[1] += r.dropped;
            counts[2] += r.torn;
        }
        // The store's unsynced writes meet the same fate (not counted: the counts are the
        // volume's disks').
        self.store.crash(rng, mode);
        self.budget.store(UNLIMITED, Ordering::SeqCst);
        (self.open(), counts)
    }
}

impl Rig {
    /// Any `m` = 2 disks pulled: every block must still read back as the model allows.
    /// Returns the blocks checked.
    fn check_with_two_disks_pulled(
        &self,
        vol: &Volume,
        model: &mut Model,
        rng: &mut StdRng,
    ) -> u64 {
        let a = rng.random_range(0..6);
        let b = (a + rng.random_range(1..6)) % 6;
        self.cuts[a].handle().set_gone(true);
        self.cuts[b].handle().set_gone(true);
        let n = check_all(vol, model, false);
        self.cuts[a].handle().set_gone(false);
        self.cuts[b].handle().set_gone(false);
        n
    }
}

/// Writes random data to each of `blocks` (block numbers), flushes and destages.
fn write_blocks_flush_destage(vol: &Volume, model: &mut Model, rng: &mut StdRng, blocks: &[usize]) {
    for &b in blocks {
        let data = fill(rng, BS);
        model.write(b * BS, &data);
        vol.write((b * BS) as u64, &data, false).unwrap();
    }
    vol.flush().unwrap();
    model.flushed();
    vol.destage().unwrap();
}

/// What each block may read back as.
struct Model {
    latest: Vec<Vec<u8>>,
    durable: Vec<Vec<u8>>,
    pending: Vec<Vec<Vec<u8>>>,
}

impl Model {
    fn new(blocks: usize) -> Self {
        Self {
            latest: vec![vec![0; BS]; blocks],
            durable: vec![vec![0; BS]; blocks],
            pending: vec![vec![]; blocks],
        }
    }
    fn write(&mut self, offset: usize, data: &[u8]) {
        let end = offset + data.len();
        for b in offset / BS..end.div_ceil(BS) {
            let mut v = self.latest[b].clone();
            let from = offset.max(b * BS);
            let to = end.min((b + 1) * BS);
            v[from - b * BS..to - b * BS].copy_from_slice(&data[from - offset..to - offset]);
            self.pending[b].push(v.clone());
            self.latest[b] = v;
        }
    }
    /// Block `b`'s newest version is durable: nothing older may come back.
    fn block_flushed(&mut self, b: usize) {
        self.durable[b] = self.latest[b].clone();
        self.pending[b].clear();
    }
    fn flushed(&mut self) {
        for b in 0..self.latest.len() {
            self.block_flushed(b);
        }
    }
    fn allowed(&self, b: usize, got: &[u8]) -> bool {
        got == self.durable[b].as_slice() || self.pending[b].iter().any(|v| v.as_slice() == got)
    }
    fn settle(&mut self, b: usize, got: Vec<u8>) {
        self.durable[b] = got.clone();
        self.latest[b] = got;
        self.pending[b].clear();
    }
}

#[derive(Default, Debug)]
struct Counts {
    cycles: u64,
    cut_mid_io: u64,
    ops: u64,
    blocks_checked: u64,
    degraded_checks: u64,
    kept: u64,
    dropped: u64,
    torn: u64,
}

/// A write without FUA, half the time through `try_write_now` (as the NBD server does), which
/// may decline; the other half, and when declined, through `write`.
fn write_now_or_later(
    vol: &Volume,
    rng: &mut StdRng,
    offset: usize,
    data: &[u8],
) -> Result<(), VolumeError> {
    if rng.random_bool(0.5)
        && let Some(r) = vol.try_write_now(offset as u64, data)
    {
        return r;
    }
    vol.write(offset as u64, data, false)
}

fn fill(rng: &mut StdRng, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rng.fill(&mut v[..]);
    v
}

/// Runs random operations until the op budget is used up or the sequence ends. Every read
/// before the cut must return the newest content.
fn run_ops(rng: &mut StdRng, vol: &Volume, model: &mut Model, counts: &mut Counts) {
    let size = vol.size() as usize;
    let nops = rng.random_range(1..60);
    for _ in 0..nops {
        counts.ops += 1;
        let choice = rng.random_range(0..100);
        let r = if choice < 5 {
            // Whole stripes: into an empty stripe, written in place without the journal.
            let stripe = STRIPE_BLOCKS * BS;
            let n = rng.random_range(1..=2);
            let offset = stripe * rng.random_range(0..=size / stripe - n);
            let data = fill(rng, n * stripe);
            model.write(offset, &data);
            vol.write(offset as u64, &data, rng.random_bool(0.1))
        } else if choice < 50 {
            let aligned = rng.random_bool(0.6);
            let len = if aligned {
                BS * rng.random_range(1..=20)
            } else {
                rng.random_range(1..3 * BS)
            };
            let offset = if aligned {
                BS * rng.random_range(0..size / BS)
            } else {
                rng.random_range(0..size)
            };
            let len = len.min(size - offset);
            let data = fill(rng, len);
            model.write(offset, &data);
            if rng.random_bool(0.05) {
                vol.write(offset as u64, &data, true)
            } else {
                write_now_or_later(vol, rng, offset, &data)
            }
        } else if choice < 60 {
            let offset = rng.random_range(0..size);
            let len = rng.random_range(1..=(size - offset).min(40 * BS));
            model.write(offset, &vec![0; len]);
            if rng.random_bool(0.5) {
                vol.trim(offset as u64, len as u64)
            } else {
                vol.write_zeroes(offset as u64, len as u64, rng.random_bool(0.3), false)
            }
        } else if choice < 75 {
            let r = vol.flush();
            if r.is_ok() {
                model.flushed();
            }
            r
        } else if choice < 85 {
            vol.destage().map(|_| ())
        } else {
            let offset = rng.random_range(0..size);
            let len = rng.random_range(1..=(size - offset).min(8 * BS));
            let mut buf = vec![0u8; len];
            let r = vol.read(offset as u64, &mut buf);
            if r.is_ok() {
                for (i, byte) in buf.iter().enumerate() {
                    let at = offset + i;
                    assert_eq!(
                        *byte,
                        model.latest[at / BS][at % BS],
                        "read before the crash returned stale data at byte {at}"
                    );
                }
            }
            r
        };
        if r.is_err() {
            // Only the power cut makes operations fail here.
            assert!(
                vol_budget_exhausted(),
                "operation failed without a power cut: {r:?}"
            );
            return;
        }
    }
}

thread_local! {
    static BUDGET: std::cell::RefCell<Option<Arc<AtomicI64>>> = const { std::cell::RefCell::new(None) };
}

fn vol_budget_exhausted() -> bool {
    BUDGET.with(|b| {
        b.borrow()
            .as_ref()
            .is_some_and(|b| b.load(Ordering::SeqCst) <= 0)
    })
}

fn check_all(vol: &Volume, model: &mut Model, settle: bool) -> u64 {
    let blocks = model.latest.len();
    for b in 0..blocks {
        let mut got = vec![0u8; BS];
        vol.read((b * BS) as u64, &mut got)
            .unwrap_or_else(|e| panic!("block {b} unreadable: {e}"));
        assert!(
            model.allowed(b, &got),
            "block {b} holds neither its flushed content nor a version written after it"
        );
        if settle {
            model.settle(b, got);
        }
    }
    blocks as u64
}

#[test]
fn random_crashes_never_lose_flushed_data_or_show_garbage() {
    let cycles: u64 = std::env::var("SHARDVOL_CRASH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let seed: u64 = std::env::var("SHARDVOL_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut counts = Counts::default();
    let cycles_per_rig = 50;
    let mut done = 0;
    while done < cycles {
        let rig = Rig::new(rng.random());
        BUDGET.with(|b| *b.borrow_mut() = Some(rig.budget.clone()));
        let mut model = Model::new((rig.record.size as usize) / BS);
        let mut vol = rig.open();
        for _ in 0..cycles_per_rig.min(cycles - done) {
            rig.arm_power_cut(&mut rng, 600);
            run_ops(&mut rng, &vol, &mut model, &mut counts);
            if vol_budget_exhausted() {
                counts.cut_mid_io += 1;
            }
            let (reopened, [kept, dropped, torn]) = rig.crash_and_reopen(vol, &mut rng, None);
            vol = reopened;
            counts.kept += kept;
            counts.dropped += dropped;
            counts.torn += torn;
            counts.blocks_checked += check_all(&vol, &mut model, true);
            if rng.random_bool(0.15) {
                vol.destage().expect("destage before pulling disks");
                counts.blocks_checked +=
                    rig.check_with_two_disks_pulled(&vol, &mut model, &mut rng);
                counts.degraded_checks += 1;
            }
            counts.cycles += 1;
            done += 1;
        }
        vol.close().expect("clean close");
    }
    println!("crash test: {counts:?}");
    assert_eq!(counts.cycles, cycles);
    assert!(
        counts.cut_mid_io > 0 && counts.torn > 0 && counts.dropped > 0,
        "the crash model exercised every case: {counts:?}"
    );
}

/// Concurrent writers and a crash: every block reads back as flushed or as a version written
/// after that, whatever the interleaving of the writers' journal records.
///
/// Each cycle, six threads write single blocks and partial blocks (read-modify-write) to blocks
/// of their own, spread over every stripe, and now and then flush, while the destager runs. A
/// flush must make durable every write acknowledged before it started, on any thread, even
/// with other writes still in flight. The power is cut at a random I/O or after the writers;
/// unsynced writes are kept, dropped or torn; the volume is reopened and every block is
/// checked. With the power still on after the writers, every block must read back as last
/// written.
#[test]
fn concurrent_writers_survive_crashes() {
    const THREADS: usize = 6;
    let seed: u64 = std::env::var("SHARDVOL_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x6a0b);
    let mut rng = StdRng::seed_from_u64(seed);
    let rig = Rig::new(rng.random());
    rig.write_delay.store(300, Ordering::SeqCst);
    BUDGET.with(|b| *b.borrow_mut() = Some(rig.budget.clone()));
    let blocks = (rig.record.size as usize) / BS;
    let mut model = Model::new(blocks);
    let mut vol = rig.open();
    let (mut cuts, mut checked, mut writes, mut flushes) = (0, 0, 0, 0);
    // Orders acknowledgements and flush starts across the threads.
    let clock = AtomicU64::new(0);
    for _cycle in 0..25 {
        rig.arm_power_cut(&mut rng, 800);
        // Per thread: its writes in order (offset, data, when acknowledged) and the start of
        // each of its flushes that succeeded.
        type Log = (Vec<(usize, Vec<u8>, Option<u64>)>, Vec<u64>);
        let logs: Vec<Log> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..THREADS)
                .map(|t| {
                    let (vol, clock) = (&vol, &clock);
                    let mut rng = StdRng::seed_from_u64(rng.random());
                    s.spawn(move || {
                        let (mut log, mut flushed) = (Vec::new(), Vec::new());
                        for _ in 0..30 {
                            if rng.random_bool(0.1) {
                                let start = clock.fetch_add(1, Ordering::SeqCst);
                                if vol.flush().is_err() {
                                    break;
                                }
                                flushed.push(start);
                            }
                            // A block of this thread's own (blocks ≡ t mod THREADS).
                            let b = rng.random_range(0..blocks / THREADS) * THREADS + t;
                            let (offset, len) = if rng.random_bool(0.7) {
                                (b * BS, BS)
                            } else {
                                let from = rng.random_range(0..BS - 1);
                                (b * BS + from, rng.random_range(1..BS - from))
                            };
                            let data = fill(&mut rng, len);
                            if write_now_or_later(vol, &mut rng, offset, &data).is_err() {
                                log.push((offset, data, None));
                                break;
                            }
                            log.push((offset, data, Some(clock.fetch_add(1, Ordering::SeqCst))));
                        }
                        (log, flushed)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        // The newest flush that succeeded covers every write acknowledged before it started.
        let covered = logs.iter().flat_map(|(_, f)| f.iter().copied()).max();
        flushes += logs.iter().map(|(_, f)| f.len()).sum::<usize>();
        for (log, _) in &logs {
            writes += log.len();
            for (offset, data, acked) in log {
                model.write(*offset, data);
                if acked.is_some_and(|a| covered.is_some_and(|c| a < c)) {
                    for b in offset / BS..(offset + data.len()).div_ceil(BS) {
                        model.block_flushed(b);
                    }
                }
            }
        }
        if !vol_budget_exhausted() && vol.flush().is_ok() {
            model.flushed();
        }
        if vol_budget_exhausted() {
            cuts += 1;
        } else {
            // With the power on, every write of the cycle reads back as written.
            rig.budget.store(UNLIMITED, Ordering::SeqCst);
            for (b, want) in model.latest.iter().enumerate() {
                let mut got = vec![0u8; BS];
                vol.read((b * BS) as u64, &mut got).unwrap();
                assert!(got == *want, "block {b} does not read back as last written");
            }
        }
        vol = rig.crash_and_reopen(vol, &mut rng, None).0;
        checked += check_all(&vol, &mut model, true);
    }
    vol.close().expect("clean close");
    println!(
        "concurrent crash test: {writes} writes, {flushes} flushes, {cuts} cuts mid-I/O, {checked} blocks checked"
    );
    assert!(cuts > 0, "some cycles cut the power while writers ran");
}

/// A flush covers the writes acknowledged before it started, even when another flush started
/// while those writes were still being written to the journal and returned first.
///
/// Thread A writes a block; its journal record takes 3 × 30 ms to reach the three journal
/// disks. Thread B flushes 10 ms into that. Then A, its write acknowledged, flushes too. The
/// power is cut with every unsynced write lost: A's block must be there. (A flush that marked
/// the records in flight durable without waiting for them would let A's flush return at once,
/// with the block never synced.)
#[test]
fn a_flush_covers_writes_that_were_in_flight_during_an_earlier_flush() {
    let mut rng = StdRng::seed_from_u64(0xf105);
    let (rig, vol) = Rig::started(&mut rng);
    let data = fill(&mut rng, BS);
    rig.write_delay.store(30_000, Ordering::SeqCst);
    std::thread::scope(|s| {
        s.spawn(|| {
            vol.write(0, &data, false).unwrap();
            vol.flush().unwrap();
        });
        s.spawn(|| {
            std::thread::sleep(std::time::Duration::from_millis(10));
            vol.flush().unwrap();
        });
    });
    rig.write_delay.store(0, Ordering::SeqCst);
    let (vol, _) = rig.crash_and_reopen(vol, &mut rng, Some(CrashMode::DropAll));
    let mut got = vec![0u8; BS];
    vol.read(0, &mut got).unwrap();
    assert!(got == data, "a flushed write was lost");
    vol.close().unwrap();
}

/// Whole stripes written into empty stripes skip the journal (`src/volume/fresh.rs`). After a
/// power cut, each of their blocks reads back as new if a flush covered it, else as new or as
/// zeros (the stripe was empty), never as an error, whatever the crash kept of their chunks.
/// Then one block is written into every such stripe and destaged: the first destage of an
/// empty stripe must not code parity over what the cut-short write left in its slots, so with
/// any two disks pulled every block still reads back.
#[test]
fn journal_less_stripe_writes_read_old_or_new_after_a_crash_and_leave_no_write_hole() {
    let mut rng = StdRng::seed_from_u64(0xf5e5);
    let stripe = STRIPE_BLOCKS * BS;
    let (mut fresh_writes, mut mixed) = (0u64, 0u64);
    for cycle in 0..24 {
        let (rig, vol) = Rig::started(&mut rng);
        let stripes = vol.size() as usize / stripe;
        let mut model = Model::new(vol.size() as usize / BS);
        // A few journaled blocks first, destaged, so some stripes are not empty.
        let blocks: Vec<usize> = (0..4)
            .map(|_| rng.random_range(0..vol.size() as usize / BS))
            .collect();
        write_blocks_flush_destage(&vol, &mut model, &mut rng, &blocks);
        let before = vol.stats.fresh_stripe_writes.load(Ordering::Relaxed);
        let mut whole = Vec::new();
        for s in 0..stripes {
            if rng.random_bool(0.5) {
                continue;
            }
            let data = fill(&mut rng, stripe);
            model.write(s * stripe, &data);
            vol.write((s * stripe) as u64, &data, false).unwrap();
            whole.push(s);
            if rng.random_bool(0.2) {
                vol.flush().unwrap();
                model.flushed();
            }
        }
        fresh_writes += vol.stats.fresh_stripe_writes.load(Ordering::Relaxed) - before;
        let mode = if cycle % 2 == 0 {
            CrashMode::THIRDS
        } else {
            CrashMode::Random {
                keep: 0.5,
                torn: 0.3,
            }
        };
        let (vol, _) = rig.crash_and_reopen(vol, &mut rng, Some(mode));
        for &s in &whole {
            let mut got = vec![0u8; stripe];
            vol.read((s * stripe) as u64, &mut got)
                .unwrap_or_else(|e| panic!("stripe {s} unreadable after the crash: {e}"));
            let news = (0..STRIPE_BLOCKS)
                .filter(|i| got[i * BS..(i + 1) * BS] == model.latest[s * STRIPE_BLOCKS + i][..])
                .count();
            if news > 0 && news < STRIPE_BLOCKS {
                mixed += 1;
            }
        }
        check_all(&vol, &mut model, true);
        // One block into every stripe written whole, then destaged; any two disks pulled.
        let blocks: Vec<usize> = whole
            .iter()
            .map(|s| s * STRIPE_BLOCKS + rng.random_range(0..STRIPE_BLOCKS))
            .collect();
        write_blocks_flush_destage(&vol, &mut model, &mut rng, &blocks);
        rig.check_with_two_disks_pulled(&vol, &mut model, &mut rng);
        vol.close().unwrap();
    }
    println!(
        "journal-less stripe writes: {fresh_writes}, read back mixed within a stripe: {mixed}"
    );
    assert!(
        fresh_writes > 100,
        "whole-stripe writes skipped the journal: {fresh_writes}"
    );
}

/// The rig's metadata store ([`common::CutStore`]) under power cuts: a commit that returned
/// survives any crash, and one cut inside its sync is either whole or absent afterwards, so
/// the store opens and reads like a file's after a real power failure.
#[test]
fn the_rigs_metadata_store_keeps_committed_transactions_through_crashes() {
    let mut rng = StdRng::seed_from_u64(0x5707e);
    let (mut whole, mut absent) = (0, 0);
    for cycle in 0..30 {
        let rig = Rig::new(rng.random());
        let store = rig.parts().store;
        store.lifecycle_put("first", b"one").unwrap();
        rig.store.cut_at_sync(1);
        assert!(store.lifecycle_put("second", b"two").is_err());
        drop(store);
        let mode = match cycle % 3 {
            0 => CrashMode::DropAll,
            1 => CrashMode::KeepAll,
            _ => CrashMode::THIRDS,
        };
        rig.store.crash(&mut rng, mode);
        rig.budget.store(UNLIMITED, Ordering::SeqCst);
        let store = rig.parts().store;
        assert_eq!(
            store.lifecycle_get("first").unwrap().as_deref(),
            Some(&b"one"[..])
        );
        match store.lifecycle_get("second").unwrap().as_deref() {
            Some(b"two") => whole += 1,
            None => absent += 1,
            Some(other) => panic!("a half-made commit reads back as {other:?}"),
        }
        // The store takes commits again.
        store.lifecycle_put("third", b"three").unwrap();
    }
    println!("commits cut in their sync: {whole} kept whole, {absent} absent");
    assert!(absent > 0, "no crash lost the commit cut in its sync");
}

/// A round that checkpoints before its end (after sequential writes the journal's tail belongs
/// to the first stripes it destages) must leave every flushed block readable whatever instant
/// the power is cut at: between its parts, inside one, or during a part's checkpoint.
#[test]
fn power_cuts_inside_a_round_that_checkpoints_early_lose_nothing_flushed() {
    let mut rng = StdRng::seed_from_u64(0xea41);
    let stripe = STRIPE_BLOCKS * BS;
    let (mut early, mut cut_mid_round, mut cut_in_store) = (0u64, 0u64, 0u64);
    for cycle in 0..60 {
        let (rig, vol) = Rig::started(&mut rng);
        vol.halt();
        let stripes = vol.size() as usize / stripe;
        let mut model = Model::new(vol.size() as usize / BS);
        // About half the stripes hold data (written block by block, destaged); the others hold
        // nothing at home, so a round that destages into them must commit their allocation
        // to the store before a later checkpoint drops their records from the journal.
        let first: Vec<usize> = (0..stripes)
            .filter(|_| rng.random_bool(0.5))
            .flat_map(|s| s * STRIPE_BLOCKS..(s + 1) * STRIPE_BLOCKS)
            .collect();
        write_blocks_flush_destage(&vol, &mut model, &mut rng, &first);
        // Sequential half-stripe writes over the whole volume, several times, so that the
        // journal's oldest records belong to the first stripes; some flushed, the rest not.
        let passes = rng.random_range(1..3);
        for _ in 0..passes {
            for s in 0..stripes * 2 {
                let data = fill(&mut rng, stripe / 2);
                model.write(s * stripe / 2, &data);
                vol.write((s * stripe / 2) as u64, &data, false).unwrap();
            }
        }
        vol.flush().unwrap();
        model.flushed();
        for _ in 0..rng.random_range(0..8) {
            let b = rng.random_range(0..stripes * STRIPE_BLOCKS);
            let data = fill(&mut rng, BS);
            model.write(b * BS, &data);
            vol.write((b * BS) as u64, &data, false).unwrap();
        }
        let before = vol.stats.early_checkpoints.load(Ordering::Relaxed);
        if cycle % 4 == 0 {
            // Power on through the round: it must checkpoint early.
            vol.destage().unwrap();
            assert!(
                vol.stats.early_checkpoints.load(Ordering::Relaxed) > before,
                "a round after sequential writes ({} journal bytes) took no early checkpoint",
                vol.journal_used()
            );
        } else {
            // Slow disk syncs and store commits make a part's commit overlap the next part's
            // destaging and, were the commits not kept in order, the next part's commit.
            rig.store
                .delay_us
                .store(rng.random_range(0..4000), Ordering::Relaxed);
            rig.sync_delay
                .store(rng.random_range(1..4000), Ordering::Relaxed);
            if cycle % 2 == 1 {
                // Inside one of the round's store commits.
                rig.store.cut_at_sync(rng.random_range(1..4));
            } else {
                rig.arm_power_cut(&mut rng, 400);
            }
            if vol.destage().is_err() {
                cut_mid_round += 1;
            }
            if rig.store.cut_at_sync_fired() {
                cut_in_store += 1;
            }
        }
        early += vol.stats.early_checkpoints.load(Ordering::Relaxed) - before;
        let (vol, _) = rig.crash_and_reopen(vol, &mut rng, None);
        check_all(&vol, &mut model, true);
        rig.check_with_two_disks_pulled(&vol, &mut model, &mut rng);
        vol.close().unwrap();
    }
    println!(
        "early checkpoints: {early}, rounds cut by the power: {cut_mid_round}, \
         of them inside a store commit: {cut_in_store}"
    );
    assert!(early > 10, "rounds took {early} early checkpoints");
    assert!(cut_mid_round > 5, "only {cut_mid_round} rounds were cut");
    assert!(
        cut_in_store > 10,
        "only {cut_in_store} cuts inside a store commit"
    );
}
