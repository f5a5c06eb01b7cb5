//! [`FileIo`]: one op on a file with blocking system calls, shared by the backends that run ops
//! on an ordinary thread ([`PreadDisk`](super::PreadDisk)'s workers, and the caller's thread for
//! [`InlineDisk`](super::InlineDisk)).
//!
//! Reads and writes are `pread`/`pwrite` looped over short transfers, `EINTR` and `EAGAIN`,
//! split at `max_io_bytes`; a transfer of 0 bytes is an error (`UnexpectedEof` for reads,
//! `WriteZero` for writes), never a silent success. Sync is `fdatasync`. Discard is
//! `fallocate(PUNCH_HOLE | KEEP_SIZE)`; on `EOPNOTSUPP` the disk writes zeros instead, and
//! remembers that for the rest of its life (logged once per disk at info level). The op holds
//! its buffer by `&mut`; the one `unsafe` call is `sync_file_range`, which nix does not wrap.
//!
//! A buffered write of at least [`EARLY_WRITEBACK_BYTES`] starts the writeback of its range at
//! once (`sync_file_range(SYNC_FILE_RANGE_WRITE)`: the kernel queues the dirty pages to the
//! device and returns; nothing waits for them and nothing is promised durable). Such writes are
//! journal records of large client writes, which the next destage round syncs anyway. Without
//! it the page cache holds them until that sync, and the device sits idle between rounds, then
//! gets every replica at once. Measured (`docs/benchmarks.md`): sequential 1 MiB writes at qd8
//! on a filled volume 376 against 341 writes/s (four alternating pairs). A failure of the call
//! is ignored: it is advice, and the `Sync` that follows reports any real write error.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::errno::Errno;
use nix::fcntl::{FallocateFlags, fallocate};
use nix::sys::uio::{pread, pwrite};

use super::file::{DiskOptions, OpenedFile};
use super::{DiskError, IoBuf, IoOp, ZERO_BUF};

/// Buffered writes at least this large start their writeback at once (see the module docs).
/// 256 KiB: a journal record of a client write of a whole 256 KiB stripe (4+2, 64 KiB chunks)
/// or more, and never a small write's record (at most 64 KiB + its header), whose pages the
/// page cache should keep gathering: starting writeback of every 8 KiB record would cost a
/// device request each.
pub const EARLY_WRITEBACK_BYTES: usize = 256 << 10;

/// An open file and what is needed to run ops on it from any thread.
pub(crate) struct FileIo {
    pub name: String,
    file: File,
    /// Whether fallocate(PUNCH_HOLE) works on this file; cleared at the first EOPNOTSUPP.
    punch: AtomicBool,
    zeros: IoBuf,
    max_transfer: u64,
    /// Opened without `O_DIRECT`: large writes start their writeback early.
    buffered: bool,
}

impl FileIo {
    pub(crate) fn new(name: String, opened: OpenedFile, opts: &DiskOptions) -> FileIo {
        FileIo {
            name,
            file: opened.file,
            punch: AtomicBool::new(true),
            zeros: IoBuf::zeroed(opts.max_transfer().min(ZERO_BUF as u64) as usize),
            max_transfer: opts.max_transfer(),
            buffered: !opts.direct,
        }
    }

    /// Run one op to completion in the calling thread.
    pub(crate) fn execute(&self, op: &mut IoOp) -> Result<(), DiskError> {
        match op {
            IoOp::Read { offset, buf } => {
                self.transfer(*offset, buf.len(), "read", |done, chunk, pos| {
                    pread(&self.file, &mut buf[done..done + chunk], pos)
                })
            }
            IoOp::Write { offset, buf } => {
                self.transfer(*offset, buf.len(), "write", |done, chunk, pos| {
                    pwrite(&self.file, &buf[done..done + chunk], pos)
                })?;
                if self.buffered && buf.len() >= EARLY_WRITEBACK_BYTES {
                    self.start_writeback(*offset, buf.len());
                }
                Ok(())
            }
            IoOp::Sync => self
                .file
                .sync_data()
                .map_err(|e| DiskError::io(&self.name, "sync", 0, e)),
            IoOp::Discard { offset, len } => self.discard(*offset, *len),
        }
    }

    /// Asks the kernel to start writing `[offset, offset + len)` back to the device, without
    /// waiting for it (see the module docs). Errors are ignored.
    fn start_writeback(&self, offset: u64, len: usize) {
        let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
            return;
        };
        // SAFETY: sync_file_range only reads its integer arguments; the descriptor stays open
        // for the call since `self.file` is borrowed, and no memory is passed.
        let _advice = unsafe {
            libc::sync_file_range(
                self.file.as_raw_fd(),
                offset,
                len,
                libc::SYNC_FILE_RANGE_WRITE,
            )
        };
    }

    /// Loop `f(done, chunk, position)` until `len` bytes are transferred.
    fn transfer(
        &self,
        offset: u64,
        len: usize,
        op: &'static str,
        mut f: impl FnMut(usize, usize, i64) -> nix::Result<usize>,
    ) -> Result<(), DiskError> {
        let mut done = 0usize;
        while done < len {
            let chunk = (len - done).min(self.max_transfer as usize);
            let pos = offset + done as u64;
            match f(done, chunk, pos as i64) {
                Ok(0) => {
                    let kind = if op == "read" {
                        std::io::ErrorKind::UnexpectedEof
                    } else {
                        std::io::ErrorKind::WriteZero
                    };
                    return Err(DiskError::io(&self.name, op, pos, kind.into()));
                }
                Ok(n) => done += n,
                Err(Errno::EINTR | Errno::EAGAIN) => {}
                Err(e) => return Err(DiskError::io(&self.name, op, pos, e.into())),
            }
        }
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        if len == 0 {
            return Ok(());
        }
        if self.punch.load(Ordering::Relaxed) {
            let mode = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
            loop {
                match fallocate(&self.file, mode, offset as i64, len as i64) {
                    Ok(()) => return Ok(()),
                    Err(Errno::EINTR) => continue,
                    Err(Errno::EOPNOTSUPP) => {
                        if self.punch.swap(false, Ordering::Relaxed) {
                            tracing::info!(disk = %self.name, "hole punching unsupported: discard writes zeros");
                        }
                        break;
                    }
                    Err(e) => return Err(DiskError::io(&self.name, "discard", offset, e.into())),
                }
            }
        }
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let chunk = (end - pos).min(self.zeros.len() as u64) as usize;
            self.transfer(pos, chunk, "discard", |done, n, at| {
                pwrite(&self.file, &self.zeros[done..done + n], at)
            })?;
            pos += chunk as u64;
        }
        Ok(())
    }
}
