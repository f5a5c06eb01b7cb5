//! AES-256-XTS (IEEE 1619) over whole data units, with two interchangeable backends.
//!
//! Contract of [`XtsCipher`]:
//! - [`XtsCipher::encrypt`] / [`XtsCipher::decrypt`] take a non-empty multiple of 4096 bytes;
//!   4 KiB block `i` of the buffer is one XTS data unit with tweak `first_tweak + i` (the
//!   logical block number), encoded as IEEE 1619's data-unit sequence number: a 128-bit
//!   little-endian integer. The sum is computed in 128 bits, so it never wraps.
//! - [`XtsCipher::encrypt_units`] / [`XtsCipher::decrypt_units`] do the same for any data-unit
//!   length that is a multiple of 16 bytes between 16 bytes and 16 MiB (2^20 AES blocks, the
//!   IEEE 1619-2018 limit); the published test vectors use 512-byte units. Ciphertext stealing
//!   is not implemented: it is only needed for units that are not a multiple of 16 bytes.
//! - Buffers are processed in place. A wrong length is refused before anything is touched; a
//!   backend failure (an AWS-LC return code other than success) is returned as
//!   [`CryptoError::Backend`] and may leave the buffer partly processed. Nothing panics.
//! - `XtsCipher` is `Send + Sync`; any number of threads may use one cipher at once.
//!
//! Backends ([`XtsBackend`]), measured in `benches/crypto.rs` (see `docs/crypto.md`):
//! - [`XtsBackend::AwsLc`] (default): AWS-LC's `EVP_aes_256_xts` (AES-NI, VAES/AVX-512 when
//!   the CPU has them, chosen at run time). An EVP context carries per-call state (the tweak),
//!   so each cipher keeps one context per direction behind a `Mutex` taken with `try_lock`;
//!   a thread that finds it busy keys a private context for its call instead of waiting
//!   (the cost of [`XtsBackend::AwsLcFreshContext`]). Contexts are made on first use, so a
//!   cipher that only encrypts holds no decryption schedule.
//! - [`XtsBackend::AwsLcFreshContext`]: a new AWS-LC context for every call (no per-cipher
//!   state beyond the key); kept to measure the fallback path.
//! - [`XtsBackend::RustCrypto`]: pure Rust, `aes` 0.9 `encrypt_blocks` over batches of
//!   [`SOFT_BATCH_BLOCKS`] tweak-masked blocks; immutable key schedules, no locking.

#![forbid(unsafe_code)]

use std::fmt;
use std::sync::{Mutex, TryLockError};

use aes::cipher::{Array, BlockCipherDecrypt, BlockCipherEncrypt, KeyInit};
use aes::{Aes256, Aes256Enc};

use super::xts_aws_lc::{EvpXts, MAX_DATA_UNIT};
use super::{CryptoError, XtsKey};
use crate::layout::BLOCK_SIZE;

/// AES blocks masked and ciphered per `encrypt_blocks` call by the pure-Rust backend: one whole
/// 4 KiB block, because the `aes` crate's VAES-512 path pays a fixed cost per call (it
/// broadcasts the round keys); the mask array (16 bytes per block, 4 KiB) lives on the stack.
pub const SOFT_BATCH_BLOCKS: usize = 256;

/// Which implementation of AES-256-XTS a cipher uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum XtsBackend {
    /// AWS-LC `EVP_aes_256_xts`, one reusable context per direction per cipher.
    AwsLc,
    /// AWS-LC `EVP_aes_256_xts`, a new context keyed for every call.
    AwsLcFreshContext,
    /// Pure Rust over the `aes` crate.
    RustCrypto,
}

impl XtsBackend {
    /// The backend [`XtsCipher::new`] and the key ring use: the fastest on the measurements of
    /// `docs/crypto.md`.
    pub const DEFAULT: XtsBackend = XtsBackend::AwsLc;
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    Encrypt,
    Decrypt,
}

/// AES-256-XTS keyed for one shard. Encrypts/decrypts whole data units in place.
pub struct XtsCipher {
    engine: Engine,
}

enum Engine {
    AwsLc {
        key: XtsKey,
        enc: Mutex<Option<EvpXts>>,
        dec: Mutex<Option<EvpXts>>,
    },
    AwsLcFresh {
        key: XtsKey,
    },
    Soft(Box<SoftXts>),
}

impl XtsCipher {
    /// A cipher on the default backend ([`XtsBackend::DEFAULT`]).
    pub fn new(key: XtsKey) -> Result<Self, CryptoError> {
        Self::with_backend(key, XtsBackend::DEFAULT)
    }

