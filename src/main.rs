//! The `shardvol` command: argument parsing, logging set-up, and calls into the library.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use shardvol::pool::{self, CreateOptions, DiskSpec};

#[derive(Parser)]
#[command(
    name = "shardvol",
    version,
    about = "Encrypted, erasure-coded, self-healing block volumes served over NBD",
    arg_required_else_help = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Create a pool with a volume, or add a volume to an existing pool.
    Create(CreateArgs),
    /// Describe a pool: volumes, geometry, disks, key versions (never a key).
    Inspect {
        #[arg(long)]
        pool: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Serve every volume of a pool over NBD. With no arguments at all: a demo pool in
    /// ./shardvol-data. Without --share the server starts sealed: see `shardvol unlock`.
    Serve(ServeArgs),
    /// Give one share to a sealed server; the pool opens when enough holders have done so.
    Unlock {
        #[arg(long)]
        pool: PathBuf,
        /// This holder's share file.
        #[arg(long)]
        share: PathBuf,
    },
    /// State of a pool: per volume and per disk (from the running server, or from the store).
    Status {
        #[arg(long)]
        pool: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Configuration files.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Master keys and epochs: status, rotation, archive and destroy (docs/key-lifecycle.md).
    #[command(subcommand)]
    Key(KeyCmd),
    /// Key shares of the pool.
    #[command(subcommand)]
    Shares(SharesCmd),
    /// Read every block and the parity of a volume and check them; with --repair, rewrite what
    /// fails from the other chunks. Uses the running server if there is one.
    Scrub(ScrubArgs),
    /// Disks of a pool.
    #[command(subcommand)]
    Disk(DiskCommand),
    /// Check or show the pool's audit log of key events (POOL/audit.log).
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Rebuild the plain image of a volume from disk files and shares alone: no metadata store,
    /// no server, up to `m` disks missing. The disks are only read.
    Recover(RecoverArgs),
}

/// How a key command reaches the pool: through the running server's control socket, or, when
/// no server runs, by opening the stopped pool with share files.
#[derive(Args, Clone)]
struct KeyTarget {
    /// Pool directory.
    #[arg(long)]
    pool: PathBuf,
    /// A share file, to open a stopped pool; repeat until the threshold is met.
    #[arg(long)]
    share: Vec<PathBuf>,
    /// Configuration file for a stopped pool (rotation and unlock settings).
    #[arg(long)]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum KeyCmd {
    /// Master key versions and states, epochs, and how many blocks each key still protects.
    Status {
        #[command(flatten)]
        target: KeyTarget,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Start a new epoch now and re-encrypt under it (every stale block, one volume, or one
    /// stripe of one volume).
    Rotate {
        #[command(flatten)]
        target: KeyTarget,
        #[arg(long)]
        volume: Option<String>,
        /// Stripe number (with --volume).
        #[arg(long, requires = "volume")]
        stripe: Option<u64>,
    },
    /// Make a new master key version; new writes use it and the rotation task re-encrypts
    /// older blocks to it in the background.
    RotateMaster {
        #[command(flatten)]
        target: KeyTarget,
    },
    /// Stop using a retired version for reading; it is kept wrapped for rotation.retention,
    /// then destroyed. Refused while any block needs it.
    Archive {
        #[command(flatten)]
        target: KeyTarget,
        version: u32,
    },
    /// Erase a version everywhere (key slots, both superblock slots of every disk). Refused
    /// while any block needs it. What it protected can never be read again.
    Destroy {
        #[command(flatten)]
        target: KeyTarget,
        version: u32,
    },
}

#[derive(Subcommand)]
enum SharesCmd {
    /// Split a new key-encryption key: new share files, the master keys rewrapped, every old
    /// share refused from then on. Needs the current shares (--share, threshold of them).
    Reissue {
        #[command(flatten)]
        target: KeyTarget,
        /// Number of new shares (n).
        #[arg(long)]
        shares: u8,
        /// New shares needed to unlock (t).
        #[arg(long)]
        threshold: u8,
        /// Directory for the new share files (must not hold share files already).
        #[arg(long)]
        share_dir: PathBuf,
    },
}

#[derive(Args)]
struct HealShares {
    /// A share file (needed only when no server runs on the pool); repeat up to the threshold.
    #[arg(long)]
    share: Vec<PathBuf>,
    /// A directory of share files (share-*.txt).
    #[arg(long)]
    share_dir: Option<PathBuf>,
}

#[derive(Args)]
struct ScrubArgs {
    #[arg(long)]
    pool: PathBuf,
    /// The volume to scrub.
    #[arg(long)]
    volume: String,
    /// Rewrite bad blocks and parity (otherwise only report them).
    #[arg(long)]
    repair: bool,
    /// Most bytes read per second, e.g. 100M (0: no limit).
    #[arg(long, default_value = "0", value_parser = parse_size)]
    rate: u64,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    shares: HealShares,
}

#[derive(Subcommand)]
enum DiskCommand {
    /// Replace a failed disk by a new one and rebuild its chunks onto it while the volumes
    /// stay in service. Run again with the same path to resume an interrupted rebuild.
    Replace {
        #[arg(long)]
        pool: PathBuf,
        /// Id of the failed disk (`shardvol status` lists them).
        #[arg(long)]
        disk: u32,
        /// The new disk: a file (created sparse) or a block device.
        #[arg(long = "with")]
        with: PathBuf,
        /// Most bytes read per second, e.g. 200M (0: no limit).
        #[arg(long, default_value = "0", value_parser = parse_size)]
        rate: u64,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        shares: HealShares,
    },
    /// Add a disk to the pool and move onto it the chunks that placement gives it, while the
    /// volumes stay in service. Run again with the same path to resume an interrupted
    /// rebalance.
    Add {
        #[arg(long)]
        pool: PathBuf,
        /// The new disk, optionally with its failure domain: PATH or PATH:DOMAIN (a file is
        /// created sparse; a block device must be large enough).
        disk: String,
        /// Most bytes moved per second, e.g. 200M (0: no limit).
        #[arg(long, default_value = "0", value_parser = parse_size)]
        rate: u64,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        shares: HealShares,
    },
}

#[derive(Args)]
struct RecoverArgs {
    /// A disk file (or block device) of the pool; repeat for every disk you have. Disks left
    /// out count as missing and are rebuilt from parity.
    #[arg(long, required = true)]
    disk: Vec<PathBuf>,
    /// A share file; repeat until the pool's threshold is met.
    #[arg(long)]
    share: Vec<PathBuf>,
    /// A directory of share files (share-*.txt).
    #[arg(long)]
    share_dir: Option<PathBuf>,
    /// Name of the volume to recover.
    #[arg(long)]
    volume: String,
    /// The image to write: a new file (sparse), or with --force an existing file or block device.
    #[arg(long)]
    output: PathBuf,
    /// Overwrite an existing output; write an image even when some blocks cannot be rebuilt
    /// (they are left as zeros, listed, and the exit status is 2).
    #[arg(long)]
    force: bool,
    /// No progress lines on stderr.
    #[arg(long)]
    quiet: bool,
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check the hash chain and the chain head in the store; with t shares, every MAC too.
    /// Exits non-zero when the log is broken, naming the first broken record.
    Verify(AuditKeyArgs),
    /// Print the records: a table, or JSON lines with --json.
    Show {
        #[arg(long)]
        pool: PathBuf,
        /// Print each record as the JSON line it is stored as.
        #[arg(long)]
        json: bool,
    },
    /// Set a broken log aside (renamed audit.log.broken-TIME) and start a new one whose first
    /// record names the old one. Needs t shares; refused when the log verifies.
    Restart(AuditKeyArgs),
}

#[derive(Args)]
struct AuditKeyArgs {
    /// Pool directory.
    #[arg(long)]
    pool: PathBuf,
    /// A share file; repeat until the threshold is met (verify: to check the MACs).
    #[arg(long)]
    share: Vec<PathBuf>,
    /// A directory of share files (share-*.txt).
    #[arg(long)]
    share_dir: Option<PathBuf>,
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Check a configuration file: unknown keys and bad values are reported; prints the
    /// effective configuration (defaults included) when it is valid.
    Check {
        /// The TOML file.
        file: PathBuf,
    },
    /// Print the default configuration as TOML.
    Defaults,
}

#[derive(Args)]
struct CreateArgs {
    /// Pool directory (created if absent).
    #[arg(long)]
    pool: PathBuf,
    /// Volume name: the NBD export name.
    #[arg(long, default_value = "vol0")]
    volume: String,
    /// Volume size, e.g. 1G, 512M, 10T.
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    size: u64,
    /// Data chunks per stripe (k).
    #[arg(long, default_value_t = 4)]
    data: u16,
    /// Parity chunks per stripe (m): how many disks may be lost.
    #[arg(long, default_value_t = 2)]
    parity: u16,
    /// Bytes per chunk (power of two, 4K to 4M).
    #[arg(long, default_value = "64K", value_parser = parse_size)]
    chunk_size: u64,
    /// Number of backing files to create under POOL/disks (new pool only).
    #[arg(long, conflicts_with = "disk")]
    disks: Option<usize>,
    /// A backing file or block device, with an optional failure domain: PATH[:DOMAIN].
    /// Repeat for each disk (new pool only).
    #[arg(long)]
    disk: Vec<String>,
    /// Number of KEK shares to write (n).
    #[arg(long, default_value_t = 5)]
    shares: u8,
    /// Shares needed to unlock the pool (t).
    #[arg(long, default_value_t = 3)]
    threshold: u8,
    /// Where to write the share files (default POOL/shares). Hand each file to one holder.
    #[arg(long)]
    share_dir: Option<PathBuf>,
    /// Journal size per journal disk.
    #[arg(long, default_value = "128M", value_parser = parse_size)]
    journal_size: u64,
}

#[derive(Args, Default)]
struct ServeArgs {
    /// Pool directory.
    #[arg(long)]
    pool: Option<PathBuf>,
    /// A share file; repeat until the threshold is met.
    #[arg(long)]
    share: Vec<PathBuf>,
    /// A directory of share files (share-*.txt).
    #[arg(long)]
    share_dir: Option<PathBuf>,
    /// TCP address to listen on; repeat for several. Default 127.0.0.1:10809 unless --socket
    /// is given. Ignored under systemd socket activation.
    #[arg(long)]
    listen: Vec<String>,
    /// Unix socket path to listen on.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Export every volume read-only: writes, trims and zeroes get EPERM.
    #[arg(long)]
    read_only: bool,
    /// Configuration file (TOML; see `shardvol config defaults`).
    #[arg(long)]
    config: Option<PathBuf>,
}

/// Directory of the demo pool that `shardvol serve` with no arguments uses.
const DEMO_DIR: &str = "shardvol-data";
const DEFAULT_LISTEN: &str = "127.0.0.1:10809";

/// Parses sizes such as `4096`, `64K`, `1G`, `1GiB`, `10T` (binary units).
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (examples: 4096, 64K, 1G)"))?;
    let shift = match unit
        .trim()
        .to_ascii_uppercase()
        .trim_end_matches("IB")
        .trim_end_matches('B')
    {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        "P" => 50,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use K, M, G, T)")),
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn create(a: CreateArgs) -> Result<()> {
    let disks = if a.disk.is_empty() {
        DiskSpec::Files(a.disks.unwrap_or(usize::from(a.data + a.parity)))
    } else {
        DiskSpec::Paths(
            a.disk
                .iter()
                .map(|s| match s.rsplit_once(':') {
                    Some((p, d)) if !d.is_empty() && !d.contains('/') => {
                        (PathBuf::from(p), Some(d.to_string()))
                    }
                    _ => (PathBuf::from(s), None),
                })
                .collect(),
        )
    };
    let chunk_size = u32::try_from(a.chunk_size).context("chunk size too large")?;
    let share_dir = a.share_dir.clone().unwrap_or_else(|| a.pool.join("shares"));
    let opts = CreateOptions {
        pool: a.pool.clone(),
        volume: a.volume.clone(),
        size: a.size,
        data: a.data,
        parity: a.parity,
        chunk_size,
        disks,
        shares: a.shares,
        threshold: a.threshold,
        share_dir: share_dir.clone(),
        journal_size: a.journal_size,
    };
    let c = pool::create(&opts)
        .with_context(|| format!("cannot create volume {} in {}", a.volume, a.pool.display()))?;
    if c.new_pool {
        println!(
            "created pool {} (id {})",
            a.pool.display(),
            pool::hex(&c.pool_id)
        );
        println!(
            "volume {}: {}, {}+{} over {} disks, chunk {}",
            a.volume,
            human(a.size),
            a.data,
            a.parity,
            c.disks.len(),
            human(a.chunk_size)
        );
        println!(
            "{} shares written, {} needed to unlock:",
            c.share_files.len(),
            a.threshold
        );
        for f in &c.share_files {
            println!("  {}", f.display());
        }
        if a.share_dir.is_none() {
            eprintln!(
                "warning: the shares are stored inside the pool directory. Anyone who can read the pool and"
            );
            eprintln!(
                "         {} shares can read the data: hand each share to its holder and delete it here.",
                a.threshold
            );
        }
    } else {
        println!(
            "added volume {} ({}, {}+{}) to pool {}",
            a.volume,
            human(a.size),
            a.data,
            a.parity,
            a.pool.display()
        );
    }
    Ok(())
}

fn inspect(pool_dir: PathBuf, json: bool) -> Result<()> {
    if shardvol::control::call(&pool_dir, "ping", serde_json::Value::Null, |_| {})?.is_some() {
        bail!(
            "a server is running on {}: it holds the metadata store; use `shardvol status --pool {}` (or stop the server to inspect)",
            pool_dir.display(),
            pool_dir.display()
        );
    }
    let info = pool::inspect(&pool_dir)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&info)?);
        return Ok(());
    }
    println!(
        "pool {}  id {}  unlock: {} of {} shares",
        pool_dir.display(),
        info.pool_id,
        info.threshold,
        info.shares
    );
    println!("volumes:");
    for v in &info.volumes {
        println!(
            "  {:<12} {:>10}  {}+{}  chunk {:<8} stripes {:<8} allocated {:>10}  journal {}",
            v.name,
            human(v.size),
            v.data_chunks,
            v.parity_chunks,
            human(u64::from(v.chunk_size)),
            v.stripes,
            human(v.allocated_blocks * 4096),
            human(v.journal_size)
        );
    }
    println!("disks:");
    for d in &info.disks {
        println!(
            "  {:>3}  {:<8} {:<12} {:>10}  superblock {}  {}",
            d.id,
            d.state,
            d.domain,
            human(d.size),
            d.superblock,
            d.path
        );
    }
    println!("master keys:");
    for k in &info.keys {
        println!("  version {}  {}", k.version, k.state);
    }
    Ok(())
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
            journal_size: 128 << 20,
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

fn unlock(pool_dir: PathBuf, share: PathBuf) -> Result<()> {
    let text = std::fs::read_to_string(&share)
        .with_context(|| format!("cannot read share file {}", share.display()))?;
    // Check the file locally first: a damaged file is named before anything is sent.
    shardvol::kms::parse_share_file(&text, &share)?;
    let args = serde_json::json!({ "share": text, "origin": share.display().to_string() });
    let Some(v) = shardvol::control::call(&pool_dir, "unlock", args, |_| {})? else {
        bail!(
            "no server runs on {}: start `shardvol serve --pool {}` first (it starts sealed and waits for shares)",
            pool_dir.display(),
            pool_dir.display()
        );
    };
    let p: shardvol::service::UnlockProgress = serde_json::from_value(v)?;
    if p.unlocked {
        println!(
            "pool unlocked: {} of {} shares; the volumes are exported",
            p.have, p.need
        );
    } else {
        println!(
            "share accepted: {} of {}; the pool stays sealed until {} more holder(s) run `shardvol unlock`",
            p.have,
            p.need,
            p.need - p.have
        );
    }
    Ok(())
}

fn status(pool_dir: PathBuf, json: bool) -> Result<()> {
    let v = match shardvol::control::call(&pool_dir, "status", serde_json::Value::Null, |_| {})? {
        Some(v) => v,
        None => serde_json::to_value(shardvol::service::Status::offline(&pool_dir)?)?,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let st: shardvol::service::Status = serde_json::from_value(v)?;
    println!("pool {}: {}", st.pool, st.state);
    if let Some(u) = &st.unlock {
        println!("  unlock: {} of {} shares given", u.have, u.need);
    }
    println!("volumes:");
    for v in &st.volumes {
        print!(
            "  {:<12} {:<9} {:>10} used of {:>10}",
            v.name,
            v.state,
            human(v.allocated_bytes),
            human(v.size)
        );
        if let Some(j) = v.journal_used_bytes {
            print!("  journal {}", human(j));
        }
        println!();
        if let Some(c) = &v.counters {
            println!(
                "      written {} blocks, read {}, rebuilt {}, repaired {}, rollbacks {}, destage errors {}",
                c.blocks_written,
                c.blocks_read,
                c.blocks_reconstructed,
                c.blocks_repaired,
                c.rollbacks_detected,
                c.destage_errors
            );
        }
    }
    for v in &st.volumes {
        if let Some(s) = &v.last_scrub {
            println!(
                "  {}: last scrub {} s ago{}: {} blocks, {} parity rows checked, {} bad, {} repaired, {} unrecoverable",
                v.name,
                now_unix().saturating_sub(s.finished_unix),
                if s.repair { " (repair)" } else { "" },
                s.blocks_checked,
                s.parity_checked,
                s.bad_found,
                s.repaired,
                s.unrecoverable
            );
        }
    }
    if let Some(r) = &st.rebalance {
        println!(
            "rebalance: onto disk {}, {:.1}% of the stripes moved; `shardvol disk add` with its path resumes it",
            r.disk, r.percent
        );
    }
    println!("disks:");
    for d in &st.disks {
        println!("  {:>3}  {:<10} {:<12} {}", d.id, d.state, d.domain, d.path);
        if let Some(c) = &d.counters {
            println!(
                "       I/O errors {}, tag failures {}, repaired {}, rebuilt chunks {}",
                c.io_errors, c.tag_failures, c.repaired, c.rebuilt_chunks
            );
        }
        if let Some(r) = &d.rebuild {
            println!(
                "       rebuilding: {:.1}% (volume {} stripe {}); `shardvol disk replace` with the same path resumes it",
                r.percent, r.volume, r.stripe
            );
        }
    }
    if let Some(k) = &st.keys {
        let r = &k.rotation;
        println!(
            "keys: writes use master version {} epoch {}; rotation {}: {} stripes / {} blocks re-encrypted, {} stale stripes left, {:.1} MB/s",
            k.write_version,
            k.write_epoch,
            if r.running { "running" } else { "stopped" },
            r.stripes_done,
            r.blocks_done,
            r.remaining_stripes,
            r.rate_mb_s
        );
    }
    Ok(())
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Prints progress lines on stderr, at most one a second (and the last).
fn progress_printer(what: &'static str) -> impl Fn(&shardvol::volume::scrub::Progress) {
    let last = std::cell::Cell::new(std::time::Instant::now());
    move |p| {
        if last.get().elapsed().as_secs_f64() < 1.0 && p.done < p.total {
            return;
        }
        last.set(std::time::Instant::now());
        let pct = if p.total == 0 {
            100.0
        } else {
            p.done as f64 * 100.0 / p.total as f64
        };
        eprintln!(
            "{what}: {}/{} stripes ({pct:.1}%), {}/s, ETA {:.0} s",
            p.done,
            p.total,
            human(p.bytes_per_s as u64),
            p.eta_s
        );
    }
}

/// Opens a stopped pool for an admin command, with its share files.
fn open_offline(pool_dir: &std::path::Path, s: &HealShares) -> Result<pool::Pool> {
    let mut files = s.share.clone();
    if let Some(d) = &s.share_dir {
        files.extend(pool::shares_in(d)?);
    }
    if files.is_empty() {
        bail!(
            "no server runs on {}: give --share FILE (up to the threshold) to work on the stopped pool",
            pool_dir.display()
        );
    }
    pool::Pool::open(pool_dir, &files)
        .with_context(|| format!("cannot open pool {}", pool_dir.display()))
}

/// Runs a long admin job through the pool's server (`command` over the control socket, its
/// progress printed as `what`), or, when no server runs, with `offline` on the stopped pool
/// opened with the share files.
fn run_job<R: serde::de::DeserializeOwned>(
    pool_dir: &std::path::Path,
    shares: &HealShares,
    command: &str,
    args: serde_json::Value,
    what: &'static str,
    offline: impl FnOnce(
        &pool::Pool,
        &dyn Fn(shardvol::volume::scrub::Progress),
    ) -> Result<R, pool::PoolError>,
) -> Result<R> {
    use shardvol::volume::scrub::Progress;
    let show = progress_printer(what);
    let online = shardvol::control::call(pool_dir, command, args, |v| {
        if let Ok(p) = serde_json::from_value::<Progress>(v.clone()) {
            show(&p);
        }
    })?;
    match online {
        Some(v) => Ok(serde_json::from_value(v)?),
        None => {
            let p = open_offline(pool_dir, shares)?;
            let r = offline(&p, &|pr| show(&pr));
            p.close().context("closing the pool")?;
            Ok(r?)
        }
    }
}

fn scrub(a: ScrubArgs) -> Result<()> {
    use shardvol::volume::scrub::{ScrubOptions, ScrubReport};
    let args = serde_json::json!({ "volume": a.volume, "repair": a.repair, "rate": a.rate });
    let report: ScrubReport = run_job(&a.pool, &a.shares, "scrub", args, "scrub", |p, show| {
        let opts = ScrubOptions {
            repair: a.repair,
            rate_bytes_per_s: a.rate,
        };
        p.scrub(&a.volume, &opts, show)
    })?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "scrubbed {}: {} stripes, {} blocks and {} parity rows checked in {:.1} s ({}/s)",
            a.volume,
            report.stripes,
            report.blocks_checked,
            report.parity_checked,
            report.seconds,
            human((report.bytes_read as f64 / report.seconds.max(1e-9)) as u64)
        );
        println!(
            "bad: {}, repaired: {}, unrecoverable blocks: {}, blocks on failed disks (served from parity): {}",
            report.bad_found, report.repaired, report.unrecoverable, report.degraded
        );
        for b in report.bad.iter().take(20) {
            println!(
                "  stripe {} row {} chunk {} (disk {}){}: {}{}",
                b.stripe,
                b.row,
                b.chunk,
                b.disk,
                b.lba.map(|l| format!(" lba {l}")).unwrap_or_default(),
                b.what,
                if b.repaired { ", repaired" } else { "" }
            );
        }
        if report.bad.len() > 20 {
            println!("  ... {} more (--json lists them)", report.bad.len() - 20);
        }
        if report.bad_found > report.repaired && !a.repair {
            println!("run again with --repair to rewrite them");
        }
    }
    if report.unrecoverable > 0 {
        bail!(
            "{} blocks cannot be rebuilt from the surviving chunks",
            report.unrecoverable
        );
    }
    Ok(())
}

fn disk_replace(
    pool_dir: PathBuf,
    disk: u32,
    with: PathBuf,
    rate: u64,
    json: bool,
    shares: HealShares,
) -> Result<()> {
    use shardvol::pool::{RebuildOptions, RebuildReport};
    let with = std::path::absolute(&with).unwrap_or(with);
    let args = serde_json::json!({ "disk": disk, "with": with, "rate": rate });
    let report: RebuildReport = run_job(
        &pool_dir,
        &shares,
        "disk_replace",
        args,
        "rebuild",
        |p, show| {
            let opts = RebuildOptions {
                rate_bytes_per_s: rate,
                stop: None,
            };
            p.replace_disk(shardvol::layout::DiskId(disk), &with, &opts, show)
        },
    )?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "disk {} is now {}{}: {} chunks rebuilt, {} read, {} written in {:.1} s ({}/s)",
            report.disk,
            report.path,
            if report.resumed { " (resumed)" } else { "" },
            report.chunks,
            human(report.bytes_read),
            human(report.bytes_written),
            report.seconds,
            human((report.bytes_written as f64 / report.seconds.max(1e-9)) as u64)
        );
    }
    if report.unrecoverable > 0 {
        bail!(
            "{} blocks could not be rebuilt (more than m chunks of their rows are lost)",
            report.unrecoverable
        );
    }
    Ok(())
}

