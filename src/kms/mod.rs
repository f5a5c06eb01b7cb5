//! Key management at rest: KEK, Shamir shares and share files, master-key wrapping.
//! (Interface; implementation to come.)

use std::path::{Path, PathBuf};

use crate::crypto::MasterKey;

#[derive(Debug, thiserror::Error)]
pub enum KmsError {
    #[error("{0}")]
    Share(String),
    #[error("the shares given do not unlock this pool (the key they combine to does not open the master key)")]
    WrongKek,
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

/// Key-encryption key. Wiped on drop; `Debug` prints no key material.
pub struct Kek([u8; 32]);
impl Kek {
    pub fn generate() -> Self { todo!() }
}

/// One Shamir share of a pool's KEK, as written in a share file.
pub struct Share {
    pub pool_id: [u8; 16],
    pub split_id: [u8; 16],
    pub index: u8,
    pub threshold: u8,
    pub count: u8,
}

/// A share with the file (or other source) it came from, for error messages.
pub struct LoadedShare {
    pub source: String,
    pub share: Share,
}

pub fn split(_kek: &Kek, _pool_id: [u8; 16], _count: u8, _threshold: u8) -> Result<Vec<Share>, KmsError> { todo!() }
pub fn write_share_files(_dir: &Path, _shares: &[Share]) -> Result<Vec<PathBuf>, KmsError> { todo!() }
pub fn load_share_file(_path: &Path) -> Result<LoadedShare, KmsError> { todo!() }
pub fn combine(_shares: &[LoadedShare], _pool_id: [u8; 16], _split_id: [u8; 16], _threshold: u8) -> Result<Kek, KmsError> { todo!() }
pub fn wrap_master(_kek: &Kek, _key: &MasterKey, _pool_id: [u8; 16], _version: u32) -> Vec<u8> { todo!() }
pub fn unwrap_master(_kek: &Kek, _wrapped: &[u8], _pool_id: [u8; 16], _version: u32) -> Result<MasterKey, KmsError> { todo!() }
