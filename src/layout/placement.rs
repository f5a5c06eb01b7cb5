//! Placement: the keyed, pseudorandom map stripe → ordered list of disks.
//!
//! [`Placement::place`] is a pure function of (placement seed, stripe, disk table, width): the
//! same inputs give the same disks on every machine and every version (invariant 6 of
//! DESIGN.md). The function is written down byte for byte in `docs/placement.md`; in short:
//!
//! 1. **Scores.** The stripe key `(k0, k1)` is bytes 0..8 and 8..16, read as little-endian
//!    u64, of `BLAKE3-keyed(key = seed, input = stripe as u64 little-endian)`. Each disk `d` gets
//!    the word `u(d) = fmix64(k0 ^ d.id)`, and its score for chunk `i` is
//!    `fmix64(u(d) ^ k1 ^ (i + 1) · 0x9E3779B97F4A7C15)` (wrapping multiplication), where
//!    `fmix64` is the 64-bit finalizer of MurmurHash3. `fmix64` is a bijection, so two disks
//!    never have the same score for the same chunk: there are no ties to break.
//! 2. **Domain cap.** `cap` is the smallest `c >= 1` with `Σ over domains min(c, disks in the
//!    domain) >= width`. When every domain has enough disks this is `ceil(width / domains)`, so
//!    with at least `width` domains every chunk of a stripe lands in a different domain; when
//!    some domains are too small it is the least cap that can still be met.
//! 3. **Chunks in order.** For `i = 0, 1, …, width-1`, chunk `i` goes to the disk with the
//!    highest score for chunk `i` among the disks not yet chosen whose domain holds fewer than
//!    `cap` chunks of this stripe.
//!
//! This is rendezvous (highest-random-weight) hashing with one independent ranking per chunk
//! index. Ranking per chunk (rather than taking the top `width` disks of one ranking and
//! numbering them by rank) keeps a chunk where it is when the table changes: a disk added to a
//! table of `N` takes chunk `i` of a stripe with probability about `1/(N+1)`, and the other
//! chunks of that stripe stay on their disks except for a small cascade. Measured figures are in
//! `docs/placement.md` and asserted by `tests/placement_props.rs`.
//!
//! The result does not depend on the order of the disks in the table given to
//! [`Placement::new`]. Errors: a duplicate disk id is a [`LayoutError::Geometry`] error from
//! `new`; a width larger than the table is [`LayoutError::NotEnoughDisks`] from `place`.
//!
//! Cost: one BLAKE3 compression per call (the seed keys the whole function through it), then
//! `disks × (width + 1)` evaluations of `fmix64` (two multiplications each) and as many
//! comparisons. Hashing every (stripe, disk) pair with keyed BLAKE3 instead costs, for the
//! hashing alone, 2–2.5 times a whole `place` (measured in `benches/placement.rs`; figures in
//! `docs/placement.md`).

#![forbid(unsafe_code)]

use super::{DiskId, LayoutError, StripeId};

/// Tables of up to this many disks (and domains) are placed with scratch space on the stack, so
/// `place_into` allocates nothing; larger tables use the heap. Any value gives the same result.
const STACK_DISKS: usize = 64;

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
    seed: [u8; 32],
    /// The table, sorted by disk id (so that the input order does not matter).
    disks: Vec<PlacementDisk>,
    /// `domain_of[j]`: index of the failure domain of `disks[j]` (domains numbered by first
    /// appearance in id order; only equality matters).
    domain_of: Vec<usize>,
    /// Disks per domain, by domain index.
    domain_sizes: Vec<usize>,
}

impl Placement {
    /// Checks the table (disk ids distinct) and prepares it. The table may be empty; every
    /// `place` with a positive width then fails with `NotEnoughDisks`.
    pub fn new(seed: [u8; 32], mut disks: Vec<PlacementDisk>) -> Result<Self, LayoutError> {
        disks.sort_by_key(|d| d.id);
        if let Some(w) = disks.windows(2).find(|w| w[0].id == w[1].id) {
            return Err(LayoutError::Geometry(format!(
                "disk id {} appears twice in the disk table",
                w[0].id
            )));
        }
        let mut names: Vec<&str> = Vec::new();
        let mut domain_sizes = Vec::new();
        let mut domain_of = Vec::with_capacity(disks.len());
        for d in &disks {
            let idx = match names.iter().position(|n| *n == d.domain) {
                Some(i) => i,
                None => {
                    names.push(&d.domain);
                    domain_sizes.push(0);
                    names.len() - 1
                }
            };
            domain_sizes[idx] += 1;
            domain_of.push(idx);
        }
        Ok(Self {
            seed,
            disks,
            domain_of,
            domain_sizes,
        })
    }

    /// The disk table, sorted by disk id.
    pub fn disks(&self) -> &[PlacementDisk] {
        &self.disks
    }

