//! Whole-volume throughput through in-memory disks: 4 KiB and 1 MiB writes (journal append)
//! and reads (from the chunk slots, after destaging), plus destaging itself, in GB/s; and
//! 1 MiB reads with one disk missing (a sixth of the blocks rebuilt from their rows).
//! These bound what the engine costs in CPU; disk and network costs come on top
//! (scripts/bench.sh measures the whole system).

use std::collections::HashMap;
use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use shardvol::crypto::{KeyRing, MasterKey};
use shardvol::disk::{DiskRef, MemDisk};
use shardvol::layout::placement::PlacementDisk;
use shardvol::layout::{DiskId, Geometry};
use shardvol::meta::{MetaStore, VolumeRecord};
use shardvol::volume::health::MissingDisk;
use shardvol::volume::{BlockDevice, Volume, VolumeParts, WriteKey};

const VOLUME: u64 = 256 << 20;

/// A filled and destaged volume of `VOLUME` bytes over six memory disks; with `missing`, it is
/// then reopened with that disk replaced by one that fails every I/O.
fn volume(dir: &std::path::Path, chunk: u32, missing: Option<u32>) -> Arc<Volume> {
    let store =
        Arc::new(MetaStore::create(&dir.join(format!("bench-{chunk}-{missing:?}.redb"))).unwrap());
    let geometry = Geometry::new(4, 2, chunk).unwrap();
    let mut record = VolumeRecord {
        id: 1,
        name: "bench".into(),
        size: VOLUME,
        geometry,
        placement_seed: [3; 32],
        region_offset: 1 << 20,
        journal_size: 256 << 20,
        region_size: 0,
        journal_disks: Vec::new(),
        rebalance: None,
        created_unix: 0,
    };
    record.region_size = Volume::layout_of(&record).region_size();
    store.put_volume(&record).unwrap();
    let size = record.region_offset + record.region_size;
    let mems: Vec<DiskRef> = (0..6)
        .map(|i| Arc::new(MemDisk::new(format!("m{i}"), size)) as DiskRef)
        .collect();
    let parts = |gone: Option<u32>| {
        let keys = Arc::new(KeyRing::new([1; 16]));
        keys.insert(1, MasterKey::from_bytes([5; 32]));
        VolumeParts {
            record: record.clone(),
            disks: (0..6u32)
                .map(|i| {
                    let d: DiskRef = if gone == Some(i) {
                        Arc::new(MissingDisk {
                            name: format!("m{i}"),
                            size,
                        })
                    } else {
                        mems[i as usize].clone()
                    };
                    (DiskId(i), d)
                })
                .collect::<HashMap<_, _>>(),
            table: (0..6)
                .map(|i| PlacementDisk {
                    id: DiskId(i),
                    domain: format!("d{i}"),
                })
                .collect(),
            keys,
            write_key: Arc::new(WriteKey::new(1, 1)),
            store: store.clone(),
        }
    };
    Volume::format(&parts(None)).unwrap();
    let vol = Volume::open(parts(None)).unwrap();
    // Fill the volume and cycle the journal once, so that the memory disks have allocated
    // every page: the measurement is then the engine's steady state, not first-touch faults.
    let fill = vec![0xa5u8; 4 << 20];
    for i in 0..VOLUME / fill.len() as u64 {
        vol.write(i * fill.len() as u64, &fill, false).unwrap();
    }
    vol.destage().unwrap();
    if missing.is_none() {
        return vol;
    }
    vol.close().unwrap();
    drop(vol);
    Volume::open(parts(missing)).unwrap()
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    for chunk in [64 << 10, 256 << 10] {
        let vol = volume(dir.path(), chunk, None);
        let mut g = c.benchmark_group(format!("volume 4+2 chunk {}K", chunk >> 10));
        for size in [4096usize, 1 << 20] {
            let data = vec![0x5au8; size];
            let slots = VOLUME / size as u64;
            g.throughput(Throughput::Bytes(size as u64));
            let mut i = 0u64;
            g.bench_with_input(BenchmarkId::new("write", size), &size, |b, _| {
                b.iter(|| {
                    // Spread writes over the volume (a prime stride) so destaging sees real work.
                    i = (i + 7919) % slots;
                    vol.write(i * size as u64, &data, false).unwrap();
                })
            });
            vol.destage().unwrap();
            let mut buf = vec![0u8; size];
            g.bench_with_input(BenchmarkId::new("read", size), &size, |b, _| {
                b.iter(|| {
                    i = (i + 7919) % slots;
                    vol.read(i * size as u64, &mut buf).unwrap();
                })
            });
        }
        g.finish();
        vol.close().unwrap();
    }
    // Degraded reads: disk 0 is gone, so a sixth of the blocks are rebuilt from their rows.
    let vol = volume(dir.path(), 64 << 10, Some(0));
    let mut g = c.benchmark_group("volume 4+2 chunk 64K, disk 0 missing");
    let size = 1usize << 20;
    let slots = VOLUME / size as u64;
    let mut buf = vec![0u8; size];
    let mut i = 0u64;
    g.throughput(Throughput::Bytes(size as u64));
    g.bench_with_input(BenchmarkId::new("read", size), &size, |b, _| {
        b.iter(|| {
            i = (i + 7919) % slots;
            vol.read(i * size as u64, &mut buf).unwrap();
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
