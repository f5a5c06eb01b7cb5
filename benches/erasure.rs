//! Erasure coding, 4 + 2: encode and reconstruct at the shard sizes the volume uses (64-byte
//! metadata shards, 4 KiB block ranges, 64 KiB chunks), for the codec in use (`codec/…`,
//! `shardvol::erasure::Codec`) and for the candidate it was measured against (`rss/…`,
//! `reed-solomon-simd` with a reused encoder and decoder).
//!
//! `cargo bench --bench erasure -- --warm-up-time 1 --measurement-time 2`
//!
//! Times are on-CPU time of the benchmarking thread (see `on_cpu`).

use criterion::{
    BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group, criterion_main,
};
use reed_solomon_simd::{ReedSolomonDecoder, ReedSolomonEncoder};
use shardvol::erasure::Codec;
use std::hint::black_box;

const K: usize = 4;
const M: usize = 2;
const SIZES: [(&str, usize); 3] = [("64B", 64), ("4KiB", 4096), ("64KiB", 65536)];

#[path = "support/cpu.rs"]
mod cpu;
use cpu::on_cpu;

fn stripe(len: usize) -> Vec<Vec<u8>> {
    let mut x: u32 = 0x1234_5678;
    (0..K + M)
        .map(|_| {
            (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect()
        })
        .collect()
}

fn encoded(codec: &Codec, len: usize) -> Vec<Vec<u8>> {
    let mut s = stripe(len);
    let (data, parity) = s.split_at_mut(K);
    let data: Vec<&[u8]> = data.iter().map(|d| d.as_slice()).collect();
    let mut parity: Vec<&mut [u8]> = parity.iter_mut().map(|p| p.as_mut_slice()).collect();
    codec.encode(&data, &mut parity).unwrap();
    s
}

fn codec_encode(c: &mut Criterion) {
    let codec = Codec::new(K, M).unwrap();
    let mut g = c.benchmark_group("codec/encode");
    g.sampling_mode(SamplingMode::Flat).sample_size(20);
    for (name, len) in SIZES {
        let mut s = stripe(len);
        g.throughput(Throughput::Bytes((K * len) as u64));
        g.bench_function(BenchmarkId::from_parameter(name), |b| {
            let (data, parity) = s.split_at_mut(K);
            let data: Vec<&[u8]> = data.iter().map(|d| d.as_slice()).collect();
            let mut parity: Vec<&mut [u8]> = parity.iter_mut().map(|p| p.as_mut_slice()).collect();
            b.iter_custom(|iters| {
                on_cpu(iters, || {
                    codec
                        .encode(black_box(&data), black_box(&mut parity))
                        .unwrap()
                })
            })
        });
    }
}

fn codec_reconstruct(c: &mut Criterion) {
    let codec = Codec::new(K, M).unwrap();
    for (what, missing) in [("1data", &[1usize][..]), ("2data", &[0, 2][..])] {
        for data_only in [false, true] {
            let label = if data_only {
                "reconstruct_data"
            } else {
                "reconstruct"
            };
            let mut g = c.benchmark_group(format!("codec/{label}_{what}"));
            g.sampling_mode(SamplingMode::Flat).sample_size(20);
            for (name, len) in SIZES {
                let mut s = encoded(&codec, len);
                let mut present = [true; K + M];
                for &i in missing {
                    present[i] = false;
                }
                g.throughput(Throughput::Bytes((K * len) as u64));
                g.bench_function(BenchmarkId::from_parameter(name), |b| {
                    let mut shards: Vec<&mut [u8]> =
                        s.iter_mut().map(|v| v.as_mut_slice()).collect();
                    b.iter_custom(|iters| {
                        on_cpu(iters, || {
                            if data_only {
                                codec
                                    .reconstruct_data(black_box(&mut shards), &present)
                                    .unwrap()
                            } else {
                                codec.reconstruct(black_box(&mut shards), &present).unwrap()
                            }
                        })
                    })
                });
            }
        }
    }
}

/// Two threads reconstructing 4 KiB ranges through one shared codec, each timing its own
/// on-CPU time (the larger of the two is reported): contention on the decode-matrix cache's
/// mutex would show as more CPU per call than the single-thread figure. Whether the two threads
/// actually overlap depends on the machine's other load.
fn codec_reconstruct_shared(c: &mut Criterion) {
    let codec = Codec::new(K, M).unwrap();
    let mut g = c.benchmark_group("codec/reconstruct_1data_2threads");
    g.sampling_mode(SamplingMode::Flat).sample_size(20);
    g.bench_function("4KiB", |b| {
        b.iter_custom(|iters| {
            std::thread::scope(|scope| {
                let workers: Vec<_> = (0..2)
                    .map(|t| {
                        let codec = &codec;
                        scope.spawn(move || {
                            let mut s = encoded(codec, 4096);
                            let mut shards: Vec<&mut [u8]> =
                                s.iter_mut().map(|v| v.as_mut_slice()).collect();
                            let mut present = [true; K + M];
                            present[t] = false;
                            on_cpu(iters, || {
                                codec.reconstruct(black_box(&mut shards), &present).unwrap()
                            })
                        })
                    })
                    .collect();
                workers
                    .into_iter()
                    .map(|w| w.join().unwrap())
                    .max()
                    .unwrap()
            })
        })
    });
}

fn rss_encode(c: &mut Criterion) {
    let mut g = c.benchmark_group("rss/encode");
    g.sampling_mode(SamplingMode::Flat).sample_size(20);
    for (name, len) in SIZES {
        let s = stripe(len);
        let mut enc = ReedSolomonEncoder::new(K, M, len).unwrap();
        g.throughput(Throughput::Bytes((K * len) as u64));
        g.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter_custom(|iters| {
                on_cpu(iters, || {
                    enc.reset(K, M, len).unwrap();
                    for d in &s[..K] {
                        enc.add_original_shard(d).unwrap();
                    }
                    let r = enc.encode().unwrap();
                    black_box(r.recovery(0).unwrap()[0]);
                })
            })
        });
    }
}

fn rss_reconstruct(c: &mut Criterion) {
    let mut g = c.benchmark_group("rss/decode_1data");
    g.sampling_mode(SamplingMode::Flat).sample_size(20);
    for (name, len) in SIZES {
        let s = stripe(len);
        let mut enc = ReedSolomonEncoder::new(K, M, len).unwrap();
        for d in &s[..K] {
            enc.add_original_shard(d).unwrap();
        }
        let r = enc.encode().unwrap();
        let recovery: Vec<Vec<u8>> = r.recovery_iter().map(|p| p.to_vec()).collect();
        let mut dec = ReedSolomonDecoder::new(K, M, len).unwrap();
        g.throughput(Throughput::Bytes((K * len) as u64));
        g.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter_custom(|iters| {
                on_cpu(iters, || {
                    dec.reset(K, M, len).unwrap();
                    for (i, d) in s[..K].iter().enumerate().skip(1) {
                        dec.add_original_shard(i, d).unwrap();
                    }
                    dec.add_recovery_shard(0, &recovery[0]).unwrap();
                    let r = dec.decode().unwrap();
                    black_box(r.restored_original(0).unwrap()[0]);
                })
            })
        });
    }
}

criterion_group!(
    g,
    codec_encode,
    codec_reconstruct,
    codec_reconstruct_shared,
    rss_encode,
    rss_reconstruct
);
criterion_main!(g);