fn disk_add(
    pool_dir: PathBuf,
    disk: &str,
    rate: u64,
    json: bool,
    shares: HealShares,
) -> Result<()> {
    use shardvol::pool::{AddOptions, AddReport};
    // PATH:DOMAIN, unless the whole argument names an existing file (a path with a colon).
    let (path, domain) = match disk.rsplit_once(':') {
        Some((p, d)) if !d.is_empty() && !std::path::Path::new(disk).exists() => {
            (PathBuf::from(p), Some(d.to_string()))
        }
        _ => (PathBuf::from(disk), None),
    };
    let path = std::path::absolute(&path).unwrap_or(path);
    let args = serde_json::json!({ "path": path, "domain": domain, "rate": rate });
    let report: AddReport = run_job(
        &pool_dir,
        &shares,
        "disk_add",
        args,
        "rebalance",
        |p, show| {
            let opts = AddOptions {
                domain: domain.clone(),
                rate_bytes_per_s: rate,
                stop: None,
            };
            p.add_disk(&path, &opts, show)
        },
    )?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "disk {} ({}, domain {}) is in the pool{}: {} stripes rewritten, {} chunks moved, {} of data in {:.1} s ({}/s)",
            report.disk,
            report.path,
            report.domain,
            if report.resumed {
                " (rebalance resumed)"
            } else {
                ""
            },
            report.moved,
            report.chunks_moved,
            human(report.bytes),
            report.seconds,
            human((report.bytes as f64 / report.seconds.max(1e-9)) as u64)
        );
    }
    Ok(())
}