    /// Number of distinct failure domains in the table.
    pub fn domain_count(&self) -> usize {
        self.domain_sizes.len()
    }

    /// The most chunks of one stripe of `width` chunks that any failure domain receives: the
    /// smallest `c >= 1` with `Σ min(c, disks in domain) >= width` (rule 2 of the module docs).
    /// `NotEnoughDisks` when the table has fewer than `width` disks.
    pub fn domain_cap(&self, width: usize) -> Result<usize, LayoutError> {
        let have = self.disks.len();
        if width > have {
            return Err(LayoutError::NotEnoughDisks { need: width, have });
        }
        let mut cap = 1;
        while self.domain_sizes.iter().map(|&s| s.min(cap)).sum::<usize>() < width {
            cap += 1;
        }
        Ok(cap)
    }

    /// The `width` distinct disks holding the chunks of `stripe`, in chunk order
    /// (entry `i` holds chunk `i`).
    pub fn place(&self, stripe: StripeId, width: usize) -> Result<Vec<DiskId>, LayoutError> {
        let mut out = Vec::with_capacity(width);
        self.place_into(stripe, width, &mut out)?;
        Ok(out)
    }

    /// [`Placement::place`] writing into `out` (cleared first), for callers that reuse a buffer.
    pub fn place_into(
        &self,
        stripe: StripeId,
        width: usize,
        out: &mut Vec<DiskId>,
    ) -> Result<(), LayoutError> {
        out.clear();
        let cap = self.domain_cap(width)?;
        if width == 0 {
            return Ok(());
        }
        let key = stripe_key(&self.seed, stripe);
        let (n, domains) = (self.disks.len(), self.domain_sizes.len());
        if n <= STACK_DISKS && domains <= STACK_DISKS {
            let mut free = [(0u64, 0usize); STACK_DISKS];
            let mut in_domain = [0usize; STACK_DISKS];
            self.select(
                key,
                width,
                cap,
                &mut free[..n],
                &mut in_domain[..domains],
                out,
            );
        } else {
            let (mut free, mut in_domain) = (vec![(0u64, 0usize); n], vec![0usize; domains]);
            self.select(key, width, cap, &mut free, &mut in_domain, out);
        }
        Ok(())
    }

    /// Rules 1 and 3 for one stripe, given its key `(k0, k1)`: `free` (one slot per disk) and
    /// `in_domain` (one per domain) are scratch space.
    fn select(
        &self,
        (k0, k1): (u64, u64),
        width: usize,
        cap: usize,
        free: &mut [(u64, usize)],
        in_domain: &mut [usize],
        out: &mut Vec<DiskId>,
    ) {
        // free[..left]: the disks not chosen yet, as (per-disk word, index in the table).
        for (slot, (j, d)) in free.iter_mut().zip(self.disks.iter().enumerate()) {
            *slot = (disk_word(k0, d.id), j);
        }
        in_domain.fill(0);
        let mut left = free.len();
        for i in 0..width {
            let salt = k1 ^ chunk_constant(i);
            let mut best: Option<(u64, usize)> = None;
            for (pos, &(u, j)) in free[..left].iter().enumerate() {
                if in_domain[self.domain_of[j]] >= cap {
                    continue;
                }
                let s = fmix64(u ^ salt);
                if best.is_none_or(|(b, _)| s > b) {
                    best = Some((s, pos));
                }
            }
            // The cap leaves a candidate: the domains can hold `width` chunks in all, and fewer
            // than `width` are placed so far.
            let (_, pos) = best.expect("domain cap leaves a candidate disk");
            let j = free[pos].1;
            left -= 1;
            free.swap(pos, left);
            in_domain[self.domain_of[j]] += 1;
            out.push(self.disks[j].id);
        }
    }
}

/// Rule 1: the stripe key `(k0, k1)`, bytes 0..8 and 8..16 (little-endian) of
/// `BLAKE3-keyed(seed, stripe as u64 little-endian)`.
fn stripe_key(seed: &[u8; 32], stripe: StripeId) -> (u64, u64) {
    let h = blake3::keyed_hash(seed, &stripe.0.to_le_bytes());
    let b = h.as_bytes();
    let word = |r: std::ops::Range<usize>| u64::from_le_bytes(b[r].try_into().expect("8 bytes"));
    (word(0..8), word(8..16))
}

/// Rule 1: the per-disk word `u(d) = fmix64(k0 ^ id)`. Distinct ids give distinct words.
fn disk_word(k0: u64, id: DiskId) -> u64 {
    fmix64(k0 ^ u64::from(id.0))
}

/// Rule 1: the constant that separates the rankings of chunk `i`: `(i + 1) * 0x9E3779B97F4A7C15`
/// (wrapping; the 64-bit golden ratio).
fn chunk_constant(i: usize) -> u64 {
    (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// The 64-bit finalizer of MurmurHash3: a bijection on u64 with full avalanche.
fn fmix64(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^= x >> 33;
    x
}
