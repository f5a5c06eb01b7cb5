//! [`MemDisk`]: a sparse in-memory disk with a model of volatile and durable state.
//!
//! # Durability model
//!
//! The disk keeps two images and a log:
//!
//! - the *durable* image: what survives a power loss;
//! - the log of *unsynced* changes (writes and discards) since they were last made durable, in
//!   the order they completed;
//! - the *current* image = durable image + every unsynced change applied in order. Reads see it.
//!
//! A [`IoOp::Sync`] makes durable the changes that completed before its batch was submitted,
//! exactly what the [`Disk`] contract promises and no more: changes made earlier in the same
//! batch stay unsynced. [`MemDisk::crash`] simulates a power loss: each unsynced change is
//! independently kept, dropped or torn, per [`CrashMode`]; a torn change keeps each of its
//! 512-byte sectors independently with probability 1/2 (sectors are the unit of atomicity; a
//! sector is never half written). Kept sectors are applied to the durable image in completion
//! order, and the current image becomes the durable image. The disk then keeps working.
//!
//! Ops of a batch execute in submission order inside `submit`, which returns a completed
//! [`Pending`]. Pages (4096 bytes) are allocated on first write, so a large disk costs only
//! what is written to it; a discard frees whole pages.
//!
//! Tests can look at every stored byte: [`MemDisk::contents`], [`MemDisk::durable_contents`],
//! [`MemDisk::find`] (which also searches unsynced data that a crash could resurrect), and can
//! alter the medium behind the disk's back with [`MemDisk::tamper`].

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use rand::{Rng, RngExt};

use super::{Disk, IoOp, Pending, SECTOR, check_batch};

const PAGE: usize = 4096;
type Page = Box<[u8; PAGE]>;
type Image = BTreeMap<u64, Page>;

/// What happens to each unsynced change at [`MemDisk::crash`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum CrashMode {
    /// Every unsynced change is lost.
    DropAll,
    /// Every unsynced change survives (the write cache happened to be flushed).
    KeepAll,
    /// Each change is kept with probability `keep`, torn with probability `torn`, dropped
    /// otherwise (probabilities are clamped to [0, 1]; `keep` is decided first).
    Random { keep: f64, torn: f64 },
}

impl CrashMode {
    /// A third each of kept, torn and dropped.
    pub const THIRDS: CrashMode = CrashMode::Random {
        keep: 1.0 / 3.0,
        torn: 1.0 / 3.0,
    };
}

/// What a crash did to the unsynced changes (counts of changes, not sectors).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CrashReport {
    pub kept: u64,
    pub dropped: u64,
    pub torn: u64,
}

/// Counters of the ops a [`MemDisk`] executed (refused batches are not counted).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemDiskStats {
    pub batches: u64,
    pub reads: u64,
    pub writes: u64,
    pub syncs: u64,
    pub discards: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
}

impl MemDiskStats {
    /// Every op counted: reads + writes + syncs + discards.
    pub fn ops(&self) -> u64 {
        self.reads + self.writes + self.syncs + self.discards
    }
}

#[derive(Clone)]
enum Change {
    Write { offset: u64, data: Vec<u8> },
    Discard { offset: u64, len: u64 },
}

#[derive(Clone, Default)]
struct State {
    current: Image,
    durable: Image,
    unsynced: Vec<Change>,
    stats: MemDiskStats,
}

/// A sparse in-memory disk that models volatile and durable state (see the module docs).
pub struct MemDisk {
    name: String,
    size: u64,
    state: Mutex<State>,
}

