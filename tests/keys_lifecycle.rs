//! Key lifecycle on real pools (file-backed disks in a temp dir): epochs, re-encryption,
//! the rotation task (stale and hot stripes), master versions, archive and destroy
//! (crypto-shredding, checked by scanning every file), multi-party unlock, access windows and
//! re-splitting the KEK.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shardvol::config::Hours;
use shardvol::kms::policy::{KeyPolicy, UnlockPolicy};
use shardvol::kms::unlock::{Step, UnlockSession};
use shardvol::kms::{self, keyslots::KeySlots};
use shardvol::layout::StripeId;
use shardvol::lifecycle::{PoolKeys, RotationTask};
use shardvol::meta::KeyState;
use shardvol::now_unix;
use shardvol::pool::{self, CreateOptions, DiskSpec, Pool};
use shardvol::volume::{BlockDevice, Volume};

mod common;
use common::pattern;

const MIB: u64 = 1 << 20;
/// 4+2 with 64 KiB chunks: a stripe holds 256 KiB of data.
const STRIPE: u64 = 256 << 10;

struct TestPool {
    _dir: tempfile::TempDir,
    pool: PathBuf,
    shares: Vec<PathBuf>,
}

fn new_pool(shares: u8, threshold: u8) -> TestPool {
    let dir = tempfile::tempdir().unwrap();
    let pool_dir = dir.path().join("pool");
    let share_dir = dir.path().join("shares");
    pool::create(&CreateOptions {
        pool: pool_dir.clone(),
        volume: "vol0".into(),
        size: 16 * MIB,
        data: 4,
        parity: 2,
        chunk_size: 64 << 10,
        disks: DiskSpec::Files(6),
        shares,
        threshold,
        share_dir: share_dir.clone(),
        journal_size: 8 * MIB,
    })
    .unwrap();
    TestPool {
        shares: pool::shares_in(&share_dir).unwrap(),
        pool: pool_dir,
        _dir: dir,
    }
}

fn vols(p: &Pool) -> Vec<Arc<Volume>> {
    p.volumes.values().cloned().collect()
}

fn read_all(v: &Volume, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    v.read(0, &mut b).unwrap();
    b
}

/// Waits (bounded) until `f` holds.
fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn epochs_advance_with_the_period_and_new_writes_use_them() {
    let t = new_pool(3, 2);
    let mut policy = KeyPolicy::default();
    policy.rotation.period = Duration::from_secs(1);
    let p = Pool::open_with(&t.pool, &t.shares[..2], &policy).unwrap();
    let v = p.volumes["vol0"].clone();
    let e0 = p.keys.write_key().1;
    v.write(0, &pattern(1, 4096), false).unwrap();
    // The rotation task's timer moves the epoch; new writes follow.
    let task = RotationTask::start(p.keys.clone(), vols(&p)).unwrap();
    wait_for("the epoch to advance", 5, || p.keys.write_key().1 > e0);
    let e1 = p.keys.write_key().1;
    v.write(STRIPE, &pattern(2, 4096), false).unwrap();
    task.stop();
    let usage = v.scan_key_usage().unwrap();
    assert_eq!(usage.by_key.get(&(1, e0)), Some(&1), "{usage:?}");
    assert_eq!(usage.by_key.get(&(1, e1)), Some(&1), "{usage:?}");
    let history = p.keys.epochs();
    assert!(history.epochs.len() >= 2 && history.start_of(e1).is_some());
    p.close().unwrap();
    drop((v, p));
    // The history survives a restart: the epoch never goes back.
    let p = Pool::open(&t.pool, &t.shares[..2]).unwrap();
    assert!(p.keys.write_key().1 >= e1);
    let mut b = vec![0u8; 4096];
    p.volumes["vol0"].read(STRIPE, &mut b).unwrap();
    assert_eq!(b, pattern(2, 4096));
}

