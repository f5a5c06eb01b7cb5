//! Listeners, the accept loops, one task per connection, and graceful shutdown.
//!
//! [`Server::run`] accepts on every listener until its `shutdown` future completes; then it
//! stops accepting, closes connections still negotiating, lets every connection in
//! transmission finish the requests it has read (and answer them), flushes every export, and
//! returns. A failing `accept` (for example `EMFILE`) is logged and retried after a pause; it
//! never ends the server.

use std::future::Future;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use nix::sys::socket::{
    AddressFamily, SockaddrLike, SockaddrStorage, getsockname, getsockopt, setsockopt, sockopt,
};
use tokio::io::{AsyncRead, AsyncWrite, BufReader};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};
use tracing::{Instrument, info, info_span, warn};

use super::config::{ServerConfig, ServerStats};
use super::export::ExportTable;
use super::handshake::{self, Outcome};
use super::transmission;
use super::workers::Workers;

/// Read buffer of a connection: large enough to take many request headers per syscall;
/// payloads of this size or more bypass it.
const READ_BUFFER: usize = 64 * 1024;

/// Pause after a failed `accept` (e.g. out of file descriptors) so the loop does not spin.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// A socket the server accepts NBD connections on.
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    /// Binds a TCP listener (`"127.0.0.1:10809"`, `"[::]:0"`, …).
    pub async fn bind_tcp(addr: &str) -> io::Result<Self> {
        Ok(Self::Tcp(TcpListener::bind(addr).await?))
    }

    /// Binds a unix-domain listener at `path` (which must not exist). The socket file is left
    /// behind when the listener is dropped; removing it is the caller's business.
    pub fn bind_unix(path: impl AsRef<Path>) -> io::Result<Self> {
        Ok(Self::Unix(UnixListener::bind(path)?))
    }

    /// Wraps an already bound and listening socket, e.g. one inherited from systemd. The
    /// family (TCP or unix) is read from the socket itself. Must be called inside a tokio
    /// runtime.
    pub fn from_fd(fd: OwnedFd) -> io::Result<Self> {
        let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidInput, what.to_string());
        if !getsockopt(&fd, sockopt::AcceptConn)? {
            return Err(invalid("inherited socket is not listening"));
        }
        if getsockopt(&fd, sockopt::SockType)? != nix::sys::socket::SockType::Stream {
            return Err(invalid("inherited socket is not a stream socket"));
        }
        let addr: SockaddrStorage = getsockname(fd.as_fd().as_raw_fd())?;
        match addr.family() {
            Some(AddressFamily::Inet | AddressFamily::Inet6) => {
                let l = std::net::TcpListener::from(fd);
                l.set_nonblocking(true)?;
                Ok(Self::Tcp(TcpListener::from_std(l)?))
            }
            Some(AddressFamily::Unix) => {
                let l = std::os::unix::net::UnixListener::from(fd);
                l.set_nonblocking(true)?;
                Ok(Self::Unix(UnixListener::from_std(l)?))
            }
            _ => Err(invalid("inherited socket is neither TCP nor unix")),
        }
    }

    /// Where the listener listens, for logs (`tcp:127.0.0.1:10809`, `unix:/run/x.sock`).
    pub fn describe(&self) -> String {
        match self {
            Self::Tcp(l) => match l.local_addr() {
                Ok(a) => format!("tcp:{a}"),
                Err(_) => "tcp:?".into(),
            },
            Self::Unix(l) => match l
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(|p| p.display().to_string()))
            {
                Some(p) => format!("unix:{p}"),
                None => "unix:?".into(),
            },
        }
    }
}

/// An NBD server over an [`ExportTable`].
#[derive(Clone)]
pub struct Server {
    inner: Arc<Inner>,
}

struct Inner {
    exports: Arc<ExportTable>,
    workers: Arc<Workers>,
    config: ServerConfig,
    stats: Arc<ServerStats>,
    next_id: AtomicU64,
}

impl Server {
    pub fn new(exports: Arc<ExportTable>, config: ServerConfig) -> Self {
        let stats: Arc<ServerStats> = Arc::default();
        let threads = match config.workers {
            0 => Workers::default_threads(),
            n => n,
        };
        let workers = Arc::new(Workers::new(
            threads,
            config.worker_stall,
            config.slow_request_warning,
            stats.clone(),
        ));
        Self {
            inner: Arc::new(Inner {
                exports,
                workers,
                config,
                stats,
                next_id: AtomicU64::new(1),
            }),
        }
    }

    /// Counters of this server (connections, requests, bytes in flight).
    pub fn stats(&self) -> Arc<ServerStats> {
        self.inner.stats.clone()
    }

    /// The export table; replace its contents with [`ExportTable::set`].
    pub fn exports(&self) -> &Arc<ExportTable> {
        &self.inner.exports
    }

    /// Serves until `shutdown` completes, then shuts down gracefully (see the module docs).
    /// Returns once every connection has ended and every export has been flushed.
    pub async fn run(
        &self,
        listeners: Vec<Listener>,
        shutdown: impl Future<Output = ()>,
    ) -> io::Result<()> {
        let (stop_tx, stop_rx) = watch::channel(false);
        // Every accept loop and connection task holds a sender; `recv` returns None once all
        // of them are gone.
        let (alive_tx, mut alive_rx) = mpsc::channel::<()>(1);
        for l in listeners {
            info!(listener = %l.describe(), "listening");
            tokio::spawn(
                self.clone()
                    .accept_loop(l, stop_rx.clone(), alive_tx.clone()),
            );
        }
        shutdown.await;
        info!("shutdown requested: no new connections");
        stop_tx.send_replace(true);
        drop(alive_tx);
        let _ = alive_rx.recv().await;
        for export in self.inner.exports.list() {
            let dev = export.device.clone();
            match tokio::task::spawn_blocking(move || dev.flush()).await {
                Ok(Ok(())) => info!(export = %export.name, "flushed"),
                Ok(Err(e)) => warn!(export = %export.name, "flush at shutdown failed: {e}"),
                Err(e) => warn!(export = %export.name, "flush at shutdown did not complete: {e}"),
            }
        }
        info!("server stopped");
        Ok(())
    }

