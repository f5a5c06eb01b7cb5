//! Superblock slot encoding, decoding and the A/B choice, as pure functions on bytes.
//! (Reading and writing through a `Disk` is exercised once a disk backend exists.)

use std::path::PathBuf;

use proptest::prelude::*;
use shardvol::layout::{DiskId, Geometry};
use shardvol::meta::{
    DiskRecord, DiskState, KeyRecord, KeyState, MAX_BODY_LEN, PoolRecord, SLOT_HEADER_LEN,
    SLOT_OFFSETS, SLOT_SIZE, SUPERBLOCK_AREA, SUPERBLOCK_FORMAT_VERSION, SlotError, Superblock,
    VolumeRecord, choose_slot, decode_slot, encode_slot, slot_for_seq,
};

fn sample(seq: u64) -> Superblock {
    Superblock {
        seq,
        disk_id: DiskId(2),
        pool: PoolRecord {
            pool_id: [7; 16],
            split_id: [9; 16],
            share_count: 5,
            threshold: 3,
            created_unix: 1_700_000_000,
        },
        disks: (0..6)
            .map(|i| DiskRecord {
                id: DiskId(i),
                path: PathBuf::from(format!("/dev/disk/by-id/ata-disk{i}")),
                domain: format!("rack{}", i % 3),
                size: 4 << 40,
                state: if i == 4 {
                    DiskState::Rebuilding
                } else {
                    DiskState::Ok
                },
            })
            .collect(),
        volumes: vec![VolumeRecord {
            id: 1,
            name: "vm-root".into(),
            size: 100 << 30,
            geometry: Geometry::new(4, 2, 64 << 10).unwrap(),
            placement_seed: [3; 32],
            region_offset: SUPERBLOCK_AREA,
            journal_size: 1 << 30,
            region_size: 40 << 30,
            journal_disks: Vec::new(),
            rebalance: None,
            created_unix: 0,
        }],
        keys: vec![KeyRecord {
            version: 1,
            wrapped: (0..60).collect(),
            state: KeyState::Active,
            created_unix: 1_700_000_001,
        }],
    }
}

fn le32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

