//! File backends (io_uring, pread and inline) against real files: round trips, mixed batches,
//! concurrency, invalid ops, discard, agreement between backends, dropped `Pending`s.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, RngExt, SeedableRng};
use shardvol::disk::{
    self, Backend, Disk, DiskError, DiskOptions, DiskRef, InlineDisk, IoBuf, IoOp, MemDisk,
    PreadDisk, UringDisk, create_file, open_disk, uring_available,
};

const MIB: u64 = 1 << 20;

#[derive(Clone, Copy, Debug)]
enum Which {
    Uring,
    Pread,
    Inline,
}

const ALL: [Which; 3] = [Which::Uring, Which::Pread, Which::Inline];

fn open(which: Which, path: &Path, opts: &DiskOptions) -> DiskRef {
    match which {
        Which::Uring => Arc::new(
            UringDisk::open(path, opts).expect("io_uring disk (is io_uring allowed here?)"),
        ),
        Which::Pread => Arc::new(PreadDisk::open(path, opts).expect("pread disk")),
        Which::Inline => Arc::new(InlineDisk::open(path, opts).expect("inline disk")),
    }
}

/// A fresh sparse file of `size` bytes in its own temporary directory.
fn new_file(size: u64) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("disk0");
    create_file(&path, size).expect("create_file");
    (dir, path)
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    SmallRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

fn round_trip(which: Which, direct: bool) {
    let (_dir, path) = new_file(8 * MIB);
    let opts = DiskOptions {
        direct,
        ..DiskOptions::default()
    };
    let d = open(which, &path, &opts);
    assert_eq!(d.size(), 8 * MIB);
    assert_eq!(d.name(), path.display().to_string());
    // Sizes from one sector to more than one max_io_bytes transfer, at varied offsets.
    let cases = [
        (0u64, 512usize),
        (4096, 4096),
        (512 * 17, 64 << 10),
        (2 * MIB, (1 << 20) + 512 * 3),
        (8 * MIB - 512, 512),
    ];
    for (i, &(off, len)) in cases.iter().enumerate() {
        disk::write_at(&*d, off, &pattern(i as u64, len)).unwrap();
    }
    disk::sync(&*d).unwrap();
    for (i, &(off, len)) in cases.iter().enumerate() {
        let got = disk::read_at(&*d, off, len).unwrap();
        assert!(
            got[..] == pattern(i as u64, len)[..],
            "{which:?} direct={direct}: case {i} differs"
        );
    }
    // Never-written space reads as zeros.
    assert!(
        disk::read_at(&*d, 5 * MIB, 8192)
            .unwrap()
            .iter()
            .all(|&b| b == 0)
    );
    drop(d);
    // And the bytes really are in the file.
    let file = std::fs::read(&path).unwrap();
    for (i, &(off, len)) in cases.iter().enumerate() {
        assert!(
            file[off as usize..off as usize + len] == pattern(i as u64, len)[..],
            "file case {i}"
        );
    }
}

#[test]
fn uring_round_trip() {
    round_trip(Which::Uring, false);
}

#[test]
fn uring_round_trip_o_direct() {
    round_trip(Which::Uring, true);
}

#[test]
fn pread_round_trip() {
    round_trip(Which::Pread, false);
}

#[test]
fn pread_round_trip_o_direct() {
    round_trip(Which::Pread, true);
}

#[test]
fn inline_round_trip() {
    round_trip(Which::Inline, false);
}

#[test]
fn inline_round_trip_o_direct() {
    round_trip(Which::Inline, true);
}

