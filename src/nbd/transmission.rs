//! Transmission phase: reading requests, running them on the volume, sending replies.
//!
//! Promises:
//! - **Pipelining.** Requests of one connection run concurrently on the server's worker
//!   threads (`workers.rs`: volume calls block); each reply is queued as soon as its request
//!   completes, so replies can be out of order. One writer task per connection owns the
//!   socket's write half: it writes every reply waiting at that moment together (small frames
//!   gathered into one buffer), so a deep queue of small requests costs one `write` per batch,
//!   not per reply. Each reply frame is written whole and never interleaved with another.
//! - **Bounded memory.** Before a request's buffer is allocated (write payload, read buffer,
//!   block-status reply), the reader takes that many bytes from a per-connection budget
//!   (`ServerConfig::max_in_flight_bytes`) and one slot from a request budget
//!   (`max_requests_in_flight`); both come back when the reply has been written. When either
//!   is exhausted the reader stops reading the socket, and the client is pushed back by flow
//!   control. Refusals hold a request slot until written too. No allocation depends on a
//!   client-given size beyond `MAX_PAYLOAD`.
//! - **Validation from the header.** Unknown commands, unknown or unadvertised flags, lengths
//!   over the maximum, ranges past the end and changes to a read-only export are refused
//!   before the volume sees them. A WRITE refused for any other reason has its payload read
//!   and discarded so the stream stays in sync; a WRITE longer than `MAX_PAYLOAD` is refused
//!   with `NBD_EINVAL` and the connection is then closed, since its payload cannot be skipped.
//! - **Ending.** On `NBD_CMD_DISC`, a bad request magic or server shutdown, the reader stops,
//!   every request already read runs and is answered, then the connection closes. When the
//!   client vanishes (EOF or error mid-stream) or stops taking replies for
//!   `reply_write_timeout`, requests that have not started yet are dropped without running;
//!   requests already inside the volume finish. See `docs/nbd.md` for why. At shutdown, a
//!   request still waiting for budget or for its payload is answered `NBD_ESHUTDOWN`.
//!
//! Each request runs in a `nbd_request` tracing span carrying its cookie; a request still in
//! the volume after `slow_request_warning` is logged while it runs, and again when it ends.

use std::io;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tracing::{Instrument, debug, debug_span, info, warn};

use super::config::{BLOCK_STATUS_MAX_EXTENTS, BLOCK_STATUS_MAX_QUERY, ServerConfig, ServerStats};
use super::errors::{Refusal, error_offset};
use super::export::Export;
use super::handshake::Negotiated;
use super::wire::{self, Command, Request};
use super::workers::Workers;
use crate::layout::BLOCK_SIZE_U64;
use crate::volume::{Extent, VolumeError};

/// Why the reader stopped.
#[derive(Debug)]
enum End {
    Disc,
    Shutdown,
    BadMagic(u32),
    /// A WRITE longer than the maximum payload: its data cannot be skipped.
    Unsyncable,
    /// EOF or read error: the client is gone.
    Vanished(io::Error),
    /// Writing a reply failed or timed out: the client is gone.
    ReplyFailed,
}

/// State shared by the reader, the request jobs and the reply writer of one connection.
struct Conn {
    /// Reply frames for the writer task, in the order they are sent.
    replies: mpsc::UnboundedSender<Outgoing>,
    export: Arc<Export>,
    structured: bool,
    base_allocation: Option<u32>,
    flags: u16,
    /// Set once the client is known to be gone; requests that have not started are dropped.
    gone: watch::Sender<bool>,
    stats: Arc<ServerStats>,
}

/// Budgets a request holds until its reply has been written: one request slot and, for a
/// request that holds a buffer, its bytes.
struct Budget {
    _slot: OwnedSemaphorePermit,
    _bytes: Option<OwnedSemaphorePermit>,
}

/// What the writer task receives.
enum Outgoing {
    Reply(Reply),
    /// Every reply has been queued: shut the socket's sending side down and stop.
    Close,
}

/// One complete reply frame, and what to give back once it is written.
struct Reply {
    cookie: u64,
    frame: Vec<u8>,
    /// Bytes counted in `ServerStats::bytes_in_flight` for this request.
    cost: u64,
    _budget: Option<Budget>,
}

