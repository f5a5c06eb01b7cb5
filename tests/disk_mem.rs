//! MemDisk: sparse storage, counters, and the crash model (synced data always survives;
//! each unsynced write comes back old, new or torn at sector granularity).

use std::sync::Arc;

use rand::rngs::SmallRng;
use rand::{Rng, RngExt, SeedableRng};
use shardvol::disk::{self, CrashMode, CrashReport, Disk, IoOp, MemDisk};

const SECTOR: usize = 512;

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    SmallRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

#[test]
fn round_trip_sparse_with_counters() {
    let d = MemDisk::new("m0", 1 << 40);
    assert_eq!(d.size(), 1 << 40);
    disk::write_at(&d, 0, &pattern(1, 8192)).unwrap();
    disk::write_at(&d, 1 << 39, &pattern(2, 512)).unwrap();
    assert_eq!(
        d.stored_bytes(),
        3 * 4096,
        "a 1 TiB disk stores only written pages"
    );
    assert!(disk::read_at(&d, 0, 8192).unwrap()[..] == pattern(1, 8192)[..]);
    assert!(disk::read_at(&d, 1 << 39, 512).unwrap()[..] == pattern(2, 512)[..]);
    assert!(
        disk::read_at(&d, 1 << 30, 4096)
            .unwrap()
            .iter()
            .all(|&b| b == 0)
    );
    disk::sync(&d).unwrap();
    disk::discard(&d, 0, 8192).unwrap();
    assert_eq!(d.stored_bytes(), 4096, "discard frees whole pages");
    assert!(disk::read_at(&d, 0, 8192).unwrap().iter().all(|&b| b == 0));
    let s = d.stats();
    assert_eq!(
        (s.batches, s.reads, s.writes, s.syncs, s.discards),
        (8, 4, 2, 1, 1)
    );
    assert_eq!(
        (s.bytes_read, s.bytes_written),
        (8192 + 512 + 4096 + 8192, 8192 + 512)
    );
    assert_eq!(s.ops(), 8);
    // Refused batches count nothing.
    assert!(disk::read_at(&d, 1 << 40, 512).is_err());
    assert_eq!(d.stats(), s);
    let pages = d.contents();
    assert_eq!(pages.len(), 1);
    assert_eq!(pages[0].0, 1 << 39);
}

/// Synced data survives every crash mode, unsynced data is lost with DropAll and kept with
/// KeepAll.
#[test]
fn synced_survives_and_drop_all_loses_every_unsynced_write() {
    let d = MemDisk::new("m1", 1 << 20);
    let synced = pattern(10, 64 << 10);
    disk::write_at(&d, 0, &synced).unwrap();
    disk::sync(&d).unwrap();
    assert_eq!(d.unsynced(), 0);
    // Unsynced: new data elsewhere, an overwrite of part of the synced data, a discard.
    let fresh = pattern(11, 16 << 10);
    let over = pattern(12, 4096);
    disk::write_at(&d, 512 << 10, &fresh).unwrap();
    disk::write_at(&d, 8192, &over).unwrap();
    disk::discard(&d, 32 << 10, 4096).unwrap();
    assert_eq!(d.unsynced(), 3);
    assert!(d.find(&fresh[..64]).is_some());

    let drop_all = d.snapshot();
    let report = drop_all.crash(&mut SmallRng::seed_from_u64(0), CrashMode::DropAll);
    assert_eq!(
        report,
        CrashReport {
            kept: 0,
            dropped: 3,
            torn: 0
        }
    );
    assert!(
        disk::read_at(&drop_all, 0, 64 << 10).unwrap()[..] == synced[..],
        "synced data changed"
    );
    assert!(
        disk::read_at(&drop_all, 512 << 10, 16 << 10)
            .unwrap()
            .iter()
            .all(|&b| b == 0)
    );
    assert_eq!(
        drop_all.find(&fresh[..64]),
        None,
        "a dropped write must leave no trace"
    );
    assert_eq!(drop_all.find(&over[..64]), None);
    assert_eq!(drop_all.unsynced(), 0);

    let keep_all = d.snapshot();
    let report = keep_all.crash(&mut SmallRng::seed_from_u64(0), CrashMode::KeepAll);
    assert_eq!(
        report,
        CrashReport {
            kept: 3,
            dropped: 0,
            torn: 0
        }
    );
    let mut want = synced.clone();
    want[8192..12288].copy_from_slice(&over);
    want[32 << 10..36 << 10].fill(0);
    assert!(disk::read_at(&keep_all, 0, 64 << 10).unwrap()[..] == want[..]);
    assert!(disk::read_at(&keep_all, 512 << 10, 16 << 10).unwrap()[..] == fresh[..]);

    // Under random crashes, synced bytes that no unsynced change touched are always intact.
    for seed in 0..50 {
        let c = d.snapshot();
        c.crash(&mut SmallRng::seed_from_u64(seed), CrashMode::THIRDS);
        let got = disk::read_at(&c, 0, 64 << 10).unwrap();
        assert!(
            got[..8192] == synced[..8192] && got[12288..32 << 10] == synced[12288..32 << 10],
            "seed {seed}"
        );
        assert!(got[36 << 10..] == synced[36 << 10..], "seed {seed}");
    }
    // The original is untouched by its snapshots' crashes.
    assert!(disk::read_at(&d, 512 << 10, 16 << 10).unwrap()[..] == fresh[..]);
}

