//! Crash safety of re-encryption: a power cut at every disk op of a re-key round (re-key every
//! stripe under a new master version, flush, destage) loses nothing.
//!
//! Rig: memory disks behind a shared op budget (once it runs out every op fails and none reaches
//! the disk), as in `volume_review.rs`. For each cut point and each crash mode (unsynced writes
//! dropped, kept, or torn), the volume is reopened and every block must read back as written
//! (re-keying never changes content, so any other value is damage). Then the round is run again
//! to completion, version 1 is removed from the key ring, and everything must still read: after
//! a completed round nothing needs the old version.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use rand::SeedableRng;
use rand::rngs::StdRng;
use shardvol::crypto::{KeyRing, MasterKey};
use shardvol::disk::{CrashMode, UNLIMITED_OPS};
use shardvol::layout::placement::PlacementDisk;
use shardvol::layout::{DiskId, StripeId};
use shardvol::volume::{BlockDevice, Volume, VolumeParts, WriteKey};

mod common;
use common::pattern;

const UNLIMITED: i64 = UNLIMITED_OPS;
const CHUNK: u32 = 16 << 10;
/// 4+2 with 16 KiB chunks: 64 KiB of data per stripe; 6 stripes.
const SIZE: u64 = 6 * 64 * 1024;

struct Rig(common::MemRig);

impl std::ops::Deref for Rig {
    type Target = common::MemRig;
    fn deref(&self) -> &common::MemRig {
        &self.0
    }
}

impl Rig {
    fn new() -> Rig {
        let rig = Rig(common::MemRig::new("rekey", [3; 32], 6, SIZE, CHUNK));
        Volume::format(&rig.parts(&[1], (1, 1))).unwrap();
        rig
    }

    fn parts(&self, versions: &[u32], write: (u32, u32)) -> VolumeParts {
        let keys = Arc::new(KeyRing::new([5; 16]));
        for v in versions {
            keys.insert(*v, MasterKey::from_bytes([*v as u8 * 17; 32]));
        }
        VolumeParts {
            record: self.record.clone(),
            disks: self
                .disks
                .iter()
                .enumerate()
                .map(|(i, d)| (DiskId(i as u32), d.clone()))
                .collect::<HashMap<_, _>>(),
            table: (0..6)
                .map(|i| PlacementDisk {
                    id: DiskId(i),
                    domain: format!("d{i}"),
                })
                .collect(),
            keys,
            write_key: Arc::new(WriteKey::new(write.0, write.1)),
            // On a memory disk behind the same power cut as the disks.
            store: self.cut_store.open(&self.budget),
        }
    }

    fn open(&self, versions: &[u32], write: (u32, u32)) -> Arc<Volume> {
        Volume::open(self.parts(versions, write)).expect("volume opens")
    }
}

/// Data under version 1: destaged, plus a few blocks still in the journal (flushed).
fn prepare(rig: &Rig) -> Vec<u8> {
    let vol = rig.open(&[1], (1, 1));
    vol.halt();
    let mut data = pattern(1, SIZE as usize);
    // Leave holes: stripe 4 never written, a few blocks trimmed in stripe 2.
    data[4 * 65536..5 * 65536].fill(0);
    vol.write(0, &data[..4 * 65536], false).unwrap();
    vol.write(5 * 65536, &data[5 * 65536..], false).unwrap();
    vol.trim(2 * 65536 + 8192, 8192).unwrap();
    data[2 * 65536 + 8192..2 * 65536 + 16384].fill(0);
    vol.flush().unwrap();
    vol.destage().unwrap();
    let extra = pattern(2, 3 * 4096);
    vol.write(65536 + 4096, &extra, false).unwrap();
    data[65536 + 4096..65536 + 4 * 4096].copy_from_slice(&extra);
    vol.flush().unwrap();
    common::kill(vol);
    data
}

/// The round: re-key every stripe under version 2, flush, destage.
fn round(vol: &Volume) -> Result<u64, String> {
    let mut n = 0;
    for s in 0..vol.stripes() {
        n += vol.rekey_stripe(StripeId(s)).map_err(|e| e.to_string())?;
    }
    vol.flush().map_err(|e| e.to_string())?;
    vol.destage().map_err(|e| e.to_string())?;
    Ok(n)
}

