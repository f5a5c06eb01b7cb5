//! Volume behaviour on in-memory and fault-injecting disks: concurrency, thin provisioning,
//! trim, self-healing reads, and the exact limit of `m` lost disks.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use shardvol::crypto::{KeyRing, MasterKey};
use shardvol::disk::{DiskRef, FaultDisk, FaultHandle, MemDisk, Trigger};
use shardvol::layout::placement::PlacementDisk;
use shardvol::layout::{DiskId, Geometry};
use shardvol::meta::{MetaStore, VolumeRecord};
use shardvol::volume::{BlockDevice, Extent, Volume, VolumeError, VolumeParts, WriteKey};

mod common;

const BS: usize = 4096;

struct Rig {
    _dir: tempfile::TempDir,
    mems: Vec<Arc<MemDisk>>,
    faults: Vec<FaultHandle>,
    vol: Arc<Volume>,
    /// Microseconds every batch holding a write waits (`common::Slow::writes`); 0 at first.
    write_delay: Arc<AtomicU64>,
    /// Microseconds every batch holding a read waits (`common::Slow::reads`); 0 at first.
    read_delay: Arc<AtomicU64>,
    /// Batches waiting for that now.
    reads_waiting: Arc<AtomicU64>,
}

fn rig(size: u64, chunk: u32) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(MetaStore::create(&dir.path().join("pool.redb")).unwrap());
    let mut record = VolumeRecord {
        id: 1,
        name: "t".into(),
        size,
        geometry: Geometry::new(4, 2, chunk).unwrap(),
        placement_seed: [7; 32],
        region_offset: 1 << 20,
        journal_size: 8 << 20,
        region_size: 0,
        journal_disks: Vec::new(),
        rebalance: None,
        created_unix: 0,
    };
    record.region_size = Volume::layout_of(&record).region_size();
    store.put_volume(&record).unwrap();
    let disk_size = record.region_offset + record.region_size;
    let mems: Vec<Arc<MemDisk>> = (0..6)
        .map(|i| Arc::new(MemDisk::new(format!("m{i}"), disk_size)))
        .collect();
    let fault_disks: Vec<FaultDisk> = mems
        .iter()
        .enumerate()
        .map(|(i, m)| FaultDisk::with_seed(m.clone() as DiskRef, i as u64))
        .collect();
    let faults = fault_disks.iter().map(|f| f.handle()).collect();
    let write_delay = Arc::new(AtomicU64::new(0));
    let read_delay = Arc::new(AtomicU64::new(0));
    let reads_waiting = Arc::new(AtomicU64::new(0));
    let disks: HashMap<DiskId, DiskRef> = fault_disks
        .into_iter()
        .enumerate()
        .map(|(i, f)| {
            let reads = common::Slow::reads(Arc::new(f), read_delay.clone(), reads_waiting.clone());
            let slow = common::Slow::writes(Arc::new(reads), write_delay.clone());
            (DiskId(i as u32), Arc::new(slow) as DiskRef)
        })
        .collect();
    let table = (0..6)
        .map(|i| PlacementDisk {
            id: DiskId(i),
            domain: format!("d{i}"),
        })
        .collect();
    let keys = Arc::new(KeyRing::new([2; 16]));
    keys.insert(1, MasterKey::from_bytes([4; 32]));
    let parts = VolumeParts {
        record,
        disks,
        table,
        keys,
        write_key: Arc::new(WriteKey::new(1, 1)),
        store,
    };
    Volume::format(&parts).unwrap();
    let vol = Volume::open(parts).unwrap();
    Rig {
        _dir: dir,
        mems,
        faults,
        vol,
        write_delay,
        read_delay,
        reads_waiting,
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed))
        .collect()
}

fn read(vol: &Volume, offset: u64, len: usize) -> Result<Vec<u8>, VolumeError> {
    let mut b = vec![0u8; len];
    vol.read(offset, &mut b).map(|()| b)
}