/// Non-overlapping unsynced writes: after a crash every sector holds its old or its new
/// content, and with THIRDS every outcome (kept, dropped, torn) happens.
#[test]
fn random_crash_leaves_each_sector_old_or_new() {
    let d = MemDisk::new("m2", 4 << 20);
    let old = pattern(20, 4 << 20);
    disk::write_at(&d, 0, &old).unwrap();
    disk::sync(&d).unwrap();
    let mut rng = SmallRng::seed_from_u64(21);
    let mut writes = Vec::new();
    let mut at = 0u64;
    while at < (4 << 20) - 64 * 512 {
        let sectors = rng.random_range(2..=16u64);
        let data = pattern(at, sectors as usize * SECTOR);
        disk::write_at(&d, at, &data).unwrap();
        writes.push((at, data));
        at += (sectors + rng.random_range(0..4)) * 512;
    }
    for seed in 0..5 {
        let c = d.snapshot();
        let report = c.crash(&mut SmallRng::seed_from_u64(seed), CrashMode::THIRDS);
        assert_eq!(
            report.kept + report.dropped + report.torn,
            writes.len() as u64
        );
        let (mut all_new, mut all_old, mut mixed) = (0u64, 0u64, 0u64);
        for (at, new) in &writes {
            let got = disk::read_at(&c, *at, new.len()).unwrap();
            let old = &old[*at as usize..*at as usize + new.len()];
            let (mut n_new, mut n_old) = (0, 0);
            for s in 0..new.len() / SECTOR {
                let r = s * SECTOR..(s + 1) * SECTOR;
                if got[r.clone()] == new[r.clone()] {
                    n_new += 1;
                } else if got[r.clone()] == old[r.clone()] {
                    n_old += 1;
                } else {
                    panic!("seed {seed}: sector {s} of the write at {at} is neither old nor new");
                }
            }
            match (n_new, n_old) {
                (_, 0) => all_new += 1,
                (0, _) => all_old += 1,
                _ => mixed += 1,
            }
        }
        // A torn write may by chance keep all or none of its sectors, never the converse.
        assert!(
            mixed <= report.torn && all_new >= report.kept && all_old >= report.dropped,
            "seed {seed}: {report:?}"
        );
        assert!(
            mixed > 0 && all_new > 0 && all_old > 0,
            "seed {seed}: {all_new} new, {all_old} old, {mixed} torn"
        );
        // Gaps between the writes were never written after the sync: they keep the old bytes.
        let all = disk::read_at(&c, 0, 4 << 20).unwrap();
        let mut covered = vec![false; (4 << 20) / SECTOR];
        for (at, new) in &writes {
            covered[*at as usize / SECTOR..(*at as usize + new.len()) / SECTOR].fill(true);
        }
        for (s, _) in covered.iter().enumerate().filter(|(_, c)| !**c) {
            assert!(
                all[s * SECTOR..(s + 1) * SECTOR] == old[s * SECTOR..(s + 1) * SECTOR],
                "seed {seed}: gap sector {s}"
            );
        }
    }
}