impl Conn {
    fn is_gone(&self) -> bool {
        *self.gone.borrow()
    }

    /// Queues a complete reply frame for the writer task; its budget is released once written
    /// (or once the connection is found dead).
    fn reply(&self, cookie: u64, frame: Vec<u8>, cost: u64, budget: Option<Budget>) {
        let r = Reply {
            cookie,
            frame,
            cost,
            _budget: budget,
        };
        if let Err(mpsc::error::SendError(Outgoing::Reply(r))) =
            self.replies.send(Outgoing::Reply(r))
        {
            // The writer has stopped (only after `Close`, which comes after every request).
            self.stats.release_bytes(r.cost);
        }
    }

    /// A complete error reply for `cookie`.
    fn error_frame(&self, cookie: u64, error: u32, message: &str, offset: Option<u64>) -> Vec<u8> {
        if self.structured {
            wire::structured_error(cookie, error, message, offset)
        } else {
            wire::simple_reply(error, cookie)
        }
    }
}

/// Replies waiting in the channel are written together, up to this many bytes per write
/// call: under a deep queue of small requests, one `write` carries many replies.
const REPLY_BATCH_BYTES: usize = 256 * 1024;

/// The writer task of a connection: takes reply frames as they are queued and writes every
/// frame waiting at that moment with as few calls as possible (small frames are gathered into
/// one buffer; a large READ reply is written from its own buffer). A failed or timed-out write
/// marks the client gone; later replies are then dropped, with their budgets. Ends at
/// [`Outgoing::Close`], shutting the sending side down unless the stream is broken.
async fn write_replies<W: AsyncWrite + Unpin>(
    mut w: W,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    gone: watch::Sender<bool>,
    stats: Arc<ServerStats>,
    timeout: std::time::Duration,
) {
    let mut dead = false;
    let mut batch: Vec<Reply> = Vec::new();
    let mut gather: Vec<u8> = Vec::new();
    let mut closing = false;
    while !closing {
        match rx.recv().await {
            Some(Outgoing::Reply(r)) => batch.push(r),
            Some(Outgoing::Close) | None => break,
        }
        loop {
            match rx.try_recv() {
                Ok(Outgoing::Reply(r)) => batch.push(r),
                Ok(Outgoing::Close) => {
                    closing = true;
                    break;
                }
                Err(_) => break,
            }
        }
        if !dead {
            let res = tokio::time::timeout(timeout, async {
                for r in &batch {
                    if r.frame.len() >= REPLY_BATCH_BYTES / 4 {
                        if !gather.is_empty() {
                            w.write_all(&gather).await?;
                            gather.clear();
                        }
                        w.write_all(&r.frame).await?;
                    } else {
                        gather.extend_from_slice(&r.frame);
                        if gather.len() >= REPLY_BATCH_BYTES {
                            w.write_all(&gather).await?;
                            gather.clear();
                        }
                    }
                }
                if !gather.is_empty() {
                    w.write_all(&gather).await?;
                    gather.clear();
                }
                w.flush().await
            })
            .await
            .unwrap_or_else(|_| {
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "reply write timed out",
                ))
            });
            if let Err(e) = res {
                debug!("replies not sent: {e}");
                // The stream may hold a partial frame: write nothing more.
                dead = true;
                gather.clear();
                gone.send_replace(true);
            }
        }
        for r in batch.drain(..) {
            if !dead {
                debug!(cookie = r.cookie, error = reply_error(&r.frame), "replied");
            }
            stats.release_bytes(r.cost);
        }
    }
    if !dead {
        let _ = tokio::time::timeout(timeout, w.shutdown()).await;
    }
}

/// A validated request, ready for the volume.
#[derive(Clone, Copy, Debug)]
enum Op {
    Read {
        offset: u64,
        len: u32,
    },
    Write {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        len: u32,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        len: u32,
        no_hole: bool,
        fua: bool,
    },
    Cache,
    BlockStatus {
        offset: u64,
        len: u32,
        req_one: bool,
        context: u32,
    },
}

impl Op {
    fn command(&self) -> Command {
        match self {
            Op::Read { .. } => Command::Read,
            Op::Write { .. } => Command::Write,
            Op::Flush => Command::Flush,
            Op::Trim { .. } => Command::Trim,
            Op::WriteZeroes { .. } => Command::WriteZeroes,
            Op::Cache => Command::Cache,
            Op::BlockStatus { .. } => Command::BlockStatus,
        }
    }

