//! Full-stripe writes to empty stripes, written in place without the journal.
//!
//! A write that covers a whole stripe which holds nothing at home and nothing in the journal
//! (never written, or trimmed and destaged) is encrypted, coded and written straight into the
//! stripe's chunk slots: `(k + m) / k` times its data, instead of `m + 1` journal replicas and
//! then the same stripe write. Filling a new volume (`nbdcopy`, `dd`, a restore, the first
//! pass of a file system) is mostly such writes.
//!
//! Why this keeps the invariants without the journal:
//!
//! - *Old or new, nothing else.* Until the stripe's allocation is committed to the metadata
//!   store, the store says the stripe is empty, so after a crash every block of it reads as
//!   zeros: its old content. Whatever the crash left in the slots (some chunks new, some
//!   old, some torn) is never read as data.
//! - *Flushed data survives.* FLUSH (and FUA) syncs every disk and then commits the
//!   allocation bitmaps and generation stamps of these stripes to the store
//!   ([`Volume::commit_fresh`]); destaging rounds commit them too.
//! - *No write hole later.* A stripe that is empty at home may hold such leftovers, so the
//!   destager never reads it for a read-modify-write: the first partial write destaged into
//!   an empty stripe discards its slots on every disk first, and codes its rows over zeros
//!   (`destage_stripe`). Scrub, rebuild and rebalance look only at stripes with blocks at
//!   home.
//! - *Rollback detection.* Each write still takes a journal sequence number, through a
//!   one-page skip record, and uses it as the generation of its blocks, so the generation
//!   stamps stay strictly increasing per block.
//!
//! A stripe that is not eligible (it holds data, has journaled blocks or trims, has a chunk
//! on a failed or rebuilding disk, or the volume is being rebalanced) is written through the
//! journal as before. A chunk write that fails also falls back to the journal: nothing was
//! recorded yet, and the next destage of the stripe discards what the failed attempt left.

use std::sync::atomic::Ordering;

use tracing::{debug, warn};

use super::format::META_SIZE;
use super::state::{Bits, Stamp};
use super::{Volume, VolumeError};
use crate::disk::{IoBuf, IoOp};
use crate::layout::{BLOCK_SIZE, BLOCK_SIZE_U64, Lba, StripeId};

/// New home state of a stripe, as the metadata store keeps it: (stripe, bitmap words and
/// encoded stamps, or `None` when the stripe holds nothing).
pub(super) type HomeUpdate = (u64, Option<(Vec<u64>, Vec<u8>)>);

impl Volume {
    /// Whether `stripe` may take a journal-less full-stripe write (stripe write lock held,
    /// or as a hint without it).
    fn fresh_eligible(&self, stripe: StripeId) -> bool {
        if !self.allocation_known
            || self.rebalance_cursor().is_some()
            || self.alloc.home().contains_key(&stripe.0)
            || self.dirty().stripes.contains_key(&stripe.0)
        {
            return false;
        }
        match self.stripe_ids(stripe) {
            Ok(ids) => self.usable(stripe, &ids).iter().all(|u| *u),
            Err(_) => false,
        }
    }

