//! Placement: distinct disks, failure-domain spread, even load, little movement when a disk is
//! added or removed, independence from the table's order, and a golden list that pins the
//! function across versions (invariant 6).
//!
//! The large-count tests print their measured figures (`cargo test --test placement_props --
//! --nocapture`); docs/placement.md quotes them.

use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use shardvol::layout::placement::{Placement, PlacementDisk};
use shardvol::layout::{DiskId, LayoutError, StripeId};
use std::collections::{HashMap, HashSet};

fn disk(id: u32, domain: &str) -> PlacementDisk {
    PlacementDisk {
        id: DiskId(id),
        domain: domain.to_string(),
    }
}

/// `n` disks with ids `first..first+n`, spread round-robin over `domains` domains.
fn table(first: u32, n: u32, domains: u32) -> Vec<PlacementDisk> {
    (first..first + n)
        .map(|i| disk(i, &format!("rack-{}", i % domains)))
        .collect()
}

/// docs/placement.md, written a second time as plainly as possible: every score computed up
/// front, then chunk by chunk the best free disk whose domain is under the cap.
fn reference(seed: &[u8; 32], stripe: u64, disks: &[PlacementDisk], width: usize) -> Vec<DiskId> {
    fn fmix64(mut x: u64) -> u64 {
        x ^= x >> 33;
        x = x.wrapping_mul(0xff51afd7ed558ccd);
        x ^= x >> 33;
        x = x.wrapping_mul(0xc4ceb9fe1a85ec53);
        x ^ (x >> 33)
    }
    let key = blake3::keyed_hash(seed, &stripe.to_le_bytes());
    let k0 = u64::from_le_bytes(key.as_bytes()[0..8].try_into().unwrap());
    let k1 = u64::from_le_bytes(key.as_bytes()[8..16].try_into().unwrap());
    let mut sizes: HashMap<&str, usize> = HashMap::new();
    for d in disks {
        *sizes.entry(d.domain.as_str()).or_default() += 1;
    }
    let cap = (1..)
        .find(|&c| sizes.values().map(|&s| s.min(c)).sum::<usize>() >= width)
        .unwrap();
    let mut used: HashMap<&str, usize> = HashMap::new();
    let mut chosen: Vec<DiskId> = Vec::new();
    for i in 0..width as u64 {
        let c = (i + 1).wrapping_mul(0x9E3779B97F4A7C15);
        let best = disks
            .iter()
            .filter(|d| !chosen.contains(&d.id))
            .filter(|d| used.get(d.domain.as_str()).copied().unwrap_or(0) < cap)
            .max_by_key(|d| fmix64(fmix64(k0 ^ u64::from(d.id.0)) ^ k1 ^ c))
            .unwrap();
        *used.entry(best.domain.as_str()).or_default() += 1;
        chosen.push(best.id);
    }
    chosen
}

#[test]
fn golden_placements_are_pinned() {
    let seed: [u8; 32] = std::array::from_fn(|i| i as u8);
    let disks = vec![
        disk(3, "a"),
        disk(5, "a"),
        disk(8, "b"),
        disk(13, "b"),
        disk(21, "c"),
        disk(34, "c"),
        disk(55, "d"),
        disk(89, "d"),
    ];
    let p = Placement::new(seed, disks.clone()).unwrap();
    let got: Vec<Vec<u32>> = [0, 1, 2, 1000, u64::MAX]
        .iter()
        .map(|&s| {
            p.place(StripeId(s), 6)
                .unwrap()
                .iter()
                .map(|d| d.0)
                .collect()
        })
        .collect();
    let expected: Vec<Vec<u32>> = vec![
        vec![8, 13, 55, 21, 5, 3],
        vec![8, 3, 21, 55, 34, 5],
        vec![13, 55, 89, 21, 3, 8],
        vec![34, 3, 21, 5, 55, 89],
        vec![34, 89, 3, 55, 5, 8],
    ];
    assert_eq!(got, expected);
    // Width 3 over the same table: one chunk per domain at most.
    let got3: Vec<u32> = p
        .place(StripeId(7), 3)
        .unwrap()
        .iter()
        .map(|d| d.0)
        .collect();
    assert_eq!(got3, vec![3, 34, 89]);
    // And the function is the one docs/placement.md describes.
    for s in [0, 1, 2, 1000, u64::MAX] {
        assert_eq!(
            p.place(StripeId(s), 6).unwrap(),
            reference(&seed, s, &disks, 6)
        );
    }
}