    /// Payload bytes this request holds in memory while in flight.
    fn buffer_bytes(&self) -> u64 {
        match *self {
            Op::Read { len, .. } | Op::Write { len, .. } => len as u64,
            Op::BlockStatus { len, .. } => {
                let extents = (len as u64).min(BLOCK_STATUS_MAX_QUERY) / BLOCK_SIZE_U64 + 2;
                8 * extents.min(BLOCK_STATUS_MAX_EXTENTS as u64) + 32
            }
            _ => 0,
        }
    }
}

/// Checks a request against the header rules and the export; see the module docs.
fn validate(conn: &Conn, req: &Request, cmd: Option<Command>) -> Result<Op, Refusal> {
    let Some(cmd) = cmd else {
        return Err(Refusal::new(
            wire::EINVAL,
            format!("unknown command type {}", req.kind),
        ));
    };
    let bad = req.flags & !cmd.allowed_flags();
    if bad != 0 {
        return Err(Refusal::new(
            wire::EINVAL,
            format!("flags {bad:#x} are not valid for {}", cmd.name()),
        ));
    }
    if cmd.modifies() && conn.export.read_only {
        return Err(Refusal::from_volume(&VolumeError::ReadOnly, cmd));
    }
    for (flag, needs) in [
        (wire::CMD_FLAG_FUA, wire::FLAG_SEND_FUA),
        (wire::CMD_FLAG_DF, wire::FLAG_SEND_DF),
        (wire::CMD_FLAG_FAST_ZERO, wire::FLAG_SEND_FAST_ZERO),
    ] {
        if req.flags & flag != 0 && conn.flags & needs == 0 {
            return Err(Refusal::new(
                wire::EINVAL,
                format!("flag {flag:#x} was not negotiated"),
            ));
        }
    }
    let has = |f: u16| req.flags & f != 0;
    let (offset, len) = (req.offset, req.len);
    if matches!(cmd, Command::Read | Command::Write) && len > wire::MAX_PAYLOAD {
        return Err(Refusal::new(
            wire::EINVAL,
            format!(
                "length {len} exceeds the {} byte maximum",
                wire::MAX_PAYLOAD
            ),
        ));
    }
    if cmd == Command::Flush {
        if offset != 0 || len != 0 {
            return Err(Refusal::new(
                wire::EINVAL,
                "FLUSH must have zero offset and length",
            ));
        }
        return Ok(Op::Flush);
    }
    let size = conn.export.device.size();
    if offset.checked_add(len as u64).is_none_or(|end| end > size) {
        let err = VolumeError::OutOfRange {
            offset,
            len: len as u64,
            size,
        };
        return Err(Refusal::from_volume(&err, cmd));
    }
    Ok(match cmd {
        Command::Read => Op::Read { offset, len },
        Command::Write => Op::Write {
            offset,
            len,
            fua: has(wire::CMD_FLAG_FUA),
        },
        Command::Trim => Op::Trim {
            offset,
            len,
            fua: has(wire::CMD_FLAG_FUA),
        },
        Command::Cache => Op::Cache,
        Command::WriteZeroes => {
            let no_hole = has(wire::CMD_FLAG_NO_HOLE);
            if has(wire::CMD_FLAG_FAST_ZERO) && !fast_zero_possible(offset, len, no_hole) {
                return Err(Refusal::new(
                    wire::ENOTSUP,
                    "zeroing this range is no faster than writing it",
                ));
            }
            Op::WriteZeroes {
                offset,
                len,
                no_hole,
                fua: has(wire::CMD_FLAG_FUA),
            }
        }
        Command::BlockStatus => {
            let Some(context) = conn.base_allocation else {
                return Err(Refusal::new(
                    wire::EINVAL,
                    "no metadata context was negotiated",
                ));
            };
            if len == 0 {
                return Err(Refusal::new(wire::EINVAL, "BLOCK_STATUS of zero length"));
            }
            Op::BlockStatus {
                offset,
                len,
                req_one: has(wire::CMD_FLAG_REQ_ONE),
                context,
            }
        }
        Command::Flush | Command::Disc => unreachable!("handled above and by the reader"),
    })
}