impl MemDisk {
    /// An empty (all zero, all durable) disk of `size` bytes, rounded down to a multiple of 512.
    pub fn new(name: impl Into<String>, size: u64) -> MemDisk {
        MemDisk {
            name: name.into(),
            size: size / SECTOR * SECTOR,
            state: Mutex::new(State::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Simulate a power loss (see the module docs). Deterministic for a given `rng` state.
    pub fn crash<R: Rng + ?Sized>(&self, rng: &mut R, mode: CrashMode) -> CrashReport {
        let mut st = self.lock();
        let mut report = CrashReport::default();
        let changes = std::mem::take(&mut st.unsynced);
        for change in changes {
            let fate = match mode {
                CrashMode::DropAll => Fate::Drop,
                CrashMode::KeepAll => Fate::Keep,
                CrashMode::Random { keep, torn } => {
                    let keep = keep.clamp(0.0, 1.0);
                    let torn = torn.clamp(0.0, 1.0 - keep);
                    let x: f64 = rng.random();
                    if x < keep {
                        Fate::Keep
                    } else if x < keep + torn {
                        Fate::Torn
                    } else {
                        Fate::Drop
                    }
                }
            };
            match fate {
                Fate::Keep => {
                    report.kept += 1;
                    apply(&mut st.durable, &change);
                }
                Fate::Drop => report.dropped += 1,
                Fate::Torn => {
                    report.torn += 1;
                    apply_torn(&mut st.durable, &change, rng);
                }
            }
        }
        st.current = st.durable.clone();
        report
    }

    /// A copy of this disk in its present state (images and unsynced log), with zeroed
    /// counters: crash the copy in several ways without disturbing the original.
    pub fn snapshot(&self) -> MemDisk {
        let st = self.lock();
        let state = State {
            stats: MemDiskStats::default(),
            ..st.clone()
        };
        MemDisk {
            name: self.name.clone(),
            size: self.size,
            state: Mutex::new(state),
        }
    }

    /// Counters of executed ops.
    pub fn stats(&self) -> MemDiskStats {
        self.lock().stats
    }

    /// Unsynced changes (writes and discards) that a crash would decide on.
    pub fn unsynced(&self) -> usize {
        self.lock().unsynced.len()
    }

    /// Bytes of memory holding the current image (pages allocated by writes).
    pub fn stored_bytes(&self) -> u64 {
        (self.lock().current.len() * PAGE) as u64
    }

    /// `len` bytes at `offset` of the current image, unchecked and uncounted.
    pub fn read_bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0; len];
        read_into(&self.lock().current, offset, &mut out);
        out
    }

    /// `len` bytes at `offset` of the durable image.
    pub fn durable_bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0; len];
        read_into(&self.lock().durable, offset, &mut out);
        out
    }

    /// Every stored page of the current image as (byte offset, 4096 bytes), in offset order.
    /// Bytes outside these pages are zero.
    pub fn contents(&self) -> Vec<(u64, Vec<u8>)> {
        pages_of(&self.lock().current)
    }

    /// Every stored page of the durable image, like [`contents`](MemDisk::contents).
    pub fn durable_contents(&self) -> Vec<(u64, Vec<u8>)> {
        pages_of(&self.lock().durable)
    }

    /// Where `pattern` occurs: the first match in the current image, else in the durable
    /// image (as byte offsets), else in the data of one unsynced write (the write's offset plus
    /// the position in it), since a crash may bring that data back. Matches across page
    /// boundaries are found; a match pieced together from two unsynced writes that are both
    /// overwritten in the current image is not. `None` if nowhere.
    pub fn find(&self, pattern: &[u8]) -> Option<u64> {
        if pattern.is_empty() {
            return Some(0);
        }
        let st = self.lock();
        find_in_image(&st.current, pattern)
            .or_else(|| find_in_image(&st.durable, pattern))
            .or_else(|| {
                st.unsynced.iter().find_map(|c| match c {
                    Change::Write { offset, data } => {
                        find_in(data, pattern).map(|p| offset + p as u64)
                    }
                    Change::Discard { .. } => None,
                })
            })
    }

    /// Overwrite bytes of the medium directly, in both images, as an attacker or a failing
    /// disk would: no op is counted and nothing is logged as unsynced.
    pub fn tamper(&self, offset: u64, data: &[u8]) {
        let mut st = self.lock();
        write_bytes(&mut st.current, offset, data);
        write_bytes(&mut st.durable, offset, data);
    }
}

enum Fate {
    Keep,
    Drop,
    Torn,
}

fn apply(image: &mut Image, change: &Change) {
    match change {
        Change::Write { offset, data } => write_bytes(image, *offset, data),
        Change::Discard { offset, len } => zero_range(image, *offset, *len),
    }
}

fn apply_torn<R: Rng + ?Sized>(image: &mut Image, change: &Change, rng: &mut R) {
    let sector = SECTOR as usize;
    match change {
        Change::Write { offset, data } => {
            for (i, s) in data.chunks(sector).enumerate() {
                if rng.random_bool(0.5) {
                    write_bytes(image, offset + (i * sector) as u64, s);
                }
            }
        }
        Change::Discard { offset, len } => {
            // Only sectors of stored pages can change; visit those (a discard may span the disk).
            let end = offset + len;
            let pages: Vec<u64> = image
                .range(offset / PAGE as u64..end.div_ceil(PAGE as u64))
                .map(|(&p, _)| p)
                .collect();
            for p in pages {
                let page_start = p * PAGE as u64;
                for s in (page_start..page_start + PAGE as u64).step_by(sector) {
                    if s >= *offset && s < end && rng.random_bool(0.5) {
                        zero_range(image, s, SECTOR);
                    }
                }
            }
        }
    }
}

fn write_bytes(image: &mut Image, offset: u64, data: &[u8]) {
    let mut done = 0;
    while done < data.len() {
        let pos = offset + done as u64;
        let (page, at) = (pos / PAGE as u64, (pos % PAGE as u64) as usize);
        let n = (PAGE - at).min(data.len() - done);
        let p = image.entry(page).or_insert_with(|| Box::new([0; PAGE]));
        p[at..at + n].copy_from_slice(&data[done..done + n]);
        done += n;
    }
}

fn read_into(image: &Image, offset: u64, out: &mut [u8]) {
    let mut done = 0;
    while done < out.len() {
        let pos = offset + done as u64;
        let (page, at) = (pos / PAGE as u64, (pos % PAGE as u64) as usize);
        let n = (PAGE - at).min(out.len() - done);
        match image.get(&page) {
            Some(p) => out[done..done + n].copy_from_slice(&p[at..at + n]),
            None => out[done..done + n].fill(0),
        }
        done += n;
    }
}