#[test]
fn tables_larger_than_the_stack_scratch_give_the_same_function() {
    // 100 disks and 70 domains: both above the 64 entries placed on the stack.
    let seed = [9; 32];
    for domains in [10, 70] {
        let disks = table(500, 100, domains);
        let p = Placement::new(seed, disks.clone()).unwrap();
        for s in 0..200 {
            for width in [1, 6, 20] {
                assert_eq!(
                    p.place(StripeId(s), width).unwrap(),
                    reference(&seed, s, &disks, width)
                );
            }
        }
    }
}

#[test]
fn errors_for_too_wide_stripes_and_duplicate_ids() {
    let p = Placement::new([1; 32], table(0, 5, 5)).unwrap();
    assert_eq!(
        p.place(StripeId(0), 6),
        Err(LayoutError::NotEnoughDisks { need: 6, have: 5 })
    );
    assert_eq!(p.place(StripeId(0), 0), Ok(vec![]));
    let empty = Placement::new([1; 32], vec![]).unwrap();
    assert_eq!(
        empty.place(StripeId(9), 1),
        Err(LayoutError::NotEnoughDisks { need: 1, have: 0 })
    );
    let dup = Placement::new([1; 32], vec![disk(1, "a"), disk(2, "b"), disk(1, "c")]);
    assert!(matches!(dup, Err(LayoutError::Geometry(_))));
}

/// Counts, over `stripes` stripes of width 6, the chunks of each disk and of each (disk, chunk
/// index); asserts that every count is within 5% of even.
fn assert_even_load(p: &Placement, stripes: u64, label: &str) {
    let width = 6;
    let n = p.disks().len();
    let index: HashMap<DiskId, usize> = p
        .disks()
        .iter()
        .enumerate()
        .map(|(j, d)| (d.id, j))
        .collect();
    let mut per_disk = vec![0u64; n];
    let mut per_slot = vec![0u64; n * width];
    let mut out = Vec::new();
    for s in 0..stripes {
        p.place_into(StripeId(s), width, &mut out).unwrap();
        for (i, d) in out.iter().enumerate() {
            let j = index[d];
            per_disk[j] += 1;
            per_slot[j * width + i] += 1;
        }
    }
    let even = (stripes * width as u64) as f64 / n as f64;
    let worst = per_disk
        .iter()
        .map(|&c| (c as f64 / even - 1.0).abs())
        .fold(0.0, f64::max);
    let even_slot = stripes as f64 / n as f64;
    let worst_slot = per_slot
        .iter()
        .map(|&c| (c as f64 / even_slot - 1.0).abs())
        .fold(0.0, f64::max);
    println!(
        "{label}: {stripes} stripes, worst disk {:.3}% from even, worst (disk, chunk) {:.3}%",
        worst * 100.0,
        worst_slot * 100.0
    );
    assert!(worst < 0.05, "{label}: per-disk load {per_disk:?}");
    assert!(
        worst_slot < 0.05,
        "{label}: per-(disk, chunk) load {per_slot:?}"
    );
}

#[test]
fn load_is_even_over_a_million_stripes() {
    // 4 + 2 over 12 disks, each disk its own domain.
    let p = Placement::new([3; 32], table(0, 12, 12)).unwrap();
    assert_even_load(&p, 1_000_000, "12 disks, 12 domains");
    // 4 + 2 over 12 disks in 4 racks of 3 (two chunks per rack at most).
    let p = Placement::new([4; 32], table(100, 12, 4)).unwrap();
    assert_even_load(&p, 200_000, "12 disks, 4 domains");
}