#[test]
fn mixed_batch_reads_writes_sync() {
    for which in ALL {
        let (_dir, path) = new_file(4 * MIB);
        let d = open(which, &path, &DiskOptions::default());
        disk::write_at(&*d, 0, &pattern(100, 64 << 10)).unwrap();
        // One batch: writes to new places, reads of older data, a sync, a discard, in a mix.
        let batch = vec![
            IoOp::write(MIB, &pattern(1, 8192)),
            IoOp::read(0, 4096),
            IoOp::Sync,
            IoOp::write(2 * MIB, &pattern(2, 512)),
            IoOp::read(4096, 60 << 10),
            IoOp::Discard {
                offset: 3 * MIB,
                len: 65536,
            },
            IoOp::read(0, 0),
        ];
        let ops = d.submit(batch).wait().unwrap();
        let kinds: Vec<&str> = ops.iter().map(IoOp::name).collect();
        assert_eq!(
            kinds,
            ["write", "read", "sync", "write", "read", "discard", "read"],
            "{which:?}"
        );
        let old = pattern(100, 64 << 10);
        assert!(ops[1].buf().unwrap()[..] == old[..4096]);
        assert!(ops[4].buf().unwrap()[..] == old[4096..]);
        assert!(
            ops[0].buf().unwrap()[..] == pattern(1, 8192)[..],
            "write buffers come back untouched"
        );
        // The next batch sees the writes of the previous one.
        let ops = d
            .submit(vec![
                IoOp::read(MIB, 8192),
                IoOp::read(2 * MIB, 512),
                IoOp::Sync,
            ])
            .wait()
            .unwrap();
        assert!(
            ops[0].buf().unwrap()[..] == pattern(1, 8192)[..],
            "{which:?}"
        );
        assert!(
            ops[1].buf().unwrap()[..] == pattern(2, 512)[..],
            "{which:?}"
        );
    }
}

#[test]
fn transfers_split_and_continued() {
    // max_io_bytes of one page forces every large op through the continuation path that also
    // serves short reads and writes.
    for which in ALL {
        let (_dir, path) = new_file(4 * MIB);
        let opts = DiskOptions {
            max_io_bytes: 4096,
            ..DiskOptions::default()
        };
        let d = open(which, &path, &opts);
        let data = pattern(7, (MIB + 1536) as usize);
        disk::write_at(&*d, 512, &data).unwrap();
        assert!(
            disk::read_at(&*d, 512, data.len()).unwrap()[..] == data[..],
            "{which:?}"
        );
        drop(d);
        let file = std::fs::read(&path).unwrap();
        assert!(
            file[512..512 + data.len()] == data[..],
            "{which:?}: file content"
        );
    }
}

/// Several threads submit batches of writes and reads to disjoint regions of one disk and check
/// every read against their own model; at the end the whole file must equal all models.
fn concurrent(which: Which) {
    const THREADS: u64 = 4;
    const BLOCKS: u64 = 64; // 4 KiB blocks per thread
    let (_dir, path) = new_file(THREADS * BLOCKS * 4096);
    let d = open(which, &path, &DiskOptions::default());
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let d = d.clone();
            std::thread::spawn(move || {
                let mut rng = SmallRng::seed_from_u64(t);
                let base = t * BLOCKS * 4096;
                let mut model: HashMap<u64, Vec<u8>> = HashMap::new();
                for round in 0..150 {
                    let n = rng.random_range(1..=8usize);
                    let mut blocks: Vec<u64> =
                        (0..n).map(|_| rng.random_range(0..BLOCKS)).collect();
                    blocks.sort_unstable();
                    blocks.dedup();
                    // Half the blocks are written, the others read (never both in one batch).
                    let mut ops = Vec::new();
                    let mut expect = Vec::new();
                    for &b in &blocks {
                        if rng.random_bool(0.5) {
                            let data = pattern(t << 32 | round << 8 | b, 4096);
                            ops.push(IoOp::write(base + b * 4096, &data));
                            model.insert(b, data);
                            expect.push(None);
                        } else {
                            ops.push(IoOp::read(base + b * 4096, 4096));
                            expect.push(Some(
                                model.get(&b).cloned().unwrap_or_else(|| vec![0; 4096]),
                            ));
                        }
                    }
                    if round % 16 == 0 {
                        ops.push(IoOp::Sync);
                        expect.push(None);
                    }
                    let done = d.submit(ops).wait().unwrap();
                    for (op, want) in done.iter().zip(&expect) {
                        if let (IoOp::Read { offset, buf }, Some(want)) = (op, want) {
                            assert!(
                                buf[..] == want[..],
                                "thread {t} round {round}: read at {offset} differs"
                            );
                        }
                    }
                }
                (t, model)
            })
        })
        .collect();
    let models: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    drop(d);
    let file = std::fs::read(&path).unwrap();
    for (t, model) in models {
        for b in 0..BLOCKS {
            let at = ((t * BLOCKS + b) * 4096) as usize;
            let want = model.get(&b).cloned().unwrap_or_else(|| vec![0; 4096]);
            assert!(
                file[at..at + 4096] == want[..],
                "{which:?}: thread {t} block {b}"
            );
        }
    }
}

