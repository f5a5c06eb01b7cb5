//! Placement: the keyed, pseudorandom map stripe → ordered list of disks.
//! (Interface; the implementation, its docs and property tests come with the placement work.)

use super::{DiskId, LayoutError, StripeId};

/// One disk as placement sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlacementDisk {
    pub id: DiskId,
    /// Failure domain label (host, rack, site).
    pub domain: String,
}

/// Placement for one volume: a pure function of (seed, stripe, disk table) — invariant 6.
#[derive(Clone, Debug)]
pub struct Placement {
    _seed: [u8; 32],
    _disks: Vec<PlacementDisk>,
}

impl Placement {
    pub fn new(seed: [u8; 32], disks: Vec<PlacementDisk>) -> Result<Self, LayoutError> {
        Ok(Self { _seed: seed, _disks: disks })
    }
    /// The `width` distinct disks holding the chunks of `stripe`, in chunk order
    /// (entry `i` holds chunk `i`).
    pub fn place(&self, _stripe: StripeId, _width: usize) -> Result<Vec<DiskId>, LayoutError> {
        todo!("placement")
    }
}
