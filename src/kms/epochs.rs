//! Epochs: the time axis of shard keys.
//!
//! An epoch is a number (from 1) and the instant it started. New writes are sealed under the
//! current epoch; every block records the epoch it was sealed under, so reads never depend on
//! this history. The history is what tells how old a block's key is (the start of its epoch is
//! an upper bound on its age) and is persisted in the metadata store (`"epochs"` entry of the
//! key-lifecycle table) so that the epoch number never goes back after a restart.
//!
//! Rule: the current epoch advances when `period` has passed since it started. After a long
//! stop the epoch advances once (not once per missed period): numbers are cheap, but a block
//! written now must not get an epoch that claims to have started in the past.

#![forbid(unsafe_code)]

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// One epoch: its number and when it started (Unix seconds).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Epoch {
    pub number: u32,
    pub start_unix: u64,
}

/// The epochs of a pool, oldest first; never empty once created.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochHistory {
    pub epochs: Vec<Epoch>,
}

/// Epochs kept in the history: older entries are dropped (their blocks still read, by the
/// number they carry; only their start time is forgotten, and such blocks count as oldest).
/// 4096 daily epochs are eleven years.
pub const MAX_EPOCHS_KEPT: usize = 4096;

impl EpochHistory {
    /// A history whose first epoch, number 1, starts at `now`. Pools created before epochs were
    /// recorded wrote everything under epoch 1, so that is where they start too.
    pub fn new(now: u64) -> Self {
        Self {
            epochs: vec![Epoch {
                number: 1,
                start_unix: now,
            }],
        }
    }

    /// The current (newest) epoch.
    pub fn current(&self) -> Epoch {
        self.epochs.last().copied().unwrap_or(Epoch {
            number: 1,
            start_unix: 0,
        })
    }

    /// Starts a new epoch at `now` if `period` has passed since the current one started.
    /// Returns the new epoch, or `None` when the current one is still running.
    pub fn advance_if_due(&mut self, now: u64, period: Duration) -> Option<Epoch> {
        let cur = self.current();
        if now < cur.start_unix.saturating_add(period.as_secs().max(1)) {
            return None;
        }
        Some(self.advance(now))
    }

    /// Starts a new epoch at `now` unconditionally (`key rotate` with nothing left to rotate
    /// in the current epoch, tests).
    pub fn advance(&mut self, now: u64) -> Epoch {
        let cur = self.current();
        let next = Epoch {
            number: cur.number.saturating_add(1),
            start_unix: now.max(cur.start_unix),
        };
        self.epochs.push(next);
        if self.epochs.len() > MAX_EPOCHS_KEPT {
            let drop = self.epochs.len() - MAX_EPOCHS_KEPT;
            self.epochs.drain(..drop);
        }
        next
    }

    /// When epoch `number` started; `None` for an epoch older than the history (or unknown).
    pub fn start_of(&self, number: u32) -> Option<u64> {
        self.epochs
            .binary_search_by_key(&number, |e| e.number)
            .ok()
            .map(|i| self.epochs[i].start_unix)
    }

    /// The newest epoch that started at or before `cutoff` and is not the current one: blocks of
    /// this epoch or older are due for re-encryption under a maximum age ending at `cutoff`.
    /// `None` when no such epoch exists.
    pub fn due_through(&self, cutoff: u64) -> Option<u32> {
        let cur = self.current().number;
        self.epochs
            .iter()
            .rev()
            .filter(|e| e.number < cur)
            .find(|e| e.start_unix <= cutoff)
            .map(|e| e.number)
            .or_else(|| {
                // Epochs older than the kept history started before every kept one.
                let first = self.epochs.first()?;
                (first.number > 1 && first.start_unix <= cutoff).then(|| first.number - 1)
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_advance_once_per_period_and_never_backwards() {
        let mut h = EpochHistory::new(1000);
        let p = Duration::from_secs(10);
        assert_eq!(h.advance_if_due(1009, p), None);
        assert_eq!(h.advance_if_due(1010, p).map(|e| e.number), Some(2));
        assert_eq!(h.current().start_unix, 1010);
        // A long stop: one advance, starting now.
        assert_eq!(
            h.advance_if_due(5000, p),
            Some(Epoch {
                number: 3,
                start_unix: 5000
            })
        );
        // A clock that went back does not make an epoch start earlier than its predecessor.
        assert_eq!(h.advance(10).start_unix, 5000);
        assert_eq!(h.start_of(2), Some(1010));
        assert_eq!(h.start_of(9), None);
    }

    #[test]
    fn due_through_excludes_the_current_epoch() {
        let mut h = EpochHistory::new(0);
        h.advance(100);
        h.advance(200);
        assert_eq!(h.due_through(150), Some(2));
        assert_eq!(h.due_through(1000), Some(2));
        assert_eq!(h.due_through(50), Some(1));
        let fresh = EpochHistory::new(0);
        assert_eq!(fresh.due_through(1000), None);
    }
}