#[test]
fn uring_concurrent_submitters() {
    concurrent(Which::Uring);
}

#[test]
fn pread_concurrent_submitters() {
    concurrent(Which::Pread);
}

#[test]
fn inline_concurrent_submitters() {
    concurrent(Which::Inline);
}

fn check_invalid(d: &dyn Disk) {
    let size = d.size();
    let e = d.submit(vec![IoOp::read(100, 512)]).wait().unwrap_err();
    assert!(
        matches!(e, DiskError::Unaligned { .. }),
        "{}: {e}",
        d.backend()
    );
    let e = d
        .submit(vec![IoOp::write(0, &[1; 1000])])
        .wait()
        .unwrap_err();
    assert!(
        matches!(e, DiskError::Unaligned { .. }),
        "{}: {e}",
        d.backend()
    );
    let e = d
        .submit(vec![IoOp::Discard {
            offset: 0,
            len: 100,
        }])
        .wait()
        .unwrap_err();
    assert!(
        matches!(e, DiskError::Unaligned { .. }),
        "{}: {e}",
        d.backend()
    );
    let e = d.submit(vec![IoOp::read(size, 512)]).wait().unwrap_err();
    assert!(
        matches!(e, DiskError::OutOfRange { .. }),
        "{}: {e}",
        d.backend()
    );
    let e = d
        .submit(vec![IoOp::read(size - 512, 1024)])
        .wait()
        .unwrap_err();
    assert!(
        matches!(e, DiskError::OutOfRange { .. }),
        "{}: {e}",
        d.backend()
    );
    let e = d
        .submit(vec![IoOp::Discard {
            offset: u64::MAX - 511,
            len: 1024,
        }])
        .wait()
        .unwrap_err();
    assert!(
        matches!(e, DiskError::OutOfRange { .. }),
        "{}: {e}",
        d.backend()
    );
    assert_eq!(e.disk(), d.name());
    // A batch with one bad op is refused whole: its valid write does not happen.
    let e = d
        .submit(vec![IoOp::write(0, &[9; 512]), IoOp::read(size, 512)])
        .wait()
        .unwrap_err();
    assert!(matches!(e, DiskError::OutOfRange { .. }));
    assert!(
        disk::read_at(d, 0, 512).unwrap().iter().all(|&b| b == 0),
        "{}: refused batch wrote",
        d.backend()
    );
    // The convenience functions report the same errors.
    assert!(disk::read_at(d, 512, 100).is_err());
    assert!(disk::write_at(d, size, &[0; 512]).is_err());
    assert!(disk::discard(d, 3, 512).is_err());
}

#[test]
fn invalid_ops_are_errors_on_every_backend() {
    let (_dir, path) = new_file(MIB);
    for which in ALL {
        check_invalid(&*open(which, &path, &DiskOptions::default()));
    }
    check_invalid(&MemDisk::new("mem", MIB));
    check_invalid(&disk::FaultDisk::new(Arc::new(MemDisk::new("mem", MIB))));
}

#[test]
fn io_error_reports_the_first_failed_op_after_running_the_others() {
    // A file cut short behind the disk's back: reads past its new end see end-of-file, which
    // must come back as an error of the right op, not as a panic or as zeros.
    for which in ALL {
        let (_dir, path) = new_file(MIB);
        let d = open(which, &path, &DiskOptions::default());
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(MIB / 2)
            .unwrap();
        let batch = vec![
            IoOp::write(0, &pattern(5, 4096)),
            IoOp::read(MIB / 2 + 8192, 4096),
            IoOp::write(8192, &pattern(6, 4096)),
            IoOp::read(MIB - 4096, 4096),
        ];
        let e = d.submit(batch).wait().unwrap_err();
        match &e {
            DiskError::Io {
                op: "read",
                offset,
                source,
                ..
            } => {
                assert_eq!(
                    *offset,
                    MIB / 2 + 8192,
                    "{which:?}: the lowest-indexed failure is reported"
                );
                assert_eq!(
                    source.kind(),
                    std::io::ErrorKind::UnexpectedEof,
                    "{which:?}"
                );
            }
            other => panic!("{which:?}: {other}"),
        }
        assert_eq!(e.disk(), d.name());
        // The batch's other ops still ran.
        assert!(
            disk::read_at(&*d, 0, 4096).unwrap()[..] == pattern(5, 4096)[..],
            "{which:?}"
        );
        assert!(
            disk::read_at(&*d, 8192, 4096).unwrap()[..] == pattern(6, 4096)[..],
            "{which:?}"
        );
    }
}

