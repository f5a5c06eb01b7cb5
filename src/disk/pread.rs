//! [`PreadDisk`]: the fallback backend, `pread`/`pwrite` on a few worker threads per disk.
//!
//! Used where io_uring is unavailable (see [`open_disk`](super::open_disk)). It keeps the
//! contract of [`Disk::submit`]: `submit` only queues the ops and returns; `pread_workers`
//! threads per disk take ops one at a time from a FIFO queue, so the ops of one batch, and of
//! batches from several callers, run in parallel on one disk, and disks do not wait for each
//! other. Buffers move into the queue with their batch and come back through
//! [`Pending::wait`]; a worker holds an op by value while executing it, so nothing here needs
//! `unsafe`.
//!
//! Ops: `pread`/`pwrite` looped over short transfers and `EINTR`, split at `max_io_bytes`;
//! `fdatasync` for Sync; `fallocate(PUNCH_HOLE | KEEP_SIZE)` for Discard, falling back to
//! writing zeros on `EOPNOTSUPP` (remembered for the disk).

use std::collections::VecDeque;
use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;

use nix::errno::Errno;
use nix::fcntl::{FallocateFlags, fallocate};
use nix::sys::uio::{pread, pwrite};

use super::batch::Batch;
use super::file::{DiskOptions, open_file};
use super::{Disk, DiskError, IoBuf, IoOp, Pending, check_batch};

type SharedBatch = Arc<Mutex<Option<Batch>>>;

struct Queue {
    jobs: VecDeque<(SharedBatch, usize)>,
    closed: bool,
}

struct Shared {
    name: String,
    file: File,
    queue: Mutex<Queue>,
    work: Condvar,
    punch: AtomicBool,
    zeros: IoBuf,
    max_transfer: u64,
}

/// A file or block device driven by `pread`/`pwrite` on worker threads.
pub struct PreadDisk {
    size: u64,
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

impl PreadDisk {
    /// Open `path` (a regular file or a block device) and start its worker threads.
    pub fn open(path: &Path, opts: &DiskOptions) -> Result<PreadDisk, DiskError> {
        let name = opts.name_for(path);
        let opened = open_file(path, &name, opts.direct)?;
        let shared = Arc::new(Shared {
            name: name.clone(),
            file: opened.file,
            queue: Mutex::new(Queue {
                jobs: VecDeque::new(),
                closed: false,
            }),
            work: Condvar::new(),
            punch: AtomicBool::new(true),
            zeros: IoBuf::zeroed(opts.max_transfer().min(1 << 20) as usize),
            max_transfer: opts.max_transfer(),
        });
        let mut disk = PreadDisk {
            size: opened.size,
            shared,
            workers: Vec::new(),
        };
        for _ in 0..opts.pread_workers.clamp(1, 64) {
            let shared = disk.shared.clone();
            let t = std::thread::Builder::new()
                .name("shardvol-pread".to_owned())
                .spawn(move || shared.work_loop())
                .map_err(|e| DiskError::io(&name, "spawn thread", 0, e))?;
            disk.workers.push(t);
        }
        tracing::debug!(
            disk = %name,
            size = opened.size,
            block_device = opened.is_block_device,
            workers = disk.workers.len(),
            "opened with pread"
        );
        Ok(disk)
    }
}

impl Disk for PreadDisk {
    fn name(&self) -> &str {
        &self.shared.name
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn submit(&self, ops: Vec<IoOp>) -> Pending {
        if let Err(e) = check_batch(&self.shared.name, self.size, &ops) {
            return Pending::ready(Err(e));
        }
        if ops.is_empty() {
            return Pending::ready(Ok(ops));
        }
        let (pending, completer) = Pending::channel(&self.shared.name);
        let n = ops.len();
        let batch = Arc::new(Mutex::new(Some(Batch::new(ops, completer))));
        let mut q = self
            .shared
            .queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        q.jobs.extend((0..n).map(|i| (batch.clone(), i)));
        drop(q);
        if n == 1 {
            self.shared.work.notify_one();
        } else {
            self.shared.work.notify_all();
        }
        pending
    }

    fn backend(&self) -> &'static str {
        "pread"
    }
}

impl Drop for PreadDisk {
    fn drop(&mut self) {
        self.shared
            .queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .closed = true;
        self.shared.work.notify_all();
        for t in self.workers.drain(..) {
            let _ = t.join();
        }
    }
}

impl Shared {
    fn work_loop(&self) {
        loop {
            let (batch, idx) = {
                let mut q = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
                loop {
                    if let Some(job) = q.jobs.pop_front() {
                        break job;
                    }
                    if q.closed {
                        return;
                    }
                    q = self.work.wait(q).unwrap_or_else(PoisonError::into_inner);
                }
            };
            let op = batch
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .as_mut()
                .and_then(|b| b.take_op(idx));
            let (op, result) = match op {
                Some(mut op) => {
                    let result = self.execute(&mut op);
                    (Some(op), result)
                }
                None => (
                    None,
                    Err(DiskError::io(
                        &self.name,
                        "op",
                        0,
                        std::io::Error::other("internal: op missing"),
                    )),
                ),
            };
            let mut guard = batch.lock().unwrap_or_else(PoisonError::into_inner);
            let Some(b) = guard.as_mut() else { continue };
            if let Some(op) = op {
                b.put_op(idx, op);
            }
            if b.finish(idx, result)
                && let Some(b) = guard.take()
            {
                drop(guard);
                b.complete();
            }
        }
    }

    fn execute(&self, op: &mut IoOp) -> Result<(), DiskError> {
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
                        tracing::info!(disk = %self.name, "hole punching unsupported: discard writes zeros");
                        self.punch.store(false, Ordering::Relaxed);
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