#[test]
fn never_written_blocks_read_as_zeros_without_disk_io() {
    let r = rig(16 << 20, 64 << 10);
    let before: u64 = r.mems.iter().map(|m| m.stats().ops()).sum();
    assert_eq!(read(&r.vol, 12345, 1 << 20).unwrap(), vec![0u8; 1 << 20]);
    let after: u64 = r.mems.iter().map(|m| m.stats().ops()).sum();
    assert_eq!(before, after, "a thin read touched the disks");
    assert_eq!(
        r.vol.block_status(0, 16 << 20).unwrap(),
        vec![Extent {
            len: 16 << 20,
            hole: true
        }]
    );
}

#[test]
fn unaligned_writes_read_back_from_journal_and_from_stripes() {
    let r = rig(16 << 20, 64 << 10);
    let a = pattern(1, 100_000);
    r.vol.write(777, &a, false).unwrap();
    let b = pattern(2, 5000);
    r.vol.write(50_000, &b, false).unwrap();
    let mut expect = vec![0u8; 200_000];
    expect[777..777 + a.len()].copy_from_slice(&a);
    expect[50_000..55_000].copy_from_slice(&b);
    assert_eq!(
        read(&r.vol, 0, 200_000).unwrap(),
        expect,
        "from the journal"
    );
    assert!(r.vol.destage().unwrap());
    assert_eq!(r.vol.journaled_blocks(), 0);
    assert_eq!(
        read(&r.vol, 0, 200_000).unwrap(),
        expect,
        "from the stripes"
    );
    let status = r.vol.block_status(0, 1 << 20).unwrap();
    assert_eq!(
        status,
        vec![
            Extent {
                len: 25 * 4096,
                hole: false
            },
            Extent {
                len: (1 << 20) - 25 * 4096,
                hole: true
            }
        ]
    );
}