#[test]
fn an_epoch_advanced_at_open_is_in_the_audit_log() {
    let t = new_pool(3, 2);
    let mut policy = KeyPolicy::default();
    policy.rotation.period = Duration::from_secs(1);
    let p = Pool::open_with(&t.pool, &t.shares[..2], &policy).unwrap();
    let e0 = p.keys.write_key().1;
    p.close().unwrap();
    drop(p);
    // The period passes while the pool is closed: the next open starts a new epoch.
    std::thread::sleep(Duration::from_millis(1100));
    let p = Pool::open_with(&t.pool, &t.shares[..2], &policy).unwrap();
    let e1 = p.keys.write_key().1;
    assert!(e1 > e0, "epoch {e1} after {e0}");
    let recs = p.audit.records().unwrap();
    let rotate = recs
        .iter()
        .find(|r| r.event == "rotate" && r.fields.get("epoch") == Some(&e1.to_string()))
        .unwrap_or_else(|| panic!("no rotate record for epoch {e1}: {recs:?}"));
    assert_eq!(rotate.fields["reason"], "period");
    assert!(p.audit_verify().unwrap().1.intact());
    p.close().unwrap();
}

#[test]
fn rekey_stripe_moves_blocks_to_the_current_key_and_keeps_them_readable() {
    let t = new_pool(3, 2);
    let p = Pool::open(&t.pool, &t.shares[..2]).unwrap();
    let v = p.volumes["vol0"].clone();
    let len = (3 * STRIPE) as usize;
    let data = pattern(7, len);
    v.write(0, &data, false).unwrap();
    // Partly destaged, partly in the journal: both kinds are re-keyed.
    v.destage().unwrap();
    v.write(STRIPE + 4096, &pattern(8, 8192), false).unwrap();
    let mut expect = data.clone();
    expect[(STRIPE + 4096) as usize..(STRIPE + 3 * 4096) as usize]
        .copy_from_slice(&pattern(8, 8192));
    let old = p.keys.write_key();
    let new = p.keys.advance_epoch(now_unix()).unwrap().number;
    assert_eq!(v.rekey_stripe(StripeId(1)).unwrap(), STRIPE / 4096);
    assert_eq!(v.rekey_stripe(StripeId(1)).unwrap(), 0, "already current");
    // Until destaged, the old copies in the chunk slots still count (a crash would bring them
    // back); after, only the new ones.
    let u = v.scan_key_usage().unwrap();
    assert_eq!(u.by_key.get(&old), Some(&(3 * STRIPE / 4096)), "{u:?}");
    v.destage().unwrap();
    let u = v.scan_key_usage().unwrap();
    assert_eq!(u.by_key.get(&(old.0, new)), Some(&(STRIPE / 4096)), "{u:?}");
    assert_eq!(u.by_key.get(&old), Some(&(2 * STRIPE / 4096)), "{u:?}");
    assert_eq!(read_all(&v, len), expect);
    // After destaging and a restart, the re-keyed copy is the one on the disks.
    p.close().unwrap();
    drop((v, p));
    let p = Pool::open(&t.pool, &t.shares[1..]).unwrap();
    let v = p.volumes["vol0"].clone();
    assert_eq!(read_all(&v, len), expect);
    let u = v.scan_key_usage().unwrap();
    assert_eq!(u.by_key.get(&(old.0, new)), Some(&(STRIPE / 4096)), "{u:?}");
    assert_eq!(u.unknown, 0);
    // A stripe past the end is an error, not a panic.
    assert!(v.rekey_stripe(StripeId(1 << 40)).is_err());
}

