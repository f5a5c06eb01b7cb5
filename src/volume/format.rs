//! On-disk formats of a volume: the region layout, per-block metadata and journal records.
//! docs/formats-volume.md has the same tables with the reasons behind them.
//!
//! ## Region of a volume (identical offsets on every disk of the pool)
//!
//! | offset (from `region_offset`) | size | content |
//! |---|---|---|
//! | 0 | 4 KiB | journal checkpoint slot A |
//! | 4 KiB | 4 KiB | journal checkpoint slot B |
//! | 8 KiB | `journal_size - 8 KiB` | circular journal log (used on the `m + 1` journal disks) |
//! | `journal_size` | `stripes * slot_size` | chunk slots: slot `s` holds this disk's chunk of stripe `s` |
//!
//! A chunk slot is `chunk_size` bytes of chunk data followed by `meta_pages` 4 KiB pages holding
//! one 64-byte [`BlockMeta`] per block of the chunk. Every disk has a slot for every stripe; the
//! files are sparse, so slots of stripes placed elsewhere cost nothing on a file.
//!
//! ## Block metadata (64 bytes, little-endian)
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | generation: journal sequence number of the write; 0 = never written |
//! | 8 | 4 | master key version |
//! | 12 | 4 | epoch |
//! | 16 | 8 | logical block address |
//! | 24 | 4 | flags (reserved, 0) |
//! | 28 | 4 | reserved, 0 |
//! | 32 | 32 | tag: keyed over bytes 0..32 and the block's ciphertext |
//!
//! On parity chunks the 64 bytes at a block index are the Reed-Solomon parity of the data
//! chunks' metadata at that index, so a lost data chunk's metadata is rebuilt with its data.

use crate::layout::{BLOCK_SIZE, BLOCK_SIZE_U64, Geometry, Lba, StripeId};

/// Bytes of per-block metadata.
pub const META_SIZE: usize = 64;
/// Bytes of the metadata that the tag covers (everything before the tag).
pub const META_HEADER: usize = 32;
/// Journal checkpoint slots at the start of the region.
pub const CHECKPOINT_AREA: u64 = 2 * BLOCK_SIZE_U64;

/// Metadata of one block of one data chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct BlockMeta {
    pub generation: u64,
    pub version: u32,
    pub epoch: u32,
    pub lba: u64,
    pub flags: u32,
    /// Bytes 28..32: 0 when written. Kept as read so that the tag covers the stored bytes: a
    /// flipped bit here fails the block's check instead of passing unseen.
    pub reserved: u32,
    pub tag: [u8; 32],
}

impl BlockMeta {
    pub fn encode(&self) -> [u8; META_SIZE] {
        let mut b = [0u8; META_SIZE];
        b[..META_HEADER].copy_from_slice(&self.header());
        b[32..64].copy_from_slice(&self.tag);
        b
    }

