//! Placement: ns per `place()` of a 4 + 2 stripe over tables of 6, 12 and 24 disks.
//!
//! `cargo bench --bench placement -- --warm-up-time 1 --measurement-time 2`
//!
//! Times are on-CPU time of the benchmarking thread (see `on_cpu`).

use criterion::{BenchmarkId, Criterion, SamplingMode, criterion_group, criterion_main};
use shardvol::layout::placement::{Placement, PlacementDisk};
use shardvol::layout::{DiskId, StripeId};
use std::hint::black_box;

const WIDTH: usize = 6;

#[path = "support/cpu.rs"]
mod cpu;
use cpu::on_cpu;

/// `n` disks spread round-robin over `domains` failure domains.
fn table(n: u32, domains: u32) -> Placement {
    let disks = (0..n)
        .map(|i| PlacementDisk {
            id: DiskId(100 + i),
            domain: format!("host-{}", i % domains),
        })
        .collect();
    Placement::new([7; 32], disks).unwrap()
}

fn place(c: &mut Criterion) {
    let mut g = c.benchmark_group("placement/place_4+2");
    g.sampling_mode(SamplingMode::Flat).sample_size(20);
    for (n, domains) in [(6, 6), (12, 6), (24, 8)] {
        let p = table(n, domains);
        let mut stripe = 0u64;
        g.bench_function(
            BenchmarkId::from_parameter(format!("{n}disks_{domains}domains")),
            |b| {
                b.iter_custom(|iters| {
                    on_cpu(iters, || {
                        stripe = stripe.wrapping_add(1);
                        black_box(p.place(StripeId(black_box(stripe)), WIDTH).unwrap());
                    })
                })
            },
        );
    }
    g.finish();
    let mut g = c.benchmark_group("placement/place_into_4+2");
    g.sampling_mode(SamplingMode::Flat).sample_size(20);
    for (n, domains) in [(6, 6), (12, 6), (24, 8)] {
        let p = table(n, domains);
        let mut stripe = 0u64;
        let mut out = Vec::with_capacity(WIDTH);
        g.bench_function(
            BenchmarkId::from_parameter(format!("{n}disks_{domains}domains")),
            |b| {
                b.iter_custom(|iters| {
                    on_cpu(iters, || {
                        stripe = stripe.wrapping_add(1);
                        p.place_into(StripeId(black_box(stripe)), WIDTH, &mut out)
                            .unwrap();
                        black_box(out[0]);
                    })
                })
            },
        );
    }
}

/// The design this one was measured against: one keyed BLAKE3 per (stripe, disk), as plain
/// rendezvous hashing does. Only the hashing is timed, the lower bound of that design's cost.
fn blake3_per_disk(c: &mut Criterion) {
    let mut g = c.benchmark_group("placement/blake3_per_disk_only");
    g.sampling_mode(SamplingMode::Flat).sample_size(20);
    let key = [7u8; 32];
    for n in [6u32, 12, 24] {
        let mut stripe = 0u64;
        g.bench_function(BenchmarkId::from_parameter(format!("{n}disks")), |b| {
            b.iter_custom(|iters| {
                on_cpu(iters, || {
                    stripe = stripe.wrapping_add(1);
                    let mut acc = 0u8;
                    for id in 0..n {
                        let mut input = [0u8; 12];
                        input[..8].copy_from_slice(&stripe.to_le_bytes());
                        input[8..].copy_from_slice(&id.to_le_bytes());
                        acc ^= blake3::keyed_hash(black_box(&key), &input).as_bytes()[0];
                    }
                    black_box(acc);
                })
            })
        });
    }
}

criterion_group!(g, place, blake3_per_disk);
criterion_main!(g);