#[test]
fn rotation_task_rekeys_hot_stripes_first_and_stale_ones_by_age() {
    let t = new_pool(3, 2);
    let mut policy = KeyPolicy::default();
    policy.rotation.period = Duration::from_secs(3600);
    policy.rotation.max_age = Duration::from_secs(3600 * 24 * 365);
    policy.rotation.hot_threshold = 20;
    policy.rotation.rate_bytes = 0;
    let p = Pool::open_with(&t.pool, &t.shares[..2], &policy).unwrap();
    let v = p.volumes["vol0"].clone();
    let data = pattern(3, (4 * STRIPE) as usize);
    v.write(0, &data, false).unwrap();
    v.destage().unwrap();
    let epoch2 = p.keys.advance_epoch(now_unix()).unwrap().number;
    // Stripe 2 gets hot: read 30 times.
    let mut b = vec![0u8; 4096];
    for _ in 0..30 {
        v.read(2 * STRIPE, &mut b).unwrap();
    }
    let task = RotationTask::start(p.keys.clone(), vols(&p)).unwrap();
    wait_for("the hot stripe to be re-keyed", 10, || {
        p.keys.progress().hot_stripes_done >= 1
    });
    let u = v.scan_key_usage().unwrap();
    let per_stripe = STRIPE / 4096;
    assert_eq!(
        u.by_key.get(&(1, epoch2)),
        Some(&per_stripe),
        "only the hot stripe moved: {u:?}"
    );
    // Now every epoch is past max_age: the cold stripes follow, oldest first.
    let mut fast = p.keys.policy();
    fast.max_age = Duration::from_secs(1);
    fast.period = Duration::from_secs(1);
    p.keys.set_policy(fast);
    wait_for("every block to be re-keyed", 20, || {
        let u = v.scan_key_usage().unwrap();
        u.by_key.keys().all(|k| k.1 > 1) && u.by_key.values().sum::<u64>() == 4 * per_stripe
    });
    task.stop();
    let prog = p.keys.progress();
    assert!(prog.blocks_done >= 4 * per_stripe, "{prog:?}");
    assert_eq!(read_all(&v, data.len()), data);
}

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

/// The files of the pool (store, key slots, disks, shares: everything under the pool dir)
/// that contain `needle`.
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut files = Vec::new();
    files_under(dir, &mut files);
    files
        .into_iter()
        .filter(|f| {
            let data = std::fs::read(f).unwrap();
            data.windows(needle.len()).any(|w| w == needle)
        })
        .collect()
}

/// The forms a wrapped key can take in a file: raw bytes, and the JSON array the superblock
/// and the store write (`[12,34,...]`), first 16 bytes.
fn forms(wrapped: &[u8]) -> Vec<Vec<u8>> {
    let json: Vec<String> = wrapped[..16].iter().map(|b| b.to_string()).collect();
    vec![wrapped.to_vec(), json.join(",").into_bytes()]
}

#[test]
fn destroy_is_refused_while_needed_then_the_key_is_gone_from_every_file() {
    let t = new_pool(3, 2);
    let p = Pool::open(&t.pool, &t.shares[..2]).unwrap();
    let v = p.volumes["vol0"].clone();
    let data = pattern(11, (2 * STRIPE) as usize);
    v.write(0, &data, true).unwrap();
    let pool_rec = p.store.pool().unwrap();
    let v1 = KeySlots::in_pool(&t.pool)
        .get(1, &pool_rec.split_id)
        .unwrap()
        .unwrap();
    // The wrapped key is where recovery needs it: key slots and superblocks.
    for f in forms(&v1) {
        assert!(!files_containing(&t.pool, &f).is_empty());
    }

    assert_eq!(p.keys.rotate_master().unwrap(), 2);
    assert_eq!(p.keys.write_key().0, 2);
    let e = p.keys.destroy(2, &vols(&p)).unwrap_err().to_string();
    assert!(e.contains("active"), "{e}");
    let e = p.keys.destroy(1, &vols(&p)).unwrap_err().to_string();
    assert!(e.contains("blocks still need it"), "{e}");
    let e = p.keys.archive(1, &vols(&p)).unwrap_err().to_string();
    assert!(e.contains("blocks still need it"), "{e}");
    // New writes already use version 2.
    v.write(0, &data[..4096], false).unwrap();
    let u = v.scan_key_usage().unwrap();
    assert_eq!(u.blocks_of_version(2), 1, "{u:?}");
    // `key rotate` starts a new epoch and re-encrypts everything under it.
    let (_, rewritten) = p.keys.rotate_now(&vols(&p), None, &|_, _, _| {}).unwrap();
    assert_eq!(rewritten, 2 * STRIPE / 4096);
    // Journal included: blocks of version 1 may sit in the journal until destroy destages.
    p.keys.destroy(1, &vols(&p)).unwrap();
    assert_eq!(p.store.key(1).unwrap().unwrap().state, KeyState::Destroyed);
    assert_eq!(read_all(&v, data.len()), data);
    p.close().unwrap();
    drop((v, p));

    for f in forms(&v1) {
        let left = files_containing(&t.pool, &f);
        assert!(
            left.is_empty(),
            "wrapped key of version 1 still in {left:?}"
        );
    }
    // The pool still opens and reads everything; version 1 is not loaded.
    let p = Pool::open(&t.pool, &t.shares[1..]).unwrap();
    assert_eq!(p.keys.ring().versions(), vec![2]);
    assert_eq!(read_all(&p.volumes["vol0"], data.len()), data);
    let e = p.keys.destroy(1, &vols(&p)).unwrap_err().to_string();
    assert!(e.contains("already destroyed"), "{e}");
}

