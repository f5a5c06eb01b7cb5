//! [`UringDisk`]: a file or block device driven through io_uring.
//!
//! # Design
//!
//! Each disk has one thread that owns its ring, the file and every op in flight. Callers send
//! whole batches to it over a channel and, if the thread is about to sleep or sleeping, poke
//! an eventfd; the thread keeps a `POLL_ADD` on that eventfd in the ring, so a single
//! `io_uring_enter` both submits new work and sleeps until either an op completes or a new batch
//! arrives. (The "sleeping" flag spares busy threads the eventfd round trip: a submitter writes
//! the eventfd only if it sees the flag set, and the thread, after setting it, looks at the
//! channel once more before sleeping; with a SeqCst fence on both sides one of them sees the
//! other.) Each turn of its loop the thread:
//!
//! 1. takes every batch waiting in the channel and turns its ops into entries of a FIFO backlog;
//! 2. moves entries from the backlog into the submission queue while fewer than
//!    `ring_depth - 1` ops are in the kernel (one slot stays for the eventfd poll). This is the
//!    back-pressure: beyond the ring's depth ops wait in the backlog, in order;
//! 3. calls `io_uring_enter` once (submit everything, wait for at least one completion);
//! 4. reaps every completion: a short read or write goes back to the front of the backlog for
//!    its remainder; a finished op is recorded in its batch, and the last op of a batch hands
//!    the batch (buffers and all) to the waiting [`Pending`](super::Pending).
//!
//! Disks do not share a thread, so submissions to several disks proceed in parallel, and a
//! slow disk delays only its own ops. Completion queue overflow cannot happen: at most
//! `ring_depth` requests are in the kernel and the completion queue has twice as many entries.
//!
//! # Buffer ownership (why handing raw addresses to the kernel is sound)
//!
//! A buffer's address goes into a submission entry only while the buffer sits in the thread's
//! batch table, and it leaves that table only when its last completion has been reaped. The
//! caller's [`Pending`](super::Pending) holds nothing but a result slot, so dropping it frees
//! nothing early. [`IoBuf`] keeps a raw pointer to its heap bytes, so moving the `IoBuf` value
//! (the tables grow) does not move or re-borrow the bytes. The file descriptor and the zero
//! buffer used by discard also belong to the thread, which leaves its loop only when no request
//! is in the kernel; dropping a `UringDisk` waits for that. If the thread ever unwound with
//! requests in flight, it leaks their buffers instead of freeing them (and fails their
//! batches with [`DiskError::Gone`]).
//!
//! # Ops
//!
//! Read/Write: `IORING_OP_READ`/`WRITE` at the offset, split at `max_io_bytes`, and resubmitted
//! for the remainder after a short transfer or `EINTR`/`EAGAIN`; a zero-byte transfer is an
//! error (end of file, or a device that accepts nothing). Sync: `IORING_OP_FSYNC` with
//! `DATASYNC`. Discard: `IORING_OP_FALLOCATE` with `PUNCH_HOLE | KEEP_SIZE` (on a block device
//! the kernel turns this into a zero-out that unmaps when it can and fails rather than write
//! zeros); where that gives `EOPNOTSUPP`, the disk writes zeros over the range instead, and
//! remembers to do so from then on.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering, fence};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;

use io_uring::{IoUring, opcode, types};

use super::batch::Batch;
use super::file::{DiskOptions, open_file};
use super::{Completer, Disk, DiskError, IoBuf, IoOp, Pending, ZERO_BUF, check_batch};

/// user_data of the eventfd poll; op slots use their index, which never comes near it.
const WAKE_TOKEN: u64 = u64::MAX;

struct Submission {
    ops: Vec<IoOp>,
    completer: Completer,
}

/// How submitters wake the disk thread.
struct Wake {
    eventfd: File,
    /// Set by the thread before it sleeps in io_uring_enter; cleared by whoever wakes it.
    sleeping: AtomicBool,
}

