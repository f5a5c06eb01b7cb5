//! [`OverlayDisk`]: a read-only view of another disk with a private, in-memory write layer;
//! [`ReadOnlyFile`]: a file or block device opened for reading only.
//!
//! Offline recovery (`shardvol recover`) runs the normal volume code (journal replay, destaging,
//! verified and self-healing reads) on the disks of a pool without changing them. Every disk is
//! opened as a [`ReadOnlyFile`] and wrapped in an [`OverlayDisk`]:
//!
//! - a read returns the base disk's bytes, except where the overlay holds a newer copy (a page
//!   written or discarded through the overlay), which wins;
//! - a write or discard lands in memory only, in 4 KiB pages (a partly written page is first
//!   filled from the base disk); a discarded page is remembered as "zeros" without holding memory;
//! - a sync does nothing and succeeds: nothing below needs to become durable.
//!
//! The base disk never sees a write: [`ReadOnlyFile`] is opened with `O_RDONLY` and refuses
//! writes, discards are refused too, so even a bug above cannot change the source disks.
//!
//! Memory: the overlay keeps every page written through it. Recovery writes the replayed journal
//! into it (destaging, journal repair), at most a few times the journal's size. After that,
//! [`OverlayDisk::set_keep_writes`]`(false)` makes later writes vanish (they are counted, not
//! kept): the only writes left are the self-healing repairs of blocks that a read rebuilt from
//! parity, which a one-pass copy never reads again, and which would otherwise pile up in memory
//! for a damaged disk.
//!
//! The [`Disk`] contract holds: batches are checked whole first ([`check_batch`]); ops of a batch
//! run in order in `submit`, which returns a completed [`Pending`]; the first failed op's error is
//! reported after every op ran.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::Path;
use std::sync::{Mutex, MutexGuard, PoisonError};

use super::{Disk, DiskError, DiskRef, IoBuf, IoOp, Pending, SECTOR, check_batch};

/// Granularity of the overlay: a page, the unit every volume structure is written in.
const PAGE: u64 = 4096;

/// A file or block device opened with `O_RDONLY`: reads work, writes and discards fail with
/// `PermissionDenied`, syncs succeed (there is nothing to make durable).
pub struct ReadOnlyFile {
    name: String,
    file: File,
    size: u64,
}

impl ReadOnlyFile {
    /// Opens `path` for reading; `name` is used in errors (the path when `None`). The size is the
    /// file's (or device's) size rounded down to a multiple of 512.
    pub fn open(path: &Path, name: Option<&str>) -> Result<ReadOnlyFile, DiskError> {
        let name = name.map_or_else(|| path.display().to_string(), str::to_owned);
        let mut file = File::open(path).map_err(|e| DiskError::io(&name, "open", 0, e))?;
        let meta = file
            .metadata()
            .map_err(|e| DiskError::io(&name, "stat", 0, e))?;
        let size = if meta.file_type().is_block_device() {
            file.seek(SeekFrom::End(0))
                .map_err(|e| DiskError::io(&name, "size", 0, e))?
        } else if meta.is_file() {
            meta.len()
        } else {
            let e = std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "neither a regular file nor a block device",
            );
            return Err(DiskError::io(&name, "open", 0, e));
        };
        Ok(ReadOnlyFile {
            name,
            file,
            size: size / SECTOR * SECTOR,
        })
    }
}

impl Disk for ReadOnlyFile {
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
        let mut first_error = None;
        for op in &mut ops {
            let (what, at) = (op.name(), op.offset());
            let result = match op {
                IoOp::Read { offset, buf } => self
                    .file
                    .read_exact_at(buf, *offset)
                    .map_err(|e| DiskError::io(&self.name, "read", *offset, e)),
                IoOp::Sync => Ok(()),
                IoOp::Write { .. } | IoOp::Discard { .. } => {
                    let e = std::io::Error::new(
                        std::io::ErrorKind::PermissionDenied,
                        "the disk is opened read-only",
                    );
                    Err(DiskError::io(&self.name, what, at, e))
                }
            };
            if let Err(e) = result {
                first_error.get_or_insert(e);
            }
        }
        Pending::ready(match first_error {
            Some(e) => Err(e),
            None => Ok(ops),
        })
    }

    fn backend(&self) -> &'static str {
        "read-only"
    }
}

/// Counters of an [`OverlayDisk`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OverlayStats {
    /// Pages held in memory with data (discarded pages hold none).
    pub pages: u64,
    /// Pages remembered as discarded (read as zeros).
    pub zero_pages: u64,
    /// Write and discard ops kept in the overlay.
    pub writes_kept: u64,
    /// Write and discard ops dropped because [`OverlayDisk::set_keep_writes`] was off.
    pub writes_dropped: u64,
    /// Read ops that went to the base disk.
    pub base_reads: u64,
}

