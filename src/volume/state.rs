//! In-memory state of a volume: stripe locks, the journal index and the allocation bitmaps.
//!
//! Locking rules (deadlock freedom): a caller holds at most one stripe lock at a time, except
//! [`LockTable::write_many`], which takes several in slot order. The `Dirty` and `Alloc`
//! mutexes are leaves: held for map updates only, never across I/O or another lock.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::format::BlockMeta;
use crate::layout::StripeId;

/// Stripe locks: readers of a stripe share, writers and the destager exclude. Hashed by
/// stripe number; consecutive stripes use consecutive slots.
pub struct LockTable {
    slots: Vec<RwLock<()>>,
}

/// 4096 slots: enough that unrelated stripes rarely share one (a 1 GiB 4+2 volume has 4096
/// stripes), small enough to cost nothing (4096 × 16 bytes).
pub const LOCK_SLOTS: usize = 4096;

impl Default for LockTable {
    fn default() -> Self {
        Self::new()
    }
}

impl LockTable {
    pub fn new() -> Self {
        Self {
            slots: (0..LOCK_SLOTS).map(|_| RwLock::new(())).collect(),
        }
    }
    fn slot(&self, s: StripeId) -> usize {
        (s.0 % LOCK_SLOTS as u64) as usize
    }
    pub fn read(&self, s: StripeId) -> RwLockReadGuard<'_, ()> {
        self.slots[self.slot(s)]
            .read()
            .unwrap_or_else(|p| p.into_inner())
    }
    pub fn write(&self, s: StripeId) -> RwLockWriteGuard<'_, ()> {
        self.slots[self.slot(s)]
            .write()
            .unwrap_or_else(|p| p.into_inner())
    }
    /// The write lock of `s` if no one holds its slot now, without waiting.
    pub fn try_write(&self, s: StripeId) -> Option<RwLockWriteGuard<'_, ()>> {
        match self.slots[self.slot(s)].try_write() {
            Ok(g) => Some(g),
            Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }
    /// Write locks for consecutive stripes `[first, first + n)`, `n <= LOCK_SLOTS`, taken in
    /// slot order.
    pub fn write_many(&self, first: StripeId, n: u64) -> Vec<RwLockWriteGuard<'_, ()>> {
        let mut slots: Vec<usize> = (0..n).map(|i| self.slot(StripeId(first.0 + i))).collect();
        slots.sort_unstable();
        slots.dedup();
        slots
            .into_iter()
            .map(|i| self.slots[i].write().unwrap_or_else(|p| p.into_inner()))
            .collect()
    }
}

/// Where the newest copy of a journaled block is.
#[derive(Clone, Copy, Debug)]
pub struct JEntry {
    pub seq: u64,
    /// Offset of the block's payload page in the journal log.
    pub offset: u64,
    pub meta: BlockMeta,
}

/// Trimmed blocks of one stripe that are not destaged yet.
#[derive(Clone, Debug, Default)]
pub struct Trims {
    pub bits: Bits,
    /// Newest trim record that touched this stripe.
    pub seq: u64,
}

/// Journal index: blocks whose newest copy is in the journal, and trims not yet destaged,
/// grouped by stripe.
#[derive(Default)]
pub struct Dirty {
    pub stripes: BTreeMap<u64, StripeDirty>,
}

#[derive(Default, Debug, Clone)]
pub struct StripeDirty {
    /// By logical block number.
    pub blocks: BTreeMap<u64, JEntry>,
    pub trims: Option<Trims>,
}

impl Dirty {
    pub fn lookup(&self, stripe: StripeId, lba: u64) -> Option<JEntry> {
        self.stripes.get(&stripe.0)?.blocks.get(&lba).copied()
    }
    pub fn blocks(&self) -> usize {
        self.stripes.values().map(|s| s.blocks.len()).sum()
    }
}

/// A fixed-size bitset, one bit per logical block of a stripe.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Bits(pub Vec<u64>);

impl Bits {
    pub fn new(bits: u64) -> Self {
        Self(vec![0; bits.div_ceil(64) as usize])
    }
    pub fn get(&self, i: u64) -> bool {
        self.0
            .get((i / 64) as usize)
            .is_some_and(|w| w >> (i % 64) & 1 == 1)
    }
    pub fn set(&mut self, i: u64, v: bool) {
        let w = &mut self.0[(i / 64) as usize];
        if v {
            *w |= 1 << (i % 64)
        } else {
            *w &= !(1 << (i % 64))
        }
    }
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|w| *w == 0)
    }
    pub fn count(&self) -> u64 {
        self.0.iter().map(|w| u64::from(w.count_ones())).sum()
    }
}

/// What the chunk slot of a block holds, as the metadata store recorded it when the block was
/// destaged: the generation (journal sequence number of the write), key version and epoch.
/// A block whose slot returns a different generation was rolled back (or is rotten) and is
/// rebuilt from its row. All zero: unknown (no stamp recorded), which disables the check.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stamp {
    pub generation: u64,
    pub version: u32,
    pub epoch: u32,
}

/// Bytes of one encoded [`Stamp`].
pub const STAMP_SIZE: usize = 16;

