//! Rebuilding a volume's allocation bitmaps from the block metadata on its disks, for offline
//! recovery when the metadata store (which keeps the bitmaps) is lost.
//!
//! A block is allocated when its 64-byte [`BlockMeta`] in its chunk slot is not all zero:
//! destaging writes the metadata of every block it writes and zeroes that of every block it
//! trims. So one read of the metadata pages of every chunk of every stripe (64 bytes per 4 KiB
//! block, 1/64 of the data) is enough; the data itself is not read.
//!
//! The metadata entries of a row (one block index across the chunks of a stripe) are tied by the
//! same Reed-Solomon code as the data: the parity chunks hold the parity of the data chunks'
//! entries (`docs/write-path.md`). [`Volume::scan_allocation`] uses that:
//!
//! 1. All of a stripe's metadata areas are read; a chunk whose read fails is *missing*.
//! 2. With at least `k` chunks present, the missing ones are rebuilt and the parity is
//!    recomputed; a row whose recomputed parity equals every parity entry read is *consistent*,
//!    and its data entries are taken as they are.
//! 3. A row that is not consistent has a damaged entry. It is decoded again leaving out `d`
//!    present entries at a time (`d = 1, 2, …` while `present - k >= 2d`, the radius within
//!    which the error is unique); the first choice that makes the rest consistent wins and the
//!    row counts as *repaired*.
//! 4. Failing that, the tags decide: the row is read with the verified read path (`read_row`:
//!    blocks kept verify with their tag, the others are rebuilt). A reading whose blocks all
//!    verify is taken. A block that reads as empty could be a wiped chunk (zeros look like a
//!    hole, and no tag contradicts a hole): the reading is taken if a parity entry read from a
//!    disk agrees with it (another, damaged parity chunk may not); otherwise each empty data
//!    chunk is rebuilt from the others, and if the rebuilt block verifies with its tag the
//!    chunk was wiped and that reading is taken; if none does, the first reading is the only
//!    one the tags allow within `m` faults. The row counts as *repaired*. If the row cannot be
//!    read at all it is *uncertain*: a block counts as allocated if its own entry or the one
//!    rebuilt without it says so. A false "allocated" makes a read of that block fail (a tag
//!    never verifies a hole), a false "hole" would read as zeros: the scan errs on the side
//!    that is noticed.
//! 5. With fewer than `k` chunks present, nothing can be rebuilt. A present data entry still
//!    says whether its own block is allocated. The blocks of missing data chunks are holes if a
//!    present parity entry of the row is all zero (parity of entries that hold a tag is zero
//!    with probability 2^-256), and *lost* otherwise: marked allocated, so reads of them fail,
//!    and listed in [`AllocScan::lost`].
//!
//! Run the scan after [`Volume::open_for_recovery`] (journal replayed and, when every disk answers, destaged:
//! rows a crash left half written are then whole again), with the destager halted
//! ([`Volume::halt`]) and no client I/O; [`Volume::install_allocation`] then makes the result
//! the volume's bitmaps, with the journaled blocks applied on top.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;

use super::format::{BlockMeta, META_SIZE};
use super::state::Bits;
use super::{Volume, VolumeError};
use crate::disk::{DiskRef, IoOp};
use crate::layout::{BLOCK_SIZE, BLOCK_SIZE_U64, BlockPos, ChunkIndex, StripeId};

/// One metadata entry.
type Entry = [u8; META_SIZE];

/// What [`Volume::scan_allocation`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AllocScan {
    /// Stripes scanned (all of the volume's).
    pub stripes: u64,
    /// Allocated blocks of each stripe that has any: (stripe, one bit per block of the stripe,
    /// as `u64` words, the store's encoding).
    pub bitmaps: Vec<(u64, Vec<u64>)>,
    /// Blocks marked allocated.
    pub allocated: u64,
    /// Chunk metadata areas that could not be read (a disk missing or failing).
    pub unreadable_chunks: u64,
    /// Rows with one damaged metadata entry, out-voted by the others.
    pub repaired_rows: u64,
    /// Rows whose entries disagree in a way the parity cannot settle (see the module docs).
    pub uncertain_rows: u64,
    /// Logical blocks whose metadata cannot be rebuilt (more than `m` chunks of their row
    /// missing) and that may hold data, as sorted, merged ranges of block numbers.
    pub lost: Vec<Range<u64>>,
}

impl AllocScan {
    /// Number of blocks in [`AllocScan::lost`].
    pub fn lost_blocks(&self) -> u64 {
        self.lost.iter().map(|r| r.end - r.start).sum()
    }
}

