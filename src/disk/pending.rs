//! [`Pending`]: the caller's end of a submitted batch; [`Completer`]: the backend's end.
//!
//! The pair is a one-shot slot (a mutex and a condition variable). The slot only ever carries
//! the *result*; the buffers travel with it only once the backend is done with them. So
//! dropping a `Pending` early merely leaves the result to be dropped by the `Completer` side.

use std::fmt;
use std::sync::{Arc, Condvar, Mutex, PoisonError};

use super::{DiskError, IoOp};

type BatchResult = Result<Vec<IoOp>, DiskError>;

struct Slot {
    result: Mutex<Option<BatchResult>>,
    ready: Condvar,
}

enum State {
    Ready(BatchResult),
    Waiting(Arc<Slot>),
    Then(Box<dyn FnOnce() -> BatchResult + Send>),
}

/// A submitted batch; [`wait`](Pending::wait) returns the ops (with read buffers filled) in
/// submission order.
///
/// Dropping a `Pending` without waiting is allowed: the batch still runs to completion and its
/// buffers are freed by the backend once the I/O is over.
#[must_use = "a batch's result is only known through Pending::wait"]
pub struct Pending(State);

impl Pending {
    /// A batch that is already complete (memory disks, and batches refused before starting).
    pub fn ready(result: BatchResult) -> Pending {
        Pending(State::Ready(result))
    }

    /// A batch to be completed later by the returned [`Completer`].
    ///
    /// `disk` names the disk in the [`DiskError::Gone`] that the caller gets if the completer
    /// is dropped without completing (a backend thread that stopped).
    pub fn channel(disk: &str) -> (Pending, Completer) {
        let slot = Arc::new(Slot {
            result: Mutex::new(None),
            ready: Condvar::new(),
        });
        (
            Pending(State::Waiting(slot.clone())),
            Completer {
                slot: Some(slot),
                disk: disk.to_owned(),
            },
        )
    }

    /// A batch whose result is `f` applied to this batch's result, run inside `wait`.
    ///
    /// If the new `Pending` is dropped without waiting, `f` never runs and this batch is dropped
    /// as usual (it still completes in its backend).
    pub fn then(self, f: impl FnOnce(BatchResult) -> BatchResult + Send + 'static) -> Pending {
        Pending(State::Then(Box::new(move || f(self.wait()))))
    }

    /// Block until every op of the batch has completed.
    pub fn wait(self) -> BatchResult {
        match self.0 {
            State::Ready(result) => result,
            State::Then(f) => f(),
            State::Waiting(slot) => {
                let mut guard = slot.result.lock().unwrap_or_else(PoisonError::into_inner);
                loop {
                    if let Some(result) = guard.take() {
                        return result;
                    }
                    guard = slot
                        .ready
                        .wait(guard)
                        .unwrap_or_else(PoisonError::into_inner);
                }
            }
        }
    }

    /// True if `wait` would return without blocking on this batch's own I/O.
    pub fn is_complete(&self) -> bool {
        match &self.0 {
            State::Ready(_) => true,
            State::Then(_) => false,
            State::Waiting(slot) => slot
                .result
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .is_some(),
        }
    }
}

impl fmt::Debug for Pending {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.is_complete() {
            "Pending(complete)"
        } else {
            "Pending(in flight)"
        })
    }
}

/// The backend's end of a [`Pending`]. Dropping it without completing makes the waiter see
/// [`DiskError::Gone`].
pub struct Completer {
    slot: Option<Arc<Slot>>,
    disk: String,
}

impl Completer {
    /// Hand the result to the waiter (if it is still there).
    pub fn complete(mut self, result: BatchResult) {
        self.fill(result);
    }

    fn fill(&mut self, result: BatchResult) {
        if let Some(slot) = self.slot.take() {
            *slot.result.lock().unwrap_or_else(PoisonError::into_inner) = Some(result);
            slot.ready.notify_all();
        }
    }
}

impl Drop for Completer {
    fn drop(&mut self) {
        if self.slot.is_some() {
            let disk = std::mem::take(&mut self.disk);
            self.fill(Err(DiskError::Gone { disk }));
        }
    }
}

impl fmt::Debug for Completer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Completer({})", self.disk)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completes_across_threads() {
        let (p, c) = Pending::channel("d");
        assert!(!p.is_complete());
        let t = std::thread::spawn(move || c.complete(Ok(vec![IoOp::Sync])));
        let ops = p.wait().unwrap();
        assert!(matches!(ops[..], [IoOp::Sync]));
        t.join().unwrap();
    }

    #[test]
    fn dropped_completer_means_gone() {
        let (p, c) = Pending::channel("d7");
        drop(c);
        assert!(matches!(p.wait(), Err(DiskError::Gone { disk }) if disk == "d7"));
    }

    #[test]
    fn then_maps_the_result() {
        let p = Pending::ready(Ok(vec![])).then(|r| {
            r.map(|mut v| {
                v.push(IoOp::Sync);
                v
            })
        });
        assert_eq!(p.wait().unwrap().len(), 1);
    }
}
