//! Key management at rest: the key-encryption key (KEK), its Shamir shares and share files, and
//! the wrapping of master keys by the KEK.
//!
//! What this module promises:
//! - [`split`] cuts a [`Kek`] into `count` shares, any `threshold` of which give it back; every
//!   split gets a fresh random split id, written in each share, so shares of an older split are
//!   recognised and refused instead of being mixed with current ones.
//! - [`write_share_files`] / [`load_share_file`] move shares to and from small text files (format
//!   in `docs/keys.md`), mode 0600, never overwritten; a loaded file has passed its format and
//!   checksum checks, and every error names the file.
//! - [`combine`] refuses, with a message naming the file(s), too few shares, duplicates, shares of
//!   another pool and shares of another split. It cannot tell a forged share (valid format,
//!   recomputed checksum, wrong secret): Shamir interpolation turns any `t` points into *some*
//!   secret. That is caught by [`unwrap_master`], which authenticates the wrapped master key and
//!   returns [`KmsError::WrongKek`] on any failure, never a wrong key.
//! - [`wrap_master`] / [`unwrap_master`]: AES-256-GCM, random 96-bit nonce, the pool id and key
//!   version bound in the associated data (a wrapped key cannot be moved to another pool or
//!   version). Output: nonce ‖ ciphertext ‖ tag, [`WRAPPED_LEN`] bytes.
//!
//! Key material (KEK, share secrets, intermediate buffers, the AES key schedule) is wiped on drop
//! and never printed: `Debug` of [`Kek`] and [`Share`] is redacted and no error message carries
//! secret bytes.

#![forbid(unsafe_code)]

pub(crate) mod hex;
mod shares;
mod wrap;

use std::fmt;
use std::path::PathBuf;

use zeroize::{Zeroize, ZeroizeOnDrop};

pub use shares::{
    SHARE_FILE_MAX_LEN, SHARE_FILE_VERSION_LINE, check_share, combine, encode_share_file,
    load_share_file, parse_share_file, share_file_name, split, validate_split_params,
    write_share_files,
};
pub use wrap::{WRAP_AAD_LABEL, WRAPPED_LEN, unwrap_master, wrap_master};

/// Length in bytes of the KEK (AES-256).
pub const KEK_LEN: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum KmsError {
    /// Invalid split parameters or share contents that are not tied to one file.
    #[error("{0}")]
    Share(String),
    /// A share file that cannot be used: unreadable format, bad field, checksum mismatch,
    /// already existing when writing.
    #[error("share file {path}: {msg}")]
    ShareFile { path: PathBuf, msg: String },
    /// Fewer distinct shares than the pool's threshold.
    #[error("{given} shares given, this pool needs {needed}")]
    TooFewShares { given: usize, needed: u8 },
    /// Two inputs carry the same share index (or are the same file given twice).
    #[error("{}", duplicate_message(first, second, *index))]
    DuplicateShare {
        first: String,
        second: String,
        index: u8,
    },
    /// A share of another pool.
    #[error("{file}: share of another pool ({found}); this pool is {expected}")]
    ForeignPool {
        file: String,
        found: String,
        expected: String,
    },
    /// A share of this pool but from another split of its KEK (an older one, usually).
    #[error(
        "{file}: share from another split of this pool's key (split {found}; the current split is \
         {expected}): shares from different splits cannot be combined"
    )]
    OtherSplit {
        file: String,
        found: String,
        expected: String,
    },
    /// A share of the current split whose threshold differs from the pool's.
    #[error("{file}: share says threshold {found}, this pool needs {expected}")]
    ThresholdMismatch {
        file: String,
        found: u8,
        expected: u8,
    },
    #[error(
        "the shares given do not unlock this pool (the key they combine to does not open the master key)"
    )]
    WrongKek,
    /// A wrapped master key of the wrong length (a damaged record, not a key question).
    #[error("wrapped master key is {len} bytes, expected {expected}")]
    BadWrappedKey { len: usize, expected: usize },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn duplicate_message(first: &str, second: &str, index: u8) -> String {
    if first == second {
        format!("{first} was given twice (share {index}); each share counts once")
    } else {
        format!(
            "{first} and {second} are both share {index}; each share counts once (give another share)"
        )
    }
}

/// Key-encryption key. Wiped on drop; `Debug` prints no key material.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct Kek([u8; KEK_LEN]);

impl Kek {
    /// A fresh random KEK (thread-local CSPRNG seeded from the operating system).
    pub fn generate() -> Self {
        let mut k = Kek([0; KEK_LEN]);
        rand::fill(&mut k.0[..]);
        k
    }
    /// Takes ownership of raw key bytes (the caller wipes its own copies).
    pub fn from_bytes(b: [u8; KEK_LEN]) -> Self {
        Kek(b)
    }
    /// The raw key, for the ciphers and for tests; never log or print it.
    pub fn expose(&self) -> &[u8; KEK_LEN] {
        &self.0
    }
}

impl fmt::Debug for Kek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Kek(<redacted>)")
    }
}

/// One Shamir share of a pool's KEK, as written in a share file.
///
/// `index` is the share's x coordinate (1..=count); the secret is the share's y values, one byte
/// per KEK byte. Wiped on drop (every clone too); `Debug` prints no secret bytes.
#[derive(Clone)]
pub struct Share {
    pub pool_id: [u8; 16],
    pub split_id: [u8; 16],
    pub index: u8,
    pub threshold: u8,
    pub count: u8,
    /// y values of the share; private so that it is only reached through [`Share::secret`].
    secret: [u8; KEK_LEN],
}

impl Share {
    /// Builds a share from its parts (used by the file parser; tests build forged shares with it).
    pub fn from_parts(
        pool_id: [u8; 16],
        split_id: [u8; 16],
        index: u8,
        threshold: u8,
        count: u8,
        secret: [u8; KEK_LEN],
    ) -> Self {
        Share {
            pool_id,
            split_id,
            index,
            threshold,
            count,
            secret,
        }
    }
    /// The share's secret bytes; never log or print them.
    pub fn secret(&self) -> &[u8; KEK_LEN] {
        &self.secret
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        self.secret.zeroize();
    }
}

impl fmt::Debug for Share {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Share")
            .field("pool_id", &hex::encode(&self.pool_id))
            .field("split_id", &hex::encode(&self.split_id))
            .field("index", &self.index)
            .field("threshold", &self.threshold)
            .field("count", &self.count)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// A share with the file (or other source) it came from, for error messages.
#[derive(Debug)]
pub struct LoadedShare {
    pub source: String,
    pub share: Share,
}
