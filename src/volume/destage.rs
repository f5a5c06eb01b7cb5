//! The destager: moves journaled blocks into their chunk slots and checkpoints the journal.
//!
//! One round ([`Volume::destage_once`]):
//! 1. flush the journal; `target` = the newest durable record. Every record ≤ `target` is
//!    complete and applied to the index, so its stripe is dirty now;
//! 2. for each dirty stripe, under its write lock: snapshot its journal entries and trims (all
//!    of them — an entry may have replaced an older one that is ≤ `target`; the newest must
//!    reach the disks, so it must be durable first: a stripe whose newest entry is not is
//!    deferred to the next pass, which starts with one journal flush, see [`DEFER_PASSES`]);
//!    write the touched rows and their parity, and nothing of the rows between them (no reads
//!    when the whole stripe is covered);
//! 3. fsync every disk, persist the home allocation bitmaps, checkpoint the journal at
//!    `target`, drop the destaged index entries (unless a newer write replaced them), free
//!    the journal space.
//!
//! Stripes go in the order of their oldest record ([`Volume::round_order`]). Where the
//! records older than every remaining stripe's oldest free an eighth of the journal, the round
//! does step 3 for the stripes destaged so far and checkpoints at the newest of those records
//! ([`Volume::round_parts`]): after sequential writes, writers get the journal's tail back
//! while the round goes on. The checkpoint of a part never passes a record of a stripe not
//! destaged yet, nor one of a stripe kept in the journal. Step 3 of a part runs on a thread
//! of its own while the workers destage the next part (one such commit at a time, in order;
//! see [`Volume::destage_round`]).
//!
//! Only durable records are destaged, so a crash in step 2 or 3 is repaired by replaying the
//! journal from the previous checkpoint: the same rows are rewritten with the same data and
//! parity (idempotent). That is why a torn stripe update can never outlive a crash.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::sync::{Mutex, Weak};
use std::time::Duration;

use tracing::{debug, warn};

use super::format::META_SIZE;
use super::fresh::HomeUpdate;
use super::state::{Bits, JEntry, Stamp, StripeDirty};
use super::{DESTAGE_INTERVAL, Volume, VolumeError, snapshot_empty};
use crate::disk::{IoBuf, IoOp};
use crate::layout::{BLOCK_SIZE, BLOCK_SIZE_U64, StripeId};

/// Pause after a failed round before the next, so a failing disk is not hammered.
const RETRY_AFTER_ERROR: Duration = Duration::from_secs(1);
/// Stripes destaged at once. Destaging a stripe is two dependent rounds of I/O (read the rows,
/// write rows and parity), so one stripe at a time leaves the disks idle most of the time;
/// eight in flight keep 6–12 disks busy without letting a burst of destaging starve reads.
const DESTAGE_WORKERS: usize = 8;

/// Passes of a round that defer the stripes written to since the journal's last sync, before
/// the last pass syncs the journal for each such stripe it meets. A stripe must not be destaged
/// with a block that is not durable in the journal yet (a crash could then leave the slot
/// newer than anything replay knows, while an older, flushed copy of the block is already
/// behind the checkpoint). Under a steady stream of writes most stripes receive one while a
/// round runs; syncing the journal for each of them made the destage workers queue behind
/// one fdatasync after another. Deferring them lets one flush per pass cover them all; each
/// pass is shorter than the last, so three leave few stripes for the syncing pass.
const DEFER_PASSES: usize = 3;

/// Share of the journal that the records before a part boundary of a round must free, at
/// least, for the round to checkpoint there ([`Volume::round_parts`]). An eighth: after
/// sequential writes fill the 512 MiB journal, writers get 64 MiB back about every eighth of
/// the round instead of all of it at the end, for seven more disk syncs and checkpoints per
/// such round (a few milliseconds each).
const ROUND_PART_FRACTION: f64 = 0.125;