#[derive(Default)]
struct Layer {
    /// Page number → its newest content (`None`: discarded, reads as zeros).
    pages: HashMap<u64, Option<Box<[u8]>>>,
    keep_writes: bool,
    stats: OverlayStats,
}

/// A read-only view of a base disk with an in-memory write layer (see the module docs).
pub struct OverlayDisk {
    base: DiskRef,
    layer: Mutex<Layer>,
}

impl OverlayDisk {
    /// An overlay over `base`, keeping writes. The base disk is only ever read.
    pub fn new(base: DiskRef) -> OverlayDisk {
        OverlayDisk {
            base,
            layer: Mutex::new(Layer {
                keep_writes: true,
                ..Layer::default()
            }),
        }
    }

    /// An overlay over `path` opened read-only ([`ReadOnlyFile`]).
    pub fn open(path: &Path, name: Option<&str>) -> Result<OverlayDisk, DiskError> {
        let base: DiskRef = std::sync::Arc::new(ReadOnlyFile::open(path, name)?);
        Ok(OverlayDisk::new(base))
    }

    /// Keep (`true`, the default) or drop later writes and discards. Dropped ones succeed and
    /// are counted; reads keep seeing whatever the overlay already holds.
    pub fn set_keep_writes(&self, keep: bool) {
        self.lock().keep_writes = keep;
    }

    pub fn stats(&self) -> OverlayStats {
        self.lock().stats
    }

    /// Bytes of memory the overlay's pages take.
    pub fn memory_bytes(&self) -> u64 {
        self.lock().stats.pages * PAGE
    }

    fn lock(&self) -> MutexGuard<'_, Layer> {
        self.layer.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Bytes of page `p` that lie on the disk (the last page may be short).
    fn page_len(&self, p: u64) -> usize {
        (self.base.size() - p * PAGE).min(PAGE) as usize
    }

    /// Reads `[offset, offset + len)` of the base disk.
    fn base_read(&self, offset: u64, len: usize) -> Result<IoBuf, DiskError> {
        super::read_at(self.base.as_ref(), offset, len)
    }

    fn read(&self, layer: &mut Layer, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        let end = offset + buf.len() as u64;
        if buf.is_empty() {
            return Ok(());
        }
        let (first, last) = (offset / PAGE, (end - 1) / PAGE);
        let covered = (first..=last).all(|p| layer.pages.contains_key(&p));
        if !covered {
            layer.stats.base_reads += 1;
            buf.copy_from_slice(&self.base_read(offset, buf.len())?);
        }
        for p in first..=last {
            let Some(page) = layer.pages.get(&p) else {
                continue;
            };
            let (a, b) = ((p * PAGE).max(offset), ((p + 1) * PAGE).min(end));
            let dst = &mut buf[(a - offset) as usize..(b - offset) as usize];
            match page {
                Some(data) => dst.copy_from_slice(&data[(a - p * PAGE) as usize..][..dst.len()]),
                None => dst.fill(0),
            }
        }
        Ok(())
    }

    /// Writes `data` at `offset` into the layer (`None`: zeros, as a discard).
    fn write(
        &self,
        layer: &mut Layer,
        offset: u64,
        len: u64,
        data: Option<&[u8]>,
    ) -> Result<(), DiskError> {
        if len == 0 {
            return Ok(());
        }
        let end = offset + len;
        let (first, last) = (offset / PAGE, (end - 1) / PAGE);
        for p in first..=last {
            let (a, b) = ((p * PAGE).max(offset), ((p + 1) * PAGE).min(end));
            let whole = a == p * PAGE && b - a == self.page_len(p) as u64;
            if whole && data.is_none() {
                match layer.pages.insert(p, None) {
                    Some(Some(_)) => {
                        layer.stats.pages -= 1;
                        layer.stats.zero_pages += 1;
                    }
                    Some(None) => {}
                    None => layer.stats.zero_pages += 1,
                }
                continue;
            }
            let mut page: Box<[u8]> = match layer.pages.get(&p) {
                Some(Some(existing)) => existing.clone(),
                Some(None) => vec![0u8; PAGE as usize].into_boxed_slice(),
                None if whole => vec![0u8; PAGE as usize].into_boxed_slice(),
                None => {
                    layer.stats.base_reads += 1;
                    let mut fresh = vec![0u8; PAGE as usize];
                    let n = self.page_len(p);
                    fresh[..n].copy_from_slice(&self.base_read(p * PAGE, n)?);
                    fresh.into_boxed_slice()
                }
            };
            let dst = &mut page[(a - p * PAGE) as usize..(b - p * PAGE) as usize];
            match data {
                Some(d) => dst.copy_from_slice(&d[(a - offset) as usize..(b - offset) as usize]),
                None => dst.fill(0),
            }
            match layer.pages.insert(p, Some(page)) {
                Some(Some(_)) => {}
                Some(None) => {
                    layer.stats.zero_pages -= 1;
                    layer.stats.pages += 1;
                }
                None => layer.stats.pages += 1,
            }
        }
        Ok(())
    }
}

