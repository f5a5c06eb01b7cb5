//! Bookkeeping of one batch inside a backend: its ops, how many are still running, the error
//! to report, and the [`Completer`] to call when the last op is done.

use super::{Completer, DiskError, IoOp};

pub(crate) struct Batch {
    /// The ops, in submission order. An op is `None` only while a pread worker executes it.
    ops: Vec<Option<IoOp>>,
    remaining: usize,
    /// The error of the lowest-indexed failed op so far.
    error: Option<(usize, DiskError)>,
    completer: Option<Completer>,
}

impl Batch {
    pub(crate) fn new(ops: Vec<IoOp>, completer: Completer) -> Batch {
        let remaining = ops.len();
        Batch {
            ops: ops.into_iter().map(Some).collect(),
            remaining,
            error: None,
            completer: Some(completer),
        }
    }

    pub(crate) fn op_mut(&mut self, idx: usize) -> Option<&mut IoOp> {
        self.ops.get_mut(idx).and_then(Option::as_mut)
    }

    pub(crate) fn take_op(&mut self, idx: usize) -> Option<IoOp> {
        self.ops.get_mut(idx).and_then(Option::take)
    }

    pub(crate) fn put_op(&mut self, idx: usize, op: IoOp) {
        if let Some(slot) = self.ops.get_mut(idx) {
            *slot = Some(op);
        }
    }

    /// Record that op `idx` finished. Returns true when it was the last one.
    pub(crate) fn finish(&mut self, idx: usize, result: Result<(), DiskError>) -> bool {
        if let Err(e) = result
            && self.error.as_ref().is_none_or(|(first, _)| idx < *first)
        {
            self.error = Some((idx, e));
        }
        self.remaining = self.remaining.saturating_sub(1);
        self.remaining == 0
    }

    /// Hand the result to the waiter. Call only when `finish` returned true.
    pub(crate) fn complete(mut self) {
        let result = match self.error.take() {
            Some((_, e)) => Err(e),
            None => Ok(std::mem::take(&mut self.ops)
                .into_iter()
                .flatten()
                .collect()),
        };
        if let Some(c) = self.completer.take() {
            c.complete(result);
        }
    }

    /// Give up on the batch without freeing its buffers (they may still be in the kernel's
    /// hands): the buffers are leaked and the waiter gets `DiskError::Gone`.
    pub(crate) fn abandon(mut self) {
        std::mem::forget(std::mem::take(&mut self.ops));
        drop(self.completer.take());
    }
}
