//! An in-memory [`BlockDevice`]: the reference model that protocol tests run against.
//!
//! Contract (the same as a volume's, so that the NBD layer can be tested without disks):
//! - the device is a sparse map of 4 KiB blocks ([`BLOCK_SIZE`]); a block that was never written,
//!   or that a trim or a hole-making write-zeroes covered whole, is a *hole*: it reads as zeros and
//!   [`BlockDevice::block_status`] reports it with `hole: true`;
//! - byte ranges of any alignment work; partial blocks are read-modify-written under one lock,
//!   so concurrent callers see each call as atomic;
//! - the size need not be a multiple of 4 KiB (the last block is then partial);
//! - a range that ends past the size is refused with [`VolumeError::OutOfRange`] and changes
//!   nothing; writes on a read-only device return [`VolumeError::ReadOnly`].
//!
//! Durability is modelled too: every block has a *current* and a *durable* version. A write with
//! `fua`, or a [`BlockDevice::flush`], makes the current version durable; [`MemDevice::crash`]
//! throws away everything that was not, as a power cut would. Durable and current versions share
//! their buffers (`Arc`, copy-on-write), so flushing costs no copy.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::{BlockDevice, Extent, VolumeError};
use crate::layout::{BLOCK_SIZE, BLOCK_SIZE_U64};

type Block = Arc<[u8; BLOCK_SIZE]>;

#[derive(Default)]
struct State {
    /// What reads see. Absent block = hole.
    current: BTreeMap<u64, Block>,
    /// What survives [`MemDevice::crash`].
    durable: BTreeMap<u64, Block>,
    /// Blocks whose current version differs from (or may differ from) the durable one.
    dirty: BTreeSet<u64>,
}

/// In-memory, thread-safe, sparse [`BlockDevice`]. See the module docs for its contract.
pub struct MemDevice {
    size: u64,
    read_only: bool,
    state: RwLock<State>,
    flushes: AtomicU64,
    fua_calls: AtomicU64,
}

impl MemDevice {
    /// A writable device of `size` bytes that reads as zeros (all holes).
    pub fn new(size: u64) -> Self {
        Self {
            size,
            read_only: false,
            state: RwLock::new(State::default()),
            flushes: AtomicU64::new(0),
            fua_calls: AtomicU64::new(0),
        }
    }

    /// A device of `size` bytes whose writes, trims and write-zeroes fail with
    /// [`VolumeError::ReadOnly`]. `contents` is written at offset 0 first (as durable data).
    pub fn new_read_only(size: u64, contents: &[u8]) -> Result<Self, VolumeError> {
        let dev = Self::new(size);
        dev.write(0, contents, true)?;
        Ok(Self {
            read_only: true,
            ..dev
        })
    }

    /// Forgets every change that no flush or FUA made durable, as a power cut would.
    pub fn crash(&self) {
        let mut st = self.write_state();
        st.current = st.durable.clone();
        st.dirty.clear();
    }

    /// Number of blocks that hold data (are not holes).
    pub fn allocated_blocks(&self) -> usize {
        self.read_state().current.len()
    }

    /// Number of completed [`BlockDevice::flush`] calls.
    pub fn flush_count(&self) -> u64 {
        self.flushes.load(Ordering::Relaxed)
    }

    /// Number of write or write-zeroes calls made with `fua`.
    pub fn fua_count(&self) -> u64 {
        self.fua_calls.load(Ordering::Relaxed)
    }

    /// Number of blocks changed since they were last made durable.
    pub fn dirty_blocks(&self) -> usize {
        self.read_state().dirty.len()
    }

    fn read_state(&self) -> RwLockReadGuard<'_, State> {
        // A poisoned lock means a panic while holding it; the map itself is still consistent
        // because every mutation below is a single map operation per block.
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_state(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), VolumeError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(VolumeError::OutOfRange {
                offset,
                len,
                size: self.size,
            }),
        }
    }

    fn check_writable(&self) -> Result<(), VolumeError> {
        if self.read_only {
            Err(VolumeError::ReadOnly)
        } else {
            Ok(())
        }
    }

    /// Calls `f(block, offset_in_block, range_in_caller)` for each block piece of the range.
    fn pieces(offset: u64, len: u64, mut f: impl FnMut(u64, usize, std::ops::Range<usize>)) {
        let mut done = 0u64;
        while done < len {
            let pos = offset + done;
            let block = pos / BLOCK_SIZE_U64;
            let in_block = (pos % BLOCK_SIZE_U64) as usize;
            let n = (BLOCK_SIZE - in_block).min((len - done) as usize);
            f(block, in_block, done as usize..done as usize + n);
            done += n as u64;
        }
    }

    /// Records that `block` changed: durable at once with `fua`, dirty otherwise.
    fn settle(st: &mut State, block: u64, fua: bool) {
        if fua {
            match st.current.get(&block) {
                Some(b) => {
                    let b = b.clone();
                    st.durable.insert(block, b);
                }
                None => {
                    st.durable.remove(&block);
                }
            }
            st.dirty.remove(&block);
        } else {
            st.dirty.insert(block);
        }
    }

    /// Zeroes `[offset, offset+len)`; whole blocks become holes unless `no_hole`.
    fn zero_range(&self, offset: u64, len: u64, no_hole: bool, fua: bool) {
        let mut st = self.write_state();
        Self::pieces(offset, len, |block, in_block, piece| {
            let whole = piece.len() == BLOCK_SIZE;
            if whole && !no_hole {
                st.current.remove(&block);
            } else if let Some(b) = st.current.get_mut(&block) {
                Arc::make_mut(b)[in_block..in_block + piece.len()].fill(0);
            } else if no_hole {
                st.current.insert(block, Arc::new([0u8; BLOCK_SIZE]));
            } else {
                // A hole already reads as zeros: nothing changes.
                return;
            }
            Self::settle(&mut st, block, fua);
        });
    }
}

