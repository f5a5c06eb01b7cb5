//! Review tests of the volume engine (src/volume/): concurrency against a model, journal
//! wrap-around and a full journal, a deterministic power-cut sweep over one destaging round,
//! geometry edge cases, corruption of parity / journal replicas / metadata pages, and hostile
//! arguments. Tests marked `#[ignore = "open issue ..."]` demonstrate known gaps that later work closes;
//! run them with `cargo test --test volume_review -- --ignored`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use shardvol::crypto::{KeyRing, MasterKey};
use shardvol::disk::{
    CrashMode, DiskRef, FaultDisk, FaultHandle, MemDisk, PowerCut, Trigger, UNLIMITED_OPS,
};
use shardvol::layout::placement::{Placement, PlacementDisk};
use shardvol::layout::{DiskId, Geometry, StripeId};
use shardvol::meta::{MetaStore, VolumeRecord};
use shardvol::volume::format::{RecordHeader, RecordKind, header_pages};
use shardvol::volume::{BlockDevice, Extent, Volume, VolumeError, VolumeParts, WriteKey};

mod common;

const BS: usize = 4096;
const UNLIMITED: i64 = UNLIMITED_OPS;

// ---------------------------------------------------------------------------------------------
// Rig: MemDisk ← PowerCut (shared op budget) ← FaultDisk, reopenable with the same disks and store.

struct Rig {
    _dir: tempfile::TempDir,
    store_path: PathBuf,
    mems: Vec<Arc<MemDisk>>,
    disks: Vec<DiskRef>,
    faults: Vec<FaultHandle>,
    budget: Arc<AtomicI64>,
    record: VolumeRecord,
    keys: Arc<KeyRing>,
}

impl Rig {
    fn new(size: u64, k: u16, m: u16, chunk: u32, journal_size: u64, ndisks: usize) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let store_path = dir.path().join("pool.redb");
        let record = common::stored_record(
            &store_path,
            3,
            "review",
            size,
            Geometry::new(k, m, chunk).unwrap(),
            [11; 32],
            journal_size,
        );
        let disk_size = record.region_offset + record.region_size;
        let mems: Vec<Arc<MemDisk>> = (0..ndisks)
            .map(|i| Arc::new(MemDisk::new(format!("m{i}"), disk_size)))
            .collect();
        let budget = Arc::new(AtomicI64::new(UNLIMITED));
        let fault_disks: Vec<FaultDisk> = mems
            .iter()
            .enumerate()
            .map(|(i, m)| {
                FaultDisk::with_seed(
                    Arc::new(PowerCut::new(m.clone(), budget.clone())) as DiskRef,
                    i as u64,
                )
            })
            .collect();
        let faults = fault_disks.iter().map(|f| f.handle()).collect();
        let disks = fault_disks
            .into_iter()
            .map(|f| Arc::new(f) as DiskRef)
            .collect();
        let keys = Arc::new(KeyRing::new([5; 16]));
        keys.insert(1, MasterKey::from_bytes([6; 32]));
        let rig = Rig {
            _dir: dir,
            store_path,
            mems,
            disks,
            faults,
            budget,
            record,
            keys,
        };
        Volume::format(&rig.parts()).unwrap();
        rig
    }

    /// 4+2, 64 KiB chunks, 8 MiB journal, 6 disks.
    fn standard(size: u64) -> Rig {
        Rig::new(size, 4, 2, 64 << 10, 8 << 20, 6)
    }

    fn table(&self) -> Vec<PlacementDisk> {
        (0..self.disks.len())
            .map(|i| PlacementDisk {
                id: DiskId(i as u32),
                domain: format!("d{i}"),
            })
            .collect()
    }

    fn parts(&self) -> VolumeParts {
        let disks: HashMap<DiskId, DiskRef> = self
            .disks
            .iter()
            .enumerate()
            .map(|(i, d)| (DiskId(i as u32), d.clone()))
            .collect();
        let store = Arc::new(MetaStore::open(&self.store_path).unwrap());
        VolumeParts {
            record: self.record.clone(),
            disks,
            table: self.table(),
            keys: self.keys.clone(),
            write_key: Arc::new(WriteKey::new(1, 1)),
            store,
        }
    }

    fn try_open(&self) -> Result<Arc<Volume>, VolumeError> {
        Volume::open(self.parts())
    }

    fn open(&self) -> Arc<Volume> {
        self.try_open().expect("volume opens")
    }

    /// Stops the volume as a power cut would and drops it (every Arc must be gone).
    fn kill(&self, vol: Arc<Volume>) {
        vol.halt();
        assert_eq!(Arc::strong_count(&vol), 1, "someone still holds the volume");
        drop(vol);
    }

    fn crash(&self, rng: &mut StdRng, mode: CrashMode) {
        for m in &self.mems {
            m.crash(rng, mode);
        }
    }

    fn placement(&self) -> Placement {
        Placement::new(self.record.placement_seed, self.table()).unwrap()
    }

    /// Indexes of the journal disks.
    fn journal_disks(&self) -> Vec<usize> {
        Volume::journal_disks(&self.placement(), &self.record)
            .unwrap()
            .into_iter()
            .map(|d| d.0 as usize)
            .collect()
    }

    /// Indexes of the disks of a stripe, in chunk order.
    fn stripe_disks(&self, s: u64) -> Vec<usize> {
        self.placement()
            .place(StripeId(s), self.record.geometry.width())
            .unwrap()
            .into_iter()
            .map(|d| d.0 as usize)
            .collect()
    }

    fn log_start(&self) -> u64 {
        Volume::layout_of(&self.record).log_start()
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; len];
    rng.fill(&mut v[..]);
    v
}

/// Flips one byte of the medium behind the disk's back.
fn flip(m: &MemDisk, offset: u64) {
    let b = m.read_bytes(offset, 1)[0];
    m.tamper(offset, &[b ^ 0x5a]);
}

fn read(vol: &Volume, offset: u64, len: usize) -> Result<Vec<u8>, VolumeError> {
    let mut b = vec![0u8; len];
    vol.read(offset, &mut b).map(|()| b)
}

