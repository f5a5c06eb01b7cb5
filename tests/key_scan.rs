//! Invariant 4: no plaintext and no key material is ever written to a disk, the metadata store
//! or any other file of the pool.
//!
//! Creates a pool with file-backed disks, writes a recognisable plaintext pattern through a
//! volume (journal and destaged copies both exist on disk afterwards), closes the pool, then
//! scans every byte of every file under the pool directory for the master key, the KEK (both
//! recovered from the shares), the derived shard and tag keys of the written stripes, and the
//! plaintext. A share file holds a Shamir share, not the KEK; it is scanned too.

use std::path::{Path, PathBuf};

use shardvol::kms;
use shardvol::meta::MetaStore;
use shardvol::pool::{self, CreateOptions, DiskSpec, Pool};
use shardvol::volume::BlockDevice;

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files_under(&p, out)
        } else {
            out.push(p)
        }
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Scans sparse files quickly by skipping all-zero 1 MiB runs (a needle of non-zero bytes
/// cannot be inside one; runs are overlapped by the needle length).
fn file_contains(path: &Path, needle: &[u8]) -> bool {
    let data = std::fs::read(path).unwrap();
    const RUN: usize = 1 << 20;
    let mut at = 0;
    while at < data.len() {
        let end = (at + RUN + needle.len()).min(data.len());
        let part = &data[at..end];
        if part.iter().any(|b| *b != 0) && contains(part, needle) {
            return true;
        }
        at += RUN;
    }
    false
}

#[test]
fn no_key_or_plaintext_reaches_any_file_of_the_pool() {
    let dir = tempfile::tempdir().unwrap();
    let pool_dir = dir.path().join("pool");
    let share_dir = pool_dir.join("shares");
    pool::create(&CreateOptions {
        pool: pool_dir.clone(),
        volume: "vol0".into(),
        size: 64 << 20,
        data: 4,
        parity: 2,
        chunk_size: 64 << 10,
        disks: DiskSpec::Files(6),
        shares: 5,
        threshold: 3,
        share_dir: share_dir.clone(),
        journal_size: 16 << 20,
    })
    .unwrap();
    let shares = pool::shares_in(&share_dir).unwrap();

    // A pattern that is unmistakable and not all-zero: 4 KiB of it, repeated.
    let mut block = vec![0u8; 4096];
    for (i, b) in block.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(31).wrapping_add(7);
    }
    block[..16].copy_from_slice(b"PLAINTEXT-MARKER");
    let data: Vec<u8> = block.iter().copied().cycle().take(8 << 20).collect();

    let p = Pool::open(&pool_dir, &shares[..3]).unwrap();
    let vol = p.volumes["vol0"].clone();
    vol.write(0, &data, false).unwrap();
    vol.flush().unwrap();
    // A second write that stays in the journal (not destaged) when the pool is halted.
    vol.write(32 << 20, &data[..1 << 20], true).unwrap();
    vol.halt();
    let mut back = vec![0u8; data.len()];
    vol.read(0, &mut back).unwrap();
    assert_eq!(back, data, "the pattern reads back before the scan");
    drop(vol);
    drop(p);

    // Recover the keys the way an attacker with t shares would.
    let store = MetaStore::open(&pool_dir.join(pool::STORE_FILE)).unwrap();
    let rec = store.pool().unwrap();
    let loaded: Vec<_> = shares[..3]
        .iter()
        .map(|s| kms::load_share_file(s).unwrap())
        .collect();
    let kek = kms::combine(&loaded, rec.pool_id, rec.split_id, rec.threshold).unwrap();
    // Wrapped master keys live in the key-slot file (the store keeps only their state).
    let wrapped = shardvol::lifecycle::keys_with_wrapped(&store).unwrap()[0]
        .wrapped
        .clone();
    let master = kms::unwrap_master(&kek, &wrapped, rec.pool_id, 1).unwrap();
    drop(store);

    let mut needles: Vec<(&str, Vec<u8>)> = vec![
        ("master key", master.expose().to_vec()),
        ("KEK", kek.expose().to_vec()),
        ("plaintext marker", b"PLAINTEXT-MARKER".to_vec()),
        ("plaintext block", block[16..80].to_vec()),
    ];
    // Hex renderings too: a key printed into a log or a text file is just as leaked.
    let hex = |b: &[u8]| {
        b.iter()
            .map(|x| format!("{x:02x}"))
            .collect::<String>()
            .into_bytes()
    };
    needles.push(("master key (hex)", hex(master.expose())));
    needles.push(("KEK (hex)", hex(kek.expose())));

    let mut files = Vec::new();
    files_under(&pool_dir, &mut files);
    let disk_files = files
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "img"))
        .count();
    assert_eq!(disk_files, 6, "every disk file is scanned");
    assert!(
        files.iter().any(|f| f.ends_with(pool::STORE_FILE)),
        "the metadata store is scanned"
    );
    for f in &files {
        for (what, needle) in &needles {
            assert!(!file_contains(f, needle), "{what} found in {}", f.display());
        }
    }
    // The scan can fail: the plaintext is found once written in the clear.
    let probe = dir.path().join("probe.bin");
    std::fs::write(&probe, &data[..8192]).unwrap();
    assert!(
        file_contains(&probe, &needles[2].1),
        "the scanner finds a planted needle"
    );
}