fn blocks(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks()
}

#[test]
fn discard_reads_zeros_and_frees_blocks() {
    for which in ALL {
        let (_dir, path) = new_file(8 * MIB);
        let d = open(which, &path, &DiskOptions::default());
        assert_eq!(blocks(&path), 0, "create_file makes a sparse file");
        disk::write_at(&*d, 0, &pattern(3, 4 * MIB as usize)).unwrap();
        disk::sync(&*d).unwrap();
        let full = blocks(&path);
        assert!(
            full >= 4 * MIB / 512,
            "{which:?}: {full} blocks after writing 4 MiB"
        );
        // Discard 3 MiB in the middle, sector-aligned but not page-aligned at the start.
        disk::discard(&*d, MIB - 512, 3 * MIB).unwrap();
        let got = disk::read_at(&*d, 0, 4 * MIB as usize).unwrap();
        let want = pattern(3, 4 * MIB as usize);
        assert!(
            got[..(MIB - 512) as usize] == want[..(MIB - 512) as usize],
            "{which:?}: before the range"
        );
        assert!(
            got[(MIB - 512) as usize..(4 * MIB - 512) as usize]
                .iter()
                .all(|&b| b == 0),
            "{which:?}: zeros"
        );
        assert!(
            got[(4 * MIB - 512) as usize..] == want[(4 * MIB - 512) as usize..],
            "{which:?}: after the range"
        );
        let after = blocks(&path);
        assert!(
            after <= full - (3 * MIB - 4096) / 512,
            "{which:?}: {full} blocks before, {after} after a 3 MiB discard"
        );
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            8 * MIB,
            "discard keeps the size"
        );
    }
}

#[test]
fn backends_give_identical_results() {
    for which in [Which::Uring, Which::Inline] {
        identical_to_pread(which);
    }
}

/// The same random batches on `which` and on pread leave the same reads and the same file.
fn identical_to_pread(which: Which) {
    let (_d1, p1) = new_file(4 * MIB);
    let (_d2, p2) = new_file(4 * MIB);
    let a = open(which, &p1, &DiskOptions::default());
    let b = open(Which::Pread, &p2, &DiskOptions::default());
    let mut rng = SmallRng::seed_from_u64(42);
    for round in 0..200u64 {
        let off = rng.random_range(0..(4 * MIB / 512 - 64)) * 512;
        let sectors = rng.random_range(1..=64usize);
        let batch = |rng: &mut SmallRng| match rng.random_range(0..10) {
            0 => vec![IoOp::Discard {
                offset: off,
                len: sectors as u64 * 512,
            }],
            1 => vec![IoOp::Sync],
            2..=4 => vec![IoOp::read(off, sectors * 512)],
            _ => vec![IoOp::write(off, &pattern(round, sectors * 512))],
        };
        let ops = batch(&mut rng);
        let ops2 = ops
            .iter()
            .map(|op| match op {
                IoOp::Read { offset, buf } => IoOp::read(*offset, buf.len()),
                IoOp::Write { offset, buf } => IoOp::write(*offset, buf),
                IoOp::Sync => IoOp::Sync,
                IoOp::Discard { offset, len } => IoOp::Discard {
                    offset: *offset,
                    len: *len,
                },
            })
            .collect();
        let (ra, rb) = (
            a.submit(ops).wait().unwrap(),
            b.submit(ops2).wait().unwrap(),
        );
        for (x, y) in ra.iter().zip(&rb) {
            assert_eq!(
                x.buf(),
                y.buf(),
                "{which:?} round {round}: {} differs",
                x.name()
            );
        }
    }
    drop((a, b));
    assert!(
        std::fs::read(&p1).unwrap() == std::fs::read(&p2).unwrap(),
        "{which:?}: files differ"
    );
}

