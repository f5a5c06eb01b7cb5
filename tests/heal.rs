//! Self-healing on a real (small) pool whose disks are wrapped in fault-injecting disks:
//! degraded service with `m` disks pulled mid-run, EIO for exactly the stripes that lost more
//! than `m`, failure persisted and logged once, self-healing reads counted per disk, scrub of
//! rotten blocks and parity, replacement while writing, and a rebuild resumed after a restart.

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use shardvol::disk::{DiskRef, FaultDisk, FaultHandle, Trigger};
use shardvol::layout::placement::{Placement, PlacementDisk};
use shardvol::layout::{DiskId, StripeId};
use shardvol::meta::{DiskState, MetaStore, read_superblock};
use shardvol::pool::{self, CreateOptions, DiskSpec, Pool, RebuildOptions};
use shardvol::volume::scrub::ScrubOptions;
use shardvol::volume::{BlockDevice, Volume, VolumeError};

const BS: usize = 4096;
const SIZE: u64 = 8 << 20;
const CHUNK: u32 = 16 << 10;

// ---------------------------------------------------------------------------------------------
// Log capture: one global subscriber for the binary; each test looks for its own pool's paths.

#[derive(Clone)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn logs() -> &'static Logs {
    static LOGS: OnceLock<Logs> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Logs(Arc::new(Mutex::new(Vec::new())));
        let w = logs.clone();
        let _ = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::WARN)
            .with_writer(move || w.clone())
            .try_init();
        logs
    })
}

fn log_lines(containing: &[&str]) -> usize {
    let buf = logs().0.lock().unwrap();
    String::from_utf8_lossy(&buf)
        .lines()
        .filter(|l| containing.iter().all(|c| l.contains(c)))
        .count()
}

// ---------------------------------------------------------------------------------------------
// Rig: a pool of files in a temp dir, opened with every disk behind a FaultDisk.

struct Rig {
    dir: tempfile::TempDir,
    shares: Vec<PathBuf>,
    ndisks: usize,
}

impl Rig {
    fn new(ndisks: usize) -> Rig {
        logs();
        let dir = tempfile::tempdir().unwrap();
        let pool_dir = dir.path().join("pool");
        let created = pool::create(&CreateOptions {
            pool: pool_dir,
            volume: "v".into(),
            size: SIZE,
            data: 4,
            parity: 2,
            chunk_size: CHUNK,
            disks: DiskSpec::Files(ndisks),
            shares: 3,
            threshold: 2,
            share_dir: dir.path().join("shares"),
            journal_size: 5 << 20,
        })
        .unwrap();
        Rig {
            shares: created.share_files,
            dir,
            ndisks,
        }
    }

    fn pool_dir(&self) -> PathBuf {
        self.dir.path().join("pool")
    }

    fn disk_path(&self, i: usize) -> PathBuf {
        self.pool_dir().join("disks").join(format!("disk-{i}.img"))
    }

    /// Opens the pool with every disk wrapped; returns the fault handles by disk index.
    fn open(&self) -> (Pool, Vec<Option<FaultHandle>>) {
        let handles: Arc<Mutex<Vec<Option<FaultHandle>>>> =
            Arc::new(Mutex::new(vec![None; self.ndisks]));
        let h = handles.clone();
        let wrap = move |id: DiskId, d: DiskRef| -> DiskRef {
            let f = FaultDisk::with_seed(d, u64::from(id.0));
            h.lock().unwrap()[id.0 as usize] = Some(f.handle());
            Arc::new(f)
        };
        let shares: Vec<_> = self.shares[..2]
            .iter()
            .map(|f| shardvol::kms::load_share_file(f).unwrap())
            .collect();
        let pool = Pool::open_wrapped(&self.pool_dir(), &shares, &wrap).unwrap();
        let handles = handles.lock().unwrap().clone();
        (pool, handles)
    }

