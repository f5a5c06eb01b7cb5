//! Scrub: read every chunk slot of every stripe that holds data, check every block's tag and
//! that the parity matches the data, and repair what can be repaired.
//!
//! One stripe at a time ([`Volume::scrub`]):
//! 1. under the stripe's read lock, read the whole slot (chunk data and metadata pages) of every
//!    usable chunk: one read per disk;
//! 2. for every row: a data block that is allocated must pass its tag (an allocated block whose
//!    metadata is empty is bad too: a truncated or zeroed disk); an unallocated one must be
//!    empty. Rows with a bad or unusable data block are rebuilt by [`Volume::rebuild_row`]
//!    (which leaves out parity shards in turn when a rebuild does not verify);
//! 3. the parity of the (rebuilt) data is computed again over whole slots and compared, row by
//!    row, with each parity chunk read: a mismatch is bad parity. A row that cannot be rebuilt
//!    is unrecoverable and its parity is left alone (it may still be right);
//! 4. with `repair`, a stripe with findings is read and checked again under its write lock
//!    (so that nothing changes between the check and the fix), and the bad data blocks (block
//!    and metadata entry) and parity rows are written back in place.
//!
//! Blocks in the journal are not scrubbed here (the journal checks its own copies on every
//! read); their home copies are. Chunks of failed disks are not read: their blocks count as
//! `degraded`, and rows that lose more than `m` chunks count as unrecoverable.
//!
//! Rate: after each stripe the scrub sleeps, outside every lock, as long as needed to keep its
//! reads under `rate_bytes_per_s`, so client I/O keeps priority; a stripe lock is held for one
//! stripe's reads only.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::format::{BlockMeta, META_SIZE};
use super::io::SHARD;
use super::state::Bits;
use super::{Volume, VolumeError};
use crate::disk::{IoBuf, IoOp};
use crate::layout::{BLOCK_SIZE, BLOCK_SIZE_U64, BlockPos, ChunkIndex, Lba, StripeId};

/// Most bad shards listed one by one in a report (all are counted).
pub const MAX_LISTED: usize = 1000;

/// What a scrub does.
#[derive(Clone, Copy, Debug, Default)]
pub struct ScrubOptions {
    /// Write back what can be rebuilt (otherwise only report).
    pub repair: bool,
    /// Most bytes read per second (0: no limit).
    pub rate_bytes_per_s: u64,
}

/// Progress of a running scrub or rebuild.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct Progress {
    pub done: u64,
    pub total: u64,
    pub bytes: u64,
    pub bytes_per_s: f64,
    /// Estimated seconds left.
    pub eta_s: f64,
}

impl Progress {
    pub(crate) fn at(done: u64, total: u64, bytes: u64, started: Instant) -> Self {
        let secs = started.elapsed().as_secs_f64().max(1e-6);
        let rate = bytes as f64 / secs;
        let eta = if done == 0 {
            0.0
        } else {
            secs * (total.saturating_sub(done)) as f64 / done as f64
        };
        Self {
            done,
            total,
            bytes,
            bytes_per_s: rate,
            eta_s: eta,
        }
    }
}

/// One bad shard that a scrub found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BadShard {
    pub stripe: u64,
    pub row: u64,
    /// Chunk index in the stripe (`0..k` data, `k..` parity).
    pub chunk: u16,
    pub disk: u32,
    /// The logical block, for data chunks.
    pub lba: Option<u64>,
    /// "tag" (a data block that fails its check), "rollback" (an intact but older copy of the
    /// block: its generation is not the one the store recorded), "parity" (parity that does
    /// not match the data) or "unrecoverable" (a row that cannot be rebuilt).
    pub what: String,
    pub repaired: bool,
}