/// Dropping a `Pending` before waiting must not let the kernel write into freed memory. Fill
/// the disk with 0xAB, start reads and drop their `Pending`s at once, and meanwhile allocate
/// buffers of the same size filled with 0x5C: if the backend had freed a read buffer early,
/// the allocator would hand it out again and the read would land in one of ours.
fn dropped_pending(which: Which) {
    const LEN: usize = 64 << 10;
    let (_dir, path) = new_file(4 * MIB);
    let opts = DiskOptions {
        direct: true,
        ..DiskOptions::default()
    };
    let d = open(which, &path, &opts);
    disk::write_at(&*d, 0, &vec![0xAB; 4 * MIB as usize]).unwrap();
    disk::sync(&*d).unwrap();
    let mut ours: Vec<IoBuf> = Vec::new();
    for i in 0..300u64 {
        let ops = (0..8)
            .map(|j| IoOp::read(((i * 8 + j) % 64) * LEN as u64, LEN))
            .collect();
        drop(d.submit(ops));
        for _ in 0..8 {
            let mut b = IoBuf::zeroed(LEN);
            b.fill(0x5C);
            ours.push(b);
        }
        if i % 50 == 0 {
            // A write batch dropped in flight must still land whole.
            drop(d.submit(vec![IoOp::write(
                3 * MIB + i / 50 * LEN as u64,
                &vec![i as u8; LEN],
            )]));
        }
    }
    // Dropping the disk waits for every op still in flight.
    drop(d);
    for (k, b) in ours.iter().enumerate() {
        assert!(
            b.iter().all(|&x| x == 0x5C),
            "{which:?}: buffer {k} was written by a dropped read"
        );
    }
    let file = std::fs::read(&path).unwrap();
    for k in 0..6 {
        let at = 3 * MIB as usize + k * LEN;
        assert!(
            file[at..at + LEN].iter().all(|&x| x == (k * 50) as u8),
            "{which:?}: dropped write {k} missing"
        );
    }
}

#[test]
fn uring_dropped_pending_is_safe() {
    for _ in 0..3 {
        dropped_pending(Which::Uring);
    }
}

#[test]
fn pread_dropped_pending_is_safe() {
    dropped_pending(Which::Pread);
}

#[test]
fn inline_dropped_pending_is_safe() {
    dropped_pending(Which::Inline);
}

#[test]
fn waiters_complete_when_disk_is_dropped() {
    for which in ALL {
        let (_dir, path) = new_file(4 * MIB);
        let d = open(which, &path, &DiskOptions::default());
        let pendings: Vec<_> = (0..32u64)
            .map(|i| d.submit(vec![IoOp::write(i * 65536, &[i as u8; 65536])]))
            .collect();
        drop(d);
        for p in pendings {
            p.wait().unwrap();
        }
        let file = std::fs::read(&path).unwrap();
        for i in 0..32usize {
            assert!(
                file[i * 65536..(i + 1) * 65536]
                    .iter()
                    .all(|&x| x == i as u8),
                "{which:?}: write {i}"
            );
        }
    }
}