/// Runs `f` on a thread and fails the test if it does not finish in time (no deadlock hangs CI).
fn bounded<T: Send + 'static>(secs: u64, what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    let h = std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(v) => {
            h.join().unwrap();
            v
        }
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => match h.join() {
            Err(p) => std::panic::resume_unwind(p),
            Ok(()) => unreachable!(),
        },
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!("{what}: did not finish within {secs} s (deadlock?)")
        }
    }
}

/// Byte-exact model of a volume.
#[derive(Clone)]
struct Model(Vec<u8>);

impl Model {
    fn write(&mut self, offset: u64, data: &[u8]) {
        self.0[offset as usize..offset as usize + data.len()].copy_from_slice(data);
    }
    fn zero(&mut self, offset: u64, len: u64) {
        self.0[offset as usize..(offset + len) as usize].fill(0);
    }
}

fn assert_matches(vol: &Volume, model: &Model, what: &str) {
    let got = read(vol, 0, model.0.len()).unwrap_or_else(|e| panic!("{what}: read failed: {e}"));
    if got != model.0 {
        let at = got.iter().zip(&model.0).position(|(a, b)| a != b).unwrap();
        panic!(
            "{what}: volume differs from the model at byte {at} (block {})",
            at / BS
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Known gaps (ignored until the degraded-service and hostile-disk work lands).

/// A crash may keep a later unflushed journal record and lose an earlier one (the disks do not
/// order unsynced writes). Replay correctly stops at the lost one, but the journal then reuses
/// its sequence numbers and positions: once a new record of the same length fills the gap, the
/// stale record behind it is consecutive again and the next replay applies it, over newer
/// flushed data.
#[test]
fn replay_never_resurrects_records_lost_in_an_earlier_crash() {
    let rig = Rig::standard(16 << 20);
    let vol = rig.open();
    vol.halt(); // no background flush or destage
    let a = pattern(1, BS);
    vol.write(0, &a, false).unwrap(); // seq 1: 2 pages at log_start
    vol.flush().unwrap();
    vol.write(BS as u64, &pattern(2, BS), false).unwrap(); // seq 2 at log_start + 8 KiB
    let c = pattern(3, BS);
    vol.write(2 * BS as u64, &c, false).unwrap(); // seq 3 at log_start + 16 KiB
    rig.kill(vol);
    // Power cut: record 3 reached the media, record 2 did not (allowed: no ordering between
    // unsynced writes).
    let mut rng = StdRng::seed_from_u64(1);
    rig.crash(&mut rng, CrashMode::KeepAll);
    for j in rig.journal_disks() {
        rig.mems[j].tamper(rig.log_start() + 2 * BS as u64, &[0u8; BS]);
    }
    let vol = rig.open();
    vol.halt();
    assert_eq!(read(&vol, 0, BS).unwrap(), a);
    assert_eq!(
        read(&vol, BS as u64, 2 * BS).unwrap(),
        vec![0u8; 2 * BS],
        "unflushed writes after the lost record are gone"
    );
    // The client now writes block 2 again and flushes: this is the only durable content.
    let d = pattern(4, BS);
    vol.write(2 * BS as u64, &d, false).unwrap();
    vol.flush().unwrap();
    rig.kill(vol);
    rig.crash(&mut rng, CrashMode::DropAll);
    let vol = rig.open();
    assert!(
        read(&vol, 2 * BS as u64, BS).unwrap() == d,
        "flushed block 2 was replaced by a write lost in the earlier crash"
    );
    rig.kill(vol);
}

/// `append` reserves a journal record (sequence number and space) and then builds it; if the
/// build fails (here: the read-modify-write of a partial block cannot read the old block), the
/// reservation is completed without anything being written. Replay stops at that hole, so every
/// later record, flushed or not, is lost if the server stops before the next checkpoint.
#[test]
fn failed_read_modify_write_leaves_no_hole_before_flushed_records() {
    let rig = Rig::standard(16 << 20);
    let vol = rig.open();
    vol.halt();
    vol.write(0, &pattern(5, BS), true).unwrap();
    vol.destage().unwrap();
    // Three of six disks stop answering reads: block 0 cannot be read or rebuilt.
    let bad = &rig.stripe_disks(0)[..3];
    for &d in bad {
        rig.faults[d].fail_reads(Trigger::always());
    }
    assert!(
        vol.write(100, b"partial", false).is_err(),
        "a partial write over an unreadable block must fail"
    );
    for &d in bad {
        rig.faults[d].clear();
    }
    // A later, flushed write to another stripe.
    let x = pattern(6, BS);
    vol.write(5 << 20, &x, true).unwrap();
    rig.kill(vol); // server killed before the destager's next round
    let vol = rig.open();
    assert!(
        read(&vol, 5 << 20, BS).unwrap() == x,
        "a flushed write was lost at replay"
    );
    rig.kill(vol);
}

/// Invariant 1: flushed data survives a restart, and m disks may be missing. With one disk of
/// six gone, opening a volume whose journal holds records fails: the replay's destaging round
/// cannot write the stripes, and open gives up instead of serving from the journal.
#[test]
fn open_after_restart_with_one_disk_missing_serves_flushed_data() {
    let rig = Rig::standard(16 << 20);
    let vol = rig.open();
    vol.halt();
    let data = pattern(7, 1 << 20);
    vol.write(0, &data, true).unwrap();
    rig.kill(vol);
    let j = rig.journal_disks()[0];
    rig.faults[j].set_gone(true);
    let vol = rig
        .try_open()
        .unwrap_or_else(|e| panic!("open with one disk of six missing: {e}"));
    assert!(read(&vol, 0, 1 << 20).unwrap() == data);
    vol.halt();
}

/// Journal records are checked by crc32c only, so a disk (untrusted, DESIGN.md) can forge one.
/// A forged trim record whose count exceeds the stripe makes `Volume::open` panic (index out of
/// bounds in the trim bitmap) instead of refusing the record.
#[test]
fn malformed_trim_record_does_not_panic_open() {
    let rig = Rig::standard(16 << 20);
    let vol = rig.open();
    vol.halt();
    vol.write(0, &pattern(8, BS), true).unwrap(); // one record, 2 pages
    rig.kill(vol);
    let j0 = rig.journal_disks()[0];
    let first = RecordHeader::decode(&rig.mems[j0].read_bytes(rig.log_start(), BS))
        .expect("the write's record is at the start of the log");
    let forged = RecordHeader {
        seq: first.seq + 1,
        volume: rig.record.id,
        kind: RecordKind::Trim,
        trim_lba: 0,
        trim_count: rig.record.geometry.blocks_per_stripe() + 1000,
        payload_crc: crc32c::crc32c(&[]),
        entries: vec![],
    };
    for j in rig.journal_disks() {
        rig.mems[j].tamper(rig.log_start() + 2 * BS as u64, &forged.encode());
    }
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        rig.try_open().map(|v| v.halt())
    }));
    assert!(
        r.is_ok(),
        "Volume::open panicked on a malformed journal record"
    );
}

