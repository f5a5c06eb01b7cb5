//! Offline recovery (`shardvol recover`, `docs/recovery.md`): a volume's image rebuilt from its
//! disk files and `t` shares, with the metadata store deleted, with `m` disks gone, with a disk
//! whose superblock or data is damaged; the source disks are never modified; too many missing
//! disks, wrong shares, foreign disks and an existing output are refused with clear messages.
//!
//! Every test builds a small pool (32 MiB, 4+2, 16 KiB chunks) in a temporary directory with the
//! library, writes data so that part of it is destaged and part is only in the journal (the
//! volume is halted, as by a power cut), deletes `pool.redb`, and recovers.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use shardvol::pool::recover::{RecoverOptions, Recovered, recover};
use shardvol::pool::{self, CreateOptions, DiskSpec, Pool, PoolError};
use shardvol::volume::BlockDevice;

mod common;
use common::pattern;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 32 * MIB;
const DISKS: usize = 6;
/// First byte of the volume's chunk slots on every disk: superblock area + journal.
const DATA_AREA: u64 = MIB + 8 * MIB;

struct Fixture {
    dir: tempfile::TempDir,
    disks: Vec<PathBuf>,
    shares: Vec<PathBuf>,
    /// What the volume must read as.
    model: Vec<u8>,
    /// Blocks written and not trimmed since.
    allocated: u64,
}

fn create(dir: &Path, name: &str) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let c = pool::create(&CreateOptions {
        pool: dir.join(name),
        volume: "vol0".into(),
        size: SIZE,
        data: 4,
        parity: 2,
        chunk_size: 16 * 1024,
        disks: DiskSpec::Files(DISKS),
        shares: 5,
        threshold: 3,
        share_dir: dir.join(format!("{name}-shares")),
        journal_size: 8 * MIB,
    })
    .unwrap();
    (c.disks, c.share_files)
}

