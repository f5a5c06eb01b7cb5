//! The superblock: two checksummed slots at the start of every disk (`docs/formats-superblock.md`).
//!
//! [`encode_slot`] / [`decode_slot`] and [`choose_slot`] are pure functions on bytes; the disk
//! functions only move the bytes.

use crate::disk::{Disk, IoBuf, IoOp};

use super::{MetaError, SUPERBLOCK_AREA, Superblock};

/// First 8 bytes of every slot.
pub const SUPERBLOCK_MAGIC: [u8; 8] = *b"SHRDVOL\0";
/// Format version written by this build, and the newest it reads.
pub const SUPERBLOCK_FORMAT_VERSION: u32 = 1;
/// Length of the v1 slot header.
pub const SLOT_HEADER_LEN: usize = 36;
/// Bytes of one slot: half of the superblock area.
pub const SLOT_SIZE: u64 = SUPERBLOCK_AREA / 2;
/// Byte offsets of slot A and slot B on the disk.
pub const SLOT_OFFSETS: [u64; 2] = [0, SLOT_SIZE];
/// Largest body that fits a slot after the header.
pub const MAX_BODY_LEN: usize = SLOT_SIZE as usize - SLOT_HEADER_LEN;

/// Largest header length a reader accepts before checking the header checksum: bounds what a
/// corrupted length field can make it read. Later versions may grow the header up to this.
const MAX_HEADER_LEN: usize = 4096;
/// Disk writes are whole 4 KiB pages (the `IoBuf` alignment and any device's sector size).
const WRITE_ALIGN: usize = 4096;

// Header field offsets (v1). Magic, version and header length stay at these offsets in every
// version; the header checksum is always the last 4 bytes of the header.
const OFF_VERSION: usize = 8;
const OFF_HEADER_LEN: usize = 12;
const OFF_SEQ: usize = 16;
const OFF_BODY_LEN: usize = 24;
const OFF_BODY_CRC: usize = 28;
const OFF_HEADER_CRC: usize = 32;

/// Why one slot does not hold a usable superblock.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SlotError {
    #[error("empty (never written)")]
    Empty,
    #[error("bad magic: not a shardvol superblock")]
    BadMagic,
    #[error("truncated: {len} bytes, the {part} needs {need}")]
    Truncated {
        part: &'static str,
        len: usize,
        need: usize,
    },
    #[error("invalid header length {0}")]
    BadHeaderLen(u32),
    #[error("header checksum mismatch")]
    HeaderChecksum,
    #[error(
        "format version {0} is newer than this build reads ({SUPERBLOCK_FORMAT_VERSION}); use a newer shardvol"
    )]
    NewerVersion(u32),
    #[error("invalid format version {0}")]
    BadVersion(u32),
    #[error("body of {len} bytes does not fit the slot (at most {max})")]
    BodyTooLarge { len: usize, max: usize },
    #[error("body checksum mismatch")]
    BodyChecksum,
    #[error("body does not parse: {0}")]
    BadBody(String),
    #[error("sequence number {header} in the header differs from {body} in the body")]
    SeqMismatch { header: u64, body: u64 },
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