    /// Writes `data`, exactly the bytes of `stripe`, into the stripe's slots if it is empty
    /// (see the module docs). Returns `false` when it did not (the caller journals the write).
    pub(super) fn write_fresh_stripe(
        &self,
        stripe: StripeId,
        data: &[u8],
    ) -> Result<bool, VolumeError> {
        let g = self.layout.geometry;
        let bps = g.blocks_per_stripe();
        debug_assert_eq!(data.len() as u64, bps * BLOCK_SIZE_U64);
        if !self.fresh_eligible(stripe) {
            return Ok(false);
        }
        let (guard, r) = self.reserve_locked(stripe, BLOCK_SIZE_U64)?;
        // The reserved sequence number must reach the journal whatever happens next, or replay
        // would stop at the gap. A skip record carries nothing and replay passes over it.
        let eligible = self.fresh_eligible(stripe);
        let written = self.journal.write(&r, self.skip_record(&r));
        self.journal.complete(&r);
        written?;
        if !eligible {
            return Ok(false);
        }
        let generation = r.seq;
        let (k, width) = (usize::from(g.k), g.width());
        let bpc = g.blocks_per_chunk() as usize;
        let chunk = bpc * BLOCK_SIZE;
        let slot_size = self.layout.slot_size() as usize;
        let first_lba = stripe.0 * bps;

        // Each slot: the chunk's blocks, then its metadata entries (see `RegionLayout`).
        let mut slots: Vec<IoBuf> = (0..width).map(|_| IoBuf::zeroed(slot_size)).collect();
        let mut stamps = Vec::with_capacity(bps as usize);
        for (c, slot) in slots.iter_mut().enumerate().take(k) {
            slot[..chunk].copy_from_slice(&data[c * chunk..(c + 1) * chunk]);
            for row in 0..bpc {
                let i = (c * bpc + row) as u64;
                let block = &mut slot[row * BLOCK_SIZE..(row + 1) * BLOCK_SIZE];
                let meta = self.seal(Lba(first_lba + i), generation, block)?;
                slot[chunk + row * META_SIZE..chunk + (row + 1) * META_SIZE]
                    .copy_from_slice(&meta.encode());
                stamps.push((
                    i,
                    Stamp {
                        generation,
                        version: meta.version,
                        epoch: meta.epoch,
                    },
                ));
            }
        }
        let meta_len = bpc * META_SIZE;
        let (data_slots, parity_slots) = slots.split_at_mut(k);
        for (from, to) in [(0, chunk), (chunk, chunk + meta_len)] {
            let d: Vec<&[u8]> = data_slots.iter().map(|s| &s[from..to]).collect();
            let mut p: Vec<&mut [u8]> = parity_slots.iter_mut().map(|s| &mut s[from..to]).collect();
            self.codec
                .encode(&d, &mut p)
                .map_err(|e| VolumeError::Io(e.to_string()))?;
        }

        let ids = self.stripe_ids(stripe)?;
        let disks = self.disk_refs(&ids)?;
        let offset = self.layout.slot_offset(stripe);
        let pending: Vec<_> = disks
            .iter()
            .zip(slots)
            .map(|(d, buf)| d.submit(vec![IoOp::Write { offset, buf }]))
            .collect();
        let mut failed = None;
        for (c, p) in pending.into_iter().enumerate() {
            if let Err(e) = p.wait() {
                failed.get_or_insert((c, e));
            }
        }
        if let Some((c, e)) = failed {
            warn!(volume = %self.record.name, %stripe, chunk = c, error = %e,
                "full-stripe write failed; writing the stripe through the journal instead");
            return Ok(false);
        }

        self.alloc.set_live(stripe, 0, bps, true);
        let mut all = Bits::new(bps);
        for i in 0..bps {
            all.set(i, true);
        }
        self.alloc.home().insert(stripe.0, all);
        self.alloc.record_stamps(stripe, stamps);
        self.fresh_lock().push(stripe.0);
        drop(guard);
        self.stats
            .fresh_stripe_writes
            .fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }

    fn fresh_lock(&self) -> std::sync::MutexGuard<'_, Vec<u64>> {
        self.fresh.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether stripes written by [`Volume::write_fresh_stripe`] wait for their commit.
    pub(super) fn fresh_pending(&self) -> bool {
        !self.fresh_lock().is_empty()
    }

    /// Takes the stripes written by [`Volume::write_fresh_stripe`] whose allocation is not
    /// committed yet. Every write among them has completed.
    pub(super) fn take_fresh(&self) -> Vec<u64> {
        std::mem::take(&mut *self.fresh_lock())
    }

    /// Puts back stripes taken by [`Volume::take_fresh`] that could not be committed.
    pub(super) fn restore_fresh(&self, stripes: Vec<u64>) {
        self.fresh_lock().extend(stripes);
    }

    /// The home state of a stripe as the metadata store should record it (what memory says),
    /// read under the stripe's read lock.
    pub(super) fn home_state(&self, s: u64) -> HomeUpdate {
        let _g = self.locks.read(StripeId(s));
        self.home_state_locked(s)
    }

    /// [`Volume::home_state`] with the stripe's lock already held.
    pub(super) fn home_state_locked(&self, s: u64) -> HomeUpdate {
        let bits = self.alloc.home().get(&s).cloned();
        let stamps = self.alloc.stamps().get(&s).map(|v| Stamp::encode_all(v));
        let bps = self.layout.geometry.blocks_per_stripe() as usize;
        (
            s,
            bits.filter(|b| !b.is_empty()).map(|b| {
                (
                    b.0,
                    stamps.unwrap_or_else(|| Stamp::encode_all(&vec![Stamp::default(); bps])),
                )
            }),
        )
    }

    /// Makes the journal-less stripe writes completed so far durable: syncs every disk, then
    /// commits their allocation and stamps to the metadata store. Part of every FLUSH.
    pub(super) fn commit_fresh(&self) -> Result<(), VolumeError> {
        if !self.fresh_pending() {
            return Ok(());
        }
        // No destaging round in between: the home state in memory is then exactly what the
        // disks hold once synced (a round changes it before its own sync).
        let _one = self.destage_lock.lock().unwrap_or_else(|p| p.into_inner());
        let stripes = self.take_fresh();
        if stripes.is_empty() {
            return Ok(());
        }
        let result = self.sync_disks(&stripes).and_then(|()| {
            let updates: Vec<HomeUpdate> = stripes.iter().map(|s| self.home_state(*s)).collect();
            self.store
                .home_commit(self.record.id, &updates)
                .map_err(|e| VolumeError::Io(e.to_string()))
        });
        match result {
            Ok(()) => {
                debug!(volume = %self.record.name, stripes = stripes.len(), "full-stripe writes committed");
                Ok(())
            }
            Err(e) => {
                self.restore_fresh(stripes);
                Err(e)
            }
        }
    }
}
