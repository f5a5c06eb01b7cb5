//! [`FileIo`]: one op on a file with blocking system calls, shared by the backends that run ops
//! on an ordinary thread ([`PreadDisk`](super::PreadDisk)'s workers, and the caller's thread for
//! [`InlineDisk`](super::InlineDisk)).
//!
//! Reads and writes are `pread`/`pwrite` looped over short transfers, `EINTR` and `EAGAIN`,
//! split at `max_io_bytes`; a transfer of 0 bytes is an error (`UnexpectedEof` for reads,
//! `WriteZero` for writes), never a silent success. Sync is `fdatasync`. Discard is
//! `fallocate(PUNCH_HOLE | KEEP_SIZE)`; on `EOPNOTSUPP` the disk writes zeros instead, and
//! remembers that for the rest of its life (logged once per disk at info level). The op holds
//! its buffer by `&mut`, so nothing here needs `unsafe`.

use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::errno::Errno;
use nix::fcntl::{FallocateFlags, fallocate};
use nix::sys::uio::{pread, pwrite};

use super::file::{DiskOptions, OpenedFile};
use super::{DiskError, IoBuf, IoOp, ZERO_BUF};

/// An open file and what is needed to run ops on it from any thread.
pub(crate) struct FileIo {
    pub name: String,
    file: File,
    /// Whether fallocate(PUNCH_HOLE) works on this file; cleared at the first EOPNOTSUPP.
    punch: AtomicBool,
    zeros: IoBuf,
    max_transfer: u64,
}

impl FileIo {
    pub(crate) fn new(name: String, opened: OpenedFile, opts: &DiskOptions) -> FileIo {
        FileIo {
            name,
            file: opened.file,
            punch: AtomicBool::new(true),
            zeros: IoBuf::zeroed(opts.max_transfer().min(ZERO_BUF as u64) as usize),
            max_transfer: opts.max_transfer(),
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
                })
            }
            IoOp::Sync => self
                .file
                .sync_data()
                .map_err(|e| DiskError::io(&self.name, "sync", 0, e)),
            IoOp::Discard { offset, len } => self.discard(*offset, *len),
        }
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
