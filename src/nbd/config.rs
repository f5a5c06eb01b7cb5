//! Every tunable limit of the NBD layer, with the reason for its value, and the counters the
//! server exposes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Longest option payload read during the handshake. The largest option we parse is
/// `NBD_OPT_SET_META_CONTEXT`: an export name (≤ 4096 bytes) and a few queries (≤ 4096 bytes
/// each). 64 KiB holds that with room to spare and caps what a client that has not even chosen
/// an export can make us allocate. A longer option gets `NBD_REP_ERR_TOO_BIG` and the
/// connection is closed: its payload is not read, so the stream cannot be resynchronised.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;

/// Default bound on payload bytes held in memory per connection (write payloads received and
/// not yet answered, read buffers not yet sent, block-status replies). Two maximum-size
/// requests fit (2 × 32 MiB), so one large request never waits for another's memory; beyond
/// that the server stops reading the socket until replies drain, which pushes back on the
/// client through TCP flow control instead of growing memory.
pub const DEFAULT_MAX_IN_FLIGHT_BYTES: u32 = 64 * 1024 * 1024;

/// Default bound on requests in flight per connection: 128, the queue depth the Linux nbd
/// driver uses per connection, so a kernel client is never throttled by the count alone. It
/// also caps how many jobs one connection can queue for the worker threads.
pub const DEFAULT_MAX_REQUESTS_IN_FLIGHT: u32 = 128;

/// Default time a client gets to finish option haggling. Real clients take milliseconds;
/// a connection that stalls here holds a socket and a task for nothing.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// Default time one reply frame may take to be written. A client that stops reading replies
/// would otherwise pin up to `max_in_flight_bytes` and its queued jobs forever; after this,
/// the peer is treated as gone (see `docs/nbd.md`, "Kernel client resends").
pub const DEFAULT_REPLY_WRITE_TIMEOUT: Duration = Duration::from_secs(60);

/// Default duration after which a request still running in the volume is logged as slow:
/// a third of the Linux nbd driver's default 30 s request timeout, so the log shows the
/// trouble before the kernel starts resending.
pub const DEFAULT_SLOW_REQUEST_WARNING: Duration = Duration::from_secs(10);

/// Default time the oldest queued request may wait with every worker thread busy before the
/// pool grows by one thread. Queueing behind running requests normally lasts well under a
/// millisecond; a wait this long means the workers are stuck in a stalled volume, and other
/// exports and connections must not wait for it.
pub const DEFAULT_WORKER_STALL: Duration = Duration::from_millis(100);

/// Largest range one `NBD_CMD_BLOCK_STATUS` asks the volume about. Even at one extent per
/// 4 KiB block, 256 MiB gives at most 65 536 descriptors (512 KiB of reply), well under the
/// spec's 2^20; the client asks again from where the reply stopped.
pub const BLOCK_STATUS_MAX_QUERY: u64 = 256 * 1024 * 1024;

/// Most descriptors sent in one block-status chunk (see [`BLOCK_STATUS_MAX_QUERY`]); a device
/// that reports finer extents gets its answer truncated, which the spec allows.
pub const BLOCK_STATUS_MAX_EXTENTS: usize = 65_536 + 2;

/// Settings of a server. `Default` gives the documented values above.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Bound on payload bytes in flight per connection. Requests larger than the bound (only
    /// possible when it is set below 32 MiB) wait until the connection is otherwise idle.
    pub max_in_flight_bytes: u32,
    /// Bound on requests in flight per connection.
    pub max_requests_in_flight: u32,
    pub handshake_timeout: Duration,
    pub reply_write_timeout: Duration,
    pub slow_request_warning: Duration,
    /// Threads that run volume calls, shared by every connection (`0`: four per CPU, at
    /// least eight; see `workers.rs`).
    pub workers: usize,
    /// How long the oldest queued request may wait, with every worker busy, before one more
    /// worker is started (see `workers.rs`).
    pub worker_stall: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_in_flight_bytes: DEFAULT_MAX_IN_FLIGHT_BYTES,
            max_requests_in_flight: DEFAULT_MAX_REQUESTS_IN_FLIGHT,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            reply_write_timeout: DEFAULT_REPLY_WRITE_TIMEOUT,
            slow_request_warning: DEFAULT_SLOW_REQUEST_WARNING,
            workers: 0,
            worker_stall: DEFAULT_WORKER_STALL,
        }
    }
}

/// Counters of a running server, summed over its connections.
#[derive(Debug, Default)]
pub struct ServerStats {
    connections_accepted: AtomicU64,
    connections_open: AtomicU64,
    connections_lost: AtomicU64,
    requests: AtomicU64,
    requests_skipped: AtomicU64,
    writes_now: AtomicU64,
    slow_requests: AtomicU64,
    bytes_in_flight: AtomicU64,
    peak_bytes_in_flight: AtomicU64,
}

impl ServerStats {
    /// Connections accepted since start.
    pub fn connections_accepted(&self) -> u64 {
        self.connections_accepted.load(Ordering::Relaxed)
    }
    /// Connections currently open (handshake or transmission).
    pub fn connections_open(&self) -> u64 {
        self.connections_open.load(Ordering::Relaxed)
    }
    /// Connections whose client vanished (EOF or reset without NBD_CMD_DISC, or replies not
    /// taken); counted as soon as the server notices, before requests in flight finish.
    pub fn connections_lost(&self) -> u64 {
        self.connections_lost.load(Ordering::Relaxed)
    }
    /// Transmission requests received (including refused ones).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
    /// Requests never run because their connection was gone before they started.
    pub fn requests_skipped(&self) -> u64 {
        self.requests_skipped.load(Ordering::Relaxed)
    }
    /// WRITE requests the device took on the connection's own task, without a worker thread
    /// (`BlockDevice::try_write_now`).
    pub fn writes_now(&self) -> u64 {
        self.writes_now.load(Ordering::Relaxed)
    }
    /// Requests that ran longer than `ServerConfig::slow_request_warning`.
    pub fn slow_requests(&self) -> u64 {
        self.slow_requests.load(Ordering::Relaxed)
    }
    /// Payload bytes currently held for requests in flight, all connections together.
    pub fn bytes_in_flight(&self) -> u64 {
        self.bytes_in_flight.load(Ordering::Relaxed)
    }
    /// Highest value [`Self::bytes_in_flight`] has had.
    pub fn peak_bytes_in_flight(&self) -> u64 {
        self.peak_bytes_in_flight.load(Ordering::Relaxed)
    }

    pub(crate) fn connection_opened(&self) {
        self.connections_accepted.fetch_add(1, Ordering::Relaxed);
        self.connections_open.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn connection_closed(&self) {
        self.connections_open.fetch_sub(1, Ordering::Relaxed);
    }
    pub(crate) fn connection_lost(&self) {
        self.connections_lost.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn request_received(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn request_skipped(&self) {
        self.requests_skipped.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn write_now(&self) {
        self.writes_now.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn slow_request(&self) {
        self.slow_requests.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn hold_bytes(&self, n: u64) {
        let now = self.bytes_in_flight.fetch_add(n, Ordering::Relaxed) + n;
        self.peak_bytes_in_flight.fetch_max(now, Ordering::Relaxed);
    }
    pub(crate) fn release_bytes(&self, n: u64) {
        self.bytes_in_flight.fetch_sub(n, Ordering::Relaxed);
    }
}