/// The verdict on one row: for each data chunk, whether its block is allocated.
enum RowVerdict {
    /// Consistent (possibly after leaving out damaged entries).
    Known { alloc: Vec<bool>, repaired: bool },
    /// Entries disagree; allocated where any reading says so.
    Uncertain(Vec<bool>),
    /// Fewer than `k` chunks: `None` where the block cannot be known.
    Partial(Vec<Option<bool>>),
}

impl Volume {
    /// Rebuilds the allocation bitmaps from the block metadata on the disks (module docs).
    /// Reads only; fails only if the placement of a stripe cannot be computed.
    pub fn scan_allocation(&self) -> Result<AllocScan, VolumeError> {
        let g = self.layout.geometry;
        let k = usize::from(g.k);
        let bpc = g.blocks_per_chunk();
        let area = bpc as usize * META_SIZE;
        let meta_len = (self.layout.meta_pages() * BLOCK_SIZE_U64) as usize;
        let blocks = self.record.size.div_ceil(BLOCK_SIZE_U64);
        let mut out = AllocScan {
            stripes: self.layout.stripes,
            ..AllocScan::default()
        };
        let mut lost: Vec<Range<u64>> = Vec::new();
        for s in 0..self.layout.stripes {
            let stripe = StripeId(s);
            let disks = self.stripe_disks(stripe)?;
            let (offset, _) = self.layout.meta_location(stripe, 0);
            let pending: Vec<_> = disks
                .iter()
                .map(|d| d.submit(vec![IoOp::read(offset, meta_len)]))
                .collect();
            let areas: Vec<Option<Vec<u8>>> = pending
                .into_iter()
                .map(|p| {
                    let buf = p.wait().ok()?.pop()?.into_buf()?;
                    (buf.len() >= area).then(|| buf[..area].to_vec())
                })
                .collect();
            out.unreadable_chunks += areas.iter().filter(|a| a.is_none()).count() as u64;
            let consistent = self.consistent_rows(&areas);
            let mut bits = Bits::new(g.blocks_per_stripe());
            let mut stripe_lost: Vec<u64> = Vec::new();
            for row in 0..bpc {
                let verdict = match &consistent {
                    Some((rows, data)) if rows[row as usize] => RowVerdict::Known {
                        alloc: data.iter().map(|d| !is_zero(&entry(d, row))).collect(),
                        repaired: false,
                    },
                    _ => {
                        let entries: Vec<Option<Entry>> = areas
                            .iter()
                            .map(|a| a.as_ref().map(|a| entry(a, row)))
                            .collect();
                        self.resolve_row(stripe, row, &disks, &entries)
                    }
                };
                let alloc: Vec<Option<bool>> = match verdict {
                    RowVerdict::Known { alloc, repaired } => {
                        out.repaired_rows += u64::from(repaired);
                        alloc.into_iter().map(Some).collect()
                    }
                    RowVerdict::Uncertain(alloc) => {
                        out.uncertain_rows += 1;
                        alloc.into_iter().map(Some).collect()
                    }
                    RowVerdict::Partial(alloc) => alloc,
                };
                for (c, a) in alloc.into_iter().enumerate().take(k) {
                    let lba = g
                        .lba_of(BlockPos {
                            stripe,
                            chunk: ChunkIndex(c as u16),
                            block_in_chunk: row,
                        })
                        .0;
                    if lba >= blocks {
                        continue;
                    }
                    if a != Some(false) {
                        bits.set(lba - s * g.blocks_per_stripe(), true);
                    }
                    if a.is_none() {
                        stripe_lost.push(lba);
                    }
                }
            }
            stripe_lost.sort_unstable();
            for lba in stripe_lost {
                push_range(&mut lost, lba);
            }
            if !bits.is_empty() {
                out.allocated += bits.count();
                out.bitmaps.push((s, bits.0));
            }
        }
        lost.sort_by_key(|r| r.start);
        out.lost = merge(lost);
        Ok(out)
    }

    /// With at least `k` areas present: which rows are consistent, and the data areas (missing
    /// ones rebuilt). `None` with fewer than `k` areas.
    fn consistent_rows(&self, areas: &[Option<Vec<u8>>]) -> Option<(Vec<bool>, Vec<Vec<u8>>)> {
        let g = self.layout.geometry;
        let (k, width) = (usize::from(g.k), g.width());
        let bpc = g.blocks_per_chunk() as usize;
        let len = bpc * META_SIZE;
        let present: Vec<bool> = areas.iter().map(Option::is_some).collect();
        if present.iter().filter(|p| **p).count() < k {
            return None;
        }
        let mut full: Vec<Vec<u8>> = areas
            .iter()
            .map(|a| a.clone().unwrap_or_else(|| vec![0; len]))
            .collect();
        if present.iter().any(|p| !p) {
            let mut refs: Vec<&mut [u8]> = full.iter_mut().map(|v| v.as_mut_slice()).collect();
            self.codec.reconstruct(&mut refs, &present).ok()?;
        }
        let mut parity = vec![vec![0u8; len]; width - k];
        {
            let d: Vec<&[u8]> = full[..k].iter().map(|v| v.as_slice()).collect();
            let mut p: Vec<&mut [u8]> = parity.iter_mut().map(|v| v.as_mut_slice()).collect();
            self.codec.encode(&d, &mut p).ok()?;
        }
        let rows = (0..bpc)
            .map(|r| {
                let at = r * META_SIZE..(r + 1) * META_SIZE;
                (k..width).all(|c| !present[c] || parity[c - k][at.clone()] == full[c][at.clone()])
            })
            .collect();
        full.truncate(k);
        Some((rows, full))
    }

