//! Disks: the [`Disk`] trait and its backends.
//!
//! A disk is a fixed-size array of bytes addressed in multiples of 512 (one sector). Backends:
//!
//! - [`UringDisk`]: a file or block device driven through io_uring by one thread per disk;
//! - [`InlineDisk`]: the same with `pread`/`pwrite` run in the submitting thread: no thread
//!   hops, the fastest for buffered (page-cache) I/O, and what [`open_disk`] picks for it;
//!   its ops do not overlap, so not for `O_DIRECT` on real devices;
//! - [`PreadDisk`]: `pread`/`pwrite` on worker threads, for hosts where io_uring is denied
//!   ([`open_disk`] probes once per process and falls back with a logged reason);
//! - [`MemDisk`]: sparse memory with a model of volatile and durable state, for crash tests;
//! - [`FaultDisk`]: a wrapper that fails, corrupts or loses another disk on command;
//! - [`OverlayDisk`]: a read-only view of another disk whose writes stay in memory (offline
//!   recovery), over a [`ReadOnlyFile`].
//!
//! # Contract of [`Disk::submit`]
//!
//! - `submit` checks the whole batch, starts every op and returns at once; it never waits for
//!   the I/O ([`InlineDisk`] is the one exception: it runs the batch before returning). A batch with one unaligned or out-of-range op fails as a whole, before anything is
//!   started, with [`DiskError::Unaligned`] or [`DiskError::OutOfRange`] (never a panic).
//! - Offsets and lengths are multiples of 512 bytes; buffers are [`IoBuf`]s, aligned to 4096 bytes
//!   so that the same buffer works with `O_DIRECT`. A zero-length op is valid and does nothing.
//! - Ops of one batch may complete in any order. Two ops of one batch that overlap (a read and a
//!   write of the same bytes, or two writes) give an unspecified result; order them by putting
//!   them in successive batches, waiting for the first.
//! - [`IoOp::Sync`] makes durable every write (and discard) that *completed before the batch
//!   holding the `Sync` was submitted*. It says nothing about writes of its own batch.
//! - [`Pending::wait`] returns the ops in submission order, read buffers filled, or the error of
//!   the lowest-indexed failed op. The batch's other ops still ran to completion first: an
//!   error never leaves an op in flight.
//!
//! # Buffer ownership
//!
//! A buffer passed to `submit` belongs to the disk until the completion of its op has been
//! reaped. [`Pending::wait`] gives it back. If the caller drops the [`Pending`] (or unwinds past
//! it), the buffer stays with the backend until the kernel has finished with it and is freed
//! there; dropping a `Pending` cancels nothing and frees nothing early. Dropping a disk waits for
//! its ops in flight. This is what makes it sound to hand raw buffer addresses to the kernel.
//! See the [`uring`] module docs for how the io_uring backend keeps that promise.
//!
//! # Errors
//!
//! Every [`DiskError`] names the disk it comes from. I/O errors of the backing store are
//! reported, never retried beyond `EINTR`/`EAGAIN` and short transfers (which are resubmitted
//! for the remainder). A disk that is gone (its backend thread stopped, or [`FaultDisk`] in
//! gone mode) answers [`DiskError::Gone`].
#![deny(clippy::undocumented_unsafe_blocks)]

use std::sync::Arc;

mod batch;
mod blocking;
mod buf;
mod fault;
mod file;
mod inline;
mod mem;
mod overlay;
mod pending;
mod powercut;
mod pread;
pub mod uring;

pub use buf::{IoBuf, configure_allocator, release_free_memory, resident_bytes};
pub use fault::{FaultCounts, FaultDisk, FaultHandle, Trigger};
pub use file::{BACKEND_ENV, Backend, DiskOptions, create_file, open_disk, uring_available};
pub use inline::InlineDisk;
pub use mem::{CrashMode, CrashReport, MemDisk, MemDiskStats};
pub use overlay::{OverlayDisk, OverlayStats, ReadOnlyFile};
pub use pending::{Completer, Pending};
pub use powercut::{PowerCut, UNLIMITED_OPS};
pub use pread::PreadDisk;
pub use uring::UringDisk;

/// The sector: granularity of offsets and lengths, and the unit that the disks are assumed to
/// write atomically (see `docs/disks.md`).
pub const SECTOR: u64 = 512;

/// Size of the zero buffer that discard writes where punching holes is unsupported (every file
/// backend): 1 MiB, one `max_io_bytes` transfer at the default, so a long discard costs few
/// system calls while the buffer stays small next to a disk's other memory.
pub(crate) const ZERO_BUF: usize = 1 << 20;

