//! [`FaultDisk`]: a wrapper that makes another disk fail on command.
//!
//! A test keeps the [`FaultHandle`] and changes the faults at any time, from any thread:
//!
//! - fail reads, writes, syncs or discards with [`DiskError::Injected`] ([`Trigger`]s: always,
//!   with a probability, only for ops overlapping an offset range, at most `n` times);
//! - flip bits in the data that reads return: one random bit in every 512-byte sector of the
//!   read that lies in the trigger's range (so every block, whatever the upper layer's block
//!   size, is damaged); the disk itself is untouched;
//! - "gone": every batch fails with [`DiskError::Gone`], as if the disk had been pulled; the
//!   inner disk sees nothing.
//!
//! A failed op is not passed to the inner disk (a failed write writes nothing); the other ops
//! of its batch still run, then the batch reports the injected error. Faults are decided when a
//! batch is submitted; counters ([`FaultCounts`]) count every injected fault, so a test can check
//! that it got exactly what it asked for. The random choices come from a seeded generator.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};

use super::{Disk, DiskError, DiskRef, IoOp, Pending, SECTOR, check_batch};

/// When a fault fires.
#[derive(Clone, Debug, PartialEq)]
pub struct Trigger {
    /// Chance that a matching op is hit (1.0: every one; 0.0: none).
    pub probability: f64,
    /// Only ops overlapping these bytes match (syncs have no range and ignore it).
    pub range: Option<Range<u64>>,
    /// Stop after this many faults.
    pub limit: Option<u64>,
}

impl Trigger {
    /// Never fires.
    pub fn never() -> Trigger {
        Trigger {
            probability: 0.0,
            range: None,
            limit: None,
        }
    }
    /// Fires on every op.
    pub fn always() -> Trigger {
        Trigger {
            probability: 1.0,
            range: None,
            limit: None,
        }
    }
    /// Fires on each op with probability `p`.
    pub fn probability(p: f64) -> Trigger {
        Trigger {
            probability: p,
            range: None,
            limit: None,
        }
    }
    /// Fires on every op overlapping `range`.
    pub fn range(range: Range<u64>) -> Trigger {
        Trigger {
            probability: 1.0,
            range: Some(range),
            limit: None,
        }
    }
    /// The same trigger, only within `range`.
    pub fn within(mut self, range: Range<u64>) -> Trigger {
        self.range = Some(range);
        self
    }
    /// The same trigger, at most `n` times.
    pub fn times(mut self, n: u64) -> Trigger {
        self.limit = Some(n);
        self
    }

    fn overlaps(&self, offset: u64, len: u64) -> bool {
        match &self.range {
            None => true,
            Some(r) => offset < r.end && r.start < offset.saturating_add(len.max(1)),
        }
    }

    /// Decide for one op (and consume one of `limit` if it fires).
    fn fire(&mut self, offset: u64, len: u64, ranged: bool, rng: &mut SmallRng) -> bool {
        // A NaN probability never fires.
        if self.probability.is_nan()
            || self.probability <= 0.0
            || self.limit == Some(0)
            || (ranged && !self.overlaps(offset, len))
        {
            return false;
        }
        let hit = self.probability >= 1.0 || rng.random_bool(self.probability);
        if hit && let Some(n) = &mut self.limit {
            *n -= 1;
        }
        hit
    }
}

impl Default for Trigger {
    fn default() -> Self {
        Trigger::never()
    }
}

/// Counts of injected faults.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultCounts {
    pub read_errors: u64,
    pub write_errors: u64,
    pub sync_errors: u64,
    pub discard_errors: u64,
    /// Bits flipped in data returned by reads.
    pub bit_flips: u64,
    /// Batches refused because the disk was gone.
    pub gone_batches: u64,
}

impl FaultCounts {
    /// Ops failed with an injected error (not counting bit flips or gone batches).
    pub fn errors(&self) -> u64 {
        self.read_errors + self.write_errors + self.sync_errors + self.discard_errors
    }
}

#[derive(Default)]
struct Rules {
    read: Trigger,
    write: Trigger,
    sync: Trigger,
    discard: Trigger,
    flip: Trigger,
}

struct Control {
    rules: Mutex<(Rules, SmallRng)>,
    gone: AtomicBool,
    read_errors: AtomicU64,
    write_errors: AtomicU64,
    sync_errors: AtomicU64,
    discard_errors: AtomicU64,
    bit_flips: AtomicU64,
    gone_batches: AtomicU64,
}

/// The test's handle on a [`FaultDisk`]; clones control the same disk.
#[derive(Clone)]
pub struct FaultHandle(Arc<Control>);

