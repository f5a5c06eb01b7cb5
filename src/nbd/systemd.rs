//! systemd integration without a library: socket activation (`LISTEN_FDS`) and readiness
//! notification (`NOTIFY_SOCKET`), following sd_listen_fds(3) and sd_notify(3).
//!
//! - [`listeners_from_systemd`] returns the listening sockets passed by systemd (fds 3, 4, …)
//!   when `LISTEN_PID` names this process, and an empty list when the process was not socket
//!   activated. The variables are left in the environment; `LISTEN_PID` keeps children from
//!   taking them as their own.
//! - [`sd_notify_ready`] sends `READY=1` to `$NOTIFY_SOCKET` (a path, or an abstract socket
//!   when it starts with `@`); it returns `Ok(false)` when the variable is unset.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

use nix::fcntl::{FcntlArg, FdFlag, fcntl};

use super::server::Listener;

/// First fd systemd passes (after stdin, stdout, stderr).
const SD_LISTEN_FDS_START: RawFd = 3;

/// Which fds systemd passed, from the values of `LISTEN_PID` and `LISTEN_FDS` and our pid.
/// `Ok(None)` when they are not for us (unset, or another process's).
pub fn listen_fds_range(
    listen_pid: Option<&str>,
    listen_fds: Option<&str>,
    my_pid: u32,
) -> io::Result<Option<std::ops::Range<RawFd>>> {
    let bad = |what: String| io::Error::new(io::ErrorKind::InvalidInput, what);
    let (Some(pid), Some(n)) = (listen_pid, listen_fds) else {
        return Ok(None);
    };
    let pid: u32 = pid
        .trim()
        .parse()
        .map_err(|_| bad(format!("LISTEN_PID={pid:?} is not a pid")))?;
    if pid != my_pid {
        return Ok(None);
    }
    let n: RawFd = n
        .trim()
        .parse()
        .map_err(|_| bad(format!("LISTEN_FDS={n:?} is not a count")))?;
    if !(0..=1024).contains(&n) {
        return Err(bad(format!("LISTEN_FDS={n} is out of range")));
    }
    Ok(Some(SD_LISTEN_FDS_START..SD_LISTEN_FDS_START + n))
}

/// The listening sockets systemd passed to this process; empty when not socket activated.
/// Call it once, early, inside a tokio runtime: it takes ownership of fds 3.. .
pub fn listeners_from_systemd() -> io::Result<Vec<Listener>> {
    let pid = std::env::var("LISTEN_PID").ok();
    let fds = std::env::var("LISTEN_FDS").ok();
    let Some(range) = listen_fds_range(pid.as_deref(), fds.as_deref(), std::process::id())? else {
        return Ok(Vec::new());
    };
    let mut out = Vec::with_capacity(range.len());
    for raw in range {
        // SAFETY: systemd passes fds SD_LISTEN_FDS_START.. to the process named by LISTEN_PID,
        // which we checked is us; nothing else in this process owns them, and this function is
        // documented to be called once, so each fd gets exactly one owner.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let flags = FdFlag::from_bits_truncate(fcntl(&fd, FcntlArg::F_GETFD)?);
        fcntl(&fd, FcntlArg::F_SETFD(flags | FdFlag::FD_CLOEXEC))?;
        out.push(Listener::from_fd(fd)?);
    }
    Ok(out)
}

/// Sends `state` (e.g. `"READY=1"`, `"STOPPING=1"`, `"STATUS=sealed"`) to systemd.
/// `Ok(false)` when `$NOTIFY_SOCKET` is unset (not run by systemd with `Type=notify`).
pub fn sd_notify(state: &str) -> io::Result<bool> {
    match std::env::var("NOTIFY_SOCKET") {
        Ok(path) => notify_to(&path, state).map(|_| true),
        Err(_) => Ok(false),
    }
}

/// Tells systemd the service is ready (`READY=1`).
pub fn sd_notify_ready() -> io::Result<bool> {
    sd_notify("READY=1")
}

/// Sends `state` as one datagram to the notify socket at `path` (`@name` = abstract socket).
pub fn notify_to(path: &str, state: &str) -> io::Result<()> {
    let addr = match path.strip_prefix('@') {
        Some(name) => SocketAddr::from_abstract_name(name.as_bytes())?,
        None if path.starts_with('/') => SocketAddr::from_pathname(path)?,
        None => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("NOTIFY_SOCKET={path:?} is not a socket path"),
            ));
        }
    };
    let sock = UnixDatagram::unbound()?;
    sock.send_to_addr(state.as_bytes(), &addr)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_env_parsing() {
        assert_eq!(listen_fds_range(None, Some("2"), 10).unwrap(), None);
        assert_eq!(listen_fds_range(Some("11"), Some("2"), 10).unwrap(), None);
        assert_eq!(
            listen_fds_range(Some("10"), Some("2"), 10).unwrap(),
            Some(3..5)
        );
        assert_eq!(
            listen_fds_range(Some("10"), Some("0"), 10).unwrap(),
            Some(3..3)
        );
        assert!(listen_fds_range(Some("x"), Some("2"), 10).is_err());
        assert!(listen_fds_range(Some("10"), Some("-1"), 10).is_err());
    }

    #[test]
    fn notify_reaches_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let rx = UnixDatagram::bind(&path).unwrap();
        notify_to(path.to_str().unwrap(), "READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
    }

    #[test]
    fn notify_reaches_an_abstract_socket() {
        let name = format!("shardvol-test-{}", std::process::id());
        let rx = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
            .unwrap();
        notify_to(&format!("@{name}"), "STOPPING=1").unwrap();
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");
        assert!(notify_to("relative", "x").is_err());
    }
}