/// Alignment of every [`IoBuf`]: a page, which satisfies `O_DIRECT` on 512-byte and 4Kn devices.
pub const BUF_ALIGN: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("disk {disk}: {op} at offset {offset}: {source}")]
    Io {
        disk: String,
        op: &'static str,
        offset: u64,
        source: std::io::Error,
    },
    #[error("disk {disk}: {op} at offset {offset} length {len} is outside the disk ({size} bytes)")]
    OutOfRange {
        disk: String,
        op: &'static str,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error("disk {disk}: offset or length not aligned to 512 bytes")]
    Unaligned { disk: String },
    /// The disk no longer answers: its backend stopped, or it was pulled ([`FaultDisk`]).
    #[error("disk {disk}: gone")]
    Gone { disk: String },
    /// A fault injected by [`FaultDisk`] on command.
    #[error("disk {disk}: injected {op} error at offset {offset}")]
    Injected {
        disk: String,
        op: &'static str,
        offset: u64,
    },
}

impl DiskError {
    /// The name of the disk the error comes from.
    pub fn disk(&self) -> &str {
        match self {
            DiskError::Io { disk, .. }
            | DiskError::OutOfRange { disk, .. }
            | DiskError::Unaligned { disk }
            | DiskError::Gone { disk }
            | DiskError::Injected { disk, .. } => disk,
        }
    }

    /// The errno that best describes the error, for protocols that report one (NBD).
    pub fn errno(&self) -> i32 {
        match self {
            DiskError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            DiskError::OutOfRange { .. } | DiskError::Unaligned { .. } => libc::EINVAL,
            DiskError::Gone { .. } | DiskError::Injected { .. } => libc::EIO,
        }
    }

    pub(crate) fn io(disk: &str, op: &'static str, offset: u64, source: std::io::Error) -> Self {
        DiskError::Io {
            disk: disk.to_owned(),
            op,
            offset,
            source,
        }
    }
}

/// One operation on a disk.
#[derive(Debug)]
pub enum IoOp {
    Read {
        offset: u64,
        buf: IoBuf,
    },
    Write {
        offset: u64,
        buf: IoBuf,
    },
    /// Make durable every write that completed before this op's batch was submitted
    /// (`fdatasync` on files).
    Sync,
    /// Free the range (punch a hole); reads of it return zeros afterwards.
    Discard {
        offset: u64,
        len: u64,
    },
}

impl IoOp {
    /// A read of `len` bytes at `offset` into a fresh zeroed buffer.
    pub fn read(offset: u64, len: usize) -> IoOp {
        IoOp::Read {
            offset,
            buf: IoBuf::zeroed(len),
        }
    }

    /// A write of a copy of `data` at `offset`.
    pub fn write(offset: u64, data: &[u8]) -> IoOp {
        IoOp::Write {
            offset,
            buf: IoBuf::from_slice(data),
        }
    }

    /// "read", "write", "sync" or "discard": the word used in errors and logs.
    pub fn name(&self) -> &'static str {
        match self {
            IoOp::Read { .. } => "read",
            IoOp::Write { .. } => "write",
            IoOp::Sync => "sync",
            IoOp::Discard { .. } => "discard",
        }
    }

    /// Byte offset on the disk (0 for `Sync`).
    pub fn offset(&self) -> u64 {
        match self {
            IoOp::Read { offset, .. }
            | IoOp::Write { offset, .. }
            | IoOp::Discard { offset, .. } => *offset,
            IoOp::Sync => 0,
        }
    }

    /// Bytes covered on the disk (0 for `Sync`).
    pub fn len(&self) -> u64 {
        match self {
            IoOp::Read { buf, .. } | IoOp::Write { buf, .. } => buf.len() as u64,
            IoOp::Discard { len, .. } => *len,
            IoOp::Sync => 0,
        }
    }

    /// True for ops that cover no bytes (`Sync`, and zero-length reads, writes and discards).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The buffer of a read or write.
    pub fn buf(&self) -> Option<&IoBuf> {
        match self {
            IoOp::Read { buf, .. } | IoOp::Write { buf, .. } => Some(buf),
            IoOp::Sync | IoOp::Discard { .. } => None,
        }
    }

    /// The buffer of a read or write, by value.
    pub fn into_buf(self) -> Option<IoBuf> {
        match self {
            IoOp::Read { buf, .. } | IoOp::Write { buf, .. } => Some(buf),
            IoOp::Sync | IoOp::Discard { .. } => None,
        }
    }
}

