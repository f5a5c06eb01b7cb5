//! [`IoBuf`]: a heap buffer aligned to [`BUF_ALIGN`], of a length fixed at allocation.
//!
//! It holds a raw pointer rather than a `Box<[u8]>` on purpose: the io_uring backend hands the
//! buffer's address to the kernel and then moves the `IoBuf` value around (into its tables);
//! moving a raw pointer does not assert unique access to the bytes the way moving a `Box` does,
//! so the address stays valid for the kernel while the value moves.

use std::alloc::{self, Layout};
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

use super::BUF_ALIGN;

/// A heap buffer aligned to 4096 bytes, of a length fixed at allocation.
pub struct IoBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: an IoBuf owns its allocation exclusively, like a Box<[u8]>; it has no thread affinity.
unsafe impl Send for IoBuf {}
// SAFETY: shared access only gives `&[u8]`, which is safe to share between threads.
unsafe impl Sync for IoBuf {}

impl IoBuf {
    fn layout(len: usize) -> Layout {
        match Layout::from_size_align(len, BUF_ALIGN) {
            Ok(layout) => layout,
            // Only for len > isize::MAX - 4095: no allocator could satisfy it anyway.
            Err(_) => panic!("IoBuf of {len} bytes is larger than the address space"),
        }
    }

    /// A buffer of `len` zero bytes.
    pub fn zeroed(len: usize) -> Self {
        if len == 0 {
            // A dangling pointer, non-null and aligned, is valid for a zero-length slice.
            let ptr = NonNull::new(std::ptr::without_provenance_mut(BUF_ALIGN));
            return IoBuf {
                ptr: ptr.unwrap_or(NonNull::dangling()),
                len,
            };
        }
        let layout = Self::layout(len);
        // SAFETY: layout has a non-zero size (len > 0 here).
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        match NonNull::new(raw) {
            Some(ptr) => IoBuf { ptr, len },
            None => alloc::handle_alloc_error(layout),
        }
    }

    /// A buffer holding a copy of `data`. The allocation is not zeroed first (it is written
    /// whole before anything can read it): for the journal's replicas and the destager's
    /// writes, zeroing doubled the memory traffic of the copy.
    pub fn from_slice(data: &[u8]) -> Self {
        if data.is_empty() {
            return Self::zeroed(0);
        }
        let layout = Self::layout(data.len());
        // SAFETY: layout has a non-zero size (data is not empty).
        let raw = unsafe { alloc::alloc(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        // SAFETY: ptr is a fresh allocation of data.len() bytes, so the ranges cannot overlap;
        // every byte is initialised here, before the IoBuf (and any slice of it) exists.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), ptr.as_ptr(), data.len()) };
        IoBuf {
            ptr,
            len: data.len(),
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The address of the first byte, for handing to the kernel. Creates no reference to the
    /// bytes, so the kernel may write them while the `IoBuf` value is moved.
    pub(crate) fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub(crate) fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        if self.len != 0 {
            // SAFETY: ptr was returned by alloc_zeroed or alloc with this same layout and not
            // freed since.
            unsafe { alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.len)) }
        }
    }
}

impl Deref for IoBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for len initialised bytes (zeroed or copied at allocation), aligned, and
        // borrowed immutably through &self for the lifetime of the slice.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for IoBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref, and &mut self guarantees the slice is the only access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Clone for IoBuf {
    fn clone(&self) -> Self {
        Self::from_slice(self)
    }
}

impl PartialEq for IoBuf {
    fn eq(&self, other: &Self) -> bool {
        self[..] == other[..]
    }
}

impl Eq for IoBuf {}

impl fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IoBuf({} bytes)", self.len)
    }
}

/// Sets the C allocator up for the server; call once at start-up, before threads start.
///
/// - **I/O buffers come from the heap** (journal records, chunk runs: 4 KiB to a few MiB)
///   instead of fresh `mmap`s. By default glibc maps every allocation above 128 KiB anew and
///   unmaps it on free, so each buffer costs a page fault and a zeroed page per 4 KiB: measured
///   as the largest cost of the write path. Buffers up to 64 MiB (the largest request plus its
///   copies) now come from the heap, and up to 256 MiB of freed heap is kept rather than
///   returned to the kernel (an idle server returns it: [`release_free_memory`]).
/// - **At most two arenas per CPU** (at least four) instead of glibc's eight. Every arena keeps
///   the peak of what its threads allocated, and the server runs a few dozen threads (NBD
///   workers, destage workers, the runtime), so the server's size was the sum of many arenas'
///   peaks. Measured on two CPUs with four arenas (`scripts/bench.sh --servers shardvol`, four
///   alternating pairs): peak RSS 175–183 MiB instead of 234–244, 57–65 MiB at rest instead of
///   123–132, and no workload slower beyond the noise (sequential writes 297–318 MB/s against
///   223–336). A `MALLOC_ARENA_MAX` in the environment is left to decide.
pub fn configure_allocator() {
    const MMAP_THRESHOLD: libc::c_int = 64 << 20;
    const TRIM_THRESHOLD: libc::c_int = 256 << 20;
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    let arenas = libc::c_int::try_from((2 * cpus).max(4)).unwrap_or(libc::c_int::MAX);
    // SAFETY: mallopt only changes allocator tunables; it takes no pointers and is safe to call
    // at any time (glibc serialises it with the allocator's own locks).
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
        if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
            libc::mallopt(libc::M_ARENA_MAX, arenas);
        }
    }
}

/// Gives the heap's free memory back to the kernel (glibc's `malloc_trim`), and returns
/// whether any was released.
///
/// The counterpart of [`configure_allocator`]: while the server is busy, up to 256 MiB of
/// freed buffers stay in each arena's heap for the next request. After a burst of work that
/// memory stays counted in the server's RSS for as long as it runs. Call this when the server
/// has been idle for a while: it walks every arena under its lock, which takes milliseconds.
/// A no-op without glibc.
///
/// glibc gives back the free pages inside every arena and the free end of the main heap, but
/// not the free end of the other arenas' heaps (those shrink only at a `free` that leaves more
/// than the trim threshold free). Measured after a 1 GiB fill and random and sequential I/O,
/// with glibc's default eight arenas per CPU: 246 → 124 MiB resident, with 32 MiB in use
/// (`malloc_stats`); with two arenas per CPU, 57–65 MiB at rest (`scripts/bench.sh`).
pub fn release_free_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim takes no pointers; it only returns free pages of the allocator's
        // own heaps to the kernel, under the allocator's locks.
        unsafe { libc::malloc_trim(0) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Resident memory of this process in bytes (`/proc/self/statm`), `None` where unavailable.
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf takes no pointers.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(page).ok().map(|p| pages * p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_zeroed_and_sized() {
        for len in [0, 1, 512, 4096, 12288, 1 << 20] {
            let b = IoBuf::zeroed(len);
            assert_eq!(b.len(), len);
            assert_eq!(b.as_ptr() as usize % BUF_ALIGN, 0, "len {len}");
            assert!(b.iter().all(|&x| x == 0));
        }
    }

    #[test]
    fn from_slice_copies_and_clone_is_deep() {
        let data: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
        let a = IoBuf::from_slice(&data);
        let mut b = a.clone();
        b[0] = 0xff;
        assert_eq!(&a[..], &data[..]);
        assert_ne!(a, b);
    }
}