    /// The verdict on one row that is not known to be consistent (see the module docs).
    fn resolve_row(
        &self,
        stripe: StripeId,
        row: u64,
        disks: &[DiskRef],
        entries: &[Option<Entry>],
    ) -> RowVerdict {
        let k = usize::from(self.layout.geometry.k);
        let present: Vec<usize> = (0..entries.len())
            .filter(|c| entries[*c].is_some())
            .collect();
        if present.len() < k {
            let hole_row = entries[k..].iter().flatten().any(is_zero);
            return RowVerdict::Partial(
                entries[..k]
                    .iter()
                    .map(|e| match e {
                        Some(e) => Some(!is_zero(e)),
                        None if hole_row => Some(false),
                        None => None,
                    })
                    .collect(),
            );
        }
        let spare = present.len() - k;
        for d in 0..=spare / 2 {
            for left_out in super::io::combinations(&present, d) {
                let used: Vec<usize> = present
                    .iter()
                    .copied()
                    .filter(|c| !left_out.contains(c))
                    .collect();
                let Some(rebuilt) = self.decode_row(entries, &used[..k]) else {
                    continue;
                };
                if used.iter().all(|c| entries[*c] == Some(rebuilt[*c])) {
                    return RowVerdict::Known {
                        alloc: rebuilt[..k].iter().map(|e| !is_zero(e)).collect(),
                        repaired: d > 0,
                    };
                }
            }
        }
        // The metadata alone does not settle it: let the tags decide, with the verified read
        // path (blocks kept verify with their tag, the others are rebuilt).
        let known = |r: &super::io::Row| RowVerdict::Known {
            alloc: r.shards[..k]
                .iter()
                .map(|s| !BlockMeta::decode(&s[BLOCK_SIZE..]).is_empty())
                .collect(),
            repaired: true,
        };
        let first = self.read_row(stripe, row, disks, &[]);
        if let Ok(r) = &first {
            // Blocks with a tag are proven by it. An empty block could be a wiped chunk: a
            // parity entry read from a disk that agrees proves it empty (another, damaged
            // parity chunk may disagree).
            let metas: Vec<&[u8]> = r.shards[..k].iter().map(|s| &s[BLOCK_SIZE..]).collect();
            let mut parity = vec![[0u8; META_SIZE]; entries.len() - k];
            let mut p: Vec<&mut [u8]> = parity.iter_mut().map(|x| x.as_mut_slice()).collect();
            let encoded = self.codec.encode(&metas, &mut p).is_ok();
            let checks: Vec<bool> = (k..entries.len())
                .filter(|c| !r.rebuilt.contains(c))
                .filter_map(|c| entries[c].map(|e| e == parity[c - k]))
                .collect();
            let all_tagged = metas.iter().all(|m| !BlockMeta::decode(m).is_empty());
            if all_tagged || (encoded && (checks.is_empty() || checks.contains(&true))) {
                return known(r);
            }
        }
        // A data chunk that looks empty but, rebuilt from the others, holds a block whose tag
        // verifies was wiped: take that reading.
        for c in (0..k).filter(|c| entries[*c].is_some_and(|e| is_zero(&e))) {
            if let Ok(r) = self.read_row(stripe, row, disks, &[c])
                && !BlockMeta::decode(&r.shards[c][BLOCK_SIZE..]).is_empty()
            {
                return known(&r);
            }
        }
        // No empty chunk hides a block: with at most `m` faults in the row, the first reading
        // is the only one the tags allow.
        if let Ok(r) = &first {
            return known(r);
        }
        // Nothing settles it: allocated where the block's own entry, or the entry rebuilt from
        // the others, says so.
        let alloc = (0..k)
            .map(|c| {
                let own = entries[c].is_some_and(|e| !is_zero(&e));
                let others: Vec<usize> = present.iter().copied().filter(|x| *x != c).collect();
                let rebuilt = (others.len() >= k)
                    .then(|| self.decode_row(entries, &others[..k]))
                    .flatten()
                    .is_some_and(|r| !is_zero(&r[c]));
                own || rebuilt
            })
            .collect();
        RowVerdict::Uncertain(alloc)
    }

