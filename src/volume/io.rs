//! Reading chunk slots: verified reads, reconstruction of a row from the other chunks of its
//! stripe, and write-back of repaired blocks.
//!
//! A *row* is the set of blocks at one block index of every chunk of a stripe: `k` data
//! blocks and `m` parity blocks that Reed-Solomon ties together (position locality). Each
//! shard of a row is the 4096-byte block followed by its 64-byte metadata entry, so a lost
//! block's metadata (generation, key version, epoch, tag) is rebuilt with its data.

use std::sync::atomic::Ordering;

use tracing::{debug, warn};

use super::format::{BlockMeta, META_SIZE};
use super::{Volume, VolumeError};
use crate::disk::{DiskRef, IoBuf, IoOp};
use crate::layout::{BLOCK_SIZE, BLOCK_SIZE_U64, BlockPos, ChunkIndex, DiskId, Lba, StripeId};

/// Bytes of one row shard: a block and its metadata entry (a multiple of 64, as the codec needs).
pub(super) const SHARD: usize = BLOCK_SIZE + META_SIZE;

/// A row of a stripe as read (and, where needed, rebuilt) from the disks.
pub(super) struct Row {
    /// `k + m` shards of [`SHARD`] bytes, in chunk order.
    pub shards: Vec<Vec<u8>>,
    /// Chunks whose copy on disk was bad and was rebuilt here.
    pub rebuilt: Vec<usize>,
}

