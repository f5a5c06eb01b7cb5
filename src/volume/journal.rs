//! The write journal: a circular log replicated on the `m + 1` journal disks of a volume.
//!
//! Contract:
//! - [`Journal::reserve`] hands out consecutive sequence numbers and log space; the caller
//!   must then [`Journal::write`] exactly that record (or the journal fails: see below).
//!   Reservation never blocks; when the log is full it returns `None` and the caller waits
//!   with [`Journal::wait_for_space`] after releasing its locks, so the destager can run.
//! - [`Journal::flush`] returns when every record reserved before the call is durable on every
//!   replica that accepted it. It first waits for all those records to complete, so the log has
//!   no hole before a flushed record: replay, which stops at the first invalid record, can
//!   never drop a flushed record behind an unflushed one that a crash tore.
//! - [`Journal::checkpoint`] records, durably and on every replica, that records up to a
//!   sequence number are destaged; [`Journal::release`] then frees their space.
//! - A record is written to every replica; it counts as written when at least one replica
//!   took it (losing the others is what the `m + 1` copies are for). If no replica takes it,
//!   the journal stops accepting writes: a hole in the log would hide later records.
//!
//! Records are validated on replay by magic, sequence number, volume id and two crc32c
//! checksums (header and payload); tags are checked later, when blocks are read or destaged.

use std::collections::{BTreeSet, VecDeque};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use tracing::{debug, warn};

use super::format::{
    Checkpoint, RecordHeader, RecordKind, RegionLayout, SEAL_TAG, SEAL_VERSION, sealed_len,
};
use crate::disk::{DiskRef, IoBuf, IoOp};
use crate::layout::{BLOCK_SIZE, BLOCK_SIZE_U64};

/// The key that seals record headers and checkpoints: the current master key version, and a
/// keyed tag of any version (`None` when that version is not loaded).
pub struct HeaderKey {
    pub version: Box<dyn Fn() -> u32 + Send + Sync>,
    pub mac: Box<SealMac>,
}

/// Keyed tag of `bytes` under master key version `v` (`None` when that version is not loaded).
pub type SealMac = dyn Fn(u32, &[u8]) -> Option<[u8; 32]> + Send + Sync;

impl HeaderKey {
    /// Seals `bytes` (a record header or a checkpoint page): writes the key version and the tag
    /// of `bytes[..sealed]` with the seal field (and, for records, the checksum field) zero,
    /// then the checksum of all of `bytes`, if it has one.
    fn seal(&self, bytes: &mut [u8], sealed: usize, crc_field: Option<std::ops::Range<usize>>) {
        let version = (self.version)();
        bytes[SEAL_VERSION].copy_from_slice(&version.to_le_bytes());
        bytes[SEAL_TAG].fill(0);
        if let Some(c) = crc_field.clone() {
            bytes[c].fill(0);
        }
        let tag = (self.mac)(version, &bytes[..sealed]).unwrap_or([0; 32]);
        bytes[SEAL_TAG].copy_from_slice(&tag);
        if let Some(c) = crc_field {
            let crc = crc32c::crc32c(bytes);
            bytes[c].copy_from_slice(&crc.to_le_bytes());
        }
    }

    /// Whether the seal of `bytes[..sealed]` is right.
    fn check(
        &self,
        bytes: &[u8],
        sealed: usize,
        crc_field: Option<std::ops::Range<usize>>,
    ) -> bool {
        if sealed < SEAL_TAG.end || sealed > bytes.len() {
            return false;
        }
        let mut copy = bytes[..sealed].to_vec();
        copy[SEAL_TAG].fill(0);
        if let Some(c) = crc_field {
            copy[c].fill(0);
        }
        let version = u32::from_le_bytes(copy[SEAL_VERSION].try_into().unwrap_or_default());
        (self.mac)(version, &copy).is_some_and(|tag| tag[..] == bytes[SEAL_TAG])
    }

    /// Seals a record header (all its pages): the seal covers [`sealed_len`] bytes.
    fn seal_record(&self, header: &mut [u8]) {
        let sealed = sealed_len(header);
        self.seal(header, sealed, Some(RECORD_CRC));
    }

    /// Whether the seal of a record header (all its pages) is right.
    fn check_record(&self, header: &[u8]) -> bool {
        self.check(header, sealed_len(header), Some(RECORD_CRC))
    }

    fn seal_checkpoint(&self, cp: &Checkpoint) -> Vec<u8> {
        let mut b = cp.encode();
        let sealed = b.len();
        self.seal(&mut b, sealed, None);
        b
    }

