//! Rebalancing onto an added disk (`volume::rebalance`, `pool::grow`).
//!
//! - A power cut at every disk op of a whole rebalance (6 disks → 7) loses nothing: after each
//!   cut (unsynced writes dropped, kept, or torn), the volume reopens with the cursor the store
//!   holds, every block reads back, the rebalance completes, and then any two disks (the new
//!   one among them) can be lost: the parity written over the new table is right.
//! - On a real pool: `Pool::add_disk` while a writer runs, stopped half way, a restart (mixed
//!   tables in force), resumed; status and superblocks; refusals with clear errors.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use shardvol::crypto::{KeyRing, MasterKey};
use shardvol::disk::{CrashMode, Disk, DiskRef, FaultDisk, FaultHandle, UNLIMITED_OPS};
use shardvol::layout::placement::{Placement, PlacementDisk};
use shardvol::layout::{DiskId, StripeId};
use shardvol::meta::{MetaStore, Rebalance, read_superblock};
use shardvol::pool::{self, AddOptions, CreateOptions, DiskSpec, Pool};
use shardvol::volume::health::MissingDisk;
use shardvol::volume::{BlockDevice, Volume, VolumeParts, WriteKey};

mod common;
use common::pattern;

const UNLIMITED: i64 = UNLIMITED_OPS;
const CHUNK: u32 = 16 << 10;
/// 4+2 with 16 KiB chunks: 64 KiB of data per stripe; 8 stripes.
const SIZE: u64 = 8 * 64 * 1024;

// ---------------------------------------------------------------------------------------------
// Volume-level rig: 7 memory disks behind one op budget; the volume starts on disks 0..6.

struct Rig(common::MemRig);

impl std::ops::Deref for Rig {
    type Target = common::MemRig;
    fn deref(&self) -> &common::MemRig {
        &self.0
    }
}

fn table(n: u32) -> Vec<PlacementDisk> {
    (0..n)
        .map(|i| PlacementDisk {
            id: DiskId(i),
            domain: format!("d{i}"),
        })
        .collect()
}

impl Rig {
    fn new() -> Rig {
        let rig = Rig(common::MemRig::new("grow", [9; 32], 7, SIZE, CHUNK));
        Volume::format(&rig.parts(6, &[])).unwrap();
        rig
    }

    /// Parts over the first `n` disks (the record as the store has it), with `gone` disks
    /// replaced by missing ones.
    fn parts(&self, n: u32, gone: &[u32]) -> VolumeParts {
        let store = Arc::new(MetaStore::open(&self.store_path).unwrap());
        let keys = Arc::new(KeyRing::new([5; 16]));
        keys.insert(1, MasterKey::from_bytes([17; 32]));
        VolumeParts {
            record: store.volume(1).unwrap().unwrap(),
            disks: (0..n)
                .map(|i| {
                    let d: DiskRef = if gone.contains(&i) {
                        Arc::new(MissingDisk {
                            name: format!("m{i}"),
                            size: self.mems[i as usize].size(),
                        })
                    } else {
                        self.disks[i as usize].clone()
                    };
                    (DiskId(i), d)
                })
                .collect::<HashMap<_, _>>(),
            table: table(n),
            keys,
            write_key: Arc::new(WriteKey::new(1, 1)),
            store,
        }
    }

    fn open(&self, n: u32, gone: &[u32]) -> Arc<Volume> {
        let v = Volume::open(self.parts(n, gone)).expect("volume opens");
        v.halt();
        v
    }

    /// What `disk add` commits before the volume moves: journal disks pinned, the old table
    /// and cursor 0.
    fn record_add(&self) {
        let store = MetaStore::open(&self.store_path).unwrap();
        let rec = store.volume(1).unwrap().unwrap();
        let old = Placement::new(rec.placement_seed, table(6)).unwrap();
        let jd = Volume::journal_disks(&old, &rec).unwrap();
        store
            .update_volume(1, |r| {
                r.journal_disks = jd;
                r.rebalance = Some(Rebalance {
                    from: (0..6).map(DiskId).collect(),
                    cursor: 0,
                });
            })
            .unwrap();
    }

    fn rebalance(&self) -> Option<Rebalance> {
        let store = MetaStore::open(&self.store_path).unwrap();
        store.volume(1).unwrap().unwrap().rebalance
    }
}

