//! A power cut for crash tests: disks that share one budget of operations. While the budget
//! lasts every batch reaches the disk below; the batch that exhausts it runs only the ops
//! before the cut, and every later op fails as if the disk were gone. With [`super::MemDisk`]
//! below (whose unsynced writes a crash may keep, drop or tear) this models a power failure at
//! an exact I/O of a sequence.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use super::{Disk, DiskError, DiskRef, IoOp, Pending};

/// A budget large enough never to run out.
pub const UNLIMITED_OPS: i64 = i64::MAX / 2;

/// One disk behind a shared op budget.
pub struct PowerCut {
    inner: DiskRef,
    budget: Arc<AtomicI64>,
}

impl PowerCut {
    pub fn new(inner: DiskRef, budget: Arc<AtomicI64>) -> Self {
        Self { inner, budget }
    }
}

impl Disk for PowerCut {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn submit(&self, ops: Vec<IoOp>) -> Pending {
        let n = ops.len() as i64;
        let before = self.budget.fetch_sub(n, Ordering::SeqCst);
        if before >= n {
            return self.inner.submit(ops);
        }
        // The power goes out inside this batch: only the ops before the cut run.
        let allowed = before.max(0) as usize;
        if allowed > 0 {
            let prefix: Vec<IoOp> = ops.into_iter().take(allowed).collect();
            let _ = self.inner.submit(prefix).wait();
        }
        Pending::ready(Err(DiskError::Gone {
            disk: self.inner.name().to_string(),
        }))
    }
    fn completes_in_submit(&self) -> bool {
        self.inner.completes_in_submit()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::{IoBuf, MemDisk};

    #[test]
    fn ops_after_the_cut_fail_and_the_cut_batch_runs_its_prefix() {
        let mem = Arc::new(MemDisk::new("m", 1 << 20));
        let budget = Arc::new(AtomicI64::new(3));
        let d = PowerCut::new(mem.clone(), budget.clone());
        let w = |o: u64, b: u8| IoOp::Write {
            offset: o,
            buf: IoBuf::from_slice(&[b; 4096]),
        };
        d.submit(vec![w(0, 1)]).wait().unwrap();
        assert!(
            d.submit(vec![w(4096, 2), w(8192, 3), w(12288, 4)])
                .wait()
                .is_err()
        );
        assert_eq!(
            mem.read_bytes(4096, 1)[0],
            2,
            "first op of the cut batch ran"
        );
        assert_eq!(
            mem.read_bytes(8192, 1)[0],
            3,
            "second op of the cut batch ran"
        );
        assert_eq!(
            mem.read_bytes(12288, 1)[0],
            0,
            "the op after the cut did not"
        );
        assert!(d.submit(vec![w(0, 9)]).wait().is_err());
        assert_eq!(mem.read_bytes(0, 1)[0], 1);
        budget.store(UNLIMITED_OPS, Ordering::SeqCst);
        d.submit(vec![w(0, 9)]).wait().unwrap();
    }
}