/// A well-formed forged trim record (valid crc32c, nothing keyed) written on one journal
/// replica silently zeroes acknowledged, flushed data at the next open: no tag covers trims.
#[test]
fn forged_trim_record_on_one_replica_is_rejected() {
    let rig = Rig::standard(16 << 20);
    let vol = rig.open();
    vol.halt();
    let data = pattern(9, 4 * BS);
    vol.write(0, &data, true).unwrap(); // one record: header page(s) + 4 payload pages
    rig.kill(vol);
    let j = rig.journal_disks()[0];
    // The forgery follows that record, with the next sequence number, so replay would take it.
    let first =
        RecordHeader::decode(&rig.mems[j].read_bytes(rig.log_start(), header_pages(4) * BS))
            .expect("the write's record is at the start of the log");
    assert_eq!(first.kind, RecordKind::Write);
    let forged = RecordHeader {
        seq: first.seq + 1,
        volume: rig.record.id,
        kind: RecordKind::Trim,
        trim_lba: 0,
        trim_count: 4,
        payload_crc: crc32c::crc32c(&[]),
        entries: vec![],
    };
    rig.mems[j].tamper(
        rig.log_start() + ((header_pages(4) + 4) * BS) as u64,
        &forged.encode(),
    );
    let vol = rig.open();
    // An error (the forgery detected) is acceptable; zeros in place of flushed data are not.
    if let Ok(got) = read(&vol, 0, 4 * BS) {
        assert!(
            got == data,
            "flushed data replaced by zeros through a forged journal record"
        );
    }
    vol.halt();
}

// ---------------------------------------------------------------------------------------------
// Concurrency.

/// Threads own interleaved 8-block regions (so they share stripes and rows), each doing random
/// unaligned writes, trims, write-zeroes and reads checked against its own model, while another
/// thread runs destaging rounds and flushes. Then the whole volume is checked after a final
/// destage and after a halt + reopen (journal replay).
#[test]
fn concurrent_random_workload_matches_model_after_destage_and_reopen() {
    const THREADS: usize = 4;
    const REGION: usize = 8 * BS;
    let size = 4 << 20;
    let rig = Rig::new(size as u64, 4, 2, 16 << 10, 8 << 20, 6);
    let vol = rig.open();
    let model = Arc::new(Mutex::new(Model(vec![0u8; size])));
    let stop = Arc::new(AtomicBool::new(false));
    let result = bounded(240, "concurrent workload", {
        let vol = vol.clone();
        let model = model.clone();
        let stop = stop.clone();
        move || {
            let destager = {
                let vol = vol.clone();
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut i = 0u64;
                    while !stop.load(Ordering::SeqCst) {
                        vol.destage().expect("destage");
                        if i.is_multiple_of(3) {
                            vol.flush().expect("flush");
                        }
                        i += 1;
                        std::thread::sleep(Duration::from_millis(2));
                    }
                })
            };
            let workers: Vec<_> = (0..THREADS)
                .map(|t| {
                    let vol = vol.clone();
                    let model = model.clone();
                    std::thread::spawn(move || {
                        let mut rng = StdRng::seed_from_u64(100 + t as u64);
                        let regions: Vec<usize> =
                            (0..size / REGION).filter(|r| r % THREADS == t).collect();
                        let mut mine = Model(vec![0u8; size]);
                        for _ in 0..400 {
                            let r = regions[rng.random_range(0..regions.len())] * REGION;
                            let off = r + rng.random_range(0..REGION);
                            let len = rng.random_range(1..=r + REGION - off);
                            match rng.random_range(0..10) {
                                0..=4 => {
                                    let d = pattern(rng.random(), len);
                                    vol.write(off as u64, &d, rng.random_bool(0.05)).unwrap();
                                    mine.write(off as u64, &d);
                                }
                                5 => {
                                    vol.trim(off as u64, len as u64).unwrap();
                                    mine.zero(off as u64, len as u64);
                                }
                                6 => {
                                    vol.write_zeroes(
                                        off as u64,
                                        len as u64,
                                        rng.random_bool(0.5),
                                        false,
                                    )
                                    .unwrap();
                                    mine.zero(off as u64, len as u64);
                                }
                                _ => {
                                    let got = read(&vol, off as u64, len).unwrap();
                                    assert_eq!(
                                        got,
                                        mine.0[off..off + len],
                                        "thread {t}: read at {off}+{len} is not its latest data"
                                    );
                                }
                            }
                        }
                        let mut m = model.lock().unwrap();
                        for &r in &regions {
                            m.0[r * REGION..(r + 1) * REGION]
                                .copy_from_slice(&mine.0[r * REGION..(r + 1) * REGION]);
                        }
                    })
                })
                .collect();
            let mut panics = Vec::new();
            for w in workers {
                if let Err(p) = w.join() {
                    panics.push(p);
                }
            }
            stop.store(true, Ordering::SeqCst);
            destager.join().unwrap();
            panics.into_iter().next()
        }
    });
    if let Some(p) = result {
        std::panic::resume_unwind(p);
    }
    let model = model.lock().unwrap().clone();
    assert_matches(&vol, &model, "before the final destage");
    vol.destage().unwrap();
    assert_eq!(vol.journaled_blocks(), 0);
    assert_matches(&vol, &model, "after the final destage");
    // Some writes after the last destage, flushed, then a kill and a replay.
    let d = pattern(77, 3 * BS + 5);
    vol.write(12_345, &d, true).unwrap();
    let mut model = model;
    model.write(12_345, &d);
    rig.kill(vol);
    let vol = rig.open();
    assert_matches(&vol, &model, "after reopen");
    let live = vol.allocated_blocks();
    let status_live: u64 = vol
        .block_status(0, size as u64)
        .unwrap()
        .iter()
        .filter(|e| !e.hole)
        .map(|e| e.len)
        .sum();
    assert_eq!(status_live, live * BS as u64);
    vol.close().unwrap();
}