#[test]
fn archive_unloads_a_version_and_retention_then_destroys_it() {
    let t = new_pool(3, 2);
    let mut policy = KeyPolicy::default();
    policy.rotation.retention = Duration::from_secs(2);
    let p = Pool::open_with(&t.pool, &t.shares[..2], &policy).unwrap();
    let v = p.volumes["vol0"].clone();
    let data = pattern(5, STRIPE as usize);
    v.write(0, &data, false).unwrap();
    p.keys.rotate_master().unwrap();
    p.keys.rotate_now(&vols(&p), None, &|_, _, _| {}).unwrap();
    p.keys.archive(1, &vols(&p)).unwrap();
    assert_eq!(p.keys.ring().versions(), vec![2]);
    assert_eq!(read_all(&v, data.len()), data);
    let st = p.keys.status(&vols(&p)).unwrap();
    let v1 = st.versions.iter().find(|x| x.version == 1).unwrap();
    assert_eq!(v1.state, "archived");
    assert!(v1.destroy_after_unix.is_some());
    // Retention not over: kept.
    assert!(
        p.keys
            .destroy_expired(&vols(&p), now_unix())
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        p.keys.destroy_expired(&vols(&p), now_unix() + 3).unwrap(),
        vec![1]
    );
    assert_eq!(p.store.key(1).unwrap().unwrap().state, KeyState::Destroyed);
}

#[test]
fn unlock_session_two_of_three_stays_sealed_three_opens_corrupt_share_is_named() {
    let t = new_pool(5, 3);
    {
        let p = Pool::open(&t.pool, &t.shares[..3]).unwrap();
        p.volumes["vol0"].write(0, &pattern(9, 8192), true).unwrap();
        p.close().unwrap();
    }
    let store = Arc::new(pool::open_store(&t.pool).unwrap());
    let rec = store.pool().unwrap();
    let mut s = UnlockSession::new(
        rec.pool_id,
        rec.split_id,
        rec.threshold,
        UnlockPolicy::default(),
    );
    let load = |p: &Path| kms::load_share_file(p).unwrap();
    assert!(matches!(
        s.add(load(&t.shares[0]), now_unix()).unwrap(),
        Step::Progress { have: 1, need: 3 }
    ));
    assert!(matches!(
        s.add(load(&t.shares[1]), now_unix()).unwrap(),
        Step::Progress { have: 2, need: 3 }
    ));
    // A corrupt share file is refused on its own, by name, before it reaches the session.
    let bad = t.pool.join("corrupt-share.txt");
    let mut text = std::fs::read_to_string(&t.shares[2]).unwrap();
    let at = text.find("secret: ").unwrap() + 9;
    let c = if &text[at..at + 1] == "0" { "1" } else { "0" };
    text.replace_range(at..at + 1, c);
    std::fs::write(&bad, text).unwrap();
    let e = kms::load_share_file(&bad).unwrap_err().to_string();
    assert!(
        e.contains("corrupt-share.txt") && e.contains("checksum"),
        "{e}"
    );
    assert_eq!(
        s.progress(now_unix()),
        (2, 3),
        "still sealed, progress kept"
    );
    let kek = match s.add(load(&t.shares[4]), now_unix()).unwrap() {
        Step::Complete(k) => k,
        other => panic!("expected the KEK: {other:?}"),
    };
    let p = Pool::open_unlocked(&t.pool, store, kek, &KeyPolicy::default(), "1,2,5").unwrap();
    let mut b = vec![0u8; 8192];
    p.volumes["vol0"].read(0, &mut b).unwrap();
    assert_eq!(b, pattern(9, 8192));
}

