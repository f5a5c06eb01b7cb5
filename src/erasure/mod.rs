//! Erasure coding: Reed-Solomon over ciphertext chunks. (Interface; implementation to come.)

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ErasureError {
    #[error("unsupported code {k}+{m}")]
    Unsupported { k: usize, m: usize },
    #[error("shard lengths differ or are not a multiple of 64 bytes")]
    BadShards,
    #[error("only {present} of the {needed} shards needed are present")]
    TooFewShards { present: usize, needed: usize },
}

/// A `k + m` Reed-Solomon code. Position-local: byte `o` of each parity shard depends only on
/// byte `o` of the data shards. Shareable between threads.
pub struct Codec;
impl Codec {
    pub fn new(_k: usize, _m: usize) -> Result<Self, ErasureError> { todo!() }
    /// `data`: k shards, `parity`: m shards, all the same length (a multiple of 64).
    pub fn encode(&self, _data: &[&[u8]], _parity: &mut [&mut [u8]]) -> Result<(), ErasureError> { todo!() }
    /// `shards`: all k + m shards in chunk order; `present[i] == false` marks shard `i` unknown.
    /// Fills every missing shard (data and parity) from any k present ones.
    pub fn reconstruct(&self, _shards: &mut [&mut [u8]], _present: &[bool]) -> Result<(), ErasureError> { todo!() }
}
