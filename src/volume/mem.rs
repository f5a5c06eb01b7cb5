//! An in-memory [`BlockDevice`](super::BlockDevice) with the same semantics as a volume: the
//! reference model that protocol tests run against. (To be written.)