/// What a scrub found and did.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ScrubReport {
    /// Stripes scrubbed (those holding data).
    pub stripes: u64,
    /// Allocated data blocks read and checked.
    pub blocks_checked: u64,
    /// Parity rows compared with the data.
    pub parity_checked: u64,
    /// Bad data blocks and parity rows found.
    pub bad_found: u64,
    /// Of those, written back.
    pub repaired: u64,
    /// Allocated blocks that no combination of chunks rebuilds.
    pub unrecoverable: u64,
    /// Allocated blocks on chunks of failed (or not yet rebuilt) disks: served from parity.
    pub degraded: u64,
    pub bytes_read: u64,
    pub seconds: f64,
    /// The first [`MAX_LISTED`] bad shards.
    pub bad: Vec<BadShard>,
}

/// Findings of one stripe.
#[derive(Default)]
struct StripeCheck {
    blocks_checked: u64,
    parity_checked: u64,
    degraded: u64,
    unrecoverable: u64,
    bytes: u64,
    bad: Vec<BadShard>,
    /// Rows to write back, per chunk, with the slot content to write.
    fixes: Vec<(usize, Vec<u64>, Vec<u8>)>,
}

impl Volume {
    /// Scrubs every stripe that holds data; see the module docs. `progress` is called after
    /// every stripe. Errors only when the volume cannot be read at all (a stripe it cannot
    /// repair is counted, not an error).
    pub fn scrub(
        &self,
        opts: &ScrubOptions,
        progress: &dyn Fn(Progress),
    ) -> Result<ScrubReport, VolumeError> {
        let started = Instant::now();
        let mut stripes: Vec<u64> = self.alloc.home().keys().copied().collect();
        stripes.sort_unstable();
        let total = stripes.len() as u64;
        let mut report = ScrubReport::default();
        for (i, &s) in stripes.iter().enumerate() {
            let stripe = StripeId(s);
            let mut check = {
                let _g = self.locks.read(stripe);
                // Every block is in the journal: the next destaging rewrites every slot, and a
                // stripe moved by a rebalance has nothing in its new slots until then.
                if self.fully_journaled(stripe) {
                    continue;
                }
                self.check_stripe_slots(stripe)?
            };
            if opts.repair && !check.fixes.is_empty() {
                let _g = self.locks.write(stripe);
                check = self.check_stripe_slots(stripe)?;
                let fixes = std::mem::take(&mut check.fixes);
                let ids = self.stripe_ids(stripe)?;
                for (c, rows, slot) in fixes {
                    match self.write_rows(stripe, c, &rows, &slot) {
                        Ok(()) => {
                            self.health.repaired(ids[c], rows.len() as u64);
                            self.stats
                                .blocks_repaired
                                .fetch_add(rows.len() as u64, Ordering::Relaxed);
                            for b in check.bad.iter_mut().filter(|b| {
                                usize::from(b.chunk) == c
                                    && rows.contains(&b.row)
                                    && b.what != "unrecoverable"
                            }) {
                                b.repaired = true;
                            }
                        }
                        Err(e) => {
                            warn!(volume = %self.record.name, stripe = s, disk = %self.health.name(ids[c]), error = %e, "scrub could not write a repair")
                        }
                    }
                }
            }
            report.stripes += 1;
            report.blocks_checked += check.blocks_checked;
            report.parity_checked += check.parity_checked;
            report.degraded += check.degraded;
            report.unrecoverable += check.unrecoverable;
            report.bytes_read += check.bytes;
            for b in check.bad {
                if b.what != "unrecoverable" {
                    report.bad_found += 1;
                }
                if b.repaired {
                    report.repaired += 1;
                }
                if report.bad.len() < MAX_LISTED {
                    report.bad.push(b);
                }
            }
            progress(Progress::at(
                i as u64 + 1,
                total,
                report.bytes_read,
                started,
            ));
            pace(report.bytes_read, opts.rate_bytes_per_s, started);
        }
        report.seconds = started.elapsed().as_secs_f64();
        info!(
            volume = %self.record.name,
            stripes = report.stripes,
            checked = report.blocks_checked,
            bad = report.bad_found,
            repaired = report.repaired,
            unrecoverable = report.unrecoverable,
            "scrub finished"
        );
        Ok(report)
    }

