//! `serve`: exports every volume of a pool over NBD (sealed until unlocked, or opened with
//! share files), with its control socket; with no arguments at all, the demo pool in
//! ./shardvol-data.

use std::path::PathBuf;

use anyhow::{Context, Result};
use shardvol::pool::{self, CreateOptions, DiskSpec};

use super::args::{DEFAULT_JOURNAL_SIZE, ServeArgs, parse_size};

/// Directory of the demo pool that `shardvol serve` with no arguments uses.
const DEMO_DIR: &str = "shardvol-data";
const DEFAULT_LISTEN: &str = "127.0.0.1:10809";

/// Runs `serve`: the demo when no argument at all is given.
pub(crate) fn serve_cmd(a: ServeArgs) -> Result<()> {
    let demo = a.pool.is_none()
        && a.share.is_empty()
        && a.share_dir.is_none()
        && a.listen.is_empty()
        && a.socket.is_none()
        && a.config.is_none()
        && !a.read_only;
    serve(a, demo)
}

fn demo_pool() -> Result<(PathBuf, Vec<PathBuf>)> {
    let dir = std::env::current_dir()?.join(DEMO_DIR);
    let share_dir = dir.join("shares");
    if !pool::exists(&dir) {
        eprintln!(
            "creating the demo pool in {} (1 GiB volume vol0, 4+2 over 6 files, 3-of-5 shares)",
            dir.display()
        );
        pool::create(&CreateOptions {
            pool: dir.clone(),
            volume: "vol0".into(),
            size: 1 << 30,
            data: 4,
            parity: 2,
            chunk_size: 64 << 10,
            disks: DiskSpec::Files(6),
            shares: 5,
            threshold: 3,
            share_dir: share_dir.clone(),
            journal_size: parse_size(DEFAULT_JOURNAL_SIZE).map_err(anyhow::Error::msg)?,
        })
        .context("cannot create the demo pool")?;
    }
    eprintln!();
    eprintln!("  ************************************************************************");
    eprintln!("  *  DEMO MODE: the key shares are kept beside the data in                *");
    eprintln!("  *  {:<68}*", share_dir.display().to_string());
    eprintln!("  *  Anyone who can read that directory can read the volume. This is for  *");
    eprintln!("  *  trying shardvol only; see README.md to create a real pool.           *");
    eprintln!("  ************************************************************************");
    eprintln!();
    Ok((dir.clone(), pool::shares_in(&share_dir)?))
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM; only Ctrl-C stops the server");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("stopping: finishing requests in flight, then flushing");
}

fn serve(a: ServeArgs, demo: bool) -> Result<()> {
    use shardvol::config::Config;
    use shardvol::nbd::{self, Listener, ServerConfig};
    use shardvol::service::Service;
    let config = match &a.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    let (dir, mut shares, listen, socket) = if demo {
        let (dir, shares) = demo_pool()?;
        (
            dir.clone(),
            shares,
            vec![DEFAULT_LISTEN.to_string()],
            Some(dir.join("nbd.sock")),
        )
    } else {
        let dir = a.pool.clone().context(
            "--pool DIR is required (or run `shardvol serve` with no arguments for a demo)",
        )?;
        let mut listen = config.server.listen.clone();
        listen.extend(a.listen.iter().cloned());
        let socket = a
            .socket
            .clone()
            .or_else(|| config.server.socket.as_ref().map(PathBuf::from));
        if listen.is_empty() && socket.is_none() {
            listen.push(DEFAULT_LISTEN.to_string());
        }
        (dir, a.share.clone(), listen, socket)
    };
    if let Some(d) = &a.share_dir {
        shares.extend(pool::shares_in(d)?);
    }
    let read_only = a.read_only || config.server.read_only;
    let service = Service::new(&dir, config, read_only)
        .with_context(|| format!("cannot serve {}", dir.display()))?;
    shardvol::service::heal::start_background(&service)
        .context("cannot start the background healer")?;
    if !shares.is_empty() {
        service
            .unlock_with_files(&shares)
            .with_context(|| format!("cannot open pool {}", dir.display()))?;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result: Result<()> = rt.block_on(async {
        let mut listeners = nbd::listeners_from_systemd()?;
        if listeners.is_empty() {
            for addr in &listen {
                listeners.push(Listener::bind_tcp(addr).await.with_context(|| format!("cannot listen on {addr}"))?);
            }
            if let Some(path) = &socket {
                if std::fs::symlink_metadata(path).is_ok_and(|m| {
                    use std::os::unix::fs::FileTypeExt;
                    m.file_type().is_socket()
                }) {
                    std::fs::remove_file(path).with_context(|| format!("cannot remove stale socket {}", path.display()))?;
                }
                listeners.push(Listener::bind_unix(path).with_context(|| format!("cannot listen on {}", path.display()))?);
            }
        }
        let control = shardvol::control::bind(&dir)
            .with_context(|| format!("cannot open the control socket in {}", dir.display()))?;
        for l in &listeners {
            eprintln!("listening on {}", l.describe());
        }
        eprintln!("control socket {}", shardvol::control::socket_path(&dir).display());
        if demo {
            let sock = socket.as_ref().map(|s| s.display().to_string()).unwrap_or_default();
            eprintln!();
            eprintln!("attach the demo volume with any of:");
            eprintln!("  kernel:  modprobe nbd && nbd-client 127.0.0.1 10809 /dev/nbd0 -N vol0 && mkfs.ext4 /dev/nbd0");
            eprintln!("  qemu:    qemu-system-x86_64 -m 1G -drive file=nbd+unix:///vol0?socket={sock},format=raw ...");
            eprintln!("  qemu-io: qemu-io -f raw 'nbd+unix:///vol0?socket={sock}' -c 'write -P 0xab 0 1M' -c 'read -P 0xab 0 1M'");
            eprintln!("  fio:     fio --name=demo --ioengine=nbd --uri='nbd+unix:///vol0?socket={sock}' --rw=randrw --bs=4k --size=256M");
            eprintln!();
        }
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let wait_stop = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|v| *v).await;
        };
        let control_task = tokio::spawn(shardvol::control::serve(
            control,
            shardvol::control::socket_path(&dir),
            std::sync::Arc::new(service.handlers()),
            wait_stop(stop_rx.clone()),
        ));
        tokio::spawn(async move {
            shutdown_signal().await;
            let _ = stop_tx.send(true);
        });
        let _ = nbd::sd_notify_ready();
        match service.pool() {
            Some(p) => eprintln!("ready: serving {}", p.volumes.keys().cloned().collect::<Vec<_>>().join(", ")),
            None => {
                let st = service.status()?;
                eprintln!(
                    "ready, SEALED: no volume is exported until {} share holders each run\n  shardvol unlock --pool {} --share FILE",
                    st.threshold,
                    dir.display()
                );
            }
        }
        let table = service.exports.clone();
        nbd::serve(listeners, table, ServerConfig::default(), wait_stop(stop_rx)).await?;
        let _ = control_task.await;
        Ok(())
    });
    if let Some(path) = &socket {
        let _ = std::fs::remove_file(path);
    }
    let closed = service.close().context("flushing the volumes at shutdown");
    result?;
    closed?;
    eprintln!("stopped cleanly");
    Ok(())
}