/// Over `stripes` stripes of width 6: the fraction of (stripe, chunk) assignments that differ
/// between two placements, the fraction of stripes with at least one change, and the fraction
/// of assignments of `b` that are on `new_disk` (the least any function could move).
fn moved(a: &Placement, b: &Placement, stripes: u64, new_disk: DiskId) -> (f64, f64, f64) {
    let (mut chunks, mut touched, mut on_new) = (0u64, 0u64, 0u64);
    for s in 0..stripes {
        let x = a.place(StripeId(s), 6).unwrap();
        let y = b.place(StripeId(s), 6).unwrap();
        let c = x.iter().zip(&y).filter(|(p, q)| p != q).count() as u64;
        chunks += c;
        touched += u64::from(c > 0);
        on_new += y.iter().filter(|&&d| d == new_disk).count() as u64;
    }
    let all = (stripes * 6) as f64;
    (
        chunks as f64 / all,
        touched as f64 / stripes as f64,
        on_new as f64 / all,
    )
}

/// Stripes touched: only stripes in which the new disk wins a chunk change, so the fraction is at
/// most `(k+m)/(N+1)` up to sampling noise (standard deviation about 0.25% of it at 200 000
/// stripes); 2% above covers that.
const TOUCHED_TOLERANCE: f64 = 1.02;
/// Chunks moved, against the least possible (the chunks the new disk ends up holding): a chunk
/// taken by the new disk frees its old disk, which may then win a later chunk of the same stripe,
/// and with a binding domain cap the new disk's domain may have to give up a later chunk. That
/// cascade measures 1.27× the least possible for 12 → 13 disks in their own domains, 1.86× for
/// 6 → 7 (width 6: the freed disk is one of only two left out) and 1.59× for 12 → 13 disks in 4
/// domains (docs/placement.md). Allowed: 1.4× for the first, 2.2× for the others. All stay far
/// under `(k+m)/(N+1)`, which every case also asserts.
const CASCADE_WIDE_TABLE: f64 = 1.4;
const CASCADE_NARROW: f64 = 2.2;

#[test]
fn adding_a_disk_moves_about_its_share_of_the_chunks() {
    let stripes = 200_000;
    let seed = [5; 32];
    let new_disk = DiskId(1000);
    for (n, domains, new_domain, cascade) in [
        (12u32, 12u32, "rack-new", CASCADE_WIDE_TABLE),
        (6, 6, "rack-new", CASCADE_NARROW),
        (12, 4, "rack-0", CASCADE_NARROW),
    ] {
        let before = table(0, n, domains);
        let mut after = before.clone();
        after.push(disk(new_disk.0, new_domain));
        let a = Placement::new(seed, before).unwrap();
        let b = Placement::new(seed, after).unwrap();
        let (chunks, touched, least) = moved(&a, &b, stripes, new_disk);
        let bound = 6.0 / f64::from(n + 1);
        println!(
            "add 1 disk to {n} ({domains} domains): {:.2}% of chunks moved, least possible {:.2}% \
             (ratio {:.2}), {:.2}% of stripes touched, bound (k+m)/(N+1) = {:.2}%",
            chunks * 100.0,
            least * 100.0,
            chunks / least,
            touched * 100.0,
            bound * 100.0
        );
        assert!(
            chunks <= least * cascade,
            "{n} disks: moved {chunks}, least {least}"
        );
        assert!(chunks <= bound, "{n} disks: moved {chunks}");
        assert!(
            touched <= bound * TOUCHED_TOLERANCE,
            "{n} disks: touched {touched}"
        );
    }
}

#[test]
fn removing_a_disk_moves_only_about_its_chunks() {
    let stripes = 200_000;
    let seed = [6; 32];
    let before = table(0, 13, 13);
    let after: Vec<PlacementDisk> = before
        .iter()
        .filter(|d| d.id != DiskId(4))
        .cloned()
        .collect();
    let a = Placement::new(seed, before).unwrap();
    let b = Placement::new(seed, after).unwrap();
    // Removing is adding read backwards: the least possible is the removed disk's share, 1/13.
    let (chunks, _, least) = moved(&b, &a, stripes, DiskId(4));
    println!(
        "remove 1 disk of 13: {:.2}% of chunks moved, least possible {:.2}% (ratio {:.2})",
        chunks * 100.0,
        least * 100.0,
        chunks / least
    );
    assert!(
        chunks <= least * CASCADE_WIDE_TABLE,
        "moved {chunks}, least {least}"
    );
    // Every chunk that was not on the removed disk and whose stripe did not hold it stays put.
    for s in 0..10_000 {
        let x = a.place(StripeId(s), 6).unwrap();
        if !x.contains(&DiskId(4)) {
            assert_eq!(x, b.place(StripeId(s), 6).unwrap(), "stripe {s}");
        }
    }
}

