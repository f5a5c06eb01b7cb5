//! The one place where volume errors become NBD error values.
//!
//! | volume error | command | NBD error |
//! |---|---|---|
//! | `OutOfRange` | WRITE, WRITE_ZEROES | `NBD_ENOSPC` (spec: writes past the end) |
//! | `OutOfRange` | READ, TRIM, CACHE, BLOCK_STATUS | `NBD_EINVAL` |
//! | `ReadOnly` | any | `NBD_EPERM` |
//! | `Io`, `Unrecoverable` | any | `NBD_EIO` |
//!
//! Protocol refusals decided from the request header alone (unknown command, bad flags, length
//! over the maximum) are [`Refusal`]s with their NBD error chosen where they are detected; a
//! range past the end is detected by the NBD layer too, but goes through [`nbd_error`] as a
//! `VolumeError::OutOfRange` so that the mapping above stays in one function.

use super::wire::{self, Command};
use crate::layout::BLOCK_SIZE_U64;
use crate::volume::VolumeError;

/// NBD error value for a volume error returned by command `cmd`.
pub fn nbd_error(err: &VolumeError, cmd: Command) -> u32 {
    match err {
        VolumeError::OutOfRange { .. } => match cmd {
            Command::Write | Command::WriteZeroes => wire::ENOSPC,
            _ => wire::EINVAL,
        },
        VolumeError::ReadOnly => wire::EPERM,
        VolumeError::Io(_) | VolumeError::Unrecoverable { .. } | VolumeError::Config(_) => {
            wire::EIO
        }
    }
}

/// Offset to report in an `NBD_REPLY_TYPE_ERROR_OFFSET` chunk, when the error names a block
/// that lies inside the request `[offset, offset+len)`.
pub fn error_offset(err: &VolumeError, offset: u64, len: u64) -> Option<u64> {
    match err {
        VolumeError::Unrecoverable { lba, .. } => {
            let start = lba.checked_mul(BLOCK_SIZE_U64)?;
            let end = start.checked_add(BLOCK_SIZE_U64)?;
            let req_end = offset.checked_add(len)?;
            (start < req_end && end > offset).then(|| start.max(offset))
        }
        _ => None,
    }
}

/// A request refused before it reaches the volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub error: u32,
    pub message: String,
}

impl Refusal {
    pub fn new(error: u32, message: impl Into<String>) -> Self {
        Self {
            error,
            message: message.into(),
        }
    }

    pub fn from_volume(err: &VolumeError, cmd: Command) -> Self {
        Self::new(nbd_error(err, cmd), err.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapping_table() {
        let oor = VolumeError::OutOfRange {
            offset: 0,
            len: 1,
            size: 0,
        };
        assert_eq!(nbd_error(&oor, Command::Write), wire::ENOSPC);
        assert_eq!(nbd_error(&oor, Command::WriteZeroes), wire::ENOSPC);
        assert_eq!(nbd_error(&oor, Command::Read), wire::EINVAL);
        assert_eq!(nbd_error(&oor, Command::Trim), wire::EINVAL);
        assert_eq!(nbd_error(&oor, Command::BlockStatus), wire::EINVAL);
        assert_eq!(
            nbd_error(&VolumeError::ReadOnly, Command::Trim),
            wire::EPERM
        );
        assert_eq!(
            nbd_error(&VolumeError::Io("x".into()), Command::Read),
            wire::EIO
        );
        let unrec = VolumeError::Unrecoverable {
            lba: 3,
            why: "tag".into(),
        };
        assert_eq!(nbd_error(&unrec, Command::Flush), wire::EIO);
    }

    #[test]
    fn error_offset_inside_request_only() {
        let e = VolumeError::Unrecoverable {
            lba: 2,
            why: String::new(),
        };
        assert_eq!(error_offset(&e, 0, 16384), Some(8192));
        assert_eq!(error_offset(&e, 9000, 100), Some(9000));
        assert_eq!(error_offset(&e, 0, 8192), None);
        let huge = VolumeError::Unrecoverable {
            lba: u64::MAX,
            why: String::new(),
        };
        assert_eq!(error_offset(&huge, 0, 1), None);
        assert_eq!(error_offset(&VolumeError::Io(String::new()), 0, 1), None);
    }
}