    async fn accept_loop(
        self,
        listener: Listener,
        mut stop: watch::Receiver<bool>,
        alive: mpsc::Sender<()>,
    ) {
        loop {
            let accepted = tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                a = accept(&listener) => a,
            };
            match accepted {
                Ok(Accepted::Tcp(s, peer)) => {
                    if let Err(e) = tune_tcp(&s) {
                        warn!(%peer, "cannot set TCP options: {e}");
                    }
                    tokio::spawn(self.clone().connection(
                        s,
                        peer.to_string(),
                        stop.clone(),
                        alive.clone(),
                    ));
                }
                Ok(Accepted::Unix(s)) => {
                    tokio::spawn(self.clone().connection(
                        s,
                        "unix".into(),
                        stop.clone(),
                        alive.clone(),
                    ));
                }
                Err(e) => {
                    warn!(listener = %listener.describe(), "accept failed: {e}");
                    tokio::time::sleep(ACCEPT_RETRY).await;
                }
            }
        }
    }

    /// Serves one already-accepted stream to its end (handshake, then transmission). This is
    /// what the accept loops run; it is public for transports the server does not accept
    /// itself. Without a shutdown signal it runs until the client leaves.
    pub async fn serve_stream<S>(&self, stream: S, peer: &str)
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (_tx, stop) = watch::channel(false);
        let (alive, _rx) = mpsc::channel(1);
        self.clone()
            .connection(stream, peer.to_string(), stop, alive)
            .await
    }

    async fn connection<S>(
        self,
        stream: S,
        peer: String,
        mut stop: watch::Receiver<bool>,
        _alive: mpsc::Sender<()>,
    ) where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let inner = &self.inner;
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        let span = info_span!("nbd_conn", id, peer = %peer);
        async move {
            inner.stats.connection_opened();
            info!("connection accepted");
            let (r, mut w) = tokio::io::split(stream);
            let mut r = BufReader::with_capacity(READ_BUFFER, r);
            let negotiated = tokio::select! {
                _ = stop.wait_for(|s| *s) => {
                    info!("closed during handshake: server shutting down");
                    None
                }
                res = tokio::time::timeout(
                    inner.config.handshake_timeout,
                    handshake::negotiate(&mut r, &mut w, &inner.exports),
                ) => match res {
                    Ok(Ok(Outcome::Transmission(n))) => Some(n),
                    Ok(Ok(Outcome::Close(why))) => {
                        info!("handshake ended: {why}");
                        None
                    }
                    Ok(Err(e)) => {
                        info!("handshake failed: {e}");
                        None
                    }
                    Err(_) => {
                        warn!("handshake timed out");
                        None
                    }
                },
            };
            if let Some(n) = negotiated {
                transmission::run(
                    r,
                    w,
                    n,
                    inner.workers.clone(),
                    inner.stats.clone(),
                    inner.config.clone(),
                    stop,
                )
                .await;
            }
            inner.stats.connection_closed();
        }
        .instrument(span)
        .await
    }
}

enum Accepted {
    Tcp(TcpStream, std::net::SocketAddr),
    Unix(UnixStream),
}

async fn accept(l: &Listener) -> io::Result<Accepted> {
    match l {
        Listener::Tcp(l) => l.accept().await.map(|(s, a)| Accepted::Tcp(s, a)),
        Listener::Unix(l) => l.accept().await.map(|(s, _)| Accepted::Unix(s)),
    }
}

/// No Nagle delay (the spec asks both ends for it: a reply split over segments must not wait
/// for an ACK), and keepalive so that a peer that vanished without a FIN is noticed.
fn tune_tcp(s: &TcpStream) -> io::Result<()> {
    s.set_nodelay(true)?;
    setsockopt(s, sockopt::KeepAlive, &true)?;
    Ok(())
}

/// Runs a [`Server`] over `exports` with `config` until `shutdown` completes; see
/// [`Server::run`].
pub async fn serve(
    listeners: Vec<Listener>,
    exports: Arc<ExportTable>,
    config: ServerConfig,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    Server::new(exports, config).run(listeners, shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn listener_from_inherited_fds() {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = tcp.local_addr().unwrap();
        let l = Listener::from_fd(OwnedFd::from(tcp)).unwrap();
        assert!(matches!(l, Listener::Tcp(_)));
        assert_eq!(l.describe(), format!("tcp:{addr}"));

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let unix = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let l = Listener::from_fd(OwnedFd::from(unix)).unwrap();
        assert_eq!(l.describe(), format!("unix:{}", path.display()));

        // A bound but not listening socket, and a datagram socket, are refused.
        let not_listening = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        assert!(Listener::from_fd(OwnedFd::from(not_listening)).is_err());
        let dgram = std::os::unix::net::UnixDatagram::unbound().unwrap();
        assert!(Listener::from_fd(OwnedFd::from(dgram)).is_err());
    }
}