    fn placement(&self, vol: &Volume) -> Placement {
        let table = (0..self.ndisks)
            .map(|i| PlacementDisk {
                id: DiskId(i as u32),
                domain: format!("disk-{i}"),
            })
            .collect();
        Placement::new(vol.record().placement_seed, table).unwrap()
    }

    /// Disk indexes of a stripe's chunks, in chunk order.
    fn stripe_disks(&self, vol: &Volume, s: u64) -> Vec<usize> {
        self.placement(vol)
            .place(StripeId(s), 6)
            .unwrap()
            .into_iter()
            .map(|d| d.0 as usize)
            .collect()
    }

    /// Flips a byte of the block at (stripe, row) of chunk `c`, or of its metadata entry, in
    /// the disk file itself.
    fn rot(&self, vol: &Volume, s: u64, c: usize, row: u64, meta: bool) {
        let disk = self.stripe_disks(vol, s)[c];
        let l = vol.layout();
        let at = if meta {
            let (page, off) = l.meta_location(StripeId(s), row);
            page + off as u64 + 40
        } else {
            l.block_offset(StripeId(s), row) + 123
        };
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(self.disk_path(disk))
            .unwrap();
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, at).unwrap();
        b[0] ^= 0x5a;
        f.write_all_at(&b, at).unwrap();
    }
}

/// The pool's `disk-failed` audit records.
fn disk_failed_records(p: &Pool) -> Vec<shardvol::audit::Record> {
    p.audit
        .records()
        .unwrap()
        .into_iter()
        .filter(|r| r.event == "disk-failed")
        .collect()
}

fn vol(p: &Pool) -> Arc<Volume> {
    p.volumes.get("v").unwrap().clone()
}

/// Writes seeded random data over the whole volume, flushes and destages it; returns it.
fn fill_and_destage(v: &Volume, seed: u64) -> Vec<u8> {
    let mut model = vec![0u8; SIZE as usize];
    StdRng::seed_from_u64(seed).fill(&mut model[..]);
    v.write(0, &model, true).unwrap();
    v.destage().unwrap();
    model
}

/// Writes random blocks into the volume and a model.
fn write_random(v: &Volume, model: &mut [u8], rng: &mut StdRng, n: usize) {
    for _ in 0..n {
        let blocks = rng.random_range(1..=16u64);
        let first = rng.random_range(0..SIZE / BS as u64 - blocks);
        let mut data = vec![0u8; (blocks as usize) * BS];
        rng.fill(&mut data[..]);
        let off = first * BS as u64;
        v.write(off, &data, false).unwrap();
        model[off as usize..off as usize + data.len()].copy_from_slice(&data);
    }
}

fn assert_matches(v: &Volume, model: &[u8], what: &str) {
    let mut buf = vec![0u8; model.len()];
    v.read(0, &mut buf)
        .unwrap_or_else(|e| panic!("{what}: read failed: {e}"));
    if let Some(i) = buf.iter().zip(model).position(|(a, b)| a != b) {
        panic!("{what}: first difference at byte {i} (block {})", i / BS);
    }
}

// ---------------------------------------------------------------------------------------------

