//! [`InlineDisk`]: a file or block device whose ops run in the submitting thread, with plain
//! `pread`/`pwrite`/`fdatasync`/`fallocate`.
//!
//! # Why
//!
//! With buffered I/O (the default, through the page cache) a 4 KiB read or write costs a few
//! microseconds as a direct system call. Handing it to another thread costs more than that: the
//! hop to the ring or worker thread, for buffered io_uring writes a second hop to an io-wq kernel
//! worker, and the wake-up of the caller at completion. Running the op where it is submitted
//! removes all three (see `docs/disks.md` for the measurements).
//!
//! # What it keeps of the [`Disk::submit`](super::Disk::submit) contract
//!
//! Everything that concerns results: a batch is checked whole before anything runs (an
//! unaligned or out-of-range op fails the batch with nothing done); every op of a valid batch
//! runs, even after an earlier one failed, and [`Pending::wait`] reports the error of the
//! lowest-indexed failed op; errors are values, never panics; short transfers, `EINTR` and
//! `EAGAIN` are continued; Sync is `fdatasync`; Discard punches a hole and falls back to writing
//! zeros where that is unsupported, like [`PreadDisk`](super::PreadDisk) (both run ops through
//! `FileIo`). Buffers never leave the caller's thread, so dropping the returned [`Pending`] is
//! trivially safe.
//!
//! # What it gives up
//!
//! `submit` does not return at once: it returns when every op of the batch is done, with
//! [`Pending::ready`]. So the ops of one batch run one after the other, and a caller that
//! submits to several disks before waiting gets them one disk after the other, not in parallel.
//! With the page cache this costs little (a write is a memory copy, a read of a cached page too)
//! and saves the thread hops; a caller that wants parallelism across disks gets it from its own
//! threads (NBD requests in flight, destage workers), since any number of threads may submit to
//! one `InlineDisk` at once. It is the wrong choice for `O_DIRECT` on real devices, and for
//! buffered reads that miss the cache: every op then waits for the device, and a batch of 19 ops
//! takes 19 device latencies instead of about one. [`open_disk`](super::open_disk) therefore
//! chooses it automatically only when `direct` is off (see [`Backend::Auto`](super::Backend)).

use std::path::Path;

use super::blocking::FileIo;
use super::file::{DiskOptions, open_file};
use super::{Disk, DiskError, IoOp, Pending, check_batch};

/// A file or block device whose ops run in the thread that submits them.
pub struct InlineDisk {
    size: u64,
    io: FileIo,
    /// Opened with `O_DIRECT`: every op waits for the device.
    direct: bool,
}

impl InlineDisk {
    /// Open `path` (a regular file or a block device). No thread is started.
    pub fn open(path: &Path, opts: &DiskOptions) -> Result<InlineDisk, DiskError> {
        let name = opts.name_for(path);
        let opened = open_file(path, &name, opts.direct)?;
        let (size, block_device) = (opened.size, opened.is_block_device);
        tracing::debug!(disk = %name, size, block_device, "opened with inline system calls");
        Ok(InlineDisk {
            size,
            io: FileIo::new(name, opened, opts),
            direct: opts.direct,
        })
    }
}

impl Disk for InlineDisk {
    fn name(&self) -> &str {
        &self.io.name
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn submit(&self, mut ops: Vec<IoOp>) -> Pending {
        if let Err(e) = check_batch(&self.io.name, self.size, &ops) {
            return Pending::ready(Err(e));
        }
        // Every op runs, as on the other backends; the first failure is the one reported.
        let mut first_error = None;
        for op in &mut ops {
            if let Err(e) = self.io.execute(op) {
                first_error.get_or_insert(e);
            }
        }
        Pending::ready(match first_error {
            Some(e) => Err(e),
            None => Ok(ops),
        })
    }

    fn backend(&self) -> &'static str {
        "inline"
    }

    fn completes_in_submit(&self) -> bool {
        !self.direct
    }
}
