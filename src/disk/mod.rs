//! Disks: the `Disk` trait and its backends. (Interface; implementation to come.)
//!
//! Contract of [`Disk::submit`]: it starts every op of the batch and returns at once; the
//! buffers belong to the disk until [`Pending::wait`] hands them back (whatever happens to the
//! caller). Ops of one batch may complete in any order. [`IoOp::Sync`] makes durable every
//! write that completed before the batch holding it was submitted. Offsets and lengths are
//! multiples of 512 bytes; buffers are 4096-byte aligned ([`IoBuf`]).

use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("disk {disk}: {op} at offset {offset}: {source}")]
    Io { disk: String, op: &'static str, offset: u64, source: std::io::Error },
    #[error("disk {disk}: {op} at offset {offset} length {len} is outside the disk ({size} bytes)")]
    OutOfRange { disk: String, op: &'static str, offset: u64, len: u64, size: u64 },
    #[error("disk {disk}: offset or length not aligned to 512 bytes")]
    Unaligned { disk: String },
}

/// A heap buffer aligned to 4096 bytes, of a length fixed at allocation.
pub struct IoBuf;
impl IoBuf {
    pub fn zeroed(_len: usize) -> Self { todo!() }
    pub fn from_slice(_b: &[u8]) -> Self { todo!() }
    pub fn len(&self) -> usize { todo!() }
    pub fn is_empty(&self) -> bool { self.len() == 0 }
}
impl std::ops::Deref for IoBuf { type Target = [u8]; fn deref(&self) -> &[u8] { todo!() } }
impl std::ops::DerefMut for IoBuf { fn deref_mut(&mut self) -> &mut [u8] { todo!() } }

/// One operation on a disk.
pub enum IoOp {
    Read { offset: u64, buf: IoBuf },
    Write { offset: u64, buf: IoBuf },
    /// Make completed writes durable (fdatasync).
    Sync,
    /// Free the range (punch a hole); reads of it return zeros afterwards.
    Discard { offset: u64, len: u64 },
}

/// A submitted batch; `wait` returns the ops (with read buffers filled) in submission order.
pub struct Pending;
impl Pending {
    pub fn wait(self) -> Result<Vec<IoOp>, DiskError> { todo!() }
}

/// A backing store: a file, a block device, memory, or a wrapper that injects faults.
pub trait Disk: Send + Sync {
    /// Human-readable name for logs and errors (usually the path).
    fn name(&self) -> &str;
    /// Size in bytes.
    fn size(&self) -> u64;
    fn submit(&self, ops: Vec<IoOp>) -> Pending;
}

pub type DiskRef = Arc<dyn Disk>;

pub fn read_at(_d: &dyn Disk, _offset: u64, _len: usize) -> Result<IoBuf, DiskError> { todo!() }

#[derive(Default)]
pub struct DiskOptions;
pub fn open_disk(_p: &std::path::Path, _o: &DiskOptions) -> Result<DiskRef, DiskError> { todo!() }