/// `NBD_CMD_FLAG_FAST_ZERO` policy: zeroing is fast only when the volume can drop whole blocks
/// (no `NO_HOLE`) and the range covers at least one whole 4 KiB block; otherwise it would be a
/// read-modify-write or a full write of zeros, no faster than a WRITE, so the spec wants
/// `NBD_ENOTSUP` at once.
fn fast_zero_possible(offset: u64, len: u32, no_hole: bool) -> bool {
    let first_whole = offset.div_ceil(BLOCK_SIZE_U64);
    let end_whole = (offset + len as u64) / BLOCK_SIZE_U64;
    !no_hole && end_whole > first_whole
}

/// Runs the transmission phase until the connection ends. Volume calls run on `workers`.
pub async fn run<R, W>(
    mut reader: R,
    writer: W,
    neg: Negotiated,
    workers: Arc<Workers>,
    stats: Arc<ServerStats>,
    config: ServerConfig,
    mut shutdown: watch::Receiver<bool>,
) where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let max_requests = config.max_requests_in_flight.max(1);
    let max_bytes = config.max_in_flight_bytes.max(1);
    let (tx, rx) = mpsc::unbounded_channel();
    let gone = watch::Sender::new(false);
    let writer_task = tokio::spawn(
        write_replies(
            writer,
            rx,
            gone.clone(),
            stats.clone(),
            config.reply_write_timeout,
        )
        .in_current_span(),
    );
    let conn = Arc::new(Conn {
        replies: tx,
        export: neg.export,
        structured: neg.structured,
        base_allocation: neg.base_allocation,
        flags: neg.flags,
        gone,
        stats,
    });
    let slots = Arc::new(Semaphore::new(max_requests as usize));
    let bytes = Arc::new(Semaphore::new(max_bytes as usize));
    let mut gone = conn.gone.subscribe();

    let end = loop {
        let mut hdr = [0u8; wire::REQUEST_LEN];
        let read = tokio::select! {
            biased;
            _ = shutdown.wait_for(|s| *s) => break End::Shutdown,
            _ = gone.wait_for(|g| *g) => break End::ReplyFailed,
            r = reader.read_exact(&mut hdr) => r,
        };
        if let Err(e) = read {
            break End::Vanished(e);
        }
        let req = match Request::decode(&hdr) {
            Ok(r) => r,
            Err(wire::BadMagic(m)) => break End::BadMagic(m),
        };
        conn.stats.request_received();
        let cmd = Command::from_wire(req.kind);
        if cmd == Some(Command::Disc) {
            break End::Disc;
        }

        let op = match validate(&conn, &req, cmd) {
            Ok(op) => op,
            Err(refusal) => {
                debug!(
                    cookie = req.cookie,
                    kind = req.kind,
                    error = refusal.error,
                    "refused: {}",
                    refusal.message
                );
                let mut end = None;
                if cmd == Some(Command::Write) {
                    if req.len > wire::MAX_PAYLOAD {
                        end = Some(End::Unsyncable);
                    } else {
                        match unless_shutdown(&mut shutdown, discard(&mut reader, req.len as u64))
                            .await
                        {
                            Some(Ok(())) => {}
                            Some(Err(e)) => break End::Vanished(e),
                            None => break End::Shutdown,
                        }
                    }
                }
                // A refusal holds a request slot until written, like any reply: a client that
                // sends only bad requests and reads no replies is pushed back too.
                let Some(Ok(slot)) =
                    unless_shutdown(&mut shutdown, slots.clone().acquire_owned()).await
                else {
                    break End::Shutdown;
                };
                let budget = Budget {
                    _slot: slot,
                    _bytes: None,
                };
                let frame = conn.error_frame(req.cookie, refusal.error, &refusal.message, None);
                conn.reply(req.cookie, frame, 0, Some(budget));
                match end {
                    Some(end) => break end,
                    None => continue,
                }
            }
        };

        // Back-pressure: wait for a slot and for the bytes before reading or allocating anything
        // more. A shutdown that arrives meanwhile answers this request NBD_ESHUTDOWN. (The
        // semaphores are never closed, so acquiring fails only by being interrupted.)
        let cost = op.buffer_bytes();
        let permits = cost.min(max_bytes as u64) as u32;
        let acquired = unless_shutdown(&mut shutdown, async {
            let slot = slots.clone().acquire_owned().await.ok()?;
            let bytes = bytes.clone().acquire_many_owned(permits).await.ok()?;
            Some(Budget {
                _slot: slot,
                _bytes: Some(bytes),
            })
        })
        .await
        .flatten();
        let Some(budget) = acquired else {
            let frame = conn.error_frame(req.cookie, wire::ESHUTDOWN, "server shutting down", None);
            conn.reply(req.cookie, frame, 0, None);
            break End::Shutdown;
        };
        conn.stats.hold_bytes(cost);

        let payload = if let Op::Write { len, .. } = op {
            let mut buf = vec![0u8; len as usize];
            match unless_shutdown(&mut shutdown, reader.read_exact(&mut buf)).await {
                Some(Ok(_)) => buf,
                Some(Err(e)) => {
                    conn.stats.release_bytes(cost);
                    break End::Vanished(e);
                }
                None => {
                    let frame =
                        conn.error_frame(req.cookie, wire::ESHUTDOWN, "server shutting down", None);
                    conn.reply(req.cookie, frame, cost, Some(budget));
                    break End::Shutdown;
                }
            }
        } else {
            Vec::new()
        };

        let span = debug_span!(
            "nbd_request",
            cookie = req.cookie,
            cmd = op.command().name(),
            offset = req.offset,
            len = req.len
        );
        // A small write the device can take at once is done here: the hand-off to a worker
        // thread and back costs more than the write (see `docs/nbd.md`).
        let payload = match write_now(&conn, req.cookie, op, payload, &span) {
            Ok(frame) => {
                conn.stats.write_now();
                conn.reply(req.cookie, frame, cost, Some(budget));
                continue;
            }
            Err(payload) => payload,
        };
        let job_conn = conn.clone();
        let cookie = req.cookie;
        let mut request = Some((op, payload));
        let mut budget = Some(budget);
        workers.submit(
            Arc::as_ptr(&conn.export) as usize,
            span,
            Box::new(move |panicked| {
                let frame = if panicked {
                    job_conn.error_frame(cookie, wire::EIO, "internal error", None)
                } else {
                    let Some((op, payload)) = request.take() else {
                        return;
                    };
                    // Last chance to drop the request if the client went away while it was
                    // queued.
                    if job_conn.is_gone() {
                        job_conn.stats.request_skipped();
                        debug!("dropped: client gone before the request started");
                        job_conn.stats.release_bytes(cost);
                        budget = None;
                        return;
                    }
                    execute(&job_conn, cookie, op, payload)
                };
                if let Some(b) = budget.take() {
                    job_conn.reply(cookie, frame, cost, Some(b));
                }
            }),
        );
    };

    match &end {
        End::Vanished(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            info!("client closed the connection without NBD_CMD_DISC")
        }
        End::Vanished(e) => info!("connection lost: {e}"),
        End::ReplyFailed => info!("client stopped taking replies"),
        End::BadMagic(m) => warn!("bad request magic {m:#010x}: closing"),
        End::Unsyncable => warn!("WRITE longer than the maximum payload: closing"),
        End::Disc => debug!("NBD_CMD_DISC"),
        End::Shutdown => info!("server shutting down: finishing requests in flight"),
    }
    if matches!(end, End::Vanished(_) | End::ReplyFailed) {
        conn.gone.send_replace(true);
        conn.stats.connection_lost();
    }
    // Every request holds a slot until its reply is written: taking all of them waits for
    // the requests in flight.
    let _all = slots.acquire_many(max_requests).await;
    let _ = conn.replies.send(Outgoing::Close);
    drop(conn);
    let _ = writer_task.await;
    info!("connection closed");
}

