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
//! Each op runs through [`FileIo`]: `pread`/`pwrite` looped over short transfers and `EINTR`,
//! split at `max_io_bytes`; `fdatasync` for Sync; `fallocate(PUNCH_HOLE | KEEP_SIZE)` for
//! Discard, falling back to writing zeros on `EOPNOTSUPP` (remembered for the disk).

use std::collections::VecDeque;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;

use super::batch::Batch;
use super::blocking::FileIo;
use super::file::{DiskOptions, open_file};
use super::{Disk, DiskError, IoOp, Pending, check_batch};

type SharedBatch = Arc<Mutex<Option<Batch>>>;

struct Queue {
    jobs: VecDeque<(SharedBatch, usize)>,
    closed: bool,
}

struct Shared {
    io: FileIo,
    queue: Mutex<Queue>,
    work: Condvar,
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
        let (size, block_device) = (opened.size, opened.is_block_device);
        let shared = Arc::new(Shared {
            io: FileIo::new(name.clone(), opened, opts),
            queue: Mutex::new(Queue {
                jobs: VecDeque::new(),
                closed: false,
            }),
            work: Condvar::new(),
        });
        let mut disk = PreadDisk {
            size,
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
            size,
            block_device,
            workers = disk.workers.len(),
            "opened with pread"
        );
        Ok(disk)
    }
}

impl Disk for PreadDisk {
    fn name(&self) -> &str {
        &self.shared.io.name
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn submit(&self, ops: Vec<IoOp>) -> Pending {
        if let Err(e) = check_batch(&self.shared.io.name, self.size, &ops) {
            return Pending::ready(Err(e));
        }
        if ops.is_empty() {
            return Pending::ready(Ok(ops));
        }
        let (pending, completer) = Pending::channel(&self.shared.io.name);
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
                    let result = self.io.execute(&mut op);
                    (Some(op), result)
                }
                None => (
                    None,
                    Err(DiskError::io(
                        &self.io.name,
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
}