#[test]
fn open_disk_chooses_backend() {
    let (_dir, path) = new_file(MIB);
    let pread = open_disk(
        &path,
        &DiskOptions {
            backend: Backend::Pread,
            ..DiskOptions::default()
        },
    )
    .unwrap();
    assert_eq!(pread.backend(), "pread");
    let inline = open_disk(
        &path,
        &DiskOptions {
            backend: Backend::Inline,
            ..DiskOptions::default()
        },
    )
    .unwrap();
    assert_eq!(inline.backend(), "inline");
    let uring = open_disk(
        &path,
        &DiskOptions {
            backend: Backend::Uring,
            ..DiskOptions::default()
        },
    );
    match uring_available() {
        Ok(()) => assert_eq!(uring.unwrap().backend(), "io_uring"),
        Err(reason) => {
            assert!(!reason.is_empty());
            assert!(
                uring.is_err(),
                "Backend::Uring must fail where io_uring is unavailable"
            );
        }
    }
    // Auto: inline for buffered I/O, io_uring (else pread) for O_DIRECT, unless the environment
    // says otherwise.
    let forced = std::env::var(disk::BACKEND_ENV)
        .ok()
        .and_then(|v| Backend::parse(&v));
    for direct in [false, true] {
        let auto = open_disk(
            &path,
            &DiskOptions {
                direct,
                ..DiskOptions::default()
            },
        )
        .unwrap();
        let want = match (forced, direct, uring_available()) {
            (Some(Backend::Pread), ..) => "pread",
            (Some(Backend::Inline), ..) => "inline",
            (Some(Backend::Uring), ..) => "io_uring",
            (_, false, _) => "inline",
            (_, true, Ok(())) => "io_uring",
            (_, true, Err(_)) => "pread",
        };
        assert_eq!(auto.backend(), want, "direct={direct}");
    }
    assert_eq!(Backend::parse("pread"), Some(Backend::Pread));
    assert_eq!(Backend::parse(" IO_URING "), Some(Backend::Uring));
    assert_eq!(Backend::parse("Inline"), Some(Backend::Inline));
    assert_eq!(Backend::parse("auto"), Some(Backend::Auto));
    assert_eq!(Backend::parse("spdk"), None);
    // A named disk uses its name in errors.
    let named = open_disk(
        &path,
        &DiskOptions {
            name: Some("disk-7".into()),
            ..DiskOptions::default()
        },
    )
    .unwrap();
    assert_eq!(
        disk::read_at(&*named, MIB, 512).unwrap_err().disk(),
        "disk-7"
    );
}

#[test]
fn open_disk_falls_back_when_a_ring_cannot_be_set_up() {
    // The kernel refuses rings of more than 32768 entries: the same path as a host that
    // refuses io_uring to this disk. (Only O_DIRECT disks use io_uring automatically.)
    let (_dir, path) = new_file(MIB);
    let opts = DiskOptions {
        ring_depth: 1 << 20,
        direct: true,
        ..DiskOptions::default()
    };
    let e = open_disk(
        &path,
        &DiskOptions {
            backend: Backend::Uring,
            ..opts.clone()
        },
    )
    .err()
    .unwrap();
    assert!(
        matches!(
            e,
            DiskError::Io {
                op: "io_uring_setup",
                ..
            }
        ),
        "{e}"
    );
    let d = open_disk(&path, &opts).unwrap();
    assert_eq!(d.backend(), "pread");
    disk::write_at(&*d, 0, &[3; 4096]).unwrap();
    assert_eq!(disk::read_at(&*d, 0, 4096).unwrap()[..], [3; 4096]);
}

#[test]
fn environment_forces_the_backend() {
    // Re-run this test in a child process with the variable set (setting it here would race
    // with the other tests of this binary).
    const CHILD: &str = "SHARDVOL_DISK_TEST_CHILD";
    if let Some(want) = std::env::var_os(CHILD) {
        let want = want.to_str().unwrap();
        let (_dir, path) = new_file(MIB);
        for direct in [false, true] {
            let opts = DiskOptions {
                direct,
                ..DiskOptions::default()
            };
            assert_eq!(
                open_disk(&path, &opts).unwrap().backend(),
                want,
                "direct={direct}"
            );
        }
        // An explicit choice in the options wins over the environment.
        if uring_available().is_ok() {
            let opts = DiskOptions {
                backend: Backend::Uring,
                ..DiskOptions::default()
            };
            assert_eq!(open_disk(&path, &opts).unwrap().backend(), "io_uring");
        }
        println!("child checks passed");
        return;
    }
    for backend in ["pread", "inline"] {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "environment_forces_the_backend",
                "--test-threads=1",
                "--nocapture",
            ])
            .env(CHILD, backend)
            .env(disk::BACKEND_ENV, backend)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("child checks passed"),
            "{backend}: {}\n{stdout}",
            out.status
        );
    }
}