/// Readers hammer one stripe while writers rewrite it and the destager moves it out of the
/// journal and frees the space (which the writers immediately reuse): a reader must always see
/// one of the complete versions, never a page of another record or an I/O error.
#[test]
fn reads_racing_destage_and_journal_reuse_see_whole_versions() {
    let rig = Rig::new(8 << 20, 4, 2, 16 << 10, (4 << 20) + 8192, 6);
    let vol = rig.open();
    let versions: Arc<Vec<Vec<u8>>> =
        Arc::new((0..16).map(|v| vec![v as u8 + 1; 4 * BS]).collect());
    vol.write(0, &versions[0], false).unwrap();
    bounded(120, "readers vs destager", {
        let vol = vol.clone();
        let versions = versions.clone();
        move || {
            let stop = Arc::new(AtomicBool::new(false));
            let mut hs = Vec::new();
            {
                let (vol, versions, stop) = (vol.clone(), versions.clone(), stop.clone());
                hs.push(std::thread::spawn(move || {
                    let mut i = 0usize;
                    while !stop.load(Ordering::SeqCst) {
                        vol.write(0, &versions[i % 16], false).unwrap();
                        // Fill the journal with other stripes so freed space is reused quickly.
                        vol.write(
                            ((1 + i % 30) * 64 * 1024) as u64,
                            &vec![i as u8; 16 * BS],
                            false,
                        )
                        .unwrap();
                        i += 1;
                    }
                }));
            }
            {
                let (vol, stop) = (vol.clone(), stop.clone());
                hs.push(std::thread::spawn(move || {
                    while !stop.load(Ordering::SeqCst) {
                        vol.destage().unwrap();
                    }
                }));
            }
            for _ in 0..2 {
                let (vol, versions, stop) = (vol.clone(), versions.clone(), stop.clone());
                hs.push(std::thread::spawn(move || {
                    while !stop.load(Ordering::SeqCst) {
                        let got = read(&vol, 0, 4 * BS).expect("read during destaging");
                        assert!(
                            versions.contains(&got),
                            "a read returned a mix or a foreign page"
                        );
                    }
                }));
            }
            std::thread::sleep(Duration::from_secs(4));
            stop.store(true, Ordering::SeqCst);
            for h in hs {
                h.join().unwrap();
            }
        }
    });
    vol.close().unwrap();
}

// ---------------------------------------------------------------------------------------------
// Journal: wrap-around, full journal.

/// The smallest journal (4 MiB + 8 KiB) with records of every size from 1 to 256 blocks and
/// trims: the log wraps many times; the volume is killed (no destage) and reopened at random
/// points so that replay crosses wrap markers.
#[test]
fn small_journal_wraps_with_records_of_many_sizes_and_replays() {
    let size = 6 << 20;
    let rig = Rig::new(size as u64, 4, 2, 64 << 10, (4 << 20) + 8192, 6);
    let mut vol = rig.open();
    let mut model = Model(vec![0u8; size]);
    let mut rng = StdRng::seed_from_u64(42);
    let mut written = 0usize;
    let mut reopens = 0;
    for i in 0..600 {
        let blocks = if rng.random_bool(0.3) {
            rng.random_range(200..=256)
        } else {
            rng.random_range(1..40)
        };
        let off = BS * rng.random_range(0..size / BS - blocks);
        if rng.random_bool(0.1) {
            vol.trim(off as u64, (blocks * BS) as u64).unwrap();
            model.zero(off as u64, (blocks * BS) as u64);
        } else {
            let d = pattern(i, blocks * BS);
            vol.write(off as u64, &d, false).unwrap();
            model.write(off as u64, &d);
            written += d.len();
        }
        if rng.random_bool(0.04) {
            vol.flush().unwrap();
            rig.kill(vol);
            vol = rig.open();
            reopens += 1;
            assert_matches(&vol, &model, "after a reopen");
        }
    }
    assert!(
        written > 8 * (4 << 20),
        "the journal did not wrap often: {written} bytes"
    );
    assert!(reopens > 5);
    assert_matches(&vol, &model, "at the end");
    vol.close().unwrap();
    drop(vol);
    let vol = rig.open();
    assert_matches(&vol, &model, "after a clean close");
    vol.close().unwrap();
}