#[test]
fn concurrent_writers_to_one_block_lose_no_bytes() {
    // Eight threads each own 1 KiB of the same two blocks and rewrite them repeatedly:
    // every read-modify-write must see the others' bytes. Writes are slowed down so that a
    // writer's journal append takes long enough for the others to try the same block meanwhile
    // (without the stripe lock, this loses bytes in every run).
    let r = rig(16 << 20, 64 << 10);
    r.write_delay.store(200, Ordering::SeqCst);
    let vol = r.vol.clone();
    let threads: Vec<_> = (0..8u8)
        .map(|t| {
            let vol = vol.clone();
            std::thread::spawn(move || {
                for round in 0..50u8 {
                    let v = vec![t.wrapping_mul(31).wrapping_add(round); 1024];
                    vol.write(u64::from(t) * 1024, &v, false).unwrap();
                    if round % 10 == 0 {
                        vol.destage().unwrap();
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let got = read(&vol, 0, 8192).unwrap();
    for t in 0..8u8 {
        let want = t.wrapping_mul(31).wrapping_add(49);
        assert!(
            got[usize::from(t) * 1024..(usize::from(t) + 1) * 1024]
                .iter()
                .all(|b| *b == want),
            "writer {t}'s bytes were lost"
        );
    }
}

#[test]
fn trim_reads_zeros_and_frees_space() {
    let r = rig(16 << 20, 64 << 10);
    let data = pattern(3, 8 << 20);
    r.vol.write(0, &data, true).unwrap();
    r.vol.destage().unwrap();
    let used_full: u64 = r.mems.iter().map(|m| m.stored_bytes()).sum();
    r.vol.trim(4096 + 10, (6 << 20) - 20).unwrap();
    let got = read(&r.vol, 0, 8 << 20).unwrap();
    assert_eq!(&got[..4096 + 10], &data[..4096 + 10]);
    assert!(
        got[4096 + 10..(6 << 20) + 4096 - 10]
            .iter()
            .all(|b| *b == 0)
    );
    assert_eq!(
        &got[(6 << 20) + 4096 - 10..],
        &data[(6 << 20) + 4096 - 10..]
    );
    r.vol.destage().unwrap();
    assert_eq!(
        read(&r.vol, 0, 8 << 20).unwrap(),
        got,
        "same content after destaging the trim"
    );
    let used_trimmed: u64 = r.mems.iter().map(|m| m.stored_bytes()).sum();
    assert!(
        used_trimmed < used_full - (6 << 20),
        "trim freed too little: {used_full} -> {used_trimmed}"
    );
}

#[test]
fn bit_rot_on_one_disk_is_detected_rebuilt_and_repaired() {
    let r = rig(16 << 20, 64 << 10);
    let data = pattern(4, 4 << 20);
    r.vol.write(0, &data, true).unwrap();
    r.vol.destage().unwrap();
    // Flip a bit in every sector one disk returns.
    r.faults[2].flip_bits(Trigger::always());
    assert_eq!(
        read(&r.vol, 0, 4 << 20).unwrap(),
        data,
        "rot returned as data"
    );
    let flips = r.faults[2].counts();
    assert!(flips.bit_flips > 0, "no rot injected: {flips:?}");
    let repaired = r
        .vol
        .stats
        .blocks_repaired
        .load(std::sync::atomic::Ordering::Relaxed);
    let rebuilt = r
        .vol
        .stats
        .blocks_reconstructed
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        rebuilt > 0 && repaired > 0,
        "rebuilt {rebuilt}, repaired {repaired}"
    );
    // Rot stored on the medium: tamper with a data block of disk 3, then read without faults.
    r.faults[2].clear();
    assert_eq!(read(&r.vol, 0, 4 << 20).unwrap(), data);
}

#[test]
fn any_two_disks_lost_reads_everything_three_gives_errors_never_garbage() {
    let r = rig(8 << 20, 64 << 10);
    let data = pattern(5, 8 << 20);
    r.vol.write(0, &data, true).unwrap();
    r.vol.destage().unwrap();
    for a in 0..6 {
        for b in a + 1..6 {
            r.faults[a].set_gone(true);
            r.faults[b].set_gone(true);
            assert_eq!(
                read(&r.vol, 0, 8 << 20).unwrap(),
                data,
                "disks {a} and {b} lost"
            );
            r.faults[a].set_gone(false);
            r.faults[b].set_gone(false);
        }
    }
    r.faults[0].set_gone(true);
    r.faults[1].set_gone(true);
    r.faults[2].set_gone(true);
    let mut errors = 0;
    for blk in 0..(8 << 20) / BS {
        match read(&r.vol, (blk * BS) as u64, BS) {
            Ok(b) => assert_eq!(
                b,
                data[blk * BS..(blk + 1) * BS],
                "block {blk} returned wrong data"
            ),
            Err(VolumeError::Unrecoverable { lba, .. }) => {
                assert_eq!(lba, blk as u64);
                errors += 1;
            }
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    // Three of six disks lost: every stripe has lost at least one data chunk... or not, when the
    // three hold parity and data it does not need. Some blocks must fail, none may be wrong.
    assert!(errors > 0, "three lost disks went unnoticed");
}

#[test]
fn writes_reach_every_journal_replica_and_survive_losing_m_of_them() {
    let r = rig(16 << 20, 64 << 10);
    let data = pattern(6, 1 << 20);
    r.vol.write(4096, &data, true).unwrap();
    // Not destaged: the only copies are the journal's. Lose two disks, reopen nothing, read.
    let mut survivors = 0;
    for a in 0..6 {
        for b in a + 1..6 {
            r.faults[a].set_gone(true);
            r.faults[b].set_gone(true);
            if read(&r.vol, 4096, 1 << 20).ok().as_deref() == Some(&data[..]) {
                survivors += 1;
            }
            r.faults[a].set_gone(false);
            r.faults[b].set_gone(false);
        }
    }
    assert_eq!(survivors, 15, "some pair of lost disks lost journaled data");
}

#[test]
fn destaging_writes_only_the_touched_rows_and_parity_still_rebuilds_every_block() {
    // 64 KiB chunks: 16 rows per chunk. Fill stripe 0, then rewrite rows 0 and 15 of chunk 0.
    let r = rig(16 << 20, 64 << 10);
    let stripe = 256 << 10;
    let mut data = pattern(9, stripe);
    r.vol.write(0, &data, true).unwrap();
    r.vol.destage().unwrap();
    for row in [0usize, 15] {
        let new = pattern(100 + row as u8, BS);
        r.vol.write((row * BS) as u64, &new, true).unwrap();
        data[row * BS..(row + 1) * BS].copy_from_slice(&new);
    }
    let written = |r: &Rig| r.mems.iter().map(|m| m.stats().bytes_written).sum::<u64>();
    let before = written(&r);
    assert!(r.vol.destage().unwrap());
    let bytes = written(&r) - before;
    // Two data blocks and one metadata page on chunk 0; two parity blocks and one metadata page
    // on each parity chunk; the checkpoint page on three journal disks: 48 KiB. Writing the
    // parity of every row between the two (as a range) would be 2 × 64 KiB of parity alone.
    assert_eq!(bytes, 48 << 10, "destage wrote {bytes} bytes");
    assert_eq!(read(&r.vol, 0, stripe).unwrap(), data);
    // The untouched rows' parity on the disks still matches their data: any two disks lost.
    for a in 0..6 {
        for b in a + 1..6 {
            r.faults[a].set_gone(true);
            r.faults[b].set_gone(true);
            assert_eq!(
                read(&r.vol, 0, stripe).unwrap(),
                data,
                "disks {a} and {b} lost"
            );
            r.faults[a].set_gone(false);
            r.faults[b].set_gone(false);
        }
    }
}

#[test]
fn a_whole_stripe_into_an_empty_stripe_is_written_once_without_the_journal() {
    // 64 KiB chunks: a slot is 64 KiB of blocks and one metadata page.
    let r = rig(16 << 20, 64 << 10);
    let stripe = 256 << 10;
    let slot = (64 + 4) << 10;
    let written = |r: &Rig| r.mems.iter().map(|m| m.stats().bytes_written).sum::<u64>();
    let fresh = |r: &Rig| r.vol.stats.fresh_stripe_writes.load(Ordering::Relaxed);

    // Stripe 1 is empty: its six slots, and one skip page on each of the three journal disks
    // for the write's sequence number. Through the journal it would be 3 × (256 + 4) KiB first.
    let a = pattern(1, stripe);
    let before = written(&r);
    r.vol.write(stripe as u64, &a, false).unwrap();
    assert_eq!(written(&r) - before, 6 * slot + 3 * BS as u64);
    assert_eq!(fresh(&r), 1);
    assert_eq!(r.vol.journaled_blocks(), 0);
    // It now holds data: the next whole-stripe write to it goes through the journal.
    let b = pattern(2, stripe);
    r.vol.write(stripe as u64, &b, false).unwrap();
    assert_eq!(fresh(&r), 1);
    assert_eq!(r.vol.journaled_blocks(), 64);
    // So does a stripe with journaled blocks, and a write that covers a stripe only in part.
    r.vol
        .write((2 * stripe) as u64, &pattern(3, BS), false)
        .unwrap();
    r.vol
        .write((2 * stripe) as u64, &pattern(4, stripe), false)
        .unwrap();
    r.vol
        .write((3 * stripe + BS) as u64, &pattern(5, stripe), false)
        .unwrap();
    assert_eq!(fresh(&r), 1);
    // Trimmed whole and destaged, stripe 1 is empty again.
    r.vol.trim(stripe as u64, stripe as u64).unwrap();
    r.vol.destage().unwrap();
    r.vol.write(stripe as u64, &a, true).unwrap();
    assert_eq!(fresh(&r), 2);
    r.vol.destage().unwrap();

    // What the stripe holds: the blocks, their tags and the parity of both, on every disk.
    assert_eq!(read(&r.vol, stripe as u64, stripe).unwrap(), a);
    for x in 0..6 {
        for y in x + 1..6 {
            r.faults[x].set_gone(true);
            r.faults[y].set_gone(true);
            assert_eq!(
                read(&r.vol, stripe as u64, stripe).unwrap(),
                a,
                "disks {x} and {y} lost"
            );
            r.faults[x].set_gone(false);
            r.faults[y].set_gone(false);
        }
    }
    // Rot in any one chunk of it is found by the tags and rebuilt.
    for f in &r.faults {
        f.flip_bits(Trigger::always().times(1));
        assert_eq!(read(&r.vol, stripe as u64, stripe).unwrap(), a);
        f.flip_bits(Trigger::never());
    }
    assert!(r.vol.stats.blocks_reconstructed.load(Ordering::Relaxed) >= 4 * 16);
}

#[test]
fn writes_during_destaging_rounds_are_neither_lost_nor_reordered() {
    // Writers keep rewriting their blocks (each write carries its version) while rounds run, so
    // rounds meet stripes whose newest blocks are not durable yet and defer them.
    let r = rig(8 << 20, 64 << 10);
    let writers = 4u64;
    let versions = 40u64;
    let blocks_per_writer = 24u64;
    let stop = std::sync::atomic::AtomicBool::new(false);
    let rounds = std::sync::atomic::AtomicU64::new(0);
    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                r.vol.destage().unwrap();
                rounds.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        });
        let handles: Vec<_> = (0..writers)
            .map(|w| {
                let vol = &r.vol;
                s.spawn(move || {
                    for v in 1..=versions {
                        for i in 0..blocks_per_writer {
                            // Blocks of all writers interleave over every stripe of the volume.
                            let lba = (i * writers + w) * 83 % 2048;
                            let mut b = vec![0u8; BS];
                            b[..8].copy_from_slice(&lba.to_le_bytes());
                            b[8..16].copy_from_slice(&v.to_le_bytes());
                            vol.write(lba * BS as u64, &b, v % 8 == 0).unwrap();
                        }
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    assert!(rounds.load(std::sync::atomic::Ordering::Relaxed) > 1);
    let check = |r: &Rig, what: &str| {
        for w in 0..writers {
            for i in 0..blocks_per_writer {
                let lba = (i * writers + w) * 83 % 2048;
                let b = read(&r.vol, lba * BS as u64, BS).unwrap();
                assert_eq!(
                    b[..8],
                    lba.to_le_bytes(),
                    "{what}: block {lba} holds another block"
                );
                assert_eq!(
                    u64::from_le_bytes(b[8..16].try_into().unwrap()),
                    versions,
                    "{what}: block {lba} is not at its last version"
                );
            }
        }
    };
    check(&r, "before the last round");
    r.vol.destage().unwrap();
    assert_eq!(r.vol.journaled_blocks(), 0);
    check(&r, "destaged");
    r.faults[0].set_gone(true);
    r.faults[3].set_gone(true);
    check(&r, "two disks lost");
}

#[test]
fn small_aligned_writes_are_taken_now_and_read_back_like_any_write() {
    let r = rig(16 << 20, 64 << 10);
    let stripe = 4 * (64u64 << 10);
    let a = pattern(1, BS);
    let b = pattern(2, 64 << 10);
    assert!(matches!(r.vol.try_write_now(0, &a), Some(Ok(()))));
    assert!(matches!(
        r.vol.try_write_now(stripe + 8 * BS as u64, &b),
        Some(Ok(()))
    ));
    // Declined, with nothing written: part of a block (it needs a read), more than 64 KiB,
    // across two stripes.
    let elsewhere = 8 * stripe;
    for (at, len) in [
        (elsewhere + 100, BS),
        (elsewhere, (64 << 10) + BS),
        (elsewhere + stripe - BS as u64, 2 * BS),
    ] {
        assert!(
            r.vol.try_write_now(at, &pattern(3, len)).is_none(),
            "{len} bytes at {at} taken"
        );
    }
    assert_eq!(
        read(&r.vol, elsewhere, 2 * stripe as usize).unwrap(),
        vec![0; 2 * stripe as usize]
    );
    // Answered at once: out of range, and nothing to write.
    assert!(matches!(
        r.vol.try_write_now(16 << 20, &a),
        Some(Err(VolumeError::OutOfRange { .. }))
    ));
    assert!(matches!(r.vol.try_write_now(0, &[]), Some(Ok(()))));
    assert_eq!(r.vol.journaled_blocks(), 17);

    let check = |what: &str| {
        assert_eq!(read(&r.vol, 0, BS).unwrap(), a, "{what}");
        assert_eq!(
            read(&r.vol, stripe + 8 * BS as u64, 64 << 10).unwrap(),
            b,
            "{what}"
        );
    };
    check("from the journal");
    assert!(r.vol.destage().unwrap());
    assert_eq!(r.vol.journaled_blocks(), 0);
    check("from the stripes");

    // A disk that makes writes wait: declined.
    r.write_delay.store(1, Ordering::SeqCst);
    assert!(r.vol.try_write_now(0, &pattern(4, BS)).is_none());
    r.write_delay.store(0, Ordering::SeqCst);
    check("after a declined write");

    // A whole stripe (16 KiB with 4 KiB chunks) may skip the journal: declined, so that
    // `write` decides; less than a stripe is taken.
    let small = rig(1 << 20, 4096);
    assert!(small.vol.try_write_now(0, &pattern(5, 4 * BS)).is_none());
    assert!(matches!(
        small.vol.try_write_now(0, &pattern(5, 3 * BS)),
        Some(Ok(()))
    ));
    assert_eq!(read(&small.vol, 0, 3 * BS).unwrap(), pattern(5, 3 * BS));
}

#[test]
fn a_write_now_declines_a_stripe_being_destaged_instead_of_waiting() {
    let r = rig(16 << 20, 64 << 10);
    let stripe = 4 * (64u64 << 10);
    r.vol.write(0, &pattern(1, BS), false).unwrap();
    assert!(r.vol.destage().unwrap());
    // Block 16 shares row 0 with block 0: destaging it reads block 0 back, slowly, with the
    // stripe locked.
    r.vol.write(16 * BS as u64, &pattern(2, BS), false).unwrap();
    r.read_delay.store(300_000, Ordering::SeqCst);
    let vol = r.vol.clone();
    let destager = std::thread::spawn(move || vol.destage());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while r.reads_waiting.load(Ordering::SeqCst) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the destager never read"
        );
        std::thread::yield_now();
    }
    assert!(
        r.vol
            .try_write_now(32 * BS as u64, &pattern(3, BS))
            .is_none(),
        "a write into the stripe being destaged was taken"
    );
    assert!(
        matches!(r.vol.try_write_now(stripe, &pattern(4, BS)), Some(Ok(()))),
        "another stripe was held up"
    );
    assert!(destager.join().unwrap().unwrap());
    r.read_delay.store(0, Ordering::SeqCst);
    assert!(matches!(
        r.vol.try_write_now(32 * BS as u64, &pattern(3, BS)),
        Some(Ok(()))
    ));
    for (at, seed) in [
        (0, 1),
        (16 * BS as u64, 2),
        (32 * BS as u64, 3),
        (stripe, 4),
    ] {
        assert_eq!(read(&r.vol, at, BS).unwrap(), pattern(seed, BS));
    }
}