/// Runs `fut` unless the server starts shutting down first (then `None`): a client that stalls
/// in the middle of a request cannot hold up shutdown.
async fn unless_shutdown<F: Future>(
    shutdown: &mut watch::Receiver<bool>,
    fut: F,
) -> Option<F::Output> {
    tokio::select! {
        biased;
        _ = shutdown.wait_for(|s| *s) => None,
        out = fut => Some(out),
    }
}

/// Reads and drops `len` bytes of a refused WRITE's payload without allocating them.
async fn discard<R: AsyncRead + Unpin>(reader: &mut R, len: u64) -> io::Result<()> {
    let copied = tokio::io::copy(&mut reader.take(len), &mut tokio::io::sink()).await?;
    if copied < len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "EOF inside a WRITE payload",
        ));
    }
    Ok(())
}

/// The error field of a reply frame this module built, for logs (0 = success).
fn reply_error(frame: &[u8]) -> u32 {
    let word = |i: usize| u32::from_be_bytes([frame[i], frame[i + 1], frame[i + 2], frame[i + 3]]);
    match word(0) {
        wire::SIMPLE_REPLY_MAGIC => word(4),
        _ => {
            let kind = u16::from_be_bytes([frame[6], frame[7]]);
            if kind & 0x8000 != 0 {
                word(wire::STRUCTURED_HEADER_LEN)
            } else {
                0
            }
        }
    }
}