/// A backing store: a file, a block device, memory, or a wrapper that injects faults.
pub trait Disk: Send + Sync {
    /// Human-readable name for logs and errors (usually the path).
    fn name(&self) -> &str;
    /// Size in bytes (a multiple of 512).
    fn size(&self) -> u64;
    /// Start every op of the batch and return at once; see the module docs for the contract.
    fn submit(&self, ops: Vec<IoOp>) -> Pending;
    /// The backend, for logs: "io_uring", "inline", "pread", "memory", "fault", …
    fn backend(&self) -> &'static str {
        "other"
    }
    /// Whether `submit` runs every op before it returns without waiting for a device: buffered
    /// system calls into the page cache, or memory. Callers that must not block (the NBD
    /// server's async threads, through [`BlockDevice::try_write_now`](crate::volume::BlockDevice::try_write_now))
    /// write only to such disks.
    fn completes_in_submit(&self) -> bool {
        false
    }
}

pub type DiskRef = Arc<dyn Disk>;

/// Check that every op of a batch is aligned and inside a disk of `size` bytes.
///
/// Every backend calls this before starting anything, so that an invalid batch has no effect.
pub fn check_batch(disk: &str, size: u64, ops: &[IoOp]) -> Result<(), DiskError> {
    for op in ops {
        if matches!(op, IoOp::Sync) {
            continue;
        }
        let (offset, len) = (op.offset(), op.len());
        if !offset.is_multiple_of(SECTOR) || !len.is_multiple_of(SECTOR) {
            return Err(DiskError::Unaligned {
                disk: disk.to_owned(),
            });
        }
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(DiskError::OutOfRange {
                disk: disk.to_owned(),
                op: op.name(),
                offset,
                len,
                size,
            });
        }
    }
    Ok(())
}

/// An error for a backend that answered a batch with ops other than those submitted.
fn mismatch(disk: &dyn Disk, op: &'static str, offset: u64) -> DiskError {
    DiskError::io(
        disk.name(),
        op,
        offset,
        std::io::Error::other("backend returned other ops than submitted"),
    )
}

/// Read `len` bytes at `offset`.
pub fn read_at(disk: &dyn Disk, offset: u64, len: usize) -> Result<IoBuf, DiskError> {
    let mut ops = disk.submit(vec![IoOp::read(offset, len)]).wait()?;
    match ops.pop() {
        Some(IoOp::Read { buf, .. }) if ops.is_empty() && buf.len() == len => Ok(buf),
        _ => Err(mismatch(disk, "read", offset)),
    }
}

/// Write `data` at `offset` (copied into an aligned buffer first).
pub fn write_at(disk: &dyn Disk, offset: u64, data: &[u8]) -> Result<(), DiskError> {
    disk.submit(vec![IoOp::write(offset, data)])
        .wait()
        .map(drop)
}

/// Make durable every write that completed before this call.
pub fn sync(disk: &dyn Disk) -> Result<(), DiskError> {
    disk.submit(vec![IoOp::Sync]).wait().map(drop)
}

/// Discard `len` bytes at `offset`: they read back as zeros afterwards.
pub fn discard(disk: &dyn Disk, offset: u64, len: u64) -> Result<(), DiskError> {
    disk.submit(vec![IoOp::Discard { offset, len }])
        .wait()
        .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_batch_rejects_unaligned_and_out_of_range() {
        let ok = [
            IoOp::read(0, 512),
            IoOp::Sync,
            IoOp::Discard {
                offset: 512,
                len: 512,
            },
        ];
        assert!(check_batch("d", 1024, &ok).is_ok());
        let unaligned = [IoOp::read(0, 512), IoOp::read(100, 512)];
        assert!(matches!(
            check_batch("d", 4096, &unaligned),
            Err(DiskError::Unaligned { .. })
        ));
        let short = [IoOp::read(0, 100)];
        assert!(matches!(
            check_batch("d", 4096, &short),
            Err(DiskError::Unaligned { .. })
        ));
        let past_end = [IoOp::write(4096, &[0; 512])];
        assert!(matches!(
            check_batch("d", 4096, &past_end),
            Err(DiskError::OutOfRange { .. })
        ));
        let overflow = [IoOp::Discard {
            offset: u64::MAX - 511,
            len: 1024,
        }];
        assert!(matches!(
            check_batch("d", 4096, &overflow),
            Err(DiskError::OutOfRange { .. })
        ));
        let empty_at_end = [IoOp::read(4096, 0)];
        assert!(check_batch("d", 4096, &empty_at_end).is_ok());
    }

    #[test]
    fn errors_name_the_disk() {
        let e = check_batch("/dev/sdq", 512, &[IoOp::read(512, 512)]).unwrap_err();
        assert_eq!(e.disk(), "/dev/sdq");
        assert!(e.to_string().contains("/dev/sdq"));
        assert_eq!(e.errno(), libc::EINVAL);
    }
}