/// While destaging fails (one non-journal disk refuses writes), writers fill the journal and
/// must wait, not fail and not deadlock; once the disk recovers they all complete.
#[test]
fn full_journal_writers_wait_then_succeed() {
    let size = 16 << 20;
    let rig = Rig::new(size as u64, 4, 2, 64 << 10, (4 << 20) + 8192, 6);
    let vol = rig.open();
    let journal = rig.journal_disks();
    let other = (0..6).find(|d| !journal.contains(d)).unwrap();
    rig.faults[other].fail_writes(Trigger::always());
    let faults = rig.faults[other].clone();
    let datas: Vec<Vec<u8>> = (0..4).map(|t| pattern(1000 + t, 2 << 20)).collect();
    let datas = Arc::new(datas);
    bounded(120, "writers on a full journal", {
        let vol = vol.clone();
        let datas = datas.clone();
        move || {
            let hs: Vec<_> = (0..4)
                .map(|t| {
                    let vol = vol.clone();
                    let datas = datas.clone();
                    std::thread::spawn(move || {
                        for (i, c) in datas[t].chunks(256 << 10).enumerate() {
                            vol.write(((t << 22) + i * (256 << 10)) as u64, c, false)
                                .unwrap();
                        }
                    })
                })
                .collect();
            // The journal (4 MiB) cannot hold 8 MiB: the writers are stuck now.
            std::thread::sleep(Duration::from_secs(2));
            assert!(
                hs.iter().any(|h| !h.is_finished()),
                "8 MiB fitted into a 4 MiB journal"
            );
            faults.clear();
            for h in hs {
                h.join().unwrap();
            }
        }
    });
    assert!(vol.stats.destage_errors.load(Ordering::Relaxed) > 0);
    for t in 0..4 {
        assert_eq!(read(&vol, (t << 22) as u64, 2 << 20).unwrap(), datas[t]);
    }
    vol.close().unwrap();
}

// ---------------------------------------------------------------------------------------------
// Deterministic power-cut sweep over one destaging round.

/// Prepares a volume with destaged data, then flushed overwrites (partial rows, a full stripe,
/// trims, a whole-stripe trim), and returns it with its model; the destager is halted.
fn prepare_for_sweep(rig: &Rig) -> (Arc<Volume>, Model) {
    let size = rig.record.size as usize;
    let vol = rig.open();
    vol.halt();
    let mut model = Model(vec![0u8; size]);
    let base = pattern(1, size);
    vol.write(0, &base, false).unwrap();
    model.write(0, &base);
    vol.flush().unwrap();
    vol.destage().unwrap();
    let stripe = 4 * 4 * BS; // 4+2, 16 KiB chunks: 64 KiB stripes
    let mut w = |off: usize, d: Vec<u8>| {
        vol.write(off as u64, &d, false).unwrap();
        model.write(off as u64, &d);
    };
    w(BS, pattern(2, BS)); // one block of stripe 0
    w(3 * stripe + 5, pattern(3, 2 * BS)); // unaligned, 3 blocks of stripe 3
    w(5 * stripe, pattern(4, stripe)); // full stripe 5
    w(7 * stripe + 6 * BS, pattern(5, 4 * BS)); // across a chunk boundary
    vol.trim((9 * stripe + 2 * BS) as u64, (3 * BS) as u64)
        .unwrap();
    model.zero((9 * stripe + 2 * BS) as u64, (3 * BS) as u64);
    vol.trim((11 * stripe) as u64, stripe as u64).unwrap(); // whole stripe discarded
    model.zero((11 * stripe) as u64, stripe as u64);
    vol.write_zeroes((13 * stripe + BS) as u64, BS as u64, true, false)
        .unwrap();
    model.zero((13 * stripe + BS) as u64, BS as u64);
    vol.flush().unwrap();
    (vol, model)
}

#[test]
fn power_cut_at_every_op_of_a_destage_round_keeps_every_block() {
    let new_rig = || Rig::new(16 * 64 * 1024, 4, 2, 16 << 10, (4 << 20) + 8192, 6);
    // How many disk ops does the round take?
    let ops = {
        let rig = new_rig();
        let (vol, _) = prepare_for_sweep(&rig);
        rig.budget.store(UNLIMITED, Ordering::SeqCst);
        vol.destage().unwrap();
        let used = UNLIMITED - rig.budget.load(Ordering::SeqCst);
        rig.kill(vol);
        used
    };
    assert!(ops > 20, "a destage round of 7 stripes took only {ops} ops");
    let mut rng = StdRng::seed_from_u64(7);
    let mut checked = 0;
    for n in 0..=ops {
        for mode in [CrashMode::DropAll, CrashMode::KeepAll, CrashMode::THIRDS] {
            let rig = new_rig();
            let (vol, model) = prepare_for_sweep(&rig);
            rig.budget.store(n, Ordering::SeqCst);
            let r = vol.destage();
            // The last ops (checkpoint and its sync) succeed with one journal replica of three.
            assert!(
                n < ops || r.is_ok(),
                "cut at op {n} of {ops}: destage returned {r:?}"
            );
            rig.budget.store(0, Ordering::SeqCst);
            rig.kill(vol);
            rig.crash(&mut rng, mode);
            rig.budget.store(UNLIMITED, Ordering::SeqCst);
            let vol = rig.open();
            assert_matches(&vol, &model, &format!("cut at op {n} of {ops} ({mode:?})"));
            // No write hole: with any two disks gone every block still reads back.
            let a = rng.random_range(0..6);
            let b = (a + rng.random_range(1..6)) % 6;
            rig.faults[a].set_gone(true);
            rig.faults[b].set_gone(true);
            assert_matches(
                &vol,
                &model,
                &format!("cut at op {n} of {ops} ({mode:?}), disks {a} and {b} gone"),
            );
            rig.faults[a].set_gone(false);
            rig.faults[b].set_gone(false);
            rig.kill(vol);
            checked += 1;
        }
    }
    println!("destage round of {ops} ops: {checked} cuts checked");
}

// ---------------------------------------------------------------------------------------------
// Geometry edge cases.

