//! Shared helpers of the NBD tests: a server on its own runtime, a raw-bytes client that speaks
//! the protocol by hand (so the tests check bytes, not another implementation's reading of
//! them), and devices that delay, block or fail on purpose.
#![allow(dead_code)] // each test crate uses a different part of this module

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use shardvol::nbd::wire::{self, Request};
use shardvol::nbd::{Export, ExportTable, Listener, Server, ServerConfig, ServerStats};
use shardvol::volume::mem::MemDevice;
use shardvol::volume::{BlockDevice, Extent, VolumeError};

/// Time any single client read may take before a test fails instead of hanging.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Server

/// A server on its own tokio runtime, listening on a unix socket in a temporary directory and
/// on 127.0.0.1:0.
pub struct TestServer {
    pub dir: tempfile::TempDir,
    pub sock: PathBuf,
    pub tcp: SocketAddr,
    pub stats: Arc<ServerStats>,
    pub exports: Arc<ExportTable>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: Option<std::sync::mpsc::Receiver<io::Result<()>>>,
    rt: Option<tokio::runtime::Runtime>,
}

impl TestServer {
    pub fn start(exports: Vec<Export>, config: ServerConfig) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("nbd.sock");
        let table = Arc::new(ExportTable::new(exports).unwrap());
        let server = Server::new(table.clone(), config);
        let stats = server.stats();
        let (listeners, tcp) = rt.block_on(async {
            let tcp = Listener::bind_tcp("127.0.0.1:0").await.unwrap();
            let addr = match &tcp {
                Listener::Tcp(l) => l.local_addr().unwrap(),
                Listener::Unix(_) => unreachable!(),
            };
            (vec![Listener::bind_unix(&sock).unwrap(), tcp], addr)
        });
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        rt.spawn(async move {
            let r = server
                .run(listeners, async {
                    let _ = stop_rx.await;
                })
                .await;
            let _ = done_tx.send(r);
        });
        Self {
            dir,
            sock,
            tcp,
            stats,
            exports: table,
            stop: Some(stop_tx),
            done: Some(done_rx),
            rt: Some(rt),
        }
    }

    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.sock.display())
    }

    /// Starts graceful shutdown and waits (at most `limit`) for `run` to return.
    pub fn shutdown(&mut self, limit: Duration) -> io::Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        match self.done.take() {
            Some(rx) => rx.recv_timeout(limit).expect("server did not stop in time"),
            None => Ok(()),
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(rx) = self.done.take() {
            let _ = rx.recv_timeout(Duration::from_secs(2));
        }
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

pub fn mem(size: u64) -> Arc<MemDevice> {
    Arc::new(MemDevice::new(size))
}

/// Polls `f` until it is true or `limit` passes; returns the last value.
pub fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if f() {
            return true;
        }
        if start.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A recognisable byte pattern: the byte at absolute export offset `o` is `pat(o, seed)`.
pub fn pat(o: u64, seed: u8) -> u8 {
    ((o.wrapping_mul(2_654_435_761) >> 7) as u8) ^ seed
}

pub fn pattern(offset: u64, len: usize, seed: u8) -> Vec<u8> {
    (0..len as u64).map(|i| pat(offset + i, seed)).collect()
}

// ---------------------------------------------------------------------------------------------
// Devices

/// Which call a [`HookDevice`] hook is asked about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Call {
    Read,
    Write,
    Flush,
    Trim,
    WriteZeroes,
    BlockStatus,
}

type Hook = dyn Fn(Call, u64, u64) -> Result<(), VolumeError> + Send + Sync;

/// A [`MemDevice`] whose calls first run a hook: the hook can sleep, block, or fail the call.
/// It also counts calls currently inside the device and the most seen at once.
pub struct HookDevice {
    pub mem: MemDevice,
    hook: Box<Hook>,
    inside: AtomicU64,
    pub peak_inside: AtomicU64,
    pub calls: AtomicU64,
}

impl HookDevice {
    pub fn new(
        size: u64,
        hook: impl Fn(Call, u64, u64) -> Result<(), VolumeError> + Send + Sync + 'static,
    ) -> Self {
        Self {
            mem: MemDevice::new(size),
            hook: Box::new(hook),
            inside: AtomicU64::new(0),
            peak_inside: AtomicU64::new(0),
            calls: AtomicU64::new(0),
        }
    }