impl Volume {
    /// Reads, verifies and decrypts allocated blocks of one stripe from their chunk slots
    /// (stripe lock held). Blocks that fail are rebuilt from their row and written back.
    pub(super) fn read_home(
        &self,
        stripe: StripeId,
        lbas: &[Lba],
    ) -> Result<Vec<Vec<u8>>, VolumeError> {
        let g = self.layout.geometry;
        let ids = self.stripe_ids(stripe)?;
        let disks = self.disk_refs(&ids)?;
        let usable = self.usable(stripe, &ids);
        // One contiguous run of blocks (and the metadata pages covering it) per chunk.
        let mut runs: Vec<Option<(u64, u64)>> = vec![None; g.width()];
        let pos: Vec<BlockPos> = lbas.iter().map(|l| g.locate(*l)).collect();
        for p in &pos {
            let r = &mut runs[usize::from(p.chunk.0)];
            *r = Some(match *r {
                None => (p.block_in_chunk, p.block_in_chunk),
                Some((a, b)) => (a.min(p.block_in_chunk), b.max(p.block_in_chunk)),
            });
        }
        let mut pending = Vec::new();
        for (c, run) in runs.iter().enumerate() {
            let Some((a, b)) = *run else { continue };
            if !usable[c] {
                // Failed, or not rebuilt yet: its blocks come from the other chunks.
                continue;
            }
            let (meta_a, _) = self.layout.meta_location(stripe, a);
            let (meta_b, _) = self.layout.meta_location(stripe, b);
            let ops = vec![
                IoOp::Read {
                    offset: self.layout.block_offset(stripe, a),
                    buf: IoBuf::zeroed(((b - a + 1) * BLOCK_SIZE_U64) as usize),
                },
                IoOp::Read {
                    offset: meta_a,
                    buf: IoBuf::zeroed((meta_b - meta_a + BLOCK_SIZE_U64) as usize),
                },
            ];
            pending.push((c, a, meta_a, disks[c].submit(ops)));
        }
        let mut got: Vec<Option<(u64, u64, IoBuf, IoBuf)>> = (0..g.width()).map(|_| None).collect();
        for (c, a, meta_a, p) in pending {
            match p.wait() {
                Ok(ops) => {
                    let mut bufs = ops.into_iter().filter_map(|op| {
                        if let IoOp::Read { buf, .. } = op {
                            Some(buf)
                        } else {
                            None
                        }
                    });
                    if let (Some(data), Some(meta)) = (bufs.next(), bufs.next()) {
                        got[c] = Some((a, meta_a, data, meta));
                    }
                }
                Err(e) => debug!(error = %e, "chunk read failed; rebuilding from the row"),
            }
        }
        // Blocks of chunks that gave no answer (failed, not rebuilt yet, or a read error):
        // their rows are read and rebuilt together, one read per surviving chunk.
        let mut lost_rows: Vec<u64> = pos
            .iter()
            .filter(|p| got[usize::from(p.chunk.0)].is_none())
            .map(|p| p.block_in_chunk)
            .collect();
        lost_rows.sort_unstable();
        lost_rows.dedup();
        let rebuilt_rows = self.read_rows(stripe, &lost_rows, &disks, &[], true);
        let mut out = Vec::with_capacity(lbas.len());
        for (lba, p) in lbas.iter().zip(&pos) {
            let c = usize::from(p.chunk.0);
            if got[c].is_none() {
                // Several blocks of one row can be lost (up to m chunks): rows are shared.
                let row = lost_rows
                    .binary_search(&p.block_in_chunk)
                    .ok()
                    .and_then(|i| rebuilt_rows.get(i));
                match row {
                    Some(Ok(r)) => out.push(self.rebuilt_block(*lba, &r.shards[c])?),
                    Some(Err(why)) => {
                        return Err(VolumeError::Unrecoverable {
                            lba: lba.0,
                            why: why.clone(),
                        });
                    }
                    None => {
                        return Err(VolumeError::Unrecoverable {
                            lba: lba.0,
                            why: "its row was not read".into(),
                        });
                    }
                }
                continue;
            }
            let mut block = None;
            let mut disk_answered = false;
            if let Some((a, meta_a, data, meta)) = &got[c] {
                disk_answered = true;
                let i = ((p.block_in_chunk - a) * BLOCK_SIZE_U64) as usize;
                let (page, at) = self.layout.meta_location(stripe, p.block_in_chunk);
                let mo = (page - meta_a) as usize + at;
                let m = BlockMeta::decode(&meta[mo..mo + META_SIZE]);
                let ct = &data[i..i + BLOCK_SIZE];
                if self.verify(*lba, &m, ct) {
                    if self.rolled_back(*lba, &m) {
                        self.stats
                            .rollbacks_detected
                            .fetch_add(1, Ordering::Relaxed);
                        self.health.tag_failure(ids[c]);
                        warn!(volume = %self.record.name, lba = lba.0, disk = %self.health.name(ids[c]), found = m.generation,
                            "block holds an older copy of itself (rolled back); rebuilding it from its row");
                    } else {
                        self.health.tag_ok(ids[c]);
                        let mut b = ct.to_vec();
                        self.unseal(*lba, &m, &mut b)?;
                        block = Some(b);
                    }
                } else {
                    self.health.tag_failure(ids[c]);
                }
            }
            let b = match block {
                Some(b) => b,
                None => self.rebuild_block(stripe, *p, *lba, &disks, &ids, disk_answered)?,
            };
            out.push(b);
        }
        Ok(out)
    }

    /// Rebuilds one block from its row, writes it back when its disk still answers, and
    /// returns its plaintext.
    fn rebuild_block(
        &self,
        stripe: StripeId,
        p: BlockPos,
        lba: Lba,
        disks: &[DiskRef],
        ids: &[DiskId],
        disk_answered: bool,
    ) -> Result<Vec<u8>, VolumeError> {
        let row = self
            .read_row(stripe, p.block_in_chunk, disks, &[usize::from(p.chunk.0)])
            .map_err(|why| VolumeError::Unrecoverable { lba: lba.0, why })?;
        let c = usize::from(p.chunk.0);
        let shard = &row.shards[c];
        let plain = self.rebuilt_block(lba, shard)?;
        // Written back only where the disk answered and is still trusted (a disk the read just
        // failed is written around).
        if disk_answered && !self.health.is_failed(ids[c]) {
            match self.write_back(stripe, p.block_in_chunk, &disks[c], shard) {
                Ok(()) => {
                    self.stats.blocks_repaired.fetch_add(1, Ordering::Relaxed);
                    self.health.repaired(ids[c], 1);
                    warn!(volume = %self.record.name, lba = lba.0, disk = %disks[c].name(), "block failed its check; rebuilt from parity and repaired");
                }
                Err(e) => {
                    warn!(volume = %self.record.name, lba = lba.0, error = %e, "block rebuilt from parity; repair write failed")
                }
            }
        }
        Ok(plain)
    }

