//! Geometry and placement: where every byte of a volume lives.
//!
//! Units are newtypes so that a byte offset can never be passed where a block number is meant:
//! [`Lba`] (logical 4 KiB block of a volume), [`StripeId`], [`ChunkIndex`] (position of a chunk
//! inside its stripe: `0..k` data, `k..k+m` parity), [`DiskId`] and [`DiskOffset`] (bytes).
//!
//! A volume's logical blocks are laid out chunk-major: stripe `s` holds the `k * blocks_per_chunk`
//! consecutive blocks starting at `s * k * blocks_per_chunk`; inside the stripe, data chunk `c`
//! holds the `blocks_per_chunk` consecutive blocks starting at `c * blocks_per_chunk`. Sequential
//! I/O therefore stays sequential on each disk.
//!
//! [`placement`] maps a stripe to the ordered list of `k + m` disks that hold its chunks.

pub mod placement;

use serde::{Deserialize, Serialize};
use std::fmt;

/// Logical block size of every volume, the unit of encryption and integrity (DESIGN.md).
pub const BLOCK_SIZE: usize = 4096;
/// `BLOCK_SIZE` as u64, for offset arithmetic.
pub const BLOCK_SIZE_U64: u64 = BLOCK_SIZE as u64;

macro_rules! unit {
    ($(#[$doc:meta])* $name:ident($inner:ty)) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize, Default)]
        pub struct $name(pub $inner);
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}", self.0)
            }
        }
    };
}

unit!(/// Logical block address: index of a 4 KiB block inside a volume.
    Lba(u64));
unit!(/// Stripe number inside a volume.
    StripeId(u64));
unit!(/// Position of a chunk inside its stripe: `0..k` are data chunks, `k..k+m` parity chunks.
    ChunkIndex(u16));
unit!(/// Identifier of a disk in the pool's disk table (stable for the life of the pool).
    DiskId(u32));
unit!(/// Byte offset on a disk.
    DiskOffset(u64));

/// Error for a geometry that cannot be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    #[error("invalid geometry: {0}")]
    Geometry(String),
    #[error("not enough disks for placement: need {need} distinct disks, the pool has {have}")]
    NotEnoughDisks { need: usize, have: usize },
}

/// Shape of a volume's stripes. Fixed when the volume is created.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Geometry {
    /// Data chunks per stripe.
    pub k: u16,
    /// Parity chunks per stripe (how many disks may be lost).
    pub m: u16,
    /// Bytes per chunk; a multiple of [`BLOCK_SIZE`].
    pub chunk_size: u32,
}

impl Geometry {
    /// Checks the limits: `1 <= k`, `k + m <= 64`, chunk size a power-of-two multiple of 4 KiB
    /// between 4 KiB and 4 MiB.
    pub fn new(k: u16, m: u16, chunk_size: u32) -> Result<Self, LayoutError> {
        if k == 0 {
            return Err(LayoutError::Geometry(
                "data chunks (k) must be at least 1".into(),
            ));
        }
        if usize::from(k) + usize::from(m) > 64 {
            return Err(LayoutError::Geometry(format!(
                "k + m = {} exceeds 64",
                k + m
            )));
        }
        if !chunk_size.is_power_of_two() || !(4096..=4 << 20).contains(&chunk_size) {
            return Err(LayoutError::Geometry(format!(
                "chunk size {chunk_size} must be a power of two from 4 KiB to 4 MiB"
            )));
        }
        Ok(Self { k, m, chunk_size })
    }
    /// `k + m`: chunks (and distinct disks) per stripe.
    pub fn width(&self) -> usize {
        usize::from(self.k) + usize::from(self.m)
    }
    /// 4 KiB blocks per chunk.
    pub fn blocks_per_chunk(&self) -> u64 {
        u64::from(self.chunk_size) / BLOCK_SIZE_U64
    }
    /// Logical blocks per stripe (`k * blocks_per_chunk`).
    pub fn blocks_per_stripe(&self) -> u64 {
        u64::from(self.k) * self.blocks_per_chunk()
    }
    /// Where a logical block lives: its stripe, data chunk and block index inside the chunk.
    pub fn locate(&self, lba: Lba) -> BlockPos {
        let bps = self.blocks_per_stripe();
        let bpc = self.blocks_per_chunk();
        let within = lba.0 % bps;
        BlockPos {
            stripe: StripeId(lba.0 / bps),
            chunk: ChunkIndex((within / bpc) as u16),
            block_in_chunk: within % bpc,
        }
    }
    /// Inverse of [`Geometry::locate`] for data chunks.
    pub fn lba_of(&self, pos: BlockPos) -> Lba {
        Lba(pos.stripe.0 * self.blocks_per_stripe()
            + u64::from(pos.chunk.0) * self.blocks_per_chunk()
            + pos.block_in_chunk)
    }
    /// Stripes needed to hold `size` bytes.
    pub fn stripes_for(&self, size: u64) -> u64 {
        let blocks = size.div_ceil(BLOCK_SIZE_U64);
        blocks.div_ceil(self.blocks_per_stripe())
    }
}

/// Position of one logical block: stripe, data chunk, and block index inside that chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BlockPos {
    pub stripe: StripeId,
    pub chunk: ChunkIndex,
    pub block_in_chunk: u64,
}