impl Wake {
    fn poke(&self) {
        // A full counter (EAGAIN) still wakes the poll, so the result does not matter.
        let _ = (&self.eventfd).write(&1u64.to_ne_bytes());
    }

    /// After sending a batch: wake the thread if it may be asleep.
    fn notify(&self) {
        fence(Ordering::SeqCst);
        if self.sleeping.swap(false, Ordering::SeqCst) {
            self.poke();
        }
    }
}

/// A file or block device driven through io_uring by a thread of its own.
pub struct UringDisk {
    name: String,
    size: u64,
    tx: Option<mpsc::Sender<Submission>>,
    wake: Arc<Wake>,
    thread: Option<JoinHandle<()>>,
}

impl UringDisk {
    /// Open `path` (a regular file or a block device) and start its ring thread.
    ///
    /// Fails with `DiskError::Io { op: "io_uring_setup", .. }` if the ring cannot be created;
    /// [`open_disk`](super::open_disk) then falls back to the pread backend.
    pub fn open(path: &Path, opts: &DiskOptions) -> Result<UringDisk, DiskError> {
        let name = opts.name_for(path);
        let opened = open_file(path, &name, opts.direct)?;
        let eventfd = eventfd().map_err(|e| DiskError::io(&name, "eventfd", 0, e))?;
        let wake = Arc::new(Wake {
            eventfd,
            sleeping: AtomicBool::new(false),
        });
        // The kernel refuses more than 32768 entries (EINVAL): that is reported as a setup
        // failure like any other, so open_disk falls back rather than silently shrinking.
        let depth = opts
            .ring_depth
            .max(4)
            .checked_next_power_of_two()
            .unwrap_or(u32::MAX);
        let (tx, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let worker_wake = wake.clone();
        let worker_name = name.clone();
        let max_transfer = opts.max_transfer();
        let thread = std::thread::Builder::new()
            .name("shardvol-uring".to_owned())
            .spawn(move || {
                let ring = match new_ring(depth) {
                    Ok(ring) => ring,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                let cq_entries = ring.params().cq_entries() as usize;
                let sq_entries = ring.params().sq_entries() as usize;
                let worker = Worker {
                    name: worker_name,
                    ring,
                    file: opened.file,
                    wake: worker_wake,
                    batches: Slab::default(),
                    ops: Slab::default(),
                    backlog: VecDeque::new(),
                    in_ring: 0,
                    max_in_ring: sq_entries.saturating_sub(1).max(1),
                    max_transfer,
                    zeros: IoBuf::zeroed(ZERO_BUF),
                    punch: true,
                    cqes: Vec::with_capacity(cq_entries),
                };
                worker.run(rx);
            })
            .map_err(|e| DiskError::io(&name, "spawn thread", 0, e))?;
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(DiskError::io(&name, "io_uring_setup", 0, e));
            }
            Err(_) => {
                let _ = thread.join();
                return Err(DiskError::io(
                    &name,
                    "io_uring_setup",
                    0,
                    std::io::Error::other("ring thread died"),
                ));
            }
        }
        tracing::debug!(
            disk = %name,
            size = opened.size,
            block_device = opened.is_block_device,
            depth,
            direct = opts.direct,
            "opened with io_uring"
        );
        Ok(UringDisk {
            name,
            size: opened.size,
            tx: Some(tx),
            wake,
            thread: Some(thread),
        })
    }
}

impl Disk for UringDisk {
    fn name(&self) -> &str {
        &self.name
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn submit(&self, ops: Vec<IoOp>) -> Pending {
        if let Err(e) = check_batch(&self.name, self.size, &ops) {
            return Pending::ready(Err(e));
        }
        if ops.is_empty() {
            return Pending::ready(Ok(ops));
        }
        let (pending, completer) = Pending::channel(&self.name);
        // If the thread is gone, the submission (and its completer) is dropped here: the
        // waiter gets DiskError::Gone.
        if let Some(tx) = &self.tx
            && tx.send(Submission { ops, completer }).is_ok()
        {
            self.wake.notify();
        }
        pending
    }

    fn backend(&self) -> &'static str {
        "io_uring"
    }
}