fn exercise_geometry(k: u16, m: u16, chunk: u32, size: u64) {
    let what = format!("{k}+{m}, chunk {chunk}, size {size}");
    let ndisks = usize::from(k + m).max(1) + 1;
    let rig = Rig::new(size, k, m, chunk, (4 << 20) + 8192, ndisks);
    let vol = rig.open();
    let mut model = Model(vec![0u8; size as usize]);
    let stripe = u64::from(k) * u64::from(chunk);
    // Zero-length operations anywhere in range, including at the end.
    for off in [0, size / 2, size] {
        vol.write(off, &[], true).unwrap();
        vol.trim(off, 0).unwrap();
        vol.write_zeroes(off, 0, true, true).unwrap();
        vol.read(off, &mut []).unwrap();
    }
    // The very last byte, the last partial block, a write across a stripe boundary.
    let mut w = |off: u64, d: &[u8]| {
        vol.write(off, d, false).unwrap();
        model.write(off, d);
    };
    w(0, &pattern(3, (3 * BS + 17).min(size as usize)));
    if size > stripe + 10_000 {
        w(stripe - 5000, &pattern(2, 10_000));
    }
    w(size - 3000.min(size), &pattern(1, 3000.min(size as usize)));
    w(size - 1, &[0xa5]);
    assert_matches(&vol, &model, &format!("{what}: from the journal"));
    vol.destage().unwrap();
    assert_matches(&vol, &model, &format!("{what}: from the stripes"));
    assert_eq!(read(&vol, size - 1, 1).unwrap(), vec![0xa5]);
    assert!(matches!(
        vol.read(size - 1, &mut [0u8; 2]),
        Err(VolumeError::OutOfRange { .. })
    ));
    assert!(matches!(
        vol.write(size, &[1], false),
        Err(VolumeError::OutOfRange { .. })
    ));
    // write_zeroes with no_hole keeps the blocks allocated; without, they become holes.
    let last_block = (size - 1) / BS as u64 * BS as u64;
    vol.write_zeroes(last_block, size - last_block, true, false)
        .unwrap();
    model.zero(last_block, size - last_block);
    let st = vol.block_status(last_block, size - last_block).unwrap();
    assert_eq!(
        st,
        vec![Extent {
            len: size - last_block,
            hole: false
        }],
        "{what}: no_hole zeroes became a hole"
    );
    // Trim: whole blocks become holes. A partial last block (odd size) is zeroed but stays
    // allocated, as in the reference model (volume/mem.rs).
    let trim_from = last_block.saturating_sub(2 * BS as u64);
    vol.trim(trim_from, size - trim_from).unwrap();
    model.zero(trim_from, size - trim_from);
    let st = vol.block_status(trim_from, last_block - trim_from).unwrap();
    if last_block > trim_from {
        assert_eq!(
            st,
            vec![Extent {
                len: last_block - trim_from,
                hole: true
            }],
            "{what}: trimmed blocks are not holes"
        );
    }
    let st = vol.block_status(last_block, size - last_block).unwrap();
    assert_eq!(
        st,
        vec![Extent {
            len: size - last_block,
            hole: size.is_multiple_of(BS as u64)
        }],
        "{what}: last block after trim"
    );
    assert_matches(&vol, &model, &format!("{what}: after zeroes and trim"));
    let total: u64 = vol
        .block_status(0, size)
        .unwrap()
        .iter()
        .map(|e| e.len)
        .sum();
    assert_eq!(total, size);
    vol.flush().unwrap();
    rig.kill(vol);
    let vol = rig.open();
    assert_matches(&vol, &model, &format!("{what}: after reopen"));
    vol.close().unwrap();
}

#[test]
fn geometry_chunk_4k_and_odd_size() {
    exercise_geometry(4, 2, 4096, 3 * 1024 * 1024 + 4096 * 3 + 123);
}

#[test]
fn geometry_chunk_1m_two_metadata_pages_and_more() {
    // 1 MiB chunks: 256 blocks × 64 B = 4 metadata pages per chunk; size not a stripe multiple.
    exercise_geometry(2, 1, 1 << 20, (5 << 20) + 8192 + 1);
    exercise_geometry(2, 1, 512 << 10, (3 << 20) + 100);
}

#[test]
fn geometry_k1_m0_single_replica_journal() {
    exercise_geometry(1, 0, 64 << 10, (1 << 20) + 4095);
}

#[test]
fn geometry_tiny_volume_smaller_than_a_block() {
    exercise_geometry(3, 1, 16 << 10, 1000);
}

// ---------------------------------------------------------------------------------------------
// Corruption.

/// Offset of block `row` of the chunk slot of stripe `s` and of its metadata entry.
fn slot_offsets(rig: &Rig, s: u64, row: u64) -> (u64, u64) {
    let l = Volume::layout_of(&rig.record);
    let (page, at) = l.meta_location(StripeId(s), row);
    (l.block_offset(StripeId(s), row), page + at as u64)
}

/// Rot confined to parity chunks (data and metadata rows) is invisible to healthy reads and,
/// when a data disk is lost, a rebuild does not trust it: it drops the rotten parity and uses
/// the other, so every block still reads back; with two data chunks lost and one parity rotten,
/// reads fail with an error, never garbage.
#[test]
fn rotten_parity_is_never_used_for_a_rebuild() {
    let size = 4 << 20;
    let rig = Rig::standard(size);
    let vol = rig.open();
    let data = pattern(11, size as usize);
    vol.write(0, &data, true).unwrap();
    vol.destage().unwrap();
    let stripes = Volume::layout_of(&rig.record).stripes;
    let bpc = rig.record.geometry.blocks_per_chunk();
    for s in 0..stripes {
        let p0 = rig.stripe_disks(s)[4];
        for row in 0..bpc {
            let (blk, meta) = slot_offsets(&rig, s, row);
            flip(&rig.mems[p0], blk + 100);
            flip(&rig.mems[p0], meta + 40);
        }
    }
    assert_eq!(read(&vol, 0, size as usize).unwrap(), data, "healthy read");
    for lost in 0..6 {
        rig.faults[lost].set_gone(true);
        assert_eq!(
            read(&vol, 0, size as usize).unwrap(),
            data,
            "disk {lost} lost, parity 0 rotten"
        );
        rig.faults[lost].set_gone(false);
    }
    // Two data chunks lost and P0 rotten: only P1 is left, k = 4 needs 4 intact shards of 6.
    let mut errors = 0;
    for s in 0..stripes {
        let d = rig.stripe_disks(s);
        rig.faults[d[0]].set_gone(true);
        rig.faults[d[1]].set_gone(true);
        for blk in 0..rig.record.geometry.blocks_per_stripe() {
            let off = (s * rig.record.geometry.blocks_per_stripe() + blk) * BS as u64;
            match read(&vol, off, BS) {
                Ok(b) => assert_eq!(b, data[off as usize..off as usize + BS], "garbage at {off}"),
                Err(VolumeError::Unrecoverable { .. }) => errors += 1,
                Err(e) => panic!("unexpected error {e}"),
            }
        }
        rig.faults[d[0]].set_gone(false);
        rig.faults[d[1]].set_gone(false);
    }
    assert!(errors > 0);
    vol.close().unwrap();
}