    /// The plaintext of an allocated block whose shard a rebuild of its row produced, counted.
    /// [`Volume::rebuild_row`] and [`Volume::rebuild_trusting`] keep a rebuilt data shard only
    /// when it passes [`Volume::shard_ok`], which for a shard with metadata is the tag and
    /// generation check; what remains to refuse is a shard rebuilt as never written, which
    /// `shard_ok` accepts but an allocated block cannot be.
    fn rebuilt_block(&self, lba: Lba, shard: &[u8]) -> Result<Vec<u8>, VolumeError> {
        let meta = BlockMeta::decode(&shard[BLOCK_SIZE..]);
        if meta.is_empty() {
            return Err(VolumeError::Unrecoverable {
                lba: lba.0,
                why: "no combination of the surviving chunks rebuilds a block that passes its tag"
                    .into(),
            });
        }
        self.stats
            .blocks_reconstructed
            .fetch_add(1, Ordering::Relaxed);
        let mut b = shard[..BLOCK_SIZE].to_vec();
        self.unseal(lba, &meta, &mut b)?;
        Ok(b)
    }

    /// Writes a rebuilt shard (block + metadata entry) back to its chunk slot.
    fn write_back(
        &self,
        stripe: StripeId,
        row: u64,
        disk: &DiskRef,
        shard: &[u8],
    ) -> Result<(), VolumeError> {
        let (page_off, at) = self.layout.meta_location(stripe, row);
        let mut page = crate::disk::read_at(disk.as_ref(), page_off, BLOCK_SIZE)
            .map_err(|e| VolumeError::Io(e.to_string()))?;
        page[at..at + META_SIZE].copy_from_slice(&shard[BLOCK_SIZE..]);
        let ops = vec![
            IoOp::Write {
                offset: self.layout.block_offset(stripe, row),
                buf: IoBuf::from_slice(&shard[..BLOCK_SIZE]),
            },
            IoOp::Write {
                offset: page_off,
                buf: page,
            },
        ];
        disk.submit(ops)
            .wait()
            .map_err(|e| VolumeError::Io(e.to_string()))?;
        Ok(())
    }

    /// Whether a data shard read from chunk `c` of a row is an intact copy: either a block
    /// that was never written (all zero) or one whose tag verifies for its position.
    pub(super) fn shard_ok(&self, stripe: StripeId, c: usize, row: u64, shard: &[u8]) -> bool {
        let (block, meta) = shard.split_at(BLOCK_SIZE);
        self.block_ok(stripe, c, row, block, meta)
    }

    /// [`Volume::shard_ok`] for a block and its metadata entry held apart.
    pub(super) fn block_ok(
        &self,
        stripe: StripeId,
        c: usize,
        row: u64,
        block: &[u8],
        meta: &[u8],
    ) -> bool {
        let meta = BlockMeta::decode(meta);
        let lba = self.layout.geometry.lba_of(BlockPos {
            stripe,
            chunk: ChunkIndex(c as u16),
            block_in_chunk: row,
        });
        if meta.is_empty() {
            // A never-written block, unless the store recorded a write there: then the slot
            // was wiped (a truncated file reads as zeros) and must be rebuilt.
            let bps = self.layout.geometry.blocks_per_stripe();
            return self.alloc.stamp(stripe, lba.0 - stripe.0 * bps).generation == 0
                && block.iter().all(|b| *b == 0);
        }
        self.verify_home(lba, &meta, block)
    }

    /// Reads one row from every chunk and rebuilds the shards that are missing, fail their
    /// check, or are listed in `distrust` (known bad: e.g. a block that just failed its tag,
    /// which may now look like a never-written block). Parity shards carry no tag of their own:
    /// if a rebuild does not verify, it is retried without each parity shard in turn (a rotten
    /// parity block is found that way).
    pub(super) fn read_row(
        &self,
        stripe: StripeId,
        row: u64,
        disks: &[DiskRef],
        distrust: &[usize],
    ) -> Result<Row, String> {
        self.read_rows(stripe, &[row], disks, distrust, false)
            .pop()
            .unwrap_or_else(|| Err(format!("stripe {stripe} row {row}: nothing read")))
    }