    /// Reads the whole slot of every usable chunk of a stripe except `skip` (lock held). One
    /// read per disk; a chunk whose read fails is `None`.
    pub(super) fn read_slots(
        &self,
        stripe: StripeId,
        usable: &[bool],
        skip: Option<usize>,
    ) -> Result<Vec<Option<IoBuf>>, VolumeError> {
        let disks = self.disk_refs(&self.stripe_ids(stripe)?)?;
        let offset = self.layout.slot_offset(stripe);
        let len = self.layout.slot_size() as usize;
        let pending: Vec<_> = disks
            .iter()
            .enumerate()
            .map(|(c, d)| {
                (usable[c] && skip != Some(c)).then(|| d.submit(vec![IoOp::read(offset, len)]))
            })
            .collect();
        Ok(pending
            .into_iter()
            .map(|p| {
                p.and_then(|p| p.wait().ok())
                    .and_then(|ops| ops.into_iter().next())
                    .and_then(IoOp::into_buf)
            })
            .collect())
    }

    /// Byte position, inside a slot, of row `row`'s metadata entry.
    pub(super) fn meta_in_slot(&self, stripe: StripeId, row: u64) -> usize {
        let (page, at) = self.layout.meta_location(stripe, row);
        (page - self.layout.slot_offset(stripe)) as usize + at
    }

    /// The shard (block ‖ metadata entry) of row `row` in a slot buffer.
    pub(super) fn shard_of(&self, stripe: StripeId, slot: &[u8], row: u64) -> Vec<u8> {
        let mut shard = Vec::with_capacity(SHARD);
        let b = (row * BLOCK_SIZE_U64) as usize;
        shard.extend_from_slice(&slot[b..b + BLOCK_SIZE]);
        let m = self.meta_in_slot(stripe, row);
        shard.extend_from_slice(&slot[m..m + META_SIZE]);
        shard
    }

    /// Puts a shard back into a slot buffer.
    pub(super) fn put_shard(&self, stripe: StripeId, slot: &mut [u8], row: u64, shard: &[u8]) {
        let b = (row * BLOCK_SIZE_U64) as usize;
        slot[b..b + BLOCK_SIZE].copy_from_slice(&shard[..BLOCK_SIZE]);
        let m = self.meta_in_slot(stripe, row);
        slot[m..m + META_SIZE].copy_from_slice(&shard[BLOCK_SIZE..]);
    }

    /// [`Volume::shard_ok`], knowing whether the block is allocated: an allocated block with
    /// empty metadata (a zeroed or truncated disk) is bad.
    pub(super) fn shard_ok_home(
        &self,
        stripe: StripeId,
        c: usize,
        row: u64,
        shard: &[u8],
        home: Option<&Bits>,
    ) -> bool {
        if self.allocated(home, c, row) && BlockMeta::decode(&shard[BLOCK_SIZE..]).is_empty() {
            return false;
        }
        self.shard_ok(stripe, c, row, shard)
    }

    fn allocated(&self, home: Option<&Bits>, c: usize, row: u64) -> bool {
        let bpc = self.layout.geometry.blocks_per_chunk();
        home.is_some_and(|h| h.get(c as u64 * bpc + row))
    }