/// Journal replicas: a flipped payload page on one replica is read from another; flipped on
/// every replica it is an error, never data; a record header damaged on the first replica is
/// replayed from another one.
#[test]
fn damaged_journal_replicas_are_detected_and_bypassed() {
    let rig = Rig::standard(16 << 20);
    let vol = rig.open();
    vol.halt();
    let a = pattern(12, 2 * BS);
    vol.write(0, &a, true).unwrap(); // seq 1 at log_start: header page, 2 payload pages
    let jd = rig.journal_disks();
    let payload0 = rig.log_start() + BS as u64;
    flip(&rig.mems[jd[0]], payload0 + 7);
    assert_eq!(read(&vol, 0, 2 * BS).unwrap(), a, "one rotten replica");
    for &j in &jd[..2] {
        flip(&rig.mems[j], payload0 + 9);
    }
    assert_eq!(
        read(&vol, 0, 2 * BS).unwrap(),
        a,
        "two rotten replicas (m = 2)"
    );
    let orig = rig.mems[jd[2]].read_bytes(payload0, BS);
    rig.mems[jd[2]].tamper(payload0 + 11, &[orig[11] ^ 0xdd]);
    assert!(
        matches!(read(&vol, 0, BS), Err(VolumeError::Unrecoverable { .. })),
        "every replica rotten must be an error"
    );
    assert_eq!(
        read(&vol, BS as u64, BS).unwrap(),
        a[BS..],
        "the other block of the record is intact"
    );
    // Repair the payload on the last replica, damage the header on the first two, replay.
    rig.mems[jd[2]].tamper(payload0, &orig);
    for &j in &jd[..2] {
        flip(&rig.mems[j], rig.log_start() + 60);
    }
    rig.kill(vol);
    let vol = rig.open();
    assert_eq!(
        read(&vol, 0, 2 * BS).unwrap(),
        a,
        "record replayed from the intact replica"
    );
    vol.close().unwrap();
}

/// Damage to metadata pages of data chunks (1 MiB chunks: several pages per chunk, the last
/// page included) is detected, rebuilt from the row and repaired on the disk.
#[test]
fn damaged_metadata_pages_are_rebuilt_and_repaired() {
    let size = 8 << 20;
    let rig = Rig::new(size, 2, 1, 1 << 20, 8 << 20, 4);
    let vol = rig.open();
    let data = pattern(13, size as usize);
    vol.write(0, &data, true).unwrap();
    vol.destage().unwrap();
    let d = rig.stripe_disks(1);
    for row in [0u64, 63, 64, 200, 255] {
        let (_, meta) = slot_offsets(&rig, 1, row);
        flip(&rig.mems[d[1]], meta + 3);
    }
    assert_eq!(read(&vol, 0, size as usize).unwrap(), data);
    let repaired = vol.stats.blocks_repaired.load(Ordering::Relaxed);
    assert!(repaired >= 5, "repaired {repaired}");
    // Repaired on the medium: now lose the parity disk and read the same blocks straight.
    rig.faults[d[2]].set_gone(true);
    assert_eq!(read(&vol, 0, size as usize).unwrap(), data);
    rig.faults[d[2]].set_gone(false);
    vol.close().unwrap();
}

// ---------------------------------------------------------------------------------------------
// Hostile arguments.

#[test]
fn extreme_offsets_and_lengths_are_refused_without_panic() {
    let rig = Rig::standard(16 << 20);
    let vol = rig.open();
    let size = vol.size();
    let cases: Vec<(u64, u64)> = vec![
        (u64::MAX, 1),
        (u64::MAX, u64::MAX),
        (u64::MAX - 1, 2),
        (1, u64::MAX),
        (size, 1),
        (size + 1, 0),
        (size - 1, 2),
        (0, size + 1),
        (u64::MAX - 4095, 4096),
        (size / 2, u64::MAX - size / 2 + 1),
    ];
    for (off, len) in cases {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let out = |r: Result<(), VolumeError>| {
                assert!(
                    matches!(r, Err(VolumeError::OutOfRange { .. })),
                    "{off}+{len}: {r:?}"
                )
            };
            out(vol.trim(off, len));
            out(vol.write_zeroes(off, len, false, false));
            out(vol.write_zeroes(off, len, true, true));
            out(vol.block_status(off, len).map(|_| ()));
            let small = len.min(4096) as usize;
            if off.checked_add(small as u64).is_none_or(|e| e > size) {
                out(vol.read(off, &mut vec![0u8; small]));
                out(vol.write(off, &vec![1u8; small], true));
            }
        }));
        assert!(r.is_ok(), "panic for offset {off}, length {len}");
    }
    // Zero-length at the very end is fine; the volume is unchanged.
    vol.trim(size, 0).unwrap();
    assert_eq!(
        vol.block_status(0, size).unwrap(),
        vec![Extent {
            len: size,
            hole: true
        }]
    );
    vol.close().unwrap();
}