/// Invariant 1 with `m` disks pulled while a writer runs: writes, reads and flushes keep
/// working, destaging writes around the failed disks (far more is written than the journal
/// holds), and everything reads back after a restart, where the failed disks stay failed.
#[test]
fn m_disks_pulled_mid_run_lose_nothing() {
    let rig = Rig::new(6);
    let (p, faults) = rig.open();
    let v = vol(&p);
    let mut rng = StdRng::seed_from_u64(1);
    let mut model = vec![0u8; SIZE as usize];
    write_random(&v, &mut model, &mut rng, 100);
    v.flush().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let passes = Arc::new(AtomicU64::new(0));
    let writer = {
        let (v, stop, passes) = (v.clone(), stop.clone(), passes.clone());
        let mut model = model.clone();
        std::thread::spawn(move || {
            let mut rng = StdRng::seed_from_u64(2);
            // 24 MiB in 1 MiB writes: almost five times the journal.
            for i in 0..24u64 {
                let mut data = vec![0u8; 1 << 20];
                rng.fill(&mut data[..]);
                let off = (i % 8) << 20;
                v.write(off, &data, false).unwrap();
                model[off as usize..off as usize + data.len()].copy_from_slice(&data);
                if i % 4 == 3 {
                    v.flush().unwrap();
                }
                passes.fetch_add(1, Ordering::SeqCst);
                if stop.load(Ordering::SeqCst) {
                    break;
                }
            }
            v.flush().unwrap();
            model
        })
    };
    let wait_for = |n: u64| {
        for _ in 0..2000 {
            if passes.load(Ordering::SeqCst) >= n {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        panic!("the writer stalled before pass {n}");
    };
    wait_for(4);
    faults[1].as_ref().unwrap().set_gone(true);
    wait_for(12);
    faults[4].as_ref().unwrap().set_gone(true);
    let model = writer.join().expect("writer survives two pulled disks");
    v.destage().unwrap();
    assert!(p.health.is_failed(DiskId(1)) && p.health.is_failed(DiskId(4)));
    assert_eq!(p.health.state(DiskId(0)), DiskState::Ok);
    assert_eq!(
        v.journaled_blocks(),
        0,
        "destaging wrote around the failed disks"
    );
    assert_matches(&v, &model, "two disks pulled");
    drop(v);
    p.close().unwrap();
    drop(p);

    // Restart: the failed disks are not opened again (their files are intact, but stale).
    let store = MetaStore::open(&rig.pool_dir().join("pool.redb")).unwrap();
    for d in store.disks().unwrap() {
        let want = if [1, 4].contains(&d.id.0) {
            DiskState::Failed
        } else {
            DiskState::Ok
        };
        assert_eq!(d.state, want, "disk {} in the store", d.id);
    }
    drop(store);
    let (p, _) = rig.open();
    assert_matches(&vol(&p), &model, "after restart, two disks failed");
    p.close().unwrap();
}

/// A disk file deleted while the pool is stopped: the pool opens without it, marks it failed
/// and serves everything.
#[test]
fn disk_missing_at_open_is_failed_and_data_served() {
    let rig = Rig::new(6);
    let (p, _) = rig.open();
    let v = vol(&p);
    let mut model = vec![0u8; SIZE as usize];
    write_random(&v, &mut model, &mut StdRng::seed_from_u64(3), 200);
    drop(v);
    p.close().unwrap();
    drop(p);
    std::fs::remove_file(rig.disk_path(2)).unwrap();
    let (p, _) = rig.open();
    assert!(p.health.is_failed(DiskId(2)));
    // Failed while the pool opened, before its audit key existed: recorded once it did.
    let failed = disk_failed_records(&p);
    assert_eq!(failed.len(), 1, "one disk-failed record");
    assert_eq!(failed[0].fields["disk"], "2");
    assert!(failed[0].fields["reason"].starts_with("at open"));
    assert!(p.audit_verify().unwrap().1.intact());
    let v = vol(&p);
    assert_matches(&v, &model, "disk 2 missing");
    write_random(&v, &mut model, &mut StdRng::seed_from_u64(4), 100);
    v.flush().unwrap();
    v.destage().unwrap();
    assert_matches(&v, &model, "written with disk 2 missing");
    drop(v);
    p.close().unwrap();
}

/// With `m + 1` disks failed, exactly the blocks that need a lost chunk of a stripe that lost
/// more than `m` get an I/O error; every other block reads its data, and writes to unaffected
/// stripes work.
#[test]
fn more_than_m_failed_gives_eio_for_exactly_the_affected_blocks() {
    let rig = Rig::new(8);
    let (p, faults) = rig.open();
    let v = vol(&p);
    let mut model = vec![0u8; SIZE as usize];
    let mut rng = StdRng::seed_from_u64(5);
    rng.fill(&mut model[..]);
    v.write(0, &model, true).unwrap();
    v.destage().unwrap();
    // Three disks gone, never the three journal disks (placement seeds are random): writes to
    // the stripes that keep `k` disks must still reach a journal replica.
    let journal = Volume::journal_disks(&rig.placement(&v), v.record()).unwrap();
    let gone = if journal.iter().all(|d| [0, 3, 6].contains(&d.0)) {
        [0usize, 3, 7]
    } else {
        [0usize, 3, 6]
    };
    for &g in &gone {
        faults[g].as_ref().unwrap().set_gone(true);
    }
    let bpc = u64::from(CHUNK) / BS as u64;
    let bps = 4 * bpc;
    let stripes = SIZE / BS as u64 / bps;
    let (mut errors, mut ok_reads, mut lost_stripes) = (0, 0, 0);
    for s in 0..stripes {
        let disks = rig.stripe_disks(&v, s);
        let lost = disks.iter().filter(|d| gone.contains(d)).count() > 2;
        lost_stripes += u64::from(lost);
        for b in 0..bps {
            let lba = s * bps + b;
            let chunk_gone = gone.contains(&disks[(b / bpc) as usize]);
            let mut buf = vec![0u8; BS];
            let r = v.read(lba * BS as u64, &mut buf);
            let want = &model[(lba as usize) * BS..(lba as usize + 1) * BS];
            if lost && chunk_gone {
                assert!(
                    matches!(r, Err(VolumeError::Unrecoverable { .. })),
                    "lba {lba}: {r:?}"
                );
                errors += 1;
            } else {
                r.unwrap_or_else(|e| panic!("lba {lba} of stripe {s} (lost {lost}): {e}"));
                assert_eq!(buf, want, "lba {lba}: wrong data");
                ok_reads += 1;
            }
        }
        // Writes: refused on a lost stripe, fine elsewhere.
        let w = v.write(s * bps * BS as u64, &[7u8; BS], false);
        assert_eq!(w.is_err(), lost, "write to stripe {s}: {w:?}");
    }
    assert!(lost_stripes > 0 && errors > 0 && ok_reads > errors);
    v.flush().unwrap();
    v.destage().unwrap();
    println!(
        "m+1 failed: {lost_stripes} of {stripes} stripes lost, {errors} blocks EIO, {ok_reads} read"
    );
    drop(v);
    drop(p);
}

/// A disk whose writes fail is failed at its first failed write: recorded in the store and in
/// the superblock of every surviving disk, logged once however many requests follow.
#[test]
fn write_errors_fail_a_disk_persisted_and_logged_once() {
    let rig = Rig::new(6);
    let (p, faults) = rig.open();
    let v = vol(&p);
    faults[5]
        .as_ref()
        .unwrap()
        .fail_writes(Trigger::always().within(2 << 20..u64::MAX));
    let mut model = vec![0u8; SIZE as usize];
    let mut rng = StdRng::seed_from_u64(6);
    for _ in 0..10 {
        write_random(&v, &mut model, &mut rng, 30);
        v.flush().unwrap();
        v.destage().unwrap();
    }
    assert!(p.health.is_failed(DiskId(5)));
    assert_matches(&v, &model, "disk 5 refuses writes");
    let path = rig.disk_path(5).display().to_string();
    assert_eq!(
        log_lines(&["disk failed", &path]),
        1,
        "one warning for the failure"
    );
    assert!(!p.health.fail(DiskId(5), "again"), "already failed");
    let failed = disk_failed_records(&p);
    assert_eq!(failed.len(), 1, "one disk-failed record, not one per error");
    assert_eq!(failed[0].fields["disk"], "5");
    assert_eq!(failed[0].fields["path"], path);
    // The pool holds the store open: read it through the pool's handle.
    let rec = p.store.disk(DiskId(5)).unwrap().unwrap();
    assert_eq!(rec.state, DiskState::Failed);
    for i in 0..5 {
        let d = p.health.disk(DiskId(i)).unwrap();
        let sb = read_superblock(d.as_ref()).unwrap();
        let s5 = sb.disks.iter().find(|d| d.id == DiskId(5)).unwrap();
        assert_eq!(s5.state, DiskState::Failed, "superblock of disk {i}");
    }
    let counters = p.health.counters(DiskId(5));
    assert!(counters.io_errors >= 1);
    drop(v);
    p.close().unwrap();
}

/// A rotten block is rebuilt on read, written back and counted against its disk.
#[test]
fn self_healing_reads_are_counted_per_disk() {
    let rig = Rig::new(6);
    let (p, _) = rig.open();
    let v = vol(&p);
    let model = fill_and_destage(&v, 7);
    let disk = rig.stripe_disks(&v, 3)[1];
    rig.rot(&v, 3, 1, 2, false);
    rig.rot(&v, 3, 1, 3, true);
    assert_matches(&v, &model, "two rotten blocks");
    let c = p.health.counters(DiskId(disk as u32));
    assert_eq!((c.tag_failures, c.repaired), (2, 2), "disk {disk}: {c:?}");
    // Repaired on the medium: a scrub finds nothing.
    let r = v.scrub(&ScrubOptions::default(), &|_| {}).unwrap();
    assert_eq!(r.bad_found, 0, "{r:?}");
    drop(v);
    p.close().unwrap();
}

/// Scrub finds rotten data blocks, rotten metadata entries and rotten parity, repairs them all
/// when asked, and counts a row with more than `m` bad chunks as unrecoverable.
#[test]
fn scrub_detects_and_repairs_data_metadata_and_parity() {
    let rig = Rig::new(6);
    let (p, _) = rig.open();
    let v = vol(&p);
    // Never scrubbed: the first scheduled scrub is one interval after the volume's creation.
    let week = std::time::Duration::from_secs(7 * 86_400);
    let created = v.record().created_unix;
    let now = shardvol::now_unix();
    assert!(
        created <= now && now - created < 600,
        "created {created}, now {now}"
    );
    let st = shardvol::service::Status::of_open(&rig.pool_dir(), &p, week);
    assert!(st.volumes[0].last_scrub.is_none());
    assert_eq!(
        st.volumes[0].next_scrub_unix,
        Some(created + week.as_secs())
    );
    let model = fill_and_destage(&v, 8);
    let mut rng = StdRng::seed_from_u64(9);
    let bpc = u64::from(CHUNK) / BS as u64;
    let mut planted = 0;
    for s in (0..128u64).step_by(5) {
        let row = rng.random_range(0..bpc);
        // Up to m = 2 bad chunks in a row: one data block (or its metadata), one parity row.
        rig.rot(&v, s, rng.random_range(0..4), row, s % 2 == 0);
        rig.rot(&v, s, 4 + rng.random_range(0..2), row, s % 3 == 0);
        planted += 2;
    }
    // Three bad chunks in one row of stripe 1: cannot be rebuilt.
    for c in [0, 1, 2] {
        rig.rot(&v, 1, c, 0, false);
    }
    let check = v.scrub(&ScrubOptions::default(), &|_| {}).unwrap();
    assert_eq!(check.bad_found, planted, "{check:?}");
    assert_eq!(check.repaired, 0);
    assert_eq!(check.unrecoverable, 3);
    assert_eq!(check.stripes, 128);
    let calls = AtomicU64::new(0);
    let fix = p
        .scrub(
            "v",
            &ScrubOptions {
                repair: true,
                rate_bytes_per_s: 0,
            },
            &|pr| {
                calls.fetch_add(1, Ordering::Relaxed);
                assert!(pr.done <= pr.total);
            },
        )
        .unwrap();
    assert_eq!((fix.bad_found, fix.repaired), (planted, planted), "{fix:?}");
    assert_eq!(calls.load(Ordering::Relaxed), 128);
    let again = v.scrub(&ScrubOptions::default(), &|_| {}).unwrap();
    assert_eq!(
        (again.bad_found, again.unrecoverable),
        (0, 3),
        "after repair: {again:?}"
    );
    println!(
        "scrub: {} stripes, {} blocks and {} parity rows checked, {} bad, {} repaired, {} unrecoverable",
        fix.stripes,
        fix.blocks_checked,
        fix.parity_checked,
        fix.bad_found,
        fix.repaired,
        fix.unrecoverable
    );
    // Only the unrecoverable row's blocks fail; everything else reads back.
    let bps = 4 * bpc;
    for lba in 0..SIZE / BS as u64 {
        let mut buf = vec![0u8; BS];
        let r = v.read(lba * BS as u64, &mut buf);
        let dead = (bps..2 * bps).contains(&lba) && [0, bpc, 2 * bpc].contains(&(lba - bps));
        if dead {
            assert!(r.is_err(), "lba {lba}");
        } else {
            r.unwrap();
            assert_eq!(buf, model[lba as usize * BS..(lba as usize + 1) * BS]);
        }
    }
    let st = shardvol::service::Status::of_open(&rig.pool_dir(), &p, week);
    let last = st.volumes[0].last_scrub.as_ref().unwrap();
    assert_eq!(last.repaired, planted);
    assert_eq!(
        st.volumes[0].next_scrub_unix,
        Some(last.finished_unix + week.as_secs()),
        "the next scheduled scrub is one interval after the last"
    );
    let off = shardvol::service::Status::of_open(&rig.pool_dir(), &p, std::time::Duration::ZERO);
    assert_eq!(off.volumes[0].next_scrub_unix, None);
    drop(v);
    p.close().unwrap();
}

/// A failed disk replaced while a writer runs: the rebuild completes, every block verifies,
/// and the rebuilt disk carries its share (two other disks can then be lost).
#[test]
fn replace_while_writing_then_every_block_verifies() {
    let rig = Rig::new(6);
    let (p, faults) = rig.open();
    let v = vol(&p);
    let mut model = vec![0u8; SIZE as usize];
    StdRng::seed_from_u64(10).fill(&mut model[..]);
    v.write(0, &model, true).unwrap();
    faults[3].as_ref().unwrap().set_gone(true);
    v.destage().unwrap();
    assert!(p.health.is_failed(DiskId(3)));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (v, stop) = (v.clone(), stop.clone());
        let mut model = model.clone();
        std::thread::spawn(move || {
            let mut rng = StdRng::seed_from_u64(11);
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) && n < 5000 {
                write_random(&v, &mut model, &mut rng, 1);
                if n % 16 == 0 {
                    v.flush().unwrap();
                }
                n += 1;
            }
            v.flush().unwrap();
            model
        })
    };
    let new = rig.dir.path().join("new-disk.img");
    let report = p
        .replace_disk(
            DiskId(3),
            &new,
            &RebuildOptions {
                rate_bytes_per_s: 40 << 20,
                stop: None,
            },
            &|_| {},
        )
        .unwrap();
    stop.store(true, Ordering::SeqCst);
    let model = writer.join().unwrap();
    assert!(report.completed && !report.resumed);
    assert!(report.chunks > 0 && report.unrecoverable == 0, "{report:?}");
    assert_eq!(p.health.state(DiskId(3)), DiskState::Ok);
    assert_eq!(
        p.store.disk(DiskId(3)).unwrap().unwrap().path,
        std::path::absolute(&new).unwrap()
    );
    v.destage().unwrap();
    assert_matches(&v, &model, "after the rebuild");
    let r = v.scrub(&ScrubOptions::default(), &|_| {}).unwrap();
    assert_eq!((r.bad_found, r.degraded), (0, 0), "{r:?}");
    // The new disk holds real chunks: lose two others and read everything.
    faults[0].as_ref().unwrap().set_gone(true);
    faults[5].as_ref().unwrap().set_gone(true);
    assert_matches(&v, &model, "rebuilt disk plus three others");
    println!(
        "rebuild: {} chunks, {:.1} MiB read in {:.2} s",
        report.chunks,
        report.bytes_read as f64 / (1 << 20) as f64,
        report.seconds
    );
    drop(v);
    drop(p);
}

