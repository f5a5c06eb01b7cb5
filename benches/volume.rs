//! Whole-volume throughput through in-memory disks: 4 KiB and 1 MiB writes (journal append)
//! and reads (from the chunk slots, after destaging), plus destaging itself, in GB/s.
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
use shardvol::volume::{BlockDevice, Volume, VolumeParts, WriteKey};

const VOLUME: u64 = 256 << 20;

fn volume(dir: &std::path::Path, chunk: u32) -> Arc<Volume> {
    let store = Arc::new(MetaStore::create(&dir.join(format!("bench-{chunk}.redb"))).unwrap());
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
    };
    record.region_size = Volume::layout_of(&record).region_size();
    store.put_volume(&record).unwrap();
    let size = record.region_offset + record.region_size;
    let disks: HashMap<DiskId, DiskRef> = (0..6)
        .map(|i| {
            (
                DiskId(i),
                Arc::new(MemDisk::new(format!("m{i}"), size)) as DiskRef,
            )
        })
        .collect();
    let table = (0..6)
        .map(|i| PlacementDisk {
            id: DiskId(i),
            domain: format!("d{i}"),
        })
        .collect();
    let keys = Arc::new(KeyRing::new([1; 16]));
    keys.insert(1, MasterKey::from_bytes([5; 32]));
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
    // Fill the volume and cycle the journal once, so that the memory disks have allocated
    // every page: the measurement is then the engine's steady state, not first-touch faults.
    let fill = vec![0xa5u8; 4 << 20];
    for i in 0..VOLUME / fill.len() as u64 {
        vol.write(i * fill.len() as u64, &fill, false).unwrap();
    }
    vol.destage().unwrap();
    vol
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    for chunk in [64 << 10, 256 << 10] {
        let vol = volume(dir.path(), chunk);
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
}

criterion_group!(benches, bench);
criterion_main!(benches);