fn zero_range(image: &mut Image, offset: u64, len: u64) {
    let end = offset + len;
    let pages: Vec<u64> = image
        .range(offset / PAGE as u64..end.div_ceil(PAGE as u64))
        .map(|(&p, _)| p)
        .collect();
    for p in pages {
        let (start, stop) = (p * PAGE as u64, (p + 1) * PAGE as u64);
        if offset <= start && stop <= end {
            image.remove(&p);
        } else if let Some(page) = image.get_mut(&p) {
            let a = (offset.max(start) - start) as usize;
            let b = (end.min(stop) - start) as usize;
            page[a..b].fill(0);
        }
    }
}

fn pages_of(image: &Image) -> Vec<(u64, Vec<u8>)> {
    image
        .iter()
        .map(|(&p, d)| (p * PAGE as u64, d.to_vec()))
        .collect()
}

fn find_in(haystack: &[u8], pattern: &[u8]) -> Option<usize> {
    haystack.windows(pattern.len()).position(|w| w == pattern)
}

/// Search runs of consecutive pages, each padded with zeros so that matches reaching into
/// unstored (zero) space are found too.
fn find_in_image(image: &Image, pattern: &[u8]) -> Option<u64> {
    let pad = pattern.len() - 1;
    let mut run: Vec<u8> = Vec::new();
    let mut run_start = 0u64; // byte offset of run[pad]
    let mut next_page = None;
    let search = |run: &mut Vec<u8>, run_start: u64| -> Option<u64> {
        run.resize(run.len() + pad, 0);
        let hit = find_in(run, pattern).map(|p| (run_start + p as u64).saturating_sub(pad as u64));
        run.clear();
        hit
    };
    for (&p, data) in image {
        if next_page != Some(p)
            && !run.is_empty()
            && let Some(hit) = search(&mut run, run_start)
        {
            return Some(hit);
        }
        if run.is_empty() {
            run.resize(pad, 0);
            run_start = p * PAGE as u64;
        }
        run.extend_from_slice(&data[..]);
        next_page = Some(p + 1);
    }
    if run.is_empty() {
        None
    } else {
        search(&mut run, run_start)
    }
}

impl Disk for MemDisk {
    fn name(&self) -> &str {
        &self.name
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn submit(&self, mut ops: Vec<IoOp>) -> Pending {
        if let Err(e) = check_batch(&self.name, self.size, &ops) {
            return Pending::ready(Err(e));
        }
        let mut guard = self.lock();
        let st = &mut *guard;
        st.stats.batches += 1;
        // Changes that completed before this batch: all a Sync in it may make durable.
        let mut before_batch = st.unsynced.len();
        for op in &mut ops {
            match op {
                IoOp::Read { offset, buf } => {
                    read_into(&st.current, *offset, buf);
                    st.stats.reads += 1;
                    st.stats.bytes_read += buf.len() as u64;
                }
                IoOp::Write { offset, buf } => {
                    st.stats.writes += 1;
                    st.stats.bytes_written += buf.len() as u64;
                    if !buf.is_empty() {
                        write_bytes(&mut st.current, *offset, buf);
                        st.unsynced.push(Change::Write {
                            offset: *offset,
                            data: buf.to_vec(),
                        });
                    }
                }
                IoOp::Sync => {
                    st.stats.syncs += 1;
                    for change in st.unsynced.drain(..before_batch) {
                        apply(&mut st.durable, &change);
                    }
                    before_batch = 0;
                }
                IoOp::Discard { offset, len } => {
                    st.stats.discards += 1;
                    if *len > 0 {
                        zero_range(&mut st.current, *offset, *len);
                        st.unsynced.push(Change::Discard {
                            offset: *offset,
                            len: *len,
                        });
                    }
                }
            }
        }
        Pending::ready(Ok(ops))
    }

    fn backend(&self) -> &'static str {
        "memory"
    }

    fn completes_in_submit(&self) -> bool {
        true
    }
}

impl std::fmt::Debug for MemDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MemDisk({}, {} bytes)", self.name, self.size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn find_spans_pages_and_gaps() {
        let d = MemDisk::new("m", 1 << 20);
        d.tamper(4096 - 3, b"abcdef");
        assert_eq!(d.find(b"abcdef"), Some(4093));
        // A pattern ending in zeros matches into unstored space after the last page.
        d.tamper(3 * 4096 - 2, b"xy");
        assert_eq!(d.find(b"xy\0\0"), Some(3 * 4096 - 2));
        assert_eq!(d.find(b"nothere"), None);
    }

    #[test]
    fn zero_range_frees_whole_pages_only() {
        let mut img = Image::new();
        write_bytes(&mut img, 0, &[1; 3 * PAGE]);
        zero_range(&mut img, 512, 2 * PAGE as u64);
        assert_eq!(img.len(), 2, "the middle page is freed");
        let mut out = vec![0; 3 * PAGE];
        read_into(&img, 0, &mut out);
        assert!(out[..512].iter().all(|&b| b == 1));
        assert!(out[512..512 + 2 * PAGE].iter().all(|&b| b == 0));
        assert!(out[512 + 2 * PAGE..].iter().all(|&b| b == 1));
    }
}
