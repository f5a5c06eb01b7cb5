//! The command line as clap types: `Cli`, its `Command`s and their argument structs, and the
//! size parser (`64K`, `1G`) their flags use. Nothing here runs a command.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "shardvol",
    version,
    about = "Encrypted, erasure-coded, self-healing block volumes served over NBD",
    arg_required_else_help = true
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Option<Command>,
}

#[derive(Subcommand)]
pub(crate) enum Command {
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
pub(crate) struct KeyTarget {
    /// Pool directory.
    #[arg(long)]
    pub(crate) pool: PathBuf,
    /// A share file, to open a stopped pool; repeat until the threshold is met.
    #[arg(long)]
    pub(crate) share: Vec<PathBuf>,
    /// Configuration file for a stopped pool (rotation and unlock settings).
    #[arg(long)]
    pub(crate) config: Option<PathBuf>,
}

#[derive(Subcommand)]
pub(crate) enum KeyCmd {
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
pub(crate) enum SharesCmd {
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
pub(crate) struct HealShares {
    /// A share file (needed only when no server runs on the pool); repeat up to the threshold.
    #[arg(long)]
    pub(crate) share: Vec<PathBuf>,
    /// A directory of share files (share-*.txt).
    #[arg(long)]
    pub(crate) share_dir: Option<PathBuf>,
}

#[derive(Args)]
pub(crate) struct ScrubArgs {
    #[arg(long)]
    pub(crate) pool: PathBuf,
    /// The volume to scrub.
    #[arg(long)]
    pub(crate) volume: String,
    /// Rewrite bad blocks and parity (otherwise only report them).
    #[arg(long)]
    pub(crate) repair: bool,
    /// Most bytes read per second, e.g. 100M (0: no limit).
    #[arg(long, default_value = "0", value_parser = parse_size)]
    pub(crate) rate: u64,
    /// Print the report as JSON.
    #[arg(long)]
    pub(crate) json: bool,
    #[command(flatten)]
    pub(crate) shares: HealShares,
}

#[derive(Subcommand)]
pub(crate) enum DiskCommand {
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
pub(crate) struct RecoverArgs {
    /// A disk file (or block device) of the pool; repeat for every disk you have. Disks left
    /// out count as missing and are rebuilt from parity.
    #[arg(long, required = true)]
    pub(crate) disk: Vec<PathBuf>,
    /// A share file; repeat until the pool's threshold is met.
    #[arg(long)]
    pub(crate) share: Vec<PathBuf>,
    /// A directory of share files (share-*.txt).
    #[arg(long)]
    pub(crate) share_dir: Option<PathBuf>,
    /// Name of the volume to recover.
    #[arg(long)]
    pub(crate) volume: String,
    /// The image to write: a new file (sparse), or with --force an existing file or block device.
    #[arg(long)]
    pub(crate) output: PathBuf,
    /// Overwrite an existing output; write an image even when some blocks cannot be rebuilt
    /// (they are left as zeros, listed, and the exit status is 2).
    #[arg(long)]
    pub(crate) force: bool,
    /// No progress lines on stderr.
    #[arg(long)]
    pub(crate) quiet: bool,
}

#[derive(Subcommand)]
pub(crate) enum AuditCommand {
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
pub(crate) struct AuditKeyArgs {
    /// Pool directory.
    #[arg(long)]
    pub(crate) pool: PathBuf,
    /// A share file; repeat until the threshold is met (verify: to check the MACs).
    #[arg(long)]
    pub(crate) share: Vec<PathBuf>,
    /// A directory of share files (share-*.txt).
    #[arg(long)]
    pub(crate) share_dir: Option<PathBuf>,
}

#[derive(Subcommand)]
pub(crate) enum ConfigCommand {
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
pub(crate) struct CreateArgs {
    /// Pool directory (created if absent).
    #[arg(long)]
    pub(crate) pool: PathBuf,
    /// Volume name: the NBD export name.
    #[arg(long, default_value = "vol0")]
    pub(crate) volume: String,
    /// Volume size, e.g. 1G, 512M, 10T.
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    pub(crate) size: u64,
    /// Data chunks per stripe (k).
    #[arg(long, default_value_t = 4)]
    pub(crate) data: u16,
    /// Parity chunks per stripe (m): how many disks may be lost.
    #[arg(long, default_value_t = 2)]
    pub(crate) parity: u16,
    /// Bytes per chunk (power of two, 4K to 4M).
    #[arg(long, default_value = "64K", value_parser = parse_size)]
    pub(crate) chunk_size: u64,
    /// Number of backing files to create under POOL/disks (new pool only).
    #[arg(long, conflicts_with = "disk")]
    pub(crate) disks: Option<usize>,
    /// A backing file or block device, with an optional failure domain: PATH[:DOMAIN].
    /// Repeat for each disk (new pool only).
    #[arg(long)]
    pub(crate) disk: Vec<String>,
    /// Number of KEK shares to write (n).
    #[arg(long, default_value_t = 5)]
    pub(crate) shares: u8,
    /// Shares needed to unlock the pool (t).
    #[arg(long, default_value_t = 3)]
    pub(crate) threshold: u8,
    /// Where to write the share files (default POOL/shares). Hand each file to one holder.
    #[arg(long)]
    pub(crate) share_dir: Option<PathBuf>,
    /// Journal size per journal disk (sparse: only what the journal has held takes space).
    /// Under sustained random writes a larger journal lets each destage round merge more
    /// blocks per stripe: see docs/write-path.md.
    #[arg(long, default_value = DEFAULT_JOURNAL_SIZE, value_parser = parse_size)]
    pub(crate) journal_size: u64,
}

#[derive(Args, Default)]
pub(crate) struct ServeArgs {
    /// Pool directory.
    #[arg(long)]
    pub(crate) pool: Option<PathBuf>,
    /// A share file; repeat until the threshold is met.
    #[arg(long)]
    pub(crate) share: Vec<PathBuf>,
    /// A directory of share files (share-*.txt).
    #[arg(long)]
    pub(crate) share_dir: Option<PathBuf>,
    /// TCP address to listen on; repeat for several. Default 127.0.0.1:10809 unless --socket
    /// is given. Ignored under systemd socket activation.
    #[arg(long)]
    pub(crate) listen: Vec<String>,
    /// Unix socket path to listen on.
    #[arg(long)]
    pub(crate) socket: Option<PathBuf>,
    /// Export every volume read-only: writes, trims and zeroes get EPERM.
    #[arg(long)]
    pub(crate) read_only: bool,
    /// Configuration file (TOML; see `shardvol config defaults`).
    #[arg(long)]
    pub(crate) config: Option<PathBuf>,
}

/// `create --journal-size` when not given, and the demo pool's journal.
pub(crate) const DEFAULT_JOURNAL_SIZE: &str = "512M";

/// Parses sizes such as `4096`, `64K`, `1G`, `1GiB`, `10T` (binary units).
pub(crate) fn parse_size(s: &str) -> Result<u64, String> {
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
