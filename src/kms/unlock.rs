//! Multi-party unlock: an unlock session collects shares one at a time, from different holders,
//! until the pool's threshold is met, then combines them into the KEK.
//!
//! What a session promises:
//! - each share is checked on its own when it arrives (the file's format and checksum were
//!   checked when it was loaded): a share of another pool, of another split, with another
//!   threshold, or with an index already given is refused with a message naming it, and the
//!   shares already accepted stay;
//! - progress is `have` of `need`; partial progress is discarded when `timeout` has passed
//!   since the first share of the session arrived, so a share given yesterday cannot be
//!   combined with one given today;
//! - outside the access windows of [`UnlockPolicy`] every share is refused
//!   ([`KmsError::Policy`]), and nothing is kept;
//! - when `need` shares are in, they are combined and the session is emptied whatever the
//!   outcome. The KEK is proven right only when it unwraps a master key (the caller's next
//!   step): a wrong one is [`KmsError::WrongKek`] there.
//!
//! Time is passed in (Unix seconds) so that tests control it.

#![forbid(unsafe_code)]

use super::policy::UnlockPolicy;
use super::{Kek, KmsError, LoadedShare, combine, hex};

/// Shares collected so far, and what they are for.
pub struct UnlockSession {
    pool_id: [u8; 16],
    split_id: [u8; 16],
    threshold: u8,
    policy: UnlockPolicy,
    shares: Vec<LoadedShare>,
    started: Option<u64>,
}

/// Result of adding a share.
pub enum Step {
    /// Accepted; more shares are needed.
    Progress { have: u8, need: u8 },
    /// The threshold is met: the combined KEK (to be proven by unwrapping a master key).
    Complete(Kek),
}

impl std::fmt::Debug for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::Progress { have, need } => write!(f, "Progress({have} of {need})"),
            Step::Complete(_) => f.write_str("Complete(<redacted>)"),
        }
    }
}

impl UnlockSession {
    /// A session for the pool `pool_id` whose current split is `split_id` with `threshold`.
    pub fn new(pool_id: [u8; 16], split_id: [u8; 16], threshold: u8, policy: UnlockPolicy) -> Self {
        Self {
            pool_id,
            split_id,
            threshold,
            policy,
            shares: Vec::new(),
            started: None,
        }
    }

    /// Shares accepted so far and shares needed (after discarding expired progress).
    pub fn progress(&mut self, now: u64) -> (u8, u8) {
        self.expire(now);
        (self.shares.len() as u8, self.threshold)
    }

    /// Indexes of the shares accepted so far, in arrival order.
    pub fn given(&self) -> Vec<u8> {
        self.shares.iter().map(|s| s.share.index).collect()
    }

    /// Forgets every share given so far.
    pub fn reset(&mut self) {
        self.shares.clear();
        self.started = None;
    }

    /// Whether partial progress was discarded because it timed out.
    fn expire(&mut self, now: u64) -> bool {
        if let Some(t0) = self.started
            && now >= t0.saturating_add(self.policy.timeout.as_secs())
        {
            self.reset();
            return true;
        }
        false
    }

    /// Adds one share (see the module docs for what is refused and why).
    pub fn add(&mut self, share: LoadedShare, now: u64) -> Result<Step, KmsError> {
        if let Err(refusal) = self.policy.check(now) {
            self.reset();
            return Err(KmsError::Policy(refusal));
        }
        self.expire(now);
        let s = &share.share;
        if s.pool_id != self.pool_id {
            return Err(KmsError::ForeignPool {
                file: share.source.clone(),
                found: hex::encode(&s.pool_id),
                expected: hex::encode(&self.pool_id),
            });
        }
        if s.split_id != self.split_id {
            return Err(KmsError::OtherSplit {
                file: share.source.clone(),
                found: hex::encode(&s.split_id),
                expected: hex::encode(&self.split_id),
            });
        }
        if s.threshold != self.threshold {
            return Err(KmsError::ThresholdMismatch {
                file: share.source.clone(),
                found: s.threshold,
                expected: self.threshold,
            });
        }
        if let Some(earlier) = self.shares.iter().find(|e| e.share.index == s.index) {
            return Err(KmsError::Share(format!(
                "{}: share {} was already given in this unlock (by {}); each share counts once",
                share.source, s.index, earlier.source
            )));
        }
        self.started.get_or_insert(now);
        self.shares.push(share);
        if self.shares.len() < usize::from(self.threshold) {
            return Ok(Step::Progress {
                have: self.shares.len() as u8,
                need: self.threshold,
            });
        }
        let shares = std::mem::take(&mut self.shares);
        self.started = None;
        combine(&shares, self.pool_id, self.split_id, self.threshold).map(Step::Complete)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kms::{Share, split};
    use std::time::Duration;

    fn loaded(s: &Share, name: &str) -> LoadedShare {
        LoadedShare {
            source: name.into(),
            share: s.clone(),
        }
    }

    #[test]
    fn two_of_three_waits_three_of_three_combines() {
        let kek = Kek::generate();
        let shares = split(&kek, [1; 16], 5, 3).unwrap();
        let split_id = shares[0].split_id;
        let mut s = UnlockSession::new([1; 16], split_id, 3, UnlockPolicy::default());
        assert!(matches!(
            s.add(loaded(&shares[0], "a"), 100).unwrap(),
            Step::Progress { have: 1, need: 3 }
        ));
        let dup = s.add(loaded(&shares[0], "a2"), 101).unwrap_err();
        assert!(dup.to_string().contains("a2"), "{dup}");
        assert!(matches!(
            s.add(loaded(&shares[3], "d"), 102).unwrap(),
            Step::Progress { have: 2, need: 3 }
        ));
        match s.add(loaded(&shares[4], "e"), 103).unwrap() {
            Step::Complete(k) => assert_eq!(k.expose(), kek.expose()),
            other => panic!("expected the KEK, got {other:?}"),
        }
        assert_eq!(s.progress(104), (0, 3));
    }

    #[test]
    fn partial_progress_expires() {
        let kek = Kek::generate();
        let shares = split(&kek, [1; 16], 3, 2).unwrap();
        let policy = UnlockPolicy {
            timeout: Duration::from_secs(60),
            ..Default::default()
        };
        let mut s = UnlockSession::new([1; 16], shares[0].split_id, 2, policy);
        s.add(loaded(&shares[0], "a"), 1000).unwrap();
        assert_eq!(s.progress(1059), (1, 2));
        assert_eq!(s.progress(1060), (0, 2));
        assert!(matches!(
            s.add(loaded(&shares[1], "b"), 1061).unwrap(),
            Step::Progress { have: 1, need: 2 }
        ));
    }

    #[test]
    fn foreign_share_is_named_and_others_are_kept() {
        let kek = Kek::generate();
        let mine = split(&kek, [1; 16], 3, 2).unwrap();
        let theirs = split(&kek, [2; 16], 3, 2).unwrap();
        let mut s = UnlockSession::new([1; 16], mine[0].split_id, 2, UnlockPolicy::default());
        s.add(loaded(&mine[0], "mine-1"), 0).unwrap();
        let e = s.add(loaded(&theirs[1], "theirs-2"), 1).unwrap_err();
        assert!(e.to_string().contains("theirs-2") && e.to_string().contains("another pool"));
        assert_eq!(s.progress(2), (1, 2));
    }
}