/// Body of the destager thread. Exits when the volume is closed or dropped.
pub(super) fn run(weak: Weak<Volume>) {
    loop {
        let Some(vol) = weak.upgrade() else { return };
        if vol.stop.load(Ordering::SeqCst) {
            return;
        }
        {
            let mut flag = vol.kick_flag.lock().unwrap_or_else(|p| p.into_inner());
            if !*flag {
                flag = vol
                    .kick
                    .wait_timeout(flag, DESTAGE_INTERVAL)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            *flag = false;
        }
        if vol.stop.load(Ordering::SeqCst) {
            return;
        }
        if let Err(e) = vol.destage_once() {
            vol.stats.destage_errors.fetch_add(1, Ordering::Relaxed);
            warn!(volume = %vol.record.name, error = %e, "destaging failed; the journal keeps the data and destaging retries");
            let flag = vol.kick_flag.lock().unwrap_or_else(|p| p.into_inner());
            if !vol.stop.load(Ordering::SeqCst) {
                let _unused = vol.kick.wait_timeout(flag, RETRY_AFTER_ERROR);
            }
        }
    }
}

/// What destaging one stripe did.
enum Destaged {
    /// Nothing to destage.
    Nothing,
    /// The stripe holds blocks newer than the journal's durable point, and this pass may not
    /// sync the journal: destage it in a later pass.
    Deferred,
    /// Destaged: the snapshot written, and the stripe's new home state.
    Done(StripeDirty, HomeUpdate),
    /// More than `m` of the stripe's disks are failed: its blocks stay in the journal (readable
    /// from there), from this sequence number on. New writes to the stripe are refused.
    Kept(u64),
}

/// One destaged part of a round, to commit ([`Volume::commit_part`]).
struct Part {
    /// The stripes destaged, with the snapshots written.
    done: Vec<(u64, StripeDirty)>,
    /// Their new home states.
    home_updates: Vec<HomeUpdate>,
    /// Where the journal may be checkpointed once they are synced and committed.
    checkpoint: u64,
    /// The round's last part (which also commits the journal-less stripe writes).
    last: bool,
}

/// What the commits of a round's parts made permanent.
#[derive(Default)]
struct Committed {
    stripes: usize,
    blocks: usize,
}

impl Committed {
    fn add(&mut self, other: Committed) {
        self.stripes += other.stripes;
        self.blocks += other.blocks;
    }
}

/// Waits for a part's commit thread; a panic there is carried on in the caller.
fn join_commit(
    h: std::thread::ScopedJoinHandle<'_, Result<Committed, VolumeError>>,
) -> Result<Committed, VolumeError> {
    h.join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// New content of one block of a stripe: a journaled block or zeros (trimmed).
#[derive(Clone, Copy)]
enum New {
    Journal(JEntry),
    Zero,
}

impl Volume {
    /// Destages until the journal holds nothing: used at open (after replay) and at close.
    pub(super) fn destage_all(&self) -> Result<(), VolumeError> {
        for _ in 0..1000 {
            self.destage_once()?;
            let left: Vec<u64> = self.dirty().stripes.keys().copied().collect();
            if left.is_empty() {
                return Ok(());
            }
            // Stripes with more than m disks failed stay in the journal (see `Destaged::Kept`).
            let lost: Vec<VolumeError> = left
                .iter()
                .filter_map(|s| self.check_stripe(StripeId(*s)).err())
                .collect();
            if lost.len() == left.len() {
                return Err(VolumeError::Io(format!(
                    "{} stripes keep their blocks in the journal; the first: {}",
                    left.len(),
                    lost[0]
                )));
            }
        }
        Err(VolumeError::Io("destaging does not converge".into()))
    }

    /// One destaging round; returns whether it destaged anything.
    pub(super) fn destage_once(&self) -> Result<bool, VolumeError> {
        let _one = self.destage_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.destage_round()
    }

    /// [`Volume::destage_once`] with the destage lock already held.
    ///
    /// The parts of a round are pipelined: while one part's commit (disk syncs, store commit,
    /// checkpoint) runs on a thread of its own, the destage workers write the next part. The
    /// commits still run one at a time and in order (a part's commit starts once the previous
    /// one has ended), so checkpoints only move forward, each covering stripes already synced
    /// and committed. The last part is committed by the round's thread.
    pub(super) fn destage_round(&self) -> Result<bool, VolumeError> {
        let started = std::time::Instant::now();
        let target = self.journal.flush()?;
        let order = self.round_order();
        if order.is_empty() && target <= self.journal.checkpoint_seq() && !self.fresh_pending() {
            return Ok(false);
        }
        let bps = self.layout.geometry.blocks_per_stripe();
        let parts = self.round_parts(&order, target);
        let count = parts.len();
        let part_sizes: Vec<usize> = parts.iter().map(|(todo, _)| todo.len()).collect();
        // Oldest record of the stripes that stay in the journal, over the whole round.
        let mut kept: Option<u64> = None;
        let mut written_ms = 0;
        let mut totals = Committed::default();
        std::thread::scope(|scope| -> Result<(), VolumeError> {
            let mut committing: Option<std::thread::ScopedJoinHandle<'_, _>> = None;
            for (i, (todo, part_checkpoint)) in parts.into_iter().enumerate() {
                let last = i + 1 == count;
                let destaged = self.destage_stripes(todo, target, bps);
                written_ms = started.elapsed().as_millis() as u64;
                // The previous part's commit ends first, whatever happened to this part.
                if let Some(h) = committing.take() {
                    totals.add(join_commit(h)?);
                }
                let (done, home_updates, part_kept) = destaged?;
                kept = match (kept, part_kept) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                // Once synced and committed, every record up to the part's checkpoint is at
                // home, except those of stripes kept in the journal.
                let checkpoint = part_checkpoint.unwrap_or(target);
                let checkpoint = match kept {
                    // Records from the oldest kept one on must stay replayable.
                    Some(oldest) if oldest <= checkpoint => self.journal.last_live_before(oldest),
                    _ => checkpoint,
                };
                let part = Part {
                    done,
                    home_updates,
                    checkpoint,
                    last,
                };
                if last {
                    totals.add(self.commit_part(part)?);
                } else {
                    let h = std::thread::Builder::new()
                        .name(format!("commit-{}", self.record.name))
                        .spawn_scoped(scope, move || self.commit_part(part))
                        .map_err(|e| VolumeError::Io(format!("starting a commit thread: {e}")))?;
                    committing = Some(h);
                }
            }
            Ok(())
        })?;
        self.stats
            .stripes_destaged
            .fetch_add(totals.stripes as u64, Ordering::Relaxed);
        debug!(
            volume = %self.record.name,
            stripes = totals.stripes,
            blocks = totals.blocks,
            parts = ?part_sizes,
            checkpoint = target,
            written_ms,
            total_ms = started.elapsed().as_millis() as u64,
            "destaged"
        );
        Ok(totals.stripes > 0)
    }

    /// Makes one part of a round permanent: syncs the disks, commits the allocation and stamps
    /// of its stripes (and, with the round's last part, of the journal-less stripe writes done
    /// so far), checkpoints the journal, drops the destaged index entries and frees their
    /// journal space.
    fn commit_part(&self, part: Part) -> Result<Committed, VolumeError> {
        let Part {
            done,
            mut home_updates,
            checkpoint,
            last,
        } = part;
        // Journal-less full-stripe writes completed so far are committed with the round's
        // last part.
        let fresh = if last { self.take_fresh() } else { Vec::new() };
        let written_now: Vec<u64> = done
            .iter()
            .map(|(s, _)| *s)
            .chain(fresh.iter().copied())
            .collect();
        let committed = self.sync_disks(&written_now).and_then(|()| {
            let destaged: BTreeSet<u64> = home_updates.iter().map(|(s, _)| *s).collect();
            for s in fresh.iter().filter(|s| !destaged.contains(s)) {
                home_updates.push(self.home_state(*s));
            }
            if !home_updates.is_empty() {
                self.store
                    .home_commit(self.record.id, &home_updates)
                    .map_err(|e| VolumeError::Io(e.to_string()))?;
            }
            Ok(())
        });
        if let Err(e) = committed {
            self.restore_fresh(fresh);
            return Err(e);
        }
        self.journal.checkpoint(checkpoint)?;
        if !last {
            self.stats.early_checkpoints.fetch_add(1, Ordering::Relaxed);
        }
        let out = Committed {
            stripes: done.len(),
            blocks: done.iter().map(|(_, snap)| snap.blocks.len()).sum(),
        };
        self.drop_destaged(done);
        self.journal.release();
        Ok(out)
    }

    /// The dirty stripes, in the order a round destages them: by their oldest record, so that
    /// the journal's tail is destaged first and a round can free space before it ends (see
    /// [`Volume::round_parts`]). A stripe with trims comes first: its index keeps only the
    /// newest trim record's number, so its oldest record is not known.
    fn round_order(&self) -> Vec<(u64, u64)> {
        let mut order: Vec<(u64, u64)> = self
            .dirty()
            .stripes
            .iter()
            .map(|(s, sd)| {
                let oldest = if sd.trims.is_some() {
                    0
                } else {
                    sd.blocks.values().map(|e| e.seq).min().unwrap_or(0)
                };
                (oldest, *s)
            })
            .collect();
        order.sort_unstable();
        order
    }

    /// Splits a round's stripes (in [`Volume::round_order`]) into parts, each with the
    /// checkpoint it allows once it and the parts before it are at home (`None` for the last
    /// part, which checkpoints at the round's `target`). A part ends where the records older
    /// than every remaining stripe's oldest one hold at least [`ROUND_PART_FRACTION`] of the
    /// journal more than at the previous part's end: after sequential writes the journal's
    /// tail belongs to a few stripes, and writers get its space back long before the round
    /// ends. Random writes give parts too (6–7 parts of 400–1 000 stripes in a round of
    /// about 4 000 under 4 KiB writes at qd32 on 1 GiB).
    fn round_parts(&self, order: &[(u64, u64)], target: u64) -> Vec<(Vec<u64>, Option<u64>)> {
        let live = self.journal.live_records();
        let step = (self.journal.capacity() as f64 * ROUND_PART_FRACTION) as u64;
        let mut parts = Vec::new();
        let mut start = 0;
        let (mut p, mut freed, mut freed_at_cut) = (0, 0u64, 0u64);
        for (i, &(oldest, _)) in order.iter().enumerate() {
            // Records older than this stripe's oldest (and than every later stripe's) are
            // destaged once the stripes before it are.
            while p < live.len() && live[p].0 < oldest && live[p].0 <= target {
                freed += live[p].1;
                p += 1;
            }
            if i > start && p > 0 && freed - freed_at_cut >= step.max(1) {
                let stripes = order[start..i].iter().map(|(_, s)| *s).collect();
                parts.push((stripes, Some(live[p - 1].0)));
                start = i;
                freed_at_cut = freed;
            }
        }
        parts.push((order[start..].iter().map(|(_, s)| *s).collect(), None));
        parts
    }

    /// Destages `todo` (stripe ids) with the destage workers, in passes that defer the stripes
    /// newer than the journal's durable point (see [`DEFER_PASSES`]). Returns the stripes
    /// destaged with their snapshots, their new home states, and the oldest record of the
    /// stripes kept in the journal.
    #[allow(clippy::type_complexity)]
    fn destage_stripes(
        &self,
        mut todo: Vec<u64>,
        target: u64,
        bps: u64,
    ) -> Result<(Vec<(u64, StripeDirty)>, Vec<HomeUpdate>, Option<u64>), VolumeError> {
        let done: Mutex<Vec<(u64, StripeDirty)>> = Mutex::new(Vec::new());
        let home_updates: Mutex<Vec<HomeUpdate>> = Mutex::new(Vec::new());
        // Oldest record of the stripes that stay in the journal.
        let kept: Mutex<Option<u64>> = Mutex::new(None);
        // Stripes written to since `target` was made durable are deferred to a later pass, which
        // starts with one journal flush for all of them (see `DEFER_PASSES`).
        for pass in 0..=DEFER_PASSES {
            if todo.is_empty() {
                break;
            }
            if pass > 0 {
                self.journal.flush()?;
            }
            let may_sync = pass == DEFER_PASSES;
            let queue = Mutex::new(todo.into_iter());
            let deferred: Mutex<Vec<u64>> = Mutex::new(Vec::new());
            let first_error: Mutex<Option<VolumeError>> = Mutex::new(None);
            std::thread::scope(|scope| {
                for _ in 0..DESTAGE_WORKERS {
                    scope.spawn(|| {
                        loop {
                            if first_error
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .is_some()
                            {
                                return;
                            }
                            let Some(s) = queue.lock().unwrap_or_else(|p| p.into_inner()).next()
                            else {
                                return;
                            };
                            match self.destage_one(StripeId(s), target, bps, may_sync) {
                                Ok(Destaged::Done(snap, update)) => {
                                    done.lock()
                                        .unwrap_or_else(|p| p.into_inner())
                                        .push((s, snap));
                                    home_updates
                                        .lock()
                                        .unwrap_or_else(|p| p.into_inner())
                                        .push(update);
                                }
                                Ok(Destaged::Kept(oldest)) => {
                                    let mut k = kept.lock().unwrap_or_else(|p| p.into_inner());
                                    *k = Some(k.map_or(oldest, |o: u64| o.min(oldest)));
                                }
                                Ok(Destaged::Deferred) => {
                                    deferred.lock().unwrap_or_else(|p| p.into_inner()).push(s)
                                }
                                Ok(Destaged::Nothing) => {}
                                Err(e) => {
                                    first_error
                                        .lock()
                                        .unwrap_or_else(|p| p.into_inner())
                                        .get_or_insert(e);
                                    return;
                                }
                            }
                        }
                    });
                }
            });
            if let Some(e) = first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
                return Err(e);
            }
            todo = deferred.into_inner().unwrap_or_else(|p| p.into_inner());
        }
        Ok((
            done.into_inner().unwrap_or_else(|p| p.into_inner()),
            home_updates.into_inner().unwrap_or_else(|p| p.into_inner()),
            kept.into_inner().unwrap_or_else(|p| p.into_inner()),
        ))
    }

    /// Drops the index entries that `done` destaged, unless a newer write replaced them
    /// meanwhile (after the checkpoint that covers them).
    fn drop_destaged(&self, done: Vec<(u64, StripeDirty)>) {
        for (s, snap) in done {
            let _g = self.locks.write(StripeId(s));
            let mut dirty = self.dirty();
            let Some(sd) = dirty.stripes.get_mut(&s) else {
                continue;
            };
            for (lba, e) in &snap.blocks {
                if sd.blocks.get(lba).is_some_and(|x| x.seq == e.seq) {
                    sd.blocks.remove(lba);
                }
            }
            if let (Some(t), Some(cur)) = (&snap.trims, &sd.trims)
                && cur.seq == t.seq
            {
                sd.trims = None;
            }
            if snapshot_empty(sd) {
                dirty.stripes.remove(&s);
            }
        }
    }

    /// Syncs every disk that is not failed, after `written` (stripe ids) were written. A sync
    /// that fails its disk leaves what the disk holds uncounted: each of `written` must then
    /// still be whole without it. Any other failed sync is an error.
    pub(super) fn sync_disks(&self, written: &[u64]) -> Result<(), VolumeError> {
        let ids: Vec<_> = self
            .health
            .ids()
            .into_iter()
            .filter(|id| !self.health.is_failed(*id))
            .collect();
        let pending: Vec<_> = ids
            .iter()
            .zip(self.disk_refs(&ids)?)
            .map(|(id, d)| (*id, d.submit(vec![IoOp::Sync])))
            .collect();
        let mut lost_disk = false;
        for (id, p) in pending {
            if let Err(e) = p.wait() {
                if !self.health.is_failed(id) {
                    return Err(VolumeError::Io(format!(
                        "sync of {}: {e}",
                        self.health.name(id)
                    )));
                }
                lost_disk = true;
            }
        }
        if lost_disk {
            for &s in written {
                let _g = self.locks.read(StripeId(s));
                self.check_stripe(StripeId(s))?;
            }
        }
        Ok(())
    }

    /// Destages one stripe under its write lock: returns the snapshot destaged and the stripe's
    /// new home bitmap (`None` when it holds nothing), or what else happened.
    fn destage_one(
        &self,
        stripe: StripeId,
        target: u64,
        bps: u64,
        may_sync: bool,
    ) -> Result<Destaged, VolumeError> {
        let s = stripe.0;
        let _g = self.locks.write(stripe);
        let Some(snap) = self.dirty().stripes.get(&s).cloned() else {
            return Ok(Destaged::Nothing);
        };
        if snapshot_empty(&snap) {
            return Ok(Destaged::Nothing);
        }
        let seqs = || {
            snap.blocks
                .values()
                .map(|e| e.seq)
                .chain(snap.trims.as_ref().map(|t| t.seq))
        };
        if self.check_stripe(stripe).is_err() {
            return Ok(Destaged::Kept(seqs().min().unwrap_or(target + 1)));
        }
        let newest = seqs().max().unwrap_or(0);
        if newest > target && newest > self.journal.durable_through() {
            if !may_sync {
                return Ok(Destaged::Deferred);
            }
            self.journal.flush_to(newest)?;
        }
        self.destage_stripe(stripe, &snap)?;
        let mut home = self.alloc.home();
        let bits = home.entry(s).or_insert_with(|| Bits::new(bps));
        for lba in snap.blocks.keys() {
            bits.set(lba - s * bps, true);
        }
        if let Some(t) = &snap.trims {
            for i in (0..bps).filter(|i| t.bits.get(*i)) {
                bits.set(i, false);
            }
        }
        if bits.is_empty() {
            home.remove(&s);
        }
        drop(home);
        self.alloc.record_stamps(
            stripe,
            snap.blocks
                .iter()
                .map(|(lba, e)| {
                    (
                        lba - s * bps,
                        Stamp {
                            generation: e.meta.generation,
                            version: e.meta.version,
                            epoch: e.meta.epoch,
                        },
                    )
                })
                .chain(snap.trims.iter().flat_map(|t| {
                    (0..bps)
                        .filter(|i| t.bits.get(*i) && !snap.blocks.contains_key(&(s * bps + i)))
                        .map(|i| (i, Stamp::default()))
                })),
        );
        Ok(Destaged::Done(snap, self.home_state_locked(s)))
    }

    /// Writes the snapshot of one stripe into its chunk slots (stripe write lock held).
    fn destage_stripe(&self, stripe: StripeId, snap: &StripeDirty) -> Result<(), VolumeError> {
        let g = self.layout.geometry;
        let (k, width) = (usize::from(g.k), g.width());
        let bpc = g.blocks_per_chunk();
        let bps = g.blocks_per_stripe();
        let first_lba = stripe.0 * bps;
        let ids = self.stripe_ids(stripe)?;
        let disks = self.disk_refs(&ids)?;
        // Chunks on failed disks (or not rebuilt yet) are neither read nor written: parity is
        // still computed over the whole row, so they are rebuilt from it when needed.
        let mut usable = self.usable(stripe, &ids);

        // (chunk, row) → new content.
        let mut new: BTreeMap<(usize, u64), New> = BTreeMap::new();
        for (lba, e) in &snap.blocks {
            let i = lba - first_lba;
            new.insert(((i / bpc) as usize, i % bpc), New::Journal(*e));
        }
        if let Some(t) = &snap.trims {
            for i in (0..bps).filter(|i| t.bits.get(*i)) {
                new.entry(((i / bpc) as usize, i % bpc))
                    .or_insert(New::Zero);
            }
        }
        if new.is_empty() {
            return Ok(());
        }
        let full = new.len() as u64 == bps;
        // A stripe with nothing at home: its old content is zeros, whatever its slots hold (a
        // journal-less stripe write cut short by a crash, `fresh.rs`, may have left chunks of
        // it). So nothing is read or verified; the slots are discarded first, and the touched
        // rows are coded over zeros.
        let empty_home =
            !full && self.allocation_known && !self.alloc.home().contains_key(&stripe.0);
        if (full && snap.blocks.is_empty()) || empty_home {
            // Whole stripe trimmed, or nothing at home yet: free every chunk slot (zeros are a
            // valid stripe).
            let slot = self.layout.slot_offset(stripe);
            let pending: Vec<_> = disks
                .iter()
                .enumerate()
                .filter(|(c, _)| usable[*c])
                .map(|(c, d)| {
                    (
                        c,
                        d.submit(vec![IoOp::Discard {
                            offset: slot,
                            len: self.layout.slot_size(),
                        }]),
                    )
                })
                .collect();
            for (c, p) in pending {
                if let Err(e) = p.wait() {
                    self.written_around(stripe, &ids, &mut usable, c, &e)?;
                }
            }
            if !empty_home || snap.blocks.is_empty() {
                return Ok(());
            }
        }
        // Only the touched rows are verified, coded and written: a row that no new block
        // touches keeps its data and parity on the disks, which agree already. The buffers hold
        // the touched rows only, packed in row order (`pos[&r]` is row r's place in them): the
        // code is position-local, so packed rows code exactly as they would in place, and a
        // stripe with 8 blocks over 64 rows handles 8 rows, not the 50 between its first and
        // last. Each data chunk reads the touched rows in one I/O per group of runs
        // (`read_spans`).
        let rows: Vec<u64> = new
            .keys()
            .map(|(_, r)| *r)
            .collect::<BTreeSet<u64>>()
            .into_iter()
            .collect();
        let pos: BTreeMap<u64, usize> = rows.iter().enumerate().map(|(i, r)| (*r, i)).collect();
        let nr = rows.len();
        let (rmin, rmax) = (*rows.first().unwrap_or(&0), *rows.last().unwrap_or(&0));
        let runs = row_runs(&rows);
        let spans = read_spans(&runs);
        // A data chunk needs its old rows read only where a touched row keeps its old block.
        let keeps_old: Vec<bool> = (0..k)
            .map(|c| rows.iter().any(|r| !new.contains_key(&(c, *r))))
            .collect();
        let (page_a, _) = self.layout.meta_location(stripe, rmin);
        let (page_b, _) = self.layout.meta_location(stripe, rmax);
        let pages_len = (page_b - page_a + BLOCK_SIZE_U64) as usize;
        // Byte position of row r's entry inside the metadata pages buffer.
        let meta_at = |r: u64| {
            let (p, at) = self.layout.meta_location(stripe, r);
            (p - page_a) as usize + at
        };
        let block = |i: usize| i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE;
        let entry = |i: usize| i * META_SIZE..(i + 1) * META_SIZE;

        // Read phase: current rows of the data chunks and metadata pages of every chunk.
        let mut data: Vec<Vec<u8>> = vec![vec![0u8; nr * BLOCK_SIZE]; k];
        let mut pages: Vec<Vec<u8>> = vec![vec![0u8; pages_len]; width];
        if !full && !empty_home {
            let pending: Vec<_> = disks
                .iter()
                .enumerate()
                .filter(|(c, _)| usable[*c])
                .map(|(c, d)| {
                    let mut ops = vec![IoOp::Read {
                        offset: page_a,
                        buf: IoBuf::zeroed(pages_len),
                    }];
                    if c < k && keeps_old[c] {
                        ops.extend(spans.iter().map(|&(a, b)| IoOp::Read {
                            offset: self.layout.block_offset(stripe, a),
                            buf: IoBuf::zeroed((b - a) as usize * BLOCK_SIZE),
                        }));
                    }
                    (c, d.submit(ops))
                })
                .collect();
            for (c, p) in pending {
                match p.wait() {
                    Ok(ops) => {
                        for (i, op) in ops.into_iter().enumerate() {
                            let IoOp::Read { buf, .. } = op else { continue };
                            if i == 0 {
                                pages[c].copy_from_slice(&buf);
                                continue;
                            }
                            // The span [a, b) also holds the untouched rows between runs.
                            let (a, b) = spans[i - 1];
                            let first = rows.partition_point(|r| *r < a);
                            for (j, r) in rows.iter().enumerate().skip(first) {
                                if *r >= b {
                                    break;
                                }
                                data[c][block(j)].copy_from_slice(&buf[block((r - a) as usize)]);
                            }
                        }
                    }
                    Err(e) if self.health.is_failed(ids[c]) => {
                        // The read failed the disk: write around it from now on.
                        self.written_around(stripe, &ids, &mut usable, c, &e)?;
                    }
                    Err(e) => {
                        // Writing around a chunk that cannot be read but is still trusted would
                        // leave it holding an older block with a valid tag. Keep the data in the
                        // journal instead; the disk is failed if this goes on.
                        return Err(VolumeError::Io(format!(
                            "stripe {stripe}: chunk {c} on {} unreadable: {e}",
                            self.health.name(ids[c])
                        )));
                    }
                }
            }
        }
        let mut metas: Vec<Vec<u8>> = (0..k)
            .map(|c| {
                let mut m = vec![0u8; nr * META_SIZE];
                for (i, &r) in rows.iter().enumerate() {
                    m[entry(i)].copy_from_slice(&pages[c][meta_at(r)..meta_at(r) + META_SIZE]);
                }
                m
            })
            .collect();

        // Overlay the new content.
        let journaled: Vec<((usize, u64), JEntry)> = new
            .iter()
            .filter_map(|(key, n)| {
                if let New::Journal(e) = n {
                    Some((*key, *e))
                } else {
                    None
                }
            })
            .collect();
        let offsets: Vec<u64> = journaled.iter().map(|(_, e)| e.offset).collect();
        let journal_pages = if offsets.is_empty() {
            None
        } else {
            Some(self.journal.read_pages(&offsets, |i, p| {
                self.verify(
                    crate::layout::Lba(journaled[i].1.meta.lba),
                    &journaled[i].1.meta,
                    p,
                )
            })?)
        };
        for (n, ((c, r), e)) in journaled.iter().enumerate() {
            let Some(pages) = &journal_pages else { break };
            let i = pos[r];
            data[*c][block(i)].copy_from_slice(pages.get(n));
            metas[*c][entry(i)].copy_from_slice(&e.meta.encode());
        }
        for ((c, r), n) in &new {
            if matches!(n, New::Zero) {
                let i = pos[r];
                data[*c][block(i)].fill(0);
                metas[*c][entry(i)].fill(0);
            }
        }

        // Check the blocks kept from the disks; rebuild the rows where one is bad, so parity is
        // never computed over rotten data.
        let mut repaired: BTreeSet<(usize, u64)> = BTreeSet::new();
        if !full && !empty_home {
            for (i, &r) in rows.iter().enumerate() {
                let bad: Vec<usize> = (0..k)
                    .filter(|c| !new.contains_key(&(*c, r)))
                    .filter(|&c| {
                        if !usable[c] {
                            return true;
                        }
                        let ok =
                            self.block_ok(stripe, c, r, &data[c][block(i)], &metas[c][entry(i)]);
                        if !ok {
                            self.health.tag_failure(ids[c]);
                        }
                        !ok
                    })
                    .collect();
                if bad.is_empty() {
                    continue;
                }
                let row = self
                    .read_row(stripe, r, &disks, &bad)
                    .map_err(VolumeError::Io)?;
                let mut fixed = 0;
                for c in bad {
                    data[c][block(i)].copy_from_slice(&row.shards[c][..BLOCK_SIZE]);
                    metas[c][entry(i)].copy_from_slice(&row.shards[c][BLOCK_SIZE..]);
                    if usable[c] {
                        repaired.insert((c, r));
                        self.health.repaired(ids[c], 1);
                        fixed += 1;
                    }
                }
                self.stats
                    .blocks_repaired
                    .fetch_add(fixed, Ordering::Relaxed);
            }
        }

        // Parity over the touched rows' data and metadata, all packed rows in one call.
        let m = width - k;
        let mut pdata = vec![vec![0u8; nr * BLOCK_SIZE]; m];
        let mut pmeta = vec![vec![0u8; nr * META_SIZE]; m];
        for (bufs, par) in [(&data, &mut pdata), (&metas, &mut pmeta)] {
            let d: Vec<&[u8]> = bufs.iter().map(Vec::as_slice).collect();
            let mut p: Vec<&mut [u8]> = par.iter_mut().map(Vec::as_mut_slice).collect();
            self.codec
                .encode(&d, &mut p)
                .map_err(|e| VolumeError::Io(e.to_string()))?;
        }

        // Write phase: one write per run of consecutive rows of one kind.
        let mut pending = Vec::with_capacity(width);
        for (c, d) in disks.iter().enumerate() {
            if !usable[c] {
                continue;
            }
            let mut ops = Vec::new();
            let meta_rows: &[u8] = if c < k { &metas[c] } else { &pmeta[c - k] };
            let page = &mut pages[c];
            for (i, &r) in rows.iter().enumerate() {
                page[meta_at(r)..meta_at(r) + META_SIZE].copy_from_slice(&meta_rows[entry(i)]);
            }
            // Rows with new or repaired data are written, trimmed rows become holes; parity
            // rows are all written.
            let kind = |r: u64| match new.get(&(c, r)) {
                _ if c >= k => 1,
                Some(New::Journal(_)) => 1,
                Some(New::Zero) => 2,
                None if repaired.contains(&(c, r)) => 1,
                None => 0,
            };
            let bufs: &[u8] = if c < k { &data[c] } else { &pdata[c - k] };
            let mut i = 0;
            while i < nr {
                let (start, kd) = (i, kind(rows[i]));
                i += 1;
                while i < nr && rows[i] == rows[i - 1] + 1 && kind(rows[i]) == kd {
                    i += 1;
                }
                let offset = self.layout.block_offset(stripe, rows[start]);
                match kd {
                    1 => ops.push(IoOp::Write {
                        offset,
                        buf: IoBuf::from_slice(&bufs[start * BLOCK_SIZE..i * BLOCK_SIZE]),
                    }),
                    2 => ops.push(IoOp::Discard {
                        offset,
                        len: ((i - start) * BLOCK_SIZE) as u64,
                    }),
                    _ => {}
                }
            }
            if c < k && ops.is_empty() {
                // A data chunk with no new, trimmed or repaired row: its metadata page is
                // unchanged, and rewriting it would only add a write per destaged row.
                continue;
            }
            ops.push(IoOp::Write {
                offset: page_a,
                buf: IoBuf::from_slice(page),
            });
            pending.push((c, d.submit(ops)));
        }
        for (c, p) in pending {
            if let Err(e) = p.wait() {
                self.written_around(stripe, &ids, &mut usable, c, &e)?;
            }
        }
        if full {
            self.stats
                .full_stripe_destages
                .fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Chunk `c` of a stripe being destaged failed with `e`. If that failed its disk, the
    /// stripe is written around it (fine while no more than `m` chunks are unusable); otherwise
    /// the error stands and the stripe stays in the journal.
    fn written_around(
        &self,
        stripe: StripeId,
        ids: &[crate::layout::DiskId],
        usable: &mut [bool],
        c: usize,
        e: &crate::disk::DiskError,
    ) -> Result<(), VolumeError> {
        if !self.health.is_failed(ids[c]) {
            return Err(VolumeError::Io(format!(
                "destaging stripe {stripe} to {}: {e}",
                self.health.name(ids[c])
            )));
        }
        usable[c] = false;
        let gone = usable.iter().filter(|u| !**u).count();
        if gone > usize::from(self.layout.geometry.m) {
            return Err(VolumeError::Io(format!(
                "destaging stripe {stripe}: {gone} of its disks failed ({e})"
            )));
        }
        Ok(())
    }
}

/// Rows of untouched gap worth a read of their own: a gap narrower than this is read along
/// with the runs around it. On page-cache disks a `pread` costs roughly what copying a few
/// pages does (an estimate). Measured (`docs/benchmarks.md`): reading every row between the
/// first and last touched one cost 50 KiB of reads per random 4 KiB write, reading the runs
/// 33 KiB, for 8 % more read calls.
const READ_GAP_ROWS: u64 = 4;

/// Groups runs of touched rows `[a, b)` into the ranges a data chunk reads: runs closer than
/// [`READ_GAP_ROWS`] share one read.
fn read_spans(runs: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &(a, b) in runs {
        match out.last_mut() {
            Some((_, end)) if a - *end < READ_GAP_ROWS => *end = b,
            _ => out.push((a, b)),
        }
    }
    out
}

/// Maximal runs `[a, b)` of consecutive rows in `rows` (ascending, distinct), in order.
fn row_runs(rows: &[u64]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &r in rows {
        match out.last_mut() {
            Some((_, b)) if *b == r => *b = r + 1,
            _ => out.push((r, r + 1)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_spans_join_runs_across_narrow_gaps_only() {
        // Gaps of 3 rows (8..11) and 4 rows (12..16) after runs [5, 8) and [11, 12).
        assert_eq!(
            read_spans(&[(5, 8), (11, 12), (16, 17)]),
            vec![(5, 12), (16, 17)]
        );
        assert_eq!(read_spans(&[(0, 1), (15, 16)]), vec![(0, 1), (15, 16)]);
        assert_eq!(read_spans(&[(3, 4)]), vec![(3, 4)]);
        assert!(read_spans(&[]).is_empty());
    }
}
