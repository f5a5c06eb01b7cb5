//! Rebuild: the chunks of a replaced disk, written again from the other chunks of their rows.
//!
//! [`Volume::rebuild_stripe`] does one stripe, under its write lock: if placement puts a chunk
//! of the stripe on the disk, it reads the whole slot of every other usable chunk (one read per
//! disk), rebuilds the chunk row by row ([`Volume::rebuild_row`]: data blocks with their
//! metadata entries, checked against their tags; parity recomputed), writes the slot to the new
//! disk in one write, and moves the disk's rebuild cursor past the stripe. A stripe that holds
//! no data at home gets its slot discarded (zeros: a new disk may hold anything).
//!
//! While a disk rebuilds, its chunks of stripes before the cursor are valid and used; the
//! others are treated as failed (reads rebuild them, destaging writes around them), and the
//! rebuild writes them later from rows that already include every destaged write. The cursor
//! moves under the stripe lock, so no request sees a half-rebuilt chunk. The pool persists the
//! cursor only after syncing the new disk, so a restart resumes from a stripe whose predecessors
//! are durable (`pool::heal`).

use super::{Volume, VolumeError};
use crate::disk::IoOp;
use crate::layout::{DiskId, StripeId};

/// What rebuilding one stripe did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RebuiltStripe {
    /// Whether the disk holds a chunk of the stripe.
    pub placed: bool,
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// Allocated blocks of the chunk that no combination of the other chunks rebuilds.
    pub unrecoverable: u64,
}

impl Volume {
    /// Number of stripes of the volume.
    pub fn stripe_count(&self) -> u64 {
        self.layout.stripes
    }

    /// Rebuilds the chunk that disk `id` holds of `stripe`, if any, and moves the disk's
    /// rebuild cursor to the next stripe. See the module docs.
    pub fn rebuild_stripe(
        &self,
        id: DiskId,
        stripe: StripeId,
    ) -> Result<RebuiltStripe, VolumeError> {
        let _g = self.locks.write(stripe);
        let volume = self.record.id;
        let ids = self.stripe_ids(stripe)?;
        let mut out = RebuiltStripe::default();
        if let Some(c) = ids.iter().position(|d| *d == id) {
            out = self.rebuild_chunk(stripe, c, &ids)?;
            self.health.rebuilt_chunk(id);
        }
        self.health.set_cursor(id, volume, stripe.0 + 1);
        Ok(out)
    }

    fn rebuild_chunk(
        &self,
        stripe: StripeId,
        c: usize,
        ids: &[DiskId],
    ) -> Result<RebuiltStripe, VolumeError> {
        let g = self.layout.geometry;
        let (k, bpc) = (usize::from(g.k), g.blocks_per_chunk());
        let disk = self.disk_refs(&ids[c..=c])?.remove(0);
        let offset = self.layout.slot_offset(stripe);
        let len = self.layout.slot_size();
        let mut out = RebuiltStripe {
            placed: true,
            ..Default::default()
        };
        let home = self.alloc.home().get(&stripe.0).cloned();
        let Some(home) = home else {
            disk.submit(vec![IoOp::Discard { offset, len }])
                .wait()
                .map_err(|e| VolumeError::Io(format!("rebuilding stripe {stripe}: {e}")))?;
            return Ok(out);
        };
        let mut usable = self.usable(stripe, ids);
        usable[c] = false;
        let slots = self.read_slots(stripe, &usable, Some(c))?;
        for (x, s) in slots.iter().enumerate() {
            if s.is_none() {
                usable[x] = false;
            }
        }
        out.bytes_read = slots.iter().flatten().count() as u64 * len;
        let zero = vec![0u8; len as usize];
        let mut new = vec![0u8; len as usize];
        for row in 0..bpc {
            let mut shards: Vec<Vec<u8>> = slots
                .iter()
                .map(|s| self.shard_of(stripe, s.as_ref().map_or(&zero[..], |b| &b[..]), row))
                .collect();
            let present: Vec<bool> = (0..ids.len())
                .map(|x| {
                    usable[x]
                        && (x >= k || self.shard_ok_home(stripe, x, row, &shards[x], Some(&home)))
                })
                .collect();
            for x in (0..ids.len()).filter(|x| !present[*x]) {
                shards[x].fill(0);
            }
            match self.rebuild_row(stripe, row, shards, present) {
                Ok(r) => self.put_shard(stripe, &mut new, row, &r.shards[c]),
                Err(why) => {
                    let allocated = c < k && home.get(c as u64 * bpc + row);
                    if allocated {
                        out.unrecoverable += 1;
                    }
                    tracing::warn!(volume = %self.record.name, stripe = stripe.0, row, chunk = c, "rebuild: {why}");
                }
            }
        }
        disk.submit(vec![IoOp::write(offset, &new)])
            .wait()
            .map_err(|e| VolumeError::Io(format!("rebuilding stripe {stripe}: {e}")))?;
        out.bytes_written = len;
        Ok(out)
    }

    /// One destaging round now, for the end of a rebuild: the checkpoint then moves past every
    /// record written before the new disk joined the journal, so its replica holds every record
    /// that is still live.
    pub fn destage_now(&self) -> Result<(), VolumeError> {
        self.destage_once().map(drop)
    }
}
