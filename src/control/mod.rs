//! The control socket: how admin commands (`shardvol status`, `key ...`, `scrub`, `disk ...`,
//! `unlock`) reach a running server.
//!
//! A running server listens on `POOL/control.sock`, a unix socket created with mode 0600 in
//! the pool directory; the server also checks every peer's credentials (`SO_PEERCRED`) and
//! answers only root and its own user. One request per connection:
//!
//! ```text
//! client → server   {"cmd": "scrub", "args": {"volume": "vol0", "repair": true}}\n
//! server → client   {"progress": {...}}\n        zero or more, while the command runs
//! server → client   {"ok": <result>}\n  or  {"error": "message"}\n
//! ```
//!
//! Commands are registered as [`Handlers`]: a name and a blocking function of the JSON
//! arguments that may send progress values. The CLI calls [`call`]; when no server runs on the
//! pool (no socket, or a stale one nobody listens on) `call` returns `Ok(None)` and the command
//! works on the stopped pool directly. docs/control.md has the commands and their arguments.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, info, warn};

/// File name of the control socket inside the pool directory.
pub const SOCKET_NAME: &str = "control.sock";
/// Longest request line accepted (arguments are small; share files are ~200 bytes).
const MAX_REQUEST: usize = 64 * 1024;
/// How long a client may take to send its request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of the client side.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The server ran the command and refused or failed it.
    #[error("{0}")]
    Remote(String),
    #[error("control socket {path}: {msg}")]
    Socket { path: PathBuf, msg: String },
}

/// Where a command sends progress while it runs (a no-op for commands run offline).
#[derive(Clone)]
pub struct Progress {
    tx: Option<tokio::sync::mpsc::UnboundedSender<Value>>,
}

impl Progress {
    /// A sink that drops everything.
    pub fn none() -> Self {
        Self { tx: None }
    }
    /// Sends one progress value to the client (ignored if it went away).
    pub fn send(&self, v: Value) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(v);
        }
    }
}

/// A command's implementation: JSON arguments in, JSON result or an error message out.
pub type Handler = Arc<dyn Fn(&Value, &Progress) -> Result<Value, String> + Send + Sync>;

/// The commands a server answers.
#[derive(Clone, Default)]
pub struct Handlers {
    map: BTreeMap<String, Handler>,
}

impl Handlers {
    pub fn new() -> Self {
        Self::default()
    }
    /// Registers `name`; a later registration of the same name replaces the earlier one.
    pub fn add(
        &mut self,
        name: &str,
        f: impl Fn(&Value, &Progress) -> Result<Value, String> + Send + Sync + 'static,
    ) {
        self.map.insert(name.to_string(), Arc::new(f));
    }
    pub fn names(&self) -> Vec<String> {
        self.map.keys().cloned().collect()
    }
    fn get(&self, name: &str) -> Option<Handler> {
        self.map.get(name).cloned()
    }
}

/// Path of a pool's control socket.
pub fn socket_path(pool_dir: &Path) -> PathBuf {
    pool_dir.join(SOCKET_NAME)
}

/// Binds the control socket of a pool (replacing a stale one) with mode 0600.
pub fn bind(pool_dir: &Path) -> std::io::Result<UnixListener> {
    let path = socket_path(pool_dir);
    if std::fs::symlink_metadata(&path).is_ok() {
        if StdUnixStream::connect(&path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!(
                    "{} is in use: another server runs on this pool",
                    path.display()
                ),
            ));
        }
        std::fs::remove_file(&path)?;
    }
    let l = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// Accepts control connections until `shutdown` completes, then removes the socket file.
