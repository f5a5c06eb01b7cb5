//! The pool's redb metadata store: creation, opening, records, names, allocation bitmaps, and
//! refusal of missing, foreign and damaged files.

use std::fs;
use std::path::{Path, PathBuf};

use shardvol::layout::{DiskId, Geometry};
use shardvol::meta::{
    DiskRecord, DiskState, KeyRecord, KeyState, MetaError, MetaStore, PoolRecord, VolumeRecord,
};

fn pool() -> PoolRecord {
    PoolRecord {
        pool_id: [1; 16],
        split_id: [2; 16],
        share_count: 5,
        threshold: 3,
        created_unix: 10,
    }
}

fn disk(id: u32) -> DiskRecord {
    DiskRecord {
        id: DiskId(id),
        path: PathBuf::from(format!("/srv/disk{id}.img")),
        domain: format!("host{}", id % 2),
        size: 1 << 30,
        state: DiskState::Ok,
    }
}

fn volume(id: u64, name: &str) -> VolumeRecord {
    VolumeRecord {
        id,
        name: name.into(),
        size: 8 << 30,
        geometry: Geometry::new(4, 2, 1 << 16).unwrap(),
        placement_seed: [id as u8; 32],
        region_offset: 1 << 20,
        journal_size: 1 << 28,
        region_size: 4 << 30,
        journal_disks: Vec::new(),
        rebalance: None,
        created_unix: 1_700_000_000 + id,
    }
}

fn key(version: u32, state: KeyState) -> KeyRecord {
    KeyRecord {
        version,
        wrapped: vec![version as u8; 60],
        state,
        created_unix: 20 + u64::from(version),
    }
}

/// The error's message, which must name the store path.
fn store_msg(err: MetaError, path: &Path) -> String {
    let msg = err.to_string();
    assert!(matches!(err, MetaError::Store { .. }), "{msg}");
    assert!(
        msg.contains(&path.display().to_string()),
        "path not named: {msg}"
    );
    msg
}

fn open_err(path: &Path) -> String {
    match MetaStore::open(path) {
        Ok(_) => panic!("{} opened", path.display()),
        Err(e) => store_msg(e, path),
    }
}

#[test]
fn records_round_trip_and_persist() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("pool.redb");
    {
        let s = MetaStore::create(&path).unwrap();
        s.put_pool(&pool()).unwrap();
        for id in [3, 1, 2] {
            s.put_disk(&disk(id)).unwrap();
        }
        s.put_volume(&volume(1, "db")).unwrap();
        s.put_volume(&volume(2, "web")).unwrap();
        s.put_key(&key(1, KeyState::Active)).unwrap();
        s.put_key(&key(1, KeyState::Retired)).unwrap();
        s.put_key(&key(2, KeyState::Active)).unwrap();
        let mut failed = disk(2);
        failed.state = DiskState::Failed;
        s.put_disk(&failed).unwrap();
    }
    let s = MetaStore::open(&path).unwrap();
    assert_eq!(s.path(), path);
    assert_eq!(s.pool().unwrap(), pool());
    let disks = s.disks().unwrap();
    assert_eq!(disks.iter().map(|d| d.id.0).collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!(disks[1].state, DiskState::Failed);
    assert_eq!(s.disk(DiskId(3)).unwrap(), Some(disk(3)));
    assert_eq!(s.disk(DiskId(9)).unwrap(), None);
    assert_eq!(
        s.volumes().unwrap(),
        vec![volume(1, "db"), volume(2, "web")]
    );
    assert_eq!(s.volume(2).unwrap(), Some(volume(2, "web")));
    assert_eq!(s.volume_by_name("db").unwrap(), Some(volume(1, "db")));
    assert_eq!(s.volume_by_name("nope").unwrap(), None);
    assert_eq!(
        s.keys().unwrap(),
        vec![key(1, KeyState::Retired), key(2, KeyState::Active)]
    );
    assert_eq!(s.key(2).unwrap(), Some(key(2, KeyState::Active)));
}

#[test]
fn a_volume_record_without_a_creation_time_reads_as_zero() {
    let mut json = serde_json::to_value(volume(1, "db")).unwrap();
    json.as_object_mut()
        .unwrap()
        .remove("created_unix")
        .unwrap();
    let old: VolumeRecord = serde_json::from_value(json).unwrap();
    assert_eq!(old.created_unix, 0);
    assert_eq!(
        old,
        VolumeRecord {
            created_unix: 0,
            ..volume(1, "db")
        }
    );
}

#[test]
fn missing_pool_record_is_an_error_naming_the_store() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("pool.redb");
    let s = MetaStore::create(&path).unwrap();
    let msg = store_msg(s.pool().unwrap_err(), &path);
    assert!(msg.contains("no pool record"), "{msg}");
}

#[test]
fn volume_names_are_unique() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("pool.redb");
    let s = MetaStore::create(&path).unwrap();
    s.put_volume(&volume(1, "db")).unwrap();
    let msg = store_msg(s.put_volume(&volume(2, "db")).unwrap_err(), &path);
    assert!(
        msg.contains("\"db\"") && msg.contains("already used by volume 1"),
        "{msg}"
    );
    assert_eq!(s.volumes().unwrap(), vec![volume(1, "db")]);

    // Updating a volume under its own name is fine; renaming frees the old name.
    let mut bigger = volume(1, "db");
    bigger.size *= 2;
    s.put_volume(&bigger).unwrap();
    s.put_volume(&volume(1, "db-old")).unwrap();
    assert_eq!(s.volume_by_name("db").unwrap(), None);
    s.put_volume(&volume(2, "db")).unwrap();
    assert_eq!(s.volume_by_name("db").unwrap().unwrap().id, 2);
    assert_eq!(s.volume_by_name("db-old").unwrap().unwrap().id, 1);
}