fn config_cmd(c: ConfigCommand) -> Result<()> {
    use shardvol::config::Config;
    match c {
        ConfigCommand::Check { file } => {
            let cfg = Config::load(&file)?;
            eprintln!("{}: valid", file.display());
            print!("{}", cfg.to_toml());
        }
        ConfigCommand::Defaults => print!("{}", Config::default().to_toml()),
    }
    Ok(())
}

use shardvol::lifecycle::commands::KeyCommand;

/// Runs a key command on the pool's server, or on the stopped pool opened with `--share`.
fn run_key(t: &KeyTarget, cmd: &KeyCommand) -> Result<serde_json::Value> {
    use std::io::Write;
    let show = |p: &serde_json::Value| {
        if let (Some(d), Some(n)) = (p["stripes_done"].as_u64(), p["stripes"].as_u64()) {
            eprint!(
                "\r  re-encrypting: stripe {d} of {n}, {} blocks",
                p["blocks"]
            );
            let _ = std::io::stderr().flush();
            if d == n {
                eprintln!();
            }
        }
    };
    let args = serde_json::to_value(cmd)?;
    if let Some(v) = shardvol::control::call(
        &t.pool,
        shardvol::lifecycle::commands::CONTROL_COMMAND,
        args,
        show,
    )? {
        return Ok(v);
    }
    if t.share.is_empty() {
        bail!(
            "no server runs on {}: give share files with --share FILE (repeat until the threshold is met) to open the stopped pool",
            t.pool.display()
        );
    }
    let config = match &t.config {
        Some(p) => shardvol::config::Config::load(p)?,
        None => shardvol::config::Config::default(),
    };
    let policy = shardvol::kms::policy::KeyPolicy::from_config(&config);
    let p = pool::Pool::open_with(&t.pool, &t.share, &policy)
        .with_context(|| format!("cannot open pool {}", t.pool.display()))?;
    let result = shardvol::lifecycle::commands::run(&p, cmd, &|v| show(&v));
    let closed = p.close().context("closing the pool");
    let v = result?;
    closed?;
    Ok(v)
}