    /// The bytes the tag covers.
    pub fn header(&self) -> [u8; META_HEADER] {
        let mut b = [0u8; META_HEADER];
        b[0..8].copy_from_slice(&self.generation.to_le_bytes());
        b[8..12].copy_from_slice(&self.version.to_le_bytes());
        b[12..16].copy_from_slice(&self.epoch.to_le_bytes());
        b[16..24].copy_from_slice(&self.lba.to_le_bytes());
        b[24..28].copy_from_slice(&self.flags.to_le_bytes());
        b[28..32].copy_from_slice(&self.reserved.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Self {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let mut tag = [0u8; 32];
        tag.copy_from_slice(&b[32..64]);
        Self {
            generation: u64_at(0),
            version: u32_at(8),
            epoch: u32_at(12),
            lba: u64_at(16),
            flags: u32_at(24),
            reserved: u32_at(28),
            tag,
        }
    }

    /// All-zero metadata: a block that was never written (or was trimmed).
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// Byte offsets of a volume's region on every disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionLayout {
    pub geometry: Geometry,
    pub region_offset: u64,
    pub journal_size: u64,
    pub stripes: u64,
}

impl RegionLayout {
    /// Pages of metadata after each chunk.
    pub fn meta_pages(&self) -> u64 {
        (self.geometry.blocks_per_chunk() * META_SIZE as u64).div_ceil(BLOCK_SIZE_U64)
    }
    /// Bytes of one chunk slot (data + metadata pages).
    pub fn slot_size(&self) -> u64 {
        u64::from(self.geometry.chunk_size) + self.meta_pages() * BLOCK_SIZE_U64
    }
    /// Bytes of the whole region on each disk.
    pub fn region_size(&self) -> u64 {
        self.journal_size + self.stripes * self.slot_size()
    }
    /// Offset of the chunk slot of `stripe` (on whichever disk holds the chunk).
    pub fn slot_offset(&self, stripe: StripeId) -> u64 {
        self.region_offset + self.journal_size + stripe.0 * self.slot_size()
    }
    /// Offset of block `block_in_chunk` of the chunk of `stripe`.
    pub fn block_offset(&self, stripe: StripeId, block_in_chunk: u64) -> u64 {
        self.slot_offset(stripe) + block_in_chunk * BLOCK_SIZE_U64
    }
    /// Offset of the metadata page that holds the metadata of `block_in_chunk`, and the byte
    /// position of that block's entry inside the page.
    pub fn meta_location(&self, stripe: StripeId, block_in_chunk: u64) -> (u64, usize) {
        let byte = block_in_chunk * META_SIZE as u64;
        let page = byte / BLOCK_SIZE_U64;
        (
            self.slot_offset(stripe) + u64::from(self.geometry.chunk_size) + page * BLOCK_SIZE_U64,
            (byte % BLOCK_SIZE_U64) as usize,
        )
    }
    /// First byte of the journal log (after the checkpoint slots).
    pub fn log_start(&self) -> u64 {
        self.region_offset + CHECKPOINT_AREA
    }
    /// One past the last byte of the journal log.
    pub fn log_end(&self) -> u64 {
        self.region_offset + self.journal_size
    }
}

/// Journal record kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordKind {
    /// `n` blocks of ciphertext follow the header; entries hold their metadata.
    Write = 1,
    /// The blocks `[lba, lba + count)` read as zeros from now on; no payload.
    Trim = 2,
    /// The log continues at its start; nothing else in this record.
    Wrap = 3,
    /// Reserved space that holds nothing (a write that failed after its space was reserved):
    /// `trim_count` pages, this header included, are skipped. Keeps the log free of holes.
    /// A non-zero `trim_lba` above this record's sequence number is the next record's sequence
    /// number (a jump past numbers that stale records may carry).
    Skip = 4,
}

/// Magic at the start of every journal record this version writes: its seal covers the used
/// bytes of the header ([`sealed_len`]), and the padding after them must be zero.
pub const RECORD_MAGIC: [u8; 8] = *b"SVJRNL02";
/// Magic of records written by earlier versions, whose seal covers the whole header pages.
/// Replay still accepts them, so a journal left by a crash of an older build is not lost.
pub const RECORD_MAGIC_V1: [u8; 8] = *b"SVJRNL01";
/// Magic of a checkpoint slot.
pub const CHECKPOINT_MAGIC: [u8; 8] = *b"SVCKPT01";
/// Fixed part of a record header; entries (64 bytes each) follow.
pub const RECORD_FIXED: usize = 96;
/// Where a record header or a checkpoint keeps the master key version of its seal.
pub const SEAL_VERSION: std::ops::Range<usize> = 56..60;
/// Where a record header or a checkpoint keeps its seal: a keyed tag that the disks cannot
/// forge (a checksum only catches accidents).
pub const SEAL_TAG: std::ops::Range<usize> = 64..96;
/// Most blocks in one write record: 256 blocks = 1 MiB, a header of 5 pages. Bounds the memory
/// a replay reads at once and keeps records a few pages long.
pub const MAX_RECORD_BLOCKS: usize = 256;

/// Journal record header.
///
/// | offset | size | field |
/// |---|---|---|
/// | 0 | 8 | magic `SVJRNL02` (`SVJRNL01`: written by earlier versions, see below) |
/// | 8 | 8 | sequence number (consecutive, from 1) |
/// | 16 | 8 | volume id |
/// | 24 | 4 | kind (1 write, 2 trim, 3 wrap, 4 skip) |
/// | 28 | 4 | n: blocks of payload (write), 0 otherwise |
/// | 32 | 8 | trim: first lba; skip: next sequence number or 0; otherwise 0 |
/// | 40 | 8 | trim: block count; skip: pages of the record; otherwise 0 |
/// | 48 | 4 | crc32c of the payload pages |
/// | 52 | 4 | crc32c of the header pages with this field zero |
/// | 56 | 4 | master key version of the seal |
/// | 60 | 4 | reserved, 0 |
/// | 64 | 32 | seal: keyed BLAKE3 (the volume's tag key) over bytes `0..96 + 64·n` with the seal and checksum fields zero |
/// | 96 | 64·n | the [`BlockMeta`] of each payload block, in payload order |
///
/// The header occupies `header_pages(n)` pages, zero padded (a `SVJRNL02` record with a
/// non-zero byte in the padding is refused); the payload pages follow. The seal covers the used
/// bytes only, not the padding: a one-block record seals 160 bytes instead of a 4 KiB page,
/// which was one of the two BLAKE3 passes of every small write. Records with the magic
/// `SVJRNL01`, written by earlier versions, are sealed over the whole header pages and are
/// still accepted by replay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    pub seq: u64,
    pub volume: u64,
    pub kind: RecordKind,
    pub trim_lba: u64,
    pub trim_count: u64,
    pub payload_crc: u32,
    pub entries: Vec<BlockMeta>,
}

