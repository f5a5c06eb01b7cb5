//! Rebalancing a volume onto a grown disk table (`shardvol disk add`).
//!
//! Placement is a pure function of the disk table, so a new disk changes where some chunks of
//! most stripes belong. While the chunks move, the volume has two tables and a cursor
//! ([`Placements`]): stripes below the cursor are placed over the new table, the others over
//! the old one. [`Volume::stripe_ids`] is the one place that decides.
//!
//! Why chunks are not simply copied: rendezvous placement can move chunk `i` of a stripe onto a
//! disk that holds chunk `j` of the same stripe under the old table (every disk has one slot per
//! stripe), so copying would overwrite a slot the old table still needs until the cursor that
//! switches tables is durable. So a stripe moves **through the journal**, as the re-keying does:
//!
//! 1. Under the destage lock (no destaging round can run), every stripe of the batch whose
//!    placement changes and which holds data is written to the journal in full: its live blocks
//!    as write records (read under the stripe lock, newest content), every other block as trim
//!    records. The journal is then flushed. From here on, the stripe's whole content is in durable
//!    records, so destaging it is a full-stripe write that reads no slot, under either table.
//! 2. Under the write locks of every stripe of the batch, the cursor moves past the batch and is
//!    committed to the metadata store (the volume record's `rebalance.cursor`), then to the
//!    superblocks (through the pool's hook), before any lock is released. Stripes that hold no
//!    data, or whose placement does not change, move with the cursor and nothing else: nothing of
//!    theirs is read from a slot.
//! 3. A destaging round writes the batch over the new table and checkpoints the journal.
//!
//! A crash before step 2's commit leaves the old table in force and the records replay over it
//! (a full-stripe rewrite of the old slots); after it, the new table is in force and the records
//! replay over that. No slot of the new table is written before step 2, and no client write to
//! the batch can reach a slot before it either (it waits for the stripe locks, then the journal).
//! Crash tests: `tests/rebalance.rs`.
//!
//! Cost: each moved stripe is written once to the journal (`m + 1` replicas) and once in full to
//! its disks, about `(m + 1) + (k + m) / k` times its data, plus one store commit and one
//! superblock write per batch. Adding one disk to `N` changes the placement of nearly every
//! stripe (the new disk takes each chunk with probability about `1 / (N + 1)`), so a rebalance
//! rewrites about the whole volume; stripes never written cost one lock and no I/O.

use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};

use serde::Serialize;

use super::format::{MAX_RECORD_BLOCKS, RecordHeader, RecordKind, record_len};
use super::state::LOCK_SLOTS;
use super::{Volume, VolumeError};
use crate::disk::IoBuf;
use crate::layout::placement::{Placement, PlacementDisk};
use crate::layout::{BLOCK_SIZE, Lba, StripeId};
use crate::meta::VolumeRecord;

/// Called after the cursor is committed to the store: writes it to the superblocks.
pub type CommitHook = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// Most stripes moved per step (one store commit and one superblock write each).
pub const STEP_STRIPES: u64 = 256;
/// Most journal bytes one step writes: a quarter of the journal, at most this (fewer, larger
/// steps amortise the step's syncs, store commit and superblock writes).
const STEP_JOURNAL_BYTES: u64 = 32 << 20;
/// Times a stripe is journaled again when a client write races the first attempt.
const RETRIES: usize = 8;

/// Where the stripes of a volume are: one table, or two and a cursor during a rebalance.
pub(crate) struct Placements {
    current: Placement,
    /// The table before the disk add: stripes at or after `cursor` still use it.
    old: Option<Placement>,
    cursor: u64,
    hook: Option<CommitHook>,
}