/// Data over 6 disks: destaged stripes, a never-written stripe, trimmed blocks, and a few
/// flushed blocks still in the journal.
fn prepare(rig: &Rig) -> Vec<u8> {
    let vol = rig.open(6, &[]);
    let s = 65536;
    let mut data = pattern(4, SIZE as usize);
    data[5 * s..6 * s].fill(0);
    vol.write(0, &data[..5 * s], false).unwrap();
    vol.write(6 * s as u64, &data[6 * s..], false).unwrap();
    vol.trim(2 * s as u64 + 8192, 8192).unwrap();
    data[2 * s + 8192..2 * s + 16384].fill(0);
    vol.flush().unwrap();
    vol.destage().unwrap();
    let extra = pattern(5, 3 * 4096);
    vol.write(s as u64 + 4096, &extra, false).unwrap();
    data[s + 4096..s + 4 * 4096].copy_from_slice(&extra);
    vol.flush().unwrap();
    common::kill(vol);
    data
}

fn rebalance_all(vol: &Volume) -> Result<u64, String> {
    let mut moved = 0;
    for _ in 0..1000 {
        let r = vol.rebalance_step(2).map_err(|e| e.to_string())?;
        moved += r.moved;
        if r.finished {
            return Ok(moved);
        }
    }
    Err("the rebalance does not finish".into())
}

fn check(vol: &Volume, data: &[u8], what: &str) {
    let mut b = vec![0u8; data.len()];
    vol.read(0, &mut b)
        .unwrap_or_else(|e| panic!("{what}: read failed: {e}"));
    if let Some(i) = (0..data.len()).find(|i| b[*i] != data[*i]) {
        panic!("{what}: byte {i} (block {}) differs", i / 4096);
    }
}

/// After a complete rebalance: the record says so, and any two disks may be lost.
fn check_finished(rig: &Rig, data: &[u8], what: &str) {
    assert_eq!(rig.rebalance(), None, "{what}: rebalance record left");
    for gone in [[6, 0], [6, 3], [1, 5]] {
        let vol = rig.open(7, &gone);
        check(vol.as_ref(), data, &format!("{what}, disks {gone:?} gone"));
        common::kill(vol);
    }
}

#[test]
fn rebalance_moves_chunks_onto_the_new_disk_and_keeps_parity_right() {
    let rig = Rig::new();
    let data = prepare(&rig);
    rig.record_add();
    let vol = rig.open(7, &[]);
    check(&vol, &data, "two tables, cursor 0");
    let moved = rebalance_all(&vol).unwrap();
    // 7 written stripes (one never written); each changes placement with high probability.
    assert!(moved >= 4, "only {moved} stripes moved");
    check(&vol, &data, "rebalanced");
    assert_eq!(vol.rebalance_cursor(), None);
    common::kill(vol);
    // The new disk holds chunk data now.
    let layout = Volume::layout_of(
        &MetaStore::open(&rig.store_path)
            .unwrap()
            .volume(1)
            .unwrap()
            .unwrap(),
    );
    let new = Placement::new([9; 32], table(7)).unwrap();
    let on_new: Vec<u64> = (0..8)
        .filter(|s| new.place(StripeId(*s), 6).unwrap().contains(&DiskId(6)))
        .collect();
    assert!(!on_new.is_empty());
    let d6: &dyn Disk = rig.mems[6].as_ref();
    let moved_data = on_new.iter().any(|s| {
        let at = layout.block_offset(StripeId(*s), 0);
        let b = shardvol::disk::read_at(d6, at, CHUNK as usize).unwrap();
        b.iter().any(|x| *x != 0)
    });
    assert!(moved_data, "disk 6 holds no chunk of stripes {on_new:?}");
    check_finished(&rig, &data, "after the rebalance");
}