/// Runs a WRITE without FUA on the calling task if the device takes it without waiting
/// ([`BlockDevice::try_write_now`](crate::volume::BlockDevice::try_write_now)), and returns
/// its reply frame; otherwise gives the payload back for a worker thread. A panic in the
/// device is caught and answered `EIO`, as on a worker thread.
fn write_now(
    conn: &Conn,
    cookie: u64,
    op: Op,
    payload: Vec<u8>,
    span: &tracing::Span,
) -> Result<Vec<u8>, Vec<u8>> {
    let Op::Write {
        offset,
        len,
        fua: false,
    } = op
    else {
        return Err(payload);
    };
    let _entered = span.enter();
    let dev = &*conn.export.device;
    match catch_unwind(AssertUnwindSafe(|| dev.try_write_now(offset, &payload))) {
        Ok(None) => Err(payload),
        Ok(Some(Ok(()))) => Ok(wire::simple_reply(0, cookie)),
        Ok(Some(Err(e))) => Ok(volume_error_frame(
            conn,
            cookie,
            Command::Write,
            &e,
            offset,
            len,
        )),
        Err(p) => {
            warn!(
                "request panicked: {}; answering it with an error",
                super::workers::panic_text(&p)
            );
            Ok(conn.error_frame(cookie, wire::EIO, "internal error", None))
        }
    }
}

/// Runs a validated request on the volume (on a worker thread) and builds its reply frame.
fn execute(conn: &Conn, cookie: u64, op: Op, payload: Vec<u8>) -> Vec<u8> {
    let dev = &*conn.export.device;
    let cmd = op.command();
    let ok = || {
        // Replies without data may be simple even when structured replies are on.
        wire::simple_reply(0, cookie)
    };
    let (res, offset, len) = match op {
        Op::Read { offset, len } => return read(conn, cookie, offset, len),
        Op::Write { offset, len, fua } => {
            (dev.write(offset, &payload, fua).map(|_| ok()), offset, len)
        }
        Op::Flush => (dev.flush().map(|_| ok()), 0, 0),
        Op::Trim { offset, len, fua } => {
            let r = dev
                .trim(offset, len as u64)
                .and_then(|_| if fua { dev.flush() } else { Ok(()) });
            (r.map(|_| ok()), offset, len)
        }
        Op::WriteZeroes {
            offset,
            len,
            no_hole,
            fua,
        } => (
            dev.write_zeroes(offset, len as u64, no_hole, fua)
                .map(|_| ok()),
            offset,
            len,
        ),
        // The volume has no cache to warm: CACHE is an accepted hint that changes nothing.
        Op::Cache => (Ok(ok()), 0, 0),
        Op::BlockStatus {
            offset,
            len,
            req_one,
            context,
        } => {
            let query = (len as u64).min(BLOCK_STATUS_MAX_QUERY);
            let r = dev.block_status(offset, query).map(|ext| {
                wire::block_status_chunk(cookie, context, &descriptors(&ext, query, req_one))
            });
            (r, offset, len)
        }
    };
    res.unwrap_or_else(|e| volume_error_frame(conn, cookie, cmd, &e, offset, len))
}