    pub fn inside(&self) -> u64 {
        self.inside.load(Ordering::SeqCst)
    }

    fn enter<T>(
        &self,
        call: Call,
        offset: u64,
        len: u64,
        f: impl FnOnce() -> Result<T, VolumeError>,
    ) -> Result<T, VolumeError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let now = self.inside.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak_inside.fetch_max(now, Ordering::SeqCst);
        let r = (self.hook)(call, offset, len).and_then(|_| f());
        self.inside.fetch_sub(1, Ordering::SeqCst);
        r
    }
}

impl BlockDevice for HookDevice {
    fn size(&self) -> u64 {
        self.mem.size()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), VolumeError> {
        let len = buf.len() as u64;
        self.enter(Call::Read, offset, len, || self.mem.read(offset, buf))
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), VolumeError> {
        self.enter(Call::Write, offset, data.len() as u64, || {
            self.mem.write(offset, data, fua)
        })
    }
    fn flush(&self) -> Result<(), VolumeError> {
        self.enter(Call::Flush, 0, 0, || self.mem.flush())
    }
    fn trim(&self, offset: u64, len: u64) -> Result<(), VolumeError> {
        self.enter(Call::Trim, offset, len, || self.mem.trim(offset, len))
    }
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        no_hole: bool,
        fua: bool,
    ) -> Result<(), VolumeError> {
        self.enter(Call::WriteZeroes, offset, len, || {
            self.mem.write_zeroes(offset, len, no_hole, fua)
        })
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, VolumeError> {
        self.enter(Call::BlockStatus, offset, len, || {
            self.mem.block_status(offset, len)
        })
    }
}

/// A gate that blocking hooks wait on until the test opens it.
#[derive(Default)]
pub struct Gate {
    open: Mutex<bool>,
    cv: Condvar,
}

impl Gate {
    pub fn wait(&self) {
        let mut open = self.open.lock().unwrap();
        while !*open {
            // Bounded so a failing test cannot leave threads parked forever.
            let (g, t) = self.cv.wait_timeout(open, Duration::from_secs(20)).unwrap();
            open = g;
            if t.timed_out() {
                break;
            }
        }
    }
    pub fn open(&self) {
        *self.open.lock().unwrap() = true;
        self.cv.notify_all();
    }
}

// ---------------------------------------------------------------------------------------------
// Raw client

pub enum Sock {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Sock {
    pub fn try_clone(&self) -> Sock {
        match self {
            Sock::Unix(s) => Sock::Unix(s.try_clone().unwrap()),
            Sock::Tcp(s) => Sock::Tcp(s.try_clone().unwrap()),
        }
    }
    pub fn shutdown(&self, how: Shutdown) {
        let _ = match self {
            Sock::Unix(s) => s.shutdown(how),
            Sock::Tcp(s) => s.shutdown(how),
        };
    }
    pub fn set_read_timeout(&self, t: Duration) {
        match self {
            Sock::Unix(s) => s.set_read_timeout(Some(t)).unwrap(),
            Sock::Tcp(s) => s.set_read_timeout(Some(t)).unwrap(),
        }
    }
}

impl Read for Sock {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        match self {
            Sock::Unix(s) => s.read(b),
            Sock::Tcp(s) => s.read(b),
        }
    }
}

impl Write for Sock {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Sock::Unix(s) => s.write(b),
            Sock::Tcp(s) => s.write(b),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[derive(Debug)]
pub struct OptReply {
    pub option: u32,
    pub kind: u32,
    pub data: Vec<u8>,
}

#[derive(Debug, Clone)]
pub struct Chunk {
    pub flags: u16,
    pub kind: u16,
    pub payload: Vec<u8>,
}

#[derive(Debug)]
pub struct Reply {
    pub cookie: u64,
    pub error: u32,
    /// Data of a READ (simple reply data, or OFFSET_DATA payloads after their offset field).
    pub data: Vec<u8>,
    /// Structured chunks, empty for a simple reply.
    pub chunks: Vec<Chunk>,
    pub simple: bool,
    pub message: String,
}

/// A client that speaks NBD byte by byte.
pub struct Raw {
    pub s: Sock,
    pending_reads: HashMap<u64, u32>,
    next_cookie: u64,
}

impl Raw {
    pub fn unix(path: &std::path::Path) -> Self {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        Self {
            s: Sock::Unix(s),
            pending_reads: HashMap::new(),
            next_cookie: 1,
        }
    }

