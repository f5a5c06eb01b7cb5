//! Erasure coding: systematic Reed-Solomon over the ciphertext chunks of a stripe.
//!
//! A [`Codec`] for `k + m` turns `k` data shards into `m` parity shards ([`Codec::encode`]) and
//! rebuilds any missing shards, data and parity, from any `k` present ones
//! ([`Codec::reconstruct`]; [`Codec::reconstruct_data`] rebuilds only the data shards, which is
//! what a degraded read needs).
//!
//! # The code
//!
//! Classic Reed-Solomon over GF(2^8) (field polynomial x^8 + x^4 + x^3 + x^2 + 1, 0x11d), with the
//! systematic encoding matrix built from a Vandermonde matrix, as provided by the
//! `reed-solomon-erasure` crate (`galois_8`, with its `simd-accel` SSSE3/AVX2 kernels).
//! The crate keeps an LRU cache of inverted decode matrices keyed by erasure pattern, so a
//! reconstruct costs one small table look-up plus `k` multiply-accumulate passes per missing
//! shard: 0.9 µs for a 4 KiB range of a 4 + 2 stripe with one shard missing. This codec was
//! chosen on measurement over `reed-solomon-simd`, whose decoder spends 130–350 µs per call on an
//! erasure locator over 65 536 entries whatever the shard size, and offers no way to keep it per
//! erasure pattern. The figures and the command that produces them are in `docs/erasure.md`.
//!
//! The encoding matrix is part of the on-disk format: parity written by one version must decode
//! in every later one. `tests/erasure_codec.rs` pins it with a golden vector.
//!
//! # Contracts
//!
//! - **Position locality.** Byte `o` of every parity shard depends only on byte `o` of the data
//!   shards (each parity byte is a GF(2^8) linear combination of the data bytes at the same
//!   offset). Encoding or reconstructing any sub-range `[a, b)` of a stripe's shards therefore
//!   gives exactly the bytes `[a, b)` of encoding or reconstructing the whole shards. The volume's
//!   small-write and degraded-read paths rely on this to touch only the 4 KiB range they need.
//! - **Shards.** All shards of one call have the same length, a positive multiple of
//!   [`SHARD_ALIGN`] (64) bytes; otherwise the call returns [`ErasureError::BadShards`], as it
//!   does for a wrong number of shards or of `present` flags.
//! - **Erasures.** With at most `m` shards missing, reconstruction restores them exactly; with
//!   more, it returns [`ErasureError::TooFewShards`] and leaves every shard untouched. It never
//!   panics on bad input. Shards present but corrupt are not detected here: the per-block tags
//!   of the crypto layer find them, and the caller then marks them missing.
//! - **`m = 0`** is allowed: encode checks its arguments and does nothing; reconstruct succeeds
//!   only when nothing is missing.
//! - **Threads.** `Codec` is `Send + Sync` and holds no per-call state: share one codec between
//!   all threads (the decode-matrix cache is behind a short mutex).
//!
//! # Limits
//!
//! `1 <= k` and `k + m <= 256` (the size of the field); the volume's geometry allows `k + m <= 64`.

#![forbid(unsafe_code)]

use reed_solomon_erasure::galois_8::ReedSolomon;

/// Shard lengths must be a multiple of this. The per-block metadata shards are 64 bytes, the
/// smallest unit the volume encodes; keeping the rule (rather than accepting any length, which
/// this GF(2^8) code could) keeps the door open to codecs that work on 64-byte words.
pub const SHARD_ALIGN: usize = 64;

/// Largest `k + m` the field allows.
pub const MAX_SHARDS: usize = 256;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ErasureError {
    #[error("unsupported code {k}+{m}")]
    Unsupported { k: usize, m: usize },
    #[error(
        "wrong number of shards, or shard lengths differ or are not a positive multiple of 64 bytes"
    )]
    BadShards,
    #[error("only {present} of the {needed} shards needed are present")]
    TooFewShards { present: usize, needed: usize },
}

/// A `k + m` Reed-Solomon code. Position-local: byte `o` of each parity shard depends only on
/// byte `o` of the data shards. Shareable between threads.
pub struct Codec {
    k: usize,
    m: usize,
    /// `None` when `m == 0`: there is nothing to compute.
    rs: Option<ReedSolomon>,
}