impl Stamp {
    pub fn encode_all(stamps: &[Stamp]) -> Vec<u8> {
        let mut out = Vec::with_capacity(stamps.len() * STAMP_SIZE);
        for s in stamps {
            out.extend_from_slice(&s.generation.to_le_bytes());
            out.extend_from_slice(&s.version.to_le_bytes());
            out.extend_from_slice(&s.epoch.to_le_bytes());
        }
        out
    }
    /// Decodes `n` stamps; `None` when the length is not `n * STAMP_SIZE` (damaged entry).
    pub fn decode_all(b: &[u8], n: usize) -> Option<Vec<Stamp>> {
        if b.len() != n * STAMP_SIZE {
            return None;
        }
        Some(
            b.chunks_exact(STAMP_SIZE)
                .map(|c| Stamp {
                    generation: u64::from_le_bytes(c[0..8].try_into().expect("8 bytes")),
                    version: u32::from_le_bytes(c[8..12].try_into().expect("4 bytes")),
                    epoch: u32::from_le_bytes(c[12..16].try_into().expect("4 bytes")),
                })
                .collect(),
        )
    }
}

/// Allocation bitmaps: `live` is what reads see (journal included); `home` is what the chunk
/// slots on the disks hold, and is what the metadata store persists at each checkpoint, with
/// the generation stamps of the home blocks (`stamps`, same keys as `home`).
pub struct Alloc {
    bits_per_stripe: u64,
    live: Mutex<HashMap<u64, Bits>>,
    pub home: Mutex<HashMap<u64, Bits>>,
    stamps: Mutex<HashMap<u64, Vec<Stamp>>>,
}

impl Alloc {
    pub fn new(bits_per_stripe: u64, home: HashMap<u64, Bits>) -> Self {
        Self::with_stamps(bits_per_stripe, home, HashMap::new())
    }
    pub fn with_stamps(
        bits_per_stripe: u64,
        home: HashMap<u64, Bits>,
        stamps: HashMap<u64, Vec<Stamp>>,
    ) -> Self {
        Self {
            bits_per_stripe,
            live: Mutex::new(home.clone()),
            home: Mutex::new(home),
            stamps: Mutex::new(stamps),
        }
    }
    pub fn stamps(&self) -> MutexGuard<'_, HashMap<u64, Vec<Stamp>>> {
        self.stamps.lock().unwrap_or_else(|p| p.into_inner())
    }
    /// The recorded stamp of block `i` of `stripe` (default: unknown).
    pub fn stamp(&self, stripe: StripeId, i: u64) -> Stamp {
        self.stamps()
            .get(&stripe.0)
            .and_then(|v| v.get(i as usize).copied())
            .unwrap_or_default()
    }
    /// Records the stamps of a destaged stripe: `set` gives (block index, stamp) of every block
    /// whose slot now holds new content (zero stamp = trimmed). A stripe left with no stamp
    /// is dropped.
    pub fn record_stamps(&self, stripe: StripeId, set: impl IntoIterator<Item = (u64, Stamp)>) {
        let n = self.bits_per_stripe as usize;
        let mut all = self.stamps();
        let v = all
            .entry(stripe.0)
            .or_insert_with(|| vec![Stamp::default(); n]);
        for (i, s) in set {
            if let Some(slot) = v.get_mut(i as usize) {
                *slot = s;
            }
        }
        if v.iter().all(|s| *s == Stamp::default()) {
            all.remove(&stripe.0);
        }
    }
    fn live(&self) -> MutexGuard<'_, HashMap<u64, Bits>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }
    pub fn home(&self) -> MutexGuard<'_, HashMap<u64, Bits>> {
        self.home.lock().unwrap_or_else(|p| p.into_inner())
    }
    /// Whether block `i` of `stripe` holds data.
    pub fn is_live(&self, stripe: StripeId, i: u64) -> bool {
        self.live().get(&stripe.0).is_some_and(|b| b.get(i))
    }
    /// The live bitmap of a stripe (all zero when the stripe was never written).
    pub fn live_bits(&self, stripe: StripeId) -> Bits {
        self.live()
            .get(&stripe.0)
            .cloned()
            .unwrap_or_else(|| Bits::new(self.bits_per_stripe))
    }
    /// Sets or clears live bits `[from, to)` of a stripe.
    pub fn set_live(&self, stripe: StripeId, from: u64, to: u64, v: bool) {
        let mut live = self.live();
        let bits = live
            .entry(stripe.0)
            .or_insert_with(|| Bits::new(self.bits_per_stripe));
        for i in from..to {
            bits.set(i, v);
        }
        if bits.is_empty() {
            live.remove(&stripe.0);
        }
    }
    /// Replaces every live bitmap (offline recovery rebuilds them from the disks).
    pub fn replace_live(&self, live: HashMap<u64, Bits>) {
        *self.live() = live;
    }
    /// Blocks with data, over the whole volume.
    pub fn live_blocks(&self) -> u64 {
        self.live().values().map(Bits::count).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_set_get_clear() {
        let mut b = Bits::new(100);
        assert_eq!(b.0.len(), 2);
        b.set(0, true);
        b.set(99, true);
        assert!(b.get(0) && b.get(99) && !b.get(50));
        assert_eq!(b.count(), 2);
        b.set(0, false);
        b.set(99, false);
        assert!(b.is_empty());
    }

    #[test]
    fn write_many_takes_each_slot_once() {
        let t = LockTable::new();
        let g = t.write_many(StripeId(LOCK_SLOTS as u64 - 2), 4);
        assert_eq!(g.len(), 4);
        drop(g);
        let _again = t.write(StripeId(0));
    }

    #[test]
    fn alloc_live_and_home_are_separate() {
        let a = Alloc::new(64, HashMap::new());
        a.set_live(StripeId(3), 0, 10, true);
        assert!(a.is_live(StripeId(3), 9));
        assert!(!a.is_live(StripeId(3), 10));
        assert!(a.home().is_empty());
        a.set_live(StripeId(3), 0, 10, false);
        assert_eq!(a.live_blocks(), 0);
    }
}