/// Why a record was not accepted (replay stops at the first one).
#[derive(Debug, PartialEq, Eq)]
pub enum RecordProblem {
    BadMagic,
    BadChecksum,
    BadField(&'static str),
}

/// Bytes of a record header that its seal covers: all of its pages for a `SVJRNL01` record, the
/// fixed part and the entries for any other. `header` starts with the record's first page.
pub fn sealed_len(header: &[u8]) -> usize {
    if header.len() < RECORD_FIXED || header[0..8] == RECORD_MAGIC_V1 {
        return header.len();
    }
    let n = u32::from_le_bytes([header[28], header[29], header[30], header[31]]) as usize;
    (RECORD_FIXED + n.min(MAX_RECORD_BLOCKS) * META_SIZE).min(header.len())
}

/// Whether `magic` is that of a journal record of this or an earlier version.
fn record_magic(magic: &[u8]) -> bool {
    magic == RECORD_MAGIC || magic == RECORD_MAGIC_V1
}

/// Pages taken by the header of a record with `n` payload blocks.
pub fn header_pages(n: usize) -> usize {
    (RECORD_FIXED + n * META_SIZE).div_ceil(BLOCK_SIZE)
}

/// Bytes of journal taken by a record with `n` payload blocks: its header pages and payload.
pub fn record_len(n: usize) -> u64 {
    ((header_pages(n) + n) * BLOCK_SIZE) as u64
}

impl RecordHeader {
    pub fn pages(&self) -> usize {
        header_pages(self.entries.len())
    }

    /// Total bytes of the record on disk (header pages and payload pages).
    pub fn record_len(&self) -> u64 {
        if self.kind == RecordKind::Skip {
            return self.trim_count.max(1) * BLOCK_SIZE_U64;
        }
        ((self.pages() + self.entries.len()) * BLOCK_SIZE) as u64
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; self.pages() * BLOCK_SIZE];
        b[0..8].copy_from_slice(&RECORD_MAGIC);
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..24].copy_from_slice(&self.volume.to_le_bytes());
        b[24..28].copy_from_slice(&(self.kind as u32).to_le_bytes());
        b[28..32].copy_from_slice(&(self.entries.len() as u32).to_le_bytes());
        b[32..40].copy_from_slice(&self.trim_lba.to_le_bytes());
        b[40..48].copy_from_slice(&self.trim_count.to_le_bytes());
        b[48..52].copy_from_slice(&self.payload_crc.to_le_bytes());
        for (i, e) in self.entries.iter().enumerate() {
            let o = RECORD_FIXED + i * META_SIZE;
            b[o..o + META_SIZE].copy_from_slice(&e.encode());
        }
        let crc = crc32c::crc32c(&b);
        b[52..56].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Reads the fixed part of the first header page: how many pages the header takes.
    /// Returns `None` for anything that is not a record header.
    pub fn peek_pages(first_page: &[u8]) -> Option<usize> {
        if first_page.len() < RECORD_FIXED || !record_magic(&first_page[0..8]) {
            return None;
        }
        let n = u32::from_le_bytes(first_page[28..32].try_into().ok()?) as usize;
        (n <= MAX_RECORD_BLOCKS).then(|| header_pages(n))
    }