fn volume_error_frame(
    conn: &Conn,
    cookie: u64,
    cmd: Command,
    err: &VolumeError,
    offset: u64,
    len: u32,
) -> Vec<u8> {
    let refusal = Refusal::from_volume(err, cmd);
    // A request the client got wrong is its business; an I/O error is the server's and goes
    // into the log with its cause.
    if refusal.error == wire::EIO {
        warn!(
            cmd = cmd.name(),
            offset, len, "request failed with EIO: {err}"
        );
    } else {
        debug!(error = refusal.error, "volume error: {err}");
    }
    let at = if cmd == Command::Flush {
        None
    } else {
        error_offset(err, offset, len as u64)
    };
    conn.error_frame(cookie, refusal.error, &refusal.message, at)
}

/// READ: one buffer holds the reply header followed by the data, so the frame is written in
/// one piece. Structured replies use one `OFFSET_DATA` chunk (which also satisfies DF).
fn read(conn: &Conn, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    if len == 0 {
        return if conn.structured {
            wire::structured_done(cookie)
        } else {
            wire::simple_reply(0, cookie)
        };
    }
    let prefix = if conn.structured {
        wire::OFFSET_DATA_PREFIX
    } else {
        wire::SIMPLE_REPLY_LEN
    };
    let mut frame = vec![0u8; prefix + len as usize];
    if let Err(e) = conn.export.device.read(offset, &mut frame[prefix..]) {
        return volume_error_frame(conn, cookie, Command::Read, &e, offset, len);
    }
    if conn.structured {
        wire::structured_header(
            &mut frame,
            wire::REPLY_FLAG_DONE,
            wire::REPLY_TYPE_OFFSET_DATA,
            cookie,
            8 + len,
        );
        frame[wire::STRUCTURED_HEADER_LEN..prefix].copy_from_slice(&offset.to_be_bytes());
    } else {
        wire::simple_reply_header(&mut frame, 0, cookie);
    }
    frame
}

/// `base:allocation` descriptors for extents of a query of `query` bytes: holes read as zeros
/// (`HOLE | ZERO`), everything else is reported as allocated (0). Runs of equal status are
/// merged, zero-length extents dropped, the total cut to the query, and the count capped.
fn descriptors(extents: &[Extent], query: u64, req_one: bool) -> Vec<(u32, u32)> {
    let mut out: Vec<(u32, u32)> = Vec::new();
    let mut left = query;
    for e in extents {
        if left == 0 {
            break;
        }
        let n = e.len.min(left);
        if n == 0 {
            continue;
        }
        left -= n;
        let flags = if e.hole {
            wire::STATE_HOLE | wire::STATE_ZERO
        } else {
            0
        };
        match out.last_mut() {
            // query ≤ BLOCK_STATUS_MAX_QUERY < 2^32, so sums fit in u32.
            Some(last) if last.1 == flags => last.0 += n as u32,
            _ => {
                if out.len() == BLOCK_STATUS_MAX_EXTENTS {
                    break;
                }
                out.push((n as u32, flags));
            }
        }
    }
    if out.is_empty() {
        // A device that reports nothing: "allocated" is always a safe answer.
        out.push((query as u32, 0));
    }
    if req_one {
        out.truncate(1);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_zero_needs_a_whole_block_and_holes() {
        assert!(fast_zero_possible(0, 4096, false));
        assert!(fast_zero_possible(100, 8192, false));
        assert!(!fast_zero_possible(100, 4096, false));
        assert!(!fast_zero_possible(0, 4095, false));
        assert!(!fast_zero_possible(0, 1 << 20, true));
    }

    #[test]
    fn descriptors_merge_cut_and_req_one() {
        let ext = [
            Extent {
                len: 4096,
                hole: true,
            },
            Extent {
                len: 4096,
                hole: true,
            },
            Extent {
                len: 0,
                hole: false,
            },
            Extent {
                len: 8192,
                hole: false,
            },
            Extent {
                len: 4096,
                hole: true,
            },
        ];
        let h = wire::STATE_HOLE | wire::STATE_ZERO;
        assert_eq!(
            descriptors(&ext, 20480, false),
            vec![(8192, h), (8192, 0), (4096, h)]
        );
        assert_eq!(descriptors(&ext, 10000, false), vec![(8192, h), (1808, 0)]);
        assert_eq!(descriptors(&ext, 20480, true), vec![(8192, h)]);
        assert_eq!(descriptors(&[], 512, false), vec![(512, 0)]);
    }
}