impl BlockDevice for MemDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), VolumeError> {
        self.check_range(offset, buf.len() as u64)?;
        let st = self.read_state();
        Self::pieces(offset, buf.len() as u64, |block, in_block, piece| {
            let dst = &mut buf[piece];
            match st.current.get(&block) {
                Some(b) => dst.copy_from_slice(&b[in_block..in_block + dst.len()]),
                None => dst.fill(0),
            }
        });
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), VolumeError> {
        self.check_writable()?;
        self.check_range(offset, data.len() as u64)?;
        if fua {
            self.fua_calls.fetch_add(1, Ordering::Relaxed);
        }
        let mut st = self.write_state();
        Self::pieces(offset, data.len() as u64, |block, in_block, piece| {
            let src = &data[piece];
            let b = st
                .current
                .entry(block)
                .or_insert_with(|| Arc::new([0u8; BLOCK_SIZE]));
            Arc::make_mut(b)[in_block..in_block + src.len()].copy_from_slice(src);
            Self::settle(&mut st, block, fua);
        });
        Ok(())
    }

    /// Takes every write up to [`WRITE_NOW_MAX`](super::WRITE_NOW_MAX): an in-memory write
    /// holds the device's lock only for a few map operations.
    fn try_write_now(&self, offset: u64, data: &[u8]) -> Option<Result<(), VolumeError>> {
        (data.len() as u64 <= super::WRITE_NOW_MAX).then(|| self.write(offset, data, false))
    }

    fn flush(&self) -> Result<(), VolumeError> {
        let mut st = self.write_state();
        let dirty = std::mem::take(&mut st.dirty);
        for block in dirty {
            Self::settle(&mut st, block, true);
        }
        self.flushes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn trim(&self, offset: u64, len: u64) -> Result<(), VolumeError> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        self.zero_range(offset, len, false, false);
        Ok(())
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        no_hole: bool,
        fua: bool,
    ) -> Result<(), VolumeError> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        if fua {
            self.fua_calls.fetch_add(1, Ordering::Relaxed);
        }
        self.zero_range(offset, len, no_hole, fua);
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, VolumeError> {
        self.check_range(offset, len)?;
        let mut out: Vec<Extent> = Vec::new();
        if len == 0 {
            return Ok(out);
        }
        let end = offset + len;
        let mut push = |from: u64, to: u64, hole: bool| {
            if to <= from {
                return;
            }
            match out.last_mut() {
                Some(last) if last.hole == hole => last.len += to - from,
                _ => out.push(Extent {
                    len: to - from,
                    hole,
                }),
            }
        };
        let st = self.read_state();
        let first = offset / BLOCK_SIZE_U64;
        let last = (end - 1) / BLOCK_SIZE_U64;
        let mut pos = offset;
        for &block in st.current.range(first..=last).map(|(b, _)| b) {
            let start = (block * BLOCK_SIZE_U64).max(offset);
            let stop = ((block + 1) * BLOCK_SIZE_U64).min(end);
            push(pos, start, true);
            push(start, stop, false);
            pos = stop;
        }
        push(pos, end, true);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn unaligned_write_reads_back_and_neighbours_stay_zero() {
        let dev = MemDevice::new(64 * 1024);
        let data = pattern(10_000, 7);
        dev.write(1234, &data, false).unwrap();
        let mut buf = vec![0xffu8; 64 * 1024];
        dev.read(0, &mut buf).unwrap();
        assert!(buf[..1234].iter().all(|&b| b == 0));
        assert_eq!(&buf[1234..11234], &data[..]);
        assert!(buf[11234..].iter().all(|&b| b == 0));
        // 1234..11234 touches blocks 0, 1 and 2.
        assert_eq!(dev.allocated_blocks(), 3);
    }

    #[test]
    fn out_of_range_is_refused_and_changes_nothing() {
        let dev = MemDevice::new(10_000);
        let err = dev.write(9_000, &[1u8; 2_000], false).unwrap_err();
        assert!(matches!(
            err,
            VolumeError::OutOfRange {
                offset: 9_000,
                len: 2_000,
                size: 10_000
            }
        ));
        assert_eq!(dev.allocated_blocks(), 0);
        assert!(dev.read(u64::MAX - 1, &mut [0u8; 4]).is_err());
        assert!(dev.trim(0, 10_001).is_err());
        assert!(dev.block_status(10_000, 1).is_err());
        // The last partial block is usable.
        dev.write(9_999, &[5], false).unwrap();
        let mut b = [0u8; 1];
        dev.read(9_999, &mut b).unwrap();
        assert_eq!(b, [5]);
    }

    #[test]
    fn trim_frees_whole_blocks_and_zeroes_partial_ones() {
        let dev = MemDevice::new(16 * 4096);
        dev.write(0, &[0xaa; 16 * 4096], false).unwrap();
        dev.trim(4096 + 100, 3 * 4096).unwrap();
        // Blocks 2 and 3 are whole inside the trim; 1 and 4 are partial.
        assert_eq!(dev.allocated_blocks(), 14);
        let mut buf = vec![0u8; 16 * 4096];
        dev.read(0, &mut buf).unwrap();
        assert!(buf[..4196].iter().all(|&b| b == 0xaa));
        assert!(buf[4196..4196 + 3 * 4096].iter().all(|&b| b == 0));
        assert!(buf[4196 + 3 * 4096..].iter().all(|&b| b == 0xaa));
        let ext = dev.block_status(0, 16 * 4096).unwrap();
        assert_eq!(
            ext,
            vec![
                Extent {
                    len: 2 * 4096,
                    hole: false
                },
                Extent {
                    len: 2 * 4096,
                    hole: true
                },
                Extent {
                    len: 12 * 4096,
                    hole: false
                },
            ]
        );
    }

    #[test]
    fn write_zeroes_no_hole_allocates() {
        let dev = MemDevice::new(8 * 4096);
        dev.write_zeroes(0, 8 * 4096, true, false).unwrap();
        assert_eq!(dev.allocated_blocks(), 8);
        dev.write_zeroes(4096, 4096, false, false).unwrap();
        assert_eq!(dev.allocated_blocks(), 7);
        assert_eq!(
            dev.block_status(0, 8 * 4096).unwrap()[1],
            Extent {
                len: 4096,
                hole: true
            }
        );
    }

    #[test]
    fn block_status_clips_to_the_query() {
        let dev = MemDevice::new(100_000);
        dev.write(5000, &[1], false).unwrap(); // block 1
        let ext = dev.block_status(100, 10_000).unwrap();
        assert_eq!(
            ext,
            vec![
                Extent {
                    len: 4096 - 100,
                    hole: true
                },
                Extent {
                    len: 4096,
                    hole: false
                },
                Extent {
                    len: 10_000 - (4096 - 100) - 4096,
                    hole: true
                },
            ]
        );
        assert_eq!(ext.iter().map(|e| e.len).sum::<u64>(), 10_000);
        assert_eq!(
            dev.block_status(4096 + 10, 5).unwrap(),
            vec![Extent {
                len: 5,
                hole: false
            }]
        );
        assert!(dev.block_status(0, 0).unwrap().is_empty());
    }

    #[test]
    fn crash_keeps_only_flushed_and_fua_writes() {
        let dev = MemDevice::new(16 * 4096);
        dev.write(0, &[1; 4096], false).unwrap();
        dev.flush().unwrap();
        dev.write(0, &[2; 4096], false).unwrap(); // not flushed: lost
        dev.write(4096, &[3; 4096], true).unwrap(); // FUA: kept
        dev.write(8192, &[4; 4096], false).unwrap(); // not flushed: lost
        dev.trim(4096 * 3, 4096).unwrap();
        assert_eq!(dev.dirty_blocks(), 3);
        dev.crash();
        let mut buf = vec![0u8; 3 * 4096];
        dev.read(0, &mut buf).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 1));
        assert!(buf[4096..8192].iter().all(|&b| b == 3));
        assert!(buf[8192..].iter().all(|&b| b == 0));
        assert_eq!(dev.flush_count(), 1);
        assert_eq!(dev.fua_count(), 1);
    }

    #[test]
    fn read_only_refuses_changes() {
        let dev = MemDevice::new_read_only(8192, b"hello").unwrap();
        assert!(matches!(
            dev.write(0, b"x", false),
            Err(VolumeError::ReadOnly)
        ));
        assert!(matches!(dev.trim(0, 1), Err(VolumeError::ReadOnly)));
        assert!(matches!(
            dev.write_zeroes(0, 1, false, false),
            Err(VolumeError::ReadOnly)
        ));
        let mut b = [0u8; 5];
        dev.read(0, &mut b).unwrap();
        assert_eq!(&b, b"hello");
        dev.flush().unwrap();
    }

    #[test]
    fn concurrent_writers_to_one_block_never_tear_bytes_of_others() {
        let dev = Arc::new(MemDevice::new(4096));
        let threads: Vec<_> = (0..4u8)
            .map(|t| {
                let dev = dev.clone();
                std::thread::spawn(move || {
                    for _ in 0..200 {
                        dev.write(t as u64 * 1024, &[t + 1; 1024], false).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let mut buf = [0u8; 4096];
        dev.read(0, &mut buf).unwrap();
        for t in 0..4usize {
            assert!(
                buf[t * 1024..(t + 1) * 1024]
                    .iter()
                    .all(|&b| b == t as u8 + 1)
            );
        }
    }
}