    fn check_checkpoint(&self, page: &[u8]) -> bool {
        self.check(page, page.len(), None)
    }
}

/// Where a record header keeps the checksum of its pages.
const RECORD_CRC: std::ops::Range<usize> = 52..56;

/// Errors of the journal.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal failed: {0}")]
    Failed(String),
    #[error("journal of volume {volume}: no readable checkpoint on any journal disk")]
    NoCheckpoint { volume: u64 },
}

/// A reserved place in the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reservation {
    pub seq: u64,
    /// Offset of the record's first header page.
    pub position: u64,
    /// Bytes of the record.
    pub len: u64,
    /// A wrap marker to write first, at the end of the log, with this sequence number.
    pub wrap: Option<(u64, u64)>,
}

/// One record found by replay.
#[derive(Debug)]
pub struct Replayed {
    pub header: RecordHeader,
    /// Offset of the record's first header page.
    pub position: u64,
}

impl Replayed {
    /// Offset of payload page `i`.
    pub fn payload_offset(&self, i: usize) -> u64 {
        self.position + ((self.header.pages() + i) * BLOCK_SIZE) as u64
    }
}

struct State {
    next_seq: u64,
    /// Where the next record goes.
    tail: u64,
    /// Bytes in use (records after the checkpoint, wrap waste included).
    used: u64,
    /// Records still in use: (seq, bytes including wrap waste before it, offset after it).
    live: VecDeque<(u64, u64, u64)>,
    in_flight: BTreeSet<u64>,
    /// Every record with seq ≤ this has completed.
    completed_through: u64,
    /// Every record with seq ≤ this is durable.
    durable_through: u64,
    checkpoint_seq: u64,
    checkpoint_slot: u64,
    /// Where replay starts, as recorded in the newest checkpoint.
    checkpoint_position: u64,
    failed: Option<String>,
}

pub struct Journal {
    key: std::sync::Arc<HeaderKey>,
    layout: RegionLayout,
    volume: u64,
    disks: Vec<DiskRef>,
    state: Mutex<State>,
    /// Records completed (for flushes waiting on earlier records).
    changed: Condvar,
    /// Space freed, or the journal failed (for writers waiting for room). Separate from
    /// `changed` so that every record completion does not wake every blocked writer.
    space: Condvar,
    sync_lock: Mutex<()>,
}

impl Journal {
    /// Clears both checkpoint slots on every journal disk of a new volume. The first open seals
    /// a checkpoint (creating a volume needs no key; see [`Journal::open`]).
    pub fn format(
        layout: &RegionLayout,
        _volume: u64,
        disks: &[DiskRef],
    ) -> Result<(), JournalError> {
        for d in disks {
            let ops = vec![IoOp::Write {
                offset: layout.region_offset,
                buf: IoBuf::zeroed(2 * BLOCK_SIZE),
            }];
            d.submit(ops)
                .wait()
                .map_err(|e| JournalError::Failed(e.to_string()))?;
            d.submit(vec![IoOp::Sync])
                .wait()
                .map_err(|e| JournalError::Failed(e.to_string()))?;
        }
        Ok(())
    }

