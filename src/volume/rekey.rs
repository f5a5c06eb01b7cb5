//! Re-encryption of blocks under the current write key, what each key still protects, and how
//! often each stripe is used. The rotation task (`crate::lifecycle`) drives these.
//!
//! [`Volume::rekey_stripe`] promises:
//! - every live block of the stripe whose (master version, epoch) differs from the current
//!   write key is read (verified, repaired from parity if needed) and written again, sealed under
//!   the current key, **through the journal**, exactly as a client write: under the stripe's
//!   write lock, so a client write to the same blocks is either before it (and is what gets
//!   re-encrypted) or after it (and wins); nothing is lost in between;
//! - a crash at any moment leaves each block with its old copy (home slot, old key: the journal
//!   record was not durable) or its new one (journal record replayed, then destaged), never
//!   garbage: the journal's own guarantees, nothing new;
//! - blocks already under the current key are skipped, so a second call does nothing and an
//!   interrupted round can simply run again.
//!
//! A block that was trimmed between the scan and the rewrite is rewritten as zeros (it reads the
//! same, but holds space again until the next trim); the rewrite never brings back old data.
//!
//! Key usage ([`Volume::scan_key_usage`], [`Volume::stale_stripes`]) comes from the
//! generation stamps the metadata store keeps for every destaged block and from the journal
//! index: no disk I/O. A block destaged before stamps were recorded counts as *unknown*: it may
//! need any version, so destroying a version is refused while any block is unknown, and the
//! rotation task re-keys such stripes first (the rewrite records their stamps).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Mutex, PoisonError};

use serde::Serialize;

use super::format::{BlockMeta, MAX_RECORD_BLOCKS};
use super::{Volume, VolumeError};
use crate::layout::{Lba, StripeId};

/// Independently locked shards of the access counter (a power of two).
const ACCESS_SHARDS: usize = 16;
/// Stripes counted per shard at most: bounds the counter's memory (≈ 1 MiB in all) whatever
/// the clients do; stripes beyond it are not counted until the window resets.
const ACCESS_MAX_PER_SHARD: usize = 1 << 14;

/// Accesses per stripe since the last reset: a sharded map, so the read and write paths pay
/// one uncontended lock and a hash per stripe they touch.
pub struct AccessCounter {
    shards: Vec<Mutex<HashMap<u64, u32>>>,
}

impl Default for AccessCounter {
    fn default() -> Self {
        Self::new()
    }
}

impl AccessCounter {
    pub fn new() -> Self {
        Self {
            shards: (0..ACCESS_SHARDS)
                .map(|_| Mutex::new(HashMap::new()))
                .collect(),
        }
    }

    fn shard(&self, stripe: u64) -> std::sync::MutexGuard<'_, HashMap<u64, u32>> {
        self.shards[(stripe as usize) % ACCESS_SHARDS]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts one access of `stripe`.
    pub fn touch(&self, stripe: StripeId) {
        let mut m = self.shard(stripe.0);
        let len = m.len();
        match m.get_mut(&stripe.0) {
            Some(c) => *c = c.saturating_add(1),
            None if len < ACCESS_MAX_PER_SHARD => {
                m.insert(stripe.0, 1);
            }
            None => {}
        }
    }

    /// Stripes accessed at least `threshold` times since the last reset, most accessed first.
    pub fn hot(&self, threshold: u64) -> Vec<(StripeId, u64)> {
        let mut out: Vec<(StripeId, u64)> = Vec::new();
        for s in &self.shards {
            let m = s.lock().unwrap_or_else(PoisonError::into_inner);
            out.extend(
                m.iter()
                    .filter(|(_, c)| u64::from(**c) >= threshold)
                    .map(|(s, c)| (StripeId(*s), u64::from(*c))),
            );
        }
        out.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.0.cmp(&b.0.0)));
        out
    }

    /// Starts a new counting window.
    pub fn reset(&self) {
        for s in &self.shards {
            s.lock().unwrap_or_else(PoisonError::into_inner).clear();
        }
    }
}

/// Blocks per (master version, epoch), and blocks whose key could not be read.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct KeyUsage {
    /// (version, epoch) → live blocks sealed under it (journal included).
    pub by_key: BTreeMap<(u32, u32), u64>,
    /// Live blocks whose metadata could not be read: they may need any version.
    pub unknown: u64,
}

impl KeyUsage {
    /// Blocks sealed under master key `version`, any epoch.
    pub fn blocks_of_version(&self, version: u32) -> u64 {
        self.by_key
            .iter()
            .filter(|((v, _), _)| *v == version)
            .map(|(_, n)| *n)
            .sum()
    }

