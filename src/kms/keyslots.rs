//! The key-slot file: where a pool keeps its wrapped master keys, in fixed slots that are
//! overwritten in place, so that destroying a version really removes its bytes.
//!
//! Why not the metadata store: redb is copy-on-write. A value that is replaced or deleted stays
//! in freed pages of the file until they happen to be reused, so "erase the wrapped key" could
//! not be promised there. A small file of fixed-offset slots can be overwritten with zeros and
//! fsynced: after [`KeySlots::erase`] returns, the bytes are gone from the file (on a filesystem
//! that overwrites in place; `docs/key-lifecycle.md` says what that excludes).
//!
//! Layout: version `v` (from 1) owns 256 bytes at offset `(v - 1) * 256`: two 128-byte slots,
//! A then B. Two slots per version let a re-split of the KEK write the keys wrapped under the
//! new KEK beside the old ones, commit the new split in the store, then erase the old slots: a
//! crash at any moment leaves one complete set that matches the store's split id.
//!
//! | offset | size | field |
//! |---:|---:|---|
//! | 0 | 8 | magic `SVWKEY01` |
//! | 8 | 4 | master key version, u32 LE |
//! | 12 | 4 | length of the wrapped key, u32 LE (60) |
//! | 16 | 16 | split id of the KEK that wraps it |
//! | 32 | 60 | wrapped master key (`kms::wrap_master`) |
//! | 92 | 4 | crc32c of bytes 0..92, u32 LE |
//! | 96 | 32 | zero |
//!
//! An all-zero slot is empty. A slot whose magic, version or checksum is wrong is treated as
//! empty when read (a torn slot write) and is named in [`KeySlots::damaged`].

#![forbid(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::{KmsError, WRAPPED_LEN};

/// File name of the key-slot file inside a pool directory.
pub const KEYSLOTS_FILE: &str = "keyslots.bin";
/// Bytes of one slot.
pub const SLOT_LEN: usize = 128;
/// Bytes owned by one version (two slots).
pub const VERSION_STRIDE: u64 = 2 * SLOT_LEN as u64;
const MAGIC: [u8; 8] = *b"SVWKEY01";
const CRC_AT: usize = 32 + WRAPPED_LEN;

/// The key-slot file of one pool.
#[derive(Debug, Clone)]
pub struct KeySlots {
    path: PathBuf,
}

fn encode(version: u32, split_id: &[u8; 16], wrapped: &[u8]) -> [u8; SLOT_LEN] {
    let mut b = [0u8; SLOT_LEN];
    b[..8].copy_from_slice(&MAGIC);
    b[8..12].copy_from_slice(&version.to_le_bytes());
    b[12..16].copy_from_slice(&(wrapped.len() as u32).to_le_bytes());
    b[16..32].copy_from_slice(split_id);
    b[32..32 + wrapped.len()].copy_from_slice(wrapped);
    let crc = crc32c::crc32c(&b[..CRC_AT]);
    b[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
    b
}

/// A decoded slot: split id and wrapped key; `None` if empty or damaged.
fn decode(version: u32, b: &[u8]) -> Option<([u8; 16], Vec<u8>)> {
    if b.len() < SLOT_LEN || b[..8] != MAGIC {
        return None;
    }
    let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or_default());
    if u32_at(8) != version
        || u32_at(12) as usize != WRAPPED_LEN
        || u32_at(CRC_AT) != crc32c::crc32c(&b[..CRC_AT])
    {
        return None;
    }
    let mut split = [0u8; 16];
    split.copy_from_slice(&b[16..32]);
    Some((split, b[32..32 + WRAPPED_LEN].to_vec()))
}

impl KeySlots {
    /// The key-slot file of the pool in `pool_dir` (created on first write).
    pub fn in_pool(pool_dir: &Path) -> Self {
        Self {
            path: pool_dir.join(KEYSLOTS_FILE),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io(&self, source: std::io::Error) -> KmsError {
        KmsError::Io {
            path: self.path.clone(),
            source,
        }
    }

    fn open_rw(&self) -> Result<File, KmsError> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&self.path)
            .map_err(|e| self.io(e))
    }