/// A rebuild stopped halfway (as a restart would) leaves the disk rebuilding with a durable
/// cursor; after reopening, reads are served, and the same command resumes and completes.
#[test]
fn rebuild_resumes_after_a_restart() {
    let rig = Rig::new(6);
    let new = rig.dir.path().join("spare.img");
    let model = {
        let (p, faults) = rig.open();
        let v = vol(&p);
        let mut model = vec![0u8; SIZE as usize];
        StdRng::seed_from_u64(12).fill(&mut model[..]);
        v.write(0, &model, true).unwrap();
        v.destage().unwrap();
        faults[2].as_ref().unwrap().set_gone(true);
        assert_matches(&v, &model, "disk 2 gone");
        assert!(p.health.is_failed(DiskId(2)));
        let stop = Arc::new(AtomicBool::new(false));
        let r = p
            .replace_disk(
                DiskId(2),
                &new,
                &RebuildOptions {
                    rate_bytes_per_s: 0,
                    stop: Some(stop.clone()),
                },
                &|pr| {
                    if pr.done >= 60 {
                        stop.store(true, Ordering::SeqCst);
                    }
                },
            )
            .unwrap();
        assert!(!r.completed);
        drop(v);
        p.close().unwrap();
        model
    };
    let status = shardvol::service::Status::offline(&rig.pool_dir()).unwrap();
    assert_eq!(status.volumes[0].state, "degraded");
    let d2 = &status.disks[2];
    assert_eq!(d2.state, "rebuilding");
    let cursor = d2.rebuild.as_ref().unwrap();
    assert!(cursor.stripe >= 60 && cursor.percent < 100.0, "{cursor:?}");
    let (p, faults) = rig.open();
    let v = vol(&p);
    assert_eq!(p.health.state(DiskId(2)), DiskState::Rebuilding);
    assert_matches(&v, &model, "half rebuilt");
    let r = p
        .replace_disk(DiskId(2), &new, &RebuildOptions::default(), &|_| {})
        .unwrap();
    assert!(r.completed && r.resumed, "{r:?}");
    assert_eq!(p.health.state(DiskId(2)), DiskState::Ok);
    faults[0].as_ref().unwrap().set_gone(true);
    faults[1].as_ref().unwrap().set_gone(true);
    assert_matches(&v, &model, "resumed rebuild, two other disks gone");
    drop(v);
    p.close().unwrap();
    drop(p);
    let store = MetaStore::open(&rig.pool_dir().join("pool.redb")).unwrap();
    let recs: HashMap<u32, DiskState> = store
        .disks()
        .unwrap()
        .into_iter()
        .map(|d| (d.id.0, d.state))
        .collect();
    assert_eq!(recs[&2], DiskState::Ok);
}