/// The ordering that makes a crash safe, checked directly: when a cursor commit is announced
/// (the hook runs right after the store commit), no slot of a stripe at or after the previous
/// cursor has changed since the previous commit. So nothing is written over the new table before
/// the cursor that sends reads there is durable, and the old table's slots stay whole until then.
#[test]
fn no_slot_changes_before_the_cursor_passes_its_stripe() {
    let rig = Rig::new();
    let data = prepare(&rig);
    rig.record_add();
    let vol = rig.open(7, &[]);
    let layout = Volume::layout_of(vol.record());
    let mems = rig.mems.clone();
    let slots = move |from: u64| -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        for m in &mems {
            for s in from..8 {
                let d: &dyn Disk = m.as_ref();
                let b = shardvol::disk::read_at(
                    d,
                    layout.slot_offset(StripeId(s)),
                    layout.slot_size() as usize,
                )
                .unwrap();
                out.push(b.to_vec());
            }
        }
        out
    };
    let state = Arc::new(Mutex::new((0u64, slots(0), 0usize)));
    let weak = Arc::downgrade(&vol);
    let (st, sl) = (state.clone(), slots.clone());
    vol.set_rebalance_hook(Arc::new(move || {
        let Some(v) = weak.upgrade() else {
            return Ok(());
        };
        let cursor = v.rebalance_cursor().unwrap_or(8);
        let mut g = st.lock().unwrap();
        let (prev, snap, commits) = &mut *g;
        if sl(*prev) != *snap {
            return Err(format!(
                "slots of stripes from {prev} changed before the commit of cursor {cursor}"
            ));
        }
        *prev = cursor;
        *snap = sl(cursor);
        *commits += 1;
        Ok(())
    }));
    rebalance_all(&vol).unwrap();
    check(&vol, &data, "rebalanced");
    assert!(
        state.lock().unwrap().2 >= 4,
        "too few commits to mean anything"
    );
    vol.set_rebalance_hook(Arc::new(|| Ok(())));
    common::kill(vol);
}

#[test]
fn power_cut_at_every_op_of_a_rebalance_loses_nothing() {
    let ops = {
        let rig = Rig::new();
        let data = prepare(&rig);
        rig.record_add();
        let vol = rig.open(7, &[]);
        rig.budget.store(UNLIMITED, Ordering::SeqCst);
        rebalance_all(&vol).unwrap();
        let used = UNLIMITED - rig.budget.load(Ordering::SeqCst);
        check(&vol, &data, "uncut rebalance");
        common::kill(vol);
        used
    };
    assert!(ops > 50, "a rebalance of 8 stripes took only {ops} ops");
    let mut rng = StdRng::seed_from_u64(21);
    let step: i64 = std::env::var("SHARDVOL_REBALANCE_CUT_STEP")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4)
        .max(1);
    let modes = [CrashMode::DropAll, CrashMode::KeepAll, CrashMode::THIRDS];
    let mut checked = 0;
    let mut mid = 0;
    for n in (0..=ops).filter(|n| *n < 40 || n % step == 0 || *n == ops) {
        let mode = modes[n as usize % 3];
        let rig = Rig::new();
        let data = prepare(&rig);
        rig.record_add();
        let vol = rig.open(7, &[]);
        rig.budget.store(n, Ordering::SeqCst);
        let r = rebalance_all(&vol);
        assert!(n < ops || r.is_ok(), "cut at op {n} of {ops}: {r:?}");
        rig.budget.store(0, Ordering::SeqCst);
        common::kill(vol);
        for m in &rig.mems {
            m.crash(&mut rng, mode);
        }
        rig.budget.store(UNLIMITED, Ordering::SeqCst);
        let what = format!("cut at op {n} of {ops} ({mode:?})");
        if rig
            .rebalance()
            .is_some_and(|r| r.cursor > 0 && r.cursor < 8)
        {
            mid += 1;
        }
        let vol = rig.open(7, &[]);
        check(&vol, &data, &what);
        rebalance_all(&vol).unwrap_or_else(|e| panic!("{what}: resumed rebalance: {e}"));
        check(&vol, &data, &format!("{what}, resumed"));
        common::kill(vol);
        check_finished(&rig, &data, &what);
        checked += 1;
    }
    assert!(mid > 3, "only {mid} cuts left the cursor half way");
    println!("rebalance of {ops} ops: {checked} cuts checked, {mid} with the cursor half way");
}

// ---------------------------------------------------------------------------------------------
// Pool-level: `Pool::add_disk`.

const PSIZE: u64 = 8 << 20;

struct PoolRig {
    dir: tempfile::TempDir,
    shares: Vec<PathBuf>,
}