/// Encodes `sb` as one slot: header ‖ body (serde_json of `sb`), not padded.
/// Fails with [`SlotError::BodyTooLarge`] if the body does not fit a slot.
pub fn encode_slot(sb: &Superblock) -> Result<Vec<u8>, SlotError> {
    let body = serde_json::to_vec(sb).map_err(|e| SlotError::BadBody(e.to_string()))?;
    if body.len() > MAX_BODY_LEN {
        return Err(SlotError::BodyTooLarge {
            len: body.len(),
            max: MAX_BODY_LEN,
        });
    }
    let mut out = Vec::with_capacity(SLOT_HEADER_LEN + body.len());
    out.extend_from_slice(&SUPERBLOCK_MAGIC);
    out.extend_from_slice(&SUPERBLOCK_FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(SLOT_HEADER_LEN as u32).to_le_bytes());
    out.extend_from_slice(&sb.seq.to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
    let header_crc = crc32c::crc32c(&out[..OFF_HEADER_CRC]);
    out.extend_from_slice(&header_crc.to_le_bytes());
    debug_assert_eq!(out.len(), SLOT_HEADER_LEN);
    out.extend_from_slice(&body);
    Ok(out)
}

/// Decodes one slot (its bytes from the slot's start; bytes after the body are ignored).
///
/// Checks, in order: magic, header length, header checksum, format version, body length, body
/// checksum, body syntax, and that the header's seq matches the body's. The header checksum is
/// checked before the version, so a damaged version field reads as damage, not as a newer format.
pub fn decode_slot(b: &[u8]) -> Result<Superblock, SlotError> {
    let truncated = |part, need| SlotError::Truncated {
        part,
        len: b.len(),
        need,
    };
    if b.len() < SUPERBLOCK_MAGIC.len() {
        return Err(truncated("magic", SUPERBLOCK_MAGIC.len()));
    }
    if b[..b.len().min(SLOT_HEADER_LEN)].iter().all(|&x| x == 0) {
        return Err(SlotError::Empty);
    }
    if b[..SUPERBLOCK_MAGIC.len()] != SUPERBLOCK_MAGIC {
        return Err(SlotError::BadMagic);
    }
    if b.len() < OFF_SEQ {
        return Err(truncated("header", SLOT_HEADER_LEN));
    }
    let header_len_field = u32_at(b, OFF_HEADER_LEN);
    let header_len = header_len_field as usize;
    if !(SLOT_HEADER_LEN..=MAX_HEADER_LEN).contains(&header_len) {
        return Err(SlotError::BadHeaderLen(header_len_field));
    }
    if b.len() < header_len {
        return Err(truncated("header", header_len));
    }
    if u32_at(b, header_len - 4) != crc32c::crc32c(&b[..header_len - 4]) {
        return Err(SlotError::HeaderChecksum);
    }
    match u32_at(b, OFF_VERSION) {
        SUPERBLOCK_FORMAT_VERSION => {}
        v if v > SUPERBLOCK_FORMAT_VERSION => return Err(SlotError::NewerVersion(v)),
        v => return Err(SlotError::BadVersion(v)),
    }
    if header_len != SLOT_HEADER_LEN {
        return Err(SlotError::BadHeaderLen(header_len_field));
    }
    let seq = u64_at(b, OFF_SEQ);
    let body_len = u32_at(b, OFF_BODY_LEN) as usize;
    if body_len > MAX_BODY_LEN {
        return Err(SlotError::BodyTooLarge {
            len: body_len,
            max: MAX_BODY_LEN,
        });
    }
    let end = SLOT_HEADER_LEN + body_len;
    if b.len() < end {
        return Err(truncated("body", end));
    }
    let body = &b[SLOT_HEADER_LEN..end];
    if u32_at(b, OFF_BODY_CRC) != crc32c::crc32c(body) {
        return Err(SlotError::BodyChecksum);
    }
    let sb: Superblock =
        serde_json::from_slice(body).map_err(|e| SlotError::BadBody(e.to_string()))?;
    if sb.seq != seq {
        return Err(SlotError::SeqMismatch {
            header: seq,
            body: sb.seq,
        });
    }
    Ok(sb)
}

/// The slot (0 = A, 1 = B) that the superblock with sequence number `seq` is written to.
pub fn slot_for_seq(seq: u64) -> usize {
    (seq % 2) as usize
}

const SLOT_NAMES: [&str; 2] = ["A", "B"];

/// Picks the superblock of a disk from the bytes of its two slots: the valid slot with the
/// highest seq (slot A on a tie). Refuses the disk if either slot has a newer format version
/// (reading the older slot would silently roll back a newer pool). The error says what each slot
/// holds, "not a shardvol disk" when neither has a shardvol magic.
pub fn choose_slot(slot_a: &[u8], slot_b: &[u8]) -> Result<(usize, Superblock), String> {
    let decoded = [decode_slot(slot_a), decode_slot(slot_b)];
    for (i, d) in decoded.iter().enumerate() {
        if let Err(e @ SlotError::NewerVersion(_)) = d {
            return Err(format!(
                "slot {} at offset {}: {e}",
                SLOT_NAMES[i], SLOT_OFFSETS[i]
            ));
        }
    }
    let [a, b] = decoded;
    match (a, b) {
        (Ok(a), Ok(b)) => Ok(if b.seq > a.seq { (1, b) } else { (0, a) }),
        (Ok(a), Err(_)) => Ok((0, a)),
        (Err(_), Ok(b)) => Ok((1, b)),
        (Err(ea), Err(eb)) => {
            let foreign = |e: &SlotError| matches!(e, SlotError::Empty | SlotError::BadMagic);
            let lead = if foreign(&ea) && foreign(&eb) {
                "not a shardvol disk"
            } else {
                "no valid superblock"
            };
            Err(format!(
                "{lead} (slot A at offset {}: {ea}; slot B at offset {}: {eb})",
                SLOT_OFFSETS[0], SLOT_OFFSETS[1]
            ))
        }
    }
}

fn sb_err(disk: &dyn Disk, msg: String) -> MetaError {
    MetaError::Superblock {
        disk: disk.name().to_string(),
        msg,
    }
}

fn check_disk_size(disk: &dyn Disk) -> Result<(), MetaError> {
    if disk.size() < SUPERBLOCK_AREA {
        return Err(sb_err(
            disk,
            format!(
                "the disk has {} bytes, less than the {SUPERBLOCK_AREA}-byte superblock area",
                disk.size()
            ),
        ));
    }
    Ok(())
}

/// Writes `sb` to slot `sb.seq % 2` of `disk` and makes it durable (write, then sync).
///
/// The caller increases `seq` by one at every update, so the write never touches the slot that
/// holds the newest durable superblock: a torn write leaves that one readable. The whole slot is
/// overwritten, so nothing of the superblock it held before survives in it.
pub fn write_superblock(disk: &dyn Disk, sb: &Superblock) -> Result<(), MetaError> {
    check_disk_size(disk)?;
    let bytes = encode_slot(sb).map_err(|e| sb_err(disk, format!("cannot encode: {e}")))?;
    // The whole slot is written, zeros after the body: a shorter body must not leave the tail
    // of a longer, older one behind (it may hold a wrapped master key that was destroyed).
    let mut buf =
        IoBuf::zeroed((SLOT_SIZE as usize).max(bytes.len().next_multiple_of(WRITE_ALIGN)));
    buf[..bytes.len()].copy_from_slice(&bytes);
    let offset = SLOT_OFFSETS[slot_for_seq(sb.seq)];
    disk.submit(vec![IoOp::Write { offset, buf }]).wait()?;
    // A sync covers the writes completed before its batch was submitted: a batch of its own.
    disk.submit(vec![IoOp::Sync]).wait()?;
    Ok(())
}

/// Reads both slots of `disk` and returns the newest valid superblock (see [`choose_slot`]).
pub fn read_superblock(disk: &dyn Disk) -> Result<Superblock, MetaError> {
    check_disk_size(disk)?;
    let buf = IoBuf::zeroed(SUPERBLOCK_AREA as usize);
    let mut ops = disk.submit(vec![IoOp::Read { offset: 0, buf }]).wait()?;
    let Some(IoOp::Read { buf, .. }) = ops.pop() else {
        return Err(sb_err(disk, "the disk returned no read buffer".into()));
    };
    if buf.len() != SUPERBLOCK_AREA as usize {
        return Err(sb_err(
            disk,
            format!(
                "the disk returned {} bytes, asked {SUPERBLOCK_AREA}",
                buf.len()
            ),
        ));
    }
    let (a, b) = buf.split_at(SLOT_SIZE as usize);
    choose_slot(a, b)
        .map(|(_, sb)| sb)
        .map_err(|msg| sb_err(disk, msg))
}