    /// A cipher on `backend`. Fails only if the backend refuses the key.
    pub fn with_backend(key: XtsKey, backend: XtsBackend) -> Result<Self, CryptoError> {
        let engine = match backend {
            XtsBackend::AwsLc => {
                // Key one context now so that a key AWS-LC refuses is reported here, not on
                // first use; the decryption context is made when first needed.
                let enc = EvpXts::new(key.bytes(), true)?;
                Engine::AwsLc {
                    key,
                    enc: Mutex::new(Some(enc)),
                    dec: Mutex::new(None),
                }
            }
            XtsBackend::AwsLcFreshContext => {
                EvpXts::new(key.bytes(), true)?;
                Engine::AwsLcFresh { key }
            }
            XtsBackend::RustCrypto => Engine::Soft(Box::new(SoftXts::new(&key)?)),
        };
        Ok(Self { engine })
    }

    /// The backend this cipher runs on.
    pub fn backend(&self) -> XtsBackend {
        match self.engine {
            Engine::AwsLc { .. } => XtsBackend::AwsLc,
            Engine::AwsLcFresh { .. } => XtsBackend::AwsLcFreshContext,
            Engine::Soft(_) => XtsBackend::RustCrypto,
        }
    }

    /// `buf.len()` is a non-empty multiple of 4096; block `i` of `buf` uses tweak
    /// `first_tweak + i`.
    pub fn encrypt(&self, first_tweak: u64, buf: &mut [u8]) -> Result<(), CryptoError> {
        check_blocks(buf)?;
        self.run(Direction::Encrypt, BLOCK_SIZE, first_tweak, buf)
    }

    /// Inverse of [`XtsCipher::encrypt`].
    pub fn decrypt(&self, first_tweak: u64, buf: &mut [u8]) -> Result<(), CryptoError> {
        check_blocks(buf)?;
        self.run(Direction::Decrypt, BLOCK_SIZE, first_tweak, buf)
    }

    /// Encrypts `buf` as consecutive data units of `unit_len` bytes, unit `i` with tweak
    /// `first_tweak + i`. `unit_len` is a multiple of 16 in `16..=16 MiB`; `buf.len()` a
    /// non-zero multiple of `unit_len`.
    pub fn encrypt_units(
        &self,
        unit_len: usize,
        first_tweak: u64,
        buf: &mut [u8],
    ) -> Result<(), CryptoError> {
        check_units(unit_len, buf)?;
        self.run(Direction::Encrypt, unit_len, first_tweak, buf)
    }

    /// Inverse of [`XtsCipher::encrypt_units`].
    pub fn decrypt_units(
        &self,
        unit_len: usize,
        first_tweak: u64,
        buf: &mut [u8],
    ) -> Result<(), CryptoError> {
        check_units(unit_len, buf)?;
        self.run(Direction::Decrypt, unit_len, first_tweak, buf)
    }

    /// Lengths are checked by the callers.
    fn run(
        &self,
        dir: Direction,
        unit_len: usize,
        first_tweak: u64,
        buf: &mut [u8],
    ) -> Result<(), CryptoError> {
        let units = buf.chunks_exact_mut(unit_len).zip(tweaks(first_tweak));
        match &self.engine {
            Engine::AwsLc { key, enc, dec } => {
                let slot = if dir == Direction::Encrypt { enc } else { dec };
                match slot.try_lock() {
                    Ok(mut guard) => run_evp(shared_context(&mut guard, key, dir)?, units),
                    // A panic cannot happen while the lock is held (`process` returns errors),
                    // but a poisoned context would still be whole: use it.
                    Err(TryLockError::Poisoned(p)) => {
                        let mut guard = p.into_inner();
                        run_evp(shared_context(&mut guard, key, dir)?, units)
                    }
                    // Another thread is using the shared context: key a private one rather
                    // than wait (re-keying costs less than a 4 KiB block).
                    Err(TryLockError::WouldBlock) => run_evp(
                        &mut EvpXts::new(key.bytes(), dir == Direction::Encrypt)?,
                        units,
                    ),
                }
            }
            Engine::AwsLcFresh { key } => run_evp(
                &mut EvpXts::new(key.bytes(), dir == Direction::Encrypt)?,
                units,
            ),
            Engine::Soft(soft) => {
                for (unit, tweak) in units {
                    soft.process(dir, tweak, unit);
                }
                Ok(())
            }
        }
    }
}

/// Tweak of unit `i`: `first + i`, as the 16-byte little-endian data-unit sequence number.
fn tweaks(first: u64) -> impl Iterator<Item = [u8; 16]> {
    (u128::from(first)..).map(u128::to_le_bytes)
}

fn shared_context<'a>(
    slot: &'a mut Option<EvpXts>,
    key: &XtsKey,
    dir: Direction,
) -> Result<&'a mut EvpXts, CryptoError> {
    match slot {
        Some(ctx) => Ok(ctx),
        None => Ok(slot.insert(EvpXts::new(key.bytes(), dir == Direction::Encrypt)?)),
    }
}

fn run_evp<'b>(
    ctx: &mut EvpXts,
    units: impl Iterator<Item = (&'b mut [u8], [u8; 16])>,
) -> Result<(), CryptoError> {
    for (unit, tweak) in units {
        ctx.process(&tweak, unit)?;
    }
    Ok(())
}