impl Placements {
    /// The tables a volume record describes: `current` (over every disk of the pool) and, when
    /// the record has a rebalance in progress, the old table over the disks it names.
    pub(super) fn load(
        record: &VolumeRecord,
        current: &Placement,
        table: &[PlacementDisk],
    ) -> Result<Self, VolumeError> {
        let (old, cursor) = match &record.rebalance {
            None => (None, 0),
            Some(r) => {
                let old_table: Vec<PlacementDisk> = table
                    .iter()
                    .filter(|d| r.from.contains(&d.id))
                    .cloned()
                    .collect();
                if old_table.len() != r.from.len() {
                    return Err(VolumeError::Config(format!(
                        "volume {}: its rebalance record names disks the pool does not have ({:?})",
                        record.name, r.from
                    )));
                }
                let old = Placement::new(record.placement_seed, old_table)
                    .map_err(|e| VolumeError::Config(e.to_string()))?;
                (Some(old), r.cursor)
            }
        };
        Ok(Self {
            current: current.clone(),
            old,
            cursor,
            hook: None,
        })
    }

    /// The table that places `stripe`.
    pub(super) fn of(&self, stripe: StripeId) -> &Placement {
        match &self.old {
            Some(old) if stripe.0 >= self.cursor => old,
            _ => &self.current,
        }
    }
}

/// What one rebalance step did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct StepReport {
    /// Stripes the cursor passed.
    pub stripes: u64,
    /// Of those, stripes rewritten over the new table (they held data and their placement
    /// changed).
    pub moved: u64,
    /// Chunk positions whose disk changed, over the moved stripes.
    pub chunks_moved: u64,
    /// Bytes of live blocks rewritten.
    pub bytes: u64,
    /// The cursor after the step.
    pub cursor: u64,
    /// True when the volume is entirely on the new table (the rebalance is over).
    pub finished: bool,
}

impl Volume {
    /// Starts a rebalance onto `table` (the pool's disk table with the new disk). The caller
    /// has committed the volume record's `rebalance` (cursor 0, the old disks) to the store.
    pub fn begin_rebalance(&self, table: Vec<PlacementDisk>) -> Result<(), VolumeError> {
        let _one = self
            .destage_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let new = Placement::new(self.record.placement_seed, table)
            .map_err(|e| VolumeError::Config(e.to_string()))?;
        let mut p = self
            .placement
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if p.old.is_some() {
            return Err(VolumeError::Config(format!(
                "volume {} is already being rebalanced",
                self.record.name
            )));
        }
        let old = std::mem::replace(&mut p.current, new);
        p.old = Some(old);
        p.cursor = 0;
        Ok(())
    }

    /// Installs the hook that writes a committed cursor to the superblocks.
    pub fn set_rebalance_hook(&self, hook: CommitHook) {
        self.placement
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .hook = Some(hook);
    }

    /// The rebalance cursor, while a rebalance is in progress: stripes below it have moved.
    pub fn rebalance_cursor(&self) -> Option<u64> {
        let p = self
            .placement
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        p.old.as_ref().map(|_| p.cursor)
    }