/// Replacing refuses a disk in service, an unknown disk and a path that is another disk.
#[test]
fn replace_refuses_bad_requests_with_clear_errors() {
    let rig = Rig::new(6);
    let (p, _) = rig.open();
    let none = |_| {};
    let e = p
        .replace_disk(
            DiskId(1),
            &rig.dir.path().join("x.img"),
            &RebuildOptions::default(),
            &none,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("in service"), "{e}");
    let e = p
        .replace_disk(
            DiskId(9),
            &rig.dir.path().join("x.img"),
            &RebuildOptions::default(),
            &none,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("no disk 9"), "{e}");
    p.health.fail(DiskId(1), "test");
    let e = p
        .replace_disk(
            DiskId(1),
            &rig.disk_path(4),
            &RebuildOptions::default(),
            &none,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("is disk 4"), "{e}");
    drop(p);
}

/// A block rolled back on its disk (an older copy of itself: valid tag, older generation) is
/// found by scrub as a rollback, repaired, and reads its newest content.
#[test]
fn scrub_finds_and_repairs_a_rolled_back_block() {
    let rig = Rig::new(6);
    let (p, _) = rig.open();
    let v = vol(&p);
    let bps = 4 * u64::from(CHUNK) / BS as u64;
    let (s, c, row) = (5u64, 2usize, 1u64);
    let lba = s * bps + c as u64 * (bps / 4) + row;
    let l = v.layout();
    let (page, at) = l.meta_location(StripeId(s), row);
    let block_at = l.block_offset(StripeId(s), row);
    let file = rig.disk_path(rig.stripe_disks(&v, s)[c]);
    let read_file = |off: u64, len: usize| {
        let mut b = vec![0u8; len];
        std::fs::File::open(&file)
            .unwrap()
            .read_exact_at(&mut b, off)
            .unwrap();
        b
    };
    v.write(lba * BS as u64, &[1u8; BS], true).unwrap();
    v.destage().unwrap();
    let (old_block, old_meta) = (read_file(block_at, BS), read_file(page + at as u64, 64));
    v.write(lba * BS as u64, &[2u8; BS], true).unwrap();
    v.destage().unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
    f.write_all_at(&old_block, block_at).unwrap();
    f.write_all_at(&old_meta, page + at as u64).unwrap();
    let check = v.scrub(&ScrubOptions::default(), &|_| {}).unwrap();
    assert_eq!(check.bad_found, 1, "{check:?}");
    assert_eq!(check.bad[0].what, "rollback");
    assert_eq!(check.bad[0].lba, Some(lba));
    let fix = v
        .scrub(
            &ScrubOptions {
                repair: true,
                rate_bytes_per_s: 0,
            },
            &|_| {},
        )
        .unwrap();
    assert_eq!(fix.repaired, 1, "{fix:?}");
    assert_ne!(read_file(block_at, BS), old_block, "slot rewritten");
    let mut buf = vec![0u8; BS];
    v.read(lba * BS as u64, &mut buf).unwrap();
    assert_eq!(buf, vec![2u8; BS]);
    assert_eq!(
        v.scrub(&ScrubOptions::default(), &|_| {})
            .unwrap()
            .bad_found,
        0
    );
    drop(v);
    p.close().unwrap();
}