/// Rollback: a disk that puts back an older copy of a block (same position, valid tag, older
/// content) is caught by the generation stamp the metadata store recorded at destaging: the read
/// returns the newest data, rebuilt from the row, and repairs the slot; the stamps survive a
/// reopen. With the whole chunk slot of a stripe rolled back on one disk, every block of it still
/// reads its newest content.
#[test]
fn rolled_back_blocks_are_detected_rebuilt_and_repaired() {
    let size = 4 << 20;
    let rig = Rig::standard(size);
    let vol = rig.open();
    let g = rig.record.geometry;
    let bps = g.blocks_per_stripe();
    let (s, blk) = (1u64, 21u64); // a block of stripe 1, in chunk 1
    let lba = s * bps + blk;
    let (chunk, row) = (
        (blk / g.blocks_per_chunk()) as usize,
        blk % g.blocks_per_chunk(),
    );
    let disk = rig.stripe_disks(s)[chunk];
    let (data_off, meta_off) = slot_offsets(&rig, s, row);
    let l = Volume::layout_of(&rig.record);
    let slot = l.slot_offset(StripeId(s));
    let slot_len = l.slot_size() as usize;

    let old = pattern(1, BS);
    vol.write(lba * BS as u64, &old, true).unwrap();
    vol.destage().unwrap();
    let old_block = rig.mems[disk].read_bytes(data_off, BS);
    let old_meta = rig.mems[disk].read_bytes(meta_off, 64);
    let old_slot = rig.mems[disk].read_bytes(slot, slot_len);

    let new = pattern(2, BS);
    vol.write(lba * BS as u64, &new, true).unwrap();
    vol.destage().unwrap();
    assert_ne!(rig.mems[disk].read_bytes(data_off, BS), old_block);

    // One block rolled back.
    rig.mems[disk].tamper(data_off, &old_block);
    rig.mems[disk].tamper(meta_off, &old_meta);
    assert_eq!(
        read(&vol, lba * BS as u64, BS).unwrap(),
        new,
        "rolled-back block returned"
    );
    assert_eq!(vol.stats.rollbacks_detected.load(Ordering::Relaxed), 1);
    assert_ne!(
        rig.mems[disk].read_bytes(data_off, BS),
        old_block,
        "slot repaired"
    );
    assert_eq!(read(&vol, lba * BS as u64, BS).unwrap(), new);
    assert_eq!(vol.stats.rollbacks_detected.load(Ordering::Relaxed), 1);
    vol.close().unwrap();
    drop(vol);

    // The stamps are persisted: after a reopen the whole slot of the stripe rolled back on
    // that disk (data and metadata pages) is still caught.
    let vol = rig.open();
    rig.mems[disk].tamper(slot, &old_slot);
    let whole = read(&vol, s * bps * BS as u64, (bps as usize) * BS).unwrap();
    assert_eq!(&whole[blk as usize * BS..][..BS], &new[..]);
    assert!(vol.stats.rollbacks_detected.load(Ordering::Relaxed) >= 1);
    vol.close().unwrap();
}

/// Key usage and stale stripes come from the stamps of destaged blocks and from the journal
/// index, and survive a reopen.
#[test]
fn key_usage_counts_blocks_per_version_and_epoch() {
    let rig = Rig::standard(4 << 20);
    let bps = rig.record.geometry.blocks_per_stripe();
    let parts = rig.parts();
    let wk = parts.write_key.clone();
    let vol = Volume::open(parts).unwrap();
    vol.write(0, &pattern(1, 3 * BS), true).unwrap();
    vol.destage().unwrap();
    wk.set(1, 2);
    vol.write(2 * bps * BS as u64, &pattern(2, 2 * BS), true)
        .unwrap();
    let usage: Vec<_> = vol.key_usage().into_iter().collect();
    assert_eq!(usage, vec![((1, 1), 3), ((1, 2), 2)]);
    assert_eq!(vol.stale_stripes((1, 2), 10), vec![(StripeId(0), (1, 1))]);
    assert_eq!(vol.stale_stripes((1, 1), 10), vec![]);
    assert_eq!(
        vol.stale_stripes((2, 0), 10),
        vec![(StripeId(0), (1, 1)), (StripeId(2), (1, 2))]
    );
    vol.close().unwrap();
    drop(vol);
    let vol = rig.open();
    let usage: Vec<_> = vol.key_usage().into_iter().collect();
    assert_eq!(usage, vec![((1, 1), 3), ((1, 2), 2)], "after reopen");
    vol.trim(0, BS as u64).unwrap();
    vol.destage().unwrap();
    assert_eq!(
        vol.key_usage().get(&(1, 1)),
        Some(&2),
        "trimmed block freed"
    );
    vol.close().unwrap();
}

/// A data chunk wiped to zeros (a truncated disk file reads as zeros) looks like a row of
/// never-written blocks; the stamps say they were written, so with another chunk of the row
/// lost (m = 2 faults in all) every block is still rebuilt, never read as zeros or refused.
#[test]
fn wiped_chunk_is_not_mistaken_for_never_written_blocks() {
    let size = 4 << 20;
    let rig = Rig::standard(size);
    let vol = rig.open();
    let data = pattern(21, size as usize);
    vol.write(0, &data, true).unwrap();
    vol.destage().unwrap();
    let l = Volume::layout_of(&rig.record);
    let g = rig.record.geometry;
    let bps = g.blocks_per_stripe() as usize;
    for s in 0..l.stripes {
        let d = rig.stripe_disks(s);
        // Chunk 0's slot (data and metadata pages) wiped; chunk 1's disk gone.
        rig.mems[d[0]].tamper(
            l.slot_offset(StripeId(s)),
            &vec![0u8; l.slot_size() as usize],
        );
        rig.faults[d[1]].set_gone(true);
        // Chunk 1's blocks first (rebuilt from rows that include the wiped chunk 0), then
        // the whole stripe.
        let bpc = g.blocks_per_chunk() as usize;
        let off = s as usize * bps * BS;
        let c1 = off + bpc * BS;
        let got = read(&vol, c1 as u64, bpc * BS).unwrap();
        assert!(
            got == data[c1..c1 + bpc * BS],
            "stripe {s}: chunk 1 rebuilt"
        );
        let got = read(&vol, off as u64, bps * BS).unwrap();
        assert!(got == data[off..off + bps * BS], "stripe {s} reads back");
        rig.faults[d[1]].set_gone(false);
    }
    vol.close().unwrap();
}