impl PoolRig {
    fn new() -> PoolRig {
        let dir = tempfile::tempdir().unwrap();
        let created = pool::create(&CreateOptions {
            pool: dir.path().join("pool"),
            volume: "v".into(),
            size: PSIZE,
            data: 4,
            parity: 2,
            chunk_size: CHUNK,
            disks: DiskSpec::Files(6),
            shares: 3,
            threshold: 2,
            share_dir: dir.path().join("shares"),
            journal_size: 5 << 20,
        })
        .unwrap();
        PoolRig {
            shares: created.share_files,
            dir,
        }
    }

    fn pool_dir(&self) -> PathBuf {
        self.dir.path().join("pool")
    }

    /// Opens the pool with every disk behind a fault disk; handles by disk id.
    fn open(&self) -> (Pool, Arc<Mutex<HashMap<u32, FaultHandle>>>) {
        let handles: Arc<Mutex<HashMap<u32, FaultHandle>>> = Arc::default();
        let h = handles.clone();
        let wrap = move |id: DiskId, d: DiskRef| -> DiskRef {
            let f = FaultDisk::with_seed(d, u64::from(id.0));
            h.lock().unwrap().insert(id.0, f.handle());
            Arc::new(f)
        };
        let shares: Vec<_> = self.shares[..2]
            .iter()
            .map(|f| shardvol::kms::load_share_file(f).unwrap())
            .collect();
        (
            Pool::open_wrapped(&self.pool_dir(), &shares, &wrap).unwrap(),
            handles,
        )
    }
}

fn read_all(v: &Volume) -> Vec<u8> {
    let mut b = vec![0u8; PSIZE as usize];
    v.read(0, &mut b).unwrap();
    b
}

#[test]
fn add_disk_while_writing_stop_restart_resume() {
    let rig = PoolRig::new();
    let new = rig.dir.path().join("new.img");
    let model = {
        let (p, _) = rig.open();
        let v = p.volumes["v"].clone();
        let mut model = vec![0u8; PSIZE as usize];
        StdRng::seed_from_u64(3).fill(&mut model[..]);
        v.write(0, &model, true).unwrap();
        v.destage().unwrap();
        // A writer runs during the first part of the rebalance; stop after 40 stripes.
        let model = Arc::new(Mutex::new(model));
        let halt = Arc::new(AtomicBool::new(false));
        let writer = {
            let (v, model, halt) = (v.clone(), model.clone(), halt.clone());
            std::thread::spawn(move || {
                let mut rng = StdRng::seed_from_u64(4);
                for _ in 0..400 {
                    if halt.load(Ordering::SeqCst) {
                        break;
                    }
                    let blocks = rng.random_range(1..=8u64);
                    let first = rng.random_range(0..PSIZE / 4096 - blocks);
                    let mut data = vec![0u8; blocks as usize * 4096];
                    rng.fill(&mut data[..]);
                    let mut m = model.lock().unwrap();
                    v.write(first * 4096, &data, false).unwrap();
                    m[first as usize * 4096..][..data.len()].copy_from_slice(&data);
                }
            })
        };
        let stop = Arc::new(AtomicBool::new(false));
        let r = p
            .add_disk(
                &new,
                &AddOptions {
                    domain: Some("shelf-2".into()),
                    rate_bytes_per_s: 0,
                    stop: Some(stop.clone()),
                },
                &|pr| {
                    if pr.done >= 40 {
                        stop.store(true, Ordering::SeqCst);
                    }
                },
            )
            .unwrap();
        halt.store(true, Ordering::SeqCst);
        writer.join().unwrap();
        assert!(!r.completed && r.moved > 0, "{r:?}");
        let model = model.lock().unwrap().clone();
        assert_eq!(read_all(&v), model, "half rebalanced, served");
        // A second disk cannot be added meanwhile.
        let e = p
            .add_disk(
                &rig.dir.path().join("other.img"),
                &AddOptions::default(),
                &|_| {},
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains("in progress") && e.contains("new.img"), "{e}");
        drop(v);
        p.close().unwrap();
        model
    };
    let st = shardvol::service::Status::offline(&rig.pool_dir()).unwrap();
    let rb = st.rebalance.expect("status shows the rebalance");
    assert!(
        rb.disk == 6 && rb.percent > 0.0 && rb.percent < 100.0,
        "{rb:?}"
    );
    assert_eq!(st.disks.len(), 7);
    assert_eq!(st.disks[6].domain, "shelf-2");

    let (p, faults) = rig.open();
    let v = p.volumes["v"].clone();
    assert_eq!(read_all(&v), model, "after a restart, two tables in force");
    let r = p.add_disk(&new, &AddOptions::default(), &|_| {}).unwrap();
    assert!(r.completed && r.resumed, "{r:?}");
    assert!(!p.rebalance_pending());
    assert_eq!(read_all(&v), model, "rebalanced");
    // The new disk and another are lost: the new table's parity rebuilds everything.
    for id in [6, 2] {
        faults.lock().unwrap()[&id].set_gone(true);
    }
    assert_eq!(read_all(&v), model, "disks 6 and 2 gone");
    drop(v);
    p.close().unwrap();
    drop(p);
    // Every disk's superblock lists 7 disks and no rebalance.
    for i in 0..6 {
        let path = rig.pool_dir().join("disks").join(format!("disk-{i}.img"));
        let d = shardvol::disk::open_disk(&path, &Default::default()).unwrap();
        let sb = read_superblock(d.as_ref()).unwrap();
        assert_eq!(sb.disks.len(), 7);
        assert!(
            sb.volumes
                .iter()
                .all(|v| v.rebalance.is_none() && !v.journal_disks.is_empty())
        );
    }
    // The audit log recorded it.
    let log = std::fs::read_to_string(rig.pool_dir().join("audit.log")).unwrap();
    assert!(log.contains("disk-added"), "no disk-added record");
}

