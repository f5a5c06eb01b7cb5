//! AES-256-XTS through AWS-LC's `EVP_aes_256_xts`: the only file of `crypto` with `unsafe`.
//!
//! [`EvpXts`] owns one `EVP_CIPHER_CTX` keyed for one direction. Its contract, from AWS-LC's
//! `e_aes.c` and `cipher.c` (version pinned by `aws-lc-sys` 0.47):
//! - `EVP_CipherInit_ex(ctx, NULL, NULL, NULL, iv, -1)` on a keyed context only copies the
//!   16-byte IV (the XTS tweak) and allows one more data unit; the key schedule is kept;
//! - one `EVP_CipherUpdate` processes exactly one data unit (≥ 16 bytes, ≤ 2^20 AES blocks) and
//!   supports `in == out`; a second update without a new IV fails;
//! - the key must have two different 256-bit halves (AWS-LC checks it too);
//! - `EVP_CIPHER_CTX_free` wipes the key schedule (`OPENSSL_free` cleanses before freeing).
//!
//! A context is mutable state (IV, "unit processed" flag), so [`EvpXts::process`] takes
//! `&mut self`; sharing between threads is arranged by the safe caller
//! ([`super::xts`]). Every return code is checked; a failure becomes
//! [`CryptoError::Backend`] with AWS-LC's packed error code, and AWS-LC's thread-local error queue
//! is cleared so that old errors never leak into later reports.

#![allow(unsafe_code)]

use std::os::raw::c_int;
use std::ptr::{self, NonNull};

use aws_lc_sys as ffi;

use super::CryptoError;

/// Largest data unit AWS-LC accepts: 2^20 AES blocks (IEEE 1619-2018, NIST SP 800-38E).
pub(crate) const MAX_DATA_UNIT: usize = (1 << 20) * 16;

/// One owned, keyed AWS-LC XTS context for one direction.
pub(crate) struct EvpXts {
    ctx: NonNull<ffi::EVP_CIPHER_CTX>,
}

// SAFETY: `EvpXts` owns its context exclusively (it is never aliased: no `Clone`, the pointer
// never escapes), and AWS-LC contexts have no thread affinity, so moving one to another thread is
// sound. It is deliberately not `Sync`: `process` mutates the context.
unsafe impl Send for EvpXts {}

/// Takes AWS-LC's oldest queued error for this thread, and clears the queue.
fn take_error(op: &'static str) -> CryptoError {
    // SAFETY: reads and pops AWS-LC's thread-local error queue; no arguments, no pointers.
    let code = unsafe { ffi::ERR_get_error() };
    // SAFETY: empties AWS-LC's thread-local error queue; no arguments, no pointers.
    unsafe { ffi::ERR_clear_error() };
    CryptoError::Backend { op, code }
}

impl EvpXts {
    /// A context keyed with `key` (data key ‖ tweak key) for encryption (`encrypt`) or
    /// decryption.
    pub(crate) fn new(key: &[u8; 64], encrypt: bool) -> Result<Self, CryptoError> {
        // SAFETY: `EVP_CIPHER_CTX_new` has no preconditions; it returns NULL on allocation
        // failure, which is checked below.
        let raw = unsafe { ffi::EVP_CIPHER_CTX_new() };
        let ctx = NonNull::new(raw).ok_or_else(|| take_error("EVP_CIPHER_CTX_new"))?;
        // From here on `this` owns the context and frees it on every path.
        let this = Self { ctx };
        // SAFETY: no arguments; returns a pointer to a static, immutable method table.
        let method = unsafe { ffi::EVP_aes_256_xts() };
        // SAFETY: `ctx` is a valid, freshly initialised context; `method` is AWS-LC's static
        // AES-256-XTS table; `key` points to 64 readable bytes, the key length of AES-256-XTS; a
        // NULL engine and a NULL IV are allowed (the IV is set per data unit).
        let rc = unsafe {
            ffi::EVP_CipherInit_ex(
                this.ctx.as_ptr(),
                method,
                ptr::null_mut(),
                key.as_ptr(),
                ptr::null(),
                c_int::from(encrypt),
            )
        };
        if rc != 1 {
            return Err(take_error("EVP_CipherInit_ex(key)"));
        }
        Ok(this)
    }

    /// Encrypts or decrypts (as keyed) one data unit in place under the 16-byte tweak `iv`.
    ///
    /// `unit.len()` must be a multiple of 16 between 16 and [`MAX_DATA_UNIT`]; the caller
    /// checks it, and AWS-LC refuses other lengths with an error (never undefined behaviour).
    pub(crate) fn process(&mut self, iv: &[u8; 16], unit: &mut [u8]) -> Result<(), CryptoError> {
        let len = c_int::try_from(unit.len()).map_err(|_| CryptoError::BadDataUnit {
            unit: unit.len(),
            len: unit.len(),
        })?;
        // SAFETY: `self.ctx` is a valid keyed context owned by `self`, and `&mut self` makes this
        // the only use of it right now; `iv` points to 16 readable bytes, the XTS IV length;
        // cipher NULL keeps the method, key NULL keeps the key schedule, enc -1 keeps the
        // direction.
        let rc = unsafe {
            ffi::EVP_CipherInit_ex(
                self.ctx.as_ptr(),
                ptr::null(),
                ptr::null_mut(),
                ptr::null(),
                iv.as_ptr(),
                -1,
            )
        };
        if rc != 1 {
            return Err(take_error("EVP_CipherInit_ex(iv)"));
        }
        let mut out_len: c_int = 0;
        let buf = unit.as_mut_ptr();
        // SAFETY: `buf` points to `len` bytes that are readable and writable through the
        // exclusive borrow `unit`; AES-XTS (block size 1 in EVP terms) writes exactly `len`
        // bytes and supports in-place operation (`out == in`); `out_len` is a valid `c_int`.
        let rc = unsafe {
            ffi::EVP_CipherUpdate(self.ctx.as_ptr(), buf, &mut out_len, buf.cast_const(), len)
        };
        if rc != 1 {
            return Err(take_error("EVP_CipherUpdate"));
        }
        if out_len != len {
            return Err(CryptoError::Backend {
                op: "EVP_CipherUpdate(short output)",
                code: 0,
            });
        }
        Ok(())
    }
}

impl Drop for EvpXts {
    fn drop(&mut self) {
        // SAFETY: `self.ctx` was returned by `EVP_CIPHER_CTX_new`, is owned by `self` and is
        // freed exactly once, here. `EVP_CIPHER_CTX_free` wipes the context and its key schedule.
        unsafe { ffi::EVP_CIPHER_CTX_free(self.ctx.as_ptr()) }
    }
}