    /// Adds another volume's usage.
    pub fn merge(&mut self, other: &KeyUsage) {
        for (k, n) in &other.by_key {
            *self.by_key.entry(*k).or_default() += n;
        }
        self.unknown += other.unknown;
    }
}

impl Volume {
    /// The (master version, epoch) new writes are sealed under.
    pub fn write_key(&self) -> (u32, u32) {
        self.write_key.get()
    }

    /// Number of stripes of the volume.
    pub fn stripes(&self) -> u64 {
        self.layout.stripes
    }

    /// Stripes accessed at least `threshold` times in the current window, most accessed first.
    pub fn hot_stripes(&self, threshold: u64) -> Vec<(StripeId, u64)> {
        self.access.hot(threshold)
    }

    /// Starts a new access-counting window.
    pub fn reset_access_counts(&self) {
        self.access.reset()
    }

    /// The key of every live block of `stripe`: `(lba, Some((version, epoch)))`, or `None` when
    /// it is unknown (a block destaged before generation stamps were recorded). From the
    /// journal index and the stamps, without I/O.
    fn stripe_block_keys(&self, stripe: StripeId) -> Vec<(u64, Option<(u32, u32)>)> {
        let bps = self.layout.geometry.blocks_per_stripe();
        let first = stripe.0 * bps;
        let _lock = self.locks.read(stripe);
        let live = self.alloc.live_bits(stripe);
        if live.is_empty() {
            return Vec::new();
        }
        let journaled: BTreeMap<u64, BlockMeta> = self
            .dirty()
            .stripes
            .get(&stripe.0)
            .map(|sd| sd.blocks.iter().map(|(l, e)| (*l, e.meta)).collect())
            .unwrap_or_default();
        (0..bps)
            .filter(|i| live.get(*i))
            .map(|i| {
                let lba = first + i;
                let key = match journaled.get(&lba) {
                    Some(m) => Some((m.version, m.epoch)),
                    None => {
                        let st = self.alloc.stamp(stripe, i);
                        (st.generation != 0).then_some((st.version, st.epoch))
                    }
                };
                (lba, key)
            })
            .collect()
    }

    /// Re-encrypts every live block of `stripe` that is not under the current write key (see
    /// the module docs). Returns the number of blocks rewritten.
    pub fn rekey_stripe(&self, stripe: StripeId) -> Result<u64, VolumeError> {
        if stripe.0 >= self.layout.stripes {
            return Err(VolumeError::OutOfRange {
                offset: stripe.0,
                len: 1,
                size: self.layout.stripes,
            });
        }
        let current = self.write_key.get();
        let stale: Vec<u64> = self
            .stripe_block_keys(stripe)
            .into_iter()
            .filter(|(_, key)| *key != Some(current))
            .map(|(lba, _)| lba)
            .collect();
        // Runs of consecutive blocks, at most one record each.
        let mut runs: Vec<(u64, usize)> = Vec::new();
        for lba in &stale {
            match runs.last_mut() {
                Some((first, n)) if *first + *n as u64 == *lba && *n < MAX_RECORD_BLOCKS => *n += 1,
                _ => runs.push((*lba, 1)),
            }
        }
        for (first, n) in runs {
            self.append(stripe, n, |r| {
                // Read under the stripe lock that `append` holds: the newest content.
                let plain = self.read_stripe_blocks(stripe, Lba(first), n as u64)?;
                self.build_write_record(r, first, n, |lba, page| {
                    page.copy_from_slice(&plain[(lba.0 - first) as usize]);
                    Ok(())
                })
            })?;
        }
        let n = stale.len() as u64;
        self.stats.blocks_rekeyed.fetch_add(n, Ordering::Relaxed);
        Ok(n)
    }

    /// Blocks per key over the whole volume (journal included), from the generation stamps
    /// ([`Volume::key_usage`]); unknown stamps are counted apart.
    pub fn scan_key_usage(&self) -> Result<KeyUsage, VolumeError> {
        let mut u = KeyUsage::default();
        for (k, n) in self.key_usage() {
            if k == (0, 0) {
                u.unknown += n;
            } else {
                u.by_key.insert(k, n);
            }
        }
        Ok(u)
    }

    /// Destages everything, then rewrites both journal checkpoints under the current master
    /// version, so that nothing in the journal needs an older one (before an archive or a
    /// destroy). Records written meanwhile are sealed under the current version already.
    pub fn reseal_journal(&self) -> Result<(), VolumeError> {
        self.destage_all()?;
        let _one = self
            .destage_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.journal.reseal_checkpoints()?;
        Ok(())
    }
}