    /// Every entry of a row computed from the entries of the chunks `from` (exactly `k`).
    fn decode_row(&self, entries: &[Option<Entry>], from: &[usize]) -> Option<Vec<Entry>> {
        let mut shards: Vec<Entry> = entries
            .iter()
            .map(|e| e.unwrap_or([0; META_SIZE]))
            .collect();
        let present: Vec<bool> = (0..entries.len()).map(|c| from.contains(&c)).collect();
        let mut refs: Vec<&mut [u8]> = shards.iter_mut().map(|s| s.as_mut_slice()).collect();
        self.codec.reconstruct(&mut refs, &present).ok()?;
        Some(shards)
    }

    /// Makes a scan's result the volume's allocation: the home bitmaps (what the chunk slots
    /// hold, also written to the store) are the scan's; the live bitmaps are those with the
    /// journaled writes and trims applied. Returns the lost blocks of the scan that the journal
    /// does not hold a newer copy of: the blocks that cannot be read.
    ///
    /// For an offline volume only: destager halted, no client I/O.
    pub fn install_allocation(&self, scan: &AllocScan) -> Result<Vec<Range<u64>>, VolumeError> {
        let bps = self.layout.geometry.blocks_per_stripe();
        let home: HashMap<u64, Bits> = scan
            .bitmaps
            .iter()
            .map(|(s, w)| (*s, Bits(w.clone())))
            .collect();
        // Journaled blocks and trims, by stripe: (written lbas, trimmed bits).
        let journaled: BTreeMap<u64, (Vec<u64>, Option<Bits>)> = self
            .dirty()
            .stripes
            .iter()
            .map(|(s, sd)| {
                (
                    *s,
                    (
                        sd.blocks.keys().copied().collect(),
                        sd.trims.as_ref().map(|t| t.bits.clone()),
                    ),
                )
            })
            .collect();
        let mut live = home.clone();
        for (s, (written, trimmed)) in &journaled {
            let bits = live.entry(*s).or_insert_with(|| Bits::new(bps));
            if let Some(t) = trimmed {
                for i in (0..bps).filter(|i| t.get(*i)) {
                    bits.set(i, false);
                }
            }
            for lba in written {
                bits.set(lba - s * bps, true);
            }
            if bits.is_empty() {
                live.remove(s);
            }
        }
        let mut updates: Vec<(u64, Option<Vec<u64>>)> = self
            .store
            .alloc_load(self.record.id)
            .map_err(|e| VolumeError::Io(e.to_string()))?
            .into_iter()
            .filter(|(s, _)| !home.contains_key(s))
            .map(|(s, _)| (s, None))
            .collect();
        updates.extend(scan.bitmaps.iter().map(|(s, w)| (*s, Some(w.clone()))));
        self.store
            .alloc_commit(self.record.id, &updates)
            .map_err(|e| VolumeError::Io(e.to_string()))?;
        *self.alloc.home() = home;
        self.alloc.replace_live(live);
        let mut unreadable = Vec::new();
        for r in &scan.lost {
            for lba in r.clone() {
                let s = lba / bps;
                let in_journal = journaled.get(&s).is_some_and(|(w, t)| {
                    w.contains(&lba) || t.as_ref().is_some_and(|t| t.get(lba - s * bps))
                });
                if !in_journal {
                    push_range(&mut unreadable, lba);
                }
            }
        }
        Ok(unreadable)
    }
}

fn entry(area: &[u8], row: u64) -> Entry {
    let at = row as usize * META_SIZE;
    let mut e = [0u8; META_SIZE];
    e.copy_from_slice(&area[at..at + META_SIZE]);
    e
}

fn is_zero(e: &Entry) -> bool {
    BlockMeta::decode(e).is_empty()
}

/// Appends `lba` to a list of ranges, extending the last one when it ends at `lba`.
fn push_range(ranges: &mut Vec<Range<u64>>, lba: u64) {
    match ranges.last_mut() {
        Some(r) if r.end == lba => r.end += 1,
        _ => ranges.push(lba..lba + 1),
    }
}

/// Merges sorted ranges that touch or overlap.
fn merge(sorted: Vec<Range<u64>>) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::with_capacity(sorted.len());
    for r in sorted {
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{merge, push_range};

    #[test]
    fn ranges_merge() {
        let mut v = Vec::new();
        for x in [1, 2, 3, 7, 8, 5] {
            push_range(&mut v, x);
        }
        assert_eq!(v, vec![1..4, 7..9, 5..6]);
        v.sort_by_key(|r| r.start);
        assert_eq!(merge(v), vec![1..4, 5..6, 7..9]);
        assert_eq!(merge(vec![1..4, 2..6, 6..7]), vec![1..7]);
    }
}