/// A pool whose volume holds destaged data, trims, and writes and trims that are only in the
/// journal; the store is deleted.
fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let (disks, shares) = create(dir.path(), "pool");
    let mut model = vec![0u8; SIZE as usize];
    let mut alloc = vec![false; (SIZE / 4096) as usize];
    {
        let p = Pool::open(&dir.path().join("pool"), &shares[..3]).unwrap();
        let vol = p.volumes["vol0"].clone();
        let mut write = |offset: u64, data: Vec<u8>| {
            vol.write(offset, &data, false).unwrap();
            model[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
            let end = offset + data.len() as u64;
            alloc[(offset / 4096) as usize..end.div_ceil(4096) as usize].fill(true);
        };
        // Destaged: 3 MiB at the start, an unaligned piece, a run far into the volume.
        write(0, pattern(1, 3 * MIB as usize));
        write(5 * MIB + 1234, pattern(2, 100_000));
        write(20 * MIB, pattern(3, 2 * MIB as usize));
        vol.trim(MIB, 256 * 1024).unwrap();
        model[MIB as usize..(MIB + 256 * 1024) as usize].fill(0);
        alloc[256..256 + 64].fill(false);
        vol.flush().unwrap();
        for _ in 0..20 {
            if !vol.destage().unwrap() {
                break;
            }
        }
        assert_eq!(
            vol.journaled_blocks(),
            0,
            "the first writes must be destaged"
        );
        // A power cut from here on: the destager stops, nothing more is destaged or
        // checkpointed (writes still go to the journal).
        vol.halt();
        // Only in the journal: overwrites of destaged data, new data, a trim.
        let mut write = |offset: u64, data: Vec<u8>| {
            vol.write(offset, &data, false).unwrap();
            model[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
            let end = offset + data.len() as u64;
            alloc[(offset / 4096) as usize..end.div_ceil(4096) as usize].fill(true);
        };
        write(64 * 1024 + 512, pattern(4, 300_000));
        write(12 * MIB, pattern(5, MIB as usize));
        write(31 * MIB, pattern(6, 4096));
        vol.trim(20 * MIB + 4096 * 3, 4096 * 40).unwrap();
        model[(20 * MIB + 4096 * 3) as usize..(20 * MIB + 4096 * 43) as usize].fill(0);
        let first = (20 * MIB / 4096 + 3) as usize;
        alloc[first..first + 40].fill(false);
        vol.flush().unwrap();
        assert!(vol.journaled_blocks() > 0);
    }
    std::fs::remove_file(dir.path().join("pool").join(pool::STORE_FILE)).unwrap();
    Fixture {
        dir,
        disks,
        shares,
        model,
        allocated: alloc.iter().filter(|a| **a).count() as u64,
    }
}

impl Fixture {
    fn opts(&self, disks: &[usize], shares: &[usize], out: &str) -> RecoverOptions {
        RecoverOptions {
            disks: disks.iter().map(|i| self.disks[*i].clone()).collect(),
            shares: shares.iter().map(|i| self.shares[*i].clone()).collect(),
            volume: "vol0".into(),
            output: self.dir.path().join(out),
            force: false,
            progress: false,
        }
    }

    fn run(&self, disks: &[usize], out: &str) -> Result<Recovered, PoolError> {
        recover(&self.opts(disks, &[1, 3, 4], out))
    }

    fn check_image(&self, out: &str) {
        let img = std::fs::read(self.dir.path().join(out)).unwrap();
        assert_eq!(img.len(), self.model.len());
        if let Some(i) = (0..img.len()).find(|i| img[*i] != self.model[*i]) {
            panic!("the image differs from what was written, first at byte {i}");
        }
    }

    /// The volume's journal disks, from a superblock and the placement.
    fn journal_disks(&self) -> Vec<usize> {
        let d = shardvol::disk::open_disk(&self.disks[0], &Default::default()).unwrap();
        let sb = shardvol::meta::read_superblock(d.as_ref()).unwrap();
        let table = sb
            .disks
            .iter()
            .map(|d| shardvol::layout::placement::PlacementDisk {
                id: d.id,
                domain: d.domain.clone(),
            })
            .collect();
        let placement =
            shardvol::layout::placement::Placement::new(sb.volumes[0].placement_seed, table)
                .unwrap();
        shardvol::volume::Volume::journal_disks(&placement, &sb.volumes[0])
            .unwrap()
            .iter()
            .map(|d| d.0 as usize)
            .collect()
    }

    /// blake3 of every disk file present.
    fn disk_hashes(&self) -> BTreeMap<PathBuf, blake3::Hash> {
        self.disks
            .iter()
            .filter(|p| p.exists())
            .map(|p| (p.clone(), blake3::hash(&std::fs::read(p).unwrap())))
            .collect()
    }
}

fn err_text(r: Result<Recovered, PoolError>) -> String {
    match r {
        Ok(_) => panic!("recovery should have failed"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn recovers_destaged_and_journaled_data_without_the_store_and_changes_no_disk() {
    let f = fixture();
    let before = f.disk_hashes();
    let r = f.run(&[0, 1, 2, 3, 4, 5], "out.img").unwrap();
    f.check_image("out.img");
    assert_eq!(f.disk_hashes(), before, "recovery modified a source disk");
    assert!(r.disks.iter().all(|d| d.missing.is_none()));
    assert!(r.unreadable.is_empty());
    assert_eq!(r.scan.uncertain_rows, 0);
    assert!(r.scan.lost.is_empty());
    // The journal's writes and trims were destaged into the overlays before the scan, so the
    // block metadata on the (overlaid) disks tells the whole story.
    assert_eq!(r.scan.allocated, f.allocated);
    // Sparse output: only the data written takes space (the never-written half does not).
    let meta = std::fs::metadata(f.dir.path().join("out.img")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert!(
        meta.blocks() * 512 < 10 * MIB,
        "{} bytes allocated",
        meta.blocks() * 512
    );
}

#[test]
fn recovers_with_m_disks_deleted() {
    let f = fixture();
    std::fs::remove_file(&f.disks[1]).unwrap();
    std::fs::remove_file(&f.disks[4]).unwrap();
    let before = f.disk_hashes();
    let r = f.run(&[0, 2, 3, 5], "out.img").unwrap();
    f.check_image("out.img");
    assert_eq!(f.disk_hashes(), before);
    let missing: Vec<u32> = r
        .disks
        .iter()
        .filter(|d| d.missing.is_some())
        .map(|d| d.id.0)
        .collect();
    assert_eq!(missing, vec![1, 4]);
    assert!(r.scan.unreadable_chunks > 0);
    assert!(r.unreadable.is_empty());
}

#[test]
fn recovers_with_a_disk_whose_superblock_is_zeroed_and_another_with_damaged_data() {
    let f = fixture();
    use std::os::unix::fs::FileExt;
    let zero = |path: &Path, at: u64, len: usize| {
        let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        file.write_all_at(&vec![0u8; len], at).unwrap();
    };
    // Disk 2 loses its superblock: it cannot be identified, so it counts as missing.
    zero(&f.disks[2], 0, MIB as usize);
    // Disk 5 returns garbage for the first 2 MiB of its chunk slots (data and metadata): the
    // scan finds the metadata inconsistent and lets the tags decide, reads find the tags wrong;
    // both rebuild from the other chunks.
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&f.disks[5])
        .unwrap();
    file.write_all_at(&pattern(99, 2 * MIB as usize), DATA_AREA)
        .unwrap();
    let before = f.disk_hashes();
    let r = f.run(&[0, 1, 2, 3, 4, 5], "out.img").unwrap();
    f.check_image("out.img");
    assert_eq!(f.disk_hashes(), before);
    let d2 = &r.disks[2];
    assert!(d2.missing.is_some(), "{:?}", r.disks);
    assert!(
        r.notes
            .iter()
            .any(|(p, why)| p == &f.disks[2] && why.contains("superblock")),
        "{:?}",
        r.notes
    );
    assert!(r.scan.repaired_rows > 0, "{:?}", r.scan);
    assert!(
        r.scan.uncertain_rows == 0 && r.unreadable.is_empty(),
        "{:?}",
        r.scan
    );
}

#[test]
fn more_than_m_missing_refuses_naming_the_blocks_and_force_writes_the_rest() {
    let f = fixture();
    // m + 1 = 3 disks missing, one of them a journal disk (the journal survives on the others).
    let j = f.journal_disks();
    let mut gone = vec![j[0]];
    gone.extend((0..DISKS).filter(|d| !j.contains(d)).take(2));
    gone.sort();
    let keep: Vec<usize> = (0..DISKS).filter(|d| !gone.contains(d)).collect();
    let e = err_text(f.run(&keep, "out.img"));
    assert!(e.contains("cannot be rebuilt"), "{e}");
    let names: Vec<String> = gone.iter().map(|d| d.to_string()).collect();
    assert!(
        e.contains(&format!("disks missing: {}", names.join(", "))),
        "{e}"
    );
    assert!(e.contains("blocks ") && e.contains("--force"), "{e}");
    assert!(
        !f.dir.path().join("out.img").exists(),
        "nothing may be written"
    );

    let mut o = f.opts(&keep, &[0, 1, 2], "out.img");
    o.force = true;
    let r = recover(&o).unwrap();
    assert!(!r.unreadable.is_empty());
    let img = std::fs::read(f.dir.path().join("out.img")).unwrap();
    // Every block is either what was written, or zeros and listed as unreadable.
    let unreadable = |lba: u64| r.unreadable.iter().any(|x| x.contains(&lba));
    let mut good = 0;
    for (lba, (got, want)) in img.chunks(4096).zip(f.model.chunks(4096)).enumerate() {
        if unreadable(lba as u64) {
            assert!(got.iter().all(|b| *b == 0));
        } else {
            assert_eq!(got, want, "block {lba} is neither right nor listed");
            good += 1;
        }
    }
    assert!(good > 0);
}

#[test]
fn all_journal_disks_missing_refuses_and_force_recovers_what_was_destaged() {
    let f = fixture();
    let j = f.journal_disks();
    assert_eq!(j.len(), 3);
    let keep: Vec<usize> = (0..DISKS).filter(|d| !j.contains(d)).collect();
    let e = err_text(f.run(&keep, "out.img"));
    assert!(e.contains("journal disks") && e.contains("--force"), "{e}");
    assert!(!f.dir.path().join("out.img").exists());

    let mut o = f.opts(&keep, &[0, 1, 2], "out.img");
    o.force = true;
    let r = recover(&o).unwrap();
    assert!(r.journal_lost);
    let img = std::fs::read(f.dir.path().join("out.img")).unwrap();
    // Blocks the journal-only writes and trims touched (see `fixture`) may hold their older
    // content; every other block is right or listed as unreadable (and zero).
    let after_halt = [
        (64 * 1024 + 512, 300_000),
        (12 * MIB, MIB),
        (31 * MIB, 4096),
        (20 * MIB + 4096 * 3, 4096 * 40),
    ];
    let touched = |lba: u64| {
        after_halt
            .iter()
            .any(|(o, l)| lba + 1 > o / 4096 && lba < (o + l).div_ceil(4096))
    };
    let unreadable = |lba: u64| r.unreadable.iter().any(|x| x.contains(&lba));
    let mut right = 0;
    for (lba, (got, want)) in img.chunks(4096).zip(f.model.chunks(4096)).enumerate() {
        let lba = lba as u64;
        if unreadable(lba) {
            assert!(
                got.iter().all(|b| *b == 0),
                "unreadable block {lba} not zero"
            );
        } else if !touched(lba) {
            assert_eq!(got, want, "block {lba}");
            right += 1;
        }
    }
    assert!(right > 0);
}

#[test]
fn wrong_shares_are_refused_naming_the_share() {
    let f = fixture();
    let all = [0, 1, 2, 3, 4, 5];
    let e = err_text(recover(&f.opts(&all, &[0, 1], "out.img")));
    assert!(e.contains("2 shares given, this pool needs 3"), "{e}");
    let e = err_text(recover(&f.opts(&all, &[0, 1, 1], "out.img")));
    assert!(e.contains("share-2.txt") && e.contains("twice"), "{e}");
    // A share of another pool.
    let (_, other_shares) = create(f.dir.path(), "other");
    let mut o = f.opts(&all, &[0, 1], "out.img");
    o.shares.push(other_shares[2].clone());
    let e = err_text(recover(&o));
    assert!(
        e.contains(&other_shares[2].display().to_string()) && e.contains("another pool"),
        "{e}"
    );
    // A damaged share file.
    let bad = f.dir.path().join("bad-share.txt");
    let text = std::fs::read_to_string(&f.shares[4]).unwrap();
    std::fs::write(&bad, text.replace('a', "b").replace('1', "2")).unwrap();
    let mut o = f.opts(&all, &[0, 1], "out.img");
    o.shares.push(bad.clone());
    let e = err_text(recover(&o));
    assert!(e.contains("bad-share.txt"), "{e}");
    assert!(!f.dir.path().join("out.img").exists());
}

#[test]
fn foreign_disks_unknown_volumes_and_existing_outputs_are_refused() {
    let f = fixture();
    let (other_disks, _) = create(f.dir.path(), "other");
    let mut o = f.opts(&[0, 1, 2, 3, 4], &[0, 1, 2], "out.img");
    o.disks.push(other_disks[5].clone());
    let e = err_text(recover(&o));
    assert!(
        e.contains(&other_disks[5].display().to_string()) && e.contains("other pools"),
        "{e}"
    );

    let mut o = f.opts(&[0, 1, 2, 3, 4, 5], &[0, 1, 2], "out.img");
    o.volume = "nope".into();
    let e = err_text(recover(&o));
    assert!(
        e.contains("no volume \"nope\"") && e.contains("vol0"),
        "{e}"
    );

    let mut o = f.opts(&[0, 1, 2, 3, 4, 5], &[0, 1, 2], "out.img");
    o.disks.push(f.disks[3].clone());
    let e = err_text(recover(&o));
    assert!(e.contains("same file"), "{e}");

    std::fs::write(f.dir.path().join("out.img"), b"keep me").unwrap();
    let e = err_text(f.run(&[0, 1, 2, 3, 4, 5], "out.img"));
    assert!(e.contains("exists") && e.contains("--force"), "{e}");
    assert_eq!(
        std::fs::read(f.dir.path().join("out.img")).unwrap(),
        b"keep me"
    );
    let mut o = f.opts(&[0, 1, 2, 3, 4, 5], &[0, 1, 2], "out.img");
    o.force = true;
    recover(&o).unwrap();
    f.check_image("out.img");

    // The output may never be one of the disks.
    let mut o = f.opts(&[0, 1, 2, 3, 4, 5], &[0, 1, 2], "unused");
    o.output = f.disks[0].clone();
    o.force = true;
    let e = err_text(recover(&o));
    assert!(e.contains("never writes to a disk"), "{e}");
}

#[test]
fn the_command_line_recovers_and_reports() {
    let f = fixture();
    std::fs::remove_file(&f.disks[0]).unwrap();
    let bin = env!("CARGO_BIN_EXE_shardvol");
    let out = f.dir.path().join("cli.img");
    let mut cmd = Command::new(bin);
    cmd.arg("recover").arg("--volume").arg("vol0");
    for d in &f.disks[1..] {
        cmd.arg("--disk").arg(d);
    }
    cmd.arg("--share-dir")
        .arg(f.shares[0].parent().unwrap())
        .arg("--output")
        .arg(&out);
    let o = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.contains("recovered volume vol0"), "{stdout}");
    assert!(stdout.contains("disks: 5 used, 1 missing"), "{stdout}");
    assert!(
        stderr.contains("recover: ") && stderr.contains("MB/s"),
        "{stderr}"
    );
    f.check_image("cli.img");

    // Too many disks missing: exit status 1, the reason on stderr, no image.
    let o = Command::new(bin)
        .args(["recover", "--volume", "vol0", "--quiet", "--disk"])
        .arg(&f.disks[1])
        .arg("--share-dir")
        .arg(f.shares[0].parent().unwrap())
        .arg("--output")
        .arg(f.dir.path().join("none.img"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("cannot be rebuilt") || stderr.contains("journal disks"),
        "{stderr}"
    );
    assert!(stderr.contains("--force"), "{stderr}");
    assert!(!f.dir.path().join("none.img").exists());
}
