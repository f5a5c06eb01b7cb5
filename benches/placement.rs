//! Placement: ns per `place()` of a 4 + 2 stripe over tables of 6, 12 and 24 disks.
//!
//! `cargo bench --bench placement -- --warm-up-time 1 --measurement-time 2`
//!
//! Times are on-CPU time of the benchmarking thread (see `on_cpu`).

use criterion::{BenchmarkId, Criterion, SamplingMode, criterion_group, criterion_main};
use shardvol::layout::placement::{Placement, PlacementDisk};
use shardvol::layout::{DiskId, StripeId};
use std::hint::black_box;
use std::time::{Duration, Instant};

const WIDTH: usize = 6;

/// Time spent on a CPU by the calling thread, from `se.sum_exec_runtime` (milliseconds, six
/// decimals) in `/proc/thread-self/sched`; `None` where that file is missing. The development
/// machines are shared by several builds, so wall time mostly measures the queue for a core.
fn thread_cpu_time() -> Option<Duration> {
    let sched = std::fs::read_to_string("/proc/thread-self/sched").ok()?;
    let line = sched
        .lines()
        .find(|l| l.starts_with("se.sum_exec_runtime"))?;
    let ms: f64 = line.split(':').nth(1)?.trim().parse().ok()?;
    Some(Duration::from_secs_f64(ms / 1e3))
}

/// Runs `f` `iters` times and returns the on-CPU time it took (wall time if the CPU time of the
/// thread cannot be read). The kernel updates the figure at least every scheduler tick, so
/// samples are kept long (flat sampling, 20 samples over the measurement time).
fn on_cpu(iters: u64, mut f: impl FnMut()) -> Duration {
    let (cpu0, wall0) = (thread_cpu_time(), Instant::now());
    for _ in 0..iters {
        f();
    }
    match (cpu0, thread_cpu_time()) {
        (Some(a), Some(b)) => b.saturating_sub(a),
        _ => wall0.elapsed(),
    }
}

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
