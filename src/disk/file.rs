//! Opening files and block devices: options, the io_uring probe and the choice of backend.
//!
//! [`Backend::Auto`], the default, resolves per disk:
//!
//! - buffered I/O (`direct` off): [`InlineDisk`], system calls in the submitting thread. A
//!   page-cache op costs a few microseconds; handing it to a ring or worker thread and waking
//!   the caller costs more, and the whole server is faster without it (figures in
//!   `docs/disks.md`);
//! - `O_DIRECT`: io_uring when the kernel lets this process use it, so that ops overlap on the
//!   device; the `pread` backend otherwise. The probe runs once per process
//!   ([`uring_available`]): it sets up a small ring, checks that the opcodes we need are
//!   supported, and runs a `NOP` through it (seccomp filters may allow `io_uring_setup` but deny
//!   `io_uring_enter`). When it fails, the first such [`open_disk`] logs the reason with
//!   `tracing::warn!`.
//!
//! The first automatic choice of each kind is logged once per process at info level, with its
//! reason. The environment variable [`BACKEND_ENV`]
//! (`SHARDVOL_DISK_BACKEND=inline|pread|io_uring|auto`) overrides [`Backend::Auto`] for every
//! disk, buffered or not; an explicit [`DiskOptions::backend`] wins over both.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::sync::{Arc, OnceLock};

use io_uring::{IoUring, opcode};

use super::{DiskError, DiskRef, InlineDisk, PreadDisk, SECTOR, UringDisk};

/// Environment variable that forces a backend when [`DiskOptions::backend`] is `Auto`.
pub const BACKEND_ENV: &str = "SHARDVOL_DISK_BACKEND";

/// Which implementation drives a file or block device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Backend {
    /// What [`BACKEND_ENV`] says; without it, inline for buffered I/O, and for `O_DIRECT`
    /// io_uring if the probe succeeds, else pread.
    #[default]
    Auto,
    /// io_uring, or an error if it is unavailable.
    Uring,
    /// pread/pwrite worker threads.
    Pread,
    /// pread/pwrite in the submitting thread ([`InlineDisk`]).
    Inline,
}

impl Backend {
    /// Parse a value of [`BACKEND_ENV`]: "auto", "io_uring" (or "uring"), "pread", "inline".
    pub fn parse(value: &str) -> Option<Backend> {
        match value.trim().to_ascii_lowercase().as_str() {
            "auto" | "" => Some(Backend::Auto),
            "io_uring" | "uring" | "io-uring" => Some(Backend::Uring),
            "pread" | "sync" | "fallback" => Some(Backend::Pread),
            "inline" => Some(Backend::Inline),
            _ => None,
        }
    }
}

/// How to open a disk.
#[derive(Clone, Debug)]
pub struct DiskOptions {
    /// Open with `O_DIRECT` (bypass the page cache). Off by default: buffered I/O and
    /// `fdatasync` for `Sync`. With `O_DIRECT` every op must also fit the device's logical block
    /// size (512 or 4096); a misfit is reported by the kernel as `EINVAL`.
    pub direct: bool,
    pub backend: Backend,
    /// Submission queue entries of the io_uring (rounded up to a power of two; the kernel
    /// refuses more than 32768). Ops beyond it wait in the disk thread's backlog. 256 keeps an NVMe device busy (QD32 per disk reaches
    /// its throughput) while bounding the ring's locked memory to a few tens of KiB.
    pub ring_depth: u32,
    /// Worker threads of the pread backend: the number of ops it runs at once on one disk.
    pub pread_workers: usize,
    /// Largest transfer handed to the kernel in one read or write; larger ops are split and
    /// continued like short transfers. 1 MiB: large enough to stream, small enough that one op
    /// does not hold the device for long. (Linux caps one transfer at 2 GiB − 4 KiB anyway.)
    pub max_io_bytes: u32,
    /// Name in logs and errors; the path if `None`.
    pub name: Option<String>,
}

impl Default for DiskOptions {
    fn default() -> Self {
        DiskOptions {
            direct: false,
            backend: Backend::Auto,
            ring_depth: 256,
            pread_workers: 4,
            max_io_bytes: 1 << 20,
            name: None,
        }
    }
}