/// Overlapping unsynced writes: each sector holds the synced content or the content of one of
/// the writes that covered it.
#[test]
fn overlapping_unsynced_writes_leave_one_of_their_versions() {
    let d = MemDisk::new("m3", 64 << 10);
    disk::write_at(&d, 0, &vec![0xEE; 64 << 10]).unwrap();
    disk::sync(&d).unwrap();
    let mut rng = SmallRng::seed_from_u64(30);
    let sectors = (64 << 10) / SECTOR;
    let mut versions: Vec<Vec<u8>> = vec![vec![0xEE]; sectors];
    for w in 1..=200u8 {
        let start = rng.random_range(0..sectors - 8);
        let n = rng.random_range(1..=8);
        disk::write_at(&d, (start * SECTOR) as u64, &vec![w; n * SECTOR]).unwrap();
        for v in &mut versions[start..start + n] {
            v.push(w);
        }
    }
    for seed in 0..20 {
        let c = d.snapshot();
        c.crash(
            &mut SmallRng::seed_from_u64(seed),
            CrashMode::Random {
                keep: 0.5,
                torn: 0.3,
            },
        );
        let got = disk::read_at(&c, 0, 64 << 10).unwrap();
        for (s, allowed) in versions.iter().enumerate() {
            let sector = &got[s * SECTOR..(s + 1) * SECTOR];
            assert!(
                sector.iter().all(|&b| b == sector[0]),
                "seed {seed}: sector {s} mixes versions"
            );
            assert!(
                allowed.contains(&sector[0]),
                "seed {seed}: sector {s} holds {}",
                sector[0]
            );
        }
    }
}

#[test]
fn sync_covers_only_writes_completed_before_its_batch() {
    let d = MemDisk::new("m4", 1 << 20);
    let a = pattern(40, 4096);
    let b = pattern(41, 4096);
    disk::write_at(&d, 0, &a).unwrap();
    // One batch: a write and a sync. The sync covers `a` (completed earlier), not `b`.
    d.submit(vec![IoOp::write(4096, &b), IoOp::Sync])
        .wait()
        .unwrap();
    assert_eq!(d.unsynced(), 1);
    let c = d.snapshot();
    c.crash(&mut SmallRng::seed_from_u64(0), CrashMode::DropAll);
    assert!(disk::read_at(&c, 0, 4096).unwrap()[..] == a[..]);
    assert!(
        disk::read_at(&c, 4096, 4096)
            .unwrap()
            .iter()
            .all(|&x| x == 0),
        "b was made durable by its own batch"
    );
    // A later sync covers it.
    disk::sync(&d).unwrap();
    d.crash(&mut SmallRng::seed_from_u64(0), CrashMode::DropAll);
    assert!(disk::read_at(&d, 4096, 4096).unwrap()[..] == b[..]);
    assert_eq!(d.durable_bytes(0, 4096), a);
}