    /// Decodes and checks a whole header (all its pages).
    pub fn decode(b: &[u8]) -> Result<Self, RecordProblem> {
        if b.len() < BLOCK_SIZE || !record_magic(&b[0..8]) {
            return Err(RecordProblem::BadMagic);
        }
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let n = u32_at(28) as usize;
        if n > MAX_RECORD_BLOCKS {
            return Err(RecordProblem::BadField("block count"));
        }
        if b.len() != header_pages(n) * BLOCK_SIZE {
            return Err(RecordProblem::BadField("header length"));
        }
        let stored = u32_at(52);
        let mut copy = b.to_vec();
        copy[52..56].fill(0);
        if crc32c::crc32c(&copy) != stored {
            return Err(RecordProblem::BadChecksum);
        }
        // The seal of a current record does not cover the padding: it must be zero, so that no
        // byte of an accepted header is left unsealed.
        if b[sealed_len(b)..].iter().any(|x| *x != 0) {
            return Err(RecordProblem::BadField("padding"));
        }
        let kind = match u32_at(24) {
            1 => RecordKind::Write,
            2 => RecordKind::Trim,
            3 => RecordKind::Wrap,
            4 => RecordKind::Skip,
            _ => return Err(RecordProblem::BadField("kind")),
        };
        if kind != RecordKind::Write && n != 0 {
            return Err(RecordProblem::BadField("payload on a record without one"));
        }
        let entries = (0..n)
            .map(|i| {
                let o = RECORD_FIXED + i * META_SIZE;
                BlockMeta::decode(&b[o..o + META_SIZE])
            })
            .collect();
        Ok(Self {
            seq: u64_at(8),
            volume: u64_at(16),
            kind,
            trim_lba: u64_at(32),
            trim_count: u64_at(40),
            payload_crc: u32_at(48),
            entries,
        })
    }
}

/// Journal checkpoint: everything up to `seq` is destaged; the next record is at `position`.
///
/// | offset | size | field |
/// |---|---|---|
/// | 0 | 8 | magic `SVCKPT01` |
/// | 8 | 8 | checkpoint sequence number (records ≤ it are destaged) |
/// | 16 | 8 | byte offset of the first record after it |
/// | 24 | 8 | volume id |
/// | 32 | 8 | reserved, 0 |
/// | 40 | 4 | crc32c of bytes 0..40 |
/// | 44 | 12 | reserved, 0 |
/// | 56 | 4 | master key version of the seal |
/// | 60 | 4 | reserved, 0 |
/// | 64 | 32 | seal: keyed BLAKE3 over the page with the seal field zero |
///
/// Two slots, written alternately; the valid slot
/// with the highest `seq` wins, so a torn checkpoint write leaves the previous one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    pub seq: u64,
    pub position: u64,
    pub volume: u64,
}

impl Checkpoint {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; BLOCK_SIZE];
        b[0..8].copy_from_slice(&CHECKPOINT_MAGIC);
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..24].copy_from_slice(&self.position.to_le_bytes());
        b[24..32].copy_from_slice(&self.volume.to_le_bytes());
        let crc = crc32c::crc32c(&b[0..40]);
        b[40..44].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Option<Self> {
        if b.len() < 44 || b[0..8] != CHECKPOINT_MAGIC {
            return None;
        }
        let crc = u32::from_le_bytes(b[40..44].try_into().ok()?);
        if crc32c::crc32c(&b[0..40]) != crc {
            return None;
        }
        Some(Self {
            seq: u64::from_le_bytes(b[8..16].try_into().ok()?),
            position: u64::from_le_bytes(b[16..24].try_into().ok()?),
            volume: u64::from_le_bytes(b[24..32].try_into().ok()?),
        })
    }
}

