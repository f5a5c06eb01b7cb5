//! Crypto: AES-256-XTS per block, shard-key derivation, per-block tags, self-wiping key types.
//! (Interface; implementation to come.)

use std::sync::Arc;

use crate::layout::{ChunkIndex, StripeId};

#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("master key version {0} is not loaded")]
    UnknownVersion(u32),
    #[error("block buffer must be a non-empty multiple of 4096 bytes, got {0}")]
    BadLength(usize),
}

/// A 256-bit master key. Wiped on drop; `Debug` prints no key material.
pub struct MasterKey([u8; 32]);
impl MasterKey {
    pub fn from_bytes(b: [u8; 32]) -> Self { Self(b) }
    pub fn generate() -> Self { todo!() }
    pub fn expose(&self) -> &[u8; 32] { &self.0 }
}

/// AES-256-XTS keyed for one shard. Encrypts/decrypts whole 4 KiB blocks in place.
pub struct XtsCipher;
impl XtsCipher {
    /// `buf.len()` is a multiple of 4096; block `i` of `buf` uses tweak `first_tweak + i`.
    pub fn encrypt(&self, _first_tweak: u64, _buf: &mut [u8]) -> Result<(), CryptoError> { todo!() }
    pub fn decrypt(&self, _first_tweak: u64, _buf: &mut [u8]) -> Result<(), CryptoError> { todo!() }
}

/// Key for per-block integrity tags.
pub struct TagKey;
impl TagKey {
    /// 32-byte keyed tag over `header` (position, epoch, generation…) and `ciphertext`.
    pub fn tag(&self, _header: &[u8], _ciphertext: &[u8]) -> [u8; 32] { todo!() }
    pub fn verify(&self, _header: &[u8], _ciphertext: &[u8], _tag: &[u8; 32]) -> bool { todo!() }
}

/// What a shard key is derived for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ShardKeyId {
    pub version: u32,
    pub volume: u64,
    pub stripe: StripeId,
    pub chunk: ChunkIndex,
    pub epoch: u32,
}

/// Holds the unlocked master keys of a pool and derives (and caches) shard ciphers and tag keys.
pub struct KeyRing;
impl KeyRing {
    pub fn new(_pool_id: [u8; 16]) -> Self { todo!() }
    pub fn insert(&self, _version: u32, _key: MasterKey) { todo!() }
    pub fn shard_cipher(&self, _id: ShardKeyId) -> Result<Arc<XtsCipher>, CryptoError> { todo!() }
    pub fn tag_key(&self, _version: u32, _volume: u64) -> Result<Arc<TagKey>, CryptoError> { todo!() }
}