#[test]
fn unsynced_discard_is_kept_dropped_or_torn() {
    let d = MemDisk::new("m5", 1 << 20);
    let data = pattern(50, 64 << 10);
    disk::write_at(&d, 0, &data).unwrap();
    disk::sync(&d).unwrap();
    disk::discard(&d, 0, 64 << 10).unwrap();
    let dropped = d.snapshot();
    dropped.crash(&mut SmallRng::seed_from_u64(1), CrashMode::DropAll);
    assert!(disk::read_at(&dropped, 0, 64 << 10).unwrap()[..] == data[..]);
    let kept = d.snapshot();
    kept.crash(&mut SmallRng::seed_from_u64(1), CrashMode::KeepAll);
    assert_eq!(kept.stored_bytes(), 0);
    let torn = d.snapshot();
    assert_eq!(
        torn.crash(
            &mut SmallRng::seed_from_u64(1),
            CrashMode::Random {
                keep: 0.0,
                torn: 1.0
            }
        )
        .torn,
        1
    );
    let got = disk::read_at(&torn, 0, 64 << 10).unwrap();
    let zeroed = (0..128)
        .filter(|s| got[s * SECTOR..(s + 1) * SECTOR].iter().all(|&x| x == 0))
        .count();
    for s in 0..128 {
        let sector = &got[s * SECTOR..(s + 1) * SECTOR];
        assert!(
            sector.iter().all(|&x| x == 0) || sector == &data[s * SECTOR..(s + 1) * SECTOR],
            "sector {s}"
        );
    }
    assert!(
        zeroed > 20 && zeroed < 108,
        "{zeroed} of 128 sectors discarded"
    );
}

#[test]
fn crash_is_deterministic_for_a_seed() {
    let d = MemDisk::new("m6", 1 << 20);
    for i in 0..100u64 {
        disk::write_at(&d, i * 4096 % (1 << 20), &pattern(i, 4096)).unwrap();
    }
    let (a, b) = (d.snapshot(), d.snapshot());
    let ra = a.crash(&mut SmallRng::seed_from_u64(9), CrashMode::THIRDS);
    let rb = b.crash(&mut SmallRng::seed_from_u64(9), CrashMode::THIRDS);
    assert_eq!(ra, rb);
    assert_eq!(a.contents(), b.contents());
    let other = d.snapshot();
    other.crash(&mut SmallRng::seed_from_u64(10), CrashMode::THIRDS);
    assert_ne!(
        a.contents(),
        other.contents(),
        "another seed gives another outcome"
    );
}

#[test]
fn find_searches_current_durable_and_unsynced_data() {
    let d = MemDisk::new("m7", 1 << 20);
    let secret = b"plaintext-credit-card-4111";
    let mut blocks = vec![0u8; 8192];
    blocks[4090..4090 + secret.len()].copy_from_slice(secret);
    // Written across a page boundary, then overwritten before any sync.
    disk::write_at(&d, 8192, &blocks).unwrap();
    assert_eq!(d.find(secret), Some(8192 + 4090));
    disk::write_at(&d, 8192, &[0; 8192]).unwrap();
    assert!(
        d.find(secret).is_some(),
        "overwritten but unsynced data can still resurface after a crash"
    );
    disk::sync(&d).unwrap();
    assert_eq!(
        d.find(secret),
        None,
        "once the overwrite is durable the secret is gone"
    );
    // Every stored byte can be scanned by a test.
    let total: usize = d.contents().iter().map(|(_, p)| p.len()).sum();
    assert_eq!(total as u64, d.stored_bytes());
}

#[test]
fn tamper_changes_the_medium() {
    let d = MemDisk::new("m8", 1 << 20);
    disk::write_at(&d, 0, &[7; 4096]).unwrap();
    disk::sync(&d).unwrap();
    d.tamper(100, &[0xFF; 3]);
    let got = disk::read_at(&d, 0, 4096).unwrap();
    assert_eq!(&got[99..104], &[7, 0xFF, 0xFF, 0xFF, 7]);
    d.crash(&mut SmallRng::seed_from_u64(0), CrashMode::DropAll);
    assert_eq!(
        disk::read_at(&d, 0, 4096).unwrap()[101],
        0xFF,
        "tampering is durable"
    );
    assert_eq!(d.stats().writes, 1, "tampering is not an op");
}

#[test]
fn concurrent_submitters() {
    let d = Arc::new(MemDisk::new("m9", 8 << 20));
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let d = d.clone();
            std::thread::spawn(move || {
                for i in 0..200u64 {
                    let at = (t * 256 + i % 256) * 4096;
                    let data = pattern(t * 1000 + i, 4096);
                    disk::write_at(&*d, at, &data).unwrap();
                    assert!(disk::read_at(&*d, at, 4096).unwrap()[..] == data[..]);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(d.stats().writes, 800);
}