/// The logical blocks `[first, first + count)` covered by a byte range, and whether the first
/// and last are only partly covered.
pub fn blocks_of(offset: u64, len: u64) -> (Lba, u64) {
    let first = offset / BLOCK_SIZE_U64;
    let last = (offset + len).div_ceil(BLOCK_SIZE_U64);
    (Lba(first), last - first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_meta_round_trips_and_header_excludes_tag() {
        let m = BlockMeta {
            generation: 7,
            version: 2,
            epoch: 9,
            lba: 1234,
            flags: 0,
            reserved: 0,
            tag: [0xab; 32],
        };
        let e = m.encode();
        assert_eq!(BlockMeta::decode(&e), m);
        assert_eq!(&e[..32], &m.header());
        assert!(!m.is_empty());
        assert!(BlockMeta::decode(&[0u8; 64]).is_empty());
    }

    #[test]
    fn every_stored_header_byte_reaches_the_tagged_header() {
        // The tag covers `header()`: a flipped bit anywhere in bytes 0..32 of a stored entry
        // (the reserved bytes 28..32 included) must change it, or bit rot there passes unseen.
        let m = BlockMeta {
            generation: 7,
            version: 2,
            epoch: 9,
            lba: 1234,
            flags: 0,
            reserved: 0,
            tag: [0xab; 32],
        };
        let e = m.encode();
        for byte in 0..META_HEADER {
            for bit in 0..8 {
                let mut c = e;
                c[byte] ^= 1 << bit;
                let d = BlockMeta::decode(&c);
                assert_ne!(d.header(), m.header(), "byte {byte} bit {bit}");
                assert_eq!(&d.header()[..], &c[..META_HEADER]);
            }
        }
    }

    #[test]
    fn record_header_detects_every_flipped_byte() {
        let h = RecordHeader {
            seq: 42,
            volume: 3,
            kind: RecordKind::Write,
            trim_lba: 0,
            trim_count: 0,
            payload_crc: 0xdead_beef,
            entries: (0..70)
                .map(|i| BlockMeta {
                    generation: 42,
                    lba: i,
                    ..Default::default()
                })
                .collect(),
        };
        let b = h.encode();
        assert_eq!(b.len(), 2 * BLOCK_SIZE);
        assert_eq!(RecordHeader::peek_pages(&b[..BLOCK_SIZE]), Some(2));
        assert_eq!(RecordHeader::decode(&b).unwrap(), h);
        for pos in (0..b.len()).step_by(97) {
            let mut c = b.clone();
            c[pos] ^= 0x10;
            assert!(
                RecordHeader::decode(&c).is_err(),
                "flip at {pos} not detected"
            );
        }
    }

    #[test]
    fn checkpoint_round_trips_and_rejects_corruption() {
        let c = Checkpoint {
            seq: 99,
            position: 1 << 20,
            volume: 5,
        };
        let mut b = c.encode();
        assert_eq!(Checkpoint::decode(&b), Some(c));
        b[9] ^= 1;
        assert_eq!(Checkpoint::decode(&b), None);
    }

    #[test]
    fn region_offsets_do_not_overlap() {
        let g = Geometry::new(4, 2, 64 * 1024).unwrap();
        let r = RegionLayout {
            geometry: g,
            region_offset: 1 << 20,
            journal_size: 8 << 20,
            stripes: 10,
        };
        assert_eq!(r.meta_pages(), 1);
        assert_eq!(r.slot_size(), 68 * 1024);
        assert_eq!(r.slot_offset(StripeId(0)), r.log_end());
        let (meta, at) = r.meta_location(StripeId(1), 15);
        assert_eq!(meta, r.slot_offset(StripeId(1)) + 64 * 1024);
        assert_eq!(at, 15 * 64);
        assert!(
            r.block_offset(StripeId(0), 15) + BLOCK_SIZE_U64 <= r.meta_location(StripeId(0), 0).0
        );
        assert_eq!(r.region_size(), (8 << 20) + 10 * 68 * 1024);
    }

    #[test]
    fn blocks_of_covers_partial_ends() {
        assert_eq!(blocks_of(0, 4096), (Lba(0), 1));
        assert_eq!(blocks_of(100, 4096), (Lba(0), 2));
        assert_eq!(blocks_of(4096, 1), (Lba(1), 1));
        assert_eq!(blocks_of(8191, 2), (Lba(1), 2));
    }
}
