//! FaultDisk injects exactly the faults it is told to, counts them, and leaves the rest alone.

use std::path::Path;
use std::sync::Arc;

use shardvol::disk::{
    self, Disk, DiskError, DiskOptions, FaultDisk, InlineDisk, IoOp, MemDisk, Trigger, UringDisk,
};

fn setup(size: u64) -> (Arc<MemDisk>, FaultDisk) {
    let mem = Arc::new(MemDisk::new("inner", size));
    let fault = FaultDisk::with_seed(mem.clone(), 1);
    (mem, fault)
}

#[test]
fn fails_exactly_n_writes_and_writes_nothing_for_them() {
    let (mem, d) = setup(1 << 20);
    let h = d.handle();
    h.fail_writes(Trigger::always().times(3));
    let results: Vec<bool> = (0..10u64)
        .map(|i| disk::write_at(&d, i * 4096, &[i as u8 + 1; 4096]).is_ok())
        .collect();
    assert_eq!(
        results,
        [
            false, false, false, true, true, true, true, true, true, true
        ]
    );
    assert_eq!(h.counts().write_errors, 3);
    assert_eq!(h.counts().errors(), 3);
    assert_eq!(
        mem.stats().writes,
        7,
        "failed writes never reach the inner disk"
    );
    assert!(mem.read_bytes(0, 3 * 4096).iter().all(|&b| b == 0));
    assert!(mem.read_bytes(3 * 4096, 4096).iter().all(|&b| b == 4));
    let e = disk::write_at(&d, 0, &[0; 512]);
    assert!(e.is_ok(), "the trigger is spent");
}

#[test]
fn range_trigger_hits_only_overlapping_ops() {
    let (_mem, d) = setup(1 << 20);
    let h = d.handle();
    h.fail_reads(Trigger::range(4096..8192));
    assert!(disk::read_at(&d, 0, 4096).is_ok());
    assert!(disk::read_at(&d, 8192, 4096).is_ok());
    let e = disk::read_at(&d, 6144, 512).unwrap_err();
    assert!(
        matches!(&e, DiskError::Injected { disk, op: "read", offset: 6144 } if disk == "inner"),
        "{e}"
    );
    assert!(
        disk::read_at(&d, 0, 16384).is_err(),
        "a read spanning the range fails"
    );
    assert!(disk::read_at(&d, 4096, 512).is_err());
    assert!(
        disk::write_at(&d, 4096, &[1; 512]).is_ok(),
        "writes are not affected"
    );
    assert_eq!(h.counts().read_errors, 3);
    h.clear();
    assert!(disk::read_at(&d, 4096, 4096).is_ok());
    assert_eq!(h.counts().read_errors, 3, "counters survive clear");
}

#[test]
fn probability_trigger_counts_what_it_injects() {
    let (_mem, d) = setup(1 << 20);
    let h = d.handle();
    h.reseed(77);
    h.fail_reads(Trigger::probability(0.3));
    let failed = (0..1000u64)
        .filter(|i| disk::read_at(&d, i % 256 * 4096, 4096).is_err())
        .count() as u64;
    assert_eq!(failed, h.counts().read_errors);
    assert!(
        (220..380).contains(&failed),
        "{failed} of 1000 failed at p = 0.3"
    );
    // The same seed gives the same faults.
    h.reseed(77);
    let again = (0..1000u64)
        .filter(|i| disk::read_at(&d, i % 256 * 4096, 4096).is_err())
        .count() as u64;
    assert_eq!(again, failed);
}

#[test]
fn bit_flips_are_counted_confined_to_the_range_and_not_stored() {
    let (mem, d) = setup(1 << 20);
    let data: Vec<u8> = (0..16384u32).map(|i| (i * 7) as u8).collect();
    disk::write_at(&d, 0, &data).unwrap();
    let h = d.handle();
    // The range covers sectors 3..=9 partially at both ends: 7 sectors.
    h.flip_bits(Trigger::always().within(1600..5000));
    let got = disk::read_at(&d, 0, 16384).unwrap();
    let mut flipped = Vec::new();
    for (i, (a, b)) in got.iter().zip(&data).enumerate() {
        for bit in 0..8 {
            if (a ^ b) >> bit & 1 == 1 {
                flipped.push(i);
            }
        }
    }
    assert_eq!(flipped.len() as u64, h.counts().bit_flips);
    assert_eq!(
        flipped.len(),
        7,
        "one bit per sector overlapping the range: {flipped:?}"
    );
    assert!(
        flipped.iter().all(|&i| (1600..5000).contains(&i)),
        "{flipped:?}"
    );
    let sectors: Vec<usize> = flipped.iter().map(|i| i / 512).collect();
    assert_eq!(sectors, [3, 4, 5, 6, 7, 8, 9]);
    assert_eq!(mem.read_bytes(0, 16384), data, "the disk itself is intact");
    // Reads outside the range are clean.
    assert!(disk::read_at(&d, 8192, 8192).unwrap()[..] == data[8192..]);
    assert_eq!(h.counts().bit_flips, 7);
}

