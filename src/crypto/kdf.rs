//! Key derivation: HKDF-SHA256 (RFC 5869) from a master key to shard keys and tag keys.
//!
//! ```text
//! PRK_v       = HKDF-Extract(salt = pool id (16 bytes), IKM = master key v (32 bytes))
//! shard key   = HKDF-Expand(PRK_v, shard_info(id), 64)   → AES-256-XTS data key ‖ tweak key
//! tag key     = HKDF-Expand(PRK_v, tag_info(volume), 32) → keyed-BLAKE3 key
//! audit key   = HKDF-Expand(PRK_v, AUDIT_KEY_LABEL, 32)  → keyed-BLAKE3 key of the audit log's MACs
//! ```
//!
//! `shard_info` (38 bytes) = [`SHARD_KEY_LABEL`] (16) ‖ volume id (u64 BE) ‖ stripe (u64 BE) ‖
//! chunk index (u16 BE) ‖ epoch (u32 BE). `tag_info` (24 bytes) = [`TAG_KEY_LABEL`] (16) ‖
//! volume id (u64 BE). The audit key's `info` is [`AUDIT_KEY_LABEL`] alone (16 bytes). The
//! master-key version is not in `info`: it selects the IKM. Every field has a fixed width, the
//! three labels differ and the three infos differ in length, so no two distinct
//! (purpose, fields) tuples share an `info`, and keys for different purposes, volumes,
//! stripes, chunks or epochs are independent. These layouts are part of the on-disk format:
//! changing one makes existing volumes unreadable (change the label to version them).
//!
//! [`Prk`] holds HMAC-SHA256 already keyed with `PRK_v` (the extract step and the HMAC key
//! schedule are done once per master version, not per derivation). It is wiped on drop
//! (`sha2`'s `zeroize` feature wipes the HMAC states); derived keys are written straight into
//! self-wiping boxes.

#![forbid(unsafe_code)]

use std::fmt;

use hkdf::Hkdf;
use sha2::Sha256;
use zeroize::Zeroize;

use super::keys::Secret;
use super::{CryptoError, MasterKey, ShardKeyId, TagKey, XtsKey};

/// Domain label of shard (XTS) keys, first 16 bytes of their HKDF `info`.
pub const SHARD_KEY_LABEL: [u8; 16] = *b"shardvol/xts-key";
/// Domain label of tag keys, first 16 bytes of their HKDF `info`.
pub const TAG_KEY_LABEL: [u8; 16] = *b"shardvol/tag-key";
/// Length of [`shard_info`].
pub const SHARD_INFO_LEN: usize = 16 + 8 + 8 + 2 + 4;
/// Length of [`tag_info`].
pub const TAG_INFO_LEN: usize = 16 + 8;
/// Domain label of the audit log's MAC key; it is the whole HKDF `info` of that key (16 bytes,
/// a length no other `info` has).
pub const AUDIT_KEY_LABEL: [u8; 16] = *b"shardvol/aud-key";

/// HKDF `info` of a shard key: label ‖ volume ‖ stripe ‖ chunk ‖ epoch, big-endian.
pub fn shard_info(id: &ShardKeyId) -> [u8; SHARD_INFO_LEN] {
    let mut info = [0u8; SHARD_INFO_LEN];
    info[..16].copy_from_slice(&SHARD_KEY_LABEL);
    info[16..24].copy_from_slice(&id.volume.to_be_bytes());
    info[24..32].copy_from_slice(&id.stripe.0.to_be_bytes());
    info[32..34].copy_from_slice(&id.chunk.0.to_be_bytes());
    info[34..38].copy_from_slice(&id.epoch.to_be_bytes());
    info
}

/// HKDF `info` of a tag key: label ‖ volume, big-endian.
pub fn tag_info(volume: u64) -> [u8; TAG_INFO_LEN] {
    let mut info = [0u8; TAG_INFO_LEN];
    info[..16].copy_from_slice(&TAG_KEY_LABEL);
    info[16..].copy_from_slice(&volume.to_be_bytes());
    info
}

/// An HKDF-SHA256 pseudorandom key, ready to expand. Wiped on drop; `Debug` prints nothing.
pub struct Prk(Hkdf<Sha256>);

impl Prk {
    /// RFC 5869 HKDF-Extract. An empty `salt` is the RFC's "not provided" (HashLen zero bytes:
    /// HMAC pads short keys with zeros, so both give the same PRK).
    pub fn extract(salt: &[u8], ikm: &[u8]) -> Self {
        let (mut prk, hkdf) = Hkdf::<Sha256>::extract(Some(salt), ikm);
        prk.as_mut_slice().zeroize();
        Self(hkdf)
    }

    /// The PRK of master key `master` in pool `pool_id` (salt = pool id).
    pub fn for_master(pool_id: &[u8; 16], master: &MasterKey) -> Self {
        Self::extract(pool_id, master.expose())
    }

    /// A PRK given as bytes (RFC 5869 section 3.3); at least 32 bytes.
    pub fn from_bytes(prk: &[u8]) -> Result<Self, CryptoError> {
        Hkdf::<Sha256>::from_prk(prk)
            .map(Self)
            .map_err(|_| CryptoError::BadKdfLength(prk.len()))
    }

    /// RFC 5869 HKDF-Expand into `out` (at most 255 × 32 bytes).
    pub fn expand(&self, info: &[u8], out: &mut [u8]) -> Result<(), CryptoError> {
        self.0
            .expand(info, out)
            .map_err(|_| CryptoError::BadKdfLength(out.len()))
    }

    /// The 64-byte AES-256-XTS key of shard `id` (`id.version` is not used: it chose `self`).
    /// Fails only if the two halves come out equal ([`CryptoError::WeakXtsKey`]).
    pub fn shard_key(&self, id: &ShardKeyId) -> Result<XtsKey, CryptoError> {
        let mut okm = Secret::<64>::zeroed();
        self.expand(&shard_info(id), okm.bytes_mut())?;
        XtsKey::from_secret(okm)
    }

    /// The tag key of `volume`.
    pub fn tag_key(&self, volume: u64) -> Result<TagKey, CryptoError> {
        let mut okm = Secret::<32>::zeroed();
        self.expand(&tag_info(volume), okm.bytes_mut())?;
        Ok(TagKey::from_secret(okm))
    }

    /// The audit log's MAC key under this master version: HKDF-Expand(PRK_v,
    /// [`AUDIT_KEY_LABEL`], 32), used as a keyed-BLAKE3 key (see `crate::audit`).
    pub fn audit_key(&self) -> Result<TagKey, CryptoError> {
        let mut okm = Secret::<32>::zeroed();
        self.expand(&AUDIT_KEY_LABEL, okm.bytes_mut())?;
        Ok(TagKey::from_secret(okm))
    }
}

impl fmt::Debug for Prk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Prk(<redacted>)")
    }
}