pub async fn serve(
    listener: UnixListener,
    path: PathBuf,
    handlers: Arc<Handlers>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok((stream, _)) => {
                    let h = handlers.clone();
                    tokio::spawn(async move {
                        if let Err(e) = connection(stream, h).await {
                            debug!(error = %e, "control connection ended with an error");
                        }
                    });
                }
                Err(e) => {
                    warn!(error = %e, "control socket accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
    let _ = std::fs::remove_file(&path);
}

/// Whether the peer may use the control socket: root or the server's own user.
fn peer_allowed(stream: &UnixStream) -> Result<u32, String> {
    let cred = stream
        .peer_cred()
        .map_err(|e| format!("cannot read peer credentials: {e}"))?;
    let me = nix::unistd::geteuid().as_raw();
    if cred.uid() == 0 || cred.uid() == me {
        Ok(cred.uid())
    } else {
        Err(format!(
            "uid {} may not use the control socket (only root and uid {me})",
            cred.uid()
        ))
    }
}

async fn connection(stream: UnixStream, handlers: Arc<Handlers>) -> std::io::Result<()> {
    let allowed = peer_allowed(&stream);
    let (rd, mut wr) = stream.into_split();
    let mut line = Vec::new();
    let mut rd = tokio::io::BufReader::new(rd).take(MAX_REQUEST as u64 + 1);
    let reply = |v: Value| {
        let mut s = v.to_string();
        s.push('\n');
        s
    };
    if let Err(why) = allowed {
        warn!("control socket: {why}");
        wr.write_all(reply(json!({ "error": why })).as_bytes())
            .await?;
        return Ok(());
    }
    match tokio::time::timeout(REQUEST_TIMEOUT, rd.read_until(b'\n', &mut line)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(e),
        Err(_) => {
            wr.write_all(reply(json!({"error": "no request within 10 s"})).as_bytes())
                .await?;
            return Ok(());
        }
    }
    if line.len() > MAX_REQUEST {
        wr.write_all(
            reply(json!({ "error": format!("request longer than {MAX_REQUEST} bytes") }))
                .as_bytes(),
        )
        .await?;
        return Ok(());
    }
    let req: Value = match serde_json::from_slice(&line) {
        Ok(v) => v,
        Err(e) => {
            wr.write_all(reply(json!({ "error": format!("malformed request: {e}") })).as_bytes())
                .await?;
            return Ok(());
        }
    };
    let cmd = req
        .get("cmd")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let args = req.get("args").cloned().unwrap_or(Value::Null);
    let Some(handler) = handlers.get(&cmd) else {
        let msg = format!(
            "unknown command {cmd:?}; this server answers: {}",
            handlers.names().join(", ")
        );
        wr.write_all(reply(json!({ "error": msg })).as_bytes())
            .await?;
        return Ok(());
    };
    info!(command = %cmd, "control command");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let progress = Progress { tx: Some(tx) };
    let job = tokio::task::spawn_blocking(move || handler(&args, &progress));
    // Forward progress until the job ends (its sender is dropped with it).
    while let Some(p) = rx.recv().await {
        if wr
            .write_all(reply(json!({ "progress": p })).as_bytes())
            .await
            .is_err()
        {
            // The client went away; the command still runs to its end.
            break;
        }
    }
    let result = match job.await {
        Ok(Ok(v)) => json!({ "ok": v }),
        Ok(Err(e)) => json!({ "error": e }),
        Err(e) => json!({ "error": format!("command {cmd} failed: {e}") }),
    };
    wr.write_all(reply(result).as_bytes()).await?;
    wr.shutdown().await?;
    Ok(())
}

/// Runs `cmd` on the server of `pool_dir`, passing each progress value to `on_progress`.
/// Returns `Ok(None)` when no server runs on the pool.
pub fn call(
    pool_dir: &Path,
    cmd: &str,
    args: Value,
    mut on_progress: impl FnMut(&Value),
) -> Result<Option<Value>, ControlError> {
    let path = socket_path(pool_dir);
    let sock_err = |msg: String| ControlError::Socket {
        path: path.clone(),
        msg,
    };
    let mut stream = match StdUnixStream::connect(&path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(sock_err(e.to_string())),
    };
    let mut req = json!({ "cmd": cmd, "args": args }).to_string();
    req.push('\n');
    stream
        .write_all(req.as_bytes())
        .map_err(|e| sock_err(format!("cannot send the request: {e}")))?;
    for line in BufReader::new(stream).lines() {
        let line = line.map_err(|e| sock_err(format!("reading the answer: {e}")))?;
        let v: Value = serde_json::from_str(&line)
            .map_err(|e| sock_err(format!("malformed answer {line:?}: {e}")))?;
        if let Some(p) = v.get("progress") {
            on_progress(p);
        } else if let Some(ok) = v.get("ok") {
            return Ok(Some(ok.clone()));
        } else if let Some(e) = v.get("error") {
            return Err(ControlError::Remote(
                e.as_str().map_or_else(|| e.to_string(), str::to_string),
            ));
        }
    }
    Err(sock_err(
        "the server closed the connection without an answer (did it stop?)".into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handlers() -> Arc<Handlers> {
        let mut h = Handlers::new();
        h.add("echo", |a, p| {
            for i in 0..3 {
                p.send(json!({ "step": i }));
            }
            Ok(a.clone())
        });
        h.add("fail", |_, _| Err("it failed, on purpose".into()));
        Arc::new(h)
    }

    #[test]
    fn no_server_means_none() {
        let dir = tempfile::tempdir().unwrap();
        assert!(
            call(dir.path(), "echo", json!({}), |_| {})
                .unwrap()
                .is_none()
        );
        // A stale socket file nobody listens on.
        drop(std::os::unix::net::UnixListener::bind(socket_path(dir.path())).unwrap());
        assert!(
            call(dir.path(), "echo", json!({}), |_| {})
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn requests_progress_results_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let listener = rt.block_on(async { bind(dir.path()) }).unwrap();
        let mode = std::fs::metadata(socket_path(dir.path()))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // A second server on the same pool is refused.
        assert!(rt.block_on(async { bind(dir.path()) }).is_err());
        let server = rt.spawn(serve(
            listener,
            socket_path(dir.path()),
            handlers(),
            async {
                let _ = stop_rx.await;
            },
        ));
        let mut steps = Vec::new();
        let r = call(dir.path(), "echo", json!({"x": 1}), |p| {
            steps.push(p.clone())
        })
        .unwrap();
        assert_eq!(r, Some(json!({"x": 1})));
        assert_eq!(steps.len(), 3);
        let e = call(dir.path(), "fail", json!({}), |_| {}).unwrap_err();
        assert_eq!(e.to_string(), "it failed, on purpose");
        let e = call(dir.path(), "nope", json!({}), |_| {})
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown command") && e.contains("echo"), "{e}");
        // Garbage gets an error line, not a crash.
        let mut s = StdUnixStream::connect(socket_path(dir.path())).unwrap();
        s.write_all(b"{not json\n").unwrap();
        let mut answer = String::new();
        BufReader::new(s).read_line(&mut answer).unwrap();
        assert!(answer.contains("malformed request"), "{answer}");
        stop_tx.send(()).unwrap();
        rt.block_on(server).unwrap();
        assert!(
            !socket_path(dir.path()).exists(),
            "socket removed at shutdown"
        );
    }
}