/// A flipped bit in the reserved bytes (28..32) of a data block's metadata entry is bit rot of
/// that block: scrub must blame the data chunk ("tag", on its disk), not the two parity chunks
/// whose metadata parity no longer matches, and repair it from the row.
#[test]
fn scrub_blames_a_data_block_whose_reserved_metadata_bytes_rotted() {
    let rig = Rig::new(6);
    let (p, _) = rig.open();
    let v = vol(&p);
    let model = fill_and_destage(&v, 21);
    let (s, c, row) = (3u64, 1usize, 2u64);
    let disk = rig.stripe_disks(&v, s)[c];
    let (page, off) = v.layout().meta_location(StripeId(s), row);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(rig.disk_path(disk))
        .unwrap();
    let at = page + off as u64 + 29;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    b[0] ^= 0x04;
    f.write_all_at(&b, at).unwrap();
    let check = v.scrub(&ScrubOptions::default(), &|_| {}).unwrap();
    assert_eq!(check.bad_found, 1, "{check:?}");
    assert_eq!(check.bad[0].what, "tag", "{check:?}");
    assert_eq!(check.bad[0].disk, disk as u32, "{check:?}");
    assert_eq!(check.bad[0].chunk, c as u16, "{check:?}");
    let fix = v
        .scrub(
            &ScrubOptions {
                repair: true,
                rate_bytes_per_s: 0,
            },
            &|_| {},
        )
        .unwrap();
    assert_eq!((fix.bad_found, fix.repaired), (1, 1), "{fix:?}");
    f.read_exact_at(&mut b, at).unwrap();
    assert_eq!(b[0], 0, "the reserved byte is written back as 0");
    assert_eq!(
        v.scrub(&ScrubOptions::default(), &|_| {})
            .unwrap()
            .bad_found,
        0
    );
    assert_matches(&v, &model, "after the repair");
    drop(v);
    p.close().unwrap();
}