    /// [`Volume::read_row`] for several rows of one stripe (`rows` ascending) with one read
    /// per chunk: the run of blocks from the first row to the last, and the metadata pages
    /// covering it. One result per row, in order. A degraded sequential read rebuilds every
    /// block of a lost chunk it covers this way, instead of one row (and one read per chunk)
    /// at a time.
    ///
    /// With `trust_first`, each row is first rebuilt from every shard read without checking
    /// them, and the result is kept if every rebuilt data block passes its tag; only the other
    /// shards of that row are then left unchecked, so callers that use them (parity updates,
    /// scrub) pass `false`. See [`Volume::rebuild_trusting`].
    pub(super) fn read_rows(
        &self,
        stripe: StripeId,
        rows: &[u64],
        disks: &[DiskRef],
        distrust: &[usize],
        trust_first: bool,
    ) -> Vec<Result<Row, String>> {
        let (Some(&first), Some(&last)) = (rows.first(), rows.last()) else {
            return Vec::new();
        };
        let g = self.layout.geometry;
        let (k, width) = (usize::from(g.k), g.width());
        let ids = match self.stripe_ids(stripe) {
            Ok(ids) => ids,
            Err(e) => return rows.iter().map(|_| Err(e.to_string())).collect(),
        };
        let usable = self.usable(stripe, &ids);
        let (meta_first, _) = self.layout.meta_location(stripe, first);
        let (meta_last, _) = self.layout.meta_location(stripe, last);
        let pending: Vec<_> = disks
            .iter()
            .enumerate()
            .map(|(c, d)| {
                usable[c].then(|| {
                    d.submit(vec![
                        IoOp::Read {
                            offset: self.layout.block_offset(stripe, first),
                            buf: IoBuf::zeroed(((last - first + 1) * BLOCK_SIZE_U64) as usize),
                        },
                        IoOp::Read {
                            offset: meta_first,
                            buf: IoBuf::zeroed((meta_last - meta_first + BLOCK_SIZE_U64) as usize),
                        },
                    ])
                })
            })
            .collect();
        // (data run, metadata pages) per chunk that answered.
        let runs: Vec<Option<(IoBuf, IoBuf)>> = pending
            .into_iter()
            .map(|p| {
                let Some(Ok(ops)) = p.map(|p| p.wait()) else {
                    return None;
                };
                let mut bufs = ops.into_iter().filter_map(|op| {
                    if let IoOp::Read { buf, .. } = op {
                        Some(buf)
                    } else {
                        None
                    }
                });
                Some((bufs.next()?, bufs.next()?))
            })
            .collect();
        rows.iter()
            .map(|&row| {
                let (page_off, at) = self.layout.meta_location(stripe, row);
                let mo = (page_off - meta_first) as usize + at;
                let i = ((row - first) * BLOCK_SIZE_U64) as usize;
                let mut shards = vec![vec![0u8; SHARD]; width];
                let mut answered = vec![false; width];
                for (c, run) in runs.iter().enumerate() {
                    if let Some((data, meta)) = run {
                        shards[c][..BLOCK_SIZE].copy_from_slice(&data[i..i + BLOCK_SIZE]);
                        shards[c][BLOCK_SIZE..].copy_from_slice(&meta[mo..mo + META_SIZE]);
                        answered[c] = !distrust.contains(&c);
                    }
                }
                if trust_first
                    && let Some(row) = self.rebuild_trusting(stripe, row, &shards, &answered)
                {
                    return Ok(row);
                }
                let mut present = vec![false; width];
                for (c, run) in runs.iter().enumerate() {
                    if run.is_none() {
                        continue;
                    }
                    let distrusted = distrust.contains(&c);
                    present[c] =
                        !distrusted && (c >= k || self.shard_ok(stripe, c, row, &shards[c]));
                    if !distrusted && !present[c] {
                        self.health.tag_failure(ids[c]);
                    }
                }
                let built = self.rebuild_row(stripe, row, shards, present.clone())?;
                // Parity shards the rebuild had to leave out were bad.
                for &c in built.rebuilt.iter().filter(|&&c| c >= k && present[c]) {
                    self.health.tag_failure(ids[c]);
                }
                Ok(built)
            })
            .collect()
    }

