//! Wrapping of master keys by the KEK: AES-256-GCM, byte layout in `docs/keys.md`.

use aes_gcm::Aes256Gcm;
use aes_gcm::aead::{Aead, KeyInit, Nonce, Payload};
use zeroize::{Zeroize, Zeroizing};

use super::{Kek, KmsError};
use crate::crypto::MasterKey;

/// First bytes of the associated data of every wrap: names what the ciphertext is, so that a
/// GCM ciphertext made by the same KEK for another purpose can never pass as a wrapped master key.
/// Fixed length, so label ‖ pool id ‖ version parses one way only.
pub const WRAP_AAD_LABEL: &[u8; 28] = b"shardvol master key wrap v1\0";

const NONCE_LEN: usize = 12;
const KEY_LEN: usize = 32;
const TAG_LEN: usize = 16;
/// Length of a wrapped master key: nonce ‖ ciphertext ‖ tag.
pub const WRAPPED_LEN: usize = NONCE_LEN + KEY_LEN + TAG_LEN;

/// AAD = label ‖ pool id ‖ version (u32 little-endian).
fn aad(pool_id: [u8; 16], version: u32) -> [u8; 28 + 16 + 4] {
    let mut a = [0u8; 48];
    a[..28].copy_from_slice(WRAP_AAD_LABEL);
    a[28..44].copy_from_slice(&pool_id);
    a[44..].copy_from_slice(&version.to_le_bytes());
    a
}

fn cipher(kek: &Kek) -> Aes256Gcm {
    // The cipher's key schedule is wiped when it drops (aes-gcm's `zeroize` feature).
    Aes256Gcm::new(kek.expose().into())
}

/// Wraps master key `key` (version `version` of pool `pool_id`) under `kek`.
/// Returns nonce (12 bytes, random) ‖ ciphertext (32) ‖ tag (16).
pub fn wrap_master(kek: &Kek, key: &MasterKey, pool_id: [u8; 16], version: u32) -> Vec<u8> {
    let mut nonce = [0u8; NONCE_LEN];
    rand::fill(&mut nonce[..]);
    let aad = aad(pool_id, version);
    let sealed = cipher(kek)
        .encrypt(
            &Nonce::<Aes256Gcm>::from(nonce),
            Payload {
                msg: key.expose(),
                aad: &aad,
            },
        )
        // AES-GCM fails only for messages or AAD over 2^36 bytes; these are 32 and 48.
        .expect("AES-GCM encryption of a 32-byte key cannot fail");
    let mut out = Vec::with_capacity(WRAPPED_LEN);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&sealed);
    out
}

/// Unwraps a master key. Any authentication failure (wrong KEK, wrong pool id or version, a
/// modified byte) is [`KmsError::WrongKek`]; a wrapped key of the wrong length is
/// [`KmsError::BadWrappedKey`].
pub fn unwrap_master(
    kek: &Kek,
    wrapped: &[u8],
    pool_id: [u8; 16],
    version: u32,
) -> Result<MasterKey, KmsError> {
    if wrapped.len() != WRAPPED_LEN {
        return Err(KmsError::BadWrappedKey {
            len: wrapped.len(),
            expected: WRAPPED_LEN,
        });
    }
    let (nonce, sealed) = wrapped.split_at(NONCE_LEN);
    let mut nonce_arr = [0u8; NONCE_LEN];
    nonce_arr.copy_from_slice(nonce);
    let aad = aad(pool_id, version);
    let plain = Zeroizing::new(
        cipher(kek)
            .decrypt(
                &Nonce::<Aes256Gcm>::from(nonce_arr),
                Payload {
                    msg: sealed,
                    aad: &aad,
                },
            )
            .map_err(|_| KmsError::WrongKek)?,
    );
    let mut k = [0u8; KEY_LEN];
    k.copy_from_slice(&plain);
    let key = MasterKey::from_bytes(k);
    k.zeroize();
    Ok(key)
}