fn utc(unix: u64) -> String {
    shardvol::kms::policy::format_utc(unix)
}

fn key_cmd(k: KeyCmd) -> Result<()> {
    match k {
        KeyCmd::Status { target, json } => {
            let v = run_key(&target, &KeyCommand::Status)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            let st: shardvol::lifecycle::KeyStatus = serde_json::from_value(v)?;
            println!(
                "pool {}  key split {}  unlock: {} of {} shares",
                st.pool_id, st.split_id, st.threshold, st.shares
            );
            println!(
                "new writes: master version {}, epoch {} (started {}); epochs last {} s, blocks older than {} s are re-encrypted",
                st.write_version,
                st.current_epoch.number,
                utc(st.current_epoch.start_unix),
                st.epoch_period_secs,
                st.max_age_secs
            );
            println!("master key versions:");
            for v in &st.versions {
                let mut extra = String::new();
                if let Some(t) = v.destroy_after_unix {
                    extra = format!("  destroyed after {}", utc(t));
                }
                if let Some(t) = v.destroyed_unix {
                    extra = format!("  destroyed {}", utc(t));
                }
                println!(
                    "  version {:<4} {:<10} created {}  {:>10} blocks{extra}",
                    v.version,
                    v.state,
                    utc(v.created_unix),
                    v.blocks
                );
            }
            println!("blocks per key:");
            for k in &st.keys {
                let start = k
                    .epoch_start_unix
                    .map_or("before the kept history".into(), utc);
                println!(
                    "  version {:<4} epoch {:<6} (started {start})  {:>10} blocks",
                    k.version, k.epoch, k.blocks
                );
            }
            if st.unknown_blocks > 0 {
                println!(
                    "  {} blocks of unknown key (destaged before stamps were kept; re-encryption records them)",
                    st.unknown_blocks
                );
            }
            let r = &st.rotation;
            println!(
                "rotation task: {}; {} stripes / {} blocks re-encrypted ({} hot stripes), {} stale stripes left, {:.1} MB/s{}",
                if r.running { "running" } else { "not running" },
                r.stripes_done,
                r.blocks_done,
                r.hot_stripes_done,
                r.remaining_stripes,
                r.rate_mb_s,
                r.last_error
                    .as_ref()
                    .map(|e| format!("; last error: {e}"))
                    .unwrap_or_default()
            );
        }
        KeyCmd::Rotate {
            target,
            volume,
            stripe,
        } => {
            let v = run_key(&target, &KeyCommand::Rotate { volume, stripe })?;
            println!(
                "epoch {} started; {} stripes visited, {} blocks re-encrypted under version {}",
                v["epoch"], v["stripes"], v["blocks"], v["version"]
            );
        }
        KeyCmd::RotateMaster { target } => {
            let v = run_key(&target, &KeyCommand::RotateMaster)?;
            println!(
                "master key version {} is active: new writes use it; older blocks are re-encrypted by the rotation task (or now: `shardvol key rotate`)",
                v["version"]
            );
        }
        KeyCmd::Archive { target, version } => {
            run_key(&target, &KeyCommand::Archive { version })?;
            println!(
                "master key version {version} archived: not used for reading; destroyed when rotation.retention ends"
            );
        }
        KeyCmd::Destroy { target, version } => {
            run_key(&target, &KeyCommand::Destroy { version })?;
            println!(
                "master key version {version} destroyed: erased from the key slots and from both superblock slots of every disk"
            );
        }
    }
    Ok(())
}