#[test]
fn add_disk_refuses_bad_requests_with_clear_errors() {
    let rig = PoolRig::new();
    let (p, faults) = rig.open();
    let disk0 = rig.pool_dir().join("disks").join("disk-0.img");
    let e = p
        .add_disk(&disk0, &AddOptions::default(), &|_| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("already disk 0"), "{e}");
    // A disk of another pool.
    let other = PoolRig::new();
    let foreign = other.pool_dir().join("disks").join("disk-1.img");
    let e = p
        .add_disk(&foreign, &AddOptions::default(), &|_| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("another shardvol pool"), "{e}");
    // A failed disk must be replaced first.
    let v = p.volumes["v"].clone();
    v.write(0, &[7u8; 8192], true).unwrap();
    faults.lock().unwrap()[&3].set_gone(true);
    let mut b = vec![0u8; 4 << 20];
    v.read(0, &mut b).unwrap();
    v.destage().unwrap();
    assert!(p.health.is_failed(DiskId(3)));
    let e = p
        .add_disk(
            &rig.dir.path().join("n.img"),
            &AddOptions::default(),
            &|_| {},
        )
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("disk 3") && e.contains("replace it first"),
        "{e}"
    );
    assert!(!rig.dir.path().join("n.img").exists() || !p.rebalance_pending());
    drop(v);
    p.close().unwrap();
}

/// A scrub running while stripes move finds nothing wrong: a stripe whose cursor has passed but
/// which is not destaged yet has nothing in its new slots, and the scrub must not read them.
#[test]
fn scrub_during_a_rebalance_finds_nothing_wrong() {
    let rig = Rig::new();
    let data = prepare(&rig);
    rig.record_add();
    let vol = rig.open(7, &[]);
    let done = Arc::new(AtomicBool::new(false));
    let scrubber = {
        let (vol, done) = (vol.clone(), done.clone());
        std::thread::spawn(move || {
            let (mut scrubs, mut bad) = (0, 0);
            while !done.load(Ordering::SeqCst) && scrubs < 10_000 {
                let r = vol
                    .scrub(&shardvol::volume::scrub::ScrubOptions::default(), &|_| {})
                    .unwrap();
                bad += r.bad_found;
                scrubs += 1;
            }
            (scrubs, bad)
        })
    };
    for _ in 0..1000 {
        let r = vol.rebalance_step(1).unwrap();
        if r.finished {
            break;
        }
    }
    done.store(true, Ordering::SeqCst);
    let (scrubs, bad) = scrubber.join().unwrap();
    assert!(scrubs > 0);
    assert_eq!(
        bad, 0,
        "{scrubs} scrubs during the rebalance found {bad} bad shards"
    );
    check(&vol, &data, "rebalanced while scrubbing");
    common::kill(vol);
}