fn check_blocks(buf: &[u8]) -> Result<(), CryptoError> {
    if buf.is_empty() || !buf.len().is_multiple_of(BLOCK_SIZE) {
        return Err(CryptoError::BadLength(buf.len()));
    }
    Ok(())
}

fn check_units(unit_len: usize, buf: &[u8]) -> Result<(), CryptoError> {
    let unit_ok = (16..=MAX_DATA_UNIT).contains(&unit_len) && unit_len.is_multiple_of(16);
    if !unit_ok || buf.is_empty() || !buf.len().is_multiple_of(unit_len) {
        return Err(CryptoError::BadDataUnit {
            unit: unit_len,
            len: buf.len(),
        });
    }
    Ok(())
}

impl fmt::Debug for XtsCipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("XtsCipher")
            .field("backend", &self.backend())
            .field("key", &format_args!("<redacted>"))
            .finish()
    }
}

/// Pure-Rust XTS: data-key schedule (both directions) and tweak-key schedule (encryption only).
/// The `aes` crate wipes both on drop (its `zeroize` feature).
struct SoftXts {
    data: Aes256,
    tweak: Aes256Enc,
}

/// Multiplication by the primitive element α of GF(2^128) in IEEE 1619's little-endian
/// convention: shift left by one bit, and fold the carry out of bit 127 back in as x^7+x^2+x+1.
fn mul_alpha(t: u128) -> u128 {
    (t << 1) ^ ((t >> 127) * 0x87)
}

/// Multiplication by α^8: shift left by one byte and fold the byte shifted out, `c`, back in as
/// c·(x^7+x^2+x+1) (at most 15 bits, so the fold cannot overflow again).
fn mul_alpha8(t: u128) -> u128 {
    let c = t >> 120;
    (t << 8) ^ c ^ (c << 1) ^ (c << 2) ^ (c << 7)
}

/// Tweak masks are made in [`MASK_LANES`] independent chains (block `j + 8` from block `j` by
/// α^8) rather than one chain of α steps: one long dependency chain of 128-bit shifts costs more
/// than the AES rounds themselves.
const MASK_LANES: usize = 8;
const _: () = assert!(SOFT_BATCH_BLOCKS.is_multiple_of(MASK_LANES));

impl SoftXts {
    fn new(key: &XtsKey) -> Result<Self, CryptoError> {
        let bad_key = |_| CryptoError::Backend {
            op: "aes key schedule",
            code: 0,
        };
        Ok(Self {
            data: Aes256::new_from_slice(key.data_key()).map_err(bad_key)?,
            tweak: Aes256Enc::new_from_slice(key.tweak_key()).map_err(bad_key)?,
        })
    }

    /// One data unit (a multiple of 16 bytes, checked by the caller) under `tweak`.
    fn process(&self, dir: Direction, tweak: [u8; 16], unit: &mut [u8]) {
        let mut t = Array(tweak);
        self.tweak.encrypt_block(&mut t);
        // lanes[i] = tweak mask of the next block at index ≡ i (mod MASK_LANES).
        let mut lanes = [0u128; MASK_LANES];
        lanes[0] = u128::from_le_bytes(t.0);
        for i in 1..MASK_LANES {
            lanes[i] = mul_alpha(lanes[i - 1]);
        }
        let mut masks = [0u128; SOFT_BATCH_BLOCKS];
        let (blocks, _partial) = Array::slice_as_chunks_mut(unit);
        for batch in blocks.chunks_mut(SOFT_BATCH_BLOCKS) {
            for group in
                masks[..batch.len().next_multiple_of(MASK_LANES)].chunks_exact_mut(MASK_LANES)
            {
                for (mask, lane) in group.iter_mut().zip(lanes.iter_mut()) {
                    *mask = *lane;
                    *lane = mul_alpha8(*lane);
                }
            }
            for (block, mask) in batch.iter_mut().zip(&masks) {
                block.0 = (u128::from_le_bytes(block.0) ^ mask).to_le_bytes();
            }
            match dir {
                Direction::Encrypt => self.data.encrypt_blocks(batch),
                Direction::Decrypt => self.data.decrypt_blocks(batch),
            }
            for (block, mask) in batch.iter_mut().zip(&masks) {
                block.0 = (u128::from_le_bytes(block.0) ^ mask).to_le_bytes();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mul_alpha8_is_eight_mul_alpha() {
        let mut t: u128 = 0x8000_0000_0000_0000_0000_0000_0000_0001;
        for _ in 0..1000 {
            let eight = (0..8).fold(t, |x, _| mul_alpha(x));
            assert_eq!(mul_alpha8(t), eight, "{t:#x}");
            // Walk through values with all top-byte patterns.
            t = t
                .wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835)
                .rotate_left(13)
                ^ 0xff << 120;
        }
        assert_eq!(mul_alpha(1 << 127), 0x87);
    }
}