#[test]
fn access_windows_refuse_unsealing_with_a_policy_message() {
    let t = new_pool(3, 2);
    let hour = (now_unix() % 86_400 / 3600) as u8;
    let mut policy = KeyPolicy::default();
    // A two-hour window that excludes the current hour.
    policy.unlock.allowed_hours =
        Some(Hours::parse(&format!("{:02}-{:02}", (hour + 2) % 24, (hour + 4) % 24)).unwrap());
    let e = Pool::open_with(&t.pool, &t.shares[..2], &policy)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("refused by policy") && e.contains("allowed_hours"),
        "{e}"
    );
    let mut policy = KeyPolicy::default();
    policy.unlock.not_after = Some(now_unix() - 10);
    let e = Pool::open_with(&t.pool, &t.shares[..2], &policy)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("not_after"), "{e}");
    // Inside the window it opens.
    policy.unlock.not_after = Some(now_unix() + 3600);
    policy.unlock.allowed_hours =
        Some(Hours::parse(&format!("{:02}-{:02}", hour, (hour + 1) % 24)).unwrap());
    assert!(Pool::open_with(&t.pool, &t.shares[..2], &policy).is_ok());
}

#[test]
fn reissue_makes_a_new_split_and_old_shares_are_refused() {
    let t = new_pool(3, 2);
    let new_dir = t.pool.parent().unwrap().join("new-shares");
    let data = pattern(4, 3 * 4096);
    let old_split;
    {
        let p = Pool::open(&t.pool, &t.shares[..2]).unwrap();
        p.volumes["vol0"].write(0, &data, true).unwrap();
        p.keys.rotate_master().unwrap();
        old_split = p.store.pool().unwrap().split_id;
        let files = p.keys.reissue(4, 3, &new_dir).unwrap();
        assert_eq!(files.len(), 4);
        p.close().unwrap();
    }
    let e = Pool::open(&t.pool, &t.shares[..2])
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("another split"), "{e}");
    let new_shares = pool::shares_in(&new_dir).unwrap();
    let e = Pool::open(&t.pool, &new_shares[..2])
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("2 shares given, this pool needs 3"), "{e}");
    let p = Pool::open(&t.pool, &new_shares[1..]).unwrap();
    let mut b = vec![0u8; data.len()];
    p.volumes["vol0"].read(0, &mut b).unwrap();
    assert_eq!(b, data);
    // Nothing wrapped under the old KEK is left in the key slots.
    let slots = KeySlots::in_pool(&t.pool);
    for v in [1, 2] {
        assert!(slots.get(v, &old_split).unwrap().is_none());
    }
    let st = p.keys.status(&vols(&p)).unwrap();
    assert_eq!((st.shares, st.threshold), (4, 3));
    // Offline re-split of a stopped pool works too (store + disks + shares).
    p.close().unwrap();
    drop(p);
    let store = pool::open_store(&t.pool).unwrap();
    let disks = pool::open_pool_disks(&store).unwrap();
    let kek = pool::unlock_kek(&store, &new_shares[..3]).unwrap();
    let third = t.pool.parent().unwrap().join("third");
    shardvol::lifecycle::reissue_with(&store, &disks, &kek, 2, 2, &third).unwrap();
    drop((store, disks));
    let p = Pool::open(&t.pool, &pool::shares_in(&third).unwrap()).unwrap();
    assert_eq!(PoolKeys::usage(&vols(&p)).unwrap().unknown, 0);
}