impl FaultHandle {
    fn rules(&self) -> MutexGuard<'_, (Rules, SmallRng)> {
        self.0.rules.lock().unwrap_or_else(PoisonError::into_inner)
    }
    /// Fail reads that fire `t`.
    pub fn fail_reads(&self, t: Trigger) {
        self.rules().0.read = t;
    }
    /// Fail writes that fire `t` (nothing is written).
    pub fn fail_writes(&self, t: Trigger) {
        self.rules().0.write = t;
    }
    /// Fail syncs that fire `t` (the range is ignored).
    pub fn fail_syncs(&self, t: Trigger) {
        self.rules().0.sync = t;
    }
    /// Fail discards that fire `t`.
    pub fn fail_discards(&self, t: Trigger) {
        self.rules().0.discard = t;
    }
    /// Flip one bit per sector (within the trigger's range) of reads that fire `t`.
    pub fn flip_bits(&self, t: Trigger) {
        self.rules().0.flip = t;
    }
    /// Pull (`true`) or reinsert (`false`) the disk.
    pub fn set_gone(&self, gone: bool) {
        self.0.gone.store(gone, Ordering::SeqCst);
    }
    pub fn is_gone(&self) -> bool {
        self.0.gone.load(Ordering::SeqCst)
    }
    /// Remove every fault (counters are kept).
    pub fn clear(&self) {
        self.rules().0 = Rules::default();
        self.set_gone(false);
    }
    /// Restart the random generator from `seed`.
    pub fn reseed(&self, seed: u64) {
        self.rules().1 = SmallRng::seed_from_u64(seed);
    }
    pub fn counts(&self) -> FaultCounts {
        let c = &self.0;
        FaultCounts {
            read_errors: c.read_errors.load(Ordering::SeqCst),
            write_errors: c.write_errors.load(Ordering::SeqCst),
            sync_errors: c.sync_errors.load(Ordering::SeqCst),
            discard_errors: c.discard_errors.load(Ordering::SeqCst),
            bit_flips: c.bit_flips.load(Ordering::SeqCst),
            gone_batches: c.gone_batches.load(Ordering::SeqCst),
        }
    }
}

/// A disk that injects faults into another, as its [`FaultHandle`] says.
pub struct FaultDisk {
    inner: DiskRef,
    ctl: FaultHandle,
}

impl FaultDisk {
    /// Wrap `inner`, with no faults and a random generator seeded with 0.
    pub fn new(inner: DiskRef) -> FaultDisk {
        Self::with_seed(inner, 0)
    }

    pub fn with_seed(inner: DiskRef, seed: u64) -> FaultDisk {
        let ctl = Control {
            rules: Mutex::new((Rules::default(), SmallRng::seed_from_u64(seed))),
            gone: AtomicBool::new(false),
            read_errors: AtomicU64::new(0),
            write_errors: AtomicU64::new(0),
            sync_errors: AtomicU64::new(0),
            discard_errors: AtomicU64::new(0),
            bit_flips: AtomicU64::new(0),
            gone_batches: AtomicU64::new(0),
        };
        FaultDisk {
            inner,
            ctl: FaultHandle(Arc::new(ctl)),
        }
    }

    pub fn handle(&self) -> FaultHandle {
        self.ctl.clone()
    }

    pub fn inner(&self) -> &DiskRef {
        &self.inner
    }
}

/// Bits to flip in one read: (index of the op in the batch sent to the inner disk, byte
/// position in its buffer, bit).
type Flip = (usize, usize, u8);

impl Disk for FaultDisk {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn submit(&self, ops: Vec<IoOp>) -> Pending {
        let c = &self.ctl.0;
        if self.ctl.is_gone() {
            c.gone_batches.fetch_add(1, Ordering::SeqCst);
            return Pending::ready(Err(DiskError::Gone {
                disk: self.name().to_owned(),
            }));
        }
        if let Err(e) = check_batch(self.name(), self.size(), &ops) {
            return Pending::ready(Err(e));
        }
        let mut injected: Option<DiskError> = None;
        let mut passed = Vec::with_capacity(ops.len());
        let mut flips: Vec<Flip> = Vec::new();
        {
            let mut guard = self.ctl.rules();
            let (rules, rng) = &mut *guard;
            for op in ops {
                let (offset, len) = (op.offset(), op.len());
                let (trigger, counter) = match op {
                    IoOp::Read { .. } => (&mut rules.read, &c.read_errors),
                    IoOp::Write { .. } => (&mut rules.write, &c.write_errors),
                    IoOp::Sync => (&mut rules.sync, &c.sync_errors),
                    IoOp::Discard { .. } => (&mut rules.discard, &c.discard_errors),
                };
                let ranged = !matches!(op, IoOp::Sync);
                if trigger.fire(offset, len, ranged, rng) {
                    counter.fetch_add(1, Ordering::SeqCst);
                    if injected.is_none() {
                        injected = Some(DiskError::Injected {
                            disk: self.name().to_owned(),
                            op: op.name(),
                            offset,
                        });
                    }
                    continue;
                }
                if matches!(op, IoOp::Read { .. })
                    && len > 0
                    && rules.flip.fire(offset, len, true, rng)
                {
                    let (lo, hi) = match &rules.flip.range {
                        Some(r) => (offset.max(r.start), (offset + len).min(r.end)),
                        None => (offset, offset + len),
                    };
                    // One bit in every sector that overlaps [lo, hi), at a position inside it.
                    let mut s = lo / SECTOR * SECTOR;
                    while s < hi {
                        let a = s.max(lo);
                        let b = (s + SECTOR).min(hi);
                        let at = rng.random_range(a..b);
                        flips.push((
                            passed.len(),
                            (at - offset) as usize,
                            rng.random_range(0..8u8),
                        ));
                        s += SECTOR;
                    }
                }
                passed.push(op);
            }
        }
        c.bit_flips.fetch_add(flips.len() as u64, Ordering::SeqCst);
        let inner = self.inner.submit(passed);
        inner.then(move |result| {
            let mut ops = result?;
            if let Some(e) = injected {
                return Err(e);
            }
            for (i, at, bit) in flips {
                if let Some(IoOp::Read { buf, .. }) = ops.get_mut(i)
                    && let Some(byte) = buf.get_mut(at)
                {
                    *byte ^= 1 << bit;
                }
            }
            Ok(ops)
        })
    }

    fn backend(&self) -> &'static str {
        "fault"
    }

    fn completes_in_submit(&self) -> bool {
        self.inner.completes_in_submit()
    }
}