/// A disk table: distinct random ids, domains drawn from `0..domains`.
fn any_table() -> impl Strategy<Value = Vec<PlacementDisk>> {
    (1usize..=24, 1u32..=10).prop_flat_map(|(n, domains)| {
        (
            proptest::collection::hash_set(any::<u32>(), n),
            proptest::collection::vec(0..domains, n),
        )
            .prop_map(|(ids, doms)| {
                ids.into_iter()
                    .zip(doms)
                    .map(|(id, d)| disk(id, &format!("dom-{d}")))
                    .collect()
            })
    })
}

proptest! {
    #![proptest_config(ProptestConfig {
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "proptest-regressions/placement_props.txt",
        ))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn placements_are_distinct_disks_of_the_table(
        seed in any::<[u8; 32]>(),
        stripe in any::<u64>(),
        disks in any_table(),
        width_pick in any::<proptest::sample::Index>(),
    ) {
        let width = width_pick.index(disks.len() + 1);
        let p = Placement::new(seed, disks.clone()).unwrap();
        let got = p.place(StripeId(stripe), width).unwrap();
        prop_assert_eq!(got.len(), width);
        let set: HashSet<DiskId> = got.iter().copied().collect();
        prop_assert_eq!(set.len(), width);
        prop_assert!(got.iter().all(|d| disks.iter().any(|t| t.id == *d)));
        prop_assert_eq!(
            p.place(StripeId(stripe), disks.len() + 1),
            Err(LayoutError::NotEnoughDisks { need: disks.len() + 1, have: disks.len() })
        );
        prop_assert_eq!(&got, &reference(&seed, stripe, &disks, width));
    }

    #[test]
    fn domains_get_at_most_their_even_share_when_possible(
        seed in any::<[u8; 32]>(),
        stripe in any::<u64>(),
        disks in any_table(),
        width_pick in any::<proptest::sample::Index>(),
    ) {
        let width = width_pick.index(disks.len()) + 1;
        let p = Placement::new(seed, disks.clone()).unwrap();
        let got = p.place(StripeId(stripe), width).unwrap();
        let domain_of: HashMap<DiskId, &str> = disks.iter().map(|d| (d.id, d.domain.as_str())).collect();
        let mut sizes: HashMap<&str, usize> = HashMap::new();
        for d in &disks {
            *sizes.entry(d.domain.as_str()).or_default() += 1;
        }
        let mut count: HashMap<&str, usize> = HashMap::new();
        for d in &got {
            *count.entry(domain_of[d]).or_default() += 1;
        }
        let most = count.values().copied().max().unwrap();
        let share = width.div_ceil(sizes.len());
        let possible = sizes.values().map(|&s| s.min(share)).sum::<usize>() >= width;
        if possible {
            prop_assert!(most <= share, "a domain got {} > ceil({}/{})", most, width, sizes.len());
        }
        if sizes.len() >= width {
            prop_assert_eq!(most, 1);
        }
        // Never more than the least cap that can be met at all.
        prop_assert_eq!(Some(most).filter(|&m| m <= p.domain_cap(width).unwrap()), Some(most));
    }

    #[test]
    fn the_order_of_the_table_does_not_matter(
        seed in any::<[u8; 32]>(),
        stripe in any::<u64>(),
        disks in any_table(),
        rotate in any::<proptest::sample::Index>(),
    ) {
        let width = disks.len().min(6);
        let mut shuffled = disks.clone();
        shuffled.reverse();
        let r = rotate.index(shuffled.len());
        shuffled.rotate_left(r);
        let a = Placement::new(seed, disks).unwrap().place(StripeId(stripe), width).unwrap();
        let b = Placement::new(seed, shuffled).unwrap().place(StripeId(stripe), width).unwrap();
        prop_assert_eq!(a, b);
    }
}
