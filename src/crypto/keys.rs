//! Key types that wipe themselves.
//!
//! Every secret of this module lives in a [`Secret`]: a heap box (so that moving the owner never
//! leaves a copy of the bytes behind on the stack) that is overwritten with zeros when dropped
//! (`zeroize`, volatile writes the optimiser cannot remove) and whose `Debug` prints only
//! `<redacted>`. The public key types ([`MasterKey`], [`XtsKey`], and [`TagKey`](super::TagKey)
//! and [`Prk`](super::kdf::Prk) in their modules) are thin wrappers around it.
//!
//! What this cannot wipe: copies the caller made before handing the bytes over (`from_bytes`
//! wipes its own by-value argument, not the caller's original), and key schedules held by the
//! AES backends, which wipe themselves (see the module docs of [`crate::crypto`]).

#![forbid(unsafe_code)]

use std::fmt;

use rand::TryRng;
use rand::rngs::SysRng;
use zeroize::Zeroize;

use super::CryptoError;

/// `N` secret bytes on the heap, wiped on drop, redacted in `Debug`.
pub(crate) struct Secret<const N: usize>(Box<[u8; N]>);

impl<const N: usize> Secret<N> {
    /// Copies `bytes` into a fresh box and wipes the by-value argument.
    pub(crate) fn from_array(mut bytes: [u8; N]) -> Self {
        let mut boxed = Box::new([0u8; N]);
        boxed.copy_from_slice(&bytes);
        bytes.zeroize();
        Self(boxed)
    }

    /// `N` zero bytes, to be filled in place (so that no copy of the secret is left on the
    /// stack).
    pub(crate) fn zeroed() -> Self {
        Self(Box::new([0u8; N]))
    }

    /// Fills `N` bytes from the operating system's random generator.
    pub(crate) fn random() -> Result<Self, CryptoError> {
        let mut boxed = Box::new([0u8; N]);
        SysRng
            .try_fill_bytes(&mut boxed[..])
            .map_err(|e| CryptoError::Random(e.to_string()))?;
        Ok(Self(boxed))
    }

    pub(crate) fn bytes(&self) -> &[u8; N] {
        &self.0
    }

    pub(crate) fn bytes_mut(&mut self) -> &mut [u8; N] {
        &mut self.0
    }
}

impl<const N: usize> Drop for Secret<N> {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl<const N: usize> fmt::Debug for Secret<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A 256-bit master key. Wiped on drop; `Debug` prints no key material.
///
/// Shard keys and tag keys are derived from it (see [`super::kdf`]); the key itself never
/// encrypts data.
pub struct MasterKey(Secret<32>);

impl MasterKey {
    /// Takes ownership of `b`; the argument's stack copy is wiped, the caller's original is not.
    pub fn from_bytes(b: [u8; 32]) -> Self {
        Self(Secret::from_array(b))
    }

    /// A fresh key from the operating system's random generator.
    ///
    /// # Panics
    /// If the operating system cannot provide random bytes (`getrandom` fails), which leaves no
    /// safe way to make a key; use [`MasterKey::try_generate`] to handle that case.
    pub fn generate() -> Self {
        match Self::try_generate() {
            Ok(k) => k,
            Err(e) => panic!("{e}"),
        }
    }

    /// A fresh key from the operating system's random generator, or the generator's error.
    pub fn try_generate() -> Result<Self, CryptoError> {
        Secret::random().map(Self)
    }

    /// The key bytes, for wrapping by the KMS. Do not copy them into a type that is not wiped.
    pub fn expose(&self) -> &[u8; 32] {
        self.0.bytes()
    }
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MasterKey(<redacted>)")
    }
}

/// A 512-bit AES-256-XTS key: data key (first half) then tweak key (second half).
///
/// IEEE 1619 requires the two halves to differ; the constructors refuse equal halves with
/// [`CryptoError::WeakXtsKey`] (for a derived key this happens with probability 2^-256, so in
/// practice it flags a broken derivation or a test key).
pub struct XtsKey(Secret<64>);

impl XtsKey {
    /// Takes ownership of `b` (data key ‖ tweak key); the argument's stack copy is wiped.
    pub fn from_bytes(b: [u8; 64]) -> Result<Self, CryptoError> {
        Self::from_secret(Secret::from_array(b))
    }

    pub(crate) fn from_secret(s: Secret<64>) -> Result<Self, CryptoError> {
        let (k1, k2) = s.bytes().split_at(32);
        // Constant time: the comparison must not tell a timing observer how many leading bytes
        // of the two halves agree.
        let diff = k1.iter().zip(k2).fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if std::hint::black_box(diff) == 0 {
            return Err(CryptoError::WeakXtsKey);
        }
        Ok(Self(s))
    }

    /// Data key ‖ tweak key.
    pub(crate) fn bytes(&self) -> &[u8; 64] {
        self.0.bytes()
    }

    /// The data key (`Key1` of IEEE 1619).
    pub(crate) fn data_key(&self) -> &[u8] {
        &self.0.bytes()[..32]
    }

    /// The tweak key (`Key2` of IEEE 1619).
    pub(crate) fn tweak_key(&self) -> &[u8] {
        &self.0.bytes()[32..]
    }
}

impl fmt::Debug for XtsKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("XtsKey(<redacted>)")
    }
}