/// Exit status of `recover` when the image was written but some blocks could not be read.
const EXIT_INCOMPLETE: i32 = 2;

fn recover(a: RecoverArgs) -> Result<()> {
    use shardvol::pool::recover::{RecoverOptions, describe_blocks, recover};
    let mut shares = a.share.clone();
    if let Some(d) = &a.share_dir {
        shares.extend(pool::shares_in(d)?);
    }
    let r = recover(&RecoverOptions {
        disks: a.disk.clone(),
        shares,
        volume: a.volume.clone(),
        output: a.output.clone(),
        force: a.force,
        progress: !a.quiet,
    })
    .with_context(|| format!("cannot recover volume {}", a.volume))?;
    println!(
        "recovered volume {} ({}) of pool {} into {}",
        r.volume,
        human(r.size),
        r.pool_id,
        a.output.display()
    );
    println!(
        "  pool description: superblock seq {} from {}",
        r.superblock_seq,
        r.superblock_from.display()
    );
    let used = r.disks.iter().filter(|d| d.missing.is_none()).count();
    println!("  disks: {used} used, {} missing", r.disks.len() - used);
    for d in &r.disks {
        let path = d.path.as_ref().unwrap_or(&d.recorded).display();
        match &d.missing {
            None => println!("    disk {:>3}  used     {path}", d.id),
            Some(why) => println!("    disk {:>3}  missing  {path}: {why}", d.id),
        }
    }
    for (p, note) in &r.notes {
        println!("  note: {}: {note}", p.display());
    }
    if r.journal_lost {
        println!(
            "  journal: every journal disk is missing; writes that were only in the journal are not in the image"
        );
    }
    if r.journaled_blocks > 0 {
        println!(
            "  journal: {} blocks could not be destaged (disks missing) and were read from the journal",
            r.journaled_blocks
        );
    }
    println!(
        "  allocation rebuilt from block metadata: {} blocks ({}) in {} stripes; {} rows repaired, {} uncertain, {} chunk areas unreadable",
        r.scan.allocated,
        human(r.scan.allocated * 4096),
        r.scan.stripes,
        r.scan.repaired_rows,
        r.scan.uncertain_rows,
        r.scan.unreadable_chunks
    );
    println!(
        "  copied {} of data, wrote {} (zeros left as holes) in {:.1} s; replayed journal held {} in memory",
        human(r.bytes_copied),
        human(r.bytes_written),
        r.seconds,
        human(r.overlay_bytes)
    );
    if !r.unreadable.is_empty() {
        eprintln!(
            "error: the image is incomplete: {} could not be read and are zeros in {}",
            describe_blocks(&r.unreadable),
            a.output.display()
        );
        std::process::exit(EXIT_INCOMPLETE);
    }
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    // Recovery reports what it did itself; the volume's own warnings (journal kept, destaging
    // retried) speak of a server that is not running.
    let default_filter = match cli.command {
        Some(Command::Recover(_)) => "warn,shardvol::volume=error",
        // Reports: what they print is the answer; how the pool was opened is not.
        Some(Command::Status { .. } | Command::Inspect { .. }) => "warn",
        _ => "info",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SHARDVOL_LOG")
                .unwrap_or_else(|_| default_filter.into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    shardvol::disk::keep_large_buffers_in_heap();
    match cli.command {
        Some(Command::Create(a)) => create(a),
        Some(Command::Inspect { pool, json }) => inspect(pool, json),
        Some(Command::Serve(a)) => {
            let demo = a.pool.is_none()
                && a.share.is_empty()
                && a.share_dir.is_none()
                && a.listen.is_empty()
                && a.socket.is_none()
                && a.config.is_none()
                && !a.read_only;
            serve(a, demo)
        }
        Some(Command::Unlock { pool, share }) => unlock(pool, share),
        Some(Command::Status { pool, json }) => status(pool, json),
        Some(Command::Config(c)) => config_cmd(c),
        Some(Command::Key(k)) => key_cmd(k),
        Some(Command::Shares(SharesCmd::Reissue {
            target,
            shares,
            threshold,
            share_dir,
        })) => {
            let texts = target
                .share
                .iter()
                .map(|f| {
                    std::fs::read_to_string(f)
                        .map(|t| (f.display().to_string(), t))
                        .with_context(|| format!("cannot read share file {}", f.display()))
                })
                .collect::<Result<Vec<_>>>()?;
            if texts.is_empty() {
                bail!(
                    "give the current shares with --share FILE (as many as the pool's threshold)"
                );
            }
            let share_dir = std::path::absolute(&share_dir)?;
            let cmd = KeyCommand::Reissue {
                shares: texts,
                count: shares,
                threshold,
                share_dir,
            };
            let v = run_key(&target, &cmd)?;
            println!(
                "new key split: {} shares, {} needed to unlock; the old shares no longer work. Hand each file to its holder:",
                shares, threshold
            );
            for f in v["files"].as_array().into_iter().flatten() {
                println!("  {}", f.as_str().unwrap_or_default());
            }
            Ok(())
        }
        Some(Command::Scrub(a)) => scrub(a),
        Some(Command::Disk(DiskCommand::Replace {
            pool,
            disk,
            with,
            rate,
            json,
            shares,
        })) => disk_replace(pool, disk, with, rate, json, shares),
        Some(Command::Disk(DiskCommand::Add {
            pool,
            disk,
            rate,
            json,
            shares,
        })) => disk_add(pool, &disk, rate, json, shares),
        Some(Command::Audit(c)) => audit(c),
        Some(Command::Recover(a)) => recover(a),
        None => unreachable!("clap prints help when no command is given"),
    }
}

/// Opens a pool's store and audit log for the `audit` commands, and its audit key when shares
/// are given (unwrapped the way `serve` unlocks, but nothing is recorded: these commands only
/// read the log, except `restart`).
fn open_audit(
    a: &AuditKeyArgs,
) -> Result<(shardvol::audit::AuditLog, Option<shardvol::audit::AuditKey>)> {
    use shardvol::audit::{AuditKey, AuditLog};
    use shardvol::meta::{KeyState, MetaStore};
    let store_path = a.pool.join(pool::STORE_FILE);
    if !pool::exists(&a.pool) {
        bail!(
            "{} is not a shardvol pool (no {})",
            a.pool.display(),
            pool::STORE_FILE
        );
    }
    let store = std::sync::Arc::new(MetaStore::open(&store_path)?);
    let mut shares = a.share.clone();
    if let Some(d) = &a.share_dir {
        shares.extend(pool::shares_in(d)?);
    }
    let key = if shares.is_empty() {
        None
    } else {
        let ring = pool::unlock(&store, &shares).context("cannot unlock the pool's keys")?;
        let active = store
            .keys()?
            .iter()
            .filter(|k| k.state == KeyState::Active)
            .map(|k| k.version)
            .max()
            .unwrap_or(1);
        Some(AuditKey::from_ring(&ring, active)?)
    };
    Ok((AuditLog::open(&a.pool, store), key))
}

fn audit(c: AuditCommand) -> Result<()> {
    match c {
        AuditCommand::Verify(a) => audit_verify(&a),
        AuditCommand::Show { pool, json } => audit_show(&pool, json),
        AuditCommand::Restart(a) => {
            let (log, key) = open_audit(&a)?;
            let key = key.context(
                "restarting the audit log needs the pool's key: pass --share FILE once per share holder",
            )?;
            let r = log.restart(&key)?;
            println!(
                "set {} aside ({}); new log {} starts at record {}",
                r.old_log.display(),
                r.problem,
                log.path().display(),
                r.seq
            );
            Ok(())
        }
    }
}

fn audit_verify(a: &AuditKeyArgs) -> Result<()> {
    // A running server holds the store: it verifies with its own keys (MACs included).
    if let Some(v) =
        shardvol::control::call(&a.pool, "audit_verify", serde_json::Value::Null, |_| {})?
    {
        let out: shardvol::service::AuditVerifyOutput = serde_json::from_value(v)?;
        println!("(verified by the server running on {})", a.pool.display());
        return print_audit_verify(&out);
    }
    let (log, key) = open_audit(a)?;
    let r = log.verify(key.as_ref())?;
    print_audit_verify(&shardvol::service::audit_verify_output(
        &log.path().display().to_string(),
        &r,
        key.is_some(),
    ))
}

fn print_audit_verify(out: &shardvol::service::AuditVerifyOutput) -> Result<()> {
    for l in &out.lines {
        println!("{l}");
    }
    if let Some(b) = &out.broken {
        println!("(the counts above stop at the first broken record)");
        bail!("audit log broken at {b}");
    }
    println!("audit log intact");
    Ok(())
}

fn audit_show(pool_dir: &std::path::Path, json: bool) -> Result<()> {
    use shardvol::audit::AuditLog;
    use shardvol::meta::MetaStore;
    if let Some(v) = shardvol::control::call(
        pool_dir,
        "audit_show",
        serde_json::json!({ "json": json }),
        |_| {},
    )? {
        let lines: Vec<String> = serde_json::from_value(v)?;
        for l in lines {
            println!("{l}");
        }
        return Ok(());
    }
    if !pool::exists(pool_dir) {
        bail!(
            "{} is not a shardvol pool (no {})",
            pool_dir.display(),
            pool::STORE_FILE
        );
    }
    let store = std::sync::Arc::new(MetaStore::open(&pool_dir.join(pool::STORE_FILE))?);
    let log = AuditLog::open(pool_dir, store);
    for l in shardvol::service::audit_show_lines(&log, json).map_err(anyhow::Error::msg)? {
        println!("{l}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("2t"), Ok(2 << 40));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("99999999999P").is_err());
    }
}