    /// The two slots of `version` as stored (zeros past the end of the file).
    fn read_pair(&self, version: u32) -> Result<[[u8; SLOT_LEN]; 2], KmsError> {
        let mut pair = [[0u8; SLOT_LEN]; 2];
        let f = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(pair),
            Err(e) => return Err(self.io(e)),
        };
        let base = u64::from(version.saturating_sub(1)) * VERSION_STRIDE;
        for (i, slot) in pair.iter_mut().enumerate() {
            let mut got = 0;
            while got < SLOT_LEN {
                let n = f
                    .read_at(&mut slot[got..], base + (i * SLOT_LEN + got) as u64)
                    .map_err(|e| self.io(e))?;
                if n == 0 {
                    break;
                }
                got += n;
            }
        }
        Ok(pair)
    }

    fn write_slot(
        &self,
        version: u32,
        slot: usize,
        bytes: &[u8; SLOT_LEN],
    ) -> Result<(), KmsError> {
        let f = self.open_rw()?;
        let off = u64::from(version.saturating_sub(1)) * VERSION_STRIDE + (slot * SLOT_LEN) as u64;
        f.write_all_at(bytes, off).map_err(|e| self.io(e))?;
        f.sync_all().map_err(|e| self.io(e))
    }

    /// The wrapped key of `version` under the KEK of split `split_id`, if present.
    pub fn get(&self, version: u32, split_id: &[u8; 16]) -> Result<Option<Vec<u8>>, KmsError> {
        Ok(self
            .read_pair(version)?
            .iter()
            .filter_map(|s| decode(version, s))
            .find(|(split, _)| split == split_id)
            .map(|(_, w)| w))
    }

    /// Durably stores the wrapped key of `version` under split `split_id`: over the slot that
    /// already holds that split, else into an empty slot, else over the slot that does not hold
    /// `protect` (the split the store currently names, which must survive until the new one is
    /// committed).
    pub fn put(
        &self,
        version: u32,
        split_id: &[u8; 16],
        wrapped: &[u8],
        protect: Option<&[u8; 16]>,
    ) -> Result<(), KmsError> {
        if wrapped.len() != WRAPPED_LEN {
            return Err(KmsError::BadWrappedKey {
                len: wrapped.len(),
                expected: WRAPPED_LEN,
            });
        }
        if version == 0 {
            return Err(KmsError::Share("master key versions start at 1".into()));
        }
        let pair = self.read_pair(version)?;
        let decoded: Vec<_> = pair.iter().map(|s| decode(version, s)).collect();
        let same = decoded
            .iter()
            .position(|d| d.as_ref().is_some_and(|(s, _)| s == split_id));
        let empty = decoded.iter().position(Option::is_none);
        let unprotected = decoded.iter().position(|d| {
            d.as_ref()
                .is_none_or(|(s, _)| protect.is_none_or(|p| s != p))
        });
        let slot = same.or(empty).or(unprotected).ok_or_else(|| {
            KmsError::Share(format!(
                "{}: both slots of master key version {version} are in use by other splits",
                self.path.display()
            ))
        })?;
        self.write_slot(version, slot, &encode(version, split_id, wrapped))
    }

    /// Overwrites with zeros, durably, every slot of `version` that does not hold split `keep`
    /// (both slots when `keep` is `None`).
    pub fn erase(&self, version: u32, keep: Option<&[u8; 16]>) -> Result<(), KmsError> {
        let pair = self.read_pair(version)?;
        for (i, s) in pair.iter().enumerate() {
            let keep_it = keep.is_some_and(|k| decode(version, s).is_some_and(|(sp, _)| &sp == k));
            if !keep_it && s.iter().any(|b| *b != 0) {
                self.write_slot(version, i, &[0u8; SLOT_LEN])?;
            }
        }
        Ok(())
    }

    /// Slots that are neither empty nor valid, as `(version, slot)`: a torn write, or damage.
    pub fn damaged(
        &self,
        versions: impl IntoIterator<Item = u32>,
    ) -> Result<Vec<(u32, usize)>, KmsError> {
        let mut out = Vec::new();
        for v in versions {
            for (i, s) in self.read_pair(v)?.iter().enumerate() {
                if s.iter().any(|b| *b != 0) && decode(v, s).is_none() {
                    out.push((v, i));
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(b: u8) -> Vec<u8> {
        vec![b; WRAPPED_LEN]
    }

    #[test]
    fn put_get_erase_and_two_splits_side_by_side() {
        let dir = tempfile::tempdir().unwrap();
        let ks = KeySlots::in_pool(dir.path());
        let (s1, s2, s3) = ([1u8; 16], [2u8; 16], [3u8; 16]);
        assert_eq!(ks.get(1, &s1).unwrap(), None);
        ks.put(2, &s1, &w(0xa1), None).unwrap();
        ks.put(2, &s2, &w(0xa2), Some(&s1)).unwrap();
        assert_eq!(ks.get(2, &s1).unwrap(), Some(w(0xa1)));
        assert_eq!(ks.get(2, &s2).unwrap(), Some(w(0xa2)));
        // A third split never overwrites the protected one.
        ks.put(2, &s3, &w(0xa3), Some(&s1)).unwrap();
        assert_eq!(ks.get(2, &s1).unwrap(), Some(w(0xa1)));
        assert_eq!(ks.get(2, &s2).unwrap(), None);
        ks.erase(2, Some(&s3)).unwrap();
        assert_eq!(ks.get(2, &s1).unwrap(), None);
        assert_eq!(ks.get(2, &s3).unwrap(), Some(w(0xa3)));
        ks.erase(2, None).unwrap();
        let bytes = std::fs::read(ks.path()).unwrap();
        assert!(bytes.iter().all(|b| *b == 0));
    }

    #[test]
    fn a_damaged_slot_reads_as_absent_and_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let ks = KeySlots::in_pool(dir.path());
        ks.put(1, &[7; 16], &w(5), None).unwrap();
        let mut bytes = std::fs::read(ks.path()).unwrap();
        bytes[40] ^= 1;
        std::fs::write(ks.path(), &bytes).unwrap();
        assert_eq!(ks.get(1, &[7; 16]).unwrap(), None);
        assert_eq!(ks.damaged([1]).unwrap(), vec![(1, 0)]);
    }
}