impl DiskOptions {
    pub(crate) fn name_for(&self, path: &Path) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| path.display().to_string())
    }

    /// `max_io_bytes` made usable: at least one sector, a multiple of 4096 when above it.
    pub(crate) fn max_transfer(&self) -> u64 {
        let m = u64::from(self.max_io_bytes).max(SECTOR);
        if m >= 4096 {
            m / 4096 * 4096
        } else {
            m / SECTOR * SECTOR
        }
    }
}

/// Whether io_uring works in this process; the reason if not. Probed once, then cached.
pub fn uring_available() -> Result<(), &'static str> {
    static PROBE: OnceLock<Result<(), String>> = OnceLock::new();
    PROBE
        .get_or_init(probe_uring)
        .as_ref()
        .map(|_| ())
        .map_err(String::as_str)
}

fn probe_uring() -> Result<(), String> {
    let mut ring = IoUring::new(4).map_err(|e| match e.raw_os_error() {
        Some(libc::ENOSYS) => format!("io_uring_setup: not implemented by this kernel ({e})"),
        Some(libc::EPERM) => {
            format!("io_uring_setup: denied (seccomp or kernel.io_uring_disabled) ({e})")
        }
        _ => format!("io_uring_setup: {e}"),
    })?;
    let mut probe = io_uring::Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|e| format!("io_uring opcode probe: {e}"))?;
    for (code, name) in [
        (opcode::Read::CODE, "READ"),
        (opcode::Write::CODE, "WRITE"),
        (opcode::Fsync::CODE, "FSYNC"),
        (opcode::Fallocate::CODE, "FALLOCATE"),
        (opcode::PollAdd::CODE, "POLL_ADD"),
    ] {
        if !probe.is_supported(code) {
            return Err(format!(
                "io_uring: opcode {name} not supported by this kernel"
            ));
        }
    }
    let nop = opcode::Nop::new().build().user_data(7);
    // SAFETY: a NOP references no memory.
    unsafe { ring.submission().push(&nop) }
        .map_err(|_| "io_uring: cannot queue a NOP".to_owned())?;
    ring.submit_and_wait(1)
        .map_err(|e| format!("io_uring_enter: {e}"))?;
    match ring.completion().next() {
        Some(cqe) if cqe.user_data() == 7 && cqe.result() >= 0 => Ok(()),
        Some(cqe) => Err(format!(
            "io_uring: NOP failed: {}",
            std::io::Error::from_raw_os_error(-cqe.result())
        )),
        None => Err("io_uring: NOP did not complete".to_owned()),
    }
}

/// The backend [`Backend::Auto`] resolves to, after the environment override.
fn resolve_auto() -> Backend {
    static FROM_ENV: OnceLock<Backend> = OnceLock::new();
    *FROM_ENV.get_or_init(|| match std::env::var(BACKEND_ENV) {
        Ok(value) => match Backend::parse(&value) {
            Some(Backend::Pread) => {
                tracing::warn!("{BACKEND_ENV}={value}: disks use the pread backend");
                Backend::Pread
            }
            Some(b @ (Backend::Inline | Backend::Uring)) => {
                tracing::info!("{BACKEND_ENV}={value}: disks use the {b:?} backend");
                b
            }
            Some(b) => b,
            None => {
                tracing::warn!(
                    "{BACKEND_ENV}={value} is not one of auto, io_uring, pread, inline: ignored"
                );
                Backend::Auto
            }
        },
        Err(_) => Backend::Auto,
    })
}