#[test]
fn allocation_bitmaps_commit_load_and_delete() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("pool.redb");
    {
        let s = MetaStore::create(&path).unwrap();
        s.put_volume(&volume(1, "a")).unwrap();
        s.put_volume(&volume(2, "b")).unwrap();
        assert!(s.alloc_load(1).unwrap().is_empty());
        s.alloc_commit(
            1,
            &[
                (0, Some(vec![1, 2])),
                (7, Some(vec![u64::MAX])),
                (u64::MAX, Some(vec![5])),
            ],
        )
        .unwrap();
        s.alloc_commit(2, &[(0, Some(vec![9]))]).unwrap();
        // Replace one, delete one, delete one that does not exist: one transaction.
        s.alloc_commit(1, &[(0, Some(vec![3, 4, 5])), (7, None), (8, None)])
            .unwrap();
    }
    let s = MetaStore::open(&path).unwrap();
    assert_eq!(
        s.alloc_load(1).unwrap(),
        vec![(0, vec![3, 4, 5]), (u64::MAX, vec![5])]
    );
    assert_eq!(s.alloc_load(2).unwrap(), vec![(0, vec![9])]);
    assert!(s.alloc_load(3).unwrap().is_empty());

    assert!(s.remove_volume(1).unwrap());
    assert!(!s.remove_volume(1).unwrap());
    assert!(s.alloc_load(1).unwrap().is_empty());
    assert_eq!(s.volume_by_name("a").unwrap(), None);
    assert_eq!(s.alloc_load(2).unwrap(), vec![(0, vec![9])]);
}

#[test]
fn create_refuses_an_existing_file() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("pool.redb");
    fs::write(&path, b"precious").unwrap();
    let msg = store_msg(MetaStore::create(&path).err().unwrap(), &path);
    assert!(msg.contains("already exists"), "{msg}");
    assert_eq!(fs::read(&path).unwrap(), b"precious");

    let other = tmp.path().join("store.redb");
    drop(MetaStore::create(&other).unwrap());
    assert!(MetaStore::create(&other).is_err());
    MetaStore::open(&other).unwrap();
}

#[test]
fn open_refuses_missing_empty_and_directory_paths() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nope.redb");
    assert!(open_err(&missing).contains("does not exist"));
    assert!(!missing.exists(), "open must not create");

    let empty = tmp.path().join("empty.redb");
    fs::write(&empty, b"").unwrap();
    assert!(open_err(&empty).contains("is empty"));
    assert_eq!(
        fs::metadata(&empty).unwrap().len(),
        0,
        "open must not initialise"
    );

    assert!(open_err(tmp.path()).contains("not a regular file"));
}

#[test]
fn open_refuses_random_bytes_without_panicking() {
    let tmp = tempfile::tempdir().unwrap();
    for (i, len) in [1usize, 100, 4096, 70_000, 1 << 20].into_iter().enumerate() {
        let path = tmp.path().join(format!("random-{i}.redb"));
        let mut bytes = vec![0u8; len];
        rand::fill(&mut bytes[..]);
        fs::write(&path, &bytes).unwrap();
        let msg = open_err(&path);
        assert!(msg.contains("not a shardvol metadata store"), "{msg}");
        assert_eq!(
            fs::read(&path).unwrap(),
            bytes,
            "open modified a foreign file"
        );
    }
}

#[test]
fn open_refuses_a_redb_file_of_another_program() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("other.redb");
    {
        let db = redb::Database::create(&path).unwrap();
        let t: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("things");
        let txn = db.begin_write().unwrap();
        txn.open_table(t).unwrap().insert("a", &1).unwrap();
        txn.commit().unwrap();
    }
    let msg = open_err(&path);
    assert!(
        msg.contains("not a shardvol metadata store (no format version entry)"),
        "{msg}"
    );
}

#[test]
fn open_refuses_a_newer_store_format() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("pool.redb");
    drop(MetaStore::create(&path).unwrap());
    {
        let db = redb::Database::open(&path).unwrap();
        let t: redb::TableDefinition<&str, u32> = redb::TableDefinition::new("shardvol");
        let txn = db.begin_write().unwrap();
        txn.open_table(t)
            .unwrap()
            .insert("format_version", &2)
            .unwrap();
        txn.commit().unwrap();
    }
    let msg = open_err(&path);
    assert!(msg.contains("format version 2 is newer"), "{msg}");
}

#[test]
fn open_refuses_a_damaged_store_without_panicking() {
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("good.redb");
    {
        let s = MetaStore::create(&good).unwrap();
        s.put_pool(&pool()).unwrap();
        for id in 0..50 {
            s.put_disk(&disk(id)).unwrap();
        }
    }
    let bytes = fs::read(&good).unwrap();
    // Damage the pages (past redb's header region) one spot at a time.
    let mut refused = 0;
    for (i, pos) in (4096..bytes.len()).step_by(bytes.len() / 16).enumerate() {
        let path = tmp.path().join(format!("damaged-{i}.redb"));
        let mut bad = bytes.clone();
        for b in &mut bad[pos..(pos + 64).min(bytes.len())] {
            *b ^= 0xa5;
        }
        fs::write(&path, &bad).unwrap();
        // A damaged spot in free space is harmless; anything else must be an error, not a panic.
        match MetaStore::open(&path) {
            Ok(s) => assert_eq!(s.pool().unwrap(), pool()),
            Err(e) => {
                store_msg(e, &path);
                refused += 1;
            }
        }
    }
    assert!(refused > 0, "no damage was detected");
}

#[test]
fn a_store_open_twice_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("pool.redb");
    let _s = MetaStore::create(&path).unwrap();
    let msg = open_err(&path);
    assert!(msg.contains("already open"), "{msg}");
}