impl Drop for UringDisk {
    fn drop(&mut self) {
        // Closing the channel tells the thread to finish what is in flight and stop.
        self.tx = None;
        self.wake.poke();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn new_ring(depth: u32) -> std::io::Result<IoUring> {
    // Only the disk thread submits: let the kernel skip cross-thread locking and interrupts
    // (Linux 5.19 / 6.0); older kernels refuse the flags, then a plain ring is used.
    IoUring::builder()
        .setup_coop_taskrun()
        .setup_single_issuer()
        .build(depth)
        .or_else(|_| IoUring::new(depth))
}

fn eventfd() -> std::io::Result<File> {
    // SAFETY: eventfd takes no pointers; the result is checked below.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// A minimal slab: stable indices, reused after removal.
struct Slab<T> {
    entries: Vec<Option<T>>,
    free: Vec<usize>,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Slab {
            entries: Vec::new(),
            free: Vec::new(),
        }
    }
}

impl<T> Slab<T> {
    fn insert(&mut self, value: T) -> usize {
        match self.free.pop() {
            Some(i) => {
                self.entries[i] = Some(value);
                i
            }
            None => {
                self.entries.push(Some(value));
                self.entries.len() - 1
            }
        }
    }

    fn get_mut(&mut self, i: usize) -> Option<&mut T> {
        self.entries.get_mut(i).and_then(Option::as_mut)
    }

    fn get(&self, i: usize) -> Option<&T> {
        self.entries.get(i).and_then(Option::as_ref)
    }

    fn remove(&mut self, i: usize) -> Option<T> {
        let v = self.entries.get_mut(i).and_then(Option::take);
        if v.is_some() {
            self.free.push(i);
        }
        v
    }

    fn drain(&mut self) -> impl Iterator<Item = T> + '_ {
        self.free.clear();
        self.entries.drain(..).flatten()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    Sync,
    /// Discard by fallocate(PUNCH_HOLE | KEEP_SIZE).
    Punch,
    /// Discard by writing zeros.
    Zero,
}

/// One op of a batch, as the thread tracks it.
struct InFlight {
    batch: usize,
    idx: usize,
    kind: Kind,
    offset: u64,
    len: u64,
    /// Bytes already transferred (reads, writes, zero-writes).
    done: u64,
}

enum Step {
    Done,
    Again,
    Failed(std::io::Error),
}

struct Worker {
    name: String,
    ring: IoUring,
    file: File,
    wake: Arc<Wake>,
    batches: Slab<Batch>,
    ops: Slab<InFlight>,
    /// Op slots waiting for room in the ring, oldest first (continuations go to the front).
    backlog: VecDeque<usize>,
    /// Requests in the kernel, not counting the eventfd poll.
    in_ring: usize,
    max_in_ring: usize,
    max_transfer: u64,
    zeros: IoBuf,
    /// Whether fallocate(PUNCH_HOLE) works on this file; cleared at the first EOPNOTSUPP.
    punch: bool,
    cqes: Vec<(u64, i32)>,
}

impl Worker {
    fn run(mut self, rx: mpsc::Receiver<Submission>) {
        let mut open = true;
        let mut poll_armed = false;
        loop {
            while open {
                match rx.try_recv() {
                    Ok(sub) => self.accept(sub),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => open = false,
                }
            }
            self.fill_ring();
            if !open && self.in_ring == 0 && self.backlog.is_empty() {
                break;
            }
            if open && !poll_armed {
                let poll = opcode::PollAdd::new(
                    types::Fd(self.wake.eventfd.as_raw_fd()),
                    libc::POLLIN as u32,
                )
                .build()
                .user_data(WAKE_TOKEN);
                // SAFETY: a poll references no memory; the eventfd is kept open by self.wake
                // for as long as the ring exists.
                poll_armed = unsafe { self.ring.submission().push(&poll) }.is_ok();
            }
            if open {
                self.wake.sleeping.store(true, Ordering::SeqCst);
                fence(Ordering::SeqCst);
                match rx.try_recv() {
                    Ok(sub) => {
                        self.wake.sleeping.store(false, Ordering::SeqCst);
                        self.accept(sub);
                        continue;
                    }
                    Err(mpsc::TryRecvError::Empty) => {}
                    Err(mpsc::TryRecvError::Disconnected) => {
                        self.wake.sleeping.store(false, Ordering::SeqCst);
                        open = false;
                        continue;
                    }
                }
            }
            if let Err(e) = self.ring.submit_and_wait(1) {
                match e.raw_os_error() {
                    Some(libc::EINTR | libc::EAGAIN | libc::EBUSY) => {}
                    _ => {
                        tracing::error!(disk = %self.name, "io_uring_enter: {e}");
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                }
            }
            self.wake.sleeping.store(false, Ordering::SeqCst);
            self.cqes
                .extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
            let mut cqes = std::mem::take(&mut self.cqes);
            for (user_data, result) in cqes.drain(..) {
                if user_data == WAKE_TOKEN {
                    poll_armed = false;
                    let mut counter = [0u8; 8];
                    let _ = (&self.wake.eventfd).read(&mut counter);
                } else {
                    self.reaped(user_data as usize, result);
                }
            }
            self.cqes = cqes;
        }
    }

    fn accept(&mut self, sub: Submission) {
        let Submission { ops, completer } = sub;
        let meta: Vec<(Kind, u64, u64)> = ops
            .iter()
            .map(|op| {
                let kind = match op {
                    IoOp::Read { .. } => Kind::Read,
                    IoOp::Write { .. } => Kind::Write,
                    IoOp::Sync => Kind::Sync,
                    IoOp::Discard { .. } if self.punch => Kind::Punch,
                    IoOp::Discard { .. } => Kind::Zero,
                };
                (kind, op.offset(), op.len())
            })
            .collect();
        let b = self.batches.insert(Batch::new(ops, completer));
        let mut all_done = false;
        for (idx, (kind, offset, len)) in meta.into_iter().enumerate() {
            if len == 0 && kind != Kind::Sync {
                if let Some(batch) = self.batches.get_mut(b) {
                    all_done = batch.finish(idx, Ok(()));
                }
                continue;
            }
            let slot = self.ops.insert(InFlight {
                batch: b,
                idx,
                kind,
                offset,
                len,
                done: 0,
            });
            self.backlog.push_back(slot);
        }
        if all_done && let Some(batch) = self.batches.remove(b) {
            batch.complete();
        }
    }

    fn fill_ring(&mut self) {
        while self.in_ring < self.max_in_ring {
            let Some(&slot) = self.backlog.front() else {
                break;
            };
            let Some(entry) = self.entry(slot) else {
                // Cannot happen: every backlog slot has an op and a batch. Fail it rather
                // than spin.
                self.backlog.pop_front();
                let e = std::io::Error::other("internal: op lost its batch");
                self.finish(slot, Err(e));
                continue;
            };
            // SAFETY: the entry points into (a) a buffer held by a batch in self.batches, which
            // stays there until this op's completion has been reaped (see the module docs), or
            // (b) self.zeros, or names self.file; both live as long as this Worker, and run()
            // returns only when no request is in the kernel.
            if unsafe { self.ring.submission().push(&entry) }.is_err() {
                break;
            }
            self.backlog.pop_front();
            self.in_ring += 1;
        }
    }

    /// The submission entry for the (next part of the) op in `slot`.
    fn entry(&mut self, slot: usize) -> Option<io_uring::squeue::Entry> {
        let fd = types::Fd(self.file.as_raw_fd());
        let op = self.ops.get(slot)?;
        let pos = op.offset + op.done;
        let rest = op.len - op.done;
        let entry = match op.kind {
            Kind::Read | Kind::Write => {
                let chunk = rest.min(self.max_transfer) as u32;
                let done = op.done as usize;
                let kind = op.kind;
                let buf = match self.batches.get_mut(op.batch)?.op_mut(op.idx)? {
                    IoOp::Read { buf, .. } | IoOp::Write { buf, .. } => buf,
                    _ => return None,
                };
                if kind == Kind::Read {
                    opcode::Read::new(fd, buf.as_mut_ptr().wrapping_add(done), chunk)
                        .offset(pos)
                        .build()
                } else {
                    opcode::Write::new(fd, buf.as_ptr().wrapping_add(done), chunk)
                        .offset(pos)
                        .build()
                }
            }
            Kind::Zero => {
                let chunk = rest.min(self.zeros.len() as u64).min(self.max_transfer) as u32;
                opcode::Write::new(fd, self.zeros.as_ptr(), chunk)
                    .offset(pos)
                    .build()
            }
            Kind::Sync => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            Kind::Punch => opcode::Fallocate::new(fd, op.len)
                .offset(op.offset)
                .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
                .build(),
        };
        Some(entry.user_data(slot as u64))
    }

    fn reaped(&mut self, slot: usize, result: i32) {
        self.in_ring = self.in_ring.saturating_sub(1);
        let Some(op) = self.ops.get_mut(slot) else {
            tracing::error!(disk = %self.name, slot, "completion for an unknown op");
            return;
        };
        let step = if result < 0 {
            match -result {
                libc::EINTR | libc::EAGAIN => Step::Again,
                libc::EOPNOTSUPP if op.kind == Kind::Punch => {
                    tracing::info!(disk = %self.name, "hole punching unsupported: discard writes zeros");
                    self.punch = false;
                    op.kind = Kind::Zero;
                    Step::Again
                }
                errno => Step::Failed(std::io::Error::from_raw_os_error(errno)),
            }
        } else {
            match op.kind {
                Kind::Sync | Kind::Punch => Step::Done,
                Kind::Read | Kind::Write | Kind::Zero => {
                    op.done += result as u64;
                    if op.done >= op.len {
                        Step::Done
                    } else if result > 0 {
                        Step::Again
                    } else if op.kind == Kind::Read {
                        Step::Failed(std::io::ErrorKind::UnexpectedEof.into())
                    } else {
                        Step::Failed(std::io::ErrorKind::WriteZero.into())
                    }
                }
            }
        };
        match step {
            Step::Again => self.backlog.push_front(slot),
            Step::Done => self.finish(slot, Ok(())),
            Step::Failed(e) => self.finish(slot, Err(e)),
        }
    }

    fn finish(&mut self, slot: usize, result: std::io::Result<()>) {
        let Some(op) = self.ops.remove(slot) else {
            return;
        };
        let Some(batch) = self.batches.get_mut(op.batch) else {
            return;
        };
        let name = match op.kind {
            Kind::Read => "read",
            Kind::Write => "write",
            Kind::Sync => "sync",
            Kind::Punch | Kind::Zero => "discard",
        };
        let result = result.map_err(|e| DiskError::io(&self.name, name, op.offset + op.done, e));
        if batch.finish(op.idx, result)
            && let Some(batch) = self.batches.remove(op.batch)
        {
            batch.complete();
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if self.in_ring > 0 {
            // Only reached if run() unwound with requests in the kernel: their buffers may
            // still be written to, so they are leaked, never freed. Waiters get Gone.
            tracing::error!(disk = %self.name, in_ring = self.in_ring, "disk thread stopped with I/O in flight");
            for batch in self.batches.drain() {
                batch.abandon();
            }
            std::mem::forget(std::mem::replace(&mut self.zeros, IoBuf::zeroed(0)));
        }
    }
}