    /// Rebuilds the shards of a row that were not read from every shard that was, unchecked,
    /// and returns the row if every rebuilt data block passes its tag check; `None` (check
    /// every shard and search, [`Volume::rebuild_row`]) otherwise. A tag is a MAC over the
    /// block and its position and generation: a rebuild from a rotten or stale shard does not
    /// pass it. This saves checking `k - 1` blocks per rebuilt block when a disk is out, the
    /// common degraded case.
    fn rebuild_trusting(
        &self,
        stripe: StripeId,
        row: u64,
        shards: &[Vec<u8>],
        answered: &[bool],
    ) -> Option<Row> {
        let k = usize::from(self.layout.geometry.k);
        let missing: Vec<usize> = (0..shards.len()).filter(|c| !answered[*c]).collect();
        if shards.len() - missing.len() < k {
            return None;
        }
        let mut attempt = shards.to_vec();
        let mut refs: Vec<&mut [u8]> = attempt.iter_mut().map(|s| s.as_mut_slice()).collect();
        self.codec.reconstruct(&mut refs, answered).ok()?;
        missing
            .iter()
            .filter(|&&c| c < k)
            .all(|&c| self.shard_ok(stripe, c, row, &attempt[c]))
            .then_some(Row {
                shards: attempt,
                rebuilt: missing,
            })
    }

    /// Rebuilds the shards of a row not marked present; see [`Volume::read_row`].
    pub(super) fn rebuild_row(
        &self,
        stripe: StripeId,
        row: u64,
        shards: Vec<Vec<u8>>,
        present: Vec<bool>,
    ) -> Result<Row, String> {
        let g = self.layout.geometry;
        let (k, width) = (usize::from(g.k), g.width());
        let missing: Vec<usize> = (0..width).filter(|c| !present[*c]).collect();
        if missing.is_empty() {
            return Ok(Row {
                shards,
                rebuilt: vec![],
            });
        }
        let have = width - missing.len();
        if have < k {
            return Err(format!(
                "only {have} of the {width} chunks of stripe {stripe} row {row} are intact; {k} are needed"
            ));
        }
        // Try all present shards first, then without one parity shard, then without two...
        let parities: Vec<usize> = (k..width).filter(|c| present[*c]).collect();
        let spare = have - k;
        for drop_count in 0..=spare.min(parities.len()) {
            for dropped in combinations(&parities, drop_count) {
                let mut use_ = present.clone();
                for d in &dropped {
                    use_[*d] = false;
                }
                let mut attempt = shards.clone();
                let mut refs: Vec<&mut [u8]> =
                    attempt.iter_mut().map(|s| s.as_mut_slice()).collect();
                if self.codec.reconstruct(&mut refs, &use_).is_err() {
                    continue;
                }
                let data_ok = (0..k)
                    .filter(|c| !present[*c])
                    .all(|c| self.shard_ok(stripe, c, row, &attempt[c]));
                if data_ok {
                    let mut rebuilt = missing.clone();
                    rebuilt.extend(dropped);
                    return Ok(Row {
                        shards: attempt,
                        rebuilt,
                    });
                }
            }
        }
        Err(format!(
            "stripe {stripe} row {row}: no combination of the surviving chunks rebuilds blocks that pass their tags"
        ))
    }
}

/// All subsets of `items` of size `n`, in lexicographic order (`items` is at most `m` long).
pub(super) fn combinations(items: &[usize], n: usize) -> Vec<Vec<usize>> {
    if n == 0 {
        return vec![vec![]];
    }
    let mut out = Vec::new();
    for (i, &x) in items.iter().enumerate() {
        for mut rest in combinations(&items[i + 1..], n - 1) {
            rest.insert(0, x);
            out.push(rest);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::combinations;

    #[test]
    fn combinations_enumerates_subsets() {
        assert_eq!(combinations(&[4, 5], 0), vec![Vec::<usize>::new()]);
        assert_eq!(combinations(&[4, 5], 1), vec![vec![4], vec![5]]);
        assert_eq!(
            combinations(&[4, 5, 6], 2),
            vec![vec![4, 5], vec![4, 6], vec![5, 6]]
        );
    }
}