impl std::fmt::Debug for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Codec")
            .field("k", &self.k)
            .field("m", &self.m)
            .finish()
    }
}

impl Codec {
    /// A codec for `k` data and `m` parity shards. `Unsupported` unless `1 <= k` and
    /// `k + m <= 256`.
    pub fn new(k: usize, m: usize) -> Result<Self, ErasureError> {
        if k == 0 || k.checked_add(m).is_none_or(|n| n > MAX_SHARDS) {
            return Err(ErasureError::Unsupported { k, m });
        }
        let rs = if m == 0 {
            None
        } else {
            Some(ReedSolomon::new(k, m).map_err(|_| ErasureError::Unsupported { k, m })?)
        };
        Ok(Self { k, m, rs })
    }

    /// Data shards per stripe.
    pub fn data_shards(&self) -> usize {
        self.k
    }

    /// Parity shards per stripe.
    pub fn parity_shards(&self) -> usize {
        self.m
    }

    /// `data`: k shards, `parity`: m shards, all the same length (a multiple of 64).
    pub fn encode(&self, data: &[&[u8]], parity: &mut [&mut [u8]]) -> Result<(), ErasureError> {
        if data.len() != self.k || parity.len() != self.m {
            return Err(ErasureError::BadShards);
        }
        let len = data[0].len();
        check_len(len)?;
        if data.iter().any(|d| d.len() != len) || parity.iter().any(|p| p.len() != len) {
            return Err(ErasureError::BadShards);
        }
        match &self.rs {
            None => Ok(()),
            Some(rs) => rs
                .encode_sep(data, parity)
                .map_err(|_| ErasureError::BadShards),
        }
    }

    /// `shards`: all k + m shards in chunk order; `present[i] == false` marks shard `i` unknown.
    /// Fills every missing shard (data and parity) from any k present ones.
    pub fn reconstruct(
        &self,
        shards: &mut [&mut [u8]],
        present: &[bool],
    ) -> Result<(), ErasureError> {
        self.reconstruct_inner(shards, present, false)
    }

    /// Like [`Codec::reconstruct`], but fills only the missing *data* shards; missing parity
    /// shards are left as they were. A degraded read needs no more, and saves the work of
    /// re-encoding parity.
    pub fn reconstruct_data(
        &self,
        shards: &mut [&mut [u8]],
        present: &[bool],
    ) -> Result<(), ErasureError> {
        self.reconstruct_inner(shards, present, true)
    }

    fn reconstruct_inner(
        &self,
        shards: &mut [&mut [u8]],
        present: &[bool],
        data_only: bool,
    ) -> Result<(), ErasureError> {
        let n = self.k + self.m;
        if shards.len() != n || present.len() != n {
            return Err(ErasureError::BadShards);
        }
        let len = shards[0].len();
        check_len(len)?;
        if shards.iter().any(|s| s.len() != len) {
            return Err(ErasureError::BadShards);
        }
        let have = present.iter().filter(|&&p| p).count();
        if have < self.k {
            return Err(ErasureError::TooFewShards {
                present: have,
                needed: self.k,
            });
        }
        let missing_wanted = if data_only {
            present[..self.k].iter().any(|&p| !p)
        } else {
            have < n
        };
        if !missing_wanted {
            return Ok(());
        }
        // `have >= k` and something is missing, so `m > 0` and the coder exists.
        let Some(rs) = &self.rs else {
            return Err(ErasureError::TooFewShards {
                present: have,
                needed: n,
            });
        };
        let mut pairs: Vec<(&mut [u8], bool)> = shards
            .iter_mut()
            .zip(present)
            .map(|(s, &p)| (&mut **s, p))
            .collect();
        let result = if data_only {
            rs.reconstruct_data(&mut pairs)
        } else {
            rs.reconstruct(&mut pairs)
        };
        result.map_err(|e| match e {
            reed_solomon_erasure::Error::TooFewShardsPresent => ErasureError::TooFewShards {
                present: have,
                needed: self.k,
            },
            _ => ErasureError::BadShards,
        })
    }
}

fn check_len(len: usize) -> Result<(), ErasureError> {
    if len == 0 || !len.is_multiple_of(SHARD_ALIGN) {
        return Err(ErasureError::BadShards);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codec_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Codec>();
    }
}
