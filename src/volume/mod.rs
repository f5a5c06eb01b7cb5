//! Volumes: byte ranges → stripes; read, write, flush, trim, write_zeroes; locking; the journal.
//! (Interface of the volume API; the engine is being written.)

pub mod mem;

/// Errors of the volume API. The NBD layer maps them to NBD error codes in one place.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("range {offset}+{len} is outside the volume ({size} bytes)")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("volume is read-only")]
    ReadOnly,
    #[error("I/O error: {0}")]
    Io(String),
    #[error("block {lba} cannot be read: {why}")]
    Unrecoverable { lba: u64, why: String },
}

/// One run of a block-status answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub len: u64,
    /// Never written or trimmed: reads as zeros and holds no space.
    pub hole: bool,
}

/// The volume API the NBD server uses. Byte ranges of any alignment; safe under concurrent
/// callers. Calls block (run them off the async executor).
pub trait BlockDevice: Send + Sync + 'static {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Fills `buf` with the bytes at `offset`.
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), VolumeError>;
    /// Writes `data` at `offset`; with `fua` the data is durable when this returns.
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), VolumeError>;
    /// Makes every write that completed before this call durable (on any connection).
    fn flush(&self) -> Result<(), VolumeError>;
    /// The range reads as zeros afterwards; whole blocks inside it free their space.
    fn trim(&self, offset: u64, len: u64) -> Result<(), VolumeError>;
    /// The range reads as zeros afterwards; whole blocks free their space unless `no_hole`.
    fn write_zeroes(&self, offset: u64, len: u64, no_hole: bool, fua: bool) -> Result<(), VolumeError>;
    /// Allocation status of `[offset, offset+len)` as consecutive extents covering it.
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, VolumeError>;
}