    pub fn tcp(addr: SocketAddr) -> Self {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        s.set_nodelay(true).unwrap();
        Self {
            s: Sock::Tcp(s),
            pending_reads: HashMap::new(),
            next_cookie: 1,
        }
    }

    pub fn read_exact_vec(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.s.read_exact(&mut v).unwrap();
        v
    }
    pub fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.read_exact_vec(2).try_into().unwrap())
    }
    pub fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.read_exact_vec(4).try_into().unwrap())
    }
    pub fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.read_exact_vec(8).try_into().unwrap())
    }
    pub fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).unwrap();
    }

    /// True when the server closed the connection (EOF or reset) within the read timeout.
    pub fn is_closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        match self.s.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
            ),
        }
    }

    /// Reads the 18-byte greeting and returns it.
    pub fn greeting(&mut self) -> Vec<u8> {
        self.read_exact_vec(18)
    }

    pub fn send_opt(&mut self, option: u32, data: &[u8]) {
        let mut b = Vec::new();
        b.extend_from_slice(&wire::IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.send(&b);
    }

    pub fn opt_reply(&mut self) -> OptReply {
        assert_eq!(self.u64(), wire::OPT_REPLY_MAGIC, "option reply magic");
        let option = self.u32();
        let kind = self.u32();
        let len = self.u32() as usize;
        let data = self.read_exact_vec(len);
        OptReply { option, kind, data }
    }

    /// Greeting and client flags (FIXED_NEWSTYLE | NO_ZEROES).
    pub fn start(&mut self) {
        let g = self.greeting();
        assert_eq!(&g[..16], b"NBDMAGICIHAVEOPT");
        self.send(&(wire::FLAG_C_FIXED_NEWSTYLE | wire::FLAG_C_NO_ZEROES).to_be_bytes());
    }

    /// Sends an option and reads replies up to and including the final one.
    pub fn opt(&mut self, option: u32, data: &[u8]) -> Vec<OptReply> {
        self.send_opt(option, data);
        let mut out = Vec::new();
        loop {
            let r = self.opt_reply();
            assert_eq!(r.option, option);
            let last = r.kind == wire::REP_ACK || r.kind & 0x8000_0000 != 0;
            out.push(r);
            if last {
                return out;
            }
        }
    }

    /// Full handshake to `name`; returns (size, transmission flags).
    pub fn go(&mut self, name: &str, structured: bool, meta: bool) -> (u64, u16) {
        self.start();
        if structured {
            let r = self.opt(wire::OPT_STRUCTURED_REPLY, &[]);
            assert_eq!(r[0].kind, wire::REP_ACK);
        }
        if meta {
            let r = self.opt(
                wire::OPT_SET_META_CONTEXT,
                &meta_payload(name, &["base:allocation"]),
            );
            assert_eq!(r.len(), 2, "{r:?}");
            assert_eq!(r[0].kind, wire::REP_META_CONTEXT);
        }
        let replies = self.opt(wire::OPT_GO, &info_payload(name, &[]));
        let last = replies.last().unwrap();
        assert_eq!(last.kind, wire::REP_ACK, "GO failed: {replies:?}");
        let info = replies
            .iter()
            .find(|r| r.kind == wire::REP_INFO && r.data[..2] == [0, 0])
            .expect("NBD_INFO_EXPORT");
        let size = u64::from_be_bytes(info.data[2..10].try_into().unwrap());
        let flags = u16::from_be_bytes(info.data[10..12].try_into().unwrap());
        (size, flags)
    }

    pub fn cookie(&mut self) -> u64 {
        self.next_cookie += 1;
        self.next_cookie
    }

    /// Sends a request (and its payload, which may differ from `len` to test bad clients).
    pub fn request(
        &mut self,
        kind: u16,
        flags: u16,
        cookie: u64,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) {
        if kind == 0 {
            self.pending_reads.insert(cookie, len);
        }
        let mut b = Request {
            flags,
            kind,
            cookie,
            offset,
            len,
        }
        .encode()
        .to_vec();
        b.extend_from_slice(payload);
        self.send(&b);
    }

    /// Reads one complete reply (all chunks of a structured reply).
    pub fn reply(&mut self) -> Reply {
        let magic = self.u32();
        if magic == wire::SIMPLE_REPLY_MAGIC {
            let error = self.u32();
            let cookie = self.u64();
            let len = self.pending_reads.remove(&cookie).unwrap_or(0);
            let data = if error == 0 {
                self.read_exact_vec(len as usize)
            } else {
                Vec::new()
            };
            return Reply {
                cookie,
                error,
                data,
                chunks: Vec::new(),
                simple: true,
                message: String::new(),
            };
        }
        let mut reply = Reply {
            cookie: 0,
            error: 0,
            data: Vec::new(),
            chunks: Vec::new(),
            simple: false,
            message: String::new(),
        };
        let mut magic = magic;
        loop {
            assert_eq!(magic, wire::STRUCTURED_REPLY_MAGIC, "reply magic");
            let flags = self.u16();
            let kind = self.u16();
            reply.cookie = self.u64();
            let len = self.u32() as usize;
            let payload = self.read_exact_vec(len);
            match kind {
                wire::REPLY_TYPE_OFFSET_DATA => reply.data.extend_from_slice(&payload[8..]),
                wire::REPLY_TYPE_ERROR | wire::REPLY_TYPE_ERROR_OFFSET => {
                    reply.error = u32::from_be_bytes(payload[0..4].try_into().unwrap());
                    let n = u16::from_be_bytes(payload[4..6].try_into().unwrap()) as usize;
                    reply.message = String::from_utf8(payload[6..6 + n].to_vec()).unwrap();
                }
                _ => {}
            }
            reply.chunks.push(Chunk {
                flags,
                kind,
                payload,
            });
            if flags & wire::REPLY_FLAG_DONE != 0 {
                self.pending_reads.remove(&reply.cookie);
                return reply;
            }
            magic = self.u32();
        }
    }

    /// One request, one reply; returns the reply.
    pub fn call(&mut self, kind: u16, flags: u16, offset: u64, len: u32, payload: &[u8]) -> Reply {
        let cookie = self.cookie();
        self.request(kind, flags, cookie, offset, len, payload);
        let r = self.reply();
        assert_eq!(r.cookie, cookie);
        r
    }

    pub fn write(&mut self, offset: u64, data: &[u8], flags: u16) -> u32 {
        self.call(1, flags, offset, data.len() as u32, data).error
    }

    pub fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        let r = self.call(0, 0, offset, len, &[]);
        if r.error == 0 {
            Ok(r.data)
        } else {
            Err(r.error)
        }
    }

    /// Sends NBD_CMD_DISC.
    pub fn disc(&mut self) {
        let c = self.cookie();
        self.request(2, 0, c, 0, 0, &[]);
    }
}

/// Payload of NBD_OPT_INFO / NBD_OPT_GO.
pub fn info_payload(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

/// Payload of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT.
pub fn meta_payload(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

/// Decodes the descriptors of a BLOCK_STATUS chunk: (context id, [(length, flags)]).
pub fn block_status_descriptors(chunk: &Chunk) -> (u32, Vec<(u32, u32)>) {
    assert_eq!(chunk.kind, wire::REPLY_TYPE_BLOCK_STATUS);
    let p = &chunk.payload;
    let id = u32::from_be_bytes(p[0..4].try_into().unwrap());
    let d = p[4..]
        .chunks(8)
        .map(|c| {
            (
                u32::from_be_bytes(c[0..4].try_into().unwrap()),
                u32::from_be_bytes(c[4..8].try_into().unwrap()),
            )
        })
        .collect();
    (id, d)
}

/// Asserts two byte strings are equal without printing megabytes when they are not.
#[track_caller]
pub fn same(got: &[u8], want: &[u8]) {
    if got != want {
        let at = got.iter().zip(want).position(|(a, b)| a != b);
        panic!(
            "bytes differ: got {} bytes, want {}; first difference at {at:?}",
            got.len(),
            want.len()
        );
    }
}