    /// Moves up to `max` stripes from the cursor on (see the module docs). When the cursor
    /// reaches the end, the rebalance is recorded as finished and the old table dropped.
    pub fn rebalance_step(&self, max: u64) -> Result<StepReport, VolumeError> {
        let _one = self
            .destage_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let (from, end) = {
            let p = self
                .placement
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            if p.old.is_none() {
                return Ok(StepReport {
                    finished: true,
                    ..Default::default()
                });
            }
            (p.cursor, self.layout.stripes)
        };
        let width = self.layout.geometry.width();
        let max = max.clamp(1, LOCK_SLOTS as u64);
        let mut report = StepReport::default();
        let mut n = 0u64;
        let mut budget = STEP_JOURNAL_BYTES.min(self.journal.capacity() / 4);
        // Step 1: journal the stripes that hold data and move.
        while from + n < end && n < max {
            let s = StripeId(from + n);
            let (old, new) = {
                let p = self
                    .placement
                    .read()
                    .unwrap_or_else(PoisonError::into_inner);
                let old = p.old.as_ref().map(|o| o.place(s, width));
                (old, p.current.place(s, width))
            };
            let (Some(Ok(old)), Ok(new)) = (old, new) else {
                return Err(VolumeError::Config(format!(
                    "volume {}: cannot place stripe {s} over the disk tables",
                    self.record.name
                )));
            };
            if old != new && self.holds_data(s) {
                let need = self.stripe_journal_bytes(s);
                if need > budget && n > 0 {
                    break;
                }
                self.make_room(need)?;
                let blocks = self.journal_whole_stripe(s)?;
                budget = budget.saturating_sub(need);
                report.moved += 1;
                report.chunks_moved += old.iter().zip(&new).filter(|(a, b)| a != b).count() as u64;
                report.bytes += blocks * BLOCK_SIZE as u64;
            }
            n += 1;
        }
        self.journal.flush()?;
        // Step 2: under the locks of the whole batch, check that the stripes that were not
        // journaled are still empty (a client write may have come in), move the cursor and
        // make it durable.
        {
            let _locks = self.locks.write_many(StripeId(from), n);
            let journaled = |s: u64| self.fully_journaled(StripeId(s));
            let mut passed = 0;
            while passed < n {
                let s = StripeId(from + passed);
                let p = self
                    .placement
                    .read()
                    .unwrap_or_else(PoisonError::into_inner);
                let same = p
                    .old
                    .as_ref()
                    .map(|o| o.place(s, width))
                    .and_then(Result::ok)
                    == p.current.place(s, width).ok();
                drop(p);
                if !same && self.holds_data(s) && !journaled(s.0) {
                    break;
                }
                passed += 1;
            }
            report.stripes = passed;
            report.cursor = from + passed;
            self.commit_cursor(from + passed)?;
        }
        // Step 3: write the batch over the new table.
        self.destage_round()?;
        if report.cursor >= end {
            self.finish_rebalance()?;
            report.finished = true;
        }
        self.stats
            .stripes_rebalanced
            .fetch_add(report.moved, Ordering::Relaxed);
        Ok(report)
    }

    /// Whether a stripe has anything in its slots or the journal: live blocks, or blocks at
    /// home (a pending trim may have made them not live yet).
    fn holds_data(&self, stripe: StripeId) -> bool {
        !self.alloc.live_bits(stripe).is_empty() || self.alloc.home().contains_key(&stripe.0)
    }

    /// Whether the journal covers every block of `stripe` (written or trimmed): destaging it
    /// then rewrites every slot, and what the slots hold now does not matter (scrub skips it).
    pub(super) fn fully_journaled(&self, stripe: StripeId) -> bool {
        let bps = self.layout.geometry.blocks_per_stripe();
        self.dirty()
            .stripes
            .get(&stripe.0)
            .is_some_and(|sd| covers(sd, stripe.0, bps))
    }

    /// Journal bytes [`Volume::journal_whole_stripe`] writes for `stripe` as it is now.
    fn stripe_journal_bytes(&self, stripe: StripeId) -> u64 {
        let runs = live_runs(
            &self.alloc.live_bits(stripe),
            self.layout.geometry.blocks_per_stripe(),
        );
        runs.iter()
            .map(|&(_, n, live)| {
                if live {
                    record_len(n as usize)
                } else {
                    BLOCK_SIZE as u64
                }
            })
            .sum()
    }

    /// Destages when the journal has less than twice `need` free (destage lock held).
    fn make_room(&self, need: u64) -> Result<(), VolumeError> {
        let free = self.journal.capacity().saturating_sub(self.journal.used());
        if free >= need.saturating_mul(2) {
            return Ok(());
        }
        self.destage_round()?;
        let free = self.journal.capacity().saturating_sub(self.journal.used());
        if free < need {
            return Err(VolumeError::Io(format!(
                "volume {}: the journal has {free} bytes free, a stripe needs {need} to move",
                self.record.name
            )));
        }
        Ok(())
    }

