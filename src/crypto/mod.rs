//! Crypto: AES-256-XTS per block, shard-key derivation, per-block tags, self-wiping key types.
//!
//! What this module promises to the layers above:
//! - [`XtsCipher`] encrypts and decrypts whole 4 KiB blocks in place, block `i` of a buffer with
//!   tweak `first_tweak + i` (the logical block number, IEEE 1619 data-unit sequence number);
//!   one cipher serves any number of threads at once ([`xts`]).
//! - [`KeyRing`] holds a pool's unlocked master keys and hands out the cipher of a shard
//!   ([`ShardKeyId`]: master version, volume, stripe, chunk, epoch) and the tag key of a
//!   (version, volume), derived by HKDF-SHA256 ([`kdf`]) and kept in bounded caches.
//! - [`TagKey::tag`] is a 32-byte keyed-BLAKE3 tag over a header and the ciphertext;
//!   [`TagKey::verify`] checks one in constant time ([`tag`]).
//! - Every key type ([`MasterKey`], [`XtsKey`], [`TagKey`], [`kdf::Prk`], and the key schedules
//!   inside [`XtsCipher`]) is wiped when dropped and prints `<redacted>` in `Debug`.
//! - Errors are values ([`CryptoError`]): a wrong buffer length, an unknown master version, a
//!   backend failure, a tag mismatch. No function here panics on bad input, except
//!   [`MasterKey::generate`] when the OS random generator fails ([`MasterKey::try_generate`]
//!   returns that error instead).
//!
//! Choices, with the figures measured by `benches/crypto.rs` (one core, CPU time, 4 KiB blocks,
//! on a loaded 2-core machine; full table and commands in `docs/crypto.md`):
//! - XTS backend: AWS-LC `EVP_aes_256_xts` with a reused context 11.4 GB/s (8.5 GB/s when a
//!   busy context forces a fresh one); pure Rust (`aes` 0.9, batched) 3.9 GB/s. AWS-LC is the
//!   default ([`XtsBackend::DEFAULT`]); the Rust backend stays selectable and passes the same
//!   vectors.
//! - Tag: keyed BLAKE3 2.7 GB/s versus HMAC-SHA256 1.4 GB/s; XTS + tag 2.25 GB/s.
//! - Derivation: HKDF-Extract once per master version (0.4 µs), HKDF-Expand per shard key
//!   (0.55 µs); a key-ring cache hit costs 0.06 µs.
//!
//! `unsafe`: forbidden in every file of this module except `xts_aws_lc.rs`, the FFI wrapper of
//! AWS-LC's EVP XTS, where each block carries a `// SAFETY:` comment. The module as a whole is
//! `deny(unsafe_code)`, that one file opts out, and the others `forbid` it.
//!
//! Assumptions: the caller records each block's master version and epoch next to it (the per-block
//! metadata), so that the right key can be asked for on read; AWS-LC and the `aes` crate pick
//! their AES instructions (AES-NI, VAES) at run time, so one binary serves any x86-64 CPU.

#![deny(unsafe_code)]

pub mod kdf;
mod keys;
mod ring;
pub mod tag;
pub mod xts;
mod xts_aws_lc;

#[cfg(test)]
mod tests;

pub use keys::{MasterKey, XtsKey};
pub use ring::{CACHE_SHARDS, CIPHER_CACHE_ENTRIES, KeyRing, TAG_CACHE_ENTRIES};
pub use tag::{TAG_LEN, TagKey};
pub use xts::{XtsBackend, XtsCipher};

use crate::layout::{ChunkIndex, StripeId};

/// Errors of the crypto layer. None of them carries key material.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("master key version {0} is not loaded")]
    UnknownVersion(u32),
    #[error("block buffer must be a non-empty multiple of 4096 bytes, got {0}")]
    BadLength(usize),
    #[error(
        "XTS data unit must be a multiple of 16 bytes from 16 bytes to 16 MiB and the buffer a \
         non-empty multiple of it; got unit {unit}, buffer {len}"
    )]
    BadDataUnit { unit: usize, len: usize },
    #[error("XTS key has equal halves (IEEE 1619 forbids it)")]
    WeakXtsKey,
    #[error("HKDF length {0} out of range")]
    BadKdfLength(usize),
    #[error("integrity tag does not match")]
    TagMismatch,
    #[error("AES-XTS backend failure in {op} (AWS-LC error {code:#x})")]
    Backend { op: &'static str, code: u32 },
    #[error("OS random generator failed: {0}")]
    Random(String),
}

/// What a shard key is derived for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ShardKeyId {
    /// Master-key version (selects the HKDF input key).
    pub version: u32,
    pub volume: u64,
    pub stripe: StripeId,
    pub chunk: ChunkIndex,
    pub epoch: u32,
}