#[test]
fn create_file_and_open_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d");
    create_file(&path, 3 * MIB).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 3 * MIB);
    assert!(
        create_file(&path, MIB).is_err(),
        "an existing disk must not be truncated"
    );
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 3 * MIB);
    assert!(matches!(
        create_file(&dir.path().join("e"), 1000),
        Err(DiskError::Unaligned { .. })
    ));
    let missing = dir.path().join("missing");
    for which in [Backend::Uring, Backend::Pread, Backend::Inline] {
        let e = open_disk(
            &missing,
            &DiskOptions {
                backend: which,
                ..DiskOptions::default()
            },
        )
        .err()
        .unwrap();
        assert!(e.to_string().contains("missing"), "{e}");
        assert_eq!(e.errno(), libc::ENOENT);
    }
    // A file whose length is not a multiple of 512 is used up to its last whole sector.
    let odd = dir.path().join("odd");
    std::fs::write(&odd, vec![1u8; 1300]).unwrap();
    let d = open_disk(&odd, &DiskOptions::default()).unwrap();
    assert_eq!(d.size(), 1024);
}

#[test]
fn no_lost_wakeups_under_many_small_waits() {
    // Each op is submitted to an idle disk thread and waited for at once: the case where a
    // lost wake-up would hang. A watchdog turns a hang into a failure.
    for which in ALL {
        let (_dir, path) = new_file(MIB);
        let d = open(which, &path, &DiskOptions::default());
        let (tx, rx) = std::sync::mpsc::channel();
        for t in 0..4u64 {
            let (d, tx) = (d.clone(), tx.clone());
            std::thread::spawn(move || {
                for i in 0..1500u64 {
                    let at = (t * 512 + i % 512) * 512;
                    if i % 3 == 0 {
                        disk::write_at(&*d, at, &[t as u8; 512]).unwrap();
                    } else {
                        disk::read_at(&*d, at, 512).unwrap();
                    }
                }
                tx.send(()).unwrap();
            });
        }
        for _ in 0..4 {
            rx.recv_timeout(Duration::from_secs(60))
                .unwrap_or_else(|_| panic!("{which:?}: submitters hung"));
        }
    }
}

/// Measurement, not a test: 4 KiB random writes at queue depth 32 on a 256 MiB file, io_uring
/// against pread, buffered and O_DIRECT; "window" keeps 32 one-op batches in flight, "batch"
/// submits batches of 32 ops and waits for each. Run with
/// `cargo test --release --test disk_backends -- --ignored --nocapture iops`
/// (`IOPS_SECS` sets the seconds per case, default 3).
#[test]
#[ignore]
fn iops_4k_random_write_qd32() {
    const SIZE: u64 = 256 * MIB;
    const QD: usize = 32;
    let secs: f64 = std::env::var("IOPS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    for direct in [false, true] {
        for batch in [false, true] {
            for which in ALL {
                let (_dir, path) = new_file(SIZE);
                let d = open(
                    which,
                    &path,
                    &DiskOptions {
                        direct,
                        ..DiskOptions::default()
                    },
                );
                // Allocate the file first, so that the run measures overwrites, not allocation.
                for i in 0..SIZE / (4 * MIB) {
                    disk::write_at(&*d, i * 4 * MIB, &vec![1; 4 * MIB as usize]).unwrap();
                }
                disk::sync(&*d).unwrap();
                let mut rng = SmallRng::seed_from_u64(1);
                let data = pattern(9, 4096);
                let mut next = || IoOp::write(rng.random_range(0..SIZE / 4096) * 4096, &data);
                let start = Instant::now();
                let mut done = 0u64;
                if batch {
                    while start.elapsed() < Duration::from_secs_f64(secs) {
                        done += d
                            .submit((0..QD).map(|_| next()).collect())
                            .wait()
                            .unwrap()
                            .len() as u64;
                    }
                } else {
                    let mut window = std::collections::VecDeque::new();
                    while start.elapsed() < Duration::from_secs_f64(secs) {
                        while window.len() < QD {
                            window.push_back(d.submit(vec![next()]));
                        }
                        if let Some(p) = window.pop_front() {
                            p.wait().unwrap();
                            done += 1;
                        }
                    }
                    for p in window {
                        p.wait().unwrap();
                        done += 1;
                    }
                }
                let elapsed = start.elapsed().as_secs_f64();
                println!(
                    "4k randwrite QD{QD} {:<8} {:<6} {:<8}: {:>7.0} IOPS ({done} ops in {elapsed:.2}s)",
                    if direct { "O_DIRECT" } else { "buffered" },
                    if batch { "batch" } else { "window" },
                    format!("{which:?}"),
                    done as f64 / elapsed
                );
            }
        }
    }
}
