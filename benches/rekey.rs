//! Re-encryption throughput and its effect on client writes, on a real pool of file-backed
//! disks in a temp dir (page cache): `cargo bench --bench rekey`.
//!
//! 1. `key rotate` speed: 64 MiB written and destaged, a new epoch, every stripe re-keyed,
//!    then destaged: MB/s of data re-encrypted (journal append + destage, as client writes).
//! 2. Client 64 KiB writes for a few seconds: alone, with the rotation task at 20 MB/s, and
//!    with the rotation task unlimited (`rotation.rate = 0`), as MB/s of client data.
//!
//! One run, on a shared machine: compare the rows with each other, not with other runs.

use std::time::{Duration, Instant};

use shardvol::kms::policy::KeyPolicy;
use shardvol::layout::StripeId;
use shardvol::lifecycle::RotationTask;
use shardvol::pool::{self, CreateOptions, DiskSpec, Pool};
use shardvol::volume::BlockDevice;

const MIB: u64 = 1 << 20;
const DATA: u64 = 64 * MIB;
const CLIENT_SECS: u64 = 3;

fn new_pool(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    pool::create(&CreateOptions {
        pool: dir.join("pool"),
        volume: "vol0".into(),
        size: 256 * MIB,
        data: 4,
        parity: 2,
        chunk_size: 64 << 10,
        disks: DiskSpec::Files(6),
        shares: 1,
        threshold: 1,
        share_dir: dir.join("shares"),
        journal_size: 128 * MIB,
    })
    .unwrap()
    .share_files
}

fn fill(p: &Pool) {
    let v = &p.volumes["vol0"];
    let chunk: Vec<u8> = (0..MIB as usize).map(|i| (i * 31 % 251) as u8).collect();
    for i in 0..DATA / MIB {
        v.write(i * MIB, &chunk, false).unwrap();
    }
    v.flush().unwrap();
    v.destage().unwrap();
}

/// Client 64 KiB writes over the second half of the volume for `CLIENT_SECS`: MB/s.
fn client(p: &Pool) -> f64 {
    let v = &p.volumes["vol0"];
    let buf = vec![0x5au8; 64 << 10];
    let t0 = Instant::now();
    let mut n = 0u64;
    let mut at = 128 * MIB;
    while t0.elapsed() < Duration::from_secs(CLIENT_SECS) {
        v.write(at, &buf, false).unwrap();
        n += buf.len() as u64;
        at += buf.len() as u64;
        if at >= 256 * MIB {
            at = 128 * MIB;
        }
    }
    v.flush().unwrap();
    n as f64 / 1e6 / t0.elapsed().as_secs_f64()
}

fn main() {
    let tmp = tempfile::tempdir().unwrap();
    let shares = new_pool(tmp.path());
    let dir = tmp.path().join("pool");

    // 1. Re-key everything now.
    let p = Pool::open(&dir, &shares).unwrap();
    fill(&p);
    let v = p.volumes["vol0"].clone();
    p.keys.advance_epoch(shardvol::now_unix()).unwrap();
    let t0 = Instant::now();
    let mut blocks = 0;
    for s in 0..v.stripes() {
        blocks += v.rekey_stripe(StripeId(s)).unwrap();
    }
    let appended = t0.elapsed();
    v.destage().unwrap();
    let total = t0.elapsed();
    let mb = blocks as f64 * 4096.0 / 1e6;
    println!(
        "re-key of {} MiB ({blocks} blocks): {:.0} MB/s through the journal, {:.0} MB/s including destage",
        DATA / MIB,
        mb / appended.as_secs_f64(),
        mb / total.as_secs_f64()
    );
    drop(v);
    p.close().unwrap();
    drop(p);

    // 2. Client writes alone and beside the rotation task.
    let mut rows = Vec::new();
    for (label, rate) in [
        ("no rotation", None),
        ("rotation at 20 MB/s", Some(20_000_000)),
        ("rotation unlimited", Some(0)),
    ] {
        let mut policy = KeyPolicy::default();
        policy.rotation.max_age = Duration::from_secs(1);
        policy.rotation.period = Duration::from_secs(1);
        if let Some(r) = rate {
            policy.rotation.rate_bytes = r;
        }
        let p = Pool::open_with(&dir, &shares, &policy).unwrap();
        // Everything written so far is due: its epoch is older than max_age.
        std::thread::sleep(Duration::from_millis(1100));
        let task = rate.map(|_| {
            RotationTask::start(p.keys.clone(), p.volumes.values().cloned().collect()).unwrap()
        });
        let before = p.keys.progress().blocks_done;
        let mbs = client(&p);
        let rekeyed = p.keys.progress().blocks_done - before;
        if let Some(t) = task {
            t.stop();
        }
        rows.push((
            label,
            mbs,
            rekeyed as f64 * 4096.0 / 1e6 / CLIENT_SECS as f64,
        ));
        p.close().unwrap();
    }
    println!("client 64 KiB writes for {CLIENT_SECS} s:");
    println!("  {:<22} {:>12} {:>16}", "", "client MB/s", "re-keyed MB/s");
    for (label, c, r) in rows {
        println!("  {label:<22} {c:>12.0} {r:>16.1}");
    }
}