#[test]
fn gone_fails_everything_until_reinserted() {
    let (mem, d) = setup(1 << 20);
    let h = d.handle();
    disk::write_at(&d, 0, &[5; 512]).unwrap();
    h.set_gone(true);
    assert!(matches!(disk::read_at(&d, 0, 512), Err(DiskError::Gone { disk }) if disk == "inner"));
    assert!(matches!(disk::sync(&d), Err(DiskError::Gone { .. })));
    assert!(matches!(
        d.submit(vec![IoOp::write(0, &[1; 512]), IoOp::Sync]).wait(),
        Err(DiskError::Gone { .. })
    ));
    assert_eq!(h.counts().gone_batches, 3);
    assert_eq!(mem.stats().batches, 1, "a gone disk passes nothing on");
    h.set_gone(false);
    assert_eq!(disk::read_at(&d, 0, 512).unwrap()[..], [5; 512]);
}

#[test]
fn injected_fault_fails_the_batch_but_other_ops_run() {
    let (mem, d) = setup(1 << 20);
    let h = d.handle();
    h.fail_writes(Trigger::range(0..4096));
    h.fail_syncs(Trigger::always().times(1));
    let r = d
        .submit(vec![
            IoOp::write(8192, &[2; 4096]),
            IoOp::write(0, &[1; 4096]),
            IoOp::Sync,
        ])
        .wait();
    assert!(
        matches!(
            r,
            Err(DiskError::Injected {
                op: "write",
                offset: 0,
                ..
            })
        ),
        "{r:?}"
    );
    assert_eq!(
        mem.read_bytes(8192, 4096),
        vec![2; 4096],
        "the healthy write landed"
    );
    assert_eq!(mem.read_bytes(0, 4096), vec![0; 4096]);
    assert_eq!(mem.stats().syncs, 0, "the failed sync was not passed on");
    assert!(disk::sync(&d).is_ok());
    let c = h.counts();
    assert_eq!((c.write_errors, c.sync_errors, c.read_errors), (1, 1, 0));
}

#[test]
fn works_over_an_async_backend() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d");
    disk::create_file(&path, 1 << 20).unwrap();
    works_over(
        Arc::new(UringDisk::open(Path::new(&path), &DiskOptions::default()).unwrap()),
        "io_uring",
    );
}

#[test]
fn works_over_the_inline_backend() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d");
    disk::create_file(&path, 1 << 20).unwrap();
    works_over(
        Arc::new(InlineDisk::open(Path::new(&path), &DiskOptions::default()).unwrap()),
        "inline",
    );
}

fn works_over(inner: Arc<dyn Disk>, backend: &str) {
    let d = FaultDisk::new(inner);
    let h = d.handle();
    disk::write_at(&d, 0, &[0x11; 8192]).unwrap();
    h.flip_bits(Trigger::always().times(1));
    h.fail_discards(Trigger::always());
    let got = disk::read_at(&d, 0, 8192).unwrap();
    assert_eq!(
        got.iter().map(|b| (b ^ 0x11).count_ones()).sum::<u32>(),
        16,
        "one bit in each of 16 sectors"
    );
    assert!(
        disk::read_at(&d, 0, 8192)
            .unwrap()
            .iter()
            .all(|&b| b == 0x11)
    );
    assert!(matches!(
        disk::discard(&d, 0, 4096),
        Err(DiskError::Injected { op: "discard", .. })
    ));
    // Dropping a wrapped Pending in flight is as safe as dropping the inner one.
    for i in 0..100u64 {
        drop(d.submit(vec![
            IoOp::read(i % 16 * 4096, 4096),
            IoOp::write(65536 + i % 16 * 4096, &[i as u8; 4096]),
        ]));
    }
    assert_eq!(h.counts().discard_errors, 1);
    assert_eq!(d.backend(), "fault");
    assert_eq!(d.inner().backend(), backend);
}
