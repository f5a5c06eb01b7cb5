//! Offline recovery: rebuilds the plain image of a volume from disk files and `t` share files
//! alone, without the metadata store and without a server (`shardvol recover`,
//! `docs/recovery.md`).
//!
//! What it does, in order:
//! 1. reads the superblock of every disk given, refuses disks of another pool (the pool of the
//!    shares), takes the newest superblock (highest `seq`) as the pool description, and matches
//!    each file to its disk id through its *own* superblock (paths may have changed since);
//!    disks of the table that were not given, or whose superblock is unreadable, are missing;
//! 2. builds a temporary metadata store (a private temporary directory, removed at the end) from
//!    the superblock's records, and unlocks the keys with the shares (the same refusals as
//!    `serve`);
//! 3. opens every disk read-only behind an [`OverlayDisk`] (writes stay in memory) and every
//!    missing disk as a pulled [`FaultDisk`], then [`Volume::open_for_recovery`]: the journal is
//!    replayed and, when the disks allow, destaged into the overlays, so writes that were only in
//!    the journal are recovered too (the store has no allocation yet, so destaging reads the rows
//!    it keeps instead of taking a stripe for empty). The source disks are never written;
//! 4. rebuilds the allocation bitmaps from the block metadata ([`Volume::scan_allocation`]).
//!    Blocks whose metadata cannot be rebuilt (more than `m` chunks of their row missing) are
//!    "lost": without `force` recovery refuses here, before writing anything, and names them;
//! 5. copies the volume through the verified read path (tags checked, damaged or missing chunks
//!    rebuilt from parity) to the output, skipping holes and all-zero blocks on a regular file
//!    (sparse), with progress every second; then fsyncs the output. A block that cannot be read
//!    is left as zeros and listed in [`Recovered::unreadable`].

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::ops::Range;
use std::os::unix::fs::{DirBuilderExt, FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{PoolError, STORE_FILE, io_err, parts_for, unlock};
use crate::disk::{Disk, DiskRef, FaultDisk, MemDisk, OverlayDisk, Trigger};
use crate::kms;
use crate::layout::placement::Placement;
use crate::layout::{BLOCK_SIZE, BLOCK_SIZE_U64, DiskId};
use crate::meta::{DiskRecord, KeyState, MetaStore, Superblock, VolumeRecord, read_superblock};
use crate::volume::{AllocScan, BlockDevice, Volume, WriteKey};

/// Bytes read from the volume per copy request: large enough that a request covers whole
/// stripes of any geometry up to 4+2 × 256 KiB, small enough that a few in flight cost little.
const COPY_PIECE: u64 = 1 << 20;
/// Copy threads. The volume's read path runs in the calling thread (verify, decrypt, rebuild);
/// two threads keep both cores of a small host busy, more only add contention.
const COPY_THREADS: usize = 2;
/// Bytes of the volume asked of `block_status` at once while walking it.
const STATUS_WINDOW: u64 = 256 << 20;
/// How often progress is printed.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// Ranges of lost or unreadable blocks named in an error message; the rest are counted.
const LIST_MAX: usize = 20;

/// Parameters of `shardvol recover`.
#[derive(Clone, Debug)]
pub struct RecoverOptions {
    pub disks: Vec<PathBuf>,
    pub shares: Vec<PathBuf>,
    pub volume: String,
    pub output: PathBuf,
    /// Overwrite an existing output, and write an image even if some blocks cannot be rebuilt.
    pub force: bool,
    /// Print progress lines on stderr every second.
    pub progress: bool,
}

/// One disk of the pool as recovery used it.
#[derive(Clone, Debug)]
pub struct DiskUse {
    pub id: DiskId,
    /// Its path in the pool's disk table (where it was when the superblock was written).
    pub recorded: PathBuf,
    /// The file given for it, if any.
    pub path: Option<PathBuf>,
    /// `None`: used; otherwise why it counts as missing.
    pub missing: Option<String>,
}

/// What `recover` did.
#[derive(Debug)]
pub struct Recovered {
    pub pool_id: String,
    pub volume: String,
    pub size: u64,
    /// `seq` of the superblock the pool description was taken from, and the file it came from.
    pub superblock_seq: u64,
    pub superblock_from: PathBuf,
    pub disks: Vec<DiskUse>,
    /// Remarks on files given: not used and why (no readable superblock, an id the disk table
    /// does not list), or shorter than the pool expects.
    pub notes: Vec<(PathBuf, String)>,
    /// Every journal disk was missing: the volume was opened on an empty journal (`force`), so
    /// writes that were only in the journal are not in the image.
    pub journal_lost: bool,
    /// Blocks found in the journal at replay that could not be destaged (a disk missing); they
    /// are read from the journal.
    pub journaled_blocks: usize,
    pub scan: AllocScan,
    /// Bytes of the volume that hold data (copied), and bytes actually written (not all-zero).
    pub bytes_copied: u64,
    pub bytes_written: u64,
    /// Blocks that could not be read, as ranges of block numbers: zeros in the image.
    pub unreadable: Vec<Range<u64>>,
    /// Memory the overlays held (journal replay and destaging), in bytes.
    pub overlay_bytes: u64,
    pub seconds: f64,
}

/// A directory removed (with its contents) when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<TempDir, PoolError> {
        let mut r = [0u8; 8];
        rand::fill(&mut r[..]);
        let path = std::env::temp_dir().join(format!(
            "shardvol-recover-{}-{}",
            std::process::id(),
            super::hex(&r)
        ));
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(io_err(&path))?;
        Ok(TempDir(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A file given with `--disk` and what its superblock says.
struct Given {
    path: PathBuf,
    /// (device, inode), to find a file given twice or given as the output.
    ident: (u64, u64),
    superblock: Result<Superblock, String>,
}

fn ident(path: &Path) -> Option<(u64, u64)> {
    fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Ranges of block numbers as "N blocks of 4 KiB: blocks A-B (bytes X-Y), …", at most
/// [`LIST_MAX`] ranges named.
pub fn describe_blocks(ranges: &[Range<u64>]) -> String {
    let total: u64 = ranges.iter().map(|r| r.end - r.start).sum();
    let mut s: Vec<String> = ranges
        .iter()
        .take(LIST_MAX)
        .map(|r| {
            format!(
                "blocks {}-{} (bytes {}-{})",
                r.start,
                r.end - 1,
                r.start * BLOCK_SIZE_U64,
                r.end * BLOCK_SIZE_U64 - 1
            )
        })
        .collect();
    if ranges.len() > LIST_MAX {
        s.push(format!("and {} more ranges", ranges.len() - LIST_MAX));
    }
    format!("{total} blocks of 4 KiB: {}", s.join(", "))
}

/// Reads the superblocks of the files given and picks the pool description (module docs).
fn read_disks(
    paths: &[PathBuf],
    pool_id: [u8; 16],
) -> Result<(Vec<Given>, Superblock, PathBuf), PoolError> {
    let mut given: Vec<Given> = Vec::new();
    for p in paths {
        let id = fs::metadata(p).map(|m| (m.dev(), m.ino())).map_err(|e| {
            PoolError::Invalid(format!(
                "--disk {}: {e} (leave out the disks you do not have: they count as missing)",
                p.display()
            ))
        })?;
        if let Some(other) = given.iter().find(|g| g.ident == id) {
            return Err(PoolError::Invalid(format!(
                "--disk {} and --disk {} are the same file: give each disk once",
                other.path.display(),
                p.display()
            )));
        }
        let superblock = match OverlayDisk::open(p, None) {
            Ok(d) => read_superblock(&d).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        given.push(Given {
            path: p.clone(),
            ident: id,
            superblock,
        });
    }
    let want = super::hex(&pool_id);
    let foreign: Vec<String> = given
        .iter()
        .filter_map(|g| match &g.superblock {
            Ok(sb) if sb.pool.pool_id != pool_id => Some(format!(
                "{} is a disk of pool {}",
                g.path.display(),
                super::hex(&sb.pool.pool_id)
            )),
            _ => None,
        })
        .collect();
    if !foreign.is_empty() {
        return Err(PoolError::Invalid(format!(
            "{}; the shares are of pool {want}: leave out the disks of other pools",
            foreign.join("; ")
        )));
    }
    // The first disk given with the highest seq.
    let mut newest: Option<(Superblock, PathBuf)> = None;
    for g in &given {
        if let Ok(sb) = &g.superblock
            && newest.as_ref().is_none_or(|(n, _)| sb.seq > n.seq)
        {
            newest = Some((sb.clone(), g.path.clone()));
        }
    }
    let Some((sb, from)) = newest else {
        let why: Vec<String> = given
            .iter()
            .map(|g| match &g.superblock {
                Err(e) => format!("{}: {e}", g.path.display()),
                Ok(_) => String::new(),
            })
            .collect();
        return Err(PoolError::Invalid(format!(
            "no disk given has a readable superblock of pool {want}: {}",
            why.join("; ")
        )));
    };
    let mut by_id: HashMap<DiskId, &Path> = HashMap::new();
    for g in &given {
        if let Ok(s) = &g.superblock
            && let Some(first) = by_id.insert(s.disk_id, &g.path)
        {
            return Err(PoolError::Invalid(format!(
                "{} and {} both say they are disk {} of the pool (a copy?): give one of them",
                first.display(),
                g.path.display(),
                s.disk_id
            )));
        }
    }
    Ok((given, sb, from))
}

/// Creates the output file (refusing an existing one unless `force`), sized for the volume.
/// Returns the file and whether it is a regular file (holes may be skipped).
fn create_output(path: &Path, size: u64, force: bool) -> Result<(File, bool), PoolError> {
    let meta = fs::metadata(path);
    if meta.is_ok() && !force {
        return Err(PoolError::Invalid(format!(
            "{} exists: choose another --output, or add --force to overwrite it",
            path.display()
        )));
    }
    let is_dev = meta.as_ref().is_ok_and(|m| m.file_type().is_block_device());
    if is_dev {
        let f = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(io_err(path))?;
        let dev_size = super::device_size(path)?;
        if dev_size < size {
            return Err(PoolError::Invalid(format!(
                "{}: the device has {dev_size} bytes, the volume {size}",
                path.display()
            )));
        }
        return Ok((f, false));
    }
    if meta.as_ref().is_ok_and(|m| !m.is_file()) {
        return Err(PoolError::Invalid(format!(
            "{} is neither a regular file nor a block device",
            path.display()
        )));
    }
    let mut o = OpenOptions::new();
    o.write(true).mode(0o600);
    if force {
        o.create(true).truncate(true);
    } else {
        o.create_new(true);
    }
    let f = o.open(path).map_err(io_err(path))?;
    f.set_len(size).map_err(io_err(path))?;
    Ok((f, true))
}

/// One piece of the copy: `len` bytes at `offset`; `hole` when they are known to be zeros.
struct Piece {
    offset: u64,
    len: u64,
    hole: bool,
}

/// Shared state of the copy threads.
struct Copy<'a> {
    vol: &'a Volume,
    out: &'a File,
    out_path: &'a Path,
    /// Skip writing zeros (a regular file: they are holes already).
    sparse: bool,
    copied: AtomicU64,
    written: AtomicU64,
    unreadable: Mutex<Vec<u64>>,
    failed: Mutex<Option<PoolError>>,
}

impl Copy<'_> {
    fn piece(&self, p: &Piece, buf: &mut Vec<u8>) -> Result<(), PoolError> {
        buf.clear();
        buf.resize(p.len as usize, 0);
        if !p.hole && self.vol.read(p.offset, buf).is_err() {
            // Find the blocks that fail; they stay zero in the image.
            for (i, block) in buf.chunks_mut(BLOCK_SIZE).enumerate() {
                let at = p.offset + (i * BLOCK_SIZE) as u64;
                if self.vol.read(at, block).is_err() {
                    block.fill(0);
                    self.unreadable
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(at / BLOCK_SIZE_U64);
                }
            }
        }
        // Write runs of blocks; on a sparse output skip the all-zero ones.
        let mut i = 0;
        let blocks: Vec<&[u8]> = buf.chunks(BLOCK_SIZE).collect();
        while i < blocks.len() {
            let zero = self.sparse && blocks[i].iter().all(|b| *b == 0);
            let start = i;
            while i < blocks.len() && (self.sparse && blocks[i].iter().all(|b| *b == 0)) == zero {
                i += 1;
            }
            if zero {
                continue;
            }
            let from = start * BLOCK_SIZE;
            let to = (i * BLOCK_SIZE).min(buf.len());
            let at = p.offset + from as u64;
            self.out
                .write_all_at(&buf[from..to], at)
                .map_err(io_err(self.out_path))?;
            self.written
                .fetch_add((to - from) as u64, Ordering::Relaxed);
        }
        if !p.hole {
            self.copied.fetch_add(p.len, Ordering::Relaxed);
        }
        Ok(())
    }
}

fn human(bytes: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let (mut v, mut u) = (bytes, 0);
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

/// One progress line on stderr: bytes copied of `total`, rate, ETA.
fn print_progress(copied: u64, total: u64, started: Instant) {
    let secs = started.elapsed().as_secs_f64().max(1e-3);
    let rate = copied as f64 / secs;
    let pct = if total == 0 {
        100.0
    } else {
        copied as f64 * 100.0 / total as f64
    };
    let eta = if rate > 0.0 {
        format!("{:.0}s", total.saturating_sub(copied) as f64 / rate)
    } else {
        "?".into()
    };
    let mut err = std::io::stderr().lock();
    let _ = writeln!(
        err,
        "recover: {} of {} ({pct:.1}%), {:.1} MB/s, ETA {eta}",
        human(copied as f64),
        human(total as f64),
        rate / 1e6
    );
}

/// Walks the volume's allocation and sends the pieces to copy (holes too unless `sparse`).
fn walk(
    vol: &Volume,
    sparse: bool,
    tx: &std::sync::mpsc::SyncSender<Piece>,
) -> Result<(), PoolError> {
    let size = vol.size();
    let mut at = 0u64;
    while at < size {
        let window = (size - at).min(STATUS_WINDOW);
        for e in vol.block_status(at, window)? {
            let end = at + e.len;
            let mut o = at;
            while o < end && !(e.hole && sparse) {
                let len = (end - o).min(COPY_PIECE);
                let piece = Piece {
                    offset: o,
                    len,
                    hole: e.hole,
                };
                if tx.send(piece).is_err() {
                    return Ok(()); // every worker stopped; the first one's error is reported
                }
                o += len;
            }
            at = end;
        }
    }
    Ok(())
}

/// Copies the volume to `out` (module docs, step 5).
fn copy_volume(
    vol: &Volume,
    out: &File,
    out_path: &Path,
    sparse: bool,
    progress: bool,
) -> Result<(u64, u64, Vec<Range<u64>>), PoolError> {
    let total = vol.allocated_blocks() * BLOCK_SIZE_U64;
    let copy = Copy {
        vol,
        out,
        out_path,
        sparse,
        copied: AtomicU64::new(0),
        written: AtomicU64::new(0),
        unreadable: Mutex::new(Vec::new()),
        failed: Mutex::new(None),
    };
    let done = AtomicBool::new(false);
    let started = Instant::now();
    let (tx, rx) = std::sync::mpsc::sync_channel::<Piece>(COPY_THREADS * 4);
    let rx = Mutex::new(rx);
    std::thread::scope(|scope| -> Result<(), PoolError> {
        let workers: Vec<_> = (0..COPY_THREADS)
            .map(|_| {
                scope.spawn(|| {
                    let mut buf = Vec::with_capacity(COPY_PIECE as usize);
                    loop {
                        let next = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                        let Ok(p) = next else { return };
                        if let Err(e) = copy.piece(&p, &mut buf) {
                            copy.failed
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .get_or_insert(e);
                            return;
                        }
                    }
                })
            })
            .collect();
        if progress {
            scope.spawn(|| {
                let mut next = started + PROGRESS_EVERY;
                while !done.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(100));
                    if Instant::now() < next {
                        continue;
                    }
                    next += PROGRESS_EVERY;
                    print_progress(copy.copied.load(Ordering::Relaxed), total, started);
                }
            });
        }
        let walked = walk(vol, sparse, &tx);
        drop(tx);
        for w in workers {
            let _ = w.join();
        }
        done.store(true, Ordering::SeqCst);
        walked
    })?;
    if progress {
        print_progress(copy.copied.load(Ordering::Relaxed), total, started);
    }
    if let Some(e) = copy.failed.into_inner().unwrap_or_else(|e| e.into_inner()) {
        return Err(e);
    }
    let mut lbas = copy
        .unreadable
        .into_inner()
        .unwrap_or_else(|e| e.into_inner());
    lbas.sort_unstable();
    let mut ranges: Vec<Range<u64>> = Vec::new();
    for l in lbas {
        match ranges.last_mut() {
            Some(r) if r.end == l => r.end += 1,
            _ => ranges.push(l..l + 1),
        }
    }
    Ok((copy.copied.into_inner(), copy.written.into_inner(), ranges))
}

/// Rebuilds the image of one volume from disks and shares (module docs).
pub fn recover(opts: &RecoverOptions) -> Result<Recovered, PoolError> {
    let started = Instant::now();
    if opts.disks.is_empty() {
        return Err(PoolError::Invalid(
            "no disks given: pass --disk FILE for every disk file you have".into(),
        ));
    }
    if opts.shares.is_empty() {
        return Err(PoolError::Invalid(
            "no shares given: pass --share FILE once per share holder, up to the pool's threshold"
                .into(),
        ));
    }
    if fs::symlink_metadata(&opts.output).is_ok() && !opts.force {
        return Err(PoolError::Invalid(format!(
            "{} exists: choose another --output, or add --force to overwrite it",
            opts.output.display()
        )));
    }
    let first_share = kms::load_share_file(&opts.shares[0])?;
    let pool_id = first_share.share.pool_id;
    drop(first_share);
    let (given, sb, superblock_from) = read_disks(&opts.disks, pool_id)?;
    if let Some(out) = ident(&opts.output)
        && let Some(g) = given.iter().find(|g| g.ident == out)
    {
        return Err(PoolError::Invalid(format!(
            "--output {} is the disk {}: recovery never writes to a disk",
            opts.output.display(),
            g.path.display()
        )));
    }
    let Some(record) = sb.volumes.iter().find(|v| v.name == opts.volume).cloned() else {
        let names: Vec<&str> = sb.volumes.iter().map(|v| v.name.as_str()).collect();
        return Err(PoolError::Invalid(format!(
            "the pool has no volume {:?}; its volumes: {}",
            opts.volume,
            names.join(", ")
        )));
    };

    // The pool description in a temporary store; the keys unlocked with the shares.
    let tmp = TempDir::new()?;
    let store = MetaStore::create(&tmp.0.join(STORE_FILE))?;
    store.put_pool(&sb.pool)?;
    for d in &sb.disks {
        store.put_disk(d)?;
    }
    for k in &sb.keys {
        store.put_key(k)?;
    }
    for v in &sb.volumes {
        store.put_volume(v)?;
    }
    let ring = Arc::new(unlock(&store, &opts.shares)?);
    let active = sb
        .keys
        .iter()
        .filter(|k| k.state == KeyState::Active)
        .map(|k| k.version)
        .max()
        .unwrap_or(1);
    let write_key = Arc::new(WriteKey::new(active, 1));

    // Disks: the given ones read-only behind overlays, the others pulled.
    let mut notes = Vec::new();
    let mut by_id: BTreeMap<DiskId, &Given> = BTreeMap::new();
    for g in &given {
        match &g.superblock {
            Ok(s) if sb.disks.iter().any(|d| d.id == s.disk_id) => {
                by_id.insert(s.disk_id, g);
            }
            Ok(s) => notes.push((
                g.path.clone(),
                format!(
                    "says it is disk {}, which the pool's disk table (superblock seq {}) does not list",
                    s.disk_id, sb.seq
                ),
            )),
            Err(e) => notes.push((g.path.clone(), format!("{e}: used as a missing disk"))),
        }
    }
    let mut disks: HashMap<DiskId, DiskRef> = HashMap::new();
    let mut overlays: Vec<Arc<OverlayDisk>> = Vec::new();
    let mut uses = Vec::new();
    for d in &sb.disks {
        let (disk, path, missing): (DiskRef, Option<PathBuf>, Option<String>) = match by_id
            .get(&d.id)
        {
            Some(g) => match OverlayDisk::open(&g.path, None) {
                Ok(o) => {
                    let o = Arc::new(o);
                    overlays.push(o.clone());
                    let short = (o.size() < d.size).then(|| {
                            format!(
                                "{} bytes, the pool expects {}: what lies past its end is rebuilt from parity",
                                o.size(),
                                d.size
                            )
                        });
                    if let Some(s) = short {
                        notes.push((g.path.clone(), s));
                    }
                    (o, Some(g.path.clone()), None)
                }
                Err(e) => (
                    missing_disk(d),
                    Some(g.path.clone()),
                    Some(format!("cannot be opened: {e}")),
                ),
            },
            None => (
                missing_disk(d),
                None,
                Some("not given (or its superblock is unreadable)".into()),
            ),
        };
        disks.insert(d.id, disk);
        uses.push(DiskUse {
            id: d.id,
            recorded: d.path.clone(),
            path,
            missing,
        });
    }
    let missing: Vec<String> = uses
        .iter()
        .filter(|u| u.missing.is_some())
        .map(|u| u.id.to_string())
        .collect();

    // The journal lives on `m + 1` disks. With all of them gone, the writes that were only in
    // the journal are lost; with --force the volume opens on an empty journal (the chunk slots
    // of those disks still count as missing) and the destaged data is recovered.
    let placement = Placement::new(record.placement_seed, super::placement_table(&sb.disks))
        .map_err(|e| PoolError::Invalid(e.to_string()))?;
    let journal_disks = Volume::journal_disks(&placement, &record)?;
    let journal_lost = journal_disks
        .iter()
        .all(|id| uses.iter().any(|u| u.id == *id && u.missing.is_some()));
    if journal_lost {
        let ids: Vec<String> = journal_disks.iter().map(|d| d.to_string()).collect();
        if !opts.force {
            return Err(PoolError::Invalid(format!(
                "all {} journal disks of volume {} (disks {}) are missing: writes that were not yet \
                 destaged when the pool stopped cannot be recovered. Find one of them, or add --force \
                 to recover what was destaged",
                journal_disks.len(),
                record.name,
                ids.join(", ")
            )));
        }
        for d in sb.disks.iter().filter(|d| journal_disks.contains(&d.id)) {
            disks.insert(d.id, journal_stand_in(d, &record));
        }
    }

    let store = Arc::new(store);
    let parts = parts_for(&record, &disks, &sb.disks, store, Some((ring, write_key)))?;
    let vol = Volume::open_for_recovery(parts).map_err(|e| {
        PoolError::Invalid(format!(
            "cannot open volume {}: {e}{}",
            record.name,
            if missing.is_empty() {
                String::new()
            } else {
                format!(" (disks missing: {})", missing.join(", "))
            }
        ))
    })?;
    vol.halt();
    for o in &overlays {
        o.set_keep_writes(false);
    }
    let overlay_bytes = overlays.iter().map(|o| o.memory_bytes()).sum();
    let journaled_blocks = vol.journaled_blocks();
    let scan = vol.scan_allocation()?;
    let lost = vol.install_allocation(&scan)?;
    if !lost.is_empty() && !opts.force {
        return Err(PoolError::Invalid(format!(
            "some blocks cannot be rebuilt: more than {} of the disks holding their stripes are missing \
             (disks missing: {}). Nothing was written. Find the missing disks, or add --force to write \
             everything else (those blocks as zeros). Blocks that cannot be rebuilt: {}",
            record.geometry.m,
            missing.join(", "),
            describe_blocks(&lost)
        )));
    }

    let (out, sparse) = create_output(&opts.output, record.size, opts.force)?;
    let (copied, written, unreadable) =
        copy_volume(&vol, &out, &opts.output, sparse, opts.progress)?;
    out.sync_all().map_err(io_err(&opts.output))?;
    if sparse {
        let dir = match opts.output.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(dir))?;
    }
    drop(vol);
    Ok(Recovered {
        pool_id: super::hex(&sb.pool.pool_id),
        volume: record.name.clone(),
        size: record.size,
        superblock_seq: sb.seq,
        superblock_from,
        disks: uses,
        notes,
        journal_lost,
        journaled_blocks,
        scan,
        bytes_copied: copied,
        bytes_written: written,
        unreadable,
        overlay_bytes,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// A missing journal disk replaced by an empty journal: its journal area is blank memory, every
/// I/O beyond it (the chunk slots) fails as on a missing disk.
fn journal_stand_in(d: &DiskRecord, v: &VolumeRecord) -> DiskRef {
    let f = FaultDisk::new(Arc::new(MemDisk::new(d.path.display().to_string(), d.size)));
    let h = f.handle();
    let slots = v.region_offset + v.journal_size..u64::MAX;
    h.fail_reads(Trigger::range(slots.clone()));
    h.fail_writes(Trigger::range(slots.clone()));
    h.fail_discards(Trigger::range(slots));
    Arc::new(f)
}

/// A disk that is not there: every I/O fails as if it had been pulled.
fn missing_disk(d: &DiskRecord) -> DiskRef {
    let f = FaultDisk::new(Arc::new(MemDisk::new(d.path.display().to_string(), d.size)));
    f.handle().set_gone(true);
    Arc::new(f)
}