    /// Checks one stripe (lock held): see the module docs.
    fn check_stripe_slots(&self, stripe: StripeId) -> Result<StripeCheck, VolumeError> {
        let g = self.layout.geometry;
        let (k, width, bpc) = (usize::from(g.k), g.width(), g.blocks_per_chunk());
        let mut out = StripeCheck::default();
        let home = self.alloc.home().get(&stripe.0).cloned();
        let Some(home) = home else {
            return Ok(out);
        };
        let ids = self.stripe_ids(stripe)?;
        let mut usable = self.usable(stripe, &ids);
        let slots = self.read_slots(stripe, &usable, None)?;
        for (c, s) in slots.iter().enumerate() {
            if usable[c] && s.is_none() {
                usable[c] = false;
            }
        }
        let slot_len = self.layout.slot_size() as usize;
        out.bytes = (slots.iter().flatten().count() * slot_len) as u64;
        let zero = vec![0u8; slot_len];
        let read: Vec<&[u8]> = slots
            .iter()
            .map(|s| s.as_ref().map_or(&zero[..], |b| &b[..]))
            .collect();
        // Data slots as they should be (rebuilt rows patched in), and rows that cannot be.
        let mut fixed: Vec<Vec<u8>> = read[..k].iter().map(|s| s.to_vec()).collect();
        let mut lost_rows: Vec<u64> = Vec::new();
        let mut data_fix: Vec<Vec<u64>> = vec![Vec::new(); k];
        for row in 0..bpc {
            let mut shards: Vec<Vec<u8>> =
                read.iter().map(|s| self.shard_of(stripe, s, row)).collect();
            let mut present = vec![false; width];
            let mut bad = Vec::new();
            for c in 0..width {
                if !usable[c] {
                    if c < k && self.allocated(Some(&home), c, row) {
                        out.degraded += 1;
                    }
                    continue;
                }
                if c >= k {
                    present[c] = true;
                    continue;
                }
                let allocated = self.allocated(Some(&home), c, row);
                let ok = self.shard_ok_home(stripe, c, row, &shards[c], Some(&home));
                if allocated {
                    out.blocks_checked += 1;
                    if ok {
                        self.health.tag_ok(ids[c]);
                    }
                }
                if !ok {
                    self.health.tag_failure(ids[c]);
                    bad.push(c);
                }
                present[c] = ok;
            }
            if present[..k].iter().all(|p| *p) {
                continue;
            }
            // Zeros where the shards are not trusted: the rebuild fills them in.
            for c in (0..width).filter(|c| !present[*c]) {
                shards[c].fill(0);
            }
            match self.rebuild_row(stripe, row, shards, present) {
                Ok(r) => {
                    for &c in &bad {
                        self.put_shard(stripe, &mut fixed[c], row, &r.shards[c]);
                        data_fix[c].push(row);
                    }
                    for c in 0..k {
                        if !usable[c] {
                            // Not written (the disk is failed), but the parity check needs it.
                            self.put_shard(stripe, &mut fixed[c], row, &r.shards[c]);
                        }
                    }
                }
                Err(_) => {
                    lost_rows.push(row);
                    let n = (0..k)
                        .filter(|&c| {
                            (!usable[c] || bad.contains(&c)) && self.allocated(Some(&home), c, row)
                        })
                        .count() as u64;
                    out.unrecoverable += n;
                    let c = bad
                        .first()
                        .copied()
                        .or_else(|| (0..k).find(|c| !usable[*c]))
                        .unwrap_or(0);
                    out.bad.push(BadShard {
                        stripe: stripe.0,
                        row,
                        chunk: c as u16,
                        disk: ids[c].0,
                        lba: Some(self.lba_at(stripe, c, row)),
                        what: "unrecoverable".into(),
                        repaired: false,
                    });
                }
            }
            for &c in &bad {
                if lost_rows.last() == Some(&row) {
                    continue;
                }
                let lba = self.lba_at(stripe, c, row);
                let shard = self.shard_of(stripe, read[c], row);
                let meta = BlockMeta::decode(&shard[BLOCK_SIZE..]);
                let what = if self.verify(Lba(lba), &meta, &shard[..BLOCK_SIZE])
                    && self.rolled_back(Lba(lba), &meta)
                {
                    self.stats
                        .rollbacks_detected
                        .fetch_add(1, Ordering::Relaxed);
                    "rollback"
                } else {
                    "tag"
                };
                out.bad.push(BadShard {
                    stripe: stripe.0,
                    row,
                    chunk: c as u16,
                    disk: ids[c].0,
                    lba: Some(lba),
                    what: what.into(),
                    repaired: false,
                });
            }
        }
        // Parity of the data as it should be, over whole slots (position-local code).
        let mut parity = vec![vec![0u8; slot_len]; width - k];
        {
            let d: Vec<&[u8]> = fixed.iter().map(|v| v.as_slice()).collect();
            let mut p: Vec<&mut [u8]> = parity.iter_mut().map(|v| v.as_mut_slice()).collect();
            self.codec
                .encode(&d, &mut p)
                .map_err(|e| VolumeError::Io(e.to_string()))?;
        }
        let mut parity_fix: Vec<Vec<u64>> = vec![Vec::new(); width - k];
        for c in (k..width).filter(|c| usable[*c]) {
            for row in (0..bpc).filter(|r| !lost_rows.contains(r)) {
                out.parity_checked += 1;
                let want = self.shard_of(stripe, &parity[c - k], row);
                if self.shard_of(stripe, read[c], row) != want {
                    self.health.tag_failure(ids[c]);
                    parity_fix[c - k].push(row);
                    out.bad.push(BadShard {
                        stripe: stripe.0,
                        row,
                        chunk: c as u16,
                        disk: ids[c].0,
                        lba: None,
                        what: "parity".into(),
                        repaired: false,
                    });
                }
            }
        }
        for (c, rows) in data_fix.into_iter().enumerate() {
            if !rows.is_empty() {
                out.fixes.push((c, rows, std::mem::take(&mut fixed[c])));
            }
        }
        for (i, rows) in parity_fix.into_iter().enumerate() {
            if !rows.is_empty() {
                // Parity rows are written from the recomputed parity, other rows as read.
                let mut slot = read[k + i].to_vec();
                for &r in &rows {
                    let s = self.shard_of(stripe, &parity[i], r);
                    self.put_shard(stripe, &mut slot, r, &s);
                }
                out.fixes.push((k + i, rows, slot));
            }
        }
        Ok(out)
    }