/// Open a file or block device with the backend the options and the host allow.
pub fn open_disk(path: &Path, opts: &DiskOptions) -> Result<DiskRef, DiskError> {
    let backend = match opts.backend {
        Backend::Auto => resolve_auto(),
        b => b,
    };
    match backend {
        Backend::Pread => Ok(Arc::new(PreadDisk::open(path, opts)?)),
        Backend::Inline => Ok(Arc::new(InlineDisk::open(path, opts)?)),
        Backend::Uring => Ok(Arc::new(UringDisk::open(path, opts)?)),
        Backend::Auto if !opts.direct => {
            static LOGGED: OnceLock<()> = OnceLock::new();
            LOGGED.get_or_init(|| {
                tracing::info!(
                    "buffered disks use the inline backend: a page-cache op costs less than a hop to a disk thread"
                )
            });
            Ok(Arc::new(InlineDisk::open(path, opts)?))
        }
        Backend::Auto => {
            static WARNED: OnceLock<()> = OnceLock::new();
            static LOGGED: OnceLock<()> = OnceLock::new();
            if let Err(reason) = uring_available() {
                WARNED.get_or_init(|| {
                    tracing::warn!("io_uring unavailable, disks use the pread backend: {reason}")
                });
                return Ok(Arc::new(PreadDisk::open(path, opts)?));
            }
            match UringDisk::open(path, opts) {
                Ok(d) => {
                    LOGGED.get_or_init(|| {
                        tracing::info!(
                            "O_DIRECT disks use io_uring: their ops overlap on the device"
                        )
                    });
                    Ok(Arc::new(d))
                }
                // The probe passed but this ring could not be set up (locked-memory limit on
                // older kernels, too many rings): this disk falls back alone.
                Err(DiskError::Io {
                    op: "io_uring_setup",
                    source,
                    ..
                }) => {
                    tracing::warn!(disk = %opts.name_for(path), "io_uring setup failed, using the pread backend: {source}");
                    Ok(Arc::new(PreadDisk::open(path, opts)?))
                }
                Err(e) => Err(e),
            }
        }
    }
}

/// Create a sparse file of `size` bytes (a multiple of 512) for a pool disk. Fails if the file
/// exists, so that an existing disk is never truncated. The file and its directory entry are
/// made durable before returning.
pub fn create_file(path: &Path, size: u64) -> Result<(), DiskError> {
    let name = path.display().to_string();
    if !size.is_multiple_of(SECTOR) {
        return Err(DiskError::Unaligned { disk: name });
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| DiskError::io(&name, "create", 0, e))?;
    file.set_len(size)
        .map_err(|e| DiskError::io(&name, "set length", size, e))?;
    file.sync_all()
        .map_err(|e| DiskError::io(&name, "sync", 0, e))?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| DiskError::io(&name, "sync directory", 0, e))
}

/// A file or block device opened for a disk backend.
pub(crate) struct OpenedFile {
    pub file: File,
    /// Bytes, rounded down to a multiple of 512.
    pub size: u64,
    pub is_block_device: bool,
}

pub(crate) fn open_file(path: &Path, name: &str, direct: bool) -> Result<OpenedFile, DiskError> {
    let mut options = OpenOptions::new();
    options.read(true).write(true);
    let mut flags = if direct { libc::O_DIRECT } else { 0 };
    // O_EXCL on a block device refuses one that is mounted or claimed by another user
    // (a filesystem, md, another pool): two owners would destroy each other's data.
    if std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device()) {
        flags |= libc::O_EXCL;
    }
    options.custom_flags(flags);
    let mut file = options
        .open(path)
        .map_err(|e| DiskError::io(name, "open", 0, e))?;
    let meta = file
        .metadata()
        .map_err(|e| DiskError::io(name, "stat", 0, e))?;
    let is_block_device = meta.file_type().is_block_device();
    let size = if is_block_device {
        file.seek(SeekFrom::End(0))
            .map_err(|e| DiskError::io(name, "size", 0, e))?
    } else if meta.is_file() {
        meta.len()
    } else {
        let e = std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "neither a regular file nor a block device",
        );
        return Err(DiskError::io(name, "open", 0, e));
    };
    // Chunks, metadata pages and journal records are read exactly where they are: kernel
    // readahead only reads neighbouring chunks of other stripes (or holes) into the page cache.
    // Advice failing (some filesystems ignore it) changes nothing but speed.
    let _ = nix::fcntl::posix_fadvise(
        &file,
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_RANDOM,
    );
    Ok(OpenedFile {
        file,
        size: size / SECTOR * SECTOR,
        is_block_device,
    })
}