    /// Opens the journal and reads every valid record after the newest checkpoint.
    /// The caller applies them, destages them and checkpoints; until then they stay live.
    /// `valid` checks what the journal cannot: that a record's contents fit the volume. Replay
    /// stops at the first record that fails it, as at a torn one.
    pub fn open(
        layout: RegionLayout,
        volume: u64,
        disks: Vec<DiskRef>,
        valid: &dyn Fn(&RecordHeader) -> bool,
        key: std::sync::Arc<HeaderKey>,
    ) -> Result<(Self, Vec<Replayed>), JournalError> {
        let mut best: Option<(Checkpoint, u64)> = None;
        // A journal that was never opened has both slots zero on every replica; anything else
        // without a sealed checkpoint is damage (or a disk pretending to be new).
        let mut all_clear = true;
        for d in &disks {
            for slot in 0..2u64 {
                let off = layout.region_offset + slot * BLOCK_SIZE_U64;
                let Ok(page) = read(d, off, BLOCK_SIZE) else {
                    all_clear = false;
                    continue;
                };
                all_clear &= page.iter().all(|b| *b == 0);
                if let Some(cp) = Checkpoint::decode(&page)
                    && cp.volume == volume
                    && key.check_checkpoint(&page)
                    && best.is_none_or(|(b, _)| cp.seq > b.seq)
                {
                    best = Some((cp, slot));
                }
            }
        }
        let fresh = Checkpoint {
            seq: 0,
            position: layout.log_start(),
            volume,
        };
        let (cp, slot) = match best {
            Some(b) => b,
            None if all_clear => (fresh, 1),
            None => return Err(JournalError::NoCheckpoint { volume }),
        };
        let capacity = layout.log_end() - layout.log_start();
        let mut records = Vec::new();
        let mut live = VecDeque::new();
        let mut pos = cp.position;
        let mut expect = cp.seq + 1;
        let mut used = 0u64;
        // Records accepted, with the replica that had a valid copy, to copy to the others.
        let mut copies: Vec<(u64, u64, usize)> = Vec::new();
        while used < capacity {
            let Some((header, len, good)) = read_record(&layout, volume, &disks, pos, expect, &key)
            else {
                break;
            };
            if !valid(&header) {
                warn!(
                    volume,
                    seq = header.seq,
                    "journal record with a valid checksum does not fit the volume; replay stops there"
                );
                break;
            }
            copies.push((pos, len, good));
            // A skip record may move the sequence forward (see `Journal::jump`).
            let next = if header.kind == RecordKind::Skip && header.trim_lba > expect {
                header.trim_lba
            } else {
                expect + 1
            };
            if header.kind == RecordKind::Wrap {
                let waste = layout.log_end() - pos;
                used += waste;
                live.push_back((expect, waste, layout.log_start()));
                pos = layout.log_start();
            } else {
                used += len;
                let end = normalize(&layout, pos + len);
                live.push_back((expect, len, end));
                records.push(Replayed {
                    header,
                    position: pos,
                });
                pos = end;
            }
            expect = next;
        }
        // Make every replica hold every accepted record: a crash may have torn a record on one
        // replica and not another, and later reads may go to any replica.
        for (at, len, good) in copies {
            if disks.len() < 2 {
                break;
            }
            let Ok(bytes) = read(&disks[good], at, len as usize) else {
                continue;
            };
            for (i, d) in disks.iter().enumerate() {
                if i != good {
                    let _ = d
                        .submit(vec![IoOp::Write {
                            offset: at,
                            buf: IoBuf::from_slice(&bytes),
                        }])
                        .wait();
                }
            }
        }
        sync_all(&disks).map_err(JournalError::Failed)?;
        debug!(
            volume,
            checkpoint = cp.seq,
            records = records.len(),
            "journal replayed"
        );
        let last = expect - 1;
        let journal = Self {
            key,
            layout,
            volume,
            disks,
            state: Mutex::new(State {
                next_seq: expect,
                tail: pos,
                used,
                live,
                in_flight: BTreeSet::new(),
                completed_through: last,
                durable_through: cp.seq,
                checkpoint_seq: cp.seq,
                checkpoint_slot: slot,
                checkpoint_position: cp.position,
                failed: None,
            }),
            changed: Condvar::new(),
            space: Condvar::new(),
            sync_lock: Mutex::new(()),
        };
        Ok((journal, records))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bytes of the log area.
    pub fn capacity(&self) -> u64 {
        self.layout.log_end() - self.layout.log_start()
    }

    /// Bytes in use.
    pub fn used(&self) -> u64 {
        self.lock().used
    }

    /// Reserves a record of `len` bytes. `None` when the log has no room now.
    pub fn reserve(&self, len: u64) -> Result<Option<Reservation>, JournalError> {
        let mut st = self.lock();
        if let Some(f) = &st.failed {
            return Err(JournalError::Failed(f.clone()));
        }
        let waste = if st.tail + len > self.layout.log_end() {
            self.layout.log_end() - st.tail
        } else {
            0
        };
        if st.used + waste + len > self.capacity() {
            return Ok(None);
        }
        let mut wrap = None;
        if waste > 0 {
            let seq = st.next_seq;
            st.next_seq += 1;
            wrap = Some((seq, st.tail));
            st.in_flight.insert(seq);
            st.live.push_back((seq, waste, self.layout.log_start()));
            st.used += waste;
            st.tail = self.layout.log_start();
        }
        let seq = st.next_seq;
        st.next_seq += 1;
        let position = st.tail;
        let end = normalize(&self.layout, position + len);
        st.tail = end;
        st.used += len;
        st.in_flight.insert(seq);
        st.live.push_back((seq, len, end));
        Ok(Some(Reservation {
            seq,
            position,
            len,
            wrap,
        }))
    }

    /// Waits (bounded) until space may have been freed or the journal failed.
    pub fn wait_for_space(&self, timeout: Duration) {
        let st = self.lock();
        let _unused = self.space.wait_timeout(st, timeout);
    }

    /// Whether a record write completes inside [`Journal::write`] without waiting for a
    /// device (see [`Disk::completes_in_submit`](crate::disk::Disk::completes_in_submit)).
    pub fn completes_in_submit(&self) -> bool {
        self.disks.iter().all(|d| d.completes_in_submit())
    }

    /// Writes a reserved record (`record` = header pages then payload pages) to every replica.
    /// The last replica takes `record` itself; the others get copies.
    pub fn write(&self, r: &Reservation, mut record: IoBuf) -> Result<(), JournalError> {
        debug_assert_eq!(record.len() as u64, r.len);
        let pages = RecordHeader::peek_pages(&record).unwrap_or(1);
        self.key.seal_record(&mut record[..pages * BLOCK_SIZE]);
        let mut pending = Vec::with_capacity(self.disks.len());
        let mut record = Some(record);
        for (i, d) in self.disks.iter().enumerate() {
            let mut ops = Vec::with_capacity(2);
            if let Some((seq, at)) = r.wrap {
                let h = RecordHeader {
                    seq,
                    volume: self.volume,
                    kind: RecordKind::Wrap,
                    trim_lba: 0,
                    trim_count: 0,
                    payload_crc: crc32c::crc32c(&[]),
                    entries: vec![],
                };
                let mut bytes = h.encode();
                self.key.seal_record(&mut bytes);
                ops.push(IoOp::Write {
                    offset: at,
                    buf: IoBuf::from_slice(&bytes),
                });
            }
            let buf = if i + 1 == self.disks.len() {
                record
                    .take()
                    .unwrap_or_else(|| IoBuf::zeroed(r.len as usize))
            } else {
                record
                    .as_ref()
                    .map_or_else(|| IoBuf::zeroed(r.len as usize), IoBuf::clone)
            };
            ops.push(IoOp::Write {
                offset: r.position,
                buf,
            });
            pending.push((d.name().to_string(), d.submit(ops)));
        }
        let (ok, last_err) = wait_replicas(pending, "write");
        if ok == 0 {
            let msg = format!(
                "record {} reached no journal disk (last error: {last_err})",
                r.seq
            );
            self.lock().failed = Some(msg.clone());
            self.changed.notify_all();
            self.space.notify_all();
            return Err(JournalError::Failed(msg));
        }
        Ok(())
    }

    /// Marks a reserved record complete: written (or failed) and applied to the index. Flush
    /// and destaging wait for every earlier record to be complete.
    pub fn complete(&self, r: &Reservation) {
        let mut st = self.lock();
        if let Some((seq, _)) = r.wrap {
            st.in_flight.remove(&seq);
        }
        st.in_flight.remove(&r.seq);
        st.completed_through = st.in_flight.first().map_or(st.next_seq - 1, |s| s - 1);
        self.changed.notify_all();
    }

    /// Reads payload pages, in one batch from the first replica that answers; `check(i, page)`
    /// says whether page `i` is intact, and pages that are not are read from the other replicas.
    /// Pages at consecutive offsets are read as one run (a record's blocks are consecutive), so
    /// destaging a 1 MiB record costs one read, not 256.
    pub fn read_pages(
        &self,
        offsets: &[u64],
        check: impl Fn(usize, &[u8]) -> bool,
    ) -> Result<Pages, JournalError> {
        // Runs of consecutive offsets: (first offset, pages), at most MAX_RUN_PAGES each.
        let mut runs: Vec<(u64, usize)> = Vec::new();
        let mut at = Vec::with_capacity(offsets.len());
        for &offset in offsets {
            let last = runs.len().wrapping_sub(1);
            match runs.last_mut() {
                Some((first, n))
                    if *n < MAX_RUN_PAGES && *first + (*n * BLOCK_SIZE) as u64 == offset =>
                {
                    at.push((last, *n * BLOCK_SIZE));
                    *n += 1;
                }
                _ => {
                    at.push((runs.len(), 0));
                    runs.push((offset, 1));
                }
            }
        }
        let mut bufs: Option<Vec<IoBuf>> = None;
        for d in &self.disks {
            let ops = runs
                .iter()
                .map(|&(offset, n)| IoOp::Read {
                    offset,
                    buf: IoBuf::zeroed(n * BLOCK_SIZE),
                })
                .collect();
            if let Ok(done) = d.submit(ops).wait() {
                let b: Vec<IoBuf> = done
                    .into_iter()
                    .filter_map(|op| {
                        if let IoOp::Read { buf, .. } = op {
                            Some(buf)
                        } else {
                            None
                        }
                    })
                    .collect();
                if b.len() == runs.len() {
                    bufs = Some(b);
                    break;
                }
            }
        }
        let runs = bufs.ok_or_else(|| JournalError::Failed("no journal disk answers".into()))?;
        let mut pages = Pages { runs, at };
        for (i, &offset) in offsets.iter().enumerate() {
            if !check(i, pages.get(i)) {
                let good = self.read_page_checked(offset, |p| check(i, p))?;
                pages.get_mut(i).copy_from_slice(&good);
            }
        }
        Ok(pages)
    }

    /// Makes every record reserved before this call durable. Returns the sequence number
    /// through which the log is durable.
    pub fn flush(&self) -> Result<u64, JournalError> {
        let target = self.lock().next_seq - 1;
        self.flush_to(target)?;
        Ok(target)
    }

    /// Makes every record up to `target` durable.
    ///
    /// A sync makes durable every record that had completed when it started, not only those up
    /// to `target`: callers that queue behind it (on `sync_lock`) then usually find their
    /// records durable already and return without a sync of their own. Concurrent flushes and
    /// destage workers thus share one fdatasync per journal disk instead of forming a convoy
    /// of syncs, each for a target a little newer than the last.
    pub fn flush_to(&self, target: u64) -> Result<(), JournalError> {
        let _sync = self.sync_lock.lock().unwrap_or_else(|p| p.into_inner());
        let covers = {
            let mut st = self.lock();
            loop {
                if let Some(f) = &st.failed {
                    return Err(JournalError::Failed(f.clone()));
                }
                if st.durable_through >= target {
                    return Ok(());
                }
                if st.completed_through >= target {
                    break st.completed_through;
                }
                st = self
                    .changed
                    .wait_timeout(st, Duration::from_millis(50))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        };
        sync_all(&self.disks).map_err(JournalError::Failed)?;
        let mut st = self.lock();
        st.durable_through = st.durable_through.max(covers);
        Ok(())
    }

    /// Durably records that every record up to `seq` is destaged, on every replica.
    pub fn checkpoint(&self, seq: u64) -> Result<(), JournalError> {
        let (position, slot) = {
            let st = self.lock();
            if seq <= st.checkpoint_seq {
                return Ok(());
            }
            let position = st
                .live
                .iter()
                .find(|(s, _, _)| *s == seq)
                .map_or(st.tail, |(_, _, end)| *end);
            (position, 1 - st.checkpoint_slot)
        };
        let cp = Checkpoint {
            seq,
            position,
            volume: self.volume,
        };
        let bytes = self.key.seal_checkpoint(&cp);
        let offset = self.layout.region_offset + slot * BLOCK_SIZE_U64;
        let pending: Vec<_> = self
            .disks
            .iter()
            .map(|d| {
                d.submit(vec![IoOp::Write {
                    offset,
                    buf: IoBuf::from_slice(&bytes),
                }])
            })
            .collect();
        let ok = pending.into_iter().filter_map(|p| p.wait().ok()).count();
        if ok == 0 {
            return Err(JournalError::Failed(
                "checkpoint reached no journal disk".into(),
            ));
        }
        sync_all(&self.disks).map_err(JournalError::Failed)?;
        let mut st = self.lock();
        st.checkpoint_seq = seq;
        st.checkpoint_slot = slot;
        st.checkpoint_position = position;
        Ok(())
    }

    /// Rewrites the newest checkpoint into both slots, sealed under the current master key
    /// version: the other slot first, then the current one (each durable before the next), so
    /// that a valid copy exists at every instant. Afterwards no checkpoint of this journal
    /// depends on an older version, which can then be destroyed. The caller must exclude
    /// [`Journal::checkpoint`] meanwhile (the volume holds its destage lock).
    pub fn reseal_checkpoints(&self) -> Result<(), JournalError> {
        let (seq, position, slot) = {
            let st = self.lock();
            (
                st.checkpoint_seq,
                st.checkpoint_position,
                st.checkpoint_slot,
            )
        };
        let bytes = self.key.seal_checkpoint(&Checkpoint {
            seq,
            position,
            volume: self.volume,
        });
        for s in [1 - slot, slot] {
            self.write_checkpoint_slot(s, &bytes)?;
        }
        Ok(())
    }

    /// Like [`Journal::restart`], for an open whose replayed records stay in the log (they could
    /// not be destaged yet): a durable skip record at the tail moves the sequence past every
    /// number a stale record can carry, so replay goes from the kept records to the new ones.
    pub fn jump(&self) -> Result<(), JournalError> {
        let Some(r) = self.reserve(BLOCK_SIZE_U64)? else {
            return Err(JournalError::Failed(
                "journal full: no room for the skip record".into(),
            ));
        };
        let next = r.seq + self.capacity() / BLOCK_SIZE_U64 + 1;
        let skip = RecordHeader {
            seq: r.seq,
            volume: self.volume,
            kind: RecordKind::Skip,
            trim_lba: next,
            trim_count: 1,
            payload_crc: crc32c::crc32c(&[]),
            entries: vec![],
        };
        let written = self.write(&r, IoBuf::from_slice(&skip.encode()));
        self.complete(&r);
        written?;
        self.flush_to(r.seq)?;
        let mut st = self.lock();
        st.next_seq = next;
        st.completed_through = next - 1;
        st.durable_through = next - 1;
        Ok(())
    }

    /// Starts a fresh sequence after open: call once every replayed record is destaged and
    /// checkpointed (the index holds nothing from the journal). Replay stops at the first invalid
    /// record, but a crash may have left valid, newer, unflushed records after it (unsynced
    /// writes are not ordered). Reusing their sequence numbers and positions would make them
    /// consecutive again as soon as a record of the same length fills the gap, and the next
    /// replay would apply them over newer data. So the sequence jumps past every number such a
    /// record can carry, and a checkpoint at the jump, durable before any new record, makes
    /// replay start there. Bound: every record after the durable checkpoint was live at the
    /// crash, each takes at least one page, so none has a sequence number above
    /// `checkpoint + capacity / 4096`.
    pub fn restart(&self) -> Result<(), JournalError> {
        let (seq, position, slot) = {
            let st = self.lock();
            if !st.in_flight.is_empty() {
                return Err(JournalError::Failed(
                    "journal restart with records in flight".into(),
                ));
            }
            (
                st.next_seq - 1 + self.capacity() / BLOCK_SIZE_U64 + 1,
                st.tail,
                1 - st.checkpoint_slot,
            )
        };
        let bytes = self.key.seal_checkpoint(&Checkpoint {
            seq,
            position,
            volume: self.volume,
        });
        self.write_checkpoint_slot(slot, &bytes)?;
        let mut st = self.lock();
        st.next_seq = seq + 1;
        st.completed_through = seq;
        st.durable_through = seq;
        st.checkpoint_seq = seq;
        st.checkpoint_slot = slot;
        st.checkpoint_position = position;
        // Whatever is still live (wrap markers only: records were destaged) is behind the checkpoint.
        st.live.clear();
        st.used = 0;
        self.changed.notify_all();
        self.space.notify_all();
        Ok(())
    }

    /// Writes a sealed checkpoint into slot `slot` of every journal disk and syncs them; at
    /// least one disk must take it.
    fn write_checkpoint_slot(&self, slot: u64, bytes: &[u8]) -> Result<(), JournalError> {
        let offset = self.layout.region_offset + slot * BLOCK_SIZE_U64;
        let pending: Vec<_> = self
            .disks
            .iter()
            .map(|d| {
                d.submit(vec![IoOp::Write {
                    offset,
                    buf: IoBuf::from_slice(bytes),
                }])
            })
            .collect();
        if pending.into_iter().filter_map(|p| p.wait().ok()).count() == 0 {
            return Err(JournalError::Failed(
                "checkpoint reached no journal disk".into(),
            ));
        }
        sync_all(&self.disks).map_err(JournalError::Failed)
    }

    /// Frees the space of records up to the last checkpoint. Call after the index no longer
    /// points into them.
    pub fn release(&self) {
        let mut st = self.lock();
        let cp = st.checkpoint_seq;
        while let Some(&(seq, len, _)) = st.live.front() {
            if seq > cp {
                break;
            }
            st.used -= len;
            st.live.pop_front();
        }
        self.space.notify_all();
    }

    /// The records still in use, oldest first: (sequence number, bytes of journal they hold).
    pub fn live_records(&self) -> Vec<(u64, u64)> {
        self.lock()
            .live
            .iter()
            .map(|(s, len, _)| (*s, *len))
            .collect()
    }

    /// Every record with a sequence number up to this one is durable.
    pub fn durable_through(&self) -> u64 {
        self.lock().durable_through
    }

    /// Sequence number of the newest checkpoint.
    pub fn checkpoint_seq(&self) -> u64 {
        self.lock().checkpoint_seq
    }

    /// The newest record before `seq` that a checkpoint can name (a live record), or the
    /// current checkpoint when there is none: where to checkpoint so that `seq` and everything
    /// after it are replayed.
    pub fn last_live_before(&self, seq: u64) -> u64 {
        let st = self.lock();
        st.live
            .iter()
            .map(|(s, _, _)| *s)
            .filter(|s| *s < seq)
            .max()
            .unwrap_or(st.checkpoint_seq)
            .max(st.checkpoint_seq)
    }

    /// Reads one payload page from the first replica whose copy passes `check`.
    pub fn read_page_checked(
        &self,
        offset: u64,
        check: impl Fn(&[u8]) -> bool,
    ) -> Result<IoBuf, JournalError> {
        let mut last = String::from("no journal disk has an intact copy");
        for d in &self.disks {
            match read(d, offset, BLOCK_SIZE) {
                Ok(b) if check(&b) => return Ok(b),
                Ok(_) => {
                    last = format!("no journal disk has an intact copy of the page at {offset}")
                }
                Err(e) => last = e,
            }
        }
        Err(JournalError::Failed(last))
    }
}

/// Most pages of one read in [`Journal::read_pages`]: 1 MiB, a whole record.
const MAX_RUN_PAGES: usize = 256;

/// Pages read by [`Journal::read_pages`], by the index of their offset.
pub struct Pages {
    runs: Vec<IoBuf>,
    /// Page i: (run, byte position in it).
    at: Vec<(usize, usize)>,
}

impl Pages {
    pub fn get(&self, i: usize) -> &[u8] {
        let (r, b) = self.at[i];
        &self.runs[r][b..b + BLOCK_SIZE]
    }
    pub fn get_mut(&mut self, i: usize) -> &mut [u8] {
        let (r, b) = self.at[i];
        &mut self.runs[r][b..b + BLOCK_SIZE]
    }
}

fn normalize(layout: &RegionLayout, pos: u64) -> u64 {
    if pos >= layout.log_end() {
        layout.log_start()
    } else {
        pos
    }
}

fn read(d: &DiskRef, offset: u64, len: usize) -> Result<IoBuf, String> {
    let ops = d
        .submit(vec![IoOp::Read {
            offset,
            buf: IoBuf::zeroed(len),
        }])
        .wait()
        .map_err(|e| e.to_string())?;
    match ops.into_iter().next() {
        Some(IoOp::Read { buf, .. }) => Ok(buf),
        _ => Err("read returned no buffer".into()),
    }
}

/// Waits for one batch per replica; returns how many succeeded and the last error. A replica
/// that fails is logged: losing up to `m` of them is what the copies are for.
fn wait_replicas(pending: Vec<(String, crate::disk::Pending)>, what: &str) -> (usize, String) {
    let mut ok = 0;
    let mut last = String::new();
    for (name, p) in pending {
        match p.wait() {
            Ok(_) => ok += 1,
            // A failed or pulled disk is logged once, by the pool's health registry.
            Err(e @ crate::disk::DiskError::Gone { .. }) => last = e.to_string(),
            Err(e) => {
                warn!(disk = %name, error = %e, "journal {what} failed on one replica");
                last = e.to_string();
            }
        }
    }
    (ok, last)
}

fn sync_all(disks: &[DiskRef]) -> Result<(), String> {
    let pending = disks
        .iter()
        .map(|d| (d.name().to_string(), d.submit(vec![IoOp::Sync])))
        .collect();
    let (ok, last) = wait_replicas(pending, "sync");
    if ok == 0 {
        Err(format!("sync reached no journal disk: {last}"))
    } else {
        Ok(())
    }
}

/// Reads and validates the record at `pos` with sequence `expect` from the first replica that
/// has a valid copy. Returns the header, the record length and that replica's index.
fn read_record(
    layout: &RegionLayout,
    volume: u64,
    disks: &[DiskRef],
    pos: u64,
    expect: u64,
    key: &HeaderKey,
) -> Option<(RecordHeader, u64, usize)> {
    for (i, d) in disks.iter().enumerate() {
        if let Some((h, len)) = read_record_from(layout, volume, d, pos, expect, key) {
            return Some((h, len, i));
        }
    }
    None
}

fn read_record_from(
    layout: &RegionLayout,
    volume: u64,
    d: &DiskRef,
    pos: u64,
    expect: u64,
    key: &HeaderKey,
) -> Option<(RecordHeader, u64)> {
    let first = read(d, pos, BLOCK_SIZE).ok()?;
    let pages = RecordHeader::peek_pages(&first)?;
    if pos + (pages * BLOCK_SIZE) as u64 > layout.log_end() {
        return None;
    }
    let head = if pages == 1 {
        first
    } else {
        read(d, pos, pages * BLOCK_SIZE).ok()?
    };
    let header = RecordHeader::decode(&head).ok()?;
    if header.seq != expect || header.volume != volume || !key.check_record(&head) {
        return None;
    }
    let len = header.record_len();
    if pos + len > layout.log_end() {
        return None;
    }
    let n = header.entries.len();
    let crc = if n == 0 {
        crc32c::crc32c(&[])
    } else {
        crc32c::crc32c(&read(d, pos + (pages * BLOCK_SIZE) as u64, n * BLOCK_SIZE).ok()?)
    };
    if crc != header.payload_crc {
        return None;
    }
    Some((header, len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::format::{
        BlockMeta, META_SIZE, RECORD_FIXED, RECORD_MAGIC, RECORD_MAGIC_V1, RecordProblem,
    };

    fn key() -> HeaderKey {
        HeaderKey {
            version: Box::new(|| 7),
            mac: Box::new(|v, b| (v == 7).then(|| *blake3::keyed_hash(&[9; 32], b).as_bytes())),
        }
    }

    fn header(n: u64) -> Vec<u8> {
        RecordHeader {
            seq: 5,
            volume: 1,
            kind: RecordKind::Write,
            trim_lba: 0,
            trim_count: 0,
            payload_crc: 0x1234_5678,
            entries: (0..n)
                .map(|i| BlockMeta {
                    generation: 5,
                    lba: 100 + i,
                    ..Default::default()
                })
                .collect(),
        }
        .encode()
    }

    /// Recomputes the header checksum after a change, as a disk forging a record would.
    fn fix_crc(h: &mut [u8]) {
        h[RECORD_CRC].fill(0);
        let crc = crc32c::crc32c(h);
        h[RECORD_CRC].copy_from_slice(&crc.to_le_bytes());
    }

    #[test]
    fn a_record_seal_covers_its_used_bytes_and_the_padding_must_be_zero() {
        let k = key();
        let mut h = header(3);
        k.seal_record(&mut h);
        assert!(k.check_record(&h));
        assert!(RecordHeader::decode(&h).is_ok());
        let used = RECORD_FIXED + 3 * META_SIZE;
        assert_eq!(sealed_len(&h), used);
        for pos in (0..used).filter(|p| !RECORD_CRC.contains(p)) {
            let mut c = h.clone();
            c[pos] ^= 0x04;
            fix_crc(&mut c);
            assert!(!k.check_record(&c), "a change at byte {pos} keeps the seal");
        }
        // The padding is not sealed, so a header with anything there is refused whole.
        let mut c = h.clone();
        c[used + 10] = 1;
        fix_crc(&mut c);
        assert_eq!(
            RecordHeader::decode(&c),
            Err(RecordProblem::BadField("padding"))
        );
    }

    #[test]
    fn records_of_the_earlier_format_sealed_over_whole_pages_are_still_accepted() {
        let k = key();
        let mut old = header(3);
        old[0..8].copy_from_slice(&RECORD_MAGIC_V1);
        let len = old.len();
        k.seal(&mut old, len, Some(RECORD_CRC));
        assert_eq!(sealed_len(&old), len);
        assert!(k.check_record(&old));
        assert_eq!(RecordHeader::decode(&old).map(|h| h.seq), Ok(5));
        // An earlier record's padding is sealed: changing it breaks the seal.
        let mut c = old.clone();
        c[len - 1] = 1;
        fix_crc(&mut c);
        assert!(!k.check_record(&c));
        // The old seal under the current magic does not check, nor does a current seal (over
        // the used bytes only) under the old magic.
        let mut relabeled = old.clone();
        relabeled[0..8].copy_from_slice(&RECORD_MAGIC);
        fix_crc(&mut relabeled);
        assert!(!k.check_record(&relabeled));
        let mut cur = header(3);
        k.seal_record(&mut cur);
        cur[0..8].copy_from_slice(&RECORD_MAGIC_V1);
        fix_crc(&mut cur);
        assert!(!k.check_record(&cur));
    }
}