    fn lba_at(&self, stripe: StripeId, c: usize, row: u64) -> u64 {
        self.layout
            .geometry
            .lba_of(BlockPos {
                stripe,
                chunk: ChunkIndex(c as u16),
                block_in_chunk: row,
            })
            .0
    }

    /// Writes rows of chunk `c` (blocks and the metadata pages) from a slot buffer, then syncs
    /// the disk (stripe write lock held).
    pub(super) fn write_rows(
        &self,
        stripe: StripeId,
        c: usize,
        rows: &[u64],
        slot: &[u8],
    ) -> Result<(), VolumeError> {
        let ids = self.stripe_ids(stripe)?;
        let disk = self.disk_refs(&ids[c..=c])?.remove(0);
        let base = self.layout.slot_offset(stripe);
        let mut ops: Vec<IoOp> = rows
            .iter()
            .map(|&r| {
                let b = (r * BLOCK_SIZE_U64) as usize;
                IoOp::write(
                    self.layout.block_offset(stripe, r),
                    &slot[b..b + BLOCK_SIZE],
                )
            })
            .collect();
        let meta_from = u64::from(self.layout.geometry.chunk_size) as usize;
        ops.push(IoOp::write(base + meta_from as u64, &slot[meta_from..]));
        disk.submit(ops)
            .wait()
            .map_err(|e| VolumeError::Io(e.to_string()))?;
        disk.submit(vec![IoOp::Sync])
            .wait()
            .map_err(|e| VolumeError::Io(e.to_string()))?;
        Ok(())
    }
}

/// Longest single pause of [`pace`]: a rate far below one stripe per pause still moves.
const MAX_PAUSE: Duration = Duration::from_secs(10);

/// Sleeps (outside every lock) as long as needed for `bytes` read since `started` to stay
/// under `rate` bytes per second (0: no limit), at most [`MAX_PAUSE`] at a time.
pub(crate) fn pace(bytes: u64, rate: u64, started: Instant) {
    if rate == 0 {
        return;
    }
    let due = Duration::from_secs_f64(bytes as f64 / rate as f64);
    let spent = started.elapsed();
    if due > spent {
        std::thread::sleep((due - spent).min(MAX_PAUSE));
    }
}