    /// Writes every block of `stripe` to the journal: live blocks as writes (their current
    /// content), the others as trims. Returns the live blocks written.
    fn journal_whole_stripe(&self, stripe: StripeId) -> Result<u64, VolumeError> {
        let bps = self.layout.geometry.blocks_per_stripe();
        let first = stripe.0 * bps;
        'attempt: for _ in 0..RETRIES {
            let runs = live_runs(&self.alloc.live_bits(stripe), bps);
            let mut written = 0;
            for (at, count, is_live) in runs {
                let lba0 = first + at;
                if is_live {
                    self.append(stripe, count as usize, |r| {
                        let plain = self.read_stripe_blocks(stripe, Lba(lba0), count)?;
                        self.build_write_record(r, lba0, count as usize, |lba, page| {
                            page.copy_from_slice(&plain[(lba.0 - lba0) as usize]);
                            Ok(())
                        })
                    })?;
                    written += count;
                    continue;
                }
                let raced = std::cell::Cell::new(false);
                let result = self.append(stripe, 0, |r| {
                    // Under the stripe lock: a block written since the runs were made must
                    // not be trimmed.
                    let now = self.alloc.live_bits(stripe);
                    if (at..at + count).any(|i| now.get(i)) {
                        raced.set(true);
                        return Err(VolumeError::Io("raced by a write".into()));
                    }
                    let header = RecordHeader {
                        seq: r.seq,
                        volume: self.record.id,
                        kind: RecordKind::Trim,
                        trim_lba: lba0,
                        trim_count: count,
                        payload_crc: crc32c::crc32c(&[]),
                        entries: vec![],
                    };
                    Ok((
                        IoBuf::from_slice(&header.encode()),
                        super::RecordApply::Trim {
                            from: at,
                            to: at + count,
                        },
                    ))
                });
                match result {
                    Ok(()) => {}
                    Err(_) if raced.get() => continue 'attempt,
                    Err(e) => return Err(e),
                }
            }
            return Ok(written);
        }
        Err(VolumeError::Io(format!(
            "volume {}: stripe {stripe} is written too often to move; the rebalance retries it",
            self.record.name
        )))
    }

    /// Sets the cursor and makes it durable: store, then superblocks (locks of every stripe it
    /// passes held).
    fn commit_cursor(&self, cursor: u64) -> Result<(), VolumeError> {
        self.commit_rebalance(
            |rb| {
                if let Some(rb) = rb {
                    rb.cursor = cursor;
                }
            },
            |p| p.cursor = cursor,
        )
    }

    /// Every stripe is on the new table: the record's rebalance is removed and the old table
    /// dropped (destage lock held).
    fn finish_rebalance(&self) -> Result<(), VolumeError> {
        self.commit_rebalance(|rb| *rb = None, |p| p.old = None)
    }

    /// Changes the volume record's rebalance in the store with `record`, then the tables in
    /// memory with `memory`, then runs the superblock hook.
    fn commit_rebalance(
        &self,
        record: impl FnOnce(&mut Option<crate::meta::Rebalance>),
        memory: impl FnOnce(&mut Placements),
    ) -> Result<(), VolumeError> {
        self.store
            .update_volume(self.record.id, |r| record(&mut r.rebalance))
            .map_err(|e| VolumeError::Io(e.to_string()))?;
        let hook = {
            let mut p = self
                .placement
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            memory(&mut p);
            p.hook.clone()
        };
        if let Some(h) = hook {
            h().map_err(VolumeError::Io)?;
        }
        Ok(())
    }
}

/// Runs of `(first block, count, live)` over a stripe's `bps` blocks; live runs hold at most
/// one record's worth of blocks.
fn live_runs(live: &super::Bits, bps: u64) -> Vec<(u64, u64, bool)> {
    let mut runs: Vec<(u64, u64, bool)> = Vec::new();
    for i in 0..bps {
        let l = live.get(i);
        match runs.last_mut() {
            Some((_, n, rl)) if *rl == l && (!l || *n < MAX_RECORD_BLOCKS as u64) => *n += 1,
            _ => runs.push((i, 1, l)),
        }
    }
    runs
}

/// Whether the journal covers every block of stripe `s` (written or trimmed).
fn covers(sd: &super::StripeDirty, s: u64, bps: u64) -> bool {
    let trims = sd.trims.as_ref();
    (0..bps).all(|i| sd.blocks.contains_key(&(s * bps + i)) || trims.is_some_and(|t| t.bits.get(i)))
}