/// Sets a header field and recomputes the header checksum, as a writer of that header would.
fn set_header_u32(slot: &mut [u8], off: usize, v: u32) {
    slot[off..off + 4].copy_from_slice(&v.to_le_bytes());
    let crc = crc32c::crc32c(&slot[..SLOT_HEADER_LEN - 4]);
    slot[SLOT_HEADER_LEN - 4..SLOT_HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
}

#[test]
fn slot_round_trip_and_header_table() {
    let sb = sample(41);
    let slot = encode_slot(&sb).unwrap();
    assert_eq!(decode_slot(&slot).unwrap(), sb);

    assert_eq!(&slot[0..8], b"SHRDVOL\0");
    assert_eq!(le32(&slot, 8), SUPERBLOCK_FORMAT_VERSION);
    assert_eq!(le32(&slot, 12) as usize, SLOT_HEADER_LEN);
    assert_eq!(u64::from_le_bytes(slot[16..24].try_into().unwrap()), 41);
    let body_len = le32(&slot, 24) as usize;
    assert_eq!(slot.len(), SLOT_HEADER_LEN + body_len);
    assert_eq!(le32(&slot, 28), crc32c::crc32c(&slot[SLOT_HEADER_LEN..]));
    assert_eq!(le32(&slot, 32), crc32c::crc32c(&slot[..32]));

    // Whatever follows the body in the slot (old bytes, padding) is ignored.
    let mut padded = slot.clone();
    padded.extend_from_slice(&[0xee; 5000]);
    assert_eq!(decode_slot(&padded).unwrap(), sb);
}

#[test]
fn every_single_byte_corruption_is_detected() {
    let sb = sample(8);
    let slot = encode_slot(&sb).unwrap();
    let body_positions = (SLOT_HEADER_LEN..slot.len())
        .step_by(7)
        .chain([slot.len() - 1]);
    for pos in (0..SLOT_HEADER_LEN).chain(body_positions) {
        for mask in [0x01u8, 0x80, 0xff, 0x5a] {
            let mut bad = slot.clone();
            bad[pos] ^= mask;
            let err = decode_slot(&bad).expect_err(&format!("byte {pos} ^ {mask:#x} not detected"));
            let expected_kind = match pos {
                0..8 => matches!(err, SlotError::BadMagic),
                // A damaged header-length field may point outside the bounds or at other bytes.
                12..16 => matches!(
                    err,
                    SlotError::HeaderChecksum
                        | SlotError::BadHeaderLen(_)
                        | SlotError::Truncated { .. }
                ),
                8..36 => err == SlotError::HeaderChecksum,
                _ => err == SlotError::BodyChecksum,
            };
            assert!(expected_kind, "byte {pos} ^ {mask:#x}: {err}");
        }
    }
}

#[test]
fn truncated_slots_are_refused() {
    let slot = encode_slot(&sample(3)).unwrap();
    for len in 0..slot.len() {
        let err = decode_slot(&slot[..len]).expect_err(&format!("prefix of {len} bytes accepted"));
        assert!(matches!(err, SlotError::Truncated { .. }), "{len}: {err}");
    }
}

#[test]
fn empty_and_foreign_slots() {
    assert_eq!(decode_slot(&[0u8; 4096]).unwrap_err(), SlotError::Empty);
    let mut ext4ish = vec![0u8; 4096];
    ext4ish[1080] = 0x53;
    ext4ish[0] = 0xeb;
    assert_eq!(decode_slot(&ext4ish).unwrap_err(), SlotError::BadMagic);
}

#[test]
fn version_and_layout_fields_are_checked() {
    let slot = encode_slot(&sample(5)).unwrap();

    let mut newer = slot.clone();
    set_header_u32(&mut newer, 8, SUPERBLOCK_FORMAT_VERSION + 1);
    assert_eq!(decode_slot(&newer).unwrap_err(), SlotError::NewerVersion(2));
    assert!(
        decode_slot(&newer)
            .unwrap_err()
            .to_string()
            .contains("newer")
    );

    let mut zero = slot.clone();
    set_header_u32(&mut zero, 8, 0);
    assert_eq!(decode_slot(&zero).unwrap_err(), SlotError::BadVersion(0));

    let mut huge_body = slot.clone();
    set_header_u32(&mut huge_body, 24, u32::MAX);
    assert!(matches!(
        decode_slot(&huge_body).unwrap_err(),
        SlotError::BodyTooLarge { .. }
    ));

    let mut huge_header = slot.clone();
    huge_header[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(
        decode_slot(&huge_header).unwrap_err(),
        SlotError::BadHeaderLen(u32::MAX)
    );

    // Header seq rewritten with a valid header checksum: disagrees with the body.
    let mut seq = slot.clone();
    seq[16..24].copy_from_slice(&6u64.to_le_bytes());
    set_header_u32(&mut seq, 24, le32(&slot, 24));
    assert_eq!(
        decode_slot(&seq).unwrap_err(),
        SlotError::SeqMismatch { header: 6, body: 5 }
    );

    // A body with valid checksums that is not a superblock.
    let mut not_json = slot[..SLOT_HEADER_LEN].to_vec();
    not_json.extend_from_slice(b"{\"hello\":1}");
    set_header_u32(&mut not_json, 24, 11);
    set_header_u32(&mut not_json, 28, crc32c::crc32c(b"{\"hello\":1}"));
    assert!(matches!(
        decode_slot(&not_json).unwrap_err(),
        SlotError::BadBody(_)
    ));
}

#[test]
fn oversized_superblock_is_refused_by_the_encoder() {
    let mut sb = sample(1);
    let disk = sb.disks[0].clone();
    sb.disks = (0..20_000u32)
        .map(|i| DiskRecord {
            id: DiskId(i),
            ..disk.clone()
        })
        .collect();
    match encode_slot(&sb) {
        Err(SlotError::BodyTooLarge { len, max }) => assert!(len > max && max == MAX_BODY_LEN),
        other => panic!("expected BodyTooLarge, got {other:?}"),
    }
}

proptest! {
    /// Garbage never decodes and never panics.
    #[test]
    fn garbage_is_refused(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        prop_assert!(decode_slot(&bytes).is_err());
    }

    /// Garbage behind a genuine magic and a plausible header is refused too.
    #[test]
    fn garbage_behind_the_magic_is_refused(tail in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let mut bytes = b"SHRDVOL\0".to_vec();
        bytes.extend_from_slice(&tail);
        prop_assert!(decode_slot(&bytes).is_err());
    }
}

/// The superblock area of one simulated disk.
struct Area(Vec<u8>);

impl Area {
    fn new() -> Self {
        Area(vec![0; SUPERBLOCK_AREA as usize])
    }
    /// Writes `sb` to its slot; with `landed`, only those 512-byte sectors of the write reach the
    /// disk (a torn write: any subset, in any order).
    fn write(&mut self, sb: &Superblock, landed: Option<&[bool]>) {
        let bytes = encode_slot(sb).unwrap();
        let base = SLOT_OFFSETS[slot_for_seq(sb.seq)] as usize;
        for (i, sector) in bytes.chunks(512).enumerate() {
            if landed.is_none_or(|l| l[i % l.len()]) {
                self.0[base + i * 512..base + i * 512 + sector.len()].copy_from_slice(sector);
            }
        }
    }
    fn read(&self) -> Result<(usize, Superblock), String> {
        let (a, b) = self.0.split_at(SLOT_SIZE as usize);
        choose_slot(a, b)
    }
}

#[test]
fn slots_alternate_and_the_newest_wins() {
    let mut area = Area::new();
    let err = area.read().unwrap_err();
    assert!(err.starts_with("not a shardvol disk"), "{err}");
    for seq in 1..=6 {
        area.write(&sample(seq), None);
        let (slot, sb) = area.read().unwrap();
        assert_eq!((slot, sb.seq), (slot_for_seq(seq), seq));
    }
    assert_eq!(SLOT_OFFSETS, [0, SUPERBLOCK_AREA / 2]);
}

proptest! {
    /// A write torn anywhere (any subset of its sectors) leaves either the new superblock or the
    /// previous one, never anything else and never an error.
    #[test]
    fn torn_write_leaves_the_previous_superblock(
        before in 1u64..5,
        landed in proptest::collection::vec(any::<bool>(), 1..40),
    ) {
        let mut area = Area::new();
        let mut sb = sample(0);
        for seq in 1..=before {
            sb.seq = seq;
            sb.volumes[0].size = seq << 30;
            area.write(&sb, None);
        }
        let previous = sb.clone();
        sb.seq += 1;
        sb.volumes[0].size = 999 << 30;
        sb.keys.push(KeyRecord { version: 2, wrapped: vec![1; 60], state: KeyState::Active, created_unix: 5 });
        area.write(&sb, Some(&landed));
        let (_, got) = area.read().unwrap();
        prop_assert!(got == previous || got == sb, "got seq {}", got.seq);
        if landed.iter().all(|&l| l) {
            prop_assert_eq!(got, sb);
        }
    }
}

#[test]
fn a_newer_format_in_either_slot_refuses_the_disk() {
    let mut area = Area::new();
    area.write(&sample(1), None);
    area.write(&sample(2), None);
    let b = SLOT_OFFSETS[1] as usize;
    set_header_u32(&mut area.0[b..b + SLOT_HEADER_LEN], 8, 9);
    let err = area.read().unwrap_err();
    assert!(
        err.contains("slot B") && err.contains("format version 9 is newer"),
        "{err}"
    );
}

#[test]
fn both_slots_damaged_is_reported_per_slot() {
    let mut area = Area::new();
    area.write(&sample(1), None);
    area.write(&sample(2), None);
    area.0[40] ^= 1;
    area.0[SLOT_OFFSETS[1] as usize + 20] ^= 1;
    let err = area.read().unwrap_err();
    assert!(
        err.starts_with("no valid superblock")
            && err.contains("slot A at offset 0: body checksum mismatch")
            && err.contains("slot B at offset 524288: header checksum mismatch"),
        "{err}"
    );
    // One good slot is enough: slot A holds seq 2 (even seqs go to A).
    area.0[40] ^= 1;
    assert_eq!(area.read().unwrap(), (0, sample(2)));
}