impl Disk for OverlayDisk {
    fn name(&self) -> &str {
        self.base.name()
    }

    fn size(&self) -> u64 {
        self.base.size()
    }

    fn submit(&self, mut ops: Vec<IoOp>) -> Pending {
        if let Err(e) = check_batch(self.name(), self.size(), &ops) {
            return Pending::ready(Err(e));
        }
        let mut layer = self.lock();
        let mut first_error = None;
        for op in &mut ops {
            let keep = layer.keep_writes;
            let result = match op {
                IoOp::Read { offset, buf } => self.read(&mut layer, *offset, buf),
                IoOp::Sync => Ok(()),
                IoOp::Write { .. } | IoOp::Discard { .. } if !keep => {
                    layer.stats.writes_dropped += 1;
                    Ok(())
                }
                IoOp::Write { offset, buf } => {
                    layer.stats.writes_kept += 1;
                    self.write(&mut layer, *offset, buf.len() as u64, Some(buf))
                }
                IoOp::Discard { offset, len } => {
                    layer.stats.writes_kept += 1;
                    self.write(&mut layer, *offset, *len, None)
                }
            };
            if let Err(e) = result {
                first_error.get_or_insert(e);
            }
        }
        drop(layer);
        Pending::ready(match first_error {
            Some(e) => Err(e),
            None => Ok(ops),
        })
    }

    fn backend(&self) -> &'static str {
        "overlay"
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::disk::{MemDisk, read_at, write_at};

    fn base(size: u64) -> Arc<MemDisk> {
        let m = Arc::new(MemDisk::new("base", size));
        let pattern: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        m.tamper(0, &pattern);
        m
    }

    #[test]
    fn writes_stay_in_memory_and_win_over_the_base() {
        let m = base(5 * 4096 + 512);
        let before = m.contents();
        let o = OverlayDisk::new(m.clone());
        write_at(&o, 4096 + 512, &[0xaa; 1024]).unwrap();
        write_at(&o, 5 * 4096, &[0xbb; 512]).unwrap();
        crate::disk::discard(&o, 2 * 4096, 4096 + 512).unwrap();
        crate::disk::sync(&o).unwrap();
        assert_eq!(m.contents(), before, "the base disk must never change");
        let got = read_at(&o, 0, 5 * 4096 + 512).unwrap();
        let mut want = m.read_bytes(0, 5 * 4096 + 512);
        want[4096 + 512..4096 + 1536].fill(0xaa);
        want[2 * 4096..3 * 4096 + 512].fill(0);
        want[5 * 4096..].fill(0xbb);
        assert_eq!(&got[..], &want[..]);
        let s = o.stats();
        assert_eq!((s.pages, s.zero_pages, s.writes_kept), (3, 1, 3));
    }

    #[test]
    fn dropped_writes_are_counted_and_not_seen() {
        let m = base(4 * 4096);
        let o = OverlayDisk::new(m.clone());
        write_at(&o, 0, &[1; 4096]).unwrap();
        o.set_keep_writes(false);
        write_at(&o, 0, &[2; 4096]).unwrap();
        write_at(&o, 4096, &[2; 4096]).unwrap();
        assert_eq!(&read_at(&o, 0, 4096).unwrap()[..], &[1; 4096][..]);
        assert_eq!(
            read_at(&o, 4096, 4096).unwrap()[..],
            m.read_bytes(4096, 4096)[..]
        );
        assert_eq!(o.stats().writes_dropped, 2);
    }

    #[test]
    fn read_only_file_refuses_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.img");
        std::fs::write(&path, vec![7u8; 8192]).unwrap();
        let f = ReadOnlyFile::open(&path, None).unwrap();
        assert_eq!(&read_at(&f, 4096, 512).unwrap()[..], &[7u8; 512][..]);
        let e = write_at(&f, 0, &[0; 512]).unwrap_err();
        assert!(e.to_string().contains("read-only"), "{e}");
        assert!(crate::disk::discard(&f, 0, 512).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), vec![7u8; 8192]);
    }
}