fn check(vol: &Volume, data: &[u8], what: &str) {
    let mut b = vec![0u8; data.len()];
    vol.read(0, &mut b)
        .unwrap_or_else(|e| panic!("{what}: read failed: {e}"));
    if let Some(i) = (0..data.len()).find(|i| b[*i] != data[*i]) {
        panic!("{what}: byte {i} (block {}) differs", i / 4096);
    }
}

#[test]
fn power_cut_at_every_op_of_a_rekey_round_loses_nothing() {
    let ops = {
        let rig = Rig::new();
        let data = prepare(&rig);
        let vol = rig.open(&[1, 2], (2, 1));
        vol.halt();
        rig.budget.store(UNLIMITED, Ordering::SeqCst);
        let n = round(&vol).unwrap();
        assert_eq!(n, (SIZE / 4096) - 16 - 2, "live blocks re-keyed");
        let used = UNLIMITED - rig.budget.load(Ordering::SeqCst);
        check(&vol, &data, "uncut round");
        common::kill(vol);
        used
    };
    assert!(ops > 30, "a re-key round of 5 stripes took only {ops} ops");
    let mut rng = StdRng::seed_from_u64(11);
    let mut checked = 0;
    // Every op of the first stripe's re-key, then every fifth; the crash modes take turns
    // (unsynced writes dropped, kept, or a random third kept / torn / dropped), so the sweep stays
    // within seconds. SHARDVOL_REKEY_CUT_STEP=1 cuts at every op.
    let step: i64 = std::env::var("SHARDVOL_REKEY_CUT_STEP")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5)
        .max(1);
    let modes = [CrashMode::DropAll, CrashMode::KeepAll, CrashMode::THIRDS];
    for n in (0..=ops).filter(|n| *n < 48 || n % step == 0 || *n == ops) {
        {
            let mode = modes[n as usize % 3];
            let rig = Rig::new();
            let data = prepare(&rig);
            let vol = rig.open(&[1, 2], (2, 1));
            vol.halt();
            rig.budget.store(n, Ordering::SeqCst);
            let r = round(&vol);
            assert!(n < ops || r.is_ok(), "cut at op {n} of {ops}: {r:?}");
            rig.budget.store(0, Ordering::SeqCst);
            common::kill(vol);
            for m in &rig.mems {
                m.crash(&mut rng, mode);
            }
            rig.cut_store.crash(&mut rng, mode);
            rig.budget.store(UNLIMITED, Ordering::SeqCst);
            let what = format!("cut at op {n} of {ops} ({mode:?})");
            let vol = rig.open(&[1, 2], (2, 1));
            check(&vol, &data, &what);
            // Finish the round; then version 1 is not needed any more.
            round(&vol).unwrap_or_else(|e| panic!("{what}: second round: {e}"));
            let u = vol.scan_key_usage().unwrap();
            assert_eq!(u.blocks_of_version(1), 0, "{what}: {u:?}");
            vol.reseal_journal().unwrap();
            common::kill(vol);
            let vol = rig.open(&[2], (2, 1));
            check(&vol, &data, &format!("{what}, version 1 removed"));
            common::kill(vol);
            checked += 1;
        }
    }
    println!("re-key round of {ops} ops: {checked} cuts checked");
}

#[test]
fn resealing_the_journal_frees_it_from_an_old_version() {
    let rig = Rig::new();
    let data = prepare(&rig);
    // Both checkpoint slots are sealed under version 1 now. Switch to version 2 without writing.
    let vol = rig.open(&[1, 2], (2, 1));
    vol.halt();
    vol.reseal_journal().unwrap();
    common::kill(vol);
    let vol = rig.open(&[2], (2, 1));
    // The journal opens without version 1; the destaged blocks are still version 1's.
    let mut b = vec![0u8; 4096];
    assert!(
        vol.read(0, &mut b).is_err(),
        "a block of a removed version must not read"
    );
    common::kill(vol);
    let vol = rig.open(&[1, 2], (2, 1));
    check(&vol, &data, "with both versions");
    common::kill(vol);

    // Without the reseal, the journal cannot open once version 1 is gone.
    let rig = Rig::new();
    prepare(&rig);
    let e = Volume::open(rig.parts(&[2], (2, 1)))
        .err()
        .map(|e| e.to_string());
    assert!(
        e.as_deref().is_some_and(|e| e.contains("checkpoint")),
        "journal opened with its checkpoints sealed by a missing version: {e:?}"
    );
}
